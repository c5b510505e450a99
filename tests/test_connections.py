"""
The one "fire when the last one goes" (issue #16): L{Outstanding}, and the
L{OpenConnections} built on it.
"""

from __future__ import annotations

import gc
import weakref

from twisted.internet.defer import CancelledError
from twisted.trial.unittest import SynchronousTestCase

from openclaw.connections import OpenConnections, Outstanding


class OutstandingTests(SynchronousTestCase):
    def test_fires_at_once_when_none(self) -> None:
        outstanding = Outstanding()
        self.assertIsNone(self.successResultOf(outstanding.none_left()))
        outstanding.add()
        outstanding.done()
        self.assertIsNone(self.successResultOf(outstanding.none_left()))

    def test_fires_when_last_goes(self) -> None:
        outstanding = Outstanding()
        outstanding.add()
        outstanding.add()
        first, second = outstanding.none_left(), outstanding.none_left()
        outstanding.done()
        self.assertNoResult(first)
        self.assertEqual(len(outstanding), 1)
        outstanding.done()
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))
        self.assertEqual(len(outstanding), 0)

    def test_done_without_add(self) -> None:
        self.assertRaises(ValueError, Outstanding().done)

    def test_cancelled_wait_is_forgotten(self) -> None:
        """
        A cancelled wait fails with L{CancelledError} and is let go at once,
        not kept until the last one goes; the other waits still fire.
        """
        outstanding = Outstanding()
        outstanding.add()
        kept = outstanding.none_left()
        cancelled = outstanding.none_left()
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        gone = weakref.ref(cancelled)
        del cancelled
        gc.collect()
        self.assertIsNone(gone())
        outstanding.done()
        self.assertIsNone(self.successResultOf(kept))


class OpenConnectionsTests(SynchronousTestCase):
    def test_fires_when_last_goes(self) -> None:
        connections: OpenConnections[str] = OpenConnections()
        self.assertIsNone(self.successResultOf(connections.all_closed()))
        connections.add("a")
        connections.add("b")
        connections.add("b")
        first, second = connections.all_closed(), connections.all_closed()
        connections.discard("a")
        connections.discard("a")  # not here any more: nothing happens
        self.assertNoResult(first)
        self.assertEqual((len(connections), list(connections), "b" in connections), (1, ["b"], True))
        connections.discard("b")
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))

    def test_cancelled_wait_is_forgotten(self) -> None:
        """
        Cancelling L{OpenConnections.all_closed} stops the wait and lets
        it go while connections stay open.
        """
        connections: OpenConnections[str] = OpenConnections()
        connections.add("a")
        waiting = connections.all_closed()
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        gone = weakref.ref(waiting)
        del waiting
        gc.collect()
        self.assertIsNone(gone())
        connections.discard("a")
        self.assertEqual(len(connections), 0)
