"""
The records of the cluster's shared state in the store (L{ROUTE}, the
route all instances serve; L{TOKEN}, the operators' session token): how
they are written (JSON objects, L{encode_route}, L{encode_token}), read,
compared (L{record_identity}) and ranked when two are held at the same
version after the store lost the state (L{route_rank}, L{token_rank}:
the rule in L{openclaw.cluster.node}); and when a token record is due to
be replaced (L{RENEW_AT}, L{renewal_time}).  No other field than these write:
an instance of an earlier version compares records whole.
"""

from __future__ import annotations

import json
from typing import Any

from openclaw.cluster.store import Versioned
from openclaw.routing import Route
from openclaw.session import SessionToken

#: The names of the two records (their keys in the store, under the
#: cluster's prefix: C{<CLUSTER_NAME>:state:<name>}, L{openclaw.cluster.redis}).
ROUTE = "route"
TOKEN = "token"

#: The share of a cluster session token's lifetime (C{exp} - C{iat}) after
#: which the instances replace it (one of them wins the store's
#: compare-and-set, the others adopt its token): operators of a cluster
#: whose instances all stay up are never left with an expired token only a
#: restart would replace.
RENEW_AT = 0.8


def encode_route(route: Route, at: float | None = None, restored: bool = False) -> str:
    """
    The cluster's record of C{route}: a JSON object of C{provider},
    C{model} and, unless C{None}, C{at}, when the route was set (POSIX
    seconds: by a C{switch_provider}, or by the instance that proposed it
    to an empty store), for the same-version tie-break (L{route_rank});
    and C{"restored": true} when it was written back after the store lost
    it (L{is_restored}).  No other field: an instance of an earlier
    version compares records whole.
    """
    document: dict[str, object] = {"provider": route.provider_id, "model": route.model}
    if at is not None:
        document["at"] = at
    if restored:
        document["restored"] = True
    return json.dumps(document)


def is_restored(document: dict[str, Any]) -> bool:
    """
    Whether the decoded route or token record C{document} was written back
    by an instance after the store lost the state (C{"restored": true}),
    rather than set by a C{switch_provider}, C{rotate_token}, a renewal or
    an instance's first proposal: at the same version, a record that was
    not written back wins over one that was (the module's rule).
    """
    return document.get("restored") is True


def provenance(document: dict[str, Any], versioned: Versioned, made: str) -> str:
    """
    Who wrote the decoded route or token record C{document} (read as
    C{versioned}), for the log: C{"<made> <instance>"} (C{"switched on
    vm-1"}), or, for one written back after the store lost the state
    (L{is_restored}), C{"written back by <instance>"}: the instance that
    wrote it back did not switch or issue it.
    """
    origin = versioned.origin or "an unknown instance"
    if is_restored(document):
        return f"written back by {origin}"
    return f"{made} {origin}"


def record_identity(name: str, document: dict[str, Any]) -> tuple[object, ...]:
    """
    What two decoded records of C{name} are compared by: what an instance
    makes of them (a route's provider and model as strings, a token's
    C{jti}; their C{at} and whether written back, L{record_at},
    L{is_restored}), never the JSON as written: a record with a field this
    version does not write, or C{"restored": false} written out, is the
    same record (it made every instance reload, and a reload
    beat at once, in a loop).  One whose C{at} is no number is itself
    alone.
    """
    try:
        at = record_at(document)
    except TypeError:
        return (name, "unreadable", json.dumps(document, sort_keys=True, default=str))
    if name == ROUTE:
        return (str(document.get("provider")), str(document.get("model")), at, is_restored(document))
    return (document.get("jti"), at, is_restored(document))


def record_at(document: dict[str, Any]) -> float | None:
    """
    The C{at} of a decoded route or token record (L{encode_route},
    L{encode_token}); C{None} for a record without one (written by an
    earlier version).

    @raise TypeError: it is not a number.
    """
    at = document.get("at")
    if at is None:
        return None
    if isinstance(at, bool) or not isinstance(at, int | float):
        raise TypeError(f"the record's set-at {at!r} is not a number")
    return float(at)


def route_rank(value: str) -> tuple[float, str, str]:
    """
    Where the route record C{value} (L{encode_route}) stands when two of
    them are held at the same version (the store lost the state and
    another instance wrote its own): the lower wins.  The route set
    earlier (C{at}; a record without one, from an earlier version, counts
    as set at 0: before any that has one) wins, so the route the cluster
    served before the loss wins over a newcomer's; then the provider and
    model, so that every instance ranks any two alike.

    @raise ValueError: (or L{KeyError}, L{TypeError}) C{value} is not a
        route record.
    """
    document = json.loads(value)
    at = record_at(document)
    return (0.0 if at is None else at, str(document["provider"]), str(document["model"]))


def encode_token(token: SessionToken, at: float | None = None, restored: bool = False) -> str:
    """
    The cluster's record of C{token}: a JSON object of C{token}, C{jti},
    C{iat} and C{exp} (POSIX seconds, as in the JWT), unless C{None}
    C{at}, when the token was put forward, to the millisecond (POSIX
    seconds: written by a C{rotate_token} or a renewal, or first proposed
    to an empty store; the JWT's C{iat} has whole seconds), for the
    same-version tie-break
    (L{token_rank}); and C{"restored": true} when it was written back after
    the store lost it (L{is_restored}).  No other field (L{encode_route}).
    """
    document: dict[str, object] = {
        "token": token.token,
        "jti": token.jti,
        "iat": token.issued_at,
        "exp": token.expires_at,
    }
    if at is not None:
        document["at"] = at
    if restored:
        document["restored"] = True
    return json.dumps(document)


def decode_token(value: str) -> SessionToken:
    """
    The token L{encode_token} made C{value} of.

    @raise ValueError: (or L{KeyError}, L{TypeError}) it is not one.
    """
    document = json.loads(value)
    return SessionToken(
        token=str(document["token"]),
        jti=str(document["jti"]),
        issued_at=int(document["iat"]),
        expires_at=int(document["exp"]),
    )


def token_rank(value: str) -> tuple[int, float, str]:
    """
    Where the token record C{value} (L{encode_token}) stands when two of
    them are held at the same version (the store lost the state and
    another instance wrote its own): the lower wins.  The token issued
    earlier (C{iat}, then C{at}; a record without one, from an earlier
    version, counts as put forward at its C{iat}) wins, so the operators'
    token wins over one a newcomer minted after the loss; then C{jti}, so
    that every instance ranks any two alike.

    @raise ValueError: (or L{KeyError}, L{TypeError}) C{value} is not a
        token record.
    """
    document = json.loads(value)
    token = decode_token(value)
    at = record_at(document)
    return (token.issued_at, float(token.issued_at) if at is None else at, token.jti)


def renewal_time(token: SessionToken) -> float:
    """
    When (POSIX seconds) the cluster's token C{token} is due to be replaced:
    L{RENEW_AT} of its lifetime after it was issued, and never later than
    its expiry.
    """
    return min(token.issued_at + RENEW_AT * (token.expires_at - token.issued_at), float(token.expires_at))
