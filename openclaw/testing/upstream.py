"""
A stand-in for the Kimi (Moonshot AI) and Google Gemini HTTP APIs.

One small C{twisted.web} server speaks both providers' shapes, each under its
own path prefix, so one listening port serves both adapters::

    Kimi:   http://127.0.0.1:PORT/kimi/v1       (GET /models, Bearer auth)
    Gemini: http://127.0.0.1:PORT/gemini/v1beta (GET /models, x-goog-api-key)

Each provider's answers are steered by a plain L{ProviderBehaviour} object
that a test mutates between requests (C{upstream.kimi.mode = "hang"}); the
same object counts the requests it saw, so a test can assert that none (or
exactly one) was made.

Requests that are left hanging or stalled are tracked, and L{StandInUpstream.stop}
aborts every connection still open, so trial finds a clean reactor.

Adding an endpoint later (chat completions) means writing one handler that
turns a request into C{(status, document)} and mounting it with
L{_Endpoint}; the modes (delay, errors, hang, stall) then apply to it too.

Run it by hand::

    python -m openclaw.testing.upstream --port 8001 --kimi-key k --gemini-key g
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from types import MappingProxyType
from typing import Any, ClassVar, Protocol

import attrs
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

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
    #: 200 with a body that is not JSON.
    MALFORMED = "malformed"
    #: Never answer, not even the status line.
    HANG = "hang"
    #: Send the headers and part of the body, then nothing more.
    STALL = "stall"


@attrs.define
class ProviderBehaviour:
    """
    What one stand-in provider accepts and how it answers; tests mutate it.
    """

    #: The only API key the provider accepts.
    key: str
    #: Model ids it lists (Gemini ones without the C{models/} prefix).
    models: list[str]
    #: A L{Mode} or its string value.
    mode: str = Mode.OK
    #: Seconds to wait before answering (never blocks: C{callLater}).
    delay: float = 0.0
    #: Status for L{Mode.ERROR}.
    error_status: int = 500
    #: Replaces the provider's stock message in error answers.
    error_message: str | None = None
    #: The most models one Gemini page holds; lower it to force pagination.
    page_size_limit: int = GEMINI_MAX_PAGE_SIZE
    #: Requests received (whatever their outcome).
    requests: int = 0
    #: The request target (path and query) of each request, in order, so a
    #: test can check that no key ever travels in a URL.
    uris: list[str] = attrs.field(factory=list)

    def reset(self) -> None:
        """
        Forget the requests seen so far.
        """
        self.requests = 0
        self.uris.clear()


def default_kimi(key: str = "kimi-test-key") -> ProviderBehaviour:
    """
    A Kimi that lists a few real Moonshot model ids.
    """
    return ProviderBehaviour(
        key=key,
        models=["moonshot-v1-8k", "moonshot-v1-32k", "moonshot-v1-128k", "kimi-k2-0905-preview"],
    )


def default_gemini(key: str = "gemini-test-key") -> ProviderBehaviour:
    """
    A Gemini that lists a few real model ids.
    """
    return ProviderBehaviour(
        key=key,
        models=["gemini-2.5-flash", "gemini-2.5-pro", "gemini-flash-latest", "gemini-2.0-flash"],
    )


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
    What differs between the providers' APIs apart from their endpoints:
    how a caller proves who it is and how an error looks.
    """

    def authorized(self, request: Request, key: str) -> bool: ...

    def error_document(self, status: int, message: str | None, key: str) -> dict[str, Any]: ...


@attrs.frozen
class KimiDialect:
    """
    Moonshot's OpenAI-compatible API: C{Authorization: Bearer <key>} and
    C{{"error": {"message": ..., "type": ...}}}.
    """

    _stock: ClassVar[Mapping[int, tuple[str, str]]] = MappingProxyType({
        401: ("Invalid Authentication", "invalid_authentication_error"),
        403: (
            "Your account is suspended, please check your plan and billing details",
            "permission_denied_error",
        ),
        429: ("Your account reached max request rate, please try again later", "rate_limit_reached_error"),
        500: ("Internal server error", "server_error"),
        503: ("The engine is currently overloaded, please try again later", "engine_overloaded_error"),
    })

    def authorized(self, request: Request, key: str) -> bool:
        return request.getHeader("authorization") == f"Bearer {key}"

    def error_document(self, status: int, message: str | None, key: str) -> dict[str, Any]:
        stock_message, kind = self._stock.get(status, ("Request failed", "invalid_request_error"))
        return {"error": {"message": message or stock_message, "type": kind}}


