"""
The cluster's rpm and tpm windows after an outage of Redis: the calls an
instance counted on its own while Redis was away, and, when Redis came
back empty, those it had counted into it in the last minute, are added to
Redis's windows when the instance reconnects (L{SharedCounters.merge_windows}),
never twice.  Instances in this process (consumer table, counters and
cluster sync each) on one real C{redis-server} and one SQLite database;
the README's own example through two gateways is in
L{tests.test_consumers_cluster}.
"""

from __future__ import annotations

import time
from typing import Any

import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, gatherResults, inlineCallbacks, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from openclaw.consumers.model import Consumer
from openclaw.consumers.prices import PriceTable
from openclaw.consumers.shared import COUNT, MERGE, SEED, SharedConsumers, SharedCounters, WindowLog
from openclaw.consumers.table import ConsumerTable, Holder
from openclaw.dataplane.errors import APIError
from tests.redis_server import RedisServer
from tests.support import sqlite_store_with
from tests.test_consumers_cluster import RedisScripts, redis_command, redis_get
from tests.test_consumers_outage import wait_for

MARKER = "openclaw:consumers:seeded:2"
CREATED = 1000.0


def window(port: int, what: str) -> dict[int, int]:
    """
    Consumer C{team}'s C{what} window (C{rpm}, C{tpm}) in Redis: {second: amount}.
    """
    reply = redis_command(port, "HGETALL", f"openclaw:consumer:team:{CREATED!r}:{what}")
    items = [line for line in reply.split(b"\r\n")[1:] if line and not line.startswith((b"$", b"*"))]
    return {int(at): int(amount) for at, amount in zip(items[::2], items[1::2], strict=True)}


class Instance:
    """
    One instance: its table, counters and cluster sync.
    """

    def __init__(self, table: ConsumerTable, counters: SharedCounters, shared: SharedConsumers) -> None:
        self.table = table
        self.counters = counters
        self.shared = shared

    def admit(self, tokens: int = 0) -> Any:
        """
        One call of C{team} admitted (or refused) now, as the data plane
        asks: fires with the refusal or None, and the holder.
        """
        holder = Holder("team", "p", CREATED)
        decided = self.counters.admit(self.table.consumers["team"], self.table.clock(), holder, 0.0, tokens)
        return decided, holder


class MergedWindowsTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def cluster(self, count: int, **limits: int) -> Any:
        """
        C{count} instances of one cluster, consumer C{team} with C{limits}
        loaded on each and Redis seeded (every instance has seen its
        marker); fires with (instances, Redis server).
        """
        redis = RedisServer()
        redis.start()
        self.addCleanup(redis.cleanup)
        store = yield sqlite_store_with(self, Consumer("team", created_at=CREATED, **limits))
        instances = []
        for n in range(count):
            connection = yield txredisapi.Connection("127.0.0.1", redis.port, reconnect=False, convertNumbers=False)
            self.addCleanup(connection.disconnect)
            scripts = RedisScripts(connection)
            counters = SharedCounters(scripts, reactor, 5.0)
            table = ConsumerTable(store, PriceTable.with_overrides({}), counters=counters)
            shared = SharedConsumers(table, counters, scripts, f"i{n}")
            self.addCleanup(shared.stop)
            yield table.reload()
            shared.up(True)
            yield wait_for(lambda counters=counters: counters.generation is not None, 5)
            instances.append(Instance(table, counters, shared))
        self.assertIsNotNone(redis_get(redis.port, MARKER))
        return instances, redis

    @inlineCallbacks
    def calls(self, instance: Instance, count: int, tokens: int = 0) -> Any:
        """
        C{count} calls admitted on C{instance}, each counted with C{tokens}
        (what Redis took of them has landed when this fires).
        """
        for _ in range(count):
            decided, holder = instance.admit(tokens)
            refused = yield decided
            self.assertIsNone(refused)
            if tokens:
                instance.counters.counted("team", tokens, 0.0, instance.table.clock(), holder)
        # The counts' scripts answered (one connection: in order).
        yield instance.counters.read_spends([instance.table.consumers["team"]], instance.table.clock())

    @inlineCallbacks
    def back(self, instance: Instance, redis: RedisServer, what: str, total: int) -> Any:
        """
        C{instance} reconnects; fires once Redis's C{what} window holds
        C{total}, or fails if it does not within 5 s.
        """
        instance.shared.up(True)
        yield wait_for(lambda: sum(window(redis.port, what).values()) >= total, 5)

    @inlineCallbacks
    def test_redis_back_empty_after_two_instances_counted_alone(self) -> Any:
        """
        rpm 10: 3 calls on each instance into Redis, then Redis away and 2
        more on each alone, then Redis back empty (FLUSHALL, as a restart
        without persistence): each instance, reconnecting one after the
        other, adds its 2 and its 3 lost (the second finds the marker the
        first one's seed wrote: not the one it saw, so Redis lost them
        too).  The window holds the 10 calls; the next is refused (it was
        admitted: the window started empty).
        """
        (a, b), redis = yield self.cluster(2, rpm=10)
        for instance in (a, b):
            yield self.calls(instance, 3)
        self.assertEqual(sum(window(redis.port, "rpm").values()), 6)
        for instance in (a, b):
            instance.shared.up(False)
            yield self.calls(instance, 2)
        redis_command(redis.port, "FLUSHALL")
        yield self.back(a, redis, "rpm", 5)
        yield wait_for(lambda: redis_get(redis.port, MARKER) is not None, 5)
        yield self.back(b, redis, "rpm", 10)
        self.assertEqual(sum(window(redis.port, "rpm").values()), 10)
        refused, _ = b.admit()
        refused = yield refused
        assert isinstance(refused, APIError)
        self.assertEqual((refused.status, refused.type), (429, "requests"))
        # Once only: a reconnection with nothing new merges nothing more.
        a.shared.up(False)
        a.shared.up(True)
        yield self.calls(a, 0)
        self.assertEqual(sum(window(redis.port, "rpm").values()), 10)

    @inlineCallbacks
    def test_redis_emptied_in_place(self) -> Any:
        """
        rpm 10: 4 calls on each instance into Redis, then Redis emptied in
        place (FLUSHALL, no disconnection), which a heartbeat finds
        (L{SharedConsumers.lost}, re-attack s28: the windows stayed empty,
        and a later plain reconnection, finding no marker, added the
        minute again).  Each instance's 4 go back: 8 in the window, the
        spends seeded again (a marker), and a later reconnection adds
        nothing.
        """
        (a, b), redis = yield self.cluster(2, rpm=10)
        for instance in (a, b):
            yield self.calls(instance, 4)
        redis_command(redis.port, "FLUSHALL")
        for instance in (a, b):
            instance.shared.lost()
            yield wait_for(lambda instance=instance: redis_get(redis.port, MARKER) is not None, 5)
        yield wait_for(lambda: sum(window(redis.port, "rpm").values()) >= 8, 5)
        for instance in (a, b):
            instance.shared.up(False)
            instance.shared.up(True)
            yield self.calls(instance, 0)
        self.assertEqual(sum(window(redis.port, "rpm").values()), 8)

    @inlineCallbacks
    def test_redis_back_with_its_data_counts_nothing_twice(self) -> Any:
        """
        rpm 10, Redis away from both instances but not emptied (a network
        outage): the 3 calls each counted into it before are not added
        again, only the 2 and 1 they counted alone; a second of more than
        a minute ago is never added.  9 of 10 used: one more call, then a
        refusal.
        """
        (a, b), redis = yield self.cluster(2, rpm=10)
        for instance in (a, b):
            yield self.calls(instance, 3)
        for instance in (a, b):
            instance.shared.up(False)
        yield self.calls(a, 2)
        yield self.calls(b, 1)
        a.counters.away.add(("team", CREATED), int(time.time()) - 61, requests=5)
        yield self.back(a, redis, "rpm", 8)
        yield self.back(b, redis, "rpm", 9)
        yield self.calls(a, 0)
        self.assertEqual(sum(window(redis.port, "rpm").values()), 9)
        decided, holder = a.admit()
        self.assertIsNone((yield decided))
        # The answer's x-ratelimit-* headers read the merged window.
        assert holder.rate_limits is not None
        self.assertEqual(holder.rate_limits.remaining_requests, 0)
        refused, _ = b.admit()
        refused = yield refused
        assert isinstance(refused, APIError)
        self.assertEqual(refused.type, "requests")

    @inlineCallbacks
    def test_tokens_merged_likewise(self) -> Any:
        """
        tpm 100: 30 tokens counted into Redis, then 40 counted alone while
        it was away.  Redis back with its data: 70 in its window (the 30
        not twice).  Then 30 more counted alone, and Redis back empty: the
        30 added, and the 70 Redis had in the minute (counted into it, or
        merged into it), lost with it: 100 of 100, the next call refused.
        """
        [a], redis = yield self.cluster(1, tpm=100)
        yield self.calls(a, 1, tokens=30)
        self.assertEqual(sum(window(redis.port, "tpm").values()), 30)
        a.shared.up(False)
        yield self.calls(a, 1, tokens=40)
        yield self.back(a, redis, "tpm", 70)
        # The merge's answer is in (a read after it, on one connection).
        yield self.calls(a, 0)
        self.assertEqual(sum(window(redis.port, "tpm").values()), 70)
        a.shared.up(False)
        yield self.calls(a, 1, tokens=30)
        redis_command(redis.port, "FLUSHALL")
        yield self.back(a, redis, "tpm", 100)
        yield self.calls(a, 0)
        self.assertEqual(sum(window(redis.port, "tpm").values()), 100)
        refused, _ = a.admit(10)
        refused = yield refused
        assert isinstance(refused, APIError)
        self.assertEqual((refused.status, refused.type), (429, "tokens"))


