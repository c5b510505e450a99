"""
health_check as an operator sees it: over the control plane, against the
stand-in upstream, with the rest of the gateway still answering meanwhile.
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from openclaw.testing.upstream import StandInUpstream
from tests.support import open_client, start_gateway

KIMI_KEY = "sk-kimi-secret-0123456789"
GEMINI_KEY = "AIza-gemini-secret-0123456789"


class HealthCheckTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.upstream = StandInUpstream(reactor)
        self.upstream.kimi.key = KIMI_KEY
        self.upstream.gemini.key = GEMINI_KEY
        self.upstream.listen(0, "127.0.0.1")
        self.addCleanup(self.upstream.stop)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def gateway(self, **settings: Any) -> Any:
        return start_gateway(self, **{**self.upstream.settings_fields(), **settings})

    @inlineCallbacks
    def test_healthy(self):
        gateway = self.gateway()
        client = yield open_client(self, gateway.port)
        answer = yield client.command(gateway.token, "health_check")
        self.assertTrue(answer["ok"], answer)
        result = answer["result"]
        self.assertEqual(result["active"], "gemini")
        self.assertEqual(set(result["providers"]), {"kimi", "gemini"})
        for entry in result["providers"].values():
            self.assertIs(entry["ok"], True)
            self.assertEqual(entry["status"], 200)
            self.assertGreater(entry["models"], 0)
            self.assertNotIn("error", entry)
        self.assertEqual((self.upstream.kimi.requests, self.upstream.gemini.requests), (1, 1))
        everything = json.dumps(answer) + repr(self.events)
        self.assertNotIn(KIMI_KEY, everything)
        self.assertNotIn(GEMINI_KEY, everything)
        audited = [e for e in self.events if e.get("cmd") == "health_check" and "duration_ms" in e]
        self.assertEqual(len(audited), 1)
        self.assertEqual(audited[0]["outcome"], "ok")

    @inlineCallbacks
    def test_missing_key_makes_no_request(self):
        gateway = self.gateway(kimi_api_key=None)
        client = yield open_client(self, gateway.port)
        answer = yield client.command(gateway.token, "health_check")
        kimi = answer["result"]["providers"]["kimi"]
        self.assertEqual(kimi["ok"], False)
        self.assertEqual(kimi["error"], "KIMI_API_KEY is not set")
        self.assertEqual(self.upstream.kimi.requests, 0)
        switched = yield client.command(gateway.token, "switch_provider", {"provider": "kimi"})
        self.assertEqual(switched["result"]["warning"], "KIMI_API_KEY is not set")
        self.assertEqual(switched["result"]["active"], "kimi")

    @inlineCallbacks
    def test_hung_providers_bounded_and_concurrent(self):
        """
        Two providers that never answer, 1.5 s timeout: the answer comes
        after about 1.5 s (not 3 s), and a ping on another connection is
        answered at once meanwhile.
        """
        self.upstream.kimi.mode = "hang"
        self.upstream.gemini.mode = "stall"
        gateway = self.gateway(health_check_timeout=1.5)
        checker = yield open_client(self, gateway.port)
        bystander = yield open_client(self, gateway.port)
        started = time.monotonic()
        pending = checker.command(gateway.token, "health_check")
        pong = yield bystander.command(gateway.token, "ping")
        ping_took = time.monotonic() - started
        self.assertTrue(pong["ok"])
        self.assertFalse(pending.called)
        self.assertLess(ping_took, 0.5)
        answer = yield pending
        took = time.monotonic() - started
        self.assertGreaterEqual(took, 1.4)
        self.assertLess(took, 2.5)
        for entry in answer["result"]["providers"].values():
            self.assertIs(entry["ok"], False)
            self.assertIn("timed out after 1.5 s", entry["error"])

    @inlineCallbacks
    def test_hundred_concurrent_checks_share_one_probe(self):
        """
        100 health_check commands at once, from 10 connections, cause one
        upstream request per provider.
        """
        self.upstream.kimi.delay = self.upstream.gemini.delay = 0.05
        gateway = self.gateway()
        clients = yield gatherResults([open_client(self, gateway.port) for _ in range(10)])
        for client in clients:
            for _ in range(10):
                client.send({"token": gateway.token, "cmd": "health_check"})
        answers = yield gatherResults([client.received.get() for client in clients for _ in range(10)])
        self.assertEqual(len(answers), 100)
        self.assertTrue(all(a["ok"] and a["result"]["providers"]["kimi"]["ok"] for a in answers))
        self.assertEqual((self.upstream.kimi.requests, self.upstream.gemini.requests), (1, 1))
