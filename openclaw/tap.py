"""
C{twistd openclaw}: command-line options and the service they make.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import gc
import ipaddress
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar, NoReturn, TypeVar

import attrs
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.http import H2_ENABLED

from openclaw.addresses import host_port
from openclaw.cluster.scrape import (
    WorkerSockets,
    make_socket_directory,
    remove_empty_directory,
)
from openclaw.cluster.workers import (
    INSTALLED_AGAIN_STATUS,
    InstalledAgain,
    ReusePortEndpoint,
    SupervisorWatch,
    WorkerSupervisor,
    read_settings,
    reserve,
    worker_argv,
)
from openclaw.consumers.service import unusable_database_file
from openclaw.consumers.store import remove_new_database, sqlite_path
from openclaw.files import LockHeld, NotALockFile, PidLock, held_by_sticky_directory, named_uid
from openclaw.listeners import (
    LISTEN_BACKLOG,
    MAX_TLS_FILE_BYTES,
    CannotListen,
    Listener,
    NamedEndpoint,
    check_free,
    lock_port,
    tcp_address,
    tls_file_problem,
    unix_socket_address,
    unix_socket_problem,
)
from openclaw.logs import foreground, log_destination, logs_to_stdout, make_observer, report_fatal_signals
from openclaw.providers import BUILTIN_PROVIDERS
from openclaw.reactors import ITapReactor, tap_reactor
from openclaw.service import PRIVILEGE_SWITCH_FIX, GatewayService
from openclaw.session import UnsafeTokenFile, check_token_file, lock_token_file, token_file_lock_path
from openclaw.settings import ConfigError, Settings, load_settings
from openclaw.settings.directories import remove_made_directories
from openclaw.settings.errors import HostTrouble
from openclaw.signals import handles_hangup, note_repeated_stops, note_signals
from openclaw.spelling import meant
from openclaw.state import STATE_LOCK, lock_state_dir

_log = Logger(namespace="openclaw")


class Options(usage.Options):
    """
    Options of C{twistd openclaw}.  Each one overrides the environment
    variable named in its help, which overrides the env file.
    """

    optParameters: ClassVar[list[list[str | None]]] = [
        ["port", "p", None, "Control plane TCP port (WS_CONTROL_PORT) [default: 18789]"],
        ["api-port", None, None, "OpenAI-compatible API TCP port (API_PORT) [default: 18790]"],
        [
            "interface",
            "i",
            None,
            "Address to listen on (INTERFACE) [default: :: (IPv4 and IPv6), or 0.0.0.0 where the host has no IPv6]",
        ],
        ["token-file", None, None, "Also write the session token to this file, mode 0600 (TOKEN_FILE)"],
        ["env-file", None, None, "Read settings from this file [default: ./.env if it exists]"],
        [
            "listen",
            None,
            None,
            "Control plane listener as a Twisted endpoint, overriding --port/--interface "
            "(CONTROL_LISTEN), e.g. ssl:18789:privateKey=key.pem:certKey=cert.pem or "
            "unix:/run/openclaw/control.sock:mode=600",
        ],
        ["api-listen", None, None, "API listener as a Twisted endpoint, overriding --api-port (API_LISTEN)"],
        [
            "metrics-listen",
            None,
            None,
            "Serve /metrics on this endpoint (METRICS_LISTEN) [default: on the API listener]",
        ],
        ["log-format", None, None, "Log as text or json, one object per line (LOG_FORMAT) [default: text]"],
        [
            "state-dir",
            None,
            None,
            "Keep the active provider here (STATE_DIR) [default: $STATE_DIRECTORY when set (systemd), else "
            "the working directory with -n, else $XDG_STATE_HOME/openclaw, /var/lib/openclaw for root or "
            "~/.local/state/openclaw]",
        ],
        [
            "workers",
            None,
            None,
            "Gateway processes sharing the listening sockets (WORKERS) [default: 1]; above 1 needs REDIS_URL and -n",
        ],
        ["worker", None, None, "(set by --workers for each worker process; not for operators)"],
        ["supervisor", None, None, "(set by --workers: the pid of a worker's parent; not for operators)"],
        [
            "metrics-sockets",
            None,
            None,
            "(set by --workers: the directory of the workers' private metrics sockets; not for operators)",
        ],
    ]

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        As L{usage.Options.parseOptions}, but an option mistyped or missing
        its value is one line on standard error naming it (and the option
        it most likely meant) with exit status 2, as every other
        configuration error: twistd would print its whole usage and exit
        with status 1, which a unit manager restarts on
        (C{contrib/openclaw.service}'s C{RestartPreventExitStatus=2}).
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            _fail(f"{e}{_option_meant(str(e), self.optParameters)}; see twistd openclaw --help")

    def parseArgs(self, *args: str) -> None:
        """
        No arguments but options: one given is named (usage.Options'
        own error says only "Wrong number of arguments.").
        """
        if args:
            raise usage.UsageError(f"unexpected argument {args[0]!r}: twistd openclaw takes options only")

    def postOptions(self) -> None:
        """
        Refuse twistd's options the gateway cannot run with
        (L{_check_no_privilege_switch}, L{_check_twistd_paths}) as they are
        parsed: twistd reads C{--pidfile} before it builds the service, and
        a directory there was a traceback, a FIFO a launcher waiting for
        ever.
        """
        try:
            _check_no_privilege_switch(self.parent or {})
            _check_twistd_paths(self.parent or {})
        except ConfigError as e:
            _fail(str(e))

    def settings_overrides(self) -> dict[str, Any]:
        return {
            "WS_CONTROL_PORT": self["port"],
            "API_PORT": self["api-port"],
            "INTERFACE": self["interface"],
            "TOKEN_FILE": self["token-file"],
            "LOG_FORMAT": self["log-format"],
            "CONTROL_LISTEN": self["listen"],
            "API_LISTEN": self["api-listen"],
            "METRICS_LISTEN": self["metrics-listen"],
            "STATE_DIR": self["state-dir"],
            "WORKERS": self["workers"],
        }


def tcp_endpoint_description(port: int, settings: Settings) -> str:
    """
    A listener on C{port} of the configured interface, as a Twisted endpoint
    string, with the gateway's backlog (L{LISTEN_BACKLOG}).
    """
    return f"tcp:{port}:interface={quoteStringArgument(settings.interface)}:backlog={LISTEN_BACKLOG}"


def makeService(
    options: Options,
    reactor: ITapReactor | None = None,
    stdout: IO[str] | None = None,
    http2_available: bool = H2_ENABLED,
) -> GatewayService | WorkerSupervisor:
    """
    Read the configuration once and build the gateway service (a worker
    of C{--workers} reads none: it takes its parent's settings,
    L{read_settings}).  A bad value
    ends the process here, before anything starts, with one line that names
    it; every refusal here comes before the token file's lock, the
    consumers' database and the log file are made, or takes them back
    (L{_make_files}); a C{tcp:} endpoint's port is tried here, as
    C{--port}'s is; a C{STATE_DIR} made while the settings were read is
    removed again (L{Settings.made_directories}).  Not covered: a port
    taken between this check and listening (its line then comes from
    listening, the lock released).

    @param http2_available: whether twisted.web can speak HTTP/2 here
        (C{twisted.web.http.H2_ENABLED}: the C{h2} package is installed);
        when not, a TLS API listener's start-up says how to get it.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = tap_reactor(default_reactor)
    # Taken now, before twistd redirects sys.stdout into the log.
    stdout = stdout or sys.stdout
    # twistd's own options (a usage.Options, a dict); none outside twistd.
    twistd_options: Mapping[str, Any] = getattr(options, "parent", None) or {}
    settings: Settings | None = None
    # The locks of the TCP ports checked (L{_endpoint}), held by the gateway.
    port_locks: dict[int, socket.socket] = {}
    # The TCP ports checked, and at which addresses (L{_own_clash}).
    bound: dict[int | str, list[tuple[str, Listener]]] = {}
    try:
        # First: reading the settings makes STATE_DIR.
        _check_no_privilege_switch(twistd_options)
        _check_twistd_paths(twistd_options)
        if options["worker"] is not None:
            # Its parent's, read once at its start: a worker started again
            # runs as its siblings do, whatever was changed since.  The
            # state directories its parent made are not a worker's to
            # take back at a refusal.
            settings = attrs.evolve(read_settings(), made_directories=())
        else:
            settings = load_settings(
                options.settings_overrides(),
                env_file=options["env-file"],
                providers=BUILTIN_PROVIDERS,
                daemon=not foreground(twistd_options),
            )
            settings = with_root_warning(settings, os.geteuid())
        # Every check that needs nothing on disk comes first: a refusal
        # leaves no lock, database or log behind (L{_make_files}).
        _check_token_file(settings)
        _check_token_shown(settings, twistd_options, stdout)
        if options["worker"] is not None:
            worker = _worker_service(options, settings, reactor, stdout, twistd_options)
            return _exit_with_status(worker, twistd_options)
        if settings.workers > 1:
            return _exit_with_status(_supervisor(options, settings, reactor, stdout, twistd_options), twistd_options)
        if not foreground(twistd_options) and settings.token_file is None:
            raise ConfigError(
                "running as a daemon (without -n) needs --token-file PATH (or TOKEN_FILE): "
                "the session token is never written to the log"
            )
        control = _endpoint(
            reactor,
            ("CONTROL_LISTEN", "--listen"),
            ("WS_CONTROL_PORT", "--port"),
            settings.control_listen,
            settings.port,
            settings,
            port_locks,
            bound,
        )
        api = _endpoint(
            reactor,
            ("API_LISTEN", "--api-listen"),
            ("API_PORT", "--api-port"),
            settings.api_listen,
            settings.api_port,
            settings,
            port_locks,
            bound,
        )
        if speaks_tls(settings.api_listen) and settings.api_http2 and not http2_available:
            _log.info(
                "API_LISTEN is TLS but HTTP/2 is not offered on it (HTTP/1.1 only): "
                "install the http2 extra (pip install 'openclaw[http2]') to offer it",
            )
        metrics = (
            _endpoint(
                reactor,
                ("METRICS_LISTEN", "--metrics-listen"),
                None,
                settings.metrics_listen,
                0,
                settings,
                port_locks,
                bound,
            )
            if settings.metrics_listen
            else None
        )
        # Before twistd daemonizes: the refusal reaches the terminal, and
        # the daemon inherits the lock (PidLock).
        made = _make_files(settings, lambda: log_destination(twistd_options, stdout, reactor))
        destination = made.destination
        _note_signals(reactor, twistd_options, destination, stdout)
        _say_warnings(settings, twistd_options)
    except InstalledAgain as e:
        # A worker's: its parent stops the gateway on this status.
        _fail(str(e), INSTALLED_AGAIN_STATUS)
    except HostTrouble as e:
        _close(port_locks)
        _remove_state_directories(settings)
        sys.stderr.write(f"openclaw: {e}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None
    except ConfigError as e:
        _close(port_locks)
        _remove_state_directories(settings)
        _fail(str(e))
    except CannotListen as e:
        _close(port_locks)
        _remove_state_directories(settings)
        # Here, before twistd daemonizes: the line reaches the terminal.
        sys.stderr.write(e.line + "\n")
        sys.stderr.flush()
        raise SystemExit(1) from None
    except BaseException:
        # Anything else refusing the start (the process ends with it).
        _close(port_locks)
        raise
    reactor.callWhenRunning(_freeze_startup_objects)
    service = GatewayService(
        settings,
        reactor,
        control,
        stdout=stdout if _show_token(twistd_options, settings, stdout) else None,
        api_endpoint=api,
        metrics_endpoint=metrics,
        log_observer=None
        if destination is None
        else make_observer(destination, settings.log_format, settings.log_level),
        state_lock=made.state_lock,
        token_lock=made.token_lock,
        port_locks=tuple(port_locks.values()),
        made_database=made.database,
    )
    return _exit_with_status(service, twistd_options)


def _lock(locks: dict[int, socket.socket], listener: Listener, port: int) -> None:
    """
    Take C{port}'s lock (L{lock_port}) into C{locks}, unless this gateway
    holds it already (its listeners on one port at two addresses).

    @raise CannotListen: another gateway holds it.
    """
    if port not in locks:
        lock = lock_port(listener, port)
        if lock is not None:
            locks[port] = lock


def _close(locks: dict[int, socket.socket]) -> None:
    """
    Let ports' locks (L{lock_port}) go: the start was refused.
    """
    for lock in locks.values():
        lock.close()
    locks.clear()


#: A service C{twistd openclaw} ends with the exit status of (its
#: C{exit_status}): the gateway's, or C{--workers}' supervisor's.
_Service = TypeVar("_Service", GatewayService, WorkerSupervisor)


def _exit_with_status(service: _Service, twistd_options: Mapping[str, Any]) -> _Service:
    """
    Under twistd (not when a test calls L{makeService}), end the process
    with C{service}'s C{exit_status} (L{GatewayService.exit_status},
    L{WorkerSupervisor.exit_status}) once twistd is done
    (its pidfile removed): twistd ends every stop that no signal caused
    with status 0.
    """
    if twistd_options:

        def exit_status() -> None:
            if service.exit_status:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(service.exit_status)

        atexit.register(exit_status)
    return service


def _worker_service(
    options: Options, settings: Settings, reactor: ITapReactor, stdout: IO[str], twistd_options: Mapping[str, Any]
) -> GatewayService:
    """
    One worker of C{--workers}: the gateway on the ports its parent
    reserved (C{SO_REUSEPORT}), as worker C{--worker}.
    """
    try:
        index = int(options["worker"])
        supervisor = int(options["supervisor"])
    except (TypeError, ValueError):
        raise ConfigError("--worker is set by --workers, not by hand") from None
    worker_sockets = None
    if options["metrics-sockets"] is not None:
        # Checked by the worker's watch (PrivateSocketWatch), which listens
        # there only once it can be used: a worker started again is not
        # ended by its metrics directory's fault.
        worker_sockets = WorkerSockets(Path(options["metrics-sockets"]), settings.workers)
    # Its cluster's (REDIS_URL): no lock of the token file, the state
    # directory's shared with the other instances.
    made = _make_files(settings, lambda: log_destination(twistd_options, stdout, reactor))
    destination = made.destination
    _note_signals(reactor, twistd_options, destination, stdout)
    # Started with SIGUSR1 blocked (L{openclaw.cluster.workers}): handled
    # from here on, one that came meanwhile is delivered now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    reactor.callWhenRunning(_freeze_startup_objects)
    service = GatewayService(
        settings,
        reactor,
        ReusePortEndpoint(reactor, settings.interface, settings.port),
        stdout=stdout if _show_token(twistd_options, settings, stdout) else None,
        api_endpoint=ReusePortEndpoint(reactor, settings.interface, settings.api_port),
        log_observer=None
        if destination is None
        else make_observer(destination, settings.log_format, settings.log_level),
        worker=index,
        worker_sockets=worker_sockets,
        state_lock=made.state_lock,
    )
    # Stops the worker once its parent has gone (even by SIGKILL).
    watch = SupervisorWatch(reactor, supervisor)
    watch.setServiceParent(service)
    if worker_sockets is not None:
        # Its parent, which removes the sockets' directory at its stop, is
        # gone: the last of its workers to stop does (each has removed its
        # own socket by then).
        sockets = worker_sockets
        reactor.addSystemEventTrigger(
            "after", "shutdown", lambda: remove_empty_directory(sockets) if watch.gone else None
        )
    return service


def _supervisor(
    options: Options, settings: Settings, reactor: ITapReactor, stdout: IO[str], twistd_options: Mapping[str, Any]
) -> WorkerSupervisor:
    """
    C{--workers N} above 1: reserve the ports here and run N workers
    listening on them.
    """
    if not foreground(twistd_options):
        raise ConfigError("--workers above 1 runs in the foreground: add -n (as the systemd unit does)")
    rundir = twistd_options.get("rundir") or "."
    if os.path.abspath(rundir) != os.getcwd():
        # The workers start in it (their settings are the parent's, read
        # here), and would open twistd's relative paths (--logfile) there.
        raise ConfigError(
            f"--workers above 1 with twistd's -d/--rundir {rundir!r} is not supported: its workers would start "
            "in that directory and open twistd's relative paths (--logfile) there, not in this one; start twistd "
            "in the directory you mean instead (systemd: WorkingDirectory=)"
        )
    if settings.control_listen or settings.api_listen or settings.metrics_listen:
        raise ConfigError(
            "--workers above 1 shares TCP listeners only (--port, --api-port, --interface): "
            "unset CONTROL_LISTEN, API_LISTEN and METRICS_LISTEN (--listen, --api-listen, --metrics-listen)"
        )
    sockets = {
        "control": reserve(
            _listener(settings, host_port(settings.interface, settings.port), "WS_CONTROL_PORT", "--port"),
            settings.interface,
            settings.port,
        ),
        "api": reserve(
            _listener(settings, host_port(settings.interface, settings.api_port), "API_PORT", "--api-port"),
            settings.interface,
            settings.api_port,
        ),
    }

    def reopen_workers_logs() -> None:
        # The workers log to the same file, each through its own handle.
        supervisor.reopen_logs()

    destination = _make_files(
        settings, lambda: log_destination(twistd_options, stdout, reactor, reopen_workers_logs)
    ).destination
    _note_signals(reactor, twistd_options, destination, stdout)
    _say_warnings(settings, twistd_options)
    supervisor = WorkerSupervisor(
        reactor,
        settings.workers,
        sockets,
        worker_argv(twistd_options),
        settings,
        stop_timeout=settings.shutdown_grace_seconds + 10,
        log_observer=None
        if destination is None
        else make_observer(destination, settings.log_format, settings.log_level),
        # Last: nothing refuses the start after it is made.
        worker_sockets=make_socket_directory(settings.workers),
    )
    return supervisor


#: The warning of a gateway started as root (none).
RUNS_AS_ROOT = (
    "the gateway runs as root: anything that takes it over (a flaw in it or in a library it uses) takes the host; "
    "run it as a user of its own (systemd's User=, as contrib/openclaw.service does, or runuser -u openclaw -- "
    "twistd ...; README: Running as a daemon)"
)


def with_root_warning(settings: Settings, euid: int) -> Settings:
    """
    C{settings}, with L{RUNS_AS_ROOT} among its warnings when C{euid} (the
    process's effective user id) is root's: said on the terminal and in
    the log as the others are (L{_say_warnings}).
    """
    if euid != 0:
        return settings
    return attrs.evolve(settings, warnings=(*settings.warnings, RUNS_AS_ROOT))


def _say_warnings(settings: Settings, twistd_options: Mapping[str, Any]) -> None:
    """
    Write each of C{settings.warnings} (a lower-case or misspelt name, a
    name an env file sets twice, a world-readable env file holding
    secrets...) on stderr, as C{openclaw: warning: ...} lines, once the
    start is accepted and before twistd daemonizes, when the log does not
    go to standard output (L{logs_to_stdout}): a daemon, or C{-n} with
    C{--logfile} or C{--syslog}.  The gateway logs them too when it
    starts (L{GatewayService.startService}); without this, a daemon's
    were in its log only, and its terminal showed nothing.
    In the foreground with the log on standard output they reach it
    through the log: not said twice.
    """
    if logs_to_stdout(twistd_options):
        return
    for line in settings.warnings:
        sys.stderr.write(f"openclaw: warning: {line}\n")
    sys.stderr.flush()


def _note_signals(
    reactor: ITapReactor, twistd_options: Mapping[str, Any], destination: IO[Any] | None, stdout: IO[str]
) -> None:
    """
    Under twistd (not when a test calls L{makeService}), log and ignore
    SIGUSR1 when no log file is reopened on it, and SIGHUP unless the
    gateway runs in the foreground on a terminal (L{handles_hangup}); note
    a SIGTERM or SIGINT that comes while the gateway stops
    (L{note_repeated_stops}); and have a fatal signal (SIGSEGV, SIGBUS)
    leave its traceback in the log file, or on standard error in the
    foreground (L{report_fatal_signals}).
    """
    if not twistd_options:
        return
    report_fatal_signals(destination, twistd_options)
    logging_to = "syslog" if destination is None else "stdout" if destination is stdout else "a file"
    hangup = handles_hangup(not foreground(twistd_options), sys.stdin)
    note_signals(reactor, logging_to, hangup)
    note_repeated_stops(reactor, reactor)


def _check_no_privilege_switch(twistd_options: Mapping[str, Any]) -> None:
    """
    Refuse twistd's C{--uid}/C{--gid} (L{PRIVILEGE_SWITCH_FIX}): twistd
    switches to them only once the service is built and listening, after
    the gateway has checked and made its files (the token file's lock,
    the consumers' database, the log, twistd's pidfile) as the user it
    started as, which the other user then cannot use (a
    root-owned database, C{/readyz} 503 for ever).  Here, before
    anything is made: one line on the terminal, exit status 2.  (The
    service refuses a switch it finds at start too:
    L{GatewayService.startService}.)

    @raise ConfigError: either is given.
    """
    if twistd_options.get("uid") is not None or twistd_options.get("gid") is not None:
        raise ConfigError(PRIVILEGE_SWITCH_FIX)


def _check_twistd_paths(twistd_options: Mapping[str, Any]) -> None:
    """
    Refuse twistd's C{-d DIR} (C{--rundir}) that is not a directory to
    enter, and a C{--pidfile} that is there but is not a regular file (a
    dangling link, which twistd would unlink at stop; a directory, which
    twistd's C{checkPID} reads with a traceback; a FIFO, on which it waits
    for ever), whose name is too long, or in a directory that is not
    there or cannot be written.  Run as twistd parses the options
    (L{Options.postOptions}), before it reads the pidfile, and again when
    the service is built: one line, exit status 2, nothing made.

    @raise ConfigError: either cannot be used.
    """
    rundir = twistd_options.get("rundir")
    if rundir and not (os.path.isdir(rundir) and os.access(rundir, os.X_OK)):
        raise ConfigError(
            f"twistd's -d/--rundir {rundir!r} is not a directory this user can enter; create it, or name one that is"
        )
    pidfile = twistd_options.get("pidfile")
    if pidfile:
        elsewhere = "name a pidfile elsewhere (--pidfile= for none)"
        if os.path.lexists(pidfile) and (os.path.islink(pidfile) or not os.path.isfile(pidfile)):
            # A dangling link: twistd would write through it (failing, or
            # somewhere unmeant) and unlink it at stop.
            raise ConfigError(
                f"twistd's --pidfile {pidfile!r} is there and is not a regular file (a link, a directory, a "
                f"FIFO); {elsewhere}"
            )
        if len(os.path.basename(pidfile).encode()) > 255:
            raise ConfigError(f"twistd's --pidfile {pidfile!r} has a name over 255 bytes (NAME_MAX); {elsewhere}")
        directory = os.path.dirname(os.path.abspath(pidfile))
        if not (os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK)):
            raise ConfigError(
                f"twistd's --pidfile {pidfile!r} is in a directory that is not there or this user cannot write; "
                f"create it, or {elsewhere}"
            )


