"""
The data plane's checks of a chat request, answered 400 naming the field
the client sent before any provider sees the call: fields a message's role
cannot carry (C{tool_calls}, C{tool_call_id}, C{function_call}; null is
not set), C{stream_options} without C{stream}, a legacy C{function_call}
refused under its own name, content parts without a type.
"""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any

import openai
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from tests.test_dataplane import ANSWER_A, CALL_A, HELLO, DataPlaneTestCase


class RoleFieldTests(DataPlaneTestCase):
    """
    OpenAI's message shapes: only assistant messages carry C{tool_calls}
    (and the legacy C{function_call}), only tool messages C{tool_call_id}.
    On any other role the field is refused with a 400 naming it, before any
    provider sees the call (a provider's refusal would count against its
    breaker for every client).
    """

    @inlineCallbacks
    def assertRefused(self, gateway: Any, messages: list[Any], param: str) -> Any:
        for model in ("kimi/moonshot-v1-8k", "gemini/gemini-flash-latest"):
            body = {"model": model, "messages": messages}
            response, text = yield self.post(gateway, body)
            self.assertEqual(response.code, 400, (body, text))
            error = self.assertOpenAIError(text)
            self.assertEqual(error["type"], "invalid_request_error")
            self.assertEqual(error["param"], param, body)
            self.assertIn("remove it", error["message"])
        self.assertEqual(self.upstream.gemini.requests + self.upstream.kimi.requests, 0)

    @inlineCallbacks
    def test_tool_calls_on_other_roles(self):
        gateway = self.gateway()
        for value in (True, -1, 1.5, [], CALL_A["tool_calls"], "x", {}):
            for role in ("user", "system", "developer"):
                yield self.assertRefused(
                    gateway, [*HELLO, {"role": role, "content": "hi", "tool_calls": value}], "messages[1].tool_calls"
                )
            yield self.assertRefused(
                gateway, [*HELLO, CALL_A, {**ANSWER_A, "tool_calls": value}], "messages[2].tool_calls"
            )

    @inlineCallbacks
    def test_tool_call_id_and_function_call(self):
        gateway = self.gateway()
        for role in ("user", "system", "developer"):
            yield self.assertRefused(
                gateway, [{"role": role, "content": "hi", "tool_call_id": "a"}], "messages[0].tool_call_id"
            )
            yield self.assertRefused(
                gateway,
                [{"role": role, "content": "hi", "function_call": {"name": "f", "arguments": "{}"}}],
                "messages[0].function_call",
            )
        yield self.assertRefused(
            gateway, [*HELLO, {**CALL_A, "tool_call_id": "a"}, ANSWER_A], "messages[1].tool_call_id"
        )
        yield self.assertRefused(
            gateway, [*HELLO, CALL_A, {**ANSWER_A, "function_call": 1}], "messages[2].function_call"
        )
        # Both tool_calls and the legacy function_call on one assistant message.
        both = {**CALL_A, "function_call": {"name": "f", "arguments": "{}"}}
        for model in ("kimi/moonshot-v1-8k", "gemini/gemini-flash-latest"):
            response, text = yield self.post(gateway, {"model": model, "messages": [*HELLO, both, ANSWER_A]})
            self.assertEqual(response.code, 400, text)
            self.assertEqual(self.assertOpenAIError(text)["param"], "messages[1].function_call")

    @inlineCallbacks
    def test_null_is_not_set(self):
        """
        A null field (as SDKs that dump every field send it) is accepted
        and not forwarded.
        """
        gateway = self.gateway()
        message = {"role": "user", "content": "hi", "tool_calls": None, "tool_call_id": None, "function_call": None}
        response, text = yield self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": [message]})
        self.assertEqual(response.code, 200, text)
        self.assertEqual(self.upstream.kimi.last_body["messages"], [{"role": "user", "content": "hi"}])


