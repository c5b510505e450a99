"""
Provider adapters and registry against the stand-in upstream, over real
sockets on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import socket
import time
from typing import Any

from OpenSSL import SSL
from twisted.internet import error as neterror
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import ResponseNeverReceived

from openclaw.providers import (
    MissingKey,
    ProbeTimedOut,
    ProviderRegistry,
    UnknownProvider,
)
from openclaw.providers.errors import REDACTED, Scrubber, describe_failure
from openclaw.providers.fetch import ProviderURL, upstream_message
from openclaw.providers.gemini.adapter import MAX_CACHED_URLS
from openclaw.providers.keys import KeyPool, fingerprint, rest_scope, rest_subject
from openclaw.settings import Settings
from tests.support import KIMI_AND_GEMINI, changed_providers, start_upstream

KIMI_KEY = "sk-kimi-SECRET-0123456789abcdef"
GEMINI_KEY = "AIza-gemini-SECRET-0123456789abcdef"

#: Generous next to the stand-in's answers (milliseconds), short enough
#: that a broken time limit fails the test quickly.
TIMEOUT = 2.0


class ProviderTestCase(TestCase):
    """
    A stand-in upstream on a free port, and helpers to point a registry at it.
    """

    def setUp(self) -> None:
        self.upstream = start_upstream(self, KIMI_KEY, GEMINI_KEY)

    def registry(self, **overrides: Any) -> ProviderRegistry:
        """
        A registry of Kimi and Gemini (L{KIMI_AND_GEMINI}) pointed at the stand-in;
        C{overrides} are settings, or changes to a provider's settings under
        its id (C{kimi={"api_key": None}}).
        """
        settings = self.upstream.provider_settings()
        changes = {key: overrides.pop(key) for key in list(overrides) if key in settings}
        fields: dict[str, Any] = {
            "providers": changed_providers(settings, **changes),
            "health_check_timeout": TIMEOUT,
            **overrides,
        }
        registry = ProviderRegistry.from_settings(Settings(**fields), reactor)
        self.addCleanup(registry.close)
        return registry

    def assertFailedEntry(self, entry: dict[str, Any], *fragments: str) -> None:
        self.assertIs(entry["ok"], False)
        self.assertIsNone(entry["models"])
        self.assertIsNone(entry["active_model_available"])
        for fragment in fragments:
            self.assertIn(fragment, entry["error"])


def free_port() -> int:
    """
    A port nothing listens on (bound, then released).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HealthyTests(ProviderTestCase):
    @inlineCallbacks
    def test_both_healthy(self) -> Any:
        """
        One listing request per provider; every field of the report filled.
        """
        result = yield self.registry().health_check("gemini", "gemini-2.5-flash")
        self.assertEqual(result["active"], "gemini")
        self.assertRegex(result["checked_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertEqual(set(result["providers"]), {p.id for p in KIMI_AND_GEMINI})
        for entry in result["providers"].values():
            self.assertEqual(
                set(entry), {"ok", "latency_ms", "status", "models", "active_model_available", "breaker", "keys"}
            )
            self.assertEqual(entry["breaker"], "closed")
            self.assertIs(entry["ok"], True)
            self.assertIsInstance(entry["latency_ms"], float)
            self.assertEqual(entry["status"], 200)
            self.assertEqual(entry["models"], 4)
            self.assertIs(entry["active_model_available"], True)
        self.assertEqual((self.upstream.kimi.requests, self.upstream.gemini.requests), (1, 1))
        json.dumps(result)

    @inlineCallbacks
    def test_active_model_available(self) -> Any:
        """
        The active provider is checked for the active model, the other one
        for its own default model; Gemini's "models/" prefix is ignored.
        """
        registry = self.registry(gemini={"model": "gemini-9-ultra"})
        result = yield registry.health_check("kimi", "no-such-model")
        self.assertIs(result["providers"]["kimi"]["active_model_available"], False)
        self.assertIs(result["providers"]["gemini"]["active_model_available"], False)

        result = yield registry.health_check("gemini", "models/gemini-2.5-pro")
        self.assertIs(result["providers"]["gemini"]["active_model_available"], True)
        self.assertIs(result["providers"]["kimi"]["active_model_available"], True)

    @inlineCallbacks
    def test_gemini_pagination(self) -> Any:
        """
        Pages are followed through nextPageToken until the last one.
        """
        self.upstream.gemini.models = [f"gemini-model-{i}" for i in range(5)]
        self.upstream.gemini.page_size_limit = 2
        registry = self.registry()
        result = yield registry.health_check("gemini", "gemini-model-4")
        gemini = result["providers"]["gemini"]
        self.assertEqual((gemini["ok"], gemini["models"]), (True, 5))
        self.assertIs(gemini["active_model_available"], True)
        self.assertEqual(self.upstream.gemini.requests, 3)
        self.assertNotIn("pageToken", self.upstream.gemini.uris[0])
        self.assertIn("pageToken=", self.upstream.gemini.uris[1])
        self.assertIn("pageSize=1000", self.upstream.gemini.uris[0])

        ids = yield registry.get("gemini").list_models()
        self.assertEqual(ids, self.upstream.gemini.models)

    @inlineCallbacks
    def test_list_models(self) -> Any:
        """
        Model ids as a client would name them: no "models/" prefix.
        """
        registry = self.registry()
        kimi, gemini = yield gatherResults([registry.get("kimi").list_models(), registry.get("gemini").list_models()])
        self.assertEqual(kimi, self.upstream.kimi.models)
        self.assertEqual(gemini, self.upstream.gemini.models)

    @inlineCallbacks
    def test_ipv6_base_url(self) -> Any:
        """
        A base URL whose host is an IPv6 address (C{http://[::1]:port/...})
        is listed and probed as any other: hyperlink, under treq, cannot
        make such a URL a URI (python-hyper/hyperlink#188).
        """
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            raise SkipTest("this host has no IPv6 loopback address") from None
        upstream = start_upstream(self, KIMI_KEY, GEMINI_KEY, interface="::1")
        settings = upstream.provider_settings()
        self.assertTrue(settings["kimi"].base_url.startswith("http://[::1]:"), settings["kimi"].base_url)
        registry = ProviderRegistry.from_settings(Settings(providers=settings, health_check_timeout=TIMEOUT), reactor)
        self.addCleanup(registry.close)
        result = yield registry.health_check("gemini", "gemini-2.5-flash")
        for entry in result["providers"].values():
            self.assertEqual((entry["ok"], entry["status"], entry["models"]), (True, 200, 4), entry)
        ids = yield registry.get("gemini").list_models()
        self.assertEqual(ids, upstream.gemini.models)


class ProviderURLTests(SynchronousTestCase):
    def test_hosts_left_as_they_are(self) -> None:
        """
        An address host, and an ASCII name IDNA refuses (a container's name
        with '_'), are left as they are on the way to treq, which made
        every listing of such a base URL fail locally (hyperlink's IDNA:
        python-hyper/hyperlink#188); an international name is
        IDNA-encoded; the path and query are encoded as hyperlink does.
        """
        for given, sent in (
            ("http://kimi_proxy:8000/v1/models?a=b c", "http://kimi_proxy:8000/v1/models?a=b%20c"),
            ("http://[::1]:8000/v1/models", "http://[::1]:8000/v1/models"),
            ("http://127.0.0.1:8000/v1/m\u00e9", "http://127.0.0.1:8000/v1/m%C3%A9"),
            ("http://m\u00fcnchen.example/v1", "http://xn--mnchen-3ya.example/v1"),
        ):
            self.assertEqual(ProviderURL.from_text(given).to_uri().to_text(), sent)


class UnnameableIdsTests(ProviderTestCase):
    @inlineCallbacks
    def test_left_out(self) -> Any:
        """
        An id the API would refuse as a model name (a line break, U+2028,
        over 256 characters) is left out of a listing: no client could
        call it, and it would go into answers and logs.
        """
        good = ["moonshot-v1-8k", "kimi-k2.5"]
        self.upstream.kimi.models = [*good, "evil\r\nX-Injected: 1", "a\u2028b", "m" * 5000]
        registry = self.registry()
        ids = yield registry.get("kimi").list_models()
        self.assertEqual(ids, good)


class FailureTests(ProviderTestCase):
    @inlineCallbacks
    def test_unauthorized(self) -> Any:
        """
        A rejected key: the status, the provider's own message and what to
        check.
        """
        registry = self.registry(kimi={"api_key": "sk-wrong"}, gemini={"api_key": "AIza-wrong"})
        result = yield registry.health_check("kimi", "moonshot-v1-8k")
        kimi, gemini = result["providers"]["kimi"], result["providers"]["gemini"]
        self.assertFailedEntry(kimi, "HTTP 401", "Invalid Authentication", "KIMI_API_KEY")
        self.assertEqual(kimi["status"], 401)
        self.assertIsInstance(kimi["latency_ms"], float)
        self.assertFailedEntry(gemini, "HTTP 401", "API key not valid", "GEMINI_API_KEY")

    @inlineCallbacks
    def test_forbidden(self) -> Any:
        """
        403 carries the message; Gemini's quotes the key, which is scrubbed.
        """
        self.upstream.kimi.mode = "forbidden"
        self.upstream.gemini.mode = "forbidden"
        result = yield self.registry().health_check("kimi", "moonshot-v1-8k")
        kimi, gemini = result["providers"]["kimi"], result["providers"]["gemini"]
        self.assertFailedEntry(kimi, "HTTP 403", "suspended", "KIMI_API_KEY")
        self.assertFailedEntry(gemini, "HTTP 403", "PERMISSION_DENIED", REDACTED)
        self.assertEqual(gemini["status"], 403)
        self.assertNotIn(GEMINI_KEY, gemini["error"])

    @inlineCallbacks
    def test_server_error(self) -> Any:
        """
        5xx: the status and message, long messages cut short.
        """
        self.upstream.kimi.mode = "error"
        self.upstream.kimi.error_status = 503
        self.upstream.gemini.mode = "error"
        self.upstream.gemini.error_message = "x" * 5000
        result = yield self.registry().health_check("kimi", "moonshot-v1-8k")
        kimi, gemini = result["providers"]["kimi"], result["providers"]["gemini"]
        self.assertFailedEntry(kimi, "HTTP 503", "overloaded", "try again later")
        self.assertEqual(kimi["status"], 503)
        self.assertFailedEntry(gemini, "HTTP 500", "…")
        self.assertLess(len(gemini["error"]), 300)

    @inlineCallbacks
    def test_malformed_body(self) -> Any:
        """
        A 2xx body that is not JSON.
        """
        self.upstream.kimi.mode = "malformed"
        self.upstream.gemini.mode = "malformed"
        result = yield self.registry().health_check("kimi", "moonshot-v1-8k")
        for entry in result["providers"].values():
            self.assertFailedEntry(entry, "malformed JSON in models listing")
            self.assertEqual(entry["status"], 200)

    @inlineCallbacks
    def test_missing_key(self) -> Any:
        """
        No key: said so, and no request made.
        """
        registry = self.registry(kimi={"api_key": None})
        self.assertEqual(registry.get("kimi").missing_key_warning(), "KIMI_API_KEY is not set")
        self.assertIsNone(registry.get("gemini").missing_key_warning())
        result = yield registry.health_check("gemini", "gemini-2.5-flash")
        self.assertEqual(
            result["providers"]["kimi"],
            {
                "ok": False,
                "latency_ms": None,
                "status": None,
                "models": None,
                "active_model_available": None,
                "error": "KIMI_API_KEY is not set",
                "breaker": "closed",
                "keys": {},
                "configured": False,
            },
        )
        self.assertIs(result["providers"]["gemini"]["ok"], True)
        self.assertEqual(self.upstream.kimi.requests, 0)

        failure = yield self.assertFailure(registry.get("kimi").list_models(), MissingKey)
        self.assertEqual(str(failure), "KIMI_API_KEY is not set")
        self.assertEqual(self.upstream.kimi.requests, 0)

        registry = self.registry(gemini={"api_key": None})
        self.upstream.gemini.reset()
        result = yield registry.health_check("kimi", "moonshot-v1-8k")
        self.assertEqual(result["providers"]["gemini"]["error"], "GEMINI_API_KEY is not set")
        self.assertEqual(self.upstream.gemini.requests, 0)

    @inlineCallbacks
    def test_connection_refused(self) -> Any:
        port = free_port()
        registry = self.registry(
            kimi={"base_url": f"http://127.0.0.1:{port}/v1"},
            gemini={"base_url": f"http://127.0.0.1:{port}/v1beta"},
        )
        result = yield registry.health_check("kimi", "moonshot-v1-8k")
        for entry in result["providers"].values():
            self.assertFailedEntry(entry, f"connection refused by 127.0.0.1:{port}")
            self.assertIsNone(entry["status"])
            self.assertIsNone(entry["latency_ms"])
        self.assertIn("KIMI_BASE_URL", result["providers"]["kimi"]["error"])

    def test_reasons(self) -> None:
        """
        DNS and TLS failures (not reproducible offline) are worded too.
        """
        dns = describe_failure(Failure(neterror.DNSLookupError("no results")), "api.example", 443, "KIMI_BASE_URL")
        self.assertEqual(dns, "DNS lookup failed for api.example; check KIMI_BASE_URL and this host's resolver")
        tls = Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))
        text = describe_failure(Failure(ResponseNeverReceived([tls])), "api.example", 443, "GEMINI_BASE_URL")
        self.assertEqual(
            text,
            "TLS handshake with api.example:443 failed (certificate verify failed); the certificate is not signed by "
            "an authority the gateway trusts (or is expired): for a provider behind a private CA or a "
            "TLS-inspecting proxy, set UPSTREAM_CA_FILE to that CA's PEM file; else check GEMINI_BASE_URL",
        )
        # An IPv6 base URL's host in brackets, as in the URL: "::1:8000" read as an address.
        refused = describe_failure(Failure(neterror.ConnectionRefusedError()), "::1", 8000, "KIMI_BASE_URL")
        self.assertEqual(refused, "connection refused by [::1]:8000; is KIMI_BASE_URL right and the service up?")

    def test_scrub(self) -> None:
        """
        Real keys go wherever they appear; a toy key only as a whole token,
        so that "k" does not eat every k in a message.
        """
        self.assertEqual(Scrubber((KIMI_KEY,)).text(f"key={KIMI_KEY}&x"), f"key={REDACTED}&x")
        self.assertEqual(Scrubber((KIMI_KEY,)).text(f"x{KIMI_KEY}y"), f"x{REDACTED}y")
        self.assertEqual(
            Scrubber(("k",)).text("Consumer 'api_key:k' suspended; check KIMI_API_KEY"),
            f"Consumer 'api_key:{REDACTED}' suspended; check KIMI_API_KEY",
        )
        self.assertEqual(Scrubber(()).text("text"), "text")

    def test_upstream_message(self) -> None:
        """
        Both providers' error shapes, then raw text.
        """
        self.assertEqual(
            upstream_message(b'{"error": {"message": "Invalid Authentication", "type": "x"}}'),
            "Invalid Authentication [type=x]",
        )
        self.assertEqual(
            upstream_message(
                b'{"error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT"}}'
            ),
            "API key not valid. [status=INVALID_ARGUMENT, code=400]",
        )
        self.assertEqual(upstream_message(b"<html>Bad Gateway</html>"), "<html>Bad Gateway</html>")
        self.assertEqual(upstream_message(b""), "(empty body)")
        # A kind field of any length is clipped (review s34: 100,000
        # characters of "type" went whole into the message and the log).
        long = upstream_message(json.dumps({"error": {"message": "m", "type": "t" * 100_000}}).encode())
        self.assertLess(len(long), 80)
        self.assertTrue(long.startswith("m [type=ttt"), long)

    def test_chat_urls(self) -> None:
        registry = self.registry()
        gemini, kimi = registry.get("gemini"), registry.get("kimi")
        base = gemini.base_url.encode()
        self.assertEqual(
            gemini.chat_url("models/gemini-flash-latest", False), base + b"/models/gemini-flash-latest:generateContent"
        )
        self.assertEqual(
            gemini.chat_url("tuned/a b?", True), base + b"/models/tuned%2Fa%20b%3F:streamGenerateContent?alt=sse"
        )
        # Remembered, within a bound: any model name may be asked for.
        self.assertIs(gemini.chat_url("tuned/a b?", True), gemini.chat_url("tuned/a b?", True))
        for i in range(200):
            self.assertTrue(gemini.chat_url(f"m{i}", False).endswith(b"/models/m%d:generateContent" % i))
        self.assertLessEqual(len(gemini._chat_urls), MAX_CACHED_URLS)
        self.assertEqual(kimi.chat_url("moonshot-v1-8k", True), kimi.base_url.encode() + b"/chat/completions")

    def test_registry_lookup(self) -> None:
        registry = self.registry()
        self.assertEqual(registry.ids, tuple(p.id for p in KIMI_AND_GEMINI))
        self.assertEqual(registry.get("kimi").display_name, "Kimi (Moonshot AI)")
        self.assertEqual(registry.get("gemini").display_name, "Google Gemini")
        self.assertEqual(registry.get("gemini").default_model, "gemini-flash-latest")
        self.assertRaises(UnknownProvider, registry.get, "openai")
        self.assertRaises(UnknownProvider, registry.health_check, "openai", "gpt")


