"""
Signals an operator (or a unit manager) may send that the gateway has no
use for: noted in the log and otherwise ignored, rather than ending the
process at once as their default action would (no 1001 to control
clients, calls in flight cut, the pidfile and token file left behind).

SIGHUP is taken only when no terminal can send it for a hang-up
(L{handles_hangup}): a gateway started with C{-n} from a terminal still
ends when that terminal is closed, as any foreground program does.

SIGTERM and SIGINT are the reactor's: they stop the gateway cleanly.  A
second one while the gateway stops (an impatient operator, a unit manager
repeating itself) is noted rather than handed to the reactor again, which
would log C{ReactorNotRunning} with a traceback (L{note_repeated_stops}).
SIGUSR1 reopens the log file when there is one (L{openclaw.logs}); only
a signal still at its default action is taken here.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import IO, Any

from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.logger import Logger

_log = Logger(namespace="openclaw")

#: SIGHUP: what it would mean to many daemons, and what to do instead.
RELOAD = "configuration is read once at start-up; restart the gateway to apply changes (SIGTERM stops it cleanly)"


def handles_hangup(daemonized: bool, stdin: IO[Any] | None) -> bool:
    """
    Whether SIGHUP is to be noted and ignored rather than left to end the
    gateway: yes for a daemon (it has no terminal, so a SIGHUP is an
    operator's or a unit manager's) and for a foreground gateway whose
    standard input is not a terminal (systemd, a container); no for a
    foreground gateway on a terminal, which must end when the terminal
    closes rather than go on logging to it.
    """
    if daemonized:
        return True
    try:
        return stdin is None or stdin.closed or not stdin.isatty()
    except (OSError, ValueError):
        return True


def note_signals(reactor: IReactorFromThreads, logging_to: str, hangup: bool) -> list[int]:
    """
    Install, for SIGUSR1, and for SIGHUP when C{hangup}, where each still
    has its default action, a handler that logs one line (on the reactor's
    thread) and otherwise ignores the signal.

    @param logging_to: where the log goes when there is no file to reopen
        (C{"stdout"}), for SIGUSR1's line.
    @param hangup: whether to take SIGHUP (L{handles_hangup}).
    @return: the signals handled here.
    """
    lines = {signal.SIGUSR1: f"no log file to reopen (logging to {logging_to})"}
    if hangup:
        lines[signal.SIGHUP] = RELOAD
    installed: list[int] = []
    for signum, line in lines.items():
        if signal.getsignal(signum) != signal.SIG_DFL:
            continue

        def noted(number: int, frame: FrameType | None, line: str = line) -> None:
            reactor.callFromThread(
                _log.info, "received {signal}: {line}", signal=signal.Signals(number).name, line=line
            )

        signal.signal(signum, noted)
        installed.append(signum)
    return installed


def note_repeated_stops(reactor: IReactorCore, threads: IReactorFromThreads) -> None:
    """
    Once the reactor runs (and has installed its own handlers), wrap its
    SIGTERM and SIGINT handlers: the first of them stops the gateway as
    before (the reactor's handler, so that twistd still ends with the
    signal); any that comes once the gateway is stopping is logged and
    otherwise ignored: the drain goes on, bounded by
    C{SHUTDOWN_GRACE_SECONDS}, and SIGKILL ends the process at once.
    """
    stopping = [False]

    def stopped() -> None:
        stopping[0] = True

    def wrap() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            original = signal.getsignal(signum)
            if not callable(original):
                continue

            def handler(
                number: int,
                frame: FrameType | None,
                original: Callable[[int, FrameType | None], object] = original,
            ) -> None:
                if not stopping[0]:
                    stopping[0] = True
                    original(number, frame)
                    return
                threads.callFromThread(
                    _log.info,
                    "received {signal} while stopping: the gateway is already draining "
                    "(at most SHUTDOWN_GRACE_SECONDS); SIGKILL ends it at once",
                    signal=signal.Signals(number).name,
                )

            signal.signal(signum, handler)

    reactor.addSystemEventTrigger("before", "shutdown", stopped)
    reactor.callWhenRunning(wrap)
