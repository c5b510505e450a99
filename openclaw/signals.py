"""
Signals an operator (or a unit manager) may send that the gateway has no
use for: noted in the log and otherwise ignored, rather than ending the
process at once as their default action would (no 1001 to control
clients, calls in flight cut, the pidfile and token file left behind).

SIGTERM and SIGINT are the reactor's: they stop the gateway cleanly.
SIGUSR1 reopens the log file when there is one (L{openclaw.logs}); only
a signal still at its default action is taken here.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

_log = Logger(namespace="openclaw")

#: SIGHUP: what it would mean to many daemons, and what to do instead.
RELOAD = "configuration is read once at start-up; restart the gateway to apply changes (SIGTERM stops it cleanly)"


def note_signals(reactor: IReactorFromThreads, logging_to: str) -> list[int]:
    """
    Install, for SIGHUP and SIGUSR1 where each still has its default
    action, a handler that logs one line (on the reactor's thread) and
    otherwise ignores the signal.

    @param logging_to: where the log goes when there is no file to reopen
        (C{"stdout"}), for SIGUSR1's line.
    @return: the signals handled here.
    """
    lines = {
        signal.SIGHUP: RELOAD,
        signal.SIGUSR1: f"no log file to reopen (logging to {logging_to})",
    }
    installed: list[int] = []
    for signum, line in lines.items():
        if signal.getsignal(signum) != signal.SIG_DFL:
            continue

        def noted(number: int, frame: Any, line: str = line) -> None:
            reactor.callFromThread(
                _log.info, "received {signal}: {line}", signal=signal.Signals(number).name, line=line
            )

        signal.signal(signum, noted)
        installed.append(signum)
    return installed
