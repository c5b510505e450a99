"""
The data plane's plain functions, no reactor: the Gemini translation both
ways, the SSE decoder, request checking, routing and key checking.
"""

from __future__ import annotations

import base64
import gzip
import json
import time
import zlib
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from openclaw.dataplane.auth import GatewayKeys
from openclaw.dataplane.call import encode_request
from openclaw.dataplane.callids import plain
from openclaw.dataplane.errors import APIError
from openclaw.dataplane.request import ChatRequest, choose_route, is_base64, parse_chat_request
from openclaw.dataplane.sse import MAX_EVENT_BYTES, Event, SSEDecoder, SSEError, encode
from openclaw.providers.gemini import translate as gemini
from openclaw.providers.gemini.callids import MAX_PAYLOAD, carried, new_call_id
from openclaw.providers.gemini.translate import GeminiWire
from openclaw.providers.kimi import KimiAdapter
from openclaw.providers.openai_compatible import OpenAIWire
from openclaw.providers.wire import MalformedAnswer, ModelFailed, OfferedTools, StreamBroken
from openclaw.routing import Route


def chat(**body: Any) -> dict[str, Any]:
    body.setdefault("messages", [{"role": "user", "content": "Hi"}])
    return parse_chat_request(orjson.dumps(body)).body


class ToGeminiTests(SynchronousTestCase):
    def test_roles(self) -> None:
        request = gemini.to_gemini(
            chat(
                messages=[
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "developer", "content": "No emoji."},
                    {"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]},
                    {"role": "user", "content": "C"},
                ]
            )
        )
        self.assertEqual(
            request,
            {
                "contents": [
                    {"role": "user", "parts": [{"text": "Hi"}]},
                    {"role": "model", "parts": [{"text": "Hello."}]},
                    # Consecutive user messages merged into one turn.
                    {"role": "user", "parts": [{"text": "A"}, {"text": "B"}, {"text": "C"}]},
                ],
                "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "No emoji."}]},
            },
        )

    def test_no_system_no_config(self) -> None:
        self.assertEqual(gemini.to_gemini(chat()), {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]})

    def test_generation_config(self) -> None:
        request = gemini.to_gemini(
            chat(temperature=0.7, top_p=0.5, max_tokens=100, stop="END", n=2, model="ignored", stream=True)
        )
        self.assertEqual(
            request["generationConfig"],
            {"temperature": 0.7, "topP": 0.5, "maxOutputTokens": 100, "stopSequences": ["END"], "candidateCount": 2},
        )
        config = gemini.generation_config(
            chat(
                max_completion_tokens=5, max_tokens=9, stop=["a", "b"], response_format={"type": "json_object"}, seed=3
            )
        )
        self.assertEqual(
            config,
            {"maxOutputTokens": 5, "stopSequences": ["a", "b"], "responseMimeType": "application/json", "seed": 3},
        )
        self.assertEqual(gemini.generation_config(chat(temperature=0)), {"temperature": 0})


class FromGeminiTests(SynchronousTestCase):
    def test_completion(self) -> None:
        document = {
            "candidates": [
                {
                    "content": {
                        "role": "model",
                        "parts": [{"text": "thinking...", "thought": True}, {"text": "Hello"}, {"text": " there"}],
                    },
                    "finishReason": "STOP",
                    "index": 0,
                },
                {"content": {"role": "model", "parts": [{"text": "Cut"}]}, "finishReason": "MAX_TOKENS", "index": 1},
            ],
            "usageMetadata": {
                "promptTokenCount": 7,
                "candidatesTokenCount": 3,
                "totalTokenCount": 15,
                "thoughtsTokenCount": 5,
            },
            "modelVersion": "gemini-2.5-flash-001",
        }
        self.assertEqual(
            gemini.from_gemini(document, "gemini-flash-latest", "chatcmpl-1", 1700000000),
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1700000000,
                "model": "gemini-2.5-flash-001",
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": "Hello there",
                            # OpenAI's shape: null unless the model refused.
                            "refusal": None,
                            # A thought summary, never mixed into the content.
                            "reasoning_content": "thinking...",
                        },
                        "finish_reason": "stop",
                        "logprobs": None,
                    },
                    {
                        "index": 1,
                        "message": {"role": "assistant", "content": "Cut", "refusal": None},
                        "finish_reason": "length",
                        "logprobs": None,
                    },
                ],
                "usage": {
                    "prompt_tokens": 7,
                    # Thinking tokens are completion tokens too.
                    "completion_tokens": 8,
                    "total_tokens": 15,
                    "completion_tokens_details": {"reasoning_tokens": 5},
                },
            },
        )

    def test_model_without_version(self) -> None:
        completion = gemini.from_gemini({"candidates": [{"finishReason": "STOP"}]}, "gemini-2.5-pro", "id", 0)
        self.assertEqual(completion["model"], "gemini-2.5-pro")
        self.assertNotIn("usage", completion)

    def test_finish_reasons(self) -> None:
        expected = {
            "STOP": "stop",
            "MAX_TOKENS": "length",
            "SAFETY": "content_filter",
            "RECITATION": "content_filter",
            "PROHIBITED_CONTENT": "content_filter",
            "BLOCKLIST": "content_filter",
            "SPII": "content_filter",
            "LANGUAGE": "content_filter",
            None: None,
        }
        for reason, mapped in expected.items():
            self.assertEqual(gemini.finish_reason(reason), mapped, reason)
        # The model failing is never passed off as one of OpenAI's reasons.
        for reason, code in (
            ("MALFORMED_FUNCTION_CALL", "malformed_function_call"),
            ("OTHER", "other"),
            ("UNEXPECTED_TOOL_CALL", "unexpected_tool_call"),
        ):
            with self.assertRaises(ModelFailed) as caught:
                gemini.finish_reason(reason)
            self.assertEqual(caught.exception.code, code)
            self.assertIn(reason, str(caught.exception))

    def test_prompt_blocked(self) -> None:
        completion = gemini.from_gemini({"promptFeedback": {"blockReason": "SAFETY"}}, "m", "id", 0)
        self.assertEqual(completion["choices"][0]["finish_reason"], "content_filter")
        self.assertEqual(completion["choices"][0]["message"]["content"], "")
        # Why, so that it is not taken for an answer blocked (trial s33).
        self.assertEqual(
            completion["choices"][0]["message"]["refusal"],
            "Gemini blocked the prompt (promptFeedback.blockReason SAFETY): no answer was generated",
        )

    def test_usage(self) -> None:
        self.assertIsNone(gemini.usage(None))
        self.assertEqual(
            gemini.usage({"promptTokenCount": 2}), {"prompt_tokens": 2, "completion_tokens": 0, "total_tokens": 2}
        )


