"""
Embeddings through the gateway: a call uses the provider's key pool (a
rate-limited key rests, a refused one is set aside) and a provider's
refusal is answered as chat answers it, as the models listing uses the
pool too; a call whose client left is counted as 499 and releases the
consumer's reservation.  The official openai SDK (and raw HTTP where the
bytes matter) against a gateway in this process, in front of the stand-in
upstream, all on 127.0.0.1.
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
from tests.support import changed_providers
from tests.test_consumers import GatewayCase
from tests.test_dataplane import GEMINI_KEY, DataPlaneTestCase

SECOND_GEMINI_KEY = "AIza-gemini-SECOND-0123456789abcdef"


EMBEDDING_MODEL = "gemini/gemini-embedding-001"


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
        # Resting for the embeddings model only (Google limits each model apart).
        self.assertEqual(pool.states()[fingerprint(GEMINI_KEY)], "resting for gemini-embedding-001")
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
        # Said of the embeddings model alone (re-check s42).
        self.assertIn("rate limited for gemini-embedding-001 (its other models may take calls)", text)
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
        # Its batch was sent (and is billed): the estimate of its inputs is
        # counted, as for a chat call left after it was sent.
        self.assertEqual(group["prompt_tokens"], 3)
        response = yield deferToThread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{gateway.api_port}/metrics").read()
        )
        self.assertIn(b'openclaw_api_requests_total{provider="gemini",status="499"} 1.0', response)
        self.assertIn(b'openclaw_consumer_requests_total{consumer="emb",status="499"} 1.0', response)


class EmbeddingsTimeoutTests(DataPlaneTestCase):
    @inlineCallbacks
    def test_no_answer_in_time(self) -> Any:
        """
        A provider that does not answer within UPSTREAM_TIMEOUT: 504
        C{upstream_timeout}, as chat answers it (trial s25: 502 saying
        the gateway was stopping, as Agent's cancelled request arrived
        wrapped in ResponseNeverReceived).
        """
        gateway = self.gateway(fallback="off", upstream_timeout=0.5)
        self.upstream.gemini.mode = "hang"
        try:
            yield deferToThread(self.sdk(gateway).embeddings.create, model=EMBEDDING_MODEL, input="hello")
        except openai.APIStatusError as e:
            self.assertEqual((e.status_code, e.body["code"]), (504, "upstream_timeout"))  # type: ignore[index]
            self.assertNotIn("stopping", e.message)
        else:
            self.fail("the call succeeded")