def _check_token_file(settings: Settings) -> None:
    """
    Refuse, before anything listens, a C{TOKEN_FILE} that names something
    the gateway would overwrite (and remove at stop) but did not write.

    @raise ConfigError: it does.
    """
    if settings.token_file is None:
        return
    named = settings.named("TOKEN_FILE", "--token-file", str(settings.token_file))
    _check_sticky_held(settings, named)
    try:
        check_token_file(settings.token_file)
    except UnsafeTokenFile as e:
        raise ConfigError(
            f"{named} is refused: {e.reason}, and the gateway never replaces or removes what it did not write; "
            "point TOKEN_FILE at a new path in a directory of the gateway's own (such as /run/openclaw/token)"
        ) from None


def _check_sticky_held(settings: Settings, named: str) -> None:
    """
    Refuse a C{TOKEN_FILE} (or, standalone, its lock file) that another
    user put in a sticky directory first (an empty
    C{/tmp}-like token file of C{nobody}'s): the gateway could neither
    replace it with its token nor remove it at stop
    (L{held_by_sticky_directory}), and failed with a traceback once
    listening.

    @raise ConfigError: one is, naming its owner and what to do.
    """
    assert settings.token_file is not None
    paths = [("it", settings.token_file)]
    if settings.redis_url is None:
        lock = token_file_lock_path(settings.token_file)
        paths.append((f"its lock file {str(lock)!r}", lock))
    euid = os.geteuid()
    for what, path in paths:
        held = held_by_sticky_directory(path, euid)
        if held is not None:
            raise ConfigError(
                f"{named} is refused: {what} belongs to {named_uid(held.owner)}, not the gateway's user, "
                f"{named_uid(euid)}, "
                f"in the sticky directory {str(held.directory)!r} (mode {held.mode:04o}), where only its owner, "
                f"the directory's or root may replace or remove it; have that user or root remove {str(path)!r} "
                f"(or chown {euid} it), or point TOKEN_FILE at a new path in a directory of the gateway's own "
                "(such as /run/openclaw/token)"
            )


