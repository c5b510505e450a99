"""
Consumers (issue #19): keys per team or app, their limits, and their usage,
against a real SQLite and a real PostgreSQL, with the official openai SDK
in front of the stand-in upstream, all on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import psycopg
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, gatherResults, inlineCallbacks, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from openclaw.consumers.commands import ConsumerCommands, usage_total
from openclaw.consumers.estimate import (
    IMAGE_LOW_TOKENS,
    IMAGE_TOKENS,
    MAX_TOKEN_COUNT,
    MESSAGE_TOKENS,
    REPLY_TOKENS,
    answer_bytes,
    chunk_bytes,
    estimated_usage,
    prompt_bytes,
    prompt_tokens,
)
from openclaw.consumers.gateway_usage import GatewayUsage
from openclaw.consumers.limits import SlidingWindow, duration, reset_after
from openclaw.consumers.model import (
    MAX_BUDGET_USD,
    MAX_PER_MINUTE,
    Consumer,
    InvalidConsumer,
    NewKey,
    consumer_fields,
    creation_time,
    key_hash,
    period_key,
    retired_name,
)
from openclaw.consumers.prices import Price, PricesError, PriceTable, parse_prices, shipped_prices
from openclaw.consumers.store import ConsumerStore, RowIds, UsageRow
from openclaw.consumers.table import GATEWAY, ConsumerTable, Holder, LocalCounters, budget_spent, tpm_refused
from openclaw.control.commands import CommandError
from openclaw.dataplane.embeddings import estimated_tokens
from openclaw.dataplane.errors import APIError
from openclaw.dataplane.request import choice_count
from openclaw.logs import KEYLESS_FIELD
from openclaw.metrics import ConsumerMetrics
from openclaw.settings import ConfigError, load_settings
from tests.postgres_server import postgres_database
from tests.support import RunningGateway, capture_log_events, free_port, open_client, start_gateway, start_upstream
from tests.test_dataplane import GATEWAY_KEY, GEMINI_KEY, HELLO, KIMI_KEY


class RulesTests(TestCase):
    def test_key_shape(self) -> None:
        key = NewKey.make()
        self.assertTrue(key.key.startswith("ock-"))
        self.assertEqual(len(key.key), 44)
        self.assertEqual(key.prefix, key.key[4:12])
        self.assertEqual(key.hash, key_hash(key.key.encode()))
        self.assertNotIn(key.key, repr(key))

    def test_key_never_starts_with_a_dash(self) -> None:
        """
        The character after C{ock-} is a letter or a digit, never C{-} (nor
        C{_}): a key prefix starting with C{-} is read as an option by
        openclawctl.  Without the rule, about 1 key in 32 would fail this.
        """
        firsts = {NewKey.make().prefix[0] for _ in range(2000)}
        self.assertFalse(firsts & {"-", "_"}, firsts)
        self.assertTrue(all(first.isascii() and first.isalnum() for first in firsts), firsts)

    def test_fields(self) -> None:
        consumer = consumer_fields(
            {"name": "team.a-1", "budget_usd": 5, "budget_period": "day", "rpm": 3, "models": ["gemini/*"]}
        )
        self.assertEqual(consumer.budget_usd, 5.0)
        self.assertTrue(consumer.allows("gemini", "gemini-2.5-flash"))
        self.assertFalse(consumer.allows("kimi", "moonshot-v1-8k"))
        # ["*"], as consumer_list shows it, or null: every model again.
        for every in (["*"], None, []):
            self.assertEqual(consumer_fields({"name": "team.a-1", "models": every}, consumer).models, ())
        for bad in (
            {"name": "a b"},
            {"name": "-"},
            {"name": "a", "rpm": 0},
            {"name": "a", "rpm": 1.5},
            {"name": "a", "budget_period": "week"},
            {"name": "a", "budget_usd": -1},
            {"name": "a", "models": "gemini/*"},
            {"name": "a", "expires_at": "soon"},
            # Past 9999-12-31 in UTC, where it is stored: a consumer made,
            # then every list an internal error.
            {"name": "a", "expires_at": "9999-12-31T23:00:00-05:00"},
            {"name": "a", "expires_at": "0001-01-01T00:00:00+01:00"},
            {"name": "a", "colour": "red"},
        ):
            self.assertRaises(InvalidConsumer, consumer_fields, bad)

    def test_last_second(self) -> None:
        """
        A time in 9999's last second with a fraction is taken as that
        second: as a float it rounded up to year 10000 (a consumer made,
        then every consumer_list an internal error, even after a restart);
        one already stored so is shown as that last second.
        """
        from openclaw.consumers.model import LAST_SECOND, parse_time
        from openclaw.timefmt import isoformat

        for text in ("9999-12-31T23:59:59.99999Z", "9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59Z"):
            self.assertEqual(parse_time(text, "expires_at"), LAST_SECOND)
        self.assertEqual(isoformat(LAST_SECOND + 1), "9999-12-31T23:59:59Z")
        self.assertEqual(isoformat(-1e13), "0001-01-01T00:00:00Z")

    def test_keys_found_where_they_are_not_expected(self) -> None:
        """
        A whole key is refused as a model, and logged as lists show keys;
        a name that only looks like one (a tuned model, C{mock-...}) is
        neither.
        """
        from openclaw.dataplane.context import clipped
        from openclaw.routing import model_refusal

        key = NewKey.make().key
        self.assertIsNotNone(model_refusal(f"kimi/{key}"))
        self.assertIsNotNone(model_refusal(key))
        for name in ("tunedModels/ock-sentiment-classifier-2024-abcdefgh", "mock-" + "a" * 40, f"{key}x"):
            self.assertIsNone(model_refusal(name), name)
        self.assertEqual(clipped("/v1/mock-abcdefghij"), "/v1/mock-abcdefghij")
        self.assertEqual(clipped(f"/v1/{key}"), f"/v1/{key[:12]}...")
        # A path as sent: a key after an escaped slash is one too, and one
        # hidden by escapes (its own characters, a slash escaped twice) is
        # logged decoded, cut.
        self.assertEqual(clipped(f"/v1/models/kimi%2F{key}"), f"/v1/models/kimi%2F{key[:12]}...")
        for hidden in (
            f"kimi%252F{key}",
            f"%6F{key[1:]}",
            f"ock%2D{key[4:]}",
            f"{key[:10]}%{ord(key[10]):02X}{key[11:]}",
        ):
            said = clipped(f"/v1/models/{hidden}")
            self.assertNotIn(key[12:], said)
            self.assertIn(f"{key[:12]}...", said)
        self.assertEqual(clipped("/v1/a%20b"), "/v1/a%20b")
        # Decoded to find the key, escaped again for the log: no line break
        # or direction override of the client's reaches it; three escapes
        # deep, a key is still found.
        said = clipped(f"/v1/ock%2D{key[4:]}%0A%09FORGED%E2%80%AE")
        self.assertTrue(said.endswith("%0A%09FORGED%E2%80%AE"), said)
        self.assertNotIn(key[12:], clipped(f"/v1/ock%25252D{key[4:]}"))
        self.assertIn("API keys", str(model_refusal(f"kimi%2F{key}")))
        # As a model, an escape hides what the name holds: refused.
        self.assertIn("percent-escape", str(model_refusal("gemini%2Fgemini-2.5-flash")))
        self.assertIn("API keys", str(model_refusal(f"gemini/kimi%2F{key}")))

    def test_budget_bounds(self) -> None:
        """
        A budget is a number of US dollars from 0 to MAX_BUDGET_USD: not
        -0 (listed as -0.0), nor 1e308, NaN or an infinity; without a
        period, its period is month.
        """
        for bad in (-0.0, -1e-9, 1e308, MAX_BUDGET_USD + 1, float("nan"), float("inf"), True, "5"):
            error = self.assertRaises(InvalidConsumer, consumer_fields, {"name": "a", "budget_usd": bad})
            self.assertIn("budget_usd must be a number of US dollars from 0 to 1000000000", str(error))
        for good in (0, 0.000001, MAX_BUDGET_USD):
            consumer = consumer_fields({"name": "a", "budget_usd": good})
            self.assertEqual((consumer.budget_usd, consumer.budget_period), (good, "month"))
        # Below one millionth of a dollar (prices are per million tokens): a
        # typo, which consumer list would show as hundreds of digits.
        for tiny in (1e-320, 5e-324, 0.00000099):
            error = self.assertRaises(InvalidConsumer, consumer_fields, {"name": "a", "budget_usd": tiny})
            self.assertIn(f"budget_usd {tiny:g} is below the smallest budget, 0.000001 US dollars", str(error))
            self.assertIn("give 0 to let no call through, or at least 0.000001", str(error))

    def test_rate_bounds(self) -> None:
        """
        rpm and tpm are whole numbers from 1 to MAX_PER_MINUTE; a refusal
        names the maximum (an oversized JSON number arrives as a float).
        """
        for field in ("rpm", "tpm"):
            for bad in (0, -1, MAX_PER_MINUTE + 1, 2**63, 1e23, 1.5, True, "5"):
                error = self.assertRaises(InvalidConsumer, consumer_fields, {"name": "a", field: bad})
                self.assertIn(f"{field} must be a whole number from 1 to 1000000000000, or null", str(error))
            self.assertEqual(getattr(consumer_fields({"name": "a", field: MAX_PER_MINUTE}), field), MAX_PER_MINUTE)

    def test_periods_are_utc(self) -> None:
        moment = 1793577600.0  # 2026-11-02T00:00:00Z
        self.assertEqual(period_key("day", moment - 1), "2026-11-01")
        self.assertEqual(period_key("day", moment), "2026-11-02")
        self.assertEqual(period_key("month", moment), "2026-11")
        self.assertEqual(period_key("total", moment), "total")

    def test_sliding_window(self) -> None:
        window = SlidingWindow()
        window.add(0.0)
        window.add(30.0)
        self.assertEqual(window.used(59.0), 2)
        self.assertEqual(window.retry_after(59.0, 2), 1)
        self.assertEqual(window.retry_after(40.0, 2), 20)
        self.assertEqual(window.used(60.0), 1)
        self.assertEqual(window.used(90.0), 0)

    def test_sliding_window_clock_set_back(self) -> None:
        """
        The wall clock set back an hour (README, "The host's clock"): what
        the window counted "later" still counts, as counted now, and leaves
        it 60 s on; a per-minute limit is never an hour's lockout (trial
        s31: "retry after 3647 s").
        """
        window = SlidingWindow()
        for at in (7200.0, 7210.0, 7220.0):
            window.add(at)
        back = 3600.0
        self.assertEqual(window.used(back), 3)
        self.assertEqual(window.retry_after(back, 3), 60)
        self.assertEqual(window.retry_after(back, 1, held=[(7230.0, 1)]), 60)
        self.assertEqual(reset_after(window.newest(), back), 60.0)
        window.add(back + 10)
        self.assertEqual(window.used(back + 59), 4)
        self.assertEqual(window.used(back + 60), 1)
        self.assertEqual(window.used(back + 70), 0)
        # No later count, but the newest one is ahead of the clock.
        self.assertEqual(reset_after(7220.0, back), 60.0)

    def test_rate_limits_headers(self) -> None:
        """
        The x-ratelimit-* durations are written as OpenAI writes them
        (whole seconds, rounded up; minutes past one), and a window's
        reset is the time until it is empty.
        """
        for seconds, text in [(0, "0s"), (0.2, "1s"), (59, "59s"), (59.5, "1m0s"), (60, "1m0s"), (61, "1m1s")]:
            self.assertEqual(duration(seconds), text)
        window = SlidingWindow()
        self.assertEqual(reset_after(window.newest(), 10.0), 0.0)
        window.add(0.0)
        window.add(30.0)
        self.assertEqual(reset_after(window.newest(), 40.0), 50.0)
        counters = LocalCounters()
        holder = Holder("a", "p")
        self.assertIsNone(counters.admit(Consumer("a", rpm=3, tpm=100), 30.0, holder, 0.0, 40))
        assert holder.rate_limits is not None
        self.assertEqual(
            holder.rate_limits.headers(),
            [
                (b"x-ratelimit-limit-requests", b"3"),
                (b"x-ratelimit-remaining-requests", b"2"),
                (b"x-ratelimit-reset-requests", b"1m0s"),
                (b"x-ratelimit-limit-tokens", b"100"),
                (b"x-ratelimit-remaining-tokens", b"60"),
                (b"x-ratelimit-reset-tokens", b"1m0s"),
            ],
        )
        # Only the limits a consumer has.
        rpm_only = Holder("b", "p")
        self.assertIsNone(counters.admit(Consumer("b", rpm=3), 30.0, rpm_only))
        assert rpm_only.rate_limits is not None
        self.assertEqual([name for name, _ in rpm_only.rate_limits.headers()][-1], b"x-ratelimit-reset-requests")
        unlimited = Holder("c", "p")
        self.assertIsNone(counters.admit(Consumer("c", budget_usd=1.0), 30.0, unlimited))
        self.assertIsNone(unlimited.rate_limits)

    def test_limits_on_a_clock(self) -> None:
        clock = Clock()
        clock.advance(1000)
        counters = LocalCounters()
        consumer = Consumer("a", rpm=2, tpm=100, budget_usd=1.0, budget_period="total")
        self.assertIsNone(counters.admit(consumer, clock.seconds()))
        self.assertIsNone(counters.admit(consumer, clock.seconds()))
        refused = counters.admit(consumer, clock.seconds())
        assert refused is not None
        self.assertEqual((refused.status, refused.code), (429, "rate_limit_exceeded"))
        # OpenAI's type: "requests" for a requests limit, "tokens" for a tokens one.
        self.assertEqual(refused.type, "requests")
        self.assertEqual(dict(refused.headers)[b"Retry-After"], b"60")
        clock.advance(60)
        self.assertIsNone(counters.admit(consumer, clock.seconds()))
        counters.counted("a", 100, 0.0, clock.seconds())
        refused = counters.admit(consumer, clock.seconds())
        assert refused is not None
        self.assertIn("tpm", refused.message)
        self.assertEqual((refused.code, refused.type), ("rate_limit_exceeded", "tokens"))
        clock.advance(61)
        counters.counted("a", 0, 1.0, clock.seconds())
        refused = counters.admit(consumer, clock.seconds())
        assert refused is not None
        self.assertEqual(refused.code, "insufficient_quota")
        self.assertIn("1 USD in total", refused.message)
        # Small sums as people write them, never with an exponent.
        refused = counters.admit(Consumer("b", budget_usd=0.00001, budget_period="total"), clock.seconds())
        counters.counted("b", 0, 0.0000123, clock.seconds())
        refused = counters.admit(Consumer("b", budget_usd=0.00001, budget_period="total"), clock.seconds())
        assert refused is not None
        self.assertIn("budget of 0.00001 USD in total (spent 0.0000123 USD)", refused.message)

    def test_budget_reservations(self) -> None:
        """
        Calls in flight hold a reservation: admitted while spend plus the
        reservations is below the budget, released when counted.
        """
        counters = LocalCounters()
        consumer = Consumer("a", budget_usd=1.0, budget_period="total")
        first, second, third = Holder("a", "p"), Holder("a", "p"), Holder("a", "p")
        self.assertIsNone(counters.admit(consumer, 100.0, first, 0.6))
        self.assertIsNone(counters.admit(consumer, 100.0, second, 0.6))
        refused = counters.admit(consumer, 100.0, third, 0.6)
        assert refused is not None
        # Nothing spent: the calls in flight hold the budget until counted,
        # a refusal to retry (trial s25: "has used its budget", with
        # x-should-retry false, and the SDK gave up).
        self.assertEqual((refused.status, refused.code, refused.type), (429, "rate_limit_exceeded", "budget_reserved"))
        self.assertEqual(dict(refused.headers), {b"Retry-After": b"2"})
        self.assertIn("(spent 0 USD, 1.2 USD reserved by calls in flight until they are counted)", refused.message)
        self.assertIn("retry after 2 s, once they end, or set max_tokens", refused.message)
        self.assertNotIn("used its budget", refused.message)
        # A single gateway's own reservations: no other instance holds any.
        self.assertNotIn("another instance", refused.message)
        # Counted: the reservation goes, the real cost stays.
        counters.counted("a", 10, 0.1, 101.0, first)
        self.assertEqual((first.reserved, round(counters.reserved("a", 101.0), 6)), (0.0, 0.6))
        self.assertIsNone(counters.admit(consumer, 101.0, third, 0.6))
        counters.counted("a", 10, 0.1, 102.0, second)
        counters.counted("a", 10, 0.1, 102.0, third)
        self.assertEqual(counters.reserved("a", 102.0), 0.0)
        # A reservation never counted (its client went) expires.
        self.assertIsNone(counters.admit(consumer, 200.0, Holder("a", "p"), 0.5))
        self.assertEqual(counters.reserved("a", 200.0 + 901), 0.0)

    def test_budget_spent_with_calls_in_flight(self) -> None:
        """
        A budget spent is the final refusal (insufficient_quota, not to be
        retried) with calls in flight too; spent but for what they hold, a
        refusal to retry.
        """
        counters = LocalCounters()
        consumer = Consumer("a", budget_usd=1.0, budget_period="day")
        first = Holder("a", "p")
        self.assertIsNone(counters.admit(consumer, 100.0, first, 0.3))
        counters.counted("a", 10, 0.9, 100.0, first)
        self.assertIsNone(counters.admit(consumer, 100.0, Holder("a", "p"), 0.3))
        held = counters.admit(consumer, 100.0, Holder("a", "p"), 0.3)
        assert held is not None
        self.assertEqual((held.code, dict(held.headers)), ("rate_limit_exceeded", {b"Retry-After": b"2"}))
        self.assertIn("(spent 0.9 USD, 0.3 USD reserved", held.message)
        counters.counted("a", 10, 0.2, 101.0)
        spent = counters.admit(consumer, 101.0, Holder("a", "p"), 0.3)
        assert spent is not None
        self.assertEqual((spent.code, spent.type), ("insufficient_quota", "insufficient_quota"))
        self.assertEqual(dict(spent.headers), {b"x-should-retry": b"false"})
        self.assertIn("has used its budget of 1 USD per UTC day (spent 1.1 USD, 0.3 USD more reserved", spent.message)

    def test_table_reserves_the_completion_price(self) -> None:
        clock = Clock()
        clock.advance(1000)
        table = ConsumerTable(None, PriceTable.with_overrides({}), clock=clock.seconds, reserve_tokens=1000)  # type: ignore[arg-type]
        table.consumers["a"] = Consumer("a", budget_usd=1.0, budget_period="day")
        holder = Holder("a", "p")
        self.assertIsNone(table.admit(holder, "kimi", "moonshot-v1-8k", 500_000))
        self.assertAlmostEqual(holder.reserved, 1.0)  # 500k completion tokens at 2 USD per million
        refused = table.admit(Holder("a", "p"), "kimi", "moonshot-v1-8k")
        assert isinstance(refused, APIError)
        self.assertEqual(refused.code, "rate_limit_exceeded")
        table.account(holder, "kimi", "moonshot-v1-8k", 200, {"prompt_tokens": 10, "completion_tokens": 10}, 0.1)
        other = Holder("a", "p")
        self.assertIsNone(table.admit(other, "kimi", "moonshot-v1-8k"))
        self.assertAlmostEqual(other.reserved, 0.002)  # reserve_tokens at 2 USD per million

    def test_rpm_set_later_counts_the_last_minute(self) -> None:
        """
        Requests made while a consumer had no rpm count when one is set:
        the window is the last 60 s (trial s25: 5 calls, then rpm 3, and
        the next passed with 2 requests remaining).  Listings too.
        """
        table = ConsumerTable(None, PriceTable(), clock=lambda: 1000.0)  # type: ignore[arg-type]
        table.consumers["a"] = Consumer("a")
        for _ in range(4):
            self.assertIsNone(table.admit(Holder("a", "p"), "kimi", "moonshot-v1-8k"))
        self.assertIsNone(table.admit_listing(Holder("a", "p")))
        table.consumers["a"] = Consumer("a", rpm=3)
        refused = table.admit(Holder("a", "p"), "kimi", "moonshot-v1-8k")
        assert isinstance(refused, APIError)
        self.assertEqual((refused.code, refused.type), ("rate_limit_exceeded", "requests"))
        self.assertEqual(dict(refused.headers)[b"Retry-After"], b"60")
        table.consumers["a"] = Consumer("a", rpm=6)
        holder = Holder("a", "p")
        self.assertIsNone(table.admit(holder, "kimi", "moonshot-v1-8k"))
        assert holder.rate_limits is not None
        self.assertEqual(dict(holder.rate_limits.headers())[b"x-ratelimit-remaining-requests"], b"0")

    def test_tpm_reservations(self) -> None:
        """
        Calls in flight hold their expected tokens in the tpm window:
        admitted while the window's tokens plus the reservations are below
        tpm (the first always); counted, a reservation is replaced by the
        call's actual tokens; never counted, it expires.
        """
        counters = LocalCounters()
        consumer = Consumer("a", tpm=30)
        first, second, third, fourth = (Holder("a", "p") for _ in range(4))
        for holder in (first, second, third):
            self.assertIsNone(counters.admit(consumer, 100.0, holder, 0.0, 14))
        self.assertEqual((first.reserved_tokens, first.reserved_at), (14, 100))
        refused = counters.admit(consumer, 100.0, fourth, 0.0, 14)
        assert refused is not None
        self.assertEqual(refused.code, "rate_limit_exceeded")
        self.assertIn("tpm", refused.message)
        # Room once the reservations would leave the window, were their
        # calls counted as admitted (at 100); but nothing is used yet, so
        # the calls in flight make it all: a short wait, for them to end.
        window = counters.tokens["a"]
        self.assertEqual(window.retry_after(100.0, 30, sorted(counters.reserved_tokens("a", 100.0).items())), 60)
        self.assertEqual(dict(refused.headers)[b"Retry-After"], b"2")
        self.assertEqual(refused.type, "tokens_reserved")
        self.assertEqual(fourth.reserved_tokens, 0)
        # Counted with fewer tokens than reserved: 5 + 28 still refuses.
        counters.counted("a", 5, 0.0, 102.0, first)
        self.assertEqual((first.reserved_tokens, counters.reserved_tokens("a", 102.0)), (0, {100: 28}))
        self.assertIsNotNone(counters.admit(consumer, 102.0, fourth, 0.0, 14))
        counters.counted("a", 5, 0.0, 102.0, second)
        self.assertIsNone(counters.admit(consumer, 102.0, fourth, 0.0, 14))
        # 10 counted at 102, 14 reserved at 100 and 14 at 102: room once the
        # one admitted at 100 would leave the window.
        refused = counters.admit(consumer, 103.0, Holder("a", "p"), 0.0, 14)
        assert refused is not None
        self.assertEqual(window.retry_after(103.0, 30, sorted(counters.reserved_tokens("a", 103.0).items())), 57)
        self.assertEqual((dict(refused.headers)[b"Retry-After"], refused.type), (b"2", "tokens_reserved"))
        # Reservations never counted (their instance went away) expire.
        # A tpm reservation lapses after the window (60 s), a budget's later.
        self.assertEqual(counters.reserved_tokens("a", 100.0 + 61), {102: 14})
        self.assertEqual(counters.reserved_tokens("a", 102.0 + 61), {})
        self.assertIsNone(counters.admit(consumer, 102.0 + 61, Holder("a", "p"), 0.0, 14))
        # The window's own tokens at tpm: over the limit, its Retry-After
        # when the window has room.
        counters.counted("a", 30, 0.0, 170.0)
        refused = counters.admit(consumer, 171.0, Holder("a", "p"), 0.0, 14)
        assert refused is not None
        self.assertEqual((refused.type, dict(refused.headers)[b"Retry-After"]), ("tokens", b"59"))
        self.assertIn("is over its tpm limit of 30 per minute", refused.message)

    def test_tpm_held_by_calls_in_flight(self) -> None:
        """
        A tpm refusal made only by the reservations of calls in flight (the
        window's tokens under tpm) says so, with a short Retry-After and
        what to do (set max_tokens), as the budget's budget_reserved does.
        Trial s27: tpm 1000, one call in flight without max_tokens (1001
        reserved), 14 used: "over its tpm limit", Retry-After 59.
        """
        counters = LocalCounters()
        consumer = Consumer("leaver", tpm=1000)
        counters.counted("leaver", 14, 0.0, 100.0)
        self.assertIsNone(counters.admit(consumer, 101.0, Holder("leaver", "p"), 0.0, 1001))
        refused = counters.admit(consumer, 102.0, Holder("leaver", "p"), 0.0, 1001)
        assert refused is not None
        self.assertEqual((refused.status, refused.code, refused.type), (429, "rate_limit_exceeded", "tokens_reserved"))
        self.assertEqual(dict(refused.headers)[b"Retry-After"], b"2")
        self.assertEqual(
            refused.message,
            "consumer 'leaver': calls in flight hold 1001 tokens of its tpm limit of 1000 per minute (14 used in "
            "the last minute, 1001 reserved by calls in flight until they are counted); retry after 2 s, once they "
            "end, or set max_tokens so that each call reserves less",
        )
        # Room sooner than 2 s (the reservation lapses, 60 s on): that.
        refused = tpm_refused("leaver", 1000, 14, 1001, 1)
        self.assertEqual(dict(refused.headers)[b"Retry-After"], b"1")

    def test_described_with_what_calls_in_flight_hold(self) -> None:
        """
        consumer_list's description of a consumer carries what its calls in
        flight hold (reserved_usd, reserved_tokens) when any, until they are
        counted or lapse.
        """
        clock = Clock()
        clock.advance(1000)
        table = ConsumerTable(None, PriceTable.with_overrides({}), clock=clock.seconds, reserve_tokens=1000)  # type: ignore[arg-type]
        table.consumers["t"] = Consumer("t", tpm=100_000, budget_usd=1.0, budget_period="day")
        self.assertNotIn("reserved_usd", table.describe("t"))
        self.assertNotIn("reserved_tokens", table.describe("t"))
        holder = Holder("t", "p")
        self.assertIsNone(table.admit(holder, "kimi", "moonshot-v1-8k", 4, 10))
        described = table.describe("t")
        self.assertEqual(described["reserved_tokens"], 14)
        self.assertAlmostEqual(described["reserved_usd"], (10 * 0.20 + 4 * 2.00) / 1e6)
        # A tpm reservation never counted lapses after 60 s, a budget's after 15 minutes.
        clock.advance(61)
        self.assertEqual(
            (table.describe("t").get("reserved_tokens"), "reserved_usd" in table.describe("t")), (None, True)
        )
        table.account(holder, "kimi", "moonshot-v1-8k", 200, {"prompt_tokens": 10, "completion_tokens": 4}, 0.1)
        self.assertNotIn("reserved_usd", table.describe("t"))

    def test_budget_held_wording(self) -> None:
        """
        The budget_reserved answer names its consumer once, quoted (trial
        s27: "consumer 'crash''s calls").
        """
        refused = budget_spent(Consumer("crash", budget_usd=1.0, budget_period="day"), 0.5, 1000.0, 0.6)
        self.assertIn("consumer 'crash': calls in flight hold the rest of its budget", refused.message)
        self.assertNotIn("''s", refused.message)

    def test_table_reserves_prompt_and_completion_tokens(self) -> None:
        """
        A chat call reserves its prompt's estimate plus its completion
        tokens, of tpm and (their price) of the budget; the estimate is
        made once, and only for a consumer with a budget or tpm.
        """
        clock = Clock()
        clock.advance(1000)
        table = ConsumerTable(None, PriceTable.with_overrides({}), clock=clock.seconds, reserve_tokens=1000)  # type: ignore[arg-type]
        table.consumers["t"] = Consumer("t", tpm=100_000, budget_usd=1.0, budget_period="day")
        table.consumers["free"] = Consumer("free", rpm=10)
        asked: list[str] = []

        def estimate(name: str, tokens: int) -> Any:
            return lambda: asked.append(name) or tokens

        holder = Holder("t", "p")
        self.assertIsNone(table.admit(holder, "kimi", "moonshot-v1-8k", 4, estimate("t", 10)))
        self.assertEqual(holder.reserved_tokens, 14)
        # 10 prompt tokens at 0.20 USD per million, 4 completion tokens at 2.
        self.assertAlmostEqual(holder.reserved, (10 * 0.20 + 4 * 2.00) / 1e6)
        other = Holder("t", "p")
        self.assertIsNone(table.admit(other, "kimi", "moonshot-v1-8k", None, estimate("t", 10)))
        self.assertEqual(other.reserved_tokens, 1010)
        self.assertIsNone(table.admit(Holder("free", "p"), "kimi", "moonshot-v1-8k", 4, estimate("free", 10)))
        self.assertIsNone(table.admit(GATEWAY, "kimi", "moonshot-v1-8k", 4, estimate("-", 10)))
        self.assertEqual(asked, ["t", "t"])
        # Counted: the reservation is replaced by the actual tokens.
        table.account(holder, "kimi", "moonshot-v1-8k", 200, {"prompt_tokens": 10, "completion_tokens": 4}, 0.1)
        counters = table.counters
        assert isinstance(counters, LocalCounters)
        self.assertEqual(counters.reserved_tokens("t", clock.seconds()), {1000: 1010})
        self.assertEqual(counters.tokens["t"].used(clock.seconds()), 14)

    def test_table_reserves_each_choice(self) -> None:
        """
        A call asking for C{n} choices reserves C{n} completions, of the
        budget and of tpm: the provider bills each (10 concurrent calls
        with n=8 spent 8 times the budget).
        """
        clock = Clock()
        clock.advance(1000)
        table = ConsumerTable(None, PriceTable.with_overrides({}), clock=clock.seconds, reserve_tokens=1000)  # type: ignore[arg-type]
        table.consumers["t"] = Consumer("t", tpm=100_000, budget_usd=1.0, budget_period="day")
        holder = Holder("t", "p")
        self.assertIsNone(table.admit(holder, "kimi", "moonshot-v1-8k", 4, 10, choice_count({"n": 8})))
        self.assertEqual(holder.reserved_tokens, 10 + 8 * 4)
        self.assertAlmostEqual(holder.reserved, (10 * 0.20 + 32 * 2.00) / 1e6)
        other = Holder("t", "p")
        self.assertIsNone(table.admit(other, "kimi", "moonshot-v1-8k", None, 10, choice_count({"n": 3})))
        self.assertEqual(other.reserved_tokens, 10 + 3 * 1000)
        self.assertEqual([choice_count(b) for b in ({}, {"n": 1}, {"n": None}, {"n": True}, {"n": 2})], [1, 1, 1, 1, 2])

    def test_reservation_bounded(self) -> None:
        """
        A C{max_tokens} and C{n} as large as JSON's integers reserve
        MAX_TOKEN_COUNT tokens, not their product: past int64, Redis's
        counters refused the admission script (re-attack s27), and the call
        went by this instance's limits only.
        """
        clock = Clock()
        clock.advance(1000)
        table = ConsumerTable(None, PriceTable.with_overrides({}), clock=clock.seconds)  # type: ignore[arg-type]
        table.consumers["t"] = Consumer("t", tpm=20_000, budget_usd=1.0, budget_period="day")
        holder = Holder("t", "p")
        self.assertIsNone(table.admit(holder, "kimi", "moonshot-v1-8k", 2**63 - 1, 10, choice_count({"n": 2**62})))
        self.assertEqual(holder.reserved_tokens, MAX_TOKEN_COUNT)
        self.assertLess(holder.reserved, 1e7)

    def test_budget_needs_a_price(self) -> None:
        """
        A consumer with a budget may not call a model without a price (its
        spend could not be counted: twelve such calls went through a 0.5
        USD budget), nor be failed over to one; without a budget it may.
        """
        table = ConsumerTable(None, PriceTable.with_overrides({}), clock=lambda: 1000.0)  # type: ignore[arg-type]
        table.consumers["b"] = Consumer("b", budget_usd=0.5, budget_period="total")
        table.consumers["free"] = Consumer("free", rpm=10)
        refused = table.admit(Holder("b", "p"), "kimi", "kimi-k2-0905-preview", 10)
        assert isinstance(refused, APIError)
        self.assertEqual((refused.status, refused.code, refused.param), (403, "model_not_priced", "model"))
        self.assertIn("kimi/kimi-k2-0905-preview has no price", refused.message)
        self.assertIn("PRICES_FILE", refused.message)
        self.assertIsNone(table.admit(Holder("b", "p"), "kimi", "moonshot-v1-8k", 10))
        self.assertIsNone(table.admit(Holder("free", "p"), "kimi", "kimi-k2-0905-preview", 10))
        priced = ConsumerTable(
            None,  # type: ignore[arg-type]
            PriceTable.with_overrides({"kimi/kimi-k2-0905-preview": Price(0.6, 2.5)}),
            clock=lambda: 1000.0,
        )
        priced.consumers["b"] = table.consumers["b"]
        self.assertIsNone(priced.admit(Holder("b", "p"), "kimi", "kimi-k2-0905-preview", 10))
        self.assertEqual(
            table.may_not_use(Holder("b", "p"), "kimi", "kimi-k2-0905-preview"),
            "this key has a budget and kimi's model has no price",
        )
        self.assertIsNone(table.may_not_use(Holder("b", "p"), "kimi", "moonshot-v1-8k"))
        self.assertIsNone(table.may_not_use(Holder("free", "p"), "kimi", "kimi-k2-0905-preview"))
        self.assertIsNone(table.may_not_use(GATEWAY, "kimi", "kimi-k2-0905-preview"))

    def test_estimate_counts_utf8_bytes(self) -> None:
        """
        The estimate is one token per 4 bytes of UTF-8, rounded up: an
        ASCII text's is 4 characters a token, as before; a Chinese one's
        about 0.75 token a character (3 bytes each; Moonshot counts 1.5 to
        2 Chinese characters a token), 3 times what counting characters
        gave.  Prompts, completions, embedding inputs and reservations alike.
        """
        english = "Say hello to the world, please!!"
        chinese = "你好世界" * 100
        self.assertEqual((len(english), len(chinese)), (32, 400))
        # Each text's share, plus one message's and the reply's template tokens.
        template = MESSAGE_TOKENS + REPLY_TOKENS
        self.assertEqual(prompt_tokens({"messages": [{"role": "user", "content": english}]}), 8 + template)
        self.assertEqual(prompt_tokens({"messages": [{"role": "user", "content": chinese}]}), 300 + template)
        parts = [{"type": "text", "text": chinese}, {"type": "text", "text": english}]
        self.assertEqual(prompt_tokens({"messages": [{"role": "user", "content": parts}]}), 308 + template)
        self.assertEqual(estimated_tokens((english, chinese, "é")), 8 + 300 + 1)
        answer = {"choices": [{"message": {"role": "assistant", "content": chinese}}]}
        self.assertEqual(answer_bytes(json.dumps(answer).encode()), 1200)
        chunk = {"choices": [{"delta": {"content": "日本語"}}]}
        self.assertEqual(chunk_bytes(b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"), 9)
        self.assertEqual(estimated_usage(1200, 9), {"prompt_tokens": 300, "completion_tokens": 3, "total_tokens": 303})
        table = ConsumerTable(None, PriceTable.with_overrides({}), clock=Clock().seconds)  # type: ignore[arg-type]
        table.consumers["t"] = Consumer("t", tpm=100_000)
        holder = Holder("t", "p")
        body = {"messages": [{"role": "user", "content": chinese}]}
        self.assertIsNone(table.admit(holder, "kimi", "moonshot-v1-8k", 4, lambda: prompt_tokens(body)))
        self.assertEqual(holder.reserved_tokens, 304 + template)

    def test_estimate_counts_what_providers_bill(self) -> None:
        """
        The prompt's estimate counts what providers bill as prompt: the
        tools declared and a response_format's schema (as JSON), tool
        calls and results, names, each message's and the reply's template
        tokens, and images at a flat estimate.  Trial s27: 40 KB in tools
        or in a json_schema reserved 5 tokens (max_tokens 4 and 'hi'),
        so megabytes of tools passed any budget or tpm.
        """
        blob = "x" * 40_000
        hi = [{"role": "user", "content": "hi"}]
        plain = prompt_tokens({"messages": hi})
        self.assertEqual(plain, 1 + MESSAGE_TOKENS + REPLY_TOKENS)
        tool = {"type": "function", "function": {"name": "f", "description": blob, "parameters": {"type": "object"}}}
        self.assertGreater(prompt_tokens({"messages": hi, "tools": [tool]}), plain + 10_000)
        schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"description": blob}}}
        self.assertGreater(prompt_tokens({"messages": hi, "response_format": schema}), plain + 10_000)
        # A response_format without a schema adds nothing.
        self.assertEqual(prompt_tokens({"messages": hi, "response_format": {"type": "json_object"}}), plain)
        history = [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": blob}}],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": blob},
        ]
        self.assertEqual(prompt_bytes({"messages": history}), 2 + 1 + 40_000 + len("call_1") + 40_000)
        self.assertEqual(prompt_tokens({"messages": history}), 20_003 + 3 * MESSAGE_TOKENS + REPLY_TOKENS)
        # Images: flat, whatever the size of their data URL.
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}
        low = {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}}
        content = [{"type": "text", "text": "hi"}, image, low]
        self.assertEqual(
            prompt_tokens({"messages": [{"role": "user", "content": content}]}),
            plain + IMAGE_TOKENS + IMAGE_LOW_TOKENS,
        )
        self.assertEqual(prompt_tokens({"messages": []}), 0)

    def test_usage_total(self) -> None:
        groups = [
            {"requests": 2, "limited": 1, "prompt_tokens": 3, "completion_tokens": 4, "reasoning_tokens": 0,
             "cost_usd": 0.5, "unpriced_tokens": 0},
            {"requests": 1, "limited": 0, "prompt_tokens": 5, "completion_tokens": 6, "reasoning_tokens": 1,
             "cost_usd": None, "unpriced_tokens": 11},
        ]  # fmt: skip
        self.assertEqual(
            usage_total(groups),
            {"requests": 3, "limited": 1, "prompt_tokens": 8, "completion_tokens": 10, "reasoning_tokens": 1,
             "cost_usd": 0.5, "unpriced_tokens": 11},
        )  # fmt: skip
        self.assertIsNone(usage_total(groups[1:])["cost_usd"])
        # Nothing counted: nothing owed (null is for unpriced tokens).
        self.assertEqual(usage_total([])["cost_usd"], 0.0)

    def test_commands_wait_for_the_table(self) -> None:
        table = ConsumerTable(None, PriceTable.with_overrides({}))  # type: ignore[arg-type]
        handlers = ConsumerCommands(table, time.time).handlers()
        with self.assertRaises(CommandError) as caught:
            handlers["consumer_create"]({"name": "a"})
        self.assertIn("not loaded yet", str(caught.exception))
        table.loaded = True
        self.assertEqual(self.successResultOf(handlers["consumer_list"]({})), {"consumers": [], "next": None})

    def test_list_pages(self) -> None:
        """
        consumer_list's pages: only a page's consumers are described and
        have their spends read (review s31: every consumer left, on every
        page); a page whose consumers were all deleted meanwhile still
        names the next; name and after are not given together.
        """
        table = ConsumerTable(None, PriceTable.with_overrides({}))  # type: ignore[arg-type]
        table.loaded = True
        names = [f"c{i:03d}" for i in range(300)]
        table.consumers = {name: Consumer(name) for name in names}
        described: list[str] = []
        read: list[list[str]] = []
        describe, read_spends = table.describe, table.read_spends
        self.patch(table, "describe", lambda name: described.append(name) or describe(name))
        self.patch(table, "read_spends", lambda page: read.append(list(page)) or read_spends(page))
        handlers = ConsumerCommands(table, time.time, list_bytes=2048).handlers()
        listed: list[str] = []
        data: dict[str, Any] = {}
        while True:
            page = self.successResultOf(handlers["consumer_list"](data))
            listed += [c["name"] for c in page["consumers"]]
            if page["next"] is None:
                break
            data = {"after": page["next"]}
        self.assertEqual(listed, names)
        self.assertEqual(sum(len(names) for names in read), 300)
        # Each page sizes a bounded few more than it holds (quadratic: 3,900).
        self.assertLess(len(described), 5 * 300)
        # Deleted meanwhile: the page is empty, and names the next all the same.
        del table.consumers["c000"], table.consumers["c001"]
        spends: Deferred[None] = Deferred()
        self.patch(table, "read_spends", lambda page: spends)
        first = handlers["consumer_list"]({})
        for name in names[2:20]:
            del table.consumers[name]
        spends.callback(None)
        page = self.successResultOf(first)
        self.assertEqual(page["consumers"], [])
        self.assertGreater(page["next"], "c001")
        with self.assertRaises(CommandError) as caught:
            handlers["consumer_list"]({"name": "c100", "after": "c050"})
        self.assertIn("not both", str(caught.exception))

    def test_reserve_tokens_setting(self) -> None:
        self.patch(os, "environ", {"CONSUMER_RESERVE_TOKENS": "250"})
        cwd = Path(self.mktemp())
        cwd.mkdir(parents=True)
        self.assertEqual(load_settings(cwd=cwd).consumer_reserve_tokens, 250)
        self.patch(os, "environ", {"CONSUMER_RESERVE_TOKENS": "0"})
        with self.assertRaises(ConfigError) as caught:
            load_settings(cwd=cwd)
        self.assertIn("CONSUMER_RESERVE_TOKENS", str(caught.exception))
        self.assertIn("whole number of completion tokens", str(caught.exception))

    def test_prices(self) -> None:
        table = PriceTable.with_overrides(
            parse_prices({"updated": "2026-11-01", "models": {"kimi/x": {"prompt": 1, "completion": 2}}})
        )
        self.assertEqual(table.cost("kimi", "x", 1_000_000, 500_000), 2.0)
        self.assertIsNone(table.cost("kimi", "unknown", 10, 10))
        self.assertEqual(table.cost("kimi", "moonshot-v1-8k", 1_000_000, 0), 0.20)
        self.assertAlmostEqual(table.cost("gemini", "gemini-2.5-flash", 1_000_000, 0, 1_000_000) or 0, 0.075)
        for bad in ({}, {"models": {"x": {"prompt": 1, "completion": 1}}}, {"models": {"a/b": {"prompt": 1}}}):
            self.assertRaises(PricesError, parse_prices, bad)

    def test_readme_lists_the_shipped_prices(self) -> None:
        """
        The README names every model the shipped table prices, and no
        other (trial s25: it said C{moonshot-v1-*}, and moonshot-v1-auto
        and the vision previews were refused as unpriced).
        """
        readme = (Path(__file__).resolve().parent.parent / "README.rst").read_text("utf-8")
        said = " ".join(readme.split("The shipped table holds ", 1)[1].split(", no\n  other", 1)[0].split())
        listed = {word.strip("`,") for word in said.split() if "/" in word}
        self.assertEqual(listed, set(shipped_prices()))

    def test_readme_price_table_is_the_shipped_one(self) -> None:
        """
        README's table of the shipped prices (model, prompt, completion,
        cached_prompt, US dollars per million tokens; C{\\-}: none) is
        shipped_prices(), every price of every model (trial s32: operators
        sizing budgets had to read the code).
        """
        readme = (Path(__file__).resolve().parent.parent / "README.rst").read_text("utf-8")
        lines = readme.split("\n  model ", 1)[1].splitlines()
        self.assertEqual(lines[0].split(), ["prompt", "completion", "cached_prompt"])
        rows = list(itertools.takewhile(lambda line: not line.strip().startswith("="), lines[2:]))
        table = {}
        for row in rows:
            model, prompt, completion, cached = row.split()
            self.assertRegex(model, r"^``[a-z0-9./-]+``$")
            table[model.strip("`")] = Price(
                float(prompt), float(completion), None if cached == "\\-" else float(cached)
            )
        self.assertEqual(len(table), len(rows))
        self.assertEqual(table, shipped_prices())


class StoreTests:
    """
    The same tests against SQLite and PostgreSQL (the subclasses).
    """

    timeout = 60

    def open_store(self) -> ConsumerStore:
        raise NotImplementedError

    @inlineCallbacks
    def test_schema_usage_and_purge(self) -> Any:
        store = self.open_store()
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        version = yield store.migrate()
        again = yield store.migrate()
        self.assertEqual((version, again), (3, 3))  # type: ignore[attr-defined]
        now = time.time()
        key = NewKey.make()
        team = Consumer("team", budget_usd=2.0, rpm=5, models=("kimi/*",), created_at=now)
        yield store.create(team, key.hash, key.prefix)
        second = NewKey.make()
        added = yield store.add_key(team, second.hash, second.prefix, now)
        self.assertTrue(added)  # type: ignore[attr-defined]
        revoked = yield store.revoke_key("team", second.prefix)
        self.assertEqual(revoked, 1)  # type: ignore[attr-defined]
        yield store.record(
            [
                UsageRow(now - 86400, "team", key.prefix, "kimi", "m", 200, 10, 5, 1, 0.5),
                UsageRow(now, "team", key.prefix, "kimi", "m", 200, 10, 5, 0, 0.25),
                UsageRow(now, "team", key.prefix, "gemini", "free", 200, 7, 3, 0, None),
                UsageRow(now, "team", key.prefix, "kimi", "m", 429, limited=True),
                # The gateway's own keys' calls, summed: three in one row.
                UsageRow(now, "-", "-", "kimi", "m", 200, 30, 15, 0, 0.75, 30.0, requests=3),
            ]
        )
        snapshot = yield store.load(now)
        self.assertEqual(set(snapshot.keys.values()), {("team", key.prefix)})  # type: ignore[attr-defined]
        self.assertEqual(snapshot.consumers["team"].models, ("kimi/*",))  # type: ignore[attr-defined]
        self.assertAlmostEqual(snapshot.spend[("team", "total")], 0.75)  # type: ignore[attr-defined]
        [total] = yield store.usage("team", None, None, None)
        self.assertEqual(  # type: ignore[attr-defined]
            total,
            {
                "requests": 3,
                "limited": 1,
                "prompt_tokens": 27,
                "completion_tokens": 13,
                "reasoning_tokens": 1,
                "cost_usd": 0.75,
                "unpriced_tokens": 10,
            },
        )
        by_consumer = yield store.usage(None, None, None, "consumer")
        self.assertEqual(  # type: ignore[attr-defined]
            [(row["consumer"], row["requests"], row["prompt_tokens"]) for row in by_consumer],
            [("-", 3, 30), ("team", 3, 27)],
        )
        by_model = yield store.usage(None, now - 60, None, "model")
        self.assertEqual([row["model"] for row in by_model], ["gemini/free", "kimi/m"])  # type: ignore[attr-defined]
        self.assertIsNone(by_model[0]["cost_usd"])  # type: ignore[attr-defined]
        by_day = yield store.usage(None, None, None, "day")
        self.assertEqual(len(by_day), 2)  # type: ignore[attr-defined]
        purged = yield store.purge(now - 3600)
        self.assertEqual(purged, 1)  # type: ignore[attr-defined]
        # The gateway's summed row adds no spend: it has no consumer.
        snapshot = yield store.load(now)
        self.assertAlmostEqual(snapshot.spend[("team", "total")], 0.75)  # type: ignore[attr-defined]
        self.assertNotIn(("-", "total"), snapshot.spend)  # type: ignore[attr-defined]
        yield store.delete("team", "team@2026-11-01T00:00:00Z")
        snapshot = yield store.load(now)
        self.assertEqual((snapshot.consumers, snapshot.keys), ({}, {}))  # type: ignore[attr-defined]
        # Its spend goes; its usage is kept under its retired name.
        self.assertNotIn(("team", "total"), snapshot.spend)  # type: ignore[attr-defined]
        kept = yield store.usage("team@2026-11-01T00:00:00Z", None, None, None)
        self.assertGreater(kept[0]["requests"], 0)  # type: ignore[index]
        gone = yield store.usage("team", None, None, None)
        self.assertEqual(gone[0]["requests"], 0)  # type: ignore[index]

    @inlineCallbacks
    def test_batch_written_again(self) -> Any:
        """
        A batch of usage rows written again (its first write committed,
        its answer lost: a connection cut just after the C{COMMIT}) adds
        neither its rows nor their cost twice (trial s34: 135 rows and
        their spend for 72 calls); the rows of the batch not yet written,
        and rows with no key, are written.
        """
        store = self.open_store()
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        yield store.migrate()
        now = time.time()
        key = NewKey.make()
        yield store.create(Consumer("team", created_at=now), key.hash, key.prefix)
        ids = RowIds()
        first = [UsageRow(now, "team", key.prefix, "kimi", "m", 200, 10, 5, 0, 0.25, row_id=ids()) for _ in range(3)]
        gateway = UsageRow(now, "-", "-", "kimi", "m", 200, 30, 15, 0, 0.75, requests=3, row_id=ids())
        yield store.record([*first, gateway])
        later = UsageRow(now, "team", key.prefix, "kimi", "m", 200, 10, 5, 0, 0.5, row_id=ids())
        keyless = UsageRow(now, "team", key.prefix, "kimi", "m", 200, 1, 1, 0, 0.125)
        yield store.record([*first, gateway, later, keyless])
        yield store.record([*first, gateway, later])
        snapshot = yield store.load(now)
        self.assertAlmostEqual(snapshot.spend[("team", "total")], 3 * 0.25 + 0.5 + 0.125)  # type: ignore[attr-defined]
        by_consumer = yield store.usage(None, None, None, "consumer")
        self.assertEqual(  # type: ignore[attr-defined]
            [(row["consumer"], row["requests"], row["prompt_tokens"]) for row in by_consumer],
            [("-", 3, 30), ("team", 5, 41)],
        )
        # Keys from another process's RowIds are other rows.
        self.assertNotEqual(RowIds().prefix, ids.prefix)  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_changes_to_a_consumer_gone(self) -> Any:
        """
        A key or an update for a consumer the database no longer has
        (deleted by another command or instance), or has again under its
        name (created since), is not written (review s25: a key written
        after the delete outlived it and opened the consumer created
        again under the name).
        """
        store = self.open_store()
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        yield store.migrate()
        now = creation_time(time.time())
        team = Consumer("team", rpm=5, created_at=now)
        yield store.create(team, NewKey.make().hash, "sk-oc-first")
        yield store.delete("team", retired_name(team))
        key = NewKey.make()
        added = yield store.add_key(team, key.hash, key.prefix, now)
        updated = yield store.update(team, {"name": "team", "rpm": 6})
        self.assertEqual((added, updated is not None), (False, False))  # type: ignore[attr-defined]
        again = Consumer("team", created_at=now + 1)
        yield store.create(again, NewKey.make().hash, "sk-oc-again")
        added = yield store.add_key(team, key.hash, key.prefix, now)
        updated = yield store.update(team, {"name": "team", "rpm": 6})
        self.assertEqual((added, updated is not None), (False, False))  # type: ignore[attr-defined]
        snapshot = yield store.load(now)
        self.assertEqual(list(snapshot.keys.values()), [("team", "sk-oc-again")])  # type: ignore[attr-defined]
        self.assertIsNone(snapshot.consumers["team"].rpm)  # type: ignore[attr-defined]
        added = yield store.add_key(again, key.hash, key.prefix, now)
        self.assertTrue(added)  # type: ignore[attr-defined]
        # A key a deleted consumer left (an older version's delete) opens
        # no consumer created again under its name.
        orphan = NewKey.make()
        yield store._interact(
            lambda cursor: cursor.execute(
                store._sql("INSERT INTO consumer_keys (hash, prefix, consumer, created_at) VALUES (?, ?, ?, ?)"),
                (orphan.hash, "sk-oc-orphan", "other", now),
            )
        )
        yield store.create(Consumer("other", created_at=now), NewKey.make().hash, "sk-oc-other")
        snapshot = yield store.load(now)
        self.assertNotIn(orphan.hash, snapshot.keys)  # type: ignore[attr-defined]


class SQLiteStoreTests(StoreTests, TestCase):
    def open_store(self) -> ConsumerStore:
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        return ConsumerStore.open(None, directory, reactor)

    @inlineCallbacks
    def test_wal(self) -> Any:
        store = self.open_store()
        self.addCleanup(store.close)
        yield store.migrate()
        mode = yield store.pool.runQuery("PRAGMA journal_mode")
        self.assertEqual(mode[0][0], "wal")

    @inlineCallbacks
    def test_rows_written_before_requests_count_one(self) -> Any:
        """
        A database of the first schema (one row per request, no
        C{requests} column) keeps its counts after the migration.
        """
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        import sqlite3

        from openclaw.consumers.store import MIGRATIONS

        with contextlib.closing(sqlite3.connect(directory / "openclaw.db")) as connection:
            connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            connection.execute("INSERT INTO schema_version (version) VALUES (1)")
            for statement in MIGRATIONS[0]:
                connection.execute(statement)
            connection.execute(
                "INSERT INTO usage_rows VALUES (?, '2026-01-01', '-', '-', 'kimi', 'm', 200, 3, 4, 0, NULL, 1.0, 0)",
                (time.time(),),
            )
            connection.commit()
        store = ConsumerStore.open(None, directory, reactor)
        self.addCleanup(store.close)
        version = yield store.migrate()
        self.assertEqual(version, len(MIGRATIONS))
        [total] = yield store.usage(None, None, None, None)
        self.assertEqual((total["requests"], total["prompt_tokens"], total["unpriced_tokens"]), (1, 3, 7))
        # A row written before row keys has none; later ones are written.
        yield store.record([UsageRow(time.time(), "-", "-", "kimi", "m", 200, 1, 0, 0, None, row_id=RowIds()())])
        [total] = yield store.usage(None, None, None, None)
        self.assertEqual(total["requests"], 2)

    @inlineCallbacks
    def test_newer_schema_refused(self) -> Any:
        """
        A database a later openclaw upgraded (a downgrade) is not used,
        with one line saying what to do: it was run without a word.
        """
        import sqlite3

        from openclaw.consumers.store import NewerSchema, database_advice, log_database_failure

        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        with contextlib.closing(sqlite3.connect(directory / "openclaw.db")) as connection:
            connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            connection.execute("INSERT INTO schema_version (version) VALUES (7)")
            connection.commit()
        store = ConsumerStore.open(None, directory, reactor)
        self.addCleanup(store.close)
        failure = yield self.assertFailure(store.migrate(), NewerSchema)
        self.assertIn("schema version 7, which a later openclaw wrote", str(failure))
        events: list[dict[str, Any]] = []
        log_database_failure(Logger(observer=events.append), "cannot use it ({error}): {advice}", Failure(failure))
        [event] = events
        self.assertIsNone(event.get("log_failure"))
        self.assertIn("run the later openclaw that upgraded it", database_advice(Failure(failure)))
        # Nothing is written to it, nor purged from it, from then on.
        yield self.assertFailure(store.record([UsageRow(time.time(), "-", "-", "kimi", "m", 200)]), NewerSchema)
        yield self.assertFailure(store.purge(time.time()), NewerSchema)


class NewerSchemaGatewayTests(TestCase):
    @inlineCallbacks
    def test_commands_and_probe_say_why(self) -> Any:
        """
        With a later openclaw's database, the consumer commands and
        /readyz name the schema, not "not loaded yet, retry" for ever.
        """
        import sqlite3

        state_dir = Path(self.mktemp())
        state_dir.mkdir(parents=True)
        state_dir.chmod(0o700)
        with contextlib.closing(sqlite3.connect(state_dir / "openclaw.db")) as connection:
            connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            connection.execute("INSERT INTO schema_version (version) VALUES (7)")
            connection.commit()
        (state_dir / "openclaw.db").chmod(0o600)
        gateway = start_gateway(self, api=True, state_dir=state_dir, gateway_api_keys=(GATEWAY_KEY,))
        self.addCleanup(gateway.service.api_site.close_connections)
        yield gateway.service.consumers_ready
        client = yield open_client(self, gateway.port)
        answer = yield client.command(gateway.token, "consumer_list", None)
        self.assertFalse(answer["ok"])
        self.assertIn("cannot be used: it is at schema version 7", answer["error"])
        try:
            yield deferToThread(urllib.request.urlopen, f"http://127.0.0.1:{gateway.api_port}/readyz", timeout=10)
        except urllib.error.HTTPError as e:
            self.assertEqual(e.code, 503)
            self.assertIn("schema version 7", json.loads(e.read())["reason"])
        else:
            self.fail("ready with a later openclaw's database")
        self.flushLoggedErrors()


class RecordingStore:
    """
    A store that keeps the usage rows it is given.
    """

    def __init__(self) -> None:
        self.rows: list[UsageRow] = []

    def record(self, rows: list[UsageRow]) -> Deferred[None]:
        self.rows.extend(rows)
        return succeed(None)


class RefusingStore:
    """
    A store whose database refuses every write.
    """

    def __init__(self) -> None:
        self.tries = 0

    def record(self, rows: list[UsageRow]) -> Deferred[None]:
        self.tries += 1
        return fail(OSError("the database refused the write"))


class UsageRowsAtStopTests(TestCase):
    def test_failed_write_at_stop_is_given_up_and_said_so(self) -> None:
        """
        A write that fails while the table stops has no next try: the rows
        are given up, and the log says so (not "kept for the next try").
        """
        events = capture_log_events(self)
        store = RefusingStore()
        table = ConsumerTable(store, PriceTable.with_overrides({}), clock=Clock().seconds)  # type: ignore[arg-type]
        table.consumers["team"] = Consumer("team")
        table.account(Holder("team", "oc_t"), "kimi", "moonshot-v1-8k", 200, {"prompt_tokens": 1}, 0.01)
        stopped = table.stop()
        self.assertTrue(stopped.called)
        self.assertEqual(store.tries, 1)
        said = [formatEvent(event) for event in events if event.get("log_failure") is not None]
        self.flushLoggedErrors(OSError)
        self.assertEqual(len(said), 1, said)
        self.assertIn("given up", said[0])
        self.assertNotIn("next try", said[0])
        # Nothing is left to write later.
        table.flush()
        self.assertEqual(store.tries, 1)

    def stopping_table(self, store: Any, clock: Clock) -> ConsumerTable:
        table = ConsumerTable(store, PriceTable.with_overrides({}), clock=clock.seconds)
        table.consumers["team"] = Consumer("team")
        table.account(Holder("team", "oc_t"), "kimi", "moonshot-v1-8k", 200, {"prompt_tokens": 1}, 0.01)
        return table

    def test_failed_writes_at_stop_tried_again_until_written(self) -> None:
        """
        A database that refuses the last rows a few times at stop, then
        takes them: tried again after a short back-off (0.1 s, doubled),
        written, and nothing is said to be given up.
        """
        events = capture_log_events(self)
        clock = Clock()
        store = FlakyStore(failures=3)
        table = self.stopping_table(store, clock)
        stopped = table.stop(clock, until=clock.seconds() + 10)
        self.assertFalse(stopped.called)
        self.assertEqual(store.tries, 1)
        for tries in (2, 3):
            clock.advance(0.1 * 2 ** (tries - 2))
            self.assertEqual(store.tries, tries)
            self.assertFalse(stopped.called)
        clock.advance(0.4)
        self.assertEqual(store.tries, 4)
        self.assertTrue(stopped.called)
        self.assertEqual([(row.consumer, row.prompt_tokens) for row in store.rows], [("team", 1)])
        self.assertEqual([e for e in events if e.get("log_namespace", "").startswith("openclaw.consumers")], [])
        self.flushLoggedErrors(OSError)

    def test_failed_writes_at_stop_given_up_at_the_end_of_the_grace(self) -> None:
        """
        A database that keeps refusing: the rows are tried again (at most a
        second apart) until the grace is over, then given up with one line;
        not before.
        """
        events = capture_log_events(self)
        clock = Clock()
        store = RefusingStore()
        table = self.stopping_table(store, clock)
        stopped = table.stop(clock, until=clock.seconds() + 10)
        while not stopped.called and clock.seconds() < 20:
            clock.advance(0.05)
        self.assertTrue(stopped.called)
        self.assertGreaterEqual(clock.seconds(), 9.8)
        self.assertLessEqual(clock.seconds(), 10.0)
        self.assertGreater(store.tries, 10)
        said = [formatEvent(e) for e in events if e.get("log_namespace", "").startswith("openclaw.consumers")]
        self.flushLoggedErrors(OSError)
        self.assertEqual(len(said), 1, said)
        self.assertIn(
            "could not write the last 1 usage rows at stop (the database refused the write); given up", said[0]
        )
        tries = store.tries
        clock.advance(10)
        table.flush()
        self.assertEqual(store.tries, tries)

    def test_write_that_never_ends_given_up_at_the_end_of_the_grace(self) -> None:
        """
        A database that refuses the last rows, then never answers the try
        started just before the deadline (a host that swallows packets):
        the table stops waiting at the deadline, gives the rows up with one
        line, and has no timer left; the write failing later is neither
        tried again nor logged again.
        """
        events = capture_log_events(self)
        clock = Clock()
        store = HangingStore(refusals=3)
        table = self.stopping_table(store, clock)
        stopped = table.stop(clock, until=clock.seconds() + 10)
        while store.tries < 4:
            clock.advance(0.05)
        self.assertFalse(stopped.called)
        clock.advance(10 - clock.seconds() - 0.01)
        self.assertFalse(stopped.called)
        clock.advance(0.01)
        self.assertTrue(stopped.called)
        self.assertEqual(clock.getDelayedCalls(), [])
        said = [formatEvent(e) for e in events if e.get("log_namespace", "").startswith("openclaw.consumers")]
        self.assertEqual(len(said), 1, said)
        self.assertIn(
            "could not write the last 1 usage rows at stop (the database did not answer by the end of the shutdown "
            "grace); given up",
            said[0],
        )
        store.hanging.errback(OSError("connection timed out"))
        clock.advance(10)
        table.flush()
        self.assertEqual(store.tries, 4)
        said = [formatEvent(e) for e in events if e.get("log_namespace", "").startswith("openclaw.consumers")]
        self.assertEqual(len(said), 1, said)
        self.flushLoggedErrors(OSError)

    def test_write_under_way_at_stop_that_never_ends(self) -> None:
        """
        A write the timer started before the stop, never answered: given up
        at the deadline with its rows and those that came in after it.
        """
        events = capture_log_events(self)
        clock = Clock()
        store = HangingStore(refusals=0)
        table = self.stopping_table(store, clock)
        table.flush()
        table.account(Holder("team", "oc_t"), "kimi", "moonshot-v1-8k", 200, {"prompt_tokens": 2}, 0.01)
        stopped = table.stop(clock, until=clock.seconds() + 5)
        clock.advance(5)
        self.assertTrue(stopped.called)
        self.assertEqual(store.tries, 1)
        said = [formatEvent(e) for e in events if e.get("log_namespace", "").startswith("openclaw.consumers")]
        self.assertEqual(len(said), 1, said)
        self.assertIn("could not write the last 2 usage rows at stop", said[0])

    def test_write_that_ends_just_before_the_deadline(self) -> None:
        """
        A slow database that takes the last rows 10 ms before the deadline:
        written, nothing said, no timer left.
        """
        events = capture_log_events(self)
        clock = Clock()
        store = SlowStore(clock, 9.99)
        table = self.stopping_table(store, clock)
        stopped = table.stop(clock, until=clock.seconds() + 10)
        clock.advance(9.99)
        self.assertTrue(stopped.called)
        self.assertEqual([(row.consumer, row.prompt_tokens) for row in store.rows], [("team", 1)])
        self.assertEqual([e for e in events if e.get("log_namespace", "").startswith("openclaw.consumers")], [])
        self.assertEqual(clock.getDelayedCalls(), [])


class HangingStore:
    """
    A store whose database refuses the first C{refusals} writes, then never
    answers (C{hanging}: the write under way).
    """

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.tries = 0
        self.hanging: Deferred[None] = Deferred()

    def record(self, rows: list[UsageRow]) -> Deferred[None]:
        self.tries += 1
        if self.tries <= self.refusals:
            return fail(OSError("the database refused the write"))
        return self.hanging


class SlowStore(RecordingStore):
    """
    A store whose database takes each write C{seconds} to answer.
    """

    def __init__(self, clock: Clock, seconds: float) -> None:
        super().__init__()
        self.clock = clock
        self.seconds = seconds

    def record(self, rows: list[UsageRow]) -> Deferred[None]:
        return deferLater(self.clock, self.seconds, super().record, rows).addCallback(lambda _: None)


class FlakyStore(RecordingStore):
    """
    A store whose database refuses the first C{failures} writes, then takes
    them.
    """

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.tries = 0

    def record(self, rows: list[UsageRow]) -> Deferred[None]:
        self.tries += 1
        if self.tries <= self.failures:
            return fail(OSError("the database refused the write"))
        return super().record(rows)


class LostAnswerStore(RecordingStore):
    """
    A store whose first write is committed but its answer lost (the
    connection cut just after C{COMMIT}): the rows are taken, and the
    write fails all the same.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tries = 0

    def record(self, rows: list[UsageRow]) -> Deferred[None]:
        self.tries += 1
        super().record(rows)
        if self.tries == 1:
            return fail(OSError("server closed the connection unexpectedly"))
        return succeed(None)


