"""
When a provider fails (#15): the status the client gets, the retry on
another key, failover to the other provider, the circuit breaker, key pools
and C{/readyz}.  Plain objects on a L{Clock}; the rest end to end, the
official openai SDK (with its default retries where that is the point) and
raw HTTP against a gateway in front of the stand-in upstream, on 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import openai
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import Site

from openclaw.ctl import format_status
from openclaw.ctl.show import format_health
from openclaw.dataplane import sse
from openclaw.dataplane.errors import upstream_refused
from openclaw.providers.breaker import CircuitBreaker
from openclaw.providers.errors import RefusalKind, classify
from openclaw.providers.gemini import GeminiAdapter
from openclaw.providers.keys import KeyPool, fingerprint, merge_keys
from openclaw.providers.kimi import KimiAdapter
from openclaw.settings import ConfigError, ProviderSettings, load_settings, provider_table
from tests.support import changed_providers, free_port, open_client
from tests.test_dataplane import GATEWAY_KEY, GEMINI_KEY, HELLO, KIMI_KEY, DataPlaneTestCase

OTHER = {"kimi": "gemini", "gemini": "kimi"}


class ClassifyTests(SynchronousTestCase):
    """
    A provider's non-2xx answer, read.
    """

    def test_table(self):
        for status, kind in (
            (400, RefusalKind.REQUEST),
            (404, RefusalKind.REQUEST),
            (409, RefusalKind.REQUEST),
            (413, RefusalKind.REQUEST),
            (422, RefusalKind.REQUEST),
            (429, RefusalKind.RATE_LIMITED),
            (401, RefusalKind.AUTH),
            (403, RefusalKind.FORBIDDEN),
            (500, RefusalKind.SERVER),
            (503, RefusalKind.SERVER),
            (302, RefusalKind.OTHER),
            # No status: "HTTP/1.1 000" is read as 0 by twisted.web.
            (0, RefusalKind.SERVER),
            (99, RefusalKind.SERVER),
        ):
            self.assertEqual(classify(status, b'{"error": {"message": "x", "type": "t"}}').kind, kind, status)

    def test_retry_after(self):
        body = b'{"error": {"message": "m", "type": "rate_limit_reached_error"}}'
        self.assertEqual(classify(429, body, "7").retry_after, 7.0)
        # The provider's header wins over the wait its body states (the
        # Gemini adapter's, tests.test_gemini_errors).
        self.assertEqual(classify(429, body, "3", body_delay=7.0).retry_after, 3.0)
        self.assertEqual(classify(429, body, None, body_delay=7.0).retry_after, 7.0)
        # An HTTP-date (RFC 9110 section 10.2.3).
        self.assertEqual(classify(429, b"{}", "Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0).retry_after, 10.0)
        # Unreadable: the default rest (KeyPool.rest), told to the client.
        self.assertEqual(classify(429, b"{}", "soon").retry_after, 10.0)
        error = upstream_refused("gemini", classify(429, body, "7"), "K", names_model=True)
        self.assertEqual((error.status, error.code), (429, "rate_limit_exceeded"))
        self.assertIn((b"Retry-After", b"7"), error.headers)
        self.assertIn((b"X-OpenClaw-Upstream-Status", b"429"), error.headers)

    def test_request_errors_keep_status(self):
        unknown = classify(404, b'{"error": {"message": "no model"}}')
        # A call that names a model: OpenAI's answer for one it lacks.
        error = upstream_refused("kimi", unknown, "K", names_model=True)
        self.assertEqual(
            (error.status, error.type, error.code, error.param),
            (404, "invalid_request_error", "model_not_found", "model"),
        )
        self.assertIn("no model", error.message)
        # A models listing: the 404 is not about a model.
        error = upstream_refused("kimi", unknown, "K", names_model=False)
        self.assertEqual((error.status, error.type, error.code), (404, "not_found_error", "upstream_not_found"))
        error = upstream_refused(
            "kimi", classify(400, b'{"error": {"message": "exceeded model token limit"}}'), "K", names_model=True
        )
        self.assertEqual((error.status, error.type), (400, "invalid_request_error"))
        self.assertIn("exceeded model token limit", error.message)


class BreakerTests(SynchronousTestCase):
    """
    The whole cycle, on a clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.changes: list[tuple[str, str]] = []
        self.breaker = CircuitBreaker(
            self.clock.seconds, threshold=3, cooldown=30, on_change=lambda a, b: self.changes.append((a, b))
        )

    def test_cycle(self):
        breaker = self.breaker
        breaker.failed()
        breaker.failed()
        breaker.succeeded()  # consecutive failures only
        breaker.failed()
        breaker.failed()
        self.assertEqual(breaker.state, "closed")
        self.assertTrue(breaker.allow())
        breaker.failed()
        self.assertEqual(breaker.state, "open")
        self.assertFalse(breaker.allow())
        self.assertEqual(breaker.remaining(), 30)
        self.clock.advance(29)
        self.assertFalse(breaker.allow())
        self.assertEqual(breaker.remaining(), 1)
        self.clock.advance(1)
        self.assertEqual(breaker.state, "half_open")
        # One trial call only.
        self.assertTrue(breaker.allow())
        self.assertFalse(breaker.allow())
        breaker.failed()
        self.assertEqual(breaker.state, "open")
        self.clock.advance(30)
        self.assertTrue(breaker.allow())
        breaker.abandoned()  # its client went away: the trial is free again
        self.assertTrue(breaker.allow())
        breaker.succeeded()
        self.assertEqual(breaker.state, "closed")
        self.assertEqual(
            self.changes,
            [
                ("closed", "open"),
                ("open", "half_open"),
                ("half_open", "open"),
                ("open", "half_open"),
                ("half_open", "closed"),
            ],
        )

    def test_unreachable_keeps_the_trial(self):
        """
        Another endpoint's call that cannot reach the provider counts as a
        failure (three open the breaker), and in half-open reopens it, but
        the chat call's trial under way keeps its place: no second trial
        is let through after the cooldown, and the trial's success closes
        the breaker.
        """
        breaker = self.breaker
        for _ in range(3):
            breaker.unreachable()
        self.assertEqual(breaker.state, "open")
        self.clock.advance(30)
        self.assertTrue(breaker.allow())  # the chat call's trial
        breaker.unreachable()
        self.assertEqual(breaker.state, "open")
        self.clock.advance(30)
        self.assertEqual(breaker.state, "half_open")
        self.assertFalse(breaker.allow())
        breaker.succeeded()
        self.assertEqual(breaker.state, "closed")


class KeyPoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = KeyPool(("a-key-1", "a-key-2", "a-key-3"), self.clock.seconds, "kimi")

    def test_round_robin(self):
        self.assertEqual([self.pool.pick() for _ in range(4)], ["a-key-1", "a-key-2", "a-key-3", "a-key-1"])
        self.assertEqual(self.pool.pick(avoid=["a-key-2"]), "a-key-3")

    def test_rest(self):
        pool = self.pool
        pool.rest("a-key-1", 5)
        pool.rest("a-key-2")  # the default: 10 s
        self.assertEqual([pool.pick() for _ in range(2)], ["a-key-3", "a-key-3"])
        self.assertEqual(pool.available, 1)
        pool.rest("a-key-3", 20)
        self.assertIsNone(pool.pick())
        self.assertEqual(pool.back_in(), 5)
        self.clock.advance(5)
        self.assertEqual(pool.pick(), "a-key-1")
        self.clock.advance(5)
        self.assertEqual(pool.available, 2)

    def test_set_aside_until_restored(self):
        pool = self.pool
        pool.set_aside("a-key-2")
        self.clock.advance(3600)
        self.assertEqual({pool.pick() for _ in range(4)}, {"a-key-1", "a-key-3"})
        self.assertEqual(pool.states()[fingerprint("a-key-2")], "set_aside")
        pool.restore("a-key-2")
        self.assertEqual(pool.available, 3)

    def test_unusable_reason(self):
        """
        Why no key may be used, as a failover reason: resting after a 429
        is C{rate_limited}, all set aside is C{auth}, none is C{no_key}.
        """
        pool = self.pool
        for key in pool.keys[:2]:
            pool.set_aside(key)
        pool.rest(pool.keys[2], 5)
        self.assertIsNone(pool.pick())
        self.assertEqual(pool.unusable_reason(), "rate_limited")
        pool.set_aside(pool.keys[2])
        self.assertEqual(pool.unusable_reason(), "auth")
        self.assertEqual(KeyPool((), self.clock.seconds).unusable_reason(), "no_key")

    def test_fingerprints_only(self):
        self.assertEqual(len(fingerprint("a-key-1")), 8)
        text = repr(self.pool) + json.dumps(self.pool.states())
        for key in self.pool.keys:
            self.assertNotIn(key, text)

    def test_merge(self):
        self.assertEqual(merge_keys(["k1"], ["k2", " k1 ", "", "k3"]), ("k1", "k2", "k3"))


