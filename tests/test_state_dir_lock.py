"""
One STATE_DIR, one gateway (unless they are one cluster): a running
gateway holds its state directory (C{flock(2)} on C{STATE_DIR/openclaw.lock})
for its lifetime, a second standalone gateway given the same one refuses to
start (it would keep its own view of the consumers' database, serving keys
the other revoked, and write over the other's route), a lock left by a
killed gateway does not block the next start, and a clean stop removes the
lock file.  Real C{twistd -n openclaw} processes.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from openclaw import tap
from openclaw.state import STATE_LOCK
from tests.support import GatewayProcess, free_port, spawn_gateway, within
from tests.test_token_file_lock import gateway_env, running


class OneGatewayPerStateDirTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.state = Path(self.mktemp()).resolve()
        self.state.mkdir(parents=True)
        self.lock_file = self.state / STATE_LOCK

    def spawn(self) -> GatewayProcess:
        tokens = Path(self.mktemp()).resolve()
        tokens.mkdir(parents=True)
        process = spawn_gateway(
            self,
            [
                "--port",
                str(free_port()),
                "--interface",
                "127.0.0.1",
                "--token-file",
                str(tokens / "token"),
                "--state-dir",
                str(self.state),
            ],
            gateway_env(),
        )
        process.token_file = tokens / "token"
        return process

    @inlineCallbacks
    def test_second_gateway_refused(self) -> Any:
        """
        A second gateway given a running one's STATE_DIR exits with status
        2 and one line naming STATE_DIR, the path, the holder's pid and
        what to do, making nothing; a clean stop of the first removes the
        lock file, and then a gateway starts there.
        """
        first = self.spawn()
        yield running(first, first.token_file)
        self.assertEqual(self.lock_file.read_text(), f"{first.transport.pid}\n")
        second = self.spawn()
        status = yield within(second.ended, 20, "the second gateway to exit")
        self.assertEqual(status, 2, second.stderr + second.stdout[-2000:])
        self.assertEqual(
            second.stderr.decode(),
            f"openclaw: configuration error: STATE_DIR (--state-dir)={str(self.state)!r} (from the command "
            f"line) is in use by another running gateway (pid {first.transport.pid}), which holds its lock "
            f"{str(self.lock_file)!r}: give each gateway its own STATE_DIR (or make them one cluster with "
            "REDIS_URL), or stop the other gateway first\n",
        )
        self.assertFalse(second.token_file.exists())
        yield first.stop()
        self.assertFalse(self.lock_file.exists())
        third = self.spawn()
        yield running(third, third.token_file)

    @inlineCallbacks
    def test_lock_left_by_a_killed_gateway(self) -> Any:
        killed = self.spawn()
        yield running(killed, killed.token_file)
        killed.transport.signalProcess("KILL")
        self.assertEqual((yield killed.ended), -9)
        self.assertTrue(self.lock_file.exists())
        after = self.spawn()
        yield running(after, after.token_file)
        self.assertEqual(self.lock_file.read_text(), f"{after.transport.pid}\n")


class ClusterAndStandaloneTests(TestCase):
    """
    A cluster's instances share their STATE_DIR (each holds its lock
    shared), but not with a standalone gateway, in either order: the
    standalone one would keep its own view of the consumers' database.
    """

    timeout = 60

    def setUp(self) -> None:
        from tests.redis_server import RedisServer

        self.redis = RedisServer()
        self.redis.start()
        self.addCleanup(self.redis.cleanup)
        self.state = Path(self.mktemp()).resolve()
        self.state.mkdir(parents=True)

    def spawn(self, cluster: bool) -> GatewayProcess:
        env = gateway_env()
        if cluster:
            env["REDIS_URL"] = self.redis.url
        tokens = Path(self.mktemp()).resolve()
        tokens.mkdir(parents=True)
        process = spawn_gateway(
            self,
            ["--port", str(free_port()), "--interface", "127.0.0.1", "--state-dir", str(self.state)]
            + ["--token-file", str(tokens / "token")],
            env,
        )
        process.token_file = tokens / "token"
        return process

    @inlineCallbacks
    def test_cluster_instances_share_standalone_refused(self) -> Any:
        first, second = self.spawn(cluster=True), self.spawn(cluster=True)
        for process in (first, second):
            yield running(process, process.token_file)
        standalone = self.spawn(cluster=False)
        status = yield within(standalone.ended, 20, "the standalone gateway to exit")
        self.assertEqual(status, 2, standalone.stderr)
        self.assertIn(b"STATE_DIR (--state-dir)=", standalone.stderr)
        self.assertIn(b"is in use by another running gateway", standalone.stderr)

    @inlineCallbacks
    def test_standalone_keeps_a_cluster_out(self) -> Any:
        standalone = self.spawn(cluster=False)
        yield running(standalone, standalone.token_file)
        instance = self.spawn(cluster=True)
        status = yield within(instance.ended, 20, "the cluster instance to exit")
        self.assertEqual(status, 2, instance.stderr)
        self.assertIn(
            f"is in use by a standalone gateway (pid {standalone.transport.pid}) (no REDIS_URL)".encode(),
            instance.stderr,
        )


class SharedLockTests(SynchronousTestCase):
    def test_shared_holders_clear_a_stale_pid(self) -> None:
        """
        A process id left in the lock file by an exclusive holder gone since
        is cleared by a shared holder: a gateway turned away is not told
        that the dead process holds it.
        """
        from openclaw.files import LockHeld, PidLock

        path = Path(self.mktemp())
        path.write_text("12345\n")
        first = PidLock.acquire(path, shared=True)
        second = PidLock.acquire(path, shared=True)
        self.assertEqual(path.read_text(), "")
        with self.assertRaises(LockHeld) as caught:
            PidLock.acquire(path)
        self.assertIsNone(caught.exception.pid)
        first.release()
        second.release()
        # Left for the other holders, and taken alone once none is left.
        self.assertTrue(path.exists())
        PidLock.acquire(path).release()
        self.assertFalse(path.exists())


class LockRefusalAdviceTests(SynchronousTestCase):
    def test_remove_only_what_is_there(self) -> None:
        """
        A lock that cannot be made is not followed by advice to remove a
        lock file that is not there (host trial s21: --state-dir
        /sys/kernel was told to remove /sys/kernel/openclaw.lock).
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        lock = directory / STATE_LOCK
        denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        self.assertEqual(tap._lock_fix(denied, lock), "")
        lock.write_text("")
        self.assertEqual(tap._lock_fix(denied, lock), f"remove {str(lock)!r} if no gateway uses it, or ")
