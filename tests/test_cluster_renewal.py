"""
The cluster token's renewal: a token that could not be
adopted is logged and adopted later, a renewal answered after C{stop()}
leaves nothing on the reactor, and a renewal after the store lost the token
(a C{FLUSHALL}) is applied everywhere.  L{ClusterNode}s on a L{MemoryStore}
and a L{Clock}, then a C{twistd openclaw} instance on a real
C{redis-server}.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from openclaw.cluster import ClusterNode, MemoryStore
from openclaw.cluster.node import StoreUnconfirmed, TokenNotAdoptedHere
from openclaw.cluster.records import RENEW_AT, ROUTE, TOKEN, decode_token
from openclaw.cluster.store import Versioned
from openclaw.routing import ActiveRoute, Route
from openclaw.session import SessionAuthority
from tests.test_cluster import OTHER_SECRET, ClusterCase, sleep
from tests.test_cluster_expired_token import SECRET, TTL
from tests.test_cluster_keyspace import redis_command


class HeldReplaces(MemoryStore):
    """
    A L{MemoryStore} whose compare-and-sets are made, and answered, only at
    L{answer}: a reply on its way while the node stops.
    """

    def __init__(self, clock: Any) -> None:
        super().__init__(clock)
        self.replaces: list[tuple[tuple[str, str, str, str, int], Deferred[Versioned]]] = []

    def replace(self, name: str, jti: str, value: str, origin: str, known: int) -> Deferred[Versioned]:
        pending: Deferred[Versioned] = Deferred()
        self.replaces.append(((name, jti, value, origin, known), pending))
        return pending

    def answer(self) -> None:
        replaces, self.replaces = self.replaces, []
        for arguments, pending in replaces:
            super().replace(*arguments).chainDeferred(pending)


class Renewal(TestCase):
    """
    L{ClusterNode}s on one L{MemoryStore} and one L{Clock}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = MemoryStore(self.clock.seconds)

    def node(self, name: str, token_file: Path | None = None, subscribed: bool = True) -> ClusterNode:
        node = ClusterNode(
            self.store,
            ActiveRoute(Route("gemini", "g-1")),
            SessionAuthority(SECRET, TTL, clock=self.clock.seconds, token_file=token_file),
            name,
            self.clock,
            1.0,
            ("gemini", "kimi"),
        )
        if subscribed:
            self.store.listeners.append(node.received)
        self.addCleanup(node.stop)
        return node

    def messages(self) -> list[str]:
        """
        The text of every event logged from now on.
        """
        texts: list[str] = []

        def observer(event: dict[str, Any]) -> None:
            texts.append(formatEvent(event))

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return texts

    def test_adopt_failure_logged_and_retried(self) -> None:
        """
        A renewed token this instance cannot adopt (its TOKEN_FILE cannot be
        written) is logged with what to check, and adopted at a heartbeat
        once the file can be written: the instance does not keep the old
        token while the cluster moved on.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        token_file = directory / "run" / "token"
        token_file.parent.mkdir()
        # Not subscribed: the token reaches it through the compare-and-set's
        # answer only.
        a = self.node("a", token_file, subscribed=False)
        a.connected()
        first = a.sessions.current
        self.assertEqual(token_file.read_text().strip(), first.token)
        # The token file's directory is gone (a file in its place: an
        # OSError even for root).
        shutil.rmtree(token_file.parent)
        token_file.parent.write_text("not a directory")
        logged = self.messages()
        self.clock.advance(TTL * RENEW_AT)
        renewed = decode_token(self.store.values[TOKEN].value)
        self.assertNotEqual(renewed.jti, first.jti)
        self.assertEqual(a.sessions.current, first)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertTrue(any("could not adopt" in text and "TOKEN_FILE" in text for text in logged), logged)
        # Fixed: the next heartbeat adopts the cluster's token.
        token_file.parent.unlink()
        token_file.parent.mkdir()
        a.beat()
        self.assertEqual(a.sessions.current, renewed)
        self.assertEqual(token_file.read_text().strip(), renewed.token)
        self.assertEqual(a.versions[TOKEN], self.store.values[TOKEN].version)

    def test_rotation_not_adopted_here_said_as_made(self) -> None:
        """
        A rotate_token written to the store that this instance cannot adopt
        (its TOKEN_FILE cannot be written) is answered as made cluster-wide,
        never as "nothing changed" (trial s32): the other instances refuse
        the previous token already.  The answer says why, what to do and
        where to read the new token (never the token itself: errors are
        audited); this instance adopts it at a heartbeat once it can.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        token_file = directory / "run" / "token"
        token_file.parent.mkdir()
        a, b = self.node("a", token_file), self.node("b")
        a.connected()
        b.connected()
        first = a.sessions.current
        shutil.rmtree(token_file.parent)
        token_file.parent.write_text("not a directory")
        rotated = a.sessions.mint()
        failure = self.failureResultOf(a.rotate(rotated), TokenNotAdoptedHere)
        message = str(failure.value)
        self.assertIn("rotated cluster-wide", message)
        self.assertIn(rotated.jti, message)
        self.assertIn("(Not a directory)", message)
        self.assertIn("do not rotate again", message)
        self.assertIn("TOKEN_FILE", message)
        self.assertNotIn(rotated.token, message)
        self.assertNotIn("nothing changed", message)
        self.assertEqual(decode_token(self.store.values[TOKEN].value).jti, rotated.jti)
        self.assertEqual(b.sessions.current, rotated)
        self.assertEqual(a.sessions.current, first)
        self.flushLoggedErrors(OSError)
        # Fixed: adopted at the next heartbeat (its catch-up).
        token_file.parent.unlink()
        token_file.parent.mkdir()
        a.beat()
        self.clock.advance(1.0)
        self.assertEqual(a.sessions.current, rotated)
        self.assertEqual(token_file.read_text().strip(), rotated.token)

    def test_adopt_failure_on_reconnection_retried(self) -> None:
        """
        Reconnecting to a token rotated meanwhile that cannot be adopted
        (its TOKEN_FILE cannot be written): logged once with what to check,
        the instance stays out of step (changes refused) and reloads again
        until it adopts the token.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        token_file = directory / "run" / "token"
        token_file.parent.mkdir()
        a, b = self.node("a", token_file, subscribed=False), self.node("b")
        a.connected()
        b.connected()
        first = a.sessions.current
        a.lost("test")
        rotated = b.sessions.mint()
        b.rotate(rotated)
        shutil.rmtree(token_file.parent)
        token_file.parent.write_text("not a directory")
        logged = self.messages()
        a.connected()
        self.assertFalse(a.up)
        self.assertEqual(a.sessions.current, first)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertTrue(any("could not adopt" in text and "TOKEN_FILE" in text for text in logged), logged)
        self.clock.advance(1.0)
        self.assertFalse(a.up)
        self.assertEqual(self.flushLoggedErrors(OSError), [])  # once per outage
        token_file.parent.unlink()
        token_file.parent.mkdir()
        self.clock.advance(2.0)
        self.assertTrue(a.up)
        self.assertEqual(a.sessions.current, rotated)
        self.assertEqual(token_file.read_text().strip(), rotated.token)

    def test_renewal_answered_after_stop_leaves_no_timer(self) -> None:
        """
        A renewal whose answer (and publication) arrives after L{stop}
        schedules no further renewal: nothing is left on the reactor.
        """
        self.store = HeldReplaces(self.clock.seconds)
        a = self.node("a")
        a.connected()
        first = a.sessions.current
        self.clock.advance(TTL * RENEW_AT)
        self.assertEqual(len(self.store.replaces), 1)
        a.stop()
        self.store.answer()
        self.assertNotEqual(a.sessions.current.jti, first.jti)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_renewal_after_the_store_lost_the_token(self) -> None:
        """
        The store lost the token (a FLUSHALL, no disconnection) after the
        instances knew version 2: the renewal writes version 3, not 1, and
        every instance adopts it.
        """
        a, b = self.node("a"), self.node("b")
        a.connected()
        b.connected()
        rotated = a.sessions.mint()
        a.rotate(rotated)
        self.assertEqual(b.sessions.current, rotated)
        self.assertEqual(b.versions[TOKEN], 2)
        self.store.flush()
        self.clock.advance(TTL * RENEW_AT)
        renewed = decode_token(self.store.values[TOKEN].value)
        self.assertNotEqual(renewed.jti, rotated.jti)
        self.assertEqual(self.store.values[TOKEN].version, 3)
        self.assertEqual(a.sessions.current, renewed)
        self.assertEqual(b.sessions.current, renewed)

    def test_rotation_and_switch_after_the_store_lost_them(self) -> None:
        """
        The store lost the token and the route (a FLUSHALL, no
        disconnection) after the instances knew version 2 of each: a
        rotate_token and a switch_provider are written as version 3, not 1,
        and every instance applies them.
        """
        a, b = self.node("a"), self.node("b")
        a.connected()
        b.connected()
        a.rotate(a.sessions.mint())
        a.switch(Route("kimi", "k-1"))
        self.assertEqual((b.versions[TOKEN], b.versions[ROUTE]), (2, 2))
        self.store.flush()
        rotated = a.sessions.mint()
        a.rotate(rotated)
        a.switch(Route("gemini", "g-2"))
        self.assertEqual((self.store.values[TOKEN].version, self.store.values[ROUTE].version), (3, 3))
        for node in (a, b):
            self.assertEqual(node.sessions.current, rotated)
            self.assertEqual(node.route.current, Route("gemini", "g-2"))

    def test_stop_cancels_a_confirmation_waiting_to_retry(self) -> None:
        """
        A write whose reply was lost, and whose confirmation failed once:
        the wait before the next attempt is cancelled by L{stop} (nothing
        left on the reactor), and the command is answered
        L{StoreUnconfirmed}.
        """
        a = self.node("a")
        a.connected()
        self.store.lose_replies = 1
        rotated = a.rotate(a.sessions.mint())
        self.store.up = False
        self.clock.advance(1.0)  # the write times out; the first confirmation fails
        self.assertNotEqual(self.clock.getDelayedCalls(), [])
        a.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.failureResultOf(rotated, StoreUnconfirmed)

    def test_stopped_instance_counts_no_more(self) -> None:
        """
        An instance that stops cleanly leaves C{instances_seen} at once,
        not 30 s after its last heartbeat.
        """
        a, b = self.node("a"), self.node("b")
        for node in (a, b):
            node.start()
            node.connected()
        self.assertEqual(b.instances_seen, 2)
        self.successResultOf(a.stop())
        self.assertNotIn("a", self.store.alive)
        b.beat()
        self.assertEqual(b.instances_seen, 1)

    def test_refused_instance_never_counted(self) -> None:
        """
        An instance that refuses the cluster's token (another JWT_SECRET)
        never joined: its heartbeats, from its start on, do not count it in
        C{instances_seen}.
        """
        a = self.node("a")
        a.start()
        a.connected()
        refused: list[str] = []
        b = ClusterNode(
            self.store,
            ActiveRoute(Route("gemini", "g-1")),
            SessionAuthority(OTHER_SECRET.encode(), TTL, clock=self.clock.seconds),
            "b",
            self.clock,
            1.0,
            ("gemini", "kimi"),
            on_foreign_token=refused.append,
        )
        self.addCleanup(b.stop)
        b.start()  # its first heartbeat, before it reloads
        b.connected()
        self.assertEqual(len(refused), 1)
        self.clock.advance(10)  # another heartbeat each
        self.assertNotIn("b", self.store.alive)
        self.assertEqual(a.instances_seen, 1)

    def test_lowered_ttl_applies_at_the_next_renewal(self) -> None:
        """
        README: an instance restarted with a lower SESSION_TTL_HOURS adopts
        the cluster's token as it is (its expiry unchanged); the token it
        renews, at 80% of the stored token's own lifetime, lives for the
        lower value.
        """
        a = self.node("a")
        a.connected()
        first = a.sessions.current
        a.stop()
        b = ClusterNode(
            self.store,
            ActiveRoute(Route("gemini", "g-1")),
            SessionAuthority(SECRET, 600, clock=self.clock.seconds),
            "b",
            self.clock,
            1.0,
            ("gemini", "kimi"),
        )
        self.store.listeners.append(b.received)
        self.addCleanup(b.stop)
        b.connected()
        self.assertEqual(b.sessions.current, first)
        self.clock.advance(TTL * RENEW_AT - 1)
        self.assertEqual(b.sessions.current, first)
        self.clock.advance(1)
        renewed = b.sessions.current
        self.assertNotEqual(renewed.jti, first.jti)
        self.assertEqual(renewed.expires_at - renewed.issued_at, 600)


class RenewalOnRedis(ClusterCase):
    @inlineCallbacks
    def test_renewal_after_flushall(self) -> None:
        """
        The Redis script: after a rotation (version 2) and a FLUSHALL, the
        renewal is written one version above (3, not 1) and the instance
        adopts it (a new
        banner; the new token opens the control plane).
        """
        a = self.spawn(SESSION_TTL_HOURS="0.003")  # 10.8 s: renewed after 8.6 s
        first = yield a.token
        client = yield self.client(a.port)
        answer = yield client.ask(first, "rotate_token")
        self.assertTrue(answer["ok"], answer)
        rotated = answer["result"]["token"]
        banners = a.stdout.count(b"Token    : ")
        known = yield deferToThread(redis_command, self.redis.port, "HGET", "openclaw:state:token", "version")
        yield deferToThread(redis_command, self.redis.port, "FLUSHALL")
        for _ in range(200):
            if a.stdout.count(b"Token    : ") > banners:
                break
            yield sleep(0.1)
        renewed = a.stdout.rsplit(b"Token    : ", 1)[1].split()[0].decode()
        self.assertNotIn(renewed, {first, rotated})
        version = yield deferToThread(redis_command, self.redis.port, "HGET", "openclaw:state:token", "version")
        self.assertEqual(int(version), int(known) + 1)
        answer = yield client.ask(renewed, "ping")
        self.assertTrue(answer["ok"], answer)

    @inlineCallbacks
    def test_rotation_after_flushall(self) -> None:
        """
        The Redis script: after a rotation (version 2) and a FLUSHALL, the
        next rotate_token is written one version above (3, not 1) and the
        instance adopts it (the new token opens the control plane).
        """
        a = self.spawn()
        first = yield a.token
        client = yield self.client(a.port)
        answer = yield client.ask(first, "rotate_token")
        self.assertTrue(answer["ok"], answer)
        rotated = answer["result"]["token"]
        known = yield deferToThread(redis_command, self.redis.port, "HGET", "openclaw:state:token", "version")
        yield deferToThread(redis_command, self.redis.port, "FLUSHALL")
        answer = yield client.ask(rotated, "rotate_token")
        self.assertTrue(answer["ok"], answer)
        again = answer["result"]["token"]
        version = yield deferToThread(redis_command, self.redis.port, "HGET", "openclaw:state:token", "version")
        self.assertEqual(int(version), int(known) + 1)
        client = yield self.client(a.port)
        answer = yield client.ask(again, "ping")
        self.assertTrue(answer["ok"], answer)

    @inlineCallbacks
    def test_instances_refused_or_stopped_leave_the_count(self) -> None:
        """
        An instance refused at start (another JWT_SECRET) is never in
        C{<prefix>:instances}; one that stops cleanly is removed from it at
        once.
        """
        a = self.spawn()
        token = yield a.token
        b = self.spawn(JWT_SECRET=OTHER_SECRET)
        yield b.ended
        members = yield deferToThread(redis_command, self.redis.port, "ZRANGE", "openclaw:instances", "0", "-1")
        client = yield self.client(a.port)
        status = yield client.ask(token, "status")
        self.assertEqual(members, [status["result"]["instance"]])
        self.assertEqual(status["result"]["instances_seen"], 1)
        yield a.stop()
        members = yield deferToThread(redis_command, self.redis.port, "ZRANGE", "openclaw:instances", "0", "-1")
        self.assertEqual(members, [])