class SettingsTests(SynchronousTestCase):
    def load(self, **env: str) -> Any:
        return load_settings(env, cwd=self.mktemp_dir())

    def mktemp_dir(self) -> Any:
        from pathlib import Path

        path = Path(self.mktemp())
        path.mkdir(parents=True)
        return path

    def test_pools_merged(self):
        settings = self.load(KIMI_API_KEY="k1", KIMI_API_KEYS="k2, k1,k3", GEMINI_API_KEYS="g1,g2")
        self.assertEqual(settings.providers["kimi"].keys, ("k1", "k2", "k3"))
        self.assertEqual(settings.providers["gemini"].keys, ("g1", "g2"))
        self.assertEqual(settings.providers["gemini"].api_key, "g1")

    def test_failover_settings(self):
        settings = self.load(FALLBACK="off", FALLBACK_MODEL_GEMINI="gemini-2.5-pro", BREAKER_FAILURES="2")
        self.assertEqual(settings.fallback, "off")
        self.assertEqual(settings.providers["gemini"].fallback_model, "gemini-2.5-pro")
        self.assertIsNone(settings.providers["kimi"].fallback_model)
        self.assertEqual(settings.breaker_failures, 2)
        defaults = self.load()
        self.assertEqual(
            (defaults.fallback, defaults.breaker_failures, defaults.breaker_cooldown_seconds), ("auto", 5, 30)
        )
        for name, value in (("FALLBACK", "maybe"), ("BREAKER_FAILURES", "0"), ("BREAKER_COOLDOWN_SECONDS", "-1")):
            error = self.assertRaises(ConfigError, self.load, **{name: value})
            self.assertIn(name, str(error))

    def test_status_shows_breakers(self):
        text = format_status(
            {"providers": {"kimi": {"breaker": "open", "keys": {"1a2b3c4d": "ok", "5e6f7a8b": "resting"}}}}
        )
        self.assertEqual(text, "providers: kimi breaker open, keys 1/2")
        # A Gemini key resting for one model serves the others (re-check
        # s42: "keys 0/1" was printed while flash and embeddings worked).
        text = format_status(
            {"providers": {"gemini": {"breaker": "closed", "keys": {"9c9ec83c": "resting for gemini-2.5-pro"}}}}
        )
        self.assertEqual(text, "providers: gemini breaker closed, keys 1/1 (resting for gemini-2.5-pro)")
        line = format_health(
            {
                "active": "gemini",
                "providers": {"gemini": {"ok": True, "keys": {"9c9ec83c": "resting for gemini-2.5-pro-preview-0506"}}},
            }
        )
        self.assertIn("keys 1/1 usable (9c9ec83c resting for gemini-2.5-pro-preview-0506)", line)


class ResilienceTestCase(DataPlaneTestCase):
    timeout = 30

    def sdk_retrying(self, gateway: Any) -> openai.OpenAI:
        """
        The SDK as applications use it: its default retries.
        """
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.api_port}/v1", api_key=GATEWAY_KEY, timeout=10)
        self.addCleanup(deferToThread, client.close)
        return client

    def behaviour(self, provider_id: str) -> Any:
        return self.upstream.behaviour(provider_id)

    @inlineCallbacks
    def get(self, gateway: Any, path: str) -> Any:
        response = yield self.http().get(f"http://127.0.0.1:{gateway.api_port}{path}")
        text = yield response.text("utf-8")
        return response, text


class StatusTableTests(ResilienceTestCase):
    """
    The client's status follows what the provider said.
    """

    @inlineCallbacks
    def test_request_errors_not_retried_by_the_sdk(self):
        for provider in ("kimi", "gemini"):
            gateway = self.gateway(default_provider=provider, fallback="off")
            client = self.sdk_retrying(gateway)
            behaviour = self.behaviour(provider)
            behaviour.mode, behaviour.error_status = "error", 400
            behaviour.error_message = "Invalid request: exceeded model token limit"
            behaviour.reset()
            self.behaviour(OTHER[provider]).reset()
            failure = yield self.assertFailure(
                deferToThread(client.chat.completions.create, model="x", messages=HELLO), openai.BadRequestError
            )
            self.assertEqual(failure.status_code, 400)
            self.assertIn("exceeded model token limit", failure.message)
            self.assertEqual(failure.response.headers["x-openclaw-upstream-status"], "400")
            self.assertEqual(behaviour.requests, 1, provider)  # no retry
            # An unknown model: 404, not retried, no base-URL hint.
            behaviour.mode = "ok"
            behaviour.reset()
            failure = yield self.assertFailure(
                deferToThread(client.chat.completions.create, model=f"{provider}/no-such-model", messages=HELLO),
                openai.NotFoundError,
            )
            self.assertNotIn("BASE_URL", failure.message)
            self.assertEqual(behaviour.requests, 1, provider)
            self.assertEqual(self.behaviour(OTHER[provider]).requests, 0)

    @inlineCallbacks
    def test_rate_limit_retry_after_honoured(self):
        for provider in ("kimi", "gemini"):
            gateway = self.gateway(default_provider=provider, fallback="off")
            client = self.sdk_retrying(gateway)
            behaviour = self.behaviour(provider)
            behaviour.mode, behaviour.error_status, behaviour.retry_after = "error", 429, 1
            behaviour.reset()
            started = time.monotonic()
            failure = yield self.assertFailure(
                deferToThread(client.chat.completions.create, model="x", messages=HELLO), openai.RateLimitError
            )
            elapsed = time.monotonic() - started
            self.assertEqual(failure.code, "rate_limit_exceeded")
            # Moonshot's Retry-After header, Gemini's RetryInfo.retryDelay: both "1".
            self.assertEqual(failure.response.headers["retry-after"], "1")
            self.assertEqual(failure.response.headers["x-openclaw-upstream-status"], "429")
            # Two retries, each after the second asked for (the SDK's own
            # backoff would have waited under 1.5 s in all).
            self.assertGreaterEqual(elapsed, 1.9)
            self.assertEqual(behaviour.requests, 3, provider)

    @inlineCallbacks
    def test_auth_failures(self):
        gateway = self.gateway(fallback="off")
        for provider, setup, setting in (
            ("kimi", {"mode": "unauthorized"}, "KIMI_API_KEY / KIMI_API_KEYS"),
            ("gemini", {"invalid_keys": {GEMINI_KEY}}, "GEMINI_API_KEY / GEMINI_API_KEYS"),
        ):
            behaviour = self.behaviour(provider)
            for name, value in setup.items():
                setattr(behaviour, name, value)
            response, text = yield self.post(gateway, {"model": f"{provider}/x", "messages": HELLO})
            self.assertEqual(response.code, 502, (provider, setup))
            error = self.assertOpenAIError(text, "upstream_auth_failed")
            self.assertIn(setting, error["message"])
            self.assertNotIn("BASE_URL", error["message"])
            for secret in (KIMI_KEY, GEMINI_KEY):
                self.assertNotIn(secret, text)
            behaviour.mode, behaviour.invalid_keys = "ok", set()
            # Set aside: the next call has no usable key until a health check.
            gateway.service.providers.get(provider).keys.restore(KIMI_KEY if provider == "kimi" else GEMINI_KEY)
        # Gemini's invalid key arrived in its real shape.
        self.assertEqual(self.behaviour("gemini").keys_seen, [GEMINI_KEY])

    @inlineCallbacks
    def test_server_error(self):
        gateway = self.gateway(fallback="off")
        for provider in ("kimi", "gemini"):
            behaviour = self.behaviour(provider)
            behaviour.mode, behaviour.error_status = "error", 503
            response, text = yield self.post(gateway, {"model": f"{provider}/x", "messages": HELLO})
            self.assertEqual(response.code, 502)
            self.assertEqual(response.headers.getRawHeaders("x-openclaw-upstream-status"), ["503"])
            self.assertOpenAIError(text, "upstream_http_error")


