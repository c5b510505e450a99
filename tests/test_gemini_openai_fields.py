"""
OpenAI's request fields and answer parts on the Gemini path: a field sent
as null hides no other; C{parallel_tool_calls: false} gives one tool
call; log probabilities are asked for and passed on; audio output, and
values Gemini would refuse, a web search and a token bias, are a gateway
400 naming the field; an image
URL's type is read from its path, a data URL's from its media type (in
any case), and a URL with a password is refused; tool names with dots are
refused; a history whose tool calls no user turn comes before is refused;
a candidate without a finish reason is a malformed answer; the legacy
C{functions} are answered in the legacy shape.  Each rule on the
translation functions alone, and through a real gateway in front of the
stand-in upstream with the official openai SDK.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import orjson
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from openclaw.consumers.estimate import answer_bytes, chunk_bytes
from openclaw.dataplane.errors import APIError
from openclaw.dataplane.request import parse_chat_request
from openclaw.dataplane.sse import Event, encode
from openclaw.providers.gemini import translate as gemini
from openclaw.providers.wire import MalformedAnswer, ModelFailed
from openclaw.testing.upstream import GeminiAnswer
from tests.test_agent_traffic import PARIS, QUESTION, TOOLS, ask
from tests.test_dataplane import DataPlaneTestCase

#: Two calls in one event, then a third in the next: Gemini 3 signs the
#: first only.
PARALLEL = GeminiAnswer(
    (
        (
            {
                "functionCall": {"name": "get_weather", "args": {"city": "Paris"}, "id": "fc-1"},
                "thoughtSignature": "s1",
            },
            {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}, "id": "fc-2"}},
        ),
        ({"functionCall": {"name": "get_time", "args": {}, "id": "fc-3"}},),
    )
)
#: Text with a token that is not ASCII (its UTF-8 bytes are two per "é").
TOKENS = GeminiAnswer((({"text": "Été"},), ({"text": " chaud"},)))


def chat(**body: Any) -> dict[str, Any]:
    body.setdefault("messages", [{"role": "user", "content": "Hi"}])
    return parse_chat_request(orjson.dumps(body)).body


def refused(body: dict[str, Any], model: str = "gemini-flash-latest") -> APIError:
    """
    The 400 the Gemini translation refuses C{body} with.
    """
    try:
        gemini.to_gemini(body, model)
    except APIError as e:
        assert e.status == 400, e
        return e
    raise AssertionError(f"not refused: {body}")


class NullFieldTests(SynchronousTestCase):
    """
    A field set to null is not set: it hides no other field.
    """

    def test_max_tokens_with_null_max_completion_tokens(self) -> None:
        config = gemini.generation_config(chat(max_tokens=50, max_completion_tokens=None))
        self.assertEqual(config["maxOutputTokens"], 50)
        config = gemini.generation_config(chat(max_tokens=None, max_completion_tokens=60))
        self.assertEqual(config["maxOutputTokens"], 60)
        # Both set: the newer name wins, as before.
        config = gemini.generation_config(chat(max_tokens=50, max_completion_tokens=60))
        self.assertEqual(config["maxOutputTokens"], 60)

    def test_null_schema(self) -> None:
        body = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": None}})
        config = gemini.generation_config(body)
        self.assertEqual(config, {"responseMimeType": "application/json"})

    def test_null_include_usage(self) -> None:
        request = parse_chat_request(
            orjson.dumps(
                {"messages": QUESTION, "stream": True, "stream_options": {"include_usage": None}},
            )
        )
        self.assertFalse(request.include_usage)

    def test_null_usage_counts(self) -> None:
        usage = gemini.usage(
            {"promptTokenCount": 3, "candidatesTokenCount": None, "thoughtsTokenCount": None, "totalTokenCount": None}
        )
        self.assertEqual(usage, {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3})

    def test_null_index(self) -> None:
        document = {"candidates": [{"index": None, "content": {"parts": [{"text": "a"}]}, "finishReason": "STOP"}]}
        completion = gemini.from_gemini(document, "m", "id", 0)
        self.assertEqual(completion["choices"][0]["index"], 0)


def candidate(text: str, index: int | None) -> dict[str, Any]:
    found: dict[str, Any] = {"content": {"parts": [{"text": text}]}, "finishReason": "STOP"}
    if index is not None:
        found["index"] = index
    return found


class CandidateIndexTests(SynchronousTestCase):
    """
    Choices in index order, whatever Gemini's; an index out of range or
    given twice is a malformed answer (502), whole and streamed.
    """

    def test_sorted(self) -> None:
        document = {"candidates": [candidate("second", 1), candidate("first", 0)]}
        choices = gemini.from_gemini(document, "m", "id", 0, asked=2)["choices"]
        self.assertEqual([(c["index"], c["message"]["content"]) for c in choices], [(0, "first"), (1, "second")])
        chunk = gemini.GeminiStream("m", "id", 0, asked=2).chunk(document)
        assert chunk is not None
        self.assertEqual([(c["index"], c["delta"]["content"]) for c in chunk["choices"]], [(0, "first"), (1, "second")])

    def test_no_index_is_0(self) -> None:
        """
        A candidate without an index (or a null one) is index 0, wherever
        it is in the list: proto3's JSON leaves a zero field out.
        """
        for first, second in (
            (candidate("b", 1), candidate("a", None)),
            (candidate("a", None), candidate("b", 1)),
            (candidate("b", 1), {**candidate("a", None), "index": None}),
        ):
            document = {"candidates": [first, second]}
            choices = gemini.from_gemini(document, "m", "id", 0, asked=2)["choices"]
            self.assertEqual([(c["index"], c["message"]["content"]) for c in choices], [(0, "a"), (1, "b")])
            chunk = gemini.GeminiStream("m", "id", 0, asked=2).chunk(document)
            assert chunk is not None
            self.assertEqual([(c["index"], c["delta"]["content"]) for c in chunk["choices"]], [(0, "a"), (1, "b")])
        # Across a stream's events: index 1 first, then 0 left out.
        stream = gemini.GeminiStream("m", "id", 0, asked=2)
        for event in (
            {"candidates": [{"content": {"parts": [{"text": "b"}]}, "index": 1}]},
            {"candidates": [{"content": {"parts": [{"text": "a"}]}}]},
            {"candidates": [candidate("", 1), candidate("", None)]},
        ):
            stream.chunk(event)
        self.assertTrue(stream.complete)
        self.assertEqual([c["choices"][0]["index"] for c in stream.closing()], [0, 1])

    def test_malformed(self) -> None:
        for candidates, asked, words in (
            ([candidate("a", 0), candidate("b", 0)], 2, "two candidates index 0"),
            ([candidate("a", None), candidate("b", 0)], 2, "two candidates index 0"),
            ([{**candidate("a", None), "index": "1"}], 2, "index is not a whole number"),
            ([{**candidate("a", None), "index": True}], 2, "index is not a whole number"),
            ([candidate("a", 5)], 1, "index 5 is out of range (0 to 0"),
            ([candidate("a", 2), candidate("b", 1)], 2, "index 2 is out of range"),
            ([candidate("a", -1)], 1, "index -1 is out of range"),
            ([candidate("a", 1)], None, "out of range"),
        ):
            document = {"candidates": candidates}
            with self.assertRaises(MalformedAnswer) as caught:
                gemini.from_gemini(document, "m", "id", 0, asked=asked)
            self.assertNotIsInstance(caught.exception, ModelFailed)
            self.assertIn(words, str(caught.exception))
            stream = gemini.GeminiStream("m", "id", 0, asked=asked)
            if asked is None:
                # A stream does not know how many are coming: only a
                # negative or repeated index is malformed there.
                stream.chunk(document)
                continue
            with self.assertRaises(gemini.GeminiStreamError) as streamed:
                stream.chunk(document)
            self.assertEqual(streamed.exception.code, "upstream_malformed")
            self.assertIn(words, str(streamed.exception))
        with self.assertRaises(gemini.GeminiStreamError):
            gemini.GeminiStream("m", "id", 0).chunk({"candidates": [candidate("a", -1)]})

    def test_asked_is_n(self) -> None:
        wire = gemini.GeminiWire()
        body = orjson.dumps({"candidates": [candidate("b", 1), candidate("a", 0)]})
        for n, fine in ((2, True), (None, False), (1, False)):
            request = parse_chat_request(orjson.dumps({"messages": QUESTION, "n": n}))
            if fine:
                answer = orjson.loads(wire.completion(body, "m", 0, request).body)
                self.assertEqual([c["message"]["content"] for c in answer["choices"]], ["a", "b"])
            else:
                with self.assertRaises(MalformedAnswer):
                    wire.completion(body, "m", 0, request)


class ParallelToolCallsTests(SynchronousTestCase):
    def document(self) -> dict[str, Any]:
        parts = [part for event in PARALLEL.events for part in event]
        return {"candidates": [{"content": {"parts": parts, "role": "model"}, "finishReason": "STOP"}]}

    def test_whole(self) -> None:
        completion = gemini.from_gemini(self.document(), "m", "id", 0, parallel_tool_calls=False)
        (call,) = completion["choices"][0]["message"]["tool_calls"]
        self.assertEqual(json.loads(call["function"]["arguments"]), {"city": "Paris"})
        # The signed one, its signature carried in the id.
        self.assertIn("s1", call["id"])
        self.assertEqual(completion["choices"][0]["finish_reason"], "tool_calls")
        # Allowed: all three.
        completion = gemini.from_gemini(self.document(), "m", "id", 0)
        self.assertEqual(len(completion["choices"][0]["message"]["tool_calls"]), 3)

    def test_stream(self) -> None:
        stream = gemini.GeminiStream("m", "id", 0, parallel_tool_calls=False)
        chunks = []
        for i, event in enumerate(PARALLEL.events):
            candidate: dict[str, Any] = {"content": {"parts": list(event), "role": "model"}}
            if i == len(PARALLEL.events) - 1:
                candidate["finishReason"] = "STOP"
            chunks.append(stream.chunk({"candidates": [candidate]}))
        calls = [c for chunk in chunks if chunk for ch in chunk["choices"] for c in ch["delta"].get("tool_calls", ())]
        self.assertEqual([c["index"] for c in calls], [0])
        self.assertEqual(json.loads(calls[0]["function"]["arguments"]), {"city": "Paris"})
        self.assertEqual(stream.closing()[0]["choices"][0]["finish_reason"], "tool_calls")


class LogprobsTranslationTests(SynchronousTestCase):
    def test_request(self) -> None:
        config = gemini.generation_config(chat(logprobs=True, top_logprobs=3))
        self.assertEqual((config["responseLogprobs"], config["logprobs"]), (True, 3))
        config = gemini.generation_config(chat(logprobs=True))
        self.assertEqual(config, {"responseLogprobs": True})
        self.assertEqual(gemini.generation_config(chat(logprobs=False, top_logprobs=None)), {})

    def test_top_logprobs_without_logprobs(self) -> None:
        # OpenAI's rule: refused at the door, whichever the provider.
        for fields in (
            {"top_logprobs": 2},
            {"logprobs": False, "top_logprobs": 2},
            {"logprobs": None, "top_logprobs": 0},
        ):
            with self.assertRaises(APIError) as caught:
                chat(**fields)
            self.assertEqual(caught.exception.param, "top_logprobs", fields)

    def test_out_of_range(self) -> None:
        # Gemini's range is OpenAI's, [0, 20]: refused at the door.
        with self.assertRaises(APIError) as caught:
            chat(logprobs=True, top_logprobs=21)
        self.assertEqual(caught.exception.param, "top_logprobs")

    def test_answer(self) -> None:
        candidate = {
            "content": {"parts": [{"text": "Été"}]},
            "finishReason": "STOP",
            "logprobsResult": {
                "chosenCandidates": [{"token": "Été", "tokenId": 7, "logProbability": -0.5}, {"tokenId": 8}],
                "topCandidates": [
                    {
                        "candidates": [
                            {"token": "Été", "logProbability": -0.5},
                            {"token": "Hiver", "logProbability": -2},
                        ]
                    },
                    {"candidates": []},
                ],
            },
        }
        completion = gemini.from_gemini({"candidates": [candidate]}, "m", "id", 0)
        self.assertEqual(
            completion["choices"][0]["logprobs"],
            {
                "content": [
                    {
                        "token": "Été",
                        "logprob": -0.5,
                        "bytes": list("Été".encode()),
                        "top_logprobs": [
                            {"token": "Été", "logprob": -0.5, "bytes": list("Été".encode())},
                            {"token": "Hiver", "logprob": -2.0, "bytes": list(b"Hiver")},
                        ],
                    },
                    # proto3's JSON leaves out "" and 0.0.
                    {"token": "", "logprob": 0.0, "bytes": [], "top_logprobs": []},
                ],
                "refusal": None,
            },
        )
        # Not asked for: none.
        del candidate["logprobsResult"]
        self.assertIsNone(gemini.from_gemini({"candidates": [candidate]}, "m", "id", 0)["choices"][0]["logprobs"])


class RefusedTests(SynchronousTestCase):
    """
    What Gemini cannot do, or would refuse, is a gateway 400 naming the
    field, never dropped or forwarded.
    """

    def test_audio_output(self) -> None:
        error = refused(chat(modalities=["text", "audio"]))
        self.assertEqual(error.param, "modalities")
        self.assertIn("audio output is not available through Gemini", error.message)
        error = refused(chat(audio={"voice": "alloy", "format": "wav"}))
        self.assertEqual(error.param, "audio")
        # Text only, and the harmless fields, still go.
        gemini.to_gemini(chat(modalities=["text"], audio=None, store=True, metadata={"a": "b"}, user="u"))

    def test_moderation(self) -> None:
        """
        OpenAI's C{moderation} (its block mode changes the answer): Gemini
        runs none, so a 400 naming it saying what to do, never dropped
        (trial s33); null goes.
        """
        for policy in ({"input": {"mode": "block"}}, {"output": {"mode": "score"}}, None):
            error = refused(chat(moderation={"model": "omni-moderation-latest", "policy": policy}))
            self.assertEqual(error.param, "moderation")
            self.assertIn("remove moderation", error.message)
        gemini.to_gemini(chat(moderation=None))

    def test_web_search_and_token_bias(self) -> None:
        """
        A web search (C{web_search_options}, even empty: OpenAI's own way
        to ask for one) and a C{logit_bias} that biases a token change the
        answer, and Gemini would do neither: a 400 naming the field saying
        what to do, never dropped (trial s29).  Null, an empty
        C{logit_bias}, and the hints and bookkeeping go.
        """
        for options in ({}, {"search_context_size": "low"}):
            error = refused(chat(web_search_options=options))
            self.assertEqual(error.param, "web_search_options")
            self.assertIn("web search, which is not available through Gemini on this gateway", error.message)
            self.assertIn("remove web_search_options", error.message)
        error = refused(chat(logit_bias={"50256": -100}))
        self.assertEqual(error.param, "logit_bias")
        self.assertIn("Gemini cannot do", error.message)
        self.assertIn("remove logit_bias", error.message)
        sent = gemini.to_gemini(
            chat(
                web_search_options=None,
                logit_bias={},
                prediction={"type": "content", "content": "Hi"},
                service_tier="auto",
                verbosity="low",
                store=False,
                metadata={"a": "b"},
                user="u",
            )
        )
        self.assertEqual(sent, {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]})
        gemini.to_gemini(chat(logit_bias=None))
        # Biases of 0 bias nothing (review s29: refused as a bias).
        gemini.to_gemini(chat(logit_bias={"50256": 0, "42": 0.0}))

    def test_limits(self) -> None:
        for body, param, words in (
            (chat(n=9), "n", "from 1 to 8"),
            (chat(seed=2**31), "seed", "32-bit"),
            (chat(seed=-(2**31) - 1), "seed", "32-bit"),
            # Every integer that becomes an int32 of generationConfig.
            (chat(max_tokens=2**31), "max_tokens", "maxOutputTokens is a 32-bit integer"),
            (chat(max_completion_tokens=2**40), "max_completion_tokens", "from 1 to 2147483647"),
            (chat(max_tokens=5, max_completion_tokens=2**31), "max_completion_tokens", "32-bit"),
            (chat(stop=["1", "2", "3", "4", "5", "6"]), "stop", "at most 5"),
        ):
            error = refused(body)
            self.assertEqual(error.param, param, body)
            self.assertIn(words, error.message)
            if "32-bit" in words or "2147483647" in words:
                # OpenAI's codes, as the data plane's own range checks give
                # (recheck s41: none).
                below = isinstance(body.get(param), int) and body[param] < 0
                self.assertEqual(error.code, f"integer_{'below_min' if below else 'above_max'}_value", body)
        # Empty stop sequences stop nothing: left out, not refused.
        self.assertNotIn("generationConfig", gemini.to_gemini(chat(stop="")))
        config = gemini.to_gemini(chat(stop=["a", "", "b", "", "", "", "c"]))["generationConfig"]
        self.assertEqual(config["stopSequences"], ["a", "b", "c"])
        # At the limits: sent.
        config = gemini.to_gemini(chat(n=8, seed=2**31 - 1, stop=["1", "2", "3", "4", "5"]))["generationConfig"]
        self.assertEqual((config["candidateCount"], config["seed"], len(config["stopSequences"])), (8, 2**31 - 1, 5))
        self.assertEqual(gemini.to_gemini(chat(seed=-(2**31)))["generationConfig"]["seed"], -(2**31))
        config = gemini.to_gemini(chat(max_tokens=2**31 - 1))["generationConfig"]
        self.assertEqual(config["maxOutputTokens"], 2**31 - 1)
        # max_tokens is not sent beside max_completion_tokens: not refused.
        config = gemini.to_gemini(chat(max_tokens=2**40, max_completion_tokens=7))["generationConfig"]
        self.assertEqual(config["maxOutputTokens"], 7)

    def test_top_k(self) -> None:
        """
        top_k (vLLM's, LiteLLM's, the Vercel AI SDK's topK) is Gemini's
        topK; one Gemini cannot take is a 400 naming it (agent trial s46:
        dropped without a word).
        """
        self.assertEqual(
            gemini.to_gemini(chat(top_k=5, temperature=1.5))["generationConfig"], {"temperature": 1.5, "topK": 5}
        )
        for value in (0, -1, 2**31, 5.0, "5", True):
            error = refused(chat(top_k=value), "gemini-2.5-flash")
            self.assertEqual(error.param, "top_k", value)
            self.assertIn("top_k must be a whole number from 1 to 2147483647 on Gemini (its topK)", error.message)
        self.assertNotIn("topK", gemini.to_gemini(chat(top_k=None)).get("generationConfig", {}))

    def test_no_thinking_off_on_gemini_2_5_pro(self) -> None:
        # Google refuses Gemini 2.5 Pro a thinking budget of 0.
        for model in ("gemini-2.5-pro", "models/gemini-2.5-pro", "gemini-2.5-pro-preview-06-05"):
            error = refused(chat(reasoning_effort="none"), model)
            self.assertEqual(error.param, "reasoning_effort")
            self.assertIn("minimal, low, medium, high, xhigh, max", error.message)
            self.assertIn(model.removeprefix("models/"), error.message)
            config = gemini.to_gemini(chat(reasoning_effort="minimal"), model)["generationConfig"]
            self.assertEqual(config["thinkingConfig"]["thinkingBudget"], 1024)
        # The models that can turn it off still do.
        for model in ("gemini-2.5-flash", "gemini-2.5-flash-lite"):
            config = gemini.to_gemini(chat(reasoning_effort="none"), model)["generationConfig"]
            self.assertEqual(config, {"thinkingConfig": {"thinkingBudget": 0}})

    def test_tools_with_json_on_gemini_2(self) -> None:
        for kind in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}):
            body = chat(tools=TOOLS, response_format=kind)
            for model in ("gemini-2.5-flash", "models/gemini-2.0-flash", "gemini-1.5-pro"):
                error = refused(body, model)
                self.assertEqual(error.param, "response_format")
                self.assertIn("Gemini 3", error.message)
            # Gemini 3 and the aliases take both.
            gemini.to_gemini(body, "gemini-3-flash-preview")
            gemini.to_gemini(body, "gemini-flash-latest")
        gemini.to_gemini(chat(tools=TOOLS, response_format={"type": "text"}), "gemini-2.5-flash")
        gemini.to_gemini(chat(response_format={"type": "json_object"}), "gemini-2.5-flash")

    def test_no_penalty_on_gemini_2_5_and_later(self) -> None:
        # Google: "Penalty is not enabled for models/gemini-2.5-flash".
        for model in (
            "gemini-2.5-pro",
            "models/gemini-2.5-flash",
            "gemini-2.5-flash-lite",
            "gemini-3-pro-preview",
            "gemini-3.1-flash-lite",
            "gemini-3.12-pro",
            "gemini-2.10-flash",
            "gemini-10-flash",
            "gemini-100-flash",
        ):
            for penalty in ("presence_penalty", "frequency_penalty"):
                for value in (0.5, -2, 2):
                    error = refused(chat(**{penalty: value}), model)
                    self.assertEqual(error.param, penalty, model)
                    self.assertIn(f"{penalty} 0 or leave it out", error.message)
                    self.assertIn(model.removeprefix("models/"), error.message)
                # 0, which some SDKs send, is Gemini's default: not sent.
                body = chat(**{penalty: 0, "temperature": 0.5})
                self.assertEqual(gemini.to_gemini(body, model)["generationConfig"], {"temperature": 0.5})
                self.assertNotIn("generationConfig", gemini.to_gemini(chat(**{penalty: 0.0}), model))
        # The older models take them; names without a version are Google's
        # to answer (an alias moves from model to model).
        for model in ("gemini-2.0-flash", "models/gemini-1.5-pro", "gemini-flash-latest", "gemini-exp-1206", ""):
            config = gemini.to_gemini(chat(presence_penalty=0.5, frequency_penalty=-1), model)["generationConfig"]
            self.assertEqual((config["presencePenalty"], config["frequencyPenalty"]), (0.5, -1), model)

    def test_one_candidate_on_gemini_3(self) -> None:
        # Google: "Multiple candidates is not enabled for this model".
        for model in (
            "gemini-3-pro-preview",
            "models/gemini-3-flash-preview",
            "gemini-3.1-flash-lite",
            "gemini-4",
            "gemini-100",
        ):
            for n in (2, 8):
                error = refused(chat(n=n), model)
                self.assertEqual(error.param, "n", model)
                self.assertIn("send n 1", error.message)
            self.assertEqual(gemini.to_gemini(chat(n=1), model)["generationConfig"], {"candidateCount": 1})
            self.assertNotIn("generationConfig", gemini.to_gemini(chat(n=None), model))
        # Gemini 2.5 and older take up to 8; unversioned names are Google's.
        for model in ("gemini-2.5-flash", "gemini-2.0-flash", "gemini-pro-latest", ""):
            self.assertEqual(gemini.to_gemini(chat(n=8), model)["generationConfig"], {"candidateCount": 8})


def image(url: str) -> dict[str, Any]:
    return chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])


class ImageTypeTests(SynchronousTestCase):
    def sent_type(self, url: str) -> str:
        part = gemini.to_gemini(image(url))["contents"][0]["parts"][0]
        return str(part["fileData"]["mimeType"])

    def test_path_only(self) -> None:
        self.assertEqual(self.sent_type("https://example.com/a.webp#frag"), "image/webp")
        self.assertEqual(self.sent_type("https://example.com/a.PNG?x=1.html#y.gif"), "image/png")
        self.assertEqual(self.sent_type("https://storage.googleapis.com/bucket/dir/photo.heic"), "image/heic")
        self.assertEqual(self.sent_type("https://example.com/a.jpeg"), "image/jpeg")

    def test_scheme_in_any_case(self) -> None:
        """
        An image URL's scheme is read in any case (RFC 3986 section 3.1),
        as a data URL's is, and sent to Gemini in lower case; the rest of
        the URL as it was.
        """
        for url, sent in (
            ("HTTPS://Example.com/A.png", "https://Example.com/A.png"),
            ("Http://example.com/a", "http://example.com/a"),
        ):
            part = gemini.to_gemini(image(url))["contents"][0]["parts"][0]
            self.assertEqual(part["fileData"]["fileUri"], sent)
        # gs:// in any case is refused (CloudStorageTests).
        self.assertIn("gs:// (Cloud Storage)", refused(image("GS://bucket/Photo.PNG")).message)
        with self.assertRaises(APIError) as caught:
            image("HTTPS://user:s3cret@example.com/a.png")
        self.assertIn("user name or password", caught.exception.message)
        with self.assertRaises(APIError):
            image("FTP://example.com/a.png")

    def test_cloud_storage_refused(self) -> None:
        """
        A C{gs://} image URL, which the Gemini API does not read (Google:
        "Invalid or unsupported file uri"; googleapis/python-genai #71), is
        a 400 naming the part and saying what to send instead, before
        anything is sent; so is one with no bucket (not "has no host").
        """
        for url in (
            "gs://bucket/dir/photo.png",
            "GS://bucket/Photo.PNG",
            "gs://bucket/image",
            "gs://",
            "gs:///x",
            "GS:///x.png",
            "gs://:443/x.png",
        ):
            error = refused(image(url))
            self.assertEqual(error.param, "messages[0].content[0].image_url.url", url)
            self.assertIn("is a gs:// (Cloud Storage) URL, which the Gemini API does not read", error.message)
            self.assertIn("https://storage.googleapis.com/<bucket>/<object>", error.message)
            self.assertIn("base64 data URL", error.message)
            self.assertNotIn("bucket/", error.message.replace("<bucket>/", ""))

    def test_detail_as_media_resolution(self) -> None:
        """
        An image's C{detail} is Gemini's per-part C{mediaResolution} on the
        models that take one (Gemini 3 and later: Google's media resolution
        guide), "auto" none; elsewhere (Gemini 2, 1, names without a
        version) it is left out, never refused.
        """

        def sent(detail: str | None, model: str) -> dict[str, Any]:
            url = {"url": "https://example.com/a.png", **({} if detail is None else {"detail": detail})}
            body = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": url}]}])
            return dict(gemini.to_gemini(body, model)["contents"][0]["parts"][0])

        file_data = {"fileData": {"fileUri": "https://example.com/a.png", "mimeType": "image/png"}}
        for model in ("gemini-3-flash-preview", "models/gemini-3.1-pro-preview", "gemini-4", "gemini-10-pro"):
            for detail, level in (("low", "MEDIA_RESOLUTION_LOW"), ("high", "MEDIA_RESOLUTION_HIGH")):
                self.assertEqual(sent(detail, model), {**file_data, "mediaResolution": {"level": level}}, model)
            self.assertEqual(sent("auto", model), file_data)
            self.assertEqual(sent(None, model), file_data)
        for model in ("gemini-2.5-flash", "gemini-2.0-flash", "gemini-flash-latest", "gemini-exp-1206", ""):
            for detail in ("low", "high", "auto", None):
                self.assertEqual(sent(detail, model), file_data, (model, detail))
        # A data URL's part too.
        body = chat(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}
                    ],
                }
            ]
        )
        self.assertEqual(
            gemini.to_gemini(body, "gemini-3-flash-preview")["contents"][0]["parts"][0],
            {
                "inlineData": {"mimeType": "image/png", "data": "AAAA"},
                "mediaResolution": {"level": "MEDIA_RESOLUTION_LOW"},
            },
        )

    def test_no_extension(self) -> None:
        self.assertEqual(self.sent_type("https://example.com/image"), "image/jpeg")
        self.assertEqual(self.sent_type("https://example.com/"), "image/jpeg")
        self.assertEqual(self.sent_type("https://example.com/render.v2"), "image/jpeg")

    def test_not_an_image(self) -> None:
        for url in ("https://example.com/page.html", "https://example.com/doc.pdf?a=1", "https://example.com/a.gif"):
            error = refused(image(url))
            self.assertEqual(error.param, "messages[0].content[0].image_url.url")
            self.assertIn("must name a PNG, JPEG, WEBP, HEIC or HEIF image", error.message)

    def test_data_url_types(self) -> None:
        """
        A data URL's media type is checked against the same types as an
        image URL's name; scheme and type are read in any case (RFC 3986,
        RFC 2045) and sent in lower case.
        """
        for media_type in ("image/gif", "image/svg+xml", "text/plain", "IMAGE/GIF", "application/octet-stream"):
            error = refused(image(f"data:{media_type};base64,AAAA"))
            self.assertEqual(error.param, "messages[0].content[0].image_url.url")
            self.assertIn(f"type {media_type.lower()}, not an image Gemini takes", error.message)
            self.assertIn("PNG, JPEG, WEBP, HEIC or HEIF", error.message)
        for url, sent in (
            ("data:image/png;base64,AAAA", "image/png"),
            ("DATA:IMAGE/PNG;BASE64,AAAA", "image/png"),
            ("Data:Image/Jpeg;name=a.jpg;Base64,AAAA", "image/jpeg"),
            ("data:image/jpg;base64,AAAA", "image/jpeg"),
            ("data:image/webp;base64,AAAA", "image/webp"),
            ("data:image/HEIC;base64,AAAA", "image/heic"),
            ("data:image/heif;base64,AAAA", "image/heif"),
        ):
            part = gemini.to_gemini(image(url))["contents"][0]["parts"][0]
            self.assertEqual(part, {"inlineData": {"mimeType": sent, "data": "AAAA"}}, url)
        # A file is not an image: its type is not checked, only lowered.
        body = chat(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "file", "file": {"file_data": "DATA:Application/PDF;BASE64,JVBE"}}],
                }
            ]
        )
        part = gemini.to_gemini(body)["contents"][0]["parts"][0]
        self.assertEqual(part, {"inlineData": {"mimeType": "application/pdf", "data": "JVBE"}})
        # Still base64, strictly: unpadded data is refused at the door.
        with self.assertRaises(APIError):
            image("DATA:IMAGE/PNG;BASE64,AAA")

    def test_password_in_url(self) -> None:
        """
        An image URL with a user name or password is refused at the door
        (for every provider: it would fetch the image with it), without
        quoting the URL back; so is one whose host does not parse.
        """
        for url in (
            "https://user:s3cret@example.com/a.png",
            "http://token@example.com/a.png",
            "https://:s3cret@example.com/",
            "gs://user:s3cret@bucket/a.png",
        ):
            with self.assertRaises(APIError) as caught:
                image(url)
            self.assertEqual(caught.exception.param, "messages[0].content[0].image_url.url", url)
            self.assertIn("user name or password", caught.exception.message)
            self.assertIn("remove it", caught.exception.message)
            self.assertNotIn("s3cret", caught.exception.message)
        with self.assertRaises(APIError) as caught:
            image("https://[user:s3cret@::1/a.png")
        self.assertIn("is not a valid URL", caught.exception.message)
        self.assertNotIn("s3cret", caught.exception.message)
        # An @ after the host is no userinfo.
        self.assertEqual(self.sent_type("https://example.com/@me/a.png?by=a@b#c@d"), "image/png")

    def test_url_that_cannot_be_fetched(self) -> None:
        """
        An image URL with no host, a port that is no port, or a space or
        control character (RFC 3986 section 2) is refused at the door, for
        every provider, saying what to fix.
        """
        for url, said in (
            ("https:///a.png", "has no host"),
            ("https://:443/a.png", "has no host"),
            ("https://example.com:99999/a.png", "port"),
            ("https://example.com:http/a.png", "port"),
            ("https://exa mple.com/a.png", "percent-encode"),
            ("https://example.com/a b.png", "%20"),
            ("https://example.com/a\x00.png", "invisible character"),
            ("https://example.com/a\n.png", "invisible character"),
            ("https://example.com/a\x85.png", "invisible character"),
            ("https://example.com/a\u2028.png", "invisible character"),
            ("https://example.com/a\u200b.png", "invisible character"),
            ("https://example.com/a\u00a0.png", "invisible character"),
            # Printable to Python, shown as nothing: a Hangul filler, a
            # variation selector.
            ("https://example.com/a\u3164.png", "invisible character"),
            ("https://exa\ufe0fmple.com/a.png", "invisible character"),
            ("https://example.com:0/a.png", "port"),
            ("https://h\\a.png", "backslash"),
        ):
            with self.assertRaises(APIError) as caught:
                image(url)
            self.assertEqual(caught.exception.param, "messages[0].content[0].image_url.url", url)
            self.assertIn(said, caught.exception.message, url)
        self.assertEqual(self.sent_type("https://example.com:8443/a%20b.png"), "image/png")

    def test_base64_in_lines(self) -> None:
        """
        Base64 wrapped in lines (as C{base64} and MIME write it; RFC 2045
        section 6.8) is taken without its line breaks; other junk is not.
        """
        wrapped = "iVBORw0KGgoAAAANSUhEUgAA\r\nAAEAAAABCAYAAAAfFcSJ\nAAAADUlEQVR42mNk\n"
        part = gemini.to_gemini(image("data:image/png;base64," + wrapped))["contents"][0]["parts"][0]
        self.assertEqual(part["inlineData"]["data"], wrapped.replace("\r", "").replace("\n", ""))
        body = chat(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE\nRi0x"}},
                        {"type": "input_audio", "input_audio": {"data": "UklG\nRiQA", "format": "wav"}},
                    ],
                }
            ]
        )
        parts = gemini.to_gemini(body)["contents"][0]["parts"]
        self.assertEqual([p["inlineData"]["data"] for p in parts], ["JVBERi0x", "UklGRiQA"])
        for junk in ("AAAA\n!!!!", "AAA\nA=", "\n"):
            with self.assertRaises(APIError):
                image("data:image/png;base64," + junk)


def call_turn(call_id: str = "c1") -> list[dict[str, Any]]:
    """
    An assistant message with one tool call, and its result.
    """
    return [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call_id, "type": "function", "function": {"name": "get_time", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "noon"},
    ]


class CallTurnOrderTests(SynchronousTestCase):
    """
    Gemini refuses a function call turn that does not come right after a
    user turn or a function response turn: a valid OpenAI history whose
    first tool calls no user message (with content) comes before is a 400
    naming that message, before anything is sent; no user turn is made up.
    """

    def test_no_user_turn_before_calls(self) -> None:
        system = {"role": "system", "content": "Be brief."}
        for messages, at in (
            ([system, *call_turn()], "messages[1]"),
            ([system, {"role": "user", "content": ""}, *call_turn()], "messages[2]"),
            ([{"role": "user", "content": [{"type": "text", "text": ""}]}, *call_turn()], "messages[1]"),
            # Text from the assistant first: still no user turn.
            (
                [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": ""}, *call_turn()],
                "messages[2]",
            ),
        ):
            error = refused(chat(messages=messages, tools=TOOLS))
            self.assertEqual(error.param, at, messages)
            self.assertIn(f"add a user message before {at}", error.message)
            self.assertEqual(error.type, "invalid_request_error")

    def test_after_a_user_turn(self) -> None:
        picture = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        for messages in (
            [*QUESTION, *call_turn()],
            [{"role": "system", "content": "s"}, {"role": "user", "content": [picture]}, *call_turn()],
            [{"role": "user", "content": ""}, *QUESTION, *call_turn("c1"), *call_turn("c2")],
            [*QUESTION, {"role": "assistant", "content": "Let me look."}, *call_turn()],
        ):
            roles = [turn["role"] for turn in gemini.to_gemini(chat(messages=messages, tools=TOOLS))["contents"]]
            # User first, then turns of each role in turn, as sent.
            self.assertEqual(roles, ["user", "model", "user", "model", "user"][: len(roles)], messages)
            self.assertIn(len(roles), (3, 5))


class UnfinishedCandidateTests(SynchronousTestCase):
    """
    A whole answer's candidate without a finishReason has not stopped
    (Google's reference): a malformed answer (502 upstream_malformed,
    the provider's failure), as a stream cut before it ends in an error.
    """

    def test_no_finish_reason(self) -> None:
        for unfinished in (
            {"content": {"parts": [{"text": "Sunny"}], "role": "model"}},
            {"content": {"parts": [{"text": "Sunny"}]}, "finishReason": None},
            {"content": {"parts": [{"functionCall": {"name": "get_time", "args": {}}}]}},
        ):
            with self.assertRaises(MalformedAnswer) as caught:
                gemini.from_gemini({"candidates": [unfinished]}, "m", "id", 0)
            self.assertNotIsInstance(caught.exception, ModelFailed)
            self.assertEqual(caught.exception.code, "upstream_malformed")
            self.assertIn("no finishReason", str(caught.exception))
        # One of two choices unfinished: the answer is.
        document = {"candidates": [candidate("a", 0), {"content": {"parts": [{"text": "b"}]}, "index": 1}]}
        with self.assertRaises(MalformedAnswer):
            gemini.from_gemini(document, "m", "id", 0, asked=2)


#: A legacy request (functions, function_call) as the SDK sends it.
LEGACY = {"functions": [TOOLS[0]["function"], TOOLS[1]["function"]], "function_call": "auto"}


class LegacyFunctionsTests(SynchronousTestCase):
    """
    A request that declares the legacy functions gets its call in the
    legacy shape: message.function_call (the first call only: the shape
    carries one), finish_reason function_call; streamed,
    delta.function_call.
    """

    def request(self, **body: Any) -> Any:
        return parse_chat_request(orjson.dumps({"messages": QUESTION, **body}))

    def test_flag(self) -> None:
        self.assertTrue(self.request(**LEGACY).legacy_functions)
        self.assertTrue(self.request(functions=LEGACY["functions"]).legacy_functions)
        self.assertFalse(self.request(tools=TOOLS).legacy_functions)
        self.assertFalse(self.request(tools=TOOLS, functions=None).legacy_functions)
        self.assertFalse(self.request(function_call="none").legacy_functions)

    def test_whole(self) -> None:
        wire = gemini.GeminiWire()
        body = orjson.dumps(ParallelToolCallsTests().document())
        answer = orjson.loads(wire.completion(body, "m", 0, self.request(**LEGACY)).body)
        (choice,) = answer["choices"]
        self.assertEqual(choice["finish_reason"], "function_call")
        message = choice["message"]
        self.assertNotIn("tool_calls", message)
        self.assertEqual(message["function_call"], {"name": "get_weather", "arguments": '{"city":"Paris"}'})
        self.assertIsNone(message["content"])
        # Text beside the call is kept; an answer without a call is as ever.
        document = {
            "candidates": [{"content": {"parts": [{"text": "Hm."}, *PARALLEL.events[1]]}, "finishReason": "STOP"}]
        }
        message = gemini.from_gemini(document, "m", "id", 0, legacy_functions=True)["choices"][0]["message"]
        self.assertEqual((message["content"], message["function_call"]["name"]), ("Hm.", "get_time"))
        document = {"candidates": [candidate("Sunny", 0)]}
        choice = gemini.from_gemini(document, "m", "id", 0, legacy_functions=True)["choices"][0]
        self.assertEqual((choice["finish_reason"], choice["message"].get("function_call")), ("stop", None))
        # With tools: the tools shape, as before.
        answer = orjson.loads(wire.completion(body, "m", 0, self.request(tools=TOOLS)).body)
        self.assertEqual(len(answer["choices"][0]["message"]["tool_calls"]), 3)
        self.assertEqual(answer["choices"][0]["finish_reason"], "tool_calls")

    def test_stream(self) -> None:
        translation = gemini.GeminiWire().stream(self.request(**LEGACY, stream=True), "m", 0)
        payloads = []
        for i, event in enumerate(PARALLEL.events):
            part: dict[str, Any] = {"content": {"parts": list(event), "role": "model"}}
            if i == len(PARALLEL.events) - 1:
                part["finishReason"] = "STOP"
            payloads += translation.payloads(Event(b"", orjson.dumps({"candidates": [part]})))
        payloads += translation.closing()
        deltas = [choice["delta"] for p in payloads for choice in orjson.loads(p)["choices"]]
        self.assertFalse(any("tool_calls" in delta for delta in deltas))
        calls = [delta["function_call"] for delta in deltas if "function_call" in delta]
        self.assertEqual(calls, [{"name": "get_weather", "arguments": '{"city":"Paris"}'}])
        self.assertEqual(orjson.loads(payloads[-1])["choices"][0]["finish_reason"], "function_call")
        # A usage estimate (the answer's own usage never known) counts the
        # call, as it counts tool calls: its name and arguments.
        call_characters = len("get_weather") + len('{"city":"Paris"}')
        self.assertEqual(chunk_bytes(b"".join(encode(p) for p in payloads)), call_characters)

    def test_errors_name_functions(self) -> None:
        """
        A 400 about a legacy function names it in C{functions}, the field
        the client sent, not in the C{tools} it is rewritten to.
        """
        for functions, param in (
            ([{"name": "fs.read"}], "functions[0].name"),
            ([{"name": "a"}, {"name": "a"}], "functions[1].name"),
            (["a"], "functions[0]"),
            ([{"name": "a", "parameters": []}], "functions[0].parameters"),
            ([{"name": "a", "description": 1}], "functions[0].description"),
        ):
            with self.assertRaises(APIError) as caught:
                self.request(functions=functions)
            self.assertEqual(caught.exception.param, param)
            self.assertTrue(caught.exception.message.startswith(param), caught.exception.message)
            self.assertNotIn("tools", caught.exception.message)
        with self.assertRaises(APIError) as caught:
            self.request(tools=[{"type": "function", "function": {"name": "fs.read"}}])
        self.assertEqual(caught.exception.param, "tools[0].function.name")

    def test_estimate_counts_the_call(self) -> None:
        body = orjson.dumps(ParallelToolCallsTests().document())
        answer = gemini.GeminiWire().completion(body, "m", 0, self.request(**LEGACY)).body
        self.assertEqual(answer_bytes(answer), len("get_weather") + len('{"city":"Paris"}'))


class ToolNameTests(SynchronousTestCase):
    def test_dots_refused(self) -> None:
        # OpenAI's rule (a-z, A-Z, 0-9, _ and -, at most 64): a tool loop
        # must survive switch_provider to an OpenAI-shaped provider.
        tool = {"type": "function", "function": {"name": "fs.read", "parameters": {}}}
        with self.assertRaises(APIError) as caught:
            chat(tools=[tool])
        self.assertEqual(caught.exception.param, "tools[0].function.name")
        self.assertNotIn(" . ", caught.exception.message)
        chat(tools=[{"type": "function", "function": {"name": "fs_read-2", "parameters": {}}}])

    def test_dots_refused_in_the_history(self) -> None:
        # A history is sent on as it is, to whichever provider answers.
        messages = [
            {"role": "user", "content": "read it"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "fs.read", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "text"},
        ]
        with self.assertRaises(APIError) as caught:
            chat(messages=messages)
        self.assertEqual(caught.exception.param, "messages[1].tool_calls[0].function.name")
        self.assertIn("fs_read", caught.exception.message)


class IsolateRefSiblingsTests(SynchronousTestCase):
    """
    L{gemini.isolate_ref_siblings}: a C{$ref} with sibling keywords moves into
    an C{anyOf} of one; names, data and C{description}/C{default} stay.
    """

    def test_rewrites(self) -> None:
        place = {"type": "object"}
        schema = {
            "$ref": "#/$defs/Root",
            "$defs": {"Root": {"properties": {"$ref": {"$ref": "#/$defs/P", "title": "T"}}}, "P": place},
            "properties": {
                "kept": {"$ref": "#/$defs/P", "description": "d", "default": {}},
                "data": {"enum": [{"$ref": "x", "title": "data"}], "default": {"$ref": "y", "title": "data"}},
                "either": {"$ref": "#/$defs/P", "anyOf": [{"type": "null"}], "title": "left"},
            },
        }
        before = json.dumps(schema)
        sent = gemini.isolate_ref_siblings(schema)
        self.assertEqual(json.dumps(schema), before)
        self.assertEqual(sent["anyOf"], [{"$ref": "#/$defs/Root"}])
        self.assertNotIn("$ref", sent)
        self.assertEqual(sent["$defs"]["Root"]["properties"]["$ref"], {"title": "T", "anyOf": [{"$ref": "#/$defs/P"}]})
        self.assertIs(sent["$defs"]["P"], place)
        for name in ("kept", "data", "either"):
            self.assertIs(sent["properties"][name], schema["properties"][name], name)
        # Draft-07 (zod-to-json-schema): siblings of $ref are ignored there,
        # so dropped, not moved; a root's definitions stay (review s21).
        draft07 = {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "$ref": "#/definitions/A",
            "definitions": {"A": {"type": "object", "properties": {"b": {"$ref": "#/definitions/B", "type": "x"}}}},
        }
        sent = gemini.isolate_ref_siblings(draft07)
        self.assertEqual(
            sent,
            {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "definitions": {"A": {"type": "object", "properties": {"b": {"$ref": "#/definitions/B"}}}},
                "anyOf": [{"$ref": "#/definitions/A"}],
            },
        )
        # A body with no "$ref" (nor an escape that could spell one) has
        # its schemas sent as they are, unread (review s21: 0.27 ms a call
        # for 40 tools).
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/x", "title": "t"}}}]
        raw = json.dumps({"messages": [{"role": "user", "content": "hi"}], "tools": tools}).replace("$ref", "ref")
        self.assertFalse(parse_chat_request(raw.encode()).references)
        self.assertTrue(parse_chat_request(raw.replace('"ref"', '"\\u0024ref"').encode()).references)
        plain = {"type": "object", "properties": {"a": {"type": "string"}}}
        self.assertIs(gemini.isolate_ref_siblings(plain), plain)


class SchemaDescriptionTests(SynchronousTestCase):
    """
    A C{json_schema} C{response_format}'s C{description} reaches Gemini as
    the schema's top-level C{description} (it was dropped: trial s33).
    """

    def test_given_to_the_schema(self) -> None:
        schema = {"type": "object", "properties": {"a": {"type": "string"}}}
        spec = {"name": "thing", "description": "A thing to extract", "schema": schema}
        config = gemini.generation_config(chat(response_format={"type": "json_schema", "json_schema": spec}))
        self.assertEqual(config["responseJsonSchema"], {**schema, "description": "A thing to extract"})
        self.assertNotIn("description", schema)

    def test_schema_s_own_kept(self) -> None:
        schema = {"type": "object", "description": "Its own"}
        for description in ("Another", "", None):
            spec = {"name": "thing", "description": description, "schema": schema}
            config = gemini.generation_config(chat(response_format={"type": "json_schema", "json_schema": spec}))
            self.assertEqual(config["responseJsonSchema"], schema, description)
        # No description, or an empty one: nothing added.
        for spec in ({"name": "t", "schema": {"type": "object"}}, {"name": "t", "description": "", "schema": {}}):
            config = gemini.generation_config(chat(response_format={"type": "json_schema", "json_schema": spec}))
            self.assertNotIn("description", config.get("responseJsonSchema", {}))


class GatewayTests(DataPlaneTestCase):
    """
    Through the gateway with the openai SDK, against the stand-in Gemini.
    """

    @inlineCallbacks
    def test_schema_description(self):
        """
        Gemini gets C{json_schema.description} in its schema, whole and
        streamed; Kimi gets the format as sent.
        """
        client = self.sdk(self.gateway())
        schema = {"type": "object", "properties": {"a": {"type": "string"}}}
        response_format = {
            "type": "json_schema",
            "json_schema": {"name": "thing", "description": "A thing to extract", "schema": schema},
        }
        for stream in (False, True):
            answer = yield deferToThread(ask, client, QUESTION, stream, response_format=response_format)
            self.assertEqual(json.loads(answer["content"]), {"a": "Hello from the stand-in."})
            self.assertEqual(
                self.upstream.gemini.last_body["generationConfig"]["responseJsonSchema"],
                {**schema, "description": "A thing to extract"},
            )
        yield deferToThread(
            client.chat.completions.create,
            model="kimi/moonshot-v1-8k",
            messages=QUESTION,
            response_format=response_format,
        )
        self.assertEqual(self.upstream.kimi.last_body["response_format"], response_format)

    @inlineCallbacks
    def test_max_tokens_with_null(self):
        client = self.sdk(self.gateway())
        yield deferToThread(
            client.chat.completions.create,
            model="gpt-4o",
            messages=QUESTION,
            max_tokens=42,
            max_completion_tokens=None,
        )
        self.assertIsNone(self.upstream.gemini.last_body.get("max_completion_tokens"))
        self.assertEqual(self.upstream.gemini.last_body["generationConfig"]["maxOutputTokens"], 42)

    @inlineCallbacks
    def test_parallel_tool_calls_false(self):
        self.upstream.gemini.answers[:] = [PARALLEL, PARALLEL, PARALLEL]
        client = self.sdk(self.gateway())
        for stream in (False, True):
            answer = yield deferToThread(ask, client, QUESTION, stream, tools=TOOLS, parallel_tool_calls=False)
            self.assertEqual([c["name"] for c in answer["calls"]], ["get_weather"], stream)
            self.assertEqual(json.loads(answer["calls"][0]["arguments"]), {"city": "Paris"})
            self.assertEqual(answer["indexes"], [0])
            self.assertEqual(answer["finishes"], ["tool_calls"])
        answer = yield deferToThread(ask, client, QUESTION, True, tools=TOOLS)
        self.assertEqual(answer["indexes"], [0, 1, 2])

    @inlineCallbacks
    def test_logprobs(self):
        self.upstream.gemini.answers[:] = [TOKENS, TOKENS]
        client = self.sdk(self.gateway())
        completion = yield deferToThread(
            client.chat.completions.create, model="gpt-4o", messages=QUESTION, logprobs=True, top_logprobs=2
        )
        config = self.upstream.gemini.last_body["generationConfig"]
        self.assertEqual((config["responseLogprobs"], config["logprobs"]), (True, 2))
        content = completion.choices[0].logprobs.content
        self.assertEqual([t.token for t in content], ["Été", " chaud"])
        self.assertEqual(content[0].bytes, list("Été".encode()))
        self.assertEqual([t.logprob for t in content], [0.0, -0.25])
        self.assertEqual([t.token for t in content[1].top_logprobs], [" chaud", "alt1"])

        def streamed() -> list[Any]:
            chunks = client.chat.completions.create(
                model="gpt-4o", messages=QUESTION, logprobs=True, top_logprobs=2, stream=True
            )
            return [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.content or ()]

        tokens = yield deferToThread(streamed)
        self.assertEqual([(t.token, t.bytes) for t in tokens], [(t.token, t.bytes) for t in content])

    @inlineCallbacks
    def test_refused_before_gemini(self):
        client = self.sdk(self.gateway())
        for extra, param in (
            ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "modalities"),
            ({"n": 9}, "n"),
            ({"seed": 2**40}, "seed"),
            ({"max_tokens": 2**31}, "max_tokens"),
            ({"max_completion_tokens": 2**40}, "max_completion_tokens"),
            ({"stop": ["a", "b", "c", "d", "e", "f"]}, "stop"),
            ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
            (
                {"tools": TOOLS, "response_format": {"type": "json_object"}, "model": "gemini/gemini-2.5-flash"},
                "response_format",
            ),
            (
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://a.b/x.html"}}]}
                    ]
                },
                "messages[0].content[0].image_url.url",
            ),
            (image("data:image/gif;base64,R0lG"), "messages[0].content[0].image_url.url"),
            ({"reasoning_effort": "none", "model": "gemini/gemini-2.5-pro"}, "reasoning_effort"),
            ({"web_search_options": {}}, "web_search_options"),
            ({"logit_bias": {"50256": -100}}, "logit_bias"),
            ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
            ({"messages": [{"role": "system", "content": "s"}, *call_turn()], "tools": TOOLS}, "messages[1]"),
        ):
            kwargs = {"model": "gpt-4o", "messages": QUESTION, **extra}
            with self.assertRaises(openai.BadRequestError) as caught:
                yield deferToThread(client.chat.completions.create, **kwargs)
            self.assertEqual(caught.exception.body["param"], param, extra)
        self.assertEqual(self.upstream.gemini.requests, 0)

    @inlineCallbacks
    def test_model_limits_refused_before_gemini(self):
        """
        A penalty on Gemini 2.5 and later, C{n} over 1 on Gemini 3: a 400
        naming the field, whole and streamed, nothing sent; a penalty of 0
        goes (left out).
        """
        client = self.sdk(self.gateway())
        for stream in (False, True):
            for extra, param in (
                ({"presence_penalty": 0.5, "model": "gemini/gemini-2.5-flash"}, "presence_penalty"),
                ({"frequency_penalty": -0.5, "model": "gemini/gemini-3-flash-preview"}, "frequency_penalty"),
                ({"n": 2, "model": "gemini/gemini-3-flash-preview"}, "n"),
            ):
                kwargs = {"model": "gpt-4o", "messages": QUESTION, "stream": stream, **extra}
                with self.assertRaises(openai.BadRequestError) as caught:
                    yield deferToThread(client.chat.completions.create, **kwargs)
                self.assertEqual(caught.exception.body["param"], param, (extra, stream))
        self.assertEqual(self.upstream.gemini.requests, 0)
        answer = yield deferToThread(ask, client, QUESTION, True, presence_penalty=0, frequency_penalty=0.0)
        self.assertEqual(answer["finishes"], ["stop"])
        self.assertNotIn("presencePenalty", self.upstream.gemini.last_body.get("generationConfig", {}))

    @inlineCallbacks
    def test_stand_in_refuses_as_google(self):
        # The stand-in refuses what Google refuses, so no test is passed
        # by a request Google would not take.
        self.upstream.gemini.models.append("gemini-3-flash-preview")
        http, key = self.http(), {"x-goog-api-key": [self.upstream.gemini.key]}
        for model, config, words in (
            ("gemini-2.5-pro", {"presencePenalty": 0.5}, "Penalty is not enabled for models/gemini-2.5-pro"),
            ("gemini-3-flash-preview", {"frequencyPenalty": 1}, "Penalty is not enabled"),
            ("gemini-3-flash-preview", {"candidateCount": 2}, "Multiple candidates is not enabled for this model"),
        ):
            url = f"{self.upstream.base_url('gemini')}/models/{model}:generateContent"
            body = {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}], "generationConfig": config}
            answer = yield http.post(url, json=body, headers=key)
            self.assertEqual(answer.code, 400, model)
            error = json.loads((yield answer.text()))["error"]
            self.assertEqual(error["status"], "INVALID_ARGUMENT")
            self.assertIn(words, error["message"])
        # A penalty of 0 passes, as on Google.
        body["generationConfig"] = {"presencePenalty": 0.0, "candidateCount": 1}
        answer = yield http.post(url, json=body, headers=key)
        self.assertEqual(answer.code, 200)
        yield answer.text()

    @inlineCallbacks
    def test_unfinished_candidate(self):
        unfinished = {"candidates": [{"content": {"parts": [{"text": "Sun"}], "role": "model"}}], "modelVersion": "m"}
        self.upstream.gemini.answers[:] = [GeminiAnswer((), document=unfinished)]
        # Not failed over (a malformed answer would be), to see its message.
        client = self.sdk(self.gateway(fallback="off"))
        with self.assertRaises(openai.APIStatusError) as caught:
            yield deferToThread(client.chat.completions.create, model="x", messages=QUESTION)
        self.assertEqual(caught.exception.status_code, 502)
        self.assertEqual(caught.exception.body["code"], "upstream_malformed")
        self.assertIn("no finishReason", caught.exception.message)

    @inlineCallbacks
    def test_legacy_function_loop(self):
        """
        OpenAI's legacy interface, through the SDK, whole and streamed:
        functions asked, message.function_call answered (finish reason
        function_call), the call sent back as the assistant message with
        its result as a role "function" message, the final answer.
        """
        weather = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
        client = self.sdk(self.gateway())
        for stream in (False, True):
            self.upstream.gemini.answers[:] = [PARALLEL, GeminiAnswer((({"text": "Sunny."},),))]

            def loop(stream: bool = stream) -> tuple[Any, str | None, Any]:
                messages: list[Any] = list(QUESTION)
                call_kwargs = {"model": "gpt-4o", "functions": [weather], "function_call": "auto"}
                if stream:
                    name, arguments, finish = "", "", None
                    for chunk in client.chat.completions.create(messages=messages, stream=True, **call_kwargs):
                        for choice in chunk.choices:
                            assert not choice.delta.tool_calls
                            if choice.delta.function_call is not None:
                                name += choice.delta.function_call.name or ""
                                arguments += choice.delta.function_call.arguments or ""
                            finish = choice.finish_reason or finish
                    call = {"name": name, "arguments": arguments}
                    messages.append({"role": "assistant", "content": None, "function_call": call})
                else:
                    completion = client.chat.completions.create(messages=messages, **call_kwargs)
                    message = completion.choices[0].message
                    assert message.tool_calls is None, message
                    finish = completion.choices[0].finish_reason
                    call = message.function_call.model_dump()
                    # As the SDK dumps it: "tool_calls": null and all.
                    messages.append(message.model_dump())
                messages.append({"role": "function", "name": call["name"], "content": '{"sky": "clear"}'})
                answer = client.chat.completions.create(messages=messages, **call_kwargs)
                return call, finish, answer

            call, finish, answer = yield deferToThread(loop)
            self.assertEqual(call, {"name": "get_weather", "arguments": '{"city":"Paris"}'}, stream)
            self.assertEqual(finish, "function_call")
            self.assertEqual(answer.choices[0].message.content, "Sunny.")
            self.assertEqual(answer.choices[0].finish_reason, "stop")
            contents = self.upstream.gemini.last_body["contents"]
            self.assertEqual([turn["role"] for turn in contents], ["user", "model", "user"])
            self.assertEqual(contents[1]["parts"][0]["functionCall"], {"name": "get_weather", "args": PARIS})
            self.assertEqual(
                contents[2]["parts"], [{"functionResponse": {"name": "get_weather", "response": {"sky": "clear"}}}]
            )

    @inlineCallbacks
    def test_too_large_says_what_to_do(self):
        client = self.sdk(self.gateway(max_request_bytes=4096))
        picture = "data:image/png;base64," + "A" * 8000
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture}}]}]
        with self.assertRaises(openai.APIStatusError) as caught:
            yield deferToThread(client.chat.completions.create, model="gpt-4o", messages=messages)
        self.assertEqual(caught.exception.status_code, 413)
        message = caught.exception.body["message"]
        self.assertIn("https:// URL instead of an inline data: URL", message)
        self.assertIn("MAX_REQUEST_BYTES", message)
