"""
A provider's C{Retry-After}: ASCII digits or an HTTP-date (RFC 9110
section 10.2.3), anything else no usable delay (the key rests for its
default time), and followed for an hour at most; end to end, an
unreadable one rests the key and the call goes on with the next key.
The gateway's own C{Retry-After} is a whole number from 1 to 30 days.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from openclaw.dataplane.errors import (
    MAX_SLEPT_RETRY_AFTER_SECONDS,
    SHOULD_RETRY_HEADER,
    APIError,
    breaker_open,
    no_usable_key,
    retry_after_seconds,
    sooner_elsewhere,
    upstream_refused,
)
from openclaw.providers.errors import MAX_RETRY_AFTER_SECONDS, Refusal, RefusalKind, classify, parse_retry_after
from openclaw.providers.keys import DEFAULT_REST_SECONDS
from openclaw.settings.values import MAX_DURATION_SECONDS
from tests.support import changed_providers, open_client
from tests.test_dataplane import HELLO, KIMI_KEY
from tests.test_resilience import ResilienceTestCase, consumers_loaded


class RetryAfterTests(TestCase):
    """
    A provider's C{Retry-After} that is neither ASCII digits nor an
    HTTP-date (RFC 9110 section 10.2.3) is no usable delay.
    """

    def test_unreadable(self) -> None:
        # As twisted.web decodes header bytes (latin-1): 0xB2 is "²", which
        # str.isdigit takes for a digit and float() refuses.
        for value in ("\xb2", "1\xb2", " ", "", "9" * 400, "Sun, 06 Nov 99" + "9" * 400 + " 08:49:37 GMT"):
            self.assertIsNone(parse_retry_after(value, 0.0), repr(value))
        refusal = classify(429, b'{"error": {"message": "slow down"}}', "\xb2", 0.0)
        # No usable delay: the key's default rest, told to the client too.
        self.assertEqual((refusal.kind, refusal.retry_after), (RefusalKind.RATE_LIMITED, DEFAULT_REST_SECONDS))
        self.assertEqual(classify(429, b"{}", None, 0.0).retry_after, DEFAULT_REST_SECONDS)
        self.assertIsNone(classify(503, b"{}", None, 0.0).retry_after)

    def test_bounded(self) -> None:
        """
        A provider's wait is followed for an hour at most, however far off
        its Retry-After (or the wait its error body states) puts it: one
        wrong header must not take a key out until a restart.
        """
        for value in ("99999999999999999999999", "Wed, 21 Oct 2099 07:28:00 GMT"):
            self.assertEqual(classify(429, b"{}", value, 1_800_000_000.0).retry_after, MAX_RETRY_AFTER_SECONDS)
        # As is the wait a provider's error body states (Gemini's
        # RetryInfo: tests.test_gemini_errors).
        self.assertEqual(classify(429, b"{}", None, 0.0, 86400.0).retry_after, MAX_RETRY_AFTER_SECONDS)
        self.assertEqual(classify(429, b"{}", "120", 0.0).retry_after, 120.0)

    def test_readable(self) -> None:
        self.assertEqual(parse_retry_after(" 7 ", 0.0), 7.0)
        self.assertEqual(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", 784111770.0), 7.0)


class WrittenRetryAfterTests(TestCase):
    """
    Every C{Retry-After} the gateway writes is a whole number of seconds,
    rounded up, from 1 to L{MAX_DURATION_SECONDS} (30 days), whatever the
    wait: a BREAKER_COOLDOWN_SECONDS of 1e308 was written out whole (309
    digits).
    """

    def test_bounded(self) -> None:
        for seconds, told in (
            (0.2, 1),
            (-5.0, 1),
            (float("-inf"), 1),
            (1.0, 1),
            (2.1, 3),
            (604800.0, 604800),
            (MAX_DURATION_SECONDS, 2592000),
        ):
            self.assertEqual(retry_after_seconds(seconds), told, seconds)
        self.assertEqual(retry_after_seconds(float("nan")), 2592000)
        for seconds in (MAX_DURATION_SECONDS + 0.5, 1e308, float("inf")):
            self.assertEqual(retry_after_seconds(seconds), 2592000, seconds)
            for error in (breaker_open("kimi", seconds), no_usable_key("kimi", "KIMI_API_KEY", seconds)):
                self.assertIn((b"Retry-After", b"2592000"), error.headers)
                self.assertIn(" 2592000 s", error.message)


class RetryAfterFieldTests(TestCase):
    """
    L{APIError.retry_after} is the one source of the C{Retry-After} an
    error is answered with (and of its C{x-should-retry: false} for a wait
    too long to sleep).
    """

    def test_header_written_from_the_field(self) -> None:
        error = APIError(503, "x", "server_error", "x", headers=((b"Allow", b"GET"),), retry_after=7)
        self.assertEqual(error.headers, ((b"Allow", b"GET"), (b"Retry-After", b"7")))
        long = APIError(429, "x", "rate_limit_error", "x", retry_after=MAX_SLEPT_RETRY_AFTER_SECONDS + 1)
        self.assertEqual(long.headers, ((b"Retry-After", b"61"), (SHOULD_RETRY_HEADER, b"false")))
        self.assertEqual(APIError(503, "x").headers, ())

    def test_evolved_once(self) -> None:
        """
        An error evolved keeps one C{Retry-After}, the new field's.
        """
        error = APIError(429, "x", "rate_limit_error", "x", retry_after=90)
        self.assertEqual(attrs.evolve(error, message="y").headers, error.headers)
        shorter = attrs.evolve(error, retry_after=5)
        self.assertEqual(shorter.headers, ((b"Retry-After", b"5"), (SHOULD_RETRY_HEADER, b"false")))

    def test_relayed_rate_limit_says_when(self) -> None:
        """
        A provider's 429 relayed says when to retry when the provider said
        (recheck s44: "retry later" beside a Retry-After of 1), else later.
        """
        told = upstream_refused("gemini", Refusal(429, "rate_limited", "quota", retry_after=1.2), "K", names_model=True)
        self.assertTrue(told.message.endswith("; retry in 2 s"), told.message)
        self.assertEqual(told.retry_after, 2)
        untold = upstream_refused("gemini", Refusal(429, "rate_limited", "quota"), "K", names_model=True)
        self.assertTrue(untold.message.endswith("; retry later"), untold.message)

    def test_header_alone_read(self) -> None:
        """
        A C{Retry-After} given in the headers alone (a provider plugin's):
        delay-seconds read into the field; anything else kept as it is,
        and no wait.
        """
        error = APIError(429, "x", headers=((b"retry-after", b"120"),))
        self.assertEqual(error.retry_after, 120)
        self.assertEqual(error.headers, ((b"Retry-After", b"120"), (SHOULD_RETRY_HEADER, b"false")))
        dated = APIError(503, "x", headers=((b"Retry-After", b"Wed, 21 Oct 2099 07:28:00 GMT"),))
        self.assertIsNone(dated.retry_after)
        self.assertEqual(dated.headers, ((b"Retry-After", b"Wed, 21 Oct 2099 07:28:00 GMT"),))

    def test_sooner_elsewhere(self) -> None:
        """
        A wait shortened for a fallback: one C{Retry-After}, the shorter,
        and no C{x-should-retry: false} left of the longer one.
        """
        error = breaker_open("kimi", 3600.0)
        self.assertEqual(error.retry_after, 3600)
        self.assertIn((SHOULD_RETRY_HEADER, b"false"), error.headers)
        sooner = sooner_elsewhere(error, "gemini", 4.5)
        self.assertEqual((sooner.retry_after, sooner.headers), (5, ((b"Retry-After", b"5"),)))
        self.assertIs(sooner_elsewhere(error, "gemini", 7200.0), error)
        unsaid = APIError(502, "x")
        self.assertIs(sooner_elsewhere(unsaid, "gemini", 1.0), unsaid)


class RetryAfterEndToEndTests(ResilienceTestCase):
    @inlineCallbacks
    def test_unreadable_retry_after_rests_the_key(self) -> Any:
        """
        A 429 whose Retry-After is unreadable rests the key for the default
        time and the call goes on with the next key.
        """
        second = "sk-kimi-SECOND-0123456789abcdef"
        kimi = self.behaviour("kimi")
        kimi.extra_keys = [second]
        kimi.rate_limited_keys = {KIMI_KEY}
        kimi.retry_after_header = b"\xb2"
        providers = changed_providers(self.upstream.provider_settings(), kimi={"api_keys": (second,)})
        gateway = self.gateway(providers=providers, default_provider="kimi", fallback="off")
        for _ in range(2):
            response, _ = yield self.post(gateway, {"messages": HELLO})
            self.assertEqual(response.code, 200)
        self.assertEqual(kimi.keys_seen, [KIMI_KEY, second, second])

    @inlineCallbacks
    def test_gemini_rests_by_model(self) -> Any:
        """
        A Gemini 429 for one model keeps the key from that model only:
        another client's call of another Gemini model, or of its
        embeddings, still goes (agent trial s42: a call of a model of small
        quota made every Gemini call and embedding a 429 for the wait,
        FALLBACK off, with no request reaching Google); a call of the
        model that was refused waits without being sent.
        """
        gemini = self.behaviour("gemini")
        gemini.rate_limited_keys, gemini.retry_after = {self.upstream.gemini.key}, 30
        gateway = self.gateway(default_provider="gemini", fallback="off")
        response, text = yield self.post(gateway, {"model": "gemini/gemini-2.5-pro", "messages": HELLO})
        self.assertEqual(response.code, 429, text)
        gemini.rate_limited_keys = set()
        sent = gemini.requests
        response, text = yield self.post(gateway, {"model": "gemini/gemini-2.5-flash", "messages": HELLO})
        self.assertEqual(response.code, 200, text)
        response, text = yield self.post(
            gateway, {"model": "gemini/gemini-embedding-001", "input": "hi"}, path="/v1/embeddings"
        )
        self.assertEqual(response.code, 200, text)
        self.assertEqual(gemini.requests, sent + 2)
        response, text = yield self.post(gateway, {"model": "gemini/gemini-2.5-pro", "messages": HELLO})
        self.assertEqual(response.code, 429, text)
        self.assertIn(response.headers.getRawHeaders("retry-after"), (["30"], ["29"]))
        self.assertEqual(gemini.requests, sent + 2)
        yield consumers_loaded(gateway)
        response, text = yield self.get(gateway, "/readyz")
        self.assertEqual(json.loads(text)["usable_keys"], 1, text)

    @inlineCallbacks
    def test_wait_after_a_failover_by_the_model_asked(self) -> Any:
        """
        After a failover, the first provider's wait is judged by the model
        the call asked of it, not by its FALLBACK_MODEL: a Gemini key rests
        by model (review s42: "gemini may take the call in 1 s" was told
        for gemini-2.5-pro resting 120 s, because gemini-2.5-flash, its
        fallback model, was free).
        """
        gemini, kimi = self.behaviour("gemini"), self.behaviour("kimi")
        gemini.rate_limited_models, gemini.retry_after = {"gemini-2.5-pro"}, 120
        kimi.rate_limited_keys, kimi.retry_after = {KIMI_KEY}, 120
        providers = changed_providers(
            self.upstream.provider_settings(),
            gemini={"model": "gemini-2.5-pro", "fallback_model": "gemini-2.5-flash"},
        )
        gateway = self.gateway(providers=providers, default_provider="gemini", fallback="auto")
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 429, text)
        self.assertEqual(response.headers.getRawHeaders("x-openclaw-fallback"), ["gemini->kimi; reason=rate_limited"])
        self.assertGreater(int(response.headers.getRawHeaders("retry-after")[0]), 100, text)
        self.assertNotIn("gemini may take the call in", text)
        # The fallback model itself is free.
        response, text = yield self.post(gateway, {"model": "gemini/gemini-2.5-flash", "messages": HELLO})
        self.assertEqual(response.code, 200, text)
        # A call pinned to the model that rests is told so by name.
        response, text = yield self.post(gateway, {"model": "gemini/gemini-2.5-pro", "messages": HELLO})
        self.assertEqual(response.code, 429, text)
        self.assertIn("rate limited for gemini-2.5-pro (its other models may take calls)", text)
        # Readiness and a switch to it judge the active model's keys.
        yield consumers_loaded(gateway)
        response, text = yield self.get(gateway, "/readyz")
        self.assertEqual(json.loads(text)["usable_keys"], 0, text)
        self.assertIn("GEMINI_API_KEYS is rate limited for gemini-2.5-pro (the active model", text)
        client = yield open_client(self, gateway.port)
        answer = yield client.command(
            gateway.token, "switch_provider", {"provider": "gemini", "model": "gemini-2.5-pro"}
        )
        self.assertTrue(answer["ok"], answer)
        self.assertIn("rests after a 429 of gemini-2.5-pro for 120 s more", answer["result"]["warning"])
        answer = yield client.command(
            gateway.token, "switch_provider", {"provider": "gemini", "model": "gemini-2.5-flash"}
        )
        self.assertNotIn("rests after a 429", answer["result"].get("warning", ""))

    @inlineCallbacks
    def test_wait_for_the_route(self) -> Any:
        """
        When neither the provider nor its fallback can take the call, the
        client is told to come back when the first of them can (trial
        s25: Gemini's spent quota, an hour, was told while Kimi was back
        in seconds, with x-should-retry: false); a call pinned to one
        provider is told that provider's wait.
        """
        gemini, kimi = self.behaviour("gemini"), self.behaviour("kimi")
        gemini.rate_limited_keys, gemini.retry_after = {self.upstream.gemini.key}, 3600
        kimi.rate_limited_keys, kimi.retry_after = {KIMI_KEY}, 5
        gateway = self.gateway(default_provider="gemini", fallback="auto")
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual((response.code, response.headers.getRawHeaders("retry-after")), (429, ["5"]), text)
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 429)
        self.assertIn(response.headers.getRawHeaders("retry-after"), (["5"], ["4"]))
        self.assertIsNone(response.headers.getRawHeaders("x-should-retry"))
        self.assertIn("kimi may take the call in", json.loads(text)["error"]["message"])
        response, text = yield self.post(gateway, {"model": "gemini/gemini-2.5-flash", "messages": HELLO})
        self.assertEqual(response.code, 429)
        self.assertGreater(int(response.headers.getRawHeaders("retry-after")[0]), 3000)
        self.assertEqual(response.headers.getRawHeaders("x-should-retry"), ["false"])

    @inlineCallbacks
    def test_wait_for_the_route_after_a_failover(self) -> Any:
        """
        The same when the call failed over and the fallback refused it for
        longer than the first provider rests (review s25: the fallback's
        hour was told, with x-should-retry: false).
        """
        gemini, kimi = self.behaviour("gemini"), self.behaviour("kimi")
        kimi.rate_limited_keys, kimi.retry_after = {KIMI_KEY}, 5
        gemini.rate_limited_keys, gemini.retry_after = {self.upstream.gemini.key}, 3600
        gateway = self.gateway(default_provider="kimi", fallback="auto")
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 429, text)
        self.assertEqual(response.headers.getRawHeaders("x-openclaw-fallback"), ["kimi->gemini; reason=rate_limited"])
        self.assertIn(response.headers.getRawHeaders("retry-after"), (["5"], ["4"]))
        self.assertIsNone(response.headers.getRawHeaders("x-should-retry"))

    @inlineCallbacks
    def test_every_key_resting_on_both(self) -> Any:
        """
        When every key of the call's provider rests and so does every key
        of its fallback, the 429 says so of both, each provider's wait
        named, and says to retry when the first can take the call (its
        Retry-After): it said "every key the gateway holds for kimi is rate
        limited; retry in 75 s" alone, as if Gemini could take the call
        (trial s29).  A call pinned to one provider, or with failover off,
        is told of that provider alone.
        """
        gemini, kimi = self.behaviour("gemini"), self.behaviour("kimi")
        for kimi_wait, gemini_wait, told in ((75, 120, 75), (75, 30, 30)):
            kimi.rate_limited_keys, kimi.retry_after = {KIMI_KEY}, kimi_wait
            gemini.rate_limited_keys, gemini.retry_after = {self.upstream.gemini.key}, gemini_wait
            gateway = self.gateway(default_provider="kimi", fallback="auto")
            # Kimi's 429, then Gemini's: both providers' keys rest.
            response, text = yield self.post(gateway, {"messages": HELLO})
            self.assertEqual(response.code, 429, text)
            requests = (kimi.requests, gemini.requests)
            response, text = yield self.post(gateway, {"messages": HELLO})
            self.assertEqual(response.code, 429, text)
            self.assertEqual((kimi.requests, gemini.requests), requests)
            message = json.loads(text)["error"]["message"]
            self.assertIn(
                "every key the gateway holds for kimi is rate limited, and so is every key it holds for gemini "
                "(for gemini-flash-latest), where the call would fail over (",
                message,
            )
            self.assertIn(f"); retry in {told} s", message)
            self.assertNotIn(f"retry in {max(kimi_wait, gemini_wait)} s", message)
            self.assertIn(response.headers.getRawHeaders("retry-after"), ([str(told)], [str(told - 1)]))
            first, second = ("kimi", "gemini") if kimi_wait < gemini_wait else ("gemini", "kimi")
            self.assertRegex(message, rf"\({first} may take the call in \d+ s, {second} in \d+ s\)")
            # Pinned to Kimi: Kimi's wait alone.
            response, text = yield self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO})
            self.assertEqual(response.code, 429, text)
            message = json.loads(text)["error"]["message"]
            self.assertTrue(
                message.startswith("every key the gateway holds for kimi is rate limited; retry in"), message
            )
            self.assertNotIn("gemini", message)
            kimi.reset()
            gemini.reset()

    @inlineCallbacks
    def test_every_key_resting_names_the_model(self) -> Any:
        """
        When it is the fallback's model alone that its keys rest for, the
        429 says which (re-check s42: "every key it holds for gemini", as
        if none of its models could take a call).
        """
        gemini, kimi = self.behaviour("gemini"), self.behaviour("kimi")
        kimi.rate_limited_keys, kimi.retry_after = {KIMI_KEY}, 75
        gemini.rate_limited_models, gemini.retry_after = {"gemini-2.5-flash"}, 30
        providers = changed_providers(self.upstream.provider_settings(), gemini={"fallback_model": "gemini-2.5-flash"})
        gateway = self.gateway(providers=providers, default_provider="kimi", fallback="auto")
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 429, text)
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 429, text)
        self.assertIn(
            "every key the gateway holds for kimi is rate limited, and so is every key it holds for gemini "
            "(for gemini-2.5-flash), where the call would fail over (gemini may take the call in ",
            json.loads(text)["error"]["message"],
        )
        # The call's own provider resting for its model alone: said so too.
        kimi.reset()
        gemini.reset()
        kimi.rate_limited_keys, kimi.retry_after = {KIMI_KEY}, 75
        gemini.rate_limited_models, gemini.retry_after = {"gemini-2.5-flash"}, 30
        providers = changed_providers(self.upstream.provider_settings(), gemini={"model": "gemini-2.5-flash"})
        gateway = self.gateway(providers=providers, default_provider="gemini", fallback="auto")
        for _ in range(2):
            response, text = yield self.post(gateway, {"messages": HELLO})
            self.assertEqual(response.code, 429, text)
        self.assertIn(
            "every key the gateway holds for gemini is rate limited for gemini-2.5-flash, and so is every key it "
            "holds for kimi, where the call would fail over (",
            json.loads(text)["error"]["message"],
        )

    @inlineCallbacks
    def test_no_wait_told_for_a_fallback_that_cannot_take_the_call(self) -> Any:
        """
        A fallback whose wire cannot take the request (Gemini and a
        C{video_url} part, Moonshot's) is not a provider the call could
        later go to: neither its keys' rest nor its open breaker is told,
        only the call's provider's wait (trial s29: "gemini may take the
        call in 45 s ... retry in 45 s", and then "not failed over to
        gemini: it cannot take this request").  A call the fallback can
        take is still told its shorter wait.
        """
        video = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What happens here?"},
                    {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAAIGZ0eXA="}},
                ],
            }
        ]
        gemini, kimi = self.behaviour("gemini"), self.behaviour("kimi")
        kimi.rate_limited_keys, kimi.retry_after = {KIMI_KEY}, 75
        gemini.rate_limited_keys, gemini.retry_after = {self.upstream.gemini.key}, 45
        gateway = self.gateway(default_provider="kimi", fallback="auto")
        # Kimi's 429, then Gemini's: both providers' keys rest.
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 429, text)
        response, text = yield self.post(gateway, {"messages": video})
        self.assertEqual(response.code, 429, text)
        message = json.loads(text)["error"]["message"]
        self.assertTrue(message.startswith("every key the gateway holds for kimi is rate limited; retry in"), message)
        self.assertNotIn("gemini", message)
        self.assertIn(response.headers.getRawHeaders("retry-after"), (["75"], ["74"]))
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertIn(response.headers.getRawHeaders("retry-after"), (["45"], ["44"]), text)
        # Gemini's breaker open (its 500 after a failover), Kimi's keys resting.
        gemini.rate_limited_keys, gemini.mode = set(), "error"
        gateway = self.gateway(
            default_provider="kimi", fallback="auto", breaker_failures=1, breaker_cooldown_seconds=45
        )
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 502, text)
        response, text = yield self.post(gateway, {"messages": video})
        self.assertEqual(response.code, 429, text)
        message = json.loads(text)["error"]["message"]
        self.assertNotIn("gemini", message)
        self.assertIn(response.headers.getRawHeaders("retry-after"), (["75"], ["74"]))
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertIn("gemini may take the call in", json.loads(text)["error"]["message"])
        self.assertIn(response.headers.getRawHeaders("retry-after"), (["45"], ["44"]), text)
