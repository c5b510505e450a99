"""
health_check as an operator sees it: over the control plane, against the
stand-in upstream, with the rest of the gateway still answering meanwhile.
"""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import treq
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from tests.support import (
    KIMI_AND_GEMINI,
    capture_log_events,
    changed_providers,
    open_client,
    start_gateway,
    start_upstream,
)
from tests.test_ctl import run_ctl
from tests.test_dataplane import GATEWAY_KEY, HELLO

KIMI_KEY = "sk-kimi-secret-0123456789"
GEMINI_KEY = "AIza-gemini-secret-0123456789"


class UpstreamTestCase(TestCase):
    """
    A stand-in upstream with both keys, and a gateway pointed at it.
    """

    timeout = 30

    def setUp(self) -> None:
        self.upstream = start_upstream(self, KIMI_KEY, GEMINI_KEY)
        self.events = capture_log_events(self)

    def gateway(self, **settings: Any) -> Any:
        return start_gateway(self, **{"providers": self.upstream.provider_settings(), **settings})


class HealthCheckTests(UpstreamTestCase):
    @inlineCallbacks
    def test_healthy(self):
        gateway = self.gateway()
        client = yield open_client(self, gateway.port)
        answer = yield client.command(gateway.token, "health_check")
        self.assertTrue(answer["ok"], answer)
        result = answer["result"]
        self.assertEqual(result["active"], "gemini")
        self.assertEqual(set(result["providers"]), {p.id for p in KIMI_AND_GEMINI})
        for entry in result["providers"].values():
            self.assertIs(entry["ok"], True)
            self.assertEqual(entry["status"], 200)
            self.assertGreater(entry["models"], 0)
            self.assertNotIn("error", entry)
        self.assertEqual((self.upstream.kimi.requests, self.upstream.gemini.requests), (1, 1))
        everything = json.dumps(answer) + repr(self.events)
        self.assertNotIn(KIMI_KEY, everything)
        self.assertNotIn(GEMINI_KEY, everything)
        audited = [e for e in self.events if e.get("cmd") == "health_check" and "duration_ms" in e]
        self.assertEqual(len(audited), 1)
        self.assertEqual(audited[0]["outcome"], "ok")

    @inlineCallbacks
    def test_missing_key_makes_no_request(self):
        gateway = self.gateway(providers=changed_providers(self.upstream.provider_settings(), kimi={"api_key": None}))
        client = yield open_client(self, gateway.port)
        answer = yield client.command(gateway.token, "health_check")
        kimi = answer["result"]["providers"]["kimi"]
        self.assertEqual(kimi["ok"], False)
        self.assertEqual(kimi["error"], "KIMI_API_KEY is not set")
        self.assertEqual(self.upstream.kimi.requests, 0)
        switched = yield client.command(gateway.token, "switch_provider", {"provider": "kimi"})
        self.assertEqual(switched["result"]["warning"], "KIMI_API_KEY is not set")
        self.assertEqual(switched["result"]["active"], "kimi")

    @inlineCallbacks
    def test_switch_to_a_provider_that_takes_no_calls(self):
        """
        Switching to a provider whose breaker is open, or whose every key
        rests or was refused, is made, and says its calls would not be sent
        (trial s25: no word of it).
        """
        gateway = self.gateway()
        client = yield open_client(self, gateway.port)
        kimi = gateway.service.providers.get("kimi")
        for _ in range(kimi.breaker.threshold):
            kimi.breaker.allow()
            kimi.breaker.failed()
        switched = yield client.command(gateway.token, "switch_provider", {"provider": "kimi"})
        self.assertEqual(switched["result"]["active"], "kimi")
        self.assertRegex(switched["result"]["warning"], r"kimi's circuit breaker is open for \d+ s more")
        gemini = gateway.service.providers.get("gemini")
        gemini.keys.rest(GEMINI_KEY, 30.0)
        switched = yield client.command(gateway.token, "switch_provider", {"provider": "gemini"})
        self.assertIn(
            "every key of GEMINI_API_KEY / GEMINI_API_KEYS rests after a 429 for 30 s more",
            switched["result"]["warning"],
        )
        gemini.keys.set_aside(GEMINI_KEY)
        switched = yield client.command(gateway.token, "switch_provider", {"provider": "gemini"})
        self.assertIn(
            "every key of GEMINI_API_KEY / GEMINI_API_KEYS was refused by gemini", switched["result"]["warning"]
        )

    @inlineCallbacks
    def test_hung_providers_bounded_and_concurrent(self):
        """
        Two providers that never answer, 1.5 s timeout: the answer comes
        after about 1.5 s (not 3 s), and a ping on another connection is
        answered at once meanwhile.
        """
        self.upstream.kimi.mode = "hang"
        self.upstream.gemini.mode = "stall"
        gateway = self.gateway(health_check_timeout=1.5)
        checker = yield open_client(self, gateway.port)
        bystander = yield open_client(self, gateway.port)
        started = time.monotonic()
        pending = checker.command(gateway.token, "health_check")
        pong = yield bystander.command(gateway.token, "ping")
        ping_took = time.monotonic() - started
        self.assertTrue(pong["ok"])
        self.assertFalse(pending.called)
        self.assertLess(ping_took, 0.5)
        answer = yield pending
        took = time.monotonic() - started
        self.assertGreaterEqual(took, 1.4)
        self.assertLess(took, 2.5)
        for entry in answer["result"]["providers"].values():
            self.assertIs(entry["ok"], False)
            self.assertIn("timed out after 1.5 s", entry["error"])

    @inlineCallbacks
    def test_hundred_concurrent_checks_share_one_probe(self):
        """
        100 health_check commands at once, from 10 connections, cause one
        upstream request per provider.
        """
        self.upstream.kimi.delay = self.upstream.gemini.delay = 0.05
        gateway = self.gateway()
        clients = yield gatherResults([open_client(self, gateway.port) for _ in range(10)])
        for client in clients:
            for _ in range(10):
                client.send({"token": gateway.token, "cmd": "health_check"})
        answers = yield gatherResults([client.received.get() for client in clients for _ in range(10)])
        self.assertEqual(len(answers), 100)
        self.assertTrue(all(a["ok"] and a["result"]["providers"]["kimi"]["ok"] for a in answers))
        self.assertEqual((self.upstream.kimi.requests, self.upstream.gemini.requests), (1, 1))


