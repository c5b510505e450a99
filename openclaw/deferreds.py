"""
An operation under way that several callers wait for.

A Deferred handed to several callers is one chain: what the first one's
callbacks return or raise is what the next one's are given, and a callback
returning a Deferred not yet fired holds up every callback after it.
L{InFlight} gives each caller a Deferred of its own instead.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

T = TypeVar("T")


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

    def end(self, result: T | Failure) -> None:
        """
        The operation has ended with C{result}: fire every caller's
        Deferred with it, in the order they were asked for (a failure
        given to none is the owner's to log).

        @raise AssertionError: it had ended already.
        """
        assert not self.ended, "InFlight.end called twice"
        self.ended = True
        self._outcome = result if isinstance(result, Failure) else (result,)
        observers, self._observers = self._observers, []
        for observer in observers:
            if isinstance(result, Failure):
                observer.errback(result)
            else:
                observer.callback(result)