@attrs.frozen
class MadeFiles:
    """
    What L{_make_files} made and holds.
    """

    #: The lock of C{STATE_DIR} (shared by a cluster's instances).
    state_lock: PidLock
    #: The lock of the token file (L{None}: no token file, or a cluster's).
    token_lock: PidLock | None
    #: The stream to log to (L{None}: syslog).
    destination: IO[Any] | None
    #: The consumers' SQLite database made here, empty (L{None}: none made).
    database: Path | None = None


def _make_files(settings: Settings, open_log: Callable[[], IO[Any] | None]) -> MadeFiles:
    """
    Make what the gateway keeps on disk from start-up, once every check
    that needs nothing there has passed, in this order: the token file's
    lock (L{_lock_token_file}), the lock of C{STATE_DIR}
    (L{_lock_state_dir}), the consumers' SQLite database
    (L{_check_database_file}), then the log (C{open_log}, which creates
    the log file).  Each of them may still refuse to start; one that does
    takes back what was made before it (the lock files, a database made
    empty here), so that a refusal leaves none of them on disk (README
    audit s18 F3: a refusal left an empty C{openclaw.db}).

    @param open_log: L{log_destination}, given twistd's options.
    @raise ConfigError: one of them refused (any other exception takes
        back what was made too).
    """
    with contextlib.ExitStack() as undo:
        token_lock = _lock_token_file(settings)
        if token_lock is not None:
            undo.callback(_release_quietly, token_lock)
        state_lock = _lock_state_dir(settings)
        undo.callback(_release_quietly, state_lock)
        made = _check_database_file(settings)
        if made is not None:
            undo.callback(remove_new_database, made)
        destination = open_log()
        # Made: kept.
        undo.pop_all()
    return MadeFiles(state_lock, token_lock, destination, made)


