"""
What a chat call looks like on each provider's wire, one class per
L{ProviderAdapter.wire_format<openclaw.providers.ProviderAdapter.wire_format>}:

- C{"openai"} (Kimi): the caller's body with the model substituted, and
  the answer passed back byte for byte.
- C{"gemini"}: translated both ways by L{openclaw.dataplane.gemini}.

Each turns a validated request into the upstream body, the upstream answer
into an OpenAI C{chat.completion}, and upstream stream events into
C{chat.completion.chunk} payloads.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Protocol

import attrs
import orjson

from openclaw.dataplane import gemini
from openclaw.dataplane.request import ChatRequest
from openclaw.dataplane.sse import DONE, Event


class MalformedAnswer(ValueError):
    """
    A 2xx upstream answer that is not what the provider's API returns.
    """


class StreamBroken(Exception):
    """
    The upstream stream reported an error, or sent something unreadable,
    mid-answer.  C{str()} says what.
    """


class StreamTranslation(Protocol):
    """
    One streamed answer on its way through.
    """

    #: The upstream said the stream is over (OpenAI's C{[DONE]}).
    ended: bool

    @property
    def complete(self) -> bool:
        """
        The answer is whole: a stream that stops now has not been cut.
        """

    def payloads(self, event: Event) -> list[bytes]:
        """
        The C{chat.completion.chunk} JSON payloads for one upstream event.

        @raise StreamBroken: the event is an error or unreadable.
        """

    def closing(self) -> list[bytes]:
        """
        Payloads to send after the last event, before C{[DONE]}.
        """


class Wire(Protocol):
    def request_body(self, chat: ChatRequest, model: str) -> bytes: ...

    def completion(self, body: bytes, model: str, created: int) -> bytes:
        """
        The C{chat.completion} JSON for a 2xx upstream body.

        @raise MalformedAnswer: the body is not a JSON object.
        """

    def stream(self, chat: ChatRequest, model: str, created: int) -> StreamTranslation: ...


def _completion_id() -> str:
    # 96 random bits: unique enough for an id, which is no secret (it goes
    # to the caller, and names nothing anyone could act on).  Python's own
    # generator (reseeded in a forked child) costs no getrandom(2) per
    # call, as secrets would: that was a fifth of the Gemini translation's
    # time in the gateway under load.
    return f"chatcmpl-{random.getrandbits(96):024x}"


def _object(body: bytes) -> dict[str, Any]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise MalformedAnswer("the answer is not JSON") from None
    if not isinstance(document, dict):
        raise MalformedAnswer("the answer is not a JSON object")
    return document


def _error_message(document: dict[str, Any]) -> str | None:
    error = document.get("error")
    if error is None:
        return None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return str(error)


@attrs.frozen
class OpenAIWire:
    """
    An OpenAI-compatible provider: nothing to translate.
    """

    def request_body(self, chat: ChatRequest, model: str) -> bytes:
        return orjson.dumps({**chat.body, "model": model})

    def completion(self, body: bytes, model: str, created: int) -> bytes:
        document = _object(body)
        if not isinstance(document.get("choices"), list):
            raise MalformedAnswer('the answer has no "choices" list')
        return body

    def stream(self, chat: ChatRequest, model: str, created: int) -> OpenAIStream:
        return OpenAIStream()


@attrs.define
class OpenAIStream:
    """
    Events passed on as they are; complete only once C{[DONE]} has come.
    """

    ended: bool = False

    @property
    def complete(self) -> bool:
        return self.ended

    def payloads(self, event: Event) -> list[bytes]:
        data = event.data
        if data == DONE:
            self.ended = True
            return []
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise StreamBroken("an event of the stream is not JSON") from None
        if not isinstance(document, dict):
            raise StreamBroken("an event of the stream is not a JSON object")
        message = _error_message(document)
        if message is not None:
            raise StreamBroken(message)
        # A multi-line event re-encoded on one line; the usual one as it came.
        return [orjson.dumps(document) if b"\n" in data else data]

    def closing(self) -> list[bytes]:
        return []


@attrs.frozen
class GeminiWire:
    """
    Google's Generative Language API.
    """

    def request_body(self, chat: ChatRequest, model: str) -> bytes:
        return orjson.dumps(gemini.to_gemini(chat.body))

    def completion(self, body: bytes, model: str, created: int) -> bytes:
        return orjson.dumps(gemini.from_gemini(_object(body), model, _completion_id(), created))

    def stream(self, chat: ChatRequest, model: str, created: int) -> GeminiStreamTranslation:
        return GeminiStreamTranslation(
            gemini.GeminiStream(model, _completion_id(), created, chat.include_usage)
        )


@attrs.define
class GeminiStreamTranslation:
    """
    Gemini events to chunks.  Gemini has no end marker: the stream is over
    when the connection's body ends, and whole if every choice has
    finished by then.
    """

    translation: gemini.GeminiStream
    ended: bool = False

    @property
    def complete(self) -> bool:
        return self.translation.complete

    def payloads(self, event: Event) -> list[bytes]:
        try:
            document = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            raise StreamBroken("an event of the stream is not JSON") from None
        try:
            chunk = self.translation.chunk(document)
        except gemini.GeminiStreamError as e:
            raise StreamBroken(str(e)) from None
        return [] if chunk is None else [orjson.dumps(chunk)]

    def closing(self) -> list[bytes]:
        chunk = self.translation.closing()
        return [] if chunk is None else [orjson.dumps(chunk)]


#: The wire for each L{ProviderAdapter.wire_format}.
WIRES: Mapping[str, Wire] = MappingProxyType({"openai": OpenAIWire(), "gemini": GeminiWire()})
