"""
What a provider's refusal tells the gateway about its keys, and what the
client and the metrics are told: a 403 for a model
kept private leaves the key pool alone; a 5xx's C{Retry-After} reaches
the client; Google's C{FAILED_PRECONDITION} is the operator's account;
C{openclaw_provider_up} tells the providers' state when scraped.  The
official openai SDK and raw HTTP against a gateway in this process, in
front of the stand-in upstream, on 127.0.0.1.
"""

from __future__ import annotations

import email.utils
import json
import time
from typing import Any

import attrs
import openai
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from openclaw.dataplane.errors import provider_not_configured, upstream_refused
from openclaw.providers.errors import Refusal, RefusalKind, classify
from openclaw.providers.keys import fingerprint
from tests.support import capture_log_events, changed_providers, open_client
from tests.test_dataplane import GEMINI_KEY, HELLO, KIMI_KEY
from tests.test_resilience import OTHER, ResilienceTestCase

SECOND = {"kimi": "sk-kimi-SECOND-0123456789abcdef", "gemini": "AIza-gemini-SECOND-0123456789abcdef"}
THIRD = {"kimi": "sk-kimi-THIRD-0123456789abcdef", "gemini": "AIza-gemini-THIRD-0123456789abcdef"}
FIRST = {"kimi": KIMI_KEY, "gemini": GEMINI_KEY}
PRIVATE = "kimi-k2-private"

FAILED_PRECONDITION = {
    "error": {
        "code": 400,
        "message": "User location is not supported for the API use.",
        "status": "FAILED_PRECONDITION",
    }
}


class ReadingTests(SynchronousTestCase):
    """
    A refusal, read.
    """

    def test_403_is_not_a_key_refusal(self):
        body = b'{"error":{"message":"The model kimi-k2-private is not available","type":"permission_denied_error"}}'
        self.assertEqual(classify(403, body).kind, RefusalKind.FORBIDDEN)
        self.assertEqual(classify(401, body).kind, RefusalKind.AUTH)

    def test_403_hint(self):
        """
        A 403 is the model not available to the key, or the key or its
        account not allowed at all ("Your account is suspended": trial
        s29, whose hint spoke of the model alone); the hint says both, and
        who can fix the second.
        """
        refusal = Refusal(403, RefusalKind.FORBIDDEN, "Your account org-1 is suspended")
        error = upstream_refused("kimi", refusal, "KIMI_API_KEY", names_model=True)
        self.assertEqual((error.status, error.code), (403, "permission_denied"))
        self.assertIn(
            "Your account org-1 is suspended; the key this gateway holds for kimi is not allowed", error.message
        )
        self.assertIn("the model may not be available to it", error.message)
        self.assertIn("no access (suspended, or not enabled for this API)", error.message)
        self.assertIn("ask the operator to check the kimi key and account", error.message)

    def test_retry_after_on_5xx(self):
        self.assertEqual(classify(503, b"{}", "30").retry_after, 30.0)
        date = email.utils.formatdate(1_000_060, usegmt=True)
        self.assertEqual(classify(503, b"{}", date, now=1_000_000.0).retry_after, 60.0)


class PoolTestCase(ResilienceTestCase):
    def pooled_gateway(self, provider: str, **settings: Any) -> Any:
        behaviour = self.behaviour(provider)
        behaviour.extra_keys = [SECOND[provider], THIRD[provider]]
        providers = changed_providers(
            self.upstream.provider_settings(), **{provider: {"api_keys": (SECOND[provider], THIRD[provider])}}
        )
        return self.gateway(providers=providers, default_provider=provider, **settings)

    def keys_checked(self, gateway: Any, provider: str) -> Any:
        adapter = gateway.service.providers.get(provider)
        return gatherResults([adapter.key_checked(key) for key in adapter.keys.keys])


