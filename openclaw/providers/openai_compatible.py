"""
Providers whose API is OpenAI's own shape (Kimi, and most others): Bearer
auth, C{GET {base}/models}, C{POST {base}/chat/completions}, and a chat
format passed through untranslated.

A provider of this kind is a declaration on top of
L{OpenAICompatibleAdapter}: its id, display name, variables and defaults
(see L{openclaw.providers.kimi}); one that also serves OpenAI's
C{POST {base}/embeddings} declares it with
C{embeddings = OpenAIEmbeddings(default_model=...)}; one whose thinking
models require the C{reasoning_content} of earlier tool-call turns
declares C{wire = ReasoningKeptWire(thinks=...)}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import attrs
import orjson
from twisted.logger import ILogObserver

from openclaw.dataplane.errors import STREAM_ERROR
from openclaw.dataplane.request import ChatRequest, PartType, ToolType, UrlScheme, choice_count, no_arguments
from openclaw.dataplane.sse import DONE, Event
from openclaw.providers.base import ProviderAdapter
from openclaw.providers.embeddings import EmbeddingsBatch, number_lists
from openclaw.providers.errors import MalformedResponse, Refusal, RefusalKind
from openclaw.providers.fetch import Exchange
from openclaw.providers.wire import (
    OPENAI_IMAGE_TYPES,
    Completion,
    ImageTypes,
    MalformedAnswer,
    StreamBroken,
    Wire,
    json_object,
    json_or_none,
    refuse_image_types,
    reported_error,
    with_kind,
)


@attrs.frozen
class OpenAIWire:
    """
    An OpenAI-compatible chat API: the caller's body with the model
    substituted, and the answer passed back as it came, but for four
    normalisations: usage reported inside C{choices[0].usage} (as Moonshot
    does) is also given where OpenAI puts it, the top-level C{usage} (and
    a provider's own usage fields made OpenAI's, L{usage_shape}); a
    tool call without arguments (Moonshot's C{""}) gets OpenAI's C{"{}"};
    a request that said C{parallel_tool_calls: false} gets a choice's
    first tool call only, whatever the model answered (L{first_call_only}),
    as from Gemini; and a request that declared its functions in the legacy
    C{functions} field (sent upstream as C{tools}) is answered in the
    legacy shape, as OpenAI answers it and as the Gemini translation does
    (L{legacy_choice}).
    """

    #: Ids are passed through as they came: none carries anything.
    reads_carried_ids: ClassVar[bool] = False
    #: The kinds of tool the API takes beside functions
    #: (L{Wire.tool_types <openclaw.providers.wire.Wire.tool_types>});
    #: none unless declared (Kimi's: Moonshot's built-in tools).
    tool_types: tuple[ToolType, ...] = attrs.field(default=(), kw_only=True)
    #: The content part types and media URL schemes the API takes beside
    #: OpenAI's (L{Wire.part_types <openclaw.providers.wire.Wire.part_types>},
    #: L{Wire.url_schemes <openclaw.providers.wire.Wire.url_schemes>}); none
    #: unless declared (Kimi's: Moonshot's video_url parts and ms:// URLs).
    part_types: tuple[PartType, ...] = attrs.field(default=(), kw_only=True)
    url_schemes: tuple[UrlScheme, ...] = attrs.field(default=(), kw_only=True)
    #: The image types the API takes in a data URL; a request holding
    #: another is refused (L{refuse_image_types}).  OpenAI's unless
    #: declared (Kimi's: Moonshot's).
    image_types: ImageTypes = attrs.field(default=OPENAI_IMAGE_TYPES, kw_only=True)
    #: A history's Google C{extra_content.google} (a Gemini answer's
    #: thought signature, where Google's own OpenAI-compatible endpoint
    #: puts it) is sent, as every field of a message is; off (Kimi's), it
    #: is taken out (L{ChatRequest.without_google_extras}).
    google_extras: bool = attrs.field(default=True, kw_only=True)
    #: The provider's own usage shape made OpenAI's: given an answer's
    #: C{usage} object (whole, or a stream's), the object the client gets,
    #: or the same object when nothing is added; None for a provider whose
    #: usage is OpenAI's (Kimi's: Moonshot's top-level C{cached_tokens} also
    #: given as C{prompt_tokens_details.cached_tokens},
    #: L{moonshot_usage <openclaw.providers.kimi.moonshot_usage>}).
    usage_shape: Callable[[dict[str, Any]], dict[str, Any]] | None = attrs.field(default=None, kw_only=True)
    #: An assistant message with an empty C{content} (C{""}, text parts
    #: holding none, or none at all) is sent as it is; off (Kimi's:
    #: Moonshot refuses every empty assistant message), one with tool calls
    #: is sent without C{content} ("text content is empty":
    #: MoonshotAI/kimi-cli#2621 for C{""}, BerriAI/litellm#42186 for the
    #: parts), which OpenAI's format allows beside C{tool_calls}; one
    #: without, with its C{refusal} as its text when it has one, else left
    #: out of the history ("the message at position N with role
    #: 'assistant' must not be empty": AstrBotDevs/AstrBot#7200; such a
    #: turn is what an answer cut before any text, a blocked prompt or
    #: thoughts alone leave in an agent's history, a Gemini answer's
    #: included).
    empty_assistant_content: bool = attrs.field(default=True, kw_only=True)
    #: Each function tool's C{parameters} as the provider's validator takes
    #: them (Kimi's: L{moonshot_parameters
    #: <openclaw.providers.kimi.moonshot_parameters>}), returned as they are
    #: when nothing changes; None: sent as the client wrote them.
    tool_parameters: Callable[[Any], Any] | None = attrs.field(default=None, kw_only=True)
    #: An assistant message's C{refusal} content parts (OpenAI's
    #: C{{"type": "refusal", "refusal": ...}}, as an answer's refusal is
    #: kept in a history) are sent as they are; off (Kimi's: Moonshot's
    #: content parts are text, image_url and video_url only), each is sent
    #: as a text part holding the refusal, as its C{refusal} field is made
    #: text when it has no content.
    refusal_parts: bool = attrs.field(default=True, kw_only=True)

    def request_body(self, chat: ChatRequest, model: str) -> bytes:
        """
        The caller's body with C{model}, and C{stream_options.include_usage}
        on a stream; an image data URL's type in lower case
        (L{refuse_image_types}); an assistant message without its empty
        C{content}, or left out, unless L{empty_assistant_content}; each
        function tool's C{parameters} through L{tool_parameters}.  The
        caller's messages and tools are not changed (a copy is sent).

        @raise APIError: 400 for an image data URL of a type the API does
            not take (L{image_types}).
        """
        chat = refuse_image_types(chat, self.image_types)
        if chat.extra_content and not self.google_extras:
            chat = chat.without_google_extras()
        body = {**chat.body, "model": model}
        if not (self.refusal_parts and self.empty_assistant_content):
            messages = body["messages"]
            for message in messages:
                # Validated: each message is an object.
                if message["role"] == "assistant" and (
                    (not self.refusal_parts and _holds_refusal_part(message))
                    or (not self.empty_assistant_content and _holds_empty(message))
                ):
                    body["messages"] = self._assistant_messages(messages)
                    break
        if self.tool_parameters is not None and body.get("tools"):
            tools = body["tools"]
            sent = [_reshaped(tool, self.tool_parameters) for tool in tools]
            if any(new is not old for new, old in zip(sent, tools, strict=True)):
                body["tools"] = sent
        if chat.stream and not chat.include_usage:
            # Every stream's usage is counted: ask for it even when the
            # client did not (OpenAI's stream_options.include_usage); the
            # usage chunk is taken out on the way back (OpenAIStream).
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return orjson.dumps(body)

    def _assistant_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """
        C{messages} with their assistant messages as the provider takes
        them: refusal parts as text unless L{refusal_parts}, without empty
        content (or left out) unless L{empty_assistant_content}.
        """
        if not self.refusal_parts:
            messages = [_refusal_parts_as_text(message) for message in messages]
        if not self.empty_assistant_content:
            messages = [sent for sent in map(_without_empty_content, messages) if sent is not None]
        return messages

    def completion(
        self, body: bytes, model: str, created: int, chat: ChatRequest | None = None, log: ILogObserver | None = None
    ) -> Completion:
        # Nothing logged: no warning to hand to log.
        document = json_object(body)
        choices = document.get("choices")
        if not isinstance(choices, list):
            error = reported_error(document)
            if error is not None:
                # A 200 carrying an error ("Your account is suspended"):
                # the provider's own words, with its type and code.
                raise MalformedAnswer(f"the provider answered 200 with an error: {with_kind(error)}")
            raise MalformedAnswer('the answer has no "choices" list')
        for choice in choices:
            if type(choice) is not dict or type(choice.get("index", 0)) is not int:
                # As in a stream (OpenAIStream): OpenAI's choices are objects with an integer index.
                raise MalformedAnswer("a choice of the answer is not an object with an integer index")
        usage = document.get("usage")
        changed = None
        if usage is None:
            usage = _choice_usage(choices)
            if usage is not None:
                changed = {**document, "usage": usage}
        if isinstance(usage, dict) and self.usage_shape is not None:
            shaped = self.usage_shape(usage)
            if shaped is not usage:
                usage, changed = shaped, {**(changed or document), "usage": shaped}
        if any(map(_calls_tools, choices)):
            if not all(map(_listed_calls, choices)):
                raise MalformedAnswer('a choice\'s "tool_calls" is not a list')
            if _fill_empty_arguments(choices):
                changed = changed or document
            _check_calls(choices)
            if chat is not None and chat.one_call:
                shape = legacy_choice if chat.legacy_functions else first_call_only
                changed = {**(changed or document), "choices": [shape(choice) for choice in choices]}
        return Completion(body if changed is None else orjson.dumps(changed), usage)

    def stream(self, chat: ChatRequest, model: str, created: int) -> OpenAIStream:
        return OpenAIStream(
            include_usage=chat.include_usage,
            legacy_functions=chat.legacy_functions,
            asked=choice_count(chat.body),
            one_call=chat.one_call,
            usage_shape=self.usage_shape,
        )


def _reshaped(tool: Any, reshape: Callable[[Any], Any]) -> Any:
    """
    C{tool} (validated: an object) with its function's C{parameters}
    through C{reshape}; C{tool} itself when they do not change.
    """
    function = tool.get("function")
    if not isinstance(function, dict) or "parameters" not in function:
        return tool
    if function["parameters"] is None:
        # Null is not set (as OpenAI reads it, and Gemini's translation):
        # left out, where Moonshot refused a null.
        return {**tool, "function": {key: value for key, value in function.items() if key != "parameters"}}
    parameters = reshape(function["parameters"])
    if parameters is function["parameters"]:
        return tool
    return {**tool, "function": {**function, "parameters": parameters}}


def _calls_tools(choice: Any) -> bool:
    """
    Whether a choice (whole or streamed) carries tool calls, or finished
    for them.
    """
    if not isinstance(choice, dict):
        return False
    said = choice.get("message") or choice.get("delta")
    return bool(isinstance(said, dict) and said.get("tool_calls")) or choice.get("finish_reason") == "tool_calls"


def _empty(value: Any) -> bool:
    """
    Whether a field of a streamed choice says nothing: null, C{""}, C{[]}
    or C{{}}.
    """
    return value is None or value == "" or value == [] or value == {}


def _begins_answer(choice: dict[str, Any]) -> bool:
    """
    Whether a streamed choice (an object whose C{delta}, if any, is one)
    carries something of the answer (L{StreamTranslation.answer_begun
    <openclaw.providers.wire.StreamTranslation.answer_begun>}): a finish reason,
    logprobs with a token, or a delta field but C{role} that is not
    L{_empty} (text, C{reasoning_content}, a refusal, tool calls, a legacy
    C{function_call}, or a field the gateway does not know).  Moonshot's
    first chunk C{{"role": "assistant", "content": ""}} does not, nor
    OpenAI's C{{"role": "assistant", "content": "", "refusal": null}}.
    """
    if choice.get("finish_reason") is not None:
        return True
    logprobs = choice.get("logprobs")
    if not (_empty(logprobs) or (isinstance(logprobs, dict) and all(map(_empty, logprobs.values())))):
        return True
    delta = choice.get("delta")
    return isinstance(delta, dict) and any(key != "role" and not _empty(value) for key, value in delta.items())


def _listed_calls(choice: Any) -> bool:
    """
    Whether a choice's (whole or streamed) C{tool_calls}, if any, are a
    list, as OpenAI's API reference has them.
    """
    said = (choice.get("message") or choice.get("delta")) if isinstance(choice, dict) else None
    calls = said.get("tool_calls") if isinstance(said, dict) else None
    return calls is None or isinstance(calls, list)


#: OpenAI's tool call, as a 502 for another shape names it
#: (U{https://platform.openai.com/docs/api-reference/chat/object}).
CALL_SHAPE = '{"id": "...", "type": "function", "function": {"name": "...", "arguments": "..."}}'


def _call_fault(call: Any) -> str | None:
    """
    What keeps a whole answer's tool call (after L{_fill_empty_arguments})
    from being OpenAI's (L{CALL_SHAPE}; U{https://platform.openai.com/docs/api-reference/chat/object}:
    C{id}, C{type}, C{function.name} and C{function.arguments} are
    strings, the arguments JSON as text), or None when nothing does: an
    agent's SDK reads the call as it comes (the openai SDK does not check
    the types; an agent then fails on C{call.function.name} of a string
    function, or C{json.loads} of arguments that are an object), and the
    gateway refuses a history whose call has no id or name.  Moonshot's
    built-in tool calls (C{"type": "builtin_function"}) have the same shape.
    """
    if not isinstance(call, dict):
        return "is not an object"
    if not isinstance(call.get("id"), str) or not call["id"]:
        return "has no id (a non-empty string)"
    if call.get("type") is not None and not isinstance(call["type"], str):
        return "has a type that is not a string"
    function = call.get("function")
    if function is None:
        return "has no function ({name, arguments})"
    if not isinstance(function, dict):
        return "has a function that is not an object ({name, arguments})"
    if not isinstance(function.get("name"), str) or not function["name"]:
        return "has no function name (a non-empty string)"
    if not isinstance(function.get("arguments"), str):
        return "has arguments that are not a string (OpenAI's are the JSON object as text)"
    return None


def _check_calls(choices: list[Any]) -> None:
    """
    Refuse a whole answer with a tool call that is not OpenAI's shape
    (L{_call_fault}): passed on, the agent's SDK would hand it over broken.

    @raise MalformedAnswer: naming the call and what is wrong (a 502,
        the provider's failure, as any answer not of its API's shape).
    """
    for i, choice in enumerate(choices):
        message = choice.get("message")
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        for j, call in enumerate(calls if isinstance(calls, list) else ()):
            fault = _call_fault(call)
            if fault is not None:
                raise MalformedAnswer(
                    f"the answer's choices[{i}].message.tool_calls[{j}] {fault}, not OpenAI's tool call {CALL_SHAPE}"
                )


def _delta_fault(call: Any, begins: bool) -> str | None:
    """
    What keeps a streamed tool call delta from being OpenAI's
    (U{https://platform.openai.com/docs/api-reference/chat-streaming}:
    C{index} an integer from 0, C{id}, C{type}, C{function.name} and
    C{function.arguments} strings, each piece of the arguments a piece of
    text), or None: null or absent fields are none (the openai SDK reads
    them so; an absent or null C{index} is given one,
    L{OpenAIStream._indexed}).  The first piece of a call (C{begins})
    names it: its C{id} and C{function.name}, as OpenAI's does and as a
    whole answer's call has them (L{_call_fault}).
    """
    if not isinstance(call, dict):
        return "is not an object"
    index = call.get("index")
    if index is not None and (type(index) is not int or index < 0):
        return "has an index that is not a whole number from 0 (the openai SDK's stream helper lists calls by it)"
    for field in ("id", "type"):
        if call.get(field) is not None and not isinstance(call[field], str):
            return f"has {'an' if field == 'id' else 'a'} {field} that is not a string"
    function = call.get("function")
    if function is not None and not isinstance(function, dict):
        return "has a function that is not an object"
    function = function or {}
    if function.get("name") is not None and not isinstance(function["name"], str):
        return "has a function name that is not a string"
    if function.get("arguments") is not None and not isinstance(function["arguments"], str):
        return "has arguments that are not a string (OpenAI's are the JSON object as text, in pieces)"
    if begins and not (isinstance(call.get("id"), str) and call["id"]):
        return "begins a call without its id (a non-empty string)"
    if begins and not (isinstance(function.get("name"), str) and function["name"]):
        return "begins a call without its function name (a non-empty string)"
    return None


def _delta_calls(choice: Any) -> tuple[dict[str, Any], list[Any]]:
    """
    A streamed choice's C{delta} and the C{tool_calls} list it holds;
    C{({}, [])} for a choice without one (or one not of OpenAI's shape).
    """
    delta = choice.get("delta") if isinstance(choice, dict) else None
    calls = delta.get("tool_calls") if isinstance(delta, dict) else None
    return (delta, calls) if isinstance(delta, dict) and isinstance(calls, list) else ({}, [])


def _continued(call: dict[str, Any]) -> dict[str, Any]:
    """
    A streamed tool call delta that continues its call, without the
    C{id}, C{type} and C{function.name} it repeated.
    """
    continued = {key: value for key, value in call.items() if key not in ("id", "type")}
    function = call.get("function")
    if isinstance(function, dict) and "name" in function:
        continued["function"] = {key: value for key, value in function.items() if key != "name"}
    return continued


def _fill_empty_arguments(choices: list[Any]) -> bool:
    """
    Give each whole answer's tool call that has L{no_arguments} OpenAI's
    C{"{}"}, in place: an agent parses C{arguments} as JSON, and sends the
    call back in its next turn.

    @return: whether any call was given them.
    """
    filled = False
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and no_arguments(function.get("arguments")):
                function["arguments"] = "{}"
                filled = True
    return filled


def first_call_only(choice: Any, first: int = 0) -> Any:
    """
    A choice (C{message} or streamed C{delta}) with its first tool call
    only, later ones left out (L{ChatRequest.one_call
    <openclaw.dataplane.request.ChatRequest.one_call>}): a whole message
    keeps the first call listed, a streamed delta the pieces of the call
    of index C{first} (every piece has an index by then:
    L{OpenAIStream._indexed}; the stream passes the index of the choice's
    first call, L{OpenAIStream._first_calls}) renumbered 0, and a delta
    left with none of them has no C{tool_calls}.  The choice itself when nothing is left
    out.
    """
    if not isinstance(choice, dict):
        return choice
    kept_choice = choice
    for field in ("message", "delta"):
        said = choice.get(field)
        calls = said.get("tool_calls") if isinstance(said, dict) else None
        if not isinstance(calls, list):
            continue
        if field == "message":
            kept = calls[:1]
        else:
            # Its pieces numbered 0, as OpenAI numbers a lone call (the
            # openai SDK's stream helper reads tool_calls[index]).
            kept = [
                call if call.get("index", 0) == 0 else {**call, "index": 0}
                for call in calls
                if isinstance(call, dict) and call.get("index", 0) == first
            ]
        if len(kept) == len(calls) and all(mine is theirs for mine, theirs in zip(kept, calls, strict=True)):
            continue
        assert isinstance(said, dict)
        said = {**said, "tool_calls": kept} if kept else {name: v for name, v in said.items() if name != "tool_calls"}
        kept_choice = {**kept_choice, field: said}
    return kept_choice


def legacy_choice(choice: Any) -> Any:
    """
    A choice (C{message} or streamed C{delta}) in the shape OpenAI answers
    a request that declared the legacy C{functions}
    (U{https://platform.openai.com/docs/api-reference/chat/object}):
    the first tool call (L{first_call_only}; a stream's pieces of it are
    numbered 0 by then, L{OpenAIStream}) as C{function_call}
    (C{{name, arguments}}; a streamed delta's pieces of it as they come),
    later calls left out (that shape holds one), and finish reason
    C{function_call} for C{tool_calls}.
    """
    choice = first_call_only(choice)
    if not isinstance(choice, dict):
        return choice
    choice = dict(choice)
    for field in ("message", "delta"):
        said = choice.get(field)
        if isinstance(said, dict) and "tool_calls" in said:
            said = {name: value for name, value in said.items() if name != "tool_calls"}
            calls = choice[field]["tool_calls"]
            first = calls[0] if isinstance(calls, list) and calls and isinstance(calls[0], dict) else None
            function = first.get("function") if first is not None else None
            if isinstance(function, dict):
                said["function_call"] = {
                    name: function[name] for name in ("name", "arguments") if function.get(name) is not None
                }
            choice[field] = said
    if choice.get("finish_reason") == "tool_calls":
        choice["finish_reason"] = "function_call"
    return choice


def _choice_usage(choices: list[Any]) -> Any:
    """
    The usage Moonshot puts in C{choices[0].usage}, or None.
    """
    first = choices[0] if choices else None
    return first.get("usage") if isinstance(first, dict) else None


@attrs.define
class OpenAIStream:
    """
    Events passed on as they are; complete once C{[DONE]} has come, or
    once every choice asked for has its C{finish_reason} and the usage has
    come (it is asked for, and comes after them: only C{[DONE]} is missing).

    The usage is always asked for upstream (see L{OpenAIWire.request_body})
    and kept in L{usage}: the usage-only chunk (C{"choices": []}) reaches
    the client only when it asked for it (C{include_usage}).  Moonshot may
    put the usage inside the last chunk's C{choices[0].usage} instead
    (higress PR #1568), or beside that chunk's choices (as DeepSeek and
    vLLM do): it is taken from there, and sent to a client that asked as
    OpenAI's usage chunk, last; wherever it comes, it is given the
    wire's L{usage_shape} first.  A tool call delta without an C{index}
    is given one (L{_indexed}); with L{one_call}, the pieces of a
    choice's later calls are left out: those of any call but the first
    the choice began (whatever its index: a model may number its calls
    from 1, or send the call of index 1 first), as a whole answer keeps
    the first call listed.
    """

    #: The client asked for the usage (C{stream_options.include_usage}).
    include_usage: bool = False
    #: The request declared the legacy C{functions}: tool calls are sent
    #: as C{function_call} (L{legacy_choice}).
    legacy_functions: bool = False
    #: The number of choices asked for (C{n}).
    asked: int = 1
    #: The provider's usage made OpenAI's (L{OpenAIWire.usage_shape}):
    #: applied to the usage wherever it comes, before it is kept and sent.
    usage_shape: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    #: At most one tool call per choice (L{ChatRequest.one_call
    #: <openclaw.dataplane.request.ChatRequest.one_call>}): the pieces of
    #: a choice's later calls are left out (L{first_call_only}).
    one_call: bool = False
    ended: bool = False
    usage: dict[str, Any] | None = None
    #: A choice has carried something of the answer (L{_begins_answer};
    #: L{StreamTranslation.answer_begun <openclaw.providers.wire.StreamTranslation.answer_begun>}).
    answer_begun: bool = False
    #: Events that carried something of the answer (L{_begins_answer};
    #: L{StreamTranslation.progress <openclaw.providers.wire.StreamTranslation.progress>}).
    progress: int = 0
    #: The usage chunk has gone to the client.
    _usage_sent: bool = False
    #: C{id}, C{created}, C{model} of the chunk that carried the usage in
    #: its choice, for the usage chunk made from it.
    _head: dict[str, Any] = attrs.field(factory=dict)
    #: Per C{(choice index, tool call index)}, whether every piece of the
    #: call's C{arguments} so far was empty (L{no_arguments}): such a call
    #: is given C{"{}"} before its choice's finish reason.
    _unargued: dict[tuple[Any, Any], bool] = attrs.field(factory=dict)
    #: The indexes of the choices that have had their C{finish_reason}.
    _finished: set[int] = attrs.field(factory=set)
    #: Per choice index: how many tool calls have begun, the index of the
    #: current one and its id (L{_indexed}).
    _calls: dict[Any, tuple[int, int, Any]] = attrs.field(factory=dict)
    #: Per choice index, with L{one_call}: the index of the first tool
    #: call the choice began, the only one whose pieces are kept
    #: (L{first_call_only}).
    _first_calls: dict[Any, int] = attrs.field(factory=dict)
    #: The C{(choice index, call index)} of the tool calls begun (the
    #: first piece of another must name it: L{_check_deltas}), each with
    #: its number among its choice's calls, in the order they began
    #: (L{_numbered}).
    _begun: dict[tuple[int, int], int] = attrs.field(factory=dict)
    #: Per choice index, how many tool calls it has begun (L{_begun}).
    _counts: dict[int, int] = attrs.field(factory=dict)

    @property
    def complete(self) -> bool:
        return self.ended or (self.usage is not None and len(self._finished) >= self.asked)

    @property
    def finished(self) -> bool:
        return self.complete

    def payloads(self, event: Event) -> list[bytes]:
        data = event.data
        if data == DONE:
            self.ended = True
            return []
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise StreamBroken("an event of the stream is not JSON") from None
        if not isinstance(document, dict):
            raise StreamBroken("an event of the stream is not a JSON object")
        error = reported_error(document)
        if error is not None:
            raise StreamBroken(with_kind(error), STREAM_ERROR)
        choices = document.get("choices")
        usage = document.get("usage")
        rewritten = b"\n" in data  # a multi-line event, sent on one line
        if isinstance(usage, dict) and self.usage_shape is not None:
            shaped = self.usage_shape(usage)
            if shaped is not usage:
                usage, document, rewritten = shaped, {**document, "usage": shaped}, True
        if type(choices) is list:
            carried = False
            for choice in choices:
                if type(choice) is not dict or type(choice.get("delta", {})) is not dict:
                    # Nothing of it could reach the client: not dropped unsaid.
                    raise StreamBroken(
                        "a choice of the stream is not an object with a delta object", "upstream_malformed"
                    )
                index = choice.get("index", 0)
                if type(index) is not int or not 0 <= index < self.asked:
                    # Only the choices asked for make the answer (and an
                    # index is what a choice's calls are kept by).
                    raise StreamBroken(
                        f"a choice's index is not one of the {self.asked} asked for (n)", "upstream_malformed"
                    )
                if choice.get("finish_reason") is not None:
                    self._finished.add(index)
                if _begins_answer(choice):
                    self.answer_begun = carried = True
            if carried:
                self.progress += 1
        elif choices is not None:
            raise StreamBroken('the stream\'s "choices" is not a list', "upstream_malformed")
        if isinstance(usage, dict):
            self.usage = usage
            if not choices:
                if not self.include_usage:
                    return []
                self._usage_sent = True
            else:
                # On a chunk with choices (its finish, as DeepSeek and vLLM
                # send it): OpenAI's usage is null there, and comes last in
                # a chunk of its own (L{closing}), made from this one.
                self._head = {name: document[name] for name in ("id", "created", "model") if name in document}
                document, rewritten = {**document, "usage": None}, True
                if not self.include_usage:
                    del document["usage"]
                if isinstance(choices, list) and isinstance(choices[0], dict) and "usage" in choices[0]:
                    # Moonshot's copy inside the choice too: not OpenAI's.
                    first = {key: value for key, value in choices[0].items() if key != "usage"}
                    choices = document["choices"] = [first, *choices[1:]]
        elif isinstance(choices, list) and choices and isinstance(choices[0], dict) and "usage" in choices[0]:
            first = dict(choices[0])
            usage = first.pop("usage")
            if isinstance(usage, dict):
                self.usage = usage if self.usage_shape is None else self.usage_shape(usage)
                self._head = {name: document[name] for name in ("id", "created", "model") if name in document}
            choices = [first, *choices[1:]]
            document, rewritten = {**document, "choices": choices}, True
        if not isinstance(choices, list) or not (self._unargued or any(map(_calls_tools, choices))):
            return [orjson.dumps(document) if rewritten else data]
        if not all(map(_listed_calls, choices)):
            raise StreamBroken('a choice\'s "tool_calls" is not a list', "upstream_malformed")
        # Before _indexed, which gives an index to a piece without one.
        self._check_deltas(choices, begun=None)
        indexed = self._indexed(choices)
        if indexed is not None:
            document, choices, rewritten = {**document, "choices": indexed}, indexed, True
        self._check_deltas(choices, begun=self._begun)
        numbered = self._numbered(choices)
        if numbered is not None:
            document, choices, rewritten = {**document, "choices": numbered}, numbered, True
        if self.one_call:
            # Before _fills: a call left out is given no "{}" either.
            firsts = [first_call_only(choice, self._first_call(choice)) for choice in choices]
            if any(first is not choice for first, choice in zip(firsts, choices, strict=True)):
                document, choices, rewritten = {**document, "choices": firsts}, firsts, True
        fills = self._fills(document, choices)
        if not fills:
            return [self._encode(document) if self.legacy_functions or rewritten else data]
        # The "{}" pieces go after this chunk's deltas (a call may begin in
        # it) and before its finish reasons, sent last in a chunk of their own.
        head = {name: document[name] for name in ("id", "object", "created", "model") if name in document}
        finishing = [c for c in choices if isinstance(c, dict) and c.get("finish_reason") is not None]
        finished = {
            **head,
            "choices": [
                {"index": c.get("index", 0), "delta": {}, "finish_reason": c["finish_reason"]} for c in finishing
            ],
        }
        before = [{**c, "finish_reason": None} if c in finishing else c for c in choices]
        said = "usage" in document or any(isinstance(c, dict) and (c.get("delta") or c.get("logprobs")) for c in before)
        sent = [self._encode({**document, "choices": before})] if said else []
        return [*sent, *map(self._encode, fills), self._encode(finished)]

    def _check_deltas(self, choices: list[Any], begun: dict[tuple[int, int], int] | None) -> None:
        """
        Refuse a tool call delta of C{choices} that is not OpenAI's
        (L{_delta_fault}): the stream is broken, not passed on for the
        agent's SDK to fail on (or to read a call with no name).

        @param begun: None to check each piece's own shape (before
            L{_indexed}); else the C{(choice index, call index)} of the
            calls begun before these pieces, each piece's by then, to
            check that the first piece of each call names it (noted in
            it, with its number: L{_numbered}).
        @raise StreamBroken: C{upstream_malformed}, naming the piece.
        """
        for choice in choices:
            _, calls = _delta_calls(choice)
            for call in calls:
                which = (choice.get("index", 0), call.get("index", 0) if isinstance(call, dict) else 0)
                begins = begun is not None and which not in begun
                fault = _delta_fault(call, begins)
                if fault is not None:
                    raise StreamBroken(
                        f"a tool call piece of choice {which[0]} of the stream {fault}, not OpenAI's tool call "
                        f"delta ({CALL_SHAPE}, with its index)",
                        "upstream_malformed",
                    )
                if begins:
                    assert begun is not None
                    begun[which] = self._counts.get(which[0], 0)
                    self._counts[which[0]] = begun[which] + 1

    def _numbered(self, choices: list[Any]) -> list[Any] | None:
        """
        C{choices} with each tool call piece's C{index} (its own, or the
        one L{_indexed} gave it) made its call's number among its
        choice's calls, in the order they began (L{_begun}): 0, 1, 2, as
        OpenAI numbers them.  The openai SDK's stream helper lists a
        choice's calls by index, inserting a new one at the end: a stream
        numbering its calls from 1, skipping a number, or beginning the
        call of index 1 first failed there (C{IndexError}, or two calls'
        arguments joined in one).  L{None} when every index is already
        its call's number (any stream of OpenAI's).
        """
        numbered: list[Any] = []
        changed = False
        for choice in choices:
            delta, calls = _delta_calls(choice)
            if not calls:
                numbered.append(choice)
                continue
            which = choice.get("index", 0)
            out = []
            for call in calls:
                number = self._begun[(which, call["index"])]
                if number != call["index"]:
                    call, changed = {**call, "index": number}, True
                out.append(call)
            numbered.append({**choice, "delta": {**delta, "tool_calls": out}})
        return numbered if changed else None

    def _indexed(self, choices: list[Any]) -> list[Any] | None:
        """
        C{choices} with an C{index} given to each tool call delta that has
        none (OpenAI's chunks always have one; the openai SDK's stream
        helpers fail without it; Moonshot's API reference leaves it
        optional): a delta with an C{id} other than its choice's current
        call's begins the choice's next call, any other continues the
        current one.  Deltas with an index keep it, and make the call they
        name the current one.  A piece that repeats its call's C{id} loses
        it (and the C{type} and name it repeats: L{_continued}).  L{None}
        when nothing is changed.
        """
        indexed: list[Any] = []
        given = False
        for choice in choices:
            delta, calls = _delta_calls(choice)
            if not calls:
                indexed.append(choice)
                continue
            which = choice.get("index", 0)
            begun, current, current_id = self._calls.get(which, (0, 0, None))
            out = []
            for call in calls:
                if isinstance(call, dict):
                    index, call_id = call.get("index"), call.get("id")
                    if type(index) is not int:
                        if (call_id and call_id != current_id) or not begun:
                            current, begun = begun, begun + 1
                        elif call_id:
                            # A piece repeating its call's id (and type,
                            # name): OpenAI sends them on the first piece
                            # only, and the SDK joins what it gets again.
                            call = _continued(call)
                        call, given = {**call, "index": current}, True
                    else:
                        if call_id and call_id == current_id and index == current and begun > index:
                            call, given = _continued(call), True
                        current, begun = index, max(begun, index + 1)
                    if call_id:
                        current_id = call_id
                out.append(call)
            self._calls[which] = (begun, current, current_id)
            indexed.append({**choice, "delta": {**delta, "tool_calls": out}})
        return indexed if given else None

    def _first_call(self, choice: Any) -> int:
        """
        The index of the first tool call C{choice}'s choice began (noted in
        L{_first_calls} from the first delta that carries one; its pieces
        have their index by then: L{_indexed}); 0 until one has.
        """
        which = choice.get("index", 0) if isinstance(choice, dict) else 0
        if which not in self._first_calls:
            _, calls = _delta_calls(choice)
            for call in calls:
                if isinstance(call, dict) and type(call.get("index")) is int:
                    self._first_calls[which] = call["index"]
                    break
        return self._first_calls.get(which, 0)

    def _fills(self, document: dict[str, Any], choices: list[Any]) -> list[dict[str, Any]]:
        """
        Note which tool calls of C{choices} have had arguments; for each
        choice that finishes here, the chunks giving C{"{}"} to those of
        its calls that had none (L{no_arguments}), to be sent before.
        """
        unargued = self._unargued
        fills: list[dict[str, Any]] = []
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            calls = delta.get("tool_calls") if isinstance(delta, dict) else None
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict):
                    function = call.get("function")
                    arguments = function.get("arguments") if isinstance(function, dict) else None
                    key = (choice.get("index", 0), call.get("index", 0))
                    unargued[key] = unargued.get(key, True) and no_arguments(arguments)
            if choice.get("finish_reason") is None:
                continue
            index = choice.get("index", 0)
            for key in [key for key in unargued if key[0] == index]:
                if unargued.pop(key):
                    head: dict[str, Any] = {
                        name: document[name] for name in ("id", "object", "created", "model") if name in document
                    }
                    given = {"tool_calls": [{"index": key[1], "function": {"arguments": "{}"}}]}
                    fills.append({**head, "choices": [{"index": index, "delta": given, "finish_reason": None}]})
        return fills

    def _encode(self, document: dict[str, Any]) -> bytes:
        if self.legacy_functions:
            # Its choices' calls are one each, numbered 0, by now (one_call).
            document = {**document, "choices": [legacy_choice(c) for c in document["choices"]]}
        return orjson.dumps(document)

    def closing(self) -> list[bytes]:
        if not self.include_usage or self._usage_sent or self.usage is None:
            return []
        self._usage_sent = True
        return [orjson.dumps({**self._head, "object": "chat.completion.chunk", "choices": [], "usage": self.usage})]


#: What L{ReasoningKeptWire} gives an assistant message with tool calls as
#: its C{reasoning_content} when it has none (a history written by another
#: provider, or by a client that did not keep the field): the equivalent
#: of Gemini's placeholder thought signature.  Not empty: Moonshot takes an
#: empty one as missing (earendil-works/pi #4251).
REASONING_PLACEHOLDER = "(reasoning not kept)"


def _empty_text(content: Any) -> bool:
    """
    Whether a message's C{content} is or holds empty text: C{""}, or a
    text part that holds none (C{[{"type": "text", "text": ""}]}:
    BerriAI/litellm#42186; beside parts with text too).
    """
    if content == "":
        return True
    return isinstance(content, list) and any(_empty_part(part) for part in content)


def _empty_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and part.get("text") == ""


def _holds_refusal_part(message: dict[str, Any]) -> bool:
    content = message.get("content")
    return isinstance(content, list) and any(
        isinstance(part, dict) and part.get("type") == "refusal" for part in content
    )


def _refusal_parts_as_text(message: dict[str, Any]) -> dict[str, Any]:
    """
    C{message}, when it has C{refusal} content parts, with each as a text
    part holding its refusal (checked to be a string,
    L{openclaw.dataplane.request}).
    """
    if message.get("role") != "assistant" or not _holds_refusal_part(message):
        return message
    return {
        **message,
        "content": [
            {"type": "text", "text": part.get("refusal", "")}
            if isinstance(part, dict) and part.get("type") == "refusal"
            else part
            for part in message["content"]
        ],
    }


def _holds_empty(message: dict[str, Any]) -> bool:
    """
    Whether an assistant C{message} has empty text to take out, or is
    empty (L{_without_empty_content}).
    """
    if message.get("partial") is True:
        # Moonshot's Partial Mode: the answer's start, empty in its
        # role-play example ({"name": ..., "content": "", "partial": true}),
        # which Moonshot takes.
        return False
    content = message.get("content")
    if _empty_text(content):
        return True
    return not content and not message.get("tool_calls") and not message.get("function_call")


def _without_empty_content(message: dict[str, Any]) -> dict[str, Any] | None:
    """
    C{message}, when an assistant's, without its empty text: its empty
    text parts left out, and C{content} itself when none is left (or it
    was C{""}) and it has tool calls; one left with no content nor calls
    has its C{refusal} as its text, or is None (left out of the history).
    """
    if message.get("role") != "assistant" or not _holds_empty(message):
        return message
    content = message.get("content")
    kept = [part for part in content if not _empty_part(part)] if isinstance(content, list) else []
    if kept:
        return {**message, "content": kept}
    if message.get("tool_calls") or message.get("function_call"):
        return {name: value for name, value in message.items() if name != "content"}
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        return {**message, "content": refusal}
    return None


def _with_reasoning(message: Any, placeholder: str) -> Any:
    if (
        isinstance(message, dict)
        and message.get("role") == "assistant"
        and message.get("tool_calls")
        and not (isinstance(message.get("reasoning_content"), str) and message["reasoning_content"].strip())
    ):
        return {**message, "reasoning_content": placeholder}
    return message


@attrs.frozen(kw_only=True)
class ReasoningKeptWire(OpenAIWire):
    """
    OpenAI's chat format (L{OpenAIWire}), for a provider whose thinking
    models refuse a history in which an assistant message with tool calls
    has no C{reasoning_content} (Moonshot's C{kimi-*}: "thinking is
    enabled but reasoning_content is missing in assistant tool call
    message at index N"): for a model C{thinks} says is one of those, each
    such message without one (or with only whitespace) is sent with
    C{placeholder}; one the client kept goes as it is.  The caller's
    messages are not changed (a copy is sent).
    """

    #: Whether a model id (as sent upstream) is one of the provider's
    #: thinking models: the provider's own rule, from its documentation.
    thinks: Callable[[str], bool]
    placeholder: str = REASONING_PLACEHOLDER

    def request_body(self, chat: ChatRequest, model: str) -> bytes:
        if self.thinks(model):
            messages = chat.body["messages"]
            filled = [_with_reasoning(message, self.placeholder) for message in messages]
            if any(new is not old for new, old in zip(filled, messages, strict=True)):
                chat = attrs.evolve(chat, body={**chat.body, "messages": filled})
        return super().request_body(chat, model)


@attrs.frozen(kw_only=True)
class OpenAIEmbeddings:
    """
    OpenAI's embeddings API (U{https://platform.openai.com/docs/api-reference/embeddings}),
    passed through: C{POST {base}/embeddings} with C{model}, C{input} (a
    list of strings), C{dimensions} when asked and C{encoding_format}
    C{float} (the gateway encodes what the client asked for), answered
    C{{"data": [{"index", "embedding"}], "usage": {"prompt_tokens"}}}.
    """

    #: The model used when EMBEDDING_MODEL is unset and this provider
    #: serves embeddings by default.
    default_model: str
    #: Inputs one request may hold (OpenAI's limit).
    batch_size: int = 2048

    def model_name(self, text: str) -> str:
        model = text.strip()
        if not model:
            raise ValueError(text)
        return model

    def url(self, base_url: str, model: str) -> bytes:
        # The model travels in the body.
        return f"{base_url}/embeddings".encode()

    def request_body(self, inputs: Sequence[str], model: str, dimensions: int | None) -> bytes:
        body: dict[str, Any] = {"model": model, "input": list(inputs), "encoding_format": "float"}
        if dimensions is not None:
            body["dimensions"] = dimensions
        return orjson.dumps(body)

    def answer(self, body: bytes, expected: int) -> EmbeddingsBatch:
        document = json_object(body)
        data = document.get("data")
        found = None
        if isinstance(data, list):
            entries = [entry if isinstance(entry, dict) else {} for entry in data]
            indexes = [entry.get("index") for entry in entries]
            if sorted(i for i in indexes if type(i) is int) == list(range(len(entries))):
                # In the inputs' order, whatever order the answer lists them in.
                entries.sort(key=lambda entry: entry["index"])
            found = [entry.get("embedding") for entry in entries]
        usage = document.get("usage")
        tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        counted = tokens if type(tokens) is int and tokens >= 0 else None
        return EmbeddingsBatch(number_lists(found, expected, "data", "embedding"), counted)


#: The error C{type}s and C{code}s with which an OpenAI-compatible API
#: answers 429 for an account that cannot pay for calls, not for a rate
#: limit: Moonshot's C{exceeded_current_quota_error} ("You exceeded your
#: current quota, please check your plan and billing details", or the
#: account suspended), OpenAI's C{insufficient_quota}
#: (U{https://platform.openai.com/docs/guides/error-codes}).
QUOTA_ERRORS = frozenset({"exceeded_current_quota_error", "insufficient_quota"})


@attrs.define(kw_only=True)
class OpenAICompatibleAdapter(ProviderAdapter):
    """
    C{GET {base}/models} answers C{{"object": "list", "data": [{"id": ...}]}};
    chat is OpenAI's C{POST {base}/chat/completions}, streamed or not; the
    key travels as C{Authorization: Bearer <key>}.

    Abstract: a subclass declares C{id}, C{display_name}, C{key_variables},
    C{base_url_variable}, C{default_base_url}, C{model_variable} and
    C{default_model_id}; and C{embeddings = OpenAIEmbeddings(...)} when the
    provider serves OpenAI's C{/embeddings} (Moonshot does not).
    """

    wire: ClassVar[Wire] = OpenAIWire()

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def refusal(self, status: int, body: bytes, retry_after: str | None = None) -> Refusal:
        """
        As every provider's, and a 429 whose error is one of L{QUOTA_ERRORS}
        is the account's (out of balance or suspended), not a rate limit:
        L{RefusalKind.ACCOUNT}, which no retry mends.
        """
        refusal = super().refusal(status, body, retry_after)
        if status == 429:
            error = reported_error(json_or_none(body))
            said = error.fields if error is not None else {}
            if any(isinstance(said.get(field), str) and said[field] in QUOTA_ERRORS for field in ("type", "code")):
                return attrs.evolve(refusal, kind=RefusalKind.ACCOUNT)
        return refusal

    def chat_url(self, model: str, stream: bool) -> bytes:
        # The model (and whether to stream) travels in the body.
        return f"{self.base_url}/chat/completions".encode()

    async def fetch_model_ids(self, exchange: Exchange) -> list[str]:
        document = await self.get_json("models", exchange)
        data = document.get("data") if isinstance(document, dict) else None
        if not isinstance(data, list):
            # The hint names this provider's documented base URL: where
            # OpenAI's paths start differs between providers (Moonshot's
            # ends in /v1, DeepSeek's has no path at all).
            raise MalformedResponse(
                f'models listing has no "data" list; does {self.base_url_variable} '
                f"point at {self.display_name}'s API (such as {self.default_base_url})?"
            )
        return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


__all__ = [
    "REASONING_PLACEHOLDER",
    "OpenAICompatibleAdapter",
    "OpenAIEmbeddings",
    "OpenAIStream",
    "OpenAIWire",
    "ReasoningKeptWire",
]
