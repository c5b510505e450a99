"""
The cluster's clock (L{ClusterClock}): Redis's, as this instance knows it.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

#: How far (seconds) this host's clock may be from Redis's before the log
#: says so (L{ClusterClock}).
CLOCK_SKEW_WARN_SECONDS = 2.0


class ClusterClock:
    """
    The cluster's clock: Redis's (C{TIME}), as this instance knows it: its
    own (C{reactor.seconds}, POSIX seconds) plus the offset of Redis's from
    it, measured at each heartbeat and reload (the last one kept while
    Redis is away; 0 until measured).  Every instance judges the cluster's
    shared state (its token's expiry, the consumers' windows and budget
    periods) by it, so one whose clock is off (no NTP) does not see the
    cluster's token as expired nor open a new minute or day of its own.
    """

    _log = Logger()

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        #: Redis's clock less this host's, in seconds.
        self.offset = 0.0
        self._skewed = False

    def seconds(self) -> float:
        """
        Now, on the cluster's clock (POSIX seconds).
        """
        return self._reactor.seconds() + self.offset

    def measured(self, sent: float, received: float, redis: float) -> None:
        """
        Redis said its clock read C{redis} between C{sent} and C{received}
        (this host's clock): take the offset at the middle.  Logged when it
        passes L{CLOCK_SKEW_WARN_SECONDS}, and when it is back within.
        """
        self.offset = redis - (sent + received) / 2
        skewed = abs(self.offset) > CLOCK_SKEW_WARN_SECONDS
        if skewed and not self._skewed:
            self._log.warn(
                "this host's clock is {seconds:.1f} s {direction} the cluster store's (Redis's TIME): the cluster's "
                "limits, budgets and session token go by Redis's clock, this host's logs by its own; run NTP "
                "(chrony, systemd-timesyncd) on every host of the cluster and on Redis's",
                seconds=abs(self.offset),
                direction="ahead of" if self.offset < 0 else "behind",
            )
        elif self._skewed and not skewed:
            self._log.info("this host's clock is back within {limit:g} s of Redis's", limit=CLOCK_SKEW_WARN_SECONDS)
        self._skewed = skewed
