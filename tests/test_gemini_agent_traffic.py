"""
Agent traffic on the Gemini path: reasoning_effort mapped to a thinking
level the model's family takes (Gemini 3 Pro refuses minimal and medium),
thought summaries asked for when reasoning is, tool-use prompt tokens
counted in usage, unknown finish reasons kept as stop (with a warning),
answers with no candidate, of a malformed shape (function call args that
are not an object, a nameless call, parts not a list, text not a string)
or with an image answered 502, parts of kinds not translated (code
execution...) left out with a warning or, when nothing else was said,
answered 502, OpenAI's C{allowed_tools} tool choice, tool results
of several text parts.  Each through a real gateway in front of the
stand-in upstream with the official openai SDK, or, for mapping details,
on the translation functions alone.
"""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import orjson
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from openclaw.dataplane.errors import APIError
from openclaw.dataplane.request import parse_chat_request
from openclaw.providers.gemini import translate as gemini
from openclaw.providers.wire import MalformedAnswer, ModelFailed
from openclaw.testing.upstream import GeminiAnswer
from tests.test_agent_traffic import QUESTION, TOOLS, ask
from tests.test_dataplane import DataPlaneTestCase

GEMINI_3_PRO = "gemini-3-pro-preview"
#: The thinking levels Google documents for Gemini 3 Pro
#: (https://ai.google.dev/gemini-api/docs/thinking).
PRO_LEVELS = frozenset({"low", "high"})
THOUGHT = GeminiAnswer((({"text": "Let me think.", "thought": True},), ({"text": "Done."},)))


def chat(**body: Any) -> dict[str, Any]:
    body.setdefault("messages", [{"role": "user", "content": "Hi"}])
    return parse_chat_request(orjson.dumps(body)).body


class ThinkingLevelTests(SynchronousTestCase):
    """
    reasoning_effort -> the nearest thinking level the model's family takes.
    """

    def level(self, effort: str, model: str) -> Any:
        return gemini.generation_config(chat(reasoning_effort=effort), model)["thinkingConfig"].get("thinkingLevel")

    def test_families(self) -> None:
        expected = {
            # Gemini 3 Pro: low and high only.
            "gemini-3-pro-preview": ("low", "low", "low", "high", "high", "high"),
            "models/gemini-3-pro-preview": ("low", "low", "low", "high", "high", "high"),
            # Gemini 3.1 Pro: no minimal.
            "gemini-3.1-pro-preview": ("low", "low", "low", "medium", "high", "high"),
            "gemini-3.12-pro": ("low", "low", "low", "medium", "high", "high"),
            # Flash, Flash-Lite, the -latest aliases: all four.
            "gemini-3-flash-preview": ("minimal", "minimal", "low", "medium", "high", "high"),
            "gemini-3.1-flash-lite": ("minimal", "minimal", "low", "medium", "high", "high"),
            "gemini-flash-latest": ("minimal", "minimal", "low", "medium", "high", "high"),
            # Whichever Pro the alias names, it takes low and high.
            "gemini-pro-latest": ("low", "low", "low", "high", "high", "high"),
        }
        efforts = ("none", "minimal", "low", "medium", "high", "xhigh")
        for model, levels in expected.items():
            self.assertEqual(tuple(self.level(effort, model) for effort in efforts), levels, model)
            # OpenAI's "max" (the openai SDK's ReasoningEffort): the highest, as xhigh.
            self.assertEqual(self.level("max", model), "high", model)

    def test_xhigh(self) -> None:
        self.assertEqual(
            parse_chat_request(b'{"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "xhigh"}').body[
                "reasoning_effort"
            ],
            "xhigh",
        )
        config = gemini.generation_config(chat(reasoning_effort="xhigh"), "gemini-2.5-flash")
        self.assertEqual(config["thinkingConfig"], {"thinkingBudget": 24576, "includeThoughts": True})
        # A value OpenAI does not have stays refused, with the list that is accepted.
        with self.assertRaises(APIError) as caught:
            chat(reasoning_effort="maximum")
        self.assertIn("xhigh", str(caught.exception.message))
        self.assertIn("none, minimal, low, medium, high, xhigh, max", str(caught.exception.message))

    def test_max(self) -> None:
        """
        OpenAI's C{"max"} (a value of the openai SDK's C{ReasoningEffort},
        3.57) is taken (it was refused, "must be one of none, minimal,
        low, medium, high, xhigh": trial s33), and Gemini gets the highest
        thinking, as for C{"xhigh"}: the largest budget, or C{"high"}.
        """
        body = parse_chat_request(b'{"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "max"}').body
        self.assertEqual(body["reasoning_effort"], "max")
        for model, thinking in (
            ("gemini-2.5-flash", {"thinkingBudget": 24576, "includeThoughts": True}),
            ("gemini-2.5-pro", {"thinkingBudget": 24576, "includeThoughts": True}),
            ("gemini-3-pro-preview", {"thinkingLevel": "high", "includeThoughts": True}),
            ("gemini-flash-latest", {"thinkingLevel": "high", "includeThoughts": True}),
        ):
            self.assertEqual(gemini.generation_config(body, model)["thinkingConfig"], thinking, model)


