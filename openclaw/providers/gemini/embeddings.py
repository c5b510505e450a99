"""
Gemini's embeddings: OpenAI's embeddings request as C{batchEmbedContents}
(U{https://ai.google.dev/api/embeddings}), and its answer's vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import attrs
import orjson

from openclaw.dataplane.errors import bad_request
from openclaw.providers.embeddings import EmbeddingsBatch, number_lists
from openclaw.providers.gemini.translate import INT32_RANGE
from openclaw.providers.wire import json_object

MODEL_PREFIX = "models/"


@attrs.frozen
class GeminiEmbeddings:
    """
    C{POST {base}/models/<model>:batchEmbedContents} with one request per
    text (C{outputDimensionality} is OpenAI's C{dimensions}), answered
    C{{"embeddings": [{"values": [...]}, ...]}}.  The answer counts no
    tokens.
    """

    #: Requests per C{batchEmbedContents} call (Gemini's limit per batch).
    batch_size: int = 100
    default_model: str = "gemini-embedding-001"

    def model_name(self, text: str) -> str:
        """
        C{<model>} or C{models/<model>}, as C{<model>}.
        """
        model = text.strip().removeprefix(MODEL_PREFIX)
        if not model or "/" in model:
            raise ValueError(text)
        return model

    def url(self, base_url: str, model: str) -> bytes:
        # Quoted whole: a model name is one path segment, whatever it holds.
        return f"{base_url}/models/{quote(model, safe='')}:batchEmbedContents".encode()

    def request_body(self, inputs: Sequence[str], model: str, dimensions: int | None) -> bytes:
        """
        The C{batchEmbedContents} body (L{to_batch_embed}).

        @raise APIError: 400 naming C{dimensions} when it is past
            C{outputDimensionality}'s int32 range (L{INT32_RANGE}), which
            Google would refuse; nothing is sent.
        """
        if dimensions is not None and dimensions > INT32_RANGE[1]:
            raise bad_request(
                f"dimensions must be from 1 to {INT32_RANGE[1]} on Gemini (its outputDimensionality is a 32-bit "
                "integer); send dimensions in that range, or leave it out for the model's own",
                param="dimensions",
            )
        return orjson.dumps(to_batch_embed(inputs, model, dimensions))

    def answer(self, body: bytes, expected: int) -> EmbeddingsBatch:
        embeddings = json_object(body).get("embeddings")
        found = None
        if isinstance(embeddings, list):
            found = [e.get("values") if isinstance(e, dict) else None for e in embeddings]
        return EmbeddingsBatch(number_lists(found, expected, "embeddings", "values"), None)


def to_batch_embed(inputs: Sequence[str], model: str, dimensions: int | None) -> dict[str, Any]:
    """
    The C{batchEmbedContents} request for C{inputs}.
    """
    name = f"{MODEL_PREFIX}{model}"
    requests = []
    for text in inputs:
        entry: dict[str, Any] = {"model": name, "content": {"parts": [{"text": text}]}}
        if dimensions is not None:
            entry["outputDimensionality"] = dimensions
        requests.append(entry)
    return {"requests": requests}


__all__ = ["GeminiEmbeddings", "to_batch_embed"]