class UnlistedModelTests(UpstreamTestCase):
    """
    switch_provider to a model the provider's last listing does not name:
    switched all the same, with a warning that openclawctl prints.
    """

    @inlineCallbacks
    def test_warning(self):
        gateway = self.gateway()
        client = yield open_client(self, gateway.port)
        # No listing known yet: no warning, and none fetched for the switch.
        answer = yield client.command(
            gateway.token, "switch_provider", {"provider": "kimi", "model": "moonshot-v1-8kk"}
        )
        self.assertNotIn("warning", answer["result"])
        self.assertEqual(self.upstream.kimi.requests, 0)
        yield client.command(gateway.token, "health_check")
        answer = yield client.command(
            gateway.token, "switch_provider", {"provider": "kimi", "model": "moonshot-v1-8kk"}
        )
        self.assertTrue(answer["ok"], answer)
        warning = answer["result"]["warning"]
        self.assertIn("'moonshot-v1-8kk' is not among the 4 models kimi listed", warning)
        self.assertIn("did you mean moonshot-v1-8k", warning)
        # Switched all the same: the operator may know better.
        route = gateway.service.route.current
        self.assertEqual((route.provider_id, route.model), ("kimi", "moonshot-v1-8kk"))
        for provider, model in (
            ("kimi", "moonshot-v1-8k"),
            ("gemini", "gemini-2.5-pro"),
            ("gemini", "models/gemini-2.5-pro"),
        ):
            answer = yield client.command(gateway.token, "switch_provider", {"provider": provider, "model": model})
            self.assertNotIn("warning", answer["result"], (provider, model))
        # openclawctl shows it on stderr.
        url, token = f"ws://127.0.0.1:{gateway.port}", gateway.token
        out, err, code = yield run_ctl(
            "--url", url, "--token", token, "switch-provider", "kimi", "--model", "moonshot-v1-8kk"
        )
        self.assertEqual((out, code), ("gemini -> kimi (moonshot-v1-8kk)\n", 0))
        self.assertTrue(err.startswith("openclawctl: warning: model 'moonshot-v1-8kk' is not among"), err)
        out, err, code = yield run_ctl(
            "--url", url, "--token", token, "switch-provider", "kimi", "--model", "moonshot-v1-32k"
        )
        self.assertEqual((err, code), ("", 0))

    @inlineCallbacks
    def test_model_named_as_listed(self):
        """
        A Gemini model given with its "models/" prefix, to switch_provider
        or pinned in a call, is used under the name the provider lists, so
        that prices and consumers' model patterns see one name.
        """
        gateway = self.gateway(api=True, gateway_api_keys=(GATEWAY_KEY,))
        client = yield open_client(self, gateway.port)
        answer = yield client.command(
            gateway.token, "switch_provider", {"provider": "gemini", "model": "models/gemini-2.5-pro"}
        )
        self.assertEqual(answer["result"]["model"], "gemini-2.5-pro")
        route = gateway.service.route.current
        self.assertEqual((route.provider_id, route.model), ("gemini", "gemini-2.5-pro"))
        answer = yield client.command(gateway.token, "switch_provider", {"provider": "gemini", "model": "models/"})
        self.assertFalse(answer["ok"])
        sdk = openai.OpenAI(api_key=GATEWAY_KEY, base_url=f"http://127.0.0.1:{gateway.api_port}/v1", max_retries=0)
        raw = yield deferToThread(
            sdk.chat.completions.with_raw_response.create, model="gemini/models/gemini-2.5-flash", messages=HELLO
        )
        self.assertEqual(raw.headers["x-openclaw-model"], "gemini-2.5-flash")
        refused = yield self.assertFailure(
            deferToThread(sdk.chat.completions.create, model="gemini/models/", messages=HELLO),
            openai.BadRequestError,
        )
        self.assertIn("names no model", refused.message)

    @inlineCallbacks
    def test_models_listing_is_known_too(self):
        gateway = self.gateway()
        gemini = gateway.service.providers.get("gemini")
        # What GET /v1/models uses.
        yield gemini.list_models()
        client = yield open_client(self, gateway.port)
        answer = yield client.command(gateway.token, "switch_provider", {"provider": "gemini", "model": "gemini-9"})
        self.assertIn("'gemini-9' is not among the 4 models gemini listed", answer["result"]["warning"])


class ShutdownGraceTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_grace_runs_out(self):
        """
        A command still in flight when SHUTDOWN_GRACE_SECONDS runs out does
        not hold up the stop: every client is told 1001 and the stop
        completes.
        """
        upstream = start_upstream(self, KIMI_KEY, GEMINI_KEY)
        upstream.kimi.mode = upstream.gemini.mode = "hang"
        gateway = start_gateway(
            self, providers=upstream.provider_settings(), health_check_timeout=30, shutdown_grace_seconds=0.5
        )
        client = yield open_client(self, gateway.port)
        client.send({"token": gateway.token, "cmd": "health_check"})
        started = time.monotonic()
        yield gateway.service.stopService()
        self.assertLess(time.monotonic() - started, 3)
        code, _ = yield client.closed
        self.assertEqual(code, 1001)


class UpstreamMetricsTests(UpstreamTestCase):
    """
    /metrics on the API listener counts provider requests by status.
    """

    @inlineCallbacks
    def test_upstream_requests_counted(self):
        self.upstream.gemini.mode = "unauthorized"
        gateway = self.gateway(api=True)
        client = yield open_client(self, gateway.port)
        yield client.command(gateway.token, "health_check")
        text = yield treq_text(f"http://127.0.0.1:{gateway.api_port}/metrics")
        self.assertIn('openclaw_upstream_requests_total{provider="kimi",status="200"} 1.0', text)
        self.assertIn('openclaw_upstream_requests_total{provider="gemini",status="401"} 1.0', text)
        self.assertIn('openclaw_provider_up{provider="kimi"} 1.0', text)
        self.assertIn('openclaw_provider_up{provider="gemini"} 0.0', text)
        self.assertIn('openclaw_provider_health_check_ok{provider="kimi"} 1.0', text)
        self.assertIn('openclaw_provider_health_check_ok{provider="gemini"} 0.0', text)
        self.assertIn('openclaw_upstream_request_seconds_count{provider="kimi"} 1.0', text)


@inlineCallbacks
def treq_text(url: str) -> Any:
    pool = HTTPConnectionPool(reactor, persistent=False)
    response = yield treq.get(url, pool=pool)
    text = yield response.text()
    yield pool.closeCachedConnections()
    return text
