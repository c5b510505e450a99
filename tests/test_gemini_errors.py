"""
Google's error answers as the Gemini adapter reads them
(L{openclaw.providers.gemini.errors}): a key refused with a 400
C{API_KEY_INVALID}, a project that cannot serve (C{FAILED_PRECONDITION}),
the wait a C{google.rpc.RetryInfo} states, the canonical codes of an error
event; and that these are Gemini's rules only, not every provider's.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from openclaw.dataplane.errors import upstream_refused
from openclaw.dataplane.sse import Event
from openclaw.providers import GeminiAdapter, KimiAdapter
from openclaw.providers.errors import MAX_RETRY_AFTER_SECONDS, RefusalKind, classify
from openclaw.providers.event_errors import UNKNOWN_ERROR_STATUS, error_event_status
from openclaw.providers.gemini.errors import (
    GOOGLE_STATUSES,
    google_error_reasons,
    google_error_status,
    google_retry_delay,
)
from openclaw.providers.keys import DEFAULT_REST_SECONDS
from openclaw.providers.openai_compatible import OpenAIStream
from tests.support import bare_adapter
from tests.test_provider_refusals import FAILED_PRECONDITION

KEY_INVALID = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}


def gemini_error(code: int, status: str, details: list[dict[str, Any]]) -> bytes:
    return json.dumps({"error": {"code": code, "message": "m", "status": status, "details": details}}).encode()


def retry_info(delay: str) -> bytes:
    return gemini_error(
        429, "RESOURCE_EXHAUSTED", [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}]
    )


class RefusalTests(SynchronousTestCase):
    """
    A Gemini refusal, read by its adapter.
    """

    def test_gemini_key_invalid_is_auth(self) -> None:
        body = gemini_error(400, "INVALID_ARGUMENT", [KEY_INVALID])
        # Google's own rule, read by the Gemini adapter, not by every provider.
        self.assertEqual(classify(400, body).kind, RefusalKind.REQUEST)
        self.assertEqual(bare_adapter(KimiAdapter).refusal(400, body).kind, RefusalKind.REQUEST)
        refusal = bare_adapter(GeminiAdapter).refusal(400, body)
        self.assertEqual(refusal.kind, RefusalKind.AUTH)
        error = upstream_refused("gemini", refusal, "GEMINI_API_KEY / GEMINI_API_KEYS", names_model=True)
        self.assertEqual((error.status, error.code), (502, "upstream_auth_failed"))
        self.assertIn("fix GEMINI_API_KEY / GEMINI_API_KEYS", error.message)
        self.assertIn("not about your API key", error.message)

    def test_gemini_failed_precondition_is_the_account(self) -> None:
        adapter = bare_adapter(GeminiAdapter)
        refusal = adapter.refusal(400, json.dumps(FAILED_PRECONDITION).encode())
        self.assertEqual(refusal.kind, RefusalKind.ACCOUNT)
        self.assertIn("User location is not supported for the API use.", refusal.message)
        invalid = {"error": {"code": 400, "message": "bad", "status": "INVALID_ARGUMENT"}}
        self.assertEqual(adapter.refusal(400, json.dumps(invalid).encode()).kind, RefusalKind.REQUEST)
        # Not another provider's rule.
        self.assertEqual(
            bare_adapter(KimiAdapter).refusal(400, json.dumps(FAILED_PRECONDITION).encode()).kind,
            RefusalKind.REQUEST,
        )

    def test_retry_info(self) -> None:
        gemini = bare_adapter(GeminiAdapter)
        body = retry_info("7s")
        self.assertEqual(gemini.refusal(429, body).retry_after, 7.0)
        # The provider's header wins over the details.
        self.assertEqual(gemini.refusal(429, body, "3").retry_after, 3.0)
        error = upstream_refused("gemini", gemini.refusal(429, body), "K", names_model=True)
        self.assertEqual((error.status, error.code), (429, "rate_limit_exceeded"))
        self.assertIn((b"Retry-After", b"7"), error.headers)
        self.assertIn((b"X-OpenClaw-Upstream-Status", b"429"), error.headers)
        # Another provider's body is read by the rules every provider shares.
        self.assertEqual(bare_adapter(KimiAdapter).refusal(429, body).retry_after, DEFAULT_REST_SECONDS)

    def test_retry_info_bounded(self) -> None:
        """
        Google's wait is followed for an hour at most, as a C{Retry-After}
        is (L{MAX_RETRY_AFTER_SECONDS}).
        """
        refusal = bare_adapter(GeminiAdapter).refusal(429, retry_info("86400s"))
        self.assertEqual(refusal.retry_after, MAX_RETRY_AFTER_SECONDS)


class ReaderTests(SynchronousTestCase):
    """
    The readers of Google's error bodies say nothing of any other body.
    """

    def test_retry_delay(self) -> None:
        self.assertEqual(google_retry_delay(retry_info("0.5s")), 0.5)
        self.assertEqual(google_retry_delay(retry_info(" 12s ")), 12.0)
        for delay in ("7", "7ms", "-1s", "soon", ""):
            self.assertIsNone(google_retry_delay(retry_info(delay)), delay)
        for body in (b"", b"not json", b"[]", b'{"error": "x"}', b'{"error": {"details": {}}}'):
            self.assertIsNone(google_retry_delay(body), body)

    def test_reasons_and_status(self) -> None:
        body = gemini_error(400, "INVALID_ARGUMENT", [KEY_INVALID, {"@type": "other", "reason": "X"}, "odd"])
        self.assertEqual(google_error_reasons(body), {"API_KEY_INVALID"})
        self.assertEqual(google_error_status(body), "INVALID_ARGUMENT")
        for body in (b"", b"<html>", b'{"error": {"message": "m", "type": "invalid_request_error"}}'):
            self.assertEqual(google_error_reasons(body), set(), body)
            self.assertIsNone(google_error_status(body), body)


class EventStatusTests(SynchronousTestCase):
    """
    An error event's C{error.status} is read by the provider's own names
    (L{openclaw.providers.base.ProviderAdapter.error_statuses}): Google's
    canonical codes for Gemini, none for an OpenAI-compatible API.
    """

    def test_canonical_codes(self) -> None:
        self.assertIs(GeminiAdapter.error_statuses, GOOGLE_STATUSES)
        self.assertEqual(dict(KimiAdapter.error_statuses), {})
        overloaded = b'{"error": {"message": "The model is overloaded.", "status": "UNAVAILABLE"}}'
        self.assertEqual(error_event_status(overloaded, GeminiAdapter.error_statuses), 503)
        self.assertEqual(error_event_status(overloaded, KimiAdapter.error_statuses), UNKNOWN_ERROR_STATUS)
        # error.code, when a status, and OpenAI's error.type are read for every provider.
        coded = b'{"error": {"code": 429, "status": "UNAVAILABLE"}}'
        self.assertEqual(error_event_status(coded, GeminiAdapter.error_statuses), 429)
        typed = b'{"error": {"type": "engine_overloaded_error"}}'
        self.assertEqual(error_event_status(typed, GeminiAdapter.error_statuses), 503)
        self.assertEqual(error_event_status(typed), 503)
        self.assertIsNone(error_event_status(b'{"candidates": []}', GeminiAdapter.error_statuses))

    def test_null_error(self) -> None:
        """
        An event whose C{error} is null reports no error: the status check
        on a stream's first event reads it as the stream's own reader does
        (it is passed on, not refused as a 500).
        """
        event = b'{"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}], "error": null}'
        self.assertIsNone(error_event_status(event))
        self.assertEqual(OpenAIStream().payloads(Event(b"", event)), [event])