class GeminiStreamTests(SynchronousTestCase):
    def event(self, text: str, finish: str | None = None, index: int = 0, **extra: Any) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]}, "index": index}
        if finish:
            candidate["finishReason"] = finish
        return {"candidates": [candidate], **extra}

    def test_chunks(self) -> None:
        stream = gemini.GeminiStream("gemini-flash-latest", "chatcmpl-9", 5, include_usage=True)
        first = stream.chunk(self.event("Hel", modelVersion="gemini-2.5-flash"))
        self.assertEqual(
            first,
            {
                "id": "chatcmpl-9",
                "object": "chat.completion.chunk",
                "created": 5,
                "model": "gemini-2.5-flash",
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": "Hel"},
                        "finish_reason": None,
                        "logprobs": None,
                    }
                ],
                # Asked for usage: OpenAI's other chunks say "usage": null.
                "usage": None,
            },
        )
        self.assertFalse(stream.complete)
        last = stream.chunk(
            self.event(
                "lo", "STOP", usageMetadata={"promptTokenCount": 1, "candidatesTokenCount": 2, "totalTokenCount": 3}
            )
        )
        assert last is not None
        self.assertEqual(last["choices"][0]["delta"], {"content": "lo"})
        # The finish reason is held back for the last chunk of the choice.
        self.assertIsNone(last["choices"][0]["finish_reason"])
        self.assertTrue(stream.complete)
        finish, closing = stream.closing()
        self.assertEqual(finish["choices"], [{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}])
        self.assertIsNone(last["usage"])
        self.assertIsNone(finish["usage"])
        self.assertEqual(closing["choices"], [])
        self.assertEqual(closing["usage"], {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})

    def test_one_model_per_stream(self) -> None:
        """
        Every chunk names the model of the first, though C{modelVersion}
        first comes with a later event.
        """
        stream = gemini.GeminiStream("gemini-flash-latest", "id", 0)
        first = stream.chunk(self.event("Hel"))
        later = stream.chunk(self.event("lo", "STOP", modelVersion="gemini-2.5-flash"))
        assert first is not None and later is not None
        models = {first["model"], later["model"], *(chunk["model"] for chunk in stream.closing())}
        self.assertEqual(models, {"gemini-flash-latest"})

    def test_complete_needs_every_choice(self) -> None:
        stream = gemini.GeminiStream("m", "id", 0)
        stream.chunk(self.event("a", index=0))
        stream.chunk(self.event("b", index=1))
        stream.chunk(self.event("", "STOP", index=0))
        self.assertFalse(stream.complete)
        stream.chunk(self.event("", "SAFETY", index=1))
        self.assertTrue(stream.complete)
        # One finish chunk per choice; no usage chunk, nor "usage": null: not asked for.
        closing = stream.closing()
        self.assertEqual([chunk["choices"][0]["finish_reason"] for chunk in closing], ["stop", "content_filter"])
        self.assertNotIn("usage", closing[0])

    def test_finished_needs_every_choice_asked(self) -> None:
        """
        With C{n} 2, a choice that finished before the other began makes
        the stream complete (were its body to end now) but not finished:
        its body's end is not waited for only briefly.
        """
        stream = gemini.GeminiStream("m", "id", 0, asked=2)
        stream.chunk(self.event("a", "STOP", index=0))
        self.assertEqual((stream.complete, stream.finished), (True, False))
        stream.chunk(self.event("b", "STOP", index=1))
        self.assertEqual((stream.complete, stream.finished), (True, True))
        unasked = gemini.GeminiStream("m", "id", 0)
        unasked.chunk(self.event("a", "STOP", index=0))
        self.assertTrue(unasked.finished)

    def test_empty_event(self) -> None:
        stream = gemini.GeminiStream("m", "id", 0)
        self.assertIsNone(stream.chunk({"usageMetadata": {"promptTokenCount": 1}}))

    def test_error_event(self) -> None:
        stream = gemini.GeminiStream("m", "id", 0)
        with self.assertRaises(gemini.GeminiStreamError) as caught:
            stream.chunk({"error": {"code": 500, "message": "Internal error", "status": "INTERNAL"}})
        # The provider's words and the kind of error it said it was (trial s30).
        self.assertEqual(str(caught.exception), "Internal error [status=INTERNAL, code=500]")
        with self.assertRaises(gemini.GeminiStreamError):
            stream.chunk([1])

    def test_blocked_prompt(self) -> None:
        stream = gemini.GeminiStream("m", "id", 0)
        chunk = stream.chunk({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}})
        assert chunk is not None
        self.assertEqual(
            chunk["choices"][0]["delta"],
            {
                "role": "assistant",
                "refusal": "Gemini blocked the prompt (promptFeedback.blockReason PROHIBITED_CONTENT): "
                "no answer was generated",
            },
        )
        self.assertTrue(stream.complete)
        (finish,) = stream.closing()
        self.assertEqual(finish["choices"][0]["finish_reason"], "content_filter")


