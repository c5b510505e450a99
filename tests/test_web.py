"""
L{openclaw.web}: what the API's and the C{/metrics} resources answer alike.
"""

from __future__ import annotations

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel, Request

from openclaw.web import head_or_body


def _request(method: bytes) -> Request:
    channel = HTTPChannel()
    channel.timeOut = None  # no idle timer left on the reactor
    channel.makeConnection(StringTransport())
    request = Request(channel)
    request.method = method
    return request


class HeadOrBodyTests(SynchronousTestCase):
    def test_get(self) -> None:
        """
        A GET is answered the body, with no length set here (twisted.web
        sets it when the body is written).
        """
        request = _request(b"GET")
        self.assertEqual(head_or_body(request, b"hello\n"), b"hello\n")
        self.assertIsNone(request.responseHeaders.getRawHeaders(b"content-length"))

    def test_head(self) -> None:
        """
        A HEAD is answered no body, with the GET answer's length (RFC 9110
        section 9.3.2).
        """
        request = _request(b"HEAD")
        self.assertEqual(head_or_body(request, b"hello\n"), b"")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-length"), [b"6"])
        request = _request(b"HEAD")
        self.assertEqual(head_or_body(request, b""), b"")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-length"), [b"0"])
