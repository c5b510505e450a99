"""
Early refusals reach a client still sending its body (a lingering close,
L{openclaw.dataplane.connection.APIConnection.close_lingering}), bounded in time
and bytes; and every API answer carries an C{x-request-id}, logged with its
call.

Against a gateway in this process, over real sockets on loopback.
"""

from __future__ import annotations

import errno
import json
import re
import socket
import time
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase

from openclaw.dataplane.connection import CLOSE_DEADLINE_SECONDS, LINGER_QUIET_SECONDS
from tests.support import capture_log_events, start_gateway
from tests.test_dataplane import HELLO, DataPlaneTestCase

KEY = "gw-key-0123456789abcdef"
#: The SDK tester's body: 9 MiB, over MAX_REQUEST_BYTES here (1000).
BODY_BYTES = 9 * 1024 * 1024
REQUEST_ID = re.compile(r"req_[0-9a-f]{32}")
#: API_BODY_TIMEOUT_SECONDS here: a lingering close's deadline.
BODY_TIMEOUT = 3.0
#: API_KEYLESS_TIMEOUT_SECONDS here: the deadline of a keyless one (a 401).
KEYLESS_TIMEOUT = 1.5


def head(length: int, key: str | None) -> bytes:
    fields = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if key is not None:
        fields += b"Authorization: Bearer " + key.encode() + b"\r\n"
    return fields + b"Content-Length: %d\r\n\r\n" % length


def send_body_then_read(port: int, key: str | None, length: int = BODY_BYTES) -> bytes:
    """
    What a client that sends its whole body before it reads does (the
    openai SDKs): the head, then the body in 64 KiB writes until all is
    sent or the server refuses more (EPIPE, a reset), then read to the end.
    What it read, after C{b"cut: "} if a write failed: the Node SDK then
    gives up on the request (a connection error) without reading.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head(length, key))
        chunk = b"x" * 65536
        left = length
        answer = b""
        try:
            while left > 0:
                sock.sendall(chunk[:left])
                left -= min(left, len(chunk))
        except (BrokenPipeError, ConnectionResetError):
            answer = b"cut: "
        try:
            while part := sock.recv(65536):
                answer += part
        except ConnectionResetError as e:
            return b"reset after %d bytes: %s" % (len(answer), str(e).encode())
        return answer


def send_forever(port: int, gap: float, size: int, key: str | None = KEY) -> tuple[bytes, float]:
    """
    A client that never stops sending (C{size} bytes every C{gap}
    seconds), reading what comes between writes: what it read, and the
    seconds from its head until the server ended the connection.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head(BODY_BYTES * 100, key))
        started = time.monotonic()
        sock.setblocking(False)
        answer = b""
        payload = b"x" * size
        while time.monotonic() - started < 15:
            try:
                sock.send(payload)
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno in (errno.EPIPE, errno.ECONNRESET):
                    break
                raise
            try:
                part = sock.recv(65536)
                if not part:
                    # Our answer is in; the server closed its side: go on
                    # sending, as a client still writing its body would.
                    pass
                answer += part
            except BlockingIOError:
                pass
            except ConnectionResetError:
                break
            time.sleep(gap)
        return answer, time.monotonic() - started


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def header(answer: bytes, name: bytes) -> bytes | None:
    head_part = answer.partition(b"\r\n\r\n")[0]
    for line in head_part.split(b"\r\n")[1:]:
        field, _, value = line.partition(b":")
        if field.strip().lower() == name:
            return value.strip()
    return None


class LingeringCloseTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.events = capture_log_events(self)
        self.gateway = start_gateway(
            self,
            api=True,
            gateway_api_keys=(KEY,),
            max_request_bytes=1000,
            api_body_timeout_seconds=BODY_TIMEOUT,
            api_keyless_timeout_seconds=KEYLESS_TIMEOUT,
        )
        self.site = self.gateway.service.api_site
        self.addCleanup(self.site.close_connections)

    @inlineCallbacks
    def test_refusal_reaches_a_client_still_sending(self) -> Any:
        """
        A 413 (and a keyless 401) sent before the body is read reaches a
        client that sends all of its 9 MiB body before it reads, every
        time, and its writes all succeed: the gateway shuts only its
        sending side and reads on.  (Closed outright, the connection was
        reset under the client's writes: its write failed with EPIPE,
        which the Node SDK reports as a connection error, never reading
        the answer, and retries.)
        """
        port = self.gateway.api_port
        for key, status, code in ((KEY, 413, "request_too_large"), (None, 401, "invalid_api_key")):
            for attempt in range(30 if key else 10):
                answer = yield deferToThread(send_body_then_read, port, key)
                self.assertTrue(answer.startswith(b"HTTP/1.1 %d " % status), (attempt, answer[:200]))
                body = json.loads(answer.partition(b"\r\n\r\n")[2])
                self.assertEqual(body["error"]["code"], code)
                self.assertRegex(header(answer, b"x-request-id").decode(), REQUEST_ID)

    @inlineCallbacks
    def test_refusal_reaches_a_client_that_half_closes(self) -> Any:
        """
        A client that closes its sending side right after its request
        (SHUT_WR) still reads the early refusal: its end of input is read
        as that side's close, and the connection closes once the answer is
        sent (read as the connection's loss, it dropped the answer unsent).
        """

        def request_then_half_close(raw: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", self.gateway.api_port), timeout=10) as sock:
                sock.sendall(raw)
                sock.shutdown(socket.SHUT_WR)
                answer = b""
                while part := sock.recv(65536):
                    answer += part
                return answer

        cases = (
            (head(50000, None), 401),
            (head(2, None) + b"{}", 401),
            (head(99999999, KEY), 413),
        )
        for raw, status in cases:
            for attempt in range(10):
                answer = yield deferToThread(request_then_half_close, raw)
                self.assertTrue(answer.startswith(b"HTTP/1.1 %d " % status), (status, attempt, answer[:200]))
        self.assertEqual(len(self.site.connections), 0)

    @inlineCallbacks
    def test_client_sending_forever_is_closed_within_bound(self) -> Any:
        """
        A client that never stops sending gets its 413 and is cut off
        within the time it had for a body (API_BODY_TIMEOUT_SECONDS), a
        slow one there; a fast one at the byte budget (sooner).
        """
        port = self.gateway.api_port
        answer, seconds = yield deferToThread(send_forever, port, 0.05, 1024)
        self.assertEqual(status_of(answer), 413, answer[:200])
        self.assertGreaterEqual(seconds, BODY_TIMEOUT - 0.2)
        self.assertLess(seconds, BODY_TIMEOUT + 1.5)
        answer, seconds = yield deferToThread(send_forever, port, 0, 65536)
        self.assertEqual(status_of(answer), 413, answer[:200])
        self.assertLess(seconds, BODY_TIMEOUT + 1.5)
        # Without a key (a 401), no longer than any keyless connection.
        answer, seconds = yield deferToThread(send_forever, port, 0.05, 1024, None)
        self.assertEqual(status_of(answer), 401, answer[:200])
        self.assertGreaterEqual(seconds, KEYLESS_TIMEOUT - 0.2)
        self.assertLess(seconds, KEYLESS_TIMEOUT + 1.0)
        self.assertEqual(len(self.site.connections), 0)

    @inlineCallbacks
    def test_slow_upload_gets_the_answer(self) -> Any:
        """
        A client whose refused body takes longer than the polite close's
        2 s to send (here 1000 bytes every 0.3 s for 2.7 s) sends all of
        it, then reads the answer: the linger lasts as long as the time it
        had for a body.  (Cut at 2 s, its write failed with EPIPE.)
        """

        def slow_upload() -> bytes:
            with socket.create_connection(("127.0.0.1", self.gateway.api_port), timeout=10) as sock:
                sock.sendall(head(9000, KEY))
                for _ in range(9):
                    time.sleep(0.3)
                    sock.sendall(b"x" * 1000)
                answer = b""
                while part := sock.recv(65536):
                    answer += part
                return answer

        answer = yield deferToThread(slow_upload)
        self.assertEqual(status_of(answer), 413, answer[:200])
        self.assertGreater(BODY_TIMEOUT, CLOSE_DEADLINE_SECONDS + 0.7)

    @inlineCallbacks
    def test_quiet_client_closed_after_the_gap(self) -> Any:
        """
        A client that sends part of its body and then waits, neither
        sending nor closing, reads the 413 and the end of the connection
        LINGER_QUIET_SECONDS after its last byte.
        """

        def part_then_wait() -> tuple[bytes, bool]:
            with socket.create_connection(("127.0.0.1", self.gateway.api_port), timeout=10) as sock:
                sock.sendall(head(BODY_BYTES, KEY) + b"x" * 4096)
                answer = b""
                while part := sock.recv(65536):
                    answer += part
                # The server's FIN came at once with the answer.  Sending
                # nothing more, the connection is closed past the quiet
                # gap (before the linger's deadline): a write then draws a
                # reset, and the next one fails.
                time.sleep(LINGER_QUIET_SECONDS + 0.5)
                try:
                    sock.send(b"y")
                    time.sleep(0.2)
                    sock.send(b"y")
                except OSError:
                    return answer, True
                return answer, False

        answer, closed = yield deferToThread(part_then_wait)
        self.assertEqual(status_of(answer), 413)
        self.assertTrue(closed)
        self.assertGreater(BODY_TIMEOUT, LINGER_QUIET_SECONDS + 0.7)

    @inlineCallbacks
    def test_refusal_logged_with_id(self) -> Any:
        """
        The early 413's log line carries the id its answer carries (method
        and path C{-}: twisted.web hands them over only with the whole
        request, and the gateway does not parse the request line itself).
        """
        answer = yield deferToThread(send_body_then_read, self.gateway.api_port, KEY, 5000)
        request_id = header(answer, b"x-request-id")
        assert request_id is not None
        [event] = [e for e in self.events if e.get("log_namespace") == "openclaw.dataplane" and "status" in e]
        self.assertEqual((event["method"], event["path"], event["status"]), ("-", "-", 413))
        self.assertEqual(event["request_id"], request_id.decode())
        self.assertIn(
            f"- - 413 request_too_large via - for - from 127.0.0.1 in 0.0 ms, request {request_id.decode()}",
            formatEvent(event),
        )


class RequestIdTests(DataPlaneTestCase):
    """
    Every API answer carries an C{x-request-id} (OpenAI's API does: API
    reference, "Debugging requests"), a new one each time, and the call's
    log line the same id.
    """

    @inlineCallbacks
    def test_every_answer_has_an_id(self) -> Any:
        gateway = self.gateway(default_provider="kimi", log_level="debug", fallback="off")
        client = self.sdk(gateway)
        ids = []
        whole = yield deferToThread(client.chat.completions.with_raw_response.create, model="gpt-4o", messages=HELLO)
        ids.append(whole.headers["x-request-id"])

        def streamed() -> str:
            with client.chat.completions.with_streaming_response.create(
                model="gpt-4o", messages=HELLO, stream=True
            ) as response:
                for _ in response.iter_lines():
                    pass
                return str(response.headers["x-request-id"])

        ids.append((yield deferToThread(streamed)))
        refused = yield deferToThread(
            lambda: self._status_error(lambda: client.chat.completions.create(model="gpt-4o", messages=[]))
        )
        self.assertEqual(refused.status_code, 400)
        ids.append(refused.response.headers["x-request-id"])
        self.upstream.kimi.mode = "error"
        self.upstream.kimi.error_status = 503
        failed = yield deferToThread(
            lambda: self._status_error(lambda: client.chat.completions.create(model="gpt-4o", messages=HELLO))
        )
        self.assertGreaterEqual(failed.status_code, 500)
        ids.append(failed.response.headers["x-request-id"])
        self.assertEqual(failed.request_id, ids[-1])
        for request_id in ids:
            self.assertRegex(request_id, REQUEST_ID)
        self.assertEqual(len(set(ids)), len(ids))
        # Each call's log line (the successes' at debug) has its id.
        logged = [
            e["request_id"] for e in self.events if e.get("log_namespace") == "openclaw.dataplane" and "status" in e
        ]
        self.assertEqual(logged, ids)
        [failure] = [e for e in self.events if e.get("request_id") == ids[-1] and "status" in e]
        self.assertIn(f"request {ids[-1]}", formatEvent(failure))

    @staticmethod
    def _status_error(call: Any) -> Any:
        import openai

        try:
            call()
        except openai.APIStatusError as e:
            return e
        raise AssertionError("the call was not refused")

    @inlineCallbacks
    def test_404_and_unknown_path(self) -> Any:
        """
        Answers made by twisted.web's own resources (a 404) have one too.
        """
        gateway = self.gateway()

        def get() -> bytes:
            with socket.create_connection(("127.0.0.1", gateway.api_port), timeout=5) as sock:
                sock.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = b""
                while part := sock.recv(65536):
                    answer += part
                return answer

        answer = yield deferToThread(get)
        self.assertEqual(status_of(answer), 404)
        self.assertRegex((header(answer, b"x-request-id") or b"").decode(), REQUEST_ID)
