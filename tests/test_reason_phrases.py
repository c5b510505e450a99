"""
The status lines the API writes carry RFC 9110's reason phrases: "429 Too
Many Requests" (twisted.web has no phrase for it), and RFC 9110's wording
where twisted.web keeps RFC 2616's.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase as SyncTestCase

from openclaw.dataplane.errors import APIError
from openclaw.dataplane.head import raw_error_response
from openclaw.providers.errors import UpstreamHTTPError
from openclaw.web import reason_phrase
from tests.support import exchange
from tests.test_dataplane import GATEWAY_KEY, HELLO, KIMI_KEY
from tests.test_resilience import ResilienceTestCase


class ReasonPhraseTests(ResilienceTestCase):
    @inlineCallbacks
    def test_429_status_line(self) -> Any:
        """
        A 429 goes out as "429 Too Many Requests" (twisted.web's table has
        no phrase for it: "429 Unknown Status").
        """
        kimi = self.behaviour("kimi")
        kimi.rate_limited_keys = {KIMI_KEY}
        gateway = self.gateway(default_provider="kimi", fallback="off")
        body = json.dumps({"model": "kimi/moonshot-v1-8k", "messages": HELLO}).encode()
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
            % (GATEWAY_KEY.encode(), len(body), body)
        )
        answer = yield deferToThread(exchange, gateway.api_port, request)
        self.assertTrue(answer.startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), answer[:200])
        refused = raw_error_response(APIError(429, "slow down", "rate_limit_error", "rate_limited"))
        self.assertTrue(refused.startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), refused[:100])
        # RFC 9110's wording where twisted.web keeps RFC 2616's.
        for status, phrase in ((504, b"Gateway Timeout"), (408, b"Request Timeout"), (503, b"Service Unavailable")):
            self.assertEqual(reason_phrase(status), phrase)
            line = raw_error_response(APIError(status, "x", "server_error", "x")).split(b"\r\n")[0]
            self.assertEqual(line, b"HTTP/1.1 %d %s" % (status, phrase))


class StatusLineTests(SyncTestCase):
    def test_provider_errors_alike(self) -> None:
        """
        A provider's failure (a probe's, in C{status} and C{/healthz}) names
        its status as the API's own answers do: C{"HTTP 429 Too Many
        Requests"}, where twisted.web's table alone named no phrase, and
        RFC 9110's C{"Gateway Timeout"}.
        """
        self.assertEqual(str(UpstreamHTTPError(429, "slow down")), "HTTP 429 Too Many Requests: slow down")
        self.assertEqual(str(UpstreamHTTPError(504, "late")), "HTTP 504 Gateway Timeout: late")
        self.assertEqual(str(UpstreamHTTPError(599, "odd")), "HTTP 599: odd")
