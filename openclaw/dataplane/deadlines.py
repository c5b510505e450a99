"""
The deadlines of one API connection (L{openclaw.dataplane.connection.APIConnection})
as a plain object over a clock: which timers run, what each is for, and which
of the connection's callbacks runs when one is due.  No transport, no
protocol: the connection passes its events on (a request's head or body in,
an answer finished, the transport pausing and resuming it, a close begun,
the loss) and does what a callback says (a 408, a 401, an abort).

The timers, each at most one per connection:

  - the request's deadline (C{API_HEADER_TIMEOUT_SECONDS},
    C{API_BODY_TIMEOUT_SECONDS}, C{API_SEND_TIMEOUT_SECONDS}): one timer,
    moved (C{IDelayedCall.reset}) from one step of a request to the next
    rather than cancelled and made again, which is cheaper at every request;
  - the keyless deadline (C{API_KEYLESS_TIMEOUT_SECONDS}), after its grace;
  - a lingering close's quiet timer;
  - the close deadline, the abort at the end of a close.

The request's and the keyless deadline, found due more than
L{LATE_SECONDS <openclaw.stalls.LATE_SECONDS>} after their time (the event
loop stood still), are judged one turn of the loop later
(L{openclaw.stalls.overdue}); the request's, then again while the
request goes on arriving (L{openclaw.stalls.CatchingUp}: a large body
takes several turns to read).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from openclaw.stalls import CatchingUp, nothing_arrived, overdue

#: The setting a large answer's parts, and what was written while the
#: transport has the connection paused, are each to be taken within: a
#: deadline of this setting is the send deadline (L{ConnectionDeadlines}'s
#: C{stalled}), any other a request's (its C{late}).
SEND_TIMEOUT = "API_SEND_TIMEOUT_SECONDS"

#: A deadline: C{(seconds, setting, part)}, where C{seconds} is how long
#: it gave, C{setting} the setting that says so (such as
#: C{"API_HEADER_TIMEOUT_SECONDS"}) and C{part} what had to come or go
#: within it (C{"its head"}): the words of its 408 and log line.
Deadline = tuple[float, str, str]


class ConnectionDeadlines:
    """
    The timers of one API connection, over C{clock}.

    The request's deadline: L{arm} starts it (or moves it), L{disarm} drops
    it (its timer, if running, then fires to no effect: it is moved again
    at the next L{arm}, not cancelled).  Due, it calls C{stalled} for a
    deadline of L{SEND_TIMEOUT}, else C{late}, once, with the deadline's
    C{(seconds, setting, part)}.  While the transport has the connection
    paused (L{pause} to L{resume}) the send deadline is the one in force,
    and the request's deadline waits: armed meanwhile, it is kept, and runs
    afresh (its whole C{seconds}) at the resume.

    The keyless deadline (L{start_keyless}): C{grace_over} at the end of
    the grace, which says whether the deadline follows; then C{keyless}.

    Once a close began (L{close}) or the connection is lost (L{lost}),
    none of these runs any more, nor can be started again.

    @param clock: the reactor's time (C{twisted.internet.task.Clock} in
        tests).
    @param late: called with C{(seconds, setting, part)} when a request's
        deadline is due.
    @param stalled: likewise for the send deadline.
    @param grace_over: called when the keyless grace is over; returns
        C{True} for the keyless deadline to follow.
    @param keyless: called when the keyless deadline is due.
    """

    __slots__ = (
        "_armed",
        "_catching_up",
        "_clock",
        "_close_timer",
        "_closed",
        "_grace_over",
        "_in_grace",
        "_keyless",
        "_keyless_rest",
        "_keyless_timer",
        "_last_heard",
        "_late",
        "_off",
        "_paused",
        "_quiet",
        "_quiet_seconds",
        "_quiet_timer",
        "_stalled",
        "_suspended",
        "_timer",
    )

    def __init__(
        self,
        clock: IReactorTime,
        *,
        late: Callable[[float, str, str], object],
        stalled: Callable[[float, str, str], object],
        grace_over: Callable[[], bool],
        keyless: Callable[[], object],
        arrived: Callable[[], int] = nothing_arrived,
    ) -> None:
        """
        @param arrived: the bytes the connection has received so far.
        """
        self._clock = clock
        self._catching_up = CatchingUp(arrived)
        self._late = late
        self._stalled = stalled
        self._grace_over = grace_over
        self._keyless = keyless
        #: The request's timer, and the deadline it is for (None: it
        #: fires to no effect).
        self._timer: IDelayedCall | None = None
        self._armed: Deadline | None = None
        #: The transport has the connection paused, and the request's
        #: deadline that waits for the resume.
        self._paused = False
        self._suspended: Deadline | None = None
        #: No request deadline is armed any more (HTTP/2, a close, the loss).
        self._off = False
        #: A close began, or the connection is lost.
        self._closed = False
        self._keyless_timer: IDelayedCall | None = None
        #: The keyless timer is on the grace (then on the deadline, after
        #: C{_keyless_rest} more seconds).
        self._in_grace = False
        self._keyless_rest = 0.0
        self._quiet_timer: IDelayedCall | None = None
        self._quiet: Callable[[], object] | None = None
        self._quiet_seconds = 0.0
        self._last_heard = 0.0
        self._close_timer: IDelayedCall | None = None

    @property
    def closing(self) -> bool:
        """
        A close began (L{close}), or the connection is lost (L{lost}).
        """
        return self._closed

    def arm(self, seconds: float, setting: str, part: str) -> None:
        """
        The request's deadline, C{seconds} from now (in place of any
        other): the one timer moved, or started if none runs.  While the
        connection is paused, it waits for the resume instead; once
        request deadlines are off (L{end_request_deadlines}, L{close},
        L{lost}), nothing.

        @param setting: the setting that gives C{seconds}; L{SEND_TIMEOUT}
            for the send deadline.
        @param part: what must come (or go) within it, for the 408 and log.
        """
        if self._off:
            return
        if self._paused:
            self._suspended = (seconds, setting, part)
            return
        self._armed = (seconds, setting, part)
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(seconds)
        else:
            self._timer = self._clock.callLater(seconds, self._due)

    def disarm(self) -> None:
        """
        No request deadline (while paused: none waits for the resume; the
        send deadline holds).
        """
        if self._paused:
            self._suspended = None
        else:
            self._armed = None

    def drop_request_deadline(self) -> Deadline | None:
        """
        Take away the deadline the request had (the one waiting for the
        resume, while paused), for the keyless deadline to act in its
        place.

        @return: C{(seconds, setting, part)}, or None if none was armed.
        """
        if self._paused:
            armed, self._suspended = self._suspended, None
        else:
            armed, self._armed = self._armed, None
        return armed

    def end_request_deadlines(self) -> None:
        """
        No request deadline from now on (an HTTP/2 connection: twisted.web's
        idle timeout takes their place); the keyless deadline goes on.
        """
        self._off = True
        self.disarm()

    def pause(self, seconds: float, part: str) -> None:
        """
        The transport has paused the connection: what was written must be
        taken within C{seconds} (the send deadline, L{SEND_TIMEOUT}, from
        the first pause: a pause while paused does not move it), and the
        request's deadline waits for the L{resume}.
        """
        if self._paused or self._off:
            return
        self._suspended = self._armed
        self._armed = None
        self.arm(seconds, SEND_TIMEOUT, part)
        self._paused = True

    def resume(self) -> None:
        """
        The transport has resumed the connection: the send deadline ends,
        and the request's deadline that waited runs again, afresh.
        """
        if self._paused:
            self._paused = False
            suspended, self._suspended = self._suspended, None
            if suspended is None:
                self._armed = None
            else:
                self.arm(*suspended)

    def _due(self) -> None:
        if self._catching_up.put_off(self._timer, self._clock):
            # Judged after what the stall left in the socket is read.
            self._timer = self._clock.callLater(0, self._due)
            return
        self._timer = None
        armed, self._armed = self._armed, None
        if armed is None:
            return
        if armed[1] == SEND_TIMEOUT:
            self._stalled(*armed)
        else:
            self._late(*armed)

    def start_keyless(self, grace: float, timeout: float) -> None:
        """
        The keyless deadline, C{timeout} seconds from now, after a grace of
        C{grace} seconds (none if C{grace} is not shorter): one timer, on
        the grace, then moved on to the deadline if C{grace_over} says so.
        """
        self._in_grace = grace < timeout
        self._keyless_rest = timeout - grace
        self._keyless_timer = self._clock.callLater(min(grace, timeout), self._keyless_due)

    def stop_keyless(self) -> None:
        """
        No keyless deadline (nor grace) any more.
        """
        timer, self._keyless_timer = self._keyless_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _keyless_due(self) -> None:
        if overdue(self._keyless_timer, self._clock):
            # As the request's deadline (L{_due}): a key may be waiting.
            self._keyless_timer = self._clock.callLater(0, self._keyless_due)
            return
        self._keyless_timer = None
        if self._in_grace:
            self._in_grace = False
            if self._grace_over() and not self._closed:
                self._keyless_timer = self._clock.callLater(self._keyless_rest, self._keyless_due)
            return
        self._keyless()

    def start_quiet(self, seconds: float, quiet: Callable[[], object]) -> None:
        """
        A lingering close began: C{quiet} is called once nothing was heard
        (L{heard}) for C{seconds}.  One timer, not moved at every read:
        when due, it checks the time since the last, and runs on for
        what is left of C{seconds} from then.
        """
        self._quiet = quiet
        self._quiet_seconds = seconds
        self._last_heard = self._clock.seconds()
        self._quiet_timer = self._clock.callLater(seconds, self._quiet_due)

    def heard(self) -> None:
        """
        Bytes came (during a lingering close).
        """
        self._last_heard = self._clock.seconds()

    def _quiet_due(self) -> None:
        clock = self._clock
        left = self._last_heard + self._quiet_seconds - clock.seconds()
        if left > 0:
            self._quiet_timer = clock.callLater(left, self._quiet_due)
            return
        self._quiet_timer = None
        assert self._quiet is not None
        self._quiet()

    def close(self, seconds: float, overdue: Callable[[], object]) -> None:
        """
        A close began: no request or keyless deadline any more (a lingering
        close's quiet timer goes on), and C{overdue} (an abort) is called
        in C{seconds} unless the connection is lost before (L{lost}).  Once
        only: a second close, or one after the loss, does nothing.
        """
        if self._closed:
            return
        self._closed = self._off = True
        self._armed = self._suspended = None
        self.stop_keyless()
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._close_timer = self._clock.callLater(seconds, overdue)

    def lost(self) -> None:
        """
        The connection is lost: every timer is cancelled, and none starts
        again.
        """
        self._closed = self._off = True
        self._armed = self._suspended = None
        self.stop_keyless()
        timers = (self._timer, self._quiet_timer, self._close_timer)
        self._timer = self._quiet_timer = self._close_timer = None
        for timer in timers:
            if timer is not None and timer.active():
                timer.cancel()
