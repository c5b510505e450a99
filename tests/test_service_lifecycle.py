"""
The gateway's services started and stopped as Twisted runs them: a
listener stopped twice (L{openclaw.service.ListeningService}), children
stopped one at a time (L{openclaw.service.SequentialMultiService}), and the
gateway's children in their order (L{openclaw.service.GatewayService}).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import LogLevel, formatEvent
from twisted.python.components import proxyForInterface
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from openclaw.consumers.service import ConsumersService
from openclaw.reactors import IGatewayReactor
from openclaw.routing import Route
from openclaw.service import (
    ClusterService,
    GatewayService,
    HeldLocks,
    ListeningService,
    SequentialMultiService,
    ServingService,
    StartRefused,
)
from openclaw.session import lock_token_file, token_file_lock_path
from openclaw.settings import Settings
from openclaw.state import STATE_LOCK, RouteStore, lock_state_dir
from tests.support import capture_log_events
from tests.test_startup import StopRecordingReactor


@implementer(IListeningPort)
class SlowClosingPort:
    """
    A listening port whose C{stopListening} fires only when the test says
    (C{closed}), as a real port's fires once its socket is closed.
    """

    def __init__(self) -> None:
        self.stops: list[Deferred[None]] = []

    def startListening(self) -> None:
        pass

    def stopListening(self) -> Deferred[None]:
        closing: Deferred[None] = Deferred()
        self.stops.append(closing)
        return closing

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 18789)


@implementer(IStreamServerEndpoint)
class PortEndpoint:
    """
    An endpoint listening at once on C{port}.
    """

    def __init__(self, port: SlowClosingPort) -> None:
        self.port = port

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        return succeed(self.port)


class ListeningStoppedTwiceTests(SynchronousTestCase):
    """
    A L{ListeningService} stopped again while its port is still closing
    (twistd's shutdown and a watch, or a parent, each stopping it).
    """

    def test_second_stop_waits_for_the_port(self) -> None:
        """
        The second stop fires once the port is closed, with the first's,
        not at once (task s30: it returned before the port was closed).
        """
        port = SlowClosingPort()
        service = ListeningService(PortEndpoint(port), Factory())
        service.startService()
        first = service.stopService()
        second = service.stopService()
        self.assertEqual(len(port.stops), 1)
        self.assertNoResult(first)
        self.assertNoResult(second)
        port.stops[0].callback(None)
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))
        # Closed: a third stop has nothing to wait for.
        self.assertIsNone(self.successResultOf(service.stopService()))

    def test_second_stop_fails_as_the_close(self) -> None:
        """
        A port that fails to close fails the second stop as the first.
        """
        port = SlowClosingPort()
        service = ListeningService(PortEndpoint(port), Factory())
        service.startService()
        first = service.stopService()
        second = service.stopService()
        port.stops[0].errback(OSError(9, "Bad file descriptor"))
        self.failureResultOf(first, OSError)
        self.failureResultOf(second, OSError)

    def test_one_stop_given_up(self) -> None:
        """
        A stop whose caller gives up (cancels its Deferred) ends its own
        wait only: the other stop still waits for the port, and fires once
        it is closed (review s34: each waiter has a Deferred of its own).
        """
        port = SlowClosingPort()
        service = ListeningService(PortEndpoint(port), Factory())
        service.startService()
        first = service.stopService()
        second = service.stopService()
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertNoResult(second)
        port.stops[0].callback(None)
        self.assertIsNone(self.successResultOf(second))

    def test_close_failure_no_stop_waits_for_is_logged(self) -> None:
        """
        A port that fails to close when every stop waiting for it gave up
        (cancelled): its failure is logged, not dropped (review s34).
        """
        port = SlowClosingPort()
        service = ListeningService(PortEndpoint(port), Factory())
        service.startService()
        stop = service.stopService()
        stop.cancel()
        self.failureResultOf(stop, CancelledError)
        port.stops[0].errback(OSError(9, "Bad file descriptor"))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_started_again_while_closing(self) -> None:
        """
        Started again (a watch listening anew) and stopped while the first
        port is closing: each stop waits for the port it stopped.
        """
        port = SlowClosingPort()
        service = ListeningService(PortEndpoint(port), Factory())
        service.startService()
        first = service.stopService()
        service.startService()
        second = service.stopService()
        self.assertEqual(len(port.stops), 2)
        port.stops[1].callback(None)
        self.assertIsNone(self.successResultOf(second))
        self.assertNoResult(first)
        port.stops[0].callback(None)
        self.assertIsNone(self.successResultOf(first))


class Stopping(Service):
    """
    A child recording its stops in C{stops}, each firing when the test
    says (C{stopped}), or failing with C{error}.
    """

    def __init__(self, name: str, stops: list[str], error: Exception | None = None) -> None:
        self.label = name
        self.stops = stops
        self.error = error
        self.stopped: Deferred[None] = Deferred()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.stops.append(self.label)
        if self.error is not None:
            raise self.error
        return self.stopped


class SequentialStopTests(SynchronousTestCase):
    """
    L{SequentialMultiService} stops its children one at a time, the last
    added first, each waited for.
    """

    def test_one_at_a_time(self) -> None:
        stops: list[str] = []
        parent = SequentialMultiService()
        first, second = Stopping("first", stops), Stopping("second", stops)
        first.setServiceParent(parent)
        second.setServiceParent(parent)
        parent.startService()
        stopped = parent.stopService()
        self.assertEqual(stops, ["second"])
        self.assertFalse(parent.running)
        second.stopped.callback(None)
        self.assertEqual(stops, ["second", "first"])
        self.assertNoResult(stopped)
        first.stopped.callback(None)
        self.successResultOf(stopped)

    def test_failed_stop_logged_and_next_stopped(self) -> None:
        """
        A child whose stop fails is logged (critical, with its traceback),
        and the children before it are stopped all the same.
        """
        stops: list[str] = []
        parent = SequentialMultiService()
        first = Stopping("first", stops)
        first.setServiceParent(parent)
        Stopping("second", stops, error=RuntimeError("broken")).setServiceParent(parent)
        parent.startService()
        events = capture_log_events(self)
        stopped = parent.stopService()
        self.assertEqual(stops, ["second", "first"])
        first.stopped.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        [said] = [event for event in events if "log_failure" in event]
        self.assertIn("could not stop", said["log_format"])


class GatewayChildrenTests(TestCase):
    """
    The gateway's children, in the order they start (and the reverse of
    the order they stop).
    """

    def test_standalone(self) -> None:
        state_dir = Path(self.mktemp())
        state_dir.mkdir()
        service = GatewayService(
            Settings(jwt_secret=b"s" * 32, state_dir=state_dir), reactor, PortEndpoint(SlowClosingPort())
        )
        self.addCleanup(service.consumer_store.close, 5.0)
        children = list(service)
        self.assertEqual([type(child) for child in children], [HeldLocks, ConsumersService, ServingService])
        [listener] = list(children[2])
        self.assertIsInstance(listener, ListeningService)
        self.assertFalse(hasattr(service, "consumers_ready"))

    def test_cluster(self) -> None:
        """
        In a cluster the membership comes first but for the locks (stopped
        last but for them, once the usage rows are written); the listeners
        wait for the first reload.
        """
        state_dir = Path(self.mktemp())
        state_dir.mkdir()
        service = GatewayService(
            Settings(jwt_secret=b"s" * 32, state_dir=state_dir, redis_url="redis://127.0.0.1:9/0"),
            reactor,
            PortEndpoint(SlowClosingPort()),
        )
        self.addCleanup(service.consumer_store.close, 5.0)
        children = list(service)
        self.assertEqual(
            [type(child) for child in children], [HeldLocks, ClusterService, ConsumersService, ServingService]
        )
        self.assertEqual(list(children[3]), [])


class NothingDoneWhenBuiltTests(TestCase):
    """
    Building the gateway's service reads, opens and makes nothing (task
    s30: its constructor read the state file and made the consumers'
    database): that is done when it starts.
    """

    def build(self, state_dir: Path, gateway_reactor: Any = None, **settings: Any) -> GatewayService:
        service = GatewayService(
            Settings(jwt_secret=b"s" * 32, jwt_secret_is_ephemeral=False, state_dir=state_dir, **settings),
            gateway_reactor or reactor,
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
            stdout=io.StringIO(),
        )
        self.addCleanup(service.consumer_store.close, 5.0)
        return service

    def test_nothing_made(self) -> None:
        """
        Built, the service has made nothing in STATE_DIR (the consumers'
        database is made at start).
        """
        state_dir = Path(self.mktemp())
        state_dir.mkdir()
        self.build(state_dir)
        self.assertEqual(list(state_dir.iterdir()), [])

    def test_state_file_read_at_start(self) -> None:
        """
        The route a state file holds is in force once started, not before.
        """
        state_dir = Path(self.mktemp())
        state_dir.mkdir()
        RouteStore(state_dir, ("kimi", "gemini")).save(Route("kimi", "moonshot-v1-32k"))
        service = self.build(state_dir, default_provider="gemini")
        self.assertEqual(service.route.current.provider_id, "gemini")
        self.assertIsNone(service.restored_route)
        self.assertFalse((state_dir / "openclaw.db").exists())
        events = capture_log_events(self)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(service.route.current, Route("kimi", "moonshot-v1-32k"))
        self.assertEqual(service.restored_route, Route("kimi", "moonshot-v1-32k"))
        self.assertTrue((state_dir / "openclaw.db").exists())
        warnings = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
        self.assertIn("the active provider is kimi/moonshot-v1-32k, restored from", warnings[-1])

    def test_unusable_database_file_refused_at_start(self) -> None:
        """
        A consumers' database made unusable after the tap checked it (a
        directory in its place): one critical line saying what to do, exit
        status 1, L{StartRefused}, and nothing started (no token).
        """
        state_dir = Path(self.mktemp())
        state_dir.mkdir()
        stops: list[None] = []
        service = self.build(state_dir, StopRecordingReactor(reactor, stops), token_file=state_dir / "token")
        (state_dir / "openclaw.db").mkdir()
        events = capture_log_events(self)
        self.assertRaises(StartRefused, service.startService)
        self.addCleanup(service.stopService)
        [critical] = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.critical]
        self.assertIn(f"STATE_DIR (--state-dir)={str(state_dir)!r}: the consumers' database", critical)
        self.assertIn("a directory is in the way", critical)
        self.assertIn("or point STATE_DIR / --state-dir at another directory", critical)
        self.assertEqual(service.exit_status, 1)
        self.assertEqual(stops, [])
        self.assertIsNone(service.sessions.current_or_none)
        self.assertFalse((state_dir / "token").exists())
        self.assertFalse(service.running)


class TriggerRecordingReactor(proxyForInterface(IGatewayReactor)):  # type: ignore[misc]
    """
    The reactor, recording what it is asked to call once running
    (C{callWhenRunning}) and at its events (C{addSystemEventTrigger}):
    C{pending} holds the triggers added and not removed yet (handle and
    callable), C{asked} every callable given.  C{running=False}: a reactor not running yet
    (twistd's, when the services start), whose C{callWhenRunning} calls
    nothing, a trigger L{removeSystemEventTrigger} takes back.
    """

    def __init__(self, original: IGatewayReactor, running: bool = True) -> None:
        super().__init__(original)
        self.running = running
        self.asked: list[Callable[..., Any]] = []
        self.pending: list[tuple[object, Callable[..., Any]]] = []
        #: The handles of C{callWhenRunning}'s calls kept here (not running).
        self.unsent: list[object] = []

    def callWhenRunning(self, callable: Callable[..., Any], *args: Any, **kwargs: Any) -> object:
        self.asked.append(callable)
        if self.running:
            self.original.callWhenRunning(callable, *args, **kwargs)
            return None
        handle = object()
        self.pending.append((handle, callable))
        self.unsent.append(handle)
        return handle

    def addSystemEventTrigger(
        self, phase: str, eventType: str, callable: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> object:
        self.asked.append(callable)
        handle = self.original.addSystemEventTrigger(phase, eventType, callable, *args, **kwargs)
        self.pending.append((handle, callable))
        return handle

    def removeSystemEventTrigger(self, triggerID: object) -> None:
        self.pending = [(handle, callable) for handle, callable in self.pending if handle is not triggerID]
        if not any(handle is triggerID for handle in self.unsent):
            self.original.removeSystemEventTrigger(triggerID)


def pool_threads() -> set[threading.Thread]:
    """
    The threads of adbapi's pools alive now (Twisted's ThreadPool names
    them C{PoolThread-...}).
    """
    return {thread for thread in threading.enumerate() if thread.name.startswith("PoolThread-")}


class ConsumersPoolLifeTests(TestCase):
    """
    The consumers' pool of connections (adbapi's C{ConnectionPool}) is made
    when the consumers start (L{ConsumersService}), and closed when they
    stop: building the gateway asks nothing of the reactor for it and
    starts none of its threads (task s31: its constructor made the pool,
    whose threads then started with the reactor, started or not).
    """

    def build(self, gateway_reactor: TriggerRecordingReactor) -> GatewayService:
        state_dir = Path(self.mktemp())
        state_dir.mkdir()
        service = GatewayService(
            Settings(jwt_secret=b"s" * 32, jwt_secret_is_ephemeral=False, state_dir=state_dir),
            gateway_reactor,
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
            stdout=io.StringIO(),
        )
        self.addCleanup(service.consumer_store.close, 5.0)
        return service

    def test_built_never_started(self) -> None:
        """
        Built and never started, the gateway has no thread of the pool,
        and has asked the reactor for no trigger (nothing to start once
        it runs, nothing to close at its shutdown).
        """
        before = pool_threads()
        recording = TriggerRecordingReactor(reactor)
        self.build(recording)
        self.assertEqual(pool_threads() - before, set())
        self.assertEqual(recording.asked, [])
        self.assertEqual(recording.pending, [])

    async def test_pool_lives_with_the_consumers(self) -> None:
        """
        Started, the pool's thread runs (a daemon thread) and its shutdown
        trigger is set; stopped, the thread is gone and every trigger
        taken back.
        """
        before = pool_threads()
        recording = TriggerRecordingReactor(reactor)
        service = self.build(recording)
        service.startService()
        started = pool_threads() - before
        self.assertEqual(len(started), 1)
        # Made once the reactor runs: a daemon thread all the same (one
        # blocked in the database must not keep the process alive).
        self.assertTrue(all(thread.daemon for thread in started))
        self.assertNotEqual(recording.pending, [])
        await service.stopService()
        self.assertEqual([thread for thread in started if thread.is_alive()], [])
        self.assertEqual(recording.pending, [])

    async def test_started_before_the_reactor_runs(self) -> None:
        """
        Started before the reactor runs (twistd starts its services, then
        runs the reactor) and stopped before it does: the pool's start
        once running is taken back, and no thread was started.
        """
        before = pool_threads()
        recording = TriggerRecordingReactor(reactor, running=False)
        service = self.build(recording)
        service.startService()
        self.assertEqual(pool_threads() - before, set())
        self.assertEqual(len(recording.pending), 1)
        await service.stopService()
        self.assertEqual(recording.pending, [])
        self.assertEqual(pool_threads() - before, set())


class Broken(Service):
    """
    A child whose stop fails with C{RuntimeError}, having recorded in
    C{seen} what C{present} said then.
    """

    def __init__(self, present: Callable[[], object]) -> None:
        self.present = present
        self.seen: list[object] = []

    def stopService(self) -> None:
        super().stopService()
        self.seen.append(self.present())
        raise RuntimeError("broken")


class HeldLocksTests(TestCase):
    """
    The token file and the locks of C{STATE_DIR}, C{TOKEN_FILE} and the
    ports are the gateway's first child's (L{HeldLocks}): let go last,
    once every other child has stopped, whether or not their stops (or the
    token file's removal) failed (task s31: the gateway let go of them
    itself, after its children, and not at all when the token file's
    removal failed).
    """

    def build(self) -> tuple[GatewayService, Path]:
        state_dir = Path(self.mktemp())
        state_dir.mkdir()
        token_file = state_dir / "token"
        service = GatewayService(
            Settings(jwt_secret=b"s" * 32, jwt_secret_is_ephemeral=False, state_dir=state_dir, token_file=token_file),
            reactor,
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
            stdout=io.StringIO(),
            state_lock=lock_state_dir(state_dir),
            token_lock=lock_token_file(token_file),
        )
        return service, state_dir

    @staticmethod
    def held(state_dir: Path) -> list[bool]:
        """
        Whether the token file, its lock file and C{STATE_DIR}'s are there.
        """
        token_file = state_dir / "token"
        return [path.exists() for path in (token_file, token_file_lock_path(token_file), state_dir / STATE_LOCK)]

    async def test_let_go_last_after_a_failed_stop(self) -> None:
        """
        A child whose stop fails (stopped first here, the last added): the
        files are still there while it stops, and gone once the gateway
        has stopped; C{STATE_DIR} may be taken again.
        """
        service, state_dir = self.build()
        broken = Broken(lambda: self.held(state_dir))
        broken.setServiceParent(service)
        service.startService()
        self.assertEqual(self.held(state_dir), [True, True, True])
        await service.stopService()
        self.assertEqual(broken.seen, [[True, True, True]])
        self.assertEqual(self.held(state_dir), [False, False, False])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        lock_state_dir(state_dir).release()

    async def test_locks_let_go_when_the_token_file_removal_fails(self) -> None:
        """
        A fault removing the token file is logged (critical, the gateway's
        stop does not fail), and the locks are let go all the same.
        """
        service, state_dir = self.build()
        service.startService()

        def broken() -> None:
            raise RuntimeError("broken")

        service.sessions.discard_token_file = broken  # type: ignore[method-assign]
        events = capture_log_events(self)
        await service.stopService()
        self.assertEqual(self.held(state_dir), [True, False, False])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        [said] = [event for event in events if "log_failure" in event]
        self.assertEqual(said["log_level"], LogLevel.critical)
        lock_state_dir(state_dir).release()
