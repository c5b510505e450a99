"""
What an attacker review of issue #17's fixes found, each as a kind, over
real sockets: the control listener within the process's descriptors,
connections that never authenticate, keyless API connections, and the
small ones (C{/metrics} methods, two C{Host} fields, secret files'
directories, the lockout's text line, C{EMFILE} log floods).
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import time
from typing import Any

import httpx2
import openai
from twisted.internet import reactor, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from openclaw.addresses import client_key
from openclaw.dataplane.site import client_address
from tests.support import (
    capture_log_events,
    free_port,
    limited_twistd,
    open_client,
    spawn_gateway,
    start_gateway,
    start_upstream,
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


KIMI_KEY = "sk-kimi-SECRET-0123456789abcdef"
GEMINI_KEY = "AIza-gemini-SECRET-0123456789abcdef"


def sdk_chat(port: int, source: str) -> str:
    """
    One chat call with the openai SDK from C{source}, on one connection.
    """
    with httpx2.Client(transport=httpx2.HTTPTransport(local_address=source)) as http_client:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=10, http_client=http_client
        )
        answer = client.chat.completions.create(model="kimi-k2", messages=[{"role": "user", "content": "hi"}])
        return answer.choices[0].message.content or ""


class KeylessConnectionTests(TestCase):
    """
    Item 3: API connections that never presented an accepted key get a
    smaller share per address, half of the cap in all, and a short
    deadline; key holders keep their room.
    """

    timeout = 30

    def gateway(self, **settings: Any) -> Any:
        upstream = start_upstream(self, KIMI_KEY, GEMINI_KEY)
        gateway = start_gateway(
            self, api=True, gateway_api_keys=(KEY,), providers=upstream.provider_settings(), **settings
        )
        self.addCleanup(gateway.service.api_site.close_connections)
        return gateway

    @inlineCallbacks
    def test_keyless_flood_leaves_room_for_key_holders(self):
        """
        Eight addresses, two idle connections each, against a cap of 8:
        they used to fill it.  Now one each is refused, and past half the
        cap the oldest keyless one makes room for a newcomer.
        """
        gateway = self.gateway(api_max_connections=8)
        site = gateway.service.api_site
        self.assertEqual((site.max_connections_per_address, site.keyless_per_address), (2, 1))

        def flood() -> list[socket.socket]:
            return [sock for n in range(2, 10) for sock in open_many(gateway.api_port, 2, f"127.0.0.{n}")]

        socks = yield deferToThread(flood)
        self.addCleanup(lambda: [sock.close() for sock in socks])
        held = yield deferToThread(still_open, socks)
        self.assertEqual(held, 4)
        for _ in range(3):
            content = yield deferToThread(sdk_chat, gateway.api_port, "127.0.0.20")
            self.assertTrue(content)
        refused = site.context.refused_connections
        self.assertGreater(refused["api_keyless_connections_per_address"], 0)
        # Four flooders, then one for each call, made room.
        self.assertGreaterEqual(refused["api_keyless_connections"], 4)
        self.assertLessEqual(site.keyless_total, 4)

    @inlineCallbacks
    def test_keyless_deadline(self):
        """
        A connection that sends no request with an accepted key is closed
        at API_KEYLESS_TIMEOUT_SECONDS, however busy it keeps with keyless
        requests; one that sent a key stays.
        """
        gateway = self.gateway(api_keyless_timeout_seconds=1.0)
        port = gateway.api_port

        def keep_alive(key: str | None, seconds: float) -> tuple[list[int], float]:
            statuses: list[int] = []
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            started = time.monotonic()
            try:
                while time.monotonic() - started < seconds:
                    headers = {"Authorization": f"Bearer {key}"} if key else {}
                    connection.request("GET", "/healthz", headers=headers)
                    response = connection.getresponse()
                    response.read()
                    statuses.append(response.status)
                    time.sleep(0.2)
            except (http.client.HTTPException, OSError):
                pass
            finally:
                connection.close()
            return statuses, time.monotonic() - started

        statuses, took = yield deferToThread(keep_alive, None, 4)
        self.assertLess(took, 2.5)
        self.assertTrue(statuses)
        statuses, took = yield deferToThread(keep_alive, KEY, 2.5)
        self.assertGreaterEqual(took, 2.5)
        self.assertEqual(set(statuses), {200})
        self.assertEqual(gateway.service.api_site.keyless_total, 0)


class AddressKeyTests(TestCase):
    """
    Item 3: one normalisation for both listeners: IPv6 by /64,
    C{::ffff:a.b.c.d} as a.b.c.d.
    """

    def test_api_counts_ipv6_by_64(self):
        def key(host: str) -> str | None:
            return client_address(IPv6Address("TCP", host, 1))

        self.assertEqual(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"))
        self.assertEqual(key("2001:db8:1:2::1"), "2001:db8:1:2::/64")
        self.assertNotEqual(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"))
        self.assertEqual(key("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(client_address(IPv4Address("TCP", "192.0.2.7", 1)), "192.0.2.7")
        for host in ("2001:db8:1:2::1", "::ffff:192.0.2.7", "fe80::1%eth0"):
            self.assertEqual(key(host), client_key(host))
        self.assertIsNone(client_address(UNIXAddress("/run/x.sock")))
