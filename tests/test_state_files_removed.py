"""
The files the gateway holds open in STATE_DIR (its consumers' SQLite
database, the lock files of STATE_DIR and TOKEN_FILE) removed or replaced
under a running gateway (an C{rm}, a C{rm -rf} of the directory, a cleaner
of old files in C{/tmp} or C{/run}): noticed within seconds, said in one
critical line, and no consumer change answered "ok" that the restart would
lose (careless-host trial s33, F1).  A database that could not be used at
start holds its usage rows until its schema is made (F5).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any
from unittest import mock

from twisted.internet import reactor
from twisted.internet.defer import fail, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from openclaw.consumers.service import warn_rescued_copies
from openclaw.consumers.store import DATABASE_FILE_LOST, DATABASE_RESCUED, ConsumerStore
from openclaw.consumers.unsaved import UNSAVED_REVOKES_FILE, UnsavedRevokesFile
from openclaw.files import FILES_CHECK_SECONDS, PidLock
from openclaw.service import HeldLocks
from openclaw.session import SessionAuthority, TokenFileUnwritable
from openclaw.writer import FileWriter
from tests.support import capture_log_events, make_unwritable, start_gateway
from tests.test_consumers import GATEWAY_KEY, GatewayCase
from tests.test_dataplane import HELLO


def _said(events: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    return [event for event in events if text in event.get("log_format", "")]


def _full() -> sqlite3.OperationalError:
    """
    SQLite's error for a full disk.
    """
    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    return error


class DatabaseRemovedTests(GatewayCase):
    @inlineCallbacks
    def wait_for(self, text: str, seconds: float) -> Any:
        """
        The first log event whose format holds C{text}, waited for up to
        C{seconds}.
        """
        for _ in range(int(seconds * 10)):
            said = _said(self.events, text)
            if said:
                return said[0]
            yield deferLater(reactor, 0.1, lambda: None)
        self.fail(f"no line holding {text!r} within {seconds} s")

    @inlineCallbacks
    def test_database_removed_under_the_gateway(self) -> Any:
        """
        openclaw.db and its -wal and -shm files removed while the gateway
        runs: within seconds one critical line (no traceback) says so and
        what to do, and a consumer_create is refused with it, where it was
        answered ok and lost at the restart; calls are still served.
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "alpha"})
        database = gateway.service.settings.state_dir / "openclaw.db"
        for name in (database, *(database.with_name(database.name + tail) for tail in ("-wal", "-shm"))):
            name.unlink(missing_ok=True)
        said = yield self.wait_for("while the gateway runs", FILES_CHECK_SECONDS * 3)
        self.assertEqual(said["log_format"], DATABASE_FILE_LOST)
        self.assertEqual(said["log_level"], LogLevel.critical)
        self.assertNotIn("log_failure", said)
        line = formatEvent(said)
        self.assertIn(f"the consumers' database {database!s} was removed", line)
        self.assertIn("then start it", line)
        self.assertIn("from a backup", line)
        # What the gateway held is copied beside it, alpha with it, and said.
        said = yield self.wait_for("a copy of the consumers' database", FILES_CHECK_SECONDS * 3)
        self.assertEqual(said["log_format"], DATABASE_RESCUED)
        copy = Path(said["copy"])
        self.assertTrue(copy.name.startswith("openclaw.db.rescued-"), copy)
        self.assertEqual(copy.stat().st_mode & 0o777, 0o600)
        self.assertIn(f"mv {copy} {database}", formatEvent(said))
        with contextlib.closing(sqlite3.connect(copy)) as rescued:
            names = [row[0] for row in rescued.execute("SELECT name FROM consumers")]
        self.assertEqual(names, ["alpha"])
        self.assertEqual([p.name for p in database.parent.iterdir() if p.name.startswith(".openclaw")], [])
        answer = yield client.command(gateway.token, "consumer_create", {"name": "beta"})
        self.assertFalse(answer["ok"], answer)
        self.assertIn("was removed while the gateway runs", answer["error"])
        self.assertIn("refused", answer["error"])
        self.assertNotIn("beta", gateway.service.consumers.consumers)
        answer = yield client.command(gateway.token, "key_create", {"name": "alpha"})
        self.assertFalse(answer["ok"], answer)
        # Said once, not at every check.
        yield deferLater(reactor, FILES_CHECK_SECONDS * 1.5, lambda: None)
        self.assertEqual(len(_said(self.events, "while the gateway runs")), 1)
        # Calls are served still, with the keys the gateway has.
        completion = yield self.call(gateway, created["key"])
        self.assertTrue(completion.choices)
        self.assertEqual(self.flushLoggedErrors(), [])

    @inlineCallbacks
    def test_companion_removed_names_the_database_to_restore(self) -> Any:
        """
        Only openclaw.db-shm removed (an rm -rf that could not remove an
        immutable database): the line says the -shm went, and that the
        copy goes back to openclaw.db (it said to move it to the -shm's
        path: recheck s47).
        """
        gateway, _ = yield self.gateway()
        database = gateway.service.settings.state_dir / "openclaw.db"
        shm = database.with_name("openclaw.db-shm")
        shm.unlink()
        said = yield self.wait_for("while the gateway runs", FILES_CHECK_SECONDS * 3)
        line = formatEvent(said)
        self.assertIn(f"the consumers' database {shm} was removed", line)
        self.assertIn(f"move that copy to {database} (or", line)

    @inlineCallbacks
    def call(self, gateway: Any, key: str) -> Any:
        result = yield deferToThread(
            self.sdk(gateway, key).chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO
        )
        return result

    @inlineCallbacks
    def test_database_replaced_under_the_gateway(self) -> Any:
        """
        openclaw.db replaced by another file (a backup moved over it) while
        the gateway runs: said, and the changes refused, as when removed.
        """
        gateway, client = yield self.gateway()
        database = gateway.service.settings.state_dir / "openclaw.db"
        other = database.with_name("restored.db")
        sqlite3.connect(other).close()
        os.replace(other, database)
        said = yield self.wait_for("while the gateway runs", FILES_CHECK_SECONDS * 3)
        self.assertIn("was replaced by another file", formatEvent(said))
        answer = yield client.command(gateway.token, "consumer_create", {"name": "beta"})
        self.assertFalse(answer["ok"], answer)
        self.assertIn("replaced by another file", answer["error"])
        # The lost database's -wal and -shm, still at their paths, are moved aside at the
        # stop: the next open of the file put there would replay them onto
        # it (re-check s33: a restored backup came back with the lost
        # database's consumers).
        wal = database.with_name("openclaw.db-wal")
        self.assertTrue(wal.exists())
        yield gateway.service.stopService()
        left = sorted(p.name for p in database.parent.glob("openclaw.db-*"))
        self.assertEqual([name.split(".lost-")[0] for name in left], ["openclaw.db-shm", "openclaw.db-wal"], left)
        self.assertTrue(all(".lost-" in name for name in left), left)
        self.assertTrue(database.exists())

    @inlineCallbacks
    def test_unsaved_revoke_kept_again_beside_the_copy(self) -> Any:
        """
        A key revoke the database did not take (a full disk), then an
        C{rm -rf} of STATE_DIR: the rescue copy lacks the revoke, and its
        file went with the directory; it is written again beside the copy
        and said, so that a start on the copy refuses the key (left s46:
        the operator who restored the copy got the key back).
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "alpha"})
        store = gateway.service.consumer_store
        self.patch(store, "revoke_key", lambda name, prefix: fail(_full()))
        revoked = yield self.command(
            gateway, client, "key_revoke", {"name": "alpha", "key_prefix": created["key_prefix"]}
        )
        self.assertIs(revoked["saved"], False)
        state_dir = gateway.service.settings.state_dir
        kept = state_dir / UNSAVED_REVOKES_FILE
        self.assertTrue(kept.exists())
        shutil.rmtree(state_dir)
        yield self.wait_for("a copy of the consumers' database", FILES_CHECK_SECONDS * 3)
        said = yield self.wait_for("the copy lacks", 2)
        self.assertEqual(said["log_level"], LogLevel.warn)
        self.assertIn(f"1 key revoke(s) not saved to the database; they are kept in {kept}", formatEvent(said))
        self.assertEqual(list(UnsavedRevokesFile(state_dir).load().values()), [("alpha", created["key_prefix"])])
        self.flushLoggedErrors()

    @inlineCallbacks
    def test_companions_that_cannot_be_moved_aside_are_said(self) -> Any:
        """
        The lost database's -wal cannot be moved aside at the stop (its
        directory immutable, or not writable): one critical line says so,
        with the mv to run before starting again (recheck s47: nothing was
        said, and the next database put there would have had it replayed
        onto it).
        """
        gateway, _ = yield self.gateway()
        database = gateway.service.settings.state_dir / "openclaw.db"
        database.unlink()
        yield self.wait_for("while the gateway runs", FILES_CHECK_SECONDS * 3)
        make_unwritable(self, database.parent)
        yield gateway.service.stopService()
        said = _said(self.events, "could not be moved aside at the stop")
        self.assertTrue(said, "nothing said")
        line = formatEvent(said[0])
        self.assertIn(f"{database}-", line)
        self.assertIn("SQLite would replay it onto the next database put at", line)
        self.assertIn(".lost", line)
        self.flushLoggedErrors()

    @inlineCallbacks
    def test_rescue_tried_again(self) -> Any:
        """
        A copy that cannot be made (a full disk) is said once and tried
        again at each check until it is (re-check s33: it was tried once,
        and the gateway held the only copy of every consumer).
        """
        gateway, client = yield self.gateway()
        yield self.command(gateway, client, "consumer_create", {"name": "alpha"})
        store = gateway.service.consumers.store
        rescue, failures = store.rescue, []

        def full_once(when: str) -> Any:
            if not failures:
                failures.append(when)
                return fail(OSError(28, "No space left on device"))
            return rescue(when)

        self.patch(store, "rescue", full_once)
        database = gateway.service.settings.state_dir / "openclaw.db"
        database.unlink()
        said = yield self.wait_for("could not be copied", FILES_CHECK_SECONDS * 3)
        self.assertEqual(said["log_level"], LogLevel.critical)
        self.assertIn("tries again", formatEvent(said))
        said = yield self.wait_for("a copy of the consumers' database", FILES_CHECK_SECONDS * 3)
        self.assertTrue(Path(said["copy"]).exists())
        self.assertEqual(len(_said(self.events, "could not be copied")), 1)

    @inlineCallbacks
    def test_files_in_place_say_nothing(self) -> Any:
        """
        While the files stay, the checks say nothing, the changes are made,
        and the gateway's stop (which removes the -wal and -shm files)
        is not taken for their loss.
        """
        gateway, client = yield self.gateway()
        yield deferLater(reactor, FILES_CHECK_SECONDS * 1.5, lambda: None)
        yield self.command(gateway, client, "consumer_create", {"name": "alpha"})
        yield gateway.service.stopService()
        self.assertEqual(_said(self.events, "while the gateway runs"), [])
        self.assertEqual(self.flushLoggedErrors(), [])


class UsageHeldUntilLoadedTests(GatewayCase):
    @inlineCallbacks
    def test_rows_wait_for_the_schema(self) -> Any:
        """
        The consumers' database cannot be used at start (a full STATE_DIR:
        its schema not made): the gateway keys' usage rows are not written
        to it (a critical line with a traceback, "no such table: usage_rows",
        trial s33 F5), but kept, and written once the schema is made.
        """
        migrate = ConsumerStore.migrate
        failures = []

        def full_at_first(store: ConsumerStore) -> Any:
            if not failures:
                failures.append(_full())
                return fail(failures[0])
            return migrate(store)

        self.patch(ConsumerStore, "migrate", full_at_first)
        gateway, _ = yield self.gateway()
        table = gateway.service.consumers
        self.assertFalse(table.loaded)
        yield self.call(gateway)
        yield table.flush()
        self.assertEqual(table.pending_rows(), 1)
        self.assertEqual(_said(self.events, "could not write"), [])
        for _ in range(100):
            if table.loaded:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(table.loaded)
        yield table.flush()
        self.assertEqual(table.pending_rows(), 0)
        [usage] = yield gateway.service.consumer_store.usage(None, None, None, None)
        self.assertEqual(usage["requests"], 1, usage)
        self.assertEqual(_said(self.events, "could not write"), [])
        self.assertEqual(self.flushLoggedErrors(), [])

    @inlineCallbacks
    def call(self, gateway: Any) -> Any:
        yield deferToThread(
            self.sdk(gateway, GATEWAY_KEY).chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO
        )

    @inlineCallbacks
    def test_never_loaded_given_up_at_stop(self) -> Any:
        """
        Never loaded by the stop (its schema never made): the rows held are
        tried at stop, and given up in one critical line, without a
        traceback ("no such table" is the database's trouble, said at the
        start).
        """
        self.patch(ConsumerStore, "migrate", lambda store: fail(_full()))
        gateway, _ = yield self.gateway(shutdown_grace_seconds=1.0)
        yield self.call(gateway)
        yield gateway.service.stopService()
        [said] = _said(self.events, "given up")
        self.assertEqual(said["log_level"], LogLevel.critical)
        self.assertNotIn("log_failure", said)
        self.assertIn(
            "could not write the last 1 usage rows at stop (no such table: usage_rows); given up", formatEvent(said)
        )
        self.assertEqual(self.flushLoggedErrors(), [])


class LockFilesTests(SynchronousTestCase):
    """
    The lock files of STATE_DIR and TOKEN_FILE removed or replaced while
    the gateway holds them (L{HeldLocks.check_files}).
    """

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.events = capture_log_events(self)
        self.state_lock = PidLock.acquire(self.dir / "openclaw.lock")
        self.token_lock = PidLock.acquire(self.dir / "token.lock")
        self.addCleanup(self.state_lock.release)
        self.addCleanup(self.token_lock.release)
        sessions = mock.Mock()
        self.held = HeldLocks(sessions, self.state_lock, (), Logger(), token_lock=self.token_lock)

    def test_in_place(self) -> None:
        self.held.check_files()
        self.assertEqual(self.events, [])

    def test_removed_is_made_again(self) -> None:
        """
        A lock file removed (a cleaner of old files): said, and taken again
        at its path, so that a second gateway is refused as before.
        """
        self.state_lock.path.unlink()
        self.assertEqual(self.state_lock.displaced(), "removed")
        self.held.check_files()
        [said] = self.events
        self.assertEqual(said["log_level"], LogLevel.warn)
        line = formatEvent(said)
        self.assertIn(f"the lock file {self.state_lock.path} of STATE_DIR was removed", line)
        self.assertIn("made again and locked", line)
        self.assertEqual(self.state_lock.path.read_text(), f"{os.getpid()}\n")
        self.assertIsNone(self.state_lock.displaced())
        self.assertRaises(Exception, PidLock.acquire, self.state_lock.path)
        self.held.check_files()
        self.assertEqual(len(self.events), 1)

    def test_token_lock_made_again_where_others_may_write(self) -> None:
        """
        TOKEN_FILE's directory made again so that others may write it (a
        cleaner removed it, an operator's mkdir under umask 000): the lock
        is taken again all the same (better than none), in one critical
        line saying others could remove it, with the fix; it was a plain
        warning, the directory said only by the token file's own line.
        """
        self.token_lock.path.unlink()
        self.dir.chmod(0o777)
        self.addCleanup(self.dir.chmod, 0o700)
        self.held.check_files()
        [said] = self.events
        self.assertEqual(said["log_level"], LogLevel.critical)
        line = formatEvent(said)
        self.assertIn(f"the lock file {self.token_lock.path} of TOKEN_FILE was removed", line)
        self.assertIn("made again and locked", line)
        self.assertIn("chmod go-w", line)

    def test_taken_by_another(self) -> None:
        """
        A lock file removed, and a second gateway holding the one made
        since: one critical line naming it, not repeated.
        """
        self.token_lock.path.unlink()
        other = PidLock.acquire(self.token_lock.path)
        self.addCleanup(other.release)
        self.held.check_files()
        self.held.check_files()
        [said] = self.events
        self.assertEqual(said["log_level"], LogLevel.critical)
        line = formatEvent(said)
        self.assertIn(f"the lock file {self.token_lock.path} of TOKEN_FILE was replaced by another file", line)
        self.assertIn(f"process {os.getpid()} holds the one there now", line)
        self.assertIn("stop one of them", line)

    def test_directory_removed(self) -> None:
        """
        The whole directory removed: one critical line, saying a second
        gateway may start; taken again once the directory is back.
        """
        for name in self.dir.iterdir():
            name.unlink()
        self.dir.rmdir()
        self.held.check_files()
        self.held.check_files()
        self.assertEqual([e["log_level"] for e in self.events], [LogLevel.critical, LogLevel.critical])
        line = formatEvent(self.events[0])
        self.assertIn("was removed while the gateway ran, and cannot be made again", line)
        self.assertIn("a second gateway may now start on the same STATE_DIR", line)
        self.dir.mkdir()
        self.held.check_files()
        self.assertEqual([e["log_level"] for e in self.events[2:]], [LogLevel.warn, LogLevel.warn])
        self.assertTrue(self.state_lock.path.exists())


class RescuedCopiesTests(SynchronousTestCase):
    def test_said_at_start(self) -> None:
        """
        Copies of a lost database beside the one a gateway starts on are
        said, the newest named with the mv that puts it back (re-check
        s33: a restart without it said only "0 consumer(s) loaded").
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        database = directory / "openclaw.db"
        events: list[dict[str, Any]] = []
        log = Logger(observer=events.append)
        warn_rescued_copies(database, 0, log)
        self.assertEqual(events, [])
        for when in ("20261202T120000Z", "20261202T140000Z"):
            (directory / f"openclaw.db.rescued-{when}").write_bytes(b"")
        warn_rescued_copies(database, 0, log)
        (event,) = events
        self.assertEqual(event["log_level"], LogLevel.warn)
        line = formatEvent(event)
        self.assertIn("2 copies", line)
        self.assertIn(f"mv {directory}/openclaw.db.rescued-20261202T140000Z {database}", line)
        self.assertIn("holds 0 consumer(s)", line)


