"""
Gemini's embeddings: OpenAI's embeddings request as C{batchEmbedContents}
(U{https://ai.google.dev/api/embeddings}), and its answer's vectors.
"""

from __future__ import annotations

import math
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
    tokens.  Its vectors are given unit length (L{unit_length}), as
    OpenAI's are.
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
                # As the data plane's own range check answers.
                code="integer_above_max_value",
            )
        return orjson.dumps(to_batch_embed(inputs, model, dimensions))

    def answer(self, body: bytes, expected: int) -> EmbeddingsBatch:
        embeddings = json_object(body).get("embeddings")
        found = None
        if isinstance(embeddings, list):
            found = [e.get("values") if isinstance(e, dict) else None for e in embeddings]
        vectors = number_lists(found, expected, "embeddings", "values")
        return EmbeddingsBatch([unit_length(vector) for vector in vectors], None)


#: How far from 1 a vector's length may be and still be taken as unit
#: length (float rounding over thousands of numbers).
UNIT_TOLERANCE = 1e-6


def unit_length(vector: list[Any]) -> list[Any]:
    """
    C{vector} scaled to Euclidean length 1, as OpenAI's embeddings are (so
    clients rank by dot product).  Google normalises only
    gemini-embedding-001's full 3072 numbers; for a smaller
    C{outputDimensionality} it says "you need to normalize the embeddings"
    (U{https://ai.google.dev/gemini-api/docs/embeddings}).  A vector of
    length 1 already, of length 0 or not finite, or holding what is not a
    number (refused when encoded for the client) is returned as it is.
    """
    try:
        length = math.hypot(*vector)
    except TypeError:
        return vector
    if not length or not math.isfinite(length) or abs(length - 1.0) <= UNIT_TOLERANCE:
        return vector
    return [number / length for number in vector]


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


__all__ = ["GeminiEmbeddings", "to_batch_embed", "unit_length"]