class WireTests(SynchronousTestCase):
    def test_openai_passthrough(self) -> None:
        request = parse_chat_request(
            orjson.dumps({"model": "kimi/x", "messages": [{"role": "developer", "content": "s"}], "seed": 1})
        )
        body = orjson.loads(OpenAIWire().request_body(request, "moonshot-v1-8k"))
        self.assertEqual(body, {"model": "moonshot-v1-8k", "messages": [{"role": "system", "content": "s"}], "seed": 1})
        answer = b'{"choices": [], "model": "moonshot-v1-8k"}'
        self.assertIs(OpenAIWire().completion(answer, "m", 0).body, answer)
        for bad in (b"nope", b"[]", b"{}"):
            self.assertRaises(MalformedAnswer, OpenAIWire().completion, bad, "m", 0)

    def test_compressed_answer(self) -> None:
        """
        An answer compressed unasked (the gateway sends no Accept-Encoding)
        is said so, not only "not JSON" (hostile trial s45: a gzip bomb).
        """
        for wire in (OpenAIWire(), GeminiWire()):
            for body, coding in ((gzip.compress(b"{}"), "gzip"), (zlib.compress(b"{}"), "deflate")):
                with self.assertRaises(MalformedAnswer) as caught:
                    wire.completion(body, "m", 0)
                self.assertEqual(
                    str(caught.exception),
                    f"the answer is not JSON (it looks {coding}-compressed, which the gateway did not ask for)",
                )

    def test_openai_stream(self) -> None:
        stream = OpenAIWire().stream(parse_chat_request(b'{"messages": [{"role": "user", "content": "x"}]}'), "m", 0)
        self.assertEqual(stream.payloads(Event(b"", b'{"choices": []}')), [b'{"choices": []}'])
        self.assertEqual(stream.payloads(Event(b"", b'{"choices":\n[]}')), [b'{"choices":[]}'])
        self.assertFalse(stream.complete)
        self.assertEqual(stream.payloads(Event(b"", b"[DONE]")), [])
        self.assertTrue(stream.complete and stream.ended)
        self.assertRaises(StreamBroken, stream.payloads, Event(b"", b'{"error": {"message": "boom"}}'))
        self.assertRaises(StreamBroken, stream.payloads, Event(b"", b"garbage"))

    def test_gemini_wire(self) -> None:
        request = parse_chat_request(b'{"messages": [{"role": "user", "content": "x"}]}')
        self.assertEqual(
            orjson.loads(GeminiWire().request_body(request, "m")),
            {"contents": [{"role": "user", "parts": [{"text": "x"}]}]},
        )
        answer = b'{"candidates": [{"finishReason": "STOP"}]}'
        completion = orjson.loads(GeminiWire().completion(answer, "m", 0).body)
        self.assertRegex(completion["id"], r"^chatcmpl-[0-9a-f]{24}$")
        ids = {orjson.loads(GeminiWire().completion(answer, "m", 0).body)["id"] for _ in range(1000)}
        self.assertEqual(len(ids), 1000)
        self.assertRaises(MalformedAnswer, GeminiWire().completion, b"[]", "m", 0)


