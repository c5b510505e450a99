"""
A cluster's session token never stays expired, and the store's heartbeat
and reloads never scan the keyspace: L{ClusterNode}s on a L{MemoryStore}
and a L{Clock}, then C{twistd openclaw} instances on a real
C{redis-server}.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from openclaw.cluster import ClusterNode, MemoryStore
from openclaw.cluster.node import RENEW_AT, TOKEN, encode_token
from openclaw.cluster.store import Versioned
from openclaw.routing import ActiveRoute, Route
from openclaw.session import SessionAuthority, SessionToken, TokenRejected
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

    def node(self, name: str, secret: bytes = SECRET) -> ClusterNode:
        node = ClusterNode(
            self.store,
            ActiveRoute(Route("gemini", "g-1")),
            SessionAuthority(secret, TTL, clock=self.clock.seconds),
            name,
            self.clock,
            1.0,
            ("gemini", "kimi"),
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
        a = self.node("a")
        a._on_foreign_token = refused.append
        a.connected()
        self.assertEqual(self.store.values[TOKEN].value, encode_token(other))
        self.assertEqual(len(refused), 1)


class ExpiredTokenOnRedis(ClusterCase):
    @inlineCallbacks
    def test_restart_replaces_an_expired_token(self) -> None:
        """
        The review's reproduction: a cluster token that expired is replaced
        when an instance restarts (it was adopted, locking the control
        plane out until Redis was edited).
        """
        a = self.spawn(SESSION_TTL_HOURS="0.0003")  # 1 s
        old = yield a.token
        yield a.stop()
        yield sleep(1.5)
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
        a = self.spawn(SESSION_TTL_HOURS="0.001")  # 4 s: renewed after 3 s
        first = yield a.token
        b = self.spawn(SESSION_TTL_HOURS="0.001")
        yield b.token
        for _ in range(100):
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


def redis_command(port: int, *args: str) -> Any:
    """
    One command to Redis on C{port} (RESP, blocking): its reply, decoded
    enough for these tests.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        sock.sendall(b"".join(parts))
        reader = sock.makefile("rb")
        return _reply(reader)


def _reply(reader: Any) -> Any:
    line = reader.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        if int(rest) < 0:
            return None
        data = reader.read(int(rest) + 2)
        return data[:-2].decode(errors="replace")
    if kind == b"*":
        return [_reply(reader) for _ in range(max(0, int(rest)))]
    raise RuntimeError(f"unexpected reply {line!r}")


POPULATE = """
for i = 1, tonumber(ARGV[1]) do
  redis.call('SET', 'unrelated:' .. i, 'x')
end
return redis.call('DBSIZE')
"""


class NoScan(ClusterCase):
    @inlineCallbacks
    def test_heartbeat_and_reload_ignore_unrelated_keys(self) -> None:
        """
        With 200k unrelated keys in the database, no script of the
        gateway's (heartbeat, reload of rests and lockouts, writes) takes
        more than 5 ms: none scans the keyspace.  The keys of the earlier
        layout are ignored.
        """
        port = self.redis.port
        size = yield deferToThread(redis_command, port, "EVAL", POPULATE, "0", "200000")
        self.assertGreaterEqual(size, 200000)
        yield deferToThread(redis_command, port, "CONFIG", "SET", "slowlog-log-slower-than", "5000")
        yield deferToThread(redis_command, port, "SLOWLOG", "RESET")
        # Keys of the earlier layout (a rolling upgrade) are ignored.
        for key in ("openclaw:instance:old", "openclaw:rest:kimi:0123", "openclaw:lockout:192.0.2.1"):
            yield deferToThread(redis_command, port, "SET", key, "1", "EX", "60")
        a = self.spawn()
        token = yield a.token
        b = self.spawn()
        yield b.token
        client = yield self.client(b.port)
        answer = yield client.command(token, "rotate_token")
        self.assertTrue(answer["ok"], answer)
        # A failed authentication is counted in Redis too.
        answer = yield client.command("forged", "ping")
        self.assertFalse(answer["ok"], answer)
        # Both have beaten and reloaded rests and lockouts by now.
        yield sleep(1)
        slow = yield deferToThread(redis_command, port, "SLOWLOG", "GET", "100")
        self.assertEqual([entry[3] for entry in slow], [])
        alive = yield deferToThread(redis_command, port, "ZCARD", "openclaw:instances")
        self.assertEqual(alive, 2)
