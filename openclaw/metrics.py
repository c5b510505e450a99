"""
Prometheus metrics, in a registry of the service's own (no process-wide
state), served at C{GET /metrics} to allowlisted peers.

The control plane counts every message; C{Counter.labels()} costs more than
the rest of a C{ping}, so each labelled child is resolved once, here, and
the hot path only calls C{.inc()}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from openclaw.allowlist import PeerAllowlist

#: The label a message gets when it names no known command.
INVALID = "_invalid"
OUTCOMES = ("ok", "error")
AUTH_REASONS = ("missing token", "invalid token", "token expired", "token revoked")


#: Statuses are a small set in practice; this only bounds the cache of
#: counter children should an upstream invent many.
_MAX_STATUS_CHILDREN = 256


class GatewayMetrics:
    """
    Every metric the gateway exports.
    """

    def __init__(self, commands: Iterable[str], providers: Iterable[str]) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.connections = Gauge(
            "openclaw_control_connections", "Open control-plane connections", registry=registry
        )
        commands_total = Counter(
            "openclaw_control_commands", "Control-plane messages answered, by command and outcome",
            ["cmd", "outcome"], registry=registry,
        )
        auth_failures = Counter(
            "openclaw_control_auth_failures", "Control-plane messages with a token refused, by reason",
            ["reason"], registry=registry,
        )
        self.refused = Counter(
            "openclaw_control_refused_connections", "Control connections refused, by reason",
            ["reason"], registry=registry,
        )
        self.provider_up = Gauge(
            "openclaw_provider_up", "1 if the provider's last health probe succeeded, else 0",
            ["provider"], registry=registry,
        )
        self.upstream_requests = Counter(
            "openclaw_upstream_requests", "HTTP requests to providers, by provider and status",
            ["provider", "status"], registry=registry,
        )
        self.upstream_seconds = Histogram(
            "openclaw_upstream_request_seconds", "Time to the response headers of provider requests",
            ["provider"], registry=registry,
        )
        command_seconds = Histogram(
            "openclaw_control_command_seconds", "Time to answer state-changing control commands",
            ["cmd"], registry=registry,
        )
        names = [*commands, INVALID]
        self._commands = {(cmd, outcome): commands_total.labels(cmd, outcome) for cmd in names for outcome in OUTCOMES}
        self._auth_failures = {reason: auth_failures.labels(reason) for reason in AUTH_REASONS}
        self._command_seconds = {cmd: command_seconds.labels(cmd) for cmd in names}
        self._upstream_requests: dict[tuple[str, int | str], Any] = {}
        self._upstream_seconds: dict[str, Any] = {}
        for provider in providers:
            self.provider_up.labels(provider)

    def command(self, cmd: str, outcome: str) -> None:
        self._commands[(cmd, outcome)].inc()

    def command_took(self, cmd: str, seconds: float) -> None:
        self._command_seconds[cmd].observe(seconds)

    def auth_failed(self, reason: str) -> None:
        self._auth_failures[reason].inc()

    def health(self, report: dict[str, Any]) -> dict[str, Any]:
        """
        Record a health check's verdict per provider; returns the report.
        """
        for provider, entry in report.get("providers", {}).items():
            self.provider_up.labels(provider).set(1 if entry.get("ok") else 0)
        return report

    def upstream(self, provider: str, status: int | str, seconds: float) -> None:
        # Once per model call: the children are looked up in a dict of our
        # own rather than through labels() (which validates and locks).
        key = (provider, status)
        counter = self._upstream_requests.get(key)
        if counter is None:
            counter = self.upstream_requests.labels(provider, str(status))
            if len(self._upstream_requests) < _MAX_STATUS_CHILDREN:
                self._upstream_requests[key] = counter
        counter.inc()
        histogram = self._upstream_seconds.get(provider)
        if histogram is None:
            histogram = self._upstream_seconds[provider] = self.upstream_seconds.labels(provider)
        histogram.observe(seconds)

    def count_connections(self, count: Callable[[], int]) -> None:
        self.connections.set_function(count)


class MetricsResource(Resource):
    """
    C{GET /metrics} in the Prometheus text format, for allowlisted peers
    only (a UNIX-socket peer is trusted by the socket's permissions).
    """

    isLeaf = True

    def __init__(self, metrics: GatewayMetrics, allowlist: PeerAllowlist) -> None:
        super().__init__()
        self._metrics = metrics
        self._allowlist = allowlist

    def render_GET(self, request: Request) -> bytes:
        host = getattr(request.getClientAddress(), "host", None)
        if host is not None and not self._allowlist.allows(host):
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"metrics are only served to TRUSTED_CLIENT_IPS\n"
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self._metrics.registry)


@implementer(IAgent)
class MeasuredAgent:
    """
    An agent that counts every provider request by provider and status and
    times it to the response headers: wrapped around the one agent all
    adapters share, it sees health probes and model calls alike without
    either knowing.

    @param providers: C{(base URL, provider id)} pairs; a request is the
        first provider's whose base URL it starts with.
    """

    def __init__(
        self,
        agent: IAgent,
        metrics: GatewayMetrics,
        providers: Iterable[tuple[str, str]],
        clock: Callable[[], float],
    ) -> None:
        self._agent = agent
        self._metrics = metrics
        self._prefixes = [(base.rstrip("/").encode(), provider) for base, provider in providers]
        self._clock = clock

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Any:
        provider = next((p for prefix, p in self._prefixes if uri.startswith(prefix)), "other")
        started = self._clock()

        def answered(response: Any) -> Any:
            self._metrics.upstream(provider, response.code, self._clock() - started)
            return response

        def failed(failure: Any) -> Any:
            self._metrics.upstream(provider, "error", self._clock() - started)
            return failure

        return self._agent.request(method, uri, headers, bodyProducer).addCallbacks(answered, failed)
