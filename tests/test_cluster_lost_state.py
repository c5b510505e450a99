"""
The store lost the cluster's state (Redis restarted empty, C{FLUSHALL},
an eviction): the instances that knew it write it back, and a newcomer
that reached the empty store first never overrides it (the rule in
L{openclaw.cluster.node}).  L{ClusterNode}s on a L{MemoryStore} and a
L{Clock}; then the same on a real C{redis-server} with C{twistd}
instances.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from openclaw.cluster import ClusterNode, MemoryStore
from openclaw.cluster.membership import MEMBERSHIP_FILE, Membership, Recorded, store_identity
from openclaw.cluster.node import MAX_STALE_READS, WRITE_BACK_POLL_SECONDS
from openclaw.cluster.records import ROUTE, TOKEN, decode_token, encode_route, encode_token, is_restored, provenance
from openclaw.cluster.store import Versioned, WriteRefused
from openclaw.files import write_atomically
from openclaw.routing import MAX_MODEL_CHARS, ActiveRoute, Route
from openclaw.session import SessionAuthority
from tests.redis_server import DelayingProxy
from tests.support import capture_log_events
from tests.test_cluster import ClusterCase, printed, sleep
from tests.test_cluster_keyspace import redis_command

SECRET = b"0123456789abcdef0123456789abcdef"
GEMINI = Route("gemini", "g-1")


class UnansweredEnsures(MemoryStore):
    """
    A L{MemoryStore} whose C{ensure} calls go unanswered while
    C{unanswered} is set (their replies lost, or late past
    REDIS_TIMEOUT_SECONDS).
    """

    unanswered = False

    def ensure(self, name: str, value: str, version: int, origin: str) -> Deferred[Versioned]:
        if self.unanswered:
            return Deferred()
        return super().ensure(name, value, version, origin)


class LostState(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = UnansweredEnsures(self.clock.seconds)
        self.a, self.b = self.node("a"), self.node("b")
        for node in (self.a, self.b):
            node.connected()

    def node(self, name: str, route: Route = GEMINI, secret: bytes = SECRET, **callbacks: Any) -> ClusterNode:
        node = ClusterNode(
            self.store,
            ActiveRoute(route),
            SessionAuthority(secret, 3600, clock=self.clock.seconds),
            name,
            self.clock,
            1.0,
            ("gemini", "kimi"),
            **callbacks,
        )
        self.store.listeners.append(node.received)
        return node

    def newcomer_first(self, route: Route = GEMINI) -> ClusterNode:
        """
        The store comes back empty; a newly started node reaches it before
        the running ones reconnect (it proposes its configured route and a
        token minted later, both at version 1); then they reconnect.
        """
        self.a.lost()
        self.b.lost()
        self.store.flush()
        self.clock.advance(5)
        d = self.node("d", route)
        d.connected()
        self.assertEqual(self.store.values[ROUTE].origin, "d")
        self.a.connected()
        self.b.connected()
        return d

    def assert_agree(self, route: Route, jti: str, *nodes: ClusterNode) -> None:
        for node in nodes:
            self.assertEqual((node.instance, node.route.current), (node.instance, route))
            self.assertEqual((node.instance, node.sessions.current.jti), (node.instance, jti))
        self.assertIn(jti, self.store.values[TOKEN].value)

    def test_newcomer_loses_to_higher_versions(self) -> None:
        """
        The running nodes knew route and token at version 2: the store's
        version 1 (the newcomer's) is replaced by theirs, and the newcomer
        adopts them.
        """
        self.successResultOf(self.a.switch(Route("kimi", "k-1")))
        token = self.successResultOf(self.a.rotate(self.a.sessions.mint()))
        d = self.newcomer_first()
        self.assert_agree(Route("kimi", "k-1"), token.jti, self.a, self.b, d)
        self.assertGreater(self.store.values[ROUTE].version, 2)

    def test_newcomer_loses_at_the_same_version(self) -> None:
        """
        Never switched nor rotated (both at version 1): the earlier token
        (the one the operators hold) wins over the newcomer's, and so does
        the route the running nodes served over the newcomer's configured
        one.
        """
        jti = self.a.sessions.current.jti
        d = self.newcomer_first(Route("kimi", "k-9"))
        self.assert_agree(Route("gemini", "g-1"), jti, self.a, self.b, d)

    def test_newcomer_token_minted_within_the_same_second_loses(self) -> None:
        """
        A newcomer that mints its token within the same second as the
        operators' (the JWT's C{iat} has whole seconds), with a C{jti} that
        sorts first, still loses: its record's C{at} is later.
        """
        operators = self.a.sessions.current
        self.a.lost()
        self.b.lost()
        self.store.flush()
        self.clock.advance(0.5)
        d = self.node("d")
        minted = d.sessions.mint()
        while minted.jti > operators.jti:
            minted = d.sessions.mint()
        self.assertEqual(minted.issued_at, operators.issued_at)
        d.sessions.adopt(minted)
        d.connected()
        self.assertIn(minted.jti, self.store.values[TOKEN].value)
        self.a.connected()
        self.b.connected()
        self.assert_agree(GEMINI, operators.jti, self.a, self.b, d)

    def test_token_without_set_at_held_wins_within_the_same_second(self) -> None:
        """
        A rolling upgrade: the operators' token recorded by an earlier
        version (no C{at}); the store is lost and a newcomer mints a token
        within the same second, with a C{jti} that sorts after theirs:
        the instances in step write theirs back, whatever the C{at}.
        """
        self.a.lost()
        self.b.lost()
        self.store.flush()
        self.clock.advance(0.2)
        operators = self.a.sessions.mint()
        self.store.values[TOKEN] = Versioned(1, encode_token(operators), "old")
        self.store.values[ROUTE] = Versioned(1, '{"provider": "gemini", "model": "g-1"}', "old")
        a, b = self.node("a2"), self.node("b2")
        a.connected()
        b.connected()
        a.lost()
        b.lost()
        self.store.flush()
        self.clock.advance(0.3)
        d = self.node("d")
        minted = d.sessions.mint()
        while minted.jti < operators.jti:
            minted = d.sessions.mint()
        self.assertEqual(minted.issued_at, operators.issued_at)
        d.sessions.adopt(minted)
        d.connected()
        a.connected()
        b.connected()
        self.assert_agree(GEMINI, operators.jti, a, b, d)

    def test_token_held_wins_over_one_without_set_at_within_the_same_second(self) -> None:
        """
        The converse: the instances in step hold a token recorded with
        C{at}; a newcomer of an earlier version reaches the emptied store
        first with a token minted within the same second, recorded without
        one: the instances write theirs back.
        """
        operators = self.a.sessions.current
        self.a.lost()
        self.b.lost()
        self.store.flush()
        self.clock.advance(0.5)
        minted = self.a.sessions.mint()
        while minted.jti > operators.jti:
            minted = self.a.sessions.mint()
        self.assertEqual(minted.issued_at, operators.issued_at)
        self.store.values[TOKEN] = Versioned(1, encode_token(minted), "old")
        self.a.connected()
        self.b.connected()
        self.assert_agree(GEMINI, operators.jti, self.a, self.b)

    def test_later_token_at_the_same_version_adopted(self) -> None:
        """
        The converse: a node whose token was issued after the one the store
        holds at the same version adopts the store's (no write-back war).
        """
        earlier = self.a.sessions.current
        self.a.lost()
        self.clock.advance(5)
        later = self.a.sessions.mint()
        self.a.sessions.adopt(later)
        self.a.connected()
        self.assertEqual(self.a.sessions.current.jti, earlier.jti)
        self.assertEqual(self.store.values[TOKEN].version, 1)

    def restarted_during_the_outage(self, route: Route = GEMINI, was_in_step: bool = True) -> ClusterNode:
        """
        The store comes back empty; D, restarted while it was away
        (C{was_in_step}: its record in STATE_DIR), reaches it before the
        running nodes reconnect.
        """
        self.a.lost()
        self.b.lost()
        self.store.flush()
        self.clock.advance(5)
        d = self.node("d", route)
        d.was_in_step = was_in_step
        d.connected()
        return d

    def test_instance_in_step_before_waits_for_the_write_back(self) -> None:
        """
        Cluster trial s40: D was in step before its restart and finds the
        store empty: it proposes nothing (it served its configured route
        and a token of its own for a second or two), and takes the
        cluster's once the running nodes write it back.
        """
        self.successResultOf(self.a.switch(Route("kimi", "k-1")))
        jti = self.a.sessions.current.jti
        events = capture_log_events(self)
        d = self.restarted_during_the_outage()
        self.assertEqual(self.store.values, {})
        self.assertFalse(d.up)
        self.assertIsNone(d.sessions.current_or_none)
        self.clock.advance(WRITE_BACK_POLL_SECONDS * 3)
        self.assertEqual(self.store.values, {})
        waits = [formatEvent(e) for e in events if "waiting up to" in formatEvent(e)]
        self.assertEqual(len(waits), 1, waits)
        self.assertIn("was in step with the cluster before it started", waits[0])
        self.a.connected()
        self.b.connected()
        self.clock.advance(WRITE_BACK_POLL_SECONDS)
        self.assert_agree(Route("kimi", "k-1"), jti, self.a, self.b, d)
        self.assertTrue(d.up)

    def test_never_written_back_proposes_after_the_grace(self) -> None:
        """
        Every instance restarted with the store (none writes back): D
        proposes its own once L{ClusterNode.write_back_grace} has passed,
        and says why.
        """
        events = capture_log_events(self)
        d = self.restarted_during_the_outage(Route("kimi", "k-9"))
        # A heartbeat interval, the reconnection backoff's cap, two timeouts.
        self.assertEqual(d.write_back_grace, 10 + 5 + 2 * 1.0)
        self.clock.advance(d.write_back_grace - WRITE_BACK_POLL_SECONDS)
        self.assertEqual(self.store.values, {})
        self.clock.advance(WRITE_BACK_POLL_SECONDS)
        self.assertEqual(self.store.values[ROUTE].origin, "d")
        self.assertTrue(d.up)
        self.assertEqual(d.route.current, Route("kimi", "k-9"))
        said = [formatEvent(e) for e in events if "no instance wrote" in formatEvent(e)]
        self.assertEqual(len(said), 1, said)
        # Remembering the route it served (its record), it proposes that
        # one, not the configured one (trial s41: the switch was lost); one
        # it cannot serve is not proposed.
        for remembered, proposed in ((Route("kimi", "k-7"), Route("kimi", "k-7")), (Route("acme", "a"), GEMINI)):
            e = self.restarted_during_the_outage()
            e.remembered_route = remembered
            self.clock.advance(e.write_back_grace)
            self.assertTrue(e.up)
            self.assertEqual(e.route.current, proposed)

    def test_new_instance_proposes_at_once(self) -> None:
        """
        An instance never in step with this cluster (no record) and no
        instance in step alive: a new cluster, or one whose instances are
        away; it proposes its own at once, as before.
        """
        d = self.restarted_during_the_outage(was_in_step=False)
        self.assertEqual(self.store.values[ROUTE].origin, "d")
        self.assertTrue(d.up)

    def test_waits_while_instances_in_step_are_alive(self) -> None:
        """
        The store lost the route and token only (evicted), the running
        nodes' heartbeats still there: even a new instance waits for them
        to write them back, at their next heartbeat.
        """
        self.a.start()
        self.b.start()
        self.addCleanup(self.a.stop)
        self.addCleanup(self.b.stop)
        jti = self.a.sessions.current.jti
        self.successResultOf(self.a.switch(Route("kimi", "k-1")))
        self.store.values.clear()
        d = self.node("d")
        d.connected()
        self.assertEqual(self.store.values, {})
        for _ in range(11):
            self.clock.advance(1)
        self.assert_agree(Route("kimi", "k-1"), jti, self.a, self.b, d)

    def test_written_back_said_as_such(self) -> None:
        """
        A route or token another instance wrote back after the store lost
        them is logged as written back by it, not as switched or issued
        there (cluster trial s40: the writer-back was named the switcher).
        """
        self.successResultOf(self.a.switch(Route("kimi", "k-1")))
        self.successResultOf(self.a.rotate(self.a.sessions.mint()))
        events = capture_log_events(self)
        self.newcomer_first()
        for name in (ROUTE, TOKEN):
            held = self.store.values[name]
            self.assertTrue(is_restored(json.loads(held.value)), name)
            self.assertEqual(provenance(json.loads(held.value), held, "issued on"), f"written back by {held.origin}")
        said = [formatEvent(e) for e in events if "applied the cluster's route kimi/k-1" in formatEvent(e)]
        self.assertTrue(said and all("written back by" in line for line in said), said)
        old = Versioned(3, encode_route(GEMINI, 1.0), "x")
        self.assertEqual(provenance(json.loads(old.value), old, "switched on"), "switched on x")

    def test_fields_of_a_later_version_compared_for_nothing(self) -> None:
        """
        A route record that differs from the one held only in how it is
        written (a field this version does not write, C{"restored": false}
        written out) is the same record: no reload, no line, at every
        heartbeat (review s41: whole records were compared, and each reload
        beat again at once, in a loop).
        """
        self.a.start()
        self.addCleanup(self.a.stop)
        self.successResultOf(self.a.switch(Route("kimi", "k-1")))
        held = self.store.values[ROUTE]
        held_at = json.loads(held.value)["at"]
        for extra in ({"future": 1}, {"by": 7}, {"restored": False}, {"at": held_at + 0.0}):
            document = {**json.loads(held.value), **extra}
            self.store.values[ROUTE] = Versioned(held.version, json.dumps(document), held.origin)
            events = capture_log_events(self)
            self.clock.advance(30)
            said = [formatEvent(e) for e in events if "does not know" in formatEvent(e)]
            self.assertEqual(said, [], extra)
            self.assertEqual(self.a.route.current, Route("kimi", "k-1"))

    def test_disagreement_left_costs_a_reload_a_heartbeat(self) -> None:
        """
        Should a heartbeat's look find a record it cannot agree with however
        it reloads (a fault of some version's), it reloads once a
        heartbeat, never in a loop (review s41: each reload beat again at
        once: 7,000 lines in 12 s against a real store).
        """
        self.a.start()
        self.addCleanup(self.a.stop)
        self.patch(self.a, "_replaced", lambda name, held: True)
        events = capture_log_events(self)
        self.clock.advance(30)
        said = [formatEvent(e) for e in events if "does not know" in formatEvent(e)]
        self.assertTrue(1 <= len(said) <= 3, said)

    def test_outage_during_the_wait(self) -> None:
        """
        The store out of reach while an instance waits for a write-back:
        the time away counts for nothing, the wait starts again once it is
        back (review s41: it proposed its own at once, before the
        instances in step had reconnected).
        """
        self.successResultOf(self.a.switch(Route("kimi", "k-1")))
        jti = self.a.sessions.current.jti
        d = self.restarted_during_the_outage()
        d.lost()
        self.clock.advance(60)
        d.connected()
        self.assertFalse(d.up)
        self.assertEqual(self.store.values, {})
        self.a.connected()
        self.b.connected()
        self.clock.advance(WRITE_BACK_POLL_SECONDS)
        self.assert_agree(Route("kimi", "k-1"), jti, self.a, self.b, d)

    def test_message_during_the_wait(self) -> None:
        """
        A switch published while an instance waits for the lost token: the
        route it applies does not end the wait (review s41: the token still
        missing, it minted and announced its own); it takes the cluster's
        token once written back.
        """
        self.a.start()
        self.b.start()
        self.addCleanup(self.a.stop)
        self.addCleanup(self.b.stop)
        jti = self.a.sessions.current.jti
        del self.store.values[TOKEN]
        d = self.node("d")
        d.was_in_step = True
        d.connected()
        self.successResultOf(self.a.switch(Route("kimi", "k-2")))
        self.assertEqual(d.route.current, Route("kimi", "k-2"))
        self.clock.advance(WRITE_BACK_POLL_SECONDS)
        self.assertIsNone(d.sessions.current_or_none)
        self.assertNotIn(TOKEN, self.store.values)
        for _ in range(11):
            self.clock.advance(1)
        self.assert_agree(Route("kimi", "k-2"), jti, self.a, self.b, d)

    def test_in_step_told_each_time(self) -> None:
        """
        C{on_in_step} is called each time the node is in step (at start,
        and after an outage), so that a record that could not be written
        is tried again.
        """
        told: list[None] = []
        node = self.node("c", on_in_step=lambda: told.append(None))
        self.assertEqual(told, [])
        node.connected()
        self.assertEqual(told, [None])
        node.lost()
        node.connected()
        self.assertTrue(node.up)
        self.assertEqual(told, [None, None])

    def test_heartbeat_writes_back_a_flushed_state(self) -> None:
        """
        The store emptied in place (no disconnection): the next heartbeat
        notices the keys gone and writes them back, so an instance started
        afterwards joins the cluster's route and token.
        """
        self.a.start()
        self.b.start()
        self.addCleanup(self.a.stop)
        self.addCleanup(self.b.stop)
        self.successResultOf(self.a.switch(Route("kimi", "k-1")))
        token = self.successResultOf(self.a.rotate(self.a.sessions.mint()))
        self.store.flush()
        events = capture_log_events(self)
        self.clock.advance(10)
        self.assertTrue(any("the cluster store lost the route and token" in formatEvent(e) for e in events))
        c = self.node("c")
        c.connected()
        self.assert_agree(Route("kimi", "k-1"), token.jti, self.a, self.b, c)

    def test_flushed_state_told(self) -> None:
        """
        A heartbeat that finds the state flushed in place tells
        C{on_lost} (the consumers' windows went with it), once.
        """
        told: list[None] = []
        node = self.node("c", on_lost=lambda: told.append(None))
        node.connected()
        node.start()
        self.addCleanup(node.stop)
        self.clock.advance(10)
        self.assertEqual(told, [])
        self.successResultOf(node.switch(Route("kimi", "k-1")))
        self.store.flush()
        self.clock.advance(10)
        self.assertEqual(told, [None])
        self.clock.advance(10)
        self.assertEqual(told, [None])

    def test_flushed_state_told_to_every_node(self) -> None:
        """
        The store emptied in place: the node whose heartbeat first finds
        it writes the state back; the others, which then find their
        versions, learn it from the store's new epoch, and each tells
        C{on_lost} once (trial s46: only the first put its last minute of
        calls back, and the rpm limit passed).
        """
        told: list[str] = []
        nodes = [self.node(name, on_lost=lambda name=name: told.append(name)) for name in ("c", "d")]
        for node in nodes:
            node.connected()
            node.start()
            self.addCleanup(node.stop)
        self.clock.advance(10)
        self.store.flush()
        events = capture_log_events(self)
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(sorted(told), ["c", "d"])
        said = [
            formatEvent(e) for e in events if "lost its keys since this instance's last heartbeat" in formatEvent(e)
        ]
        self.assertEqual(len(said), 1, said)
        self.clock.advance(30)
        self.assertEqual(sorted(told), ["c", "d"])

    def test_writes_taken_again_told(self) -> None:
        """
        The store refused the heartbeats (out of memory, read-only) and
        takes them again: C{on_writable}, once, and said (trial s46: the
        calls counted alone meanwhile never reached the store, no outage
        having been seen).
        """
        told: list[None] = []
        node = self.node("c", on_writable=lambda: told.append(None))
        node.connected()
        node.start()
        self.addCleanup(node.stop)
        self.clock.advance(10)
        self.assertEqual(told, [])
        beat = self.store.heartbeat
        refusal = WriteRefused("OOM command not allowed when used memory > 'maxmemory'", "free memory")
        self.store.heartbeat = lambda *args: fail(refusal)  # type: ignore[method-assign]
        self.clock.advance(30)
        self.assertEqual(told, [])
        self.store.heartbeat = beat  # type: ignore[method-assign]
        events = capture_log_events(self)
        self.clock.advance(10)
        self.assertEqual(told, [None])
        self.assertTrue(any("the cluster store takes writes again" in formatEvent(e) for e in events))
        self.clock.advance(30)
        self.assertEqual(told, [None])

    def test_flushed_in_place_newcomer_first_at_the_same_version(self) -> None:
        """
        The maintainer's case: never switched nor rotated (route and token
        at version 1); the store emptied in place (no disconnection) and a
        newcomer with another configured route reaches it first, writing
        its route and a fresh token at version 1, the version the running
        nodes know.  Within a few heartbeats every node, the newcomer
        included, holds the route and token the cluster had (the store
        too), and a node restarted afterwards takes them.
        """
        for node in (self.a, self.b):
            node.start()
            self.addCleanup(node.stop)
        jti = self.a.sessions.current.jti
        self.clock.advance(3)
        self.store.flush()
        self.clock.advance(1)
        c = self.node("c", Route("kimi", "k-9"))
        c.connected()
        c.start()
        self.addCleanup(c.stop)
        self.assertNotEqual(c.sessions.current.jti, jti)
        self.assertEqual(self.store.values[TOKEN].version, 1)
        events = capture_log_events(self)
        for _ in range(2):
            self.clock.advance(10)
        self.assertTrue(any("holds a route and token this instance does not know" in formatEvent(e) for e in events))
        # Said as another value at the same version (recheck s41: "version
        # 1 where this instance knew version 1").
        said = [formatEvent(e) for e in events if "writing back" in formatEvent(e)]
        self.assertTrue(said, "no write-back said")
        self.assertTrue(all("another" in line and "at the version this instance knows" in line for line in said), said)
        self.assert_agree(GEMINI, jti, self.a, self.b, c)
        self.b.stop()
        again = self.node("b")
        again.connected()
        self.assert_agree(GEMINI, jti, again)

    def split(self, store_holds_the_earlier: bool) -> tuple[ClusterNode, ClusterNode, list[str]]:
        """
        Two running nodes that hold another route and token each at the
        same version (x's set first, y's a second later), the store holding
        y's (or x's); their heartbeats started.  Also the names of the
        writes made from then on.
        """
        self.a.lost()
        self.b.lost()
        self.store.flush()
        self.clock.advance(1)
        x = self.node("x")
        x.connected()
        earlier = dict(self.store.values)
        self.store.flush()
        self.clock.advance(1)
        y = self.node("y", Route("kimi", "k-1"))
        y.connected()
        if store_holds_the_earlier:
            self.store.values.update(earlier)
        self.assertNotEqual(x.sessions.current.jti, y.sessions.current.jti)
        self.assertEqual({x.versions[ROUTE], x.versions[TOKEN], y.versions[ROUTE], y.versions[TOKEN]}, {1})
        writes: list[str] = []
        self.store.listeners.append(lambda name, version, value, origin: writes.append(name))
        for node in (y, x):
            node.start()
            self.addCleanup(node.stop)
        return x, y, writes

    def test_same_version_disagreement_earlier_written_back_once(self) -> None:
        """
        The store holds the later of two nodes' states at the same
        version: the node holding the earlier writes its route and token
        back once, the other applies them, and nothing is written after.
        """
        x, y, writes = self.split(store_holds_the_earlier=False)
        self.clock.advance(10)
        self.assert_agree(GEMINI, x.sessions.current.jti, x, y)
        self.assertEqual(sorted(writes), [ROUTE, TOKEN])
        for _ in range(30):
            self.clock.advance(10)
        self.assertEqual(sorted(writes), [ROUTE, TOKEN])

    def test_same_version_disagreement_later_adopts(self) -> None:
        """
        The store holds the earlier of the two states: the node holding
        the later one adopts it at its next heartbeat, writing nothing
        (its route, set later, loses as its token, issued later, does).
        """
        x, y, writes = self.split(store_holds_the_earlier=True)
        for _ in range(30):
            self.clock.advance(10)
        self.assert_agree(GEMINI, x.sessions.current.jti, x, y)
        self.assertEqual(writes, [])

    def test_route_recorded_without_set_at_counts_as_earliest(self) -> None:
        """
        A route record without C{at} (written by an earlier version) is
        the cluster's route from before any that has one: it wins at the
        same version over a newcomer's.
        """
        self.a.lost()
        self.b.lost()
        self.store.flush()
        self.store.values[ROUTE] = Versioned(1, encode_route(Route("kimi", "k-1")), "old")
        # Started (new version) while the cluster's route is an earlier
        # version's: they take it.
        self.a, self.b = self.node("a"), self.node("b")
        self.a.connected()
        self.b.connected()
        self.a.start()
        self.b.start()
        self.addCleanup(self.a.stop)
        self.addCleanup(self.b.stop)
        jti = self.a.sessions.current.jti
        self.store.flush()
        self.clock.advance(1)
        c = self.node("c", GEMINI)
        c.connected()
        c.start()
        self.addCleanup(c.stop)
        for _ in range(2):
            self.clock.advance(10)
        self.assert_agree(Route("kimi", "k-1"), jti, self.a, self.b, c)
        self.assertNotIn('"at"', self.store.values[ROUTE].value)

    def writes(self) -> list[tuple[str, str]]:
        """
        The names and writers of the writes made from now on.
        """
        made: list[tuple[str, str]] = []
        self.store.listeners.append(lambda name, version, value, origin: made.append((name, origin)))
        return made

    def lagging_write_back(self, change: str) -> tuple[ClusterNode, ClusterNode, list[tuple[str, str]]]:
        """
        a and d in step (version 1); d loses its
        connection; the operators make C{change} (L{ROUTE}: switch to kimi,
        L{TOKEN}: rotate) through a (version 2); the store comes back
        empty and a newcomer n writes its own at version 1; d comes back
        first (it knew version 1 and writes its old value back, at version
        2), then a.  Ten heartbeats later; also the writes made from the
        store's loss on.
        """
        d = self.b
        for node in (self.a, d):
            node.start()
            self.addCleanup(node.stop)
        self.clock.advance(100)
        d.lost()
        self.store.listeners.remove(d.received)
        if change == ROUTE:
            self.successResultOf(self.a.switch(Route("kimi", "k-1")))
        else:
            self.successResultOf(self.a.rotate(self.a.sessions.mint()))
        self.clock.advance(1)
        self.assertEqual((self.a.versions[change], d.versions[change]), (2, 1))
        self.a.lost()
        self.store.flush()
        writes = self.writes()
        n = self.node("n")
        n.connected()
        n.start()
        self.addCleanup(n.stop)
        self.store.listeners.append(d.received)
        d.connected()
        self.assertEqual((self.store.values[change].version, self.store.values[change].origin), (2, d.instance))
        self.a.connected()
        for _ in range(10):
            self.clock.advance(10)
        return d, n, writes

    def test_stale_write_back_loses_to_a_switch(self) -> None:
        """
        At the same version, the route a switch set wins over one an
        instance a switch behind wrote back (C{"restored"}), though that
        was set earlier: the switch is not undone; written back once.
        """
        d, n, writes = self.lagging_write_back(ROUTE)
        for node in (self.a, d, n):
            self.assertEqual((node.instance, node.route.current), (node.instance, Route("kimi", "k-1")))
        self.assertIn('"kimi"', self.store.values[ROUTE].value)
        route_writes = [origin for name, origin in writes if name == ROUTE]
        self.assertEqual(route_writes, ["b", "a"])
        for _ in range(30):
            self.clock.advance(10)
        self.assertEqual([origin for name, origin in writes if name == ROUTE], route_writes)

    def test_stale_write_back_loses_to_a_rotation(self) -> None:
        """
        The same for the token: the rotated-away token an instance a
        rotation behind wrote back never becomes the cluster's again.
        """
        rotated_away = self.a.sessions.current.jti
        d, n, writes = self.lagging_write_back(TOKEN)
        jti = self.a.sessions.current.jti
        self.assertNotEqual(jti, rotated_away)
        self.assert_agree(GEMINI, jti, self.a, d, n)
        token_writes = [origin for name, origin in writes if name == TOKEN]
        self.assertEqual(token_writes, ["b", "a"])
        for _ in range(30):
            self.clock.advance(10)
        self.assertEqual([origin for name, origin in writes if name == TOKEN], token_writes)

    def test_route_without_set_at_loses_to_the_one_held(self) -> None:
        """
        A route record without C{at} (an earlier version's, during a
        rolling deploy) that reached the emptied store first at the same
        version does not win over the route the instances hold (with
        C{at}), however late theirs was set: it can only differ because it
        was written after the loss.
        """
        for node in (self.a, self.b):
            node.start()
            self.addCleanup(node.stop)
        self.clock.advance(3600 * 5)
        self.store.flush()
        self.store.values[ROUTE] = Versioned(1, '{"provider": "kimi", "model": "k-1"}', "old")
        # The token the instances know, at the version they know (its
        # record as an earlier version wrote it: no C{at}).
        self.store.values[TOKEN] = Versioned(self.a.versions[TOKEN], encode_token(self.a.sessions.current), "a")
        writes = self.writes()
        for _ in range(3):
            self.clock.advance(10)
        for node in (self.a, self.b):
            self.assertEqual((node.instance, node.route.current), (node.instance, GEMINI))
        self.assertIn('"gemini"', self.store.values[ROUTE].value)
        self.assertEqual(writes, [(ROUTE, "a")])

    def test_same_token_at_a_lower_version_written_back_once(self) -> None:
        """
        The store holds the token the instances hold, at a version below
        the one they know (restored from an older snapshot): one of them
        writes it back one version above, once; the heartbeats after that
        find nothing lost.
        """
        for node in (self.a, self.b):
            node.start()
            self.addCleanup(node.stop)
        self.clock.advance(3600 * 5)
        known = self.a.versions[TOKEN]
        self.assertGreater(known, 1)
        jti = self.a.sessions.current.jti
        self.store.values[TOKEN] = Versioned(known - 1, encode_token(self.a.sessions.current), "a")
        writes = self.writes()
        for _ in range(6):
            self.clock.advance(10)
        self.assertEqual(len(writes), 1)
        self.assertEqual(writes[0][0], TOKEN)
        self.assertGreater(self.store.values[TOKEN].version, known)
        self.assert_agree(GEMINI, jti, self.a, self.b)

    def test_foreign_token_written_over_and_renewed(self) -> None:
        """
        An instance with another JWT_SECRET reaches the emptied store
        first: the instances that were in step write the operators' token
        back (so that its renewal, a compare-and-set on its jti, works and
        it never expires unrenewed); the foreign instance refuses it and
        writes nothing (no war).
        """
        for node in (self.a, self.b):
            node.start()
            self.addCleanup(node.stop)
        first = self.a.sessions.current
        self.clock.advance(60)
        self.a.lost()
        self.b.lost()
        self.store.flush()
        f = self.node("f", secret=b"fedcba9876543210fedcba9876543210")
        f.connected()
        f.start()
        self.addCleanup(f.stop)
        own = f.sessions.current.jti
        writes = self.writes()
        self.a.connected()
        self.b.connected()
        self.assertEqual(decode_token(self.store.values[TOKEN].value).jti, first.jti)
        for _ in range(400):
            self.clock.advance(10)
        jti = self.a.sessions.current.jti
        self.assertNotEqual(jti, first.jti)
        self.assertLess(self.clock.seconds(), self.a.sessions.current.expires_at)
        self.assert_agree(GEMINI, jti, self.a, self.b)
        self.assertEqual(f.sessions.current.jti, own)
        self.assertNotIn("f", [origin for name, origin in writes])
        self.assertEqual(len([name for name, origin in writes if name == TOKEN]), 2)  # written back, renewed

    def test_route_with_an_unknown_provider_written_back(self) -> None:
        """
        At the same version, a route this instance cannot apply (a provider
        it does not know), set earlier or not, is replaced by its own: not
        refused again at every heartbeat.
        """
        self.a.start()
        self.addCleanup(self.a.stop)
        self.store.values[ROUTE] = Versioned(1, encode_route(Route("openai", "o-1")), "old")
        for _ in range(3):
            self.clock.advance(10)
        self.assertEqual((self.store.values[ROUTE].version, self.store.values[ROUTE].origin), (2, "a"))
        self.assertEqual(self.a.route.current, GEMINI)

    def test_route_with_a_refused_model_written_back(self) -> None:
        """
        As a route naming an unknown provider: one whose model the API would
        refuse (L{model_refusal}: an escape code and CRLF, or over
        MAX_MODEL_CHARS) is never applied; at the same version it is
        replaced by this instance's own, the error line naming the reason,
        never the name.
        """
        self.a.start()
        self.addCleanup(self.a.stop)
        events = capture_log_events(self)
        version = self.a.versions[ROUTE]
        for model in ("k-1\x1b[2J\r\nX-Injected: 1", "k" * (MAX_MODEL_CHARS + 1)):
            version += 1
            self.store.values[ROUTE] = Versioned(version, encode_route(Route("kimi", model)), "old")
            self.a.received(ROUTE, version, self.store.values[ROUTE].value, "old")
            self.assertEqual(self.a.route.current, GEMINI)
            self.assertEqual(self.a.versions[ROUTE], version - 1)
            # Then at the version this instance knows, set before its own
            # (which would win over its own if it could be applied).
            earlier = encode_route(Route("kimi", model), at=self.clock.seconds() - 3600)
            self.store.values[ROUTE] = Versioned(version - 1, earlier, "old")
            for _ in range(3):
                self.clock.advance(10)
            version = self.store.values[ROUTE].version
            self.assertEqual((version, self.store.values[ROUTE].origin), (self.a.versions[ROUTE], "a"))
            self.assertEqual(self.a.route.current, GEMINI)
        said = "\n".join(formatEvent(e) for e in events if "ignoring the cluster's route" in formatEvent(e))
        self.assertIn("its model holds control or invisible characters", said)
        self.assertIn(f"its model is {MAX_MODEL_CHARS + 1} characters long", said)
        for raw in ("\x1b", "X-Injected", "k" * 20):
            self.assertNotIn(raw, said)

    def test_reload_timeout_said_plainly(self) -> None:
        """
        A reload that timed out says so (not a timeout's repr), and what
        happens next.
        """
        self.a.lost()
        events = capture_log_events(self)
        self.store.unanswered = True
        self.a.connected()
        self.clock.advance(1.0)
        self.store.unanswered = False
        said = [formatEvent(e) for e in events if "could not reload" in formatEvent(e)]
        self.assertEqual(
            said,
            [
                "could not reload the cluster's route and token from its store (no answer from the cluster "
                "store within 1 s (REDIS_TIMEOUT_SECONDS)); serving with the last known route and token and "
                "refusing changes meanwhile; trying again in 1 s, then backing off up to 5 s between attempts, "
                "until it works"
            ],
        )

        # A node never in step (start-up) does not listen: it says so, not
        # that it serves (recheck s44).
        events.clear()
        self.store.unanswered = True
        fresh = self.node("c")
        fresh.connected()
        self.clock.advance(1.0)
        self.store.unanswered = False
        said = [formatEvent(e) for e in events if "could not reload" in formatEvent(e)]
        self.assertEqual(len(said), 1)
        self.assertIn("; not listening and refusing changes meanwhile; trying again in", said[0])


class MembershipRecord(TestCase):
    """
    L{Membership}: the record, in STATE_DIR, that an instance was in step
    with its cluster, and the route it last served there.
    """

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir()
        self.membership = Membership.in_directory(self.directory, "openclaw", "redis://127.0.0.1:6379/0")

    def test_recorded_then_read(self) -> None:
        self.assertIsNone(self.membership.read())
        self.assertTrue(self.successResultOf(self.membership.record(GEMINI)))
        self.assertEqual(self.membership.read(), Recorded(GEMINI))
        self.assertEqual((self.directory / MEMBERSHIP_FILE).stat().st_mode & 0o777, 0o600)

    def test_store_written_any_way(self) -> None:
        """
        The store is compared as the server and database the URL names,
        however it writes them (trial s41: redis://host:6379 did not match
        redis://host:6379/0, and the instance did not wait); never with a
        password.
        """
        self.successResultOf(self.membership.record(GEMINI))
        for url in (
            "redis://127.0.0.1:6379",
            "redis://127.0.0.1",
            "REDIS://127.0.0.1:6379/",
            "redis://:s3cret@127.0.0.1:6379/0",
            "redis://127.0.0.1:6379?db=0",
            # The same server by another name (recheck s41), or another
            # server: only the cluster's name and database are compared.
            "redis://localhost:6379/0",
            "redis://10.0.0.2:6379/0",
        ):
            self.assertEqual(Membership.in_directory(self.directory, "openclaw", url).read(), Recorded(GEMINI), url)
        self.assertNotIn("s3cret", (self.directory / MEMBERSHIP_FILE).read_text())
        self.assertEqual(store_identity("unix:///run/redis.sock?db=2"), "unix:///run/redis.sock/2")
        self.assertEqual(store_identity("rediss://[::1]:6380"), "rediss://[::1]:6380/0")

    def test_another_cluster_or_store_not_read(self) -> None:
        """
        A record of another CLUSTER_NAME, or of another Redis database,
        says nothing about this one, and that is said (trial s41: nothing
        was).
        """
        self.successResultOf(self.membership.record(GEMINI))
        events = capture_log_events(self)
        for other in (
            Membership.in_directory(self.directory, "other", "redis://127.0.0.1:6379/0"),
            Membership.in_directory(self.directory, "openclaw", "redis://127.0.0.1:6379/1"),
        ):
            self.assertIsNone(other.read())
        said = [formatEvent(e) for e in events if "counts as a new one" in formatEvent(e)]
        self.assertEqual(len(said), 2, said)
        self.assertIn("records cluster openclaw on redis://127.0.0.1:6379/0, not openclaw in database 1", said[1])

    def test_unreadable_not_read(self) -> None:
        """
        A record that is not JSON, or not a regular file, is "no", said; a
        route of another shape is none.
        """
        events = capture_log_events(self)
        path = self.directory / MEMBERSHIP_FILE
        path.write_bytes(b"\xff{")
        self.assertIsNone(self.membership.read())
        path.unlink()
        path.mkdir()
        self.assertIsNone(self.membership.read())
        said = [formatEvent(e) for e in events if "ignoring" in formatEvent(e)]
        self.assertEqual(len(said), 2, said)
        path.rmdir()
        path.write_text(json.dumps({"cluster_name": "openclaw", "database": 0, "route": ["x"]}))
        self.assertEqual(self.membership.read(), Recorded(None))
        # A record without "database" (an earlier form): its store's "/N".
        path.write_text(json.dumps({"cluster_name": "openclaw", "store": "redis://127.0.0.1:6379/0"}))
        self.assertEqual(self.membership.read(), Recorded(None))

    def test_unwritable_said(self) -> None:
        """
        A record that cannot be written is a warning naming what to fix,
        never a failure.
        """
        events = capture_log_events(self)
        gone = Membership.in_directory(self.directory / "gone", "openclaw", "redis://127.0.0.1:6379/0")
        self.assertFalse(self.successResultOf(gone.record(GEMINI)))
        said = [formatEvent(e) for e in events if "could not record" in formatEvent(e)]
        self.assertEqual(len(said), 1, said)
        self.assertIn("STATE_DIR", said[0])


class HeldWriter:
    """
    A L{openclaw.writer.FileWriter} stand-in on the test's thread: its
    jobs run at once, or, while C{hold} is set, at L{release} (a slow
    disk), in the order asked.
    """

    def __init__(self) -> None:
        self.write_file = write_atomically
        self.hold = False
        self.jobs: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def run(
        self, job: Callable[[], Any], dropped: Callable[[Failure], object] | None = None, what: str = ""
    ) -> Deferred[Any]:
        if self.hold:
            held: Deferred[Any] = Deferred()
            self.jobs.append((job, held))
            return held
        try:
            return succeed(job())
        except Exception:
            return fail(Failure())

    def release(self) -> None:
        self.hold = False
        jobs, self.jobs = self.jobs, []
        for job, held in jobs:
            self.run(job).chainDeferred(held)


class LateEnsures(MemoryStore):
    """
    A L{MemoryStore} whose next C{ensure} of C{late} (once set) is made
    at once and answered only at L{answer}: a reconnecting instance's
    reload whose read is answered late.
    """

    late: str | None = None

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock)
        self.held: tuple[Versioned, Deferred[Versioned]] | None = None

    def ensure(self, name: str, value: str, version: int, origin: str) -> Deferred[Versioned]:
        made = super().ensure(name, value, version, origin)
        if name != self.late:
            return made
        self.late = None
        read = self.successResultOf(made)
        self.held = (read, Deferred())
        return self.held[1]

    @staticmethod
    def successResultOf(made: Deferred[Versioned]) -> Versioned:
        results: list[Versioned] = []
        made.addCallback(results.append)
        return results[0]

    def answer(self) -> None:
        assert self.held is not None
        read, late = self.held
        self.held = None
        late.callback(read)


class LateReads(TestCase):
    """
    A reconnecting instance's reload whose read of the store is answered
    after a newer change reached it (a message published meanwhile):
    the stale read never undoes the change, here or cluster-wide (trial
    s32: a finished rotation rolled back on every instance).
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = LateEnsures(self.clock.seconds)
        directory = Path(self.mktemp())
        directory.mkdir()
        self.token_file = directory / "token"
        self.writer = HeldWriter()
        self.a = self.node("a", token_file=self.token_file, writer=self.writer)
        self.b = self.node("b")
        for node in (self.a, self.b):
            self.store.listeners.append(node.received)
            node.connected()

    def node(self, name: str, **sessions: Any) -> ClusterNode:
        node = ClusterNode(
            self.store,
            ActiveRoute(GEMINI),
            SessionAuthority(SECRET, 3600, clock=self.clock.seconds, **sessions),
            name,
            self.clock,
            1.0,
            ("gemini", "kimi"),
        )
        self.addCleanup(node.stop)
        return node

    def reconnect_late(self, name: str) -> None:
        """
        Node a, cut off from the store, missed a change; it reconnects, and
        its reload's read of C{name} is answered late (L{LateEnsures}).
        """
        self.store.listeners.remove(self.a.received)
        self.a.lost("test")
        self.clock.advance(10)
        if name == TOKEN:
            self.b.rotate(self.b.sessions.mint())
        else:
            self.b.switch(Route("kimi", "k-1"))
        self.clock.advance(10)
        self.store.late = name
        self.store.listeners.append(self.a.received)
        self.a.connected()
        self.assertIsNotNone(self.store.held)

    def assert_token_kept(self, token: Any) -> None:
        """
        After a heartbeat, C{token} is the cluster's, held by a and b, in
        a's token file.
        """
        self.a.beat()
        self.writer.release()
        self.clock.advance(2)
        self.assertEqual(decode_token(self.store.values[TOKEN].value).jti, token.jti)
        self.assertEqual(self.b.sessions.current, token)
        self.assertEqual(self.a.sessions.current, token)
        self.assertEqual(self.token_file.read_text().strip(), token.token)
        self.assertTrue(self.a.up)

    def test_late_read_while_adopting_a_newer_token(self) -> None:
        """
        The reload's read answers the rotation a missed (version 2) once a
        newer rotation (version 3) is being adopted (its token file being
        written): neither the version-2 token nor a's first one is
        adopted or written back; version 3 stays the cluster's.
        """
        self.reconnect_late(TOKEN)
        self.writer.hold = True
        newest = self.successResultOf(self.b.rotate(self.b.sessions.mint()))
        self.assertEqual(len(self.writer.jobs), 1)  # a adopting it
        self.store.answer()
        self.writer.release()
        self.assertEqual(self.a.sessions.current, newest)
        self.assertEqual(self.a.versions[TOKEN], 3)
        self.assert_token_kept(newest)

    def test_late_read_after_a_newer_token_adopted(self) -> None:
        """
        The same, the newer token's file written at once: a's first token
        (its record taken before the read) is not written back over it.
        """
        self.reconnect_late(TOKEN)
        newest = self.successResultOf(self.b.rotate(self.b.sessions.mint()))
        self.assertEqual(self.a.sessions.current, newest)
        self.store.answer()
        self.assertEqual(self.a.sessions.current, newest)
        self.assert_token_kept(newest)

    def test_adoption_failure_logged_once_its_rotation_cut_short(self) -> None:
        """
        A rotation cut short (its command cancelled at the stop) while the
        token file is written, whose write then fails: logged, as nothing
        else would say it; the previous token stays.
        """
        first = self.a.sessions.current
        # Its directory gone, a file in its place: the write fails.
        shutil.rmtree(self.token_file.parent)
        self.token_file.parent.write_text("not a directory")
        self.writer.hold = True
        events = capture_log_events(self)
        rotating = self.a.rotate(self.a.sessions.mint())
        rotating.cancel()
        self.failureResultOf(rotating, CancelledError)
        self.writer.release()
        self.assertEqual(self.a.sessions.current, first)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        said = [formatEvent(event) for event in events]
        self.assertTrue(any(text.startswith("could not adopt the cluster's session token") for text in said), said)

    def test_late_read_after_a_newer_route_applied(self) -> None:
        """
        The reload's read answers the switch a missed (version 2) once a
        newer switch (version 3) was applied: a's first route is not
        written back over it.
        """
        self.reconnect_late(ROUTE)
        newest = Route("kimi", "k-2")
        self.successResultOf(self.b.switch(newest))
        self.assertEqual(self.a.route.current, newest)
        self.store.answer()
        self.a.beat()
        self.clock.advance(2)
        self.assertEqual(self.store.values[ROUTE].version, 3)
        for node in (self.a, self.b):
            self.assertEqual((node.instance, node.route.current), (node.instance, newest))
        self.assertTrue(self.a.up)


class EverStale(TestCase):
    """
    A reload whose every read of the route is answered after another
    switch was applied here (switches faster than the store answers):
    it gives up after L{MAX_STALE_READS} reads, says so, and tries again
    later, rather than read for ever with nothing logged (review s32).
    """

    def test_gives_up_and_tries_again(self) -> None:
        clock = Clock()
        clock.advance(1_800_000_000)
        store = MemoryStore(clock.seconds)
        nodes = []
        for name in ("a", "b"):
            node = ClusterNode(
                store,
                ActiveRoute(GEMINI),
                SessionAuthority(SECRET, 3600, clock=clock.seconds),
                name,
                clock,
                1.0,
                ("gemini", "kimi"),
            )
            self.addCleanup(node.stop)
            store.listeners.append(node.received)
            node.connected()
            nodes.append(node)
        a, b = nodes
        events = capture_log_events(self)
        reads = []
        ensure = store.ensure

        def changing(name: str, value: str, version: int, origin: str) -> Deferred[Versioned]:
            read = ensure(name, value, version, origin)
            if name == ROUTE and origin == "a" and len(reads) < MAX_STALE_READS:
                # A newer switch reaches a before its read is answered.
                reads.append(version)
                b.switch(Route("kimi", f"k-{len(reads)}"))
            return read

        store.ensure = changing  # type: ignore[method-assign]
        a.lost("test")
        a.connected()
        self.assertEqual(len(reads), MAX_STALE_READS)
        warned = [formatEvent(e) for e in events if "could not reload" in e.get("log_format", "")]
        self.assertEqual(len(warned), 1, warned)
        self.assertIn(f"changed during each of {MAX_STALE_READS} reads in a row", warned[0])
        # Its next try, once the switches stop, brings it up to date.
        clock.advance(60)
        self.assertEqual(a.route.current, b.route.current)
        self.assertTrue(a.up)


class LostStateOnRedis(ClusterCase):
    @inlineCallbacks
    def test_newcomer_first_after_an_empty_restart(self) -> None:
        """
        A and B (behind a proxy, so that they stay
        away) serve kimi; Redis restarts empty and D, started then,
        reaches it first; A and B come back: every instance serves kimi
        and the operators' token works on D.
        """
        proxy = DelayingProxy(self.redis)
        port = proxy.port.getHost().port
        a = self.spawn(REDIS_URL=proxy.url)
        token = yield a.token
        b = self.spawn(REDIS_URL=proxy.url)
        yield b.token
        on_a = yield self.client(a.port)
        answer = yield on_a.ask(token, "switch_provider", {"provider": "kimi"})
        self.assertTrue(answer["ok"], answer)
        yield printed(b, b"applied the cluster's route kimi/")
        yield proxy.stop()
        self.redis.stop()
        self.redis.start()
        d = self.spawn()
        own = yield d.token
        self.assertNotEqual(own, token)
        proxy.port = reactor.listenTCP(port, proxy.port.factory, interface="127.0.0.1")
        self.addCleanup(proxy.stop)
        yield printed(d, b"applied the cluster's route kimi/")
        # The token is written back after the route: D may apply the one
        # before it adopts the other.
        yield printed(d, b"adopted from the cluster")
        on_d = yield self.client(d.port)
        status = yield self.status_becomes(on_d, token, "kimi")
        self.assertEqual(status["result"]["provider_id"], "kimi")
        for process in (a, b):
            client = yield self.client(process.port)
            status = yield client.ask(token, "status")
            self.assertEqual(status["result"]["provider_id"], "kimi", process.stdout[-3000:])
        self.assertNotIn(b"applied the cluster's route gemini", a.stdout + b.stdout)

    @inlineCallbacks
    def test_restarted_during_an_outage_waits_for_the_write_back(self) -> None:
        """
        Cluster trial s40: A (behind a proxy, so that it stays away) and B
        serve kimi; B stops, Redis restarts empty, and B started again
        with its STATE_DIR reaches it first: it waits, and its banner has
        the operators' token once A writes the cluster's state back (it
        printed a token of its own, and served gemini, for a second or
        two).
        """
        proxy = DelayingProxy(self.redis)
        port = proxy.port.getHost().port
        a = self.spawn(REDIS_URL=proxy.url)
        token = yield a.token
        state_dir = Path(self.mktemp()).absolute()
        state_dir.mkdir()
        b = self.spawn(STATE_DIR=str(state_dir))
        yield b.token
        deadline = time.monotonic() + 10
        while not (state_dir / MEMBERSHIP_FILE).exists():
            self.assertLess(time.monotonic(), deadline, b.stdout[-3000:])
            yield sleep(0.05)
        on_a = yield self.client(a.port)
        answer = yield on_a.ask(token, "switch_provider", {"provider": "kimi"})
        self.assertTrue(answer["ok"], answer)
        yield printed(b, b"applied the cluster's route kimi/")
        yield b.stop()
        yield proxy.stop()
        self.redis.stop()
        self.redis.start()
        again = self.spawn(b.port, b.api_port, STATE_DIR=str(state_dir))
        yield printed(again, b"waiting up to")
        # Its wait said as one for the instances in step, not for Redis
        # (trial s41: "check that Redis is running").
        yield printed(again, b"waiting for the instances in step to write the cluster's state back", seconds=15)
        self.assertNotIn(b"check that Redis is running", again.stdout.split(b"waiting up to")[1])
        proxy.port = reactor.listenTCP(port, proxy.port.factory, interface="127.0.0.1")
        self.addCleanup(proxy.stop)
        token_again = yield again.token
        self.assertEqual(token_again, token)
        self.assertIn(b"cluster store up: route kimi/", again.stdout)
        self.assertNotIn(b"route gemini/", again.stdout)
        answer = yield on_a.ask(token, "ping")
        self.assertTrue(answer["ok"], answer)

    @inlineCallbacks
    def test_record_written_again_once_it_can_be(self) -> None:
        """
        The record in STATE_DIR names the route the instance serves, and
        is written again at each change of the cluster's route: one that
        could not be written (a directory in its place, as a full disk
        does) is written at the next (trial s41: never again in the run).
        """
        state_dir = Path(self.mktemp()).absolute()
        state_dir.mkdir()
        (state_dir / MEMBERSHIP_FILE).mkdir()
        a = self.spawn(STATE_DIR=str(state_dir))
        token = yield a.token
        yield printed(a, b"could not record in")
        (state_dir / MEMBERSHIP_FILE).rmdir()
        client = yield self.client(a.port)
        answer = yield client.ask(token, "switch_provider", {"provider": "kimi"})
        self.assertTrue(answer["ok"], answer)
        deadline = time.monotonic() + 10
        while not (state_dir / MEMBERSHIP_FILE).is_file():
            self.assertLess(time.monotonic(), deadline, a.stdout[-3000:])
            yield sleep(0.05)
        recorded = json.loads((state_dir / MEMBERSHIP_FILE).read_text())
        self.assertEqual(recorded["route"]["provider"], "kimi")
        self.assertEqual(recorded["store"], f"redis://127.0.0.1:{self.redis.port}/0")

    @inlineCallbacks
    def test_flushall_then_a_restart(self) -> None:
        """
        FLUSHALL between heartbeats: the instances write back route and
        token; B restarted afterwards takes them (not a token of its own).
        """
        a = self.spawn()
        token = yield a.token
        b = self.spawn()
        yield b.token
        on_a = yield self.client(a.port)
        answer = yield on_a.ask(token, "switch_provider", {"provider": "kimi"})
        self.assertTrue(answer["ok"], answer)
        yield deferToThread(redis_command, self.redis.port, "FLUSHALL")
        # Whichever instance's heartbeat comes first writes them back.
        deadline = time.monotonic() + 25
        while not (yield deferToThread(redis_command, self.redis.port, "EXISTS", "openclaw:state:token")):
            self.assertLess(time.monotonic(), deadline)
            yield sleep(0.1)
        while not any(b"the cluster store lost the route and token" in p.stdout for p in (a, b)):
            self.assertLess(time.monotonic(), deadline)
            yield sleep(0.1)
        yield b.stop()
        again = self.spawn(b.port, b.api_port)
        token_again = yield again.token
        self.assertEqual(token_again, token)
        on_again = yield self.client(again.port)
        status = yield on_again.ask(token, "status")
        self.assertEqual(status["result"]["provider_id"], "kimi")
        answer = yield on_a.ask(token, "ping")
        self.assertTrue(answer["ok"], answer)

    @inlineCallbacks
    def test_flushall_then_a_newcomer_at_the_same_version(self) -> None:
        """
        Never switched nor rotated (route and token at version 1):
        FLUSHALL, then a newcomer configured for kimi started at once (it
        may reach the emptied Redis before the next heartbeat, writing its
        own at version 1): within a few heartbeats every instance, the
        newcomer included, serves gemini with the operators' token.
        """
        a = self.spawn()
        token = yield a.token
        b = self.spawn()
        yield b.token
        yield deferToThread(redis_command, self.redis.port, "FLUSHALL")
        c = self.spawn(DEFAULT_PROVIDER="kimi")
        yield c.token
        # Either c wrote its own route first and then applied the
        # operators', or a or b wrote theirs back before c read the store
        # (a loaded host: c then starts on it).
        deadline = time.monotonic() + 30
        while b"applied the cluster's route gemini/" not in c.stdout and (
            b"the active provider is gemini/" not in c.stdout
        ):
            self.assertLess(time.monotonic(), deadline, c.stdout[-3000:].decode(errors="replace"))
            yield sleep(0.2)
        deadline = time.monotonic() + 30
        while token not in (
            held := (yield deferToThread(redis_command, self.redis.port, "HGET", "openclaw:state:token", "value")) or ""
        ):
            said = b"\n".join(p.stdout[-4000:] for p in (a, b, c)).decode(errors="replace")
            self.assertLess(time.monotonic(), deadline, f"the store holds {held!r}; the instances said:\n{said}")
            yield sleep(0.2)
        for process in (c, a, b):
            client = yield self.client(process.port)
            status = yield client.ask(token, "status")
            self.assertEqual(status["result"]["provider_id"], "gemini", process.stdout[-3000:])
