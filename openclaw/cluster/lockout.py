"""
The auth lockout counted across a cluster (L{SharedLockout}): the control
plane's handshake path asks only this instance's L{AuthLockout} (never
waiting on Redis); each failure is also counted in the store, and a lockout
decided there (or on any instance) is published and imposed on every
instance.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from openclaw.cluster.node import ClusterNode
from openclaw.control.lockout import AuthLockout


class SharedLockout:
    """
    A L{openclaw.control.lockout.LockoutStore} shared through a
    L{ClusterNode}.

    Locally it is C{local} (a sliding window per instance), which stands
    alone while the store is away.  In the store each client key has a
    counter that expires C{window} seconds after the first failure it
    counts (a fixed window: one C{INCR} and C{PEXPIRE} in a Lua script);
    C{failures} failures in it, from any instances, lock the client out on
    every instance for C{duration} seconds.

    @param on_locked: called with the client key when a lockout this
        instance did not decide itself arrives (to count and log it).
    @param on_imposed: called with the client key when a lockout decided by
        the cluster (not by this instance's own count) is imposed here: the
        control plane closes that client's unauthenticated connections
        (L{openclaw.control.protocol.ControlFactory.close_locked_out}).
    """

    _log = Logger()

    def __init__(
        self,
        local: AuthLockout,
        node: ClusterNode,
        on_locked: Callable[[str], None] = lambda key: None,
        on_imposed: Callable[[str], None] = lambda key: None,
    ) -> None:
        self.local = local
        self.node = node
        self._on_locked = on_locked
        self._on_imposed = on_imposed

    def record_failure(self, client: str) -> float | None:
        key = self.local.key(client)
        if key is None:
            return None
        already = self.local.locked_until(client) is not None
        until = self.local.record_failure(client)
        if not already:
            self.node.count_failure(
                key, self.local.window, self.local.failures, self.local.duration, until is not None
            ).addCallback(self._counted, key, until is not None).addErrback(
                lambda failure: self._log.failure("lockout of {key} not imposed", failure, key=key)
            )
        return until

    def _counted(self, locked: bool, key: str, here: bool) -> None:
        if locked and not here:
            self.impose(key, self.local.duration, decided=True)

    def locked_until(self, client: str) -> float | None:
        return self.local.locked_until(client)

    def impose(self, key: str, seconds: float, decided: bool = False) -> None:
        """
        Lock C{key} out for C{seconds} (from the cluster's count, or from
        another instance's message): a duration, counted from now on the
        local lockout's monotonic clock, as no instance's clock reading
        means anything on another.
        """
        if self.local.impose(key, self.local.clock() + seconds):
            self._log.warn(
                "locked out {client} for {seconds:.1f} s: too many failed authentications across the cluster"
                if decided
                else "locked out {client} for {seconds:.1f} s (decided by another instance of the cluster)",
                client=key,
                seconds=seconds,
                outcome="locked_out",
                reason="auth_lockout",
            )
            if decided:
                self._on_locked(key)
            self._on_imposed(key)
