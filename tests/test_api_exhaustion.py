"""
The API port against a hostile network (issue #17, items 5, 7 and 9), over
real sockets: no body is read without a key, connections are capped in all
and per address, a request's head and body have deadlines bytes do not
extend, the control plane keeps descriptors however the API is flooded, no
input yields a 500, and C{/metrics} refuses a foreign C{Host} or any
C{Origin}.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from openclaw.listeners import DescriptorShares, share_descriptors
from openclaw.metrics import API_REFUSALS
from tests.support import (
    capture_log_events,
    free_port,
    limited_twistd,
    open_client,
    spawn_gateway,
    start_gateway,
    start_upstream,
    still_open,
)

KEY = "gw-key-0123456789abcdef"
KIMI_KEY = "sk-kimi-SECRET-0123456789abcdef"
GEMINI_KEY = "AIza-gemini-SECRET-0123456789abcdef"


def raw(port: int, data: bytes, timeout: float = 5.0, source: str = "127.0.0.1") -> bytes:
    """
    Send C{data}, then read until the server closes (or C{timeout}).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    try:
        sock.sendall(data)
        answer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            answer += chunk
        return answer
    finally:
        sock.close()


def closed_at_once(port: int, source: str = "127.0.0.1", within: float = 2.0) -> bool:
    """
    Whether a new connection is closed by the server without a byte sent.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=within, source_address=(source, 0))
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


def high_levels(events: list[dict[str, Any]]) -> list[str]:
    return [
        str(event.get("log_format"))
        for event in events
        if event.get("log_level") in (LogLevel.error, LogLevel.critical)
    ]


class EarlyAuthTests(TestCase):
    timeout = 20

    @inlineCallbacks
    def test_keyless_body_refused_before_it_is_read(self):
        """
        A keyless POST declaring a body gets its 401 as soon as its headers
        are in: the client sends no body byte and still has its answer.
        (Before, the gateway waited for the whole 1 MB.)
        """
        gateway = start_gateway(self, api=True, gateway_api_keys=(KEY,))
        answer = yield deferToThread(
            raw,
            gateway.api_port,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
            b"Content-Type: application/json\r\nExpect: 100-continue\r\n\r\n",
            3.0,
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 401 "), answer[:200])
        self.assertNotIn(b"100 Continue", answer)
        body = json.loads(answer.partition(b"\r\n\r\n")[2])
        self.assertEqual(body["error"]["code"], "invalid_api_key")

    @inlineCallbacks
    def test_wrong_key_chunked_refused(self):
        gateway = start_gateway(self, api=True, gateway_api_keys=(KEY,))
        answer = yield deferToThread(
            raw,
            gateway.api_port,
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            3.0,
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 401 "), answer[:200])


class ConnectionCapTests(TestCase):
    timeout = 20

    @inlineCallbacks
    def test_total_cap(self):
        gateway = start_gateway(
            self,
            api=True,
            gateway_api_keys=(KEY,),
            api_max_connections=3,
            api_max_connections_per_address=3,
            api_keyless_connections_per_address=3,
        )
        held = [socket.create_connection(("127.0.0.1", gateway.api_port)) for _ in range(3)]
        self.addCleanup(lambda: [sock.close() for sock in held])
        yield deferLater(reactor, 0.2)
        self.assertEqual(len(gateway.service.api_site.connections), 3)
        registry = gateway.service.metrics.registry
        self.assertEqual(registry.get_sample_value("openclaw_api_connections"), 3.0)
        refused = yield deferToThread(closed_at_once, gateway.api_port)
        self.assertTrue(refused)
        # Counted under the first limit it hit (this address's share is the
        # whole cap here), as the context counts it.
        counted = {
            reason: registry.get_sample_value("openclaw_api_refused_connections_total", {"reason": reason})
            for reason in API_REFUSALS
        }
        self.assertEqual({reason: n for reason, n in counted.items() if n}, {"api_max_connections_per_address": 1.0})
        held.pop().close()
        yield deferLater(reactor, 0.2)
        answer = yield deferToThread(
            raw, gateway.api_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:100])

    @inlineCallbacks
    def test_per_address_cap(self):
        """
        One address cannot take every slot: past its share it is closed at
        once, while another address still gets in.  (The default share is
        a quarter of API_MAX_CONNECTIONS.)
        """
        events = capture_log_events(self)
        gateway = start_gateway(
            self, api=True, gateway_api_keys=(KEY,), api_max_connections=8, api_keyless_connections_per_address=2
        )
        self.assertEqual(gateway.service.api_site.limits.max_connections_per_address, 2)
        held = [
            socket.create_connection(("127.0.0.1", gateway.api_port), source_address=("127.0.0.2", 0)) for _ in range(2)
        ]
        self.addCleanup(lambda: [sock.close() for sock in held])
        yield deferLater(reactor, 0.2)
        refused = yield deferToThread(closed_at_once, gateway.api_port, "127.0.0.2")
        self.assertTrue(refused)
        answer = yield deferToThread(
            raw, gateway.api_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:100])
        self.assertEqual(gateway.service.api_site.context.refused_connections, {"api_max_connections_per_address": 1})
        # The line names the address, the value and what to do (hostile
        # trial s40: none of them).
        (said,) = [formatEvent(e) for e in events if "API connection from" in formatEvent(e)]
        self.assertIn("from 127.0.0.2 refused: API_MAX_CONNECTIONS_PER_ADDRESS (2) reached", said)
        self.assertIn("raise API_MAX_CONNECTIONS_PER_ADDRESS", said)


def trickle(port: int, parts: list[bytes], gap: float, source: str = "127.0.0.1") -> tuple[bytes, float]:
    """
    Send C{parts} one every C{gap} seconds (a slow-loris) while the server
    lets us; what it answered and when it closed.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    started = time.monotonic()
    answer = b""
    try:
        sock.settimeout(gap)
        for part in parts:
            try:
                sock.sendall(part)
            except OSError:
                break
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            answer += chunk
            if not chunk:
                break
        return answer, time.monotonic() - started
    finally:
        sock.close()


