"""
Things under way (calls, open connections) and a way to wait until none is
left: what a stop needs once it has closed the listener and asked every
connection to close, or stopped taking calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, succeed

T = TypeVar("T")


class Outstanding:
    """
    How many things are under way, and L{Deferred}s that fire once none is.

    The one "fire when the last one goes" of the code base (issue #16):
    L{OpenConnections} counts with it, and so do the API's calls waiting on
    a provider.
    """

    def __init__(self) -> None:
        self._count = 0
        self._waiting: list[Deferred[None]] = []

    def add(self) -> None:
        """
        One more is under way.
        """
        self._count += 1

    def done(self) -> None:
        """
        One has ended; when it was the last, fire every L{Deferred} from
        L{none_left}.

        @raise ValueError: when none was under way.
        """
        if not self._count:
            raise ValueError("done() without a matching add()")
        self._count -= 1
        if not self._count and self._waiting:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def none_left(self) -> Deferred[None]:
        """
        A L{Deferred} that fires with L{None} once none is under way: at
        once if none is.  Cancelling it (a stop bounds its wait with
        C{addTimeout}) ends the wait and forgets it.
        """
        if not self._count:
            return succeed(None)
        d: Deferred[None] = Deferred(self._waiting.remove)
        self._waiting.append(d)
        return d

    def __len__(self) -> int:
        return self._count


class OpenConnections(Generic[T]):
    """
    A set of open connections (of any type) that tells when the last one
    has gone.

    Connections are added when they open and discarded when they close;
    L{all_closed} gives a L{Deferred} that fires once the set is empty.
    """

    def __init__(self) -> None:
        self._open: set[T] = set()
        self._outstanding = Outstanding()

    def add(self, connection: T) -> None:
        if connection not in self._open:
            self._open.add(connection)
            self._outstanding.add()

    def discard(self, connection: T) -> None:
        """
        Forget C{connection} (nothing happens if it is not here); when it
        was the last one, fire every L{Deferred} from L{all_closed}.
        """
        if connection in self._open:
            self._open.remove(connection)
            self._outstanding.done()

    def all_closed(self) -> Deferred[None]:
        """
        A L{Deferred} that fires with L{None} once no connection is open: at
        once if none is.  Cancelling it only stops the wait (and forgets
        it); the connections are left alone.
        """
        return self._outstanding.none_left()

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[T]:
        # A copy: closing a connection while iterating discards it.
        return iter(list(self._open))

    def __contains__(self, connection: object) -> bool:
        return connection in self._open


__all__ = ["OpenConnections", "Outstanding"]
