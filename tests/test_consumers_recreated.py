"""
A consumer deleted and created again under its name starts from nothing
(its spend in memory and in the database), the deleted one's usage kept
readable under NAME@CREATED: usage rows and spend follow the consumer's
identity (its name and creation), not its bare name, also for rows
written late by another instance; a create of the name while its delete
waits is refused saying to retry.  The openai SDK against a gateway in
this process, and the consumer store on real SQLite and real PostgreSQL.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from openclaw.consumers.model import Consumer, NewKey, retired_name
from openclaw.consumers.store import ConsumerStore, UsageRow, postgres_conninfo
from tests.postgres_server import postgres_database
from tests.support import open_client
from tests.test_consumers import GatewayCase
from tests.test_consumers_cluster import MODEL, sleep
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


def legacy_spend(store: ConsumerStore, consumer: str, usd: float) -> Deferred[Any]:
    """
    A C{total} spend row an earlier version of the gateway left in the
    database (written apart from its usage rows): the store itself no
    longer writes spend but with the rows that make it.
    """
    assert "'" not in consumer
    return store.pool.runOperation(f"INSERT INTO spend (consumer, period, usd) VALUES ('{consumer}', 'total', {usd!r})")


def usage_row(consumer: Consumer, cost: float | None, now: float, created_at: float | None = 0.0) -> UsageRow:
    """
    One call of C{consumer} as an instance's table writes it (carrying
    which consumer of that name made it), C{cost} USD.
    """
    return UsageRow(
        now,
        consumer.name,
        "AbCdEf12",
        "kimi",
        "moonshot-v1-8k",
        200,
        10,
        5,
        0,
        cost,
        created_at=consumer.created_at if created_at == 0.0 else created_at,
    )


class IdentityStoreTests:
    """
    Usage rows and spend follow the consumer's identity (its name and
    creation), not its bare name: real SQLite, real PostgreSQL.
    """

    timeout = 60

    def open_store(self) -> ConsumerStore:
        raise NotImplementedError

    @inlineCallbacks
    def test_late_rows_of_a_deleted_consumer(self) -> Any:
        """
        Rows of a deleted consumer written after its delete (another
        instance's flush) go under NAME@CREATED and add no spend, even
        once a consumer of that name exists again; a spend of the name
        left by a late write is cleared by the create.
        """
        store = self.open_store()
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        yield store.migrate()
        now = time.time()
        old = Consumer("team", created_at=now - 100)
        key = NewKey.make()
        yield store.create(old, key.hash, key.prefix)
        yield store.record([usage_row(old, 0.5, now)])
        yield store.delete("team", retired_name(old))
        # Late, before any consumer of the name exists again.
        yield store.record([usage_row(old, 0.25, now)])
        snapshot = yield store.load(now)
        self.assertEqual(snapshot.spend, {})  # type: ignore[attr-defined]
        # What an older gateway's late write left: cleared by the create.
        yield legacy_spend(store, "team", 1.0)
        new = Consumer("team", created_at=now)
        again = NewKey.make()
        yield store.create(new, again.hash, again.prefix)
        yield store.record([usage_row(old, 0.125, now), usage_row(new, 0.0625, now)])
        snapshot = yield store.load(now)
        self.assertEqual(  # type: ignore[attr-defined]
            {key: round(usd, 10) for key, usd in snapshot.spend.items() if key[1] == "total"},
            {("team", "total"): 0.0625},
        )
        [current] = yield store.usage("team", None, None, None)
        self.assertEqual((current["requests"], current["cost_usd"]), (1, 0.0625))  # type: ignore[attr-defined]
        [kept] = yield store.usage(retired_name(old), None, None, None)
        self.assertEqual((kept["requests"], kept["cost_usd"]), (3, 0.875))  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_retired_rows_add_no_spend(self) -> Any:
        """
        Rows already under NAME@CREATED (renamed before their flush, or a
        call of a consumer deleted while it ran) add no spend; spends left
        under such names (an earlier version's) are not loaded, and the
        purge removes them.
        """
        store = self.open_store()
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        yield store.migrate()
        now = time.time()
        old = Consumer("team", created_at=now - 100)
        retired = retired_name(old)
        yield store.record([usage_row(Consumer(retired), 0.5, now, created_at=None)])
        [kept] = yield store.usage(retired, None, None, None)
        self.assertEqual((kept["requests"], kept["cost_usd"]), (1, 0.5))  # type: ignore[attr-defined]
        count = yield store.pool.runQuery("SELECT COUNT(*) FROM spend")
        self.assertEqual(count[0][0], 0)  # type: ignore[attr-defined]
        yield legacy_spend(store, retired, 0.5)
        snapshot = yield store.load(now)
        self.assertEqual(snapshot.spend, {})  # type: ignore[attr-defined]
        yield store.purge(now - 86400)
        count = yield store.pool.runQuery("SELECT COUNT(*) FROM spend")
        self.assertEqual(count[0][0], 0)  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_usage_of_a_deleted_name(self) -> Any:
        """
        usage of a name no consumer has counts NAME and NAME@CREATED rows,
        not those of other names sharing its start (team.x, team-1, team0).
        """
        store = self.open_store()
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        yield store.migrate()
        now = time.time()
        names = ("team", "team@2026-11-01T00:00:00Z", "team.x", "team-1", "team0", "teamA", "tea")
        yield store.record([usage_row(Consumer(name), 0.5, now, created_at=None) for name in names])
        [total] = yield store.usage("team", None, None, None, retired=True)
        self.assertEqual(total["requests"], 2)  # type: ignore[attr-defined]


class SQLiteIdentityStoreTests(IdentityStoreTests, TestCase):
    def open_store(self) -> ConsumerStore:
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        return ConsumerStore.open(None, directory, reactor)

    @inlineCallbacks
    def test_usage_of_a_deleted_name_uses_the_index(self) -> Any:
        """
        The query usage runs for a deleted name reads the (consumer, ts)
        index, not every row.
        """
        store = self.open_store()
        self.addCleanup(store.close)
        yield store.migrate()
        statements: list[str] = []
        # One connection (SQLite's pool has one): the trace sees usage's query.
        yield store.pool.runWithConnection(lambda connection: connection.set_trace_callback(statements.append))
        yield store.usage("team", None, None, None, retired=True)
        [query] = [s for s in statements if "FROM usage_rows" in s]
        plan = yield store.pool.runQuery("EXPLAIN QUERY PLAN " + query)
        details = " ".join(str(row[-1]) for row in plan)
        self.assertIn("INDEX usage_rows_consumer_ts", details)
        self.assertNotIn("SCAN usage_rows", details)


class PostgresIdentityStoreTests(IdentityStoreTests, TestCase):
    def setUp(self) -> None:
        self.database = postgres_database()

    def open_store(self) -> ConsumerStore:
        return ConsumerStore.open(self.database, Path("."), reactor)

    @inlineCallbacks
    def test_identity_survives_short_floats(self) -> Any:
        """
        A database that prints floats to 15 significant digits
        (C{extra_float_digits = 0}: a role's or a database's setting, the
        default before PostgreSQL 12) still names the consumer just
        created: its rows go under its name, with their spend, not under
        NAME@CREATED.
        """
        conninfo = postgres_conninfo(self.database)

        def short_floats() -> None:
            with psycopg.connect(conninfo, autocommit=True) as connection:
                name = connection.execute("SELECT current_database()").fetchone()
                assert name is not None
                connection.execute(f'ALTER DATABASE "{name[0]}" SET extra_float_digits = 0')

        yield deferToThread(short_floats)
        store = self.open_store()
        self.addCleanup(store.close)
        yield store.migrate()
        now = time.time()
        team = Consumer("team", budget_usd=1.0, created_at=now)
        key = NewKey.make()
        yield store.create(team, key.hash, key.prefix)
        yield store.record([usage_row(team, 0.5, now, team.created_at)])
        snapshot = yield store.load(now)
        self.assertEqual(snapshot.consumers["team"].created_at, team.created_at)
        self.assertEqual(snapshot.spend.get(("team", "total")), 0.5)
        rows = yield store.usage(None, None, None, "consumer")
        self.assertEqual([row["consumer"] for row in rows], ["team"])

    @inlineCallbacks
    def test_flush_overlapping_the_delete(self) -> Any:
        """
        Instance A's flush is under way (its transaction open, waiting on
        a spend row another transaction holds) when instance B deletes
        the consumer: B's delete waits for A's flush, then renames its
        rows and removes its spend; nothing is left under the bare name.
        """
        flushing_store, deleting_store = self.open_store(), self.open_store()
        for store in (flushing_store, deleting_store):
            self.addCleanup(store.close)
        yield flushing_store.migrate()
        now = time.time()
        old = Consumer("team", created_at=now - 100)
        key = NewKey.make()
        yield flushing_store.create(old, key.hash, key.prefix)
        holder = yield deferToThread(psycopg.connect, postgres_conninfo(self.database))
        self.addCleanup(deferToThread, holder.close)
        yield deferToThread(holder.execute, "INSERT INTO spend (consumer, period, usd) VALUES ('team', 'total', 0)")
        flushing = flushing_store.record([usage_row(old, 0.5, now)])
        yield sleep(0.5)
        deleting = deleting_store.delete("team", retired_name(old))
        yield sleep(0.5)
        yield deferToThread(holder.rollback)
        yield flushing
        yield deleting
        snapshot = yield flushing_store.load(now)
        self.assertEqual(snapshot.spend, {})
        [current] = yield flushing_store.usage("team", None, None, None)
        self.assertEqual(current["requests"], 0)
        [kept] = yield flushing_store.usage(retired_name(old), None, None, None)
        self.assertEqual(kept["requests"], 1)


class DeletingTests(GatewayCase):
    @inlineCallbacks
    def test_create_while_the_delete_waits(self) -> Any:
        """
        consumer_delete waits for a write of usage rows under way (held
        here by another writer on the SQLite file); a consumer_create of
        the name meanwhile is refused saying to retry (not the database's
        UNIQUE constraint), and works once the delete is written.
        """
        from tests.test_ctl import run_ctl

        state = Path(self.mktemp())
        state.mkdir(parents=True)
        gateway, client = yield self.gateway(state_dir=state)
        created = yield self.command(gateway, client, "consumer_create", {"name": "team"})
        yield deferToThread(self.sdk(gateway, created["key"]).chat.completions.create, model=MODEL, messages=HELLO)
        ctl = ("--url", f"ws://127.0.0.1:{gateway.port}", "--token", gateway.token)
        blocker = sqlite3.connect(str(state / "openclaw.db"), isolation_level=None)
        self.addCleanup(blocker.close)
        blocker.execute("BEGIN IMMEDIATE")
        # The flush (every second) starts, and waits for the blocker.
        yield sleep(1.5)
        deleting = client.command(gateway.token, "consumer_delete", {"name": "team"})
        yield sleep(0.2)
        # Asked in-process (on a connection of its own: one connection's
        # answers come in order), then the blocker let go at once: an
        # openclawctl started here took over a second to send it on a
        # loaded machine, when the blocker was let go after a fixed second
        # (CI, s29).
        other = yield open_client(self, gateway.port)
        refused = yield other.command(gateway.token, "consumer_create", {"name": "team"})
        blocker.execute("ROLLBACK")
        self.assertFalse(refused["ok"], refused)
        self.assertIn("consumer 'team' is being deleted; retry in a moment", refused["error"])
        deleted = yield deleting
        self.assertTrue(deleted["ok"], deleted)
        out, err, code = yield run_ctl(*ctl, "consumer", "create", "team")
        self.assertEqual(code, 0, err)
