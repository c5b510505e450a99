"""
Kimi, by Moonshot AI: an OpenAI-compatible API
(U{https://platform.moonshot.ai/docs}).
"""

from __future__ import annotations

from typing import ClassVar

import attrs

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


__all__ = ["KimiAdapter"]