class StreamOptionsTests(DataPlaneTestCase):
    @inlineCallbacks
    def test_only_with_stream(self):
        """
        As OpenAI answers: C{stream_options} (unless null) needs
        C{"stream": true}.
        """
        gateway = self.gateway()
        for extra in ({}, {"stream": False}, {"stream": None}):
            for options in ({"include_usage": True}, {}, "x"):
                body = {"model": "kimi/moonshot-v1-8k", "messages": HELLO, "stream_options": options, **extra}
                response, text = yield self.post(gateway, body)
                self.assertEqual(response.code, 400, (body, text))
                error = self.assertOpenAIError(text)
                self.assertEqual(error["param"], "stream_options")
                self.assertEqual(
                    error["message"], "The 'stream_options' parameter is only allowed when 'stream' is enabled."
                )
        self.assertEqual(self.upstream.kimi.requests, 0)
        body = {"model": "kimi/moonshot-v1-8k", "messages": HELLO, "stream_options": None}
        response, text = yield self.post(gateway, body)
        self.assertEqual(response.code, 200, text)
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        response, text = yield self.post(gateway, body)
        self.assertEqual(response.code, 200, text)
        self.assertIn('"usage"', text)


class ErrorNamingTests(DataPlaneTestCase):
    """
    A 400 names the field the client sent.
    """

    @inlineCallbacks
    def test_legacy_function_call(self):
        gateway = self.gateway()
        functions = [{"name": "f", "parameters": {"type": "object"}}]
        body = {"messages": HELLO, "functions": functions, "function_call": {"name": "g"}}
        response, text = yield self.post(gateway, body)
        self.assertEqual(response.code, 400, text)
        error = self.assertOpenAIError(text)
        self.assertEqual(error["param"], "function_call.name")
        self.assertIn("function_call names the function 'g'", error["message"])
        self.assertNotIn("tool_choice", error["message"])
        response, text = yield self.post(gateway, {**body, "function_call": {"arguments": "{}"}})
        self.assertEqual(response.code, 400, text)
        self.assertEqual(self.assertOpenAIError(text)["param"], "function_call")
        # The legacy call of a declared function still works.
        response, text = yield self.post(gateway, {**body, "function_call": {"name": "f"}})
        self.assertEqual(response.code, 200, text)

    @inlineCallbacks
    def test_legacy_function_call_in_history(self):
        """
        A legacy function_call in an assistant message is refused under
        the name the client sent (messages[i].function_call...), not its
        rewrite as tool_calls.
        """
        gateway = self.gateway()
        call = {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "get_w", "arguments": ["not", "a string"]},
        }
        body = {"messages": [HELLO[0], call, {"role": "function", "name": "get_w", "content": "{}"}]}
        response, text = yield self.post(gateway, body)
        self.assertEqual(response.code, 400, text)
        error = self.assertOpenAIError(text)
        self.assertEqual(error["param"], "messages[1].function_call.arguments")
        self.assertNotIn("tool_calls", error["message"])

    @inlineCallbacks
    def test_content_part_without_type(self):
        gateway = self.gateway()
        for part, expected in (
            ({"text": "hi"}, "messages[0].content[0] has no type"),
            ({"type": ["text"], "text": "hi"}, "messages[0].content[0].type must be one of"),
            ("hi", "messages[0].content[0] must be a content part"),
        ):
            body = {"messages": [{"role": "user", "content": [part]}]}
            response, text = yield self.post(gateway, body)
            self.assertEqual(response.code, 400, (part, text))
            error = self.assertOpenAIError(text)
            self.assertIn(expected, error["message"])
            self.assertNotIn("None", error["message"])


