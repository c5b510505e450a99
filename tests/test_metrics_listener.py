"""
C{/metrics}, on the API and on a listener of its own (C{--metrics-listen}):
methods other than GET and HEAD are answered 405 in plain text, and a
scrape is logged at debug (a refused request at info), not as an access
line; on both listeners a request with more than one C{Host} field is
answered 400 (RFC 9112 section 3.2).  Raw HTTP against a gateway in this
process.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase

from tests.support import capture_log_events, exchange, start_gateway, start_metrics_listener

KEY = "gw-key-0123456789abcdef"


class MetricsListenerTests(TestCase):
    """
    C{/metrics} methods, and two C{Host} fields, on the API and on the
    metrics listener.
    """

    timeout = 30

    def metrics_listener(self) -> tuple[Any, int]:
        """
        A gateway with C{/metrics} on a listener of its own
        (C{--metrics-listen}), and that listener's port.
        """
        gateway = start_gateway(self, api=True, gateway_api_keys=(KEY,))
        return gateway, start_metrics_listener(self, gateway.service.settings)

    @inlineCallbacks
    def test_metrics_unknown_methods(self):
        gateway, metrics_port = self.metrics_listener()
        for port, path in ((gateway.api_port, b"/metrics"), (metrics_port, b"/metrics")):
            for method in (b"DELETE", b"PATCH", b"POST", b"PUT", b"BREW"):
                answer = yield deferToThread(
                    exchange, port, method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                )
                head, _, body = answer.partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 405 "), (method, answer[:200]))
                self.assertIn(b"\r\nAllow: GET, HEAD", head)
                self.assertIn(b"text/plain", head)
                self.assertNotIn(b"<html", body.lower())
            for method in (b"GET", b"HEAD"):
                answer = yield deferToThread(
                    exchange, port, method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                )
                self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), (method, answer[:200]))

    @inlineCallbacks
    def test_metrics_listener_logs_scrapes_at_debug(self):
        """
        A scrape of the metrics listener is a structured event at debug
        (like a successful API call), not twisted.web's access line at
        info every scrape interval; a refused request is logged at info.
        """
        from twisted.logger import globalLogPublisher

        gateway, metrics_port = self.metrics_listener()
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for method in (b"GET", b"POST"):
            yield deferToThread(
                exchange,
                metrics_port,
                method + b" /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            )
        scrapes = [e for e in events if e.get("path") == "/metrics" and "status" in e]
        self.assertEqual(
            [(e["method"], e["status"], e["log_level"], e["peer"]) for e in scrapes],
            [("GET", 200, LogLevel.debug, "127.0.0.1"), ("POST", 405, LogLevel.info, "127.0.0.1")],
        )
        access_lines = [e for e in events if e.get("log_namespace") == "twisted.python.log" and "/metrics" in str(e)]
        self.assertEqual(access_lines, [])
        # A long path is logged clipped (up to twisted.web's 16 KB line).
        yield deferToThread(
            exchange,
            metrics_port,
            b"GET /metrics/" + b"a" * 12000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        )
        (long,) = [e for e in events if str(e.get("path", "")).startswith("/metrics/a")]
        self.assertEqual(long["path"], "/metrics/" + "a" * 247 + "...(12009 characters)")

    @inlineCallbacks
    def test_two_host_fields(self):
        """
        RFC 9112 section 3.2: a request with more than one Host field is
        answered 400, on the API and on the metrics listener, whatever
        the path (twisted.web served it under the last one).
        """
        gateway, metrics_port = self.metrics_listener()
        twice = b"Host: 127.0.0.1\r\nHost: rebind.example\r\n"
        cases = [
            (gateway.api_port, b"GET /metrics HTTP/1.1\r\n" + twice + b"\r\n"),
            (gateway.api_port, b"GET /healthz HTTP/1.1\r\n" + twice + b"\r\n"),
            (
                gateway.api_port,
                b"POST /v1/chat/completions HTTP/1.1\r\n"
                + twice
                + f"Authorization: Bearer {KEY}\r\nContent-Length: 2\r\n\r\n{{}}".encode(),
            ),
            (metrics_port, b"GET /metrics HTTP/1.1\r\n" + twice + b"\r\n"),
        ]
        for port, request in cases:
            answer = yield deferToThread(exchange, port, request)
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), (request, answer[:200]))
            self.assertIn(b"Host", answer.partition(b"\r\n\r\n")[2])
        api_answer = yield deferToThread(exchange, gateway.api_port, cases[1][1])
        self.assertEqual(json.loads(api_answer.partition(b"\r\n\r\n")[2])["error"]["code"], "invalid_host")


class AbsoluteFormTests(TestCase):
    """
    RFC 9112 section 3.2.2: a server must accept a request target in
    absolute-form (C{GET http://host:port/path HTTP/1.1}), and take its
    authority as the request's host, whatever the C{Host} field says.
    twisted.web took the whole URL for the path: 404 on the API, and the
    metrics listener judged the C{Host} field.
    """

    timeout = 30

    @inlineCallbacks
    def test_api_and_metrics_listener(self):
        gateway = start_gateway(self, api=True, gateway_api_keys=(KEY,))
        metrics_port = start_metrics_listener(self, gateway.service.settings)
        api = f"127.0.0.1:{gateway.api_port}".encode()
        for target in (b"http://" + api + b"/healthz", b"HTTP://" + api + b"/healthz?verbose=1"):
            answer = yield deferToThread(
                exchange,
                gateway.api_port,
                b"GET " + target + b" HTTP/1.1\r\nHost: " + api + b"\r\nConnection: close\r\n\r\n",
            )
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), (target, answer[:300]))
        answer = yield deferToThread(
            exchange,
            gateway.api_port,
            b"GET http://"
            + api
            + b"/v1/models HTTP/1.1\r\nHost: "
            + api
            + b"\r\n"
            + f"Authorization: Bearer {KEY}\r\nConnection: close\r\n\r\n".encode(),
        )
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertNotIn(b" 404 ", head.split(b"\r\n")[0], body[:300])
        self.assertNotIn(b"not_found", body)
        # The authority is the host the metrics listener judges, not Host.
        metrics = f"127.0.0.1:{metrics_port}".encode()
        for authority, host, status in (
            (metrics, b"rebind.example", b" 200 "),
            (b"rebind.example", metrics, b" 403 "),
        ):
            answer = yield deferToThread(
                exchange,
                metrics_port,
                b"GET http://" + authority + b"/metrics HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n",
            )
            self.assertIn(status, answer.split(b"\r\n")[0], (authority, answer[:300]))
        # A target that is a URL but names no host and optional port, or is
        # not a URL at all: 400, never echoed nor logged (it may carry a
        # password), no traceback (review s19: urlsplit's ValueError went
        # unhandled, the client got no answer).
        events = capture_log_events(self)
        for target in (
            b"http://[::1/healthz",
            b"http://[::g]/",
            b"http://a]b/",
            b"http://alice:s3cret@127.0.0.1/v1/models",
            b"http:///healthz",
            # Re-check s19: another scheme, an escape that is not one, an
            # empty host (RFC 9110 section 4.2.1).
            b"ftp://alice:s3cret@127.0.0.1/",
            b"http://h%zz/healthz",
            b"http://:80/healthz",
            # The asterisk-form is for OPTIONS only (RFC 9112 section 3.2.4).
            b"*",
        ):
            for port in (gateway.api_port, metrics_port):
                answer = yield deferToThread(
                    exchange,
                    port,
                    b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                )
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), (target, port, answer[:300]))
                self.assertNotIn(target, answer)
                self.assertNotIn(b"s3cret", answer)
            answer = yield deferToThread(
                exchange, gateway.api_port, b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            )
            error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
            self.assertEqual(error["code"], "invalid_request_target")
        for port in (gateway.api_port, metrics_port):
            answer = yield deferToThread(
                exchange, port, b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:300])
        # Nor when the request is refused for its missing Host first.
        answer = yield deferToThread(
            exchange, gateway.api_port, b"GET http://alice:s3cret@127.0.0.1/healthz HTTP/1.1\r\n\r\n"
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:300])
        self.assertNotIn("s3cret", repr(events))
        # An HTTP/1.1 request still needs a Host field (section 3.2).
        answer = yield deferToThread(
            exchange, gateway.api_port, b"GET http://" + api + b"/healthz HTTP/1.1\r\nConnection: close\r\n\r\n"
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:300])


class InvalidHostTests(TestCase):
    """
    RFC 9112 section 3.2: a request whose C{Host} is not a host and
    optional port is answered 400, on the API (OpenAI's shape,
    C{invalid_host}) and on the metrics listener (plain text); the
    metrics listener used to take C{127.0.0.1:abc} for 127.0.0.1.
    """

    timeout = 30

    @inlineCallbacks
    def test_invalid_host_values(self):
        gateway = start_gateway(self, api=True, gateway_api_keys=(KEY,))
        metrics_port = start_metrics_listener(self, gateway.service.settings)
        for host in (b"127.0.0.1:abc", b"user@127.0.0.1", b"exa mple", b"[::1", b"127.0.0.1:80:80"):
            for port, path in ((gateway.api_port, b"/healthz"), (metrics_port, b"/metrics")):
                answer = yield deferToThread(
                    exchange, port, b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
                )
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), (host, port, answer[:300]))
                self.assertIn(b"Host header field is not a host", answer)
            answer = yield deferToThread(
                exchange,
                gateway.api_port,
                b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n",
            )
            self.assertEqual(json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"], "invalid_host")
        for host in (b"127.0.0.1", b"127.0.0.1:8080", b"[::1]:80", b"LOCALHOST.", b"localhost:"):
            answer = yield deferToThread(
                exchange, metrics_port, b"GET /metrics HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
            )
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), (host, answer[:300]))
