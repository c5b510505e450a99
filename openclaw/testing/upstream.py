"""
A stand-in for model providers' HTTP APIs: every provider it is given (by
default the built-in ones, L{openclaw.providers.BUILTIN_PROVIDERS}), and
any other a test mounts.

One small C{twisted.web} server speaks the providers' shapes, each under its
own path prefix, so one listening port serves every adapter.  Two dialects
are spoken: OpenAI's (L{OpenAIDialect}: C{GET /models}, C{POST
/chat/completions}, Bearer auth) and Gemini's (L{GeminiDialect}: C{GET
/models}, C{POST /models/M:generateContent} and
C{:streamGenerateContent?alt=sse}, C{x-goog-api-key}); each provider is
served in the dialect of its adapter's wire (L{dialect_for}), at
C{/<id>/<last path segment of its default base URL>} (L{standin_path})::

    Kimi:   http://127.0.0.1:PORT/kimi/v1       (OpenAI's dialect)
    Gemini: http://127.0.0.1:PORT/gemini/v1beta (Gemini's dialect)

and L{StandInUpstream.mount} adds another provider under a prefix of its
own (C{upstream.mount("acme", "acme/v1", OpenAIDialect(),
behaviour)}).

Each provider's answers are steered by a plain L{ProviderBehaviour} object
that a test mutates between requests (C{upstream.kimi.mode = "hang"}, or
C{upstream.behaviour("acme")}); the same object counts the requests it
saw, so a test can assert that none (or exactly one) was made.

Requests that are left hanging or stalled are tracked, and L{StandInUpstream.stop}
aborts every connection still open, so trial finds a clean reactor.

Each endpoint is one handler that turns a request into C{(status,
document)} (or C{(200, EventStream)} for server-sent events), mounted with
L{_Endpoint}; the modes (delay, errors, hang, stall, cut) apply to all of
them.  Chat answers are the behaviour's C{reply}, split into words; a
stream sends one event per word, C{chunk_interval} seconds apart.

Run it by hand::

    python -m openclaw.testing.upstream --port 8001 --key kimi=k --key gemini=g

(C{--models ID=MODEL,...} for the models a provider lists; C{--help}.)
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, cast
from urllib.parse import urlsplit

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall, IListeningPort, ITCPTransport, ITransport
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.error import UnsupportedMethod
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from openclaw.addresses import host_port
from openclaw.connections import OpenConnections
from openclaw.reactors import IStandInReactor, IUpstreamReactor
from openclaw.settings import ProviderSettings, builtin_providers, provider_table

if TYPE_CHECKING:
    from openclaw.providers.base import ProviderAdapter

#: Listen backlog: a benchmark opens 100+ connections in one reactor turn, and
#: the default of 50 would make the kernel drop SYNs (a one second retry).
BACKLOG = 1024

#: How many models a Gemini page may hold at most, as the real API enforces.
GEMINI_MAX_PAGE_SIZE = 1000
#: Page size the real Gemini API uses when the client names none.
GEMINI_DEFAULT_PAGE_SIZE = 50


class Mode(StrEnum):
    """
    How a stand-in provider answers.  Being a string enum, a test may assign
    the plain string (C{behaviour.mode = "stall"}).
    """

    #: Answer normally (after C{delay} seconds, if set).
    OK = "ok"
    #: 401 with the provider's real error shape, whatever key was sent.
    UNAUTHORIZED = "unauthorized"
    #: 403 with the provider's real error shape.
    FORBIDDEN = "forbidden"
    #: C{error_status} (a 5xx) with the provider's real error shape.
    ERROR = "error"
    #: 429 with the provider's real error shape and its retry delay
    #: (C{retry_after} seconds: Kimi's C{Retry-After} header, Gemini's
    #: C{RetryInfo}), whatever key was sent.
    RATE_LIMITED = "rate_limited"
    #: 200 with a body that is not JSON.
    MALFORMED = "malformed"
    #: Never answer, not even the status line.
    HANG = "hang"
    #: Send the headers and part of the body, then nothing more (a stream:
    #: C{cut_after} events, then nothing more).
    STALL = "stall"
    #: Send the headers and part of the body, then close the connection
    #: mid-body (a stream: C{cut_after} events, then close it).
    CUT = "cut"
    #: A stream: C{cut_after} events, then an error event in the provider's
    #: error shape (C{error_status}, C{error_message}), and the end; a
    #: whole answer is answered normally.
    STREAM_ERROR = "stream_error"
    #: C{error_status} with the headers and half of its error body, then
    #: nothing more.
    ERROR_STALL = "error_stall"
    #: C{error_status} with the headers and half of its error body, then
    #: the connection closed mid-body.
    ERROR_CUT = "error_cut"
    #: A stream: C{cut_after} events, then only a C{: keepalive} comment
    #: every C{chunk_interval} seconds (0.1 when 0), for ever.
    TRICKLE = "trickle"
    #: A stream: no event, only its end (C{[DONE]} where the provider sends
    #: one); a whole answer is answered normally.
    EMPTY = "empty"
    #: A stream: every event (C{[DONE]} too, where the provider sends one),
    #: then its body kept open, never ended; a whole answer is answered
    #: normally.
    LINGER = "linger"


@attrs.define
class ProviderBehaviour:
    """
    What one stand-in provider accepts and how it answers; tests mutate it.
    """

    #: The only API key the provider accepts.
    key: str
    #: Model ids it lists (Gemini ones without the C{models/} prefix).
    models: list[str]
    #: Gemini: the models C{batchEmbedContents} serves; another (a chat
    #: model included) is answered 404 NOT_FOUND, as Google answers it.
    embedding_models: list[str] = attrs.field(factory=lambda: ["gemini-embedding-001"])
    #: A L{Mode} or its string value.
    mode: str = Mode.OK
    #: Seconds to wait before answering (never blocks: C{callLater}).
    delay: float = 0.0
    #: Status for L{Mode.ERROR}.
    error_status: int = 500
    #: Replaces the provider's stock message in error answers.
    error_message: str | None = None
    #: Replaces the whole body of L{Mode.ERROR}'s answer (any status, 200
    #: included: a provider that answers an error with 200), as JSON.
    error_body: Any = None
    #: Headers added to L{Mode.ERROR}'s answer (C{{"Retry-After": "30"}}).
    error_headers: dict[str, str] = attrs.field(factory=dict)
    #: Models a chat call is denied (403) rather than served, as a model
    #: kept for another organization: Moonshot's C{permission_denied_error},
    #: Google's C{PERMISSION_DENIED}; the models listing still works.
    private_models: set[str] = attrs.field(factory=set)
    #: The C{owned_by} of the models an OpenAI-compatible listing names.
    owned_by: str = "stand-in"
    #: The most models one Gemini page holds; lower it to force pagination.
    page_size_limit: int = GEMINI_MAX_PAGE_SIZE
    #: Requests received (whatever their outcome).
    requests: int = 0
    #: The request target (path and query) of each request, in order, so a
    #: test can check that no key ever travels in a URL.
    uris: list[str] = attrs.field(factory=list)
    #: What a chat call answers; a stream sends it word by word.
    reply: str = "Hello from the stand-in."
    #: Seconds between the events of a streamed answer.
    chunk_interval: float = 0.0
    #: Called (in the reactor) with C{n} before a stream's event C{n}
    #: (0-based, from the second on): the event is sent once the Deferred it
    #: returns fires, so a test can hold each event until the client has
    #: the ones before it.
    chunk_gate: Callable[[int], Deferred[None]] | None = None
    #: Events a stream sends before L{Mode.STALL} or L{Mode.CUT} strike (past
    #: the last: every event, then the stall or the cut instead of the end).
    cut_after: int = 2
    #: Tokens spent thinking that an answer's usage reports (OpenAI's
    #: C{completion_tokens_details.reasoning_tokens}, counted in
    #: C{completion_tokens}; Gemini's C{thoughtsTokenCount}, not counted in
    #: C{candidatesTokenCount}).
    reasoning_tokens: int = 0
    #: The parsed JSON body of the latest chat call.
    last_body: Any = None
    #: Every chat (and embeddings) body received, in order, so that a test
    #: can assert on each translated request of a tool loop.
    bodies: list[Any] = attrs.field(factory=list)
    #: Log each chat (and embeddings) body received (C{--log-bodies}).
    log_bodies: bool = False
    #: Scripted chat answers (L{GeminiAnswer}, L{OpenAIAnswer}), each used
    #: by one call, first in first out; when none is left, the C{reply}.
    answers: list[Any] = attrs.field(factory=list)
    #: Moonshot's habit: usage inside C{choices[0].usage} instead of at the
    #: top level (whole answers; and the last stream chunk, asked for or not,
    #: with no usage chunk).
    usage_in_choice: bool = False
    #: OpenAI's dialect: end a stream with C{[DONE]} (every OpenAI-shaped
    #: provider does; off, a stream ends after its usage chunk).
    send_done: bool = True
    #: The C{Content-Type} of a streamed answer (a proxy may call an event
    #: stream C{application/json}).
    stream_content_type: str = "text/event-stream"
    #: Gemini 3's rule: the first C{functionCall} part of each model turn
    #: must carry a signature this server issued, or Google's placeholder.
    require_signatures: bool = True
    #: The thought signatures this server has issued.
    signatures: set[str] = attrs.field(factory=set)
    #: Streamed answers whose client went away before the end.
    streams_lost: int = 0
    #: More keys accepted besides C{key} (a key pool).
    extra_keys: list[str] = attrs.field(factory=list)
    #: Keys answered with 429 (rate limited), whatever the mode.
    rate_limited_keys: set[str] = attrs.field(factory=set)
    #: Models whose calls are answered with 429 whatever the key (Google
    #: limits each model apart), whatever the mode.
    rate_limited_models: set[str] = attrs.field(factory=set)
    #: Keys the provider does not know: answered as an invalid key
    #: (OpenAI's dialect: 401; Gemini's: 400 with reason API_KEY_INVALID).
    invalid_keys: set[str] = attrs.field(factory=set)
    #: Seconds a 429 asks the caller to wait (OpenAI's dialect: the
    #: C{Retry-After} header; Gemini's: C{RetryInfo.retryDelay}); None: not said.
    retry_after: float | None = 1.0
    #: When set, the 429's C{Retry-After} header as these bytes, whatever
    #: C{retry_after} says (a malformed one, as C{b"\xb2"}).
    retry_after_header: bytes | None = None
    #: The key of each request, in order (to check rotation).
    keys_seen: list[str | None] = attrs.field(factory=list)
    #: The C{Accept-Encoding} of each request, in order (None: not sent).
    accept_encodings: list[str | None] = attrs.field(factory=list)
    #: Gemini: model -> the C{thinkingLevel} values it takes; another is
    #: refused with a 400, as Google does.  A model not named takes any.
    thinking_levels: dict[str, frozenset[str]] = attrs.field(factory=dict)
    _lost_waiters: list[tuple[int, Deferred[None]]] = attrs.field(factory=list, repr=False)

    def accepts(self, key: str | None) -> bool:
        return key is not None and (key == self.key or key in self.extra_keys) and key not in self.invalid_keys

    def reset(self) -> None:
        """
        Forget the requests seen so far.
        """
        self.requests = 0
        self.keys_seen.clear()
        self.accept_encodings.clear()
        self.uris.clear()
        self.last_body = None
        self.bodies.clear()
        self.answers.clear()
        self.streams_lost = 0

    def reply_pieces(self, text: str | None = None) -> list[str]:
        """
        The reply (or C{text}) cut into words (each keeping its leading
        space), one per stream event.
        """
        text = self.reply if text is None else text
        return re.findall(r"\s*\S+", text) or [text]

    def stream_lost(self) -> None:
        """
        Count a stream whose client went away; wake who waits for it.
        """
        self.streams_lost += 1
        due = [d for count, d in self._lost_waiters if count <= self.streams_lost]
        self._lost_waiters = [(c, d) for c, d in self._lost_waiters if c > self.streams_lost]
        for d in due:
            d.callback(None)

    def when_streams_lost(self, count: int = 1) -> Deferred[None]:
        """
        Fire once C{count} streamed answers in all have lost their client.
        """
        if self.streams_lost >= count:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lost_waiters.append((count, d))
        return d


@attrs.frozen
class GeminiAnswer:
    """
    A scripted Gemini answer: the candidate's parts as Gemini sends them
    (C{{"text"}}, C{{"text", "thought": true}}, C{{"functionCall": {"name",
    "args", "id"?}, "thoughtSignature"?}}), one tuple per streamed event (a
    whole answer joins them), then C{finish_reason} and C{usage}
    (C{usageMetadata}).  Signatures given are remembered as issued.
    No events (C{()}) is an answer of no candidate part: a stream of no
    event at all, so its C{finish_reason} is never sent streamed (give
    one event, C{(({"text": ""},),)}, to send it).
    """

    events: tuple[tuple[dict[str, Any], ...], ...]
    finish_reason: str = "STOP"
    usage: dict[str, Any] | None = None
    #: Repeat the finish reason on every event, as Gemini sometimes does.
    repeat_finish: bool = False
    #: When set, a whole answer is this C{GenerateContentResponse} as it
    #: is (C{events} unused): for answers of unusual shape.
    document: dict[str, Any] | None = None


@attrs.frozen
class OpenAIAnswer:
    """
    A scripted OpenAI-shaped answer: C{content} and C{tool_calls}
    (C{{"id", "name", "arguments"}}, and C{"type"} when not
    C{"function"}: Moonshot's C{"builtin_function"}); a stream sends each
    call's id, type and name first, then its arguments in two fragments,
    as OpenAI does.
    """

    content: str | None = None
    tool_calls: tuple[dict[str, str], ...] = ()
    finish_reason: str | None = None
    #: When set, the C{usage} sent (whole, or in the usage chunk) as it
    #: is, in place of the one counted: a provider's odd shapes (C{"10"},
    #: C{10.0}, a field missing).
    usage: dict[str, Any] | None = None
    #: When set, the C{tool_calls} entries sent as they are, in place of
    #: those made from C{tool_calls}: a whole answer lists them, a stream
    #: sends each as the one tool call delta of an event.  For a
    #: provider's odd shapes (a C{function} that is not an object, an
    #: C{index} that is not an integer); the finish reason is
    #: C{tool_calls} unless C{finish_reason} says otherwise.
    raw_tool_calls: tuple[Any, ...] | None = None
    #: A stream's last chunk, the one with the C{finish_reason}, is left
    #: out (a broken provider: C{[DONE]} with no choice finished); a whole
    #: answer is sent as usual.
    unfinished: bool = False


#: Google's documented placeholder for a call Gemini did not sign.
SKIP_SIGNATURE = "skip_thought_signature_validator"


def default_kimi(key: str = "kimi-test-key") -> ProviderBehaviour:
    """
    A Kimi that lists a few real Moonshot model ids.
    """
    return ProviderBehaviour(
        key=key,
        models=["moonshot-v1-8k", "moonshot-v1-32k", "moonshot-v1-128k", "kimi-k2-0905-preview"],
        owned_by="moonshot",
    )


def default_gemini(key: str = "gemini-test-key") -> ProviderBehaviour:
    """
    A Gemini that lists a few real model ids.
    """
    return ProviderBehaviour(
        key=key,
        models=["gemini-2.5-flash", "gemini-2.5-pro", "gemini-flash-latest", "gemini-2.0-flash"],
    )


#: The stand-in's stock behaviour of the providers it knows more of than
#: their default model (a few real model ids each).
_STOCK_BEHAVIOURS: Mapping[str, Callable[[str], ProviderBehaviour]] = MappingProxyType(
    {"kimi": default_kimi, "gemini": default_gemini}
)


def default_behaviour(
    adapter: type[ProviderAdapter], key: str | None = None, models: Sequence[str] | None = None
) -> ProviderBehaviour:
    """
    How the stand-in serves C{adapter}'s provider unless told otherwise:
    accepting C{key} (by default C{"<id>-test-key"}) and listing C{models}
    (by default its default model; Kimi and Gemini: a few of their real
    model ids).  A model not listed is answered 404, as a real provider
    answers one it does not serve.
    """
    key = f"{adapter.id}-test-key" if key is None else key
    stock = _STOCK_BEHAVIOURS.get(adapter.id)
    behaviour = stock(key) if stock is not None else ProviderBehaviour(key=key, models=[], owned_by=adapter.id)
    if models is not None:
        behaviour.models = list(models)
    elif not behaviour.models:
        behaviour.models = [adapter.default_model_id]
    return behaviour


def command_line_models(adapter: type[ProviderAdapter]) -> list[str]:
    """
    What the stand-in started from the command line lists for C{adapter}'s
    provider without C{--models}: its L{default_behaviour}'s models, then
    every other model its adapter prices (C{prices}: Kimi's thinking
    C{kimi-k2.5}, whose rules can then be tried by hand), in that order.
    """
    listed = default_behaviour(adapter).models
    return [*listed, *(model for model in adapter.prices if model not in listed)]


def standin_path(adapter: type[ProviderAdapter]) -> str:
    """
    Where the stand-in serves C{adapter}'s provider: C{<id>/<the last path
    segment of its default base URL>} (C{"kimi/v1"}, C{"gemini/v1beta"}),
    or C{<id>} when that URL has no path.
    """
    last = urlsplit(adapter.default_base_url).path.rstrip("/").rpartition("/")[2]
    return f"{adapter.id}/{last}" if last else adapter.id


class Reject(Exception):
    """
    Raised by a handler to answer with an error in the provider's shape
    (a bad query parameter, say).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


