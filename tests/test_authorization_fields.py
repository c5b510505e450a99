"""
A request with two C{Authorization} fields is answered 400 in OpenAI's
shape, whichever comes first (twisted.web would take the last); raw HTTP
against a gateway in this process.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from tests.support import exchange
from tests.test_dataplane import GATEWAY_KEY, DataPlaneTestCase


class TwoAuthorizationFieldsTests(DataPlaneTestCase):
    @inlineCallbacks
    def test_refused_in_either_order(self) -> Any:
        """
        A request with two Authorization fields is answered 400 in OpenAI's
        shape, whichever comes first (twisted.web would take the last).
        """
        gateway = self.gateway()
        good, bad = f"Authorization: Bearer {GATEWAY_KEY}\r\n", "Authorization: Bearer wrong\r\n"
        head = "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        answer = yield deferToThread(exchange, gateway.api_port, (head + good + "\r\n").encode())
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:200])
        for fields in (bad + good, good + bad, good + good):
            answer = yield deferToThread(exchange, gateway.api_port, (head + fields + "\r\n").encode())
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:200])
            error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
            self.assertEqual(error["code"], "invalid_authorization")
            self.assertIn("send exactly one", error["message"])
