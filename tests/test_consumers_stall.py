"""
A cluster instance whose event loop stood still answers no consumer key
from its table until it has reloaded it (L{openclaw.consumers.freshness}).
The stall is simulated: the watch's clock is moved on while the reactor's
calls do not run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from openclaw.consumers.freshness import (
    CATCH_UP_SECONDS,
    RETRY_MAX_SECONDS,
    RETRY_SECONDS,
    STALL_SECONDS,
    TICK_SECONDS,
    StallWatch,
)
from openclaw.consumers.model import Consumer, NewKey
from openclaw.consumers.prices import PriceTable
from openclaw.consumers.store import ConsumerStore, Snapshot
from openclaw.consumers.table import ConsumerTable, Holder
from openclaw.dataplane.auth import GatewayKeys
from openclaw.dataplane.errors import APIError
from tests.support import capture_log_events
from tests.test_consumers import GatewayCase, http_get

GATEWAY_KEY = "ock-gateway-key-0123456789"


class Monotonic:
    """
    A monotonic clock moved by hand, counting its reads.
    """

    def __init__(self) -> None:
        self.now = 1000.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


class HeldStore:
    """
    A store whose loads each wait on a Deferred of their own (C{loads}).
    """

    def __init__(self) -> None:
        self.loads: list[Deferred[Snapshot]] = []

    def load(self, now: float) -> Deferred[Snapshot]:
        loading: Deferred[Snapshot] = Deferred()
        self.loads.append(loading)
        return loading


def snapshot() -> Snapshot:
    return Snapshot({}, {}, {})


class WatchCase(TestCase):
    """
    A watch on a table whose loads wait on the test, the loop driven by hand.
    """

    def setUp(self) -> None:
        self.reactor = Clock()
        self.monotonic = Monotonic()
        self.store = HeldStore()
        self.table = ConsumerTable(self.store, PriceTable.with_overrides({}), clock=self.reactor.seconds)  # type: ignore[arg-type]
        self.table.loaded = True
        # A stall goes on the wall clock too: the same clock here.
        self.watch = StallWatch(self.table, self.reactor, self.monotonic, wall=self.monotonic)
        self.table.stall_watch = self.watch
        self.watch.start()
        self.addCleanup(self.watch.stop)
        self.events = capture_log_events(self)

    def run_loop(self, seconds: float) -> None:
        """
        A healthy loop: both clocks go on, the marks run.
        """
        step = TICK_SECONDS / 2
        for _ in range(round(seconds / step)):
            self.monotonic.now += step
            self.reactor.advance(step)

    def stalls_said(self) -> list[str]:
        return [e["log_format"] for e in self.events if "stood still" in e.get("log_format", "")]


class StallWatchTests(WatchCase):
    def test_healthy_loop_no_reload_one_clock_read(self) -> None:
        """
        A busy loop (marks TICK_SECONDS apart, a key presented just before
        STALL_SECONDS since the last): no stall, no reload, one clock read
        per check.
        """
        self.run_loop(10)
        self.monotonic.now += STALL_SECONDS - 0.01
        reads = self.monotonic.reads
        self.assertFalse(self.watch.behind())
        self.assertEqual(self.monotonic.reads, reads + 1)
        self.assertEqual(self.store.loads, [])
        self.assertEqual(self.stalls_said(), [])

    def test_stall_found_by_a_key_held_until_reloaded(self) -> None:
        """
        A key presented more than STALL_SECONDS after the last mark: held
        (and no clock read while the reload is under way) until a reload
        begun then has ended; said once.
        """
        self.run_loop(1)
        self.monotonic.now += 2.5
        self.assertTrue(self.watch.behind())
        [loading] = self.store.loads
        reads = self.monotonic.reads
        self.assertTrue(self.watch.behind())
        self.assertTrue(self.watch.behind())
        self.assertEqual(self.monotonic.reads, reads)
        # The marks come again: still held.
        self.run_loop(1)
        self.assertTrue(self.watch.behind())
        self.assertEqual(len(self.store.loads), 1)
        loading.callback(snapshot())
        self.assertFalse(self.watch.behind())
        [said] = self.stalls_said()
        self.assertEqual(self.events[-1]["seconds"], 2.5)
        self.assertEqual(self.watch.stalls, 1)

    def test_stall_found_by_the_mark(self) -> None:
        """
        No key needs to come: the late mark starts the reload.
        """
        self.monotonic.now += 3
        self.reactor.advance(TICK_SECONDS)
        self.assertEqual(len(self.store.loads), 1)
        self.assertTrue(self.watch.behind())
        self.store.loads[0].callback(snapshot())
        self.assertFalse(self.watch.behind())

    def test_reload_under_way_before_the_stall_does_not_end_it(self) -> None:
        """
        A reload begun before the stall may have read the database before
        the change: the wait ends with the one begun after.
        """
        self.table.refresh()
        [before] = self.store.loads
        self.monotonic.now += 3
        self.assertTrue(self.watch.behind())
        before.callback(snapshot())
        self.assertTrue(self.watch.behind())
        [_, after] = self.store.loads
        after.callback(snapshot())
        self.assertFalse(self.watch.behind())

    def test_failed_reload_serves_the_table_as_it_was(self) -> None:
        """
        A reload that fails: keys are served again, and that is said.
        """
        self.monotonic.now += 3
        self.assertTrue(self.watch.behind())
        self.store.loads[0].errback(OSError("connection refused"))
        self.flushLoggedErrors(OSError)
        self.assertFalse(self.watch.behind())
        self.assertTrue(
            any("could not be reloaded after the event loop" in e.get("log_format", "") for e in self.events)
        )

    def test_reload_that_does_not_end_waited_for_catch_up_seconds(self) -> None:
        """
        A database that does not answer holds keys CATCH_UP_SECONDS at
        most; its late answer changes nothing.
        """
        self.monotonic.now += 3
        self.assertTrue(self.watch.behind())
        self.run_loop(CATCH_UP_SECONDS - 0.25)
        self.assertTrue(self.watch.behind())
        self.run_loop(0.5)
        self.assertFalse(self.watch.behind())
        self.assertTrue(any("has not ended in" in e.get("log_format", "") for e in self.events))
        self.store.loads[0].callback(snapshot())
        self.assertFalse(self.watch.behind())

    def test_nothing_before_the_first_load_nor_after_stop(self) -> None:
        """
        Before the first load (keys answered 503 consumers_loading anyway)
        and after stop: nothing is held, nothing reloaded.
        """
        self.table.loaded = False
        self.monotonic.now += 3
        self.assertFalse(self.watch.behind())
        self.table.loaded = True
        self.watch.stop()
        self.monotonic.now += 3
        self.assertFalse(self.watch.behind())
        self.assertEqual(self.store.loads, [])


class RetryTests(WatchCase):
    """
    A reload after a stall that fails is tried again until one succeeds,
    and the instance reports itself not ready meanwhile (before, the
    table stayed as it was until the next change elsewhere: a revoked key
    went on working here for as long).
    """

    def fail_load(self, index: int) -> None:
        self.store.loads[index].errback(OSError("connection refused"))
        self.flushLoggedErrors(OSError)

    def said(self, words: str) -> int:
        return sum(words in e.get("log_format", "") for e in self.events)

    def test_tried_again_until_it_succeeds(self) -> None:
        self.assertIsNone(self.watch.unready())
        self.monotonic.now += 3
        self.assertTrue(self.watch.behind())
        self.assertIn("being reloaded", self.watch.unready() or "")
        self.fail_load(0)
        # Keys served from the table as it was; not ready for a balancer.
        self.assertFalse(self.watch.behind())
        self.assertIn("could not be reloaded", self.watch.unready() or "")
        # Tried again after RETRY_SECONDS, then twice as long, up to RETRY_MAX_SECONDS.
        waits = []
        for index in range(1, 8):
            before = self.reactor.seconds()
            while len(self.store.loads) == index:
                self.run_loop(0.25)
            waits.append(round(self.reactor.seconds() - before))
            self.fail_load(index)
        self.assertEqual(waits, [1, 2, 4, 8, 16, 30, 30][: len(waits)])
        self.assertEqual(waits[0], RETRY_SECONDS)
        self.assertEqual(max(waits), RETRY_MAX_SECONDS)
        # Said once, not per try.
        self.assertEqual(self.said("could not be reloaded after the event loop"), 1)
        while len(self.store.loads) == 8:
            self.run_loop(0.25)
        self.store.loads[8].callback(snapshot())
        self.assertIsNone(self.watch.unready())
        self.assertFalse(self.watch.behind())
        self.assertEqual(self.said("in step again"), 1)
        # No more tries.
        self.run_loop(60)
        self.assertEqual(len(self.store.loads), 9)

    def test_late_reload_not_ready_until_it_ends(self) -> None:
        """
        A reload that has not ended in CATCH_UP_SECONDS lets keys through,
        but the instance is not ready until it has succeeded.
        """
        self.monotonic.now += 3
        self.assertTrue(self.watch.behind())
        self.run_loop(CATCH_UP_SECONDS + 0.5)
        self.assertFalse(self.watch.behind())
        self.assertIsNotNone(self.watch.unready())
        self.store.loads[0].callback(snapshot())
        self.assertIsNone(self.watch.unready())
        self.assertEqual(self.said("in step again"), 1)

    def test_a_new_stall_replaces_the_try(self) -> None:
        self.monotonic.now += 3
        self.assertTrue(self.watch.behind())
        self.fail_load(0)
        # Another stall before the next try: reloaded at once, the try dropped.
        self.monotonic.now += 3
        self.assertTrue(self.watch.behind())
        self.assertEqual(len(self.store.loads), 2)
        self.store.loads[1].callback(snapshot())
        self.assertIsNone(self.watch.unready())
        self.run_loop(5)
        self.assertEqual(len(self.store.loads), 2)

    def until_load(self, count: int) -> None:
        """
        Run the loop until the store has been asked for C{count} loads.
        """
        while len(self.store.loads) < count:
            self.run_loop(0.25)

    def test_tries_again_logged_once(self) -> None:
        """
        The table logs the failure of the reload begun for the stall, not
        that of each try again (before: a critical line per try, every
        30 s for as long as the database is unreachable); a reload for a
        change elsewhere that fails meanwhile is logged as ever.
        """
        table_line = "could not reload the consumers after a change elsewhere"
        self.monotonic.now += 3
        self.assertTrue(self.watch.behind())
        self.fail_load(0)
        for index in range(1, 6):
            self.until_load(index + 1)
            self.fail_load(index)
        self.assertEqual(self.said(table_line), 1)
        self.assertEqual(self.said("could not be reloaded after the event loop"), 1)
        # A change elsewhere while a try is waited for: its reload's failure is said.
        self.table.refresh()
        self.fail_load(6)
        self.assertEqual(self.said(table_line), 2)
        self.assertIsNotNone(self.watch.unready())
        # A change's reload waiting behind a try: the try's failure is not
        # said, the change's is.
        self.until_load(8)
        self.table.refresh()
        self.fail_load(7)
        self.assertEqual(self.said(table_line), 2)
        self.fail_load(8)
        self.assertEqual(self.said(table_line), 3)

    def test_a_reload_for_a_change_ends_the_tries(self) -> None:
        """
        After the reload for the stall failed, a reload begun for a change
        elsewhere (L{SharedConsumers.received}) that succeeds brings the
        table in step: ready at once, no more tries (before, not ready
        until the next try, up to RETRY_MAX_SECONDS later).  One that
        fails ends nothing.
        """
        self.monotonic.now += 3
        self.assertTrue(self.watch.behind())
        self.fail_load(0)
        for index in range(1, 5):
            self.until_load(index + 1)
            self.fail_load(index)
        # Tries 8 s apart now: a change comes meanwhile, its reload fails.
        self.table.refresh()
        self.fail_load(5)
        self.assertIsNotNone(self.watch.unready())
        self.table.refresh()
        self.store.loads[6].callback(snapshot())
        self.assertIsNone(self.watch.unready())
        self.assertEqual(self.said("in step again"), 1)
        self.run_loop(60)
        self.assertEqual(len(self.store.loads), 7)
        # A stall after that is caught up with as ever.
        self.monotonic.now += 3
        self.assertTrue(self.watch.behind())
        self.store.loads[7].callback(snapshot())
        self.assertIsNone(self.watch.unready())

    def test_a_try_under_way_when_a_change_reload_ends_the_tries(self) -> None:
        """
        A try waiting behind a change's reload that succeeds: its own end,
        success or not, no longer counts.
        """
        self.monotonic.now += 3
        self.assertTrue(self.watch.behind())
        self.fail_load(0)
        self.table.refresh()
        # The try comes while the change's reload (load 1) runs: it waits for the next.
        self.run_loop(1.25)
        self.store.loads[1].callback(snapshot())
        self.assertIsNone(self.watch.unready())
        self.fail_load(2)
        self.assertIsNone(self.watch.unready())
        self.run_loop(60)
        self.assertEqual(len(self.store.loads), 3)
        self.assertEqual(self.said("could not be reloaded after the event loop"), 1)

    def test_a_reload_begun_before_the_stall_does_not_end_it(self) -> None:
        """
        A reload under way when the stall was found, and ending after the
        wait for keys (CATCH_UP_SECONDS): not ready still, until the one
        begun after it has succeeded.
        """
        self.table.refresh()
        self.monotonic.now += 3
        self.assertTrue(self.watch.behind())
        self.run_loop(CATCH_UP_SECONDS + 0.5)
        self.store.loads[0].callback(snapshot())
        self.assertIsNotNone(self.watch.unready())
        self.fail_load(1)
        self.assertIsNotNone(self.watch.unready())
        self.until_load(3)
        self.store.loads[2].callback(snapshot())
        self.assertIsNone(self.watch.unready())

    def test_stop_ends_the_tries(self) -> None:
        self.monotonic.now += 3
        self.assertTrue(self.watch.behind())
        self.fail_load(0)
        self.watch.stop()
        self.assertIsNone(self.watch.unready())
        self.reactor.advance(60)
        self.assertEqual(len(self.store.loads), 1)


class WallClockSetBackTests(TestCase):
    def test_no_stall(self) -> None:
        """
        The wall clock set back holds the marks (the reactor's timers go by
        it) while the boot clock goes on: no stall, nothing reloaded,
        nothing held (review s34: five false stalls in ten seconds).  A
        stall then (both clocks on) is still one.
        """
        reactor_clock, boot = Clock(), Monotonic()
        store = HeldStore()
        table = ConsumerTable(store, PriceTable.with_overrides({}), clock=reactor_clock.seconds)  # type: ignore[arg-type]
        table.loaded = True
        watch = StallWatch(table, reactor_clock, boot)
        watch.start()
        self.addCleanup(watch.stop)
        # Ten seconds of boot clock with the wall clock held back: no mark runs.
        for _ in range(100):
            boot.now += 0.1
            self.assertFalse(watch.behind())
        self.assertEqual(store.loads, [])
        self.assertEqual(watch.stalls, 0)
        # The wall clock back where it was: the marks run again.
        for _ in range(8):
            boot.now += 0.125
            reactor_clock.advance(0.125)
        self.assertEqual(watch.stalls, 0)
        # A stall: both clocks on, nothing run.
        boot.now += 3
        reactor_clock.rightNow += 3
        self.assertTrue(watch.behind())
        self.assertEqual(watch.stalls, 1)


class RevokedWhileFrozenTests(TestCase):
    """
    Two tables on one database: A revokes a key while B's loop stands still.
    """

    @inlineCallbacks
    def setUp(self) -> Any:
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        self.stores = []
        for _ in range(2):
            store = ConsumerStore.open(None, directory, reactor)
            self.addCleanup(store.close)
            self.stores.append(store)
        yield self.stores[0].migrate()
        self.a, self.b = (ConsumerTable(store, PriceTable.with_overrides({})) for store in self.stores)
        yield self.a.reload()
        self.key = yield self.a.create(Consumer("team"))
        yield self.b.reload()
        self.monotonic = Monotonic()
        self.watch = StallWatch(self.b, reactor, self.monotonic, wall=self.monotonic)
        self.b.stall_watch = self.watch
        self.watch.start()
        self.addCleanup(self.watch.stop)
        self.keys = GatewayKeys.of([GATEWAY_KEY], self.b)
        self.loads = 0
        load = self.stores[1].load

        def counted(now: float) -> Deferred[Snapshot]:
            self.loads += 1
            return load(now)

        self.stores[1].load = counted  # type: ignore[method-assign]

    def identify(self, key: str) -> Holder | APIError:
        return self.keys.identify(f"Bearer {key}".encode())

    @inlineCallbacks
    def caught_up(self) -> Any:
        for _ in range(100):
            if not self.watch.behind():
                return
            yield deferLater(reactor, 0.02, lambda: None)
        self.fail("not caught up in 2 s")

    @inlineCallbacks
    def test_key_revoked_while_frozen_refused_right_after_resume(self) -> Any:
        key: NewKey = self.key
        self.assertIsInstance(self.identify(key.key), Holder)
        # Frozen: B's loop runs nothing while A revokes.
        yield self.a.revoke_key("team", key.prefix)
        self.monotonic.now += 2.5
        # Resumed: its first request, before any Redis message.
        refused = self.identify(key.key)
        assert isinstance(refused, APIError)
        self.assertEqual((refused.status, refused.code, refused.retry_after), (503, "consumers_catching_up", 1))
        self.assertIn("catching up with the cluster", str(refused))
        # A key of GATEWAY_API_KEYS (even one that looks like a consumer's) is served meanwhile.
        self.assertEqual(self.identify(GATEWAY_KEY).consumer, "-")  # type: ignore[union-attr]
        yield self.caught_up()
        refused = self.identify(key.key)
        assert isinstance(refused, APIError)
        self.assertEqual((refused.status, refused.code), (401, "invalid_api_key"))
        self.assertEqual(self.loads, 1)

    @inlineCallbacks
    def test_no_stall_no_reload_no_wait(self) -> Any:
        """
        Without a stall a key is answered at once from the table (a change
        made elsewhere reaches it by Redis's message), and nothing reloads.
        """
        key: NewKey = self.key
        yield self.a.revoke_key("team", key.prefix)
        self.monotonic.now += STALL_SECONDS - 0.5
        self.assertIsInstance(self.identify(key.key), Holder)
        self.assertEqual(self.loads, 0)
        self.assertEqual(self.watch.stalls, 0)

    def test_no_watch_outside_a_cluster(self) -> None:
        """
        A table without a watch (one instance): nothing read, nothing held.
        """
        self.b.stall_watch = None
        self.monotonic.now += 100
        self.assertIsInstance(self.identify(self.key.key), Holder)
        # Only the watch's start read it (both its clocks, the same here).
        self.assertEqual(self.monotonic.reads, 2)


class ReadyAfterStallTests(GatewayCase):
    """
    C{GET /readyz} of a gateway whose loop stood still: 503 with the
    reason while its consumers are reloaded and while a failed reload is
    tried again, 200 once one succeeds (before, ready throughout: a
    balancer kept sending calls to an instance whose table might still
    hold a key revoked elsewhere).
    """

    @inlineCallbacks
    def test_not_ready_until_reloaded(self) -> Any:
        gateway, _ = yield self.gateway()
        table = gateway.service.consumers
        monotonic = Monotonic()
        watch = StallWatch(table, reactor, monotonic, wall=monotonic)
        table.stall_watch = watch
        watch.start()
        self.addCleanup(watch.stop)
        url = f"http://127.0.0.1:{gateway.api_port}/readyz"

        @inlineCallbacks
        def readyz() -> Any:
            status, body = yield deferToThread(http_get, url)
            return status, json.loads(body)

        status, _ = yield readyz()
        self.assertEqual(status, 200)
        held: list[Deferred[Snapshot]] = []
        load = table.store.load

        def held_load(now: float) -> Deferred[Snapshot]:
            loading: Deferred[Snapshot] = Deferred()
            held.append(loading)
            return loading

        table.store.load = held_load
        # The loop stood still: the next mark finds it.
        monotonic.now += 3
        watch.tick()
        status, document = yield readyz()
        self.assertEqual((status, document["ready"]), (503, False))
        self.assertIn("being reloaded", document["reason"])
        # The reload fails: still not ready, tried again.
        held[0].errback(OSError("database unreachable"))
        self.flushLoggedErrors(OSError)
        status, document = yield readyz()
        self.assertEqual(status, 503)
        self.assertIn("could not be reloaded", document["reason"])
        # The database back: the next try succeeds, ready again.
        table.store.load = load
        for _ in range(100):
            status, document = yield readyz()
            if status == 200:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((status, document["ready"]), (200, True))
