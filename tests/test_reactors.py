"""
The reactor interfaces the gateway's objects are typed by
(L{openclaw.reactors}).
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from openclaw.reactors import gateway_reactor, supervisor_reactor


class ReactorTests(SynchronousTestCase):
    def test_the_real_reactor(self) -> None:
        self.assertIs(gateway_reactor(reactor), reactor)
        self.assertIs(supervisor_reactor(reactor), reactor)

    def test_lacking_named(self) -> None:
        """
        A clock is no reactor: the interfaces it lacks are named.
        """
        with self.assertRaises(TypeError) as caught:
            gateway_reactor(Clock())
        message = str(caught.exception)
        self.assertIn("IReactorCore", message)
        self.assertIn("IReactorThreads", message)
        # What its cluster store's client endpoint asks.
        self.assertIn("IReactorTCP", message)
        self.assertIn("IReactorPluggableNameResolver", message)
        self.assertNotIn("IReactorTime", message)
        with self.assertRaises(TypeError) as caught:
            supervisor_reactor(Clock())
        self.assertIn("IReactorProcess", str(caught.exception))
