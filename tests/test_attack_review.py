"""
What an attacker review of issue #17's fixes found, each as a kind, over
real sockets: the control listener within the process's descriptors,
connections that never authenticate, keyless API connections, and the
small ones (C{/metrics} methods, two C{Host} fields, secret files'
directories, the lockout's text line, C{EMFILE} log floods).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time

from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import (
    capture_log_events,
    free_port,
    limited_twistd,
    open_client,
    spawn_gateway,
    start_gateway,
)

KEY = "gw-key-0123456789abcdef"
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


def open_many(port: int, count: int, source: str, head: bytes = b"") -> list[socket.socket]:
    """
    C{count} TCP connections from C{source}, each sending C{head} (a
    handshake never finished); those the server refused or dropped are
    left out.
    """
    opened = []
    for _ in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=(source, 0))
            if head:
                sock.sendall(head)
            opened.append(sock)
        except OSError:
            pass
    return opened


def still_open(socks: list[socket.socket], settle: float = 0.5) -> int:
    """
    How many of C{socks} the server has not closed.
    """
    time.sleep(settle)
    held = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            held += sock.recv(1) != b""
        except BlockingIOError:
            held += 1
        except OSError:
            pass
    return held


class ControlDescriptorTests(TestCase):
    """
    Item 1: a real C{twistd} with its file limit at 256, flooded with
    half-open WebSocket handshakes from one address, keeps descriptors for
    an operator from another.
    """

    timeout = 60

    @inlineCallbacks
    def test_half_open_flood_under_low_limit(self):
        port, api_port = free_port(), free_port()
        env = {
            **os.environ,
            "JWT_SECRET": "r" * 40,
            "GATEWAY_API_KEYS": KEY,
            "LOG_LEVEL": "info",
            "HANDSHAKE_TIMEOUT_SECONDS": "30",
            "PYTHONPATH": "",
        }
        args = ["--port", str(port), "--api-port", str(api_port), "--interface", "127.0.0.1"]
        process = spawn_gateway(self, args, env, twistd=limited_twistd(self, 256))
        token = yield process.token
        head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        flood = yield deferToThread(open_many, port, 300, "127.0.0.2", head)
        self.addCleanup(lambda: [sock.close() for sock in flood])
        held = yield deferToThread(still_open, flood)
        # 256 descriptors: 64 kept back, a quarter of the rest (48) for the
        # control listener, a quarter of that (12) per address.
        self.assertLessEqual(held, 12)
        self.assertGreater(held, 0)
        client = yield open_client(self, port, bind="127.0.0.1")
        answer = yield client.command(token, "ping")
        self.assertEqual(answer["ok"], True, answer)
        output = process.stdout + process.stderr
        self.assertIn(b"control connections are capped at 48", output)
        self.assertNotIn(b"EMFILE", output)


class AuthDeadlineTests(TestCase):
    """
    Item 2: connections that opened but never authenticate cannot hold
    every MAX_CONNECTIONS slot, and are closed at AUTH_TIMEOUT_SECONDS.
    """

    timeout = 30

    @inlineCallbacks
    def test_idle_unauthenticated_cannot_take_every_slot(self):
        events = capture_log_events(self)
        gateway = start_gateway(self, max_connections=4, auth_timeout_seconds=2.0, trusted_clients=LOOPBACK)
        idle = []
        for _ in range(4):
            try:
                idle.append((yield open_client(self, gateway.port, bind="127.0.0.2")))
            except ConnectionError as refused:
                self.assertIn("503", str(refused))
        # A quarter of MAX_CONNECTIONS from one address, unauthenticated.
        self.assertEqual(len(idle), 1)
        self.assertEqual(gateway.service.factory.budget.held("127.0.0.2"), 1)
        operator = yield open_client(self, gateway.port, bind="127.0.0.1")
        answer = yield operator.command(gateway.token, "ping")
        self.assertTrue(answer["ok"])
        code, reason = yield idle[0].closed
        self.assertEqual(code, 1008)
        self.assertIn("AUTH_TIMEOUT_SECONDS", reason)
        # The operator authenticated in time: still served past the deadline.
        answer = yield operator.command(gateway.token, "ping")
        self.assertTrue(answer["ok"])
        (closed,) = [event for event in events if event.get("reason") == "auth_timeout"]
        self.assertTrue(closed["peer"].startswith("127.0.0.2:"))
        self.assertEqual(gateway.service.factory.budget.held("127.0.0.2"), 0)

    @inlineCallbacks
    def test_deadline_counts_from_open_not_from_messages(self):
        """
        Messages without a valid token do not extend the deadline.
        """
        gateway = start_gateway(self, auth_timeout_seconds=2.0, max_auth_failures=100, auth_lockout_failures=100)
        client = yield open_client(self, gateway.port)
        started = time.monotonic()
        for _ in range(3):
            answer = yield client.command("forged", "ping")
            self.assertFalse(answer["ok"])
            yield task.deferLater(reactor, 0.5, lambda: None)
        code, _ = yield client.closed
        self.assertEqual(code, 1008)
        self.assertLess(time.monotonic() - started, 4)
