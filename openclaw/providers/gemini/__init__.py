"""
Google Gemini: the adapter (L{adapter<openclaw.providers.gemini.adapter>}:
settings, auth, models listing, chat URLs) and the chat translation
(L{translate<openclaw.providers.gemini.translate>}: OpenAI chat completions
to C{generateContent} and back) and the embeddings translation
(L{embeddings<openclaw.providers.gemini.embeddings>}: OpenAI embeddings to
C{batchEmbedContents} and back), and what Google's error answers say
(L{errors<openclaw.providers.gemini.errors>}: a refused key, how long to
wait, canonical codes), and what its tool call ids carry
(L{callids<openclaw.providers.gemini.callids>}: Gemini's call id and
thought signature).
"""

from openclaw.providers.gemini.adapter import GeminiAdapter
from openclaw.providers.gemini.embeddings import GeminiEmbeddings
from openclaw.providers.gemini.translate import GeminiWire

__all__ = ["GeminiAdapter", "GeminiEmbeddings", "GeminiWire"]
