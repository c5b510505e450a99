"""
openclawctl: the pure parts (arguments, token choice, formatting, exit
codes) directly, and the installed console script as a subprocess against a
real gateway on loopback, while this reactor keeps serving it.

The subprocess runs the I{installed} C{openclawctl}; after changing
C{openclaw/ctl/}, reinstall (C{pip install .}) before running these.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL.SSL import Error as SSLError
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, TimeoutError, inlineCallbacks
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from openclaw import ctl
from openclaw.files import named_uid
from openclaw.providers import BUILTIN_PROVIDERS
from openclaw.session import MAX_TOKEN_FILE_BYTES, write_token_file
from tests.support import GatewayProcess, free_port, make_unwritable, start_gateway, twistd_path, within

CTL = str(Path(sys.executable).parent / "openclawctl")

#: Only what the script needs: in particular no OPENCLAW_TOKEN from the
#: environment the tests happen to run in.
BASE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


#: Another user (nobody), for files only root can give away.
NOBODY = 65534

#: What a token file holds (three base64url segments, as a JWT): the
#: gateway's TOKEN_FILE rule takes nothing else.
TOKEN_LIKE = "eyJhbGciOiJIUzI1NiJ9.eyJqdGkiOiJ4In0.c2lnbmF0dXJl"


def run_ctl(*args: str, env: dict[str, str] | None = None) -> Any:
    """
    Run the installed console script; fire with C{(stdout, stderr, status)}
    as text.
    """
    d = getProcessOutputAndValue(CTL, args, env={**BASE_ENV, **(env or {})})
    return d.addCallback(lambda r: (r[0].decode(), r[1].decode(), r[2]))


def request(**fields: Any) -> ctl.Request:
    defaults: dict[str, Any] = dict(
        url=ctl.DEFAULT_URL, cmd="ping", data=None, token="t", token_file=None, as_json=False, timeout=10.0, cafile=None
    )
    return ctl.Request(**{**defaults, **fields})


def reply(answer: dict[str, Any], round_trip: float = 0.0123) -> ctl.Reply:
    return ctl.Reply(json.dumps(answer).encode(), round_trip)


# -- the pure functions ------------------------------------------------------


class ParseRequestTests(TestCase):
    def parse(self, *argv: str, environ: dict[str, str] | None = None) -> ctl.Request:
        return ctl.parse_request(list(argv), environ or {})

    def test_defaults(self):
        parsed = self.parse("--token", "T", "ping")
        self.assertEqual(parsed.url, "ws://127.0.0.1:18789")
        self.assertEqual((parsed.cmd, parsed.data, parsed.token), ("ping", None, "T"))
        self.assertEqual(parsed.timeout, 10.0)
        self.assertFalse(parsed.as_json)

    def test_url_from_the_environment(self):
        """
        OPENCLAW_URL is the default --url, as OPENCLAW_TOKEN is the token's
        (operator trial s41: a gateway on another port needed --url on
        every call); --url, before or after the command, beats it.
        """
        environ = {"OPENCLAW_URL": " ws://127.0.0.1:9999 "}
        self.assertEqual(self.parse("--token", "T", "ping", environ=environ).url, "ws://127.0.0.1:9999")
        for argv in (("--url", "ws://h:1", "--token", "T", "ping"), ("--token", "T", "ping", "--url", "ws://h:1")):
            self.assertEqual(self.parse(*argv, environ=environ).url, "ws://h:1")
        self.assertEqual(self.parse("--token", "T", "ping", environ={"OPENCLAW_URL": ""}).url, "ws://127.0.0.1:18789")
        with self.assertRaises(ctl.UsageError) as caught:
            self.parse("--token", "T", "ping", environ={"OPENCLAW_URL": "http://x"})
        # Named as given (review s41: "--url", which was not).
        self.assertTrue(str(caught.exception).startswith("OPENCLAW_URL 'http://x'"), str(caught.exception))

    def test_health_check_waits_longer(self):
        self.assertEqual(self.parse("--token", "T", "health-check").timeout, 30.0)
        self.assertEqual(self.parse("--token", "T", "--timeout", "2.5", "health-check").timeout, 2.5)

    def test_switch_provider_data(self):
        self.assertEqual(self.parse("--token", "T", "switch-provider", "kimi").data, {"provider": "kimi"})
        parsed = self.parse("--token", "T", "switch-provider", "kimi", "--model", "moonshot-v1-32k")
        self.assertEqual(parsed.cmd, "switch_provider")
        self.assertEqual(parsed.data, {"provider": "kimi", "model": "moonshot-v1-32k"})
        # The model as an argument too (agent trial s46: "unrecognized arguments").
        parsed = self.parse("--token", "T", "switch-provider", "gemini", "gemini-2.5-pro")
        self.assertEqual(parsed.data, {"provider": "gemini", "model": "gemini-2.5-pro"})
        parsed = self.parse("--token", "T", "switch-provider", "gemini", "gemini-2.5-pro", "--model", "gemini-2.5-pro")
        self.assertEqual(parsed.data, {"provider": "gemini", "model": "gemini-2.5-pro"})
        error = self.assertRaises(
            ctl.UsageError, self.parse, "--token", "T", "switch-provider", "gemini", "a", "--model", "b"
        )
        self.assertIn("two models given (a and --model b): give one", str(error))

    def test_options_after_the_command(self):
        """
        Connection options work after the subcommand too, and do not undo
        those given before it.
        """
        parsed = self.parse("--url", "ws://[::1]:9000", "status", "--token", "T", "--json")
        self.assertEqual((parsed.url, parsed.token, parsed.as_json), ("ws://[::1]:9000", "T", True))

    def test_options_after_a_nested_action(self):
        """
        The connection options work after every subcommand, nested actions
        included (#19 review): C{consumer list --json}.
        """
        cases = [
            (("consumer", "list"), "consumer_list"),
            (("consumer", "list", "app"), "consumer_list"),
            (("consumer", "create", "zz", "--rpm", "5"), "consumer_create"),
            (("consumer", "update", "zz", "--tpm", "none"), "consumer_update"),
            (("consumer", "delete", "zz"), "consumer_delete"),
            (("key", "create", "rb"), "key_create"),
            (("key", "revoke", "rb", "abcdefgh"), "key_revoke"),
            (("usage", "--name", "rb"), "usage"),
        ]
        for words, cmd in cases:
            parsed = self.parse(*words, "--json", "--url", "ws://[::1]:9000", "--token", "T", "--timeout", "3")
            self.assertEqual(
                (parsed.cmd, parsed.as_json, parsed.url, parsed.token, parsed.timeout),
                (cmd, True, "ws://[::1]:9000", "T", 3.0),
                words,
            )
            # Before the command, between the command and its action, after.
            parsed = self.parse("--json", words[0], "--url", "ws://[::1]:9000", *words[1:], "--token", "T")
            self.assertEqual(
                (parsed.cmd, parsed.as_json, parsed.url, parsed.token), (cmd, True, "ws://[::1]:9000", "T")
            )

    def test_clearing_limits(self):
        """
        C{none} clears rpm, tpm, budget and expiry; C{--model '*'} (or
        none) lifts the model restriction: each is sent as null.
        """
        parsed = self.parse(
            "--token", "T", "consumer", "update", "app2", "--rpm", "none", "--tpm", "None",
            "--budget-usd", "none", "--expires-at", "none", "--model", "*",
        )  # fmt: skip
        self.assertEqual(
            parsed.data,
            {"name": "app2", "rpm": None, "tpm": None, "budget_usd": None, "expires_at": None, "models": None},
        )
        parsed = self.parse("--token", "T", "consumer", "update", "app2", "--model", "none", "--rpm", "7")
        self.assertEqual(parsed.data, {"name": "app2", "models": None, "rpm": 7})
        self.assertRaises(
            ctl.UsageError,
            self.parse,
            "--token", "T", "consumer", "update", "app2", "--model", "*", "--model", "kimi/*",
        )  # fmt: skip
        for bad in (("--tpm", "0"), ("--rpm", "-1"), ("--rpm", "lots"), ("--budget-usd", "-2")):
            stderr = io.StringIO()
            self.patch(sys, "stderr", stderr)
            exited = self.assertRaises(SystemExit, self.parse, "--token", "T", "consumer", "update", "a", *bad)
            self.assertEqual(exited.code, 2)
            self.assertIn("none", stderr.getvalue())

    def test_budget_bounds(self):
        """
        --budget-usd from 0 to 1e9: -0 (listed as -0.0), 1e308, nan and
        inf are refused before anything is sent.
        """
        for bad in ("-0", "-0.0", "1e308", "1000000001", "nan", "inf"):
            stderr = io.StringIO()
            self.patch(sys, "stderr", stderr)
            exited = self.assertRaises(
                SystemExit, self.parse, "--token", "T", "consumer", "create", "a", "--budget-usd", bad
            )
            self.assertEqual(exited.code, 2)
            self.assertIn(f"'{bad}': give a number of US dollars from 0 to 1000000000", stderr.getvalue())
        for good, sent in (("0", 0.0), ("1e9", 1e9), ("12.5", 12.5), ("0.000001", 0.000001)):
            parsed = self.parse("--token", "T", "consumer", "create", "a", "--budget-usd", good)
            self.assertEqual(parsed.data, {"name": "a", "budget_usd": sent})
        # Not 0, yet below one millionth of a dollar (prices are per million tokens).
        for tiny in ("1e-320", "0.00000099"):
            stderr = io.StringIO()
            self.patch(sys, "stderr", stderr)
            exited = self.assertRaises(
                SystemExit, self.parse, "--token", "T", "consumer", "create", "a", "--budget-usd", tiny
            )
            self.assertEqual(exited.code, 2)
            self.assertIn(f"'{tiny}': the smallest budget is 0.000001 US dollars", stderr.getvalue())

    def test_rate_bounds(self):
        """
        --rpm and --tpm past their maximum are refused naming it.
        """
        for option in ("--rpm", "--tpm"):
            stderr = io.StringIO()
            self.patch(sys, "stderr", stderr)
            exited = self.assertRaises(
                SystemExit, self.parse, "--token", "T", "consumer", "create", "a", option, "99999999999999999999999"
            )
            self.assertEqual(exited.code, 2)
            self.assertIn("give a whole number from 1 to 1000000000000, or none", stderr.getvalue())
            parsed = self.parse("--token", "T", "consumer", "create", "a", option, "1000000000000")
            self.assertEqual(parsed.data, {"name": "a", option[2:]: 10**12})

    def test_numbers_as_people_write_them(self):
        """
        --rpm, --tpm, --budget-usd and --timeout refuse what Python's int
        and float take but no one means (recheck s41: 1_0 was 10, and
        other scripts' digits were taken), as the settings do.
        """
        for option, bad in (
            ("--rpm", "1_0"),
            ("--tpm", "\uff11\u0660"),
            ("--budget-usd", "1_0.5"),
            ("--budget-usd", "\u0661"),
        ):
            stderr = io.StringIO()
            self.patch(sys, "stderr", stderr)
            exited = self.assertRaises(SystemExit, self.parse, "--token", "T", "consumer", "create", "a", option, bad)
            self.assertEqual(exited.code, 2, (option, bad))
            # Why, as the settings say it (review s41: only the range).
            self.assertIn("without '_'" if "_" in bad else "in ASCII digits", stderr.getvalue())
        for bad in ("1_0", "\u0661\u0660"):
            stderr = io.StringIO()
            self.patch(sys, "stderr", stderr)
            exited = self.assertRaises(SystemExit, self.parse, "--token", "T", "--timeout", bad, "ping")
            self.assertEqual(exited.code, 2, bad)
            self.assertIn("without '_'" if "_" in bad else "in ASCII digits", stderr.getvalue())

    def test_tiny_spend_shows(self):
        """
        consumer list shows a tiny spend, not 0.0000, as a plain decimal (no exponent).
        """
        consumer = {"name": "a", "budget_usd": None, "budget_period": "month", "rpm": None, "tpm": None,
                    "models": [], "expires_at": None, "keys": [], "spent_usd": 0.0000032}  # fmt: skip
        self.assertRegex(ctl.format_consumers({"consumers": [consumer]}), r"\na +- +0\.0000032 +- +- +\*")

    def test_unsaved_revoke_shown(self):
        """
        A key whose revoke the database has not taken yet is shown as
        such, in the list and in the revoke's own line (it is refused by
        the gateway, but a restart would serve it again).
        """
        consumer = {"name": "a", "budget_usd": None, "budget_period": "month", "rpm": None, "tpm": None,
                    "models": [], "expires_at": None, "keys": [{"prefix": "Keep0001"}], "spent_usd": 0,
                    "revokes_unsaved": ["Gone0001"]}  # fmt: skip
        self.assertRegex(ctl.format_consumers({"consumers": [consumer]}), r"Keep0001,Gone0001\(revoke unsaved\)$")
        shown = ctl.format_consumers({"name": "a", "revoked": "Gone0001", "keys_left": 1, "saved": False})
        self.assertEqual(
            shown, "revoked a's key ock-Gone0001... (refused by this gateway, not saved yet: see the warning); 1 left"
        )
        shown = ctl.format_consumers({"name": "a", "revoked": "Gone0001", "keys_left": 1, "saved": True})
        self.assertEqual(shown, "revoked a's key ock-Gone0001...; 1 left")

    def test_reserved_shown_when_any(self):
        """
        consumer list shows what calls in flight hold (a RESERVED column)
        when some consumer's do, and no such column otherwise (trial s27:
        a dead instance's reservations locked a consumer out and the list
        showed nothing).
        """
        consumer = {"name": "a", "budget_usd": 0.0001, "budget_period": "day", "rpm": None, "tpm": 1000,
                    "models": [], "expires_at": None, "keys": [], "spent_usd": 0.00002}  # fmt: skip
        held = {**consumer, "name": "crash", "reserved_usd": 0.0002, "reserved_tokens": 1010}
        table = ctl.format_consumers({"consumers": [consumer, held]})
        self.assertRegex(table, r"^NAME +BUDGET +SPENT +RESERVED +RPM +TPM ")
        self.assertRegex(table, r"\ncrash +0\.0001/day +0\.00002 +0\.0002 USD, 1010 tokens +- +1000 ")
        self.assertRegex(table, r"\na +0\.0001/day +0\.00002 +- +- +1000 ")
        self.assertNotIn("RESERVED", ctl.format_consumers({"consumers": [consumer]}))
        # A consumer too long for an answer alone is named below the table.
        table = ctl.format_consumers({"consumers": [consumer], "too_long": ["big", "bigger"]})
        self.assertTrue(
            table.endswith(
                "\nnot listed, each longer than MAX_MESSAGE_BYTES allows alone: big, bigger (raise the gateway's "
                "MAX_MESSAGE_BYTES to see them)"
            ),
            table,
        )

    def test_budget_shown_as_set(self):
        """
        A budget shows as it was set (no rounding, no exponent); a spend
        shows alike in consumer list and usage (6 significant digits).
        """
        consumer = {"name": "a", "budget_usd": 12345678.123456789, "budget_period": "month", "rpm": None,
                    "tpm": None, "models": [], "expires_at": None, "keys": [], "spent_usd": 0.00000094}  # fmt: skip
        table = ctl.format_consumers({"consumers": [consumer]})
        self.assertRegex(table, r"\na +12345678\.12345679/month +0\.00000094 ")
        self.assertIn(
            "0.123456789/day",
            ctl.format_consumers({"consumers": [{**consumer, "budget_usd": 0.123456789, "budget_period": "day"}]}),
        )
        # A budget an earlier version took, below the smallest: bounded, with its exponent.
        tiny = ctl.format_consumers({"consumers": [{**consumer, "budget_usd": 1e-320}]})
        self.assertRegex(tiny, r"\na +1e-320/month +0\.00000094 ")
        self.assertLess(max(len(line) for line in tiny.splitlines()), 80)
        self.assertEqual(ctl.usd(0.00000094), "0.00000094")
        self.assertEqual(ctl.usd(1.3e-05), "0.000013")
        self.assertEqual(
            (ctl.usd(12345.678), ctl.usd(123456.78), ctl.usd(999.1234567)), ("12345.68", "123456.78", "999.123")
        )

    def test_token_precedence(self):
        token_file = Path(self.mktemp())
        token_file.write_text("from.the.file\n")
        environ = {"OPENCLAW_TOKEN": "from-env"}
        self.assertEqual(ctl.choose_token("flag", token_file, environ), "flag")
        self.assertEqual(ctl.choose_token(None, token_file, environ), "from.the.file")
        self.assertEqual(ctl.choose_token(None, None, environ), "from-env")

    def test_no_token(self):
        error = self.assertRaises(ctl.UsageError, ctl.choose_token, None, None, {"OPENCLAW_TOKEN": " "})
        for way in ("--token", "--token-file", "OPENCLAW_TOKEN"):
            self.assertIn(way, str(error))

    def test_token_file_holding_no_token(self):
        """
        A file that is no token file (an env file named by mistake) is
        refused before anything is sent: its secrets would go to whatever
        --url names (ops trial s36).
        """
        env_file = Path(self.mktemp())
        env_file.write_text("KIMI_API_KEY=sk-secret-0123456789\nGATEWAY_API_KEYS=client-key\n")
        error = self.assertRaises(ctl.UsageError, ctl.choose_token, None, env_file, {})
        self.assertIn("does not hold a session token", str(error))
        self.assertIn("nothing was sent", str(error))
        self.assertNotIn("sk-secret", str(error))

    def test_unreadable_or_empty_token_file(self):
        """
        A named token file that cannot be used is an error, not a reason to
        fall back to the environment.
        """
        missing = Path(self.mktemp())
        error = self.assertRaises(ctl.UsageError, ctl.choose_token, None, missing, {"OPENCLAW_TOKEN": "x"})
        self.assertIn(str(missing), str(error))
        self.assertIn("No such file", str(error))
        empty = Path(self.mktemp())
        empty.write_text("\n")
        error = self.assertRaises(ctl.UsageError, ctl.choose_token, None, empty, {})
        self.assertIn("empty", str(error))
        self.assertIn("pass --token TOKEN", str(error))

    def test_token_file_too_large(self):
        """
        A file too large for a token is refused unread, as the gateway
        reads its TOKEN_FILE (a FIFO and /dev/zero: L{TokenFileReadingTests},
        in a process of their own).  A link to a token is followed.
        """
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        huge = directory / "huge"
        huge.write_bytes(b"t" * (MAX_TOKEN_FILE_BYTES + 1))
        error = self.assertRaises(ctl.UsageError, ctl.choose_token, None, huge, {"OPENCLAW_TOKEN": "x"})
        self.assertEqual(
            str(error),
            f"cannot read the token file {huge}: it holds {MAX_TOKEN_FILE_BYTES + 1} bytes, more than the "
            f"{MAX_TOKEN_FILE_BYTES} it may; the gateway writes it when started with TOKEN_FILE / --token-file",
        )
        (directory / "token").write_text(f"{TOKEN_LIKE}\n")
        (directory / "link").symlink_to("token")
        self.assertEqual(ctl.choose_token(None, directory / "link", {}), TOKEN_LIKE)

    def test_token_file_others_may_read(self):
        """
        A token file group or others may read or write is read all the
        same, with one warning saying so and to chmod 600 it, in the
        gateway's words for its secret files (trial s31: a 0666 token file
        was read without a word); a private one (0600, 0400) gets none,
        nor does a file that cannot be looked at.  Links are followed:
        the file read is judged.
        """
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        token_file = directory / "token"
        token_file.write_text(f"{TOKEN_LIKE}\n")
        (directory / "link").symlink_to("token")
        for mode, may in ((0o666, "read and written"), (0o644, "read"), (0o640, "read"), (0o620, "written")):
            token_file.chmod(mode)
            for named in (token_file, directory / "link"):
                parsed = self.parse("--token-file", str(named), "ping")
                self.assertEqual(parsed.token, TOKEN_LIKE)
                self.assertEqual(
                    parsed.warnings,
                    (
                        f"the token file {named} may be {may} by group or others (mode {mode:04o}); run: "
                        f"chmod 600 {str(named)!r}",
                    ),
                )
        for mode in (0o600, 0o400):
            token_file.chmod(mode)
            self.assertEqual(self.parse("--token-file", str(token_file), "ping").warnings, ())
        self.assertEqual(self.parse("--token", "T", "ping").warnings, ())
        self.assertIsNone(ctl.token_file_warning(directory / "missing"))

    def test_rotation_refused_when_the_token_cannot_be_saved(self):
        nowhere = Path(self.mktemp()) / "missing-directory" / "token"
        error = self.assertRaises(
            ctl.UsageError, self.parse, "--token", "T", "rotate-token", "--token-file", str(nowhere)
        )
        self.assertIn("nothing was rotated", str(error))

    def refused_rotation(self, token_file: Path) -> str:
        """
        The one-line error of C{rotate-token --token-file token_file}
        refused before anything was sent.
        """
        error = self.assertRaises(
            ctl.UsageError, self.parse, "--token", "T", "rotate-token", "--token-file", str(token_file)
        )
        text = str(error)
        self.assertNotIn("\n", text)
        self.assertTrue(text.startswith(f"cannot write the new token to {token_file}: "), text)
        self.assertTrue(text.endswith("; nothing was rotated"), text)
        return text

    def test_rotation_refused_for_what_cannot_be_replaced(self):
        """
        A directory, a FIFO or a symbolic link at the token file's path:
        the new token could not be written there (a directory), or would
        replace something that is no token file; refused before rotating.
        """
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        (directory / "sub").mkdir()
        self.assertIn("it is a directory; give the path of a file", self.refused_rotation(directory / "sub"))
        os.mkfifo(directory / "fifo")
        self.assertIn("it is a FIFO, not a regular file", self.refused_rotation(directory / "fifo"))
        (directory / "target").write_text(f"{TOKEN_LIKE}\n")
        (directory / "link").symlink_to("target")
        text = self.refused_rotation(directory / "link")
        self.assertIn("it is a symbolic link", text)
        self.assertIn(str((directory / "target").resolve()), text)
        # A regular file holding a token (blanks around it too, as
        # --token-file reads it: a file written by hand), an empty one, or
        # none yet: accepted.
        (directory / "empty").touch()
        (directory / "spaced").write_bytes(f"  {TOKEN_LIKE} \r\n".encode())
        # And a UTF-8 byte order mark first, as Notepad writes it (recheck s47).
        (directory / "bom").write_bytes(f"\ufeff{TOKEN_LIKE}\r\n".encode())
        for name in ("target", "empty", "new", "spaced", "bom"):
            parsed = self.parse("--token", "T", "rotate-token", "--token-file", str(directory / name))
            self.assertEqual(parsed.token_file, directory / name)

    def test_rotation_refused_for_a_file_that_holds_no_token(self):
        """
        A regular file holding anything but a token (a shell profile given
        by mistake, a token with a comment, a bare newline): refused by the
        gateway's own rule for an existing TOKEN_FILE, before rotating, and
        left as it was.
        """
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        for name, content in (
            ("bashrc", "export PATH=$HOME/bin:$PATH\n"),
            ("commented", f"{TOKEN_LIKE}\n# rotated monday\n"),
            ("newline", "\n"),
        ):
            (directory / name).write_text(content)
            text = self.refused_rotation(directory / name)
            self.assertIn(
                "it holds something other than a session token, and only a token file (empty, or one token) is "
                "replaced, as the gateway does with its TOKEN_FILE",
                text,
            )
            self.assertEqual((directory / name).read_text(), content)

    def test_rotation_refused_in_a_directory_not_writable(self):
        locked = Path(self.mktemp())
        locked.mkdir(parents=True)
        make_unwritable(self, locked)
        text = self.refused_rotation(locked / "token")
        self.assertIn(f"this user may not create files in {locked}", text)

    def test_rotation_refused_for_another_users_file(self):
        """
        A token file of another user's is replaced only by root, who gives
        the new one the same owner: a user that is not root would make it
        its own, mode 0600, which the owner (a gateway, for its TOKEN_FILE)
        could no longer read (trial s18 F1).  So, sticky directory (/tmp,
        where rename(2) would refuse too) or not, refused before rotating.
        The user is made another here, so that the test means the same run
        as root.
        """
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        (directory / "token").write_text(f"{TOKEN_LIKE}\n")
        owner = os.stat(directory / "token").st_uid
        someone_else = os.geteuid() + 1
        self.patch(os, "geteuid", lambda: someone_else)
        for mode in (0o1777, 0o777):
            directory.chmod(mode)
            self.assertIn(
                f"it belongs to uid {owner}, and this user (uid {someone_else}) cannot give the new file to uid "
                f"{owner}, who could then no longer read it (a gateway, its TOKEN_FILE); run openclawctl as uid "
                f"{owner} or root, or leave out --token-file: the new token is printed, and a gateway rewrites "
                "its own TOKEN_FILE itself",
                self.refused_rotation(directory / "token"),
            )
        # A file of its own, or none yet: accepted.
        self.parse("--token", "T", "rotate-token", "--token-file", str(directory / "new"))
        self.patch(os, "geteuid", lambda: owner)
        self.parse("--token", "T", "rotate-token", "--token-file", str(directory / "token"))

    def test_bad_url_and_cafile(self):
        error = self.assertRaises(ctl.UsageError, self.parse, "--token", "T", "--url", "http://host", "ping")
        self.assertIn("ws://", str(error))
        error = self.assertRaises(ctl.UsageError, self.parse, "--token", "T", "--cafile", "ca.pem", "ping")
        self.assertIn("wss://", str(error))

    def test_malformed_command_lines_exit_2(self):
        self.patch(sys, "stderr", io.StringIO())
        for argv in (
            [],
            ["fly"],
            ["switch-provider"],
            ["--timeout", "0", "ping"],
            ["--timeout", "soon", "ping"],
            ["ping", "extra"],
        ):
            error = self.assertRaises(SystemExit, self.parse, "--token", "T", *argv)
            self.assertEqual(error.code, 2, argv)

    def test_value_starting_with_a_dash(self):
        """
        A key prefix or a consumer's name starting with '-' is read as an
        option, and its positional argument is missing: the error says to
        put -- before it, which works.
        """
        for argv, value in (
            (["key", "revoke", "dash", "-twEc6RY"], "-twEc6RY"),
            (["consumer", "delete", "-team"], "-team"),
        ):
            stderr = io.StringIO()
            self.patch(sys, "stderr", stderr)
            error = self.assertRaises(SystemExit, self.parse, "--token", "T", *argv)
            self.assertEqual(error.code, 2)
            said = stderr.getvalue()
            self.assertIn("the following arguments are required", said)
            self.assertIn(
                f"put -- before it, after every option: openclawctl {' '.join(argv[:2])} ... -- {value}", said
            )
            given = self.parse("--token", "T", *argv[:-1], "--", value)
            self.assertIn(value, given.data.values())
        # Another missing argument, no value with a dash: no such hint.
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        self.assertRaises(SystemExit, self.parse, "--token", "T", "key", "revoke", "dash")
        self.assertIn("required: key_prefix\n", stderr.getvalue())

    def test_message(self):
        self.assertEqual(json.loads(request(token="T").message()), {"token": "T", "cmd": "ping"})
        switch = request(cmd="switch_provider", data={"provider": "kimi"})
        self.assertEqual(json.loads(switch.message())["data"], {"provider": "kimi"})

    def test_token_kept_out_of_repr(self):
        self.assertNotIn("secret-token", repr(request(token="secret-token")))


class MistypedCommandTests(TestCase):
    """
    The installed script, given a command (or a command's action) that is
    not one but close to one: one line naming the one it likely meant,
    exit status 2.
    """

    @inlineCallbacks
    def test_names_the_likely_command(self):
        for argv, line in (
            (["helth-check"], "openclawctl: error: unknown command 'helth-check'; did you mean 'health-check'?\n"),
            (["stauts"], "openclawctl: error: unknown command 'stauts'; did you mean 'status'?\n"),
            (["helth_check"], "openclawctl: error: unknown command 'helth_check'; did you mean 'health_check'?\n"),
            (
                ["--url", "ws://127.0.0.1:9", "rotate-tokn"],
                "openclawctl: error: unknown command 'rotate-tokn'; did you mean 'rotate-token'?\n",
            ),
            (["consumer", "lst"], "openclawctl consumer: error: unknown action 'lst'; did you mean 'list'?\n"),
            # In any case; the README's spelling unless the word has a "_".
            (["PING"], "openclawctl: error: unknown command 'PING'; did you mean 'ping'?\n"),
            (["HEALTH-CHECK"], "openclawctl: error: unknown command 'HEALTH-CHECK'; did you mean 'health-check'?\n"),
            (["consumer", "LIST"], "openclawctl consumer: error: unknown action 'LIST'; did you mean 'list'?\n"),
            (["healthcheck"], "openclawctl: error: unknown command 'healthcheck'; did you mean 'health-check'?\n"),
            (["rotate"], "openclawctl: error: unknown command 'rotate'; did you mean 'rotate-token'?\n"),
        ):
            out, err, code = yield run_ctl("--token", "T", *argv)
            self.assertEqual((out, err, code), ("", line, 2), argv)

    @inlineCallbacks
    def test_other_usage_errors_unchanged(self):
        """
        No command close to the word, or another error: argparse's usage
        and message, as before.
        """
        for argv, said in (
            (["xyzzy"], "openclawctl: error: argument COMMAND: invalid choice: 'xyzzy' (choose from 'ping', "),
            ([], "openclawctl: error: the following arguments are required: COMMAND\n"),
            (["--token-file", "statu"], "openclawctl: error: the following arguments are required: COMMAND\n"),
            (["ping", "extra"], "openclawctl: error: unrecognized arguments: extra\n"),
        ):
            out, err, code = yield run_ctl("--token", "T", *argv)
            self.assertEqual((out, code), ("", 2), argv)
            self.assertTrue(err.startswith("usage: openclawctl"), err)
            self.assertIn(said, err)


HEALTH = {
    "active": "gemini",
    "checked_at": "2026-11-25T03:00:00Z",
    "providers": {
        "kimi": {
            "ok": False,
            "latency_ms": None,
            "status": None,
            "models": None,
            "active_model_available": None,
            "error": "KIMI_API_KEY is not set",
        },
        "gemini": {"ok": True, "latency_ms": 84.2, "status": 200, "models": 51, "active_model_available": True},
    },
}


class FormattingTests(TestCase):
    def test_ping(self):
        self.assertEqual(ctl.format_ping({"pong": True}, 0.0123), "pong (12 ms round trip)")
        self.assertEqual(ctl.format_ping({"pong": True}, 0.0008), "pong (0.8 ms round trip)")

    def test_duration(self):
        self.assertEqual(ctl.format_duration(12.34), "12.3s")
        self.assertEqual(ctl.format_duration(3723.4), "1h 2m 3s")
        self.assertEqual(ctl.format_duration(90061), "1d 1h 1m 1s")

    def test_status_aligned(self):
        text = ctl.format_status(
            {"provider": "Google Gemini", "provider_id": "gemini", "uptime": 3723.4, "connections": 1, "x": None}
        )
        self.assertEqual(
            text.splitlines(),
            [
                "provider:    Google Gemini",
                "provider_id: gemini",
                "uptime:      1h 2m 3s",
                "connections: 1",
                "x:           -",
            ],
        )

    def test_switch(self):
        self.assertEqual(
            ctl.format_switch({"previous": "gemini", "active": "kimi", "model": "moonshot-v1-8k"}),
            "gemini -> kimi (moonshot-v1-8k)",
        )

    def test_health(self):
        self.assertEqual(
            ctl.format_health(HEALTH).splitlines(),
            [
                "kimi             FAILED  -      -          KIMI_API_KEY is not set",
                "gemini (active)  ok      84 ms  51 models  active model available",
            ],
        )

    def test_health_model_gone(self):
        entry = {**HEALTH["providers"]["gemini"], "active_model_available": False}
        text = ctl.format_health({"active": "kimi", "providers": {"gemini": entry}})
        self.assertIn("default model NOT LISTED", text)

    def test_health_key_out_of_use(self):
        keys = {"ab12cd34": "set_aside", "9f8e7d6c": "ok", "01234567": "resting"}
        entry = {**HEALTH["providers"]["gemini"], "keys": keys}
        text = ctl.format_health({"active": "gemini", "providers": {"gemini": entry}})
        self.assertTrue(
            text.endswith("active model available; keys 1/3 usable (ab12cd34 set_aside, 01234567 resting)"), text
        )
        entry = {**HEALTH["providers"]["gemini"], "keys": {"9f8e7d6c": "ok"}}
        self.assertNotIn("keys", ctl.format_health({"active": "gemini", "providers": {"gemini": entry}}))

    def test_health_stalled_probe(self):
        """
        A probe the gateway's stall held up (its C{stalled_s}): a note on
        that provider's row only; the other rows as they were.
        """
        entry = {**HEALTH["providers"]["gemini"], "latency_ms": 63210.4, "stalled_s": 58.2}
        self.assertEqual(
            ctl.format_health({**HEALTH, "providers": {**HEALTH["providers"], "gemini": entry}}).splitlines(),
            [
                "kimi             FAILED  -         -          KIMI_API_KEY is not set",
                "gemini (active)  ok      63210 ms  51 models  active model available; the gateway stood still 58.2 s "
                "or more during the probe, counted in its latency",
            ],
        )
        failed = {**HEALTH["providers"]["kimi"], "stalled_s": 61}
        text = ctl.format_health({"active": "gemini", "providers": {"kimi": failed}})
        self.assertTrue(
            text.endswith(
                "KIMI_API_KEY is not set; the gateway stood still 61.0 s or more during the "
                "probe, counted in its latency"
            ),
            text,
        )

    def test_rotation(self):
        result = {"token": "NEW", "jti": "J", "expires": "E"}
        self.assertIn("new token: NEW", ctl.format_rotation(result, None))
        saved = ctl.format_rotation(result, Path("/run/tok"))
        self.assertIn("written to /run/tok", saved)
        self.assertNotIn("NEW", saved)


class PrintableTests(TestCase):
    """
    What the server sends is printed without its control characters and
    at a bounded length.
    """

    def test_controls_escaped(self):
        self.assertEqual(
            ctl.printable("\x1b[31mRED\x1b]0;title\x07 a\tb\nc\x7f\x9bd é ✓"),
            "\\x1b[31mRED\\x1b]0;title\\x07 a\\tb\\nc\\x7f\\x9bd é ✓",
        )
        self.assertEqual(ctl.printable("retry in 300 s"), "retry in 300 s")

    def test_format_characters_escaped(self):
        """
        Characters that reorder or hide text on a terminal (Unicode format
        characters: bidirectional overrides, zero-width ones) are shown as
        escapes too, in text and in --json output, which stays the same JSON.
        """
        self.assertEqual(ctl.printable("ok\u202etxt.exe\u200b\u2066", None), "ok\\u202etxt.exe\\u200b\\u2066")
        self.assertEqual(ctl.printable("\ud800"), "\\ud800")
        answer = json.dumps({"error": "a\u202eb\x9b\U000e0001c"}, ensure_ascii=False)
        shown = ctl.printable_json(answer)
        self.assertEqual(shown, '{"error": "a\\u202eb\\u009b\\udb40\\udc01c"}')
        self.assertEqual(json.loads(shown), json.loads(answer))
        pretty = json.dumps({"a": [1, 2]}, indent=2)
        self.assertEqual(ctl.printable_json(pretty), pretty)
        # A CR between tokens is left out; the JSON is the same.
        self.assertEqual(ctl.printable_json('{"a": 1,\r\n"b": "\\r"}'), '{"a": 1,\n"b": "\\r"}')
        # An answer in UTF-16 (which json.loads takes) is not the gateway's.
        with self.assertRaises(ValueError):
            ctl.decode_answer(json.dumps({"ok": True, "result": {}}).encode("utf-16"))

    def test_length_capped(self):
        self.assertEqual(ctl.printable("A" * 20000), "A" * ctl.PRINTED_MAX + "…")
        self.assertEqual(ctl.printable("A" * ctl.PRINTED_MAX), "A" * ctl.PRINTED_MAX)
        # An escape is never cut in half.
        self.assertEqual(ctl.printable("A" * (ctl.PRINTED_MAX - 2) + "\x1b"), "A" * (ctl.PRINTED_MAX - 2) + "…")
        self.assertEqual(ctl.printable("\x1b" * 100, None), "\\x1b" * 100)


class RenderTests(TestCase):
    def test_ok_is_0(self):
        answer = {"ok": True, "cmd": "ping", "result": {"pong": True, "ts": 1}}
        report = ctl.render(request(), reply(answer), answer)
        self.assertEqual(report, ctl.Report("pong (12 ms round trip)\n", "", 0))

    def test_refused_is_1_with_a_hint(self):
        answer = {"ok": False, "cmd": "ping", "error": "token revoked"}
        report = ctl.render(request(), reply(answer), answer)
        self.assertEqual((report.code, report.stdout), (1, ""))
        self.assertTrue(report.stderr.startswith("openclawctl: ping failed: token revoked ("), report.stderr)
        self.assertIn("current one", report.stderr)
        # In a cluster the usual cause is the token's renewal.
        self.assertIn("renewal", report.stderr)

    def test_rotation_superseded_leaves_the_newer_token(self):
        """
        A token file read for the rotation that holds neither the token
        presented nor the new one by the time the answer comes was rewritten
        by the gateway with a newer token (another rotation, a cluster's
        renewal): left as it is, with a note; it was overwritten with the
        rotation's token, already replaced.  Given by --token, the file is
        written whatever it held.
        """
        token_file = Path(self.mktemp())
        token_file.parent.mkdir(parents=True, exist_ok=True)
        write_token_file(token_file, "newer")
        # A new token is a JWT's three segments (check_answer).
        answer = {"ok": True, "cmd": "rotate_token", "result": {"token": "x.y.rotated", "jti": "j", "expires": "e"}}
        rotation = request(cmd="rotate_token", token="presented", token_file=token_file, token_from_file=True)
        report = ctl.conclude(rotation, reply(answer))
        self.assertEqual(token_file.read_text(), "newer\n")
        self.assertEqual(report.code, 0)
        self.assertIn("was rewritten since with a newer token", report.stderr)
        write_token_file(token_file, "presented")
        report = ctl.conclude(rotation, reply(answer))
        self.assertEqual((token_file.read_text(), report.stderr), ("x.y.rotated\n", ""))
        # Read for the rotation as written by hand (CRLF): it held the
        # token presented, so it is rewritten.
        token_file.write_bytes(b"presented\r\n")
        report = ctl.conclude(rotation, reply(answer))
        self.assertEqual((token_file.read_text(), report.stderr), ("x.y.rotated\n", ""))
        write_token_file(token_file, "another")
        report = ctl.conclude(request(cmd="rotate_token", token="given", token_file=token_file), reply(answer))
        self.assertEqual((token_file.read_text(), report.stderr), ("x.y.rotated\n", ""))

    def test_json_passes_the_answer_through(self):
        answer = {"ok": False, "cmd": "status", "error": "invalid token"}
        raw = reply(answer)
        report = ctl.render(request(cmd="status", as_json=True), raw, answer)
        self.assertEqual(report.stdout, raw.payload.decode() + "\n")
        self.assertIn("invalid token", report.stderr)
        self.assertEqual(report.code, 1)

    def test_what_the_gateway_says_is_printable(self):
        """
        Control characters in an error, a warning or a formatted answer
        are shown escaped (an error or warning also capped); with --json
        the answer stays the same JSON, DEL and C1 escaped as JSON does.
        """
        answer = {"ok": False, "cmd": "status", "error": "\x1b]0;pwned\x07" + "x" * 2000}
        report = ctl.render(request(cmd="status"), reply(answer), answer)
        self.assertEqual(
            report.stderr, "openclawctl: status failed: \\x1b]0;pwned\\x07" + "x" * (ctl.PRINTED_MAX - 16) + "…\n"
        )
        result = {"active": "kimi\x1b[2J", "note": "a\nb", "warning": "\x9b31m" + "w" * 2000}
        answer = {"ok": True, "cmd": "status", "result": result}
        report = ctl.render(request(cmd="status"), reply(answer), answer)
        self.assertEqual(report.stdout, "active:  kimi\\x1b[2J\nnote:    a\\nb\nwarning: \\x9b31m" + "w" * 2000 + "\n")
        self.assertEqual(report.stderr, "openclawctl: warning: \\x9b31m" + "w" * (ctl.PRINTED_MAX - 7) + "…\n")
        raw = ctl.Reply(json.dumps(answer, ensure_ascii=False).encode(), 0.0)
        report = ctl.render(request(cmd="status", as_json=True), raw, answer)
        self.assertNotIn("\x9b", report.stdout)
        self.assertNotIn("\x1b", report.stdout)
        self.assertEqual(json.loads(report.stdout), answer)

    def test_warning_goes_to_stderr(self):
        result = {"previous": "gemini", "active": "kimi", "model": "m", "warning": "KIMI_API_KEY is not set"}
        answer = {"ok": True, "cmd": "switch_provider", "result": result}
        report = ctl.render(request(cmd="switch_provider"), reply(answer), answer)
        self.assertEqual(
            report, ctl.Report("gemini -> kimi (m)\n", "openclawctl: warning: KIMI_API_KEY is not set\n", 0)
        )

    def test_failed_save_shows_the_token(self):
        """
        The rotation happened but the file could not be written: the new
        token is still shown, and the status is 1.
        """
        answer = {"ok": True, "cmd": "rotate_token", "result": {"token": "NEW", "jti": "J", "expires": "E"}}
        report = ctl.render(request(cmd="rotate_token"), reply(answer), answer, save_error="could not write")
        self.assertIn("new token: NEW", report.stdout)
        self.assertEqual((report.stderr, report.code), ("could not write\n", 1))

    def test_decode_answer(self):
        self.assertEqual(ctl.decode_answer(b'{"ok":true,"cmd":"ping","result":{}}')["ok"], True)
        for payload in (b"<html>", b"[]", b'{"ok":"yes"}', b'{"ok":true}'):
            self.assertRaises(ValueError, ctl.decode_answer, payload)


class ExplainFailureTests(TestCase):
    def explain(self, error: BaseException, **fields: Any) -> str:
        return ctl.explain_failure(error, request(**fields))

    def test_refused(self):
        text = self.explain(ConnectionRefusedError(), url="ws://127.0.0.1:1")
        self.assertIn("ws://127.0.0.1:1", text)
        self.assertIn("WS_CONTROL_PORT", text)

    def test_policy_violation(self):
        text = self.explain(ctl.ConnectionClosed(1008, "peer address is not in TRUSTED_CLIENT_IPS"))
        self.assertIn("this address is not in TRUSTED_CLIENT_IPS", text)
        # A gateway that gave no reason: the same.
        self.assertIn("this address is not in TRUSTED_CLIENT_IPS", self.explain(ctl.ConnectionClosed(1008, "")))

    def test_policy_violation_other_reason(self):
        """
        A 1008 for another reason than the allowlist is shown with the
        gateway's reason, not sent to TRUSTED_CLIENT_IPS.
        """
        text = self.explain(
            ctl.ConnectionClosed(1008, "too many failed authentications from this address; try again later\x1b"),
            url="ws://h:1",
        )
        self.assertEqual(
            text,
            "the gateway at ws://h:1 refused this connection (close code 1008): too many failed authentications "
            "from this address; try again later\\x1b",
        )

    def test_going_away(self):
        self.assertIn("shutting down", self.explain(ctl.ConnectionClosed(1001, "gateway shutting down")))

    def test_timeout(self):
        for error in (TimeoutError(), CancelledError()):
            self.assertIn("within 2.5 s", self.explain(error, timeout=2.5))

    def test_tls(self):
        cause = SSLError([("SSL routines", "", "certificate verify failed")])
        text = self.explain(ctl.ConnectionClosed(1006, "unclean", cause), url="wss://h:1")
        self.assertIn("certificate verify failed", text)
        self.assertIn("--cafile", text)

    def test_http_refusal_is_no_tls_matter(self):
        """
        A handshake the server answered with an HTTP status (a lockout's
        429, a 403): its own reason, and no question about TLS.
        """
        # Autobahn's words, as onClose has them.
        reason = (
            'connection was closed uncleanly ("WebSocket connection upgrade failed [429]: too many failed '
            'authentications from this address; retry in 300 s")'
        )
        for url in ("ws://h:1", "wss://h:1"):
            text = self.explain(ctl.ConnectionClosed(1006, reason), url=url)
            self.assertEqual(
                text,
                f"{url} refused the WebSocket handshake with HTTP 429: too many failed authentications from this "
                "address; retry in 300 s",
            )
        text = self.explain(
            ctl.ConnectionClosed(1006, "WebSocket connection upgrade failed [403]: Forbidden"), url="ws://h:1"
        )
        self.assertIn("refused the WebSocket handshake with HTTP 403: Forbidden", text)
        self.assertNotIn("TLS", text)

    def test_http_refusal_printable(self):
        """
        The server's reason phrase is the server's text: its control
        characters escaped, its length capped.
        """
        reason = "WebSocket connection upgrade failed [429]: \x1b[31mRED\x1b[0m " + "A" * 2000
        text = self.explain(ctl.ConnectionClosed(1006, reason), url="ws://h:1")
        self.assertEqual(
            text,
            "ws://h:1 refused the WebSocket handshake with HTTP 429: \\x1b[31mRED\\x1b[0m "
            + "A" * (ctl.PRINTED_MAX - 19)
            + "…",
        )
        text = self.explain(ctl.ConnectionClosed(1000, "bye\x1b[2J" * 1000, opened=True), url="ws://h:1")
        self.assertIn("(code 1000: bye\\x1b[2J", text)
        self.assertLess(len(text), ctl.PRINTED_MAX + 100)
        self.assertNotIn("\x1b", text)

    def test_http_answer_not_read(self):
        """
        An HTTP answer Autobahn could not read (a reason that is not
        UTF-8), or that ended before the handshake completed: said so, with
        its status line, and no question about TLS.
        """
        cause = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        error = ctl.ConnectionClosed(1006, "unclean", cause, received=b"HTTP/1.1 429 \xff\x1b bad\r\n\r\n")
        self.assertEqual(
            self.explain(error, url="ws://h:1"),
            "ws://h:1 answered the WebSocket handshake with an HTTP response openclawctl could not read "
            "(UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte): "
            "HTTP/1.1 429 \\xff\\x1b bad",
        )
        error = ctl.ConnectionClosed(1006, "peer dropped", ConnectionDone(), received=b"HTTP/1.1 42")
        self.assertEqual(
            self.explain(error, url="wss://h:1"),
            "wss://h:1 answered the WebSocket handshake with an HTTP response that did not complete it "
            "(peer dropped): HTTP/1.1 42",
        )
        # No HTTP: the question about TLS stays.
        error = ctl.ConnectionClosed(1006, "peer dropped", ConnectionDone(), received=b"\x15\x03\x01")
        self.assertIn("is the control listener TLS?", self.explain(error, url="ws://h:1"))

    def test_library_errors_in_one_line(self):
        """
        Twisted's and Autobahn's errors reach the operator as one line
        each, without a traceback; their warnings not at all, nor
        Autobahn's error for a connection lost to a TLS error (openclawctl
        says so itself).
        """
        stream = io.StringIO()
        observer = ctl.OneLineLog(stream)
        try:
            "\xff".encode("ascii")
        except UnicodeEncodeError:
            failure = Failure()
        # As twisted.python.log.err has it (a transport logging what its
        # protocol raised), and as twisted.logger's Logger.failure does.
        observer(
            {"log_level": LogLevel.critical, "failure": failure, "isError": 1, "log_format": "Unhandled Error\n..."}
        )
        Logger(observer=observer).failure("in \x1b[2J a callback", failure)
        Logger(observer=observer).error("gone: {why}", why="\x1b]0;t\x07")
        Logger(observer=observer).warn("dropping connection")
        # Autobahn's line for a connection lost to a TLS error, which
        # openclawctl's own line explains.
        Logger(namespace=ctl.AUTOBAHN_CLIENT_NAMESPACE, observer=observer).error(
            "SSL error: certificate verify failed (in )"
        )
        self.assertEqual(
            stream.getvalue().splitlines(),
            [
                "openclawctl: unexpected error: UnicodeEncodeError: 'ascii' codec can't encode character "
                "'\\xff' in position 0: ordinal not in range(128)",
            ]
            * 2
            + ["openclawctl: error: gone: \\x1b]0;t\\x07"],
        )

    def test_dropped_after_the_handshake(self):
        """
        A connection dropped after the WebSocket handshake (the gateway
        stopped mid-command): no hint about TLS.
        """
        text = self.explain(ctl.ConnectionClosed(1006, "unclean", opened=True), url="wss://h:1")
        self.assertIn("closed before an answer (code 1006: unclean)", text)
        self.assertNotIn("TLS", text)


# -- the console script against a real gateway ---------------------------------


class SilentFactory(Factory):
    """
    Accepts TCP connections and never says anything: a gateway that hangs.
    """

    protocol = Protocol

    def __init__(self) -> None:
        self.protocols: list[Protocol] = []

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = super().buildProtocol(addr)
        self.protocols.append(protocol)
        return protocol


class HTTPAnswers(Protocol):
    """
    Answers whatever is sent first (the WebSocket handshake) with the
    factory's next raw bytes, and hangs up: a hostile or broken server.
    """

    factory: HTTPAnswersFactory

    def dataReceived(self, data: bytes) -> None:
        if self.transport is not None and self.factory.answers:
            self.transport.write(self.factory.answers.pop(0))
            self.transport.loseConnection()


class HTTPAnswersFactory(Factory):
    protocol = HTTPAnswers

    def __init__(self, answers: list[bytes]) -> None:
        self.answers = answers


def make_certificates(
    directory: Path, names: list[x509.GeneralName] | None = None, ca_name: str = "openclaw test CA"
) -> tuple[Path, CertificateOptions]:
    """
    A throw-away CA named C{ca_name} (written to C{directory/ca.pem}) and
    the TLS server options of a certificate it signed for C{names}
    (default 127.0.0.1 and localhost).
    """
    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(hours=1))

    def certificate(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            held = names or [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(held), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate(ca_name, ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = certificate("127.0.0.1", server_key, ca_name, ca_key, ca=False)
    directory.mkdir(parents=True, exist_ok=True)
    cafile = directory / "ca.pem"
    cafile.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    # cryptography objects rather than pyOpenSSL's (deprecated there);
    # CertificateOptions hands them to pyOpenSSL as they are.
    return cafile, CertificateOptions(privateKey=server_key, certificate=server)


def rotate_without_chown(url: str, token_file: Path) -> Any:
    """
    C{openclawctl --url URL --token-file TOKEN_FILE rotate-token} run by a
    root without CAP_CHOWN (a container's root, NFS's root_squash): taken
    from its bounding and inheritable sets (C{setpriv}; the test skips
    without it).  Fires with (stdout, stderr, exit status) as bytes.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise SkipTest("taking CAP_CHOWN away needs setpriv (util-linux)")
    argv = ["--inh-caps=-chown", "--bounding-set=-chown", CTL, "--url", url, "--token-file", str(token_file)]
    return getProcessOutputAndValue(setpriv, [*argv, "rotate-token"], env=BASE_ENV)


class ConsoleScriptTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.gateway = start_gateway(self)
        self.url = f"ws://127.0.0.1:{self.gateway.port}"

    def ctl(self, *args: str, env: dict[str, str] | None = None, token: str | None = None) -> Any:
        """
        Run C{openclawctl --url <this gateway> [--token T] ARGS}.
        """
        token_args = ("--token", token) if token else ()
        return run_ctl("--url", self.url, *token_args, *args, env=env)

    @inlineCallbacks
    def test_ping(self):
        out, err, code = yield self.ctl("ping", token=self.gateway.token)
        self.assertEqual((err, code), ("", 0))
        self.assertRegex(out, r"^pong \(\d+(\.\d)? ms round trip\)\n$")

    @inlineCallbacks
    def test_token_file_others_may_read(self):
        """
        C{--token-file} naming a file others may read and write: one
        warning line on stderr before the exchange, which goes on as
        without it (exit status 0).
        """
        token_file = Path(self.mktemp())
        token_file.write_text(f"{self.gateway.token}\n")
        token_file.chmod(0o666)
        out, err, code = yield self.ctl("--token-file", str(token_file), "ping")
        self.assertEqual(
            (err, code),
            (
                f"openclawctl: warning: the token file {token_file} may be read and written by group or others "
                f"(mode 0666); run: chmod 600 {str(token_file)!r}\n",
                0,
            ),
        )
        self.assertRegex(out, r"^pong ")
        token_file.chmod(0o600)
        out, err, code = yield self.ctl("--token-file", str(token_file), "ping")
        self.assertEqual((err, code), ("", 0))

    @inlineCallbacks
    def test_ping_json(self):
        out, err, code = yield self.ctl("--json", "ping", token=self.gateway.token)
        self.assertEqual((err, code), ("", 0))
        answer = json.loads(out)
        self.assertEqual((answer["ok"], answer["cmd"], answer["result"]["pong"]), (True, "ping", True))

    @inlineCallbacks
    def test_status(self):
        out, err, code = yield self.ctl("status", token=self.gateway.token)
        self.assertEqual((err, code), ("", 0))
        lines = out.splitlines()
        fields = dict(re.fullmatch(r"(\w+): +(.*)", line).groups() for line in lines)
        self.assertEqual(fields["provider"], "Google Gemini")
        self.assertEqual(fields["provider_id"], "gemini")
        self.assertEqual(fields["model"], "gemini-flash-latest")
        self.assertEqual(fields["connections"], "1")
        self.assertEqual(fields["token_expires"], self.gateway.service.sessions.current.expires)
        self.assertEqual(len({line.index(value) for line, value in zip(lines, fields.values())}), 1, out)

    @inlineCallbacks
    def test_switch_provider_with_model(self):
        out, err, code = yield self.ctl(
            "switch-provider", "kimi", "--model", "moonshot-v1-32k", token=self.gateway.token
        )
        self.assertEqual(code, 0)
        self.assertEqual(out, "gemini -> kimi (moonshot-v1-32k)\n")
        self.assertEqual(err, "openclawctl: warning: KIMI_API_KEY is not set\n")
        route = self.gateway.service.route.current
        self.assertEqual((route.provider_id, route.model), ("kimi", "moonshot-v1-32k"))

    @inlineCallbacks
    def test_switch_provider_default_model_and_refusal(self):
        """
        Without --model the provider's default is used; an unknown provider
        is refused by the gateway: status 1, its error on stderr.
        """
        out, err, code = yield self.ctl("switch-provider", "kimi", token=self.gateway.token)
        self.assertEqual((out, code), ("gemini -> kimi (moonshot-v1-8k)\n", 0))
        out, err, code = yield self.ctl("switch-provider", "openai", token=self.gateway.token)
        self.assertEqual((out, code), ("", 1))
        self.assertIn("switch_provider failed: unknown provider 'openai'", err)
        self.assertEqual(self.gateway.service.route.current.provider_id, "kimi")

    @inlineCallbacks
    def test_health_check(self):
        """
        With no provider keys no provider is configured (none probed), but
        the command itself succeeded: status 0.  One line per built-in
        provider, however many there are.
        """
        out, err, code = yield self.ctl("health-check", token=self.gateway.token)
        self.assertEqual((err, code), ("", 0))
        lines = out.splitlines()
        self.assertEqual(len(lines), len(BUILTIN_PROVIDERS), out)
        self.assertRegex(out, r"(?m)^kimi +not configured +- +- +KIMI_API_KEY is not set$")
        self.assertRegex(out, r"(?m)^gemini \(active\) +not configured +- +- +GEMINI_API_KEY is not set$")
        for adapter in BUILTIN_PROVIDERS:
            variable = adapter.key_variables[0]
            self.assertRegex(out, rf"(?m)^{adapter.id}( \(active\))? +not configured +- +- +{variable} is not set$")
        out, err, code = yield self.ctl("--json", "health-check", token=self.gateway.token)
        providers = json.loads(out)["result"]["providers"]
        self.assertEqual({entry["ok"] for entry in providers.values()}, {False})
        # The protocol's name too (ops trial s36: "invalid choice").
        out, err, code = yield self.ctl("health_check", token=self.gateway.token)
        self.assertEqual((err, code), ("", 0))
        self.assertRegex(out, r"(?m)^kimi +not configured +- +- +KIMI_API_KEY is not set$")

    @inlineCallbacks
    def test_rotate_token_writes_back(self):
        """
        With --token-file as the token source, the new token replaces the
        old one in that file (mode 0600); the old one is then refused.
        """
        old = self.gateway.token
        token_file = Path(self.mktemp())
        token_file.parent.mkdir(parents=True, exist_ok=True)
        write_token_file(token_file, old)
        out, err, code = yield self.ctl("rotate-token", "--token-file", str(token_file))
        self.assertEqual((err, code), ("", 0))
        new = self.gateway.token
        self.assertNotEqual(new, old)
        self.assertEqual(token_file.read_text(), new + "\n")
        self.assertEqual(stat.S_IMODE(token_file.stat().st_mode), 0o600)
        self.assertIn(f"written to {token_file}", out)
        self.assertNotIn(new, out)

        out, err, code = yield self.ctl("ping", token=old)
        self.assertEqual((out, code), ("", 1))
        self.assertIn("ping failed: token revoked", err)
        out, err, code = yield self.ctl("--token-file", str(token_file), "ping")
        self.assertEqual(code, 0, err)

    @inlineCallbacks
    def test_rotate_token_writes_back_a_file_written_by_hand(self):
        """
        A token file written by hand, with blanks around the token (a CRLF,
        a space), gives its token to openclawctl, so a rotation replaces
        it too: it was refused as "something other than a session token".
        """
        old = self.gateway.token
        token_file = Path(self.mktemp())
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.write_bytes(f"\ufeff {old} \r\n".encode())
        token_file.chmod(0o600)
        out, err, code = yield self.ctl("rotate-token", "--token-file", str(token_file))
        self.assertEqual((err, code), ("", 0))
        self.assertEqual(token_file.read_text(), self.gateway.token + "\n")
        self.assertNotEqual(self.gateway.token, old)

    def another_users_token_file(self, token: str) -> Path:
        """
        A token file holding C{token}, mode 0600, owned by uid and gid
        L{NOBODY} (root only: skips the test otherwise), which is not this
        gateway's TOKEN_FILE: openclawctl writes it.
        """
        if os.geteuid() != 0:
            raise SkipTest("giving a file to another user needs root")
        token_file = Path(self.mktemp())
        token_file.parent.mkdir(parents=True, exist_ok=True)
        write_token_file(token_file, token)
        os.chown(token_file, NOBODY, NOBODY)
        # In that user's own directory (the gateway's /run/openclaw).
        os.chown(token_file.parent, NOBODY, NOBODY)
        return token_file

    @inlineCallbacks
    def test_rotate_token_gives_nothing_to_a_planted_file(self):
        """
        Another user's token file in a directory not theirs (a sticky,
        world-writable one, as /tmp) is not given the new token: root's
        openclawctl replaces it with a file of its own, mode 0600, so
        whoever planted the old one cannot read the new token.
        """
        if os.geteuid() != 0:
            raise SkipTest("giving a file to another user needs root")
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        directory.chmod(0o1777)
        token_file = directory / "token"
        write_token_file(token_file, self.gateway.token)
        os.chown(token_file, NOBODY, NOBODY)
        out, err, code = yield self.ctl("rotate-token", "--token-file", str(token_file))
        self.assertEqual((err, code), ("", 0))
        self.assertEqual(token_file.read_text(), self.gateway.token + "\n")
        info = token_file.stat()
        self.assertEqual((info.st_uid, stat.S_IMODE(info.st_mode)), (0, 0o600))

    @inlineCallbacks
    def test_rotate_token_keeps_the_owner(self):
        """
        Root rotating with another user's token file (a gateway's that
        runs as that user) writes the new token in a file with the same
        owner and group, mode 0600, as install(1) and editors do: that user
        can still read it.  It was left root's (trial s18 F1).
        """
        token_file = self.another_users_token_file(self.gateway.token)
        out, err, code = yield self.ctl("rotate-token", "--token-file", str(token_file))
        self.assertEqual((err, code), ("", 0))
        self.assertEqual(token_file.read_text(), self.gateway.token + "\n")
        info = token_file.stat()
        self.assertEqual((info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)), (NOBODY, NOBODY, 0o600))
        self.assertEqual(sorted(p.name for p in token_file.parent.iterdir()), [token_file.name])

    @inlineCallbacks
    def test_rotate_token_when_the_owner_cannot_be_kept(self):
        """
        Root without the right to give files away (CAP_CHOWN: a container's
        root, NFS's root_squash): the token is rotated, but another user's
        token file is left as it was, not made root's; the new token is
        printed, and the error says to write it there as its owner.
        """
        old = self.gateway.token
        token_file = self.another_users_token_file(old)
        out, err, code = yield rotate_without_chown(self.url, token_file)
        self.assertEqual(code, 1, err)
        new = self.gateway.token
        self.assertNotEqual(new, old)
        self.assertIn(f"new token: {new}\n", out.decode())
        self.assertEqual(
            err.decode(),
            f"openclawctl: error: the token was rotated but writing it to {token_file} failed: it belongs to uid "
            f"{NOBODY}, and this user cannot give the new file to that user, so it was left as it was; the new "
            f"token is on stdout: keep it, and write it there as uid {NOBODY}\n",
        )
        self.assertEqual(token_file.read_text(), old + "\n")
        self.assertEqual(token_file.stat().st_uid, NOBODY)
        self.assertEqual(sorted(p.name for p in token_file.parent.iterdir()), [token_file.name])

    @inlineCallbacks
    def test_rotate_token_to_a_new_file(self):
        """
        --token gives the token, --token-file (a file not there yet) only
        receives the new one.
        """
        token_file = Path(self.mktemp())
        token_file.parent.mkdir(parents=True, exist_ok=True)
        out, err, code = yield self.ctl("rotate-token", "--token-file", str(token_file), token=self.gateway.token)
        self.assertEqual((err, code), ("", 0))
        self.assertEqual(token_file.read_text(), self.gateway.token + "\n")

    @inlineCallbacks
    def test_rotate_token_to_a_directory_rotates_nothing(self):
        """
        --token-file naming a directory: refused in one line before the
        rotation (exit 2, as for a missing directory); the token still
        works.
        """
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        old = self.gateway.token
        out, err, code = yield self.ctl("rotate-token", "--token-file", str(directory), token=old)
        self.assertEqual((out, code), ("", 2))
        self.assertEqual(
            err,
            f"openclawctl: error: cannot write the new token to {directory}: it is a directory; give the path "
            f"of a file, such as {directory / 'token'}; nothing was rotated\n",
        )
        self.assertEqual(self.gateway.token, old)
        out, err, code = yield self.ctl("ping", token=old)
        self.assertEqual((err, code), ("", 0))

    @inlineCallbacks
    def test_locked_out(self):
        """
        An address locked out after failed authentications: the gateway's
        429 and its "retry in N s", with no question about TLS.
        """
        gateway = start_gateway(self, auth_lockout_failures=1)
        url = f"ws://127.0.0.1:{gateway.port}"
        out, err, code = yield run_ctl("--url", url, "--token", "not-a-token", "ping")
        self.assertEqual(code, 1, err)
        out, err, code = yield run_ctl("--url", url, "--token", gateway.token, "ping")
        self.assertEqual((out, code), ("", 2))
        # The lockout's 300 s, less what a slow host took between the two runs.
        self.assertRegex(
            err,
            f"^openclawctl: error: {re.escape(url)} refused the WebSocket handshake with HTTP 429: too many "
            r"failed authentications from this address; retry in (300|29\d) s\n$",
        )

    @inlineCallbacks
    def test_rotate_token_to_a_file_that_holds_no_token_rotates_nothing(self):
        """
        --token T --token-file naming a shell profile: refused in one line
        before the rotation (exit 2), the file left as it was, the token
        still working.
        """
        profile = Path(self.mktemp())
        profile.parent.mkdir(parents=True, exist_ok=True)
        profile.write_text("alias ll='ls -l'\n")
        old = self.gateway.token
        out, err, code = yield self.ctl("rotate-token", "--token-file", str(profile), token=old)
        self.assertEqual((out, code), ("", 2))
        self.assertEqual(
            err,
            f"openclawctl: error: cannot write the new token to {profile}: it holds something other than a "
            "session token, and only a token file (empty, or one token) is replaced, as the gateway does with its "
            "TOKEN_FILE; give the path of a token file, or of none yet; nothing was rotated\n",
        )
        self.assertEqual(profile.read_text(), "alias ll='ls -l'\n")
        self.assertEqual(self.gateway.token, old)
        out, err, code = yield self.ctl("ping", token=old)
        self.assertEqual((err, code), ("", 0))

    @inlineCallbacks
    def test_rotate_token_prints_it_without_a_file(self):
        out, err, code = yield self.ctl("rotate-token", token=self.gateway.token)
        self.assertEqual((err, code), ("", 0))
        self.assertIn(f"new token: {self.gateway.token}\n", out)

    @inlineCallbacks
    def test_bad_token(self):
        out, err, code = yield self.ctl("status", token="not-a-token")
        self.assertEqual((out, code), ("", 1))
        self.assertIn("status failed: invalid token", err)

    @inlineCallbacks
    def test_token_from_environment(self):
        env = {"OPENCLAW_TOKEN": self.gateway.token}
        out, err, code = yield self.ctl("ping", env=env)
        self.assertEqual((err, code), ("", 0))
        # --token comes first.
        out, err, code = yield self.ctl("ping", env=env, token="not-a-token")
        self.assertEqual(code, 1)
        self.assertIn("invalid token", err)

    @inlineCallbacks
    def test_missing_token(self):
        out, err, code = yield self.ctl("ping")
        self.assertEqual((out, code), ("", 2))
        self.assertIn("no token: pass --token TOKEN or --token-file FILE, or set OPENCLAW_TOKEN", err)

    @inlineCallbacks
    def test_usage_error(self):
        out, err, code = yield self.ctl("switch-provider", token=self.gateway.token)
        self.assertEqual((out, code), ("", 2))
        self.assertIn("usage: openclawctl", err)
        self.assertIn("the following arguments are required: provider", err)

    @inlineCallbacks
    def test_connection_refused(self):
        url = f"ws://127.0.0.1:{free_port()}"
        out, err, code = yield run_ctl("--url", url, "--token", "T", "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertIn(f"cannot connect to {url}: connection refused", err)
        self.assertIn("WS_CONTROL_PORT", err)
        # One stopping refuses too (operator trial s46: taken for a dead one).
        self.assertIn("a gateway that is stopping closes its ports first while it finishes its calls", err)

    @inlineCallbacks
    def test_api_port_given(self):
        """
        The API's port given for the control plane's: the 404 to the
        WebSocket handshake says which port openclawctl wants.
        """
        gateway = start_gateway(self, api=True)
        out, err, code = yield run_ctl("--url", f"ws://127.0.0.1:{gateway.api_port}", "--token", gateway.token, "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertIn("is that the gateway's API port (API_PORT)?", err)
        self.assertIn("WS_CONTROL_PORT", err)

    @inlineCallbacks
    def test_untrusted_peer(self):
        """
        The gateway trusts only ::1; this client comes from 127.0.0.1 and is
        closed with 1008 before any answer.
        """
        gateway = start_gateway(self, interface="::", trusted_clients=(ipaddress.ip_network("::1/128"),))
        out, err, code = yield run_ctl("--url", f"ws://127.0.0.1:{gateway.port}", "--token", gateway.token, "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertIn("this address is not in TRUSTED_CLIENT_IPS", err)

    @inlineCallbacks
    def test_from_a_trusted_proxy_address(self):
        """
        From an address in TRUSTED_PROXIES (and in TRUSTED_CLIENT_IPS):
        openclawctl names no client, so the gateway closes with 1008, and
        the one line says why and what to do, not TRUSTED_CLIENT_IPS.
        """
        gateway = start_gateway(self, trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))
        url = f"ws://127.0.0.1:{gateway.port}"
        out, err, code = yield run_ctl("--url", url, "--token", gateway.token, "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertEqual(
            err,
            f"openclawctl: error: the gateway at {url} refused this connection (close code 1008): this address is "
            "in the gateway's TRUSTED_PROXIES, so its connections must name a client (X-Forwarded-For or "
            "Forwarded), and openclawctl's do not; connect through the proxy (one that sends X-Forwarded-For: if "
            "openclawctl went through one, set the proxy to send it), from an address in TRUSTED_CLIENT_IPS that is "
            "not a proxy, or to a unix: control listener (--url unix:PATH)\n",
        )

    @inlineCallbacks
    def test_timeout(self):
        silent = SilentFactory()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(silent)
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: [p.transport.abortConnection() for p in silent.protocols if p.connected])
        url = f"ws://127.0.0.1:{port.getHost().port}"
        out, err, code = yield run_ctl("--url", url, "--token", "T", "--timeout", "0.5", "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertIn(f"no answer from {url} within 0.5 s", err)

    @inlineCallbacks
    def test_taken_and_unanswered(self):
        """
        A gateway that opened the connection and took the command but sent
        no answer (waiting on its consumers' database): said so, not "check
        the gateway is running" (trial s30).
        """
        factory = WebSocketServerFactory()
        factory.protocol = WebSocketServerProtocol
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        url = f"ws://127.0.0.1:{port.getHost().port}"
        out, err, code = yield run_ctl("--url", url, "--token", "T", "--timeout", "1", "usage")
        self.assertEqual((out, code), ("", 2))
        self.assertEqual(
            err,
            f"openclawctl: error: the gateway at {url} took the command but did not answer within 1 s; it may be "
            "waiting on its consumers' database (a long usage report, or a database that stopped answering: see "
            "the gateway's log), or raise --timeout\n",
        )

    @inlineCallbacks
    def test_taken_and_unanswered_file_write(self):
        """
        A switch_provider or rotate_token taken and not answered: said to
        wait on the state file's or TOKEN_FILE's write (a slow disk), not
        on the consumers' database (review s33).
        """
        factory = WebSocketServerFactory()
        factory.protocol = WebSocketServerProtocol
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        url = f"ws://127.0.0.1:{port.getHost().port}"
        out, err, code = yield run_ctl("--url", url, "--token", "T", "--timeout", "1", "switch-provider", "kimi")
        self.assertEqual((out, code), ("", 2))
        self.assertEqual(
            err,
            f"openclawctl: error: the gateway at {url} took the command but did not answer within 1 s; it may be "
            "waiting on the write of its state file (STATE_DIR's, on a slow disk: a stalled fsync or NFS server), "
            "one at a time behind its other file writes, or in a cluster on the cluster store (Redis): see the "
            "gateway's log, or raise --timeout\n",
        )
        out, err, code = yield run_ctl("--url", url, "--token", "T", "--timeout", "1", "rotate-token")
        self.assertEqual((out, code), ("", 2))
        self.assertIn("waiting on the write of its TOKEN_FILE (on a slow disk", err)
        self.assertNotIn("database", err)

    @inlineCallbacks
    def test_wss(self):
        """
        Over TLS: with --cafile the test CA is trusted; without it the
        system trust store does not know it, and the message says so, in
        one line: not also Autobahn's own (C{SSL error: certificate verify
        failed (in )}).
        """
        cafile, options = make_certificates(Path(self.mktemp()))
        endpoint = SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1")
        port = yield endpoint.listen(self.gateway.service.factory)
        self.addCleanup(port.stopListening)
        url = f"wss://127.0.0.1:{port.getHost().port}"
        out, err, code = yield run_ctl("--url", url, "--token", self.gateway.token, "--cafile", str(cafile), "ping")
        self.assertEqual((err, code), ("", 0))
        self.assertTrue(out.startswith("pong ("), out)
        out, err, code = yield run_ctl("--url", url, "--token", self.gateway.token, "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertEqual(
            err,
            f"openclawctl: error: TLS handshake with {url} failed: certificate verify failed; if the gateway's "
            "certificate is signed by your own CA, pass --cafile CA.pem\n",
        )

    @inlineCallbacks
    def test_wss_to_a_plain_listener(self):
        """
        wss:// to a plain control listener: the connection closes before
        the WebSocket handshake, and the message asks whether the listener
        is TLS (a plain one takes ws://).
        """
        url = f"wss://127.0.0.1:{self.gateway.port}"
        out, err, code = yield run_ctl("--url", url, "--token", self.gateway.token, "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertIn(url, err)
        self.assertIn("is the control listener TLS? (a plain listener takes ws://)", err)
        self.assertNotIn("--cafile", err)

    @inlineCallbacks
    def test_ws_to_a_tls_listener(self):
        """
        ws:// to a TLS control listener: the connection closes before the
        WebSocket handshake, and the message says to use wss://.
        """
        _, options = make_certificates(Path(self.mktemp()))
        endpoint = SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1")
        port = yield endpoint.listen(self.gateway.service.factory)
        self.addCleanup(port.stopListening)
        url = f"ws://127.0.0.1:{port.getHost().port}"
        out, err, code = yield run_ctl("--url", url, "--token", self.gateway.token, "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertIn(url, err)
        self.assertIn("is the control listener TLS? (then use wss://)", err)


class HostileServerTests(TestCase):
    """
    The console script against a server that answers the handshake with
    what it likes: nothing of it reaches the terminal as control
    characters, nor at length, nor as a traceback.
    """

    timeout = 20

    @inlineCallbacks
    def listen(self, *answers: bytes) -> Any:
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(HTTPAnswersFactory(list(answers)))
        self.addCleanup(port.stopListening)
        return f"ws://127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def test_reason_phrase_escaped_and_capped(self):
        url = yield self.listen(
            b"HTTP/1.1 429 \x1b[31mRED\x1b[0m \x1b]0;pwned-title\x07 retry\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 429 " + b"A" * 20000 + b"\r\nContent-Length: 0\r\n\r\n",
        )
        out, err, code = yield run_ctl("--url", url, "--token", "T", "ping")
        self.assertEqual((out, code), ("", 2))
        # Control characters in a status line are not HTTP (RFC 9112
        # section 4): Autobahn does not read it, and the line is shown.
        self.assertEqual(
            err,
            f"openclawctl: error: {url} answered the WebSocket handshake with an HTTP response that did not "
            'complete it (connection was closed uncleanly ("Error during parsing of HTTP status line / response '
            'headers : invalid character in HTTP status line")): HTTP/1.1 429 \\x1b[31mRED\\x1b[0m '
            "\\x1b]0;pwned-title\\x07 retry\n",
        )
        out, err, code = yield run_ctl("--url", url, "--token", "T", "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertEqual(
            err, f"openclawctl: error: {url} refused the WebSocket handshake with HTTP 429: {'A' * ctl.PRINTED_MAX}…\n"
        )

    @inlineCallbacks
    def test_reason_not_utf8(self):
        """
        Autobahn cannot decode the answer: one line saying the answer was
        HTTP openclawctl could not read, no traceback, no TLS question.
        """
        url = yield self.listen(b"HTTP/1.1 429 \xff\xfe bad utf8\r\n\r\n")
        out, err, code = yield run_ctl("--url", url, "--token", "T", "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertEqual(
            err,
            f"openclawctl: error: {url} answered the WebSocket handshake with an HTTP response openclawctl could "
            "not read (UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 13: invalid start "
            "byte): HTTP/1.1 429 \\xff\\xfe bad utf8\n",
        )


class AnotherUsersGatewayTests(TestCase):
    """
    Trial s18 F1, as run: a gateway (C{twistd -n openclaw}) running as
    another user (uid L{NOBODY}, as under systemd's C{User=}), and root
    running C{openclawctl --token-file TOKEN_FILE rotate-token}, as the
    README and the systemd unit's comment say.  The gateway's next rotation
    answered "internal error" (a PermissionError in its log), and its stop
    left the file: root's openclawctl had made it root's, mode 0600.
    """

    timeout = 60

    def setUp(self) -> None:
        setpriv = shutil.which("setpriv")
        if os.geteuid() != 0 or setpriv is None:
            raise SkipTest("running a gateway as another user needs root and setpriv (util-linux)")
        probe = subprocess.run(
            [
                setpriv,
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                sys.executable,
                "-c",
                "import openclaw",
            ],
            capture_output=True,
            timeout=30,
            cwd="/",
        )
        if probe.returncode != 0:
            raise SkipTest(f"uid {NOBODY} cannot run this Python with openclaw installed (its install is not readable)")
        # Under a directory that user may search (the test's own is under
        # a 0700 one).
        base = Path(tempfile.mkdtemp(prefix="oc-another-user-"))
        self.addCleanup(shutil.rmtree, base, True)
        base.chmod(0o755)
        for name in ("run", "state"):
            (base / name).mkdir(mode=0o700)
            os.chown(base / name, NOBODY, NOBODY)
        os.chown(base, NOBODY, NOBODY)
        self.token_file = base / "run" / "token"
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.gateway = GatewayProcess()
        argv = [
            setpriv,
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            twistd_path(),
            "-n",
            "--pidfile=",
            "openclaw",
            "--port",
            str(self.port),
            "--interface",
            "127.0.0.1",
            "--api-port",
            str(free_port()),
            "--token-file",
            str(self.token_file),
            "--state-dir",
            str(base / "state"),
        ]
        env = {**BASE_ENV, "HOME": str(base), "JWT_SECRET": "another-users-gateway-secret-42-42-42"}
        reactor.spawnProcess(self.gateway, setpriv, argv, env=env, path=str(base))
        self.addCleanup(self.gateway.stop)

    @inlineCallbacks
    def started(self) -> Any:
        for _ in range(400):
            if self.gateway.ended.called:
                self.fail(f"the gateway ended: {self.gateway.stderr + self.gateway.stdout[-2000:]!r}")
            if self.token_file.exists() and b"SESSION TOKEN" in self.gateway.stdout:
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail(f"the gateway did not start: {self.gateway.stdout[-2000:]!r}")

    def owner(self) -> tuple[int, int, int]:
        info = self.token_file.stat()
        return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)

    @inlineCallbacks
    def test_root_rotates_with_the_gateways_token_file(self):
        yield self.started()
        self.assertEqual(self.owner(), (NOBODY, NOBODY, 0o600))
        for _ in range(2):
            out, err, code = yield run_ctl("--url", self.url, "--token-file", str(self.token_file), "rotate-token")
            self.assertEqual((err, code), ("", 0))
            self.assertIn(f"new token in {self.token_file} (written by the gateway: its TOKEN_FILE)", out)
            self.assertEqual(self.owner(), (NOBODY, NOBODY, 0o600))
        out, err, code = yield run_ctl("--url", self.url, "--token-file", str(self.token_file), "ping")
        self.assertEqual((err, code), ("", 0))
        self.assertNotIn(b"Traceback", self.gateway.stdout)
        status = yield within(self.gateway.stop(), 20, "the gateway to stop")
        self.assertIn(status, (0, -15), self.gateway.stdout[-2000:])
        self.assertFalse(self.token_file.exists())

    @inlineCallbacks
    def test_root_without_chown_rotates_with_the_gateways_token_file(self):
        """
        The gateway rewrote its TOKEN_FILE before it answered: openclawctl
        finds the new token there and leaves the file as the gateway wrote
        it, so even a root that may not give files away (no CAP_CHOWN: a
        container's) has nothing to fail at.
        """
        yield self.started()
        out, err, code = yield rotate_without_chown(self.url, self.token_file)
        self.assertEqual((err, code), (b"", 0))
        self.assertIn(f"new token in {self.token_file} (written by the gateway: its TOKEN_FILE)", out.decode())
        self.assertEqual(self.owner(), (NOBODY, NOBODY, 0o600))
        out, err, code = yield run_ctl("--url", self.url, "--token-file", str(self.token_file), "ping")
        self.assertEqual((err, code), ("", 0))

    @inlineCallbacks
    def test_token_file_the_gateway_may_not_read(self):
        """
        A token file made root's, mode 0600 (as openclawctl left it before
        it kept the owner): the gateway's rotation leaves it and logs why
        and what to do, and answers with the new token; its stop leaves
        it, saying why.
        """
        yield self.started()
        old = self.token_file.read_text().strip()
        write_token_file(self.token_file, old)
        self.assertEqual(self.owner(), (0, 0, 0o600))
        out, err, code = yield run_ctl("--url", self.url, "--token", old, "rotate-token")
        self.assertEqual((err, code), ("", 0))
        new = re.search(r"new token: (\S+)", out).group(1)
        self.assertEqual(self.token_file.read_text(), old + "\n")
        out, err, code = yield run_ctl("--url", self.url, "--token", new, "ping")
        self.assertEqual((err, code), ("", 0))
        log = self.gateway.stdout.decode()
        self.assertIn(
            f"TOKEN_FILE {self.token_file} was left as it is (this gateway's user, {named_uid(NOBODY)}, may not read it "
            f"(Permission denied), so it may hold anything: give it back to that user (chown {NOBODY}) or remove "
            "it); session token",
            log,
        )
        self.assertNotIn("internal error", log)
        self.assertNotIn("Traceback", log)
        status = yield within(self.gateway.stop(), 20, "the gateway to stop")
        self.assertIn(status, (0, -15), self.gateway.stdout[-2000:])
        self.assertEqual(self.token_file.read_text(), old + "\n")
        self.assertIn(
            f"TOKEN_FILE {self.token_file} was left in place: this gateway's user, {named_uid(NOBODY)}, may not read "
            "it",
            self.gateway.stdout.decode(),
        )


class TokenFileReadingTests(TestCase):
    """
    C{--token-file} naming a FIFO or a device that never ends: one line
    and exit status 2, as for any token file that cannot be read, where
    openclawctl waited for a FIFO's writer for ever (--timeout or not) and
    read /dev/zero until a MemoryError and its traceback (trial s18 F7).
    Run under C{timeout} and a memory limit, so that a regression fails
    rather than hangs or eats the machine.
    """

    timeout = 30

    @inlineCallbacks
    def refused(self, token_file: Path, *args: str) -> Any:
        """
        The one line of C{openclawctl --token-file token_file ARGS ping}.
        """
        out, err, code = yield getProcessOutputAndValue(
            "/bin/sh",
            [
                "-c",
                'ulimit -v 2000000; exec timeout 15 "$@"',
                "sh",
                CTL,
                "--token-file",
                str(token_file),
                *args,
                "ping",
            ],
            env=BASE_ENV,
        )
        self.assertEqual((out, code), (b"", 2), err)
        lines = err.decode().splitlines()
        self.assertEqual(len(lines), 1, err)
        return lines[0]

    @inlineCallbacks
    def test_fifo(self):
        fifo = Path(self.mktemp())
        fifo.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(fifo)
        line = yield self.refused(fifo)
        self.assertEqual(
            line,
            f"openclawctl: error: cannot read the token file {fifo}: it is a FIFO, not a regular file; the gateway "
            "writes it when started with TOKEN_FILE / --token-file",
        )

    @inlineCallbacks
    def test_dev_zero(self):
        line = yield self.refused(Path("/dev/zero"))
        self.assertEqual(
            line,
            "openclawctl: error: cannot read the token file /dev/zero: it is a character device, not a regular "
            "file; the gateway writes it when started with TOKEN_FILE / --token-file",
        )

    @inlineCallbacks
    def test_cafile(self):
        """
        C{--cafile} is read the same way (L{openclaw.tls.read_ca_file}).
        """
        token_file = Path(self.mktemp())
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.write_text(f"{TOKEN_LIKE}\n")
        # Private, as a token file should be: else its warning comes first.
        token_file.chmod(0o600)
        fifo = token_file.parent / "ca-fifo"
        os.mkfifo(fifo)
        url = f"wss://127.0.0.1:{free_port()}"
        for cafile, kind in ((fifo, "a FIFO"), (Path("/dev/zero"), "a character device")):
            line = yield self.refused(token_file, "--url", url, "--cafile", str(cafile))
            self.assertEqual(
                line,
                f"openclawctl: error: --cafile {cafile}: it is {kind}, not a regular file; give a PEM file of CA "
                "certificates",
            )


class UnixSocketTests(TestCase):
    """
    C{openclawctl --url unix:PATH} reaches a gateway whose control plane
    listens on a UNIX socket (C{--listen unix:PATH}).
    """

    timeout = 30

    def setUp(self) -> None:
        import shutil
        import tempfile

        short = Path(tempfile.mkdtemp(prefix="oc"))  # AF_UNIX paths are short
        self.addCleanup(shutil.rmtree, short, True)
        self.path = short / "control.sock"

    def test_parse(self):
        for url in (f"unix:{self.path}", f"unix://{self.path}"):
            parsed = ctl.parse_request(["--token", "T", "--url", url, "ping"], {})
            self.assertEqual(ctl.unix_socket_path(parsed.url), str(self.path))
            self.assertEqual(ctl.websocket_url(parsed.url), "ws://localhost")
        self.assertIn(
            "names no socket",
            str(self.assertRaises(ctl.UsageError, ctl.parse_request, ["--token", "T", "--url", "unix:", "ping"], {})),
        )
        error = self.assertRaises(
            ctl.UsageError, ctl.parse_request, ["--token", "T", "--url", "unix:/x", "--cafile", "c", "ping"], {}
        )
        self.assertIn("wss://", str(error))

    @inlineCallbacks
    def test_ping_and_status(self):
        from openclaw.tap import Options, makeService

        state = Path(self.mktemp()).resolve()
        state.mkdir(parents=True)
        self.patch(os, "environ", {"JWT_SECRET": "s" * 32, "STATE_DIR": str(state)})
        options = Options()
        options.parseOptions(
            ["--listen", f"unix:{self.path}:mode=600", "--api-listen", f"tcp:{free_port()}:interface=127.0.0.1"]
        )
        service = makeService(options, reactor, stdout=io.StringIO())
        service.startService()
        self.addCleanup(service.stopService)
        token = service.sessions.current.token
        out, err, code = yield run_ctl("--url", f"unix:{self.path}", "--token", token, "ping")
        self.assertEqual((err, code), ("", 0))
        self.assertTrue(out.startswith("pong"), out)
        out, err, code = yield run_ctl("--url", f"unix:{self.path}", "--token", token, "status")
        self.assertEqual((err, code), ("", 0))
        self.assertIn("provider_id", out)

    @inlineCallbacks
    def test_no_socket(self):
        """
        No socket file: a sentence, not Twisted's "An error occurred while
        connecting: 2: No such file or directory.;" (trial s18 F9).
        """
        out, err, code = yield run_ctl("--url", f"unix:{self.path}", "--token", "T", "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertEqual(
            err,
            f"openclawctl: error: cannot connect to unix:{self.path}: there is no such socket file; is the gateway "
            f"running, and is {self.path} its --listen unix: path?\n",
        )

    @inlineCallbacks
    def test_path_too_long(self):
        """
        A path longer than a UNIX socket's address holds: one line at once,
        not a TypeError line and then the wait for --timeout (re-attack
        s18).
        """
        path = "/tmp/" + "b" * 110
        out, err, code = yield run_ctl("--timeout", "30", "--url", f"unix:{path}", "--token", "T", "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("the socket path is 115 bytes long, and a UNIX socket's is at most 107 (unix(7))", err)

    @inlineCallbacks
    def test_not_allowed(self):
        """
        A socket this user may not open (run here as uid L{NOBODY}, the
        socket root's, in a directory of root's, mode 0700).
        """
        setpriv = shutil.which("setpriv")
        if os.geteuid() != 0 or setpriv is None:
            raise SkipTest("running openclawctl as another user needs root and setpriv (util-linux)")
        listening = socket.socket(socket.AF_UNIX)
        self.addCleanup(listening.close)
        listening.bind(str(self.path))
        listening.listen()
        out, err, code = yield getProcessOutputAndValue(
            setpriv,
            [
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                CTL,
                "--url",
                f"unix:{self.path}",
                "--token",
                "T",
                "ping",
            ],
            env=BASE_ENV,
            path="/",
        )
        self.assertEqual((out, code), (b"", 2))
        self.assertEqual(
            err.decode(),
            f"openclawctl: error: cannot connect to unix:{self.path}: this user may not open the socket {self.path} "
            "(its mode, or a directory above it); run openclawctl as a user the gateway's --listen "
            "unix:PATH:mode= lets in\n",
        )

    @inlineCallbacks
    def test_nothing_listens(self):
        """
        A socket file nothing listens on (left by a gateway that was
        killed), or a file that is no socket.
        """
        left = socket.socket(socket.AF_UNIX)
        left.bind(str(self.path))
        left.close()
        out, err, code = yield run_ctl("--url", f"unix:{self.path}", "--token", "T", "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertEqual(
            err,
            f"openclawctl: error: cannot connect to unix:{self.path}: nothing listens on {self.path} (a socket "
            "file left by a gateway that stopped?); is the gateway running, and is this its --listen unix: path?\n",
        )
        self.path.unlink()
        self.path.write_text("")
        out, err, code = yield run_ctl("--url", f"unix:{self.path}", "--token", "T", "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertEqual(
            err,
            f"openclawctl: error: cannot connect to unix:{self.path}: {self.path} is a regular file, not a socket; "
            "give the gateway's --listen unix: path\n",
        )
