"""
A chat completion request: checked once at the door, so that every
provider gets a body it can be given (or translated from), and a caller
learns what is wrong with theirs in a 400 that names the field rather than
in a provider's error about a body it never wrote.
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson

from openclaw.dataplane.errors import bad_request
from openclaw.routing import Route

#: Roles accepted as they are; "developer" (OpenAI's newer name) means system.
ROLES = frozenset({"system", "user", "assistant", "developer"})
#: Request fields this gateway does not carry to every provider alike;
#: refused rather than honoured by one provider and dropped by the other.
UNSUPPORTED_FIELDS = ("tools", "tool_choice", "functions", "function_call")


@attrs.frozen
class ChatRequest:
    """
    A validated C{POST /v1/chat/completions} body.

    @ivar body: the caller's JSON object, messages with role "developer"
        already turned into "system"; every other field as sent.
    """

    body: dict[str, Any]
    stream: bool
    #: C{stream_options.include_usage}: end the stream with a usage chunk.
    include_usage: bool

    @property
    def model(self) -> Any:
        return self.body.get("model")


def parse_chat_request(raw: bytes) -> ChatRequest:
    """
    Parse and check a request body.

    @raise APIError: 400 naming the first problem found.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    for name in UNSUPPORTED_FIELDS:
        if body.get(name):
            raise bad_request(
                f"{name} is not supported by this gateway: tool and function calling "
                "cannot be carried to every provider yet",
                param=name,
            )
    _check_messages(body.get("messages"))
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string", param="model")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("stream must be true or false", param="stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad_request("stream_options must be an object", param="stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise bad_request(
                "stream_options.include_usage must be true or false", param="stream_options.include_usage"
            )
    _check_number(body, "temperature", 0.0, 2.0)
    _check_number(body, "top_p", 0.0, 1.0)
    _check_count(body, "max_tokens")
    _check_count(body, "max_completion_tokens")
    _check_count(body, "n")
    _check_stop(body.get("stop"))
    return ChatRequest(body, bool(stream), include_usage)


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise bad_request("messages is required: a non-empty list of {role, content}", param="messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content}", param="messages")
    developer = False
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with role and content", param=where)
        role = message.get("role")
        if role not in ROLES:
            if role == "tool":
                raise bad_request(
                    f"{where}.role: tool messages are not supported by this gateway", param=f"{where}.role"
                )
            raise bad_request(
                f"{where}.role must be one of system, user, assistant, developer (got {role!r})",
                param=f"{where}.role",
            )
        developer = developer or role == "developer"
        _check_content(message.get("content", ...), f"{where}.content")
    if developer:
        messages[:] = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]


def _check_content(content: Any, where: str) -> None:
    if isinstance(content, str):
        return
    if content is ...:
        raise bad_request(f"{where} is required", param=where)
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of text parts", param=where)
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise bad_request(
                f'{where}[{j}] must be {{"type": "text", "text": "..."}}: '
                "only text content is supported by this gateway",
                param=f"{where}[{j}]",
            )


def _check_number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad_request(f"{name} must be a number from {low:g} to {high:g}", param=name)


def _check_count(body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_request(f"{name} must be a whole number of at least 1", param=name)


def _check_stop(stop: Any) -> None:
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request("stop must be a string or a list of strings", param="stop")


def choose_route(model: Any, active: Route, provider_ids: tuple[str, ...]) -> Route:
    """
    The route for one call: C{"<provider>/<model>"} picks that provider and
    model for this call only; anything else (a bare model name, nothing)
    means the active route, so an application's hard-coded model never
    overrides the operator's choice.

    @raise APIError: 400 for C{"kimi/"} with no model after the slash.
    """
    if isinstance(model, str):
        provider_id, slash, name = model.partition("/")
        if slash and provider_id in provider_ids:
            if not name.strip():
                raise bad_request(f"model {model!r} names no model; use {provider_id}/<model>", param="model")
            return Route(provider_id, name.strip())
    return active