class ThinkingLevelGatewayTests(DataPlaneTestCase):
    @inlineCallbacks
    def test_gemini_3_pro_not_refused(self):
        # The stand-in refuses what Gemini 3 Pro refuses (minimal, medium).
        self.upstream.gemini.models.append(GEMINI_3_PRO)
        self.upstream.gemini.thinking_levels[GEMINI_3_PRO] = PRO_LEVELS
        client = self.sdk(self.gateway())
        for effort, level in (("none", "low"), ("minimal", "low"), ("medium", "high"), ("xhigh", "high")):
            completion = yield deferToThread(
                client.chat.completions.create,
                model=f"gemini/{GEMINI_3_PRO}",
                messages=QUESTION,
                reasoning_effort=effort,
            )
            self.assertEqual(completion.choices[0].finish_reason, "stop")
            thinking = self.upstream.gemini.last_body["generationConfig"]["thinkingConfig"]
            self.assertEqual(thinking["thinkingLevel"], level, effort)

    @inlineCallbacks
    def test_kimi_gets_xhigh_as_sent(self):
        client = self.sdk(self.gateway())
        yield deferToThread(
            client.chat.completions.create, model="kimi/moonshot-v1-8k", messages=QUESTION, reasoning_effort="xhigh"
        )
        self.assertEqual(self.upstream.kimi.last_body["reasoning_effort"], "xhigh")

    @inlineCallbacks
    def test_max_through_the_gateway(self):
        """
        C{reasoning_effort="max"} from the openai SDK: Kimi gets it as
        sent, Gemini the highest thinking; whole and streamed.
        """
        client = self.sdk(self.gateway())

        def call(model: str, stream: bool) -> list[Any]:
            if not stream:
                completion = client.chat.completions.create(model=model, messages=QUESTION, reasoning_effort="max")
                return [choice.finish_reason for choice in completion.choices]
            chunks = client.chat.completions.create(model=model, messages=QUESTION, reasoning_effort="max", stream=True)
            return [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]

        for stream in (False, True):
            finishes = yield deferToThread(call, "kimi/moonshot-v1-8k", stream)
            self.assertEqual(finishes, ["stop"])
            self.assertEqual(self.upstream.kimi.last_body["reasoning_effort"], "max")
            finishes = yield deferToThread(call, "gemini/gemini-2.5-flash", stream)
            self.assertEqual(finishes, ["stop"])
            thinking = self.upstream.gemini.last_body["generationConfig"]["thinkingConfig"]
            self.assertEqual(thinking, {"thinkingBudget": 24576, "includeThoughts": True})