class TokenFileRemovedTests(TestCase):
    """
    The token file removed while the gateway runs (a cleaner of /tmp or
    /run) is written again with the current token within seconds (hostile
    trial s45: it stayed gone, and an operator had no token to read until
    a restart; the token is never logged).
    """

    timeout = 30

    @inlineCallbacks
    def wait_until(self, done: Any, seconds: float = FILES_CHECK_SECONDS * 3) -> Any:
        for _ in range(int(seconds * 20)):
            if done():
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail(f"not done within {seconds} s")

    @inlineCallbacks
    def test_written_again(self) -> Any:
        events = capture_log_events(self)
        directory = Path(self.mktemp())
        directory.mkdir()
        token_file = directory / "token"
        gateway = start_gateway(self, token_file=token_file)
        token_file.unlink()
        yield self.wait_until(token_file.exists)
        self.assertEqual(token_file.read_text(), gateway.token + "\n")
        self.assertEqual(token_file.stat().st_mode & 0o777, 0o600)
        [said] = _said(events, "was removed while the gateway ran (an rm")
        self.assertEqual(said["log_level"], LogLevel.warn)
        self.assertIn(gateway.service.sessions.current.jti, formatEvent(said))
        # After a rotation, the new token; never an older one.
        rotated = yield gateway.service.rotate_token()
        token_file.unlink()
        yield self.wait_until(token_file.exists)
        self.assertEqual(token_file.read_text(), rotated.token + "\n")
        # Its directory gone: said once, however many checks fail; written
        # once the directory is back.
        for name in directory.iterdir():
            name.unlink()
        directory.rmdir()
        yield self.wait_until(lambda: _said(events, "cannot be written again"))
        yield deferLater(reactor, FILES_CHECK_SECONDS * 1.5, lambda: None)
        [failed] = _said(events, "cannot be written again")
        self.assertIn("make its directory again", formatEvent(failed))
        directory.mkdir()
        yield self.wait_until(token_file.exists)
        self.assertEqual(token_file.read_text(), rotated.token + "\n")
        self.assertEqual(self.flushLoggedErrors(), [])