class _FailingOnce:
    """
    A Redis whose first L{MERGE} fails (its connection lost meanwhile);
    every script is recorded as (source, keys, args).
    """

    def __init__(self) -> None:
        self.scripts: list[tuple[str, list[str], list[str]]] = []
        self.merges = 0

    def key(self, *parts: str) -> str:
        return ":".join(("openclaw", *parts))

    def script(self, source: str, keys: list[str], args: list[str]) -> Any:
        self.scripts.append((source, keys, args))
        if source == MERGE:
            self.merges += 1
            if self.merges == 1:
                return fail(ConnectionDone("lost"))
            return succeed([0, "g1", "2", "0"])
        return succeed([0, "g1"] if source == SEED else 1)

    def publish_consumer(self, instance: str, name: str) -> Any:
        return succeed(1)

    def revokes(self) -> Deferred[Any]:
        return succeed({})


class _Table:
    loaded = True

    def __init__(self, clock: Clock) -> None:
        self.clock = clock.seconds

    def refresh(self) -> None:
        pass

    def load_unwritten(self) -> Any:
        return Deferred()  # the seed: not the point here

    def adopt_revokes(self, revokes: dict[str, tuple[str, str]]) -> None:
        pass


class MergeFailsTests(TestCase):
    def test_failed_merge_tried_again_when_redis_is_back(self) -> None:
        """
        A merge that fails keeps its calls, merged with the next
        reconnection's (the seconds still within the minute only, never
        one older); once merged, a call is counted as in Redis, added
        again only if Redis loses it.
        """
        clock = Clock()
        clock.advance(10_000)
        redis = _FailingOnce()
        counters = SharedCounters(redis, clock, 1.0)  # type: ignore[arg-type]
        shared = SharedConsumers(_Table(clock), counters, redis, "a")  # type: ignore[arg-type]
        team = Consumer("team", rpm=10, created_at=CREATED)
        shared.up(False)
        self.assertIsNone(counters.admit(team, clock.seconds(), Holder("team", "p", CREATED)))
        clock.advance(30)
        self.assertIsNone(counters.admit(team, clock.seconds(), Holder("team", "p", CREATED)))
        shared.up(True)
        self.assertEqual(redis.merges, 1)
        self.assertTrue(counters.unmerged())
        shared.up(False)
        clock.advance(40)  # the first call is now 70 s old
        shared.up(True)
        self.assertEqual(redis.merges, 2)
        merge = [args for source, _, args in redis.scripts if source == MERGE]
        self.assertEqual(merge[0][2:], ["10000:1 10030:1", "", "", ""])
        self.assertEqual(merge[1][2:], ["10030:1", "", "", ""])
        self.assertFalse(counters.unmerged())
        # Merged, it is in Redis: on the next reconnection, added again
        # only if Redis lost it (the script's choice, by its marker).
        shared.up(False)
        shared.up(True)
        merge = [args for source, _, args in redis.scripts if source == MERGE]
        self.assertEqual(merge[2][1:], ["=g1", "", "", "10030:1", ""])