class ForbiddenModelTests(PoolTestCase):
    """
    A 403 is often about the model: the key is set aside only if its
    models listing is refused too.
    """

    @inlineCallbacks
    def test_private_model_leaves_every_key_usable(self):
        for provider in ("kimi", "gemini"):
            gateway = self.pooled_gateway(provider, fallback="auto")
            client = self.sdk(gateway)
            behaviour = self.behaviour(provider)
            behaviour.private_models = {PRIVATE}
            other = self.behaviour("gemini" if provider == "kimi" else "kimi")
            other.reset()
            for _ in range(2):
                failure = yield self.assertFailure(
                    deferToThread(client.chat.completions.create, model=f"{provider}/{PRIVATE}", messages=HELLO),
                    openai.PermissionDeniedError,
                )
                self.assertEqual(failure.status_code, 403)
                self.assertEqual(failure.code, "permission_denied")
                self.assertIsNone(failure.param)
                self.assertIn(PRIVATE, failure.message)
                self.assertIn("may not be available", failure.message)
                self.assertEqual(failure.response.headers["x-openclaw-upstream-status"], "403")
                self.assertNotIn(FIRST[provider], failure.response.text)
            yield self.keys_checked(gateway, provider)
            pool = gateway.service.providers.get(provider).keys
            self.assertEqual(set(pool.states().values()), {"ok"}, provider)
            # Pinned: never failed over.
            self.assertEqual(other.requests, 0)
            behaviour.reset()
            answer = yield deferToThread(client.chat.completions.create, model="x", messages=HELLO)
            self.assertEqual(answer.choices[0].message.content, behaviour.reply)
            self.assertEqual(behaviour.requests, 1)

    @inlineCallbacks
    def test_listing_refused_too_sets_the_key_aside(self):
        gateway = self.pooled_gateway("kimi", fallback="off")
        kimi = self.behaviour("kimi")
        kimi.mode = "forbidden"
        response, text = yield self.post(gateway, {"model": "kimi/x", "messages": HELLO})
        self.assertEqual(response.code, 403)
        self.assertOpenAIError(text, "permission_denied")
        yield self.keys_checked(gateway, "kimi")
        pool = gateway.service.providers.get("kimi").keys
        self.assertEqual(pool.states()[fingerprint(KIMI_KEY)], "set_aside")
        self.assertEqual(pool.available, 2)

    @inlineCallbacks
    def test_one_check_per_key_at_a_time(self):
        gateway = self.pooled_gateway("kimi", fallback="off")
        kimi = self.behaviour("kimi")
        kimi.delay = 0.2
        adapter = gateway.service.providers.get("kimi")
        for _ in range(3):
            adapter.check_key(KIMI_KEY)
        adapter.check_key("not-a-key-of-the-pool")
        yield self.keys_checked(gateway, "kimi")
        self.assertEqual([uri for uri in kimi.uris if uri.endswith("/models")], ["/kimi/v1/models"])
        self.assertEqual(kimi.keys_seen, [KIMI_KEY])
        adapter.check_key(KIMI_KEY)
        yield self.keys_checked(gateway, "kimi")
        self.assertEqual(len(kimi.keys_seen), 2)


class RetryAfterTests(ResilienceTestCase):
    """
    A provider's C{Retry-After} on a 5xx reaches the client.
    """

    @inlineCallbacks
    def test_passed_through(self):
        gateway = self.gateway(default_provider="kimi", fallback="off")
        kimi = self.behaviour("kimi")
        kimi.mode, kimi.error_status = "error", 503
        for header, low, high in (
            ("30", 30, 30),
            (email.utils.formatdate(time.time() + 120, usegmt=True), 115, 121),
            ("99999999", 3600, 3600),
        ):
            kimi.error_headers = {"Retry-After": header}
            response, text = yield self.post(gateway, {"messages": HELLO})
            self.assertEqual(response.code, 502)
            self.assertOpenAIError(text, "upstream_http_error")
            (seconds,) = response.headers.getRawHeaders("retry-after")
            self.assertTrue(low <= int(seconds) <= high, (header, seconds))
        kimi.error_headers = {}
        response, _ = yield self.post(gateway, {"messages": HELLO})
        self.assertIsNone(response.headers.getRawHeaders("retry-after"))