class DeadlineTests(TestCase):
    timeout = 20

    @inlineCallbacks
    def test_idle_connection_closed(self):
        gateway = start_gateway(self, api=True, gateway_api_keys=(KEY,), api_header_timeout_seconds=0.5)
        started = time.monotonic()
        refused = yield deferToThread(closed_at_once, gateway.api_port, "127.0.0.1", 5.0)
        self.assertTrue(refused)
        self.assertLess(time.monotonic() - started, 3.0)

    @inlineCallbacks
    def test_head_deadline_not_extended_by_bytes(self):
        """
        A head sent a byte at a time keeps Twisted's idle timer alive for
        ever; its own deadline still ends it, with a 408.
        """
        gateway = start_gateway(self, api=True, gateway_api_keys=(KEY,), api_header_timeout_seconds=0.6)
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40
        answer, took = yield deferToThread(trickle, gateway.api_port, [bytes([b]) for b in head], 0.1)
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer[:200])
        self.assertIn(b"API_HEADER_TIMEOUT_SECONDS", answer)
        self.assertLess(took, 3.0)

    @inlineCallbacks
    def test_body_deadline(self):
        gateway = start_gateway(
            self, api=True, gateway_api_keys=(KEY,), api_header_timeout_seconds=5, api_body_timeout_seconds=0.6
        )
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Length: 100\r\n\r\n"
        )
        answer, took = yield deferToThread(trickle, gateway.api_port, [head] + [b"x"] * 60, 0.1)
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer[:200])
        self.assertIn(b"API_BODY_TIMEOUT_SECONDS", answer)
        self.assertLess(took, 3.0)

    @inlineCallbacks
    def test_body_deadline_with_part_of_body(self):
        """
        A head that comes with part of its body: the rest has
        C{API_BODY_TIMEOUT_SECONDS} from then.
        """
        gateway = start_gateway(
            self, api=True, gateway_api_keys=(KEY,), api_header_timeout_seconds=5, api_body_timeout_seconds=0.6
        )
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEY.encode()
            + b'\r\nContent-Length: 100\r\n\r\n{"a":'
        )
        started = time.monotonic()
        answer = yield deferToThread(raw, gateway.api_port, head, 5.0)
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer[:200])
        self.assertIn(b"API_BODY_TIMEOUT_SECONDS", answer)
        self.assertLess(time.monotonic() - started, 3.0)

    @inlineCallbacks
    def test_pipelined_body_deadline(self):
        """
        A request pipelined behind another, its body unfinished: twisted.web
        holds its bytes while the first is answered and hands them over
        once that answer is finished, outside the connection's
        C{dataReceived}; its body still has C{API_BODY_TIMEOUT_SECONDS}
        from then.
        """
        upstream = start_upstream(self, KIMI_KEY, GEMINI_KEY)
        gateway = start_gateway(
            self,
            api=True,
            providers=upstream.provider_settings(),
            gateway_api_keys=(KEY,),
            api_header_timeout_seconds=5,
            api_body_timeout_seconds=0.6,
        )
        auth = b"Authorization: Bearer " + KEY.encode() + b"\r\n"
        data = (
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
            + auth
            + b"\r\nPOST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            + auth
            + b'Content-Length: 100\r\n\r\n{"a":'
        )
        started = time.monotonic()
        answer = yield deferToThread(raw, gateway.api_port, data, 5.0)
        took = time.monotonic() - started
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:200])
        self.assertIn(b"HTTP/1.1 408 ", answer)
        self.assertIn(b"API_BODY_TIMEOUT_SECONDS", answer)
        self.assertLess(took, 3.0)

    @inlineCallbacks
    def test_keep_alive_requests_within_deadline_are_served(self):
        """
        The head deadline starts again after each answer: a keep-alive
        client is not cut off by the time its earlier requests took.
        """
        gateway = start_gateway(self, api=True, gateway_api_keys=(KEY,), api_header_timeout_seconds=0.5)

        def three_requests() -> list[int]:
            connection = http.client.HTTPConnection("127.0.0.1", gateway.api_port, timeout=5)
            statuses = []
            try:
                for _ in range(3):
                    connection.request("GET", "/healthz")
                    response = connection.getresponse()
                    response.read()
                    statuses.append(response.status)
                    time.sleep(0.3)
            finally:
                connection.close()
            return statuses

        statuses = yield deferToThread(three_requests)
        self.assertEqual(statuses, [200, 200, 200])


