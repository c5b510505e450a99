"""
A cluster's session token never stays expired: instances starting on an
expired one replace it (one wins the compare-and-set) unless it is
another JWT_SECRET's, and it is renewed before it expires with every
instance up, or once the store is back.  L{ClusterNode}s on a
L{MemoryStore} and a L{Clock}, then C{twistd openclaw} instances on a
real C{redis-server}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from openclaw.cluster import ClusterNode, MemoryStore
from openclaw.cluster.clock import ClusterClock
from openclaw.cluster.records import RENEW_AT, TOKEN, encode_token
from openclaw.cluster.store import Versioned
from openclaw.routing import ActiveRoute, Route
from openclaw.session import SessionAuthority, SessionToken, TokenRejected
from tests.support import capture_log_events
from tests.test_cluster import ClusterCase, sleep

SECRET = b"0123456789abcdef0123456789abcdef"


TTL = 3600.0


class ExpiredToken(TestCase):
    """
    L{ClusterNode}s on one L{MemoryStore} and one L{Clock}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = MemoryStore(self.clock.seconds)

    def node(self, name: str, secret: bytes = SECRET, **options: Any) -> ClusterNode:
        """
        A node named C{name} on the test's store and clock; C{options} are
        L{ClusterNode}'s keyword arguments (C{on_foreign_token}, ...).
        """
        node = ClusterNode(
            self.store,
            ActiveRoute(Route("gemini", "g-1")),
            SessionAuthority(secret, TTL, clock=self.clock.seconds),
            name,
            self.clock,
            1.0,
            ("gemini", "kimi"),
            **options,
        )
        self.store.listeners.append(node.received)
        self.addCleanup(node.stop)
        return node

    def stored_token(self, secret: bytes = SECRET, ttl: float = 10.0) -> SessionToken:
        """
        A token a gone instance left in the store, minted now.
        """
        token = SessionAuthority(secret, ttl, clock=self.clock.seconds).mint()
        self.store.values[TOKEN] = Versioned(3, encode_token(token), "gone")
        return token

    def test_expired_token_replaced_once(self) -> None:
        """
        Instances starting on an expired cluster token replace it: one wins
        the compare-and-set, every instance holds its token, unexpired.
        """
        old = self.stored_token()
        self.clock.advance(11)
        a, b = self.node("a"), self.node("b")
        a.connected()
        b.connected()
        self.assertTrue(a.up and b.up)
        self.assertNotEqual(a.sessions.current.jti, old.jti)
        self.assertEqual(a.sessions.current, b.sessions.current)
        self.assertEqual(self.store.values[TOKEN].version, 4)
        self.assertEqual(b.sessions.verify(b.sessions.current.token), a.sessions.current.jti)
        with self.assertRaises(TokenRejected) as rejected:
            a.sessions.verify(old.token)
        self.assertEqual(rejected.exception.reason, "token expired")

    def test_unexpired_token_kept(self) -> None:
        """
        A restart keeps a token that is neither expired nor due.
        """
        old = self.stored_token(ttl=TTL)
        self.clock.advance(TTL * RENEW_AT / 2)
        a = self.node("a")
        a.connected()
        self.assertEqual(a.sessions.current.jti, old.jti)
        self.assertEqual(self.store.values[TOKEN].version, 3)

    def test_host_clock_ahead_keeps_the_clusters_token(self) -> None:
        """
        An instance whose host's clock is 25 h ahead of the store's judges
        the cluster's token by the store's clock: not expired, so adopted
        rather than replaced on every instance; the offset is logged with
        what to do.
        """
        events = capture_log_events(self)
        old = self.stored_token(ttl=TTL)
        ahead = Clock()
        ahead.advance(self.clock.seconds() + 25 * 3600)
        clock = ClusterClock(ahead)
        node = ClusterNode(
            self.store,
            ActiveRoute(Route("gemini", "g-1")),
            SessionAuthority(SECRET, TTL, clock=clock.seconds),
            "ahead",
            ahead,
            1.0,
            ("gemini", "kimi"),
            clock=clock,
        )
        self.addCleanup(node.stop)
        node.connected()
        self.assertEqual(node.sessions.current.jti, old.jti)
        self.assertEqual(self.store.values[TOKEN].version, 3)
        self.assertEqual(clock.offset, -25 * 3600)
        said = [e for e in events if "clock is" in e.get("log_format", "")]
        self.assertEqual(len(said), 1, said)
        self.assertIn("run NTP", said[0]["log_format"])
        self.assertEqual((said[0]["seconds"], said[0]["direction"]), (90000.0, "ahead of"))

    def test_renewed_before_expiry_with_every_instance_up(self) -> None:
        """
        Once RENEW_AT of its lifetime has passed, the cluster's token is
        replaced (one write) and adopted everywhere, before it expires.
        """
        a, b = self.node("a"), self.node("b")
        a.connected()
        b.connected()
        first = a.sessions.current
        self.clock.advance(TTL * RENEW_AT - 1)
        self.assertEqual(b.sessions.current, first)
        self.clock.advance(1)
        self.assertNotEqual(a.sessions.current.jti, first.jti)
        self.assertEqual(a.sessions.current, b.sessions.current)
        self.assertEqual(self.store.values[TOKEN].version, 2)
        self.assertLess(self.clock.seconds(), first.expires_at)
        with self.assertRaises(TokenRejected) as rejected:
            b.sessions.verify(first.token)
        self.assertEqual(rejected.exception.reason, "token revoked")
        # And again a lifetime later.
        second = a.sessions.current
        self.clock.advance(TTL * RENEW_AT)
        self.assertNotIn(b.sessions.current.jti, {first.jti, second.jti})
        self.assertEqual(self.store.values[TOKEN].version, 3)

    def test_renewal_while_the_store_is_away_waits_for_it(self) -> None:
        """
        A renewal due while the store is down is made once it is back.
        """
        a = self.node("a")
        a.connected()
        first = a.sessions.current
        self.store.up = False
        a.lost("test")
        self.clock.advance(TTL + 1)
        self.assertEqual(a.sessions.current, first)
        self.store.up = True
        a.connected()
        self.assertNotEqual(a.sessions.current.jti, first.jti)
        self.assertEqual(a.sessions.verify(a.sessions.current.token), a.sessions.current.jti)

    def test_foreign_expired_token_not_replaced(self) -> None:
        """
        An instance never replaces a token it cannot trust (another
        JWT_SECRET): it refuses it, as before.
        """
        other = self.stored_token(secret=b"another-secret-of-at-least-32-bytes!!")
        self.clock.advance(11)
        refused: list[str] = []
        a = self.node("a", on_foreign_token=refused.append)
        a.connected()
        self.assertEqual(self.store.values[TOKEN].value, encode_token(other))
        self.assertEqual(len(refused), 1)


