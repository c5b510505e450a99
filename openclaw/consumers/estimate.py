"""
Tokens a consumer is charged when a call's own usage is never known: its
client left a stream before the final usage chunk and the rest of the
stream did not bring it in time, the stream broke, or the provider sent
none, or one whose C{prompt_tokens} and C{completion_tokens} are not both
counts (L{token_count}: C{"10"}, C{true}, C{-5}, C{4.2} are none; a
count that is given is taken, the other estimated).  Each text counts one token per 4 bytes of its UTF-8, rounded up
(L{tokens_of}; the same rule as embeddings): the prompt's messages, and the
completion text the gateway saw (content, reasoning, tool call names and
arguments, the legacy C{function_call}'s too).

Why bytes: Google's rule of thumb is about 4 characters a token for
English (U{https://ai.google.dev/gemini-api/docs/tokens}), which an ASCII
text's bytes give exactly; a Chinese, Japanese or Korean character is 3
bytes of UTF-8, so about 0.75 token, where Moonshot counts about 1.5 to 2
Chinese characters a token
(U{https://platform.moonshot.cn/docs/introduction}): counted by
characters, such a prompt would reserve 3 to 4 times too little of a
budget or C{tpm}.
"""

from __future__ import annotations

from typing import Any

import orjson

_DATA = b"data:"


#: The largest token count read from a provider's usage: far beyond any
#: call's (a model's context is at most millions of tokens), and a larger
#: one (C{1e300}) would be priced into a spend of its size.
MAX_TOKEN_COUNT = 10**12


def token_count(value: Any) -> int | None:
    """
    A token count of a provider's C{usage} (C{prompt_tokens},
    C{completion_tokens}, their details), or None when it is none: a count
    is a whole number from 0 to L{MAX_TOKEN_COUNT}; a JSON number such as
    C{10.0} that is whole counts as 10.  A bool, a string (C{"10"}), a fraction, a negative
    number, NaN or an infinity is no count: such a usage is not known, and
    a consumer is charged the estimate instead (never 0 for an unreadable
    count).
    """
    if type(value) is int:
        return value if 0 <= value <= MAX_TOKEN_COUNT else None
    if type(value) is float and 0 <= value <= MAX_TOKEN_COUNT and value.is_integer():
        return int(value)
    return None


def count_or_zero(value: Any) -> int:
    """
    L{token_count}, 0 for no count: what the metrics and the usage rows
    add up.
    """
    if type(value) is int and 0 <= value <= MAX_TOKEN_COUNT:
        # Every call's path (GATEWAY_API_KEYS' too): the usual count, at once.
        return value
    return token_count(value) or 0


def known_counts(usage: Any) -> tuple[int | None, int | None]:
    """
    C{(prompt_tokens, completion_tokens)} of OpenAI's C{usage} object as
    L{token_count} reads them: None for each that is no count (or no
    C{usage}).  The usage is I{known} when neither is None.
    """
    if not isinstance(usage, dict):
        return None, None
    return token_count(usage.get("prompt_tokens")), token_count(usage.get("completion_tokens"))


def tokens_of(size: int) -> int:
    """
    The estimated tokens of C{size} bytes of UTF-8 text: one per 4 bytes,
    rounded up (see the module's docstring for why bytes).
    """
    return -(-size // 4) if size > 0 else 0


def text_bytes(text: str) -> int:
    """
    The length of C{text} in UTF-8 bytes (an ASCII text's is its length,
    found without encoding it: C{str.isascii} is O(1)).
    """
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _text_bytes(value: Any) -> int:
    """
    The bytes of a message's C{content}: a string, or a list of parts
    whose C{text} counts (OpenAI's content parts).
    """
    if isinstance(value, str):
        return text_bytes(value)
    if isinstance(value, list):
        return sum(
            text_bytes(part["text"]) for part in value if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def _calls_bytes(calls: Any) -> int:
    """
    The bytes of OpenAI C{tool_calls} (whole or stream deltas): each
    function's name and arguments.
    """
    if not isinstance(calls, list):
        return 0
    return sum(_function_bytes(call.get("function")) for call in calls if isinstance(call, dict))


def _function_bytes(function: Any) -> int:
    """
    The bytes of one call's C{function} (C{{name, arguments}}, as in a
    tool call or the legacy C{function_call}).
    """
    if not isinstance(function, dict):
        return 0
    return sum(text_bytes(function[field]) for field in ("name", "arguments") if isinstance(function.get(field), str))


def prompt_bytes(body: dict[str, Any]) -> int:
    """
    The UTF-8 bytes of a chat request's C{messages}: their content and the
    tool calls of assistant turns.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(
        _text_bytes(message.get("content")) + _calls_bytes(message.get("tool_calls"))
        for message in messages
        if isinstance(message, dict)
    )


def prompt_tokens(body: dict[str, Any]) -> int:
    """
    The estimated tokens of a chat request's prompt (L{prompt_bytes},
    one token per 4 bytes, rounded up): what a consumer's call reserves of
    its budget and C{tpm} for its prompt at admission.
    """
    return tokens_of(prompt_bytes(body))


def _message_bytes(message: Any) -> int:
    if not isinstance(message, dict):
        return 0
    return (
        _text_bytes(message.get("content"))
        + _text_bytes(message.get("reasoning_content"))
        + _calls_bytes(message.get("tool_calls"))
        # The legacy shape's one call (Gemini's answer to functions).
        + _function_bytes(message.get("function_call"))
    )


def chunk_bytes(events: bytes) -> int:
    """
    The completion text's UTF-8 bytes in C{chat.completion.chunk} events, as
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
            total += sum(_message_bytes(c.get("delta")) for c in choices if isinstance(c, dict))
    return total


def answer_bytes(answer: bytes) -> int:
    """
    The completion text's UTF-8 bytes in a whole C{chat.completion}: each
    choice's C{message}.
    """
    try:
        document = orjson.loads(answer)
    except orjson.JSONDecodeError:
        return 0
    choices = document.get("choices") if isinstance(document, dict) else None
    if not isinstance(choices, list):
        return 0
    return sum(_message_bytes(c.get("message")) for c in choices if isinstance(c, dict))


def estimated_usage(
    prompt_size: int, completion_size: int, prompt: int | None = None, completion: int | None = None
) -> dict[str, int]:
    """
    OpenAI's C{usage} shape for the estimate of a prompt and a completion
    of these many UTF-8 bytes (L{prompt_bytes}, L{chunk_bytes},
    L{answer_bytes}).

    @param prompt: the prompt tokens the provider counted, if it did
        (L{known_counts}): taken instead of the prompt's estimate.
    @param completion: the same, for the completion.
    """
    if prompt is None:
        prompt = tokens_of(prompt_size)
    if completion is None:
        completion = tokens_of(completion_size)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


__all__ = [
    "answer_bytes",
    "chunk_bytes",
    "estimated_usage",
    "known_counts",
    "prompt_bytes",
    "prompt_tokens",
    "text_bytes",
    "token_count",
    "tokens_of",
]