class TimeLimitTests(ProviderTestCase):
    @inlineCallbacks
    def check_bounded(self, mode: str, waiting_for: str) -> Any:
        self.upstream.kimi.mode = mode
        registry = self.registry(health_check_timeout=0.5)
        started = time.monotonic()
        result = yield registry.health_check("kimi", "moonshot-v1-8k")
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.45)
        self.assertLess(elapsed, 1.5)
        self.assertFailedEntry(result["providers"]["kimi"], "timed out after 0.5 s", waiting_for)
        self.assertIs(result["providers"]["gemini"]["ok"], True)
        return result

    @inlineCallbacks
    def test_hang_before_headers(self) -> Any:
        result = yield self.check_bounded("hang", "waiting for the response")
        self.assertIsNone(result["providers"]["kimi"]["status"])

    @inlineCallbacks
    def test_stall_mid_body(self) -> Any:
        """
        The time limit covers the body too, not just the headers.
        """
        result = yield self.check_bounded("stall", "models listing body")
        self.assertEqual(result["providers"]["kimi"]["status"], 200)

    @inlineCallbacks
    def test_list_models_bounded(self) -> Any:
        self.upstream.gemini.mode = "stall"
        registry = self.registry(health_check_timeout=0.5)
        yield self.assertFailure(registry.get("gemini").list_models(), ProbeTimedOut)

    @inlineCallbacks
    def test_concurrent(self) -> Any:
        """
        Providers are probed at once: two hung probes take one timeout.
        """
        self.upstream.kimi.mode = "hang"
        self.upstream.gemini.mode = "hang"
        registry = self.registry(health_check_timeout=1.5)
        started = time.monotonic()
        result = yield registry.health_check("kimi", "moonshot-v1-8k")
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 1.45)
        self.assertLess(elapsed, 2.5)
        for entry in result["providers"].values():
            self.assertFailedEntry(entry, "timed out after 1.5 s")

    @inlineCallbacks
    def test_close_cancels_probes(self) -> Any:
        """
        Closing the registry (service stopping) ends probes under way at
        once instead of leaving them to their time limit.
        """
        self.upstream.kimi.mode = "hang"
        registry = self.registry()
        started = time.monotonic()
        checking = registry.health_check("kimi", "moonshot-v1-8k")
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.upstream.kimi.requests, 1)
        yield registry.close()
        result = yield checking
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertFailedEntry(result["providers"]["kimi"], "cancelled")

    @inlineCallbacks
    def close_quietly(self, wait: bool) -> Any:
        """
        Close the registry with a probe and a key check of Kimi's under
        way; the log events the close and their ends emit.
        """
        self.upstream.kimi.mode = "hang"
        registry = self.registry()
        checking = registry.health_check("kimi", "moonshot-v1-8k")
        registry.get("kimi").check_key(KIMI_KEY)
        if wait:
            yield deferLater(reactor, 0.05, lambda: None)
            self.assertEqual(self.upstream.kimi.requests, 2)
        with capturedLogs() as events:
            yield registry.close()
            result = yield checking
        self.assertFailedEntry(result["providers"]["kimi"], "cancelled")
        return [formatEvent(event) for event in events]

    @inlineCallbacks
    def test_close_logs_no_failure(self) -> Any:
        """
        A stop is no news about a provider: the probes and key checks it
        cancels, waiting for their answers or still connecting, are
        logged neither as failed nor as checked.
        """
        for wait in (True, False):
            logged = yield self.close_quietly(wait)
            self.assertEqual(
                [line for line in logged if "probe failed" in line or "checked after a 403" in line], [], wait
            )

    @inlineCallbacks
    def test_delay_within_limit(self) -> Any:
        self.upstream.kimi.delay = 0.05
        self.upstream.gemini.delay = 0.05
        result = yield self.registry().health_check("kimi", "moonshot-v1-8k")
        for entry in result["providers"].values():
            self.assertIs(entry["ok"], True)
            self.assertGreaterEqual(entry["latency_ms"], 45)