class AccountTests(ResilienceTestCase):
    """
    Google's C{FAILED_PRECONDITION} is the operator's account.
    """

    @inlineCallbacks
    def test_failed_precondition(self):
        gateway = self.gateway(default_provider="gemini", fallback="auto")
        gemini = self.behaviour("gemini")
        gemini.mode, gemini.error_status, gemini.error_body = "error", 400, FAILED_PRECONDITION
        response, text = yield self.post(gateway, {"model": "gemini/x", "messages": HELLO})
        self.assertEqual(response.code, 502)
        error = self.assertOpenAIError(text, "upstream_account_error")
        self.assertIn("User location is not supported", error["message"])
        self.assertIn("operator", error["message"])
        adapter = gateway.service.providers.get("gemini")
        self.assertEqual(set(adapter.keys.states().values()), {"ok"})
        self.assertEqual(adapter.breaker.state, "closed")
        # Unpinned: failed over.
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("x-openclaw-fallback"), ["gemini->kimi; reason=account"])

    @inlineCallbacks
    def test_quota_spent(self):
        """
        Moonshot's 429 C{exceeded_current_quota_error} (and OpenAI's
        C{insufficient_quota}) is the account out of balance, not a rate
        limit: no retry mends it (trial s25: 429 "retry later", the key
        rested and asked again every few seconds).
        """
        gateway = self.gateway(default_provider="kimi", fallback="auto")
        kimi = self.behaviour("kimi")
        for field, value in (("type", "exceeded_current_quota_error"), ("code", "insufficient_quota")):
            kimi.mode, kimi.error_status = "error", 429
            kimi.error_body = {
                "error": {
                    field: value,
                    "message": "You exceeded your current quota, please check your plan and billing details",
                }
            }
            kimi.error_headers = {"Retry-After": "10"}
            response, text = yield self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO})
            self.assertEqual(response.code, 502, value)
            error = self.assertOpenAIError(text, "upstream_account_error")
            self.assertIn("check your plan and billing details", error["message"])
            self.assertEqual(response.headers.getRawHeaders("x-should-retry"), ["false"])
            adapter = gateway.service.providers.get("kimi")
            self.assertEqual(set(adapter.keys.states().values()), {"ok"})
            # Unpinned: failed over.
            response, text = yield self.post(gateway, {"messages": HELLO})
            self.assertEqual(response.code, 200)
            self.assertEqual(response.headers.getRawHeaders("x-openclaw-fallback"), ["kimi->gemini; reason=account"])
        # A type or code of another JSON type is no quota error (review s25: a list's TypeError was a 500).
        for odd in (["exceeded_current_quota_error"], {"a": 1}):
            kimi.error_body = {"error": {"type": odd, "code": odd, "message": "slow down"}}
            response, text = yield self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO})
            self.assertEqual(response.code, 429, text)
            self.assertOpenAIError(text, "rate_limit_exceeded")

    @inlineCallbacks
    def test_payment_required(self):
        """
        402 Payment Required is the account's (RFC 9110 section 15.5.3,
        reserved, used by every API that has it for billing: DeepSeek's
        "Insufficient Balance"): no retry mends it, another provider may
        answer (trial s34: a 502 "other", not failed over).
        """
        events = capture_log_events(self)
        gateway = self.gateway(default_provider="kimi", fallback="auto")
        kimi = self.behaviour("kimi")
        kimi.mode, kimi.error_status = "error", 402
        kimi.error_body = {"error": {"message": "Insufficient Balance", "type": "unknown_error"}}
        response, text = yield self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO})
        self.assertEqual(response.code, 502, text)
        error = self.assertOpenAIError(text, "upstream_account_error")
        self.assertIn("Insufficient Balance", error["message"])
        # The request's log line says what the provider said (re-check s34:
        # its code alone, the provider's words only in the client's body).
        [line] = [formatEvent(e) for e in events if e.get("status") == 502]
        self.assertIn("502 upstream_account_error via kimi/moonshot-v1-8k", line)
        self.assertIn(": " + error["message"], line)
        self.assertEqual(set(gateway.service.providers.get("kimi").keys.states().values()), {"ok"})
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("x-openclaw-fallback"), ["kimi->gemini; reason=account"])


class FailureLineTests(ResilienceTestCase):
    @inlineCallbacks
    def test_both_providers_failures_in_the_line(self):
        """
        A call both providers failed: its log line holds the whole message,
        the first provider's failure and the fallback's (re-check s34: cut
        at 256 characters, the fallback's failure and the hints lost).
        """
        events = capture_log_events(self)
        gateway = self.gateway(default_provider="kimi", fallback="auto")
        for provider in ("kimi", "gemini"):
            behaviour = self.behaviour(provider)
            behaviour.mode, behaviour.error_status = "error", 503
            behaviour.error_message = f"{provider} is overloaded " + "very " * 30
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 502, text)
        message = self.assertOpenAIError(text)["message"]
        self.assertGreater(len(message), 256)
        [line] = [e for e in events if e.get("status") == 502]
        self.assertEqual(line["error_message"], message)
        self.assertIn("gemini is overloaded", formatEvent(line))


