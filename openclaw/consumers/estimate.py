"""
Tokens a consumer is charged when a call's own usage is never known: its
client left a stream before the final usage chunk and the rest of the
stream did not bring it in time, the stream broke, or the provider sent
none.  Each text counts one token per 4 characters, rounded up (Google's
rule of thumb, U{https://ai.google.dev/gemini-api/docs/tokens}; the same
rule as embeddings): the prompt's messages, and the completion text the
gateway saw (content, reasoning, tool call names and arguments, the
legacy C{function_call}'s too).
"""

from __future__ import annotations

from typing import Any

import orjson

_DATA = b"data:"


def tokens_of(characters: int) -> int:
    """
    One token per 4 characters, rounded up.
    """
    return -(-characters // 4) if characters > 0 else 0


def _text_characters(value: Any) -> int:
    """
    The characters of a message's C{content}: a string, or a list of
    parts whose C{text} counts (OpenAI's content parts).
    """
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(len(part["text"]) for part in value if isinstance(part, dict) and isinstance(part.get("text"), str))
    return 0


def _calls_characters(calls: Any) -> int:
    """
    The characters of OpenAI C{tool_calls} (whole or stream deltas): each
    function's name and arguments.
    """
    if not isinstance(calls, list):
        return 0
    return sum(_function_characters(call.get("function")) for call in calls if isinstance(call, dict))


def _function_characters(function: Any) -> int:
    """
    The characters of one call's C{function} (C{{name, arguments}}, as in
    a tool call or the legacy C{function_call}).
    """
    if not isinstance(function, dict):
        return 0
    return sum(len(function[field]) for field in ("name", "arguments") if isinstance(function.get(field), str))


def prompt_characters(body: dict[str, Any]) -> int:
    """
    The characters of a chat request's C{messages}: their content and the
    tool calls of assistant turns.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(
        _text_characters(message.get("content")) + _calls_characters(message.get("tool_calls"))
        for message in messages
        if isinstance(message, dict)
    )


def prompt_tokens(body: dict[str, Any]) -> int:
    """
    The estimated tokens of a chat request's prompt (L{prompt_characters},
    one token per 4 characters, rounded up): what a consumer's call
    reserves of its budget and C{tpm} for its prompt at admission.
    """
    return tokens_of(prompt_characters(body))


def _message_characters(message: Any) -> int:
    if not isinstance(message, dict):
        return 0
    return (
        _text_characters(message.get("content"))
        + _text_characters(message.get("reasoning_content"))
        + _calls_characters(message.get("tool_calls"))
        # The legacy shape's one call (Gemini's answer to functions).
        + _function_characters(message.get("function_call"))
    )


def chunk_characters(events: bytes) -> int:
    """
    The completion characters in C{chat.completion.chunk} events, as
    encoded for the client (C{data: {...}} lines): each choice's
    C{delta}.  Lines that are not such JSON count nothing.
    """
    total = 0
    for line in events.split(b"\n"):
        if not line.startswith(_DATA):
            continue
        try:
            chunk = orjson.loads(line[len(_DATA) :])
        except orjson.JSONDecodeError:
            continue
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        if isinstance(choices, list):
            total += sum(_message_characters(c.get("delta")) for c in choices if isinstance(c, dict))
    return total


def answer_characters(answer: bytes) -> int:
    """
    The completion characters of a whole C{chat.completion}: each
    choice's C{message}.
    """
    try:
        document = orjson.loads(answer)
    except orjson.JSONDecodeError:
        return 0
    choices = document.get("choices") if isinstance(document, dict) else None
    if not isinstance(choices, list):
        return 0
    return sum(_message_characters(c.get("message")) for c in choices if isinstance(c, dict))


def estimated_usage(prompt_chars: int, completion_chars: int) -> dict[str, int]:
    """
    OpenAI's C{usage} shape for the estimate.
    """
    prompt, completion = tokens_of(prompt_chars), tokens_of(completion_chars)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


__all__ = [
    "answer_characters",
    "chunk_characters",
    "estimated_usage",
    "prompt_characters",
    "prompt_tokens",
    "tokens_of",
]
