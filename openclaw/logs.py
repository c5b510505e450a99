"""
The gateway's log observer: C{twisted.logger}'s own observers, with events
below C{LOG_LEVEL} dropped before anything formats them.

What is Twisted's and what is ours:

  - Level filtering is L{FilteringLogObserver} with a
    L{LogLevelFilterPredicate}: a debug event costs one predicate call when
    the level is info, and is never formatted.
  - Text lines are twistd's (L{formatEventAsClassicLogText}), with every
    control character of the line escaped (L{text_line}): a value a
    client sent cannot end a line, move the cursor or erase what a
    terminal shows.
  - JSON lines are a L{FileLogObserver} with a formatter of ours,
    L{json_line}: one flat object per line (no record separator, no
    Twisted-specific keys), so a log shipper needs to know nothing about
    Twisted; the message is Twisted's L{formatEvent}.

How it reaches twistd, and why the log file is opened here: twistd's
L{AppLogger.start} logs to, in this order, the C{--logger} factory, else the
application's L{ILogObserver} component, else an observer of its own built
from C{--logfile}/C{--syslog} (plain text, every level: no filter and no
JSON).  Twisted has no public way to wrap that last observer, and neither a
component nor a C{--logger} factory (called with no arguments) is handed
twistd's log file: so filtering and JSON can only be had by giving twistd
an observer, and that observer must write where twistd would have.  The
service installs ours as the L{ILogObserver} component (the documented
hook, which an operator's C{--logger} still overrides), and
L{log_destination} follows twistd's documented rules for the stream:
standard output in the foreground (C{-n}) or with C{--logfile -} (a daemon
cannot log to standard output: a configuration error, as in twistd), else
C{--logfile} (default C{twistd.log}).  C{--syslog}
leaves twistd's own syslog observer in place.

One deliberate difference from twistd's own log file: twistd rotates it
itself (at 1 MB, and on SIGUSR1 by renaming it to C{.1}), which fights an
external rotator, and its SIGUSR1 does nothing once logrotate has moved the
file away.  Here rotation is logrotate's job: the file never rotates by
itself, and SIGUSR1 reopens it, so after C{mv} and C{kill -USR1} new lines
go to a new file.  The reopen opens the new file before letting go of
the one it had (L{ReopenedLogFile}): one that fails is logged, and logging
goes on to the file it had.  And the file is opened for appending
(C{O_APPEND}), where twistd's L{LogFile} writes from the offset it
opened at: the workers of C{--workers} each open the same file, and
would write over each other's lines.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import math
import os
import pwd
import re
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import IO, Any, BinaryIO, cast

import attrs
import orjson
from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.application.internet import ClientService
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    formatEventAsClassicLogText,
)
from twisted.python.components import Componentized
from zope.interface import implementer

from openclaw.addresses import host_of
from openclaw.files import NotARegularFile, open_regular_file
from openclaw.settings import ConfigError
from openclaw.settings.permissions import untrusted_log_file
from openclaw.timefmt import isoformat

_log = Logger(namespace="openclaw")

#: Twisted log namespaces whose info lines say nothing an operator needs,
#: shown only at LOG_LEVEL=debug: the upstream connection pool's factory logs
#: "Starting factory" and "Stopping factory" for every provider connection it
#: opens and closes, in a namespace under C{twisted.web.client} (its class's
#: name).  A level set for a namespace covers the names under it
#: (L{LogLevelFilterPredicate}); the module logs nothing else at info.
QUIET_NAMESPACES = ("twisted.web.client",)
#: Likewise: Twisted's ClientService, through which txredisapi makes the
#: cluster store's connections, logs "Scheduling retry N to connect" for
#: every attempt (the cluster logs one line per outage instead).
QUIET_RECONNECTS = (f"{ClientService.__module__}.{ClientService.__name__}",)
#: Autobahn's WebSocket server protocol (every control connection), whose
#: logger (txaio's, named after the class that makes it) logs per
#: connection: "failing WebSocket opening handshake" (info) and "dropping
#: connection to peer ...: <reason>" (warn) for every handshake refused,
#: and "failing WebSocket connection (code=...)" (warn) for every peer
#: that breaks the protocol.  A peer can cause each at will, so a flood of
#: them would flood the log: a locked-out client retrying, a page with a
#: foreign Origin.  The gateway logs what an operator needs itself (each
#: refusal with its reason, once per lockout for a locked-out client, an
#: unexpected error in its handshake code with the traceback), and counts
#: every refusal in C{openclaw_control_refused_connections_total}; these
#: lines are shown at LOG_LEVEL=debug only, Autobahn's errors always.
QUIET_WEBSOCKET = (f"{WebSocketServerProtocol.__module__}.{WebSocketServerProtocol.__name__}",)
#: How Autobahn's line for a connection lost to a TLS error starts
#: ("SSL error: tlsv1 alert unknown ca (in )", logged at error): a peer
#: that does not trust the certificate, or speaks plain HTTP to a TLS
#: listener, causes it at will, and it is no error of the gateway's, which
#: logs the connection's end itself, at info, with the peer
#: (L{openclaw.control.protocol}).  Shown at LOG_LEVEL=debug only
#: (L{PeerTLSErrors}).
PEER_TLS_ERROR_PREFIX = "SSL error: "

#: The value types a JSON line carries from an event's own fields; other
#: values are left out (the message already shows them as text).
_JSON_TYPES = (str, int, float, bool, type(None), list, tuple, dict)


def foreground(twistd_options: Mapping[str, Any]) -> bool:
    """
    Whether twistd keeps the process in the foreground (C{-n}); outside
    twistd (tests, scripts) there is no daemonizing at all.
    """
    return bool(twistd_options.get("nodaemon", True))


def logs_to_stdout(twistd_options: Mapping[str, Any]) -> bool:
    """
    Whether the log goes to standard output (L{log_destination}): in the
    foreground, without C{--syslog}, with no C{--logfile} or C{--logfile -}.
    """
    if twistd_options.get("syslog") or not foreground(twistd_options):
        return False
    return twistd_options.get("logfile") in (None, "", "-")


def log_destination(
    twistd_options: Mapping[str, Any],
    stdout: IO[str],
    reactor: IReactorThreads,
    also_on_reopen: Callable[[], object] | None = None,
) -> IO[Any] | None:
    """
    The stream twistd would log to, given twistd's own options: C{stdout}
    in the foreground without C{--logfile} or with C{--logfile -}; else the
    C{--logfile} (default C{twistd.log}), opened for appending, never
    rotated by the gateway, and reopened on SIGUSR1 (unless something
    already handles that signal).  L{None} with C{--syslog}: twistd's own
    syslog observer must stand.

    A log file that does not exist yet is created with the mode the
    process's umask will give once twistd has set it (C{--umask}, C{0077}
    for a daemon by default; else the process's own), never writable by
    group or others (L{log_file_mode}): the file is opened here, before
    twistd daemonizes and applies that umask, and would otherwise get the
    mode of the shell's umask (0644 under the usual 022).  The file a
    SIGUSR1 makes gets the same mode (L{ReopenedLogFile.reopen}).  An
    existing file keeps its mode (logrotate's C{create} sets it).

    @param reactor: the reactor the reopen is handed to (from the signal
        handler, as twistd does).
    @param also_on_reopen: called (on the reactor's thread) after each
        reopen: C{--workers} passes SIGUSR1 on to its workers there.
    @raise ConfigError: for C{--logfile -} without C{-n}: a daemon has no
        standard output; or the log file cannot be created or opened.
    """
    if twistd_options.get("syslog"):
        return None
    logfile = twistd_options.get("logfile")
    if logfile == "-" and not foreground(twistd_options):
        raise ConfigError("a daemon cannot log to standard output (--logfile -): add -n, or name a file")
    if logs_to_stdout(twistd_options):
        return stdout
    path = os.path.abspath(logfile or "twistd.log")
    mode = log_file_mode(twistd_options)
    try:
        _create_log_file(path, mode)
    except OSError as error:
        directory = os.path.dirname(path)
        if os.path.isdir(directory):
            todo = f"make {directory} writable by the gateway's user"
        else:
            todo = f"create {directory} (writable by the gateway's user)"
        raise ConfigError(
            f"cannot create the log file {path} (--logfile): {error.strerror}; {todo}, or name a log file in a "
            "directory it may write"
        ) from None
    try:
        log_file = ReopenedLogFile(path, mode)
    except OSError as error:
        # There, but not a file this user may append to (a directory,
        # another user's 0600 file).
        if isinstance(error, UnsafeLogFile):
            raise ConfigError(f"the log file {path} (--logfile) is refused: {error}") from None
        raise ConfigError(
            f"cannot open the log file {path} (--logfile) for appending: {error.strerror or error}; "
            "name a file the gateway's user may write"
        ) from None

    def reopened() -> None:
        log_file.reopen()
        if also_on_reopen is not None:
            also_on_reopen()

    if not signal.getsignal(signal.SIGUSR1):

        def reopen(signum: int, frame: FrameType | None) -> None:
            reactor.callFromThread(reopened)

        signal.signal(signal.SIGUSR1, reopen)
    # Not an IO subclass, but file-like where FileLogObserver needs it:
    # write (text or UTF-8 bytes), flush, close.
    return cast("IO[Any]", log_file)


class ReopenedLogFile:
    """
    The gateway's log file at C{path}, opened for appending and
    unbuffered (L{_append_to}), never rotated by itself, replaced by a new
    one at the same path on L{reopen} (SIGUSR1) only once that one is
    open.  A file it makes there gets C{mode} (L{log_file_mode}, the mode
    the first one was made with).

    Not Twisted's L{twisted.python.logfile.LogFile}: it writes from the
    offset it opened at, not at the file's end, so processes sharing the
    file (C{--workers}) write over each other's lines; and its C{reopen}
    closes the file before opening the new one: when the open fails
    (logrotate's C{olddir} missing, the directory moved away or not
    writable, no descriptor left) it is left with no file at all, every
    later write fails (so nothing is logged any more, not even the
    failure), and a later C{reopen} fails too.

    A write that fails (a full disk, C{ENOSPC}; a file made immutable or
    append-only, C{EPERM}; an I/O error) never raises into the logging
    system, which would drop the error with the line: the lines are
    counted, and the first write that works again is preceded by one line
    saying how many were lost and why (L{LOST_LINES_FORMAT}, formatted as
    every other line: L{format_event}).

    @ivar format_event: how the line about lost lines is formatted (a
        log event to a line, or L{None} for none): twistd's text lines
        (L{text_line}) unless L{make_observer} sets its own formatter.
    """

    def __init__(self, path: str, mode: int = 0o600, open_file: Callable[[str], BinaryIO] | None = None) -> None:
        """
        @param open_file: opens C{path} for appending, unbuffered
            (L{_append_to} when L{None}): each C{write} of what it returns
            makes one C{write(2)} and returns the bytes written.
        @raise OSError: C{path} cannot be opened (L{_append_to}).
        """
        self.path = path
        #: The permission bits a log file it makes gets.
        self.mode = mode
        self.format_event: Callable[[LogEvent], str | None] = text_line
        self._open = open_file or _append_to
        self._file = self._open(path)
        # Events may be logged from other threads (adbapi's): none writes
        # to a file being let go.
        self._lock = threading.Lock()
        #: Lines not written since the last write that worked, and why the
        #: last of them was not.
        self._lost = 0
        self._lost_reason = ""
        #: Whether the last write that failed had written part of a line.
        self._torn = False
        #: Whether faulthandler writes to the file (L{report_fatal_signals}).
        self._fatal_signals = False

    def write(self, data: str | bytes) -> None:
        """
        Append C{data} (text is encoded as UTF-8, as twistd's log file
        does): with C{O_APPEND}, each C{write(2)} lands at the file's end
        as it is then, whichever process wrote last; one that writes part
        of C{data} only (a disk filling up) is followed by another for the
        rest.  Never raises: the lines that could not be written are
        counted, and said (L{LOST_LINES_FORMAT}) before the first write
        that works again.
        """
        if isinstance(data, str):
            data = data.encode("utf-8")
        with self._lock:
            if self._lost:
                failed = self._append(self._lost_lines())
                if failed is not None:
                    self._lost += max(1, data.count(b"\n"))
                    self._lost_reason = failed[1]
                    return
                self._lost = 0
            failed = self._append(data)
            if failed is not None:
                self._lost += failed[0]
                self._lost_reason = failed[1]

    def _append(self, data: bytes) -> tuple[int, str] | None:
        """
        Write all of C{data}, a short write followed by another for the
        rest.

        @return: L{None} once all is written; else how many lines of
            C{data} were not written in full (at least 1) and why.
        """
        view = memoryview(data)
        written = 0
        try:
            while written < len(view):
                count = self._file.write(view[written:])
                if not count:
                    return self._failed(data, written, "the file took none of the bytes written")
                written += count
        except Exception as error:
            return self._failed(data, written, getattr(error, "strerror", None) or str(error) or repr(error))
        if data:
            self._torn = not data.endswith(b"\n")
        return None

    def _failed(self, data: bytes, written: int, reason: str) -> tuple[int, str]:
        if written:
            self._torn = data[written - 1 : written] != b"\n"
        return max(1, data.count(b"\n", written)), reason

    def _lost_lines(self) -> bytes:
        """
        The line saying how many lines were lost and why, after a newline
        ending the line a failed write left torn.
        """
        line = None
        with contextlib.suppress(Exception):
            line = self.format_event(
                {
                    "log_format": LOST_LINES_FORMAT,
                    "log_level": LogLevel.error,
                    "log_namespace": _log.namespace,
                    "log_time": time.time(),
                    "lost": self._lost,
                    "reason": self._lost_reason,
                }
            )
        if not line:
            line = LOST_LINES_FORMAT.format(lost=self._lost, reason=self._lost_reason) + "\n"
        return (b"\n" if self._torn else b"") + line.encode("utf-8")

    def flush(self) -> None:
        """
        Nothing to flush (the file is unbuffered); never raises.
        """
        with self._lock, contextlib.suppress(Exception):
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._fatal_signals:
                # Not to a descriptor closed, or reused for another file.
                faulthandler.disable()
                self._fatal_signals = False
            self._file.close()

    def report_fatal_signals(self) -> None:
        """
        Have a fatal signal (C{SIGSEGV}, C{SIGBUS}, C{SIGFPE}, C{SIGABRT},
        C{SIGILL}) write Python's C{Fatal Python error} and every thread's
        traceback to the file before the process dies of it (the standard
        library's L{faulthandler}), and to each file L{reopen} opens from
        then on; until L{close}.  Without it the process dies with nothing
        logged (a SIGBUS from SQLite's memory-mapped C{-shm} file made
        immutable), its pidfile left behind.

        @raise OSError: faulthandler cannot use the file's descriptor.
        """
        with self._lock:
            faulthandler.enable(self._file)
            self._fatal_signals = True

    def reopen(self) -> None:
        """
        Open C{path} again (creating it with L{mode} when it is not there,
        as the first one was, whatever the umask: under twistd's
        C{--umask 000} the new one was 0666, for anyone to write; one that
        is there keeps its mode) and log to it from now on (and report
        fatal signals there, L{report_fatal_signals}).  If it cannot
        be opened, say so in the log (still the file it had, wherever that
        was moved) and go on writing there: a later SIGUSR1 tries again.
        """
        try:
            _create_log_file(self.path, self.mode)
            reopened = self._open(self.path)
        except (UnsafeLogFile, NotARegularFile) as error:
            _log.error(
                "could not reopen the log file {path} on SIGUSR1: {reason}; logging goes on to the file "
                "it had (where it was moved to): remove what is at {path}, then send SIGUSR1 again",
                path=self.path,
                reason=str(error),
            )
            return
        except OSError as error:
            _log.error(
                "could not reopen the log file {path} on SIGUSR1: {reason}; logging goes on to the file "
                "it had (where it was moved to): {advice}, then send SIGUSR1 again",
                path=self.path,
                reason=error.strerror or str(error),
                advice=reopen_advice(self.path, error),
            )
            return
        with self._lock:
            previous, self._file = self._file, reopened
            if self._fatal_signals:
                # Before the file it wrote to is closed.
                faulthandler.enable(reopened)
            previous.close()


def reopen_advice(path: str, error: OSError) -> str:
    """
    What to do when the log file at C{path} could not be opened again
    (C{error}): a file there that the gateway's user may not write (one a
    log rotation made for another user, C{create 0600 root root}) is to
    be given to that user; else its directory is to exist and be
    writable.
    """
    if error.errno in (errno.EACCES, errno.EPERM) and os.path.lexists(path):
        try:
            user = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            user = f"uid {os.geteuid()}"
        return (
            f"make {path} writable by the gateway's user {user} (chown it to {user}; with logrotate, "
            f"create 0640 {user} <group>)"
        )
    return f"make {os.path.dirname(path)} exist and writable"


#: The line written before the first line that could be written after
#: some could not (L{ReopenedLogFile.write}): how many, and the error of
#: the last (C{strerror}: "No space left on device").
LOST_LINES_FORMAT = "({lost} log lines could not be written: {reason})"


def report_fatal_signals(destination: IO[Any] | None, twistd_options: Mapping[str, Any]) -> None:
    """
    Have a fatal signal (C{SIGSEGV}, C{SIGBUS}, C{SIGFPE}, C{SIGABRT},
    C{SIGILL}) leave Python's C{Fatal Python error} and every thread's
    traceback where the operator looks (the standard library's
    L{faulthandler}, which takes one file): in the log file when the
    gateway logs to one (L{log_destination}; followed across SIGUSR1's
    reopen, L{ReopenedLogFile.report_fatal_signals}); else, in the
    foreground (C{-n}: standard output, C{--syslog}), on the process's
    standard error (a terminal, systemd's journal).  A daemon logging to
    syslog has none (its standard error is C{/dev/null}).

    @param destination: L{log_destination}'s stream for C{twistd_options}.
    """
    if isinstance(destination, ReopenedLogFile):
        destination.report_fatal_signals()
    elif foreground(twistd_options) and sys.__stderr__ is not None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            faulthandler.enable(sys.__stderr__)


class UnsafeLogFile(OSError):
    """
    The log file is not one the gateway may append to
    (L{untrusted_log_file}); the message says why and what to do.
    """


def _append_to(path: str) -> BinaryIO:
    """
    C{path} opened for appending (C{O_APPEND}: each write lands at the
    file's end, whoever else writes to it), unbuffered (one C{write(2)}
    per write), created with the process's umask when it is not there;
    one that is there keeps its mode.  It must be a regular file: opening
    does not wait for a FIFO's reader (L{open_regular_file}), and neither
    a link of another user's on the way nor a file of another user's is
    written to (L{untrusted_log_file}).

    @raise OSError: it cannot be opened, or may not be (L{UnsafeLogFile},
        L{NotARegularFile}).
    """
    if os.path.realpath(path) == os.devnull:
        # Logs thrown away on purpose (--logfile /dev/null).
        return open(os.devnull, "ab", buffering=0)
    refusal = untrusted_log_file(Path(path))
    if refusal is not None:
        raise UnsafeLogFile(refusal)
    fd = open_regular_file(Path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        # Checked again, now that it is open: a link planted between the
        # check and the open (another user's, in a sticky directory, as
        # logrotate moves the log away) is found now, and the file opened
        # must be the one the path names.
        opened = os.fstat(fd)
        refusal = untrusted_log_file(Path(path))
        named = os.stat(path)
        if refusal is None and (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
            refusal = "it was replaced while it was being opened; name a log file of the gateway's own (--logfile)"
        if refusal is not None:
            raise UnsafeLogFile(refusal)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "ab", buffering=0)


def _future_umask(twistd_options: Mapping[str, Any]) -> int | None:
    """
    The umask twistd will set (its C{--umask}, else C{0077} for a daemon);
    L{None} when it leaves the process's own.
    """
    umask = twistd_options.get("umask")
    if umask is not None:
        return int(umask)
    return None if foreground(twistd_options) else 0o077


def log_file_mode(twistd_options: Mapping[str, Any]) -> int:
    """
    The permission bits of a log file the gateway makes (its first one
    and each one a SIGUSR1 makes): C{0666} less the umask twistd will set
    (L{_future_umask}), else the process's own, and never writable by
    group or others (a log anyone may write is a log anyone may forge
    lines in): C{0600} for a daemon by default, C{0644} under C{--umask
    000} or the usual 022.
    """
    umask = _future_umask(twistd_options)
    if umask is None:
        umask = _current_umask()
    return 0o666 & ~umask & ~(stat.S_IWGRP | stat.S_IWOTH)


def _current_umask() -> int:
    """
    The process's umask, read by setting it (set to C{0077} meanwhile:
    a file another thread makes then is only the more private).
    """
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def _create_log_file(path: str, mode: int) -> None:
    """
    Create C{path}, empty, with exactly C{mode} (whatever the process's
    umask is now: the first log file is made before twistd sets its
    own), unless something is there (a link too: C{O_EXCL}).

    @raise OSError: it cannot be created.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, mode)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def make_observer(stream: IO[Any], log_format: str, level: str) -> ILogObserver:
    """
    An observer writing each event at or above C{level} (a L{LogLevel}
    name: C{debug}, C{info}, C{warn}, C{error}, C{critical}) to C{stream},
    one line per event: twistd's text lines for C{log_format="text"}, flat
    JSON objects (L{json_line}) for C{"json"}.  Events below the level, and
    events with no level or namespace, are dropped before any formatting.
    Below C{debug}, the per-connection lines of Twisted's connection pool
    and reconnecting client are shown from C{warn} up, and Autobahn's
    WebSocket server protocol's from C{error} up (L{QUIET_NAMESPACES},
    L{QUIET_RECONNECTS}, L{QUIET_WEBSOCKET}) but for its line for a peer's
    TLS error, not shown (L{PeerTLSErrors}).
    """
    formatter = json_line if log_format == "json" else text_line
    if isinstance(stream, ReopenedLogFile):
        # Its line about lost lines is one of the file's format.
        stream.format_event = formatter
    inner = FileLogObserver(stream, formatter)
    threshold = LogLevel.levelWithName(level)
    predicate = LogLevelFilterPredicate(defaultLogLevel=threshold)
    if threshold != LogLevel.debug:
        # Raised, never lowered below LOG_LEVEL.
        for namespace in (*QUIET_NAMESPACES, *QUIET_RECONNECTS):
            predicate.setLogLevelForNamespace(namespace, max(threshold, LogLevel.warn))
        for namespace in QUIET_WEBSOCKET:
            predicate.setLogLevelForNamespace(namespace, max(threshold, LogLevel.error))
        # Before the level filter: a line's level may be lowered.
        return PeerLineLimiter(FilteringLogObserver(inner, [PeerTLSErrors(), predicate]))
    return PeerLineLimiter(FilteringLogObserver(inner, [predicate]))


def offer_log_observer(parent: object, observer: ILogObserver | None) -> None:
    """
    Have twistd log to C{observer}: set it as the L{ILogObserver} component
    of C{parent}, the application a service is joining
    (C{setServiceParent}), where twistd's logger looks for the observer to
    log to (L{twisted.application.app.AppLogger}).  Nothing for L{None},
    nor for a C{parent} that is no application (not
    L{twisted.python.components.Componentized}: a plain C{MultiService},
    as in tests).
    """
    if observer is not None and isinstance(parent, Componentized):
        parent.setComponent(ILogObserver, observer)


@implementer(ILogFilterPredicate)
@attrs.frozen
class PeerTLSErrors:
    """
    Drops Autobahn's error line for a WebSocket connection lost to a TLS
    error (L{PEER_TLS_ERROR_PREFIX}), logged under one of C{namespaces}
    (by default the gateway's server protocols', L{QUIET_WEBSOCKET};
    C{openclawctl} gives its client protocol's); lets every other event
    through to the next predicate.
    """

    namespaces: tuple[str, ...] = QUIET_WEBSOCKET

    def __call__(self, event: LogEvent) -> object:
        # A PredicateResult: object, as Twisted's constants are untyped.
        if event.get("log_namespace") in self.namespaces and str(event.get("log_format")).startswith(
            PEER_TLS_ERROR_PREFIX
        ):
            return PredicateResult.no
        return PredicateResult.maybe


#: What Twisted's TCP ports log for each connection they cannot accept
#: (C{twisted.internet.tcp}: out of descriptors, C{EMFILE}/C{ENFILE}, and
#: its recovery, one line per socket closed): a flood would flood the log.
ACCEPT_ERROR_FORMATS = frozenset(
    (
        "Could not accept new connection ({acceptError})",
        "EMFILE encountered; releasing reserved file descriptor.",
        "EMFILE recovery: Closed socket from {address}",
        "Re-reserving EMFILE recovery file descriptor.",
    )
)
#: Seconds between two lines of one kind of L{PEER_CAUSED_LINES} at most
#: (unless the kind has an interval of its own).
ACCEPT_ERROR_INTERVAL_SECONDS = 60.0
#: The namespace of the data plane's line for each finished API request
#: (L{openclaw.dataplane.context.APIContext.completed}).
DATAPLANE_NAMESPACE = "openclaw.dataplane"
#: The metrics listener's log namespace (L{openclaw.dataplane.metrics_site}).
METRICS_NAMESPACE = "openclaw.metrics"
#: The field that marks the data plane's line for a request refused
#: without an accepted key (C{True}; absent on every other line): a 4xx,
#: or a consumer key's 503 while the consumers cannot be read (the key
#: not checked: L{openclaw.dataplane.auth.UNCHECKED_KEY_CODES}).
KEYLESS_FIELD = "keyless"
#: How many refusals of requests without an accepted key are logged at
#: most in L{KEYLESS_REFUSAL_INTERVAL_SECONDS}: a few clients with a
#: wrong key are each logged; a flood (any client can send thousands a
#: second, each a line of a few hundred bytes) is summed up.
KEYLESS_REFUSAL_LINES = 10
KEYLESS_REFUSAL_INTERVAL_SECONDS = 1.0
#: The field that marks the data plane's line for an HTTP/2 connection
#: aborted for what its client sent after twisted.web had ended it
#: (C{True}; L{openclaw.dataplane.site.APISite.http2_flooded}).
HTTP2_FLOOD_FIELD = "http2_flood"
#: The field that marks the data plane's line for a call that found no
#: file descriptor free to reach its provider (C{True}): logged once a
#: minute at most, the count of those left out with the next.
DESCRIPTORS_FIELD = "out_of_descriptors"
#: The namespace of the control plane's line for each refused connection:
#: its factory's class (a L{Logger} read from a class attribute takes the
#: class's name: L{openclaw.control.protocol.ControlFactory}).
CONTROLPLANE_NAMESPACE = "openclaw.control.protocol.ControlFactory"
#: The field that marks the control plane's line for a refused
#: connection (its reason; absent on every other line).
REFUSED_CONNECTION_FIELD = "refused_connection"
#: The namespace of the control plane's command lines (its
#: L{openclaw.control.plane.ControlPlane}'s logger).
COMMANDS_NAMESPACE = "openclaw.controlplane"
#: The field that marks the control plane's line for a token of the
#: gateway's own, expired or replaced, refused (its reason): no guess, not
#: counted toward the lockout, so a client holding one could reconnect and
#: send it without end; limited as refused connections are.
STALE_TOKEN_FIELD = "stale_token"
#: How many refused control connections are logged at most in
#: L{KEYLESS_REFUSAL_INTERVAL_SECONDS}: any client can open thousands a
#: second with a foreign C{Origin} or from outside C{TRUSTED_CLIENT_IPS}.
REFUSED_CONNECTION_LINES = 10


@attrs.frozen
class PeerCausedLine:
    """
    One kind of line logged for each connection or request, for what its
    peer did: any client can cause it at will, so a flood of them would
    flood the log.  Matched by its C{log_format} (one of C{formats}), or
    else by its C{namespace}, C{level} and a C{field} of the event (none
    of the text).

    @ivar name: the kind; the first line let through after some were left
        out carries their count as C{<name>_suppressed}.
    @ivar interval: seconds of one window of L{PeerLineLimiter}; None: the
        limiter's own (L{ACCEPT_ERROR_INTERVAL_SECONDS}).
    @ivar burst: how many lines of the kind one window lets through.
    @ivar shown_at: the level it is shown at (the line was logged above
        it); None: its own.
    @ivar message: its message when shown at C{shown_at}: the event's own
        fields, and C{peer} (the host of its C{client} field,
        L{host_of}).
    @ivar per_value: each value of C{field} is limited on its own (the
        control plane's refusals, by reason: a flood of one reason does
        not hide the lines of another).
    """

    name: str
    formats: frozenset[str] = frozenset()
    namespace: str | None = None
    level: LogLevel | None = None
    field: str | None = None
    shown_at: LogLevel | None = None
    message: str | None = None
    interval: float | None = None
    burst: int = 1
    per_value: bool = False

    def matches(self, event: LogEvent) -> bool:
        if self.formats:
            return event.get("log_format") in self.formats
        return (
            event.get("log_namespace") == self.namespace
            and event.get("log_level") == self.level
            and self.field in event
        )


#: The lines of L{PEER_CAUSED_LINES}: Twisted's accept failures, Twisted's
#: HTTP client's line for each interim (1xx) answer a provider sends,
#: twisted.web's HTTP/2 connection's error line (its C{client},
#: C{maxBufferedControlFrameBytes} fields) when it aborts a connection
#: whose client sends control frames (PINGs, SETTINGS) and does not read
#: the answers: no error of the gateway's, which goes on serving everyone
#: else, so shown at info; and the data plane's line for each request
#: refused without an accepted key (L{KEYLESS_FIELD}: a 401, a 404 or 405,
#: any 4xx answered before a key was accepted, a consumer key's 503 while
#: the consumers cannot be read), L{KEYLESS_REFUSAL_LINES}
#: a second; and the control plane's lines for each refused connection
#: (L{REFUSED_CONNECTION_FIELD}), each connection a TLS error ended
#: (its C{tls_error} field) and each stale token refused
#: (L{STALE_TOKEN_FIELD}), L{REFUSED_CONNECTION_LINES} a second each.
PEER_CAUSED_LINES = (
    PeerCausedLine("accept_errors", formats=ACCEPT_ERROR_FORMATS),
    PeerCausedLine(
        "http2_control_frames",
        # twisted.web's class H2Connection (module twisted.web._http2), whose
        # Logger is named after it.
        namespace="twisted.web._http2.H2Connection",
        level=LogLevel.error,
        field="maxBufferedControlFrameBytes",
        shown_at=LogLevel.info,
        message="HTTP/2 connection from {peer} aborted: its client sent control frames (PING, SETTINGS) "
        "and did not read the answers ({bufferedControlFrameBytes} bytes held, at most "
        "{maxBufferedControlFrameBytes})",
    ),
    PeerCausedLine(
        "upstream_interim_answers",
        # Twisted's HTTP client (class HTTPClientParser, whose Logger is
        # named after it) skipping a provider's 1xx answer ("Ignoring
        # unexpected {code} response"): a provider sending them without
        # end (bounded: openclaw.providers.endpoints) would fill the log.
        namespace="twisted.web._newclient.HTTPClientParser",
        level=LogLevel.info,
        field="code",
    ),
    PeerCausedLine(
        "keyless_refusals",
        namespace=DATAPLANE_NAMESPACE,
        level=LogLevel.info,
        field=KEYLESS_FIELD,
        interval=KEYLESS_REFUSAL_INTERVAL_SECONDS,
        burst=KEYLESS_REFUSAL_LINES,
    ),
    PeerCausedLine(
        "http2_floods",
        namespace=DATAPLANE_NAMESPACE,
        level=LogLevel.info,
        field=HTTP2_FLOOD_FIELD,
    ),
    PeerCausedLine(
        # Every call finds none while the process is at its limit.
        "out_of_descriptors",
        namespace=DATAPLANE_NAMESPACE,
        level=LogLevel.error,
        field=DESCRIPTORS_FIELD,
    ),
    PeerCausedLine(
        # The metrics listener's lines at info: each refusal (a 400, a 403
        # for a peer outside TRUSTED_CLIENT_IPS, a 404, a 405) names its
        # peer; a client can cause them at will (many HTTP/2 streams on one
        # connection).  Its scrapes are logged at debug.
        "metrics_refusals",
        namespace=METRICS_NAMESPACE,
        level=LogLevel.info,
        field="peer",
        interval=KEYLESS_REFUSAL_INTERVAL_SECONDS,
        burst=KEYLESS_REFUSAL_LINES,
    ),
    PeerCausedLine(
        # A TLS error ending a control connection (a plain HTTP client on
        # a TLS listener, a CA the client does not trust), logged at info.
        "control_tls_errors",
        namespace=CONTROLPLANE_NAMESPACE,
        level=LogLevel.info,
        field="tls_error",
        interval=KEYLESS_REFUSAL_INTERVAL_SECONDS,
        burst=REFUSED_CONNECTION_LINES,
    ),
    PeerCausedLine(
        "stale_tokens",
        namespace=COMMANDS_NAMESPACE,
        level=LogLevel.warn,
        field=STALE_TOKEN_FIELD,
        interval=KEYLESS_REFUSAL_INTERVAL_SECONDS,
        burst=REFUSED_CONNECTION_LINES,
    ),
    PeerCausedLine(
        "control_refusals",
        namespace=CONTROLPLANE_NAMESPACE,
        level=LogLevel.warn,
        field=REFUSED_CONNECTION_FIELD,
        interval=KEYLESS_REFUSAL_INTERVAL_SECONDS,
        burst=REFUSED_CONNECTION_LINES,
        per_value=True,
    ),
)


@implementer(ILogObserver)
class PeerLineLimiter:
    """
    Passes every event on to C{observer}, but each kind of line of
    C{kinds} (L{PEER_CAUSED_LINES}) at most C{burst} times (the kind's;
    once for most) per window of C{interval} seconds (the kind's, else the
    limiter's), by the events' own C{log_time}: a window opens with the
    first line after the last one ended.  Lines are shown at the level
    the kind is shown at; the first one let through after some were left
    out says how many (C{<name>_suppressed}) and over how long (from the
    opening of the window they were left out of, in whole seconds rounded
    up).
    """

    def __init__(
        self,
        observer: ILogObserver,
        interval: float = ACCEPT_ERROR_INTERVAL_SECONDS,
        kinds: tuple[PeerCausedLine, ...] = PEER_CAUSED_LINES,
    ) -> None:
        self._observer = observer
        self._interval = interval
        self._kinds = kinds
        #: Per kind: when its window opened, and how many lines it let through.
        self._window: dict[str, tuple[float, int]] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, event: LogEvent) -> None:
        for kind in self._kinds:
            if kind.matches(event):
                self._limited(kind, event)
                return
        self._observer(event)

    def _limited(self, kind: PeerCausedLine, event: LogEvent) -> None:
        now = event.get("log_time") or 0.0
        key = f"{kind.name}:{event.get(kind.field or '')}" if kind.per_value else kind.name
        window = self._window.get(key)
        if window is not None and 0 <= now - window[0] < (kind.interval or self._interval):
            opened, shown = window
            if shown >= kind.burst:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._window[key] = (opened, shown + 1)
        else:
            self._window[key] = (now, 1)
        suppressed = self._suppressed.pop(key, 0)
        log_format = event.get("log_format")
        if kind.shown_at is not None:
            event = {**event, "log_level": kind.shown_at, "peer": host_of(event.get("client"))}
            if kind.message is not None:
                log_format = event["log_format"] = kind.message
        if suppressed:
            # Left out since the last window opened: a window ends full.
            assert window is not None
            field = f"{kind.name}_suppressed"
            seconds = max(1, math.ceil(now - window[0]))
            event = {
                **event,
                "log_format": f"{log_format} ({{{field}}} similar lines suppressed in the last {seconds} s)",
                field: suppressed,
            }
        self._observer(event)