class SSEDecoderTests(SynchronousTestCase):
    def test_fields(self) -> None:
        decoder = SSEDecoder()
        events = decoder.feed(
            b": keep-alive\n\nevent: delta\ndata: one\ndata:two\nid: 3\nretry: 10\n\ndata: [DONE]\n\n"
        )
        self.assertEqual(events, [Event(b"delta", b"one\ntwo"), Event(b"", b"[DONE]")])

    def test_line_endings(self) -> None:
        for separator in (b"\n\n", b"\r\n\r\n", b"\r\r"):
            decoder = SSEDecoder()
            stream = b"data: a" + separator + b"data: b" + separator
            self.assertEqual([e.data for e in decoder.feed(stream)], [b"a", b"b"], separator)

    def test_partial(self) -> None:
        decoder = SSEDecoder()
        self.assertEqual(decoder.feed(b'data: {"a"'), [])
        self.assertEqual(decoder.feed(b": 1}\r"), [])
        # CR ends the blank line at once; the LF after it is part of it.
        self.assertEqual(decoder.feed(b"\n\r"), [Event(b"", b'{"a": 1}')])
        self.assertEqual(decoder.feed(b"\n"), [])
        self.assertEqual(decoder.feed(b"data: b\r\n\r\n"), [Event(b"", b"b")])

    def test_too_long(self) -> None:
        decoder = SSEDecoder()
        with self.assertRaises(SSEError):
            decoder.feed(b"data: " + b"x" * (MAX_EVENT_BYTES + 1))

    def test_endless_empty_data_lines(self) -> None:
        """
        An event of empty C{data:} lines that never ends (a hostile
        upstream) is refused once the lines as received pass the limit:
        each took a list entry while counting for nothing.
        """
        decoder = SSEDecoder()
        piece = b"data:\n" * 65536
        with self.assertRaises(SSEError):
            for _ in range(MAX_EVENT_BYTES // len(piece) + 1):
                decoder.feed(piece)
        # An event just under the limit is still one event.
        decoder = SSEDecoder()
        lines = (MAX_EVENT_BYTES - 16) // len(b"data: x\n")
        (event,) = decoder.feed(b"data: x\n" * lines + b"\n")
        self.assertEqual(len(event.data), 2 * lines - 1)

    def test_line_split_across_pieces(self) -> None:
        """
        A line ends in the middle of a piece after others that held none
        of its end; CRLF split across two pieces is one line end.
        """
        decoder = SSEDecoder()
        for piece in (b"da", b"ta: o", b"n", b"e\r"):
            self.assertEqual(decoder.feed(piece), [])
        self.assertEqual(decoder.feed(b"\ndata: tw"), [])
        self.assertEqual(decoder.feed(b"o\r\n\r\ndata: thr"), [Event(b"", b"one\ntwo")])
        self.assertEqual(decoder.feed(b"ee\n\n"), [Event(b"", b"three")])

    def test_too_long_in_pieces(self) -> None:
        """
        A line that never ends is refused once it is past the limit, however
        small the pieces it comes in.
        """
        decoder = SSEDecoder()
        decoder.feed(b"data: ")
        piece = b"x" * 65536
        with self.assertRaises(SSEError):
            for _ in range(MAX_EVENT_BYTES // len(piece) + 1):
                decoder.feed(piece)

    def test_unended_line_in_small_pieces_is_linear(self) -> None:
        """
        A line that has not ended yet costs time linear in its length
        however small the reads it comes in (a hostile upstream dripping an
        endless line in 512-byte pieces): four times the bytes take about
        four times the CPU, not sixteen.
        """
        piece = b"x" * 512

        def cost(size: int) -> float:
            best = float("inf")
            for _ in range(3):
                decoder = SSEDecoder()
                decoder.feed(b"data: ")
                started = time.process_time()
                for _ in range(size // len(piece)):
                    decoder.feed(piece)
                self.assertEqual(decoder.feed(b"\n\n"), [Event(b"", b"x" * size)])
                best = min(best, time.process_time() - started)
            return best

        small, large = cost(1024 * 1024), cost(4 * 1024 * 1024)
        # Linear: about 4 times; quadratic (joining the whole line at every
        # piece): about 16.  The floor keeps timer noise out of a fast run.
        self.assertLess(large, 8 * small + 0.05, (small, large))

    def test_encode(self) -> None:
        self.assertEqual(encode(b'{"a":1}'), b'data: {"a":1}\n\n')

    @settings(max_examples=200, deadline=None)
    @given(
        payloads=st.lists(
            st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), min_size=1),
            max_size=6,
        ),
        separator=st.sampled_from([b"\n", b"\r\n", b"\r"]),
        cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
    )
    def test_split_anywhere(self, payloads: list[str], separator: bytes, cuts: list[int]) -> None:
        """
        However the bytes are cut into chunks, the same events come out.
        """
        stream = b"".join(b"data: " + p.encode() + separator + separator for p in payloads)
        positions = sorted({min(c, len(stream)) for c in cuts})
        decoder = SSEDecoder()
        events: list[Event] = []
        start = 0
        for position in [*positions, len(stream)]:
            events.extend(decoder.feed(stream[start:position]))
            start = position
        self.assertEqual([e.data for e in events], [p.encode() for p in payloads])


class RequestTests(SynchronousTestCase):
    def test_function_fields_null(self) -> None:
        """
        A function's description or parameters null is "not set", as every
        field; parameters without a type are taken.
        """
        for function in (
            {"name": "f", "description": None, "parameters": None},
            {"name": "f", "parameters": {}},
            {"name": "f", "parameters": {"type": "object", "properties": {}}},
            {"name": "f", "parameters": {"type": None}},
            {"name": "f", "parameters": {"type": "OBJECT"}},
        ):
            body = {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": function}],
            }
            request = parse_chat_request(json.dumps(body).encode())
            parameters = request.body["tools"][0]["function"].get("parameters")
            if parameters and "type" in function["parameters"]:
                # Null and "OBJECT" are sent as JSON Schema spells it
                # (recheck s41: as given, a provider's validator may refuse them).
                self.assertEqual(parameters["type"], "object", function)

    def test_valid(self) -> None:
        request = parse_chat_request(
            b'{"model": "m", "stream": true, "stream_options": {"include_usage": true},'
            b' "messages": [{"role": "user", "content": "x"}]}'
        )
        self.assertTrue(request.stream)
        self.assertTrue(request.include_usage)
        self.assertEqual(request.model, "m")

    def test_invalid(self) -> None:
        for raw, param in (
            (b'{"messages": [{"role": "user", "content": "x"}], "stream_options": 1}', "stream_options"),
            (b'{"messages": [{"role": "user", "content": "x"}], "top_p": 2}', "top_p"),
            (b'{"messages": [{"role": "user", "content": "x"}], "tool_choice": "any"}', "tool_choice"),
            (
                b'{"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]}',
                "messages[1].tool_call_id",
            ),
        ):
            with self.assertRaises(APIError) as caught:
                parse_chat_request(raw)
            self.assertEqual(caught.exception.status, 400)
            self.assertEqual(caught.exception.param, param)

    def test_optional_fields(self) -> None:
        """
        Each optional field is checked when present: a value OpenAI's API
        would refuse is a 400 naming the field; a valid one, or null, passes.
        """
        fields: dict[str, tuple[list[Any], list[Any]]] = {
            "temperature": ([0, 2, 0.7], [2.1, -0.1, "1", True]),
            "top_p": ([0, 1, 0.5], [1.5, "x", False]),
            "presence_penalty": ([-2, 2, 0.0], [2.5, -3, "0"]),
            "frequency_penalty": ([-2, 2, 1.5], [-2.5, 3, [1]]),
            "max_tokens": ([1, 4096], [0, -1, 1.5, True, "5"]),
            "max_completion_tokens": ([1, 100], [0, 2.5, False]),
            "n": ([1, 3], [0, "2", True]),
            "stop": (["x", ["a", "b"], []], [1, ["a", 2], {"a": 1}]),
            "parallel_tool_calls": ([True, False], ["yes", 1]),
            "logprobs": ([True, False], [0, "true"]),
            "top_logprobs": ([0, 20], [21, -1, 1.5, True]),
            "seed": ([0, -5, 123456789], [1.5, "1", True]),
            "reasoning_effort": (["low", "medium", "high", "xhigh", "max"], ["maximum", 3, ""]),
            "response_format": ([{"type": "text"}, {"type": "json_object"}], [{"type": "xml"}, "json", 1]),
        }
        # What a field needs alongside it (OpenAI's rule).
        needs = {"top_logprobs": {"logprobs": True}}
        messages = [{"role": "user", "content": "x"}]
        for name, (good, bad) in fields.items():
            for value in [*good, None]:
                parse_chat_request(orjson.dumps({"messages": messages, **needs.get(name, {}), name: value}))
            for value in bad:
                with self.assertRaises(APIError, msg=(name, value)) as caught:
                    parse_chat_request(orjson.dumps({"messages": messages, **needs.get(name, {}), name: value}))
                self.assertEqual(caught.exception.status, 400)
                self.assertTrue(caught.exception.param.startswith(name), (name, value, caught.exception.param))

    def test_message_name(self) -> None:
        """
        A message's C{name} is a string (OpenAI's participant name), null
        or left out; another type is a 400 naming it, on every role (it
        went to Kimi as sent: re-attack s27).
        """
        for role in ("user", "system", "assistant", "developer"):
            for name in ("ann", None):
                parse_chat_request(orjson.dumps({"messages": [{"role": role, "content": "x", "name": name}]}))
            for name in (5, [1], {"a": 1}, True):
                with self.assertRaises(APIError) as caught:
                    parse_chat_request(orjson.dumps({"messages": [{"role": role, "content": "x", "name": name}]}))
                self.assertEqual((caught.exception.status, caught.exception.param), (400, "messages[0].name"))

    def test_every_field_of_every_type(self) -> None:
        """
        Each value of a full chat request (every field an agent sends, at
        every depth) replaced by a value of each JSON type is refused with
        a 400 (L{APIError}) or taken, and the request taken is encoded for
        Kimi and Gemini alike (or refused with a 400): no other exception,
        which the gateway would answer with a 500.  (A list as an image's
        C{detail} or C{response_format}'s C{type} was looked up in a set:
        C{TypeError}, unhashable.)
        """
        full: dict[str, Any] = {
            "model": "m",
            "messages": [
                {"role": "system", "content": "s"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "hi"},
                        {"type": "image_url", "image_url": {"url": "https://e.com/a.png", "detail": "low"}},
                        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "r"},
            ],
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}},
                }
            ],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}},
            "reasoning_effort": "low",
            "temperature": 0.5,
            "top_p": 0.5,
            "max_tokens": 10,
            "max_completion_tokens": 5,
            "stop": ["x"],
            "n": 1,
            "seed": 1,
            "logprobs": True,
            "top_logprobs": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "u",
            "parallel_tool_calls": True,
            "presence_penalty": 0,
            "frequency_penalty": 0,
            "logit_bias": {"1": 1},
            "metadata": {"a": "b"},
        }

        def paths(value: Any, path: tuple[Any, ...] = ()) -> Any:
            if path:
                yield path
            children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
            for key, child in children:
                yield from paths(child, (*path, key))

        odd: list[Any] = [[], {}, [[]], {"a": []}, None, True, 1.5, "x", -1, 2**63 - 1]
        wires = ((OpenAIWire(), "kimi-k2", "kimi"), (GeminiWire(), "gemini-3-flash-preview", "gemini"))
        for path in list(paths(full)):
            for value in odd:
                body = orjson.loads(orjson.dumps(full))
                holder = body
                for key in path[:-1]:
                    holder = holder[key]
                holder[path[-1]] = value
                try:
                    chat = parse_chat_request(orjson.dumps(body))
                    for wire, model, provider in wires:
                        try:
                            encode_request(wire, chat, model, provider, OfferedTools())
                        except APIError:
                            pass
                except APIError as e:
                    self.assertEqual(e.status, 400, (path, value))
                except Exception as e:
                    self.fail(f"{path} = {value!r}: {type(e).__name__}: {e}")

    def test_routes(self) -> None:
        active = Route("gemini", "gemini-flash-latest")
        ids = ("kimi", "gemini")
        self.assertEqual(choose_route("kimi/moonshot-v1-8k", active, ids), Route("kimi", "moonshot-v1-8k"))
        self.assertEqual(
            choose_route("gemini/models/gemini-2.5-pro", active, ids), Route("gemini", "models/gemini-2.5-pro")
        )
        for other in (
            None,
            "gpt-4o",
            "openai/gpt-4o",
            "google/gemini-2.5-pro",
            "moonshot/kimi-k2.5",
            "moonshot-v1-8k",
            "kimi-k2/x",
            "gemma/x",
            "mini/x",
            "kimi moonshot-v1-8k",
        ):
            self.assertEqual(choose_route(other, active, ids), active)
        # A provider's id misspelled: plainly meant to pick a model (agent
        # trial s46: served by the active route without a word).
        for typo, meant in (("gemeni/gemini-2.5-pro", "gemini/gemini-2.5-pro"), ("Kimmi/kimi-k2.5", "kimi/kimi-k2.5")):
            error = self.assertRaises(APIError, choose_route, typo, active, ids)
            self.assertEqual((error.status, error.param), (400, "model"))
            self.assertIn(f"names no provider of this gateway: did you mean {meant}?", error.message)
        self.assertRaises(APIError, choose_route, "kimi/ ", active, ids)
        # The provider's id in any case, space around the whole ignored: a
        # client pinning Kimi is not moved to the active provider unseen.
        for pinned in ("KIMI/moonshot-v1-8k", "Kimi/moonshot-v1-8k", " kimi/moonshot-v1-8k", " kimi/moonshot-v1-8k "):
            self.assertEqual(choose_route(pinned, active, ids), Route("kimi", "moonshot-v1-8k"), pinned)


