"""
C{POST /v1/embeddings}: OpenAI's embeddings API
(U{https://platform.openai.com/docs/api-reference/embeddings}) answered by
the embeddings API of the provider EMBEDDING_MODEL names, through the
capability its adapter declares
(L{ProviderAdapter.embeddings <openclaw.providers.base.ProviderAdapter.embeddings>}:
Gemini's C{batchEmbedContents}, or OpenAI's own C{/embeddings} passed
through).

Embeddings do not follow C{switch_provider}: an application's stored
vectors are only comparable with vectors of the same model, so every call
uses EMBEDDING_MODEL, or the C{"<provider>/<model>"} the request names
when that provider has an embeddings API.
"""

from __future__ import annotations

import base64
import sys
from array import array
from collections.abc import Sequence
from typing import Any, NamedTuple

import attrs
import orjson
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from openclaw.consumers.estimate import text_bytes, tokens_of
from openclaw.consumers.table import GATEWAY, Holder
from openclaw.dataplane.answer import CLIENT_GONE, CLIENT_GONE_STATUS, CUT_STATUS, send_whole
from openclaw.dataplane.context import APIContext
from openclaw.dataplane.errors import (
    INVALID_VALUE,
    APIError,
    bad_request,
    internal_error,
    shutting_down,
    upstream_failed,
    upstream_http_error,
    upstream_timeout,
)
from openclaw.dataplane.request import (
    COUNT_WHY,
    INT64_MAX,
    content_encoding,
    integer_field,
    json_body,
    refuse_misspelled_provider,
    requested_model,
    string_field,
)
from openclaw.dataplane.resource import (
    AuthenticatedResource,
    answer_bug,
    error_response,
    pooled_call_error,
    request_body,
)
from openclaw.providers import ProviderAdapter, ProviderRegistry, UpstreamHTTPError
from openclaw.providers.base import PooledCall
from openclaw.providers.errors import RefusalKind
from openclaw.providers.fetch import BodyReader, read_body
from openclaw.providers.wire import MalformedAnswer
from openclaw.routing import Route
from openclaw.stalls import add_timeout

#: Inputs one request may hold (OpenAI's own limit).
MAX_INPUTS = 2048
ENCODINGS = ("float", "base64")
_JSON = b"application/json"
#: The outcome of a call a stop ended (L{EmbeddingsCall.shut_down}).
STOPPED = "shutting_down"

#: OpenAI's C{dimensions}: a count, at most what a 64-bit integer holds.
_check_dimensions = integer_field(1, INT64_MAX, COUNT_WHY)


@attrs.frozen
class EmbeddingRequest:
    """
    A validated C{POST /v1/embeddings} body.
    """

    inputs: tuple[str, ...]
    #: The provider whose embeddings API answers it.
    provider: str
    #: The model, as that provider names it (Gemini's without C{models/}).
    model: str
    #: OpenAI's C{dimensions} (Gemini's C{outputDimensionality}), when asked for.
    dimensions: int | None
    #: "float" (a list of numbers) or "base64" (little-endian float32 bytes).
    encoding_format: str
    #: The model is EMBEDDING_MODEL's (the request named no
    #: C{<provider>/<model>}): the operator's choice, not the client's.
    configured: bool = False


class EmbeddingsAnswer(NamedTuple):
    """
    The client's answer, and the input tokens it counts.
    """

    #: OpenAI's list shape, as JSON.
    body: bytes
    #: The input tokens the provider counted, None when it counts none.
    prompt_tokens: int | None


def embedding_providers(providers: ProviderRegistry) -> list[str]:
    """
    The ids of the providers whose adapter declares an embeddings API.
    """
    return [adapter.id for adapter in providers if adapter.embeddings is not None]


