"""
JSON Schema's keywords by what their values hold, and one walk that
rewrites a schema node by node: Kimi's rewrite of a tool's C{parameters}
is built on it (L{openclaw.providers.kimi.moonshot_parameters}), and
Gemini's isolation of a C{$ref}'s siblings reads its keyword tables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: The keywords whose values are schemas, by how they hold them (JSON
#: Schema 2020-12, sections 10 and 11; with the older drafts' C{items} as
#: a list, C{additionalItems}, C{definitions} and C{dependencies}, whose
#: values are schemas or lists of names): a list of them, a map of names
#: to them, or one (C{items}: one, or a list).
SCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies"})
SCHEMA_ONES = frozenset(
    {
        "items",
        "additionalItems",
        "additionalProperties",
        "unevaluatedItems",
        "unevaluatedProperties",
        "propertyNames",
        "contains",
        "not",
        "if",
        "then",
        "else",
    }
)
#: Keywords whose values are data, not schemas: never rewritten.
DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples", "example"})

#: What a rewrite does to one schema node (an object, its subschemas
#: rewritten already): the node itself when nothing changes, else a new one.
NodeRewrite = Callable[[dict[str, Any]], dict[str, Any]]


def rewrite(schema: Any, node: NodeRewrite) -> Any:
    """
    C{schema} with every schema object in it, itself included, through
    C{node}, the innermost first; only schema-valued keywords are walked
    (never data such as C{enum} or C{default}, nor unknown keywords).
    Unchanged parts are shared, not copied, and C{schema} is returned
    itself when nothing changes; it is never changed.  A boolean schema
    (C{true}, C{false}) is left as it is.

    Recursion follows the schema's nesting: the request's own depth limit
    (the data plane's C{MAX_VALUE_DEPTH}) is what keeps it within
    Python's.
    """
    if not isinstance(schema, dict):
        return schema
    return node(rewrite_subschemas(schema, node))


def rewrite_subschemas(schema: dict[str, Any], node: NodeRewrite) -> dict[str, Any]:
    """
    L{rewrite} of C{schema}'s subschemas only, not of C{schema} itself (a
    tool's root, which has rules of its own).
    """
    changed: dict[str, Any] = {}
    for key, value in schema.items():
        if key in SCHEMA_ONES or key in SCHEMA_LISTS:
            if isinstance(value, dict):
                new = rewrite(value, node)
            elif isinstance(value, list):
                items = [rewrite(item, node) for item in value]
                new = items if any(a is not b for a, b in zip(items, value, strict=True)) else value
            else:
                continue
        elif key in SCHEMA_MAPS and isinstance(value, dict):
            named = {name: rewrite(item, node) for name, item in value.items()}
            new = named if any(named[name] is not item for name, item in value.items()) else value
        else:
            continue
        if new is not value:
            changed[key] = new
    return {**schema, **changed} if changed else schema