class MergeScriptTests(TestCase):
    """
    L{MERGE} itself, on a real C{redis-server}: every consumer's arguments
    read at its own place, and what an instance that never saw the marker
    adds.
    """

    timeout = 30

    @inlineCallbacks
    def scripts(self) -> Any:
        redis = RedisServer()
        redis.start()
        self.addCleanup(redis.cleanup)
        connection = yield txredisapi.Connection("127.0.0.1", redis.port, reconnect=False, convertNumbers=False)
        self.addCleanup(connection.disconnect)
        return RedisScripts(connection), redis

    @inlineCallbacks
    def test_two_consumers(self) -> Any:
        """
        Two consumers' requests and tokens, counted while Redis was away
        and before (lost: the marker is another), each land in their own
        windows.
        """
        scripts, redis = yield self.scripts()
        now = int(time.time())
        redis_command(redis.port, "SET", MARKER, "new")
        keys = [MARKER, "w:a:rpm", "w:a:tpm", "w:b:rpm", "w:b:tpm"]
        args = [str(now), "=old", f"{now}:1", f"{now}:10", f"{now - 1}:2", "", f"{now}:3", "", "", f"{now - 2}:40"]
        reply = yield scripts.script(MERGE, keys, args)
        lost, marker, requests, tokens = (value.decode() if isinstance(value, bytes) else str(value) for value in reply)
        self.assertEqual((lost, marker, requests, tokens), ("1", "new", "6", "50"))
        for key, expected in (
            ("w:a:rpm", {now: 1, now - 1: 2}),
            ("w:a:tpm", {now: 10}),
            ("w:b:rpm", {now: 3}),
            ("w:b:tpm", {now - 2: 40}),
        ):
            found = yield scripts.connection.hgetall(key)
            self.assertEqual({int(at): int(amount) for at, amount in found.items()}, expected, key)

    @inlineCallbacks
    def test_never_saw_a_marker(self) -> Any:
        """
        An instance that never saw the marker (its seed never ran) cannot
        tell whether Redis lost what it counted into it: it adds only what
        Redis never had, marker or none.
        """
        scripts, redis = yield self.scripts()
        now = int(time.time())
        for marker in (None, "some"):
            if marker is not None:
                redis_command(redis.port, "SET", MARKER, marker)
            key = f"w:{marker}:rpm"
            reply = yield scripts.script(
                MERGE, [MARKER, key, key + "t"], [str(now), "", f"{now}:1", "", f"{now}:5", ""]
            )
            self.assertEqual(int(reply[0]), 0)
            found = yield scripts.connection.hgetall(key)
            self.assertEqual({int(at): int(amount) for at, amount in found.items()}, {now: 1})


class WindowLogTests(TestCase):
    def test_idle_consumers_dropped(self) -> None:
        """
        A consumer no longer called keeps nothing past a minute: the log
        drops every consumer's older seconds as new ones come.
        """
        log = WindowLog()
        log.add(("idle", CREATED), 1000, requests=1)
        log.add(("busy", CREATED), 1030, requests=1)
        self.assertEqual(set(log.counts), {("idle", CREATED), ("busy", CREATED)})
        log.add(("busy", CREATED), 1061, requests=1)
        self.assertEqual(log.counts, {("busy", CREATED): {1030: [1, 0], 1061: [1, 0]}})


