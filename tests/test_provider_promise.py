"""
Issue #16's promise, "adding a provider means one new module plus its
tests", rule by rule: the stand-in serves whatever providers it is given
(a third built-in included), failover follows FALLBACK's order, a
declaration is checked when its class is made, each provider reads its
own refusals (probe and call alike), a missing key is an error rather
than an assertion, and prices ship with the provider's module.

The third provider is made up ("acme", from L{tests.test_provider_plugin});
"built-in" is shown by patching L{openclaw.providers.BUILTIN_PROVIDERS}.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import attrs
import orjson
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

import openclaw.providers
from openclaw.consumers.prices import Price, PriceTable, shipped_prices
from openclaw.dataplane.request import ChatRequest
from openclaw.providers import BUILTIN_PROVIDERS, GeminiAdapter, KimiAdapter, OpenAICompatibleAdapter
from openclaw.providers.base import ProviderDeclarationError
from openclaw.providers.errors import MissingKey
from openclaw.providers.fetch import Exchange
from openclaw.providers.openai_compatible import REASONING_PLACEHOLDER, ReasoningKeptWire
from openclaw.providers.registry import ProviderRegistry
from openclaw.settings import ConfigError, Settings, load_settings
from openclaw.testing import upstream as standin
from openclaw.testing.upstream import GeminiDialect, OpenAIDialect, StandInUpstream
from tests.support import KIMI_AND_GEMINI, bare_adapter, changed_providers
from tests.test_provider_plugin import DECLARED, AcmeAdapter


@attrs.define(kw_only=True)
class ZetaAdapter(GeminiAdapter):
    """
    A made-up provider speaking Gemini's API (a Gemini-compatible proxy).
    """

    id: ClassVar[str] = "zeta"
    display_name: ClassVar[str] = "Zeta"
    key_variables: ClassVar[tuple[str, ...]] = ("ZETA_API_KEY",)
    base_url_variable: ClassVar[str] = "ZETA_BASE_URL"
    default_base_url: ClassVar[str] = "https://zeta.example/api/v1beta"
    model_variable: ClassVar[str] = "ZETA_MODEL"
    default_model_id: ClassVar[str] = "zeta-1"


@attrs.define(kw_only=True)
class BetaAdapter(OpenAICompatibleAdapter):
    """
    A made-up OpenAI-compatible provider pricing a model beside its
    default one, as DeepSeek prices C{deepseek-reasoner} beside
    C{deepseek-chat}; its API's base URL has no path.
    """

    id: ClassVar[str] = "beta"
    display_name: ClassVar[str] = "Beta"
    key_variables: ClassVar[tuple[str, ...]] = ("BETA_API_KEY",)
    base_url_variable: ClassVar[str] = "BETA_BASE_URL"
    default_base_url: ClassVar[str] = "https://api.beta.example"
    model_variable: ClassVar[str] = "BETA_MODEL"
    default_model_id: ClassVar[str] = "beta-chat"
    prices: ClassVar[Mapping[str, Price]] = MappingProxyType(
        {"beta-chat": Price(0.5, 1.5), "beta-reasoner": Price(0.5, 1.5)}
    )


def _as_builtin(testcase: SynchronousTestCase, providers: tuple[Any, ...] = DECLARED) -> None:
    testcase.patch(openclaw.providers, "BUILTIN_PROVIDERS", providers)


class StandInTests(TestCase):
    """
    The stand-in mounts every provider it is given, by its wire.
    """

    def test_third_builtin(self) -> None:
        """
        With a third built-in, the stand-in serves it (no KeyError), and
        C{provider_settings()}/C{environment()} cover it.
        """
        _as_builtin(self)
        upstream = StandInUpstream(reactor)
        upstream.listen(0, "127.0.0.1")
        self.addCleanup(upstream.stop)
        self.assertEqual(list(upstream.mounted), ["kimi", "gemini", "acme"])
        self.assertEqual([upstream.mounted[p].path for p in upstream.mounted], ["kimi/v1", "gemini/v1beta", "acme/v1"])
        self.assertIsInstance(upstream.mounted["acme"].dialect, OpenAIDialect)
        self.assertEqual(list(upstream.provider_settings()), ["kimi", "gemini", "acme"])
        self.assertEqual(upstream.environment()["ACME_API_KEY"], "acme-test-key")
        self.assertEqual(upstream.behaviour("acme").models, ["acme-chat"])
        # The two-provider names still work.
        self.assertIs(upstream.kimi, upstream.behaviour("kimi"))
        self.assertIs(upstream.gemini, upstream.behaviour("gemini"))

    def test_dialect_from_the_wire(self) -> None:
        """
        The dialect follows the adapter's wire, not its id.
        """
        upstream = StandInUpstream(reactor, providers=(KimiAdapter, ZetaAdapter))
        self.assertIsInstance(upstream.mounted["zeta"].dialect, GeminiDialect)
        self.assertEqual(upstream.mounted["zeta"].path, "zeta/v1beta")

        @attrs.define(kw_only=True)
        class Odd(OpenAICompatibleAdapter):
            id: ClassVar[str] = "odd"
            display_name: ClassVar[str] = "Odd"
            key_variables: ClassVar[tuple[str, ...]] = ("ODD_API_KEY",)
            base_url_variable: ClassVar[str] = "ODD_BASE_URL"
            default_base_url: ClassVar[str] = "https://odd.example"
            model_variable: ClassVar[str] = "ODD_MODEL"
            default_model_id: ClassVar[str] = "odd-1"
            wire: ClassVar[Any] = object()

        with self.assertRaises(ValueError) as caught:
            StandInUpstream(reactor, providers=(Odd,))
        self.assertIn("mount it with StandInUpstream.mount", str(caught.exception))

    def test_instances_of_schemas(self) -> None:
        """
        The arguments the stand-in makes up for a forced call are valid
        against the function's parameters: a tuple's items by position,
        a type beside an C{anyOf} or C{oneOf} held by the option taken
        (recheck s44: nulls for both).
        """
        tuple_ = {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "minItems": 2}
        self.assertEqual(standin.schema_instance(tuple_, tuple_, "t"), ["t", 0])
        one_of = {"type": "string", "oneOf": [{"maxLength": 3}, {"minLength": 9}]}
        self.assertEqual(standin.schema_instance(one_of, one_of, "text"), "tex")

    def test_command_line(self) -> None:
        """
        C{--key ID=KEY} and C{--mode ID=MODE}, repeatable, for every
        built-in; C{--kimi-key} and the like remain as aliases.
        """
        _as_builtin(self)
        args = standin._parse_args(
            ["--key", "acme=A", "--kimi-key", "K", "--mode", "acme=error", "--gemini-mode", "hang"]
        )
        self.assertEqual(dict(args.keys), {"acme": "A", "kimi": "K"})
        self.assertEqual(dict(args.modes), {"acme": "error", "gemini": "hang"})
        self.patch(sys, "stderr", open(os.devnull, "w"))  # noqa: SIM115 (closed with the process)
        for bad in (
            ["--key", "openai=x"],
            ["--mode", "kimi=sulk"],
            ["--key", "nokey"],
            # One key a provider: a second was dropped without a word (trial s40).
            ["--key", "kimi=a", "--key", "kimi=b"],
            ["--key", "kimi=a", "--kimi-key", "b"],
            ["--mode", "kimi=error", "--kimi-mode", "hang"],
        ):
            with self.assertRaises(SystemExit):
                standin._parse_args(bad)
        for bad in (["--rate-limited-model", "openai=gpt-4o"], ["--rate-limited-model", "gemini"]):
            with self.assertRaises(SystemExit):
                standin._parse_args(bad)
        limited = standin.upstream_from_args(
            reactor,
            standin._parse_args(
                ["--rate-limited-model", "gemini=gemini-2.5-pro", "--rate-limited-model", "gemini=gemini-2.0-flash"]
            ),
        )
        self.assertEqual(limited.gemini.rate_limited_models, {"gemini-2.5-pro", "gemini-2.0-flash"})
        self.assertEqual(limited.kimi.rate_limited_models, set())
        self.assertEqual(standin._parse_args([]).retry_after, 1.0)
        self.assertEqual(standin._parse_args(["--retry-after", "7"]).retry_after, 7.0)
        for bad in (["--retry-after", "-1"], ["--retry-after", "soon"], ["--retry-after", "1e9"]):
            with self.assertRaises(SystemExit):
                standin._parse_args(bad)

    @inlineCallbacks
    def test_command_line_models(self) -> Any:
        """
        From the command line every built-in lists its stand-in's models,
        then every other model its adapter prices (Beta's second model,
        Kimi's C{kimi-k2.5} as before), or the models C{--models ID=A,B}
        gives; the stand-in serves what it lists and 404s the rest.
        """
        import json
        import urllib.error
        import urllib.request

        _as_builtin(self, (*DECLARED, BetaAdapter))
        upstream = standin.upstream_from_args(reactor, standin._parse_args([]))
        self.assertEqual(upstream.behaviour("beta").models, ["beta-chat", "beta-reasoner"])
        self.assertEqual(upstream.behaviour("acme").models, ["acme-chat"])
        self.assertEqual(upstream.kimi.models, [*standin.default_kimi().models, "kimi-k2.5"])

        args = standin._parse_args(["--models", "beta=beta-reasoner, beta-mini", "--models", "kimi=kimi-k2.5"])
        upstream = standin.upstream_from_args(reactor, args)
        self.assertEqual(upstream.behaviour("beta").models, ["beta-reasoner", "beta-mini"])
        self.assertEqual(upstream.kimi.models, ["kimi-k2.5"])
        self.assertEqual(upstream.behaviour("acme").models, ["acme-chat"])
        port = upstream.listen(0, "127.0.0.1").getHost().port
        self.addCleanup(upstream.stop)
        key = upstream.behaviour("beta").key

        def call(path: str, body: Any = None) -> tuple[int, Any]:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}{path}",
                data=None if body is None else json.dumps(body).encode(),
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as e:
                with e:
                    return e.code, json.loads(e.read())

        status, listing = yield deferToThread(call, "/beta/models")
        self.assertEqual((status, [m["id"] for m in listing["data"]]), (200, ["beta-reasoner", "beta-mini"]))
        hello = [{"role": "user", "content": "Hello"}]
        status, answer = yield deferToThread(call, "/beta/chat/completions", {"model": "beta-mini", "messages": hello})
        self.assertEqual((status, answer["model"]), (200, "beta-mini"))
        status, _ = yield deferToThread(call, "/beta/chat/completions", {"model": "beta-chat", "messages": hello})
        self.assertEqual(status, 404)

        self.patch(sys, "stderr", open(os.devnull, "w"))  # noqa: SIM115 (closed with the process)
        for bad in (
            ["--models", "openai=gpt-4o"],
            ["--models", "beta"],
            ["--models", "beta=a,,b"],
            ["--models", "beta="],
        ):
            with self.assertRaises(SystemExit, msg=bad):
                standin._parse_args(bad)

    @inlineCallbacks
    def test_rate_limited_mode(self) -> Any:
        """
        C{--mode ID=rate_limited}: a 429 in the provider's own shape,
        asking for a retry after C{--retry-after} seconds (Kimi: the
        C{Retry-After} header; Gemini: C{RetryInfo}), whatever the key.
        """
        import json
        import urllib.error
        import urllib.request

        upstream = StandInUpstream(reactor)
        upstream.kimi.mode = upstream.gemini.mode = "rate_limited"
        upstream.kimi.retry_after = upstream.gemini.retry_after = 7.0
        port = upstream.listen(0, "127.0.0.1").getHost().port
        self.addCleanup(upstream.stop)

        def post(path: str, headers: dict[str, str]) -> tuple[int, str | None, Any]:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}{path}", data=b'{"messages": []}', headers=headers, method="POST"
            )
            try:
                urllib.request.urlopen(request, timeout=10)
            except urllib.error.HTTPError as e:
                with e:
                    return e.code, e.headers.get("Retry-After"), json.loads(e.read())
            raise AssertionError("no refusal")

        status, retry_after, document = yield deferToThread(
            post, "/kimi/v1/chat/completions", {"Authorization": f"Bearer {upstream.kimi.key}"}
        )
        self.assertEqual((status, retry_after), (429, "7"))
        self.assertEqual(document["error"]["type"], "rate_limit_reached_error")
        status, _, document = yield deferToThread(
            post, "/gemini/v1beta/models/gemini-2.5-flash:generateContent", {"x-goog-api-key": upstream.gemini.key}
        )
        self.assertEqual((status, document["error"]["status"]), (429, "RESOURCE_EXHAUSTED"))
        self.assertIn(
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}, document["error"]["details"]
        )

    def test_command_line_process(self) -> Deferred[None]:
        """
        C{python -m openclaw.testing.upstream} with a third built-in starts
        and prints the variables of all three.
        """
        script = (
            "import sys, openclaw.providers as p\n"
            "from tests.test_provider_plugin import AcmeAdapter\n"
            "p.BUILTIN_PROVIDERS = (*p.BUILTIN_PROVIDERS, AcmeAdapter)\n"
            "from twisted.internet.task import react\n"
            "from openclaw.testing.upstream import main\n"
            "react(main, ['--port', '0', '--quiet', '--key', 'acme=A1', '--mode', 'acme=error'])\n"
        )

        def run() -> str:
            process = subprocess.Popen(
                [sys.executable, "-c", script],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )
            assert process.stdout is not None
            lines = []
            try:
                for line in process.stdout:
                    lines.append(line)
                    if "ACME_API_KEY" in line:
                        break
            finally:
                process.terminate()
                process.wait(10)
                process.stdout.close()
            return "".join(lines)

        def check(out: str) -> None:
            for name in ("KIMI_BASE_URL", "GEMINI_BASE_URL", "ACME_BASE_URL", "ACME_API_KEY=A1"):
                self.assertIn(name, out)
            self.assertIn("/acme/v1", out)

        return deferToThread(run).addCallback(check)

    def test_port_taken(self) -> Deferred[None]:
        """
        A port the stand-in cannot listen on is one line and status 1, as
        the gateway says it, not a traceback (recheck s44).
        """
        import socket

        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "openclaw.testing.upstream", "--port", str(port)],
                capture_output=True,
                text=True,
                timeout=60,
            )

        def check(done: subprocess.CompletedProcess[str]) -> None:
            self.assertEqual(done.returncode, 1, done.stderr)
            self.assertEqual(
                done.stderr,
                f"python -m openclaw.testing.upstream: cannot listen on 127.0.0.1:{port}: Address already in use; "
                "choose another --port (0: any free one)\n",
            )

        return deferToThread(run).addCallback(check)


class FallbackOrderTests(SynchronousTestCase):
    """
    C{FALLBACK}: auto (declaration order), off, or an explicit list.
    """

    def registry(self, fallback: str, **changes: dict[str, Any]) -> ProviderRegistry:
        keyed = {p.id: {"api_key": f"{p.id}-key"} for p in DECLARED}
        for provider_id, change in changes.items():
            keyed[provider_id].update(change)
        settings = load_settings({"FALLBACK": fallback}, cwd=self.cwd(), providers=DECLARED)
        settings = attrs.evolve(settings, providers=changed_providers(settings.providers, **keyed))
        return ProviderRegistry.from_settings(settings, MemoryReactorClock())

    def cwd(self) -> Path:
        path = Path(self.mktemp())
        path.mkdir(parents=True)
        return path

    def targets(self, registry: ProviderRegistry) -> dict[str, str | None]:
        return {p: getattr(registry.fallback_for(p), "id", None) for p in registry.ids}

    def test_auto_is_declaration_order(self) -> None:
        self.assertEqual(self.targets(self.registry("auto")), {"kimi": "gemini", "gemini": "acme", "acme": "kimi"})

    def test_explicit_order(self) -> None:
        """
        A listed provider fails over to the next listed (wrapping); one not
        listed receives nothing and fails over to the list's first.
        """
        self.assertEqual(self.targets(self.registry("acme,kimi")), {"kimi": "acme", "gemini": "acme", "acme": "kimi"})
        # Skipped: without a usable key, or with an open breaker.
        registry = self.registry("acme, kimi ,gemini", acme={"api_key": None})
        self.assertEqual(self.targets(registry), {"kimi": "gemini", "gemini": "kimi", "acme": "kimi"})
        for _ in range(registry.get("gemini").breaker.threshold):
            registry.get("gemini").breaker.failed()
        self.assertEqual(registry.fallback_for("kimi"), None)

    def test_settings(self) -> None:
        cwd = self.cwd()
        self.assertEqual(load_settings({"FALLBACK": "OFF"}, cwd=cwd).fallback, "off")
        self.assertIsNone(load_settings({"FALLBACK": "off"}, cwd=cwd).fallback_order)
        self.assertEqual(load_settings({}, cwd=cwd).fallback_order, tuple(p.id for p in BUILTIN_PROVIDERS))
        self.assertEqual(load_settings({"FALLBACK": "gemini,kimi"}, cwd=cwd).fallback, ("gemini", "kimi"))
        with self.assertRaises(ConfigError) as caught:
            load_settings({"FALLBACK": "kimi,openai"}, cwd=cwd)
        message = str(caught.exception)
        self.assertIn("'openai', which is no provider", message)
        self.assertIn("from kimi, gemini", message)
        with self.assertRaises(ConfigError):
            load_settings({"FALLBACK": "kimi,kimi"}, cwd=cwd)
        with self.assertRaises(ValueError):
            Settings(fallback=("kimi", "openai"))


def _defaults(adapter: Any) -> Any:
    from openclaw.settings import ProviderSettings

    return ProviderSettings.defaults(adapter)


class DeclarationTests(SynchronousTestCase):
    """
    A provider declaration is checked when its class is made, and
    providers registered together must read different variables.
    """

    def test_missing_attribute(self) -> None:
        with self.assertRaises(ProviderDeclarationError) as caught:

            class Half(OpenAICompatibleAdapter):
                id: ClassVar[str] = "half"
                display_name: ClassVar[str] = "Half"
                key_variables: ClassVar[tuple[str, ...]] = ("HALF_API_KEY",)
                base_url_variable: ClassVar[str] = "HALF_BASE_URL"
                default_base_url: ClassVar[str] = "https://half.example/v1"
                default_model_id: ClassVar[str] = "half-1"

        self.assertIn("does not declare model_variable", str(caught.exception))

    def test_bad_id(self) -> None:
        for bad in ("Acme", "ac/me", "1acme", "ac_me"):
            with self.assertRaises(ProviderDeclarationError) as caught:
                type(
                    "Bad",
                    (AcmeAdapter,),
                    {"id": bad, "__module__": __name__},
                )
            self.assertIn("lower-case letters, digits and '-'", str(caught.exception))

    def test_base_classes_are_left_alone(self) -> None:
        class Base(OpenAICompatibleAdapter):
            """A base with helpers, no declaration."""

        self.assertFalse(hasattr(Base, "id"))

    def test_variable_collision(self) -> None:
        class Other(AcmeAdapter):
            id: ClassVar[str] = "other"
            key_variables: ClassVar[tuple[str, ...]] = ("ACME_API_KEY",)
            base_url_variable: ClassVar[str] = "OTHER_BASE_URL"
            model_variable: ClassVar[str] = "OTHER_MODEL"

        with self.assertRaises(ConfigError) as caught:
            load_settings({}, cwd=Path(self.mktemp()).parent, providers=(*DECLARED, Other))
        self.assertIn("providers 'acme' and 'other' both read ACME_API_KEY", str(caught.exception))
        with self.assertRaises(ProviderDeclarationError):
            Settings(providers=[_defaults(AcmeAdapter), _defaults(Other)], default_provider="acme")


CALLED = {
    "role": "assistant",
    "content": None,
    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}],
}
TOOL_LOOP = [{"role": "user", "content": "weather?"}, CALLED, {"role": "tool", "tool_call_id": "c1", "content": "sun"}]


class ReasoningKeptWireTests(SynchronousTestCase):
    """
    Kimi's rule for its thinking models (a C{reasoning_content} on every
    assistant message with tool calls) is a wire another OpenAI-compatible
    provider declares with its own list of thinking models, not a copy.
    """

    def sent(self, wire: Any, model: str, messages: list[Any]) -> list[Any]:
        chat = ChatRequest(body={"model": model, "messages": messages}, stream=False, include_usage=False)
        body = orjson.loads(wire.request_body(chat, model))
        self.assertEqual(body["model"], model)
        messages_sent: list[Any] = body["messages"]
        return messages_sent

    def test_another_providers_thinking_models(self) -> None:
        wire = ReasoningKeptWire(thinks=lambda model: model.startswith("beta-reasoner"))
        sent = self.sent(wire, "beta-reasoner", TOOL_LOOP)
        self.assertEqual(sent[1], {**CALLED, "reasoning_content": REASONING_PLACEHOLDER})
        self.assertEqual((sent[0], sent[2]), (TOOL_LOOP[0], TOOL_LOOP[2]))
        self.assertNotIn("reasoning_content", CALLED)
        # Kept reasoning goes as it is; whitespace only is none.
        kept = {**CALLED, "reasoning_content": "I should call w."}
        self.assertEqual(self.sent(wire, "beta-reasoner", [kept])[0], kept)
        blank = {**CALLED, "reasoning_content": "  "}
        self.assertEqual(self.sent(wire, "beta-reasoner", [blank])[0]["reasoning_content"], REASONING_PLACEHOLDER)
        # Not a thinking model: untouched.
        self.assertEqual(self.sent(wire, "beta-chat", TOOL_LOOP), TOOL_LOOP)
        # A placeholder of the provider's own.
        own = ReasoningKeptWire(thinks=lambda model: True, placeholder="(none)")
        self.assertEqual(self.sent(own, "x", TOOL_LOOP)[1]["reasoning_content"], "(none)")

    def test_kimi_declares_it(self) -> None:
        """
        Kimi's wire is this one with Kimi's rule: its C{kimi-*} models get
        the placeholder, C{moonshot-v1-*} do not.
        """
        self.assertIsInstance(KimiAdapter.wire, ReasoningKeptWire)
        for model in ("kimi-k2.5", "Kimi-K2-Thinking", "kimi-k2-0905-preview"):
            self.assertEqual(
                self.sent(KimiAdapter.wire, model, TOOL_LOOP)[1]["reasoning_content"], REASONING_PLACEHOLDER
            )
        self.assertEqual(self.sent(KimiAdapter.wire, "moonshot-v1-8k", TOOL_LOOP), TOOL_LOOP)


class ListingHintTests(TestCase):
    """
    An OpenAI-compatible listing without its C{data} list is answered with
    a hint naming the provider's own documented base URL, not a C{/v1}
    that Beta's (as DeepSeek's) does not have.
    """

    timeout = 20

    @inlineCallbacks
    def test_names_the_documented_base_url(self) -> Any:
        upstream = StandInUpstream(reactor, providers=(*KIMI_AND_GEMINI, BetaAdapter))
        upstream.listen(0, "127.0.0.1")
        self.addCleanup(upstream.stop)
        registry = ProviderRegistry.from_settings(Settings(providers=upstream.provider_settings()), reactor)
        self.addCleanup(registry.close)
        for adapter in (BetaAdapter, KimiAdapter):
            behaviour = upstream.behaviour(adapter.id)
            behaviour.mode, behaviour.error_status, behaviour.error_body = "error", 200, {"object": "list"}
            result = yield registry.probe(adapter.id)
            self.assertFalse(result.ok)
            self.assertIn(
                f'models listing has no "data" list; does {adapter.base_url_variable} point at '
                f"{adapter.display_name}'s API (such as {adapter.default_base_url})?",
                result.error,
            )
            self.assertNotIn("ending in /v1", result.error)


class RefusalTests(TestCase):
    """
    The probe reads a refusal as the adapter's C{refusal} does: Google's
    400 C{API_KEY_INVALID} is Gemini's rule only.
    """

    timeout = 20

    def setUp(self) -> None:
        self.upstream = StandInUpstream(reactor)
        self.upstream.listen(0, "127.0.0.1")
        self.addCleanup(self.upstream.stop)
        self.registry = ProviderRegistry.from_settings(Settings(providers=self.upstream.provider_settings()), reactor)
        self.addCleanup(self.registry.close)

    @inlineCallbacks
    def test_kimi_400_mentioning_api_key_is_not_a_bad_key(self) -> Any:
        kimi = self.upstream.kimi
        kimi.mode, kimi.error_status = "error", 400
        kimi.error_message = "Invalid request: the api key field of the tool is malformed"
        result = yield self.registry.probe("kimi")
        self.assertFalse(result.ok)
        self.assertNotIn("check KIMI_API_KEY", result.error)
        self.assertEqual(list(self.registry.get("kimi").keys.states().values()), ["ok"])

    @inlineCallbacks
    def test_gemini_key_invalid_is_set_aside(self) -> Any:
        self.upstream.gemini.invalid_keys.add(self.upstream.gemini.key)
        result = yield self.registry.probe("gemini")
        self.assertFalse(result.ok)
        self.assertIn("check GEMINI_API_KEY", result.error)
        self.assertEqual(list(self.registry.get("gemini").keys.states().values()), ["set_aside"])

    @inlineCallbacks
    def test_kimi_invalid_key_is_set_aside(self) -> Any:
        self.upstream.kimi.invalid_keys.add(self.upstream.kimi.key)
        result = yield self.registry.probe("kimi")
        self.assertIn("check KIMI_API_KEY", result.error)
        self.assertEqual(list(self.registry.get("kimi").keys.states().values()), ["set_aside"])


class MissingKeyTests(SynchronousTestCase):
    """
    No key is an error the caller can report, not an assertion (which
    C{python -O} would strip).
    """

    def test_post_chat(self) -> None:
        adapter = bare_adapter(KimiAdapter, api_key=None)
        with self.assertRaises(MissingKey) as caught:
            adapter.post_chat("m", b"{}", stream=False)
        self.assertEqual(str(caught.exception), "KIMI_API_KEY is not set")

    def test_get_json(self) -> None:
        adapter = bare_adapter(GeminiAdapter, api_key=None)
        d = Deferred.fromCoroutine(adapter.get_json("models", Exchange(started=0.0)))
        self.failureResultOf(d, MissingKey)


class PriceTests(SynchronousTestCase):
    """
    Prices ship with each provider's module; PRICES_FILE still wins.
    """

    def test_shipped(self) -> None:
        prices = shipped_prices()
        self.assertEqual(prices["kimi/moonshot-v1-8k"], Price(0.20, 2.00))
        self.assertEqual(prices["gemini/gemini-2.5-flash"], Price(0.30, 2.50, 0.075))
        self.assertEqual({name.split("/")[0] for name in prices}, {p.id for p in BUILTIN_PROVIDERS})
        self.assertEqual(PriceTable().prices, prices)
        _as_builtin(self)
        self.assertEqual(shipped_prices()["acme/acme-chat"], Price(0.5, 1.5))

    def test_override(self) -> None:
        table = PriceTable.with_overrides({"kimi/moonshot-v1-8k": Price(9.0, 9.0)}, DECLARED)
        self.assertEqual(table.prices["kimi/moonshot-v1-8k"], Price(9.0, 9.0))
        self.assertEqual(table.prices["acme/acme-chat"], Price(0.5, 1.5))