def _listener(settings: Settings, where: str, setting: str, option: str) -> Listener:
    """
    A listener's description for its refusals, naming where the value of
    C{setting} came from (L{Settings.sources}; else its default).
    """
    return Listener(where, setting, option, settings.sources.get(setting, "the default"))


def _remove_state_directories(settings: Settings | None) -> None:
    """
    Take back the state directories made while reading C{settings}, for a
    start refused after they were read (L{remove_made_directories}).
    """
    if settings is not None:
        remove_made_directories(settings.made_directories)


def _release_quietly(lock: PidLock) -> None:
    """
    Release C{lock} taken at a start-up that is refused after all; its
    lock file stays if it cannot be removed: the refusal is the line to
    show.
    """
    with contextlib.suppress(OSError):
        lock.release()


def _check_database_file(settings: Settings) -> Path | None:
    """
    Refuse, before anything listens, a consumers' database in C{STATE_DIR}
    (SQLite, C{DATABASE_URL} unset) that cannot be created or written: a
    directory in the way, permission denied (L{sqlite_file}).  One made
    here, empty, is removed again when it is refused.

    @return: the database's path when it was made here, else L{None}.
    @raise ConfigError: it cannot.
    """
    if settings.database_url:
        return None
    database = sqlite_path(settings.state_dir)
    made = not os.path.lexists(database)
    refusal = unusable_database_file(settings)
    if refusal is not None:
        if made:
            remove_new_database(database)
        raise ConfigError(refusal)
    return database if made else None


