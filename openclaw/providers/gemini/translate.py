"""
OpenAI chat completions to Gemini's C{generateContent} and back: plain
functions over JSON-shaped values, no I/O, so each rule is testable alone,
and L{GeminiWire}, the Gemini provider's chat format built on them.

Requests (U{https://ai.google.dev/api/generate-content}): system (and
developer) messages become C{systemInstruction}; user, assistant and tool
messages become C{contents} with roles C{user} and C{model} (adjacent turns
of one role merged, as Gemini wants turns to alternate and a function
response turn right after its call turn); tool calls become
C{functionCall} parts, tool results C{functionResponse} parts; images,
audio and files C{inlineData} or C{fileData}; tools become
C{functionDeclarations} with the caller's JSON Schema unchanged as
C{parametersJsonSchema}; sampling fields, C{response_format} and
C{reasoning_effort} go to C{generationConfig}.

Answers: C{candidates} become C{choices}, in C{index} order
(C{functionCall} parts become
C{tool_calls} whose ids carry Gemini's call id and thought signature, see
L{openclaw.providers.gemini.callids}; an answer text part's signature
rides in the message's C{extra_content}, L{text_signature}; thought
summaries become C{reasoning_content}), C{finishReason} becomes C{finish_reason}, a model
failure (C{MALFORMED_FUNCTION_CALL}, ...) an error, and so is a part the
chat shape cannot carry (an image) or a malformed one, and a candidate
whose parts are all of kinds not translated (C{executableCode}, ...; left
out with a warning beside text or a tool call), C{usageMetadata}
becomes C{usage}; Gemini's C{modelVersion} (the model that really answered)
becomes C{model}.
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Collection, Iterable
from itertools import islice
from types import MappingProxyType
from typing import Any, ClassVar
from urllib.parse import urlsplit

import attrs
import orjson
from twisted.logger import ILogObserver

from openclaw.consumers.estimate import token_count
from openclaw.dataplane.errors import STREAM_BROKEN, STREAM_ERROR, APIError, bad_request
from openclaw.dataplane.request import (
    DATA_URL,
    FUNCTION_NAME,
    REASONING_EFFORTS,
    ChatRequest,
    PartType,
    ToolType,
    UrlScheme,
    choice_count,
    nests_too_deep,
)
from openclaw.dataplane.sse import Event
from openclaw.providers.errors import clip
from openclaw.providers.gemini.callids import carried, logger, new_call_id
from openclaw.providers.jsonschema import DATA_KEYWORDS, SCHEMA_MAPS
from openclaw.providers.wire import (
    Completion,
    MalformedAnswer,
    ModelFailed,
    StreamBroken,
    completion_id,
    json_object,
    reported_error,
    with_kind,
)
from openclaw.shorten import shortened

#: Google's documented placeholder for a function call Gemini did not sign
#: (history written by another model,
#: U{https://ai.google.dev/gemini-api/docs/thought-signatures}).
SKIP_SIGNATURE = "skip_thought_signature_validator"

#: Gemini finish reasons that mean "cut short by a filter".
_FILTERED = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "LANGUAGE",
        "PROHIBITED_CONTENT",
        "BLOCKLIST",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
    }
)
_FINISH_REASONS = MappingProxyType({"STOP": "stop", "MAX_TOKENS": "length"})
#: Gemini finish reasons that mean "the model failed"
#: (U{https://ai.google.dev/api/generate-content#FinishReason}): an error,
#: never a stop.  A reason in none of these tables (C{FINISH_REASON_UNSPECIFIED},
#: one Google adds later) is a stop, logged as a warning.
_FAILED = frozenset(
    {
        "OTHER",
        "MALFORMED_FUNCTION_CALL",
        "UNEXPECTED_TOOL_CALL",
        "TOO_MANY_TOOL_CALLS",
        "MISSING_THOUGHT_SIGNATURE",
        "MALFORMED_RESPONSE",
        "IMAGE_OTHER",
        "NO_IMAGE",
    }
)
#: What a failed finish reason tells the caller to do.
_FAILURE_HINTS = MappingProxyType(
    {
        "MALFORMED_FUNCTION_CALL": "the model produced a function call that does not parse; retry, "
        "or simplify the tool schemas",
        "UNEXPECTED_TOOL_CALL": "the model called a tool although none was enabled; retry, or send tools",
        "TOO_MANY_TOOL_CALLS": "the model made too many tool calls in a row; retry with a narrower task",
    }
)

#: OpenAI request field -> generationConfig field, copied as they are.
_GENERATION_FIELDS = (
    ("temperature", "temperature"),
    ("top_p", "topP"),
    # Not OpenAI's: vLLM's, LiteLLM's and the Vercel AI SDK's (topK),
    # Gemini's own.
    ("top_k", "topK"),
    ("n", "candidateCount"),
    ("presence_penalty", "presencePenalty"),
    ("frequency_penalty", "frequencyPenalty"),
    ("seed", "seed"),
)
#: C{reasoning_effort} for Gemini 2.x: C{thinkingBudget} in tokens, Google's
#: own mapping in its OpenAI compatibility layer
#: (U{https://ai.google.dev/gemini-api/docs/openai}); 0 turns thinking off.
#: OpenAI's "xhigh" and "max" get the "high" budget, the largest of that
#: mapping (and the most Gemini 2.5 Flash takes).
THINKING_BUDGETS = MappingProxyType(
    {"none": 0, "minimal": 1024, "low": 1024, "medium": 8192, "high": 24576, "xhigh": 24576, "max": 24576}
)
#: C{reasoning_effort} for Gemini 3 and later: the C{thinkingLevel} asked
#: for (U{https://ai.google.dev/gemini-api/docs/thinking}); thinking cannot
#: be turned off there, and "minimal" is the closest to none; "high" is the
#: most there is, for OpenAI's "xhigh" and "max" too.  A model that
#: lacks the level gets the next one up (L{thinking_level}).
THINKING_LEVELS = MappingProxyType(
    {
        "none": "minimal",
        "minimal": "minimal",
        "low": "low",
        "medium": "medium",
        "high": "high",
        "xhigh": "high",
        "max": "high",
    }
)
#: Gemini 3's thinking levels, least thinking first.
ALL_THINKING_LEVELS = ("minimal", "low", "medium", "high")
#: The thinking levels of the Gemini 3 families that lack some, by model
#: name (first match wins; U{https://ai.google.dev/gemini-api/docs/thinking},
#: U{https://ai.google.dev/gemini-api/docs/gemini-3}): Gemini 3 Pro takes
#: low and high; Gemini 3.1 Pro and later Pros low, medium and high;
#: C{gemini-pro-latest} names one of those Pros, so it gets the levels both
#: take.  Every other name (Gemini 3 Flash and Flash-Lite, later models, the
#: other C{-latest} aliases) takes all of L{ALL_THINKING_LEVELS}.
THINKING_LEVEL_FAMILIES: tuple[tuple[re.Pattern[str], frozenset[str]], ...] = (
    (re.compile(r"gemini-3-pro"), frozenset({"low", "high"})),
    (re.compile(r"gemini-3\.[1-9][0-9]*-pro"), frozenset({"low", "medium", "high"})),
    (re.compile(r"gemini-pro-latest"), frozenset({"low", "high"})),
)
#: Model names that take a thinking budget rather than a level.
_BUDGET_MODELS = ("gemini-2", "gemini-1")
#: The names of the budget models that cannot turn thinking off, whose
#: budget 0 (C{reasoning_effort} "none") Google refuses ("Budget 0 is
#: invalid. This model only works in thinking mode."): Gemini 2.5 Pro,
#: whose budget is 128 to 32768
#: (U{https://ai.google.dev/gemini-api/docs/thinking#set-budget}).
ALWAYS_THINKING = re.compile(r"gemini-2\.5-pro")
#: C{presence_penalty} and C{frequency_penalty}, sent as C{presencePenalty}
#: and C{frequencyPenalty}: Google refuses any but 0 ("Penalty is not
#: enabled for models/...") on Gemini 2.5 and later; only the older models
#: (Gemini 2.0, 1.5) take them.  Sources: google-gemini/cookbook #1290 (a
#: non-zero value fails on every current model, 0.0 passes unchecked),
#: vercel/ai #8943 and BerriAI/litellm #26108 (gemini-2.5-pro and -flash),
#: litellm PR #32273, mnfst/modelparams.dev PR #16 (gemini-3.5-flash).
PENALTIES = ("presence_penalty", "frequency_penalty")
#: The models that refuse them, by name: Gemini 2.5, then 3 and any later
#: version.  Names that say no version (the C{-latest} aliases, which
#: Google moves from one model to the next; C{gemini-exp-*}) are not
#: classified: Google's own answer stands for them, as refusing here could
#: refuse what the model named today takes.
PENALTY_REFUSED = re.compile(r"gemini-(?:2\.(?:[5-9]|[1-9][0-9]+)|[3-9]|[1-9][0-9]+)(?![0-9])")
#: A model name of Gemini 3 or later (C{gemini-3*}, C{gemini-4}, ...,
#: C{gemini-10}); names without a version (the C{-latest} aliases) do not
#: match.  Two of Gemini's limits start there:
#:  - one candidate only: Google refuses a C{candidateCount} over 1 ("Multiple
#:    candidates is not enabled for this model": googleapis/js-genai #1609 on
#:    gemini-3.1-flash-lite, gemini-3-flash-preview and
#:    gemini-3.1-pro-preview; googleapis/python-genai #1723 on
#:    gemini-3-pro-preview); Gemini 2.5 takes up to L{MAX_CANDIDATES};
#:  - a C{mediaResolution} per part
#:    (U{https://ai.google.dev/gemini-api/docs/media-resolution}, "Per part
#:    (Gemini 3 only)"; the google-genai SDK sends a part's
#:    C{media_resolution} to the Gemini API as C{mediaResolution: {level}}):
#:    elsewhere an image's C{detail} is left out.
#: A name without a version is left to Google's answer, as for
#: L{PENALTY_REFUSED}.
GEMINI_3_OR_LATER = re.compile(r"gemini-(?:[3-9]|[1-9][0-9]+)(?![0-9])")
#: An image's C{detail} as Gemini's C{mediaResolution.level}; "auto" (and
#: no detail) sends none, Gemini's default.
MEDIA_RESOLUTIONS = MappingProxyType({"low": "MEDIA_RESOLUTION_LOW", "high": "MEDIA_RESOLUTION_HIGH"})
#: An image URL whose type cannot be told from its name.
DEFAULT_IMAGE_TYPE = "image/jpeg"
#: The image types Gemini takes, by file extension
#: (U{https://ai.google.dev/gemini-api/docs/image-understanding}: PNG,
#: JPEG, WEBP, HEIC, HEIF).
IMAGE_TYPES = MappingProxyType(
    {
        "png": "image/png",
        "jpg": "image/jpeg",
        "jpeg": "image/jpeg",
        "webp": "image/webp",
        "heic": "image/heic",
        "heif": "image/heif",
    }
)
#: L{IMAGE_TYPES}, as a message names them.
IMAGE_TYPE_NAMES = "PNG, JPEG, WEBP, HEIC or HEIF"
#: Gemini's C{generationConfig} limits
#: (U{https://ai.google.dev/api/generate-content#generationconfig}):
#: C{candidateCount} from 1 to 8; at most 5 C{stopSequences}.
MAX_CANDIDATES = 8
MAX_STOP_SEQUENCES = 5
#: The range of an int32, the type of Gemini's integer request fields
#: (google.ai.generativelanguage.v1beta: C{GenerationConfig}'s C{seed},
#: C{maxOutputTokens}, C{candidateCount}, C{logprobs}; C{ThinkingConfig}'s
#: C{thinkingBudget}; C{EmbedContentRequest}'s C{outputDimensionality}).
INT32_RANGE = (-(2**31), 2**31 - 1)
#: OpenAI's integer fields that become an int32 field of C{generationConfig}:
#: (OpenAI name, Gemini name, OpenAI's own lower bound).  C{n} and
#: C{top_logprobs} have tighter limits of their own (L{MAX_CANDIDATES},
#: OpenAI's 20), checked first; C{thinkingBudget} comes from
#: L{THINKING_BUDGETS}, never from the client.
INT32_FIELDS = (
    ("seed", "seed", INT32_RANGE[0]),
    ("max_completion_tokens", "maxOutputTokens", 1),
    ("max_tokens", "maxOutputTokens", 1),
    ("n", "candidateCount", 1),
    ("top_logprobs", "logprobs", 0),
)
#: The C{response_format} types that set C{responseMimeType: application/json}.
JSON_FORMATS = ("json_object", "json_schema")
#: Answer parts that OpenAI's chat completion message cannot carry
#: (U{https://ai.google.dev/api/caching#Part}): media, as image models
#: (C{gemini-2.5-flash-image}) answer with C{inlineData}.  Never dropped
#: silently: such an answer is an error naming the part (L{_read}).
UNSUPPORTED_PARTS = ("inlineData", "fileData")
#: The fields of an answer part that say something about it rather than
#: carry what the model said (U{https://ai.google.dev/api/caching#Part}):
#: every other field set names the part's kind.
PART_METADATA = frozenset({"thought", "thoughtSignature", "partMetadata", "mediaResolution"})
#: At most this many part kinds are named in a warning or an error; at
#: most one more is kept (L{_note}), to say that there were more.
MAX_KINDS_NAMED = 5


class GeminiStreamError(Exception):
    """
    An event in a Gemini stream that is an error rather than an answer;
    C{code} as L{StreamBroken}'s: L{STREAM_BROKEN} for one that cannot be
    read (the default), L{STREAM_ERROR} for Gemini's error event.
    """

    def __init__(self, message: str, code: str = STREAM_BROKEN) -> None:
        super().__init__(message)
        self.code = code


def to_gemini(body: dict[str, Any], model: str = "", references: bool = True) -> dict[str, Any]:
    """
    The C{generateContent} request for a validated chat completion body
    (see L{openclaw.dataplane.request.parse_chat_request}).

    @param references: the body may hold a C{"$ref"}
        (L{ChatRequest.references}): the schemas are looked through
        (L{isolate_ref_siblings}) only then.

    @param model: the model asked for (Gemini 2 and 3 take
        C{reasoning_effort} differently).
    @raise APIError: 400 naming the field, for what Gemini cannot do or
        would refuse (L{refuse_unsupported}), for an image that is not
        of a type Gemini takes (L{image_type}, L{data_image_type}) or
        given by a C{gs://} URL (L{cloud_storage_refused}), for a part of
        another provider's type or a URL of another scheme (L{not_taken}:
        refused before, with the provider that takes it named, when the
        body is encoded for a call, L{refuse_media_kinds
        <openclaw.providers.wire.refuse_media_kinds>}), and for an
        assistant message with tool calls that no user turn comes
        before (L{no_turn_before_calls}).
    """
    refuse_unsupported(body, model)
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    #: tool call id -> (name, Gemini's call id), for the results.
    calls: dict[str, tuple[str, str | None]] = {}
    #: The latest assistant turn's call ids -> their place among its calls:
    #: the results that follow it go in that order.
    order: dict[str, int] = {}
    messages = body["messages"]
    resolution = GEMINI_3_OR_LATER.match(model.removeprefix("models/")) is not None
    i = 0
    while i < len(messages):
        message = messages[i]
        role = message["role"]
        if role == "tool":
            # A run of tool results: one turn, in the calls' order.
            run = []
            while i < len(messages) and messages[i]["role"] == "tool":
                run.append(messages[i])
                i += 1
            run.sort(key=lambda m: order.get(m["tool_call_id"], len(order)))
            _append(contents, "user", [_function_response(m, calls) for m in run])
            continue
        where = f"messages[{i}].content"
        i += 1
        if role == "system":
            system.extend(_parts(message["content"], where, resolution))
        elif role == "user":
            _append(contents, "user", _parts(message["content"], where, resolution))
        else:
            content = message.get("content")
            parts = [] if content is None else _parts(content, where, resolution)
            refusal = message.get("refusal")
            if refusal:
                # The assistant's words, as a refusal content part is.
                parts.append({"text": refusal})
            signature = text_signature(message)
            tool_calls = message.get("tool_calls")
            if signature is not None and parts and not tool_calls:
                # On its text's last part, as Gemini answered it (an
                # assistant's parts are text).  Beside calls, the signed
                # text part came last, after them (Gemini signs a call
                # turn's calls, or ends it with a signed empty text part):
                # it goes back there, below.
                parts[-1]["thoughtSignature"] = signature
                signature = None
            if tool_calls:
                # Turns alternate: a user turn, if any, is first or second.
                if not any(turn["role"] == "user" for turn in contents[:2]):
                    raise no_turn_before_calls(f"messages[{i - 1}]")
                order = {call["id"]: k for k, call in enumerate(tool_calls)}
                parts.extend(_function_call(call, calls) for call in tool_calls)
            if signature is not None:
                # No text to carry it, or calls before it: the signed empty
                # text part Gemini answered with, last, as it came
                # (L{text_signature}).
                parts.append({"text": "", "thoughtSignature": signature})
            _append(contents, "model", parts)
    for turn in contents:
        if turn["role"] == "model":
            _sign(turn["parts"])
    request: dict[str, Any] = {}
    if contents:
        request["contents"] = contents
        if system:
            request["systemInstruction"] = {"parts": system}
    else:
        # Only system messages: OpenAI answers them, Gemini refuses an
        # empty contents; their text is the user's turn.
        request["contents"] = [{"role": "user", "parts": system}]
    tools = body.get("tools")
    if tools:
        allowed = _allowed_names(body.get("tool_choice"))
        declarations = [
            _declaration(tool["function"], references)
            for tool in tools
            if allowed is None or tool["function"]["name"] in allowed
        ]
        request["tools"] = [{"functionDeclarations": declarations}]
    choice = _tool_config(body.get("tool_choice"))
    if choice is not None and tools:
        # Not without a function to call ("auto" or "none" with no tools,
        # or an empty list: nothing to choose; "required" is refused
        # earlier): the Gemini API refuses a functionCallingConfig without
        # functionDeclarations (400 "Function calling config is set
        # without function_declarations.": pydantic/pydantic-ai #5791).
        request["toolConfig"] = {"functionCallingConfig": choice}
    config = generation_config(body, model, references)
    if config:
        request["generationConfig"] = config
    return request


def no_turn_before_calls(where: str) -> APIError:
    """
    400 naming the assistant message at C{where}, whose tool calls would
    open Gemini's C{contents}: Google refuses a function call turn that
    does not come right after a user turn or a function response turn
    ("Please ensure that function call turn comes immediately after a user
    turn or after a function response turn", google-gemini/gemini-cli
    #11814).  OpenAI's history allows it ([system, assistant with
    tool_calls, tool]; a user message with no content is dropped, as Gemini
    refuses empty text); the gateway writes no user turn of its own.
    """
    return bad_request(
        f"{where} is an assistant message with tool_calls that no user message with content, nor tool results, "
        "comes before (system messages and empty user messages do not count): Gemini needs one right before a "
        f"function call turn; add a user message before {where}",
        param=where,
    )


def _append(contents: list[dict[str, Any]], role: str, parts: list[dict[str, Any]]) -> None:
    """
    Add a turn, merged into the last one when of the same role; a turn with
    no parts is no turn.
    """
    if not parts:
        return
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": parts})


def _sign(parts: list[dict[str, Any]]) -> None:
    """
    Give the first C{functionCall} part of a model turn Google's documented
    placeholder when it has no signature of its own (the calls were not
    Gemini's: history written by another provider before a switch).
    """
    for part in parts:
        if "functionCall" in part:
            part.setdefault("thoughtSignature", SKIP_SIGNATURE)
            return


def _function_call(call: dict[str, Any], calls: dict[str, tuple[str, str | None]]) -> dict[str, Any]:
    function = call["function"]
    gemini_id, signature = carried(call["id"])
    if signature is None:
        signature = _google_signature(call)
    calls[call["id"]] = (function["name"], gemini_id)
    function_call: dict[str, Any] = {"name": function["name"], "args": _arguments(function["arguments"])}
    if gemini_id is not None:
        function_call["id"] = gemini_id
    part: dict[str, Any] = {"functionCall": function_call}
    if signature is not None:
        part["thoughtSignature"] = signature
    return part


def _google_signature(call: dict[str, Any]) -> str | None:
    """
    The signature a tool call (or an assistant message: L{text_signature})
    carries where Google's own OpenAI-compatible endpoint puts it,
    C{extra_content.google.thought_signature}: a history written through
    that endpoint keeps its signatures here.
    """
    extra = call.get("extra_content")
    google = extra.get("google") if isinstance(extra, dict) else None
    signature = google.get("thought_signature") if isinstance(google, dict) else None
    return signature if isinstance(signature, str) and signature else None


def signed(signature: str) -> dict[str, Any]:
    """
    The C{extra_content} of an assistant message (whole, or a streamed
    delta) whose text carries C{signature} (L{text_signature}).
    """
    return {"google": {"thought_signature": signature}}


def text_signature(message: dict[str, Any]) -> str | None:
    """
    The thought signature of an assistant message's text, which goes back
    to Gemini on the last text part of its model turn; None when it has
    none.

    Gemini 3 puts a C{thoughtSignature} on an answer's last part when it
    calls no function, a text part, and Google asks for it back on that
    part, exactly as received: not enforced, as it is on function call
    parts (a 400 without it), but "to maintain reasoning quality"
    (U{https://ai.google.dev/gemini-api/docs/thought-signatures}).  The
    gateway joins an answer's text parts into one C{content} string, and
    gives the last text part's signature (L{_read}) in
    C{extra_content.google.thought_signature} of the message (or of the
    streamed choice's finishing delta, once: the openai SDK's stream helper
    joins the strings of deltas it accumulates), where Google's own
    OpenAI-compatible endpoint puts it: an extra field, which the openai SDK
    keeps on the message it reads (C{message.model_extra}) and sends back
    with it; an agent that writes its history itself (not the message as
    it came) leaves it out, and Gemini gets that text unsigned, as before.
    A history written through Google's endpoint reads the same.

    A message with no text (a function call turn, or an answer of thoughts
    only), or with tool calls beside its text, sends its signature back as
    Gemini gave it, on an empty text part last in the model turn (after
    the calls, not moved onto the text before them): Gemini 3 may end a function call step
    with one (in a stream: google/adk-go #442), and Google asks for
    signed parts back as received, never dropped (its thought signatures
    guide; earendil-works/pi #7362 echoes them: dropped, Gemini Flash
    ended tool loops early).  Unsigned empty text is never sent.
    """
    return _google_signature(message)


def _arguments(arguments: str) -> dict[str, Any]:
    """
    A tool call's C{arguments} (checked: a string, not nested too deep)
    as C{functionCall.args}, a JSON object: one that is no JSON object (a
    call cut at its token limit, answered by the agent with the error) goes
    as no arguments, C{{}}.
    """
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _function_response(message: dict[str, Any], calls: dict[str, tuple[str, str | None]]) -> dict[str, Any]:
    name, gemini_id = calls[message["tool_call_id"]]
    content = message["content"]
    text = content if isinstance(content, str) else "\n".join(part["text"] for part in content)
    parsed = None
    # Only a JSON object is passed as one: other text is not parsed at all
    # (no exception raised and caught per result; JSON's whitespace is
    # RFC 8259's four characters).  One nested deeper than any provider's
    # body carries goes as text, as Kimi gets it, rather than refused.
    if text.lstrip(" \t\n\r").startswith("{"):
        try:
            parsed = orjson.loads(text)
        except orjson.JSONDecodeError:
            parsed = None
        # "ref" may be written in \u escapes: looked for then too.
        if (
            nests_too_deep(parsed)
            or (("ref" in text or "\\u" in text) and _holds_ref(parsed))
            or (_LONG_DIGITS.search(text) is not None and _holds_inexact_integer(parsed))
        ):
            parsed = None
    response: dict[str, Any] = {"name": name, "response": parsed if isinstance(parsed, dict) else {"result": text}}
    if gemini_id is not None:
        response["id"] = gemini_id
    return {"functionResponse": response}


#: Sixteen digits in a row: the text may hold an integer past 2**53
#: (9007199254740992, sixteen digits).
_LONG_DIGITS = re.compile(r"[0-9]{16}")
#: The largest integer magnitude a double holds exactly (IEEE 754).
_EXACT_INTEGERS = 2**53


def _holds_inexact_integer(value: Any) -> bool:
    """
    Whether a number past 2**53 in magnitude is anywhere in C{value}
    (parsed JSON, not nested too deep; an integer past 64 bits is parsed
    as a float).  C{functionResponse.response} is a
    protobuf C{Struct}, whose numbers are doubles: such an integer (an
    order id, a snowflake id) would reach the model changed
    (1234567890123456789 as 1234567890123456768), so the result goes as
    its text, C{{"result": "..."}}, as Kimi gets it.
    """
    pending = [value]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
        elif type(value) in (int, float) and abs(value) > _EXACT_INTEGERS:
            # orjson reads an integer past 64 bits as a float.
            return True
    return False


def _holds_ref(value: Any) -> bool:
    """
    Whether a C{"$ref"} key is anywhere in C{value} (parsed JSON, not
    nested too deep).  Gemini reads one inside C{functionResponse.response}
    as naming a media part of the response and refuses the request when no
    part has that C{displayName} ("The referenced name `#/$defs/Row` in
    function_response.response does not match to a display_name";
    googleapis/python-genai #2792, vercel/ai #14369): such a result (a
    JSON Schema, say) goes as text, C{{"result": "..."}}.
    """
    pending = [value]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            if "$ref" in value:
                return True
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return False


def _declaration(function: dict[str, Any], references: bool = True) -> dict[str, Any]:
    declaration: dict[str, Any] = {"name": function["name"]}
    description = function.get("description")
    if description:
        declaration["description"] = description
    parameters = function.get("parameters")
    if parameters:
        # JSON Schema as the caller wrote it: no lossy conversion to the
        # OpenAPI subset that "parameters" takes.
        declaration["parametersJsonSchema"] = isolate_ref_siblings(parameters) if references else parameters
    return declaration


#: What Gemini lets stand beside C{"$ref"} in a schema node (its sibling
#: keywords).
REF_SIBLINGS_ALLOWED = frozenset({"$ref", "description", "default"})
#: A C{$schema} naming a draft in which the siblings of C{$ref} are
#: ignored (draft-07 section 8.3, and before it).
_SIBLINGS_IGNORED = re.compile(r"draft-0[0-7]\b")
#: What stays beside such a C{$ref}: Gemini's allowed siblings, and the
#: keywords that are no constraint (where references point, the draft).
_KEPT_BESIDE_IGNORED_REF = REF_SIBLINGS_ALLOWED | {"$schema", "$id", "$comment", "$defs", "definitions"}


def isolate_ref_siblings(schema: Any) -> Any:
    """
    C{schema} (JSON Schema, as C{parametersJsonSchema} or
    C{responseJsonSchema}) with each C{"$ref"} that has sibling keywords
    moved into an C{anyOf} of one: C{{"$ref": "#/$defs/A", "title":
    "Home"}} becomes C{{"title": "Home", "anyOf": [{"$ref":
    "#/$defs/A"}]}}, which validates the same (JSON Schema 2020-12 section
    10.2.1.2).  Gemini refuses a node with C{$ref} and anything but
    C{description} and C{default} ("If a schema node has $ref set, then
    only description and default can be set alongside it"; its
    C{responseJsonSchema} reference; anomalyco/opencode #12295), and
    Pydantic's C{model_json_schema()} writes C{title} there.  Under a
    C{$schema} of draft-07 or before (zod-to-json-schema's default), where
    the siblings of C{$ref} are ignored, they are dropped instead (but for
    C{description}, C{default} and a root's definitions, which go in the
    C{anyOf} way): moved, they would start to count.  A
    node that already has an C{anyOf} is left as it is (Gemini refuses
    it).  Unchanged parts are shared, not copied; C{schema} itself is
    never changed.
    """
    if b'"$ref"' not in orjson.dumps(schema):
        return schema
    declared = schema.get("$schema") if isinstance(schema, dict) else None
    ignored = isinstance(declared, str) and _SIBLINGS_IGNORED.search(declared) is not None
    return _isolated(schema, ignored)


def _isolated(schema: Any, ignored: bool, names: bool = False) -> Any:
    """
    L{isolate_ref_siblings} of C{schema}; C{ignored}: siblings of C{$ref}
    are dropped, not moved; C{names}: C{schema} maps names to schemas
    (C{properties}, C{$defs}), so none of its keys is a keyword.
    """
    if isinstance(schema, list):
        items = [_isolated(item, ignored) for item in schema]
        return items if any(new is not old for new, old in zip(items, schema, strict=True)) else schema
    if not isinstance(schema, dict):
        return schema
    changed = {
        key: new
        for key, value in schema.items()
        if isinstance(value, (dict, list))
        and (names or key not in DATA_KEYWORDS)
        and (new := _isolated(value, ignored, not names and key in SCHEMA_MAPS)) is not value
    }
    node = {**schema, **changed} if changed else schema
    if names:
        return node
    reference = node.get("$ref")
    if isinstance(reference, str) and not node.keys() <= REF_SIBLINGS_ALLOWED:
        if ignored:
            # Dropped, but for where references point (a root's
            # definitions) and what says which draft.
            node = {key: value for key, value in node.items() if key in _KEPT_BESIDE_IGNORED_REF}
        if not node.keys() <= REF_SIBLINGS_ALLOWED and "anyOf" not in node:
            node = {key: value for key, value in node.items() if key != "$ref"}
            node["anyOf"] = [{"$ref": reference}]
    return node


def _allowed_names(choice: Any) -> set[str] | None:
    """
    The functions an C{allowed_tools} tool choice allows (None for any other
    choice): Gemini gets only their declarations.
    """
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        return {tool["function"]["name"] for tool in choice["allowed_tools"]["tools"]}
    return None


def _tool_config(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, dict):
        if choice.get("type") == "allowed_tools":
            return {"mode": "ANY" if choice["allowed_tools"]["mode"] == "required" else "AUTO"}
        return {"mode": "ANY", "allowedFunctionNames": [choice["function"]["name"]]}
    return {"mode": {"auto": "AUTO", "none": "NONE", "required": "ANY"}[choice]}


def stop_sequences(body: dict[str, Any]) -> list[str]:
    """
    C{stop} (a string, a list of them, or null) as Gemini's
    C{stopSequences}, without empty strings: an empty sequence stops
    nothing on OpenAI's side, and Gemini refuses one.
    """
    stop = body.get("stop")
    sequences = [stop] if isinstance(stop, str) else stop or []
    return [sequence for sequence in sequences if sequence]


def refuse_unsupported(body: dict[str, Any], model: str = "") -> None:
    """
    Refuse, before anything is sent, what OpenAI accepts but Gemini cannot
    do or would refuse with its own 400: audio output (C{modalities} with
    "audio", an C{audio} object); a web search (C{web_search_options}, even
    C{{}}: OpenAI's guide, U{https://platform.openai.com/docs/guides/tools-web-search?api-mode=chat},
    asks for a search with it; the gateway sends no C{googleSearch} tool,
    so the answer would come ungrounded, without a word); OpenAI's
    C{moderation} (its block mode changes the answer to a flagged request;
    Gemini runs no such check, and the gateway none of its own); a C{logit_bias}
    that biases some token (Gemini's C{GenerationConfig},
    U{https://ai.google.dev/api/generate-content#generationconfig}, has no
    token bias: a ban would not be applied; an empty one, which SDKs and
    frameworks send, is none); C{n} over L{MAX_CANDIDATES}, or over 1
    on a model that answers one candidate (L{GEMINI_3_OR_LATER}); a non-zero
    C{presence_penalty} or C{frequency_penalty} on a model that takes none
    (L{PENALTY_REFUSED}); an integer
    that becomes an int32 field of C{generationConfig} (L{INT32_FIELDS}:
    C{seed}, C{max_tokens} or C{max_completion_tokens}, whichever is sent
    as C{maxOutputTokens}) outside L{INT32_RANGE}, which Google would
    refuse; more than L{MAX_STOP_SEQUENCES} (non-empty) stop
    sequences; C{tools} with a JSON C{response_format} on a
    Gemini 1.x or 2.x model (Google: "Function calling with a response mime
    type: 'application/json' is unsupported"; Gemini 3 takes both);
    C{reasoning_effort} "none" on a model that cannot turn thinking off
    (L{ALWAYS_THINKING}).  A field set to null is not set.  (A tool of a
    type beside functions, which Gemini takes none of, was refused before:
    L{refuse_tool_types <openclaw.providers.wire.refuse_tool_types>}.)

    @raise APIError: 400 whose C{param} names the field.
    """
    modalities = body.get("modalities")
    if isinstance(modalities, list) and "audio" in modalities:
        raise bad_request(
            'modalities asks for "audio": audio output is not available through Gemini on this gateway '
            '(text is); send modalities ["text"] or leave it out',
            param="modalities",
        )
    if body.get("audio") is not None:
        raise bad_request(
            "audio asks for audio output, which is not available through Gemini on this gateway (text is); "
            "remove audio",
            param="audio",
        )
    if body.get("web_search_options") is not None:
        raise bad_request(
            "web_search_options asks for a web search, which is not available through Gemini on this gateway (it "
            "does not offer Gemini's Google Search grounding): the answer would not be grounded; remove "
            "web_search_options, or give the model a search function of your own in tools (or, on a kimi model, "
            "Moonshot's $web_search built-in tool)",
            param="web_search_options",
        )
    if body.get("moderation") is not None:
        # Checked before (openclaw.dataplane.request): OpenAI's shape.
        raise bad_request(
            "moderation asks for OpenAI's moderation of the request and the answer (its block mode changes the "
            "answer to a flagged one), which Gemini does not run: the answer would come unmoderated, and nothing "
            "would say so; remove moderation, and moderate the text yourself before and after the call (with "
            "a moderation model of your own)",
            param="moderation",
        )
    # Checked before (openclaw.dataplane.request): an object of numbers.
    if any(bias != 0 for bias in (body.get("logit_bias") or {}).values()):
        raise bad_request(
            "logit_bias asks for tokens to be favoured or banned, which Gemini cannot do (its generateContent has "
            "no token bias): the bias would not be applied; remove logit_bias (or send it empty, or with biases of 0), or send this call "
            "to another provider's model",
            param="logit_bias",
        )
    bare = model.removeprefix("models/")
    n = body.get("n")
    if isinstance(n, int) and n > MAX_CANDIDATES:
        raise bad_request(
            f"n must be from 1 to {MAX_CANDIDATES} on Gemini (its candidateCount limit); "
            f"send n of at most {MAX_CANDIDATES}, or make several calls",
            param="n",
        )
    if isinstance(n, int) and n > 1 and GEMINI_3_OR_LATER.match(bare):
        raise bad_request(
            f"n is {n}: Gemini {bare} answers one choice per call (Google refuses a candidateCount over 1 on "
            "Gemini 3 models); send n 1 or leave it out and make several calls, or use a Gemini 2.5 model",
            param="n",
        )
    for penalty in PENALTIES:
        value = body.get(penalty)
        if value and PENALTY_REFUSED.match(bare):
            raise bad_request(
                f"{penalty} is {value}: Gemini {bare} takes no penalty (Google refuses any but 0 on Gemini 2.5 "
                f"and later models); send {penalty} 0 or leave it out, or use a model that takes it (gemini-2.0-*, "
                "or another provider's)",
                param=penalty,
            )
    for name, gemini_name, low in INT32_FIELDS:
        value = body.get(name)
        if name == "max_tokens" and body.get("max_completion_tokens") is not None:
            # Not sent: maxOutputTokens is max_completion_tokens.
            continue
        if isinstance(value, int) and not INT32_RANGE[0] <= value <= INT32_RANGE[1]:
            raise bad_request(
                f"{name} must be from {low} to {INT32_RANGE[1]} on Gemini (its {gemini_name} is a 32-bit "
                f"integer); send a {name} in that range",
                param=name,
                code="integer_below_min_value" if value < INT32_RANGE[0] else "integer_above_max_value",
            )
    top_k = body.get("top_k")
    if top_k is not None and (type(top_k) is not int or not 1 <= top_k <= INT32_RANGE[1]):
        # Not OpenAI's field: unchecked before (a Kimi call sends it as it
        # is). Gemini's topK is a positive int32; vLLM's -1 and 0 ("off")
        # have no Gemini value but leaving it out.
        raise bad_request(
            f"top_k must be a whole number from 1 to {INT32_RANGE[1]} on Gemini (its topK); send one, or leave "
            f"top_k out for no top-k limit (got {shortened(repr(top_k), 40)})",
            param="top_k",
        )
    sequences = stop_sequences(body)
    if len(sequences) > MAX_STOP_SEQUENCES:
        raise bad_request(
            f"stop holds {len(sequences)} sequences: Gemini takes at most {MAX_STOP_SEQUENCES}; "
            f"send {MAX_STOP_SEQUENCES} or fewer",
            param="stop",
        )
    if body.get("reasoning_effort") == "none" and ALWAYS_THINKING.match(bare):
        efforts = ", ".join(effort for effort in REASONING_EFFORTS if effort != "none")
        raise bad_request(
            f'reasoning_effort "none" turns thinking off, which Gemini {bare} cannot do (Google refuses its '
            f"thinking budget 0): send one of {efforts}, or leave reasoning_effort out",
            param="reasoning_effort",
        )
    if body.get("tools") and _response_format(body) in JSON_FORMATS and _budget_model(model):
        raise bad_request(
            f"Gemini {model.removeprefix('models/')} cannot call tools and answer in a JSON response_format in "
            "one request (Gemini 3 models can): use a Gemini 3 model, or send response_format only on the "
            "turn after the tool loop",
            param="response_format",
        )


def _response_format(body: dict[str, Any]) -> Any:
    """
    The C{response_format}'s type (None when it has none).
    """
    response_format = body.get("response_format")
    return response_format.get("type") if isinstance(response_format, dict) else None


def _budget_model(model: str) -> bool:
    """
    Whether C{model} is a Gemini 1.x or 2.x (a C{thinkingBudget} model).
    """
    return model.removeprefix("models/").startswith(_BUDGET_MODELS)


def generation_config(body: dict[str, Any], model: str = "", references: bool = True) -> dict[str, Any]:
    """
    C{generationConfig} from the OpenAI sampling fields present in C{body},
    C{logprobs} and C{top_logprobs}, C{response_format} and
    C{reasoning_effort}.  A field set to null is not set (the openai SDK
    sends null for an argument passed as None).
    """
    config: dict[str, Any] = {}
    for openai_name, gemini_name in _GENERATION_FIELDS:
        value = body.get(openai_name)
        if value is None or (openai_name in PENALTIES and value == 0):
            # A penalty of 0 is Gemini's default: not sent, so that the
            # models that take no penalty (L{PENALTY_REFUSED}) take it.
            continue
        config[gemini_name] = value
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        config["maxOutputTokens"] = max_tokens
    sequences = stop_sequences(body)
    if sequences:
        config["stopSequences"] = sequences
    if body.get("logprobs") is True:
        config["responseLogprobs"] = True
        top = body.get("top_logprobs")
        if top is not None:
            config["logprobs"] = top
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind in JSON_FORMATS:
            config["responseMimeType"] = "application/json"
        spec = response_format.get("json_schema") if kind == "json_schema" else None
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema:
            schema = isolate_ref_siblings(schema) if references else schema
            config["responseJsonSchema"] = described_schema(schema, spec)
    effort = body.get("reasoning_effort")
    if effort is not None:
        config["thinkingConfig"] = thinking_config(effort, model)
    return config


def described_schema(schema: Any, spec: Any) -> Any:
    """
    A C{json_schema} C{response_format}'s C{schema} with the format's
    C{description} (OpenAI's: what the answer is for, which the model reads
    to answer in it) as its top-level C{description}, the keyword Gemini's
    C{responseJsonSchema} takes for it (Google's structured output guide,
    U{https://ai.google.dev/gemini-api/docs/structured-output}); Gemini's
    C{generationConfig} has no other place for it.  A schema that has a
    C{description} of its own keeps it; the caller's schema is not changed
    (a copy is sent).
    """
    description = spec.get("description") if isinstance(spec, dict) else None
    if not (isinstance(description, str) and description) or not isinstance(schema, dict) or "description" in schema:
        return schema
    return {**schema, "description": description}


def thinking_config(effort: str, model: str) -> dict[str, Any]:
    """
    C{thinkingConfig} for an OpenAI C{reasoning_effort}: a C{thinkingBudget}
    for Gemini 1 and 2 models (L{THINKING_BUDGETS}), a C{thinkingLevel} for
    the others (L{thinking_level}); and C{includeThoughts} for any effort
    but "none", without which Gemini returns no thought summaries
    (U{https://ai.google.dev/gemini-api/docs/thinking#summaries}).
    """
    name = model.removeprefix("models/")
    config: dict[str, Any]
    if _budget_model(name):
        config = {"thinkingBudget": THINKING_BUDGETS[effort]}
    else:
        config = {"thinkingLevel": thinking_level(effort, name)}
    if effort != "none":
        config["includeThoughts"] = True
    return config


def thinking_level(effort: str, model: str) -> str:
    """
    The C{thinkingLevel} for C{reasoning_effort} on a Gemini 3 (or later)
    C{model}: L{THINKING_LEVELS}, or the next level up that the model's
    family takes (L{THINKING_LEVEL_FAMILIES}): Google refuses a level the
    model lacks with a 400.
    """
    wanted = THINKING_LEVELS[effort]
    levels = next((levels for family, levels in THINKING_LEVEL_FAMILIES if family.match(model)), None)
    if levels is None or wanted in levels:
        return wanted
    higher = ALL_THINKING_LEVELS[ALL_THINKING_LEVELS.index(wanted) :]
    return next((level for level in higher if level in levels), "high")


def _parts(
    content: str | list[dict[str, Any]], where: str = "content", resolution: bool = False
) -> list[dict[str, Any]]:
    """
    Gemini parts for OpenAI content; empty text never reaches Gemini.

    @param where: the content's place in the request
        (C{messages[<i>].content}), for a 400.
    @param resolution: the model takes a C{mediaResolution} per part
        (L{GEMINI_3_OR_LATER}): an image's C{detail} "low" or "high" is
        sent as one (L{MEDIA_RESOLUTIONS}); otherwise it is left out.
    """
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part["type"]
        if kind in ("text", "refusal"):
            if part[kind]:
                parts.append({"text": part[kind]})
        elif kind == "image_url":
            media = _media(part["image_url"]["url"], f"{where}[{j}].image_url.url", image=True)
            level = MEDIA_RESOLUTIONS.get(part["image_url"].get("detail")) if resolution else None
            if level is not None:
                media["mediaResolution"] = {"level": level}
            parts.append(media)
        elif kind == "input_audio":
            audio = part["input_audio"]
            parts.append({"inlineData": {"mimeType": f"audio/{audio['format']}", "data": audio["data"]}})
        elif kind == "file":
            parts.append(_media(part["file"]["file_data"], f"{where}[{j}].file.file_data"))
        else:
            raise not_taken(f"{where}[{j}]", f"a {kind} part")
    return parts


def _media(url: str, where: str, image: bool = False) -> dict[str, Any]:
    """
    C{inlineData} for a base64 data URL (its media type in lower case),
    C{fileData} for an C{http(s)://} image URL, its scheme in lower case
    (the gateway never fetches it: Gemini does, or refuses).

    @param image: the URL is an C{image_url}'s: a data URL's type is
        checked (L{data_image_type}).
    @raise APIError: 400 naming C{where} for a C{gs://} URL
        (L{cloud_storage_refused}) or one of another scheme (L{not_taken}).
    """
    match = DATA_URL.match(url)
    if match is not None:
        media_type = match.group(1).lower()
        if image:
            media_type = data_image_type(media_type, where)
        return {"inlineData": {"mimeType": media_type, "data": url[match.end() :]}}
    scheme, colon, rest = url.partition(":")
    if scheme.lower() == "gs":
        raise cloud_storage_refused(where)
    if scheme.lower() not in ("http", "https"):
        raise not_taken(where, f"a {scheme}: URL")
    return {"fileData": {"fileUri": scheme.lower() + colon + rest, "mimeType": image_type(url, where)}}


def not_taken(where: str, what: str) -> APIError:
    """
    400 naming C{where}, C{what} (a content part of a type, or a URL of a
    scheme, beside OpenAI's) Gemini does not read.  Only for a body
    translated without its call's checks: a call's body is checked first
    (L{refuse_media_kinds <openclaw.providers.wire.refuse_media_kinds>},
    whose 400 names the provider that takes it).
    """
    return bad_request(
        f"{where} is {what}, which Gemini does not take: give an image as a base64 data URL or an https:// URL, "
        "and leave other media out",
        param=where,
    )


def cloud_storage_refused(where: str) -> APIError:
    """
    400 naming C{where}, a C{gs://} (Cloud Storage) image URL: the Gemini
    API does not read one, only Vertex AI does.  Google refuses it
    ("Invalid or unsupported file uri: gs://...": googleapis/python-genai
    #71, google-gemini/deprecated-generative-ai-python #357, whose own
    tests expect a 400 for a C{gs://} C{file_uri} on the Gemini API), and
    its Files API takes Cloud Storage objects only by registration
    (C{files:register}, with OAuth credentials of the key's project:
    U{https://ai.google.dev/gemini-api/docs/file-input-methods}), whose
    file is then named by its own URI, not the C{gs://} one.  The Gemini
    API fetches C{https://} URLs, public or signed.
    """
    return bad_request(
        f"{where} is a gs:// (Cloud Storage) URL, which the Gemini API does not read (only Vertex AI does): send "
        "an https:// URL Gemini can fetch (a public or signed URL of the object, such as "
        "https://storage.googleapis.com/<bucket>/<object>), or the image itself as a base64 data URL",
        param=where,
    )


def data_image_type(media_type: str, where: str = "image_url.url") -> str:
    """
    The type Gemini is sent for an image data URL of C{media_type} (lower
    case): one of L{IMAGE_TYPES}, named by its subtype (C{image/jpg}, a
    common misspelling, is C{image/jpeg}).

    @raise APIError: 400 naming C{where} for any other type (C{image/gif},
        C{image/svg+xml}, C{text/plain}), which Gemini would refuse or
        misread, as an image URL's name of another type is (L{image_type}).
    """
    kind, _, subtype = media_type.partition("/")
    known = IMAGE_TYPES.get(subtype) if kind == "image" else None
    if known is not None:
        return known
    raise bad_request(
        f"{where} is a data URL of type {media_type}, not an image Gemini takes: an image must be {IMAGE_TYPE_NAMES} "
        "(Google's supported image types); convert it to one of those",
        param=where,
    )


def image_type(url: str, where: str = "image_url.url") -> str:
    """
    The media type of an image URL, from the extension of its path (the
    query and fragment are not part of the name, RFC 3986): one of
    L{IMAGE_TYPES}; L{DEFAULT_IMAGE_TYPE} when the name has no extension,
    or one that names no known type.

    @raise APIError: 400 naming C{where} when the name is of another known
        type (C{page.html}, C{a.gif}): Gemini would be sent it as that type.
    """
    name = urlsplit(url).path.rpartition("/")[2]
    _, dot, extension = name.rpartition(".")
    if not dot:
        return DEFAULT_IMAGE_TYPE
    known = IMAGE_TYPES.get(extension.lower())
    if known is not None:
        return known
    guessed, _ = mimetypes.guess_type(name, strict=False)
    if guessed is None:
        return DEFAULT_IMAGE_TYPE
    raise bad_request(
        f"{where} names a file of type {guessed}, not an image Gemini takes: an image URL must name a "
        f"{IMAGE_TYPE_NAMES} image (by its extension, or none); send the image itself, or as a base64 data URL",
        param=where,
    )


def unknown_reason(candidate: dict[str, Any]) -> str | None:
    """
    The candidate's C{finishReason} when it is a string in none of the
    tables (answered as a stop, L{finish_reason}), else None.
    """
    reason = candidate.get("finishReason")
    if not isinstance(reason, str) or reason in _FINISH_REASONS or reason in _FILTERED or reason in _FAILED:
        return None
    return reason


def warn_unknown(reason: str, log: ILogObserver | None = None) -> None:
    """
    Log, as a warning, that C{reason} was answered as a stop (to C{log}:
    L{logger}).
    """
    logger(log).warn(
        "Gemini gave a finishReason this gateway does not know ({reason}): answered as a stop, content kept",
        reason=clip(reason),
    )


def finish_reason(reason: Any) -> str | None:
    """
    OpenAI's C{finish_reason} for Gemini's C{finishReason}: STOP is stop,
    MAX_TOKENS is length, the filters are content_filter, a reason Gemini
    did not have when this was written is stop (with a warning logged).

    @raise ModelFailed: a reason that says the model failed
        (MALFORMED_FUNCTION_CALL, OTHER, ...), which is never passed off as
        a stop.
    @raise MalformedAnswer: the reason is not a string.
    """
    if reason is None:
        return None
    if not isinstance(reason, str):
        raise MalformedAnswer("Gemini's finishReason is not a string")
    mapped = _FINISH_REASONS.get(reason)
    if mapped is not None:
        return mapped
    if reason in _FILTERED:
        return "content_filter"
    if reason not in _FAILED:
        # A reason Google added after this table, or one it leaves
        # unspecified: the content stands, as a stop (the caller warns,
        # see unknown_reason).
        return "stop"
    raise ModelFailed(
        f"Gemini's model failed (finishReason {reason}): " + _FAILURE_HINTS.get(reason, "retry, or try another model"),
        reason.lower() if reason.isidentifier() else "model_failed",
    )


def usage(metadata: Any) -> dict[str, Any] | None:
    """
    OpenAI's C{usage} for Gemini's C{usageMetadata} (None when absent, or
    when a count in it is there but no token count).
    Tokens spent thinking (C{thoughtsTokenCount}, not part of
    C{candidatesTokenCount}) are completion tokens, and also reported as
    C{reasoning_tokens}; C{cachedContentTokenCount} as C{cached_tokens};
    C{toolUsePromptTokenCount} (the prompts of Gemini's tool use, billed as
    input) is counted in C{prompt_tokens}, so that prompt and completion
    tokens add up to C{totalTokenCount}.
    """
    if not isinstance(metadata, dict):
        return None
    try:
        prompt = _tokens(metadata, "promptTokenCount") + _tokens(metadata, "toolUsePromptTokenCount")
        thoughts = _tokens(metadata, "thoughtsTokenCount")
        completion = _tokens(metadata, "candidatesTokenCount") + thoughts
        cached = _tokens(metadata, "cachedContentTokenCount")
    except _NoCount:
        # Counts the gateway cannot read: no usage, as when Google sends
        # none (a consumer is charged the estimate, never 0).
        return None
    total = token_count(metadata.get("totalTokenCount"))
    result: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion if total is None else total,
    }
    if thoughts:
        result["completion_tokens_details"] = {"reasoning_tokens": thoughts}
    if cached:
        result["prompt_tokens_details"] = {"cached_tokens": cached}
    return result


class _NoCount(Exception):
    """
    A count of C{usageMetadata} is there but is no token count.
    """


def _tokens(metadata: dict[str, Any], name: str) -> int:
    """
    A token count of C{usageMetadata}: 0 when absent or null (proto3's
    JSON leaves a zero count out), else as
    L{openclaw.consumers.estimate.token_count} reads a count.

    @raise _NoCount: it is there and no count (a string, a fraction, a
        negative number, a bool, past the largest count).
    """
    value = metadata.get(name)
    if value is None:
        return 0
    count = token_count(value)
    if count is None:
        raise _NoCount(name)
    return count


def _index(candidate: dict[str, Any]) -> int:
    """
    The candidate's C{index}: 0 when it names none or null, whatever its
    place in the list (Gemini's API writes its answers in proto3's JSON,
    which leaves a field at its default, here 0, out:
    U{https://protobuf.dev/programming-guides/json/}).

    @raise MalformedAnswer: an index that is neither null nor a whole
        number (Gemini's is an int32).
    """
    index = candidate.get("index")
    if index is None:
        return 0
    if not isinstance(index, int) or isinstance(index, bool):
        raise MalformedAnswer("Gemini's candidate index is not a whole number; retry")
    return index


def check_indexes(indexes: list[int], asked: int | None) -> None:
    """
    Check the C{index}es of one answer's (or one stream event's)
    candidates: each names one of the choices asked for, once.

    @param asked: the number of choices asked for (the request's C{n},
        Gemini's C{candidateCount}); None: as many as there are indexes.
    @raise MalformedAnswer: an index outside 0 to C{asked} - 1, or given
        twice (Gemini numbers its candidates from 0,
        U{https://ai.google.dev/api/generate-content#candidate}).
    """
    bound = len(indexes) if asked is None else asked
    seen: set[int] = set()
    for index in indexes:
        if not 0 <= index < bound:
            raise MalformedAnswer(
                f"Gemini's candidate index {index} is out of range (0 to {bound - 1} for {bound} choices); retry"
            )
        if index in seen:
            raise MalformedAnswer(f"Gemini gave two candidates index {index}; retry")
        seen.add(index)


def logprobs(candidate: dict[str, Any]) -> dict[str, Any] | None:
    """
    OpenAI's C{choices[].logprobs} (C{{"content": [{"token", "logprob",
    "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}], "refusal":
    null}}) for a candidate's C{logprobsResult} (C{{"chosenCandidates":
    [{"token", "tokenId", "logProbability"}], "topCandidates":
    [{"candidates": [...]}]}}, the n-th top list for the n-th token,
    U{https://ai.google.dev/api/generate-content#LogprobsResult}); None when
    the candidate has none.  C{bytes} are the token's UTF-8 bytes; a token
    or log probability left out is proto3's default ("", 0.0).
    """
    result = candidate.get("logprobsResult")
    if not isinstance(result, dict):
        return None
    chosen = result.get("chosenCandidates")
    top = result.get("topCandidates")
    if not isinstance(top, list):
        top = []
    content = []
    for k, token in enumerate(chosen if isinstance(chosen, list) else ()):
        entry = _token_logprob(token)
        alternatives = top[k].get("candidates") if k < len(top) and isinstance(top[k], dict) else None
        entry["top_logprobs"] = (
            [_token_logprob(alternative) for alternative in alternatives] if isinstance(alternatives, list) else []
        )
        content.append(entry)
    return {"content": content, "refusal": None}


def _token_logprob(candidate: Any) -> dict[str, Any]:
    if not isinstance(candidate, dict):
        candidate = {}
    token = candidate.get("token")
    if not isinstance(token, str):
        token = ""
    logprob = candidate.get("logProbability")
    if isinstance(logprob, bool) or not isinstance(logprob, (int, float)):
        logprob = 0.0
    return {"token": token, "logprob": float(logprob), "bytes": list(token.encode("utf-8", "surrogatepass"))}


@attrs.define
class _Reading:
    """
    What one candidate's parts say: answer text, thought summary text,
    tool calls.
    """

    text: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = attrs.field(factory=list)
    #: The kinds of the parts skipped as not translated (L{_read}), each
    #: once, in the order met (the keys; at most L{MAX_KINDS_NAMED} + 1,
    #: L{_note}).
    skipped: dict[str, None] = attrs.field(factory=dict)
    #: The C{thoughtSignature} of the last answer text part that has one
    #: (L{text_signature}), or None.
    signature: str | None = None

    @property
    def said(self) -> bool:
        """
        Whether the parts carried an answer: text or a tool call.
        """
        return bool(self.text or self.tool_calls)


def _read(
    candidate: dict[str, Any],
    first_index: int = 0,
    log: ILogObserver | None = None,
    call_ids: dict[str, set[bytes]] | None = None,
) -> _Reading:
    """
    Read a candidate's parts (its C{Content},
    U{https://ai.google.dev/api/caching#Content}): C{text} parts, thought
    summaries (C{thought: true}) and C{functionCall} parts; a part of none
    of these kinds that carries nothing to pass on (a lone
    C{thoughtSignature}) is skipped, and so is a thought's image.  A part
    of another kind, which the gateway does not translate
    (C{executableCode}, C{codeExecutionResult}, C{functionResponse},
    C{videoMetadata}, a kind Google adds later: its kind is the name of
    its field that is not in L{PART_METADATA}), is skipped and its kind
    noted in C{skipped} (the first L{MAX_KINDS_NAMED} + 1 kinds met, so
    that a part of many fields costs no more than one of a few), for the
    caller to warn of, or to refuse a
    candidate that said nothing else (L{untranslated}).  Nothing is
    dropped silently: an answer that would lose what Gemini said is an
    error, never an empty C{stop} (litellm #21744).

    @param first_index: the OpenAI C{index} of the first tool call read.
    @param log: where a warning of a tool call's id goes (L{_tool_call}).
    @param call_ids: the C{functionCall} ids of the choice's calls read
        so far (its earlier events' in a stream), each with the name and
        C{args} of every call read under it, added to: a call with the
        id, name and C{args} of one of them is Gemini repeating it (a Gemini 3 stream
        may send a call again without its signature:
        allenhutchison/obsidian-gemini #230) and is left out, so that an
        agent runs it once; another call that reuses an id is kept (its
        OpenAI id is its own).
    @raise MalformedAnswer: a shape Gemini's API does not return:
        C{content} not an object, C{parts} not a list, a part not an
        object, C{text} not a string, a C{functionCall} not an object or
        without a name, C{args} not an object.
    @raise ModelFailed: an answer part of a kind OpenAI's chat shape cannot
        carry (L{UNSUPPORTED_PARTS}: images and other media that image
        models answer with), code C{unsupported_output}: the provider
        answered, so it is not failed over or held against it.
    """
    reading = _Reading()
    content = candidate.get("content")
    if content is None:
        return reading
    if not isinstance(content, dict):
        raise MalformedAnswer("Gemini's candidate content is not a JSON object; retry")
    parts = content.get("parts")
    if parts is None:
        return reading
    if not isinstance(parts, list):
        raise MalformedAnswer("Gemini's candidate content.parts is not a list; retry")
    text: list[str] = []
    reasoning: list[str] = []
    for part in parts:
        if not isinstance(part, dict):
            raise MalformedAnswer("a part of Gemini's answer is not a JSON object; retry")
        call = part.get("functionCall")
        if call is not None:
            if call_ids is not None and isinstance(call, dict):
                gemini_id = call.get("id")
                if isinstance(gemini_id, str) and gemini_id:
                    # Every call read under this id, not only the first:
                    # A, B, B (both B reusing A's id) is A and B.  Hashed,
                    # so that many calls under one id cost no quadratic work.
                    try:
                        this = orjson.dumps([call.get("name"), call.get("args")], option=orjson.OPT_SORT_KEYS)
                    except (TypeError, orjson.JSONEncodeError):
                        this = None
                    if this is not None:
                        read = call_ids.setdefault(gemini_id, set())
                        if this in read:
                            continue
                        read.add(this)
            reading.tool_calls.append(_tool_call(call, part, first_index + len(reading.tool_calls), log))
            continue
        said = part.get("text")
        signature = part.get("thoughtSignature")
        if isinstance(signature, str) and signature and not part.get("thought") and _text_like(part, said):
            # An answer text part's (an empty one's too, as Gemini 3
            # streams it, or a lone signature's): L{text_signature}.
            reading.signature = signature
        if said is not None:
            if not isinstance(said, str):
                raise MalformedAnswer("a text part of Gemini's answer is not a string; retry")
            (reasoning if part.get("thought") else text).append(said)
            continue
        kind = next((kind for kind in UNSUPPORTED_PARTS if part.get(kind) is not None), None)
        if kind is not None and not part.get("thought"):
            media = part[kind]
            mime = media.get("mimeType") if isinstance(media, dict) else None
            # "an inlineData part", "a fileData part".
            article = "an" if kind[0] in "aeiou" else "a"
            raise ModelFailed(
                f"Gemini answered with {article} {kind} part ({clip(mime) if isinstance(mime, str) else 'media'}), "
                "which OpenAI's chat completions cannot carry: use a model that answers in text (not an image "
                "model such as gemini-2.5-flash-image), or ask for text only",
                "unsupported_output",
            )
        if part.get("thought") or len(reading.skipped) > MAX_KINDS_NAMED:
            # Part of the thinking, left out as a thought's image is; or
            # enough kinds known to say there were more than are named.
            continue
        _note(reading.skipped, (kind for kind in part if kind not in PART_METADATA and part[kind] is not None))
    reading.text = "".join(text)
    reading.reasoning = "".join(reasoning)
    return reading


def _text_like(part: dict[str, Any], said: Any) -> bool:
    """
    Whether C{part} is a text part (C{said}, its C{text}, a string), or
    carries nothing but L{PART_METADATA} (a lone C{thoughtSignature}):
    a part whose signature L{text_signature} carries.  Its fields are
    looked at only when they are few.
    """
    return isinstance(said, str) or (len(part) <= len(PART_METADATA) and all(key in PART_METADATA for key in part))


def _note(kinds: dict[str, None], met: Iterable[str]) -> None:
    """
    Add the part kinds C{met} to C{kinds} (its keys, in the order met,
    each once) until it holds L{MAX_KINDS_NAMED} + 1: no more are named
    (L{_kinds}), and the kinds are the upstream's choice, any number of
    them (a part of 200,000 fields), so none past those is looked at.
    """
    for kind in met:
        if len(kinds) > MAX_KINDS_NAMED:
            return
        kinds[kind] = None


def _kinds(kinds: Collection[str]) -> str:
    """
    Part kinds for a message: the first L{MAX_KINDS_NAMED}, each clipped,
    then "..." when there are more.
    """
    named = ", ".join(clip(kind) for kind in islice(kinds, MAX_KINDS_NAMED))
    return named if len(kinds) <= MAX_KINDS_NAMED else f"{named}, ..."


def warn_skipped(kinds: Collection[str], log: ILogObserver | None = None) -> None:
    """
    Log, as a warning, that parts of C{kinds} were left out of an answer
    (the first L{MAX_KINDS_NAMED} named): once per answer, whole or
    streamed, as unknown finish reasons are (L{warn_unknown}), however
    many kinds the upstream sends.  To C{log} (L{logger}).
    """
    logger(log).warn(
        "Gemini answered with parts this gateway does not translate ({kinds}): left out, the rest of the answer kept",
        kinds=_kinds(kinds),
    )


def untranslated(kinds: Collection[str]) -> ModelFailed:
    """
    The error for a candidate whose parts, of C{kinds}, are none the
    gateway translates: no text, no tool call.  Code
    C{unsupported_output}, as for an image (L{_read}): Gemini answered, so
    it is not failed over or held against it.
    """
    return ModelFailed(
        f"Gemini answered with only {_kinds(kinds)} parts (no text, no tool call), which this gateway does "
        "not translate into OpenAI's chat completions: retry, or ask for a text answer",
        "unsupported_output",
    )


def _tool_call(call: Any, part: dict[str, Any], index: int, log: ILogObserver | None = None) -> dict[str, Any]:
    """
    OpenAI's tool call (with its stream C{index}) for a C{functionCall}
    part (C{{name, args?, id?}}, U{https://ai.google.dev/api/caching#FunctionCall});
    a signature too long to carry in its id is warned of to C{log}
    (L{new_call_id}).

    @raise MalformedAnswer: not an object, no name, C{args} not an object;
        L{ModelFailed} for a name no tool can be declared as
        (L{_declared_name}).
    """
    if not isinstance(call, dict):
        raise MalformedAnswer("Gemini's functionCall is not a JSON object; retry")
    name = call.get("name")
    if not isinstance(name, str) or not name:
        raise MalformedAnswer("Gemini's functionCall has no name; retry")
    if not FUNCTION_NAME.fullmatch(name):
        name = _declared_name(name)
    args = call.get("args")
    if args is not None and not isinstance(args, dict):
        raise MalformedAnswer(f"Gemini's functionCall {clip(name)!r} has args that are not a JSON object; retry")
    gemini_id = call.get("id")
    signature = part.get("thoughtSignature")
    return {
        "index": index,
        "id": new_call_id(
            gemini_id if isinstance(gemini_id, str) else None,
            signature if isinstance(signature, str) else None,
            log,
        ),
        "type": "function",
        "function": {"name": name, "arguments": orjson.dumps(args or {}).decode()},
    }


def _declared_name(name: str) -> str:
    """
    The name a tool was declared under (L{FUNCTION_NAME}: no dots, 64
    characters at most) for a C{functionCall} name Gemini wrote otherwise:
    with a prefix of its own before a dot or colon (C{default_api.get_time},
    google-gemini/cookbook #1374), the part after it.  Passed on as
    Gemini wrote it, the call would be refused when the agent sends it
    back in its history (and by any other provider).

    @raise ModelFailed: C{malformed_function_call}, no such part: the
        model named no function a tool can declare.
    """
    last = max(name.rfind("."), name.rfind(":"))
    if last >= 0 and FUNCTION_NAME.fullmatch(name[last + 1 :]):
        return name[last + 1 :]
    raise ModelFailed(
        f"Gemini's model called a function named {clip(name)!r}, which no tool can be declared as; retry",
        "malformed_function_call",
    )


def _candidates(document: dict[str, Any]) -> list[dict[str, Any]]:
    candidates = document.get("candidates")
    if not isinstance(candidates, list):
        return []
    return [c for c in candidates if isinstance(c, dict)]


def _blocked(document: dict[str, Any]) -> bool:
    # A prompt refused outright comes back with no candidates at all.
    feedback = document.get("promptFeedback")
    return isinstance(feedback, dict) and bool(feedback.get("blockReason"))


def blocked_refusal(document: dict[str, Any]) -> str:
    """
    The C{refusal} of the answer to a prompt Gemini blocked (L{_blocked}):
    its C{promptFeedback.blockReason} (C{SAFETY}, C{PROHIBITED_CONTENT},
    C{BLOCKLIST}, C{OTHER}: U{https://ai.google.dev/api/generate-content#BlockReason})
    said, so that an agent can tell a blocked prompt from a blocked
    answer (a candidate's C{finishReason} C{SAFETY}, whose content it
    keeps), both C{finish_reason: "content_filter"}.
    """
    reason = document["promptFeedback"]["blockReason"]
    shown = reason if isinstance(reason, str) and reason.isidentifier() else "given"
    return f"Gemini blocked the prompt (promptFeedback.blockReason {shown}): no answer was generated"


def _failed(candidate: dict[str, Any]) -> str | None:
    """
    The finish reason, checked: the model failing raises.
    """
    try:
        return finish_reason(candidate.get("finishReason"))
    except ModelFailed as e:
        message = candidate.get("finishMessage")
        if isinstance(message, str) and message:
            raise ModelFailed(f"{e} ({clip(message)})", e.code) from None
        raise


def from_gemini(
    document: dict[str, Any],
    model: str,
    completion_id: str,
    created: int,
    parallel_tool_calls: bool = True,
    asked: int | None = None,
    legacy_functions: bool = False,
    log: ILogObserver | None = None,
) -> dict[str, Any]:
    """
    The C{chat.completion} for a C{GenerateContentResponse}.

    @param model: the model asked for, reported when the answer does not
        name its C{modelVersion}.
    @param parallel_tool_calls: false when the request said
        C{parallel_tool_calls: false} (L{ChatRequest.one_call}, the rule
        every wire keeps): Gemini has no such switch, so each
        choice keeps only its first call (on Gemini 3 the one carrying the
        thought signature).
    @param asked: the number of choices asked for (C{n}); None: as many as
        the answer has candidates.  Choices are in C{index} order, 0 first,
        whatever Gemini's order.
    @param legacy_functions: the request declared the legacy
        C{functions} (L{ChatRequest.legacy_functions}): a choice's call is
        its C{message.function_call} (C{{name, arguments}}, no id), its
        finish reason C{function_call}; the legacy shape carries one call,
        so only the first is kept, as with C{parallel_tool_calls} false.
    @param log: where its warnings go (L{warn_unknown}, L{warn_skipped},
        a signature too long to carry: L{new_call_id}); None, the global
        log publisher.
    @raise ModelFailed: a candidate's C{finishReason} says the model
        failed; a candidate has a part the chat shape cannot carry (an
        image, L{_read}), or parts but none the gateway translates
        (L{untranslated}).  Parts of kinds not translated beside text or a
        tool call are left out, with a warning (L{warn_skipped}).
    @raise MalformedAnswer: an answer of a shape Gemini's API does not
        return (L{_read}), a candidate without a C{finishReason} (one that
        has not stopped), candidate indexes that are not whole numbers
        (L{_index}: none or null is 0), out of range or given twice
        (L{check_indexes}).
    """
    choices: list[dict[str, Any]] = []
    unknown = None
    skipped: dict[str, None] = {}
    for candidate in _candidates(document):
        reason = _failed(candidate)
        unknown = unknown or unknown_reason(candidate)
        if reason is None:
            # Google's reference: an empty finishReason means "the model
            # has not stopped generating"; a stream ends with an error
            # then (GeminiStream.complete), and so does a whole answer.
            raise MalformedAnswer(
                "Gemini's candidate has no finishReason: the model had not stopped, so its answer may be cut "
                "short; retry"
            )
        reading = _read(candidate, log=log, call_ids={})
        if reading.skipped and not reading.said:
            raise untranslated(reading.skipped)
        _note(skipped, reading.skipped)
        # OpenAI's message shape: refusal is null unless the model refused
        # (Gemini says so with a finish reason instead).
        message: dict[str, Any] = {"role": "assistant", "content": reading.text, "refusal": None}
        if reading.reasoning:
            message["reasoning_content"] = reading.reasoning
        if reading.signature is not None:
            message["extra_content"] = signed(reading.signature)
        if reading.tool_calls:
            calls = reading.tool_calls if parallel_tool_calls and not legacy_functions else reading.tool_calls[:1]
            for call in calls:
                del call["index"]
            message["content"] = reading.text or None
            if legacy_functions:
                message["function_call"] = calls[0]["function"]
            else:
                message["tool_calls"] = calls
            if reason == "stop":
                reason = "function_call" if legacy_functions else "tool_calls"
        choices.append(
            {
                "index": _index(candidate),
                "message": message,
                "finish_reason": reason,
                "logprobs": logprobs(candidate),
            }
        )
    if unknown is not None:
        warn_unknown(unknown, log)
    if skipped:
        warn_skipped(skipped, log)
    check_indexes([choice["index"] for choice in choices], asked)
    choices.sort(key=lambda choice: choice["index"])
    if not choices:
        if not _blocked(document):
            raise MalformedAnswer("Gemini returned no candidate (and no promptFeedback saying why); retry")
        choices = [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "", "refusal": blocked_refusal(document)},
                "finish_reason": "content_filter",
                "logprobs": None,
            }
        ]
    completion: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": document.get("modelVersion") or model,
        "choices": choices,
    }
    reported = usage(document.get("usageMetadata"))
    if reported is not None:
        completion["usage"] = reported
    return completion


@attrs.define
class GeminiStream:
    """
    One streamed answer: each C{GenerateContentResponse} event in, the
    C{chat.completion.chunk} it makes out.  Every chunk of one answer shares
    its id; the first delta of each choice carries the role.

    Each function call becomes a C{delta.tool_calls} entry whole (Gemini
    sends a call in one piece), with an C{index} of its own counted across
    the stream, so parallel calls never share one; with
    C{parallel_tool_calls} false only a choice's first call is sent (index
    0), later ones dropped.  With C{legacy_functions} a choice's first
    call is its C{delta.function_call} (C{{name, arguments}}, whole, in
    one chunk), later ones dropped, and its finish reason
    C{function_call}.  A candidate's C{logprobsResult} becomes the
    chunk's C{logprobs} (the tokens of that event, L{logprobs}).  A choice's
    C{finish_reason} is held back and sent once, in the last chunk of the
    choice (L{closing}), whatever Gemini repeats on earlier events, with
    the signature of its text, if any (L{text_signature}).

    The stream is L{complete} once every choice has a finish reason: Gemini
    has no end marker, so a stream that stops before that was cut short.
    """

    model: str
    completion_id: str
    created: int
    include_usage: bool = False
    #: False: at most one tool call per choice (the request's
    #: C{parallel_tool_calls: false}: L{ChatRequest.one_call}).
    parallel_tool_calls: bool = True
    #: The number of choices asked for (C{n}): each event's candidates
    #: are checked against it (L{check_indexes}); None: not checked but
    #: for negative and repeated indexes.
    asked: int | None = None
    #: The request declared the legacy C{functions}: calls go as
    #: C{delta.function_call}, one per choice (L{from_gemini}).
    legacy_functions: bool = False
    _started: set[int] = attrs.field(factory=set)
    #: choice index -> its finish reason, once Gemini has given one.
    _finished: dict[int, str] = attrs.field(factory=dict)
    #: choice index -> tool calls sent so far.
    _calls: dict[int, int] = attrs.field(factory=dict)
    #: choice index -> the C{functionCall} ids of its calls read so far
    #: (L{_read}: a repeated one is left out).
    _call_ids: dict[int, dict[str, set[bytes]]] = attrs.field(factory=dict)
    _usage: dict[str, Any] | None = None
    #: The C{modelVersion} the events name, once one has.
    _served_by: str | None = None
    #: The chunks' C{model}, fixed by the first chunk made: one stream
    #: names one model, as OpenAI's do, though C{modelVersion} may first
    #: come with a later event.
    _chunk_model: str | None = None
    #: An unknown finish reason has been logged (once per stream).
    _warned: bool = False
    #: Choices that have sent text or a tool call.
    _said: set[int] = attrs.field(factory=set)
    #: choice index -> the kinds of its parts skipped (L{_read}; the
    #: keys, at most L{MAX_KINDS_NAMED} + 1, L{_note}).
    _skipped: dict[int, dict[str, None]] = attrs.field(factory=dict)
    #: Skipped parts have been logged (once per stream, however many
    #: kinds the upstream sends: each event may bring a new one).
    _warned_skipped: bool = False
    #: choice index -> the signature of its last answer text part that
    #: had one, sent with its finish reason (L{text_signature}).
    _signatures: dict[int, str] = attrs.field(factory=dict)
    #: An event has carried something of the answer: a delta field but
    #: C{role} (text, reasoning, a call), logprobs with a token, or a
    #: finish reason (L{StreamTranslation.answer_begun
    #: <openclaw.providers.wire.StreamTranslation.answer_begun>}); not a
    #: C{{"text": ""}} part alone, nor C{usageMetadata}.
    answer_begun: bool = False
    #: Events that carried something of the answer
    #: (L{StreamTranslation.progress <openclaw.providers.wire.StreamTranslation.progress>}).
    progress: int = 0

    @property
    def complete(self) -> bool:
        return bool(self._finished) and self._finished.keys() >= self._started

    @property
    def finished(self) -> bool:
        """
        L{complete}, and every choice asked for (C{asked}) has finished:
        with C{n} 2, one that finished before the other began is complete
        but not finished.
        """
        return self.complete and (self.asked is None or len(self._finished) >= self.asked)

    @property
    def usage(self) -> dict[str, Any] | None:
        """
        The usage of the latest event that carried C{usageMetadata}, as
        OpenAI's C{usage}; None until one has.
        """
        return self._usage

    def chunk(self, document: Any) -> dict[str, Any] | None:
        """
        The chunk for one event, or None when it carries nothing to send.

        @raise GeminiStreamError: the event is an error, or not an object,
            or says that the model failed, or a choice ends (its finish
            reason comes) with parts but none the gateway translates sent
            (L{untranslated}), or is malformed (L{_read}; its
            candidates' indexes not whole numbers, L{_index}, or out of
            range or repeated, L{check_indexes}).  The chunk's choices are
            in index order.
        """
        if not isinstance(document, dict):
            raise GeminiStreamError("an event of the stream is not a JSON object")
        error = reported_error(document)
        if error is not None:
            raise GeminiStreamError(with_kind(error), STREAM_ERROR)
        reported = usage(document.get("usageMetadata"))
        if reported is not None:
            self._usage = reported
        served_by = document.get("modelVersion")
        if served_by:
            self._served_by = served_by
        candidates = _candidates(document)
        try:
            indexes = [_index(candidate) for candidate in candidates]
            check_indexes(indexes, self.asked if self.asked is not None else max(indexes, default=-1) + 1)
        except MalformedAnswer as e:
            raise GeminiStreamError(str(e), e.code) from None
        choices = []
        answered = False
        for index, candidate in sorted(zip(indexes, candidates, strict=True), key=lambda pair: pair[0]):
            try:
                reason = _failed(candidate)
            except MalformedAnswer as e:
                raise GeminiStreamError(str(e), e.code) from None
            unknown = unknown_reason(candidate)
            if unknown is not None and not self._warned:
                self._warned = True
                warn_unknown(unknown)
            delta: dict[str, Any] = {}
            if index not in self._started:
                self._started.add(index)
                delta["role"] = "assistant"
            try:
                reading = _read(candidate, self._calls.get(index, 0), call_ids=self._call_ids.setdefault(index, {}))
            except MalformedAnswer as e:
                raise GeminiStreamError(str(e), e.code) from None
            if reading.reasoning:
                delta["reasoning_content"] = reading.reasoning
            if reading.text:
                delta["content"] = reading.text
            if reading.signature is not None:
                self._signatures[index] = reading.signature
            calls = reading.tool_calls
            sent = self._calls.get(index, 0)
            if not self.parallel_tool_calls or self.legacy_functions:
                calls = calls[: max(0, 1 - sent)]
            if calls:
                if self.legacy_functions:
                    delta["function_call"] = calls[0]["function"]
                else:
                    delta["tool_calls"] = calls
                self._calls[index] = sent + len(calls)
            if reading.said:
                self._said.add(index)
            if reading.skipped:
                _note(self._skipped.setdefault(index, {}), reading.skipped)
            if reason is not None and self._skipped.get(index) and index not in self._said:
                # Gemini's finishReason: the model "stopped generating"
                # (https://ai.google.dev/api/generate-content#candidate),
                # and this choice said nothing the gateway translates.
                failure = untranslated(self._skipped[index])
                raise GeminiStreamError(str(failure), failure.code)
            if reading.skipped and not self._warned_skipped:
                self._warned_skipped = True
                warn_skipped(self._skipped[index])
            if reason is not None:
                self._finished[index] = reason
            tokens = logprobs(candidate)
            if reason is not None or len(delta) > ("role" in delta) or (tokens is not None and tokens["content"]):
                self.answer_begun = answered = True
            if delta or (tokens is not None and tokens["content"]):
                choices.append({"index": index, "delta": delta, "finish_reason": None, "logprobs": tokens})
        if not choices and _blocked(document) and not self._started:
            self._started.add(0)
            self._finished[0] = "content_filter"
            self.answer_begun = answered = True
            delta = {"role": "assistant", "refusal": blocked_refusal(document)}
            choices = [{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}]
        if answered:
            self.progress += 1
        if not choices:
            return None
        return self._chunk(choices)

    def closing(self) -> list[dict[str, Any]]:
        """
        The last chunks, once the stream is complete: each choice's finish
        reason (C{tool_calls} when it called a function, C{function_call}
        with L{legacy_functions}), then the usage
        chunk OpenAI sends last when asked to
        (C{stream_options.include_usage}).
        """
        chunks = []
        for index in sorted(self._finished):
            reason = self._finished[index]
            if reason == "stop" and self._calls.get(index):
                reason = "function_call" if self.legacy_functions else "tool_calls"
            signature = self._signatures.get(index)
            delta = {} if signature is None else {"extra_content": signed(signature)}
            chunks.append(self._chunk([{"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}]))
        if self.include_usage and self._usage is not None:
            chunks.append({**self._chunk([]), "usage": self._usage})
        return chunks

    def _first_chunk_model(self) -> str:
        model = self._chunk_model = self._served_by or self.model
        return model

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        """
        One C{chat.completion.chunk} of this answer.  With C{include_usage}
        it carries C{"usage": null}, as OpenAI's chunks other than the last
        do (its reference for C{stream_options.include_usage}: "All other
        chunks will also include a usage field, but with a null value");
        the usage chunk (L{closing}) sets it.
        """
        chunk: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self._chunk_model or self._first_chunk_model(),
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk


@attrs.frozen
class GeminiWire:
    """
    Google's Generative Language API: requests translated by L{to_gemini},
    answers by L{from_gemini}, streams by L{GeminiStream}.
    """

    #: Tool call ids carry Gemini's call ids and signatures
    #: (L{openclaw.providers.gemini.callids}), read back by L{to_gemini}.
    reads_carried_ids: ClassVar[bool] = True
    #: Functions only.
    tool_types: ClassVar[tuple[ToolType, ...]] = ()
    #: OpenAI's parts and image URLs only (a video_url part, an ms:// URL,
    #: is refused before the translation: L{refuse_media_kinds
    #: <openclaw.providers.wire.refuse_media_kinds>}).
    part_types: ClassVar[tuple[PartType, ...]] = ()
    url_schemes: ClassVar[tuple[UrlScheme, ...]] = ()

    def request_body(self, chat: ChatRequest, model: str) -> bytes:
        return orjson.dumps(to_gemini(chat.body, model, chat.references))

    def completion(
        self, body: bytes, model: str, created: int, chat: ChatRequest | None = None, log: ILogObserver | None = None
    ) -> Completion:
        parallel = chat is None or not chat.one_call
        asked = None if chat is None else choice_count(chat.body)
        legacy = chat is not None and chat.legacy_functions
        completion = from_gemini(json_object(body), model, completion_id(), created, parallel, asked, legacy, log)
        return Completion(orjson.dumps(completion), completion.get("usage"))

    def stream(self, chat: ChatRequest, model: str, created: int) -> GeminiStreamTranslation:
        return GeminiStreamTranslation(
            GeminiStream(
                model,
                completion_id(),
                created,
                chat.include_usage,
                not chat.one_call,
                choice_count(chat.body),
                chat.legacy_functions,
            )
        )


@attrs.define
class GeminiStreamTranslation:
    """
    Gemini events to chunks.  Gemini has no end marker: the stream is over
    when the connection's body ends, and whole if every choice has
    finished by then.
    """

    translation: GeminiStream
    ended: bool = False

    @property
    def complete(self) -> bool:
        return self.translation.complete

    @property
    def finished(self) -> bool:
        return self.translation.finished

    @property
    def usage(self) -> dict[str, Any] | None:
        return self.translation.usage

    @property
    def answer_begun(self) -> bool:
        return self.translation.answer_begun

    @property
    def progress(self) -> int:
        return self.translation.progress

    def payloads(self, event: Event) -> list[bytes]:
        try:
            document = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            raise StreamBroken("an event of the stream is not JSON") from None
        try:
            chunk = self.translation.chunk(document)
        except GeminiStreamError as e:
            raise StreamBroken(str(e), e.code) from None
        return [] if chunk is None else [orjson.dumps(chunk)]

    def closing(self) -> list[bytes]:
        return [orjson.dumps(chunk) for chunk in self.translation.closing()]