class RefusalTests(DataPlaneTestCase):
    """
    OpenAI's assistant message may carry a C{refusal} and a null
    C{content}: taken on both providers, Kimi getting it as sent, Gemini
    the refusal as the model turn's text.
    """

    @inlineCallbacks
    def test_refusal_in_history(self):
        gateway = self.gateway()
        sdk = self.sdk(gateway)
        refusal = {"role": "assistant", "content": None, "refusal": "I can't"}
        messages = [HELLO[0], refusal, {"role": "user", "content": "Then say hello."}]
        for model in ("kimi/moonshot-v1-8k", "gemini/gemini-flash-latest"):
            yield deferToThread(sdk.chat.completions.create, model=model, messages=messages)
        # Its refusal as its text: Moonshot refuses an empty assistant message.
        self.assertEqual(self.upstream.kimi.last_body["messages"][1], {**refusal, "content": "I can't"})
        self.assertEqual(
            self.upstream.gemini.last_body["contents"][1], {"role": "model", "parts": [{"text": "I can't"}]}
        )
        # Left out, content is null as well.
        response, text = yield self.post(
            gateway,
            {"model": "gemini/gemini-flash-latest", "messages": [HELLO[0], {"role": "assistant", "refusal": "No."}]},
        )
        self.assertEqual(response.code, 200, text)
        self.assertEqual(self.upstream.gemini.last_body["contents"][1]["parts"], [{"text": "No."}])

    @inlineCallbacks
    def test_refusal_part_in_history(self):
        """
        OpenAI's refusal content part goes to Kimi as a text part (Moonshot
        takes text, image_url and video_url parts only), as Gemini gets it
        as text (agent trial s46: sent to Kimi as it came).
        """
        gateway = self.gateway()
        sdk = self.sdk(gateway)
        refusal = {
            "role": "assistant",
            "content": [{"type": "text", "text": ""}, {"type": "refusal", "refusal": "No."}],
        }
        messages = [HELLO[0], refusal, {"role": "user", "content": "Then say hello."}]
        for model in ("kimi/moonshot-v1-8k", "gemini/gemini-flash-latest"):
            yield deferToThread(sdk.chat.completions.create, model=model, messages=messages)
        # The empty text part left out too.
        self.assertEqual(
            self.upstream.kimi.last_body["messages"][1],
            {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
        )
        self.assertEqual(self.upstream.gemini.last_body["contents"][1], {"role": "model", "parts": [{"text": "No."}]})
        # The caller's other messages as they were.
        self.assertEqual(self.upstream.kimi.last_body["messages"][2], messages[2])

    @inlineCallbacks
    def test_media_part_in_a_text_only_message(self):
        """
        An image in a tool (or system) message is told to go in a user
        message after it (agent trial s46: "must be one of text here").
        """
        gateway = self.gateway()
        image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
        call = {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{}"}}
        body = {
            "model": "kimi/moonshot-v1-8k",
            "messages": [
                HELLO[0],
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "see"}, image]},
            ],
        }
        response, text = yield self.post(gateway, body)
        self.assertEqual(response.code, 400, text)
        error = self.assertOpenAIError(text)
        self.assertEqual(error["param"], "messages[2].content[1].type")
        self.assertIn(
            "is 'image_url', but a tool message holds text parts only in OpenAI's format: send the image_url part "
            "in a user message after it",
            error["message"],
        )
        response, text = yield self.post(gateway, {"messages": [{"role": "system", "content": [image]}, HELLO[0]]})
        self.assertIn("but a system message holds text parts only", self.assertOpenAIError(text)["message"])

    @inlineCallbacks
    def test_still_checked(self):
        gateway = self.gateway()
        for message, param in (
            ({"role": "assistant", "content": None, "refusal": 1}, "messages[1].refusal"),
            ({"role": "assistant", "content": None, "refusal": ["no"]}, "messages[1].refusal"),
            ({"role": "assistant", "content": None}, "messages[1].content"),
            ({"role": "assistant", "content": None, "refusal": None}, "messages[1].content"),
        ):
            for model in ("kimi/moonshot-v1-8k", "gemini/gemini-flash-latest"):
                response, text = yield self.post(gateway, {"model": model, "messages": [HELLO[0], message]})
                self.assertEqual(response.code, 400, (message, text))
                self.assertEqual(self.assertOpenAIError(text)["param"], param, message)
        self.assertEqual(self.upstream.gemini.requests + self.upstream.kimi.requests, 0)


class LogprobsTests(DataPlaneTestCase):
    @inlineCallbacks
    def test_top_logprobs_needs_logprobs(self):
        """
        OpenAI's rule, applied before a provider is chosen: a call that
        Kimi took and Gemini refused is refused on both.
        """
        gateway = self.gateway()
        sdk = self.sdk(gateway)
        for model in ("kimi/moonshot-v1-8k", "gemini/gemini-flash-latest"):
            for logprobs in (None, False):
                fields = {"top_logprobs": 3} if logprobs is None else {"top_logprobs": 3, "logprobs": logprobs}
                with self.assertRaises(openai.BadRequestError) as caught:
                    yield deferToThread(sdk.chat.completions.create, model=model, messages=HELLO, **fields)
                self.assertEqual(caught.exception.param, "top_logprobs")
                self.assertIn("needs logprobs: true", caught.exception.message)
        self.assertEqual(self.upstream.gemini.requests + self.upstream.kimi.requests, 0)
        yield deferToThread(
            sdk.chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO, logprobs=True, top_logprobs=3
        )
        self.assertEqual(self.upstream.kimi.last_body["top_logprobs"], 3)


