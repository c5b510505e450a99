"""
The models listing and C{GET /v1/models/{id}} (as C{client.models.retrieve}
asks it): ids with and without a provider's prefix, percent-encoded,
missing; a consumer restricted by its models lists (and may retrieve)
the models it may call, even while the active provider has no key.  The
openai SDK against a gateway in this process.
"""

from __future__ import annotations

from typing import Any

import attrs
import openai
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from openclaw.routing import Route
from tests.test_consumers import GatewayCase
from tests.test_dataplane import GATEWAY_KEY, HELLO, DataPlaneTestCase


class ModelRetrieveTests(DataPlaneTestCase):
    """
    C{GET /v1/models/{model}}, as C{client.models.retrieve} asks it.
    """

    @inlineCallbacks
    def test_retrieve(self):
        gateway = self.gateway()
        gateway.service.route.switch(Route("kimi", "moonshot-v1-8k"))
        client = self.sdk(gateway)
        model = yield deferToThread(client.models.retrieve, "kimi/moonshot-v1-8k")
        self.assertEqual(
            (model.id, model.object, model.owned_by, model.created), ("kimi/moonshot-v1-8k", "model", "kimi", 0)
        )
        # A bare id: the active provider's; another provider's by its prefix.
        model = yield deferToThread(client.models.retrieve, "moonshot-v1-32k")
        self.assertEqual((model.id, model.owned_by), ("moonshot-v1-32k", "kimi"))
        model = yield deferToThread(client.models.retrieve, "gemini/gemini-2.5-pro")
        self.assertEqual((model.id, model.owned_by), ("gemini/gemini-2.5-pro", "gemini"))
        # The "/" percent-encoded, as some clients send it.
        response = yield self.http().get(
            f"http://127.0.0.1:{gateway.api_port}/v1/models/kimi%2Fmoonshot-v1-8k",
            headers={"Authorization": [f"Bearer {GATEWAY_KEY}"]},
        )
        document = yield response.json()
        self.assertEqual(response.code, 200)
        self.assertEqual(document, {"id": "kimi/moonshot-v1-8k", "object": "model", "created": 0, "owned_by": "kimi"})
        # Spaces around the id are not part of it, as for a chat call.
        response = yield self.http().get(
            f"http://127.0.0.1:{gateway.api_port}/v1/models/%20kimi%2Fmoonshot-v1-8k%20",
            headers={"Authorization": [f"Bearer {GATEWAY_KEY}"]},
        )
        self.assertEqual((response.code, (yield response.json())["id"]), (200, "kimi/moonshot-v1-8k"))
        for missing in ("kimi/gpt-4o", "gpt-4o", "gemini/moonshot-v1-8k"):
            failure = yield self.assertFailure(deferToThread(client.models.retrieve, missing), openai.NotFoundError)
            self.assertEqual(failure.code, "model_not_found")
            # As a chat call's 404 for the same model, and OpenAI's (trial s34).
            self.assertEqual(failure.param, "model")
            self.assertIn(missing, failure.message)
        # The key check is the listing's.
        failure = yield self.assertFailure(
            deferToThread(self.sdk(gateway, "wrong-key-0123456789").models.retrieve, "kimi/moonshot-v1-8k"),
            openai.AuthenticationError,
        )
        # The listing's errors: the provider's refusal, say.
        self.upstream.kimi.mode = "error"
        failure = yield self.assertFailure(
            deferToThread(client.models.retrieve, "kimi/moonshot-v1-8k"), openai.APIStatusError
        )
        self.assertEqual(failure.status_code, 502)
        # A listing that is not JSON is the provider's malformed answer, as
        # a chat call's is: the provider was reached.
        self.upstream.kimi.mode = "malformed"
        for fetch in (client.models.list, lambda: client.models.retrieve("kimi/moonshot-v1-8k")):
            failure = yield self.assertFailure(deferToThread(fetch), openai.APIStatusError)
            self.assertEqual((failure.status_code, failure.code), (502, "upstream_malformed"))
            self.assertIn("malformed JSON in models listing", failure.message)


class RestrictedListingTests(GatewayCase):
    @inlineCallbacks
    def test_listing_and_retrieve_follow_models(self) -> Any:
        """
        A consumer restricted to gemini/* lists (and may retrieve) the
        Gemini models while Kimi is active, as C{gemini/<model>}; not
        Kimi's.
        """
        gateway, client = yield self.gateway()
        gateway.service.route.switch(Route("kimi", "moonshot-v1-8k"))
        created = yield self.command(
            gateway, client, "consumer_create", {"name": "g", "models": ["gemini/*", "kimi/moonshot-v1-32k"]}
        )
        sdk = self.sdk(gateway, created["key"])
        page = yield deferToThread(sdk.models.list)
        self.assertEqual(
            [(m.id, m.owned_by) for m in page],
            [("moonshot-v1-32k", "kimi")] + [(f"gemini/{m}", "gemini") for m in self.upstream.gemini.models],
        )
        # Each id listed is one the consumer may call.
        yield deferToThread(sdk.chat.completions.create, model=page.data[-1].id, messages=HELLO)
        model = yield deferToThread(sdk.models.retrieve, "gemini/gemini-2.5-pro")
        self.assertEqual(model.owned_by, "gemini")
        failure = yield self.assertFailure(
            deferToThread(sdk.models.retrieve, "kimi/moonshot-v1-8k"), openai.NotFoundError
        )
        self.assertEqual(failure.code, "model_not_found")
        # The gateway's keys (unrestricted) still list the active provider's.
        listed = yield deferToThread(lambda: [m.id for m in self.sdk(gateway, GATEWAY_KEY).models.list()])
        self.assertEqual(listed, self.upstream.kimi.models)


class RestrictedListingWithoutActiveKeyTests(GatewayCase):
    @inlineCallbacks
    def test_active_provider_without_key(self) -> Any:
        """
        A consumer restricted to gemini/* lists Gemini's models while the
        active provider (Kimi) has no key: Kimi is never asked (its 503 is
        for listings that need it).
        """
        providers = self.upstream.provider_settings()
        gateway, client = yield self.gateway(
            providers={**providers, "kimi": attrs.evolve(providers["kimi"], api_key=None)}
        )
        gateway.service.route.switch(Route("kimi", "moonshot-v1-8k"))
        created = yield self.command(gateway, client, "consumer_create", {"name": "g", "models": ["gemini/*"]})
        page = yield deferToThread(self.sdk(gateway, created["key"]).models.list)
        self.assertEqual([m.id for m in page], [f"gemini/{m}" for m in self.upstream.gemini.models])
        failure = yield self.assertFailure(
            deferToThread(self.sdk(gateway, GATEWAY_KEY).models.list), openai.APIStatusError
        )
        self.assertEqual((failure.status_code, failure.code), (503, "provider_key_not_set"))
        # Gemini failing, its error is the answer, naming Gemini.
        self.upstream.gemini.mode = "error"
        failure = yield self.assertFailure(
            deferToThread(self.sdk(gateway, created["key"]).models.list), openai.APIStatusError
        )
        self.assertEqual(failure.status_code, 502)
        self.assertIn("gemini", failure.message)
        self.assertNotIn("kimi", failure.message.lower())
        self.assertEqual(failure.response.headers["X-OpenClaw-Provider"], "gemini")
