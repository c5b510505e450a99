"""
Gemini's thought signature on an answer's text part (Gemini 3 puts one on
the last part of an answer that calls no function, and Google asks for it
back on that part: U{https://ai.google.dev/gemini-api/docs/thought-signatures}).
It was dropped, whole and streamed (data s30); it now rides in the
message's C{extra_content.google.thought_signature}, where Google's own
OpenAI-compatible endpoint puts it, and goes back to Gemini on the last
text part of the model turn when the agent sends the message back.
"""

from __future__ import annotations

import json
from typing import Any

import openai
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from openclaw.providers.gemini import translate
from openclaw.testing.upstream import GeminiAnswer
from tests.test_dataplane import DataPlaneTestCase

SIGNATURE = "c2lnbmVkLXRleHQ="
QUESTION = [{"role": "user", "content": "Hello?"}]
MODEL = "gemini/gemini-flash-latest"


def candidate(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"role": "model", "parts": list(parts)}, "finishReason": "STOP", "index": 0}


class TranslationTests(SynchronousTestCase):
    def test_whole(self) -> None:
        """
        The last signed text part's signature, in the message's
        C{extra_content}; a thought's, or a call's, is not it; an answer
        without one keeps OpenAI's shape.
        """
        document = {
            "candidates": [
                candidate(
                    {"text": "thinking", "thought": True, "thoughtSignature": "dGhvdWdodA=="},
                    {"text": "Hello", "thoughtSignature": "Zmlyc3Q="},
                    {"text": " there.", "thoughtSignature": SIGNATURE},
                )
            ]
        }
        message = translate.from_gemini(document, "m", "id", 0)["choices"][0]["message"]
        self.assertEqual(message["content"], "Hello there.")
        self.assertEqual(message["extra_content"], {"google": {"thought_signature": SIGNATURE}})
        # A lone signature part, as Gemini may end an answer.
        document = {"candidates": [candidate({"text": "Hi."}, {"thoughtSignature": SIGNATURE})]}
        message = translate.from_gemini(document, "m", "id", 0)["choices"][0]["message"]
        self.assertEqual(message["extra_content"], {"google": {"thought_signature": SIGNATURE}})
        for parts in (
            ({"text": "Hi."},),
            ({"text": "Hi.", "thoughtSignature": ""},),
            ({"text": "Hi."}, {"text": "x", "thought": True, "thoughtSignature": SIGNATURE}),
        ):
            message = translate.from_gemini({"candidates": [candidate(*parts)]}, "m", "id", 0)["choices"][0]["message"]
            self.assertNotIn("extra_content", message, parts)

    def test_streamed(self) -> None:
        """
        Held until the choice's finish, and sent once with it: Gemini 3
        streams it on a last, empty text part, and the openai SDK's stream
        helper would join two signatures into one string.
        """
        stream = translate.GeminiStream("m", "id", 0)
        chunks = [
            stream.chunk({"candidates": [{**candidate({"text": "Hel"}), "finishReason": None}]}),
            stream.chunk(
                {"candidates": [{**candidate({"text": "lo", "thoughtSignature": "Zmlyc3Q="}), "finishReason": None}]}
            ),
            stream.chunk({"candidates": [candidate({"text": "", "thoughtSignature": SIGNATURE})]}),
            *stream.closing(),
        ]
        deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk is not None]
        self.assertEqual(deltas[:2], [{"role": "assistant", "content": "Hel"}, {"content": "lo"}])
        self.assertEqual(deltas[-1], {"extra_content": {"google": {"thought_signature": SIGNATURE}}})
        self.assertEqual(json.dumps(deltas).count("thought_signature"), 1)
        # None without one.
        stream = translate.GeminiStream("m", "id", 0)
        stream.chunk({"candidates": [candidate({"text": "Hi."})]})
        self.assertEqual(stream.closing()[0]["choices"][0]["delta"], {})

    def test_sent_back(self) -> None:
        """
        An assistant message's signature goes on the last text part of its
        model turn; a message with no text sends it on an empty text part
        last, as Gemini 3 may end a call turn (trial s41: it was dropped).
        """
        extra = {"extra_content": {"google": {"thought_signature": SIGNATURE}}}
        for content in ("Hello there.", [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there."}]):
            history = [*QUESTION, {"role": "assistant", "content": content, **extra}, *QUESTION]
            parts = translate.to_gemini({"messages": history})["contents"][1]["parts"]
            self.assertEqual(parts[-1]["thoughtSignature"], SIGNATURE)
            self.assertTrue(all("thoughtSignature" not in part for part in parts[:-1]))
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        history = [
            *QUESTION,
            {"role": "assistant", "content": None, "tool_calls": [call], **extra},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ]
        parts = translate.to_gemini({"messages": history})["contents"][1]["parts"]
        self.assertEqual(
            parts,
            [
                {"functionCall": {"name": "f", "args": {}}, "thoughtSignature": "skip_thought_signature_validator"},
                {"text": "", "thoughtSignature": SIGNATURE},
            ],
        )
        # Thoughts only (no text, no call): the signed part alone.
        for content in (None, "", [{"type": "text", "text": ""}]):
            history = [*QUESTION, {"role": "assistant", "content": content, **extra}, *QUESTION]
            turns = translate.to_gemini({"messages": history})["contents"]
            self.assertEqual(turns[1], {"role": "model", "parts": [{"text": "", "thoughtSignature": SIGNATURE}]})
        # Unsigned, an empty message is no turn.
        history = [*QUESTION, {"role": "assistant", "content": ""}, *QUESTION]
        self.assertEqual([turn["role"] for turn in translate.to_gemini({"messages": history})["contents"]], ["user"])
        # Not a string, or empty: none.
        for value in (5, "", None, {"a": 1}):
            bad = {"extra_content": {"google": {"thought_signature": value}}}
            history = [*QUESTION, {"role": "assistant", "content": "Hi.", **bad}, *QUESTION]
            self.assertEqual(translate.to_gemini({"messages": history})["contents"][1]["parts"], [{"text": "Hi."}])


class AgentTests(DataPlaneTestCase):
    """
    With the openai SDK: the message as the SDK read it, sent back in the
    history, takes the signature back to Gemini on the same part.
    """

    def turn(self, client: openai.OpenAI, stream: bool) -> Any:
        if not stream:
            first = client.chat.completions.create(model=MODEL, messages=QUESTION).choices[0].message
        else:
            with client.chat.completions.stream(model=MODEL, messages=QUESTION) as events:
                for _ in events:
                    pass
                first = events.get_final_completion().choices[0].message
        client.chat.completions.create(model=MODEL, messages=[*QUESTION, first, *QUESTION])
        return first

    @inlineCallbacks
    def test_round_trip(self) -> Any:
        gateway = self.gateway()
        client = self.sdk(gateway)
        for stream in (False, True):
            events = (({"text": "Hello"},), ({"text": " there."},), ({"text": "", "thoughtSignature": SIGNATURE},))
            self.upstream.gemini.answers[:] = [GeminiAnswer(events)]
            message = yield deferToThread(self.turn, client, stream)
            self.assertEqual(message.content, "Hello there.")
            self.assertEqual(message.model_extra["extra_content"], {"google": {"thought_signature": SIGNATURE}})
            turn = self.upstream.gemini.last_body["contents"][1]
            self.assertEqual(
                turn, {"role": "model", "parts": [{"text": "Hello there.", "thoughtSignature": SIGNATURE}]}
            )

    @inlineCallbacks
    def test_call_turn_round_trip(self) -> Any:
        """
        Trial s41: a call turn Gemini ends with a signed empty text part
        (the call itself unsigned), whole and streamed: the message as the
        openai SDK read it, sent back with the tool's result, takes the
        signature back on that part.
        """
        gateway = self.gateway()
        client = self.sdk(gateway)
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]

        def loop(stream: bool) -> Any:
            asked = {"model": MODEL, "messages": QUESTION, "tools": tools}
            if not stream:
                first = client.chat.completions.create(**asked).choices[0].message
            else:
                with client.chat.completions.stream(**asked) as events:
                    for _ in events:
                        pass
                    first = events.get_final_completion().choices[0].message
            assert first.tool_calls
            result = {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "ok"}
            client.chat.completions.create(model=MODEL, messages=[*QUESTION, first.model_dump(), result], tools=tools)
            return first

        call = {"functionCall": {"name": "f", "args": {"a": "1"}, "id": "q1"}}
        for stream, text in (
            (False, ()),
            (True, ()),
            (False, ({"text": "Checking."},)),
            (True, ({"text": "Checking."},)),
        ):
            # Text before the call too (agent trial s42: the signature
            # moved onto it, the empty part dropped).
            events = (*((part,) for part in text), (call,), ({"text": "", "thoughtSignature": SIGNATURE},))
            self.upstream.gemini.answers[:] = [GeminiAnswer(events, finish_reason="STOP")]
            yield deferToThread(loop, stream)
            turn = self.upstream.gemini.last_body["contents"][1]
            self.assertEqual(turn["role"], "model")
            self.assertEqual(turn["parts"][-1], {"text": "", "thoughtSignature": SIGNATURE}, stream)
            if text:
                self.assertEqual(turn["parts"][0], {"text": "Checking."})
            self.assertEqual(turn["parts"][len(text)]["functionCall"]["id"], "q1")

    @inlineCallbacks
    def test_not_sent_to_kimi(self) -> Any:
        """
        The same history sent to Kimi (after a switch_provider, or failed
        over): without Google's extra_content, on the message or on a tool
        call (a field Moonshot's API does not know, and a signature no use
        to its model: review s30); anything else in it kept.
        """
        gateway = self.gateway()
        client = self.sdk(gateway)
        self.upstream.gemini.answers[:] = [GeminiAnswer((({"text": "Hi.", "thoughtSignature": SIGNATURE},),))]
        first = yield deferToThread(
            lambda: client.chat.completions.create(model=MODEL, messages=QUESTION).choices[0].message
        )
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": "f", "arguments": "{}"},
            "extra_content": {"google": {"thought_signature": SIGNATURE}, "other": 1},
        }
        history = [
            *QUESTION,
            first,
            *QUESTION,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
        ]
        yield deferToThread(client.chat.completions.create, model="kimi/moonshot-v1-8k", messages=history)
        sent = self.upstream.kimi.last_body["messages"]
        self.assertEqual((sent[1]["content"], "extra_content" in sent[1]), ("Hi.", False))
        self.assertEqual(
            sent[3]["tool_calls"],
            [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "f", "arguments": "{}"},
                    "extra_content": {"other": 1},
                }
            ],
        )


