"""
The one HTTP client every provider request goes through: an L{IAgent} that
keeps HTTP/1.1 connections to each upstream open between requests and reads
the answers with httptools (llhttp, the parser of Node.js, in C).

Why not Twisted's C{Agent} with an C{HTTPConnectionPool}: on the data
plane's hot path it costs about 110 µs of CPU per call (a pure-Python
parser fed line by line, a chain of Deferreds and a body producer per
request, a timer per pooled connection), more than all of the gateway's own
work on a call, and it alone held throughput through the gateway to half
of what the upstream serves straight (issue #4 asks for 0.8).  This agent
does the same job for a fraction of that (a bare relay on it serves about
0.8 of the upstream's rate against 0.58 on C{Agent}; see
C{bench/data_plane.py}), behind the same interfaces
(L{IAgent}, L{IResponse}), so treq, the metrics wrapper and the chat call
do not know the difference, and it keeps C{Agent}'s behaviour where callers
rely on it:

  - the endpoints are C{Agent}'s (L{CachedEndpoints}: C{HostnameEndpoint},
    TLS with browser-like certificate checks for https);
  - cancelling a request before its headers arrive closes its connection;
  - a connection that ends before any answer fails with
    L{ResponseNeverReceived}, one cut mid-answer with L{ResponseFailed}, a
    body read to its end with L{ResponseDone}, a body delimited only by the
    connection closing with L{PotentialDataLoss};
  - a body's transport pauses, resumes and (C{stopProducing}) drops the
    connection;
  - only a connection whose answer was read to the end, and whose server
    did not ask to close it, goes back to the pool; idle ones are closed
    after C{idle_seconds}.

A body wanted whole, as every answer in one piece on the data plane is, is
gathered by the response itself (L{UpstreamResponse.read_all}, which
C{openclaw.providers.fetch.read_body} uses): no body protocol, transport
or L{Failure} on the way, about 12 µs less per call.

What it does not do, because no provider request needs it: HEAD requests,
request bodies streamed at an unknown length (a producer's body is gathered
first), pipelining, protocol upgrades.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, NamedTuple

import attrs
import httptools
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import URI, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    UNKNOWN_LENGTH,
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IResponse,
)
from zope.interface import implementer

from openclaw.providers.errors import BodyTooLarge

#: An answer's status line and headers larger than this are not a
#: provider's: the connection is dropped.
MAX_HEAD_BYTES = 64 * 1024

#: What C{Agent} accepts as a request target (it refuses the rest with
#: ValueError too): printable ASCII, no spaces, so no request can be split.
_VALID_URI = re.compile(rb"\A[\x21-\x7e]+\Z")
_VALID_METHOD = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


class Target(NamedTuple):
    """
    Where a request goes, parsed once per URL.
    """

    uri: URI
    #: The pool this request's connections belong to.
    key: tuple[bytes, bytes, int]
    #: The request line's target and the Host header, as sent.
    path: bytes
    host: bytes


@lru_cache(maxsize=512)
def parse_target(url: bytes) -> Target:
    """
    Parse C{url}, once: the data plane sends every call of a route to the
    same few URLs.

    @raise ValueError: C{url} holds characters a request line cannot.
    """
    if not _VALID_URI.match(url):
        raise ValueError(f"invalid URI {url!r}")
    uri = URI.fromBytes(url)
    host = b"[%s]" % uri.host if b":" in uri.host else uri.host
    default_port = 443 if uri.scheme == b"https" else 80
    if uri.port != default_port:
        host += b":%d" % uri.port
    return Target(uri, (uri.scheme, uri.host, uri.port), uri.originForm, host)


def request_bytes(method: bytes, target: Target, headers: Headers | None, body: bytes | None) -> bytes:
    """
    The whole request, ready for one C{write}.  Header values come from
    L{Headers}, which has already replaced any line break in them.
    """
    parts = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, target.path, target.host)]
    if headers is not None:
        for name, values in headers.getAllRawHeaders():
            for value in values:
                parts.append(b"%s: %s\r\n" % (name, value))
    if body is not None:
        parts.append(b"Content-Length: %d\r\n\r\n" % len(body))
        parts.append(body)
    else:
        parts.append(b"\r\n")
    return b"".join(parts)


@implementer(IBodyProducer)
@attrs.frozen
class BytesProducer:
    """
    A request body already in memory.  This agent sends it with the head in
    one write; to any other agent it is an ordinary body producer, written
    in one go (Twisted's C{FileBodyProducer} would hand it over through a
    cooperator, a reactor turn later).
    """

    body: bytes

    @property
    def length(self) -> int:
        return len(self.body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IConsumer)
class _Gather:
    """
    Collects what a body producer writes.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


