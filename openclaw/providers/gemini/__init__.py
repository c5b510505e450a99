"""
Google Gemini: the adapter (L{adapter<openclaw.providers.gemini.adapter>}:
settings, auth, models listing, chat URLs) and the chat translation
(L{translate<openclaw.providers.gemini.translate>}: OpenAI chat completions
to C{generateContent} and back).
"""

from openclaw.providers.gemini.adapter import GeminiAdapter
from openclaw.providers.gemini.translate import GeminiWire

__all__ = ["GeminiAdapter", "GeminiWire"]
