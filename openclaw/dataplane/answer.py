"""
Answers in one piece (a chat completion, an embeddings list, an error):
written at once when they fit one transport buffer, else part by part as
the client takes them (L{WholeAnswer}).

twisted.web's C{Request.write} only appends to the transport's buffer in
user space: a large answer written at once would count as handed over
long before a slow client has it, and the connection's deadline for the
next request (C{API_HEADER_TIMEOUT_SECONDS}, which starts when the answer
is finished) would cut it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Protocol, cast

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITCPTransport
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request
from zope.interface import implementer

#: The outcome of a call whose client left before its answer, or before
#: a large answer was all handed over (status L{CLIENT_GONE_STATUS}).
CLIENT_GONE = "client gone"
#: The status a call whose client left is counted and logged with
#: (nginx's 499, "client closed request"), whatever went out before.
CLIENT_GONE_STATUS = 499
#: The outcome of a call whose client took no part of its answer within
#: C{API_SEND_TIMEOUT_SECONDS} (its connection aborted).
SEND_TIMEOUT = "send_timeout"
#: The outcome of a call whose large answer a stop cut short (its
#: connection closed once the grace period was over).
SHUTTING_DOWN = "shutting_down"
#: The status a call whose large answer was cut short is counted and
#: logged with, by outcome (as a stream cut short is, whatever status
#: line went out): 499 when its client left, 408 when it took too long
#: to read, 503 when a stop closed its connection.
CUT_STATUS: Mapping[str, int] = MappingProxyType(
    {CLIENT_GONE: CLIENT_GONE_STATUS, SEND_TIMEOUT: 408, SHUTTING_DOWN: 503}
)


class SendDeadline(Protocol):
    """
    What keeps a connection's send deadline
    (L{openclaw.dataplane.connection.APIConnection}).
    """

    def sending(self, answer: WholeAnswer) -> None:
        """
        C{answer} hands its connection a part now: the client must take it
        within the deadline, else C{answer.timed_out()} is called and the
        connection aborted.
        """


class Stream(Protocol):
    """
    An HTTP/2 stream as an answer's request sees it (twisted.web's
    C{H2Stream}, the request's C{channel}).
    """

    def abortConnection(self) -> None:
        """
        Reset the stream (RST_STREAM): its connection and other streams go on.
        """


def http11_channel(request: Request) -> HTTPChannel | None:
    """
    The HTTP/1.1 connection C{request} came on (twisted.web's
    L{HTTPChannel}), or None if it came as an HTTP/2 stream.
    """
    channel = request.channel
    return channel if isinstance(channel, HTTPChannel) else None


def abort(request: Request) -> None:
    """
    Drop what carries C{request} with no more said: its HTTP/1.1
    connection (the transport's C{abortConnection}), or its HTTP/2 stream
    alone (L{reset_stream}: RST_STREAM, the connection's other streams go
    on).
    """
    channel = http11_channel(request)
    if channel is not None:
        cast(ITCPTransport, channel.transport).abortConnection()
    else:
        reset_stream(request)


def reset_stream(request: Request) -> None:
    """
    Reset C{request}'s HTTP/2 stream: through its own C{reset_stream}
    (L{openclaw.dataplane.site.APIRequest.reset_stream}, which also lets
    go of its slot), else the stream's C{abortConnection}.
    """
    reset = getattr(request, "reset_stream", None)
    if reset is not None:
        reset()
    else:
        cast(Any, request.channel).abortConnection()


class StreamSendDeadline:
    """
    The send deadline of a large answer on an HTTP/2 stream, which the
    client paces with the stream's flow-control window (RFC 9113, section
    5.2): each time the stream pauses the answer (its window used up), the
    client has C{seconds} to open it again (WINDOW_UPDATE).  Past that the
    stream is reset and the answer counted C{send_timeout}
    (L{WholeAnswer.reset}); the connection and its other streams go on.

    @ivar seconds: C{API_SEND_TIMEOUT_SECONDS}.
    """

    def __init__(
        self, reactor: IReactorTime, seconds: float, stream: Stream, going_out: set[WholeAnswer] | None = None
    ) -> None:
        self.seconds = seconds
        self._reactor = reactor
        self._stream = stream
        #: Where the answer is while it goes out (its site's, for a stop:
        #: L{WholeAnswer.shutting_down}).
        self._going_out: set[WholeAnswer] = set() if going_out is None else going_out
        self._timer: IDelayedCall | None = None

    def started(self, answer: WholeAnswer) -> None:
        """
        C{answer} starts going out.
        """
        self._going_out.add(answer)

    def ended(self, answer: WholeAnswer) -> None:
        """
        C{answer} is over: no deadline any more.
        """
        self._going_out.discard(answer)
        self.resumed()

    def paused(self, answer: WholeAnswer) -> None:
        """
        The stream paused C{answer}: its window must open within the deadline.
        """
        if self._timer is None:
            self._timer = self._reactor.callLater(self.seconds, self._due, answer)

    def resumed(self) -> None:
        """
        The window opened again (or the answer is over): no deadline until
        the next pause.
        """
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _due(self, answer: WholeAnswer) -> None:
        self._timer = None
        answer.reset(self._stream)


@implementer(IPushProducer)
class WholeAnswer:
    """
    The body of an answer in one piece, written to its request part by
    part, as a streaming producer.

    Over HTTP/1.1 (a send deadline given) one part per L{resumeProducing}:
    each part is more than one transport buffer
    (C{twisted.internet.abstract.FileDescriptor.bufferSize}, L{bufferSize}),
    so that the transport, holding more than its buffer, pauses its
    producer (if it was not paused already, as behind a pipelined answer
    or over TLS) and resumes it only once it has handed all it holds to
    the kernel.  The request is finished from such a resume: nothing of
    the answer is left in user space when the connection's deadline for
    the next request starts, and a close at that deadline is an orderly
    one that lets the kernel deliver the rest.  Over HTTP/2 parts are
    written until the stream pauses it (its flow control), each pause
    under the stream's own deadline (L{StreamSendDeadline}).

    Not twisted.web's L{NoRangeStaticProducer}: as a pull producer it is
    driven through C{_PullToPush}, whose pauses are counted, while a
    transport pauses its producer at every write past its buffer (a
    pipelined answer's head and first part, behind a full buffer, are two
    writes, resumed once): that answer would stall for good.

    @ivar deadline: the connection's send deadline, re-armed at each part
        (None over HTTP/2).
    @ivar stream_deadline: over HTTP/2, the stream's send deadline, armed
        at each pause (L{StreamSendDeadline}).
    @ivar done: fires once the answer is over, never failing: with None
        when it was all handed over, else with the outcome (L{CLIENT_GONE},
        L{SEND_TIMEOUT}, L{SHUTTING_DOWN}; its status is L{CUT_STATUS}'s).
    """

    bufferSize = FileDescriptor.bufferSize

    def __init__(
        self,
        request: Request,
        body: bytes,
        deadline: SendDeadline | None,
        stream_deadline: StreamSendDeadline | None = None,
    ) -> None:
        self.request: Request | None = request
        self.deadline = deadline
        self.stream_deadline = stream_deadline
        self.done: Deferred[str | None] = Deferred()
        #: Why the answer ends if its connection is lost before the end.
        self.outcome = CLIENT_GONE
        self._body = io.BytesIO(body)
        self._size = len(body)
        self._paused = False
        request.notifyFinish().addBoth(self._over)

    def start(self) -> None:
        """
        Register with the request and write the first part.
        """
        assert self.request is not None, "started once"
        if self.stream_deadline is not None:
            self.stream_deadline.started(self)
        self.request.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        """
        Write the next part (over HTTP/2: parts until the stream asks for a
        pause), or, the body all written, finish the request.
        """
        self._paused = False
        if self.stream_deadline is not None:
            self.stream_deadline.resumed()
        while not self._paused and self.request is not None:
            request = self.request
            part = self._next_part()
            if not part:
                self.request = None
                request.unregisterProducer()
                request.finish()
                return
            if self.deadline is not None:
                self.deadline.sending(self)
                # Resumed once the transport has sent it all (see above).
                self._paused = True
            request.write(part)

    def _next_part(self) -> bytes:
        """
        The next part: one buffer and a byte, or all that is left when
        that is less than two such parts, so that each part (the body being
        larger than one buffer) fills an empty buffer past its size.
        """
        size = self.bufferSize + 1
        left = self._size - self._body.tell()
        return self._body.read(left if left < 2 * size else size)

    def pauseProducing(self) -> None:
        self._paused = True
        if self.stream_deadline is not None and self.request is not None:
            self.stream_deadline.paused(self)

    def stopProducing(self) -> None:
        """
        The connection is lost: nothing more is written.
        """
        self.request = None

    def timed_out(self) -> None:
        """
        The client took no part within the send deadline: its connection
        is being aborted.
        """
        self.outcome = SEND_TIMEOUT

    def reset(self, stream: Stream) -> None:
        """
        Its HTTP/2 client kept the stream's window shut past the send
        deadline: reset the stream, and count the answer C{send_timeout}.
        (twisted.web's C{H2Stream.abortConnection} drops the stream without
        telling its request, whose L{done} fires here.)
        """
        self.outcome = SEND_TIMEOUT
        request, self.request = self.request, None
        if request is not None:
            reset_stream(request)
        else:
            stream.abortConnection()
        self._over(Failure(ConnectionError("the stream was reset: its client took no part within the deadline")))

    def shutting_down(self) -> None:
        """
        The gateway is stopping and closes the connection: an answer it
        cuts short is counted as a call the stop ended (503
        C{shutting_down}).
        """
        self.outcome = SHUTTING_DOWN

    def _over(self, result: Failure | None) -> None:
        if self.stream_deadline is not None:
            self.stream_deadline.ended(self)
        if not self.done.called:
            self.done.callback(self.outcome if isinstance(result, Failure) else None)


def send_whole(request: Request, body: bytes) -> Deferred[str | None] | None:
    """
    Write C{body}, the whole of C{request}'s answer body (its status and
    headers set, C{Content-Length} among them), and finish the request.

    @return: None when C{body} fits one transport buffer
        (L{WholeAnswer.bufferSize}): it was written and the request
        finished at once.  Else the body goes out part by part
        (L{WholeAnswer}), under the send deadline of the request's HTTP/1.1
        connection (C{request.connection},
        L{openclaw.dataplane.site.APIRequest.connection}) or of its HTTP/2
        stream (C{request.stream_send_deadline}), and this is
        L{WholeAnswer.done}.
    """
    if len(body) <= WholeAnswer.bufferSize:
        request.write(body)
        request.finish()
        return None
    answer = WholeAnswer(
        request, body, getattr(request, "connection", None), getattr(request, "stream_send_deadline", None)
    )
    answer.start()
    return answer.done