class LostCommitAnswerTests(TestCase):
    def test_rows_tried_again_keep_their_keys(self) -> None:
        """
        Rows put back after a failed write keep their keys
        (L{UsageRow.row_id}), so the store, finding them written already,
        writes them once (trial s34); rows counted since have keys of their
        own, a consumer's and the gateway keys' summed ones alike.
        """
        clock = Clock()
        store = LostAnswerStore()
        table = ConsumerTable(store, PriceTable.with_overrides({}), clock=clock.seconds)  # type: ignore[arg-type]
        self.addCleanup(self.flushLoggedErrors, OSError)
        table.consumers["team"] = Consumer("team")
        for _ in range(2):
            table.account(Holder("team", "oc_t"), "kimi", "moonshot-v1-8k", 200, {"prompt_tokens": 1}, 0.01)
        table.account(GATEWAY, "kimi", "moonshot-v1-8k", 200, {"prompt_tokens": 1}, 0.01)
        table.flush()
        first = [row.row_id for row in store.rows]
        self.assertEqual(len(first), 3)
        self.assertNotIn(None, first)
        self.assertEqual(len(set(first)), 3)
        self.assertEqual(table.pending_rows(), 3)
        table.account(Holder("team", "oc_t"), "kimi", "moonshot-v1-8k", 200, {"prompt_tokens": 1}, 0.01)
        table.flush()
        again = [row.row_id for row in store.rows[3:]]
        self.assertEqual(again[:3], first)
        self.assertEqual(len(set(again)), 4)
        self.assertEqual(table.pending_rows(), 0)


