"""
The control plane accepts RFC 6455 (version 13) WebSocket handshakes only:
a draft version 8 one, its origin in C{Sec-WebSocket-Origin}, is answered
400 naming version 13.
"""

from __future__ import annotations

import socket

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import start_gateway


class WebSocketVersionTests(TestCase):
    """
    Only RFC 6455 (version 13) handshakes are accepted: a draft version 8
    one, whose origin is in C{Sec-WebSocket-Origin}, got 101.
    """

    timeout = 20

    @inlineCallbacks
    def test_only_version_13(self):
        gateway = start_gateway(self)

        def handshake(version: int, origin: str | None) -> bytes:
            head = (
                "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}\r\n"
            )
            if origin is not None:
                head += f"Sec-WebSocket-Origin: {origin}\r\n"
            with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
                sock.sendall((head + "\r\n").encode())
                return sock.recv(65536)

        for origin in ("http://evil", None):
            answer = yield deferToThread(handshake, 8, origin)
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:200])
            self.assertIn(b"Sec-WebSocket-Version: 13", answer)
        answer = yield deferToThread(handshake, 13, None)
        self.assertTrue(answer.startswith(b"HTTP/1.1 101 "), answer[:200])
