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

from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

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