class KeyTests(SynchronousTestCase):
    def test_check(self) -> None:
        keys = GatewayKeys.of(["alpha-key", "beta-key"])
        self.assertIsNone(keys.check(b"Bearer alpha-key"))
        self.assertIsNone(keys.check(b"bearer beta-key"))
        for header in (None, b"alpha-key", b"Basic alpha-key", b"Bearer alpha", b"Bearer ", b"Bearer alpha-keyx"):
            error = keys.check(header)
            assert error is not None
            self.assertEqual(error.status, 401)
            self.assertEqual(error.code, "invalid_api_key")
        error = GatewayKeys.of([]).check(b"Bearer alpha-key")
        assert error is not None
        self.assertEqual(error.code, "gateway_api_keys_not_set")
        self.assertNotIn("alpha", repr(keys))

    def test_consumer_keys_before_the_table_loads(self) -> None:
        """
        Before the consumers load, a consumer key is a retryable 503; when
        their database is a later openclaw's, one no retry mends (it said
        "starting, retry in 2 s" for ever).
        """
        from types import SimpleNamespace

        from openclaw.consumers.prices import PriceTable
        from openclaw.consumers.store import NewerSchema
        from openclaw.consumers.table import ConsumerTable

        store = SimpleNamespace(newer_schema=None)
        table = ConsumerTable(store, PriceTable.with_overrides({}), clock=lambda: 0.0)  # type: ignore[arg-type]
        keys = GatewayKeys.of(["alpha-key"], table)
        key = b"Bearer ock-" + b"A" * 40
        loading = keys.identify(key)
        assert isinstance(loading, APIError)
        self.assertEqual((loading.status, loading.code), (503, "consumers_loading"))
        store.newer_schema = NewerSchema("at schema version 7")
        unusable = keys.identify(key)
        assert isinstance(unusable, APIError)
        self.assertEqual((unusable.status, unusable.code), (503, "consumers_unavailable"))
        self.assertIn((b"x-should-retry", b"false"), unusable.headers)
        self.assertIsNone(keys.check(b"Bearer alpha-key"))