def _fallback_counts(text: str) -> dict[tuple[str, str, str], float]:
    counts = {}
    for line in text.splitlines():
        if line.startswith("openclaw_api_fallbacks_total{"):
            labels, value = line.rsplit(" ", 1)
            parts = dict(p.split("=", 1) for p in labels[len("openclaw_api_fallbacks_total{") : -1].split(","))
            counts[(parts["from"].strip('"'), parts["to"].strip('"'), parts["reason"].strip('"'))] = float(value)
    return counts


class FailoverTests(ResilienceTestCase):
    """
    A call to the active provider that fails before its answer started goes
    once to the other provider, whole or streamed, either way round.
    """

    def trigger(self, gateway: Any, provider: str, reason: str) -> None:
        behaviour = self.behaviour(provider)
        adapter = gateway.service.providers.get(provider)
        behaviour.mode = "ok"
        if reason == "http_5xx":
            behaviour.mode, behaviour.error_status = "error", 503
        elif reason == "rate_limited":
            behaviour.mode, behaviour.error_status = "error", 429
        elif reason == "auth":
            behaviour.mode = "unauthorized"
        elif reason == "timeout":
            behaviour.mode = "hang"
        elif reason == "breaker_open":
            for _ in range(adapter.breaker.threshold):
                adapter.breaker.failed()

    @inlineCallbacks
    def check_failover(self, gateway: Any, origin: str, reason: str, stream: bool) -> Any:
        target = OTHER[origin]
        response, text = yield self.post(gateway, {"model": "gpt-4o", "messages": HELLO, "stream": stream})
        self.assertEqual(response.code, 200, (origin, reason, stream, text))
        self.assertEqual(response.headers.getRawHeaders("x-openclaw-provider"), [target])
        self.assertEqual(
            response.headers.getRawHeaders("x-openclaw-fallback"), [f"{origin}->{target}; reason={reason}"]
        )
        if stream:
            self.assertTrue(text.endswith("data: [DONE]\n\n"), text)
            self.assertIn(
                "stand-in",
                "".join(
                    json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                    for line in text.split("\n\n")
                    if line.startswith("data: {") and json.loads(line[6:])["choices"]
                ),
            )
        else:
            self.assertEqual(json.loads(text)["choices"][0]["message"]["content"], "Hello from the stand-in.")

    @inlineCallbacks
    def test_each_trigger_both_ways(self):
        for origin in ("kimi", "gemini"):
            gateway = self.gateway(default_provider=origin, upstream_timeout=0.5, breaker_failures=2)
            for reason in ("http_5xx", "rate_limited", "auth", "timeout", "breaker_open"):
                for stream in (False, True):
                    self.trigger(gateway, origin, reason)
                    yield self.check_failover(gateway, origin, reason, stream)
                    # Each call leaves state behind (a resting key, a set
                    # aside one, an open breaker): start the next afresh.
                    adapter = gateway.service.providers.get(origin)
                    gateway.service.providers.get(origin).keys = type(adapter.keys)(
                        adapter.keys.keys, reactor.seconds, origin
                    )
                    adapter.breaker.succeeded()
                    self.behaviour(origin).mode = "ok"
            # Failover never changes the active provider.
            self.assertEqual(gateway.service.route.current.provider_id, origin)
            _, text = yield self.get(gateway, "/metrics")
            counts = _fallback_counts(text)
            target = OTHER[origin]
            for reason in ("http_5xx", "rate_limited", "auth", "timeout", "breaker_open"):
                self.assertEqual(counts[(origin, target, reason)], 2.0, reason)
        logged = [e for e in self.events if e.get("log_format", "").startswith("call failed over")]
        self.assertEqual(len(logged), 20)
        self.assertEqual(logged[0]["log_level"].name, "info")

    @inlineCallbacks
    def test_resting_key_counts_as_rate_limited(self):
        """
        After its only key was answered 429, the provider's next calls fail
        over while the key rests, and say why: C{rate_limited}, not
        C{no_key}; after an auth failure, C{auth}.
        """
        for reason in ("rate_limited", "auth"):
            gateway = self.gateway(default_provider="kimi")
            self.trigger(gateway, "kimi", reason)
            yield self.check_failover(gateway, "kimi", reason, False)
            self.behaviour("kimi").mode = "ok"
            requests = self.behaviour("kimi").requests
            yield self.check_failover(gateway, "kimi", reason, False)
            self.assertEqual(self.behaviour("kimi").requests, requests)  # not tried: no usable key

    @inlineCallbacks
    def test_connect_and_no_key(self):
        port = free_port()
        for origin in ("kimi", "gemini"):
            for changes, reason in (
                ({"base_url": f"http://127.0.0.1:{port}/v1"}, "connect"),
                ({"api_key": None}, "no_key"),
            ):
                providers = changed_providers(self.upstream.provider_settings(), **{origin: changes})
                gateway = self.gateway(providers=providers, default_provider=origin)
                for stream in (False, True):
                    yield self.check_failover(gateway, origin, reason, stream)

    @inlineCallbacks
    def test_fallback_model(self):
        providers = changed_providers(self.upstream.provider_settings(), gemini={"fallback_model": "gemini-2.5-pro"})
        gateway = self.gateway(providers=providers, default_provider="kimi")
        self.behaviour("kimi").mode, self.behaviour("kimi").error_status = "error", 500
        client = self.sdk(gateway)
        raw = yield deferToThread(client.chat.completions.with_raw_response.create, model="gpt-4o", messages=HELLO)
        self.assertEqual(raw.headers["x-openclaw-fallback"], "kimi->gemini; reason=http_5xx")
        self.assertEqual(raw.parse().model, "gemini-2.5-pro")
        self.assertEqual(self.upstream.gemini.uris, ["/gemini/v1beta/models/gemini-2.5-pro:generateContent"])

    @inlineCallbacks
    def test_no_failover(self):
        gateway = self.gateway(default_provider="kimi")
        kimi, gemini = self.behaviour("kimi"), self.behaviour("gemini")
        # Pinned: the caller chose.
        kimi.mode, kimi.error_status = "error", 503
        response, text = yield self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO})
        self.assertEqual(response.code, 502)
        self.assertIsNone(response.headers.getRawHeaders("x-openclaw-fallback"))
        # A 4xx of the table: the request is at fault.
        kimi.error_status = 400
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 400)
        # A stream that started is never restarted.
        kimi.mode = "cut"
        response, text = yield self.post(gateway, {"messages": HELLO, "stream": True})
        self.assertEqual(response.code, 200)
        self.assertNotIn("[DONE]", text)
        self.assertIn('"error"', text)
        self.assertEqual(gemini.requests, 0)
        # A request Kimi takes but Gemini cannot (its candidateCount limit,
        # its int32 fields, tool calls no user turn comes before): Kimi's
        # own failure (retryable), no failover counted or claimed.
        kimi.mode, kimi.error_status = "error", 500
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        calls_first = [
            {"role": "system", "content": "s"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "r"},
        ]
        for extra in (
            {"n": 9},
            {"max_tokens": 2**31},
            {"max_completion_tokens": 2**40},
            {"seed": 2**31},
            {"messages": calls_first},
        ):
            response, text = yield self.post(gateway, {"messages": HELLO, **extra})
            self.assertEqual(response.code, 502, text)
            self.assertEqual(response.headers.getRawHeaders("x-openclaw-upstream-status"), ["500"])
            self.assertEqual(response.headers.getRawHeaders("x-openclaw-provider"), ["kimi"])
            self.assertIsNone(response.headers.getRawHeaders("x-openclaw-fallback"), extra)
        self.assertEqual(gemini.requests, 0)
        _, metrics = yield self.get(gateway, "/metrics")
        self.assertNotIn("openclaw_api_fallbacks_total{", metrics)
        # FALLBACK=off.
        gateway = self.gateway(default_provider="kimi", fallback="off")
        kimi.mode, kimi.error_status = "error", 503
        response, _ = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 502)
        self.assertEqual(gemini.requests, 0)

    @inlineCallbacks
    def test_failover_target_must_be_usable(self):
        # The other provider has no key: the active one's error stands.
        providers = changed_providers(self.upstream.provider_settings(), gemini={"api_key": None})
        gateway = self.gateway(providers=providers, default_provider="kimi")
        self.behaviour("kimi").mode, self.behaviour("kimi").error_status = "error", 503
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 502)
        self.assertOpenAIError(text, "upstream_http_error")


