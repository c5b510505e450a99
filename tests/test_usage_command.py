"""
The usage command: a name never used, or since not before until, is
refused saying what to do; an empty total costs 0, not null (null means
unpriced tokens); a deleted consumer's usage is still answered; the usage
of GATEWAY_API_KEYS' keys, recorded under "-", is asked for by that name
(and no consumer may take it).  The control plane and openclawctl against
a gateway in this process.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from openclaw.consumers.commands import ConsumerCommands
from openclaw.consumers.model import Consumer
from openclaw.consumers.prices import PriceTable
from openclaw.consumers.store import UsageRow
from openclaw.consumers.table import ConsumerTable, Holder
from tests.test_consumers import GatewayCase
from tests.test_dataplane import GATEWAY_KEY, HELLO


class UsageCommandTests(GatewayCase):
    @inlineCallbacks
    def test_usage_refusals_and_empty_totals(self) -> Any:
        """
        usage for a name never used, or with since not before until, is
        refused with what to do; an empty total costs 0, not null (null
        means unpriced tokens).
        """
        gateway, client = yield self.gateway()
        for data, words in (
            ({"name": "nobody"}, "no consumer named 'nobody'"),
            ({"since": "2026-11-02", "until": "2026-11-01"}, "must come before until"),
            ({"since": "2026-11-01", "until": "2026-11-01"}, "must come before until"),
        ):
            answer = yield client.command(gateway.token, "usage", data)
            self.assertFalse(answer["ok"], data)
            self.assertIn(words, answer["error"])
        empty = yield self.command(gateway, client, "usage", {"since": "2099-01-01"})
        self.assertEqual((empty["total"]["requests"], empty["total"]["cost_usd"]), (0, 0.0))
        grouped = yield self.command(gateway, client, "usage", {"since": "2099-01-01", "group_by": "model"})
        self.assertEqual((grouped["groups"], grouped["total"]["cost_usd"]), ([], 0.0))
        # A deleted consumer's usage is still answered.
        created = yield self.command(gateway, client, "consumer_create", {"name": "gone"})
        yield deferToThread(
            self.sdk(gateway, created["key"]).chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO
        )
        yield self.command(gateway, client, "consumer_delete", {"name": "gone"})
        usage = yield self.command(gateway, client, "usage", {"name": "gone"})
        self.assertEqual(usage["total"]["requests"], 1)

    @inlineCallbacks
    def test_unknown_name_names_a_few_consumers(self) -> Any:
        """
        A name that is no consumer's is answered (and logged) with the
        first 5 consumers' names and how many more, not every name.
        """
        gateway, client = yield self.gateway()
        for i in range(7):
            yield self.command(gateway, client, "consumer_create", {"name": f"team{i}"})
        shown = "consumers: team0, team1, team2, team3, team4 and 2 more (openclawctl consumer list shows them all)"
        for cmd in ("consumer_update", "consumer_delete", "consumer_list", "key_create", "usage"):
            answer = yield client.command(gateway.token, cmd, {"name": "nobody"})
            self.assertFalse(answer["ok"], cmd)
            self.assertIn("no consumer named 'nobody'", answer["error"])
            self.assertTrue(answer["error"].endswith(shown), answer["error"])
        # The audit lines log the same short error.
        errors = [e["error"] for e in self.events if e.get("outcome") == "error"]
        self.assertEqual(len(errors), 5)
        for error in errors:
            self.assertTrue(error.endswith(shown), error)

    @inlineCallbacks
    def test_unknown_name_says_which_was_meant(self) -> Any:
        """
        A name that differs from a consumer's only in case is answered with
        that name (trial s32: "consumer update T01" listed t01 among the
        consumers without saying it was the one); a close one likewise; a
        name close to none, without.  Through openclawctl as an operator
        sees it.
        """
        from tests.test_ctl import run_ctl

        gateway, client = yield self.gateway()
        for name in ("t01", "team0", "burst"):
            yield self.command(gateway, client, "consumer_create", {"name": name})
        for cmd in ("consumer_update", "consumer_delete", "key_create", "usage"):
            for name, hint in (
                ("T01", " (did you mean 't01'? names are case-sensitive)"),
                ("teamm0", " (did you mean 'team0'?)"),
                ("nobody", ""),
            ):
                answer = yield client.command(gateway.token, cmd, {"name": name})
                self.assertFalse(answer["ok"], cmd)
                self.assertTrue(
                    answer["error"].startswith(f"no consumer named {name!r}{hint}" + ("," if cmd == "usage" else ";")),
                    answer["error"],
                )
        out, err, code = yield run_ctl(
            "--url",
            f"ws://127.0.0.1:{gateway.port}",
            "--token",
            gateway.token,
            "consumer",
            "update",
            "T01",
            "--rpm",
            "5",
        )
        self.assertNotEqual(code, 0)
        self.assertIn(
            "no consumer named 'T01' (did you mean 't01'? names are case-sensitive); consumers: burst, t01, team0",
            out + err,
        )


class GatewayKeysUsageTests(GatewayCase):
    """
    The usage of GATEWAY_API_KEYS' keys, recorded under "-", can be asked
    for by that name (and only asked for: no consumer may take it).
    """

    @inlineCallbacks
    def test_usage_of_gateway_keys(self) -> Any:
        from tests.test_ctl import run_ctl

        gateway, client = yield self.gateway()
        sdk = self.sdk(gateway, GATEWAY_KEY)
        for _ in range(2):
            yield deferToThread(sdk.chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO)
        out, err, code = yield run_ctl(
            "--url", f"ws://127.0.0.1:{gateway.port}", "--token", gateway.token, "--json", "usage", "--name", "-"
        )
        self.assertEqual((err, code), ("", 0))
        result = json.loads(out)["result"]
        self.assertEqual((result["name"], result["total"]["requests"]), ("-", 2))
        answer = yield client.command(gateway.token, "usage", {"name": "-", "group_by": "model"})
        self.assertTrue(answer["ok"], answer)
        self.assertEqual(answer["result"]["total"]["requests"], 2)
        for cmd in ("consumer_create", "consumer_update"):
            answer = yield client.command(gateway.token, cmd, {"name": "-"})
            self.assertFalse(answer["ok"], answer)
            self.assertIn("not '-' alone", json.dumps(answer))


class _LockedStore:
    """
    A database whose writes fail (a SQLite file another process holds
    locked) or hang (C{hold}), its reads answering the rows it has.
    """

    def __init__(self) -> None:
        self.locked = True
        self.hold: Deferred[None] | None = None
        self.rows: list[UsageRow] = []

    def record(self, rows: list[UsageRow]) -> Deferred[None]:
        if self.hold is not None:
            return self.hold
        if self.locked:
            return fail(RuntimeError("database is locked"))
        self.rows.extend(rows)
        return succeed(None)

    def usage(self, name: Any, since: Any, until: Any, group_by: Any, retired: bool) -> Deferred[list[dict[str, Any]]]:
        return succeed([{"requests": len(self.rows), "limited": 0, "cost_usd": 0.0}])


class UsageBehindTests(SynchronousTestCase):
    def test_warning_while_rows_wait(self) -> None:
        """
        Usage rows the database has not taken (its writes failing, or one
        held) make the usage answer carry a warning saying how many and
        that its figures may be behind (trial s25: 0 answered while the
        consumer list showed the spend); none once they are written.
        """
        store = _LockedStore()
        table = ConsumerTable(store, PriceTable(), clock=lambda: 1000.0)  # type: ignore[arg-type]
        table.loaded = True
        table.consumers["team"] = Consumer("team", created_at=900.0)
        usage = ConsumerCommands(table, clock=lambda: 1000.0).handlers()["usage"]
        self.assertNotIn("warning", self.successResultOf(usage({"name": "team"})))
        for _ in range(4):
            table.account(Holder("team", "p", 900.0), "kimi", "moonshot-v1-8k", 200, None, 0.1)
        self.flushLoggedErrors()
        answer = self.successResultOf(usage({"name": "team"}))
        self.flushLoggedErrors()
        self.assertEqual(answer["total"]["requests"], 0)
        self.assertIn("4 usage rows counted on this instance are not in the database yet", answer["warning"])
        self.assertIn("these figures may be behind", answer["warning"])
        # A write held (a stalled PostgreSQL): the rows under way count.
        store.hold = Deferred()
        table.flush()
        table.account(Holder("team", "p", 900.0), "kimi", "moonshot-v1-8k", 200, None, 0.1)
        self.assertEqual(table.behind(), 5)
        store.hold, held = None, store.hold
        store.locked = False
        held.callback(None)
        answer = self.successResultOf(usage({"name": "team"}))
        self.assertEqual(answer["total"]["requests"], 1)
        self.assertNotIn("warning", answer)