@attrs.frozen
class GeminiDialect:
    """
    Google's Generative Language API: C{x-goog-api-key: <key>} and
    C{{"error": {"code": ..., "message": ..., "status": ...}}}.
    """

    _stock: ClassVar[Mapping[int, tuple[str, str]]] = MappingProxyType({
        400: ("Request contains an invalid argument.", "INVALID_ARGUMENT"),
        401: ("API key not valid. Please pass a valid API key.", "UNAUTHENTICATED"),
        # The real message quotes the key; the gateway must scrub it.
        403: ("Permission denied: Consumer 'api_key:{key}' has been suspended.", "PERMISSION_DENIED"),
        429: ("Resource has been exhausted (e.g. check quota).", "RESOURCE_EXHAUSTED"),
        500: (
            "An internal error has occurred. Please retry or report in "
            "https://developers.generativeai.google/guide/troubleshooting",
            "INTERNAL",
        ),
        503: ("The model is overloaded. Please try again later.", "UNAVAILABLE"),
    })

    def authorized(self, request: Request, key: str) -> bool:
        return request.getHeader("x-goog-api-key") == key

    def error_document(self, status: int, message: str | None, key: str) -> dict[str, Any]:
        stock_message, code = self._stock.get(status, ("Unknown error.", "UNKNOWN"))
        return {
            "error": {
                "code": status,
                "message": message or stock_message.format(key=key),
                "status": code,
            }
        }


#: Turns a request into C{(status, JSON document)}; may raise L{Reject}.
Handler = Callable[[Request, ProviderBehaviour], tuple[int, Any]]


