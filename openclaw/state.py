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
from collections.abc import Iterable
from pathlib import Path

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from openclaw.files import NotARegularFile, PidLock, read_regular_file, write_atomically
from openclaw.routing import Route, model_refusal
from openclaw.writer import FileWriter, WriterStopped

STATE_FILE = "openclaw-state.json"
#: The lock file a gateway holds C{STATE_DIR} by (L{lock_state_dir}).
STATE_LOCK = "openclaw.lock"

#: The most bytes of the state file read: a route is a few dozen.
MAX_STATE_BYTES = 64 * 1024


class UnsafeStateFile(OSError):
    """
    The state file is not a regular file of a sane size; the message says
    what it is instead.
    """


def read_state_file(path: Path, limit: int = MAX_STATE_BYTES) -> bytes:
    """
    The bytes of C{path}, read as an untrusted file (L{read_regular_file}:
    no link followed, no wait on a FIFO, only a regular file of at most
    C{limit} bytes).

    @raise FileNotFoundError: there is no such file.
    @raise UnsafeStateFile: it is a link, a FIFO, a device, a directory or
        too large.
    @raise OSError: it cannot be opened or read.
    """
    try:
        return read_regular_file(path, limit)
    except NotARegularFile as e:
        raise UnsafeStateFile(str(e)) from None


def lock_state_dir(state_dir: Path, shared: bool = False) -> PidLock:
    """
    Hold C{state_dir} for this gateway, for as long as the process runs or
    until L{PidLock.release}: L{PidLock} on its L{STATE_LOCK}, so that a
    second gateway given the same C{STATE_DIR} is turned away instead of
    keeping its own view of the consumers' database (keys revoked by one
    served by the other, budgets counted apart) and writing over the other's
    route.  The instances of a cluster share what they hold through Redis
    and may share the directory: each takes it C{shared}, which keeps a
    standalone gateway out, and is kept out by one.

    @raise openclaw.files.LockHeld: another running gateway holds it.
    @raise openclaw.files.NotALockFile: the lock file's path holds
        something else.
    @raise OSError: the lock file cannot be created or opened.
    """
    return PidLock.acquire(state_dir / STATE_LOCK, shared)


