"""
The gateway's services started and stopped as Twisted runs them: a
listener stopped twice (L{openclaw.service.ListeningService}), children
stopped one at a time (L{openclaw.service.SequentialMultiService}), and the
gateway's children in their order (L{openclaw.service.GatewayService}).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from openclaw.service import (
    ClusterService,
    ConsumersService,
    GatewayService,
    ListeningService,
    SequentialMultiService,
    ServingService,
)
from openclaw.settings import Settings
from tests.support import capture_log_events


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
        from twisted.internet import reactor

        state_dir = Path(self.mktemp())
        state_dir.mkdir()
        service = GatewayService(
            Settings(jwt_secret=b"s" * 32, state_dir=state_dir), reactor, PortEndpoint(SlowClosingPort())
        )
        self.addCleanup(service.consumer_store.close, 5.0)
        children = list(service)
        self.assertEqual([type(child) for child in children], [ConsumersService, ServingService])
        [listener] = list(children[1])
        self.assertIsInstance(listener, ListeningService)
        self.assertFalse(hasattr(service, "consumers_ready"))

    def test_cluster(self) -> None:
        """
        In a cluster the membership comes first (stopped last, once the
        usage rows are written); the listeners wait for the first reload.
        """
        from twisted.internet import reactor

        state_dir = Path(self.mktemp())
        state_dir.mkdir()
        service = GatewayService(
            Settings(jwt_secret=b"s" * 32, state_dir=state_dir, redis_url="redis://127.0.0.1:9/0"),
            reactor,
            PortEndpoint(SlowClosingPort()),
        )
        self.addCleanup(service.consumer_store.close, 5.0)
        children = list(service)
        self.assertEqual([type(child) for child in children], [ClusterService, ConsumersService, ServingService])
        self.assertEqual(list(children[2]), [])
