"""
The consumers' database behind a connection pooler: a real PgBouncer in
transaction mode in front of the test PostgreSQL.  The gateway's default
connection parameters are libpq's client-side ones only: PgBouncer (1.18)
closes a connection whose startup packet carries C{options}
(C{FATAL: unsupported startup parameter: options}), and the consumers
would then never load.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from psycopg.conninfo import conninfo_to_dict
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from openclaw.consumers.store import POSTGRES_DEFAULTS, postgres_conninfo
from tests.pgbouncer_server import INSTALL, PgBouncer, pgbouncer_path
from tests.postgres_server import postgres_database
from tests.test_consumers import GatewayCase
from tests.test_dataplane import HELLO

#: The connection parameters libpq puts in the startup packet it sends to
#: the server (StartupMessage,
#: https://www.postgresql.org/docs/current/protocol-message-formats.html):
#: a pooler decides which it takes.
SERVER_STARTUP_PARAMETERS = {"options", "application_name", "fallback_application_name", "client_encoding"}


class DefaultParametersTests(TestCase):
    def test_no_server_startup_parameter_added(self) -> None:
        """
        postgres_conninfo adds libpq's client-side parameters only; one the
        URL sets itself is kept as it is.
        """
        url = "postgresql://u:p@db.example:6432/openclaw"
        added = set(conninfo_to_dict(postgres_conninfo(url))) - set(conninfo_to_dict(url))
        self.assertEqual(added, set(POSTGRES_DEFAULTS))
        self.assertEqual(added & SERVER_STARTUP_PARAMETERS, set())
        own = conninfo_to_dict(postgres_conninfo(url + "?options=-c%20statement_timeout%3D5000"))
        self.assertEqual(own["options"], "-c statement_timeout=5000")

    def test_defaults_read_only(self) -> None:
        with self.assertRaises(TypeError):
            POSTGRES_DEFAULTS["connect_timeout"] = "1"  # type: ignore[index]


class PgBouncerTests(GatewayCase):
    """
    The gateway with DATABASE_URL naming a PgBouncer in transaction mode.
    """

    timeout = 90

    def setUp(self) -> None:
        if pgbouncer_path() is None:
            raise SkipTest(INSTALL)
        database = postgres_database()
        port = urlsplit(database).port
        assert port is not None
        self.pooler = PgBouncer(port)
        self.pooler.start()
        self.addCleanup(self.pooler.stop)
        self.database = self.pooler.url(database)
        super().setUp()

    @inlineCallbacks
    def test_consumers_load_through_pgbouncer(self) -> Any:
        """
        The consumers load through the pooler; a consumer created and used
        there is loaded again by a second gateway on the same pooler.
        """
        gateway, client = yield self.gateway()
        self.assertTrue(gateway.service.consumers.loaded, self.pooler.said())
        created = yield self.command(gateway, client, "consumer_create", {"name": "pooled"})
        answer = yield deferToThread(
            self.sdk(gateway, created["key"]).chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO
        )
        self.assertEqual(answer.choices[0].message.role, "assistant")

        again, again_client = yield self.gateway()
        self.assertTrue(again.service.consumers.loaded, self.pooler.said())
        listed = yield self.command(again, again_client, "consumer_list")
        self.assertEqual([consumer["name"] for consumer in listed["consumers"]], ["pooled"])
        self.assertNotIn("unsupported startup parameter", self.pooler.said())
