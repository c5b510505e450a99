"""
Kimi, by Moonshot AI: an OpenAI-compatible API
(U{https://platform.moonshot.ai/docs}).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import attrs

from openclaw.consumers.prices import Price
from openclaw.dataplane.request import ChatRequest
from openclaw.providers.openai_compatible import OpenAICompatibleAdapter, OpenAIWire
from openclaw.providers.wire import Wire

#: What an assistant message with tool calls is given as its
#: C{reasoning_content} when it has none, for a Kimi model that thinks:
#: Moonshot refuses the history otherwise ("thinking is enabled but
#: reasoning_content is missing in assistant tool call message at index
#: N"), and takes an empty string for a missing one (earendil-works/pi
#: #4251).  A history made by another provider, or by a client that did not
#: keep the field, has none: the equivalent of Gemini's placeholder
#: thought signature.
REASONING_PLACEHOLDER = "(reasoning not kept)"


def thinks(model: str) -> bool:
    """
    Whether C{model} is one of Kimi's own models (C{kimi-*}), which read
    C{reasoning_content} in a history: the thinking ones (C{kimi-k2.5} and
    later, C{kimi-k2-thinking}) require it on an assistant message with
    tool calls, the others (C{kimi-k2-0905-preview}) take it; not the
    C{moonshot-v1-*} models.
    """
    return model[:5].lower() == "kimi-"


def _with_reasoning(message: Any) -> Any:
    if (
        isinstance(message, dict)
        and message.get("role") == "assistant"
        and message.get("tool_calls")
        and not (isinstance(message.get("reasoning_content"), str) and message["reasoning_content"].strip())
    ):
        return {**message, "reasoning_content": REASONING_PLACEHOLDER}
    return message


@attrs.frozen
class KimiWire(OpenAIWire):
    """
    OpenAI's chat format, passed through (L{OpenAIWire}), but for one
    rule of Moonshot's thinking models (L{thinks}): every assistant message
    with tool calls carries a C{reasoning_content}, L{REASONING_PLACEHOLDER}
    where it had none.
    """

    def request_body(self, chat: ChatRequest, model: str) -> bytes:
        messages = chat.body["messages"]
        if thinks(model):
            filled = [_with_reasoning(message) for message in messages]
            if any(new is not old for new, old in zip(filled, messages, strict=True)):
                chat = attrs.evolve(chat, body={**chat.body, "messages": filled})
        return super().request_body(chat, model)


@attrs.define(kw_only=True)
class KimiAdapter(OpenAICompatibleAdapter):
    """
    Moonshot's API; C{MOONSHOT_API_KEY}, the name Moonshot's own tools use,
    is read when C{KIMI_API_KEY} is not set.
    """

    id: ClassVar[str] = "kimi"
    display_name: ClassVar[str] = "Kimi (Moonshot AI)"
    key_variables: ClassVar[tuple[str, ...]] = ("KIMI_API_KEY", "MOONSHOT_API_KEY")
    base_url_variable: ClassVar[str] = "KIMI_BASE_URL"
    #: Beside MOONSHOT_API_KEY: a mainland account's https://api.moonshot.cn/v1.
    base_url_aliases: ClassVar[tuple[str, ...]] = ("MOONSHOT_BASE_URL",)
    default_base_url: ClassVar[str] = "https://api.moonshot.ai/v1"
    model_variable: ClassVar[str] = "KIMI_MODEL"
    default_model_id: ClassVar[str] = "moonshot-v1-8k"
    wire: ClassVar[Wire] = KimiWire()
    #: List prices (platform.moonshot.ai/docs/pricing), USD per million tokens.
    prices: ClassVar[Mapping[str, Price]] = MappingProxyType(
        {
            "moonshot-v1-8k": Price(0.20, 2.00),
            "moonshot-v1-32k": Price(1.00, 3.00),
            "moonshot-v1-128k": Price(2.00, 5.00),
            "kimi-k2.5": Price(0.60, 3.00, 0.10),
        }
    )


__all__ = ["KimiAdapter"]
