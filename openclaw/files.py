"""
Files the gateway writes: replaced atomically, readable by its own user
only; and lock files it holds for its lifetime (L{PidLock}).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import attrs

#: The longest path a UNIX socket's address holds (Linux's C{sun_path}:
#: 108 bytes, its last a NUL; unix(7)): the gateway's C{unix:} listeners
#: and C{openclawctl --url unix:PATH}.
MAX_UNIX_PATH_BYTES = 107

#: How often the files the gateway holds open in STATE_DIR (and its token
#: file's lock) are checked to be still at their paths, in seconds: the
#: lock files (L{openclaw.service.HeldLocks}), the consumers' SQLite database
#: (L{openclaw.consumers.service.ConsumersService}).
FILES_CHECK_SECONDS = 2.0


def named_uid(uid: int) -> str:
    """
    A user as the gateway's messages name one: C{uid 1001 (alice)}, the
    name from the user database (C{pwd.getpwuid}), or C{uid 1001} for a
    uid without an entry (a container's, a deleted user's).
    """
    try:
        name = pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return f"uid {uid}"
    return f"uid {uid} ({name})"


def neither_user_nor_root(euid: int) -> str:
    """
    How a refusal names the owners it trusts, the gateway's user (uid
    C{euid}) and root: once, when the gateway runs as root (operator trial
    s41: "neither the gateway's user, uid 0 (root), nor root").
    """
    if euid == 0:
        return "not root, the gateway's user"
    return f"neither the gateway's user, {named_uid(euid)}, nor root"


class OwnerNotKept(PermissionError):
    """
    L{write_atomically} was asked to keep the owner of the file it
    replaces, and this process may not give a file to that user
    (C{fchown(2)}: only root may); C{path} was left as it was.

    @ivar uid: the owner it has.
    @ivar gid: its group.
    """

    def __init__(self, path: Path, uid: int, gid: int) -> None:
        super().__init__(
            errno.EPERM, f"this user may not give the new file to the owner of {path}, {named_uid(uid)}, gid {gid}"
        )
        self.path = path
        self.uid = uid
        self.gid = gid


def write_atomically(
    path: Path,
    text: str,
    *,
    keep_owner: bool = False,
    fsync: Callable[[int], None] = os.fsync,
) -> None:
    """
    Replace C{path} with C{text} (UTF-8) so that a reader or a crash sees the
    old content or the new, never half of either: a temporary file in the
    same directory, flushed to disk (C{fsync}), then renamed over C{path},
    and the directory flushed to disk (C{fsync} of it, L{_sync_directory}):
    once this returns the rename survives a power failure too (rename(2)
    changes the directory, which without its own C{fsync} may reach the
    disk long after).

    The temporary file is created with mode 0600 (L{tempfile.mkstemp}), so
    what it holds (a session token) is never readable by others, not even
    for an instant, and is given mode 0600 whatever the umask took away
    (twistd's C{--umask 0777} made a token file of mode 0000, which not
    even its owner's C{openclawctl} could read).

    @param keep_owner: give the new file the owner and group of the file
        at C{path} (C{lstat}), when there is one, before the rename, as
        C{install(1)} and editors do: root replacing a file of the
        gateway's user leaves it the gateway's, which it can still read at
        mode 0600.  Only when the directory belongs to that owner too (the
        gateway's own, C{/run/openclaw}), where it could replace the file
        anyway: another user's file in a directory not theirs (a sticky
        C{/tmp}) is replaced by one of this process's, so that whoever
        planted it is not handed the new content.  A group this process
        may not give (one it is not in) is left as it comes: at mode 0600
        it reads nothing.
    @param fsync: flushes an open descriptor to disk (C{os.fsync}), for
        the new file and its directory; a test gives one that counts or
        fails.
    @raise OwnerNotKept: C{keep_owner}, and the owner cannot be kept (this
        process is not root, nor the file's owner); C{path} is then left
        as it was.
    @raise OSError: the directory is missing or not writable, or the disk
        is full; C{path} is then left as it was.
    """

    def fill(fd: int, temporary: Path) -> None:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(fd, 0o600)
            if keep_owner:
                _give_to_owner_of(path, fd)
            f.write(text)
            f.flush()
            fsync(f.fileno())

    replace_atomically(path, fill, fsync=fsync)


def replace_atomically(
    path: Path, fill: Callable[[int, Path], None], *, fsync: Callable[[int], None] = os.fsync
) -> None:
    """
    Make C{path} anew so that a reader or a crash sees the old file or the
    new, never half of either: C{fill(fd, temporary)} writes the new file
    into a temporary one in the same directory (L{tempfile.mkstemp}: mode
    0600, named C{.<name>.<random>}), given open as C{fd}, which C{fill}
    closes; it is then renamed over C{path}, and the directory flushed to
    disk (L{_sync_directory}).  L{write_atomically}'s text files and the
    rescued copy of a lost SQLite database are made this way.

    @param fill: writes the new file and closes C{fd}; what it writes is
        its to flush to disk.
    @param fsync: flushes the directory (C{os.fsync}); a test gives one
        that counts or fails.
    @raise OSError: the directory is missing or not writable, the disk is
        full, or C{fill} failed; C{path} is then left as it was, and the
        temporary file removed.
    """
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        fill(fd, Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_directory(path.parent, fsync)


def _sync_directory(directory: Path, fsync: Callable[[int], None]) -> None:
    """
    Flush C{directory} to disk (C{fsync} of it, opened C{O_RDONLY |
    O_DIRECTORY}), after a rename in it.  Best effort: one that cannot be
    opened (a directory of write and search permission only) or flushed
    (C{EINVAL}: a file system that cannot, as SQLite's C{unixSync} and
    PostgreSQL's C{fsync_fname} ignore; also C{EIO}, which PostgreSQL
    reports) is left to the kernel, which writes it back within seconds:
    the rename is made and readers see the new content, and this
    function's callers take an C{OSError} to mean the file was left as it
    was, which it was not.
    """
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _give_to_owner_of(path: Path, fd: int) -> None:
    """
    Give the file open as C{fd} the owner and group of C{path}, if it
    differs and there is a file there (L{write_atomically}'s
    C{keep_owner}).

    @raise OwnerNotKept: the owner cannot be given.
    """
    try:
        old = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return
    new = os.fstat(fd)
    if old.st_uid != new.st_uid and os.stat(path.parent).st_uid != old.st_uid:
        # Another user's file in a directory not theirs (a sticky /tmp):
        # whoever planted it there would be handed the new content.  Kept
        # only where that user could replace the file anyway (its own
        # directory: the gateway's /run/openclaw).
        return
    if old.st_uid != new.st_uid:
        try:
            os.fchown(fd, old.st_uid, old.st_gid)
        except PermissionError:
            raise OwnerNotKept(path, old.st_uid, old.st_gid) from None
    elif old.st_gid != new.st_gid:
        # At mode 0600 the group reads nothing: one this process is not
        # in is not worth failing for.
        with contextlib.suppress(PermissionError):
            os.fchown(fd, -1, old.st_gid)


class NotARegularFile(OSError):
    """
    A file opened or read as an untrusted one (L{open_regular_file},
    L{read_regular_file}) is not a regular file of a sane size; the
    message says what it is instead.

    @ivar kind: what is there instead (L{kind_of}); None when it is a
        regular file, too large.
    """

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


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


@attrs.frozen
class StickyHeld:
    """
    What is at a path that this process may not replace or remove, for
    its directory's sticky bit (L{held_by_sticky_directory}).

    @ivar owner: the user id the entry belongs to.
    @ivar directory: its directory, as named.
    @ivar mode: the directory's mode (permission bits and sticky bit).
    """

    owner: int
    directory: Path
    mode: int


def held_by_sticky_directory(path: Path, euid: int | None = None) -> StickyHeld | None:
    """
    Whether what is at C{path} (a file, a link: C{lstat}) is kept from this
    process by the sticky bit of its directory: in a sticky directory
    (C{/tmp}, mode 1777) only the entry's owner, the directory's owner or
    a privileged process may remove it or rename another file over it
    (unlink(2) and rename(2), C{EPERM}; Linux's C{may_delete}), so a file
    another user put there first cannot be replaced by the new one written
    beside it (L{write_atomically}), nor removed at stop.  Root is taken
    as privileged (C{CAP_FOWNER}).

    @param euid: the user the question is for (default: this process's).
    @return: who holds it, or L{None}: this user may replace or remove it,
        nothing is there, or that cannot be told (its use then says why).
    """
    euid = os.geteuid() if euid is None else euid
    try:
        entry = os.lstat(path)
        directory = os.stat(path.parent)
    except OSError:
        return None
    if euid == 0 or euid in (entry.st_uid, directory.st_uid) or not directory.st_mode & stat.S_ISVTX:
        return None
    return StickyHeld(entry.st_uid, path.parent, stat.S_IMODE(directory.st_mode))


def open_regular_file(path: Path, flags: int, mode: int = 0o600) -> int:
    """
    A descriptor of C{path}, opened with C{os.open}'s C{flags} (and
    C{mode}, for a file C{O_CREAT} makes), which must be a regular file:
    opening does not wait for a FIFO's writer (C{O_NONBLOCK}), and a
    symbolic link is refused where C{flags} hold C{O_NOFOLLOW}.

    @raise NotARegularFile: something else is there; its C{kind} says what.
    @raise OSError: it cannot be opened.
    """
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        try:
            found = os.lstat(path).st_mode
        except OSError:
            raise e from None
        if not stat.S_ISREG(found):
            raise _not_regular(found) from None
        raise
    found = os.fstat(fd).st_mode
    if not stat.S_ISREG(found):
        os.close(fd)
        raise _not_regular(found)
    # O_NONBLOCK was for the open only: a write to a file on FUSE or NFS
    # could otherwise be cut short (EAGAIN).
    os.set_blocking(fd, True)
    return fd


def _not_regular(mode: int) -> NotARegularFile:
    kind = kind_of(mode)
    return NotARegularFile(f"it is {kind}, not a regular file", kind)


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
    fd = open_regular_file(path, os.O_RDONLY | (0 if follow_links else os.O_NOFOLLOW))
    try:
        info = os.fstat(fd)
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


class LockHeld(Exception):
    """
    Another process holds the lock of a L{PidLock}: C{pid} is the process
    id written in its lock file, or L{None} when it cannot be read (not
    written yet, or unreadable).
    """

    def __init__(self, path: Path, pid: int | None) -> None:
        super().__init__(f"{path} is locked by {'an unknown process' if pid is None else f'process {pid}'}")
        self.path = path
        self.pid = pid


class NotALockFile(OSError):
    """
    What is at a L{PidLock}'s path cannot be used as its lock file; the
    message says why.
    """


#: What a lock file holds: nothing yet, or a process id and a newline.
_LOCK_FILE_CONTENT = re.compile(rb"[0-9]{0,10}\n?")


class PidLock:
    """
    An exclusive lock held for a process's lifetime: C{flock(2)}
    (C{LOCK_EX | LOCK_NB}) on a lock file that names the holder's process
    id, for the messages of the processes it turns away.

    The kernel releases the lock when the holder's last descriptor of the
    file closes, its death by C{SIGKILL} included: a lock file left behind
    never blocks the next process, whatever pid it names (process ids are
    reused; in a container the gateway is often pid 1 on every start).  The
    lock belongs to the open file, not to the process, so it survives a
    C{fork}: taken before twistd daemonizes, the daemon holds it (call
    L{record_pid} there to name it).
    """

    def __init__(self, path: Path, fd: int, shared: bool = False) -> None:
        self.path = path
        self._fd: int | None = fd
        self._pid: int | None = None
        #: Held with others (C{LOCK_SH}): no pid written, the file left at
        #: release (another holder may still hold it).
        self.shared = shared

    @classmethod
    def acquire(cls, path: Path, shared: bool = False) -> PidLock:
        """
        Take the lock of C{path}, creating it (mode 0600) when missing, and
        write this process's id in it.  A symbolic link is not followed and
        nothing but a regular file holding nothing or a process id is used:
        anything else there is not a lock file, and is left as it was.

        @param shared: take it with other processes that take it shared
            (C{LOCK_SH}), each of which keeps an exclusive taker out, and
            none of which writes its id.
        @raise LockHeld: another process holds it (exclusively, or at all
            for an exclusive lock).
        @raise NotALockFile: what is at C{path} is not a lock file.
        @raise OSError: it cannot be created or opened.
        """
        # A holder that stops removes the file, then lets go of the lock:
        # a lock won on the file it removed is on a file no one else will
        # open, so the lock is taken again on the file now at the path.
        for _ in range(100):
            fd = cls._open(path)
            won = False
            try:
                try:
                    fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise LockHeld(path, _pid_in(fd)) from None
                held = os.fstat(fd)
                try:
                    there = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    there = None
                if there is not None and (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino):
                    content = os.pread(fd, 64, 0)
                    if not _LOCK_FILE_CONTENT.fullmatch(content):
                        raise NotALockFile(f"{path} holds something other than a process id")
                    won = not shared
                    lock = cls(path, fd, shared)
                    if shared and content:
                        # Left by an exclusive holder gone since: its pid
                        # would be named as the holder's.
                        os.ftruncate(fd, 0)
                    lock.record_pid()
                    return lock
            except BaseException:
                if won:
                    # Held alone, and this process's id could not be written
                    # (a full disk): the file is not left behind (it may be
                    # this call's own, empty), if still the one held.
                    with contextlib.suppress(OSError):
                        _unlink_if_held(path, fd)
                os.close(fd)
                raise
            os.close(fd)
        raise LockHeld(path, None)

    @staticmethod
    def _open(path: Path) -> int:
        try:
            return open_regular_file(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW)
        except NotARegularFile as e:
            raise NotALockFile(f"{path} is {e.kind}, not a regular file") from None

    def record_pid(self) -> None:
        """
        Write this process's id in the lock file, if it is not the one
        there (after a C{fork}: twistd's daemon).
        """
        pid = os.getpid()
        if self._fd is None or pid == self._pid or self.shared:
            return
        line = f"{pid}\n".encode("ascii")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, line, 0)
        self._pid = pid

    def displaced(self) -> str | None:
        """
        Whether the lock file is still at its path (L{displaced}, the file
        this lock holds open): L{None} while it is (or once released),
        else what became of it (C{"removed"}: a C{rm}, a C{rm -rf} of its
        directory, a cleaner of C{/tmp} or C{/run}; C{"replaced by another
        file"}).  A lock file gone from its path keeps out no other
        process: the next one to take the lock makes a new file there,
        and takes it.
        """
        if self._fd is None:
            return None
        return displaced(self.path, os.fstat(self._fd))

    def retake(self) -> None:
        """
        Take the lock again on the file at its path (made if missing), as
        L{acquire} does, after that file was removed or replaced
        (L{displaced}), and let go of the file held before: no other
        process can take the lock from now on.

        @raise LockHeld: another process holds the file now at the path
            (a second gateway started on it meanwhile); the lock held
            before is kept.
        @raise NotALockFile: what is at the path now is not a lock file.
        @raise OSError: it cannot be made (its directory removed, a full
            disk); the lock held before is kept.
        """
        if self._fd is None:
            return
        again = PidLock.acquire(self.path, self.shared)
        fd, self._fd = self._fd, again._fd
        self._pid = again._pid
        again._fd = None
        os.close(fd)

    def release(self) -> None:
        """
        Remove the lock file (if it is still the one locked), then let go
        of the lock; again, nothing.

        @raise OSError: the file cannot be removed; the lock is let go of
            all the same.
        """
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if self.shared:
            # Others may hold it still: only this one's hold goes.
            os.close(fd)
            return
        try:
            _unlink_if_held(self.path, fd)
        finally:
            os.close(fd)


def displaced(path: Path, held: os.stat_result) -> str | None:
    """
    What became of a file this process holds open (C{held}: its
    C{fstat}, or the C{stat} of its path taken when it was opened) at
    C{path}: L{None} while the file there is that one (the same device
    and inode; a symbolic link there is not followed: another file),
    C{"removed"} when nothing is there (its directory removed too),
    C{"replaced by another file"} otherwise.  A path that cannot be
    looked at (permission denied) is taken as unchanged: L{None}.

    A file removed under a process that holds it open is not gone: the
    process reads and writes it still, and nobody else can open it; what
    it writes there is lost when it closes it.
    """
    try:
        there = os.stat(path, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return "removed"
    except OSError:
        return None
    if (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino):
        return None
    return "replaced by another file"


def _unlink_if_held(path: Path, fd: int) -> None:
    """
    Remove C{path} if it is the file open at C{fd} (the same device and
    inode): a lock file its holder lets go of, never one put in its place.

    @raise OSError: it cannot be removed.
    """
    held = os.fstat(fd)
    try:
        there = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return
    if (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino):
        os.unlink(path)


def _pid_in(fd: int) -> int | None:
    """
    The process id a lock file holds, or L{None}.
    """
    try:
        content = os.pread(fd, 64, 0)
    except OSError:
        return None
    text = content.strip()
    pid = int(text) if text.isdigit() else 0
    return pid if pid > 0 else None
