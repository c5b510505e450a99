"""
The gateway as an operator runs it: C{twistd -n openclaw} from the installed
package, in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.support import GatewayProcess, connect, free_port, spawn_gateway, twistd_path

SECRET = "a-production-secret-of-at-least-32-bytes!"
ROOT = Path(__file__).resolve().parent.parent


def base_env(**extra: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    # A daemon without --state-dir keeps its state in a directory of its
    # own (/var/lib/openclaw for root): here, one under the temp directory.
    env["XDG_STATE_HOME"] = str(Path(tempfile.gettempdir()).resolve() / "openclaw-test-state-home")
    env.update(extra)
    return env


class TwistdTests(TestCase):
    # Each test starts twistd a few times (1-4 s each on a slow host).
    timeout = 120

    @inlineCallbacks
    def test_run_ping_and_restart(self):
        """
        twistd -n openclaw prints the banner; its token answers a ping; a
        restarted gateway (same JWT_SECRET) refuses the old token as revoked.
        """
        port = free_port()
        args = ["--port", str(port), "--interface", "127.0.0.1"]
        first = spawn_gateway(self, args, base_env(JWT_SECRET=SECRET))
        token = yield first.token
        client = yield connect(port)
        answer = yield client.command(token, "ping")
        self.assertTrue(answer["ok"])
        client.sendClose()
        yield client.closed
        status = yield first.stop()
        self.assertIn(status, (0, -15))

        second = spawn_gateway(self, args, base_env(JWT_SECRET=SECRET))
        new_token = yield second.token
        self.assertNotEqual(new_token, token)
        client = yield connect(port)
        answer = yield client.command(token, "ping")
        self.assertEqual(answer, {"ok": False, "cmd": "ping", "error": "token revoked"})
        answer = yield client.command(new_token, "ping")
        self.assertTrue(answer["ok"])
        client.sendClose()
        yield client.closed

    @inlineCallbacks
    def test_ephemeral_secret_warns(self):
        """
        Without JWT_SECRET the gateway still starts, and says loudly that
        its tokens die with the process.
        """
        process = spawn_gateway(self, ["--port", str(free_port()), "--interface", "127.0.0.1"], base_env())
        yield process.token
        yield process.stop()
        self.assertIn(b"JWT_SECRET is not set", process.stdout)

    @inlineCallbacks
    def test_invalid_configuration(self):
        """
        Each invalid value stops start-up with one line naming it, a
        non-zero exit, and no traceback.
        """
        same = free_port()
        cases = [
            (["--port", "abc"], {}, "WS_CONTROL_PORT='abc'"),
            ([], {"SESSION_TTL_HOURS": "-1"}, "SESSION_TTL_HOURS='-1'"),
            ([], {"TRUSTED_CLIENT_IPS": "300.1.1.1"}, "TRUSTED_CLIENT_IPS='300.1.1.1'"),
            ([], {"DEFAULT_PROVIDER": "openai"}, "DEFAULT_PROVIDER='openai'"),
            ([], {"JWT_SECRET": "short"}, "JWT_SECRET is 5 bytes long"),
            (["--port", str(same), "--api-port", str(same)], {}, f"WS_CONTROL_PORT and API_PORT are both {same}"),
            # Mistyped options: one line and status 2 too, not twistd's usage
            # text and status 1 (ops trial s36).
            (["--prot", "9000"], {}, "option --prot not recognized (did you mean --port?)"),
            (["--state_dir", "x"], {}, "(did you mean --state-dir?)"),
            (["--port"], {}, "option --port requires argument"),
            (["extra-arg"], {}, "unexpected argument 'extra-arg': twistd openclaw takes options only"),
        ]
        for args, env, expected in cases:
            out, err, code = yield getProcessOutputAndValue(
                twistd_path(), ["-n", "--pidfile=", "openclaw", *args], env=base_env(**env), path=self.mktemp_dir()
            )
            self.assertEqual(code, 2, (expected, err))
            lines = err.decode().strip().splitlines()
            self.assertEqual(len(lines), 1, err)
            self.assertIn(expected, lines[0])
            self.assertNotIn(b"Traceback", out + err)

    @inlineCallbacks
    def test_port_in_use_is_one_line(self):
        """
        A port already taken ends start-up with one line naming the setting
        and the way out, exit status 1 and no traceback: in the foreground,
        and as a daemon (on the terminal that ran twistd, before it
        detaches).
        """
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            run = str(Path(self.mktemp_dir()).resolve())
            cases = [
                (
                    ["-n", "--pidfile=", "openclaw", "--interface", "127.0.0.1", "--api-port", str(port)],
                    f"openclaw: cannot listen on 127.0.0.1:{port} (API_PORT, from the command line): address already in use; "
                    "is another gateway running? choose another port with --api-port",
                ),
                (
                    [
                        "--pidfile",
                        f"{run}/p",
                        "--logfile",
                        f"{run}/l",
                        "openclaw",
                        "--interface",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--token-file",
                        f"{run}/token",
                    ],
                    f"openclaw: cannot listen on 127.0.0.1:{port} (WS_CONTROL_PORT, from the command line): address already in "
                    "use; "
                    "is another gateway running? choose another port with --port",
                ),
            ]
            for args, expected in cases:
                out, err, code = yield getProcessOutputAndValue(
                    twistd_path(), args, env=base_env(JWT_SECRET=SECRET), path=run
                )
                self.assertEqual(code, 1, err)
                self.assertEqual(err.decode().splitlines(), [expected])
                self.assertNotIn(b"Traceback", out + err)
                self.assertFalse(Path(run, "p").exists())

    @inlineCallbacks
    def test_refusals_leave_nothing_on_disk(self):
        """
        A refusal at start-up comes before anything is made on disk, or
        takes back what was: twistd -n openclaw in a directory of its own
        (the state directory: STATE_DIR unset) ends with its one line and
        leaves the directory as it found it: no consumers' database
        (README audit s18 F3: LOG_FORMAT=json without a token file left an
        empty openclaw.db), no token file's lock.
        """
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            listen = ["--interface", "127.0.0.1", "--port", str(free_port()), "--api-port", str(free_port())]
            # (directories made first, twistd's options, openclaw's, environment, exit status, the line)
            cases: list[tuple[list[str], list[str], list[str], dict[str, str], int, str]] = [
                # Standard output is a pipe here, not a terminal.
                ([], [], listen, {"LOG_FORMAT": "json"}, 2, "LOG_FORMAT=json on a standard output that is not"),
                ([], [], listen, {"CONTROL_LISTEN": "bogus:1"}, 2, "CONTROL_LISTEN (--listen)='bogus:1' (from the"),
                (
                    [],
                    [],
                    ["--interface", "127.0.0.1", "--api-port", str(port)],
                    {},
                    1,
                    f"127.0.0.1:{port} (API_PORT, from the command line)",
                ),
                # A tcp: endpoint's port taken: tried before anything is made.
                (
                    [],
                    [],
                    [*listen, "--listen", f"tcp:{port}:interface=127.0.0.1", "--token-file", "token"],
                    {},
                    1,
                    f"cannot listen on tcp:{port}:interface=127.0.0.1 (CONTROL_LISTEN, from the command line): address already "
                    "in use",
                ),
                (
                    [],
                    [],
                    [*listen, "--workers", "2"],
                    {"REDIS_URL": "redis://127.0.0.1:1/0", "CONTROL_LISTEN": "tcp:0"},
                    2,
                    "--workers above 1 shares TCP listeners only",
                ),
                # The database refused once the token file is locked: the
                # lock file goes.
                (
                    ["openclaw.db-wal"],
                    [],
                    [*listen, "--token-file", "token"],
                    {},
                    2,
                    "openclaw.db-wal': a directory is in the way",
                ),
                # The log file refused once the database is made too: both go.
                ([], ["--logfile", "missing/twistd.log"], [*listen, "--token-file", "token"], {}, 2, "the log file"),
                # A log file there that cannot be appended to (a directory):
                # one line, not a traceback, and nothing else left (review).
                (
                    ["logs"],
                    ["--logfile", "logs"],
                    [*listen, "--token-file", "token"],
                    {},
                    2,
                    "cannot open the log file",
                ),
                # twistd's --uid/--gid (as root: the files would be root's,
                # the process nobody's), refused before anything is made
                # (daemon trial s18).
                (
                    [],
                    ["--uid", "65534", "--gid", "65534"],
                    [*listen, "--token-file", "token"],
                    {},
                    2,
                    "twistd's --uid/--gid are not supported: the gateway's files would be made by one user and "
                    "used by another; start twistd as the gateway's user instead (systemd: User=",
                ),
                # A unix: listener whose socket cannot be made: found before
                # anything is made (re-attack s18: a traceback, and the lock
                # and database left).
                (
                    [],
                    [],
                    [*listen, "--token-file", "token"],
                    {"API_LISTEN": "unix:/nonexistent-oc/api.sock"},
                    2,
                    "API_LISTEN (--api-listen)='unix:/nonexistent-oc/api.sock' (from the environment) cannot be "
                    "used: its directory '/nonexistent-oc' does not exist",
                ),
                (
                    [],
                    [],
                    [*listen, "--token-file", "token"],
                    {"API_LISTEN": "unix:" + "s" * 110},
                    2,
                    "and a UNIX socket's is at most 107 (unix(7))",
                ),
                # A STATE_DIR that did not exist, made while the settings
                # are read, goes too, parents and all: refused by a later
                # setting, after the settings, and after its database was
                # made (re-attack s18).
                ([], [], listen, {"STATE_DIR": "new/state", "LOG_FORMAT": "xml"}, 2, "LOG_FORMAT='xml' (from the"),
                ([], [], listen, {"STATE_DIR": "new/state", "LOG_FORMAT": "json"}, 2, "LOG_FORMAT=json on a"),
                # Through "..", new/b is made as well as new/c (re-attack s19),
                # and one that was there is not taken for one made (review
                # s19: the operator's empty "prepared" was removed).
                ([], [], listen, {"STATE_DIR": "new/b/../c", "LOG_FORMAT": "xml"}, 2, "LOG_FORMAT='xml' (from the"),
                (["prepared"], [], listen, {"STATE_DIR": "nope/../prepared", "LOG_FORMAT": "xml"}, 2, "LOG_FORMAT="),
                # twistd's -d and --pidfile, which twistd itself uses only
                # once the files are made (re-attack s19: a traceback, and
                # the state directory, database and lock left).
                (
                    [],
                    ["-d", "missing"],
                    [*listen, "--token-file", "token"],
                    {"STATE_DIR": "new/state"},
                    2,
                    "twistd's -d/--rundir 'missing' is not a directory this user can enter",
                ),
                # Re-check s19: a dangling link (twistd failed with a
                # traceback, files left, and unlinked it at stop), a name
                # past NAME_MAX; host trial s21: a directory (a traceback
                # from twistd's checkPID) and a FIFO (checkPID waited for
                # ever), refused as the options are parsed.
                (["pid.d"], ["--pidfile", "pid.d"], listen, {}, 2, "'pid.d' is there and is not a regular file"),
                (["pid.fifo"], ["--pidfile", "pid.fifo"], listen, {}, 2, "'pid.fifo' is there and is not a regular"),
                # Host trial s21: a FIFO as the log file (its open waited
                # for a reader for ever, the lock and database made).
                (["log.fifo"], ["--logfile", "log.fifo"], listen, {}, 2, "it is a FIFO, not a regular file"),
                (
                    ["pid.d"],
                    ["--pidfile", "pid.d/dangling"],
                    [*listen, "--token-file", "token"],
                    {"STATE_DIR": "new/state"},
                    2,
                    "dangling' is there and is not a regular file",
                ),
                (
                    [],
                    ["--pidfile", "p" * 300],
                    [*listen, "--token-file", "token"],
                    {"STATE_DIR": "new/state"},
                    2,
                    "has a name over 255 bytes",
                ),
                (
                    [],
                    ["--pidfile", "missing/twistd.pid"],
                    [*listen, "--token-file", "token"],
                    {"STATE_DIR": "new/state"},
                    2,
                    "missing/twistd.pid' is in a directory that is not there or this user cannot write",
                ),
                (
                    [],
                    ["--logfile", "missing/twistd.log"],
                    [*listen, "--token-file", "new/state/token"],
                    {"STATE_DIR": "new/state"},
                    2,
                    "missing/twistd.log (--logfile): No such file or directory; create ",
                ),
                # --workers, whose workers would start in -d's directory.
                (
                    ["sub"],
                    ["-d", "sub"],
                    [*listen, "--workers", "2"],
                    {"REDIS_URL": "redis://127.0.0.1:1/0"},
                    2,
                    "--workers above 1 with twistd's -d/--rundir 'sub' is not supported",
                ),
            ]
            for directories, twistd, args, env, status, expected in cases:
                run = Path(self.mktemp_dir()).resolve()
                for name in directories:
                    if name.endswith(".fifo"):
                        os.mkfifo(run / name)
                    else:
                        (run / name).mkdir()
                if "pid.d" in directories:
                    (run / "pid.d" / "dangling").symlink_to(run / "missing" / "twistd.pid")
                out, err, code = yield getProcessOutputAndValue(
                    twistd_path(),
                    ["-n", "--pidfile=", *twistd, "openclaw", *args],
                    env=base_env(JWT_SECRET=SECRET, **env),
                    path=str(run),
                )
                self.assertEqual(code, status, err)
                lines = err.decode().splitlines()
                self.assertEqual(len(lines), 1, err)
                self.assertIn(expected, lines[0])
                self.assertNotIn(b"Traceback", out + err)
                self.assertEqual(sorted(p.name for p in run.iterdir()), directories, expected)

    # Twelve twistd runs, one after another.
    test_refusals_leave_nothing_on_disk.timeout = 300  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_rundir_with_relative_paths(self):
        """
        twistd's -d DIR (--rundir) changes the working directory once the
        settings are read: a relative --token-file, --state-dir and unix:
        listener are where the operator meant them, in the directory twistd
        was started in, as twistd's own --pidfile is, and the gateway
        serves (daemon trial s18: the token file's lock was made there and
        the token in DIR, and the database was never usable: /readyz 503
        for ever).  The banner names the token file by its absolute path.
        """
        launch = Path(tempfile.mkdtemp(prefix="oc")).resolve()  # AF_UNIX paths are short
        self.addCleanup(shutil.rmtree, launch, True)
        (launch / "run").mkdir()
        api_port = free_port()
        argv = [twistd_path(), "-n", "--pidfile=", "-d", "run", "openclaw", "--interface", "127.0.0.1"]
        argv += ["--api-port", str(api_port), "--listen", "unix:control.sock:mode=600"]
        argv += ["--token-file", "token", "--state-dir", "state"]
        process = GatewayProcess()
        env = base_env(JWT_SECRET=SECRET, GEMINI_API_KEY="gemini-test-key-0123456789")
        reactor.spawnProcess(process, argv[0], argv, env=env, path=str(launch))
        self.addCleanup(process.stop)
        deadline = time.monotonic() + 20
        while True:
            self.assertFalse(process.ended.called, process.stdout[-3000:])
            status, body = yield deferToThread(http_get, f"http://127.0.0.1:{api_port}/readyz")
            if status == 200 or time.monotonic() > deadline:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(status, 200, body)
        token = (launch / "token").read_text().strip()
        self.assertTrue(token.startswith("eyJ"), token)
        self.assertTrue((launch / "token.lock").is_file())
        self.assertTrue((launch / "state" / "openclaw.db").is_file())
        self.assertTrue(stat.S_ISSOCK((launch / "control.sock").stat().st_mode))
        client = yield connect(0, unix=str(launch / "control.sock"))
        answer = yield client.command(token, "ping")
        self.assertTrue(answer["ok"], answer)
        client.sendClose()
        yield client.closed
        self.assertEqual(list((launch / "run").iterdir()), [])
        self.assertIn(f"in {launch / 'token'} (never logged)".encode(), process.stdout)
        ended = yield process.stop()
        self.assertIn(ended, (0, -15))
        self.assertFalse((launch / "token").exists())
        self.assertFalse((launch / "token.lock").exists())

    def mktemp_dir(self) -> str:
        path = Path(self.mktemp())
        path.mkdir(parents=True)
        return str(path)


def http_get(url: str) -> tuple[int, bytes]:
    """
    GET C{url} (blocking: call it in a thread): its status and body; status
    0 when nothing answers.
    """
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError as error:
        return 0, str(error).encode()


class CleanInstallTests(TestCase):
    """
    pip install . into a brand-new venv installs the twistd plugin.
    """

    timeout = 600

    @inlineCallbacks
    def test_pip_install_into_fresh_venv(self):
        venv = Path(self.mktemp()).resolve() / "venv"
        yield deferToThread(self._install, venv)
        out, err, code = yield getProcessOutputAndValue(str(venv / "bin" / "twistd"), ["--help"], env=base_env())
        self.assertEqual(code, 0, err)
        self.assertIn(b"openclaw", out)
        process = spawn_gateway(
            self,
            ["--port", str(free_port()), "--interface", "127.0.0.1"],
            base_env(JWT_SECRET=SECRET),
            twistd=str(venv / "bin" / "twistd"),
        )
        token = yield process.token
        self.assertTrue(token.startswith("eyJ"))
        yield process.stop()

    @staticmethod
    def _install(venv: Path) -> None:
        # Not the runner's PYTHONPATH (trial -j sets one to its own sys.path):
        # the new venv must find nothing installed but what pip puts there.
        env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
        # Build from a copy of the files git would commit (tracked, or new and
        # not ignored), as from a clean clone: no .venv, build/ or egg-info.
        source = venv.parent / "source"
        files = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout.split()
        for name in files:
            target = source / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((ROOT / name).read_bytes())
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(source)],
            check=True,
            capture_output=True,
            env=env,
        )
