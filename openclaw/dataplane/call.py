"""
One chat call carried to a provider and its answer carried back, streamed
or not.

The client's response is committed (status line sent) only once the
upstream's answer is read whole and accepted, or, for a stream, with its
first translated event that begins the answer (or its end; events before
it that carry nothing of it, a role alone or empty text, are held back and
sent ahead of it): every failure before that -- a 5xx, a body cut, stalled
or malformed, a stream whose first event is an error, or whose error comes
after such empty events -- is a proper HTTP error (502, 504, or the status the provider's error stands
for), failed over when the route allows.  After that, in a stream, a
failure can only be told in the stream itself: an error event, and no
C{[DONE]}.

Time limits: the whole exchange for an answer in one piece; for a stream,
the wait for the headers and then each gap between whole events (comment
lines and partial lines do not count).  While the client's connection
holds a stream back (it takes its bytes slower than they come, and the
upstream read is paused with it), the provider is not waited on: the
client must take all that was written within C{API_SEND_TIMEOUT_SECONDS}
(the transport resumes its producer only once its buffer is empty), else its
connection is aborted, the upstream one dropped and the call counted 408
C{send_timeout}, as for a large answer in one piece.  Whoever goes
away first, the other side is let go: a client that disconnects cancels
the upstream request, an upstream that breaks ends the client's stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import attrs
import orjson
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from twisted.web.server import Request
from zope.interface import implementer

from openclaw.consumers.estimate import answer_bytes, chunk_bytes, estimated_usage, known_counts, prompt_tokens
from openclaw.consumers.table import GATEWAY, Holder, usage_counts
from openclaw.dataplane.answer import CLIENT_GONE, CLIENT_GONE_STATUS, CUT_STATUS, SEND_TIMEOUT, abort, send_whole
from openclaw.dataplane.context import APIContext, request_id_of
from openclaw.dataplane.cost import ProviderWait
from openclaw.dataplane.errors import (
    ANSWER_BROKEN,
    FALLBACK_HEADER,
    PROVIDER_HEADER,
    STREAM_BROKEN,
    STREAM_ERROR,
    APIError,
    amended,
    bad_request,
    breaker_open,
    descriptors_exhausted,
    every_breaker_open,
    every_key_resting,
    for_operator,
    internal_error,
    no_usable_key,
    out_of_descriptors,
    provider_not_configured,
    retry_after_seconds,
    shutting_down,
    sooner_elsewhere,
    stream_too_long,
    upstream_failed,
    upstream_refused,
    upstream_timeout,
)
from openclaw.dataplane.offload import HeldLog
from openclaw.dataplane.request import JSON_TOO_DEEP, MAX_JSON_DEPTH, ChatRequest, too_deep
from openclaw.dataplane.sse import DONE, SSEDecoder, SSEError, encode
from openclaw.dataplane.streamstart import MAX_HELD_BYTES, MAX_HELD_SECONDS, NEXT_EVENT, StreamStart
from openclaw.logs import DESCRIPTORS_FIELD
from openclaw.providers import ProviderAdapter
from openclaw.providers.breaker import BreakerState, CircuitBreaker
from openclaw.providers.errors import Explained, RefusalKind
from openclaw.providers.event_errors import error_event_status
from openclaw.providers.fetch import BodyReader
from openclaw.providers.wire import (
    Completion,
    MalformedAnswer,
    ModelFailed,
    OfferedTools,
    StreamBroken,
    StreamTranslation,
    Wire,
    refuse_media_kinds,
    refuse_tool_types,
)
from openclaw.routing import FallbackReason, Route
from openclaw.stalls import CatchingUp

_JSON = b"application/json"
_EVENT_STREAM = b"text/event-stream"


def _media_type(response: IResponse) -> bytes:
    """
    The media type of C{response}'s C{Content-Type}, lower-case, without
    its parameters (RFC 9110 section 8.3.1); C{b""} without one.
    """
    value: bytes = response.headers.getRawHeaders(b"content-type", [b""])[0]
    return value.partition(b";")[0].strip().lower()


_DONE_EVENT = encode(DONE)
_HEADERS = "the response headers"
_ERROR_BODY = "the error body"
_BODY = "the response body"
# MAX_HELD_BYTES and MAX_HELD_SECONDS (L{openclaw.dataplane.streamstart})
# are read here when a stream starts (a test may patch them in this module).

#: Seconds a stream's body may go on once its answer is complete (every
#: choice finished: Gemini's last C{finishReason}, which has no end marker
#: after it), before the stream is closed as the whole answer it is and its
#: upstream connection let go.  Events after it (a later usage) are rare
#: and come at once.
COMPLETE_STREAM_GRACE_SECONDS = 2.0

#: A provider's answer nested deeper than L{MAX_JSON_DEPTH}: 502.
ANSWER_TOO_DEEP = (
    f"the answer's JSON nests more than {MAX_JSON_DEPTH} levels of lists and objects, more than the gateway "
    "can pass on; if the model wrote it (tool call arguments), ask for a flatter shape"
)


def encode_request(wire: Wire, chat: ChatRequest, model: str, provider_id: str, offered: OfferedTools) -> bytes:
    """
    The upstream body of C{chat} for C{model} in C{wire}'s format; with
    every tool call id plain when some id carries a payload and the wire
    does not read carried ids (L{openclaw.dataplane.callids}).  A tool of
    a type the wire does not take is refused first (L{refuse_tool_types}),
    then a content part or media URL it does not take
    (L{refuse_media_kinds}).

    @param provider_id: the provider whose format C{wire} is.
    @param offered: the tool types the declared providers take
        (L{ProviderRegistry.offered_tools
        <openclaw.providers.registry.ProviderRegistry.offered_tools>}).

    Nothing walks the body to measure its depth beforehand: orjson's own
    refusal (L{too_deep}) is turned into the client's error.

    @raise APIError: 400 C{json_too_deep} when the request nests more than
        L{MAX_JSON_DEPTH} levels; 400 for a tool, a content part or a media
        URL of a kind the wire does not take; any 4xx the wire raises.
    """
    refuse_tool_types(chat, wire, provider_id, offered)
    refuse_media_kinds(chat, wire, provider_id, offered)
    if chat.carried_ids and not wire.reads_carried_ids:
        chat = chat.plain_ids()
    try:
        return wire.request_body(chat, model)
    except orjson.JSONEncodeError as e:
        if too_deep(e):
            raise bad_request(JSON_TOO_DEEP, code="json_too_deep") from None
        raise


@attrs.define(eq=False)
class ChatCall:
    """
    Drives one call; L{start} it and forget it.

    A call refused with 429 or an auth failure is tried once more on the
    next usable key of the same provider.  A call to the active provider
    (not C{pinned}) that fails before the client's response has started --
    connection refused or reset, no headers in time, 5xx, 429, auth, no
    usable key, breaker open, a 2xx body cut, stalled or malformed, a
    stream that fails before its answer begins (L{stream_data}) -- is sent once to the next provider
    (L{ProviderRegistry.fallback_for}) when C{FALLBACK=auto}: re-encoded for
    that provider's wire, its answer carrying C{X-OpenClaw-Fallback}.
    """

    context: APIContext
    request: Request
    adapter: ProviderAdapter
    route: Route
    wire: Wire
    chat: ChatRequest
    started: float
    #: The caller named the provider (C{"kimi/..."}): never failed over.
    pinned: bool = False
    #: Who holds the call's key (a consumer, or GATEWAY's C{-}).
    holder: Holder = GATEWAY
    #: The length of the client's request body (bytes): a failover encodes
    #: the request again in a thread when it is past L{BodyWorkers.above
    #: <openclaw.dataplane.offload.BodyWorkers.above>}, as its first
    #: encoding was (L{ChatCompletions
    #: <openclaw.dataplane.resource.ChatCompletions>} measures the same
    #: body: one that was worked on in a thread is encoded again in one).
    request_bytes: int = 0
    #: A whole answer's C{usage}, for the consumer's accounting.
    _usage: Any = None
    #: What the call waits for now, for the timeout message; None once its
    #: stream has started: its start says (L{StreamStart.waiting_for}).
    _waiting_for: str | None = _HEADERS
    #: The upstream step in flight (headers or a whole body), cancellable.
    _pending: Deferred[Any] | BodyReader | None = None
    #: Whether a deadline found due is put off by a turn of the loop
    #: (L{_timed_out}: the loop stood still, and the answer's body goes
    #: on arriving); made at the first deadline.
    _catching_up: CatchingUp | None = None
    _timer: IDelayedCall | None = None
    _relay: _StreamRelay | None = None
    #: The client has its answer, or has gone: nothing more is written.
    _over: bool = False
    #: The upstream body of the attempt under way (for a retry on another key).
    _body: bytes = b""
    #: The key of the attempt under way.
    _key: str | None = None
    #: Keys of this provider tried already.
    _tried: list[str] = attrs.field(factory=list)
    #: C{(from, to, reason)} once failed over.
    _fallback: tuple[str, str, FallbackReason] | None = None
    #: Once failed over, the first provider's failure (its error, message
    #: and detail scrubbed of its keys), told with the fallback's if that
    #: fails too.
    _origin_failure: APIError | None = None
    #: And the error it was (its status, code and headers), its provider
    #: and route: the answer's, should the fallback refuse the request.
    _origin_error: APIError | None = None
    _origin: tuple[ProviderAdapter, Route] | None = None
    #: The provider failed over from, if it was called (a key tried).
    _origin_called: str | None = None
    #: Bumped by each attempt and timeout: answers to an older one are ignored.
    _generation: int = 0
    #: Time spent waiting on the provider, for C{openclaw_api_overhead_seconds}.
    provider_wait: ProviderWait = attrs.field(
        default=attrs.Factory(lambda self: ProviderWait(self.context.reactor.seconds), takes_self=True)
    )
    #: A stream's translation, once the stream has started.
    _translation: StreamTranslation | None = None
    #: Once a stream has started (L{_start_stream}): whether anything of it
    #: has reached the client, and what it holds back until its answer
    #: begins.  None for a call that does not stream.
    _start: StreamStart | None = None
    #: Completion text seen (a consumer's call), in UTF-8 bytes, for an
    #: estimate when no usage ever comes (L{openclaw.consumers.estimate}).
    _completion_bytes: int = 0
    #: The client left a consumer's stream before its usage: the rest of
    #: the stream is read for it, and the call counted once it ends.
    _reading_out: bool = False
    #: A whole answer is being translated in a thread (L{_translate_apart}).
    _translating_apart: bool = False
    #: The stream's L{StreamTranslation.progress} when the wait for its
    #: next event was last put off.
    _progress: int = 0
    #: The breaker whose permission the attempt under way took
    #: (L{CircuitBreaker.allow}) and that has had no verdict on it yet;
    #: L{_settle} gives it exactly one, however the attempt ends.
    _permit: CircuitBreaker | None = None
    #: That permission was the half-open trial.
    _permit_is_trial: bool = False
    #: The status of an upstream answer whose error body is being read.
    _error_status: int = 0
    #: And its C{Retry-After}, if it had one.
    _error_retry_after: str | None = None
    #: The status of the 2xx answer whose body is being read, for messages.
    _answer_status: int = 200
    #: A stream's media type as its answer said it (L{_media_type}).
    _answer_type: bytes = b""
    #: The client's connection holds the stream back (L{client_paused}):
    #: the timer runs the client's send deadline, not the provider's.
    _client_paused: bool = False

    def start(self, body: bytes) -> None:
        context = self.context
        context.call_started()
        context.chat_calls.add(self)
        self.request.notifyFinish().addErrback(self._client_gone)
        self._attempt(body)

    def _attempt(self, body: bytes) -> None:
        """
        Send C{body} to L{adapter} with its next usable key, if its breaker
        lets a call through.
        """
        # A permission still held (none should be: each attempt settles
        # before the next) is given back before another is taken.
        if self._permit is not None:
            self._settle(CircuitBreaker.abandoned)
        adapter = self.adapter
        provider_id = self.route.provider_id
        keys = adapter.keys
        if not keys.keys:
            return self._upstream_failed("no_key", provider_not_configured(provider_id, adapter.key_variable))
        model = self.route.model
        key = keys.pick(self._tried, model)
        if key is None:
            back_in = keys.back_in(model)
            return self._upstream_failed(
                keys.unusable_reason(model),
                no_usable_key(provider_id, adapter.keys_setting, back_in, keys.resting_model(model)),
                resting=back_in,
            )
        breaker = adapter.breaker
        trial = breaker.state is BreakerState.HALF_OPEN
        if not breaker.allow():
            return self._upstream_failed(
                "breaker_open", breaker_open(provider_id, breaker.remaining(), pinned=self.pinned)
            )
        self._permit, self._permit_is_trial = breaker, trial
        self._body, self._key = body, key
        self._tried.append(key)
        self._generation += 1
        self._waiting_for = _HEADERS
        self._cancel_timer()
        self._timer = self.context.reactor.callLater(self.context.timeout, self._timed_out)
        self.provider_wait.begin()
        d = self._pending = adapter.post_chat(self.route.model, body, self.chat.stream, key)
        d.addCallbacks(
            self._got_response,
            self._exchange_failed,
            callbackArgs=(self._generation,),
            errbackArgs=(self._generation,),
        )
        d.addErrback(self._bug)
        return None

    def _settle(self, verdict: Callable[[CircuitBreaker], None]) -> None:
        """
        Give the breaker whose permission the attempt took its verdict
        (C{CircuitBreaker.succeeded}, C{.failed} or C{.abandoned}), once:
        later calls do nothing until the next attempt.  Abandoning a
        permission that was not the half-open trial changes nothing (there
        is no trial of this call's to give back).
        """
        breaker, self._permit = self._permit, None
        if breaker is None:
            return
        if verdict is CircuitBreaker.abandoned and not self._permit_is_trial:
            return
        verdict(breaker)

    def _current(self, generation: int) -> bool:
        """
        The answer belongs to the attempt under way and the call is not over.
        """
        if generation != self._generation or self._over:
            return False
        self._pending = None
        return True

    # -- the upstream's answer ---------------------------------------------

    def _got_response(self, response: IResponse, generation: int) -> None:
        self.provider_wait.end()
        if not self._current(generation):
            return
        if not 200 <= response.code < 300:
            self._error_status = response.code
            retry_after = response.headers.getRawHeaders(b"retry-after", [None])[0]
            self._error_retry_after = None if retry_after is None else retry_after.decode("latin-1")
            self._read(response, _ERROR_BODY, self._got_error_body, response.code, self._error_retry_after)
            return
        # No verdict yet: the provider has answered only once its body is
        # read and accepted (a whole answer) or a stream's first event has
        # been relayed.
        self._answer_status = response.code
        if self.chat.stream:
            # Streamed whatever it says it is (a proxy may call its event
            # stream JSON); said, if it ends without an event (stream_ended).
            self._answer_type = _media_type(response)
            self._start_stream(response)
        else:
            self._read(response, _BODY, self._got_body)

    def _read(self, response: IResponse, what: str, then: Any, *args: Any) -> None:
        """
        Read the whole body of C{response}, then C{then(body, *args,
        generation)}; a body cut or too large goes to L{_exchange_failed}.
        Straight to the call: no Deferred for a step only it waits on.
        """
        self._waiting_for = what
        self.provider_wait.begin()
        generation = self._generation

        def done(body: bytes) -> None:
            try:
                then(body, *args, generation)
            except Exception:
                self._bug(Failure())

        def failed(reason: Failure) -> None:
            try:
                self._exchange_failed(reason, generation)
            except Exception:
                self._bug(Failure())

        self._pending = BodyReader(done, failed)
        response.deliverBody(self._pending)

    def _got_body(self, body: bytes, generation: int) -> None:
        """
        A 2xx answer read whole: translated for the client (L{Wire.completion
        <openclaw.providers.wire.Wire.completion>}) in the reactor's thread,
        or, past L{BodyWorkers.above <openclaw.dataplane.offload.BodyWorkers.above>},
        in a thread of L{BodyWorkers <openclaw.dataplane.offload.BodyWorkers>}
        (L{_translate_apart}), then answered (L{_translated}) or refused
        (L{_untranslated}).
        """
        self.provider_wait.end()
        if not self._current(generation):
            return
        created = int(self.context.reactor.seconds())
        if len(body) > self.context.bodies.above:
            return self._translate_apart(body, created)
        try:
            completion = self.wire.completion(body, self.route.model, created, self.chat)
        except (MalformedAnswer, orjson.JSONEncodeError) as e:
            return self._untranslated(e)
        return self._translated(completion)

    def _translate_apart(self, body: bytes, created: int) -> None:
        """
        Translate a large answer C{body} in a thread of L{BodyWorkers
        <openclaw.dataplane.offload.BodyWorkers>}, given with no key holder,
        as a failover's encoding is (never refused: the provider has
        answered): Gemini's translation of many tool calls is long (100,000
        C{functionCall} parts, every other client of the process held up
        as long).  The work reads only
        the body, the request and the wire, and holds its log events
        (L{HeldLog}) for the reactor's thread; its ids come from Python's
        own generator, as in the reactor's thread.

        No timer runs meanwhile (the provider's answer is whole: the
        gateway's work is not the provider's delay); a client gone or a
        stop meanwhile has ended the call (L{_over}), and the translation
        that comes back then is dropped (L{_translated_apart}).
        """
        self._cancel_timer()
        self._translating_apart = True
        wire, model, chat, generation = self.wire, self.route.model, self.chat, self._generation
        held = HeldLog()
        translated = self.context.bodies.run(lambda: wire.completion(body, model, created, chat, held))
        translated.addBoth(self._translated_apart, generation, held).addErrback(self._bug)

    def _translated_apart(self, outcome: Completion | Failure, generation: int, held: HeldLog) -> Failure | None:
        """
        The translation done in a thread (L{_translate_apart}) is back:
        its log events published, then the answer sent (L{_translated}) or
        refused (L{_untranslated}) as one translated in the reactor's
        thread is.  Dropped when the call is over meanwhile; a bug of the
        translation (any other exception) is returned for L{_bug}, over or
        not (logged, and answered 500 if not over).
        """
        held.publish()
        self._translating_apart = False
        over = self._over or generation != self._generation
        if over and self._reading_out:
            # Its client left meanwhile: the whole answer the provider
            # billed is counted with its own usage (L{_client_gone}).
            self._read_out(outcome.usage if isinstance(outcome, Completion) else None)
        if isinstance(outcome, Failure):
            refused = outcome.check(MalformedAnswer) or (
                outcome.check(orjson.JSONEncodeError) and too_deep(cast(orjson.JSONEncodeError, outcome.value))
            )
            if not refused:
                return outcome
            if not over:
                self._untranslated(cast("MalformedAnswer | orjson.JSONEncodeError", outcome.value))
            return None
        if not over:
            self._translated(outcome)
        return None

    def _untranslated(self, e: MalformedAnswer | orjson.JSONEncodeError) -> None:
        """
        A 2xx answer the wire could not translate (C{e}): a model's
        failure (L{ModelFailed}) or an answer nested too deep
        (L{too_deep}) is answered 502; any other L{MalformedAnswer} is the
        provider's failure, failed over when the call may be.  Another
        C{JSONEncodeError} is raised again (a bug).
        """
        if isinstance(e, MalformedAnswer):
            error = upstream_failed(self.route.provider_id, f"{e} (HTTP {self._answer_status})", e.code)
            if isinstance(e, ModelFailed):
                # The provider answered; its model failed.
                self._settle(CircuitBreaker.succeeded)
                return self._fail(error)
            # Not what the provider's API returns: the provider's failure.
            self._settle(CircuitBreaker.failed)
            return self._upstream_failed("broken", error)
        if not too_deep(e):
            raise e
        self._settle(CircuitBreaker.succeeded)
        return self._fail(upstream_failed(self.route.provider_id, ANSWER_TOO_DEEP, "upstream_malformed"))

    def _translated(self, completion: Completion) -> None:
        """
        Send the translated answer C{completion} (L{send_whole}), scrubbed
        of the provider's keys, its usage kept for the accounting.
        """
        answer, usage = completion
        self._settle(CircuitBreaker.succeeded)
        self._usage = usage
        if self.holder is not GATEWAY and None in known_counts(usage):
            # For the estimate (L{_consumer_usage}); never for GATEWAY_API_KEYS'.
            self._completion_bytes = answer_bytes(answer)
        # A provider may echo its key anywhere, even in an answer.
        answer = self.adapter.scrubber.data(answer)
        self._finish_call()
        request = self.request
        sent = None
        try:
            request.setResponseCode(200)
            request.setHeader(b"Content-Type", _JSON)
            request.setHeader(b"Content-Length", b"%d" % len(answer))
            self._route_headers()
            sent = send_whole(request, answer)
        finally:
            if sent is None:
                self._ended(200)
            else:
                # A large answer goes out part by part: the call counts out
                # once it was all handed over (or cut short), so that a stop
                # waits for it.
                sent.addCallback(self._sent).addErrback(self._bug)

    def _sent(self, outcome: str | None) -> None:
        """
        A large answer (L{send_whole}) is over: all handed over (C{outcome}
        None), or cut short (its client left, or took too long to read).
        """
        if outcome is None:
            self._ended(200)
        else:
            self._ended(CUT_STATUS[outcome], outcome)

    def _got_error_body(self, body: bytes, status: int, retry_after: str | None, generation: int) -> None:
        self.provider_wait.end()
        if not self._current(generation):
            return
        self._refused(status, body, retry_after)

    def _refused(
        self, status: int, body: bytes, retry_after: str | None, body_lost: str | None = None, in_stream: bool = False
    ) -> None:
        """
        The provider refused the attempt under way with C{status} and
        C{body} (a non-2xx answer, or the error event a stream began with):
        another key, failover, or the mapped error, as L{classify} reads it.

        @param body_lost: what became of an error body that never came
            whole (C{body} is then empty): the message the client gets.
        @param in_stream: C{body} is an error event of a 2xx stream, read
            as the status it stands for: the message says so (the provider
            answered 200).
        """
        adapter, key = self.adapter, self._key
        assert key is not None
        refusal = adapter.refusal(status, body, retry_after)
        if in_stream:
            refusal = attrs.evolve(
                refusal, message=f"{refusal.message} (an error event in its 200 stream, read as HTTP {status})"
            )
        if body_lost is not None:
            # Not read, so not known to be anything but the provider's own.
            refusal = attrs.evolve(refusal, message=f"its error body did not come whole: {body_lost}", stated=True)
        error = upstream_refused(
            self.route.provider_id,
            refusal,
            adapter.keys_setting,
            names_model=True,
            base_url_setting=adapter.base_url_variable,
        )
        if refusal.kind is RefusalKind.SERVER:
            self._settle(CircuitBreaker.failed)
            return self._upstream_failed("http_5xx", error)
        # Any other refusal (a bad request or model, a key refused or rate
        # limited): no verdict on the provider's completions.  Counted a
        # success, any key holder's bogus model kept the breaker closed
        # (and closed it from half-open) while every real call failed.
        self._settle(CircuitBreaker.abandoned)
        adapter.note_refusal(key, refusal, self.route.model)
        if refusal.kind is RefusalKind.RATE_LIMITED:
            return self._another_key("rate_limited", error)
        if refusal.kind is RefusalKind.AUTH:
            return self._another_key("auth", error)
        if refusal.kind is RefusalKind.ACCOUNT:
            return self._upstream_failed("account", error)
        # The request is at fault (or the answer means nothing we can act
        # on): no other key or provider would do better.
        return self._fail(error)

    def _another_key(self, reason: FallbackReason, error: APIError) -> None:
        """
        Try once more on the next usable key of this provider, else fail over
        (or answer C{error}).
        """
        keys = self.adapter.keys
        model = self.route.model
        if len(self._tried) == 1 and any(keys.usable(k, model) for k in keys.keys if k not in self._tried):
            return self._attempt(self._body)
        return self._upstream_failed(reason, error)

    def _exchange_failed(self, reason: Failure, generation: int) -> None:
        if not self._current(generation):
            return
        if self._waiting_for == _HEADERS and out_of_descriptors(reason):
            # The gateway's own limit, not the provider's failure: no
            # breaker charged, no failover (it would fail alike).
            self._settle(CircuitBreaker.abandoned)
            self.context.log.error(
                "no file descriptor free to connect to {provider} (the process's limit: ulimit -n, systemd's "
                "LimitNOFILE): the call is answered 503; raise the limit, or lower API_MAX_CONNECTIONS",
                provider=self.route.provider_id,
                **{DESCRIPTORS_FIELD: True},
            )
            return self._fail(descriptors_exhausted())
        why = self.adapter.describe(reason)
        if self._waiting_for == _HEADERS:
            # Refused, reset, unreachable: the provider's failure.  Twisted's
            # ResponseFailed: the answer began but was cut (its body, before
            # the headers were handed over).
            self._settle(CircuitBreaker.failed)
            if reason.check(ResponseFailed):
                code = STREAM_BROKEN if self.chat.stream else ANSWER_BROKEN
                return self._upstream_failed("broken", upstream_failed(self.route.provider_id, why, code))
            return self._upstream_failed("connect", upstream_failed(self.route.provider_id, why))
        if self._waiting_for == _BODY:
            # A 2xx answer cut (or too large) before any of it was sent on.
            self._settle(CircuitBreaker.failed)
            return self._upstream_failed("broken", upstream_failed(self.route.provider_id, why, ANSWER_BROKEN))
        error = upstream_failed(self.route.provider_id, why)
        if self._waiting_for == _ERROR_BODY:
            return self._error_body_lost(error)
        return self._fail(error)

    def _error_body_lost(self, error: APIError) -> None:
        """
        A non-2xx answer's body never came whole (cut, too large, too slow):
        its status and C{Retry-After} are all there is, read as the provider
        meant them, as if its body had said nothing (L{_refused}: a 5xx is
        the provider's failure, counted by the breaker and failed over when
        the call may be; a 429 rests the key and fails over; a 401 sets the
        key aside; each answer with its C{Retry-After} and
        C{X-OpenClaw-Upstream-Status}), with what became of the body as its
        message.
        """
        self._drop_attempt()
        return self._refused(self._error_status, b"", self._error_retry_after, body_lost=error.message)

    # -- failover -------------------------------------------------------------

    def _upstream_failed(self, reason: FallbackReason, error: APIError, resting: float | None = None) -> None:
        """
        This provider could not answer (C{reason}, a label of
        C{openclaw_api_fallbacks_total}): fail over if allowed, else answer
        C{error}.

        @param resting: C{error} is that every key of this provider rests,
            for so many seconds more (L{no_usable_key}): when the call
            could fail over but the fallback's keys rest too, the answer
            says so (L{_sooner_elsewhere}).

        The request is encoded for the fallback's wire (L{encode_request})
        in the reactor's thread, or, for a request whose client body was
        past L{BodyWorkers.above <openclaw.dataplane.offload.BodyWorkers.above>}
        (L{request_bytes}),
        in a thread of L{BodyWorkers <openclaw.dataplane.offload.BodyWorkers>}
        (it reads only the request and the wire); all the rest in the
        reactor's thread.  (L{_could_take}'s encodings, for a wait to
        shorten, are still done in the reactor's thread.)
        """
        context = self.context
        if self.pinned or context.fallback == "off" or self.request.startedWriting:
            return self._fail(error)
        if self._fallback is not None:
            # Failed over already: come back when the first of the route's
            # providers can take the call.
            return self._fail(self._sooner_elsewhere(error))
        target = context.providers.fallback_for(self.route.provider_id)
        if target is None:
            breaker = self.adapter.breaker.remaining() if reason == "breaker_open" else None
            answer = self._sooner_elsewhere(error, resting, breaker)
            if answer is error:
                # No wait told of the fallbacks: why none was tried is.
                answer = self._not_tried(error)
            return self._fail(answer)
        model = target.failover_model
        why_not = self._may_not_use(target.id, model)
        if why_not is not None:
            # The fallback's model is the operator's, not named to the key.
            return self._fail(_not_failed_over(error, target.id, why_not))
        chat, offered = self.chat, context.providers.offered_tools
        if self.request_bytes > context.bodies.above:
            # A large request is encoded again in a thread (as it was
            # first, L{ChatCompletions <openclaw.dataplane.resource.ChatCompletions>}):
            # Gemini's translation of many tool calls is long.
            # No timer runs meanwhile (the failed attempt's is cancelled);
            # a client gone or a stop meanwhile has ended the call (_over).
            self._cancel_timer()
            encoded = context.bodies.run(lambda: encode_request(target.wire, chat, model, target.id, offered))
            encoded.addCallbacks(
                lambda body: None if self._over else self._fail_over(reason, error, target, model, body),
                self._not_encoded,
                errbackArgs=(error, target),
            ).addErrback(self._bug)
            return None
        try:
            body = encode_request(target.wire, chat, model, target.id, offered)
        except APIError as refused:
            return self._not_taken(refused, error, target)
        return self._fail_over(reason, error, target, model, body)

    def _not_encoded(self, failure: Failure, error: APIError, target: ProviderAdapter) -> None:
        """
        The fallback's encoding, done in a thread, failed: L{_not_taken}
        for its refusal (an L{APIError}), unless the call is over meanwhile
        (its client gone, a stop); anything else is raised again, over or
        not, for L{_bug} to log (a bug of the encoding, which was swallowed
        once the call was over).
        """
        failure.trap(APIError)
        if self._over:
            return None
        return self._not_taken(cast(APIError, failure.value), error, target)

    def _not_taken(self, refused: APIError, error: APIError, target: ProviderAdapter) -> None:
        """
        A request the first provider takes but the fallback C{target}
        cannot (C{refused}: one of Gemini's own limits): the first
        provider's failure C{error} is the answer, and no failover
        happened.
        """
        self.context.log.info(
            "call not failed over {origin} -> {target}: {target} cannot take the request ({why})",
            origin=self.route.provider_id,
            target=target.id,
            why=refused.message,
        )
        return self._fail(_not_failed_over(error, target.id, f"it cannot take this request: {refused.message}"))

    def _fail_over(
        self, reason: FallbackReason, error: APIError, target: ProviderAdapter, model: str, body: bytes
    ) -> None:
        """
        Send the call to C{target}'s C{model}, C{body} its request in
        C{target}'s wire (L{_upstream_failed}), this provider's failure
        C{error} (for C{reason}) kept to be told if that fails too.
        """
        context = self.context
        origin = self.route.provider_id
        self._fallback = (origin, target.id, reason)
        # Scrubbed of this provider's keys now: _fail scrubs with the
        # fallback's.
        self._origin_failure = amended(error, self.adapter.scrubber.text)
        self._origin_error = error
        self._origin = (self.adapter, self.route)
        context.failed_over(origin, target.id, reason, error.code, self.holder.consumer, request_id_of(self.request))
        self._origin_called = origin if self._tried else None
        self.adapter, self.wire, self.route = target, target.wire, Route(target.id, model)
        self._tried = []
        return self._attempt(body)

    def _sooner_elsewhere(
        self, error: APIError, resting: float | None = None, breaker: float | None = None
    ) -> APIError:
        """
        C{error}, when no provider could take the call now, with the
        soonest wait of those that could later (L{sooner_elsewhere}): the
        ones the call could be failed over to (L{_could_take}: the key
        holder may use them, and they can take the request).

        @param resting: C{error} is that every key of the call's provider
            rests, for so many seconds more: when every key of a fallback
            rests too, the answer says so of both, with the earliest wait
            (L{every_key_resting}), not the first provider's alone.
        @param breaker: C{error} is that the breaker of the call's provider
            is open, for so many seconds more: when the breaker of every
            provider it could fail over to is open too, the answer says so
            of them all, with the earliest wait (L{every_breaker_open}).
        """
        if resting is None and error.retry_after is None:
            # No wait to shorten (a 502, a timeout): no request encoded
            # for a fallback (L{_could_take}).
            return error
        # Soonest first: the first that could take the call is the answer.
        judged = self._judged_models()
        waits = sorted(
            self.context.providers.fallback_waits(self.route.provider_id, judged), key=lambda entry: entry[1]
        )

        def usable(adapter: ProviderAdapter) -> int:
            return adapter.keys.available_for(judged.get(adapter.id, adapter.failover_model))

        if resting is not None:
            rested = [
                (adapter.id, wait, adapter.keys.resting_model(judged.get(adapter.id, adapter.failover_model)))
                for adapter, wait in waits
                if not usable(adapter) and self._could_take(adapter)
            ]
            if rested:
                error = every_key_resting(
                    self.route.provider_id, resting, rested, self.adapter.keys.resting_model(self.route.model)
                )
            # Those that wait for another reason (an open breaker).
            waits = [(adapter, wait) for adapter, wait in waits if usable(adapter)]
        elif breaker is not None and waits and all(usable(adapter) for adapter, _ in waits):
            # Every provider the call could go to waits for its breaker too
            # (none rests for a 429): said of them all.
            failing = [(adapter.id, wait) for adapter, wait in waits if self._could_take(adapter)]
            if failing:
                return every_breaker_open(self.route.provider_id, breaker, failing)
        for adapter, wait in waits:
            if self._could_take(adapter):
                return sooner_elsewhere(error, adapter.id, wait)
        return error

    def _judged_models(self) -> dict[str, str]:
        """
        The model a provider's keys are judged by for this call where it is
        not the provider's C{failover_model}: after a failover, the first
        provider's is the model the call asked of it (a Gemini key rests by
        model; the fallback model may be free while it rests).
        """
        if self._origin is None:
            return {}
        _, route = self._origin
        return {route.provider_id: route.model}

    def _not_tried(self, error: APIError) -> APIError:
        """
        C{error}, saying of each provider the call could have failed over
        to (L{ProviderRegistry.fallback_waits}, L{_could_take}) why it was
        not tried: its breaker open (for so many seconds more) or its
        half-open trial under way, or every key it holds rate limited
        (for so many seconds more).  A 502 that named the first
        provider's failure alone read as if no failover were set up; a 429 or 503 with a wait says so already
        (L{_sooner_elsewhere}).  Only asked once no provider could take
        the call (L{_upstream_failed}), never on the way of a call that
        goes.  A request past L{BodyWorkers.above
        <openclaw.dataplane.offload.BodyWorkers.above>} is not encoded for
        each to ask (in the reactor's thread, a long translation): each
        whose breaker or keys kept it out is named.
        """
        large = self.request_bytes > self.context.bodies.above
        judged = self._judged_models()
        for adapter, wait in self.context.providers.fallback_waits(self.route.provider_id, judged):
            model = judged.get(adapter.id, adapter.failover_model)
            usable = adapter.keys.available_for(model)
            if usable and adapter.breaker.would_allow():
                continue
            if not large and not self._could_take(adapter):
                continue
            unchecked = "; whether it could take this request was not checked" if large else ""
            if not usable:
                rested = adapter.keys.resting_model(model)
                scope = "" if rested is None else f" for {rested}"
                why = (
                    f"every key the gateway holds for it is rate limited{scope} for {retry_after_seconds(wait)} s more"
                )
            elif adapter.breaker.state is BreakerState.OPEN:
                why = (
                    f"it has been failing too, and its breaker is open for {retry_after_seconds(wait)} s more "
                    "(BREAKER_COOLDOWN_SECONDS)"
                )
            else:
                why = "it has been failing too, and its breaker's one trial call (half-open) is under way"
            error = _not_failed_over(error, adapter.id, why + unchecked)
        return error

    def _could_take(self, adapter: ProviderAdapter) -> bool:
        """
        Whether the call could be failed over to C{adapter} once it takes
        calls again: its key holder may use its fallback model
        (L{ConsumerTable.may_not_use}), and its wire can encode the request
        (L{encode_request}, as L{_upstream_failed} checks before failing
        over: Gemini refuses a C{video_url} part, an C{ms://} image,
        Moonshot's built-in tools, a non-zero C{logit_bias},
        C{web_search_options}).  A wait told for a provider that could not
        take the call would only get the client the same refusal then
        ("gemini may take the call in 45 s", then "not failed
        over to gemini: it cannot take this request").

        Only asked while a 429 or 503 with a wait to shorten is being
        built (L{_sooner_elsewhere}), soonest provider first, until one
        could, or once no provider could take the call and the answer
        says why none was tried (L{_not_tried}): the request is not
        encoded again on the way of a call that goes.
        """
        model = adapter.failover_model
        consumers = self.context.consumers
        if consumers is not None and consumers.may_not_use(self.holder, adapter.id, model) is not None:
            return False
        try:
            encode_request(adapter.wire, self.chat, model, adapter.id, self.context.providers.offered_tools)
        except APIError:
            return False
        return True

    def _may_not_use(self, provider_id: str, model: str) -> str | None:
        """
        Why the call's key holder may not be failed over to
        C{provider_id/model} (L{ConsumerTable.may_not_use}: a consumer only
        within its C{models}, and with a budget only to a priced model),
        or None: a failover never answers a key from a model it may not
        call, nor one its budget cannot count.
        """
        consumers = self.context.consumers
        why = None if consumers is None else consumers.may_not_use(self.holder, provider_id, model)
        if why is not None:
            self.context.log.info(
                "call not failed over {origin} -> {target}: consumer {consumer}: {why}",
                origin=self.route.provider_id,
                target=provider_id,
                why=why,
                consumer=self.holder.consumer,
            )
        return why

    # -- streaming ----------------------------------------------------------

    def _start_stream(self, response: IResponse) -> None:
        """
        Read the 2xx stream; the client's status line and headers wait for
        its first translated event that begins the answer (L{stream_data},
        L{_open_stream}), so that a stream that fails before it is
        answered, and failed over, like any failed attempt.
        """
        self._waiting_for = None
        if self._start is None:
            # One per call: an attempt dropped leaves it as new (_drop_attempt).
            self._start = StreamStart(MAX_HELD_BYTES, MAX_HELD_SECONDS)
        created = int(self.context.reactor.seconds())
        translation = self._translation = self.wire.stream(self.chat, self.route.model, created)
        self._progress = 0
        self._relay = _StreamRelay(self, translation)
        self.provider_wait.begin()
        response.deliverBody(self._relay)

    def _open_stream(self, answered: bool = True) -> None:
        """
        The stream's first event that begins the answer (L{stream_data}),
        or its end, has come (L{StreamStart.sent}): the provider has
        answered (the breaker's verdict), and the client's status line and
        headers go out with it.

        @param answered: the answer has begun (its time is the time to the
            first token); not for a stream held too much or too long before
            it did (L{StreamStart.first_token_due}).
        """
        self._settle(CircuitBreaker.succeeded)
        if answered:
            self.context.costs.first_token(self.route.provider_id, self.context.reactor.seconds() - self.started)
        request = self.request
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", _EVENT_STREAM)
        request.setHeader(b"Cache-Control", b"no-cache")
        # Tell buffering reverse proxies (nginx) to pass events on at once.
        request.setHeader(b"X-Accel-Buffering", b"no")
        self._route_headers()

    def stream_data(
        self, events: bytes, translation: StreamTranslation, decoded: bool = True, begun: bool | None = None
    ) -> None:
        """
        The relay has events for the client.  Written at once, once the
        stream has begun its answer (L{StreamTranslation.answer_begun}: text,
        reasoning, a tool call, a finish reason).  Until then they are held
        back (L{StreamStart}: Moonshot's first chunk, a role and C{""};
        Gemini's C{{"text": ""}}), with the status line and headers, and
        sent ahead of the first chunk that has, or at the stream's end
        (L{_close_stream}), or once held past L{MAX_HELD_BYTES} or
        L{MAX_HELD_SECONDS}: an error, a cut or a stall after them is a
        stream that failed before its answer started (L{stream_broken},
        L{stream_ended}, L{_timed_out}), answered, failed over and
        counted by the breaker like any failed attempt.

        @param decoded: at least one whole upstream event was decoded: only
            then, and if they bring C{events} for the client, does the wait
            for the next one start again (a trickle of comments, partial
            lines or events that translate to nothing does not hold a
            stream open).
        @param begun: whether the answer had begun with these events, as
            the relay saw it (an event that failed its checks after them
            does not count); None: the translation's
            L{StreamTranslation.answer_begun}.
        """
        if events and self.holder is not GATEWAY:
            self._completion_bytes += chunk_bytes(events)
        if self._over:
            return
        assert self._timer is not None
        progress = translation.progress
        if decoded and progress != self._progress and not self._client_paused:
            self._progress = progress
            # Only the answer puts the wait off: events that carry nothing
            # of it (a role, empty deltas: Moonshot's; Gemini's empty text,
            # a usage; an empty chunk) are no sign of more coming, as a
            # comment is not, held or sent, before the answer began or
            # after (such
            # events every 2 s held a client, with no byte or with a 200
            # and empty deltas, for as long as the provider went on).
            self._timer.reset(self._upstream_wait())
        if events:
            events = self.adapter.scrubber.data(events)
            start = self._start
            assert start is not None
            if not start.sent:
                if translation.answer_begun if begun is None else begun:
                    events = start.begin(events)
                    self._open_stream()
                else:
                    events = start.hold(events, self.context.reactor.seconds())
                    if start.sent:
                        self._open_stream(answered=False)
            elif start.first_token_due and translation.answer_begun:
                start.first_token_due = False
                start.waiting_for = NEXT_EVENT
                self.context.costs.first_token(self.route.provider_id, self.context.reactor.seconds() - self.started)
            if events:
                self.request.write(events)
        if translation.ended:
            self._close_stream(translation)
        elif decoded and translation.finished and not self._client_paused:
            # Whole already: the body's end (Gemini's only end marker)
            # is waited for a short while, not UPSTREAM_TIMEOUT.
            self._timer.reset(self._upstream_wait())

    def stream_ended(self, reason: Failure, translation: StreamTranslation) -> None:
        """
        The upstream body is over, whole or not.  An answer every choice
        of which has finished is whole however its body ended (Gemini's
        connection cut after its last finishReason: the answer was all in).
        """
        if self._over:
            return
        if translation.finished:
            return self._close_stream(translation, drain=False)
        code = STREAM_BROKEN
        why: str | Explained
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            if translation.complete:
                return self._close_stream(translation)
            why = "the stream ended before the answer was complete"
            if self._answer_type == _JSON and (self._relay is None or not self._relay.events):
                # No event at all, and a JSON document said it was one.
                why = "the provider answered a stream request with a JSON document, not an event stream"
                code = "upstream_malformed"
        else:
            broke = "mid-answer" if self._stream_sent() else "before its answer began"
            explained = self.adapter.describe(reason)
            why = Explained(
                f"the stream broke {broke}: {explained.client}", f"the stream broke {broke}: {explained.operator}"
            )
        error = upstream_failed(self.route.provider_id, why, code)
        if not self._stream_sent():
            return self._attempt_failed("broken", error)
        self._fail(error)

    def stream_broken(
        self, why: str, code: str = STREAM_BROKEN, event: bytes | None = None, provider_fault: bool = True
    ) -> None:
        """
        An upstream event was an error (C{code} L{STREAM_ERROR}) or
        unreadable (L{STREAM_BROKEN}, the default): end the stream here.
        Before its first event reached the client, the attempt failed as a
        non-2xx answer would have: an error C{event} is read as the status
        it stands for (L{error_event_status}) and refused as such
        (L{_refused}); an unreadable stream is the provider's failure
        (C{provider_fault}); a model's failure is an answer.
        """
        if self._over:
            return
        error = upstream_failed(self.route.provider_id, why, code)
        if self._stream_sent():
            return self._fail(error)
        status = None if event is None else error_event_status(event, self.adapter.error_statuses)
        if status is not None:
            assert event is not None
            self._drop_attempt()
            return self._refused(status, event, None, in_stream=True)
        if provider_fault:
            return self._attempt_failed("broken", error)
        self._settle(CircuitBreaker.succeeded)
        return self._fail(error)

    def _drop_attempt(self) -> None:
        """
        Let the attempt under way go: nothing more of its answer is read
        (its connection dropped), and nothing of it reached the client.
        """
        self._generation += 1
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        relay, self._relay = self._relay, None
        if relay is not None:
            relay.stop()
        self._translation = None
        # What it held back is not the next attempt's answer.
        if self._start is not None:
            self._start.drop()
        # The next attempt's stream starts unpaused.
        self._client_paused = False

    def _attempt_failed(self, reason: FallbackReason, error: APIError) -> None:
        """
        The attempt under way failed on the provider's side before anything
        of it reached the client: the breaker counts it, and the call fails
        over (C{reason}) or answers C{error}.
        """
        self._drop_attempt()
        self._settle(CircuitBreaker.failed)
        return self._upstream_failed(reason, error)

    def _close_stream(self, translation: StreamTranslation, drain: bool = True) -> None:
        """
        End the client's stream as whole: the closing chunks and C{[DONE]}.

        @param drain: let the upstream body end by itself (it is about
            over: its connection goes back to the pool), else drop its
            connection now.
        """
        try:
            closing = b"".join(encode(payload) for payload in translation.closing())
        except orjson.JSONEncodeError as e:
            if not too_deep(e):
                raise
            return self.stream_broken(ANSWER_TOO_DEEP, "upstream_malformed", provider_fault=False)
        start = self._start
        assert start is not None
        opened = start.sent
        if not opened:
            if not closing and (self._relay is None or not self._relay.events):
                # [DONE] and nothing before it: no answer at all, the
                # provider's failure like any stream without a first event.
                why = "the stream ended ([DONE]) without a single event"
                return self._attempt_failed("broken", upstream_failed(self.route.provider_id, why, STREAM_BROKEN))
            if not translation.answer_begun:
                # [DONE] after events that carried nothing of the answer
                # (a role, empty text, a usage) and no finish reason: OpenAI
                # ends every choice with one, an empty answer included.
                why = "the stream ended ([DONE]) before its answer began: no text, tool call or finish reason"
                return self._attempt_failed("broken", upstream_failed(self.route.provider_id, why, STREAM_BROKEN))
        # What was held back (a role alone: an answer with no text) goes first.
        held = start.end()
        if not opened:
            self._open_stream()
        # After [DONE] the upstream body is about over: let it end by itself,
        # so its connection goes back to the pool rather than being dropped.
        self._finish_call(drain=drain)
        try:
            self.request.write(held + closing + _DONE_EVENT)
            self.request.finish()
        finally:
            self._ended(200)

    # -- endings ---------------------------------------------------------------

    def client_paused(self) -> None:
        """
        The client's connection takes no more of the stream for now (its
        buffers are full; the upstream read is paused with it): until it
        resumes (L{client_resumed}), the provider's time limit is off and
        the client has C{API_SEND_TIMEOUT_SECONDS} to take all that was
        written, else L{_send_timed_out}.
        """
        if self._over or self._client_paused or self._timer is None:
            return
        self._client_paused = True
        self._timer.reset(self._send_timeout())

    def client_resumed(self) -> None:
        """
        The client's connection takes the stream again: the provider's
        time limit (UPSTREAM_TIMEOUT) runs again, in full.
        """
        if not self._client_paused:
            return
        self._client_paused = False
        if not self._over and self._timer is not None:
            self._timer.reset(self._upstream_wait())

    def _upstream_wait(self) -> float:
        """
        How long the provider's stream may now go without an event:
        UPSTREAM_TIMEOUT, or L{COMPLETE_STREAM_GRACE_SECONDS} once every
        choice has finished (its body's end is all that may be missing).
        """
        translation = self._translation
        context = self.context
        timeout = context.timeout
        if translation is not None and translation.finished:
            timeout = min(timeout, COMPLETE_STREAM_GRACE_SECONDS)
        # A stream lasts UPSTREAM_STREAM_MAX_SECONDS at most (L{_timed_out}).
        return max(0.0, min(timeout, self.started + context.stream_max_seconds - context.reactor.seconds()))

    def _send_timeout(self) -> float:
        """
        C{API_SEND_TIMEOUT_SECONDS}, from the limits of the request's site
        (L{openclaw.dataplane.site.APIRequest.api_site}); UPSTREAM_TIMEOUT
        for a request that came on no such site.
        """
        site = getattr(self.request, "api_site", None)
        return self.context.timeout if site is None else float(site.limits.send_timeout)

    def _body_received(self) -> int:
        """
        The bytes of the body being read (L{BodyReader.received}), else 0.
        """
        pending = self._pending
        return pending.received if isinstance(pending, BodyReader) else 0

    def _send_timed_out(self) -> None:
        """
        The client had not taken all that was written of the stream within
        C{API_SEND_TIMEOUT_SECONDS}: its fault, not the provider's (no
        verdict on its breaker).  The upstream connection is dropped, the
        client's aborted (an HTTP/2 stream reset; no error can reach a
        client that does not read), and the call counted 408
        C{send_timeout}, as a large answer in one piece is
        (L{openclaw.dataplane.answer.WholeAnswer}).
        """
        self._finish_call()
        request = self.request
        try:
            abort(request)
        finally:
            self._ended(CUT_STATUS[SEND_TIMEOUT], SEND_TIMEOUT)

    def _timed_out(self) -> None:
        reactor = self.context.reactor
        if self._catching_up is None:
            self._catching_up = CatchingUp(self._body_received)
        if self._catching_up.put_off(self._timer, reactor):
            # The loop stood still: the provider's answer may be waiting,
            # unread, in its socket; judged after it is read
            # (L{openclaw.stalls.CatchingUp}), not charged to the
            # provider's breaker for the gateway's own stall.
            self._timer = reactor.callLater(0, self._timed_out)
            return
        self._timer = None
        if self._client_paused:
            return self._send_timed_out()
        translation = self._translation
        if translation is not None and translation.finished:
            # Every choice finished; only the body's end did not come
            # (L{COMPLETE_STREAM_GRACE_SECONDS}): the answer is whole,
            # and the provider's connection is let go at once.
            return self._close_stream(translation, drain=False)
        if self._stream_sent() and self._stream_too_long():
            # A provider that goes on sending (a model looping, a proxy
            # feeding events): cut, told in the stream.  One that has sent
            # nothing of an answer yet is a stall (below: failed over, or
            # a 504), whatever UPSTREAM_STREAM_MAX_SECONDS says.
            return self._fail(stream_too_long(self.route.provider_id, self.context.stream_max_seconds))
        waiting_for = self._waiting_for
        if waiting_for is None:
            assert self._start is not None
            waiting_for = self._start.waiting_for
        error = upstream_timeout(self.route.provider_id, self.context.timeout, waiting_for)
        if waiting_for == _ERROR_BODY:
            return self._error_body_lost(error)
        if self._stream_sent():
            # A stream stalled mid-answer: told in the stream (the breaker
            # had its verdict at the first event).
            return self._fail(error)
        # No headers, no whole body, no first event in time: the provider's
        # failure, nothing of it sent on; let this attempt go.
        return self._attempt_failed("timeout", error)

    def _stream_too_long(self) -> bool:
        """
        The stream has lasted UPSTREAM_STREAM_MAX_SECONDS since the request
        came (L{_upstream_wait} bounds every wait by that).
        """
        context = self.context
        # As L{_upstream_wait} reckons the deadline (not now - started,
        # which a float can make a hair short of it).
        return context.reactor.seconds() >= self.started + context.stream_max_seconds

    def shut_down(self) -> None:
        """
        The gateway is stopping and its grace period is over: answer 503
        C{shutting_down} (as the stream's last event once it has started).
        A stream whose answer is whole already (every choice finished, its
        usage in: only the body's end, C{[DONE]}, is still to come) ends as
        whole instead, as L{stream_ended} ends it: the client has the whole
        answer, and a consumer is charged for it, so it is not told to
        retry it.
        """
        if self._over:
            return
        translation = self._translation
        if translation is not None and self._stream_sent() and translation.finished:
            return self._close_stream(translation, drain=False)
        self._fail(shutting_down())

    def _stream_sent(self) -> bool:
        """
        Something of the call's stream (its status line and headers with
        it) has reached the client (L{StreamStart.sent}): a failure now
        can only be told in the stream.
        """
        return self._start is not None and self._start.sent

    def _client_gone(self, reason: Failure) -> None:
        if self._over:
            return
        # No verdict on the provider (given by _finish_call): a half-open
        # trial is free again.
        relay = self._relay
        if relay is not None and self.reads_out():
            # The relay goes on (see _read_out); _finish_call leaves it be.
            self._relay, self._reading_out = None, True
            self._finish_call()
            self._ended(CLIENT_GONE_STATUS, CLIENT_GONE)
            relay.read_out(self.context.reactor, self._upstream_wait(), self._read_out)
            return
        if self._translating_apart and self.holder is not GATEWAY and self.context.consumers is not None:
            # A consumer's whole answer in translation (counted
            # as its prompt's estimate only): counted with its usage once
            # translated (L{_translated_apart}).
            self._reading_out = True
        self._finish_call()
        self._ended(CLIENT_GONE_STATUS, CLIENT_GONE)

    def reads_out(self) -> bool:
        """
        Whether the rest of this stream is read after its client left: a
        consumer's stream whose usage has not come yet, so that leaving
        early (say, after the chunk with C{finish_reason}) does not dodge
        its tpm and budget.  Bounded by UPSTREAM_TIMEOUT.
        """
        translation = self._translation
        return (
            self.holder is not GATEWAY
            and self.context.consumers is not None
            and translation is not None
            and translation.usage is None
            and not self._over
        )

    def _read_out(self, usage: Any = None) -> None:
        """
        The stream read after its client left is over (or timed out), or
        the whole answer translated after it left: count the call with its
        usage (the stream's, else C{usage}), or the estimate.
        """
        if self._translation is not None:
            usage = self._translation.usage
        self.context.costs.tokens(self.route.provider_id, self.route.model, usage)
        consumers = self.context.consumers
        if consumers is not None:
            consumers.account(
                self.holder,
                self.route.provider_id,
                self.route.model,
                CLIENT_GONE_STATUS,
                self._consumer_usage(usage, CLIENT_GONE_STATUS),
                self.context.reactor.seconds() - self.started,
            )

    def _consumer_usage(self, usage: Any, status: int) -> Any:
        """
        The usage a consumer is counted for: the call's own when known
        (its C{prompt_tokens} and C{completion_tokens} both counts,
        L{known_counts}); with one of them known, that one and the other's
        estimate; with neither (no usage, or one the gateway cannot read,
        such as C{"10"}), the estimate of L{openclaw.consumers.estimate}
        when the call produced text or its client left once it was sent,
        else None.  What the client got is not changed.
        """
        if self.holder is GATEWAY:
            return usage
        prompt, completion = known_counts(usage)
        if prompt is not None and completion is not None:
            return usage
        if (
            prompt is None
            and completion is None
            and not self._completion_bytes
            and not (status == CLIENT_GONE_STATUS and self._tried)
        ):
            return None
        if prompt is None:
            # What it reserved for its prompt: its text, tools, schema and
            # the chat template's tokens (L{prompt_tokens}).
            prompt = prompt_tokens(self.chat.body)
        estimate = estimated_usage(0, self._completion_bytes, prompt, completion)
        # The details the provider gave (reasoning, cached prompt) still count.
        return {**usage, **estimate} if isinstance(usage, dict) else estimate

    def _fail(self, error: APIError) -> None:
        """
        Answer with C{error}: as the response if none has started, else as
        the stream's last event.  A call failed over that fails again
        before its response started says both failures: the first
        provider's, then the fallback's (C{error}, whose status, code and
        headers the answer keeps, with C{X-OpenClaw-Fallback}), unless the
        fallback refused the request itself (a 4xx but 429: its model
        retired, a request it does not take): then the first provider's
        failure is the answer's status, code and headers (its
        C{Retry-After}), and its route the answer's (headers, log line,
        metrics, usage row), which a client may retry, not a 400 or 404
        for a request the first provider took.
        """
        self._finish_call()
        request = self.request
        failed = self._origin_failure
        if failed is not None and self._fallback is not None and not request.startedWriting:
            told, how = error, ""
            origin, first = self._origin_error, self._origin
            if origin is not None and first is not None and 400 <= error.status < 500 and error.status != 429:
                # The first provider's failure is the answer: its route in
                # the headers, the log and the accounting; the fallback's
                # words scrubbed of its own keys before they go.
                told, how = amended(error, self.adapter.scrubber.text), ", which refused it"
                error = origin
                self.adapter, self.route = first
                self.wire = self.adapter.wire
            both = f"; failed over to {self._fallback[1]}{how}: "
            detail = None
            if failed.detail is not None or told.detail is not None:
                detail = for_operator(failed) + both + for_operator(told)
            error = attrs.evolve(error, message=failed.message + both + told.message, detail=detail)
        # Every error of a call may quote the provider (its message, a
        # stream's error event): scrubbed here, where none can be missed,
        # of its keys and of its address (Scrubber.quoted).
        scrub = self.adapter.scrubber.quoted
        try:
            if request.startedWriting:
                request.write(scrub(encode(error.body())))
            else:
                body = scrub(error.body())
                request.setResponseCode(error.status)
                request.setHeader(b"Content-Type", _JSON)
                request.setHeader(b"Content-Length", b"%d" % len(body))
                for name, value in error.headers:
                    request.setHeader(name, value)
                self._route_headers()
                request.write(body)
            request.finish()
        finally:
            # Its message for the log line (a 5xx's), as scrubbed as its body.
            self._ended(error.status, error.code, amended(error, self.adapter.scrubber.text))

    def _finish_call(self, drain: bool = False) -> None:
        """
        Stop everything still running for this call: nothing more is
        written to the client after what the caller writes now.

        @param drain: leave the upstream body to end by itself (within the
            time limit) instead of dropping its connection.
        """
        self._over = True
        # An attempt that ends here with no verdict on the provider (its
        # client left, the gateway stops, a bug) gives its permission back.
        if self._permit is not None:
            self._settle(CircuitBreaker.abandoned)
        self._cancel_timer()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        if self._relay is not None:
            if drain:
                # A body whose answer is whole ends at once; one that
                # lingers (a connection kept open after [DONE]) is dropped.
                self._relay.drain(self.context.reactor, min(self.context.timeout, COMPLETE_STREAM_GRACE_SECONDS))
            else:
                self._relay.stop()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _ended(self, status: int, outcome: str | None = None, error: APIError | None = None) -> None:
        """
        The client has all it will get: count the call out (last, so that a
        stop waiting on it closes the connection only after the answer) and
        log it (with C{error}, the error answered, if any).
        """
        now = self.context.reactor.seconds()
        seconds = now - self.started
        self._count_costs(status, now)
        self.context.chat_calls.discard(self)
        self.context.call_ended()
        # The provider called last (the metrics' label), "-" if none was.
        called = self.route.provider_id if self._tried else self._origin_called or "-"
        self.context.completed(
            self.request,
            self.started,
            status,
            self.route,
            self.chat.stream,
            outcome,
            self.holder.consumer,
            seconds,
            called,
            error,
        )

    def _count_costs(self, status: int, now: float) -> None:
        """
        Count the call's usage (a whole answer's, or a stream's final one),
        read once for the token metrics and the consumer's accounting, and
        the gateway's own time: all of it (up to C{now}) but the waits on
        the provider.
        """
        costs = self.context.costs
        provider, model = self.route.provider_id, self.route.model
        usage = self._usage if self._translation is None else self._translation.usage
        tokens = usage_counts(usage)
        costs.count_tokens(provider, model, *tokens[:3])
        wait = self.provider_wait
        wait.end(now)
        seconds = now - self.started
        consumers = self.context.consumers
        if consumers is not None and not self._reading_out:
            consumer_usage = self._consumer_usage(usage, status)
            if consumer_usage is not usage:
                tokens = usage_counts(consumer_usage)
            consumers.account_tokens(self.holder, provider, model, status, tokens, seconds)
        costs.overhead(seconds - wait.waited)

    def _route_headers(self) -> None:
        self.request.setHeader(PROVIDER_HEADER, self.route.provider_id.encode())
        self.request.setHeader(b"X-OpenClaw-Model", self.route.model.encode())
        if self._fallback is not None:
            origin, target, reason = self._fallback
            self.request.setHeader(FALLBACK_HEADER, f"{origin}->{target}; reason={reason}".encode())

    def translation_failed(self, reason: Failure) -> None:
        """
        Translating the provider's stream raised (a bug of the gateway's,
        L{_StreamRelay}): logged with its traceback, the attempt let go
        with no verdict on the provider, and the call answered as any
        other bug (L{_bug}).
        """
        self._bug(reason)

    def _bug(self, reason: Failure) -> None:
        self.context.log.failure("chat call failed unexpectedly", reason)
        if not self._over:
            self._fail(internal_error())


class _StreamRelay(Protocol):
    """
    Receives the upstream body as it arrives, decodes its events and hands
    the translated ones to the call.  Its transport is the upstream
    connection: registered as the client response's producer, a slow client
    slows the upstream read instead of filling memory.
    """

    def __init__(self, call: ChatCall, translation: StreamTranslation) -> None:
        self._call = call
        self._translation = translation
        self._decoder = SSEDecoder()
        #: The call wants nothing more from this body.
        self._stopped = False
        self._drain_timer: IDelayedCall | None = None

    #: Called once the body is over, when read after the client left.
    _then: Callable[[], object] | None = None
    #: The events decoded so far, C{[DONE]} aside (whether or not their
    #: translation gave the client anything: a usage-only chunk is one).
    events = 0

    #: The producer this body registered with the client's request, until
    #: released: a failed attempt's body must not unregister the next one's.
    _registered: IPushProducer | None = None

    def connectionMade(self) -> None:
        self._registered = _ClientSide(self, self._call)
        self._call.request.registerProducer(self._registered, True)

    def dataReceived(self, data: bytes) -> None:
        if self._stopped:
            return
        # The wait on the provider ends here, and starts again once these
        # events are sent on.
        wait = self._call.provider_wait
        wait.end()
        try:
            self._translate(data)
        finally:
            wait.begin()

    def _translate(self, data: bytes) -> None:
        translation = self._translation
        out: list[bytes] = []
        #: The event being translated, for an error it turns out to be.
        current: bytes | None = None
        #: Whether the answer had begun before it: an event that fails its
        #: checks may have said it did (a choice's text, then a bad tool
        #: call), and the events before it are handed on as they were.
        begun = translation.answer_begun
        try:
            for event in self._decoder.feed(data):
                current = event.data
                if current != DONE:
                    self.events += 1
                begun = translation.answer_begun
                out.extend(encode(payload) for payload in translation.payloads(event))
                if translation.ended:
                    break
        except SSEError as e:
            if out:
                self._call.stream_data(b"".join(out), translation, begun=begun)
            self._call.stream_broken(str(e))
            return
        except StreamBroken as e:
            if out:
                self._call.stream_data(b"".join(out), translation, begun=begun)
            # An unreadable stream is the provider's failure; any other
            # code is its model's (Gemini's MALFORMED_FUNCTION_CALL).
            fault = e.code in (STREAM_BROKEN, STREAM_ERROR, "upstream_malformed")
            self._call.stream_broken(str(e), e.code, current, fault)
            return
        except Exception as e:
            if out:
                self._call.stream_data(b"".join(out), translation, begun=begun)
            if isinstance(e, orjson.JSONEncodeError) and too_deep(e):
                self._call.stream_broken(ANSWER_TOO_DEEP, "upstream_malformed", provider_fault=False)
            else:
                # The gateway's own fault, not the provider's: left to
                # escape, Twisted's HTTP client would drop the connection
                # and the call would read it as the stream cut short (no
                # traceback, the provider's breaker counting it).
                self._call.translation_failed(Failure())
            return
        # Only a whole event starts the wait for the next one again.
        self._call.stream_data(b"".join(out), translation, decoded=current is not None)
        timer = self._drain_timer
        if self._then is not None and translation.finished and timer is not None and timer.active():
            # Read out for its usage (its client gone): the answer is whole,
            # so its body's end is not waited for long.
            timer.reset(COMPLETE_STREAM_GRACE_SECONDS)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._call.provider_wait.end()
        self._release()
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        if not self._stopped:
            self._stopped = True
            self._call.stream_ended(reason, self._translation)
        then, self._then = self._then, None
        if then is not None:
            then()

    @property
    def producer(self) -> IPushProducer:
        """
        The upstream body's transport: an L{IPushProducer}
        (L{IResponse.deliverBody}); stopping it drops the connection.
        """
        assert self.transport is not None, "no body delivered yet"
        return cast(IPushProducer, self.transport)

    def stop(self) -> None:
        """
        No more of this body is wanted: drop the upstream connection (a
        no-op once the body is over).
        """
        self._release()
        if not self._stopped:
            self._stopped = True
            self.producer.stopProducing()

    def drain(self, reactor: IReactorTime, timeout: float) -> None:
        """
        Nothing more of this body is wanted, but let it end by itself, and
        drop it only if it has not within C{timeout} seconds.
        """
        self._release()
        if not self._stopped:
            self._stopped = True
            self._drain_timer = reactor.callLater(timeout, self.producer.stopProducing)

    def read_out(self, reactor: IReactorTime, timeout: float, then: Callable[[], object]) -> None:
        """
        The client is gone but the call wants this body's usage: go on
        translating it (nothing is written) until it ends, or for
        C{timeout} seconds at most; then call C{then()}.
        """
        self._then = then
        self.producer.resumeProducing()
        self._drain_timer = reactor.callLater(timeout, self.producer.stopProducing)

    def _release(self) -> None:
        registered, self._registered = self._registered, None
        request = self._call.request
        # Only this body's own registration (a later attempt's stays); once
        # the client is gone its channel is too, and with it the
        # registration.
        if registered is not None and request.producer is registered and request.channel is not None:
            request.unregisterProducer()


@implementer(IPushProducer)
class _ClientSide:
    """
    The upstream body as the client's connection sees it (its producer):
    pausing and resuming pass through, and tell the call, whose timer runs
    the client's send deadline while paused (L{ChatCall.client_paused}); a
    stop, when the client's connection is lost, drops the upstream
    connection unless the call reads the rest of the stream
    (L{ChatCall.reads_out}).
    """

    def __init__(self, relay: _StreamRelay, call: ChatCall) -> None:
        self._relay = relay
        self._call = call

    def pauseProducing(self) -> None:
        self._relay.producer.pauseProducing()
        self._call.client_paused()

    def resumeProducing(self) -> None:
        self._call.client_resumed()
        self._relay.producer.resumeProducing()

    def stopProducing(self) -> None:
        if not self._call.reads_out():
            self._relay.producer.stopProducing()


def _not_failed_over(error: APIError, target: str, why: str) -> APIError:
    """
    C{error}, saying why the call was not failed over to C{target}: the
    client sees the failover that did not happen, not only the log.
    """
    return amended(error, lambda text: f"{text} (not failed over to {target}: {why})")
