"""
Control connections that never authenticate: they cannot hold every
MAX_CONNECTIONS slot, they are closed at AUTH_TIMEOUT_SECONDS counted from
the open (messages without a valid token do not extend it), and each such
close is a failed authentication for the lockout; an operator on the
control plane's UNIX socket is never locked out with loopback.
"""

from __future__ import annotations

import io
import ipaddress
import shutil
import stat
import tempfile
import time
from pathlib import Path

import jwt
from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase

from openclaw.service import GatewayService
from openclaw.settings import Settings
from tests.support import SECRET, RecordingEndpoint, capture_log_events, open_client, start_gateway

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


class AuthDeadlineTests(TestCase):
    """
    Connections that opened but never authenticate cannot hold every
    MAX_CONNECTIONS slot, and are closed at AUTH_TIMEOUT_SECONDS.
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


class AuthTimeoutLockoutTests(TestCase):
    """
    A connection closed at AUTH_TIMEOUT_SECONDS is a failed authentication
    for the lockout, so a client that opens handshakes and never sends
    cannot keep reconnecting for ever; an operator on the control plane's
    UNIX socket is never locked out with loopback.
    """

    timeout = 30

    @inlineCallbacks
    def test_timeouts_lock_out(self):
        events = capture_log_events(self)
        state_dir = Path(self.mktemp())
        state_dir.mkdir(parents=True)
        short = Path(tempfile.mkdtemp(prefix="oc"))  # AF_UNIX paths are short
        self.addCleanup(shutil.rmtree, short, True)
        path = short / "control.sock"
        settings = Settings(
            jwt_secret=b"s" * 32,
            jwt_secret_is_ephemeral=False,
            state_dir=state_dir,
            auth_timeout_seconds=0.5,
            auth_lockout_failures=3,
            trusted_clients=LOOPBACK,
        )
        tcp = RecordingEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
        service = GatewayService(settings, reactor, tcp, stdout=io.StringIO())
        service.startService()
        self.addCleanup(service.stopService)
        unix = UNIXServerEndpoint(reactor, str(path), mode=0o600)
        listening = yield unix.listen(service.factory)
        self.addCleanup(listening.stopListening)
        assert tcp.port is not None
        port = tcp.port.getHost().port
        token = service.sessions.current.token
        for _ in range(3):
            idle = yield open_client(self, port, bind="127.0.0.2")
            code, reason = yield idle.closed
            self.assertEqual((code, reason), (1008, "no authenticated message within AUTH_TIMEOUT_SECONDS"))
        with self.assertRaises(ConnectionError) as refused:
            yield open_client(self, port, bind="127.0.0.2")
        self.assertIn("429", str(refused.exception))
        (locked,) = [event for event in events if event.get("reason") == "auth_lockout"]
        self.assertEqual(locked["client"], "127.0.0.2")
        # Every local user shares loopback: lock it out, and the operator
        # on the UNIX socket (mode 600) still gets in.
        for _ in range(3):
            idle = yield open_client(self, port, bind="127.0.0.1")
            yield idle.closed
        with self.assertRaises(ConnectionError):
            yield open_client(self, port, bind="127.0.0.1")
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        operator = yield open_client(self, 0, unix=str(path))
        answer = yield operator.command(token, "ping")
        self.assertEqual(answer["ok"], True, answer)


class StaleTokenDeadlineTests(TestCase):
    """
    A connection whose last token was one the gateway signed, expired or
    replaced (a dashboard kept open across a rotation), is closed at
    AUTH_TIMEOUT_SECONDS saying so, and that close is no failed
    authentication: its reconnections never lock its address out, where
    each close counted (recheck s44: two dashboards pinging with the
    replaced token every 2 s locked every operator of their address out
    within a minute).  A guess after it counts as any guess.
    """

    timeout = 30

    @inlineCallbacks
    def test_stale_token_closes_are_not_counted(self):
        events = capture_log_events(self)
        gateway = start_gateway(self, auth_timeout_seconds=0.5, auth_lockout_failures=3, trusted_clients=LOOPBACK)
        current = gateway.service.sessions.current
        claims = {"iss": "openclaw-gateway", "jti": "older", "iat": current.issued_at - 5, "exp": current.expires_at}
        older = jwt.encode(claims, SECRET, algorithm="HS256")
        expired = jwt.encode({**claims, "jti": "expired", "exp": int(time.time()) - 60}, SECRET, algorithm="HS256")
        for token, refusal in [(older, "token revoked"), (expired, "token expired")] * 3:
            dashboard = yield open_client(self, gateway.port, bind="127.0.0.2")
            answer = yield dashboard.ask(token, "ping")
            self.assertEqual(answer["error"], refusal)
            code, reason = yield dashboard.closed
            self.assertEqual(
                (code, reason),
                (1008, f"{refusal}: reconnect with the current token (TOKEN_FILE, or the gateway's banner)"),
            )
        operator = yield open_client(self, gateway.port, bind="127.0.0.2")
        answer = yield operator.ask(gateway.token, "ping")
        self.assertTrue(answer["ok"], answer)
        closes = [e for e in events if e.get("reason") == "auth_timeout"]
        self.assertEqual(len(closes), 6)
        self.assertIn("not counted toward the lockout", formatEvent(closes[0]))
        # A forged token after the stale one: a guess, counted as any.
        guesser = yield open_client(self, gateway.port, bind="127.0.0.3")
        yield guesser.ask(older, "ping")
        for _ in range(3):
            answer = yield guesser.ask("forged", "ping")
            self.assertEqual(answer["error"], "invalid token")
        code, reason = yield guesser.closed
        self.assertEqual(code, 1008)
        self.assertNotIn("token revoked", reason)
        with self.assertRaises(ConnectionError) as refused:
            yield open_client(self, gateway.port, bind="127.0.0.3")
        self.assertIn("429", str(refused.exception))
