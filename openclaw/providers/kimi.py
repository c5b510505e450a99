"""
Kimi, by Moonshot AI: an OpenAI-compatible API
(U{https://platform.moonshot.ai/docs}).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

import attrs

from openclaw.consumers.prices import Price
from openclaw.providers.openai_compatible import OpenAICompatibleAdapter, ReasoningKeptWire
from openclaw.providers.wire import Wire


def thinks(model: str) -> bool:
    """
    Whether C{model} is one of Kimi's own models (C{kimi-*}), which read
    C{reasoning_content} in a history: the thinking ones (C{kimi-k2.5} and
    later, C{kimi-k2-thinking}) require it on an assistant message with
    tool calls ("thinking is enabled but reasoning_content is missing in
    assistant tool call message at index N"), the others
    (C{kimi-k2-0905-preview}) take it; not the C{moonshot-v1-*} models.
    """
    return model[:5].lower() == "kimi-"


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
    #: OpenAI's format, but for Moonshot's thinking models' rule (L{thinks}):
    #: an assistant message with tool calls always has a reasoning_content.
    wire: ClassVar[Wire] = ReasoningKeptWire(thinks=thinks)
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
