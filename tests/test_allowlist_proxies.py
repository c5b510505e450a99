"""
Issue #17, "Allowlist and proxies", over real sockets: header injection
past a proxy, a proxy that names no client, handshake slots per address,
and the lockout across connections.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from openclaw.control.admission import HandshakeBudget
from openclaw.listeners import HANDSHAKE_HEADROOM
from openclaw.logs import make_observer
from tests.support import capture_log_events, connect, free_port, open_client, spawn_gateway, start_gateway
from tests.wsfuzz import server_frames

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


def send_head(port: int, fields: list[bytes], bind: str = "127.0.0.1") -> tuple[bytes, socket.socket]:
    """
    An opening handshake with these raw header lines (blocking: run it in
    a thread); the server's response head and the socket.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(bind, 0))
    key = base64.b64encode(os.urandom(16))
    lines = [
        b"GET / HTTP/1.1",
        b"Host: 127.0.0.1:%d" % port,
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + key,
        b"Sec-WebSocket-Version: 13",
        *fields,
    ]
    sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        if not chunk:
            break
        response += chunk
    return response, sock


def close_code(port: int, fields: list[bytes], bind: str = "127.0.0.1") -> int | str:
    """
    The close code a handshake with these header lines ends with, or the
    HTTP status line when it is refused before the upgrade.
    """
    response, sock = send_head(port, fields, bind)
    with sock:
        status, _, rest = response.partition(b"\r\n")
        if b" 101 " not in status:
            return status.decode()
        data = rest.split(b"\r\n\r\n", 1)[1]
        while True:
            frames, data = server_frames(data)
            for opcode, payload in frames:
                if opcode == 0x8:
                    return int.from_bytes(payload[:2], "big")
            chunk = sock.recv(4096)
            if not chunk:
                return "closed without a close frame"
            data += chunk


def ping_after_flood(port: int, flood: list[tuple[str, int]]) -> list[socket.socket]:
    """
    Open C{count} bare TCP connections from each C{(address, count)}:
    handshakes that never start.
    """
    socks = []
    for bind, count in flood:
        for _ in range(count):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(bind, 0)))
            except OSError:
                pass
    return socks


