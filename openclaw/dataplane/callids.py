"""
Tool call ids that carry what a provider needs back: the envelope, whatever
the provider.

A provider may need, on the next turn of a tool loop, more than the call's
id (Gemini 3 refuses a turn whose signed C{functionCall} parts come back
without their thought signatures), and clients (the openai SDK, LangChain)
rebuild an assistant message from its standard fields only:
C{tool_calls[].id} is the one field that is always echoed.  So an id the
gateway makes is C{call_<24 hex digits>}, followed, when the provider's
wire has something to carry, by L{MARK} and the wire's payload (letters,
digits, C{_} and C{-} only).  What the payload holds, and how it is read,
is the wire's own (Gemini's: L{openclaw.providers.gemini.callids}).

A tool loop begun on one provider may go on with another after a switch
or a failover: the request's validation notes an id that carries something
(L{openclaw.dataplane.request.ChatRequest.carried_ids}), and a wire that
does not read carried ids
(L{reads_carried_ids <openclaw.providers.wire.Wire.reads_carried_ids>},
the default) is sent every id L{plain}
(L{encode_request <openclaw.dataplane.call.encode_request>}).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

#: Joins the plain id and the carried payload.  ("gs1": the first carried
#: payload was Gemini's signature; kept, as ids already given out carry it.)
MARK = "_gs1_"
#: The random bits of an id the gateway makes (as completion ids: see
#: L{openclaw.providers.wire}), written as hex digits after C{call_}.
ID_BITS = 96
#: An id the gateway made that carries a payload: the plain id, L{MARK},
#: the payload.  Any other id (a client's own, even one holding L{MARK}) is
#: just an id, sent as it is.
_CARRYING = re.compile(rf"(call_[0-9a-f]{{{ID_BITS // 4}}}){MARK}([A-Za-z0-9_-]+)")


def new_call_id(payload: str | None = None) -> str:
    """
    A fresh tool call id, carrying C{payload} (letters, digits, C{_} and
    C{-} only) when given.
    """
    call_id = f"call_{random.getrandbits(ID_BITS):0{ID_BITS // 4}x}"
    return call_id if payload is None else call_id + MARK + payload


def payload(call_id: str) -> str | None:
    """
    The payload C{call_id} carries; None for an id that carries none (one
    not of the gateway's making: L{new_call_id}).
    """
    carrying = _CARRYING.fullmatch(call_id)
    return None if carrying is None else carrying[2]


def plain(call_id: str) -> str:
    """
    C{call_id} without what it carries: the short id a provider that does
    not read carried ids is given.  An id not of the gateway's making is
    left whole: a client's C{"a_gs1_x"} and C{"a_gs1_y"} stay two ids.
    """
    carrying = _CARRYING.fullmatch(call_id)
    return call_id if carrying is None else carrying[1]


def clashing(ids: Iterable[str]) -> frozenset[str]:
    """
    The ids among C{ids} that carry a payload and would be one with
    another once L{plain}: beside a client's own C{call_<24 hex digits>},
    an id of the gateway's carrying a payload after the same plain id
    (sent plain, a provider would read both calls, and their results, as
    one).  Those are to be sent whole, the others plain.
    """
    whole = set(ids)
    counts = Counter(plain(call_id) for call_id in whole)
    return frozenset(call_id for call_id in whole if counts[plain(call_id)] > 1 and plain(call_id) != call_id)


def plain_message(message: dict[str, Any], whole: frozenset[str] = frozenset()) -> dict[str, Any]:
    """
    A validated chat message with its tool call ids (an assistant's
    C{tool_calls[].id}, a tool result's C{tool_call_id}) L{plain}, but
    those in C{whole} (L{clashing}).
    """

    def plained(call_id: str) -> str:
        return call_id if call_id in whole else plain(call_id)

    if message["role"] == "tool":
        return {**message, "tool_call_id": plained(message["tool_call_id"])}
    calls = message.get("tool_calls") if message["role"] == "assistant" else None
    if not calls:
        return message
    return {**message, "tool_calls": [{**call, "id": plained(call["id"])} for call in calls]}
