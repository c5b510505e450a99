"""
The gateway's log observer: text or one JSON object per line, with events
below C{LOG_LEVEL} dropped before anything formats them.

twistd uses an application's L{ILogObserver} component when no C{--logger}
is given, so the service installs this one there and it receives every
event of the process, twistd's own included.  It writes where twistd would
have: standard output in the foreground, else C{--logfile} (default
C{twistd.log}), reopened on SIGUSR1 for logrotate.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping
from string import Formatter
from typing import IO, Any

from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    eventAsJSON,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python.logfile import LogFile
from zope.interface import implementer


def log_destination(twistd_options: Mapping[str, Any], stdout: IO[str]) -> IO[str] | None:
    """
    The stream twistd would log to, or L{None} where twistd's own choice
    must stand (syslog).
    """
    if twistd_options.get("syslog"):
        return None
    logfile = twistd_options.get("logfile")
    if logfile == "-" or (twistd_options.get("nodaemon") and not logfile):
        return stdout
    # No rotation of our own (logrotate's job); SIGUSR1 reopens the file
    # logrotate has moved away.
    log_file = LogFile.fromFullPath(logfile or "twistd.log", rotateLength=None)
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.reopen)

        signal.signal(signal.SIGUSR1, rotate)
    return log_file  # type: ignore[return-value]


def make_observer(stream: IO[str], log_format: str, level: str, reactor: Any = None) -> ILogObserver:
    """
    An observer writing C{stream} in C{log_format} (C{text} or C{json}),
    dropping events below C{level}.

    @param reactor: Given, lines below warn are flushed once per turn of
        this reactor while it runs, instead of one by one.
    """
    return LineObserver(stream, log_format == "json", LogLevel.levelWithName(level), reactor)


@implementer(ILogObserver)
class LineObserver:
    """
    Writes each event at or above a level as a line: text as twistd's own
    observer writes it (C{textFileLogObserver}), or Twisted's JSON
    (C{jsonFileLogObserver}).

    Why not Twisted's observers themselves (a C{FilteringLogObserver}
    around a C{FileLogObserver}): the data plane can log a line per API call
    (every failure; every success too at debug), and in the gateway process
    they took about 55 µs per line, a third of a call's CPU.  The level predicate walks the namespace on every event,
    C{string.Formatter} re-parses the format string, the timestamp goes
    through C{strftime} and the file is flushed, each time.  Here the level
    is one comparison; a format string whose fields are plain names is
    formatted by C{str.format_map} (anything else, and any event that fails
    that way, by Twisted's own formatting, so the output is the same); the
    timestamp is formatted once a second; and while the reactor runs, lines
    below warn are gathered and written in one go once per turn of it (any
    other line writes them all at once, as does the end of the turn): one
    write per turn even where the stream is unbuffered (C{PYTHONUNBUFFERED},
    common in service units and containers), not one per line.
    """

    def __init__(
        self,
        stream: IO[str],
        as_json: bool,
        level: LogLevel,
        reactor: Any = None,
    ) -> None:
        self._stream = stream
        self._as_json = as_json
        minimum = _priority(level)
        self._levels = frozenset(each for each in LogLevel.iterconstants() if _priority(each) >= minimum)
        self._reactor = reactor
        self._flush_pending = False
        #: Lines waiting for the end of this reactor turn, written then in
        #: one go (the stream may be unbuffered: C{PYTHONUNBUFFERED}).
        self._lines: list[str] = []
        #: Per format string, whether str.format_map formats it as Twisted would.
        self._plain: dict[str, bool] = {}
        self._second: int | None = None
        self._stamp = ""

    def __call__(self, event: LogEvent) -> None:
        level = event.get("log_level")
        # As LogLevelFilterPredicate: no level or no namespace, no line.
        if level not in self._levels or not event.get("log_namespace"):
            return
        if self._as_json:
            line = "\x1e" + eventAsJSON(event) + "\n"
        else:
            line = self._text(event, level)
            if line is None:
                return
        reactor = self._reactor
        if reactor is None or level in _FLUSH_AT_ONCE or not reactor.running:
            if self._lines:
                self._lines.append(line)
                self._flush()
            else:
                self._stream.write(line)
                self._stream.flush()
            return
        self._lines.append(line)
        if not self._flush_pending:
            self._flush_pending = True
            reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        lines, self._lines = self._lines, []
        if lines:
            self._stream.write("".join(lines))
        self._stream.flush()

    def _text(self, event: LogEvent, level: LogLevel) -> str | None:
        format_string = event.get("log_format")
        if "log_failure" in event or not isinstance(format_string, str) or "log_system" in event:
            return formatEventAsClassicLogText(event)
        plain = self._plain.get(format_string)
        if plain is None:
            plain = _is_plain(format_string)
            if len(self._plain) < _MAX_FORMATS:
                self._plain[format_string] = plain
        if not plain:
            return formatEventAsClassicLogText(event)
        try:
            text = format_string.format_map(event)
        except Exception:
            return formatEventAsClassicLogText(event)
        if not text:
            return None
        when = event.get("log_time")
        if when is None:
            stamp = "-"
        elif int(when) == self._second:
            stamp = self._stamp
        else:
            stamp = self._stamp = formatTime(when)
            self._second = int(when)
        if "\n" in text:
            text = text.replace("\n", "\n\t")
        return f"{stamp} [{event['log_namespace']}#{level.name}] {text}\n"


#: Written through at once, whatever the load: nothing an operator needs
#: to see is left sitting in a buffer.
_FLUSH_AT_ONCE = frozenset({LogLevel.warn, LogLevel.error, LogLevel.critical})
#: A bound on the cache of format strings (they are literals in code; this
#: only guards against one built at run time).
_MAX_FORMATS = 1024
_FIELD_NAME = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")


def _priority(level: LogLevel) -> int:
    return list(LogLevel.iterconstants()).index(level)


def _is_plain(format_string: str) -> bool:
    """
    Whether every field of C{format_string} is a plain name (C{{status}},
    C{{duration_ms:.1f}}, C{{cmd!r}}), which C{str.format_map} formats
    exactly as Twisted does; not C{{x()}}, C{{a.b}} or C{{a[0]}}.
    """
    try:
        fields = [name for _, name, _, _ in Formatter().parse(format_string) if name is not None]
    except ValueError:
        return False
    return all(_FIELD_NAME.match(name) for name in fields)


def foreground(twistd_options: Mapping[str, Any]) -> bool:
    """
    Whether twistd keeps the process in the foreground (C{-n}); outside
    twistd (tests, scripts) there is no daemonizing at all.
    """
    return bool(twistd_options.get("nodaemon", True))


__all__ = ["LineObserver", "foreground", "log_destination", "make_observer"]
