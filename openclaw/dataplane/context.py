"""
What every API resource needs: the route in force, the providers, the
keys, the time limit, and the accounting of each finished request.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol
from urllib.parse import quote, unquote

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.web.server import Request

from openclaw.addresses import host_of
from openclaw.connections import Outstanding
from openclaw.consumers.audit import without_keys
from openclaw.dataplane.auth import UNCHECKED_KEY_CODES, GatewayKeys
from openclaw.dataplane.errors import APIError, for_operator
from openclaw.dataplane.offload import BodyWorkers
from openclaw.logs import DATAPLANE_NAMESPACE, KEYLESS_FIELD
from openclaw.metrics import APIRefusal, CallCosts, RequestTally
from openclaw.providers import ProviderRegistry
from openclaw.routing import KEY_PREFIX, ActiveRoute, Route
from openclaw.settings import Settings

if TYPE_CHECKING:
    from openclaw.consumers.table import ConsumerTable

_QUIET_LEVELS = frozenset({"warn", "error", "critical"})
#: The limit each API connection refusal hit, as the log line names it.
_REFUSAL_LIMITS: Mapping[APIRefusal, str] = MappingProxyType(
    {
        "api_max_connections": "API_MAX_CONNECTIONS",
        "api_max_connections_per_address": "API_MAX_CONNECTIONS_PER_ADDRESS",
        "api_keyless_connections_per_address": "API_KEYLESS_CONNECTIONS_PER_ADDRESS",
        "api_keyless_share": "the keyless connections' share (half of API_MAX_CONNECTIONS)",
    }
)
#: The most of a request's method or path a log line holds (a client may
#: send up to twisted.web's 16 KB line: one such line per request would
#: fill the log).
LOGGED_CHARS = 256
#: The most of a provider's failure's message a request's log line holds
#: (L{APIContext.completed}): the gateway's words with what to do, and
#: after a failover the second provider's failure too.
LOGGED_MESSAGE_CHARS = 1024


#: How many times a path is unescaped to find a key hidden in it (a key
#: escaped three times over, %25252D, is found).
_UNESCAPES = 4

#: The characters of a path logged as they are once a key was cut from it
#: decoded (RFC 3986's unreserved and reserved ASCII characters); any other
#: is escaped again.
_SHOWN_AS_IS = "/:@!$&'()*+,;=-._~?#[]"


def clipped(text: str, limit: int = LOGGED_CHARS) -> str:
    """
    C{text} as a log line holds it: any consumer key in it cut to what
    lists show of one (L{without_keys}), then at most C{limit}
    (L{LOGGED_CHARS}) characters, then how many there were.
    """
    if KEY_PREFIX in text:
        # A consumer key sent as the path: logged as lists show keys.
        text = without_keys(text)
    if "%" in text:
        # One hidden by percent-escapes (ock%2D..., kimi%252Fock-...):
        # the path is logged decoded then, with the key cut, and escaped
        # again but for the characters a path shows as they are (a decoded
        # line break or right-to-left override must not reach the log).
        decoded = text
        for _ in range(_UNESCAPES):
            decoded = unquote(decoded)
        masked = without_keys(decoded)
        if masked != decoded:
            text = quote(masked, safe=_SHOWN_AS_IS)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text)} characters)"


#: The log line of a refused or failed API request: a success's, with the
#: error code (C{outcome}) after the status.
_FAILED = (
    "{method} {path} {status} {outcome} via {route} for {consumer} from {peer} in {duration_ms} ms, "
    "request {request_id}"
)
#: The log line of a successful API request.
_SUCCEEDED = "{method} {path} {status} via {route} for {consumer} from {peer} in {duration_ms} ms, request {request_id}"
#: Added to the line of a request answered 5xx for a provider's failure
#: (its code one of L{_PROVIDERS_FAILURES}'s): the error's message.
_ERROR_MESSAGE = ": {error_message}"
#: The codes of a provider's failures (C{upstream_*}) and of a provider
#: that cannot be called (C{provider_*}).
_PROVIDERS_FAILURES = ("upstream_", "provider_")
#: Added to either line when the client gave an id of its own
#: (L{client_request_id_of}).
_CLIENT_REQUEST_ID = " (client's id {client_request_id})"
#: The response header that carries a request's id (L{new_request_id}),
#: as OpenAI's API does (API reference, "Debugging requests").
REQUEST_ID_HEADER = b"x-request-id"


def new_request_id() -> str:
    """
    A fresh request id: C{req_} and 32 lowercase hex digits (128 random
    bits, from C{os.urandom}), the shape of OpenAI's C{x-request-id}.
    Sent with the request's answer (L{REQUEST_ID_HEADER}) and logged with
    it, so that the id a client reports (the openai SDKs expose it:
    Python's C{response._request_id}, Node's C{err.requestID}) finds its
    log line.
    """
    return "req_" + os.urandom(16).hex()


#: The request header in which a client gives an id of its own to the
#: request (OpenAI's API reference, "Debugging requests": ASCII, at most
#: L{MAX_CLIENT_REQUEST_ID} characters), logged with the request's line:
#: the one id a client has of a call it gave up on before any answer (a
#: timeout) to find that call's line.
CLIENT_REQUEST_ID_HEADER = b"x-client-request-id"
#: The most characters of a client's own request id (OpenAI's bound).
MAX_CLIENT_REQUEST_ID = 512


def client_request_id_of(request: Request) -> str | None:
    """
    The id the client gave the request (L{CLIENT_REQUEST_ID_HEADER}), or
    None: none given, or not one OpenAI takes (printable ASCII, at most
    L{MAX_CLIENT_REQUEST_ID} characters), which is not logged (it could
    hold a terminal's escape codes) and does not fail the call.
    """
    given = request.getHeader(CLIENT_REQUEST_ID_HEADER)
    if given is None or len(given) > MAX_CLIENT_REQUEST_ID:
        return None
    text = given.decode("latin-1")
    return text if text.isascii() and text.isprintable() and text else None


def request_id_of(request: Request) -> str:
    """
    The id of an API request (L{openclaw.dataplane.site.APIRequest}), or
    C{-} for another kind of request (one a test makes).
    """
    found = getattr(request, "request_id", None)
    return found if isinstance(found, str) else "-"


def _uncounted_fallback(origin: str, target: str, reason: str) -> None:
    """
    L{APIContext.count_fallback} by default: counts nowhere.
    """


def _uncounted_refusal(reason: APIRefusal) -> None:
    """
    L{APIContext.count_refused_connection} by default: counts nowhere.
    """


class ShutDown(Protocol):
    def shut_down(self) -> None:
        """
        End now, telling the client the gateway is shutting down.
        """


@attrs.define(eq=False)
class APIContext:
    """
    Shared, read-mostly state of the API: built once by
    L{openclaw.dataplane.site.build_site}.
    """

    route: ActiveRoute
    providers: ProviderRegistry
    keys: GatewayKeys
    #: UPSTREAM_TIMEOUT, seconds.
    timeout: float
    reactor: IReactorTime
    #: Every finished request is counted here (C{openclaw_api_requests}).
    tally: RequestTally
    #: Its lines of requests refused without an accepted key are limited
    #: by the log observer (L{openclaw.logs.PEER_CAUSED_LINES}).
    log: Logger = attrs.field(factory=lambda: Logger(namespace=DATAPLANE_NAMESPACE))
    #: Tokens, time to first token and overhead of chat calls
    #: (C{openclaw_api_tokens}, ...); unregistered unless given.
    costs: CallCosts = attrs.field(factory=CallCosts)
    #: Log each successful request, at debug level: model calls come
    #: thousands a second, as C{ping} does on the control plane, and are
    #: counted in L{tally} instead.  Only when LOG_LEVEL is debug: else
    #: not even the event is built.
    log_successes: bool = False
    #: Log each refused or failed request, at info level (off when
    #: LOG_LEVEL is warn or above).
    log_failures: bool = True
    #: Calls waiting on a provider right now (L{in_flight} counts them).
    calls: Outstanding = attrs.field(factory=Outstanding, repr=False)
    #: Set when the gateway stops: new calls are refused with 503.
    draining: bool = False
    #: FALLBACK: C{"off"} never fails calls over; C{"auto"} or a tuple of
    #: provider ids does, to the provider the registry's
    #: L{fallback_for <openclaw.providers.registry.ProviderRegistry.fallback_for>} names.
    fallback: str | tuple[str, ...] = "auto"
    #: UPSTREAM_STREAM_MAX_SECONDS: how long a streamed answer may last,
    #: from the request's arrival, in seconds.
    stream_max_seconds: float = 3600.0
    #: Counts a failover: C{(from, to, reason)} (C{openclaw_api_fallbacks_total}).
    count_fallback: Callable[[str, str, str], None] = _uncounted_fallback
    #: EMBEDDING_MODEL: the provider (None: none has embeddings) and the
    #: model C{/v1/embeddings} uses when a request names none of its own.
    embedding_provider: str | None = None
    embedding_model: str = ""
    #: Chat calls under way, and requests waiting before theirs (a large
    #: body worked on, a consumer's admission asked of the cluster:
    #: L{openclaw.dataplane.resource.PendingRequest}), told when the grace
    #: period of a stop is over.
    chat_calls: set[ShutDown] = attrs.field(factory=set, repr=False)
    #: API connections refused at once, by reason (the cap they hit).
    refused_connections: dict[str, int] = attrs.field(factory=dict)
    #: Counts one of them (C{openclaw_api_refused_connections_total}).
    count_refused_connection: Callable[[APIRefusal], None] = _uncounted_refusal
    _refusal_warned_at: float | None = attrs.field(default=None, repr=False)
    #: The consumers (issue #19): their keys, limits and accounting.
    consumers: ConsumerTable | None = None
    #: C{/metrics} is served on a listener of its own (C{--metrics-listen}),
    #: not on the API's: the API's 404s say so.
    metrics_apart: bool = False
    #: The threads that parse, check and encode large chat bodies
    #: (L{BodyWorkers}): the reactor's, when it has threads (a test's
    #: C{Clock} has none: every body is worked on in its thread).
    bodies: BodyWorkers = attrs.field(
        default=attrs.Factory(lambda self: BodyWorkers.of(self.reactor), takes_self=True), repr=False
    )

    @property
    def in_flight(self) -> int:
        """
        How many calls are waiting on a provider right now.
        """
        return len(self.calls)

    def call_started(self) -> None:
        """
        A model call began: a stop waits for it (L{calls}).
        """
        self.calls.add()

    def call_ended(self) -> None:
        """
        A model call is over: its client has all it will get.
        """
        self.calls.done()

    def shut_down_calls(self) -> None:
        """
        The stop's grace period is over: every chat call still under way
        answers 503 C{shutting_down} (a stream: as its last event), and so
        does every request still waiting before its call (L{chat_calls}),
        rather than being cut with nothing said.
        """
        for call in list(self.chat_calls):
            call.shut_down()

    def idle(self) -> Deferred[None]:
        """
        Fires once no call is waiting on a provider: at once if none is.
        Cancellable (a stop bounds the wait with C{addTimeout}).
        """
        return self.calls.none_left()

    @classmethod
    def from_settings(
        cls,
        route: ActiveRoute,
        providers: ProviderRegistry,
        settings: Settings,
        reactor: IReactorTime,
        tally: RequestTally,
        costs: CallCosts | None = None,
        count_fallback: Callable[[str, str, str], None] | None = None,
        consumers: ConsumerTable | None = None,
        count_refused_connection: Callable[[APIRefusal], None] | None = None,
        metrics_apart: bool = False,
    ) -> APIContext:
        """
        The context C{settings} describe, with the gateway's collaborators:
        L{count_fallback}, L{count_refused_connection} and L{metrics_apart}
        as the fields of those names (L{None}: count nowhere).
        """
        return cls(
            route=route,
            providers=providers,
            keys=GatewayKeys.of(settings.gateway_api_keys, consumers),
            consumers=consumers,
            timeout=settings.upstream_timeout,
            stream_max_seconds=settings.upstream_stream_max_seconds,
            reactor=reactor,
            tally=tally,
            log_successes=settings.log_level == "debug",
            log_failures=settings.log_level not in _QUIET_LEVELS,
            costs=CallCosts() if costs is None else costs,
            fallback=settings.fallback,
            embedding_provider=settings.embedding_provider,
            embedding_model=settings.embedding_model,
            count_fallback=_uncounted_fallback if count_fallback is None else count_fallback,
            count_refused_connection=(
                _uncounted_refusal if count_refused_connection is None else count_refused_connection
            ),
            metrics_apart=metrics_apart,
        )

    def connection_refused(
        self, reason: APIRefusal, value: int | None = None, address: str | None = None, lowered: bool = False
    ) -> None:
        """
        A connection (from C{address}, an IP address; None: unknown) was
        closed at once, or to make room, for C{reason} (the limit it hit,
        of C{value}; C{lowered}: the descriptor cap lowered it below the
        setting): counted, and logged at warn at most once a minute (a
        flood would otherwise flood the log), with what to do.
        """
        self.refused_connections[reason] = self.refused_connections.get(reason, 0) + 1
        self.count_refused_connection(reason)
        now = self.reactor.seconds()
        if self._refusal_warned_at is None or now - self._refusal_warned_at >= 60:
            self._refusal_warned_at = now
            if lowered:
                fix = (
                    "; the open-file limit (RLIMIT_NOFILE) lowered it to that: raise LimitNOFILE (systemd) or "
                    "ulimit -n, not the setting"
                )
            elif reason == "api_keyless_share":
                fix = "; clients must send their key in their first request"
            else:
                fix = f"; raise {_REFUSAL_LIMITS[reason]} if these clients are expected"
            self.log.warn(
                "API connection from {address} refused: {limit}{value} reached ({refused} refused so far){fix}",
                limit=_REFUSAL_LIMITS[reason],
                value="" if value is None else f" ({value})",
                address=address or "an unknown address",
                reason=reason,
                refused=sum(self.refused_connections.values()),
                fix=fix,
            )

    def refused_early(
        self,
        error: APIError,
        outcome: str | None = None,
        peer: str = "-",
        method: str = "-",
        path: str = "-",
        consumer: str | None = None,
        request_id: str = "-",
        keyless: bool = True,
    ) -> None:
        """
        Count (and log at info, as L{completed} would, marked
        L{KEYLESS_FIELD} as it does) a request answered
        with C{error} by the site (L{openclaw.dataplane.site.APIRequest})
        before any resource saw it: a body without a key (401), a repeated
        C{Host} or C{Authorization} field or no C{Host} (400), a body over
        C{MAX_REQUEST_BYTES} (413), a request past its deadline (408).  No
        provider was called: counted under provider C{-}.

        @param outcome: the log's C{outcome}, when not C{error}'s code (a
            head still arriving at the keyless deadline: C{keyless_timeout}
            with status 408).
        @param peer: the client's address (host), for the audit trail of
            refused keys.
        @param method: the request's method, C{-} when not known (its head
            had not come whole).
        @param path: the request's path (without its query), likewise.
        @param consumer: the name of the key's consumer (C{-} for
            GATEWAY_API_KEYS), when the key was checked.
        @param request_id: the id the answer carries (L{new_request_id}).
        @param keyless: whether no key was accepted on the request's
            connection either (a deadline's 408 on a connection whose key
            was accepted is not among the keyless refusals).
        """
        self.tally.record("-", error.status, 0.0)
        if self.log_failures:
            self.log.info(
                _FAILED,
                method=clipped(method),
                path=clipped(path),
                status=error.status,
                route="-",
                consumer=consumer or "-",
                outcome=outcome or error.code or error.type,
                param=error.param,
                duration_ms=0.0,
                peer=peer,
                request_id=request_id,
                **(
                    {KEYLESS_FIELD: True}
                    if keyless and consumer is None and (error.status < 500 or error.code in UNCHECKED_KEY_CODES)
                    else {}
                ),
            )

    def failed_over(
        self,
        origin: str,
        target: str,
        reason: str,
        error: str | None,
        consumer: str | None = None,
        request_id: str = "-",
    ) -> None:
        """
        A call to C{origin} went to C{target} instead: count it, log it at
        info (with the key's consumer, C{-} for GATEWAY_API_KEYS, and the
        call's request id, L{new_request_id}).
        """
        self.count_fallback(origin, target, reason)
        self.log.info(
            "call failed over {origin} -> {target} ({reason}) for {consumer}, request {request_id}",
            origin=origin,
            target=target,
            reason=reason,
            error=error,
            consumer=consumer or "-",
            request_id=request_id,
        )

    def completed(
        self,
        request: Request,
        started: float,
        status: int,
        route: Route | None = None,
        stream: bool = False,
        outcome: str | None = None,
        consumer: str | None = None,
        seconds: float | None = None,
        provider: str | None = None,
        error: APIError | None = None,
    ) -> None:
        """
        Count one finished API request, and log it (structured fields, no
        body, no key) when its level is on.  The line of a refusal (4xx)
        of a request that presented no accepted key (a 401; a 404 or 405,
        answered before any key is looked at, without one) is marked
        C{keyless} (L{KEYLESS_FIELD}), as is a consumer key's 503 while the
        consumers cannot be read (L{UNCHECKED_KEY_CODES}: the key was not
        checked): the log observer lets only so many
        of those through a second (L{openclaw.logs.PEER_CAUSED_LINES}),
        as any client can send thousands; the count is kept for every one.

        @param route: the provider and model the request was routed to
            (the log's C{route}, C{provider} and C{model}), if it got so far.
        @param outcome: the error code when there was one (else C{error}'s).
        @param consumer: the name of the key's consumer (C{-} for
            GATEWAY_API_KEYS; None before a key was checked).
        @param seconds: the request's whole time, when the caller has read
            the clock already (else from C{started} to now).
        @param provider: the provider called for the request (the last one
            tried, after a failover), the C{provider} label of
            C{openclaw_api_requests} and C{openclaw_api_request_seconds}:
            C{-} when the gateway answered without calling one (a
            consumer's limits, a validation error, the breaker open with
            nothing tried).  By default C{route}'s provider, C{-} without a
            route.
        @param error: the error answered, if any: the log's C{outcome} is
            its C{code} (its C{type} when it has no code, as OpenAI's shape
            allows) and its C{param} is logged too; for a provider's 5xx
            its message too, clipped (C{error_message}, after the line's
            text).
        """
        if seconds is None:
            seconds = self.reactor.seconds() - started
        if provider is None:
            provider = route.provider_id if route else "-"
        self.tally.record(provider, status, seconds)
        if consumer is None:
            # A key checked with the request's head (APIRequest.holder).
            holder = getattr(request, "holder", None)
            consumer = getattr(holder, "consumer", None)
        param = error_message = None
        if status < 400:
            if not self.log_successes:
                return
            level, text = LogLevel.debug, _SUCCEEDED
            keyless = False
        elif self.log_failures:
            level, text = LogLevel.info, _FAILED
            if error is not None:
                outcome = outcome or error.code or error.type
                param = error.param
                if status >= 500 and (error.code or "").startswith(_PROVIDERS_FAILURES):
                    # A provider's failure for the operator to look into,
                    # the provider's own words in it (scrubbed of keys):
                    # its code alone said not what.  Not a
                    # model's failure, whose message may quote the model's
                    # output (Gemini's finishMessage); clipped.
                    # The operator's words (L{APIError.detail}): where and
                    # what to check.
                    error_message = clipped(for_operator(error), LOGGED_MESSAGE_CHARS)
            outcome = outcome or "-"
            keyless = consumer is None and (
                (status < 500 and (status == 401 or not self._presents_key(request))) or outcome in UNCHECKED_KEY_CODES
            )
        else:
            return
        client_request_id = client_request_id_of(request)
        if client_request_id is not None:
            text += _CLIENT_REQUEST_ID
        if error_message is not None:
            text += _ERROR_MESSAGE
        self.log.emit(
            level,
            text,
            client_request_id=client_request_id,
            error_message=error_message,
            method=clipped(request.method.decode("ascii", "replace")),
            consumer=consumer or "-",
            path=clipped(request.path.decode("ascii", "replace")),
            status=status,
            route=f"{route.provider_id}/{route.model}" if route else "-",
            provider=provider,
            model=route.model if route else None,
            stream=stream,
            outcome=outcome,
            param=param,
            duration_ms=round(seconds * 1000, 2),
            peer=host_of(request.getClientAddress()),
            request_id=request_id_of(request),
            **({KEYLESS_FIELD: True} if keyless else {}),
        )

    def _presents_key(self, request: Request) -> bool:
        """
        Whether C{request} carries a key that L{keys} accept (a consumer's
        expired key among them: its holder is known).
        """
        authorization = request.getHeader(b"authorization")
        return authorization is not None and not isinstance(self.keys.identify(authorization), APIError)