#: The errors of a lock file that are the host's, not the configuration's:
#: its file system full or over quota, an I/O error (L{HostTrouble}).
HOST_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})


def _holder(held: LockHeld, who: str = "another running gateway") -> str:
    """
    Who holds a lock, for a refusal: C{who}, and its pid when known.
    """
    return who if held.pid is None else f"{who} (pid {held.pid})"


def _unusable(error: OSError, lock_path: Path) -> str:
    """
    Why the lock file at C{lock_path} cannot be used, for a refusal.
    """
    if isinstance(error, NotALockFile):
        return str(error)
    done = "written" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "opened"
    return f"{str(lock_path)!r} cannot be {done} ({error.strerror})"


def _lock_state_dir(settings: Settings) -> PidLock:
    """
    Hold C{STATE_DIR} for this gateway (L{lock_state_dir}): alone for a
    standalone gateway, with the other instances for a cluster's
    (C{REDIS_URL}: they may share it, not with a standalone gateway).

    @raise ConfigError: another running gateway holds it, or its lock
        file cannot be used.
    """
    cluster = settings.redis_url is not None
    named = settings.named("STATE_DIR", "--state-dir", str(settings.state_dir))
    try:
        return lock_state_dir(settings.state_dir, shared=cluster)
    except LockHeld as e:
        if cluster:
            raise ConfigError(
                f"{named} is in use by {_holder(e, 'a standalone gateway')} (no REDIS_URL), which holds its lock {str(e.path)!r}: give the "
                "cluster its own STATE_DIR, or stop that gateway first"
            ) from None
        raise ConfigError(
            f"{named} is in use by {_holder(e)}, which holds its lock {str(e.path)!r}: give each gateway its own "
            "STATE_DIR (or make them one cluster with REDIS_URL), or stop the other gateway first"
        ) from None
    except OSError as e:
        lock_path = settings.state_dir / STATE_LOCK
        why = _unusable(e, lock_path)
        refusal = HostTrouble if e.errno in HOST_ERRNOS else ConfigError
        raise refusal(
            f"{named} cannot be locked: {why}; {_lock_fix(e, lock_path)}point "
            "STATE_DIR at a directory of the gateway's own"
        ) from None


