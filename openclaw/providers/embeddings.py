"""
Embeddings as a provider capability: the interface a provider's
embeddings API offers (L{EmbeddingsWire}), declared as
L{ProviderAdapter.embeddings <openclaw.providers.base.ProviderAdapter.embeddings>}
by the providers that have one, and left None by those that have none
(Kimi: Moonshot offers no embeddings API).

The data plane (L{openclaw.dataplane.embeddings}) takes OpenAI's
C{POST /v1/embeddings} request, sends the inputs in batches of at most
L{EmbeddingsWire.batch_size} through the provider's key pool and breaker,
and answers in OpenAI's list shape with the vectors the wire read.  The
OpenAI-compatible wire (passed through) is
L{openclaw.providers.openai_compatible.OpenAIEmbeddings}, Gemini's
(translated to C{batchEmbedContents}) is
L{openclaw.providers.gemini.embeddings.GeminiEmbeddings}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from openclaw.providers.wire import MalformedAnswer


class EmbeddingsBatch(NamedTuple):
    """
    What one upstream embeddings call answered, read.
    """

    #: One vector per input, in the inputs' order.
    vectors: list[list[float]]
    #: The input tokens the provider counted (OpenAI's
    #: C{usage.prompt_tokens}); None when its answer counts none.
    prompt_tokens: int | None


class EmbeddingsWire(Protocol):
    """
    One provider's embeddings API.
    """

    #: The most texts one upstream call may carry (the provider's limit).
    @property
    def batch_size(self) -> int: ...

    #: The model used when EMBEDDING_MODEL names this provider's model
    #: by default (the variable unset).
    @property
    def default_model(self) -> str: ...

    def model_name(self, text: str) -> str:
        """
        A model as EMBEDDING_MODEL or a request's C{"<provider>/<model>"}
        writes it (without the provider), as the provider names it.

        @raise ValueError: C{text} names no model this API could serve.
        """

    def url(self, base_url: str, model: str) -> bytes:
        """
        Where an embeddings call for C{model} goes (absolute URL, never
        carrying the key).
        """

    def request_body(self, inputs: Sequence[str], model: str, dimensions: int | None) -> bytes:
        """
        The upstream body embedding C{inputs} (at most L{batch_size}) with
        C{model}; C{dimensions} is OpenAI's field (None: the model's own).

        @raise APIError: 400 naming the field, for a request the provider
            would refuse (answered as it is; nothing is sent).
        """

    def answer(self, body: bytes, expected: int) -> EmbeddingsBatch:
        """
        The vectors of a 2xx upstream answer to a call with C{expected}
        inputs.

        @raise MalformedAnswer: the body is not such an answer.
        """


def number_lists(found: Any, expected: int, container: str, field: str) -> list[list[float]]:
    """
    C{found}, checked to be C{expected} lists (the vectors; their entries
    are checked when encoded for the client).

    @param container: how the answer names its list of embeddings, for
        the message (C{"embeddings"}, C{"data"}).
    @param field: how it names one vector (C{"values"}, C{"embedding"}).
    @raise MalformedAnswer: it is not.
    """
    if not isinstance(found, list) or len(found) != expected:
        raise MalformedAnswer(f'the answer has no "{container}" list of {expected}')
    if not all(isinstance(values, list) for values in found):
        raise MalformedAnswer(f'an embedding has no "{field}" list')
    return found


__all__ = ["EmbeddingsBatch", "EmbeddingsWire", "number_lists"]
