"""
L{ClusterNode.stop} leaves nothing pending on the clock (the heartbeat,
the reload's back-off retry, a catch-up a heartbeat scheduled): nothing
runs against a closed store.  A node on a L{MemoryStore} and a L{Clock}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from openclaw.cluster import ClusterNode, MemoryStore
from openclaw.cluster.records import encode_route
from openclaw.routing import ActiveRoute, Route
from openclaw.session import SessionAuthority


class ClusterNodeStopTests(TestCase):
    def test_stop_leaves_nothing_pending(self) -> None:
        """
        A stop cancels the heartbeat, the reload's back-off retry and the
        catch-up a heartbeat scheduled: nothing runs against a closed store.
        """
        clock = Clock()
        clock.advance(1_800_000_000)
        store = MemoryStore(clock.seconds)
        node = ClusterNode(
            store,
            ActiveRoute(Route("gemini", "g-1")),
            SessionAuthority(b"0123456789abcdef0123456789abcdef", 3600, clock=clock.seconds),
            "a",
            clock,
            1.0,
            ("gemini", "kimi"),
        )
        node.connected()
        node.start()
        self.assertTrue(node.up)
        # A change this node missed (its publication lost): the next beat
        # schedules a second look.
        store.write("route", encode_route(Route("kimi", "k-1")), "b", "receipt-1", 0)
        node.beat()
        # Then the store goes away and a reload fails: a retry is due.
        store.up = False
        node.connected()
        self.assertGreaterEqual(len(clock.getDelayedCalls()), 3)
        node.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