#: Integer field -> (lowest, highest, the message's end), as the gateway
#: checks them.
INTEGER_RANGES = MappingProxyType(
    {
        "seed": (-(2**63), 2**63 - 1, " (OpenAI's range: a 64-bit integer)"),
        "max_tokens": (1, 2**63 - 1, " (the most a 64-bit integer holds)"),
        "max_completion_tokens": (1, 2**63 - 1, " (the most a 64-bit integer holds)"),
        "n": (1, 2**63 - 1, " (the most a 64-bit integer holds)"),
        "top_logprobs": (0, 20, " (OpenAI's range)"),
    }
)


class IntegerFieldTests(DataPlaneTestCase):
    """
    Each integer field's 400 states the range it takes, whatever is wrong
    with the value: also for a whole number outside it, which orjson reads
    as a float once past 64 bits (the message must not say it is not a
    whole number).
    """

    @inlineCallbacks
    def test_out_of_range(self):
        gateway = self.gateway()
        for name, (low, high, why) in INTEGER_RANGES.items():
            expected = f"{name} must be a whole number from {low} to {high}{why}"
            # Just past each bound, 2**70 and 10**30 (past what orjson reads
            # as an int), 1e30 (bytes: as written); and values that are no
            # whole number at all.
            for value in (low - 1, high + 1, 2**70, -(2**70), 10**30, b"1e30", 1.5, "2", True):
                raw = value.decode() if isinstance(value, bytes) else json.dumps(value)
                for model in ("kimi/moonshot-v1-8k", "gemini/gemini-flash-latest"):
                    body = f'{{"model": "{model}", "messages": {json.dumps(HELLO)}, "logprobs": true, "{name}": {raw}}}'
                    response, text = yield self.post(gateway, body.encode())
                    self.assertEqual(response.code, 400, (name, value, text))
                    error = self.assertOpenAIError(text)
                    self.assertEqual((error["param"], error["message"]), (name, expected), (name, value))
        self.assertEqual(self.upstream.gemini.requests + self.upstream.kimi.requests, 0)

    @inlineCallbacks
    def test_written_as_float(self):
        """
        A whole number in range written with a decimal point or exponent is
        refused with the integer to send.
        """
        gateway = self.gateway()
        for raw, integer in ((b"5.0", 5), (b"5e0", 5), (b"1E1", 10)):
            for name, (low, high, why) in INTEGER_RANGES.items():
                body = b'{"model": "kimi/moonshot-v1-8k", "messages": %s, "logprobs": true, "%s": %s}' % (
                    json.dumps(HELLO).encode(),
                    name.encode(),
                    raw,
                )
                response, text = yield self.post(gateway, body)
                self.assertEqual(response.code, 400, (name, raw, text))
                error = self.assertOpenAIError(text)
                self.assertEqual(error["param"], name)
                self.assertEqual(
                    error["message"],
                    f"{name} must be a whole number from {low} to {high}{why}, written without a decimal point "
                    f"or exponent ({integer}, not {float(integer)!r})",
                )
        self.assertEqual(self.upstream.kimi.requests, 0)

    @inlineCallbacks
    def test_in_range(self):
        """
        The bounds themselves pass, and reach the provider as sent.
        """
        gateway = self.gateway()
        for name, (low, high, _) in INTEGER_RANGES.items():
            for value in (low, high):
                body = {"model": "kimi/moonshot-v1-8k", "messages": HELLO, "logprobs": True, name: value}
                response, text = yield self.post(gateway, body)
                self.assertEqual(response.code, 200, (name, value, text))
                self.assertEqual(self.upstream.kimi.last_body[name], value)


