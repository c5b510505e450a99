"""
Who may call the API: a bearer key from GATEWAY_API_KEYS.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

import attrs

from openclaw.dataplane.errors import APIError, unauthorized

_BEARER = b"bearer "


@attrs.frozen
class GatewayKeys:
    """
    The accepted keys.  A presented key is compared with every one of them
    in constant time, without stopping at a match, so neither the timing
    nor the position of a key in the list tells an attacker anything.
    """

    _keys: tuple[bytes, ...] = attrs.field(repr=False)

    @classmethod
    def of(cls, keys: Iterable[str]) -> GatewayKeys:
        return cls(tuple(key.encode("utf-8") for key in keys))

    def check(self, authorization: bytes | None) -> APIError | None:
        """
        None when the C{Authorization} header value carries an accepted
        key, else the 401 to answer.  The presented key is never echoed.
        """
        if not self._keys:
            return unauthorized(
                "the gateway accepts no API calls because GATEWAY_API_KEYS is not set; "
                "the operator must set it (comma-separated keys) and restart the gateway",
                code="gateway_api_keys_not_set",
            )
        if authorization is None:
            return unauthorized(
                "missing API key: send the header 'Authorization: Bearer <key>' "
                "with a key from the gateway's GATEWAY_API_KEYS"
            )
        # The scheme is case-insensitive (RFC 9110 section 11.1).
        if authorization[:7].lower() != _BEARER:
            return unauthorized("the Authorization header must be 'Bearer <key>'")
        presented = authorization[7:].strip()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            return unauthorized("incorrect API key: it is not one of the gateway's GATEWAY_API_KEYS")
        return None
