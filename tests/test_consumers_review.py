"""
Consumers (issue #19), what a review found: failover within a consumer's
models, streams left early still counted, refusals of expired consumers
attributed, the audit lines of consumer commands; the openai SDK against
a gateway in this process, the stand-in upstream on 127.0.0.1.
"""

from __future__ import annotations

import stat
import time
from typing import Any

import openai
from prometheus_client import generate_latest
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from tests.support import start_gateway
from tests.test_consumers import GatewayCase
from tests.test_dataplane import HELLO


class FailoverTests(GatewayCase):
    @inlineCallbacks
    def test_failover_stays_within_models(self) -> Any:
        """
        A consumer allowed only gemini/* whose call to a failing Gemini
        would fail over to Kimi gets Gemini's error instead; a consumer
        allowed both is failed over as before.
        """
        gateway, client = yield self.gateway()
        active = gateway.service.route.current
        self.assertEqual(active.provider_id, "gemini")
        gonly = yield self.command(gateway, client, "consumer_create", {"name": "gonly", "models": ["gemini/*"]})
        both = yield self.command(gateway, client, "consumer_create", {"name": "both"})
        self.upstream.gemini.mode = "error"
        kimi_calls = self.upstream.kimi.requests
        refused = yield self.refused(self.sdk(gateway, gonly["key"]), active.model)
        self.assertEqual(refused.status_code, 502)
        self.assertEqual(refused.response.headers.get("x-openclaw-provider"), "gemini")
        self.assertIsNone(refused.response.headers.get("x-openclaw-fallback"))
        self.assertEqual(self.upstream.kimi.requests, kimi_calls)
        self.assertTrue(
            any(
                "call not failed over" in str(e.get("log_format")) and e.get("consumer") == "gonly" for e in self.events
            )
        )
        answer = yield deferToThread(
            self.sdk(gateway, both["key"]).chat.completions.with_raw_response.create, model=active.model, messages=HELLO
        )
        self.assertEqual(answer.headers.get("x-openclaw-provider"), "kimi")
        [failover] = [e for e in self.events if str(e.get("log_format", "")).startswith("call failed over")]
        self.assertEqual(failover["consumer"], "both")
        usage = yield self.command(gateway, client, "usage", {"group_by": "consumer"})
        by_name = {group["consumer"]: group for group in usage["groups"]}
        self.assertEqual(by_name["gonly"]["requests"], 1)
        self.assertEqual(by_name["gonly"]["prompt_tokens"], 0)


