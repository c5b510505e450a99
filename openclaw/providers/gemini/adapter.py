"""
Google Gemini (the Generative Language API), authenticated with the
C{x-goog-api-key} header so the key never appears in a URL or access log;
its chat format is translated (L{openclaw.providers.gemini.translate}).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar
from urllib.parse import quote

import attrs

from openclaw.consumers.prices import Price
from openclaw.dataplane.errors import CONTEXT_LENGTH_EXCEEDED
from openclaw.providers.base import ProviderAdapter
from openclaw.providers.embeddings import EmbeddingsWire
from openclaw.providers.errors import MalformedResponse, Refusal, RefusalKind
from openclaw.providers.fetch import Exchange
from openclaw.providers.gemini.embeddings import MODEL_PREFIX, GeminiEmbeddings
from openclaw.providers.gemini.errors import (
    GOOGLE_CONTEXT_EXCEEDED,
    GOOGLE_FAILED_PRECONDITION,
    GOOGLE_INVALID_ARGUMENT,
    GOOGLE_KEY_INVALID,
    GOOGLE_OUTPUT_DIMENSIONALITY,
    GOOGLE_STATUSES,
    google_error_reasons,
    google_error_status,
    google_retry_delay,
)
from openclaw.providers.gemini.translate import GeminiWire
from openclaw.providers.wire import Wire

#: The largest page the API serves.
PAGE_SIZE = 1000
#: A listing longer than this many pages is a misbehaving server, not a catalogue.
MAX_PAGES = 50
#: Chat URLs remembered per adapter (a request may name any model, so the
#: memo is bounded; past it, URLs are built each time).
MAX_CACHED_URLS = 64


@attrs.define(kw_only=True)
class GeminiAdapter(ProviderAdapter):
    """
    C{GET {base}/models?pageSize=1000} answers C{{"models": [{"name":
    "models/<id>"}], "nextPageToken": ...}}; pages are followed with
    C{pageToken}.  Chat is C{POST {base}/models/<model>:generateContent}, or
    C{:streamGenerateContent?alt=sse} for server-sent events; embeddings
    are C{:batchEmbedContents} (L{GeminiEmbeddings}).
    """

    id: ClassVar[str] = "gemini"
    display_name: ClassVar[str] = "Google Gemini"
    key_variables: ClassVar[tuple[str, ...]] = ("GEMINI_API_KEY",)
    base_url_variable: ClassVar[str] = "GEMINI_BASE_URL"
    default_base_url: ClassVar[str] = "https://generativelanguage.googleapis.com/v1beta"
    model_variable: ClassVar[str] = "GEMINI_MODEL"
    default_model_id: ClassVar[str] = "gemini-flash-latest"
    wire: ClassVar[Wire] = GeminiWire()
    #: List prices (ai.google.dev/gemini-api/docs/pricing, prompts up to
    #: 200k tokens), USD per million tokens.
    prices: ClassVar[Mapping[str, Price]] = MappingProxyType(
        {
            "gemini-2.5-flash": Price(0.30, 2.50, 0.075),
            "gemini-2.5-pro": Price(1.25, 10.00, 0.31),
            "gemini-flash-latest": Price(0.30, 2.50, 0.075),
            "gemini-embedding-001": Price(0.15, 0.0),
        }
    )
    embeddings: ClassVar[EmbeddingsWire | None] = GeminiEmbeddings()
    #: An error event's C{error.status} is a Google canonical code.
    error_statuses: ClassVar[Mapping[str, int]] = GOOGLE_STATUSES
    #: Google limits each model apart (U{https://ai.google.dev/gemini-api/docs/rate-limits}).
    rests_by_model: ClassVar[bool] = True
    #: (model, stream) -> chat URL, so that a call does not quote its model
    #: name again (urllib's quote is the costly part of building the URL).
    _chat_urls: dict[tuple[str, bool], bytes] = attrs.field(factory=dict, init=False, repr=False, eq=False)

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"x-goog-api-key": key}

    def refusal(self, status: int, body: bytes, retry_after: str | None = None) -> Refusal:
        """
        As every provider's, and Google's own rule: a bad key is answered
        C{400 INVALID_ARGUMENT} ("API key not valid") whose details hold a
        C{google.rpc.ErrorInfo} of reason C{API_KEY_INVALID}
        (U{https://ai.google.dev/gemini-api/docs/troubleshooting}): the
        key at fault, not the request.  A C{400 FAILED_PRECONDITION} ("User
        location is not supported for the API use", or a free tier not
        available in the country and billing required: the same page) is
        the operator's Google project that cannot serve, not the client's
        request nor the key: L{RefusalKind.ACCOUNT}.  A C{400
        INVALID_ARGUMENT} for a prompt over the model's context window
        (L{GOOGLE_CONTEXT_EXCEEDED}) is OpenAI's C{context_length_exceeded},
        which agents act on.  One naming the embedding request's
        C{outputDimensionality} names OpenAI's C{dimensions}.
        """
        refusal = super().refusal(status, body, retry_after)
        if status == 400 and GOOGLE_KEY_INVALID in google_error_reasons(body):
            return attrs.evolve(refusal, kind=RefusalKind.AUTH)
        if status == 400 and google_error_status(body) == GOOGLE_FAILED_PRECONDITION:
            return attrs.evolve(refusal, kind=RefusalKind.ACCOUNT)
        if (
            status == 400
            and refusal.kind == RefusalKind.REQUEST
            and GOOGLE_CONTEXT_EXCEEDED.search(refusal.message)
            and google_error_status(body) == GOOGLE_INVALID_ARGUMENT
        ):
            return attrs.evolve(refusal, code=CONTEXT_LENGTH_EXCEEDED)
        if (
            status == 400
            and refusal.kind == RefusalKind.REQUEST
            and GOOGLE_OUTPUT_DIMENSIONALITY.search(refusal.message)
        ):
            return attrs.evolve(
                refusal,
                param="dimensions",
                advice="send dimensions within the range Google names, or leave it out for the model's whole vector",
            )
        return refusal

    def retry_delay(self, body: bytes) -> float | None:
        """
        Google says how long to wait in the answer's details, as a
        C{google.rpc.RetryInfo} (C{"retryDelay": "7s"}), not as a
        C{Retry-After} header
        (U{https://ai.google.dev/gemini-api/docs/troubleshooting}).
        """
        return google_retry_delay(body)

    def normalize_model(self, model: str) -> str:
        return model.removeprefix(MODEL_PREFIX)

    def chat_url(self, model: str, stream: bool) -> bytes:
        url = self._chat_urls.get((model, stream))
        if url is None:
            # Quoted whole: a model name is one path segment, whatever it holds.
            name = quote(self.normalize_model(model), safe="")
            method = "streamGenerateContent?alt=sse" if stream else "generateContent"
            url = f"{self.base_url}/models/{name}:{method}".encode()
            if len(self._chat_urls) < MAX_CACHED_URLS:
                self._chat_urls[(model, stream)] = url
        return url

    async def fetch_model_ids(self, exchange: Exchange) -> list[str]:
        ids: list[str] = []
        params = {"pageSize": str(PAGE_SIZE)}
        for _ in range(MAX_PAGES):
            document = await self.get_json("models", exchange, params)
            models = document.get("models", []) if isinstance(document, dict) else None
            if not isinstance(models, list):
                raise MalformedResponse(
                    f'models listing has no "models" list; does {self.base_url_variable} '
                    "point at the Generative Language API (ending in /v1beta)?"
                )
            ids.extend(
                self.normalize_model(m["name"])
                for m in models
                if isinstance(m, dict) and isinstance(m.get("name"), str)
            )
            token = document.get("nextPageToken")
            if not token or not isinstance(token, str):
                return ids
            params = {"pageSize": str(PAGE_SIZE), "pageToken": token}
        raise MalformedResponse(f"models listing did not end after {MAX_PAGES} pages")
