"""
One chat call carried to a provider and its answer carried back, streamed
or not.

The client's response is committed (status line sent) only once the
upstream has answered 2xx, so every failure before that is a proper HTTP
error (502, 504).  After that, in a stream, a failure can only be told in
the stream itself: an error event, and no C{[DONE]}.

Time limits: the whole exchange for an answer in one piece; for a stream,
the wait for the headers and then each gap between chunks.  Whoever goes
away first, the other side is let go: a client that disconnects cancels
the upstream request, an upstream that breaks ends the client's stream.
"""

from __future__ import annotations

from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from twisted.web.server import Request

from openclaw.dataplane.context import APIContext
from openclaw.dataplane.errors import (
    PROVIDER_HEADER,
    APIError,
    internal_error,
    upstream_failed,
    upstream_http_error,
    upstream_timeout,
)
from openclaw.dataplane.request import ChatRequest
from openclaw.dataplane.sse import DONE, SSEDecoder, SSEError, encode
from openclaw.providers import ProviderAdapter
from openclaw.providers.fetch import read_body
from openclaw.providers.wire import (
    MalformedAnswer,
    StreamBroken,
    StreamTranslation,
    Wire,
)
from openclaw.routing import Route

_JSON = b"application/json"
_EVENT_STREAM = b"text/event-stream"
_DONE_EVENT = encode(DONE)