def _lock_token_file(settings: Settings) -> PidLock | None:
    """
    Hold C{TOKEN_FILE} for this gateway (L{lock_token_file}), unless
    there is none or it is a cluster's (C{REDIS_URL}: its instances share
    it).

    @raise ConfigError: another running gateway holds it, or its lock
        file cannot be used.
    """
    if settings.token_file is None or settings.redis_url is not None:
        return None
    named = settings.named("TOKEN_FILE", "--token-file", str(settings.token_file))
    try:
        return lock_token_file(settings.token_file)
    except LockHeld as e:
        raise ConfigError(
            f"{named} is in use by {_holder(e)}, which holds its lock {str(e.path)!r}: give each gateway its own "
            "TOKEN_FILE, or stop the other gateway first"
        ) from None
    except OSError as e:
        lock_path = token_file_lock_path(settings.token_file)
        why = _unusable(e, lock_path)
        refusal = HostTrouble if e.errno in HOST_ERRNOS else ConfigError
        raise refusal(
            f"{named} cannot be locked: {why}; {_lock_fix(e, lock_path)}point "
            "TOKEN_FILE at a new path in a directory of the gateway's own (such as /run/openclaw/token)"
        ) from None


def _lock_fix(error: OSError, lock_path: Path) -> str:
    """
    The first of a lock refusal's ways out: freeing space when its file
    system is full (C{ENOSPC}, C{EDQUOT}); else removing the lock file,
    when there is one to remove (not for a directory that cannot hold
    one).
    """
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free space on the file system of {str(lock_path)!r}, or "
    if error.errno == errno.EIO:
        return f"check the disk of {str(lock_path)!r} (dmesg), or "
    if os.path.lexists(lock_path):
        return f"remove {str(lock_path)!r} if no gateway uses it, or "
    return ""


