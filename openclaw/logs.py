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

import signal
from collections.abc import Mapping
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile


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


def make_observer(stream: IO[str], log_format: str, level: str) -> ILogObserver:
    """
    An observer writing C{stream} in C{log_format} (C{text} or C{json}),
    dropping events below C{level}.
    """
    base = jsonFileLogObserver(stream) if log_format == "json" else textFileLogObserver(stream)
    return FilteringLogObserver(base, [LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))])


def foreground(twistd_options: Mapping[str, Any]) -> bool:
    """
    Whether twistd keeps the process in the foreground (C{-n}); outside
    twistd (tests, scripts) there is no daemonizing at all.
    """
    return bool(twistd_options.get("nodaemon", True))


__all__ = ["foreground", "log_destination", "make_observer"]
