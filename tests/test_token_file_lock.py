"""
One TOKEN_FILE, one gateway: a running gateway holds its token file
(C{flock(2)} on C{<TOKEN_FILE>.lock}) for its lifetime, a second gateway
given the same one refuses to start, a lock left by a killed gateway does
not block the next start, and a clean stop removes the lock file after
the token file.  Real C{twistd -n openclaw} processes, and the lock itself.
"""

from __future__ import annotations

import errno
import io
import os
import sys
from pathlib import Path
from typing import Any
from unittest import mock

from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from openclaw import tap
from openclaw.files import LockHeld, NotALockFile, PidLock
from openclaw.session import SessionAuthority, lock_token_file, token_file_lock_path
from openclaw.settings import ConfigError, Settings
from openclaw.tap import Options, makeService
from tests.support import GatewayProcess, close_client, connect, free_port, spawn_gateway, within

SECRET = "token-file-lock-secret-token-file-lock-42"


def gateway_env() -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "JWT_SECRET": SECRET,
    }


@inlineCallbacks
def running(process: GatewayProcess, token_file: Path) -> Any:
    """
    Wait (20 s at most) until C{process} has written C{token_file} and
    printed its banner.
    """
    for _ in range(400):
        if process.ended.called:
            raise AssertionError(f"the gateway ended: {process.stderr + process.stdout[-2000:]!r}")
        if token_file.exists() and b"SESSION TOKEN" in process.stdout:
            return
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"the gateway did not start: {process.stdout[-2000:]!r}")


class OneGatewayPerTokenFileTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)
        self.token_file = self.dir / "token"
        self.lock_file = self.dir / "token.lock"

    def spawn(self) -> GatewayProcess:
        state = Path(self.mktemp()).resolve()
        state.mkdir(parents=True)
        port = free_port()
        process = spawn_gateway(
            self,
            [
                "--port",
                str(port),
                "--interface",
                "127.0.0.1",
                "--token-file",
                str(self.token_file),
                "--state-dir",
                str(state),
            ],
            gateway_env(),
        )
        process.port = port
        return process

    @inlineCallbacks
    def ping(self, process: GatewayProcess) -> Any:
        client = yield connect(process.port)
        self.addCleanup(close_client, client)
        answer = yield client.ask(self.token_file.read_text().strip(), "ping")
        return answer

    @inlineCallbacks
    def test_second_gateway_refused(self) -> Any:
        """
        A second gateway given a running one's TOKEN_FILE exits with status
        2 and one line naming TOKEN_FILE, the path, the holder's pid and
        what to do; the first's token file is untouched and still opens
        its control plane, and it is still removed at the first's stop.
        """
        first = self.spawn()
        yield running(first, self.token_file)
        held = self.token_file.read_bytes()
        second = self.spawn()
        status = yield within(second.ended, 20, "the second gateway to exit")
        self.assertEqual(status, 2, second.stderr + second.stdout[-2000:])
        self.assertEqual(
            second.stderr.decode(),
            f"openclaw: configuration error: TOKEN_FILE (--token-file)={str(self.token_file)!r} (from the command "
            f"line) is in use by another running gateway (pid {first.transport.pid}), which holds its lock {str(self.lock_file)!r}: "
            "give each gateway its own TOKEN_FILE, or stop the other gateway first\n",
        )
        self.assertNotIn(b"SESSION TOKEN", second.stdout)
        self.assertEqual(self.token_file.read_bytes(), held)
        answer = yield self.ping(first)
        self.assertTrue(answer["ok"], answer)
        yield first.stop()
        self.assertFalse(self.token_file.exists())

    @inlineCallbacks
    def test_lock_left_by_a_killed_gateway(self) -> Any:
        """
        A gateway killed with SIGKILL leaves its lock file (and token
        file); the next gateway with that TOKEN_FILE starts all the same.
        """
        killed = self.spawn()
        yield running(killed, self.token_file)
        pid = killed.transport.pid
        killed.transport.signalProcess("KILL")
        status = yield killed.ended
        self.assertEqual(status, -9)
        self.assertEqual(self.lock_file.read_text(), f"{pid}\n")
        left = self.token_file.read_text()
        after = self.spawn()
        yield running(after, self.token_file)
        self.assertNotEqual(self.token_file.read_text(), left)
        self.assertEqual(self.lock_file.read_text(), f"{after.transport.pid}\n")
        answer = yield self.ping(after)
        self.assertTrue(answer["ok"], answer)

    @inlineCallbacks
    def test_clean_stop_removes_the_lock(self) -> Any:
        """
        While it runs the gateway's pid is in C{<TOKEN_FILE>.lock}; a clean
        stop removes the token file and the lock file.
        """
        process = self.spawn()
        yield running(process, self.token_file)
        self.assertEqual(self.lock_file.read_text(), f"{process.transport.pid}\n")
        # Serving: its reactor runs, and twistd handles SIGTERM (a SIGTERM
        # in the instant before, on a loaded host, ended it by the signal's
        # default action, with nothing removed).
        answer = yield self.ping(process)
        self.assertTrue(answer["ok"], answer)
        status = yield process.stop()
        self.assertIn(status, (0, -15))
        self.assertFalse(self.token_file.exists())
        self.assertFalse(self.lock_file.exists())
        self.assertEqual(sorted(path.name for path in self.dir.iterdir()), [])