class UsageRowsOutageTests(TestCase):
    def test_failures_logged_once_a_minute_and_counted(self) -> None:
        """
        A database that refuses writes for minutes: one error line at the
        first failure (with its traceback), then one a minute (not one a
        second, with a traceback each), one line when rows are written
        again; the rows waiting are a gauge.
        """
        events = capture_log_events(self)
        clock = Clock()
        store = RefusingStore()
        registry = CollectorRegistry()
        table = ConsumerTable(
            store,  # type: ignore[arg-type]
            PriceTable.with_overrides({}),
            clock=clock.seconds,
            metrics=ConsumerMetrics(registry),
        )
        table.consumers["team"] = Consumer("team")
        for _ in range(150):
            table.account(Holder("team", "oc_t"), "kimi", "moonshot-v1-8k", 200, {"prompt_tokens": 1}, 0.01)
            table.flush()
            clock.advance(1)
        self.assertEqual(store.tries, 150)
        self.assertEqual(registry.get_sample_value("openclaw_consumer_usage_rows_pending"), 150)
        said = [formatEvent(e) for e in events if e.get("log_namespace", "").startswith("openclaw.consumers")]
        self.assertEqual(len(said), 3, said)  # at 0 s, 60 s and 120 s
        self.assertIn("could not write 1 usage rows (the database refused the write)", said[0])
        self.assertIn("still cannot write usage rows after 60 s", said[1])
        levels = [e["log_level"] for e in events if e.get("log_namespace", "").startswith("openclaw.consumers")]
        self.assertEqual(levels, [LogLevel.error, LogLevel.critical, LogLevel.critical])
        self.assertIn("still cannot write usage rows after 120 s", said[2])
        self.assertIn("121 waiting", said[2])
        # The first with its traceback (a fault of ours would show), the rest without.
        self.assertEqual(len([e for e in events if e.get("log_failure") is not None]), 1)
        self.flushLoggedErrors(OSError)
        table.store = RecordingStore()  # type: ignore[assignment]
        table.flush()
        self.assertEqual(registry.get_sample_value("openclaw_consumer_usage_rows_pending"), 0)
        self.assertIn("usage rows written again after 150 s of failures (150 rows)", formatEvent(events[-1]))

    def test_rows_being_written_are_pending(self) -> None:
        """
        Rows in a write the database holds (a SQLite locked by another
        process, a stalled PostgreSQL) are pending until written: the
        gauge read 0 through an 80 s lock.
        """
        store = HeldStore()
        registry = CollectorRegistry()
        table = ConsumerTable(
            store,  # type: ignore[arg-type]
            PriceTable.with_overrides({}),
            clock=Clock().seconds,
            metrics=ConsumerMetrics(registry),
        )
        table.consumers["team"] = Consumer("team")
        for _ in range(3):
            table.account(Holder("team", "oc_t"), "kimi", "moonshot-v1-8k", 200, {"prompt_tokens": 1}, 0.01)
        table.flush()
        table.account(Holder("team", "oc_t"), "kimi", "moonshot-v1-8k", 200, {"prompt_tokens": 1}, 0.01)
        self.assertEqual(registry.get_sample_value("openclaw_consumer_usage_rows_pending"), 4)
        store.writing.callback(None)
        self.assertEqual(registry.get_sample_value("openclaw_consumer_usage_rows_pending"), 1)


