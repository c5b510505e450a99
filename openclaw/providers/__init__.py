"""
Model providers: one adapter per provider behind one small interface
(L{ProviderAdapter}), and the L{ProviderRegistry} that owns the shared HTTP
client and runs health checks across them.
"""

from openclaw.providers.base import ProbeResult, ProviderAdapter
from openclaw.providers.errors import (
    MalformedResponse,
    MissingKey,
    ProbeTimedOut,
    ProviderError,
    UnknownProvider,
    UpstreamHTTPError,
)
from openclaw.providers.gemini import GeminiAdapter
from openclaw.providers.kimi import KimiAdapter
from openclaw.providers.registry import ProviderRegistry

__all__ = [
    "GeminiAdapter",
    "KimiAdapter",
    "MalformedResponse",
    "MissingKey",
    "ProbeResult",
    "ProbeTimedOut",
    "ProviderAdapter",
    "ProviderError",
    "ProviderRegistry",
    "UnknownProvider",
    "UpstreamHTTPError",
]
