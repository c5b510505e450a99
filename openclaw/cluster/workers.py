"""
C{--workers N}: one C{twistd openclaw} process runs N gateway processes
(workers), each listening on the same TCP ports with C{SO_REUSEPORT} (a
socket it binds and hands to L{IReactorSocket.adoptStreamPort}: the
pattern of Autobahn's C{examples/twisted/websocket/echo_multicore}).  The kernel spreads new
connections over the workers' sockets by a hash of each connection's
addresses (Linux, socket(7)); one socket shared by all would hand most
connections to whichever process is awake first.  The workers share the
route, token, lockouts and key rests through Redis, as separate instances
do.

The parent (L{WorkerSupervisor}) reserves each port (bound with
C{SO_REUSEPORT}, never listening: it takes no connection), starts the
workers with C{reactor.spawnProcess}, starts again a worker that ends while
the gateway runs, and on stop sends each one SIGTERM (each drains as a
single gateway does) and waits for them all.

Each worker opens the parent's C{--logfile} itself (L{worker_argv}), so
each must reopen it after logrotate moved it: the parent passes its
SIGUSR1 (logrotate's C{postrotate} signals the pidfile's process only)
on to every worker (L{WorkerSupervisor.reopen_logs}), as gunicorn's
master and nginx's do.  A worker starts with SIGUSR1 blocked (the mask
is inherited across fork and exec) and unblocks it once its handler is
installed (L{openclaw.tap}): one that comes while it is still starting
is delivered then, not left to its default action, which would end it.

A worker is given its parent's pid (C{--supervisor PID}) and stops, as on
SIGTERM (drained), once its parent is no longer that process
(L{SupervisorWatch}): a parent killed with SIGKILL left its workers
serving, and a new parent on the same ports started more beside them.

A worker runs with its parent's L{Settings}, read once at the parent's
start, not its own reading of the configuration: the parent writes them
(L{settings_bytes}) into a pipe, the worker's descriptor L{SETTINGS_FD},
and the worker reads them from it (L{read_settings}) before it builds its
gateway.  A worker started again after a crash thus runs as its siblings
do, whatever the operator has changed since in C{.env}, C{JWT_SECRET_FILE}
or C{PRICES_FILE} (a changed secret made it refuse the cluster's token and
end again and again).  Never on its command line or in its environment:
they hold secrets, which C{ps} and C{/proc/PID/environ} would show.
"""

from __future__ import annotations

import copyreg
import errno
import hashlib
import io
import os
import pickle
import signal
import socket
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import attrs
from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, execute, succeed
from twisted.internet.error import CannotListenError, ProcessTerminated
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProcessTransport,
    IProtocolFactory,
    IReactorSocket,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from openclaw import __version__
from openclaw.addresses import address_family, bind_address
from openclaw.cluster.scrape import WorkerSockets, ensure_socket_directory, remove_socket_directory
from openclaw.listeners import LISTEN_BACKLOG, CannotListen, Listener, PortTaken, lock_port
from openclaw.logs import offer_log_observer
from openclaw.loops import LoggedStep
from openclaw.reactors import IStoreReactor, ISupervisorReactor
from openclaw.settings import ConfigError, Settings

#: A worker that ran this long before it ended is started again after
#: L{RESTART_DELAY_SECONDS}; one that ended sooner waits twice as long as
#: the last time, up to L{MAX_RESTART_DELAY_SECONDS} (a crash loop must not
#: fork as fast as it can).
STABLE_SECONDS = 10.0
RESTART_DELAY_SECONDS = 0.5
MAX_RESTART_DELAY_SECONDS = 30.0
#: How often a worker checks that its parent is still there (seconds).
SUPERVISOR_CHECK_SECONDS = 1.0
#: The wait before a worker's restart after C{n} quick ends in a row
#: beyond the first (L{WorkerSupervisor._restart}).
_restart_delay = backoffPolicy(RESTART_DELAY_SECONDS, MAX_RESTART_DELAY_SECONDS, factor=2.0, jitter=lambda: 0.0)
#: The exit status of a worker that refused its parent's settings as
#: those of another installation of openclaw (L{InstalledAgain}): its
#: parent then stops the whole gateway, with exit status 1, for its unit
#: manager to start it again on the installation now in place.
INSTALLED_AGAIN_STATUS = 3
#: The exit status of a worker that could not listen because another
#: program listens on a port of the gateway (L{PortTaken}): once every
#: worker's last end was this, none can serve, and the parent stops the
#: gateway with exit status 1 (L{WorkerSupervisor._port_taken}).
PORT_TAKEN_STATUS = 4
#: The descriptor a worker reads its parent's settings from: the reading
#: end of a pipe its parent writes them into (L{settings_bytes}), then
#: closes.
SETTINGS_FD = 3


