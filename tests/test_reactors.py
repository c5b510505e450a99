"""
The reactor interfaces the gateway's objects are typed by
(L{openclaw.reactors}).
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from openclaw.reactors import tap_reactor


class ReactorTests(SynchronousTestCase):
    def test_the_real_reactor(self) -> None:
        self.assertIs(tap_reactor(reactor), reactor)

    def test_lacking_named(self) -> None:
        """
        A clock is no reactor: the interfaces it lacks are named.
        """
        with self.assertRaises(TypeError) as caught:
            tap_reactor(Clock())
        message = str(caught.exception)
        self.assertIn("IReactorCore", message)
        self.assertIn("IReactorThreads", message)
        # What its cluster store's client endpoint asks.
        self.assertIn("IReactorTCP", message)
        self.assertIn("IReactorPluggableNameResolver", message)
        self.assertNotIn("IReactorTime", message)
        # What the supervisor of --workers asks, and a worker's listening.
        self.assertIn("IReactorProcess", message)
        self.assertIn("IReactorSocket", message)