class ThoughtSummaryTests(DataPlaneTestCase):
    @inlineCallbacks
    def test_summaries_asked_for(self):
        # The stand-in, like Gemini, sends thought parts only when
        # includeThoughts is true.
        self.upstream.gemini.answers[:] = [THOUGHT, THOUGHT, THOUGHT]
        gateway = self.gateway()
        for stream in (False, True):
            response, text = yield self.post(
                gateway, {"messages": QUESTION, "reasoning_effort": "low", "stream": stream}
            )
            self.assertEqual(response.code, 200)
            if stream:
                chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
                reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in chunks)
            else:
                reasoning = json.loads(text)["choices"][0]["message"]["reasoning_content"]
            self.assertEqual(reasoning, "Let me think.")
            thinking = self.upstream.gemini.last_body["generationConfig"]["thinkingConfig"]
            self.assertIs(thinking["includeThoughts"], True)
        # No reasoning_effort: none asked for, none given.
        response, text = yield self.post(gateway, {"messages": QUESTION})
        self.assertNotIn("reasoning_content", json.loads(text)["choices"][0]["message"])
        self.assertNotIn("generationConfig", self.upstream.gemini.last_body)

    def test_not_for_none(self) -> None:
        config = gemini.generation_config(chat(reasoning_effort="none"), "gemini-2.5-flash")
        self.assertEqual(config["thinkingConfig"], {"thinkingBudget": 0})
        config = gemini.generation_config(chat(reasoning_effort="none"), "gemini-3-flash-preview")
        self.assertEqual(config["thinkingConfig"], {"thinkingLevel": "minimal"})


class ToolUseUsageTests(DataPlaneTestCase):
    @inlineCallbacks
    def test_tool_use_prompt_tokens(self):
        metadata = {
            "promptTokenCount": 10,
            "toolUsePromptTokenCount": 5,
            "candidatesTokenCount": 3,
            "thoughtsTokenCount": 2,
            "totalTokenCount": 20,
        }
        answer = GeminiAnswer((({"text": "Sunny"},), ({"text": "."},)), usage=metadata)
        self.upstream.gemini.answers[:] = [answer, answer]
        client = self.sdk(self.gateway())
        for stream in (False, True):
            usage = (yield deferToThread(ask, client, QUESTION, stream))["usage"]
            self.assertEqual((usage.prompt_tokens, usage.completion_tokens, usage.total_tokens), (15, 5, 20))
            self.assertEqual(usage.prompt_tokens + usage.completion_tokens, usage.total_tokens)

    def test_not_a_number(self) -> None:
        """
        A count that is there but no token count makes no usage (a
        consumer is then charged the estimate, not 0); a whole 10.0 counts.
        """
        for value in ("5", True, 4.5, -5, 1e300, 10**13):
            for name in ("promptTokenCount", "toolUsePromptTokenCount", "candidatesTokenCount", "thoughtsTokenCount"):
                metadata = {"promptTokenCount": 1, "candidatesTokenCount": 1, name: value}
                self.assertIsNone(gemini.usage(metadata), metadata)
        usage = gemini.usage({"promptTokenCount": 10.0, "candidatesTokenCount": 1, "totalTokenCount": "x"})
        self.assertEqual(usage, {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11})


class UnknownFinishReasonTests(DataPlaneTestCase):
    def warnings(self) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e.get("log_level") == LogLevel.warn and e.get("log_namespace") == "openclaw.providers.gemini"
        ]

    @inlineCallbacks
    def test_content_kept(self):
        for reason in ("FINISH_REASON_UNSPECIFIED", "SOMETHING_GOOGLE_ADDS_LATER"):
            answer = GeminiAnswer((({"text": "Sunny"},), ({"text": " in Paris."},)), reason, repeat_finish=True)
            self.upstream.gemini.answers[:] = [answer, answer]
            client = self.sdk(self.gateway())
            for stream in (False, True):
                del self.events[:]
                result = yield deferToThread(ask, client, QUESTION, stream)
                self.assertEqual((result["content"], result["finishes"]), ("Sunny in Paris.", ["stop"]))
                warnings = self.warnings()
                self.assertEqual(len(warnings), 1, (reason, stream))
                self.assertEqual(warnings[0]["reason"], reason)

    def test_failures_still_fail(self) -> None:
        for reason in ("MALFORMED_FUNCTION_CALL", "OTHER", "UNEXPECTED_TOOL_CALL", "TOO_MANY_TOOL_CALLS"):
            with self.assertRaises(ModelFailed):
                gemini.finish_reason(reason)
        # Not a string: a malformed answer, not a crash.
        with self.assertRaises(MalformedAnswer):
            gemini.from_gemini({"candidates": [{"finishReason": ["STOP"]}]}, "m", "id", 0)


