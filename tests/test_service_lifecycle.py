"""
The gateway's services started and stopped as Twisted runs them: a
listener stopped twice (L{openclaw.service.ListeningService}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from openclaw.service import ListeningService


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
