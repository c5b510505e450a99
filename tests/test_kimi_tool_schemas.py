"""
A tool's C{parameters} as Moonshot's validator takes them ("Moonshot
flavored JSON schema"): a C{type} beside a nested C{anyOf} moved into its
branches, a list of C{items} written as C{prefixItems}, a root without a
type given C{"object"}; what cannot be rewritten without changing the
meaning (a root C{anyOf}) is refused by Moonshot, and its 400 names
C{tools} and says what to do.  Through a real gateway in front of the
stand-in, whose Kimi refuses those shapes in Moonshot's words.
"""

from __future__ import annotations

import copy
from typing import Any

import openai
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from openclaw.providers.kimi import moonshot_parameters, moonshot_schema
from tests.test_dataplane import DataPlaneTestCase

KIMI = "kimi/moonshot-v1-8k"
GEMINI = "gemini/gemini-2.5-flash"
QUESTION = [{"role": "user", "content": "Find the files."}]
#: What MCP servers and schema generators write (zod's unions, a tuple).
PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "anyOf": [{"minLength": 3}, {"pattern": "^x"}]},
        "where": {"type": "object", "anyOf": [{"$ref": "#/$defs/Place"}, {"properties": {"x": {"type": "number"}}}]},
        "pair": {"type": "array", "items": [{"type": "string"}, {"type": "integer"}]},
    },
    "required": ["id"],
    "$defs": {"Place": {"type": "object", "properties": {"name": {"type": "string"}}}},
}
#: The same with draft 7's definitions beside no $defs.
DRAFT_7: dict[str, Any] = {
    "type": "object",
    "properties": {
        "old": {"$ref": "#/definitions/Old"},
        "many": {"type": "array", "items": {"$ref": "#/definitions/Old"}},
    },
    "definitions": {"Old": {"type": "object", "properties": {"next": {"$ref": "#/definitions/Old"}}}},
}


class MoonshotSchemaTests(SynchronousTestCase):
    def test_rewritten(self) -> None:
        before = copy.deepcopy(PARAMETERS)
        sent = moonshot_parameters(PARAMETERS)
        self.assertEqual(PARAMETERS, before, "the caller's schema changed")
        properties = sent["properties"]
        self.assertEqual(
            properties["id"], {"anyOf": [{"type": "string", "minLength": 3}, {"type": "string", "pattern": "^x"}]}
        )
        # A $ref branch keeps its target's type.
        self.assertEqual(
            properties["where"],
            {"anyOf": [{"$ref": "#/$defs/Place"}, {"type": "object", "properties": {"x": {"type": "number"}}}]},
        )
        self.assertEqual(
            properties["pair"], {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]}
        )
        self.assertEqual((sent["type"], sent["required"], sent["$defs"]), ("object", ["id"], PARAMETERS["$defs"]))

    def test_definitions(self) -> None:
        sent = moonshot_parameters(DRAFT_7)
        self.assertNotIn("definitions", sent)
        self.assertEqual(sent["$defs"], {"Old": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Old"}}}})
        self.assertEqual(sent["properties"]["old"], {"$ref": "#/$defs/Old"})
        self.assertEqual(sent["properties"]["many"]["items"], {"$ref": "#/$defs/Old"})
        self.assertEqual(DRAFT_7["properties"]["old"], {"$ref": "#/definitions/Old"})

    def test_unchanged_is_the_same_object(self) -> None:
        plain = {"type": "object", "properties": {"q": {"type": "string"}, "n": {"anyOf": [{"type": "integer"}]}}}
        self.assertIs(moonshot_parameters(plain), plain)
        self.assertIs(moonshot_schema(True), True)

    def test_root(self) -> None:
        # No type: an object (a call's arguments always are).
        self.assertEqual(moonshot_parameters({}), {"type": "object"})
        self.assertEqual(
            moonshot_parameters({"properties": {"q": {"type": "string"}}}),
            {"type": "object", "properties": {"q": {"type": "string"}}},
        )
        # A root anyOf: left for Moonshot to judge.
        union = {"type": "object", "anyOf": [{"required": ["a"]}, {"required": ["b"]}]}
        self.assertIs(moonshot_parameters(union), union)


class KimiToolSchemaTests(DataPlaneTestCase):
    def tools(self, parameters: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"type": "function", "function": {"name": "find", "parameters": parameters}}]

    @inlineCallbacks
    def test_tool_loop_on_kimi(self) -> Any:
        """
        Parameters Moonshot would refuse as written are taken on Kimi
        (agent trial s43: taken on Gemini, then every call a 400 after a
        switch to Kimi), whole and streamed; Gemini gets them as before.
        """
        client = self.sdk(self.gateway())
        for stream in (False, True):
            answer = yield deferToThread(
                client.chat.completions.create,
                model=KIMI,
                messages=QUESTION,
                tools=self.tools(PARAMETERS),
                tool_choice="required",
                stream=stream,
            )
            if stream:
                answer = list(answer)
            sent = self.upstream.kimi.last_body["tools"][0]["function"]["parameters"]
            self.assertEqual(sent, moonshot_parameters(PARAMETERS))
        answer = yield deferToThread(
            client.chat.completions.create, model=KIMI, messages=QUESTION, tools=self.tools(DRAFT_7)
        )
        self.assertEqual(self.upstream.kimi.last_body["tools"][0]["function"]["parameters"]["$defs"].keys(), {"Old"})
        answer = yield deferToThread(
            client.chat.completions.create, model=GEMINI, messages=QUESTION, tools=self.tools(PARAMETERS)
        )
        self.assertIsNotNone(answer.choices[0].message)

    @inlineCallbacks
    def test_refusal_says_what_to_do(self) -> Any:
        """
        A root anyOf, which cannot be rewritten without changing what it
        means, is refused by Moonshot: the 400 names C{tools} and says
        what Moonshot's validator takes.
        """
        client = self.sdk(self.gateway())
        union = {"type": "object", "properties": {"a": {"type": "string"}}, "anyOf": [{"required": ["a"]}]}
        with self.assertRaises(openai.BadRequestError) as refused:
            yield deferToThread(client.chat.completions.create, model=KIMI, messages=QUESTION, tools=self.tools(union))
        error = refused.exception.body
        self.assertEqual(error["param"], "tools", error)
        self.assertIn("moonshot flavored json schema", error["message"])
        self.assertIn("give every property a type", error["message"])
        self.assertIn("at the root, no anyOf", error["message"])
