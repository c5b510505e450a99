"""
Files the gateway writes: replaced atomically, readable by its own user only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """
    Replace C{path} with C{text} (UTF-8) so that a reader or a crash sees the
    old content or the new, never half of either: a temporary file in the
    same directory, flushed to disk (C{fsync}), then renamed over C{path}.

    The temporary file is created with mode 0600 (L{tempfile.mkstemp}), so
    what it holds (a session token) is never readable by others, not even
    for an instant.

    @raise OSError: the directory is missing or not writable, or the disk is
        full; C{path} is then left as it was.
    """
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
