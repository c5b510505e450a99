"""
Who may change the files and directories the gateway is given, held to
sshd's C{StrictModes} rule for private files (sshd(8)):
L{check_private_file}, L{check_private_directories},
L{check_token_directory}, L{check_state_directory},
L{untrusted_log_file}.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from openclaw.files import named_uid, neither_user_nor_root
from openclaw.settings.errors import ConfigError


def _trusted_links(path: Path, what: str, euid: int, fix: str) -> list[tuple[Path, os.stat_result]]:
    """
    The symbolic links met on the way to C{path} (L{_links_of}), each
    belonging to the gateway's user or root: one of another user's was
    placed by that user, who chose where it points.

    @param fix: what to do, closing the refusal.
    @raise ConfigError: one line naming the link, its owner and C{fix}.
    """
    links = _links_of(path)
    for link, held_link in links:
        if held_link.st_uid not in (euid, 0):
            raise ConfigError(
                f"{what} is reached through the symbolic link {str(link)!r}, which belongs to "
                f"{named_uid(held_link.st_uid)}, {neither_user_nor_root(euid)}, so that "
                f"user chose where it points; {fix}"
            )
    return links


def untrusted_log_file(path: Path, euid: int | None = None) -> str | None:
    """
    Why the gateway may not append to C{path} as its log file (twistd's
    C{--logfile}), or None: a symbolic link met on the way that belongs to
    neither the gateway's user nor root (its owner chose where the log
    lines go: say C{/tmp/openclaw.log -> /root/.bashrc}, as Linux's
    C{fs.protected_symlinks} would refuse to follow in a sticky
    directory), or a file there that belongs to another user.  (What is
    there but is not a regular file, a FIFO say, is refused when it is
    opened: L{openclaw.files.open_regular_file}.)

    @param euid: the gateway's user id (default: this process's).
    """
    euid = os.geteuid() if euid is None else euid
    fix = "name a log file of the gateway's own (--logfile)"
    try:
        _trusted_links(path, "the log file", euid, fix)
    except ConfigError as e:
        return str(e)
    try:
        info = path.stat()
    except OSError:
        return None  # opening it says why
    if info.st_uid not in (euid, 0):
        return (
            f"the log file belongs to {named_uid(info.st_uid)}, {neither_user_nor_root(euid)}, so that user could "
            f"read or change what is logged; {fix}, or chown {euid} it"
        )
    if stat.S_ISREG(info.st_mode) and info.st_mode & 0o022:
        # As the gateway makes its log files (never writable by group or
        # others: openclaw.logs.log_file_mode); a logrotate "create 0666"
        # left so (operator trial s46).
        who = {0o020: "its group", 0o002: "every user"}.get(info.st_mode & 0o022, "its group and every user")
        return (
            f"the log file may be written by {who} (mode {stat.S_IMODE(info.st_mode):04o}), who could forge or "
            f"cut what is logged (the audit lines among it); chmod go-w {path}"
        )
    return None


def check_private_file(path: Path, what: str, secret: bool, euid: int | None = None) -> str | None:
    """
    Hold a file that holds secrets or settings to ssh's rule for its
    private files (sshd(8), C{StrictModes}): it must belong to the
    gateway's user or to root (so root-owned Docker and Kubernetes secrets
    and systemd credentials stay usable), and no one but its owner may
    write it.  Links are followed: the file itself is checked, and so is
    every symbolic link met on the way (C{lstat}): one that belongs to
    neither the gateway's user nor root is refused, as Linux's
    C{fs.protected_symlinks} refuses to follow another user's link in a
    sticky directory: its owner chose where it points (say
    C{/tmp/x -> /etc/passwd}).

    So are the directories it is reached through, up to C{/}, both the
    path as named (where a link sits) and the file's real one: each must
    belong to the gateway's user or root, and no one else may write it
    unless it has the sticky bit (as C{/tmp}: then others cannot rename
    or remove an entry they do not own).  Whoever can write a directory
    can replace the file in it with their own, whatever the file's mode,
    so such a file is refused, not warned about, as sshd's C{StrictModes}
    refuses it.

    @param what: how the operator named it (C{"JWT_SECRET_FILE='/etc/x'"}).
    @param secret: warn too when group or others may read it.
    @param euid: the gateway's user id (default: this process's).
    @return: a warning line, or None.
    @raise ConfigError: one line naming the file and the fix.
    """
    euid = os.geteuid() if euid is None else euid
    try:
        info = path.stat()
    except OSError:
        return None  # reading it says why, in its own words
    mode = stat.S_IMODE(info.st_mode)
    links = _trusted_links(path, what, euid, "name the file itself, or replace the link with one of your own")
    if info.st_uid not in (euid, 0):
        raise ConfigError(
            f"{what} belongs to uid {info.st_uid}, {neither_user_nor_root(euid)}, "
            f"so that user could change it; chown {euid} {str(path)!r} (or root) and chmod 600 it"
        )
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(open_to_others(path, mode, what))
    _check_directories(path, [link for link, _ in links], what, euid, "move the file")
    if secret and mode & (stat.S_IRGRP | stat.S_IROTH):
        return open_to_others(path, mode, what)
    return None


def open_to_others(path: Path, mode: int, what: str) -> str:
    """
    The line saying that group or others may read or write a private
    file, and to C{chmod 600} it: the rule of L{check_private_file}
    (which refuses a secret file others may write, and warns of one they
    may read), and of C{openclawctl --token-file}'s warning.

    @param mode: the file's permission bits (C{stat.S_IMODE}).
    @param what: how the operator named it (C{"JWT_SECRET_FILE='/etc/x'"}).
    @return: C{"<what> may be read by group or others (mode 0644); run:
        chmod 600 '<path>'"}; C{written}, or C{read and written}, as
        C{mode} has it; an empty string when C{mode} gives group and
        others neither.
    """
    readable = mode & (stat.S_IRGRP | stat.S_IROTH)
    writable = mode & (stat.S_IWGRP | stat.S_IWOTH)
    if not (readable or writable):
        return ""
    may = "read and written" if readable and writable else "written" if writable else "read"
    return f"{what} may be {may} by group or others (mode {mode:04o}); run: chmod 600 {str(path)!r}"


def _check_directories(path: Path, links: Sequence[Path], what: str, euid: int, move: str) -> None:
    """
    The rule of secret files' directories (L{check_private_file}, after
    sshd's C{StrictModes}): every directory C{path} is reached through
    (L{_directories_of}: as named, through C{links}, and as resolved, up
    to C{/}) must belong to the gateway's user or root, and no one else
    may write it unless it has the sticky bit (C{/tmp}: others cannot
    rename or remove an entry they do not own there).  Whoever can write
    a directory can replace the file in it with their own.

    @param what: how the operator named the file.
    @param move: the other way out, in the refusal (C{"move the file"}).
    @raise ConfigError: one line naming the directory and the fix.
    """
    for directory in _directories_of(path, links):
        try:
            held = directory.stat()
        except OSError:
            continue
        name = str(directory)
        if held.st_uid not in (euid, 0):
            raise ConfigError(
                f"{what} is in directory {name!r}, which belongs to uid {held.st_uid}, "
                f"{neither_user_nor_root(euid)}, so that user could replace the file; {move}, or "
                f"chown {euid} {name!r} (or root)"
            )
        dmode = stat.S_IMODE(held.st_mode)
        if dmode & (stat.S_IWGRP | stat.S_IWOTH) and not dmode & stat.S_ISVTX:
            raise ConfigError(
                f"{what} is in directory {name!r}, which group or others may write (mode {dmode:04o}), so they "
                f"could replace the file; run: chmod go-w {name!r}, or {move}"
            )


def check_private_directories(path: Path, what: str, fix: str, euid: int | None = None) -> None:
    """
    Hold the directories C{path} is reached through to the rule of secret
    files' directories (L{_check_directories}), and every symbolic link
    met on the way to L{check_private_file}'s: for a file (or directory)
    the gateway makes at C{path}, which may not be there yet, that others
    must not be able to replace.

    @param what: how the operator named it.
    @param fix: the other way out, in the refusal.
    @param euid: the gateway's user id (default: this process's).
    @raise ConfigError: one line naming the directory or link and the fix.
    """
    euid = os.geteuid() if euid is None else euid
    links = _trusted_links(path, what, euid, fix)
    _check_directories(path, [link for link, _ in links], what, euid, fix)


def check_token_directory(path: Path, what: str, euid: int | None = None) -> None:
    """
    Hold the directories of C{TOKEN_FILE} to the rule of secret files'
    directories (L{_check_directories}), and every symbolic link met on
    the way to it to L{check_private_file}'s: the token file is a secret
    the gateway writes there, beside its lock file (in a
    0777 directory, anyone could remove the lock and let a second gateway
    overwrite the first's token).  The file itself, which may not be
    there yet, is checked when the gateway starts
    (L{openclaw.session.check_token_file}).

    @param what: how the operator named it (C{"TOKEN_FILE='/run/x/token'"}).
    @param euid: the gateway's user id (default: this process's).
    @raise ConfigError: one line naming the directory or link and the fix.
    """
    fix = "point TOKEN_FILE at a new path in a directory of the gateway's own (such as /run/openclaw/token)"
    check_private_directories(path, what, fix, euid)


def check_state_directory(path: Path, what: str, fix: str, euid: int | None = None) -> str | None:
    """
    Hold the directory of the consumers' SQLite database (C{STATE_DIR}
    with C{DATABASE_URL} unset: C{openclaw.db} and its C{-wal} and C{-shm}
    files, L{openclaw.consumers.store.sqlite_file}) to the rule of secret
    files' directories (L{check_private_file}, after sshd's
    C{StrictModes}): every symbolic link met on the way to it must belong
    to the gateway's user or root, and so must it and every directory
    above it, up to C{/}, both as named and as resolved; those above it
    may be written by others only with the sticky bit, and written by
    their group (a home directory's C{~/src} made under umask 002) is a
    warning, as the group is often the gateway's user's own.

    The directory itself is held more strictly, since the gateway creates
    the database's files there by name: whoever can add an entry to it
    could be first to put a link or a database of their own under one of
    those names (a 0777 C{STATE_DIR}).  Others may not
    write it, sticky or not (as C{/tmp}); group-writable (a checkout made
    under umask 002, a Kubernetes C{fsGroup} volume, mode 2775) is a
    warning, as the group is often the gateway's user's own.  The files
    themselves are opened without following a link and refused when
    another user's (L{openclaw.consumers.store.private}).

    @param path: the state directory, which exists (made before this is
        called).
    @param what: how the operator named it (C{"STATE_DIR='/x' (from the
        environment)"}).
    @param fix: what else to do, appended after C{"or "} (C{"point
        STATE_DIR / --state-dir at a directory of the gateway's own"}).
    @param euid: the gateway's user id (default: this process's).
    @return: a warning line (group-writable), or None.
    @raise ConfigError: one line naming the directory and the fix.
    """
    euid = os.geteuid() if euid is None else euid
    links = _trusted_links(path, what, euid, f"name the directory itself, or {fix}")
    try:
        itself = path.stat()
    except OSError:
        return None  # using it says why
    warning = None
    # The directories of an entry in it: it (as named and as resolved) and those above.
    for directory in _directories_of(path / STATE_ENTRY, [link for link, _ in links]):
        try:
            held = directory.stat()
        except OSError:
            continue
        name = str(directory)
        if held.st_uid not in (euid, 0):
            raise ConfigError(
                f"{what}: directory {name!r} belongs to uid {held.st_uid}, {neither_user_nor_root(euid)}, "
                "so that user could put files of their own in place of the consumers' "
                f"database; chown {euid} {name!r} (or root), or {fix}"
            )
        dmode = stat.S_IMODE(held.st_mode)
        if not dmode & (stat.S_IWGRP | stat.S_IWOTH):
            continue
        if (held.st_dev, held.st_ino) != (itself.st_dev, itself.st_ino):
            if dmode & stat.S_ISVTX:
                continue
            if dmode & stat.S_IWOTH:
                raise ConfigError(
                    f"{what}: directory {name!r} may be written by others (mode {dmode:04o}), so they could "
                    f"replace the state directory in it; run: chmod o-w {name!r}, or {fix}"
                )
            if warning is None:
                warning = (
                    f"{what}: directory {name!r} may be written by its group (mode {dmode:04o}), whose members "
                    f"could replace the state directory in it; unless that group is the gateway's user's alone, "
                    f"run: chmod g-w {name!r}"
                )
        elif dmode & stat.S_IWOTH and dmode & stat.S_ISVTX:
            raise ConfigError(
                f"{what}: directory {name!r} is shared (mode {dmode:04o}, as /tmp), so others could be first to "
                f"put a link or a database of their own where the gateway creates the consumers' database; {fix}"
            )
        elif dmode & stat.S_IWOTH:
            raise ConfigError(
                f"{what}: directory {name!r} may be written by others (mode {dmode:04o}), so they could put a "
                f"link or a database of their own where the gateway creates the consumers' database; run: "
                f"chmod o-w {name!r}, or {fix}"
            )
        elif warning is None:
            warning = (
                f"{what}: directory {name!r} may be written by its group (mode {dmode:04o}), whose members could "
                f"remove or replace the consumers' database files in it; unless that group is the gateway's "
                f"user's alone, run: chmod g-w {name!r}"
            )
    return warning


#: A name in the state directory, for the directories it is reached through.
STATE_ENTRY = "openclaw.db"


def _directories_of(path: Path, links: Sequence[Path] = ()) -> list[Path]:
    """
    The directories a file is reached through: those of its path as named
    (made absolute), of each link on the way and of its real path, each
    from C{/} down, once.
    """
    found: dict[Path, None] = {}
    for start in (path.absolute(), *links, path.resolve()):
        for directory in reversed(start.parents):
            found[directory] = None
    return list(found)


#: Links followed at most while resolving a path, as Linux's C{ELOOP} limit.
MAX_LINKS_FOLLOWED = 40


def _links_of(path: Path) -> list[tuple[Path, os.stat_result]]:
    """
    Every symbolic link met while resolving C{path}, component by
    component as the kernel does (path_resolution(7)), each with its own
    C{lstat}; stops at a component that cannot be read (reading the file
    then says why) or after L{MAX_LINKS_FOLLOWED} links.
    """
    found: list[tuple[Path, os.stat_result]] = []
    absolute = path.absolute()
    current = Path(absolute.anchor)
    pending = list(reversed(absolute.parts[1:]))
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent
            continue
        candidate = current / name
        try:
            info = os.lstat(candidate)
        except OSError:
            break
        if not stat.S_ISLNK(info.st_mode):
            current = candidate
            continue
        found.append((candidate, info))
        if len(found) > MAX_LINKS_FOLLOWED:
            break
        try:
            target = Path(os.readlink(candidate))
        except OSError:
            break
        if target.is_absolute():
            current = Path(target.anchor)
        pending.extend(reversed(target.parts[1:] if target.is_absolute() else target.parts))
    return found