class RouteStore:
    """
    Reads and writes the active route as a small JSON file.
    """

    _log = Logger()

    def __init__(self, directory: Path, provider_ids: Iterable[str], writer: FileWriter | None = None) -> None:
        """
        @param directory: where the file is (C{STATE_DIR}).
        @param provider_ids: the providers declared: a file naming
            another is not trusted (L{load}).
        @param writer: where L{save_later} writes the file, off the
            reactor thread; L{None}: on the calling thread (a test, a
            tool).
        """
        self.path = directory / STATE_FILE
        self._provider_ids = frozenset(provider_ids)
        self._writer = writer

    def load(self) -> Route | None:
        """
        The route saved by an earlier run, or L{None} when there is none to
        be trusted: no file, or one that is unsafe, unreadable, names no
        declared provider, or a model the API would refuse
        (L{model_refusal}); each but the first logged as a warning.
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
        if not isinstance(provider, str) or provider not in self._provider_ids or not isinstance(model, str):
            self._log.warn(
                "ignoring state file {path}: it does not name a known provider and a model", path=str(self.path)
            )
            return None
        refusal = model_refusal(model)
        if refusal is not None:
            # The reason only: the name itself may be unprintable or long.
            self._log.warn(
                "ignoring state file {path}: its {refusal}; remove the file and switch_provider again",
                path=str(self.path),
                refusal=refusal,
            )
            return None
        return Route(provider, model)

    def save(self, route: Route) -> str | None:
        """
        Replace the file atomically (temporary file, fsync, rename), so a
        crash leaves the old route or the new one, never half of either.
        A failure is logged: the switch itself has happened.

        Blocking, on the calling thread: for a caller with no reactor
        running (a test, a tool); the gateway's switches save through
        L{save_later}, off the reactor thread.

        @return: None once saved; else why not, for the operator who
            switched (C{switch_provider}'s C{warning}).
        """
        try:
            write_atomically(self.path, self._document(route))
        except OSError as e:
            return self._unsaved(e)
        return None

    def save_later(self, route: Route) -> Deferred[str | None]:
        """
        L{save}, in the writer's thread (L{FileWriter.write}): after every
        write asked of it before, so that the last switch asked is the
        route on disk; the reactor thread is never blocked by the disk.
        Called on the reactor thread; fires there once the file is written
        (or the write failed, logged as L{save}'s).  Without a writer, as
        L{save} (at once).

        @return: a Deferred firing with None once saved; else why not
            (C{switch_provider}'s C{warning}).  Never fails but when
            cancelled: a failure that is no C{OSError} (a fault of ours)
            is logged with its traceback and answered as one that is.
            Cancelled (its switch cut short at the stop: C{CancelledError}),
            the write goes on, and its failure is logged all the same.
            Dropped at the gateway's stop, not begun (L{WriterStopped}):
            answered that the switch holds for this run only.  A write of
            the file asked while this one waits, not begun, replaces it
            (L{FileWriter.write}): this one fires once that one is saved.
        """
        writer = self._writer
        if writer is None:
            return succeed(self.save(route))

        def failed(reason: Failure) -> str | Failure:
            if reason.check(CancelledError):
                return reason  # its asker gave up on it: dropped says the rest
            if isinstance(reason.value, WriterStopped):
                return self._stopping(route)
            if isinstance(reason.value, OSError):
                return self._unsaved(reason.value)
            self._log.failure(
                "could not save the active provider to {path} (a fault of the gateway): report it with this traceback",
                reason,
                path=str(self.path),
            )
            return (
                f"the switch is made but could not be saved to {self.path} (a fault of the gateway: "
                f"{reason.getErrorMessage() or type(reason.value).__name__}): a restart will go back to the route "
                "saved before; switch again, and report it with the traceback the gateway logged"
            )

        def dropped(reason: Failure) -> None:
            # Its switch was cut short meanwhile (at the stop): logged all
            # the same.
            if isinstance(reason.value, WriterStopped):
                self._stopping(route)
            elif isinstance(reason.value, OSError):
                self._unsaved(reason.value)
            else:
                self._log.failure("could not save the active provider to {path}", reason, path=str(self.path))

        return writer.write(self.path, self._document(route), dropped).addCallbacks(lambda _: None, failed)

    @staticmethod
    def _document(route: Route) -> str:
        """
        What the state file holds for C{route}: a JSON object.
        """
        return json.dumps({"provider": route.provider_id, "model": route.model})

    def _stopping(self, route: Route) -> str:
        """
        Log (at warn, once) that the switch to C{route} was not saved
        because the gateway is stopping (its write not begun, dropped:
        L{WriterStopped}), and say so, for C{switch_provider}'s
        C{warning}.  Reactor thread.
        """
        self._log.warn(
            "the switch to {route} was not saved to {path}: the gateway is stopping and its write had not begun; "
            "it holds for this run only",
            route=f"{route.provider_id}/{route.model}",
            path=str(self.path),
        )
        return (
            f"the switch is made for this run only: the gateway is stopping, and its save to {self.path} had not "
            "begun (a stop finishes only the write under way); once started again the gateway goes back to the "
            "route saved before: switch again then"
        )

    def _unsaved(self, e: OSError) -> str:
        """
        Log that the route could not be saved (C{e}), and say why and what
        to do, for C{switch_provider}'s C{warning}.  Reactor thread.
        """
        self._log.error(
            "could not save the active provider to {path}: {error}; it will not survive a restart",
            path=str(self.path),
            error=str(e),
        )
        return (
            f"the switch is made but could not be saved to {self.path} ({e.strerror or e}): a restart will go "
            "back to the route saved before; fix what stops the gateway's user writing it (a directory in its "
            "place, STATE_DIR read-only or full), then switch again"
        )
