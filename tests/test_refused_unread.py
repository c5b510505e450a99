"""
A consumer its limits refuse whatever it asks (its C{rpm} or C{tpm}
window full, its budget spent) is refused before its large chat body
(past L{OFFLOAD_BYTES}) is read: it is not worked on in the body workers' threads
(hostile trial s33: 150 bodies of 8 MB from a consumer with an C{rpm} of
1 were each parsed, 6.9 to 26 s each, before its admission refused 149 of
them, and C{/healthz} waited up to 1.25 s meanwhile).  The refusal is the
admission's 429 (status, headers, body), logged and counted once.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from openclaw.consumers.model import Consumer
from openclaw.consumers.shared import SharedCounters
from openclaw.consumers.store import UsageRow
from openclaw.consumers.table import LocalCounters
from openclaw.dataplane.offload import OFFLOAD_BYTES
from tests.test_consumers import GatewayCase
from tests.test_dataplane import HELLO
from tests.test_large_bodies import CountedWorkers, tool_loop


def post(port: int, path: bytes, key: str, body: bytes) -> tuple[int, dict[str, str], Any]:
    """
    POST C{body} to C{path} with C{key} (blocking: call it in a thread);
    the status, the headers (lower-case names) and the JSON answer.
    """
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            "POST", path.decode(), body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        )
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(response.read())
    finally:
        connection.close()


class RefusedUnreadTests(GatewayCase):
    @inlineCallbacks
    def limited(self, fields: dict[str, Any]) -> Any:
        """
        A gateway, a consumer C{c} with C{fields} whose first call is
        admitted (a short one: its body read first, and refused
        after it, as before), counted body workers and the limited usage
        rows recorded (those only); fire with C{(gateway, key, workers, rows)}.
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "c", **fields})
        context = gateway.service.api_site.context
        context.bodies = workers = CountedWorkers.of(reactor)
        self.addCleanup(workers.stop)
        table = gateway.service.consumers
        rows: list[UsageRow] = []
        add = table._add

        def recorded(row: UsageRow) -> None:
            if row.limited:
                rows.append(row)
            add(row)

        self.patch(table, "_add", recorded)
        status, _, _ = yield deferToThread(
            post,
            gateway.api_port,
            b"/v1/chat/completions",
            created["key"],
            json.dumps({"model": "kimi/moonshot-v1-8k", "messages": HELLO}).encode(),
        )
        self.assertEqual(status, 200)
        return gateway, created["key"], workers, rows

    @inlineCallbacks
    def test_rpm_large_bodies_not_worked_on(self) -> Any:
        """
        Past its C{rpm}, a consumer's large bodies get the admission's 429
        (C{Retry-After}, OpenAI's shape) and none is worked on; each is
        logged and counted once, as limited (a usage row with provider and
        model C{-}: none was read).
        """
        gateway, key, workers, rows = yield self.limited({"rpm": 1})
        body = json.dumps(tool_loop(3000, model="kimi/moonshot-v1-8k")).encode()
        self.assertGreater(len(body), OFFLOAD_BYTES)
        before = len(self.events)
        for _ in range(3):
            status, headers, answer = yield deferToThread(post, gateway.api_port, b"/v1/chat/completions", key, body)
            self.assertEqual(status, 429)
            self.assertTrue(1 <= int(headers["retry-after"]) <= 60)
            self.assertEqual(
                (answer["error"]["code"], answer["error"]["type"]), ("rate_limit_exceeded", "requests"), answer
            )
            self.assertIn("over its rpm limit of 1", answer["error"]["message"])
        self.assertEqual(workers.runs, 0)
        self.assertEqual(self.upstream.kimi.requests, 1)
        lines = [e for e in self.events[before:] if e.get("path") == "/v1/chat/completions"]
        self.assertEqual(
            [(e["status"], e["outcome"], e["provider"], e["consumer"]) for e in lines],
            [(429, "rate_limit_exceeded", "-", "c")] * 3,
        )
        self.assertEqual([(r.status, r.limited, r.provider, r.model) for r in rows], [(429, True, "-", "-")] * 3)
        registry = gateway.service.metrics.registry
        self.assertEqual(
            registry.get_sample_value(
                "openclaw_consumer_limited_total", {"consumer": "c", "reason": "rate_limit_exceeded"}
            ),
            3,
        )
        self.assertEqual(
            registry.get_sample_value("openclaw_consumer_requests_total", {"consumer": "c", "status": "429"}), 3
        )
        # A short body is read, and refused by the admission, with its model.
        small = json.dumps({"model": "kimi/moonshot-v1-8k", "messages": HELLO}).encode()
        status, _, _ = yield deferToThread(post, gateway.api_port, b"/v1/chat/completions", key, small)
        self.assertEqual(status, 429)
        self.assertEqual((rows[-1].provider, rows[-1].model), ("kimi", "moonshot-v1-8k"))

    @inlineCallbacks
    def test_budget_spent(self) -> Any:
        """
        A consumer whose budget is spent gets 429 C{insufficient_quota}
        (with C{x-should-retry: false}) for a large body, not worked on.
        """
        gateway, key, workers, rows = yield self.limited({"budget_usd": 0.000001, "budget_period": "day"})
        body = json.dumps(tool_loop(3000, model="kimi/moonshot-v1-8k")).encode()
        status, headers, answer = yield deferToThread(post, gateway.api_port, b"/v1/chat/completions", key, body)
        self.assertEqual((status, answer["error"]["code"]), (429, "insufficient_quota"))
        self.assertEqual(headers["x-should-retry"], "false")
        self.assertIn("budget of 0.000001 USD per UTC day", answer["error"]["message"])
        self.assertEqual(workers.runs, 0)
        self.assertEqual([(r.status, r.limited) for r in rows], [(429, True)])

    @inlineCallbacks
    def test_admitted_consumer_body_worked_on(self) -> Any:
        """
        A consumer its limits still admit has its large body worked on and
        called as before (nothing counted twice by the check).
        """
        gateway, key, workers, rows = yield self.limited({"rpm": 3})
        body = json.dumps(tool_loop(3000, model="kimi/moonshot-v1-8k")).encode()
        status, headers, _ = yield deferToThread(post, gateway.api_port, b"/v1/chat/completions", key, body)
        self.assertEqual(status, 200)
        self.assertEqual(headers["x-ratelimit-remaining-requests"], "1")
        self.assertEqual(workers.runs, 1)
        self.assertEqual(rows, [])