class MalformedAnswerTests(DataPlaneTestCase):
    @inlineCallbacks
    def test_no_candidate(self):
        self.upstream.gemini.answers[:] = [GeminiAnswer((), document={"candidates": [], "modelVersion": "m"})]
        # Not failed over (a malformed answer would be), to see its message.
        client = self.sdk(self.gateway(fallback="off"))
        failure = yield self.assertFailure(
            deferToThread(client.chat.completions.create, model="x", messages=QUESTION), openai.APIStatusError
        )
        self.assertEqual(failure.status_code, 502)
        self.assertIn("no candidate", failure.message)
        # The gateway serves the next call.
        completion = yield deferToThread(client.chat.completions.create, model="x", messages=QUESTION)
        self.assertEqual(completion.choices[0].message.content, "Hello from the stand-in.")

    @inlineCallbacks
    def test_args_not_an_object(self):
        call = GeminiAnswer(
            (({"functionCall": {"name": "get_time", "args": [1], "id": "fc-1"}, "thoughtSignature": "sig-L"},),)
        )
        self.upstream.gemini.answers[:] = [call, call]
        # Not failed over (a malformed answer would be), to see its message.
        gateway = self.gateway(fallback="off")
        client = self.sdk(gateway)
        failure = yield self.assertFailure(
            deferToThread(client.chat.completions.create, model="x", messages=QUESTION, tools=TOOLS),
            openai.APIStatusError,
        )
        self.assertEqual(failure.status_code, 502)
        self.assertIn("args that are not a JSON object", failure.message)
        self.assertIn("get_time", failure.message)
        # Streamed, the first event is the malformed one: nothing has
        # reached the client, so it is answered as a whole error.
        response, text = yield self.post(gateway, {"messages": QUESTION, "tools": TOOLS, "stream": True})
        self.assertEqual(response.code, 502, text)
        self.assertIn("args that are not a JSON object", json.loads(text)["error"]["message"])

    def test_malformed_parts(self) -> None:
        """
        A shape Gemini's API does not return is a 502 upstream_malformed,
        whole and streamed, never a part dropped into an empty stop.
        """
        for content, words in (
            ({"parts": {"text": "a"}}, "parts is not a list"),
            ("a", "content is not a JSON object"),
            ({"parts": ["a"]}, "part of Gemini's answer is not a JSON object"),
            ({"parts": [{"text": 5}]}, "text part of Gemini's answer is not a string"),
            ({"parts": [{"functionCall": {"args": {}}}]}, "functionCall has no name"),
            ({"parts": [{"functionCall": {"name": "", "args": {}}}]}, "functionCall has no name"),
            ({"parts": [{"functionCall": "f"}]}, "functionCall is not a JSON object"),
        ):
            candidate = {"content": content, "finishReason": "STOP", "index": 0}
            with self.assertRaises(MalformedAnswer) as caught:
                gemini.from_gemini({"candidates": [candidate]}, "m", "id", 0)
            self.assertNotIsInstance(caught.exception, ModelFailed)
            self.assertIn(words, str(caught.exception))
            with self.assertRaises(gemini.GeminiStreamError) as streamed:
                gemini.GeminiStream("m", "id", 0).chunk({"candidates": [candidate]})
            self.assertEqual(streamed.exception.code, "upstream_malformed")
            self.assertIn(words, str(streamed.exception))
        # No content, or no parts (a cut answer), is no text: not malformed.
        for candidate in ({"finishReason": "MAX_TOKENS"}, {"content": {"role": "model"}, "finishReason": "MAX_TOKENS"}):
            choice = gemini.from_gemini({"candidates": [candidate]}, "m", "id", 0)["choices"][0]
            self.assertEqual((choice["message"]["content"], choice["finish_reason"]), ("", "length"))

    def test_image_output(self) -> None:
        """
        An image in the answer cannot be carried in OpenAI's chat shape: an
        error naming the part, whole and streamed (code
        unsupported_output: the provider answered, not failed over); a
        thought's image is part of the thinking, skipped as such.
        """
        image = {"inlineData": {"mimeType": "image/png", "data": "AAAA"}}
        candidate = {"content": {"parts": [{"text": "Here:"}, image]}, "finishReason": "STOP", "index": 0}
        with self.assertRaises(ModelFailed) as caught:
            gemini.from_gemini({"candidates": [candidate]}, "m", "id", 0)
        self.assertEqual(caught.exception.code, "unsupported_output")
        self.assertIn("Gemini answered with an inlineData part (image/png)", str(caught.exception))
        other = {"fileData": {"mimeType": "image/png", "fileUri": "https://a.b/c.png"}}
        candidate = {"content": {"parts": [other]}, "finishReason": "STOP", "index": 0}
        with self.assertRaises(ModelFailed) as caught:
            gemini.from_gemini({"candidates": [candidate]}, "m", "id", 0)
        self.assertIn("Gemini answered with a fileData part (image/png)", str(caught.exception))
        stream = gemini.GeminiStream("m", "id", 0)
        self.assertIsNotNone(stream.chunk({"candidates": [{"content": {"parts": [{"text": "Here:"}]}, "index": 0}]}))
        with self.assertRaises(gemini.GeminiStreamError) as streamed:
            stream.chunk({"candidates": [{"content": {"parts": [image]}, "finishReason": "STOP", "index": 0}]})
        self.assertEqual(streamed.exception.code, "unsupported_output")
        thought = {"content": {"parts": [{**image, "thought": True}, {"text": "Done."}]}, "finishReason": "STOP"}
        choice = gemini.from_gemini({"candidates": [thought]}, "m", "id", 0)["choices"][0]
        self.assertEqual(choice["message"]["content"], "Done.")

    @inlineCallbacks
    def test_image_output_through_the_gateway(self):
        image = {"inlineData": {"mimeType": "image/png", "data": "AAAA"}}
        answer = GeminiAnswer((({"text": "Here it is."},), (image,)))
        self.upstream.gemini.answers[:] = [answer, answer]
        gateway = self.gateway()
        response, text = yield self.post(gateway, {"messages": QUESTION})
        self.assertEqual(response.code, 502, text)
        error = self.assertOpenAIError(text, "unsupported_output")
        self.assertIn("Gemini answered with an inlineData part (image/png)", error["message"])
        # Not failed over: Gemini answered.
        self.assertIsNone(response.headers.getRawHeaders("x-openclaw-fallback"))
        self.assertEqual(self.upstream.kimi.requests, 0)
        # Streamed: the text went out, then the error event, no [DONE].
        response, text = yield self.post(gateway, {"messages": QUESTION, "stream": True})
        self.assertEqual(response.code, 200)
        self.assertIn("Here it is.", text)
        self.assertIn("unsupported_output", text)
        self.assertNotIn("[DONE]", text)

    def test_untranslated_parts(self) -> None:
        """
        Parts of kinds the gateway does not translate (code execution,
        functionResponse, videoMetadata, kinds Google adds later): beside
        text or a tool call they are left out with a warning naming the
        kind; a candidate of such parts only (thoughts aside) is a 502
        unsupported_output naming them, whole and streamed (at the
        choice's finish reason), never an empty stop (litellm #21744).
        """
        code = {"executableCode": {"language": "PYTHON", "code": "print(1)"}}
        result = {"codeExecutionResult": {"outcome": "OUTCOME_OK", "output": "1"}}
        thought = {"text": "Let me run it.", "thought": True}
        for parts, kinds in (
            ([code], "executableCode"),
            ([code, result], "executableCode, codeExecutionResult"),
            ([thought, code, result, {"text": ""}], "executableCode, codeExecutionResult"),
            ([{"functionResponse": {"name": "f", "response": {}}}], "functionResponse"),
            ([{"videoMetadata": {"fps": 1}, "thoughtSignature": "s"}], "videoMetadata"),
            ([{"somethingGoogleAddsLater": {"x": 1}}], "somethingGoogleAddsLater"),
        ):
            candidate = {"content": {"parts": parts}, "finishReason": "STOP"}
            with self.assertRaises(ModelFailed) as caught:
                gemini.from_gemini({"candidates": [candidate]}, "m", "id", 0)
            self.assertEqual(caught.exception.code, "unsupported_output")
            self.assertIn(f"only {kinds} parts", str(caught.exception))
            with self.assertRaises(gemini.GeminiStreamError) as streamed:
                gemini.GeminiStream("m", "id", 0).chunk({"candidates": [candidate]})
            self.assertEqual(streamed.exception.code, "unsupported_output")
            self.assertIn(f"only {kinds} parts", str(streamed.exception))
            # An error, not a warning as well.
            self.assertEqual(self.warnings(), [])
            # Streamed, the decision waits for the finish reason: text
            # may come after (the kinds warned of meanwhile).
            stream = gemini.GeminiStream("m", "id", 0)
            stream.chunk({"candidates": [{"content": {"parts": parts}}]})
            with self.assertRaises(gemini.GeminiStreamError) as streamed:
                stream.chunk({"candidates": [{"content": {"parts": [{"text": ""}]}, "finishReason": "STOP"}]})
            self.assertIn(f"only {kinds} parts", str(streamed.exception))
            del self.events[:]
        # Beside text or a tool call: left out, one warning naming the kinds.
        candidate = {"content": {"parts": [code, result, {"text": "1"}]}, "finishReason": "STOP"}
        choice = gemini.from_gemini({"candidates": [candidate]}, "m", "id", 0)["choices"][0]
        self.assertEqual((choice["message"]["content"], choice["finish_reason"]), ("1", "stop"))
        (warning,) = self.warnings()
        self.assertEqual(warning["kinds"], "executableCode, codeExecutionResult")
        del self.events[:]
        call = {"functionCall": {"name": "f", "args": {}}}
        candidate = {"content": {"parts": [code, call]}, "finishReason": "STOP"}
        choice = gemini.from_gemini({"candidates": [candidate]}, "m", "id", 0)["choices"][0]
        self.assertEqual(choice["finish_reason"], "tool_calls")
        self.assertEqual(len(self.warnings()), 1)
        del self.events[:]
        # Streamed: one warning per stream, naming the kinds met by then.
        stream = gemini.GeminiStream("m", "id", 0)
        for parts in ([code], [result, {"text": "1"}], [code, result]):
            stream.chunk({"candidates": [{"content": {"parts": parts}}]})
        stream.chunk({"candidates": [{"content": {"parts": [{"text": "."}]}, "finishReason": "STOP"}]})
        self.assertEqual([w["kinds"] for w in self.warnings()], ["executableCode"])
        self.assertEqual(stream.closing()[0]["choices"][0]["finish_reason"], "stop")
        del self.events[:]
        # Thoughts only, or a thought of an untranslated kind: what it was.
        for parts in ([thought], [{**code, "thought": True}, thought]):
            candidate = {"content": {"parts": parts}, "finishReason": "STOP"}
            choice = gemini.from_gemini({"candidates": [candidate]}, "m", "id", 0)["choices"][0]
            self.assertEqual((choice["message"]["content"], choice["finish_reason"]), ("", "stop"))
            stream = gemini.GeminiStream("m", "id", 0)
            stream.chunk({"candidates": [candidate]})
            self.assertEqual(stream.closing()[0]["choices"][0]["finish_reason"], "stop")
        # A kind's name is clipped, and at most five are named.
        many = [{f"kind{i}": {}} for i in range(7)] + [{"k" * 500: {}}]
        with self.assertRaises(ModelFailed) as caught:
            gemini.from_gemini({"candidates": [{"content": {"parts": many}, "finishReason": "STOP"}]}, "m", "id", 0)
        self.assertIn("kind0, kind1, kind2, kind3, kind4, ... parts", str(caught.exception))
        self.assertLess(len(str(caught.exception)), 400)
        self.assertEqual(self.warnings(), [])

    def test_untranslated_kinds_many(self) -> None:
        """
        The kinds of the parts not translated are the upstream's choice:
        a part of 50,000 fields (a hostile upstream's 740 KB body; the
        body may be 8 MB), or 50,000 parts of a kind each, cost no more
        than a few, translated or refused, whole or streamed, and at most
        five kinds are named.  Each kind was looked for in a list of those
        met: 10,000 fields took 0.8 s, 40,000 took 10 s (the review of
        7303f03).
        """
        many = {f"kind{i}": {} for i in range(50_000)}
        named = "kind0, kind1, kind2, kind3, kind4, ..."
        for parts in ([many], [many, {"text": "1"}], [{kind: {}} for kind in many]):
            candidate = {"content": {"parts": parts}, "finishReason": "STOP"}
            started = time.process_time()
            try:
                choice = gemini.from_gemini({"candidates": [candidate, {**candidate, "index": 1}]}, "m", "id", 0)
            except ModelFailed as e:
                refused: str | None = str(e)
            else:
                refused = None
                self.assertEqual(choice["choices"][1]["message"]["content"], "1")
            self.assertLess(time.process_time() - started, 2)
            started = time.process_time()
            stream = gemini.GeminiStream("m", "id", 0)
            try:
                for _ in range(3):
                    stream.chunk({"candidates": [{"content": {"parts": parts}}]})
                stream.chunk({"candidates": [candidate]})
            except gemini.GeminiStreamError as e:
                self.assertEqual(str(e), refused)
            else:
                self.assertIsNone(refused)
            self.assertLess(time.process_time() - started, 2)
            if refused is not None:
                self.assertIn(f"only {named} parts", refused)
                self.assertLess(len(refused), 400)
                # The stream warned as the parts came (the finish reason
                # had not come yet).
                self.assertEqual([w["kinds"] for w in self.warnings()], [named])
            else:
                # Once for the whole answer, once for the stream.
                self.assertEqual([w["kinds"] for w in self.warnings()], [named, named])
            del self.events[:]

    def test_untranslated_kinds_warned_once_per_stream(self) -> None:
        """
        A stream warns of parts left out once, however many kinds the
        upstream sends: 1,000 events each with a new kind were 1,000
        warnings (the review of 7303f03).  The warning names the kinds met
        by then, as one for a whole answer names those of the answer.
        """
        stream = gemini.GeminiStream("m", "id", 0)
        for i in range(1_000):
            parts = [{f"kind{i}": {}}, {"text": "."}]
            stream.chunk({"candidates": [{"content": {"parts": parts}}]})
        stream.chunk({"candidates": [{"content": {"parts": [{"text": "."}]}, "finishReason": "STOP"}]})
        self.assertEqual(stream.closing()[0]["choices"][0]["finish_reason"], "stop")
        self.assertEqual([w["kinds"] for w in self.warnings()], ["kind0"])
        # Two choices, each with its kinds, in one event: one warning.
        del self.events[:]
        stream = gemini.GeminiStream("m", "id", 0, asked=2)
        candidates = [{"index": i, "content": {"parts": [{f"kind{i}": {}}, {"text": "."}]}} for i in range(2)]
        stream.chunk({"candidates": candidates})
        stream.chunk({"candidates": candidates})
        self.assertEqual(len(self.warnings()), 1)

    @inlineCallbacks
    def test_untranslated_parts_through_the_gateway(self):
        code = {"executableCode": {"language": "PYTHON", "code": "print(1)"}}
        only_code = GeminiAnswer(((code,), ({"codeExecutionResult": {"outcome": "OUTCOME_OK"}},)))
        self.upstream.gemini.answers[:] = [only_code, only_code]
        gateway = self.gateway()
        for stream in (False, True):
            response, text = yield self.post(gateway, {"messages": QUESTION, "stream": stream})
            # Streamed, the first event has no finish reason and nothing
            # to send but the role, which is held back (the answer has not
            # begun): the model's failure is then a 502 as a whole
            # answer's is, not a 200 with a role chunk and an error event.
            self.assertEqual(response.code, 502, text)
            self.assertIn("only executableCode, codeExecutionResult parts", text)
            self.assertIn("unsupported_output", text)
            self.assertNotIn("[DONE]", text)
            # Not failed over: Gemini answered.
            self.assertIsNone(response.headers.getRawHeaders("x-openclaw-fallback"))
        self.assertEqual(self.upstream.kimi.requests, 0)
        # Beside text: left out, the text answered, the kind warned of.
        answer = GeminiAnswer(((code,), ({"text": "1"},)))
        self.upstream.gemini.answers[:] = [answer, answer]
        client = self.sdk(gateway)
        for stream in (False, True):
            del self.events[:]
            result = yield deferToThread(ask, client, QUESTION, stream)
            self.assertEqual((result["content"], result["finishes"]), ("1", ["stop"]))
            self.assertEqual([w["kinds"] for w in self.warnings()], ["executableCode"])

    def warnings(self) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e.get("log_level") == LogLevel.warn and e.get("log_namespace") == "openclaw.providers.gemini"
        ]

    def test_args_absent(self) -> None:
        # A function without parameters: Gemini may leave args out.
        document = {"candidates": [{"content": {"parts": [{"functionCall": {"name": "f"}}]}, "finishReason": "STOP"}]}
        completion = gemini.from_gemini(document, "m", "id", 0)
        self.assertEqual(completion["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], "{}")


def allowed_tools(mode: str, *names: str) -> dict[str, Any]:
    return {
        "type": "allowed_tools",
        "allowed_tools": {"mode": mode, "tools": [{"type": "function", "function": {"name": n}} for n in names]},
    }


class AllowedToolsTests(DataPlaneTestCase):
    @inlineCallbacks
    def test_both_providers(self):
        client = self.sdk(self.gateway())
        for mode, gemini_mode in (("auto", "AUTO"), ("required", "ANY")):
            choice = allowed_tools(mode, "get_time")
            yield deferToThread(
                client.chat.completions.create, model="x", messages=QUESTION, tools=TOOLS, tool_choice=choice
            )
            body = self.upstream.gemini.last_body
            self.assertEqual([d["name"] for d in body["tools"][0]["functionDeclarations"]], ["get_time"])
            self.assertEqual(body["toolConfig"], {"functionCallingConfig": {"mode": gemini_mode}})
            yield deferToThread(
                client.chat.completions.create,
                model="kimi/moonshot-v1-8k",
                messages=QUESTION,
                tools=TOOLS,
                tool_choice=choice,
            )
            self.assertEqual(self.upstream.kimi.last_body["tool_choice"], choice)

    @inlineCallbacks
    def test_refused(self):
        gateway = self.gateway()
        for choice, param in (
            (allowed_tools("none", "get_time"), "tool_choice.allowed_tools.mode"),
            (allowed_tools("auto", "get_nothing"), "tool_choice.allowed_tools.tools[0].function.name"),
            (allowed_tools("auto"), "tool_choice.allowed_tools.tools"),
            ({"type": "allowed_tools"}, "tool_choice.allowed_tools"),
            (
                {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "x"}]}},
                "tool_choice.allowed_tools.tools[0]",
            ),
        ):
            response, text = yield self.post(gateway, {"messages": QUESTION, "tools": TOOLS, "tool_choice": choice})
            self.assertEqual(response.code, 400, choice)
            self.assertEqual(self.assertOpenAIError(text)["param"], param)


