"""
Time limits that the gateway's own standstill does not use up.

Two rules, one for each kind of waiter:

  - a data-plane deadline (a call's C{UPSTREAM_TIMEOUT}, a request's
    C{API_HEADER_TIMEOUT_SECONDS}...) found due late (L{overdue}) is
    judged one turn of the loop later, after the reactor has read what
    came meanwhile: a client is waiting on it, and gets the answer that
    came or the timeout it would have had, not one more timeout's wait
    (L{add_timeout} is C{Deferred.addTimeout} so judged), and again while
    its answer goes on arriving (L{CatchingUp}: a large one takes several
    turns to read);
  - a health probe's or a models listing's limit (L{add_deadline}), on
    which no client's answer hangs, begins anew, whole: the provider is
    judged on time the gateway ran (a paused VM's provider resends its
    answer only seconds after the resume).

When the gateway's event loop stands still (the process stopped with
SIGSTOP, its host or VM paused, swapping), its timers go by the reactor's
clock (the wall clock), which moves on meanwhile: on resume every time
limit that passed fires at once, before the reactor has read what arrived
meanwhile, and an exchange the other side had no chance to finish (its
answer waiting unread in the socket, or, in a paused VM, not even
received; a request not yet sent) would be judged timed out.  A wall clock
stepped forward fires them early in the same way.

L{add_deadline} is C{Deferred.addTimeout} that tells those apart, on a
clock that never steps (L{boot_clock}) as well as the reactor's, as
L{StallWatch <openclaw.consumers.freshness.StallWatch>} tells a stall
from a clock step:

  - the limit found due with less than its seconds gone on the monotonic
    clock (the wall clock stepped forward, or a pause that clock does not
    count): it waits for the rest;
  - found due more than L{LATE_SECONDS} late on both clocks (the loop stood
    still): the stall is reported and the limit begins anew, whole, from
    now (what came meanwhile is read first, and a request not yet sent is
    sent), so the other side is judged on time the gateway ran;
  - found due late on the monotonic clock alone (the wall clock set back,
    which holds the reactor's timers): the other side had more than its
    time, and it is judged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

_T = TypeVar("_T")

#: How late, in seconds, a limit must be found due for the loop to have
#: stood still (on both clocks, for L{add_deadline}): far more than a busy
#: loop delays a timer.
LATE_SECONDS = 1.0

#: The clock of L{boot_clock}: C{CLOCK_BOOTTIME} where there is one.
BOOT_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def boot_clock() -> float:
    """
    Seconds on a clock that never steps and goes on while the process is
    stopped or the host suspended (Linux's C{CLOCK_BOOTTIME},
    clock_gettime(2)), else C{CLOCK_MONOTONIC}: a suspended host's wall
    clock, right when it resumes, is then not taken for one stepped
    forward (L{openclaw.consumers.service.UsagePurge}, L{add_deadline}).
    """
    return time.clock_gettime(BOOT_CLOCK)


def overdue(timer: IDelayedCall | None, clock: IReactorTime) -> bool:
    """
    Whether C{timer}, firing now, fires more than L{LATE_SECONDS} after
    its time (the loop stood still), so that its verdict is put off by
    one turn of the event loop (a C{callLater(0)}): in each turn Twisted's
    reactors run the timers that are due, then read the sockets that are
    ready (C{ReactorBase.mainLoop}: C{runUntilCurrent}, then
    C{doIteration}), so what arrived while the loop stood still is read
    before the deadline is judged, and moves or ends it as it would have
    in time.
    """
    return timer is not None and clock.seconds() - timer.getTime() > LATE_SECONDS


class CatchingUp:
    """
    Whether a data-plane deadline firing now is put off by one turn of the
    loop (L{put_off}): when found more than L{LATE_SECONDS} late
    (L{overdue}), and then turn after turn for as long as the answer it
    waits for goes on arriving.  Twisted's TCP transport reads at most
    64 KiB from a socket in a turn
    (C{twisted.internet.tcp.Connection.bufferSize}): an answer larger than
    that, come whole while the loop stood still, takes several turns to
    read, and is not cut by a deadline its own reading outlasts.
    """

    def __init__(self, arrived: Callable[[], int]) -> None:
        """
        @param arrived: the bytes of the answer received so far.
        """
        self._arrived = arrived
        #: The bytes received when the deadline was last put off; None
        #: unless it was, at the turn before.
        self._seen: int | None = None

    def put_off(self, timer: IDelayedCall | None, clock: IReactorTime) -> bool:
        """
        Whether C{timer}'s deadline, firing now, is judged one turn later
        (a C{callLater(0)}) rather than now.
        """
        arrived = self._arrived()
        if overdue(timer, clock) or (self._seen is not None and arrived > self._seen):
            self._seen = arrived
            return True
        self._seen = None
        return False


def nothing_arrived() -> int:
    """
    For a deadline whose answer's progress is not counted: nothing.
    """
    return 0


def add_timeout(
    deferred: Deferred[_T],
    seconds: float,
    reactor: IReactorTime,
    on_timeout: Callable[[Any, float], Any],
    arrived: Callable[[], int] = nothing_arrived,
) -> Deferred[_T]:
    """
    C{deferred.addTimeout(seconds, reactor, onTimeoutCancel=on_timeout)},
    but the deadline, found due more than L{LATE_SECONDS} late (the loop
    stood still: L{overdue}), is judged one turn of the loop later, after
    the reactor has read what came meanwhile, and again while the answer
    goes on arriving (L{CatchingUp}): an answer that came in time for those
    turns ends C{deferred} before them, and the deadline does nothing;
    else C{deferred} is cancelled then, as it would have been in time.

    @param on_timeout: called with what the cancelled C{deferred} fired
        with and C{seconds} when the deadline passed; gives its result
        from then on (as C{addTimeout}'s C{onTimeoutCancel}).
    @param arrived: the bytes of the answer received so far.
    @return: C{deferred}.
    """
    # The deadline's timer (the next turn's, once found due late).
    timer: IDelayedCall | None = None
    timed_out = False
    catching_up = CatchingUp(arrived)

    def due() -> None:
        nonlocal timer, timed_out
        if catching_up.put_off(timer, reactor):
            timer = reactor.callLater(0, due)
            return
        timer = None
        timed_out = True
        deferred.cancel()

    def converted(result: Any) -> Any:
        return on_timeout(result, seconds) if timed_out else result

    def ended(result: Any) -> Any:
        nonlocal timer
        running, timer = timer, None
        if running is not None and running.active():
            running.cancel()
        return result

    timer = reactor.callLater(seconds, due)
    return deferred.addBoth(converted).addBoth(ended)


class _Deadline:
    """
    The timer of one L{add_deadline}.
    """

    def __init__(
        self,
        deferred: Deferred[Any],
        seconds: float,
        reactor: IReactorTime,
        monotonic: Callable[[], float],
        on_stall: Callable[[float], object],
    ) -> None:
        self.deferred = deferred
        self.seconds = seconds
        self.reactor = reactor
        self.monotonic = monotonic
        self.on_stall = on_stall
        self.timed_out = False
        #: When the limit's present run began, on the monotonic clock.
        self.began = monotonic()
        self.timer: IDelayedCall | None = reactor.callLater(seconds, self.due)

    def due(self) -> None:
        timer, self.timer = self.timer, None
        assert timer is not None
        now = self.monotonic()
        ran = now - self.began
        if ran < self.seconds:
            # The wall clock ran ahead of the monotonic clock: the rest.
            self.timer = self.reactor.callLater(self.seconds - ran, self.due)
            return
        late = min(ran - self.seconds, self.reactor.seconds() - timer.getTime())
        if late > LATE_SECONDS:
            # The loop stood still: the limit begins anew.  The new timer
            # fires after the reactor has read its sockets.
            self.began = now
            self.timer = self.reactor.callLater(self.seconds, self.due)
            self.on_stall(late)
            return
        self.timed_out = True
        self.deferred.cancel()

    def ended(self, result: object) -> object:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        return result


def add_deadline(
    deferred: Deferred[_T],
    seconds: float,
    reactor: IReactorTime,
    on_timeout: Callable[[Failure, float], Failure],
    *,
    monotonic: Callable[[], float] = boot_clock,
    on_stall: Callable[[float], object] = lambda late: None,
) -> Deferred[_T]:
    """
    Cancel C{deferred} unless it has fired within C{seconds} of time the
    event loop ran (see the module's docstring), as
    C{deferred.addTimeout(seconds, reactor, onTimeoutCancel=on_timeout)}
    does by the reactor's clock alone.

    @param on_timeout: called with the cancellation's failure and
        C{seconds} when the limit passed; gives the failure C{deferred}
        fails with.
    @param monotonic: the clock that never steps (L{boot_clock}).
    @param on_stall: called with how late the limit was found due, in
        seconds (the loop stood still at least that long), each time it
        begins anew after a stall.
    @return: C{deferred}.
    """
    deadline = _Deadline(deferred, seconds, reactor, monotonic, on_stall)

    def converted(result: Any) -> Any:
        if deadline.timed_out and isinstance(result, Failure):
            return on_timeout(result, seconds)
        return result

    return deferred.addBoth(converted).addBoth(deadline.ended)


__all__ = [
    "BOOT_CLOCK",
    "LATE_SECONDS",
    "CatchingUp",
    "add_deadline",
    "add_timeout",
    "boot_clock",
    "nothing_arrived",
    "overdue",
]
