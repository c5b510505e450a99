"""
A consumer's call (or models listing) the cluster's admission refuses
after its client has gone: counted once, as the refusal (a limited usage
row, C{openclaw_consumer_limited_total}, the refusal's status), and not
also as a 499 of a request that never happened.

The gateway runs in this process with the stand-in upstream; the one
stand-in is the cluster's counters (Redis): their C{admit} answers with a
Deferred the test fires once the client is gone.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from openclaw.consumers.table import rate_limited
from openclaw.dataplane.errors import APIError
from tests.test_consumers import GatewayCase
from tests.test_dataplane import HELLO

MODEL = "kimi/kimi-k2"


class Undecided:
    """
    The cluster's counters, whose admissions wait for the test: each
    C{admit} returns a Deferred (in L{asked}); the rest is the counters'.
    """

    def __init__(self, counters: Any) -> None:
        self.counters = counters
        self.asked: list[Deferred[APIError | None]] = []

    def admit(self, *args: Any, **kwargs: Any) -> Deferred[APIError | None]:
        decision: Deferred[APIError | None] = Deferred()
        self.asked.append(decision)
        return decision

    def __getattr__(self, name: str) -> Any:
        return getattr(self.counters, name)


class RefusedAfterClientLeftTests(GatewayCase):
    @inlineCallbacks
    def refused_once_gone(self, gateway: Any, request: bytes) -> Any:
        """
        Send C{request}, close the connection while the (stand-in)
        cluster decides, then refuse it (429).
        """
        table = gateway.service.consumers
        cluster = Undecided(table.counters)
        asked = cluster.asked
        self.patch(table, "counters", cluster)
        sock = socket.create_connection(("127.0.0.1", gateway.api_port))
        sock.sendall(request)
        for _ in range(200):
            if asked:
                break
            yield deferLater(reactor, 0.01)
        self.assertEqual(len(asked), 1)
        sock.close()
        site = gateway.service.api_site
        for _ in range(200):
            if not len(site.connections):
                break
            yield deferLater(reactor, 0.01)
        self.assertEqual(len(site.connections), 0)
        asked[0].callback(rate_limited("c", "rpm", 100, 30))
        self.assertEqual(site.context.in_flight, 0)

    @inlineCallbacks
    def metrics(self, gateway: Any) -> Any:
        """
        The samples of the API's and the consumers' request counters.
        """
        response = yield deferToThread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{gateway.api_port}/metrics").read()
        )
        return [
            line
            for line in response.decode().splitlines()
            if line.startswith(("openclaw_api_requests_total", "openclaw_consumer_"))
            and not line.startswith("openclaw_consumer_usage_rows_pending")
            and "_created{" not in line
        ]

    @inlineCallbacks
    def test_call(self) -> Any:
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "c", "rpm": 100})
        body = json.dumps({"model": MODEL, "messages": HELLO}).encode()
        request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {created['key']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        yield self.refused_once_gone(gateway, request)
        yield gateway.service.consumers.flush()
        usage = yield self.command(gateway, client, "usage", {"name": "c", "group_by": "model"})
        [group] = usage["groups"]
        self.assertEqual((group["model"], group["requests"], group["limited"]), (MODEL, 0, 1))
        samples = yield self.metrics(gateway)
        self.assertEqual(
            sorted(samples),
            [
                'openclaw_api_requests_total{provider="-",status="429"} 1.0',
                'openclaw_consumer_limited_total{consumer="c",reason="rate_limit_exceeded"} 1.0',
                'openclaw_consumer_requests_total{consumer="c",status="429"} 1.0',
            ],
        )
        self.assertEqual(self.upstream.kimi.requests, 0)

    @inlineCallbacks
    def test_listing(self) -> Any:
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "c", "rpm": 100})
        request = (
            f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {created['key']}\r\n\r\n"
        ).encode()
        yield self.refused_once_gone(gateway, request)
        samples = yield self.metrics(gateway)
        self.assertEqual(
            sorted(samples),
            [
                'openclaw_api_requests_total{provider="-",status="429"} 1.0',
                'openclaw_consumer_limited_total{consumer="c",reason="rate_limit_exceeded"} 1.0',
                'openclaw_consumer_requests_total{consumer="c",status="429"} 1.0',
            ],
        )