def parse_embedding_request(
    raw: bytes,
    default_provider: str | None,
    default_model: str,
    providers: ProviderRegistry,
    codings: Sequence[bytes] = (),
) -> EmbeddingRequest:
    """
    Parse and check a request body.

    @param default_provider: EMBEDDING_MODEL's provider (None: no declared
        provider has embeddings).
    @param default_model: EMBEDDING_MODEL's model.
    @param codings: the request's C{Content-Encoding} field values
        (L{json_body}).
    @raise APIError: 400 naming the first problem found; 415 for a body
        sent with a content coding (L{json_body}).
    """
    body = json_body(raw, codings)
    given = body.get("input")
    inputs = [given] if isinstance(given, str) else given
    if not isinstance(inputs, list) or not inputs or not all(isinstance(text, str) and text for text in inputs):
        raise bad_request(
            "input must be a non-empty string or a non-empty list of non-empty strings "
            "(token id arrays are not supported by this gateway: send the texts themselves; LangChain's "
            "OpenAIEmbeddings does with check_embedding_ctx_length=False)",
            param="input",
        )
    if len(inputs) > MAX_INPUTS:
        raise bad_request(f"input holds {len(inputs)} texts; at most {MAX_INPUTS} per request", param="input")
    model = requested_model(body)
    provider_id, chosen = default_provider, default_model
    configured = True
    if model:
        # As a chat call's (choose_route): the provider's id in any case.
        named, slash, name = model.strip().partition("/")
        prefix = named.lower()
        if slash and prefix in providers.ids:
            wire = providers.get(prefix).embeddings
            if wire is None:
                having = ", ".join(embedding_providers(providers)) or "no declared provider"
                raise bad_request(
                    f"{prefix} has no embeddings API: embeddings come from {having}; leave model out "
                    f"(EMBEDDING_MODEL, {default_provider}/{default_model}) or name <provider>/<model>",
                    param="model",
                )
            try:
                chosen = wire.model_name(name)
            except ValueError:
                raise bad_request(f"model {model!r} names no model; use {prefix}/<model>", param="model") from None
            provider_id = prefix
            configured = False
        elif slash:
            refuse_misspelled_provider(model, prefix, name, providers.ids)
    if provider_id not in providers.ids or providers.get(provider_id).embeddings is None:
        raise bad_request(
            f"no declared provider serves EMBEDDING_MODEL ({default_provider}/{default_model}); "
            f"name <provider>/<model> with one that has an embeddings API: "
            f"{', '.join(embedding_providers(providers)) or 'none is declared'}",
            param="model",
        )
    dimensions = body.get("dimensions")
    _check_dimensions("dimensions", dimensions)
    encoding = body.get("encoding_format", "float")
    if encoding is None:
        encoding = "float"
    if encoding not in ENCODINGS:
        raise bad_request("encoding_format must be float or base64", param="encoding_format", code=INVALID_VALUE)
    string_field("user", body.get("user"))
    return EmbeddingRequest(tuple(inputs), provider_id, chosen, dimensions, encoding, configured)


def configured_model_not_found(error: APIError, parsed: EmbeddingRequest) -> APIError:
    """
    C{error}, the provider's C{model_not_found} for EMBEDDING_MODEL (a
    request that named no C{<provider>/<model>}), said as the operator's
    setting, not the client's C{model}: the same status, no C{param}, and
    what to do.
    """
    return APIError(
        error.status,
        f"EMBEDDING_MODEL ({parsed.provider}/{parsed.model}), the model this gateway sends embeddings to when "
        f"a request names no <provider>/<model>, is not served: {error.message}; ask the gateway's operator to "
        f"set EMBEDDING_MODEL to a model {parsed.provider} serves, or name <provider>/<model> in the request",
        error.type,
        error.code,
        None,
        error.headers,
    )


def estimated_tokens(inputs: tuple[str, ...]) -> int:
    """
    The tokens a consumer is reserved for embedding C{inputs}, and counted
    when the provider's answer carries no token count (Gemini's
    C{batchEmbedContents}): one token per 4 bytes of each text's UTF-8,
    rounded up (L{openclaw.consumers.estimate.tokens_of}: Google's rule of
    thumb of 4 characters a token for English,
    U{https://ai.google.dev/gemini-api/docs/tokens}, and about 0.75 token
    a Chinese character, as Moonshot counts).
    """
    return sum(tokens_of(text_bytes(text)) for text in inputs)