class KeyPoolEndToEndTests(ResilienceTestCase):
    @inlineCallbacks
    def test_rotation_rest_and_retry(self):
        second = "sk-kimi-SECOND-0123456789abcdef"
        kimi = self.behaviour("kimi")
        kimi.extra_keys = [second]
        providers = changed_providers(self.upstream.provider_settings(), kimi={"api_keys": (second,)})
        gateway = self.gateway(providers=providers, default_provider="kimi", fallback="off")
        for _ in range(4):
            response, _ = yield self.post(gateway, {"messages": HELLO})
            self.assertEqual(response.code, 200)
        self.assertEqual(kimi.keys_seen, [KIMI_KEY, second, KIMI_KEY, second])
        # The first key is rate limited: the call is retried on the second,
        # and the first rests (Retry-After: 1) while the second serves.
        kimi.reset()
        kimi.rate_limited_keys = {KIMI_KEY}
        for _ in range(3):
            response, _ = yield self.post(gateway, {"messages": HELLO})
            self.assertEqual(response.code, 200)
            self.assertIsNone(response.headers.getRawHeaders("x-openclaw-fallback"))
        self.assertEqual(kimi.keys_seen, [KIMI_KEY, second, second, second])
        # Both rate limited: 429 with how long until the first is back.
        kimi.rate_limited_keys = {KIMI_KEY, second}
        yield deferLater(reactor, 1.05)
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 429)
        self.assertOpenAIError(text, "rate_limit_exceeded")
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["1"])
        # Only fingerprints in the logs.
        for secret in (KIMI_KEY, second):
            self.assertNotIn(secret, repr(self.events))

    @inlineCallbacks
    def test_set_aside_until_health_check(self):
        second = "AIza-gemini-SECOND-0123456789abcdef"
        gemini = self.behaviour("gemini")
        gemini.extra_keys = [second]
        gemini.invalid_keys = {GEMINI_KEY}
        providers = changed_providers(self.upstream.provider_settings(), gemini={"api_keys": (second,)})
        gateway = self.gateway(providers=providers, fallback="off")
        for _ in range(3):
            response, _ = yield self.post(gateway, {"messages": HELLO})
            self.assertEqual(response.code, 200)
        self.assertEqual(gemini.keys_seen, [GEMINI_KEY, second, second, second])
        pool = gateway.service.providers.get("gemini").keys
        self.assertEqual(pool.states()[fingerprint(GEMINI_KEY)], "set_aside")
        # Still refused: the health check (each key probed) keeps it aside.
        control = yield open_client(self, gateway.port)
        answer = yield control.command(gateway.token, "health_check")
        entry = answer["result"]["providers"]["gemini"]
        self.assertEqual(entry["keys"], {fingerprint(GEMINI_KEY): "set_aside", fingerprint(second): "ok"})
        self.assertEqual(entry["breaker"], "closed")
        # Fixed upstream: the next health check puts it back in use.
        gemini.invalid_keys = set()
        answer = yield control.command(gateway.token, "health_check")
        self.assertEqual(answer["result"]["providers"]["gemini"]["keys"][fingerprint(GEMINI_KEY)], "ok")
        gemini.reset()
        for _ in range(2):
            yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(sorted(gemini.keys_seen), sorted([GEMINI_KEY, second]))
        self.assertNotIn(GEMINI_KEY, json.dumps(answer))


