"""
What a call costs, in C{/metrics}: tokens by provider, model and kind from
every answer's usage (streams included, whether or not the client asked to
see it), the time to a stream's first chunk, and the gateway's own time.

The end-to-end tests drive the official openai SDK against a gateway in
this process, in front of the stand-in upstream, all on 127.0.0.1, and
read C{/metrics} over HTTP.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from openclaw.dataplane.cost import ProviderWait
from openclaw.dataplane.request import parse_chat_request
from openclaw.dataplane.sse import Event
from openclaw.metrics import MAX_MODEL_SERIES, CallCosts
from openclaw.providers.gemini.translate import GeminiWire
from openclaw.providers.openai_compatible import OpenAIStream, OpenAIWire
from openclaw.providers.wire import MalformedAnswer, StreamBroken
from tests.support import RunningGateway
from tests.test_dataplane import HELLO, DataPlaneTestCase

#: The stand-in's reply, "Hello from the stand-in.", is four stream events.
PIECES = 4
REASONING = 3
KIMI_MODEL = "moonshot-v1-8k"
GEMINI_MODEL = "gemini-2.5-pro"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """
    Every sample of a Prometheus exposition, by name and labels.
    """
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


class CostMetricsTests(DataPlaneTestCase):
    @inlineCallbacks
    def metrics(self, gateway: RunningGateway) -> Any:
        response = yield self.http().get(f"http://127.0.0.1:{gateway.api_port}/metrics")
        self.assertEqual(response.code, 200)
        text = yield response.text("utf-8")
        return samples(text)

    def tokens(self, found: Any, provider: str, model: str, kind: str) -> float | None:
        return sample(found, "openclaw_api_tokens_total", provider=provider, model=model, kind=kind)

    @inlineCallbacks
    def test_tokens_whole_and_streamed(self):
        """
        Both providers: a whole answer, a stream without
        C{stream_options.include_usage} (no usage chunk reaches the client,
        yet it is counted) and one with it (exactly one usage chunk, last),
        reasoning tokens included.
        """
        self.upstream.kimi.reasoning_tokens = REASONING
        self.upstream.gemini.reasoning_tokens = REASONING
        gateway = self.gateway()
        client = self.sdk(gateway)

        def stream(model: str, **options: Any) -> list[Any]:
            return list(client.chat.completions.create(model=model, messages=HELLO, stream=True, **options))

        completions: dict[str, int] = {}
        for provider, model in (("kimi", KIMI_MODEL), ("gemini", GEMINI_MODEL)):
            whole = yield deferToThread(client.chat.completions.create, model=f"{provider}/{model}", messages=HELLO)
            self.assertEqual(whole.usage.prompt_tokens, 10, provider)
            self.assertEqual(whole.usage.completion_tokens_details.reasoning_tokens, REASONING, provider)
            completions[provider] = whole.usage.completion_tokens

            plain = yield deferToThread(stream, f"{provider}/{model}")
            text = "".join(c.choices[0].delta.content or "" for c in plain if c.choices)
            self.assertEqual(text, "Hello from the stand-in.", provider)
            self.assertEqual([c for c in plain if c.usage is not None or not c.choices], [], provider)

            counted = yield deferToThread(stream, f"{provider}/{model}", stream_options={"include_usage": True})
            with_usage = [c for c in counted if c.usage is not None]
            self.assertEqual(len(with_usage), 1, provider)
            self.assertIs(with_usage[0], counted[-1])
            self.assertEqual(counted[-1].choices, [])
            self.assertEqual(counted[-1].usage.model_dump(exclude_none=True), whole.usage.model_dump(exclude_none=True))
        # Kimi was asked for the usage even when the client did not ask.
        self.assertEqual(completions["kimi"], PIECES + REASONING)

        found = yield self.metrics(gateway)
        for provider, model in (("kimi", KIMI_MODEL), ("gemini", GEMINI_MODEL)):
            self.assertEqual(self.tokens(found, provider, model, "prompt"), 3 * 10, provider)
            self.assertEqual(self.tokens(found, provider, model, "completion"), 3 * completions[provider], provider)
            self.assertEqual(self.tokens(found, provider, model, "reasoning"), 3 * REASONING, provider)

    @inlineCallbacks
    def test_upstream_asked_for_usage(self):
        """
        An OpenAI-compatible provider is asked for the stream's usage
        whatever the client asked; the client's other stream options are
        kept.
        """
        gateway = self.gateway()
        response, text = yield self.post(
            gateway,
            {"model": f"kimi/{KIMI_MODEL}", "messages": HELLO, "stream": True, "stream_options": {"x": 1}},
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(self.upstream.kimi.last_body["stream_options"], {"x": 1, "include_usage": True})
        self.assertNotIn('"usage"', text)
        found = yield self.metrics(gateway)
        self.assertEqual(self.tokens(found, "kimi", KIMI_MODEL, "completion"), PIECES)

    @inlineCallbacks
    def test_moonshot_usage_in_choice(self):
        """
        Moonshot may report a stream's usage inside the last chunk's
        C{choices[0].usage}: counted from there, and given to a client that
        asked as OpenAI's usage chunk.
        """
        self.upstream.kimi.usage_in_choice = True
        self.upstream.kimi.reasoning_tokens = REASONING
        gateway = self.gateway()
        response, text = yield self.post(gateway, {"model": f"kimi/{KIMI_MODEL}", "messages": HELLO, "stream": True})
        self.assertEqual(response.code, 200)
        self.assertNotIn('"usage"', text)

        def stream() -> list[Any]:
            client = self.sdk(gateway)
            return list(
                client.chat.completions.create(
                    model=f"kimi/{KIMI_MODEL}", messages=HELLO, stream=True, stream_options={"include_usage": True}
                )
            )

        chunks = yield deferToThread(stream)
        with_usage = [c for c in chunks if c.usage is not None]
        self.assertEqual(len(with_usage), 1)
        self.assertIs(with_usage[0], chunks[-1])
        self.assertEqual(chunks[-1].choices, [])
        self.assertEqual(chunks[-1].usage.completion_tokens, PIECES + REASONING)
        self.assertEqual({c.id for c in chunks}, {"chatcmpl-standin"})
        found = yield self.metrics(gateway)
        self.assertEqual(self.tokens(found, "kimi", KIMI_MODEL, "prompt"), 2 * 10)
        self.assertEqual(self.tokens(found, "kimi", KIMI_MODEL, "completion"), 2 * (PIECES + REASONING))
        self.assertEqual(self.tokens(found, "kimi", KIMI_MODEL, "reasoning"), 2 * REASONING)

    @inlineCallbacks
    def test_first_token_and_overhead(self):
        """
        Each stream's time to its first chunk is counted by provider, and
        every call's own time (without the provider's: here a delay before
        the headers and gaps between a stream's events) in the overhead.
        """
        delay = 0.3
        for behaviour in (self.upstream.kimi, self.upstream.gemini):
            behaviour.delay = delay
            behaviour.chunk_interval = 0.05
        gateway = self.gateway()
        for provider, model in (("kimi", KIMI_MODEL), ("gemini", GEMINI_MODEL)):
            response, _ = yield self.post(gateway, {"model": f"{provider}/{model}", "messages": HELLO, "stream": True})
            self.assertEqual(response.code, 200)
        response, _ = yield self.post(gateway, {"model": f"kimi/{KIMI_MODEL}", "messages": HELLO})
        self.assertEqual(response.code, 200)

        found = yield self.metrics(gateway)
        for provider in ("kimi", "gemini"):
            name = "openclaw_api_time_to_first_token_seconds"
            self.assertEqual(sample(found, f"{name}_count", provider=provider), 1, provider)
            self.assertEqual(sample(found, f"{name}_bucket", provider=provider, le="0.25"), 0, provider)
            self.assertGreaterEqual(sample(found, f"{name}_sum", provider=provider), delay, provider)
        self.assertEqual(sample(found, "openclaw_api_overhead_seconds_count"), 3)
        total = sum(sample(found, "openclaw_api_request_seconds_sum", provider=p) or 0 for p in ("kimi", "gemini"))
        self.assertGreater(total, 3 * delay)
        # Without the waits taken out this would be over 0.9 s.
        self.assertLess(sample(found, "openclaw_api_overhead_seconds_sum"), delay)


class CallCostsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = CollectorRegistry()
        self.costs = CallCosts(self.registry)

    def found(self) -> Any:
        return samples(generate_latest(self.registry).decode())

    def test_tokens(self) -> None:
        usage = {"prompt_tokens": 5, "completion_tokens": 7, "completion_tokens_details": {"reasoning_tokens": 2}}
        self.costs.tokens("kimi", "m", usage)
        self.costs.tokens("kimi", "m", {"prompt_tokens": 1})
        found = self.found()
        for kind, count in (("prompt", 6), ("completion", 7), ("reasoning", 2)):
            self.assertEqual(sample(found, "openclaw_api_tokens_total", provider="kimi", model="m", kind=kind), count)

    def test_junk_usage_ignored(self) -> None:
        for usage in (None, "12", [], {"prompt_tokens": "9", "completion_tokens": -1}, {"prompt_tokens": True}):
            self.costs.tokens("kimi", "m", usage)
        self.costs.tokens("kimi", "m", {"completion_tokens_details": {"reasoning_tokens": 1.5}})
        found = self.found()
        values = [v for (name, _), v in found.items() if name == "openclaw_api_tokens_total"]
        self.assertLessEqual(set(values), {0.0})  # nothing counted (a series at 0, or none)

    def test_models_bounded(self) -> None:
        """
        Past L{MAX_MODEL_SERIES} distinct models a provider's calls are
        counted under "other": random model names cannot grow the series.
        """
        for i in range(MAX_MODEL_SERIES + 50):
            self.costs.tokens("kimi", f"model-{i}", {"prompt_tokens": 1})
        self.costs.tokens("kimi", "model-0", {"prompt_tokens": 1})
        self.costs.tokens("gemini", "model-999", {"prompt_tokens": 1})
        found = self.found()
        models = {
            dict(labels)["model"]
            for (name, labels), _ in found.items()
            if name == "openclaw_api_tokens_total" and dict(labels)["provider"] == "kimi"
        }
        self.assertEqual(len(models), MAX_MODEL_SERIES + 1)
        self.assertIn("other", models)
        prompt = "openclaw_api_tokens_total"
        self.assertEqual(sample(found, prompt, provider="kimi", model="other", kind="prompt"), 50)
        self.assertEqual(sample(found, prompt, provider="kimi", model="model-0", kind="prompt"), 2)
        self.assertEqual(sample(found, prompt, provider="gemini", model="model-999", kind="prompt"), 1)

    def test_first_token_and_overhead(self) -> None:
        self.costs.first_token("gemini", 0.4)
        self.costs.overhead(0.002)
        self.costs.overhead(-0.000001)  # a clock step back counts as no time
        found = self.found()
        self.assertEqual(sample(found, "openclaw_api_time_to_first_token_seconds_count", provider="gemini"), 1)
        self.assertEqual(sample(found, "openclaw_api_overhead_seconds_count"), 2)
        self.assertEqual(sample(found, "openclaw_api_overhead_seconds_sum"), 0.002)
        buckets = "openclaw_api_overhead_seconds_bucket"
        self.assertEqual(sample(found, buckets, le="0.0001"), 1)
        self.assertEqual(sample(found, buckets, le="0.001"), 1)
        self.assertEqual(sample(found, buckets, le="0.0025"), 2)
        self.assertEqual(sample(found, buckets, le="+Inf"), 2)


class ProviderWaitTests(SynchronousTestCase):
    def test_waits_add_up(self) -> None:
        clock = Clock()
        wait = ProviderWait(clock.seconds)
        wait.end()  # not waiting: nothing
        wait.begin()
        clock.advance(2)
        wait.begin()  # already waiting: the first start counts
        clock.advance(1)
        wait.end()
        clock.advance(5)  # the gateway's own time
        wait.begin()
        clock.advance(0.5)
        wait.end()
        wait.end()
        self.assertEqual(wait.waited, 3.5)


class UsageTests(SynchronousTestCase):
    def test_completion_usage(self) -> None:
        """
        The usage comes with the answer, read in the one parse of it: at the
        top level, else in Moonshot's C{choices[0].usage}; Gemini's
        C{usageMetadata} translated.
        """
        wire = OpenAIWire()
        usage = wire.completion(b'{"choices": [], "usage": {"prompt_tokens": 1}}', "m", 0).usage
        self.assertEqual(usage, {"prompt_tokens": 1})
        usage = wire.completion(b'{"choices": [{"usage": {"prompt_tokens": 2}}]}', "m", 0).usage
        self.assertEqual(usage, {"prompt_tokens": 2})
        self.assertIsNone(wire.completion(b'{"choices": []}', "m", 0).usage)
        gemini = b'{"candidates": [{"finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4}}'
        usage = GeminiWire().completion(gemini, "m", 0).usage
        self.assertEqual((usage["prompt_tokens"], usage["completion_tokens"]), (3, 4))
        self.assertIsNone(GeminiWire().completion(b'{"candidates": [{"finishReason": "STOP"}]}', "m", 0).usage)

    def chat(self, **fields: Any) -> Any:
        return parse_chat_request(orjson.dumps({"messages": HELLO, **fields}))

    def test_request_asks_for_usage(self) -> None:
        wire = OpenAIWire()
        body = json.loads(wire.request_body(self.chat(stream=True), "m"))
        self.assertEqual(body["stream_options"], {"include_usage": True})
        # Not for a whole answer: OpenAI refuses stream_options there.
        self.assertNotIn("stream_options", json.loads(wire.request_body(self.chat(), "m")))

    def events(self, stream: OpenAIStream, *documents: Any) -> list[Any]:
        out = []
        for document in documents:
            out += [json.loads(p) for p in stream.payloads(Event(b"", orjson.dumps(document)))]
        stream.payloads(Event(b"", b"[DONE]"))
        return out + [json.loads(p) for p in stream.closing()]

    def test_usage_chunk_stripped_unless_asked(self) -> None:
        usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        chunks = [
            {"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]},
            {"id": "c", "choices": [], "usage": usage},
        ]
        stream = OpenAIStream(include_usage=False)
        self.assertEqual(self.events(stream, *chunks), chunks[:1])
        self.assertEqual(stream.usage, usage)
        stream = OpenAIStream(include_usage=True)
        self.assertEqual(self.events(stream, *chunks), chunks)
        self.assertEqual(stream.usage, usage)

    def test_usage_beside_choices(self) -> None:
        """
        The usage beside the finishing chunk's choices (as DeepSeek and
        vLLM send it): OpenAI's shape all the same, that chunk's usage
        null (or absent, unasked) and the usage in a chunk of its own,
        last, with the stream's id, created and model.
        """
        usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        head = {"id": "c", "object": "chat.completion.chunk", "created": 7, "model": "m"}
        chunks = [
            {**head, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
            {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage},
        ]
        stream = OpenAIStream(include_usage=True)
        self.assertEqual(
            self.events(stream, *chunks),
            [chunks[0], {**chunks[1], "usage": None}, {**head, "choices": [], "usage": usage}],
        )
        self.assertEqual(stream.usage, usage)
        stream = OpenAIStream(include_usage=False)
        finishing = {key: value for key, value in chunks[1].items() if key != "usage"}
        self.assertEqual(self.events(stream, *chunks), [chunks[0], finishing])
        self.assertEqual(stream.usage, usage)
        # Beside the choices and inside the first too (Moonshot's copy): taken from both.
        both = {**chunks[1], "choices": [{**chunks[1]["choices"][0], "usage": usage}]}
        self.assertEqual(self.events(OpenAIStream(include_usage=False), chunks[0], both), [chunks[0], finishing])

    def test_tool_calls_without_index_given_one(self) -> None:
        """
        Tool call deltas without an C{index} (absent or null) get one: a
        delta with an id begins the next call, one without continues the
        last; deltas with theirs are left as they came.
        """

        def chunk(*calls: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            delta = {"tool_calls": list(calls)} if calls else {}
            return {"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        weather = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
        time = {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"tz":'}}
        rest = {"function": {"arguments": ' "UTC"}'}}
        for missing in ({}, {"index": None}):
            chunks = [
                chunk({**weather, **missing, "function": {**weather["function"], "arguments": '{"city": "Oslo"}'}}),
                chunk({**time, **missing}),
                chunk({**rest, **missing}),
                chunk(finish="tool_calls"),
            ]
            out = self.events(OpenAIStream(), *chunks)
            calls = [call for c in out for call in c["choices"][0]["delta"].get("tool_calls", ())]
            self.assertEqual([call["index"] for call in calls], [0, 1, 1], missing)
            self.assertEqual([call.get("id") for call in calls], ["call_1", "call_2", None])
        indexed = chunk({**weather, "index": 0, "function": {**weather["function"], "arguments": "{}"}})
        self.assertEqual(self.events(OpenAIStream(), indexed), [indexed])
        # Each call's first delta with its index, the rest without: they
        # continue the call named last; pieces repeating their call's id
        # continue it too.
        for rest_id in ({}, {"id": "call_2"}):
            chunks = [
                chunk({**weather, "index": 0}),
                chunk({"function": {"arguments": '{"city": "Oslo"}'}}),
                chunk({**time, "index": 1}),
                chunk({**rest, **rest_id}),
                chunk(finish="tool_calls"),
            ]
            out = self.events(OpenAIStream(), *chunks)
            calls = [call for c in out for call in c["choices"][0]["delta"].get("tool_calls", ())]
            self.assertEqual([call["index"] for call in calls], [0, 0, 1, 1], rest_id)
            arguments = ["", "", "", ""]
            for call in calls:
                arguments[call["index"]] += call["function"]["arguments"]
            self.assertEqual(arguments[:2], ['{"city": "Oslo"}', '{"tz": "UTC"}'])
            # The id on the first piece of each call only, as OpenAI sends it
            # (the SDK joins ids it gets again: "call_2call_2").
            self.assertEqual([call.get("id") for call in calls], ["call_1", None, "call_2", None])
        # Pieces with their index that repeat their call's id, type and name.
        repeated = {**time, "index": 0, "function": {"name": "get_time", "arguments": ' "UTC"}'}}
        out = self.events(OpenAIStream(), chunk({**time, "index": 0}), chunk(repeated))
        self.assertEqual(
            out[1]["choices"][0]["delta"]["tool_calls"], [{"index": 0, "function": {"arguments": ' "UTC"}'}}]
        )

    def test_one_call_without_indexes(self) -> None:
        """
        C{parallel_tool_calls: false}: a stream whose tool call deltas
        carry no index (Moonshot's API reference leaves it optional) keeps
        the first call's pieces only, those of the second left out (and no
        "{}" made for it), the finish reason kept; a whole answer keeps its
        first call.
        """
        chat = self.chat(parallel_tool_calls=False)
        weather = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":'}}
        time = {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}}

        def chunk(*calls: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            delta = {"tool_calls": list(calls)} if calls else {}
            return {"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        stream = OpenAIWire().stream(chat, "m", 0)
        out = self.events(
            stream,
            chunk(weather),
            chunk({"function": {"arguments": ' "Oslo"}'}}, time),
            chunk({"function": {"arguments": ""}}),
            chunk(finish="tool_calls"),
        )
        calls = [call for c in out for call in c["choices"][0]["delta"].get("tool_calls", ())]
        self.assertEqual([call["index"] for call in calls], [0, 0])
        self.assertEqual("".join(call["function"]["arguments"] for call in calls), '{"city": "Oslo"}')
        self.assertEqual([c["choices"][0]["finish_reason"] for c in out][-1], "tool_calls")
        self.assertNotIn("get_time", json.dumps(out))
        # Without it, both calls (the second given "{}").
        out = self.events(
            OpenAIWire().stream(self.chat(), "m", 0), chunk(weather), chunk(time), chunk(finish="tool_calls")
        )
        self.assertIn("get_time", json.dumps(out))
        answer = {
            "choices": [
                {"index": 0, "message": {"content": None, "tool_calls": [weather, time]}, "finish_reason": "tool_calls"}
            ]
        }
        message = json.loads(OpenAIWire().completion(orjson.dumps(answer), "m", 0, chat).body)["choices"][0]["message"]
        self.assertEqual([call["id"] for call in message["tool_calls"]], ["call_1"])
        message = json.loads(OpenAIWire().completion(orjson.dumps(answer), "m", 0, self.chat()).body)["choices"][0]
        self.assertEqual([call["id"] for call in message["message"]["tool_calls"]], ["call_1", "call_2"])

    def test_one_call_numbered_oddly(self) -> None:
        """
        C{parallel_tool_calls: false} keeps the first call the model gave,
        whole and streamed, however the stream numbers its calls: a stream
        whose calls are numbered from 1 kept none (the pieces of index 0
        only), ending with finish reason tool_calls and no call; one that
        sent the call of index 1 first kept another call than the whole
        answer, which keeps the first listed (re-attack s29).  Per choice:
        each keeps the first call it began.  So do legacy C{functions}.
        """
        weather = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":'}}
        time = {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}}

        def chunk(*calls: dict[str, Any], choice: int = 0, finish: str | None = None) -> dict[str, Any]:
            delta = {"tool_calls": list(calls)} if calls else {}
            return {"id": "c", "choices": [{"index": choice, "delta": delta, "finish_reason": finish}]}

        for first, second in ((1, 2), (1, 0), (0, 1)):
            chunks = [
                chunk({**weather, "index": first}),
                chunk({"index": first, "function": {"arguments": ' "Oslo"}'}}, {**time, "index": second}),
                chunk({"index": second, "function": {"arguments": ""}}),
                chunk(finish="tool_calls"),
            ]
            out = self.events(OpenAIWire().stream(self.chat(parallel_tool_calls=False), "m", 0), *chunks)
            calls = [call for c in out for call in c["choices"][0]["delta"].get("tool_calls", ())]
            # Renumbered 0, as OpenAI numbers a lone call (re-attack s29:
            # the openai SDK's stream helper failed on index 1).
            self.assertEqual([call["index"] for call in calls], [0, 0], (first, second))
            self.assertEqual([call.get("id") for call in calls], ["call_1", None])
            self.assertEqual("".join(call["function"]["arguments"] for call in calls), '{"city": "Oslo"}')
            self.assertEqual(out[-1]["choices"][0]["finish_reason"], "tool_calls")
            self.assertNotIn("get_time", json.dumps(out))
            # Legacy functions: the same call, as function_call.
            legacy = self.chat(functions=[{"name": "get_weather", "parameters": {}}, {"name": "get_time"}])
            out = self.events(OpenAIWire().stream(legacy, "m", 0), *chunks)
            said = [c["choices"][0]["delta"].get("function_call") for c in out]
            self.assertEqual(said[0]["name"], "get_weather", out)
            self.assertEqual("".join(piece["arguments"] for piece in said if piece), '{"city": "Oslo"}')
            self.assertEqual(out[-1]["choices"][0]["finish_reason"], "function_call")
            self.assertNotIn("get_time", json.dumps(out))
            # The whole answer keeps the same call: the first listed.
            listed = [
                {**weather, "index": first, "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
                {**time, "index": second},
            ]
            answer = {
                "choices": [
                    {"index": 0, "message": {"content": None, "tool_calls": listed}, "finish_reason": "tool_calls"}
                ]
            }
            whole = OpenAIWire().completion(orjson.dumps(answer), "m", 0, self.chat(parallel_tool_calls=False))
            message = json.loads(whole.body)["choices"][0]["message"]
            self.assertEqual([call["id"] for call in message["tool_calls"]], ["call_1"])
        # Two choices, each numbering its calls its own way.
        stream = OpenAIWire().stream(self.chat(parallel_tool_calls=False, n=2), "m", 0)
        out = self.events(
            stream,
            chunk({**weather, "index": 1}, choice=0),
            chunk({**time, "index": 0}, choice=1),
            chunk({**time, "index": 0}, choice=0),
            chunk({**weather, "index": 1}, choice=1),
            chunk(finish="tool_calls", choice=0),
            chunk(finish="tool_calls", choice=1),
        )
        kept: dict[int, list[tuple[int, str | None]]] = {0: [], 1: []}
        for c in out:
            for choice in c["choices"]:
                kept[choice["index"]] += [
                    (call["index"], call.get("id")) for call in choice["delta"].get("tool_calls", ())
                ]
        # Choice 1's call had no arguments: given "{}" (a piece without an id).
        self.assertEqual(kept, {0: [(0, "call_1")], 1: [(0, "call_2"), (0, None)]})

    def test_complete_without_done(self) -> None:
        """
        Complete once every choice asked for has its finish reason and the
        usage is in, [DONE] or not; a finishing choice whose index is no
        integer breaks the stream (it was a TypeError).
        """
        usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        finished = {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        stream = OpenAIStream(asked=2)
        for document in (finished, {"id": "c", "choices": [], "usage": usage}):
            stream.payloads(Event(b"", orjson.dumps(document)))
        self.assertFalse(stream.complete)
        stream.payloads(Event(b"", orjson.dumps({**finished, "choices": [{**finished["choices"][0], "index": 1}]})))
        self.assertTrue(stream.complete)
        self.assertFalse(stream.ended)
        for index in ([0], {"a": 1}, "0", None, True, 1, -1):
            with self.assertRaises(StreamBroken, msg=index):
                broken = {"id": "c", "choices": [{"index": index, "delta": {}, "finish_reason": "stop"}]}
                OpenAIStream().payloads(Event(b"", orjson.dumps(broken)))

    def test_choices_of_the_wrong_type(self) -> None:
        """
        A choice whose C{index} is no integer (on any chunk: its calls are
        kept by it), or whose C{tool_calls} are not a list, is not
        OpenAI's shape: the stream is broken, the whole answer malformed,
        the provider's failure (review s25: a C{TypeError}, a 500 for a
        whole answer and, in a stream, read as the connection cut).
        """
        call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        for legacy in (False, True):
            for index in ({}, [0], "0"):
                chunk = {"id": "c", "choices": [{"index": index, "delta": {"tool_calls": [call]}}]}
                with self.assertRaises(StreamBroken, msg=(legacy, index)) as caught:
                    OpenAIStream(legacy_functions=legacy).payloads(Event(b"", orjson.dumps(chunk)))
                self.assertEqual(caught.exception.code, "upstream_malformed")
            for calls in (True, 1.5, {"a": 1}, "call"):
                chunk = {"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": calls}}]}
                with self.assertRaises(StreamBroken, msg=(legacy, calls)) as caught:
                    OpenAIStream(legacy_functions=legacy).payloads(Event(b"", orjson.dumps(chunk)))
                self.assertEqual(caught.exception.code, "upstream_malformed")
                answer = {"choices": [{"index": 0, "message": {"tool_calls": calls}, "finish_reason": "tool_calls"}]}
                chat = self.chat(functions=[{"name": "f", "parameters": {}}]) if legacy else self.chat()
                with self.assertRaises(MalformedAnswer, msg=(legacy, calls)):
                    OpenAIWire().completion(orjson.dumps(answer), "m", 0, chat)
        # Choices that are not objects (or whose delta is not), a choices
        # that is no list, and, whole, an index that is no integer
        # (re-attack s25: dropped unsaid, or passed on).
        for chunk in (
            {"id": "c", "choices": {"index": 0}},
            {"id": "c", "choices": ["x"]},
            {"id": "c", "choices": [{"index": 0, "delta": ["x"]}]},
        ):
            with self.assertRaises(StreamBroken, msg=chunk):
                OpenAIStream().payloads(Event(b"", orjson.dumps(chunk)))
        for choice in ("x", {"index": "0", "message": {"content": "hi"}}, {"index": None, "message": {}}):
            with self.assertRaises(MalformedAnswer, msg=choice):
                OpenAIWire().completion(orjson.dumps({"choices": [choice]}), "m", 0, self.chat())
        # Null tool calls are no calls.
        answer = {"choices": [{"index": 0, "message": {"content": "hi", "tool_calls": None}, "finish_reason": "stop"}]}
        OpenAIWire().completion(orjson.dumps(answer), "m", 0, self.chat())

    def test_calls_without_arguments_given_them(self) -> None:
        """
        Of parallel streamed calls, the one whose arguments never came
        (Moonshot's C{""}) gets C{"{}"} before its choice's finish reason;
        one with arguments is left as it came.  In the legacy shape, the
        same as C{function_call} pieces.
        """

        def call(index: int, arguments: str, name: str | None = None) -> dict[str, Any]:
            function = {"arguments": arguments, **({"name": name} if name else {})}
            # A call's first piece names it: its id and name (as OpenAI's).
            named = {"id": f"call_{index}"} if name else {}
            return {
                "id": "c",
                "choices": [
                    {
                        "index": 0,
                        "delta": {"tool_calls": [{"index": index, **named, "function": function}]},
                        "finish_reason": None,
                    }
                ],
            }

        chunks = [
            call(0, "", "get_time"),
            call(1, "", "get_weather"),
            call(1, '{"city": "Paris"}'),
            call(0, ""),
            {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        ]
        out = self.events(OpenAIStream(), *chunks)
        self.assertEqual(out, [*chunks[:4], call(0, "{}"), chunks[4]])
        # Whatever the finish reason.
        stopped = {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        out = self.events(OpenAIStream(), chunks[0], stopped)
        self.assertEqual(out, [chunks[0], call(0, "{}"), stopped])
        # A call that begins in the finishing chunk: its "{}" after it (its
        # id and name first), the finish reason last.
        both = call(0, "", "get_time")
        both["choices"][0]["finish_reason"] = "tool_calls"
        out = self.events(OpenAIStream(), both)
        self.assertEqual(
            out,
            [
                call(0, "", "get_time"),
                call(0, "{}"),
                {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
            ],
        )
        legacy = self.events(OpenAIStream(legacy_functions=True), *chunks)
        self.assertEqual(
            [choice for chunk in legacy for choice in chunk["choices"]],
            [
                {"index": 0, "delta": {"function_call": {"name": "get_time", "arguments": ""}}, "finish_reason": None},
                {"index": 0, "delta": {}, "finish_reason": None},
                {"index": 0, "delta": {}, "finish_reason": None},
                {"index": 0, "delta": {"function_call": {"arguments": ""}}, "finish_reason": None},
                {"index": 0, "delta": {"function_call": {"arguments": "{}"}}, "finish_reason": None},
                {"index": 0, "delta": {}, "finish_reason": "function_call"},
            ],
        )

    def test_usage_in_choice(self) -> None:
        usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        last = {
            "id": "c",
            "created": 7,
            "model": "m",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "usage": usage}],
        }
        without = {**last, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        stream = OpenAIStream(include_usage=False)
        self.assertEqual(self.events(stream, last), [without])
        self.assertEqual(stream.usage, usage)
        stream = OpenAIStream(include_usage=True)
        usage_chunk = {"id": "c", "created": 7, "model": "m", "object": "chat.completion.chunk", "choices": []}
        self.assertEqual(self.events(stream, last), [without, {**usage_chunk, "usage": usage}])