class NoStatusTests(ResilienceTestCase):
    """
    An answer without a status (C{HTTP/1.1 000}) is the provider's failure.
    """

    @inlineCallbacks
    def test_fails_over(self):
        gateway = self.gateway(default_provider="kimi", fallback="auto", breaker_failures=1)
        kimi = self.behaviour("kimi")
        kimi.mode, kimi.error_status = "error", 0
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 200, text)
        self.assertEqual(response.headers.getRawHeaders("x-openclaw-fallback"), ["kimi->gemini; reason=http_5xx"])
        self.assertEqual(gateway.service.providers.get("kimi").breaker.state, "open")

    @inlineCallbacks
    def test_fallback_cannot_take_it(self):
        """
        A request the fallback would refuse (Gemini's C{n} is at most 8)
        is not failed over, and the answer says so.
        """
        gateway = self.gateway(default_provider="kimi", fallback="auto")
        kimi = self.behaviour("kimi")
        kimi.mode, kimi.error_status = "error", 503
        response, text = yield self.post(gateway, {"messages": HELLO, "n": 9})
        self.assertEqual(response.code, 502, text)
        message = self.assertOpenAIError(text, "upstream_http_error")["message"]
        self.assertIn("(not failed over to gemini: it cannot take this request: n must be from 1 to 8", message)
        self.assertIsNone(response.headers.getRawHeaders("x-openclaw-fallback"))

    @inlineCallbacks
    def test_fallback_cannot_honour_it(self):
        """
        A Kimi call asking for what Gemini would not do (a web search, a
        token bias) is not failed over to Gemini, whole or streamed: Kimi's
        failure is the answer, saying why, rather than Gemini's answer
        without the search or the bias (trial s29).  Without them the same
        call is failed over.
        """
        gateway = self.gateway(default_provider="kimi", fallback="auto", breaker_failures=100)
        kimi = self.behaviour("kimi")
        kimi.mode, kimi.error_status = "error", 503
        for stream in (False, True):
            for extra, words in (
                ({"web_search_options": {}}, "web_search_options asks for a web search"),
                ({"logit_bias": {"50256": -100}}, "logit_bias asks for tokens to be favoured or banned"),
            ):
                response, text = yield self.post(gateway, {"messages": HELLO, "stream": stream, **extra})
                self.assertEqual(response.code, 502, text)
                message = self.assertOpenAIError(text, "upstream_http_error")["message"]
                self.assertIn(f"(not failed over to gemini: it cannot take this request: {words}", message)
                self.assertIsNone(response.headers.getRawHeaders("x-openclaw-fallback"))
        self.assertEqual(self.behaviour("gemini").requests, 0)
        response, text = yield self.post(gateway, {"messages": HELLO, "logit_bias": {}, "web_search_options": None})
        self.assertEqual(response.code, 200, text)
        self.assertEqual(response.headers.getRawHeaders("x-openclaw-fallback"), ["kimi->gemini; reason=http_5xx"])

    @inlineCallbacks
    def test_fallback_model_cannot_take_it(self):
        """
        What the fallback's model refuses (Gemini 3: penalties, C{n} over
        1) is not failed over: Kimi's failure is the answer, whole or
        streamed, saying why.
        """
        fallback = "gemini-3-flash-preview"
        providers = changed_providers(self.upstream.provider_settings(), gemini={"fallback_model": fallback})
        # Six failures in a row: the breaker stays closed, to see each.
        gateway = self.gateway(providers=providers, default_provider="kimi", fallback="auto", breaker_failures=100)
        kimi = self.behaviour("kimi")
        kimi.mode, kimi.error_status = "error", 503
        for stream in (False, True):
            for extra, words in (
                ({"presence_penalty": 0.5}, f"presence_penalty is 0.5: Gemini {fallback} takes no penalty"),
                ({"frequency_penalty": 1}, f"frequency_penalty is 1: Gemini {fallback} takes no penalty"),
                ({"n": 2}, f"n is 2: Gemini {fallback} answers one choice per call"),
            ):
                response, text = yield self.post(gateway, {"messages": HELLO, "stream": stream, **extra})
                self.assertEqual(response.code, 502, text)
                message = self.assertOpenAIError(text, "upstream_http_error")["message"]
                self.assertIn(f"(not failed over to gemini: it cannot take this request: {words}", message)
                self.assertEqual(response.headers.getRawHeaders("x-openclaw-provider"), ["kimi"])
                self.assertIsNone(response.headers.getRawHeaders("x-openclaw-fallback"))
        gemini = self.behaviour("gemini")
        self.assertEqual(gemini.requests, 0)
        # A penalty of 0 is failed over (Gemini's default: not sent).
        gemini.models.append(fallback)
        response, text = yield self.post(gateway, {"messages": HELLO, "presence_penalty": 0, "frequency_penalty": 0})
        self.assertEqual(response.code, 200, text)
        self.assertEqual(response.headers.getRawHeaders("x-openclaw-fallback"), ["kimi->gemini; reason=http_5xx"])
        self.assertNotIn("presencePenalty", gemini.last_body.get("generationConfig", {}))