def _check_token_shown(settings: Settings, twistd_options: Mapping[str, Any], stdout: IO[str]) -> None:
    """
    Refuse JSON logs on a standard output that is not a terminal without a
    token file: the log goes to a log shipper there, and the banner would
    be the only place the session token is, printed into that stream (not
    JSON, and a secret no log may hold).  With a token file the banner is
    logged without the token (L{_show_token}); on a terminal it is shown.

    @raise ConfigError: it would be.
    """
    if settings.token_file is not None or settings.log_format != "json" or not logs_to_stdout(twistd_options):
        return
    if stdout.isatty():
        return
    raise ConfigError(
        "LOG_FORMAT=json on a standard output that is not a terminal (a log shipper's stream) needs "
        "--token-file PATH (or TOKEN_FILE) to hand the session token over: it is never written to the log"
    )


def _freeze_startup_objects() -> None:
    """
    Move everything built at start-up (modules, services, settings: some
    hundreds of thousands of objects) out of the garbage collector's sight.
    They live as long as the process, yet every full collection would walk
    them all again, on the reactor's one thread.  C{gc.freeze} moves them
    to the permanent generation, which collections ignore (CPython's
    documentation describes it for a process about to C{fork()}; the
    effect used here is the same one).
    """
    gc.collect()
    gc.freeze()


def _show_token(twistd_options: Mapping[str, Any], settings: Settings, stdout: IO[str]) -> bool:
    """
    Whether the banner on stdout may carry the token.  A daemon has no
    stdout; and with a token file, a stdout that is not a terminal is most
    likely a log (systemd's journal), which must never hold the token.
    """
    if not foreground(twistd_options):
        return False
    return settings.token_file is None or stdout.isatty()


