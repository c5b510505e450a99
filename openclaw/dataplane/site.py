"""
The API's L{Site}: twisted.web's own connections (HTTP/1.1, and HTTP/2 on a
TLS listener when C{h2} is installed), a limit on request bodies
(L{APIRequest}), no access log of its own (the data plane counts every call
and logs a structured event for each failure instead), and what a stop
needs: wait for the calls in flight (L{APISite.drain}), then close every
connection and know when they are gone (L{APISite.close_connections}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IProtocol, IReactorTime, ITCPTransport, ITransport
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from openclaw.connections import OpenConnections
from openclaw.dataplane.context import APIContext
from openclaw.dataplane.errors import APIError
from openclaw.dataplane.resource import build_resource
from openclaw.metrics import CallCosts, RequestTally
from openclaw.providers import ProviderRegistry
from openclaw.routing import ActiveRoute
from openclaw.settings import Settings

#: How long API connections get to close politely on a stop.
CLOSE_DEADLINE_SECONDS = 2.0


class APIRequest(Request):
    """
    A request whose body may not exceed the site's C{max_request_bytes}.

    twisted.web reads the whole body (to memory, or a temporary file past
    100 KB) before any resource sees it, with no limit of its own: without
    this a client, authenticated or not, could fill memory or the disk.
    Nothing past the limit is kept.  Over HTTP/1.1 a declared length over
    the limit gets a 413 at once and the connection is closed (the client
    may still be sending), and a chunked body that runs past it is cut off
    the same way.  Over HTTP/2 only the stream is refused: the rest of its
    body is read and dropped, and the 413 goes out when the stream ends.
    """

    _received = 0
    _too_large = False

    @property
    def max_request_bytes(self) -> int:
        """
        The site's limit (the site every twisted.web channel is given).
        """
        site: APISite = self.channel.site  # type: ignore[attr-defined]
        return site.max_request_bytes

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_request_bytes:
            super().gotLength(0)
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self._received += len(data)
        if self._received > self.max_request_bytes:
            self._refuse()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        if not self._too_large:
            super().process()
        elif not isinstance(self.channel, HTTPChannel):
            # An HTTP/2 stream, now whole: answer it the usual way.
            body = self._refusal().body()
            self.setResponseCode(413)
            self.setHeader(b"Content-Type", b"application/json")
            self.setHeader(b"Content-Length", b"%d" % len(body))
            self.write(body)
            self.finish()
        # Over HTTP/1.1 the 413 went out already and the connection is closing.

    def _refuse(self) -> None:
        self._too_large = True
        if not isinstance(self.channel, HTTPChannel):
            return  # answered in process(), once the stream is whole
        body = self._refusal().body()
        transport = self.channel.transport
        assert transport is not None
        transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        transport.loseConnection()

    def _refusal(self) -> APIError:
        limit = self.max_request_bytes
        return APIError(
            413,
            f"the request body is larger than MAX_REQUEST_BYTES ({limit} bytes)",
            "invalid_request_error",
            "request_too_large",
        )


class APIConnection(proxyForInterface(IProtocol, "protocol")):  # type: ignore[misc]
    """
    One client connection of an L{APISite}: the protocol twisted.web built
    for it (whatever HTTP version it turns out to speak), which it passes
    every event to, registered in the site's L{OpenConnections} from the
    moment it is made until the protocol has handled its loss.

    The protocol gets the real transport: nothing is added on the write path.

    @ivar protocol: the protocol twisted.web built.
    @ivar transport: the connection's transport, once made.
    """

    transport: ITransport | None = None

    @property
    def tcp(self) -> ITCPTransport:
        """
        The connection's transport (TCP, or TLS or a UNIX socket: each can
        be closed and aborted), once made.
        """
        assert self.transport is not None, "not connected"
        return cast(ITCPTransport, self.transport)

    def __init__(self, protocol: IProtocol, connections: OpenConnections[APIConnection]) -> None:
        super().__init__(protocol)
        self._connections = connections

    def makeConnection(self, transport: ITransport) -> None:
        self.transport = transport
        self._connections.add(self)
        self.protocol.makeConnection(transport)

    def connectionLost(self, reason: Failure) -> None:
        try:
            self.protocol.connectionLost(reason)
        finally:
            self._connections.discard(self)


class APISite(Site):
    """
    A L{Site} for the API.

    @ivar connections: the open client connections (L{APIConnection}s).
    """

    requestFactory = APIRequest
    #: The largest request body accepted (C{MAX_REQUEST_BYTES}).
    max_request_bytes = 8 * 1024 * 1024

    def __init__(self, resource: Any, context: APIContext, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.context = context
        self.connections: OpenConnections[APIConnection] = OpenConnections()

    def buildProtocol(self, addr: IAddress | None) -> APIConnection:
        return APIConnection(super().buildProtocol(addr), self.connections)

    def drain(self) -> Deferred[None]:
        """
        Fires once no API call is waiting on a provider (at once if none
        is).  For a stop: after the listener is closed, bounded by the
        caller's grace period, before L{close_connections}.
        """
        self.context.draining = True
        return self.context.idle()

    def log(self, request: http.Request) -> None:
        """
        No access log line: the data plane counts every request in the
        metrics and logs a structured event for it (failures at info,
        successes at debug), so a second, unstructured line would only
        duplicate it.
        """

    def close_connections(self) -> Deferred[None]:
        """
        Close every client connection and fire once all are closed.  For a
        stop, after the listener is closed and the calls drained.

        Each is closed politely: what was written to it still goes out
        first.  A call still under way then loses its client, so its
        upstream request is cancelled (a stream ends without C{[DONE]}).
        A client that stopped reading would hold a polite close open until
        its send buffer drains: connections still open after
        L{CLOSE_DEADLINE_SECONDS} are aborted.
        """
        self.context.shut_down_calls()
        closed = self.connections.all_closed()
        if closed.called:
            return closed
        for connection in self.connections:
            connection.tcp.loseConnection()
        straggle = self.reactor.callLater(CLOSE_DEADLINE_SECONDS, self._abort_all)

        def cancel_straggle(result: None) -> None:
            if straggle.active():
                straggle.cancel()
            return result

        return closed.addBoth(cancel_straggle)

    def _abort_all(self) -> None:
        for connection in self.connections:
            connection.tcp.abortConnection()


def build_site(
    route: ActiveRoute,
    providers: ProviderRegistry,
    settings: Settings,
    reactor: IReactorTime,
    tally: RequestTally,
    costs: CallCosts | None = None,
    count_fallback: Callable[[str, str, str], None] | None = None,
) -> APISite:
    """
    The API's C{twisted.web} site (a L{twisted.web.server.Site}).

    @param tally: where each finished request is counted (the service's
        C{openclaw_api_requests} metrics).
    @param costs: where each chat call's tokens and times are counted (the
        service's C{openclaw_api_tokens} and kin).
    @param count_fallback: counts each failover, C{(from, to, reason)}.
    """
    context = APIContext.from_settings(route, providers, settings, reactor, tally, costs, count_fallback)
    # The API takes JSON only: twisted.web's form decoding (which parses the
    # Content-Type of every POST with the email package) would be waste.
    site = APISite(build_resource(context), context, reactor=reactor, parsePOSTFormSubmission=False)
    site.max_request_bytes = settings.max_request_bytes
    return site