def gather_body(producer: IBodyProducer) -> Deferred[bytes]:
    """
    Everything C{producer} writes, once it is done.
    """
    into = _Gather()
    return producer.startProducing(into).addCallback(lambda _: b"".join(into.chunks))


@implementer(IAgent)
class UpstreamAgent:
    """
    Sends requests over pooled HTTP/1.1 connections, one request at a time
    on each.

    @param endpoints: Makes the endpoint for a URL (scheme, host, port).
    @param max_idle: Idle connections kept per scheme, host and port.
    @param idle_seconds: How long an idle connection is kept.
    """

    def __init__(
        self, reactor: Any, endpoints: IAgentEndpointFactory, *, max_idle: int, idle_seconds: float
    ) -> None:
        self._reactor = reactor
        self._endpoints = endpoints
        self._max_idle = max_idle
        self._idle_seconds = idle_seconds
        self._idle: dict[tuple[bytes, bytes, int], list[UpstreamConnection]] = {}
        self._connections: set[UpstreamConnection] = set()
        self._sweeper: IDelayedCall | None = None
        self._closing = False
        self._all_closed: list[Deferred[None]] = []

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        try:
            target = parse_target(uri)
            if not _VALID_METHOD.match(method) or method == b"HEAD":
                raise ValueError(f"unsupported method {method!r}")
        except ValueError:
            return fail()
        if bodyProducer is None or isinstance(bodyProducer, BytesProducer):
            body = None if bodyProducer is None else bodyProducer.body
            return self._send(target, request_bytes(method, target, headers, body))
        d = gather_body(bodyProducer)
        d.addCallback(lambda body: self._send(target, request_bytes(method, target, headers, body)))
        return d

    def _send(self, target: Target, raw: bytes) -> Deferred[IResponse]:
        if self._closing:
            return fail(RuntimeError("the upstream agent is closed"))
        idle = self._idle.get(target.key)
        while idle:
            connection = idle.pop()
            # One being dropped (it sent bytes while idle) waits here only
            # until its connectionLost, a turn away.
            if not connection.closing:
                return connection.send(raw)
        endpoint = self._endpoints.endpointForURI(target.uri)
        connecting = endpoint.connect(_ConnectionFactory(self, target.key))
        # Cancelling the result while connecting cancels the connection
        # attempt; once connected, the request (chained Deferreds pass a
        # cancel on to the one they wait for).
        return connecting.addCallback(self._send_on_new, raw)

    def _send_on_new(self, connection: UpstreamConnection, raw: bytes) -> Deferred[IResponse]:
        if self._closing:
            # Closed while this one was connecting.
            connection.close(abort=True)
            raise RuntimeError("the upstream agent is closed")
        return connection.send(raw)

    # -- the pool, for UpstreamConnection -------------------------------------

    @property
    def connection_count(self) -> int:
        """
        Connections open now, idle or not.
        """
        return len(self._connections)

    def connected(self, connection: UpstreamConnection) -> None:
        self._connections.add(connection)

    def release(self, connection: UpstreamConnection) -> None:
        """
        C{connection} is free for the next request to its upstream.
        """
        idle = self._idle.setdefault(connection.key, [])
        if self._closing or len(idle) >= self._max_idle:
            connection.close()
            return
        connection.idle_since = self._reactor.seconds()
        idle.append(connection)
        if self._sweeper is None:
            self._sweeper = self._reactor.callLater(self._idle_seconds, self._sweep)

    def lost(self, connection: UpstreamConnection) -> None:
        self._connections.discard(connection)
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
        if not self._connections and self._all_closed:
            waiting, self._all_closed = self._all_closed, []
            for d in waiting:
                d.callback(None)

    def _sweep(self) -> None:
        """
        Close the connections idle for C{idle_seconds}; come back for the
        rest when the oldest of them is due.
        """
        self._sweeper = None
        now = self._reactor.seconds()
        oldest = None
        for idle in self._idle.values():
            # Most recently used last (they are popped from the end), so the
            # stale ones are a prefix.
            stale = 0
            while stale < len(idle) and now - idle[stale].idle_since >= self._idle_seconds:
                stale += 1
            for connection in idle[:stale]:
                connection.close()
            del idle[:stale]
            if idle and (oldest is None or idle[0].idle_since < oldest):
                oldest = idle[0].idle_since
        if oldest is not None:
            self._sweeper = self._reactor.callLater(oldest + self._idle_seconds - now, self._sweep)

    def close(self) -> Deferred[None]:
        """
        Close every connection (a request still under way fails) and take no
        more requests; fires once all are closed.  For a stop, after the
        calls in flight have drained.
        """
        self._closing = True
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        self._idle.clear()
        if not self._connections:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._all_closed.append(d)
        for connection in list(self._connections):
            connection.close(abort=connection.busy)
        return d