class BreakerEndToEndTests(ResilienceTestCase):
    @inlineCallbacks
    def test_open_half_open_closed(self):
        gateway = self.gateway(default_provider="kimi", fallback="off", breaker_failures=2, breaker_cooldown_seconds=1)
        kimi = self.behaviour("kimi")
        kimi.mode, kimi.error_status = "error", 500
        for _ in range(2):
            response, _ = yield self.post(gateway, {"messages": HELLO})
            self.assertEqual(response.code, 502)
        kimi.reset()
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 503)
        self.assertOpenAIError(text, "provider_unavailable")
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["1"])
        self.assertEqual(kimi.requests, 0)  # not sent
        _, metrics = yield self.get(gateway, "/metrics")
        self.assertIn('openclaw_provider_breaker_open{provider="kimi"} 1.0', metrics)
        self.assertIn('openclaw_provider_breaker_open{provider="gemini"} 0.0', metrics)
        # A good probe does not close it.
        kimi.mode = "ok"
        control = yield open_client(self, gateway.port)
        answer = yield control.command(gateway.token, "health_check")
        self.assertTrue(answer["result"]["providers"]["kimi"]["ok"])
        self.assertEqual(answer["result"]["providers"]["kimi"]["breaker"], "open")
        status = yield control.command(gateway.token, "status")
        self.assertEqual(status["result"]["providers"]["kimi"]["breaker"], "open")
        response, _ = yield self.get(gateway, "/readyz")
        self.assertEqual(response.code, 503)
        # After the cooldown one call goes through, and closes it.
        yield deferLater(reactor, 1.05)
        status = yield control.command(gateway.token, "status")
        self.assertEqual(status["result"]["providers"]["kimi"]["breaker"], "half_open")
        response, _ = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 200)
        status = yield control.command(gateway.token, "status")
        self.assertEqual(status["result"]["providers"]["kimi"]["breaker"], "closed")
        logged = [e["log_format"] for e in self.events if "circuit breaker" in e.get("log_format", "")]
        self.assertEqual(len(logged), 2)

    @inlineCallbacks
    def test_every_breaker_open_said_of_every_provider(self):
        """
        The breakers of the call's provider and of its fallback both open:
        the 503 names both, each with its wait, and tells the client to
        retry when the first can take the call, not to have the operator
        switch to the other, failing, provider (trial s32).
        """
        gateway = self.gateway(default_provider="kimi", breaker_failures=1, breaker_cooldown_seconds=30)
        providers = gateway.service.providers
        providers.get("kimi").breaker.failed()
        yield deferLater(reactor, 0.2)
        providers.get("gemini").breaker.failed()
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 503, text)
        self.assertOpenAIError(text, "provider_unavailable")
        message = json.loads(text)["error"]["message"]
        self.assertIn("kimi has been failing, and so has gemini, where the call would fail over", message)
        self.assertIn("(BREAKER_COOLDOWN_SECONDS: kimi in 30 s, gemini in 30 s)", message)
        self.assertNotIn("switch_provider", message)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["30"])
        self.assertEqual((self.behaviour("kimi").requests, self.behaviour("gemini").requests), (0, 0))
        # A call that named its provider is not moved by a switch: told to
        # name another provider's model (re-check s32).
        response, text = yield self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO})
        self.assertEqual(response.code, 503, text)
        message = json.loads(text)["error"]["message"]
        self.assertIn("retry after that, or name another provider's model", message)
        self.assertNotIn("switch_provider", message)
        # Only the call's own breaker open: failed over, as before.
        providers.get("gemini").breaker.succeeded()
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 200, text)

    @inlineCallbacks
    def test_failover_skipped_for_a_breaker_is_said(self):
        """
        The call's provider fails (a 500) while its fallback's breaker is
        open (or its keys rest): the 502 says why the fallback was not
        tried, not the first failure alone (trial s33), as the 503 of
        L{test_every_breaker_open_said_of_every_provider} does.
        """
        gateway = self.gateway(default_provider="kimi", breaker_failures=1, breaker_cooldown_seconds=30)
        kimi = self.behaviour("kimi")
        kimi.mode, kimi.error_status = "error", 500
        gemini = gateway.service.providers.get("gemini")
        gemini.breaker.failed()
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 502, text)
        message = self.assertOpenAIError(text, "upstream_http_error")["message"]
        self.assertTrue(message.startswith("kimi answered HTTP 500"), message)
        self.assertTrue(
            message.endswith(
                "(not failed over to gemini: it has been failing too, and its breaker is open for 30 s more "
                "(BREAKER_COOLDOWN_SECONDS))"
            ),
            message,
        )
        self.assertIsNone(response.headers.getRawHeaders("x-openclaw-fallback"))
        self.assertEqual(self.behaviour("gemini").requests, 0)
        # Its cooldown over, and its half-open trial under way.
        gemini.breaker.cooldown = 0
        self.assertTrue(gemini.breaker.allow())
        gateway.service.providers.get("kimi").breaker.succeeded()
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 502, text)
        self.assertIn(
            "(not failed over to gemini: it has been failing too, and its breaker's one trial call (half-open) "
            "is under way)",
            json.loads(text)["error"]["message"],
        )
        # Its breaker closed, but every key of its resting after a 429.
        gemini.breaker.succeeded()
        gemini.keys.rest(gemini.keys.keys[0], 20)
        gateway.service.providers.get("kimi").breaker.succeeded()
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 502, text)
        self.assertIn(
            "(not failed over to gemini: every key the gateway holds for it is rate limited for 20 s more)",
            json.loads(text)["error"]["message"],
        )
        # Resting for the model the call would fail over to alone: said by
        # name (re-check s42: as if every Gemini model were out).
        gemini.keys.restore(gemini.keys.keys[0])
        gemini.keys.rest(gemini.keys.keys[0], 0)
        gemini.keys.rest(gemini.keys.keys[0], 20, gemini.failover_model)
        gateway.service.providers.get("kimi").breaker.succeeded()
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 502, text)
        self.assertIn(
            f"(not failed over to gemini: every key the gateway holds for it is rate limited for "
            f"{gemini.failover_model} for 20 s more)",
            json.loads(text)["error"]["message"],
        )

    @inlineCallbacks
    def test_other_endpoints_do_not_judge_completions(self):
        """
        Answers of the models listing and of embeddings say nothing of
        completions: chat calls failing between them open the breaker
        (a listing after every other failure kept it closed), and in
        half-open a listing neither takes the trial nor closes it.
        """
        gateway = self.gateway(
            default_provider="gemini", fallback="off", breaker_failures=3, breaker_cooldown_seconds=1
        )
        gemini = self.behaviour("gemini")
        embeddings = {"model": "gemini/gemini-embedding-001", "input": "ab"}
        authorized = {"Authorization": [f"Bearer {GATEWAY_KEY}"]}
        breaker = gateway.service.providers.get("gemini").breaker
        for _ in range(2):
            gemini.mode, gemini.error_status = "error", 503
            response, _ = yield self.post(gateway, {"messages": HELLO})
            self.assertEqual(response.code, 502)
            gemini.mode = "ok"
            response = yield self.http().get(f"http://127.0.0.1:{gateway.api_port}/v1/models", headers=authorized)
            self.assertEqual(response.code, 200)
            response, text = yield self.post(gateway, embeddings, path="/v1/embeddings")
            self.assertEqual(response.code, 200, text)
            self.assertEqual(str(breaker.state), "closed")
        gemini.mode = "error"
        response, _ = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 502)
        self.assertEqual(str(breaker.state), "open")
        # While open, they are refused as chat calls are.
        gemini.mode = "ok"
        response, _ = yield self.post(gateway, embeddings, path="/v1/embeddings")
        self.assertEqual(response.code, 503)
        yield deferLater(reactor, 1.05)
        response = yield self.http().get(f"http://127.0.0.1:{gateway.api_port}/v1/models", headers=authorized)
        self.assertEqual(response.code, 200)
        self.assertEqual(str(breaker.state), "half_open")
        response, _ = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 200)
        self.assertEqual(str(breaker.state), "closed")


class ClientLeavesTests(ResilienceTestCase):
    @inlineCallbacks
    def test_listing_left_does_not_charge_the_breaker(self):
        """
        A client that closes its connection while its models listing waits
        on the provider is no fault of the provider's: any key holder
        could otherwise open its breaker (for everyone) at will.
        """
        gateway = self.gateway(default_provider="kimi", fallback="off", breaker_failures=2)
        kimi = self.behaviour("kimi")
        kimi.delay = 1.0
        request = (
            f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {GATEWAY_KEY}\r\n\r\n"
        ).encode()

        def ask_and_leave() -> None:
            with socket.create_connection(("127.0.0.1", gateway.api_port)) as sock:
                sock.sendall(request)

        for _ in range(3):
            yield deferToThread(ask_and_leave)
        for _ in range(100):
            if kimi.requests == 3:
                break
            yield deferLater(reactor, 0.02)
        yield deferLater(reactor, 0.2)
        self.assertEqual(str(gateway.service.providers.get("kimi").breaker.state), "closed")
        kimi.delay = 0
        response, _ = yield self.get(gateway, "/readyz")
        self.assertEqual(response.code, 200)


@inlineCallbacks
def consumers_loaded(gateway: Any) -> Any:
    """
    Wait until C{gateway}'s consumers have loaded (SQLite, in a thread):
    it is not ready before (L{openclaw.dataplane.resource.Readyz}).
    """
    for _ in range(500):
        if gateway.service.consumers.loaded:
            return
        yield deferLater(reactor, 0.01)
    raise AssertionError("the consumers never loaded")


