"""
Text cut for a message or a log line.
"""

from __future__ import annotations

#: What ends a text that was cut.
ELLIPSIS = "…"


def shortened(text: str, limit: int) -> str:
    """
    C{text} when it holds at most C{limit} characters, else its first
    C{limit - 1} and L{ELLIPSIS} (C{limit} characters in all).
    """
    if len(text) <= limit:
        return text
    return text[: limit - 1] + ELLIPSIS