#: Every character other than CR and LF at which str.splitlines breaks a
#: line once the head is decoded as ISO-8859-1 (as Autobahn did before 26.11).
SPLITLINES_BREAKS = (b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e", b"\x85")


class HeaderInjectionTests(TestCase):
    """
    Item 1: a header hidden behind a line break only str.splitlines sees.
    """

    timeout = 30

    @inlineCallbacks
    def test_hidden_forwarded_for_refused_or_seen_as_a_proxy_sees_it(self):
        """
        A control character hiding a field from a proxy in front is a 400,
        counted and audited; NEL (0x85) is text inside the field it is in,
        as the proxy saw it (RFC 9110's obs-text), and hides nothing.
        """
        events = capture_log_events(self)
        gateway = start_gateway(
            self,
            trusted_clients=(ipaddress.ip_network("10.0.0.5/32"),),
            trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),),
        )
        for char in SPLITLINES_BREAKS:
            # What nginx forwards: its own X-Forwarded-For first, then the
            # client's X-Note, passed on as one field.
            outcome = yield deferToThread(
                close_code,
                gateway.port,
                [b"X-Forwarded-For: 203.0.113.9", b"X-Note: hi" + char + b"X-Forwarded-For: 10.0.0.5"],
            )
            if char == b"\x85":
                self.assertEqual(outcome, 1008)
            else:
                self.assertIsInstance(outcome, str, char)
                self.assertIn(" 400 ", outcome, char)
        refusals = [e for e in events if e.get("reason") == "bad_handshake"]
        self.assertEqual(len(refusals), len(SPLITLINES_BREAKS) - 1)
        self.assertEqual({e["peer"].rsplit(":", 1)[0] for e in refusals}, {"127.0.0.1"})
        self.assertIn("invalid character in HTTP header field value", refusals[0]["detail"])
        self.assertIn("bad_handshake (Error during parsing", formatEvent(refusals[0]))
        registry = gateway.service.metrics.registry
        self.assertEqual(
            registry.get_sample_value("openclaw_control_refused_connections_total", {"reason": "bad_handshake"}),
            len(SPLITLINES_BREAKS) - 1,
        )
        # The same client without the trick is who it is: refused with 1008.
        outcome = yield deferToThread(close_code, gateway.port, [b"X-Forwarded-For: 203.0.113.9", b"X-Note: hi"])
        self.assertEqual(outcome, 1008)

    @inlineCallbacks
    def test_folded_or_unnamed_fields_refused_with_400(self):
        """
        A folded line, a name with a space before its colon, a line without
        a colon and a bare CR: each a field a proxy may read otherwise than
        the gateway, so a 400, counted and audited, and the gateway serves
        the next client.
        """
        events = capture_log_events(self)
        gateway = start_gateway(
            self,
            trusted_clients=(ipaddress.ip_network("10.0.0.5/32"),),
            trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),),
        )
        lines = (
            [b"X-Forwarded-For: 203.0.113.9", b" X-Forwarded-For: 10.0.0.5"],
            [b"X-Forwarded-For : 10.0.0.5"],
            [b"X-Forwarded-For: 203.0.113.9", b"no colon"],
            [b"X-Note: hi\rX-Forwarded-For: 10.0.0.5"],
        )
        for fields in lines:
            outcome = yield deferToThread(close_code, gateway.port, fields)
            self.assertIsInstance(outcome, str, fields)
            self.assertIn(" 400 ", outcome, fields)
        self.assertEqual(len([e for e in events if e.get("reason") == "bad_handshake"]), len(lines))
        # A well-formed head is judged on who it names.
        outcome = yield deferToThread(close_code, gateway.port, [b"X-Forwarded-For: 203.0.113.9"])
        self.assertEqual(outcome, 1008)

    @inlineCallbacks
    def test_allowed_client_through_proxy(self):
        gateway = start_gateway(
            self,
            trusted_clients=(ipaddress.ip_network("10.0.0.5/32"),),
            trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),),
        )
        events = capture_log_events(self)
        client = yield open_client(self, gateway.port, headers={"X-Forwarded-For": "10.0.0.5"})
        answer = yield client.command(gateway.token, "ping")
        self.assertTrue(answer["ok"])
        # The audit names the client the proxy named, and the proxy.
        answer = yield client.command(gateway.token, "switch_provider", {"provider": "kimi"})
        self.assertTrue(answer["ok"], answer)
        (audited,) = [e for e in events if e.get("cmd") == "switch_provider"]
        self.assertEqual(audited["peer"], "10.0.0.5")
        self.assertRegex(audited["proxy"], r"^127\.0\.0\.1:\d+$")
        self.assertRegex(
            formatEvent(audited), r"^switch_provider from 10\.0\.0\.5 \(token .*\): ok in .* proxy=127\.0\.0\.1:\d+"
        )
        # An authentication failure names them both too.
        answer = yield client.command("forged", "ping")
        self.assertFalse(answer["ok"])
        (failed,) = [e for e in events if e.get("outcome") == "auth_failed"]
        self.assertEqual(failed["peer"], "10.0.0.5")
        self.assertRegex(failed["proxy"], r"^127\.0\.0\.1:\d+$")
        self.assertRegex(formatEvent(failed), r"^auth failure from 10\.0\.0\.5 through proxy 127\.0\.0\.1:\d+: ")


