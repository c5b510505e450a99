"""
The active provider and model, kept across restarts in C{STATE_DIR}.

Only the route is kept: tokens are never written here.  A missing file means
the configured defaults; a corrupt or unreadable one is logged and ignored,
never fatal, because an operator must always be able to start the gateway.

The file is read as an untrusted one (L{read_state_file}): opened without
following a symbolic link and without blocking (C{O_NOFOLLOW | O_NONBLOCK},
so a FIFO cannot hang start-up), accepted only if C{fstat} says it is a
regular file, and read to at most L{MAX_STATE_BYTES}.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from twisted.logger import Logger

from openclaw.files import write_atomically
from openclaw.routing import Route

STATE_FILE = "openclaw-state.json"

#: The most bytes of the state file read: a route is a few dozen.
MAX_STATE_BYTES = 64 * 1024


class UnsafeStateFile(OSError):
    """
    The state file is not a regular file of a sane size; the message says
    what it is instead.
    """


def read_state_file(path: Path, limit: int = MAX_STATE_BYTES) -> bytes:
    """
    The bytes of C{path}, read without trusting what it is: a symbolic
    link is not followed (C{O_NOFOLLOW}: C{ELOOP}), opening does not wait
    for a FIFO's writer (C{O_NONBLOCK}), anything but a regular file
    (C{fstat}) is refused, and a file over C{limit} bytes is refused
    without being read.

    @raise FileNotFoundError: there is no such file.
    @raise UnsafeStateFile: it is a link, a FIFO, a device, a directory or
        too large.
    @raise OSError: it cannot be opened or read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if os.path.islink(path):
            raise UnsafeStateFile(f"it is a symbolic link (to {os.readlink(path)!r}); links are not followed") from e
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeStateFile("it is not a regular file (a FIFO, a device or a directory)")
        if info.st_size > limit:
            raise UnsafeStateFile(f"it holds {info.st_size} bytes, more than the {limit} a state file may")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UnsafeStateFile(f"it holds more than the {limit} bytes a state file may")
    return data


class RouteStore:
    """
    Reads and writes the active route as a small JSON file.
    """

    _log = Logger(namespace="openclaw.state")

    def __init__(self, directory: Path, provider_ids: Iterable[str]) -> None:
        self.path = directory / STATE_FILE
        self._provider_ids = frozenset(provider_ids)

    def load(self) -> Route | None:
        """
        The route saved by an earlier run, or L{None} when there is none to
        be trusted.
        """
        try:
            document = json.loads(read_state_file(self.path))
        except FileNotFoundError:
            return None
        except UnsafeStateFile as e:
            self._log.warn(
                "ignoring state file {path}: {error}; remove it and switch_provider again",
                path=str(self.path),
                error=str(e),
            )
            return None
        except (OSError, ValueError, RecursionError) as e:
            self._log.warn("ignoring unreadable state file {path}: {error}", path=str(self.path), error=str(e))
            return None
        provider, model = (
            (document.get("provider"), document.get("model")) if isinstance(document, dict) else (None, None)
        )
        if (
            not isinstance(provider, str)
            or provider not in self._provider_ids
            or not isinstance(model, str)
            or not model.strip()
        ):
            self._log.warn(
                "ignoring state file {path}: it does not name a known provider and a model", path=str(self.path)
            )
            return None
        return Route(provider, model)

    def save(self, route: Route) -> None:
        """
        Replace the file atomically (temporary file, fsync, rename), so a
        crash leaves the old route or the new one, never half of either.
        A failure is logged: the switch itself has happened.
        """
        try:
            write_atomically(self.path, json.dumps({"provider": route.provider_id, "model": route.model}))
        except OSError as e:
            self._log.error(
                "could not save the active provider to {path}: {error}; it will not survive a restart",
                path=str(self.path),
                error=str(e),
            )