class OpenAIFieldTypeTests(DataPlaneTestCase):
    """
    OpenAI's fields that the gateway passes on (to Kimi) or drops (for
    Gemini) are of OpenAI's types, as its API reference has them: a
    malformed one is the same 400 naming it on either provider, before
    either sees the call (OpenAI answers 400; Kimi took them, Gemini
    dropped them, both answering 200: trial s29).  Null is not set.
    """

    @inlineCallbacks
    def test_refused(self):
        gateway = self.gateway()
        for name, value, words in (
            ("metadata", "x", "metadata must be an object of at most 16 keys"),
            ("metadata", ["a"], "metadata must be an object"),
            ("metadata", {f"k{i}": "v" for i in range(17)}, "it has 17 keys"),
            ("metadata", {"k" * 65: "v"}, "characters; shorten it"),
            ("metadata", {"job": 42}, "the value of 'job' is not a string"),
            ("metadata", {"job": "x" * 513}, "the value of 'job' has 513 characters"),
            ("service_tier", 5, "service_tier must be a string"),
            ("user", 7, "user must be a string"),
            ("user", {"id": "u"}, "user must be a string"),
            ("store", "yes", "store must be true or false"),
            ("prediction", 5, "prediction must be an object"),
            ("prediction", "text", "prediction must be an object"),
            ("web_search_options", True, "web_search_options must be an object"),
            ("logit_bias", [1], "logit_bias must be an object mapping token ids"),
            ("logit_bias", {"50256": 101}, "must be a number from -100 to 100"),
            ("logit_bias", {"50256": "x"}, "must be a number from -100 to 100"),
            ("logit_bias", {"50256": True}, "must be a number from -100 to 100"),
        ):
            for model in ("kimi/moonshot-v1-8k", "gemini/gemini-flash-latest"):
                body = {"model": model, "messages": HELLO, name: value}
                response, text = yield self.post(gateway, body)
                self.assertEqual(response.code, 400, (name, value, text))
                error = self.assertOpenAIError(text)
                self.assertEqual(error["param"], name, (name, value))
                self.assertIn(words, error["message"])
        self.assertEqual(self.upstream.gemini.requests + self.upstream.kimi.requests, 0)

    @inlineCallbacks
    def test_taken(self):
        """
        OpenAI's shapes (and null, at the limits) pass; Kimi gets them as
        sent.
        """
        gateway = self.gateway()
        fields = {
            "metadata": {**{f"k{i}": "v" for i in range(15)}, "k" * 64: "x" * 512},
            "service_tier": "auto",
            "user": "user-1",
            "store": False,
            "prediction": {"type": "content", "content": "Hello."},
            "logit_bias": {"50256": -100, "1": 100, "2": 0.5},
        }
        for sent in (fields, dict.fromkeys(fields)):
            response, text = yield self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO, **sent})
            self.assertEqual(response.code, 200, text)
            self.assertEqual({name: self.upstream.kimi.last_body[name] for name in sent}, sent)
        response, text = yield self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO, "metadata": {}})
        self.assertEqual(response.code, 200, text)

    @inlineCallbacks
    def test_logit_bias_keys(self):
        """
        C{logit_bias}'s keys are token ids (OpenAI's API reference): whole
        numbers in decimal digits, from 0 to 2**31 - 1.  Any other key is a
        400 naming logit_bias and the key, clipped and escaped (Kimi was
        passed "hello", "-1" and a 5000-digit key: re-attack s29); on
        either provider, before either sees the call.
        """
        gateway = self.gateway()
        for key, shown in (
            ("hello", "'hello'"),
            ("", "''"),
            ("-1", "'-1'"),
            ("+1", "'+1'"),
            (" 1", "' 1'"),
            ("1.0", "'1.0'"),
            ("\u00b2", "'\u00b2'"),
            ("\u0661", "'\u0661'"),
            ("2147483648", "'2147483648'"),
            ("9" * 5000, "'" + "9" * 63 + "…'"),
            ("1\n2\x00\x1b[31m", "'1\\n2\\x00\\x1b[31m'"),
        ):
            for model in ("kimi/moonshot-v1-8k", "gemini/gemini-flash-latest"):
                body = {"model": model, "messages": HELLO, "logit_bias": {"50256": -100, key: 1}}
                response, text = yield self.post(gateway, body)
                self.assertEqual(response.code, 400, (key[:20], text))
                error = self.assertOpenAIError(text)
                self.assertEqual(error["param"], "logit_bias")
                self.assertIn(
                    f"logit_bias: the key {shown} is not a token id; its keys are token ids", error["message"]
                )
                self.assertIn("from 0 to 2147483647 written in decimal digits", error["message"])
                self.assertLess(len(error["message"]), 300)
        self.assertEqual(self.upstream.gemini.requests + self.upstream.kimi.requests, 0)
        bias = {"0": 1, "7": -1, "2147483647": 0.5}
        response, text = yield self.post(
            gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO, "logit_bias": bias}
        )
        self.assertEqual(response.code, 200, text)
        self.assertEqual(self.upstream.kimi.last_body["logit_bias"], bias)

    @inlineCallbacks
    def test_logit_bias_leading_zeros(self):
        """
        A C{logit_bias} key with leading zeros ("007") names the token "7"
        names, so a map could hold both with two biases: a 400 naming
        logit_bias, the key, and how to write it, on either provider,
        before either sees the call (both were passed on: data s30).  "0"
        itself is a token id.
        """
        gateway = self.gateway()
        for key, written in (("007", "'7'"), ("00", "'0'"), ("0" * 12 + "1", "'1'")):
            for model in ("kimi/moonshot-v1-8k", "gemini/gemini-flash-latest"):
                body = {"model": model, "messages": HELLO, "logit_bias": {"7": -100, key: 0}}
                response, text = yield self.post(gateway, body)
                self.assertEqual(response.code, 400, (key, text))
                error = self.assertOpenAIError(text)
                self.assertEqual(error["param"], "logit_bias")
                self.assertIn(f"the key {key!r} is a token id written with leading zeros", error["message"])
                self.assertIn(f"write it as {written}", error["message"])
        # Padded past the largest token id: not told a key it would refuse
        # next (review s30).
        for key in ("0" + "9" * 11, "0" * 3 + "9" * 40):
            body = {"model": "kimi/moonshot-v1-8k", "messages": HELLO, "logit_bias": {key: 0}}
            response, text = yield self.post(gateway, body)
            self.assertEqual(response.code, 400, (key, text))
            self.assertIn("is not a token id", self.assertOpenAIError(text)["message"])
        self.assertEqual(self.upstream.gemini.requests + self.upstream.kimi.requests, 0)
        response, text = yield self.post(
            gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO, "logit_bias": {"0": 0, "10": 0}}
        )
        self.assertEqual(response.code, 200, text)