class ReadyzTests(ResilienceTestCase):
    @inlineCallbacks
    def test_states(self):
        gateway = self.gateway(default_provider="kimi")
        yield consumers_loaded(gateway)
        response, text = yield self.get(gateway, "/readyz")
        self.assertEqual(response.code, 200)
        self.assertEqual(
            json.loads(text),
            {"ready": True, "provider": "kimi", "breaker": "closed", "usable_keys": 1, "fallback": None},
        )
        kimi = gateway.service.providers.get("kimi")
        gemini = gateway.service.providers.get("gemini")
        # The active provider's keys all rest, but failover has somewhere to go.
        kimi.keys.rest(KIMI_KEY, 60)
        response, text = yield self.get(gateway, "/readyz")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(text)["fallback"], "gemini")
        # Nowhere to go: 503 with the reason.
        gemini.keys.set_aside(GEMINI_KEY)
        response, text = yield self.get(gateway, "/readyz")
        self.assertEqual(response.code, 503)
        document = json.loads(text)
        self.assertFalse(document["ready"])
        self.assertIn("KIMI_API_KEY / KIMI_API_KEYS", document["reason"])
        # Breaker open, FALLBACK=off.
        gateway = self.gateway(default_provider="gemini", fallback="off")
        yield consumers_loaded(gateway)
        for _ in range(5):
            gateway.service.providers.get("gemini").breaker.failed()
        response, text = yield self.get(gateway, "/readyz")
        self.assertEqual(response.code, 503)
        self.assertIn("circuit breaker is open", json.loads(text)["reason"])
        self.assertIn("FALLBACK is off", json.loads(text)["reason"])
        # /healthz stays liveness.
        response, _ = yield self.get(gateway, "/healthz")
        self.assertEqual(response.code, 200)

    @inlineCallbacks
    def test_half_open_is_ready(self):
        """
        Once the cooldown is over the instance is ready again, even with
        nowhere to fail over to: the breaker is passive, only a call can
        close it, and a balancer that held calls back until it closed would
        hold them back for ever.
        """
        # A cooldown the first /readyz comes well within on a loaded host.
        gateway = self.gateway(default_provider="gemini", fallback="off", breaker_cooldown_seconds=1.5)
        yield consumers_loaded(gateway)
        for _ in range(5):
            gateway.service.providers.get("gemini").breaker.failed()
        response, _ = yield self.get(gateway, "/readyz")
        self.assertEqual(response.code, 503)
        yield deferLater(reactor, 1.6, lambda: None)
        response, text = yield self.get(gateway, "/readyz")
        self.assertEqual(response.code, 200, text)
        self.assertEqual(json.loads(text)["breaker"], "half_open")
        # The trial call goes through and closes it.
        response, _ = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 200)
        self.assertEqual(str(gateway.service.providers.get("gemini").breaker.state), "closed")
        # /healthz stays liveness.
        response, _ = yield self.get(gateway, "/healthz")
        self.assertEqual(response.code, 200)

    @inlineCallbacks
    def test_half_open_names_the_fallback(self):
        """
        In half-open, one call tries the active provider and the others
        fail over: the probe names where they go (it said null).
        """
        gateway = self.gateway(default_provider="gemini", breaker_cooldown_seconds=0.2)
        yield consumers_loaded(gateway)
        for _ in range(5):
            gateway.service.providers.get("gemini").breaker.failed()
        yield deferLater(reactor, 0.3, lambda: None)
        response, text = yield self.get(gateway, "/readyz")
        self.assertEqual(response.code, 200, text)
        document = json.loads(text)
        self.assertEqual((document["breaker"], document["fallback"]), ("half_open", "kimi"))
        self.assertIn("the other calls fail over to kimi", document["reason"])


class HalfOpenTrialTests(ResilienceTestCase):
    """
    The half-open trial call gives the breaker a verdict, or gives the
    trial back, however it ends: else the provider is shut out (503
    C{provider_unavailable}) until a restart.
    """

    @inlineCallbacks
    def open_breaker(self, gateway: Any) -> Any:
        """
        One 503 opens the breaker (C{breaker_failures=1}); fire once its
        cooldown is over.
        """
        kimi = self.behaviour("kimi")
        kimi.mode, kimi.error_status = "error", 503
        response, _ = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 502)
        breaker = gateway.service.providers.get("kimi").breaker
        self.assertEqual(breaker.state, "open")
        yield deferLater(reactor, breaker.remaining() + 0.05)
        self.assertEqual(breaker.state, "half_open")

    def trial_gateway(self, **settings: Any) -> Any:
        """
        A gateway whose Kimi breaker opens at one failure and cools down in
        0.3 s, with nowhere to fail over to.
        """
        return self.gateway(
            **{
                "default_provider": "kimi",
                "fallback": "off",
                "breaker_failures": 1,
                "breaker_cooldown_seconds": 0.3,
                **settings,
            }
        )

    @inlineCallbacks
    def check_served_again(self, gateway: Any) -> Any:
        """
        The provider answers again, and its next call (after one more
        cooldown, if the trial failed) is sent and closes the breaker.
        """
        kimi = self.behaviour("kimi")
        kimi.mode = "ok"
        breaker = gateway.service.providers.get("kimi").breaker
        yield deferLater(reactor, breaker.remaining() + 0.05)
        kimi.reset()
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 200, text)
        self.assertEqual(kimi.requests, 1)
        self.assertEqual(breaker.state, "closed")

    @inlineCallbacks
    def test_error_body_too_slow(self):
        for stream in (False, True):
            gateway = self.trial_gateway(upstream_timeout=0.3)
            yield self.open_breaker(gateway)
            # The trial: a 503 whose body never comes whole.
            self.behaviour("kimi").mode = "error_stall"
            response, text = yield self.post(gateway, {"messages": HELLO, "stream": stream})
            # The provider's 503, whose body did not come in time.
            self.assertEqual(response.code, 502, text)
            said = self.assertOpenAIError(text, "upstream_http_error")["message"]
            self.assertIn("HTTP 503", said)
            self.assertIn("its error body did not come whole", said)
            # A 5xx: the provider's failure, the breaker opens again.
            self.assertEqual(gateway.service.providers.get("kimi").breaker.state, "open")
            yield self.check_served_again(gateway)

    @inlineCallbacks
    def test_error_body_cut(self):
        gateway = self.trial_gateway()
        yield self.open_breaker(gateway)
        self.behaviour("kimi").mode = "error_cut"
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 502, text)
        self.assertEqual(gateway.service.providers.get("kimi").breaker.state, "open")
        yield self.check_served_again(gateway)

    @inlineCallbacks
    def test_5xx_whose_body_never_comes_fails_over(self):
        """
        A 5xx whose body stalls or is cut is a 5xx all the same: failed
        over when the call may be, and, pinned, answered with the status in
        X-OpenClaw-Upstream-Status.
        """
        for mode, pinned_status in (("error_stall", 502), ("error_cut", 502)):
            for stream in (False, True):
                gateway = self.gateway(default_provider="kimi", upstream_timeout=0.3)
                self.behaviour("kimi").mode = mode
                self.behaviour("kimi").error_headers = {"Retry-After": "7"}
                response, text = yield self.post(gateway, {"messages": HELLO, "stream": stream})
                self.assertEqual(response.code, 200, (mode, stream, text))
                self.assertEqual(
                    response.headers.getRawHeaders("x-openclaw-fallback"), ["kimi->gemini; reason=http_5xx"]
                )
                response, text = yield self.post(
                    gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO, "stream": stream}
                )
                self.assertEqual(response.code, pinned_status, (mode, stream, text))
                status = self.behaviour("kimi").error_status
                self.assertEqual(response.headers.getRawHeaders("x-openclaw-upstream-status"), [str(status)])
                # Its Retry-After came whole with its status: kept.
                self.assertEqual(response.headers.getRawHeaders("retry-after"), ["7"])

    @inlineCallbacks
    def test_4xx_error_body_too_slow(self):
        # A 4xx keeps its meaning, whatever its body did; a refusal of the
        # request says nothing of completions: the trial is free again.
        gateway = self.trial_gateway(upstream_timeout=0.3)
        yield self.open_breaker(gateway)
        kimi = self.behaviour("kimi")
        kimi.mode, kimi.error_status = "error_stall", 400
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 400, text)
        error = self.assertOpenAIError(text, "upstream_invalid_request")
        self.assertIn("its error body did not come whole", error["message"])
        breaker = gateway.service.providers.get("kimi").breaker
        self.assertEqual(breaker.state, "half_open")
        self.assertTrue(breaker.would_allow())

    @inlineCallbacks
    def test_refusals_do_not_hold_the_breaker_closed(self):
        """
        A key holder's calls of a model the provider does not have (404)
        between failing calls neither reset the count of failures nor
        close the breaker from half-open: they say nothing of completions.
        """
        gateway = self.gateway(default_provider="kimi", fallback="off", breaker_failures=3, breaker_cooldown_seconds=1)
        kimi = self.behaviour("kimi")
        breaker = gateway.service.providers.get("kimi").breaker
        bogus = {"model": "kimi/no-such-model", "messages": HELLO}
        for _ in range(3):
            kimi.mode, kimi.error_status = "error", 500
            response, _ = yield self.post(gateway, {"messages": HELLO})
            self.assertEqual(response.code, 502)
            kimi.mode = "ok"
            response, _ = yield self.post(gateway, bogus)
            self.assertIn(response.code, (404, 503))
        self.assertEqual(breaker.state, "open")
        yield deferLater(reactor, breaker.remaining() + 0.05)
        response, _ = yield self.post(gateway, bogus)
        self.assertEqual(response.code, 404)
        self.assertEqual(breaker.state, "half_open")
        response, _ = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 200)
        self.assertEqual(breaker.state, "closed")

    @inlineCallbacks
    def test_4xx_whose_body_never_comes_keeps_its_meaning(self):
        """
        A 429 or a 401 whose error body is cut or stalls is read by its
        status and Retry-After, which came whole: the 429 fails over (and,
        pinned, is a 429 with the provider's Retry-After), the 401 is the
        gateway's key refused; it was a 502 upstream_unreachable or a 504.
        """
        pinned = {"model": "kimi/moonshot-v1-8k", "messages": HELLO}
        for mode in ("error_cut", "error_stall"):
            for stream in (False, True):
                for status, body, expected in (
                    (429, {"messages": HELLO}, 200),
                    (429, pinned, 429),
                    (401, pinned, 502),
                    (404, pinned, 404),
                ):
                    gateway = self.gateway(default_provider="kimi", upstream_timeout=1.0)
                    kimi = self.behaviour("kimi")
                    kimi.mode, kimi.error_status = mode, status
                    kimi.error_headers = {"Retry-After": "7"} if status == 429 else {}
                    response, text = yield self.post(gateway, {**body, "stream": stream})
                    self.assertEqual(response.code, expected, (mode, stream, status, text))
                    if expected == 200:
                        self.assertEqual(
                            response.headers.getRawHeaders("x-openclaw-fallback"),
                            ["kimi->gemini; reason=rate_limited"],
                        )
                    elif status == 429:
                        error = self.assertOpenAIError(text, "rate_limit_exceeded")
                        self.assertIn("its error body did not come whole", error["message"])
                        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["7"])
                    elif status == 404:
                        # A body not read is not known to be a web server's
                        # page: no word of the base URL (review s32).
                        error = self.assertOpenAIError(text, "model_not_found")
                        self.assertIn("its error body did not come whole", error["message"])
                        self.assertNotIn("BASE_URL", error["message"])
                    else:
                        self.assertOpenAIError(text, "upstream_auth_failed")

    @inlineCallbacks
    def test_client_leaves_while_error_body_read(self):
        gateway = self.trial_gateway()
        yield self.open_breaker(gateway)
        kimi = self.behaviour("kimi")
        kimi.mode = "error_stall"
        kimi.reset()
        call = self.post(gateway, {"messages": HELLO})
        while not kimi.requests:
            yield deferLater(reactor, 0.01)
        # Long enough for the gateway to have the 503's headers.
        yield deferLater(reactor, 0.2)
        call.cancel()
        yield self.assertFailure(call, CancelledError, ResponseNeverReceived)
        yield gateway.service.api_site.context.idle()
        # No verdict: the trial is free for the next call, sent at once.
        breaker = gateway.service.providers.get("kimi").breaker
        self.assertEqual(breaker.state, "half_open")
        self.assertTrue(breaker.would_allow())
        yield self.check_served_again(gateway)


