"""
The one way the gateway writes a point in time: ISO 8601 in UTC, with a
C{Z}.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal


def isoformat(timestamp: float, timespec: Literal["seconds", "milliseconds"] = "seconds") -> str:
    """
    Render a POSIX timestamp (seconds since the epoch) as ISO 8601 UTC:
    C{2026-11-25T02:39:29Z} to the second, or C{2026-11-25T02:39:29.250Z}
    with C{timespec="milliseconds"} (truncated, not rounded).  The token's
    expiry, C{status}'s C{started_at} and the C{time} of a JSON log line are
    all written this way.
    """
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec=timespec).removesuffix("+00:00") + "Z"


__all__ = ["isoformat"]
