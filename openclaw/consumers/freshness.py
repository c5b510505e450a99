"""
Whether a cluster instance's consumer table may have missed changes
because its event loop stood still (the process stopped with SIGSTOP, its
host or VM paused, swapping).

Another instance's change reaches this one as a message on Redis
(L{openclaw.consumers.shared.SharedConsumers.received}), which reloads the
table from the database.  A loop that stood still handles, once it runs
again, the requests that came meanwhile before that message, and the
reload takes a few milliseconds more: a key revoked meanwhile was served
for the whole stall (2 s and 5 s after the revoke's
answer).  L{StallWatch} marks the loop alive every L{TICK_SECONDS}; a
consumer key presented longer than L{STALL_SECONDS} after the last mark
(or a mark that late) means the table may be stale: consumer keys are
answered 503 (L{openclaw.dataplane.auth.consumers_catching_up}) until a
reload begun then has ended (L{CATCH_UP_SECONDS} at most).  A reload that
fails is tried again (L{RETRY_SECONDS}, doubled up to
L{RETRY_MAX_SECONDS}) until one succeeds, and the instance reports itself
not ready (C{GET /readyz}: L{StallWatch.unready}) meanwhile, so that a
balancer sends its calls to the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from openclaw.loops import LoggedStep

if TYPE_CHECKING:
    from openclaw.consumers.table import ConsumerTable

#: How often the loop marks itself alive, in seconds.
TICK_SECONDS = 0.25
#: A gap between two marks (or a mark and a consumer key) longer than this,
#: in seconds, is a stall: a healthy loop, even a busy one, has none that
#: long.  A shorter stall is not seen: a change made during it holds here
#: up to its length late.
STALL_SECONDS = 2.0
#: How long consumer keys are answered 503 after a stall at most, in
#: seconds: a reload that has not ended by then (a database that does not
#: answer) is waited for no longer, and the table serves as it is, as it
#: does whenever the database is unreachable.
CATCH_UP_SECONDS = 5.0
#: After a reload begun for a stall fails, it is tried again in this many
#: seconds, then twice as long each time, up to L{RETRY_MAX_SECONDS}: the
#: table may lack a change made elsewhere (a revoked key) until one
#: succeeds, and no other change may come to start one.
RETRY_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0


class StallWatch:
    """
    Tells whether consumer keys must wait for the table to catch up after
    the event loop stood still (L{behind}), and starts that catching up.

    @param table: the cluster's consumer table, reloaded after a stall
        (L{ConsumerTable.refresh}).
    @param reactor: runs the marks and the end of the wait.
    @param clock: seconds on a clock that never steps and goes on while
        the process is stopped (C{CLOCK_BOOTTIME} or C{CLOCK_MONOTONIC}
        in the gateway; a VM whose guest clock does not count its pause is
        not seen to have paused).
    @param wall: the reactor's clock (C{reactor.seconds} unless given),
        which its timers, the marks among them, go by: a stall is a gap on
        both clocks.  Set back (NTP, a VM's clock), the wall clock holds
        the marks until it reads again what it read (a gap on C{clock}
        alone), which is no stall (five false stalls, each a
        reload and 503s, in ten seconds of a clock set back).
    @param retry_seconds: the wait before a failed reload after a stall is
        tried again, doubled at each failure up to C{retry_max_seconds}
        (L{RETRY_SECONDS}, L{RETRY_MAX_SECONDS}).
    """

    _log = Logger()

    def __init__(
        self,
        table: ConsumerTable,
        reactor: IReactorTime,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] | None = None,
        stall_seconds: float = STALL_SECONDS,
        tick_seconds: float = TICK_SECONDS,
        catch_up_seconds: float = CATCH_UP_SECONDS,
        retry_seconds: float = RETRY_SECONDS,
        retry_max_seconds: float = RETRY_MAX_SECONDS,
    ) -> None:
        self.table = table
        self.reactor = reactor
        self.clock = clock
        self.wall = wall if wall is not None else reactor.seconds
        self.stall_seconds = stall_seconds
        self.tick_seconds = tick_seconds
        self.catch_up_seconds = catch_up_seconds
        self.retry_seconds = retry_seconds
        self.retry_max_seconds = retry_max_seconds
        #: The last mark, in C{clock}'s seconds (None: not started, or
        #: stopped: nothing is watched).
        self._last: float | None = None
        #: The last mark, in C{wall}'s seconds.
        self._last_wall = 0.0
        #: The end of the wait for the reload under way after a stall
        #: (None: not catching up).
        self._catching_up: IDelayedCall | None = None
        #: When that stall was found, in C{clock}'s seconds.
        self._found_at = 0.0
        self._ticker: LoopingCall | None = None
        #: Counts the reloads begun for stalls: only the newest one's end
        #: counts (one begun before a later stall may have read the
        #: database before a change made during it).
        self._reloads = 0
        #: The next try of a reload after a stall that failed (None: none
        #: pending), and the wait before it, in seconds (None: the reload
        #: after the last stall has not failed).
        self._retry: IDelayedCall | None = None
        self._retry_wait: float | None = None
        #: From a stall until a reload begun for it succeeds: the table
        #: may lack changes made elsewhere (L{unready}).
        self._stale = False
        #: A failure or a late reload was said since the last stall.
        self._warned = False
        #: How many stalls were found (for tests and the log).
        self.stalls = 0

    def start(self) -> None:
        """
        Start marking the loop alive (at the table's first load: until
        then consumer keys are answered 503 anyway).  Again: nothing.
        """
        if self._ticker is not None:
            return
        self._last, self._last_wall = self.clock(), self.wall()
        ticker = self._ticker = LoopingCall(LoggedStep(self.tick, self._log, "the mark of the event loop's liveness"))
        ticker.clock = self.reactor
        ticker.start(self.tick_seconds, now=False).addErrback(
            lambda f: self._log.failure("the mark of the event loop's liveness stopped", f)
        )

    def stop(self) -> None:
        """
        Stop the marks and any wait: consumer keys are no longer held.
        """
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._ticker = None
        self._last = None
        if self._catching_up is not None and self._catching_up.active():
            self._catching_up.cancel()
        self._catching_up = None
        self._cancel_retry()
        self._retry_wait = None
        self._stale = self._warned = False

    def tick(self) -> None:
        """
        Mark the loop alive; a mark late by more than C{stall_seconds}
        finds a stall (no consumer key need come for the reload to start).
        """
        last = self._last
        if last is None:
            return
        now = self.clock()
        if self._catching_up is None and now - last > self.stall_seconds and self._wall_gap():
            self._stalled(now, now - last)
        self._last, self._last_wall = now, self.wall()

    def behind(self) -> bool:
        """
        Whether the table may have missed changes, on a consumer key's
        path: one read of C{clock} and a comparison, unless a stall is
        being caught up with (then none).  A stall found here starts the
        reload.
        """
        if self._catching_up is not None:
            return True
        last = self._last
        if last is None:
            return False
        now = self.clock()
        if now - last <= self.stall_seconds or not self._wall_gap():
            return False
        return self._stalled(now, now - last)

    def unready(self) -> str | None:
        """
        Why this instance should take no calls now (C{GET /readyz}'s 503),
        or None: after a stall, while the reload under way has not ended
        (consumer keys are answered 503 meanwhile), and while a failed one
        is tried again (consumer keys are served from the table as it was,
        which may lack changes made elsewhere).
        """
        if self._catching_up is not None:
            return (
                "the event loop stood still; the consumers are being reloaded from the database (consumer keys "
                "are answered 503 meanwhile)"
            )
        if self._stale:
            return (
                "the consumers could not be reloaded from the database after the event loop stood still (they "
                "may lack changes made elsewhere); trying again, see the log"
            )
        return None

    def _wall_gap(self) -> bool:
        """
        The wall clock too went on by more than C{stall_seconds} since the
        last mark: not a wall clock set back, which holds the marks too.
        """
        return self.wall() - self._last_wall > self.stall_seconds

    def _stalled(self, now: float, gap: float) -> bool:
        """
        The loop stood still for C{gap} seconds: reload the table (a
        reload begun now reads every change committed before), and hold
        consumer keys until it has ended.  Said once per stall.

        @return: whether consumer keys are held (not before the first load).
        """
        self._last, self._last_wall = now, self.wall()
        if not self.table.loaded:
            return False
        self.stalls += 1
        self._found_at = now
        self._log.warn(
            "the event loop stood still for {seconds:.1f} s (the process stopped, its host or VM paused, or "
            "swapping): consumer changes made elsewhere meanwhile may have been missed, so consumer keys are "
            "answered 503 (retry in 1 s) until the consumers are reloaded from the database",
            seconds=gap,
        )
        self._catching_up = self.reactor.callLater(self.catch_up_seconds, self._late)
        self._stale = True
        # A try pending for an earlier stall is this reload now.
        self._cancel_retry()
        self._retry_wait = None
        self._reload()
        return self._catching_up is not None

    def _reload(self, quiet: bool = False) -> None:
        """
        Begin a reload for the last stall (L{ConsumerTable.refresh}; a try
        again is C{quiet}: its failure is not logged by the table, the
        first one was).
        """
        self._reloads += 1
        self.table.refresh(quiet=quiet).addCallback(self._reloaded, self._reloads)

    def _reloaded(self, succeeded: bool, reload: int) -> None:
        """
        A reload begun for a stall has ended: consumer keys are served
        again (from the table as it was, if it failed: logged by the
        table, and said here once until one succeeds), and a failed one is
        tried again (L{RETRY_SECONDS}, doubled up to L{RETRY_MAX_SECONDS}).
        Nothing for one a later stall's reload has replaced, or after
        L{stop}.
        """
        if reload != self._reloads or self._last is None:
            return
        late, self._catching_up = self._catching_up, None
        if late is not None and late.active():
            late.cancel()
        if succeeded:
            self._retry_wait = None
            self._stale = False
            if self._warned:
                self._warned = False
                self._log.info("the consumers were reloaded after the event loop stood still: in step again")
            return
        if self._retry_wait is None:
            wait = self.retry_seconds
            self._warned = True
            self._log.warn(
                "the consumers could not be reloaded after the event loop stood still: consumer keys are served "
                "from the table as it was, which may lack changes made elsewhere meanwhile (a revoked key may "
                "still work here), and /readyz answers 503, until a reload succeeds: tried again in {seconds:g} s, "
                "then at most every {most:g} s",
                seconds=wait,
                most=self.retry_max_seconds,
            )
        else:
            wait = min(self._retry_wait * 2, self.retry_max_seconds)
        self._retry_wait = wait
        self._retry = self.reactor.callLater(wait, self._try_again)

    def _try_again(self) -> None:
        self._retry = None
        self._reload(quiet=True)

    def in_step(self) -> None:
        """
        A reload of the table has succeeded (L{ConsumerTable.refresh}, one
        begun for a change elsewhere as well as one of ours): once the
        reload begun for the last stall has failed, any later one began
        after the stall (reloads run one at a time), so the table is in
        step again and the tries again end (before, /readyz answered 503
        until the next try, up to L{RETRY_MAX_SECONDS} later).  Nothing
        before that failure: a reload under way then may have read the
        database before a change made during the stall.
        """
        if self._retry_wait is None or self._last is None:
            return
        # The tries under way or to come are not needed any more.
        self._reloads += 1
        self._cancel_retry()
        self._reloaded(True, self._reloads)

    def _cancel_retry(self) -> None:
        retry, self._retry = self._retry, None
        if retry is not None and retry.active():
            retry.cancel()

    def _late(self) -> None:
        """
        The reload after a stall has not ended in C{catch_up_seconds}:
        consumer keys are served from the table as it is.
        """
        self._catching_up = None
        self._warned = True
        self._log.warn(
            "the consumers' reload after the event loop stood still has not ended in {seconds:g} s (the database "
            "does not answer): consumer keys are served from the table as it was, which may lack changes made "
            "elsewhere meanwhile (a revoked key may still work here), and /readyz answers 503, until a reload "
            "succeeds",
            seconds=self.catch_up_seconds,
        )
