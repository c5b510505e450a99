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

import attrs

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
        if entries and entries[-1][0] > now:
            # The wall clock was set back (README, "The host's clock"):
            # what was counted "later" than now counts as counted now, so
            # the window still holds it for L{WINDOW_SECONDS}, not for as
            # long as the clock went back (an hour's lockout of a
            # per-minute limit).
            self._entries = entries = deque((min(at, now), amount) for at, amount in entries)
        horizon = now - WINDOW_SECONDS
        while entries and entries[0][0] <= horizon:
            self.total -= entries.popleft()[1]

    def used(self, now: float) -> int:
        self._expire(now)
        return self.total

    def newest(self) -> float | None:
        """
        When the latest amount in the window was counted (POSIX seconds),
        or L{None} for an empty window; call L{used} first to expire old
        ones.
        """
        return self._entries[-1][0] if self._entries else None

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
        # A reservation admitted "later" than now (the clock set back)
        # leaves as one admitted now would.
        held = [(min(at, now), amount) for at, amount in held]
        remaining = self.total + sum(amount for _, amount in held)
        for at, amount in heapq.merge(self._entries, held):
            remaining -= amount
            if remaining < limit:
                return max(1, math.ceil(at + WINDOW_SECONDS - now))
        return 1


def duration(seconds: float) -> str:
    """
    A duration as OpenAI's C{x-ratelimit-reset-*} headers write one
    (C{"1s"}, C{"6m0s"}): whole seconds, rounded up.
    """
    minutes, rest = divmod(max(0, math.ceil(seconds)), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def reset_after(newest: float | None, now: float, window: float = WINDOW_SECONDS) -> float:
    """
    Seconds until a window whose latest amount was counted at C{newest}
    is empty again (0 for an empty one): what OpenAI calls the time until
    the limit "resets to its initial state".

    @param window: how long the window counts an amount, in seconds
        (a cluster's, counting whole seconds:
        L{openclaw.consumers.shared.CLUSTER_WINDOW_SECONDS} from the
        start of C{newest}'s second).
    """
    return 0.0 if newest is None else min(window, max(0.0, newest + window - now))


@attrs.frozen
class RateLimits:
    """
    A consumer's per-minute limits as an admitted call left them, for the
    headers OpenAI's API sends with every answer
    (U{https://platform.openai.com/docs/guides/rate-limits}, "Rate limits
    in headers"): C{x-ratelimit-limit-requests},
    C{x-ratelimit-remaining-requests}, C{x-ratelimit-reset-requests} and
    the same three for C{-tokens}, each only for a limit the consumer has
    (C{rpm}, C{tpm}).  The remaining tokens take away those reserved by
    calls in flight, this one's included; the reset is the time until the
    sliding window holds nothing again.
    """

    #: C{rpm}, or L{None}: no requests limit (and no C{-requests} headers).
    requests: int | None = None
    remaining_requests: int = 0
    #: Seconds until the requests window is empty.
    reset_requests: float = 0.0
    #: C{tpm}, or L{None}: no tokens limit (and no C{-tokens} headers).
    tokens: int | None = None
    remaining_tokens: int = 0
    #: Seconds until the tokens window (and the reservations) is empty.
    reset_tokens: float = 0.0

    def headers(self) -> list[tuple[bytes, bytes]]:
        """
        The C{x-ratelimit-*} header fields, as (name, value) pairs.
        """
        fields = []
        for what, limit, remaining, reset in (
            (b"requests", self.requests, self.remaining_requests, self.reset_requests),
            (b"tokens", self.tokens, self.remaining_tokens, self.reset_tokens),
        ):
            if limit is not None:
                fields += [
                    (b"x-ratelimit-limit-" + what, b"%d" % limit),
                    (b"x-ratelimit-remaining-" + what, b"%d" % max(0, remaining)),
                    (b"x-ratelimit-reset-" + what, duration(reset).encode("ascii")),
                ]
        return fields


__all__ = ["WINDOW_SECONDS", "RateLimits", "SlidingWindow", "duration", "reset_after"]