#: OpenAI's C{moderation}, as the openai SDK's C{Moderation} types it.
MODERATION = {"model": "omni-moderation-latest", "policy": {"input": {"mode": "block"}, "output": {"mode": "block"}}}


class ModerationTests(DataPlaneTestCase):
    """
    OpenAI's C{moderation} (its block mode changes the answer): of OpenAI's
    shape on either provider, a 400 naming the field before either sees
    the call (C{"on"} was taken); Kimi gets it as sent; Gemini, which runs
    no moderation, refuses it with a 400 saying what to do, as README's
    rule has it for the fields that would change what the answer is (it
    was dropped: trial s33).
    """

    @inlineCallbacks
    def test_shape(self):
        gateway = self.gateway()
        for value, param, words in (
            ("on", "moderation", "moderation must be an object"),
            (True, "moderation", "moderation must be an object"),
            ({}, "moderation.model", "moderation.model must be the moderation model's name"),
            ({"model": 1}, "moderation.model", "a string"),
            ({"model": "m", "policy": "block"}, "moderation.policy", "moderation.policy must be an object"),
            ({"model": "m", "policy": {"input": "block"}}, "moderation.policy.input", '"score" or "block"'),
            ({"model": "m", "policy": {"output": {"mode": "warn"}}}, "moderation.policy.output", "whose mode is"),
            ({"model": "m", "policy": {"input": {}}}, "moderation.policy.input", "whose mode is"),
        ):
            for model in ("kimi/moonshot-v1-8k", "gemini/gemini-flash-latest"):
                response, text = yield self.post(gateway, {"model": model, "messages": HELLO, "moderation": value})
                self.assertEqual(response.code, 400, (value, text))
                error = self.assertOpenAIError(text)
                self.assertEqual(error["param"], param, value)
                self.assertIn(words, error["message"])
        self.assertEqual(self.upstream.gemini.requests + self.upstream.kimi.requests, 0)

    @inlineCallbacks
    def test_kimi_gets_it_gemini_refuses_it(self):
        gateway = self.gateway()
        sdk = self.sdk(gateway)
        for stream in (False, True):
            for sent in (MODERATION, {"model": "omni-moderation-latest"}, {**MODERATION, "policy": None}):
                answer = yield deferToThread(
                    sdk.chat.completions.create,
                    model="kimi/moonshot-v1-8k",
                    messages=HELLO,
                    moderation=sent,
                    stream=stream,
                )
                if stream:
                    yield deferToThread(list, answer)
                self.assertEqual(self.upstream.kimi.last_body["moderation"], sent)
            with self.assertRaises(openai.BadRequestError) as caught:
                yield deferToThread(
                    sdk.chat.completions.create,
                    model="gemini/gemini-flash-latest",
                    messages=HELLO,
                    moderation=MODERATION,
                    stream=stream,
                )
            self.assertEqual(caught.exception.param, "moderation")
            self.assertIn("which Gemini does not run", caught.exception.message)
            self.assertIn("remove moderation", caught.exception.message)
        self.assertEqual(self.upstream.gemini.requests, 0)
        # Null is not set: Gemini answers.
        response, text = yield self.post(
            gateway, {"model": "gemini/gemini-flash-latest", "messages": HELLO, "moderation": None}
        )
        self.assertEqual(response.code, 200, text)


