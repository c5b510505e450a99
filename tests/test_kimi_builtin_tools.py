"""
Moonshot's built-in tools (U{https://platform.moonshot.ai/docs/guide/use-web-search}):
C{tools=[{"type": "builtin_function", "function": {"name": "$web_search"}}]}
on a kimi model.  Kimi answers with a tool call of type C{builtin_function}
named C{$web_search}; the client sends its C{arguments} back unchanged as
the tool message's content, and Kimi answers with text.  Through a real
gateway in front of the stand-in: the declaration's and the history's
shapes checked at the door; Gemini, which cannot run them, refuses them with a
400 naming the field, and a failed Kimi call holding them is not failed
over to it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks

from openclaw.testing.upstream import OpenAIAnswer
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
