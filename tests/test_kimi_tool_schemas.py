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
import orjson
import pydantic
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from openclaw.dataplane.request import MAX_VALUE_DEPTH, nests_too_deep
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


class Place(pydantic.BaseModel):
    city: str | None


class Node(pydantic.BaseModel):
    """
    A recursive model: its schema is a C{$ref} beside C{$defs}.
    """

    name: str
    children: list[Node] = []
    pair: tuple[str, int]
    where: Place = pydantic.Field(description="where it is")


class MoonshotSchemaTests(SynchronousTestCase):
    def test_rewritten(self) -> None:
        before = copy.deepcopy(PARAMETERS)
        sent = moonshot_parameters(PARAMETERS)
        self.assertEqual(PARAMETERS, before, "the caller's schema changed")
        properties = sent["properties"]
        self.assertEqual(
            properties["id"], {"anyOf": [{"type": "string", "minLength": 3}, {"type": "string", "pattern": "^x"}]}
        )
        # A $ref branch takes the type beside an allOf of its reference
        # (recheck s44: left alone, the type was lost).
        self.assertEqual(
            properties["where"],
            {
                "anyOf": [
                    {"type": "object", "allOf": [{"$ref": "#/$defs/Place"}]},
                    {"type": "object", "properties": {"x": {"type": "number"}}},
                ]
            },
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

    def test_reference_with_siblings(self) -> None:
        """
        A C{$ref} with keywords beside it goes into an C{allOf} of one, its
        siblings kept (Moonshot refuses a type beside a reference); one
        with its C{description} alone, which Moonshot takes, is left.  A
        recursive Pydantic model's root (its C{$ref} beside C{$defs}, and
        the object type the root needs) the same way.
        """
        described = {"$ref": "#/$defs/A", "description": "home"}
        typed = {"$ref": "#/$defs/A", "type": "string", "minLength": 1, "allOf": [{"maxLength": 9}]}
        parameters = {"type": "object", "properties": {"a": described, "b": typed}, "$defs": {"A": {"type": "string"}}}
        sent = moonshot_parameters(parameters)
        self.assertIs(sent["properties"]["a"], described)
        self.assertEqual(
            sent["properties"]["b"],
            {"type": "string", "minLength": 1, "allOf": [{"maxLength": 9}, {"$ref": "#/$defs/A"}]},
        )
        node = {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}}}
        recursive = {"$defs": {"Node": node}, "$ref": "#/$defs/Node"}
        self.assertEqual(
            moonshot_parameters(recursive),
            {"type": "object", "$defs": {"Node": node}, "allOf": [{"$ref": "#/$defs/Node"}]},
        )
        old = {"definitions": {"Node": {"type": "object"}}, "$ref": "#/definitions/Node"}
        self.assertEqual(
            moonshot_parameters(old),
            {"type": "object", "$defs": {"Node": {"type": "object"}}, "allOf": [{"$ref": "#/$defs/Node"}]},
        )

    def test_anyof_types(self) -> None:
        """
        A list of types beside C{anyOf} goes into its branches as a string
        does; a C{true} branch admits what the type admits.
        """
        nullable = {"type": ["string", "null"], "anyOf": [{"minLength": 1}, True]}
        sent = moonshot_parameters({"type": "object", "properties": {"v": nullable}})
        self.assertEqual(
            sent["properties"]["v"],
            {"anyOf": [{"type": ["string", "null"], "minLength": 1}, {"type": ["string", "null"]}]},
        )

    def test_branch_types_and_edges(self) -> None:
        """
        A branch with a type of its own keeps the types both admit (review
        s44: an integer branch under a string type admitted integers), and
        goes when they share none; an
        C{allOf} that is not a list beside a C{$ref} is left for Moonshot
        (review s44: dropped); a tuple alone is rewritten (the fast path's
        marks); and the rewrite adds at most two levels, within what the
        request's depth limit leaves for a body around C{parameters}.
        """
        typed = {"type": "number", "anyOf": [{"type": "integer"}, {"type": ["number", "null"]}, {"type": "string"}]}
        sent = moonshot_parameters({"type": "object", "properties": {"n": typed}})
        self.assertEqual(sent["properties"]["n"], {"anyOf": [{"type": "integer"}, {"type": "number"}]})
        # A branch that shares no type with the anyOf's admits nothing
        # there: kept with its own type, it widened the schema (recheck
        # s44: strings went through an integer).  When none is left, the
        # node goes as written.
        wider = {"type": "integer", "anyOf": [{"type": "string"}, {"minimum": 3}]}
        sent = moonshot_parameters({"type": "object", "properties": {"n": wider}})
        self.assertEqual(sent["properties"]["n"], {"anyOf": [{"type": "integer", "minimum": 3}]})
        # Each type name once (recheck s45: ["integer", "integer"], which
        # JSON Schema refuses).
        twice = {"type": "integer", "anyOf": [{"type": ["number", "integer"]}, {"type": "string"}]}
        sent = moonshot_parameters({"type": "object", "properties": {"n": twice}})
        self.assertEqual(sent["properties"]["n"], {"anyOf": [{"type": "integer"}]})
        empty = {"type": "integer", "anyOf": [{"type": "string"}, {"type": ["boolean", "null"]}]}
        self.assertIs(moonshot_parameters({"type": "object", "properties": {"n": empty}})["properties"]["n"], empty)
        odd = {"$ref": "#/$defs/A", "type": "string", "allOf": {"minLength": 1}}
        self.assertIs(moonshot_parameters({"type": "object", "properties": {"a": odd}})["properties"]["a"], odd)
        tuple_only = {"type": "object", "properties": {"p": {"type": "array", "items": [{"type": "string"}]}}}
        self.assertEqual(moonshot_parameters(tuple_only)["properties"]["p"]["prefixItems"], [{"type": "string"}])
        leaf = {"type": ["string", "null"], "anyOf": [True, {"$ref": "#/$defs/A", "type": "string"}]}

        def chain(levels: int) -> dict[str, Any]:
            node: dict[str, Any] = leaf
            for _ in range(levels):
                node = {"not": node}
            return {"type": "object", "properties": {"x": node}, "$defs": {"A": {"type": "string"}}}

        levels = MAX_VALUE_DEPTH - 8
        while not nests_too_deep(chain(levels + 1)):
            levels += 1
        sent = moonshot_parameters(chain(levels))
        self.assertNotEqual(sent, chain(levels))
        orjson.dumps({"tools": [{"type": "function", "function": {"name": "f", "parameters": sent}}]})

    def test_definitions_beside_defs(self) -> None:
        """
        C{definitions} beside C{$defs} join them when no name is in both
        (their references with them); else both are left for Moonshot.
        Data (a C{default}, an C{enum}) is never rewritten, and the
        keywords of older drafts (C{additionalItems}, C{dependencies})
        are walked.
        """
        both = {
            "type": "object",
            "properties": {
                "a": {"$ref": "#/definitions/A", "default": {"$ref": "#/definitions/A"}},
                "b": {"$ref": "#/$defs/B"},
                "t": {"type": "array", "items": [{"type": "string"}], "additionalItems": {"type": "x", "anyOf": [{}]}},
            },
            "dependencies": {"a": {"properties": {"c": {"type": "string", "anyOf": [{}]}}}, "b": ["a"]},
            "definitions": {"A": {"type": "string"}},
            "$defs": {"B": {"type": "integer"}},
        }
        sent = moonshot_parameters(both)
        self.assertNotIn("definitions", sent)
        self.assertEqual(sent["$defs"], {"A": {"type": "string"}, "B": {"type": "integer"}})
        self.assertEqual(
            sent["properties"]["a"], {"default": {"$ref": "#/definitions/A"}, "allOf": [{"$ref": "#/$defs/A"}]}
        )
        # 2020-12 reads no additionalItems beside prefixItems: it goes as items.
        self.assertEqual(sent["properties"]["t"]["items"], {"anyOf": [{"type": "x"}]})
        self.assertNotIn("additionalItems", sent["properties"]["t"])
        self.assertEqual(sent["dependencies"]["a"]["properties"]["c"], {"anyOf": [{"type": "string"}]})
        self.assertEqual(sent["dependencies"]["b"], ["a"])
        clash = {**both, "definitions": {"B": {"type": "string"}}}
        self.assertEqual(moonshot_parameters(clash)["definitions"], {"B": {"type": "string"}})

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
    def test_pydantic_schemas(self) -> Any:
        """
        Pydantic's own schemas go through to Kimi and its calls' arguments
        validate against the model: a recursive model as the whole
        parameters (a C{$ref} beside C{$defs}, which took a C{type} beside
        it, refused by Moonshot), a tuple, a nested model with a
        description; a tool whose C{parameters} is null is sent without
        them (Moonshot refused a null).
        """
        client = self.sdk(self.gateway())
        answer = yield deferToThread(
            client.chat.completions.create,
            model=KIMI,
            messages=QUESTION,
            tools=self.tools(Node.model_json_schema()),
            tool_choice="required",
        )
        (call,) = answer.choices[0].message.tool_calls
        Node.model_validate_json(call.function.arguments)
        bare = [{"type": "function", "function": {"name": "now", "parameters": None}}]
        answer = yield deferToThread(client.chat.completions.create, model=KIMI, messages=QUESTION, tools=bare)
        self.assertEqual(self.upstream.kimi.last_body["tools"], [{"type": "function", "function": {"name": "now"}}])

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


