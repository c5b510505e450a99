"""
Tool call ids that carry what Gemini needs back: its own function-call id
and the part's C{thoughtSignature}.

Gemini 3 refuses the next turn of a tool loop unless each signed
C{functionCall} part comes back with its signature
(U{https://ai.google.dev/gemini-api/docs/thought-signatures}), and clients
(the openai SDK, LangChain) rebuild an assistant message from its standard
fields only: C{tool_calls[].id} is the one field that is always echoed.
So an id is C{call_<24 hex digits>}, followed, when there is something to
carry, by C{_gs1_} and the URL-safe base64 (unpadded) of the JSON array
C{[gemini_id, signature]}: letters, digits, C{_} and C{-} only.

Decoding is defensive: an id that does not parse exactly is just an id
(another gateway's, Kimi's, a hand-written one), never an error.

The format is the data plane's, not the Gemini translation's alone: a tool
loop begun on Gemini may go on with another provider after a switch or a
failover, so the request's validation notes an id that carries something
(L{openclaw.dataplane.request}) and every other provider's wire sends it
L{plain} (L{openclaw.providers.openai_compatible}).
"""

from __future__ import annotations

import base64
import binascii
import random

import orjson

#: Joins the random id and the carried payload.
MARK = "_gs1_"
#: The longest payload carried (encoded characters); a signature that would
#: make a longer id is not carried, and the call comes back to Gemini with
#: Google's placeholder instead
#: (L{SKIP_SIGNATURE <openclaw.providers.gemini.translate.SKIP_SIGNATURE>}:
#: the turn is still accepted, with less context).
MAX_PAYLOAD = 16384


def new_call_id(gemini_id: str | None = None, signature: str | None = None) -> str:
    """
    A fresh tool call id, carrying C{gemini_id} and C{signature} when given.
    """
    # 96 random bits, as for completion ids (see openclaw.providers.wire).
    call_id = f"call_{random.getrandbits(96):024x}"
    if gemini_id is None and signature is None:
        return call_id
    payload = base64.urlsafe_b64encode(orjson.dumps([gemini_id, signature])).rstrip(b"=").decode("ascii")
    if len(payload) > MAX_PAYLOAD:
        if gemini_id is None:
            return call_id
        return new_call_id(gemini_id)
    return call_id + MARK + payload


def carried(call_id: str) -> tuple[str | None, str | None]:
    """
    C{(gemini_id, signature)} carried by C{call_id}; C{(None, None)} for an
    id that carries nothing (or not in this format).
    """
    _, mark, payload = call_id.partition(MARK)
    if not mark or not payload:
        return None, None
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return None, None
    if not (isinstance(decoded, list) and len(decoded) == 2):
        return None, None
    gemini_id, signature = decoded
    return (
        gemini_id if isinstance(gemini_id, str) else None,
        signature if isinstance(signature, str) else None,
    )


def plain(call_id: str) -> str:
    """
    C{call_id} without what it carries: the short id another provider is
    given (Kimi needs no signature, and gets an id of ordinary length).
    """
    head, mark, _ = call_id.partition(MARK)
    return head if mark and head else call_id