class HeldStore:
    """
    A store whose write waits until the test lets it end.
    """

    def __init__(self) -> None:
        self.writing: Deferred[None] = Deferred()

    def record(self, rows: list[UsageRow]) -> Deferred[None]:
        return self.writing


#: What psycopg raises when PostgreSQL is down: libpq's text, on two lines.
REFUSED = (
    'connection failed: connection to server at "127.0.0.1", port 5432 failed: Connection refused\n'
    "\tIs the server running on that host and accepting TCP/IP connections?"
)


class UnreachableStore:
    """
    A store whose PostgreSQL is down.
    """

    def record(self, rows: list[UsageRow]) -> Deferred[None]:
        return fail(psycopg.OperationalError(REFUSED))

    def create(self, consumer: Consumer, hash: str, prefix: str) -> Deferred[None]:
        return fail(psycopg.OperationalError(REFUSED))


class DatabaseUnreachableTests(TestCase):
    """
    PostgreSQL down is the operator's to fix, not a fault of ours: one
    line each, saying what to check, and no traceback.
    """

    def test_usage_rows_unwritten_in_one_line(self) -> None:
        events = capture_log_events(self)
        table = ConsumerTable(UnreachableStore(), PriceTable.with_overrides({}), clock=Clock().seconds)  # type: ignore[arg-type]
        table.consumers["team"] = Consumer("team")
        table.account(Holder("team", "oc_t"), "kimi", "moonshot-v1-8k", 200, {"prompt_tokens": 1}, 0.01)
        table.flush()
        [said] = [e for e in events if e.get("log_namespace", "").startswith("openclaw.consumers")]
        self.assertNotIn("log_failure", said)
        # An error at first (nothing is lost yet; a write tried again is
        # usually taken), critical once it has failed for a minute.
        self.assertEqual(said["log_level"], LogLevel.error)
        line = formatEvent(said)
        self.assertNotIn("\n", line)
        self.assertIn("Connection refused; Is the server running", line)
        self.assertIn("check DATABASE_URL / STATE_DIR", line)
        self.assertEqual(self.flushLoggedErrors(), [])

    @inlineCallbacks
    def test_command_error_in_one_line_with_what_to_do(self) -> Any:
        """
        As C{usage}'s: the error's text on one line, then what to do.
        """
        table = ConsumerTable(UnreachableStore(), PriceTable.with_overrides({}), clock=Clock().seconds)  # type: ignore[arg-type]
        table.loaded = True
        commands = ConsumerCommands(table, Clock().seconds)
        failure = yield self.assertFailure(commands.consumer_create({"name": "we"}), CommandError)
        self.assertEqual(
            str(failure),
            "the consumers' database could not be written: connection failed: connection to server at "
            '"127.0.0.1", port 5432 failed: Connection refused; Is the server running on that host and accepting '
            "TCP/IP connections?; check DATABASE_URL (or STATE_DIR) and the gateway's log, and once it is "
            "reachable see whether the change was made (openclawctl consumer list: a connection lost at the "
            "commit may have made it) before retrying",
        )


