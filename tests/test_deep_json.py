"""
JSON the gateway cannot pass on, and answers that are not what the API
returns: the official openai SDK (and raw HTTP where the bytes matter)
against a gateway in this process, in front of the stand-in upstream, all
on 127.0.0.1.

  - JSON nested deeper than orjson encodes (254 levels): a 400 for a
    request, a 502 for an answer (whole, or as the first event of a
    stream), counted like every other call;
  - one limit for every provider, checked before one is chosen, on the
    JSON a client gives that a provider's body nests deeper (tool call
    arguments, JSON Schemas: 248 levels); a tool result of any depth is
    carried (to Gemini as text when too deep for its body);
  - a 2xx answer that is not what the API returns says its real status.
"""

from __future__ import annotations

import json
from typing import Any

import openai
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from openclaw.dataplane.errors import APIError
from openclaw.dataplane.request import MAX_VALUE_DEPTH, json_body, parse_chat_request
from openclaw.testing import upstream as standin
from tests.test_dataplane import HELLO, DataPlaneTestCase

#: A list nested 300 deep: orjson reads it (up to 1024 levels), but
#: encodes no more than 254.
DEEP: Any = json.loads("[" * 300 + "]" * 300)
PROVIDERS = ("kimi/moonshot-v1-8k", "gemini/gemini-flash-latest")


def nested(depth: int) -> str:
    """
    A JSON object nesting C{depth} levels, as text.
    """
    return '{"a": ' * (depth - 1) + "{}" + "}" * (depth - 1)


class ParsedTooDeepTests(SynchronousTestCase):
    def test_past_what_orjson_reads(self) -> None:
        """
        A body nesting more than orjson reads (1024 levels) is a 400
        C{json_too_deep} too, as one of 255 to 1024 levels is, for chat and
        embeddings alike (both read the body with L{json_body}): not
        C{invalid_json}.
        """
        for depth in (1025, 5000):
            raw = ('{"model": "m", "messages": [], "metadata": ' + nested(depth) + "}").encode()
            for parse in (parse_chat_request, json_body):
                with self.assertRaises(APIError) as caught:
                    parse(raw)
                self.assertEqual(caught.exception.code, "json_too_deep", (depth, parse))
                self.assertIn("nests more than 254 levels", caught.exception.message)


