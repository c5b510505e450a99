"""
A fuzz run over a real socket: random hostile frames against a running
gateway, which must answer each with a well-formed answer or a documented
close code, and then still serve a ping, with no connection left behind.
"""

from __future__ import annotations

import gc
from ipaddress import ip_network
from typing import Any

from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from openclaw.control.protocol import ControlProtocol
from tests.support import open_client, start_gateway
from tests.wsfuzz import fuzz


class FuzzTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_random_frames(self):
        errors: list[dict[str, Any]] = []
        observer = lambda e: errors.append(e) if "log_failure" in e else None  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        # Forged tokens are part of the fuzz: the lockout across connections
        # would refuse the fuzzer's handshakes, so loopback is exempt here.
        gateway = start_gateway(
            self, max_message_bytes=4096, max_auth_failures=1000, auth_lockout_exempt=(ip_network("127.0.0.1/32"),)
        )
        reports = yield gatherResults(
            [deferToThread(fuzz, "127.0.0.1", gateway.port, gateway.token, 50, seed) for seed in range(4)]
        )
        for report in reports:
            self.assertEqual(report.failures, [], report.summary())
        self.assertGreater(sum(r.frames_sent for r in reports), 1000)
        codes = set().union(*(r.close_codes for r in reports))
        self.assertTrue({1002, 1003, 1007, 1009} <= codes, [r.summary() for r in reports])
        self.assertEqual(errors, [])
        client = yield open_client(self, gateway.port)
        answer = yield client.command(gateway.token, "ping")
        self.assertTrue(answer["ok"])
        factory = gateway.service.factory
        self.assertEqual(len(factory.protocols), 1)
        # Nothing keeps the fuzzed connections alive once they are gone.
        gc.collect()
        alive = [o for o in gc.get_objects() if isinstance(o, ControlProtocol) and o.factory is factory]
        self.assertEqual(len(alive), 1)
        self.assertEqual(gateway.service.route.current.provider_id, "gemini")