class UsageRowsTests(TestCase):
    """
    A consumer's call is a usage row of its own (issue #19); the calls of
    GATEWAY_API_KEYS' keys are summed per UTC minute, provider, model and
    status until the flush.
    """

    def test_gateway_calls_summed_per_minute(self) -> None:
        clock = Clock()
        clock.advance(120 * 60 + 5)
        store = RecordingStore()
        prices = PriceTable.with_overrides({"kimi/moonshot-v1-8k": Price(1.0, 2.0)})
        table = ConsumerTable(store, prices, clock=clock.seconds)  # type: ignore[arg-type]
        table.consumers["team"] = Consumer("team")
        usage = {"prompt_tokens": 10, "completion_tokens": 5}
        for _ in range(3):
            table.account(GATEWAY, "kimi", "moonshot-v1-8k", 200, usage, 0.010)
            table.account(Holder("team", "oc_t"), "kimi", "moonshot-v1-8k", 200, usage, 0.010)
        table.account(GATEWAY, "kimi", "moonshot-v1-8k", 502, None, 0.5)
        table.account(GATEWAY, "kimi", "unpriced", 200, usage, 0.1)
        clock.advance(60)  # the next minute: a row of its own
        table.account(GATEWAY, "kimi", "moonshot-v1-8k", 200, usage, 0.010)
        table.flush()
        team = [row for row in store.rows if row.consumer == "team"]
        self.assertEqual([(row.requests, row.prompt_tokens) for row in team], [(1, 10)] * 3)
        gateway = sorted(
            (row.ts, row.model, row.status, row.requests, row.prompt_tokens, row.completion_tokens, row.cost_usd)
            for row in store.rows
            if row.consumer == "-"
        )
        cost = (10 * 1.0 + 5 * 2.0) / 1e6
        self.assertEqual(
            [entry[:6] for entry in gateway],
            [
                (7200.0, "moonshot-v1-8k", 200, 3, 30, 15),
                (7200.0, "moonshot-v1-8k", 502, 1, 0, 0),
                (7200.0, "unpriced", 200, 1, 10, 5),
                (7260.0, "moonshot-v1-8k", 200, 1, 10, 5),
            ],
        )
        self.assertAlmostEqual(gateway[0][6], 3 * cost)
        self.assertIsNone(gateway[2][6])
        self.assertEqual({row.key_prefix for row in store.rows if row.consumer == "-"}, {"-"})
        self.assertAlmostEqual(sum(row.duration_ms for row in store.rows if row.consumer == "-"), 640.0)
        # Taken out at the flush: the next writes only what came since.
        store.rows.clear()
        table.flush()
        self.assertEqual(store.rows, [])

    def test_gateway_sums_bounded(self) -> None:
        """
        Once taken, the sums of GATEWAY_API_KEYS' calls are not kept:
        however many model names clients send, what is held stays small,
        and the rows taken count every call.
        """
        usage = GatewayUsage(PriceTable())
        rows = []
        for n in range(2000):
            usage.count("kimi", f"model-{n}", 404, (3, 0, 0, 0), 0.001, 60.0 * n)
            if n % 100 == 99:
                taken = usage.take()
                self.assertEqual(len(taken), 100)
                rows.extend(taken)
        held = sum(len(value) for value in vars(usage).values() if isinstance(value, (dict, list)))
        self.assertLess(held, 10)
        self.assertEqual(sum(row.requests for row in rows), 2000)
        self.assertEqual(sum(row.prompt_tokens for row in rows), 6000)

    def test_gateway_calls_in_consumer_metrics(self) -> None:
        """
        The summed calls of GATEWAY_API_KEYS' keys are
        C{openclaw_consumer_*{consumer="-"}} series, before a flush and
        after it alike.
        """
        clock = Clock()
        registry = CollectorRegistry()
        prices = PriceTable.with_overrides({"kimi/moonshot-v1-8k": Price(1.0, 2.0, 0.5)})
        table = ConsumerTable(
            RecordingStore(),  # type: ignore[arg-type]
            prices,
            clock=clock.seconds,
            metrics=ConsumerMetrics(registry),
        )
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4}}
        table.account(GATEWAY, "kimi", "moonshot-v1-8k", 200, usage, 0.010)
        table.account(GATEWAY, "kimi", "moonshot-v1-8k", 502, None, 0.5)
        table.listed(GATEWAY, 200)
        cost = (6 * 1.0 + 4 * 0.5 + 5 * 2.0) / 1e6

        def figures() -> dict[str, float]:
            return {
                f"{sample.name}{sorted(sample.labels.items())}": sample.value
                for family in registry.collect()
                for sample in family.samples
                if sample.labels.get("consumer") == "-" and not sample.name.endswith("_created")
            }

        expected = {
            "openclaw_consumer_requests_total[('consumer', '-'), ('status', '200')]": 2.0,
            "openclaw_consumer_requests_total[('consumer', '-'), ('status', '502')]": 1.0,
            "openclaw_consumer_tokens_total[('consumer', '-'), ('kind', 'completion')]": 5.0,
            "openclaw_consumer_tokens_total[('consumer', '-'), ('kind', 'prompt')]": 10.0,
        }
        before = figures()
        self.assertAlmostEqual(before.pop("openclaw_consumer_spend_usd_total[('consumer', '-')]"), cost)
        self.assertEqual(before, expected)
        table.flush()
        clock.advance(60)
        table.account(GATEWAY, "kimi", "moonshot-v1-8k", 200, usage, 0.010)
        after = figures()
        self.assertAlmostEqual(after.pop("openclaw_consumer_spend_usd_total[('consumer', '-')]"), 2 * cost)
        expected["openclaw_consumer_requests_total[('consumer', '-'), ('status', '200')]"] = 3.0
        expected["openclaw_consumer_tokens_total[('consumer', '-'), ('kind', 'completion')]"] = 10.0
        expected["openclaw_consumer_tokens_total[('consumer', '-'), ('kind', 'prompt')]"] = 20.0
        self.assertEqual(after, expected)


