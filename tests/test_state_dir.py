"""
STATE_DIR and TOKEN_FILE at start-up: an explicit state directory that
does not exist yet is created mode 0700 like the default one; a state
directory that cannot be used, or a TOKEN_FILE in a directory that does
not exist, stops start-up with one line naming the variable, the value
and what to do.  A real C{twistd -n openclaw}.

A SQLite state directory others could write or own (the secret files'
directory rule), and a database file there that is a link or another
user's, are refused, one its group may write is a warning:
L{load_settings} and L{sqlite_file} on real files.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from openclaw.consumers.store import UnusableDatabaseFile, sqlite_file
from openclaw.settings import ConfigError, load_settings
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
    def test_group_writable_state_dir_starts(self):
        """
        twistd -n openclaw --state-dir DIR, DIR mode 2775 (a Kubernetes
        fsGroup volume): the gateway starts with SQLite in it, and says
        once, at start-up, that its group may write it.
        """
        state = self.directory() / "volume"
        state.mkdir()
        state.chmod(0o2775)
        process = spawn_gateway(
            self, ["--port", str(free_port()), "--interface", "127.0.0.1", "--state-dir", str(state)], base_env()
        )
        yield process.token
        self.assertTrue((state / "openclaw.db").exists())
        warned = [line for line in process.stdout.decode().splitlines() if "chmod g-w" in line]
        self.assertEqual(len(warned), 1, process.stdout)
        self.assertIn(f"directory {str(state)!r} may be written by its group (mode 2775)", warned[0])
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
        loose = run / "loose"
        loose.mkdir()
        loose.chmod(0o777)
        cases = [
            (["--state-dir", str(blocker)], {}, f"STATE_DIR={str(blocker)!r} cannot be used (a file is in the way"),
            ([], {"STATE_DIR": str(blocker / "below")}, f"STATE_DIR={str(blocker / 'below')!r} cannot be used"),
            # Others may write it: they could plant the database's name.
            (["--state-dir", str(loose)], {}, f"directory {str(loose)!r} may be written by others"),
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
        # A link is not followed (the database was made at its target).
        linked = run / "linked"
        linked.mkdir()
        (linked / "openclaw.db").symlink_to(run / "elsewhere.db")
        cases.append((linked, "(a symbolic link, which the gateway does not follow): remove the link"))
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
            self.assertIn(
                f"STATE_DIR (--state-dir)={str(state)!r} (from the command line): the consumers' database "
                f"{str(state / 'openclaw.db')!r}",
                lines[0],
            )
            self.assertIn(expected, lines[0])
            self.assertIn("--state-dir", lines[0])
            self.assertNotIn(b"Traceback", out + err)
        self.assertFalse((run / "elsewhere.db").exists())

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


#: Another user, for files only root can give away.
NOBODY = 65534


class StateDirectoryRuleTests(SynchronousTestCase):
    """
    With SQLite (C{DATABASE_URL} unset), the state directory is held to
    the secret files' directory rule (README, "Secret files'
    directories"), and more: others may not write the directory itself
    even with the sticky bit, since the gateway creates the database
    there by name; a directory its group may write is a warning.  With
    C{DATABASE_URL} set, there is no rule.
    """

    def setUp(self) -> None:
        self.environ: dict[str, str] = {"JWT_SECRET": SECRET}
        self.patch(os, "environ", self.environ)
        self.base = Path(self.mktemp()).resolve()
        self.base.mkdir(parents=True)
        self.state = self.base / "state"
        self.state.mkdir(mode=0o700)
        self.environ["STATE_DIR"] = str(self.state)

    def refused(self, daemon: bool = False) -> str:
        with self.assertRaises(ConfigError) as caught:
            load_settings(cwd=self.base, daemon=daemon)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        return message

    def warned(self, daemon: bool = False) -> str:
        settings = load_settings(cwd=self.base, daemon=daemon)
        self.assertEqual(len(settings.warnings), 1, settings.warnings)
        self.assertNotIn("\n", settings.warnings[0])
        return settings.warnings[0]

    def test_others_writable_state_dir(self) -> None:
        """
        A state directory others may write is refused (trial s17 F1: a
        0777 STATE_DIR, where another user planted the database or links
        under its names): chmod o-w, or another STATE_DIR.
        """
        self.assertEqual(load_settings(cwd=self.base).state_dir, self.state)
        for mode in (0o707, 0o777, 0o2777):
            self.state.chmod(mode)
            message = self.refused()
            self.assertIn(f"STATE_DIR={str(self.state)!r} (from the environment)", message)
            self.assertIn(f"may be written by others (mode {mode:04o})", message)
            self.assertIn(f"run: chmod o-w {str(self.state)!r}, or point STATE_DIR / --state-dir", message)

    def test_sticky_state_dir(self) -> None:
        """
        Sticky does not make it safe: another user can still be first to
        create the database's names.  No chmod is suggested for a shared
        directory such as /tmp, only another STATE_DIR.
        """
        for mode in (0o1777, 0o1707):
            self.state.chmod(mode)
            message = self.refused()
            self.assertIn(f"directory {str(self.state)!r} is shared (mode {mode:04o}, as /tmp)", message)
            self.assertIn("point STATE_DIR / --state-dir at a directory of the gateway's own", message)
            self.assertNotIn("chmod", message)

    def test_group_writable_state_dir(self) -> None:
        """
        A state directory only its group may write (a checkout made under
        umask 002, a Kubernetes fsGroup volume: 2775) starts, with one
        warning naming it, its mode and chmod g-w.
        """
        for mode in (0o770, 0o775, 0o2775, 0o1770):
            self.state.chmod(mode)
            warning = self.warned()
            self.assertIn(f"STATE_DIR={str(self.state)!r}", warning)
            self.assertIn(f"may be written by its group (mode {mode:04o})", warning)
            self.assertIn(f"run: chmod g-w {str(self.state)!r}", warning)
        self.state.chmod(0o755)
        self.assertEqual(load_settings(cwd=self.base).warnings, ())

    def test_database_url(self) -> None:
        """
        With DATABASE_URL set no SQLite file is made in the state
        directory: whoever may write it, it is not checked.
        """
        self.environ["DATABASE_URL"] = "postgresql://openclaw:secret@127.0.0.1:5432/openclaw"
        self.state.chmod(0o777)
        if os.geteuid() == 0:
            os.chown(self.state, NOBODY, NOBODY)
        settings = load_settings(cwd=self.base)
        self.assertEqual((settings.state_dir, settings.warnings), (self.state, ()))
        del self.environ["STATE_DIR"]
        self.base.chmod(0o1777)
        settings = load_settings(cwd=self.base)
        self.assertEqual((settings.state_dir, settings.warnings), (self.base, ()))

    def test_writable_parent(self) -> None:
        """
        A directory above it that others may write is refused unless it
        is sticky (as /tmp): they could rename the state directory away;
        one its group may write (a checkout's parent made under umask 002)
        is a warning.
        """
        self.base.chmod(0o777)
        message = self.refused()
        self.assertIn(f"directory {str(self.base)!r} may be written by others", message)
        self.assertIn("replace the state directory", message)
        self.base.chmod(0o775)
        settings = load_settings(cwd=self.base)
        self.assertEqual(settings.state_dir, self.state)
        self.assertTrue(
            any(f"directory {str(self.base)!r} may be written by its group" in line for line in settings.warnings),
            settings.warnings,
        )
        self.base.chmod(0o1777)
        self.assertEqual(load_settings(cwd=self.base).state_dir, self.state)

    def test_working_directory_and_default(self) -> None:
        """
        STATE_DIR unset: the working directory (a foreground run) and the
        daemon's own directory are held to the rule too.  A working
        directory such as /tmp (sticky, others may write) is refused with
        the advice to set STATE_DIR; a 0775 one (a checkout made under
        umask 002) is a warning.
        """
        del self.environ["STATE_DIR"]
        self.base.chmod(0o777)
        message = self.refused()
        self.assertIn("(the working directory: STATE_DIR is unset)", message)
        self.assertIn("set STATE_DIR / --state-dir", message)
        self.base.chmod(0o1777)
        message = self.refused()
        self.assertIn(f"the state directory {str(self.base)!r} (the working directory: STATE_DIR is unset)", message)
        self.assertIn("is shared (mode 1777, as /tmp)", message)
        self.assertIn("set STATE_DIR / --state-dir to a directory of the gateway's own", message)
        self.base.chmod(0o775)
        self.assertIn(f"chmod g-w {str(self.base)!r}", self.warned())
        self.base.chmod(0o755)
        self.environ["XDG_STATE_HOME"] = str(self.base)
        (self.base / "openclaw").mkdir(mode=0o700)
        self.assertEqual(load_settings(cwd=self.base, daemon=True).state_dir, self.base / "openclaw")
        (self.base / "openclaw").chmod(0o777)
        self.assertIn(f"the state directory {str(self.base / 'openclaw')!r}", self.refused(daemon=True))

    def test_other_users_directory(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("needs root, to give a directory to another user (os.chown)")
        os.chown(self.state, NOBODY, NOBODY)
        message = self.refused()
        self.assertIn(f"belongs to uid {NOBODY}", message)
        self.assertIn(f"chown 0 {str(self.state)!r}", message)
        # Trial s17 F1: a 0777 STATE_DIR owned by nobody.
        self.state.chmod(0o777)
        self.assertIn(f"belongs to uid {NOBODY}", self.refused())

    def test_other_users_link(self) -> None:
        """
        STATE_DIR reached through another user's link (in a sticky
        directory, which the rule lets be) is refused.
        """
        if os.geteuid() != 0:
            raise SkipTest("needs root, to give a link to another user (os.lchown)")
        sticky = self.base / "sticky"
        sticky.mkdir()
        sticky.chmod(0o1777)
        link = sticky / "state"
        link.symlink_to(self.state)
        os.lchown(link, NOBODY, NOBODY)
        self.environ["STATE_DIR"] = str(link)
        message = self.refused()
        self.assertIn(f"the symbolic link {str(link)!r}, which belongs to uid {NOBODY}", message)
        os.lchown(link, 0, 0)
        self.assertEqual(load_settings(cwd=self.base).state_dir, link)


class DatabaseFileTests(SynchronousTestCase):
    """
    openclaw.db and its -wal and -shm files are never reached through a
    symbolic link (one was followed: the database made at its target, a
    link's target chmod'ed 0600), and another user's are refused.
    """

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).resolve()
        self.state = self.base / "state"
        self.state.mkdir(parents=True, mode=0o700)
        self.victim = self.base / "victim"
        self.victim.mkdir()
        self.database = self.state / "openclaw.db"

    def refused(self) -> str:
        with self.assertRaises(UnusableDatabaseFile) as caught:
            sqlite_file(self.state)
        return str(caught.exception)

    def test_database_link(self) -> None:
        target = self.victim / "created.db"
        self.database.symlink_to(target)
        message = self.refused()
        self.assertIn(f"the consumers' database {str(self.database)!r} cannot be used", message)
        self.assertIn("(a symbolic link, which the gateway does not follow): remove the link", message)
        self.assertFalse(target.exists())
        # To an existing file, too.
        target.write_bytes(b"")
        self.refused()

    def test_companion_links(self) -> None:
        for suffix in ("-wal", "-shm"):
            target = self.victim / f"passwd{suffix}"
            target.write_bytes(b"root:x:0:0::/root:/bin/sh\n")
            target.chmod(0o644)
            companion = self.state / f"openclaw.db{suffix}"
            companion.symlink_to(target)
            message = self.refused()
            self.assertIn(f"({str(companion)!r}: a symbolic link, which the gateway does not follow)", message)
            self.assertEqual(stat.S_IMODE(target.stat().st_mode), 0o644)
            companion.unlink()
        os.mkfifo(self.state / "openclaw.db-shm")
        self.assertIn("openclaw.db-shm': a FIFO is in the way): move it aside", self.refused())
        (self.state / "openclaw.db-shm").unlink()
        # Its own files are made private.
        (self.state / "openclaw.db-wal").write_bytes(b"")
        (self.state / "openclaw.db-wal").chmod(0o644)
        self.assertEqual(sqlite_file(self.state), self.database)
        for name in ("openclaw.db", "openclaw.db-wal"):
            self.assertEqual(stat.S_IMODE((self.state / name).stat().st_mode), 0o600)

    def test_other_users_database(self) -> None:
        """
        A database another user made (its consumers' keys would work) is
        refused, as another user's secret file is; root's is taken.
        """
        self.assertEqual(sqlite_file(self.state, euid=os.geteuid()), self.database)
        if os.geteuid() != 0:
            message = self.refused_as(os.geteuid() + 1)
            self.assertIn(f"belongs to uid {os.geteuid()}", message)
            return
        os.chown(self.database, NOBODY, NOBODY)
        message = self.refused()
        self.assertIn(f"{str(self.database)!r} belongs to uid {NOBODY}", message)
        self.assertIn(f"move it aside, or if it is yours, chown 0 {str(self.database)!r}", message)
        os.chown(self.database, 0, 0)
        wal = self.state / "openclaw.db-wal"
        wal.write_bytes(b"")
        os.chown(wal, NOBODY, NOBODY)
        self.assertIn(f"{str(wal)!r} belongs to uid {NOBODY}", self.refused())
        os.chown(wal, 0, 0)
        self.assertEqual(sqlite_file(self.state, euid=4242), self.database)

    def refused_as(self, euid: int) -> str:
        with self.assertRaises(UnusableDatabaseFile) as caught:
            sqlite_file(self.state, euid=euid)
        return str(caught.exception)
