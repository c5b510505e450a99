"""
What a chat call looks like on a provider's wire: the interface every
provider's chat format offers (L{Wire}, L{StreamTranslation}), the errors it
raises, and the helpers the formats share.

A provider declares its wire as L{ProviderAdapter.wire
<openclaw.providers.base.ProviderAdapter.wire>}: it turns a validated
request into the upstream body, the upstream answer into an OpenAI
C{chat.completion}, and upstream stream events into
C{chat.completion.chunk} payloads.  The OpenAI-compatible wire (passed
through) is in L{openclaw.providers.openai_compatible}, Gemini's
(translated) in L{openclaw.providers.gemini.translate}.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

import attrs
import orjson
from twisted.logger import ILogObserver

from openclaw.dataplane.errors import STREAM_BROKEN, APIError, bad_request
from openclaw.dataplane.request import (
    DATA_URL,
    NO_MEDIA_KINDS,
    ChatRequest,
    MediaKind,
    MediaKinds,
    PartType,
    ToolType,
    UrlScheme,
)
from openclaw.dataplane.sse import Event
from openclaw.providers.errors import MAX_MESSAGE_CHARS, clip
from openclaw.shorten import shortened
from openclaw.web import compression_of

#: The longest media type a 400 names back whole.
SHOWN_TYPE_CHARS = 64


class MalformedAnswer(ValueError):
    """
    A 2xx upstream answer that is not what the provider's API returns.
    """

    #: The error code the client is answered with (a 502).
    code: str = "upstream_malformed"


class ModelFailed(MalformedAnswer):
    """
    A 2xx upstream answer saying that the model failed (Gemini's
    C{MALFORMED_FUNCTION_CALL}): never passed off as a clean stop.
    """

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class StreamBroken(Exception):
    """
    The upstream stream reported an error, or sent something unreadable,
    mid-answer.  C{str()} says what; C{code} is the error code the
    client's last event carries: L{STREAM_BROKEN} for an event that
    cannot be read (the default), L{STREAM_ERROR
    <openclaw.dataplane.errors.STREAM_ERROR>} for the provider's error
    event, another for an event of the wrong shape
    (C{upstream_malformed}) or a model's failure.
    """

    def __init__(self, message: str, code: str = STREAM_BROKEN) -> None:
        super().__init__(message)
        self.code = code


class StreamTranslation(Protocol):
    """
    One streamed answer on its way through.
    """

    #: The upstream said the stream is over (OpenAI's C{[DONE]}).
    ended: bool

    @property
    def complete(self) -> bool:
        """
        The answer is whole: a stream that stops now has not been cut.
        """

    @property
    def finished(self) -> bool:
        """
        Every choice asked for has its finish reason: nothing more of the
        answer can come (but a later usage), so a body that does not end
        is not waited for long.
        """

    @property
    def usage(self) -> dict[str, Any] | None:
        """
        The last usage the upstream reported, in OpenAI's C{usage} shape
        (C{prompt_tokens}, C{completion_tokens},
        C{completion_tokens_details.reasoning_tokens}); None until one has
        come.  Counted whether or not the client asked to see it.
        """

    @property
    def answer_begun(self) -> bool:
        """
        Some event so far carried something of the answer: text, reasoning,
        a refusal, a tool call, logprobs, a finish reason (any delta field
        but C{role} that is not null or empty).  Not a role alone, empty
        text (Moonshot's usual first chunk C{{"role": "assistant",
        "content": ""}}, Gemini's C{{"text": ""}} part), a usage (Gemini
        repeats its prompt's on every event) nor an event with no choice:
        the call holds such events back, with the client's status line,
        until one that has begun the answer (or the stream's end), so that
        an error after them is a stream that failed before its answer
        started (L{ChatCall.stream_data
        <openclaw.dataplane.call.ChatCall.stream_data>}).
        """

    @property
    def progress(self) -> int:
        """
        How many events so far carried something of the answer (as
        L{answer_begun} reads one): the call's wait for the next event is
        put off only when this grows, not by events that carry nothing
        (Moonshot's empty deltas, Gemini's repeated usage).
        """

    def payloads(self, event: Event) -> list[bytes]:
        """
        The C{chat.completion.chunk} JSON payloads for one upstream event.

        @raise StreamBroken: the event is an error or unreadable.
        """

    def closing(self) -> list[bytes]:
        """
        Payloads to send after the last event, before C{[DONE]}.
        """


class Completion(NamedTuple):
    """
    A whole answer as the client gets it, and its usage as read while
    making it (so the answer is parsed once per call).
    """

    #: The C{chat.completion} JSON.
    body: bytes
    #: Its C{usage} (OpenAI's shape), as the answer gives it: None when it
    #: has none; anything else that is not an object counts nothing.
    usage: Any


class Wire(Protocol):
    """
    One provider's chat format.
    """

    @property
    def reads_carried_ids(self) -> bool:
        """
        The format reads what tool call ids carry
        (L{openclaw.dataplane.callids}: the payload its own answers put
        there, Gemini's signatures).  False for any other: the request is
        given to L{request_body} with every id plain, whichever provider's
        payload it carried.
        """

    @property
    def tool_types(self) -> tuple[ToolType, ...]:
        """
        The kinds of tool it takes beside OpenAI's functions, each with
        its checks (L{ToolType}: Kimi's takes Moonshot's built-in tools);
        empty for most.  A request declaring or calling a tool of a type
        its wire does not list is refused before anything is sent
        (L{refuse_tool_types}), so a provider need know nothing of another
        provider's tools to refuse them.
        """

    @property
    def part_types(self) -> tuple[PartType, ...]:
        """
        The content part types of a user message it takes beside OpenAI's
        (text, C{image_url}, C{input_audio}, C{file}), each with its checks
        (L{PartType}: Kimi's takes Moonshot's C{video_url}); empty for
        most.  A request holding a part of a type its wire does not list is
        refused before anything is sent (L{refuse_media_kinds}).
        """

    @property
    def url_schemes(self) -> tuple[UrlScheme, ...]:
        """
        The media URL schemes it takes in an C{image_url} part beside
        OpenAI's forms (C{data:}, C{http(s)://}; and C{gs://}, as sent),
        each with its checks (L{UrlScheme}: Kimi's takes Moonshot's
        C{ms://}); empty for most.  A request holding a URL of a scheme
        its wire does not list (in any part) is refused before anything is
        sent (L{refuse_media_kinds}).
        """

    def request_body(self, chat: ChatRequest, model: str) -> bytes:
        """
        The upstream request body for C{chat}, asking for C{model}.
        """

    def completion(
        self, body: bytes, model: str, created: int, chat: ChatRequest | None = None, log: ILogObserver | None = None
    ) -> Completion:
        """
        The C{chat.completion} JSON for a 2xx upstream body, with its usage.

        @param created: the POSIX time (whole seconds) to report when the
            answer carries none of its own.
        @param chat: the request answered, when the translation of the
            answer depends on it (Gemini's C{parallel_tool_calls: false}).
        @param log: where the warnings of the translation go (Twisted log
            events: an unknown finish reason, parts left out); None, the
            global log publisher, as they come.  A translation done in
            another thread than the reactor's gives one that holds them
            (L{HeldLog <openclaw.dataplane.offload.HeldLog>}), to be
            published from the reactor's thread: nothing else of the
            process is touched from there.
        @raise MalformedAnswer: the body is not a JSON object.
        """

    def stream(self, chat: ChatRequest, model: str, created: int) -> StreamTranslation:
        """
        A translation for one streamed answer to C{chat}.
        """


@attrs.frozen
class OfferedTools:
    """
    The tool types beside functions that the declared providers take
    (L{Wire.tool_types}), and the content part types and media URL schemes
    beside OpenAI's (L{Wire.part_types}, L{Wire.url_schemes}): the checks
    of each (the first provider's to declare it), and which providers take
    it, in their order.
    """

    #: Type -> its checks, for L{parse_chat_request
    #: <openclaw.dataplane.request.parse_chat_request>}.
    types: Mapping[str, ToolType] = MappingProxyType({})
    #: Type -> the ids of the providers whose wire takes it.
    takers: Mapping[str, tuple[str, ...]] = MappingProxyType({})
    #: The part types and URL schemes, for L{parse_chat_request
    #: <openclaw.dataplane.request.parse_chat_request>}.
    media: MediaKinds = NO_MEDIA_KINDS
    #: Part type -> the ids of the providers whose wire takes it.
    part_takers: Mapping[str, tuple[str, ...]] = MappingProxyType({})
    #: Scheme (lower case) -> the ids of the providers whose wire takes it.
    scheme_takers: Mapping[str, tuple[str, ...]] = MappingProxyType({})

    @classmethod
    def of(cls, providers: Iterable[tuple[str, Wire]]) -> OfferedTools:
        """
        The tool types, part types and URL schemes of C{(provider id,
        wire)} pairs.
        """
        types: dict[str, ToolType] = {}
        takers: dict[str, tuple[str, ...]] = {}
        parts: dict[str, PartType] = {}
        part_takers: dict[str, tuple[str, ...]] = {}
        schemes: dict[str, UrlScheme] = {}
        scheme_takers: dict[str, tuple[str, ...]] = {}
        for provider_id, wire in providers:
            for tool_type in wire.tool_types:
                types.setdefault(tool_type.name, tool_type)
                takers[tool_type.name] = (*takers.get(tool_type.name, ()), provider_id)
            for part_type in wire.part_types:
                parts.setdefault(part_type.name, part_type)
                part_takers[part_type.name] = (*part_takers.get(part_type.name, ()), provider_id)
            for scheme in wire.url_schemes:
                schemes.setdefault(scheme.name, scheme)
                scheme_takers[scheme.name] = (*scheme_takers.get(scheme.name, ()), provider_id)
        return cls(
            MappingProxyType(types),
            MappingProxyType(takers),
            MediaKinds(MappingProxyType(parts), MappingProxyType(schemes)),
            MappingProxyType(part_takers),
            MappingProxyType(scheme_takers),
        )


def _typed_tools(chat: ChatRequest, types: Mapping[str, ToolType]) -> Iterator[tuple[str, str, str, str]]:
    """
    The tools of C{chat} of a type other than C{"function"}: C{(where,
    "declares" or "calls", type, name)}, the declarations first (named by
    their type's L{ToolType.check_declaration}), then the calls in the
    history (OpenAI's tool call shape, whatever the type).
    """
    for i, tool in enumerate(chat.body.get("tools") or ()):
        kind = tool.get("type")
        if kind != "function":
            where = f"tools[{i}]"
            yield where, "declares", kind, types[kind].check_declaration(tool, where)
    for i, message in enumerate(chat.body["messages"]):
        if message.get("role") != "assistant":
            continue
        for j, call in enumerate(message.get("tool_calls") or ()):
            kind = call.get("type", "function")
            if kind != "function":
                yield f"messages[{i}].tool_calls[{j}]", "calls", kind, call["function"]["name"]


def refuse_tool_types(chat: ChatRequest, wire: Wire, provider_id: str, offered: OfferedTools) -> None:
    """
    Refuse a request declaring a tool of a type C{wire} does not take
    (L{Wire.tool_types}), or whose history holds a call of one: the
    provider has nothing to run it with.  The 400 names the field, says
    what the tool is (its L{ToolType.described}, from the provider that
    takes it) and where to send the conversation: a model of a provider
    that takes it.  A call failed over is refused the same way, so never
    failed over to such a provider.  (Content parts and media URLs the
    wire does not take: L{refuse_media_kinds}.)

    @param provider_id: the provider C{wire} is the format of, as the
        message names it.
    @param offered: every declared provider's tool types (a request
        checked by L{parse_chat_request
        <openclaw.dataplane.request.parse_chat_request>} holds no others).
    @raise APIError: 400 naming C{tools[<i>]} or
        C{messages[<i>].tool_calls[<j>]}.
    """
    if not chat.other_tools:
        # No type but functions is named in the body: nothing to look for.
        return
    taken = {tool_type.name for tool_type in wire.tool_types}
    if taken >= offered.types.keys():
        # Every type a checked request can hold: nothing to look for.
        return
    for where, does, kind, name in _typed_tools(chat, offered.types):
        if kind in taken:
            continue
        takers = offered.takers[kind]
        elsewhere = " or ".join(f'{_article(taker)} {taker} model (model "{taker}/<model>")' for taker in takers)
        # To go on with this provider instead (the active route was
        # switched to it, and the client cannot name the other), the
        # tool's declaration, its calls and their tool messages are to be
        # left out.
        instead = (
            f"; or, to go on with {provider_id}, leave {name} out of tools, and its calls and their tool messages "
            "out of the history"
            if provider_id
            else ""
        )
        raise bad_request(
            f"{where} {does} {name}, {offered.types[kind].described} (type {kind}), which "
            f"{provider_id or 'this provider'} does not take: send this conversation to {elsewhere}{instead}",
            param=where,
        )


def refuse_media_kinds(chat: ChatRequest, wire: Wire, provider_id: str, offered: OfferedTools) -> None:
    """
    Refuse a request whose user messages hold a content part of a type
    beside OpenAI's that C{wire} does not take (L{Wire.part_types}:
    Moonshot's C{video_url}, which Kimi's takes), or a part whose C{url}
    is of a scheme it does not take (L{Wire.url_schemes}: Moonshot's
    C{ms://}): the provider could not read it (a confusing 400 of its own,
    or nothing fetched).  The 400 names the part (or its C{url}), says
    what it is and who takes it (from the provider that declares it), and
    what to do: send the conversation to a model of a provider that takes
    it, or, for this one, do without it.  A call failed over is refused
    the same way (L{openclaw.dataplane.call.encode_request} refuses both),
    so never failed over to such a provider.

    @param provider_id: the provider C{wire} is the format of, as the
        message names it.
    @param offered: every declared provider's part types and URL schemes
        (a request checked by L{parse_chat_request
        <openclaw.dataplane.request.parse_chat_request>} holds no other
        part types).
    @raise APIError: 400 naming C{messages[<i>].content[<j>]} (a part
        type) or C{messages[<i>].content[<j>].<type>.url} (a scheme).
    """
    media = offered.media
    if not chat.other_media or not (media.part_types or media.url_schemes):
        # None of them is named in the body: nothing to look for.
        return
    parts_taken = {part_type.name for part_type in wire.part_types}
    schemes_taken = {scheme.name for scheme in wire.url_schemes}
    if parts_taken >= media.part_types.keys() and schemes_taken >= media.url_schemes.keys():
        # Every kind a checked request can hold: nothing to look for.
        return
    for i, message in enumerate(chat.body["messages"]):
        content = message.get("content")
        if message.get("role") != "user" or not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part["type"]
            if kind in media.part_types and kind not in parts_taken:
                raise _media_refusal(
                    f"messages[{i}].content[{j}]", media.part_types[kind], offered.part_takers[kind], provider_id
                )
            value = part.get(kind)
            url = value.get("url") if isinstance(value, dict) else None
            scheme = media.scheme_of(url) if isinstance(url, str) else None
            if scheme is not None and scheme.name not in schemes_taken:
                where = f"messages[{i}].content[{j}].{kind}.url"
                raise _media_refusal(where, scheme, offered.scheme_takers[scheme.name], provider_id)


def _media_refusal(where: str, kind: MediaKind, takers: tuple[str, ...], provider_id: str) -> APIError:
    """
    L{refuse_media_kinds}' 400 for C{kind} at C{where}, which the
    providers C{takers} take and C{provider_id} does not.
    """
    provider = provider_id or "this provider"
    only = kind.taken_by if len(takers) == 1 else " and ".join(f"{taker} models" for taker in takers)
    elsewhere = " or ".join(f'{_article(taker)} {taker} model (model "{taker}/<model>")' for taker in takers)
    return bad_request(
        f"{where} is {kind.described}, which only {only} take, not {provider} on this gateway: send this "
        f"conversation to {elsewhere}, or, for {provider}, {kind.instead}",
        param=where,
    )


@attrs.frozen
class ImageTypes:
    """
    The media types of the images a provider takes in an C{image_url}
    part's base64 data URL (C{data:<type>;base64,...}): a wire that passes
    the body through (L{openclaw.providers.openai_compatible.OpenAIWire})
    refuses any other before anything is sent (L{refuse_image_types}), so
    a call holding one is not sent, nor failed over, to a provider that
    cannot read it (as Gemini's translation refuses the types it does not
    take, L{openclaw.providers.gemini.translate.data_image_type}).

    A media type is matched in any case (RFC 2045 section 5.1, which RFC
    2397's data URLs use: C{IMAGE/PNG} is C{image/png}), and sent in lower
    case (L{refuse_image_types}).
    """

    #: The subtypes of C{image/} taken, in lower case (C{"png"}).
    subtypes: frozenset[str]
    #: The types as a 400 names them ("PNG, JPEG, WEBP or GIF").
    names: str
    #: Who takes them and whose list it is, as a 400 says it
    #: ("Kimi takes (Moonshot's vision guide)").
    taker: str

    def takes(self, media_type: str) -> bool:
        """
        Whether C{media_type} (C{image/png}, in any case) is one of these.
        """
        kind, _, subtype = media_type.lower().partition("/")
        return kind == "image" and subtype in self.subtypes

    def refusal(self, media_type: str, where: str) -> APIError:
        """
        The 400 naming C{where}, a data URL of C{media_type}, not one of
        these (its type named back, clipped).
        """
        shown = shortened(media_type, SHOWN_TYPE_CHARS)
        return bad_request(
            f"{where} is a data URL of type {shown!r}, not an image {self.taker}: an image must be {self.names}; "
            "convert it to one of those",
            param=where,
        )


#: OpenAI's image input types
#: (U{https://platform.openai.com/docs/guides/images-vision}, "Image input
#: requirements": PNG, JPEG, WEBP, non-animated GIF), and C{image/jpg}, a
#: common misspelling of C{image/jpeg}: the default of an OpenAI-shaped
#: provider (whether a GIF is animated is not looked into).
OPENAI_IMAGE_TYPES = ImageTypes(
    frozenset({"png", "jpeg", "jpg", "webp", "gif"}),
    "PNG, JPEG, WEBP or non-animated GIF",
    "this provider takes (OpenAI's supported image types)",
)


def refuse_image_types(chat: ChatRequest, types: ImageTypes) -> ChatRequest:
    """
    Refuse a request whose user messages hold an C{image_url} part whose
    URL is a data URL of a type not of C{types} (L{ImageTypes.takes}):
    the provider would refuse or misread it (C{text/html},
    C{image/svg+xml}).  Other URLs (C{https://}, and a scheme the wire
    declares, L{Wire.url_schemes}, one it does not being refused by
    L{refuse_media_kinds}) are the provider's to fetch and judge.

    @return: C{chat}, each image data URL in its canonical form
        (L{canonical_data_url}: C{DATA:IMAGE/PNG;BASE64,...} becomes
        C{data:image/png;base64,...}, the only form Moonshot and OpenAI
        document; a media type is case-insensitive, RFC 2045 section 5.1,
        but a provider need not know it); C{chat} itself when none was
        written otherwise, or the request names no C{image_url} part
        (L{ChatRequest.images}: no walk through a plain chat).
    @raise APIError: 400 naming C{messages[<i>].content[<j>].image_url.url}
        and the types taken (the type as the client wrote it).
    """
    if not chat.images:
        return chat
    given = chat.body["messages"]
    messages: list[dict[str, Any]] | None = None
    for i, message in enumerate(given):
        content = message.get("content")
        if message.get("role") != "user" or not isinstance(content, list):
            continue
        parts: list[Any] | None = None
        for j, part in enumerate(content):
            if part.get("type") != "image_url":
                continue
            url = part["image_url"]["url"]
            head = DATA_URL.match(url)
            if head is None:
                continue
            if not types.takes(head.group(1)):
                raise types.refusal(head.group(1), f"messages[{i}].content[{j}].image_url.url")
            canonical = canonical_data_url(url)
            if canonical is not url:
                parts = parts or list(content)
                parts[j] = {**part, "image_url": {**part["image_url"], "url": canonical}}
        if parts is not None:
            messages = messages or list(given)
            messages[i] = {**message, "content": parts}
    return chat if messages is None else attrs.evolve(chat, body={**chat.body, "messages": messages})


def canonical_data_url(url: str) -> str:
    """
    C{url}, a data URL L{DATA_URL} matches, with its scheme, media type
    and C{;base64,} in lower case (its parameters, C{;name=A.png}, and its
    data as written): C{url} itself if they are already.
    """
    head = DATA_URL.match(url)
    assert head is not None
    end = head.end()
    canonical = f"data:{head.group(1).lower()}{url[head.end(1) : end - len(';base64,')]};base64,"
    return url if url.startswith(canonical) else canonical + url[end:]


def _article(word: str) -> str:
    """
    "an" before a vowel, else "a" (for a provider id: "an acme model").
    """
    return "an" if word[:1] in ("a", "e", "i", "o", "u") else "a"


def completion_id() -> str:
    """
    A fresh C{chatcmpl-} id for an answer that needs one made up.
    """
    # 96 random bits: unique enough for an id, which is no secret (it goes
    # to the caller, and names nothing anyone could act on).  Python's own
    # generator (reseeded in a forked child) makes no system call per id,
    # as secrets would.
    return f"chatcmpl-{random.getrandbits(96):024x}"


def json_object(body: bytes) -> dict[str, Any]:
    """
    A 2xx answer body parsed as the JSON object it must be.

    @raise MalformedAnswer: it is not JSON, or not an object.
    """
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        compressed = compression_of(body)
        # The gateway asks for no compression (no Accept-Encoding): a
        # provider (or a proxy before it) that compressed all the same
        # is said so (hostile trial s45: a gzip bomb read as "not JSON").
        raise MalformedAnswer(
            f"the answer is not JSON (it looks {compressed}-compressed, which the gateway did not ask for)"
            if compressed
            else "the answer is not JSON"
        ) from None
    if not isinstance(document, dict):
        raise MalformedAnswer("the answer is not a JSON object")
    return document


def json_or_none(body: bytes) -> Any:
    """
    C{body} parsed as JSON (UTF-8), None when it is not JSON.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


class ReportedError(NamedTuple):
    """
    The error an upstream document reports: its C{error} member, an object
    (OpenAI's and Moonshot's C{{"message", "type", "code"}}, Google's
    C{{"code", "message", "status", "details"}}) or a bare value (a string).
    """

    #: The C{error} member as it came; never None.
    value: Any

    @property
    def fields(self) -> dict[str, Any]:
        """
        The error object's members; empty when the error is a bare value.
        """
        return self.value if isinstance(self.value, dict) else {}

    @property
    def stated(self) -> str | None:
        """
        C{error.message} when the error is an object with a string message.
        """
        message = self.fields.get("message")
        return message if isinstance(message, str) else None

    @property
    def message(self) -> str:
        """
        C{error.message} (L{stated}), else the bare error value as text.
        """
        stated = self.stated
        return str(self.value) if stated is None else stated


#: The most characters of each kind field L{with_kind} shows.
_KIND_CHARS = 64


def with_kind(error: ReportedError, limit: int | None = MAX_MESSAGE_CHARS) -> str:
    """
    The one rendering of a provider's error, in an error body or a
    stream's error event alike: its message, followed by what kind it is
    when it says: OpenAI's and Moonshot's C{type} and C{code}, Google's
    C{status} and C{code} ("Your account is suspended
    [type=permission_denied_error]", "Internal error [status=INTERNAL,
    code=500]").

    @param limit: the message is clipped to this many characters (the
        kind is kept whole); L{None}: whole, for a caller that scrubs the
        key from the text before clipping it.
    """
    fields = error.fields
    kinds = [
        # Each clipped: a provider's own fields, of any length.
        f"{name}={clip(str(fields[name]), _KIND_CHARS)}"
        for name in ("type", "status", "code")
        if isinstance(fields.get(name), (str, int))
    ]
    message = error.message if limit is None else clip(error.message, limit)
    return message + (f" [{', '.join(kinds)}]" if kinds else "")


def reported_error(document: Any) -> ReportedError | None:
    """
    The error C{document} reports: the C{error} member of a JSON object,
    when it has one that is not null.  None for anything else (an answer, a
    value that is not an object).  Every provider's error body, and every
    error event of a stream, is read through this.
    """
    error = document.get("error") if isinstance(document, dict) else None
    return None if error is None else ReportedError(error)


__all__ = [
    "OPENAI_IMAGE_TYPES",
    "Completion",
    "ImageTypes",
    "MalformedAnswer",
    "ModelFailed",
    "OfferedTools",
    "ReportedError",
    "StreamBroken",
    "StreamTranslation",
    "Wire",
    "canonical_data_url",
    "completion_id",
    "json_object",
    "json_or_none",
    "refuse_image_types",
    "refuse_media_kinds",
    "refuse_tool_types",
    "reported_error",
]
