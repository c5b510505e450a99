"""
Who may call the API: a bearer key from GATEWAY_API_KEYS, or a consumer's
key (L{openclaw.consumers}).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs

from openclaw.consumers.table import GATEWAY
from openclaw.dataplane.errors import APIError, unauthorized

if TYPE_CHECKING:
    from openclaw.consumers.table import ConsumerTable, Holder

_BEARER = b"bearer "
#: Seconds a client is asked to wait (C{Retry-After}) while the consumers load.
LOADING_RETRY_SECONDS = 2
#: The codes of the 503s a consumer key gets while the consumers cannot be
#: read (L{consumers_loading}, L{consumers_unusable},
#: L{consumers_catching_up}): the key was not checked, so any client can
#: cause them at will, as a keyless 401 (their log lines are limited alike).
UNCHECKED_KEY_CODES = frozenset({"consumers_loading", "consumers_unavailable", "consumers_catching_up"})


def consumers_loading() -> APIError:
    """
    The answer to a consumer key before the consumer table has loaded: 503
    with C{Retry-After} (retryable: the openai SDK and agents retry a 503
    and keep the key; a 401 would make them drop a valid key).
    """
    return APIError(
        503,
        "the gateway has not loaded its consumers yet (starting, or its database is unreachable), "
        f"so this consumer key cannot be checked; retry in {LOADING_RETRY_SECONDS} s",
        "server_error",
        "consumers_loading",
        retry_after=LOADING_RETRY_SECONDS,
    )


def consumers_unusable() -> APIError:
    """
    The answer to a consumer key while the consumers' database is one a
    later openclaw upgraded (L{openclaw.consumers.store.NewerSchema}): 503,
    which no retry mends (the operator must act: C{x-should-retry: false}).
    """
    return APIError(
        503,
        "the gateway cannot use its consumers' database (a later version of openclaw upgraded it), so this "
        "consumer key cannot be checked; the operator must run that version or restore the database",
        "server_error",
        "consumers_unavailable",
        headers=((b"x-should-retry", b"false"),),
    )


#: Seconds a client is asked to wait (C{Retry-After}) while an instance
#: catches up with the cluster (L{openclaw.consumers.freshness}).
CATCHING_UP_RETRY_SECONDS = 1


def consumers_catching_up() -> APIError:
    """
    The answer to a consumer key while this instance reloads its consumers
    after its event loop stood still (L{openclaw.consumers.freshness}): 503
    with C{Retry-After: 1} (retryable, as L{consumers_loading}); a reload
    takes milliseconds, 5 s at most.
    """
    return APIError(
        503,
        "this gateway instance is catching up with the cluster (it stood still for a while and is reloading its "
        f"consumers, which may have changed meanwhile), so this consumer key cannot be checked yet; retry in "
        f"{CATCHING_UP_RETRY_SECONDS} s",
        "server_error",
        "consumers_catching_up",
        retry_after=CATCHING_UP_RETRY_SECONDS,
    )


@attrs.frozen
class GatewayKeys:
    """
    The accepted keys.  A presented key is compared with every one of them
    in constant time, without stopping at a match, so neither the timing
    nor the position of a key in the list tells an attacker anything.
    """

    _keys: tuple[bytes, ...] = attrs.field(repr=False)
    #: The consumers' keys, held in memory (None: no consumers).
    consumers: ConsumerTable | None = attrs.field(default=None, repr=False)

    @classmethod
    def of(cls, keys: Iterable[str], consumers: ConsumerTable | None = None) -> GatewayKeys:
        return cls(tuple(key.encode("utf-8") for key in keys), consumers)

    def check(self, authorization: bytes | None) -> APIError | None:
        """
        None when the C{Authorization} header value carries an accepted
        key, else the 401 to answer.  The presented key is never echoed.
        """
        holder = self.identify(authorization)
        return holder if isinstance(holder, APIError) else holder.refusal

    def identify(self, authorization: bytes | None) -> Holder | APIError:
        """
        Who holds the key the C{Authorization} header value carries: a
        consumer, or L{openclaw.consumers.table.GATEWAY} for a key of
        GATEWAY_API_KEYS; else the 401 to answer.  An expired consumer's
        key gives its holder, with the 401 in C{refusal}: the resource
        answers it, naming the consumer in its log line and metrics.
        """
        consumers = self.consumers
        if (
            consumers is not None
            and not consumers.loaded
            and authorization is not None
            and authorization[:7].lower() == _BEARER
            and authorization[7:].strip().startswith(b"ock-")
            # A GATEWAY_API_KEYS key may look like a consumer's: served
            # meanwhile all the same (README).
            and not self._gateway_key(authorization[7:].strip())
        ):
            return consumers_unusable() if consumers.newer_schema is not None else consumers_loading()
        if not self._keys and (consumers is None or not consumers.has_keys):
            return unauthorized(
                "the gateway accepts no API calls because GATEWAY_API_KEYS is not set and no consumer has a key; "
                "the operator must set it (comma-separated keys) and restart the gateway, "
                "or create a consumer (openclawctl consumer create NAME)",
                code="gateway_api_keys_not_set",
            )
        if authorization is None:
            # Said to a client: its own key, not the operator's setting.
            return unauthorized("missing API key: send your API key as the header 'Authorization: Bearer <key>'")
        # The scheme is case-insensitive (RFC 9110 section 11.1).
        if authorization[:7].lower() != _BEARER:
            return unauthorized("the Authorization header must be 'Bearer <key>'")
        presented = authorization[7:].strip()
        if consumers is not None and presented.startswith(b"ock-"):
            watch = consumers.stall_watch
            # In a cluster, one clock read: a table that may have missed
            # changes while the loop stood still answers no consumer key
            # until reloaded (a GATEWAY_API_KEYS key is served meanwhile).
            if watch is not None and watch.behind() and not self._gateway_key(presented):
                return consumers_catching_up()
            holder = consumers.identify(presented)
            if holder is not None:
                return holder
        if not self._gateway_key(presented):
            return unauthorized(
                "incorrect API key: the gateway accepts no such key (revoked, deleted, or mistyped); "
                "check the key you were given"
            )
        return GATEWAY

    def _gateway_key(self, presented: bytes) -> bool:
        """
        Whether C{presented} is a key of GATEWAY_API_KEYS, compared with
        each in constant time.
        """
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        return matched
