"""
The hourly purge of usage rows older than USAGE_RETENTION_DAYS
(L{openclaw.service.usage_purger}): a purge that fails is logged, saying
what to check, and tried again at the next interval.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from openclaw.service import USAGE_PURGE_SECONDS, usage_purger
from tests.support import capture_log_events


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
        purger = usage_purger(store, clock, 86400.0, "openclaw.db", Logger())  # type: ignore[arg-type]
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