class CoalescingTests(ProviderTestCase):
    def burst(self, registry: ProviderRegistry, count: int = 100) -> Any:
        self.upstream.kimi.delay = 0.05
        self.upstream.gemini.delay = 0.05
        return gatherResults([registry.health_check("kimi", "moonshot-v1-8k") for _ in range(count)])

    @inlineCallbacks
    def test_coalesced(self) -> Any:
        """
        100 simultaneous checks: one upstream request per provider, and every
        caller gets the full report.
        """
        registry = self.registry()
        results = yield self.burst(registry)
        self.assertEqual((self.upstream.kimi.requests, self.upstream.gemini.requests), (1, 1))
        self.assertEqual(len(results), 100)
        self.assertEqual(len({json.dumps(r["providers"], sort_keys=True) for r in results}), 1)
        self.assertIs(results[-1]["providers"]["gemini"]["ok"], True)

        # Once settled, the next check probes afresh.
        yield registry.health_check("gemini", "gemini-2.5-flash")
        self.assertEqual((self.upstream.kimi.requests, self.upstream.gemini.requests), (2, 2))

    @inlineCallbacks
    def test_cancelled_caller(self) -> Any:
        """
        One caller giving up does not cancel the probe the others share.
        """
        self.upstream.kimi.delay = 0.05
        registry = self.registry()
        first = registry.probe("kimi")
        second = registry.probe("kimi")
        first.cancel()
        self.failureResultOf(first)
        result = yield second
        self.assertIs(result.ok, True)
        self.assertEqual(self.upstream.kimi.requests, 1)


