"""
Per-minute limits over a sliding 60 s window, in memory (one instance):
the requests (C{rpm}) and tokens (C{tpm}) each consumer was admitted or
counted within the last 60 seconds, as a log of (time, amount) entries.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable

WINDOW_SECONDS = 60.0


class SlidingWindow:
    """
    Amounts counted within the last L{WINDOW_SECONDS}.  Memory: one entry
    per count within the window (bounded by the limit for requests, by the
    calls made for tokens).
    """

    def __init__(self) -> None:
        self._entries: deque[tuple[float, int]] = deque()
        self.total = 0

    def _expire(self, now: float) -> None:
        entries = self._entries
        horizon = now - WINDOW_SECONDS
        while entries and entries[0][0] <= horizon:
            self.total -= entries.popleft()[1]

    def used(self, now: float) -> int:
        self._expire(now)
        return self.total

    def add(self, now: float, amount: int = 1) -> None:
        if amount > 0:
            self._expire(now)
            self._entries.append((now, amount))
            self.total += amount

    def retry_after(self, now: float, limit: int, held: Iterable[tuple[float, int]] = ()) -> int:
        """
        Whole seconds until the window holds less than C{limit} (at least 1).

        @param held: (POSIX second, amount) entries counted as if in the
            window (a C{tpm} check's reservations of calls in flight, at
            their admission: their tokens leave the window no sooner than
            60 s after it), sorted by time.
        """
        self._expire(now)
        held = list(held)
        remaining = self.total + sum(amount for _, amount in held)
        for at, amount in heapq.merge(self._entries, held):
            remaining -= amount
            if remaining < limit:
                return max(1, math.ceil(at + WINDOW_SECONDS - now))
        return 1


__all__ = ["WINDOW_SECONDS", "SlidingWindow"]