class ProxiedClosingLinesTests(TestCase):
    timeout = 20

    @inlineCallbacks
    def test_closing_lines_name_the_proxy(self):
        """
        A connection through a trusted proxy closed for failed
        authentications, or for none within AUTH_TIMEOUT_SECONDS: the line
        names the client and the proxy (field and text).
        """
        gateway = start_gateway(
            self,
            trusted_clients=(ipaddress.ip_network("10.0.0.5/32"),),
            trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),),
            auth_timeout_seconds=0.5,
            max_auth_failures=1,
        )
        events = capture_log_events(self)
        silent = yield open_client(self, gateway.port, headers={"X-Forwarded-For": "10.0.0.5"})
        yield silent.closed
        guesser = yield open_client(self, gateway.port, headers={"X-Forwarded-For": "10.0.0.5"})
        guesser.send({"token": "forged", "cmd": "ping"})
        yield guesser.closed
        closing = [e for e in events if e.get("outcome") == "closed"]
        self.assertEqual(sorted(e["reason"] for e in closing), ["auth_failures", "auth_timeout"])
        for event in closing:
            self.assertEqual(event["peer"], "10.0.0.5")
            self.assertRegex(event["proxy"], r"^127\.0\.0\.1:\d+$")
            self.assertRegex(formatEvent(event), r"^closing control connection from 10\.0\.0\.5 through proxy ")


class ProxyNamingNoClientTests(TestCase):
    """
    Item 2: a trusted proxy that sends no forwarding header.
    """

    timeout = 20

    @inlineCallbacks
    def test_refused_1008_and_logged(self):
        events = capture_log_events(self)
        gateway = start_gateway(self, trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))
        client = yield connect(gateway.port)
        code, reason = yield client.closed
        self.assertEqual(code, 1008)
        # The reason says what is wrong, not that the address is outside
        # TRUSTED_CLIENT_IPS (127.0.0.1 is in it).
        self.assertEqual(
            reason,
            "this address is in TRUSTED_PROXIES but named no client: the proxy must send X-Forwarded-For or Forwarded",
        )
        refused = [e for e in events if e.get("reason") == "proxy_named_no_client"]
        self.assertEqual(len(refused), 1)
        self.assertTrue(refused[0]["peer"].startswith("127.0.0.1:"))
        self.assertNotIn("proxy", refused[0])
        # Not a proxy: the peer is the client, as before.
        client = yield open_client(self, gateway.port, bind="127.0.0.1", headers={"X-Forwarded-For": "127.0.0.1"})
        answer = yield client.command(gateway.token, "ping")
        self.assertTrue(answer["ok"])


class RefusedThroughProxyTests(TestCase):
    """
    The line for a connection refused behind a trusted proxy names the
    client the proxy named (C{peer}), and the proxy (C{proxy}, its address
    and port), not the proxy alone.
    """

    timeout = 20

    @inlineCallbacks
    def test_refusals_name_the_forwarded_client(self):
        events = capture_log_events(self)
        gateway = start_gateway(
            self,
            trusted_clients=(ipaddress.ip_network("10.0.0.5/32"),),
            trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),),
        )
        outcome = yield deferToThread(close_code, gateway.port, [b"X-Forwarded-For: 203.0.113.9"])
        self.assertEqual(outcome, 1008)
        outcome = yield deferToThread(close_code, gateway.port, [b'Forwarded: for="[2001:db8::7]:4711"'])
        self.assertEqual(outcome, 1008)
        outcome = yield deferToThread(
            close_code, gateway.port, [b"X-Forwarded-For: 10.0.0.5", b"Origin: https://elsewhere.example"]
        )
        self.assertIn(" 403 ", str(outcome))
        # Not from the proxy: the header changes nothing, the peer is named.
        outcome = yield deferToThread(close_code, gateway.port, [b"X-Forwarded-For: 10.0.0.5"], "127.0.0.2")
        self.assertEqual(outcome, 1008)
        refused = [e for e in events if e.get("outcome") == "refused"]
        self.assertEqual(
            [(e["reason"], e["peer"]) for e in refused],
            [
                ("untrusted_peer", "203.0.113.9"),
                ("untrusted_peer", "2001:db8::7"),
                ("origin_not_allowed", "10.0.0.5"),
                ("untrusted_peer", refused[3]["peer"]),
            ],
        )
        for event in refused[:3]:
            self.assertRegex(event["proxy"], r"^127\.0\.0\.1:\d+$")
        self.assertRegex(
            formatEvent(refused[0]),
            r"^refused control connection from 203\.0\.113\.9 through proxy 127\.0\.0\.1:\d+: untrusted_peer$",
        )
        self.assertRegex(refused[3]["peer"], r"^127\.0\.0\.2:\d+$")
        self.assertNotIn("proxy", refused[3])
        self.assertRegex(formatEvent(refused[3]), r"^refused control connection from 127\.0\.0\.2:\d+: untrusted_peer$")


