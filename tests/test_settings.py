"""
Configuration: where each value comes from, and the one clear line a bad
value gets.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from openclaw.control.admission import PeerAllowlist, normalise
from openclaw.providers import BUILTIN_PROVIDERS, ProviderRegistry
from openclaw.settings import ConfigError, Settings, load_settings, misspelt_settings, unread_lines
from openclaw.settings.directories import default_state_dir
from openclaw.settings.errors import HostTrouble
from openclaw.settings.permissions import check_private_file
from tests.support import KIMI_AND_GEMINI, make_ca, make_unwritable

GOOD_SECRET = "x" * 32


class LoadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.environ: dict[str, str] = {}
        self.patch(os, "environ", self.environ)
        self.cwd = Path(self.mktemp())
        self.cwd.mkdir(parents=True)

    def load(self, options: dict[str, str] | None = None, env_file: str | None = None) -> Settings:
        return load_settings(options, env_file=env_file, cwd=self.cwd)

    def assertConfigError(self, *expected: str, **options: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.load(options)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        for part in expected:
            self.assertIn(part, message)

    def test_interface_in_brackets(self) -> None:
        """
        C{--interface [::1]} (as a URL writes an IPv6 address) is refused
        in one line saying to drop the brackets; it failed when listening,
        "Name or service not known" (re-attack s19).
        """
        self.assertConfigError(
            "INTERFACE='[::1]' (from the command line) is invalid: an IPv6 address is given without brackets",
            INTERFACE="[::1]",
        )
        self.assertEqual(self.load({"INTERFACE": "::1"}).interface, "::1")

    def test_interface_not_an_address(self) -> None:
        """
        An C{INTERFACE} that is no IP address (C{999.1.1.1}, a host name)
        is refused as an empty one is, in one line saying to use an IP
        address (trial s31: it was looked up when listening, "Name or
        service not known", exit status 1).  IPv4, IPv6 and an IPv6
        address with its zone are taken as given.
        """
        for bad in ("999.1.1.1", "localhost", "127.0.0.1%lo", "::1/128", "1.2.3", ""):
            self.assertConfigError(
                f"INTERFACE={bad!r} (from the command line) is invalid: use an IP address such as :: (every "
                "address), 127.0.0.1 or fe80::1%eth0 (link-local, with its zone), not a host name",
                INTERFACE=bad,
            )
        for good in ("127.0.0.1", "0.0.0.0", "::", "::1", "::ffff:127.0.0.1", "fe80::1%eth0", "fe80::1%2"):
            self.assertEqual(self.load({"INTERFACE": f" {good} "}).interface, good)

    def test_gateway_api_keys(self) -> None:
        """
        C{GATEWAY_API_KEYS} holds bearer tokens (RFC 6750 section 2.1) of
        at least 16 characters: a short key, or one with a character an
        C{Authorization: Bearer} header cannot carry (a space, a control
        character, a non-ASCII letter, C{=} inside), is refused in one line
        naming the key by its place, never by its value, with how to make
        one.  Blanks around keys and empty entries are dropped.
        """
        good = "gw-key-0123456789abcdef"
        self.environ["GATEWAY_API_KEYS"] = f" {good} ,, AbC+/_.~-0123456789== "
        self.assertEqual(self.load().gateway_api_keys, (good, "AbC+/_.~-0123456789=="))
        for bad, why in [
            ("short-key-12345", "entry 3 of 3 is 15 characters long (= padding aside); a key must be at least 16"),
            ("a===============", "entry 3 of 3 is 1 characters long (= padding aside)"),
            ("k" * 1025, "entry 3 of 3 is 1025 characters long; a key must be at most 1024"),
            ("gw-key 0123456789abcdef", "entry 3 of 3 holds a character a bearer token cannot (RFC 6750 section 2.1"),
            ("gw-key-0123456789\x01abcdef", "entry 3 of 3 holds a character a bearer token cannot"),
            ("gw-key-0123456789abcdéf", "entry 3 of 3 holds a character a bearer token cannot"),
            ("gw-key-01234=56789abcdef", "entry 3 of 3 holds a character a bearer token cannot"),
        ]:
            # The place counts the empty entry too: what the operator sees.
            self.environ["GATEWAY_API_KEYS"] = f"{good},,{bad}"
            with self.assertRaises(ConfigError) as caught:
                self.load()
            message = str(caught.exception)
            self.assertIn(f"GATEWAY_API_KEYS' {why}", message)
            self.assertIn("(the value came from the environment)", message)
            self.assertIn("secrets.token_urlsafe(32)", message)
            self.assertNotIn(bad, message)
            self.assertNotIn(good, message)
            self.assertNotIn("\n", message)
        # A provider's keys are the provider's: not held to this rule.
        self.environ.update(GATEWAY_API_KEYS=good, KIMI_API_KEYS="k1, k2")
        self.assertEqual(self.load().providers["kimi"].keys, ("k1", "k2"))

    def test_provider_key_with_a_space(self) -> None:
        """
        A provider key holding a space or a control character (an env
        file's C{# comment} after it: host trial s21, every Kimi call then
        a 502) is refused in one line, never showing the key; blanks
        around it go.
        """
        self.environ["KIMI_API_KEY"] = " sk-kimi-0123 "
        self.assertEqual(self.load().providers["kimi"].keys, ("sk-kimi-0123",))
        for name, value, said in (
            ("KIMI_API_KEY", "sk-kimi-0123 # prod", "KIMI_API_KEY (from the environment) is invalid: the key holds"),
            ("KIMI_API_KEY", "sk-kimi\x010123", "the key holds a space or a control character"),
            ("GEMINI_API_KEYS", "AIza-1,AIza-2 # spare", "is invalid: entry 2 of 2 holds a space or a control"),
        ):
            self.environ.pop("KIMI_API_KEY", None)
            self.environ[name] = value
            with self.assertRaises(ConfigError) as caught:
                self.load()
            message = str(caught.exception)
            self.assertIn(said, message)
            self.assertIn("a '# comment' after the value is part of it", message)
            self.assertNotIn("0123", message)
            self.assertNotIn("AIza", message)
            del self.environ[name]

    def test_provider_base_urls(self) -> None:
        """
        A provider's base URL is checked whole at start-up: one line naming
        the variable and what is wrong (before, these started and every call
        failed with Python's own words, a password included, or start-up
        crashed with a traceback), the password never shown.
        """
        for value, said in (
            ("http://svc:Pa55w0rdSecret@127.0.0.1:9/gemini/v1beta", "a user or password"),
            # A password urlsplit's errors would quote, or that it reads as a path.
            ("https://user:Pa55w0rdSecret/cd@host/v1", "a user or password"),
            ("https://user:1234/Pa55w0rdSecret@api.example.com", "a user or password"),
            ("https://Pa55w0rdSecret@api.example.com/v1", "a user or password"),
            ("http://", "names no host"),
            ("http://127.0.0.1:99999/v1", "port out of range"),
            ("http://exa mple.com/v1", "holds a space"),
            ("https://example.com/v1?x=1", "leave out ?query and #fragment"),
            ("https://example.com/v1#top", "leave out ?query and #fragment"),
            # Gemini's key as a query parameter: not shown either.
            ("https://example.com/v1beta?key=Pa55w0rdSecret", "leave out ?query and #fragment"),
            ("https://example.com/v1beta#key=Pa55w0rdSecret", "leave out ?query and #fragment"),
            ("http://[::1/v1", "it is not a URL"),
            ("ftp://example.com/v1", "use an http:// or https:// URL"),
            # An IPv6 zone, or a port glued to the bracket: a traceback at
            # start-up (recheck s41).
            ("http://[::1%25lo]:8/v1", "has a zone"),
            ("http://[fe80::1%eth0]/v1", "has a zone"),
            ("http://[::1]8080/v1", "comes ':' and a port"),
            # Without brackets (recheck s41: "port could not be cast to
            # integer").
            ("http://::1:8080/v1", "an IPv6 address goes in brackets"),
            # Taken by hyperlink, then looked up by name, or failing at
            # every request (review 2 s41).
            ("http://[evil.example]/v1", "goes an IPv6 address alone"),
            ("http://[v1.x]/v1", "goes an IPv6 address alone"),
            ("http://h:1_0/v1", "not written in ASCII digits"),
            ("http://h:+80/v1", "not written in ASCII digits"),
            ("http://h:\u0668\u0660/v1", "not written in ASCII digits"),
            ("http://%68ost/v1", "neither a name"),
            ("http://a..b/v1", "neither a name"),
            ("http://h;x/v1", "neither a name"),
        ):
            self.environ["GEMINI_BASE_URL"] = value
            self.assertConfigError("GEMINI_BASE_URL=", said)
            with self.assertRaises(ConfigError) as caught:
                self.load()
            self.assertNotIn("Pa55w0rdSecret", str(caught.exception))
        # The scheme's advice only where the scheme is wrong (recheck s41:
        # it ended every refusal).
        self.environ["GEMINI_BASE_URL"] = "http://127.0.0.1:99999/v1"
        with self.assertRaises(ConfigError) as caught:
            self.load()
        self.assertNotIn("http:// or https://", str(caught.exception))
        self.environ["GEMINI_BASE_URL"] = "http://[::1]:8080/gemini/v1beta/"
        self.assertEqual(self.load().providers["gemini"].base_url, "http://[::1]:8080/gemini/v1beta")
        # A name with '_', an international one, a trailing dot: taken.
        for taken in ("http://kimi_proxy:8000/v1", "http://m\u00fcnchen.example/v1", "http://api.example./v1"):
            self.environ["GEMINI_BASE_URL"] = taken
            self.assertEqual(self.load().providers["gemini"].base_url, taken)
        # A scheme in any case (RFC 3986 section 3.1), given in lower case.
        self.environ["GEMINI_BASE_URL"] = "HTTPS://Example.com/v1beta"
        self.assertEqual(self.load().providers["gemini"].base_url, "https://Example.com/v1beta")

    def test_model_names_bounded(self) -> None:
        self.environ["KIMI_MODEL"] = "m" * 257
        self.assertConfigError("KIMI_MODEL=", "is invalid")
        self.environ["KIMI_MODEL"] = "m" * 256
        self.assertEqual(self.load().default_model("kimi"), "m" * 256)

    def test_token_file_in_a_state_dir_to_be_made(self) -> None:
        """
        A token file in the STATE_DIR the gateway is to make: the directory
        is made first, then the token file's is checked (it exists now).
        """
        state = self.cwd / "state"
        self.environ["STATE_DIR"] = str(state)
        self.environ["TOKEN_FILE"] = str(state / "token")
        settings = self.load()
        absolute = state.absolute()
        self.assertEqual((settings.state_dir, settings.token_file), (absolute, absolute / "token"))
        self.assertTrue(state.is_dir())

    def test_state_dir_parents_under_umask_000(self) -> None:
        """
        The parents of a STATE_DIR to be made are made 0755, not 0777
        under umask 000, which the state directory's rule then refused
        (host trial s21: "run: chmod o-w" on a directory it had removed).
        """
        previous = os.umask(0)
        try:
            settings = self.load({"STATE_DIR": str(self.cwd / "a" / "b" / "state")})
        finally:
            os.umask(previous)
        self.assertEqual(stat.S_IMODE((self.cwd / "a").stat().st_mode), 0o755)
        self.assertEqual(stat.S_IMODE(settings.state_dir.stat().st_mode), 0o700)

    def test_state_dir_on_a_read_only_file_system(self) -> None:
        """
        A STATE_DIR on a read-only file system is the host's trouble
        (exit status 1, which a unit manager retries), said so: it was
        "not writable; create it (mode 0700)", a configuration error, for
        a directory of the right owner and mode (operator trial s46).
        """
        state = (self.cwd / "state").resolve()
        state.mkdir(mode=0o700)

        class ReadOnly:
            f_flag = os.ST_RDONLY

        writable = os.access
        self.patch(os, "statvfs", lambda path: ReadOnly())
        self.patch(
            os,
            "access",
            lambda path, mode, **kw: False if Path(path).resolve() == state else writable(path, mode, **kw),
        )
        with self.assertRaises(HostTrouble) as caught:
            self.load({"STATE_DIR": str(state)})
        self.assertIn(
            f"STATE_DIR={str(state)!r} cannot be used: it is on a read-only file system; remount that file system "
            "read-write",
            str(caught.exception),
        )

    def test_state_dir_under_procfs(self) -> None:
        """
        A STATE_DIR whose parent is there and still answers ENOENT (procfs)
        is refused in one line, where making it recursed until Python's
        RecursionError (review s29).
        """
        self.assertConfigError(
            "STATE_DIR='/proc/x/state' cannot be used (No such file or directory)", STATE_DIR="/proc/x/state"
        )

    def test_log_level(self) -> None:
        """
        LOG_LEVEL's case is ignored, and C{warning} (Python's and syslog's
        name) is C{warn}: it was refused while C{INFO} was taken.
        """
        for given, kept in (
            ("INFO", "info"),
            ("warning", "warn"),
            ("WARNING", "warn"),
            ("Warn", "warn"),
            (" debug ", "debug"),
            ("Critical", "critical"),
        ):
            self.environ["LOG_LEVEL"] = given
            self.assertEqual(self.load().log_level, kept, given)
        self.environ["LOG_LEVEL"] = "verbose"
        self.assertConfigError("LOG_LEVEL='verbose'", "use debug, info, warn (or warning), error or critical")

    def test_unix_listeners_made_absolute(self) -> None:
        """
        A unix: listener's relative path is made absolute against the
        working directory at launch: Twisted binds it when the service
        starts, after twistd's -d DIR changed the working directory (daemon
        trial s18).  The rest of the endpoint string is kept, its escapes
        too; other endpoints are left as they are.
        """
        here = Path.cwd()
        for given, kept in (
            ("unix:run/control.sock:mode=600", f"unix:{here}/run/control.sock:mode=600"),
            (" unix:address=c.sock:lockfile=1 ", f"unix:address={here}/c.sock:lockfile=1"),
            ("unix:a\\:b\\=c.sock", f"unix:{here}/a\\:b\\=c.sock"),
            ("unix:/run/openclaw/control.sock:mode=600", "unix:/run/openclaw/control.sock:mode=600"),
            ("tcp:18789:interface=127.0.0.1", "tcp:18789:interface=127.0.0.1"),
            ("ssl:443:privateKey=key.pem", "ssl:443:privateKey=key.pem"),
        ):
            for name in ("CONTROL_LISTEN", "API_LISTEN", "METRICS_LISTEN"):
                self.assertEqual(getattr(self.load({name: given}), name.lower()), kept, (name, given))

    def test_defaults(self) -> None:
        settings = self.load()
        self.assertEqual(settings.port, 18789)
        self.assertEqual(settings.session_ttl_hours, 24.0)
        self.assertEqual(settings.default_provider, "gemini")
        self.assertEqual(settings.provider_ids, tuple(p.id for p in BUILTIN_PROVIDERS))
        self.assertEqual(settings.default_model("kimi"), "moonshot-v1-8k")
        self.assertEqual(settings.default_model("gemini"), "gemini-flash-latest")
        self.assertEqual(settings.providers["kimi"].base_url, "https://api.moonshot.ai/v1")
        self.assertEqual(settings.providers["gemini"].base_url, "https://generativelanguage.googleapis.com/v1beta")
        self.assertEqual(
            settings.trusted_clients,
            (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128")),
        )
        self.assertIn(settings.interface, ("::", "0.0.0.0"))

    def test_ephemeral_secret(self) -> None:
        """
        With JWT_SECRET unset or empty, every load makes a new random 32-byte
        secret and says it is ephemeral.
        """
        first, second = self.load(), self.load()
        self.assertTrue(first.jwt_secret_is_ephemeral)
        self.assertEqual(len(first.jwt_secret), 32)
        self.assertNotEqual(first.jwt_secret, second.jwt_secret)
        self.environ["JWT_SECRET"] = ""
        self.assertTrue(self.load().jwt_secret_is_ephemeral)

    def test_secret_kept_out_of_repr(self) -> None:
        self.environ["JWT_SECRET"] = GOOD_SECRET
        self.environ["GEMINI_API_KEY"] = "AIza-secret-key"
        settings = self.load()
        self.assertEqual(settings.jwt_secret, GOOD_SECRET.encode())
        self.assertFalse(settings.jwt_secret_is_ephemeral)
        self.assertNotIn(GOOD_SECRET, repr(settings))
        self.assertNotIn("AIza-secret-key", repr(settings))

    def test_priority(self) -> None:
        """
        Option beats environment beats env file beats default.
        """
        env_file = self.cwd / "custom.env"
        env_file.write_text("WS_CONTROL_PORT=1111\nSESSION_TTL_HOURS=2\nKIMI_MODEL='from-file'\n")
        settings = self.load(env_file=str(env_file))
        self.assertEqual(
            (settings.port, settings.session_ttl_hours, settings.default_model("kimi")), (1111, 2.0, "from-file")
        )
        self.environ["WS_CONTROL_PORT"] = "2222"
        self.assertEqual(self.load(env_file=str(env_file)).port, 2222)
        self.assertEqual(self.load({"WS_CONTROL_PORT": "3333"}, env_file=str(env_file)).port, 3333)

    def test_dotenv_in_working_directory(self) -> None:
        (self.cwd / ".env").write_text("# comment\nDEFAULT_PROVIDER=kimi\n")
        self.assertEqual(self.load().default_provider, "kimi")

    def test_comment_after_a_value_said_so(self) -> None:
        """
        A number refused for the '# comment' an env file's line holds after
        it (python-decouple reads it as part of the value) is told so, as
        a key or model is (trial s30).
        """
        (self.cwd / ".env").write_text("USAGE_RETENTION_DAYS=30 # keep a month\n")
        with self.assertRaises(ConfigError) as caught:
            self.load()
        self.assertIn(
            "use a whole number of days from 1 to 36500 (100 years), such as 90 (in an env file, a '# comment' "
            "after the value is part of it: put the comment on a line of its own)",
            str(caught.exception),
        )
        (self.cwd / ".env").write_text("USAGE_RETENTION_DAYS=thirty\n")
        with self.assertRaises(ConfigError) as caught:
            self.load()
        self.assertNotIn("# comment", str(caught.exception))

    def test_missing_env_file(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.load(env_file=str(self.cwd / "nope.env"))
        self.assertIn("nope.env", str(caught.exception))
        self.assertIn("does not exist", str(caught.exception))

    def test_env_file_changed_between_reads(self) -> None:
        """
        A name the env file held when its lines were read, gone from it
        when decouple read it (the file changed between the two reads), is
        left out, even when the environment sets it (decouple's
        C{__contains__} asks the environment too: its C{__getitem__}
        raised C{KeyError}).
        """
        from decouple import RepositoryEnv

        from openclaw.settings import EnvFileLines

        path = self.cwd / "gw.env"
        path.write_text("KIMI_MODEL=a\nSESSION_TTL_HOURS=2\n")
        lines = EnvFileLines.read(str(path))
        path.write_text("SESSION_TTL_HOURS=3\n")
        self.patch(os, "environ", {**os.environ, "KIMI_MODEL": "from-the-environment"})
        self.assertEqual(lines.values(RepositoryEnv(str(path))), {"SESSION_TTL_HOURS": "3"})

    def test_env_file_not_a_regular_file(self) -> None:
        """
        A FIFO or a directory given as the env file is said to be one, not
        said not to exist (re-check s33).
        """
        fifo = self.cwd / "gw.env"
        os.mkfifo(fifo)
        for given in (fifo, self.cwd):
            with self.assertRaises(ConfigError) as caught:
                self.load(env_file=str(given))
            self.assertIn("is not a regular file", str(caught.exception))
            self.assertNotIn("does not exist", str(caught.exception))

    def test_invalid_port(self) -> None:
        self.assertConfigError("WS_CONTROL_PORT", "'abc'", "1 to 65535", WS_CONTROL_PORT="abc")
        self.assertConfigError("WS_CONTROL_PORT", "'0'", WS_CONTROL_PORT="0")
        self.assertConfigError("WS_CONTROL_PORT", "'65536'", WS_CONTROL_PORT="65536")

    def test_one_port_for_two_listeners(self) -> None:
        """
        The control plane and the API on the same port of INTERFACE is one
        line naming both settings, where each came from and what to change;
        an endpoint string in place of either port is not compared.
        """
        self.assertConfigError(
            "WS_CONTROL_PORT and API_PORT are both 28013 (WS_CONTROL_PORT from the command line, "
            "API_PORT from the command line): the control plane and the API need a port each; "
            "change one (--port or --api-port)",
            WS_CONTROL_PORT="28013",
            API_PORT="28013",
        )
        self.environ["WS_CONTROL_PORT"] = "18790"
        self.assertConfigError("both 18790 (WS_CONTROL_PORT from the environment, API_PORT the default)")
        self.environ.clear()
        (self.cwd / ".env").write_text("API_PORT=18789\n")
        self.assertConfigError("both 18789 (WS_CONTROL_PORT the default, API_PORT from env file")
        (self.cwd / ".env").unlink()
        for listen in ("CONTROL_LISTEN", "API_LISTEN"):
            settings = self.load({"WS_CONTROL_PORT": "28013", "API_PORT": "28013", listen: "tcp:28014"})
            self.assertEqual((settings.port, settings.api_port), (28013, 28013))
        self.assertEqual(self.load({"WS_CONTROL_PORT": "28013", "API_PORT": "28014"}).api_port, 28014)

    def test_invalid_ttl(self) -> None:
        self.assertConfigError("SESSION_TTL_HOURS", "'-1'", SESSION_TTL_HOURS="-1")
        self.assertConfigError("SESSION_TTL_HOURS", "'0'", SESSION_TTL_HOURS="0")
        self.assertConfigError("SESSION_TTL_HOURS", "'nan'", SESSION_TTL_HOURS="nan")
        self.assertEqual(self.load({"SESSION_TTL_HOURS": "0.25"}).session_ttl_hours, 0.25)

    def test_ttl_lower_bound(self) -> None:
        """
        A token of less than 10 seconds is refused (0.00000001 made one born
        expired: a single instance's control plane shut until a restart).
        """
        for value in ("0.00000001", "0.0027"):
            self.assertConfigError("SESSION_TTL_HOURS", "at least 10 seconds (0.0028)", SESSION_TTL_HOURS=value)
        self.assertEqual(self.load({"SESSION_TTL_HOURS": "0.003"}).session_ttl_hours, 0.003)

    def test_invalid_ip(self) -> None:
        self.assertConfigError("TRUSTED_CLIENT_IPS", "300.1.1.1", TRUSTED_CLIENT_IPS="300.1.1.1")
        self.assertConfigError("TRUSTED_CLIENT_IPS", TRUSTED_CLIENT_IPS="10.0.0.1/8")

    def test_empty_allowlist_warned(self) -> None:
        """
        An empty TRUSTED_CLIENT_IPS with a TCP control listener is a
        warning (host trial s21: it started, then refused every control
        connection); with a unix: listener it is a choice.
        """
        (warning,) = self.load({"TRUSTED_CLIENT_IPS": ""}).warnings
        self.assertIn("TRUSTED_CLIENT_IPS is empty (from the command line): every control-plane connection", warning)
        socket_path = self.cwd / "control.sock"
        self.assertEqual(self.load({"TRUSTED_CLIENT_IPS": "", "CONTROL_LISTEN": f"unix:{socket_path}"}).warnings, ())

    def test_port_digits_ascii(self) -> None:
        for written in ("\uff14\uff12\uff11\uff19\uff13", "+42193", "4_2193"):
            self.assertConfigError("API_PORT", API_PORT=written)
            # And in a listener's endpoint string (re-attack s21).
            self.assertConfigError("API_LISTEN", "is not a number of ASCII digits", API_LISTEN=f"tcp:{written}")
            self.assertConfigError("CONTROL_LISTEN", "ASCII digits", CONTROL_LISTEN=f"tcp:port={written}")
        self.assertEqual(self.load({"API_PORT": " 42193 "}).api_port, 42193)

    def test_numbers_as_written(self) -> None:
        """
        A number with "_" between digits (which Python's int and float
        take) or in another script's digits is refused as API_PORT is
        (hostile trial s40: MAX_REQUEST_BYTES=1_000 and UPSTREAM_TIMEOUT=6_0
        were taken).
        """
        for name, written, why in (
            ("MAX_REQUEST_BYTES", "1_000_000", "without '_' between digits"),
            ("UPSTREAM_TIMEOUT", "6_0", "without '_' between digits"),
            ("SESSION_TTL_HOURS", "2_4", "without '_' between digits"),
            ("UPSTREAM_TIMEOUT", "\uff16\uff10", "in ASCII digits"),
        ):
            # Saying why (recheck s41: only the setting's usual hint).
            self.assertConfigError(name, why, **{name: written})
        self.assertEqual(self.load({"UPSTREAM_TIMEOUT": " 60 "}).upstream_timeout, 60.0)
        self.assertEqual(self.load({"MAX_REQUEST_BYTES": "1000000"}).max_request_bytes, 1000000)

    def test_ttl_upper_bound(self) -> None:
        self.assertConfigError("SESSION_TTL_HOURS", "87600", SESSION_TTL_HOURS="1e8")

    def test_token_file_directory_checked(self) -> None:
        self.assertConfigError("TOKEN_FILE", "does not exist", TOKEN_FILE=str(self.cwd / "missing" / "token"))
        # Kept absolute (twistd's -d changes the working directory later).
        self.assertEqual(self.load({"TOKEN_FILE": str(self.cwd / "token")}).token_file, self.cwd.absolute() / "token")

    def test_token_file_directory_not_writable(self) -> None:
        """
        A directory that exists but cannot be written is said to be so,
        not to be missing.
        """
        locked = self.cwd / "locked"
        locked.mkdir()
        make_unwritable(self, locked)
        self.assertConfigError("TOKEN_FILE", "is not writable by the gateway's user", TOKEN_FILE=str(locked / "token"))

    def test_invalid_provider(self) -> None:
        """
        The refusal lists the providers declared (here pinned to two, not
        read from BUILTIN_PROVIDERS).
        """
        with self.assertRaises(ConfigError) as caught:
            load_settings({"DEFAULT_PROVIDER": "openai"}, cwd=self.cwd, providers=KIMI_AND_GEMINI)
        message = str(caught.exception)
        for part in ("DEFAULT_PROVIDER", "'openai'", "use kimi or gemini"):
            self.assertIn(part, message)

    def test_short_secret(self) -> None:
        self.assertConfigError("JWT_SECRET", "32 bytes", JWT_SECRET="short")

    def test_secret_not_utf8_never_shown(self) -> None:
        """
        A JWT_SECRET holding bytes the environment could not decode
        (os.environ's surrogateescape, U+DCFF for a byte 0xff) is refused
        without showing it: it was quoted whole in the refusal.
        """
        for options in ({"JWT_SECRET": "topsecret-value-\udcff-abcdefghijklmnopqrstuvwxyz"},):
            with self.assertRaises(ConfigError) as caught:
                self.load(options)
            message = str(caught.exception)
            self.assertIn("JWT_SECRET holds bytes that are not UTF-8", message)
            self.assertNotIn("topsecret", message)

    def test_networks(self) -> None:
        settings = self.load({"TRUSTED_CLIENT_IPS": "203.0.113.42, 10.0.0.0/8,::1,::ffff:192.0.2.7"})
        self.assertEqual(
            settings.trusted_clients,
            (
                ipaddress.ip_network("203.0.113.42/32"),
                ipaddress.ip_network("10.0.0.0/8"),
                ipaddress.ip_network("::1/128"),
                ipaddress.ip_network("192.0.2.7/32"),
            ),
        )

    def test_secret_from_file(self) -> None:
        path = self.cwd / "secret"
        path.write_bytes(b"f" * 40 + b"\n")
        self.environ["JWT_SECRET_FILE"] = str(path)
        settings = self.load()
        self.assertEqual(settings.jwt_secret, b"f" * 40)
        self.assertFalse(settings.jwt_secret_is_ephemeral)
        path.write_bytes(b"short\n")
        self.assertConfigError(f"the secret in JWT_SECRET_FILE={str(path)!r} is 5 bytes long")
        self.environ["JWT_SECRET_FILE"] = str(self.cwd / "missing")
        self.assertConfigError("JWT_SECRET_FILE", "cannot be read", "make it readable by the gateway's user")
        self.environ["JWT_SECRET"] = GOOD_SECRET
        self.assertConfigError("both set")

    def test_refusals_say_where_the_value_came_from(self) -> None:
        """
        The refusal of a value says where the value came from, whichever
        of the command line, the environment or an env file gave it (README
        audit s18 F6: PRICES_FILE's and JWT_SECRET's did not); the settings
        keep where each given value came from, for the refusals made once
        they are read (L{Settings.source}).
        """
        prices = self.cwd / "prices.json"
        prices.write_text("not json")
        secret = self.cwd / "secret"
        secret.write_bytes(b"short\n")
        secret.chmod(0o600)
        env_file = self.cwd / "openclaw.env"
        cases = [
            ("PRICES_FILE", str(prices), f"PRICES_FILE={str(prices)!r} is not JSON"),
            ("PRICES_FILE", str(self.cwd / "gone.json"), "PRICES_FILE=", "cannot be read: No such file"),
            ("JWT_SECRET", "short", "JWT_SECRET is 5 bytes long", "at least 32 bytes"),
            ("JWT_SECRET_FILE", str(secret), f"the secret in JWT_SECRET_FILE={str(secret)!r} is 5 bytes long"),
            ("REDIS_URL", "redis://:top#secret@h/0", "REDIS_URL='redis://:***@h/0' has a #"),
            ("REDIS_URL", "redis://h/x", "REDIS_URL='redis://h/x' is invalid"),
            ("REDIS_URL", "redis://h/0", "REDIS_URL is set (", ") but JWT_SECRET (or JWT_SECRET_FILE) is not"),
            ("WORKERS", "2", "WORKERS (--workers)=2 (", ") needs REDIS_URL"),
        ]
        for name, value, *expected in cases:
            for where in ("from the command line", "from the environment", f"from env file {str(env_file)!r}"):
                self.environ.clear()
                options: dict[str, str] = {}
                env_file.write_text("")
                if where == "from the command line":
                    options[name] = value
                elif where == "from the environment":
                    self.environ[name] = value
                else:
                    env_file.write_text(f"{name}={value}\n")
                with self.assertRaises(ConfigError) as caught:
                    self.load(options, env_file=str(env_file))
                message = str(caught.exception)
                for part in (*expected, where):
                    self.assertIn(part, message, (name, value, where))
                self.assertNotIn("top#secret", message)
        self.environ.clear()
        self.environ["JWT_SECRET"] = GOOD_SECRET
        self.assertConfigError(
            "JWT_SECRET (from the environment) and JWT_SECRET_FILE (from the command line) are both set",
            JWT_SECRET_FILE=str(secret),
        )
        settings = self.load({"WS_CONTROL_PORT": "18001"})
        self.assertEqual(
            (settings.source("WS_CONTROL_PORT"), settings.source("JWT_SECRET"), settings.source("API_PORT")),
            ("from the command line", "from the environment", None),
        )

    def test_limits(self) -> None:
        settings = self.load({"MAX_MESSAGE_BYTES": "1024", "ALLOWED_ORIGINS": "https://Ops.example:8443/, http://a.b"})
        self.assertEqual(settings.max_message_bytes, 1024)
        self.assertEqual(settings.allowed_origins, ("https://ops.example:8443", "http://a.b"))
        self.assertConfigError("ALLOWED_ORIGINS", ALLOWED_ORIGINS="ops.example")
        self.assertConfigError("ALLOWED_ORIGINS", ALLOWED_ORIGINS="null")
        self.assertConfigError("MAX_CONNECTIONS", MAX_CONNECTIONS="0")
        # A rotated token or a new key must fit in an answer.
        self.assertConfigError("MAX_MESSAGE_BYTES", MAX_MESSAGE_BYTES="1023")
        self.assertConfigError("PING_TIMEOUT_SECONDS", "1 or more", PING_TIMEOUT_SECONDS="0.5")
        # Not a whole number, but 1 or more: taken.
        self.assertEqual(self.load({"PING_TIMEOUT_SECONDS": "2.5"}).ping_timeout_seconds, 2.5)
        self.assertConfigError("TRUSTED_PROXIES", TRUSTED_PROXIES="nginx")

    def test_count_bounds(self) -> None:
        """
        The whole-number settings that took 99999999999999999999999 (trial
        s31: AUTH_LOCKOUT_FAILURES dropped the connection of the first
        failed authentication with an OverflowError, USAGE_RETENTION_DAYS
        far larger stopped start-up with a traceback) each have an upper
        bound, itself taken: above it, or below 1, is one line naming the
        setting, the value, where it came from and the range.  The
        defaults are unchanged.
        """
        defaults = Settings()
        bounds = {
            "MAX_REQUEST_BYTES": (1, 1024**3),
            "MAX_MESSAGE_BYTES": (1024, 64 * 1024**2),
            "MAX_AUTH_FAILURES": (1, 1000),
            "AUTH_LOCKOUT_FAILURES": (1, 1000),
            "BREAKER_FAILURES": (1, 10**9),
            "API_MAX_CONNECTIONS_PER_ADDRESS": (1, 2**31 - 1),
            "API_KEYLESS_CONNECTIONS_PER_ADDRESS": (1, 2**31 - 1),
            "USAGE_RETENTION_DAYS": (1, 36500),
            "CONSUMER_RESERVE_TOKENS": (1, 10**6),
            # And these, from the review of the bounds (s31).
            "MAX_CONNECTIONS": (1, 2**31 - 1),
            "API_MAX_CONNECTIONS": (1, 2**31 - 1),
            "UPSTREAM_POOL_SIZE": (1, 2**31 - 1),
        }
        loaded = self.load()
        for name, (low, high) in bounds.items():
            attribute = name.lower()
            self.assertEqual(getattr(loaded, attribute), getattr(defaults, attribute), name)
            self.assertEqual(getattr(self.load({name: str(low)}), attribute), low, name)
            self.assertEqual(getattr(self.load({name: str(high)}), attribute), high, name)
            for value in (str(high + 1), "99999999999999999999999", str(low - 1)):
                self.assertConfigError(
                    f"{name}={value!r} (from the command line) is invalid: use a whole number",
                    f"from {low}",
                    f"to {high}",
                    **{name: value},
                )
        self.environ.update(REDIS_URL="redis://127.0.0.1:6379", JWT_SECRET="j" * 32)
        self.assertEqual(self.load({"WORKERS": "1024"}).workers, 1024)
        self.assertConfigError("WORKERS='1025' (from the command line) is invalid", "from 1 to 1024", WORKERS="1025")
        del self.environ["REDIS_URL"], self.environ["JWT_SECRET"]
        self.environ["USAGE_RETENTION_DAYS"] = "36501"
        self.assertConfigError(
            "USAGE_RETENTION_DAYS='36501' (from the environment) is invalid: use a whole number of days from 1 to "
            "36500 (100 years), such as 90"
        )

    def test_api_send_timeout(self) -> None:
        """
        API_SEND_TIMEOUT_SECONDS: 60 by default, seconds above 0.
        """
        self.assertEqual(self.load().api_send_timeout_seconds, 60.0)
        self.assertEqual(self.load({"API_SEND_TIMEOUT_SECONDS": "2.5"}).api_send_timeout_seconds, 2.5)
        self.assertConfigError(
            "API_SEND_TIMEOUT_SECONDS", "at least 0.1 and at most 2592000", API_SEND_TIMEOUT_SECONDS="0"
        )
        self.assertConfigError("API_SEND_TIMEOUT_SECONDS", API_SEND_TIMEOUT_SECONDS="soon")

    def test_duration_bounds(self) -> None:
        """
        Every setting in seconds is at most 30 days (BREAKER_COOLDOWN_SECONDS
        =1e308 was taken and told as a Retry-After of 309 digits), so a
        week's lockout is taken; the deadlines of network exchanges and
        Redis's are at least 0.1 s (UPSTREAM_TIMEOUT=1e-9 was taken: every
        call timed out), so half a second is taken.  Each bound itself is
        taken; the defaults are unchanged.
        """
        defaults = Settings()
        deadlines = (
            "HEALTH_CHECK_TIMEOUT",
            "UPSTREAM_TIMEOUT",
            "UPSTREAM_CONNECT_TIMEOUT",
            "UPSTREAM_STREAM_MAX_SECONDS",
            "API_HEADER_TIMEOUT_SECONDS",
            "API_BODY_TIMEOUT_SECONDS",
            "API_SEND_TIMEOUT_SECONDS",
            "AUTH_TIMEOUT_SECONDS",
            "API_KEYLESS_TIMEOUT_SECONDS",
            "REDIS_TIMEOUT_SECONDS",
            "REDIS_RECONNECT_MAX_SECONDS",
        )
        lowest = {
            **dict.fromkeys(deadlines, "0.1"),
            **dict.fromkeys(("HANDSHAKE_TIMEOUT_SECONDS", "PING_INTERVAL_SECONDS", "PING_TIMEOUT_SECONDS"), "1"),
            "SHUTDOWN_GRACE_SECONDS": "0",
            # Tiny is no harm here: a breaker or a lockout barely held.
            **dict.fromkeys(
                (
                    "UPSTREAM_IDLE_SECONDS",
                    "BREAKER_COOLDOWN_SECONDS",
                    "AUTH_LOCKOUT_WINDOW_SECONDS",
                    "AUTH_LOCKOUT_SECONDS",
                ),
                "1e-9",
            ),
        }
        loaded = self.load()
        for name, low in lowest.items():
            attribute = name.lower()
            self.assertEqual(getattr(loaded, attribute), getattr(defaults, attribute), name)
            self.assertEqual(getattr(self.load({name: low}), attribute), float(low), name)
            self.assertEqual(getattr(self.load({name: "2592000"}), attribute), 2592000.0, name)
            for value in ("2592000.5", "1e308", "inf", "nan"):
                self.assertConfigError(f"{name}={value!r}", "at most 2592000 (30 days)", **{name: value})
            if float(low) >= 0.1:
                below = str(float(low) / 2) if float(low) else "-1"
                self.assertConfigError(f"{name}={below!r}", "is invalid", **{name: below})
        for name in deadlines:
            self.assertEqual(getattr(self.load({name: "0.5"}), name.lower()), 0.5, name)
            self.assertConfigError(f"{name}='1e-9'", "at least 0.1 and", **{name: "1e-9"})
        for name in ("AUTH_LOCKOUT_SECONDS", "AUTH_LOCKOUT_WINDOW_SECONDS"):
            # A week.
            self.assertEqual(getattr(self.load({name: "604800"}), name.lower()), 604800.0, name)
        self.assertConfigError("SHUTDOWN_GRACE_SECONDS='-1'", "0 or more", SHUTDOWN_GRACE_SECONDS="-1")

    def test_upstream_pool(self) -> None:
        """
        The provider connection pool: its size and idle timeout, defaults
        and bad values.
        """
        settings = self.load()
        self.assertEqual((settings.upstream_pool_size, settings.upstream_idle_seconds), (128, 50.0))
        self.assertIsNone(settings.upstream_ca_pem)
        settings = self.load({"UPSTREAM_POOL_SIZE": "8", "UPSTREAM_IDLE_SECONDS": "2.5"})
        self.assertEqual((settings.upstream_pool_size, settings.upstream_idle_seconds), (8, 2.5))
        self.assertConfigError("UPSTREAM_POOL_SIZE", "whole number", UPSTREAM_POOL_SIZE="0")
        self.assertConfigError("UPSTREAM_IDLE_SECONDS", "greater than 0", UPSTREAM_IDLE_SECONDS="0")
        self.assertConfigError("UPSTREAM_IDLE_SECONDS", UPSTREAM_IDLE_SECONDS="soon")

    def test_upstream_ca_file(self) -> None:
        """
        UPSTREAM_CA_FILE is read at start-up, once: a file of PEM
        certificates is taken (the provider client is built from what was
        read), a missing or unreadable one is one clear line.
        """
        ca = make_ca()
        path = self.cwd / "ca.pem"
        path.write_bytes(ca.pem)
        settings = self.load({"UPSTREAM_CA_FILE": str(path)})
        self.assertEqual(settings.upstream_ca_pem, ca.pem)
        # Read once: the file may change or go afterwards.
        path.unlink()
        registry = ProviderRegistry.from_settings(settings, reactor)
        self.addCleanup(registry.close)
        self.assertConfigError(
            "UPSTREAM_CA_FILE",
            "cannot be read",
            "point UPSTREAM_CA_FILE at another PEM file",
            UPSTREAM_CA_FILE=str(self.cwd / "missing.pem"),
        )
        path.write_bytes(b"not a certificate\n")
        self.assertConfigError("UPSTREAM_CA_FILE", "no readable PEM certificate", UPSTREAM_CA_FILE=str(path))

    def test_moonshot_alias(self) -> None:
        self.environ["MOONSHOT_API_KEY"] = "sk-alias"
        self.assertEqual(self.load().providers["kimi"].api_key, "sk-alias")
        self.environ["KIMI_API_KEY"] = "sk-main"
        self.assertEqual(self.load().providers["kimi"].api_key, "sk-main")
        # The base URL too (re-attack s21: a mainland account's URL given as
        # MOONSHOT_BASE_URL was ignored, every call sent to api.moonshot.ai).
        self.environ["MOONSHOT_BASE_URL"] = "https://api.moonshot.cn/v1"
        self.assertEqual(self.load().providers["kimi"].base_url, "https://api.moonshot.cn/v1")
        self.environ["KIMI_BASE_URL"] = "https://kimi.example/v1"
        self.assertEqual(self.load().providers["kimi"].base_url, "https://kimi.example/v1")
        del self.environ["KIMI_BASE_URL"]
        self.assertConfigError("MOONSHOT_BASE_URL", MOONSHOT_BASE_URL="ftp://x")

    def test_embedding_model(self) -> None:
        self.assertEqual(self.load().embedding_model, "gemini-embedding-001")
        for given in (
            "text-embedding-004",
            "gemini/text-embedding-004",
            "models/text-embedding-004",
            # The provider's id in any case, as in a request (recheck s41).
            "GEMINI/text-embedding-004",
            " Gemini/text-embedding-004 ",
        ):
            self.assertEqual(self.load({"EMBEDDING_MODEL": given}).embedding_model, "text-embedding-004")
        self.assertEqual(self.load().embedding_provider, "gemini")
        self.assertConfigError(
            "EMBEDDING_MODEL", "'kimi/x'", "kimi, which has no embeddings API", "(gemini)", EMBEDDING_MODEL="kimi/x"
        )
        self.assertConfigError("EMBEDDING_MODEL", "gemini-embedding-001", EMBEDDING_MODEL="gemini/")
        # A provider's id alone is a slip, not a model name.
        for given in ("kimi", "gemini"):
            self.assertConfigError(
                "EMBEDDING_MODEL", f"{given!r}", "names a provider, not a model", EMBEDDING_MODEL=given
            )

    def test_provider_ids_in_any_case(self) -> None:
        """
        DEFAULT_PROVIDER and FALLBACK take a provider's id in any case, as
        a request's model prefix does (recheck s41: KIMI was refused).
        """
        settings = self.load({"DEFAULT_PROVIDER": " KIMI ", "FALLBACK": "Gemini, KIMI"})
        self.assertEqual((settings.default_provider, settings.fallback), ("kimi", ("gemini", "kimi")))

    def test_provider_model_prefix(self) -> None:
        """
        A provider's model setting written <provider>/<model>: its own
        prefix, in any case, is dropped; another provider's is refused in
        one line (recheck s41: both were sent to the provider as written,
        every call a 404).
        """
        for given in ("kimi/moonshot-v1-32k", "Kimi/moonshot-v1-32k", " KIMI/moonshot-v1-32k"):
            settings = self.load({"KIMI_MODEL": given, "FALLBACK_MODEL_KIMI": given})
            self.assertEqual(settings.providers["kimi"].model, "moonshot-v1-32k")
            self.assertEqual(settings.providers["kimi"].fallback_model, "moonshot-v1-32k")
        self.assertConfigError("KIMI_MODEL=", "another provider's model (gemini)", KIMI_MODEL="gemini/gemini-2.5-flash")
        self.assertConfigError("FALLBACK_MODEL_GEMINI=", "(kimi)", FALLBACK_MODEL_GEMINI="KIMI/moonshot-v1-8k")
        self.assertConfigError("KIMI_MODEL=", KIMI_MODEL="kimi/")
        # A slash that names no declared provider is part of the name.
        self.assertEqual(self.load({"KIMI_MODEL": "org/model"}).providers["kimi"].model, "org/model")


class AllowlistTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.allowlist = PeerAllowlist(
            [ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"), ipaddress.ip_network("10.0.0.0/8")]
        )

    def test_exact_and_cidr(self) -> None:
        self.assertTrue(self.allowlist.allows("127.0.0.1"))
        self.assertTrue(self.allowlist.allows("::1"))
        self.assertTrue(self.allowlist.allows("10.200.3.4"))
        self.assertFalse(self.allowlist.allows("127.0.0.2"))
        self.assertFalse(self.allowlist.allows("11.0.0.1"))

    def test_ipv4_mapped(self) -> None:
        """
        A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d; that is
        the IPv4 address.
        """
        self.assertEqual(normalise("::ffff:127.0.0.1"), ipaddress.ip_address("127.0.0.1"))
        self.assertTrue(self.allowlist.allows("::ffff:127.0.0.1"))
        self.assertTrue(self.allowlist.allows("::ffff:10.1.2.3"))
        self.assertFalse(self.allowlist.allows("::ffff:127.0.0.2"))

    def test_not_an_address(self) -> None:
        self.assertFalse(self.allowlist.allows(""))
        self.assertFalse(self.allowlist.allows("localhost"))
        self.assertFalse(self.allowlist.allows("/run/openclaw.sock"))

    def test_scoped_ipv6(self) -> None:
        allowlist = PeerAllowlist([ipaddress.ip_network("fe80::/10")])
        self.assertTrue(allowlist.allows("fe80::1%lo"))


class FileSafetyTests(SynchronousTestCase):
    """
    Secret and env files are held to ssh's rule; configuration errors name
    their source; misspelt env-file keys and the daemon's state directory
    (#17 item 12 and the operator friction list).
    """

    def setUp(self) -> None:
        self.environ: dict[str, str] = {}
        self.patch(os, "environ", self.environ)
        self.cwd = Path(self.mktemp())
        self.cwd.mkdir(parents=True)
        self.secret = self.cwd / "jwt_secret"
        self.secret.write_text(GOOD_SECRET + "\n")
        self.secret.chmod(0o600)

    def load(self, **kwargs: Any) -> Settings:
        return load_settings(cwd=self.cwd, **kwargs)

    def refused(self, **kwargs: Any) -> str:
        with self.assertRaises(ConfigError) as caught:
            self.load(**kwargs)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        return message

    def test_secret_file_modes(self) -> None:
        self.environ["JWT_SECRET_FILE"] = str(self.secret)
        self.assertEqual(self.load().warnings, ())
        self.secret.chmod(0o644)
        settings = self.load()
        self.assertEqual(settings.jwt_secret, GOOD_SECRET.encode())
        (warning,) = settings.warnings
        self.assertIn(str(self.secret), warning)
        self.assertIn("chmod 600", warning)
        for mode in (0o620, 0o602, 0o666):
            self.secret.chmod(mode)
            message = self.refused()
            self.assertIn(str(self.secret), message)
            self.assertIn("chmod 600", message)
            self.assertIn("from the environment", message)

    def test_owner(self) -> None:
        """
        The gateway's user or root may own it (root-owned Docker and
        Kubernetes secrets); anyone else may not.
        """
        mine = os.geteuid()
        self.assertIsNone(check_private_file(self.secret, "f", secret=True, euid=mine))
        if mine != 0:
            with self.assertRaises(ConfigError) as caught:
                check_private_file(self.secret, "f", secret=True, euid=mine + 1)
            self.assertIn("chown", str(caught.exception))
            return
        self.assertIsNone(check_private_file(self.secret, "f", secret=True, euid=4242))
        os.chown(self.secret, 4242, -1)
        self.environ["JWT_SECRET_FILE"] = str(self.secret)
        message = self.refused()
        self.assertIn("uid 4242", message)
        self.assertIn("chown 0", message)

    def test_env_files(self) -> None:
        dotenv = self.cwd / ".env"
        dotenv.write_text("KIMI_BASE_URL=http://127.0.0.1:9/v1\n")
        dotenv.chmod(0o600)
        self.assertEqual(self.load().providers["kimi"].base_url, "http://127.0.0.1:9/v1")
        dotenv.chmod(0o666)
        message = self.refused()
        self.assertIn(".env in the working directory", message)
        self.assertIn("chmod 600", message)
        other = self.cwd / "other.env"
        other.write_text("")
        other.chmod(0o646)
        self.assertIn("--env-file", self.refused(env_file=str(other)))
        if os.geteuid() == 0:
            other.chmod(0o600)
            os.chown(other, 4242, -1)
            self.assertIn("uid 4242", self.refused(env_file=str(other)))

    def test_error_names_its_source(self) -> None:
        self.assertIn("from the command line", self.refused(options={"WS_CONTROL_PORT": "x"}))
        self.environ["WS_CONTROL_PORT"] = "y"
        self.assertIn("from the environment", self.refused())
        del self.environ["WS_CONTROL_PORT"]
        env_file = self.cwd / "gw.env"
        env_file.write_text("SESSION_TTL_HOURS=-1\n")
        message = self.refused(env_file=str(env_file))
        self.assertIn(f"from env file {str(env_file)!r}", message)
        self.assertIn("SESSION_TTL_HOURS='-1'", message)
        env_file.write_text(f"TOKEN_FILE={self.cwd}/missing/token\n")
        self.assertIn("from env file", self.refused(env_file=str(env_file)))

    def test_misspelt_keys(self) -> None:
        env_file = self.cwd / "gw.env"
        env_file.write_text("GEMINI_MODLE=gemini-2.5-pro\nKIMI_APIKEY=k\nEDITOR=vi\nMOONSHOT_API_KEY=m\n")
        env_file.chmod(0o600)
        settings = self.load(env_file=str(env_file))
        self.assertEqual(len(settings.warnings), 2, settings.warnings)
        self.assertIn("GEMINI_MODLE is not a setting", settings.warnings[0])
        self.assertIn("did you mean GEMINI_MODEL?", settings.warnings[0])
        self.assertIn(str(env_file), settings.warnings[0])
        self.assertIn("did you mean KIMI_API_KEY?", settings.warnings[1])
        (warning,) = misspelt_settings(["TRUSTED_CLIENT_IP"], ["TRUSTED_CLIENT_IPS"], "f")
        self.assertTrue(warning.endswith("did you mean TRUSTED_CLIENT_IPS?"), warning)
        # Lower case (host trial s21: ignored without a word).
        (warning,) = misspelt_settings(["gemini_model"], ["GEMINI_MODEL"], "f")
        self.assertTrue(warning.endswith("gemini_model is not a setting and is ignored; did you mean GEMINI_MODEL?"))
        (warning,) = misspelt_settings(["kimi_api_kee"], ["KIMI_API_KEY"], "f")
        self.assertTrue(warning.endswith("did you mean KIMI_API_KEY?"), warning)

    def test_misspelt_in_the_environment(self) -> None:
        """
        A setting's typo in the environment (systemd's EnvironmentFile=
        hands an env file over as variables) is a warning as in an env
        file; names close to no setting are left alone.
        """
        self.environ.update(GEMINI_MODLE="gemini-2.5-pro", kimi_api_key="k", EDITOR="vi", LANG="C")
        # Other programs' variables, near a setting's name (review s21).
        self.environ.update(OPENAI_BASE_URL="u", KIMI_API_BASE="u", GEMINI_API_BASE="u")
        warnings = self.load().warnings
        self.assertEqual(
            sorted(warnings),
            [
                "environment: GEMINI_MODLE is not a setting and is ignored; did you mean GEMINI_MODEL?",
                "environment: kimi_api_key is not a setting and is ignored; did you mean KIMI_API_KEY?",
            ],
        )

    def test_repeated_names(self) -> None:
        """
        A name set on two lines of the env file is a warning naming them:
        the last counts (host trial s21: no word said).
        """
        env_file = self.cwd / "gw.env"
        env_file.write_text("DEFAULT_PROVIDER=gemini\n# DEFAULT_PROVIDER=x\nLOG_LEVEL=info\nDEFAULT_PROVIDER=kimi\n")
        env_file.chmod(0o600)
        settings = self.load(env_file=str(env_file))
        self.assertEqual(settings.default_provider, "kimi")
        (warning,) = settings.warnings
        self.assertIn("DEFAULT_PROVIDER is set on lines 1, 4: only the last counts; keep one", warning)

    def test_not_utf8(self) -> None:
        """
        An env file saved in Latin-1: one line naming the line and how to
        fix it, never the bytes around it (hostile trial s40: Python's
        codec error alone).
        """
        env_file = self.cwd / "gw.env"
        env_file.write_bytes(b"LOG_LEVEL=info\nJWT_SECRET=caf\xe9-0123456789abcdef0123456789abcdef\n")
        env_file.chmod(0o600)
        with self.assertRaises(ConfigError) as caught:
            self.load(env_file=str(env_file))
        message = str(caught.exception)
        self.assertIn("line 2 is not UTF-8 (byte 0xe9); save the file as UTF-8", message)
        self.assertNotIn("0123456789abcdef", message)
        # Past the decoder's first block (8 KiB), the line still counted
        # in the whole file (review s41: line 73 for line 301).
        env_file.write_bytes(b"LOG_LEVEL=info\n" * 300 + b"X=caf\xe9\n")
        with self.assertRaises(ConfigError) as caught:
            self.load(env_file=str(env_file))
        self.assertIn("line 301 is not UTF-8", str(caught.exception))

    def test_byte_order_mark(self) -> None:
        """
        An env file that starts with a UTF-8 byte-order mark (as some
        editors save it): the mark is no part of the first name, which is
        read as the setting it names (it was "\\ufeffGATEWAY_API_KEYS is
        not a setting; did you mean GATEWAY_API_KEYS?", and every call
        refused), with no warning; the line numbers of unread lines hold.
        """
        env_file = self.cwd / "gw.env"
        env_file.write_bytes(b"\xef\xbb\xbfGATEWAY_API_KEYS=gw-key-0123456789abcdef\nnot a setting line\n")
        env_file.chmod(0o600)
        settings = self.load(env_file=str(env_file))
        self.assertEqual(settings.gateway_api_keys, ("gw-key-0123456789abcdef",))
        (warning,) = settings.warnings
        self.assertIn("line 2 is not NAME=VALUE", warning)
        # A mark alone on the first line is an empty line.
        env_file.write_bytes(b"\xef\xbb\xbf\nDEFAULT_PROVIDER=kimi\n")
        settings = self.load(env_file=str(env_file))
        self.assertEqual((settings.default_provider, settings.warnings), ("kimi", ()))

    def test_exported_key(self) -> None:
        """
        A shell's C{export NAME=VALUE} line: python-decouple reads its key
        as C{export NAME}, so the setting would be silently unset.
        """
        (warning,) = misspelt_settings(["export GEMINI_MODEL", "export OTHER"], ["GEMINI_MODEL"], "f")
        self.assertIn("export GEMINI_MODEL= is ignored", warning)
        self.assertIn("write it as GEMINI_MODEL=VALUE, without export", warning)
        # Exported and misspelt: both said at once.
        (warning,) = misspelt_settings(["export GEMINI_MODLE"], ["GEMINI_MODEL"], "f")
        self.assertIn("export GEMINI_MODLE= is ignored", warning)
        self.assertIn("write it as GEMINI_MODEL=VALUE, without export", warning)

    def test_unread_lines(self) -> None:
        """
        A line python-decouple skips that is neither blank nor a comment,
        or reads as a value without a name (C{=x}), is a warning naming the
        file and the line's number, not its text (it may be a secret);
        every line decouple reads as NAME=VALUE passes.
        """
        env_file = self.cwd / "gw.env"
        env_file.write_text(
            "# the gateway\n"
            "\n"
            "   \n"
            "GEMINI_MODEL=gemini-2.5-pro\n"
            "this is not a line\n"
            "  # an indented comment\n"
            "sk-secret-value\r\n"
            "export EDITOR=vi\n"
            "SPACED = 'quoted'\n"
            "KIMI_API_KEY=k\n"
            "=x\n"
            "\tnot one either"
        )
        env_file.chmod(0o600)
        settings = self.load(env_file=str(env_file))
        self.assertEqual(settings.providers["gemini"].model, "gemini-2.5-pro")
        self.assertEqual(
            settings.warnings,
            tuple(
                f"env file {str(env_file)!r}: line {n} is not NAME=VALUE: ignored; write it as NAME=VALUE, "
                "or start it with # to keep it as a comment"
                for n in (5, 7, 11, 12)
            ),
        )
        for text in ("this is not a line", "sk-secret-value", "not one either"):
            self.assertNotIn(text, " ".join(settings.warnings))
        # .env in the working directory, alongside a misspelt key.
        (self.cwd / ".env").write_text("oops\nGEMINI_MODLE=x\n")
        warnings = self.load().warnings
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn(f"env file {str(self.cwd / '.env')!r}: line 1 is not NAME=VALUE: ignored", warnings[0])
        self.assertIn("did you mean GEMINI_MODEL?", warnings[1])
        self.assertEqual(unread_lines(str(self.cwd / "gone.env")), [])

    def test_daemon_state_dir(self) -> None:
        self.assertEqual(self.load().state_dir, self.cwd.absolute())
        state_home = self.cwd.absolute() / "state-home"
        self.environ["XDG_STATE_HOME"] = str(state_home)
        state_dir = self.load(daemon=True).state_dir
        self.assertEqual(state_dir, state_home / "openclaw")
        self.assertEqual(stat.S_IMODE(state_dir.stat().st_mode), 0o700)
        self.environ["STATE_DIRECTORY"] = str(self.cwd / "systemd")
        self.assertEqual(self.load().state_dir, self.cwd.absolute() / "systemd")
        explicit = self.cwd.absolute() / "explicit" / "state"
        self.assertEqual(self.load(options={"STATE_DIR": str(explicit)}, daemon=True).state_dir, explicit)
        self.assertEqual(stat.S_IMODE(explicit.stat().st_mode), 0o700)
        home = Path("/home/op")
        self.assertEqual(default_state_dir({}, 0, home), Path("/var/lib/openclaw"))
        self.assertEqual(default_state_dir({}, 1000, home), home / ".local/state/openclaw")
        self.assertEqual(default_state_dir({"XDG_STATE_HOME": "/s"}, 1000, home), Path("/s/openclaw"))
        self.assertEqual(default_state_dir({"STATE_DIRECTORY": "/a:/b"}, 0, home), Path("/a"))


class ListenerPathTests(TestCase):
    def test_rebuilt_endpoint_listens_there(self) -> None:
        """
        The endpoint string a relative unix: path is rebuilt into is read
        by Twisted's parser as meant, and binds where the operator named
        it once the working directory changed (as twistd's -d DIR changes
        it): a path holding C{:} and C{=} (escaped) included.
        """
        short = Path(tempfile.mkdtemp(prefix="oc"))  # AF_UNIX paths are short
        self.addCleanup(shutil.rmtree, short, True)
        self.patch(os, "environ", {})
        relative = os.path.relpath(short / "a:b=c.sock")
        escaped = relative.replace(":", "\\:").replace("=", "\\=")
        settings = load_settings({"CONTROL_LISTEN": f"unix:{escaped}:mode=600"}, cwd=short)
        assert settings.control_listen is not None
        endpoint = serverFromString(reactor, settings.control_listen)
        launch = os.getcwd()
        (short / "run").mkdir()
        os.chdir(short / "run")
        try:
            listening = endpoint.listen(Factory.forProtocol(Protocol))
        finally:
            os.chdir(launch)
        port = self.successResultOf(listening)
        self.addCleanup(port.stopListening)
        self.assertTrue(stat.S_ISSOCK((short / "a:b=c.sock").stat().st_mode))
        self.assertEqual(stat.S_IMODE((short / "a:b=c.sock").stat().st_mode), 0o600)


class WarningsLoggedTests(TestCase):
    def test_logged_at_startup(self) -> None:
        from tests.support import capture_log_events, start_gateway

        events = capture_log_events(self)
        start_gateway(self, warnings=("env file 'x': GEMINI_MODLE is not a setting",))
        logged = [e for e in events if e.get("config_warning")]
        self.assertEqual([e["log_level"].name for e in logged], ["warn"])
