"""
STATE_DIR and TOKEN_FILE at start-up: an explicit state directory that
does not exist yet is created mode 0700 like the default one; a state
directory that cannot be used, or a TOKEN_FILE in a directory that does
not exist, stops start-up with one line naming the variable, the value
and what to do.  A real C{twistd -n openclaw}.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.support import free_port, spawn_gateway, twistd_path
from tests.test_twistd import SECRET, base_env


class StateDirTests(TestCase):
    timeout = 60

    def directory(self) -> Path:
        path = Path(self.mktemp()).resolve()
        path.mkdir(parents=True)
        return path

    @inlineCallbacks
    def test_missing_state_dir_is_created(self):
        """
        twistd -n openclaw --state-dir DIR, DIR and its parents missing:
        the gateway starts, DIR is made mode 0700 and holds the database.
        """
        state = self.directory() / "a" / "b" / "state"
        process = spawn_gateway(
            self, ["--port", str(free_port()), "--interface", "127.0.0.1", "--state-dir", str(state)], base_env()
        )
        yield process.token
        self.assertTrue(state.is_dir())
        self.assertEqual(stat.S_IMODE(state.stat().st_mode), 0o700)
        self.assertTrue((state / "openclaw.db").exists())
        yield process.stop()

    @inlineCallbacks
    def test_unusable_state_dir_is_one_line(self):
        """
        A file in the way of STATE_DIR (or of one of its parents), or a
        directory the gateway cannot write, stops start-up with one line
        naming STATE_DIR and the value, no traceback.
        """
        run = self.directory()
        blocker = run / "a-file"
        blocker.write_text("not a directory\n")
        cases = [
            (["--state-dir", str(blocker)], {}, f"STATE_DIR={str(blocker)!r} cannot be used (a file is in the way"),
            ([], {"STATE_DIR": str(blocker / "below")}, f"STATE_DIR={str(blocker / 'below')!r} cannot be used"),
        ]
        if os.geteuid() != 0:
            locked = run / "locked"
            locked.mkdir(mode=0o500)
            self.addCleanup(locked.chmod, 0o700)
            cases.append((["--state-dir", str(locked)], {}, f"STATE_DIR={str(locked)!r} cannot be used (not writable)"))
            cases.append((["--state-dir", str(locked / "new")], {}, "cannot be used (Permission denied)"))
        for args, env, expected in cases:
            out, err, code = yield getProcessOutputAndValue(
                twistd_path(),
                ["-n", "--pidfile=", "openclaw", "--port", str(free_port()), *args],
                env=base_env(JWT_SECRET=SECRET, **env),
                path=str(run),
            )
            self.assertNotEqual(code, 0, expected)
            lines = err.decode().strip().splitlines()
            self.assertEqual(len(lines), 1, err)
            self.assertIn("openclaw: configuration error: ", lines[0])
            self.assertIn(expected, lines[0])
            self.assertIn("--state-dir", lines[0])
            self.assertNotIn(b"Traceback", out + err)

    @inlineCallbacks
    def test_unusable_database_file_is_one_line(self):
        """
        STATE_DIR/openclaw.db that cannot be used (a directory or a FIFO in
        the way, a file the gateway may not write) stops start-up with one
        configuration line (status 2) naming STATE_DIR, the file and what
        to do, no traceback.
        """
        run = self.directory()
        cases = []
        in_the_way = run / "directory"
        (in_the_way / "openclaw.db").mkdir(parents=True)
        cases.append((in_the_way, "(a directory is in the way): move it aside"))
        fifo = run / "fifo"
        fifo.mkdir()
        os.mkfifo(fifo / "openclaw.db")
        cases.append((fifo, "(a FIFO is in the way): move it aside"))
        locked = run / "locked"
        locked.mkdir()
        database = locked / "openclaw.db"
        database.touch(mode=0o600)
        if os.geteuid() != 0:
            database.chmod(0o400)
            self.addCleanup(database.chmod, 0o600)
            cases.append((locked, "(Permission denied): give the gateway's user read and write access"))
        elif subprocess.run(["chattr", "+i", str(database)], capture_output=True).returncode == 0:
            # Root writes any mode: an immutable file refuses it too.
            self.addCleanup(subprocess.run, ["chattr", "-i", str(database)], check=True)
            cases.append((locked, "(Operation not permitted): give the gateway's user read and write access"))
        for state, expected in cases:
            out, err, code = yield getProcessOutputAndValue(
                twistd_path(),
                ["-n", "--pidfile=", "openclaw", "--port", str(free_port()), "--state-dir", str(state)],
                env=base_env(JWT_SECRET=SECRET),
                path=str(run),
            )
            self.assertEqual(code, 2, err)
            lines = err.decode().strip().splitlines()
            self.assertEqual(len(lines), 1, err)
            self.assertIn("openclaw: configuration error: ", lines[0])
            self.assertIn(f"STATE_DIR={str(state)!r}: the consumers' database {str(state / 'openclaw.db')!r}", lines[0])
            self.assertIn(expected, lines[0])
            self.assertIn("--state-dir", lines[0])
            self.assertNotIn(b"Traceback", out + err)

    @inlineCallbacks
    def test_token_file_directory_missing_is_one_line(self):
        """
        TOKEN_FILE in a directory that does not exist: one line naming
        TOKEN_FILE, the value and what to do.
        """
        run = self.directory()
        token_file = run / "missing" / "token"
        out, err, code = yield getProcessOutputAndValue(
            twistd_path(),
            ["-n", "--pidfile=", "openclaw", "--port", str(free_port()), "--token-file", str(token_file)],
            env=base_env(JWT_SECRET=SECRET),
            path=str(run),
        )
        self.assertNotEqual(code, 0)
        lines = err.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn(f"TOKEN_FILE={str(token_file)!r}", lines[0])
        self.assertIn("create it", lines[0])
        self.assertNotIn(b"Traceback", out + err)
