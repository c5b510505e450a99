"""
Files the gateway writes: replaced atomically, readable by its own user only.
"""

from __future__ import annotations

import os
import stat
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


class NotARegularFile(OSError):
    """
    A file read as an untrusted one (L{read_regular_file}) is not a regular
    file of a sane size; the message says what it is instead.
    """


def kind_of(mode: int) -> str:
    """
    What a file of C{mode} (from C{lstat}) is, for a message: C{"a
    symbolic link"}, C{"a FIFO"}, ...
    """
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_regular_file(path: Path, limit: int, follow_links: bool = False) -> bytes:
    """
    The bytes of C{path}, read without trusting what it is: a symbolic link
    is not followed (C{O_NOFOLLOW}) unless C{follow_links}, opening does
    not wait for a FIFO's writer (C{O_NONBLOCK}), anything but a regular
    file (C{fstat}) is refused, and so is a file of more than C{limit}
    bytes, unread; a file is read to its end (or C{limit + 1} bytes),
    however many reads that takes.

    @raise FileNotFoundError: there is no such file.
    @raise NotARegularFile: it is a link, a FIFO, a device, a socket, a
        directory, or too large; the message says which.
    @raise OSError: it cannot be opened or read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | (0 if follow_links else os.O_NOFOLLOW) | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            raise e from None
        if not stat.S_ISREG(mode):
            raise NotARegularFile(f"it is {kind_of(mode)}, not a regular file") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(f"it is {kind_of(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise NotARegularFile(f"it holds {info.st_size} bytes, more than the {limit} it may")
    except BaseException:
        os.close(fd)
        raise
    # A buffered reader's read(n) reads until n bytes or the end of the
    # file: a single read may return less on FUSE, NFS or 9p.
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise NotARegularFile(f"it holds more than the {limit} bytes it may")
    return data