class FailoverFailsTests(ResilienceTestCase):
    """
    A call failed over whose fallback fails too: the client's error says
    both failures, the active provider's first, and carries
    C{X-OpenClaw-Fallback} as a successful failover's answer does.
    """

    def both_failing(self) -> None:
        for provider, key in (("kimi", KIMI_KEY), ("gemini", GEMINI_KEY)):
            behaviour = self.behaviour(provider)
            behaviour.mode, behaviour.error_status = "error", 500
            # A provider quoting its own key: scrubbed in both parts.
            behaviour.error_message = f"{provider} is down (key {key})"

    def check_both_told(self, response: Any, text: str, code: str, first: str, then: str) -> dict[str, Any]:
        self.assertEqual(response.code, 502, text)
        self.assertEqual(response.headers.getRawHeaders("x-openclaw-fallback"), ["gemini->kimi; reason=http_5xx"])
        self.assertEqual(response.headers.getRawHeaders("x-openclaw-provider"), ["kimi"])
        error = self.assertOpenAIError(text, code)
        message = error["message"]
        self.assertTrue(message.startswith(first), message)
        self.assertIn(f"; failed over to kimi: {then}", message)
        self.assertLess(message.index(first), message.index(then))
        for secret in (KIMI_KEY, GEMINI_KEY):
            self.assertNotIn(secret, text)
        return error

    @inlineCallbacks
    def test_whole_and_stream(self):
        gateway = self.gateway(default_provider="gemini")
        self.both_failing()
        for stream in (False, True):
            response, text = yield self.post(gateway, {"messages": HELLO, "stream": stream})
            self.check_both_told(
                response,
                text,
                "upstream_http_error",
                "gemini answered HTTP 500 Internal Server Error: gemini is down",
                "kimi answered HTTP 500 Internal Server Error: kimi is down",
            )
            # The fallback's own status, as when it alone failed.
            self.assertEqual(response.headers.getRawHeaders("x-openclaw-upstream-status"), ["500"])
        self.assertEqual((self.behaviour("gemini").requests, self.behaviour("kimi").requests), (2, 2))

    @inlineCallbacks
    def test_sdk_message(self):
        gateway = self.gateway(default_provider="gemini")
        self.both_failing()
        failure = yield self.assertFailure(
            deferToThread(self.sdk(gateway).chat.completions.create, model="gpt-4o", messages=HELLO),
            openai.InternalServerError,
        )
        self.assertEqual(failure.response.headers["x-openclaw-fallback"], "gemini->kimi; reason=http_5xx")
        self.assertIn("gemini answered HTTP 500", failure.message)
        self.assertIn("; failed over to kimi: kimi answered HTTP 500", failure.message)

    @inlineCallbacks
    def test_stream_fails_before_first_event(self):
        """
        Gemini's stream begins with an error event (a 503), Kimi's ends
        with no event at all: neither started the client's response.
        """
        gateway = self.gateway(default_provider="gemini")
        gemini, kimi = self.behaviour("gemini"), self.behaviour("kimi")
        gemini.mode, gemini.cut_after, gemini.error_status = "stream_error", 0, 503
        kimi.mode = "empty"
        response, text = yield self.post(gateway, {"messages": HELLO, "stream": True})
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.check_both_told(
            response,
            text,
            "upstream_stream_broken",
            "gemini answered HTTP 503 Service Unavailable",
            "kimi: the stream ended ([DONE]) without a single event",
        )

    @inlineCallbacks
    def test_fallback_refuses_the_request(self):
        """
        A fallback that refuses the request itself (a 400 for its smaller
        context, a 404 for a retired FALLBACK_MODEL) does not turn the
        active provider's passing failure into a request error the client
        would not retry: the answer is the active provider's failure (its
        status, code and Retry-After), telling the fallback's refusal
        after it.  A fallback's 429 or 5xx stands, as its own failure.
        """
        gateway = self.gateway(default_provider="gemini")
        gemini, kimi = self.behaviour("gemini"), self.behaviour("kimi")
        gemini.mode, gemini.error_status, gemini.error_headers = "error", 503, {"Retry-After": "2"}
        for status, message in ((400, "exceeded model token limit"), (404, "Not found the model")):
            kimi.mode, kimi.error_status, kimi.error_message = "error", status, message
            response, text = yield self.post(gateway, {"messages": HELLO})
            self.assertEqual(response.code, 502, text)
            self.assertEqual(response.headers.getRawHeaders("retry-after"), ["2"])
            self.assertEqual(response.headers.getRawHeaders("x-openclaw-upstream-status"), ["503"])
            self.assertEqual(response.headers.getRawHeaders("x-openclaw-fallback"), ["gemini->kimi; reason=http_5xx"])
            # The first provider's failure: its route, not the fallback's.
            self.assertEqual(response.headers.getRawHeaders("x-openclaw-provider"), ["gemini"])
            [line] = [e for e in self.events if e.get("status") == 502 and e.get("route")]
            self.assertTrue(str(line["route"]).startswith("gemini/"), line)
            self.events.clear()
            said = self.assertOpenAIError(text, "upstream_http_error")["message"]
            self.assertTrue(said.startswith("gemini answered HTTP 503"), said)
            self.assertIn(f"; failed over to kimi, which refused it: kimi refused the request: HTTP {status}", said)
        kimi.error_status, kimi.error_message = 429, None
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 429, text)


