"""
JSON the gateway cannot pass on, and answers that are not what the API
returns: the official openai SDK (and raw HTTP where the bytes matter)
against a gateway in this process, in front of the stand-in upstream, all
on 127.0.0.1.

  - JSON nested deeper than orjson encodes (254 levels): a 400 for a
    request, a 502 for an answer (whole, or as the first event of a
    stream), counted like every other call;
  - a 2xx answer that is not what the API returns says its real status.
"""

from __future__ import annotations

import json
from typing import Any

import openai
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from openclaw.testing import upstream as standin
from tests.test_dataplane import HELLO, DataPlaneTestCase

#: A list nested 300 deep: orjson reads it (up to 1024 levels), but
#: encodes no more than 254.
DEEP: Any = json.loads("[" * 300 + "]" * 300)


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
                self.assertIn("254", error["message"])
        # Kimi passes metadata on: nested there too.
        response, text = yield self.post(gateway, {"model": "kimi/m", "messages": HELLO, "metadata": {"a": DEEP}})
        self.assertEqual(response.code, 400)
        self.assertOpenAIError(text, "json_too_deep")
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
