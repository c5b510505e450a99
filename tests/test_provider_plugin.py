"""
The provider plug-in point, proven with a provider the gateway does not
ship: DeepSeek, defined here only, as a new provider module would define
it.  Nothing under C{openclaw/} names it; declaring it is enough for its
settings to be read, for the gateway to route to it, probe it, list its
models and count its requests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import attrs
import openai
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

import openclaw
from openclaw.providers import BUILTIN_PROVIDERS, OpenAICompatibleAdapter
from openclaw.settings import ConfigError, Settings, load_settings
from openclaw.testing.upstream import OpenAIDialect, ProviderBehaviour
from tests.support import RunningGateway, open_client, start_gateway, start_upstream


@attrs.define(kw_only=True)
class DeepSeekAdapter(OpenAICompatibleAdapter):
    """
    DeepSeek's OpenAI-compatible API: the whole of a provider module.
    """

    id: ClassVar[str] = "deepseek"
    display_name: ClassVar[str] = "DeepSeek"
    key_variables: ClassVar[tuple[str, ...]] = ("DEEPSEEK_API_KEY",)
    base_url_variable: ClassVar[str] = "DEEPSEEK_BASE_URL"
    default_base_url: ClassVar[str] = "https://api.deepseek.com/v1"
    model_variable: ClassVar[str] = "DEEPSEEK_MODEL"
    default_model_id: ClassVar[str] = "deepseek-chat"


#: What the gateway is built with: the built-in providers and this one.
DECLARED = (*BUILTIN_PROVIDERS, DeepSeekAdapter)

DEEPSEEK_KEY = "sk-deepseek-SECRET-0123456789"
GATEWAY_KEY = "gw-key-0123456789abcdef"
HELLO = [{"role": "user", "content": "Hello"}]


class SettingsTests(SynchronousTestCase):
    """
    L{load_settings} reads a declared provider's own variables.
    """

    def setUp(self) -> None:
        self.environ: dict[str, str] = {}
        self.patch(os, "environ", self.environ)
        self.cwd = Path(self.mktemp())
        self.cwd.mkdir(parents=True)

    def load(self, **options: str) -> Settings:
        return load_settings(options, cwd=self.cwd, providers=DECLARED)

    def test_defaults(self) -> None:
        settings = self.load()
        self.assertEqual(settings.provider_ids, ("kimi", "gemini", "deepseek"))
        deepseek = settings.providers["deepseek"]
        self.assertIs(deepseek.adapter, DeepSeekAdapter)
        self.assertEqual(
            (deepseek.base_url, deepseek.model, deepseek.api_key),
            ("https://api.deepseek.com/v1", "deepseek-chat", None),
        )
        self.assertEqual(settings.default_provider, "gemini")

    def test_environment_and_env_file(self) -> None:
        """
        Its variables come from the environment and the env file, as every
        other setting does; its key stays out of C{repr()}.
        """
        (self.cwd / ".env").write_text(
            "DEEPSEEK_MODEL=deepseek-reasoner\nDEEPSEEK_BASE_URL=http://127.0.0.1:9/ds/v1/\n"
        )
        self.environ["DEEPSEEK_API_KEY"] = DEEPSEEK_KEY
        self.environ["DEFAULT_PROVIDER"] = "deepseek"
        settings = self.load()
        deepseek = settings.providers["deepseek"]
        self.assertEqual(
            (deepseek.base_url, deepseek.model, deepseek.api_key),
            ("http://127.0.0.1:9/ds/v1", "deepseek-reasoner", DEEPSEEK_KEY),
        )
        self.assertEqual(
            (settings.default_provider, settings.default_model("deepseek")), ("deepseek", "deepseek-reasoner")
        )
        self.assertNotIn(DEEPSEEK_KEY, repr(settings))

    def test_bad_values_name_its_variables(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.load(DEEPSEEK_BASE_URL="ftp://example")
        self.assertIn("DEEPSEEK_BASE_URL", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            self.load(DEFAULT_PROVIDER="openai")
        self.assertIn("use kimi, gemini or deepseek", str(caught.exception))

    def test_undeclared_is_unknown(self) -> None:
        """
        Without its declaration, the built-in gateway knows no DeepSeek.
        """
        with self.assertRaises(ConfigError):
            load_settings({"DEFAULT_PROVIDER": "deepseek"}, cwd=self.cwd)

    def test_nothing_in_the_package_names_it(self) -> None:
        package = Path(openclaw.__file__).parent
        named = [str(path) for path in package.rglob("*.py") if "deepseek" in path.read_text().lower()]
        self.assertEqual(named, [])


class GatewayTests(TestCase):
    """
    A gateway on real ports, DeepSeek served by the stand-in at
    C{/deepseek/v1} with a key of its own.
    """

    timeout = 30

    def setUp(self) -> None:
        self.upstream = start_upstream(self, "sk-kimi-0123456789", "AIza-gemini-0123456789")
        self.deepseek = self.upstream.mount(
            "deepseek",
            "deepseek/v1",
            OpenAIDialect(),
            ProviderBehaviour(key=DEEPSEEK_KEY, models=["deepseek-chat", "deepseek-reasoner"], owned_by="deepseek"),
        )

    def gateway(self, **options: str) -> RunningGateway:
        """
        A gateway whose settings are read as the daemon reads them, from
        the variables that point every declared provider at the stand-in.
        """
        cwd = Path(self.mktemp())
        cwd.mkdir(parents=True)
        variables = {**self.upstream.environment(DECLARED), "GATEWAY_API_KEYS": GATEWAY_KEY, **options}
        settings = load_settings(variables, cwd=cwd, providers=DECLARED)
        gateway = start_gateway(
            self,
            api=True,
            providers=settings.providers,
            default_provider=settings.default_provider,
            gateway_api_keys=settings.gateway_api_keys,
        )
        self.addCleanup(gateway.service.api_site.close_connections)
        return gateway

    def sdk(self, gateway: RunningGateway) -> openai.OpenAI:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{gateway.api_port}/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=10
        )
        self.addCleanup(deferToThread, client.close)
        return client

    @inlineCallbacks
    def get(self, gateway: RunningGateway, path: str) -> Any:
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield HTTPClient(Agent(reactor, pool=pool)).get(f"http://127.0.0.1:{gateway.api_port}{path}")
        text = yield response.text("utf-8")
        return text

    @inlineCallbacks
    def test_chat_by_name_and_after_switch(self):
        """
        C{"deepseek/<model>"} reaches it for one call; after
        C{switch_provider deepseek} every call does, streamed or not.
        """
        gateway = self.gateway()
        client = self.sdk(gateway)
        raw = yield deferToThread(
            client.chat.completions.with_raw_response.create, model="deepseek/deepseek-reasoner", messages=HELLO
        )
        self.assertEqual(raw.headers["x-openclaw-provider"], "deepseek")
        completion = raw.parse()
        self.assertEqual(completion.model, "deepseek-reasoner")
        self.assertEqual(completion.choices[0].message.content, self.deepseek.reply)
        self.assertEqual(self.deepseek.last_body["model"], "deepseek-reasoner")
        self.assertEqual(self.deepseek.uris, ["/deepseek/v1/chat/completions"])
        self.assertEqual(gateway.service.route.current.provider_id, "gemini")

        control = yield open_client(self, gateway.port)
        answer = yield control.command(gateway.token, "switch_provider", {"provider": "deepseek"})
        self.assertTrue(answer["ok"], answer)
        self.assertEqual(answer["result"], {"previous": "gemini", "active": "deepseek", "model": "deepseek-chat"})
        status = yield control.command(gateway.token, "status")
        self.assertEqual(status["result"]["provider"], "DeepSeek")

        completion = yield deferToThread(client.chat.completions.create, model="gpt-4o", messages=HELLO)
        self.assertEqual(completion.model, "deepseek-chat")

        def streamed() -> str:
            chunks = client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
            return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)

        text = yield deferToThread(streamed)
        self.assertEqual(text, self.deepseek.reply)
        self.assertEqual(self.deepseek.requests, 3)
        self.assertEqual((self.upstream.kimi.requests, self.upstream.gemini.requests), (0, 0))

    @inlineCallbacks
    def test_default_provider(self):
        gateway = self.gateway(DEFAULT_PROVIDER="deepseek", DEEPSEEK_MODEL="deepseek-reasoner")
        completion = yield deferToThread(self.sdk(gateway).chat.completions.create, model="x", messages=HELLO)
        self.assertEqual(completion.model, "deepseek-reasoner")
        self.assertEqual(self.deepseek.requests, 1)

    @inlineCallbacks
    def test_health_check_models_and_metrics(self):
        gateway = self.gateway(DEFAULT_PROVIDER="deepseek")
        control = yield open_client(self, gateway.port)
        answer = yield control.command(gateway.token, "health_check")
        self.assertTrue(answer["ok"], answer)
        result = answer["result"]
        self.assertEqual(list(result["providers"]), ["kimi", "gemini", "deepseek"])
        self.assertEqual(result["active"], "deepseek")
        entry = result["providers"]["deepseek"]
        self.assertIsInstance(entry.pop("latency_ms"), float)
        self.assertEqual(len(entry.pop("keys")), 1)
        self.assertEqual(
            entry, {"ok": True, "status": 200, "models": 2, "active_model_available": True, "breaker": "closed"}
        )
        self.assertNotIn(DEEPSEEK_KEY, json.dumps(answer))

        page = yield deferToThread(self.sdk(gateway).models.list)
        self.assertEqual([m.id for m in page], ["deepseek-chat", "deepseek-reasoner"])
        self.assertEqual({m.owned_by for m in page}, {"deepseek"})

        text = yield self.get(gateway, "/metrics")
        # The probe and the listing, both GET /models.
        self.assertIn('openclaw_upstream_requests_total{provider="deepseek",status="200"} 2.0', text)
        self.assertIn('openclaw_provider_up{provider="deepseek"} 1.0', text)
        self.assertIn('openclaw_api_requests_total{provider="deepseek",status="200"} 1.0', text)

    @inlineCallbacks
    def test_key_missing(self):
        """
        Without its key, calls are refused naming its variable, and nothing
        is sent.
        """
        gateway = self.gateway(DEEPSEEK_API_KEY="")
        client = self.sdk(gateway)
        failure = yield self.assertFailure(
            deferToThread(client.chat.completions.create, model="deepseek/deepseek-chat", messages=HELLO),
            openai.APIStatusError,
        )
        self.assertEqual(failure.status_code, 503)
        self.assertIn("DEEPSEEK_API_KEY is not set", failure.message)
        self.assertEqual(self.deepseek.requests, 0)