class RestoreTokenFileTests(TestCase):
    """
    L{SessionAuthority.restore_token_file} on its own, with and without a
    file writer (review s45).
    """

    def authority(self, writer: FileWriter | None = None) -> tuple[SessionAuthority, Path]:
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        authority = SessionAuthority(b"s" * 32, 3600, token_file=path, writer=writer)
        authority.issue()
        return authority, path

    def test_current_token_after_a_foreign_file(self) -> None:
        """
        A rotation that found TOKEN_FILE holding another's content made its
        token current without writing it; the file then removed, the
        restore wrote the token before it, which the gateway refuses as
        revoked.  It writes the current one.
        """
        authority, path = self.authority()
        path.write_text("another gateway's token\n")
        authority.adopt_later(authority.mint())
        current = authority.current
        path.unlink()
        authority.restore_token_file()
        self.assertEqual(path.read_text(), current.token + "\n")
        self.assertEqual(authority.verify(path.read_text()), current.jti)

    def test_directory_others_may_write(self) -> None:
        """
        Its directory made again so that others may write it, as start-up
        refuses: not written there (they could replace the token: recheck
        s45), said once with the fix; written once the directory is fixed.
        """
        events = capture_log_events(self)
        authority, path = self.authority()
        path.unlink()
        path.parent.chmod(0o777)
        authority.restore_token_file()
        authority.restore_token_file()
        self.assertFalse(path.exists())
        [said] = _said(events, "is not written again")
        self.assertIn("chmod go-w", formatEvent(said))
        path.parent.chmod(0o700)
        authority.restore_token_file()
        self.assertEqual(path.read_text(), authority.current.token + "\n")

    def test_said_again_for_another_cause(self) -> None:
        """
        Said once per cause: its directory gone, then made again so that
        others may write it, is a new cause with its own fix (recheck s45:
        the second was never said).
        """
        events = capture_log_events(self)
        authority, path = self.authority()
        path.unlink()
        path.parent.rmdir()
        authority.restore_token_file()
        authority.restore_token_file()
        self.assertEqual(len(_said(events, "cannot be written again")), 1)
        path.parent.mkdir(mode=0o777)
        path.parent.chmod(0o777)
        authority.restore_token_file()
        [said] = _said(events, "is not written again")
        self.assertIn("chmod go-w", formatEvent(said))
        self.assertFalse(path.exists())

    @inlineCallbacks
    def test_rotation_into_a_directory_others_may_write(self) -> Any:
        """
        A rotation does not write the token file into a directory made
        again so that others may write it, as start-up and the restore
        do not (recheck s45): refused, the current token kept.
        """
        writer = FileWriter(reactor)
        writer.startService()
        self.addCleanup(writer.stopService)
        authority, path = self.authority(writer)
        before = authority.current
        path.parent.chmod(0o777)
        failure = yield self.assertFailure(authority.adopt_later(authority.mint()), TokenFileUnwritable)
        self.assertIn("chmod go-w", str(failure))
        self.assertIs(authority.current, before)
        self.assertEqual(path.read_text(), before.token + "\n")

    def test_one_job_at_a_time(self) -> None:
        writer = FileWriter(reactor)  # not started: its jobs wait
        self.addCleanup(writer.stopService)
        authority, path = self.authority(writer)
        path.unlink()
        authority.restore_token_file()
        authority.restore_token_file()
        self.assertEqual(writer.pending, 1)

    @inlineCallbacks
    def test_job_looks_again(self) -> Any:
        """
        A file put at the path between the check and the write is kept.
        """
        writer = FileWriter(reactor)
        self.addCleanup(writer.stopService)
        authority, path = self.authority(writer)
        path.unlink()
        authority.restore_token_file()
        path.write_text("an operator's own\n")
        writer.startService()
        yield writer.run(lambda: None)
        self.assertEqual(path.read_text(), "an operator's own\n")

    def test_stop_says_nothing(self) -> None:
        """
        A restore the stop dropped before it began is no failure to say.
        """
        events = capture_log_events(self)
        writer = FileWriter(reactor)
        authority, path = self.authority(writer)
        path.unlink()
        authority.restore_token_file()
        writer.close()
        self.assertEqual(_said(events, "cannot be written again"), [])
        self.assertFalse(path.exists())
