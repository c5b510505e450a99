"""
Errors the API answers with, always in OpenAI's shape::

    {"error": {"message": "...", "type": "...", "param": null, "code": "..."}}

so that any OpenAI client library raises its usual exception with the
message intact.  Each message says what went wrong and, when the caller or
the operator can do something about it, what.
"""

from __future__ import annotations

import attrs
import orjson

#: The header that names the provider that answered (or was to answer).
PROVIDER_HEADER = b"X-OpenClaw-Provider"
#: The header that carries an upstream's own status on a 502.
UPSTREAM_STATUS_HEADER = b"X-OpenClaw-Upstream-Status"


@attrs.frozen(auto_exc=True)
class APIError(Exception):
    """
    An answer other than success; raise it anywhere under a resource.

    @ivar headers: extra response headers (C{Allow}, C{WWW-Authenticate}).
    """

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def document(self) -> dict[str, object]:
        """
        The JSON error object, as an API response body or an SSE event.
        """
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return orjson.dumps(self.document())


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """
    The request itself is wrong; C{param} names the offending field.
    """
    return APIError(400, message, "invalid_request_error", code, param)


def not_found(path: str) -> APIError:
    return APIError(
        404,
        f"no such endpoint: {path}; this gateway serves GET /v1/models, POST /v1/chat/completions and GET /healthz",
        "invalid_request_error",
        "unknown_url",
    )


def method_not_allowed(method: str, allowed: tuple[bytes, ...]) -> APIError:
    names = ", ".join(m.decode() for m in allowed)
    return APIError(
        405,
        f"method {method} is not allowed here; use {names}",
        "invalid_request_error",
        "method_not_allowed",
        headers=((b"Allow", names.encode()),),
    )


def unauthorized(message: str, code: str = "invalid_api_key") -> APIError:
    return APIError(401, message, "invalid_request_error", code, headers=((b"WWW-Authenticate", b"Bearer"),))


def provider_not_configured(provider_id: str, key_variable: str) -> APIError:
    """
    503: the chosen provider has no key, so no call was made.  Not a 502:
    no upstream was asked, and the fix is on this side.
    """
    return APIError(
        503,
        f"{key_variable} is not set, so the gateway cannot call {provider_id}; "
        f"the operator must set {key_variable} and restart the gateway, or "
        "switch_provider to another provider",
        "provider_not_configured",
        "provider_key_not_set",
    )


def upstream_http_error(provider_id: str, status: int, reason: str) -> APIError:
    """
    502 for an upstream non-2xx answer; C{reason} already holds the status
    and the provider's message ("HTTP 429 Too Many Requests: ...").
    """
    return APIError(
        502,
        f"{provider_id} answered {reason}",
        "upstream_error",
        "upstream_http_error",
        headers=((UPSTREAM_STATUS_HEADER, b"%d" % status),),
    )


def upstream_failed(provider_id: str, reason: str, code: str = "upstream_unreachable") -> APIError:
    """
    502 for an upstream that could not be reached or answered nonsense.
    """
    return APIError(502, f"{provider_id}: {reason}", "upstream_error", code)


def upstream_timeout(
    provider_id: str, seconds: float, waiting_for: str, variable: str = "UPSTREAM_TIMEOUT"
) -> APIError:
    """
    504: C{variable} (the setting that holds C{seconds}) ran out.
    """
    return APIError(
        504,
        f"{provider_id} did not answer in time: {seconds:g} s ({variable}) ran out while the "
        f"gateway waited for {waiting_for}; try again, or ask the operator to raise {variable}",
        "upstream_error",
        "upstream_timeout",
    )


def internal_error() -> APIError:
    return APIError(
        500,
        "the gateway failed to handle this request; the details are in its log",
        "server_error",
        "internal_error",
    )