#: C0 and C1 control characters, DEL, and Unicode's line and paragraph
#: separators: all but the tab of Twisted's continuation lines.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
#: How Twisted's classic text format continues a message over lines.
_CONTINUATION = "\n\t"


def _escape_control(found: re.Match[str]) -> str:
    code = ord(found.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def text_line(event: LogEvent) -> str | None:
    """
    One event as twistd's classic text line
    (L{formatEventAsClassicLogText}: C{<time> [<namespace>#<level>]
    <message>}), with every control character escaped as C{\\xNN}
    (C{\\uNNNN} for U+2028 and U+2029) save the newline and tab Twisted
    puts between the lines of a multi-line message, so that the start of
    every line is Twisted's: nothing a client sends (a model name, a
    path, a header, a command) can forge a line or rewrite a terminal
    (ECMA-48 escape sequences start with ESC, C{\\x1b}).  L{None} for an
    event with no message, as in Twisted.
    """
    text = formatEventAsClassicLogText(event)
    if text is None or not _CONTROL.search(text, 0, len(text) - 1):
        return text
    lines = text[:-1].split(_CONTINUATION)
    return _CONTINUATION.join(_CONTROL.sub(_escape_control, line) for line in lines) + "\n"


def json_line(event: LogEvent) -> str | None:
    """
    One event as one line of JSON, for log shippers:

        C{{"time": "2026-11-25T02:39:29.250Z", "level": "info",
        "namespace": "openclaw.controlplane", "message": "...", ...}}

    C{time} is ISO 8601 UTC to the millisecond (L{None} if the event has
    none), C{level} a L{LogLevel} name, C{message} the text Twisted's
    L{formatEvent} makes of it (never raises: an unformattable event says
    so).  Then the event's own fields whose values are JSON types (C{cmd},
    C{peer}, C{jti}, C{outcome}, C{duration_ms}, ...), not Twisted's
    C{log_*} keys and not overriding the four above; a value JSON cannot
    hold inside a list or dict becomes C{null}.  With a failure, its
    traceback as C{traceback}.  An event with neither a message nor a
    failure makes no line (L{None}), as in the text format.  Every control
    character is escaped (C{\\u001b}; orjson escapes C0, this also DEL,
    C1 such as CSI C{\\u009b}, and U+2028/U+2029), so that a line shown on
    a terminal (C{tail -f}) cannot rewrite it.
    """
    message = formatEvent(event)
    failure = event.get("log_failure")
    if not message and failure is None:
        return None
    when = event.get("log_time")
    record: dict[str, Any] = {
        "time": None if when is None else isoformat(when, "milliseconds"),
        "level": getattr(event.get("log_level"), "name", None),
        "namespace": event.get("log_namespace"),
        "message": message,
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in record and isinstance(value, _JSON_TYPES):
            record[key] = value
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = "(the traceback could not be formatted)"
    try:
        encoded = orjson.dumps(record, default=_null)
    except TypeError:
        # A field JSON cannot hold even so (an integer beyond 64 bits):
        # the line keeps the message rather than being lost.
        encoded = orjson.dumps({key: record[key] for key in ("time", "level", "namespace", "message")})
    line = encoded.decode("utf-8")
    if _JSON_UNESCAPED.search(line) is not None:
        # Only inside strings (JSON's own syntax is ASCII): \uNNNN there.
        line = _JSON_UNESCAPED.sub(_json_escape, line)
    return line + "\n"


#: The control characters of L{_CONTROL} orjson leaves as they are (it
#: escapes C0, and JSON's syntax is ASCII).
_JSON_UNESCAPED = re.compile(_CONTROL.pattern.replace(r"\x00-\x08\x0a-\x1f", ""))


def _json_escape(found: re.Match[str]) -> str:
    return f"\\u{ord(found.group()):04x}"


def _null(value: Any) -> None:
    return None


__all__ = [
    "CONTROLPLANE_NAMESPACE",
    "DATAPLANE_NAMESPACE",
    "DESCRIPTORS_FIELD",
    "HTTP2_FLOOD_FIELD",
    "KEYLESS_FIELD",
    "KEYLESS_REFUSAL_INTERVAL_SECONDS",
    "KEYLESS_REFUSAL_LINES",
    "LOST_LINES_FORMAT",
    "PEER_CAUSED_LINES",
    "REFUSED_CONNECTION_FIELD",
    "PeerCausedLine",
    "PeerLineLimiter",
    "PeerTLSErrors",
    "ReopenedLogFile",
    "foreground",
    "json_line",
    "log_destination",
    "log_file_mode",
    "logs_to_stdout",
    "make_observer",
    "offer_log_observer",
    "report_fatal_signals",
    "text_line",
]
