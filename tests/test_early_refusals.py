"""
Requests the API's site refuses before any resource sees them (a body
without a key, over MAX_REQUEST_BYTES, a repeated or missing C{Host}, a
repeated C{Authorization}, a deadline), failures' log lines and codes,
the C{provider} label of C{openclaw_api_requests}, and what the API and
the metrics listener say about C{/metrics} when it has a listener of its
own (C{--metrics-listen}).

Each against a gateway in this process, over real sockets.
"""

from __future__ import annotations

import datetime
import email.utils
import io
import json
import re
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase
from twisted.web import http

from openclaw.dataplane.connection import BODY_SLICE_BYTES
from openclaw.dataplane.metrics_site import METRICS_MAX_CONNECTIONS
from openclaw.dataplane.site import MAX_SMALL_PIECES, APIRequest
from tests.support import RecordingEndpoint, capture_log_events, exchange, start_gateway, start_metrics_listener
from tests.test_consumers import GatewayCase
from tests.test_dataplane import HELLO

KEY = "gw-key-0123456789abcdef"
CHAT = b"/v1/chat/completions"


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def code_of(answer: bytes) -> Any:
    return json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"]


def counted_chunks(case: TestCase) -> list[bytes]:
    """
    The pieces of body twisted.web hands to the API's requests from now on
    to the end of C{case} (L{APIRequest.handleContentChunk}'s calls).
    """
    chunks: list[bytes] = []
    handle = APIRequest.handleContentChunk

    def counted(request: APIRequest, data: bytes) -> None:
        chunks.append(data)
        handle(request, data)

    case.patch(APIRequest, "handleContentChunk", counted)
    return chunks


class EarlyRefusalTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.events = capture_log_events(self)
        self.gateway = start_gateway(self, api=True, gateway_api_keys=(KEY,), max_request_bytes=1000)
        self.addCleanup(self.gateway.service.api_site.close_connections)

    def request_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_namespace") == "openclaw.dataplane" and "status" in e]

    def metrics(self) -> Any:
        return deferToThread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{self.gateway.api_port}/metrics").read().decode()
        )

    def send(self, head: bytes, body: bytes = b"") -> Any:
        return deferToThread(exchange, self.gateway.api_port, head + b"\r\n\r\n" + body)

    @inlineCallbacks
    def test_each_early_refusal_logged_and_counted(self) -> Any:
        """
        Every refusal made as the head comes in is counted (provider C{-})
        and logged at info with its status and code, as the 401 of a body
        without a key is (method and path are C{-} until twisted.web has
        the whole request: a missing Host is found only then).
        """
        post = b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        cases = [
            (post + b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 5000", 413, "request_too_large"),
            (post + b"Content-Length: 5000", 401, "invalid_api_key"),
            (post + b"Host: other\r\nContent-Length: 2", 400, "invalid_host"),
            (
                post + b"Authorization: Bearer a\r\nAuthorization: Bearer b\r\nContent-Length: 2",
                400,
                "invalid_authorization",
            ),
            (b"GET /healthz HTTP/1.1\r\nUser-Agent: t", 400, "missing_host"),
        ]
        for head, status, code in cases:
            answer = yield self.send(head)
            self.assertEqual(status_of(answer), status, answer)
            if code is not None:
                self.assertEqual(code_of(answer), code)
        text = yield self.metrics()
        self.assertIn('openclaw_api_requests_total{provider="-",status="413"} 1.0', text)
        self.assertIn('openclaw_api_requests_total{provider="-",status="401"} 1.0', text)
        self.assertIn('openclaw_api_requests_total{provider="-",status="400"} 3.0', text)
        logged = [
            (e["log_level"].name, e["method"], e["path"], e["status"], e["outcome"], e["consumer"])
            for e in self.request_events()
        ]
        self.assertEqual(
            logged,
            [
                ("info", "-", "-", 413, "request_too_large", "-"),
                ("info", "-", "-", 401, "invalid_api_key", "-"),
                ("info", "-", "-", 400, "invalid_host", "-"),
                ("info", "-", "-", 400, "invalid_authorization", "-"),
                ("info", "GET", "/healthz", 400, "missing_host", "-"),
            ],
        )
        self.assertIn(
            "- - 413 request_too_large via - for - from 127.0.0.1",
            formatEvent(self.request_events()[0]),
        )

    @inlineCallbacks
    def test_no_body_without_a_key_whatever_its_size(self) -> Any:
        """
        A body over MAX_REQUEST_BYTES without a key gets the 401 (README,
        "No body without a key"); with a key, the 413.
        """
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 9437184"
        answer = yield self.send(head)
        self.assertEqual((status_of(answer), code_of(answer)), (401, "invalid_api_key"))
        answer = yield self.send(head + b"\r\nAuthorization: Bearer " + KEY.encode())
        self.assertEqual((status_of(answer), code_of(answer)), (413, "request_too_large"))

    @inlineCallbacks
    def test_refused_body_not_decoded(self) -> Any:
        """
        What follows a refused head in the same read is not decoded: a
        keyless chunked body of 1-byte chunks (hostile trial s42: each such
        request cost the gateway 70 ms decoding up to 64 KB of chunks it
        had refused) goes unread, as the later reads of the lingering
        close do; a key holder's body sent with its head is read as ever.
        """
        chunks = counted_chunks(self)
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked"
        answer = yield self.send(head, b"1\r\na\r\n" * 11000)
        self.assertEqual((status_of(answer), code_of(answer)), (401, "invalid_api_key"))
        self.assertEqual(chunks, [])
        body = json.dumps({"messages": HELLO}).encode()
        answer = yield self.send(
            head.replace(b"Transfer-Encoding: chunked", b"Content-Length: %d" % len(body))
            + b"\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nConnection: close",
            body,
        )
        self.assertEqual(b"".join(chunks), body)
        self.assertNotEqual(status_of(answer), 401)

    @inlineCallbacks
    def test_refusals_carry_a_date(self) -> Any:
        """
        An answer written before twisted.web has a request (the 413 of a
        Content-Length past the limit, the 400 of another Host) has a
        C{Date}, as twisted.web's answers have (RFC 9110 section 6.6.1):
        one, now, in IMF-fixdate.
        """
        post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        for head in (
            post + b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 5000",
            post + b"Host: other\r\nContent-Length: 2",
        ):
            before = int(time.time())
            answer = yield self.send(head)
            after = time.time()
            lines = answer.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]
            dates = [line.partition(b":")[2].strip() for line in lines if line.lower().startswith(b"date:")]
            self.assertEqual(len(dates), 1, answer)
            self.assertTrue(before <= http.stringToDatetime(dates[0]) <= after, dates)
            parsed = email.utils.parsedate_to_datetime(dates[0].decode("ascii"))
            self.assertEqual(parsed.utcoffset(), datetime.timedelta(0))

    @inlineCallbacks
    def test_transfer_codings_not_chunked_alone_refused(self) -> Any:
        """
        C{Transfer-Encoding} fields other than one C{chunked} (RFC 9112
        section 6.3): 400 and the connection closed, and the request
        smuggled behind never answered.  twisted.web ignores C{identity},
        framing the body by C{Content-Length} or as empty, where a proxy in
        front may take it as chunked.
        """
        post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
        smuggled = b"0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        for codings in (
            b"\r\nTransfer-Encoding: identity\r\nContent-Length: 5",
            b"\r\nContent-Length: 5\r\nTransfer-Encoding: identity",
            b"\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity",
            b"\r\nTransfer-Encoding: identity",
        ):
            answer = yield self.send(post + codings, smuggled)
            self.assertEqual(re.findall(rb"HTTP/1\.1 \d{3}", answer), [b"HTTP/1.1 400"], codings)
            self.assertEqual(code_of(answer), "invalid_transfer_encoding", answer)
            self.assertIn(b"Transfer-Encoding: chunked only", answer)
        # Chunked alone is the one transfer coding taken.
        body = json.dumps({"messages": HELLO}).encode()
        answer = yield self.send(post + b"\r\nTransfer-Encoding: Chunked", b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        self.assertNotEqual(code_of(answer), "invalid_transfer_encoding", answer)

    @inlineCallbacks
    def test_body_still_arriving_at_a_stop(self) -> Any:
        """
        A request whose body is still arriving when the gateway stops is
        answered 503 C{shutting_down}, logged and counted, while the rest of
        its body is read and dropped: the stop closed its connection with
        nothing said, nor logged (re-check s32).
        """
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Length: 600\r\n\r\n"
        )
        sock = socket.create_connection(("127.0.0.1", self.gateway.api_port), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(head + b"x" * 100)
        yield deferLater(reactor, 0.3, lambda: None)
        stopped = self.gateway.service.stopService()
        yield deferLater(reactor, 0.3, lambda: None)

        def rest() -> bytes:
            sock.sendall(b"x" * 500)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer

        answer = yield deferToThread(rest)
        yield stopped
        self.assertEqual((status_of(answer), code_of(answer)), (503, "shutting_down"), answer)
        self.assertIn(b"its request's body was still arriving", answer)
        (event,) = self.request_events()
        self.assertEqual((event["status"], event["outcome"]), (503, "shutting_down"))

    @inlineCallbacks
    def test_chunked_body_past_the_limit_logged(self) -> Any:
        """
        A chunked body that runs past the limit is cut off with a 413,
        logged (the key's consumer: C{-} for a GATEWAY_API_KEYS key) and counted.
        """
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            b"Authorization: Bearer " + KEY.encode()
        )
        answer = yield self.send(head, b"7d0\r\n" + b"x" * 2000 + b"\r\n0\r\n\r\n")
        self.assertEqual(status_of(answer), 413)
        (event,) = self.request_events()
        self.assertEqual((event["status"], event["outcome"], event["consumer"]), (413, "request_too_large", "-"))
        text = yield self.metrics()
        self.assertIn('openclaw_api_requests_total{provider="-",status="413"} 1.0', text)

    @inlineCallbacks
    def test_failure_line_carries_code_and_param(self) -> Any:
        """
        The gateway's own 400 for a bad body: logged with an outcome (the
        error's code, or its type when it has none) and its C{param}; the
        text line names the outcome after the status.
        """
        body = b'{"messages": []}'
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
            b"Content-Length: %d" % len(body)
        )
        answer = yield self.send(head, body)
        self.assertEqual(status_of(answer), 400)
        error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        (event,) = self.request_events()
        self.assertEqual(event["outcome"], error["code"] or error["type"])
        self.assertEqual(event["param"], error["param"])
        self.assertIsNotNone(event["param"])
        self.assertIn(f"POST /v1/chat/completions 400 {event['outcome']} via - for - ", formatEvent(event))


