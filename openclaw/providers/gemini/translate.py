"""
OpenAI chat completions to Gemini's C{generateContent} and back: plain
functions over JSON-shaped values, no I/O, so each rule is testable alone,
and L{GeminiWire}, the Gemini provider's chat format built on them.

Requests: system (and developer) messages become C{systemInstruction};
user and assistant messages become C{contents} with roles C{user} and
C{model} (consecutive messages of one role merged into one turn, as Gemini
wants turns to alternate); sampling fields go to C{generationConfig}.

Answers: C{candidates} become C{choices}, C{finishReason} becomes
C{finish_reason}, C{usageMetadata} becomes C{usage}; Gemini's C{modelVersion}
(the model that really answered) becomes C{model}.  Thought summaries
(parts marked C{thought}) are not part of the answer and are dropped.
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson

from openclaw.dataplane.request import ChatRequest
from openclaw.dataplane.sse import Event
from openclaw.providers.wire import StreamBroken, completion_id, json_object

#: Gemini finish reasons that mean "cut short by a filter".
_FILTERED = frozenset({"SAFETY", "RECITATION", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "IMAGE_SAFETY"})
_FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length"}

#: OpenAI request field -> generationConfig field, copied as they are.
_GENERATION_FIELDS = (
    ("temperature", "temperature"),
    ("top_p", "topP"),
    ("n", "candidateCount"),
    ("presence_penalty", "presencePenalty"),
    ("frequency_penalty", "frequencyPenalty"),
    ("seed", "seed"),
)


class GeminiStreamError(Exception):
    """
    An event in a Gemini stream that is an error rather than an answer.
    """


def to_gemini(body: dict[str, Any]) -> dict[str, Any]:
    """
    The C{generateContent} request for a validated chat completion body
    (see L{openclaw.dataplane.request.parse_chat_request}).
    """
    system: list[dict[str, str]] = []
    contents: list[dict[str, Any]] = []
    for message in body["messages"]:
        parts = _parts(message["content"])
        role = message["role"]
        if role in ("system", "developer"):
            system.extend(parts)
            continue
        turn_role = "user" if role == "user" else "model"
        if contents and contents[-1]["role"] == turn_role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": turn_role, "parts": parts})
    request: dict[str, Any] = {"contents": contents}
    if system:
        request["systemInstruction"] = {"parts": system}
    config = generation_config(body)
    if config:
        request["generationConfig"] = config
    return request


def generation_config(body: dict[str, Any]) -> dict[str, Any]:
    """
    C{generationConfig} from the OpenAI sampling fields present in C{body}.
    """
    config: dict[str, Any] = {}
    for openai_name, gemini_name in _GENERATION_FIELDS:
        value = body.get(openai_name)
        if value is not None:
            config[gemini_name] = value
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        config["maxOutputTokens"] = max_tokens
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_object":
        config["responseMimeType"] = "application/json"
    return config


def _parts(content: str | list[dict[str, Any]]) -> list[dict[str, str]]:
    if isinstance(content, str):
        return [{"text": content}]
    return [{"text": part["text"]} for part in content]


def finish_reason(reason: str | None) -> str | None:
    """
    OpenAI's C{finish_reason} for Gemini's C{finishReason}: STOP is stop,
    MAX_TOKENS is length, the filters are content_filter; any other reason
    (OTHER, MALFORMED_FUNCTION_CALL, ...) is passed on in lower case rather
    than passed off as a normal stop.
    """
    if reason is None:
        return None
    mapped = _FINISH_REASONS.get(reason)
    if mapped is not None:
        return mapped
    if reason in _FILTERED:
        return "content_filter"
    return reason.lower()


def usage(metadata: Any) -> dict[str, Any] | None:
    """
    OpenAI's C{usage} for Gemini's C{usageMetadata} (None when absent).
    Tokens spent thinking are reported as C{reasoning_tokens}.
    """
    if not isinstance(metadata, dict):
        return None
    prompt = metadata.get("promptTokenCount", 0)
    completion = metadata.get("candidatesTokenCount", 0)
    result: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": metadata.get("totalTokenCount", prompt + completion),
    }
    thoughts = metadata.get("thoughtsTokenCount")
    if thoughts:
        result["completion_tokens_details"] = {"reasoning_tokens": thoughts}
    return result


def _text(candidate: dict[str, Any]) -> str:
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list):
        return ""
    return "".join(
        part["text"]
        for part in parts
        if isinstance(part, dict) and isinstance(part.get("text"), str) and not part.get("thought")
    )


def _candidates(document: dict[str, Any]) -> list[dict[str, Any]]:
    candidates = document.get("candidates")
    if not isinstance(candidates, list):
        return []
    return [c for c in candidates if isinstance(c, dict)]


def _blocked(document: dict[str, Any]) -> bool:
    # A prompt refused outright comes back with no candidates at all.
    feedback = document.get("promptFeedback")
    return isinstance(feedback, dict) and bool(feedback.get("blockReason"))


def from_gemini(document: dict[str, Any], model: str, completion_id: str, created: int) -> dict[str, Any]:
    """
    The C{chat.completion} for a C{GenerateContentResponse}.

    @param model: the model asked for, reported when the answer does not
        name its C{modelVersion}.
    """
    choices = [
        {
            "index": candidate.get("index", i),
            "message": {"role": "assistant", "content": _text(candidate)},
            "finish_reason": finish_reason(candidate.get("finishReason")),
            "logprobs": None,
        }
        for i, candidate in enumerate(_candidates(document))
    ]
    if not choices and _blocked(document):
        choices = [
            {
                "index": 0,
                "message": {"role": "assistant", "content": ""},
                "finish_reason": "content_filter",
                "logprobs": None,
            }
        ]
    completion: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": document.get("modelVersion") or model,
        "choices": choices,
    }
    reported = usage(document.get("usageMetadata"))
    if reported is not None:
        completion["usage"] = reported
    return completion


@attrs.define
class GeminiStream:
    """
    One streamed answer: each C{GenerateContentResponse} event in, the
    C{chat.completion.chunk} it makes out.  Every chunk of one answer shares
    its id; the first delta of each choice carries the role.

    The stream is L{complete} once every choice has a finish reason: Gemini
    has no end marker, so a stream that stops before that was cut short.
    """

    model: str
    completion_id: str
    created: int
    include_usage: bool = False
    _started: set[int] = attrs.field(factory=set)
    _finished: set[int] = attrs.field(factory=set)
    _usage: dict[str, Any] | None = None
    #: The C{modelVersion} the events name, once one has.
    _served_by: str | None = None

    @property
    def complete(self) -> bool:
        return bool(self._finished) and self._finished >= self._started

    @property
    def usage(self) -> dict[str, Any] | None:
        """
        The usage of the latest event that carried C{usageMetadata}, as
        OpenAI's C{usage}; None until one has.
        """
        return self._usage

    def chunk(self, document: Any) -> dict[str, Any] | None:
        """
        The chunk for one event, or None when it carries nothing to send.

        @raise GeminiStreamError: the event is an error, or not an object.
        """
        if not isinstance(document, dict):
            raise GeminiStreamError("an event of the stream is not a JSON object")
        error = document.get("error")
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else None
            raise GeminiStreamError(str(message or error))
        reported = usage(document.get("usageMetadata"))
        if reported is not None:
            self._usage = reported
        served_by = document.get("modelVersion")
        if served_by:
            self._served_by = served_by
        choices = []
        for i, candidate in enumerate(_candidates(document)):
            index = candidate.get("index", i)
            delta: dict[str, str] = {}
            if index not in self._started:
                self._started.add(index)
                delta["role"] = "assistant"
            text = _text(candidate)
            if text:
                delta["content"] = text
            reason = finish_reason(candidate.get("finishReason"))
            if reason is not None:
                self._finished.add(index)
            if delta or reason is not None:
                choices.append({"index": index, "delta": delta, "finish_reason": reason, "logprobs": None})
        if not choices and _blocked(document) and not self._started:
            self._started.add(0)
            self._finished.add(0)
            choices = [
                {"index": 0, "delta": {"role": "assistant"}, "finish_reason": "content_filter", "logprobs": None}
            ]
        if not choices:
            return None
        return self._chunk(choices)

    def closing(self) -> dict[str, Any] | None:
        """
        The usage chunk OpenAI sends last when asked to
        (C{stream_options.include_usage}), once the stream is complete.
        """
        if not self.include_usage or self._usage is None:
            return None
        return {**self._chunk([]), "usage": self._usage}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        """
        One C{chat.completion.chunk} of this answer.
        """
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self._served_by or self.model,
            "choices": choices,
        }


@attrs.frozen
class GeminiWire:
    """
    Google's Generative Language API: requests translated by L{to_gemini},
    answers by L{from_gemini}, streams by L{GeminiStream}.
    """

    def request_body(self, chat: ChatRequest, model: str) -> bytes:
        return orjson.dumps(to_gemini(chat.body))

    def completion(self, body: bytes, model: str, created: int) -> bytes:
        return orjson.dumps(from_gemini(json_object(body), model, completion_id(), created))

    def stream(self, chat: ChatRequest, model: str, created: int) -> GeminiStreamTranslation:
        return GeminiStreamTranslation(GeminiStream(model, completion_id(), created, chat.include_usage))


@attrs.define
class GeminiStreamTranslation:
    """
    Gemini events to chunks.  Gemini has no end marker: the stream is over
    when the connection's body ends, and whole if every choice has
    finished by then.
    """

    translation: GeminiStream
    ended: bool = False

    @property
    def complete(self) -> bool:
        return self.translation.complete

    @property
    def usage(self) -> dict[str, Any] | None:
        return self.translation.usage

    def payloads(self, event: Event) -> list[bytes]:
        try:
            document = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            raise StreamBroken("an event of the stream is not JSON") from None
        try:
            chunk = self.translation.chunk(document)
        except GeminiStreamError as e:
            raise StreamBroken(str(e)) from None
        return [] if chunk is None else [orjson.dumps(chunk)]

    def closing(self) -> list[bytes]:
        chunk = self.translation.closing()
        return [] if chunk is None else [orjson.dumps(chunk)]
