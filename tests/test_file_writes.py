"""
The state file and the token file are written off the reactor thread
after start-up (L{openclaw.writer.FileWriter}): a slow disk stalls no
agent's call and no control connection; writes of a file land in the order
asked; a stop waits for them before removing the token file.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from openclaw.files import write_atomically
from openclaw.routing import Route
from openclaw.session import SessionAuthority
from openclaw.state import STATE_FILE, RouteStore
from openclaw.writer import FileWriter, WriterStopped
from tests.support import RunningGateway, capture_log_events, get_text, open_client, start_gateway, within

#: How long a blocked write waits to be let go before it fails, in
#: seconds: a write made on the reactor thread (the fault these tests
#: catch) cannot be let go by the test, and must not hang it.
BLOCKED_SECONDS = 5.0


class BlockingWrites:
    """
    A C{write_file} (L{FileWriter}'s) whose writes of C{path} wait until
    L{release} is set (or fail after L{BLOCKED_SECONDS}), the first
    C{blocked} of them only; every write then made as the gateway's is.

    @ivar entered: set when a blocked write has begun waiting.
    @ivar written: the texts written to C{path}, in order.
    """

    def __init__(self, path: Path, blocked: int = 1) -> None:
        self.path = path
        self.blocked = blocked
        self.entered = threading.Event()
        self.release = threading.Event()
        self.written: list[str] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, path: Path, text: str) -> None:
        self.threads.add(threading.current_thread().name)
        if path == self.path:
            with self._lock:
                block, self.blocked = self.blocked > 0, self.blocked - 1
            if block:
                self.entered.set()
                if not self.release.wait(BLOCKED_SECONDS):
                    raise OSError(errno.ETIMEDOUT, "the test's blocked write was never let go")
        write_atomically(path, text)
        if path == self.path:
            self.written.append(text)


def entered(writes: BlockingWrites) -> Deferred[bool]:
    """
    Fire with whether a blocked write began within L{BLOCKED_SECONDS}
    (waited for in a thread of the reactor's pool, not polled).
    """
    return deferToThread(writes.entered.wait, BLOCKED_SECONDS)


def settle(seconds: float = 0.2) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class BlockedWriteTests(TestCase):
    """
    While a write of the state file or the token file is blocked, the
    gateway answers on its other connections and its data plane.
    """

    timeout = 30

    def gateway(self, writes: BlockingWrites, **settings: Any) -> RunningGateway:
        return start_gateway(self, api=True, service_options={"write_file": writes}, **settings)

    @inlineCallbacks
    def test_switch_blocked(self):
        """
        A switch whose state file write is blocked: a ping on another
        connection and a data-plane call are answered meanwhile; the
        switch is answered once the write is let go, without a warning
        about saving, and the file holds its route.
        """
        state_dir = Path(self.mktemp())
        state_dir.mkdir(parents=True)
        writes = BlockingWrites(state_dir / STATE_FILE)
        gateway = self.gateway(writes, state_dir=state_dir)
        operator = yield open_client(self, gateway.port)
        bystander = yield open_client(self, gateway.port)
        switched = operator.ask(gateway.token, "switch_provider", {"provider": "kimi", "model": "moonshot-v1-8k"})
        began = yield entered(writes)
        self.assertTrue(began)
        pong = yield bystander.ask(gateway.token, "ping", seconds=2.0)
        self.assertTrue(pong["ok"], pong)
        text = yield within(get_text(gateway.api_port, "/v1/models"), 2.0, "a data-plane answer")
        self.assertIn("error", text)
        self.assertFalse(switched.called)
        writes.release.set()
        answer = yield switched
        self.assertTrue(answer["ok"], answer)
        self.assertNotIn("could not be saved", answer["result"].get("warning", ""))
        self.assertEqual(
            json.loads((state_dir / STATE_FILE).read_text()), {"provider": "kimi", "model": "moonshot-v1-8k"}
        )
        self.assertNotIn(threading.current_thread().name, writes.threads)

    @inlineCallbacks
    def test_rotation_blocked(self):
        """
        A rotation whose token file write is blocked: the current token
        still opens the control plane on another connection, and the data
        plane answers, meanwhile; the rotation is answered once the write
        is let go, with the token the file then holds.
        """
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        token_file = directory / "token"
        writes = BlockingWrites(token_file)
        gateway = self.gateway(writes, token_file=token_file)
        old = gateway.token
        operator = yield open_client(self, gateway.port)
        bystander = yield open_client(self, gateway.port)
        rotated = operator.ask(old, "rotate_token")
        began = yield entered(writes)
        self.assertTrue(began)
        pong = yield bystander.ask(old, "ping", seconds=2.0)
        self.assertTrue(pong["ok"], pong)
        yield within(get_text(gateway.api_port, "/v1/models"), 2.0, "a data-plane answer")
        self.assertFalse(rotated.called)
        self.assertEqual(token_file.read_text().strip(), old)
        writes.release.set()
        answer = yield rotated
        self.assertTrue(answer["ok"], answer)
        new = answer["result"]["token"]
        self.assertEqual(token_file.read_text().strip(), new)
        self.assertEqual(gateway.token, new)
        refused = yield bystander.ask(old, "ping")
        self.assertEqual(refused["error"], "token revoked")


class OrderTests(TestCase):
    """
    Of two writes of one file asked back to back, the first slowed, the
    second is the one on disk (and in force).
    """

    timeout = 30

    @inlineCallbacks
    def test_two_switches(self):
        state_dir = Path(self.mktemp())
        state_dir.mkdir(parents=True)
        writes = BlockingWrites(state_dir / STATE_FILE)
        gateway = start_gateway(self, service_options={"write_file": writes}, state_dir=state_dir)
        first = yield open_client(self, gateway.port)
        second = yield open_client(self, gateway.port)
        one = first.ask(gateway.token, "switch_provider", {"provider": "kimi", "model": "moonshot-v1-8k"})
        began = yield entered(writes)
        self.assertTrue(began)
        two = second.ask(gateway.token, "switch_provider", {"provider": "kimi", "model": "moonshot-v1-32k"})
        yield settle()
        self.assertFalse(one.called or two.called)
        writes.release.set()
        answers = yield within(gatherResults([one, two]), 10.0, "both switches' answers")
        for answer in answers:
            self.assertTrue(answer["ok"], answer)
            self.assertNotIn("could not be saved", answer["result"].get("warning", ""))
        self.assertEqual(
            json.loads((state_dir / STATE_FILE).read_text()), {"provider": "kimi", "model": "moonshot-v1-32k"}
        )
        self.assertEqual([json.loads(text)["model"] for text in writes.written], ["moonshot-v1-8k", "moonshot-v1-32k"])
        self.assertEqual(gateway.service.route.current.model, "moonshot-v1-32k")

    @inlineCallbacks
    def test_two_rotations(self):
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        token_file = directory / "token"
        writes = BlockingWrites(token_file)
        gateway = start_gateway(self, service_options={"write_file": writes}, token_file=token_file)
        old = gateway.token
        first = yield open_client(self, gateway.port)
        second = yield open_client(self, gateway.port)
        one = first.ask(old, "rotate_token")
        began = yield entered(writes)
        self.assertTrue(began)
        two = second.ask(old, "rotate_token")
        yield settle()
        self.assertFalse(one.called or two.called)
        writes.release.set()
        answers = yield within(gatherResults([one, two]), 10.0, "both rotations' answers")
        for answer in answers:
            self.assertTrue(answer["ok"], answer)
        last = answers[1]["result"]["token"]
        self.assertEqual(token_file.read_text().strip(), last)
        self.assertEqual(gateway.token, last)
        self.assertEqual([text.strip() for text in writes.written], [answers[0]["result"]["token"], last])


class StopTests(TestCase):
    """
    A stop while a write is blocked waits for it; then the token file is
    removed, and nothing writes it again.
    """

    timeout = 30

    @inlineCallbacks
    def test_stop_waits_for_write(self):
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        token_file = directory / "token"
        writes = BlockingWrites(token_file)
        gateway = start_gateway(
            self, service_options={"write_file": writes}, token_file=token_file, shutdown_grace_seconds=0.5
        )
        client = yield open_client(self, gateway.port)
        client.command(gateway.token, "rotate_token")
        began = yield entered(writes)
        self.assertTrue(began)
        stopped = gateway.service.stopService()
        # Past the grace: the listeners and the connections are closed,
        # and the stop waits for the write.
        yield settle(1.5)
        self.assertFalse(stopped.called)
        self.assertTrue(token_file.exists())
        writes.release.set()
        yield within(stopped, 10.0, "the stop")
        # The rotation, in flight past the grace, was cut short (its
        # answer cancelled, as any command's then: logged), not its write.
        self.flushLoggedErrors(CancelledError)
        # The rotation was written, made current, then its file removed.
        self.assertEqual(len(writes.written), 1)
        self.assertEqual(gateway.service.sessions.current.token, writes.written[0].strip())
        self.assertFalse(token_file.exists())
        # Nothing is written any more.
        late = gateway.service.writer.write(token_file, "late\n")
        yield self.assertFailure(late, WriterStopped)
        yield settle()
        self.assertFalse(token_file.exists())
        self.assertFalse(any(p.name.startswith(".token.") for p in directory.iterdir()))


class FileWriterTests(TestCase):
    """
    L{FileWriter} alone.
    """

    timeout = 30

    @inlineCallbacks
    def test_order_and_thread(self):
        """
        Jobs run one at a time, in the order asked, in the writer's
        thread; a failing job fails its Deferred only.
        """
        writer = FileWriter(reactor)
        writer.startService()
        self.addCleanup(lambda: writer.stopService() if writer.running else None)
        ran: list[tuple[int, str]] = []
        daemon: list[bool] = []

        def job(n: int) -> int:
            ran.append((n, threading.current_thread().name))
            # Never one that keeps the process from exiting.
            daemon.append(threading.current_thread().daemon)
            if n == 2:
                raise OSError(errno.ENOSPC, "full")
            return n

        results = [writer.run(lambda n=n: job(n)) for n in range(5)]
        yield self.assertFailure(results[2], OSError)
        for n in (0, 1, 3, 4):
            self.assertEqual((yield results[n]), n)
        self.assertEqual([n for n, _ in ran], [0, 1, 2, 3, 4])
        self.assertEqual({name for _, name in ran}, {"PoolThread-openclaw-file-writer-0"})
        self.assertEqual(set(daemon), {True})
        yield writer.stopService()
        self.assertEqual(writer.pending, 0)
        yield self.assertFailure(writer.run(lambda: 1), WriterStopped)

    @inlineCallbacks
    def test_stop_says_it_still_waits_for_a_blocked_write(self):
        """
        A stop waiting for a blocked write says so when it begins, then
        again every C{still_waiting_seconds} (10 by default) while it
        waits, naming the file and how long it has waited (review s33: one
        line, then nothing however long the disk held it); the wait itself
        has no bound (the file is never left half written), and once the
        write ends the lines stop.
        """
        events = capture_log_events(self)
        directory = Path(self.mktemp())
        directory.mkdir()
        path = directory / "state.json"
        writes = BlockingWrites(path)
        self.addCleanup(writes.release.set)
        writer = FileWriter(reactor, writes, still_waiting_seconds=0.2)
        writer.startService()
        written = writer.write(path, "{}")
        began = yield entered(writes)
        self.assertTrue(began)
        stopped = writer.stopService()
        yield settle(0.5)
        self.assertFalse(stopped.called)
        texts = [formatEvent(event) for event in events]
        self.assertIn(f"waiting for 1 file write(s) to finish before stopping ({path})", texts)
        still = [text for text in texts if text.startswith("still waiting for the write of ")]
        self.assertGreaterEqual(len(still), 2, texts)
        self.assertTrue(
            still[0].startswith(f"still waiting for the write of {path}, 0 s (1 file write(s) left): "), still[0]
        )
        writes.release.set()
        yield within(stopped, 10.0, "the stop")
        yield written
        self.assertEqual(writes.written, ["{}"])
        count = len([event for event in events if formatEvent(event).startswith("still waiting")])
        yield settle(0.5)
        self.assertEqual(len([event for event in events if formatEvent(event).startswith("still waiting")]), count)

    @inlineCallbacks
    def test_route_save_that_fails_otherwise_never_fails(self):
        """
        L{RouteStore.save_later} never fails, as it says: a write that
        fails with something other than an C{OSError} (a fault of ours) is
        logged with its traceback and answered as a warning (review s33:
        it failed the switch's Deferred).  Without a writer, it saves at
        once.
        """
        events = capture_log_events(self)
        directory = Path(self.mktemp())
        directory.mkdir()

        def faulty(path: Path, text: str) -> None:
            raise RuntimeError("a fault of ours")

        writer = FileWriter(reactor, faulty)
        writer.startService()
        self.addCleanup(lambda: writer.stopService() if writer.running else None)
        warning = yield RouteStore(directory, ("gemini",), writer).save_later(Route("gemini", "g-1"))
        self.assertIsInstance(warning, str)
        self.assertIn(f"the switch is made but could not be saved to {directory / STATE_FILE} (a fault", warning)
        logged = [formatEvent(event) for event in events if "log_failure" in event]
        self.assertEqual(len(logged), 1, logged)
        self.assertIn(f"could not save the active provider to {directory / STATE_FILE} (a fault", logged[0])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        saved = yield RouteStore(directory, ("gemini",)).save_later(Route("gemini", "g-2"))
        self.assertIsNone(saved)
        self.assertEqual(json.loads((directory / STATE_FILE).read_text()), {"provider": "gemini", "model": "g-2"})

    def failing_writer(self) -> tuple[FileWriter, threading.Event]:
        """
        A started writer whose writes fail (ENOSPC) once let go (the
        event), stopped at the test's end.
        """
        release = threading.Event()

        def write_file(path: Path, text: str) -> None:
            release.wait(BLOCKED_SECONDS)
            raise OSError(errno.ENOSPC, "No space left on device")

        writer = FileWriter(reactor, write_file)
        writer.startService()
        self.addCleanup(lambda: writer.stopService() if writer.running else None)
        return writer, release

    @inlineCallbacks
    def test_cancelled_write_failure_logged(self):
        """
        A write whose asker gave up (a command cut short at the stop) and
        that then fails is logged, by its asker's own words when it gives
        them (the state file's, the token's) and the writer's otherwise:
        never lost.
        """
        writer, release = self.failing_writer()
        events = capture_log_events(self)
        directory = Path(self.mktemp())
        directory.mkdir()
        sessions = SessionAuthority(
            b"0123456789abcdef0123456789abcdef", 3600, token_file=directory / "token", writer=writer
        )
        asked = [
            writer.write(directory / "other", "x"),
            RouteStore(directory, ("gemini",), writer).save_later(Route("gemini", "g-1")),
            sessions.issue_later(),
        ]
        for pending in asked:
            pending.cancel()
            yield self.assertFailure(pending, CancelledError)
        release.set()
        yield writer.stopService()
        texts = [formatEvent(event) for event in events]
        self.assertTrue(
            any(text.startswith("a file write failed after the command that asked for it") for text in texts), texts
        )
        self.assertTrue(
            any(text.startswith(f"could not save the active provider to {directory / STATE_FILE}: ") for text in texts),
            texts,
        )
        self.assertTrue(
            any(text.startswith("session token ") and "was not made current" in text for text in texts), texts
        )
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)


class Flushes:
    """
    An C{fsync} (L{write_atomically}'s) that records what each call
    flushed (C{"directory"} or C{"file"}, and what C{path} held then),
    then flushes it, or fails with C{directory_errno} for a directory.
    """

    def __init__(self, path: Path, directory_errno: int | None = None) -> None:
        self.path = path
        self.directory_errno = directory_errno
        self.calls: list[tuple[str, str | None]] = []

    def __call__(self, fd: int) -> None:
        info = os.fstat(fd)
        held = self.path.read_text() if self.path.exists() else None
        if stat.S_ISDIR(info.st_mode):
            self.assertSameDirectory(info)
            self.calls.append(("directory", held))
            if self.directory_errno is not None:
                raise OSError(self.directory_errno, os.strerror(self.directory_errno))
        else:
            self.calls.append(("file", held))
        os.fsync(fd)

    def assertSameDirectory(self, info: os.stat_result) -> None:
        there = os.stat(self.path.parent)
        assert (info.st_dev, info.st_ino) == (there.st_dev, there.st_ino), "not the file's directory"


class AtomicWriteTests(SynchronousTestCase):
    """
    L{write_atomically} flushes the directory after the rename (review
    s33 R5b: only the new file was flushed, so the rename itself could be
    lost at a power failure after the command had said done).
    """

    def replaced(self, directory_errno: int | None = None) -> tuple[Path, Flushes]:
        directory = Path(self.mktemp())
        directory.mkdir()
        path = directory / "token"
        path.write_text("old\n")
        return path, Flushes(path, directory_errno)

    def test_directory_flushed_after_rename(self):
        path, flushes = self.replaced()
        write_atomically(path, "new\n", fsync=flushes)
        # The new file before the rename, the directory after it.
        self.assertEqual(flushes.calls, [("file", "old\n"), ("directory", "new\n")])
        self.assertEqual(sorted(p.name for p in path.parent.iterdir()), ["token"])

    def test_directory_flush_unsupported(self):
        """
        A file system that cannot flush a directory (C{EINVAL}): the
        write is made all the same.
        """
        path, flushes = self.replaced(errno.EINVAL)
        write_atomically(path, "new\n", fsync=flushes)
        self.assertEqual(flushes.calls[-1], ("directory", "new\n"))
        self.assertEqual(path.read_text(), "new\n")

    def test_directory_flush_failed(self):
        """
        The directory's flush failed (C{EIO}): the rename is made all the
        same (readers see the new content), no temporary file left.
        """
        path, flushes = self.replaced(errno.EIO)
        write_atomically(path, "new\n", fsync=flushes)
        self.assertEqual(path.read_text(), "new\n")
        self.assertEqual(sorted(p.name for p in path.parent.iterdir()), ["token"])

    def test_unreadable_directory(self):
        """
        A directory that cannot be opened to be flushed (write and search
        permission only): the file is replaced, the directory left to the
        kernel.
        """
        if os.geteuid() == 0:
            raise SkipTest("root opens any directory")
        path, flushes = self.replaced()
        path.parent.chmod(0o300)
        self.addCleanup(path.parent.chmod, 0o700)
        write_atomically(path, "new\n", fsync=flushes)
        self.assertEqual(flushes.calls, [("file", "old\n")])
        path.parent.chmod(0o700)
        self.assertEqual(path.read_text(), "new\n")
