"""
A careless or hostile host: what the gateway does with the files,
signals and peers a host gives it.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from openclaw.files import NotARegularFile, StickyHeld, held_by_sticky_directory, named_uid, write_atomically
from openclaw.listeners import tls_file_problem
from openclaw.metrics import OUTCOMES
from openclaw.routing import MAX_MODEL_CHARS
from openclaw.session import SessionAuthority, UnsafeTokenFile, check_token_file
from openclaw.settings import ConfigError, load_settings
from openclaw.signals import handles_hangup
from openclaw.tls import trust_root_from_file
from tests.support import (
    GatewayProcess,
    capture_log_events,
    close_client,
    connect,
    exchange,
    free_port,
    make_ca,
    open_client,
    spawn_gateway,
    start_gateway,
    start_metrics_listener,
    twistd_path,
)
from tests.test_api_exhaustion import trickle
from tests.test_cluster import ClusterCase, printed

SECRET = "hostile-host-secret-hostile-host-secret-42"
BYTES_SECRET = SECRET.encode()
UNRELATED = b"root:x:0:0:root:/root:/bin/bash\n"
#: Another user (nobody), for what only root can make.
NOBODY = 65534


def gateway_env(**extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "JWT_SECRET": SECRET,
        **extra,
    }


class TokenFileAtStartTests(TestCase):
    """
    C{twistd -n openclaw --token-file PATH} refuses, with one line and
    before listening, a path holding anything it did not write, and leaves
    it as it was.
    """

    timeout = 60

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)

    @inlineCallbacks
    def refused(self, path: Path) -> Any:
        port = free_port()
        out, err, code = yield getProcessOutputAndValue(
            twistd_path(),
            [
                "-n",
                "--pidfile=",
                "openclaw",
                "--port",
                str(port),
                "--api-port",
                str(free_port()),
                "--interface",
                "127.0.0.1",
                "--token-file",
                str(path),
            ],
            env=gateway_env(STATE_DIR=str(self.dir)),
            path=str(self.dir),
        )
        self.assertEqual(code, 2, (out, err))
        lines = err.decode().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn(f"TOKEN_FILE (--token-file)={str(path)!r} (from the command line) is refused", lines[0])
        self.assertIn("point TOKEN_FILE at a new path", lines[0])
        self.assertNotIn(b"Traceback", out + err)
        return lines[0]

    @inlineCallbacks
    def test_fifo(self) -> Any:
        path = self.dir / "fifo"
        os.mkfifo(path, 0o600)
        line = yield self.refused(path)
        self.assertIn("a FIFO", line)
        self.assertTrue(stat.S_ISFIFO(os.lstat(path).st_mode))

    @inlineCallbacks
    def test_symlink(self) -> Any:
        target = self.dir / "target"
        target.write_bytes(UNRELATED)
        path = self.dir / "link"
        path.symlink_to(target)
        line = yield self.refused(path)
        self.assertIn("a symbolic link", line)
        self.assertTrue(path.is_symlink())
        self.assertEqual(target.read_bytes(), UNRELATED)

    @inlineCallbacks
    def test_directory(self) -> Any:
        path = self.dir / "token"
        path.mkdir()
        line = yield self.refused(path)
        self.assertIn("a directory", line)
        self.assertTrue(path.is_dir())

    @inlineCallbacks
    def test_unrelated_data(self) -> Any:
        path = self.dir / "passwd"
        path.write_bytes(UNRELATED)
        path.chmod(0o644)
        line = yield self.refused(path)
        self.assertIn("something other than a session token", line)
        self.assertEqual(path.read_bytes(), UNRELATED)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o644)

    @inlineCallbacks
    def test_socket(self) -> Any:
        # A socket's path must be short: a directory of its own in /tmp.
        short = Path(tempfile.mkdtemp(prefix="oc-"))
        self.addCleanup(shutil.rmtree, short)
        path = short / "s"
        listening = socket.socket(socket.AF_UNIX)
        self.addCleanup(listening.close)
        listening.bind(str(path))
        line = yield self.refused(path)
        self.assertIn("a socket", line)
        self.assertTrue(stat.S_ISSOCK(os.lstat(path).st_mode))

    @inlineCallbacks
    def test_device(self) -> Any:
        """
        A character device (made here, in a temporary directory: a null
        device's numbers) is neither overwritten nor removed.
        """
        if os.geteuid() != 0:
            raise self.skipTest("making a device node needs root")
        path = self.dir / "null"
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        line = yield self.refused(path)
        self.assertIn("a character device", line)
        self.assertTrue(stat.S_ISCHR(os.lstat(path).st_mode))


class TokenFileCheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir(parents=True)
        self.path = self.dir / "token"

    def test_accepted(self) -> None:
        """
        Nothing there, an empty file, or an earlier run's token (with or
        without its newline, or with blanks around it as a file written by
        hand has, which openclawctl reads) may be replaced.
        """
        check_token_file(self.path)
        self.path.write_bytes(b"")
        check_token_file(self.path)
        token = SessionAuthority(BYTES_SECRET, 60).mint().token
        for content in (token + "\n", token, f" {token}\r\n", token + "\n\n"):
            self.path.write_text(content)
            check_token_file(self.path)

    def test_refused(self) -> None:
        token = SessionAuthority(BYTES_SECRET, 60).mint().token
        for content in (
            b"\n",
            b"a.b\n",
            token.encode() + b"\n#\n",
            (token + "\n" + token + "\n").encode(),
            b"x" * 70000,
        ):
            self.path.write_bytes(content)
            self.assertRaises(UnsafeTokenFile, check_token_file, self.path)


class TokenFileModeTests(SynchronousTestCase):
    def test_mode_whatever_the_umask(self):
        """
        A file written whole (the token file, the state file) has mode
        0600 under any umask: twistd's --umask 0777 made it 0000 (host
        trial s21), unreadable even by its owner.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        for umask in (0o777, 0o000):
            previous = os.umask(umask)
            try:
                write_atomically(directory / "token", "x\n")
            finally:
                os.umask(previous)
            self.assertEqual(stat.S_IMODE((directory / "token").stat().st_mode), 0o600, oct(umask))


