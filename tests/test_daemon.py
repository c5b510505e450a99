"""
The gateway as a classic Unix daemon, in real subprocesses: daemonizing with
a pidfile, a log file and a token file; a graceful stop on SIGTERM; JSON
logs; and no secret in any log line.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from openclaw.state import STATE_LOCK
from openclaw.tap import RUNS_AS_ROOT
from tests.support import connect, free_port, spawn_gateway, start_upstream, twistd_path

SECRET = "daemon-secret-daemon-secret-daemon-secret-42"
KIMI_KEY = "sk-kimi-daemon-test-key-0123456789"
GEMINI_KEY = "AIza-gemini-daemon-test-key-0123456789"


DAEMON_STATE_HOME = str(Path(tempfile.gettempdir()).resolve() / "openclaw-test-state-home")


def env(**extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        # A daemon without --state-dir keeps its state in a directory of its
        # own (/var/lib/openclaw for root): here, one under the temp directory.
        "XDG_STATE_HOME": DAEMON_STATE_HOME,
        **extra,
    }


@inlineCallbacks
def wait_for(predicate, limit: float = 15.0):
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        yield task.deferLater(reactor, 0.05, lambda: None)


#: The warning a gateway started as root says on its terminal (none
#: otherwise).
AS_ROOT = f"openclaw: warning: {RUNS_AS_ROOT}\n".encode() if os.geteuid() == 0 else b""


class DaemonTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)

    def start_daemon(self, pidfile: Path, logfile: Path, tokenfile: Path, port: int) -> Deferred[Any]:
        """
        Run C{twistd openclaw} as a daemon with these files and control
        port; fire with its output and exit status once it has daemonized
        (or failed to).
        """
        argv = ["--pidfile", str(pidfile), "--logfile", str(logfile), "openclaw", "--token-file", str(tokenfile)]
        argv += ["--port", str(port), "--api-port", str(free_port()), "--interface", "127.0.0.1"]
        argv += ["--state-dir", str(self.dir)]
        return getProcessOutputAndValue(twistd_path(), argv, env=env(JWT_SECRET=SECRET), path=str(self.dir))

    @inlineCallbacks
    def daemon(self, logfile: Path) -> Any:
        """
        Start the gateway as a daemon (twistd without -n) logging to
        C{logfile}; fire with its control port, pidfile and token file once
        both files are there.  It is killed when the test ends.
        """
        pidfile, tokenfile = self.dir / "gw.pid", self.dir / "token"
        port = free_port()
        _out, err, code = yield self.start_daemon(pidfile, logfile, tokenfile, port)
        self.assertEqual(code, 0, err)
        self.addCleanup(self._kill, pidfile)
        yield wait_for(lambda: tokenfile.exists() and pidfile.exists())
        return port, pidfile, tokenfile

    @inlineCallbacks
    def test_daemonize_and_stop_via_pidfile(self):
        """
        twistd without -n daemonizes: the token is in the token file (0600),
        the banner in the log without the token; SIGTERM to the pid in the
        pidfile stops it and removes the pidfile and the token file.
        """
        logfile = self.dir / "gw.log"
        port, pidfile, tokenfile = yield self.daemon(logfile)
        token = tokenfile.read_text().strip()
        self.assertEqual(stat.S_IMODE(tokenfile.stat().st_mode), 0o600)
        # Created before twistd daemonized, with the daemon's umask (0077).
        self.assertEqual(stat.S_IMODE(logfile.stat().st_mode), 0o600)
        client = yield connect(port)
        answer = yield client.command(token, "ping")
        self.assertTrue(answer["ok"])
        log = logfile.read_text()
        self.assertIn("OPENCLAW GATEWAY — SESSION TOKEN", log)
        self.assertIn(f"in {tokenfile} (never logged)", log)
        self.assertNotIn(token, log)

        # The token file's lock names the daemon, not the process that
        # started it (the lock is taken before twistd daemonizes).
        lockfile = self.dir / "token.lock"
        self.assertEqual(lockfile.read_text(), pidfile.read_text() + "\n")
        # So does STATE_DIR's (named again once started: HeldLocks).
        state_lock = self.dir / STATE_LOCK
        self.assertEqual(state_lock.read_text(), pidfile.read_text() + "\n")

        os.kill(int(pidfile.read_text()), signal.SIGTERM)
        code, _ = yield client.closed
        self.assertEqual(code, 1001)
        yield wait_for(lambda: not pidfile.exists())
        self.assertFalse(tokenfile.exists())
        self.assertFalse(lockfile.exists())
        self.assertFalse(state_lock.exists())

    @inlineCallbacks
    def test_instance_is_the_daemons(self):
        """
        C{status}'s C{instance} (host name and process id) names the
        daemon, the pid in the pidfile, not the process that started it
        (the service is built before twistd daemonizes).
        """
        port, pidfile, tokenfile = yield self.daemon(self.dir / "gw.log")
        client = yield connect(port)
        answer = yield client.command(tokenfile.read_text().strip(), "status")
        self.assertTrue(answer["ok"], answer)
        self.assertEqual(answer["result"]["instance"], f"{socket.gethostname()}-{int(pidfile.read_text())}")
        client.sendClose()
        yield client.closed

    @inlineCallbacks
    def test_config_warnings_on_the_terminal(self):
        """
        A daemon's configuration warnings (a misspelt name in the env file)
        are said on the terminal that started it, before it daemonizes, as
        C{openclaw: warning: ...} lines, and logged too (trial s31: they
        were in the log only, the terminal silent).
        """
        (self.dir / ".env").write_text("GEMINI_MODLE=gemini-2.5-flash\n")
        warning = (
            f"env file {str(self.dir / '.env')!r}: GEMINI_MODLE is not a setting and is ignored; did you mean "
            "GEMINI_MODEL?"
        )
        pidfile, logfile, tokenfile = self.dir / "gw.pid", self.dir / "gw.log", self.dir / "token"
        self.addCleanup(self._kill, pidfile)
        out, err, code = yield self.start_daemon(pidfile, logfile, tokenfile, free_port())
        # Started as root (as this suite may be), it says that too, last
        # (operator trial s41: nothing did).
        self.assertEqual((out, err, code), (b"", f"openclaw: warning: {warning}\n".encode() + AS_ROOT, 0))
        yield wait_for(lambda: tokenfile.exists() and warning in logfile.read_text())
        self.assertEqual(RUNS_AS_ROOT in logfile.read_text(), os.geteuid() == 0)

    @inlineCallbacks
    def test_config_warnings_in_the_foreground(self):
        """
        In the foreground, logging to standard output, a configuration
        warning reaches the terminal through the log, once: not on stderr
        as well.  With -n --logfile the log is elsewhere: it is said on
        stderr.
        """
        warning = "environment: gemini_model is not a setting and is ignored; did you mean GEMINI_MODEL?"
        args = ["--port", str(free_port()), "--interface", "127.0.0.1", "--state-dir", str(self.dir)]
        process = spawn_gateway(self, args, env(JWT_SECRET=SECRET, gemini_model="gemini-2.5-flash"))
        yield process.token
        yield wait_for(lambda: warning.encode() in process.stdout)
        self.assertEqual(process.stdout.count(warning.encode()), 1)
        self.assertNotIn(b"openclaw: warning:", process.stdout + process.stderr)
        yield process.stop()
        logfile = self.dir / "gw.log"
        process = spawn_gateway(
            self,
            [*args, "--token-file", str(self.dir / "token")],
            env(JWT_SECRET=SECRET, gemini_model="gemini-2.5-flash"),
            twistd_args=["--logfile", str(logfile)],
        )
        yield wait_for(lambda: logfile.exists() and warning in logfile.read_text())
        self.assertEqual(process.stderr, f"openclaw: warning: {warning}\n".encode() + AS_ROOT)

    @inlineCallbacks
    def test_second_daemon_with_the_same_token_file(self):
        """
        A second daemon given the running one's token file is refused
        before it daemonizes: exit status 2 and one line on its terminal
        naming TOKEN_FILE, the path and the running daemon's pid; the
        running one's token file is untouched and still works.
        """
        port, pidfile, tokenfile = yield self.daemon(self.dir / "gw.log")
        token = tokenfile.read_text()
        other_pidfile = self.dir / "other.pid"
        self.addCleanup(self._kill, other_pidfile)
        _out, err, code = yield self.start_daemon(other_pidfile, self.dir / "other.log", tokenfile, free_port())
        self.assertEqual(code, 2, err)
        self.assertEqual(
            err.decode(),
            f"openclaw: configuration error: TOKEN_FILE (--token-file)={str(tokenfile)!r} (from the command line) is "
            f"in use by another running gateway (pid {pidfile.read_text()}), which holds its lock {str(tokenfile) + '.lock'!r}: "
            "give each gateway its own TOKEN_FILE, or stop the other gateway first\n",
        )
        self.assertFalse(other_pidfile.exists())
        self.assertEqual(tokenfile.read_text(), token)
        client = yield connect(port)
        answer = yield client.command(token.strip(), "ping")
        self.assertTrue(answer["ok"])
        client.sendClose()
        yield client.closed

    @inlineCallbacks
    def test_sigusr1_reopens_the_log(self):
        """
        logrotate's way: the log file is moved away, SIGUSR1 is sent, and
        the lines after it go to a new file of the same name (JSON here,
        one object per line).
        """
        pidfile, logfile, tokenfile = self.dir / "gw.pid", self.dir / "gw.log", self.dir / "token"
        port = free_port()
        _out, err, code = yield getProcessOutputAndValue(
            twistd_path(),
            [
                "--pidfile",
                str(pidfile),
                "--logfile",
                str(logfile),
                "openclaw",
                "--token-file",
                str(tokenfile),
                "--port",
                str(port),
                "--api-port",
                str(free_port()),
                "--interface",
                "127.0.0.1",
                "--state-dir",
                str(self.dir),
                "--log-format",
                "json",
            ],
            env=env(JWT_SECRET=SECRET),
            path=str(self.dir),
        )
        self.assertEqual(code, 0, err)
        self.addCleanup(self._kill, pidfile)
        yield wait_for(lambda: tokenfile.exists() and pidfile.exists())
        token = tokenfile.read_text().strip()
        client = yield connect(port)
        yield client.command(token, "health_check")
        yield wait_for(lambda: "health_check" in logfile.read_text())
        rotated = self.dir / "gw.log.1"
        logfile.rename(rotated)
        os.kill(int(pidfile.read_text()), signal.SIGUSR1)
        yield wait_for(logfile.exists)
        self.assertEqual(stat.S_IMODE(logfile.stat().st_mode), 0o600)
        answer = yield client.command(token, "rotate_token")
        self.assertTrue(answer["ok"])
        yield wait_for(lambda: "rotate_token" in logfile.read_text())
        before = [json.loads(line) for line in rotated.read_text().splitlines()]
        after = [json.loads(line) for line in logfile.read_text().splitlines()]
        self.assertTrue(any(e.get("cmd") == "health_check" for e in before))
        self.assertFalse(any(e.get("cmd") == "rotate_token" for e in before))
        self.assertTrue(any(e.get("cmd") == "rotate_token" and e["level"] == "info" for e in after))
        client.sendClose()
        yield client.closed

    @inlineCallbacks
    def test_contrib_logrotate(self):
        """
        contrib/openclaw.logrotate, its paths and user made this test's,
        run by logrotate itself (forced): the log moved to C{.1}, a new one
        made, and the daemon's next lines in the new one.
        """
        logrotate = shutil.which("logrotate") or (
            "/usr/sbin/logrotate" if Path("/usr/sbin/logrotate").exists() else None
        )
        if logrotate is None:
            raise SkipTest("logrotate is not installed")
        logfile = self.dir / "gw.log"
        port, pidfile, tokenfile = yield self.daemon(logfile)
        token = tokenfile.read_text().strip()
        user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
        contrib = Path(__file__).resolve().parent.parent / "contrib" / "openclaw.logrotate"
        config = self.dir / "logrotate.conf"
        config.write_text(
            contrib.read_text()
            .replace("/var/log/openclaw/openclaw.log", str(logfile))
            .replace("/run/openclaw/twistd.pid", str(pidfile))
            .replace("create 0600 openclaw openclaw", f"create 0600 {user} {group}")
        )
        client = yield connect(port)
        yield client.command(token, "health_check")
        yield wait_for(lambda: "health_check" in logfile.read_text())
        _out, err, code = yield getProcessOutputAndValue(
            logrotate, ["--force", "--state", str(self.dir / "logrotate.state"), str(config)], env=env()
        )
        self.assertEqual(code, 0, err)
        rotated = self.dir / "gw.log.1"
        self.assertIn("health_check", rotated.read_text())
        yield client.command(token, "rotate_token")
        yield wait_for(lambda: logfile.exists() and "rotate_token" in logfile.read_text())
        self.assertNotIn("rotate_token", rotated.read_text())
        self.assertEqual(stat.S_IMODE(logfile.stat().st_mode), 0o600)
        client.sendClose()
        yield client.closed

    @inlineCallbacks
    def test_fatal_signal_leaves_a_traceback(self):
        """
        A daemon killed by a fatal signal (SIGBUS: SQLite's memory-mapped
        C{-shm} file made immutable, trial s33 F3) leaves Python's
        traceback in its log file, the one SIGUSR1 reopened.
        """
        logfile = self.dir / "gw.log"
        port, pidfile, tokenfile = yield self.daemon(logfile)
        pid = int(pidfile.read_text())
        logfile.rename(self.dir / "gw.log.1")
        os.kill(pid, signal.SIGUSR1)
        yield wait_for(logfile.exists)
        os.kill(pid, signal.SIGBUS)
        yield wait_for(lambda: "Fatal Python error: Bus error" in logfile.read_text())
        yield wait_for(lambda: "most recent call first" in logfile.read_text())
        self.assertNotIn("Fatal Python error", (self.dir / "gw.log.1").read_text())

    @inlineCallbacks
    def test_failed_reopen_keeps_logging(self):
        """
        SIGUSR1 with the log's directory moved away: the daemon goes on
        logging to the file it had, which says the reopen failed and what
        to do; once the directory is back, another SIGUSR1 moves the log to
        a new file, which has the lines that follow, the stop's included.
        """
        logs = self.dir / "logs"
        logs.mkdir()
        port, pidfile, tokenfile = yield self.daemon(logs / "gw.log")
        pid = int(pidfile.read_text())
        client = yield connect(port)
        moved = self.dir / "logs.old"
        logs.rename(moved)
        os.kill(pid, signal.SIGUSR1)
        yield wait_for(lambda: "could not reopen the log file" in (moved / "gw.log").read_text())
        yield client.command("not-a-token", "ping")
        yield wait_for(lambda: "auth failure from" in (moved / "gw.log").read_text())
        self.assertIn(f"make {logs} exist and writable, then send SIGUSR1 again", (moved / "gw.log").read_text())
        logs.mkdir()
        os.kill(pid, signal.SIGUSR1)
        yield wait_for((logs / "gw.log").exists)
        yield client.command("still-not-a-token", "ping")
        yield wait_for(lambda: "auth failure from" in (logs / "gw.log").read_text())
        client.sendClose()
        yield client.closed
        os.kill(pid, signal.SIGTERM)
        yield wait_for(lambda: not pidfile.exists())
        self.assertIn("Main loop terminated.", (logs / "gw.log").read_text())
        self.assertNotIn("Main loop terminated.", (moved / "gw.log").read_text())

    @inlineCallbacks
    def test_journal_never_sees_the_token(self):
        """
        In the foreground with a token file and a stdout that is not a
        terminal (systemd's journal), the banner is logged without the token.
        """
        tokenfile = self.dir / "token"
        port = free_port()
        process = spawn_gateway(
            self,
            ["--port", str(port), "--interface", "127.0.0.1", "--token-file", str(tokenfile)],
            env(JWT_SECRET=SECRET),
        )
        yield wait_for(lambda: tokenfile.exists() and b"SESSION TOKEN" in process.stdout)
        token = tokenfile.read_text().strip()
        client = yield connect(port)
        answer = yield client.command(token, "ping")
        self.assertTrue(answer["ok"])
        client.sendClose()
        yield client.closed
        yield process.stop()
        self.assertIn(f"in {tokenfile} (never logged)".encode(), process.stdout)
        self.assertNotIn(token.encode(), process.stdout)
        self.assertFalse(tokenfile.exists())

    @inlineCallbacks
    def test_banner_names_the_token_file_resolved(self):
        """
        A token file named through C{..} (trial s25: C{gwD/../gwC/tok/token})
        is named in the banner by the path it is at, as the lock beside it.
        """
        for name in ("a", "b"):
            (self.dir / name).mkdir()
        given = self.dir / "a" / ".." / "b" / "token"
        process = spawn_gateway(
            self,
            ["--port", str(free_port()), "--interface", "127.0.0.1", "--token-file", str(given)],
            env(JWT_SECRET=SECRET),
        )
        yield wait_for(lambda: b"SESSION TOKEN" in process.stdout and (self.dir / "b" / "token.lock").exists())
        yield process.stop()
        self.assertIn(f"in {self.dir / 'b' / 'token'} (never logged)".encode(), process.stdout)
        self.assertNotIn(b"/../", process.stdout)

    @inlineCallbacks
    def test_daemon_needs_token_file(self):
        out, err, code = yield getProcessOutputAndValue(
            twistd_path(),
            [
                "--pidfile",
                str(self.dir / "p"),
                "--logfile",
                str(self.dir / "l"),
                "openclaw",
                "--port",
                str(free_port()),
            ],
            env=env(JWT_SECRET=SECRET),
            path=str(self.dir),
        )
        self.assertNotEqual(code, 0)
        self.assertIn(b"--token-file", err)
        self.assertNotIn(b"Traceback", err)

    @inlineCallbacks
    def test_listen_endpoint_on_no_such_address(self):
        """
        An endpoint string on port 0 (any) at an address this host does not
        have is refused before twistd daemonizes, like a taken port: one
        line, exit status 1, no pidfile.  It was bound only in the daemon,
        whose refusal (a SystemExit) never reached twistd's status pipe:
        the starting process waited on it for ever (trial s31).
        """
        pidfile = self.dir / "gw.pid"
        self.addCleanup(self._kill, pidfile)
        argv = [twistd_path(), "--pidfile", str(pidfile), "--logfile", str(self.dir / "gw.log"), "openclaw"]
        argv += ["--token-file", str(self.dir / "token"), "--state-dir", str(self.dir)]
        argv += ["--port", str(free_port()), "--api-port", str(free_port()), "--interface", "127.0.0.1"]
        # TEST-NET-1 (RFC 5737): no host has it.
        listen = "tcp:0:interface=192.0.2.1"
        # A hang shows as timeout's status, 124, rather than a test left waiting.
        _out, err, code = yield getProcessOutputAndValue(
            "timeout", ["20", *argv], env=env(JWT_SECRET=SECRET, METRICS_LISTEN=listen), path=str(self.dir)
        )
        self.assertEqual(code, 1, err)
        self.assertEqual(
            err.decode(),
            f"openclaw: cannot listen on {listen} (METRICS_LISTEN, from the environment): this host has no such "
            "address; choose another endpoint with --metrics-listen\n",
        )
        self.assertFalse(pidfile.exists())

    @staticmethod
    def _kill(pidfile: Path) -> None:
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass


class ShutdownAndLogTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.upstream = start_upstream(self, KIMI_KEY, GEMINI_KEY)
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)

    def gateway_env(self, **extra: str) -> dict[str, str]:
        return env(
            JWT_SECRET=SECRET,
            KIMI_API_KEY=KIMI_KEY,
            GEMINI_API_KEY=GEMINI_KEY,
            KIMI_BASE_URL=self.upstream.base_url("kimi"),
            GEMINI_BASE_URL=self.upstream.base_url("gemini"),
            GATEWAY_API_KEYS="gw-key-daemon-test-0123456789",
            STATE_DIR=str(self.dir),
            **extra,
        )

    @inlineCallbacks
    def test_sigterm_lets_health_check_finish(self):
        """
        SIGTERM while a slow health_check is in flight: the command still
        gets its answer, then the client is told 1001, and the process ends
        cleanly.
        """
        self.upstream.kimi.delay = self.upstream.gemini.delay = 1.5
        port = free_port()
        process = spawn_gateway(
            self, ["--port", str(port), "--interface", "127.0.0.1"], self.gateway_env(HEALTH_CHECK_TIMEOUT="5")
        )
        token = yield process.token
        client = yield connect(port)
        pending = client.command(token, "health_check")
        yield wait_for(lambda: self.upstream.kimi.requests == 1)
        process.transport.signalProcess("TERM")
        # An impatient second SIGTERM (and a Ctrl-C) while it drains: noted,
        # the drain goes on, no traceback.
        yield wait_for(lambda: b"Received SIGTERM" in process.stdout)
        process.transport.signalProcess("TERM")
        process.transport.signalProcess("INT")
        answer = yield pending
        self.assertTrue(answer["ok"])
        self.assertTrue(answer["result"]["providers"]["kimi"]["ok"])
        code, _ = yield client.closed
        self.assertEqual(code, 1001)
        status = yield process.ended
        self.assertIn(status, (0, -15))
        self.assertIn(b"received SIGTERM while stopping: the gateway is already draining", process.stdout)
        self.assertIn(b"received SIGINT while stopping", process.stdout)
        # What the stop waits for, said before it waits.
        self.assertIn(b"waiting up to 10 s (SHUTDOWN_GRACE_SECONDS) for 0 API call(s) and 1 command(s)", process.stdout)
        self.assertNotIn(b"ReactorNotRunning", process.stdout)
        self.assertNotIn(b"without DATABASE_URL", process.stdout)  # no cluster, no warning
        self.assertNotIn(b"Traceback", process.stdout)

    @inlineCallbacks
    def test_json_log_without_secrets(self):
        """
        With --log-format json every line on standard output (a pipe: a log
        shipper's) is a JSON object, the banner's included; after a full
        session (commands, a failed login, a rotation) no line holds a
        token, the JWT secret or an API key.
        """
        tokenfile = self.dir / "token"
        port = free_port()
        process = spawn_gateway(
            self,
            ["--port", str(port), "--interface", "127.0.0.1", "--log-format", "json", "--token-file", str(tokenfile)],
            self.gateway_env(),
        )
        yield wait_for(lambda: tokenfile.exists() and b"SESSION TOKEN" in process.stdout)
        token = tokenfile.read_text().strip()
        client = yield connect(port)
        yield client.command(token, "status")
        yield client.command(token, "switch_provider", {"provider": "kimi"})
        yield client.command(token, "health_check")
        yield client.command(token + "x", "ping")
        rotated = yield client.command(token, "rotate_token")
        new_token = rotated["result"]["token"]
        yield client.command(new_token, "ping")
        client.sendClose()
        yield client.closed
        yield process.stop()
        log_lines = process.stdout.decode().splitlines()
        events = [json.loads(line) for line in log_lines]
        self.assertTrue(all(isinstance(e, dict) for e in events))
        banners = [e["message"] for e in events if "SESSION TOKEN" in e["message"]]
        self.assertEqual(len(banners), 2)  # at start, and at rotate_token
        self.assertTrue(all(f"in {tokenfile} (never logged)" in banner for banner in banners))
        self.assertTrue(any(e.get("cmd") == "switch_provider" and e.get("outcome") == "ok" for e in events))
        self.assertTrue(any(e.get("outcome") == "auth_failed" for e in events))
        everything = "\n".join(log_lines)
        for secret in (token, new_token, SECRET, KIMI_KEY, GEMINI_KEY, "gw-key-daemon-test-0123456789"):
            self.assertNotIn(secret, everything)

    @inlineCallbacks
    def test_json_log_needs_token_file(self):
        """
        --log-format json on a standard output that is not a terminal, with
        no token file: refused at start, with what to do, rather than the
        banner printing the token (and non-JSON lines) into the stream.
        """
        process = spawn_gateway(
            self, ["--port", str(free_port()), "--interface", "127.0.0.1", "--log-format", "json"], self.gateway_env()
        )
        code = yield process.ended
        self.assertEqual(code, 2)
        self.assertEqual(
            process.stderr,
            b"openclaw: configuration error: LOG_FORMAT=json on a standard output that is not a terminal (a log "
            b"shipper's stream) needs --token-file PATH (or TOKEN_FILE) to hand the session token over: it is "
            b"never written to the log\n",
        )
        self.assertNotIn(b"Token    :", process.stdout)
