"""
C{POST /v1/embeddings}: OpenAI's embeddings API
(U{https://platform.openai.com/docs/api-reference/embeddings}) answered by
Gemini's C{batchEmbedContents} (U{https://ai.google.dev/api/embeddings}).

Embeddings do not follow C{switch_provider}: an application's stored
vectors are only comparable with vectors of the same model, so every call
uses EMBEDDING_MODEL, or the Gemini model a C{"gemini/<model>"} names.
Kimi has no embeddings API.
"""

from __future__ import annotations

import base64
import sys
from array import array
from typing import Any

import attrs
import orjson
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from openclaw.consumers.table import GATEWAY, Holder
from openclaw.dataplane.errors import (
    APIError,
    bad_request,
    internal_error,
    upstream_failed,
    upstream_http_error,
    upstream_timeout,
)
from openclaw.dataplane.request import json_body
from openclaw.dataplane.resource import CLIENT_GONE, _Authenticated, error_response, pooled_call_error
from openclaw.providers import UpstreamHTTPError
from openclaw.providers.base import PooledCall
from openclaw.providers.errors import RefusalKind
from openclaw.providers.fetch import read_body
from openclaw.providers.gemini import GeminiAdapter
from openclaw.routing import UNPRINTABLE_MODEL, Route, printable_model

#: The provider that serves embeddings.
PROVIDER = "gemini"
#: Inputs one request may hold (OpenAI's own limit).
MAX_INPUTS = 2048
#: Inputs per C{batchEmbedContents} call (Gemini's limit per batch).
GEMINI_BATCH = 100
ENCODINGS = ("float", "base64")
_JSON = b"application/json"


class _Malformed(ValueError):
    """
    Gemini answered 2xx with something that is not an embeddings batch.
    """


@attrs.frozen
class EmbeddingRequest:
    """
    A validated C{POST /v1/embeddings} body.
    """

    inputs: tuple[str, ...]
    #: The Gemini model, without C{models/}.
    model: str
    #: C{outputDimensionality}, when asked for.
    dimensions: int | None
    #: "float" (a list of numbers) or "base64" (little-endian float32 bytes).
    encoding_format: str


def parse_embedding_request(raw: bytes, default_model: str, provider_ids: tuple[str, ...]) -> EmbeddingRequest:
    """
    Parse and check a request body.

    @param default_model: EMBEDDING_MODEL.
    @raise APIError: 400 naming the first problem found.
    """
    body = json_body(raw)
    given = body.get("input")
    inputs = [given] if isinstance(given, str) else given
    if not isinstance(inputs, list) or not inputs or not all(isinstance(text, str) and text for text in inputs):
        raise bad_request(
            "input must be a non-empty string or a non-empty list of non-empty strings "
            "(token id arrays are not supported by this gateway)",
            param="input",
        )
    if len(inputs) > MAX_INPUTS:
        raise bad_request(f"input holds {len(inputs)} texts; at most {MAX_INPUTS} per request", param="input")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string", param="model")
    if model is not None and not printable_model(model):
        raise bad_request(UNPRINTABLE_MODEL, param="model")
    chosen = default_model
    if model:
        provider_id, slash, name = model.partition("/")
        if slash and provider_id == PROVIDER:
            chosen = name.strip().removeprefix("models/")
            if not chosen:
                raise bad_request(f"model {model!r} names no model; use gemini/<model>", param="model")
        elif slash and provider_id in provider_ids:
            raise bad_request(
                f"{provider_id} has no embeddings API: embeddings come from Gemini; "
                f"leave model out (EMBEDDING_MODEL, {default_model}) or name gemini/<model>",
                param="model",
            )
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise bad_request("dimensions must be a whole number of at least 1", param="dimensions")
    encoding = body.get("encoding_format", "float")
    if encoding is None:
        encoding = "float"
    if encoding not in ENCODINGS:
        raise bad_request("encoding_format must be float or base64", param="encoding_format")
    return EmbeddingRequest(tuple(inputs), chosen, dimensions, encoding)


