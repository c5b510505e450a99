"""
The hourly purge of usage rows older than USAGE_RETENTION_DAYS
(L{openclaw.consumers.service.usage_purger}): a purge that fails is logged, saying
what to check, and tried again at the next interval; one that deletes
rows says so; a wall clock set far forward does not make it delete the
rows younger than USAGE_RETENTION_DAYS (trial s33 F2); usage rows dated
after the clock at start say the clock is behind.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from openclaw.consumers.model import NO_CONSUMER
from openclaw.consumers.service import (
    CLOCK_STEP_SECONDS,
    USAGE_PURGE_SECONDS,
    UsagePurge,
    check_usage_dates,
    usage_purger,
)
from openclaw.consumers.store import ConsumerStore, UsageRow
from openclaw.stalls import BOOT_CLOCK, boot_clock
from tests.support import capture_log_events

DAY = 86400.0
RETENTION = 90 * DAY
#: The wall clock at the tests' start: 2026-11-25T04:40:00Z.
T0 = 1795581600.0


class FlakyStore:
    """
    A consumers' store whose purges fail while C{failing} is true.
    """

    def __init__(self) -> None:
        self.failing = True
        self.purged: list[float] = []

    def purge(self, before: float) -> Deferred[int]:
        self.purged.append(before)
        if self.failing:
            return fail(RuntimeError("database is locked"))
        return succeed(0)


class UsagePurgeTests(TestCase):
    """
    The hourly purge of usage rows older than USAGE_RETENTION_DAYS.
    """

    def test_failed_purge_is_retried(self) -> None:
        """
        A purge that fails is logged (saying what to check) and tried again
        at the next interval; the loop keeps running.
        """
        events = capture_log_events(self)
        clock = Clock()
        store = FlakyStore()
        purger = usage_purger(
            store,  # type: ignore[arg-type]
            clock,
            86400.0,
            "openclaw.db",
            Logger(),
            clock.seconds,
        )
        self.addCleanup(purger.stop)
        clock.advance(USAGE_PURGE_SECONDS)
        self.assertEqual(store.purged, [USAGE_PURGE_SECONDS - 86400.0])
        logged = [event for event in events if "log_failure" in event]
        self.assertEqual(len(logged), 1)
        self.assertIn("check that the database", logged[0]["log_format"])
        self.assertTrue(purger.running)
        store.failing = False
        clock.advance(USAGE_PURGE_SECONDS)
        self.assertEqual(len(store.purged), 2)
        self.assertTrue(purger.running)
        self.flushLoggedErrors(RuntimeError)


class CountingStore:
    """
    A consumers' store whose purges delete C{count} rows each.
    """

    def __init__(self, count: int = 0) -> None:
        self.count = count
        self.purged: list[float] = []

    def purge(self, before: float) -> Deferred[int]:
        self.purged.append(before)
        return succeed(self.count)


class Clocks:
    """
    A wall clock (the reactor's, a L{Clock} running the purges) and a
    monotonic one, which advance together unless the wall clock is set.
    """

    def __init__(self) -> None:
        self.wall = Clock()
        self.wall.rightNow = T0
        self.monotonic_now = 1000.0

    def monotonic(self) -> float:
        return self.monotonic_now

    def advance(self, seconds: float) -> None:
        self.monotonic_now += seconds
        self.wall.advance(seconds)

    def set_wall(self, by: float) -> None:
        """
        Set the wall clock C{by} seconds forward (back, when negative);
        the calls that are due then run, as the reactor runs them.
        """
        self.wall.rightNow += by
        self.wall.advance(0)


class ClockStepTests(TestCase):
    def purger(self, store: Any, clocks: Clocks) -> None:
        purger = usage_purger(store, clocks.wall, RETENTION, "openclaw.db", Logger(), clocks.monotonic)
        self.addCleanup(purger.stop)

    def test_purge_that_deletes_is_logged(self) -> None:
        """
        A purge that deletes rows says how many and the cutoff, at info;
        one that deletes none says nothing.
        """
        events = capture_log_events(self)
        clocks, store = Clocks(), CountingStore(0)
        self.purger(store, clocks)
        clocks.advance(USAGE_PURGE_SECONDS)
        self.assertEqual(store.purged, [T0 + USAGE_PURGE_SECONDS - RETENTION])
        self.assertEqual([e for e in events if "usage row" in str(e.get("log_format"))], [])
        store.count = 12
        clocks.advance(USAGE_PURGE_SECONDS)
        [line] = [e for e in events if "usage row" in str(e.get("log_format"))]
        self.assertEqual(line["log_level"], LogLevel.info)
        self.assertEqual(
            formatEvent(line),
            "deleted 12 usage row(s) dated before 2026-08-27T06:40:00Z (older than USAGE_RETENTION_DAYS) from "
            "the consumers' database openclaw.db",
        )

    def test_wall_clock_set_forward(self) -> None:
        """
        The wall clock set 400 days forward (the reactor runs the purge
        at once): the purge goes by the monotonic clock, and one warning
        says what happened and what to do; once the wall clock is set
        right, the purge follows it again, and says so.
        """
        events = capture_log_events(self)
        clocks, store = Clocks(), CountingStore()
        self.purger(store, clocks)
        clocks.advance(USAGE_PURGE_SECONDS)
        clocks.advance(600)
        clocks.set_wall(400 * DAY)
        truth = T0 + USAGE_PURGE_SECONDS + 600
        self.assertEqual(store.purged, [T0 + USAGE_PURGE_SECONDS - RETENTION, truth - RETENTION])
        [warning] = [e for e in events if e.get("log_level") == LogLevel.warn]
        text = formatEvent(warning)
        self.assertTrue(
            text.startswith(
                "the wall clock ran 400.0 days ahead of the monotonic clock in the 600 s since the last purge"
            ),
            text,
        )
        self.assertIn("set the host's clock right (NTP)", text)
        self.assertIn("restart the gateway", text)
        # Hours later: still by the monotonic clock, nothing said again.
        for _ in range(3):
            clocks.advance(USAGE_PURGE_SECONDS)
            truth += USAGE_PURGE_SECONDS
            self.assertEqual(store.purged[-1], truth - RETENTION)
        self.assertEqual(len([e for e in events if e.get("log_level") == LogLevel.warn]), 1)

    def test_wall_clock_set_right_again(self) -> None:
        """
        Once the wall clock agrees with the monotonic one again (set
        right), the purge follows it again, and says so.  (The reactor's
        timers go by the wall clock: here the purge is called as it would
        be once they run again.)
        """
        events = capture_log_events(self)
        clocks, store = Clocks(), CountingStore()
        purge = UsagePurge(store, clocks.wall, RETENTION, "openclaw.db", Logger(), clocks.monotonic)  # type: ignore[arg-type]
        clocks.monotonic_now += 60
        clocks.wall.rightNow += 400 * DAY + 60
        purge()
        self.assertEqual(store.purged, [T0 + 60 - RETENTION])
        clocks.monotonic_now += USAGE_PURGE_SECONDS
        clocks.wall.rightNow = T0 + 60 + USAGE_PURGE_SECONDS - 120
        purge()
        self.assertEqual(store.purged[-1], clocks.wall.seconds() - RETENTION)
        self.assertEqual(
            [formatEvent(e) for e in events if e.get("log_level") == LogLevel.info],
            [
                "the wall clock agrees with the monotonic clock again (it reads 2026-11-25T05:39:00Z): the usage rows "
                "are purged by it again"
            ],
        )
        clocks.monotonic_now += USAGE_PURGE_SECONDS
        clocks.wall.rightNow += USAGE_PURGE_SECONDS
        purge()
        self.assertEqual(store.purged[-1], clocks.wall.seconds() - RETENTION)
        self.assertEqual(len([e for e in events if e.get("log_level") == LogLevel.warn]), 1)

    def test_small_steps_are_the_wall_clocks(self) -> None:
        """
        A wall clock a little ahead of the monotonic one (NTP's steps,
        less than CLOCK_STEP_SECONDS) is followed, with nothing said.
        """
        events = capture_log_events(self)
        clocks, store = Clocks(), CountingStore()
        self.purger(store, clocks)
        clocks.wall.rightNow += CLOCK_STEP_SECONDS - 1
        clocks.advance(USAGE_PURGE_SECONDS)
        self.assertEqual(store.purged, [clocks.wall.seconds() - RETENTION])
        self.assertEqual([e for e in events if e.get("log_level") == LogLevel.warn], [])


def usage_row(ts: float) -> UsageRow:
    return UsageRow(ts, NO_CONSUMER, "", "kimi", "kimi-k2", 200, created_at=None)


class StoredRowsTests(TestCase):
    """
    With a consumers' database: the rows the purge keeps across a wall
    clock set forward, and the rows dated after the clock at start.
    """

    @inlineCallbacks
    def store(self) -> Any:
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        store = ConsumerStore.open(None, directory, reactor)
        self.addCleanup(store.close)
        yield store.migrate()
        return store

    @inlineCallbacks
    def test_rows_younger_than_retention_kept(self) -> Any:
        """
        A wall clock set 400 days forward deleted every usage row at the
        purge the reactor then runs at once (trial s33 F2): now only those
        older than USAGE_RETENTION_DAYS go.
        """
        store = yield self.store()
        yield store.record([usage_row(T0 - age * DAY) for age in (1, 30, 89, 91, 200)])
        clocks = Clocks()
        purge = UsagePurge(store, clocks.wall, RETENTION, "openclaw.db", Logger(), clocks.monotonic)
        clocks.monotonic_now += 600
        clocks.wall.rightNow += 400 * DAY + 600
        yield purge()
        [total] = yield store.usage(None, None, None, None)
        self.assertEqual(total["requests"], 3)

    @inlineCallbacks
    def test_rows_after_the_clock(self) -> Any:
        """
        Usage rows dated more than CLOCK_STEP_SECONDS after the clock at
        start: one warning that the clock is behind, naming the day of
        the newest; rows less far ahead say nothing.
        """
        events = capture_log_events(self)
        store = yield self.store()
        clock = Clock()
        clock.rightNow = T0
        yield store.record([usage_row(T0 + CLOCK_STEP_SECONDS / 2)])
        yield check_usage_dates(store, clock, "openclaw.db", Logger())
        self.assertEqual([e for e in events if e.get("log_level") == LogLevel.warn], [])
        yield store.record([usage_row(T0 + 2 * DAY), usage_row(T0 + 3 * DAY)])
        yield check_usage_dates(store, clock, "openclaw.db", Logger())
        [warning] = [e for e in events if e.get("log_level") == LogLevel.warn]
        text = formatEvent(warning)
        self.assertTrue(
            text.startswith(
                "this host's clock reads 2026-11-25T04:40:00Z, but usage rows of 2 request(s) in the consumers' "
                "database openclaw.db are dated more than 3600 s later, up to 2026-11-28: either the clock is behind"
            ),
            text,
        )
        # Or the rows were dated while it was ahead: a right clock is not
        # to be "fixed" (re-check s33).
        self.assertIn("dated while the clock was ahead, and it is right now: nothing to do", text)


class BootClockTests(SynchronousTestCase):
    def test_counts_a_suspension(self) -> None:
        """
        The purge's clock is Linux's C{CLOCK_BOOTTIME}, which goes on while
        the host is suspended: a resumed host's wall clock is not taken
        for one stepped forward (review s33: C{CLOCK_MONOTONIC} stops).
        """
        if sys.platform.startswith("linux"):
            self.assertEqual(BOOT_CLOCK, time.CLOCK_BOOTTIME)
        self.assertLess(abs(boot_clock() - time.clock_gettime(BOOT_CLOCK)), 1)
