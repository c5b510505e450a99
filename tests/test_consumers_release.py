"""
C{consumer_release} (C{openclawctl consumer release NAME}): the operator
releases the reservations of a consumer's calls in flight, a crashed
instance's in a cluster (they held its budget and C{tpm} until they
lapsed, and README told the operator to delete Redis keys by hand),
audited and counted like the other consumer commands, answering what it
released.  A gateway in this process for the command's path; counters on
a real C{redis-server} for the cluster's.
"""

from __future__ import annotations

import time
from typing import Any

import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase

from openclaw import ctl
from openclaw.consumers.commands import ConsumerCommands
from openclaw.consumers.model import Consumer
from openclaw.consumers.prices import PriceTable
from openclaw.consumers.shared import SharedCounters
from openclaw.consumers.table import ConsumerTable, Holder
from openclaw.control.commands import CommandError
from openclaw.dataplane.errors import APIError
from tests.redis_server import RedisServer
from tests.support import sqlite_store_with
from tests.test_consumers import GatewayCase
from tests.test_consumers_cluster import RedisScripts, redis_command, redis_keys

CREATED = 1000.0


class ReleaseOnAGatewayTests(GatewayCase):
    @inlineCallbacks
    def test_releases_what_calls_in_flight_hold(self) -> Any:
        """
        A single gateway: a call in flight holds 900 tokens of a tpm of 900 and
        0.5 USD of a budget, so the next call is refused.  consumer_release
        answers what it released, the list shows nothing held and the
        next call is admitted; the call, when it ends, is counted as any
        other (its tokens in the window) and releases nothing more.  The
        command is audited (with what it released) and counted.
        """
        gateway, client = yield self.gateway()
        yield self.command(
            gateway, client, "consumer_create", {"name": "team", "tpm": 900, "budget_usd": 5, "budget_period": "day"}
        )
        table: ConsumerTable = gateway.service.consumers
        team = table.consumers["team"]
        running = Holder("team", "p", team.created_at)
        self.assertIsNone(table.counters.admit(team, table.clock(), running, 0.5, 900))
        refused = table.counters.admit(team, table.clock(), Holder("team", "p", team.created_at), 0.1, 200)
        assert isinstance(refused, APIError)
        self.assertEqual(refused.type, "tokens_reserved")
        listed = yield self.command(gateway, client, "consumer_list", {"name": "team"})
        self.assertEqual(
            (listed["consumers"][0]["reserved_usd"], listed["consumers"][0]["reserved_tokens"]), (0.5, 900)
        )
        released = yield self.command(gateway, client, "consumer_release", {"name": "team"})
        self.assertEqual(released, {"name": "team", "released_usd": 0.5, "released_tokens": 900})
        listed = yield self.command(gateway, client, "consumer_list", {"name": "team"})
        self.assertNotIn("reserved_tokens", listed["consumers"][0])
        self.assertNotIn("reserved_usd", listed["consumers"][0])
        admitted = Holder("team", "p", team.created_at)
        self.assertIsNone(table.counters.admit(team, table.clock(), admitted, 0.1, 200))
        # The released call ends: counted, without taking the new call's reservation.
        table.counters.counted("team", 300, 0.0, table.clock(), running)
        self.assertEqual(table.counters.held("team", table.clock()), (0.1, 200))
        again = yield self.command(gateway, client, "consumer_release", {"name": "team"})
        self.assertEqual((again["released_usd"], again["released_tokens"]), (0.1, 200))
        [audit, _] = [e for e in self.events if e.get("cmd") == "consumer_release" and "outcome" in e]
        self.assertTrue(
            formatEvent(audit).endswith("consumer=team released_usd=0.5 released_tokens=900"), formatEvent(audit)
        )
        registry = gateway.service.metrics.registry
        sample = registry.get_sample_value(
            "openclaw_control_commands_total", {"cmd": "consumer_release", "outcome": "ok"}
        )
        self.assertEqual(sample, 2)
        self.assertEqual(
            registry.get_sample_value("openclaw_control_command_seconds_count", {"cmd": "consumer_release"}), 2
        )

    @inlineCallbacks
    def test_refusals(self) -> Any:
        """
        No such consumer, a field it does not take, a key given for a
        name: refused as the other consumer commands refuse them, audited.
        """
        gateway, client = yield self.gateway()
        made = yield self.command(gateway, client, "consumer_create", {"name": "team"})
        for data, said in (
            ({"name": "nobody"}, "no consumer named 'nobody'; consumers: team"),
            ({"name": "team", "tpm": 5}, "unknown field(s) in data: tpm; allowed: name"),
            ({"name": made["key"]}, "data.name is a key of consumer 'team'"),
            (None, "data.name"),
        ):
            answer = yield client.command(gateway.token, "consumer_release", data)
            self.assertFalse(answer["ok"], data)
            self.assertIn(said, answer["error"])
        errors = [e for e in self.events if e.get("cmd") == "consumer_release" and e.get("outcome") == "error"]
        self.assertEqual(len(errors), 4)
        sample = gateway.service.metrics.registry.get_sample_value(
            "openclaw_control_commands_total", {"cmd": "consumer_release", "outcome": "error"}
        )
        self.assertEqual(sample, 4)


class ReleaseInAClusterTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def two(self) -> Any:
        """
        Two instances' counters on one Redis (spends seeded), consumer
        C{team} (budget 1 USD, tpm 1000) in one SQLite database, and the
        second instance's commands; fires with (first counters, second
        counters, second's commands, Redis server).
        """
        redis = RedisServer()
        redis.start()
        self.addCleanup(redis.cleanup)
        redis_command(redis.port, "SET", "openclaw:consumers:seeded:2", "1")
        store = yield sqlite_store_with(
            self, Consumer("team", created_at=CREATED, budget_usd=1.0, budget_period="total", tpm=1000)
        )
        counters = []
        for _ in range(2):
            connection = yield txredisapi.Connection("127.0.0.1", redis.port, reconnect=False, convertNumbers=False)
            self.addCleanup(connection.disconnect)
            each = SharedCounters(RedisScripts(connection), reactor, 5.0)
            each.up = True
            counters.append(each)
        table = ConsumerTable(store, PriceTable.with_overrides({}), counters=counters[1])
        yield table.reload()
        return counters[0], counters[1], ConsumerCommands(table, time.time).handlers(), redis

    @inlineCallbacks
    def test_a_crashed_instances_reservations_released(self) -> Any:
        """
        Instance A admits two calls (0.5 USD and 600 tokens each) and
        crashes: B refuses the consumer's calls until they lapse (15
        minutes of the budget).  consumer_release on B deletes them from
        Redis (the keys README's redis-cli recipe deleted) and answers
        what they held; B admits the next call.
        """
        a, b, commands, redis = yield self.two()
        team = Consumer("team", created_at=CREATED, budget_usd=1.0, budget_period="total", tpm=1000)
        now = time.time()
        for _ in range(2):
            self.assertIsNone((yield a.admit(team, now, Holder("team", "p", CREATED), 0.5, 600)))
        refused = yield b.admit(team, now, Holder("team", "p", CREATED), 0.2, 10)
        assert isinstance(refused, APIError)
        self.assertEqual(refused.type, "budget_reserved")
        self.assertEqual(len(redis_keys(redis.port, "openclaw:consumer:team:*:reserved*")), 2)
        released = yield commands["consumer_release"]({"name": "team"})
        self.assertEqual(released, {"name": "team", "released_usd": 1.0, "released_tokens": 1200})
        self.assertEqual(redis_keys(redis.port, "openclaw:consumer:team:*:reserved*"), [])
        self.assertIsNone((yield b.admit(team, now, Holder("team", "p", CREATED), 0.2, 10)))
        # Nothing more to release than what that call holds.
        again = yield commands["consumer_release"]({"name": "team"})
        self.assertEqual((again["released_usd"], again["released_tokens"]), (0.2, 10))

    @inlineCallbacks
    def test_refused_while_redis_is_unreachable(self) -> Any:
        """
        This instance away from Redis: nothing is released, and the
        operator is told to retry once it is back.
        """
        a, b, commands, redis = yield self.two()
        b.up = False
        with self.assertRaises(CommandError) as raised:
            yield commands["consumer_release"]({"name": "team"})
        self.assertEqual(
            str(raised.exception),
            "the reservations of 'team' were not released: the cluster store (Redis) is unreachable, and the "
            "cluster's reservations are there (while it is away each instance judges by its own calls only): "
            "nothing was released; retry once it is back (openclawctl status shows cluster_store)",
        )


class ReleaseCommandLineTests(TestCase):
    def test_parsed_and_shown(self) -> None:
        """
        C{openclawctl consumer release NAME} sends consumer_release
        C{{name}}; its answer is shown as what was released.
        """
        request = ctl.parse_request(["--token", "T", "consumer", "release", "team", "--json"], {})
        self.assertEqual((request.cmd, request.data, request.as_json), ("consumer_release", {"name": "team"}, True))
        shown = ctl.format_consumers({"name": "team", "released_usd": 0.9, "released_tokens": 1200})
        self.assertEqual(shown, "released the reservations of team's calls in flight: 0.9 USD, 1200 tokens")