class HandshakeBudgetTests(TestCase):
    """
    Item 3: half-open handshakes from one address, or from outsiders, leave
    room for an allowlisted operator.
    """

    timeout = 60

    @inlineCallbacks
    def flood_then_ping(
        self, flood: list[tuple[str, int]], operator: str, outsider: str | None = None, **settings: Any
    ) -> Any:
        gateway = start_gateway(self, max_connections=1, handshake_timeout_seconds=30, **settings)
        socks = yield deferToThread(ping_after_flood, gateway.port, flood)
        self.addCleanup(lambda: [s.close() for s in socks])
        # Until the reactor has seen them all (kept or dropped).
        yield task.deferLater(reactor, 0.5, lambda: None)
        if outsider is not None:
            # Refused peers are still told why, with 1008.
            outcome = yield deferToThread(close_code, gateway.port, [], outsider)
            self.assertEqual(outcome, 1008)
        client = yield open_client(self, gateway.port, bind=operator)
        answer = yield client.command(gateway.token, "ping")
        self.assertTrue(answer["ok"])
        return gateway

    @inlineCallbacks
    def test_outsider_flood(self):
        """
        The case of issue #17: 260 half-open handshakes from outside the
        allowlist, then the operator.  A handshake from another outsider
        is still answered with 1008.
        """
        gateway = yield self.flood_then_ping(
            [("127.0.0.2", 260)],
            "127.0.0.1",
            outsider="127.0.0.3",
            trusted_clients=(ipaddress.ip_network("127.0.0.1/32"),),
        )
        budget = gateway.service.factory.budget
        self.assertEqual(budget.held("127.0.0.2"), budget.per_address)

    @inlineCallbacks
    def test_outsiders_from_many_addresses(self):
        yield self.flood_then_ping(
            [(f"127.0.0.{n}", 70) for n in range(2, 8)],
            "127.0.0.1",
            trusted_clients=(ipaddress.ip_network("127.0.0.1/32"),),
        )

    @inlineCallbacks
    def test_allowlisted_flood(self):
        """
        An allowlisted address (without the token) cannot take every slot
        either.
        """
        gateway = yield self.flood_then_ping([("127.0.0.2", 300)], "127.0.0.9", trusted_clients=LOOPBACK)
        self.assertLessEqual(len(gateway.service.factory.protocols), 1 + HANDSHAKE_HEADROOM)

    def test_share_at_default(self):
        self.assertGreaterEqual(HandshakeBudget(4096 + HANDSHAKE_HEADROOM).per_address, 1000)


@inlineCallbacks
def guess(port: int, times: int, bind: str = "127.0.0.1", **kwargs: Any) -> Any:
    """
    Send C{times} bad tokens, reconnecting every 4 as an attacker would;
    the last connection's close code and reason.
    """
    result = None
    while times > 0:
        client = yield connect(port, bind=bind, **kwargs)
        batch = min(4, times)
        times -= batch
        for _ in range(batch):
            client.send({"token": "forged", "cmd": "ping"})
        for _ in range(batch):
            # The answer, unless the connection closes first.
            yield DeferredList([client.received.get(), client.closed], fireOnOneCallback=True)
            if client.closed.called:
                break
        if not client.closed.called:
            client.sendClose()
        result = yield client.closed
    return result


