"""
What openclawctl (the installed script) tells an operator, against a
gateway in this process: switch-provider names the consumers whose models
the switch shuts out, drops the provider's own prefix from a model and
refuses another provider's or an overlong one saying what to send; the
consumer commands refuse options that do not go together, and the
consumer table prints plain decimals.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from openclaw.routing import Route
from tests.test_consumers import GatewayCase
from tests.test_consumers_cluster import MODEL
from tests.test_consumers_recreated import CHEAP
from tests.test_dataplane import HELLO


class CtlMessageTests(GatewayCase):
    """
    openclawctl (the installed script) against a gateway in this process.
    """

    @inlineCallbacks
    def ctl(self, gateway: Any, *args: str) -> Any:
        from tests.test_ctl import run_ctl

        answer = yield run_ctl("--url", f"ws://127.0.0.1:{gateway.port}", "--token", gateway.token, *args)
        return answer

    @inlineCallbacks
    def test_switch_names_the_consumers_it_shuts_out(self) -> Any:
        """
        switch_provider to a route some consumers' models exclude warns,
        naming up to five of them then a count; openclawctl prints it.
        """
        gateway, client = yield self.gateway()
        yield self.command(gateway, client, "consumer_create", {"name": "konly", "models": ["kimi/*"]})
        yield self.command(gateway, client, "consumer_create", {"name": "any"})
        out, err, code = yield self.ctl(gateway, "switch-provider", "kimi")
        self.assertEqual(code, 0, err)
        self.assertNotIn("consumer", err)
        out, err, code = yield self.ctl(gateway, "switch-provider", "gemini")
        self.assertEqual(code, 0, err)
        self.assertIn("the models of consumer(s) konly exclude gemini/", err)
        self.assertIn("403 model_not_allowed", err)
        for n in range(6):
            yield self.command(gateway, client, "consumer_create", {"name": f"k{n}", "models": ["kimi/*"]})
        answer = yield self.command(gateway, client, "switch_provider", {"provider": "gemini"})
        self.assertIn("consumer(s) k0, k1, k2, k3, k4 and 2 more exclude", answer["warning"])
        self.assertNotIn("any", answer["warning"])

    @inlineCallbacks
    def test_switch_model_prefixes_and_bounds(self) -> Any:
        """
        The switched-to provider's own prefix is dropped; another's is
        refused, saying which provider to switch to; an overlong model
        name is refused with what to send.
        """
        gateway, client = yield self.gateway()
        answer = yield self.command(
            gateway, client, "switch_provider", {"provider": "gemini", "model": "gemini/gemini-2.5-flash"}
        )
        self.assertEqual(answer["model"], "gemini-2.5-flash")
        self.assertEqual(gateway.service.route.current.model, "gemini-2.5-flash")
        out, err, code = yield self.ctl(gateway, "switch-provider", "gemini", "--model", "kimi/moonshot-v1-8k")
        self.assertNotEqual(code, 0)
        self.assertIn("names provider 'kimi', not 'gemini': to use it, switch to 'kimi'", err)
        refused = yield client.command(gateway.token, "switch_provider", {"provider": "kimi", "model": "m" * 257})
        self.assertFalse(refused["ok"])
        self.assertIn("model names are at most 256", refused["error"])
        self.assertEqual(gateway.service.route.current.model, "gemini-2.5-flash")

    @inlineCallbacks
    def test_switch_to_a_model_named_like_another_provider(self) -> Any:
        """
        A model of the switched-to provider whose name starts with another
        declared provider's id (an aggregator's openai/gpt-4o): the refusal
        says to name it <provider>/<model>, and that form switches to it.
        """
        gateway, client = yield self.gateway()
        out, err, code = yield self.ctl(gateway, "switch-provider", "gemini", "--model", "kimi/served-by-gemini")
        self.assertNotEqual(code, 0)
        self.assertIn(
            "if 'gemini' serves a model named 'kimi/served-by-gemini', name it gemini/kimi/served-by-gemini", err
        )
        out, err, code = yield self.ctl(
            gateway, "--json", "switch-provider", "gemini", "--model", "gemini/kimi/served-by-gemini"
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["result"]["model"], "kimi/served-by-gemini")
        self.assertEqual(gateway.service.route.current, Route("gemini", "kimi/served-by-gemini"))

    @inlineCallbacks
    def test_consumer_edge_cases(self) -> Any:
        """
        --budget-period without --budget-usd is refused (create, and
        update of a consumer without a budget); a consumer without a
        budget shows budget_period null; update with nothing to change
        says so and fails; a model pattern without provider/ is named.
        """
        gateway, client = yield self.gateway()
        out, err, code = yield self.ctl(gateway, "consumer", "create", "b3", "--budget-period", "day")
        self.assertEqual(code, 2, err)
        self.assertIn("--budget-period needs --budget-usd", err)
        out, err, code = yield self.ctl(gateway, "--json", "consumer", "create", "b3")
        self.assertEqual(code, 0, err)
        self.assertIsNone(json.loads(out)["result"]["consumer"]["budget_period"])
        out, err, code = yield self.ctl(gateway, "consumer", "update", "b3", "--budget-period", "day")
        self.assertNotEqual(code, 0)
        self.assertIn("budget_period needs budget_usd", err)
        out, err, code = yield self.ctl(gateway, "consumer", "update", "b3")
        self.assertEqual(code, 2)
        self.assertIn("nothing to change", err)
        out, err, code = yield self.ctl(gateway, "consumer", "update", "b3", "--model", "kimi")
        self.assertNotEqual(code, 0)
        self.assertIn("'kimi' is no pattern; each must be provider/model or provider/*", err)
        # A consumer with a budget may change its period alone.
        out, err, code = yield self.ctl(gateway, "consumer", "update", "b3", "--budget-usd", "0.00001")
        self.assertEqual(code, 0, err)
        out, err, code = yield self.ctl(gateway, "consumer", "update", "b3", "--budget-period", "day")
        self.assertEqual(code, 0, err)

    @inlineCallbacks
    def test_table_figures_and_warning_quoting(self) -> Any:
        """
        BUDGET and SPENT print plain decimals, never an exponent; the past
        expires_at warning quotes the name once.
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", CHEAP)
        yield deferToThread(self.sdk(gateway, created["key"]).chat.completions.create, model=MODEL, messages=HELLO)
        out, err, code = yield self.ctl(gateway, "consumer", "list")
        self.assertEqual(code, 0, err)
        self.assertNotIn("e-0", out)
        self.assertIn("0.00001/day", out)
        row = out.splitlines()[1].split()
        self.assertEqual(row[:3], ["cheap", "0.00001/day", "0.00001"])
        out, err, code = yield self.ctl(gateway, "consumer", "update", "cheap", "--expires-at", "2000-01-01")
        self.assertEqual(code, 0, err)
        self.assertIn("the keys of 'cheap' are refused", err)
        self.assertNotIn("''", err)
