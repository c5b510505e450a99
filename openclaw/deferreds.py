"""
An operation under way that several callers wait for.

A Deferred handed to several callers is one chain: what the first one's
callbacks return or raise is what the next one's are given, and a callback
returning a Deferred not yet fired holds up every callback after it.
L{InFlight} gives each caller a Deferred of its own instead.  And a caller
that cancels the Deferred it was given must not stop what runs on (a file
write in another thread): L{shielded}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

T = TypeVar("T")

_log = Logger()


class InFlight(Generic[T]):
    """
    One operation under way, and the callers waiting for it: each gets a
    Deferred of its own (L{observe}), firing with the operation's result,
    or failing with its failure, once its owner says it has ended
    (L{end}); what one caller's callbacks return or raise is that caller's
    alone.

    @ivar ended: L{end} has been called.
    """

    def __init__(self) -> None:
        self.ended = False
        #: Once ended: its failure, or its result (in a 1-tuple).
        self._outcome: Failure | tuple[T] | None = None
        self._observers: list[Deferred[T]] = []

    def observe(self) -> Deferred[T]:
        """
        A new Deferred, firing (failing) as the operation ends: at once if
        it has.
        """
        outcome = self._outcome
        if isinstance(outcome, Failure):
            return fail(outcome)
        if outcome is not None:
            return succeed(outcome[0])
        observer: Deferred[T] = Deferred()
        self._observers.append(observer)
        return observer

    def end(self, result: T | Failure) -> bool:
        """
        The operation has ended with C{result}: fire every caller's
        Deferred with it, in the order they were asked for (a failure
        given to none is the owner's to log).

        @return: whether a caller still waiting was given it: False when
            none was asked for, or each one asked for was cancelled (its
            caller gave up: what it is fired with now is dropped).
        @raise AssertionError: it had ended already.
        """
        assert not self.ended, "InFlight.end called twice"
        self.ended = True
        self._outcome = result if isinstance(result, Failure) else (result,)
        observers, self._observers = self._observers, []
        # Only end fires them: one fired already was cancelled.
        waiting = [observer for observer in observers if not observer.called]
        for observer in observers:
            if isinstance(result, Failure):
                observer.errback(result)
            else:
                observer.callback(result)
        return bool(waiting)


def shielded(pending: Deferred[T], dropped: Callable[[Failure], object]) -> Deferred[T]:
    """
    A Deferred firing as C{pending} does (with its result or its failure),
    whose cancellation does not reach C{pending}: what C{pending} stands
    for (a write under way in another thread, the state it changes once
    done) runs to its end and its callbacks run.  Once the returned
    Deferred is cancelled, C{pending}'s result is dropped: a failure is
    given to C{dropped} instead (to log: who asked gave up on it, and
    nothing else would say it failed).  Reactor thread.

    @param dropped: called with C{pending}'s failure when the returned
        Deferred was cancelled before C{pending} failed; what it returns
        or raises is ignored (a raise is logged).
    """
    given: Deferred[T] = Deferred()

    def fire(result: object) -> None:
        if given.called:
            # Cancelled (a Deferred without a canceller fails with
            # CancelledError, and suppresses the later call).
            if isinstance(result, Failure):
                try:
                    dropped(result)
                except Exception:
                    _log.failure("reporting a failure its asker gave up on failed")
            return
        if isinstance(result, Failure):
            given.errback(result)
        else:
            given.callback(result)  # type: ignore[arg-type]

    pending.addBoth(fire)
    return given
