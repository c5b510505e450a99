"""
The consumers' SQLite database (openclaw.db, its -wal and -shm files) is
readable by its owner only: it holds key hashes and usage.  One that
cannot be used (corrupt, read-only) is logged in one line that says what
to do.
"""

from __future__ import annotations

import json
import sqlite3
import stat
from pathlib import Path
from typing import Any

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, gatherResults, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from openclaw.consumers.commands import ConsumerCommands, _database_failed
from openclaw.consumers.model import Consumer, NewKey
from openclaw.consumers.prices import PriceTable
from openclaw.consumers.store import database_advice, log_database_failure
from openclaw.consumers.table import REVOKE_RETRY_SECONDS, ConsumerTable
from openclaw.consumers.unsaved import UNSAVED_REVOKES_FILE, UnsavedRevokesFile
from openclaw.control.commands import CommandError
from openclaw.files import write_atomically
from openclaw.writer import FileWriter
from tests.support import capture_log_events, start_gateway
from tests.test_consumers import GatewayCase
from tests.test_dataplane import HELLO


class DatabaseFileTests(GatewayCase):
    @inlineCallbacks
    def test_database_is_private(self) -> Any:
        """
        openclaw.db and its -wal and -shm files are readable by their owner
        only (they hold key hashes and usage).
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "p"})
        yield deferToThread(
            self.sdk(gateway, created["key"]).chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO
        )
        yield gateway.service.consumers.flush()
        database = gateway.service.settings.state_dir / "openclaw.db"
        files = [database, *(database.with_name(database.name + tail) for tail in ("-wal", "-shm"))]
        self.assertTrue(all(f.exists() for f in files), files)
        for f in files:
            self.assertEqual(stat.S_IMODE(f.stat().st_mode), 0o600, f)


class UnusableDatabaseTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_corrupt_database_is_one_line(self) -> Any:
        """
        STATE_DIR/openclaw.db that is no SQLite database (corrupt, or a
        foreign file): the start-up's critical line says so on one line,
        without a traceback, and says to move it aside and restore it
        from a backup, not to check that STATE_DIR is writable.
        """
        state = Path(self.mktemp())
        state.mkdir()
        database = state / "openclaw.db"
        database.write_bytes(bytes(range(256)) * 20)
        database.chmod(0o600)
        events = capture_log_events(self)
        gateway = start_gateway(self, state_dir=state)
        yield gateway.service.consumers_ready
        self.assertFalse(gateway.service.consumers.loaded)
        [said] = [e for e in events if "cannot be used" in e.get("log_format", "")]
        self.assertEqual(said["log_level"], LogLevel.critical)
        self.assertNotIn("log_failure", said)
        line = formatEvent(said)
        self.assertNotIn("\n", line)
        self.assertIn("(file is not a database)", line)
        self.assertIn("corrupt or not a SQLite database", line)
        self.assertIn("restore it from a backup", line)
        # A failing disk reads as corrupt too: checked before a restore
        # throws a good file away (consumers trial s45).
        self.assertIn("PRAGMA integrity_check", line)
        self.assertIn("dmesg", line)
        self.assertNotIn("STATE_DIR is writable", line)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_read_only_database_advice(self) -> None:
        """
        A SQLite database that cannot be written: the advice is to check
        that STATE_DIR and the database are writable, and it is logged on
        one line.
        """
        database = Path(self.mktemp())
        sqlite3.connect(database).close()
        connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        self.addCleanup(connection.close)
        try:
            connection.execute("CREATE TABLE t (x)")
        except sqlite3.Error:
            reason = Failure()
        self.assertIn("readable and writable by the gateway's user", database_advice(reason))
        events = capture_log_events(self)
        log_database_failure(Logger(), "failed ({error}): {advice}", reason)
        [said] = events
        self.assertNotIn("log_failure", said)
        self.assertIn("attempt to write a readonly database", formatEvent(said))

    def test_refused_change_says_what_to_do(self) -> None:
        """
        A change SQLite refuses for its file's trouble (a full disk, an I/O
        error) is answered with what to do, and as not made; one refused by
        a rule of the data (another instance's change just before), or by
        any other error, is not.
        """
        full = sqlite3.OperationalError("database or disk is full")
        full.sqlite_errorcode = sqlite3.SQLITE_FULL
        broken = sqlite3.OperationalError("disk I/O error")
        broken.sqlite_errorcode = sqlite3.SQLITE_IOERR_WRITE
        for error, advice in ((full, "free space on the filesystem"), (broken, "check the disk that holds STATE_DIR")):
            said = str(_database_failed(Failure(error)).value)
            self.assertIn(f"the consumers' database refused the change: {error}; nothing was changed", said)
            self.assertIn(advice, said)
            self.assertTrue(said.endswith(", and retry"), said)
        said = str(_database_failed(Failure(psycopg.errors.ReadOnlySqlTransaction("read-only transaction"))).value)
        self.assertIn("nothing was changed: DATABASE_URL names a database that takes no writes", said)
        # Nor one that may have come after the commit: not said to be undone.
        said = str(_database_failed(Failure(RuntimeError("a fault after the commit"))).value)
        self.assertNotIn("nothing was changed", said)
        said = str(_database_failed(Failure(sqlite3.IntegrityError("UNIQUE constraint failed: consumers.name"))).value)
        self.assertEqual(said, "the consumers' database refused the change: UNIQUE constraint failed: consumers.name")


class _RefusingStore:
    """
    A store whose writes the database refuses (full), until C{full} is false.
    """

    def __init__(self) -> None:
        self.full = True

    def _written(self, value: Any) -> Deferred[Any]:
        if self.full:
            error = sqlite3.OperationalError("database or disk is full")
            error.sqlite_errorcode = sqlite3.SQLITE_FULL
            return fail(error)
        return succeed(value)

    def revoke_key(self, name: str, prefix: str) -> Deferred[int]:
        return self._written(1)

    def delete(self, name: str, retired: str) -> Deferred[None]:
        return self._written(None)


class RefusingStoreCase(TestCase):
    """
    A consumer table over a store that refuses writes (full), its
    commands, and what it logs.
    """

    def setUp(self) -> None:
        self.store = _RefusingStore()
        self.table = ConsumerTable(self.store, PriceTable.with_overrides({}), clock=lambda: 1000.0)  # type: ignore[arg-type]
        self.table.loaded = True
        self.table.consumers["team"] = Consumer("team", created_at=900.0)
        self.key = NewKey.make()
        self.table.keys[self.key.hash] = ("team", self.key.prefix)
        self.commands = ConsumerCommands(self.table, clock=lambda: 1000.0).handlers()
        self.clock = Clock()
        self.events = capture_log_events(self)

    def refused(self, cmd: str, data: dict[str, Any]) -> str:
        failure = self.failureResultOf(self.commands[cmd](data), CommandError)
        return str(failure.value)

    def revoke(self) -> dict[str, Any]:
        return self.successResultOf(self.commands["key_revoke"]({"name": "team", "key_prefix": self.key.prefix}))

    def said(self, words: str) -> list[str]:
        return [formatEvent(event) for event in self.events if words in formatEvent(event)]


class RefusedChangeTests(RefusingStoreCase):
    """
    A delete the database refuses changes nothing, here as there; a key
    revocation it refuses is kept here (the key refused at once) and
    written again every REVOKE_RETRY_SECONDS until the database takes it:
    a leaked key must stop working while a disk is full or a database
    down.
    """

    def test_revoke_unsaved_refuses_the_key_at_once(self) -> None:
        """
        The answer says the key is refused but the revoke not saved, why,
        and what the gateway does about it; the key is refused, listed
        under revokes_unsaved, not among the keys; one critical line.
        """
        self.table.start(self.clock)
        revoked = self.revoke()
        self.assertEqual((revoked["saved"], revoked["keys_left"]), (False, 0))
        self.assertIn("the key is refused by this gateway from now on, but the revoke is not saved", revoked["warning"])
        self.assertIn("database or disk is full", revoked["warning"])
        self.assertIn("free space", revoked["warning"])
        self.assertIn("writes it again every 5 s", revoked["warning"])
        self.assertNotIn("other instances", revoked["warning"])
        self.assertIsNone(self.table.identify(self.key.key.encode()))
        listed = self.successResultOf(self.commands["consumer_list"]({"name": "team"}))
        self.assertEqual(listed["consumers"][0]["keys"], [])
        self.assertEqual(listed["consumers"][0]["revokes_unsaved"], [self.key.prefix])
        lines = self.said("could not be written")
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(f"ock-{self.key.prefix}", lines[0])
        self.assertIn("a restart of this gateway serves the key again", lines[0])

    def test_revoke_written_again_until_the_database_takes_it(self) -> None:
        self.table.start(self.clock)
        self.revoke()
        self.clock.advance(REVOKE_RETRY_SECONDS)
        self.clock.advance(REVOKE_RETRY_SECONDS)
        # Said once, however often it is tried.
        self.assertEqual(len(self.said("could not be written")), 1)
        self.store.full = False
        self.clock.advance(REVOKE_RETRY_SECONDS)
        self.assertEqual(len(self.said("is written to the database now")), 1)
        self.assertEqual(self.table.revoking, {})
        self.assertNotIn(self.key.hash, self.table.keys)
        self.assertIsNone(self.table.identify(self.key.key.encode()))
        listed = self.successResultOf(self.commands["consumer_list"]({"name": "team"}))
        self.assertNotIn("revokes_unsaved", listed["consumers"][0])
        # The usage rows' flusher only: no try of the revoke left.
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_retried_one_at_a_time(self) -> None:
        """
        Many revokes not saved: a round of retries stops at the first the
        database refuses (one failing write every 5 s, not one per
        revoke), and writes them all, one after the other, once it takes
        them; the lines are ten, then one for the rest.
        """
        tried: list[str] = []
        refuse = self.store.revoke_key

        def counted(name: str, prefix: str) -> Deferred[int]:
            tried.append(prefix)
            return refuse(name, prefix)

        self.store.revoke_key = counted  # type: ignore[method-assign]
        for _ in range(30):
            key = NewKey.make()
            self.table.keys[key.hash] = ("team", key.prefix)
            self.successResultOf(self.commands["key_revoke"]({"name": "team", "key_prefix": key.prefix}))
        self.table.start(self.clock)
        del tried[:]
        self.clock.advance(REVOKE_RETRY_SECONDS)
        self.assertEqual(len(tried), 1)
        self.store.full = False
        self.clock.advance(REVOKE_RETRY_SECONDS)
        self.assertEqual(len(tried), 31)
        self.assertEqual(self.table.revoking, {})
        self.assertEqual(len(self.said("is written to the database now")), 10)
        self.assertIn("and 20 more key revokes are written", self.said("more key revokes")[0])

    def test_round_ends_at_the_stop(self) -> None:
        """
        A round of retries under way (a slow database) writes nothing more
        once the table stops, and no second round overlaps it (review
        s47).
        """
        for _ in range(2):
            key = NewKey.make()
            self.table.keys[key.hash] = ("team", key.prefix)
            self.successResultOf(self.commands["key_revoke"]({"name": "team", "key_prefix": key.prefix}))
        asked: list[Deferred[int]] = []

        def slow(name: str, prefix: str) -> Deferred[int]:
            asked.append(Deferred())
            return asked[-1]

        self.store.revoke_key = slow  # type: ignore[method-assign]
        self.table.start(self.clock)
        self.clock.advance(REVOKE_RETRY_SECONDS)
        self.assertEqual(len(asked), 1)
        self.clock.advance(REVOKE_RETRY_SECONDS)
        self.assertEqual(len(asked), 1)
        self.table.stop()
        asked[0].callback(1)
        self.assertEqual(len(asked), 1)

    def test_revoke_survives_a_reload(self) -> None:
        """
        A reload (another instance's change) brings back the database's
        keys, the unsaved revoke's among them: still refused.
        """
        self.table.start(self.clock)
        self.revoke()
        self.table.keys = {self.key.hash: ("team", self.key.prefix)}
        self.assertIsNone(self.table.identify(self.key.key.encode()))

    def test_revoke_again(self) -> None:
        """
        A key whose revoke is not saved may be revoked again: tried at
        once, and once the database takes it, saved.
        """
        self.table.start(self.clock)
        self.revoke()
        self.assertFalse(self.revoke()["saved"])
        self.store.full = False
        self.assertTrue(self.revoke()["saved"])
        self.assertEqual(self.table.revoking, {})

    def test_cluster_says_it_is_kept_in_redis(self) -> None:
        commands = ConsumerCommands(self.table, clock=lambda: 1000.0, cluster=True).handlers()
        revoked = self.successResultOf(commands["key_revoke"]({"name": "team", "key_prefix": self.key.prefix}))
        self.assertIn("it is kept in Redis, where every instance reads it, refuses the key", revoked["warning"])
        self.assertNotIn("a restart before that serves the key again", revoked["warning"])

    def test_stop_says_an_unsaved_revoke_is_lost(self) -> None:
        self.table.start(self.clock)
        self.revoke()
        self.table.stop()
        lines = self.said("was never written to the database")
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(
            "was never written to the database: the key works again when the gateway starts; revoke it "
            "again once the database takes writes",
            lines[0],
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_revoke_saved(self) -> None:
        self.store.full = False
        revoked = self.revoke()
        self.assertEqual((revoked["saved"], revoked["keys_left"]), (True, 0))
        self.assertIsNone(self.table.identify(self.key.key.encode()))

    def test_delete_across_a_reload(self) -> None:
        """
        A reload (another instance's change) while the delete waits for
        the database puts a copy of the consumer in the table: the delete,
        once written, takes that copy out too.
        """
        self.store.full = False
        waiting: Deferred[None] = Deferred()
        self.store.delete = lambda name, retired: waiting  # type: ignore[method-assign]
        deleting = self.commands["consumer_delete"]({"name": "team"})
        self.table.consumers = {"team": Consumer("team", created_at=900.0)}
        waiting.callback(None)
        self.successResultOf(deleting)
        self.assertNotIn("team", self.table.consumers)
        self.assertIsNone(self.table.identify(self.key.key.encode()))

    def test_delete(self) -> None:
        said = self.refused("consumer_delete", {"name": "team"})
        self.assertIn("nothing was changed: free space", said)
        self.assertIsNotNone(self.table.identify(self.key.key.encode()))
        self.assertIn("team", self.table.consumers)
        self.store.full = False
        deleted = self.successResultOf(self.commands["consumer_delete"]({"name": "team"}))
        self.assertEqual(deleted["deleted"], "team")
        self.assertIsNone(self.table.identify(self.key.key.encode()))
        self.assertNotIn("team", self.table.consumers)


class KeptRevokesTests(RefusingStoreCase):
    """
    The revokes not saved kept in STATE_DIR (L{UnsavedRevokesFile}):
    written at a revoke the database refuses, rewritten once it takes it,
    given back at the next start; a file that cannot be trusted says so.
    """

    def setUp(self) -> None:
        super().setUp()
        self.directory = Path(self.mktemp())
        self.directory.mkdir()
        self.kept = UnsavedRevokesFile(self.directory)
        self.table.revokes_file = self.kept

    def test_kept_then_dropped_once_saved(self) -> None:
        self.table.start(self.clock)
        revoked = self.revoke()
        path = self.directory / UNSAVED_REVOKES_FILE
        self.assertIn(f"it is kept in {path} too, so a restart of this gateway before then refuses", revoked["warning"])
        self.assertNotIn("serves the key again", revoked["warning"])
        self.assertIn(f"it is kept in {path} for a restart", self.said("could not be written")[0])
        self.assertEqual(self.kept.load(), {self.key.hash: ("team", self.key.prefix)})
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertNotIn(self.key.key, path.read_text())
        self.store.full = False
        self.clock.advance(REVOKE_RETRY_SECONDS)
        self.assertEqual(self.kept.load(), {})

    def test_nothing_written_for_a_revoke_saved_at_once(self) -> None:
        """
        A revoke the database takes at once leaves no file behind (nor a
        write of one at each revoke).
        """
        self.assertEqual(self.kept.load(), {})
        self.store.full = False
        self.assertTrue(self.revoke()["saved"])
        self.assertFalse(self.kept.path.exists())

    def test_removed_file_written_again(self) -> None:
        """
        The file removed while the gateway runs (an rm, a cleaner): written
        again at the next round of retries, said once; removed just before
        the stop: written at the stop, which says so truly (recheck s47:
        the stop said "kept in" of a file that was gone, and the next start
        served the key).
        """
        self.table.start(self.clock)
        self.revoke()
        self.kept.path.unlink()
        self.clock.advance(REVOKE_RETRY_SECONDS)
        self.assertEqual(self.kept.load(), {self.key.hash: ("team", self.key.prefix)})
        self.assertEqual(len(self.said("was removed while the gateway ran: written again")), 1)
        self.kept.path.unlink()
        self.table.stop()
        self.assertEqual(self.kept.load(), {self.key.hash: ("team", self.key.prefix)})
        self.assertIn("so the key is refused again at the next start", self.said("was never written")[0])

    def test_stop_with_the_directory_gone(self) -> None:
        """
        STATE_DIR gone before the stop: the stop cannot keep the revokes,
        and says the key works again (not "kept in").
        """
        self.table.start(self.clock)
        self.revoke()
        self.kept.path.unlink()
        self.directory.rmdir()
        self.table.stop()
        [line] = self.said("was never written")
        self.assertIn("the key works again when the gateway starts", line)
        self.assertEqual(len(self.said("could not keep the key revokes")), 1)

    def test_stop_says_it_is_kept(self) -> None:
        self.table.start(self.clock)
        self.revoke()
        self.table.stop()
        [line] = self.said("was never written to the database")
        self.assertIn(
            f"kept in {self.directory / UNSAVED_REVOKES_FILE}, so the key is refused again at the next start", line
        )

    def test_not_kept_when_the_file_cannot_be_written(self) -> None:
        """
        STATE_DIR full or gone too: the answer and the log say a restart
        serves the key again, as without the file.
        """
        self.kept.path = self.directory / "missing" / UNSAVED_REVOKES_FILE
        self.table.start(self.clock)
        revoked = self.revoke()
        self.assertIn("a restart before that serves the key again", revoked["warning"])
        self.assertEqual(len(self.said("could not keep the key revokes not saved")), 1)
        self.table.stop()
        self.assertIn("the key works again when the gateway starts", self.said("was never written")[0])

    def test_given_back_at_the_next_start(self) -> None:
        self.table.start(self.clock)
        self.revoke()
        later = ConsumerTable(self.store, PriceTable.with_overrides({}), clock=lambda: 1000.0, revokes_file=self.kept)  # type: ignore[arg-type]
        later.keys[self.key.hash] = ("team", self.key.prefix)
        later.adopt_revokes(self.kept.load(), earlier_run=True)
        self.assertIsNone(later.identify(self.key.key.encode()))
        self.assertEqual(len(self.said("was not written to the database by an earlier run")), 1)
        later.start(self.clock)
        self.store.full = False
        self.clock.advance(REVOKE_RETRY_SECONDS)
        self.assertEqual((later.revoking, self.kept.load()), ({}, {}))

    def test_another_instances_revoke_kept_too(self) -> None:
        """
        A cluster's revoke adopted from Redis is kept here too: Redis
        lost it (a restart without persistence), this instance restarted
        still refuses the key.
        """
        self.table.adopt_revokes({self.key.hash: ("team", self.key.prefix)})
        self.assertEqual(self.kept.load(), {self.key.hash: ("team", self.key.prefix)})

    def test_many_revokes_kept(self) -> None:
        """
        Every key of a leak revoked while the database is down: a thousand
        revokes (well past the route file's 64 KiB) come back whole.
        """
        revokes = {f"{n:064x}": (f"team-{n:04d}", f"{n:08d}") for n in range(1000)}
        self.assertTrue(self.successResultOf(self.kept.save(revokes)))
        self.assertGreater(self.kept.path.stat().st_size, 64 * 1024)
        self.assertEqual(self.kept.load(), revokes)
        self.table.adopt_revokes(self.kept.load(), earlier_run=True)
        self.assertEqual(len(self.said("by an earlier run")), 10)
        self.assertIn("and 990 more key revokes not written", self.said("more key revokes")[0])
        self.table.stop()
        self.assertEqual(len(self.said("was never written to the database")), 10)
        self.assertIn("and 990 more key revokes never written to the database, kept in", self.said("990 more")[1])

    def test_untrusted_file(self) -> None:
        """
        A file of another shape, entries changed by hand, a link: what can
        be read of it is taken, the rest said in a critical line.
        """
        path = self.directory / UNSAVED_REVOKES_FILE
        good = {"sha256": "ab" * 32, "consumer": "team", "key_prefix": "abcdefgh"}
        path.write_text(json.dumps({"revokes_unsaved": [good, {"sha256": "x"}, 3]}))
        self.assertEqual(self.kept.load(), {"ab" * 32: ("team", "abcdefgh")})
        self.assertIn("2 entr(y/ies)", self.said("are not key revokes")[0])
        for content in ("[]", "{", '{"revokes_unsaved": 1}'):
            path.write_text(content)
            self.assertEqual(self.kept.load(), {})
        # The one that could not be read at all is kept under another name
        # (the next save would replace the only list of those keys).
        [aside] = self.directory.glob(f"{UNSAVED_REVOKES_FILE}.unread-*")
        self.assertEqual(aside.read_text(), "{")
        self.assertIn(f"the file is kept as {aside}", self.said("could not read the key revokes")[0])
        path.unlink()
        (self.directory / "elsewhere").write_text(json.dumps({"revokes_unsaved": [good]}))
        path.symlink_to("elsewhere")
        self.assertEqual(self.kept.load(), {})
        self.assertTrue(self.said("could not read the key revokes not saved"))


class RevokesFileWriterTests(TestCase):
    """
    L{UnsavedRevokesFile} over the gateway's file writer: one write at a
    time, the set last given written once more after it; a write dropped
    at the stop is not said as a failure (review s47).
    """

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir()
        self.events = capture_log_events(self)

    @inlineCallbacks
    def test_saves_while_one_is_written_are_one_write(self) -> Any:
        written: list[str] = []
        gate: Deferred[None] = Deferred()

        def write_file(path: Path, text: str) -> None:
            # The first write waits for the test (a slow disk).
            if not written:
                blockingCallFromThread(reactor, lambda: gate)
            written.append(text)
            write_atomically(path, text)

        writer = FileWriter(reactor, write_file)
        writer.startService()
        self.addCleanup(writer.stopService)
        kept = UnsavedRevokesFile(self.directory, writer)
        encoded: list[int] = []
        document = kept._document

        def counted(revokes: Any) -> str:
            encoded.append(len(revokes))
            return document(revokes)

        self.patch(kept, "_document", counted)
        sets = [{f"{n:064x}": ("team", f"{n:08d}") for n in range(count)} for count in (1, 2, 3, 4)]
        saving = [kept.save(each) for each in sets]
        gate.callback(None)
        results = yield gatherResults(saving)
        self.assertEqual(results, [True] * 4)
        # Encoded twice, not four times (review s47: each save encoded the
        # whole set on the reactor thread: 18 ms at 10,000 revokes).
        self.assertEqual((len(written), encoded), (2, [1, 4]))
        self.assertEqual(kept.load(), sets[-1])

    def test_dropped_at_the_stop_is_not_said(self) -> None:
        writer = FileWriter(reactor)
        kept = UnsavedRevokesFile(self.directory, writer)
        writer.close()
        self.assertFalse(self.successResultOf(kept.save({"ab" * 32: ("team", "abcdefgh")})))
        self.assertEqual([formatEvent(e) for e in self.events if "could not keep" in formatEvent(e)], [])
        self.assertTrue(kept.save_now({"ab" * 32: ("team", "abcdefgh")}))
        self.assertEqual(kept.load(), {"ab" * 32: ("team", "abcdefgh")})