def encode_base64(values: list[float]) -> str:
    """
    C{values} as OpenAI's base64 encoding: little-endian float32 bytes.
    """
    packed = array("f", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def embedding_list(
    found: list[list[float]], model: str, encoding_format: str, prompt_tokens: int | None = None
) -> dict[str, Any]:
    """
    OpenAI's list shape, C{usage} the provider's count: 0s when it counts
    none (Gemini's batch answer), rather than a guess.
    """
    encode = encode_base64 if encoding_format == "base64" else None
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(values) if encode else values}
            for i, values in enumerate(found)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens or 0, "total_tokens": prompt_tokens or 0},
    }


class Embeddings(AuthenticatedResource):
    """
    C{POST /v1/embeddings}, to EMBEDDING_MODEL's provider (see the module
    docstring), within UPSTREAM_TIMEOUT; inputs beyond one upstream batch
    (C{batch_size} of L{openclaw.providers.embeddings.EmbeddingsWire}) go in several calls, one after the other.
    """

    def render_POST(self, request: Request) -> Any:
        context = self.context
        started = context.reactor.seconds()
        holder = self.authenticate(request, started)
        try:
            parsed = parse_embedding_request(
                request_body(request),
                context.embedding_provider,
                context.embedding_model,
                context.providers,
                content_encoding(request.requestHeaders),
            )
        except APIError as error:
            context.completed(request, started, error.status, consumer=holder.consumer, error=error)
            raise
        adapter = self.usable(request, parsed.provider, started, holder)
        route = Route(parsed.provider, parsed.model)
        consumers = context.consumers
        if consumers is None or holder is GATEWAY:
            return self._start(request, adapter, parsed, route, started, holder)
        # A consumer's limits: rpm, tpm and budget with the prompt tokens, models.
        admission = consumers.admit(holder, parsed.provider, parsed.model, 0, lambda: estimated_tokens(parsed.inputs))
        return self.after_admission(
            request,
            admission,
            lambda: self._start(request, adapter, parsed, route, started, holder),
            started,
            route,
            holder,
        )

    def _start(
        self,
        request: Request,
        adapter: ProviderAdapter,
        parsed: EmbeddingRequest,
        route: Route,
        started: float,
        holder: Holder,
    ) -> Any:
        EmbeddingsCall(self.context, request, adapter, parsed, route, started, holder).start()
        return NOT_DONE_YET


def _timeout_failure(result: object, timeout: float) -> object:
    """
    An embeddings call cancelled for its deadline (L{add_timeout}'s
    C{on_timeout}): a timeout, whatever the cancel became on its way
    out (Agent's C{ResponseNeverReceived} around a C{CancelledError} would
    read as the gateway stopping).
    """
    return Failure(TimeoutError()) if isinstance(result, Failure) else result