class ProviderUpTests(PoolTestCase):
    """
    C{openclaw_provider_up} is read when scraped.
    """

    @inlineCallbacks
    def test_tells_the_state(self):
        gateway = self.gateway(default_provider="kimi", fallback="off", breaker_failures=2, breaker_cooldown_seconds=1)
        _, metrics = yield self.get(gateway, "/metrics")
        self.assertIn('openclaw_provider_up{provider="kimi"} 1.0', metrics)
        self.assertIn('openclaw_provider_up{provider="gemini"} 1.0', metrics)
        self.assertNotIn("openclaw_provider_health_check_ok{", metrics)
        self.assertIn('openclaw_provider_breaker_state{provider="kimi",state="closed"} 1.0', metrics)
        # The breaker opens: down.
        kimi = self.behaviour("kimi")
        kimi.mode, kimi.error_status = "error", 500
        for _ in range(2):
            yield self.post(gateway, {"messages": HELLO})
        _, metrics = yield self.get(gateway, "/metrics")
        self.assertIn('openclaw_provider_up{provider="kimi"} 0.0', metrics)
        self.assertIn('openclaw_provider_breaker_state{provider="kimi",state="open"} 1.0', metrics)
        self.assertIn('openclaw_provider_breaker_state{provider="kimi",state="closed"} 0.0', metrics)
        # Half-open: a call may go, so up; the state says half-open.
        yield deferLater(reactor, 1.05)
        _, metrics = yield self.get(gateway, "/metrics")
        self.assertIn('openclaw_provider_up{provider="kimi"} 1.0', metrics)
        self.assertIn('openclaw_provider_breaker_state{provider="kimi",state="half_open"} 1.0', metrics)
        self.assertIn('openclaw_provider_breaker_open{provider="kimi"} 0.0', metrics)
        # Every key set aside: down, whatever the last health check said.
        kimi.mode = "ok"
        control = yield open_client(self, gateway.port)
        yield control.command(gateway.token, "health_check")
        gateway.service.providers.get("kimi").keys.set_aside(KIMI_KEY)
        _, metrics = yield self.get(gateway, "/metrics")
        self.assertIn('openclaw_provider_up{provider="kimi"} 0.0', metrics)
        self.assertIn('openclaw_provider_health_check_ok{provider="kimi"} 1.0', metrics)


class ErrorIn200Tests(ResilienceTestCase):
    """
    A 200 whose body is an error keeps the provider's words.
    """

    @inlineCallbacks
    def test_kept(self):
        gateway = self.gateway(default_provider="kimi", fallback="off")
        kimi = self.behaviour("kimi")
        kimi.mode, kimi.error_status = "error", 200
        kimi.error_body = {
            "error": {"message": f"Your account is suspended ({KIMI_KEY})", "type": "account_suspended", "code": 7}
        }
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 502)
        error = self.assertOpenAIError(text, "upstream_malformed")
        self.assertIn("Your account is suspended", error["message"])
        self.assertIn("type=account_suspended, code=7", error["message"])
        self.assertNotIn(KIMI_KEY, text)


def chat(client: openai.OpenAI, model: str = "x", stream: bool = False) -> Any:
    """
    A chat call with C{client} (a stream read to its end).
    """
    if stream:
        return list(client.chat.completions.create(model=model, messages=HELLO, stream=True))
    return client.chat.completions.create(model=model, messages=HELLO)


def models(client: openai.OpenAI) -> Any:
    return list(client.models.list())


def embed(client: openai.OpenAI, model: str = "gemini/gemini-embedding-001") -> Any:
    return client.embeddings.create(model=model, input="hi")


