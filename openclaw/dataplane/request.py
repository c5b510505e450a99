"""
A chat completion request: checked once at the door, so that every
provider gets a body it can be given (or translated from), and a caller
learns what is wrong with theirs in a 400 that names the field rather than
in a provider's error about a body it never wrote.

The shapes accepted are OpenAI's chat completions request
(U{https://platform.openai.com/docs/api-reference/chat/create}): text,
image, audio and file content parts, tools and tool calls, structured
output, reasoning effort.  The legacy C{functions}/C{function_call} fields
and C{role: "function"} messages are rewritten as their C{tools}
equivalents, and C{developer} messages as C{system}, so that each provider's
wire sees one shape.
"""

from __future__ import annotations

import binascii
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from types import MappingProxyType
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs
import orjson
from twisted.web.http_headers import Headers

from openclaw.dataplane.callids import clashing, payload, plain_message
from openclaw.dataplane.errors import (
    EMPTY_ARRAY,
    INVALID_TYPE,
    INVALID_VALUE,
    MISSING_REQUIRED_PARAMETER,
    APIError,
    bad_request,
)
from openclaw.routing import Route, model_refusal
from openclaw.shorten import shortened
from openclaw.spelling import meant
from openclaw.web import compression_of

#: Roles accepted; "developer" (OpenAI's newer name) means system, and
#: "function" (legacy) is rewritten as "tool".
ROLES = frozenset({"system", "user", "assistant", "developer", "tool", "function"})
#: Content part types, by role (OpenAI's: assistants may also send
#: refusals; users also the part types some declared provider's wire takes
#: beside these, L{MediaKinds}: Kimi's C{video_url}).
USER_PARTS = frozenset({"text", "image_url", "input_audio", "file"})
TEXT_PARTS = frozenset({"text"})
ASSISTANT_PARTS = frozenset({"text", "refusal"})
#: A function name every provider accepts, so that a tool loop survives
#: switch_provider: OpenAI's rule (letters, digits, "_" and "-"; at most
#: 64; U{https://platform.openai.com/docs/api-reference/chat/create}) and
#: Gemini's (which also takes "." but starts with a letter or "_").
FUNCTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}")
#: A C{response_format.json_schema.name}: OpenAI's rule (letters, digits,
#: "_" and "-"; at most 64; U{https://platform.openai.com/docs/api-reference/chat/create}).
SCHEMA_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")
TOOL_CHOICES = frozenset({"auto", "none", "required"})
#: The message fields only one role carries, and which (OpenAI's message
#: shapes, U{https://platform.openai.com/docs/api-reference/chat/create}:
#: system, developer and user messages carry content and name; assistant
#: messages also refusal, audio, tool_calls and the legacy function_call;
#: tool messages content and tool_call_id).
ROLE_FIELDS = MappingProxyType({"tool_calls": "assistant", "function_call": "assistant", "tool_call_id": "tool"})
#: Those of L{ROLE_FIELDS} each role may not carry (a tuple: the first
#: found is the one a 400 names, whatever the hash seed).
NOT_CARRIED = MappingProxyType({role: tuple(f for f, owner in ROLE_FIELDS.items() if owner != role) for role in ROLES})
#: Any of them, or a C{name}: a user or system message of text holding
#: none needs no check of its fields.
CHECKED_FIELD_NAMES = frozenset({*ROLE_FIELDS, "name"})
#: OpenAI's values, "xhigh" and "max" its newest
#: (U{https://platform.openai.com/docs/api-reference/chat/create}; the
#: openai SDK's C{ReasoningEffort}, 3.57: none, minimal, low, medium, high,
#: xhigh, max), least effort first.  Kimi gets the value as sent (Moonshot's
#: Kimi K3 models take low, high and max, by third-party reports); Gemini's
#: translation maps each.
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
#: What C{modalities} may list, and what C{verbosity} may be (OpenAI's,
#: U{https://platform.openai.com/docs/api-reference/chat/create}; the
#: openai SDK's C{completion_create_params}, 3.57).
MODALITIES = ("text", "audio")
VERBOSITIES = ("low", "medium", "high")
#: The modes of an C{allowed_tools} tool choice (OpenAI's).
ALLOWED_TOOLS_MODES = frozenset({"auto", "required"})
#: What C{tool_choice} may be, for the 400 that refuses another value.
TOOL_CHOICE_SHAPES = (
    'tool_choice must be "auto", "none", "required", {"type": "function", "function": {"name": ...}} or '
    '{"type": "allowed_tools", "allowed_tools": {"mode": "auto"|"required", "tools": [...]}}'
)
RESPONSE_FORMATS = frozenset({"text", "json_object", "json_schema"})
IMAGE_DETAILS = frozenset({"auto", "low", "high"})
#: C{data:<media type>;base64,<data>}: the only inline form carried.  The
#: scheme, the media type and "base64" in any case: a URL's scheme is
#: case-insensitive (RFC 3986 section 3.1), and so are a media type's
#: names (RFC 2045 section 5.1, which RFC 2397's data URLs use).
DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)(?:;[^;,]*)*;base64,", re.ASCII | re.IGNORECASE)
#: URL schemes an image may be given by (the gateway never fetches them),
#: in any case (RFC 3986 section 3.1: C{HTTPS://} is C{https://}).
IMAGE_URL_SCHEMES = ("http://", "https://", "gs://")
#: What an C{image_url}'s C{url} may be, as a 400 says it, before the URL
#: schemes some declared provider takes (L{MediaKinds.image_url_forms}).
IMAGE_URL_FORMS = "a base64 data URL (data:image/png;base64,...), an http(s):// or gs:// URL"
#: The longest URL scheme looked for among the declared ones
#: (L{MediaKinds.scheme_of}), before its ":".
MAX_SCHEME_CHARS = 32
#: Characters C{str.isprintable} takes that show as nothing: Unicode's
#: Default_Ignorable_Code_Point (DerivedCoreProperties.txt) letters and
#: marks (the Hangul fillers, the combining grapheme joiner, the
#: variation selectors) and the blank Braille pattern.
INVISIBLE_PRINTABLE = re.compile(
    "[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180d\u180f\u2800\u3164\ufe00-\ufe0f\uffa0\U000e0100-\U000e01ef]"
)
#: How many unanswered tool call ids a 400 names (the rest are counted), and
#: how many characters of each: the message stays short however many calls
#: the request holds, and however long their ids.
LISTED_CALL_IDS = 5
LISTED_CALL_ID_CHARS = 64
#: The deepest nesting orjson encodes (its documented recursion limit);
#: it reads up to 1024 levels, so a parsed body can be deeper than this.
MAX_JSON_DEPTH = 254
#: A client's JSON nested deeper than L{MAX_JSON_DEPTH}: 400
#: C{json_too_deep}, however deep (past orjson's 1024 levels too).
JSON_TOO_DEEP = (
    f"the request's JSON nests more than {MAX_JSON_DEPTH} levels of lists and objects, "
    "more than the gateway can send on; flatten it"
)
#: The most levels a provider's body puts around a JSON value the client
#: gives: Gemini's C{contents[i].parts[j].functionCall.args} (the body,
#: contents, a turn, its parts, a part, the call).
WRAPPING_DEPTH = 6
#: The deepest tool call arguments and JSON Schemas (C{tools}'
#: C{parameters}, C{response_format}'s C{schema}) any provider's body
#: carries: one limit for every provider, checked at the door, so a request
#: one provider takes is never too deep for another after switch_provider.
MAX_VALUE_DEPTH = MAX_JSON_DEPTH - WRAPPING_DEPTH
#: The bounds of OpenAI's C{seed}, a 64-bit signed integer (the OpenAPI
#: description of its API: C{minimum: -9223372036854775808, maximum:
#: 9223372036854775807}).  The counts (C{n}, C{max_tokens},
#: C{max_completion_tokens}) have no documented upper bound: they are held
#: to the same one, so that every integer passed on fits a 64-bit integer
#: field (orjson reads a whole number past 2**64 - 1 as a float in any
#: case).
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
#: Why, for the 400 that states the bounds.
SEED_WHY = " (OpenAI's range: a 64-bit integer)"
COUNT_WHY = " (the most a 64-bit integer holds)"
#: A whole float of less than this magnitude is exact (a double's 53-bit
#: significand), so it was written with a fraction or exponent: orjson
#: reads an integer this small written without either as an int.
FLOAT_INTEGERS = 2**53
#: OpenAI's limits on C{metadata}: pairs, a key's characters, a value's
#: (U{https://platform.openai.com/docs/api-reference/chat/create}).
METADATA_KEYS = 16
METADATA_KEY_CHARS = 64
METADATA_VALUE_CHARS = 512
#: A C{logit_bias} key: a token id, written in decimal digits (OpenAI's API
#: reference: "Maps tokens (specified by their token ID in the tokenizer)
#: to an associated bias value"; its example, C{{"50256": -100}}), from 0
#: to L{MAX_TOKEN_ID}.  A tokenizer's ids index its vocabulary (OpenAI's
#: o200k and Kimi's hold some 200,000 and 160,000 tokens): no sign, no
#: other digits (C{str.isdigit} takes "²"), no spaces, and no leading
#: zeros but the id 0's own: a map holding "7" and "007" would name one
#: token twice, with two biases (JSON objects' names should be unique,
#: RFC 8259 section 4, and the provider's choice of one is its own).
TOKEN_ID = re.compile(r"0|[1-9][0-9]{0,9}", re.ASCII)
#: Digits alone, with leading zeros: a token id written so is told how to
#: write it (L{TOKEN_ID}).
ZERO_PADDED = re.compile(r"0[0-9]+", re.ASCII)
#: The largest token id taken (a 32-bit integer's), far past any
#: vocabulary.
MAX_TOKEN_ID = 2**31 - 1
#: A token (RFC 9110 section 5.6.2), as a content coding is named; a
#: longer or odd one is not quoted back.
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9a-z-]{1,32}")


def too_deep(error: TypeError) -> bool:
    """
    Whether C{error}, raised by C{orjson.dumps}, is its refusal of a
    document nested deeper than L{MAX_JSON_DEPTH} (orjson's
    C{JSONEncodeError}, a C{TypeError}: "Recursion limit reached").
    Anything else (a bug) is not.
    """
    return isinstance(error, orjson.JSONEncodeError) and "recursion" in str(error).lower()


def nests_too_deep(value: Any) -> bool:
    """
    Whether C{value}, as parsed JSON, nests more than L{MAX_VALUE_DEPTH}
    levels of lists and objects: orjson refuses to encode it inside
    L{WRAPPING_DEPTH} lists (C code, much faster than a walk in Python).
    """
    for _ in range(WRAPPING_DEPTH):
        value = [value]
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError as e:
        if too_deep(e):
            return True
        raise
    return False