@attrs.define(eq=False)
class EmbeddingsCall:
    """
    One C{POST /v1/embeddings} call past its admission: its batches sent
    one after the other within UPSTREAM_TIMEOUT (L{embed}), its answer or
    error written (L{answer}), and the call counted -- its status in the
    metrics and log line, a consumer's usage -- once its client has all it
    will get (L{count}).  L{start} it and forget it, as a chat call
    (L{ChatCall <openclaw.dataplane.call.ChatCall>}).

    A client that leaves cancels the batch under way: the call is counted
    499 C{client gone}, its consumer billed for the batches sent
    (L{billed}).  So does a stop whose grace runs out before the provider
    answered (L{shut_down}), but the client is answered 503
    C{shutting_down}, counted so, as a chat call is: the call is among
    L{APIContext.chat_calls} while it runs (it was closed with nothing
    said, and logged 499 C{client gone}).
    """

    context: APIContext
    request: Request
    adapter: ProviderAdapter
    parsed: EmbeddingRequest
    route: Route
    started: float
    holder: Holder = GATEWAY
    #: The provider calls made (a batch refused on one key is made once
    #: more on another), the last one perhaps still without a verdict for
    #: the breaker.
    calls: list[PooledCall] = attrs.field(init=False, factory=list)
    #: How many of the inputs went to the provider: those of every batch
    #: whose call was made, once however many keys it took.
    sent: int = attrs.field(init=False, default=0)
    #: The client's connection was lost (C{notifyFinish} failed).
    client_gone: bool = attrs.field(init=False, default=False)
    #: A stop's grace ran out before the answer: answered 503 (L{shut_down}).
    stopped: bool = attrs.field(init=False, default=False)
    #: The batches under way (L{embed}), cancelled when the client leaves.
    _embedding: Deferred[EmbeddingsAnswer] | None = attrs.field(init=False, default=None)
    #: The reader of the answer's body being read, if any.
    _reader: BodyReader | None = attrs.field(init=False, default=None)

    def start(self) -> None:
        """
        Send the batches, answer, and count the call out once answered (a
        stop waits for it: L{APIContext.call_started}).
        """
        context = self.context
        embedding = self._embedding = Deferred.fromCoroutine(self.embed())
        # A deadline the loop's own standstill made late is judged after
        # the provider's answer that came meanwhile is read
        # (L{openclaw.stalls.add_timeout}), as a chat call's is.
        add_timeout(embedding, context.timeout, context.reactor, _timeout_failure, self._body_received)
        context.call_started()
        context.chat_calls.add(self)
        self.request.notifyFinish().addErrback(self.left)
        embedding.addBoth(self.answer)
        embedding.addErrback(self._bug)
        embedding.addBoth(self._call_over)

    def left(self, reason: Failure) -> None:
        """
        The client's connection was lost: the batch under way is cancelled.
        Once answered, the answer going out (L{send_whole}) counts a client
        gone itself.
        """
        self.client_gone = True
        embedding = self._embedding
        if embedding is not None and not embedding.called:
            embedding.cancel()

    def shut_down(self) -> None:
        """
        The gateway is stopping and its grace period is over, the provider
        has not answered yet: answer 503 C{shutting_down} and count it
        (the consumer billed as for a client gone, L{billed}), then cancel
        the batch under way.  Nothing once the answer is going out, or the
        client left.
        """
        embedding = self._embedding
        if embedding is None or embedding.called or self.client_gone or self.stopped:
            return
        self.stopped = True
        self.settle_last_call()
        error = shutting_down()
        request = self.request
        body = error_response(request, error)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.setHeader(b"X-OpenClaw-Provider", self.adapter.id.encode())
        request.setHeader(b"X-OpenClaw-Model", self.parsed.model.encode())
        request.write(body)
        request.finish()
        self.count(error.status, error.code, None)
        embedding.cancel()

    def settle_last_call(self) -> None:
        """
        Give the last provider call its breaker's verdict if it has none
        yet (cut short before the provider answered): none when its client
        left or the gateway stopped it, else a failure (no answer in time,
        or no connection).
        """
        if self.calls:
            self.calls[-1].unanswered(client_left=self.client_gone or self.stopped)

    def answer(self, result: EmbeddingsAnswer | Failure) -> Deferred[None] | None:
        """
        Write C{result} (the vectors, or the error a failure is) and count
        the call; a client gone gets nothing and is counted 499.

        @return: None once counted, or, for a large answer going out part
            by part, a Deferred that fires once it was counted (all handed
            over, or cut short).
        """
        if self.stopped:
            # Answered and counted by the stop (shut_down).
            return None
        self.settle_last_call()
        answered = None if isinstance(result, Failure) else result
        if self.client_gone:
            # With the provider's count when it had answered.
            self.count(CLIENT_GONE_STATUS, CLIENT_GONE, answered)
            return None
        request, parsed = self.request, self.parsed
        error = None
        if isinstance(result, Failure):
            error = self._error(result)
            if parsed.configured and error.code == "model_not_found":
                error = configured_model_not_found(error, parsed)
            # Of the provider's keys and address (Scrubber.quoted).
            body = self.adapter.scrubber.quoted(error_response(request, error))
            status, outcome = error.status, error.code
        else:
            request.setHeader(b"Content-Type", _JSON)
            body = result.body
            status, outcome = 200, None
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.setHeader(b"X-OpenClaw-Provider", self.adapter.id.encode())
        request.setHeader(b"X-OpenClaw-Model", parsed.model.encode())
        going_out = send_whole(request, body)
        if going_out is None:
            self.count(status, outcome, answered, error)
            return None
        # A large answer goes out part by part: counted (and, by _call_over,
        # counted out of the calls a stop waits for) once it was all handed
        # over, or cut short.
        return going_out.addCallback(self._sent, status, outcome, answered)

    def _sent(self, cut: str | None, status: int, outcome: str | None, answered: EmbeddingsAnswer | None) -> None:
        """
        A large answer (L{send_whole}) is over: counted with C{status} and
        C{outcome} when all handed over (C{cut} None), else as cut short
        (L{CUT_STATUS}).
        """
        if cut is None:
            self.count(status, outcome, answered)
        else:
            self.count(CUT_STATUS[cut], cut, answered)

    def count(
        self, status: int, outcome: str | None, answered: EmbeddingsAnswer | None, error: APIError | None = None
    ) -> None:
        """
        Count the call (its metrics and log line) and, for a consumer, its
        usage (L{billed}), which also releases what its admission reserved.

        @param answered: the provider's answer, if all its batches were.
        @param error: the error answered, if any: a provider's failure's
            words go to the log line (L{APIContext.completed}).
        """
        context = self.context
        # No provider was called when its keys or its breaker let no call through.
        called = self.route.provider_id if self.calls else "-"
        context.completed(
            self.request,
            self.started,
            status,
            self.route,
            outcome=outcome,
            consumer=self.holder.consumer,
            provider=called,
            error=error,
        )
        if context.consumers is not None:
            context.consumers.account(
                self.holder,
                self.adapter.id,
                self.parsed.model,
                status,
                self.billed(outcome, answered),
                context.reactor.seconds() - self.started,
            )

    def billed(self, outcome: str | None, answered: EmbeddingsAnswer | None) -> dict[str, int] | None:
        """
        The usage a consumer is billed, C{{"prompt_tokens": n}}: the
        provider's count when it answered every batch (the estimate of the
        inputs, L{estimated_tokens}, when it counts none); for a call whose
        client left after batches were sent, the estimate of the inputs
        sent (the provider bills them all the same, as chat counts a call
        left after it was sent), and so for a call a stop ended
        (L{shut_down}); else None (nothing sent, or a failure).
        """
        if answered is not None:
            tokens = answered.prompt_tokens
            return {"prompt_tokens": estimated_tokens(self.parsed.inputs) if tokens is None else tokens}
        if outcome in (CLIENT_GONE, STOPPED) and self.sent:
            return {"prompt_tokens": estimated_tokens(self.parsed.inputs[: self.sent])}
        return None

    def _bug(self, reason: Failure) -> None:
        answer_bug(self.context.log, self.request, "embeddings call failed unexpectedly", reason, self.client_gone)

    def _reading(self, reader: BodyReader) -> None:
        self._reader = reader

    def _body_received(self) -> int:
        """
        The bytes of the answer's body being read, for its deadline
        (L{add_timeout}'s C{arrived}).
        """
        return 0 if self._reader is None else self._reader.received

    def _call_over(self, result: object) -> None:
        self.context.chat_calls.discard(self)
        self.context.call_ended()

    async def embed(self) -> EmbeddingsAnswer:
        """
        The client's answer: the vectors of every batch, in OpenAI's list
        shape, and the input tokens the provider counted (None unless every
        batch's answer counted them).
        """
        parsed = self.parsed
        wire = self.adapter.embeddings
        assert wire is not None, "checked by parse_embedding_request"
        found: list[list[float]] = []
        counts: list[int | None] = []
        inputs = parsed.inputs
        status = 200
        for start in range(0, len(inputs), wire.batch_size):
            batch = inputs[start : start + wire.batch_size]
            body = wire.request_body(batch, parsed.model, parsed.dimensions)
            status, answer = await self._batch(body, start + len(batch))
            try:
                read = wire.answer(answer, len(batch))
            except MalformedAnswer as e:
                raise MalformedAnswer(f"{e} (HTTP {status})") from None
            found.extend(read.vectors)
            counts.append(read.prompt_tokens)
        tokens = None if None in counts else sum(count or 0 for count in counts)
        try:
            document = embedding_list(found, parsed.model, parsed.encoding_format, tokens)
            return EmbeddingsAnswer(orjson.dumps(document), tokens)
        except (TypeError, ValueError, OverflowError):
            # orjson's JSONEncodeError (nested lists past its 254 levels) is
            # a TypeError, as array's refusal of a value that is no number.
            raise MalformedAnswer(f"an embedding's values are not all numbers (HTTP {status})") from None

    async def _batch(self, body: bytes, sent: int) -> tuple[int, bytes]:
        """
        One upstream embeddings call with the next usable key, under the
        breaker, as a chat call is made (L{ProviderAdapter.pooled_call}):
        refused with 429 or as an invalid key, it is made once more with
        another usable key.  The 2xx status and body.

        @param sent: L{sent} once its call is made: the inputs up to the
            batch's last.
        @raise UpstreamHTTPError: a non-2xx answer (its C{refusal} read).
        @raise ProviderError: no usable key, the breaker open.
        """
        adapter = self.adapter
        tried: list[str] = []
        while True:
            call = adapter.pooled_call(tried, self.parsed.model)
            self.calls.append(call)
            self.sent = sent
            tried.append(call.key)
            response = await adapter.post_embeddings(self.parsed.model, body, call.key)
            call.answered(response.code)
            answer = await read_body(response, reading=self._reading)
            if 200 <= response.code < 300:
                return response.code, answer
            retry_after = response.headers.getRawHeaders(b"retry-after")
            error = call.refused(
                response.code, answer, None if retry_after is None else retry_after[0].decode("latin-1")
            )
            assert error.refusal is not None
            keys = adapter.keys
            if (
                error.refusal.kind in (RefusalKind.RATE_LIMITED, RefusalKind.AUTH)
                and len(tried) == 1
                and any(keys.usable(key, self.parsed.model) for key in keys.keys if key not in tried)
            ):
                continue
            raise error

    def _error(self, reason: Failure) -> APIError:
        """
        The client's error for the call's failure C{reason}; a bug
        (C{AssertionError}, C{TypeError}, ...) logged and a 500.
        """
        value = reason.value
        adapter = self.adapter
        provider_id = adapter.id
        if isinstance(value, APIError):
            # The wire refused the request before sending it (a 400 naming
            # the field: EmbeddingsWire.request_body).
            return value
        refused = pooled_call_error(adapter, value, names_model=True)
        if refused is not None:
            return refused
        if isinstance(value, UpstreamHTTPError):
            return upstream_http_error(provider_id, value.status, str(value))
        if isinstance(value, (TimeoutError, CancelledError)):
            return upstream_timeout(provider_id, self.context.timeout, "the embeddings")
        if isinstance(value, MalformedAnswer):
            return upstream_failed(provider_id, str(value), "upstream_malformed")
        if isinstance(value, Exception) and not isinstance(
            value, (AssertionError, AttributeError, TypeError, KeyError)
        ):
            return upstream_failed(provider_id, adapter.describe(reason))
        self.context.log.failure("embeddings call failed unexpectedly", reason)
        return internal_error()
