"""
Tool calls of an OpenAI-shaped provider's answer (Kimi's) that are not
OpenAI's shape: a C{function} that is not an object, C{arguments} that
are not a string, a C{name} or C{id} missing or not a string, a streamed
C{index} that is not a whole number from 0.  The openai SDK does not
check the types of what it reads: passed on, an agent got a call whose
C{function.name} raised C{AttributeError}, or whose arguments were an
object, as a 200 (data s30).  Such an answer is the provider's failure, a
502 C{upstream_malformed} (in a stream, the error event) naming the call
and what is wrong, as any answer not of the provider's API's shape; a
call of OpenAI's shape is passed on as it came.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import orjson
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from openclaw.dataplane.request import parse_chat_request
from openclaw.dataplane.sse import Event
from openclaw.providers.openai_compatible import OpenAIStream, OpenAIWire
from openclaw.providers.wire import MalformedAnswer, StreamBroken
from openclaw.testing.upstream import OpenAIAnswer
from tests.test_dataplane import HELLO, DataPlaneTestCase

KIMI = "kimi/kimi-k2-0905-preview"
FUNCTION = {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
CALL = {"id": "call_1", "type": "function", "function": FUNCTION}
#: Calls not of OpenAI's shape, and the words of the 502 for each (whole|streamed
#: when they differ).
BROKEN: tuple[tuple[Any, str], ...] = (
    ("call_1", "is not an object"),
    (None, "is not an object"),
    ({**CALL, "function": "get_weather"}, "has a function that is not an object"),
    ({**CALL, "function": ["get_weather"]}, "has a function that is not an object"),
    # Streamed: a call's first piece without its name.
    ({"id": "call_1", "type": "function"}, "has no function ({name, arguments})|without its function name"),
    ({**CALL, "function": {**FUNCTION, "arguments": {"city": "Oslo"}}}, "has arguments that are not a string"),
    ({**CALL, "function": {**FUNCTION, "arguments": 5}}, "has arguments that are not a string"),
    ({**CALL, "function": {"arguments": "{}"}}, "function name"),
    ({**CALL, "function": {**FUNCTION, "name": 7}}, "function name"),
    ({**CALL, "function": {**FUNCTION, "name": None}}, "function name"),
    ({**CALL, "id": 5}, "id"),
    ({"type": "function", "function": FUNCTION}, "id"),
    ({**CALL, "type": 3}, "has a type that is not a string"),
)


def chat(**fields: Any) -> Any:
    return parse_chat_request(orjson.dumps({"messages": HELLO, **fields}))


def whole(*calls: Any) -> bytes:
    message = {"role": "assistant", "content": None, "tool_calls": list(calls)}
    return orjson.dumps({"id": "c", "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]})


def chunk(*calls: Any, finish: str | None = None) -> Event:
    delta = {"tool_calls": list(calls)} if calls else {}
    return Event(b"", orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}))


class WireTests(SynchronousTestCase):
    """
    The wire's checks, whole and streamed.
    """

    def test_whole(self) -> None:
        for legacy in (False, True):
            request = chat(functions=[{"name": "get_weather", "parameters": {}}]) if legacy else chat()
            for call, words in BROKEN:
                with self.assertRaises(MalformedAnswer, msg=call) as caught:
                    OpenAIWire().completion(whole(CALL, call), "m", 0, request)
                self.assertIn("the answer's choices[0].message.tool_calls[1] ", str(caught.exception))
                self.assertIn(words.split("|")[0], str(caught.exception))
                self.assertIn("not OpenAI's tool call", str(caught.exception))
        # OpenAI's shape, and Moonshot's built-in tool calls, as they came;
        # Moonshot's "" arguments are OpenAI's "{}" (as before).
        builtin = {"id": "s", "type": "builtin_function", "function": {"name": "$web_search", "arguments": "{}"}}
        body = whole(CALL, builtin)
        self.assertIs(OpenAIWire().completion(body, "m", 0, chat()).body, body)
        # A null type is none, as in a stream (review s30).
        body = whole({**CALL, "type": None})
        self.assertIs(OpenAIWire().completion(body, "m", 0, chat()).body, body)
        unargued = {**CALL, "function": {"name": "now", "arguments": ""}}
        message = json.loads(OpenAIWire().completion(whole(unargued), "m", 0, chat()).body)["choices"][0]["message"]
        self.assertEqual(message["tool_calls"][0]["function"]["arguments"], "{}")

    def test_streamed(self) -> None:
        for call, words in BROKEN:
            piece = {"index": 0, **call} if isinstance(call, dict) else call
            with self.assertRaises(StreamBroken, msg=call) as caught:
                OpenAIStream().payloads(chunk(piece))
            self.assertEqual(caught.exception.code, "upstream_malformed")
            self.assertIn("a tool call piece of choice 0 of the stream ", str(caught.exception))
            self.assertIn(words.split("|")[-1], str(caught.exception))
        for index in ("0", 0.0, False, -1, [0]):
            with self.assertRaises(StreamBroken, msg=index) as caught:
                OpenAIStream().payloads(chunk({"index": index, **CALL}))
            self.assertIn("has an index that is not a whole number from 0", str(caught.exception))
        # A later piece of a call begun: no id nor name needed; a new
        # call's first piece names it (the openai SDK's stream helper reads
        # function.name of every piece of a call whose type it has: a first
        # piece with its type but no function failed there, AttributeError).
        stream = OpenAIStream()
        begun = {"index": 0, **CALL, "function": {**FUNCTION, "arguments": ""}}
        for piece in (begun, {"index": 0, "function": {"arguments": "{}"}}, {"index": 0, "id": None, "type": None}):
            self.assertEqual(json.loads(stream.payloads(chunk(piece))[0])["choices"][0]["delta"]["tool_calls"], [piece])
        with self.assertRaises(StreamBroken) as caught:
            stream.payloads(chunk({"index": 1, "function": {"arguments": "{}"}}))
        self.assertIn("begins a call without its id", str(caught.exception))
        # Without an index (Moonshot's API reference leaves it optional),
        # or null: given one, as before.
        out = OpenAIStream().payloads(chunk({**CALL, "index": None}))
        self.assertEqual(json.loads(out[0])["choices"][0]["delta"]["tool_calls"], [{**CALL, "index": 0}])


class NumberingTests(SynchronousTestCase):
    """
    A stream's calls numbered otherwise than OpenAI numbers them (0, 1, 2
    in the order they begin) are renumbered so: the openai SDK's stream
    helper failed with C{IndexError} on calls numbered from 1, or with a
    gap (data s30), and joined two calls' arguments when the call of
    index 1 began first.
    """

    def indexes(self, stream: OpenAIStream, *pieces: dict[str, Any]) -> list[Any]:
        out = []
        for piece in pieces:
            for payload in stream.payloads(chunk(piece)):
                out += [call["index"] for call in json.loads(payload)["choices"][0]["delta"].get("tool_calls", ())]
        return out

    def test_renumbered(self) -> None:
        second = {**CALL, "id": "call_2"}
        more = {"function": {"arguments": "{}"}}
        for given, told in (
            ((1, 2, 1, 2), [0, 1, 0, 1]),
            ((0, 2, 2, 0), [0, 1, 1, 0]),
            ((1, 0, 0, 1), [0, 1, 1, 0]),
            ((0, 1, 1, 0), [0, 1, 1, 0]),
        ):
            first_call, second_call, third, fourth = given
            pieces = (
                {"index": first_call, **CALL},
                {"index": second_call, **second},
                {"index": third, **more},
                {"index": fourth, **more},
            )
            self.assertEqual(self.indexes(OpenAIStream(), *pieces), told, given)
        # OpenAI's numbering, as it came.
        piece = chunk({"index": 0, **CALL})
        self.assertEqual(OpenAIStream().payloads(piece), [piece.data])

    def test_one_call(self) -> None:
        """
        With C{parallel_tool_calls: false}, the first call begun is kept,
        numbered 0, as before.
        """
        stream = OpenAIWire().stream(chat(parallel_tool_calls=False), "m", 0)
        pieces = (
            {"index": 2, **CALL},
            {"index": 1, **CALL, "id": "call_2"},
            {"index": 2, "function": {"arguments": "{}"}},
        )
        self.assertEqual(self.indexes(stream, *pieces), [0, 0])


class GatewayTests(DataPlaneTestCase):
    """
    Through the gateway, with the openai SDK: a 502 (whole) or the
    stream's error (streamed), never the call passed on broken.
    """

    def sdk_call(self, client: openai.OpenAI, stream: bool) -> Any:
        if not stream:
            return client.chat.completions.create(model=KIMI, messages=HELLO).choices[0].message
        with client.chat.completions.stream(model=KIMI, messages=HELLO) as events:
            for _ in events:
                pass
            return events.get_final_completion().choices[0].message

    @inlineCallbacks
    def test_refused(self) -> Any:
        gateway = self.gateway(breaker_failures=1000)
        client = self.sdk(gateway)
        for stream in (False, True):
            for call, words in BROKEN:
                piece = {"index": 0, **call} if stream and isinstance(call, dict) else call
                self.upstream.kimi.answers[:] = [OpenAIAnswer(raw_tool_calls=(piece,))]
                with self.assertRaises(openai.APIError, msg=(stream, call)) as caught:
                    yield deferToThread(self.sdk_call, client, stream)
                error = caught.exception
                if not stream:
                    self.assertIsInstance(error, openai.InternalServerError)
                    self.assertEqual(error.status_code, 502)
                self.assertEqual(error.code, "upstream_malformed")
                self.assertIn(words.split("|")[-1 if stream else 0], error.message)
        # OpenAI's shape, as it came, whole and streamed.
        for stream in (False, True):
            piece = {"index": 0, **CALL} if stream else CALL
            self.upstream.kimi.answers[:] = [OpenAIAnswer(raw_tool_calls=(piece,))]
            message = yield deferToThread(self.sdk_call, client, stream)
            call = message.tool_calls[0]
            self.assertEqual((call.id, call.function.name, call.function.arguments), ("call_1", *FUNCTION.values()))
        # Calls numbered from 1: the SDK's stream helper reads both.
        pieces = ({"index": 1, **CALL}, {"index": 2, **CALL, "id": "call_2", "function": {**FUNCTION, "name": "f"}})
        self.upstream.kimi.answers[:] = [OpenAIAnswer(raw_tool_calls=pieces)]
        message = yield deferToThread(self.sdk_call, client, True)
        self.assertEqual(
            [(c.id, c.function.name) for c in message.tool_calls], [("call_1", "get_weather"), ("call_2", "f")]
        )
