"""
The C{/metrics} listener (C{--metrics-listen}): a L{MetricsSite} serving
C{GET /metrics} only, to a few scrapers at once (L{METRICS_MAX_CONNECTIONS}),
each connection closed after C{API_HEADER_TIMEOUT_SECONDS} without a byte
from its client; its requests are checked as the API's heads are
(L{openclaw.dataplane.head}) and any with a body is refused.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IReactorTime,
    ITCPTransport,
)
from twisted.logger import Logger, LogLevel
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from openclaw.addresses import AddressSlots, host_of
from openclaw.dataplane.answer import http11_channel
from openclaw.dataplane.context import clipped
from openclaw.dataplane.head import (
    NextTurnRequest,
    RefusedConnection,
    client_address,
    invalid_host,
    lacks_host,
    lose_connection,
    origin_form,
    raw_response,
    repeated_field,
    unframed_body,
)
from openclaw.logs import METRICS_NAMESPACE
from openclaw.settings import Settings
from openclaw.web import head_or_body

#: The metrics listener's events.  Not an attribute of L{MetricsSite}: a
#: L{Logger} declared on a class takes the class's name as its namespace
#: (L{Logger.__get__}), and an instance attribute of a twisted.web site
#: would read like the site's own state.
_metrics_log = Logger(namespace=METRICS_NAMESPACE)


#: Connections the C{/metrics} listener (C{--metrics-listen}) holds at
#: once: scrapers are few (Prometheus keeps one connection per target), and
#: the descriptors come out of those the process keeps for itself
#: (L{openclaw.listeners.MIN_RESERVED_DESCRIPTORS} at least).
METRICS_MAX_CONNECTIONS = 16


def metrics_listener(resource: Resource, settings: Settings, reactor: IReactorTime) -> MetricsSite:
    """
    The C{/metrics} listener's factory: a L{MetricsSite} serving
    C{resource}, whose connections are closed after
    C{API_HEADER_TIMEOUT_SECONDS} without a byte from the client, at most
    L{METRICS_MAX_CONNECTIONS} of them open, so that the listener can
    never take the descriptors the API and the control plane need.
    """
    return MetricsSite(resource, settings.api_header_timeout_seconds, METRICS_MAX_CONNECTIONS, reactor)


class MetricsRequest(NextTurnRequest):
    """
    A request of the C{/metrics} listener (C{--metrics-listen}): one with
    more than one C{Host} field, a C{Host} that is not one, or a body (the
    listener serves C{GET /metrics} only) is answered 400, as soon as its
    head is in, and the connection closed (over HTTP/2: answered once its
    stream ends, but a stream whose body comes is reset); nothing of a
    body is kept.
    """

    def gotLength(self, length: int | None) -> None:
        repeated = repeated_field(self, b"host")
        channel = http11_channel(self)
        if repeated:
            self._refuse(self._BODY)
        elif invalid_host(self):
            self._refuse(self._INVALID_HOST)
        elif length or (length is None and channel is not None) or unframed_body(self):
            # A length, or (HTTP/1.1) chunked, or another transfer coding: a body.
            self._refuse(self._NO_BODY)
        # Nothing of a body is kept, refused or not (none is read).
        super().gotLength(0)

    def _refuse(self, body: bytes) -> None:
        """
        Answer 400 with C{body}: over HTTP/1.1 at once (the connection
        closed); over HTTP/2 once the stream ends (L{process}).
        """
        if self._refused is not None:
            return
        self._refused = body
        channel = http11_channel(self)
        if channel is not None:
            self.requestHeaders.removeHeader(b"expect")
            self._bad_request(channel, body)

    #: The body of the 400 the request is refused with, if it is.
    _refused: bytes | None = None
    _BODY = b"more than one Host header field (RFC 9112 section 3.2); send exactly one\n"
    _NO_BODY = b"this listener (--metrics-listen) serves GET /metrics only: send no request body\n"
    _INVALID_HOST = b"the Host header field is not a host and optional port (RFC 9112 section 3.2); send one\n"
    _NO_HOST = b"the HTTP/1.1 request has no Host header field (RFC 9112 section 3.2); send one\n"

    _INVALID_TARGET = (
        b"the request target is neither a path nor an http(s) URL whose authority is a host and optional port "
        b"(RFC 9112 section 3.2.2); send the path alone: /metrics\n"
    )

    def requestReceived(self, command: bytes, path: bytes | None, version: bytes) -> None:
        if http11_channel(self) is not None and lacks_host(self, version):
            self._refuse(self._NO_HOST)
        target = origin_form(self, command, path, version)
        if target is None:
            self._refuse(self._INVALID_TARGET)
            # Never routed (refused), nor echoed.
            target = b"/"
        super().requestReceived(command, target, version)

    def _bad_request(self, channel: HTTPChannel, body: bytes) -> None:
        """
        Answer 400 with C{body} (plain text), close the connection, and log
        the refusal at info (the site's L{MetricsSite.log} never sees it).
        """
        transport = channel.transport
        assert transport is not None
        transport.write(raw_response(400, body, b"text/plain; charset=utf-8"))
        lose_connection(transport)
        self._log_refusal(body)

    def _log_refusal(self, body: bytes) -> None:
        _metrics_log.info(
            "refused a request with {status} for {peer}: {reason}",
            status=400,
            peer=host_of(self.getClientAddress()),
            reason=body.decode("ascii").rstrip("\n"),
        )

    def process(self) -> None:
        if not self.ready() or self._reset:
            return
        if self._refused is None:
            super().process()
        elif http11_channel(self) is None:
            # An HTTP/2 stream, now whole: answer it the usual way.
            self.setResponseCode(400)
            self.setHeader(b"content-type", b"text/plain; charset=utf-8")
            self.write(self._refused)
            self.finish()

    def handleContentChunk(self, data: bytes) -> None:
        # A body: dropped (over HTTP/2 its length may not have been given).
        if not data or self._reset:
            return
        self._refuse(self._NO_BODY)
        if http11_channel(self) is None:
            # An HTTP/2 stream would be answered only once it ends, which a
            # client sending for ever would put off: reset, on the next
            # turn (twisted.web is still going through the frames read with
            # this one, some of which may be the stream's), and logged.
            self._reset = True
            self._log_refusal(self._NO_BODY)
            self.channel_site.reactor.callLater(0, self._reset_stream, self.channel)

    def _reset_stream(self, stream: object) -> None:
        if not self._lost:
            # The H2Stream: RST_STREAM.
            cast(ITCPTransport, stream).abortConnection()

    #: Over HTTP/2: the stream is reset for its body.
    _reset = False


class MetricsRoot(Resource):
    """
    The root of the C{/metrics} listener (C{--metrics-listen}): C{metrics}
    at C{/metrics}, and for any other path a short plain-text 404 saying
    what the listener serves, rather than twisted.web's HTML "No Such
    Resource" page.
    """

    def __init__(self, metrics: Resource) -> None:
        super().__init__()
        self.putChild(b"metrics", metrics)

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _MetricsNotFound()

    def render(self, request: Request) -> bytes:
        return _MetricsNotFound().render(request)


class _MetricsNotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return head_or_body(request, b"no such endpoint: this listener (--metrics-listen) serves GET /metrics only\n")


class MetricsSite(Site):
    """
    The site of the C{/metrics} listener (C{--metrics-listen}), serving
    C{resource}: its requests are L{MetricsRequest}s, and each one is
    logged as a structured event (method, path, status, peer), a refusal
    at info (a 400 L{MetricsRequest} writes itself: status, peer and
    reason) and a scrape at debug, like the data plane's calls, instead of
    twisted.web's access line at info for every scrape.
    """

    requestFactory = MetricsRequest

    def __init__(
        self, resource: Resource, idle_timeout: float, max_connections: int, reactor: IReactorTime | None = None
    ) -> None:
        # A connection idle (no bytes from the client) this long is closed.
        super().__init__(resource, timeout=idle_timeout, reactor=reactor)
        #: Connections open at most: past them a new one is closed at once.
        self.max_connections = max_connections
        #: Connections open at most from one client address (a quarter).
        self.max_connections_per_address = max(1, max_connections // 4)
        #: Connections open now.
        self.open_connections = 0
        #: Connections open now, per client address.
        self.per_address = AddressSlots()

    # IProtocolFactory.buildProtocol gives any IProtocol; twisted.web's
    # HTTPFactory annotates it with its own channel's type.
    def buildProtocol(self, addr: IAddress | None) -> IProtocol:  # type: ignore[override]
        address = client_address(addr)
        if (
            self.open_connections >= self.max_connections
            or self.per_address.held(address) >= self.max_connections_per_address
        ):
            return RefusedConnection()
        self.open_connections += 1
        self.per_address.take(address)
        return CountedConnection(super().buildProtocol(addr), self, address)

    def connection_closed(self, address: str | None) -> None:
        """
        One of its connections, from C{address}, is gone
        (L{CountedConnection}).
        """
        self.open_connections -= 1
        self.per_address.release(address)

    def log(self, request: http.Request) -> None:
        status = request.code
        _metrics_log.emit(
            LogLevel.info if status >= 400 else LogLevel.debug,
            "{method} {path} {status} for {peer}",
            method=clipped(request.method.decode("ascii", "replace")),
            path=clipped(request.path.decode("ascii", "replace")),
            status=status,
            peer=host_of(request.getClientAddress()),
        )


class CountedConnection(proxyForInterface(IProtocol, "protocol")):  # type: ignore[misc]
    """
    A connection of a L{MetricsSite}: the protocol twisted.web built for it,
    which it passes every event to, telling the site once it is gone.
    """

    def __init__(self, protocol: IProtocol, site: MetricsSite, address: str | None) -> None:
        self.protocol = protocol
        self.site = site
        self.address = address

    def connectionLost(self, reason: Failure) -> None:
        try:
            self.protocol.connectionLost(reason)
        finally:
            self.site.connection_closed(self.address)
