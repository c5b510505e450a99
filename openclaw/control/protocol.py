"""
The WebSocket face of the control plane.

The protocol is thin on purpose: it decides whether a connection may open,
hands each text message to L{openclaw.commands.ControlPlane}, and sends back
what it answers.  Everything else lives in plain objects.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger

from openclaw.connections import OpenConnections
from openclaw.control.admission import ClientAddressResolver, PeerAllowlist
from openclaw.control.closecodes import GOING_AWAY, POLICY_VIOLATION, UNSUPPORTED_DATA
from openclaw.control.plane import Connection, ControlPlane
from openclaw.metrics import GatewayMetrics
from openclaw.settings import Settings

#: The opening handshake is a few hundred bytes; Autobahn buffers it with no
#: limit (and rescans the buffer on every read), so cap it.
MAX_HANDSHAKE_BYTES = 16384
#: TCP connections allowed beyond MAX_CONNECTIONS, for handshakes under way
#: (each bounded by HANDSHAKE_TIMEOUT_SECONDS) and refusals being answered.
HANDSHAKE_HEADROOM = 256

_Refusal = TypeVar("_Refusal", ConnectionDeny, str, None)


def _describe(address: Any) -> tuple[str | None, str]:
    """
    The IP of a transport address (L{None} when it has none, as for a UNIX
    socket) and a short label for logs.
    """
    if isinstance(address, (IPv4Address, IPv6Address)):
        label = f"[{address.host}]:{address.port}" if ":" in address.host else f"{address.host}:{address.port}"
        return address.host, label
    if isinstance(address, UNIXAddress):
        return None, "unix"
    return None, str(address)


class ControlProtocol(WebSocketServerProtocol):
    """
    One control connection.
    """

    factory: ControlFactory
    connection: Connection | None = None

    @property
    def tcp(self) -> ITCPTransport:
        """
        The connection's transport (TCP, TLS over TCP or a UNIX socket: each
        can be aborted), once connected.
        """
        transport = self.transport
        assert transport is not None, "not connected"
        return cast(ITCPTransport, transport)

    def connectionMade(self) -> None:
        factory = self.factory
        if len(factory.protocols) >= factory.max_connections + HANDSHAKE_HEADROOM:
            factory._refuse(_describe(self.tcp.getPeer())[1], "too_many_handshakes", None)
            self.tcp.abortConnection()
            return
        factory.protocols.add(self)
        super().connectionMade()

    def processHandshake(self) -> None:
        # Autobahn calls this on every read until the handshake is done (and
        # never after, so the open connection's hot path pays nothing).
        if len(self.data) > MAX_HANDSHAKE_BYTES:
            self.factory._refuse(_describe(self.tcp.getPeer())[1], "handshake_too_large", None)
            self.data = b""
            self.tcp.abortConnection()
            return
        super().processHandshake()

    def connectionLost(self, reason: Any = None) -> None:
        if self not in self.factory.protocols:
            return  # turned away in connectionMade; Autobahn never set up
        self.factory.connections.discard(self)
        # Autobahn cancels its other timers here but not this one, which
        # would otherwise outlive the connection by up to a second.
        if self.closeHandshakeTimeoutCall is not None:
            self.closeHandshakeTimeoutCall.cancel()
            self.closeHandshakeTimeoutCall = None
        try:
            super().connectionLost(reason)
        finally:
            # Last: a stop waiting on close_all goes on once Autobahn is done.
            self.factory.protocols.discard(self)

    def onConnect(self, request: ConnectionRequest) -> None:
        factory = self.factory
        address = self.tcp.getPeer()
        host, peer = _describe(address)
        refusal = factory.refusal(host, peer, request.headers, local=isinstance(address, UNIXAddress))
        if isinstance(refusal, ConnectionDeny):
            raise refusal
        if refusal is None:
            self.connection = Connection(peer)
            factory.connections.add(self)

    def onOpen(self) -> None:
        if self.connection is None:
            # An untrusted peer: 1008 must reach it, so the handshake is
            # completed first; nothing it sends is processed (onMessage).
            self.close_with(POLICY_VIOLATION, "peer address is not in TRUSTED_CLIENT_IPS")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        connection = self.connection
        if connection is None or self.state != self.STATE_OPEN:
            # Untrusted, or closing: frames that arrived after our close
            # frame (in the same read) are not answered.
            return
        if isBinary:
            self.close_with(UNSUPPORTED_DATA, "binary messages are not accepted; send JSON text")
            return
        controlplane = self.factory.controlplane
        answer = controlplane.handle(payload, connection)
        if isinstance(answer, bytes):
            self.sendMessage(answer)
        else:
            answer.addCallback(self._answer)
        if connection.failed_auths and controlplane.too_many_failures(connection):
            self.factory._log.warn(
                "closing control connection from {peer}: {failed_auths} failed authentications in a row",
                peer=connection.peer,
                failed_auths=connection.failed_auths,
                outcome="closed",
                reason="auth_failures",
            )
            self.close_with(POLICY_VIOLATION, "too many failed authentications")

    def _answer(self, encoded: bytes) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(encoded)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.connections.discard(self)

    def close_with(self, code: int, reason: str) -> None:
        """
        Start the closing handshake with any RFC 6455 code, including the
        ones the public C{sendClose} refuses (1001, 1003, 1008).
        """
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123])


class ControlFactory(WebSocketServerFactory):
    """
    Builds L{ControlProtocol}s, decides who may connect, and knows the
    connections that are open.
    """

    protocol = ControlProtocol  # type: ignore[assignment]
    _log = Logger(namespace="openclaw.controlplane")

    def __init__(
        self, controlplane: ControlPlane, settings: Settings, metrics: GatewayMetrics | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.controlplane = controlplane
        self.metrics = metrics
        self.allowlist = PeerAllowlist(settings.trusted_clients)
        self.resolver = ClientAddressResolver(PeerAllowlist(settings.trusted_proxies))
        self.allowed_origins = frozenset(settings.allowed_origins)
        self.max_connections = settings.max_connections
        #: Accepted control connections (the ones status counts).
        self.connections: set[ControlProtocol] = set()
        #: Every live TCP connection, handshakes and refusals included.
        self.protocols: OpenConnections[ControlProtocol] = OpenConnections()
        self.setProtocolOptions(
            maxMessagePayloadSize=settings.max_message_bytes,
            maxFramePayloadSize=settings.max_message_bytes,
            openHandshakeTimeout=settings.handshake_timeout_seconds,
            autoPingInterval=settings.ping_interval_seconds,
            autoPingTimeout=settings.ping_timeout_seconds,
            # Send the close code (1009 too big, 1007 bad UTF-8, 1002
            # protocol error) instead of dropping the TCP connection, so
            # clients learn what they did wrong.
            failByDrop=False,
            # Let "Origin: null" (sandboxed pages, file://) reach refusal()
            # so it gets the same 403 as any other foreign origin.  Set in
            # this same call: every setProtocolOptions call resets it.
            allowNullOrigin=True,
        )

    def refusal(
        self, host: str | None, peer: str, headers: dict[str, str], local: bool = False
    ) -> ConnectionDeny | str | None:
        """
        Whether a connection asking to open must be refused.

        A peer on a UNIX socket (C{local}) has no address to check: the
        socket file's permissions (C{unix:PATH:mode=600}) decide who can
        connect, so C{TRUSTED_CLIENT_IPS} does not apply to it (forwarding
        headers are ignored there too).  The token is required all the same.

        @return: L{None} to accept it; a L{ConnectionDeny} to refuse the
            handshake with an HTTP status; or the reason for accepting the
            handshake only to close it at once with 1008 (an untrusted peer).
        """
        if len(self.connections) >= self.max_connections:
            return self._refuse(
                peer,
                "too_many_connections",
                ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "too many control connections; try again later"),
            )
        origin = headers.get("origin")
        if origin is not None and origin.lower().rstrip("/") not in self.allowed_origins:
            return self._refuse(
                peer,
                "origin_not_allowed",
                ConnectionDeny(
                    ConnectionDeny.FORBIDDEN,
                    "cross-origin WebSocket refused: this Origin is not in ALLOWED_ORIGINS",
                ),
                origin=origin,
            )
        if local:
            return None
        client = self.resolver.resolve(host, headers) if host is not None else None
        if client is None or not self.allowlist.allows(client):
            return self._refuse(peer, "untrusted_peer", "peer address is not in TRUSTED_CLIENT_IPS", client=client)
        return None

    def _refuse(self, peer: str, reason: str, refusal: _Refusal, **fields: Any) -> _Refusal:
        if self.metrics is not None:
            self.metrics.refused.labels(reason).inc()
        self._log.warn(
            "refused control connection from {peer}: {reason}",
            peer=peer,
            reason=reason,
            outcome="refused",
            **fields,
        )
        return refusal

    def close_all(self, code: int = GOING_AWAY, reason: str = "gateway shutting down") -> Deferred[None]:
        """
        Close every open connection with C{code}, abort the ones still in
        their opening handshake, and fire with L{None} when they are all
        gone (or the closing handshake timed out and Autobahn dropped them).
        """
        for protocol in self.protocols:
            if protocol.state == protocol.STATE_OPEN:
                protocol.close_with(code, reason)
            else:
                # Still in its opening handshake: nobody to say goodbye to.
                protocol.tcp.abortConnection()
        return self.protocols.all_closed()