class InstalledAgain(ConfigError):
    """
    A worker's settings were written by another installation of openclaw
    (L{settings_header}): openclaw was installed again (upgraded in place)
    since its twistd process started.  The worker ends with
    L{INSTALLED_AGAIN_STATUS}.
    """


def settings_bytes(settings: Settings) -> bytes:
    """
    C{settings} as bytes a worker reads back (L{read_settings}): a pickle
    (the highest protocol).  Its read-only mappings (C{MappingProxyType},
    which pickle refuses) are pickled as a copy made read-only again
    (L{mapping_proxy}), by this pickler's own C{dispatch_table} (no global
    C{copyreg} registration); everything else as pickle does (provider
    adapters and other classes by their import path, which the worker, of
    the same installation, imports).

    The pickle follows a line naming what wrote it (L{settings_header}),
    so that a worker of another installation (openclaw upgraded in place
    while the twistd process runs) refuses them rather than run with
    settings of another shape.

    @return: bytes holding the secrets C{settings} hold (C{JWT_SECRET},
        keys, passwords): written to a worker's pipe only.
    """
    buffer = io.BytesIO()
    buffer.write(settings_header())
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = {**copyreg.dispatch_table, MappingProxyType: _reduce_mapping_proxy}
    pickler.dump(settings)
    return buffer.getvalue()


def _reduce_mapping_proxy(
    mapping: MappingProxyType[Any, Any],
) -> tuple[Callable[[dict[Any, Any]], MappingProxyType[Any, Any]], tuple[dict[Any, Any]]]:
    # The type itself cannot be pickled by name (builtins.mappingproxy is
    # no attribute of builtins): it is made by a function that can.
    return mapping_proxy, (dict(mapping),)