class LockoutTests(TestCase):
    """
    Item 4: failed authentications counted across connections.
    """

    timeout = 30

    def guess(self, port: int, times: int, bind: str = "127.0.0.1", **kwargs: Any) -> Any:
        return guess(port, times, bind, **kwargs)

    @inlineCallbacks
    def test_lockout_across_connections(self):
        events = capture_log_events(self)
        gateway = start_gateway(self, trusted_clients=LOOPBACK)
        bystander = yield open_client(self, gateway.port, bind="127.0.0.1")
        yield self.guess(gateway.port, 8)
        code, reason = yield self.guess(gateway.port, 2)
        self.assertEqual(code, 1008)
        self.assertIn("failed authentications", reason)
        # The idle, never-authenticated connection of the same address is
        # closed too: it would be one more guess.
        code, _ = yield bystander.closed
        self.assertEqual(code, 1008)
        for _ in range(3):
            response, sock = yield deferToThread(send_head, gateway.port, [])
            sock.close()
            self.assertIn(b" 429 ", response.split(b"\r\n")[0])
            self.assertIn(b"\r\nRetry-After: 300\r\n", response)
        # Once per lockout in the log; counted in metrics.
        (lockout,) = [e for e in events if e.get("reason") == "auth_lockout"]
        self.assertIn("locked out 127.0.0.1 for 300.0 s", formatEvent(lockout))
        self.assertEqual([e for e in events if e.get("reason") == "locked_out"], [])
        registry = gateway.service.metrics.registry
        self.assertEqual(registry.get_sample_value("openclaw_control_lockouts_total"), 1.0)
        self.assertEqual(
            registry.get_sample_value("openclaw_control_refused_connections_total", {"reason": "locked_out"}), 3.0
        )
        # Another address is unaffected.
        client = yield open_client(self, gateway.port, bind="127.0.0.2")
        answer = yield client.command(gateway.token, "ping")
        self.assertTrue(answer["ok"])

    @inlineCallbacks
    def test_long_lockout(self):
        """
        AUTH_LOCKOUT_SECONDS of a week is told whole in Retry-After; a
        lockout without end (one another instance imposed) is told as 30
        days, the longest any setting gives, not written out whole.
        """
        gateway = start_gateway(self, trusted_clients=LOOPBACK, auth_lockout_seconds=604800.0)
        yield self.guess(gateway.port, 10)
        response, sock = yield deferToThread(send_head, gateway.port, [])
        sock.close()
        self.assertIn(b"\r\nRetry-After: 604800\r\n", response)
        lockout = gateway.service.factory.lockout
        lockout.impose(lockout.key("127.0.0.2"), float("inf"))
        response, sock = yield deferToThread(send_head, gateway.port, [], bind="127.0.0.2")
        sock.close()
        self.assertIn(b" 429 ", response.split(b"\r\n")[0])
        self.assertIn(b"\r\nRetry-After: 2592000\r\n", response)

    def gateway_log(self) -> Callable[[], list[str]]:
        """
        The lines the daemon's own log observer (LOG_LEVEL=info) writes
        from now until the test ends, but the test clients' own and the
        service's (its start-up lines come as its database opens, in a
        thread).
        """
        out = io.StringIO()
        observer = make_observer(out, "text", "info")
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return lambda: [
            line for line in out.getvalue().splitlines() if not re.search(r" \[(tests|openclaw\.service)\.", line)
        ]

    @inlineCallbacks
    def test_refused_handshakes_add_no_lines_each(self):
        """
        Through the log observer the daemon installs, at LOG_LEVEL=info: a
        flood of handshakes from a locked-out client adds no log line (the
        lockout was one line, when it began), and a handshake with a
        foreign Origin is the gateway's one line, not Autobahn's as well;
        every refusal is counted.
        """
        log = self.gateway_log()
        gateway = start_gateway(self, trusted_clients=LOOPBACK)
        yield self.guess(gateway.port, 10)
        before = log()
        self.assertEqual(len([line for line in before if "reason=auth_lockout" in line]), 1)
        for _ in range(20):
            response, sock = yield deferToThread(send_head, gateway.port, [])
            sock.close()
            self.assertIn(b" 429 ", response.split(b"\r\n")[0])
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(log(), before)
        registry = gateway.service.metrics.registry
        self.assertEqual(
            registry.get_sample_value("openclaw_control_refused_connections_total", {"reason": "locked_out"}), 20.0
        )
        response, sock = yield deferToThread(send_head, gateway.port, [b"Origin: http://evil.example"], "127.0.0.2")
        sock.close()
        self.assertIn(b" 403 ", response.split(b"\r\n")[0])
        yield task.deferLater(reactor, 0.2, lambda: None)
        added = log()[len(before) :]
        self.assertEqual(len(added), 1, added)
        self.assertIn("ControlFactory#warn] refused control connection from 127.0.0.2:", added[0])
        self.assertIn(": origin_not_allowed", added[0])

    @inlineCallbacks
    def test_refused_connections_logged_ten_a_second(self):
        """
        A flood of refused handshakes (a foreign C{Origin}: any client can
        send thousands) is logged 10 lines a second at most; the next line
        let through says how many were left out, and each is counted.
        """
        log = self.gateway_log()
        gateway = start_gateway(self, trusted_clients=LOOPBACK)
        before = len(log())

        def flood(count: int) -> None:
            for _ in range(count):
                response, sock = send_head(gateway.port, [b"Origin: http://evil.example"], "127.0.0.2")
                sock.close()
                assert b" 403 " in response.split(b"\r\n")[0], response

        yield deferToThread(flood, 60)
        yield task.deferLater(reactor, 1.1, lambda: None)
        yield deferToThread(flood, 1)
        yield task.deferLater(reactor, 0.2, lambda: None)
        added = [line for line in log()[before:] if "refused control connection" in line]
        self.assertLessEqual(len(added), 21, added)
        self.assertRegex(added[-1], r"\((\d+) similar lines suppressed in the last \d+ s\)")
        shown = len(added)
        suppressed = sum(int(n) for n in re.findall(r"\((\d+) similar lines suppressed", "\n".join(added)))
        self.assertEqual(shown + suppressed, 61)
        registry = gateway.service.metrics.registry
        self.assertEqual(
            registry.get_sample_value("openclaw_control_refused_connections_total", {"reason": "origin_not_allowed"}),
            61.0,
        )

    @inlineCallbacks
    def test_unexpected_handshake_error_logged_by_the_gateway(self):
        """
        An unexpected error in the gateway's own handshake code is logged
        with its traceback at LOG_LEVEL=info (Autobahn's line for it is
        not shown), and the peer gets 500 without the exception's text.
        """
        log = self.gateway_log()
        gateway = start_gateway(self, trusted_clients=LOOPBACK)

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("a bug in refusal")

        gateway.service.factory.refusal = broken  # type: ignore[method-assign]
        response, sock = yield deferToThread(send_head, gateway.port, [])
        sock.close()
        self.assertIn(b" 500 internal error; the gateway log has the details", response.split(b"\r\n")[0])
        self.assertNotIn(b"a bug", response)
        yield task.deferLater(reactor, 0.2, lambda: None)
        text = "\n".join(log())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertNotIn("autobahn", text)
        self.assertIn("ControlFactory#critical] control handshake from 127.0.0.1:", text)
        self.assertIn("RuntimeError: a bug in refusal", text)

    @inlineCallbacks
    def test_lockout_under_a_second_logged(self):
        """
        A lockout under a second is logged as such, not as "0 s".
        """
        events = capture_log_events(self)
        gateway = start_gateway(self, trusted_clients=LOOPBACK, auth_lockout_seconds=0.3)
        yield self.guess(gateway.port, 10)
        (lockout,) = [e for e in events if e.get("reason") == "auth_lockout"]
        self.assertIn("locked out 127.0.0.1 for 0.3 s", formatEvent(lockout))

    @inlineCallbacks
    def test_authenticated_connection_survives_and_lockout_expires(self):
        gateway = start_gateway(self, trusted_clients=LOOPBACK, auth_lockout_seconds=1.0)
        operator = yield open_client(self, gateway.port, bind="127.0.0.1")
        answer = yield operator.command(gateway.token, "ping")
        self.assertTrue(answer["ok"])
        yield self.guess(gateway.port, 10)
        answer = yield operator.command(gateway.token, "ping")
        self.assertTrue(answer["ok"])
        outcome = yield deferToThread(close_code, gateway.port, [])
        self.assertIn(" 429 ", str(outcome))
        yield task.deferLater(reactor, 1.2, lambda: None)
        client = yield open_client(self, gateway.port, bind="127.0.0.1")
        answer = yield client.command(gateway.token, "ping")
        self.assertTrue(answer["ok"])

    @inlineCallbacks
    def test_exempt(self):
        gateway = start_gateway(
            self, trusted_clients=LOOPBACK, auth_lockout_exempt=(ipaddress.ip_network("127.0.0.1/32"),)
        )
        yield self.guess(gateway.port, 20)
        client = yield open_client(self, gateway.port, bind="127.0.0.1")
        answer = yield client.command(gateway.token, "ping")
        self.assertTrue(answer["ok"])

    @inlineCallbacks
    def test_client_behind_proxy_locked_not_the_proxy(self):
        gateway = start_gateway(self, trusted_clients=LOOPBACK, trusted_proxies=(ipaddress.ip_network("127.0.0.3/32"),))
        yield self.guess(gateway.port, 10, bind="127.0.0.3", headers={"X-Forwarded-For": "::ffff:127.0.0.7"})
        outcome = yield deferToThread(close_code, gateway.port, [b"X-Forwarded-For: 127.0.0.7"], "127.0.0.3")
        self.assertIn(" 429 ", str(outcome))
        client = yield open_client(self, gateway.port, bind="127.0.0.3", headers={"X-Forwarded-For": "127.0.0.8"})
        answer = yield client.command(gateway.token, "ping")
        self.assertTrue(answer["ok"])


