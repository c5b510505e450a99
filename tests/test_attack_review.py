"""
What an attacker review of issue #17's fixes found, each as a kind, over
real sockets: the control listener within the process's descriptors,
connections that never authenticate, keyless API connections, and the
small ones (C{/metrics} methods, two C{Host} fields, secret files'
directories, the lockout's text line, C{EMFILE} log floods).
"""

from __future__ import annotations

import http.client
import inspect
import io
import ipaddress
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import httpx2
import openai
from twisted.internet import reactor, task, tcp
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase

from openclaw.addresses import client_key
from openclaw.dataplane.site import KEYLESS_GRACE_SECONDS, client_address
from openclaw.logs import ACCEPT_ERROR_FORMATS, make_observer, text_line
from openclaw.settings import ConfigError, check_private_file, load_settings
from tests.support import (
    capture_log_events,
    free_port,
    limited_twistd,
    open_client,
    open_many,
    spawn_gateway,
    start_gateway,
    start_metrics_listener,
    start_upstream,
    still_open,
)

KEY = "gw-key-0123456789abcdef"
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


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
        they used to fill it.  Once their grace is over
        (L{KEYLESS_GRACE_SECONDS}) they are keyless: one each past its
        address's keyless share is closed, and they hold at most half the
        cap, so key holders get in.
        """
        gateway = self.gateway(api_max_connections=8)
        site = gateway.service.api_site
        self.assertEqual((site.max_connections_per_address, site.keyless_per_address), (2, 1))

        def flood() -> list[socket.socket]:
            return [sock for n in range(2, 10) for sock in open_many(gateway.api_port, 2, f"127.0.0.{n}")]

        socks = yield deferToThread(flood)
        self.addCleanup(lambda: [sock.close() for sock in socks])
        held = yield deferToThread(still_open, socks, KEYLESS_GRACE_SECONDS + 0.5)
        self.assertEqual(held, 4)
        for _ in range(3):
            content = yield deferToThread(sdk_chat, gateway.api_port, "127.0.0.20")
            self.assertTrue(content)
        refused = site.context.refused_connections
        self.assertGreater(refused["api_keyless_connections_per_address"], 0)
        self.assertGreater(refused["api_max_connections"], 0)
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


def exchange(port: int, data: bytes) -> bytes:
    """
    Send C{data} and read until the server closes (or 5 s pass).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return answer


class SmallOnesTests(TestCase):
    """
    Item 4: C{/metrics} methods, two C{Host} fields, the lockout's text
    line.
    """

    timeout = 30

    def metrics_listener(self) -> tuple[Any, int]:
        """
        A gateway with C{/metrics} on a listener of its own
        (C{--metrics-listen}), and that listener's port.
        """
        gateway = start_gateway(self, api=True, gateway_api_keys=(KEY,))
        return gateway, start_metrics_listener(self, gateway.service.settings)

    @inlineCallbacks
    def test_metrics_unknown_methods(self):
        gateway, metrics_port = self.metrics_listener()
        for port, path in ((gateway.api_port, b"/metrics"), (metrics_port, b"/metrics")):
            for method in (b"DELETE", b"PATCH", b"POST", b"PUT", b"BREW"):
                answer = yield deferToThread(
                    exchange, port, method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                )
                head, _, body = answer.partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 405 "), (method, answer[:200]))
                self.assertIn(b"\r\nAllow: GET, HEAD", head)
                self.assertIn(b"text/plain", head)
                self.assertNotIn(b"<html", body.lower())
            for method in (b"GET", b"HEAD"):
                answer = yield deferToThread(
                    exchange, port, method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                )
                self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), (method, answer[:200]))

    @inlineCallbacks
    def test_metrics_listener_logs_scrapes_at_debug(self):
        """
        A scrape of the metrics listener is a structured event at debug
        (like a successful API call), not twisted.web's access line at
        info every scrape interval; a refused request is logged at info.
        """
        from twisted.logger import globalLogPublisher

        gateway, metrics_port = self.metrics_listener()
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for method in (b"GET", b"POST"):
            yield deferToThread(
                exchange,
                metrics_port,
                method + b" /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            )
        scrapes = [e for e in events if e.get("path") == "/metrics" and "status" in e]
        self.assertEqual(
            [(e["method"], e["status"], e["log_level"], e["peer"]) for e in scrapes],
            [("GET", 200, LogLevel.debug, "127.0.0.1"), ("POST", 405, LogLevel.info, "127.0.0.1")],
        )
        access_lines = [e for e in events if e.get("log_namespace") == "twisted.python.log" and "/metrics" in str(e)]
        self.assertEqual(access_lines, [])

    @inlineCallbacks
    def test_two_host_fields(self):
        """
        RFC 9112 section 3.2: a request with more than one Host field is
        answered 400, on the API and on the metrics listener, whatever
        the path (twisted.web served it under the last one).
        """
        gateway, metrics_port = self.metrics_listener()
        twice = b"Host: 127.0.0.1\r\nHost: rebind.example\r\n"
        cases = [
            (gateway.api_port, b"GET /metrics HTTP/1.1\r\n" + twice + b"\r\n"),
            (gateway.api_port, b"GET /healthz HTTP/1.1\r\n" + twice + b"\r\n"),
            (
                gateway.api_port,
                b"POST /v1/chat/completions HTTP/1.1\r\n"
                + twice
                + f"Authorization: Bearer {KEY}\r\nContent-Length: 2\r\n\r\n{{}}".encode(),
            ),
            (metrics_port, b"GET /metrics HTTP/1.1\r\n" + twice + b"\r\n"),
        ]
        for port, request in cases:
            answer = yield deferToThread(exchange, port, request)
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), (request, answer[:200]))
            self.assertIn(b"Host", answer.partition(b"\r\n\r\n")[2])
        api_answer = yield deferToThread(exchange, gateway.api_port, cases[1][1])
        self.assertEqual(json.loads(api_answer.partition(b"\r\n\r\n")[2])["error"]["code"], "invalid_host")

    @inlineCallbacks
    def test_control_text_lines_carry_reason(self):
        """
        The lockout line, and the other lines that close a control
        connection, show C{reason=} in the text format as in JSON.
        """
        events = capture_log_events(self)
        gateway = start_gateway(
            self, auth_lockout_failures=3, max_auth_failures=2, auth_timeout_seconds=1.0, trusted_clients=LOOPBACK
        )
        for _ in range(2):
            client = yield open_client(self, gateway.port)
            for _ in range(2):
                client.send({"token": "forged", "cmd": "ping"})
            yield client.closed
        idle = yield open_client(self, gateway.port, bind="127.0.0.2")
        yield idle.closed
        reasons = set()
        for event in events:
            if event.get("outcome") in ("locked_out", "closed"):
                line = text_line(event) or ""
                self.assertIn(f"reason={event['reason']}", line)
                reasons.add(event["reason"])
        self.assertEqual(reasons, {"auth_lockout", "auth_failures", "auth_timeout"})