class Dialect(Protocol):
    """
    One API shape: its endpoints, how a caller proves who it is and how an
    error looks.
    """

    def mount(self, node: Resource, upstream: StandInUpstream, provider_id: str) -> None:
        """
        Put the API's endpoints under C{node} (the provider's base URL),
        answering as C{provider_id}'s behaviour says.
        """

    def presented_key(self, request: Request) -> str | None:
        """
        The key the request carries, if any.
        """

    def error_document(self, status: int, message: str | None, key: str) -> dict[str, Any]: ...

    def refusal(
        self, status: int, key: str, retry_after: float | None, key_invalid: bool = False
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """
        The status, body and headers of a 429 or an invalid-key answer, in
        the provider's real shape.
        """


@attrs.frozen
class OpenAIDialect:
    """
    An OpenAI-compatible API (Moonshot's wording in its stock errors):
    C{GET /models}, C{POST /chat/completions}, C{Authorization: Bearer
    <key>} and C{{"error": {"message": ..., "type": ...}}}.
    """

    _stock: ClassVar[Mapping[int, tuple[str, str]]] = MappingProxyType(
        {
            401: ("Invalid Authentication", "invalid_authentication_error"),
            403: (
                "Your account is suspended, please check your plan and billing details",
                "permission_denied_error",
            ),
            429: ("Your account reached max request rate, please try again later", "rate_limit_reached_error"),
            500: ("Internal server error", "server_error"),
            503: ("The engine is currently overloaded, please try again later", "engine_overloaded_error"),
        }
    )

    #: Serve OpenAI's C{POST /embeddings} too (Moonshot has none).
    embeddings: bool = False

    def mount(self, node: Resource, upstream: StandInUpstream, provider_id: str) -> None:
        node.putChild(b"models", _Endpoint(upstream, provider_id, self, openai_models))
        _mount(node, b"chat").putChild(b"completions", _Endpoint(upstream, provider_id, self, post=openai_chat))
        if self.embeddings:
            node.putChild(b"embeddings", _Endpoint(upstream, provider_id, self, post=openai_embed))

    def presented_key(self, request: Request) -> str | None:
        value = request.getHeader("authorization")
        return value[len("Bearer ") :] if value and value.startswith("Bearer ") else None

    def error_document(self, status: int, message: str | None, key: str) -> dict[str, Any]:
        stock_message, kind = self._stock.get(status, ("Request failed", "invalid_request_error"))
        return {"error": {"message": message or stock_message, "type": kind}}

    def refusal(
        self, status: int, key: str, retry_after: float | None, key_invalid: bool = False
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        # Moonshot sends Retry-After with its 429s; a bad key is a 401.
        if key_invalid:
            return 401, self.error_document(401, None, key), {}
        headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
        return status, self.error_document(status, None, key), headers


@attrs.frozen
class GeminiDialect:
    """
    Google's Generative Language API: C{x-goog-api-key: <key>} and
    C{{"error": {"code": ..., "message": ..., "status": ...}}}.
    """

    _stock: ClassVar[Mapping[int, tuple[str, str]]] = MappingProxyType(
        {
            400: ("Request contains an invalid argument.", "INVALID_ARGUMENT"),
            401: ("API key not valid. Please pass a valid API key.", "UNAUTHENTICATED"),
            # The real message quotes the key; the gateway must scrub it.
            403: ("Permission denied: Consumer 'api_key:{key}' has been suspended.", "PERMISSION_DENIED"),
            404: ("Requested entity was not found.", "NOT_FOUND"),
            429: ("Resource has been exhausted (e.g. check quota).", "RESOURCE_EXHAUSTED"),
            500: (
                "An internal error has occurred. Please retry or report in "
                "https://developers.generativeai.google/guide/troubleshooting",
                "INTERNAL",
            ),
            503: ("The model is overloaded. Please try again later.", "UNAVAILABLE"),
            504: ("Deadline expired before operation could complete.", "DEADLINE_EXCEEDED"),
        }
    )

    def mount(self, node: Resource, upstream: StandInUpstream, provider_id: str) -> None:
        node.putChild(b"models", _Endpoint(upstream, provider_id, self, gemini_models, post=gemini_generate))

    def presented_key(self, request: Request) -> str | None:
        value = request.getHeader("x-goog-api-key")
        return value if isinstance(value, str) else None

    def error_document(self, status: int, message: str | None, key: str) -> dict[str, Any]:
        stock_message, code = self._stock.get(status, ("Unknown error.", "UNKNOWN"))
        return {
            "error": {
                "code": status,
                "message": message or stock_message.format(key=key),
                "status": code,
            }
        }

    def refusal(
        self, status: int, key: str, retry_after: float | None, key_invalid: bool = False
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        # Google's shapes (ai.google.dev/gemini-api/docs/troubleshooting): a
        # bad key is 400 INVALID_ARGUMENT with a google.rpc.ErrorInfo of
        # reason API_KEY_INVALID; a 429 RESOURCE_EXHAUSTED carries how long
        # to wait as a google.rpc.RetryInfo, not as a header.
        if key_invalid:
            return (
                400,
                {
                    "error": {
                        "code": 400,
                        "message": "API key not valid. Please pass a valid API key.",
                        "status": "INVALID_ARGUMENT",
                        "details": [
                            {
                                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                "reason": "API_KEY_INVALID",
                                "domain": "googleapis.com",
                                "metadata": {"service": "generativelanguage.googleapis.com"},
                            }
                        ],
                    }
                },
                {},
            )
        document = self.error_document(status, None, key)
        if retry_after is not None:
            document["error"]["details"] = [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_after:g}s"}
            ]
        return status, document, {}


def dialect_for(adapter: type[ProviderAdapter]) -> Dialect:
    """
    The dialect C{adapter}'s provider speaks, read from its wire: OpenAI's
    (L{OpenAIWire <openclaw.providers.openai_compatible.OpenAIWire>}),
    with C{/embeddings} when it declares OpenAI's embeddings, or Gemini's
    (L{GeminiWire <openclaw.providers.gemini.GeminiWire>}).

    @raise ValueError: the stand-in speaks no dialect for its wire.
    """
    from openclaw.providers.gemini import GeminiWire
    from openclaw.providers.openai_compatible import OpenAIEmbeddings, OpenAIWire

    if isinstance(adapter.wire, OpenAIWire):
        return OpenAIDialect(embeddings=isinstance(adapter.embeddings, OpenAIEmbeddings))
    if isinstance(adapter.wire, GeminiWire):
        return GeminiDialect()
    raise ValueError(
        f"the stand-in speaks no dialect for {adapter.id!r}'s wire ({type(adapter.wire).__name__}): "
        "mount it with StandInUpstream.mount and a Dialect of its own"
    )


#: Turns a request into C{(status, JSON document)}; may raise L{Reject}.
Handler = Callable[[Request, ProviderBehaviour], tuple[int, Any]]


def openai_models(request: Request, behaviour: ProviderBehaviour) -> tuple[int, Any]:
    """
    C{GET /v1/models}, OpenAI's list shape.
    """
    return 200, {
        "object": "list",
        "data": [
            {"id": model, "object": "model", "created": 1700000000, "owned_by": behaviour.owned_by}
            for model in behaviour.models
        ],
    }


def gemini_models(request: Request, behaviour: ProviderBehaviour) -> tuple[int, Any]:
    """
    C{GET /v1beta/models}: one page of C{pageSize} models starting at the
    opaque C{pageToken}, with C{nextPageToken} when more remain.
    """
    try:
        page_size = int(_arg(request, "pageSize") or GEMINI_DEFAULT_PAGE_SIZE)
    except ValueError:
        raise Reject(400, "Invalid value for pageSize.") from None
    token = _arg(request, "pageToken")
    try:
        offset = _decode_page_token(token) if token else 0
    except ValueError:
        raise Reject(400, "Invalid page token.") from None
    size = max(1, min(page_size, behaviour.page_size_limit, GEMINI_MAX_PAGE_SIZE))
    page = behaviour.models[offset : offset + size]
    document: dict[str, Any] = {
        "models": [
            {
                "name": f"models/{model}",
                "version": "001",
                "displayName": model,
                "supportedGenerationMethods": ["generateContent", "countTokens"],
            }
            for model in page
        ]
    }
    if offset + size < len(behaviour.models):
        document["nextPageToken"] = _encode_page_token(offset + size)
    return 200, document


@attrs.frozen
class EventStream:
    """
    A streamed answer: these server-sent event payloads, in order, each
    written as C{data: <payload>} and the given separator.
    """

    events: tuple[bytes, ...]
    #: Gemini separates events with CRLF pairs, OpenAI-style APIs with LFs.
    separator: bytes = b"\n\n"


#: Where C{--log-bodies} writes.
_bodies_log = Logger(namespace="openclaw.testing.upstream.bodies")


def _received(request: Request, behaviour: ProviderBehaviour, body: Any) -> None:
    """
    Keep C{body} (L{ProviderBehaviour.bodies}), and log it as JSON with
    L{ProviderBehaviour.log_bodies}.
    """
    behaviour.bodies.append(body)
    if behaviour.log_bodies:
        _bodies_log.info(
            "{method} {path} body: {body}",
            method=request.method.decode("ascii", "replace"),
            path=request.uri.decode("ascii", "replace"),
            body=json.dumps(_clipped(body), ensure_ascii=False),
        )


#: The characters of a string value a logged body shows (an image's data
#: URL runs to megabytes).
LOGGED_STRING_CHARS = 256


def _clipped(value: Any) -> Any:
    """
    C{value} (parsed JSON) with each string past L{LOGGED_STRING_CHARS}
    cut there, saying how long it was.
    """
    if isinstance(value, str) and len(value) > LOGGED_STRING_CHARS:
        return f"{value[:LOGGED_STRING_CHARS]}... ({len(value)} characters)"
    if isinstance(value, dict):
        return {key: _clipped(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_clipped(item) for item in value]
    return value


def _json_body(request: Request) -> Any:
    assert request.content is not None
    try:
        return json.loads(request.content.read())
    except ValueError:
        raise Reject(400, "request body is not valid JSON") from None


def openai_chat(request: Request, behaviour: ProviderBehaviour) -> tuple[int, Any]:
    """
    C{POST /v1/chat/completions}: the reply as one completion, or with
    C{"stream": true} as C{chat.completion.chunk} events ending C{[DONE]}.
    """
    body = behaviour.last_body = _json_body(request)
    _received(request, behaviour, body)
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise Reject(400, "Invalid request: messages must be a non-empty list")
    model = body.get("model")
    if model in behaviour.private_models:
        raise Reject(403, f"The model {model} is not available for your organization")
    if model not in behaviour.models:
        raise Reject(404, f"Not found the model {model} or Permission denied")
    _check_openai_tool_ids(body["messages"])
    _check_builtin_results(body["messages"])
    if _MOONSHOT_MODEL.match(model):
        _check_moonshot_content(body["messages"])
        _check_moonshot_tools(body.get("tools"))
    thinking = body.get("thinking")
    if _KIMI_THINKING.search(model) and not (isinstance(thinking, dict) and thinking.get("type") == "disabled"):
        _check_kimi_reasoning(body["messages"])
        forced = body.get("tool_choice")
        if forced == "required" or isinstance(forced, dict):
            # Moonshot's thinking models choose their calls themselves,
            # unless thinking is off ("thinking": {"type": "disabled"}).
            how = "required" if forced == "required" else "specified"
            raise Reject(400, f"tool_choice '{how}' is incompatible with thinking enabled")
    base = {"id": "chatcmpl-standin", "created": 1700000000, "model": model}
    answer = behaviour.answers.pop(0) if behaviour.answers else _openai_default(body, behaviour)
    pieces = re.findall(r"\s*\S+", answer.content) if answer.content else []
    completion = len(pieces) + len(answer.tool_calls) + behaviour.reasoning_tokens
    usage: dict[str, Any] = {"prompt_tokens": 10, "completion_tokens": completion, "total_tokens": 10 + completion}
    if behaviour.reasoning_tokens:
        usage["completion_tokens_details"] = {"reasoning_tokens": behaviour.reasoning_tokens}
    if answer.usage is not None:
        usage = answer.usage
    finish = answer.finish_reason or ("tool_calls" if answer.tool_calls or answer.raw_tool_calls else "stop")
    if not body.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": answer.content}
        if answer.raw_tool_calls is not None:
            message["tool_calls"] = list(answer.raw_tool_calls)
        elif answer.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": c.get("type", "function"),
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in answer.tool_calls
            ]
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
        if behaviour.usage_in_choice:
            return 200, {**base, "object": "chat.completion", "choices": [{**choice, "usage": usage}]}
        return 200, {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
    chunk = {**base, "object": "chat.completion.chunk"}
    events = [
        {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    ]
    events += [
        {**chunk, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]} for piece in pieces
    ]
    for i, call in enumerate(answer.tool_calls):
        opening = {
            "index": i,
            "id": call["id"],
            "type": call.get("type", "function"),
            "function": {"name": call["name"], "arguments": ""},
        }
        half = len(call["arguments"]) // 2
        deltas = [opening] + [
            {"index": i, "function": {"arguments": fragment}}
            for fragment in (call["arguments"][:half], call["arguments"][half:])
        ]
        events += [
            {**chunk, "choices": [{"index": 0, "delta": {"tool_calls": [d]}, "finish_reason": None}]} for d in deltas
        ]
    events += [
        {**chunk, "choices": [{"index": 0, "delta": {"tool_calls": [d]}, "finish_reason": None}]}
        for d in answer.raw_tool_calls or ()
    ]
    last: dict[str, Any] = {"index": 0, "delta": {}, "finish_reason": finish}
    if behaviour.usage_in_choice:
        last["usage"] = usage
    if not answer.unfinished:
        events.append({**chunk, "choices": [last]})
    if (body.get("stream_options") or {}).get("include_usage") and not behaviour.usage_in_choice:
        events.append({**chunk, "choices": [], "usage": usage})
    done = (b"[DONE]",) if behaviour.send_done else ()
    return 200, EventStream((*(json.dumps(e).encode() for e in events), *done))


def _openai_default(body: dict[str, Any], behaviour: ProviderBehaviour) -> OpenAIAnswer:
    """
    The answer when none is scripted: Moonshot's web search loop
    (L{_web_search}) when C{$web_search} is declared; else a call of the
    function a C{tool_choice} forces (C{"required"}: the first tool; a
    named function; C{allowed_tools} with mode C{"required"}: the first
    of them), with arguments valid against its C{parameters}
    (L{schema_instance}; C{{}} without), so a tool loop can be tried by hand;
    else the C{reply}.
    """
    choice = body.get("tool_choice")
    searched = _web_search(body, behaviour) if choice != "none" else None
    if searched is not None:
        return searched
    functions = [t.get("function") or {} for t in body.get("tools") or () if isinstance(t, dict)]
    tools = [function.get("name") for function in functions]
    name = None
    if choice == "required" and tools:
        name = tools[0]
    elif isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = choice.get("allowed_tools") or {}
        if allowed.get("mode") == "required" and allowed.get("tools"):
            name = (allowed["tools"][0].get("function") or {}).get("name")
    if not isinstance(name, str):
        return OpenAIAnswer(_structured_reply(_openai_schema(body.get("response_format")), behaviour))
    parameters = next((f.get("parameters") for f in functions if f.get("name") == name), None)
    arguments = json.dumps(schema_instance(parameters, parameters, "text") or {}) if parameters else "{}"
    call = {"id": f"call_standin_{len(behaviour.bodies)}", "name": name, "arguments": arguments}
    return OpenAIAnswer(None, (call,))


#: Moonshot's built-in web search tool, as a request declares it
#: (U{https://platform.moonshot.ai/docs/guide/use-web-search}).
WEB_SEARCH = "$web_search"
#: What the stand-in's Kimi answers once a web search's result is back.
WEB_SEARCH_REPLY = "Found on the web: {reply}"


def _web_search(body: dict[str, Any], behaviour: ProviderBehaviour) -> OpenAIAnswer | None:
    """
    Moonshot's built-in web search, when the request declares it
    (C{{"type": "builtin_function", "function": {"name": "$web_search"}}}),
    as Moonshot documents it: the first answer is a call of type
    C{builtin_function} named C{$web_search} (finish reason
    C{tool_calls}) whose C{arguments} hold the search's id and its token
    count; once the tool message giving them back unchanged ends the
    conversation, the answer is text, L{WEB_SEARCH_REPLY}.  None when
    C{$web_search} is not declared.
    """
    declared = any(
        isinstance(tool, dict)
        and tool.get("type") == "builtin_function"
        and (tool.get("function") or {}).get("name") == WEB_SEARCH
        for tool in body.get("tools") or ()
    )
    if not declared:
        return None
    last = body["messages"][-1]
    if isinstance(last, dict) and last.get("role") == "tool" and last.get("tool_call_id") in _builtin_calls(body):
        return OpenAIAnswer(WEB_SEARCH_REPLY.format(reply=behaviour.reply))
    # This request's place among those received (it is the latest), from 0.
    n = len(behaviour.bodies) - 1
    arguments = json.dumps({"search_result": {"search_id": f"standin-search-{n}"}, "usage": {"total_tokens": 128}})
    call = {"id": f"{WEB_SEARCH}:{n}", "type": "builtin_function", "name": WEB_SEARCH, "arguments": arguments}
    return OpenAIAnswer(None, (call,))


def _builtin_calls(body: dict[str, Any]) -> dict[Any, Any]:
    """
    The calls of Moonshot's built-in tools in a request's history: id ->
    arguments.
    """
    return {
        call.get("id"): (call.get("function") or {}).get("arguments")
        for message in body["messages"]
        if isinstance(message, dict)
        for call in message.get("tool_calls") or ()
        if isinstance(call, dict) and call.get("type") == "builtin_function"
    }


def _check_builtin_results(messages: list[Any]) -> None:
    """
    Refuse a tool message answering a call of one of Moonshot's built-in
    tools that does not give the call's C{arguments} back (the same JSON
    document: Moonshot's own example sends C{json.dumps} of them parsed),
    as Moonshot's documentation asks: the stand-in's check that a loop
    through the gateway carried them whole.
    """
    calls = _builtin_calls({"messages": messages})
    for index, message in enumerate(messages):
        answered = message.get("tool_call_id") if isinstance(message, dict) and message.get("role") == "tool" else None
        if answered in calls and not _same_json(message.get("content"), calls[answered]):
            raise Reject(
                400,
                f"Invalid request: the tool message at index {index} answers a builtin_function call: its "
                "content must be the call's arguments, unchanged",
            )


def _same_json(content: Any, arguments: Any) -> bool:
    """
    Whether C{content} and C{arguments} are texts of the same JSON document.
    """
    try:
        return isinstance(content, str) and json.loads(content) == json.loads(arguments)
    except (TypeError, ValueError):
        return False


#: What L{_openai_schema} and L{_gemini_schema} return for JSON asked for
#: with no schema (C{json_object}, C{responseMimeType} alone).
ANY_JSON: Mapping[str, Any] = MappingProxyType({})


def _openai_schema(response_format: Any) -> Mapping[str, Any] | None:
    """
    The JSON Schema an OpenAI C{response_format} asks the answer to follow:
    C{json_schema.schema}, L{ANY_JSON} for C{json_object}; None for text.
    """
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_object":
        return ANY_JSON
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        return schema if isinstance(schema, dict) else ANY_JSON
    return None


def _gemini_schema(config: dict[str, Any]) -> Mapping[str, Any] | None:
    """
    The schema a C{generationConfig} asks the answer to follow
    (C{responseJsonSchema}, or the OpenAPI subset's C{responseSchema}),
    L{ANY_JSON} for C{responseMimeType: application/json} alone; None for
    text.
    """
    if config.get("responseMimeType") != "application/json":
        return None
    schema = config.get("responseJsonSchema") or config.get("responseSchema")
    return schema if isinstance(schema, dict) else ANY_JSON


def _structured_reply(schema: Mapping[str, Any] | None, behaviour: ProviderBehaviour) -> str:
    """
    The reply as text, or, when JSON was asked for, a JSON document that
    follows C{schema} (L{schema_instance}; the reply itself where a
    string is wanted), so that a client parsing structured output
    (the openai SDK's C{.parse()}) can be tried against the stand-in.  A
    reply that is a JSON document already (set by a test) is sent as it is.
    """
    if schema is None or _is_json(behaviour.reply):
        return behaviour.reply
    if schema is ANY_JSON:
        return json.dumps({"reply": behaviour.reply})
    return json.dumps(schema_instance(schema, schema, behaviour.reply))


#: A value of each string C{format} the stand-in knows (JSON Schema's; the
#: ones Pydantic writes for datetime, date, time, UUID, e-mail and URL).
_FORMATTED = {
    "date-time": "2026-01-01T00:00:00Z",
    "date": "2026-01-01",
    "time": "00:00:00Z",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "email": "stand-in@example.com",
    "uri": "https://example.com/",
}


def _bound(schema: dict[str, Any], inclusive: str, exclusive: str, step: int) -> float | None:
    """
    A number's inclusive bound from C{inclusive}, or from C{exclusive}
    moved by C{step} inside; None when neither is a number.
    """
    for name, move in ((inclusive, 0), (exclusive, step)):
        value = schema.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value + move
    return None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


#: The most values (objects, items, strings, ...) L{schema_instance} builds
#: for one schema, and the most characters its strings pad to in all: a
#: schema asking for more (a large C{minItems} nested, a huge
#: C{minLength}, many long strings) is refused, not built in the
#: stand-in's memory.
MAX_INSTANCE_VALUES = 10_000
MAX_INSTANCE_CHARACTERS = 1_000_000


def schema_instance(schema: Any, root: Mapping[str, Any], text: str) -> Any:
    """
    A small value valid against C{schema} (JSON Schema, or Gemini's OpenAPI
    subset with upper-case types): every property of an object, the fewest
    items an array may have, the first C{enum} value or C{anyOf}/C{oneOf}
    option, a number within its bounds (its minimum, or 0), a string of a
    known C{format} (L{_FORMATTED}), else C{text} (padded to its
    C{minLength}, cut to its C{maxLength}; a C{pattern} is not followed).
    Local C{$ref}s (C{#/$defs/...}, C{#/definitions/...})
    are followed; past 16 levels of nesting (a recursive schema) an
    object's optional properties are left out, and any remaining value is
    null.

    @raise Reject: 400, as the providers refuse an invalid schema: a
        C{properties} that is not an object, a C{required} that is not a
        list of names, a C{minItems} that is not a count; or one asking for
        more than L{MAX_INSTANCE_VALUES} values or strings of more than
        L{MAX_INSTANCE_CHARACTERS} characters in all.
    """
    built = characters = 0

    def count(values: int) -> None:
        nonlocal built
        built += values
        if built > MAX_INSTANCE_VALUES:
            raise Reject(400, f"Invalid schema: the stand-in builds at most {MAX_INSTANCE_VALUES} values for one")

    def padded(length: int) -> None:
        nonlocal characters
        characters += length
        if characters > MAX_INSTANCE_CHARACTERS:
            raise Reject(
                400, f"Invalid schema: the stand-in pads strings to at most {MAX_INSTANCE_CHARACTERS} characters in all"
            )

    def instance(schema: Any, depth: int) -> Any:
        if not isinstance(schema, dict) or depth > 32:
            return None
        count(1)
        reference = schema.get("$ref")
        if isinstance(reference, str) and reference.startswith("#/"):
            target: Any = root
            for name in reference[2:].split("/"):
                target = target.get(name.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
            return instance(target, depth + 1)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][0]
        for key in ("anyOf", "oneOf", "allOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                wanted = [o for o in options if not (isinstance(o, dict) and str(o.get("type")).lower() == "null")]
                chosen = (wanted or options)[0]
                if isinstance(chosen, dict) and "$ref" not in chosen:
                    # What stands beside the keyword (a type) holds for
                    # the option too.
                    chosen = {**{k: v for k, v in schema.items() if k != key}, **chosen}
                return instance(chosen, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if str(k).lower() != "null"), "null")
        kind = str(kind).lower() if kind is not None else ("object" if "properties" in schema else None)
        if kind == "object":
            properties = schema.get("properties") or {}
            if not isinstance(properties, dict):
                raise Reject(400, "Invalid schema: 'properties' must be an object")
            required = schema.get("required") or list(properties)
            if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
                raise Reject(400, "Invalid schema: 'required' must be an array of property names")
            return {
                name: instance(value, depth + 1) for name, value in properties.items() if name in required or depth < 16
            }
        if kind == "array":
            items = schema.get("minItems") or 0
            if type(items) is not int or items < 0:
                raise Reject(400, "Invalid schema: 'minItems' must be a non-negative integer")
            # A tuple's schemas by position (2020-12's prefixItems, or an
            # older draft's list of items), then the rest's.
            positions = schema.get("prefixItems", schema.get("items"))
            positions = positions if isinstance(positions, list) else []
            rest = schema.get("items") if isinstance(schema.get("items"), dict) else None
            schemas = [positions[i] if i < len(positions) else rest for i in range(items)]
            # Items without a schema (nulls) are counted here; those with one count themselves.
            count(sum(1 for item in schemas if not isinstance(item, dict)))
            return [instance(item, depth + 1) for item in schemas]
        if kind == "string":
            if schema.get("format") in _FORMATTED:
                return _FORMATTED[schema["format"]]
            shortest, longest = schema.get("minLength"), schema.get("maxLength")
            if isinstance(shortest, int) and len(text) < shortest:
                padded(shortest)
                filled = text.ljust(shortest, ".")
            else:
                filled = text
            return filled[:longest] if isinstance(longest, int) else filled
        if kind in ("integer", "number"):
            low = _bound(schema, "minimum", "exclusiveMinimum", 1)
            high = _bound(schema, "maximum", "exclusiveMaximum", -1)
            value = low if low is not None else (0 if high is None or high >= 0 else high)
            if high is not None and value > high:
                value = high
            return int(value) if kind == "integer" else value
        if kind == "boolean":
            return False
        return None

    return instance(schema, 0)


def _gemini_forced(body: dict[str, Any], behaviour: ProviderBehaviour) -> GeminiAnswer | None:
    """
    A call of the function C{toolConfig.functionCallingConfig} forces
    (mode C{ANY}: the first of C{allowedFunctionNames}, else the first
    declared), with C{args} valid against its parameters
    (L{schema_instance}; C{{}} without) and a signature of this server's, when
    no answer is scripted; else None.
    """
    config = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
    if config.get("mode") != "ANY":
        return None
    names = list(config.get("allowedFunctionNames") or ())
    declared = [
        d for tool in body.get("tools") or () for d in tool.get("functionDeclarations") or () if isinstance(d, dict)
    ]
    names += [d.get("name") for d in declared]
    if not names or not isinstance(names[0], str):
        return None
    signature = base64.b64encode(f"stand-in signature {len(behaviour.bodies)}".encode()).decode("ascii")
    declaration = next((d for d in declared if d.get("name") == names[0]), {})
    parameters = declaration.get("parametersJsonSchema") or declaration.get("parameters")
    args = schema_instance(parameters, parameters, "text") if parameters else None
    call = {"name": names[0], "args": args if isinstance(args, dict) else {}, "id": f"standin-{len(behaviour.bodies)}"}
    return GeminiAnswer((({"functionCall": call, "thoughtSignature": signature},),))


def _check_openai_tool_ids(messages: list[Any]) -> None:
    """
    Refuse what OpenAI-compatible APIs refuse: a tool result for no
    earlier call (ids compared exactly).
    """
    ids: set[str] = set()
    for message in messages:
        if not isinstance(message, dict):
            continue
        for call in message.get("tool_calls") or ():
            ids.add(call.get("id"))
        if message.get("role") == "tool" and message.get("tool_call_id") not in ids:
            raise Reject(400, f"Invalid request: tool_call_id {message.get('tool_call_id')} is not found")


def _called_model(request: Request) -> str | None:
    """
    The model a call names: in its path (Gemini's C{models/<model>:...}),
    else as its JSON body's C{model} (OpenAI's).
    """
    found = re.search(r"/models/([^/:?]+):", request.uri.decode("utf-8", "replace"))
    if found:
        return found.group(1)
    content = request.content
    if content is None:
        return None
    position = content.tell()
    try:
        body = json.loads(content.read() or b"null")
    except ValueError:
        return None
    finally:
        content.seek(position)
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


#: Moonshot's models (as opposed to a third OpenAI-compatible provider's).
_MOONSHOT_MODEL = re.compile(r"moonshot-|kimi-")


def _check_moonshot_content(messages: list[Any]) -> None:
    """
    Refuse what Moonshot refuses: an assistant message with tool calls
    whose content is empty text, C{""} (MoonshotAI/kimi-cli#2621) or a
    text part holding none (BerriAI/litellm#42186); an assistant message
    without tool calls whose content is missing, null, C{""} or parts
    holding no text ("the message at position N with role 'assistant'
    must not be empty": AstrBotDevs/AstrBot#7200, lobehub/lobehub#8419).
    """
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        if message.get("role") == "assistant" and not message.get("tool_calls"):
            if message.get("partial") is True:
                # Partial Mode's prefill, empty in Moonshot's role-play example.
                continue
            content = message.get("content")
            if not content or (
                isinstance(content, list)
                and not any(
                    isinstance(part, dict) and (part.get("type") != "text" or part.get("text")) for part in content
                )
            ):
                raise Reject(
                    400, f"Invalid request: the message at position {position} with role 'assistant' must not be empty"
                )
            continue
        if not message.get("tool_calls"):
            continue
        content = message.get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        if content is not None and any(
            isinstance(part, dict) and part.get("type") == "text" and part.get("text") == "" for part in parts
        ):
            raise Reject(400, "Invalid request: text content is empty")


#: What Moonshot's validator of tool parameters says before its details.
_MFJS_REFUSAL = "Invalid request: tools.function.parameters is not a valid moonshot flavored json schema, details: "


def _check_moonshot_tools(tools: Any) -> None:
    """
    Refuse tool parameters as Moonshot's validator ("Moonshot flavored JSON
    schema") does, in its words, for the shapes public reports show it
    refusing: a root whose type is not C{"object"} (MiqroForge-Desktop
    #1165), a C{type} beside C{$ref} (lidge-jun/opencodex #2677), a C{type} beside C{anyOf} ("when using anyOf, type should be
    defined in anyOf items instead of the parent schema": MoonshotAI/kimi-cli
    #2531), a list of C{items} ("items must be an object": vercel/ai
    #18921), a reference elsewhere than C{#/$defs/} (CommandCodeAI/command-code
    #594).
    """
    if not isinstance(tools, list):
        return
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or "parameters" not in function:
            continue
        parameters = function["parameters"]
        if not isinstance(parameters, dict) or parameters.get("type") != "object":
            raise Reject(400, 'Invalid request: tools.function.parameters.type is required and must be "object"')
        _check_mfjs_node(parameters, "root")


def _check_mfjs_node(schema: Any, path: str) -> None:
    if not isinstance(schema, dict):
        return
    if "type" in schema and "anyOf" in schema:
        raise Reject(
            400,
            f"{_MFJS_REFUSAL}<At path '{path}': when using anyOf, type should be defined in anyOf items instead of "
            "the parent schema>",
        )
    if isinstance(schema.get("items"), list):
        raise Reject(400, f"{_MFJS_REFUSAL}<At path '{path}': items must be an object>")
    ref = schema.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#/$defs/"):
        raise Reject(400, f"{_MFJS_REFUSAL}<At path '{path}': references must start with #/$defs/>")
    if isinstance(ref, str) and "type" in schema:
        raise Reject(
            400,
            f"{_MFJS_REFUSAL}<At path '{path}': when using $ref, type should be defined in the referenced schema "
            "instead of the parent schema>",
        )
    within = "" if path == "root" else path + "."
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(schema.get(key), list):
            for index, item in enumerate(schema[key]):
                _check_mfjs_node(item, f"{within}{key}.{index}")
    for key in ("properties", "$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            for name, item in schema[key].items():
                _check_mfjs_node(item, f"{within}{key}.{name}")
    for key in ("items", "additionalProperties"):
        _check_mfjs_node(schema.get(key), f"{within}{key}")


#: Moonshot's models that think by default (kimi-k2.5 and later, the
#: kimi-k2-thinking models).
_KIMI_THINKING = re.compile(r"^kimi-k\d\.\d|^kimi-.*thinking")


def _check_kimi_reasoning(messages: list[Any]) -> None:
    """
    Refuse what Moonshot's thinking models refuse: an assistant message
    with tool calls and no C{reasoning_content} (an empty one counts as
    missing).
    """
    for index, message in enumerate(messages):
        if (
            isinstance(message, dict)
            and message.get("role") == "assistant"
            and message.get("tool_calls")
            and not message.get("reasoning_content")
        ):
            raise Reject(
                400,
                f"thinking is enabled but reasoning_content is missing in assistant tool call message at index {index}",
            )


def gemini_generate(request: Request, behaviour: ProviderBehaviour) -> tuple[int, Any]:
    """
    C{POST /v1beta/models/<model>:generateContent}, and
    C{:streamGenerateContent?alt=sse} as one C{GenerateContentResponse} per
    event (no end marker: the stream just ends).
    """
    target = b"/".join(request.postpath or ()).decode("utf-8", "replace")
    model, _, method = target.rpartition(":")
    if method == "batchEmbedContents" and model:
        return gemini_embed(request, behaviour, model)
    if method not in ("generateContent", "streamGenerateContent") or not model:
        raise Reject(404, f"Method {target!r} not found.")
    body = behaviour.last_body = _json_body(request)
    _received(request, behaviour, body)
    if not isinstance(body, dict) or not body.get("contents"):
        raise Reject(400, "* GenerateContentRequest.contents: contents is not specified")
    if model in behaviour.private_models:
        raise Reject(403, f"You do not have permission to access tunedModels/{model} (or it may not exist).")
    if model not in behaviour.models:
        raise Reject(
            404, f"models/{model} is not found for API version v1beta, or is not supported for generateContent."
        )
    _check_gemini_request(body, behaviour, model)
    thinking = (body.get("generationConfig") or {}).get("thinkingConfig") or {}
    levels = behaviour.thinking_levels.get(model)
    if levels is not None and "thinkingLevel" in thinking and thinking["thinkingLevel"] not in levels:
        raise Reject(400, f"Thinking level {str(thinking['thinkingLevel']).upper()} is not supported for this model.")
    count = int((body.get("generationConfig") or {}).get("candidateCount") or 1)
    answer = behaviour.answers.pop(0) if behaviour.answers else _gemini_forced(body, behaviour)
    if answer is None:
        pieces = behaviour.reply_pieces(
            _structured_reply(_gemini_schema(body.get("generationConfig") or {}), behaviour)
        )
        answer = GeminiAnswer(tuple(({"text": piece},) for piece in pieces))
        usage = {"promptTokenCount": 10, "candidatesTokenCount": len(pieces)}
        if behaviour.reasoning_tokens:
            usage["thoughtsTokenCount"] = behaviour.reasoning_tokens
        usage["totalTokenCount"] = 10 + len(pieces) + behaviour.reasoning_tokens
    else:
        usage = answer.usage or {"promptTokenCount": 10, "candidatesTokenCount": 1, "totalTokenCount": 11}
    for event in answer.events:
        behaviour.signatures.update(p["thoughtSignature"] for p in event if "thoughtSignature" in p)
    if method == "generateContent" and answer.document is not None:
        return 200, answer.document
    if thinking.get("includeThoughts") is not True:
        # Thought summaries only when asked for
        # (https://ai.google.dev/gemini-api/docs/thinking#summaries).
        answer = attrs.evolve(answer, events=tuple(tuple(p for p in e if not p.get("thought")) for e in answer.events))

    config = body.get("generationConfig") or {}

    def response(parts: Sequence[dict[str, Any]], finish: bool) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": list(parts), "role": "model"}}
        if finish or answer.repeat_finish:
            candidate["finishReason"] = answer.finish_reason
        if config.get("responseLogprobs") is True:
            candidate["logprobsResult"] = gemini_logprobs(parts, config.get("logprobs"))
        return {
            # Index 0 left out, as Gemini's proto3 JSON leaves out a field
            # at its default.
            "candidates": [{**candidate, "index": i} if i else dict(candidate) for i in range(count)],
            "usageMetadata": usage,
            "modelVersion": model,
            "responseId": "standin-response",
        }

    if method == "generateContent":
        return 200, response([part for event in answer.events for part in event], True)
    if _arg(request, "alt") != "sse":
        raise Reject(400, "the stand-in streams only with alt=sse")
    last = len(answer.events) - 1
    events = [response(parts, i == last) for i, parts in enumerate(answer.events)]
    return 200, EventStream(tuple(json.dumps(e).encode() for e in events), separator=b"\r\n\r\n")


def gemini_logprobs(parts: Sequence[dict[str, Any]], top: int | None) -> dict[str, Any]:
    """
    Gemini's C{logprobsResult} for the answer text of C{parts} (asked with
    C{responseLogprobs}): each text part is one token, of log probability
    -0.25 times its place; with C{top} (C{generationConfig.logprobs}), that
    many top candidates per token, the chosen one first, then C{alt1},
    C{alt2}... less likely each.  Zero values are left out, as proto3's
    JSON does.
    """
    chosen: list[dict[str, Any]] = []
    tops: list[dict[str, Any]] = []
    for part in parts:
        if not isinstance(part.get("text"), str) or part.get("thought"):
            continue
        token: dict[str, Any] = {"token": part["text"], "tokenId": 100 + len(chosen)}
        if chosen:
            token["logProbability"] = -0.25 * len(chosen)
        chosen.append(token)
        if top is not None:
            others = [{"token": f"alt{j}", "tokenId": j, "logProbability": -1.0 - j} for j in range(1, top)]
            tops.append({"candidates": [token, *others][:top]})
    result: dict[str, Any] = {"chosenCandidates": chosen}
    if top is not None:
        result["topCandidates"] = tops
    return result


def _check_gemini_request(body: dict[str, Any], behaviour: ProviderBehaviour, model: str) -> None:
    """
    Refuse what the real API refuses, in its words: empty text unsigned, a
    C{gs://} C{fileUri} (which only Vertex AI reads), a function
    response turn that does not answer the call turn right before it, a
    Gemini 3 model turn whose first call is unsigned, a C{"$ref"} in a
    function response, JSON Schema keywords in C{parameters}, a C{"$ref"}
    with other keywords beside it in a JSON Schema, a penalty other than 0
    on a model that takes none (L{NO_PENALTY_MODELS}), a C{candidateCount}
    over 1 on one that gives one candidate (L{ONE_CANDIDATE_MODELS}), a
    C{toolConfig.functionCallingConfig} without a function declaration
    (pydantic/pydantic-ai #5791: the Gemini API's 400 on 2.5 models).
    """
    config = body.get("generationConfig") or {}
    if NO_PENALTY_MODELS.match(model) and (config.get("presencePenalty") or config.get("frequencyPenalty")):
        raise Reject(400, f"Penalty is not enabled for models/{model}")
    count = config.get("candidateCount")
    if ONE_CANDIDATE_MODELS.match(model) and isinstance(count, int) and count > 1:
        raise Reject(400, "Multiple candidates is not enabled for this model")
    previous: dict[str, Any] | None = None
    for turn in body["contents"]:
        parts = turn.get("parts") or []
        if not parts:
            raise Reject(400, "* GenerateContentRequest.contents.parts: contents.parts must not be empty.")
        if any(p.get("text") == "" and not p.get("thoughtSignature") for p in parts):
            # A signed one is Gemini's own, sent back as it came.
            raise Reject(400, "Unable to submit request because it has an empty text parameter.")
        for part in parts:
            uri = (part.get("fileData") or {}).get("fileUri")
            if isinstance(uri, str) and uri.lower().startswith("gs://"):
                # The Gemini API reads no Cloud Storage URL, only Vertex AI
                # does (googleapis/python-genai #71).
                raise Reject(400, f"Invalid or unsupported file uri: {uri}")
        calls = [p for p in parts if "functionCall" in p]
        if calls and behaviour.require_signatures:
            signature = calls[0].get("thoughtSignature")
            if signature != SKIP_SIGNATURE and signature not in behaviour.signatures:
                raise Reject(
                    400,
                    "Function call is missing a thought_signature in functionCall parts. This is required for "
                    "tools to work correctly, and missing thought_signature may lead to degraded model "
                    "performance. Please refer to https://ai.google.dev/gemini-api/docs/thought-signatures",
                )
        responses = [p["functionResponse"] for p in parts if "functionResponse" in p]
        if responses:
            asked = [p["functionCall"] for p in (previous or {}).get("parts", []) if "functionCall" in p]
            if len(asked) != len(responses) or [c["name"] for c in asked] != [r["name"] for r in responses]:
                raise Reject(
                    400,
                    "Please ensure that function response turn comes immediately after a function call turn. "
                    "And the number of function response parts should be equal to number of function call parts "
                    "of the function call turn.",
                )
            if [c.get("id") for c in asked] != [r.get("id") for r in responses]:
                raise Reject(400, "function response ids must match the function call ids")
            for response in responses:
                reference = _first_ref(response.get("response"))
                if reference is not None:
                    raise Reject(
                        400,
                        f"The referenced name `{reference}` in function_response.response does not match to a "
                        "display_name in the function_response.parts.",
                    )
        previous = turn
    declared = [d for tool in body.get("tools") or () for d in tool.get("functionDeclarations") or ()]
    if (body.get("toolConfig") or {}).get("functionCallingConfig") is not None and not declared:
        raise Reject(400, "Function calling config is set without function_declarations.")
    schemas = [(body.get("generationConfig") or {}).get("responseJsonSchema")]
    for tool in body.get("tools") or ():
        for declaration in tool.get("functionDeclarations") or ():
            schemas.append(declaration.get("parametersJsonSchema"))
            if "parameters" in declaration and "parametersJsonSchema" in declaration:
                raise Reject(400, "parameters and parametersJsonSchema are mutually exclusive")
            if "additionalProperties" in json.dumps(declaration.get("parameters", {})):
                raise Reject(
                    400, 'Invalid JSON payload received. Unknown name "additionalProperties": Cannot find field.'
                )
    for schema in schemas:
        reference = _ref_with_others(schema)
        if reference is not None:
            raise Reject(
                400,
                f"$ref '{reference}' was set alongside unsupported fields. If a schema node has $ref set, then "
                "only description and default can be set alongside it.",
            )


#: The Gemini models Google refuses a C{presencePenalty} or
#: C{frequencyPenalty} other than 0 ("Penalty is not enabled for
#: models/<model>"): 2.5 and later (google-gemini/cookbook #1290,
#: vercel/ai #8943, BerriAI/litellm #26108).
NO_PENALTY_MODELS = re.compile(r"gemini-(?:2\.(?:[5-9]|[1-9][0-9]+)|[3-9]|[1-9][0-9]+)(?![0-9])")
#: The Gemini models Google refuses a C{candidateCount} over 1 ("Multiple
#: candidates is not enabled for this model"): 3 and later
#: (googleapis/js-genai #1609, googleapis/python-genai #1723).
ONE_CANDIDATE_MODELS = re.compile(r"gemini-(?:[3-9]|[1-9][0-9]+)(?![0-9])")


def _first_ref(value: Any) -> str | None:
    """
    The first C{"$ref"} value anywhere in C{value}: Gemini takes one in a
    function response for a media part's C{displayName} (the stand-in has
    no such parts, so any is refused).
    """
    pending = [value]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            if "$ref" in value:
                return str(value["$ref"])
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return None


def _ref_with_others(schema: Any, names: bool = False) -> str | None:
    """
    The first C{"$ref"} in C{schema} with a keyword beside it other than
    C{description} and C{default}, which Gemini refuses; C{names}: C{schema}
    maps names to schemas (C{properties}, C{$defs}).
    """
    if isinstance(schema, list):
        return next((found for item in schema if (found := _ref_with_others(item)) is not None), None)
    if not isinstance(schema, dict):
        return None
    reference = schema.get("$ref")
    if not names and isinstance(reference, str) and not schema.keys() <= {"$ref", "description", "default"}:
        return reference
    for key, value in schema.items():
        if names or key not in ("enum", "const", "default", "examples"):
            found = _ref_with_others(value, not names and key in ("properties", "$defs", "definitions"))
            if found is not None:
                return found
    return None


#: The most numbers a vector may have, as the providers' largest models
#: give (gemini-embedding-001, OpenAI's text-embedding-3-large): more is a
#: 400, as there, not a vector the stand-in would have to build.
MAX_EMBEDDING_DIMENSIONS = 3072


def _vector_size(value: Any, name: str) -> int:
    size = value or 8
    if not isinstance(size, int) or not 1 <= size <= MAX_EMBEDDING_DIMENSIONS:
        raise Reject(400, f"* {name}: must be between 1 and {MAX_EMBEDDING_DIMENSIONS}")
    return size


def gemini_embed(request: Request, behaviour: ProviderBehaviour, model: str) -> tuple[int, Any]:
    """
    C{POST /v1beta/models/<model>:batchEmbedContents}: a vector per text,
    made from the text (so equal texts get equal vectors), of
    C{outputDimensionality} numbers (8 when not asked); a model not in
    C{embedding_models} is a 404 NOT_FOUND in Google's words, as for chat.
    """
    body = behaviour.last_body = _json_body(request)
    _received(request, behaviour, body)
    if model not in behaviour.embedding_models:
        raise Reject(
            404, f"models/{model} is not found for API version v1beta, or is not supported for batchEmbedContents."
        )
    requests = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(requests, list) or not requests:
        raise Reject(400, "* BatchEmbedContentsRequest.requests: requests is not specified")
    if len(requests) > 100:
        raise Reject(400, "* BatchEmbedContentsRequest.requests: at most 100 requests can be in one batch")
    embeddings = []
    for entry in requests:
        if entry.get("model") != f"models/{model}":
            raise Reject(400, f"Model {entry.get('model')} does not match the batch's model models/{model}")
        text = "".join(p.get("text", "") for p in entry["content"]["parts"])
        size = _vector_size(entry.get("outputDimensionality"), "EmbedContentRequest.output_dimensionality")
        embeddings.append({"values": [((len(text) + i) % 7) / 8 - 0.25 for i in range(size)]})
    return 200, {"embeddings": embeddings}


def openai_embed(request: Request, behaviour: ProviderBehaviour) -> tuple[int, Any]:
    """
    C{POST /v1/embeddings} (OpenAI's dialect, L{OpenAIDialect} with
    C{embeddings=True}): a vector per text, made as L{gemini_embed} makes
    it, of C{dimensions} numbers (8 when not asked), in the order of
    C{input}, floats or base64; C{usage} counts one token per word of each
    text and one more per text (the stand-in's own count, unlike the
    gateway's estimate).
    """
    body = behaviour.last_body = _json_body(request)
    _received(request, behaviour, body)
    given = body.get("input") if isinstance(body, dict) else None
    inputs = [given] if isinstance(given, str) else given
    if not isinstance(inputs, list) or not inputs or not all(isinstance(text, str) for text in inputs):
        raise Reject(400, "Invalid request: input must be a string or a list of strings")
    if body.get("model") not in behaviour.models:
        raise Reject(404, f"The model {body.get('model')} does not exist or you do not have access to it.")
    size = _vector_size(body.get("dimensions"), "dimensions")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise Reject(400, "Invalid request: encoding_format must be float or base64")
    data = []
    for i, text in enumerate(inputs):
        values = [((len(text) + j) % 7) / 8 - 0.25 for j in range(size)]
        embedding: Any = values
        if encoding == "base64":
            embedding = base64.b64encode(struct.pack(f"<{size}f", *values)).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    tokens = sum(len(text.split()) + 1 for text in inputs)
    return 200, {
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _arg(request: Request, name: str) -> str | None:
    values = (request.args or {}).get(name.encode())
    return values[0].decode("utf-8", "replace") if values else None


def _encode_page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode()


def _decode_page_token(token: str) -> int:
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError(token) from None
    prefix, _, number = text.partition(":")
    if prefix != "offset":
        raise ValueError(token)
    return int(number)


@attrs.define
class _OpenRequests:
    """
    Requests not yet answered, and the timers that will answer them, so that
    stopping the server can cancel them.
    """

    requests: set[Request] = attrs.field(factory=set)
    timers: dict[Request, IDelayedCall] = attrs.field(factory=dict)

    def track(self, request: Request) -> None:
        self.requests.add(request)
        request.notifyFinish().addBoth(self._forget, request)

    def _forget(self, result: object, request: Request) -> None:
        # Fires on finish() and on the client going away alike.
        self.requests.discard(request)
        timer = self.timers.pop(request, None)
        if timer is not None and timer.active():
            timer.cancel()

    def cancel_timers(self) -> None:
        for timer in self.timers.values():
            if timer.active():
                timer.cancel()
        self.timers.clear()


class _Endpoint(Resource):
    """
    One API endpoint of one provider: counts the request, then answers it as
    the provider's L{ProviderBehaviour} says.
    """

    isLeaf = True

    def __init__(
        self,
        upstream: StandInUpstream,
        provider_id: str,
        dialect: Dialect,
        handler: Handler | None = None,
        post: Handler | None = None,
    ) -> None:
        super().__init__()
        self._upstream = upstream
        self._provider_id = provider_id
        self._dialect = dialect
        self._handlers = {b"GET": handler, b"POST": post}
        self.allowedMethods = tuple(m for m, h in self._handlers.items() if h is not None)

    def render_GET(self, request: Request) -> int:
        return self._accept(request)

    def render_POST(self, request: Request) -> int:
        return self._accept(request)

    def render(self, request: Request) -> Any:
        if self._handlers.get(request.method) is None:
            raise UnsupportedMethod(self.allowedMethods)
        return super().render(request)

    def _accept(self, request: Request) -> int:
        behaviour = self._upstream.behaviour(self._provider_id)
        behaviour.requests += 1
        behaviour.uris.append(request.uri.decode("utf-8", "replace"))
        mode = Mode(behaviour.mode)
        open_requests = self._upstream.open_requests
        open_requests.track(request)
        if mode is Mode.HANG:
            return NOT_DONE_YET
        if behaviour.delay > 0:
            open_requests.timers[request] = self._upstream.reactor.callLater(
                behaviour.delay, self._answer, request, behaviour, mode
            )
        else:
            self._answer(request, behaviour, mode)
        return NOT_DONE_YET

    def _answer(self, request: Request, behaviour: ProviderBehaviour, mode: Mode) -> None:
        self._upstream.open_requests.timers.pop(request, None)
        presented = self._dialect.presented_key(request)
        behaviour.keys_seen.append(presented)
        behaviour.accept_encodings.append(request.getHeader("accept-encoding"))
        if presented in behaviour.invalid_keys:
            self._refuse(request, behaviour, 400, key_invalid=True)
            return
        if not behaviour.accepts(presented):
            self._error(request, behaviour, 401, None)
            return
        if presented in behaviour.rate_limited_keys or (
            behaviour.rate_limited_models and _called_model(request) in behaviour.rate_limited_models
        ):
            self._refuse(request, behaviour, 429)
            return
        if mode is Mode.UNAUTHORIZED:
            self._error(request, behaviour, 401, behaviour.error_message)
            return
        if mode is Mode.FORBIDDEN:
            self._error(request, behaviour, 403, behaviour.error_message)
            return
        if mode is Mode.RATE_LIMITED:
            self._refuse(request, behaviour, 429)
            return
        if mode is Mode.ERROR:
            for name, value in behaviour.error_headers.items():
                request.setHeader(name, value)
            if behaviour.error_body is not None:
                _send(request, behaviour.error_status, json.dumps(behaviour.error_body).encode())
            elif behaviour.error_status == 429 and behaviour.error_message is None:
                self._refuse(request, behaviour, 429)
            else:
                self._error(request, behaviour, behaviour.error_status, behaviour.error_message)
            return
        if mode in (Mode.ERROR_STALL, Mode.ERROR_CUT):
            for name, value in behaviour.error_headers.items():
                request.setHeader(name, value)
            error = self._dialect.error_document(behaviour.error_status, behaviour.error_message, behaviour.key)
            body = json.dumps(error).encode()
            _send(request, behaviour.error_status, body, stall=True, cut=mode is Mode.ERROR_CUT)
            return
        if mode is Mode.MALFORMED:
            _send(request, 200, b'{"object": "list", "data": [{"id": "moonsh')
            return
        handler = self._handlers[request.method]
        assert handler is not None
        try:
            status, document = handler(request, behaviour)
        except Reject as e:
            self._error(request, behaviour, e.status, e.message)
            return
        if isinstance(document, EventStream):
            if mode is Mode.STREAM_ERROR:
                error = self._dialect.error_document(behaviour.error_status, behaviour.error_message, behaviour.key)
                events = (*document.events[: behaviour.cut_after], json.dumps(error).encode())
                document = EventStream(events, document.separator)
            elif mode is Mode.EMPTY:
                document = EventStream(tuple(e for e in document.events if e == b"[DONE]"), document.separator)
            _Streamer(self._upstream, request, behaviour, document, mode).start()
            return
        body = json.dumps(document).encode()
        if mode in (Mode.STALL, Mode.CUT):
            _send(request, status, body, stall=True, cut=mode is Mode.CUT)
            return
        _send(request, status, body)
        return

    def _error(self, request: Request, behaviour: ProviderBehaviour, status: int, message: str | None) -> None:
        document = self._dialect.error_document(status, message, behaviour.key)
        _send(request, status, json.dumps(document).encode())

    def _refuse(self, request: Request, behaviour: ProviderBehaviour, status: int, key_invalid: bool = False) -> None:
        """
        A 429, or an invalid key, in the dialect's real shape.
        """
        key = self._dialect.presented_key(request) or ""
        status, document, headers = self._dialect.refusal(status, key, behaviour.retry_after, key_invalid)
        for name, value in headers.items():
            request.setHeader(name, value)
        if behaviour.retry_after_header is not None and status == 429:
            request.setHeader(b"Retry-After", behaviour.retry_after_header)
        _send(request, status, json.dumps(document).encode())


def _transport(request: Request) -> ITransport:
    transport = request.channel.transport
    assert transport is not None
    return transport


def _send(request: Request, status: int, body: bytes, stall: bool = False, cut: bool = False) -> None:
    """
    Answer with a JSON body; when stalling, announce the whole length but
    write only half of it and never finish (when cutting, then drop the
    connection).
    """
    request.setResponseCode(status)
    request.setHeader("content-type", "application/json; charset=UTF-8")
    request.setHeader("content-length", str(len(body)))
    if stall:
        request.write(body[: len(body) // 2])
        if cut:
            _transport(request).loseConnection()
        return
    request.write(body)
    request.finish()


@attrs.define
class _Streamer:
    """
    Writes one L{EventStream}, an event every C{chunk_interval} seconds
    (all at once when 0), and notes a client that leaves before the end.
    """

    upstream: StandInUpstream
    request: Request
    behaviour: ProviderBehaviour
    stream: EventStream
    mode: Mode
    _sent: int = 0
    _over: bool = False
    _gated: int = 0
    _gone: bool = False

    def start(self) -> int:
        self.request.setResponseCode(200)
        self.request.setHeader("content-type", self.behaviour.stream_content_type)
        self.request.setHeader("cache-control", "no-cache")
        self.request.notifyFinish().addErrback(self._lost)
        self._next()
        return NOT_DONE_YET

    def _next(self) -> None:
        self.upstream.open_requests.timers.pop(self.request, None)
        interval = self.behaviour.chunk_interval
        while self._sent < len(self.stream.events):
            if self.mode is Mode.TRICKLE and self._sent >= self.behaviour.cut_after:
                self._trickle()
                return
            if self.mode in (Mode.STALL, Mode.CUT) and self._sent >= self.behaviour.cut_after:
                if self.mode is Mode.CUT:
                    # loseConnection, not abort: the events written so far
                    # are still in the send buffer and must go out first.
                    self._over = True
                    _transport(self.request).loseConnection()
                return
            gate = self.behaviour.chunk_gate
            if gate is not None and self._sent > 0 and self._gated < self._sent:
                self._gated = self._sent
                gate(self._sent).addCallback(lambda _: None if self._gone else self._next())
                return
            self.request.write(b"data: " + self.stream.events[self._sent] + self.stream.separator)
            self._sent += 1
            if interval > 0 and self._sent < len(self.stream.events):
                self.upstream.open_requests.timers[self.request] = self.upstream.reactor.callLater(interval, self._next)
                return
        if self.mode is Mode.LINGER:
            return
        self._over = True
        if self.mode is Mode.CUT:
            # C{cut_after} past the last event: every event, then the
            # connection closed before the body's end.
            _transport(self.request).loseConnection()
            return
        self.request.finish()

    def _trickle(self) -> None:
        """
        A comment now, and again after C{chunk_interval}, until the client
        leaves.
        """
        self.upstream.open_requests.timers.pop(self.request, None)
        if self._gone:
            return
        self.request.write(b": keepalive" + self.stream.separator)
        interval = self.behaviour.chunk_interval or 0.1
        self.upstream.open_requests.timers[self.request] = self.upstream.reactor.callLater(interval, self._trickle)

    def _lost(self, reason: Failure) -> None:
        self._gone = True
        if not self._over:
            self.behaviour.stream_lost()


class _TrackedConnections(WrappingFactory):
    """
    Wraps the L{Site} to know every open connection, so that stopping can
    abort them and wait until they are gone.
    """

    def __init__(self, wrapped: Site) -> None:
        super().__init__(wrapped)
        self.open: OpenConnections[ProtocolWrapper] = OpenConnections()

    def registerProtocol(self, p: ProtocolWrapper) -> None:
        super().registerProtocol(p)
        self.open.add(p)

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        self.open.discard(p)

    def abort_all(self) -> Deferred[None]:
        """
        Abort every open connection; fire once all are closed.
        """
        closed = self.open.all_closed()
        for wrapper in self.open:
            # Registered once connected, so the TCP transport is set.
            cast(ITCPTransport, wrapper.transport).abortConnection()
        return closed


@attrs.frozen
class MountedProvider:
    """
    One provider the stand-in serves: under C{/<path>}, in C{dialect}, as
    C{behaviour} says.
    """

    provider_id: str
    #: The base URL's path, without slashes at either end ("kimi/v1").
    path: str
    dialect: Dialect
    behaviour: ProviderBehaviour


class _QuietSite(Site):
    """
    A site without an access log (for benchmarks: the line costs more than
    the answer).
    """

    def log(self, request: Any) -> None:
        pass


@attrs.define
class StandInUpstream:
    """
    The providers behind one port: every one of C{providers} from the
    start (each at L{standin_path}, in the dialect of its wire), others
    once L{mount}ed.  Build it, C{listen()}, point the gateway at
    L{base_url} (or give it L{provider_settings}), and C{stop()} when done.
    """

    reactor: IUpstreamReactor = attrs.field(repr=False)
    #: The providers served from the start; by default the built-in ones.
    providers: tuple[type[ProviderAdapter], ...] = attrs.field(factory=builtin_providers, converter=tuple)
    #: Per provider id, how it answers; those not given get
    #: L{default_behaviour}.  Read-only afterwards: see L{behaviour}.
    behaviours: Mapping[str, ProviderBehaviour] = attrs.field(factory=dict)
    open_requests: _OpenRequests = attrs.field(factory=_OpenRequests, init=False, repr=False)
    #: The providers served, by id.
    mounted: dict[str, MountedProvider] = attrs.field(factory=dict, init=False)
    _port: IListeningPort | None = attrs.field(default=None, init=False)
    _root: Resource | None = attrs.field(default=None, init=False, repr=False)
    _connections: _TrackedConnections | None = attrs.field(default=None, init=False, repr=False)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        unknown = set(self.behaviours) - {adapter.id for adapter in self.providers}
        if unknown:
            raise ValueError(f"behaviours given for providers not served: {', '.join(sorted(unknown))}")
        for adapter in self.providers:
            behaviour = self.behaviours.get(adapter.id) or default_behaviour(adapter)
            self.mount(adapter.id, standin_path(adapter), dialect_for(adapter), behaviour)

    @property
    def kimi(self) -> ProviderBehaviour:
        """
        The behaviour of the Kimi served (at C{/kimi/v1}).
        """
        return self.behaviour("kimi")

    @property
    def gemini(self) -> ProviderBehaviour:
        """
        The behaviour of the Gemini served (at C{/gemini/v1beta}).
        """
        return self.behaviour("gemini")

    def mount(self, provider_id: str, path: str, dialect: Dialect, behaviour: ProviderBehaviour) -> ProviderBehaviour:
        """
        Serve one more provider under C{/<path>} (listening or not yet);
        returns its behaviour.

        @raise ValueError: the id or the path is taken.
        """
        path = path.strip("/")
        if provider_id in self.mounted or any(m.path == path for m in self.mounted.values()):
            raise ValueError(f"{provider_id!r} or /{path} is mounted already")
        mounted = self.mounted[provider_id] = MountedProvider(provider_id, path, dialect, behaviour)
        if self._root is not None:
            self._put(self._root, mounted)
        return behaviour

    def behaviour(self, provider_id: str) -> ProviderBehaviour:
        """
        How the provider C{provider_id} answers (mutate it to steer it).

        @raise KeyError: no provider of that id is served.
        """
        mounted = self.mounted.get(provider_id)
        if mounted is None:
            raise KeyError(f"the stand-in serves no provider {provider_id!r}; it serves {', '.join(self.mounted)}")
        return mounted.behaviour

    def resource(self) -> Resource:
        """
        The resource tree: each mounted provider's endpoints under its path
        (C{/kimi/v1/...}, C{/gemini/v1beta/...}, ...).
        """
        root = _Node()
        for mounted in self.mounted.values():
            self._put(root, mounted)
        return root

    def _put(self, root: Resource, mounted: MountedProvider) -> None:
        node = _mount(root, *(segment.encode() for segment in mounted.path.split("/")))
        mounted.dialect.mount(node, self, mounted.provider_id)

    def listen(self, port: int = 0, interface: str = "127.0.0.1", access_log: bool = True) -> IListeningPort:
        """
        Start serving; port 0 picks a free one (see L{port}).

        @param access_log: log a line per request (off for benchmarks: the
            line costs more than the answer).
        """
        self._root = self.resource()
        site = Site(self._root, reactor=self.reactor) if access_log else _QuietSite(self._root, reactor=self.reactor)
        self._connections = _TrackedConnections(site)
        # Twisted annotates the factory as a ServerFactory; any protocol
        # factory is taken (WrappingFactory is a ClientFactory).
        self._port = self.reactor.listenTCP(
            port,
            self._connections,  # type: ignore[arg-type]
            backlog=BACKLOG,
            interface=interface,
        )
        return self._port

    def _address(self) -> IPv4Address | IPv6Address:
        assert self._port is not None, "call listen() first"
        address = self._port.getHost()
        assert isinstance(address, (IPv4Address, IPv6Address))
        return address

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the stand-in upstream is not listening; call listen() first")
        return int(self._address().port)

    def base_url(self, provider_id: str) -> str:
        """
        The base URL an adapter should be configured with.
        """
        assert self._port is not None, "call listen() first"
        host = self._address().host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{host_port(host, self.port)}/{self.mounted[provider_id].path}"

    def provider_settings(
        self, adapters: Iterable[type[ProviderAdapter]] | None = None
    ) -> Mapping[str, ProviderSettings]:
        """
        C{Settings.providers} that point each provider declared (by default
        those served from the start, L{providers}) here, with the key this
        server accepts and the provider's default model.

        @raise KeyError: a provider declared is not mounted.
        """
        return provider_table(
            ProviderSettings(
                adapter=adapter,
                base_url=self.base_url(adapter.id),
                model=adapter.default_model_id,
                api_key=self.behaviour(adapter.id).key,
            )
            for adapter in (self.providers if adapters is None else adapters)
        )

    def environment(self, adapters: Iterable[type[ProviderAdapter]] | None = None) -> dict[str, str]:
        """
        The variables that point each provider declared (by default those
        served from the start) here: its base URL and key variables
        (C{{"KIMI_BASE_URL": ..., "KIMI_API_KEY": ...}}).
        """
        return {
            name: value
            for configured in self.provider_settings(adapters).values()
            for name, value in (
                (configured.adapter.base_url_variable, configured.base_url),
                (configured.adapter.key_variables[0], configured.api_key or ""),
            )
        }

    def stop(self) -> Deferred[None]:
        """
        Stop listening, drop unanswered requests and every open connection;
        fire when all of it is gone.
        """
        self.open_requests.cancel_timers()
        waits: list[Deferred[Any]] = []
        if self._connections is not None:
            waits.append(self._connections.abort_all())
        if self._port is not None:
            stopped = self._port.stopListening()
            waits.append(succeed(None) if stopped is None else stopped)
            self._port = None
        self._root = None
        return gatherResults(waits).addCallback(lambda _: None)


class _Node(Resource):
    """
    A node of the stand-in's tree: a path it does not serve is a plain 404
    page (twisted.web's L{notFound}), as a web server's is where no API
    is: not the provider's error document (a base URL set wrong).
    """

    def getChild(self, path: bytes, request: Request) -> IResource:
        return notFound()


def _mount(root: Resource, *path: bytes) -> Resource:
    """
    The node at C{path} under C{root}, made (or reused) segment by segment.
    """
    node = root
    for segment in path:
        child = node.getStaticEntity(segment)
        if child is None:
            child = _Node()
            node.putChild(segment, child)
        node = child
    return node


def _pair(what: str) -> Callable[[str], tuple[str, str]]:
    """
    An argparse type reading C{ID=VALUE}.
    """

    def parse(text: str) -> tuple[str, str]:
        provider_id, equals, value = text.partition("=")
        if not equals or not provider_id:
            raise argparse.ArgumentTypeError(f"{text!r} is not ID={what}, such as kimi={what.lower()}")
        return provider_id, value

    return parse


def _status(text: str) -> tuple[str, int]:
    """
    An argparse type reading C{ID=STATUS}, an HTTP error status (400-599).
    """
    provider_id, status = _pair("STATUS")(text)
    if not status.isdigit() or not 400 <= int(status) <= 599:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not ID=STATUS with an error status from 400 to 599, such as kimi=503"
        )
    return provider_id, int(status)


def _models(text: str) -> tuple[str, list[str]]:
    """
    An argparse type reading C{ID=MODEL[,MODEL...]}.
    """
    provider_id, equals, value = text.partition("=")
    models = [model.strip() for model in value.split(",")]
    if not equals or not provider_id or not all(models):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not ID=MODEL[,MODEL...], such as kimi=moonshot-v1-8k,kimi-k2.5 (no empty model id)"
        )
    return provider_id, models


def _for(provider_id: str) -> Callable[[str], tuple[str, str]]:
    """
    The argparse type of a provider's own alias (C{--kimi-key KEY}).
    """
    return lambda value: (provider_id, value)


#: What each mode does, for C{--help} (L{Mode} has the details).
MODE_HELP = MappingProxyType(
    {
        Mode.OK: "answer normally (after --delay seconds)",
        Mode.UNAUTHORIZED: "401 in the provider's own error shape, whatever the key",
        Mode.FORBIDDEN: "403 in the provider's own error shape (its models listing too)",
        Mode.ERROR: "a 500 in the provider's own error shape",
        Mode.RATE_LIMITED: "a 429 in the provider's own error shape, asking for a retry after --retry-after seconds",
        Mode.MALFORMED: "200 whose body is not JSON",
        Mode.HANG: "never answer, not even the status line",
        Mode.STALL: "headers and part of the body (a stream: its first two events), then nothing more",
        Mode.CUT: "headers and part of the body (a stream: its first two events), then the connection closed",
        Mode.STREAM_ERROR: "a stream: its first two events, then an error event in the provider's shape, and the end",
        Mode.ERROR_STALL: "an error (500) whose body stops half-way, then nothing more",
        Mode.ERROR_CUT: "an error (500) whose body stops half-way, then the connection closed",
        Mode.TRICKLE: "a stream: its first two events, then only ': keepalive' comments, for ever",
        Mode.EMPTY: "a stream: no event, only its end ([DONE] where the provider sends one)",
        Mode.LINGER: "a stream: every event, then its body kept open, never ended",
    }
)


def _retry_after(text: str) -> float:
    seconds = float(text)
    if not 0 <= seconds <= 86400:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds from 0 to 86400")
    return seconds


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    modes = [m.value for m in Mode]
    ids = [adapter.id for adapter in builtin_providers()]
    parser = argparse.ArgumentParser(
        prog="python -m openclaw.testing.upstream",
        description=f"A stand-in for the built-in providers' APIs ({', '.join(ids)}) for trying the gateway "
        "without real keys.",
        epilog="modes (--mode ID=MODE):\n" + "\n".join(f"  {mode.value:<13} {MODE_HELP[mode]}" for mode in Mode),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--port", type=int, default=8001, help="TCP port (default 8001; 0 = any free)")
    parser.add_argument("--interface", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--key",
        dest="keys",
        action="append",
        default=[],
        type=_pair("KEY"),
        metavar="ID=KEY",
        help="the key provider ID accepts (repeatable; default <id>-test-key)",
    )
    parser.add_argument(
        "--mode",
        dest="modes",
        action="append",
        default=[],
        type=_pair("MODE"),
        metavar="ID=MODE",
        help=f"how provider ID answers (repeatable): {', '.join(modes)}; default ok",
    )
    parser.add_argument(
        "--status",
        dest="statuses",
        action="append",
        default=[],
        type=_status,
        metavar="ID=STATUS",
        help="the status provider ID's errors have in modes error, error_stall, error_cut and stream_error "
        "(repeatable; default 500): 502, 503, or 429 (with --retry-after), say",
    )
    parser.add_argument(
        "--models",
        dest="models",
        action="append",
        default=[],
        type=_models,
        metavar="ID=MODEL,...",
        help="the models provider ID lists and serves, in place of its own (repeatable; "
        "default: its stand-in's stock, then every model it prices)",
    )
    for provider_id in ("kimi", "gemini"):
        if provider_id in ids:
            # The options of the two-provider days, kept as aliases.
            parser.add_argument(
                f"--{provider_id}-key",
                dest="keys",
                action="append",
                type=_for(provider_id),
                help=f"--key {provider_id}=KEY",
            )
            parser.add_argument(
                f"--{provider_id}-mode",
                dest="modes",
                action="append",
                type=_for(provider_id),
                help=f"--mode {provider_id}=MODE",
            )
    parser.add_argument(
        "--rate-limited-model",
        dest="rate_limited_models",
        action="append",
        default=[],
        type=_pair("MODEL"),
        metavar="ID=MODEL",
        help="provider ID answers calls of MODEL (chat or embeddings) with a 429, its other models as its mode "
        "says (repeatable): a rate limit of one model, as Google's are",
    )
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument(
        "--chunk-interval", type=float, default=0.0, help="seconds between the events of a streamed answer"
    )
    parser.add_argument(
        "--retry-after",
        type=_retry_after,
        default=1.0,
        metavar="SECONDS",
        help="the retry delay a 429 asks for (mode rate_limited; default 1)",
    )
    parser.add_argument("--quiet", action="store_true", help="no access log (for benchmarks)")
    parser.add_argument(
        "--log-bodies",
        action="store_true",
        help="log each chat and embeddings request body received, as JSON (what the gateway sent)",
    )
    args = parser.parse_args(argv)
    for provider_id, _ in [*args.keys, *args.modes, *args.models, *args.statuses, *args.rate_limited_models]:
        if provider_id not in ids:
            parser.error(f"unknown provider {provider_id!r}: use one of {', '.join(ids)}")
    for provider_id, value in args.modes:
        if value not in modes:
            parser.error(f"mode {value!r} of {provider_id} is none of {', '.join(modes)}")
    for option, pairs in (("--key", args.keys), ("--mode", args.modes)):
        named = [provider_id for provider_id, _ in pairs]
        twice = sorted({provider_id for provider_id in named if named.count(provider_id) > 1})
        if twice:
            # Each provider accepts one key, has one mode: a second is no pool.
            parser.error(f"{option} given twice for {', '.join(twice)}: each provider takes one")
    return args


def upstream_from_args(reactor: IUpstreamReactor, args: argparse.Namespace) -> StandInUpstream:
    """
    The stand-in the command line (read by L{_parse_args}) asks for, every
    built-in provider served, not yet listening: each with its C{--key},
    C{--mode}, C{--models} (by default L{command_line_models}) and
    C{--rate-limited-model}s, and the timings given for all.
    """
    keys, modes, models, statuses = dict(args.keys), dict(args.modes), dict(args.models), dict(args.statuses)
    return StandInUpstream(
        reactor,
        behaviours={
            adapter.id: attrs.evolve(
                default_behaviour(
                    adapter, keys.get(adapter.id), models.get(adapter.id) or command_line_models(adapter)
                ),
                mode=modes.get(adapter.id, Mode.OK),
                error_status=statuses.get(adapter.id, 500),
                delay=args.delay,
                chunk_interval=args.chunk_interval,
                retry_after=args.retry_after,
                log_bodies=args.log_bodies,
                rate_limited_models={model for named, model in args.rate_limited_models if named == adapter.id},
            )
            for adapter in builtin_providers()
        },
    )


def main(reactor: IStandInReactor, *argv: str) -> Deferred[None]:
    """
    Serve until interrupted; print the settings that point a gateway here.
    """
    args = _parse_args(argv)
    upstream = upstream_from_args(reactor, args)
    try:
        upstream.listen(args.port, args.interface, access_log=not args.quiet)
    except CannotListenError as e:
        # One line, as the gateway says it, not a traceback.
        reason = e.socketError.strerror if isinstance(e.socketError, OSError) else e.socketError
        print(
            f"python -m openclaw.testing.upstream: cannot listen on {args.interface}:{args.port}: {reason}; "
            "choose another --port (0: any free one)",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    print("Stand-in upstream listening. Point the gateway at it with:")
    for name, value in upstream.environment().items():
        print(f"  {name}={value}")
    sys.stdout.flush()
    reactor.addSystemEventTrigger("before", "shutdown", upstream.stop)
    return Deferred()


if __name__ == "__main__":
    from twisted.internet.task import react

    react(main, sys.argv[1:])