def kimi_models(request: Request, behaviour: ProviderBehaviour) -> tuple[int, Any]:
    """
    C{GET /v1/models}, OpenAI's list shape.
    """
    return 200, {
        "object": "list",
        "data": [
            {"id": model, "object": "model", "created": 1700000000, "owned_by": "moonshot"}
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
        self, upstream: StandInUpstream, provider_id: str, dialect: Dialect, handler: Handler
    ) -> None:
        super().__init__()
        self._upstream = upstream
        self._provider_id = provider_id
        self._dialect = dialect
        self._handler = handler

    def render_GET(self, request: Request) -> int:
        return self._accept(request)

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
        if not self._dialect.authorized(request, behaviour.key):
            return self._error(request, behaviour, 401, None)
        if mode is Mode.UNAUTHORIZED:
            return self._error(request, behaviour, 401, behaviour.error_message)
        if mode is Mode.FORBIDDEN:
            return self._error(request, behaviour, 403, behaviour.error_message)
        if mode is Mode.ERROR:
            return self._error(request, behaviour, behaviour.error_status, behaviour.error_message)
        if mode is Mode.MALFORMED:
            return _send(request, 200, b'{"object": "list", "data": [{"id": "moonsh')
        try:
            status, document = self._handler(request, behaviour)
        except Reject as e:
            return self._error(request, behaviour, e.status, e.message)
        body = json.dumps(document).encode()
        if mode is Mode.STALL:
            return _send(request, status, body, stall=True)
        return _send(request, status, body)

    def _error(
        self, request: Request, behaviour: ProviderBehaviour, status: int, message: str | None
    ) -> None:
        document = self._dialect.error_document(status, message, behaviour.key)
        _send(request, status, json.dumps(document).encode())


def _send(request: Request, status: int, body: bytes, stall: bool = False) -> None:
    """
    Answer with a JSON body; when stalling, announce the whole length but
    write only half of it and never finish.
    """
    request.setResponseCode(status)
    request.setHeader("content-type", "application/json; charset=UTF-8")
    request.setHeader("content-length", str(len(body)))
    if stall:
        request.write(body[: len(body) // 2])
        return
    request.write(body)
    request.finish()


class _TrackedConnections(WrappingFactory):
    """
    Wraps the L{Site} to know every open connection, so that stopping can
    abort them and wait until they are gone.
    """

    def __init__(self, wrapped: Site) -> None:
        super().__init__(wrapped)
        self._waiting: list[Deferred[None]] = []

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def abort_all(self) -> Deferred[None]:
        """
        Abort every open connection; fire once all are closed.
        """
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        for wrapper in list(self.protocols):
            wrapper.transport.abortConnection()
        return d


@attrs.define
class StandInUpstream:
    """
    Both providers behind one port.  Build it, C{listen()}, point the
    gateway at L{base_url}, and C{stop()} when done.
    """

    reactor: Any = attrs.field(repr=False)
    kimi: ProviderBehaviour = attrs.field(factory=default_kimi)
    gemini: ProviderBehaviour = attrs.field(factory=default_gemini)
    open_requests: _OpenRequests = attrs.field(factory=_OpenRequests, init=False, repr=False)
    _port: IListeningPort | None = attrs.field(default=None, init=False)
    _connections: _TrackedConnections | None = attrs.field(default=None, init=False, repr=False)
    _log = Logger()

    def behaviour(self, provider_id: str) -> ProviderBehaviour:
        return {"kimi": self.kimi, "gemini": self.gemini}[provider_id]

    def resource(self) -> Resource:
        """
        The resource tree: C{/kimi/v1/...} and C{/gemini/v1beta/...}.
        """
        root = Resource()
        kimi_v1 = _mount(root, b"kimi", b"v1")
        kimi_v1.putChild(b"models", _Endpoint(self, "kimi", KimiDialect(), kimi_models))
        gemini_v1beta = _mount(root, b"gemini", b"v1beta")
        gemini_v1beta.putChild(b"models", _Endpoint(self, "gemini", GeminiDialect(), gemini_models))
        return root

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> IListeningPort:
        """
        Start serving; port 0 picks a free one (see L{port}).
        """
        self._connections = _TrackedConnections(Site(self.resource(), reactor=self.reactor))
        self._port = self.reactor.listenTCP(
            port, self._connections, backlog=BACKLOG, interface=interface
        )
        return self._port

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the stand-in upstream is not listening; call listen() first")
        return int(self._port.getHost().port)

    def base_url(self, provider_id: str) -> str:
        """
        The base URL an adapter should be configured with.
        """
        assert self._port is not None, "call listen() first"
        host = self._port.getHost().host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        prefix = {"kimi": "kimi/v1", "gemini": "gemini/v1beta"}[provider_id]
        return f"http://{host}:{self.port}/{prefix}"

    def settings_fields(self) -> dict[str, str]:
        """
        C{Settings} keyword arguments that point both providers here, with
        the keys this server accepts.
        """
        return {
            "kimi_base_url": self.base_url("kimi"),
            "kimi_api_key": self.kimi.key,
            "gemini_base_url": self.base_url("gemini"),
            "gemini_api_key": self.gemini.key,
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
        return gatherResults(waits).addCallback(lambda _: None)


def _mount(root: Resource, *path: bytes) -> Resource:
    node = root
    for segment in path:
        child = Resource()
        node.putChild(segment, child)
        node = child
    return node


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    modes = [m.value for m in Mode]
    parser = argparse.ArgumentParser(
        prog="python -m openclaw.testing.upstream",
        description="A stand-in Kimi and Gemini API for trying the gateway without real keys.",
    )
    parser.add_argument("--port", type=int, default=8001, help="TCP port (default 8001; 0 = any free)")
    parser.add_argument("--interface", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--kimi-key", default="kimi-test-key", help="the Kimi key to accept")
    parser.add_argument("--gemini-key", default="gemini-test-key", help="the Gemini key to accept")
    parser.add_argument("--kimi-mode", choices=modes, default="ok")
    parser.add_argument("--gemini-mode", choices=modes, default="ok")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    return parser.parse_args(argv)


def main(reactor: Any, *argv: str) -> Deferred[None]:
    """
    Serve until interrupted; print the settings that point a gateway here.
    """
    args = _parse_args(argv)
    upstream = StandInUpstream(
        reactor,
        kimi=attrs.evolve(default_kimi(args.kimi_key), mode=args.kimi_mode, delay=args.delay),
        gemini=attrs.evolve(default_gemini(args.gemini_key), mode=args.gemini_mode, delay=args.delay),
    )
    upstream.listen(args.port, args.interface)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    print("Stand-in upstream listening. Point the gateway at it with:")
    for name, value in upstream.settings_fields().items():
        print(f"  {name.upper()}={value}")
    sys.stdout.flush()
    reactor.addSystemEventTrigger("before", "shutdown", upstream.stop)
    return Deferred()


if __name__ == "__main__":
    from twisted.internet.task import react

    react(main, sys.argv[1:])
