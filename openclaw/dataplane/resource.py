"""
The API's C{twisted.web} resources: C{GET /healthz}, C{GET /v1/models},
C{GET /v1/models/{model}},
C{POST /v1/chat/completions}, C{GET /readyz}; anything else is a 404, a known path with
the wrong method a 405 with C{Allow}, both in OpenAI's error shape.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Hashable, Sequence
from fnmatch import fnmatchcase
from typing import Any, Literal, NamedTuple, cast

import attrs
import orjson
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.server import NOT_DONE_YET, Request

from openclaw.consumers.estimate import prompt_tokens
from openclaw.consumers.table import GATEWAY, Holder, completion_limit
from openclaw.dataplane.answer import CLIENT_GONE, CLIENT_GONE_STATUS
from openclaw.dataplane.call import ChatCall, encode_request
from openclaw.dataplane.context import APIContext
from openclaw.dataplane.errors import (
    PROVIDER_HEADER,
    APIError,
    bad_request,
    breaker_open,
    internal_error,
    method_not_allowed,
    model_not_found,
    no_usable_key,
    not_found,
    provider_not_configured,
    shutting_down,
    upstream_failed,
    upstream_http_error,
    upstream_refused,
    upstream_timeout,
)
from openclaw.dataplane.offload import BodyWorkers, Full
from openclaw.dataplane.request import (
    ChatRequest,
    choice_count,
    choose_route,
    content_encoding,
    parse_chat_request,
)
from openclaw.providers import (
    MissingKey,
    ProbeTimedOut,
    ProviderAdapter,
    ProviderError,
    ProviderRegistry,
    UpstreamHTTPError,
)
from openclaw.providers.errors import BreakerOpen, MalformedResponse, NoUsableKey, Unreachable
from openclaw.providers.wire import Wire
from openclaw.routing import Route, model_refusal
from openclaw.web import head_or_body

_JSON = b"application/json"


def pooled_call_error(adapter: ProviderAdapter, value: BaseException | None, *, names_model: bool) -> APIError | None:
    """
    The client's error when a provider call other than chat (embeddings,
    a models listing; L{ProviderAdapter.pooled_call}) failed with
    C{value}, the same a chat call gets for the same cause (the README's
    "When a provider fails"): a refusal read by
    L{classify <openclaw.providers.errors.classify>} (400 for a request at
    fault, 429 with C{Retry-After}, 502 C{upstream_auth_failed}, ...), no
    usable key (429 or 502), the breaker open (503), no key at all (503).
    None for any other failure.  C{names_model}: the call named a model
    (embeddings), so a 404 is that model unknown (L{upstream_refused}).
    """
    provider_id = adapter.id
    if isinstance(value, UpstreamHTTPError) and value.refusal is not None:
        return upstream_refused(
            provider_id,
            value.refusal,
            adapter.keys_setting,
            names_model=names_model,
            base_url_setting=adapter.base_url_variable,
            prompt_param="input",
        )
    if isinstance(value, NoUsableKey):
        return no_usable_key(provider_id, adapter.keys_setting, value.back_in, value.model)
    if isinstance(value, BreakerOpen):
        return breaker_open(provider_id, value.remaining)
    if isinstance(value, MissingKey):
        return provider_not_configured(provider_id, adapter.key_variable)
    return None


def _passing(effect: Any) -> Any:
    """
    A callback that runs C{effect()} and passes the result on untouched.
    """

    def callback(result: Any) -> Any:
        effect()
        return result

    return callback


def request_body(request: Request) -> bytes:
    """
    The whole body of C{request}, read once, its buffer let go: a body
    past 100 KB is in a temporary file, whose descriptor twisted.web keeps
    until the answer is finished, and the call is about to take another
    for its provider connection.
    """
    content = request.content
    if content is None:
        return b""
    body: bytes = content.read()
    if not isinstance(content, io.BytesIO):
        content.close()
    return body


def body_length(request: Request) -> int:
    """
    The length of the body of C{request} (bytes), without reading it
    (L{request_body} reads it).
    """
    content = request.content
    if content is None:
        return 0
    length = content.seek(0, io.SEEK_END)
    content.seek(0)
    return int(length)


def error_response(request: Request, error: APIError) -> bytes:
    """
    Set C{request} up to answer with C{error}; the body to return.
    """
    request.setResponseCode(error.status)
    request.setHeader(b"Content-Type", _JSON)
    for name, value in error.headers:
        request.setHeader(name, value)
    return error.body()


def answer_bug(log: Logger, request: Request, what: str, reason: Failure, gone: bool) -> None:
    """
    The last errback of a request answered later (C{NOT_DONE_YET}): log
    C{reason} (an exception nothing else handled: a bug) as C{what}, and
    make sure the client is not left waiting.  Unless the request is
    already finished or its client gone (C{gone}, from C{notifyFinish}),
    it is answered with 500 C{internal_error} in OpenAI's error shape and
    finished; if part of another answer was already written, the
    connection is closed instead (the client sees a cut answer, not a
    hang).
    """
    log.failure(what, reason)
    if gone or request.finished:
        return
    if request.startedWriting:
        request.loseConnection()
        return
    body = error_response(request, internal_error())
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


def json_response(request: Request, document: Any) -> bytes:
    request.setHeader(b"Content-Type", _JSON)
    return orjson.dumps(document)


#: What accounts, for a consumer, a request its admission admitted but
#: that was not served (L{PendingRequest.admitted}): a call (its usage
#: row, which releases what the admission reserved of its budget) or a
#: models listing (its count).
Admitted = Literal["call", "listing"]


@attrs.define(eq=False)
class PendingRequest:
    """
    A request waiting before its call: its large body worked on in
    L{BodyWorkers <openclaw.dataplane.offload.BodyWorkers>}
    (L{ChatCompletions._prepare_apart}), or a consumer's admission decided
    by the cluster (L{AuthenticatedResource.after_admission}).

    From L{begin} to L{end} (both in the reactor's thread) it counts as a
    call in flight (a stop waits for it: L{APIContext.call_started}) and is
    among L{APIContext.chat_calls}: a stop whose grace runs out meanwhile
    answers it 503 C{shutting_down}, logged and counted (L{shut_down}), as
    it answers a L{ChatCall} still under way; it was closed with nothing
    said and logged as 499 C{client gone}.  Its client leaving
    is noted (L{left}); either way the caller makes no call, and counts the
    request with L{unserved} once the wait is over.
    """

    context: APIContext
    request: Request
    #: When the request began (C{reactor.seconds()}), for its duration.
    started: float
    holder: Holder
    #: Where the request goes, once known (the log line's C{route}).
    route: Route | None = None
    #: The consumer's admission was asked for: what accounts the request
    #: if it was admitted but not served (L{Admitted}); None before (the
    #: body work), when there is nothing to account.
    admitted: Admitted | None = None
    #: The client's connection was lost (C{notifyFinish} failed).
    left: bool = False
    #: A stop answered it 503 (L{shut_down}).
    stopped: bool = False

    @classmethod
    def begin(
        cls,
        context: APIContext,
        request: Request,
        started: float,
        holder: Holder,
        route: Route | None = None,
        admitted: Admitted | None = None,
    ) -> PendingRequest:
        """
        The wait of C{request} begins: counted in flight, told at a stop's
        grace, its client's leaving noted.
        """
        pending = cls(context, request, started, holder, route, admitted)
        context.call_started()
        context.chat_calls.add(pending)
        request.notifyFinish().addErrback(pending._left)
        return pending

    @property
    def gone(self) -> bool:
        """
        Whether nothing more is to be written: the client left, or a stop
        answered it.  Read in a L{BodyWorkers} thread too (a bool, set once
        in the reactor's thread).
        """
        return self.left or self.stopped

    def _left(self, reason: Failure) -> None:
        self.left = True

    def end(self) -> None:
        """
        The wait is over: the call under way (counted in flight by itself,
        before this, so that a stop waiting for the calls never finds none
        in between), or the request answered or counted.
        """
        self.context.chat_calls.discard(self)
        self.context.call_ended()

    def shut_down(self) -> None:
        """
        The stop's grace is over while the request still waits: answer 503
        C{shutting_down}, logged and counted (provider C{-}: none was
        called), unless its client left.  A consumer's accounting waits for
        the admission's answer (L{unserved}).
        """
        if self.gone:
            return
        self.stopped = True
        error = attrs.evolve(
            shutting_down(),
            message="the gateway is shutting down and this request had not reached a provider yet; retry it",
        )
        request = self.request
        self.context.completed(
            request, self.started, error.status, self.route, consumer=self.holder.consumer, provider="-", error=error
        )
        write_answer(request, error_response(request, error))

    def unserved(self) -> None:
        """
        The wait is over, and the request is not served (L{gone}): counted
        as 499 C{client gone} if its client left (a stop's 503 was counted
        by L{shut_down}), and, once its consumer's admission admitted it,
        accounted for the consumer with that status (L{admitted}).
        """
        context, holder, route = self.context, self.holder, self.route
        status = shutting_down().status if self.stopped else CLIENT_GONE_STATUS
        if not self.stopped:
            context.completed(
                self.request, self.started, status, route, outcome=CLIENT_GONE, consumer=holder.consumer, provider="-"
            )
        consumers = context.consumers
        if consumers is None or self.admitted is None:
            return
        if self.admitted == "listing":
            consumers.listed(holder, status)
        elif route is not None:
            consumers.account(
                holder, route.provider_id, route.model, status, None, context.reactor.seconds() - self.started
            )


@attrs.define(eq=False)
class OnShutDown:
    """
    A request waiting on a provider other than a chat call's (a models
    listing), among L{APIContext.chat_calls} while it waits: at a stop's
    grace, L{shut_down} calls C{stop}, which answers it 503
    C{shutting_down}.
    """

    stop: Callable[[], None]

    def shut_down(self) -> None:
        self.stop()


class APIResource(Resource):
    """
    Dispatches on the method like C{Resource}, but answers a wrong method
    and any exception in OpenAI's error shape rather than an HTML page.
    """

    def __init__(self, context: APIContext) -> None:
        super().__init__()
        self.context = context
        #: The handler of each method served (HEAD is answered as GET).
        self.handlers = {
            method: getattr(self, f"render_{method.decode()}")
            for method in (b"GET", b"POST")
            if hasattr(self, f"render_{method.decode()}")
        }
        self.allowedMethods = tuple(self.handlers)

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFound(self.context)

    def render(self, request: Request) -> Any:
        body = self._render(request)
        # HEAD: the GET answer's length without its body.
        return head_or_body(request, body) if isinstance(body, bytes) else body

    def _render(self, request: Request) -> Any:
        if not self.handlers:
            # A branch of the tree (/, /v1): nothing to serve here.
            path = request.path.decode("utf-8", "replace")
            return self.refuse(request, not_found(path, self.context.metrics_apart))
        method = request.method
        # HEAD is answered as GET (twisted.web leaves the body out); only the
        # allowed methods are dispatched: Resource's own render_HEAD would
        # call a render_GET a POST-only resource lacks.
        handler = self.handlers.get(b"GET" if method == b"HEAD" else method)
        if handler is None:
            return self.refuse(
                request, method_not_allowed(method.decode("ascii", "replace"), tuple(self.allowedMethods))
            )
        if self.context.draining:
            request.setHeader(b"connection", b"close")
            return self.render_draining(request)
        try:
            return handler(request)
        except APIError as error:
            return error_response(request, error)
        except Exception:
            self.context.log.failure("API request failed unexpectedly")
            return error_response(request, internal_error())

    def render_draining(self, request: Request) -> bytes:
        """
        The answer to a request on a connection still open once the
        gateway is stopping: 503 C{shutting_down}.
        """
        return self.refuse(request, shutting_down())

    def refuse(self, request: Request, error: APIError) -> bytes:
        """
        Answer with C{error} at once, counted and logged like every other
        answered request.
        """
        self.context.completed(request, self.context.reactor.seconds(), error.status, error=error)
        return error_response(request, error)


class NotFound(APIResource):
    """
    Every path the API does not serve, whatever the method.
    """


class Healthz(APIResource):
    """
    For load balancers: no key, no upstream call; says which route is
    active.
    """

    def render_GET(self, request: Request) -> bytes:
        route = self.context.route.current
        return json_response(request, {"status": "ok", "provider": route.provider_id, "model": route.model})

    def render_draining(self, request: Request) -> bytes:
        """
        Stopping: 503 in the probe's own shape, C{"status": "shutting_down"}.
        """
        route = self.context.route.current
        request.setResponseCode(503)
        return json_response(request, {"status": "shutting_down", "provider": route.provider_id, "model": route.model})


class Readyz(APIResource):
    """
    For orchestrators' readiness probes: no key, no upstream call.  200
    when the active provider has a usable key and its breaker is closed or
    half-open (the breaker is passive: only a call can close it, so an
    instance a balancer took out while it was half-open would never be
    ready again), or when failover has somewhere to go; else 503 with the
    reason::

        {"ready": true, "provider": "kimi", "breaker": "closed",
         "usable_keys": 2, "fallback": null}

    Not ready either (503) before the consumers have loaded from their
    database (at start, or while it is unreachable from the start): every
    consumer key would be answered 503 C{consumers_loading}; nor, in a
    cluster, after the event loop stood still, until the consumers have
    been reloaded (L{StallWatch.unready
    <openclaw.consumers.freshness.StallWatch.unready>}): they may lack a
    change made elsewhere meanwhile, a revoked key among them.
    """

    def render_draining(self, request: Request) -> bytes:
        """
        Stopping: 503 in the probe's own shape, with the reason.
        """
        request.setResponseCode(503)
        return json_response(request, {"ready": False, "reason": "the gateway is shutting down"})

    def render_GET(self, request: Request) -> bytes:
        context = self.context
        consumers = context.consumers
        if consumers is not None and not consumers.loaded:
            request.setResponseCode(503)
            newer = consumers.newer_schema
            reason = (
                "the consumers have not loaded from their database yet: check DATABASE_URL "
                "(or STATE_DIR's openclaw.db) and the log"
                if newer is None
                else f"the consumers' database cannot be used: {newer}; see the log"
            )
            return json_response(request, {"ready": False, "reason": reason})
        stale = consumers.stall_watch.unready() if consumers is not None and consumers.stall_watch is not None else None
        if stale is not None:
            request.setResponseCode(503)
            return json_response(request, {"ready": False, "reason": stale})
        current = context.route.current
        provider_id = current.provider_id
        adapter = context.providers.get(provider_id)
        breaker = adapter.breaker.state
        usable = adapter.keys.available_for(current.model)
        document: dict[str, Any] = {
            "ready": True,
            "provider": provider_id,
            "breaker": str(breaker),
            "usable_keys": usable,
            "fallback": None,
        }
        if usable and breaker != "open":
            if breaker == "half_open" and context.fallback != "off":
                # One call tries the provider; the others fail over meanwhile.
                target = context.providers.fallback_for(provider_id)
                if target is not None:
                    document["fallback"] = target.id
                    document["reason"] = (
                        f"{provider_id}: the circuit breaker is half_open (one call tries it); the other calls "
                        f"fail over to {target.id}"
                    )
            return json_response(request, document)
        if not adapter.keys.keys:
            why = f"{adapter.key_variable} is not set"
        elif not usable:
            rested = adapter.keys.resting_model(current.model)
            why = (
                f"every key in {adapter.keys_setting} is rate limited or refused"
                if rested is None
                else f"every key in {adapter.keys_setting} is rate limited for {rested} (the active model; "
                "switch_provider to another model of it, or wait)"
            )
        else:
            why = f"the circuit breaker is {breaker}"
        target = context.providers.fallback_for(provider_id) if context.fallback != "off" else None
        if target is not None:
            document["fallback"] = target.id
            document["reason"] = f"{provider_id}: {why}; calls fail over to {target.id}"
            return json_response(request, document)
        document["ready"] = False
        document["reason"] = f"{provider_id}: {why}" + (
            "; FALLBACK is off" if context.fallback == "off" else "; no other provider can take its calls"
        )
        request.setResponseCode(503)
        return json_response(request, document)


class AuthenticatedResource(APIResource):
    def authenticate(self, request: Request, started: float) -> Holder:
        """
        Who holds the request's key: a consumer, or L{GATEWAY}.

        @raise APIError: 401 unless the request carries a gateway or
            consumer key.
        """
        holder = getattr(request, "holder", None) or self.context.keys.identify(request.getHeader(b"authorization"))
        if isinstance(holder, APIError):
            self.context.completed(request, started, holder.status, error=holder)
            raise holder
        if holder.refusal is not None:
            self._holder_refused(request, started, holder, holder.refusal)
        return holder

    def _holder_refused(self, request: Request, started: float, holder: Holder, refusal: APIError) -> None:
        """
        Answer a consumer refused whatever it asks (expired): logged and
        counted under its name.
        """
        self.context.completed(request, started, refusal.status, error=refusal, consumer=holder.consumer)
        if self.context.consumers is not None:
            self.context.consumers.refused(holder, refusal)
        raise refusal

    def refuse_unread(self, request: Request, started: float, holder: Holder) -> None:
        """
        Before a large request body is read: refuse a consumer whose limits
        refuse its call whatever it asks (L{ConsumerTable.refused_unread
        <openclaw.consumers.table.ConsumerTable.refused_unread>}: its
        budget spent, its C{rpm} or C{tpm} window full), with the 429 its
        admission would answer, logged and counted once (no route, no
        provider: C{-}), without the body's work (a large one's in
        L{BodyWorkers <openclaw.dataplane.offload.BodyWorkers>}).

        @raise APIError: that refusal.
        """
        consumers = self.context.consumers
        if consumers is None or holder is GATEWAY:
            return
        refusal = consumers.refused_unread(holder)
        if refusal is not None:
            self.context.completed(
                request, started, refusal.status, consumer=holder.consumer, provider="-", error=refusal
            )
            raise refusal

    def _refused(
        self, request: Request, refusal: APIError, started: float, route: Route, holder: Holder, write: bool = True
    ) -> bytes:
        """
        Answer a consumer's call its limits refuse (403, 429), or whose
        admission failed (500): no provider was called (C{-} in the metrics).
        """
        self.context.completed(
            request, started, refusal.status, route, consumer=holder.consumer, provider="-", error=refusal
        )
        body = error_response(request, refusal)
        if write:
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
            request.finish()
        return body

    def after_admission(
        self,
        request: Request,
        admission: APIError | Deferred[APIError | None] | None,
        proceed: Callable[[], object],
        started: float,
        route: Route,
        holder: Holder,
        admitted: Admitted = "call",
    ) -> Any:
        """
        Go on with C{proceed} once a consumer's limits admit the call
        (L{openclaw.consumers.table.ConsumerTable.admit}): at once when
        C{admission} is None; when the cluster's answer comes for a
        Deferred (one round trip to Redis; nothing is done if the client
        left meanwhile); else answer the refusal (403, 429).  An admission
        that fails (a bug, an unexpected reply of the cluster's store) is
        logged and answered with a 500 (C{internal_error}).

        While the cluster decides, the request waits as a
        L{PendingRequest}: a stop whose grace runs out meanwhile answers it
        503 C{shutting_down}.  A client that left meanwhile is counted as
        499 (logged, in the metrics, and accounted for the consumer as
        C{admitted} says: a call's usage row, which releases what its
        admission reserved of the budget, or a listing's count), a request
        a stop answered likewise with its 503, unless the cluster refused
        the call: it is then counted once, as the refusal it was (the
        stop's 503 still the only answer logged).
        """
        context = self.context
        if isinstance(admission, Deferred):
            pending = PendingRequest.begin(context, request, started, holder, route, admitted)

            def decided(refusal: APIError | None) -> None:
                try:
                    if refusal is not None:
                        # Counted as limited already (ConsumerTable.admit): a
                        # client gone meanwhile is not a 499 besides.
                        if not pending.stopped:
                            self._refused(request, refusal, started, route, holder, write=not pending.left)
                    elif pending.gone:
                        pending.unserved()
                    else:
                        _rate_limit_headers(request, holder)
                        proceed()
                finally:
                    # Once the call is under way (counted in flight by
                    # itself): a stop waiting for the calls in flight never
                    # finds none in between, and closes no connection whose
                    # call is about to start.
                    pending.end()

            def failed(reason: Failure) -> None:
                # A bug or an unexpected reply of the cluster's store: the
                # client still gets an answer (500), and the call is no
                # longer in flight for the shutdown's drain.
                context.log.failure("consumer admission failed unexpectedly", reason)
                pending.end()
                if pending.gone:
                    return pending.unserved()
                self._refused(request, internal_error(), started, route, holder)

            admission.addCallbacks(decided, failed).addErrback(
                lambda f: answer_bug(
                    context.log, request, "answering an admitted consumer's call failed unexpectedly", f, pending.gone
                )
            )
            return NOT_DONE_YET
        if admission is not None:
            return self._refused(request, admission, started, route, holder, write=False)
        _rate_limit_headers(request, holder)
        proceed()
        return NOT_DONE_YET

    def usable(self, request: Request, provider_id: str, started: float, holder: Holder = GATEWAY) -> ProviderAdapter:
        """
        @raise APIError: 503 when the provider has no key configured.
        """
        adapter = self.context.providers.get(provider_id)
        if not adapter.api_key:
            error = provider_not_configured(provider_id, adapter.key_variable)
            request.setHeader(PROVIDER_HEADER, provider_id.encode())
            self.context.completed(request, started, error.status, error=error, consumer=holder.consumer)
            raise error
        return adapter


class Models(AuthenticatedResource):
    """
    C{GET /v1/models}: in OpenAI's list shape, the active provider's models
    listing (the one the health check reads, so bounded by
    HEALTH_CHECK_TIMEOUT), ids as the provider lists them.  For a consumer
    whose C{models} patterns restrict it, the models those patterns allow
    of every provider with a key they may match: the active provider's as
    listed, the others' as C{"<provider>/<model>"} (the name that calls
    them, a bare name meaning the active provider).
    """

    def render_GET(self, request: Request) -> Any:
        context = self.context
        started = context.reactor.seconds()
        holder = self.authenticate(request, started)
        route = context.route.current
        providers = self.listed_providers(route.provider_id, holder)
        if providers == (route.provider_id,):
            self.usable(request, route.provider_id, started, holder)
        request.setHeader(PROVIDER_HEADER, route.provider_id.encode())
        return self.admitted(
            request, route, started, holder, lambda: self._list(request, route, providers, started, holder)
        )

    def listed_providers(self, active: str, holder: Holder) -> tuple[str, ...]:
        """
        The providers a listing asks, the active one first: only the
        active one, except for a consumer whose C{models} patterns restrict
        it: then each provider with a key that a pattern may match (its
        C{provider/} part matches the provider's id, or holds a wildcard,
        or the pattern has no C{/}), the active one among them only if so;
        the active one alone when none is left (for its 503).
        """
        consumers = self.context.consumers
        consumer = None if consumers is None or holder is GATEWAY else consumers.consumers.get(holder.consumer)
        if consumer is None or not consumer.models:
            return (active,)
        providers = self.context.providers
        heads = [pattern.partition("/") for pattern in consumer.models]
        listed = tuple(
            provider_id
            for provider_id in (active, *(other for other in providers.ids if other != active))
            if providers.get(provider_id).api_key
            and any(not slash or "*" in head or fnmatchcase(provider_id, head) for head, slash, _ in heads)
        )
        return listed or (active,)

    def admitted(
        self, request: Request, route: Route, started: float, holder: Holder, proceed: Callable[[], object]
    ) -> Any:
        consumers = self.context.consumers
        if consumers is None or holder is GATEWAY:
            proceed()
            return NOT_DONE_YET
        # A consumer's rpm counts listings too.
        return self.after_admission(
            request,
            consumers.admit_listing(holder),
            proceed,
            started,
            route,
            holder,
            admitted="listing",
        )

    def fetch(
        self,
        request: Request,
        route: Route,
        providers: tuple[str, ...],
        started: float,
        holder: Holder,
        answer: Callable[[list[tuple[str, list[str]]]], None],
    ) -> None:
        """
        Ask each of C{providers} for its listing; then C{answer} with
        C{(provider, model ids it lists that the holder may call)} for each
        that answered, or, when none did, the first's error.

        Meanwhile the listing counts in flight and is among
        L{APIContext.chat_calls}: a stop whose grace runs out before the
        providers answered answers it 503 C{shutting_down}, counted so,
        and cancels the listings, as a chat call is ended (it was closed
        with nothing said, and logged 499 C{client gone}).
        """
        context = self.context
        adapters = [context.providers.get(provider_id) for provider_id in providers]
        listings = DeferredList([adapter.list_models() for adapter in adapters], consumeErrors=True)
        context.call_started()
        gone: list[bool] = []
        stopped: list[bool] = []

        def client_gone(reason: Failure) -> None:
            gone.append(True)
            listings.cancel()

        def shut_down() -> None:
            if gone or stopped or listings.called:
                return
            stopped.append(True)
            self._error(request, shutting_down(), route, started, holder)
            listings.cancel()

        waiting = OnShutDown(shut_down)
        context.chat_calls.add(waiting)

        def answered(results: list[tuple[bool, Any]]) -> None:
            if stopped:
                # Answered and counted by the stop.
                return None
            if gone:
                return self._count_listing(request, started, 499, route, holder, CLIENT_GONE)
            found = [
                (
                    provider_id,
                    result if context.consumers is None else context.consumers.allowed(holder, provider_id, result),
                )
                for provider_id, (ok, result) in zip(providers, results, strict=True)
                if ok
            ]
            if not found:
                # The first provider asked: the active one unless it was
                # not (a restricted consumer's listing, without its key).
                first = providers[0]
                if first != route.provider_id:
                    request.setHeader(PROVIDER_HEADER, first.encode())
                    failed = Route(first, context.providers.get(first).default_model)
                else:
                    failed = route
                return self._failed(results[0][1], request, failed, started, holder)
            return answer(found)

        request.notifyFinish().addErrback(client_gone)
        listings.addCallback(answered)
        listings.addErrback(
            lambda reason: answer_bug(context.log, request, "models listing failed unexpectedly", reason, bool(gone))
        )
        # Counted out once the answer is written: see APISite.drain.
        listings.addBoth(_passing(lambda: context.chat_calls.discard(waiting)))
        listings.addBoth(_passing(context.call_ended))

    def _list(self, request: Request, route: Route, providers: tuple[str, ...], started: float, holder: Holder) -> None:
        active = route.provider_id

        def answer(found: list[tuple[str, list[str]]]) -> None:
            data = [
                {
                    "id": model if owner == active else f"{owner}/{model}",
                    "object": "model",
                    "created": 0,
                    "owned_by": owner,
                }
                for owner, ids in found
                for model in ids
            ]
            self._answer(request, {"object": "list", "data": data}, route, started, holder)

        self.fetch(request, route, providers, started, holder, answer)

    def _answer(self, request: Request, document: Any, route: Route, started: float, holder: Holder) -> None:
        body = orjson.dumps(document)
        request.setHeader(b"Content-Type", _JSON)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.write(body)
        request.finish()
        self._count_listing(request, started, 200, route, holder)

    def _count_listing(
        self,
        request: Request,
        started: float,
        status: int,
        route: Route,
        holder: Holder,
        outcome: str | None = None,
        called: bool = True,
    ) -> None:
        """
        Count a listing; C{called}: its provider was asked (else counted
        under provider C{-}).
        """
        self.context.completed(
            request, started, status, route, outcome=outcome, consumer=holder.consumer, provider=None if called else "-"
        )
        if self.context.consumers is not None:
            self.context.consumers.listed(holder, status)

    def _failed(self, reason: Failure, request: Request, route: Route, started: float, holder: Holder) -> None:
        provider_id = route.provider_id
        value = reason.value
        error = pooled_call_error(self.context.providers.get(provider_id), value, names_model=False)
        if error is None:
            if isinstance(value, UpstreamHTTPError):
                error = upstream_http_error(provider_id, value.status, str(value))
            elif isinstance(value, ProbeTimedOut):
                timeout = self.context.providers.get(provider_id).timeout
                error = upstream_timeout(provider_id, timeout, "the models listing", "HEALTH_CHECK_TIMEOUT")
            elif isinstance(value, MalformedResponse):
                # As a chat call's malformed answer: the provider was reached.
                error = upstream_failed(provider_id, str(value), "upstream_malformed")
            elif isinstance(value, Unreachable):
                error = upstream_failed(provider_id, value.explained)
            elif isinstance(value, ProviderError):
                error = upstream_failed(provider_id, str(value))
            else:
                self.context.log.failure("models listing failed unexpectedly", reason)
                error = internal_error()
        # No usable key, the breaker open, no key at all: nothing was asked.
        called = not isinstance(value, (NoUsableKey, BreakerOpen, MissingKey))
        self._error(request, error, route, started, holder, called)

    def _error(
        self,
        request: Request,
        error: APIError,
        route: Route | None,
        started: float,
        holder: Holder,
        called: bool = True,
    ) -> None:
        """
        Answer a listing with C{error}; C{called}: C{route}'s provider was
        asked (else counted under provider C{-}).
        """
        body = error_response(request, error)
        if route is not None and called:
            # Of the provider's keys and address (Scrubber.quoted).
            body = self.context.providers.get(route.provider_id).scrubber.quoted(body)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.write(body)
        request.finish()
        self.context.completed(
            request,
            started,
            error.status,
            route,
            consumer=holder.consumer,
            provider=None if called else "-",
            error=error,
        )
        if self.context.consumers is not None:
            self.context.consumers.listed(holder, error.status)


class Model(Models):
    """
    C{GET /v1/models/{model}}: one model, in OpenAI's Model shape (C{id} as
    asked, C{object}, C{created}, C{owned_by}), when the listing this key
    gets holds it: a bare id is looked up in the active provider's listing,
    C{"<provider>/<model>"} in that provider's.  The id may hold C{/} as is
    or as C{%2F}.  Else 404 C{model_not_found}; an id no model can have
    (L{model_refusal}: empty, unprintable, too long) is a 400 naming
    C{model}, as on the other endpoints.  The key check, a consumer's
    C{models} and C{rpm}, the errors and the metrics are the listing's.
    """

    def render_GET(self, request: Request) -> Any:
        context = self.context
        started = context.reactor.seconds()
        holder = self.authenticate(request, started)
        # APIRoot moved "v1/models" to prepath: the rest is the id.
        assert request.postpath is not None
        # Spaces around a name are not part of it, as for a chat call's.
        wanted = b"/".join(request.postpath).decode("utf-8", "replace").strip(" ")
        refusal = model_refusal(wanted)
        if refusal is not None:
            # The name is not echoed: it may be unprintable, or fill the
            # answer and the log line.
            self._error(request, bad_request(refusal, param="model"), None, started, holder)
            return NOT_DONE_YET
        active = context.route.current
        route = choose_route(wanted, active, context.providers.ids)
        if route is active:
            route = Route(active.provider_id, wanted)
        adapter = self.usable(request, route.provider_id, started, holder)
        route = Route(route.provider_id, adapter.normalize_model(route.model) or route.model)
        request.setHeader(PROVIDER_HEADER, route.provider_id.encode())

        def answer(found: list[tuple[str, list[str]]]) -> None:
            if route.model not in found[0][1]:
                return self._error(request, model_not_found(wanted), route, started, holder)
            document = {"id": wanted, "object": "model", "created": 0, "owned_by": route.provider_id}
            self._answer(request, document, route, started, holder)

        return self.admitted(
            request,
            route,
            started,
            holder,
            lambda: self.fetch(request, route, (route.provider_id,), started, holder, answer),
        )


class PreparedChat(NamedTuple):
    """
    A chat request checked, routed and encoded for its provider
    (L{prepare_chat}).  A tuple: made for every chat call, it costs the
    least to build.
    """

    chat: ChatRequest
    route: Route
    #: The request named its provider (C{"kimi/..."}): never failed over.
    pinned: bool
    adapter: ProviderAdapter
    wire: Wire
    #: The upstream body, in C{wire}'s format.
    body: bytes
    #: The length of the client's body (C{raw}, bytes): the one measure of
    #: a request's size against L{BodyWorkers.above} (its work in a thread
    #: or not), for its failover's encoding too (L{ChatCall.request_bytes}).
    raw_bytes: int


def prepare_chat(raw: bytes, codings: Sequence[bytes], active: Route, providers: ProviderRegistry) -> PreparedChat:
    """
    Parse and check the chat request body C{raw}
    (L{parse_chat_request}), route it (C{"<provider>/<model>"}, else
    C{active}) and encode it for its provider's wire (L{encode_request}).

    Runs in the reactor's thread for a body of at most
    L{OFFLOAD_BYTES <openclaw.dataplane.offload.OFFLOAD_BYTES>}, in a
    thread of L{BodyWorkers} for a longer one: it reads only the
    request's own data (C{raw}; C{codings}, its C{Content-Encoding} field
    values read beforehand in the reactor's thread, L{content_encoding},
    for a body that does not parse) and what does not change once the gateway
    runs (C{active}, a frozen route read beforehand; C{providers}' ids,
    offered tools, and its adapters' wires and model names); it logs
    nothing, counts nothing.

    @raise APIError: 400 (415) naming the first problem found, as
        L{parse_chat_request}, L{choose_route} and L{encode_request} do.
    """
    offered = providers.offered_tools
    chat = parse_chat_request(raw, codings, offered.types, offered.media)
    route = choose_route(chat.model, active, providers.ids)
    # choose_route gives the active route itself unless the model
    # named a provider: a call pinned that way is never failed over.
    pinned = route is not active
    adapter = providers.get(route.provider_id)
    if pinned:
        # As the provider lists it (Gemini's "models/" prefix
        # dropped), for prices, model patterns and usage.
        model = adapter.normalize_model(route.model)
        if not model:
            raise bad_request(f"model {chat.model!r} names no model; use {route.provider_id}/<model>", param="model")
        route = Route(route.provider_id, model)
    wire = adapter.wire
    body = encode_request(wire, chat, route.model, route.provider_id, offered)
    return PreparedChat(chat, route, pinned, adapter, wire, body, len(raw))


def write_answer(request: Request, body: bytes) -> None:
    """
    Write C{body}, the whole answer C{request} was set up with
    (L{error_response}), and finish: for an answer decided after
    C{render} returned C{NOT_DONE_YET}.
    """
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


def holder_of_body(request: Request, holder: Holder) -> Hashable:
    """
    Whose large body C{request} holds, for L{BodyWorkers}' bound per
    holder (L{BodyWorkers.full}): its consumer, whatever key of it is
    presented; for a C{GATEWAY_API_KEYS} key (every one is L{GATEWAY}),
    the key presented itself.
    """
    if holder is not GATEWAY:
        return ("consumer", holder.consumer)
    return ("key", request.getHeader(b"authorization") or b"")


def bodies_refused(full: Full, bodies: BodyWorkers) -> APIError:
    """
    The answer to a large body L{BodyWorkers} do not take now (C{full},
    L{BodyWorkers.full}): 429 when its key holder has
    L{BodyWorkers.per_holder} of them in the pool already (its own
    requests are to end first), else 503 C{gateway_overloaded} (the
    pool's queue full: every holder's), each with C{Retry-After}: the
    time the workers take to get through the bodies they have
    (L{BodyWorkers.retry_after}).
    """
    above = f"over {int(bodies.above) // 1024} KiB"
    wait = bodies.retry_after()
    if full == "holder":
        return APIError(
            429,
            f"this key's holder (its consumer, or this gateway key) has {bodies.per_holder} large requests ({above}) "
            "being worked on or waiting already, the most one holder may at once; wait for their answers before "
            f"sending more, or retry after {wait} s",
            "requests",
            "too_many_large_requests",
            retry_after=wait,
        )
    return APIError(
        503,
        f"the gateway is working on as many large requests ({above}) as it takes at once ({bodies.size} being "
        f"worked on, {bodies.queue} waiting); retry after {wait} s, or send smaller requests; tell the operator "
        "if it lasts (more instances, or --workers)",
        "server_error",
        "gateway_overloaded",
        retry_after=wait,
    )


class ChatCompletions(AuthenticatedResource):
    """
    C{POST /v1/chat/completions}, to the active provider or the one the
    request's C{"<provider>/<model>"} names.

    A body longer than L{OFFLOAD_BYTES
    <openclaw.dataplane.offload.OFFLOAD_BYTES>} is parsed, checked and
    encoded in a thread (L{prepare_chat}, L{BodyWorkers}): the other
    clients are served meanwhile.  Everything else, before and after (the
    key, the counts, the log, a consumer's admission, the call), is done
    in the reactor's thread, in the same order as for a short body.  Two
    things are decided before such a body is read: a consumer its limits
    refuse whatever it asks is refused (L{refuse_unread}: its work would
    be wasted), and a body past L{BodyWorkers}' bounds (its holder's, the
    queue's) is refused (L{bodies_refused}).
    """

    def render_POST(self, request: Request) -> Any:
        context = self.context
        started = context.reactor.seconds()
        holder = self.authenticate(request, started)
        active = context.route.current
        if body_length(request) > context.bodies.above:
            # Not worked on for a consumer refused whatever it sends.
            self.refuse_unread(request, started, holder)
            return self._prepare_apart(request, request_body(request), active, started, holder)
        raw = request_body(request)
        try:
            prepared = prepare_chat(raw, content_encoding(request.requestHeaders), active, context.providers)
        except APIError as error:
            context.completed(request, started, error.status, consumer=holder.consumer, error=error)
            raise
        return self._call(request, prepared, started, holder)

    def _prepare_apart(self, request: Request, raw: bytes, active: Route, started: float, holder: Holder) -> Any:
        """
        L{prepare_chat} in a thread of L{BodyWorkers} (the reactor's thread
        waits for nothing), then, back in the reactor's thread, the call
        (L{_call}), or the refusal counted and answered as in
        L{render_POST}.  Meanwhile the request waits as a
        L{PendingRequest}: a stop waits for it, and, should its grace run
        out first, answers it 503 C{shutting_down}.  A client that leaves
        before the work is done (or begun: it is then skipped) has no call
        made: it is counted as 499 (C{client gone}), its refusal as the
        refusal it was, and nothing is written; a request the stop answered
        is counted once, as that 503.  A bug is logged and answered 500
        (L{answer_bug}), as C{render} does.

        A body the workers do not take now (L{BodyWorkers.full}: its key
        holder's bodies, or the queue, at their bound) is refused at once,
        logged and counted (L{bodies_refused}).

        @raise APIError: that refusal.
        """
        context = self.context
        whose = holder_of_body(request, holder)
        full = context.bodies.full(whose)
        if full is not None:
            error = bodies_refused(full, context.bodies)
            context.completed(request, started, error.status, consumer=holder.consumer, provider="-", error=error)
            raise error
        pending = PendingRequest.begin(context, request, started, holder)
        # Read here: Headers is not to be touched from another thread.
        codings = content_encoding(request.requestHeaders)
        providers = context.providers

        def work() -> PreparedChat | None:
            # In a BodyWorkers thread: pending.gone is this request's own flag.
            return None if pending.gone else prepare_chat(raw, codings, active, providers)

        def prepared(result: PreparedChat | None) -> None:
            try:
                if result is None or pending.gone:
                    pending.route = None if result is None else result.route
                    pending.unserved()
                    return
                answer = self._call(request, result, started, holder)
                if isinstance(answer, bytes):
                    write_answer(request, answer)
            finally:
                # Once the call is under way (as in after_admission): a stop
                # begun during the work waits for the call it makes.
                pending.end()

        def refused(reason: Failure) -> None:
            pending.end()
            reason.trap(APIError)
            if pending.stopped:
                # Answered 503 and counted so by the stop.
                return
            error = cast(APIError, reason.value)
            context.completed(request, started, error.status, consumer=holder.consumer, error=error)
            if not pending.left:
                write_answer(request, error_response(request, error))

        context.bodies.run(work, whose).addCallbacks(prepared, refused).addErrback(
            lambda f: answer_bug(context.log, request, "API request failed unexpectedly", f, pending.gone)
        )
        return NOT_DONE_YET

    def _call(self, request: Request, prepared: PreparedChat, started: float, holder: Holder) -> Any:
        """
        Make the call L{prepare_chat} made ready, once a consumer's limits
        admit it (L{after_admission}); in the reactor's thread.  C{render}'s
        answer: C{NOT_DONE_YET}, or the bytes of a refusal by the limits.
        """
        context = self.context
        chat, route = prepared.chat, prepared.route
        call = ChatCall(
            context,
            request,
            prepared.adapter,
            route,
            prepared.wire,
            chat,
            started,
            pinned=prepared.pinned,
            holder=holder,
            request_bytes=prepared.raw_bytes,
        )
        body = prepared.body
        consumers = context.consumers
        if consumers is None or holder is GATEWAY:
            call.start(body)
            return NOT_DONE_YET
        # A cluster's shared windows: one round trip to Redis.
        admission = consumers.admit(
            holder,
            route.provider_id,
            route.model,
            completion_limit(chat.body),
            lambda: prompt_tokens(chat.body),
            choice_count(chat.body),
        )
        return self.after_admission(request, admission, lambda: call.start(body), started, route, holder)


def _rate_limit_headers(request: Request, holder: Holder) -> None:
    """
    The C{x-ratelimit-*} headers of an admitted call of a consumer with an
    C{rpm} or C{tpm} (L{openclaw.consumers.limits.RateLimits}), on its
    answer whatever it turns out to be, as OpenAI's API sends them.
    """
    limits = holder.rate_limits
    if limits is not None:
        for name, value in limits.headers():
            request.setHeader(name, value)


class APIRoot(Resource):
    """
    The API's root: one leaf resource that picks the handler of a request
    by its whole path (a dict), rather than a walk down a tree of
    resources one segment at a time.  What it answers is what that tree
    would: the handlers' own answers (and their 405s) on their exact
    paths, a 404 in OpenAI's shape on any other, C{%xx} escapes in a
    segment decoded as twisted.web decodes C{postpath}.  A child added with
    L{putChild} (the C{/metrics} resource) is served as under a tree.
    """

    isLeaf = True

    def __init__(
        self,
        context: APIContext,
        routes: dict[tuple[bytes, ...], APIResource],
        prefixes: dict[tuple[bytes, ...], APIResource] | None = None,
    ) -> None:
        super().__init__()
        #: Handler by path segments (C{postpath}) and by raw path.
        self.routes = dict(routes)
        #: Handler of the paths below some segments (C{/v1/models/{model}}):
        #: it finds those segments in C{prepath}, the rest in C{postpath}.
        self.prefixes = dict(prefixes or {})
        self.paths = {b"/" + b"/".join(segments): handler for segments, handler in routes.items()}
        self.not_found = NotFound(context)

    def render(self, request: Request) -> Any:
        handler = self.paths.get(request.path)
        if handler is None:
            return self._route(request).render(request)
        return handler.render(request)

    def _route(self, request: Request) -> Resource:
        postpath = request.postpath
        assert postpath is not None
        handler = self.routes.get(tuple(postpath))
        if handler is not None:
            return handler
        for prefix, below in self.prefixes.items():
            if len(postpath) > len(prefix) and tuple(postpath[: len(prefix)]) == prefix:
                assert request.prepath is not None
                request.prepath.extend(postpath[: len(prefix)])
                del postpath[: len(prefix)]
                return below
        if postpath and postpath[0] in self.children:
            child = self.children[postpath[0]]
            assert request.prepath is not None
            request.prepath.append(postpath.pop(0))
            found: Resource = getChildForRequest(child, request)
            return found
        return self.not_found


def build_resource(context: APIContext) -> Resource:
    """
    The API: C{/healthz}, C{/readyz}, C{/v1/models}, C{/v1/models/{model}}, C{/v1/chat/completions},
    C{/v1/embeddings}, dispatched by L{APIRoot}.
    """
    # Imported here: the embeddings resource builds on this module's classes.
    from openclaw.dataplane.embeddings import Embeddings

    return APIRoot(
        context,
        {
            (b"healthz",): Healthz(context),
            (b"readyz",): Readyz(context),
            (b"v1", b"models"): Models(context),
            (b"v1", b"chat", b"completions"): ChatCompletions(context),
            (b"v1", b"embeddings"): Embeddings(context),
        },
        {(b"v1", b"models"): Model(context)},
    )
