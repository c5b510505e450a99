"""
The provider plug-in point, proven with a provider the gateway does not
ship: "acme" (a made-up OpenAI-compatible provider), defined here only, as
a new provider module would define it.  Nothing under C{openclaw/} names
it; declaring it is enough for its settings to be read, for the stand-in
to serve it, for the gateway to route to it, fail over to it in the order
FALLBACK gives, probe it, list its models and count its requests, and for
a gateway without its key to treat it as not configured rather than broken,
and for a tool type of its own (C{acme_index}, declared by its wire) to be
checked by its rules and taken by it alone, while it refuses Moonshot's
built-in tools without knowing anything of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import attrs
import openai
import orjson
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

import openclaw
from openclaw.consumers.prices import Price
from openclaw.ctl import format_status
from openclaw.dataplane.call import encode_request
from openclaw.dataplane.errors import APIError, bad_request
from openclaw.dataplane.request import ChatRequest, parse_chat_request
from openclaw.providers import GeminiAdapter, KimiAdapter, OpenAICompatibleAdapter
from openclaw.providers.kimi import MoonshotVideo
from openclaw.providers.openai_compatible import OpenAIWire
from openclaw.providers.wire import OfferedTools, Wire
from openclaw.settings import ConfigError, Settings, load_settings
from openclaw.testing.upstream import ProviderBehaviour, StandInUpstream, default_kimi
from tests.support import (
    KIMI_AND_GEMINI,
    RunningGateway,
    capture_log_events,
    get_text,
    open_client,
    openai_client,
    start_gateway_from,
)


@attrs.frozen
class AcmeIndex:
    """
    Acme's own kind of tool, C{{"type": "acme_index", "acme_index":
    {"name": "<index>"}}}: a search of one of its indexes, which Acme runs
    itself, called as C{acme_index.<index>}.
    """

    name: ClassVar[str] = "acme_index"
    described: ClassVar[str] = "one of Acme's index searches"
    offered: ClassVar[str] = 'for an acme model, an Acme index: {"type": "acme_index", "acme_index": {"name": ...}}'
    offered_call: ClassVar[str] = 'for an acme model, a call of an Acme index, "type": "acme_index"'

    def check_declaration(self, tool: dict[str, Any], where: str) -> str:
        index = tool.get("acme_index")
        name = index.get("name") if isinstance(index, dict) else None
        if not isinstance(name, str) or not name.isalnum():
            raise bad_request(f"{where}.acme_index.name must name an Acme index", param=f"{where}.acme_index.name")
        return f"acme_index.{name}"

    def check_call_name(self, name: str, at: str) -> None:
        if not name.startswith("acme_index."):
            raise bad_request(f"{at}.function.name must name an Acme index", param=f"{at}.function.name")

    def function_refusal(self, name: str, at: str, called: bool) -> str | None:
        return None

    def legacy_call_refusal(self, at: str) -> str:
        return f"{at}: an Acme index's call goes in tool_calls"


ACME_INDEX = {"type": "acme_index", "acme_index": {"name": "docs"}}
WEB_SEARCH = {"type": "builtin_function", "function": {"name": "$web_search"}}


@attrs.define(kw_only=True)
class AcmeAdapter(OpenAICompatibleAdapter):
    """
    A made-up OpenAI-compatible API: the whole of a provider module.
    """

    id: ClassVar[str] = "acme"
    display_name: ClassVar[str] = "Acme"
    key_variables: ClassVar[tuple[str, ...]] = ("ACME_API_KEY",)
    base_url_variable: ClassVar[str] = "ACME_BASE_URL"
    default_base_url: ClassVar[str] = "https://api.acme.example/v1"
    model_variable: ClassVar[str] = "ACME_MODEL"
    default_model_id: ClassVar[str] = "acme-chat"
    prices: ClassVar[Mapping[str, Price]] = MappingProxyType({"acme-chat": Price(0.5, 1.5)})
    #: OpenAI's format, with its own kind of tool beside functions.
    wire: ClassVar[Wire] = OpenAIWire(tool_types=(AcmeIndex(),))


#: What the gateway is built with: Kimi, Gemini and this one, pinned
#: (not read from BUILTIN_PROVIDERS) so that a built-in provider added
#: later changes none of these expectations.
DECLARED = (*KIMI_AND_GEMINI, AcmeAdapter)

ACME_KEY = "sk-acme-SECRET-0123456789"
GATEWAY_KEY = "gw-key-0123456789abcdef"
HELLO = [{"role": "user", "content": "Hello"}]


@attrs.frozen
class AcmeDoc:
    """
    Acme's own kind of content part, C{{"type": "acme_doc", "acme_doc":
    {"id": "<document>"}}}: a document in Acme's store, which Acme reads
    itself.
    """

    name: ClassVar[str] = "acme_doc"
    described: ClassVar[str] = "an acme_doc part (a document in Acme's store)"
    taken_by: ClassVar[str] = "Acme's models"
    instead: ClassVar[str] = "send the document as a file part"

    def check(self, value: dict[str, Any], where: str) -> None:
        if not isinstance(value.get("id"), str) or not value["id"].isalnum():
            raise bad_request(f"{where}.id must name an Acme document", param=f"{where}.id")


#: A made-up OpenAI-compatible provider's wire that takes Moonshot's
#: video_url parts too (its declaration's, not Kimi's), and one with a part
#: type of its own.
VIDEO_WIRE = OpenAIWire(part_types=(MoonshotVideo(),))
DOC_WIRE = OpenAIWire(part_types=(AcmeDoc(),))
VIDEO = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAAIGZ0eXBpc29t"}}


class MediaKindsTests(SynchronousTestCase):
    """
    The content part types and URL schemes a wire declares
    (L{Wire.part_types}, L{Wire.url_schemes}) are checked at the door by
    their own rules and taken by the providers that declare them; any
    other provider refuses them with a 400 naming the part and the
    providers that take them, knowing nothing of them.
    """

    def setUp(self) -> None:
        self.offered = OfferedTools.of(
            [("kimi", KimiAdapter.wire), ("gemini", GeminiAdapter.wire), ("acme", DOC_WIRE), ("vidi", VIDEO_WIRE)]
        )

    def chat(self, *parts: dict[str, Any]) -> ChatRequest:
        messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, *parts]}]
        return parse_chat_request(orjson.dumps({"messages": messages}), None, self.offered.types, self.offered.media)

    def refusal(self, wire: Wire, provider_id: str, chat: ChatRequest) -> dict[str, Any]:
        with self.assertRaises(APIError) as caught:
            encode_request(wire, chat, "m-1", provider_id, self.offered)
        error: dict[str, Any] = orjson.loads(caught.exception.body())["error"]
        return error

    def test_declared_video_taken(self) -> None:
        """
        A provider declaring video_url takes it, as sent, as Kimi does;
        those that do not name both.
        """
        chat = self.chat(VIDEO)
        for provider_id, wire in (("vidi", VIDEO_WIRE), ("kimi", KimiAdapter.wire)):
            body = orjson.loads(encode_request(wire, chat, "m-1", provider_id, self.offered))
            self.assertEqual(body["messages"][0]["content"][1], VIDEO)
        for provider_id, wire in (("acme", DOC_WIRE), ("gemini", GeminiAdapter.wire)):
            error = self.refusal(wire, provider_id, chat)
            self.assertEqual(error["param"], "messages[0].content[1]")
            self.assertIn(
                "is a video_url part (Moonshot's video input), which only kimi models and vidi models take, not "
                f'{provider_id} on this gateway: send this conversation to a kimi model (model "kimi/<model>") or '
                'a vidi model (model "vidi/<model>")',
                error["message"],
            )
        # An ms:// URL is Kimi's alone: the video provider refuses it.
        error = self.refusal(VIDEO_WIRE, "vidi", self.chat({"type": "video_url", "video_url": {"url": "ms://abc"}}))
        self.assertEqual(error["param"], "messages[0].content[1].video_url.url")
        self.assertIn("is an ms:// URL (a file uploaded to Moonshot), which only Kimi's", error["message"])

    def test_own_part_type(self) -> None:
        """
        A part type of Acme's own: checked by its rules at the door, taken
        by Acme, refused by Kimi and Gemini; unknown when no provider
        declares it.
        """
        doc = {"type": "acme_doc", "acme_doc": {"id": "report7"}}
        chat = self.chat(doc)
        body = orjson.loads(encode_request(DOC_WIRE, chat, "m-1", "acme", self.offered))
        self.assertEqual(body["messages"][0]["content"][1], doc)
        for provider_id, wire in (("kimi", KimiAdapter.wire), ("gemini", GeminiAdapter.wire)):
            error = self.refusal(wire, provider_id, chat)
            self.assertEqual(
                error["message"],
                "messages[0].content[1] is an acme_doc part (a document in Acme's store), which only Acme's models "
                f"take, not {provider_id} on this gateway: send this conversation to an acme model (model "
                f'"acme/<model>"), or, for {provider_id}, send the document as a file part',
            )
        with self.assertRaises(APIError) as caught:
            self.chat({"type": "acme_doc", "acme_doc": {"id": "a b"}})
        self.assertIn("messages[0].content[1].acme_doc.id must name an Acme document", caught.exception.message)
        with self.assertRaises(APIError) as caught:
            parse_chat_request(orjson.dumps({"messages": [{"role": "user", "content": [doc]}]}))
        self.assertIn("must be one of file, image_url, input_audio, text here", caught.exception.message)


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
        self.assertEqual(settings.provider_ids, tuple(p.id for p in DECLARED))
        acme = settings.providers["acme"]
        self.assertIs(acme.adapter, AcmeAdapter)
        self.assertEqual(
            (acme.base_url, acme.model, acme.api_key),
            ("https://api.acme.example/v1", "acme-chat", None),
        )
        self.assertEqual(settings.default_provider, "gemini")

    def test_environment_and_env_file(self) -> None:
        """
        Its variables come from the environment and the env file, as every
        other setting does; its key stays out of C{repr()}.
        """
        (self.cwd / ".env").write_text("ACME_MODEL=acme-reasoner\nACME_BASE_URL=http://127.0.0.1:9/acme/v1/\n")
        self.environ["ACME_API_KEY"] = ACME_KEY
        self.environ["DEFAULT_PROVIDER"] = "acme"
        settings = self.load()
        acme = settings.providers["acme"]
        self.assertEqual(
            (acme.base_url, acme.model, acme.api_key),
            ("http://127.0.0.1:9/acme/v1", "acme-reasoner", ACME_KEY),
        )
        self.assertEqual((settings.default_provider, settings.default_model("acme")), ("acme", "acme-reasoner"))
        self.assertNotIn(ACME_KEY, repr(settings))

    def test_bad_values_name_its_variables(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.load(ACME_BASE_URL="ftp://example")
        self.assertIn("ACME_BASE_URL", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            self.load(DEFAULT_PROVIDER="openai")
        self.assertIn("use kimi, gemini or acme", str(caught.exception))

    def test_undeclared_is_unknown(self) -> None:
        """
        Without its declaration, the built-in gateway knows no Acme.
        """
        with self.assertRaises(ConfigError):
            load_settings({"DEFAULT_PROVIDER": "acme"}, cwd=self.cwd)

    def test_nothing_in_the_package_names_it(self) -> None:
        """
        Neither its class nor any of its variables is named in the package
        (the word "acme" itself appears there in examples).
        """
        package = Path(openclaw.__file__).parent
        named = [
            str(path)
            for path in package.rglob("*.py")
            if any(name in path.read_text() for name in ("AcmeAdapter", "ACME_", "test_provider_plugin"))
        ]
        self.assertEqual(named, [])


class GatewayTests(TestCase):
    """
    A gateway on real ports built with the built-in providers and Acme,
    all served by one stand-in built with the same declarations: Acme
    mounted generically, at C{/acme/v1} (its default base URL's last
    segment) in OpenAI's dialect (its wire), with a key of its own.
    """

    timeout = 30

    def setUp(self) -> None:
        self.events = capture_log_events(self)
        self.upstream = StandInUpstream(
            reactor,
            providers=DECLARED,
            behaviours={
                "kimi": default_kimi("sk-kimi-0123456789"),
                "acme": ProviderBehaviour(key=ACME_KEY, models=["acme-chat", "acme-reasoner"], owned_by="acme"),
            },
        )
        self.upstream.listen(0, "127.0.0.1")
        self.addCleanup(self.upstream.stop)
        self.acme = self.upstream.behaviour("acme")

    def gateway(self, **options: str) -> RunningGateway:
        """
        A gateway whose settings are read as the daemon reads them, from
        the variables that point every declared provider at the stand-in.
        """
        cwd = Path(self.mktemp())
        cwd.mkdir(parents=True)
        variables = {**self.upstream.environment(DECLARED), "GATEWAY_API_KEYS": GATEWAY_KEY, **options}
        settings = load_settings(variables, cwd=cwd, providers=DECLARED)
        return start_gateway_from(self, settings)

    def sdk(self, gateway: RunningGateway) -> openai.OpenAI:
        client: openai.OpenAI = openai_client(self, gateway.api_port, GATEWAY_KEY)
        return client

    def get(self, gateway: RunningGateway, path: str) -> Any:
        return get_text(gateway.api_port, path)

    @inlineCallbacks
    def test_chat_by_name_and_after_switch(self):
        """
        C{"acme/<model>"} reaches it for one call; after
        C{switch_provider acme} every call does, streamed or not.
        """
        gateway = self.gateway()
        client = self.sdk(gateway)
        raw = yield deferToThread(
            client.chat.completions.with_raw_response.create, model="acme/acme-reasoner", messages=HELLO
        )
        self.assertEqual(raw.headers["x-openclaw-provider"], "acme")
        completion = raw.parse()
        self.assertEqual(completion.model, "acme-reasoner")
        self.assertEqual(completion.choices[0].message.content, self.acme.reply)
        self.assertEqual(self.acme.last_body["model"], "acme-reasoner")
        self.assertEqual(self.acme.uris, ["/acme/v1/chat/completions"])
        self.assertEqual(gateway.service.route.current.provider_id, "gemini")

        control = yield open_client(self, gateway.port)
        answer = yield control.command(gateway.token, "switch_provider", {"provider": "acme"})
        self.assertTrue(answer["ok"], answer)
        self.assertEqual(answer["result"], {"previous": "gemini", "active": "acme", "model": "acme-chat"})
        status = yield control.command(gateway.token, "status")
        self.assertEqual(status["result"]["provider"], "Acme")

        completion = yield deferToThread(client.chat.completions.create, model="gpt-4o", messages=HELLO)
        self.assertEqual(completion.model, "acme-chat")

        def streamed() -> str:
            chunks = client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
            return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)

        text = yield deferToThread(streamed)
        self.assertEqual(text, self.acme.reply)
        self.assertEqual(self.acme.requests, 3)
        self.assertEqual((self.upstream.kimi.requests, self.upstream.gemini.requests), (0, 0))

    @inlineCallbacks
    def test_default_provider(self):
        gateway = self.gateway(DEFAULT_PROVIDER="acme", ACME_MODEL="acme-reasoner")
        completion = yield deferToThread(self.sdk(gateway).chat.completions.create, model="x", messages=HELLO)
        self.assertEqual(completion.model, "acme-reasoner")
        self.assertEqual(self.acme.requests, 1)

    @inlineCallbacks
    def test_health_check_models_and_metrics(self):
        gateway = self.gateway(DEFAULT_PROVIDER="acme")
        control = yield open_client(self, gateway.port)
        answer = yield control.command(gateway.token, "health_check")
        self.assertTrue(answer["ok"], answer)
        result = answer["result"]
        self.assertEqual(list(result["providers"]), [p.id for p in DECLARED])
        self.assertEqual(result["active"], "acme")
        entry = result["providers"]["acme"]
        self.assertIsInstance(entry.pop("latency_ms"), float)
        self.assertEqual(len(entry.pop("keys")), 1)
        self.assertEqual(
            entry, {"ok": True, "status": 200, "models": 2, "active_model_available": True, "breaker": "closed"}
        )
        self.assertNotIn(ACME_KEY, json.dumps(answer))

        page = yield deferToThread(self.sdk(gateway).models.list)
        self.assertEqual([m.id for m in page], ["acme-chat", "acme-reasoner"])
        self.assertEqual({m.owned_by for m in page}, {"acme"})

        text = yield self.get(gateway, "/metrics")
        # The probe and the listing, both GET /models.
        self.assertIn('openclaw_upstream_requests_total{provider="acme",status="200"} 2.0', text)
        self.assertIn('openclaw_provider_up{provider="acme"} 1.0', text)
        self.assertIn('openclaw_api_requests_total{provider="acme",status="200"} 1.0', text)

    @inlineCallbacks
    def test_upstream_requests_counted_by_sender(self):
        """
        A provider's requests are counted under it even when another
        provider's base URL is a prefix of its URLs (one egress proxy for
        both, C{/acme} and C{/acme/v1}): each adapter's agent counts what
        it sends, not what its URL looks like.
        """
        acme = self.upstream.environment(DECLARED)["ACME_BASE_URL"]
        gateway = self.gateway(KIMI_BASE_URL=acme.removesuffix("/v1"))
        client = self.sdk(gateway)
        yield deferToThread(client.chat.completions.create, model="acme/acme-chat", messages=HELLO)
        text = yield self.get(gateway, "/metrics")
        self.assertIn('openclaw_upstream_requests_total{provider="acme",status="200"} 1.0', text)
        self.assertNotIn('openclaw_upstream_requests_total{provider="kimi"', text)

    @inlineCallbacks
    def test_key_missing(self):
        """
        Without its key, calls are refused naming its variable, and nothing
        is sent.
        """
        gateway = self.gateway(ACME_API_KEY="")
        client = self.sdk(gateway)
        failure = yield self.assertFailure(
            deferToThread(client.chat.completions.create, model="acme/acme-chat", messages=HELLO),
            openai.APIStatusError,
        )
        self.assertEqual(failure.status_code, 503)
        self.assertIn("ACME_API_KEY is not set", failure.message)
        self.assertEqual(self.acme.requests, 0)

    def test_stand_in_serves_it_generically(self):
        """
        The stand-in built with the declarations serves each at
        C{<id>/<last segment of its default base URL>}, in the dialect of
        its wire; C{environment()} points every one of them there.
        """
        self.assertEqual(
            {provider_id: mounted.path for provider_id, mounted in self.upstream.mounted.items()},
            {"kimi": "kimi/v1", "gemini": "gemini/v1beta", "acme": "acme/v1"},
        )
        environment = self.upstream.environment()
        self.assertEqual(environment["ACME_BASE_URL"], f"http://127.0.0.1:{self.upstream.port}/acme/v1")
        self.assertEqual(environment["ACME_API_KEY"], ACME_KEY)
        self.assertEqual(environment["GEMINI_API_KEY"], "gemini-test-key")

    @inlineCallbacks
    def test_fallback_order_includes_it(self):
        """
        C{FALLBACK=kimi,acme,gemini}: a call failing on Kimi goes to Acme,
        the next in that list (C{auto} would have sent it to Gemini).
        """
        self.upstream.kimi.mode = "error"
        gateway = self.gateway(DEFAULT_PROVIDER="kimi", FALLBACK="kimi,acme,gemini")
        raw = yield deferToThread(
            self.sdk(gateway).chat.completions.with_raw_response.create, model="gpt-4o", messages=HELLO
        )
        self.assertEqual(raw.headers["x-openclaw-provider"], "acme")
        self.assertEqual(raw.parse().model, "acme-chat")
        self.assertEqual((self.upstream.kimi.requests, self.acme.requests, self.upstream.gemini.requests), (1, 1, 0))

    @inlineCallbacks
    def test_without_its_key_it_is_not_configured(self):
        """
        Acme without a key: no start-up warning, no probe, no
        C{openclaw_provider_up} series, and status and health_check say
        "not configured"; named in FALLBACK, it is warned about.
        """
        gateway = self.gateway(ACME_API_KEY="")
        warned = [e for e in self.events if "ACME_API_KEY" in str(e.get("missing", ""))]
        self.assertEqual(warned, [])
        control = yield open_client(self, gateway.port)
        status = yield control.command(gateway.token, "status")
        self.assertEqual(status["result"]["providers"]["acme"], {"breaker": "closed", "keys": {}, "configured": False})
        self.assertIn("acme not configured", format_status(status["result"]))
        answer = yield control.command(gateway.token, "health_check")
        entry = answer["result"]["providers"]["acme"]
        self.assertEqual((entry["ok"], entry["configured"], entry["error"]), (False, False, "ACME_API_KEY is not set"))
        self.assertEqual(self.acme.requests, 0)
        text = yield self.get(gateway, "/metrics")
        self.assertNotIn('openclaw_provider_up{provider="acme"}', text)
        self.assertIn('openclaw_provider_up{provider="kimi"} 1.0', text)

        self.events.clear()
        self.gateway(ACME_API_KEY="", FALLBACK="gemini,acme")
        warned = [e for e in self.events if "ACME_API_KEY" in str(e.get("missing", ""))]
        self.assertEqual(len(warned), 1, warned)

    @inlineCallbacks
    def test_its_shipped_prices(self):
        """
        The prices its module declares are in the table calls are priced by.
        """
        gateway = self.gateway()
        self.assertEqual(gateway.service.consumers.prices.prices["acme/acme-chat"], Price(0.5, 1.5))
        yield None

    @inlineCallbacks
    def test_media_kinds(self):
        """
        Moonshot's media inputs, a C{video_url} part and an C{ms://} image
        URL (declared by Kimi's wire alone), are refused by Acme, whose
        declaration names none of them, with a 400 naming the part and the
        provider that takes them, whole and streamed, before anything is
        sent (they were forwarded to Acme, whose API would answer a
        confusing 400 of its own, or fetch nothing); Kimi takes them as
        sent; and a Kimi call holding one is not failed over to Acme.
        """
        gateway = self.gateway()
        client = self.sdk(gateway)
        video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAAIGZ0eXBpc29t"}}
        file_image = {"type": "image_url", "image_url": {"url": "ms://cn0787ce2sgfp2q3ckl0"}}
        for part, param, words in (
            (
                video,
                "messages[0].content[1]",
                "messages[0].content[1] is a video_url part (Moonshot's video input), which only Kimi's vision "
                'models take, not acme on this gateway: send this conversation to a kimi model (model "kimi/<model>"), '
                "or, for acme, leave videos out",
            ),
            (
                file_image,
                "messages[0].content[1].image_url.url",
                "messages[0].content[1].image_url.url is an ms:// URL (a file uploaded to Moonshot), which only "
                "Kimi's vision models take, not acme on this gateway: send this conversation to a kimi model",
            ),
        ):
            messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
            for stream in (False, True):
                with self.assertRaises(openai.BadRequestError) as caught:
                    yield deferToThread(
                        client.chat.completions.create, model="acme/acme-chat", messages=messages, stream=stream
                    )
                error = caught.exception.body
                self.assertEqual(error["param"], param)
                self.assertIn(words, error["message"])
            self.assertEqual(self.acme.requests, 0)
            yield deferToThread(client.chat.completions.create, model="kimi/moonshot-v1-8k", messages=messages)
            self.assertEqual(self.upstream.kimi.last_body["messages"], messages)
        # Not failed over from Kimi to Acme: Kimi's failure is the answer.
        self.upstream.kimi.mode = "error"
        failing = self.gateway(DEFAULT_PROVIDER="kimi", FALLBACK="kimi,acme")
        messages = [{"role": "user", "content": [{"type": "text", "text": "What happens here?"}, video]}]
        with self.assertRaises(openai.APIStatusError) as caught:
            yield deferToThread(self.sdk(failing).chat.completions.create, model="gpt-4o", messages=messages)
        self.assertEqual(caught.exception.status_code, 502)
        self.assertIn(
            "(not failed over to acme: it cannot take this request: messages[0].content[1] is a video_url part",
            caught.exception.body["message"],
        )
        self.assertEqual(self.acme.requests, 0)

    @inlineCallbacks
    def test_tool_types(self):
        """
        Each provider takes the tool types its wire declares, checked by
        their own rules at the door, and refuses the others with a 400
        naming the field and the providers that take it: Acme refuses
        Moonshot's built-in tools (nothing in its declaration names them),
        Kimi and Gemini refuse Acme's indexes; nothing is sent.
        """
        gateway = self.gateway()
        client = self.sdk(gateway)
        call = {"id": "c1", "type": "builtin_function", "function": {"name": "$web_search", "arguments": "{}"}}
        searched = [*HELLO, {"role": "assistant", "content": None, "tool_calls": [call]}]
        searched.append({"role": "tool", "tool_call_id": "c1", "content": "{}"})
        moonshot = (
            "$web_search, one of Moonshot's built-in tools (type builtin_function), which acme does not take: "
            'send this conversation to a kimi model (model "kimi/<model>")'
        )
        index = (
            "acme_index.docs, one of Acme's index searches (type acme_index), which {} does not take: send this "
            'conversation to an acme model (model "acme/<model>")'
        )
        for model, body, param, words in (
            ("acme/acme-chat", {"tools": [WEB_SEARCH]}, "tools[0]", f"tools[0] declares {moonshot}"),
            ("acme/acme-chat", {"messages": searched}, "messages[1].tool_calls[0]", f"calls {moonshot}"),
            ("kimi/moonshot-v1-8k", {"tools": [ACME_INDEX]}, "tools[0]", index.format("kimi")),
            ("gemini/gemini-2.5-flash", {"tools": [ACME_INDEX]}, "tools[0]", index.format("gemini")),
        ):
            kwargs = {"model": model, "messages": HELLO, **body}
            with self.assertRaises(openai.BadRequestError) as caught:
                yield deferToThread(client.chat.completions.create, **kwargs)
            error = caught.exception.body
            self.assertEqual(error["param"], param, model)
            self.assertIn(words, error["message"])
        # The Acme index's own rules, at the door, whichever the model.
        bad = {"type": "acme_index", "acme_index": {"name": "a b"}}
        with self.assertRaises(openai.BadRequestError) as caught:
            yield deferToThread(client.chat.completions.create, model="kimi/x", messages=HELLO, tools=[bad])
        self.assertEqual(caught.exception.body["param"], "tools[0].acme_index.name")
        # A type no provider declares names every one that is.
        with self.assertRaises(openai.BadRequestError) as caught:
            yield deferToThread(client.chat.completions.create, model="x", messages=HELLO, tools=[{"type": "x"}])
        self.assertIn("for an acme model, an Acme index", caught.exception.body["message"])
        self.assertIn("for a kimi model, one of Moonshot's built-in tools", caught.exception.body["message"])
        self.assertEqual((self.acme.requests, self.upstream.kimi.requests, self.upstream.gemini.requests), (0, 0, 0))
        # Acme takes its own, as sent.
        yield deferToThread(client.chat.completions.create, model="acme/acme-chat", messages=HELLO, tools=[ACME_INDEX])
        self.assertEqual(self.acme.last_body["tools"], [ACME_INDEX])
