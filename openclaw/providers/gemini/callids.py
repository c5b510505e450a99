"""
What Gemini's tool call ids carry (the payload of
L{openclaw.dataplane.callids}'s envelope): Gemini's own function-call id
and the part's C{thoughtSignature}.

Gemini 3 refuses the next turn of a tool loop unless each signed
C{functionCall} part comes back with its signature
(U{https://ai.google.dev/gemini-api/docs/thought-signatures}).  The
payload is the URL-safe base64 (unpadded) of the JSON array
C{[gemini_id, signature]}.

Decoding is defensive: an id that does not parse exactly is just an id
(another gateway's, Kimi's, a hand-written one), never an error.
"""

from __future__ import annotations

import base64
import binascii

import orjson
from twisted.logger import ILogObserver, Logger

from openclaw.dataplane import callids

_log = Logger(namespace="openclaw.providers.gemini")

#: The longest payload carried (encoded characters); a signature that would
#: make a longer id is not carried (nor a Gemini id that would), and the call comes back to Gemini with
#: Google's placeholder instead
#: (L{SKIP_SIGNATURE <openclaw.providers.gemini.translate.SKIP_SIGNATURE>}:
#: the turn is still accepted, with less context).
MAX_PAYLOAD = 16384


def logger(log: ILogObserver | None) -> Logger:
    """
    The logger of Gemini's translation whose events go to C{log}; with
    None, to the global log publisher (L{_log}).
    """
    return _log if log is None else Logger(namespace=_log.namespace, observer=log)


def new_call_id(gemini_id: str | None = None, signature: str | None = None, log: ILogObserver | None = None) -> str:
    """
    A fresh tool call id, carrying C{gemini_id} and C{signature} when given
    (an empty string is not given: see L{carried}); a signature too long
    to carry is warned of to C{log} (L{logger}).
    """
    gemini_id, signature = gemini_id or None, signature or None
    if gemini_id is None and signature is None:
        return callids.new_call_id()
    payload = base64.urlsafe_b64encode(orjson.dumps([gemini_id, signature])).rstrip(b"=").decode("ascii")
    if len(payload) > MAX_PAYLOAD:
        # Without the signature, when it was what made it too long; with
        # nothing, when the id alone is.
        if signature is not None and (gemini_id is None or _fits(gemini_id)):
            logger(log).warn(
                "a Gemini thought signature of {length} characters is too long to carry in the tool call id (at "
                "most {limit} characters of payload): the call goes back to Gemini with Google's placeholder, "
                "which Gemini accepts with less context",
                length=len(signature),
                limit=MAX_PAYLOAD,
            )
        return callids.new_call_id() if gemini_id is None or signature is None else new_call_id(gemini_id)
    return callids.new_call_id(payload)


def _fits(gemini_id: str) -> bool:
    """
    Whether C{gemini_id} alone fits in L{MAX_PAYLOAD}: when it does, the
    signature is what made a payload too long.
    """
    return len(base64.urlsafe_b64encode(orjson.dumps([gemini_id, None])).rstrip(b"=")) <= MAX_PAYLOAD


def carried(call_id: str) -> tuple[str | None, str | None]:
    """
    C{(gemini_id, signature)} carried by C{call_id}; C{(None, None)} for an
    id that carries nothing (or not in this format).  An empty string (a
    client-crafted payload) is None: Gemini gets no C{"id": ""}, and a call
    with an empty signature is one without, which gets Google's placeholder
    like any other unsigned call
    (U{https://ai.google.dev/gemini-api/docs/thought-signatures}).
    """
    payload = callids.payload(call_id)
    if payload is None:
        return None, None
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return None, None
    if not (isinstance(decoded, list) and len(decoded) == 2):
        return None, None
    gemini_id, signature = decoded
    return (
        gemini_id if isinstance(gemini_id, str) and gemini_id else None,
        signature if isinstance(signature, str) and signature else None,
    )


__all__ = ["MAX_PAYLOAD", "carried", "logger", "new_call_id"]