class ShouldRetryTests(ResilienceTestCase):
    """
    C{x-should-retry: false} where no retry within the call can succeed: the
    gateway's keys refused, the provider account unable to serve, or a
    C{Retry-After} over 60 s.  The official openai SDK against a gateway on
    127.0.0.1.
    """

    @inlineCallbacks
    def refused(self, kind: type[openai.APIStatusError], call: Any, *args: Any, **kwargs: Any) -> Any:
        """
        Run C{call(*args, **kwargs)} in a thread; fire with the SDK's
        error, of C{kind}.
        """
        failure = yield self.assertFailure(deferToThread(call, *args, **kwargs), kind)
        return failure

    @inlineCallbacks
    def test_keys_refused(self):
        gateway = self.gateway(default_provider="kimi", fallback="off")
        # As applications use it: the SDK's default retries.
        client = self.sdk_retrying(gateway)
        kimi = self.behaviour("kimi")
        kimi.mode = "unauthorized"
        # The key refused, then (set aside) no usable key: both 502
        # upstream_auth_failed, neither worth the SDK's retries.
        for _ in range(2):
            failure = yield self.refused(openai.InternalServerError, chat, client)
            self.assertEqual((failure.status_code, failure.code), (502, "upstream_auth_failed"))
            self.assertEqual(failure.response.headers["x-should-retry"], "false")
        # The SDK took the header at its word: one request each.
        answered = [e for e in self.events if e.get("log_namespace") == "openclaw.dataplane"]
        self.assertEqual(len(answered), 2, answered)
        self.assertEqual(kimi.requests, 1)

    @inlineCallbacks
    def test_first_stream_event_refuses_the_key(self):
        gateway = self.gateway(default_provider="gemini", fallback="off")
        gemini = self.behaviour("gemini")
        gemini.mode, gemini.cut_after, gemini.error_status = "stream_error", 0, 401
        failure = yield self.refused(openai.InternalServerError, chat, self.sdk(gateway), stream=True)
        self.assertEqual((failure.status_code, failure.code), (502, "upstream_auth_failed"))
        self.assertEqual(failure.response.headers["x-should-retry"], "false")

    @inlineCallbacks
    def test_account(self):
        gateway = self.gateway(default_provider="gemini", fallback="off")
        gemini = self.behaviour("gemini")
        gemini.mode, gemini.error_status, gemini.error_body = "error", 400, FAILED_PRECONDITION
        failure = yield self.refused(openai.InternalServerError, chat, self.sdk(gateway))
        self.assertEqual((failure.status_code, failure.code), (502, "upstream_account_error"))
        self.assertEqual(failure.response.headers["x-should-retry"], "false")

    @inlineCallbacks
    def test_long_retry_after(self):
        kimi = self.behaviour("kimi")
        kimi.mode, kimi.error_status = "error", 429
        for wait, told in ((3600, "false"), (61, "false"), (60, None), (1, None)):
            # A gateway each: its key rests for the wait.
            client = self.sdk(self.gateway(default_provider="kimi", fallback="off"))
            kimi.retry_after = wait
            failure = yield self.refused(openai.RateLimitError, chat, client)
            self.assertEqual(failure.response.headers["retry-after"], str(wait))
            self.assertEqual(failure.response.headers.get("x-should-retry"), told, wait)
        # Every key resting an hour: no usable key, told the same.
        client = self.sdk(self.gateway(default_provider="kimi", fallback="off"))
        kimi.retry_after = 3600
        for _ in range(2):
            failure = yield self.refused(openai.RateLimitError, chat, client)
            self.assertEqual(failure.response.headers["x-should-retry"], "false")
        self.assertIn("every key the gateway holds for kimi is rate limited", failure.message)
        # A 5xx's Retry-After.
        client = self.sdk(self.gateway(default_provider="kimi", fallback="off"))
        kimi.error_status, kimi.error_headers = 503, {"Retry-After": "120"}
        failure = yield self.refused(openai.InternalServerError, chat, client)
        self.assertEqual(failure.response.headers["retry-after"], "120")
        self.assertEqual(failure.response.headers["x-should-retry"], "false")

    @inlineCallbacks
    def test_breaker_cooldown(self):
        gateway = self.gateway(
            default_provider="kimi", fallback="off", breaker_failures=1, breaker_cooldown_seconds=120
        )
        kimi = self.behaviour("kimi")
        kimi.mode, kimi.error_status = "error", 500
        client = self.sdk(gateway)
        failure = yield self.refused(openai.InternalServerError, chat, client)
        self.assertIsNone(failure.response.headers.get("x-should-retry"))
        failure = yield self.refused(openai.InternalServerError, chat, client)
        self.assertEqual((failure.status_code, failure.code), (503, "provider_unavailable"))
        self.assertEqual(failure.response.headers["retry-after"], "120")
        self.assertEqual(failure.response.headers["x-should-retry"], "false")

    @inlineCallbacks
    def test_embeddings_and_models(self):
        gemini = self.behaviour("gemini")
        gemini.mode, gemini.error_status, gemini.retry_after = "error", 429, 3600
        client = self.sdk(self.gateway(default_provider="gemini", fallback="off"))
        failure = yield self.refused(openai.RateLimitError, embed, client)
        self.assertEqual(failure.response.headers["retry-after"], "3600")
        self.assertEqual(failure.response.headers["x-should-retry"], "false")
        gemini.mode, gemini.invalid_keys = "ok", {GEMINI_KEY}
        for call in (embed, models):
            client = self.sdk(self.gateway(default_provider="gemini", fallback="off"))
            failure = yield self.refused(openai.InternalServerError, call, client)
            self.assertEqual((failure.status_code, failure.code), (502, "upstream_auth_failed"), call)
            self.assertEqual(failure.response.headers["x-should-retry"], "false")


