"""
The gateway as a Twisted service: what starts when C{twistd openclaw} starts
and stops, in order, when it stops.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, NoReturn

from twisted.application.service import MultiService, Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    FirstError,
    gatherResults,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.failure import Failure

from openclaw.cluster.clock import ClusterClock
from openclaw.cluster.lockout import SharedLockout
from openclaw.cluster.membership import Membership
from openclaw.cluster.node import ClusterNode
from openclaw.cluster.redis import REDIS_REFUSED, RedisStore, redis_database
from openclaw.cluster.scrape import (
    OwnMetrics,
    PrivateSocketEndpoint,
    PrivateSocketWatch,
    WorkersExposition,
    WorkerSockets,
)
from openclaw.cluster.workers import PORT_TAKEN_STATUS
from openclaw.consumers.commands import LIST_ENVELOPE_BYTES, ConsumerCommands
from openclaw.consumers.prices import PriceTable
from openclaw.consumers.service import ConsumersService, unusable_database_file
from openclaw.consumers.shared import SharedConsumers, SharedCounters
from openclaw.consumers.store import (
    ConsumerStore,
    remove_new_database,
    sqlite_path,
)
from openclaw.consumers.table import ConsumerTable
from openclaw.consumers.unsaved import UnsavedRevokesFile
from openclaw.control.admission import PeerAllowlist
from openclaw.control.closecodes import GOING_AWAY
from openclaw.control.commands import COMMANDS, ControlCommands
from openclaw.control.lockout import AuthLockout
from openclaw.control.plane import ControlPlane
from openclaw.control.protocol import ControlFactory
from openclaw.dataplane.context import APIContext
from openclaw.dataplane.metrics_site import MetricsRoot, metrics_listener
from openclaw.dataplane.site import APISite, build_site
from openclaw.deferreds import InFlight
from openclaw.files import FILES_CHECK_SECONDS, LockHeld, PidLock, write_atomically
from openclaw.listeners import HANDSHAKE_HEADROOM, CannotListen, PortTaken, descriptor_shares
from openclaw.logs import COMMANDS_NAMESPACE, offer_log_observer
from openclaw.loops import LoggedStep
from openclaw.metrics import ConsumerMetrics, GatewayMetrics, MeasuredAgent, MetricsResource
from openclaw.providers import ProviderRegistry
from openclaw.providers.keys import rest_subject
from openclaw.reactors import IGatewayReactor
from openclaw.routing import ActiveRoute, Route
from openclaw.session import RotationUnderWay, SessionAuthority, SessionToken, TokenFileUnwritable
from openclaw.settings import Settings
from openclaw.settings.errors import ConfigError
from openclaw.settings.permissions import check_token_directory
from openclaw.stalls import boot_clock
from openclaw.state import RouteStore
from openclaw.timefmt import isoformat
from openclaw.urls import masked_url
from openclaw.writer import FileWriter

#: How often an instance that is not listening yet (waiting for the
#: cluster store at start-up) says so in the log, in seconds.
WAITING_LOG_SECONDS = 5.0

#: Why twistd's C{--uid}/C{--gid} are refused, and what to do instead: the
#: gateway checks and makes its files (the token file's lock, the
#: consumers' database, the log) as the user twistd starts as, then would
#: run as one that cannot use them.
PRIVILEGE_SWITCH_FIX = (
    "twistd's --uid/--gid are not supported: the gateway's files would be made by one user and used by another; "
    "start twistd as the gateway's user instead (systemd: User=, as contrib/openclaw.service does), and for a "
    "port below 1024 grant that user CAP_NET_BIND_SERVICE (systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE)"
)


class StartRefused(SystemExit, Exception):
    """
    The gateway refuses to start for a cause found once twistd had
    daemonized (its C{privilegedStartService} or C{startService}): a
    listener that cannot be had, a first token that cannot be written.
    Its argument is the refusal's line (C{openclaw: ...}).

    An L{Exception}, so that twistd's C{postApplication} tells the
    process that started it through its status pipe (which takes nothing
    else): that process prints twistd's "An error has occurred" with the
    line's start and exits with status 1, where it waited for ever or
    exited 0.  A L{SystemExit}, so that C{twistd -n} ends with
    the line alone and status 1, no traceback.
    """


def effective_ids() -> tuple[int, int]:
    """
    This process's effective user and group ids (C{geteuid}, C{getegid}).
    """
    return os.geteuid(), os.getegid()


class ListeningService(Service):
    """
    Listens on an endpoint while running, and fails start-up when it cannot.

    Twisted's C{StreamServerEndpointService} only logs a listening failure
    (unless told otherwise through private state): the gateway would run on
    without the port.  Here a C{listen} that fails before
    L{privilegedStartService} (or L{startService}) returns raises that
    failure's exception from it, so C{twistd} exits with it; a failure that
    comes later (an endpoint that binds asynchronously) is logged as
    critical.

    @ivar port: the listening port, once listening; L{None} before and
        after.
    """

    _log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None
        self._listening: Deferred[IListeningPort] | None = None
        #: While the port stopped last is closing: its closing, which a
        #: later L{stopService} waits for too.
        self._closing: InFlight[None] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        self._listen()

    def _listen(self) -> None:
        if self._listening is not None:
            return
        failures: list[Failure] = []
        starting = True

        def failed(failure: Failure) -> None:
            if starting:
                failures.append(failure)
            elif not failure.check(CancelledError):
                self._log.failure(
                    "could not listen on {endpoint}", failure, log_level=LogLevel.critical, endpoint=self.endpoint
                )

        listening = self.endpoint.listen(self.factory)
        listening.addCallbacks(self._listened, failed)
        starting = False
        if failures:
            failures[0].raiseException()
        self._listening = listening

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        return port

    def stopService(self) -> Deferred[None]:
        """
        Stop listening; fires once the port is closed (at once if it never
        opened; a listen still under way is cancelled).  Stopped again
        while the port is still closing: fires once it is closed too (as
        the first stop's does, with its failure if closing failed), not
        at once.
        """
        super().stopService()
        listening, self._listening = self._listening, None
        port, self.port = self.port, None
        if port is not None:
            stopped = port.stopListening()
            if stopped is None:
                return succeed(None)
            closing = self._closing = InFlight[None]()

            def closed(result: object) -> None:
                if self._closing is closing:
                    self._closing = None
                if not closing.end(result if isinstance(result, Failure) else None) and isinstance(result, Failure):
                    # Every stop waiting for it gave up: said here.
                    self._log.failure(
                        "closing a listening port failed ({error})", result, error=result.getErrorMessage()
                    )

            stopped.addBoth(closed)
            return closing.observe()
        if listening is not None and not listening.called:
            listening.cancel()
        if self._closing is not None:
            return self._closing.observe()
        return succeed(None)


class SequentialMultiService(MultiService):
    """
    A L{MultiService} whose children stop one at a time, the last added
    first, each stop waited for (its Deferred) before the next begins:
    Twisted's calls every child's C{stopService} at once, and only waits
    for them all together.  A child whose stop fails is logged, and the
    next is stopped all the same; the returned Deferred never fails.
    """

    _log = Logger()

    @inlineCallbacks
    def stopService(self) -> Any:
        Service.stopService(self)
        for service in reversed(list(self)):
            try:
                yield maybeDeferred(service.stopService)
            except Exception:
                self._log.failure("could not stop {service}", service=service, log_level=LogLevel.critical)


#: What two gateways on the same setting both use, for the line that says
#: a second one took its lock (L{HeldLocks.check_files}).
_LOCKED_FOR = MappingProxyType(
    {
        "STATE_DIR": "its consumers' database and state file",
        "TOKEN_FILE": "the token file (each writes its own token there)",
    }
)


def _unsafe_lock_directory(path: Path, setting: str) -> str | None:
    """
    Why the directory of C{TOKEN_FILE}'s lock file C{path}, just made
    again, breaks the rule start-up holds it to (L{check_token_directory}:
    made again so that others may write it, they could remove the lock
    and let a second gateway take the token file), or None.
    """
    if setting != "TOKEN_FILE":
        return None
    try:
        check_token_directory(path, f"the lock file {str(path)!r}")
    except ConfigError as e:
        return str(e)
    return None


class HeldLocks(Service):
    """
    What the gateway holds for its whole life, taken by C{twistd openclaw}
    before it daemonized (L{openclaw.tap.makeService}): the lock of
    C{STATE_DIR} (L{openclaw.state.lock_state_dir}), the lock of
    C{TOKEN_FILE} (L{openclaw.session.lock_token_file}, held by the session
    authority) with the token file written at start, and the locks of its
    TCP ports (L{openclaw.listeners.lock_port}).  The gateway's first
    child: started first (the lock of C{STATE_DIR} then names the daemon's
    pid), stopped last (L{SequentialMultiService}), once the listeners, the
    consumers' database and the cluster's membership are stopped, whether
    or not their stops failed; a start refused lets them go at once
    (L{release}).

    It starts and stops the gateway's file writer (L{FileWriter}) too: at
    stop its writes under way finish (none is taken after) before the
    token file is removed, so that none lands once it is, and the locks
    are let go of last.
    """

    def __init__(
        self,
        sessions: SessionAuthority,
        state_lock: PidLock | None,
        port_locks: Sequence[socket.socket],
        log: Logger,
        writer: FileWriter | None = None,
        token_lock: PidLock | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        """
        Reactor thread (or before the reactor runs).

        @param sessions: the session authority, holding the token file's
            lock and writing the token file.
        @param state_lock: the lock of C{STATE_DIR}; L{None}: none.
        @param port_locks: the locks of the TCP ports (abstract UNIX
            sockets, one per port number).
        @param log: the gateway's logger (its lines are the gateway's).
        @param writer: the gateway's file writer (the state file's and the
            token file's writes after start-up), started and stopped with
            this service; L{None}: none.
        @param token_lock: the lock of C{TOKEN_FILE} the session authority
            holds (and lets go of), watched here with C{state_lock}
            (L{check_files}); L{None}: none.
        @param clock: runs the check of the lock files every
            L{FILES_CHECK_SECONDS} while started; L{None}: never run.
        """
        self._sessions = sessions
        self._writer = writer
        self._state_lock = state_lock
        self._token_lock = token_lock
        self._port_locks = tuple(port_locks)
        self._log = log
        self._clock = clock
        self._checking: LoopingCall | None = None
        #: The lock files whose loss was said (critical) and not mended
        #: since: said once, not every check.
        self._lost_said: set[Path] = set()

    def startService(self) -> None:
        """
        Name this process in the lock of C{STATE_DIR}: after twistd
        daemonized, the daemon's pid, not its parent's (a file that cannot
        be written keeps the parent's: the lock holds all the same), and
        start the file writer.  Reactor thread.
        """
        super().startService()
        if self._state_lock is not None:
            with contextlib.suppress(OSError):
                self._state_lock.record_pid()
        if self._writer is not None:
            self._writer.startService()
        if self._clock is not None:
            checking = self._checking = LoopingCall(
                LoggedStep(self.check_files, self._log, "the check that the lock files and the token file are in place")
            )
            checking.clock = self._clock
            checking.start(FILES_CHECK_SECONDS, now=False)

    def check_files(self) -> None:
        """
        Check that the lock files held (C{STATE_DIR}'s, C{TOKEN_FILE}'s)
        are still at their paths (L{PidLock.displaced}): one removed (an
        C{rm}, a C{rm -rf} of its directory, a cleaner of C{/tmp} or
        C{/run} removing files left untouched) or replaced keeps no second
        gateway out any longer, which would start on the same directory or
        token file.  It is taken again at once (L{PidLock.retake}; a
        warning says so); when it cannot be (another process holds the
        file now there, or its directory is gone), one critical line says
        what happened and what to do, and the next checks try again
        without saying it again.  Reactor thread (two C{stat} calls per
        lock).  Then the token file: written again when it is gone
        (L{SessionAuthority.restore_token_file}); an operator had no
        token to read until a restart (hostile trial s45).
        """
        for lock, setting in ((self._state_lock, "STATE_DIR"), (self._token_lock, "TOKEN_FILE")):
            if lock is None:
                continue
            what = lock.displaced()
            if what is None:
                continue
            try:
                lock.retake()
            except LockHeld as e:
                if lock.path not in self._lost_said:
                    self._lost_said.add(lock.path)
                    holder = "another process" if e.pid is None else f"process {e.pid}"
                    self._log.critical(
                        "the lock file {path} of {setting} was {what} while the gateway ran, and {holder} holds the "
                        "one there now: a second gateway started on the same {setting}, and both use {shared}: "
                        "stop one of them (this one is pid {pid}), then restart the other",
                        path=str(lock.path),
                        setting=setting,
                        what=what,
                        holder=holder,
                        shared=_LOCKED_FOR[setting],
                        pid=os.getpid(),
                    )
            except OSError as e:
                if lock.path not in self._lost_said:
                    self._lost_said.add(lock.path)
                    self._log.critical(
                        "the lock file {path} of {setting} was {what} while the gateway ran, and cannot be made "
                        "again ({error}): a second gateway may now start on the same {setting}; make its directory "
                        "again (or the gateway's files in it: see the other lines), and restart the gateway",
                        path=str(lock.path),
                        setting=setting,
                        what=what,
                        error=e.strerror or str(e),
                    )
            else:
                self._lost_said.discard(lock.path)
                unsafe = _unsafe_lock_directory(lock.path, setting)
                self._log.emit(
                    LogLevel.warn if unsafe is None else LogLevel.critical,
                    "the lock file {path} of {setting} was {what} while the gateway ran (an rm, a cleaner of old "
                    "files in /tmp or /run): made again and locked, so that no second gateway starts on the same "
                    "{setting}; keep cleaners away from it{unsafe}",
                    path=str(lock.path),
                    setting=setting,
                    what=what,
                    unsafe="" if unsafe is None else f"; but {unsafe}",
                )
        self._sessions.restore_token_file()

    def stopService(self) -> Deferred[None]:
        """
        Let the file writer's writes under way finish (or fail, logged by
        who asked them), taking none after (L{FileWriter.stopService}:
        however long a slow disk takes); then remove the token file
        (L{SessionAuthority.discard_token_file}: only when it still holds
        this gateway's token, never a cluster's), then let go of the locks
        (L{release}); the locks are let go even when the token file's
        removal fails (which then fails this stop, logged by the gateway:
        L{SequentialMultiService}).  Reactor thread.
        """
        super().stopService()
        if self._checking is not None and self._checking.running:
            self._checking.stop()
        self._checking = None
        writes: Deferred[None] = (
            succeed(None) if self._writer is None or not self._writer.running else self._writer.stopService()
        )

        def written(_: object) -> None:
            try:
                self._sessions.discard_token_file()
            finally:
                self.release()

        return writes.addCallback(written)

    def release(self) -> None:
        """
        Let go of the token file's lock (the token file left as it is), the
        ports' locks and the lock of C{STATE_DIR}, the lock files removed
        (one that cannot be removed is logged as a warning: let go all the
        same); again, nothing.
        """
        try:
            self._sessions.release_token_file()
        finally:
            self.release_ports()
            self._release_state_dir()

    def release_ports(self) -> None:
        """
        Let go of the ports' locks alone (the gateway never started, or
        could not listen); again, nothing.
        """
        ports, self._port_locks = self._port_locks, ()
        for port in ports:
            port.close()

    def _release_state_dir(self) -> None:
        if self._state_lock is None:
            return
        lock, self._state_lock = self._state_lock, None
        try:
            lock.release()
        except OSError as e:
            self._log.warn(
                "could not remove the lock file {path} of STATE_DIR: {reason}",
                path=str(lock.path),
                reason=e.strerror or str(e),
            )


class ClusterService(Service):
    """
    This instance's membership of its cluster (C{REDIS_URL}) while
    running: the connections to Redis (L{RedisStore}) and the node
    (L{ClusterNode}: heartbeat, reloads) started, and at stop the node
    stopped (it leaves the count of instances), then the connections
    closed; the stop's Deferred fires once they are (within
    C{REDIS_TIMEOUT_SECONDS} each) and never fails.
    """

    def __init__(self, redis: RedisStore, node: ClusterNode) -> None:
        self._redis = redis
        self._node = node

    def startService(self) -> None:
        super().startService()
        self._redis.start(self._node)
        self._node.start()

    @inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        yield self._node.stop()
        yield self._redis.stop()


class ServingService(MultiService):
    """
    What answers clients: the listeners (its children, and a worker's
    metrics socket watch), and at stop, once they stopped accepting, the
    commands and API calls in flight let finish (for up to
    C{SHUTDOWN_GRACE_SECONDS}), goodbye (1001) said to every control
    client and the API's connections closed, then the providers' probes
    and pooled connections let go of.

    @ivar api_site: the API's site (L{None}: no API listener).
    """

    def __init__(
        self,
        controlplane: ControlPlane,
        factory: ControlFactory,
        api_site: APISite | None,
        providers: ProviderRegistry,
        grace_seconds: float,
        reactor: IReactorTime,
        log: Logger,
    ) -> None:
        """
        @param grace_seconds: C{SHUTDOWN_GRACE_SECONDS}.
        @param log: the gateway's logger (its lines are the gateway's).
        """
        super().__init__()
        self._controlplane = controlplane
        self._factory = factory
        self.api_site = api_site
        self._providers = providers
        self._grace = grace_seconds
        self._reactor = reactor
        self._log = log

    @inlineCallbacks
    def stopService(self) -> Any:
        yield super().stopService()
        calls = 0 if self.api_site is None else self.api_site.in_flight
        commands = self._controlplane.in_flight
        if calls or commands:
            # What the stop waits for, before it waits (else
            # seconds passed without a word).
            self._log.info(
                "stopping: waiting up to {seconds:g} s (SHUTDOWN_GRACE_SECONDS) for {calls} API call(s) and "
                "{commands} command(s) in flight",
                seconds=self._grace,
                calls=calls,
                commands=commands,
            )
        drains = [self._controlplane.drain()]
        if self.api_site is not None:
            drains.append(self.api_site.drain())
        drained = gatherResults(drains, consumeErrors=True)
        try:
            yield drained.addTimeout(self._grace, self._reactor)
        except (DeferredTimeoutError, FirstError):
            # Twisted's TimeoutError is not the builtin one; and a gathered
            # wait cancelled at the deadline fails with FirstError.
            self._log.warn(
                "shutdown grace of {seconds} s is over; closing with commands or API calls still in flight",
                seconds=self._grace,
            )
        # Both at once: a control client slow to answer its close frame
        # (up to CLOSE_HANDSHAKE_SECONDS) must not keep the API's calls
        # running past the grace period.
        closing = [self._factory.close_all(GOING_AWAY)]
        if self.api_site is not None:
            closing.append(self.api_site.close_connections())
        yield gatherResults(closing, consumeErrors=True)
        yield self._providers.close()


class GatewayService(SequentialMultiService):
    """
    The whole gateway: session token, control plane listener, providers.

    @param control_endpoint: where the control plane listens.
    @param api_endpoint: where the OpenAI-compatible API listens; L{None}
        for no API listener.
    @param stdout: where the token banner is printed: the process's real
        standard output, taken before twistd redirects C{sys.stdout} into the
        log.  L{None} for a daemon: the banner then goes to the log, without
        the token (which is in the token file).
    @param log_observer: the observer twistd should log to, installed on the
        application this service joins.
    @param metrics_endpoint: where C{/metrics} is served on its own; by
        default it is served on the API listener.
    @param worker: its index among C{--workers} (0 for a single process).
    @param worker_sockets: under C{--workers} (above 1), where each worker
        serves its own series (L{openclaw.cluster.scrape}): this one
        listens on its socket there, and answers C{/metrics} with every
        worker's series, each labelled C{worker}; L{None} (one process):
        its own, without that label.
    @param ids: this process's effective user and group ids, now
        (L{effective_ids}): taken when the service is built and again at
        L{startService}, which refuses to run when they changed in between
        (twistd's C{--uid}/C{--gid}: L{PRIVILEGE_SWITCH_FIX}).
    @param state_lock: the lock of C{STATE_DIR}
        (L{openclaw.state.lock_state_dir}), taken before twistd daemonized:
        kept until the service stops, and released (its file removed)
        last (L{HeldLocks}).  L{None}: none.
    @param token_lock: the lock of C{TOKEN_FILE}
        (L{openclaw.session.lock_token_file}), held by the session
        authority (L{SessionAuthority}'s C{token_lock}), released last
        with the token file (L{HeldLocks}).  L{None}: none.
    @param port_locks: the locks of its TCP ports
        (L{openclaw.listeners.lock_port}), taken before twistd daemonized:
        closed when the service stops, with C{state_lock} (L{HeldLocks}).
    @param write_file: the blocking write of a whole file (path, text)
        its L{FileWriter} calls in its thread for the state file and the
        token file after start-up (L{write_atomically}; a test gives one
        that blocks).
    """

    #: The process's exit status once the reactor has stopped: 1 after a
    #: refusal to start found once running (a cluster token this instance
    #: cannot trust), so that a unit manager sees a failure, not a stop.
    exit_status = 0

    _log = Logger()

    def __init__(
        self,
        settings: Settings,
        reactor: IGatewayReactor,
        control_endpoint: IStreamServerEndpoint,
        stdout: IO[str] | None = None,
        api_endpoint: IStreamServerEndpoint | None = None,
        log_observer: ILogObserver | None = None,
        metrics_endpoint: IStreamServerEndpoint | None = None,
        worker: int = 0,
        worker_sockets: WorkerSockets | None = None,
        ids: Callable[[], tuple[int, int]] = effective_ids,
        state_lock: PidLock | None = None,
        token_lock: PidLock | None = None,
        port_locks: Sequence[socket.socket] = (),
        write_file: Callable[[Path, str], None] = write_atomically,
        made_database: Path | None = None,
    ) -> None:
        super().__init__()
        #: The consumers' SQLite database C{twistd openclaw} made, empty,
        #: before daemonizing: removed again if the start is refused
        #: (L{_refuse}), so that a refusal leaves none on disk.
        self._made_database = made_database
        self._ids = ids
        #: The effective user and group ids the service was built (and
        #: its files checked and made) as.
        self.built_as = ids()
        self.settings = settings
        self._stdout = stdout
        self._reactor = reactor
        self._log_observer = log_observer
        #: Writes the state file and the token file after start-up, in a
        #: thread of its own: started and stopped by HeldLocks (its writes
        #: finished just before it removes the token file).
        self.writer = FileWriter(reactor, write_file)
        shared_clock = self._build_sessions(token_lock)
        #: Its first child (started first, stopped last): the locks of
        #: STATE_DIR, TOKEN_FILE and its ports, and the token file.
        self._held = HeldLocks(
            self.sessions, state_lock, port_locks, self._log, self.writer, token_lock=token_lock, clock=reactor
        )
        self._held.setServiceParent(self)
        # The metrics read the providers and the listeners, which count
        # into them: read through self, when scraped.
        self.metrics = self._build_metrics(api=api_endpoint is not None)
        self._build_providers(api=api_endpoint is not None)
        self._build_route()
        #: Seconds since the epoch, by the reactor's clock (the real
        #: reactor's is wall-clock time: C{status} shows it as a date).
        self.started_at = reactor.seconds()
        self.started_monotonic = time.monotonic()
        self._build_consumers(shared_clock)
        #: This process's id in the cluster (host name and process id),
        #: taken again at start (L{_name_instance}).
        self.instance = _instance_id()
        #: Its index among C{--workers} (0 for a single process).
        self.worker = worker
        self._build_cluster()
        # Children, started in this order and stopped in the reverse, each
        # stop waited for (SequentialMultiService): the locks, the token
        # file and the file writer (HeldLocks, added above), the cluster's
        # membership, the consumers' database, then what answers clients;
        # twistd's stop thus stops listening and drains the calls in
        # flight first, writes their usage rows, leaves the cluster, lets
        # the state and token files' writes finish (no more taken), then
        # removes the token file and lets go of the locks last.
        if self.cluster is not None:
            assert self._redis is not None
            ClusterService(self._redis, self.cluster).setServiceParent(self)
        #: When the stop began (L{stopService}), in the reactor's seconds.
        self._stopping_at = 0.0
        #: A rotation (L{rotate_token}) is under way: asked, not answered.
        self._rotating = False
        #: A single gateway's warning at its token's expiry
        #: (L{_watch_expiry}), while one waits.
        self._expiry: IDelayedCall | None = None
        self._consumers_service = self._build_consumers_service()
        self._consumers_service.setServiceParent(self)
        self._build_control_plane(shared_clock)
        metrics_resource = self._build_metrics_resource(worker_sockets)
        #: The data plane's site; L{None} without an API listener.
        self.api_site = self._build_api_site(api_endpoint, metrics_endpoint, metrics_resource)
        self._build_serving(worker_sockets)
        self._listen(control_endpoint, self.factory)
        if self.api_site is not None:
            assert api_endpoint is not None
            self._listen(api_endpoint, self.api_site)
        if metrics_endpoint is not None:
            self._listen(metrics_endpoint, metrics_listener(MetricsRoot(metrics_resource), settings, reactor))

    def _build_sessions(self, token_lock: PidLock | None) -> Callable[[], float]:
        """
        Set C{cluster_clock} and C{sessions} (the session authority, which
        holds C{token_lock}).

        @return: the clock the session token and the consumers' limits are
            judged by, in seconds since the epoch: Redis's in a cluster
            (C{cluster_clock}), else the reactor's.
        """
        settings = self.settings
        reactor = self._reactor
        #: In a cluster, Redis's clock (measured by the node), by which the
        #: session token and the consumers' limits are judged.
        self.cluster_clock = ClusterClock(reactor) if settings.redis_url else None
        shared_clock = reactor.seconds if self.cluster_clock is None else self.cluster_clock.seconds
        self.sessions = SessionAuthority(
            settings.jwt_secret,
            settings.session_ttl_hours * 3600,
            clock=shared_clock,
            token_file=settings.token_file,
            shared=settings.redis_url is not None,
            token_lock=token_lock,
            writer=self.writer,
        )
        return shared_clock

    def _build_metrics(self, api: bool) -> GatewayMetrics:
        """
        The gateway's metrics, reading (when scraped) the providers and the
        listeners built after them; with C{api} (an API listener), its
        connections and the providers' breakers too.
        """
        settings = self.settings
        return GatewayMetrics(
            COMMANDS,
            settings.provider_ids,
            unconfigured=[provider_id for provider_id, entry in settings.providers.items() if not entry.keys],
            serving=lambda provider_id: self.providers.get(provider_id).serving,
            control_connections=lambda: len(self.factory.connections),
            api_connections=self._api_connections if api else None,
            breaker=(lambda provider_id: self.providers.get(provider_id).breaker) if api else None,
            cluster=bool(settings.redis_url),
        )

    def _build_providers(self, api: bool) -> None:
        """
        Set C{descriptors} (with C{api}: shared with an API listener) and
        C{providers}, whose upstream requests count into C{metrics}.
        """
        settings = self.settings
        reactor = self._reactor
        #: How the process's descriptors are shared between the listeners
        #: and the providers' idle pooled connections.
        self.descriptors = descriptor_shares(settings, api=api)
        self.providers = ProviderRegistry.from_settings(
            settings,
            reactor,
            wrap_agent=lambda agent, provider_id: MeasuredAgent(
                agent, self.metrics.upstream_requests, provider_id, reactor.seconds
            ),
            pool_size=self.descriptors.pool_per_host or None,
            # The cluster node is built later, and takes the providers'
            # rest_key: shared through self.
            on_rest=self._share_rest if settings.redis_url else None,
        )

    def _build_route(self) -> None:
        """
        Set C{store} (the state file), C{restored_route} and C{route}, the
        configured route (C{DEFAULT_PROVIDER} and its model) until the state
        file is read at start.
        """
        settings = self.settings
        self.store = RouteStore(settings.state_dir, self.providers.ids, self.writer)
        provider = settings.default_provider
        #: The route the state file held, when it replaced the configured one
        #: (in a cluster the Redis copy replaces the state file): read at
        #: start (L{_restore_route}).
        self.restored_route: Route | None = None
        #: The route in force: the configured one until the state file is
        #: read at start.
        self.route = ActiveRoute(Route(provider, settings.default_model(provider)))

    def _build_consumers(self, shared_clock: Callable[[], float]) -> None:
        """
        Set C{consumer_store}, C{_redis} (the cluster's store, L{None}
        outside a cluster) and C{consumers}, whose limits are judged by
        C{shared_clock} (seconds since the epoch); nothing is opened.
        """
        settings = self.settings
        reactor = self._reactor
        #: The consumers (issue #19): their database, and the table the
        #: data plane checks, loaded at start.
        # Its SQLite file is checked (and made) at start (L{startService}),
        # its pool of connections made (its threads) when the consumers
        # start (L{ConsumersService}).
        self.consumer_store = ConsumerStore.open(
            settings.database_url,
            settings.state_dir,
            reactor,
            check_file=False,
            start=False,
            role=f"cluster {settings.cluster_name}" if settings.redis_url else "standalone",
        )
        self._redis: RedisStore | None = None
        shared: SharedCounters | None = None
        if settings.redis_url:
            self._redis = RedisStore(
                settings.redis_url,
                settings.cluster_name,
                settings.redis_timeout_seconds,
                settings.redis_reconnect_max_seconds,
                reactor,
                # SharedConsumers, built on this store: reached through self.
                on_consumer=self._consumer_published,
            )
            shared = SharedCounters(
                self._redis, reactor, settings.redis_timeout_seconds, unseeded=self._consumers_unseeded
            )
        self.consumers = ConsumerTable(
            self.consumer_store,
            PriceTable.with_overrides(
                settings.price_overrides, (entry.adapter for entry in settings.providers.values())
            ),
            clock=shared_clock,
            metrics=ConsumerMetrics(self.metrics.registry),
            counters=shared,
            reserve_tokens=settings.consumer_reserve_tokens,
            changed=self._consumer_changed,
            revoke_unsaved=self._revoke_unsaved,
            revoke_saved=self._revoke_saved,
            revokes_file=UnsavedRevokesFile(settings.state_dir, self.writer),
            hold_until_loaded=True,
        )

    def _build_cluster(self) -> None:
        """
        Set C{cluster}, C{shared_consumers} and C{lockout} (in a cluster,
        by L{_join_cluster}; else L{None}), and the state of the wait for
        the cluster's store at start.
        """
        self.cluster: ClusterNode | None = None
        #: Consumers kept in step across the cluster (L{None}: one instance).
        self.shared_consumers: SharedConsumers | None = None
        #: The auth lockout shared by the cluster (L{None}: per instance).
        self.lockout: SharedLockout | None = None
        #: In a cluster, the listeners wait here for the first reload.
        self._waiting_listeners: list[ListeningService] = []
        self._waiting_for_store: LoopingCall | None = None
        self._joined_at = 0.0
        self._unannounced: SessionToken | None = None
        if self.settings.redis_url:
            self._join_cluster(self._reactor)

    def _build_consumers_service(self) -> ConsumersService:
        """
        The service of the consumers' database: opened at start, closed
        at stop within C{SHUTDOWN_GRACE_SECONDS} of its beginning.
        """
        settings = self.settings
        return ConsumersService(
            self.consumer_store,
            self.consumers,
            self.shared_consumers,
            settings,
            self._reactor,
            self._log,
            deadline=lambda: self._stopping_at + settings.shutdown_grace_seconds,
            identified=self._consumers_identified,
        )

    def _build_control_plane(self, shared_clock: Callable[[], float]) -> None:
        """
        Set C{controlplane} (its commands, the consumers' judged by
        C{shared_clock}, in seconds since the epoch) and C{factory}, its
        WebSocket factory.
        """
        settings = self.settings
        reactor = self._reactor
        cluster = self.cluster
        commands = ControlCommands(
            route=self.route,
            providers=self.providers,
            sessions=self.sessions,
            rotate=self.rotate_token,
            connections=lambda: len(self.factory.connections),
            started_at=self.started_at,
            started_monotonic=self.started_monotonic,
            clock=reactor.seconds,
            # In a cluster the route is kept in the store (share_switch);
            # standalone, in the state file, written in the writer's thread.
            persist=self.store.save_later if cluster is None else lambda route: None,
            on_health=self.metrics.health,
            provider_states=self.providers.states,
            share_switch=None if cluster is None else cluster.switch,
            instance_status=self.instance_status,
            extra=ConsumerCommands(
                self.consumers,
                shared_clock,
                self._consumers_unshared,
                self._consumers_announced,
                provider_ids=self.providers.ids,
                list_bytes=max(1, settings.max_message_bytes - LIST_ENVELOPE_BYTES),
                cluster=cluster is not None,
            ).handlers(),
            excluded_consumers=self.consumers.excluding,
            unpriced_consumers=self.consumers.unpriced_budgets,
        )
        self.controlplane = ControlPlane(
            self.sessions,
            commands,
            Logger(namespace=COMMANDS_NAMESPACE),
            debug=settings.log_level == "debug",
            max_auth_failures=settings.max_auth_failures,
            metrics=self.metrics,
            instance=self.instance if cluster is not None else None,
            max_answer_bytes=settings.max_message_bytes,
            fence=None if cluster is None else cluster.fence,
        )
        self.factory = ControlFactory(
            self.controlplane,
            settings,
            self.metrics,
            clock=time.monotonic,
            lockout=self.lockout,
            capacity=self.descriptors.control,
            reactor=reactor,
        )

    def _build_metrics_resource(self, worker_sockets: WorkerSockets | None) -> MetricsResource:
        """
        C{/metrics}: this process's series, or under C{--workers}
        (C{worker_sockets}), every worker's, each labelled C{worker}.
        """
        settings = self.settings
        exposition = None
        if worker_sockets is not None:
            # --workers: every worker's series on /metrics.
            exposition = WorkersExposition(self._reactor, self.metrics.registry, worker_sockets, self.worker).exposition
        return MetricsResource(
            self.metrics, PeerAllowlist(settings.trusted_clients), settings.metrics_allowed_hosts, exposition
        )

    def _build_api_site(
        self,
        api_endpoint: IStreamServerEndpoint | None,
        metrics_endpoint: IStreamServerEndpoint | None,
        metrics_resource: MetricsResource,
    ) -> APISite | None:
        """
        The data plane's site (L{None} without C{api_endpoint}), serving
        C{metrics_resource} too unless C{metrics_endpoint} serves it apart.
        """
        if api_endpoint is None:
            return None
        settings = self.settings
        reactor = self._reactor
        context = APIContext.from_settings(
            self.route,
            self.providers,
            settings,
            reactor,
            self.metrics.api_requests,
            self.metrics.call_costs,
            self.metrics.count_fallback,
            self.consumers,
            count_refused_connection=self.metrics.refused_api_connection,
            metrics_apart=metrics_endpoint is not None,
        )
        return build_site(
            context,
            settings,
            reactor,
            self.descriptors.api,
            metrics=metrics_resource if metrics_endpoint is None else None,
        )

    def _build_serving(self, worker_sockets: WorkerSockets | None) -> None:
        """
        Set C{_serving}, the last child: the listeners (added by
        L{_listen}) and what stops the calls in flight; under C{--workers}
        (C{worker_sockets}), with this worker's private socket of its own
        series.
        """
        settings = self.settings
        reactor = self._reactor
        #: The listeners (its children) and what stops the calls in flight.
        self._serving = ServingService(
            self.controlplane,
            self.factory,
            self.api_site,
            self.providers,
            settings.shutdown_grace_seconds,
            reactor,
            self._log,
        )
        self._serving.setServiceParent(self)
        if worker_sockets is not None:
            # --workers: this worker's own series on its private socket,
            # listening at once (while waiting for the cluster store, too:
            # its metrics say so).
            private = ListeningService(
                PrivateSocketEndpoint(reactor, worker_sockets.path(self.worker)),
                metrics_listener(MetricsRoot(OwnMetrics(self.metrics.registry)), settings, reactor),
            )
            # Listens on it (not a child of its own: its directory's fault
            # does not end the worker), and again if a cleaner of the
            # temporary directory removes it.
            PrivateSocketWatch(reactor, worker_sockets, self.worker, private).setServiceParent(self._serving)

    def _join_cluster(self, reactor: IReactorTime) -> None:
        """
        Share the route, token and key rests through Redis (C{REDIS_URL}).
        """
        settings = self.settings
        assert settings.redis_url is not None and self._redis is not None
        assert isinstance(self.consumers.counters, SharedCounters)
        self.shared_consumers = SharedConsumers(
            self.consumers, self.consumers.counters, self._redis, self.instance, monotonic=boot_clock
        )
        #: This instance's record, in STATE_DIR, that it was in step with
        #: the cluster (read at start: L{_restore_route}).
        self.membership = Membership.in_directory(
            settings.state_dir, settings.cluster_name, settings.redis_url, self.writer
        )
        #: The route the record in STATE_DIR names, once written (None:
        #: not written in this run).
        self._recorded_route: Route | None = None
        self.cluster = cluster = ClusterNode(
            self._redis,
            self.route,
            self.sessions,
            self.instance,
            reactor,
            settings.redis_timeout_seconds,
            self.providers.ids,
            on_token=self._adopted,
            on_up=self._store_up,
            on_rest=self.providers.rest_key,
            on_lock=lambda key, seconds: self.lockout.impose(key, seconds) if self.lockout else None,
            on_foreign_token=self._foreign_token,
            retry_max=settings.redis_reconnect_max_seconds,
            where=masked_url(settings.redis_url),
            on_consumers=self.shared_consumers.missed,
            on_lost=self.shared_consumers.lost,
            on_writable=self.shared_consumers.writable,
            clock=self.cluster_clock,
            cluster_name=settings.cluster_name,
            database=redis_database(settings.redis_url) or 0,
            on_in_step=self._record_membership,
            on_route=lambda route: self._record_membership(),
        )
        self.lockout = SharedLockout(
            # Monotonic, as the standalone one (ControlFactory's): the
            # cluster shares durations, never this clock's times.
            AuthLockout.from_settings(settings, time.monotonic),
            cluster,
            on_locked=lambda key: self.metrics.lockouts.inc(),
            # The control factory, built on this lockout: reached through self.
            on_imposed=lambda key: self.factory.close_locked_out(key),
        )

    def _consumers_identified(self, identity: str, where: str) -> None:
        """
        The consumers' database is known (L{ConsumersService}'s
        C{identified}): in a cluster, its heartbeats carry it, and compare
        it with the other instances'.
        """
        if self.cluster is not None:
            self.cluster.consumers_database = (identity, where)

    def _revoke_unsaved(self, revokes: dict[str, tuple[str, str]]) -> None:
        """
        Key revokes the database did not take (L{ConsumerTable}'s
        C{revoke_unsaved}): in a cluster, L{SharedConsumers.share_revokes}.
        """
        if self.shared_consumers is not None:
            self.shared_consumers.share_revokes(revokes)

    def _revoke_saved(self, hashes: list[str]) -> None:
        """
        The database took those revokes (L{ConsumerTable}'s
        C{revoke_saved}): in a cluster, L{SharedConsumers.revokes_saved}.
        """
        if self.shared_consumers is not None:
            self.shared_consumers.revokes_saved(hashes)

    def _consumer_changed(self, name: str) -> None:
        """
        A command changed consumer C{name} here (L{ConsumerTable}'s
        C{changed}): in a cluster, L{SharedConsumers.publish}.
        """
        if self.shared_consumers is not None:
            self.shared_consumers.publish(name)

    def _consumers_unseeded(self) -> None:
        """
        Redis's spends are not seeded (L{SharedCounters}' C{unseeded}):
        L{SharedConsumers.seed}.
        """
        if self.shared_consumers is not None:
            self.shared_consumers.seed()

    def _consumer_published(self, instance: str, consumer: str) -> None:
        """
        A consumer change an instance published (L{RedisStore}'s
        C{on_consumer}): L{SharedConsumers.received}.
        """
        if self.shared_consumers is not None:
            self.shared_consumers.received(instance, consumer)

    def _share_rest(self, provider_id: str, fingerprint: str, seconds: float, model: str | None) -> None:
        """
        A key rest decided here (for C{model}'s calls; None: all), shared
        with the cluster (L{ClusterNode.rest}).
        """
        if self.cluster is not None:
            self.cluster.rest(rest_subject(provider_id, model), fingerprint, seconds)

    def _foreign_token(self, error: str) -> None:
        """
        The cluster's token, at start-up, is not one this instance can
        trust (L{openclaw.session.UntrustedToken}): refuse to start.
        """
        self._log.critical(
            "the cluster store at {where} holds a session token this instance cannot trust ({error}): "
            "give every instance of cluster {name} the same JWT_SECRET, or a CLUSTER_NAME of its own",
            where=masked_url(self.settings.redis_url or ""),
            error=error,
            name=self.settings.cluster_name,
        )
        self.exit_status = 1
        self._reactor.stop()

    def _consumers_announced(self) -> int:
        shared = self.shared_consumers
        return 0 if shared is None else shared.announced

    def _consumers_unshared(self, since: int) -> str | Deferred[str | None] | None:
        """
        In a cluster whose store is unreachable, what a consumer change
        leaves undone on the other instances (L{SharedConsumers.unshared}).
        """
        shared = self.shared_consumers
        unshared = None if shared is None else shared.unshared(since)
        cluster = self.cluster
        if self.settings.database_url or cluster is None or cluster.instances_seen <= self.settings.workers:
            # Consumers shared, or no instance seen but this gateway's own
            # workers (which share its SQLite file).
            return unshared
        # A cluster without DATABASE_URL: the change is in this instance's
        # SQLite file only (as L{_warn_about_setup} says at start), said with each change.
        local = (
            f"consumers are kept in the SQLite file {sqlite_path(self.settings.state_dir)} (REDIS_URL without "
            "DATABASE_URL): this change holds only on the instances that use that file; set DATABASE_URL to one "
            "PostgreSQL database for every instance to share consumers across the cluster"
        )
        if isinstance(unshared, Deferred):
            return unshared.addCallback(lambda said: local if said is None else f"{local}; {said}")
        return local if unshared is None else f"{local}; {unshared}"

    def instance_status(self) -> dict[str, Any]:
        """
        C{status}'s C{instance}, C{worker} and C{instances_seen}; in a
        cluster, C{cluster_store} (C{up}: reachable, and this instance in
        step with it; else C{down}), C{cluster_store_since} (when it last
        changed), while down, C{cluster_store_error} (why, as logged), and
        C{cluster_name_in_other_databases} (a list of database numbers)
        while instances of the same C{CLUSTER_NAME} listen in other
        databases of the same Redis (L{ClusterNode.other_databases}: another
        cluster, as the log warns).
        """
        fields: dict[str, Any] = {
            "instance": self.instance,
            "worker": self.worker,
            "instances_seen": 1 if self.cluster is None else self.cluster.instances_seen,
        }
        cluster = self.cluster
        if cluster is not None:
            fields["cluster_store"] = "up" if cluster.up else "down"
            fields["cluster_store_since"] = isoformat(cluster.up_since)
            if not cluster.up:
                fields["cluster_store_error"] = cluster.down_reason
            if cluster.other_databases:
                fields["cluster_name_in_other_databases"] = list(cluster.other_databases)
        return fields

    def _adopted(self, token: SessionToken, here: bool, source: str) -> None:
        """
        The cluster's token C{token} is this instance's now: announced (the
        banner, TOKEN_FILE), and, when another instance wrote it (not
        C{here}), logged with C{source}, who did
        (L{openclaw.cluster.records.provenance}).
        """
        if self._waiting_listeners:
            # Announced once listening (L{_synced}): whoever reads the
            # banner can connect at once.
            self._unannounced = token
        else:
            self._announce(token)
        if not here:
            self._log.info(
                "session token {jti} adopted from the cluster ({source})",
                jti=token.jti,
                source=source,
            )

    def _listen(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        listener = ListeningService(endpoint, factory)
        if self.cluster is None:
            listener.setServiceParent(self._serving)
        else:
            # Started once the cluster's token and route are known
            # (L{_synced}).
            self._waiting_listeners.append(listener)

    def _api_connections(self) -> int:
        """
        The open API connections (C{openclaw_api_connections}).
        """
        return 0 if self.api_site is None else len(self.api_site.connections)

    def _store_up(self, up: bool) -> None:
        gauge = self.metrics.cluster_store_up
        assert gauge is not None
        gauge.set(1 if up else 0)
        if self.shared_consumers is not None:
            self.shared_consumers.up(up)
        if up:
            self._synced()

    def _synced(self) -> None:
        """
        The first reload from the store is done: this instance knows the
        cluster's token and route, so it may answer now.  A port that
        cannot be taken now ends the process (as it would at start-up).
        """
        if self._waiting_for_store is not None:
            self._waiting_for_store.stop()
            self._waiting_for_store = None
        listeners, self._waiting_listeners = self._waiting_listeners, []
        try:
            for listener in listeners:
                listener.setServiceParent(self._serving)
        except CannotListen as e:
            # A SystemExit (its one line ends a start-up): here, in a Redis
            # callback, it was lost, and the gateway ran on without it.
            self._log.critical("{line}; the gateway stops", line=str(e))
            # A worker's port taken by another program: its parent knows
            # it by this status (it stops once no worker can listen).
            self.exit_status = PORT_TAKEN_STATUS if isinstance(e, PortTaken) else 1
            self._reactor.stop()
            return
        except Exception:
            self._log.failure("could not listen once in step with the cluster", log_level=LogLevel.critical)
            self.exit_status = 1
            self._reactor.stop()
            return
        if listeners:
            self._log.info(
                "in step with cluster {name}: listening (after {seconds:.1f} s)",
                name=self.settings.cluster_name,
                seconds=self._reactor.seconds() - self._joined_at,
            )
        token, self._unannounced = self._unannounced, None
        if token is not None:
            self._announce(token)

    def _record_membership(self) -> None:
        """
        Record in STATE_DIR that this instance is in step with its cluster,
        and the route it serves (L{Membership.record}), unless that is
        what the record holds: at each return in step and each change of
        the cluster's route, so that a write that failed (a full disk) is
        tried again then.
        """
        route = self.route.current
        if route == self._recorded_route or self.cluster is None or not self.cluster.up:
            # Only once in step: an instance that then refuses the
            # cluster's token has not been.
            return

        def written(recorded: bool) -> None:
            if recorded:
                self._recorded_route = route

        self.membership.record(route).addCallback(written)

    def _still_waiting(self) -> None:
        left = None if self.cluster is None else self.cluster.awaiting_write_back
        if left is not None:
            # Redis answers: the wait is for the instances in step (trial
            # s41: it asked to check that Redis was running).
            self._log.info(
                "not listening yet: waiting for the instances in step to write the cluster's state back into its "
                "store at {where} ({seconds:.0f} s so far, {left:.0f} s more at most)",
                where=masked_url(self.settings.redis_url or ""),
                seconds=self._reactor.seconds() - self._joined_at,
                left=left,
            )
            return
        down = None if self.cluster is None else self.cluster.down_reason
        # Redis answers and refuses (a database it does not have, a wrong
        # password): not a Redis to start (review of the wait's line: it
        # said so under the refusal's own advice).
        refused = down is not None and down.startswith(REDIS_REFUSED)
        self._log.warn(
            "not listening yet: waiting for the cluster store at {where} ({seconds:.0f} s so far); {hint}",
            where=masked_url(self.settings.redis_url or ""),
            seconds=self._reactor.seconds() - self._joined_at,
            hint=(
                "Redis answers but refuses this instance: do what its refusal, logged above, says"
                if refused
                else "check that Redis is running and REDIS_URL is right"
            ),
        )

    def setServiceParent(self, parent: Any) -> None:
        offer_log_observer(parent, self._log_observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        """
        Listen (the listeners bind here, before twistd would drop
        privileges).  A listener that cannot be had (L{CannotListen}) ends
        the process: every lock taken at start-up is released first (their
        files removed: L{HeldLocks}), then L{StartRefused} with the
        listener's line.
        """
        try:
            super().privilegedStartService()
        except CannotListen as e:
            self._held.release()
            raise StartRefused(e.line) from None

    def _name_instance(self) -> None:
        """
        Take this instance's id (L{instance}) again, now: twistd forks to
        daemonize after building the service, so the id taken when it was
        built has the pid of a process that has exited (the pidfile has the
        serving one's).  The fork is in C{setupEnvironment}, which
        C{UnixApplicationRunner.startApplication} calls before
        C{privilegedStartService} and C{startService}
        (twisted/scripts/_twistd_unix.py, Twisted 26.10); it is taken here,
        in C{startService}, which runs with or without twistd (nothing of
        C{privilegedStartService}, the listeners' binding, uses the id).
        """
        self.instance = _instance_id()
        if self.cluster is not None:
            self.cluster.instance = self.instance
            self.controlplane.instance = self.instance
        if self.shared_consumers is not None:
            self.shared_consumers.instance = self.instance

    def _restore_route(self) -> None:
        """
        Make the route the state file holds (L{RouteStore.load}: the last
        C{switch_provider} of an earlier run) the one in force, when it is
        not the configured one (L{restored_route}); a state file that
        cannot be trusted is logged as a warning and ignored.  In a
        cluster, the Redis copy is the cluster's route: only whether this
        instance was in step with the cluster before is read
        (L{Membership.read}).
        """
        if self.cluster is not None:
            recorded = self.membership.read()
            self.cluster.was_in_step = recorded is not None
            self.cluster.remembered_route = None if recorded is None else recorded.route
            return
        restored = self.store.load()
        if restored is not None and restored != self.route.current:
            self.restored_route = restored
            self.route.switch(restored)

    def _restore_revokes(self) -> None:
        """
        Refuse the keys whose revokes an earlier run could not write to
        the database (L{UnsavedRevokesFile.load}), and write them
        (L{ConsumerTable.adopt_revokes}).
        """
        revokes_file = self.consumers.revokes_file
        if revokes_file is not None:
            self.consumers.adopt_revokes(revokes_file.load(), earlier_run=True)

    def startService(self) -> None:
        running_as = self._ids()
        if running_as != self.built_as:
            self._refuse_switched_ids(running_as)
        self._name_instance()
        self._restore_route()
        self._restore_revokes()
        if self.settings.jwt_secret_is_ephemeral:
            self._log.warn(
                "JWT_SECRET is not set: tokens are signed with a random secret made for this process only "
                "(a single gateway issues a new token at every start, whatever the secret); set JWT_SECRET "
                "(32 bytes or more) in production, as a cluster (REDIS_URL) requires"
            )
        for line in self.settings.warnings:
            self._log.warn("{config_warning}", config_warning=line)
        self._warn_about_setup()
        self._check_database_file()
        shared = self.cluster is not None and self._redis is not None
        issued = None
        if not shared:
            # Before anything else starts: a token file that cannot be
            # written stops the gateway with nothing else to take back.
            try:
                issued = self.sessions.issue()
            except TokenFileUnwritable as e:
                self._refuse_token_file(e)
        #: Fires once the consumers are loaded (or the first attempt failed:
        #: L{openclaw.consumers.store.Retrying} goes on trying); set once they start.
        self.consumers_ready: Deferred[None] = self._consumers_service.ready
        if shared:
            assert self.cluster is not None and self._redis is not None
            # The token is the cluster's: issued by the first instance,
            # adopted by the others, announced once known.
            self._log.info(
                "joining cluster {name} as {instance} (worker {worker}); the session token is the cluster's",
                name=self.settings.cluster_name,
                instance=self.instance,
                worker=self.worker,
            )
            self._joined_at = self._reactor.seconds()
            if self._waiting_listeners:
                self._waiting_for_store = LoopingCall(
                    LoggedStep(self._still_waiting, self._log, "the log line of the wait for the cluster store")
                )
                self._waiting_for_store.clock = self._reactor
                self._waiting_for_store.start(WAITING_LOG_SECONDS, now=False)
        else:
            assert issued is not None
            self._announce(issued)
            self._watch_expiry(issued)
        # The locks' holder (HeldLocks: STATE_DIR's lock names this
        # process), the cluster's membership (ClusterService), the
        # consumers (ConsumersService), then the listeners
        # (ServingService).
        super().startService()

    def _refuse_token_file(self, error: TokenFileUnwritable) -> NoReturn:
        """
        The first token could not be written to C{TOKEN_FILE}: a cause the
        start-up checks could not foresee (L{openclaw.tap.makeService}
        refuses, before listening, what they can: another user's file in
        a sticky directory), such as a full disk or an immutable file.
        Refused (L{_refuse}): one critical line, no traceback.

        @raise StartRefused: always.
        """
        euid = os.geteuid()
        self._refuse(
            f"TOKEN_FILE cannot be written ({error.error})",
            "the session token could not be written to TOKEN_FILE {path} ({error}), so the gateway stops: "
            "make it writable by the gateway's user (uid {euid}): remove what is there or chown {euid} it, "
            "free space on its disk, or point TOKEN_FILE at a new path in a directory of the gateway's own "
            "(such as /run/openclaw/token)",
            path=str(self.settings.token_file),
            error=error.error,
            euid=euid,
        )

    def _check_database_file(self) -> None:
        """
        Check (and make, private) the consumers' SQLite file in
        C{STATE_DIR} (L{sqlite_file}; with C{DATABASE_URL}, nothing) before
        the store first uses it.  C{twistd openclaw} refused an unusable
        one already, before daemonizing (L{openclaw.tap.makeService}): one
        made unusable in between (a directory put in its place) is refused
        here as there, in one critical line saying what to do, and the
        start refused (L{_refuse}).

        @raise StartRefused: it cannot be used.
        """
        refusal = unusable_database_file(self.settings)
        if refusal is not None:
            self._refuse("the consumers' database in STATE_DIR cannot be used", "{refusal}", refusal=refusal)

    def _refuse(self, short: str, line: str, **fields: object) -> NoReturn:
        """
        Refuse to start, once daemonized: one critical line (C{line}, a
        L{Logger} format, with C{fields}: what to do), exit status 1
        (L{exit_status}), the locks released (their files removed:
        L{HeldLocks}), nothing started; then L{StartRefused} with
        C{short}, which tells twistd (and, through it, the process that
        started it: twistd shows that process some 65 characters, so
        C{short} names the cause first and points to the log).  The
        listeners, bound already under twistd, close as the process ends.
        """
        self._log.critical(line, **fields)
        self.exit_status = 1
        self._held.release()
        if self._made_database is not None:
            remove_new_database(self._made_database)
        raise StartRefused(f"openclaw: {short}; the log says what to do")

    def _refuse_switched_ids(self, running_as: tuple[int, int]) -> NoReturn:
        """
        Refuse to run as another user or group than the one the service
        was built as: twistd switches to its C{--uid}/C{--gid} between
        L{privilegedStartService} and L{startService}, once the gateway's
        files were checked and made as the user it started as.  One
        critical line, nothing started (no token issued, no database
        opened), and exit status 1 (L{exit_status}, which C{twistd openclaw}
        exits with).

        @raise StartRefused: always.
        """
        (uid, gid), (built_uid, built_gid) = running_as, self.built_as
        self._refuse(
            "twistd's --uid/--gid are not supported",
            "the gateway was set up as uid {built_uid} gid {built_gid} but runs as uid {uid} gid {gid}: {fix}",
            built_uid=built_uid,
            built_gid=built_gid,
            uid=uid,
            gid=gid,
            fix=PRIVILEGE_SWITCH_FIX,
        )

    def _warn_about_setup(self) -> None:
        """
        One warning line for each thing an operator would otherwise find
        out the hard way: a provider calls are meant to go to without a key
        (DEFAULT_PROVIDER, the active one, one named in a FALLBACK list; a
        provider merely not configured is no fault), an API every client
        of which is refused, an active provider that is not DEFAULT_PROVIDER,
        a cluster whose consumers are each instance's own.
        """
        if self.api_site is not None:
            fallback = self.settings.fallback
            meant = {self.settings.default_provider, self.route.current.provider_id}
            meant.update(fallback if isinstance(fallback, tuple) else ())
            for adapter in self.providers:
                missing = adapter.missing_key_warning()
                if missing is not None and adapter.id in meant:
                    # Not "warning=": trial's reporter takes an event with
                    # that field for a Python warning.
                    self._log.warn(
                        "{missing}: calls to {provider} {outcome} until it is set",
                        missing=missing,
                        provider=adapter.id,
                        outcome="are refused with 503 (FALLBACK=off)"
                        if self.settings.fallback == "off"
                        else f"fail over to another provider (FALLBACK) when one can take them, and calls "
                        f"pinned to it ({adapter.id}/...) are refused with 503,",
                    )
            if not self.settings.gateway_api_keys:
                self._log.warn(
                    "GATEWAY_API_KEYS is not set: every /v1 call will be refused with 401 unless it carries "
                    "a consumer's key (openclawctl consumer create NAME makes one); set it to a comma-separated "
                    "list of the keys clients may use"
                )
        wanted = self.settings.max_connections + HANDSHAKE_HEADROOM
        if self.factory.capacity < wanted:
            self._log.warn(
                "control connections are capped at {cap} (of which {per_address} per address unauthenticated), "
                "below MAX_CONNECTIONS={configured} plus {headroom} for handshakes, so that neither listener "
                "can exhaust the process's file descriptors (RLIMIT_NOFILE is {limit}); raise the limit "
                "(LimitNOFILE= in the systemd unit, ulimit -n) to allow more",
                cap=self.factory.capacity,
                per_address=self.factory.budget.per_address,
                configured=self.settings.max_connections,
                headroom=HANDSHAKE_HEADROOM,
                limit=self.descriptors.limit,
            )
        if self.descriptors.pool_per_host and self.descriptors.pool_per_host < self.settings.upstream_pool_size:
            self._log.warn(
                "idle provider connections are capped at {cap} per provider host ({hosts} hosts), below "
                "UPSTREAM_POOL_SIZE={configured}, so that connections kept idle for UPSTREAM_IDLE_SECONDS cannot "
                "exhaust the process's file descriptors (RLIMIT_NOFILE is {limit}); raise the limit "
                "(LimitNOFILE= in the systemd unit, ulimit -n) to keep more",
                cap=self.descriptors.pool_per_host,
                hosts=self.descriptors.pool_hosts,
                configured=self.settings.upstream_pool_size,
                limit=self.descriptors.limit,
            )
        if self.settings.redis_url and not self.settings.database_url and self.worker == 0:
            # The workers of one --workers gateway share STATE_DIR, so its
            # SQLite file (and their consumer changes reach each other
            # through Redis); the first says so for all.
            self._log.warn(
                "REDIS_URL is set without DATABASE_URL: consumers (openclawctl consumer ...) and their usage are "
                "kept in the SQLite file {path}, {sharing}; instances of the cluster that use another file (on "
                "another host, or with another STATE_DIR) have consumers of their own, so a consumer's key works "
                "only on the instances whose file it was created in; if the cluster has such instances and you "
                "use consumers, set DATABASE_URL to one PostgreSQL database for every instance",
                path=str(sqlite_path(self.settings.state_dir)),
                sharing=f"which this gateway's {self.settings.workers} workers share"
                if self.settings.workers > 1
                else "this instance's own",
            )
        if self.restored_route is not None:
            self._log.warn(
                "the active provider is {route}, restored from {path} (the last switch_provider) "
                "rather than DEFAULT_PROVIDER={default}; switch_provider changes it",
                route=f"{self.restored_route.provider_id}/{self.restored_route.model}",
                path=str(self.store.path),
                default=self.settings.default_provider,
            )

    def rotate_token(self) -> SessionToken | Deferred[SessionToken]:
        """
        Replace the session token: every earlier token stops working at once,
        for every connection (in a cluster: on every instance, once written
        to the store; L{StoreUnavailable} when it cannot be).  One at a
        time: while one is under way (its token being written, to the
        store and TOKEN_FILE), another is refused at once.  A cluster's
        token adopted from another instance is never refused: it is the
        cluster's (L{openclaw.cluster.node.ClusterNode}).

        @raise RotationUnderWay: another rotation is under way; nothing
            changed.
        """
        if self._rotating:
            raise RotationUnderWay()
        if self.cluster is not None:
            # Announced when adopted (ClusterNode's on_token).
            rotation = self.cluster.rotate(self.sessions.mint()).addCallback(self._rotated, announce=False)
        else:
            # Its token file written in the writer's thread: answered once
            # written (or refused: the current token stays valid).
            rotation = self.sessions.issue_later().addCallback(self._rotated)
        if rotation.called:
            return rotation
        self._rotating = True

        def over(result: object) -> object:
            self._rotating = False
            return result

        return rotation.addBoth(over)

    def _rotated(self, issued: SessionToken, announce: bool = True) -> SessionToken:
        if announce:
            self._announce(issued)
        self._log.info("session token rotated; new token id {jti}", jti=issued.jti)
        if self.cluster is None:
            self._watch_expiry(issued)
        return issued

    def _watch_expiry(self, issued: SessionToken) -> None:
        """
        A single gateway (no cluster, which renews its token): warn when
        C{issued}, the token in force, expires, as the control plane then
        takes no command until a restart (or, set forward, when the host's
        clock is, where the control plane would shut without a
        word).  Replaces the watch of the token before.  None is armed
        once the stop has begun (a rotation answered during its grace).
        """
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        if self._stopping_at:
            self._expiry = None
            return
        delay = max(0.0, issued.expires_at - self._reactor.seconds())
        self._expiry = self._reactor.callLater(delay, self._token_expired, issued)

    def _token_expired(self, issued: SessionToken) -> None:
        self._expiry = None
        current = self.sessions.current_or_none
        if current is None or current.jti != issued.jti:
            return
        self._log.warn(
            "session token {jti} expired at {expires}: the control plane takes no command until the gateway is "
            "restarted (a single gateway renews nothing); keep it open with rotate_token before the token expires "
            "(openclawctl --token-file ... rotate-token from a timer), or a longer SESSION_TTL_HOURS",
            jti=issued.jti,
            expires=issued.expires,
        )

    def _announce(self, issued: SessionToken) -> None:
        """
        Print C{issued}'s banner (or log it, without the token, for a
        daemon).  A standard output that is gone (a closed pipe, a full
        disk) is logged: the token is in force all the same.
        """
        if self._stdout is not None:
            try:
                self._stdout.write(issued.banner())
                self._stdout.flush()
            except OSError as e:
                self._log.warn(
                    "the banner of session token {jti} could not be printed ({error}): the token is in force; "
                    "read it from TOKEN_FILE, or rotate it where the answer can be read",
                    jti=issued.jti,
                    error=e.strerror or str(e),
                )
                return
            self._log.info("session token {jti} issued, expires {expires}", jti=issued.jti, expires=issued.expires)
        else:
            self._log.info(
                "{banner}",
                banner=issued.banner(token=f"in {self.settings.token_file} (never logged)").rstrip("\n"),
                jti=issued.jti,
                expires=issued.expires,
            )

    @inlineCallbacks
    def stopService(self) -> Any:
        """
        Drop the file writes not begun (L{FileWriter.close}: their commands
        answered what was not saved), stop accepting, let the commands
        and API calls in flight finish (for up to
        C{SHUTDOWN_GRACE_SECONDS}), say goodbye (1001) to every control
        client, close the API's connections, let go of the providers
        (L{ServingService}), write the usage rows still pending and close
        the consumers' database (L{ConsumersService}), leave the cluster
        (L{ClusterService}), then let the write of the state or token
        file under way finish, none taken after (L{FileWriter}), remove
        the token file and let go of the locks of C{TOKEN_FILE}, the ports
        and C{STATE_DIR} (L{HeldLocks}),
        whether or not a stop before failed.  Not started (a refused
        start): its ports' locks let go, nothing more.
        """
        if not self.running:
            self._held.release_ports()
            return
        self._stopping_at = self._reactor.seconds()
        # First: the file writes not begun are dropped (their commands
        # answered what was not saved), none taken after; the one under
        # way is waited for, last (HeldLocks).
        self.writer.close()
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        if self._waiting_for_store is not None:
            self._waiting_for_store.stop()
            self._waiting_for_store = None
        self._waiting_listeners = []
        # Its children one at a time (SequentialMultiService), the last
        # started first: a --workers worker's watch of its parent, the
        # listeners and the calls in flight (ServingService), the
        # consumers' usage rows and database (ConsumersService), the
        # cluster's membership (ClusterService), then the writes of the
        # state and token files under way (none taken after), the token
        # file and the locks (HeldLocks).
        yield super().stopService()


def _instance_id() -> str:
    """
    This process's id in a cluster: C{HOST-PID}, its host name and
    process id (README, "Several instances as one").
    """
    return f"{socket.gethostname()}-{os.getpid()}"