@attrs.define(eq=False)
class ChatCall:
    """
    Drives one call; L{start} it and forget it.
    """

    context: APIContext
    request: Request
    adapter: ProviderAdapter
    route: Route
    wire: Wire
    chat: ChatRequest
    started: float
    #: What the call waits for now, for the timeout message.
    _waiting_for: str = "the response headers"
    #: The upstream step in flight (headers or a whole body), cancellable.
    _pending: Deferred[Any] | None = None
    _timer: IDelayedCall | None = None
    _relay: _StreamRelay | None = None
    #: The client has its answer, or has gone: nothing more is written.
    _over: bool = False

    def start(self, body: bytes) -> None:
        context = self.context
        context.call_started()
        self._timer = context.reactor.callLater(context.timeout, self._timed_out)
        self.request.notifyFinish().addErrback(self._client_gone)
        d = self._pending = self.adapter.post_chat(self.route.model, body, self.chat.stream)
        d.addCallbacks(self._got_response, self._exchange_failed)
        d.addErrback(self._bug)

    # -- the upstream's answer ---------------------------------------------

    def _got_response(self, response: IResponse) -> None:
        self._pending = None
        if self._over:
            return
        if not 200 <= response.code < 300:
            self._read(response, "the error body", self._got_error_body, response.code)
        elif self.chat.stream:
            self._start_stream(response)
        else:
            self._read(response, "the response body", self._got_body)

    def _read(self, response: IResponse, what: str, then: Any, *args: Any) -> None:
        self._waiting_for = what
        d = self._pending = read_body(response)
        d.addCallbacks(then, self._exchange_failed, callbackArgs=args)
        d.addErrback(self._bug)

    def _got_body(self, body: bytes) -> None:
        self._pending = None
        if self._over:
            return
        try:
            answer = self.wire.completion(body, self.route.model, int(self.context.reactor.seconds()))
        except MalformedAnswer as e:
            return self._fail(upstream_failed(self.route.provider_id, f"{e} (HTTP 2xx)", e.code))
        self._finish_call()
        request = self.request
        try:
            request.setResponseCode(200)
            request.setHeader(b"Content-Type", _JSON)
            request.setHeader(b"Content-Length", b"%d" % len(answer))
            self._route_headers()
            request.write(answer)
            request.finish()
        finally:
            self._ended(200)

    def _got_error_body(self, body: bytes, status: int) -> None:
        self._pending = None
        if not self._over:
            reason = str(self.adapter.upstream_error(status, body))
            self._fail(upstream_http_error(self.route.provider_id, status, reason))

    def _exchange_failed(self, reason: Failure) -> None:
        self._pending = None
        if not self._over:
            self._fail(upstream_failed(self.route.provider_id, self.adapter.describe(reason)))

    # -- streaming ----------------------------------------------------------

    def _start_stream(self, response: IResponse) -> None:
        request = self.request
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", _EVENT_STREAM)
        request.setHeader(b"Cache-Control", b"no-cache")
        # Tell buffering reverse proxies (nginx) to pass events on at once.
        request.setHeader(b"X-Accel-Buffering", b"no")
        self._route_headers()
        request.write(b"")  # the headers, now: the client may show progress
        self._waiting_for = "the next chunk"
        created = int(self.context.reactor.seconds())
        self._relay = _StreamRelay(self, self.wire.stream(self.chat, self.route.model, created))
        response.deliverBody(self._relay)

    def stream_data(self, events: bytes, translation: StreamTranslation) -> None:
        """
        The relay has events for the client.  Written at once: nothing of a
        stream is held back.
        """
        if self._over:
            return
        assert self._timer is not None
        self._timer.reset(self.context.timeout)
        if events:
            self.request.write(events)
        if translation.ended:
            self._close_stream(translation)

    def stream_ended(self, reason: Failure, translation: StreamTranslation) -> None:
        """
        The upstream body is over, whole or not.
        """
        if self._over:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            if translation.complete:
                return self._close_stream(translation)
            why = "the stream ended before the answer was complete"
        else:
            why = f"the stream broke mid-answer: {self.adapter.describe(reason)}"
        self._fail(upstream_failed(self.route.provider_id, why, "upstream_stream_broken"))

    def stream_broken(self, why: str, code: str = "upstream_stream_error") -> None:
        """
        An upstream event was an error or unreadable: end the stream here.
        """
        if not self._over:
            self._fail(upstream_failed(self.route.provider_id, why, code))

    def _close_stream(self, translation: StreamTranslation) -> None:
        closing = b"".join(encode(payload) for payload in translation.closing())
        # After [DONE] the upstream body is about over: let it end by itself,
        # so its connection goes back to the pool rather than being dropped.
        self._finish_call(drain=True)
        try:
            self.request.write(closing + _DONE_EVENT)
            self.request.finish()
        finally:
            self._ended(200)

    # -- endings ---------------------------------------------------------------

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(upstream_timeout(self.route.provider_id, self.context.timeout, self._waiting_for))

    def _client_gone(self, reason: Failure) -> None:
        if self._over:
            return
        self._finish_call()
        self._ended(499, "client gone")

    def _fail(self, error: APIError) -> None:
        """
        Answer with C{error}: as the response if none has started, else as
        the stream's last event.
        """
        self._finish_call()
        request = self.request
        try:
            if request.startedWriting:
                request.write(encode(error.body()))
            else:
                body = error.body()
                request.setResponseCode(error.status)
                request.setHeader(b"Content-Type", _JSON)
                request.setHeader(b"Content-Length", b"%d" % len(body))
                for name, value in error.headers:
                    request.setHeader(name, value)
                self._route_headers()
                request.write(body)
            request.finish()
        finally:
            self._ended(error.status, error.code)

    def _finish_call(self, drain: bool = False) -> None:
        """
        Stop everything still running for this call: nothing more is
        written to the client after what the caller writes now.

        @param drain: leave the upstream body to end by itself (within the
            time limit) instead of dropping its connection.
        """
        self._over = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        if self._relay is not None:
            if drain:
                self._relay.drain(self.context.reactor, self.context.timeout)
            else:
                self._relay.stop()

    def _ended(self, status: int, outcome: str | None = None) -> None:
        """
        The client has all it will get: count the call out (last, so that a
        stop waiting on it closes the connection only after the answer) and
        log it.
        """
        self.context.call_ended()
        self.context.completed(self.request, self.started, status, self.route, self.chat.stream, outcome)

    def _route_headers(self) -> None:
        self.request.setHeader(PROVIDER_HEADER, self.route.provider_id.encode())
        self.request.setHeader(b"X-OpenClaw-Model", self.route.model.encode())

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

    def connectionMade(self) -> None:
        self._call.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if self._stopped:
            return
        translation = self._translation
        out: list[bytes] = []
        try:
            for event in self._decoder.feed(data):
                out.extend(encode(payload) for payload in translation.payloads(event))
                if translation.ended:
                    break
        except (StreamBroken, SSEError) as e:
            if out:
                self._call.stream_data(b"".join(out), translation)
            self._call.stream_broken(str(e), e.code if isinstance(e, StreamBroken) else "upstream_stream_error")
            return
        self._call.stream_data(b"".join(out), translation)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._release()
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        if not self._stopped:
            self._stopped = True
            self._call.stream_ended(reason, self._translation)

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

    def _release(self) -> None:
        request = self._call.request
        # Once the client is gone its channel is too, and with it the
        # registration.
        if request.producer is not None and request.channel is not None:
            request.unregisterProducer()