class UnknownModelTests(ResilienceTestCase):
    """
    A provider's 404 for a model it does not have is OpenAI's own: 404
    C{invalid_request_error}, code C{model_not_found}, param C{model}, the
    provider's message kept; neither retried nor failed over.
    """

    @inlineCallbacks
    def test_chat(self):
        gateway = self.gateway(default_provider="kimi", fallback="auto")
        client = self.sdk_retrying(gateway)
        for provider, said in (
            ("kimi", "Not found the model no-such-model or Permission denied"),
            ("gemini", "models/no-such-model is not found for API version v1beta"),
        ):
            for stream in (False, True):
                behaviour, other = self.behaviour(provider), self.behaviour(OTHER[provider])
                behaviour.reset()
                other.reset()
                failure = yield self.assertFailure(
                    deferToThread(chat, client, f"{provider}/no-such-model", stream), openai.NotFoundError
                )
                self.assertEqual(
                    (failure.status_code, failure.type, failure.code, failure.param),
                    (404, "invalid_request_error", "model_not_found", "model"),
                )
                self.assertIn(said, failure.message)
                if provider == "gemini":
                    # Google's status for a 404, as the stand-in gives it.
                    self.assertIn("NOT_FOUND", failure.message)
                self.assertEqual(failure.response.headers["x-openclaw-upstream-status"], "404")
                self.assertIsNone(failure.response.headers.get("x-should-retry"))
                self.assertEqual((behaviour.requests, other.requests), (1, 0), (provider, stream))

    @inlineCallbacks
    def test_base_url_without_the_api(self):
        """
        A base URL with no API behind it (C{KIMI_BASE_URL} without its
        C{/v1}): the server's own 404 page, not the provider's error
        document, tells the operator to check the base URL, as well as
        the model (new-operator trial s32: "model not found" only).
        """
        providers = dict(self.upstream.provider_settings())
        kimi = providers["kimi"]
        providers["kimi"] = attrs.evolve(kimi, base_url=kimi.base_url.removesuffix("/v1"))
        gateway = self.gateway(default_provider="kimi", fallback="off", providers=providers)
        failure = yield self.assertFailure(deferToThread(chat, self.sdk(gateway)), openai.NotFoundError)
        self.assertEqual((failure.code, failure.param), ("model_not_found", "model"))
        self.assertIn("ask the operator to check KIMI_BASE_URL (openclawctl health-check)", failure.message)
        # The provider's own 404 for a model: no such hint.
        failure = yield self.assertFailure(
            deferToThread(chat, self.sdk(self.gateway(default_provider="kimi")), "kimi/no-such-model"),
            openai.NotFoundError,
        )
        self.assertNotIn("BASE_URL", failure.message)

    @inlineCallbacks
    def test_unpinned_not_failed_over(self):
        """
        Routed to the active provider, whose model (the operator's
        default) it does not have: the 404 is not failed over, as before.
        """
        gateway = self.gateway(default_provider="kimi", fallback="auto")
        kimi = self.behaviour("kimi")
        kimi.models = [m for m in kimi.models if m != "moonshot-v1-8k"]
        failure = yield self.assertFailure(deferToThread(chat, self.sdk(gateway)), openai.NotFoundError)
        self.assertEqual((failure.code, failure.param), ("model_not_found", "model"))
        self.assertIn("Not found the model moonshot-v1-8k", failure.message)
        self.assertIsNone(failure.response.headers.get("x-openclaw-fallback"))
        self.assertEqual(self.behaviour("gemini").requests, 0)

    @inlineCallbacks
    def test_embeddings(self):
        gateway = self.gateway(default_provider="gemini", fallback="off")
        gemini = self.behaviour("gemini")
        # Google's answer for a model it does not have (the stand-in's
        # embeddings take any model).
        gemini.mode, gemini.error_status = "error", 404
        gemini.error_message = "models/no-such-model is not found for API version v1beta, or is not supported"
        failure = yield self.assertFailure(
            deferToThread(embed, self.sdk(gateway), "gemini/no-such-model"), openai.NotFoundError
        )
        self.assertEqual(
            (failure.status_code, failure.type, failure.code, failure.param),
            (404, "invalid_request_error", "model_not_found", "model"),
        )
        self.assertIn("models/no-such-model is not found", failure.message)


class ShouldRetryRuleTests(SynchronousTestCase):
    """
    The errors no retry can mend, built as every answer path builds them.
    """

    def test_operator_must_act_or_same_refusal_again(self) -> None:
        def should_retry(headers: tuple[tuple[bytes, bytes], ...]) -> bytes | None:
            return {name.lower(): value for name, value in headers}.get(b"x-should-retry")

        # No key for the provider: only the operator can set one.
        self.assertEqual(should_retry(provider_not_configured("kimi", "KIMI_API_KEY").headers), b"false")
        # A refusal of another kind (402, 405, a redirect) comes again; 408,
        # 409 and 5xx may pass on a retry: the SDKs' own rule stands.
        for status, expected in (
            (402, b"false"),
            (405, b"false"),
            (302, b"false"),
            (408, None),
            (409, None),
            (500, None),
        ):
            refusal = Refusal(status, RefusalKind.OTHER, "refused")
            error = upstream_refused("kimi", refusal, "KIMI_API_KEY", names_model=True)
            self.assertEqual(should_retry(error.headers), expected, status)