class PidLockTests(SynchronousTestCase):
    """
    L{PidLock} in one process: each acquisition opens the file anew, and
    C{flock(2)} locks belong to the open file, so a second one is turned
    away as another process would be.
    """

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir(parents=True)
        self.path = self.dir / "token.lock"

    def acquire(self) -> PidLock:
        lock = PidLock.acquire(self.path)
        self.addCleanup(lock.release)
        return lock

    def test_disk_full(self) -> None:
        """
        The process's id cannot be written (a full file system): the lock
        file it made is not left behind, and the refusal says to free
        space, not to remove the lock file (trial s31: an empty lock file
        left, and "remove it if no gateway uses it").
        """
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        with mock.patch("openclaw.files.os.pwrite", side_effect=full):
            with self.assertRaises(OSError):
                PidLock.acquire(self.path)
            self.assertFalse(self.path.exists())
            settings = Settings(token_file=self.dir / "token")
            with self.assertRaises(ConfigError) as caught:
                tap._lock_token_file(settings)
        self.assertIn(f"{str(self.path)!r} cannot be written (No space left on device)", str(caught.exception))
        self.assertIn(
            f"; free space on the file system of {str(self.path)!r}, or point TOKEN_FILE", str(caught.exception)
        )
        self.assertNotIn("remove", str(caught.exception))
        self.assertFalse(self.path.exists())
        # Another's lock file (a stale pid in it) is taken as before.
        self.path.write_text("999999\n")
        self.acquire()

    def test_held(self) -> None:
        self.acquire()
        self.assertEqual(self.path.read_text(), f"{os.getpid()}\n")
        self.assertEqual(self.path.stat().st_mode & 0o777, 0o600)
        held = self.assertRaises(LockHeld, PidLock.acquire, self.path)
        self.assertEqual((held.path, held.pid), (self.path, os.getpid()))

    def test_released(self) -> None:
        lock = self.acquire()
        lock.release()
        self.assertFalse(self.path.exists())
        lock.release()
        self.acquire()

    def test_left_file_naming_a_live_process(self) -> None:
        """
        A lock file naming a process that is alive (pid reuse; pid 1 in a
        container) but holds no lock blocks nothing.
        """
        self.path.write_text("1\n")
        self.acquire()
        self.assertEqual(self.path.read_text(), f"{os.getpid()}\n")

    def test_release_leaves_a_new_file(self) -> None:
        """
        A lock file removed and made again by someone else while the lock
        is held is not removed at release.
        """
        lock = self.acquire()
        self.path.unlink()
        self.path.write_text("")
        lock.release()
        self.assertTrue(self.path.exists())

    def test_not_a_lock_file(self) -> None:
        self.path.write_text("root:x:0:0\n")
        error = self.assertRaises(NotALockFile, PidLock.acquire, self.path)
        self.assertIn("something other than a process id", str(error))
        self.assertEqual(self.path.read_text(), "root:x:0:0\n")

    def test_link_not_followed(self) -> None:
        target = self.dir / "target"
        target.write_text("")
        self.path.symlink_to(target)
        error = self.assertRaises(NotALockFile, PidLock.acquire, self.path)
        self.assertIn("a symbolic link", str(error))
        self.assertEqual(target.read_text(), "")

    def test_fifo(self) -> None:
        os.mkfifo(self.path, 0o600)
        error = self.assertRaises(NotALockFile, PidLock.acquire, self.path)
        self.assertIn("a FIFO", str(error))


