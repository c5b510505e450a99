"""
A provider's C{usage} the gateway cannot read does not make a consumer's
call free: unless its C{prompt_tokens} and C{completion_tokens} are both
counts (whole numbers of at least 0; C{10.0} counts as 10), the consumer
is charged the estimate, as when there is no usage at all, and a count
that is given is taken.  What the client gets is not changed.  The openai
SDK against a gateway in this process, the stand-in upstream on 127.0.0.1.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from openclaw.consumers.estimate import MESSAGE_TOKENS, REPLY_TOKENS, count_or_zero, known_counts, token_count
from openclaw.consumers.prices import Price
from openclaw.consumers.table import usage_counts
from openclaw.providers.kimi import moonshot_usage
from openclaw.testing.upstream import OpenAIAnswer
from tests.test_consumers import GatewayCase
from tests.test_dataplane import HELLO

MODEL = "kimi/moonshot-v1-8k"
#: 24 characters: 6 tokens estimated; the prompt ("Say hello.", 10) 3, and
#: the chat template's tokens (one message, the reply's priming).
REPLY = "Bonjour from the standin"
PROMPT_ESTIMATE, REPLY_ESTIMATE = 3 + MESSAGE_TOKENS + REPLY_TOKENS, 6


def price(prompt: int, completion: int) -> float:
    # moonshot-v1-8k: 0.20 USD per million prompt tokens, 2.00 per million completion tokens.
    return (prompt * 0.20 + completion * 2.00) / 1e6


class CountsTests(SynchronousTestCase):
    def test_token_count(self) -> None:
        for value, count in ((0, 0), (10, 10), (10.0, 10), (10**12, 10**12), (1e12, 10**12), (0.0, 0)):
            self.assertEqual(token_count(value), count, value)
            self.assertEqual(count_or_zero(value), count, value)
        # Past MAX_TOKEN_COUNT (a 1e300 would be priced into a spend its size): no count.
        for value in ("10", True, False, -1, -1.0, 4.2, float("nan"), float("inf"), None, [], {}, 10**12 + 1, 1e300):
            self.assertIsNone(token_count(value), value)
            self.assertEqual(count_or_zero(value), 0, value)

    def test_known_counts(self) -> None:
        self.assertEqual(known_counts({"prompt_tokens": 10, "completion_tokens": 4.0}), (10, 4))
        self.assertEqual(known_counts({"completion_tokens": 4}), (None, 4))
        self.assertEqual(known_counts({"prompt_tokens": "10", "completion_tokens": True}), (None, None))
        self.assertEqual(known_counts(None), (None, None))
        self.assertEqual(known_counts("usage"), (None, None))
        # Read alike for the token metrics.
        self.assertEqual(usage_counts({"prompt_tokens": 10.0, "completion_tokens": "4"}), (10, 0, 0, 0))

    def test_cached_tokens(self) -> None:
        """
        Cached prompt tokens: OpenAI's C{prompt_tokens_details.cached_tokens},
        where Kimi's wire puts Moonshot's top-level C{cached_tokens} before
        the usage is counted (trial s25: ignored, a Kimi cache hit charged
        the full prompt price); never the two summed.  The consumers' code
        reads OpenAI's field only (provider trial s34: Moonshot's was read
        there too, a provider's rule outside its module).
        """
        base = {"prompt_tokens": 100, "completion_tokens": 20}
        cases = [
            ({"prompt_tokens_details": {"cached_tokens": 40}}, 40),
            ({"cached_tokens": 40}, 40),
            ({"cached_tokens": 40, "prompt_tokens_details": {"cached_tokens": 40}}, 40),
            ({"cached_tokens": 30, "prompt_tokens_details": {"cached_tokens": 40}}, 40),
            # OpenAI's field given but unreadable: no cache counted (the
            # full price, never less than the provider bills).
            ({"cached_tokens": 40, "prompt_tokens_details": {"cached_tokens": "x"}}, 0),
            ({"cached_tokens": 40, "prompt_tokens_details": None}, 40),
            ({"cached_tokens": "40"}, 0),
            ({"cached_tokens": -1}, 0),
            ({}, 0),
        ]
        for extra, cached in cases:
            self.assertEqual(usage_counts(moonshot_usage({**base, **extra})), (100, 20, 0, cached), extra)
        # Moonshot's field alone is not OpenAI's.
        self.assertEqual(usage_counts({**base, "cached_tokens": 40}), (100, 20, 0, 0))


class UnreadableUsageTests(GatewayCase):
    @inlineCallbacks
    def billed(self, gateway: Any, client: Any, usage: dict[str, Any], stream: bool) -> Any:
        """
        One call of a new consumer answered with C{usage}: what the client
        saw of it (whole answers), and the consumer's usage total.
        """
        name = f"c{len(self.upstream.kimi.bodies)}"
        created = yield self.command(gateway, client, "consumer_create", {"name": name, "budget_usd": 100})
        self.upstream.kimi.answers.append(OpenAIAnswer(REPLY, usage=usage))
        sdk = self.sdk(gateway, created["key"])

        def call() -> Any:
            if not stream:
                raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
                return raw.http_response.json()["usage"]
            chunks = sdk.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            self.assertEqual(text, REPLY)
            return None

        seen = yield deferToThread(call)
        usage_total = yield self.command(gateway, client, "usage", {"name": name})
        return name, seen, usage_total["total"]

    @inlineCallbacks
    def test_unreadable_usage_is_estimated(self) -> Any:
        """
        Strings, booleans, negative numbers, fractions: the estimate (the
        prompt's and the text's bytes / 4), not 0 tokens and 0 USD; a whole
        float counts; a usage with only completion_tokens is that plus the
        prompt's estimate, priced.  Whole answers and streams alike, the
        consumer metrics as billed, the client's usage as the provider's.
        """
        gateway, client = yield self.gateway()
        estimate = (PROMPT_ESTIMATE, REPLY_ESTIMATE)
        cases = [
            ({"prompt_tokens": "10", "completion_tokens": "4", "total_tokens": "14"}, estimate),
            ({"prompt_tokens": True, "completion_tokens": True, "total_tokens": 2}, estimate),
            ({"prompt_tokens": -1000000, "completion_tokens": -1000000, "total_tokens": -2000000}, estimate),
            ({"prompt_tokens": 10.7, "completion_tokens": 4.2, "total_tokens": 14.9}, estimate),
            ({"prompt_tokens": 10.0, "completion_tokens": 4.0, "total_tokens": 14.0}, (10, 4)),
            ({"completion_tokens": 4}, (PROMPT_ESTIMATE, 4)),
            ({"prompt_tokens": 10, "completion_tokens": None}, (10, REPLY_ESTIMATE)),
        ]
        registry = gateway.service.metrics.registry
        for usage, (prompt, completion) in cases:
            for stream in (False, True):
                name, seen, total = yield self.billed(gateway, client, usage, stream)
                what = (usage, "stream" if stream else "whole")
                self.assertEqual((total["prompt_tokens"], total["completion_tokens"]), (prompt, completion), what)
                self.assertAlmostEqual(total["cost_usd"], price(prompt, completion), msg=str(what))
                self.assertEqual(total["unpriced_tokens"], 0, what)
                if not stream:
                    self.assertEqual(seen, usage, what)
                counted = {
                    kind: registry.get_sample_value("openclaw_consumer_tokens_total", {"consumer": name, "kind": kind})
                    for kind in ("prompt", "completion")
                }
                self.assertEqual(counted, {"prompt": prompt, "completion": completion}, what)
                spend = registry.get_sample_value("openclaw_consumer_spend_usd_total", {"consumer": name})
                self.assertAlmostEqual(spend, price(prompt, completion), msg=str(what))


class CachedPromptTests(GatewayCase):
    @inlineCallbacks
    def test_kimi_cached_tokens_priced_at_the_cache_rate(self) -> Any:
        """
        A Kimi answer whose usage counts its cache hits as Moonshot does (a
        top-level C{cached_tokens}) is charged those at the cached-prompt
        rate, in the usage rows, the spend and the metrics alike.
        """
        gateway, client = yield self.gateway(price_overrides={MODEL: Price(0.20, 2.00, 0.05)})
        created = yield self.command(gateway, client, "consumer_create", {"name": "cache", "budget_usd": 100})
        usage = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120, "cached_tokens": 40}
        self.upstream.kimi.answers.append(OpenAIAnswer(REPLY, usage=usage))
        sdk = self.sdk(gateway, created["key"])
        yield deferToThread(sdk.chat.completions.create, model=MODEL, messages=HELLO)
        cost = (60 * 0.20 + 40 * 0.05 + 20 * 2.00) / 1e6
        total = (yield self.command(gateway, client, "usage", {"name": "cache"}))["total"]
        self.assertEqual((total["prompt_tokens"], total["completion_tokens"]), (100, 20))
        self.assertAlmostEqual(total["cost_usd"], cost)
        registry = gateway.service.metrics.registry
        self.assertAlmostEqual(
            registry.get_sample_value("openclaw_consumer_spend_usd_total", {"consumer": "cache"}), cost
        )
        listed = yield self.command(gateway, client, "consumer_list", {"name": "cache"})
        self.assertAlmostEqual(listed["consumers"][0]["spent_usd"], cost)