class TokenFileUnwritableTests(TestCase):
    timeout = 20

    @inlineCallbacks
    def test_rotation_refused_cleanly(self):
        """
        A rotation whose token file cannot be written (its directory
        gone, a file in its place) is refused with what to do, the current
        token still valid; not an internal error with a traceback.
        """
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        run = directory / "run"
        run.mkdir()
        gateway = start_gateway(self, token_file=run / "token")
        client = yield open_client(self, gateway.port)
        (run / "token").unlink()
        run.rmdir()
        run.write_text("not a directory")  # even root cannot write there now
        answer = yield client.command(gateway.token, "rotate_token")
        self.assertFalse(answer["ok"])
        self.assertIn("nothing was rotated", answer["error"])
        self.assertIn("the current token stays valid", answer["error"])
        self.assertEqual(self.flushLoggedErrors(), [])
        answer = yield client.command(gateway.token, "ping")
        self.assertTrue(answer["ok"], answer)


class StickyHeldTests(SynchronousTestCase):
    """
    L{held_by_sticky_directory}: what another user put in a sticky
    directory first is kept from this one (unlink(2), rename(2): EPERM).
    """

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir(parents=True)
        self.path = self.dir / "token"
        self.path.write_bytes(b"")
        #: A user who owns neither the file nor the directory.
        self.other = os.geteuid() + 4242

    def test_held_in_a_sticky_directory(self) -> None:
        self.dir.chmod(0o1777)
        held = held_by_sticky_directory(self.path, self.other)
        self.assertEqual(held, StickyHeld(self.path.stat().st_uid, self.dir, 0o1777))

    def test_not_held(self) -> None:
        """
        Not sticky; this user's own file or directory; root; nothing there.
        """
        self.dir.chmod(0o777)
        self.assertIsNone(held_by_sticky_directory(self.path, self.other))
        self.dir.chmod(0o1777)
        self.assertIsNone(held_by_sticky_directory(self.path, os.geteuid()))
        self.assertIsNone(held_by_sticky_directory(self.path, 0))
        self.assertIsNone(held_by_sticky_directory(self.dir / "missing", self.other))


def _gateway_args(token_file: Path, state: Path) -> list[str]:
    """
    twistd's arguments for C{twistd -n openclaw} on free loopback ports,
    with C{token_file} and C{state} as its TOKEN_FILE and STATE_DIR.
    """
    return [
        "-n",
        "--pidfile=",
        "openclaw",
        "--port",
        str(free_port()),
        "--api-port",
        str(free_port()),
        "--interface",
        "127.0.0.1",
        "--token-file",
        str(token_file),
        "--state-dir",
        str(state),
    ]


def _sticky_directory(base: Path) -> Path:
    """
    C{base}/sticky, a world-writable sticky directory (as /tmp is).
    """
    sticky = base / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    return sticky


def _planted(path: Path) -> Path:
    """
    An empty file at C{path} that another user (uid 4242) planted there,
    writable by all.
    """
    path.write_bytes(b"")
    path.chmod(0o666)
    os.chown(path, 4242, 4242)
    return path


def _gateway_as_nobody(setpriv: str, base: Path, token_file: Path, state: Path, *more: str) -> Any:
    """
    C{twistd -n openclaw} run as L{NOBODY} with C{token_file} and
    C{state} as its TOKEN_FILE and STATE_DIR, and C{more} arguments after
    openclaw's own, in C{base}; fires with its output, errors and exit
    status.
    """
    return getProcessOutputAndValue(
        setpriv,
        [
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            twistd_path(),
            *_gateway_args(token_file, state),
            *more,
        ],
        env=gateway_env(HOME=str(base)),
        path=str(base),
    )


def _nobody_directories(testcase: Any, prefix: str) -> tuple[Path, Path]:
    """
    A directory others may enter (removed when the test ends), and in it
    a state directory of L{NOBODY}'s own, mode 0700.
    """
    base = Path(tempfile.mkdtemp(prefix=prefix))
    testcase.addCleanup(shutil.rmtree, base, True)
    base.chmod(0o755)
    state = base / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    return base, state