def mapping_proxy(items: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    """
    A read-only view of C{items}: what a C{MappingProxyType} pickled by
    L{settings_bytes} is unpickled as.
    """
    return MappingProxyType(items)


def settings_header() -> bytes:
    """
    The line L{settings_bytes} begins with: C{openclaw-settings}, this
    installation's version of openclaw and a fingerprint of L{Settings}'
    fields (their names), ended by a newline.
    """
    names = ",".join(field.name for field in attrs.fields(Settings))
    fingerprint = hashlib.sha256(names.encode()).hexdigest()[:16]
    return f"{_SETTINGS_MARK} {__version__} {fingerprint}\n".encode()


#: The first word of L{settings_header}.
_SETTINGS_MARK = "openclaw-settings"


def read_settings(fd: int = SETTINGS_FD) -> Settings:
    """
    In a worker: its parent's settings, read from descriptor C{fd} to its
    end (the parent writes them, L{settings_bytes}, and closes its end),
    which is closed then.  Unpickled, which runs what the bytes say: safe
    only because they come from a pipe the worker inherited from its own
    parent (the twistd process that started it, of the same user), which
    only that parent wrote; never read settings from anywhere else this
    way.

    @raise ConfigError: C{fd} is not a pipe or cannot be read (not a
        worker started by C{--workers}: C{--worker} given by hand), does
        not hold settings (the parent ended while writing them), or holds
        those of another installation (L{settings_header}: openclaw
        upgraded since the twistd process started).
    """
    by_hand = "--worker is set by --workers, not by hand"
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            raise ConfigError(
                f"a worker reads its settings from its parent on descriptor {fd}, which is not a pipe; {by_hand}"
            )
        with open(fd, "rb") as pipe:
            data = pipe.read()
    except OSError as e:
        raise ConfigError(
            f"a worker reads its settings from its parent on descriptor {fd}, which cannot be read "
            f"({e.strerror}); {by_hand}"
        ) from None
    header, _, data = data.partition(b"\n")
    words = header.decode("ascii", "replace").split(" ")
    expected = settings_header().decode().rstrip("\n").split(" ")
    if words[0] == _SETTINGS_MARK and len(words) == len(expected) and words != expected:
        raise InstalledAgain(
            f"a worker's settings come from openclaw {words[1]} (settings {words[2]}), and this worker is "
            f"openclaw {expected[1]} (settings {expected[2]}): openclaw was installed again since the twistd "
            "process started; restart it (systemctl restart openclaw): it is stopping"
        )
    try:
        settings = pickle.loads(data) if words == expected else None
    except Exception:
        # Cut short (EOFError, UnpicklingError), or not this version's.
        settings = None
    if not isinstance(settings, Settings):
        raise ConfigError(
            f"a worker's settings from its parent (descriptor {fd}, {len(data)} bytes) are not settings: "
            f"its parent ended while writing them, or {by_hand}"
        )
    return settings


@attrs.frozen
class Reservation:
    """
    A port held for C{--workers}'s workers (L{reserve}) while the gateway
    runs: closed once they have all stopped.

    @ivar sock: the TCP socket bound to the port with C{SO_REUSEADDR} and
        C{SO_REUSEPORT}, never listening.
    @ivar lock: the port's lock (L{lock_port}); L{None} where there is
        none.
    """

    sock: socket.socket
    lock: socket.socket | None

    def close(self) -> None:
        """
        Let the port go: the socket and the lock closed.
        """
        self.sock.close()
        if self.lock is not None:
            self.lock.close()


def reserve(listener: Listener, interface: str, port: int) -> Reservation:
    """
    Hold C{interface}:C{port} for the workers: a TCP socket bound with
    C{SO_REUSEADDR} and C{SO_REUSEPORT} that never listens (so the kernel
    hands it no connection), kept open while the gateway runs.

    Only if no socket listens there yet: a socket of the gateway's user
    bound with C{SO_REUSEPORT} may join the sockets of another process of
    that user listening on the port (Linux, socket(7)), so a second
    C{--workers} gateway on the same port (another pidfile, another
    directory) would start, and the kernel would spread the connections
    over both gateways (maybe of other versions, tokens and settings).  So
    a plain socket (C{SO_REUSEADDR}, which the C{TIME_WAIT} of connections
    of an earlier run does not stand in the way of; no C{SO_REUSEPORT}) is
    bound first and closed again: it cannot be while any socket listens
    there (another gateway's workers, a single-process gateway, another
    program).  A worker started again binds its own socket
    (L{ReusePortEndpoint}): this reservation, not listening, is no
    obstacle to it.

    A gateway none of whose listeners is up yet (a C{--workers} one's
    workers starting, or all started again) is seen by the port's lock,
    which this reservation holds (L{lock_port}).

    @raise CannotListen: a socket listens there already, or another
        gateway holds the port's lock (the line says to stop that gateway
        or choose another port), or it cannot be bound.
    """
    family = address_family(interface)
    address = bind_address(interface, port)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise CannotListen(
                f"openclaw: cannot listen on {listener.where} ({listener.named}): another gateway (or another "
                f"program) is already listening on {listener.where}; stop it, or choose another port with "
                f"{listener.option}"
            ) from None
        raise CannotListen(listener.failure_line(e)) from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise CannotListen(
            f"openclaw: cannot listen on {listener.where} ({listener.setting}, {listener.option}): {e.strerror}"
        ) from None
    try:
        lock = lock_port(listener, port)
    except CannotListen:
        sock.close()
        raise
    return Reservation(sock, lock)


@implementer(IStreamServerEndpoint)
@attrs.define
class ReusePortEndpoint:
    """
    A worker's TCP listener on C{interface}:C{port}, shared with the other
    workers: a socket bound with C{SO_REUSEPORT}, handed to the reactor
    with L{IReactorSocket.adoptStreamPort} (as Autobahn's
    C{echo_multicore/server_reuseport.py} does).
    """

    reactor: IReactorSocket
    interface: str
    port: int
    backlog: int = LISTEN_BACKLOG

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return execute(self._listen, protocolFactory)

    def _listen(self, factory: IProtocolFactory) -> IListeningPort:
        family = address_family(self.interface)
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(bind_address(self.interface, self.port))
                sock.listen(self.backlog)
                sock.setblocking(False)
                # The reactor keeps its own descriptor: ours may be closed.
                return self.reactor.adoptStreamPort(sock.fileno(), family, factory)  # type: ignore[arg-type]
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                # Not the workers' sockets (SO_REUSEPORT, of this user):
                # another program's, which took the port while no worker
                # listened there.
                raise PortTaken(
                    f"openclaw: cannot listen on {self.interface}:{self.port}: another program is listening there "
                    f"(not this gateway's workers); find it (ss -ltnp 'sport = :{self.port}') and stop it, or "
                    "choose another port"
                ) from None
            raise CannotListenError(self.interface, self.port, e) from None


class _Worker(ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started_at = 0.0
        self.ended: Deferred[None] = Deferred()
        self.process: IProcessTransport | None = None

    def signal(self, name: str | int) -> None:
        if self.process is not None and not self.ended.called:
            self.process.signalProcess(name)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.supervisor.ended(self, reason)


class WorkerSupervisor(Service):
    """
    Runs C{count} worker processes on the ports C{sockets} reserve (name ->
    L{Reservation}, closed once the workers have stopped).

    @param argv: a worker's command line without C{--worker N}.
    @param settings: the settings every worker runs with, this process's
        (read once at its start): handed to each worker started, and
        started again, through a pipe (L{SETTINGS_FD}, L{settings_bytes}).
    @param stop_timeout: how long a stop waits for the workers to drain
        before it kills them (seconds).
    @param worker_sockets: the directory of the workers' private metrics
        sockets (L{openclaw.cluster.scrape.make_socket_directory}), given
        to each (C{--metrics-sockets}) and removed once they have all
        stopped; L{None}: none.
    """

    _log = Logger()
    #: The status C{twistd openclaw} ends with (L{openclaw.tap}): 1 once
    #: it stopped for a worker of another installation (L{_installed_again}).
    exit_status = 0

    def __init__(
        self,
        reactor: ISupervisorReactor,
        count: int,
        sockets: Mapping[str, Reservation],
        argv: Sequence[str],
        settings: Settings,
        stop_timeout: float,
        env: dict[str, str] | None = None,
        log_observer: ILogObserver | None = None,
        worker_sockets: WorkerSockets | None = None,
    ) -> None:
        self.reactor = reactor
        self.worker_sockets = worker_sockets
        self._log_observer = log_observer
        self.count = count
        self.sockets = sockets
        self.argv = list(argv)
        # Pickled once: every worker gets the same bytes.
        self._settings_pickle = settings_bytes(settings)
        self.stop_timeout = stop_timeout
        self.env = dict(os.environ) if env is None else env
        self.workers: dict[int, _Worker] = {}
        #: Per worker index, how many times in a row it ended (or could not
        #: be started) within L{STABLE_SECONDS} of its start.
        self.quick_ends: dict[int, int] = {}
        #: Per worker index, its start again, while waiting.
        self.restarts: dict[int, IDelayedCall] = {}
        #: The indexes of the workers whose last end was for a port another
        #: program listens on (L{PORT_TAKEN_STATUS}, L{_port_taken}).
        self.port_taken: set[int] = set()
        self._stopping = False

    def setServiceParent(self, parent: Any) -> None:
        offer_log_observer(parent, self._log_observer)
        super().setServiceParent(parent)

    def startService(self) -> None:
        super().startService()
        self._log.info("starting {count} workers on {listeners}", count=self.count, listeners=", ".join(self.sockets))
        for index in range(self.count):
            self.spawn(index)

    def spawn(self, index: int) -> None:
        self.restarts.pop(index, None)
        if self._stopping:
            return
        worker = _Worker(self, index)
        worker.started_at = self.reactor.seconds()
        argv = [*self.argv, "--worker", str(index), "--supervisor", str(os.getpid())]
        if self.worker_sockets is not None:
            try:
                ensure_socket_directory(self.worker_sockets)
            except OSError as e:
                # Its TMPDIR removed, say: the worker serves all the same,
                # and its watch makes the directory once it can.
                self._log.warn(
                    "could not make the workers' metrics directory {directory} again before starting worker "
                    "{index} ({error}): it starts all the same, and listens there once the directory can be made",
                    directory=str(self.worker_sockets.directory),
                    index=index,
                    error=e.strerror or str(e),
                )
            argv += ["--metrics-sockets", str(self.worker_sockets.directory)]
        # Blocked in the child until its handler is installed (see the
        # module's docstring); here only for as long as the spawn takes.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        try:
            process = self.reactor.spawnProcess(
                worker, argv[0], argv, env=self.env, childFDs={0: 0, 1: 1, 2: 2, SETTINGS_FD: "w"}
            )
        except Exception as e:
            # Out of processes or memory (fork failed): tried again later,
            # as for a worker that ended at once.
            self._restart(index, 0.0, f"could not be started: {e}")
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        # Buffered by the reactor and written as the pipe takes them; the
        # worker reads to the end, which comes once they are all written.
        process.writeToChild(SETTINGS_FD, self._settings_pickle)
        process.closeChildFD(SETTINGS_FD)
        worker.process = process
        self.workers[index] = worker
        self._log.info("worker {index} started (pid {pid})", index=index, pid=process.pid)

    def reopen_logs(self) -> None:
        """
        SIGUSR1 to every running worker: each reopens the log file it
        opened itself (the parent's C{--logfile}), as the parent has just
        done on its own SIGUSR1 (L{openclaw.logs.log_destination}).
        """
        for worker in self.workers.values():
            worker.signal(signal.SIGUSR1)

    def ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self._stopping:
            return
        ended = reason.value
        if isinstance(ended, ProcessTerminated) and ended.exitCode == INSTALLED_AGAIN_STATUS:
            self._installed_again(worker.index)
            return
        if isinstance(ended, ProcessTerminated) and ended.exitCode == PORT_TAKEN_STATUS:
            self.port_taken.add(worker.index)
            if self._port_taken(worker.index):
                return
        else:
            self.port_taken.discard(worker.index)
        ran = self.reactor.seconds() - worker.started_at
        self._restart(worker.index, ran, f"ended ({reason.getErrorMessage()}) after {ran:.1f} s")

    def _installed_again(self, index: int) -> None:
        """
        Worker C{index} refused this process's settings as another
        installation's (L{InstalledAgain}): no worker started again can
        serve until the twistd process is started again on the new
        installation.  Stop the gateway (the other workers drain), with
        exit status 1 (L{exit_status}): a unit manager starts it again
        (the shipped unit's C{Restart=on-failure}); started by hand, the
        log line says to.
        """
        if self.exit_status:
            # Another worker's end said so first: the stop is under way
            # (a second reactor.stop() would raise ReactorNotRunning).
            return
        self._log.critical(
            "worker {index} refused to start: openclaw was installed again since this gateway started (its line "
            "above); stopping the gateway, with exit status 1, so that it is started again on the new installation "
            "(systemd: Restart=on-failure, as in the shipped unit; by hand: start it again)",
            index=index,
        )
        self.exit_status = 1
        self.reactor.stop()

    def _port_taken(self, index: int) -> bool:
        """
        Worker C{index} could not listen: another program listens on a
        port of the gateway (L{PortTaken}, its line above), which it took
        while no worker listened there (all had ended).  While it does, no
        worker can listen there (a worker needs all the ports), so once
        every worker's last end was this one (L{port_taken}), stop the
        gateway with exit status 1 (L{exit_status}) rather than start them
        again and again while it serves nothing: a unit manager sees the
        failure (the shipped unit's C{Restart=on-failure} starts it again,
        which refuses at once, saying so, while the port stays taken).
        Until then, a critical line, and the worker is started again.

        @return: whether the gateway stops.
        """
        if len(self.port_taken) < self.count:
            self._log.critical(
                "worker {index} cannot listen: another program listens on a port of this gateway ({listeners}; "
                "its line above); starting it again, and stopping the gateway if no worker can listen",
                index=index,
                listeners=", ".join(self.sockets),
            )
            return False
        if not self.exit_status:
            self._log.critical(
                "no worker can listen: another program listens on a port of this gateway ({listeners}; the "
                "workers' lines above say which); stopping the gateway, with exit status 1: stop that program "
                "(ss -ltnp shows it) or choose another port, then start the gateway again",
                listeners=", ".join(self.sockets),
            )
            self.exit_status = 1
            self.reactor.stop()
        return True

    def _restart(self, index: int, ran: float, what: str) -> None:
        """
        Start worker C{index} again after a delay: L{RESTART_DELAY_SECONDS}
        after a stable run, doubling with each quick end in a row (up to
        L{MAX_RESTART_DELAY_SECONDS}), so that a worker that keeps dying at
        once is started a few times a minute, not as fast as it can fork.
        """
        if ran >= STABLE_SECONDS:
            self.quick_ends[index] = 0
        else:
            self.quick_ends[index] = self.quick_ends.get(index, 0) + 1
        quick = self.quick_ends[index]
        delay = _restart_delay(max(0, quick - 1))
        if quick > 1:
            self._log.error(
                "worker {index} {what}, {quick} times in a row within {stable:g} s of its start; "
                "starting it again in {delay:g} s (the other workers keep serving; see its log lines above)",
                index=index,
                what=what,
                quick=quick,
                stable=STABLE_SECONDS,
                delay=delay,
            )
        else:
            self._log.warn(
                "worker {index} {what}; starting it again in {delay:g} s", index=index, what=what, delay=delay
            )
        self.restarts[index] = self.reactor.callLater(delay, self.spawn, index)

    def stopService(self) -> Deferred[Any]:
        """
        SIGTERM to every worker (each drains: 1001 to its control clients,
        calls in flight finished; TOKEN_FILE left, as in any cluster); fires once all
        have ended, killing those still running after C{stop_timeout}.
        """
        super().stopService()
        self._stopping = True
        for restart in self.restarts.values():
            if restart.active():
                restart.cancel()
        self.restarts.clear()
        workers = list(self.workers.values())
        if not workers:
            self._close_sockets()
            return succeed(None)
        for worker in workers:
            worker.signal("TERM")

        def kill() -> None:
            for worker in workers:
                if not worker.ended.called:
                    self._log.warn("worker {index} did not stop in time; killing it", index=worker.index)
                    worker.signal("KILL")

        deadline = self.reactor.callLater(self.stop_timeout, kill)

        def done(result: Any) -> None:
            if deadline.active():
                deadline.cancel()
            self._close_sockets()
            self._log.info("all workers stopped")

        return DeferredList([worker.ended for worker in workers]).addCallback(done)

    def _close_sockets(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        if self.worker_sockets is not None:
            remove_socket_directory(self.worker_sockets)


class SupervisorWatch(Service):
    """
    In a worker: every C{interval} seconds, compare C{getppid()} with
    C{supervisor} (its parent's pid, given on its command line); once they
    differ (the parent ended, even by SIGKILL, and the worker was
    reparented, to pid 1 or a subreaper, see prctl(2)), log it and stop the
    reactor, so the worker drains as on SIGTERM (1001 to its control
    clients, calls in flight finished) and its sockets close: the
    gateway's next start would otherwise run new workers beside it on the
    same ports (C{SO_REUSEPORT}).
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IStoreReactor,
        supervisor: int,
        interval: float = SUPERVISOR_CHECK_SECONDS,
        getppid: Callable[[], int] = os.getppid,
    ) -> None:
        self.reactor = reactor
        self.supervisor = supervisor
        self.interval = interval
        self.getppid = getppid
        self._check = LoopingCall(
            LoggedStep(
                self.check, self._log, f"the check that this worker's gateway process (pid {supervisor}) still runs"
            )
        )
        self._check.clock = reactor
        self.gone = False

    def startService(self) -> None:
        super().startService()
        self._check.start(self.interval, now=True)

    def stopService(self) -> Any:
        if self._check.running:
            self._check.stop()
        return super().stopService()

    def check(self) -> None:
        if self.gone or self.getppid() == self.supervisor:
            return
        self.gone = True
        self._log.error(
            "this worker's gateway process (pid {pid}) has ended; stopping this worker (drained, as on SIGTERM): "
            "start the gateway again (systemd restarts it)",
            pid=self.supervisor,
        )
        if self._check.running:
            self._check.stop()
        self.reactor.stop()


def worker_argv(twistd_options: Mapping[str, Any]) -> list[str]:
    """
    The command line that runs one worker: this Python's twistd in the
    foreground, no pidfile (the parent's is the gateway's), the same log
    file as the parent; no setting (the worker takes its parent's,
    L{read_settings}).
    """
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]
    logfile = twistd_options.get("logfile") if twistd_options else None
    if logfile:
        argv += ["--logfile", logfile]
    argv.append("openclaw")
    return argv
