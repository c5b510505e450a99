"""
The HTTP status an error event of a 2xx stream stands for.

Gemini reports an overload as the first event of a 200 stream
(C{{"error": {"code": 503, "message": "The model is overloaded.",
"status": "UNAVAILABLE"}}}), Moonshot as C{{"error": {"type":
"engine_overloaded_error", ...}}}.  When nothing of the stream has reached
the client yet, the call reads such an event as the non-2xx answer it stands
for (L{openclaw.providers.errors.classify}), so that it is retried, failed
over and counted by the breaker exactly as that answer would be.

The names a provider gives statuses in C{error.status} are its own: its
adapter declares them
(L{error_statuses <openclaw.providers.base.ProviderAdapter.error_statuses>}).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from openclaw.providers.wire import json_or_none, reported_error

#: OpenAI-style C{error.type} values (Moonshot's error table, OpenAI's
#: error codes guide) to their HTTP status.  An overloaded engine is the
#: provider's failure (503), not its key's: no key would do better.
OPENAI_TYPES: Mapping[str, int] = MappingProxyType(
    {
        "invalid_request_error": 400,
        "content_filter": 400,
        "invalid_authentication_error": 401,
        "incorrect_api_key_error": 401,
        "authentication_error": 401,
        "permission_denied_error": 403,
        "resource_not_found_error": 404,
        "not_found_error": 404,
        "rate_limit_reached_error": 429,
        "rate_limit_error": 429,
        "exceeded_current_quota_error": 429,
        "insufficient_quota": 429,
        "server_error": 500,
        "api_error": 500,
        "unexpected_output": 500,
        "engine_overloaded_error": 503,
        "overloaded_error": 503,
    }
)

#: An error event that names no status it maps to: the provider failed.
UNKNOWN_ERROR_STATUS = 500

#: A provider that names no statuses of its own.
NO_STATUSES: Mapping[str, int] = MappingProxyType({})


def error_event_status(data: bytes, statuses: Mapping[str, int] = NO_STATUSES) -> int | None:
    """
    The HTTP status the event C{data} stands for when it is an error
    (a JSON object with an C{error} member that is not null:
    L{reported_error <openclaw.providers.wire.reported_error>}): C{error.code} when it is a
    status (Gemini), else C{error.status} read by C{statuses} (the
    provider's own names for statuses, from its adapter's
    L{error_statuses <openclaw.providers.base.ProviderAdapter.error_statuses>}),
    else C{error.type} (L{OPENAI_TYPES}), else L{UNKNOWN_ERROR_STATUS}.
    None when the event is not an error.
    """
    error = reported_error(json_or_none(data))
    if error is None:
        return None
    if not isinstance(error.value, dict):
        return UNKNOWN_ERROR_STATUS
    fields = error.fields
    code = fields.get("code")
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        return code
    status = fields.get("status")
    if isinstance(status, str) and status in statuses:
        return statuses[status]
    kind = fields.get("type")
    if isinstance(kind, str) and kind in OPENAI_TYPES:
        return OPENAI_TYPES[kind]
    return UNKNOWN_ERROR_STATUS


__all__ = ["NO_STATUSES", "OPENAI_TYPES", "UNKNOWN_ERROR_STATUS", "error_event_status"]