HI = [{"role": "user", "content": "hi"}]


class DocumentForStreamTests(ResilienceTestCase):
    """
    A stream asked for, a JSON document answered (trial s30: said to be a
    stream that "ended before the answer was complete").
    """

    @inlineCallbacks
    def test_said_and_failed_over(self) -> Any:
        gateway = self.gateway(default_provider="kimi", fallback="off")
        self.upstream.kimi.mode = "malformed"
        response, text = yield self.post(gateway, {"messages": HI, "stream": True})
        self.assertEqual(response.code, 502, text)
        message = self.assertOpenAIError(text, "upstream_malformed")["message"]
        self.assertEqual(
            message, "kimi: the provider answered a stream request with a JSON document, not an event stream"
        )
        gateway = self.gateway(default_provider="kimi", fallback="auto")
        response, text = yield self.post(gateway, {"messages": HI, "stream": True})
        self.assertEqual(response.code, 200, text)
        self.assertEqual(response.headers.getRawHeaders("x-openclaw-fallback"), ["kimi->gemini; reason=broken"])

    @inlineCallbacks
    def test_event_stream_called_json_streams(self) -> Any:
        """
        An event stream a provider (or a proxy) calls application/json is
        streamed as any other (review s30: it was read whole, then refused).
        """
        gateway = self.gateway(default_provider="kimi", fallback="off")
        self.upstream.kimi.stream_content_type = "application/json; charset=utf-8"
        response, text = yield self.post(gateway, {"messages": HI, "stream": True})
        self.assertEqual(response.code, 200, text)
        self.assertTrue(text.rstrip().endswith("data: [DONE]"), text)


class _EventStream(Resource):
    """
    A provider of one's own (twisted.web) whose every chat call is
    answered 200 with the server-sent events given, each as it is (a
    Gemini stream call with C{gemini}'s, any other with C{openai}'s),
    then the end of the body; a GET (a models listing) with an empty
    OpenAI list.
    """

    isLeaf = True

    def __init__(self, openai: list[bytes], gemini: list[bytes]) -> None:
        super().__init__()
        self.openai, self.gemini = openai, gemini

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return b'{"object": "list", "data": []}'

    def render_POST(self, request: Any) -> bytes:
        request.content.read()
        request.setHeader(b"content-type", b"text/event-stream")
        events = self.gemini if b"streamGenerateContent" in request.path else self.openai
        return b"".join(b"data: " + event + b"\n\n" for event in events)


def _openai_chunk(delta: dict[str, Any]) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": None}
    return json.dumps(
        {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}
    ).encode()


def _gemini_chunk(text: str) -> bytes:
    return json.dumps({"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}}]}).encode()


class UnreadableEventTests(ResilienceTestCase):
    """
    An event of a stream that cannot be read (not JSON, not an object,
    longer than the decoder takes) is a broken stream,
    C{upstream_stream_broken}, as README says; C{upstream_stream_error}
    is kept for an error the provider put in its stream (hostile trial
    s34: such events were coded C{upstream_stream_error}).
    """

    def gateway_before(self, openai: list[bytes], gemini: list[bytes]) -> Any:
        """
        A gateway whose Kimi and Gemini are one L{_EventStream}, no
        failover.
        """
        port = reactor.listenTCP(0, Site(_EventStream(openai, gemini)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = f"http://127.0.0.1:{port.getHost().port}"
        providers = provider_table(
            ProviderSettings(adapter=adapter, base_url=base, model=adapter.default_model_id, api_key=key)
            for adapter, key in ((KimiAdapter, KIMI_KEY), (GeminiAdapter, GEMINI_KEY))
        )
        return self.gateway(providers=providers, fallback="off")

    @inlineCallbacks
    def test_mid_answer(self):
        self.patch(sse, "MAX_EVENT_BYTES", 4096)
        hello_openai = _openai_chunk({"role": "assistant", "content": "Hello"})
        for unreadable in (b"{not json", b"[1, 2]", b"x" * 5000):
            gateway = self.gateway_before([hello_openai, unreadable], [_gemini_chunk("Hello"), unreadable])
            for model in ("kimi/moonshot-v1-8k", "gemini/gemini-flash-latest"):
                response, text = yield self.post(gateway, {"model": model, "messages": HELLO, "stream": True})
                self.assertEqual(response.code, 200, text)
                events = [e for e in text.split("\n\n") if e]
                self.assertEqual(json.loads(events[0][len("data: ") :])["choices"][0]["delta"]["content"], "Hello")
                self.assertNotIn("[DONE]", text)
                self.assertOpenAIError(events[-1][len("data: ") :], "upstream_stream_broken")

    @inlineCallbacks
    def test_before_the_answer(self):
        """
        Before anything reached the client: a 502 of the same code.
        """
        gateway = self.gateway_before([b"{not json"], [b"{not json"])
        for model in ("kimi/moonshot-v1-8k", "gemini/gemini-flash-latest"):
            response, text = yield self.post(gateway, {"model": model, "messages": HELLO, "stream": True})
            self.assertEqual(response.code, 502, text)
            error = self.assertOpenAIError(text, "upstream_stream_broken")
            self.assertIn("an event of the stream is not JSON", error["message"])


class EveryBreakerOpenTests(SynchronousTestCase):
    def test_two_fallbacks(self) -> None:
        """
        Each provider named with its wait, soonest first, in grammar for
        one fallback or more; Retry-After the soonest.
        """
        from openclaw.dataplane.errors import every_breaker_open

        error = every_breaker_open("kimi", 20.5, [("gemini", 4.2), ("acme", 9)])
        self.assertEqual((error.status, error.code, error.retry_after), (503, "provider_unavailable", 5))
        self.assertIn(
            "kimi has been failing, and so have gemini and acme, where the call would fail over", error.message
        )
        self.assertIn(
            "(BREAKER_COOLDOWN_SECONDS: gemini in 5 s, acme in 9 s, kimi in 21 s); retry in 5 s", error.message
        )
        self.assertIn("and so has gemini,", every_breaker_open("kimi", 1, [("gemini", 2)]).message)
