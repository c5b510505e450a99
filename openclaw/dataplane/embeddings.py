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
from typing import Any, NamedTuple

import attrs
import orjson
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET, Request

from openclaw.consumers.estimate import text_bytes, tokens_of
from openclaw.consumers.table import GATEWAY, Holder
from openclaw.dataplane.answer import CLIENT_GONE, CUT_STATUS, send_whole
from openclaw.dataplane.errors import (
    APIError,
    bad_request,
    internal_error,
    upstream_failed,
    upstream_http_error,
    upstream_timeout,
)
from openclaw.dataplane.request import COUNT_WHY, INT64_MAX, integer_field, json_body, requested_model
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
from openclaw.providers.fetch import read_body
from openclaw.providers.wire import MalformedAnswer
from openclaw.routing import Route

#: Inputs one request may hold (OpenAI's own limit).
MAX_INPUTS = 2048
ENCODINGS = ("float", "base64")
_JSON = b"application/json"

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
    headers: Headers | None = None,
) -> EmbeddingRequest:
    """
    Parse and check a request body.

    @param default_provider: EMBEDDING_MODEL's provider (None: no declared
        provider has embeddings).
    @param default_model: EMBEDDING_MODEL's model.
    @param headers: the request's headers (L{json_body}).
    @raise APIError: 400 naming the first problem found; 415 for a body
        sent with a content coding (L{json_body}).
    """
    body = json_body(raw, headers)
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
        prefix, slash, name = model.partition("/")
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
        raise bad_request("encoding_format must be float or base64", param="encoding_format")
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
                request.requestHeaders,
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
        context = self.context
        #: The provider calls made, the last one perhaps still without a
        #: verdict for the breaker.
        calls: list[PooledCall] = []
        wire = adapter.embeddings
        assert wire is not None, "checked by parse_embedding_request"
        batch_size = wire.batch_size
        call = Deferred.fromCoroutine(self._embed(adapter, parsed, calls))

        def timed_out(result: object, timeout: float) -> object:
            # Cancelled for the deadline: a timeout, whatever the cancel
            # became on its way out (Agent's ResponseNeverReceived around a
            # CancelledError read as the gateway stopping).
            return Failure(TimeoutError()) if isinstance(result, Failure) else result

        call.addTimeout(context.timeout, context.reactor, onTimeoutCancel=timed_out)
        context.call_started()
        gone: list[bool] = []

        def client_gone(reason: Failure) -> None:
            gone.append(True)
            if not call.called:
                # Still waiting on the provider; once answered, the answer
                # going out (send_whole) counts a client gone itself.
                call.cancel()

        def counted(status: int, outcome: str | None, answered: EmbeddingsAnswer | None) -> None:
            # No provider was called when its keys or its breaker let no call through.
            called = route.provider_id if calls else "-"
            context.completed(
                request, started, status, route, outcome=outcome, consumer=holder.consumer, provider=called
            )
            if context.consumers is not None:
                # Accounting also releases what the admission reserved.
                usage = None
                if answered is not None:
                    tokens = answered.prompt_tokens
                    usage = {"prompt_tokens": estimated_tokens(parsed.inputs) if tokens is None else tokens}
                elif outcome == CLIENT_GONE and calls:
                    # Its client left after batches were sent: they are
                    # billed all the same, so counted as chat counts a call
                    # left after it was sent (the estimate of what was sent).
                    sent = parsed.inputs[: len(calls) * batch_size]
                    usage = {"prompt_tokens": estimated_tokens(sent)}
                context.consumers.account(
                    holder, adapter.id, parsed.model, status, usage, context.reactor.seconds() - started
                )

        def answer(result: EmbeddingsAnswer | Failure) -> Deferred[None] | None:
            if calls:
                # A call cut short with no verdict: its client left (no
                # verdict), else no answer in time or no connection.
                if gone:
                    calls[-1].abandoned()
                else:
                    calls[-1].failed()
            if gone:
                # Counted as chat counts a client that left: 499, with the
                # provider's count when it had answered.
                counted(499, CLIENT_GONE, None if isinstance(result, Failure) else result)
                return None
            if isinstance(result, Failure):
                error = self._error(result, adapter)
                if parsed.configured and error.code == "model_not_found":
                    error = configured_model_not_found(error, parsed)
                body = error_response(request, error)
                status, outcome, answered = error.status, error.code, None
            else:
                request.setHeader(b"Content-Type", _JSON)
                body = result.body
                status, outcome, answered = 200, None, result
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.setHeader(b"X-OpenClaw-Provider", adapter.id.encode())
            request.setHeader(b"X-OpenClaw-Model", parsed.model.encode())
            sent = send_whole(request, body)
            if sent is None:
                counted(status, outcome, answered)
                return None
            # A large answer goes out part by part: counted (and, by
            # ended below, counted out of the calls a stop waits for) once
            # it was all handed over, or cut short.
            return sent.addCallback(
                lambda cut: (
                    counted(status, outcome, answered) if cut is None else counted(CUT_STATUS[cut], cut, answered)
                )
            )

        def ended(result: object) -> None:
            context.call_ended()

        request.notifyFinish().addErrback(client_gone)
        call.addBoth(answer)
        call.addErrback(
            lambda reason: answer_bug(context.log, request, "embeddings call failed unexpectedly", reason, bool(gone))
        )
        call.addBoth(ended)
        return NOT_DONE_YET

    async def _embed(
        self, adapter: ProviderAdapter, parsed: EmbeddingRequest, calls: list[PooledCall]
    ) -> EmbeddingsAnswer:
        """
        The client's answer: the vectors of every batch, in OpenAI's list
        shape, and the input tokens the provider counted (None unless every
        batch's answer counted them).
        """
        wire = adapter.embeddings
        assert wire is not None, "checked by parse_embedding_request"
        found: list[list[float]] = []
        counts: list[int | None] = []
        inputs = parsed.inputs
        status = 200
        for start in range(0, len(inputs), wire.batch_size):
            batch = inputs[start : start + wire.batch_size]
            body = wire.request_body(batch, parsed.model, parsed.dimensions)
            status, answer = await self._batch(adapter, parsed.model, body, calls)
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

    async def _batch(
        self, adapter: ProviderAdapter, model: str, body: bytes, calls: list[PooledCall]
    ) -> tuple[int, bytes]:
        """
        One upstream embeddings call with the next usable key, under the
        breaker, as a chat call is made (L{ProviderAdapter.pooled_call}):
        refused with 429 or as an invalid key, it is made once more with
        another usable key.  The 2xx status and body.

        @raise UpstreamHTTPError: a non-2xx answer (its C{refusal} read).
        @raise ProviderError: no usable key, the breaker open.
        """
        tried: list[str] = []
        while True:
            call = adapter.pooled_call(avoid=tried)
            calls.append(call)
            tried.append(call.key)
            response = await adapter.post_embeddings(model, body, call.key)
            call.answered(response.code)
            answer = await read_body(response)
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
                and any(keys.usable(key) for key in keys.keys if key not in tried)
            ):
                continue
            raise error

    def _error(self, reason: Failure, adapter: ProviderAdapter) -> APIError:
        value = reason.value
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
