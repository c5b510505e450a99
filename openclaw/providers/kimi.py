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
from openclaw.providers.openai_compatible import OpenAICompatibleAdapter


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
    default_base_url: ClassVar[str] = "https://api.moonshot.ai/v1"
    model_variable: ClassVar[str] = "KIMI_MODEL"
    default_model_id: ClassVar[str] = "moonshot-v1-8k"
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
