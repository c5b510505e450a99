"""
Two instances changing one consumer at once, each table over the same
database (real SQLite, real PostgreSQL): an update writes the fields its
command names and those only, checked against the row as the database
holds it, and answers (and keeps) that row, so another instance's change
this one has not heard of yet is kept; a create that loses a race for its
name is answered as a name that exists.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from openclaw.consumers.commands import ConsumerCommands
from openclaw.consumers.model import Consumer, InvalidConsumer, NewKey, creation_time
from openclaw.consumers.prices import PriceTable
from openclaw.consumers.store import ConsumerStore, Snapshot
from openclaw.consumers.table import ConsumerTable
from openclaw.control.commands import CommandError
from tests.postgres_server import postgres_database

EXISTS = "a consumer named 'dup' exists; change it with consumer_update"


class Instance:
    """
    One gateway's consumers: its own store (pool) over the shared
    database, its table and its commands.
    """

    def __init__(self, store: ConsumerStore) -> None:
        self.store = store
        self.table = ConsumerTable(store, PriceTable.with_overrides({}))
        self.handlers = ConsumerCommands(self.table, time.time).handlers()

    def command(self, name: str, data: dict[str, Any]) -> Deferred[Any]:
        """
        The command's answer; a refusal fails with its L{CommandError}.
        """
        return maybeDeferred(self.handlers[name], data)


class ConcurrentChangesTests:
    """
    The same tests against SQLite and PostgreSQL (the subclasses).
    """

    timeout = 60

    def database(self) -> str | None:
        raise NotImplementedError

    @inlineCallbacks
    def instances(self) -> Any:
        """
        Two instances, A and B, over one new database, each with its table
        loaded.
        """
        url = self.database()
        directory = Path(self.mktemp())  # type: ignore[attr-defined]
        directory.mkdir(parents=True)
        made = []
        for _ in range(2):
            store = ConsumerStore.open(url, directory, reactor)
            self.addCleanup(store.close)  # type: ignore[attr-defined]
            yield store.migrate()
            instance = Instance(store)
            yield instance.table.reload()
            made.append(instance)
        return made

    @inlineCallbacks
    def test_updates_of_other_fields_both_kept(self) -> Any:
        """
        The trial's case: A cuts the budget to 0; B, which has not heard of
        it (Redis away), sets rpm from its stale copy (budget 50).  Both
        are kept, in the database and in B's answer and table (B wrote its
        whole copy, budget 50 included: the cut-off was undone).
        """
        a, b = yield self.instances()
        yield a.command("consumer_create", {"name": "lost1", "budget_usd": 50})
        yield b.table.reload()
        cut = yield a.command("consumer_update", {"name": "lost1", "budget_usd": 0})
        self.assertEqual((cut["consumer"]["budget_usd"], cut["consumer"]["rpm"]), (0.0, None))  # type: ignore[attr-defined]
        self.assertEqual(b.table.consumers["lost1"].budget_usd, 50.0)  # type: ignore[attr-defined]
        answer = yield b.command("consumer_update", {"name": "lost1", "rpm": 500})
        merged = (answer["consumer"]["budget_usd"], answer["consumer"]["rpm"])
        self.assertEqual(merged, (0.0, 500))  # type: ignore[attr-defined]
        self.assertEqual((b.table.consumers["lost1"].budget_usd, b.table.consumers["lost1"].rpm), (0.0, 500))  # type: ignore[attr-defined]
        snapshot = yield a.store.load(time.time())
        row = snapshot.consumers["lost1"]
        self.assertEqual((row.budget_usd, row.rpm), (0.0, 500))  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_updates_at_once_both_kept(self) -> Any:
        """
        Updates of rpm on A and tpm on B at the same moment, 8 times: each
        round the database keeps both, and each answer shows its own
        field as asked (the other as the database had it then).
        """
        a, b = yield self.instances()
        yield a.command("consumer_create", {"name": "race"})
        yield b.table.reload()
        for i in range(8):
            results = yield DeferredList(
                [
                    a.command("consumer_update", {"name": "race", "rpm": 100 + i}),
                    b.command("consumer_update", {"name": "race", "tpm": 5000 + i}),
                ],
                consumeErrors=True,
            )
            for ok, answer in results:
                self.assertTrue(ok, answer)  # type: ignore[attr-defined]
            self.assertEqual(results[0][1]["consumer"]["rpm"], 100 + i)  # type: ignore[attr-defined]
            self.assertEqual(results[1][1]["consumer"]["tpm"], 5000 + i)  # type: ignore[attr-defined]
            snapshot = yield a.store.load(time.time())
            row = snapshot.consumers["race"]
            self.assertEqual((row.rpm, row.tpm), (100 + i, 5000 + i))  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_period_checked_against_the_database(self) -> Any:
        """
        A budget_period needs a budget: the one the database has, not the
        one a stale copy shows.  B (stale, budget 50) is refused a period
        for a consumer A removed the budget of, and nothing is written;
        A (stale, no budget) is let set a period for a consumer B gave a
        budget.
        """
        a, b = yield self.instances()
        yield a.command("consumer_create", {"name": "team", "budget_usd": 50})
        yield b.table.reload()
        yield a.command("consumer_update", {"name": "team", "budget_usd": None})
        refused = yield self.assertFailure(  # type: ignore[attr-defined]
            b.command("consumer_update", {"name": "team", "budget_period": "day"}), CommandError
        )
        self.assertIn("budget_period needs budget_usd", str(refused))  # type: ignore[attr-defined]
        snapshot = yield a.store.load(time.time())
        row = snapshot.consumers["team"]
        self.assertEqual((row.budget_usd, row.budget_period), (None, "month"))  # type: ignore[attr-defined]

        yield b.command("consumer_update", {"name": "team", "budget_usd": 7})
        self.assertIsNone(a.table.consumers["team"].budget_usd)  # type: ignore[attr-defined]
        answer = yield a.command("consumer_update", {"name": "team", "budget_period": "day"})
        shown = (answer["consumer"]["budget_usd"], answer["consumer"]["budget_period"])
        self.assertEqual(shown, (7.0, "day"))  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_create_of_a_name_the_database_has(self) -> Any:
        """
        A consumer inserted behind this instance's back (another's create,
        not heard of yet): a create of its name is answered as one of a
        name this table has, the other's row and key are kept, and the
        table is read again, so that it has it.
        """
        a, b = yield self.instances()
        created = yield b.command("consumer_create", {"name": "dup", "rpm": 3})
        self.assertNotIn("dup", a.table.consumers)  # type: ignore[attr-defined]
        refused = yield self.assertFailure(a.command("consumer_create", {"name": "dup"}), CommandError)  # type: ignore[attr-defined]
        self.assertEqual(str(refused), EXISTS)  # type: ignore[attr-defined]
        snapshot = yield a.store.load(time.time())
        self.assertEqual(snapshot.consumers["dup"].rpm, 3)  # type: ignore[attr-defined]
        self.assertEqual(list(snapshot.keys.values()), [("dup", created["key_prefix"])])  # type: ignore[attr-defined]
        for _ in range(100):
            if "dup" in a.table.consumers:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(a.table.consumers["dup"].rpm, 3)  # type: ignore[attr-defined]
        # Now known here: the same answer, without the database.
        refused = yield self.assertFailure(a.command("consumer_create", {"name": "dup"}), CommandError)  # type: ignore[attr-defined]
        self.assertEqual(str(refused), EXISTS)  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_creates_at_once(self) -> Any:
        """
        The same name created on A and B at the same moment: one is made,
        the other answered as a name that exists (not with the database's
        own words for its constraint).
        """
        a, b = yield self.instances()
        results = yield DeferredList(
            [a.command("consumer_create", {"name": "dup"}), b.command("consumer_create", {"name": "dup"})],
            consumeErrors=True,
        )
        made = [answer for ok, answer in results if ok]
        refused = [str(failure.value) for ok, failure in results if not ok]
        self.assertEqual((len(made), refused), (1, [EXISTS]))  # type: ignore[attr-defined]
        snapshot = yield a.store.load(time.time())
        self.assertEqual(list(snapshot.keys.values()), [("dup", made[0]["key_prefix"])])  # type: ignore[attr-defined]


class SQLiteConcurrentChangesTests(ConcurrentChangesTests, TestCase):
    def database(self) -> str | None:
        return None


class PostgresConcurrentChangesTests(ConcurrentChangesTests, TestCase):
    def database(self) -> str | None:
        return postgres_database()

    @inlineCallbacks
    def test_update_waits_for_a_change_under_way(self) -> Any:
        """
        Another session's change of the row not committed yet (its budget
        removed): an update of the period waits for it (the row read
        locked), then checks against the row it committed and refuses;
        read without waiting, the period passed the check on the budget
        about to go, and was written with none.
        """
        url = self.database()
        store = ConsumerStore.open(url, Path("."), reactor)
        self.addCleanup(store.close)
        yield store.migrate()
        team = Consumer("team", budget_usd=50.0, created_at=creation_time(time.time()))
        yield store.create(team, NewKey.make().hash, "first")
        other = psycopg.connect(url)
        self.addCleanup(other.close)
        other.execute("UPDATE consumers SET budget_usd = NULL WHERE name = 'team'")
        updating = store.update(team, {"name": "team", "budget_period": "day"})
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(updating.called)
        yield deferToThread(other.commit)
        failure = yield self.assertFailure(updating, InvalidConsumer)
        self.assertIn("budget_period needs budget_usd", str(failure))
        snapshot = yield store.load(time.time())
        row = snapshot.consumers["team"]
        self.assertEqual((row.budget_usd, row.budget_period), (None, "month"))

    @inlineCallbacks
    def test_create_waits_for_a_create_under_way(self) -> Any:
        """
        A create of a name another session is inserting (not committed
        yet): it waits, then fails as a name that exists, the other's
        row kept.
        """
        url = self.database()
        store = ConsumerStore.open(url, Path("."), reactor)
        self.addCleanup(store.close)
        yield store.migrate()
        instance = Instance(store)
        yield instance.table.reload()
        other = psycopg.connect(url)
        self.addCleanup(other.close)
        other.execute(
            "INSERT INTO consumers (name, budget_period, rpm, models, created_at) VALUES ('dup', 'month', 9, '[]', 1)"
        )
        creating = instance.command("consumer_create", {"name": "dup"})
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(creating.called)
        yield deferToThread(other.commit)
        refused = yield self.assertFailure(creating, CommandError)
        self.assertEqual(str(refused), EXISTS)
        snapshot = yield store.load(time.time())
        self.assertEqual(snapshot.consumers["dup"].rpm, 9)


class _ControlledStore:
    """
    A store whose loads and updates answer when the test says.
    """

    def __init__(self) -> None:
        self.loads: list[Deferred[Snapshot]] = []
        self.updates: list[Deferred[Consumer | None]] = []

    def load(self, now: float) -> Deferred[Snapshot]:
        self.loads.append(Deferred())
        return self.loads[-1]

    def update(self, consumer: Consumer, fields: dict[str, Any]) -> Deferred[Consumer | None]:
        self.updates.append(Deferred())
        return self.updates[-1]


class UpdateDuringReloadTests(TestCase):
    def test_reload_under_way_read_again(self) -> None:
        """
        A reload (another instance's change) read before an update's commit
        and taken after it would put the row as it was back: the table is
        read again after it, and ends with the row as the database has it.
        """
        store = _ControlledStore()
        table = ConsumerTable(store, PriceTable.with_overrides({}), clock=lambda: 1000.0)  # type: ignore[arg-type]
        team = Consumer("team", created_at=1.0)
        table.adopt(Snapshot({"team": team}, {}, {}))
        table.refresh()
        updated = table.update(team, {"name": "team", "rpm": 5})
        changed = Consumer("team", rpm=5, created_at=1.0)
        store.updates[0].callback(changed)
        self.assertEqual(self.successResultOf(updated), changed)
        # The reload's read, from before the update's commit.
        store.loads[0].callback(Snapshot({"team": team}, {}, {}))
        self.assertEqual(len(store.loads), 2)
        store.loads[1].callback(Snapshot({"team": changed}, {}, {}))
        self.assertEqual(table.consumers["team"], changed)

    def test_no_reload_no_read(self) -> None:
        """
        Without a reload meanwhile, an update reads nothing more.
        """
        store = _ControlledStore()
        table = ConsumerTable(store, PriceTable.with_overrides({}), clock=lambda: 1000.0)  # type: ignore[arg-type]
        team = Consumer("team", created_at=1.0)
        table.adopt(Snapshot({"team": team}, {}, {}))
        updated = table.update(team, {"name": "team", "rpm": 5})
        store.updates[0].callback(Consumer("team", rpm=5, created_at=1.0))
        self.assertEqual(self.successResultOf(updated).rpm, 5)
        self.assertEqual(store.loads, [])
