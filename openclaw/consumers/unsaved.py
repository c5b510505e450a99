"""
The key revokes the consumers' database has not taken yet, kept in
C{STATE_DIR} so that a restart before it does still refuses their keys
(L{openclaw.consumers.table.ConsumerTable.revoke_key}).

The file, C{STATE_DIR/openclaw-revokes-unsaved.json}, is a JSON object:
C{{"revokes_unsaved": [{"sha256": HEX, "consumer": NAME, "key_prefix":
PREFIX}, ...]}}: each key's SHA-256 (as the database holds it, never the
key) and whose key it is.  It is rewritten whole (atomically, mode 0600)
at every change, by the gateway's file writer, and read once at start as
an untrusted file (L{openclaw.state.read_state_file}): an entry of
another shape is left out, with a warning.  An entry the database has
taken meanwhile (another instance of a cluster wrote it) is harmless: its
write at start finds the key gone, and drops it.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from openclaw.files import write_atomically
from openclaw.state import UnsafeStateFile, read_state_file
from openclaw.timefmt import compact
from openclaw.writer import FileWriter, WriterStopped

#: The file's name in C{STATE_DIR}.
UNSAVED_REVOKES_FILE = "openclaw-revokes-unsaved.json"

#: The most bytes of the file read: an entry is at most about 200 bytes,
#: so some 80,000 revokes (an operator revoking every key of a leak while
#: the database is down); the route's 64 KiB would hold some 300.
MAX_UNSAVED_REVOKES_BYTES = 16 * 1024 * 1024

#: A key's SHA-256, as the table holds it (lower-case hex).
_SHA256 = re.compile(r"[0-9a-f]{64}")

#: A revoke: a key's SHA-256 hex -> (consumer, key prefix).
Revokes = Mapping[str, tuple[str, str]]


class UnsavedRevokesFile:
    """
    Keeps the revokes not saved to the database in C{STATE_DIR}
    (L{save}) and gives them back at the next start (L{load}).

    @ivar path: the file.
    @ivar kept: whether the revokes not saved, as last given to L{save},
        are on disk (its write succeeded): what the operator is told at a
        revoke's answer and at the stop.
    """

    _log = Logger()

    def __init__(self, directory: Path, writer: FileWriter | None = None) -> None:
        """
        @param directory: C{STATE_DIR}.
        @param writer: where L{save} writes, off the reactor thread; None:
            on the calling thread (a test, a tool).
        """
        self.path = directory / UNSAVED_REVOKES_FILE
        self._writer = writer
        self.kept = True
        #: The text last asked of the file (L{load}'s, as it would write
        #: it): a save of the same is no write.  None: not known.
        self._asked: str | None = None
        #: A write is under way (L{save}), the set last given, whether it
        #: is to be written even if unchanged, and who waits for the next.
        self._writing = False
        self._latest: Revokes = {}
        self._again = False
        self._waiting: list[Deferred[bool]] = []
        #: Each revoke's entry in the file, encoded once (a key's SHA-256
        #: -> its JSON text).
        self._entries: dict[str, str] = {}

    def load(self) -> dict[str, tuple[str, str]]:
        """
        The revokes an earlier run kept (none when there is no file); a
        file that cannot be read or trusted is said in a critical line (its
        keys may be served) and read as none.
        """
        try:
            document = json.loads(read_state_file(self.path, MAX_UNSAVED_REVOKES_BYTES))
        except FileNotFoundError:
            self._asked = self._document({})
            return {}
        except (UnsafeStateFile, OSError, ValueError, RecursionError) as e:
            # Kept for the operator, under another name: the next save
            # would replace the only list of those keys (review s47).
            aside = self.path.with_name(f"{self.path.name}.unread-{compact(time.time())}")
            try:
                os.rename(self.path, aside)
            except OSError:
                aside = self.path
            self._log.critical(
                "could not read the key revokes not saved to the database by an earlier run from {path} ({error}): "
                "their keys are served if the database still has them; the file is kept as {aside}: see which "
                "keys it names, and revoke them again",
                path=str(self.path),
                error=str(e),
                aside=str(aside),
            )
            return {}
        entries = document.get("revokes_unsaved") if isinstance(document, dict) else None
        revokes: dict[str, tuple[str, str]] = {}
        malformed = 0
        for entry in entries if isinstance(entries, list) else [None]:
            hashed, name, prefix = (
                (entry.get("sha256"), entry.get("consumer"), entry.get("key_prefix"))
                if isinstance(entry, dict)
                else (None, None, None)
            )
            if (
                isinstance(hashed, str)
                and _SHA256.fullmatch(hashed)
                and isinstance(name, str)
                and isinstance(prefix, str)
            ):
                revokes[hashed] = (name, prefix)
            else:
                malformed += 1
        if not malformed:
            self._asked = self._document(revokes)
        else:
            self._log.critical(
                "{count} entr(y/ies) of {path} are not key revokes (the file was changed by hand?): left out; "
                "see which keys consumer list shows, and revoke them again",
                count=malformed,
                path=str(self.path),
            )
        return revokes

    def save(self, revokes: Revokes, again: bool = False) -> Deferred[bool]:
        """
        Replace the file with C{revokes} (an empty list when none).  Called
        on the reactor thread.  One write at a time: those asked while one
        is under way wait for it, then one more write takes the set last
        given (a round of retries saving at each revoke it writes, or a
        mass revocation, costs one encoding per write the disk takes, not
        one per revoke).

        @return: a Deferred firing with whether they (or a later set asked
            since) are on disk (also L{kept}); a failure to write is logged,
            but for the gateway's stop (its file writer takes no more
            writes: the stop writes the file itself, L{save_now}).  Never
            fails.  The same as last asked (the revoke of a key that the
            database took at once: none before, none after) is not
            written again, unless C{again} (the file was removed).
        """
        self._latest = revokes
        self._again = self._again or again
        if self._writing:
            waiting: Deferred[bool] = Deferred()
            self._waiting.append(waiting)
            return waiting
        return self._write_latest()

    def _write_latest(self) -> Deferred[bool]:
        revokes, again = self._latest, self._again
        self._again = False
        text = self._document(revokes)
        if text == self._asked and self.kept and not again:
            return succeed(True)
        self._asked = text
        if self._writer is None:
            try:
                write_atomically(self.path, text)
            except OSError as e:
                return succeed(self._unkept(revokes, e))
            return succeed(self._kept())
        self._writing = True

        def failed(reason: Failure) -> bool:
            if isinstance(reason.value, WriterStopped):
                # The stop: the file holds the last set written, and the
                # stop writes the current one itself (L{save_now}).
                return False
            error = reason.value if isinstance(reason.value, OSError) else reason.getErrorMessage()
            return self._unkept(revokes, error)

        def done(kept: bool) -> bool:
            self._writing = False
            waiting, self._waiting = self._waiting, []
            if waiting:
                # The set last given meanwhile, in one more write.
                self._write_latest().addCallback(answer, waiting)
            return kept

        def answer(kept: bool, waiting: list[Deferred[bool]]) -> None:
            for each in waiting:
                each.callback(kept)

        return self._writer.write(self.path, text).addCallbacks(lambda _: self._kept(), failed).addCallback(done)

    def missing(self) -> bool:
        """
        Whether nothing is at the file's path (an C{rm}, a cleaner): one
        C{lstat}, on the reactor thread, as the lock files are checked
        (L{openclaw.service.HeldLocks.check_files}).
        """
        return not os.path.lexists(self.path)

    def save_now(self, revokes: Revokes) -> bool:
        """
        L{save} on the calling thread, blocking: at the gateway's stop,
        whose file writer takes no more writes (its last write may be
        older than the set now, have failed, or the file been removed
        since); the stop says whether the revokes are kept.

        @return: whether they are on disk.
        """
        text = self._document(revokes)
        self._asked = text
        try:
            write_atomically(self.path, text)
        except OSError as e:
            return self._unkept(revokes, e)
        return self._kept()

    def _kept(self) -> bool:
        self.kept = True
        return True

    def _unkept(self, revokes: Revokes, error: object) -> bool:
        # Said when they stop being kept, not at each try after.
        said, self.kept = self.kept, False
        if revokes and said:
            self._log.error(
                "could not keep the key revokes not saved to the database in {path} ({error}): a restart before "
                "the database takes them serves their keys again",
                path=str(self.path),
                error=getattr(error, "strerror", None) or str(error),
            )
        return False

    def _document(self, revokes: Revokes) -> str:
        """
        The file's text for C{revokes}: its entries encoded once each
        (L{_entries}) and joined, in the order they were revoked.
        """
        entries = self._entries
        if len(entries) > 2 * len(revokes) + 1024:
            # Those saved since are dropped now and then.
            self._entries = entries = {hashed: entries[hashed] for hashed in revokes if hashed in entries}
        parts = []
        for hashed, (name, prefix) in revokes.items():
            entry = entries.get(hashed)
            if entry is None:
                entry = entries[hashed] = json.dumps({"sha256": hashed, "consumer": name, "key_prefix": prefix})
            parts.append(entry)
        return '{"revokes_unsaved": [' + ", ".join(parts) + "]}"