class AudioAnswerTests(DataPlaneTestCase):
    """
    An assistant message that refers to an earlier audio answer
    (OpenAI's C{"audio": {"id": ...}} with a null content, as the openai
    SDK writes an audio answer back): a 400 naming C{audio} saying it
    cannot be sent back through the gateway and what to do, on either
    provider, before either sees the call (it was "messages[1].content is
    required": trial s33).
    """

    @inlineCallbacks
    def test_refused_saying_what_to_do(self):
        gateway = self.gateway()
        sdk = self.sdk(gateway)
        for message in (
            {"role": "assistant", "content": None, "audio": {"id": "audio_abc"}},
            {"role": "assistant", "audio": {"id": "audio_abc"}},
        ):
            messages = [HELLO[0], message, {"role": "user", "content": "And?"}]
            for model in ("kimi/moonshot-v1-8k", "gemini/gemini-flash-latest"):
                with self.assertRaises(openai.BadRequestError) as caught:
                    yield deferToThread(sdk.chat.completions.create, model=model, messages=messages)
                self.assertEqual(caught.exception.param, "messages[1].audio")
                self.assertIn("earlier audio answer", caught.exception.message)
                self.assertIn("neither of its providers answers with audio", caught.exception.message)
                self.assertIn("transcript", caught.exception.message)
        self.assertEqual(self.upstream.gemini.requests + self.upstream.kimi.requests, 0)
        # With its transcript as content, it goes; null audio is not set.
        for audio in ({"id": "audio_abc"}, None):
            message = {"role": "assistant", "content": "Hello.", "audio": audio}
            yield deferToThread(
                sdk.chat.completions.create,
                model="gemini/gemini-flash-latest",
                messages=[HELLO[0], message, {"role": "user", "content": "And?"}],
            )
            self.assertEqual(self.upstream.gemini.last_body["contents"][1]["parts"], [{"text": "Hello."}])
        # Null content and null audio: content is required, as before.
        response, text = yield self.post(
            gateway,
            {
                "model": "kimi/moonshot-v1-8k",
                "messages": [HELLO[0], {"role": "assistant", "content": None, "audio": None}],
            },
        )
        self.assertEqual(response.code, 400, text)
        self.assertEqual(self.assertOpenAIError(text)["param"], "messages[1].content")


class ModalitiesAndVerbosityTests(DataPlaneTestCase):
    """
    C{modalities} lists OpenAI's output types (text, audio), C{verbosity}
    is one of low, medium, high: another value is a 400 naming the field
    and the values it takes, on either provider, before either sees the
    call (both were answered 200: trial s33).  Null is not set.
    """

    @inlineCallbacks
    def test_refused(self):
        gateway = self.gateway()
        for name, value, words in (
            ("modalities", ["image"], "each one of text, audio"),
            ("modalities", ["text", "video"], "each one of text, audio"),
            ("modalities", "text", "modalities must be a list"),
            ("modalities", [1], "each one of text, audio"),
            ("verbosity", "extreme", "verbosity must be one of low, medium, high"),
            ("verbosity", "LOW", "verbosity must be one of low, medium, high"),
            ("verbosity", 2, "verbosity must be one of low, medium, high"),
        ):
            for model in ("kimi/moonshot-v1-8k", "gemini/gemini-flash-latest"):
                response, text = yield self.post(gateway, {"model": model, "messages": HELLO, name: value})
                self.assertEqual(response.code, 400, (name, value, text))
                error = self.assertOpenAIError(text)
                self.assertEqual(error["param"], name, (name, value))
                self.assertIn(words, error["message"])
        self.assertEqual(self.upstream.gemini.requests + self.upstream.kimi.requests, 0)

    @inlineCallbacks
    def test_taken(self):
        sdk = self.sdk(self.gateway())
        for fields in (
            {"modalities": ["text"], "verbosity": "low"},
            {"modalities": ["text", "audio"], "verbosity": "high"},
            {"modalities": None, "verbosity": None},
        ):
            yield deferToThread(sdk.chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO, **fields)
            self.assertEqual({name: self.upstream.kimi.last_body[name] for name in fields}, fields)
        yield deferToThread(
            sdk.chat.completions.create,
            model="gemini/gemini-flash-latest",
            messages=HELLO,
            modalities=["text"],
            verbosity="medium",
        )