def value_too_deep(where: str) -> APIError:
    """
    400 C{json_too_deep} for the JSON value at C{where}.
    """
    return bad_request(
        f"{where} nests more than {MAX_VALUE_DEPTH} levels of objects and lists, more than the gateway can send "
        "on to every provider; flatten it",
        param=where,
        code="json_too_deep",
    )


class ToolType(Protocol):
    """
    A kind of tool beside OpenAI's functions that a provider's wire takes
    (L{Wire.tool_types <openclaw.providers.wire.Wire.tool_types>}): its
    C{type}, as a declaration (C{tools[i]}) and a call in a history
    (C{messages[i].tool_calls[j]}) carry it, and its checks, which are its
    provider's own (Moonshot's built-in tools:
    L{openclaw.providers.kimi.MoonshotBuiltinTools}).  This module knows
    none: a type no declared provider takes is a 400 naming the field.
    """

    @property
    def name(self) -> str:
        """
        The C{type} value (Moonshot's C{"builtin_function"}).
        """

    @property
    def described(self) -> str:
        """
        What a tool of this type is, as a 400 names one ("one of Moonshot's
        built-in tools").
        """

    @property
    def offered(self) -> str:
        """
        How a 400 for a declaration of no known type offers this one ("for
        a kimi model, one of Moonshot's built-in tools: <its shape>").
        """

    @property
    def offered_call(self) -> str:
        """
        How a 400 for a call of no known type offers this one.
        """

    def check_declaration(self, tool: dict[str, Any], where: str) -> str:
        """
        Check a declaration of this type, C{tools[i]} at C{where}.

        @return: the tool's name.
        @raise APIError: 400 naming the field that is not of its shape.
        """

    def check_call_name(self, name: str, at: str) -> None:
        """
        Check the name (a non-empty string) of a call of this type in a
        history, C{tool_calls[j]} at C{at}.

        @raise APIError: 400 naming C{<at>.function.name}.
        """

    def function_refusal(self, name: str, at: str, called: bool) -> str | None:
        """
        The 400's message for a function (a declaration at C{at}, or when
        C{called} a call at C{at}) named as a tool of this type is, which
        should have been declared (or sent back) with this type; None for
        any other name.
        """

    def legacy_call_refusal(self, at: str) -> str:
        """
        The 400's message for a legacy C{function_call} (the message at
        C{at}) naming a tool of this type, whose type that field cannot
        carry.
        """


#: No tool type beside functions.
NO_TOOL_TYPES: Mapping[str, ToolType] = MappingProxyType({})


class MediaKind(Protocol):
    """
    A kind of media input beside OpenAI's that a provider's wire takes: a
    content part type (L{PartType}) or a media URL scheme (L{UrlScheme}),
    declared by its provider's module (Kimi's: Moonshot's C{video_url}
    part and C{ms://} file URLs, L{openclaw.providers.kimi}).  A provider
    whose wire does not declare it refuses a request holding one, by the
    wire's rule (L{refuse_media_kinds
    <openclaw.providers.wire.refuse_media_kinds>}), knowing nothing of it.
    """

    @property
    def name(self) -> str:
        """
        The part's C{type} (C{"video_url"}), or the scheme in lower case,
        without its ":" (C{"ms"}).
        """

    @property
    def described(self) -> str:
        """
        What one is, as a 400 names it ("a video_url part (Moonshot's
        video input)", "an ms:// URL (a file uploaded to Moonshot)").
        """

    @property
    def taken_by(self) -> str:
        """
        Who takes it, as a 400 says "which only <taken_by> take" ("Kimi's
        vision models").
        """

    @property
    def instead(self) -> str:
        """
        What to do instead on a provider that does not take it, as a 400
        says it after "or, for <provider>," ("leave the video out").
        """


class PartType(MediaKind, Protocol):
    """
    A content part type of a user message beside OpenAI's (text,
    C{image_url}, C{input_audio}, C{file}) that a provider's wire takes
    (L{Wire.part_types <openclaw.providers.wire.Wire.part_types>}),
    C{{"type": <name>, <name>: {...}}}, with its provider's checks.
    """

    def check(self, value: dict[str, Any], where: str) -> None:
        """
        Check the part's object, C{part[<name>]} at C{where}
        (C{messages[<i>].content[<j>].<name>}); it may be rewritten in
        place into the form sent (a data URL unwrapped,
        L{checked_data_url}).

        @raise APIError: 400 naming the field that is not of its shape.
        """


class UrlScheme(MediaKind, Protocol):
    """
    A media URL scheme beside C{data:}, C{http(s)://} and C{gs://} that a
    provider's wire takes in an C{image_url} part's C{url}
    (L{Wire.url_schemes <openclaw.providers.wire.Wire.url_schemes>}),
    with its provider's checks.  A scheme is matched in any case (RFC 3986
    section 3.1), and is at most L{MAX_SCHEME_CHARS} long.
    """

    @property
    def offered(self) -> str:
        """
        How a 400 for an image URL of no known form offers this one, after
        "or," ("for a kimi model, ms://<file_id> (an image uploaded to
        Moonshot)").
        """

    def check_url(self, url: str, where: str) -> None:
        """
        Check C{url}, of this scheme, at C{where}.

        @raise APIError: 400 naming C{where}.
        """


@attrs.frozen
class MediaKinds:
    """
    The content part types and media URL schemes beside OpenAI's that the
    declared providers' wires take (L{openclaw.providers.wire.OfferedTools.of}),
    each checked by its own rules at the door (L{parse_chat_request}):
    any other part type is a 400, a URL of any other scheme is checked as
    OpenAI's forms are.  Whether the provider the call goes to takes them
    is its wire's to say (L{refuse_media_kinds
    <openclaw.providers.wire.refuse_media_kinds>}).
    """

    #: Part type -> its checks (the first provider's to declare it).
    part_types: Mapping[str, PartType] = MappingProxyType({})
    #: Scheme (lower case, no ":") -> its checks (the first provider's).
    url_schemes: Mapping[str, UrlScheme] = MappingProxyType({})
    #: The part types a user message may hold: OpenAI's and L{part_types}.
    user_parts: frozenset[str] = attrs.field(
        init=False, default=attrs.Factory(lambda self: USER_PARTS | self.part_types.keys(), takes_self=True)
    )
    #: What an C{image_url}'s C{url} may be, as a 400 says it: OpenAI's
    #: forms, then each scheme's L{UrlScheme.offered}.
    image_url_forms: str = attrs.field(
        init=False,
        default=attrs.Factory(
            lambda self: (
                "".join([IMAGE_URL_FORMS, *(f", or, {s.offered}" for s in self.url_schemes.values())])
                if self.url_schemes
                else IMAGE_URL_FORMS.replace(", an http", " or an http")
            ),
            takes_self=True,
        ),
    )
    #: Finds a part type's name (quoted) or a scheme (a string's start, in
    #: any case) in a raw body; None when there are none to find.
    _named: re.Pattern[bytes] | None = attrs.field(
        init=False, default=attrs.Factory(lambda self: _names_pattern(self), takes_self=True), repr=False
    )

    def scheme_of(self, url: str) -> UrlScheme | None:
        """
        The declared scheme C{url} is of (its scheme in any case), or None.
        """
        if not self.url_schemes:
            return None
        scheme, colon, _ = url[: MAX_SCHEME_CHARS + 1].partition(":")
        return self.url_schemes.get(scheme.lower()) if colon else None

    def named_in(self, raw: bytes) -> bool:
        """
        Whether the raw body C{raw} names one of these (a C{\\u} escape
        aside, which the caller looks for).
        """
        return self._named is not None and self._named.search(raw) is not None


def _names_pattern(kinds: MediaKinds) -> re.Pattern[bytes] | None:
    """
    L{MediaKinds}' pattern: C{"<part type>"} or C{"<scheme>:}, the latter
    in any case.
    """
    names = [re.escape(f'"{name}"'.encode()) for name in kinds.part_types]
    names += [b'"(?i:' + re.escape(name.encode()) + b"):" for name in kinds.url_schemes]
    return re.compile(b"|".join(names)) if names else None


#: No media kind beside OpenAI's.
NO_MEDIA_KINDS = MediaKinds()


@attrs.frozen
class ChatRequest:
    """
    A validated C{POST /v1/chat/completions} body.

    @ivar body: the caller's JSON object, messages with role "developer"
        already turned into "system", legacy function calling into tools;
        every other field as sent.
    """

    body: dict[str, Any]
    stream: bool
    #: C{stream_options.include_usage}: end the stream with a usage chunk.
    include_usage: bool
    #: Some tool call id carries a payload (L{openclaw.dataplane.callids}):
    #: a provider whose wire does not read them gets it plain.
    carried_ids: bool = False
    #: The functions were declared in the legacy C{functions} field (not
    #: C{tools}): every wire answers in the legacy shape,
    #: C{message.function_call} (one call) and finish reason
    #: C{function_call}, as OpenAI does.
    legacy_functions: bool = False
    #: The body may hold a JSON Schema reference (a C{"$ref"} key, or a
    #: C{\\u} escape that could spell one): only then does a wire look
    #: through its schemas for one (Gemini's
    #: L{isolate_ref_siblings <openclaw.providers.gemini.translate.isolate_ref_siblings>}).
    references: bool = True
    #: The body may hold a tool (declared, or called in its history) of a
    #: type other than C{"function"}: one of the types some provider takes
    #: is named in it, or a C{\\u} escape could spell one.  Only then is
    #: it looked for (L{refuse_tool_types
    #: <openclaw.providers.wire.refuse_tool_types>}).
    other_tools: bool = True
    #: The body may hold an C{image_url} part: the name is in it, or a
    #: C{\\u} escape could spell it.  Only then are its parts looked
    #: through for an image type the provider does not take
    #: (L{refuse_image_types <openclaw.providers.wire.refuse_image_types>}).
    images: bool = True
    #: The body may hold an C{extra_content} field (Google's, on an
    #: assistant message or a tool call: a Gemini thought signature): the
    #: name is in it, or a C{\\u} escape could spell it.  Only then is it
    #: looked for (L{without_google_extras}).
    extra_content: bool = True
    #: The body may hold a part type or media URL scheme beside OpenAI's
    #: that some provider's wire takes (L{MediaKinds}): one is named in
    #: it, or a C{\\u} escape could spell one.  Only then is it looked
    #: for (L{refuse_media_kinds <openclaw.providers.wire.refuse_media_kinds>}).
    other_media: bool = True

    @property
    def model(self) -> Any:
        return self.body.get("model")

    @property
    def one_call(self) -> bool:
        """
        Each choice of the answer carries at most one tool call: the
        request said C{parallel_tool_calls: false} (OpenAI's switch, U{https://platform.openai.com/docs/api-reference/chat/create};
        null or absent: calls may come in parallel), or declared the legacy
        C{functions} (L{legacy_functions}), whose answer shape holds one.
        No provider's API is relied on for it (Gemini has no such switch;
        a Kimi model may answer two calls all the same): every wire keeps
        a choice's first call and leaves out later ones, whole and
        streamed, so an agent's contract holds across C{switch_provider}.
        """
        return self.legacy_functions or self.body.get("parallel_tool_calls") is False

    def without_google_extras(self) -> ChatRequest:
        """
        This request without Google's C{extra_content.google} (a Gemini
        thought signature, where Google's OpenAI-compatible endpoint and
        this gateway's Gemini answers put it) on its assistant messages and
        their tool calls: for an API that does not read it (Kimi's), to
        which it is a field it does not know; the rest of an
        C{extra_content}, if any, kept.
        """
        if not self.extra_content:
            return self
        given = self.body["messages"]
        messages = [_without_google(message) for message in given]
        if all(new is old for new, old in zip(messages, given, strict=True)):
            # None held one (the name spelled by an escape elsewhere).
            return self
        return attrs.evolve(self, body={**self.body, "messages": messages}, extra_content=False)

    def plain_ids(self) -> ChatRequest:
        """
        This request with every tool call id plain
        (L{openclaw.dataplane.callids.plain}), but those that would then be
        one with another id, sent whole
        (L{openclaw.dataplane.callids.clashing}).
        """
        if not self.carried_ids:
            return self
        whole = clashing(call_ids(self.body["messages"]))
        messages = [plain_message(message, whole) for message in self.body["messages"]]
        return attrs.evolve(self, body={**self.body, "messages": messages}, carried_ids=False)