class FragmentedBodyTests(TestCase):
    """
    A key holder's body in pieces too small is refused once past
    L{MAX_SMALL_PIECES}, and what follows in the read is not parsed
    (hostile trial s42: 2.5 MB in 1-byte chunks held the reactor for
    seconds a request, every client's answers a second late).
    """

    timeout = 30

    def setUp(self) -> None:
        self.gateway = start_gateway(self, api=True, gateway_api_keys=(KEY,))
        self.addCleanup(self.gateway.service.api_site.close_connections)

    @inlineCallbacks
    def test_refused(self) -> Any:
        chunks = counted_chunks(self)
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\n\r\n"
        )
        answer = yield deferToThread(exchange, self.gateway.api_port, head + b"1\r\na\r\n" * 50000)
        self.assertEqual((status_of(answer), code_of(answer)), (400, "request_body_fragmented"), answer)
        self.assertIn(b"send it with a Content-Length", answer)
        # The pieces before the refusal, and no more than a slice of the
        # read's rest (BODY_SLICE_BYTES: 6 bytes a 1-byte chunk).
        self.assertLess(len(chunks), MAX_SMALL_PIECES + BODY_SLICE_BYTES // 6 + 2)
        # Pieces of a usual size: read.
        chunks.clear()
        body = json.dumps({"messages": HELLO, "metadata": {"k": "v" * 200}}).encode()
        pieces = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 64]), body[i : i + 64]) for i in range(0, len(body), 64))
        answer = yield deferToThread(
            exchange,
            self.gateway.api_port,
            head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + pieces + b"0\r\n\r\n",
        )
        self.assertEqual(b"".join(chunks), body)
        self.assertNotEqual(status_of(answer), 400, answer)

    @inlineCallbacks
    def test_read_whole(self) -> Any:
        """
        A body of known length that comes in many small reads (a slow
        link, an unbuffered writer) is read whole: its reads are not
        pieces the client chose (re-check s42: refused as fragmented, told
        to send the Content-Length it had sent).
        """
        chunks = counted_chunks(self)
        body = json.dumps({"messages": HELLO, "metadata": {"k": "v" * 500}}).encode().ljust(MAX_SMALL_PIECES * 16)
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
            b"Authorization: Bearer %s\r\nConnection: close\r\n\r\n" % (len(body), KEY.encode())
        )

        def trickle() -> bytes:
            with socket.create_connection(("127.0.0.1", self.gateway.api_port), timeout=10) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(head)
                for start in range(0, len(body), 8):
                    sock.sendall(body[start : start + 8])
                    time.sleep(0.0002)
                answer = b""
                while data := sock.recv(65536):
                    answer += data
                return answer

        answer = yield deferToThread(trickle)
        self.assertNotIn(b"request_body_fragmented", answer)
        self.assertEqual(b"".join(chunks), body)


