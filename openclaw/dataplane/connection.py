"""
One client connection of the API's site (L{APIConnection}): the protocol
twisted.web built for it, wrapped to keep its deadlines (through a plain
L{openclaw.dataplane.deadlines.ConnectionDeadlines}) and to close it
politely, or with a lingering close after an early refusal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import attrs
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHalfCloseableProtocol,
    INegotiated,
    IProtocol,
    IPushProducer,
    ISSLTransport,
    ITCPTransport,
    ITransport,
)
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from openclaw.addresses import host_of
from openclaw.dataplane.answer import WholeAnswer
from openclaw.dataplane.context import new_request_id
from openclaw.dataplane.deadlines import SEND_TIMEOUT, ConnectionDeadlines
from openclaw.dataplane.errors import APIError, shutting_down
from openclaw.dataplane.head import head_end, lose_connection, raw_error_response

if TYPE_CHECKING:
    from openclaw.dataplane.site import APISite

#: How long API connections get to close politely on a stop, or after an
#: early refusal (L{APIConnection.close_politely}; a lingering close, too:
#: L{APIConnection.close_lingering}).
CLOSE_DEADLINE_SECONDS = 2.0
#: A lingering close (L{APIConnection.close_lingering}) ends, the
#: connection closed, once its client has sent nothing for this long
#: (seconds; nginx's C{lingering_timeout})...
LINGER_QUIET_SECONDS = 1.0
#: ... or, aborted, once it has read and dropped this many bytes (or
#: twice C{MAX_REQUEST_BYTES}, if more: L{openclaw.dataplane.site.APILimits.linger_bytes}), or
#: at L{CLOSE_DEADLINE_SECONDS} from the refusal (nginx's
#: C{lingering_time}), whichever comes first.
LINGER_MIN_BYTES = 16 * 1024 * 1024
#: Seconds a new API connection has to send its first request head before
#: it counts as keyless (if that head carried no accepted key, it counts
#: from then on): a client's first head arrives in one round trip, so a
#: key holder's new connection is never taken for a keyless one.
KEYLESS_GRACE_SECONDS = 1.0
#: The most an HTTP/2 connection may send while keyless (no request head
#: on it has carried an accepted key) before it is aborted, in bytes:
#: far more than the preface, settings and request heads of a client that
#: has not shown its key yet take (a body needs a key), and a bound on the
#: control frames (SETTINGS, PING) a keyless peer makes the gateway
#: process: twisted.web answers each, and aborts only once its answers
#: back up past the kernel's buffers, so a flood held the reactor about 6 s
#: a connection.  Within API_KEYLESS_TIMEOUT_SECONDS,
#: which closes a keyless connection anyway.
KEYLESS_HTTP2_MAX_BYTES = 256 * 1024
#: The most of a read of a request's body handed to twisted.web at once
#: (L{APIConnection._body_read}): what it decodes of a refused body before
#: the refusal is seen.
BODY_SLICE_BYTES = 4096


@implementer(IPushProducer)
class APIConnection(proxyForInterface(IProtocol, "protocol")):  # type: ignore[misc]
    """
    One client connection of an L{APISite}: the protocol twisted.web built
    for it (whatever HTTP version it turns out to speak), which it passes
    every event to, registered in the site's L{openclaw.connections.OpenConnections} from the
    moment it is made until the protocol has handled its loss.

    The protocol gets the real transport: nothing is added on the write path.

    It keeps the deadlines of an HTTP/1.1 connection: from the moment it
    opens, and from the end of each answer, the next request's head must be
    whole within C{API_HEADER_TIMEOUT_SECONDS}; a body, once its head is
    in, within C{API_BODY_TIMEOUT_SECONDS}.  Each starts once, not
    restarted by the bytes that trickle in.  Past a deadline the client
    gets a 408 (if it had begun a request) and the connection is closed.
    While a large answer goes out part by part (L{WholeAnswer}), each
    part must be taken within
    C{API_SEND_TIMEOUT_SECONDS} (L{sending}), else the connection is
    aborted.  The same holds for any answer of an HTTP/1.1 connection:
    from its first request it stands as the transport's producer in place
    of twisted.web's channel (which it passes every pause and resume on),
    and while the transport has it paused (the client does not take what
    was written) it reads no more requests and the client has
    C{API_SEND_TIMEOUT_SECONDS} to read again (L{pauseProducing}).  These
    deadlines cover every
    wait twisted.web's own idle timeout would (it is off while a request is
    answered), so that timer, moved at every request, is not kept for an
    HTTP/1.1 connection; an HTTP/2 connection is left to it instead.  The
    keyless deadline (C{API_KEYLESS_TIMEOUT_SECONDS} from opening, for a
    connection no request head on which has carried an accepted key)
    holds for both: an HTTP/2 stream's head counts for its connection
    (L{APISite.http2_connection}).

    The timers of these deadlines, and of its close, are kept by a plain
    L{ConnectionDeadlines}: this connection passes its events on to it,
    and acts at its callbacks (L{_expired}, L{_stalled}, L{_grace_over},
    L{_keyless_due}).

    @ivar protocol: the protocol twisted.web built.
    @ivar transport: the connection's transport, once made.
    @ivar address: the client address it counts against (L{openclaw.dataplane.head.client_address}).
    """

    transport: ITransport | None = None
    #: No request head on it has carried an accepted key yet.
    keyless = True
    #: Counted among the site's keyless connections (and so liable to be
    #: closed to make room): it sent a head without an accepted key, or
    #: sent none within L{KEYLESS_GRACE_SECONDS}, or speaks HTTP/2 over
    #: other than IP (L{APISite.http2_opened}).
    counted_keyless = False
    #: Bytes arrived since the last answer: a request is under way.
    _started = False
    #: A request's head is whole and its body is still to come (HTTP/1.1).
    _awaiting_body = False
    #: That body is chunked (a call of twisted.web's per chunk: read in
    #: slices, L{_body_read}).
    _chunked_body = False
    #: The large answer going out, while its send deadline is in force.
    _sending: WholeAnswer | None = None
    #: A stop closes the connection once that answer is all handed over.
    _close_after_answer = False
    _http2 = False
    #: The protocol has handled the connection's loss.
    _lost = False
    #: twisted.web's HTTP/1.1 channel, once the transport's producer is
    #: this connection (L{head_received}); and the transport's reading.
    _channel: IPushProducer | None = None
    _reading: IPushProducer | None = None
    #: A lingering close (L{close_lingering}) under way, or the HTTP/2
    #: connection ended (L{_http2_ended}): bytes read and dropped since.
    _lingered: int | None = None
    #: The gateway has begun to close the connection itself (L{_lose}).
    _closing = False
    #: twisted.web's HTTP/2 connection ended the connection, and what comes
    #: is dropped (L{_http2_ended}).
    _ended_by_http2 = False
    #: An HTTP/2 connection's local and peer addresses, by which its
    #: streams' requests find it (L{APISite.http2_connection}).
    http2_key: tuple[IAddress, IAddress] | None = None
    #: The last bytes of the last read while a head may be coming, in which
    #: its blank line may have begun (L{head_end}).
    _tail = b""

    @property
    def ended_by_http2(self) -> bool:
        """
        twisted.web's HTTP/2 connection has ended the connection
        (L{_http2_ended}): its streams can be answered no more.
        """
        return self._ended_by_http2

    def _arrived(self) -> int:
        return self._received

    @property
    def tcp(self) -> ITCPTransport:
        """
        The connection's transport (TCP, or TLS or a UNIX socket: each can
        be closed and aborted), once made.
        """
        assert self.transport is not None, "not connected"
        return cast(ITCPTransport, self.transport)

    def __init__(self, protocol: IProtocol, site: APISite, address: str | None) -> None:
        super().__init__(protocol)
        self._site = site
        self.address = address
        #: The bytes received so far (its request deadline's
        #: L{CatchingUp <openclaw.stalls.CatchingUp>}).
        self._received = 0
        #: Its timers (L{ConnectionDeadlines}): this connection passes its
        #: events on, and acts at their callbacks.
        self._deadlines = ConnectionDeadlines(
            site.reactor,
            late=self._expired,
            stalled=self._stalled,
            grace_over=self._grace_over,
            keyless=self._keyless_due,
            arrived=self._arrived,
        )

    def makeConnection(self, transport: ITransport) -> None:
        self.transport = transport
        limits = self._site.limits
        self._site.opened(self)
        self._deadlines.arm(limits.header_timeout, "API_HEADER_TIMEOUT_SECONDS", "its head")
        self._deadlines.start_keyless(limits.keyless_grace, limits.keyless_timeout)
        # No idle timer for HTTP/1.1: the deadlines above take its place.
        self.protocol.timeOut = None
        self.protocol.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self._received += len(data)
        if self._lingered is not None:
            self._linger_read(data)
            return
        if not self._started:
            self._started = True
            transport = self.transport
            if INegotiated.providedBy(transport) and transport.negotiatedProtocol == b"h2":
                self._http2 = True
                # twisted.web's idle timeout, which the HTTP/2 protocol
                # twisted.web switches to now takes on.
                self.protocol.timeOut = self._site.limits.http2_idle_timeout
                self._deadlines.end_request_deadlines()
                if not self._site.http2_opened(self):
                    # Its requests cannot find it: their keys are not
                    # counted, and it is keyless for its whole life.
                    self._deadlines.stop_keyless()
                    self.count_keyless()
        if self._http2 and self.keyless and self.http2_key is not None and self._received > KEYLESS_HTTP2_MAX_BYTES:
            self._site.http2_keyless_flood(self)
            self.tcp.abortConnection()
            return
        if not self._http2 and self._chunked_body and self._awaiting_body and len(data) > BODY_SLICE_BYTES:
            self._body_read(data)
            return
        if not self._http2 and not self._awaiting_body:
            # A request head may end in this read: when it declares a
            # chunked body, twisted.web gets the head alone first, so that
            # what follows it is not decoded when the head is refused (a
            # body without a key, or too large): it decoded the rest of
            # the read all the same, a call per chunk, so a keyless client
            # sending 1-byte chunks cost the gateway a call per byte.
            # Dropped instead, as the lingering close drops what comes
            # after.  (A body of known length is kept
            # whole at no cost per byte: not split.)
            end = head_end(self._tail, data)
            self._tail = data[-3:]
            if 0 < end < len(data) and b"chunked" in data[:end].lower():
                self.protocol.dataReceived(data[:end])
                if self._lingered is not None:
                    self._linger_read(data[end:])
                elif self._awaiting_body:
                    self._body_read(data[end:])
                elif not self._deadlines.closing and not getattr(self.transport, "disconnecting", False):
                    # (Nor once twisted.web refused the head itself and
                    # closed: it would read the rest as another request.)
                    self.protocol.dataReceived(data[end:])
                return
        self.protocol.dataReceived(data)
        if self._http2 and not self._closing and getattr(self.transport, "disconnecting", False):
            self._http2_ended()

    def _body_read(self, data: bytes) -> None:
        """
        A read of a request's chunked body (HTTP/1.1), handed to twisted.web
        L{BODY_SLICE_BYTES} at a time, so that once the body is refused (too
        large, or in pieces too small: L{openclaw.dataplane.site.APIRequest})
        the rest of the read is dropped unparsed, as the lingering close
        drops what comes after; twisted.web would decode the whole read, a
        call per chunk of a chunked body.
        """
        for start in range(0, len(data), BODY_SLICE_BYTES):
            if self._lingered is not None:
                self._linger_read(data[start:])
                return
            if self._deadlines.closing or getattr(self.transport, "disconnecting", False):
                return
            self.protocol.dataReceived(data[start : start + BODY_SLICE_BYTES])

    def connectionLost(self, reason: Failure) -> None:
        # First: an answer finished while the protocol handles the loss
        # arms no deadline.
        self._lost = True
        self._sending = None
        self._deadlines.lost()
        try:
            self.protocol.connectionLost(reason)
        finally:
            self._site.closed(self)

    def key_accepted(self) -> None:
        """
        A request head on this connection carried an accepted key: it is no
        longer counted among the keyless ones, and has no keyless deadline.
        """
        if self.keyless:
            self.keyless = False
            self._deadlines.stop_keyless()
            if self.counted_keyless:
                self.counted_keyless = False
                self._site.key_accepted(self)

    def count_keyless(self) -> None:
        """
        This connection had its chance to send a key and did not: count it
        among the site's keyless connections (L{APISite.became_keyless},
        which may close it, or the oldest keyless one, to keep within the
        keyless shares).
        """
        if self.keyless and not self.counted_keyless and self in self._site.connections:
            self.counted_keyless = True
            self._site.became_keyless(self)

    def _grace_over(self) -> bool:
        """
        L{KEYLESS_GRACE_SECONDS} passed without a head carrying a key: the
        connection counts as keyless (L{count_keyless}).

        @return: whether its keyless deadline follows (it is still
            counted, and open).
        """
        if not self.keyless or self._sending is not None:
            # A large answer going out has its send deadline instead.
            return False
        self.count_keyless()
        return self.counted_keyless and self in self._site.connections

    def _keyless_due(self) -> None:
        if not self.keyless or self._sending is not None:
            # A large answer going out has its send deadline instead.
            return
        if self._http2:
            # No answer to write, as HTTP/1.1's 401: closed, with its streams.
            self._close_http2()
            return
        # The request's deadline (waiting for the resume, if paused) gives
        # way to this one.
        armed = self._deadlines.drop_request_deadline()
        seconds = self._site.limits.keyless_timeout
        if self._started and armed is not None and armed[1] == "API_HEADER_TIMEOUT_SECONDS":
            # A request head begun but not whole: it is late, not keyless
            # (its key may be in the part still to come), and logged as
            # refused at the keyless deadline all the same.
            self._expired(seconds, "API_KEYLESS_TIMEOUT_SECONDS", armed[2], outcome="keyless_timeout")
            return
        self._refused_late(
            APIError(
                401,
                f"no request with an accepted API key within API_KEYLESS_TIMEOUT_SECONDS ({seconds:g} s) of "
                "connecting; send 'Authorization: Bearer <key>' with the first request",
                "invalid_request_error",
                "keyless_timeout",
            )
        )

    def head_received(self, has_body: bool, channel: object, chunked: bool = False) -> None:
        """
        A request's head is whole: its body, if it has one, may now take
        up to C{API_BODY_TIMEOUT_SECONDS}.  A request is under way (a 408
        at its deadline), also for a pipelined request's head, which
        twisted.web hands over from its buffer once the answer before it
        is finished.

        @param channel: the request's channel (twisted.web's
            L{twisted.web.http.HTTPChannel}): at the first request this connection becomes
            the transport's producer in its place (L{pauseProducing}).
        @param chunked: its body is chunked: its reads go to twisted.web
            in slices (L{_body_read}).
        """
        if self._channel is None:
            self._produce_for(cast(IPushProducer, channel))
        self._started = True
        self._awaiting_body = has_body
        self._chunked_body = has_body and chunked
        if has_body:
            self._deadlines.arm(self._site.limits.body_timeout, "API_BODY_TIMEOUT_SECONDS", "its body")
        else:
            self._deadlines.disarm()

    def body_received(self) -> None:
        """
        A request is whole: no deadline while it is answered (calls have
        UPSTREAM_TIMEOUT).
        """
        self._awaiting_body = False
        self._deadlines.disarm()

    def response_finished(self) -> None:
        """
        An answer is complete: the next request's head has
        C{API_HEADER_TIMEOUT_SECONDS} from now (if the connection is still
        open).
        """
        if self._lost:
            return
        self._started = False
        self._sending = None
        if self._close_after_answer:
            self.close_politely()
            return
        self._deadlines.arm(self._site.limits.header_timeout, "API_HEADER_TIMEOUT_SECONDS", "its head")

    def _produce_for(self, channel: IPushProducer) -> None:
        """
        Stand as the transport's producer in place of C{channel}, which
        registered itself when the connection was made (nothing was
        written to the transport since, so it has not paused it).
        """
        self._channel = channel
        if self._lost or self._deadlines.closing:
            return
        transport = self.tcp
        self._reading = IPushProducer(transport, None)
        consumer = cast(IConsumer, transport)
        consumer.unregisterProducer()
        consumer.registerProducer(self, True)

    def pauseProducing(self) -> None:
        """
        The transport holds more than its buffer: the client is not taking
        the answers (or not as fast as they come).  twisted.web's channel
        is paused (and so any answer going out part by part), the
        transport reads no more requests, and the client has
        C{API_SEND_TIMEOUT_SECONDS} to take what was written (the
        transport resumes its producer once it has handed it all to the
        kernel), else the connection is aborted; the request's own
        deadline, if any, waits meanwhile (L{resumeProducing}).

        twisted.web's channel stops reading itself only when it is paused
        between requests: paused while it answers one (as a small answer
        is written, before the request is finished), it goes on reading
        and answering pipelined requests, so the answers of a client that
        sends requests and never reads pile up in memory without bound.
        Here only the rest of what it has read already is answered.

        The transport pauses its producer at every write past its buffer:
        the deadline runs from the first, not moved by the gateway's own
        writes.
        """
        assert self._channel is not None
        self._channel.pauseProducing()
        if self._reading is not None:
            self._reading.pauseProducing()
        # None over HTTP/2, nor once the connection closes.
        self._deadlines.pause(self._site.limits.send_timeout, "the answers written")

    def resumeProducing(self) -> None:
        """
        The transport has handed all it held to the kernel: the send
        deadline ends, and the request's deadline that waited runs again,
        afresh; twisted.web's channel is resumed (it reads again once no
        request is in hand).
        """
        self._deadlines.resume()
        assert self._channel is not None
        self._channel.resumeProducing()

    def stopProducing(self) -> None:
        assert self._channel is not None
        self._channel.stopProducing()

    def sending(self, answer: WholeAnswer) -> None:
        """
        C{answer} hands the transport a part now: the client has
        C{API_SEND_TIMEOUT_SECONDS} from now to take it (the transport
        resumes the answer only once it has sent this part, so this is the
        time between two successive writes, as nginx's C{send_timeout},
        not the whole transfer).  Past it the connection
        is aborted (the status line is out: no error can be sent), and
        C{answer} told (L{WholeAnswer.timed_out}), so that its call is
        counted with outcome C{send_timeout}.
        """
        if self._lost:
            return
        self._sending = answer
        self._deadlines.arm(self._site.limits.send_timeout, SEND_TIMEOUT, "a part of the answer")

    def _stalled(self, seconds: float, setting: str, part: str) -> None:
        """
        The send deadline passed (L{sending}, L{pauseProducing}): the
        connection is aborted, the answer going out told.
        """
        answer, self._sending = self._sending, None
        if answer is not None:
            answer.timed_out()
        elif self._site.context is not None and not self._started:
            # Answers finished and counted already: the abort is logged
            # (a call under way, a stream, logs its own ending).
            self._site.context.log.info(
                "API connection from {peer} aborted: its client had not taken all of {part} within "
                "{setting} ({seconds:g} s)",
                peer=host_of(self.tcp.getPeer()),
                part=part,
                setting=setting,
                seconds=seconds,
            )
        self.tcp.abortConnection()

    def _expired(self, seconds: float, setting: str, part: str, outcome: str | None = None) -> None:
        self._refused_late(
            APIError(
                408,
                f"the request did not arrive whole in time: {part} took more than "
                f"{setting} ({seconds:g} s); send the whole request at once",
                "invalid_request_error",
                "request_timeout",
            ),
            outcome,
        )

    def _refused_late(self, error: APIError, outcome: str | None = None) -> None:
        """
        Close the connection at a deadline: with C{error} if the client
        had begun a request, silently if it was idle between requests.

        @param outcome: the log's C{outcome} when not C{error}'s code
            (L{openclaw.dataplane.context.APIContext.refused_early}).
        """
        if self._started:
            self._answer_raw(error, outcome)
        self.close_politely()

    def _answer_raw(self, error: APIError, outcome: str | None = None) -> None:
        """
        Answer the request under way with C{error}, written as it is
        (L{raw_error_response}: twisted.web is not answering it), logged
        and counted (L{openclaw.dataplane.context.APIContext.refused_early}); the caller closes.
        """
        transport = self.tcp
        request_id = new_request_id()
        if self._site.context is not None:
            self._site.context.refused_early(
                error, outcome, host_of(transport.getPeer()), request_id=request_id, keyless=self.keyless
            )
        transport.write(raw_error_response(error, request_id))

    def close_lingering(self) -> None:
        """
        Close the connection after an answer written while its client may
        still be sending (an early refusal: the body was not read), so that
        the client gets the answer: a lingering close (RFC 9112 section
        9.6; nginx's C{lingering_close}, Apache's lingering close).  A
        server that closes while bytes come in, or with bytes unread, has
        its kernel reset the connection, and a client still sending (the
        openai SDKs) may then lose the answer to the reset and see a
        connection error (EPIPE, ECONNRESET) instead.

        So only the sending side is closed once the answer is sent
        (C{ITCPTransport.loseWriteConnection}: a FIN after the answer), and
        what the client sends is read and dropped, until it closes its own
        side (then the connection is closed), or sends nothing for
        L{LINGER_QUIET_SECONDS} (closed), or has sent more than
        L{openclaw.dataplane.site.APILimits.linger_bytes} (aborted), or C{API_BODY_TIMEOUT_SECONDS}
        have passed (aborted: the time the client had to send a body; a
        deadline of the polite close's 2 s cut an upload slower than that
        short, with the EPIPE this avoids), and no more than
        C{API_KEYLESS_TIMEOUT_SECONDS} for a connection that has shown no
        key (a 401): no longer than any keyless connection is kept.

        Over TLS, and HTTP/2 (only over TLS), a polite close
        (L{close_politely}) instead: Twisted's TLS transport has no
        half-close of its own (C{loseWriteConnection} would shut the TCP
        connection's sending side under the TLS layer, with no
        C{close_notify}, while it may still have TLS records to send).
        """
        transport = self.transport
        if (
            self._http2
            or self._deadlines.closing
            or ISSLTransport.providedBy(transport)
            or not ITCPTransport.providedBy(transport)
        ):
            self.close_politely()
            return
        self.close_politely(linger=True)

    def _linger_read(self, data: bytes) -> None:
        """
        C{data} came during a lingering close, or after twisted.web's HTTP/2
        connection ended the connection (L{_http2_ended}): dropped, and the
        connection aborted past L{openclaw.dataplane.site.APILimits.linger_bytes}.
        """
        lingered = self._lingered = (self._lingered or 0) + len(data)
        self._deadlines.heard()
        if lingered > self._site.limits.linger_bytes:
            if self._ended_by_http2:
                self._site.http2_flooded(self)
            self.tcp.abortConnection()

    def _close_http2(self) -> None:
        """
        Close an HTTP/2 connection at the gateway's word (its keyless
        deadline): twisted.web's connection is unregistered as the TLS
        transport's producer, so that the transport sends its
        C{close_notify} and closes once the client answers it, with no
        more written (a TLS transport closes only once no producer is
        registered, L{lose_connection}); what comes meanwhile is dropped
        (L{_linger_read}), and the connection aborted at
        L{CLOSE_DEADLINE_SECONDS} (L{close_politely}).
        """
        self._lingered = 0
        lose_connection(self.tcp)
        self.close_politely()

    def _http2_ended(self) -> None:
        """
        twisted.web's HTTP/2 connection has ended the connection (h2 found a
        protocol error in what the client sent, such as a header block not
        ended within 64 CONTINUATION frames; or the client sent GOAWAY; or
        twisted.web's own idle or control-frame limit), yet the TLS
        transport reads on while that connection is its producer, and
        twisted.web hands h2 all that comes, which h2 then keeps without
        bound: one connection without a key could hold the gateway's memory
        without limit (CVE-2024-27316's class).

        From now on what comes is read and dropped (L{_linger_read}): the
        connection is aborted once more than L{openclaw.dataplane.site.APILimits.linger_bytes} came
        (logged, L{APISite.http2_flooded}), or L{CLOSE_DEADLINE_SECONDS}
        from now; a client that closes its side (after its GOAWAY) is gone
        at once, as before.  Seen from here by the TLS transport's
        C{disconnecting} (set by C{loseConnection}, and by an abort): no
        close of the gateway's own is under way then (L{_closing}).
        """
        self._ended_by_http2 = True
        self._lingered = 0
        self.close_politely()

    def readConnectionLost(self) -> None:
        """
        The client closed its sending side during a lingering close (this
        connection is then an C{IHalfCloseableProtocol}): closed once the
        answer is all sent (it may not be yet: a client that half-closes
        right after its request).
        """
        self.tcp.loseConnection()

    def writeConnectionLost(self) -> None:
        """
        The answer of a lingering close is sent and the sending side
        closed: reading on, as before.
        """

    def close_politely(self, linger: bool = False) -> None:
        """
        Close the connection once what was written to it is sent, and abort
        it if that takes more than L{CLOSE_DEADLINE_SECONDS} (a client that
        does not read could hold a polite close open); no other deadline
        of the connection runs from now on.

        @param linger: close only the sending side, and read on
            (L{close_lingering}, which checks the transport can).
        """
        if self._deadlines.closing:
            return
        transport = self.tcp
        if linger:
            self._linger()
        else:
            self._lose()
        # A lingering client gets the time it had for a body it may still be
        # sending (nginx's lingering_time is 30 s too), one without a key
        # no more than any keyless connection; a polite close, the time to
        # read its answer.
        limits = self._site.limits
        if linger:
            deadline = min(limits.keyless_timeout, limits.body_timeout) if self.keyless else limits.body_timeout
        else:
            deadline = CLOSE_DEADLINE_SECONDS
        self._deadlines.close(deadline, transport.abortConnection)

    def shutting_down(self) -> None:
        """
        The gateway is stopping: close this connection politely, at once,
        or, while a large answer goes out (L{WholeAnswer}), once it was all
        handed over (L{response_finished}).  Not before: a transport asked
        to close while its producer is paused resumes the producer when its
        buffer is empty rather than closing, and would then wait for a write
        that never comes.  An answer the stop cuts short (the site aborts
        what is left after L{CLOSE_DEADLINE_SECONDS}) is counted as the
        stop's (L{WholeAnswer.shutting_down}).
        """
        if self._sending is not None:
            self._sending.shutting_down()
            self._close_after_answer = True
        elif self._awaiting_body and not self._http2 and not self._deadlines.closing:
            # A request whose body was still coming when the stop began
            # (closed with nothing said, nor logged): 503
            # shutting_down, logged and counted, and the close lingers,
            # for the client may still be sending.
            self._awaiting_body = False
            self._answer_raw(
                attrs.evolve(
                    shutting_down(),
                    message="the gateway is shutting down and its request's body was still arriving; retry it",
                )
            )
            self.close_lingering()
        else:
            self._lose()

    def _linger(self) -> None:
        """
        Begin a lingering close (L{close_lingering}): the sending side
        closed once what was written is sent, reading on (resumed, should
        the transport have it paused), what comes dropped.
        """
        transport = self.tcp
        # The transport half-closes only once no producer is registered
        # (twisted.web's channel, or this connection in its place).
        cast(IConsumer, transport).unregisterProducer()
        self._lingered = 0
        # Closed once the client sends nothing for LINGER_QUIET_SECONDS.
        self._deadlines.start_quiet(LINGER_QUIET_SECONDS, transport.loseConnection)
        # The client's end of input is then read as that side's close
        # (readConnectionLost), not as the connection's loss, which would
        # drop an answer not yet all sent.
        alsoProvides(self, IHalfCloseableProtocol)
        transport.loseWriteConnection()
        reading = self._reading if self._reading is not None else IPushProducer(transport, None)
        if reading is not None:
            reading.resumeProducing()

    def abort(self) -> None:
        """
        Drop the connection now, at the gateway's word (a cap on keyless
        connections): not taken for twisted.web's own end of it.
        """
        self._closing = True
        self.tcp.abortConnection()

    def _lose(self) -> None:
        """
        Close the connection once what was written to it is sent.  Over
        HTTP/2, twisted.web's connection writes a finished answer's body
        (and the stop's own 503s) frame by frame on the turns after, which a
        TLS transport takes only while that connection is still its
        producer: it is left so, and the transport closes at the abort
        after L{CLOSE_DEADLINE_SECONDS} instead (L{lose_connection}).
        """
        self._closing = True
        if self._http2:
            self.tcp.loseConnection()
        else:
            lose_connection(self.tcp)
