"""
A DATABASE_URL libpq cannot read stops start-up with one line naming
DATABASE_URL and what is wrong, its password masked: never a traceback
(psycopg's error repeats the token it could not read, the password
included).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from openclaw.settings import ConfigError, load_settings
from tests.support import twistd_path
from tests.test_twistd import base_env

PASSWORD = "s3cr%ZZet"

#: Each unreadable URL, what the error line must say, and the secret it
#: must not.
CASES = [
    (f"postgresql://u:{PASSWORD}@127.0.0.1/db", "invalid percent-encoded token", PASSWORD),
    ("postgresql://u:hunter2-pw@127.0.0.1/db?foo=bar", 'invalid URI query parameter: "foo"', "hunter2-pw"),
    ("postgresql://u@127.0.0.1/db?password=a%ZZpw", "invalid percent-encoded token", "a%ZZpw"),
    ("postgresql://u:hunter2-pw@[::1/db", "DATABASE_URL='postgresql://u:***@[::1/db' is invalid", "hunter2-pw"),
    ("postgresql://u:hunter2-pw@db:abc/db", "DATABASE_URL='postgresql://u:***@db:abc/db' is invalid", "hunter2-pw"),
]


class DatabaseURLTests(TestCase):
    timeout = 60

    def test_unreadable_url_is_one_masked_line(self) -> None:
        cwd = Path(tempfile.mkdtemp())
        for url, expected, secret in CASES:
            with self.assertRaises(ConfigError) as caught:
                load_settings({"DATABASE_URL": url}, cwd=cwd)
            said = str(caught.exception)
            self.assertTrue(said.startswith("DATABASE_URL="), said)
            self.assertIn(expected, said)
            self.assertNotIn(secret, said)
            self.assertNotIn("\n", said)
        self.assertIn("%25", self.said(CASES[0][0]))
        self.assertIn("LIBPQ-PARAMKEYWORDS", self.said(CASES[1][0]))
        # A password that also spells parts of the URL is masked where it
        # is written, not wherever its characters appear.
        self.assertIn(
            "DATABASE_URL='postgresql://u:***@127.0.0.1:notaport/db?password=***' is invalid",
            self.said("postgresql://u:p@127.0.0.1:notaport/db?password=p"),
        )
        # A mistyped password holding /, ? or # (not percent-encoded) is
        # masked all the same.
        for password in ("se/cr3t", "se?cr3t", "se#cr3t"):
            said = self.said(f"postgresql://app:{password}@db.example:notaport/app")
            self.assertNotIn(password, said)
            self.assertNotIn("cr3t", said)
            self.assertIn("postgresql://app:***@db.example:notaport/app", said)
        good = "postgresql://u:p%40ss@127.0.0.1:5433/db?connect_timeout=3"
        self.assertEqual(load_settings({"DATABASE_URL": good}, cwd=cwd).database_url, good)

    @staticmethod
    def said(url: str) -> str:
        try:
            load_settings({"DATABASE_URL": url}, cwd=Path(tempfile.mkdtemp()))
        except ConfigError as e:
            return str(e)
        raise AssertionError(f"{url} was taken")

    @inlineCallbacks
    def test_twistd_exits_with_one_line(self) -> Any:
        """
        twistd -n openclaw with such a DATABASE_URL in its environment: a
        non-zero exit, one line on stderr, no traceback, no password.
        """
        for url, expected, secret in CASES[:2]:
            out, err, code = yield getProcessOutputAndValue(
                twistd_path(),
                ["-n", "--pidfile=", "openclaw"],
                env=base_env(DATABASE_URL=url),
                path=tempfile.mkdtemp(),
            )
            self.assertNotEqual(code, 0, err)
            lines = err.decode().strip().splitlines()
            self.assertEqual(len(lines), 1, err)
            self.assertIn("DATABASE_URL=", lines[0])
            self.assertIn(expected, lines[0])
            self.assertIn("the value came from the environment", lines[0])
            self.assertNotIn(b"Traceback", out + err)
            self.assertNotIn(secret.encode(), out + err)