class DescriptorBudgetTests(SynchronousTestCase):
    def test_budget(self):
        """
        An eighth (at least 64) kept back; a quarter of the rest for the
        control listener, what it leaves for the API at two per connection.
        """
        wanted = (4096 + 256, 4096)
        self.assertEqual(share_descriptors(1024, *wanted), DescriptorShares(1024, 224, 336))
        self.assertEqual(share_descriptors(200, *wanted), DescriptorShares(200, 34, 51))
        self.assertEqual(share_descriptors(65536, *wanted), DescriptorShares(65536, 4352, 4096))
        self.assertEqual(share_descriptors(None, *wanted), DescriptorShares(None, 4352, 4096))
        # The control listener's unused share goes to the API; without an
        # API the control listener may have it all.
        self.assertEqual(share_descriptors(1024, 100, 4096), DescriptorShares(1024, 100, 398))
        self.assertEqual(share_descriptors(1024, 4352, 0), DescriptorShares(1024, 896, 0))


class DescriptorReserveTests(TestCase):
    """
    A real C{twistd} with its file limit at 256: a flood of idle API
    connections from many loopback addresses cannot starve the control
    plane.
    """

    timeout = 40

    @inlineCallbacks
    def test_control_plane_reachable_under_flood(self):
        port, api_port = free_port(), free_port()
        env = {**os.environ, "JWT_SECRET": "r" * 40, "GATEWAY_API_KEYS": KEY, "LOG_LEVEL": "info"}
        env["PYTHONPATH"] = ""
        args = ["--port", str(port), "--api-port", str(api_port), "--interface", "127.0.0.1"]
        process = spawn_gateway(self, args, env, twistd=limited_twistd(self, 256))
        token = yield process.token
        flood: list[socket.socket] = []
        self.addCleanup(lambda: [sock.close() for sock in flood])

        def open_flood() -> int:
            for i in range(400):
                try:
                    flood.append(
                        socket.create_connection(
                            ("127.0.0.1", api_port), timeout=2, source_address=(f"127.0.1.{i % 40 + 1}", 0)
                        )
                    )
                except OSError:
                    pass
            return still_open(flood)

        held = yield deferToThread(open_flood)
        # 256 - 64 - 48 = 144, less a quarter for the two provider hosts'
        # idle pooled connections (18 each), halved: 54 API connections.
        self.assertLessEqual(held, 54)
        self.assertGreater(held, 0)
        client = yield open_client(self, port)
        answer = yield client.command(token, "ping")
        self.assertEqual(answer["ok"], True, answer)
        self.assertIn(b"API connections are capped at 54", process.stdout + process.stderr)


class NoServerErrorTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.upstream = start_upstream(self, KIMI_KEY, GEMINI_KEY)
        self.events = capture_log_events(self)
        self.gateway = start_gateway(
            self, api=True, providers=self.upstream.provider_settings(), gateway_api_keys=(KEY,)
        )
        self.addCleanup(self.gateway.service.api_site.close_connections)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
        connection = http.client.HTTPConnection("127.0.0.1", self.gateway.api_port, timeout=10)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def assertOpenAIError(self, status: int, body: bytes, method: str = "POST") -> None:
        self.assertTrue(400 <= status < 500, (status, body[:300]))
        if method != "HEAD":
            error = json.loads(body)["error"]
            self.assertIsInstance(error["message"], str)
            self.assertIsInstance(error["type"], str)

    @inlineCallbacks
    def test_head_without_key(self):
        """
        C{curl -I /v1/chat/completions}: a 405, not a 500 and a critical
        traceback.
        """
        for path in ("/v1/chat/completions", "/v1/embeddings", "/nowhere"):
            status, body = yield deferToThread(self.request, "HEAD", path)
            self.assertOpenAIError(status, body, "HEAD")
        status, _ = yield deferToThread(self.request, "HEAD", "/healthz")
        self.assertEqual(status, 200)
        status, _ = yield deferToThread(self.request, "HEAD", "/metrics?" + "A" * 8000)
        self.assertEqual(status, 200)
        self.assertEqual(high_levels(self.events), [])
        # Nothing logged for a HEAD answered with the GET answer's length
        # (twisted.web logs a line for every HEAD whose resource returns a
        # body: anyone could fill the log).
        self.assertEqual([e for e in self.events if "HEAD" in e.get("log_format", "")], [])

        def lengths() -> tuple[str | None, int]:
            connection = http.client.HTTPConnection("127.0.0.1", self.gateway.api_port, timeout=10)
            try:
                connection.request("HEAD", "/healthz")
                head = connection.getresponse()
                head.read()
                connection.request("GET", "/healthz")
                return head.getheader("Content-Length"), len(connection.getresponse().read())
            finally:
                connection.close()

        declared, length = yield deferToThread(lengths)
        self.assertEqual(declared, str(length))

    @inlineCallbacks
    def test_role_of_every_type(self):
        for role in ([], {}, [1], {"a": 1}, 1, None, True, 1.5):
            body = json.dumps({"model": "x", "messages": [{"role": role, "content": "hi"}]}).encode()
            status, answer = yield deferToThread(
                self.request, "POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}"}
            )
            self.assertEqual(status, 400, (role, answer))
            self.assertOpenAIError(status, answer)
        self.assertEqual(high_levels(self.events), [])

    def test_request_space(self):
        """
        Whatever method, path, headers and JSON (of every type, in every
        field of a chat or embeddings request) a client sends, the answer is
        never a 5xx: a 4xx is in OpenAI's error shape, and nothing is
        logged above warn.  Runs in a thread against the real site on a
        port, the reactor serving it.
        """
        return deferToThread(self._request_space).addCallback(lambda _: self.assertEqual(high_levels(self.events), []))

    def _request_space(self) -> None:
        json_values = st.recursive(
            st.none()
            | st.booleans()
            | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=False)
            | st.text(max_size=12),
            lambda children: (
                st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
            ),
            max_leaves=8,
        )
        chat_fields = [
            "model",
            "messages",
            "stream",
            "stream_options",
            "temperature",
            "top_p",
            "max_tokens",
            "max_completion_tokens",
            "stop",
            "n",
            "tools",
            "tool_choice",
            "response_format",
            "reasoning_effort",
            "seed",
            "user",
            "logprobs",
            "parallel_tool_calls",
        ]
        message_fields = ["role", "content", "name", "tool_calls", "tool_call_id", "function_call", "refusal"]
        message = st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "function"]) | json_values},
            optional=dict.fromkeys(message_fields[1:], json_values),
        )
        chat = st.fixed_dictionaries(
            {"model": st.sampled_from(["kimi/moonshot-v1-8k", "gemini/x", "x"]) | json_values},
            optional={
                "messages": st.lists(message, max_size=3) | json_values,
                **dict.fromkeys(chat_fields[2:], json_values),
            },
        )
        embeddings = st.fixed_dictionaries(
            {"input": st.text(max_size=8) | json_values},
            optional={"model": json_values, "encoding_format": json_values, "dimensions": json_values},
        )
        paths = st.sampled_from(
            ["/v1/chat/completions", "/v1/embeddings", "/v1/models", "/v1", "/", "/v1/chat", "/x", "/v1/models/x"]
        )
        methods = st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "FOO"])
        auths = st.sampled_from([f"Bearer {KEY}", f"bearer {KEY}", "Bearer nope", "Basic x", ""])
        bodies = (
            chat.map(lambda d: json.dumps(d).encode())
            | embeddings.map(lambda d: json.dumps(d).encode())
            | json_values.map(lambda d: json.dumps(d).encode())
            | st.binary(max_size=40)
        )
        content_types = st.sampled_from(["application/json", "text/plain", "", "application/json; charset=utf-8"])

        @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(methods, paths, auths, content_types, bodies | st.none())
        def property(method: str, path: str, auth: str, content_type: str, body: bytes | None) -> None:
            headers = {}
            if auth:
                headers["Authorization"] = auth
            if content_type:
                headers["Content-Type"] = content_type
            status, answer = self.request(method, path, body, headers)
            if status < 400:
                return
            self.assertOpenAIError(status, answer, method)

        property()