class WindowSpanTests(TestCase):
    """
    How long a cluster's windows count a call, on a real C{redis-server},
    the second each admission runs at given (L{ADMIT}'s C{now}): the
    field of second K holds the calls made in [K, K + 1), so it counts
    until K + 61, never less than 60 s after any of its calls (trial s32:
    the field left at K + 60, so calls made at K.3 and at K + 60.05, 59.75
    s apart, were each admitted up to C{rpm}: twice it within a minute).
    """

    timeout = 30

    @inlineCallbacks
    def counters(self) -> Any:
        redis = RedisServer()
        redis.start()
        self.addCleanup(redis.cleanup)
        connection = yield txredisapi.Connection("127.0.0.1", redis.port, reconnect=False, convertNumbers=False)
        self.addCleanup(connection.disconnect)
        counters = SharedCounters(RedisScripts(connection), reactor, 5.0)
        counters.up = True
        return counters

    @inlineCallbacks
    def burst(self, counters: SharedCounters, consumer: Consumer, now: float, count: int = 12) -> Any:
        """
        C{count} calls of C{consumer} at once at C{now}: fires with their
        refusals (None: admitted) and holders.
        """
        holders = [Holder(consumer.name, "p", CREATED) for _ in range(count)]
        answers = yield gatherResults([counters.admit(consumer, now, holder) for holder in holders])
        return answers, holders

    @inlineCallbacks
    def test_rpm_burst_a_minute_later(self) -> Any:
        """
        rpm 10, 12 calls at K.3 (10 admitted) and 12 more at K + 60.05:
        all refused, Retry-After 1 (the field of K leaves at K + 61); at
        K + 30, Retry-After 31; at K + 61 the next 10 are admitted, the
        11th told 60 s (a minute at most: an SDK sleeps through it; told
        61, the openai SDK raised at once, trial s40), and an admitted
        call's reset is the 61 s its second counts.
        """
        counters = yield self.counters()
        team = Consumer("team", rpm=10, created_at=CREATED)
        second = int(time.time())
        answers, holders = yield self.burst(counters, team, second + 0.3)
        self.assertEqual([answer is None for answer in answers], [True] * 10 + [False] * 2)
        rate_limits = holders[0].rate_limits
        assert rate_limits is not None
        # The window is empty again once the field of K leaves, at K + 61.
        self.assertAlmostEqual(rate_limits.reset_requests, 60.7)
        self.assertIn((b"x-ratelimit-reset-requests", b"1m1s"), rate_limits.headers())
        for at, retry in ((second + 30.5, b"31"), (second + 60.05, b"1"), (second + 60.95, b"1")):
            answers, _ = yield self.burst(counters, team, at)
            self.assertEqual([answer is None for answer in answers], [False] * 12, at - second)
            refused = answers[0]
            assert isinstance(refused, APIError)
            self.assertEqual((refused.status, refused.type), (429, "requests"))
            self.assertEqual(dict(refused.headers)[b"Retry-After"], retry, at - second)
        answers, _ = yield self.burst(counters, team, second + 61.0)
        self.assertEqual([answer is None for answer in answers], [True] * 10 + [False] * 2)
        refused = answers[-1]
        assert isinstance(refused, APIError)
        self.assertEqual(dict(refused.headers)[b"Retry-After"], b"60")
        self.assertNotIn(b"x-should-retry", dict(refused.headers))

    @inlineCallbacks
    def test_tpm_tokens_a_minute_later(self) -> Any:
        """
        tpm 100: 100 tokens counted at K.9; a call at K + 60 is refused
        (Retry-After 1), one at K + 61 admitted.
        """
        counters = yield self.counters()
        team = Consumer("team", tpm=100, created_at=CREATED)
        second = int(time.time())
        holder = Holder("team", "p", CREATED)
        self.assertIsNone((yield counters.admit(team, second + 0.9, holder, 0.0, 10)))
        counters.counted("team", 100, 0.0, second + 0.9, holder)
        # The count's script has run (one connection: in order).
        yield counters.read_spends([team], second + 0.9)
        refused = yield counters.admit(team, second + 60.2, Holder("team", "p", CREATED), 0.0, 10)
        assert isinstance(refused, APIError)
        self.assertEqual((refused.type, dict(refused.headers)[b"Retry-After"]), ("tokens", b"1"))
        admitted = yield counters.admit(team, second + 61.0, Holder("team", "p", CREATED), 0.0, 10)
        self.assertIsNone(admitted)

    @inlineCallbacks
    def test_merge_and_count_keep_what_the_window_counts(self) -> Any:
        """
        What an instance adds to a window after an outage (L{MERGE}) and a
        request a count brings (L{COUNT}) go in while the window still
        counts their second (60 s ago: yes; 61 s ago: no), and the key
        lives past its newest field's 61 s.
        """
        counters = yield self.counters()
        redis = counters.redis
        now = int(time.time())
        keys = [MARKER, "w:rpm", "w:tpm"]
        args = [str(now), "", f"{now - 61}:1 {now - 60}:2", f"{now - 61}:10 {now - 60}:20", "", ""]
        reply = yield redis.script(MERGE, keys, args)
        self.assertEqual([int(value) for value in reply[2:4]], [2, 20])
        connection = redis.connection  # type: ignore[attr-defined]
        self.assertEqual((yield connection.hgetall("w:rpm")), {str(now - 60): "2"})
        self.assertEqual(int((yield connection.ttl("w:rpm"))), 62)
        count = [MARKER, "c:tpm", "c:r", "c:d", "c:m", "c:t", "c:rt", "c:rpm"]
        for request_at in (now - 61, now - 60):
            yield redis.script(COUNT, count, [str(now), "0", "0", "0", "0", "0", str(request_at)])
        self.assertEqual((yield connection.hgetall("c:rpm")), {str(now - 60): "1"})
        self.assertEqual(int((yield connection.ttl("c:rpm"))), 62)
