"""
The directories the gateway makes and the paths it keeps: a path setting
made absolute at launch (L{_absolute}), the state directory (its default,
L{default_state_dir}, made mode 0700), and what a refused start made,
taken back (L{remove_made_directories}).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from openclaw.settings.errors import ConfigError, HostTrouble


def _absolute(text: str | Path) -> Path:
    """
    A path setting as the gateway keeps it: a relative one taken against
    the working directory now, at launch, as twistd makes its C{--pidfile}
    absolute.  twistd's C{-d DIR}
    (C{--rundir}) changes the working directory after the settings are
    read: a path kept relative was checked in one directory and used in
    another (a token file's lock left in the launch
    directory, a consumers' database never usable).  Not normalised
    (C{..} is left for the kernel to follow, through any link).
    """
    return Path(text).absolute()


def default_state_dir(environ: Mapping[str, str], euid: int, home: Path) -> Path:
    """
    Where a daemon keeps its state when C{STATE_DIR} is not set: systemd's
    C{$STATE_DIRECTORY} (from C{StateDirectory=}, its first entry), else
    C{$XDG_STATE_HOME/openclaw} (XDG Base Directory Specification), else
    C{/var/lib/openclaw} for root (FHS), else C{~/.local/state/openclaw}.
    """
    systemd = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return Path(systemd)
    xdg = environ.get("XDG_STATE_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "openclaw"
    if euid == 0:
        return Path("/var/lib/openclaw")
    return home / ".local" / "state" / "openclaw"


def remove_made_directories(made: Iterable[Path]) -> None:
    """
    Remove the directories made for a start that was refused (the deepest
    first), each only if it is still empty: a refusal leaves nothing behind,
    and never removes what holds something.  One that is not empty is
    passed over, not the end: through C{..}, one made may come before the
    one made in it (C{new/b/../c} made C{new/b} as well as C{new/c}).
    """
    for directory in made:
        with contextlib.suppress(OSError):
            directory.rmdir()


def _read_only(path: Path) -> bool:
    """
    Whether C{path}, or the nearest directory above it that is there, is
    on a file system mounted read-only (C{statvfs(3)}'s C{ST_RDONLY}).
    """
    for place in (path, *path.parents):
        try:
            return bool(os.statvfs(place).f_flag & os.ST_RDONLY)
        except OSError:
            continue
    return False


def _refuse_read_only(path: Path, named: str) -> None:
    """
    Refuse C{path} on a read-only file system as the host's trouble
    (exit status 1, which a unit manager retries), saying so: "not
    writable" told to make writable a directory of the right owner and
    mode (operator trial s46).

    @raise HostTrouble: it is.
    """
    if _read_only(path):
        raise HostTrouble(
            f"{named} cannot be used: it is on a read-only file system; remount that file system read-write "
            "(mount -o remount,rw MOUNTPOINT), or point STATE_DIR / --state-dir at a directory on a writable one"
        )


def _own_directory(path: Path, made: list[Path]) -> Path:
    """
    Create the default state directory, mode 0700, if it is missing
    (adding what was made to C{made}).

    @raise HostTrouble: it is on a read-only file system.
    @raise ConfigError: it cannot be used otherwise.
    """
    problem = _make_state_directory(path, made)
    if problem:
        _refuse_read_only(path, f"the state directory {str(path)!r}")
        raise ConfigError(
            f"cannot use the state directory {str(path)!r} ({problem}); "
            "create it (mode 0700) for the gateway's user, or set STATE_DIR / --state-dir"
        )
    return path


def _state_dir(text: str, made: list[Path]) -> Path:
    """
    An explicit C{STATE_DIR}, made absolute (L{_absolute}): created like
    the default one (mode 0700, parents as needed, adding what was made to
    C{made}) and checked writable now, not at the first write.
    """
    path = _absolute(text)
    problem = _make_state_directory(path, made)
    if problem:
        _refuse_read_only(path, f"STATE_DIR={text!r}")
        raise ConfigError(
            f"STATE_DIR={text!r} cannot be used ({problem}); create it (mode 0700) as a directory the "
            "gateway's user can write, or point STATE_DIR / --state-dir at one"
        )
    return path


def _make_state_directory(path: Path, made: list[Path] | None = None) -> str:
    """
    Create C{path} (mode 0700, parents as needed) if it is missing; what is
    wrong with it for the gateway's state, or C{""} if nothing.

    @param made: the directories this call created are added to it, the
        deepest first (L{remove_made_directories} takes them back): only
        those whose own C{mkdir(2)} succeeded here, never one that was
        there (through C{..}, a path can name one that was).
    """
    created: list[Path] = []
    try:
        _make_directories(path, 0o700, created)
    except FileExistsError:
        return "a file is in the way, not a directory"
    except OSError as e:
        return e.strerror or str(e)
    finally:
        if made is not None:
            made.extend(created)
    if not os.access(path, os.W_OK | os.X_OK):
        return "not writable"
    return ""


def _make_directories(path: Path, mode: int, created: list[Path]) -> None:
    """
    C{path.mkdir(mode, parents=True, exist_ok=True)}, its parents made
    with mode 0755 (which the umask may narrow: never writable by others,
    which L{check_state_directory} refuses above the state, as a parent
    made 0777 under umask 000 was), adding each directory
    it creates to the front of C{created}.

    @raise FileExistsError: something that is not a directory is in the way.
    @raise OSError: a directory cannot be made.
    """
    try:
        os.mkdir(path, mode)
    except FileNotFoundError:
        if path.parent == path:
            raise
        _make_directories(path.parent, 0o755, created)
        # Once, not again through this function: a parent that is there
        # and still answers ENOENT (procfs, /proc/x) would recurse for ever.
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            if not path.is_dir():
                raise
        else:
            created.insert(0, path)
    except OSError:
        # There already (EEXIST, or, in a directory this user may not
        # write, EACCES): as Path.mkdir's exist_ok takes it.
        if not path.is_dir():
            raise
    else:
        created.insert(0, path)
