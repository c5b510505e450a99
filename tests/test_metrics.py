"""
L{RequestTally}: the plain-number counts behind the per-request metrics,
as Prometheus reads them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from twisted.trial.unittest import SynchronousTestCase

from openclaw.metrics import RequestTally


class RequestTallyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tally = RequestTally(
            ("demo_requests", "Requests, by provider and status"),
            ("demo_request_seconds", "Time taken, by provider"),
            providers=("kimi",),
            buckets=(0.01, 0.1, 1.0, float("inf")),
        )
        self.registry = CollectorRegistry()
        self.registry.register(self.tally)

    def exposition(self) -> list[str]:
        return generate_latest(self.registry).decode().splitlines()

    def test_exposition(self) -> None:
        for seconds in (0.005, 0.01, 0.05, 2.0):
            self.tally.record("kimi", 200, seconds)
        self.tally.record("kimi", "error", 0.5)
        self.tally.record("gemini", 401, 0.001)
        lines = self.exposition()
        for line in (
            "# TYPE demo_requests_total counter",
            'demo_requests_total{provider="kimi",status="200"} 4.0',
            'demo_requests_total{provider="kimi",status="error"} 1.0',
            'demo_requests_total{provider="gemini",status="401"} 1.0',
            "# TYPE demo_request_seconds histogram",
            # A bound is inclusive: 0.01 falls in le="0.01".
            'demo_request_seconds_bucket{le="0.01",provider="kimi"} 2.0',
            'demo_request_seconds_bucket{le="0.1",provider="kimi"} 3.0',
            'demo_request_seconds_bucket{le="1.0",provider="kimi"} 4.0',
            'demo_request_seconds_bucket{le="+Inf",provider="kimi"} 5.0',
            'demo_request_seconds_count{provider="kimi"} 5.0',
            'demo_request_seconds_sum{provider="kimi"} 2.565',
            'demo_request_seconds_bucket{le="0.01",provider="gemini"} 1.0',
        ):
            self.assertIn(line, lines)

    def test_known_provider_exported_before_any_request(self) -> None:
        self.assertIn('demo_request_seconds_count{provider="kimi"} 0.0', self.exposition())

    def test_statuses_bounded(self) -> None:
        for status in range(1000, 1300):
            self.tally.record("kimi", status, 0.001)
        # The first 256 series are kept; later statuses share "other".
        self.assertEqual(self.tally.count("kimi", 1255), 1)
        self.assertEqual(self.tally.count("kimi", 1256), 0)
        self.assertEqual(self.tally.count("kimi", "other"), 300 - 256)
        series = [line for line in self.exposition() if line.startswith("demo_requests_total")]
        self.assertEqual(len(series), 256 + 1)
