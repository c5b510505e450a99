"""
The API's own limits: request bodies past MAX_REQUEST_BYTES, and no new
calls once the gateway is stopping.
"""

from __future__ import annotations

import json
import socket

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import start_gateway


def exchange(port: int, request: bytes, chunks: list[bytes] = ()) -> bytes:
    """
    Send a raw HTTP request (and then body chunks, while the server lets
    us); everything the server answers before closing.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(request)
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break
        answer = b""
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            answer += data
        return answer
    finally:
        sock.close()


class BodyLimitTests(TestCase):
    timeout = 20

    @inlineCallbacks
    def test_declared_length_too_large(self):
        """
        A key holder's Content-Length past the limit is refused with 413
        before a byte of the body is read (without a key: 401, first).
        """
        gateway = start_gateway(self, api=True, gateway_api_keys=("k",))
        answer = yield deferToThread(
            exchange,
            gateway.api_port,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
            b"Content-Length: 50000000000\r\n\r\n",
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:100])
        self.assertIn(b"MAX_REQUEST_BYTES", answer)

    @inlineCallbacks
    def test_chunked_body_cut_off(self):
        gateway = start_gateway(self, api=True, gateway_api_keys=("k",), max_request_bytes=1024)
        chunk = b"400\r\n" + b"a" * 1024 + b"\r\n"
        answer = yield deferToThread(
            exchange,
            gateway.api_port,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            [chunk] * 64,
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:100])
        healthy = yield deferToThread(
            exchange, gateway.api_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertTrue(healthy.startswith(b"HTTP/1.1 200 "), healthy[:100])

    @inlineCallbacks
    def test_body_within_limit_is_served(self):
        gateway = start_gateway(self, api=True, gateway_api_keys=("k",), max_request_bytes=1024)
        body = b'{"messages": []}'
        answer = yield deferToThread(
            exchange,
            gateway.api_port,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:100])


class DrainTests(TestCase):
    timeout = 20

    @inlineCallbacks
    def test_no_new_calls_while_draining(self):
        gateway = start_gateway(self, api=True, gateway_api_keys=("k",))
        yield gateway.service.api_site.drain()
        answer = yield deferToThread(
            exchange,
            gateway.api_port,
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\r\n",
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer[:100])
        self.assertIn(b"shutting down", answer)
        # The probes answer 503 in their own shapes, not in OpenAI's.
        for path, document in (
            (b"/readyz", {"ready": False, "reason": "the gateway is shutting down"}),
            (b"/healthz", {"status": "shutting_down", "provider": "gemini", "model": "gemini-flash-latest"}),
        ):
            answer = yield deferToThread(
                exchange, gateway.api_port, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path
            )
            head, _, body = answer.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 503 "), head)
            self.assertIn(b"\r\nConnection: close", head)
            self.assertEqual(json.loads(body), document)
