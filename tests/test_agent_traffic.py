"""
Agent traffic through the data plane (#14), as an agent sends it: the
official openai SDK against a gateway in this process, in front of the
stand-in upstream, all on 127.0.0.1.  Tool loops on each provider, whole
and streamed, and across a switch_provider; parallel calls; named
tool_choice; images; structured output; reasoning usage; embeddings; and
every 400 of the contract.  The stand-in records each body it receives, so
the translated requests are asserted on as Gemini and Kimi got them.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import urllib.error
import urllib.request
from typing import Any, ClassVar

import openai
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher

from openclaw.providers.gemini import translate as gemini_translate
from openclaw.providers.gemini.callids import carried
from openclaw.providers.gemini.embeddings import unit_length
from openclaw.providers.gemini.translate import SKIP_SIGNATURE
from openclaw.providers.openai_compatible import REASONING_PLACEHOLDER
from openclaw.testing.upstream import GeminiAnswer, OpenAIAnswer, schema_instance
from tests.support import capture_log_events, open_client
from tests.test_dataplane import DataPlaneTestCase

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": ["string", "null"], "enum": ["celsius", "fahrenheit", None]},
        "where": {"$ref": "#/$defs/place"},
    },
    "required": ["city"],
    "additionalProperties": False,
    "$defs": {"place": {"type": "object", "properties": {"lat": {"type": "number"}}, "additionalProperties": False}},
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER_SCHEMA, "strict": True},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
PARIS = {"city": "Paris"}
GEMINI_CALL = GeminiAnswer(
    (({"functionCall": {"name": "get_weather", "args": PARIS, "id": "fc-1"}, "thoughtSignature": "sig-A"},),),
    usage={"promptTokenCount": 20, "candidatesTokenCount": 5, "thoughtsTokenCount": 7, "totalTokenCount": 32},
)
SUNNY = GeminiAnswer((({"text": "Sunny"},), ({"text": " in Paris."},)))
KIMI_CALL = OpenAIAnswer(tool_calls=({"id": "get_weather:0", "name": "get_weather", "arguments": '{"city": "Paris"}'},))
KIMI_SUNNY = OpenAIAnswer("Sunny in Paris.")


def collect(stream: Any) -> dict[str, Any]:
    """
    A streamed answer put together as a client does: content, tool calls
    by index (arguments appended), every finish reason, the usage.
    """
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finishes: list[str] = []
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                content.append(delta.content)
            for call in delta.tool_calls or ():
                entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = call.id or entry["id"]
                if call.function is not None:
                    entry["name"] += call.function.name or ""
                    entry["arguments"] += call.function.arguments or ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    return {
        "content": "".join(content),
        "calls": [calls[i] for i in sorted(calls)],
        "indexes": sorted(calls),
        "finishes": finishes,
        "usage": usage,
    }


def ask(client: openai.OpenAI, messages: list[Any], stream: bool, **extra: Any) -> dict[str, Any]:
    """
    One chat call; the answer as C{collect} gives it, whole or streamed.
    """
    if stream:
        return collect(
            client.chat.completions.create(
                model="gpt-4o", messages=messages, stream=True, stream_options={"include_usage": True}, **extra
            )
        )
    completion = client.chat.completions.create(model="gpt-4o", messages=messages, **extra)
    message = completion.choices[0].message
    return {
        "content": message.content or "",
        "calls": [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or ()
        ],
        "indexes": list(range(len(message.tool_calls or ()))),
        "finishes": [completion.choices[0].finish_reason],
        "usage": completion.usage,
        "message": message,
    }


def standin_post(url: str, body: Any, key: str) -> tuple[int, Any]:
    """
    POST C{body} to the stand-in directly (blocking: call in a thread);
    its status and JSON answer.
    """
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"x-goog-api-key": key, "content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def echoed(answer: dict[str, Any]) -> dict[str, Any]:
    """
    The assistant message as the SDK and LangChain send it back: the
    standard fields only.
    """
    return {
        "role": "assistant",
        "content": answer["content"] or None,
        "tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in answer["calls"]
        ],
    }


def results(answer: dict[str, Any], text: str = '{"forecast": "sunny"}') -> list[dict[str, Any]]:
    return [{"role": "tool", "tool_call_id": c["id"], "content": text} for c in answer["calls"]]


class ToolLoopTests(DataPlaneTestCase):
    """
    call -> tool result -> final answer, on each provider, whole and
    streamed, and across a switch_provider.
    """

    @inlineCallbacks
    def gemini_loop(self, stream: bool) -> Any:
        self.upstream.gemini.answers[:] = [GEMINI_CALL, SUNNY]
        client = self.sdk(self.gateway())
        first = yield deferToThread(ask, client, QUESTION, stream, tools=TOOLS)
        self.assertEqual(first["finishes"], ["tool_calls"])
        (call,) = first["calls"]
        self.assertEqual((call["name"], json.loads(call["arguments"])), ("get_weather", PARIS))
        self.assertRegex(call["id"], r"^call_[0-9a-f]{24}_gs1_[A-Za-z0-9_-]+$")
        self.assertEqual(carried(call["id"]), ("fc-1", "sig-A"))
        self.assertEqual(first["content"], "")
        # The tools went as functionDeclarations, the schema unchanged.
        sent = self.upstream.gemini.bodies[0]
        self.assertEqual(
            sent["tools"],
            [
                {
                    "functionDeclarations": [
                        {"name": "get_weather", "description": "Weather now", "parametersJsonSchema": WEATHER_SCHEMA},
                        {"name": "get_time", "parametersJsonSchema": {"type": "object", "properties": {}}},
                    ]
                }
            ],
        )
        messages = [*QUESTION, echoed(first), *results(first)]
        second = yield deferToThread(ask, client, messages, stream, tools=TOOLS)
        self.assertEqual(second["content"], "Sunny in Paris.")
        self.assertEqual(second["finishes"], ["stop"])
        self.assertEqual(
            self.upstream.gemini.bodies[1]["contents"],
            [
                {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
                {
                    "role": "model",
                    "parts": [
                        {
                            "functionCall": {"name": "get_weather", "args": PARIS, "id": "fc-1"},
                            "thoughtSignature": "sig-A",
                        }
                    ],
                },
                {
                    "role": "user",
                    "parts": [
                        {"functionResponse": {"name": "get_weather", "response": {"forecast": "sunny"}, "id": "fc-1"}}
                    ],
                },
            ],
        )
        return first

    def test_gemini_loop(self):
        return self.gemini_loop(stream=False)

    def test_gemini_loop_streamed(self):
        return self.gemini_loop(stream=True)

    @inlineCallbacks
    def kimi_loop(self, stream: bool) -> Any:
        self.upstream.kimi.answers[:] = [KIMI_CALL, KIMI_SUNNY]
        client = self.sdk(self.gateway(default_provider="kimi"))
        first = yield deferToThread(ask, client, QUESTION, stream, tools=TOOLS, tool_choice="auto")
        self.assertEqual(first["finishes"], ["tool_calls"])
        self.assertEqual(
            first["calls"], [{"id": "get_weather:0", "name": "get_weather", "arguments": '{"city": "Paris"}'}]
        )
        messages = [*QUESTION, echoed(first), *results(first)]
        second = yield deferToThread(ask, client, messages, stream, tools=TOOLS)
        self.assertEqual(second["content"], "Sunny in Paris.")
        # Passed through as sent, the model substituted.
        sent = self.upstream.kimi.bodies[1]
        self.assertEqual(sent["tools"], TOOLS)
        self.assertEqual(sent["messages"], messages)
        self.assertEqual(sent["model"], "moonshot-v1-8k")

    def test_kimi_loop(self):
        return self.kimi_loop(stream=False)

    def test_kimi_loop_streamed(self):
        return self.kimi_loop(stream=True)

    @inlineCallbacks
    def switched_loop(self, first_provider: str, stream: bool) -> Any:
        second_provider = "gemini" if first_provider == "kimi" else "kimi"
        self.upstream.kimi.answers[:] = [KIMI_CALL] if first_provider == "kimi" else [KIMI_SUNNY]
        self.upstream.gemini.answers[:] = [GEMINI_CALL] if first_provider == "gemini" else [SUNNY]
        gateway = self.gateway(default_provider=first_provider)
        client = self.sdk(gateway)
        control = yield open_client(self, gateway.port)
        first = yield deferToThread(ask, client, QUESTION, stream, tools=TOOLS)
        self.assertEqual(first["finishes"], ["tool_calls"])
        answer = yield control.command(gateway.token, "switch_provider", {"provider": second_provider})
        self.assertTrue(answer["ok"], answer)
        messages = [*QUESTION, echoed(first), *results(first)]
        second = yield deferToThread(ask, client, messages, stream, tools=TOOLS)
        self.assertEqual(second["content"], "Sunny in Paris.")
        return first

    @inlineCallbacks
    def test_kimi_then_gemini(self):
        yield self.switched_loop("kimi", stream=False)
        # Calls Gemini did not sign get Google's placeholder; no Gemini id.
        model_turn = self.upstream.gemini.bodies[0]["contents"][1]
        self.assertEqual(
            model_turn["parts"],
            [{"functionCall": {"name": "get_weather", "args": PARIS}, "thoughtSignature": SKIP_SIGNATURE}],
        )
        self.assertEqual(
            self.upstream.gemini.bodies[0]["contents"][2]["parts"],
            [{"functionResponse": {"name": "get_weather", "response": {"forecast": "sunny"}}}],
        )

    @inlineCallbacks
    def test_kimi_then_gemini_streamed(self):
        yield self.switched_loop("kimi", stream=True)
        self.assertEqual(self.upstream.gemini.bodies[0]["contents"][1]["parts"][0]["thoughtSignature"], SKIP_SIGNATURE)

    @inlineCallbacks
    def test_gemini_then_kimi(self):
        first = yield self.switched_loop("gemini", stream=False)
        # Kimi gets the ids plain: short, letters, digits and "_", consistent.
        (sent_call,) = self.upstream.kimi.bodies[0]["messages"][1]["tool_calls"]
        self.assertRegex(sent_call["id"], r"^call_[0-9a-f]{24}$")
        self.assertTrue(first["calls"][0]["id"].startswith(sent_call["id"]))
        self.assertEqual(self.upstream.kimi.bodies[0]["messages"][2]["tool_call_id"], sent_call["id"])

    @inlineCallbacks
    def test_gemini_then_kimi_streamed(self):
        yield self.switched_loop("gemini", stream=True)
        self.assertRegex(self.upstream.kimi.bodies[0]["messages"][1]["tool_calls"][0]["id"], r"^call_[0-9a-f]{24}$")

    @inlineCallbacks
    def test_gemini_then_kimi_thinking(self, stream: bool = False):
        """
        Moonshot's thinking models refuse an assistant message with tool
        calls and no C{reasoning_content} (the stand-in too): one made by
        Gemini gets L{REASONING_PLACEHOLDER}; one the client kept its
        reasoning on goes as it is.
        """
        self.upstream.kimi.models.append("kimi-k2.5")
        self.upstream.gemini.answers[:] = [GEMINI_CALL]
        self.upstream.kimi.answers[:] = [KIMI_SUNNY, KIMI_SUNNY]
        gateway = self.gateway()
        client = self.sdk(gateway)
        control = yield open_client(self, gateway.port)
        first = yield deferToThread(ask, client, QUESTION, stream, tools=TOOLS)
        answer = yield control.command(gateway.token, "switch_provider", {"provider": "kimi", "model": "kimi-k2.5"})
        self.assertTrue(answer["ok"], answer)
        messages = [*QUESTION, echoed(first), *results(first)]
        second = yield deferToThread(ask, client, messages, stream, tools=TOOLS)
        self.assertEqual(second["content"], "Sunny in Paris.")
        sent = self.upstream.kimi.bodies[0]["messages"][1]
        self.assertEqual(sent["reasoning_content"], REASONING_PLACEHOLDER)
        kept = [*QUESTION, {**echoed(first), "reasoning_content": "Paris: ask the tool."}, *results(first)]
        yield deferToThread(ask, client, kept, stream, tools=TOOLS)
        self.assertEqual(self.upstream.kimi.bodies[1]["messages"][1]["reasoning_content"], "Paris: ask the tool.")

    def test_gemini_then_kimi_thinking_streamed(self):
        return self.test_gemini_then_kimi_thinking(stream=True)

    @inlineCallbacks
    def test_unsigned_history_refused_without_placeholder(self):
        # The stand-in enforces Gemini 3's rule, so the placeholder is what
        # makes the switched loops above pass: without it, a 400.
        self.upstream.gemini.answers[:] = [SUNNY]
        gateway = self.gateway()
        history = [
            *QUESTION,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]
        response, text = yield self.post(gateway, {"messages": history, "tools": TOOLS})
        self.assertEqual(response.code, 200, text)
        body = self.upstream.gemini.last_body
        self.assertEqual(body["contents"][1]["parts"][0]["thoughtSignature"], SKIP_SIGNATURE)
        self.assertEqual(body["contents"][2]["parts"][0]["functionResponse"]["response"], {"result": "sunny"})
        del body["contents"][1]["parts"][0]["thoughtSignature"]
        url = self.upstream.base_url("gemini") + "/models/gemini-flash-latest:generateContent"
        refused = yield self.http().post(url, json=body, headers={"x-goog-api-key": [self.upstream.gemini.key]})
        self.assertEqual(refused.code, 400)
        self.assertIn("missing a thought_signature", (yield refused.text()))

    def test_signature_in_googles_extra_content(self):
        """
        A history written through Google's OpenAI-compatible endpoint keeps
        each call's signature in C{extra_content.google.thought_signature}:
        sent to Gemini as the call's C{thoughtSignature}, not replaced by
        the placeholder.
        """
        call = {
            "id": "c1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": "{}"},
            "extra_content": {"google": {"thought_signature": "c2lnLWZyb20tZ29vZ2xl"}},
        }
        history = [
            *QUESTION,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]
        parts = gemini_translate.to_gemini({"messages": history})["contents"][1]["parts"]
        self.assertEqual(parts[0]["thoughtSignature"], "c2lnLWZyb20tZ29vZ2xl")

    @inlineCallbacks
    def test_result_holding_ref_goes_as_text(self):
        """
        A tool result holding a C{"$ref"} key (a JSON Schema, say) goes to
        Gemini as text: Gemini reads C{$ref} in C{functionResponse.response}
        as naming a media part and refuses the request (as the stand-in
        does, below).
        """
        self.upstream.gemini.answers[:] = [SUNNY]
        gateway = self.gateway()
        schema = json.dumps({"$defs": {"Row": {"type": "string"}}, "items": {"$ref": "#/$defs/Row"}})
        # Every character of "$ref" escaped: found all the same (re-attack s21).
        escaped = '{"schema": {"\\u0024\\u0072\\u0065\\u0066": "#/x"}}'
        self.assertEqual(
            gemini_translate.to_gemini(
                {
                    "messages": [
                        *QUESTION,
                        {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [
                                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                            ],
                        },
                        {"role": "tool", "tool_call_id": "c1", "content": escaped},
                    ]
                }
            )["contents"][2]["parts"][0]["functionResponse"]["response"],
            {"result": escaped},
        )
        history = [
            *QUESTION,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": schema},
        ]
        response, text = yield self.post(gateway, {"messages": history, "tools": TOOLS})
        self.assertEqual(response.code, 200, text)
        body = self.upstream.gemini.last_body
        self.assertEqual(body["contents"][2]["parts"][0]["functionResponse"]["response"], {"result": schema})
        body["contents"][2]["parts"][0]["functionResponse"]["response"] = json.loads(schema)
        url = self.upstream.base_url("gemini") + "/models/gemini-flash-latest:generateContent"
        refused = yield self.http().post(url, json=body, headers={"x-goog-api-key": [self.upstream.gemini.key]})
        self.assertEqual(refused.code, 400)
        self.assertIn("does not match to a display_name", (yield refused.text()))

    def test_result_with_long_integers_goes_as_text(self):
        """
        A tool result holding an integer a double cannot hold exactly goes to
        Gemini as text (C{functionResponse.response} is a protobuf Struct:
        1234567890123456789 would reach the model as ...768); one whose
        long digits are in strings, or whose integers fit, goes as JSON.
        """

        def response(content: str) -> Any:
            call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            history = [
                *QUESTION,
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": content},
            ]
            body = gemini_translate.to_gemini({"messages": history})
            return body["contents"][2]["parts"][0]["functionResponse"]["response"]

        for content in (
            '{"order_id": 1234567890123456789, "amount": 19.90}',
            '{"rows": [{"id": -9007199254740993}]}',
            # Past 64 bits, which orjson reads as a float.
            '{"id": 123456789012345678901234567890}',
        ):
            self.assertEqual(response(content), {"result": content})
        for content, parsed in (
            ('{"card": "1234567890123456789"}', {"card": "1234567890123456789"}),
            ('{"id": 9007199254740992}', {"id": 9007199254740992}),
        ):
            self.assertEqual(response(content), parsed)

    @inlineCallbacks
    def test_ref_beside_other_keywords(self):
        """
        A schema node with C{"$ref"} and other keywords (Pydantic's
        C{title}) reaches Gemini with the reference in an C{anyOf} of one,
        in tools and in C{response_format}: Gemini refuses anything but
        C{description} and C{default} beside C{$ref} (as the stand-in
        does, below).
        """
        self.upstream.gemini.answers[:] = [SUNNY]
        gateway = self.gateway()
        schema = {
            "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}}},
            "type": "object",
            "properties": {"home": {"$ref": "#/$defs/Place", "title": "Home", "description": "Where"}},
        }
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}}]
        response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        response, text = yield self.post(
            gateway,
            {"messages": QUESTION, "tools": tools, "response_format": response_format},
        )
        self.assertEqual(response.code, 200, text)
        body = self.upstream.gemini.last_body
        home = {"title": "Home", "description": "Where", "anyOf": [{"$ref": "#/$defs/Place"}]}
        self.assertEqual(
            body["tools"][0]["functionDeclarations"][0]["parametersJsonSchema"]["properties"]["home"], home
        )
        self.assertEqual(body["generationConfig"]["responseJsonSchema"]["properties"]["home"], home)
        self.assertEqual(body["generationConfig"]["responseJsonSchema"]["$defs"], schema["$defs"])
        body["generationConfig"]["responseJsonSchema"] = schema
        url = self.upstream.base_url("gemini") + "/models/gemini-flash-latest:generateContent"
        refused = yield self.http().post(url, json=body, headers={"x-goog-api-key": [self.upstream.gemini.key]})
        self.assertEqual(refused.code, 400)
        self.assertIn("only description and default can be set alongside it", (yield refused.text()))


class ForcedCallTests(DataPlaneTestCase):
    """
    The stand-in answers a C{tool_choice} that forces a call with that call
    (README: a tool loop tried by hand), on each provider; C{log_bodies}
    logs what it received.
    """

    @inlineCallbacks
    def loop(self, provider: str, stream: bool) -> Any:
        behaviour = getattr(self.upstream, provider)
        behaviour.log_bodies = True
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        client = self.sdk(self.gateway(default_provider=provider))
        for choice, name, arguments in (
            # Arguments valid against the function's parameters.
            ("required", "get_weather", schema_instance(WEATHER_SCHEMA, WEATHER_SCHEMA, "text")),
            ({"type": "function", "function": {"name": "get_time"}}, "get_time", {}),
        ):
            first = yield deferToThread(ask, client, QUESTION, stream, tools=TOOLS, tool_choice=choice)
            self.assertEqual(first["finishes"], ["tool_calls"])
            self.assertEqual([(c["name"], json.loads(c["arguments"])) for c in first["calls"]], [(name, arguments)])
            messages = [*QUESTION, echoed(first), *results(first)]
            second = yield deferToThread(ask, client, messages, stream, tools=TOOLS, tool_choice="auto")
            self.assertEqual((second["content"], second["finishes"]), ("Hello from the stand-in.", ["stop"]))
        bodies = [e for e in logged if e.get("log_namespace") == "openclaw.testing.upstream.bodies"]
        self.assertEqual(len(bodies), 4)
        self.assertEqual(json.loads(bodies[-1]["body"]), behaviour.bodies[-1])
        # Long strings (an image's data URL) are cut in the log.
        long = [{"role": "user", "content": "x" * 1000}]
        yield deferToThread(ask, client, long, stream)
        (last,) = [e for e in logged if e.get("log_namespace") == "openclaw.testing.upstream.bodies"][-1:]
        self.assertIn("... (1000 characters)", last["body"])

    @inlineCallbacks
    def test_kimi_thinking(self):
        """
        Moonshot's thinking models refuse a forced tool_choice: the 400
        names C{tool_choice} and says what to send (agent trial s42: no
        param, Moonshot's words alone); with C{"thinking": {"type":
        "disabled"}} (passed on as sent) the call is forced.
        """
        self.upstream.kimi.models.append("kimi-k2.5")
        client = self.sdk(self.gateway())
        for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
            failure = yield self.assertFailure(
                deferToThread(
                    client.chat.completions.create,
                    model="kimi/kimi-k2.5",
                    messages=QUESTION,
                    tools=TOOLS,
                    tool_choice=choice,
                ),
                openai.BadRequestError,
            )
            self.assertEqual(failure.body["param"], "tool_choice")
            self.assertEqual(failure.body["code"], "upstream_invalid_request")
            self.assertIn("incompatible with thinking enabled", failure.message)
            self.assertIn('"thinking": {"type": "disabled"}', failure.message)
            answer = yield deferToThread(
                client.chat.completions.create,
                model="kimi/kimi-k2.5",
                messages=QUESTION,
                tools=TOOLS,
                tool_choice=choice,
                extra_body={"thinking": {"type": "disabled"}},
            )
            self.assertEqual(answer.choices[0].finish_reason, "tool_calls")
            self.assertEqual(self.upstream.kimi.last_body["thinking"], {"type": "disabled"})

    def test_kimi(self):
        return self.loop("kimi", False)

    def test_kimi_streamed(self):
        return self.loop("kimi", True)

    def test_gemini(self):
        return self.loop("gemini", False)

    def test_gemini_streamed(self):
        return self.loop("gemini", True)


class ParallelCallTests(DataPlaneTestCase):
    PARALLEL = (
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}, "id": "a"}, "thoughtSignature": "sig-P"},
        {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}, "id": "b"}},
        {"functionCall": {"name": "get_time", "args": {}, "id": "c"}},
    )

    @inlineCallbacks
    def parallel(self, answer: GeminiAnswer, stream: bool) -> Any:
        self.upstream.gemini.answers[:] = [answer, SUNNY]
        client = self.sdk(self.gateway())
        first = yield deferToThread(ask, client, QUESTION, stream, tools=TOOLS, parallel_tool_calls=True)
        # Each call its own index and id; never concatenated.
        self.assertEqual(first["indexes"], [0, 1, 2])
        self.assertEqual(
            [(c["name"], json.loads(c["arguments"])) for c in first["calls"]],
            [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"}), ("get_time", {})],
        )
        self.assertEqual(len({c["id"] for c in first["calls"]}), 3)
        self.assertEqual(first["finishes"], ["tool_calls"])
        # Results sent back in another order still go in the calls' order,
        # in one turn, right after the call turn.
        messages = [*QUESTION, echoed(first), *reversed(results(first))]
        second = yield deferToThread(ask, client, messages, stream, tools=TOOLS)
        self.assertEqual(second["content"], "Sunny in Paris.")
        contents = self.upstream.gemini.bodies[1]["contents"]
        self.assertEqual(len(contents), 3)
        self.assertEqual([p.get("thoughtSignature") for p in contents[1]["parts"]], ["sig-P", None, None])
        self.assertEqual([p["functionResponse"]["id"] for p in contents[2]["parts"]], ["a", "b", "c"])

    def test_one_event(self):
        return self.parallel(GeminiAnswer((self.PARALLEL,)), stream=True)

    def test_across_events(self):
        return self.parallel(GeminiAnswer(tuple((part,) for part in self.PARALLEL), repeat_finish=True), stream=True)

    def test_whole(self):
        return self.parallel(GeminiAnswer((self.PARALLEL,)), stream=False)

    #: Kimi calling two functions at once, the second without arguments
    #: (Moonshot's "").
    KIMI_TWO_CALLS = OpenAIAnswer(
        tool_calls=(
            {"id": "get_weather:0", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"id": "get_time:1", "name": "get_time", "arguments": ""},
        )
    )

    @inlineCallbacks
    def test_one_call_on_either_provider(self):
        """
        C{parallel_tool_calls: false} holds on Kimi as on Gemini, whole and
        streamed: a choice keeps its first call (index 0), later ones are
        left out (none given a "{}" either), finish reason C{tool_calls};
        so an agent's contract holds across switch_provider, where Kimi's
        two calls reached the agent (trial s29).  Without it, or with
        null or true, Kimi's calls all come.
        """
        gateway = self.gateway()
        client = self.sdk(gateway)
        control = yield open_client(self, gateway.port)
        for provider in ("kimi", "gemini"):
            answer = yield control.command(gateway.token, "switch_provider", {"provider": provider})
            self.assertTrue(answer["ok"], answer)
            self.upstream.kimi.answers[:] = [self.KIMI_TWO_CALLS] * 2
            self.upstream.gemini.answers[:] = [GeminiAnswer((self.PARALLEL,))] * 2
            for stream in (False, True):
                answer = yield deferToThread(ask, client, QUESTION, stream, tools=TOOLS, parallel_tool_calls=False)
                self.assertEqual([c["name"] for c in answer["calls"]], ["get_weather"], (provider, stream))
                self.assertEqual(json.loads(answer["calls"][0]["arguments"]), {"city": "Paris"})
                self.assertEqual((answer["indexes"], answer["finishes"]), ([0], ["tool_calls"]), (provider, stream))
        answer = yield control.command(gateway.token, "switch_provider", {"provider": "kimi"})
        self.assertTrue(answer["ok"], answer)
        self.upstream.kimi.answers[:] = [self.KIMI_TWO_CALLS] * 6
        for stream in (False, True):
            for extra in ({}, {"parallel_tool_calls": None}, {"parallel_tool_calls": True}):
                answer = yield deferToThread(ask, client, QUESTION, stream, tools=TOOLS, **extra)
                self.assertEqual([c["name"] for c in answer["calls"]], ["get_weather", "get_time"], (stream, extra))
                self.assertEqual((answer["indexes"], answer["calls"][1]["arguments"]), ([0, 1], "{}"))

    @inlineCallbacks
    def test_finish_reason_once_and_last(self):
        self.upstream.gemini.answers[:] = [
            GeminiAnswer((({"text": "a"},), ({"text": "b"},), ({"text": "c"},)), repeat_finish=True)
        ]
        gateway = self.gateway()
        response, text = yield self.post(gateway, {"messages": QUESTION, "stream": True})
        chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        self.assertEqual(reasons, [None, None, None, "stop"])
        self.assertTrue(text.endswith("data: [DONE]\n\n"))


def ask_legacy(client: openai.OpenAI, model: str, stream: bool) -> dict[str, Any]:
    """
    One call declaring its functions in the legacy C{functions} field; the
    answer's C{function_call} (streamed pieces joined), whether any
    C{tool_calls} came, and every finish reason.
    """
    functions = [tool["function"] for tool in TOOLS]
    if not stream:
        completion = client.chat.completions.create(model=model, messages=QUESTION, functions=functions)
        choice = completion.choices[0]
        call = choice.message.function_call
        return {
            "function_call": None if call is None else {"name": call.name, "arguments": call.arguments},
            "tool_calls": bool(choice.message.tool_calls),
            "finishes": [choice.finish_reason],
        }
    joined: dict[str, str] | None = None
    tool_calls, finishes = False, []
    for chunk in client.chat.completions.create(model=model, messages=QUESTION, functions=functions, stream=True):
        for choice in chunk.choices:
            tool_calls = tool_calls or bool(choice.delta.tool_calls)
            piece = choice.delta.function_call
            if piece is not None:
                joined = joined or {"name": "", "arguments": ""}
                joined["name"] += piece.name or ""
                joined["arguments"] += piece.arguments or ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    return {"function_call": joined, "tool_calls": tool_calls, "finishes": finishes}


class LegacyFunctionsTests(DataPlaneTestCase):
    """
    A request with the legacy C{functions} is answered in the legacy shape
    by either provider (so an old agent's loop survives switch_provider):
    C{message.function_call} (or C{delta.function_call} pieces), the first
    call only, finish reason C{function_call}, no C{tool_calls}.
    """

    KIMI_TWO_CALLS = OpenAIAnswer(
        tool_calls=(
            {"id": "get_weather:0", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"id": "get_time:1", "name": "get_time", "arguments": "{}"},
        )
    )
    EXPECTED: ClassVar[dict[str, Any]] = {
        "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        "tool_calls": False,
        "finishes": ["function_call"],
    }

    @inlineCallbacks
    def check(self, stream: bool, usage_in_choice: bool = False) -> Any:
        self.upstream.kimi.answers[:] = [self.KIMI_TWO_CALLS]
        self.upstream.kimi.usage_in_choice = usage_in_choice
        self.upstream.gemini.answers[:] = [GEMINI_CALL]
        client = self.sdk(self.gateway())
        for model in ("kimi/moonshot-v1-8k", "gemini/gemini-2.5-flash"):
            answer = yield deferToThread(ask_legacy, client, model, stream)
            if model.startswith("gemini"):
                answer["function_call"]["arguments"] = json.dumps(json.loads(answer["function_call"]["arguments"]))
            self.assertEqual(answer, self.EXPECTED, model)
        # Kimi was asked with tools, as it understands them.
        self.assertEqual(self.upstream.kimi.last_body["tools"], TOOLS)

    def test_whole(self):
        return self.check(stream=False)

    def test_streamed(self):
        return self.check(stream=True)

    def test_usage_in_choice(self):
        """
        Moonshot's usage inside the last chunk's choice, beside its finish
        reason: that chunk is rewritten too.
        """
        return self.check(stream=True, usage_in_choice=True)

    @inlineCallbacks
    def test_tools_answered_as_tools(self):
        """
        A request with C{tools} gets Kimi's C{tool_calls} as they came.
        """
        self.upstream.kimi.answers[:] = [self.KIMI_TWO_CALLS]
        client = self.sdk(self.gateway())
        completion = yield deferToThread(
            client.chat.completions.create, model="kimi/moonshot-v1-8k", messages=QUESTION, tools=TOOLS
        )
        choice = completion.choices[0]
        self.assertEqual([c.function.name for c in choice.message.tool_calls], ["get_weather", "get_time"])
        self.assertEqual((choice.finish_reason, choice.message.function_call), ("tool_calls", None))


class EmptyArgumentsTests(DataPlaneTestCase):
    """
    Moonshot calls a function without parameters with C{arguments: ""}
    (MoonshotAI/kimi-cli PR #1764): the agent gets OpenAI's C{"{}"}, whole
    or streamed, and a history holding C{""} (or no arguments at all) is
    taken as C{"{}"} by either provider.
    """

    NO_ARGUMENTS = OpenAIAnswer(tool_calls=({"id": "get_time:0", "name": "get_time", "arguments": ""},))

    @inlineCallbacks
    def answered(self, stream: bool) -> Any:
        self.upstream.kimi.answers[:] = [self.NO_ARGUMENTS, KIMI_SUNNY]
        gateway = self.gateway()
        client = self.sdk(gateway)
        control = yield open_client(self, gateway.port)
        answer = yield control.command(gateway.token, "switch_provider", {"provider": "kimi"})
        self.assertTrue(answer["ok"], answer)
        first = yield deferToThread(ask, client, QUESTION, stream, tools=TOOLS)
        self.assertEqual([(c["name"], c["arguments"]) for c in first["calls"]], [("get_time", "{}")])
        self.assertEqual(first["finishes"], ["tool_calls"])
        second = yield deferToThread(ask, client, [*QUESTION, echoed(first), *results(first)], stream, tools=TOOLS)
        self.assertEqual(second["content"], "Sunny in Paris.")

    def test_whole(self):
        return self.answered(stream=False)

    def test_streamed(self):
        return self.answered(stream=True)

    @inlineCallbacks
    def test_history_with_empty_arguments(self):
        self.upstream.kimi.answers[:] = [KIMI_SUNNY, KIMI_SUNNY]
        self.upstream.gemini.answers[:] = [SUNNY, SUNNY]
        gateway = self.gateway()
        for model in ("kimi/moonshot-v1-8k", "gemini/gemini-2.5-flash"):
            for arguments in ({"arguments": ""}, {"arguments": None}, {}):
                call = {"id": "get_time:0", "type": "function", "function": {"name": "get_time", **arguments}}
                messages = [
                    *QUESTION,
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "get_time:0", "content": "noon"},
                ]
                response, text = yield self.post(gateway, {"model": model, "messages": messages})
                self.assertEqual(response.code, 200, (model, arguments, text))
                self.upstream.kimi.answers[:] = [KIMI_SUNNY]
                self.upstream.gemini.answers[:] = [SUNNY]
        sent = self.upstream.kimi.last_body["messages"][1]["tool_calls"][0]["function"]
        self.assertEqual(sent["arguments"], "{}")
        parts = self.upstream.gemini.last_body["contents"][1]["parts"]
        self.assertEqual(parts[0]["functionCall"]["args"], {})

    @inlineCallbacks
    def test_history_without_call_type(self):
        """
        A call with no type, or a null one ("not set"), is a function's
        call on either provider, and Kimi is sent it with its type (OpenAI's
        API requires the field).
        """
        gateway = self.gateway()
        for model in ("kimi/moonshot-v1-8k", "gemini/gemini-2.5-flash"):
            for kind in ({"type": None}, {}):
                self.upstream.kimi.answers[:] = [KIMI_SUNNY]
                self.upstream.gemini.answers[:] = [SUNNY]
                call = {"id": "c1", **kind, "function": {"name": "get_time", "arguments": "{}"}}
                messages = [
                    *QUESTION,
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "c1", "content": "noon"},
                ]
                response, text = yield self.post(gateway, {"model": model, "messages": messages})
                self.assertEqual(response.code, 200, (model, kind, text))
        self.assertEqual(self.upstream.kimi.last_body["messages"][1]["tool_calls"][0]["type"], "function")
        parts = self.upstream.gemini.last_body["contents"][1]["parts"]
        self.assertEqual(parts[0]["functionCall"]["name"], "get_time")

    @inlineCallbacks
    def test_history_with_empty_content(self):
        """
        An assistant message with tool calls and content "" (how many
        clients write it back) reaches Kimi without content, which Moonshot
        refuses ("text content is empty", as the stand-in does); the
        caller's text is sent otherwise as it is.
        """
        gateway = self.gateway()
        call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
        mixed = [{"type": "text", "text": ""}, {"type": "text", "text": "Let me check."}]
        for content in ("", [{"type": "text", "text": ""}], "Let me check.", mixed):
            messages = [
                *QUESTION,
                {"role": "assistant", "content": content, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "noon"},
            ]
            for model in ("kimi/moonshot-v1-8k", "gemini/gemini-2.5-flash"):
                self.upstream.kimi.answers[:] = [KIMI_SUNNY]
                self.upstream.gemini.answers[:] = [SUNNY]
                response, text = yield self.post(gateway, {"model": model, "messages": messages})
                self.assertEqual(response.code, 200, (model, content, text))
            sent = self.upstream.kimi.last_body["messages"][1]
            if content == "Let me check.":
                self.assertEqual(sent["content"], content)
            elif content is mixed:
                # Its empty parts left out (recheck s41: Moonshot refused it).
                self.assertEqual(sent["content"], [{"type": "text", "text": "Let me check."}])
            else:
                self.assertNotIn("content", sent)
            self.assertEqual(sent["tool_calls"][0]["id"], "c1")

    @inlineCallbacks
    def test_history_with_empty_turns(self):
        """
        The empty assistant turns Gemini answers leave in an agent's history
        (a prompt it blocked: content "" and a refusal; an answer cut at
        MAX_TOKENS before any text), taken back after a switch to Kimi:
        Moonshot refuses an empty assistant message ("must not be empty",
        as the stand-in does), so the refusal goes as its text and the
        empty turn is left out (agent trial s42: a 400 on every later
        turn).  An empty assistant message of the caller's own goes the
        same way.
        """
        gateway = self.gateway()
        client = self.sdk(gateway)
        self.upstream.gemini.answers[:] = [
            GeminiAnswer((), document={"promptFeedback": {"blockReason": "SAFETY"}}),
            GeminiAnswer((), document={"candidates": [{"finishReason": "MAX_TOKENS", "index": 0}]}),
        ]
        history: list[Any] = []
        for question in ("first", "second"):
            history.append({"role": "user", "content": question})
            answer = yield deferToThread(
                client.chat.completions.create, model="gemini/gemini-2.5-flash", messages=history
            )
            history.append(answer.choices[0].message.model_dump(exclude_none=True))
        self.assertEqual([m.get("content") for m in history[1::2]], ["", ""])
        self.assertTrue(history[1]["refusal"])
        history.append({"role": "user", "content": "third"})
        self.upstream.kimi.answers[:] = [KIMI_SUNNY]
        answer = yield deferToThread(client.chat.completions.create, model="kimi/moonshot-v1-8k", messages=history)
        self.assertEqual(answer.choices[0].finish_reason, "stop")
        sent = self.upstream.kimi.last_body["messages"]
        self.assertEqual([m["role"] for m in sent], ["user", "assistant", "user", "user"])
        self.assertEqual(sent[1]["content"], history[1]["refusal"])
        for content in ("", [{"type": "text", "text": ""}]):
            messages = [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": content},
                {"role": "user", "content": "again"},
            ]
            for model in ("kimi/moonshot-v1-8k", "gemini/gemini-2.5-flash"):
                self.upstream.kimi.answers[:] = [KIMI_SUNNY]
                self.upstream.gemini.answers[:] = [SUNNY]
                response, text = yield self.post(gateway, {"model": model, "messages": messages})
                self.assertEqual(response.code, 200, (model, content, text))
            self.assertEqual([m["role"] for m in self.upstream.kimi.last_body["messages"]], ["user", "user"])
        # Moonshot's Partial Mode prefill, empty in its role-play example:
        # sent as it is (review s42: left out, the name's prefill lost).
        prefill = {"role": "assistant", "name": "Kelsier", "content": "", "partial": True}
        self.upstream.kimi.answers[:] = [KIMI_SUNNY]
        response, text = yield self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": [*QUESTION, prefill]})
        self.assertEqual(response.code, 200, text)
        self.assertEqual(self.upstream.kimi.last_body["messages"][-1], prefill)

    @inlineCallbacks
    def test_history_with_broken_arguments(self):
        """
        A call whose arguments are no JSON object (Kimi's answer cut at its
        token limit), answered by the agent with the error, is history
        like any other: Kimi gets the arguments as sent, Gemini the call
        with no arguments; the loop goes on (it was a 400 on every turn
        after, on either provider).
        """
        gateway = self.gateway()
        for arguments in ('{"city": "Par', '{"a": 1}{"b": 2}', '"Paris"', "{city: Paris}"):
            call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
            messages = [
                *QUESTION,
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "the arguments were not valid JSON; call again"},
            ]
            for model in ("kimi/moonshot-v1-8k", "gemini/gemini-2.5-flash"):
                self.upstream.kimi.answers[:] = [KIMI_SUNNY]
                self.upstream.gemini.answers[:] = [SUNNY]
                response, text = yield self.post(gateway, {"model": model, "messages": messages, "tools": TOOLS})
                self.assertEqual(response.code, 200, (model, arguments, text))
            sent = self.upstream.kimi.last_body["messages"][1]["tool_calls"][0]["function"]
            self.assertEqual(sent["arguments"], arguments)
            parts = self.upstream.gemini.last_body["contents"][1]["parts"]
            self.assertEqual(parts[0]["functionCall"], {"name": "get_weather", "args": {}})


class ModelFailureTests(DataPlaneTestCase):
    MALFORMED = GeminiAnswer((({"thoughtSignature": "sig-M"},),), finish_reason="MALFORMED_FUNCTION_CALL")

    @inlineCallbacks
    def test_whole(self):
        events = capture_log_events(self)
        self.upstream.gemini.answers[:] = [self.MALFORMED]
        client = self.sdk(self.gateway())
        failure = yield self.assertFailure(
            deferToThread(client.chat.completions.create, model="x", messages=QUESTION, tools=TOOLS),
            openai.APIStatusError,
        )
        self.assertEqual(failure.status_code, 502)
        self.assertEqual(failure.body["code"], "malformed_function_call")
        self.assertIn("MALFORMED_FUNCTION_CALL", failure.message)
        # The log line has the code, not the message: a model's failure may
        # quote the model's output (Gemini's finishMessage; review s34).
        [line] = [e for e in events if e.get("status") == 502]
        self.assertIsNone(line["error_message"])

    @inlineCallbacks
    def test_streamed(self):
        self.upstream.gemini.answers[:] = [self.MALFORMED]
        gateway = self.gateway()
        response, text = yield self.post(gateway, {"messages": QUESTION, "tools": TOOLS, "stream": True})
        # The failure is the stream's first event: nothing was sent yet, so
        # it is a whole 502 (not failed over: the model failed, not Gemini).
        self.assertEqual(response.code, 502, text)
        self.assertEqual(json.loads(text)["error"]["code"], "malformed_function_call")
        self.assertEqual(response.headers.getRawHeaders("x-openclaw-fallback"), None)
        self.assertNotIn('"finish_reason": "stop"', text)


class PrefixedNameTests(DataPlaneTestCase):
    """
    A call Gemini names with a prefix of its own (C{default_api.get_weather},
    google-gemini/cookbook #1374) reaches the agent under the name its tool
    was declared as, so that the history the agent sends back is taken
    (trial s25: refused with a 400 on the next turn, on either provider);
    a name no tool can be declared as is the model's failure.
    """

    def answer(self, name: str) -> GeminiAnswer:
        return GeminiAnswer(
            (({"functionCall": {"name": name, "args": PARIS, "id": "fc-1"}, "thoughtSignature": "sig-A"},),)
        )

    @inlineCallbacks
    def test_prefix_dropped(self):
        gateway = self.gateway()
        client = self.sdk(gateway)
        for stream in (False, True):
            self.upstream.gemini.answers[:] = [self.answer("default_api.get_weather")]
            answer = yield deferToThread(ask, client, QUESTION, stream, tools=TOOLS)
            self.assertEqual([call["name"] for call in answer["calls"]], ["get_weather"])
            history = [*QUESTION, echoed(answer), *results(answer)]
            for model in ("gemini/gemini-2.5-flash", "kimi/moonshot-v1-8k"):
                self.upstream.gemini.answers[:] = [SUNNY]
                completion = yield deferToThread(
                    client.chat.completions.create, model=model, messages=history, tools=TOOLS
                )
                self.assertTrue(completion.choices[0].message.content)

    @inlineCallbacks
    def test_unusable_name(self):
        gateway = self.gateway()
        client = self.sdk(gateway)
        self.upstream.gemini.answers[:] = [self.answer("x" * 65)]
        failure = yield self.assertFailure(
            deferToThread(
                client.chat.completions.create, model="gemini/gemini-2.5-flash", messages=QUESTION, tools=TOOLS
            ),
            openai.APIStatusError,
        )
        self.assertEqual((failure.status_code, failure.body["code"]), (502, "malformed_function_call"))


class ContentTests(DataPlaneTestCase):
    PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()

    @inlineCallbacks
    def test_named_tool_choice(self):
        self.upstream.gemini.answers[:] = [GEMINI_CALL]
        self.upstream.kimi.answers[:] = [KIMI_CALL]
        client = self.sdk(self.gateway())
        choice = {"type": "function", "function": {"name": "get_weather"}}
        for model in ("gpt-4o", "kimi/moonshot-v1-8k"):
            completion = yield deferToThread(
                client.chat.completions.create, model=model, messages=QUESTION, tools=TOOLS, tool_choice=choice
            )
            self.assertEqual(completion.choices[0].message.tool_calls[0].function.name, "get_weather")
        self.assertEqual(
            self.upstream.gemini.last_body["toolConfig"],
            {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
        )
        self.assertEqual(self.upstream.kimi.last_body["tool_choice"], choice)

    @inlineCallbacks
    def test_image_from_data_url(self):
        client = self.sdk(self.gateway())
        parts = [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{self.PNG}", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.webp?size=2"}},
            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
            {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}},
        ]
        for model in ("gpt-4o", "kimi/moonshot-v1-8k"):
            completion = yield deferToThread(
                client.chat.completions.create, model=model, messages=[{"role": "user", "content": parts}]
            )
            self.assertEqual(completion.choices[0].message.content, "Hello from the stand-in.")
        self.assertEqual(
            self.upstream.gemini.last_body["contents"][0]["parts"],
            [
                {"text": "What is this?"},
                {"inlineData": {"mimeType": "image/png", "data": self.PNG}},
                {"fileData": {"fileUri": "https://example.com/cat.webp?size=2", "mimeType": "image/webp"}},
                {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}},
                {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
            ],
        )
        self.assertEqual(self.upstream.kimi.last_body["messages"][0]["content"], parts)

    @inlineCallbacks
    def test_image_detail(self):
        """
        An image's C{detail} reaches a Gemini 3 model as the part's
        C{mediaResolution}; Gemini 2.5 gets the part without it.
        """
        self.upstream.gemini.models.append("gemini-3-flash-preview")
        client = self.sdk(self.gateway())
        parts = [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "high"}},
        ]
        image = {"fileData": {"fileUri": "https://example.com/cat.png", "mimeType": "image/png"}}
        for model, sent in (
            ("gemini/gemini-3-flash-preview", {**image, "mediaResolution": {"level": "MEDIA_RESOLUTION_HIGH"}}),
            ("gemini/gemini-2.5-flash", image),
        ):
            completion = yield deferToThread(
                client.chat.completions.create, model=model, messages=[{"role": "user", "content": parts}]
            )
            self.assertEqual(completion.choices[0].message.content, "Hello from the stand-in.")
            self.assertEqual(self.upstream.gemini.last_body["contents"][0]["parts"][1], sent, model)

    @inlineCallbacks
    def test_cloud_storage_url(self):
        """
        A C{gs://} image URL: the Gemini API refuses it ("Invalid or
        unsupported file uri", as the stand-in does), so a call to Gemini is
        the gateway's 400 naming the part, nothing sent; Kimi (an
        OpenAI-shaped provider judges its own URLs) gets it as sent.
        """
        client = self.sdk(self.gateway())
        parts = [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "gs://my-bucket/cat.png"}},
        ]
        messages = [{"role": "user", "content": parts}]
        with self.assertRaises(openai.BadRequestError) as caught:
            yield deferToThread(client.chat.completions.create, model="gpt-4o", messages=messages)
        self.assertEqual(caught.exception.body["param"], "messages[0].content[1].image_url.url")
        self.assertIn("gs:// (Cloud Storage) URL, which the Gemini API does not read", caught.exception.message)
        self.assertEqual(self.upstream.gemini.requests, 0)
        yield deferToThread(client.chat.completions.create, model="kimi/moonshot-v1-8k", messages=messages)
        self.assertEqual(self.upstream.kimi.last_body["messages"][0]["content"], parts)
        # The stand-in answers as Google does, were one sent.
        sent = {"contents": [{"role": "user", "parts": [{"fileData": {"fileUri": "gs://b/c.png"}}]}]}
        status, document = yield deferToThread(
            standin_post,
            self.upstream.base_url("gemini") + "/models/gemini-2.5-flash:generateContent",
            sent,
            self.upstream.gemini.key,
        )
        self.assertEqual((status, document["error"]["message"]), (400, "Invalid or unsupported file uri: gs://b/c.png"))

    @inlineCallbacks
    def test_json_schema(self):
        # Case 3 of the issue: the schema reaches Gemini, unchanged.
        schema = {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "number"}},
            "required": ["name", "age"],
            "additionalProperties": False,
        }
        response_format = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": schema}}
        self.upstream.gemini.reply = '{"name": "Ada", "age": 36}'
        self.upstream.kimi.reply = '{"name": "Ada", "age": 36}'
        client = self.sdk(self.gateway())
        for model in ("gpt-4o", "kimi/moonshot-v1-8k"):
            completion = yield deferToThread(
                client.chat.completions.create, model=model, messages=QUESTION, response_format=response_format
            )
            self.assertEqual(json.loads(completion.choices[0].message.content), {"name": "Ada", "age": 36})
        config = self.upstream.gemini.last_body["generationConfig"]
        self.assertEqual(config, {"responseMimeType": "application/json", "responseJsonSchema": schema})
        self.assertEqual(self.upstream.kimi.last_body["response_format"], response_format)

    @inlineCallbacks
    def test_invalid_schema_refused_as_providers_do(self):
        """
        A schema the stand-in cannot follow (C{properties} not an object,
        C{required} not a list of names, a C{minItems} that is not a count,
        or one asking for millions of values) is refused with a 400, as the
        providers refuse an invalid schema: the client gets the provider's
        400, not a 502 counted against the provider (trial s28: the
        stand-in raised, answered 500, and the breaker counted it).
        """
        import openai

        client = self.sdk(self.gateway())
        schemas = (
            {"type": "object", "properties": True},
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": "a"},
            {"type": "array", "minItems": "3", "items": {"type": "string"}},
            {"type": "array", "minItems": 1000, "items": {"type": "array", "minItems": 1000}},
            {"type": "array", "minItems": 4999, "items": {"type": "string", "minLength": 100000}},
        )
        for schema in schemas:
            response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
            for model in ("gemini/gemini-2.5-flash", "kimi/moonshot-v1-8k"):
                with self.assertRaises(openai.BadRequestError) as raised:
                    yield deferToThread(
                        client.with_options(max_retries=0).chat.completions.create,
                        model=model,
                        messages=QUESTION,
                        response_format=response_format,
                    )
                self.assertIn("Invalid schema", str(raised.exception), (schema, model))

    @inlineCallbacks
    def test_sdk_parse(self):
        """
        The openai SDK's C{.parse()} with a Pydantic model (nested, an
        enum, a list) works against the stand-in through either provider,
        whole and streamed: the stand-in answers a C{json_schema} (and
        Gemini's C{responseJsonSchema}) with a document that follows it.
        """
        import datetime
        import enum
        import uuid

        import pydantic

        class Unit(enum.Enum):
            metric = "metric"
            imperial = "imperial"

        class Place(pydantic.BaseModel):
            city: str
            population: int

        class Answer(pydantic.BaseModel):
            place: Place
            unit: Unit
            neighbours: list[Place]
            confidence: float | None
            when: datetime.datetime
            id: uuid.UUID
            debt: int = pydantic.Field(lt=0)
            ratio: float = pydantic.Field(ge=0.5, le=1)
            code: str = pydantic.Field(min_length=40)

        client = self.sdk(self.gateway())
        for model in ("gemini/gemini-2.5-flash", "kimi/moonshot-v1-8k"):
            completion = yield deferToThread(
                client.chat.completions.parse, model=model, messages=QUESTION, response_format=Answer
            )
            parsed = completion.choices[0].message.parsed
            self.assertIsInstance(parsed, Answer, model)
            self.assertEqual(parsed.unit, Unit.metric)

            def streamed(model: str = model) -> Any:
                with client.chat.completions.stream(model=model, messages=QUESTION, response_format=Answer) as stream:
                    return stream.get_final_completion()

            completion = yield deferToThread(streamed)
            self.assertIsInstance(completion.choices[0].message.parsed, Answer, model)
        json_object = yield deferToThread(
            client.chat.completions.create,
            model="kimi/moonshot-v1-8k",
            messages=QUESTION,
            response_format={"type": "json_object"},
        )
        self.assertEqual(json.loads(json_object.choices[0].message.content), {"reply": self.upstream.kimi.reply})

    @inlineCallbacks
    def test_reasoning_usage(self):
        # Case 4 of the issue: thinking tokens are completion tokens.
        metadata = {
            "promptTokenCount": 20,
            "candidatesTokenCount": 198,
            "thoughtsTokenCount": 405,
            "totalTokenCount": 623,
        }
        thought = GeminiAnswer((({"text": "Let me think.", "thought": True},), ({"text": "Done."},)), usage=metadata)
        self.upstream.gemini.answers[:] = [thought, thought, thought]
        client = self.sdk(self.gateway())
        for stream in (False, True):
            answer = yield deferToThread(ask, client, QUESTION, stream, reasoning_effort="high")
            self.assertEqual(answer["content"], "Done.")
            usage = answer["usage"]
            self.assertEqual((usage.prompt_tokens, usage.completion_tokens, usage.total_tokens), (20, 603, 623))
            self.assertEqual(usage.completion_tokens_details.reasoning_tokens, 405)
        self.assertEqual(
            self.upstream.gemini.last_body["generationConfig"],
            {"thinkingConfig": {"thinkingLevel": "high", "includeThoughts": True}},
        )
        # The thought summary rides in reasoning_content, never in content.
        response, text = yield self.post(self.gateway(), {"messages": QUESTION, "reasoning_effort": "low"})
        message = json.loads(text)["choices"][0]["message"]
        self.assertEqual((message["content"], message["reasoning_content"]), ("Done.", "Let me think."))

    @inlineCallbacks
    def test_reasoning_effort_budget_and_kimi_usage(self):
        self.upstream.kimi.usage_in_choice = True
        client = self.sdk(self.gateway())
        yield deferToThread(
            client.chat.completions.create, model="gemini/gemini-2.5-flash", messages=QUESTION, reasoning_effort="none"
        )
        self.assertEqual(self.upstream.gemini.last_body["generationConfig"], {"thinkingConfig": {"thinkingBudget": 0}})
        # Moonshot's usage inside choices[0] is also the top-level usage.
        whole = yield deferToThread(client.chat.completions.create, model="kimi/moonshot-v1-8k", messages=QUESTION)
        self.assertEqual(whole.usage.total_tokens, 14)
        streamed = yield deferToThread(
            lambda: collect(
                client.chat.completions.create(
                    model="kimi/moonshot-v1-8k",
                    messages=QUESTION,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
        )
        self.assertEqual(streamed["usage"].total_tokens, 14)
        self.assertEqual(streamed["content"], "Hello from the stand-in.")

    @inlineCallbacks
    def test_new_user_cases(self):
        gateway = self.gateway()
        # Case 1: only a system message -> its text is the user turn.
        response, text = yield self.post(
            gateway, {"messages": [{"role": "system", "content": "Write a haiku about autumn."}]}
        )
        self.assertEqual(response.code, 200, text)
        self.assertEqual(
            self.upstream.gemini.last_body["contents"],
            [{"role": "user", "parts": [{"text": "Write a haiku about autumn."}]}],
        )
        self.assertNotIn("systemInstruction", self.upstream.gemini.last_body)
        # Case 2: empty text never reaches Gemini; the turns still alternate.
        response, text = yield self.post(
            gateway,
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": ""},
                    {"role": "user", "content": "again?"},
                ]
            },
        )
        self.assertEqual(response.code, 200, text)
        self.assertEqual(
            self.upstream.gemini.last_body["contents"],
            [{"role": "user", "parts": [{"text": "hi"}, {"text": "again?"}]}],
        )
        response, text = yield self.post(gateway, {"messages": [{"role": "user", "content": []}]})
        self.assertEqual(response.code, 400)
        self.assertEqual(self.assertOpenAIError(text)["param"], "messages[0].content")


class EmbeddingTests(DataPlaneTestCase):
    @inlineCallbacks
    def test_sdk_default_and_float(self):
        client = self.sdk(self.gateway(default_provider="kimi"))
        # The SDK asks for base64 by default and decodes it.
        result = yield deferToThread(client.embeddings.create, model="text-embedding-3-small", input=["ab", "abc"])
        self.assertEqual(len(result.data), 2)
        self.assertEqual(result.model, "gemini-embedding-001")
        first = result.data[0].embedding
        self.assertEqual(len(first), 8)
        floats = yield deferToThread(
            client.embeddings.create, model="x", input="ab", encoding_format="float", dimensions=4
        )
        # Unit length, as OpenAI's: Google normalises only the full 3072
        # numbers of gemini-embedding-001, and the stand-in none.
        for vector in (first, floats.data[0].embedding):
            self.assertAlmostEqual(math.hypot(*vector), 1.0, places=6)
        for got, want in zip(floats.data[0].embedding, unit_length(first[:4]), strict=True):
            self.assertAlmostEqual(got, want, places=6)
        self.assertEqual((floats.usage.prompt_tokens, floats.usage.total_tokens), (0, 0))
        body = self.upstream.gemini.last_body
        self.assertEqual(
            body,
            {
                "requests": [
                    {
                        "model": "models/gemini-embedding-001",
                        "content": {"parts": [{"text": "ab"}]},
                        "outputDimensionality": 4,
                    }
                ]
            },
        )
        # Not switched with the chat provider: Kimi was never asked.
        self.assertEqual(self.upstream.kimi.requests, 0)
        self.assertEqual(self.upstream.gemini.uris[-1], "/gemini/v1beta/models/gemini-embedding-001:batchEmbedContents")

    def test_unit_length(self):
        self.assertEqual(unit_length([3.0, 4.0]), [0.6, 0.8])
        for kept in ([0.0, 0.0], [0.6, 0.8], [1.0, "x"], [math.inf, 1.0], []):
            self.assertIs(unit_length(kept), kept)

    @inlineCallbacks
    def test_base64_is_little_endian_float32(self):
        # Another embedding model the provider serves, named in the answer.
        self.upstream.gemini.embedding_models.append("other-embedding")
        gateway = self.gateway()
        response, text = yield self.post(
            gateway,
            {"input": "ab", "encoding_format": "base64", "model": "gemini/other-embedding"},
            path="/v1/embeddings",
        )
        self.assertEqual(response.code, 200, text)
        document = json.loads(text)
        raw = base64.b64decode(document["data"][0]["embedding"])
        values = list(struct.unpack("<8f", raw))
        expected = struct.unpack("<8f", struct.pack("<8f", *unit_length([((2 + i) % 7) / 8 - 0.25 for i in range(8)])))
        self.assertEqual(values, list(expected))
        self.assertEqual(document["model"], "other-embedding")

    @inlineCallbacks
    def test_unknown_model(self):
        """
        An embedding model the provider does not serve (a chat model
        included) is Google's 404 NOT_FOUND, as the stand-in answers it:
        passed on as a 404 naming the model.
        """
        gateway = self.gateway()
        for model in ("other-embedding", "gemini-2.5-flash"):
            response, text = yield self.post(
                gateway, {"input": "ab", "model": f"gemini/{model}"}, path="/v1/embeddings"
            )
            self.assertEqual(response.code, 404, text)
            self.assertIn(f"models/{model} is not found", json.loads(text)["error"]["message"])

    @inlineCallbacks
    def test_configured_model_not_served(self):
        """
        EMBEDDING_MODEL naming a model the provider does not serve (an
        operator's typo) is said as the operator's setting, with what to
        do, not as the client's C{model}, which the gateway did not use
        (re-attack s27); a model the request names stays the client's.
        """
        gateway = self.gateway(embedding_model="gemini-embedding-2")
        response, text = yield self.post(
            gateway, {"input": "ab", "model": "text-embedding-3-small"}, path="/v1/embeddings"
        )
        self.assertEqual(response.code, 404, text)
        error = json.loads(text)["error"]
        self.assertIsNone(error["param"])
        self.assertEqual(error["code"], "model_not_found")
        self.assertTrue(
            error["message"].startswith(
                "EMBEDDING_MODEL (gemini/gemini-embedding-2), the model this gateway sends embeddings to when a "
                "request names no <provider>/<model>, is not served: "
            ),
            error["message"],
        )
        self.assertIn("ask the gateway's operator to set EMBEDDING_MODEL", error["message"])
        response, text = yield self.post(
            gateway, {"input": "ab", "model": "gemini/other-embedding"}, path="/v1/embeddings"
        )
        self.assertEqual(response.code, 404, text)
        self.assertNotIn("EMBEDDING_MODEL", json.loads(text)["error"]["message"])

    @inlineCallbacks
    def test_many_inputs_in_batches(self):
        gateway = self.gateway()
        texts = [f"text {i}" for i in range(250)]
        response, text = yield self.post(gateway, {"input": texts, "encoding_format": "float"}, path="/v1/embeddings")
        self.assertEqual(response.code, 200, text)
        self.assertEqual([d["index"] for d in json.loads(text)["data"]], list(range(250)))
        self.assertEqual([len(b["requests"]) for b in self.upstream.gemini.bodies], [100, 100, 50])

    @inlineCallbacks
    def test_dimensions_past_the_models(self):
        """
        A vector longer than any model gives is the provider's 400 (the
        stand-in's, as Gemini's): passed on, nothing built for it.  Past
        Gemini's int32 C{outputDimensionality}, it is the gateway's 400
        naming the field, and nothing is sent to Google.
        """
        gateway = self.gateway()
        response, text = yield self.post(gateway, {"input": "x", "dimensions": 99999}, path="/v1/embeddings")
        self.assertEqual(response.code, 400, text)
        error = self.assertOpenAIError(text)
        self.assertIn("between 1 and 3072", error["message"])
        # Named, with what to do (agent trial s46: param null).
        self.assertEqual(error["param"], "dimensions")
        self.assertIn("send dimensions within the range Google names", error["message"])
        sent = self.upstream.gemini.requests
        for dimensions in (2**31, 2**40):
            response, text = yield self.post(gateway, {"input": "x", "dimensions": dimensions}, path="/v1/embeddings")
            self.assertEqual(response.code, 400, text)
            error = self.assertOpenAIError(text)
            self.assertEqual((error["param"], error["code"]), ("dimensions", "integer_above_max_value"))
            self.assertIn("outputDimensionality is a 32-bit integer", error["message"])
        self.assertEqual(self.upstream.gemini.requests, sent)

    @inlineCallbacks
    def test_bad_requests(self):
        gateway = self.gateway()
        for body, param, expected in (
            ({"input": "x", "model": "kimi/moonshot-v1-8k"}, "model", "kimi has no embeddings API"),
            ({"input": []}, "input", "non-empty"),
            ({"input": [1, 2]}, "input", "token id arrays"),
            ({"input": "x", "encoding_format": "int8"}, "encoding_format", "float or base64"),
            ({"input": "x", "dimensions": 0}, "dimensions", "from 1 to 9223372036854775807"),
            # A whole number orjson reads as a float: its range, not "whole number".
            ({"input": "x", "dimensions": 10**30}, "dimensions", "from 1 to 9223372036854775807"),
            ({"input": "x", "dimensions": 8.0}, "dimensions", "(8, not 8.0)"),
            ({"input": "x", "user": 5}, "user", "user must be a string"),
            ({"input": "x", "user": ["u"]}, "user", "user must be a string"),
            ({"input": "x", "model": " KIMI/moonshot-v1-8k"}, "model", "kimi has no embeddings API"),
            ({"input": "x", "model": "gemni/text-embedding-004"}, "model", "did you mean gemini/text-embedding-004?"),
        ):
            response, text = yield self.post(gateway, body, path="/v1/embeddings")
            self.assertEqual(response.code, 400, body)
            error = self.assertOpenAIError(text)
            self.assertEqual(error["param"], param)
            self.assertIn(expected, error["message"])
        self.assertEqual(self.upstream.gemini.requests + self.upstream.kimi.requests, 0)


class BadRequestTests(DataPlaneTestCase):
    """
    Every bad shape of the contract: a 400 naming the field, whichever
    provider the call is for; nothing reaches a provider.
    """

    @inlineCallbacks
    def test_every_400(self):
        gateway = self.gateway()
        call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "P"}'}}
        assistant = {"role": "assistant", "content": None, "tool_calls": [call]}
        cases = [
            ({"messages": QUESTION, "tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
            (
                {"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "bad name"}}]},
                "tools[0].function.name",
            ),
            (
                {
                    "messages": [
                        *QUESTION,
                        {**assistant, "tool_calls": [{**call, "function": {"name": "f", "arguments": {"a": 1}}}]},
                    ]
                },
                "messages[1].tool_calls[0].function.arguments",
            ),
            (
                {"messages": [*QUESTION, assistant, {"role": "tool", "tool_call_id": "c2", "content": "x"}]},
                "messages[2].tool_call_id",
            ),
            (
                {
                    "messages": [
                        *QUESTION,
                        {**assistant, "reasoning_content": 5},
                        {"role": "tool", "tool_call_id": "c1", "content": "x"},
                    ],
                },
                "messages[1].reasoning_content",
            ),
            (
                {
                    "messages": QUESTION,
                    "tools": TOOLS,
                    "tool_choice": {"type": "function", "function": {"name": "nope"}},
                },
                "tool_choice.function.name",
            ),
            ({"messages": QUESTION, "tool_choice": "required"}, "tool_choice"),
            (
                {"messages": [{"role": "user", "content": [{"type": "video", "video": {}}]}]},
                "messages[0].content[0].type",
            ),
            ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
            (
                {
                    "messages": [
                        {
                            "role": "system",
                            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}],
                        }
                    ]
                },
                "messages[0].content[0].type",
            ),
            (
                {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]},
                "messages[0].content[0].file.file_data",
            ),
            ({"messages": QUESTION, "response_format": {"type": "xml"}}, "response_format.type"),
            ({"messages": QUESTION, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
            (
                {"messages": QUESTION, "response_format": {"type": "json_schema", "json_schema": {"name": "a b!"}}},
                "response_format.json_schema.name",
            ),
            # Missing, null, empty or not a string: the name is the field
            # (recheck s41: the parent was named).
            *(
                (
                    {"messages": QUESTION, "response_format": {"type": "json_schema", "json_schema": spec}},
                    "response_format.json_schema.name",
                )
                for spec in ({}, {"name": None}, {"name": ""}, {"name": 5}, {"schema": {"type": "object"}})
            ),
            (
                {
                    "messages": QUESTION,
                    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
                },
                "tools[0].function.parameters.type",
            ),
            ({"messages": QUESTION, "reasoning_effort": "maximum"}, "reasoning_effort"),
            ({"messages": QUESTION, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
            ({"messages": QUESTION, "top_logprobs": 21}, "top_logprobs"),
            ({"messages": [{"role": "user", "content": ""}]}, "messages"),
        ]
        for model in ("gemini/gemini-2.5-flash", "kimi/moonshot-v1-8k"):
            for body, param in cases:
                response, text = yield self.post(gateway, {**body, "model": model})
                self.assertEqual(response.code, 400, (body, text))
                self.assertEqual(self.assertOpenAIError(text)["param"], param, body)
        self.assertEqual(self.upstream.gemini.requests + self.upstream.kimi.requests, 0)
        # Through the SDK: its BadRequestError, the field named.
        client = self.sdk(gateway)
        failure = yield self.assertFailure(
            deferToThread(
                client.chat.completions.create,
                model="x",
                messages=QUESTION,
                tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "nope"}},
            ),
            openai.BadRequestError,
        )
        self.assertIn("not among tools", failure.message)

    @inlineCallbacks
    def test_legacy_functions(self):
        self.upstream.kimi.answers[:] = [KIMI_SUNNY]
        gateway = self.gateway()
        body = {
            "messages": [
                *QUESTION,
                {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
                {"role": "function", "name": "get_weather", "content": "sunny"},
            ],
            "functions": [TOOLS[0]["function"]],
            "function_call": {"name": "get_weather"},
        }
        for model in ("gemini/gemini-2.5-flash", "kimi/moonshot-v1-8k"):
            response, text = yield self.post(gateway, {**body, "model": model})
            self.assertEqual(response.code, 200, text)
        sent = self.upstream.kimi.last_body
        self.assertEqual(sent["tools"], [TOOLS[0]])
        self.assertEqual(sent["tool_choice"], {"type": "function", "function": {"name": "get_weather"}})
        self.assertEqual(sent["messages"][2], {"role": "tool", "tool_call_id": "call_legacy_1", "content": "sunny"})
        self.assertNotIn("functions", sent)
        parts = self.upstream.gemini.last_body["contents"][2]["parts"]
        self.assertEqual(parts, [{"functionResponse": {"name": "get_weather", "response": {"result": "sunny"}}}])
