"""
The gateway's log observer: events below the level never formatted; text
lines as twistd's own; JSON lines flat objects a shipper reads without
knowing Twisted; the stream chosen as twistd would, reopened on SIGUSR1.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

from twisted.application.service import Application, MultiService
from twisted.internet.defer import inlineCallbacks
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher, textFileLogObserver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from openclaw.logs import (
    ReopenedLogFile,
    json_line,
    log_destination,
    log_file_mode,
    make_observer,
    offer_log_observer,
    reopen_advice,
)
from openclaw.settings import ConfigError
from openclaw.settings.permissions import untrusted_log_file

WHEN = 1764043200.25


class Thing:
    def __str__(self) -> str:
        return "a thing"


class Counted:
    """
    A field that counts how often it is formatted.
    """

    formatted = 0

    def __format__(self, spec: str) -> str:
        Counted.formatted += 1
        return "counted"


def event(**fields: Any) -> dict[str, Any]:
    return {"log_namespace": "openclaw.dataplane", "log_level": LogLevel.info, "log_time": WHEN, **fields}


class LevelTests(SynchronousTestCase):
    def lines(self, level: str, log_format: str = "text") -> tuple[io.StringIO, Logger]:
        out = io.StringIO()
        return out, Logger(namespace="openclaw.test", observer=make_observer(out, log_format, level))

    def test_below_level_dropped_unformatted(self):
        """
        At info, a debug event writes nothing and is never formatted; an
        info one is.
        """
        for log_format in ("text", "json"):
            out, log = self.lines("info", log_format)
            Counted.formatted = 0
            log.debug("debug {x}", x=Counted())
            self.assertEqual((out.getvalue(), Counted.formatted), ("", 0))
            log.info("info {x}", x=Counted())
            self.assertEqual(Counted.formatted, 1)
            self.assertEqual(len(out.getvalue().splitlines()), 1)

    def test_levels(self):
        out, log = self.lines("warn")
        log.info("no")
        log.warn("yes {a}", a=1)
        log.error("and yes")
        log.critical("and this")
        self.assertEqual(
            [line.split(" ", 1)[1] for line in out.getvalue().splitlines()],
            ["[openclaw.test#warn] yes 1", "[openclaw.test#error] and yes", "[openclaw.test#critical] and this"],
        )
        out, log = self.lines("debug")
        log.debug("seen")
        self.assertIn("[openclaw.test#debug] seen", out.getvalue())

    def test_upstream_pool_quiet_unless_debug(self):
        """
        The upstream connection pool's "Starting factory" / "Stopping
        factory" lines (one pair per provider connection) are dropped at
        info, shown at debug; its warnings are kept.
        """
        from twisted.web.client import HTTPConnectionPool

        from openclaw.logs import QUIET_NAMESPACES

        for level, shown in (("info", 0), ("debug", 1)):
            out = io.StringIO()
            observer = make_observer(out, "text", level)
            for namespace in QUIET_NAMESPACES:
                self.assertEqual(namespace, HTTPConnectionPool.__module__)
                factory = f"{namespace}.ClientFactory"
                observer(event(log_namespace=factory, log_format="Starting factory"))
                observer(event(log_namespace=factory, log_level=LogLevel.warn, log_format="trouble"))
            self.assertEqual(out.getvalue().count("Starting factory"), shown)
            self.assertEqual(out.getvalue().count("trouble"), 1)

    def test_websocket_server_quiet_unless_debug(self):
        """
        Autobahn's WebSocket server protocol's per-connection lines (info
        and warn) are dropped below debug, its errors kept; a quiet
        namespace is never shown below LOG_LEVEL (at critical, neither its
        errors nor the pool's warnings are).
        """
        from openclaw.logs import QUIET_NAMESPACES, QUIET_WEBSOCKET

        def written(level: str) -> list[str]:
            out = io.StringIO()
            observer = make_observer(out, "text", level)
            for namespace in QUIET_WEBSOCKET:
                for event_level in (LogLevel.info, LogLevel.warn, LogLevel.error):
                    observer(event(log_namespace=namespace, log_level=event_level, log_format=event_level.name))
            observer(event(log_namespace=QUIET_NAMESPACES[0], log_level=LogLevel.warn, log_format="pool"))
            return [line.split(" ", 1)[1] for line in out.getvalue().splitlines()]

        self.assertEqual(QUIET_WEBSOCKET, ("autobahn.twisted.websocket.WebSocketServerProtocol",))
        server = "[autobahn.twisted.websocket.WebSocketServerProtocol"
        self.assertEqual(
            written("debug"),
            [
                f"{server}#info] info",
                f"{server}#warn] warn",
                f"{server}#error] error",
                "[twisted.web.client#warn] pool",
            ],
        )
        self.assertEqual(written("info"), [f"{server}#error] error", "[twisted.web.client#warn] pool"])
        self.assertEqual(written("critical"), [])

    def test_peer_tls_error_quiet_unless_debug(self):
        """
        Autobahn's error line for a connection lost to a TLS error (a peer
        that does not trust the certificate) is dropped below debug; its
        other errors are kept, and so is any other namespace's line that
        starts the same way.
        """
        from openclaw.logs import QUIET_WEBSOCKET

        def written(level: str) -> list[str]:
            out = io.StringIO()
            observer = make_observer(out, "text", level)
            for namespace in (*QUIET_WEBSOCKET, "openclaw.controlplane"):
                for log_format in ("SSL error: tlsv1 alert unknown ca (in )", "other"):
                    observer(event(log_namespace=namespace, log_level=LogLevel.error, log_format=log_format))
            return [line.split(" ", 1)[1] for line in out.getvalue().splitlines()]

        server = "[autobahn.twisted.websocket.WebSocketServerProtocol#error]"
        own = "[openclaw.controlplane#error]"
        tls_error = "SSL error: tlsv1 alert unknown ca (in )"
        self.assertEqual(
            written("debug"), [f"{server} {tls_error}", f"{server} other", f"{own} {tls_error}", f"{own} other"]
        )
        self.assertEqual(written("info"), [f"{server} other", f"{own} {tls_error}", f"{own} other"])

    def test_no_level_or_namespace(self):
        """
        As twistd's level filter: an event without a level or a namespace
        is dropped.
        """
        out = io.StringIO()
        observer = make_observer(out, "text", "debug")
        observer({"log_format": "no level", "log_namespace": "x", "log_time": WHEN})
        observer({"log_format": "no namespace", "log_level": LogLevel.error, "log_time": WHEN})
        self.assertEqual(out.getvalue(), "")


class OfferedObserverTests(SynchronousTestCase):
    """
    L{offer_log_observer}: the observer twistd logs to, set on the
    application a service joins.
    """

    def test_application(self) -> None:
        """
        On twistd's application (a L{Componentized}), the observer is its
        L{ILogObserver} component, where twistd's logger looks.
        """
        application = Application("openclaw")
        observer = textFileLogObserver(io.StringIO())
        offer_log_observer(application, observer)
        self.assertIs(application.getComponent(ILogObserver), observer)

    def test_nothing_to_offer(self) -> None:
        """
        No observer leaves the application as it is; a parent that is no
        application (a plain L{MultiService}) is given nothing.
        """
        application = Application("openclaw")
        offer_log_observer(application, None)
        self.assertIsNone(application.getComponent(ILogObserver))
        parent = MultiService()
        offer_log_observer(parent, textFileLogObserver(io.StringIO()))
        self.assertIsNone(ILogObserver(parent, None))


class TextTests(SynchronousTestCase):
    def test_same_as_twistd(self):
        """
        Text lines are the ones twistd's own observer writes.
        """
        try:
            _ = 1 / 0
        except ZeroDivisionError:
            failure = Failure()
        events = [
            event(log_format="{method} {path} {status}", method="POST", path="/v1/x", status=502),
            event(log_format="two\nlines {a}", a="and\nthree"),
            event(log_format="failed: {why}", why="x", log_failure=failure, log_level=LogLevel.critical),
            event(log_format="legacy", log_system="HTTPChannel,0,127.0.0.1"),
        ]
        ours, theirs = io.StringIO(), io.StringIO()
        observer, reference = make_observer(ours, "text", "info"), textFileLogObserver(theirs)
        for each in events:
            observer(dict(each))
            reference(dict(each))
        self.assertEqual(ours.getvalue(), theirs.getvalue())
        self.assertIn("ZeroDivisionError", ours.getvalue())
        self.assertIn("\n\tthree", ours.getvalue())


#: A key holder's model name that, written raw, erases the real line in a
#: terminal and forges another (issue #17, item 8).
FORGED = (
    "gemini/x\u001b[2K\r2026-01-01T00:00:00+0000 [openclaw.controlplane#info] rotate_token from 10.9.9.9:1"
    "\n2026-01-01T00:00:01+0000 [forged#info] \x85 \u2028 \x7f \x00"
)


class EscapingTests(SynchronousTestCase):
    """
    Whatever a client sent, each text line starts with Twisted's own
    time and namespace: control characters are escaped where lines are
    formatted, so no call site can forget.
    """

    def test_text_escaped(self):
        for log_format, values in [
            ("{method} {path} via {route}", {"method": "POST", "path": "/v1/\x1b[2J", "route": FORGED}),
            ("refused control connection from {peer}", {"peer": "10.0.0.5\r\n\x0b\x1c"}),
            ("{cmd!r} {cmd}", {"cmd": FORGED}),
        ]:
            out = io.StringIO()
            make_observer(out, "text", "info")(event(log_format=log_format, **values))
            text = out.getvalue()
            self.assertTrue(text.endswith("\n"))
            first, *continued = text[:-1].split("\n")
            self.assertTrue(first.startswith("2025-11-25T04:00:00+0000 [openclaw.dataplane#info] "), first)
            for line in continued:
                # A newline of a value only ever continues the line.
                self.assertTrue(line.startswith("\t"), repr(text))
            self.assertIsNone(re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]", text), repr(text))
        self.assertIn("\\x1b[2K\\x0d2026", text)
        self.assertIn("\n\t2026-01-01T00:00:01+0000 [forged#info] \\x85 \\u2028 \\x7f \\x00", text)

    def test_continuation_kept(self):
        """
        Twisted's own continuation of a multi-line message (newline, tab)
        stays; a newline inside a value becomes a continuation too, never
        a line of its own.
        """
        out = io.StringIO()
        make_observer(out, "text", "info")(event(log_format="two\nlines {a}", a="x"))
        self.assertTrue(out.getvalue().endswith("two\n\tlines x\n"))

    def test_json_escaped(self):
        text = json_line(event(log_format="{model}", model=FORGED))
        assert text is not None
        self.assertEqual(text.count("\n"), 1)
        self.assertNotIn("\x1b", text)
        # C1 (CSI, NEL), DEL and U+2028 escaped too: orjson escapes C0 only.
        self.assertIsNone(re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029]", text[:-1]), repr(text))
        self.assertIn("\\u0085 \\u2028 \\u007f \\u0000", text)
        self.assertEqual(json.loads(text)["model"], FORGED)
        csi = json_line(event(log_format="{detail}", detail="\x9b2J"))
        assert csi is not None
        self.assertEqual(json.loads(csi)["detail"], "\x9b2J")
        self.assertIn("\\u009b2J", csi)


class JSONTests(SynchronousTestCase):
    def line(self, **fields: Any) -> dict[str, Any]:
        text = json_line(event(**fields))
        assert text is not None
        self.assertTrue(text.endswith("\n"))
        self.assertEqual(text.count("\n"), 1)
        self.assertTrue(text.startswith("{"), repr(text))
        return json.loads(text)

    def test_shape(self):
        """
        One flat object per line: time (ISO 8601 UTC, milliseconds), level,
        namespace, message, then the event's own JSON fields; no C{log_*}
        keys, nothing JSON cannot hold.
        """
        record = self.line(
            log_format="{cmd} from {peer}: {outcome} in {duration_ms:.1f} ms",
            cmd="switch_provider",
            peer="127.0.0.1",
            outcome="ok",
            duration_ms=1.25,
            stream=False,
            model=None,
            tags=["a", 1],
            thing=Thing(),
        )
        self.assertEqual(
            record,
            {
                "time": "2025-11-25T04:00:00.250Z",
                "level": "info",
                "namespace": "openclaw.dataplane",
                "message": "switch_provider from 127.0.0.1: ok in 1.2 ms",
                "cmd": "switch_provider",
                "peer": "127.0.0.1",
                "outcome": "ok",
                "duration_ms": 1.25,
                "stream": False,
                "model": None,
                "tags": ["a", 1],
            },
        )

    def test_own_keys_win(self):
        """
        A field named like one of the four keys does not replace it.
        """
        record = self.line(log_format="{message}", message="hello", level="fake", time=0)
        self.assertEqual(
            (record["message"], record["level"], record["time"]), ("hello", "info", "2025-11-25T04:00:00.250Z")
        )

    def test_newlines_stay_in_one_line(self):
        """
        A message with newlines (a peer's text, a traceback) is still one
        line: JSON escapes them, so no one can forge a log line.
        """
        record = self.line(log_format="cmd {cmd}", cmd='x"\n{"level": "critical"}')
        self.assertEqual(record["message"], 'cmd x"\n{"level": "critical"}')

    def test_failure(self):
        try:
            _ = 1 / 0
        except ZeroDivisionError:
            failure = Failure()
        record = self.line(log_format="call failed", log_failure=failure, log_level=LogLevel.critical)
        self.assertEqual((record["level"], record["message"]), ("critical", "call failed"))
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_unformattable(self):
        """
        An event whose format fails still makes a line, saying so.
        """
        record = self.line(log_format="broken {")
        self.assertIn("Unable to format event", record["message"])
        record = self.line(log_format="missing {nothing}")
        self.assertIn("Unable to format event", record["message"])

    def test_unencodable_values(self):
        record = self.line(log_format="x", nested={"a": Thing()}, huge=2**70)
        self.assertEqual(record["message"], "x")
        self.assertNotIn("huge", record)

    def test_no_message_no_line(self):
        self.assertIsNone(json_line(event(log_format="")))
        self.assertIsNone(json_line(event(other=1)))

    def test_through_a_logger(self):
        out = io.StringIO()
        log = Logger(namespace="openclaw.test", observer=make_observer(out, "json", "info"))
        log.info("{a} and {b!r}", a=1, b="two")
        (line,) = out.getvalue().splitlines()
        record = json.loads(line)
        self.assertEqual((record["namespace"], record["message"], record["a"]), ("openclaw.test", "1 and 'two'", 1))
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class DestinationTests(SynchronousTestCase):
    class Reactor:
        def callFromThread(self, f: Any, *args: Any) -> None:
            f(*args)

    def log_to(self, path: Path) -> None:
        """
        Log every event of this test as JSON lines to the daemon's log
        file at C{path} (L{log_destination}), until the test ends.
        """
        stream = log_destination({"nodaemon": False, "logfile": str(path)}, io.StringIO(), self.Reactor())
        assert stream is not None
        self.addCleanup(stream.close)
        observer = make_observer(stream, "json", "info")
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def test_foreground_stdout(self):
        stdout = io.StringIO()
        self.assertIs(log_destination({"nodaemon": True, "logfile": None}, stdout, self.Reactor()), stdout)
        self.assertIs(log_destination({"nodaemon": True, "logfile": "-"}, stdout, self.Reactor()), stdout)
        self.assertIs(log_destination({}, stdout, self.Reactor()), stdout)

    def test_daemon_not_to_stdout(self):
        with self.assertRaises(ConfigError):
            log_destination({"nodaemon": False, "logfile": "-"}, io.StringIO(), self.Reactor())

    def test_syslog_left_to_twistd(self):
        self.assertIsNone(log_destination({"syslog": True, "nodaemon": False}, io.StringIO(), self.Reactor()))

    def test_logfile_reopened_on_sigusr1(self):
        """
        The log file is appended to, never rotated by the gateway; after
        logrotate moves it away, SIGUSR1 makes a new one.
        """
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("earlier\n")
        stream = log_destination({"nodaemon": False, "logfile": str(path)}, io.StringIO(), self.Reactor())
        assert stream is not None
        self.addCleanup(stream.close)
        log = Logger(namespace="openclaw.test", observer=make_observer(stream, "json", "info"))
        log.info("before")
        path.rename(path.with_name("moved"))
        os.kill(os.getpid(), signal.SIGUSR1)
        log.info("after")
        moved = path.with_name("moved").read_text()
        self.assertTrue(moved.startswith("earlier\n"))
        self.assertEqual([json.loads(line)["message"] for line in moved.splitlines()[1:]], ["before"])
        self.assertEqual([json.loads(line)["message"] for line in path.read_text().splitlines()], ["after"])

    def test_reopened_file_has_the_first_files_mode(self):
        """
        The log file a SIGUSR1 makes gets the mode the first one was made
        with, before twistd set its umask: under C{--umask 000} both are
        0644 (the reopened one was 0666, anyone could write it; trial
        s31), a daemon's 0600 by default, whatever the shell's umask; group
        and others never write them.
        """
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        self.addCleanup(os.umask, os.umask(0o022))
        for options, shell, expected in (
            ({"nodaemon": False, "umask": 0}, 0o022, 0o644),
            ({"nodaemon": False, "umask": 0}, 0o077, 0o644),
            ({"nodaemon": False}, 0o022, 0o600),
            ({"nodaemon": True, "umask": 0o002}, 0o022, 0o644),
        ):
            path = Path(self.mktemp())
            path.parent.mkdir(parents=True, exist_ok=True)
            # The shell's umask, then the one twistd sets before the
            # service starts.
            os.umask(shell)
            stream = log_destination({**options, "logfile": str(path)}, io.StringIO(), self.Reactor())
            assert stream is not None
            self.addCleanup(stream.close)
            os.umask(options.get("umask", 0o077))
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), expected, options)
            path.rename(path.with_name("moved"))
            os.kill(os.getpid(), signal.SIGUSR1)
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), expected, options)
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)

    def test_log_file_mode(self):
        """
        C{0666} less twistd's umask (C{--umask}, else C{0077} for a
        daemon, else the process's), group and others never writing.
        """
        self.addCleanup(os.umask, os.umask(0o002))
        self.assertEqual(log_file_mode({"nodaemon": False}), 0o600)
        self.assertEqual(log_file_mode({"nodaemon": False, "umask": 0}), 0o644)
        self.assertEqual(log_file_mode({"nodaemon": True, "umask": 0o027}), 0o640)
        self.assertEqual(log_file_mode({"nodaemon": True}), 0o644)
        self.assertEqual(os.umask(0o002), 0o002)

    def test_failed_reopen_keeps_the_file(self):
        """
        A SIGUSR1 whose reopen fails (the log's directory moved away) keeps
        the log going to the file it had, which says why and what to do; a
        later SIGUSR1 that can open the file moves the log to it.
        """
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        logs = Path(self.mktemp()).resolve() / "logs"
        logs.mkdir(parents=True)
        path = logs / "gw.log"
        self.log_to(path)
        log = Logger(namespace="openclaw.test")
        log.info("before")
        moved = logs.with_name("logs.old")
        logs.rename(moved)
        os.kill(os.getpid(), signal.SIGUSR1)
        log.info("while the directory is away")
        logs.mkdir()
        os.kill(os.getpid(), signal.SIGUSR1)
        log.info("after")

        def messages(file: Path) -> list[str]:
            return [json.loads(line)["message"] for line in file.read_text().splitlines()]

        [before, failed, during] = messages(moved / "gw.log")
        self.assertEqual((before, during), ("before", "while the directory is away"))
        self.assertEqual(
            failed,
            f"could not reopen the log file {path} on SIGUSR1: No such file or directory; logging goes on to "
            f"the file it had (where it was moved to): make {logs} exist and writable, then send SIGUSR1 again",
        )
        self.assertEqual(messages(path), ["after"])

    def test_log_file_others_may_write_refused(self):
        """
        A log file its group or every user may write (a logrotate "create
        0666" left so) is refused at start, and at a SIGUSR1 the log goes
        on to the file it had, saying why and what to do (operator trial
        s46: used without a word, the audit lines open to forgery).
        """
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        logs = Path(self.mktemp()).resolve() / "logs"
        logs.mkdir(parents=True)
        open_to_all = logs / "open.log"
        open_to_all.write_text("")
        open_to_all.chmod(0o666)
        with self.assertRaises(ConfigError) as refused:
            log_destination({"nodaemon": False, "logfile": str(open_to_all)}, io.StringIO(), self.Reactor())
        self.assertIn(
            f"the log file may be written by its group and every user (mode 0666), who could forge or cut what is "
            f"logged (the audit lines among it); chmod go-w {open_to_all}",
            str(refused.exception),
        )
        path = logs / "gw.log"
        self.log_to(path)
        log = Logger(namespace="openclaw.test")
        rotated = logs / "gw.log.1"
        path.rename(rotated)
        path.write_text("")
        path.chmod(0o620)
        os.kill(os.getpid(), signal.SIGUSR1)
        log.info("after")
        said = [json.loads(line)["message"] for line in rotated.read_text().splitlines()]
        self.assertIn("may be written by its group (mode 0620)", said[0])
        self.assertEqual(said[1], "after")
        self.assertEqual(path.read_text(), "")
        # Its mode fixed, the next SIGUSR1 takes it.
        path.chmod(0o600)
        os.kill(os.getpid(), signal.SIGUSR1)
        log.info("fixed")
        self.assertEqual([json.loads(line)["message"] for line in path.read_text().splitlines()], ["fixed"])

    def test_reopen_advice(self):
        """
        A log file there that the gateway's user may not write (one a log
        rotation created as root, 0600) is to be given to that user, not
        its directory made writable (README trial s43: the advice named a
        directory that was writable already).
        """
        import pwd

        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        path = str(directory / "gw.log")
        denied = OSError(errno.EACCES, "Permission denied")
        self.assertEqual(reopen_advice(path, denied), f"make {directory} exist and writable")
        Path(path).touch()
        user = pwd.getpwuid(os.geteuid()).pw_name
        self.assertEqual(
            reopen_advice(path, denied),
            f"make {path} writable by the gateway's user {user} (chown it to {user}; with logrotate, "
            f"create 0640 {user} <group>)",
        )
        self.assertEqual(
            reopen_advice(path, OSError(errno.ENOENT, "No such file or directory")),
            f"make {directory} exist and writable",
        )

    def test_fifo_refused_not_waited_on(self):
        """
        A FIFO at the log's path is refused at start and at a SIGUSR1
        reopen (which logs why and keeps the file it had); opening it
        waited for a reader for ever, freezing the gateway.
        """
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        path = directory / "gw.log"
        os.mkfifo(path)
        with self.assertRaises(ConfigError) as refused:
            log_destination({"nodaemon": False, "logfile": str(path)}, io.StringIO(), self.Reactor())
        self.assertIn("a FIFO, not a regular file", str(refused.exception))
        path.unlink()
        self.log_to(path)
        path.rename(directory / "gw.log.1")
        os.mkfifo(path)
        os.kill(os.getpid(), signal.SIGUSR1)
        Logger(namespace="openclaw.test").info("still here")
        lines = [json.loads(line)["message"] for line in (directory / "gw.log.1").read_text().splitlines()]
        self.assertIn("it is a FIFO, not a regular file; logging goes on to the file it had", lines[0])
        self.assertIn(f"remove what is at {path}", lines[0])
        self.assertEqual(lines[1], "still here")

    def test_other_users_link_or_file_refused(self):
        """
        A symbolic link on the way to the log that belongs to neither the
        gateway's user nor root, or a log file of another user's, is
        refused: its owner chose where the lines go (README: the rule for
        links of secret files' paths).
        """
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        target = directory / "roots-file"
        target.write_text("")
        link = directory / "gw.log"
        link.symlink_to(target)
        other = os.geteuid() + 1
        real_lstat = os.lstat

        def lstat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            found = real_lstat(path, *args, **kwargs)
            if os.fspath(path) == str(link):
                return os.stat_result((found.st_mode, *found[1:4], other, *found[5:]))
            return found

        self.patch(os, "lstat", lstat)
        with self.assertRaises(ConfigError) as refused:
            log_destination({"nodaemon": False, "logfile": str(link)}, io.StringIO(), self.Reactor())
        self.assertIn(f"through the symbolic link {str(link)!r}, which belongs to uid {other}", str(refused.exception))
        self.assertEqual(target.read_text(), "")

    def test_dev_null_and_blocking(self):
        """
        C{--logfile /dev/null} throws the log away, as before the checks
        for regular files; a log file's descriptor is blocking (the open's
        C{O_NONBLOCK} is not kept: review s21).
        """
        stream = log_destination({"nodaemon": False, "logfile": os.devnull}, io.StringIO(), self.Reactor())
        assert stream is not None
        self.addCleanup(stream.close)
        stream.write("thrown away\n")
        path = Path(self.mktemp()).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        log = ReopenedLogFile(str(path))
        self.addCleanup(log.close)
        for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                    self.assertTrue(os.get_blocking(int(fd)))

    def test_checked_again_once_open(self):
        """
        What the log's path names is checked again once opened: a file put
        in its place between the check and the open (a link planted as
        logrotate moved the log away) is refused, not written to.
        """
        path = Path(self.mktemp()).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        opened_first = os.open
        swapped: list[int] = []

        def swapped_after_open(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            # Another process replaces the file just after the gateway's
            # open for appending (not the O_EXCL one that creates it).
            fd = opened_first(file, flags, *args, **kwargs)
            if os.fspath(file) == str(path) and not flags & os.O_EXCL and not swapped:
                swapped.append(fd)
                other = path.with_name("other")
                other.write_text("")
                os.replace(other, path)
            return fd

        self.patch(os, "open", swapped_after_open)
        with self.assertRaises(ConfigError) as refused:
            log_destination({"nodaemon": False, "logfile": str(path)}, io.StringIO(), self.Reactor())
        self.assertIn("it was replaced while it was being opened", str(refused.exception))

    def test_other_users_file_refused(self):
        path = Path(self.mktemp()).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        owner = os.stat(path).st_uid
        self.assertIsNone(untrusted_log_file(path, euid=owner))
        if owner == 0:
            # Root's file: taken by any user (as secret files are).
            self.assertIsNone(untrusted_log_file(path, euid=12345))
            os.chown(path, 12345, -1)
            refusal = untrusted_log_file(path, euid=0)
        else:
            refusal = untrusted_log_file(path, euid=owner + 1)
        # Run as root: root is named once (operator trial s41: twice).
        self.assertIn("neither the gateway's user" if os.geteuid() else "not root, the gateway's user", refusal or "")

    def test_processes_sharing_the_file_append(self):
        """
        Each worker of C{--workers} opens the same log file: every line
        is appended at the file's end, none written over another's
        (Twisted's L{LogFile} writes from the offset it opened at).
        """
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        first, second = ReopenedLogFile(str(path)), ReopenedLogFile(str(path))
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        first.write("one\n")
        second.write(b"two\n")
        first.write("three \u2014\n")
        self.assertEqual(path.read_text(), "one\ntwo\nthree \u2014\n")

    def test_daemon_default_logfile(self):
        """
        A daemon without --logfile logs to twistd.log, as twistd does.
        """
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        cwd = Path(self.mktemp()).resolve()
        cwd.mkdir()
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(cwd)
        stream = log_destination({"nodaemon": False, "logfile": None}, io.StringIO(), self.Reactor())
        assert stream is not None
        self.addCleanup(stream.close)
        make_observer(stream, "text", "info")(event(log_format="hello"))
        self.assertTrue(re.search(r"\[openclaw.dataplane#info\] hello\n$", (cwd / "twistd.log").read_text()))


class UpstreamPoolNamespaceTests(TestCase):
    @inlineCallbacks
    def test_pool_logs_under_the_quiet_namespace(self):
        """
        The namespace made quiet is the one Twisted's connection pool really
        logs its per-connection factory lines under (a Twisted release that
        renames it fails here, not silently in production logs).
        """
        from twisted.internet import reactor
        from twisted.web.client import Agent, HTTPConnectionPool
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        class Hello(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                return b"hi"

        from openclaw.logs import QUIET_NAMESPACES
        from openclaw.providers.fetch import read_body

        namespaces: list[str] = []

        def observer(e: dict[str, Any]) -> None:
            if "factory" in str(e.get("log_format")):
                namespaces.append(e.get("log_namespace", ""))

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        port = reactor.listenTCP(0, Site(Hello()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor)
        response = yield Agent(reactor, pool=pool).request(b"GET", b"http://127.0.0.1:%d/" % port.getHost().port)
        yield read_body(response)
        yield pool.closeCachedConnections()
        # The pool's factory is named after its class, in the quiet module.
        self.assertTrue([namespace for namespace in namespaces if namespace.startswith(QUIET_NAMESPACES[0] + ".")])


class FillingFile:
    """
    A log file (what L{ReopenedLogFile}'s C{open_file} returns) on a disk
    that fills: each write takes at most C{chunk} bytes, and once C{room}
    bytes are taken, fails with C{error} (C{ENOSPC}) until given room again.
    """

    def __init__(self, chunk: int = 1 << 20) -> None:
        self.data = bytearray()
        self.chunk = chunk
        self.room: int | None = None
        self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.writes = 0

    def write(self, data: bytes | memoryview) -> int:
        self.writes += 1
        taken = min(len(data), self.chunk, len(data) if self.room is None else self.room)
        if not taken and len(data):
            raise self.error
        if self.room is not None:
            self.room -= taken
        self.data += bytes(data[:taken])
        return taken

    def flush(self) -> None:
        if self.room == 0:
            raise self.error

    def close(self) -> None:
        pass


class LostLinesTests(SynchronousTestCase):
    """
    A log file that takes part of a write, or none (a full disk): the
    rest is written, or the lines lost are counted and said once writing
    works again; nothing raises into the logging system (trial s33 F4).
    """

    def log_file(self, file: FillingFile) -> ReopenedLogFile:
        path = Path(self.mktemp())
        return ReopenedLogFile(str(path), open_file=lambda opened: file)

    def test_short_writes_are_finished(self):
        """
        A write that takes part of a line is followed by writes of the
        rest: no line is torn.
        """
        file = FillingFile(chunk=3)
        log = self.log_file(file)
        log.write("one line\n")
        log.write(b"another \xe2\x80\x94\n")
        self.assertEqual(bytes(file.data), "one line\nanother \u2014\n".encode())
        self.assertGreater(file.writes, 2)

    def test_lost_lines_are_counted_and_said(self):
        """
        Writes that fail (ENOSPC) raise nothing; the first that works
        again is preceded by one line saying how many were lost and why,
        as a line of the log's format (twistd's text here).
        """
        file = FillingFile()
        log = self.log_file(file)
        observer = make_observer(cast(Any, log), "text", "info")
        observer(event(log_format="first"))
        file.room = 0
        observer(event(log_format="lost"))
        observer(event(log_format="lost too\nover two lines"))
        log.flush()
        self.assertNotIn(b"lost", bytes(file.data))
        file.room = None
        observer(event(log_format="after"))
        lines = bytes(file.data).decode().splitlines()
        self.assertEqual(len(lines), 3, lines)
        self.assertTrue(lines[0].endswith("first"), lines)
        self.assertRegex(
            lines[1], r"^\S+ \[openclaw#error\] \(3 log lines could not be written: No space left on device\)$"
        )
        self.assertTrue(lines[2].endswith("after"), lines)
        observer(event(log_format="and on"))
        self.assertEqual(bytes(file.data).decode().count("could not be written"), 1)

    def test_torn_line_ended_first(self):
        """
        A line the disk filled in the middle of is ended before the line
        saying it was lost, which is a JSON line in a JSON log; a failure
        while saying so is counted too.
        """
        file = FillingFile()
        log = self.log_file(file)
        observer = make_observer(cast(Any, log), "json", "info")
        file.room = 10
        observer(event(log_format="torn apart"))
        file.room = 0
        file.error = OSError(errno.EPERM, os.strerror(errno.EPERM))
        log.write("gone\n")
        file.room = None
        log.write("back\n")
        lines = bytes(file.data).decode().split("\n")
        self.assertEqual(len(lines[0]), 10)
        said = json.loads(lines[1])
        self.assertEqual(said["level"], "error")
        self.assertEqual(said["message"], "(2 log lines could not be written: Operation not permitted)")
        self.assertEqual(lines[2:], ["back", ""])

    def test_closed_file(self):
        """
        A write to a file closed under it (a bug elsewhere) raises nothing
        either, and is counted.
        """
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        log = ReopenedLogFile(str(path))
        log.write("one\n")
        log.close()
        log.write("two\n")
        log.flush()
        self.assertEqual(path.read_text(), "one\n")


#: A process logging as the gateway does (L{log_destination},
#: L{report_fatal_signals}) to the file it is given, which dies of the
#: signal it is given, after a SIGUSR1's reopen with C{reopen}.
FATAL_SCRIPT = """
import io, os, signal, sys
from openclaw.logs import log_destination, report_fatal_signals
class Reactor:
    def callFromThread(self, f, *args):
        f(*args)
path, signum, reopen = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "reopen"
options = {"nodaemon": False, "logfile": path}
stream = log_destination(options, io.StringIO(), Reactor())
report_fatal_signals(stream, options)
stream.write("started\\n")
if reopen:
    os.rename(path, path + ".1")
    os.kill(os.getpid(), signal.SIGUSR1)
    stream.write("reopened\\n")
os.kill(os.getpid(), signum)
"""


class FatalSignalTests(SynchronousTestCase):
    """
    A fatal signal (SIGBUS, SIGSEGV) leaves Python's traceback in the log
    file, the one a SIGUSR1 reopened included (trial s33 F3: a SIGBUS
    from SQLite's memory-mapped file killed the daemon with no line).
    """

    def die(self, signum: int, reopen: bool) -> Path:
        path = Path(self.mktemp()).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        died = subprocess.run(
            [sys.executable, "-c", FATAL_SCRIPT, str(path), str(signum), "reopen" if reopen else "-"],
            capture_output=True,
            timeout=30,
        )
        self.assertEqual(died.returncode, -signum, died.stderr)
        return path

    def test_sigbus_leaves_a_traceback(self):
        path = self.die(signal.SIGBUS, reopen=False)
        log = path.read_text()
        self.assertTrue(log.startswith("started\n"), log)
        self.assertIn("Fatal Python error: Bus error", log)
        self.assertIn("Current thread", log)

    def test_reopened_file_gets_it(self):
        path = self.die(signal.SIGSEGV, reopen=True)
        log = path.read_text()
        self.assertTrue(log.startswith("reopened\n"), log)
        self.assertIn("Fatal Python error: Segmentation fault", log)
        self.assertNotIn("Fatal Python error", Path(f"{path}.1").read_text())
