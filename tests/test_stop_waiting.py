"""
A stop whose grace runs out while a consumer's request waits for the
cluster's admission (one round trip to Redis) answers it 503
C{shutting_down}, logged and counted once as such, as it answers a call
still under way (review s33: the client got nothing, no status line, and
the request was logged as 499 C{client gone}).  The large body worked on
in a thread is the other wait (L{tests.test_large_bodies}).

The gateway runs in this process with the stand-in upstream; the
cluster's counters are stood in for by L{Undecided}, whose admissions
the test decides once the stop has answered.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel

from tests.test_admission_gone import MODEL, Undecided
from tests.test_consumers import GatewayCase
from tests.test_dataplane import HELLO


def exchange(port: int, request: bytes) -> bytes:
    """
    Send C{request} to C{port} and read the answer until the gateway
    closes the connection (blocking: call it in a thread).
    """
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        while chunk := sock.recv(1 << 16):
            answer += chunk
    return answer


class StopDuringAdmissionTests(GatewayCase):
    @inlineCallbacks
    def stopped_while_admitting(self, request: bytes, path: str) -> Any:
        """
        Send C{request} with the key of a consumer C{c} (C{{key}} in it),
        stop the gateway (grace 0.5 s) while the cluster decides, then
        admit it once the stop has answered; check that answer (503
        C{shutting_down}) and the request's one log line; fire with the
        gateway.
        """
        gateway, client = yield self.gateway(shutdown_grace_seconds=0.5)
        created = yield self.command(gateway, client, "consumer_create", {"name": "c", "rpm": 100})
        table = gateway.service.consumers
        cluster = Undecided(table.counters)
        asked = cluster.asked
        self.patch(table, "counters", cluster)
        answer = deferToThread(exchange, gateway.api_port, request.replace(b"{key}", created["key"].encode()))
        for _ in range(200):
            if asked:
                break
            yield deferLater(reactor, 0.01)
        self.assertEqual(len(asked), 1)
        context = gateway.service.api_site.context
        stopped = gateway.service.stopService()
        answered = yield answer
        head, _, body = answered.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 503 "), head)
        error = json.loads(body)["error"]
        self.assertEqual(error["code"], "shutting_down")
        self.assertIn("retry it", error["message"])
        # The cluster admits it after all: no call is made, the request is
        # not counted again, the consumer is accounted with the 503.
        asked[0].callback(None)
        self.assertEqual((context.in_flight, context.chat_calls), (0, set()))
        yield stopped
        lines = [e for e in self.events if e.get("path") == path]
        self.assertEqual([(e["status"], e["outcome"], e["provider"]) for e in lines], [(503, "shutting_down", "-")])
        self.assertEqual(lines[0]["consumer"], "c")
        self.assertEqual(self.upstream.kimi.requests, 0)
        errors = [e for e in self.events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]
        self.assertEqual(errors, [])
        registry = gateway.service.metrics.registry
        self.assertEqual(
            registry.get_sample_value("openclaw_consumer_requests_total", {"consumer": "c", "status": "503"}), 1
        )
        self.assertIsNone(
            registry.get_sample_value("openclaw_consumer_requests_total", {"consumer": "c", "status": "499"})
        )
        return gateway

    def test_call(self) -> Any:
        body = json.dumps({"model": MODEL, "messages": HELLO}).encode()
        return self.stopped_while_admitting(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
            "/v1/chat/completions",
        )

    def test_listing(self) -> Any:
        return self.stopped_while_admitting(
            b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n", "/v1/models"
        )


class StopWhileProviderWaitedTests(GatewayCase):
    """
    An embeddings call, or a models listing, still waiting on its provider
    when a stop's grace runs out: answered 503 C{shutting_down}, logged and
    counted once as such, as a chat call is (review s33: it counted in
    flight but was not told, so it was just closed, no status line, and
    logged as 499 C{client gone}).
    """

    @inlineCallbacks
    def stopped_while_waiting(self, request: bytes, path: str, provider: str) -> Any:
        gateway, client = yield self.gateway(shutdown_grace_seconds=0.5, health_check_timeout=30.0)
        created = yield self.command(gateway, client, "consumer_create", {"name": "c", "rpm": 100})
        upstream = getattr(self.upstream, provider)
        upstream.mode = "hang"
        answer = deferToThread(exchange, gateway.api_port, request.replace(b"{key}", created["key"].encode()))
        for _ in range(200):
            if upstream.requests:
                break
            yield deferLater(reactor, 0.02)
        context = gateway.service.api_site.context
        self.assertEqual(upstream.requests, 1)
        self.assertEqual(len(context.chat_calls), 1)
        stopped = gateway.service.stopService()
        answered = yield answer
        head, _, body = answered.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 503 "), head)
        self.assertIn(b"retry-after: 1\r\n", head.lower() + b"\r\n")
        error = json.loads(body)["error"]
        self.assertEqual(error["code"], "shutting_down")
        yield stopped
        self.assertEqual((context.in_flight, context.chat_calls), (0, set()))
        lines = [e for e in self.events if e.get("path") == path]
        self.assertEqual(
            [(e["status"], e["outcome"], e["provider"], e["consumer"]) for e in lines],
            [(503, "shutting_down", provider, "c")],
        )
        errors = [e for e in self.events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]
        self.assertEqual(errors, [])
        registry = gateway.service.metrics.registry
        self.assertEqual(
            registry.get_sample_value("openclaw_consumer_requests_total", {"consumer": "c", "status": "503"}), 1
        )
        self.assertIsNone(
            registry.get_sample_value("openclaw_consumer_requests_total", {"consumer": "c", "status": "499"})
        )
        return gateway

    def test_embeddings(self) -> Any:
        body = json.dumps({"model": "gemini/gemini-embedding-001", "input": "hello"}).encode()
        return self.stopped_while_waiting(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
            "/v1/embeddings",
            "gemini",
        )

    def test_listing(self) -> Any:
        # The active provider's listing (the gateway's default: Gemini).
        return self.stopped_while_waiting(
            b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n",
            "/v1/models",
            "gemini",
        )
