"""
The one way the gateway writes a point in time: ISO 8601 in UTC, with a
C{Z}.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal


def _moment(timestamp: float) -> datetime:
    """
    A POSIX timestamp as an aware UTC datetime; past year 9999 (or before
    year 1) the last (or first) moment a datetime holds.
    """
    try:
        return datetime.fromtimestamp(timestamp, UTC)
    except (OverflowError, ValueError, OSError):
        # Past what a datetime holds (a time stored by an earlier version
        # that took 9999-12-31T23:59:59.99999Z): shown as the last or first
        # second there is, never an error in the answer it is part of.
        return datetime.max.replace(tzinfo=UTC) if timestamp > 0 else datetime.min.replace(tzinfo=UTC)


def isoformat(timestamp: float, timespec: Literal["seconds", "milliseconds"] = "seconds") -> str:
    """
    Render a POSIX timestamp (seconds since the epoch) as ISO 8601 UTC:
    C{2026-11-25T02:39:29Z} to the second, or C{2026-11-25T02:39:29.250Z}
    with C{timespec="milliseconds"} (truncated, not rounded).  The token's
    expiry, C{status}'s C{started_at} and the C{time} of a JSON log line are
    all written this way.  A timestamp past year 9999 (or before year 1)
    is written as the last (or first) moment a datetime holds.
    """
    return _moment(timestamp).isoformat(timespec=timespec).removesuffix("+00:00") + "Z"


def compact(timestamp: float) -> str:
    """
    Render a POSIX timestamp in ISO 8601's basic format, UTC, to the
    second: C{20261202T135900Z}, for a file's name (no C{:}, which some
    tools read as a host or a drive): the C{.rescued-<time>} copy of a
    lost database and its C{.lost-<time>} companions.
    """
    return _moment(timestamp).strftime("%Y%m%dT%H%M%SZ")


__all__ = ["compact", "isoformat"]
