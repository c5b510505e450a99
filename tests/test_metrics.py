"""
The metrics as Prometheus reads them: L{RequestTally}'s counter and
histogram, the control-plane command counters, L{MeasuredAgent}.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import treq
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from openclaw.metrics import (
    API_REFUSALS,
    CONTROL_REFUSALS,
    ConsumerMetrics,
    GatewayMetrics,
    MeasuredAgent,
    RequestTally,
)
from openclaw.providers.breaker import CircuitBreaker
from openclaw.routing import FALLBACK_REASONS

#: Every reason a call is failed over for (openclaw.dataplane.call): its
#: own list, so that one left out of FALLBACK_REASONS fails here.
RECORDED_REASONS = (
    "http_5xx",
    "timeout",
    "connect",
    "broken",
    "rate_limited",
    "auth",
    "account",
    "no_key",
    "breaker_open",
)


class RequestTallyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = CollectorRegistry()
        self.tally = RequestTally(
            ("demo_requests", "Requests, by provider and status"),
            ("demo_request_seconds", "Time taken, by provider"),
            providers=("kimi",),
            buckets=(0.01, 0.1, 1.0, float("inf")),
            registry=self.registry,
        )

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


class GatewayMetricsTests(SynchronousTestCase):
    """
    What C{/metrics} shows of the gateway's own families: their names,
    help texts, labels and bounds, and the series there from the start.
    """

    def test_recorded_call_exported(self) -> None:
        metrics = GatewayMetrics(("status",), ("kimi", "gemini"))
        metrics.api_requests.record("kimi", 200, 0.2)
        metrics.upstream_requests.record("kimi", 200, 0.15)
        metrics.call_costs.count_tokens("kimi", "moonshot-v1-8k", 10, 5, 0)
        metrics.call_costs.overhead(0.0003)
        metrics.command("status", "ok")
        lines = generate_latest(metrics.registry).decode().splitlines()
        for line in (
            "# HELP openclaw_api_requests_total "
            "Data-plane API requests answered, by the provider called (- if none was) and status",
            "# TYPE openclaw_api_requests_total counter",
            'openclaw_api_requests_total{provider="kimi",status="200"} 1.0',
            "# HELP openclaw_api_request_seconds Time to answer data-plane API requests, by the provider called",
            "# TYPE openclaw_api_request_seconds histogram",
            'openclaw_api_request_seconds_bucket{le="0.1",provider="kimi"} 0.0',
            'openclaw_api_request_seconds_bucket{le="0.25",provider="kimi"} 1.0',
            'openclaw_api_request_seconds_bucket{le="+Inf",provider="kimi"} 1.0',
            'openclaw_api_request_seconds_count{provider="kimi"} 1.0',
            'openclaw_api_request_seconds_sum{provider="kimi"} 0.2',
            "# HELP openclaw_upstream_requests_total HTTP requests to providers, by provider and status",
            'openclaw_upstream_requests_total{provider="kimi",status="200"} 1.0',
            'openclaw_upstream_request_seconds_sum{provider="kimi"} 0.15',
            "# HELP openclaw_control_commands_total Control-plane messages answered, by command and outcome",
            'openclaw_control_commands_total{cmd="status",outcome="ok"} 1.0',
            'openclaw_api_tokens_total{kind="prompt",model="moonshot-v1-8k",provider="kimi"} 10.0',
            'openclaw_api_tokens_total{kind="completion",model="moonshot-v1-8k",provider="kimi"} 5.0',
            "# TYPE openclaw_api_overhead_seconds histogram",
            'openclaw_api_overhead_seconds_bucket{le="0.00025"} 0.0',
            'openclaw_api_overhead_seconds_bucket{le="0.0005"} 1.0',
            "openclaw_api_overhead_seconds_count 1.0",
            # There from the start: every provider's upstream timing, and
            # every command's counters (INVALID's too).
            'openclaw_upstream_request_seconds_count{provider="gemini"} 0.0',
            'openclaw_upstream_request_seconds_bucket{le="+Inf",provider="gemini"} 0.0',
            'openclaw_control_commands_total{cmd="status",outcome="error"} 0.0',
            'openclaw_control_commands_total{cmd="_invalid",outcome="ok"} 0.0',
            'openclaw_control_commands_total{cmd="_invalid",outcome="error"} 0.0',
        ):
            self.assertIn(line, lines)
        # A kind of token never counted has no series; nor has a provider
        # the API never called.
        self.assertNotIn("reasoning", "\n".join(line for line in lines if line.startswith("openclaw_api_tokens")))
        self.assertFalse([line for line in lines if line.startswith("openclaw_api_request") and "gemini" in line])

    def test_readers_given_at_construction(self) -> None:
        """
        The gauges read what the constructor was given, when scraped (not
        when built: the gateway's readers name objects built later); a
        provider without a key has no C{openclaw_provider_up}; without
        C{breaker} or C{cluster}, their families are not registered.
        """
        readings = {"control": 0, "api": 0}
        breakers = {"kimi": CircuitBreaker(lambda: 0.0, threshold=1), "gemini": CircuitBreaker(lambda: 0.0)}
        metrics = GatewayMetrics(
            ("status",),
            ("kimi", "gemini"),
            unconfigured=("gemini",),
            serving=lambda provider: provider == "kimi",
            control_connections=lambda: readings["control"],
            api_connections=lambda: readings["api"],
            breaker=breakers.__getitem__,
            cluster=True,
        )
        readings.update(control=3, api=7)
        breakers["kimi"].failed()
        assert metrics.cluster_store_up is not None and metrics.count_fallback is not None
        metrics.cluster_store_up.set(1)
        metrics.count_fallback("kimi", "gemini", FALLBACK_REASONS[0])
        lines = generate_latest(metrics.registry).decode().splitlines()
        for line in (
            "openclaw_control_connections 3.0",
            "openclaw_api_connections 7.0",
            'openclaw_provider_up{provider="kimi"} 1.0',
            'openclaw_provider_breaker_open{provider="kimi"} 1.0',
            'openclaw_provider_breaker_open{provider="gemini"} 0.0',
            'openclaw_provider_breaker_state{provider="gemini",state="closed"} 1.0',
            "openclaw_cluster_store_up 1.0",
            f'openclaw_api_fallbacks_total{{from="kimi",reason="{FALLBACK_REASONS[0]}",to="gemini"}} 1.0',
        ):
            self.assertIn(line, lines)
        self.assertFalse([line for line in lines if line.startswith("openclaw_provider_up") and "gemini" in line])
        bare = generate_latest(GatewayMetrics(("status",), ("kimi",)).registry).decode()
        for absent in ("openclaw_provider_up{", "openclaw_provider_breaker", "openclaw_api_fallbacks", "cluster"):
            self.assertNotIn(absent, bare)
        self.assertIn("openclaw_control_connections 0.0", bare)


class RefusedConnectionsTests(SynchronousTestCase):
    """
    Every reason a connection is refused for has its series from the
    start, at 0: a first refusal is an increase that C{rate()} and an
    alert see, not a series appearing.
    """

    def test_every_reason_exported_at_zero(self) -> None:
        registry = GatewayMetrics(("status",), ("kimi",)).registry
        for reason in CONTROL_REFUSALS:
            value = registry.get_sample_value("openclaw_control_refused_connections_total", {"reason": reason})
            self.assertEqual(value, 0.0, reason)
        for reason in API_REFUSALS:
            value = registry.get_sample_value("openclaw_api_refused_connections_total", {"reason": reason})
            self.assertEqual(value, 0.0, reason)

    def test_counted_under_its_reason(self) -> None:
        metrics = GatewayMetrics(("status",), ("kimi",))
        metrics.refused_connection("tls_error")
        metrics.refused_api_connection("api_keyless_share")
        metrics.refused_api_connection("api_keyless_share")
        registry = metrics.registry
        self.assertEqual(
            registry.get_sample_value("openclaw_control_refused_connections_total", {"reason": "tls_error"}), 1.0
        )
        self.assertEqual(
            registry.get_sample_value("openclaw_api_refused_connections_total", {"reason": "api_keyless_share"}), 2.0
        )

    def test_readme_names_every_family(self) -> None:
        """
        The README's table of metric families names every family the
        gateway exports (README trial s43: five were described in words
        only), as a scrape shows it (a counter's with C{_total}).
        """
        metrics = GatewayMetrics(["ping"], ["kimi"], breaker=lambda provider: CircuitBreaker(lambda: 0.0), cluster=True)
        ConsumerMetrics(metrics.registry)
        readme = (Path(__file__).resolve().parent.parent / "README.rst").read_text()
        table = readme[readme.index("Every family, by name") : readme.index("What each chat call costs:")]
        families = list(metrics.registry.collect())
        self.assertGreater(len(families), 20)
        for family in families:
            name = family.name + ("_total" if family.type == "counter" else "")
            self.assertIn(f"``{name}``", table)

    def test_readme_lists_every_api_reason(self) -> None:
        readme = (Path(__file__).resolve().parent.parent / "README.rst").read_text()
        for reason in API_REFUSALS:
            self.assertIn(f"``{reason}``", readme)


class MeasuredAgentTests(TestCase):
    """
    L{MeasuredAgent} around a real agent, counting what it sends to a
    small twisted.web server on loopback.
    """

    @inlineCallbacks
    def test_counts_under_its_provider(self) -> Generator[Deferred[object], object, None]:
        """
        Every request is counted under the agent's provider, by status
        (C{"error"} for one that failed: the connection closed before any
        answer), whatever its URL.
        """

        class Upstream(Resource):
            isLeaf = True

            def render(self, request: Request) -> bytes | int:
                if request.path == b"/refuse":
                    request.loseConnection()
                    return NOT_DONE_YET
                if request.path == b"/busy":
                    request.setResponseCode(429)
                return b"{}"

        port = reactor.listenTCP(0, Site(Upstream()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = b"http://127.0.0.1:%d" % (port.getHost().port,)
        tally = RequestTally(("t_requests", "r"), ("t_seconds", "s"))
        agent = MeasuredAgent(Agent(reactor), tally, "gemini", reactor.seconds)
        for method, path in (
            (b"POST", b"/v1beta/models/m:generateContent"),
            (b"GET", b"/v1/models"),
            (b"POST", b"/busy"),
        ):
            response = yield agent.request(method, base + path)
            yield treq.content(response)
        yield self.assertFailure(agent.request(b"POST", base + b"/refuse"), ResponseNeverReceived)
        self.assertEqual([tally.count("gemini", 200), tally.count("gemini", "error")], [2, 1])
        self.assertEqual(tally.count("gemini", 429), 1)
        self.assertEqual(tally.count("kimi", 200), 0)


class FallbackReasonsTests(SynchronousTestCase):
    """
    The reasons of C{openclaw_api_fallbacks_total}, as its HELP text and
    the README list them.
    """

    def test_help_lists_every_reason(self) -> None:
        metrics = GatewayMetrics((), (), breaker=lambda provider: CircuitBreaker(lambda: 0.0))
        (help_text,) = (
            line
            for line in generate_latest(metrics.registry).decode().splitlines()
            if line.startswith("# HELP openclaw_api_fallbacks_total ")
        )
        listed = help_text[help_text.rindex("(") + 1 : help_text.rindex(")")].split(", ")
        self.assertEqual(sorted(listed), sorted(RECORDED_REASONS))
        self.assertEqual(listed, list(FALLBACK_REASONS))

    def test_readme_lists_every_reason(self) -> None:
        readme = (Path(__file__).parent.parent / "README.rst").read_text("utf-8")
        start = readme.index("``openclaw_api_fallbacks_total{from,to,reason}``")
        paragraph = readme[start : readme.index("The active provider", start)]
        for reason in FALLBACK_REASONS:
            self.assertIn(f"``{reason}``", paragraph)
