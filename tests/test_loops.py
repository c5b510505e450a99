"""
Loops that outlive a failed step (L{openclaw.loops.LoggedStep}): a
L{LoopingCall} whose step fails otherwise stops for good, and the
Deferred of its start, which nothing waits for, fails unseen (review
s32: a worker whose check of its parent raised once never noticed the
parent end).  Driven by a L{Clock}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock, LoopingCall
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from openclaw.cluster import scrape
from openclaw.cluster.scrape import PrivateSocketWatch
from openclaw.cluster.workers import SupervisorWatch
from openclaw.loops import LoggedStep
from tests.support import capture_log_events
from tests.test_worker_metrics import socket_directory


class StoppableClock(Clock):
    """
    A L{Clock} with the C{stop} of a reactor (counted).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1


def failures(events: list[dict[str, Any]]) -> list[str]:
    """
    The log lines of C{events} that carry a traceback.
    """
    return [formatEvent(event) for event in events if "log_failure" in event]


class LoggedStepTests(SynchronousTestCase):
    """
    L{LoggedStep}: a failing step is logged once while it fails the same
    way, and the loop goes on.
    """

    def setUp(self) -> None:
        self.events = capture_log_events(self)
        self.clock = Clock()
        self.outcomes: list[BaseException | None] = []
        self.step = LoggedStep(self.one_step, Logger(), "the test's loop")
        self.loop = LoopingCall(self.step)
        self.loop.clock = self.clock

    def one_step(self) -> Deferred[None] | None:
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if isinstance(outcome, OSError):
            raise outcome
        if outcome is not None:
            return fail(outcome)
        return None

    def test_failures_logged_and_the_loop_goes_on(self) -> None:
        """
        A step that raises, or whose Deferred fails, is logged (an error,
        with its traceback, naming the loop) and the next step runs at the
        next interval; the same failure again is not logged again; another
        one is; a step that succeeds after failures says so once.
        """
        self.outcomes = [OSError("no"), OSError("no"), RuntimeError("bug"), None, None]
        started = self.loop.start(1.0, now=True)
        self.clock.pump([1.0] * 4)
        self.assertTrue(self.loop.running)
        self.assertNoResult(started)
        logged = failures(self.events)
        self.assertEqual(len(logged), 2, logged)
        self.assertIn("the test's loop failed (no); it goes on, tried again at its next interval", logged[0])
        self.assertIn("the test's loop failed (bug)", logged[1])
        self.assertEqual(
            [e["log_level"] for e in self.events if "log_failure" in e],
            [LogLevel.error, LogLevel.error],
        )
        again = [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.info]
        self.assertEqual(again, ["the test's loop: succeeded again, after 3 failed attempts"])
        self.assertEqual(self.step.failures, 0)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.loop.stop()
        self.assertIs(self.successResultOf(started), self.loop)

    def test_failing_again_after_succeeding_is_logged(self) -> None:
        """
        The same failure after a step that succeeded is logged again.
        """
        self.outcomes = [OSError("no"), None, OSError("no")]
        self.loop.start(1.0, now=True)
        self.clock.pump([1.0] * 2)
        self.assertEqual(len(failures(self.events)), 2)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)
        self.loop.stop()


class SupervisorWatchTests(SynchronousTestCase):
    """
    L{SupervisorWatch}: a check that fails (its C{getppid} raising) does
    not end the watch.
    """

    def test_check_that_fails_is_logged_and_the_watch_goes_on(self) -> None:
        """
        The reviewer's reproduction: C{getppid} raising on its second call
        stopped the loop ("Unhandled error in Deferred" at collection), and
        the worker no longer noticed its parent end.  Now the failure is
        logged and the next check, a second later, notices it.
        """
        events = capture_log_events(self)
        reactor = StoppableClock()
        calls: list[int] = []
        parents = {2: OSError("simulated"), 4: 4242}

        def getppid() -> int:
            calls.append(1)
            parent = parents.get(len(calls), 1)
            if isinstance(parent, OSError):
                raise parent
            return parent

        watch = SupervisorWatch(reactor, 1, interval=1.0, getppid=getppid)  # type: ignore[arg-type]
        watch.startService()
        self.addCleanup(watch.stopService)
        reactor.pump([1.0] * 2)
        self.assertEqual(len(calls), 3)
        self.assertTrue(watch._check.running)
        self.assertEqual(reactor.stops, 0)
        logged = failures(events)
        self.assertEqual(len(logged), 1, logged)
        self.assertIn("the check that this worker's gateway process (pid 1) still runs failed (simulated)", logged[0])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        # The parent ends: noticed at the next check.
        reactor.advance(1.0)
        self.assertTrue(watch.gone)
        self.assertEqual(reactor.stops, 1)
        self.assertFalse(watch._check.running)


class Listening(Service):
    """
    A stand-in for the service listening on the private socket.
    """

    def __init__(self) -> None:
        self.starts = 0

    def startService(self) -> None:
        super().startService()
        self.starts += 1


class PrivateSocketWatchCheckTests(SynchronousTestCase):
    """
    L{PrivateSocketWatch}: a check that fails does not end the watch.
    """

    def test_check_that_fails_is_logged_and_the_watch_goes_on(self) -> None:
        """
        A check that raises (here a fault of the directory's check) is
        logged, and the next check listens.
        """
        events = capture_log_events(self)
        clock = Clock()
        sockets = socket_directory(self, 2)
        listening = Listening()
        faults = [RuntimeError("a fault")]

        def problem(directory: Path) -> str | None:
            if faults:
                raise faults.pop()
            return None

        self.patch(scrape, "socket_directory_problem", problem)
        watch = PrivateSocketWatch(clock, sockets, 1, listening, interval=1.0)
        watch.startService()
        self.addCleanup(watch.stopService)
        self.assertEqual(listening.starts, 0)
        logged = failures(events)
        self.assertEqual(len(logged), 1, logged)
        self.assertIn(f"the check of worker 1's metrics socket {sockets.path(1)} failed (a fault)", logged[0])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        clock.advance(1.0)
        self.assertTrue(watch._check.running)
        self.assertEqual(listening.starts, 1)

    def test_directory_that_cannot_be_looked_at(self) -> None:
        """
        Whether the directory exists cannot be told (a directory above it
        this user may not search): the directory's problem, logged as
        one (no traceback), looked at again at every check.
        """
        events = capture_log_events(self)
        clock = Clock()
        sockets = socket_directory(self, 2)
        listening = Listening()
        exists = type(sockets.directory).exists

        def denied(path: Path) -> bool:
            if path == sockets.directory:
                raise PermissionError(13, "Permission denied")
            return exists(path)

        self.patch(type(sockets.directory), "exists", denied)
        watch = PrivateSocketWatch(clock, sockets, 1, listening, interval=1.0)
        watch.startService()
        self.addCleanup(watch.stopService)
        self.assertEqual(failures(events), [])
        errors = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.error]
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("its directory cannot be used (Permission denied)", errors[0])
        self.assertEqual(listening.starts, 0)
        self.patch(type(sockets.directory), "exists", exists)
        clock.advance(1.0)
        self.assertEqual(listening.starts, 1)