def _as_nobody() -> str:
    """
    setpriv, once it is known to run this Python with openclaw as uid
    L{NOBODY}; skips the test otherwise (not root, no util-linux).
    """
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        raise SkipTest("running a gateway as another user needs root and setpriv (util-linux)")
    probe = subprocess.run(
        [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c", "import openclaw"],
        capture_output=True,
        timeout=30,
        cwd="/",
    )
    if probe.returncode != 0:
        raise SkipTest(f"uid {NOBODY} cannot run this Python with openclaw installed (its install is not readable)")
    return setpriv


class EnvFileOfAnotherUserTests(TestCase):
    """
    Operator trial s41: an env file root made (mode 0600, as contrib's
    comments say) given with --env-file to a gateway run as its own user:
    one line saying that user may not read it and what to do, not a bare
    "[Errno 13] Permission denied".
    """

    timeout = 60

    @inlineCallbacks
    def test_unreadable_env_file(self) -> Any:
        setpriv = _as_nobody()
        base, state = _nobody_directories(self, "oc-envfile-")
        env_file = base / "openclaw.env"
        env_file.write_text("LOG_LEVEL=info\n")
        env_file.chmod(0o600)
        out, err, code = yield _gateway_as_nobody(setpriv, base, state / "token", state, "--env-file", str(env_file))
        self.assertEqual(code, 2, (out, err))
        self.assertNotIn(b"Traceback", out + err)
        (line,) = err.decode().splitlines()
        self.assertIn(f"cannot read env file {str(env_file)!r} (Permission denied): the gateway's user", line)
        self.assertIn("may not read it; make it that user's", line)


class TokenFilePlantedTests(TestCase):
    """
    Trial s25 F2: a gateway running as one user (here L{NOBODY}) given a
    C{TOKEN_FILE} in a sticky directory (C{/tmp}-like, mode 1777) where
    another user put an empty file of their own first.  It exited 1 with a
    traceback (TokenFileUnwritable, EPERM) once listening, its lock file
    left behind; it refuses in one line, before anything listens or is
    made, naming that user and what to do.
    """

    timeout = 60

    @inlineCallbacks
    def test_planted_empty_token_file(self) -> Any:
        setpriv = _as_nobody()
        base, state = _nobody_directories(self, "oc-planted-")
        sticky = _sticky_directory(base)
        token_file = _planted(sticky / "token")
        out, err, code = yield _gateway_as_nobody(setpriv, base, token_file, state)
        self.assertEqual(code, 2, (out, err))
        self.assertNotIn(b"Traceback", out + err)
        self.assertNotIn(b"starting on", out)
        (line,) = err.decode().splitlines()
        self.assertEqual(
            line,
            f"openclaw: configuration error: TOKEN_FILE (--token-file)={str(token_file)!r} (from the command line) "
            f"is refused: it belongs to {named_uid(4242)}, not the gateway's user, {named_uid(NOBODY)}, in the "
            "sticky directory "
            f"{str(sticky)!r} (mode 1777), where only its owner, the directory's or root may replace or remove it; "
            f"have that user or root remove {str(token_file)!r} (or chown {NOBODY} it), or point TOKEN_FILE at a "
            "new path in a directory of the gateway's own (such as /run/openclaw/token)",
        )
        self.assertEqual(sorted(p.name for p in sticky.iterdir()), ["token"])
        self.assertEqual(os.lstat(token_file).st_uid, 4242)

    @inlineCallbacks
    def test_planted_lock_file(self) -> Any:
        """
        Another user's C{TOKEN_FILE.lock} there first: refused the same
        way (the gateway could not remove it at stop, and its owner could
        hold the lock).
        """
        setpriv = _as_nobody()
        base = Path(tempfile.mkdtemp(prefix="oc-planted-"))
        self.addCleanup(shutil.rmtree, base, True)
        base.chmod(0o755)
        sticky = _sticky_directory(base)
        lock = _planted(sticky / "token.lock")
        out, err, code = yield _gateway_as_nobody(setpriv, base, sticky / "token", sticky / "state")
        self.assertEqual(code, 2, (out, err))
        (line,) = err.decode().splitlines()
        self.assertIn(f"is refused: its lock file {str(lock)!r} belongs to uid 4242", line)
        self.assertEqual(sorted(p.name for p in sticky.iterdir()), ["token.lock"])


class TokenFileUnwritableAtStartTests(TestCase):
    """
    A first token that cannot be written for a cause no start-up check
    foresees (here a file size limit, RLIMIT_FSIZE: EFBIG) stops the
    gateway with one critical line and status 1, its lock files removed;
    it was a traceback (trial s25 F2).
    """

    timeout = 60

    def fsize_limited(self, base: Path) -> Path:
        """
        twistd, run with a file size limit (RLIMIT_FSIZE) of 64 bytes.
        """
        wrapper = base / "twistd-fsize"
        wrapper.write_text(
            f"#!{sys.executable}\n"
            "import os, resource, sys\n"
            "hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]\n"
            # Room for a lock file's pid, not for a token.
            "resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))\n"
            # No bytecode written under the limit: CPython would leave it cut
            # short ("marshal data too short" for the next process).
            "os.environ['PYTHONDONTWRITEBYTECODE'] = '1'\n"
            f"os.execv({twistd_path()!r}, [{twistd_path()!r}, *sys.argv[1:]])\n"
        )
        wrapper.chmod(0o755)
        return wrapper

    @inlineCallbacks
    def test_first_token_unwritable(self) -> Any:
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        wrapper = self.fsize_limited(base)
        state = base / "state"
        state.mkdir()
        token_file = base / "token"
        out, err, code = yield getProcessOutputAndValue(
            str(wrapper),
            _gateway_args(token_file, state),
            env=gateway_env(),
            path=str(base),
        )
        self.assertEqual(code, 1, (out, err))
        self.assertNotIn(b"Traceback", out + err)
        critical = [line for line in out.decode().splitlines() if "#critical]" in line]
        self.assertEqual(len(critical), 1, out)
        self.assertIn(
            f"the session token could not be written to TOKEN_FILE {token_file} (File too large), so the gateway "
            "stops: make it writable by the gateway's user",
            critical[0],
        )
        self.assertFalse(os.path.lexists(token_file))
        self.assertFalse(os.path.lexists(f"{token_file}.lock"))
        self.assertFalse(os.path.lexists(state / "openclaw.lock"))
        self.assertFalse(os.path.lexists(state / "openclaw.db"))
        self.assertEqual([p.name for p in base.iterdir() if p.name.startswith(".token")], [])

    @inlineCallbacks
    def test_daemon_first_token_unwritable(self) -> Any:
        """
        The same refusal of a daemon (twistd without C{-n}) reaches the
        process that started it: exit status 1 and twistd's "An error has
        occurred" with the refusal's start, where it exited 0 with nothing
        said (trial s31), the refusal's line in the log only.
        """
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        state = base / "state"
        state.mkdir()
        token_file, pidfile = base / "token", base / "gw.pid"
        args = _gateway_args(token_file, state)
        args = ["--pidfile", str(pidfile), "--logfile", "/dev/null", *args[args.index("openclaw") :]]
        out, err, code = yield getProcessOutputAndValue(
            "timeout", ["20", str(self.fsize_limited(base)), *args], env=gateway_env(), path=str(base)
        )
        self.assertEqual(code, 1, (out, err))
        self.assertIn(b"An error has occurred: ", err)
        self.assertIn(b"StartRefused: openclaw: TOKEN_FILE cannot be written (File too large)", err)
        self.assertNotIn(b"Traceback", out + err)
        self.assertFalse(pidfile.exists())
        self.assertFalse(os.path.lexists(token_file))
        self.assertFalse(os.path.lexists(f"{token_file}.lock"))
        # Nor the consumers' database made empty before twistd daemonized.
        self.assertEqual(sorted(p.name for p in state.iterdir()), [])


class ClosedStdoutTests(TestCase):
    timeout = 20

    @inlineCallbacks
    def test_rotation_with_stdout_gone(self):
        """
        A rotation whose banner cannot be printed (standard output a
        closed pipe) is answered with the new token, in force, and logged;
        not an internal error, and not "nothing was rotated".
        """
        events = capture_log_events(self)
        gateway = start_gateway(self)

        def broken(data: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        gateway.stdout.write = broken  # type: ignore[method-assign]
        client = yield open_client(self, gateway.port)
        answer = yield client.command(gateway.token, "rotate_token")
        self.assertTrue(answer["ok"], answer)
        new = answer["result"]["token"]
        answer = yield client.command(new, "ping")
        self.assertTrue(answer["ok"], answer)
        self.assertEqual(self.flushLoggedErrors(), [])
        (warned,) = [e for e in events if "could not be printed" in e.get("log_format", "")]
        self.assertIn("Broken pipe", formatEvent(warned))


class TokenFileLaterTests(SynchronousTestCase):
    """
    At rotation and at stop the token file is replaced or removed only
    while it still holds this gateway's token.
    """

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir(parents=True)
        self.path = self.dir / "token"
        self.authority = SessionAuthority(BYTES_SECRET, 3600, token_file=self.path)
        self.events = capture_log_events(self)
        self.first = self.authority.issue()

    def logged(self) -> str:
        return "\n".join(formatEvent(event) for event in self.events)

    def test_stop_leaves_another_gateways_token(self) -> None:
        other = SessionAuthority(b"o" * 32, 3600).mint().token + "\n"
        self.path.write_text(other)
        self.authority.discard_token_file()
        self.assertEqual(self.path.read_text(), other)
        self.assertIn("no longer holds this gateway's session token", self.logged())

    def test_stop_leaves_data(self) -> None:
        self.path.write_bytes(UNRELATED)
        self.authority.discard_token_file()
        self.assertEqual(self.path.read_bytes(), UNRELATED)

    def test_stop_leaves_a_link(self) -> None:
        target = self.dir / "target"
        target.write_text(self.first.token + "\n")
        self.path.unlink()
        self.path.symlink_to(target)
        self.authority.discard_token_file()
        self.assertTrue(self.path.is_symlink())
        self.assertIn("a symbolic link", self.logged())

    def test_stop_removes_its_own(self) -> None:
        self.authority.discard_token_file()
        self.assertFalse(self.path.exists())

    def test_stop_in_a_cluster_leaves_the_clusters_token(self) -> None:
        authority = SessionAuthority(BYTES_SECRET, 3600, token_file=self.path, shared=True)
        authority.adopt(self.first)
        authority.discard_token_file()
        self.assertEqual(self.path.read_text(), self.first.token + "\n")
        self.assertIn("was left in place: the token is the cluster's", self.logged())

    def test_rotation_leaves_another_file(self) -> None:
        self.path.write_bytes(UNRELATED)
        rotated = self.authority.issue()
        self.assertEqual(self.path.read_bytes(), UNRELATED)
        self.assertEqual(self.authority.current, rotated)
        self.assertIn("was left as it is", self.logged())

    @contextmanager
    def unreadable(self) -> Iterator[None]:
        """
        The token file, within the block, is one the gateway may not read:
        mode 0000 for a user other than root; for root, whom modes do not
        stop, the block runs as uid and gid 65534, as a gateway under
        another user does (the file stays root's, mode 0600, as root's
        openclawctl used to leave it).
        """
        if os.geteuid() != 0:
            self.path.chmod(0)
            try:
                yield
            finally:
                self.path.chmod(0o600)
            return
        # A directory that user may search (the test's own is under a
        # 0700 one), with the token file in it.
        searchable = Path(tempfile.mkdtemp(prefix="oc-token-"))
        self.addCleanup(shutil.rmtree, searchable, True)
        searchable.chmod(0o755)
        moved = searchable / self.path.name
        shutil.move(self.path, moved)
        self.path = moved
        self.authority = SessionAuthority(BYTES_SECRET, 3600, token_file=moved)
        self.authority.adopt(self.first)
        os.setegid(NOBODY)
        os.seteuid(NOBODY)
        try:
            yield
        finally:
            os.seteuid(0)
            os.setegid(0)

    def test_stop_says_when_it_cannot_remove(self) -> None:
        """
        A stop whose token file cannot be removed (its directory not
        writable by the gateway's user) says so, where it left it without
        a word (re-attack s18 F3).
        """
        searchable = Path(tempfile.mkdtemp(prefix="oc-token-"))
        self.addCleanup(shutil.rmtree, searchable, True)
        moved = searchable / self.path.name
        shutil.move(self.path, moved)
        self.authority = SessionAuthority(BYTES_SECRET, 3600, token_file=moved)
        self.authority.adopt(self.first)
        # Readable by that user (the gateway's), in a directory it may not write.
        moved.chmod(0o644)
        searchable.chmod(0o555)
        self.addCleanup(searchable.chmod, 0o755)
        if os.geteuid() == 0:
            # Root is not stopped by modes: the stop runs as another user.
            os.setegid(NOBODY)
            os.seteuid(NOBODY)
        try:
            self.authority.discard_token_file()
        finally:
            if os.geteuid() != os.getuid():
                os.seteuid(0)
                os.setegid(0)
        self.assertTrue(moved.exists())
        self.assertIn(f"TOKEN_FILE {moved} could not be removed (Permission denied)", self.logged())

    def test_rotation_leaves_an_unreadable_file(self) -> None:
        """
        A token file the gateway may not read (trial s18 F1: root's
        openclawctl left it root's, mode 0600, under a gateway running as
        another user) may hold anything: the rotation leaves it, logs why
        and what to do, and goes on (the client gets the new token), where
        it failed with "internal error" and a traceback.
        """
        before = self.path.read_bytes()
        with self.unreadable():
            rotated = self.authority.issue()
        self.assertEqual(self.authority.current, rotated)
        self.assertEqual(self.path.read_bytes(), before)
        user = NOBODY if os.geteuid() == 0 else os.geteuid()
        self.assertIn(
            f"TOKEN_FILE {self.path} was left as it is (this gateway's user, uid {user} ({pwd.getpwuid(user).pw_name}), "
            "may not read it "
            f"(Permission denied), so it may hold anything: give it back to that user (chown {user}) or remove "
            f"it); session token {rotated.jti} is not in it",
            self.logged(),
        )

    def test_stop_leaves_an_unreadable_file(self) -> None:
        before = self.path.read_bytes()
        with self.unreadable():
            self.authority.discard_token_file()
        self.assertEqual(self.path.read_bytes(), before)
        self.assertIn(f"TOKEN_FILE {self.path} was left in place: this gateway's user, uid ", self.logged())
        self.assertIn("may not read it (Permission denied)", self.logged())

    def test_rotation_replaces_its_own(self) -> None:
        rotated = self.authority.issue()
        self.assertEqual(self.path.read_text(), rotated.token + "\n")
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)

    def test_rotation_writes_a_missing_file(self) -> None:
        self.path.unlink()
        rotated = self.authority.issue()
        self.assertEqual(self.path.read_text(), rotated.token + "\n")


def _masked_text_frame(payload: bytes) -> bytes:
    """
    One client-to-server text frame (RFC 6455 section 5.2), masked.
    """
    mask = os.urandom(4)
    length = len(payload)
    size = bytes([length]) if length < 126 else bytes([126]) + length.to_bytes(2, "big")
    head = bytes([0x81, 0x80 | size[0]]) + size[1:]
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def upgrade_request(port: int) -> bytes:
    """
    A WebSocket opening handshake (RFC 6455 section 4.1) for the control
    port C{port}, with a fresh key.
    """
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def _open_raw(port: int) -> socket.socket:
    """
    A control connection by hand, with a tiny receive buffer (blocking:
    run it in a thread); the opening handshake's answer is read.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(upgrade_request(port))
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(1)
        if not chunk:
            break
        response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


class TokenFileInAClusterTests(ClusterCase):
    """
    Instances of a cluster sharing one C{TOKEN_FILE}: the first to stop
    leaves it, holding the token the others still accept.
    """

    def spawn_with_token_file(self, path: Path) -> Any:
        port = free_port()
        process = spawn_gateway(
            self,
            ["--port", str(port), "--interface", "127.0.0.1"],
            {**self.env(), "TOKEN_FILE": str(path)},
        )
        process.port = port
        return process

    @inlineCallbacks
    def test_first_to_stop_leaves_the_file(self) -> Any:
        path = Path(self.mktemp()).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        # With a token file the banner names the file, not the token.
        a = self.spawn_with_token_file(path)
        yield printed(a, b"(never logged)")
        token = path.read_text().strip()
        b = self.spawn_with_token_file(path)
        yield printed(b, b"(never logged)")
        self.assertEqual(path.read_text().strip(), token)
        status = yield a.stop()
        self.assertIn(status, (0, -15))
        self.assertIn(b"was left in place: the token is the cluster's", a.stdout)
        self.assertEqual(path.read_text(), token + "\n")
        client = yield connect(b.port)
        self.addCleanup(close_client, client)
        answer = yield client.command(path.read_text().strip(), "ping")
        self.assertTrue(answer["ok"], answer)


class BackpressureTests(TestCase):
    """
    A control client that sends commands but never reads the answers
    stops being read once the gateway cannot send it more: its own sends
    block, the commands answered stay bounded, and others are served.
    """

    timeout = 120

    @inlineCallbacks
    def test_client_that_never_reads(self) -> Any:
        gateway = start_gateway(self)
        sock = yield deferToThread(_open_raw, gateway.port)
        self.addCleanup(sock.close)
        sock.setblocking(False)
        message = _masked_text_frame(json.dumps({"token": gateway.token, "cmd": "status"}).encode())
        registry = gateway.service.metrics.registry

        def answered() -> int:
            return sum(
                int(
                    registry.get_sample_value("openclaw_control_commands_total", {"cmd": "status", "outcome": outcome})
                    or 0
                )
                for outcome in OUTCOMES
            )

        batch = message * 100
        pending = b""
        sent = blocked_for = 0
        # Without backpressure the gateway reads (and answers into its own
        # memory) all this without the client's sends ever blocking.
        limit = 100_000
        while blocked_for < 20 and sent < limit * len(message):
            if not pending:
                pending = batch
            try:
                written = sock.send(pending)
            except BlockingIOError:
                blocked_for += 1
                yield deferLater(reactor, 0.05, lambda: None)
                continue
            blocked_for = 0
            pending = pending[written:]
            sent += written
            if sent % (len(batch) * 20) < written:
                yield deferLater(reactor, 0, lambda: None)
        self.assertLess(sent, limit * len(message), "the client's sends never blocked")
        before = answered()
        self.assertLess(before, limit)
        yield deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(answered(), before)
        # Another operator is still served at once.
        other = yield connect(gateway.port)
        self.addCleanup(close_client, other)
        answer = yield other.command(gateway.token, "ping")
        self.assertTrue(answer["ok"], answer)
        # Reading again lets the gateway read the rest and answer it.
        received = 0
        deadline = 0
        while answered() == before and deadline < 100:
            try:
                received += len(sock.recv(65536))
            except BlockingIOError:
                deadline += 1
                yield deferLater(reactor, 0.05, lambda: None)
        self.assertGreater(answered(), before)


class SignalTests(TestCase):
    """
    SIGHUP, and SIGUSR1 without a log file, do not end C{twistd -n
    openclaw}: each is noted in the log, and SIGTERM still stops it
    cleanly.
    """

    timeout = 60

    @inlineCallbacks
    def test_hup_and_usr1_are_noted(self) -> Any:
        state = Path(self.mktemp()).resolve()
        state.mkdir(parents=True)
        port = free_port()
        process = spawn_gateway(
            self, ["--port", str(port), "--interface", "127.0.0.1"], gateway_env(STATE_DIR=str(state))
        )
        token = yield process.token
        client = yield connect(port)
        self.addCleanup(close_client, client)
        for name, said in (
            (signal.SIGHUP, b"restart the gateway to apply changes"),
            (signal.SIGUSR1, b"no log file to reopen"),
        ):
            process.transport.signalProcess(int(name))
            for _ in range(100):
                if said in process.stdout or process.ended.called:
                    break
                yield deferLater(reactor, 0.05, lambda: None)
            self.assertIn(said, process.stdout)
            self.assertFalse(process.ended.called, process.stdout[-2000:])
            answer = yield client.command(token, "ping")
            self.assertTrue(answer["ok"], answer)
        self.assertIn(b"received SIGHUP: configuration is read once at start-up", process.stdout)
        self.assertIn(b"received SIGUSR1: no log file to reopen (logging to stdout)", process.stdout)
        process.transport.signalProcess("TERM")
        code, _ = yield client.closed
        self.assertEqual(code, 1001)
        status = yield process.ended
        self.assertIn(status, (0, -15))


class HangupOnATerminalTests(TestCase):
    """
    A gateway started with C{-n} on a terminal keeps SIGHUP's default
    action: closing the terminal ends it instead of leaving it logging to
    a dead terminal.  (Without a terminal, L{SignalTests} shows SIGHUP
    noted and ignored.)
    """

    timeout = 60

    @inlineCallbacks
    def test_hup_ends_a_gateway_on_a_terminal(self) -> Any:
        state = Path(self.mktemp()).resolve()
        state.mkdir(parents=True)
        cwd = Path(self.mktemp()).resolve()
        cwd.mkdir(parents=True)
        port = free_port()
        process = GatewayProcess()
        twistd = twistd_path()
        # usePTY: standard input, output and error are a new terminal, the
        # gateway's controlling one (a session of its own, as a shell gives).
        reactor.spawnProcess(
            process,
            twistd,
            [twistd, "-n", "--pidfile=", "openclaw", "--port", str(port), "--interface", "127.0.0.1"]
            + ["--api-port", str(free_port())],
            env=gateway_env(STATE_DIR=str(state)),
            path=str(cwd),
            usePTY=True,
        )
        self.addCleanup(process.stop)
        yield process.token
        process.transport.signalProcess("HUP")
        for _ in range(100):
            if process.ended.called:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(process.ended.called, process.stdout[-2000:])
        status = yield process.ended
        self.assertEqual(status, -signal.SIGHUP)
        self.assertNotIn(b"received SIGHUP", process.stdout)


class HandlesHangupTests(SynchronousTestCase):
    """
    L{handles_hangup}: SIGHUP is taken by a daemon and by a foreground
    gateway without a terminal on standard input, not by one on a terminal.
    """

    def test_terminal_in_the_foreground(self) -> None:
        controller, terminal = os.openpty()
        self.addCleanup(os.close, controller)
        with os.fdopen(terminal, "rb", buffering=0) as stdin:
            self.assertFalse(handles_hangup(False, stdin))
            self.assertTrue(handles_hangup(True, stdin))

    def test_no_terminal_in_the_foreground(self) -> None:
        reading, writing = os.pipe()
        self.addCleanup(os.close, writing)
        with os.fdopen(reading, "rb", buffering=0) as stdin:
            self.assertTrue(handles_hangup(False, stdin))
        self.assertTrue(handles_hangup(False, stdin))  # closed
        self.assertTrue(handles_hangup(False, None))


class SecretFileTests(TestCase):
    """
    C{JWT_SECRET_FILE} naming a FIFO, a device or a huge file stops
    C{twistd -n openclaw} at once with one line, not a hang or endless
    read, and advises no chmod of it.
    """

    timeout = 60

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)

    @inlineCallbacks
    def refused(self, path: Path) -> Any:
        env = gateway_env(STATE_DIR=str(self.dir), JWT_SECRET_FILE=str(path))
        del env["JWT_SECRET"]
        out, err, code = yield getProcessOutputAndValue(
            twistd_path(),
            ["-n", "--pidfile=", "openclaw", "--port", str(free_port()), "--api-port", str(free_port())],
            env=env,
            path=str(self.dir),
        )
        self.assertEqual(code, 2, (out, err))
        lines = err.decode().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn(f"JWT_SECRET_FILE={str(path)!r}", lines[0])
        self.assertIn("point JWT_SECRET_FILE at a regular file", lines[0])
        self.assertNotIn("chmod", lines[0])
        return lines[0]

    @inlineCallbacks
    def test_fifo(self) -> Any:
        path = self.dir / "fifo"
        os.mkfifo(path, 0o666)
        line = yield self.refused(path)
        self.assertIn("a FIFO", line)

    @inlineCallbacks
    def test_endless_device(self) -> Any:
        """
        A device that never ends (a zero device's numbers, made here in a
        temporary directory; a FIFO where this is not root).
        """
        path = self.dir / "zero"
        if os.geteuid() == 0:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 5))
        else:
            os.mkfifo(path, 0o666)
        line = yield self.refused(path)
        self.assertIn("not a regular file", line)

    @inlineCallbacks
    def test_too_large(self) -> Any:
        path = self.dir / "huge"
        path.write_bytes(b"s" * (65 * 1024))
        path.chmod(0o600)
        line = yield self.refused(path)
        self.assertIn("bytes", line)


def endless(path: Path) -> Path:
    """
    A file at C{path} whose reading never ends or never starts: a zero
    device (made here in a temporary directory), or a FIFO where this is
    not root.
    """
    if os.geteuid() == 0:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 5))
    else:
        os.mkfifo(path, 0o666)
    return path


class StartupFileTests(TestCase):
    """
    C{PRICES_FILE}, C{UPSTREAM_CA_FILE} and a TLS listener's key or
    certificate naming a zero device or a FIFO stop C{twistd -n openclaw}
    at once with one line naming the setting (they were read without end:
    GBs of memory, never listening); as C{JWT_SECRET_FILE} is, each is
    read only as a regular file of a bounded size.
    """

    timeout = 60

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)

    @inlineCallbacks
    def refused(self, args: list[str], **env: str) -> Any:
        out, err, code = yield getProcessOutputAndValue(
            twistd_path(),
            ["-n", "--pidfile=", "openclaw", "--port", str(free_port()), "--api-port", str(free_port()), *args],
            env=gateway_env(STATE_DIR=str(self.dir), **env),
            path=str(self.dir),
        )
        self.assertEqual(code, 2, (out, err))
        lines = err.decode().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn("openclaw: configuration error: ", lines[0])
        return lines[0]

    @inlineCallbacks
    def test_prices_file(self) -> Any:
        path = endless(self.dir / "prices.json")
        line = yield self.refused([], PRICES_FILE=str(path))
        self.assertIn(f"PRICES_FILE={str(path)!r} is refused: it is a ", line)
        self.assertIn("point PRICES_FILE at a regular JSON file of at most 1 MiB", line)
        self.assertIn("(the value came from the environment)", line)

    @inlineCallbacks
    def test_ca_file(self) -> Any:
        path = endless(self.dir / "ca.pem")
        line = yield self.refused([], UPSTREAM_CA_FILE=str(path))
        self.assertIn(f"UPSTREAM_CA_FILE={str(path)!r} is refused: it is a ", line)
        self.assertIn("point UPSTREAM_CA_FILE at a regular PEM file of at most 1 MiB", line)

    @inlineCallbacks
    def test_tls_listener_files(self) -> Any:
        """
        C{certKey} (then C{privateKey}, C{extraCertChain}) an endless file:
        refused before Twisted's endpoint parser reads it.
        """
        # Refused before any is parsed: a regular file's content does not matter.
        key = self.dir / "key.pem"
        key.write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
        key.chmod(0o600)
        zero = endless(self.dir / "zero")
        for fields, parameter in (
            (f"privateKey={key}:certKey={zero}", "certKey"),
            (f"privateKey={zero}", "privateKey"),
            (f"privateKey={key}:certKey={key}:extraCertChain={zero}", "extraCertChain"),
        ):
            description = f"ssl:{free_port()}:interface=127.0.0.1:{fields}"
            line = yield self.refused(["--api-listen", description])
            self.assertIn(
                f"API_LISTEN (--api-listen)={description!r} (from the command line) cannot be used: its {parameter} ",
                line,
            )
            self.assertIn(f"point {parameter} at a regular PEM file of at most 1 MiB", line)

    def test_sizes(self) -> None:
        """
        A file over the bound is refused unread, in the same words; one
        within it is read (the system's CA bundle is some 220 KB).
        """
        big = self.dir / "big"
        big.write_bytes(b"x" * (1024 * 1024 + 1))
        for name in ("PRICES_FILE", "UPSTREAM_CA_FILE"):
            with self.assertRaises(ConfigError) as caught:
                load_settings({name: str(big)}, cwd=self.dir)
            self.assertIn(f"{name}={str(big)!r} is refused: it holds 1048577 bytes", str(caught.exception))
        ca = make_ca()
        bundle = self.dir / "bundle.pem"
        bundle.write_bytes(ca.pem * (512 * 1024 // len(ca.pem)))
        self.assertEqual(
            load_settings({"UPSTREAM_CA_FILE": str(bundle)}, cwd=self.dir).upstream_ca_pem[:20], ca.pem[:20]
        )
        self.assertEqual(tls_file_problem(f"ssl:0:privateKey={big}")[0], "privateKey")
        self.assertIsNone(tls_file_problem(f"ssl:0:privateKey={bundle}"))
        self.assertIsNone(tls_file_problem(f"tcp:0:interface={big}"))

    def test_ctl_cafile(self) -> None:
        """
        C{openclawctl --cafile} reads its CA file the same way.
        """
        with self.assertRaises(NotARegularFile):
            trust_root_from_file(endless(self.dir / "zero"))


class ModelSettingTests(TestCase):
    """
    A provider's C{*_MODEL} holding control characters is refused at
    start-up with one line, by the rule the API and C{switch_provider}
    apply to model names.
    """

    timeout = 60

    @inlineCallbacks
    def test_escape_refused_by_twistd(self) -> Any:
        state = Path(self.mktemp()).resolve()
        state.mkdir(parents=True)
        out, err, code = yield getProcessOutputAndValue(
            twistd_path(),
            ["-n", "--pidfile=", "openclaw", "--port", str(free_port()), "--api-port", str(free_port())],
            env=gateway_env(STATE_DIR=str(state), GEMINI_MODEL="gemini-2.5-flash\x1b[2J"),
            path=str(state),
        )
        self.assertEqual(code, 2, (out, err))
        lines = err.decode().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn("GEMINI_MODEL='gemini-2.5-flash\\x1b[2J'", lines[0])
        self.assertIn("control or invisible characters", lines[0])

    def test_nul_refused(self) -> None:
        for value in ("kimi\x00", "a\u202eb", "x\ny"):
            with self.assertRaises(ConfigError) as caught:
                load_settings({"KIMI_MODEL": value}, cwd=Path(self.mktemp()).parent)
            self.assertIn("KIMI_MODEL=", str(caught.exception))
        self.assertEqual(
            load_settings({"KIMI_MODEL": " kimi-k2 "}, cwd=Path(self.mktemp()).parent).default_model("kimi"), "kimi-k2"
        )

    def test_reason_given(self) -> None:
        """
        The line gives the reason (L{model_refusal}'s, the one the API and
        C{switch_provider} give) and what to do: a name too long is said to
        be too long.  C{FALLBACK_MODEL_*} and C{EMBEDDING_MODEL} are held to
        the same rule.
        """
        cwd = Path(self.mktemp()).parent
        too_long = MAX_MODEL_CHARS + 1
        for name, value, reason in [
            ("KIMI_MODEL", "k" * too_long, f"model is {too_long} characters long"),
            ("KIMI_MODEL", "  ", "model must be a non-empty string"),
            ("FALLBACK_MODEL_GEMINI", "g\x1b[2J", "model holds control or invisible characters"),
            ("EMBEDDING_MODEL", "gemini/e\x1b[2J", "model holds control or invisible characters"),
            ("EMBEDDING_MODEL", "e" * too_long, f"model is {too_long} characters long"),
            (
                "GEMINI_MODEL",
                "gemini-2.5-flash   # the cheap one",
                "model holds a space, which no model name has "
                "(in an env file, a # comment after the value is part of it",
            ),
        ]:
            with self.assertRaises(ConfigError) as caught:
                load_settings({name: value}, cwd=cwd)
            message = str(caught.exception)
            self.assertIn(f"{name}=", message)
            self.assertIn(reason, message)
            self.assertIn("as the provider lists it", message)
            self.assertNotIn("\n", message)


API_KEY = "gw-key-hostile-host-0123456789"


class SlowKeyedHeadTests(TestCase):
    """
    A first request head that is still arriving when the keyless deadline
    comes is late, not keyless: 408, at the keyless deadline.
    """

    timeout = 30

    @inlineCallbacks
    def test_slow_head_with_key_gets_408(self) -> Any:
        gateway = start_gateway(
            self,
            api=True,
            gateway_api_keys=(API_KEY,),
            api_header_timeout_seconds=10,
            api_keyless_timeout_seconds=1.5,
        )
        head = f"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nX-Slow: {'a' * 40}\r\n\r\n"
        parts = [head[i : i + 4].encode() for i in range(0, len(head), 4)]
        assert gateway.api_port is not None
        events = capture_log_events(self)
        answer, took = yield deferToThread(trickle, gateway.api_port, parts, 0.1)
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer[:300])
        self.assertIn(b"request_timeout", answer)
        self.assertIn(b"API_KEYLESS_TIMEOUT_SECONDS (1.5 s)", answer)
        self.assertLess(took, 3.5)
        # Logged as refused at the keyless deadline, with its status.
        refused = [
            (e["outcome"], e["status"], e["peer"]) for e in events if e.get("log_namespace") == "openclaw.dataplane"
        ]
        self.assertEqual(refused, [("keyless_timeout", 408, "127.0.0.1")])


class MissingHostTests(TestCase):
    """
    RFC 9112 section 3.2: an HTTP/1.1 request without C{Host} is answered
    400, on the API (in OpenAI's error shape) and on the metrics listener;
    HTTP/1.0 needs none.
    """

    timeout = 30

    @inlineCallbacks
    def test_missing_host(self) -> Any:
        gateway = start_gateway(self, api=True, gateway_api_keys=(API_KEY,))
        metrics_port = start_metrics_listener(self, gateway.service.settings)
        assert gateway.api_port is not None
        for request in (
            b"GET /healthz HTTP/1.1\r\n\r\n",
            b"POST /v1/chat/completions HTTP/1.1\r\n"
            + f"Authorization: Bearer {API_KEY}\r\nContent-Length: 2\r\n\r\n{{}}".encode(),
        ):
            answer = yield deferToThread(exchange, gateway.api_port, request)
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), (request, answer[:300]))
            error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
            self.assertEqual(error["code"], "missing_host")
            self.assertIn("Host", error["message"])
        answer = yield deferToThread(exchange, metrics_port, b"GET /metrics HTTP/1.1\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:300])
        self.assertIn(b"no Host header field", answer)
        for port, path in ((gateway.api_port, b"/healthz"), (metrics_port, b"/metrics")):
            answer = yield deferToThread(exchange, port, b"GET " + path + b" HTTP/1.0\r\n\r\n")
            self.assertIn(b" 200 ", answer.partition(b"\r\n")[0], answer[:300])
            answer = yield deferToThread(
                exchange, port, b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:300])

    @inlineCallbacks
    def test_metrics_refusals_are_logged(self) -> Any:
        """
        The 400s the metrics listener writes itself (no C{Host}, or more
        than one) are logged at info with the peer and the reason, as its
        other refusals are.
        """
        gateway = start_gateway(self)
        metrics_port = start_metrics_listener(self, gateway.service.settings)
        events = capture_log_events(self)
        for request in (
            b"GET /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: rebind.example\r\n\r\n",
        ):
            answer = yield deferToThread(exchange, metrics_port, request)
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:300])
        refusals = [e for e in events if e.get("log_namespace") == "openclaw.metrics" and e.get("status") == 400]
        self.assertEqual([(e["log_level"], e["peer"]) for e in refusals], [(LogLevel.info, "127.0.0.1")] * 2, refusals)
        self.assertIn("no Host header field", formatEvent(refusals[0]))
        self.assertIn("more than one Host header field", formatEvent(refusals[1]))


def _control_status_page(port: int) -> bytes:
    return exchange(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")


def _control_upgrade(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(upgrade_request(port))
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer


class ControlPortDisclosureTests(TestCase):
    """
    The control port shows no status page to a plain GET, and names no
    library or version in its C{Server} field.
    """

    timeout = 30

    @inlineCallbacks
    def test_no_status_page_and_neutral_server(self) -> Any:
        gateway = start_gateway(self)
        page = yield deferToThread(_control_status_page, gateway.port)
        self.assertFalse(page.startswith(b"HTTP/1.1 200"), page[:300])
        self.assertNotIn(b"autobahn", page.lower())
        upgrade = yield deferToThread(_control_upgrade, gateway.port)
        self.assertTrue(upgrade.startswith(b"HTTP/1.1 101"), upgrade)
        self.assertIn(b"\r\nServer: openclaw\r\n", upgrade)
        self.assertNotIn(b"autobahn", upgrade.lower())