class HeldTokenFileTests(SynchronousTestCase):
    """
    The session authority releases the token file's lock at stop, after
    removing the token file.
    """

    def setUp(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        self.path = directory / "token"

    def test_lock_path(self) -> None:
        self.assertEqual(token_file_lock_path(self.path), self.path.parent / "token.lock")

    def test_discard_releases(self) -> None:
        authority = SessionAuthority(SECRET.encode(), 3600, token_file=self.path, token_lock=lock_token_file(self.path))
        authority.issue()
        self.assertRaises(LockHeld, lock_token_file, self.path)
        authority.discard_token_file()
        self.assertFalse(self.path.exists())
        self.assertFalse(token_file_lock_path(self.path).exists())
        lock_token_file(self.path).release()

    def test_discard_releases_when_the_file_is_left(self) -> None:
        authority = SessionAuthority(SECRET.encode(), 3600, token_file=self.path, token_lock=lock_token_file(self.path))
        authority.issue()
        self.path.write_text("someone else's\n")
        authority.discard_token_file()
        self.assertEqual(self.path.read_text(), "someone else's\n")
        self.assertFalse(token_file_lock_path(self.path).exists())


class LockFileAtStartTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_link_at_the_lock_path(self) -> Any:
        """
        A symbolic link at C{<TOKEN_FILE>.lock}: refused with one line
        (exit status 2), the link and its target left as they were.
        """
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        target = directory / "target"
        target.write_text("")
        lock_file = directory / "token.lock"
        lock_file.symlink_to(target)
        process = spawn_gateway(
            self,
            ["--port", str(free_port()), "--interface", "127.0.0.1", "--token-file", str(directory / "token")],
            {**gateway_env(), "STATE_DIR": str(directory)},
        )
        status = yield within(process.ended, 20, "the gateway to exit")
        self.assertEqual(status, 2, process.stderr + process.stdout[-2000:])
        lines = process.stderr.decode().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(
            f"TOKEN_FILE (--token-file)={str(directory / 'token')!r} (from the command line) cannot be locked", lines[0]
        )
        self.assertIn(f"{lock_file} is a symbolic link, not a regular file", lines[0])
        self.assertTrue(lock_file.is_symlink())
        self.assertEqual(target.read_text(), "")
        self.assertFalse((directory / "token").exists())


class LockFileHostTroubleTests(SynchronousTestCase):
    def test_full_disk_is_not_a_configuration_error(self) -> None:
        """
        TOKEN_FILE's lock that cannot be written for a full disk at start
        ends the start with exit status 1 (a unit manager restarts it; its
        RestartPreventExitStatus=2 is for configuration errors), its line
        saying to free space; other refusals stay configuration errors.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        settings = Settings(token_file=directory / "token", state_dir=directory)
        for number in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            with mock.patch("openclaw.files.os.pwrite", side_effect=OSError(number, os.strerror(number))):
                refusal = self.assertRaises(tap.HostTrouble, tap._lock_token_file, settings)
                self.assertRaises(tap.HostTrouble, tap._lock_state_dir, settings)
            self.assertIn(os.strerror(number), str(refusal))
        self.assertIn("check the disk", str(refusal))
        with mock.patch("openclaw.files.os.pwrite", side_effect=OSError(errno.ENOSPC, "full")):
            refusal = self.assertRaises(tap.HostTrouble, tap._lock_token_file, settings)
        self.assertIn("free space on the file system", str(refusal))
        with mock.patch("openclaw.files.os.pwrite", side_effect=PermissionError(errno.EACCES, "denied")):
            refusal = self.assertRaises(ConfigError, tap._lock_token_file, settings)
        self.assertNotIsInstance(refusal, tap.HostTrouble)

    def test_start_ends_with_status_1(self) -> None:
        """
        C{twistd openclaw} whose TOKEN_FILE's lock cannot be written (a full
        disk) ends with one line that is no "configuration error", exit
        status 1, nothing left behind.
        """
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        self.patch(
            os,
            "environ",
            {"JWT_SECRET": "full-disk-secret-full-disk-secret-full-disk", "STATE_DIR": str(directory / "state")},
        )
        options = Options()
        options.parseOptions(
            ["--listen", f"tcp:{free_port()}:interface=127.0.0.1", "--token-file", str(directory / "token")]
        )
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        with mock.patch("openclaw.files.os.pwrite", side_effect=full), self.assertRaises(SystemExit) as raised:
            makeService(options, reactor, stdout=io.StringIO())
        self.assertEqual(raised.exception.code, 1)
        line = stderr.getvalue()
        self.assertTrue(line.startswith("openclaw: TOKEN_FILE (--token-file)="), line)
        self.assertIn("cannot be written (No space left on device); free space on the file system of", line)
        self.assertNotIn("configuration error", line)
        self.assertEqual(line.count("\n"), 1, line)
        self.assertEqual(sorted(path.name for path in directory.iterdir()), [])