class ProviderLabelTests(GatewayCase):
    @inlineCallbacks
    def test_consumer_limit_is_not_the_providers(self) -> Any:
        """
        A consumer's call refused by its own limit (rpm) is counted under
        provider C{-}: no provider was called; its allowed call under the
        provider that answered.
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "c", "rpm": 1})
        sdk = self.sdk(gateway, created["key"])
        yield deferToThread(sdk.chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO)
        refused = yield self.refused(sdk, "kimi/moonshot-v1-8k")
        self.assertEqual(refused.status_code, 429)
        self.assertEqual(self.upstream.kimi.requests, 1)
        text = yield deferToThread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{gateway.api_port}/metrics").read().decode()
        )
        self.assertIn('openclaw_api_requests_total{provider="kimi",status="200"} 1.0', text)
        self.assertIn('openclaw_api_requests_total{provider="-",status="429"} 1.0', text)
        self.assertNotIn('openclaw_api_requests_total{provider="kimi",status="429"}', text)


class MetricsApartTests(TestCase):
    """
    With C{--metrics-listen}, the API's 404 for C{/metrics} says where it
    is, and the metrics listener answers any other path with a short
    plain-text 404.
    """

    timeout = 30

    @inlineCallbacks
    def test_metrics_on_their_own_listener(self) -> Any:
        from openclaw.service import GatewayService

        gateway = start_gateway(self, api=True, gateway_api_keys=(KEY,))
        # A second service with both listeners: /metrics apart from its API.
        api = RecordingEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
        metrics = RecordingEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
        state_dir = Path(self.mktemp())
        state_dir.mkdir()
        service = GatewayService(
            attrs.evolve(gateway.service.settings, state_dir=state_dir),
            reactor,
            RecordingEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")),
            api_endpoint=api,
            metrics_endpoint=metrics,
            stdout=io.StringIO(),
        )
        service.startService()
        self.addCleanup(service.stopService)
        assert api.port is not None and metrics.port is not None
        api_port, metrics_port = api.port.getHost().port, metrics.port.getHost().port
        get = b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        answer = yield deferToThread(exchange, api_port, b"GET /metrics" + get)
        self.assertEqual(status_of(answer), 404)
        message = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["message"]
        self.assertIn("--metrics-listen", message)
        self.assertNotIn("GET /metrics", message)
        answer = yield deferToThread(exchange, api_port, b"GET /v2" + get)
        self.assertNotIn("GET /metrics", json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["message"])
        # The API listener of a gateway without one still lists it.
        answer = yield deferToThread(exchange, gateway.api_port, b"GET /v2" + get)
        self.assertIn("GET /metrics", json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["message"])
        for path in (b"/", b"/v1/models", b"/metricsx"):
            answer = yield deferToThread(exchange, metrics_port, b"GET " + path + get)
            head, _, body = answer.partition(b"\r\n\r\n")
            self.assertEqual(status_of(answer), 404, path)
            self.assertIn(b"text/plain", head)
            self.assertEqual(body, b"no such endpoint: this listener (--metrics-listen) serves GET /metrics only\n")
        answer = yield deferToThread(exchange, metrics_port, b"GET /metrics" + get)
        self.assertEqual(status_of(answer), 200)


def status_line(answer: bytes) -> bytes:
    return answer.partition(b"\r\n")[0]


class MetricsListenerLimitsTests(TestCase):
    """
    The metrics listener (C{--metrics-listen}) reads no request body, holds
    at most L{METRICS_MAX_CONNECTIONS} connections and closes an idle one:
    an unauthenticated client cannot fill the disk through it, nor take the
    process's descriptors.
    """

    timeout = 30

    def listener(self, **settings: Any) -> int:
        gateway = start_gateway(self, **settings)
        return start_metrics_listener(self, gateway.service.settings)

    @inlineCallbacks
    def test_no_body_read(self) -> Any:
        port = self.listener()
        head = b"POST /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        for request in (
            # Only the head is sent: the answer comes before any body.
            head + b"Content-Length: 100000000000\r\n\r\n",
            head + b"Transfer-Encoding: chunked\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello",
            # A transfer coding twisted.web ignores (the body taken as
            # empty): a body all the same (RFC 9112 section 6.3).
            b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: identity\r\n\r\n"
            b"0\r\n\r\nGET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        ):
            answer = yield deferToThread(exchange, port, request)
            self.assertEqual(status_line(answer), b"HTTP/1.1 400 Bad Request", answer[:300])
            self.assertIn(b"send no request body", answer)
        answer = yield deferToThread(
            exchange, port, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(status_line(answer), b"HTTP/1.1 200 OK")

    @inlineCallbacks
    def test_connections_capped(self) -> Any:
        port = self.listener()

        per_address = METRICS_MAX_CONNECTIONS // 4

        def hold() -> list[socket.socket]:
            # A quarter of the cap from each of four addresses.
            held = [
                socket.create_connection(
                    ("127.0.0.1", port), timeout=5, source_address=(f"127.0.0.{1 + i // per_address}", 0)
                )
                for i in range(METRICS_MAX_CONNECTIONS)
            ]
            # Each accepted before the next (the cap counts open ones).
            for sock in held:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                sock.recv(65536)
            return held

        held = yield deferToThread(hold)
        self.addCleanup(lambda: [sock.close() for sock in held])
        answer = yield deferToThread(exchange, port, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertEqual(answer, b"")
        held.pop().close()

        def scrape_from_the_last_address() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.4", 0)) as sock:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                answer = b""
                try:
                    while chunk := sock.recv(65536):
                        answer += chunk
                except ConnectionResetError:
                    pass
                return answer

        for _ in range(50):
            answer = yield deferToThread(scrape_from_the_last_address)
            if answer:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        # Served (a peer outside TRUSTED_CLIENT_IPS is told 403).
        self.assertEqual(status_line(answer), b"HTTP/1.1 403 Forbidden")

    @inlineCallbacks
    def test_connections_capped_per_address(self) -> Any:
        """
        One address holds a quarter of the cap at most (a client trickling
        its heads cannot take every slot); another still gets in.
        """
        port = self.listener()
        per_address = METRICS_MAX_CONNECTIONS // 4

        def hold() -> tuple[list[socket.socket], bytes, bytes]:
            held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(per_address)]
            for sock in held:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                sock.recv(65536)
            refused = exchange(port, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)) as other:
                other.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                served = other.recv(65536)
            return held, refused, served

        held, refused, served = yield deferToThread(hold)
        self.addCleanup(lambda: [sock.close() for sock in held])
        self.assertEqual(refused, b"")
        self.assertTrue(served.startswith(b"HTTP/1.1 "), served[:100])

    @inlineCallbacks
    def test_idle_connection_closed(self) -> Any:
        port = self.listener(api_header_timeout_seconds=1)

        def idle() -> tuple[bytes, float]:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                started = time.monotonic()
                return sock.recv(65536), time.monotonic() - started

        data, waited = yield deferToThread(idle)
        self.assertEqual(data, b"")
        self.assertLess(waited, 5)
