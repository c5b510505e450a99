"""
Kimi, by Moonshot AI: an OpenAI-compatible API with Bearer auth.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
from treq.client import HTTPClient
from twisted.web.iweb import IAgent

from openclaw.providers.base import ProviderAdapter
from openclaw.providers.errors import MalformedResponse
from openclaw.providers.fetch import Exchange
from openclaw.settings import Settings


@attrs.define(kw_only=True)
class KimiAdapter(ProviderAdapter):
    """
    C{GET {base}/models} answers C{{"object": "list", "data": [{"id": ...}]}};
    chat is OpenAI's C{POST {base}/chat/completions}, streamed or not.
    """

    id: ClassVar[str] = "kimi"
    display_name: ClassVar[str] = "Kimi (Moonshot AI)"
    key_variable: ClassVar[str] = "KIMI_API_KEY"
    base_url_variable: ClassVar[str] = "KIMI_BASE_URL"
    wire_format: ClassVar[str] = "openai"

    @classmethod
    def from_settings(
        cls, settings: Settings, http: HTTPClient, reactor: Any, agent: IAgent
    ) -> KimiAdapter:
        return cls(
            http=http,
            agent=agent,
            reactor=reactor,
            base_url=settings.kimi_base_url,
            api_key=settings.kimi_api_key,
            default_model=settings.kimi_model,
            timeout=settings.health_check_timeout,
        )

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def chat_url(self, model: str, stream: bool) -> bytes:
        # The model (and whether to stream) travels in the body.
        return f"{self.base_url}/chat/completions".encode()

    async def fetch_model_ids(self, exchange: Exchange) -> list[str]:
        document = await self.get_json("models", exchange)
        data = document.get("data") if isinstance(document, dict) else None
        if not isinstance(data, list):
            raise MalformedResponse(
                f'models listing has no "data" list; does {self.base_url_variable} '
                "point at an OpenAI-compatible API (ending in /v1)?"
            )
        return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
