"""
Moonshot's built-in tools (U{https://platform.moonshot.ai/docs/guide/use-web-search}):
C{tools=[{"type": "builtin_function", "function": {"name": "$web_search"}}]}
on a kimi model.  Kimi answers with a tool call of type C{builtin_function}
named C{$web_search}; the client sends its C{arguments} back unchanged as
the tool message's content, and Kimi answers with text.  The whole loop
with the official openai SDK, whole and streamed, through a real gateway
in front of the stand-in; the declaration's and the history's shapes
checked at the door; Gemini, which cannot run them, refuses them with a
400 naming the field, and a failed Kimi call holding them is not failed
over to it.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import openai
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from openclaw.testing.upstream import WEB_SEARCH_REPLY, OpenAIAnswer
from tests.test_agent_traffic import QUESTION, TOOLS
from tests.test_dataplane import DataPlaneTestCase

KIMI = "kimi/moonshot-v1-8k"
GEMINI = "gemini/gemini-2.5-flash"
WEB_SEARCH = {"type": "builtin_function", "function": {"name": "$web_search"}}
NEWS = [{"role": "user", "content": "What is in the news today?"}]
ARGUMENTS = '{"search_result": {"search_id": "s-1"}, "usage": {"total_tokens": 90}}'
#: A history in which Kimi searched the web, its result given back.
SEARCHED = [
    *NEWS,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "$web_search:0",
                "type": "builtin_function",
                "function": {"name": "$web_search", "arguments": ARGUMENTS},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "$web_search:0", "name": "$web_search", "content": ARGUMENTS},
]


class ShapeTests(DataPlaneTestCase):
    """
    The declaration Moonshot documents is taken, and nothing else in its
    place; a history's built-in calls are taken as Kimi answered them.
    Each other shape is a 400 naming the field, on either provider,
    before any provider sees the call.
    """

    @inlineCallbacks
    def test_bad_shapes(self):
        gateway = self.gateway()
        call = SEARCHED[1]["tool_calls"][0]

        def history(**changed: Any) -> dict[str, Any]:
            assistant = {**SEARCHED[1], "tool_calls": [{**call, **changed}]}
            return {"messages": [*NEWS, assistant, SEARCHED[2]]}

        cases = [
            ({"messages": NEWS, "tools": [{"type": "builtin_function"}]}, "tools[0].function", '{"type": "builtin'),
            (
                {"messages": NEWS, "tools": [{"type": "builtin_function", "function": {"name": "web_search"}}]},
                "tools[0].function.name",
                "start with $",
            ),
            (
                {"messages": NEWS, "tools": [{"type": "builtin_function", "function": {"name": "$a b"}}]},
                "tools[0].function.name",
                "start with $",
            ),
            (
                {
                    "messages": NEWS,
                    "tools": [{"type": "builtin_function", "function": {"name": "$web_search", "parameters": {}}}],
                },
                "tools[0].function.parameters",
                "the name alone",
            ),
            ({"messages": NEWS, "tools": [{**WEB_SEARCH, "strict": True}]}, "tools[0].strict", "remove strict"),
            ({"messages": NEWS, "tools": [WEB_SEARCH, WEB_SEARCH]}, "tools[1].function.name", "declared twice"),
            ({"messages": NEWS, "tools": [{"type": "custom"}]}, "tools[0].type", "builtin_function"),
            # Declared as a function: the shape to use instead.
            (
                {"messages": NEWS, "tools": [{"type": "function", "function": {"name": "$web_search"}}]},
                "tools[0].type",
                '{"type": "builtin_function", "function": {"name": "$web_search"}}',
            ),
            (
                history(function={"name": "web_search", "arguments": ARGUMENTS}),
                "messages[1].tool_calls[0].function.name",
                "start with $",
            ),
            (history(type="function"), "messages[1].tool_calls[0].type", '"type": "builtin_function"'),
            # The legacy field cannot carry the type: the field it sent is named.
            (
                {
                    "messages": [
                        *NEWS,
                        {"role": "assistant", "content": None, "function_call": call["function"]},
                        {"role": "function", "name": "$web_search", "content": ARGUMENTS},
                    ]
                },
                "messages[1].function_call.name",
                'in tool_calls with "type": "builtin_function"',
            ),
            (history(type="custom"), "messages[1].tool_calls[0]", "builtin_function"),
            (
                history(function={"name": "$web_search", "arguments": {}}),
                "messages[1].tool_calls[0].function.arguments",
                "string",
            ),
        ]
        for model in (KIMI, GEMINI):
            for body, param, said in cases:
                response, text = yield self.post(gateway, {**body, "model": model})
                self.assertEqual(response.code, 400, (body, text))
                error = self.assertOpenAIError(text)
                self.assertEqual(error["param"], param, body)
                self.assertIn(said, error["message"])
        self.assertEqual(self.upstream.gemini.requests + self.upstream.kimi.requests, 0)

    @inlineCallbacks
    def test_history_alone(self):
        """
        A history holding a built-in tool's call and its result, without
        the declaration: Kimi gets it as sent.
        """
        self.upstream.kimi.answers[:] = [OpenAIAnswer("Done.")]
        response, text = yield self.post(self.gateway(), {"model": KIMI, "messages": SEARCHED})
        self.assertEqual(response.code, 200, text)
        self.assertEqual(self.upstream.kimi.last_body["messages"], SEARCHED)


class GeminiTests(DataPlaneTestCase):
    """
    Gemini cannot run Moonshot's built-in tools: a request declaring one,
    or whose history holds a call of one, is a 400 naming it and saying to
    use a kimi model, whether it names Gemini or Gemini is the active
    route; and a Kimi call holding one that fails is not failed over to
    Gemini.
    """

    @inlineCallbacks
    def assertRefused(self, gateway: Any, body: dict[str, Any], param: str) -> Any:
        response, text = yield self.post(gateway, body)
        self.assertEqual(response.code, 400, text)
        error = self.assertOpenAIError(text)
        self.assertEqual(error["param"], param)
        self.assertIn("$web_search, one of Moonshot's built-in tools", error["message"])
        self.assertIn('kimi model (model "kimi/<model>")', error["message"])
        # What an agent on the active route can do once it is Gemini
        # (agent trial s43: told only to send it to a kimi model).
        self.assertIn(
            "; or, to go on with gemini, leave $web_search out of tools, and its calls and their tool messages out "
            "of the history",
            error["message"],
        )

    @inlineCallbacks
    def test_refused(self):
        pinned = self.gateway()
        active = self.gateway(default_provider="gemini")
        for gateway, model in ((pinned, GEMINI), (active, "gpt-4o")):
            yield self.assertRefused(
                gateway, {"model": model, "messages": NEWS, "tools": [*TOOLS, WEB_SEARCH]}, "tools[2]"
            )
            yield self.assertRefused(
                gateway, {"model": model, "messages": [*SEARCHED, *QUESTION]}, "messages[1].tool_calls[0]"
            )
        self.assertEqual(self.upstream.gemini.requests, 0)

    @inlineCallbacks
    def test_not_failed_over(self):
        gateway = self.gateway(default_provider="kimi", fallback="auto")
        kimi = self.upstream.kimi
        kimi.mode, kimi.error_status = "error", 503
        for body, why in (
            ({"messages": NEWS, "tools": [WEB_SEARCH]}, "tools[0] declares $web_search"),
            ({"messages": [*SEARCHED, *QUESTION]}, "messages[1].tool_calls[0] calls $web_search"),
        ):
            response, text = yield self.post(gateway, body)
            self.assertEqual(response.code, 502, text)
            message = self.assertOpenAIError(text, "upstream_http_error")["message"]
            self.assertIn(f"(not failed over to gemini: it cannot take this request: {why}", message)
            self.assertIsNone(response.headers.getRawHeaders("x-openclaw-fallback"))
        self.assertEqual(kimi.requests, 2)
        self.assertEqual(self.upstream.gemini.requests, 0)
        # Without the built-in tool, the same call is failed over.
        response, text = yield self.post(gateway, {"messages": NEWS, "tools": TOOLS})
        self.assertEqual(response.code, 200, text)
        self.assertEqual(response.headers.getRawHeaders("x-openclaw-fallback"), ["kimi->gemini; reason=http_5xx"])


def search(client: openai.OpenAI, messages: list[Any], stream: bool, **extra: Any) -> dict[str, Any]:
    """
    One call to Kimi, declaring C{$web_search}: the answer's content,
    calls (id, type, name, arguments), finish reasons, and the assistant
    message to send back (the SDK's own object when whole, as Moonshot's
    example does).
    """
    create = client.chat.completions.create
    if not stream:
        completion = create(model=KIMI, messages=messages, tools=[WEB_SEARCH], **extra)
        choice = completion.choices[0]
        calls = [
            {"id": c.id, "type": c.type, "name": c.function.name, "arguments": c.function.arguments}
            for c in choice.message.tool_calls or ()
        ]
        return {
            "content": choice.message.content or "",
            "calls": calls,
            "finishes": [choice.finish_reason],
            "message": choice.message,
        }
    content: list[str] = []
    by_index: dict[int, dict[str, Any]] = {}
    finishes: list[str] = []
    for chunk in create(model=KIMI, messages=messages, tools=[WEB_SEARCH], stream=True, **extra):
        for streamed in chunk.choices:
            delta = streamed.delta
            content.append(delta.content or "")
            for call in delta.tool_calls or ():
                entry = by_index.setdefault(call.index, {"id": None, "type": None, "name": "", "arguments": ""})
                entry["id"] = call.id or entry["id"]
                entry["type"] = call.type or entry["type"]
                if call.function is not None:
                    entry["name"] += call.function.name or ""
                    entry["arguments"] += call.function.arguments or ""
            if streamed.finish_reason:
                finishes.append(streamed.finish_reason)
    calls = [by_index[i] for i in sorted(by_index)]
    message = {
        "role": "assistant",
        "content": "".join(content) or None,
        "tool_calls": [
            {"id": c["id"], "type": c["type"], "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls
        ],
    }
    return {"content": "".join(content), "calls": calls, "finishes": finishes, "message": message}


def web_search_loop(client: openai.OpenAI, stream: bool) -> list[dict[str, Any]]:
    """
    Moonshot's documented loop: ask, and while the answer's finish reason
    is C{tool_calls}, send the assistant message back and, for each call,
    a tool message (its id, C{name}, its C{arguments} unchanged as the
    content); every answer, in order.
    """
    messages: list[Any] = list(NEWS)
    answers = []
    with warnings.catch_warnings():
        # Pydantic, serializing the SDK's call object of a type it does not
        # know ("builtin_function"), warns; what it sends is the call.
        warnings.simplefilter("ignore", UserWarning)
        while len(answers) < 3:
            answer = search(client, messages, stream)
            answers.append(answer)
            if answer["finishes"] != ["tool_calls"]:
                break
            messages.append(answer["message"])
            for call in answer["calls"]:
                messages.append(
                    {"role": "tool", "tool_call_id": call["id"], "name": call["name"], "content": call["arguments"]}
                )
    return answers


class WebSearchLoopTests(DataPlaneTestCase):
    """
    The loop Moonshot documents, with the official openai SDK, whole and
    streamed, on a kimi model: the declaration, the call and its result
    reach Kimi as sent, and its answers reach the client whole.
    """

    @inlineCallbacks
    def loop(self, stream: bool) -> Any:
        kimi = self.upstream.kimi
        client = self.sdk(self.gateway())
        first, second = yield deferToThread(web_search_loop, client, stream)
        (call,) = first["calls"]
        self.assertEqual(first["finishes"], ["tool_calls"])
        self.assertEqual((call["type"], call["name"]), ("builtin_function", "$web_search"))
        self.assertEqual(call["id"], "$web_search:0")
        self.assertEqual(json.loads(call["arguments"])["search_result"], {"search_id": "standin-search-0"})
        self.assertEqual(second["content"], WEB_SEARCH_REPLY.format(reply=kimi.reply))
        self.assertEqual(second["finishes"], ["stop"])
        # The declaration went as sent; the call and its result too, the
        # arguments unchanged (the stand-in refuses them otherwise).
        self.assertEqual([body["tools"] for body in kimi.bodies], [[WEB_SEARCH], [WEB_SEARCH]])
        assistant, result = kimi.bodies[1]["messages"][1:]
        self.assertEqual(
            assistant["tool_calls"],
            [
                {
                    "id": "$web_search:0",
                    "type": "builtin_function",
                    "function": {"name": "$web_search", "arguments": call["arguments"]},
                }
            ],
        )
        self.assertEqual(
            result,
            {"role": "tool", "tool_call_id": "$web_search:0", "name": "$web_search", "content": call["arguments"]},
        )
        self.assertEqual(self.upstream.gemini.requests, 0)

    def test_loop(self):
        return self.loop(stream=False)

    def test_loop_streamed(self):
        return self.loop(stream=True)

    @inlineCallbacks
    def test_beside_functions(self):
        """
        Built-in tools and functions in one C{tools}; C{tool_choice}
        C{required} with the built-in tool alone: Kimi gets them as sent.
        """
        gateway = self.gateway()
        for extra in ({"tools": [WEB_SEARCH, *TOOLS]}, {"tools": [WEB_SEARCH], "tool_choice": "required"}):
            response, text = yield self.post(gateway, {"model": KIMI, "messages": NEWS, **extra})
            self.assertEqual(response.code, 200, text)
            self.assertEqual(json.loads(text)["choices"][0]["message"]["tool_calls"][0]["type"], "builtin_function")
            sent = self.upstream.kimi.last_body
            self.assertEqual({k: sent[k] for k in extra}, extra)

    @inlineCallbacks
    def test_scripted_answers_pass_through(self):
        """
        A built-in call beside a function call in one answer, whole and
        streamed: both reach the client as Kimi sent them, types included
        (the gateway's own rewriting of tool calls leaves them be).
        """
        calls = (
            {"id": "$web_search:0", "type": "builtin_function", "name": "$web_search", "arguments": ARGUMENTS},
            {"id": "get_time:1", "name": "get_time", "arguments": ""},
        )
        self.upstream.kimi.answers[:] = [OpenAIAnswer(tool_calls=calls), OpenAIAnswer(tool_calls=calls)]
        client = self.sdk(self.gateway())
        for stream in (False, True):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                answer = yield deferToThread(search, client, NEWS, stream)
            self.assertEqual(answer["finishes"], ["tool_calls"], stream)
            self.assertEqual(
                [(c["id"], c["type"], c["name"], c["arguments"]) for c in answer["calls"]],
                [
                    ("$web_search:0", "builtin_function", "$web_search", ARGUMENTS),
                    # Moonshot's "" for a function without parameters: "{}".
                    ("get_time:1", "function", "get_time", "{}"),
                ],
                stream,
            )
