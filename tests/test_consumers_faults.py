"""
Faults of ours in the consumers' asynchronous paths are logged, with their
traceback, and leave the table working (review s32: a callback's exception
ended in a C{done} returning None and vanished; a bug reading Redis's
spends was logged at debug, like Redis away); each caller of a write of
usage rows under way waits on a Deferred of its own (L{InFlight}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from openclaw.consumers import table as table_module
from openclaw.consumers.model import Consumer
from openclaw.consumers.prices import PriceTable
from openclaw.consumers.shared import SEED, SharedConsumers, SharedCounters
from openclaw.consumers.store import Snapshot, UsageRow
from openclaw.consumers.table import ConsumerTable, Holder
from openclaw.deferreds import InFlight
from tests.support import capture_log_events
from tests.test_consumers_cluster import _ScriptChannel, _SeedingTable

CREATED = 1000.0


class Bug(Exception):
    """
    A fault of ours, simulated.
    """


def failures(events: list[dict[str, Any]]) -> list[str]:
    """
    The log lines of C{events} that carry a traceback.
    """
    return [formatEvent(event) for event in events if "log_failure" in event]


class Store:
    """
    A consumers' store whose writes of usage rows the test answers
    (C{writes}: each one's rows and Deferred), as its loads.
    """

    def __init__(self) -> None:
        self.writes: list[tuple[list[UsageRow], Deferred[None]]] = []
        self.loads: list[Deferred[Snapshot]] = []
        self.deletes: list[str] = []

    def record(self, rows: list[UsageRow]) -> Deferred[None]:
        written: Deferred[None] = Deferred()
        self.writes.append((rows, written))
        return written

    def load(self, now: float) -> Deferred[Snapshot]:
        loaded: Deferred[Snapshot] = Deferred()
        self.loads.append(loaded)
        return loaded

    def delete(self, name: str, retired: str, after: Deferred[None] | None = None) -> Deferred[None]:
        waited = after if after is not None else succeed(None)

        def deleting(_: object) -> None:
            self.deletes.append(name)

        return waited.addCallback(deleting)


class Keys:
    """
    Redis's keys, as the gateway names them.
    """

    def key(self, *parts: str) -> str:
        return ":".join(("openclaw", *parts))


class Faulty:
    """
    A clock that raises L{Bug} once told to (C{fault}).
    """

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(CREATED + 10)
        self.fault = False

    def __call__(self) -> float:
        if self.fault:
            self.fault = False
            raise Bug("a fault of ours")
        return self.clock.seconds()


class TableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events = capture_log_events(self)
        self.store = Store()
        self.clock = Faulty()
        self.table = ConsumerTable(self.store, PriceTable.with_overrides({}), clock=self.clock)  # type: ignore[arg-type]
        self.table.consumers["team"] = Consumer("team", created_at=CREATED)

    def account(self) -> None:
        self.table.account(Holder("team", "oc_t", CREATED), "kimi", "moonshot-v1-8k", 200, {"prompt_tokens": 1}, 0.01)

    def test_fault_after_a_write_logged_and_the_table_goes_on(self) -> None:
        """
        A write fails (the database), the next one succeeds, but its
        C{written} raises (a fault of ours): logged with its traceback,
        the failures' state cleared as the write did succeed, and the next
        write goes as usual.
        """
        self.account()
        self.table.flush()
        self.store.writes[-1][1].errback(OSError("the database refused the write"))
        self.assertEqual(self.table.behind(), 1)
        flushed = self.table.flush()
        self.clock.fault = True
        self.store.writes[-1][1].callback(None)
        self.assertIsNone(self.successResultOf(flushed))
        logged = [line for line in failures(self.events) if "a fault of the gateway" in line]
        self.assertEqual(len(logged), 1, logged)
        self.assertIn("a fault of the gateway handling the end of a write of 1 usage rows (a fault of ours)", logged[0])
        self.assertEqual(len(self.flushLoggedErrors(Bug)), 1)
        self.flushLoggedErrors(OSError)
        # Writes succeed: a row since is not behind.
        self.account()
        self.assertEqual(self.table.behind(), 0)
        flushed = self.table.flush()
        self.store.writes[-1][1].callback(None)
        self.assertIsNone(self.successResultOf(flushed))
        self.assertEqual(len(self.store.writes), 3)
        self.assertEqual(self.table.pending_rows(), 0)

    def test_fault_after_a_reload_logged(self) -> None:
        """
        A reload that fails, and whose logging of it raises (a fault of
        ours): the fault is logged with its traceback, and the next reload
        goes as usual.
        """

        def raising(*args: Any, **kwargs: Any) -> None:
            raise Bug("a fault of ours")

        self.patch(table_module, "log_database_failure", raising)
        self.table.refresh()
        self.store.loads[-1].errback(OSError("the database is away"))
        logged = failures(self.events)
        self.assertEqual(len(logged), 1, logged)
        self.assertIn("a fault of the gateway handling the reload of the consumers (a fault of ours)", logged[0])
        self.assertEqual(len(self.flushLoggedErrors(Bug)), 1)
        self.table.refresh()
        self.store.loads[-1].callback(Snapshot({"other": Consumer("other", created_at=CREATED)}, {}, {}))
        self.assertEqual(list(self.table.consumers), ["other"])

    def test_callers_of_one_write_each_have_their_own_deferred(self) -> None:
        """
        The first caller of a write (the one that started it) adds a
        callback that raises, then one that waits on something else; a
        delete waits for the write meanwhile, and a second caller: each
        fires when the write ends, as its own (review s32: every caller's
        callbacks were on one chain, the first caller's errback lost its
        failure to the delete's wait, and its pause held the others up).
        """
        self.account()
        first = self.table.flush()
        seen: list[object] = []

        def raising(_: None) -> None:
            raise Bug("the first caller's")

        first.addCallback(raising)
        deleting = self.table.delete("team")
        paused: Deferred[None] = Deferred()
        first.addErrback(lambda reason: seen.append(reason.value) or paused)
        second = self.table.flush()
        self.assertNoResult(second)
        self.assertEqual(self.store.deletes, [])
        self.store.writes[-1][1].callback(None)
        # The first caller's own chain: its errback got its failure, and
        # waits for what it returned.
        self.assertEqual([type(value) for value in seen], [Bug])
        self.assertNoResult(first)
        # The others are not held up by it.
        self.assertIsNone(self.successResultOf(second))
        self.successResultOf(deleting)
        self.assertEqual(self.store.deletes, ["team"])
        self.assertNotIn("team", self.table.consumers)
        paused.callback(None)
        self.assertIsNone(self.successResultOf(first))

    def test_load_unwritten_not_held_up_by_a_caller(self) -> None:
        """
        A caller of a write under way that waits on something else in its
        callback does not hold up L{ConsumerTable.load_unwritten}, which
        waits for that write.
        """
        self.account()
        self.table.flush().addCallback(lambda _: Deferred())
        loading = self.table.load_unwritten()
        self.store.writes[-1][1].callback(None)
        self.assertEqual(len(self.store.loads), 1)
        self.store.loads[-1].callback(Snapshot({}, {}, {}))
        snapshot, unwritten = self.successResultOf(loading)
        self.assertEqual(unwritten, {})

    def test_flusher_whose_step_raises_goes_on(self) -> None:
        """
        A flush that raises (here the take of the gateway's own rows, a
        fault of ours) is logged, naming the loop, the rows pending stay
        pending, and the next flush, at its interval, writes them (review
        s33: the loop stopped for good after one line, and the usage rows
        piled up unwritten).
        """
        clock = Clock()
        self.table.start(clock)
        flusher = self.table._flusher
        assert flusher is not None
        self.addCleanup(lambda: flusher.stop() if flusher.running else None)
        take = self.table.gateway_usage.take
        faults = [Bug("a fault taking the gateway's rows")]

        def faulty() -> list[UsageRow]:
            if faults:
                raise faults.pop()
            return take()

        self.patch(self.table.gateway_usage, "take", faulty)
        self.account()
        clock.advance(self.table.flush_seconds)
        self.assertEqual(self.store.writes, [])
        self.assertEqual(self.table.pending_rows(), 1)
        logged = failures(self.events)
        self.assertEqual(len(logged), 1, logged)
        self.assertIn("the write of the usage rows every 1 s failed (a fault taking the gateway's rows)", logged[0])
        self.assertEqual(len(self.flushLoggedErrors(Bug)), 1)
        clock.advance(self.table.flush_seconds)
        self.assertTrue(flusher.running)
        self.assertEqual(len(self.store.writes), 1)
        self.store.writes[-1][1].callback(None)
        self.assertEqual(self.table.pending_rows(), 0)

    def test_store_that_raises_keeps_the_rows(self) -> None:
        """
        A store whose write raises at once (a fault of ours) fails the
        write as one failing later does: logged, its rows kept for the
        next flush, which writes them.
        """
        record = self.store.record
        faults = [Bug("a fault starting the write")]

        def faulty(rows: list[UsageRow]) -> Deferred[None]:
            if faults:
                raise faults.pop()
            return record(rows)

        self.patch(self.store, "record", faulty)
        self.account()
        self.assertIsNone(self.successResultOf(self.table.flush()))
        self.assertEqual(self.table.pending_rows(), 1)
        logged = failures(self.events)
        self.assertEqual(len(logged), 1, logged)
        self.assertIn("could not write 1 usage rows (", logged[0])
        self.assertEqual(len(self.flushLoggedErrors(Bug)), 1)
        flushed = self.table.flush()
        self.store.writes[-1][1].callback(None)
        self.assertIsNone(self.successResultOf(flushed))
        self.assertEqual(self.table.pending_rows(), 0)

    def test_backlog_written_in_parts(self) -> None:
        """
        Rows piled up while the database could not be written go in parts
        of L{MAX_ROWS_PER_WRITE <openclaw.consumers.table.MAX_ROWS_PER_WRITE>},
        each full part followed at once by the next (consumers trial s42:
        a backlog grown on a full disk went in one transaction, which never
        fitted again once space was back, and a stop gave it up); a part
        that fails is kept, first, for the next flush.
        """
        self.patch(table_module, "MAX_ROWS_PER_WRITE", 3)
        for _ in range(7):
            self.account()
        flushed = self.table.flush()
        self.assertEqual([len(rows) for rows, _ in self.store.writes], [3])
        self.store.writes[0][1].errback(Failure(OSError("database or disk is full")))
        self.assertIsNone(self.successResultOf(flushed))
        self.assertEqual(self.table.pending_rows(), 7)
        self.flushLoggedErrors(OSError)
        flushed = self.table.flush()
        for expected in (3, 3, 1):
            self.assertEqual(len(self.store.writes[-1][0]), expected)
            self.store.writes[-1][1].callback(None)
        self.assertIsNone(self.successResultOf(flushed))
        self.assertEqual([len(rows) for rows, _ in self.store.writes], [3, 3, 3, 1])
        self.assertEqual(self.table.pending_rows(), 0)
        # In order: the part that failed first.
        self.assertEqual(self.store.writes[1][0], self.store.writes[0][0])


class InFlightTests(SynchronousTestCase):
    def test_each_observer_its_own(self) -> None:
        """
        What an observer's callbacks return or raise is its own: the
        others see the operation's result; an observer asked for once it
        has ended fires at once.
        """
        inflight: InFlight[str] = InFlight()
        first, second = inflight.observe(), inflight.observe()
        first.addCallback(lambda _: 1 / 0)
        inflight.end("result")
        self.failureResultOf(first, ZeroDivisionError)
        self.assertEqual(self.successResultOf(second), "result")
        self.assertEqual(self.successResultOf(inflight.observe()), "result")

    def test_failure_to_each(self) -> None:
        inflight: InFlight[str] = InFlight()
        first = inflight.observe()
        inflight.end(Failure(Bug("failed")))
        self.failureResultOf(first, Bug)
        self.failureResultOf(inflight.observe(), Bug)


class SharedTests(SynchronousTestCase):
    def test_fault_reading_spends_logged_with_its_traceback(self) -> None:
        """
        Redis answers, but reading its answer raises (a fault of ours): an
        error with its traceback, not Redis away's debug line; the read
        still never fails.
        """
        events = capture_log_events(self)

        class Answering(Keys):
            def script(self, source: str, keys: list[str], args: list[str]) -> Deferred[Any]:
                return succeed([b"not a number", b"0", b"0"])

        counters = SharedCounters(Answering(), Clock(), 1.0)  # type: ignore[arg-type]
        counters.up = True
        read = counters.read_spends([Consumer("team", created_at=CREATED)], CREATED + 10)
        self.assertIsNone(self.successResultOf(read))
        logged = failures(events)
        self.assertEqual(len(logged), 1, logged)
        self.assertIn("consumers' spends read from Redis could not be used", logged[0])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_redis_away_reading_spends_is_debug(self) -> None:
        events = capture_log_events(self)

        class Away(Keys):
            def script(self, source: str, keys: list[str], args: list[str]) -> Deferred[Any]:
                return fail(ConnectionError("connection refused"))

        counters = SharedCounters(Away(), Clock(), 1.0)  # type: ignore[arg-type]
        counters.up = True
        read = counters.read_spends([Consumer("team", created_at=CREATED)], CREATED + 10)
        self.assertIsNone(self.successResultOf(read))
        self.assertEqual(failures(events), [])
        said = [formatEvent(e) for e in events if "not read from Redis" in e.get("log_format", "")]
        self.assertEqual(
            said, ["consumers' spends not read from Redis (connection refused); this instance's view answers"]
        )

    def test_fault_after_a_seed_logged_and_seeded_again(self) -> None:
        """
        Redis's answer to the seed cannot be read (a fault of ours): logged
        with its traceback, and the next reconnection seeds again.
        """
        events = capture_log_events(self)

        class Garbled(_ScriptChannel):
            def script(self, source: str, keys: list[str], args: list[str]) -> Deferred[Any]:
                if source == SEED and not self.scripts:
                    self.scripts.append(source)
                    return succeed([b"garbled", "1"])
                return super().script(source, keys, args)

        clock = Clock()
        channel = Garbled()
        counters = SharedCounters(channel, clock, 1.0)  # type: ignore[arg-type]
        shared = SharedConsumers(_SeedingTable(), counters, channel, "a")  # type: ignore[arg-type]
        self.addCleanup(shared.stop)
        shared.up(True)
        logged = failures(events)
        self.assertEqual(len(logged), 1, logged)
        self.assertIn("a fault of the gateway handling the seed of the consumers' spends in Redis", logged[0])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        shared.up(False)
        shared.up(True)
        self.assertEqual(channel.scripts, [SEED, SEED])