class RepeatedCallTests(SynchronousTestCase):
    """
    A function call Gemini sends again with the same C{id} (a Gemini 3
    stream repeating a call without its signature: agent trial s43,
    allenhutchison/obsidian-gemini #230) is one call, not two an agent
    would run twice; calls without an id, with ids of their own, or
    another call reusing an id, stay.
    """

    def setUp(self) -> None:
        self.CALL = {"name": "search_files", "args": {"q": "x"}, "id": "fc-9"}

    def test_streamed(self) -> None:
        stream = translate.GeminiStream("m", "id", 0)
        chunks = [
            stream.chunk(
                {
                    "candidates": [
                        {
                            **candidate({"functionCall": self.CALL, "thoughtSignature": "U0lHMQ=="}),
                            "finishReason": None,
                        }
                    ]
                }
            ),
            stream.chunk(
                {"candidates": [candidate({"functionCall": self.CALL}, {"functionCall": {**self.CALL, "id": "fc-10"}})]}
            ),
        ]
        calls = [call for chunk in chunks if chunk for call in chunk["choices"][0]["delta"].get("tool_calls", ())]
        self.assertEqual([call["index"] for call in calls], [0, 1])
        self.assertEqual(len({call["id"] for call in calls}), 2)

    def test_whole(self) -> None:
        document = {
            "candidates": [
                candidate(
                    {"functionCall": self.CALL, "thoughtSignature": "U0lHMQ=="},
                    {"functionCall": self.CALL},
                    {"functionCall": {"name": "search_files", "args": {"q": "y"}}},
                    {"functionCall": {"name": "search_files", "args": {"q": "y"}}},
                    # Another call reusing the id: kept (recheck s44: dropped),
                    # and once only when it is sent again (recheck s44: twice).
                    {"functionCall": {**self.CALL, "args": {"q": "z"}}},
                    {"functionCall": {**self.CALL, "args": {"q": "z"}}},
                )
            ]
        }
        calls = translate.from_gemini(document, "m", "id", 0)["choices"][0]["message"]["tool_calls"]
        self.assertEqual([json.loads(call["function"]["arguments"])["q"] for call in calls], ["x", "y", "y", "z"])
        self.assertEqual(len({call["id"] for call in calls}), 4)
