"""
The gateway's log observer writes what Twisted's own observers would, line
for line, only faster; and it keeps lines in the buffer no longer than a
reactor turn.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from openclaw.logs import LineObserver, make_observer

WHEN = 1764043200.25


class Thing:
    def __str__(self) -> str:
        return "a thing"

    def __repr__(self) -> str:
        return "<Thing>"

    def name(self) -> str:
        return "called"


def events() -> list[dict[str, Any]]:
    """
    One of every kind of event the observer must format as Twisted does.
    """
    try:
        _ = 1 / 0
    except ZeroDivisionError:
        failure = Failure()
    base = {"log_namespace": "openclaw.dataplane", "log_level": LogLevel.info, "log_time": WHEN}
    return [
        {**base, "log_format": "{method} {path} {status} in {ms} ms", "method": "POST", "path": "/v1/x",
         "status": 200, "ms": 1.25},
        {**base, "log_format": "{n:>5} {x:.2f} {cmd!r} {obj} {obj!r}", "n": 7, "x": 3.14159, "cmd": "pi\nng",
         "obj": Thing()},
        {**base, "log_format": "two\nlines {a}", "a": "and\nthree"},
        {**base, "log_format": "attribute {obj.name} call {obj.name()} index {seq[1]}", "obj": Thing(),
         "seq": [1, 2]},
        {**base, "log_format": "missing {nothing}"},
        {**base, "log_format": "broken {"},
        {**base, "log_format": "{{literal}} braces {a}", "a": 1},
        {**base, "log_format": "failed: {why}", "why": "x", "log_failure": failure, "log_level": LogLevel.critical},
        {**base, "log_format": "legacy", "log_system": "HTTPChannel,0,127.0.0.1"},
        {**base, "log_format": None, "other": 1},
        {**base, "log_format": ""},
        {**base, "log_format": "no time"} | {"log_time": None},
        {**base, "log_format": "debug {a}", "a": 1, "log_level": LogLevel.debug},
        {**base, "log_format": "warned {a}", "a": 1, "log_level": LogLevel.warn},
        {"log_format": "no level", "log_namespace": "x", "log_time": WHEN},
        {"log_format": "no namespace", "log_level": LogLevel.error, "log_time": WHEN},
        {**base, "log_format": "next second", "log_time": WHEN + 1},
    ]


class SameAsTwistedTests(SynchronousTestCase):
    def twisted_observer(self, out: io.StringIO, as_json: bool, level: LogLevel) -> Any:
        inner = jsonFileLogObserver(out) if as_json else textFileLogObserver(out)
        return FilteringLogObserver(inner, [LogLevelFilterPredicate(defaultLogLevel=level)])

    def check(self, as_json: bool, level: LogLevel) -> None:
        ours, theirs = io.StringIO(), io.StringIO()
        observer = LineObserver(ours, as_json, level)
        reference = self.twisted_observer(theirs, as_json, level)
        for event in events():
            try:
                reference(dict(event))
            except Exception:
                # Twisted's JSON observer raises on an unformattable event
                # (the publisher then reports the observer's error): so
                # does ours.
                self.assertRaises(Exception, observer, dict(event))
                continue
            observer(dict(event))
        self.assertEqual(ours.getvalue().splitlines(), theirs.getvalue().splitlines())
        self.assertTrue(ours.getvalue())

    def test_text(self):
        for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.critical):
            self.check(False, level)

    def test_json(self):
        for level in (LogLevel.debug, LogLevel.info, LogLevel.error):
            self.check(True, level)

    def test_through_a_logger(self):
        out = io.StringIO()
        log = Logger(namespace="openclaw.test", observer=make_observer(out, "text", "info"))
        log.info("{a} and {b!r}", a=1, b="two")
        log.debug("dropped {a}", a=1)
        (line,) = out.getvalue().splitlines()
        self.assertTrue(line.endswith(" [openclaw.test#info] 1 and 'two'"), line)


class FlushTests(SynchronousTestCase):
    class Stream(io.StringIO):
        flushes = 0
        writes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            return super().write(text)

        def flush(self) -> None:
            self.flushes += 1
            super().flush()

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.running = True  # type: ignore[attr-defined]
        self.out = self.Stream()
        self.observer = LineObserver(self.out, False, LogLevel.info, self.clock)
        self.base = {"log_namespace": "n", "log_time": WHEN, "log_format": "line {i}"}

    def test_once_per_turn(self):
        """
        While the reactor runs, info lines are written in one go and
        flushed once, at the end of the turn: one write, even to an
        unbuffered stream.
        """
        for i in range(100):
            self.observer({**self.base, "log_level": LogLevel.info, "i": i})
        self.assertEqual((self.out.writes, self.out.flushes), (0, 0))
        self.clock.advance(0)
        self.assertEqual((self.out.writes, self.out.flushes), (1, 1))
        self.assertEqual(self.out.getvalue().splitlines()[99][-7:], "line 99")
        self.assertEqual(len(self.out.getvalue().splitlines()), 100)
        self.observer({**self.base, "log_level": LogLevel.info, "i": 100})
        self.clock.advance(0)
        self.assertEqual((self.out.writes, self.out.flushes), (2, 2))

    def test_warnings_at_once(self):
        """
        A warning is written at once, after the lines before it.
        """
        self.observer({**self.base, "log_level": LogLevel.info, "i": 1})
        self.observer({**self.base, "log_level": LogLevel.warn, "i": 2})
        self.assertEqual(self.out.flushes, 1)
        self.assertEqual([line[-6:] for line in self.out.getvalue().splitlines()], ["line 1", "line 2"])
        self.clock.advance(0)
        self.assertEqual(len(self.out.getvalue().splitlines()), 2)

    def test_reactor_not_running(self):
        """
        Before the reactor starts and after it stops, every line is flushed
        at once: no turn will come to flush it.
        """
        self.clock.running = False  # type: ignore[attr-defined]
        self.observer({**self.base, "log_level": LogLevel.info, "i": 1})
        self.assertEqual(self.out.flushes, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
