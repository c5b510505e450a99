"""
A secret or env file is refused when others could replace it: its
directory writable by others (sshd's StrictModes; sticky directories
excepted) or owned by another user, or a symbolic link to it owned by
another user (as C{fs.protected_symlinks} refuses to follow it).
L{openclaw.settings.check_private_file} and L{load_settings} on real
files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from openclaw.settings import ConfigError, check_private_file, load_settings


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
