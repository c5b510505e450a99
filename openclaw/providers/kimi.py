"""
Kimi, by Moonshot AI: an OpenAI-compatible API
(U{https://platform.moonshot.ai/docs}), with Moonshot's built-in tools
(L{MoonshotBuiltinTools}), its C{video_url} content part
(L{MoonshotVideo}) and its C{ms://} file URLs (L{MoonshotFiles}), which
only Kimi takes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial
from types import MappingProxyType
from typing import Any, ClassVar

import attrs
import orjson

from openclaw.consumers.estimate import token_count
from openclaw.consumers.prices import Price
from openclaw.dataplane.errors import CONTEXT_LENGTH_EXCEEDED, APIError, bad_request
from openclaw.dataplane.request import DATA_URL, checked_data_url, not_data_url
from openclaw.providers.errors import Refusal, RefusalKind
from openclaw.providers.jsonschema import NodeRewrite, rewrite, rewrite_subschemas
from openclaw.providers.openai_compatible import OpenAICompatibleAdapter, ReasoningKeptWire
from openclaw.providers.wire import SHOWN_TYPE_CHARS, ImageTypes, Wire
from openclaw.shorten import shortened

#: The type of Moonshot's built-in tools, which Kimi runs itself
#: (U{https://platform.moonshot.ai/docs/guide/use-web-search}): declared as
#: C{{"type": "builtin_function", "function": {"name": "$web_search"}}}
#: (the name alone), and called by Kimi with a tool call of that type,
#: whose C{arguments} the client sends back unchanged as the tool
#: message's content.
BUILTIN_FUNCTION = "builtin_function"
#: A built-in tool's name: Moonshot's start with "$" ("$web_search"), then
#: the rule of L{FUNCTION_NAME <openclaw.dataplane.request.FUNCTION_NAME>}.
BUILTIN_NAME = re.compile(r"\$[A-Za-z_][A-Za-z0-9_\-]{0,63}")
#: The documented declaration of one, for the 400 that refuses another shape.
BUILTIN_SHAPE = '{"type": "builtin_function", "function": {"name": "$web_search"}}'

#: The image formats Moonshot's vision guide lists
#: (U{https://platform.moonshot.ai/docs/guide/use-kimi-vision-model},
#: "Supported Formats": png, jpeg, webp, gif), each also as C{image/jpg}
#: (a common misspelling) and with a leading dot (C{image/.png}): the
#: guide's own example builds its data URL as
#: C{f"data:image/{os.path.splitext(image_path)[1]};base64,..."}, whose
#: extension keeps its dot, so an agent written from it sends that.
MOONSHOT_IMAGE_SUBTYPES = frozenset({"png", "jpeg", "jpg", "webp", "gif"})
MOONSHOT_IMAGE_TYPES = ImageTypes(
    MOONSHOT_IMAGE_SUBTYPES | {"." + subtype for subtype in MOONSHOT_IMAGE_SUBTYPES},
    "PNG, JPEG, WEBP or GIF",
    "Kimi takes (Moonshot's vision guide)",
)


#: Moonshot's own URL of a file uploaded to it (C{POST /v1/files} with
#: purpose C{image} or C{video}), "ms" for Moonshot storage: the C{url} of
#: an C{image_url} or C{video_url} part, for Kimi's vision models
#: (U{https://platform.moonshot.ai/docs/guide/use-kimi-vision-model}; its
#: chat reference: "The url field of image_url and video_url supports
#: base64 format and ms://<file_id> format").  A file id is letters,
#: digits, C{-} and C{_} (Moonshot's are 20 lowercase letters and digits).
MOONSHOT_FILE_URL = re.compile(r"ms://[A-Za-z0-9_-]{1,128}", re.ASCII)
#: What a C{video_url}'s C{url} may be (Moonshot's forms), as a 400 says it.
VIDEO_URL_FORMS = (
    "a base64 data URL (data:video/mp4;base64,...) or ms://<file_id> (a video uploaded to Moonshot), the forms "
    "Moonshot documents for Kimi's vision models"
)
#: The video formats Moonshot's vision guide lists
#: (U{https://platform.moonshot.ai/docs/guide/use-kimi-vision-model}), as
#: a 400 names them: a C{video_url}'s data URL is of a C{video/*} type.
VIDEO_FORMATS = "Moonshot's vision guide lists mp4, mpeg, mov, avi, x-flv, mpg, webm, wmv and 3gpp"
#: Who takes Moonshot's media inputs, as a 400 says "which only ... take".
KIMI_VISION = "Kimi's vision models"


@attrs.frozen
class MoonshotFiles:
    """
    Moonshot's C{ms://<file_id>} URLs (L{MOONSHOT_FILE_URL}), the URL
    scheme Kimi's wire takes beside OpenAI's
    (L{UrlScheme <openclaw.dataplane.request.UrlScheme>}): in an
    C{image_url} part, and in Moonshot's C{video_url} part
    (L{MoonshotVideo}).  A provider that does not take them refuses them
    by the wire's rule
    (L{refuse_media_kinds <openclaw.providers.wire.refuse_media_kinds>}).
    """

    name: ClassVar[str] = "ms"
    described: ClassVar[str] = "an ms:// URL (a file uploaded to Moonshot)"
    taken_by: ClassVar[str] = KIMI_VISION
    instead: ClassVar[str] = "give an image as a base64 data URL or an https:// URL"
    offered: ClassVar[str] = "for a kimi model, ms://<file_id> (an image uploaded to Moonshot)"

    def check_url(self, url: str, where: str) -> None:
        """
        An C{ms://<file_id>} URL as Moonshot writes it
        (L{MOONSHOT_FILE_URL}: C{ms://} in lower case).

        @raise APIError: 400 naming C{where}.
        """
        if not MOONSHOT_FILE_URL.fullmatch(url):
            raise bad_request(
                f"{where} is not ms://<file_id>, Moonshot's URL of an uploaded file (ms:// in lower case, as "
                "Moonshot writes it; the file id letters, digits, - and _); give the id Moonshot's POST /v1/files "
                "answered",
                param=where,
            )


@attrs.frozen
class MoonshotVideo:
    """
    Moonshot's C{video_url} content part,
    C{{"type": "video_url", "video_url": {"url": ...}}}, the part type
    Kimi's wire takes beside OpenAI's
    (L{PartType <openclaw.dataplane.request.PartType>}): its C{url} a
    base64 data URL of a video, or an C{ms://<file_id>} (L{MoonshotFiles})
    (U{https://platform.moonshot.ai/docs/guide/use-kimi-vision-model}).
    A provider that does not take it refuses it by the wire's rule
    (L{refuse_media_kinds <openclaw.providers.wire.refuse_media_kinds>}).
    """

    name: ClassVar[str] = "video_url"
    described: ClassVar[str] = "a video_url part (Moonshot's video input)"
    taken_by: ClassVar[str] = KIMI_VISION
    instead: ClassVar[str] = "leave videos out"

    def check(self, value: dict[str, Any], where: str) -> None:
        """
        C{value}, the part's C{video_url} at C{where}: its C{url} an
        C{ms://<file_id>} (L{MoonshotFiles.check_url}) or a base64 data
        URL (unwrapped in place,
        L{checked_data_url <openclaw.dataplane.request.checked_data_url>})
        of a video's type (C{video/*}, in any case): Moonshot's vision
        guide takes videos of its formats there (L{VIDEO_FORMATS}), images
        in C{image_url} parts.  A media type is named back, clipped.

        @raise APIError: 400 naming C{<where>.url}.
        """
        url = value.get("url")
        at = f"{where}.url"
        if isinstance(url, str) and url[:3].lower() == "ms:":
            MoonshotFiles().check_url(url, at)
            return
        data_url = checked_data_url(url) if isinstance(url, str) else None
        if data_url is None:
            raise not_data_url(url, at, f"must be {VIDEO_URL_FORMS}; the gateway takes no other kind of URL here")
        head = DATA_URL.match(data_url)
        assert head is not None
        media_type = head.group(1)
        if media_type[:6].lower() != "video/":
            shown = shortened(media_type, SHOWN_TYPE_CHARS)
            raise bad_request(
                f"{at} is a data URL of {shown!r}, not a video: a video_url part takes a video "
                f"({VIDEO_FORMATS}, as data:video/mp4;base64,...); send an image in an image_url part, other files "
                "in a file part",
                param=at,
            )
        value["url"] = data_url


@attrs.frozen
class MoonshotBuiltinTools:
    """
    Moonshot's built-in tools (L{BUILTIN_FUNCTION}), the tool type Kimi's
    wire takes beside functions
    (L{ToolType <openclaw.dataplane.request.ToolType>}): a declaration in
    the shape Moonshot documents (L{BUILTIN_SHAPE}), a call named by
    L{BUILTIN_NAME}, as Kimi answered it; a function named so is one
    declared (or sent back) with the wrong type.  A provider that does not
    take them refuses them by the wire's rule
    (L{refuse_tool_types <openclaw.providers.wire.refuse_tool_types>}).
    """

    name: ClassVar[str] = BUILTIN_FUNCTION
    described: ClassVar[str] = "one of Moonshot's built-in tools"
    offered: ClassVar[str] = f"for a kimi model, one of Moonshot's built-in tools: {BUILTIN_SHAPE}"
    offered_call: ClassVar[str] = (
        'for a kimi model, a call of one of Moonshot\'s built-in tools, "type": "builtin_function", as Kimi answered it'
    )

    def check_declaration(self, tool: dict[str, Any], where: str) -> str:
        """
        A declaration in the shape Moonshot documents
        (U{https://platform.moonshot.ai/docs/guide/use-web-search}):
        L{BUILTIN_SHAPE}, a name of L{BUILTIN_NAME} and nothing else
        (Moonshot describes its tools itself).

        @return: the tool's name.
        @raise APIError: 400 naming the field that is not of that shape.
        """
        for field in tool:
            if field not in ("type", "function"):
                raise bad_request(
                    f"{where}.{field} is not part of a built-in tool's declaration: Moonshot's is {BUILTIN_SHAPE}; "
                    f"remove {field}",
                    param=f"{where}.{field}",
                )
        function = tool.get("function")
        if not isinstance(function, dict):
            raise bad_request(
                f"{where}.function must be an object with the built-in tool's name: {BUILTIN_SHAPE}",
                param=f"{where}.function",
            )
        name = function.get("name")
        if not isinstance(name, str) or not BUILTIN_NAME.fullmatch(name):
            raise _not_builtin(f"{where}.function.name", BUILTIN_SHAPE)
        for field in function:
            if field != "name":
                raise bad_request(
                    f"{where}.function.{field} is not part of a built-in tool's declaration (Moonshot describes "
                    f"its built-in tools itself): send {BUILTIN_SHAPE}, the name alone",
                    param=f"{where}.function.{field}",
                )
        return name

    def check_call_name(self, name: str, at: str) -> None:
        """
        A call's name in a history must be one of L{BUILTIN_NAME}, as Kimi
        answered it.

        @raise APIError: 400 naming C{<at>.function.name}.
        """
        if not BUILTIN_NAME.fullmatch(name):
            raise _not_builtin(f"{at}.function.name", "send the call back as Kimi answered it")

    def function_refusal(self, name: str, at: str, called: bool) -> str | None:
        """
        The 400's message for a function named as a built-in tool is
        (L{BUILTIN_NAME}): declare it, or send its call back, with
        C{"type": "builtin_function"}; None for any other name.
        """
        if not BUILTIN_NAME.fullmatch(name):
            return None
        if called:
            return (
                f"{at}.function.name {name!r} is one of Moonshot's built-in tools: send its call back with "
                '"type": "builtin_function", as Kimi answered it'
            )
        return (
            f"{at}.name {name!r} is one of Moonshot's built-in tools, not a function: declare it as "
            f"{BUILTIN_SHAPE} (for a kimi model)"
        )

    def legacy_call_refusal(self, at: str) -> str:
        """
        The 400's message for a legacy C{function_call} naming a built-in
        tool: its call goes back in C{tool_calls}, with its type.
        """
        return (
            f"{at}.function_call names one of Moonshot's built-in tools: send its call back in "
            'tool_calls with "type": "builtin_function", as Kimi answered it'
        )


def _not_builtin(where: str, advice: str) -> APIError:
    """
    The 400 for a name at C{where} that should name one of Moonshot's
    built-in tools (L{BUILTIN_NAME}) and does not.
    """
    return bad_request(
        f"{where} must name one of Moonshot's built-in tools, which start with $ (such as $web_search): {advice}",
        param=where,
    )


def moonshot_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """
    A Kimi answer's C{usage} as OpenAI's clients read it: Moonshot counts
    the prompt tokens its context cache served in a top-level
    C{cached_tokens} (platform.moonshot.ai/docs, context caching; the
    moonshot-v1 and Kimi K2.5 answers quoted in openclaw/openclaw pull
    request 25436 carry it, K2.5's with OpenAI's field too, the same
    count), where OpenAI's is C{prompt_tokens_details.cached_tokens}
    (U{https://platform.openai.com/docs/api-reference/chat/object}), which
    the openai SDK reads and Gemini's answers through the gateway carry.
    That count (a whole number from 0, L{token_count
    <openclaw.consumers.estimate.token_count>}: C{80.0} is 80) is also
    given there; Moonshot's own field stays.  A C{prompt_tokens_details}
    the provider sent is not overwritten: one that is an object without a
    C{cached_tokens} gets it, one that has it (or is not an object) is
    left as it is; null is not sent.

    @return: C{usage} itself when nothing is added, else a new object.
    """
    cached = token_count(usage.get("cached_tokens"))
    details = usage.get("prompt_tokens_details")
    if cached is None or (details is not None and (not isinstance(details, dict) or "cached_tokens" in details)):
        return usage
    return {**usage, "prompt_tokens_details": {**(details or {}), "cached_tokens": cached}}


def thinks(model: str) -> bool:
    """
    Whether C{model} is one of Kimi's own models (C{kimi-*}), which read
    C{reasoning_content} in a history: the thinking ones (C{kimi-k2.5} and
    later, C{kimi-k2-thinking}) require it on an assistant message with
    tool calls ("thinking is enabled but reasoning_content is missing in
    assistant tool call message at index N"), the others
    (C{kimi-k2-0905-preview}) take it; not the C{moonshot-v1-*} models.
    """
    return model[:5].lower() == "kimi-"


#: How Moonshot says a prompt is longer than the model's context window:
#: a 400 C{invalid_request_error} "Invalid request: Your request exceeded
#: model token limit: 262144 (requested: 269030)", and, from its v1
#: models, "model max length exceeded, max length:8192" (as its users
#: quote them: MoonshotAI/kimi-cli#2011, MoonshotAI-Cookbook#18).
MOONSHOT_CONTEXT_EXCEEDED = re.compile(r"exceeded model token limit|model max length exceeded", re.IGNORECASE)
#: How Moonshot's thinking models refuse a forced C{tool_choice}: "tool_choice
#: 'required' is incompatible with thinking enabled", "tool_choice
#: 'specified' is ..." (as its users quote them: can1357/oh-my-pi#827,
#: #1077; UKGovernmentBEIS/inspect_ai#5152).
MOONSHOT_FORCED_TOOL_CHOICE = re.compile(r"tool_choice\b.*\bincompatible with thinking", re.IGNORECASE)
#: Moonshot's refusal of a tool's C{parameters} its validator does not take
#: ("tools.function.parameters is not a valid moonshot flavored json
#: schema, details: <At path 'properties.task': type is not defined>"):
#: Moonshot checks them against a subset of JSON Schema of its own
#: ("Moonshot flavored JSON schema", MFJS).
MOONSHOT_TOOL_SCHEMA = re.compile(r"moonshot flavored json schema|tools\.function\.parameters", re.IGNORECASE)
#: What to do about such a refusal (the shapes public reports show
#: Moonshot refusing: MoonshotAI/kimi-cli #2531, #2061; vercel/ai #18921).
TOOL_SCHEMA_ADVICE = (
    "Moonshot checks a tool's parameters against its own subset of JSON Schema: give every property a type (a "
    'property given as true or {} has none), make the parameters an object ("type": "object"), keep a $ref local '
    "(#/$defs/...); at the root, no anyOf (Moonshot refuses a type beside it, and some "
    "of its models a root without one): give the alternatives as properties, or as tools of their own.  The "
    "gateway already moves a type given beside a nested anyOf into its branches (not when it shares no type "
    "with any of them: such a property admits no value; fix its types), a $ref's siblings beside an allOf of "
    'it, an items list into prefixItems and definitions into $defs, and gives a root without a type "object".  '
    "A schema Gemini took may be refused here"
)
#: How a draft 7 reference to one of the root's C{definitions} begins,
#: and the same under 2020-12's C{$defs}, the only one Moonshot takes.
_DEFINITIONS_REF = "#/definitions/"
_DEFS_REF = "#/$defs/"
#: What may stand beside a C{$ref} as it is: Moonshot takes a
#: C{description} there (lidge-jun/opencodex #2677: seven such nodes of
#: one schema went through), and refuses a C{type} ("when using $ref,
#: type should be defined in the referenced schema instead of the parent
#: schema", the same report).
_BESIDE_REF = frozenset({"$ref", "description"})
#: What may tell a schema's parameters need no rewriting: none of these in
#: their JSON (orjson writes no spaces), only the root's type to check.
_REWRITTEN = (b'"anyOf"', b'"items":[', b'"definitions"', b'"$ref"')


def _renamed(reference: str) -> str:
    """
    A reference to the root's C{definitions} (draft 7) as the same under
    C{$defs}; any other as it is.
    """
    if reference.startswith(_DEFINITIONS_REF):
        return _DEFS_REF + reference[len(_DEFINITIONS_REF) :]
    return reference


def _reference_in_all_of(node: dict[str, Any], reference: str) -> dict[str, Any] | None:
    """
    C{node} with its C{$ref} (as C{reference}) moved into its C{allOf}, an
    C{allOf} of one when it has none: the same constraint (2020-12
    section 10.2.1.1), and draft 7's idiom for it (farion1231/cc-switch
    #6863, checked against Moonshot's API).  None when its C{allOf} is
    not a list: left for Moonshot to refuse in its own words.  Adds at
    most two levels of nesting, at a leaf (what the request's depth
    limit leaves room for: L{MAX_VALUE_DEPTH
    <openclaw.dataplane.request.MAX_VALUE_DEPTH>} and the four levels of
    a body around C{parameters}).
    """
    before = node.get("allOf", [])
    if not isinstance(before, list):
        return None
    moved = {key: value for key, value in node.items() if key != "$ref"}
    moved["allOf"] = [*before, {"$ref": reference}]
    return moved


def _moonshot_node(node: dict[str, Any], rename_definitions: bool = False) -> dict[str, Any]:
    """
    One schema node (not a tool's root) as Moonshot's validator takes it,
    the same meaning (L{moonshot_schema}); C{rename_definitions}: its
    C{$ref} to the root's C{definitions} names the same schema under
    C{$defs}.
    """
    reference = node.get("$ref")
    if isinstance(reference, str):
        renamed = _renamed(reference) if rename_definitions else reference
        if not node.keys() <= _BESIDE_REF:
            # Its siblings stay, the reference goes beside them.
            node = _reference_in_all_of(node, renamed) or node
        elif renamed is not reference:
            node = {**node, "$ref": renamed}
    changed: dict[str, Any] = {}
    dropped: set[str] = set()
    items = node.get("items")
    if isinstance(items, list):
        # Draft 4-2019's tuple, as 2020-12 writes it (Moonshot: "items
        # must be an object"; vercel/ai #18921).
        before = node.get("prefixItems")
        prefix = [*(before if isinstance(before, list) else ()), *items]
        if prefix:
            changed["prefixItems"] = prefix
        else:
            # An empty tuple: 2020-12's prefixItems must not be empty
            # (recheck s45); additionalItems below says it all.
            dropped.add("prefixItems")
        dropped.add("items")
        # 2020-12 reads no additionalItems beside prefixItems (left, the
        # tuple admitted any items past its own: agent trial s45): it
        # goes as 2020-12 says it, false as a maxItems (items: false is
        # a boolean schema, which Moonshot refuses), a schema as items.
        extra = node.get("additionalItems")
        if extra is False:
            limit = node.get("maxItems")
            if isinstance(limit, int | float) and not isinstance(limit, bool):
                changed["maxItems"] = min(limit, len(prefix))
            else:
                changed["maxItems"] = len(prefix)
            dropped.add("additionalItems")
        elif isinstance(extra, dict):
            changed["items"] = extra
            dropped.discard("items")
            dropped.add("additionalItems")
        elif extra is True:
            dropped.add("additionalItems")
    kind, branches = node.get("type"), node.get("anyOf")
    if isinstance(kind, (str, list)) and isinstance(branches, list):
        # Moonshot: "when using anyOf, type should be defined in anyOf
        # items instead of the parent schema" (MoonshotAI/kimi-cli #2531).
        # A $ref branch takes it beside an allOf of its reference (Moonshot
        # refuses a type beside a $ref); true admits what the type admits.
        # A branch whose own type shares none with it admits nothing
        # there and is left out; when every branch is, the node is left
        # as written (it admits nothing: Moonshot may judge it).
        typed = [_typed_branch(branch, kind) for branch in branches]
        kept_branches = [branch for branch in typed if branch is not _ADMITS_NOTHING]
        if kept_branches:
            changed["anyOf"] = kept_branches
            dropped.add("type")
    if not changed and not dropped:
        return node
    return {key: value for key, value in {**node, **changed}.items() if key not in dropped}


#: What L{_typed_branch} gives for a branch that admits no value of the
#: C{type} beside its C{anyOf}.
_ADMITS_NOTHING = object()


def _typed_branch(branch: Any, kind: str | list[Any]) -> Any:
    """
    A branch of an C{anyOf} with the C{type} that stood beside the
    C{anyOf} (C{kind}): a branch of its own type keeps the types both
    admit, L{_ADMITS_NOTHING} when they share none; a branch that is an
    C{anyOf} itself passes it on to its own branches; C{true} becomes
    that type alone, a C{$ref} (alone or with its C{description}) goes
    into an C{allOf} of one beside it.
    """
    if branch is True:
        return {"type": kind}
    if not isinstance(branch, dict):
        return branch
    own = branch.get("type")
    if own is not None:
        common = _common_types(kind, own)
        if common is None or common == own:
            return branch
        if not common:
            return _ADMITS_NOTHING
        return {**branch, "type": common}
    nested = branch.get("anyOf")
    if isinstance(nested, list):
        # An anyOf of its own: the type goes into its branches, as
        # Moonshot refuses it beside that anyOf too (agent trial s45).
        inner = [_typed_branch(item, kind) for item in nested]
        kept = [item for item in inner if item is not _ADMITS_NOTHING]
        return {**branch, "anyOf": kept} if kept else _ADMITS_NOTHING
    reference = branch.get("$ref")
    if isinstance(reference, str):
        # Its other siblings moved it into an allOf already (_moonshot_node).
        moved = _reference_in_all_of(branch, reference)
        return branch if moved is None else {"type": kind, **moved}
    return {"type": kind, **branch}


def _common_types(outer: Any, inner: Any) -> str | list[str] | None:
    """
    The types a value of both C{outer} and C{inner} (each a JSON Schema
    C{type}: a name or a list of them) may have ("integer" is a
    "number"), as C{inner} writes them: C{inner} itself when all its
    types are among C{outer}'s, a name when one is common, else a list
    (empty when none is); None when they are not names.
    """
    outer_types = [outer] if isinstance(outer, str) else outer
    inner_types = [inner] if isinstance(inner, str) else inner
    if not isinstance(inner_types, list) or not all(isinstance(t, str) for t in (*outer_types, *inner_types)):
        return None
    common: list[str] = []
    for name in inner_types:
        if name in outer_types or (name == "integer" and "number" in outer_types):
            kept = name
        elif name == "number" and "integer" in outer_types:
            kept = "integer"
        else:
            continue
        if kept not in common:
            # Each name once (2020-12 section 6.1.1): a number branch and
            # an integer one under an integer type are one integer.
            common.append(kept)
    if common == inner_types:
        return inner_types[0] if isinstance(inner, str) else inner_types
    return common[0] if len(common) == 1 else common


def moonshot_schema(schema: Any) -> Any:
    """
    A schema (below a tool's root) as Moonshot's validator takes it, the
    same meaning: a C{type} beside C{anyOf} moved into each branch (a
    branch of its own type keeps the types both admit, and is left out
    when none is; beside an C{allOf} of a C{$ref} branch's reference); a
    list of C{items} (a tuple, draft 4-2019) written as C{prefixItems}
    (2020-12); a C{$ref} with keywords beside it but its C{description}
    moved into an C{allOf} of one, its siblings kept beside it
    (L{_reference_in_all_of}).  C{schema} itself when nothing is to
    change (no copy), else a changed copy; the caller's is never
    changed.  Anything else
    is left for Moonshot to judge (L{TOOL_SCHEMA_ADVICE} says what it
    refuses).
    """
    return rewrite(schema, _moonshot_node)


def moonshot_parameters(parameters: Any) -> Any:
    """
    A function tool's C{parameters} as Moonshot's validator takes them:
    L{moonshot_schema} below the root; at the root, C{"type": "object"}
    when it names no type (C{{}}, or properties alone: a call's arguments
    are always an object, OpenAI's function calling, and Moonshot refuses
    a root without it, "tools.function.parameters.type is required and
    must be \"object\""), its C{definitions} (draft 7) as C{$defs}, their
    references with them (Moonshot's references must start with
    C{#/$defs/}: CommandCodeAI/command-code #594; merged into C{$defs}
    when both are there and no name is in both), a C{$ref} (a
    recursive Pydantic model's) in an C{allOf} of one.  A C{$schema} is
    left as written: Moonshot reads its own flavour, which takes
    2020-12's C{$defs} and C{prefixItems} whatever draft it names (and
    relabelled, an older draft's C{dependencies} or boolean
    C{exclusiveMaximum} would mean less).  A root C{anyOf}
    is left for Moonshot to judge (some of its models refuse a root
    without C{"type": "object"}, MiqroForge-Desktop #1165, and it refuses
    one beside C{anyOf}): its refusal says what to do.
    """
    if not isinstance(parameters, dict):
        return parameters
    encoded = orjson.dumps(parameters)
    if not any(mark in encoded for mark in _REWRITTEN):
        return parameters if "type" in parameters or "anyOf" in parameters else {"type": "object", **parameters}
    root: dict[str, Any] = parameters
    definitions, defs = root.get("definitions"), root.get("$defs")
    kept = defs if isinstance(defs, dict) else {} if defs is None else None
    rename = isinstance(definitions, dict) and kept is not None and not definitions.keys() & kept.keys()
    if rename:
        assert isinstance(definitions, dict) and kept is not None
        root = {key: value for key, value in root.items() if key != "definitions"}
        root["$defs"] = {**kept, **definitions}
    node: NodeRewrite = partial(_moonshot_node, rename_definitions=rename)
    root = rewrite_subschemas(root, node)
    if "type" not in root and "anyOf" not in root:
        root = {"type": "object", **root}
    reference = root.get("$ref")
    if isinstance(reference, str):
        # Beside its type and its $defs at least: in an allOf of one.
        root = _reference_in_all_of(root, _renamed(reference) if rename else reference) or root
    return root


#: What a client can do about it: Moonshot's own field turns thinking off
#: for the call, on the models that take it (kimi-k2.5 and later: its
#: parameters table, https://platform.moonshot.ai/docs), or the call lets
#: the model choose; the kimi-k2-thinking models always think.
FORCED_TOOL_CHOICE_ADVICE = (
    'Moonshot\'s thinking models take a forced tool_choice ("required" or a named function) only with thinking '
    'off: send "thinking": {"type": "disabled"} with it (the openai SDK: extra_body) to a model that takes that '
    'field (kimi-k2.5 and later), or use tool_choice "auto" (a kimi-k2-thinking model always thinks) or a model '
    "that does not think"
)


@attrs.define(kw_only=True)
class KimiAdapter(OpenAICompatibleAdapter):
    """
    Moonshot's API; C{MOONSHOT_API_KEY}, the name Moonshot's own tools use,
    is read when C{KIMI_API_KEY} is not set.
    """

    id: ClassVar[str] = "kimi"
    display_name: ClassVar[str] = "Kimi (Moonshot AI)"
    key_variables: ClassVar[tuple[str, ...]] = ("KIMI_API_KEY", "MOONSHOT_API_KEY")
    base_url_variable: ClassVar[str] = "KIMI_BASE_URL"
    #: Beside MOONSHOT_API_KEY: a mainland account's https://api.moonshot.cn/v1.
    base_url_aliases: ClassVar[tuple[str, ...]] = ("MOONSHOT_BASE_URL",)
    default_base_url: ClassVar[str] = "https://api.moonshot.ai/v1"
    model_variable: ClassVar[str] = "KIMI_MODEL"
    default_model_id: ClassVar[str] = "moonshot-v1-8k"
    #: OpenAI's format, but for Moonshot's thinking models' rule (L{thinks}):
    #: an assistant message with tool calls always has a reasoning_content.
    #: It takes Moonshot's built-in tools beside functions.
    #: Its image data URLs are of Moonshot's types (L{MOONSHOT_IMAGE_TYPES});
    #: it takes Moonshot's video_url parts and ms:// file URLs.  Its usage's
    #: cached prompt tokens are also given where OpenAI has them
    #: (L{moonshot_usage}).  An assistant message with an empty content goes
    #: without it, or, with no tool calls either, as its refusal or not at
    #: all (Moonshot refuses any empty assistant message).  Its tools'
    #: parameters are written as Moonshot's validator takes them
    #: (L{moonshot_parameters}).
    wire: ClassVar[Wire] = ReasoningKeptWire(
        thinks=thinks,
        tool_types=(MoonshotBuiltinTools(),),
        part_types=(MoonshotVideo(),),
        url_schemes=(MoonshotFiles(),),
        image_types=MOONSHOT_IMAGE_TYPES,
        # A Gemini answer's signature is no use to Kimi's model, and a
        # field Moonshot's API does not document.
        google_extras=False,
        usage_shape=moonshot_usage,
        empty_assistant_content=False,
        refusal_parts=False,
        tool_parameters=moonshot_parameters,
    )
    #: List prices (platform.moonshot.ai/docs/pricing), USD per million tokens.
    prices: ClassVar[Mapping[str, Price]] = MappingProxyType(
        {
            "moonshot-v1-8k": Price(0.20, 2.00),
            "moonshot-v1-32k": Price(1.00, 3.00),
            "moonshot-v1-128k": Price(2.00, 5.00),
            "kimi-k2.5": Price(0.60, 3.00, 0.10),
        }
    )

    def refusal(self, status: int, body: bytes, retry_after: str | None = None) -> Refusal:
        """
        As an OpenAI-compatible API's, and Moonshot's words for a prompt
        over the model's context window (L{MOONSHOT_CONTEXT_EXCEEDED}) are
        OpenAI's C{context_length_exceeded}, which agents act on; its
        refusal of a forced C{tool_choice} by a thinking model names
        C{tool_choice}, and of a tool's parameters (L{MOONSHOT_TOOL_SCHEMA})
        names C{tools}, each with what to do.
        """
        refusal = super().refusal(status, body, retry_after)
        if status == 400 and refusal.kind == RefusalKind.REQUEST and MOONSHOT_CONTEXT_EXCEEDED.search(refusal.message):
            return attrs.evolve(refusal, code=CONTEXT_LENGTH_EXCEEDED)
        if (
            status == 400
            and refusal.kind == RefusalKind.REQUEST
            and MOONSHOT_FORCED_TOOL_CHOICE.search(refusal.message)
        ):
            return attrs.evolve(refusal, param="tool_choice", advice=FORCED_TOOL_CHOICE_ADVICE)
        if status == 400 and refusal.kind == RefusalKind.REQUEST and MOONSHOT_TOOL_SCHEMA.search(refusal.message):
            return attrs.evolve(refusal, param="tools", advice=TOOL_SCHEMA_ADVICE)
        return refusal


__all__ = [
    "BUILTIN_FUNCTION",
    "MOONSHOT_CONTEXT_EXCEEDED",
    "MOONSHOT_FILE_URL",
    "MOONSHOT_IMAGE_TYPES",
    "KimiAdapter",
    "MoonshotBuiltinTools",
    "MoonshotFiles",
    "MoonshotVideo",
    "moonshot_usage",
]
