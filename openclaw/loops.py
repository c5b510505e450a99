"""
Steps of a L{LoopingCall} that outlive their failures.

A L{LoopingCall} whose step raises, or returns a Deferred that fails, stops
for good, and the Deferred its C{start} returned fails with it: dropped, as
it usually is, the failure is only an "Unhandled error in Deferred" when
that Deferred is collected, and the loop's work is no longer done, silently
(a worker no longer notices that its gateway process ended; a worker's
metrics socket removed is no longer listened on again).  A loop built on
L{LoggedStep} logs a failed step and runs its next step as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure


class LoggedFailures:
    """
    The failures of a piece of work done again and again (a loop's step,
    or work a step starts and does not wait for: L{watch}), logged on
    C{log}, an error with its traceback naming C{what}; the work is done
    again at its next interval all the same.

    A failure again the same way (the same exception type and message) is
    not logged again until the work succeeds or fails otherwise, so that
    work failing for good every second logs one traceback, not one a
    second; the first success after failures logs one line saying so.

    @ivar failures: the times the work failed since it last succeeded.
    """

    def __init__(self, log: Logger, what: str) -> None:
        """
        @param what: the work, as an operator knows it, for the log lines
            ("the check that this worker's gateway process still runs").
        """
        self.log = log
        self.what = what
        self.failures = 0
        #: The failure last logged (its exception type and message), while
        #: the work fails.
        self._logged: tuple[object, str] | None = None

    def watch(self, outcome: Deferred[Any]) -> Deferred[None]:
        """
        Log C{outcome}'s failure (as above); its success counts as the
        work's.  Reactor thread.

        @return: C{outcome}, which then fires with None once it has, and
            never fails.
        """
        return outcome.addCallbacks(self._succeeded, self._failed)

    def _succeeded(self, _: object) -> None:
        if self.failures:
            self.log.info(
                "{what}: succeeded again, after {failures} failed attempts",
                what=self.what,
                failures=self.failures,
            )
        self.failures = 0
        self._logged = None

    def _failed(self, reason: Failure) -> None:
        self.failures += 1
        error = reason.getErrorMessage() or type(reason.value).__name__
        seen = (type(reason.value), error)
        if seen == self._logged:
            return
        self._logged = seen
        self.log.failure(
            "{what} failed ({error}); it goes on, tried again at its next interval (this line is not repeated while "
            "it fails the same way): if the error is the system's (a permission, a file or directory removed, no "
            "memory or file descriptor left), correct it; else report it with this traceback",
            reason,
            LogLevel.error,
            what=self.what,
            error=error,
        )


class LoggedStep(LoggedFailures):
    """
    A step for a L{LoopingCall} (C{LoopingCall(LoggedStep(step, log,
    what))}) that never fails: C{step} (called with no argument; it may
    return a Deferred, which the loop waits for) failing is logged on
    C{log} (L{LoggedFailures}: once while it fails the same way), and the
    loop goes on: its next step comes at its next interval.
    """

    def __init__(self, step: Callable[[], object], log: Logger, what: str) -> None:
        """
        @param what: the loop's work, as an operator knows it, for the log
            lines ("the check that this worker's gateway process still
            runs").
        """
        super().__init__(log, what)
        self.step = step

    def __call__(self) -> Deferred[None]:
        """
        Run the step; fires once it has ended (never fails).
        """
        return self.watch(maybeDeferred(self.step))