def call_ids(messages: list[dict[str, Any]]) -> Iterator[str]:
    """
    The ids of a validated history's tool calls (its assistant messages'
    C{tool_calls[].id}).
    """
    for message in messages:
        if message["role"] == "assistant":
            for call in message.get("tool_calls") or ():
                yield call["id"]


def _without_google(message: dict[str, Any]) -> dict[str, Any]:
    """
    An assistant message without C{extra_content.google}, on it and on its
    tool calls (L{ChatRequest.without_google_extras}); any other message,
    and one without, as it is.
    """
    if message.get("role") != "assistant":
        return message
    calls = message.get("tool_calls")
    if isinstance(calls, list) and any(isinstance(call, dict) and "extra_content" in call for call in calls):
        message = {**message, "tool_calls": [_no_google(call) if isinstance(call, dict) else call for call in calls]}
    return _no_google(message)


def _no_google(item: dict[str, Any]) -> dict[str, Any]:
    """
    C{item} (a message or a tool call) without C{extra_content.google},
    and without an C{extra_content} left empty; itself when it has none.
    """
    extra = item.get("extra_content")
    if not isinstance(extra, dict) or "google" not in extra:
        return item
    rest = {name: value for name, value in extra.items() if name != "google"}
    if rest:
        return {**item, "extra_content": rest}
    return {name: value for name, value in item.items() if name != "extra_content"}


def requested_model(body: dict[str, Any]) -> str | None:
    """
    The C{model} a request body names, checked: L{None} when absent.

    An empty or blank model names none (the active route's is used, as
    for any model that is not a provider's: README, "Routing").

    @raise APIError: 400 (C{param} C{model}) when it is not a string, or
        names a model no route may take (L{model_refusal}).
    """
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string", param="model", code=INVALID_TYPE)
    refusal = model_refusal(model) if model is not None and model.strip() else None
    if refusal is not None:
        raise bad_request(refusal, param="model")
    return model


def content_encoding(headers: Headers) -> tuple[bytes, ...]:
    """
    The C{Content-Encoding} field values of a request's C{headers}, as
    sent (none: C{()}), for L{json_body}.  Read in the reactor's thread:
    C{Headers} shares twisted.web's cache of header names, not to be
    touched from another thread (L{BodyWorkers
    <openclaw.dataplane.offload.BodyWorkers>}).
    """
    return tuple(headers.getRawHeaders(b"content-encoding", ()))