class Base64Tests(SynchronousTestCase):
    """
    Base64 as RFC 4648 section 4 has it, the rule image, file and audio
    data are held to.
    """

    def test_rfc_4648(self) -> None:
        for data in ("", "QUJD", "QUI=", "QQ==", "ABC=", "QUJDQQ==", "a+/9", "QUJD" * 1000):
            self.assertTrue(is_base64(data), data)
        not_base64 = (
            "Q",
            "QQ=",
            "QUJDRA",
            "QUJD\n",
            "QU JD",
            "QUJD====",  # padding past the data: the strict decoder alone takes it
            "QUJD=",  # likewise
            "A===",
            "=QUJD",
            "QQ==QUJD",
            "QQ=A",
            "QUJ-",  # the URL-safe alphabet is not base64's
            "QUJ_",
            "QUJ\u00e9",
            "\u00e9\u00e9\u00e9\u00e9",
        )
        for data in not_base64:
            self.assertFalse(is_base64(data), data)

    def test_spaces_without_line_breaks_cost_linear_time(self) -> None:
        """
        Base64 with a long run of spaces (and no line break) is refused at
        once: the search for line breaks wrapped in spaces took time in the
        square of the run (re-attack s28: 20,000 spaces held the event loop
        4 s; 50,000 would take half a minute).
        """
        for kind, part in (
            ("image_url", lambda data: {"url": "data:image/png;base64," + data}),
            ("input_audio", lambda data: {"data": data, "format": "wav"}),
        ):
            data = "QUJD" + " " * 50_000 + "QUJD"
            body = {"model": "m", "messages": [{"role": "user", "content": [{"type": kind, kind: part(data)}]}]}
            started = time.process_time()
            with self.assertRaises(APIError):
                parse_chat_request(orjson.dumps(body))
            self.assertLess(time.process_time() - started, 1.0, kind)
        # Wrapped in lines, with spaces, tabs and CR around the breaks: unwrapped.
        body = {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD \r\n\tQUJD\nQQ=="}}
                    ],
                }
            ],
        }
        parsed = parse_chat_request(orjson.dumps(body))
        self.assertEqual(
            parsed.body["messages"][0]["content"][0]["image_url"]["url"], "data:image/png;base64,QUJDQUJDQQ=="
        )


