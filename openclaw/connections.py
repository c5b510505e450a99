"""
The open connections of a listener, and a way to wait until they are all
gone: what a stop needs once it has closed the listener and asked every
connection to close.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, succeed

T = TypeVar("T")


class OpenConnections(Generic[T]):
    """
    A set of open connections (of any type) that tells when the last one
    has gone.

    Connections are added when they open and discarded when they close;
    L{all_closed} gives a L{Deferred} that fires once the set is empty.
    """

    def __init__(self) -> None:
        self._open: set[T] = set()
        self._waiting: list[Deferred[None]] = []

    def add(self, connection: T) -> None:
        self._open.add(connection)

    def discard(self, connection: T) -> None:
        """
        Forget C{connection} (nothing happens if it is not here); when it
        was the last one, fire every L{Deferred} from L{all_closed}.
        """
        self._open.discard(connection)
        if not self._open and self._waiting:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def all_closed(self) -> Deferred[None]:
        """
        A L{Deferred} that fires with L{None} once no connection is open: at
        once if none is.  Cancelling it only stops the wait.
        """
        if not self._open:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[T]:
        # A copy: closing a connection while iterating discards it.
        return iter(list(self._open))

    def __contains__(self, connection: object) -> bool:
        return connection in self._open


__all__ = ["OpenConnections"]