def json_body(raw: bytes, codings: Sequence[bytes] = ()) -> dict[str, Any]:
    """
    A request body that must be a JSON object (every C{POST /v1/...}),
    read as sent: the gateway decodes no content coding.

    Only a body that does not parse is looked at further (nothing is added
    to one that does): one that declares a content coding gets a 415, one
    that is not UTF-8 a 400 that says so.

    @param codings: the request's C{Content-Encoding} field values
        (L{content_encoding}), as bytes.
    @raise APIError: 415 C{unsupported_content_encoding} when the body is
        not JSON and C{Content-Encoding} names a coding other than
        C{identity} (RFC 9110 sections 8.4 and 15.5.16); 400
        C{invalid_json} when it is not JSON, saying so when it is not UTF-8
        (RFC 8259 section 8.1); 400 C{json_too_deep} when it nests more
        levels than orjson reads (1024); 400 when it is JSON but not an
        object.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        if codings:
            encoded = content_codings(codings)
            if encoded:
                raise unsupported_content_encoding(encoded) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            compressed = compression_of(raw)
            raise bad_request(
                f"the request body is not valid JSON: it is not UTF-8 (an invalid byte at offset {bad.start}); "
                + (
                    f"it looks {compressed}-compressed, which the gateway does not read: send the JSON uncompressed"
                    if compressed
                    else "JSON must be sent as UTF-8 (RFC 8259 section 8.1): encode the body as UTF-8"
                ),
                code="invalid_json",
            ) from None
        if "depth limit" in str(e):
            # orjson reads at most 1024 levels: too deep, as any body past
            # MAX_JSON_DEPTH is (ChatCall's encoding finds those).
            raise bad_request(JSON_TOO_DEEP, code="json_too_deep") from None
        if "surrogate" in str(e):
            # A \uD800-\uDFFF escape without its other half: most often a
            # string cut between the two halves of an emoji (JavaScript's
            # slice counts UTF-16 units), or a lone half a JSON encoder
            # would not write.
            raise bad_request(
                f"the request body is not valid JSON ({e}): a \\u escape there is half of a UTF-16 surrogate "
                "pair, without its other half, which is no character; send text as UTF-8, escape a character "
                "past U+FFFF as its whole pair (\\ud83d\\ude00) or not at all, and do not cut strings between "
                "the two halves",
                code="invalid_json",
            ) from None
        if "infinity" in str(e):
            # A number past a double's range (about 1.8e308; an integer of
            # 310 digits or more): JSON allows it (RFC 8259 section 6), but
            # no field takes it, and the gateway reads numbers as doubles.
            raise bad_request(
                f"the request body holds a number too large to read ({e}): numbers are read as 64-bit floats, "
                "whose range ends near 1.8e308; send every number within it (no field takes more)",
                code="invalid_json",
            ) from None
        if text[e.pos : e.pos + 8].startswith(("NaN", "Infinity")):
            # JavaScript's and Python's non-numbers, where a value begins
            # (-Infinity: at its sign's digit).
            raise bad_request(
                f"the request body is not valid JSON ({e}): it holds NaN or Infinity, which JSON has no "
                "number for (RFC 8259 section 6); send a number or null there (Python's json.dumps writes "
                "them unless given allow_nan=False)",
                code="invalid_json",
            ) from None
        compressed = compression_of(raw)
        if compressed:
            # Compressed bytes that happen to be UTF-8 (a zstd skippable
            # frame's header is ASCII).
            raise bad_request(
                f"the request body is not valid JSON ({e}): it looks {compressed}-compressed, which the gateway "
                "does not read: send the JSON uncompressed",
                code="invalid_json",
            ) from None
        raise bad_request(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def content_codings(fields: Iterable[bytes]) -> list[bytes]:
    """
    The content codings C{Content-Encoding} field values name
    (comma-separated, case-insensitive: RFC 9110 section 8.4), lowercased,
    C{identity} (no coding, RFC 9110 section 8.4.1) and empty members left
    out.
    """
    codings = (coding.strip().lower() for field in fields for coding in field.split(b","))
    return [coding for coding in codings if coding and coding != b"identity"]


def unsupported_content_encoding(codings: list[bytes]) -> APIError:
    """
    415 for a body sent with a content coding (C{gzip}, C{br}, ...): the
    gateway decodes none (RFC 9110 section 15.5.16: a server answers a
    content coding it does not support with 415, and its
    C{Accept-Encoding}, section 12.5.3, says which it takes).
    """
    named = [coding.decode("ascii") for coding in codings if _TOKEN.fullmatch(coding)]
    which = ", ".join(named) if len(named) == len(codings) else "a content coding"
    return APIError(
        415,
        f"the request body is sent with Content-Encoding: {which}, which this gateway does not decode; "
        "send the body uncompressed, with no Content-Encoding header (or Content-Encoding: identity)",
        "invalid_request_error",
        "unsupported_content_encoding",
        headers=((b"Accept-Encoding", b"identity"),),
    )


def parse_chat_request(
    raw: bytes,
    codings: Sequence[bytes] = (),
    tool_types: Mapping[str, ToolType] = NO_TOOL_TYPES,
    media_kinds: MediaKinds = NO_MEDIA_KINDS,
) -> ChatRequest:
    """
    Parse and check a request body.

    @param codings: the request's C{Content-Encoding} field values
        (L{json_body}).
    @param tool_types: the kinds of tool beside functions that some
        provider takes, by type (L{ToolType}), each checked by its own
        rules; any other type is a 400.  Whether the provider the call
        goes to takes it is its wire's to say
        (L{openclaw.providers.wire.refuse_tool_types}).
    @param media_kinds: the content part types and media URL schemes
        beside OpenAI's that some provider takes, each checked by its own
        rules; any other part type is a 400.  Whether the provider the call
        goes to takes them is its wire's to say
        (L{openclaw.providers.wire.refuse_media_kinds}).
    @raise APIError: 400 naming the first problem found; 415 for a body
        sent with a content coding (L{json_body}).
    """
    body = json_body(raw, codings)
    legacy_choice = False
    legacy_functions = body.get("functions") is not None
    if "functions" in body or "function_call" in body:
        legacy_choice = _legacy_functions(body)
    names = _check_tools(body.get("tools"), tool_types, legacy_functions)
    if legacy_choice:
        _check_function_call(body["tool_choice"], names)
    else:
        _check_tool_choice(body.get("tool_choice"), names)
    carried_ids = _check_messages(body, tool_types, media_kinds)
    requested_model(body)
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("stream must be true or false", param="stream", code=INVALID_TYPE)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if stream is not True:
            # OpenAI's own answer, word for word.
            raise bad_request(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options"
            )
        if not isinstance(options, dict):
            raise bad_request("stream_options must be an object", param="stream_options", code=INVALID_TYPE)
        # Null is "not set", as for every field.
        asked = options.get("include_usage")
        include_usage = asked is True
        if asked is not None and not isinstance(asked, bool):
            raise bad_request(
                "stream_options.include_usage must be true or false", param="stream_options.include_usage"
            )
    # The other fields, each checked only if present (in the body's order).
    for name in body:
        check = _FIELD_CHECKS.get(name)
        if check is not None:
            check(name, body[name])
    if body.get("top_logprobs") is not None and body.get("logprobs") is not True:
        # OpenAI's rule (and Gemini's: its logprobs needs responseLogprobs).
        raise bad_request("top_logprobs needs logprobs: true; send both, or neither", param="top_logprobs")
    escaped = b"\\u" in raw
    references = escaped or b'"$ref"' in raw
    other_tools = bool(tool_types) and (escaped or any(f'"{name}"'.encode() in raw for name in tool_types))
    images = escaped or b'"image_url"' in raw
    extra_content = escaped or b'"extra_content"' in raw
    other_media = escaped or media_kinds.named_in(raw)
    return ChatRequest(
        body,
        bool(stream),
        include_usage,
        carried_ids,
        legacy_functions,
        references,
        other_tools,
        images,
        extra_content,
        other_media,
    )


def out_of_range(value: Any, low: float, high: float, kind: str) -> str:
    """
    OpenAI's code for a field's value that is not a C{kind} (C{integer},
    C{decimal}) from C{low} to C{high}: C{invalid_type} when it is not a
    number at all (or, for an integer, a decimal), else C{<kind>_below_min_value} or
    C{<kind>_above_max_value} (as OpenAI's API answers C{"temperature": 3}).
    """
    # An integer past 64 bits, which orjson reads as a float (one in range
    # was written with a fraction or exponent: a decimal); a bound is
    # past too, as -2**63 is: orjson reads -2**63 - 1 as the float -2**63.
    beyond = type(value) is float and value.is_integer() and abs(value) >= FLOAT_INTEGERS and not low < value < high
    written_whole = type(value) is int or beyond
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "integer" and not written_whole):
        # A decimal number for an integer field is of the wrong type, in
        # range or not (OpenAI: "expected an integer, but got a decimal").
        return INVALID_TYPE
    return f"{kind}_below_min_value" if value < low or (beyond and value <= low) else f"{kind}_above_max_value"


def _number(low: float, high: float) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high
        ):
            raise bad_request(
                f"{name} must be a number from {low:g} to {high:g}",
                param=name,
                code=out_of_range(value, low, high, "decimal"),
            )

    return check


def integer_field(low: int, high: int, why: str = "") -> Callable[[str, Any], None]:
    """
    The check of an integer field: from C{low} to C{high}; C{why} (the
    bounds' source, in parentheses) ends the 400's message.
    """

    def check(name: str, value: Any) -> None:
        if value is None or (type(value) is int and low <= value <= high):
            return
        message = f"{name} must be a whole number from {low} to {high}{why}"
        code = out_of_range(value, low, high, "integer")
        if isinstance(value, float) and value.is_integer() and abs(value) < FLOAT_INTEGERS and low <= value <= high:
            # A whole number in range written as 5.0 or 5e0: orjson reads a
            # number with a fraction or exponent as a float.
            message += f", written without a decimal point or exponent ({int(value)}, not {value!r})"
            code = INVALID_TYPE
        raise bad_request(message, param=name, code=code)

    return check


def _bool(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false", param=name, code=INVALID_TYPE)


def _reasoning_effort(name: str, value: Any) -> None:
    if value is not None and value not in REASONING_EFFORTS:
        raise bad_request(
            f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}", param=name, code=INVALID_VALUE
        )


def _one_of(values: tuple[str, ...]) -> Callable[[str, Any], None]:
    """
    The check of a field that is one of C{values} (C{verbosity}).
    """

    def check(name: str, value: Any) -> None:
        if value is not None and (not isinstance(value, str) or value not in values):
            raise bad_request(f"{name} must be one of {', '.join(values)}", param=name, code=INVALID_VALUE)

    return check


def _modalities(name: str, value: Any) -> None:
    """
    OpenAI's C{modalities}: a list of L{MODALITIES} (whether the audio
    output it asks for is taken is the provider's to say: Gemini's
    translation refuses it).
    """
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(item, str) and item in MODALITIES for item in value):
        raise bad_request(
            f"{name} must be a list of the output types asked for, each one of {', '.join(MODALITIES)} "
            '(OpenAI\'s), such as ["text"]',
            param=name,
        )


def string_field(name: str, value: Any) -> None:
    """
    The check of a string field (C{user}, C{service_tier}): a string or
    null.

    @raise APIError: 400 C{invalid_type} naming it.
    """
    if value is not None and not isinstance(value, str):
        raise bad_request(f"{name} must be a string", param=name, code=INVALID_TYPE)


def _object(shape: str) -> Callable[[str, Any], None]:
    """
    The check of a field that is an object (C{prediction},
    C{web_search_options}); C{shape}, what it holds, ends the 400's
    message.
    """

    def check(name: str, value: Any) -> None:
        if value is not None and not isinstance(value, dict):
            raise bad_request(f"{name} must be an object: {shape}", param=name, code=INVALID_TYPE)

    return check


def _metadata(name: str, value: Any) -> None:
    """
    OpenAI's C{metadata}: at most L{METADATA_KEYS} pairs of a string key
    of at most L{METADATA_KEY_CHARS} characters and a string value of at
    most L{METADATA_VALUE_CHARS} (its API reference,
    U{https://platform.openai.com/docs/api-reference/chat/create}, which
    refuses any other with a 400).
    """
    if value is None:
        return
    rule = (
        f"metadata must be an object of at most {METADATA_KEYS} keys of at most {METADATA_KEY_CHARS} characters, "
        f"each with a string value of at most {METADATA_VALUE_CHARS} characters (OpenAI's rule)"
    )
    if not isinstance(value, dict):
        raise bad_request(f'{rule}; send an object such as {{"job": "42"}}, or leave metadata out', param=name)
    if len(value) > METADATA_KEYS:
        raise bad_request(f"{rule}: it has {len(value)} keys; keep {METADATA_KEYS} at most", param=name)
    for key, item in value.items():
        if len(key) > METADATA_KEY_CHARS:
            raise bad_request(
                f"{rule}: the key {shortened(key, LISTED_CALL_ID_CHARS)!r} has {len(key)} characters; shorten it",
                param=name,
            )
        if not isinstance(item, str):
            raise bad_request(
                f'{rule}: the value of {shortened(key, LISTED_CALL_ID_CHARS)!r} is not a string; send it as a string ("7", not 7)',
                param=name,
            )
        if len(item) > METADATA_VALUE_CHARS:
            raise bad_request(
                f"{rule}: the value of {shortened(key, LISTED_CALL_ID_CHARS)!r} has {len(item)} characters; shorten it",
                param=name,
            )


#: OpenAI's C{moderation}, as a 400 for another shape shows it (the
#: openai SDK's C{completion_create_params.Moderation}, 3.57: C{model}
#: required, C{policy} optional, each of its C{input} and C{output} a
#: C{mode} of L{MODERATION_MODES}).
MODERATION_SHAPE = (
    '{"model": "omni-moderation-latest", "policy": {"input": {"mode": "block"}, "output": {"mode": "score"}}}'
)
#: What a moderation policy's C{mode} may be (OpenAI's).
MODERATION_MODES = ("score", "block")


def _moderation(name: str, value: Any) -> None:
    """
    OpenAI's C{moderation} (L{MODERATION_SHAPE}): an object whose C{model}
    is a string, and whose C{policy}, if set, is an object whose C{input}
    and C{output}, if set, are objects of a C{mode} of
    L{MODERATION_MODES}; null is not set at any level.  Fields OpenAI may
    add are not judged.

    @raise APIError: 400 naming the field that is not of that shape.
    """
    if value is None:
        return
    if not isinstance(value, dict):
        raise bad_request(f"{name} must be an object: {MODERATION_SHAPE}, or null", param=name, code=INVALID_TYPE)
    if not isinstance(value.get("model"), str):
        raise bad_request(
            f"{name}.model must be the moderation model's name, a string (such as omni-moderation-latest): "
            f"{MODERATION_SHAPE}",
            param=f"{name}.model",
        )
    policy = value.get("policy")
    if policy is None:
        return
    if not isinstance(policy, dict):
        raise bad_request(
            f"{name}.policy must be an object: {MODERATION_SHAPE}", param=f"{name}.policy", code=INVALID_TYPE
        )
    modes = " or ".join(f'"{mode}"' for mode in MODERATION_MODES)
    for side in ("input", "output"):
        at = f"{name}.policy.{side}"
        rule = policy.get(side)
        if rule is None:
            continue
        if not isinstance(rule, dict) or rule.get("mode") not in MODERATION_MODES:
            raise bad_request(f'{at} must be an object whose mode is {modes}: {{"mode": "block"}}', param=at)


def _logit_bias(name: str, value: Any) -> None:
    """
    OpenAI's C{logit_bias}: an object mapping token ids (L{TOKEN_ID}) to
    a bias from -100 to 100 (its API reference,
    U{https://platform.openai.com/docs/api-reference/chat/create}).  A
    key quoted back is clipped and escaped (L{_clipped}, C{repr}).

    @raise APIError: 400 naming C{logit_bias} for a value that is not an
        object, a key that is not a token id in canonical decimal (C{"7"},
        not C{"007"}, C{"+7"} or C{" 7"}), or a bias out of range.
    """
    if value is None:
        return
    if not isinstance(value, dict):
        raise bad_request(
            'logit_bias must be an object mapping token ids to a bias from -100 to 100, such as {"50256": -100}',
            param=name,
        )
    for token, bias in value.items():
        unpadded = token.lstrip("0") or "0"
        if ZERO_PADDED.fullmatch(token) and TOKEN_ID.fullmatch(unpadded) and int(unpadded) <= MAX_TOKEN_ID:
            # Told how to write it only where that is a token id.
            raise bad_request(
                f"logit_bias: the key {shortened(token, LISTED_CALL_ID_CHARS)!r} is a token id written with leading zeros, which the "
                f"same id written without them would also name: write it as {unpadded!r}",
                param=name,
            )
        if not TOKEN_ID.fullmatch(token) or int(token) > MAX_TOKEN_ID:
            raise bad_request(
                f"logit_bias: the key {shortened(token, LISTED_CALL_ID_CHARS)!r} is not a token id; its keys are token ids of the model's "
                f'tokenizer, whole numbers from 0 to {MAX_TOKEN_ID} written in decimal digits (no sign, no leading zeros), such as {{"50256": -100}}',
                param=name,
            )
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise bad_request(
                f"logit_bias: the bias of token {shortened(token, LISTED_CALL_ID_CHARS)!r} must be a number from -100 to 100 (OpenAI's range)",
                param=name,
            )


#: The checks of the optional fields, by name: C{check(name, value)}
#: raises L{APIError} (400 naming the field) for a value OpenAI's API
#: would refuse; null is accepted as "not set".
_FIELD_CHECKS: Mapping[str, Callable[[str, Any], None]] = MappingProxyType(
    {
        "temperature": _number(0.0, 2.0),
        "top_p": _number(0.0, 1.0),
        "presence_penalty": _number(-2.0, 2.0),
        "frequency_penalty": _number(-2.0, 2.0),
        "max_tokens": integer_field(1, INT64_MAX, COUNT_WHY),
        "max_completion_tokens": integer_field(1, INT64_MAX, COUNT_WHY),
        "n": integer_field(1, INT64_MAX, COUNT_WHY),
        "stop": lambda name, value: _check_stop(value),
        "parallel_tool_calls": _bool,
        "logprobs": _bool,
        "top_logprobs": integer_field(0, 20, " (OpenAI's range)"),
        "seed": integer_field(INT64_MIN, INT64_MAX, SEED_WHY),
        "reasoning_effort": _reasoning_effort,
        "response_format": lambda name, value: _check_response_format(value),
        "user": string_field,
        "service_tier": string_field,
        "store": _bool,
        "metadata": _metadata,
        "logit_bias": _logit_bias,
        "prediction": _object('{"type": "content", "content": ...}, the text the answer is expected to be close to'),
        "web_search_options": _object('{"search_context_size": ..., "user_location": ...}, or {}'),
        "moderation": _moderation,
        "modalities": _modalities,
        "verbosity": _one_of(VERBOSITIES),
    }
)


def _legacy_functions(body: dict[str, Any]) -> bool:
    """
    Rewrite the legacy C{functions} and C{function_call} fields as C{tools}
    and C{tool_choice} (what OpenAI itself documents as their replacement).

    @return: whether C{tool_choice} came from C{function_call}.
    """
    functions = body.pop("functions", None)
    if functions is not None:
        if "tools" in body:
            raise bad_request("send tools or the legacy functions, not both", param="functions")
        if not isinstance(functions, list):
            raise bad_request(
                "functions must be a list of {name, description, parameters}", param="functions", code=INVALID_TYPE
            )
        body["tools"] = [{"type": "function", "function": f} for f in functions]
    function_call = body.pop("function_call", None)
    if function_call is not None:
        if "tool_choice" in body:
            raise bad_request("send tool_choice or the legacy function_call, not both", param="function_call")
        if isinstance(function_call, dict):
            body["tool_choice"] = {"type": "function", "function": function_call}
        elif function_call in ("auto", "none"):
            body["tool_choice"] = function_call
        else:
            raise bad_request('function_call must be "auto", "none" or {"name": ...}', param="function_call")
        return True
    return False


def _check_function_call(choice: Any, names: frozenset[str]) -> None:
    """
    The legacy C{function_call}, as rewritten by L{_legacy_functions}: a
    400 names it, not the C{tool_choice} the client never sent.
    """
    if isinstance(choice, str):
        return
    name = choice["function"].get("name")
    if not isinstance(name, str):
        raise bad_request('function_call must be "auto", "none" or {"name": ...}', param="function_call")
    if name not in names:
        raise bad_request(
            f"function_call names the function {name!r}, which is not among functions; declare it in functions",
            param="function_call.name",
        )


def _check_tools(tools: Any, tool_types: Mapping[str, ToolType], legacy: bool = False) -> frozenset[str]:
    """
    Functions (C{{"type": "function", "function": {name, description?,
    parameters?, strict?}}}, OpenAI's shape), and tools of the other types
    some provider takes (C{tool_types}, each checked by its
    L{ToolType.check_declaration}), passed on as sent: whether the
    provider the call goes to takes them is its wire's to say.

    @param legacy: C{tools} was rewritten from the legacy C{functions}
        (L{_legacy_functions}): a 400 names C{functions[<i>]}, the field
        the client sent.
    @return: the names of the tools declared (those of other types
        included).
    @raise APIError: 400 naming the field of the first tool that is
        neither.
    """
    if tools is None:
        return frozenset()
    if not isinstance(tools, list):
        raise bad_request('tools must be a list of {"type": "function", "function": {...}}', param="tools")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            # A str first: a list or object is unhashable (no lookup).
            other = tool_types.get(kind) if isinstance(kind, str) else None
            if other is None:
                offers = "".join(f" (or, {t.offered})" for t in tool_types.values())
                raise bad_request(
                    f'{where} must be {{"type": "function", "function": {{...}}}}{offers}', param=f"{where}.type"
                )
            declared = other.check_declaration(tool, where)
            if declared in names:
                raise bad_request(
                    f"{where}.function.name: {declared!r} is declared twice", param=f"{where}.function.name"
                )
            names.add(declared)
            continue
        at = f"functions[{i}]" if legacy else f"{where}.function"
        function = tool.get("function")
        if not isinstance(function, dict):
            raise bad_request(f"{at} must be an object with a name", param=at, code=INVALID_TYPE)
        name = function.get("name")
        if isinstance(name, str) and not legacy:
            claimed = _claimed(tool_types, name, at, called=False)
            if claimed is not None:
                raise bad_request(claimed[1], param=f"{where}.type")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise bad_request(
                f"{at}.name must be 1 to 64 letters, digits, _ or -, starting with a letter or _ "
                "(a name every provider takes; rename a dotted name such as fs.read to fs_read)",
                param=f"{at}.name",
            )
        if name in names:
            raise bad_request(f"{at}.name: {name!r} is declared twice", param=f"{at}.name")
        names.add(name)
        if not isinstance(function.get("description"), (str, type(None))):
            raise bad_request(f"{at}.description must be a string", param=f"{at}.description", code=INVALID_TYPE)
        parameters = function.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise bad_request(f"{at}.parameters must be a JSON Schema object", param=f"{at}.parameters")
            kind = parameters.get("type")
            if kind is not None and not (isinstance(kind, str) and kind.lower() == "object"):
                # OpenAI's rule, and Gemini's: a function takes an object.
                raise bad_request(
                    f'{at}.parameters must be a JSON Schema of "type": "object" (the arguments are a JSON '
                    "object), or leave its type out",
                    param=f"{at}.parameters.type",
                )
            if "type" in parameters and kind != "object":
                # Null or "OBJECT": written as JSON Schema spells it, so
                # that a provider's validator takes it; the
                # body is this request's own (parsed for it).
                parameters["type"] = "object"
            if nests_too_deep(parameters):
                raise value_too_deep(f"{at}.parameters")
        if "strict" in function and not isinstance(function["strict"], (bool, type(None))):
            raise bad_request(f"{at}.strict must be true or false", param=f"{at}.strict", code=INVALID_TYPE)
    return frozenset(names)


def _claimed(tool_types: Mapping[str, ToolType], name: str, at: str, called: bool) -> tuple[ToolType, str] | None:
    """
    The first of C{tool_types} that claims a function's C{name} as one of
    its tools', and the message of its 400 (L{ToolType.function_refusal});
    None when none does.
    """
    for tool_type in tool_types.values():
        refusal = tool_type.function_refusal(name, at, called)
        if refusal is not None:
            return tool_type, refusal
    return None


def _check_tool_choice(choice: Any, names: frozenset[str]) -> None:
    if choice is None:
        return
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise bad_request(TOOL_CHOICE_SHAPES, param="tool_choice", code=INVALID_VALUE)
        if choice == "required" and not names:
            raise bad_request('tool_choice "required" needs tools to choose from', param="tool_choice")
        return
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        _check_allowed_tools(choice.get("allowed_tools"), names)
        return
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise bad_request(TOOL_CHOICE_SHAPES, param="tool_choice")
    if name not in names:
        raise bad_request(
            f"tool_choice names the function {name!r}, which is not among tools", param="tool_choice.function.name"
        )


def _check_allowed_tools(allowed: Any, names: frozenset[str]) -> None:
    """
    OpenAI's C{{"type": "allowed_tools", "allowed_tools": {"mode": "auto" |
    "required", "tools": [{"type": "function", "function": {"name": ...}}]}}}:
    each tool named is one of C{tools}.
    """
    where = "tool_choice.allowed_tools"
    if not isinstance(allowed, dict):
        raise bad_request(f'{where} must be {{"mode": "auto"|"required", "tools": [...]}}', param=where)
    mode = allowed.get("mode")
    if not isinstance(mode, str) or mode not in ALLOWED_TOOLS_MODES:
        raise bad_request(f'{where}.mode must be "auto" or "required"', param=f"{where}.mode")
    tools = allowed.get("tools")
    if not isinstance(tools, list) or not tools:
        raise bad_request(
            f'{where}.tools must be a non-empty list of {{"type": "function", "function": {{"name": ...}}}}',
            param=f"{where}.tools",
        )
    for i, tool in enumerate(tools):
        at = f"{where}.tools[{i}]"
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise bad_request(f'{at} must be {{"type": "function", "function": {{"name": ...}}}}', param=at)
        if name not in names:
            raise bad_request(
                f"{at} names the function {name!r}, which is not among tools; declare it in tools",
                param=f"{at}.function.name",
            )


@attrs.define
class _History:
    """
    What a request's messages carry from one to the next, as
    L{_check_messages} reads them in order: the calls a later message
    answers (tool calls awaiting a tool message, legacy function calls
    awaiting a function message), and whether a call id carries a
    payload.  One per request, made at its first message other than text
    from the user or the system (those need none).
    """

    #: The kinds of tool beside functions that some provider takes
    #: (L{parse_chat_request}'s C{tool_types}).
    tool_types: Mapping[str, ToolType]
    #: Tool call ids seen so far -> the function's name.
    calls: dict[str, str] = attrs.Factory(dict)
    #: The latest assistant message's tool calls not answered yet (a dict
    #: for constant-time lookup and removal that keeps the calls' order for
    #: the error message).
    unanswered: dict[str, None] = attrs.Factory(dict)
    #: Where that assistant message is (C{messages[<i>]}).
    asked_at: str = ""
    #: Legacy function calls not yet answered: name -> their ids, in order
    #: (L{_legacy_call}, L{_legacy_result}).
    legacy: dict[str, deque[str]] = attrs.Factory(dict)
    #: Where the message rewritten last from a legacy function_call is.
    legacy_at: str = ""
    #: Whether a tool call id carries a payload
    #: (L{openclaw.dataplane.callids.payload}): Gemini's id or signature.
    carried_ids: bool = False


def _check_messages(
    body: dict[str, Any],
    tool_types: Mapping[str, ToolType] = NO_TOOL_TYPES,
    media_kinds: MediaKinds = NO_MEDIA_KINDS,
) -> bool:
    """
    Check C{body["messages"]}, a non-empty list of OpenAI's messages
    (C{{"role": ..., "content": ...}}, at least one holding some content),
    in order: each is rewritten in place as every wire takes it
    (L{_rewritten_message}: developer and legacy function messages), then
    checked by its role's rules (L{_check_assistant_message},
    L{_check_tool_message}, L{_check_user_or_system_message}) against what
    the messages before it said (L{_History}); calls of the C{tool_types}
    in a history by their own rules (L{_check_tool_calls}), the parts of
    the C{media_kinds} in a user message by theirs (L{_check_media}).

    @return: whether a tool call id carries Gemini's id or signature.
    @raise APIError: 400 naming the first field found wrong; C{messages}
        when it is missing, not a list, empty or holds no content;
        C{messages[<i>].tool_calls} when a tool call is not answered by a
        tool message right after its assistant message (L{_unanswered}).
    """
    messages = body.get("messages")
    if messages is None:
        raise bad_request(
            "messages is required: a non-empty list of {role, content}",
            param="messages",
            code=MISSING_REQUIRED_PARAMETER,
        )
    if not isinstance(messages, list) or not messages:
        raise bad_request(
            "messages must be a non-empty list of {role, content}",
            param="messages",
            code=EMPTY_ARRAY if isinstance(messages, list) else INVALID_TYPE,
        )
    history: _History | None = None
    anything = False
    for i, message in enumerate(messages):
        if (
            type(message) is dict
            and (history is None or not history.unanswered)
            and message.get("role") in ("user", "system")
            and message.keys().isdisjoint(CHECKED_FIELD_NAMES)
        ):
            content = message.get("content")
            if type(content) is str:
                # Text from the user or the system, the usual message:
                # nothing more to check.
                anything = anything or bool(content)
                continue
        if history is None:
            # Made for the first other message: a request of text from the
            # user and the system alone makes none.
            history = _History(tool_types)
        where = f"messages[{i}]"
        message = _rewritten_message(messages, i, where, history)
        role = message["role"]
        if role != "tool" and history.unanswered:
            raise _unanswered(history.asked_at, history.unanswered)
        if role == "assistant":
            anything = _check_assistant_message(message, where, history) or anything
        elif role == "tool":
            _check_tool_message(message, where, history)
            anything = True
        else:
            anything = _check_user_or_system_message(message, role, where, media_kinds) or anything
    if history is not None and history.unanswered:
        raise _unanswered(history.asked_at, history.unanswered)
    if not anything:
        raise bad_request("messages hold no content: at least one message needs some", param="messages")
    return history is not None and history.carried_ids


def _rewritten_message(messages: list[Any], i: int, where: str, history: _History) -> dict[str, Any]:
    """
    Check C{messages[i]} (at C{where}) is an object with one of L{ROLES}
    and, if any, a string C{name}, and rewrite it in place as every wire
    takes it: C{messages[i]} replaced by a new object (the one sent is not
    changed) without the fields of L{ROLE_FIELDS} set to null that its
    role does not carry (L{_role_fields}); a developer message (OpenAI's
    newer name) as a system message; a legacy function message as the tool
    message answering the legacy call of that name (L{_legacy_result}); an
    assistant message's legacy C{function_call} as its one tool call
    (L{_legacy_call}), the message noted as C{history.legacy_at}.

    @return: C{messages[i]} as rewritten, a message of role system, user,
        assistant or tool.
    @raise APIError: 400 naming C{messages[<i>]}, its C{role}, its
        C{name} or the field its role does not carry.
    """
    sent = messages[i]
    if not isinstance(sent, dict):
        raise bad_request(f"{where} must be an object with role and content", param=where, code=INVALID_TYPE)
    message: dict[str, Any] = sent
    role = message.get("role")
    # A str first: a list or object is unhashable (no set lookup).
    if not isinstance(role, str) or role not in ROLES:
        raise bad_request(
            f"{where}.role must be one of system, user, assistant, tool, developer (got {role!r})",
            param=f"{where}.role",
            code=MISSING_REQUIRED_PARAMETER if role is None else INVALID_VALUE,
        )
    name = message.get("name")
    if name is not None and not isinstance(name, str):
        # OpenAI's participant name: a string (its API refuses another).
        raise bad_request(f"{where}.name must be a string", param=f"{where}.name", code=INVALID_TYPE)
    if not message.keys().isdisjoint(NOT_CARRIED[role]):
        message = messages[i] = _role_fields(message, role, where)
    if role == "developer":
        message = messages[i] = {**message, "role": "system"}
    elif role == "function":
        message = messages[i] = _legacy_result(message, where, history.legacy)
    elif role == "assistant" and message.get("function_call") is not None and message.get("tool_calls") is None:
        # Null is not set: the openai SDK's message.model_dump() of a
        # legacy answer holds "tool_calls": null.
        message = messages[i] = _legacy_call(message, i, where, history.legacy)
        history.legacy_at = where
    return message


def _check_assistant_message(message: dict[str, Any], where: str, history: _History) -> bool:
    """
    Check an assistant message at C{where} (as L{_rewritten_message} gives
    it): OpenAI's C{content} (a string or a list of text and refusal
    parts; null or left out when it carries tool calls or a refusal),
    C{refusal} (a string) and C{tool_calls}
    (L{_check_assistant_tool_calls}), and Moonshot's C{reasoning_content}
    (text, as its answers give it back).  OpenAI's C{audio} (C{{"id": ...}},
    an earlier audio answer kept by OpenAI) in place of content is refused,
    saying to send the answer's transcript as content.

    @return: whether it holds anything (text, a refusal or tool calls).
    @raise APIError: 400 naming the field.
    """
    anything = False
    tool_calls = message.get("tool_calls")
    if tool_calls is not None and message.get("function_call") is not None:
        raise bad_request(
            f"{where}: send tool_calls or the legacy function_call, not both", param=f"{where}.function_call"
        )
    if tool_calls is not None:
        _check_assistant_tool_calls(tool_calls, where, history)
        anything = True
    refusal = message.get("refusal")
    if refusal is not None and not isinstance(refusal, str):
        raise bad_request(f"{where}.refusal must be a string", param=f"{where}.refusal", code=INVALID_TYPE)
    reasoning = message.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        # Moonshot's field, as its answers give it back (text).
        raise bad_request(
            f"{where}.reasoning_content must be a string", param=f"{where}.reasoning_content", code=INVALID_TYPE
        )
    anything = anything or bool(refusal)
    content = message.get("content", ...)
    # OpenAI's assistant message: content may be null (or left out) when it
    # carries tool calls or a refusal.
    if (content is None or content is ...) and (tool_calls or refusal is not None):
        return anything
    if (content is None or content is ...) and message.get("audio") is not None:
        # OpenAI's reference to an earlier audio answer ({"id": ...}), with
        # no content: its words are in OpenAI's keeping, which neither
        # provider can read (nor did either answer it: no audio output).
        raise bad_request(
            f"{where}.audio refers to an earlier audio answer (OpenAI keeps its audio by id), which cannot be "
            "sent back through the gateway: neither of its providers answers with audio or reads such an id; "
            "send that answer's transcript (its audio.transcript) as this message's content, without audio",
            param=f"{where}.audio",
        )
    return _check_content(content, f"{where}.content", ASSISTANT_PARTS) or anything


def _check_assistant_tool_calls(tool_calls: Any, where: str, history: _History) -> None:
    """
    Check the C{tool_calls} of the assistant message at C{where}
    (L{_check_tool_calls}, which notes them in C{history.calls}) and make
    them the calls the tool messages right after it answer
    (C{history.unanswered}).  A 400 for a call rewritten from a legacy
    C{function_call} (L{_rewritten_message}) names that field, the one the
    client sent.

    @raise APIError: 400 naming the field.
    """
    try:
        carried_ids = _check_tool_calls(tool_calls, f"{where}.tool_calls", history.calls, history.tool_types)
    except APIError as e:
        if history.legacy_at != where:
            raise
        if e.param == f"{where}.tool_calls[0].type":
            # A call of a tool of another type (L{_claimed}), whose type
            # the legacy field cannot carry.
            claimed = _claimed(history.tool_types, tool_calls[0]["function"]["name"], where, called=True)
            assert claimed is not None
            raise bad_request(claimed[0].legacy_call_refusal(where), param=f"{where}.function_call.name") from None
        # Name the legacy field the client sent, not its rewrite.
        raise _renamed(e, f"{where}.tool_calls[0].function", f"{where}.function_call") from None
    history.carried_ids = carried_ids or history.carried_ids
    history.unanswered = dict.fromkeys(call["id"] for call in tool_calls)
    history.asked_at = where


def _check_tool_message(message: dict[str, Any], where: str, history: _History) -> None:
    """
    Check a tool message at C{where} (as L{_rewritten_message} gives it):
    its C{tool_call_id} answers one of the calls of the assistant message
    right before it not answered yet (C{history.unanswered}), which it
    takes off; its C{content} is text (a string or a list of text parts).

    @raise APIError: 400 naming its C{tool_call_id} or C{content}.
    """
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise bad_request(f"{where}.tool_call_id must be the id of a tool call", param=f"{where}.tool_call_id")
    if call_id not in history.calls:
        raise bad_request(
            f"{where}.tool_call_id {shortened(call_id, LISTED_CALL_ID_CHARS)!r} matches no tool call of an earlier assistant message",
            param=f"{where}.tool_call_id",
        )
    if call_id not in history.unanswered:
        raise bad_request(
            f"{where}.tool_call_id {shortened(call_id, LISTED_CALL_ID_CHARS)!r} answers no open call: tool messages answer the tool "
            "calls of the assistant message right before them, once each",
            param=f"{where}.tool_call_id",
        )
    del history.unanswered[call_id]
    _check_content(message.get("content", ...), f"{where}.content", TEXT_PARTS, role="tool")


def _check_user_or_system_message(
    message: dict[str, Any], role: str, where: str, media_kinds: MediaKinds = NO_MEDIA_KINDS
) -> bool:
    """
    Check a user or system message (C{role}) at C{where} (as
    L{_rewritten_message} gives it): its C{content} is a string or a list
    of content parts, of L{USER_PARTS} and C{media_kinds}' part types for
    a user (L{MediaKinds.user_parts}), of text for the system.

    @return: whether it holds anything (text or media).
    @raise APIError: 400 naming the content or its part.
    """
    content = message.get("content", ...)
    if isinstance(content, str):
        # Text, the usual case: nothing more to check.
        return bool(content)
    if role != "user":
        return _check_content(content, f"{where}.content", TEXT_PARTS, role=role)
    return _check_content(content, f"{where}.content", media_kinds.user_parts, media_kinds)


def _role_fields(message: dict[str, Any], role: str, where: str) -> dict[str, Any]:
    """
    Refuse a field of L{ROLE_FIELDS} on a role that does not carry it
    (a provider would refuse the whole call); one set to null is dropped.

    @return: C{message}, without those null fields.
    @raise APIError: 400 naming C{messages[i].<field>}.
    """
    for field in NOT_CARRIED[role]:
        if message.get(field) is not None:
            owner = ROLE_FIELDS[field]
            raise bad_request(
                f"{where}.{field} is not allowed on a message of role {role}: only {owner} messages carry {field}; "
                "remove it",
                param=f"{where}.{field}",
            )
    return {k: v for k, v in message.items() if k not in NOT_CARRIED[role]}


def _unanswered(where: str, call_ids: dict[str, None]) -> APIError:
    """
    OpenAI's rule, which Gemini enforces too (a turn of function calls is
    followed by one function response per call): every tool call is
    answered by a tool message right after its assistant message.

    The message names the first L{LISTED_CALL_IDS} of C{call_ids} (each cut
    to L{LISTED_CALL_ID_CHARS} characters) and counts the others.
    """
    listed = ", ".join(repr(shortened(call_id, LISTED_CALL_ID_CHARS)) for call_id in islice(call_ids, LISTED_CALL_IDS))
    if len(call_ids) > LISTED_CALL_IDS:
        listed += f" and {len(call_ids) - LISTED_CALL_IDS} more"
    return bad_request(
        f"{where}.tool_calls: call(s) {listed} have no tool message answering them; "
        "follow an assistant message with tool_calls by one tool message per call",
        param=f"{where}.tool_calls",
    )


def _renamed(error: APIError, old: str, new: str) -> APIError:
    """
    C{error} with the field C{old} named C{new}, in its message and its
    C{param}.
    """
    param = error.param
    if param is not None and param.startswith(old):
        param = new + param[len(old) :]
    return attrs.evolve(error, message=error.message.replace(old, new), param=param)


def _legacy_call(message: dict[str, Any], i: int, where: str, legacy: dict[str, deque[str]]) -> dict[str, Any]:
    call = message["function_call"]
    if not isinstance(call, dict):
        raise bad_request(f"{where}.function_call must be {{name, arguments}}", param=f"{where}.function_call")
    call_id = f"call_legacy_{i}"
    name = call.get("name")
    if isinstance(name, str):
        legacy.setdefault(name, deque()).append(call_id)
    rewritten = {k: v for k, v in message.items() if k != "function_call"}
    rewritten["tool_calls"] = [{"id": call_id, "type": "function", "function": call}]
    return rewritten


def _legacy_result(message: dict[str, Any], where: str, legacy: dict[str, deque[str]]) -> dict[str, Any]:
    name = message.get("name")
    waiting = legacy.get(name) if isinstance(name, str) else None
    if not waiting:
        raise bad_request(
            f"{where} (role function) answers no earlier function_call of that name", param=f"{where}.name"
        )
    return {"role": "tool", "tool_call_id": waiting.popleft(), "content": message.get("content", ...)}


def _check_tool_calls(
    tool_calls: Any, where: str, calls: dict[str, str], tool_types: Mapping[str, ToolType] = NO_TOOL_TYPES
) -> bool:
    """
    Check an assistant message's C{tool_calls}: calls of functions
    (C{"type": "function"}, or no type or null, which becomes it in place)
    named by L{FUNCTION_NAME}'s rule,
    and calls of the other C{tool_types}, named by their own rules
    (L{ToolType.check_call_name}); each with a string id used once in the
    message and string C{arguments} (a blank or missing one becomes
    C{"{}"}, in place), noted in C{calls} (id -> name).

    @return: whether a call's id carries a payload
        (L{openclaw.dataplane.callids.payload}).
    @raise APIError: 400 naming the field.
    """
    if not isinstance(tool_calls, list) or not tool_calls:
        raise bad_request(f"{where} must be a non-empty list of tool calls", param=where)
    carried_ids = False
    #: The ids of this message's calls so far: each may be used once.
    seen: set[str] = set()
    for j, call in enumerate(tool_calls):
        at = f"{where}[{j}]"
        kind = call.get("type") if isinstance(call, dict) else None
        if kind is None and isinstance(call, dict):
            # No type, or null ("not set"): a function's call, so written
            # (in place) for a provider that reads the history as sent, as
            # OpenAI's API requires the field.
            kind = call["type"] = "function"
        # A str first: a list or object is unhashable (no lookup).
        other = tool_types.get(kind) if isinstance(kind, str) and kind != "function" else None
        if not isinstance(call, dict) or (kind != "function" and other is None):
            offers = "".join(f" (or, {t.offered_call})" for t in tool_types.values())
            raise bad_request(f'{at} must be {{"id", "type": "function", "function": {{...}}}}{offers}', param=at)
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise bad_request(f"{at}.id must be a non-empty string", param=f"{at}.id")
        function = call.get("function")
        if not isinstance(function, dict):
            raise bad_request(f"{at}.function must be {{name, arguments}}", param=f"{at}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(f"{at}.function.name must be the function's name", param=f"{at}.function.name")
        claimed = None if other is not None else _claimed(tool_types, name, at, called=True)
        if other is not None:
            other.check_call_name(name, at)
        elif claimed is not None:
            # A client that wrote every call back as "function".
            raise bad_request(claimed[1], param=f"{at}.type")
        elif not FUNCTION_NAME.fullmatch(name):
            # The rule of tools[]: a history is sent on, to whichever provider.
            raise bad_request(
                f"{at}.function.name must be 1 to 64 letters, digits, _ or -, starting with a letter or _ "
                "(a name every provider takes; rename a dotted name such as fs.read to fs_read, in tools too)",
                param=f"{at}.function.name",
            )
        arguments = function.get("arguments")
        if no_arguments(arguments):
            # Moonshot's call of a function without parameters, sent back.
            arguments = function["arguments"] = "{}"
        if not isinstance(arguments, str):
            raise bad_request(
                f"{at}.function.arguments must be a string: the call's arguments as JSON text, as the "
                "answer gave them (json.dumps of the object, not the object itself)",
                param=f"{at}.function.arguments",
            )
        # Arguments that are not a JSON object (a model's answer cut at its
        # token limit, '{"city": "Par') are history all the same: OpenAI
        # takes them as the string they are, and the agent answers the call
        # with the error; Kimi gets them as sent, Gemini as no arguments.
        try:
            parsed = orjson.loads(arguments)
        except orjson.JSONDecodeError as e:
            # orjson reads at most 1024 levels.
            if "depth" in str(e):
                raise value_too_deep(f"{at}.function.arguments") from None
            parsed = None
        if nests_too_deep(parsed):
            raise value_too_deep(f"{at}.function.arguments")
        if call_id in seen:
            raise bad_request(
                f"{at}.id {shortened(call_id, LISTED_CALL_ID_CHARS)!r} is used twice in this message", param=f"{at}.id"
            )
        seen.add(call_id)
        calls[call_id] = name
        carried_ids = carried_ids or payload(call_id) is not None
    return carried_ids


def choice_count(body: dict[str, Any]) -> int:
    """
    How many choices a chat request asks for (OpenAI's C{n}, Gemini's
    C{candidateCount}); 1 when absent or null (OpenAI's default).  Each is
    a completion the provider bills, and answers.
    """
    n = body.get("n")
    return n if type(n) is int and n > 1 else 1


def no_arguments(arguments: object) -> bool:
    """
    Whether a tool call's C{arguments} say nothing: missing, null, or a
    blank string, which Moonshot sends for a function without parameters
    (MoonshotAI/kimi-cli PR #1764) where OpenAI sends C{"{}"}.
    """
    return arguments is None or (isinstance(arguments, str) and not arguments.strip())


def _check_content(
    content: Any,
    where: str,
    allowed: frozenset[str],
    media_kinds: MediaKinds = NO_MEDIA_KINDS,
    role: str | None = None,
) -> bool:
    """
    @param allowed: the part types it may hold.
    @param role: the role of a message whose content is text only (a
        media part there is told to go in a user message).
    @param media_kinds: the declared part types and URL schemes, checked
        by their own rules (L{_check_media}).
    @return: whether the content holds anything (text or media).
    """
    if isinstance(content, str):
        return bool(content)
    if content is ... or content is None:
        raise bad_request(f"{where} is required", param=where)
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of content parts", param=where, code=INVALID_TYPE)
    if not content:
        raise bad_request(f"{where} is an empty list: give a string or at least one content part", param=where)
    anything = False
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise bad_request(
                f'{at} must be a content part, an object such as {{"type": "text", "text": ...}}', param=at
            )
        kind = part.get("type")
        # A str first: a list or object is unhashable (no set lookup).
        if not isinstance(kind, str) or kind not in allowed:
            kinds = ", ".join(sorted(allowed))
            if kind is None:
                raise bad_request(f"{at} has no type: give its type, one of {kinds}", param=f"{at}.type")
            if role is not None and kind in USER_PARTS:
                # OpenAI's own rule: media go in user messages only.
                raise bad_request(
                    f"{at}.type is {kind!r}, but a {role} message holds text parts only in OpenAI's format: send "
                    f"the {kind} part in a user message after it",
                    param=f"{at}.type",
                )
            raise bad_request(
                f"{at}.type must be one of {kinds} here, the part types the gateway carries (got {kind!r})",
                param=f"{at}.type",
            )
        if kind in ("text", "refusal"):
            text = part.get(kind)
            if not isinstance(text, str):
                raise bad_request(f"{at}.{kind} must be a string", param=f"{at}.{kind}", code=INVALID_TYPE)
            anything = anything or bool(text)
            continue
        anything = True
        _check_media(part, kind, at, media_kinds)
    return anything


def is_base64(data: str) -> bool:
    """
    Whether C{data} is base64 as RFC 4648 section 4 has it: its alphabet
    only, padded to whole groups of four, C{=} only at the end of the last
    one (at most two).  Checked by the standard library's strict decoder
    (C{binascii.a2b_base64(strict_mode=True)}), which alone would also
    take padding past the data (C{"QUJD=="}).
    """
    if len(data) % 4 or data.endswith("==="):
        return False
    try:
        binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        # ValueError: a str with characters past ASCII.
        return False
    return True


def checked_data_url(url: str) -> str | None:
    """
    C{url} if it is a C{data:<type>;base64,<data>} URL whose data is
    base64 (RFC 2397, RFC 4648); its data without line breaks if it was
    wrapped in lines (as C{base64} and MIME write it: RFC 2045 section 6.8
    has decoders ignore them, which a provider may not); else L{None}:
    anything else would reach the provider as garbage.
    """
    head = DATA_URL.match(url)
    if head is None or len(url) <= head.end():
        return None
    if is_base64(url[head.end() :]):
        return url
    data = _unwrapped(url[head.end() :])
    return None if data is None else url[: head.end()] + data


def _unwrapped(data: str) -> str | None:
    """
    Base64 C{data} wrapped in lines, without its line breaks (and the
    spaces, tabs and carriage returns at each line's ends); L{None} if it
    is not base64 then either.  In time linear in its length: no regular
    expression (one that searched for spaces around a line break took
    time in the square of a run of spaces without one).
    """
    if "\n" not in data:
        return None
    data = "".join(line.strip(" \t\r") for line in data.split("\n"))
    return data if data and is_base64(data) else None


def is_image_url(url: str) -> bool:
    """
    Whether C{url} starts with one of L{IMAGE_URL_SCHEMES}, in any case.
    """
    return url[:8].lower().startswith(IMAGE_URL_SCHEMES)


def not_data_url(value: object, where: str, wanted: str) -> APIError:
    """
    The 400 for C{value} at C{where}, not a data URL L{checked_data_url} takes:
    one whose head is a data URL's but whose data is not base64 is told
    so (the rest of the rule would not say what is wrong); else C{where}
    and C{wanted}.
    """
    if isinstance(value, str) and DATA_URL.match(value) is not None:
        return bad_request(
            f"{where} is a data URL whose data is not base64 (RFC 4648: A-Z, a-z, 0-9, + and /, padded with = to "
            "a multiple of 4 characters; lines may be wrapped); encode the data again",
            param=where,
        )
    return bad_request(f"{where} {wanted}", param=where)


def _check_media(part: dict[str, Any], kind: str, at: str, media_kinds: MediaKinds = NO_MEDIA_KINDS) -> None:
    """
    Check a media part of a user message (C{kind}: C{image_url},
    C{input_audio}, C{file}, or one of C{media_kinds}' part types, by its
    own rules, L{PartType.check}) at C{at}; a data URL wrapped in lines is
    unwrapped in place (L{checked_data_url}).  An image URL of one of
    C{media_kinds}' schemes is checked by its rules
    (L{UrlScheme.check_url}).  Whether the provider the call goes to takes
    a part type or a scheme beside OpenAI's is its wire's to say
    (L{refuse_media_kinds <openclaw.providers.wire.refuse_media_kinds>}).

    @raise APIError: 400 naming the field that is not of its shape.
    """
    value = part.get(kind)
    if not isinstance(value, dict):
        raise bad_request(f"{at}.{kind} must be an object", param=f"{at}.{kind}", code=INVALID_TYPE)
    declared = media_kinds.part_types.get(kind)
    if declared is not None:
        declared.check(value, f"{at}.{kind}")
        return
    if kind == "image_url":
        url = value.get("url")
        where = f"{at}.{kind}.url"
        scheme = media_kinds.scheme_of(url) if isinstance(url, str) else None
        if scheme is not None:
            assert isinstance(url, str)
            scheme.check_url(url, where)
        elif isinstance(url, str) and is_image_url(url):
            _check_image_url(url, where)
        else:
            data_url = checked_data_url(url) if isinstance(url, str) else None
            if data_url is None:
                raise not_data_url(
                    url, where, f"must be {media_kinds.image_url_forms}; the gateway takes no other kind of URL here"
                )
            value["url"] = data_url
    if kind == "image_url":
        detail = value.get("detail")
        if detail is not None and (not isinstance(detail, str) or detail not in IMAGE_DETAILS):
            raise bad_request(f"{at}.image_url.detail must be auto, low or high", param=f"{at}.image_url.detail")
    elif kind == "input_audio":
        data = value.get("data")
        if isinstance(data, str) and data and not is_base64(data):
            data = value["data"] = _unwrapped(data)
        if not isinstance(data, str) or not data:
            raise bad_request(f"{at}.input_audio.data must be base64 audio", param=f"{at}.input_audio.data")
        if not isinstance(value.get("format"), str) or not value["format"].isalnum():
            raise bad_request(
                f"{at}.input_audio.format must name the format, such as wav or mp3", param=f"{at}.input_audio.format"
            )
    elif kind == "file":
        data = value.get("file_data")
        data_url = checked_data_url(data) if isinstance(data, str) else None
        if data_url is not None:
            value["file_data"] = data_url
        else:
            raise not_data_url(
                data,
                f"{at}.file.file_data",
                "must be a base64 data URL (data:application/pdf;base64,...); "
                "uploaded file ids are not supported by this gateway",
            )
        if value.get("filename") is not None and not isinstance(value["filename"], str):
            raise bad_request(f"{at}.file.filename must be a string", param=f"{at}.file.filename", code=INVALID_TYPE)


def _check_image_url(url: str, where: str) -> None:
    """
    Refuse an image URL (C{http(s)://}, C{gs://}) that does not parse
    (C{https://[x/a.png}: an unclosed IPv6 literal) or that carries a user
    name or password (RFC 3986 section 3.2.1's userinfo,
    C{https://user:pass@host/...}): the provider fetches the image, so the
    credential would be passed on to it.  The URL is not quoted back.

    A C{gs://} URL's bucket is not asked for: the Gemini API reads no Cloud
    Storage URL, whatever follows C{gs://}, and says so itself
    (L{openclaw.providers.gemini.translate.cloud_storage_refused}), not
    that an https:// host is missing; Kimi and other OpenAI-shaped
    providers get it as sent, as any C{gs://} URL, to judge.

    @raise APIError: 400 naming C{where}.
    """
    if " " in url or not url.isprintable() or INVISIBLE_PRINTABLE.search(url):
        raise bad_request(
            f"{where} holds a space, a control or an invisible character (such as U+2028, U+200B or U+3164), which no "
            "URL holds (RFC 3986 section 2): percent-encode it (a space is %20)",
            param=where,
        )
    try:
        parts = urlsplit(url)
        authority, host = parts.netloc, parts.hostname
    except ValueError:
        # Not quoted: Python's message may quote the host, userinfo and all.
        raise bad_request(
            f"{where} is not a valid URL (its host part does not parse: an unclosed [ of an IPv6 address, "
            "or characters a host cannot hold); fix the URL",
            param=where,
        ) from None
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        # Past 65535, not a number, or 0.
        raise bad_request(f"{where} has a port that is not a number from 1 to 65535; fix the URL", param=where)
    if not host and parts.scheme.lower() != "gs":
        raise bad_request(f"{where} has no host (https://host/path); fix the URL", param=where)
    if "\\" in authority:
        # WHATWG URL parsers (browsers, and some fetchers) read it as "/":
        # the host would not be the one this one reads.
        raise bad_request(f"{where} holds a backslash before its path; write / or %5C", param=where)
    if "@" in authority:
        raise bad_request(
            f"{where} carries a user name or password (user:pass@host), which the gateway would pass on to the "
            "provider that fetches the image: remove it from the URL (make the image readable without it, or "
            "send it as a base64 data URL)",
            param=where,
        )


def _check_response_format(response_format: Any) -> None:
    if response_format is None:
        return
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if not isinstance(kind, str) or kind not in RESPONSE_FORMATS:
        raise bad_request(
            "response_format.type must be text, json_object or json_schema",
            param="response_format.type",
            code=INVALID_VALUE,
        )
    if kind != "json_schema":
        return
    assert isinstance(response_format, dict)
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request(
            'response_format.json_schema must be {"name": ..., "schema": {...}}',
            param="response_format.json_schema",
            code=MISSING_REQUIRED_PARAMETER if spec is None else INVALID_TYPE,
        )
    name = spec.get("name")
    if name is None:
        raise bad_request(
            "response_format.json_schema.name is required: 1 to 64 letters, digits, _ or - (OpenAI's rule)",
            param="response_format.json_schema.name",
            code=MISSING_REQUIRED_PARAMETER,
        )
    if not isinstance(name, str) or not SCHEMA_NAME.fullmatch(name):
        raise bad_request(
            "response_format.json_schema.name must be 1 to 64 letters, digits, _ or - (OpenAI's rule)",
            param="response_format.json_schema.name",
            code=None if isinstance(name, str) else INVALID_TYPE,
        )
    if spec.get("schema") is not None and not isinstance(spec["schema"], dict):
        raise bad_request(
            "response_format.json_schema.schema must be a JSON Schema object",
            param="response_format.json_schema.schema",
        )
    # As a function tool's (agent trial s45: a strict of "yes" went on to
    # Kimi as written, and Gemini dropped a description of 5).
    _bool("response_format.json_schema.strict", spec.get("strict"))
    string_field("response_format.json_schema.description", spec.get("description"))
    if nests_too_deep(spec.get("schema")):
        raise value_too_deep("response_format.json_schema.schema")


def _check_stop(stop: Any) -> None:
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request("stop must be a string or a list of strings", param="stop", code=INVALID_TYPE)


def choose_route(model: Any, active: Route, provider_ids: tuple[str, ...]) -> Route:
    """
    The route for one call: C{"<provider>/<model>"} picks that provider and
    model for this call only (the provider's id in any letter case, space
    around the whole ignored: C{" Kimi/moonshot-v1-8k"} is Kimi's);
    anything else (a bare model name, nothing) means the active route, so
    an application's hard-coded model never overrides the operator's
    choice.

    @raise APIError: 400 for C{"kimi/"} with no model after the slash.
    """
    if isinstance(model, str):
        named, slash, name = model.strip().partition("/")
        provider_id = named.lower()
        if slash and provider_id in provider_ids:
            if not name.strip():
                raise bad_request(f"model {model!r} names no model; use {provider_id}/<model>", param="model")
            return Route(provider_id, name.strip())
        if slash:
            refuse_misspelled_provider(model, provider_id, name, provider_ids)
    return active


def refuse_misspelled_provider(model: str, prefix: str, name: str, provider_ids: Iterable[str]) -> None:
    """
    Refuse a C{model} whose C{prefix} before its slash (in lower case) is
    a provider's id misspelled (C{gemeni/...}): plainly meant to pick a
    model, it would be the active route's.  Another prefix (C{openai/},
    OpenRouter's C{google/}) is a hard-coded name, ignored as any other.

    @raise APIError: 400 naming C{model}, saying what was meant.
    """
    close = meant(prefix, provider_ids)
    # A letter wrong, missing, added or swapped: not a shorter or longer
    # word that contains the id's letters (mini/..., gemini's).
    if close is not None and abs(len(close) - len(prefix)) <= 1:
        raise bad_request(
            f"model {shortened(model, 80)!r} names no provider of this gateway: did you mean "
            f"{close}/{shortened(name.strip(), 64)}? (a model of another form is not looked at: the call goes "
            "to the active provider and model)",
            param="model",
        )