class _ConnectionFactory(Factory):
    #: One per new upstream connection: no "Starting factory" line for each.
    noisy = False

    def __init__(self, agent: UpstreamAgent, key: tuple[bytes, bytes, int]) -> None:
        self._agent = agent
        self._key = key

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self._agent, self._key)


class UpstreamConnection(Protocol):
    """
    One HTTP/1.1 connection to an upstream: sends a request, parses the
    answer, hands the body to whoever reads it, and goes back to the pool.
    """

    def __init__(self, agent: UpstreamAgent, key: tuple[bytes, bytes, int]) -> None:
        self._agent = agent
        self.key = key
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        #: Fires with the response once its headers are in.
        self._waiting: Deferred[IResponse] | None = None
        #: The response whose body is arriving.
        self._response: UpstreamResponse | None = None
        #: The response whose body has just ended, and whether the server
        #: lets the connection serve another request.
        self._complete: UpstreamResponse | None = None
        self._keep_alive = False
        self._head_bytes = 0
        self._phrase = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._answer_started = False
        #: Why the connection is being dropped, if not by the far end.
        self._failure: Failure | None = None
        self._closing = False

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def busy(self) -> bool:
        return self._waiting is not None or self._response is not None

    def connectionMade(self) -> None:
        self._agent.connected(self)
        # One write per request, and for streams small reads: Nagle's delay
        # would only add latency.
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)

    def send(self, raw: bytes) -> Deferred[IResponse]:
        """
        Send one whole request; fires with the response once its headers
        are in.  Cancelling it before then drops the connection.
        """
        self._head_bytes = 0
        self._phrase = b""
        self._raw_headers = []
        self._answer_started = False
        d = self._waiting = Deferred(self._cancel)
        self.transport.write(raw)
        return d

    def _cancel(self, d: Deferred[IResponse]) -> None:
        self._waiting = None
        self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        if self._closing:
            return
        self._closing = True
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except Exception:
            self._failure = Failure()
            self.close(abort=True)
        # An answer that ended in this data is handed over only now that
        # the parser is done with it: bytes after its end (an answer nobody
        # asked for) have then failed above, and cannot be taken for the
        # answer to a request sent from the caller's callback.
        complete, self._complete = self._complete, None
        if complete is not None:
            if self._keep_alive and not self._closing:
                # Back in the pool first, so that a request the caller sends
                # as soon as it has this body can go out on this connection.
                self._agent.release(self)
            else:
                self.close()
            complete.body_ended(None)

    # -- httptools callbacks ----------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiting is None:
            raise ValueError("the upstream sent an answer nobody asked for")
        self._answer_started = True

    def on_status(self, phrase: bytes) -> None:
        self._phrase += phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            raise ValueError(f"the upstream's response headers exceed {MAX_HEAD_BYTES} bytes")
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        code = self._parser.get_status_code()
        if code < 200:
            # 1xx: informational, the answer proper follows.
            self._head_bytes, self._phrase, self._raw_headers = 0, b"", []
            return
        response = self._response = UpstreamResponse(
            self, code, self._parser.get_http_version(), self._phrase, self._raw_headers
        )
        d, self._waiting = self._waiting, None
        assert d is not None
        d.callback(response)

    def on_body(self, data: bytes) -> None:
        if self._response is not None:
            self._response.body_data(data)

    def on_message_complete(self) -> None:
        # None at the end of a 1xx.
        self._complete, self._response = self._response, None
        # Only known now: the parser forgets it once this returns.
        self._keep_alive = self._parser.should_keep_alive()

    # -------------------------------------------------------------------------

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True
        self._agent.lost(self)
        why = self._failure or reason
        d, self._waiting = self._waiting, None
        if d is not None:
            wrapper = ResponseFailed if self._answer_started else ResponseNeverReceived
            d.errback(Failure(wrapper([why])))
            return
        response, self._response = self._response, None
        if response is not None:
            if self._failure is None and response.close_delimited and reason.check(ConnectionDone):
                response.body_ended(Failure(PotentialDataLoss()))
            else:
                response.body_ended(Failure(ResponseFailed([why])))

    def pause(self) -> None:
        self.transport.pauseProducing()

    def resume(self) -> None:
        self.transport.resumeProducing()


