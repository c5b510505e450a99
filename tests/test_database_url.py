"""
A DATABASE_URL libpq cannot read stops start-up with one line naming
DATABASE_URL and what is wrong, its password masked: never a traceback
(psycopg's error repeats the token it could not read, the password
included).
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from openclaw.settings import ConfigError, load_settings
from tests.support import free_port, twistd_path
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
    # An @ in the password: libpq would take its tail for the host, and
    # say it in every connection error (re-check s42).
    ("postgresql://oc:abc@TOPSECRETTAIL@127.0.0.1/db", "percent-encode it as %40", "TOPSECRETTAIL"),
]

#: Each URL libpq reads but whose values it (or psycopg, for
#: connect_timeout) refuses before connecting, and what the error line
#: must say: these once started the gateway, retrying for ever.
REFUSED_VALUES = [
    ("postgresql://u:hunter2-pw@127.0.0.1:{port}/db?sslmode=bogus", 'libpq refuses (invalid sslmode value: "bogus")'),
    ("postgresql://u:hunter2-pw@127.0.0.1:{port}/db?connect_timeout=abc", "(bad value for connect_timeout: 'abc')"),
    ("postgresql://u:hunter2-pw@127.0.0.1/db?port=x", 'invalid integer value "x" for connection option "port"'),
    ("postgresql://u:hunter2-pw@a,b/db?port=1,2,3", "could not match 3 port numbers to 2 hosts"),
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
        # An @ in a query password is that password's, not a userinfo's end.
        for url in ("postgresql://h:notaport/db?password=ab@cdefg", "postgresql://h:notaport/db?x=1&password=ab@cdefg"):
            said = self.said(url)
            self.assertNotIn("cdefg", said)
            self.assertIn("password=***", said)
        # libpq's keyword form is refused (a URI is asked for) without its
        # password (re-check s33: it was shown as given).
        for value in (
            "host=127.0.0.1 port=1 password=Q6SECRET dbname=x",
            "host=h PASSWORD = 'Q6 \\'SECRET' x=1",
            "host=h sslpassword=Q6SECRET dbname=x",
        ):
            said = self.said(value)
            self.assertNotIn("Q6", said)
            self.assertNotIn("SECRET", said)
            self.assertRegex(said.lower(), r"password *= *\*\*\*")
            self.assertIn("use postgresql://", said)
        good = "postgresql://u:p%40ss@127.0.0.1:5433/db?connect_timeout=3"
        self.assertEqual(load_settings({"DATABASE_URL": good}, cwd=cwd).database_url, good)

    def test_password_field_masked_to_the_end(self) -> None:
        """
        A C{password} field of the query (after C{?}, C{&} or C{;}, in any
        case) is masked from its value to the URL's end, by the same rule
        as C{REDIS_URL}'s: C{?sslmode=require;password=...} (C{;} where
        C{&} was meant) showed the password in clear, and an unencoded C{&}
        in a password its tail, which libpq quotes too (as a parameter with
        no C{=}).  What libpq quotes of the masked part is masked in its
        words; its own words are kept.
        """
        from openclaw.urls import masked_url

        extra = 'extra key/value separator "=" in URI query parameter: "sslmode"'
        for url, shown, said_too in (
            ("postgresql://u@127.0.0.1/db?sslmode=require;password=hunter22", "?sslmode=require;password=***", extra),
            ("postgresql://u@127.0.0.1/db?sslmode=require;password=hun%74er22", "?sslmode=require;password=***", extra),
            ("postgresql://u@127.0.0.1/db?sslmode=require;password=hu&x=1", "?sslmode=require;password=***", extra),
            (
                "postgresql://u@127.0.0.1/db?password=hunt&er22",
                "?password=***",
                'missing key/value separator "=" in URI query parameter: "***"',
            ),
            ("postgresql://u@127.0.0.1/db?password=hu&nter=22", "?password=***", 'invalid URI query parameter: "***"'),
            (
                "postgresql://u@127.0.0.1/db?password=x&sslmode=hunter22",
                "?password=***",
                'invalid sslmode value: "***"',
            ),
            ("postgresql://u@127.0.0.1:notaport/db?password=hunt&er22", "?password=***", "is invalid"),
            (
                "postgresql://u@127.0.0.1/db?PASSWORD=hunter22",
                "?PASSWORD=***",
                'invalid URI query parameter: "PASSWORD"',
            ),
        ):
            said = self.said(url)
            masked = url.partition("?")[0] + shown
            self.assertIn(f"DATABASE_URL={masked!r}", said)
            self.assertIn(said_too, said)
            self.assertEqual(masked_url(url), masked)
            for secret in ("hunter22", "hun%74er22", "unt", "er22", "nter", "hu&"):
                self.assertNotIn(secret, said)
            self.assertNotIn("\n", said)

    def test_refused_values_are_one_masked_line(self) -> None:
        """
        A value libpq refuses before it connects is a configuration error
        too, found without reaching the network: libpq is asked with its
        hosts made UNIX sockets under /dev/null (PGHOSTADDR, which
        would send it to an address, is kept from applying).  A server that
        is down, or a host name that does not resolve, is no such error: the
        gateway starts and retries.
        """
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            port = listener.getsockname()[1]
            # os.environ's items are the process's (putenv): libpq reads them.
            os.environ["PGHOSTADDR"] = "127.0.0.1"
            self.addCleanup(os.environ.pop, "PGHOSTADDR", None)
            for url, expected in REFUSED_VALUES:
                said = self.said(url.format(port=port))
                self.assertIn(expected, said)
                self.assertIn("DATABASE_URL='postgresql://u:***@", said)
                self.assertIn("LIBPQ-PARAMKEYWORDS", said)
                self.assertNotIn("hunter2-pw", said)
                self.assertNotIn("\n", said)
            listener.setblocking(False)
            with self.assertRaises(BlockingIOError):
                listener.accept()
        cwd = Path(tempfile.mkdtemp())
        for good in (
            f"postgresql://u:p@127.0.0.1:{free_port()}/db?sslmode=prefer&connect_timeout=2",
            "postgresql://u:p@db.invalid/db?sslmode=require",
            f"postgresql://u:p@/db?host={cwd}",
        ):
            self.assertEqual(load_settings({"DATABASE_URL": good}, cwd=cwd).database_url, good)

    def test_probe_needs_no_temporary_directory(self) -> None:
        """
        The start-up probe makes no file: with no temporary directory to be
        had (C{TMPDIR} and L{tempfile.tempdir} a path that does not exist)
        it still refuses C{sslmode=bogus} in one line and takes a good URL.
        It made its probe's sockets' directory there, and start-up died
        with C{FileNotFoundError}'s traceback.
        """
        cwd = Path(tempfile.mkdtemp())
        nowhere = str(cwd / "no-such-directory")
        self.setenv(TMPDIR=nowhere)
        self.patch(tempfile, "tempdir", nowhere)
        with self.assertRaises(OSError):
            tempfile.mkdtemp()
        url = "postgresql://u:hunter2-pw@127.0.0.1,127.0.0.2/db?sslmode=bogus"
        with self.assertRaises(ConfigError) as caught:
            load_settings({"DATABASE_URL": url}, cwd=cwd)
        said = str(caught.exception)
        self.assertIn('libpq refuses (invalid sslmode value: "bogus")', said)
        self.assertNotIn("\n", said)
        good = f"postgresql://u:p@127.0.0.1:{free_port()}/db?sslmode=prefer"
        self.assertEqual(load_settings({"DATABASE_URL": good}, cwd=cwd).database_url, good)
        self.assertEqual(os.listdir(cwd), [])

    def test_connect_timeout_as_psycopg_reads_it(self) -> None:
        """
        C{connect_timeout} is checked by our own rule, psycopg's reading of
        it (it, not libpq, enforces it): a decimal integer as libpq
        documents it, or any finite decimal number (C{5.0}), is taken; what
        is none (C{abc}, C{inf}, nothing) is refused in psycopg's words, in
        one line.  C{PGCONNECT_TIMEOUT} is not looked at: the gateway
        always gives psycopg a C{connect_timeout}, 10 s unless the URL has
        one (L{openclaw.consumers.store.POSTGRES_DEFAULTS}).
        """
        cwd = Path(tempfile.mkdtemp())
        self.setenv(PGCONNECT_TIMEOUT="abc")
        good = f"postgresql://u:p@127.0.0.1:{free_port()}/db"
        self.assertEqual(load_settings({"DATABASE_URL": good}, cwd=cwd).database_url, good)
        for value in ("3", " 7 ", "+4", "0", "-1", "5.0", "2.5", "1e1"):
            good = f"postgresql://u:p@127.0.0.1:{free_port()}/db?connect_timeout={value.replace(' ', '%20')}"
            self.assertEqual(load_settings({"DATABASE_URL": good}, cwd=cwd).database_url, good)
        for written, read in (("abc", "abc"), ("inf", "inf"), ("nan", "nan"), ("", ""), ("1%200", "1 0")):
            said = self.said(f"postgresql://u:hunter2-pw@127.0.0.1/db?connect_timeout={written}")
            self.assertIn(f"libpq refuses (bad value for connect_timeout: {read!r})", said)
            self.assertNotIn("hunter2-pw", said)
            self.assertNotIn("\n", said)

    def setenv(self, **values: str) -> None:
        # os.environ's items are the process's (putenv): libpq reads them.
        for name, value in values.items():
            if name in os.environ:
                self.addCleanup(os.environ.__setitem__, name, os.environ[name])
            else:
                self.addCleanup(os.environ.pop, name, None)
            os.environ[name] = value

    def test_hosts_and_ports_from_environment_or_service_file(self) -> None:
        """
        Hosts and ports that a service file (PGSERVICEFILE) or PGHOST and
        PGPORT fill in are libpq's to pair up when it connects, not the
        start-up probe's: two of each is a working URL, taken (the probe
        once set one host against their two ports: "could not match 2 port
        numbers to 1 hosts").  Nothing is reached meanwhile.  Those that do
        not pair up are left for the connection to report; an unknown
        service is refused, and so are ports the URL itself does not pair
        up with its hosts.
        """
        cwd = Path(tempfile.mkdtemp())
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            port = listener.getsockname()[1]
            services = cwd / "pg_service.conf"
            services.write_text(
                f"[two]\nhost=127.0.0.1,127.0.0.1\nport={port},{port}\ndbname=oc\nuser=u\n"
                f"[unpaired]\nhost=127.0.0.1,127.0.0.1,127.0.0.1\nport={port},{port}\n"
            )
            self.setenv(PGSERVICEFILE=str(services))
            for good in ("postgresql:///?service=two", "postgresql://u:p@/oc?service=unpaired"):
                self.assertEqual(load_settings({"DATABASE_URL": good}, cwd=cwd).database_url, good)
            self.assertIn('(definition of service "nosuch" not found)', self.said("postgresql:///?service=nosuch"))
            self.setenv(PGHOST="127.0.0.1,127.0.0.2", PGPORT=f"{port},{port}")
            good = "postgresql:///openclaw?user=u"
            self.assertEqual(load_settings({"DATABASE_URL": good}, cwd=cwd).database_url, good)
            self.assertIn(
                "could not match 3 port numbers to 2 hosts",
                self.said("postgresql://u:hunter2-pw@127.0.0.1,127.0.0.1/db?port=1,2,3"),
            )
            listener.setblocking(False)
            with self.assertRaises(BlockingIOError):
                listener.accept()

    def test_transport_refusals_left_to_the_connection(self) -> None:
        """
        What libpq refuses only for the probe's UNIX socket (GSSAPI
        encryption, which a TCP connection may have) does not stop
        start-up; a value it refuses on any transport does.  libpq's words
        are not garbled by a short password's characters in them; the
        password is masked where it stands whole (a quoted value).
        """
        cwd = Path(tempfile.mkdtemp())
        good = f"postgresql://u:p@127.0.0.1:{free_port()}/db?gssencmode=require"
        self.assertEqual(load_settings({"DATABASE_URL": good}, cwd=cwd).database_url, good)
        said = self.said("postgresql://u:p@127.0.0.1/db?sslmode=prefer&sslnegotiation=direct")
        self.assertIn('(weak sslmode "prefer" may not be used with sslnegotiation=direct (use "require"', said)
        said = self.said("postgresql://u:e@127.0.0.1/db?gssencmode=bogus")
        self.assertIn('(invalid gssencmode value: "bogus")', said)
        said = self.said("postgresql://u:Qx@127.0.0.1/db?sslmode=Qx")
        self.assertIn('(invalid sslmode value: "***")', said)

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
        refused = [(url.format(port=free_port()), expected, "hunter2-pw") for url, expected in REFUSED_VALUES[:2]]
        for url, expected, secret in CASES[:2] + refused:
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