CONSUMER = Consumer(name="c", rpm=1, tpm=None, budget_usd=None)


class CountersRefusalTests(TestCase):
    def test_local_refusal_is_the_admissions(self) -> None:
        """
        L{LocalCounters.refusal} is the 429 L{LocalCounters.admit} answers,
        and counts nothing.
        """
        counters = LocalCounters()
        self.assertIsNone(counters.refusal(CONSUMER, 1000.0))
        self.assertIsNone(counters.admit(CONSUMER, 1000.0))
        refusal = counters.refusal(CONSUMER, 1010.0)
        admitted = counters.admit(CONSUMER, 1010.0)
        assert refusal is not None and admitted is not None
        self.assertEqual((refusal.body(), refusal.headers), (admitted.body(), admitted.headers))
        self.assertEqual((refusal.status, refusal.retry_after), (429, 50))
        self.assertEqual(counters.requests["c"].used(1010.0), 1)
        self.assertIsNone(counters.refusal(CONSUMER, 1060.5))

    def test_cluster_refusal(self) -> None:
        """
        In a cluster, with Redis, only a budget spent is refused before the
        body (the rpm window here holds this instance's calls only); with
        Redis away, this instance's own refusal (as its admission then).
        """
        counters = SharedCounters(redis=None, reactor=Clock(), timeout=1.0)  # type: ignore[arg-type]
        counters.local.admitted(CONSUMER, 1000.0)
        counters.up = True
        self.assertIsNone(counters.refusal(CONSUMER, 1010.0))
        counters.up = False
        refused = counters.refusal(CONSUMER, 1010.0)
        assert refused is not None
        self.assertEqual(refused.code, "rate_limit_exceeded")
        budget = Consumer(name="b", budget_usd=1.0, budget_period="day")
        counters.up = True
        self.assertIsNone(counters.refusal(budget, 1010.0))
        counters.local.counted("b", 10, 1.5, 1010.0)
        spent = counters.refusal(budget, 1010.0)
        assert spent is not None
        self.assertEqual((spent.status, spent.code), (429, "insufficient_quota"))
