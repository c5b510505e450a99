"""
Google's error answers, read: what the Gemini adapter adds to the rules
every provider shares (L{openclaw.providers.errors.classify}).

A Google error body is C{{"error": {"code": 429, "message": ...,
"status": "RESOURCE_EXHAUSTED", "details": [...]}}}: C{status} is a
canonical code (C{google.rpc.Code}), and C{details} holds typed messages,
among them C{google.rpc.ErrorInfo} (why) and C{google.rpc.RetryInfo} (how
long to wait)
(U{https://ai.google.dev/gemini-api/docs/troubleshooting}, googleapis
C{google/rpc/code.proto} and C{google/rpc/error_details.proto}).  Every
reader here is defensive: any other body reads as saying nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from openclaw.providers.wire import json_or_none, reported_error

#: Google's reason (C{google.rpc.ErrorInfo.reason}) for a key the API refuses.
GOOGLE_KEY_INVALID = "API_KEY_INVALID"
#: Google's canonical code (C{error.status}) for a call its project cannot
#: make: an unsupported location, billing required
#: (U{https://ai.google.dev/gemini-api/docs/troubleshooting}).
GOOGLE_FAILED_PRECONDITION = "FAILED_PRECONDITION"
#: Google's canonical code for a request at fault.
GOOGLE_INVALID_ARGUMENT = "INVALID_ARGUMENT"
#: How Google says a prompt is longer than the model's context window: a
#: 400 C{INVALID_ARGUMENT} "The input token count (1200293) exceeds the
#: maximum number of tokens allowed (1048576)." (as its users quote it:
#: google-gemini/gemini-cli#4231, #6678).
GOOGLE_CONTEXT_EXCEEDED = re.compile(r"input token count\b.{0,40}\bexceeds the maximum number of tokens", re.IGNORECASE)
#: Google's words naming the embedding request's C{outputDimensionality}
#: (in its proto's snake case in a 400's field violations:
#: "EmbedContentRequest.output_dimensionality: ..."), OpenAI's
#: C{dimensions}.
GOOGLE_OUTPUT_DIMENSIONALITY = re.compile(r"\boutput_?dimensionality\b", re.IGNORECASE)

#: Google's canonical codes (C{google.rpc.Code}, googleapis
#: C{google/rpc/code.proto}) to the HTTP status each maps to.
GOOGLE_STATUSES: Mapping[str, int] = MappingProxyType(
    {
        "CANCELLED": 499,
        "UNKNOWN": 500,
        GOOGLE_INVALID_ARGUMENT: 400,
        "DEADLINE_EXCEEDED": 504,
        "NOT_FOUND": 404,
        "ALREADY_EXISTS": 409,
        "PERMISSION_DENIED": 403,
        "UNAUTHENTICATED": 401,
        "RESOURCE_EXHAUSTED": 429,
        "FAILED_PRECONDITION": 400,
        "ABORTED": 409,
        "OUT_OF_RANGE": 400,
        "UNIMPLEMENTED": 501,
        "INTERNAL": 500,
        "UNAVAILABLE": 503,
        "DATA_LOSS": 500,
    }
)

_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
#: A protobuf Duration in its JSON form: seconds with an "s" ("7s", "0.5s").
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)s\s*$")


def google_error_reasons(body: bytes) -> set[str]:
    """
    The C{reason} of every C{google.rpc.ErrorInfo} in a Google error
    answer's C{error.details} (C{{"API_KEY_INVALID"}}); empty for any other
    body.
    """
    return {
        detail["reason"]
        for detail in _error_details(body)
        if detail.get("@type") == _ERROR_INFO and isinstance(detail.get("reason"), str)
    }


def google_error_status(body: bytes) -> str | None:
    """
    The C{error.status} of a Google error answer (its canonical code's
    name, C{"FAILED_PRECONDITION"}); None for any other body.
    """
    status = _error_fields(body).get("status")
    return status if isinstance(status, str) else None


def google_retry_delay(body: bytes) -> float | None:
    """
    The C{retryDelay} of the first C{google.rpc.RetryInfo} in a Google
    error answer's C{error.details} that has a readable one ("7s", "0.5s"),
    in seconds; None for any other body.
    """
    for detail in _error_details(body):
        if detail.get("@type") == _RETRY_INFO and isinstance(detail.get("retryDelay"), str):
            found = _DURATION.match(detail["retryDelay"])
            if found:
                return float(found.group(1))
    return None


def _error_fields(body: bytes) -> dict[str, Any]:
    error = reported_error(json_or_none(body))
    return {} if error is None else error.fields


def _error_details(body: bytes) -> list[dict[str, Any]]:
    details = _error_fields(body).get("details")
    if not isinstance(details, list):
        return []
    return [detail for detail in details if isinstance(detail, dict)]


__all__ = [
    "GOOGLE_CONTEXT_EXCEEDED",
    "GOOGLE_FAILED_PRECONDITION",
    "GOOGLE_INVALID_ARGUMENT",
    "GOOGLE_KEY_INVALID",
    "GOOGLE_STATUSES",
    "google_error_reasons",
    "google_error_status",
    "google_retry_delay",
]
