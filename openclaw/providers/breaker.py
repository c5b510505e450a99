"""
A passive circuit breaker per provider (L{CircuitBreaker}): no probes of
its own, it only watches the outcome of real calls.

After C{threshold} consecutive failures of the provider's own kind (5xx,
timeout, connection, a 2xx body cut or malformed), it opens for C{cooldown} seconds: calls are not
sent.  Then one call is let through (half-open); its success closes the
breaker, its failure opens it again.  (Martin Fowler, "CircuitBreaker",
2014; Nygard, "Release It!", ch. 5.)
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

import attrs


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@attrs.define(eq=False)
class CircuitBreaker:
    """
    Plain object; time read from C{clock} (C{reactor.seconds}).

    @ivar on_change: called with C{(previous, new)} state on every change.
    """

    clock: Callable[[], float] = attrs.field(repr=False)
    #: Consecutive failures that open it (C{BREAKER_FAILURES}).
    threshold: int = 5
    #: Seconds it stays open (C{BREAKER_COOLDOWN_SECONDS}).
    cooldown: float = 30.0
    on_change: Callable[[BreakerState, BreakerState], None] = attrs.field(default=lambda old, new: None, repr=False)
    _state: BreakerState = attrs.field(default=BreakerState.CLOSED, init=False)
    _failures: int = attrs.field(default=0, init=False)
    _opened_at: float = attrs.field(default=0.0, init=False)
    #: In half-open: the one trial call is under way.
    _trial: bool = attrs.field(default=False, init=False)

    @property
    def state(self) -> BreakerState:
        """
        The state now: an open breaker whose cooldown is over reads as
        half-open.
        """
        if self._state is BreakerState.OPEN and self.remaining() <= 0:
            self._become(BreakerState.HALF_OPEN)
        return self._state

    def remaining(self) -> float:
        """
        Seconds of cooldown left (0 unless open).
        """
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown - self.clock())

    def would_allow(self) -> bool:
        """
        Whether L{allow} would let a call through now (without taking the
        half-open trial).
        """
        state = self.state
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self._trial)

    def allow(self) -> bool:
        """
        May a call go now?  In half-open, the first caller gets the trial
        and must report its outcome (L{succeeded}, L{failed} or
        L{abandoned}).
        """
        if not self.would_allow():
            return False
        if self._state is BreakerState.HALF_OPEN:
            self._trial = True
        return True

    def succeeded(self) -> None:
        """
        A call got an answer from the provider: a whole answer read and
        accepted, a stream's first event relayed (or its model's own
        failure).  2xx headers alone are not one, nor a refusal of the
        request or key (L{abandoned}: it says nothing of completions).
        """
        self._failures = 0
        self._trial = False
        if self._state is not BreakerState.CLOSED:
            self._become(BreakerState.CLOSED)

    def failed(self) -> None:
        """
        A call failed on the provider's side: 5xx, timeout (headers, body,
        or a stream's first event), connection, a 2xx body cut or
        malformed, a stream failing before its first event.
        """
        self._trial = False
        self.unreachable()

    def unreachable(self) -> None:
        """
        A call that is not the half-open trial (embeddings, a models
        listing) could not reach the provider at all: a failure, but the
        trial under way, if any, keeps its place (only it may close the
        breaker, and no second trial is let through meanwhile).
        """
        if self._state is BreakerState.HALF_OPEN:
            return self._open()
        if self._state is BreakerState.OPEN:
            return None
        self._failures += 1
        if self._failures >= self.threshold:
            self._open()
        return None

    def abandoned(self) -> None:
        """
        A call let through ended with no verdict (its client went away):
        the half-open trial is free for the next call.
        """
        self._trial = False

    def _open(self) -> None:
        self._opened_at = self.clock()
        self._failures = 0
        self._become(BreakerState.OPEN)

    def _become(self, state: BreakerState) -> None:
        previous, self._state = self._state, state
        if previous is not state:
            self.on_change(previous, state)


__all__ = ["BreakerState", "CircuitBreaker"]
