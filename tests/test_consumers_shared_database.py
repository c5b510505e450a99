"""
Gateways that must not share a PostgreSQL database (a gateway without
REDIS_URL beside any other, instances of different clusters) are said so
at start, by the one that starts second (consumers trial s45: a key
revoked on a cluster was still served by a gateway outside it on the same
DATABASE_URL, until that one restarted, and nothing said why).
"""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from openclaw.consumers import service as consumers_service
from openclaw.consumers.store import database_identity, gateway_application_name, sharing_conflicts
from tests.postgres_server import postgres_database
from tests.test_consumers import GatewayCase

SHARING = "is used by other gateways as well"


class SharingConflictsTests(SynchronousTestCase):
    def test_rules(self) -> None:
        own = "openclaw standalone host-a:100"
        others = [
            own,
            "openclaw standalone host-a:200",
            "openclaw cluster c1 host-b:7",
            "psql",
            "openclaw standalone host-a:200",
        ]
        self.assertEqual(
            sharing_conflicts(own, others), ["openclaw cluster c1 host-b:7", "openclaw standalone host-a:200"]
        )
        member = "openclaw cluster c1 host-a:100"
        self.assertEqual(
            sharing_conflicts(
                member,
                [member, "openclaw cluster c1 host-b:7", "openclaw cluster c2 host-c:8", "openclaw standalone h:1"],
            ),
            ["openclaw cluster c2 host-c:8", "openclaw standalone h:1"],
        )

    def test_name(self) -> None:
        """
        At most 63 bytes, and what tells the process apart survives whole
        (sharing trial s45: cut at 63 bytes, two long CLUSTER_NAMEs that
        began alike, or two long host names, named both the same): two
        long roles that begin alike differ, and two pools of one role on
        one host and pid (two containers, each with the gateway as pid 1)
        differ too.
        """
        first = gateway_application_name("cluster " + "x" * 100 + "-billing")
        second = gateway_application_name("cluster " + "x" * 100 + "-search")
        for name in (first, second):
            self.assertTrue(name.startswith("openclaw cluster xxx"))
            self.assertLessEqual(len(name.encode()), 63)
        self.assertEqual(sharing_conflicts(first, [second]), [second])
        self.assertNotEqual(gateway_application_name("standalone"), gateway_application_name("standalone"))
        self.assertEqual(
            sharing_conflicts("openclaw standalone h:1/aaaaaa", ["openclaw standalone h:1/bbbbbb"]),
            ["openclaw standalone h:1/bbbbbb"],
        )


class SharedDatabaseTests(GatewayCase):
    def setUp(self) -> None:
        self.database = postgres_database()
        super().setUp()

    def other_gateway(self, role: str) -> None:
        """
        Another gateway's connection to the same database, as it names it.
        """
        assert self.database is not None
        connection = psycopg.connect(self.database, application_name=f"openclaw {role} elsewhere:4242")
        self.addCleanup(connection.close)

    @inlineCallbacks
    def said(self) -> Any:
        for _ in range(40):
            found = [e for e in self.events if SHARING in e.get("log_format", "")]
            if found:
                return found
            yield deferLater(reactor, 0.05, lambda: None)
        return []

    @inlineCallbacks
    def test_standalone_beside_another(self) -> Any:
        self.other_gateway("cluster main")
        yield self.gateway()
        [said] = yield self.said()
        self.assertEqual(said["log_level"], LogLevel.critical)
        line = formatEvent(said)
        self.assertIn("openclaw cluster main elsewhere:4242", line)
        self.assertIn("without REDIS_URL, shares it with no other", line)
        self.assertIn("give each gateway (or each cluster) its own DATABASE_URL", line)

    @inlineCallbacks
    def test_alone(self) -> Any:
        """
        Its own connections, and other programs', are no other gateway's.
        """
        with contextlib.closing(psycopg.connect(str(self.database), application_name="psql")):
            yield self.gateway()
            said = yield self.said()
        self.assertEqual(said, [])

    @inlineCallbacks
    def test_named_by_the_operator(self) -> Any:
        """
        A DATABASE_URL that names its connections is not checked, and an
        info line says so (sharing trial s45: silent).
        """
        self.other_gateway("cluster main")
        self.database = f"{self.database}?application_name=team-a"
        yield self.gateway()
        said = yield self.said()
        self.assertEqual(said, [])
        [skipped] = [e for e in self.events if "is not checked" in e.get("log_format", "")]
        self.assertEqual(skipped["log_level"], LogLevel.info)

    @inlineCallbacks
    def test_first_one_learns_later(self) -> Any:
        """
        The gateway that started first says it too, at its next check
        (every SHARING_CHECK_SECONDS), once per gateway it has not named.
        """
        self.patch(consumers_service, "SHARING_CHECK_SECONDS", 0.1)
        yield self.gateway()
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertEqual([e for e in self.events if SHARING in e.get("log_format", "")], [])
        self.other_gateway("standalone")
        [said] = yield self.said()
        self.assertIn("openclaw standalone elsewhere:4242", formatEvent(said))
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(len([e for e in self.events if SHARING in e.get("log_format", "")]), 1)


class DatabaseIdentityTests(SynchronousTestCase):
    """
    L{ConsumerStore.identity}, on a real PostgreSQL: the same database
    reached by two addresses is one, two databases of one server are two
    (what a cluster's instances compare, trial s46).
    """

    def identity(self, url: str) -> str:
        with contextlib.closing(psycopg.connect(url)) as connection:
            return database_identity(connection.cursor())

    def test_identity(self) -> None:
        first, second = postgres_database(), postgres_database()
        self.assertRegex(self.identity(first), r"^[0-9a-f]{16}$")
        self.assertEqual(self.identity(first), self.identity(first.replace("127.0.0.1", "localhost")))
        self.assertNotEqual(self.identity(first), self.identity(second))