class ToolChoiceWithoutToolsTests(DataPlaneTestCase):
    @inlineCallbacks
    def test_no_function_calling_config(self):
        """
        tool_choice "auto" or "none" with no tools, or an empty list of
        them (an agent whose tools were all filtered out): answered, with
        no toolConfig sent, which the Gemini API refuses without a function
        declaration (400 "Function calling config is set without
        function_declarations."; trial s37: it was sent).  Kimi gets the
        request as it came.
        """
        client = self.sdk(self.gateway())
        for choice in ("auto", "none"):
            for tools in ({}, {"tools": []}):
                yield deferToThread(
                    client.chat.completions.create, model="x", messages=QUESTION, tool_choice=choice, **tools
                )
                body = self.upstream.gemini.last_body
                self.assertNotIn("toolConfig", body)
                self.assertNotIn("tools", body)
                yield deferToThread(
                    client.chat.completions.create,
                    model="kimi/moonshot-v1-8k",
                    messages=QUESTION,
                    tool_choice=choice,
                    **tools,
                )
                self.assertEqual(self.upstream.kimi.last_body["tool_choice"], choice)
        # With tools, as before.
        yield deferToThread(
            client.chat.completions.create, model="x", messages=QUESTION, tools=TOOLS, tool_choice="none"
        )
        self.assertEqual(self.upstream.gemini.last_body["toolConfig"], {"functionCallingConfig": {"mode": "NONE"}})


class ToolResultPartsTests(SynchronousTestCase):
    def test_joined_by_newline(self) -> None:
        call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        body = chat(
            messages=[
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {
                    "role": "tool",
                    "tool_call_id": "call_1",
                    "content": [{"type": "text", "text": "part1"}, {"type": "text", "text": "part2"}],
                },
            ]
        )
        response = gemini.to_gemini(body)["contents"][-1]["parts"][0]["functionResponse"]["response"]
        self.assertEqual(response, {"result": "part1\npart2"})