class CallIdTests(SynchronousTestCase):
    """
    Tool call ids that carry Gemini's call id and thought signature; plain
    for any wire that does not read them.
    """

    def test_round_trip(self) -> None:
        for gemini_id, signature in (("fc-1", "c2ln+/="), (None, "sig"), ("fc-2", None)):
            call_id = new_call_id(gemini_id, signature)
            self.assertRegex(call_id, r"^call_[0-9a-f]{24}_gs1_[A-Za-z0-9_-]+$")
            self.assertEqual(carried(call_id), (gemini_id, signature))
            self.assertRegex(plain(call_id), r"^call_[0-9a-f]{24}$")
        self.assertRegex(new_call_id(), r"^call_[0-9a-f]{24}$")
        # Unique, never derived from the function name.
        self.assertEqual(len({new_call_id("same", "same") for _ in range(1000)}), 1000)

    def test_defensive_decoding(self) -> None:
        for call_id in ("call_1", "get_weather:0", "x_gs1_", "x_gs1_!!!", "x_gs1_e30", "x_gs1_WzEsMiwzXQ", "_gs1_abc"):
            self.assertEqual(carried(call_id), (None, None), call_id)
        self.assertEqual(plain("get_weather:0"), "get_weather:0")
        self.assertEqual(plain("_gs1_abc"), "_gs1_abc")

    def test_client_ids_holding_the_mark_stay_whole(self) -> None:
        """
        Only an id of the gateway's making (C{call_<24 hex>}, the mark, a
        payload) is cut for a provider that does not read carried ids: two
        of a client's own ids that hold the mark stay two ids, not one
        (trial s28: both went to Kimi as C{call_abc}).
        """
        for call_id in ("call_abc_gs1_AAA", "x_gs1_abc", "call_0123456789abcdef01234567_gs1_", "call_ABCDEF_gs1_e30"):
            self.assertEqual(plain(call_id), call_id)
        self.assertEqual(plain("call_0123456789abcdef01234567_gs1_e30"), "call_0123456789abcdef01234567")
        calls = [
            {"id": call_id, "type": "function", "function": {"name": "f", "arguments": "{}"}}
            for call_id in ("call_abc_gs1_AAA", "call_abc_gs1_BBB")
        ]
        body = {
            "model": "m",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_abc_gs1_BBB", "content": "b"},
                {"role": "tool", "tool_call_id": "call_abc_gs1_AAA", "content": "a"},
            ],
        }
        messages = parse_chat_request(orjson.dumps(body)).plain_ids().body["messages"]
        self.assertEqual([call["id"] for call in messages[1]["tool_calls"]], ["call_abc_gs1_AAA", "call_abc_gs1_BBB"])
        self.assertEqual(
            [message["tool_call_id"] for message in messages[2:]], ["call_abc_gs1_BBB", "call_abc_gs1_AAA"]
        )

    def test_clashing_ids_stay_whole(self) -> None:
        """
        A client's own C{call_<24 hex>} beside an id of the gateway's that
        carries a payload after it: plain, the two calls would be one (and
        so would their results); that id is sent whole instead, the others
        plain (agent trial s40).
        """
        signed = "call_0123456789abcdef01234567_gs1_WyJhIiwiYiJd"
        other = "call_fedcba9876543210fedcba98_gs1_WyJhIiwiYiJd"
        calls = [
            {"id": call_id, "type": "function", "function": {"name": "f", "arguments": "{}"}}
            for call_id in (signed, "call_0123456789abcdef01234567", other)
        ]
        body = {
            "model": "m",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": signed, "content": "a"},
                {"role": "tool", "tool_call_id": "call_0123456789abcdef01234567", "content": "b"},
                {"role": "tool", "tool_call_id": other, "content": "c"},
            ],
        }
        sent = parse_chat_request(orjson.dumps(body)).plain_ids()
        self.assertFalse(sent.carried_ids)
        messages = sent.body["messages"]
        expected = [signed, "call_0123456789abcdef01234567", "call_fedcba9876543210fedcba98"]
        self.assertEqual([call["id"] for call in messages[1]["tool_calls"]], expected)
        self.assertEqual([m["tool_call_id"] for m in messages[2:]], expected)
        # Without the clash, the signed id goes plain.
        body["messages"][1]["tool_calls"] = calls[:1]
        del body["messages"][3:]
        messages = parse_chat_request(orjson.dumps(body)).plain_ids().body["messages"]
        self.assertEqual(messages[1]["tool_calls"][0]["id"], "call_0123456789abcdef01234567")

    def test_empty_strings_are_none(self) -> None:
        """
        A crafted payload of empty strings carries nothing: Gemini gets no
        C{"id": ""}, and the placeholder instead of an empty signature.
        """

        def crafted(gemini_id: str, signature: str) -> str:
            payload = base64.urlsafe_b64encode(orjson.dumps([gemini_id, signature])).rstrip(b"=").decode()
            return f"call_0123456789abcdef01234567_gs1_{payload}"

        self.assertEqual(carried(crafted("", "")), (None, None))
        self.assertEqual(carried(crafted("", "sig")), (None, "sig"))
        self.assertEqual(carried(crafted("fc-1", "")), ("fc-1", None))
        self.assertRegex(new_call_id("", ""), r"^call_[0-9a-f]{24}$")
        self.assertEqual(carried(new_call_id("fc-1", "")), ("fc-1", None))
        call_id = crafted("", "")
        call = {"id": call_id, "type": "function", "function": {"name": "f", "arguments": "{}"}}
        messages = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": "ok"},
        ]
        contents = gemini.to_gemini(chat(messages=messages))["contents"]
        self.assertEqual(
            contents[1]["parts"][0],
            {"functionCall": {"name": "f", "args": {}}, "thoughtSignature": gemini.SKIP_SIGNATURE},
        )
        self.assertEqual(contents[2]["parts"][0], {"functionResponse": {"name": "f", "response": {"result": "ok"}}})

    def test_bounded(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        call_id = new_call_id("fc-1", "s" * (MAX_PAYLOAD * 2))
        self.assertLess(len(call_id), 100)
        self.assertEqual(carried(call_id), ("fc-1", None))
        # Said, once: the next turn gets Google's placeholder.
        (warning,) = [e for e in events if "thought signature" in e.get("log_format", "")]
        self.assertEqual(warning["length"], MAX_PAYLOAD * 2)
        del events[:]
        # A Gemini id too long to carry, with or without a signature.
        for signature in ("sig-A", None):
            call_id = new_call_id("f" * (MAX_PAYLOAD * 2), signature)
            self.assertRegex(call_id, r"^call_[0-9a-f]{24}$")
        # The id was too long, not the signature: nothing said of it.
        self.assertEqual([e for e in events if "thought signature" in e.get("log_format", "")], [])

    def test_plain_for_other_wires(self) -> None:
        """
        The ids of a Gemini tool loop go back to Gemini as they came, and
        plain to a wire that does not read carried ids.
        """
        call_id = new_call_id("fc-1", "sig-A")
        call = {"id": call_id, "type": "function", "function": {"name": "f", "arguments": "{}"}}
        messages = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": "ok"},
        ]
        chat = parse_chat_request(orjson.dumps({"messages": messages}))
        self.assertTrue(chat.carried_ids)
        sent = orjson.loads(encode_request(OpenAIWire(), chat, "kimi-k2", "kimi", OfferedTools()))["messages"]
        self.assertEqual(sent[1]["tool_calls"][0]["id"], plain(call_id))
        self.assertEqual(sent[2]["tool_call_id"], plain(call_id))
        self.assertEqual(chat.body["messages"], messages)
        contents = orjson.loads(encode_request(GeminiWire(), chat, "gemini-2.5-pro", "gemini", OfferedTools()))[
            "contents"
        ]
        self.assertEqual(contents[1]["parts"][0]["thoughtSignature"], "sig-A")
        self.assertEqual(contents[1]["parts"][0]["functionCall"]["id"], "fc-1")


