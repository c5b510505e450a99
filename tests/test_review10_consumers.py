"""
Consumers as a fresh operator's review (10) found them: a consumer deleted
and created again under its name starts from nothing (its spend in memory,
in the database and in Redis), the deleted one's usage kept readable under
NAME@CREATED; the openai SDK against a gateway in this process, or two
C{twistd -n openclaw} on one Redis and one PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from tests.postgres_server import postgres_database
from tests.test_consumers import GatewayCase
from tests.test_consumers_cluster import MODEL
from tests.test_dataplane import HELLO

CHEAP = {"name": "cheap", "budget_usd": 0.00001, "budget_period": "day"}


class RecreatedTests(GatewayCase):
    @inlineCallbacks
    def spend_once(self, gateway: Any, client: Any) -> Any:
        created = yield self.command(gateway, client, "consumer_create", CHEAP)
        sdk = self.sdk(gateway, created["key"])
        yield self.call(sdk)
        # One call costs 0.00001 USD on the stand-in: the budget is spent.
        refused = yield self.refused(sdk, MODEL)
        self.assertEqual(refused.code, "insufficient_quota")
        return created

    def call(self, sdk: Any) -> Any:
        return deferToThread(sdk.chat.completions.create, model=MODEL, messages=HELLO)

    @inlineCallbacks
    def test_recreated_consumer_starts_from_nothing(self) -> Any:
        """
        consumer_delete then consumer_create of the same name: the new one
        has spent nothing and its first call is admitted; usage --name
        counts its calls only; the deleted one's are kept under the name
        the delete answered; a restart (spend read from the database)
        counts the new one's spend only.
        """
        state = self.mktemp()
        gateway, client = yield self.gateway(state_dir=self.state(state))
        yield self.spend_once(gateway, client)
        deleted = yield self.command(gateway, client, "consumer_delete", {"name": "cheap"})
        retired = deleted["usage_kept_as"]
        self.assertRegex(retired, r"^cheap@\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        again = yield self.command(gateway, client, "consumer_create", CHEAP)
        self.assertEqual(again["consumer"]["spent_usd"], 0)
        yield self.call(self.sdk(gateway, again["key"]))
        usage = yield self.command(gateway, client, "usage", {"name": "cheap"})
        self.assertEqual((usage["total"]["requests"], usage["total"]["limited"]), (1, 0))
        old = yield self.command(gateway, client, "usage", {"name": retired})
        self.assertEqual((old["total"]["requests"], old["total"]["limited"]), (1, 1))
        grouped = yield self.command(gateway, client, "usage", {"group_by": "consumer"})
        self.assertEqual(sorted(g["consumer"] for g in grouped["groups"]), ["cheap", retired])
        listed = yield self.command(gateway, client, "consumer_list", {"name": "cheap"})
        spent = listed["consumers"][0]["spent_usd"]
        self.assertAlmostEqual(spent, 0.00001, places=12)
        yield gateway.service.stopService()

        # Another gateway on the same database: the spend it reads is the new one's.
        gateway, client = yield self.gateway(state_dir=self.state(state))
        listed = yield self.command(gateway, client, "consumer_list", {"name": "cheap"})
        self.assertAlmostEqual(listed["consumers"][0]["spent_usd"], spent, places=12)
        # Gone altogether: usage --name still answers the deleted ones'.
        yield self.command(gateway, client, "consumer_delete", {"name": "cheap"})
        usage = yield self.command(gateway, client, "usage", {"name": "cheap"})
        self.assertEqual(usage["total"]["requests"], 2)

    def state(self, path: str) -> Any:
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        return directory


class PostgresRecreatedTests(RecreatedTests):
    def setUp(self) -> None:
        self.database = postgres_database()
        super().setUp()