def _endpoint(
    reactor: ITapReactor,
    endpoint_setting: tuple[str, str],
    port_setting: tuple[str, str] | None,
    description: str | None,
    port: int,
    settings: Settings,
    port_locks: dict[int, socket.socket],
    bound: dict[int | str, list[tuple[str, Listener]]],
) -> IStreamServerEndpoint:
    """
    The endpoint an operator described (C{endpoint_setting}: the setting
    and option that take an endpoint string), else TCP on C{port} of the
    configured interface (C{port_setting}), which must be free now; a TCP
    port's lock (L{lock_port}) is added to C{port_locks}, for the gateway
    to hold, and its address to C{bound} (L{_own_clash}).

    @raise ConfigError: the endpoint string is not usable, or another of
        the gateway's listeners takes the same port and address.
    @raise CannotListen: the port is taken (or not ours to take).
    """
    if description is None:
        assert port_setting is not None
        listener = _listener(settings, host_port(settings.interface, port), *port_setting)
        _own_clash(bound, listener, settings.interface, port)
        check_free(listener, settings.interface, port)
        _lock(port_locks, listener, port)
        description = tcp_endpoint_description(port, settings)
    else:
        listener = _listener(settings, description, *endpoint_setting)
        path = unix_socket_address(description)
        if path is not None:
            _own_clash(bound, listener, "", os.path.abspath(path))
        address = tcp_address(description)
        if address is not None:
            _own_clash(bound, listener, *address)
            # Port 0 too: an address this host does not have is refused
            # here, before twistd daemonizes, like a taken port.
            check_free(listener, *address)
            if address[1]:
                _lock(port_locks, listener, address[1])
        unusable = unix_socket_problem(description)
        if unusable is not None:
            raise ConfigError(f"{settings.named(*endpoint_setting, description)} cannot be used: {unusable}")
        problem = tls_file_problem(description)
        if problem is not None:
            parameter, reason = problem
            raise ConfigError(
                f"{settings.named(*endpoint_setting, description)} cannot be used: {reason}; point "
                f"{parameter} at a regular PEM file of at most {MAX_TLS_FILE_BYTES // 1024 // 1024} MiB"
            )
    try:
        endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
    except Exception as e:
        raise ConfigError(
            f"{settings.named(*endpoint_setting, description)} is not a usable Twisted endpoint: {e}"
        ) from None
    return NamedEndpoint(endpoint, listener)


def _own_clash(
    bound: dict[int | str, list[tuple[str, Listener]]], listener: Listener, interface: str, port: int | str
) -> None:
    """
    Refuse a listener on the TCP port and address, or the UNIX socket
    path (C{port}, absolute; C{interface} empty), of another of this
    gateway's (each is free when checked alone, so the daemon found it,
    as another gateway's: re-attack s31); note it in C{bound} otherwise.
    Addresses meet when equal, when either is C{::} (dual-stack: every
    IPv4 address too), or when either is its family's every-address one.

    @raise ConfigError: they meet.
    """
    if not port:
        return
    what = f"port {port}" if isinstance(port, int) else port
    for other_interface, other in bound.get(port, []):
        if isinstance(port, str) or _addresses_meet(interface, other_interface):
            raise ConfigError(
                f"{listener.where} ({listener.named}) and {other.where} ({other.named}) both listen on {what}: "
                f"give each its own {'port' if isinstance(port, int) else 'path'} ({other.option} or "
                f"{listener.option})"
            )
    bound.setdefault(port, []).append((interface, listener))


def _addresses_meet(first: str, second: str) -> bool:
    try:
        # A zone is kept: fe80::1%eth0 and fe80::1%eth1 are two addresses.
        a, b = (_unmapped(ipaddress.ip_address(address)) for address in (first, second))
    except ValueError:
        # A host name (an endpoint string's): judged by name.
        return first == second
    if a == b or ipaddress.ip_address("::") in (a, b):
        return True
    return a.version == b.version and (a.is_unspecified or b.is_unspecified)


def _unmapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # ::ffff:127.0.0.1 is 127.0.0.1 to a dual-stack socket.
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped or address


def speaks_tls(description: str | None) -> bool:
    """
    Whether a server endpoint string (C{--api-listen}) is Twisted's TLS
    endpoint (C{ssl:...}), on which HTTP/2 can be negotiated (ALPN).
    """
    return description is not None and description.partition(":")[0].strip().lower() == "ssl"


#: getopt's words for an option it does not know ("option --prot not
#: recognized").
_UNKNOWN_OPTION = re.compile(r"option (--[\w-]+) not recognized")


def _option_meant(error: str, parameters: Sequence[Sequence[str | None]]) -> str:
    """
    " (did you mean --port?)" for a getopt C{error} about an unknown long
    option close to one of C{parameters}' (L{meant}), else "".
    """
    unknown = _UNKNOWN_OPTION.search(error)
    if unknown is None:
        return ""
    names = [f"--{parameter[0]}" for parameter in parameters if parameter[0]]
    guess = meant(unknown.group(1), names)
    return f" (did you mean {guess}?)" if guess else ""


def _fail(message: str, status: int = 2) -> NoReturn:
    sys.stderr.write(f"openclaw: configuration error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(status)
