"""
The ninth review's findings, end to end: the official openai SDK (and raw
HTTP where the bytes matter) against a gateway in this process, in front
of the stand-in upstream, all on 127.0.0.1.

  - JSON nested deeper than orjson encodes (254 levels): a 400 for a
    request, a 502 for an answer, counted like every other call;
  - a 2xx answer that is not what the API returns says its real status;
  - embeddings use the key pool and answer a provider's refusal as chat
    does; the models listing uses the key pool too;
  - an embeddings call whose client left is counted as 499 and releases
    the consumer's reservation.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from typing import Any

import openai
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from openclaw.providers.keys import fingerprint
from openclaw.testing import upstream as standin
from tests.support import changed_providers
from tests.test_consumers import GatewayCase
from tests.test_dataplane import GEMINI_KEY, HELLO, DataPlaneTestCase

#: A list nested 300 deep: orjson reads it (up to 1024 levels), but
#: encodes no more than 254.
DEEP: Any = json.loads("[" * 300 + "]" * 300)
SECOND_GEMINI_KEY = "AIza-gemini-SECOND-0123456789abcdef"
EMBEDDING_MODEL = "gemini/gemini-embedding-001"


class DeepJSONTests(DataPlaneTestCase):
    @inlineCallbacks
    def test_deep_request_is_a_counted_400(self) -> Any:
        gateway = self.gateway()
        tool = {
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"default": DEEP}}}},
        }
        for provider in ("kimi", "gemini"):
            for stream in (False, True):
                body: dict[str, Any] = {"model": f"{provider}/m", "messages": HELLO, "tools": [tool]}
                if stream:
                    body["stream"] = True
                response, text = yield self.post(gateway, body)
                self.assertEqual(response.code, 400, (provider, stream, text))
                error = self.assertOpenAIError(text, "json_too_deep")
                self.assertEqual(error["type"], "invalid_request_error")
                self.assertIn("254", error["message"])
        # Kimi passes metadata on: nested there too.
        response, text = yield self.post(gateway, {"model": "kimi/m", "messages": HELLO, "metadata": {"a": DEEP}})
        self.assertEqual(response.code, 400)
        self.assertOpenAIError(text, "json_too_deep")
        # The SDK sees a BadRequestError (not retried).
        sdk = self.sdk(gateway)
        try:
            yield deferToThread(
                sdk.chat.completions.create,
                model="gemini/gemini-flash-latest",
                messages=HELLO,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"default": DEEP}}},
            )
        except openai.BadRequestError as e:
            self.assertEqual(e.code, "json_too_deep")
        else:
            self.fail("a request nested 300 deep was not refused")
        self.assertEqual((self.upstream.kimi.requests, self.upstream.gemini.requests), (0, 0))
        text = yield self.metrics(gateway)
        self.assertIn('openclaw_api_requests_total{provider="-",status="400"} 6.0', text)
        self.assertEqual(self.flushLoggedErrors(), [])
        # Still serving everyone else.
        answer = yield deferToThread(sdk.chat.completions.create, model="gemini/gemini-flash-latest", messages=HELLO)
        self.assertEqual(answer.choices[0].message.content, "Hello from the stand-in.")

    @inlineCallbacks
    def metrics(self, gateway: Any) -> Any:
        response = yield self.http().get(f"http://127.0.0.1:{gateway.api_port}/metrics")
        text = yield response.text("utf-8")
        return text

    def deep_call(self) -> standin.GeminiAnswer:
        return standin.GeminiAnswer(
            events=(({"functionCall": {"name": "f", "args": {"a": DEEP}}, "thoughtSignature": "sig-1"},),)
        )

    @inlineCallbacks
    def test_deep_answer_is_a_counted_502(self) -> Any:
        gateway = self.gateway()
        gemini = self.upstream.gemini
        gemini.answers.append(self.deep_call())
        sdk = self.sdk(gateway)
        try:
            yield deferToThread(sdk.chat.completions.create, model="gemini/gemini-flash-latest", messages=HELLO)
        except openai.APIStatusError as e:
            self.assertEqual((e.status_code, e.code), (502, "upstream_malformed"))
            self.assertIn("254 levels", e.message)
        else:
            self.fail("an answer nested 300 deep was passed on")
        # Streamed, its first event the deep one: nothing was sent yet, so
        # it is answered as a whole error too.
        gemini.answers.append(self.deep_call())
        response, text = yield self.post(
            gateway, {"model": "gemini/gemini-flash-latest", "messages": HELLO, "stream": True}
        )
        self.assertEqual(response.code, 502)
        self.assertIn("upstream_malformed", text)
        self.assertNotIn("[DONE]", text)
        text = yield self.metrics(gateway)
        self.assertIn('openclaw_api_requests_total{provider="gemini",status="502"} 2.0', text)
        self.assertEqual(self.flushLoggedErrors(), [])

    @inlineCallbacks
    def test_malformed_answer_says_its_status(self) -> Any:
        gateway = self.gateway()
        self.upstream.gemini.answers.append(
            standin.GeminiAnswer(events=(({"text": ""},),), finish_reason="MALFORMED_FUNCTION_CALL")
        )
        response, text = yield self.post(gateway, {"model": "gemini/gemini-flash-latest", "messages": HELLO})
        self.assertEqual(response.code, 502)
        message = self.assertOpenAIError(text)["message"]
        self.assertTrue(message.endswith("(HTTP 200)"), message)
        self.assertNotIn("2xx", message)


class EmbeddingsKeyPoolTests(DataPlaneTestCase):
    def two_keys(self, **settings: Any) -> Any:
        gemini = self.upstream.gemini
        gemini.extra_keys = [SECOND_GEMINI_KEY]
        providers = changed_providers(self.upstream.provider_settings(), gemini={"api_keys": (SECOND_GEMINI_KEY,)})
        return self.gateway(providers=providers, fallback="off", **settings)

    def embed(self, sdk: openai.OpenAI) -> Any:
        return deferToThread(sdk.embeddings.create, model=EMBEDDING_MODEL, input="hello world")

    @inlineCallbacks
    def test_rate_limited_answers_429_and_rests_the_key(self) -> Any:
        gateway = self.two_keys()
        gemini = self.upstream.gemini
        sdk = self.sdk(gateway)
        # The first key is rate limited: the call is made again with the
        # second, and the next call uses the second only (the first rests).
        gemini.rate_limited_keys = {GEMINI_KEY}
        gemini.retry_after = 30
        for _ in range(2):
            yield self.embed(sdk)
        self.assertEqual(gemini.keys_seen, [GEMINI_KEY, SECOND_GEMINI_KEY, SECOND_GEMINI_KEY])
        pool = gateway.service.providers.get("gemini").keys
        self.assertEqual(pool.states()[fingerprint(GEMINI_KEY)], "resting")
        # Both rate limited: 429 with the provider's wait, as chat answers.
        gemini.rate_limited_keys = {GEMINI_KEY, SECOND_GEMINI_KEY}
        response, text = yield self.post(gateway, {"model": EMBEDDING_MODEL, "input": "hi"}, path="/v1/embeddings")
        self.assertEqual(response.code, 429)
        self.assertOpenAIError(text, "rate_limit_exceeded")
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["30"])
        # Every key rests now: refused without a request.
        gemini.reset()
        response, text = yield self.post(gateway, {"model": EMBEDDING_MODEL, "input": "hi"}, path="/v1/embeddings")
        self.assertEqual(response.code, 429)
        self.assertIsNotNone(response.headers.getRawHeaders("retry-after"))
        self.assertEqual(gemini.requests, 0)
        for secret in (GEMINI_KEY, SECOND_GEMINI_KEY):
            self.assertNotIn(secret, text)

    @inlineCallbacks
    def test_bad_request_is_a_400(self) -> Any:
        gateway = self.gateway()
        gemini = self.upstream.gemini
        gemini.mode, gemini.error_status = "error", 400
        gemini.error_message = "* BatchEmbedContentsRequest.requests[0].output_dimensionality: bad value"
        sdk = self.sdk(gateway)
        try:
            yield deferToThread(sdk.embeddings.create, model=EMBEDDING_MODEL, input="hi", dimensions=99999)
        except openai.BadRequestError as e:
            self.assertEqual(e.code, "upstream_invalid_request")
            self.assertIn("output_dimensionality", e.message)
        else:
            self.fail("the provider's 400 was not passed on")

    @inlineCallbacks
    def test_invalid_key_is_set_aside(self) -> Any:
        gateway = self.two_keys()
        gemini = self.upstream.gemini
        gemini.invalid_keys = {GEMINI_KEY}
        sdk = self.sdk(gateway)
        for _ in range(2):
            answer = yield self.embed(sdk)
            self.assertEqual(len(answer.data), 1)
        self.assertEqual(gemini.keys_seen, [GEMINI_KEY, SECOND_GEMINI_KEY, SECOND_GEMINI_KEY])
        pool = gateway.service.providers.get("gemini").keys
        self.assertEqual(pool.states()[fingerprint(GEMINI_KEY)], "set_aside")

    @inlineCallbacks
    def test_models_listing_uses_the_pool(self) -> Any:
        gateway = self.two_keys(default_provider="gemini")
        gemini = self.upstream.gemini
        gemini.invalid_keys = {GEMINI_KEY}
        sdk = self.sdk(gateway)
        # The first key is refused (and set aside); the next listing uses
        # the other one.
        try:
            yield deferToThread(lambda: list(sdk.models.list()))
        except openai.APIStatusError as e:
            self.assertEqual((e.status_code, e.code), (502, "upstream_auth_failed"))
        else:
            self.fail("a listing with a refused key succeeded")
        listed = yield deferToThread(lambda: [m.id for m in sdk.models.list()])
        self.assertTrue(listed)
        self.assertEqual(gemini.keys_seen, [GEMINI_KEY, SECOND_GEMINI_KEY])


class EmbeddingsClientGoneTests(GatewayCase):
    @inlineCallbacks
    def test_client_gone_is_counted_and_releases(self) -> Any:
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "emb", "budget_usd": 10.0})
        gemini = self.upstream.gemini
        gemini.delay = 0.5
        body = json.dumps({"model": EMBEDDING_MODEL, "input": "hello world"}).encode()
        head = (
            f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {created['key']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock = socket.create_connection(("127.0.0.1", gateway.api_port))
        sock.sendall(head + body)
        counters = gateway.service.consumers.counters
        for _ in range(100):
            if gemini.requests:
                break
            yield deferLater(reactor, 0.01)
        self.assertEqual(gemini.requests, 1)
        self.assertGreater(counters.reserved("emb", reactor.seconds()), 0.0)
        sock.close()
        for _ in range(100):
            if gateway.service.api_site.context.in_flight == 0:
                break
            yield deferLater(reactor, 0.01)
        self.assertEqual(counters.reserved("emb", reactor.seconds()), 0.0)
        yield gateway.service.consumers.flush()
        usage = yield self.command(gateway, client, "usage", {"name": "emb", "group_by": "model"})
        [group] = usage["groups"]
        self.assertEqual((group["model"], group["requests"]), (EMBEDDING_MODEL, 1))
        response = yield deferToThread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{gateway.api_port}/metrics").read()
        )
        self.assertIn(b'openclaw_api_requests_total{provider="gemini",status="499"} 1.0', response)
        self.assertIn(b'openclaw_consumer_requests_total{consumer="emb",status="499"} 1.0', response)