class PostgresStoreTests(StoreTests, TestCase):
    def open_store(self) -> ConsumerStore:
        return ConsumerStore.open(postgres_database(), Path("."), reactor)

    @inlineCallbacks
    def test_connection_dropped_by_the_server(self) -> Any:
        """
        The server drops the pool's connections (a restart, an idle
        timeout; here pg_terminate_backend): the next command is answered
        on a fresh connection, not refused once per dead one.
        """
        url = postgres_database()
        store = ConsumerStore.open(url, Path("."), reactor)
        self.addCleanup(store.close)
        yield store.migrate()
        yield store.usage(None, None, None, None)

        def terminate() -> None:
            with psycopg.connect(url, autocommit=True) as connection:
                connection.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )

        yield deferToThread(terminate)
        events = capture_log_events(self)
        rows = yield store.usage(None, None, None, None)
        self.assertEqual(rows[0]["requests"], 0)  # type: ignore[index]
        # Each dead connection is let go at its rollback without adbapi's
        # "Rollback failed" tracebacks (twice each).
        self.assertEqual([e.get("why") for e in events if "log_failure" in e], [])
        self.assertEqual(self.flushLoggedErrors(), [])

    @inlineCallbacks
    def test_key_added_while_a_delete_commits(self) -> Any:
        """
        A key added while another instance's delete of its consumer is
        under way (PostgreSQL runs them at once): the key's transaction
        waits for the delete's, then finds the consumer gone and writes
        nothing, so that no key outlives its consumer.
        """
        url = postgres_database()
        store = ConsumerStore.open(url, Path("."), reactor)
        self.addCleanup(store.close)
        yield store.migrate()
        team = Consumer("team", created_at=creation_time(time.time()))
        yield store.create(team, NewKey.make().hash, "sk-oc-first")
        deleting = psycopg.connect(url)
        self.addCleanup(deleting.close)
        # Another instance's delete, not committed yet (its row locks held).
        deleting.execute("DELETE FROM consumer_keys WHERE consumer = 'team'")
        deleting.execute("DELETE FROM consumers WHERE name = 'team'")
        key = NewKey.make()
        adding = store.add_key(team, key.hash, key.prefix, team.created_at)
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(adding.called)
        yield deferToThread(deleting.commit)
        added = yield adding
        self.assertFalse(added)
        snapshot = yield store.load(time.time())
        self.assertEqual(snapshot.keys, {})

    @inlineCallbacks
    def test_delete_while_a_key_is_added(self) -> Any:
        """
        A delete that begins while a key for its consumer is being added
        (another instance's, not committed yet) takes that key with it
        (review s25: the delete's first statement removed the keys it could
        see, then waited, and the new key outlived the consumer).
        """
        url = postgres_database()
        adding_store = ConsumerStore.open(url, Path("."), reactor)
        deleting_store = ConsumerStore.open(url, Path("."), reactor)
        self.addCleanup(adding_store.close)
        self.addCleanup(deleting_store.close)
        yield adding_store.migrate()
        team = Consumer("team", created_at=creation_time(time.time()))
        yield adding_store.create(team, NewKey.make().hash, "sk-oc-first")
        key = NewKey.make()
        # A session holding an insert of the same key: the add's own insert
        # waits for it, its consumer read done already.
        holding = psycopg.connect(url)
        self.addCleanup(holding.close)
        holding.execute(
            "INSERT INTO consumer_keys (hash, prefix, consumer, created_at) VALUES (%s, 'x', 'x', 0)", (key.hash,)
        )
        adding = adding_store.add_key(team, key.hash, key.prefix, team.created_at)
        yield deferLater(reactor, 0.3, lambda: None)
        deleting = deleting_store.delete("team", retired_name(team))
        yield deferLater(reactor, 0.3, lambda: None)
        yield deferToThread(holding.rollback)
        yield gatherResults([adding, deleting], consumeErrors=True)
        snapshot = yield adding_store.load(time.time())
        self.assertEqual((snapshot.consumers, snapshot.keys), ({}, {}))

    @inlineCallbacks
    def test_failure_after_the_check_is_not_retried(self) -> Any:
        """
        A transaction that fails once it has begun (here: a statement
        timeout, an OperationalError too) runs once: it may have written,
        or be what the database is short of; only a dead connection found
        by the check before it is tried again.
        """
        url = postgres_database()
        store = ConsumerStore.open(url + "?options=-c%20statement_timeout%3D200", Path("."), reactor)
        self.addCleanup(store.close)
        runs: list[int] = []

        def slow(transaction: Any) -> None:
            runs.append(1)
            transaction.execute("SELECT pg_sleep(1)")

        started = time.monotonic()
        yield self.assertFailure(store._interact(slow), psycopg.errors.QueryCanceled)
        self.assertEqual(len(runs), 1)
        self.assertLess(time.monotonic() - started, 0.9)


class GatewayCase(TestCase):
    """
    A gateway in this process, the control plane to manage consumers and
    the SDK to call with their keys.
    """

    timeout = 60
    database: str | None = None

    def setUp(self) -> None:
        self.upstream = start_upstream(self, KIMI_KEY, GEMINI_KEY)
        self.events = capture_log_events(self)

    @inlineCallbacks
    def gateway(self, **settings: Any) -> Any:
        gateway = start_gateway(
            self,
            api=True,
            **{
                "providers": self.upstream.provider_settings(),
                "gateway_api_keys": (GATEWAY_KEY,),
                "database_url": self.database,
                **settings,
            },
        )
        self.addCleanup(gateway.service.api_site.close_connections)
        yield gateway.service.consumers_ready
        client = yield open_client(self, gateway.port)
        return gateway, client

    def sdk(self, gateway: RunningGateway, key: str) -> openai.OpenAI:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{gateway.api_port}/v1", api_key=key, max_retries=0, timeout=10
        )
        self.addCleanup(deferToThread, client.close)
        return client

    @inlineCallbacks
    def command(self, gateway: RunningGateway, client: Any, cmd: str, data: Any = None) -> Any:
        answer = yield client.command(gateway.token, cmd, data)
        self.assertTrue(answer["ok"], answer)
        return answer["result"]

    @inlineCallbacks
    def refused(self, sdk: openai.OpenAI, model: str) -> Any:
        try:
            yield deferToThread(sdk.chat.completions.create, model=model, messages=HELLO)
        except openai.APIStatusError as e:
            return e
        self.fail("the call was not refused")


