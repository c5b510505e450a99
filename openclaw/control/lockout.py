"""
Lockout across connections: a client address that fails to authenticate
too often within a window is refused for a while, however many
connections it spreads its guesses over.

The policy (L{AuthLockout}) is a plain object on an injected clock; the
gateway uses it through the two methods of L{LockoutStore}, so a store
shared by several processes can take its place.

The gateway gives it a monotonic clock (C{time.monotonic}, POSIX's
C{CLOCK_MONOTONIC}), not the wall clock (the reactor's C{seconds()} is
C{time.time}): its times are only compared within the process, and a
wall clock stepped back (an NTP step, a virtual machine resumed) made a
20 s lockout one of an hour, stepped forward it cut it short.  A cluster shares lockouts as durations, never as these times
(L{openclaw.cluster.lockout.SharedLockout}).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from openclaw.control.admission import client_key, normalise
from openclaw.settings import Settings
from openclaw.settings.values import IPNetwork

#: Client addresses tracked at most, in each of the failure and lockout
#: tables; past it the oldest entry is forgotten, so an attacker with many
#: addresses cannot grow the tables without limit.
MAX_TRACKED_CLIENTS = 65536


class LockoutStore(Protocol):
    """
    What the control plane needs of a lockout.  C{client} is the client's
    IP address as text (the TCP peer, or the client a trusted proxy named);
    times are seconds on the store's clock, a monotonic one whose readings
    mean something only within this process (L{AuthLockout}): the caller
    takes the time left from the same clock.
    """

    def record_failure(self, client: str) -> float | None:
        """
        Count one failed authentication from C{client}.

        @return: when this failure locked the client out, the time the
            lockout ends; else L{None} (not enough failures yet, exempt, or
            already locked out).
        """

    def locked_until(self, client: str) -> float | None:
        """
        The time C{client}'s lockout ends, or L{None} when it is not locked out.
        """


class AuthLockout:
    """
    An in-memory L{LockoutStore}.

    C{failures} failed authentications within C{window} seconds from one
    client lock it out for C{duration} seconds.  Clients are counted by
    L{client_key}: C{::ffff:a.b.c.d} is C{a.b.c.d}, and an IPv6 address
    counts as its /64 (one host's usual allocation, RFC 6177).  Addresses in
    C{exempt} are never locked out.  At most C{max_clients} clients are
    tracked in each table; the oldest entry is forgotten first.

    @param clock: seconds on a monotonic clock (C{time.monotonic}; a
        test's C{Clock().seconds}): a wall clock's step would stretch or
        cut every lockout and window in force.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        failures: int = 10,
        window: float = 60.0,
        duration: float = 300.0,
        exempt: Iterable[IPNetwork] = (),
        max_clients: int = MAX_TRACKED_CLIENTS,
    ) -> None:
        self.clock = clock
        self.failures = failures
        self.window = window
        self.duration = duration
        self._exempt = tuple(exempt)
        self._max_clients = max_clients
        #: key -> times of its recent failures, oldest first; the dict is
        #: kept in order of each key's latest failure.
        self._recent: dict[str, deque[float]] = {}
        #: key -> end of its lockout, in order of locking.
        self._locked: dict[str, float] = {}

    @classmethod
    def from_settings(cls, settings: Settings, clock: Callable[[], float]) -> AuthLockout:
        """
        The lockout C{AUTH_LOCKOUT_*} describe.
        """
        return cls(
            clock,
            failures=settings.auth_lockout_failures,
            window=settings.auth_lockout_window_seconds,
            duration=settings.auth_lockout_seconds,
            exempt=settings.auth_lockout_exempt,
        )

    def key(self, client: str) -> str | None:
        """
        The key C{client} is counted by (L{client_key}), or L{None} when it
        is exempt or not an IP address.
        """
        return self._key(client)

    def impose(self, key: str, until: float) -> bool:
        """
        Lock C{key} out until C{until}, on this lockout's clock (a lockout
        decided elsewhere: another instance of a cluster, which tells its
        duration); L{True} if it was not locked out already.
        """
        if until <= self.clock():
            return False
        known = self._until(key)
        if known is None and len(self._locked) >= self._max_clients:
            del self._locked[next(iter(self._locked))]
        self._locked[key] = max(until, known or until)
        self._recent.pop(key, None)
        return known is None

    def _key(self, client: str) -> str | None:
        try:
            address = normalise(client)
        except ValueError:
            return None
        if any(address in network for network in self._exempt):
            return None
        return client_key(address)

    def record_failure(self, client: str) -> float | None:
        key = self._key(client)
        if key is None or self._until(key) is not None:
            return None
        now = self.clock()
        recent = self._recent.pop(key, None)
        if recent is None:
            if len(self._recent) >= self._max_clients:
                del self._recent[next(iter(self._recent))]
            recent = deque(maxlen=self.failures)
        recent.append(now)
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        if len(recent) < self.failures:
            self._recent[key] = recent
            return None
        if len(self._locked) >= self._max_clients:
            del self._locked[next(iter(self._locked))]
        until = self._locked[key] = now + self.duration
        return until

    def locked_until(self, client: str) -> float | None:
        key = self._key(client)
        return None if key is None else self._until(key)

    def _until(self, key: str) -> float | None:
        until = self._locked.get(key)
        if until is None:
            return None
        if until <= self.clock():
            del self._locked[key]
            return None
        return until

    def __len__(self) -> int:
        """
        Clients tracked: counting failures or locked out.
        """
        return len(self._recent) + len(self._locked)


__all__ = ["MAX_TRACKED_CLIENTS", "AuthLockout", "LockoutStore"]