def estimated_tokens(inputs: tuple[str, ...]) -> int:
    """
    The tokens a consumer is counted for embedding C{inputs}: Gemini's
    C{batchEmbedContents} answer carries no token count, so each text
    counts one token per 4 characters, rounded up (Google's rule of thumb,
    U{https://ai.google.dev/gemini-api/docs/tokens}).
    """
    return sum(-(-len(text) // 4) for text in inputs)


def to_batch_embed(inputs: tuple[str, ...] | list[str], model: str, dimensions: int | None) -> dict[str, Any]:
    """
    The C{batchEmbedContents} request for C{inputs}.
    """
    name = f"models/{model}"
    requests = []
    for text in inputs:
        entry: dict[str, Any] = {"model": name, "content": {"parts": [{"text": text}]}}
        if dimensions is not None:
            entry["outputDimensionality"] = dimensions
        requests.append(entry)
    return {"requests": requests}


def vectors(body: bytes, expected: int) -> list[list[float]]:
    """
    The vectors of a C{batchEmbedContents} answer.

    @raise _Malformed: not C{{"embeddings": [{"values": [...]}, ...]}} with
        C{expected} entries.
    """
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _Malformed("the answer is not JSON") from None
    embeddings = document.get("embeddings") if isinstance(document, dict) else None
    if not isinstance(embeddings, list) or len(embeddings) != expected:
        raise _Malformed(f'the answer has no "embeddings" list of {expected}')
    found = []
    for embedding in embeddings:
        values = embedding.get("values") if isinstance(embedding, dict) else None
        if not isinstance(values, list):
            raise _Malformed('an embedding has no "values" list')
        found.append(values)
    return found


def encode_base64(values: list[float]) -> str:
    """
    C{values} as OpenAI's base64 encoding: little-endian float32 bytes.
    """
    packed = array("f", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def embedding_list(found: list[list[float]], model: str, encoding_format: str) -> dict[str, Any]:
    """
    OpenAI's list shape.  Gemini's batch answer counts no tokens, so
    C{usage} is reported as 0s rather than guessed.
    """
    encode = encode_base64 if encoding_format == "base64" else None
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(values) if encode else values}
            for i, values in enumerate(found)
        ],
        "model": model,
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }


class Embeddings(_Authenticated):
    """
    C{POST /v1/embeddings}, always to Gemini (see the module docstring),
    within UPSTREAM_TIMEOUT; inputs beyond one Gemini batch go in several
    calls, one after the other.
    """

    def render_POST(self, request: Request) -> Any:
        context = self.context
        started = context.reactor.seconds()
        holder = self.authenticate(request, started)
        try:
            parsed = parse_embedding_request(
                request.content.read() if request.content is not None else b"",
                context.embedding_model,
                context.providers.ids,
            )
            if PROVIDER not in context.providers.ids:
                raise bad_request("embeddings come from Gemini, and no Gemini provider is declared", param="model")
        except APIError as error:
            context.completed(request, started, error.status, outcome=error.code, consumer=holder.consumer)
            raise
        adapter = self.usable(request, PROVIDER, started, holder)
        assert isinstance(adapter, GeminiAdapter)
        route = Route(PROVIDER, parsed.model)
        consumers = context.consumers
        if consumers is None or holder is GATEWAY:
            return self._start(request, adapter, parsed, route, started, holder)
        # A consumer's limits: rpm, tpm and budget with the prompt tokens, models.
        admission = consumers.admit(holder, PROVIDER, parsed.model, 0, estimated_tokens(parsed.inputs))
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
        adapter: GeminiAdapter,
        parsed: EmbeddingRequest,
        route: Route,
        started: float,
        holder: Holder,
    ) -> Any:
        context = self.context
        #: The provider calls made, the last one perhaps still without a
        #: verdict for the breaker.
        calls: list[PooledCall] = []
        call = Deferred.fromCoroutine(self._embed(adapter, parsed, calls))
        call.addTimeout(context.timeout, context.reactor)
        context.call_started()
        gone: list[bool] = []

        def client_gone(reason: Failure) -> None:
            gone.append(True)
            call.cancel()

        def counted(status: int, outcome: str | None, answered: bool) -> None:
            context.completed(request, started, status, route, outcome=outcome, consumer=holder.consumer)
            if context.consumers is not None:
                # Accounting also releases what the admission reserved.
                usage = {"prompt_tokens": estimated_tokens(parsed.inputs)} if answered else None
                context.consumers.account(
                    holder, PROVIDER, parsed.model, status, usage, context.reactor.seconds() - started
                )

        def answer(result: bytes | Failure) -> None:
            if calls:
                # A call cut short with no verdict: its client left (no
                # verdict), else no answer in time or no connection.
                if gone:
                    calls[-1].abandoned()
                else:
                    calls[-1].failed()
            if gone:
                # Counted as chat counts a client that left: 499, with the
                # estimate when the provider had answered.
                return counted(499, CLIENT_GONE, not isinstance(result, Failure))
            if isinstance(result, Failure):
                error = self._error(result, adapter)
                body = error_response(request, error)
                status, outcome = error.status, error.code
            else:
                request.setHeader(b"Content-Type", _JSON)
                body = result
                status, outcome = 200, None
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.setHeader(b"X-OpenClaw-Provider", PROVIDER.encode())
            request.setHeader(b"X-OpenClaw-Model", parsed.model.encode())
            request.write(body)
            request.finish()
            counted(status, outcome, status == 200)
            return None

        def ended(result: object) -> None:
            context.call_ended()

        request.notifyFinish().addErrback(client_gone)
        call.addBoth(answer)
        call.addErrback(lambda reason: context.log.failure("embeddings call failed unexpectedly", reason))
        call.addBoth(ended)
        return NOT_DONE_YET

    async def _embed(self, adapter: GeminiAdapter, parsed: EmbeddingRequest, calls: list[PooledCall]) -> bytes:
        """
        The client's answer: the vectors of every batch, in OpenAI's list
        shape.
        """
        found: list[list[float]] = []
        inputs = parsed.inputs
        status = 200
        for start in range(0, len(inputs), GEMINI_BATCH):
            batch = inputs[start : start + GEMINI_BATCH]
            body = orjson.dumps(to_batch_embed(batch, parsed.model, parsed.dimensions))
            status, answer = await self._batch(adapter, parsed.model, body, calls)
            try:
                found.extend(vectors(answer, len(batch)))
            except _Malformed as e:
                raise _Malformed(f"{e} (HTTP {status})") from None
        try:
            return orjson.dumps(embedding_list(found, parsed.model, parsed.encoding_format))
        except (TypeError, ValueError, OverflowError):
            # orjson's JSONEncodeError (nested lists past its 254 levels) is
            # a TypeError, as array's refusal of a value that is no number.
            raise _Malformed(f"an embedding's values are not all numbers (HTTP {status})") from None

    async def _batch(
        self, adapter: GeminiAdapter, model: str, body: bytes, calls: list[PooledCall]
    ) -> tuple[int, bytes]:
        """
        One C{batchEmbedContents} call with the next usable key, under the
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

    def _error(self, reason: Failure, adapter: GeminiAdapter) -> APIError:
        value = reason.value
        refused = pooled_call_error(adapter, value)
        if refused is not None:
            return refused
        if isinstance(value, UpstreamHTTPError):
            return upstream_http_error(PROVIDER, value.status, str(value))
        if isinstance(value, (TimeoutError, CancelledError)):
            return upstream_timeout(PROVIDER, self.context.timeout, "the embeddings")
        if isinstance(value, _Malformed):
            return upstream_failed(PROVIDER, str(value), "upstream_malformed")
        if isinstance(value, Exception) and not isinstance(
            value, (AssertionError, AttributeError, TypeError, KeyError)
        ):
            return upstream_failed(PROVIDER, adapter.describe(reason))
        self.context.log.failure("embeddings call failed unexpectedly", reason)
        return internal_error()
