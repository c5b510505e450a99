"""
Model providers: one module per provider, each defining a subclass of
L{ProviderAdapter} (the plug-in point: see L{openclaw.providers.base}), and
the L{ProviderRegistry} that owns the shared HTTP client and runs health
checks across them.

The built-in providers are registered here, in L{BUILTIN_PROVIDERS}, with
the defaults among them (L{DEFAULT_PROVIDER}, L{DEFAULT_EMBEDDING_PROVIDER}),
and nowhere else: settings, the registry, metrics and the stand-in upstream
all read the declarations they are given.
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
from openclaw.providers.openai_compatible import OpenAICompatibleAdapter
from openclaw.providers.registry import ProviderRegistry

#: The providers the gateway ships with, in the order reports list them.
BUILTIN_PROVIDERS: tuple[type[ProviderAdapter], ...] = (KimiAdapter, GeminiAdapter)
#: The provider calls go to when DEFAULT_PROVIDER is unset (when declared).
DEFAULT_PROVIDER: type[ProviderAdapter] = GeminiAdapter
#: The provider C{POST /v1/embeddings} uses when EMBEDDING_MODEL is unset
#: (when declared), with its embeddings API's default model.
DEFAULT_EMBEDDING_PROVIDER: type[ProviderAdapter] = GeminiAdapter

__all__ = [
    "BUILTIN_PROVIDERS",
    "DEFAULT_EMBEDDING_PROVIDER",
    "DEFAULT_PROVIDER",
    "GeminiAdapter",
    "KimiAdapter",
    "MalformedResponse",
    "MissingKey",
    "OpenAICompatibleAdapter",
    "ProbeResult",
    "ProbeTimedOut",
    "ProviderAdapter",
    "ProviderError",
    "ProviderRegistry",
    "UnknownProvider",
    "UpstreamHTTPError",
]