@implementer(IPushProducer)
class _BodyTransport:
    """
    What a body protocol gets as its transport: the upstream connection as a
    producer, whose C{stopProducing} drops it.
    """

    def __init__(self, response: UpstreamResponse) -> None:
        self._response = response

    def pauseProducing(self) -> None:
        self._response.connection.pause()

    def resumeProducing(self) -> None:
        self._response.connection.resume()

    def stopProducing(self) -> None:
        self._response.stop()

    def abortConnection(self) -> None:
        """
        What Twisted's C{readBody} calls when cancelled.
        """
        self._response.stop()


class _ClientRequest:
    """
    The little of L{IClientRequest} callers of an agent read.
    """

    method = b""
    absoluteURI = b""
    headers: Headers | None = None


@implementer(IResponse)
class UpstreamResponse:
    """
    An answer whose headers are in; the body follows to L{deliverBody}'s
    protocol, or waits for it in memory.
    """

    request = _ClientRequest()
    previousResponse = None

    def __init__(
        self,
        connection: UpstreamConnection,
        code: int,
        version: str,
        phrase: bytes,
        raw_headers: list[tuple[bytes, bytes]],
    ) -> None:
        self.connection = connection
        self.code = code
        major, _, minor = version.partition(".")
        self.version = (b"HTTP", int(major or 1), int(minor or 1))
        self.phrase = phrase
        self._raw_headers = raw_headers
        self._headers: Headers | None = None
        length: int | object = UNKNOWN_LENGTH
        self.close_delimited = code not in (204, 304)
        for name, value in raw_headers:
            lowered = name.lower()
            if lowered == b"content-length" and value.isdigit():
                length = int(value)
                self.close_delimited = False
            elif lowered == b"transfer-encoding":
                length = UNKNOWN_LENGTH
                self.close_delimited = False
        self.length = length
        self._protocol: Protocol | None = None
        #: Set by L{read_all}: the body is gathered here instead.
        self._gathered: Deferred[bytes] | None = None
        self._limit = 0
        self._size = 0
        self._buffered: list[bytes] = []
        #: How the body ended: L{None} while it is arriving, L{_COMPLETE}
        #: once read to its end, else why not.
        self._ended: Failure | object | None = None
        self._stopped = False
        self._claimed = False

    @property
    def headers(self) -> Headers:
        if self._headers is None:
            headers = Headers()
            for name, value in self._raw_headers:
                headers.addRawHeader(name, value)
            self._headers = headers
        return self._headers

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response  # type: ignore[assignment]

    def deliverBody(self, protocol: Protocol) -> None:
        self._claim()
        self._protocol = protocol
        protocol.makeConnection(_BodyTransport(self))  # type: ignore[arg-type]
        buffered, self._buffered = self._buffered, []
        for data in buffered:
            if self._stopped:
                return
            protocol.dataReceived(data)
        if self._ended is not None and not self._stopped:
            protocol.connectionLost(_reason(self._ended))

    def read_all(self, limit: int) -> Deferred[bytes]:
        """
        The whole body, once it has ended: what C{deliverBody} with a
        collecting protocol gives (Twisted's C{readBody}), without the
        protocol, its transport and a L{Failure} per body on the way, as
        every answer in one piece on the data plane is read.

        Cancelling the result drops the connection.

        @param limit: A body larger than this fails with L{BodyTooLarge},
            and its connection is dropped.
        """
        self._claim()
        d = self._gathered = Deferred(lambda _: self.stop())
        self._limit = limit
        buffered, self._buffered = self._buffered, []
        for data in buffered:
            self._gather(data)
        if self._ended is not None and not self._stopped:
            self._gathering_ended(self._ended)
        return d

    def _claim(self) -> None:
        if self._claimed:
            raise RuntimeError("the body of this response has already been delivered")
        self._claimed = True

    def _gather(self, data: bytes) -> None:
        d = self._gathered
        if d is None:
            # Refused as too large already.
            return
        self._size += len(data)
        if self._size > self._limit:
            self._gathered = None
            self.stop()
            d.errback(BodyTooLarge(f"response body larger than {self._limit} bytes"))
            return
        self._buffered.append(data)

    def _gathering_ended(self, how: Failure | object) -> None:
        d, self._gathered = self._gathered, None
        if d is None:
            return
        if how is _COMPLETE or (isinstance(how, Failure) and how.check(ResponseDone, PotentialDataLoss)):
            body, self._buffered = b"".join(self._buffered), []
            d.callback(body)
        else:
            d.errback(how)

    def body_data(self, data: bytes) -> None:
        if self._stopped:
            return
        if self._protocol is not None:
            self._protocol.dataReceived(data)
        elif self._gathered is not None:
            self._gather(data)
        else:
            self._buffered.append(data)

    def body_ended(self, reason: Failure | None) -> None:
        """
        The body is over: read to its end (C{reason} L{None}), or not.
        """
        if self._stopped or self._ended is not None:
            return
        how = self._ended = _COMPLETE if reason is None else reason
        if self._protocol is not None:
            self._protocol.connectionLost(_reason(how))
        elif self._gathered is not None:
            self._gathering_ended(how)

    def stop(self) -> None:
        """
        Nothing more of this body is wanted: drop the connection, unless the
        body is already over (then the connection is the pool's again).
        """
        if self._stopped or self._ended is not None:
            return
        self._stopped = True
        self.connection.close(abort=True)


#: A body read to its end, before anyone needs it as a L{Failure}.
_COMPLETE = object()


def _reason(how: Failure | object) -> Failure:
    """
    How a body ended, as a body protocol's C{connectionLost} takes it.
    """
    if how is _COMPLETE:
        return Failure(ResponseDone("Response body fully received"))
    assert isinstance(how, Failure)
    return how


__all__ = ["MAX_HEAD_BYTES", "BytesProducer", "UpstreamAgent", "UpstreamResponse", "parse_target", "request_bytes"]