class ExpiredTokenOnRedis(ClusterCase):
    @inlineCallbacks
    def test_restart_replaces_an_expired_token(self) -> None:
        """
        A cluster token that expired is replaced when an instance
        restarts (it was adopted, locking the control plane out until
        Redis was edited).
        """
        a = self.spawn(SESSION_TTL_HOURS="0.003")  # 10.8 s, a little over the shortest taken
        old = yield a.token
        yield a.stop()
        yield sleep(11.5)
        again = self.spawn(a.port, a.api_port, SESSION_TTL_HOURS="24")
        token = yield again.token
        self.assertNotEqual(token, old)
        client = yield self.client(again.port)
        answer = yield client.command(token, "status")
        self.assertTrue(answer["ok"], answer)
        answer = yield client.command(old, "ping")
        self.assertEqual(answer["error"], "token expired")

    @inlineCallbacks
    def test_renewed_with_every_instance_up(self) -> None:
        """
        Two instances up: the token is renewed before it expires and both
        adopt the new one.
        """
        a = self.spawn(SESSION_TTL_HOURS="0.003")  # 10.8 s: renewed after 8.6 s
        first = yield a.token
        b = self.spawn(SESSION_TTL_HOURS="0.003")
        yield b.token
        for _ in range(200):
            if a.stdout.count(b"Token    : ") > 1 and b.stdout.count(b"Token    : ") > 1:
                break
            yield sleep(0.1)
        renewed = a.stdout.rsplit(b"Token    : ", 1)[1].split()[0].decode()
        self.assertNotEqual(renewed, first)
        self.assertEqual(b.stdout.rsplit(b"Token    : ", 1)[1].split()[0].decode(), renewed)
        for process in (a, b):
            client = yield self.client(process.port)
            answer = yield client.command(renewed, "ping")
            self.assertTrue(answer["ok"], answer)