class OpenAICodeTests(DataPlaneTestCase):
    """
    The gateway's own 400s carry OpenAI's code where one fits, as OpenAI's
    API answers the same mistakes (C{invalid_type}, C{invalid_value},
    C{decimal_above_max_value}, ...), so that a client reading
    C{error.code} reads the gateway as it reads OpenAI; before, every one
    of them had C{code: null}.  The official openai SDK.
    """

    @inlineCallbacks
    def test_codes(self):
        gateway = self.gateway()
        client = self.sdk(gateway)
        cases = (
            ({"temperature": 3}, "temperature", "decimal_above_max_value"),
            ({"temperature": -1}, "temperature", "decimal_below_min_value"),
            ({"temperature": "hot"}, "temperature", "invalid_type"),
            ({"n": 0}, "n", "integer_below_min_value"),
            ({"n": 2.0}, "n", "invalid_type"),
            ({"max_tokens": 1.5}, "max_tokens", "invalid_type"),
            # Past 64 bits (orjson reads it as a float): written whole, too large.
            ({"max_tokens": 10**30}, "max_tokens", "integer_above_max_value"),
            ({"seed": -(10**30)}, "seed", "integer_below_min_value"),
            # Just past: orjson reads it as the float -2**63, the bound
            # (recheck s41: invalid_type); just past the top, 2**63.
            ({"seed": -(2**63) - 1}, "seed", "integer_below_min_value"),
            ({"seed": 2**63}, "seed", "integer_above_max_value"),
            # In range, but written with an exponent: a decimal.
            ({"seed": 1e16}, "seed", "invalid_type"),
            ({"seed": -1e16}, "seed", "invalid_type"),
            ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "invalid_value"),
            ({"messages": [{"content": "hi"}]}, "messages[0].role", "missing_required_parameter"),
            ({"tool_choice": "sometimes"}, "tool_choice", "invalid_value"),
            ({"response_format": {"type": "yaml"}}, "response_format.type", "invalid_value"),
            (
                {"response_format": {"type": "json_schema", "json_schema": {}}},
                "response_format.json_schema.name",
                "missing_required_parameter",
            ),
            (
                {"response_format": {"type": "json_schema", "json_schema": {"name": 5}}},
                "response_format.json_schema.name",
                "invalid_type",
            ),
            ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "missing_required_parameter"),
            (
                {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "strict": "yes"}}},
                "response_format.json_schema.strict",
                "invalid_type",
            ),
            (
                {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "description": 5}}},
                "response_format.json_schema.description",
                "invalid_type",
            ),
            ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "integer_above_max_value"),
            ({"logprobs": "yes"}, "logprobs", "invalid_type"),
            ({"reasoning_effort": "extreme"}, "reasoning_effort", "invalid_value"),
            ({"verbosity": "loud"}, "verbosity", "invalid_value"),
            ({"stream": "yes"}, "stream", "invalid_type"),
            ({"user": 7}, "user", "invalid_type"),
            ({"messages": []}, "messages", "empty_array"),
            ({"messages": "hi"}, "messages", "invalid_type"),
            ({"messages": None}, "messages", "missing_required_parameter"),
            ({"stop": 7}, "stop", "invalid_type"),
            ({"stream": True, "stream_options": "usage"}, "stream_options", "invalid_type"),
            ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content", "invalid_type"),
            ({"messages": [{"role": "user", "content": "hi", "name": 7}]}, "messages[0].name", "invalid_type"),
            ({"messages": ["hi"]}, "messages[0]", "invalid_type"),
        )
        for fields, param, code in cases:
            body = {"model": "kimi/moonshot-v1-8k", "messages": HELLO, **fields}

            def create(body: dict[str, Any] = body) -> Any:
                return client.chat.completions.create(**body)

            try:
                yield deferToThread(create)
            except openai.BadRequestError as error:
                self.assertEqual((error.param, error.code), (param, code), fields)
            else:
                self.fail(f"{fields} was not refused")
