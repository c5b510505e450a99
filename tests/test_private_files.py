"""
A secret or env file is refused when others could replace it: its
directory writable by others (sshd's StrictModes; sticky directories
excepted) or owned by another user, or a symbolic link to it owned by
another user (as C{fs.protected_symlinks} refuses to follow it).
L{openclaw.settings.permissions.check_private_file} and L{load_settings} on real
files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.logger import formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from openclaw.settings import ConfigError, load_settings
from openclaw.settings.permissions import check_private_file


class SecretDirectoryTests(TestCase):
    """
    A secret or env file is refused when its directory lets others replace
    it (sshd's StrictModes), sticky directories excepted.
    """

    def setUp(self) -> None:
        self.environ: dict[str, str] = {}
        self.patch(os, "environ", self.environ)
        self.base = Path(self.mktemp()).absolute()
        self.folder = self.base / "secrets"
        self.folder.mkdir(parents=True)
        self.folder.chmod(0o700)
        self.secret = self.folder / "jwt_secret"
        self.secret.write_text("x" * 40 + "\n")
        self.secret.chmod(0o600)
        self.environ["JWT_SECRET_FILE"] = str(self.secret)

    def refused(self, **kwargs: Any) -> str:
        with self.assertRaises(ConfigError) as caught:
            load_settings(cwd=self.base, **kwargs)
        return str(caught.exception)

    def test_writable_directory(self) -> None:
        self.assertEqual(load_settings(cwd=self.base).jwt_secret, b"x" * 40)
        for mode in (0o770, 0o707, 0o777):
            self.folder.chmod(mode)
            message = self.refused()
            self.assertIn(str(self.folder), message)
            self.assertIn("chmod go-w", message)
        # Sticky, as /tmp: others cannot replace an entry they do not own.
        self.folder.chmod(0o1777)
        self.assertEqual(load_settings(cwd=self.base).jwt_secret, b"x" * 40)

    def test_link_in_writable_directory(self) -> None:
        """
        The directory a link sits in counts too: the link can be replaced.
        """
        loose = self.base / "loose"
        loose.mkdir()
        loose.chmod(0o777)
        (loose / "link").symlink_to(self.secret)
        self.environ["JWT_SECRET_FILE"] = str(loose / "link")
        self.assertIn(str(loose), self.refused())

    def test_env_file_directory(self) -> None:
        del self.environ["JWT_SECRET_FILE"]
        env_file = self.folder / "gateway.env"
        env_file.write_text("")
        env_file.chmod(0o600)
        load_settings(cwd=self.base, env_file=str(env_file))
        self.folder.chmod(0o775)
        self.assertIn("--env-file", self.refused(env_file=str(env_file)))

    def test_directory_owner(self) -> None:
        if os.geteuid() != 0:
            with self.assertRaises(ConfigError):
                check_private_file(self.secret, "f", secret=True, euid=os.geteuid() + 1)
            return
        os.chown(self.folder, 4242, -1)
        message = self.refused()
        self.assertIn("uid 4242", message)
        self.assertIn(str(self.folder), message)


class TokenDirectoryTests(SynchronousTestCase):
    """
    C{TOKEN_FILE}'s directory is held to the rule of secret files'
    directories (trial s25 F3: one made 0777 under umask 000 was taken,
    and anyone could remove the token's lock there and let a second
    gateway overwrite the first's token).
    """

    def setUp(self) -> None:
        self.environ: dict[str, str] = {}
        self.patch(os, "environ", self.environ)
        self.base = Path(self.mktemp()).absolute()
        self.run = self.base / "run"
        self.run.mkdir(parents=True)
        self.run.chmod(0o700)
        self.environ["TOKEN_FILE"] = str(self.run / "token")

    def refused(self) -> str:
        with self.assertRaises(ConfigError) as caught:
            load_settings(cwd=self.base)
        return str(caught.exception)

    def test_writable_directory(self) -> None:
        self.assertEqual(load_settings(cwd=self.base).token_file, self.run.resolve() / "token")
        for mode in (0o777, 0o770, 0o707):
            self.run.chmod(mode)
            self.assertEqual(
                self.refused(),
                f"TOKEN_FILE={str(self.run / 'token')!r} is in directory {str(self.run)!r}, which group or others "
                f"may write (mode {mode:04o}), so they could replace the file; run: chmod go-w {str(self.run)!r}, "
                "or point TOKEN_FILE at a new path in a directory of the gateway's own (such as "
                "/run/openclaw/token) (the value came from the environment)",
            )
        # Sticky, as /tmp: others can neither remove nor replace what is not theirs.
        self.run.chmod(0o1777)
        self.assertEqual(load_settings(cwd=self.base).token_file, self.run.resolve() / "token")

    def test_directory_above(self) -> None:
        self.base.chmod(0o777)
        self.addCleanup(self.base.chmod, 0o755)
        self.assertIn(f"is in directory {str(self.base)!r}, which group or others may write", self.refused())

    def test_directory_owner(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("needs root, to give a directory to another user")
        os.chown(self.run, 4242, -1)
        message = self.refused()
        self.assertIn(f"is in directory {str(self.run)!r}, which belongs to uid 4242", message)
        self.assertIn("point TOKEN_FILE at a new path", message)

    def test_foreign_link(self) -> None:
        """
        A directory reached through another user's link in a sticky one
        (which the directory rule lets be): that user chose where it points.
        """
        if os.geteuid() != 0:
            raise SkipTest("needs root, to give a link to another user (os.lchown)")
        sticky = self.base / "sticky"
        sticky.mkdir()
        sticky.chmod(0o1777)
        link = sticky / "run"
        link.symlink_to(self.run)
        os.lchown(link, 4242, 4242)
        self.environ["TOKEN_FILE"] = str(link / "token")
        message = self.refused()
        self.assertIn(f"is reached through the symbolic link {str(link)!r}, which belongs to uid 4242", message)

    def test_resolved(self) -> None:
        """
        Kept with its directory resolved (C{..} taken, links followed):
        the path it is written, locked and named at.
        """
        (self.base / "other").mkdir()
        self.environ["TOKEN_FILE"] = str(self.base / "other" / ".." / "run" / "token")
        self.assertEqual(load_settings(cwd=self.base).token_file, self.run.resolve() / "token")
        link = self.base / "link"
        link.symlink_to(self.run)
        self.environ["TOKEN_FILE"] = str(link / "token")
        self.assertEqual(load_settings(cwd=self.base).token_file, self.run.resolve() / "token")


class ForeignSymlinkTests(SynchronousTestCase):
    """
    A secret file reached through a symbolic link that another user owns
    (in a sticky directory, where the directory check lets it be) is
    refused, as C{fs.protected_symlinks} refuses to follow it.
    """

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("needs root, to give a link to another user (os.lchown)")
        self.sticky = Path(self.mktemp()).absolute()
        self.sticky.mkdir(parents=True)
        self.sticky.chmod(0o1777)
        self.secret = self.sticky / "jwt_secret"
        self.secret.write_text("x" * 40 + "\n")
        self.secret.chmod(0o600)

    def link(self, name: str, target: Path | str, uid: int) -> Path:
        link = self.sticky / name
        link.symlink_to(target)
        os.lchown(link, uid, uid)
        return link

    def test_foreign_link_refused(self) -> None:
        # /tmp/r17-secret-link -> /etc/passwd, made by uid 65534.
        link = self.link("r17-secret-link", "/etc/passwd", 65534)
        with self.assertRaises(ConfigError) as caught:
            check_private_file(link, f"JWT_SECRET_FILE={str(link)!r}", secret=True)
        message = str(caught.exception)
        self.assertIn(str(link), message)
        self.assertIn("uid 65534", message)
        # Through a directory link of another user, too.
        folder = self.link("dir-link", self.sticky, 65534)
        with self.assertRaises(ConfigError) as caught:
            check_private_file(folder / "jwt_secret", "JWT_SECRET_FILE", secret=True)
        self.assertIn(str(folder), str(caught.exception))

    def test_own_and_roots_links_accepted(self) -> None:
        for name, uid in (("mine", os.geteuid()), ("roots", 0)):
            link = self.link(name, self.secret, uid)
            self.assertIsNone(check_private_file(link, "JWT_SECRET_FILE", secret=True))
        chain = self.link("chain", self.sticky / "mine", 0)
        self.assertIsNone(check_private_file(chain, "JWT_SECRET_FILE", secret=True))
        environ = {"JWT_SECRET_FILE": str(self.link("foreign", self.secret, 65534))}
        self.patch(os, "environ", environ)
        with self.assertRaises(ConfigError):
            load_settings(cwd=self.sticky)


#: A value of each secret setting, each holding "env-file-" (never shown).
ENV_FILE_SECRETS = (
    ("JWT_SECRET", "env-file-jwt-secret-of-at-least-32-bytes"),
    ("KIMI_API_KEY", "sk-kimi-env-file-secret"),
    ("MOONSHOT_API_KEY", "sk-moonshot-env-file-secret"),
    ("GEMINI_API_KEYS", "gemini-env-file-secret-1,gemini-env-file-secret-2"),
    ("GATEWAY_API_KEYS", "gw-env-file-secret"),
    ("REDIS_URL", "redis://:redis-env-file-secret@127.0.0.1:6379/0"),
    ("DATABASE_URL", "postgresql://gw:pg-env-file-secret@127.0.0.1:5432/gw"),
)


class EnvFileSecretTests(SynchronousTestCase):
    """
    An env file that gives a secret setting (JWT_SECRET, a provider's key
    or key pool, GATEWAY_API_KEYS, a REDIS_URL or DATABASE_URL holding a
    password) is held to the rule of a secret file: a warning when group
    or others may read it (L{check_private_file}, as for JWT_SECRET_FILE),
    naming the file, the settings and the fix, never a value.  It gave
    none (daemon trial s18).
    """

    def setUp(self) -> None:
        self.environ: dict[str, str] = {"JWT_SECRET": "e" * 40}
        self.patch(os, "environ", self.environ)
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir(parents=True)
        self.env_file = self.base / "gateway.env"

    def warnings_for(self, text: str, mode: int, env_file: str | None = None) -> tuple[str, ...]:
        self.env_file.write_text(text)
        self.env_file.chmod(mode)
        return load_settings(cwd=self.base, env_file=env_file or str(self.env_file)).warnings

    def test_each_secret_setting(self) -> None:
        for name, value in ENV_FILE_SECRETS:
            (warning,) = self.warnings_for(f"DEFAULT_PROVIDER=kimi\n{name}={value}\n", 0o644)
            self.assertEqual(
                warning,
                f"env file {str(self.env_file)!r} (--env-file), which holds {name}, may be read by group or others "
                f"(mode 0644); run: chmod 600 {str(self.env_file)!r}",
            )
            self.assertNotIn("env-file-", warning)
            # Its owner's alone, or its group's too: no warning, and a warning.
            self.assertEqual(self.warnings_for(f"{name}={value}\n", 0o600), ())
            (warning,) = self.warnings_for(f"{name}={value}\n", 0o640)
            self.assertIn("(mode 0640)", warning)

    def test_every_secret_named(self) -> None:
        text = "".join(f"{name}={value}\n" for name, value in ENV_FILE_SECRETS)
        (warning,) = self.warnings_for(text, 0o604)
        self.assertIn(
            "which holds JWT_SECRET, KIMI_API_KEY, MOONSHOT_API_KEY, GEMINI_API_KEYS, GATEWAY_API_KEYS, REDIS_URL "
            "and DATABASE_URL, may be read by group or others (mode 0604)",
            warning,
        )

    def test_no_secret_no_warning(self) -> None:
        """
        Settings that are no secret, an empty key, and URLs without a
        password: a file anyone may read is fine.
        """
        text = (
            "DEFAULT_PROVIDER=kimi\nKIMI_API_KEY=\nGEMINI_MODEL=gemini-2.5-pro\nJWT_SECRET_FILE=\n"
            "REDIS_URL=redis://gw@127.0.0.1:6379/0\nDATABASE_URL=postgresql://gw@127.0.0.1:5432/gw\n"
        )
        self.assertEqual(self.warnings_for(text, 0o644), ())

    def test_dotenv_in_working_directory(self) -> None:
        dotenv = self.base / ".env"
        dotenv.write_text("GEMINI_API_KEY=gemini-env-file-secret\n")
        dotenv.chmod(0o644)
        (warning,) = load_settings(cwd=self.base).warnings
        self.assertIn(f"env file {str(dotenv)!r} (.env in the working directory), which holds GEMINI_API_KEY,", warning)
        self.assertIn(f"chmod 600 {str(dotenv)!r}", warning)


class EnvFileSecretLoggedTests(TestCase):
    def test_logged_at_startup(self) -> None:
        """
        The warning is logged when the gateway starts, as every warning
        found while reading the settings is.
        """
        from tests.support import capture_log_events, start_gateway

        environ = {"JWT_SECRET": "e" * 40}
        self.patch(os, "environ", environ)
        base = Path(self.mktemp()).absolute()
        base.mkdir(parents=True)
        env_file = base / "gateway.env"
        env_file.write_text("GATEWAY_API_KEYS=gw-env-file-secret\n")
        env_file.chmod(0o644)
        settings = load_settings(cwd=base, env_file=str(env_file))
        events = capture_log_events(self)
        start_gateway(self, warnings=settings.warnings)
        (logged,) = [e for e in events if e.get("config_warning")]
        self.assertEqual(logged["log_level"].name, "warn")
        self.assertIn("which holds GATEWAY_API_KEYS, may be read by group or others (mode 0644)", formatEvent(logged))