class ToolTranslationTests(SynchronousTestCase):
    def test_thinking_config(self) -> None:
        for effort, budget, level in (
            ("none", 0, "minimal"),
            ("minimal", 1024, "minimal"),
            ("low", 1024, "low"),
            ("medium", 8192, "medium"),
            ("high", 24576, "high"),
        ):
            thoughts = {} if effort == "none" else {"includeThoughts": True}
            config = gemini.generation_config(chat(reasoning_effort=effort), "models/gemini-2.5-flash")
            self.assertEqual(config["thinkingConfig"], {"thinkingBudget": budget, **thoughts})
            config = gemini.generation_config(chat(reasoning_effort=effort), "gemini-3-flash-preview")
            self.assertEqual(config["thinkingConfig"], {"thinkingLevel": level, **thoughts})

    def test_tool_choice(self) -> None:
        tools = [{"type": "function", "function": {"name": "f"}}]
        for choice, mode in (("auto", "AUTO"), ("none", "NONE"), ("required", "ANY")):
            request = gemini.to_gemini(chat(tools=tools, tool_choice=choice))
            self.assertEqual(request["toolConfig"], {"functionCallingConfig": {"mode": mode}})
            self.assertEqual(request["tools"], [{"functionDeclarations": [{"name": "f"}]}])

    def test_tool_turns_merge(self) -> None:
        calls = [
            {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": '{"i": %d}' % i}} for i in (1, 2)
        ]
        request = gemini.to_gemini(
            chat(
                messages=[
                    {"role": "user", "content": "go"},
                    {"role": "assistant", "content": "Calling.", "tool_calls": calls},
                    {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": '{"ok": 2}'}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "42"},
                    {"role": "user", "content": "and?"},
                ]
            )
        )
        self.assertEqual(
            request["contents"],
            [
                {"role": "user", "parts": [{"text": "go"}]},
                {
                    "role": "model",
                    "parts": [
                        {"text": "Calling."},
                        {
                            "functionCall": {"name": "f", "args": {"i": 1}},
                            "thoughtSignature": "skip_thought_signature_validator",
                        },
                        {"functionCall": {"name": "f", "args": {"i": 2}}},
                    ],
                },
                {
                    "role": "user",
                    "parts": [
                        {"functionResponse": {"name": "f", "response": {"result": "42"}}},
                        {"functionResponse": {"name": "f", "response": {"ok": 2}}},
                        {"text": "and?"},
                    ],
                },
            ],
        )

    def test_answer_with_calls(self) -> None:
        document = {
            "candidates": [
                {
                    "content": {
                        "parts": [
                            {"text": "Let me look."},
                            {"functionCall": {"name": "f", "args": {"a": 1}}, "thoughtSignature": "sig"},
                            {"functionCall": {"name": "f", "args": {"a": 2}}},
                        ]
                    },
                    "finishReason": "STOP",
                }
            ],
            "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 2, "cachedContentTokenCount": 1},
        }
        completion = gemini.from_gemini(document, "m", "id", 0)
        choice = completion["choices"][0]
        self.assertEqual(choice["finish_reason"], "tool_calls")
        self.assertEqual(choice["message"]["content"], "Let me look.")
        calls = choice["message"]["tool_calls"]
        self.assertEqual([c["function"]["arguments"] for c in calls], ['{"a":1}', '{"a":2}'])
        self.assertNotEqual(calls[0]["id"], calls[1]["id"])
        self.assertEqual(completion["usage"]["prompt_tokens_details"], {"cached_tokens": 1})


class OtherToolsTests(SynchronousTestCase):
    """
    A request's tools of types other than functions are looked for (and
    refused where the provider does not take them) only when the body
    names one of the types offered, or holds a \\u escape that could spell
    one: a plain request costs Gemini's calls no walk of its history.
    """

    def setUp(self) -> None:
        self.offered = OfferedTools.of([("kimi", KimiAdapter.wire), ("gemini", GeminiWire())])

    def parsed(self, raw: bytes) -> ChatRequest:
        return parse_chat_request(raw, tool_types=self.offered.types)

    def test_flag(self) -> None:
        plain = self.parsed(b'{"messages": [{"role": "user", "content": "hi"}]}')
        self.assertFalse(plain.other_tools)
        named = b'{"messages": [{"role": "user", "content": "hi"}], "tools": [%s]}'
        builtin = self.parsed(named % b'{"type": "builtin_function", "function": {"name": "$web_search"}}')
        self.assertTrue(builtin.other_tools)
        escaped = self.parsed(named % b'{"type": "\\u0062uiltin_function", "function": {"name": "$web_search"}}')
        self.assertTrue(escaped.other_tools)
        self.assertFalse(parse_chat_request(named % b'{"type": "function", "function": {"name": "f"}}').other_tools)

    def test_escaped_type_refused_for_gemini(self) -> None:
        raw = (
            b'{"messages": [{"role": "user", "content": "hi"}], '
            b'"tools": [{"type": "\\u0062uiltin_function", "function": {"name": "$web_search"}}]}'
        )
        chat = self.parsed(raw)
        with self.assertRaises(APIError) as caught:
            encode_request(GeminiWire(), chat, "gemini-2.5-pro", "gemini", self.offered)
        self.assertEqual(caught.exception.param, "tools[0]")
        encode_request(KimiAdapter.wire, chat, "kimi-k2", "kimi", self.offered)