class DeepJSONTests(DataPlaneTestCase):
    @inlineCallbacks
    def test_deep_request_is_a_counted_400(self) -> Any:
        gateway = self.gateway()
        tool = {
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"default": DEEP}}}},
        }
        for provider in ("kimi", "gemini"):
            for stream in (False, True):
                body: dict[str, Any] = {"model": f"{provider}/m", "messages": HELLO, "tools": [tool]}
                if stream:
                    body["stream"] = True
                response, text = yield self.post(gateway, body)
                self.assertEqual(response.code, 400, (provider, stream, text))
                error = self.assertOpenAIError(text, "json_too_deep")
                self.assertEqual(error["type"], "invalid_request_error")
                self.assertEqual(error["param"], "tools[0].function.parameters")
                self.assertIn(f"nests more than {MAX_VALUE_DEPTH} levels", error["message"])
        # Kimi passes fields unknown to the gateway on: nested there too
        # (metadata, which this used, is checked as OpenAI's flat strings).
        body = {"model": "kimi/m", "messages": HELLO, "vendor_options": {"a": DEEP}}
        response, text = yield self.post(gateway, body)
        self.assertEqual(response.code, 400)
        self.assertIn("254", self.assertOpenAIError(text, "json_too_deep")["message"])
        # The SDK sees a BadRequestError (not retried).
        sdk = self.sdk(gateway)
        try:
            yield deferToThread(
                sdk.chat.completions.create,
                model="gemini/gemini-flash-latest",
                messages=HELLO,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"default": DEEP}}},
            )
        except openai.BadRequestError as e:
            self.assertEqual(e.code, "json_too_deep")
        else:
            self.fail("a request nested 300 deep was not refused")
        self.assertEqual((self.upstream.kimi.requests, self.upstream.gemini.requests), (0, 0))
        text = yield self.metrics(gateway)
        self.assertIn('openclaw_api_requests_total{provider="-",status="400"} 6.0', text)
        self.assertEqual(self.flushLoggedErrors(), [])
        # Still serving everyone else.
        answer = yield deferToThread(sdk.chat.completions.create, model="gemini/gemini-flash-latest", messages=HELLO)
        self.assertEqual(answer.choices[0].message.content, "Hello from the stand-in.")

    def history(self, arguments: str = "{}", result: str = "42") -> list[dict[str, Any]]:
        call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}
        return [
            *HELLO,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": result},
        ]

    @inlineCallbacks
    def test_arguments_one_limit(self) -> Any:
        """
        Tool call arguments nested deeper than L{MAX_VALUE_DEPTH} are a 400
        that says so, on every provider (Kimi took 249 to 1024 levels,
        Gemini refused them); deeper than orjson reads (1024) too, rather
        than "must be a JSON object in a string".
        """
        gateway = self.gateway()
        sdk = self.sdk(gateway)
        for depth in (MAX_VALUE_DEPTH + 1, 600, 1100):
            for model in PROVIDERS:
                with self.assertRaises(openai.BadRequestError) as caught:
                    yield deferToThread(
                        sdk.chat.completions.create, model=model, messages=self.history(arguments=nested(depth))
                    )
                error = caught.exception
                self.assertEqual(
                    (error.code, error.param), ("json_too_deep", "messages[1].tool_calls[0].function.arguments")
                )
                self.assertIn(f"nests more than {MAX_VALUE_DEPTH} levels", error.message)
                self.assertIn("flatten it", error.message)
        self.assertEqual((self.upstream.kimi.requests, self.upstream.gemini.requests), (0, 0))
        for model in PROVIDERS:
            yield deferToThread(
                sdk.chat.completions.create, model=model, messages=self.history(arguments=nested(MAX_VALUE_DEPTH))
            )
        self.assertEqual((self.upstream.kimi.requests, self.upstream.gemini.requests), (1, 1))

    @inlineCallbacks
    def test_schemas_one_limit(self) -> Any:
        """
        The JSON Schemas of C{tools} and C{response_format}: one limit for
        every provider (Gemini's body nests a tool's one level deeper than
        Kimi's, and a response format's one level less).
        """
        gateway = self.gateway()
        for depth, status in ((MAX_VALUE_DEPTH, 200), (MAX_VALUE_DEPTH + 1, 400)):
            schema = json.loads(nested(depth))
            for extra, param in (
                (
                    {"tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]},
                    "tools[0].function.parameters",
                ),
                (
                    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
                    "response_format.json_schema.schema",
                ),
            ):
                for model in PROVIDERS:
                    response, text = yield self.post(gateway, {"model": model, "messages": HELLO, **extra})
                    self.assertEqual(response.code, status, (depth, model, param, text))
                    if status == 400:
                        error = self.assertOpenAIError(text, "json_too_deep")
                        self.assertEqual(error["param"], param)
        self.assertEqual((self.upstream.kimi.requests, self.upstream.gemini.requests), (2, 2))

    @inlineCallbacks
    def test_tool_result_any_depth(self) -> Any:
        """
        A tool result is what the tool returned, however deep: Kimi gets it
        as sent, Gemini as C{{"result": <text>}} when it nests deeper than
        its body can carry (as a JSON object when it does not).
        """
        gateway = self.gateway()
        sdk = self.sdk(gateway)
        for depth in (MAX_VALUE_DEPTH + 1, 600, 1100):
            for model in PROVIDERS:
                yield deferToThread(
                    sdk.chat.completions.create, model=model, messages=self.history(result=nested(depth))
                )
            self.assertEqual(self.upstream.kimi.last_body["messages"][2]["content"], nested(depth))
            (part,) = self.upstream.gemini.last_body["contents"][2]["parts"]
            self.assertEqual(part["functionResponse"]["response"], {"result": nested(depth)})
        yield deferToThread(
            sdk.chat.completions.create, model=PROVIDERS[1], messages=self.history(result=nested(MAX_VALUE_DEPTH))
        )
        (part,) = self.upstream.gemini.last_body["contents"][2]["parts"]
        self.assertEqual(part["functionResponse"]["response"], json.loads(nested(MAX_VALUE_DEPTH)))

    @inlineCallbacks
    def metrics(self, gateway: Any) -> Any:
        response = yield self.http().get(f"http://127.0.0.1:{gateway.api_port}/metrics")
        text = yield response.text("utf-8")
        return text

    def deep_call(self) -> standin.GeminiAnswer:
        return standin.GeminiAnswer(
            events=(({"functionCall": {"name": "f", "args": {"a": DEEP}}, "thoughtSignature": "sig-1"},),)
        )

    @inlineCallbacks
    def test_deep_answer_is_a_counted_502(self) -> Any:
        gateway = self.gateway()
        gemini = self.upstream.gemini
        gemini.answers.append(self.deep_call())
        sdk = self.sdk(gateway)
        try:
            yield deferToThread(sdk.chat.completions.create, model="gemini/gemini-flash-latest", messages=HELLO)
        except openai.APIStatusError as e:
            self.assertEqual((e.status_code, e.code), (502, "upstream_malformed"))
            self.assertIn("254 levels", e.message)
        else:
            self.fail("an answer nested 300 deep was passed on")
        # Streamed, its first event the deep one: nothing was sent yet, so
        # it is answered as a whole error too.
        gemini.answers.append(self.deep_call())
        response, text = yield self.post(
            gateway, {"model": "gemini/gemini-flash-latest", "messages": HELLO, "stream": True}
        )
        self.assertEqual(response.code, 502)
        self.assertIn("upstream_malformed", text)
        self.assertNotIn("[DONE]", text)
        text = yield self.metrics(gateway)
        self.assertIn('openclaw_api_requests_total{provider="gemini",status="502"} 2.0', text)
        self.assertEqual(self.flushLoggedErrors(), [])

    @inlineCallbacks
    def test_malformed_answer_says_its_status(self) -> Any:
        gateway = self.gateway()
        self.upstream.gemini.answers.append(
            standin.GeminiAnswer(events=(({"text": ""},),), finish_reason="MALFORMED_FUNCTION_CALL")
        )
        response, text = yield self.post(gateway, {"model": "gemini/gemini-flash-latest", "messages": HELLO})
        self.assertEqual(response.code, 502)
        message = self.assertOpenAIError(text)["message"]
        self.assertTrue(message.endswith("(HTTP 200)"), message)
        self.assertNotIn("2xx", message)