class MetricsHostTests(TestCase):
    timeout = 20

    def scrape(self, port: int, headers: dict[str, str]) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", "/metrics", headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    @inlineCallbacks
    def test_rebinding_refused(self):
        gateway = start_gateway(self, api=True, gateway_api_keys=(KEY,))
        port = gateway.api_port
        for headers in (
            {"Host": f"rebind.example:{port}"},
            {"Host": "rebind.example"},
            {"Host": f"localhost.rebind.example:{port}"},
            {"Host": f"127.0.0.1:{port}", "Origin": "http://rebind.example"},
            {"Host": f"127.0.0.1:{port}", "Origin": "null"},
        ):
            status, body = yield deferToThread(self.scrape, port, headers)
            self.assertEqual(status, 403, (headers, body))
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", "LOCALHOST.", "[::1]:9"):
            status, body = yield deferToThread(self.scrape, port, {"Host": host})
            self.assertEqual(status, 200, (host, body[:100]))
            self.assertIn(b"openclaw_api_requests", body)

    @inlineCallbacks
    def test_allowed_hosts(self):
        gateway = start_gateway(self, api=True, gateway_api_keys=(KEY,), metrics_allowed_hosts=("gw.internal",))
        status, _ = yield deferToThread(self.scrape, gateway.api_port, {"Host": "gw.internal:9108"})
        self.assertEqual(status, 200)
        status, _ = yield deferToThread(self.scrape, gateway.api_port, {"Host": "gw.external:9108"})
        self.assertEqual(status, 403)
