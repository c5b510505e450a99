"""
Tokens a consumer's call is expected to cost, from its request alone: what
it reserves of its budget and C{tpm} while in flight (L{prompt_tokens}),
and what it is charged when its own usage is never known: its client left
a stream before the final usage chunk and the rest of the stream did not
bring it in time, the stream broke, or the provider sent none, or one
whose C{prompt_tokens} and C{completion_tokens} are not both counts
(L{token_count}: C{"10"}, C{true}, C{-5}, C{4.2} are none; a count that
is given is taken, the other estimated).

Each text counts one token per 4 bytes of its UTF-8, rounded up
(L{tokens_of}; the same rule as embeddings).  The prompt is what
providers bill as prompt (L{prompt_tokens}): every message's text parts,
name, tool calls and tool call id (a tool result is a message's text),
the C{tools} declared (their function definitions as JSON, as sent:
OpenAI and Gemini bill them as prompt tokens), C{response_format}'s JSON
schema, L{MESSAGE_TOKENS} more per message and L{REPLY_TOKENS} for the
reply's priming (the chat template's own tokens), and each image part at
a flat L{IMAGE_TOKENS} (L{IMAGE_LOW_TOKENS} with C{detail} C{low}).  The
completion is the text the gateway saw (content, reasoning, tool call
names and arguments, the legacy C{function_call}'s too).

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


#: The tokens each chat message adds beyond its text: OpenAI's chat
#: template wraps each in 3 tokens, and its role is 1 more ("How to count
#: tokens with tiktoken", openai-cookbook, examples/How_to_count_tokens_with_tiktoken.ipynb:
#: C{tokens_per_message = 3}, the role's value counted as a text).
MESSAGE_TOKENS = 4
#: The tokens of the reply's priming, once per call (the same notebook:
#: "every reply is primed with <|start|>assistant<|message|>", 3 tokens).
REPLY_TOKENS = 3
#: The flat estimate of an image part (C{image_url}) of detail C{auto} or
#: C{high}: OpenAI's count for a 1024 x 1024 picture, 85 tokens plus 170
#: for each of its 4 tiles of 512 px once scaled to 768 px
#: (U{https://platform.openai.com/docs/guides/images-vision}, "Calculating
#: costs"); Gemini counts 258 per 768 px tile
#: (U{https://ai.google.dev/gemini-api/docs/tokens}), 1032 for the same
#: picture.  Its data URL's bytes are not counted as text.
IMAGE_TOKENS = 765
#: An image part of detail C{low}: OpenAI's flat 85 tokens (the same page).
IMAGE_LOW_TOKENS = 85


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


def _image_tokens(value: Any) -> int:
    """
    The flat estimate of the image parts of a message's C{content}
    (L{IMAGE_TOKENS} each, L{IMAGE_LOW_TOKENS} for C{detail} C{low}); 0
    for a string.
    """
    if not isinstance(value, list):
        return 0
    total = 0
    for part in value:
        if isinstance(part, dict) and part.get("type") == "image_url":
            image = part.get("image_url")
            low = isinstance(image, dict) and image.get("detail") == "low"
            total += IMAGE_LOW_TOKENS if low else IMAGE_TOKENS
    return total


def _json_bytes(value: Any) -> int:
    """
    The bytes of C{value} as compact JSON (a tool's definition, a schema:
    what the provider is sent and bills, give or take its own layout); 0
    for None.
    """
    if value is None:
        return 0
    try:
        return len(orjson.dumps(value))
    except (orjson.JSONEncodeError, TypeError):
        return text_bytes(str(value))


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


def _schema(body: dict[str, Any]) -> Any:
    """
    C{response_format}'s C{json_schema} (its name, description and schema),
    or None.
    """
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        return response_format.get("json_schema")
    return None


def _prompt(body: dict[str, Any]) -> tuple[int, int]:
    """
    C{(bytes, tokens)} of a chat request's prompt: the UTF-8 bytes of its
    text (L{prompt_bytes}) and the tokens counted apart (the chat
    template's, the images'), in one pass over its messages.
    """
    messages = body.get("messages")
    size = fixed = 0
    if isinstance(messages, list) and messages:
        fixed = REPLY_TOKENS
        for message in messages:
            if isinstance(message, dict):
                content = message.get("content")
                size += _text_bytes(content) + _calls_bytes(message.get("tool_calls"))
                fixed += MESSAGE_TOKENS
                if type(content) is list:
                    fixed += _image_tokens(content)
                for field in ("name", "tool_call_id"):
                    value = message.get(field)
                    if isinstance(value, str):
                        size += text_bytes(value)
    tools = body.get("tools")
    if tools:
        size += _json_bytes(tools)
    if "response_format" in body:
        size += _json_bytes(_schema(body))
    return size, fixed


def prompt_bytes(body: dict[str, Any]) -> int:
    """
    The UTF-8 bytes of a chat request's prompt text: its C{messages}'
    content, names, tool call ids and the tool calls of assistant turns,
    its C{tools} (as compact JSON) and C{response_format}'s JSON schema.
    Image parts and the chat template count nothing here (L{prompt_tokens}
    adds them).
    """
    return _prompt(body)[0]


def prompt_tokens(body: dict[str, Any]) -> int:
    """
    The estimated tokens of a chat request's prompt: L{prompt_bytes}, one
    token per 4 bytes rounded up, plus L{MESSAGE_TOKENS} per message,
    L{REPLY_TOKENS} once (for a request with messages) and each image
    part's flat estimate (L{IMAGE_TOKENS}, L{IMAGE_LOW_TOKENS}): what a
    consumer's call reserves of its budget and C{tpm} for its prompt at
    admission, and is charged for it when the provider counts none.
    Costs a few microseconds for a plain call (one pass over the
    messages; C{tools} and a schema are serialised once each, by orjson).
    """
    size, fixed = _prompt(body)
    return tokens_of(size) + fixed


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
    "IMAGE_LOW_TOKENS",
    "IMAGE_TOKENS",
    "MESSAGE_TOKENS",
    "REPLY_TOKENS",
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