class SecretDirectoryTests(TestCase):
    """
    Item 4: a secret or env file is refused when its directory lets
    others replace it (sshd's StrictModes), sticky directories excepted.
    """

    def setUp(self) -> None:
        self.environ: dict[str, str] = {}
        self.patch(os, "environ", self.environ)
        self.base = Path(self.mktemp()).absolute()
        self.folder = self.base / "secrets"
        self.folder.mkdir(parents=True)
        self.folder.chmod(0o700)
        self.secret = self.folder / "jwt_secret"
        self.secret.write_text("x" * 40 + "\n")
        self.secret.chmod(0o600)
        self.environ["JWT_SECRET_FILE"] = str(self.secret)

    def refused(self, **kwargs: Any) -> str:
        with self.assertRaises(ConfigError) as caught:
            load_settings(cwd=self.base, **kwargs)
        return str(caught.exception)

    def test_writable_directory(self) -> None:
        self.assertEqual(load_settings(cwd=self.base).jwt_secret, b"x" * 40)
        for mode in (0o770, 0o707, 0o777):
            self.folder.chmod(mode)
            message = self.refused()
            self.assertIn(str(self.folder), message)
            self.assertIn("chmod go-w", message)
        # Sticky, as /tmp: others cannot replace an entry they do not own.
        self.folder.chmod(0o1777)
        self.assertEqual(load_settings(cwd=self.base).jwt_secret, b"x" * 40)

    def test_link_in_writable_directory(self) -> None:
        """
        The directory a link sits in counts too: the link can be replaced.
        """
        loose = self.base / "loose"
        loose.mkdir()
        loose.chmod(0o777)
        (loose / "link").symlink_to(self.secret)
        self.environ["JWT_SECRET_FILE"] = str(loose / "link")
        self.assertIn(str(loose), self.refused())

    def test_env_file_directory(self) -> None:
        del self.environ["JWT_SECRET_FILE"]
        env_file = self.folder / "gateway.env"
        env_file.write_text("")
        env_file.chmod(0o600)
        load_settings(cwd=self.base, env_file=str(env_file))
        self.folder.chmod(0o775)
        self.assertIn("--env-file", self.refused(env_file=str(env_file)))

    def test_directory_owner(self) -> None:
        if os.geteuid() != 0:
            with self.assertRaises(ConfigError):
                check_private_file(self.secret, "f", secret=True, euid=os.geteuid() + 1)
            return
        os.chown(self.folder, 4242, -1)
        message = self.refused()
        self.assertIn("uid 4242", message)
        self.assertIn(str(self.folder), message)


class AcceptErrorLimiterTests(TestCase):
    """
    Item 4: Twisted's accept-failure lines, one per socket in a flood, are
    written at most once a minute, with a count of those left out.
    """

    def test_rate_limited(self) -> None:
        out = io.StringIO()
        observer = make_observer(out, "text", "info")

        def event(log_format: str, when: float, **fields: Any) -> dict[str, Any]:
            return {
                "log_format": log_format,
                "log_time": when,
                "log_level": LogLevel.info,
                "log_namespace": "twisted.internet.tcp.Port",
                **fields,
            }

        for n in range(100):
            observer(event("Could not accept new connection ({acceptError})", 1000 + n * 0.1, acceptError="EMFILE"))
            observer(event("EMFILE recovery: Closed socket from {address}", 1000 + n * 0.1, address=("10.0.0.1", n)))
        observer(event("something else {n}", 1005, n=1))
        observer(event("Could not accept new connection ({acceptError})", 1061, acceptError="ENFILE"))
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 3, lines)
        self.assertIn("Could not accept new connection (EMFILE)", lines[0])
        self.assertIn("something else 1", lines[1])
        self.assertIn(
            "Could not accept new connection (ENFILE) (199 similar lines suppressed in the last 60 s)", lines[2]
        )

    def test_formats_are_twisteds(self) -> None:
        # Twisted writes two of them as adjacent literals: "a;" " b".
        source = inspect.getsource(tcp).replace('" "', "")
        for log_format in ACCEPT_ERROR_FORMATS:
            self.assertIn(f'"{log_format}"', source)