class MoonshotSchemaMeaningTests(SynchronousTestCase):
    """
    The rewrite never admits more than the schema as written (s45-agents).
    """

    def test_tuple_closed(self) -> None:
        """
        A tuple closed by C{additionalItems: false} stays closed: C{maxItems}.
        """
        sent = moonshot_parameters(
            {
                "type": "object",
                "properties": {"p": {"type": "array", "items": [{"type": "number"}] * 2, "additionalItems": False}},
            }
        )
        self.assertEqual(
            sent["properties"]["p"], {"type": "array", "prefixItems": [{"type": "number"}] * 2, "maxItems": 2}
        )

    def test_tuple_closed_keeps_smaller_max(self) -> None:
        sent = moonshot_parameters(
            {
                "type": "object",
                "properties": {"p": {"type": "array", "items": [{}, {}], "additionalItems": False, "maxItems": 1}},
            }
        )
        self.assertEqual(sent["properties"]["p"]["maxItems"], 1)

    def test_tuple_open_and_draft(self) -> None:
        """
        An C{additionalItems} schema goes as C{items} (2020-12's), C{true}
        is left out; a C{$schema} stays as written (review s45: relabelled
        2020-12, an older draft's keywords would mean less).
        """
        draft7 = "http://json-schema.org/draft-07/schema#"
        sent = moonshot_parameters(
            {
                "$schema": draft7,
                "type": "object",
                "properties": {
                    "p": {"type": "array", "items": [{"type": "number"}], "additionalItems": {"type": "string"}},
                    "q": {"type": "array", "items": [{"type": "number"}], "additionalItems": True},
                },
            }
        )
        self.assertEqual(
            sent["properties"]["p"], {"type": "array", "prefixItems": [{"type": "number"}], "items": {"type": "string"}}
        )
        self.assertEqual(sent["properties"]["q"], {"type": "array", "prefixItems": [{"type": "number"}]})
        self.assertEqual(sent["$schema"], draft7)

    def test_empty_tuple(self) -> None:
        """
        An empty tuple goes without C{prefixItems}, which 2020-12 wants
        non-empty (recheck s45): C{additionalItems} says it all.
        """
        for extra, sent in (
            (False, {"type": "array", "maxItems": 0}),
            ({"type": "string"}, {"type": "array", "items": {"type": "string"}}),
        ):
            parameters = {
                "type": "object",
                "properties": {"p": {"type": "array", "items": [], "additionalItems": extra}},
            }
            self.assertEqual(moonshot_parameters(parameters)["properties"]["p"], sent)

    def test_nested_any_of(self) -> None:
        """
        A type beside an anyOf one of whose branches is an anyOf goes into
        the inner branches, not beside the inner anyOf.
        """
        sent = moonshot_parameters(
            {
                "type": "object",
                "properties": {
                    "w": {
                        "type": "string",
                        "anyOf": [{"anyOf": [{"format": "date"}, {"type": "integer"}]}, {"const": "now"}],
                    }
                },
            }
        )
        self.assertEqual(
            sent["properties"]["w"],
            {"anyOf": [{"anyOf": [{"type": "string", "format": "date"}]}, {"type": "string", "const": "now"}]},
        )
