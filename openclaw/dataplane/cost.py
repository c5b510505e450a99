"""
What one chat call costs, as the metrics count it: the time it spent
waiting on its provider (so that the rest is the gateway's own).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs


@attrs.define
class ProviderWait:
    """
    The time, in seconds, a call spends waiting on its provider: for the
    response headers, then for each read of the body (a whole answer's, or
    each gap between a stream's reads).  The gateway's own time is the
    call's whole time minus L{waited}.

    Waits do not nest: L{begin} while waiting and L{end} while not are
    no-ops, so each step can say where it stands without knowing the last.

    @ivar clock: seconds, as C{IReactorTime.seconds}.
    """

    clock: Callable[[], float]
    waited: float = 0.0
    _since: float | None = None

    def begin(self) -> None:
        """
        The call now waits on its provider.
        """
        if self._since is None:
            self._since = self.clock()

    def end(self, now: float | None = None) -> None:
        """
        The provider has answered (headers, or a read of the body), at
        C{now} if the caller has read the clock already.
        """
        since = self._since
        if since is not None:
            self.waited += (self.clock() if now is None else now) - since
            self._since = None


__all__ = ["ProviderWait"]
