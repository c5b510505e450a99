"""
The WebSocket face of the control plane.

The protocol is thin on purpose: it checks the peer when the connection
opens, hands each text message to L{openclaw.commands.ControlPlane}, and
sends back what it answers.  Everything else lives in plain objects.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from openclaw.allowlist import PeerAllowlist
from openclaw.commands import ControlPlane

#: RFC 6455 close codes that Autobahn's public C{sendClose} refuses to send.
GOING_AWAY = 1001
POLICY_VIOLATION = 1008

_BINARY_REFUSED = b'{"ok":false,"cmd":null,"error":"binary messages are not accepted; send JSON text"}'


def _describe(address: Any) -> tuple[str | None, str]:
    """
    The IP of a transport address (L{None} when it has none) and a short
    label for logs.
    """
    if isinstance(address, (IPv4Address, IPv6Address)):
        label = f"[{address.host}]:{address.port}" if ":" in address.host else f"{address.host}:{address.port}"
        return address.host, label
    return None, str(address)


class ControlProtocol(WebSocketServerProtocol):
    """
    One control connection.
    """

    factory: ControlFactory
    _trusted = False
    _peer = "?"

    def onConnect(self, request: ConnectionRequest) -> None:
        host, self._peer = _describe(self.transport.getPeer())
        self._trusted = host is not None and self.factory.allowlist.allows(host)
        if not self._trusted:
            self.factory._log.warn(
                "refused control connection from {peer}: not in TRUSTED_CLIENT_IPS",
                peer=self._peer,
                reason="untrusted_peer",
                outcome="refused",
            )

    def onOpen(self) -> None:
        if not self._trusted:
            # 1008 must reach the client, so the handshake completes first;
            # nothing the peer sends is processed (onMessage checks).
            self.close_with(POLICY_VIOLATION, "peer address is not in TRUSTED_CLIENT_IPS")
            return
        self.factory.connections.add(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not self._trusted:
            return
        if isBinary:
            self.sendMessage(_BINARY_REFUSED)
            return
        answer = self.factory.controlplane.handle(payload, self._peer)
        if type(answer) is bytes:
            self.sendMessage(answer)
        else:
            answer.addCallback(self._answer)

    def _answer(self, encoded: bytes) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(encoded)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.connections.discard(self)

    def close_with(self, code: int, reason: str) -> None:
        """
        Start the closing handshake with any RFC 6455 code, including the
        ones the public C{sendClose} refuses (1001, 1008).
        """
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123])


class ControlFactory(WebSocketServerFactory):
    """
    Builds L{ControlProtocol}s and knows the connections that are open.
    """

    protocol = ControlProtocol
    _log = Logger(namespace="openclaw.controlplane")

    def __init__(self, controlplane: ControlPlane, allowlist: PeerAllowlist, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.controlplane = controlplane
        self.allowlist = allowlist
        self.connections: set[ControlProtocol] = set()

    def close_all(self, code: int = GOING_AWAY, reason: str = "gateway shutting down") -> Deferred[Any]:
        """
        Close every open connection with C{code} and fire when they are all
        gone (or the closing handshake timed out and Autobahn dropped them).
        """
        waiting = []
        for protocol in list(self.connections):
            waiting.append(protocol.is_closed)
            protocol.close_with(code, reason)
        return DeferredList(waiting, consumeErrors=True)