#: libfaketime (Debian's faketime package, which make test installs).
FAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


class LockoutClockStepTests(TestCase):
    """
    Trial s25 F1: a gateway whose wall clock is stepped back an hour
    (libfaketime; its monotonic clock left alone, as an NTP step or a
    virtual machine's resume leaves it) 3 s into a lockout.  The lockout
    went by the wall clock: "retry in 3597 s" for what was a 4 s lockout.
    It goes by the monotonic clock, and ends on time.
    """

    timeout = 60

    @inlineCallbacks
    def test_lockout_ends_on_time_after_a_step_back(self) -> Any:
        if not os.path.exists(FAKETIME):
            raise SkipTest(f"libfaketime is not installed ({FAKETIME}: 'apt-get install faketime', as make test does)")
        offset = Path(self.mktemp())
        offset.parent.mkdir(parents=True, exist_ok=True)
        offset.write_text("+0\n")
        port = free_port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "JWT_SECRET": "clock-step-secret-clock-step-secret-4242",
            "AUTH_LOCKOUT_FAILURES": "3",
            "AUTH_LOCKOUT_SECONDS": "4",
            "LD_PRELOAD": FAKETIME,
            "FAKETIME_TIMESTAMP_FILE": str(offset.absolute()),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }
        process = spawn_gateway(self, ["--port", str(port), "--interface", "127.0.0.1"], env)
        token = yield process.token
        yield guess(port, 3)
        response, sock = yield deferToThread(send_head, port, [])
        sock.close()
        self.assertIn(b" 429 ", response.split(b"\r\n")[0])
        locked_at = time.monotonic()
        offset.write_text("-3600\n")
        response, sock = yield deferToThread(send_head, port, [])
        sock.close()
        self.assertIn(b" 429 ", response.split(b"\r\n")[0])
        (retry_after,) = re.findall(rb"\r\nRetry-After: (\d+)\r\n", response)
        self.assertLessEqual(int(retry_after), 4, response)
        yield task.deferLater(reactor, max(0.0, locked_at + 4.5 - time.monotonic()), lambda: None)
        client = yield connect(port)
        answer = yield client.command(token, "ping")
        self.assertTrue(answer["ok"], answer)
        client.sendClose()
        yield client.closed
