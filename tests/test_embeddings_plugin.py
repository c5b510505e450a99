"""
Embeddings as a provider capability (issue #16): a provider the gateway
does not ship, Acme2, defined here only as an OpenAI-compatible module
would define it, declares OpenAI's embeddings API and serves
C{POST /v1/embeddings} once EMBEDDING_MODEL names it; a provider without
one (Kimi) is refused at start-up.  Nothing under C{openclaw/dataplane/}
names a provider.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import attrs
import openai
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

import openclaw.dataplane
from openclaw.providers import GeminiAdapter, KimiAdapter, OpenAICompatibleAdapter
from openclaw.providers.embeddings import EmbeddingsWire
from openclaw.providers.openai_compatible import OpenAIEmbeddings
from openclaw.providers.wire import MalformedAnswer
from openclaw.settings import ConfigError, Settings, load_settings
from openclaw.testing.upstream import OpenAIDialect, ProviderBehaviour
from tests.support import (
    KIMI_AND_GEMINI,
    RunningGateway,
    get_text,
    open_client,
    openai_client,
    start_gateway_from,
    start_upstream,
    twistd_path,
)
from tests.test_twistd import base_env


@attrs.define(kw_only=True)
class Acme2Adapter(OpenAICompatibleAdapter):
    """
    An OpenAI-compatible provider with OpenAI's embeddings API: the whole
    of a provider module.
    """

    id: ClassVar[str] = "acme2"
    display_name: ClassVar[str] = "Acme Two"
    key_variables: ClassVar[tuple[str, ...]] = ("ACME2_API_KEY",)
    base_url_variable: ClassVar[str] = "ACME2_BASE_URL"
    default_base_url: ClassVar[str] = "https://api.acme2.example/v1"
    model_variable: ClassVar[str] = "ACME2_MODEL"
    default_model_id: ClassVar[str] = "acme2-chat"
    embeddings: ClassVar[EmbeddingsWire | None] = OpenAIEmbeddings(default_model="acme2-embed-small")


#: Kimi, Gemini and Acme2, pinned (not read from BUILTIN_PROVIDERS): the
#: stand-in (L{start_upstream}) serves Kimi and Gemini only.
DECLARED = (*KIMI_AND_GEMINI, Acme2Adapter)

ACME2_KEY = "sk-acme2-SECRET-0123456789"
SECOND_ACME2_KEY = "sk-acme2-SECOND-0123456789"
GATEWAY_KEY = "gw-key-0123456789abcdef"
#: Six words: the stand-in counts 7 tokens, the gateway's estimate 3.
SIX_WORDS = "a b c d e f"


def stand_in_vector(text: str, size: int = 8) -> list[float]:
    """
    The vector the stand-in makes of C{text} (L{openclaw.testing.upstream.openai_embed}).
    """
    return [((len(text) + i) % 7) / 8 - 0.25 for i in range(size)]


class CapabilityTests(SynchronousTestCase):
    """
    Which providers declare embeddings, and the OpenAI-compatible wire.
    """

    def test_declared_in_the_providers_own_modules(self) -> None:
        self.assertIsNotNone(GeminiAdapter.embeddings)
        # Moonshot has no embeddings API.
        self.assertIsNone(KimiAdapter.embeddings)
        self.assertIsNone(OpenAICompatibleAdapter.embeddings)

    def test_openai_request_and_answer(self) -> None:
        wire = OpenAIEmbeddings(default_model="m")
        self.assertEqual(wire.url("http://h/v1", "org/m"), b"http://h/v1/embeddings")
        self.assertEqual(
            json.loads(wire.request_body(("a", "b"), "org/m", 4)),
            {"model": "org/m", "input": ["a", "b"], "encoding_format": "float", "dimensions": 4},
        )
        self.assertNotIn("dimensions", json.loads(wire.request_body(("a",), "m", None)))
        # Listed out of order: put back in the inputs' order.
        answer = {
            "data": [{"index": 1, "embedding": [2.0]}, {"index": 0, "embedding": [1.0]}],
            "usage": {"prompt_tokens": 5, "total_tokens": 5},
        }
        read = wire.answer(json.dumps(answer).encode(), 2)
        self.assertEqual((read.vectors, read.prompt_tokens), ([[1.0], [2.0]], 5))
        self.assertIsNone(wire.answer(b'{"data": [{"index": 0, "embedding": []}]}', 1).prompt_tokens)
        self.assertEqual(wire.model_name(" org/m "), "org/m")
        self.assertRaises(ValueError, wire.model_name, " ")

    def test_openai_malformed_answers(self) -> None:
        wire = OpenAIEmbeddings(default_model="m")
        for body in (b"[", b"[]", b'{"data": {}}', b'{"data": [{"index": 0}]}', b'{"data": []}'):
            self.assertRaises(MalformedAnswer, wire.answer, body, 1)

    def test_the_data_plane_names_no_provider(self) -> None:
        """
        No provider id or adapter class in C{openclaw/dataplane/}'s
        embeddings code: the capability is asked.
        """
        source = (Path(openclaw.dataplane.__file__).parent / "embeddings.py").read_text()
        code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("#", "C{", "U{")))
        for name in ("GeminiAdapter", "KimiAdapter", '"gemini"', '"kimi"', "PROVIDER ="):
            self.assertNotIn(name, code)


class SettingsTests(SynchronousTestCase):
    """
    EMBEDDING_MODEL picks a provider with embeddings, and refuses one
    without.
    """

    def setUp(self) -> None:
        self.patch(os, "environ", {})
        self.cwd = Path(self.mktemp())
        self.cwd.mkdir(parents=True)

    def load(self, providers: Any = DECLARED, **options: str) -> Settings:
        return load_settings(options, cwd=self.cwd, providers=providers)

    def embedding(self, providers: Any = DECLARED, **options: str) -> tuple[str | None, str]:
        settings = self.load(providers, **options)
        return settings.embedding_provider, settings.embedding_model

    def test_provider_and_model(self) -> None:
        self.assertEqual(self.embedding(), ("gemini", "gemini-embedding-001"))
        self.assertEqual(self.embedding(EMBEDDING_MODEL="acme2/some-model"), ("acme2", "some-model"))
        # The rest is the model, as the provider names it.
        self.assertEqual(self.embedding(EMBEDDING_MODEL="acme2/org/model"), ("acme2", "org/model"))
        # A bare name is the default embeddings provider's (Gemini's).
        self.assertEqual(self.embedding(EMBEDDING_MODEL="models/e-2"), ("gemini", "e-2"))

    def test_without_gemini(self) -> None:
        """
        Gemini not declared: the first declared provider with embeddings is
        the default, with its own default model.
        """
        only = (KimiAdapter, Acme2Adapter)
        self.assertEqual(self.embedding(only), ("acme2", "acme2-embed-small"))
        self.assertEqual(self.embedding(only, EMBEDDING_MODEL="x/y"), ("acme2", "x/y"))
        self.assertEqual(self.embedding((KimiAdapter,)), (None, ""))
        with self.assertRaises(ConfigError) as caught:
            self.load((KimiAdapter,), EMBEDDING_MODEL="m")
        self.assertIn("no declared provider has an embeddings API", str(caught.exception))

    def test_provider_without_embeddings_refused(self) -> None:
        """
        One line naming the providers that have embeddings.
        """
        with self.assertRaises(ConfigError) as caught:
            self.load(EMBEDDING_MODEL="kimi/moonshot-v1-8k")
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertIn("EMBEDDING_MODEL='kimi/moonshot-v1-8k'", message)
        self.assertIn("kimi, which has no embeddings API", message)
        self.assertIn("(gemini, acme2)", message)
        with self.assertRaises(ConfigError) as caught:
            self.load(EMBEDDING_MODEL="acme2/ ")
        self.assertIn("acme2", str(caught.exception))


class StartupTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_twistd_refuses_kimi(self) -> Any:
        """
        C{twistd openclaw} with EMBEDDING_MODEL=kimi/... stops at start-up
        with one line, no traceback.
        """
        cwd = Path(self.mktemp())
        cwd.mkdir(parents=True)
        out, err, code = yield getProcessOutputAndValue(
            twistd_path(),
            ["-n", "--pidfile=", "openclaw"],
            env=base_env(EMBEDDING_MODEL="kimi/moonshot-v1-8k"),
            path=str(cwd),
        )
        self.assertNotEqual(code, 0)
        lines = err.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn("EMBEDDING_MODEL='kimi/moonshot-v1-8k'", lines[0])
        self.assertIn("kimi, which has no embeddings API", lines[0])
        self.assertIn("(gemini)", lines[0])
        self.assertNotIn(b"Traceback", out + err)


class GatewayTests(TestCase):
    """
    A gateway on real ports, Acme2 served by the stand-in at
    C{/acme2/v1} with OpenAI's C{/embeddings}, called with the openai SDK.
    """

    timeout = 60

    def setUp(self) -> None:
        self.upstream = start_upstream(self, "sk-kimi-0123456789", "AIza-gemini-0123456789")
        self.acme2 = self.upstream.mount(
            "acme2",
            "acme2/v1",
            OpenAIDialect(embeddings=True),
            ProviderBehaviour(key=ACME2_KEY, models=["acme2-chat", "some-model"], owned_by="acme2"),
        )

    def gateway(self, **options: str) -> RunningGateway:
        """
        A gateway whose settings are read as the daemon reads them.
        """
        cwd = Path(self.mktemp())
        cwd.mkdir(parents=True)
        variables = {
            **self.upstream.environment(DECLARED),
            "GATEWAY_API_KEYS": GATEWAY_KEY,
            "EMBEDDING_MODEL": "acme2/some-model",
            **options,
        }
        settings = load_settings(variables, cwd=cwd, providers=DECLARED)
        return start_gateway_from(self, settings, fallback="off")

    def sdk(self, gateway: RunningGateway, key: str = GATEWAY_KEY) -> openai.OpenAI:
        client: openai.OpenAI = openai_client(self, gateway.api_port, key)
        return client

    def get(self, gateway: RunningGateway, path: str) -> Any:
        return get_text(gateway.api_port, path)

    @inlineCallbacks
    def test_sdk_through_acme2(self) -> Any:
        """
        The SDK's default (base64, decoded by the SDK) and floats with
        C{dimensions}: OpenAI's
        C{/embeddings} upstream, asked for floats; the provider's token
        count reported; Gemini never asked.
        """
        gateway = self.gateway()
        client = self.sdk(gateway)
        raw = yield deferToThread(
            client.embeddings.with_raw_response.create, model="text-embedding-3-small", input=["ab", SIX_WORDS]
        )
        self.assertEqual(raw.headers["x-openclaw-provider"], "acme2")
        result = raw.parse()
        self.assertEqual(result.model, "some-model")
        self.assertEqual([d.embedding for d in result.data], [stand_in_vector("ab"), stand_in_vector(SIX_WORDS)])
        self.assertEqual((result.usage.prompt_tokens, result.usage.total_tokens), (2 + 7, 2 + 7))
        self.assertEqual(
            self.acme2.last_body,
            {"model": "some-model", "input": ["ab", SIX_WORDS], "encoding_format": "float"},
        )
        self.assertEqual(self.acme2.uris, ["/acme2/v1/embeddings"])
        self.assertEqual(self.acme2.keys_seen, [ACME2_KEY])

        floats = yield deferToThread(
            client.embeddings.create, model="acme2/some-model", input="ab", encoding_format="float", dimensions=4
        )
        self.assertEqual(floats.data[0].embedding, stand_in_vector("ab", 4))
        self.assertEqual(self.acme2.last_body["dimensions"], 4)
        self.assertEqual(self.upstream.gemini.requests + self.upstream.kimi.requests, 0)

        text = yield self.get(gateway, "/metrics")
        self.assertIn('openclaw_api_requests_total{provider="acme2",status="200"} 2.0', text)
        self.assertNotIn(ACME2_KEY, text)

    @inlineCallbacks
    def test_a_request_picks_a_provider_with_embeddings(self) -> Any:
        """
        C{"gemini/<model>"} still reaches Gemini while EMBEDDING_MODEL is
        Acme2's; C{"kimi/<model>"} is a 400 naming who has embeddings.
        """
        gateway = self.gateway()
        client = self.sdk(gateway)
        result = yield deferToThread(client.embeddings.create, model="gemini/gemini-embedding-001", input="ab")
        self.assertEqual(result.model, "gemini-embedding-001")
        self.assertEqual(self.upstream.gemini.requests, 1)
        self.assertEqual(self.acme2.requests, 0)
        try:
            yield deferToThread(client.embeddings.create, model="kimi/moonshot-v1-8k", input="ab")
        except openai.BadRequestError as e:
            self.assertEqual(e.param, "model")
            self.assertIn("kimi has no embeddings API: embeddings come from gemini, acme2", e.message)
        else:
            self.fail("kimi/... was not refused")
        self.assertEqual(self.upstream.kimi.requests, 0)

    @inlineCallbacks
    def test_key_pool_and_refusals(self) -> Any:
        """
        Acme2's embeddings go through its key pool as chat does: a
        rate-limited key is tried once more with the next, both limited is
        a 429 with the provider's wait; an unknown model is the provider's
        404.
        """
        self.acme2.extra_keys = [SECOND_ACME2_KEY]
        gateway = self.gateway(ACME2_API_KEYS=SECOND_ACME2_KEY)
        client = self.sdk(gateway)
        try:
            yield deferToThread(client.embeddings.create, model="acme2/no-such-model", input="ab")
        except openai.NotFoundError as e:
            self.assertIn("no-such-model", e.message)
        else:
            self.fail("an unknown model was not refused")
        # The next key (round robin) is rate limited: tried again with the other.
        self.acme2.rate_limited_keys = {SECOND_ACME2_KEY}
        self.acme2.retry_after = 30
        yield deferToThread(client.embeddings.create, model="x", input="ab")
        self.assertEqual(self.acme2.keys_seen, [ACME2_KEY, SECOND_ACME2_KEY, ACME2_KEY])
        self.acme2.rate_limited_keys = {ACME2_KEY, SECOND_ACME2_KEY}
        try:
            yield deferToThread(client.embeddings.create, model="x", input="ab")
        except openai.RateLimitError as e:
            self.assertEqual(e.response.headers["retry-after"], "30")
            self.assertNotIn(ACME2_KEY, e.message)
        else:
            self.fail("a rate-limited call succeeded")

    @inlineCallbacks
    def test_consumer_counted_with_the_providers_tokens(self) -> Any:
        """
        A consumer's usage counts the provider's token count, not the
        estimate (7 tokens for six words, not 3 for 11 characters).
        """
        gateway = self.gateway()
        yield gateway.service.consumers_ready
        control = yield open_client(self, gateway.port)
        created = yield control.command(gateway.token, "consumer_create", {"name": "emb"})
        self.assertTrue(created["ok"], created)
        yield deferToThread(self.sdk(gateway, created["result"]["key"]).embeddings.create, model="x", input=SIX_WORDS)
        usage = yield control.command(gateway.token, "usage", {"name": "emb", "group_by": "model"})
        self.assertTrue(usage["ok"], usage)
        [group] = usage["result"]["groups"]
        self.assertEqual((group["model"], group["requests"], group["prompt_tokens"]), ("acme2/some-model", 1, 7))
