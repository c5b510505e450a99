"""
The API's L{Site}: connections that read request heads in one pass
(L{APIChannel}), answers sent at the end of each turn of the reactor
(L{APISite.send_at_end_of_turn}), no access log of its own (the data plane
counts every call and logs a structured event for each failure instead),
and what a stop needs: wait for the calls in flight (L{APISite.drain}),
then close every connection and know when they are gone
(L{APISite.close_connections}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.web.server import Request, Site

from openclaw.dataplane.channel import APIChannel
from openclaw.dataplane.context import APIContext
from openclaw.dataplane.errors import APIError

#: How long idle API connections get to close politely on a stop.
CLOSE_DEADLINE_SECONDS = 2.0


class APIRequest(Request):
    """
    A request whose body may not exceed the site's C{max_request_bytes}.

    twisted.web reads the whole body (to memory, or a temporary file past
    100 KB) before any resource sees it, with no limit of its own: without
    this a client, authenticated or not, could fill memory or the disk.  A
    declared length over the limit gets a 413 at once; a chunked body that
    runs past it is cut off.
    """

    _received = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.channel.site.max_request_bytes:
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_request_bytes:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        self._refused = True
        limit = self.channel.site.max_request_bytes
        body = APIError(
            413,
            f"the request body is larger than MAX_REQUEST_BYTES ({limit} bytes)",
            "invalid_request_error",
            "request_too_large",
        ).body()
        transport = self.channel.transport
        transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        transport.loseConnection()


class APISite(Site):
    """
    A L{Site} for the API.
    """

    protocol = APIChannel
    requestFactory = APIRequest
    #: The largest request body accepted (C{MAX_REQUEST_BYTES}).
    max_request_bytes = 8 * 1024 * 1024

    def __init__(self, resource: Any, context: APIContext, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.context = context
        self.channels: set[APIChannel] = set()
        self._waiting: list[Deferred[None]] = []
        #: Connections with answers written this turn, to send at its end.
        self._unsent: list[APIChannel] = []
        self._sending: IDelayedCall | None = None

    def send_at_end_of_turn(self, channel: APIChannel) -> None:
        """
        Send what C{channel} writes in this turn of the reactor once the
        turn is over, along with every other connection's.

        The answers of a busy turn then leave together, one write per
        connection and no round trip through epoll (see
        L{openclaw.writethrough}), so the clients read them in a few wakeups
        rather than one each.  An answer written while the reactor handles
        network events goes out before it polls again (Twisted's own path
        sends it after that poll); one written from a timed call goes out
        right after the next poll, which does not wait.  A connection
        about to close sends what it holds first (L{APIChannel}).
        """
        self._unsent.append(channel)
        if self._sending is None:
            self._sending = self.reactor.callLater(0, self._send_all)

    def _send_all(self) -> None:
        self._sending = None
        channels, self._unsent = self._unsent, []
        for channel in channels:
            channel.send_unsent()

    def drain(self) -> Deferred[None]:
        """
        Fires once no API call is waiting on a provider (at once if none
        is).  For a stop: after the listener is closed, bounded by the
        caller's grace period, before L{close_connections}.
        """
        self.context.draining = True
        return self.context.idle()

    def log(self, request: Request) -> None:
        """
        No access log line: formatting one costs more than the data plane's
        own work on a request, which counts it in the metrics and logs a
        structured event for it (failures at info, successes at debug).
        """

    def channel_closed(self, channel: APIChannel) -> None:
        self.channels.discard(channel)
        if not self.channels:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def close_connections(self) -> Deferred[None]:
        """
        Close every client connection: idle keep-alive ones politely, any
        with a call still under way at once (its upstream request is then
        cancelled, and a stream ends without C{[DONE]}); fires once all are
        closed.  For a stop, after the listener is closed.
        """
        if not self.channels:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        for channel in list(self.channels):
            if channel.requests:
                channel.transport.abortConnection()
            else:
                channel.loseConnection()
        # A client that stopped reading would hold a polite close open until
        # its send buffer drains: give up on it after a moment.
        straggle = self.reactor.callLater(CLOSE_DEADLINE_SECONDS, self._abort_all)

        def closed(result: None) -> None:
            if straggle.active():
                straggle.cancel()
            return result

        return d.addBoth(closed)

    def _abort_all(self) -> None:
        for channel in list(self.channels):
            channel.transport.abortConnection()