class StreamLeftEarlyTests(GatewayCase):
    @inlineCallbacks
    def usage_of(self, gateway: Any, client: Any, name: str, requests: int = 1) -> Any:
        """
        The consumer's usage total once C{requests} calls are counted (a
        stream left early is counted when its upstream ends).
        """
        for _ in range(100):
            usage = yield self.command(gateway, client, "usage", {"name": name})
            if usage["total"]["requests"] >= requests:
                return usage["total"]
            yield deferToThread(time.sleep, 0.05)
        self.fail(f"{name}'s call was never counted")

    @inlineCallbacks
    def test_left_after_finish_reason(self) -> Any:
        """
        A client that closes a Kimi stream after the chunk with
        finish_reason, before the usage chunk, is counted the stream's
        usage all the same: the gateway reads the rest of the stream.
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "leaver", "tpm": 100000})
        self.upstream.kimi.chunk_interval = 0.2
        sdk = self.sdk(gateway, created["key"])

        def leave_at_finish() -> str:
            text = ""
            stream = sdk.chat.completions.create(model="kimi/moonshot-v1-8k", messages=HELLO, stream=True)
            for chunk in stream:
                self.assertIsNone(chunk.usage)
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    if chunk.choices[0].finish_reason:
                        break
            stream.close()
            return text

        text = yield deferToThread(leave_at_finish)
        self.assertEqual(text, self.upstream.kimi.reply)
        total = yield self.usage_of(gateway, client, "leaver")
        # The stand-in's usage: 10 prompt tokens, one completion token a word.
        self.assertEqual((total["prompt_tokens"], total["completion_tokens"]), (10, 4))
        self.assertGreater(total["cost_usd"], 0)

    @inlineCallbacks
    def test_no_usage_ever_is_estimated(self) -> Any:
        """
        A stream that breaks after some text, with no usage, is counted an
        estimate (characters / 4, rounded up), never 0 tokens.
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "cut"})
        self.upstream.kimi.mode = "cut"
        self.upstream.kimi.cut_after = 3
        sdk = self.sdk(gateway, created["key"])

        def read_all() -> str:
            text = ""
            try:
                for chunk in sdk.chat.completions.create(model="kimi/moonshot-v1-8k", messages=HELLO, stream=True):
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
            except openai.APIError:
                pass
            return text

        text = yield deferToThread(read_all)
        self.assertTrue(text)
        total = yield self.usage_of(gateway, client, "cut")
        prompt = HELLO[0]["content"]
        self.assertEqual(total["prompt_tokens"], -(-len(prompt) // 4))
        self.assertEqual(total["completion_tokens"], -(-len(text) // 4))


class AuditTests(GatewayCase):
    @inlineCallbacks
    def test_audit_lines_name_the_consumer(self) -> Any:
        """
        The audit line of a consumer command names the consumer, the key
        prefix made or revoked (never the key) and the fields changed, and
        a refused one the error its client was told, in the text and as
        structured fields.
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "search", "rpm": 5})
        yield self.command(gateway, client, "consumer_update", {"name": "search", "rpm": 9, "tpm": 900})
        made = yield self.command(gateway, client, "key_create", {"name": "search"})
        yield self.command(gateway, client, "key_revoke", {"name": "search", "key_prefix": made["key_prefix"]})
        refused = yield client.command(gateway.token, "consumer_update", {"name": "search", "rpm": -1})
        self.assertFalse(refused["ok"])
        audits = {}
        for event in self.events:
            if event.get("cmd", "").startswith(("consumer_", "key_")) and "outcome" in event:
                audits.setdefault(event["cmd"], []).append(event)
        lines = {cmd: [formatEvent(e) for e in events] for cmd, events in audits.items()}
        self.assertRegex(lines["consumer_create"][0], r": ok in [0-9.]+ ms consumer=search changed=rpm key_prefix=")
        self.assertEqual(audits["consumer_create"][0]["key_prefix"], created["key_prefix"])
        self.assertRegex(lines["consumer_update"][0], r": ok in [0-9.]+ ms consumer=search changed=rpm,tpm$")
        self.assertEqual(
            (audits["consumer_update"][0]["consumer"], audits["consumer_update"][0]["changed"]), ("search", "rpm,tpm")
        )
        self.assertRegex(
            lines["consumer_update"][1], r": error in [0-9.]+ ms consumer=search changed=rpm error=rpm must be a whole"
        )
        self.assertEqual(audits["consumer_update"][1]["error"], refused["error"])
        self.assertTrue(lines["key_create"][0].endswith(f"consumer=search key_prefix={made['key_prefix']}"))
        self.assertTrue(lines["key_revoke"][0].endswith(f"consumer=search key_prefix={made['key_prefix']}"))
        every = "\n".join(formatEvent(e) + repr(e) for e in self.events)
        for key in (created["key"], made["key"]):
            self.assertNotIn(key, every)
            self.assertNotIn(key[4:20], every)


class AttributionTests(GatewayCase):
    @inlineCallbacks
    def test_expired_and_listing_attributed(self) -> Any:
        """
        An expired consumer's refusals are logged with method, path and
        consumer and counted in its metrics; a models listing counts in
        openclaw_consumer_requests_total.
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "old"})
        sdk = self.sdk(gateway, created["key"])
        yield deferToThread(lambda: list(sdk.models.list()))
        updated = yield self.command(gateway, client, "consumer_update", {"name": "old", "expires_at": "2020-01-01"})
        self.assertIn("expires_at is past", updated["warning"])
        refused = yield self.refused(sdk, "kimi/moonshot-v1-8k")
        self.assertEqual((refused.status_code, refused.code), (401, "expired_api_key"))
        try:
            yield deferToThread(lambda: list(sdk.models.list()))
        except openai.AuthenticationError as e:
            self.assertEqual(e.code, "expired_api_key")
        else:
            self.fail("an expired consumer listed the models")
        lines = [e for e in self.events if e.get("status") == 401]
        self.assertEqual(
            [(e["method"], e["path"], e["consumer"]) for e in lines],
            [("POST", "/v1/chat/completions", "old"), ("GET", "/v1/models", "old")],
        )
        metrics = generate_latest(gateway.service.metrics.registry).decode()
        self.assertIn('openclaw_consumer_requests_total{consumer="old",status="401"} 2.0', metrics)
        self.assertIn('openclaw_consumer_requests_total{consumer="old",status="200"} 1.0', metrics)
        self.assertIn('openclaw_consumer_limited_total{consumer="old",reason="expired_api_key"} 2.0', metrics)

    @inlineCallbacks
    def test_expiry_already_past_at_creation(self) -> Any:
        gateway, client = yield self.gateway()
        answer = yield client.command(gateway.token, "consumer_create", {"name": "late", "expires_at": "2020-01-01"})
        self.assertFalse(answer["ok"])
        self.assertIn("already past", answer["error"])


class NitsTests(GatewayCase):
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
    def test_database_is_private(self) -> Any:
        """
        openclaw.db and its -wal and -shm files are readable by their owner
        only (they hold key hashes and usage).
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "p"})
        yield deferToThread(
            self.sdk(gateway, created["key"]).chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO
        )
        yield gateway.service.consumers.flush()
        database = gateway.service.settings.state_dir / "openclaw.db"
        files = [database, *(database.with_name(database.name + tail) for tail in ("-wal", "-shm"))]
        self.assertTrue(all(f.exists() for f in files), files)
        for f in files:
            self.assertEqual(stat.S_IMODE(f.stat().st_mode), 0o600, f)

    def test_startup_warning_names_consumer_keys(self) -> None:
        warnings: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_level") == LogLevel.warn:
                warnings.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        try:
            start_gateway(self, api=True, providers=self.upstream.provider_settings())
        finally:
            globalLogPublisher.removeObserver(observe)
        [line] = [w for w in warnings if "GATEWAY_API_KEYS" in w]
        self.assertIn("unless it carries a consumer's key", line)