class KeyHygieneTests(ProviderTestCase):
    @inlineCallbacks
    def test_keys_never_leak(self) -> Any:
        """
        Keys travel only in headers: never in URLs, results or log events,
        whatever the outcome.
        """
        secrets = (KIMI_KEY, GEMINI_KEY)
        with capturedLogs() as events:
            results = []
            for kimi_mode, gemini_mode in [
                ("ok", "ok"),
                ("unauthorized", "forbidden"),
                ("error", "malformed"),
                ("stall", "hang"),
            ]:
                self.upstream.kimi.mode = kimi_mode
                self.upstream.gemini.mode = gemini_mode
                registry = self.registry(health_check_timeout=0.3)
                results.append((yield registry.health_check("gemini", "gemini-2.5-flash")))
                results.append(repr(registry.get("kimi")))
                results.append(repr(registry.get("gemini")))
        self.assertTrue(events)
        dumped = json.dumps(results) + "".join(repr(event) + (formatEvent(event) or "") for event in events)
        uris = "".join(self.upstream.kimi.uris + self.upstream.gemini.uris)
        for secret in secrets:
            self.assertNotIn(secret, dumped)
            self.assertNotIn(secret, uris)
        self.assertTrue(re.search(r"HTTP 403", dumped))


class KeyRestTests(ProviderTestCase):
    def test_rests_told_from_construction(self) -> None:
        """
        C{on_rest} given to L{ProviderRegistry.from_settings} is told of
        every key rest of every provider (a cluster shares them), from the
        moment the registry is built.
        """
        told: list[tuple[str, str, float, str | None]] = []
        registry = ProviderRegistry.from_settings(
            Settings(providers=self.upstream.provider_settings()),
            reactor,
            on_rest=lambda provider, key, seconds, model: told.append((provider, key, seconds, model)),
        )
        self.addCleanup(registry.close)
        for adapter in registry:
            adapter.keys.rest(adapter.keys.keys[0], 7.0)
        self.assertEqual(told, [(adapter.id, fingerprint(adapter.keys.keys[0]), 7.0, None) for adapter in registry])
        self.assertEqual([adapter.id for adapter in registry], ["kimi", "gemini"])

    def test_gemini_rests_by_model(self) -> None:
        """
        Google limits each model apart: a Gemini key answered 429 for one
        model rests for that model only (its other models, embeddings
        included, still take calls: agent trial s42, where a 429 on a Pro
        model kept every Gemini model from every client for the wait),
        and the rest is told with its model (a cluster shares it so, and
        takes it back by model).  Moonshot's limits are its account's: a
        Kimi key rests for every model.
        """
        registry = self.registry()
        self.assertEqual([adapter.keys.rests_by_model for adapter in registry], [False, True])
        clock = Clock()
        told: list[tuple[str, str, float, str | None]] = []
        key = GEMINI_KEY
        gemini = KeyPool((key,), clock.seconds, "gemini", True, on_rest=lambda *rest: told.append(rest))
        gemini.rest(key, 30.0, "gemini-2.5-pro")
        self.assertFalse(gemini.usable(key, "gemini-2.5-pro"))
        self.assertIsNone(gemini.pick((), "gemini-2.5-pro"))
        self.assertEqual(gemini.back_in("gemini-2.5-pro"), 30.0)
        self.assertEqual(gemini.unusable_reason("gemini-2.5-pro"), "rate_limited")
        self.assertEqual(gemini.available_for("gemini-2.5-pro"), 0)
        for model in ("gemini-2.5-flash", "gemini-embedding-001", None):
            self.assertTrue(gemini.usable(key, model))
            self.assertEqual(gemini.pick((), model), key)
            self.assertEqual(gemini.available_for(model), 1)
        self.assertEqual((gemini.available, gemini.back_in()), (1, None))
        self.assertEqual(gemini.states(), {fingerprint(key): "resting for gemini-2.5-pro"})
        self.assertEqual(told, [("gemini", fingerprint(key), 30.0, "gemini-2.5-pro")])
        # Shared from another instance: by model, as told.
        gemini.rest_shared(fingerprint(key), 60.0, "gemini-2.5-flash")
        self.assertFalse(gemini.usable(key, "gemini-2.5-flash"))
        self.assertTrue(gemini.usable(key, "gemini-2.0-flash"))
        clock.advance(31.0)
        self.assertTrue(gemini.usable(key, "gemini-2.5-pro"))
        self.assertFalse(gemini.usable(key, "gemini-2.5-flash"))
        # A whole key's rest (a models listing's 429) holds every model.
        gemini.rest(key, 5.0)
        self.assertFalse(gemini.usable(key, "gemini-2.0-flash"))
        self.assertEqual(told[-1], ("gemini", fingerprint(key), 5.0, None))
        # One key resting whole (a models listing's 429), the other for
        # one model: the other models still have a key, and the message
        # names the model resting (review s44: said as if every model were).
        two = KeyPool(("key-a", "key-b"), clock.seconds, "gemini", True)
        two.rest("key-a", 60.0)
        two.rest("key-b", 30.0, "gemini-2.5-pro")
        self.assertIsNone(two.pick((), "gemini-2.5-pro"))
        self.assertEqual(two.pick((), "gemini-2.5-flash"), "key-b")
        self.assertEqual(two.resting_model("gemini-2.5-pro"), "gemini-2.5-pro")
        two.rest("key-b", 60.0)
        self.assertIsNone(two.resting_model("gemini-2.5-pro"))
        # Kimi: the whole key, told without a model.
        kimi = KeyPool((KIMI_KEY,), clock.seconds, "kimi", on_rest=lambda *rest: told.append(rest))
        kimi.rest(KIMI_KEY, 5.0, "kimi-k2.5")
        self.assertFalse(kimi.usable(KIMI_KEY, "moonshot-v1-8k"))
        self.assertEqual(told[-1], ("kimi", fingerprint(KIMI_KEY), 5.0, None))

    def test_rest_subjects(self) -> None:
        """
        A rest by model goes to the cluster as C{<provider>/<model>}, which
        the registry reads back; an instance of an earlier version takes it
        for a provider it does not have, and leaves it.
        """
        registry = self.registry()
        gemini = registry.get("gemini").keys
        self.assertEqual(rest_subject("gemini", "gemini-2.5-pro"), "gemini/gemini-2.5-pro")
        self.assertEqual(rest_scope(rest_subject("gemini", "a/b:c")), ("gemini", "a/b:c"))
        self.assertEqual(rest_scope("kimi"), ("kimi", None))
        registry.rest_key(rest_subject("gemini", "gemini-2.5-pro"), fingerprint(GEMINI_KEY), 60.0)
        self.assertFalse(gemini.usable(GEMINI_KEY, "gemini-2.5-pro"))
        self.assertTrue(gemini.usable(GEMINI_KEY, "gemini-2.5-flash"))
        registry.rest_key("gemini", fingerprint(GEMINI_KEY), 60.0)
        self.assertFalse(gemini.usable(GEMINI_KEY, "gemini-2.5-flash"))
