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

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

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