class ConsumerGatewayTests(GatewayCase):
    @inlineCallbacks
    def test_changes_to_a_consumer_deleted_elsewhere(self) -> Any:
        """
        An update or a new key for a consumer another instance has deleted
        (this one not told yet) says so and changes nothing: the update put
        the consumer back in this instance's table (review s25), and the
        key was written for a consumer the database no longer had.
        """
        gateway, client = yield self.gateway()
        yield self.command(gateway, client, "consumer_create", {"name": "team"})
        store = gateway.service.consumer_store
        snapshot = yield store.load(time.time())
        yield store.delete("team", retired_name(snapshot.consumers["team"]))
        for cmd, data in (("consumer_update", {"name": "team", "rpm": 9}), ("key_create", {"name": "team"})):
            answer = yield client.command(gateway.token, cmd, data)
            self.assertFalse(answer["ok"], cmd)
            self.assertIn("consumer 'team' was deleted meanwhile", answer["error"])
        snapshot = yield store.load(time.time())
        self.assertEqual((snapshot.consumers, snapshot.keys), ({}, {}))

    @inlineCallbacks
    def test_answer_longer_than_a_message(self) -> Any:
        """
        An answer longer than C{MAX_MESSAGE_BYTES} (Autobahn will not send
        it) is an error saying how to ask for less, audited as one; it was
        dropped without a word, the client waiting for it in vain.  The
        list of every consumer comes in pages that fit, each naming the
        next (trial s31: 400 consumers could not be listed at all).
        """
        gateway, client = yield self.gateway(max_message_bytes=2048)
        models = [f"gemini/model-{i:03d}" for i in range(20)]
        for i in range(6):
            yield self.command(gateway, client, "consumer_create", {"name": f"team-{i}", "models": models})
        listed: list[str] = []
        data: dict[str, Any] | None = None
        pages = 0
        while True:
            page = yield self.command(gateway, client, "consumer_list", data)
            pages += 1
            listed += [c["name"] for c in page["consumers"]]
            if page["next"] is None:
                break
            self.assertEqual(page["next"], listed[-1])
            data = {"after": page["next"]}
        self.assertEqual(listed, [f"team-{i}" for i in range(6)])
        self.assertGreater(pages, 1)
        self.assertEqual([e["outcome"] for e in self.events if e.get("cmd") == "consumer_list"], ["ok"] * pages)
        answer = yield client.command(gateway.token, "consumer_list", {"after": 7})
        self.assertEqual(answer["error"], "data.after must be a consumer's name: the next of the page before")
        one = yield self.command(gateway, client, "consumer_list", {"name": "team-1"})
        self.assertEqual([c["name"] for c in one["consumers"]], ["team-1"])
        # One consumer too long alone: told to raise the limit only, not
        # to ask for the one consumer it asked for (re-attack s30).
        many = [f"gemini/a-much-longer-model-name-{i:03d}" for i in range(30)]
        yield self.command(gateway, client, "consumer_create", {"name": "big", "models": many})
        for _ in range(60):
            yield self.command(gateway, client, "key_create", {"name": "big"})
        answer = yield client.command(gateway.token, "consumer_list", {"name": "big"})
        self.assertFalse(answer["ok"])
        self.assertTrue(answer["error"].endswith("allows; raise MAX_MESSAGE_BYTES"), answer["error"])
        # In the list of all, it is named, and the others listed (re-attack
        # s31: the whole list failed with it).
        listed, too_long, data = [], [], None
        while True:
            page = yield self.command(gateway, client, "consumer_list", data)
            listed += [c["name"] for c in page["consumers"]]
            too_long += page.get("too_long", [])
            if page["next"] is None:
                break
            data = {"after": page["next"]}
        self.assertEqual((listed, too_long), ([f"team-{i}" for i in range(6)], ["big"]))

    @inlineCallbacks
    def test_key_sent_as_model_or_path(self) -> Any:
        """
        A consumer key pasted where the model goes is a 400 (it was logged,
        recorded in usage rows and sent to the provider as the model); one
        sent as the path is logged as lists show keys.
        """
        gateway, client = yield self.gateway()
        team = yield self.command(gateway, client, "consumer_create", {"name": "team"})
        key = team["key"]
        calls = self.upstream.kimi.requests
        try:
            yield deferToThread(self.sdk(gateway, key).chat.completions.create, model=f"kimi/{key}", messages=HELLO)
        except openai.BadRequestError as e:
            self.assertEqual(e.body["param"], "model")  # type: ignore[index]
            self.assertIn("model holds one of this gateway's API keys", e.message)
            self.assertNotIn(key, e.message)
        else:
            self.fail("the key as a model was not refused")
        self.assertEqual(self.upstream.kimi.requests, calls)
        request = urllib.request.Request(
            f"http://127.0.0.1:{gateway.api_port}/v1/{key}", b"{}", {"Authorization": f"Bearer {key}"}
        )
        with self.assertRaises(urllib.error.HTTPError) as raised:
            yield deferToThread(urllib.request.urlopen, request, timeout=10)
        self.assertEqual(raised.exception.code, 404)
        said = [formatEvent(e) for e in self.events]
        self.assertTrue(any(f"/v1/{key[:12]}..." in line for line in said), said)
        self.assertFalse([line for line in said if key in line])
        usage = yield self.command(gateway, client, "usage", {"group_by": "model"})
        self.assertFalse([group for group in usage["groups"] if key in json.dumps(group)])

    @inlineCallbacks
    def test_life_of_a_consumer(self) -> Any:
        """
        Create, call (whole and streamed), usage by consumer, model and day,
        update, a second key, revoke (refused at once), delete.
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "search", "models": ["kimi/*"]})
        key = created["key"]
        self.assertEqual(created["consumer"]["keys"], [{"prefix": created["key_prefix"]}])
        sdk = self.sdk(gateway, key)
        answer = yield deferToThread(sdk.chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO)
        whole = answer.usage

        def stream() -> Any:
            chunks = list(
                sdk.chat.completions.create(
                    model="kimi/moonshot-v1-8k",
                    messages=HELLO,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            return chunks[-1].usage

        streamed = yield deferToThread(stream)
        # The gateway's own keys keep working, counted under "-".
        yield deferToThread(
            self.sdk(gateway, GATEWAY_KEY).chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO
        )
        not_allowed = yield self.refused(sdk, "gemini/gemini-2.5-flash")
        self.assertEqual((not_allowed.status_code, not_allowed.code), (403, "model_not_allowed"))
        self.assertIn("or ask the operator to add this one to its models with consumer_update", not_allowed.message)

        usage = yield self.command(gateway, client, "usage", {"name": "search"})
        total = usage["total"]
        self.assertEqual(total["requests"], 2)
        self.assertEqual(total["limited"], 1)
        self.assertEqual(total["prompt_tokens"], whole.prompt_tokens + streamed.prompt_tokens)
        self.assertEqual(total["completion_tokens"], whole.completion_tokens + streamed.completion_tokens)
        price = (0.20 * total["prompt_tokens"] + 2.00 * total["completion_tokens"]) / 1e6
        self.assertAlmostEqual(total["cost_usd"], price)
        self.assertEqual(total["unpriced_tokens"], 0)
        by_consumer = yield self.command(gateway, client, "usage", {"group_by": "consumer"})
        self.assertEqual([g["consumer"] for g in by_consumer["groups"]], ["-", "search"])
        self.assertEqual(by_consumer["total"]["requests"], 3)
        self.assertEqual(by_consumer["total"]["limited"], 1)
        by_model = yield self.command(gateway, client, "usage", {"name": "search", "group_by": "model"})
        self.assertEqual(
            [(g["model"], g["requests"], g["limited"]) for g in by_model["groups"]],
            [("gemini/gemini-2.5-flash", 0, 1), ("kimi/moonshot-v1-8k", 2, 0)],
        )
        today = time.strftime("%Y-%m-%d", time.gmtime())
        by_day = yield self.command(gateway, client, "usage", {"group_by": "day", "since": today})
        self.assertEqual([g["day"] for g in by_day["groups"]], [today])
        nothing = yield self.command(gateway, client, "usage", {"until": "2000-01-01"})
        self.assertEqual(nothing["total"]["requests"], 0)

        yield self.command(gateway, client, "consumer_update", {"name": "search", "models": None})
        yield deferToThread(sdk.chat.completions.create, model="gemini/gemini-2.5-flash", messages=HELLO)
        second = yield self.command(gateway, client, "key_create", {"name": "search"})
        listed = yield self.command(gateway, client, "consumer_list")
        self.assertEqual(len(listed["consumers"][0]["keys"]), 2)
        yield self.command(gateway, client, "key_revoke", {"name": "search", "key_prefix": created["key_prefix"]})
        revoked = yield self.refused(sdk, "kimi/moonshot-v1-8k")
        self.assertEqual(revoked.status_code, 401)
        yield deferToThread(
            self.sdk(gateway, second["key"]).chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO
        )
        yield self.command(gateway, client, "consumer_delete", {"name": "search"})
        deleted = yield self.refused(self.sdk(gateway, second["key"]), "kimi/moonshot-v1-8k")
        self.assertEqual(deleted.status_code, 401)

        metrics = generate_latest(gateway.service.metrics.registry).decode()
        self.assertIn('openclaw_consumer_requests_total{consumer="search",status="200"}', metrics)
        self.assertIn('openclaw_consumer_limited_total{consumer="search",reason="model_not_allowed"}', metrics)
        self.assertIn('openclaw_consumer_tokens_total{consumer="search",kind="prompt"}', metrics)
        self.assertIn('openclaw_consumer_spend_usd_total{consumer="search"}', metrics)
        # No key, whole or hashed, in any log event.
        logged = json.dumps([{k: repr(v) for k, v in e.items()} for e in self.events])
        for secret in (key, second["key"]):
            self.assertNotIn(secret, logged)
            self.assertNotIn(key_hash(secret.encode()), logged)
        self.assertIn("'search'", logged)

    @inlineCallbacks
    def test_rpm_set_later(self) -> Any:
        """
        5 calls without an rpm, then rpm 3: the next call is refused, the
        5 being within the last 60 s (trial s25: it passed, 2 remaining).
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "later"})
        sdk = self.sdk(gateway, created["key"])
        for _ in range(4):
            yield deferToThread(sdk.chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO)
        yield deferToThread(lambda: list(sdk.models.list()))
        yield self.command(gateway, client, "consumer_update", {"name": "later", "rpm": 3})
        limited = yield self.refused(sdk, "kimi/moonshot-v1-8k")
        self.assertEqual((limited.status_code, limited.code, limited.type), (429, "rate_limit_exceeded", "requests"))

    @inlineCallbacks
    def test_budget_held_by_a_call_in_flight(self) -> Any:
        """
        A call refused only because a call in flight holds the budget (its
        worst case reserved, nothing spent) is answered a retryable 429
        with a short Retry-After: the openai SDK retries it and gets
        through once the first call is counted.  Trial s25: "has used its
        budget", with x-should-retry false, and the SDK gave up.
        """
        gateway, client = yield self.gateway()
        # A call without max_tokens reserves 1000 completion tokens (0.002 USD).
        created = yield self.command(
            gateway, client, "consumer_create", {"name": "held", "budget_usd": 0.001, "budget_period": "day"}
        )
        self.upstream.kimi.delay = 1.0
        first = deferToThread(
            self.sdk(gateway, created["key"]).chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO
        )
        counters = gateway.service.consumers.counters
        while not counters.reserved("held", time.time()):
            yield deferLater(reactor, 0.02, lambda: None)
        held = yield self.refused(self.sdk(gateway, created["key"]), "kimi/moonshot-v1-8k")
        self.assertEqual((held.status_code, held.code, held.type), (429, "rate_limit_exceeded", "budget_reserved"))
        self.assertEqual(held.response.headers.get("retry-after"), "2")
        self.assertNotIn("x-should-retry", held.response.headers)
        self.assertIn("calls in flight hold the rest of its budget", held.message)
        retrying = openai.OpenAI(
            base_url=f"http://127.0.0.1:{gateway.api_port}/v1", api_key=created["key"], max_retries=2, timeout=10
        )
        self.addCleanup(deferToThread, retrying.close)
        answer = yield deferToThread(retrying.chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO)
        self.assertTrue(answer.choices)
        yield first

    @inlineCallbacks
    def test_tpm_held_by_a_call_in_flight(self) -> Any:
        """
        tpm 1000 and a call in flight without max_tokens (its reservation,
        1000 completion tokens and its prompt's estimate, is over tpm): a
        second call is answered 429 tokens_reserved saying so, with a short
        Retry-After, and the openai SDK gets through once the first is
        counted.  Trial s27: "over its tpm limit", Retry-After 59, and the
        SDK waited 59.6 s.
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "leaver", "tpm": 1000})
        self.upstream.kimi.delay = 1.0
        first = deferToThread(
            self.sdk(gateway, created["key"]).chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO
        )
        counters = gateway.service.consumers.counters
        while not counters.reserved_tokens("leaver", time.time()):
            yield deferLater(reactor, 0.02, lambda: None)
        held = yield self.refused(self.sdk(gateway, created["key"]), "kimi/moonshot-v1-8k")
        self.assertEqual((held.status_code, held.code, held.type), (429, "rate_limit_exceeded", "tokens_reserved"))
        self.assertEqual(held.response.headers.get("retry-after"), "2")
        self.assertIn("consumer 'leaver': calls in flight hold 1010 tokens of its tpm limit of 1000", held.message)
        self.assertIn("set max_tokens", held.message)
        # consumer_list shows what the call in flight holds.
        listed = yield self.command(gateway, client, "consumer_list", {"name": "leaver"})
        self.assertEqual(listed["consumers"][0]["reserved_tokens"], 1010)
        retrying = openai.OpenAI(
            base_url=f"http://127.0.0.1:{gateway.api_port}/v1", api_key=created["key"], max_retries=2, timeout=10
        )
        self.addCleanup(deferToThread, retrying.close)
        started = time.monotonic()
        answer = yield deferToThread(retrying.chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO)
        self.assertTrue(answer.choices)
        self.assertLess(time.monotonic() - started, 10)
        yield first

    @inlineCallbacks
    def test_rpm_tpm_budget(self) -> Any:
        """
        rpm and tpm over a sliding minute (429 rate_limit_exceeded with
        Retry-After), and a spent budget (429 insufficient_quota naming it).
        """
        gateway, client = yield self.gateway()
        rpm = yield self.command(gateway, client, "consumer_create", {"name": "rpm", "rpm": 2})
        sdk = self.sdk(gateway, rpm["key"])
        for _ in range(2):
            yield deferToThread(sdk.chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO)
        limited = yield self.refused(sdk, "kimi/moonshot-v1-8k")
        self.assertEqual((limited.status_code, limited.code, limited.type), (429, "rate_limit_exceeded", "requests"))
        self.assertTrue(1 <= int(limited.response.headers["retry-after"]) <= 60)

        tpm = yield self.command(gateway, client, "consumer_create", {"name": "tpm", "tpm": 5})
        sdk = self.sdk(gateway, tpm["key"])
        yield deferToThread(sdk.chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO)
        limited = yield self.refused(sdk, "kimi/moonshot-v1-8k")
        # OpenAI's type for a tokens-per-minute 429 (openai/codex#88).
        self.assertEqual((limited.status_code, limited.code, limited.type), (429, "rate_limit_exceeded", "tokens"))
        self.assertIn("tpm", limited.message)
        self.assertIn("retry-after", limited.response.headers)

        budget = yield self.command(
            gateway, client, "consumer_create", {"name": "budget", "budget_usd": 0.000001, "budget_period": "day"}
        )
        sdk = self.sdk(gateway, budget["key"])
        yield deferToThread(sdk.chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO)
        spent = yield self.refused(sdk, "kimi/moonshot-v1-8k")
        self.assertEqual((spent.status_code, spent.code), (429, "insufficient_quota"))
        self.assertIn("budget of 0.000001 USD per UTC day", spent.message)
        # The openai SDK retries a 429 unless told not to: a retrying client
        # asks once, not three times.
        self.assertEqual(spent.response.headers.get("x-should-retry"), "false")
        retrying = openai.OpenAI(
            base_url=f"http://127.0.0.1:{gateway.api_port}/v1", api_key=budget["key"], max_retries=2, timeout=10
        )
        self.addCleanup(deferToThread, retrying.close)
        registry = gateway.service.metrics.registry
        labels = {"consumer": "budget", "reason": "insufficient_quota"}
        before = registry.get_sample_value("openclaw_consumer_limited_total", labels)
        yield self.refused(retrying, "kimi/moonshot-v1-8k")
        self.assertEqual(registry.get_sample_value("openclaw_consumer_limited_total", labels), before + 1)

        expired = yield self.command(gateway, client, "consumer_create", {"name": "old"})
        yield self.command(gateway, client, "consumer_update", {"name": "old", "expires_at": "2000-01-01"})
        gone = yield self.refused(self.sdk(gateway, expired["key"]), "kimi/moonshot-v1-8k")
        self.assertEqual((gone.status_code, gone.code), (401, "expired_api_key"))

    @inlineCallbacks
    def test_rate_limit_headers(self) -> Any:
        """
        A consumer's admitted calls carry OpenAI's x-ratelimit-* headers
        for each limit it has (its rpm, its tpm with the tokens reserved
        by calls in flight taken away), on chat calls whole and streamed,
        and listings (requests only); the reset is the time until the
        sliding minute is empty again.  A consumer without limits, and a
        GATEWAY_API_KEYS key, get none.
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "paced", "rpm": 5, "tpm": 100000})
        sdk = self.sdk(gateway, created["key"])
        raw = yield deferToThread(
            sdk.chat.completions.with_raw_response.create, model="kimi/moonshot-v1-8k", messages=HELLO
        )
        headers = raw.headers
        self.assertEqual(headers["x-ratelimit-limit-requests"], "5")
        self.assertEqual(headers["x-ratelimit-remaining-requests"], "4")
        self.assertEqual(headers["x-ratelimit-reset-requests"], "1m0s")
        self.assertEqual(headers["x-ratelimit-limit-tokens"], "100000")
        # The call's reservation (its prompt's estimate and the default
        # completion reserve) is taken from what remains.
        first_remaining = int(headers["x-ratelimit-remaining-tokens"])
        self.assertLess(first_remaining, 100000)
        self.assertEqual(headers["x-ratelimit-reset-tokens"], "1m0s")
        raw.parse()
        streamed = yield deferToThread(
            sdk.chat.completions.with_raw_response.create, model="kimi/moonshot-v1-8k", messages=HELLO, stream=True
        )
        self.assertEqual(streamed.headers["x-ratelimit-remaining-requests"], "3")
        # The first call's actual tokens, then this one's reservation.
        self.assertLess(int(streamed.headers["x-ratelimit-remaining-tokens"]), first_remaining)
        yield deferToThread(lambda: list(streamed.parse()))
        listing = yield deferToThread(sdk.models.with_raw_response.list)
        self.assertEqual(listing.headers["x-ratelimit-remaining-requests"], "2")
        self.assertNotIn("x-ratelimit-limit-tokens", listing.headers)

        unlimited = yield self.command(gateway, client, "consumer_create", {"name": "unlimited"})
        for key in (unlimited["key"], GATEWAY_KEY):
            raw = yield deferToThread(
                self.sdk(gateway, key).chat.completions.with_raw_response.create,
                model="kimi/moonshot-v1-8k",
                messages=HELLO,
            )
            self.assertFalse([name for name in raw.headers if name.startswith("x-ratelimit")], key[:6])

    @inlineCallbacks
    def test_tools_and_schemas_are_reserved(self) -> Any:
        """
        40 KB in tools or in a response_format's json_schema reserves its
        tokens as 40 KB in a message does (trial s27: 5 tokens, as for
        'hi'), read from x-ratelimit-remaining-tokens through the openai SDK.
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "big", "tpm": 1_000_000})
        sdk = self.sdk(gateway, created["key"])
        blob = "x" * 40_000
        tool = {"type": "function", "function": {"name": "f", "description": blob, "parameters": {"type": "object"}}}
        schema = {
            "type": "json_schema",
            "json_schema": {"name": "s", "schema": {"type": "object", "description": blob}},
        }
        reserved = []
        for extra in ({"tools": [tool]}, {"response_format": schema}):
            raw = yield deferToThread(
                sdk.chat.completions.with_raw_response.create,
                model="kimi/moonshot-v1-8k",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=4,
                **extra,
            )
            raw.parse()
            used = yield self.command(gateway, client, "usage", {"name": "big"})
            counted = used["total"]["prompt_tokens"] + used["total"]["completion_tokens"]
            # What remains: the limit less the calls counted before and this one's reservation.
            reserved.append(1_000_000 - int(raw.headers["x-ratelimit-remaining-tokens"]) - (counted - 14))
        for tokens in reserved:
            self.assertGreater(tokens, 10_000, reserved)

    @inlineCallbacks
    def test_tpm_holds_against_a_parallel_burst(self) -> Any:
        """
        tpm 30, 20 parallel calls of 14 tokens (a prompt estimated at 10,
        max_tokens 4; the stand-in counts 10 + 4) answered after 0.5 s:
        each admitted call reserves 14 tokens until counted, so 3 are
        admitted (0, 14, 28 < 30) and the window ends at 42, under tpm
        plus one call's reservation; the rest get 429 with Retry-After.
        """
        self.upstream.kimi.delay = 0.5
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "tpmc", "tpm": 30})
        sdk = self.sdk(gateway, created["key"])
        answers = yield gatherResults([deferToThread(burst_call, sdk) for _ in range(20)])
        self.assertEqual(sorted(a[0] for a in answers), [200] * 3 + [429] * 17, answers)
        for status, code, retry_after in answers:
            if status == 429:
                self.assertEqual(code, "rate_limit_exceeded")
                self.assertTrue(1 <= int(retry_after) <= 60, retry_after)
        counters = gateway.service.consumers.counters
        assert isinstance(counters, LocalCounters)
        self.assertEqual(counters.tokens["tpmc"].used(time.time()), 3 * 14)
        self.assertEqual(counters.reserved_tokens("tpmc", time.time()), {})

    @inlineCallbacks
    def test_refusals_over_the_control_plane(self) -> Any:
        gateway, client = yield self.gateway()
        for cmd, data, words in (
            ("consumer_create", {"name": "a b"}, "name must be"),
            ("consumer_create", {"name": "a", "rpm": -1}, "rpm must be"),
            ("consumer_create", {"name": "a", "rpm": 99999999999999999999999}, "from 1 to 1000000000000"),
            ("consumer_create", {"name": "a", "budget_usd": 1e-320}, "below the smallest budget, 0.000001 US"),
            ("consumer_update", {"name": "nobody"}, "no consumer named"),
            ("key_revoke", {"name": "nobody", "key_prefix": "x"}, "no consumer named"),
            ("usage", {"group_by": "week"}, "group_by must be"),
            ("usage", {"since": "yesterday"}, "not an ISO date"),
        ):
            answer = yield client.command(gateway.token, cmd, data)
            self.assertFalse(answer["ok"])
            self.assertIn(words, answer["error"])

    @inlineCallbacks
    def test_usage_rows_at_stop_tried_again_within_the_grace(self) -> Any:
        """
        The service gives the table's last write until SHUTDOWN_GRACE_SECONDS
        is over: a database refusing it twice at stop, then taking it, loses
        nothing.
        """
        gateway, client = yield self.gateway(shutdown_grace_seconds=5.0)
        store = gateway.service.consumer_store
        record = store.record
        tries: list[int] = []

        def flaky(rows: Any) -> Deferred[None]:
            tries.append(len(rows))
            if len(tries) <= 2:
                return fail(OSError("the database refused the write"))
            return record(rows)

        self.patch(store, "record", flaky)
        gateway.service.consumers.account(GATEWAY, "kimi", "moonshot-v1-8k", 200, {"prompt_tokens": 7}, 0.01)
        yield gateway.service.stopService()
        self.assertEqual(tries, [1, 1, 1])
        said = " ".join(formatEvent(e) for e in self.events)
        self.assertNotIn("given up", said)
        self.assertNotIn("gave up", said)
        self.flushLoggedErrors(OSError)
        again, client = yield self.gateway(state_dir=gateway.service.settings.state_dir)
        [total] = yield again.service.consumer_store.usage(None, None, None, None)
        self.assertEqual(total["prompt_tokens"], 7)

    @inlineCallbacks
    def test_usage_rows_at_stop_given_up_once_when_the_database_hangs(self) -> Any:
        """
        The last write at stop hangs past SHUTDOWN_GRACE_SECONDS, then fails
        (a connect timeout): the rows are given up in one line, no write
        starts after it, and the store is closed once, after the table
        stopped trying.
        """
        gateway, client = yield self.gateway(shutdown_grace_seconds=1.0)
        store = gateway.service.consumer_store
        close = store.close
        tries: list[int] = []
        closes: list[int] = []

        def hanging(rows: Any) -> Deferred[None]:
            tries.append(len(rows))
            late: Deferred[None] = Deferred()
            reactor.callLater(1.5, late.errback, OSError("connection timed out"))
            return late

        def closing(*args: Any) -> Deferred[bool]:
            closes.append(len(tries))
            return close(*args)

        self.patch(store, "record", hanging)
        self.patch(store, "close", closing)
        gateway.service.consumers.account(GATEWAY, "kimi", "moonshot-v1-8k", 200, {"prompt_tokens": 7}, 0.01)
        yield gateway.service.stopService()
        yield deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(tries, [1])
        self.assertEqual(closes, [1])
        said = [formatEvent(e) for e in self.events]
        lines = [line for line in said if "given up" in line or "gave up" in line]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("could not write the last 1 usage rows at stop (the database did not answer", lines[0])
        self.flushLoggedErrors(OSError)

    @inlineCallbacks
    def test_table_survives_a_restart(self) -> Any:
        state_dir = Path(self.mktemp())
        state_dir.mkdir()
        gateway, client = yield self.gateway(state_dir=state_dir)
        created = yield self.command(gateway, client, "consumer_create", {"name": "kept"})
        yield gateway.service.stopService()
        again, _ = yield self.gateway(state_dir=state_dir)
        yield deferToThread(
            self.sdk(again, created["key"]).chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO
        )


class ConsumerEndpointsTests(GatewayCase):
    """
    Embeddings and the models listing under a consumer's limits; consumer
    keys before the table has loaded.
    """

    @inlineCallbacks
    def test_embeddings_limited_and_counted(self) -> Any:
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "emb", "tpm": 5, "rpm": 3})
        sdk = self.sdk(gateway, created["key"])
        # 11 characters: 3 tokens (one per 4 characters, rounded up).
        yield deferToThread(sdk.embeddings.create, model="gemini/gemini-embedding-001", input="hello world")
        yield deferToThread(sdk.embeddings.create, model="gemini/gemini-embedding-001", input="hello world")
        try:
            yield deferToThread(sdk.embeddings.create, model="gemini/gemini-embedding-001", input="hello world")
        except openai.RateLimitError as e:
            self.assertEqual(e.code, "rate_limit_exceeded")
            self.assertIn("tpm", e.message)
        else:
            self.fail("the third embeddings call was not refused")
        usage = yield self.command(gateway, client, "usage", {"name": "emb", "group_by": "model"})
        [group] = usage["groups"]
        self.assertEqual(
            (group["model"], group["requests"], group["limited"], group["prompt_tokens"]),
            ("gemini/gemini-embedding-001", 2, 1, 6),
        )
        self.assertAlmostEqual(group["cost_usd"], 6 * 0.15 / 1e6)

        kimi_only = yield self.command(gateway, client, "consumer_create", {"name": "k", "models": ["kimi/*"]})
        try:
            yield deferToThread(
                self.sdk(gateway, kimi_only["key"]).embeddings.create, model="gemini/gemini-embedding-001", input="hi"
            )
        except openai.PermissionDeniedError as e:
            self.assertEqual(e.code, "model_not_allowed")
        else:
            self.fail("an embeddings model outside models was not refused")

    @inlineCallbacks
    def test_budget_and_unpriced_models(self) -> Any:
        """
        A consumer with a budget lists only priced models (it may call no
        other), and a switch to an unpriced model warns, naming it.
        """
        gateway, client = yield self.gateway()
        capped = yield self.command(gateway, client, "consumer_create", {"name": "capped", "budget_usd": 5})
        yield self.command(gateway, client, "consumer_create", {"name": "free"})
        answer = yield self.command(gateway, client, "switch_provider", {"provider": "kimi", "model": "moonshot-v1-8k"})
        self.assertNotIn("warning", answer)
        answer = yield self.command(
            gateway, client, "switch_provider", {"provider": "kimi", "model": "kimi-k2-0905-preview"}
        )
        self.assertIn(
            "consumer(s) capped have a budget and kimi/kimi-k2-0905-preview has no price: their calls to the "
            "active route get 403 model_not_priced",
            answer["warning"],
        )
        everything = yield deferToThread(lambda: [m.id for m in self.sdk(gateway, GATEWAY_KEY).models.list()])
        self.assertIn("kimi-k2-0905-preview", everything)
        mine = yield deferToThread(lambda: [m.id for m in self.sdk(gateway, capped["key"]).models.list()])
        self.assertEqual(mine, [m for m in everything if m != "kimi-k2-0905-preview"])

    @inlineCallbacks
    def test_models_listing(self) -> Any:
        """
        A consumer lists only the models it may call, within its rpm.
        """
        gateway, client = yield self.gateway()
        listed = yield deferToThread(lambda: [m.id for m in self.sdk(gateway, GATEWAY_KEY).models.list()])
        provider = gateway.service.route.current.provider_id
        created = yield self.command(
            gateway, client, "consumer_create", {"name": "lister", "rpm": 2, "models": [f"{provider}/{listed[0]}"]}
        )
        sdk = self.sdk(gateway, created["key"])
        mine = yield deferToThread(lambda: [m.id for m in sdk.models.list()])
        self.assertEqual(mine, [listed[0]])
        yield deferToThread(lambda: list(sdk.models.list()))
        try:
            yield deferToThread(lambda: list(sdk.models.list()))
        except openai.RateLimitError as e:
            self.assertEqual(e.code, "rate_limit_exceeded")
            self.assertIn("retry-after", e.response.headers)
        else:
            self.fail("the third listing was not refused")

    @inlineCallbacks
    def test_consumer_keys_wait_for_the_table(self) -> Any:
        """
        Until the consumers are loaded (here: their database is unreachable),
        a consumer key gets a retryable 503 with Retry-After, never a 401;
        the gateway's own keys keep working, one that looks like a
        consumer's (C{ock-...}) too (re-attack s19: it got the 503).
        """
        self.database = f"postgresql://openclaw@127.0.0.1:{free_port()}/nowhere?connect_timeout=2"
        # The database's refusals are logged (run last: after the gateway's stop).
        self.addCleanup(self.flushLoggedErrors)
        lookalike = NewKey.make().key
        gateway, _ = yield self.gateway(gateway_api_keys=(GATEWAY_KEY, lookalike))
        self.assertFalse(gateway.service.consumers.loaded)
        key = NewKey.make().key
        events = capture_log_events(self)
        sdk = self.sdk(gateway, key)
        # Refused with the head (a POST: APIRequest) and by the resource (a GET).
        for call in (
            lambda: sdk.chat.completions.create(model="kimi/moonshot-v1-8k", messages=HELLO),
            lambda: sdk.models.list(),
        ):
            try:
                yield deferToThread(call)
            except openai.InternalServerError as e:
                self.assertEqual((e.status_code, e.code), (503, "consumers_loading"))
                self.assertEqual(e.response.headers["retry-after"], "2")
            else:
                self.fail("a consumer key was accepted before the table loaded")
        # The key was not checked, so any client can cause these: their
        # lines are limited as keyless refusals' (trial s40: one a request).
        refused = [event for event in events if event.get("outcome") == "consumers_loading"]
        self.assertEqual(len(refused), 2, refused)
        self.assertTrue(all(event.get(KEYLESS_FIELD) for event in refused), refused)
        for gateway_key in (GATEWAY_KEY, lookalike):
            yield deferToThread(
                self.sdk(gateway, gateway_key).chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO
            )
        # Not ready for a balancer meanwhile: consumer traffic would get 503s.
        status, body = yield deferToThread(http_get, f"http://127.0.0.1:{gateway.api_port}/readyz")
        document = json.loads(body)
        self.assertEqual(status, 503)
        self.assertFalse(document["ready"])
        self.assertIn("the consumers have not loaded", document["reason"])


#: 12 characters: a prompt estimated at 10 tokens (3 for its text, MESSAGE_TOKENS and
#: REPLY_TOKENS for the chat template; the stand-in counts 10).
BURST_PROMPT = [{"role": "user", "content": "Hello there!"}]


def burst_call(sdk: openai.OpenAI, model: str = "kimi/moonshot-v1-8k") -> tuple[int, str | None, str | None]:
    """
    One chat call of a parallel burst (in a thread): its status, error
    code and Retry-After.
    """
    try:
        sdk.chat.completions.create(model=model, messages=BURST_PROMPT, max_tokens=4)  # type: ignore[arg-type]
    except openai.APIStatusError as e:
        return e.status_code, e.code, e.response.headers.get("retry-after")
    return 200, None, None


def http_get(url: str) -> tuple[int, bytes]:
    """
    GET C{url} (blocking: call it in a thread): its status and body.
    """
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class PostgresConsumerGatewayTests(ConsumerGatewayTests):
    def setUp(self) -> None:
        self.database = postgres_database()
        super().setUp()


class ConsumerCtlTests(GatewayCase):
    """
    The installed openclawctl, as an operator runs it.
    """

    @inlineCallbacks
    def ctl(self, gateway: RunningGateway, *args: str) -> Any:
        from tests.test_ctl import run_ctl

        answer = yield run_ctl("--url", f"ws://127.0.0.1:{gateway.port}", "--token", gateway.token, *args)
        return answer

    @inlineCallbacks
    def test_ctl_lists_every_page(self) -> Any:
        """
        C{openclawctl consumer list} asks for every page of a list longer
        than C{MAX_MESSAGE_BYTES} and shows every consumer, in one table
        (or one JSON answer); trial s31: it failed past some 300.
        """
        gateway, client = yield self.gateway(max_message_bytes=2048)
        names = [f"team-{i:02d}" for i in range(25)]
        for name in names:
            yield self.command(gateway, client, "consumer_create", {"name": name})
        out, err, code = yield self.ctl(gateway, "consumer", "list")
        self.assertEqual((err, code), ("", 0))
        self.assertEqual([line.split()[0] for line in out.splitlines()[1:]], names)
        out, err, code = yield self.ctl(gateway, "consumer", "list", "--json")
        self.assertEqual((err, code), ("", 0))
        answer = json.loads(out)
        self.assertEqual([c["name"] for c in answer["result"]["consumers"]], names)
        self.assertIsNone(answer["result"]["next"])
        pages = [e for e in self.events if e.get("cmd") == "consumer_list"]
        self.assertGreater(len(pages), 2)

    @inlineCallbacks
    def test_ctl_json_is_compact_alike(self) -> Any:
        """
        C{--json} prints every answer as compact JSON, as the gateway
        writes it: C{consumer list} (its pages put together by openclawctl)
        as C{usage} and the others (trial s32: the list was spaced, the
        usage compact).
        """
        gateway, client = yield self.gateway(max_message_bytes=2048)
        for i in range(12):
            yield self.command(gateway, client, "consumer_create", {"name": f"t{i:02d}", "rpm": 5})
        for args in (
            ("consumer", "list", "--json"),
            ("consumer", "list", "t01", "--json"),
            ("usage", "--json"),
            ("usage", "--group-by", "consumer", "--json"),
            ("status", "--json"),
        ):
            out, err, code = yield self.ctl(gateway, *args)
            self.assertEqual((err, code), ("", 0), args)
            compact = json.dumps(json.loads(out), ensure_ascii=False, separators=(",", ":"))
            self.assertEqual(out, compact + "\n", args)

    @inlineCallbacks
    def test_ctl_life(self) -> Any:
        gateway, _ = yield self.gateway()
        out, err, code = yield self.ctl(gateway, "consumer", "create", "app", "--rpm", "5", "--model", "kimi/*")
        self.assertEqual((err, code), ("", 0))
        self.assertIn("key (shown once, keep it now): ock-", out)
        out, err, code = yield self.ctl(gateway, "--json", "key", "create", "app")
        key = json.loads(out)["result"]["key"]
        yield deferToThread(self.sdk(gateway, key).chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO)
        out, err, code = yield self.ctl(gateway, "consumer", "list")
        self.assertIn("app", out)
        self.assertIn("kimi/*", out)
        out, err, code = yield self.ctl(gateway, "usage", "--since", "2026-01-01", "--group-by", "consumer")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"app +1 +0 ")
        self.assertRegex(out, r"\nTOTAL +1 +0 ")
        out, err, code = yield self.ctl(gateway, "key", "revoke", "app", key[4:12])
        self.assertIn("revoked app's key", out)
        out, err, code = yield self.ctl(gateway, "consumer", "update", "app", "--rpm", "0")
        self.assertEqual(code, 2)
        self.assertIn("or none to remove the limit", err)
        out, err, code = yield self.ctl(gateway, "consumer", "update", "app", "--rpm", "none", "--model", "*", "--json")
        self.assertEqual(code, 0, err)
        updated = json.loads(out)["result"]["consumer"]
        self.assertEqual((updated["rpm"], updated["models"]), (None, []))
        out, err, code = yield self.ctl(gateway, "consumer", "list", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["result"]["consumers"][0]["name"], "app")
        out, err, code = yield self.ctl(gateway, "consumer", "delete", "app")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"^deleted app; its usage is kept as app@\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\n$")
