"""
A Redis that lost the consumers' spends (it came back empty) is seeded,
and later raised, with the costs of the usage rows this instance has not
written yet (trial s27: under load through a Redis restart, 576 calls cost
0.00576 USD and Redis held 0.00574 from then on: the raise set it to the
database's figure, which lacked the last second's rows Redis had counted).
One instance in this process on a real C{redis-server} and SQLite.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from openclaw.consumers.model import Consumer
from openclaw.consumers.prices import PriceTable
from openclaw.consumers.shared import SharedConsumers, SharedCounters
from openclaw.consumers.store import Snapshot
from openclaw.consumers.table import ConsumerTable, Holder
from tests.redis_server import RedisServer
from tests.support import sqlite_store_with
from tests.test_consumers_cluster import RedisScripts, redis_command, redis_get, sleep
from tests.test_consumers_outage import wait_for

MARKER = "openclaw:consumers:seeded:2"
CREATED = 1000.0


class CatchUpTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def instance(self) -> Any:
        """
        One instance's consumer table, counters and cluster sync, its
        consumer C{c} (a budget of 1 USD a month) loaded and seeded in
        Redis; fires with (table, shared, Redis server).
        """
        redis = RedisServer()
        redis.start()
        self.addCleanup(redis.cleanup)
        connection = yield txredisapi.Connection("127.0.0.1", redis.port, reconnect=False)
        self.addCleanup(connection.disconnect)
        scripts = RedisScripts(connection)
        store = yield sqlite_store_with(self, Consumer("c", budget_usd=1.0, created_at=CREATED))
        counters = SharedCounters(scripts, reactor, 5.0)
        table = ConsumerTable(store, PriceTable.with_overrides({}), counters=counters)
        shared = SharedConsumers(table, counters, scripts, "a")
        self.addCleanup(shared.stop)
        yield table.reload()
        shared.up(True)
        yield wait_for(lambda: redis_get(redis.port, MARKER) is not None, 5)
        return table, shared, redis

    def call(self, table: ConsumerTable) -> None:
        """
        One call of consumer C{c} counted (its cost reaches Redis if seeded,
        its row waits for the next write).
        """
        table.account_tokens(Holder("c", "p", CREATED), "kimi", "moonshot-v1-8k", 200, (1000, 1000, 0, 0), 0.1)

    def during_loads(self, table: ConsumerTable, calls: list[Callable[[], None]]) -> list[int]:
        """
        Make each of the database's next loads of the consumers count a
        call first (a call counted while the load reads): the loads taken.
        """
        load = table.store.load
        taken: list[int] = []

        def loading(now: float) -> Deferred[Snapshot]:
            if calls:
                calls.pop(0)()
                taken.append(1)
            return load(now)

        self.patch(table.store, "load", loading)
        return taken

    @inlineCallbacks
    def test_empty_redis_seeded_with_the_rows_not_written(self) -> Any:
        """
        Redis loses its spends (FLUSHALL: a restart, without the
        disconnection); a call counted while the seed reads the database
        reaches neither that read nor Redis (not seeded yet) unless the seed
        adds this instance's unwritten rows; another counted while the
        raise that follows reads is in Redis already, and the raise must
        not take a figure without it.  Redis ends with every call's cost.
        """
        table, shared, redis = yield self.instance()
        self.call(table)
        yield table.flush()
        month = time.strftime("%Y-%m", time.gmtime())
        key = f"openclaw:consumer:c:{CREATED!r}:spend:{month}"
        yield wait_for(lambda: redis_get(redis.port, key) not in (None, b"0"), 5)
        one = float(redis_get(redis.port, key) or 0)
        self.assertGreater(one, 0)

        redis_command(redis.port, "FLUSHALL")
        taken = self.during_loads(table, [lambda: self.call(table), lambda: self.call(table)])
        shared.seed()
        yield wait_for(lambda: redis_get(redis.port, MARKER) is not None, 5)
        self.assertEqual(len(taken), 1)
        self.assertAlmostEqual(float(redis_get(redis.port, key) or 0), 2 * one, places=12)

        shared.reconcile()
        yield wait_for(lambda: len(taken) == 2, 5)
        # The raise's read and script done, the last call's row written.
        yield sleep(0.3)
        yield table.flush()
        self.assertEqual(table.pending_rows(), 0)
        self.assertAlmostEqual(float(redis_get(redis.port, key) or 0), 3 * one, places=12)
        snapshot = yield table.store.load(time.time())
        self.assertAlmostEqual(snapshot.spend[("c", month)], 3 * one, places=12)

    @inlineCallbacks
    def test_raised_with_the_rows_not_written_and_never_twice(self) -> Any:
        """
        Redis lost costs the database has (it stays seeded: counted while
        an instance could not reach it); the raise takes the database's
        figure with the row of a call counted while it reads (in Redis
        already, not in the database).  Raised again, nothing is counted
        twice.
        """
        table, shared, redis = yield self.instance()
        for _ in range(3):
            self.call(table)
        yield table.flush()
        key = f"openclaw:consumer:c:{CREATED!r}:spend:{time.strftime('%Y-%m', time.gmtime())}"
        yield wait_for(lambda: redis_get(redis.port, key) not in (None, b"0"), 5)
        yield sleep(0.2)
        one = float(redis_get(redis.port, key) or 0) / 3
        redis_command(redis.port, "SET", key, "0")
        taken = self.during_loads(table, [lambda: self.call(table)])
        shared.reconcile()
        yield wait_for(lambda: taken, 5)
        yield sleep(0.3)
        self.assertAlmostEqual(float(redis_get(redis.port, key) or 0), 4 * one, places=12)
        taken = self.during_loads(table, [lambda: self.call(table)])
        shared.reconcile()
        yield wait_for(lambda: taken, 5)
        yield sleep(0.3)
        self.assertAlmostEqual(float(redis_get(redis.port, key) or 0), 5 * one, places=12)

    @inlineCallbacks
    def test_cost_refused_by_redis_reaches_its_spend_once_it_takes_writes(self) -> Any:
        """
        Redis refusing writes (out of memory) for less than a heartbeat: a
        call's cost it refused reaches its spend once it takes a count
        again, not at the next reconnection to Redis (which a refusal never
        brings: left s46), so the cluster's budget checks see it.
        """
        table, shared, redis = yield self.instance()
        # The raise that follows the seed, now rather than within 5 s.
        shared.reconcile()
        self.call(table)
        month = time.strftime("%Y-%m", time.gmtime())
        key = f"openclaw:consumer:c:{CREATED!r}:spend:{month}"
        yield wait_for(lambda: redis_get(redis.port, key) not in (None, b"0"), 5)
        one = float(redis_get(redis.port, key) or 0)
        redis_command(redis.port, "CONFIG", "SET", "maxmemory-policy", "noeviction")
        redis_command(redis.port, "CONFIG", "SET", "maxmemory", "1")
        self.addCleanup(redis_command, redis.port, "CONFIG", "SET", "maxmemory", "0")
        self.call(table)
        yield sleep(0.3)
        self.assertAlmostEqual(float(redis_get(redis.port, key) or 0), one, places=12)
        redis_command(redis.port, "CONFIG", "SET", "maxmemory", "0")
        self.call(table)
        yield wait_for(lambda: abs(float(redis_get(redis.port, key) or 0) - 3 * one) < 1e-12, 10)
