"""
Which known name a mistyped one meant, for the "did you mean" of an
error or warning (a setting's name in an env file, a consumer's name in
a command).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

#: How alike (L{difflib.SequenceMatcher.ratio}, 0 to 1) a word and a
#: name must be for the name to be offered (C{GEMINI_MODLE}:
#: C{GEMINI_MODEL}; C{team1}: C{team01}).
CLOSE_CUTOFF = 0.8


def meant(word: str, names: Iterable[str], cutoff: float = CLOSE_CUTOFF) -> str | None:
    """
    The one of C{names} that C{word} most likely meant: the one equal to it
    but for case (C{T01}: C{t01}), else the closest case aside
    (L{difflib.get_close_matches}, at least C{cutoff} alike), else None.
    C{word} itself if it is one of C{names}.  Names equal but for case
    give the first of them in sorted order.
    """
    by_fold: dict[str, str] = {}
    for name in sorted(set(names)):
        if name == word:
            return name
        by_fold.setdefault(name.casefold(), name)
    folded = word.casefold()
    if folded in by_fold:
        return by_fold[folded]
    close = difflib.get_close_matches(folded, list(by_fold), n=1, cutoff=cutoff)
    return by_fold[close[0]] if close else None


__all__ = ["CLOSE_CUTOFF", "meant"]