#: Moonshot's answer to a prompt over the model's context window (as its
#: users quote it: MoonshotAI/kimi-cli#2011), and its v1 models' words.
MOONSHOT_TOO_LONG = {
    "error": {
        "message": "Invalid request: Your request exceeded model token limit: 262144 (requested: 269030)",
        "type": "invalid_request_error",
    }
}
MOONSHOT_V1_TOO_LONG = {
    "error": {"message": "model max length exceeded, max length:8192", "type": "invalid_request_error"}
}
#: Google's (google-gemini/gemini-cli#4231).
GOOGLE_TOO_LONG = {
    "error": {
        "code": 400,
        "message": "The input token count (1200293) exceeds the maximum number of tokens allowed (1048576).",
        "status": "INVALID_ARGUMENT",
    }
}
#: OpenAI's own (and an OpenAI-compatible API's that copies it).
OPENAI_TOO_LONG = {
    "error": {
        "message": "This model's maximum context length is 128000 tokens. However, your messages resulted in "
        "130000 tokens. Please reduce the length of the messages.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
}


class ContextLengthTests(ResilienceTestCase):
    """
    A prompt over the model's context window is OpenAI's 400
    C{context_length_exceeded} with C{param} C{messages}, however the
    provider says it: the code agent frameworks read to trim their history
    (before, Moonshot's and Google's words came as
    C{upstream_invalid_request}, which no framework knows).  The official
    openai SDK against a gateway on 127.0.0.1.
    """

    @inlineCallbacks
    def too_long(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        failure = yield self.assertFailure(deferToThread(call, *args, **kwargs), openai.BadRequestError)
        self.assertEqual((failure.status_code, failure.code), (400, "context_length_exceeded"))
        return failure

    @inlineCallbacks
    def test_each_provider_in_its_own_words(self):
        cases = (
            ("kimi", MOONSHOT_TOO_LONG, "exceeded model token limit: 262144"),
            ("kimi", MOONSHOT_V1_TOO_LONG, "model max length exceeded"),
            ("kimi", OPENAI_TOO_LONG, "maximum context length is 128000"),
            ("gemini", GOOGLE_TOO_LONG, "The input token count (1200293) exceeds"),
        )
        for provider, body, words in cases:
            # Unpinned, failover on: a request at fault is not failed over
            # (the other provider would be another model).
            gateway = self.gateway(default_provider=provider, fallback="auto")
            behaviour = self.behaviour(provider)
            behaviour.mode, behaviour.error_status, behaviour.error_body = "error", 400, body
            client = self.sdk(gateway)
            for stream in (False, True):
                failure = yield self.too_long(chat, client, stream=stream)
                self.assertEqual(failure.param, "messages")
                self.assertIn(words, failure.message)
                self.assertIn("shorten the messages", failure.message)
                self.assertEqual(failure.response.headers["x-openclaw-upstream-status"], "400")
                self.assertIsNone(failure.response.headers.get("x-openclaw-fallback"))
            behaviour.mode, behaviour.error_body = "ok", None

    @inlineCallbacks
    def test_other_refusals_keep_their_code(self):
        """
        Only those words: another 400 of either provider is still
        C{upstream_invalid_request}, and a 413 or a 5xx saying them is no
        request over the context window.
        """
        cases = (
            ("kimi", 400, {"error": {"message": "Invalid request: temperature", "type": "invalid_request_error"}}),
            ("gemini", 400, {"error": {"code": 400, "message": "Invalid JSON payload", "status": "INVALID_ARGUMENT"}}),
            # Google's words with another status: not Google's answer for it.
            ("gemini", 400, {"error": {**GOOGLE_TOO_LONG["error"], "status": "FAILED_PRECONDITION"}}),
        )
        for provider, status, body in cases:
            gateway = self.gateway(default_provider=provider, fallback="off")
            behaviour = self.behaviour(provider)
            behaviour.mode, behaviour.error_status, behaviour.error_body = "error", status, body
            response, text = yield self.post(gateway, {"messages": HELLO})
            self.assertNotIn("context_length_exceeded", text)
            behaviour.mode, behaviour.error_body = "ok", None
        gateway = self.gateway(default_provider="kimi", fallback="off")
        kimi = self.behaviour("kimi")
        kimi.mode, kimi.error_status, kimi.error_body = "error", 503, MOONSHOT_TOO_LONG
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 502, text)
        self.assertNotIn("context_length_exceeded", text)


class ContextLengthReadingTests(SynchronousTestCase):
    """
    The client's error for a refusal read as over the context window.
    """

    def test_param(self):
        refusal = Refusal(400, RefusalKind.REQUEST, "too long", code="context_length_exceeded")
        chat_error = upstream_refused("kimi", refusal, "KIMI_API_KEY", names_model=True)
        self.assertEqual(
            (chat_error.status, chat_error.code, chat_error.param), (400, "context_length_exceeded", "messages")
        )
        embeddings_error = upstream_refused("gemini", refusal, "GEMINI_API_KEY", names_model=True, prompt_param="input")
        self.assertEqual(embeddings_error.param, "input")
        self.assertIn("shorten the input (or split it into parts)", embeddings_error.message)

    def test_openai_code_read_by_every_provider(self):
        self.assertEqual(classify(400, json.dumps(OPENAI_TOO_LONG).encode()).code, "context_length_exceeded")
        self.assertIsNone(classify(500, json.dumps(OPENAI_TOO_LONG).encode()).code)
        self.assertIsNone(classify(400, json.dumps(MOONSHOT_TOO_LONG).encode()).code)
