"""
Prometheus metrics, in a registry of the service's own (no process-wide
state), served at C{GET /metrics} to allowlisted peers.

The control plane counts every message, and model calls are the gateway's
busiest path: both are counted in plain integers (L{CommandTally},
L{RequestTally}), turned into metric families only when C{/metrics} is
read: a C{prometheus_client} counter takes a lock per increment, which the
hot paths need not pay (see bench/README.rst for what it cost).
"""

from __future__ import annotations

import contextlib
import ipaddress
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from itertools import accumulate
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from openclaw.control.admission import PeerAllowlist
from openclaw.providers.breaker import BreakerState, CircuitBreaker
from openclaw.routing import FALLBACK_REASONS

#: The label a message gets when it names no known command.
INVALID = "_invalid"
OUTCOMES = ("ok", "error")
AUTH_REASONS = ("missing token", "invalid token", "token expired", "token revoked")


#: Statuses are a small set in practice; this only bounds the series kept
#: should an upstream invent many (the rest are counted under "other").
_MAX_STATUS_SERIES = 256


class RequestTally:
    """
    Requests counted by provider and status and timed by provider, for the
    data plane's busiest path (see bench/README.rst): recording one is two
    dict lookups and a bisect on plain numbers (a C{prometheus_client} counter
    and histogram take a lock per value and walk the buckets in Python),
    and the metric families are built when C{/metrics} is read.

    Registered in a L{CollectorRegistry} as a custom collector.  Not
    thread-safe, and need not be: it is recorded and read on the reactor
    thread only.

    @param counter: the counter's name and help text.
    @param histogram: the histogram's name and help text.
    """

    def __init__(
        self,
        counter: tuple[str, str],
        histogram: tuple[str, str],
        providers: Iterable[str] = (),
        buckets: tuple[float, ...] = Histogram.DEFAULT_BUCKETS,
    ) -> None:
        self._counter = counter
        self._histogram = histogram
        self._bounds = tuple(bound for bound in buckets if bound != float("inf"))
        self._labels = [*(floatToGoString(bound) for bound in self._bounds), "+Inf"]
        self._counts: dict[tuple[str, int | str], int] = {}
        #: Per provider: a count per bucket, the last one past every bound.
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        for provider in providers:
            self._start_timing(provider)

    def record(self, provider: str, status: int | str, seconds: float) -> None:
        counts = self._counts
        key = (provider, status)
        count = counts.get(key)
        if count is None:
            if len(counts) >= _MAX_STATUS_SERIES:
                key = (provider, "other")
            count = counts.get(key, 0)
        counts[key] = count + 1
        buckets = self._buckets.get(provider)
        if buckets is None:
            buckets = self._start_timing(provider)
        buckets[bisect_left(self._bounds, seconds)] += 1
        self._sums[provider] += seconds

    def _start_timing(self, provider: str) -> list[int]:
        buckets = self._buckets[provider] = [0] * (len(self._bounds) + 1)
        self._sums[provider] = 0.0
        return buckets

    def count(self, provider: str, status: int | str) -> int:
        """
        How many requests to C{provider} ended with C{status} so far.
        """
        return self._counts.get((provider, status), 0)

    def collect(self) -> Iterator[Metric]:
        counter = CounterMetricFamily(*self._counter, labels=["provider", "status"])
        for (provider, status), count in list(self._counts.items()):
            counter.add_metric([provider, str(status)], count)
        yield counter
        histogram = HistogramMetricFamily(*self._histogram, labels=["provider"])
        for provider, buckets in list(self._buckets.items()):
            cumulative = list(zip(self._labels, accumulate(buckets), strict=True))
            histogram.add_metric([provider], cumulative, sum_value=self._sums[provider])
        yield histogram


class CommandTally:
    """
    Control-plane messages counted by command and outcome: one dict update
    per message, and a counter family built when C{/metrics} is read.

    Registered in a L{CollectorRegistry} as a custom collector; recorded and
    read on the reactor thread only, like L{RequestTally}.

    @param names: every command label, each exported (at 0) from the start.
    """

    def __init__(self, name: str, documentation: str, names: Iterable[str]) -> None:
        self._name = name
        self._documentation = documentation
        self.counts = {(cmd, outcome): 0 for cmd in names for outcome in OUTCOMES}

    def collect(self) -> Iterator[Metric]:
        counter = CounterMetricFamily(self._name, self._documentation, labels=["cmd", "outcome"])
        for labels, count in list(self.counts.items()):
            counter.add_metric(labels, count)
        yield counter


class LabelledCounts:
    """
    A Prometheus counter family kept as plain numbers by label values, for
    counters bumped on every model call: one dict update each, where
    C{prometheus_client}'s C{Counter} takes a lock per C{inc} (see
    TWISTED-PATTERNS, the per-message hot path).  The family is built when
    C{/metrics} is read.

    Registered in a L{CollectorRegistry} as a custom collector; counted and
    read on the reactor thread only, like L{RequestTally}.  Exposed as
    C{<name>_total}.
    """

    def __init__(self, name: str, documentation: str, labels: Iterable[str]) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = list(labels)
        self.counts: dict[tuple[str, ...], float] = {}
        #: Counts kept elsewhere (as sums), added in when the family is read.
        self.sources: list[Callable[[], Mapping[tuple[str, ...], float]]] = []

    def add(self, labels: tuple[str, ...], amount: float = 1) -> None:
        counts = self.counts
        counts[labels] = counts.get(labels, 0) + amount

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, labels=self._labels)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labels)
        counts = dict(self.counts)
        for source in self.sources:
            for labels, count in source().items():
                counts[labels] = counts.get(labels, 0) + count
        for labels, count in counts.items():
            family.add_metric(list(labels), count)
        yield family


class PlainHistogram:
    """
    A Prometheus histogram without labels kept as plain numbers, for a
    value observed on every model call: a bisect and two additions, where
    C{prometheus_client}'s C{Histogram.observe} takes a lock per bucket
    value it updates.  The family is built when C{/metrics} is read.

    Registered in a L{CollectorRegistry} as a custom collector; observed and
    read on the reactor thread only, like L{RequestTally}.

    @param buckets: upper bounds, ascending (a last C{+Inf} is implied).
    """

    def __init__(self, name: str, documentation: str, buckets: Iterable[float]) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(bound for bound in buckets if bound != float("inf"))
        self._labels = [*(floatToGoString(bound) for bound in self._bounds), "+Inf"]
        #: A count per bucket, the last one past every bound.
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation)
        cumulative = list(zip(self._labels, accumulate(self._counts), strict=True))
        family.add_metric([], cumulative, sum_value=self._sum)
        yield family


#: Distinct models counted per provider in C{openclaw_api_tokens_total};
#: any further one is counted as L{OTHER_MODEL}.
MAX_MODEL_SERIES = 32
OTHER_MODEL = "other"
#: The gateway's own time per call is small: from 0.1 ms up.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, float("inf"))
#: A model may think for a while before its first token.
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, float("inf"))


def _token_count(value: Any) -> int:
    # A count as providers send it: a whole number of at least 0; anything
    # else (absent, null, a string) counts nothing rather than failing.
    return value if type(value) is int and value > 0 else 0


class CallCosts:
    """
    What model calls cost: tokens by provider, model and kind, the time to
    a stream's first chunk by provider, and the gateway's own time per call.

    Tokens are added to plain counts (L{LabelledCounts}) keyed by
    C{(provider, model label, kind)}, turned into a metric family when
    C{/metrics} is read; the model label is resolved once per C{(provider,
    model)}.  The C{model} label is the route's model as the client or
    operator named it; only the first L{MAX_MODEL_SERIES} distinct ones per provider
    get their own series, later ones are counted under C{"other"}, so
    random model names cannot grow the series without bound (and tokens
    are only counted from answers, which a provider gives only for a model
    it serves).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._tokens = LabelledCounts(
            "openclaw_api_tokens",
            "Tokens of model calls from the answers' usage, by provider, model and kind "
            "(prompt, completion, reasoning; reasoning is part of completion)",
            ["provider", "model", "kind"],
        )
        if registry is not None:
            registry.register(self._tokens)
        self._first_token = Histogram(
            "openclaw_api_time_to_first_token_seconds",
            "Time from a streamed call's arrival to its first chunk sent to the client, by provider",
            ["provider"],
            buckets=FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self._overhead_histogram = PlainHistogram(
            "openclaw_api_overhead_seconds",
            "The gateway's own time per model call: its whole time minus the time spent waiting on the provider",
            OVERHEAD_BUCKETS,
        )
        if registry is not None:
            registry.register(self._overhead_histogram)
        #: (provider, model) -> the model label, for the models with series.
        self._model_labels: dict[tuple[str, str], str] = {}
        self._models: dict[str, set[str]] = {}
        self._first_token_children: dict[str, Any] = {}

    def tokens(self, provider: str, model: str, usage: Any) -> None:
        """
        Count one answer's C{usage} (OpenAI's shape: C{prompt_tokens},
        C{completion_tokens}, C{completion_tokens_details.reasoning_tokens});
        fields missing or not counts are skipped.
        """
        if not isinstance(usage, dict):
            return
        details = usage.get("completion_tokens_details")
        self.count_tokens(
            provider,
            model,
            _token_count(usage.get("prompt_tokens")),
            _token_count(usage.get("completion_tokens")),
            _token_count(details.get("reasoning_tokens")) if isinstance(details, dict) else 0,
        )

    def count_tokens(self, provider: str, model: str, prompt: int, completion: int, reasoning: int) -> None:
        """
        Count one answer's tokens, read from its usage already (as
        L{openclaw.consumers.table.usage_counts} does): whole numbers, 0
        for none.
        """
        if not (prompt or completion or reasoning):
            return
        label = self._model_labels.get((provider, model))
        if label is None:
            label = self._model_label(provider, model)
        add = self._tokens.add
        if prompt:
            add((provider, label, "prompt"), prompt)
        if completion:
            add((provider, label, "completion"), completion)
        if reasoning:
            add((provider, label, "reasoning"), reasoning)

    def _model_label(self, provider: str, model: str) -> str:
        models = self._models.setdefault(provider, set())
        if len(models) >= MAX_MODEL_SERIES:
            # Past the bound: not remembered either, so the memo stays
            # bounded too; such a model's calls take this path each time.
            return OTHER_MODEL
        models.add(model)
        self._model_labels[(provider, model)] = model
        return model

    def first_token(self, provider: str, seconds: float) -> None:
        """
        A stream's first chunk went out C{seconds} after the call arrived.
        """
        child = self._first_token_children.get(provider)
        if child is None:
            child = self._first_token_children[provider] = self._first_token.labels(provider)
        child.observe(seconds)

    def overhead(self, seconds: float) -> None:
        """
        A call took C{seconds} of the gateway's own time.
        """
        self._overhead_histogram.observe(max(seconds, 0.0))


class GatewayMetrics:
    """
    Every metric the gateway exports.
    """

    def __init__(self, commands: Iterable[str], providers: Iterable[str], unconfigured: Iterable[str] = ()) -> None:
        """
        @param providers: every provider's id.
        @param unconfigured: those without a key: no C{openclaw_provider_up}
            for them (not configured is not down).
        """
        self.registry = CollectorRegistry()
        registry = self.registry
        self.connections = Gauge("openclaw_control_connections", "Open control-plane connections", registry=registry)
        auth_failures = Counter(
            "openclaw_control_auth_failures",
            "Control-plane messages with a token refused, by reason",
            ["reason"],
            registry=registry,
        )
        self.refused = Counter(
            "openclaw_control_refused_connections",
            "Control connections refused, by reason",
            ["reason"],
            registry=registry,
        )
        #: Client addresses locked out after too many failed authentications.
        self.lockouts = Counter(
            "openclaw_control_lockouts",
            "Client addresses locked out after AUTH_LOCKOUT_FAILURES failed authentications",
            registry=registry,
        )
        self.provider_up = Gauge(
            "openclaw_provider_up",
            "1 while the provider may be sent calls (at least one usable key, circuit breaker not open), else 0; "
            "read when scraped",
            ["provider"],
            registry=registry,
        )
        self.health_check_ok = Gauge(
            "openclaw_provider_health_check_ok",
            "1 if the provider's last health_check probe succeeded, else 0 (no series before the first)",
            ["provider"],
            registry=registry,
        )
        self._unconfigured = frozenset(unconfigured)
        providers = tuple(providers)
        self.upstream_requests = RequestTally(
            ("openclaw_upstream_requests", "HTTP requests to providers, by provider and status"),
            ("openclaw_upstream_request_seconds", "Time to the response headers of provider requests"),
            providers,
        )
        registry.register(self.upstream_requests)
        #: Model API calls, counted here rather than logged one by one.
        self.api_requests = RequestTally(
            (
                "openclaw_api_requests",
                "Data-plane API requests answered, by the provider called (- if none was) and status",
            ),
            ("openclaw_api_request_seconds", "Time to answer data-plane API requests, by the provider called"),
        )
        registry.register(self.api_requests)
        command_seconds = Histogram(
            "openclaw_control_command_seconds",
            "Time to answer state-changing control commands",
            ["cmd"],
            registry=registry,
        )
        names = [*commands, INVALID]
        self.commands = CommandTally(
            "openclaw_control_commands", "Control-plane messages answered, by command and outcome", names
        )
        registry.register(self.commands)
        self._commands = self.commands.counts
        self._auth_failures = {reason: auth_failures.labels(reason) for reason in AUTH_REASONS}
        self._command_seconds = {cmd: command_seconds.labels(cmd) for cmd in names}
        #: Tokens, time to first token and overhead of model calls.
        self.call_costs = CallCosts(registry)

    def command(self, cmd: str, outcome: str) -> None:
        self._commands[(cmd, outcome)] += 1

    def command_took(self, cmd: str, seconds: float) -> None:
        self._command_seconds[cmd].observe(seconds)

    def auth_failed(self, reason: str) -> None:
        self._auth_failures[reason].inc()

    def health(self, report: dict[str, Any]) -> dict[str, Any]:
        """
        Record a health check's verdict per provider
        (C{openclaw_provider_health_check_ok}); returns the report.
        """
        for provider, entry in report.get("providers", {}).items():
            if entry.get("configured") is False:
                # Not configured is not down: no series for an alert to fire on.
                with contextlib.suppress(KeyError):
                    self.health_check_ok.remove(provider)
                continue
            self.health_check_ok.labels(provider).set(1 if entry.get("ok") else 0)
        return report

    def watch_providers(self, providers: Iterable[tuple[str, Callable[[], bool]]]) -> None:
        """
        Export C{openclaw_provider_up{provider}}, read when scraped, for
        each C{(provider id, serving)} pair, C{serving} saying whether the
        provider may be sent calls now
        (L{ProviderAdapter.serving <openclaw.providers.base.ProviderAdapter.serving>});
        none for a provider without a key (not configured is not down).
        """
        for provider, serving in providers:
            if provider not in self._unconfigured:
                self.provider_up.labels(provider).set_function(partial(_as_gauge, serving))

    def cluster_store_up(self) -> Gauge:
        """
        C{openclaw_cluster_store_up}: 1 while the cluster's store (Redis) is
        reachable and this instance has reloaded its state, else 0.  Only
        registered in a cluster (C{REDIS_URL}).
        """
        return Gauge(
            "openclaw_cluster_store_up",
            "1 while the cluster store (REDIS_URL) is reachable and this instance is in step with it",
            registry=self.registry,
        )

    def count_connections(self, count: Callable[[], int]) -> None:
        self.connections.set_function(count)

    def watch_failover(self, breakers: Iterable[tuple[str, CircuitBreaker]]) -> Callable[[str, str, str], None]:
        """
        Export C{openclaw_provider_breaker_open{provider}} (1 while the
        provider's circuit breaker is open, read when scraped) for each
        C{(provider id, breaker)} pair, and C{openclaw_api_fallbacks_total
        {from,to,reason}}; returns the function that counts one failover.
        """
        gauge = Gauge(
            "openclaw_provider_breaker_open",
            "1 while the provider's circuit breaker is open (calls kept away), else 0",
            ["provider"],
            registry=self.registry,
        )
        states = Gauge(
            "openclaw_provider_breaker_state",
            "1 for the state the provider's circuit breaker is in (closed, open, half_open), 0 for the others",
            ["provider", "state"],
            registry=self.registry,
        )
        for provider, breaker in breakers:
            gauge.labels(provider).set_function(partial(_breaker_in, breaker, BreakerState.OPEN))
            for state in BreakerState:
                states.labels(provider, state).set_function(partial(_breaker_in, breaker, state))
        fallbacks = Counter(
            "openclaw_api_fallbacks",
            "Calls failed over to another provider, by the provider that failed, the one that took the call "
            f"and why ({', '.join(FALLBACK_REASONS)})",
            ["from", "to", "reason"],
            registry=self.registry,
        )
        children: dict[tuple[str, str, str], Any] = {}

        def count(origin: str, target: str, reason: str) -> None:
            child = children.get((origin, target, reason))
            if child is None:
                child = children[(origin, target, reason)] = fallbacks.labels(origin, target, reason)
            child.inc()

        return count


def _breaker_in(breaker: CircuitBreaker, state: BreakerState) -> float:
    return 1.0 if breaker.state is state else 0.0


def _as_gauge(test: Callable[[], bool]) -> float:
    return 1.0 if test() else 0.0


class MetricsResource(Resource):
    """
    C{GET /metrics} in the Prometheus text format, for allowlisted peers
    only (a UNIX-socket peer is trusted by the socket's permissions).

    A peer check alone would let a web page read it through DNS rebinding
    (a name of the attacker's made to resolve to 127.0.0.1, the browser
    then sending C{Host: rebind.example}): a request is refused (403) when
    it carries an C{Origin} header (no browser page has business here) or a
    C{Host} that is not C{localhost}, a loopback address, the address the
    request came in on, or one of C{allowed_hosts} (METRICS_ALLOWED_HOSTS).
    The check is the one the DNS-rebinding advisories recommend (e.g.
    Jupyter's and Home Assistant's): a browser always sends the name it
    resolved in C{Host}.

    @param allowed_hosts: further host names or addresses, lower-case,
        without a port.
    """

    isLeaf = True

    def __init__(self, metrics: GatewayMetrics, allowlist: PeerAllowlist, allowed_hosts: Iterable[str] = ()) -> None:
        super().__init__()
        self._metrics = metrics
        self._allowlist = allowlist
        self._allowed_hosts = frozenset(("localhost", *allowed_hosts))

    def render(self, request: Request) -> bytes:
        """
        C{GET} and C{HEAD}; any other method gets a plain 405 with C{Allow}
        (RFC 9110 section 15.5.6), not twisted.web's HTML 405 or 501.
        """
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"method not allowed: /metrics answers GET and HEAD\n"
        body = self.render_GET(request)
        if request.method == b"HEAD":
            # Its length only: twisted.web logs a line (the request's whole
            # URI in it) for a HEAD answered with a body.
            request.setHeader(b"content-length", b"%d" % len(body))
            return b""
        return body

    def render_GET(self, request: Request) -> bytes:
        host = getattr(request.getClientAddress(), "host", None)
        if host is not None and not self._allowlist.allows(host):
            return self._refuse(request, b"metrics are only served to TRUSTED_CLIENT_IPS\n")
        if request.getHeader(b"origin") is not None:
            return self._refuse(request, b"metrics are not served to web pages (the request has an Origin header)\n")
        if not self._host_allowed(request):
            return self._refuse(
                request,
                b"metrics are only served under localhost, the listener's own address or a name in "
                b"METRICS_ALLOWED_HOSTS (the Host header names another)\n",
            )
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self._metrics.registry)

    def _host_allowed(self, request: Request) -> bool:
        header = request.getHeader(b"host")
        if header is None:
            return True  # HTTP/1.0 without Host: not a browser
        name = _host_name(header.decode("latin-1"))
        if name in self._allowed_hosts:
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_loopback:
            return True
        own = getattr(request.getHost(), "host", None)
        return isinstance(own, str) and _same_address(own, address)

    @staticmethod
    def _refuse(request: Request, text: bytes) -> bytes:
        request.setResponseCode(403)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return text


def _host_name(header: str) -> str:
    """
    The name in a C{Host} header value: lower-case, without its port or
    trailing dot, an IPv6 literal without brackets.
    """
    header = header.strip().lower()
    if header.startswith("["):
        name = header[1:].partition("]")[0]
    else:
        name = header.rpartition(":")[0] if header.count(":") == 1 else header
    return name.rstrip(".")


def _same_address(own: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        mine = ipaddress.ip_address(own.partition("%")[0])
    except ValueError:
        return False
    if isinstance(mine, ipaddress.IPv6Address) and mine.ipv4_mapped is not None:
        mine = mine.ipv4_mapped
    return mine == address


#: URLs whose provider L{MeasuredAgent} remembers (a model's name may be
#: part of a URL, so the client could otherwise grow the memo).
MAX_MEASURED_URLS = 256


@implementer(IAgent)
class MeasuredAgent:
    """
    An agent that counts every provider request by provider and status and
    times it to the response headers: wrapped around the one agent all
    adapters share, it sees health probes and model calls alike without
    either knowing.

    @param providers: C{(base URL, provider id)} pairs; a request is the
        first provider's whose base URL it starts with.  The verdict is
        kept per URL (for the first L{MAX_MEASURED_URLS} URLs: a chat call's
        URL is the same call after call), so a call costs one dict lookup.
    """

    def __init__(
        self,
        agent: IAgent,
        tally: RequestTally,
        providers: Iterable[tuple[str, str]],
        clock: Callable[[], float],
    ) -> None:
        self._agent = agent
        self._tally = tally
        self._prefixes = [(base.rstrip("/").encode(), provider) for base, provider in providers]
        self._clock = clock
        #: URL -> provider id, for the URLs seen first.
        self._providers: dict[bytes, str] = {}

    def provider_of(self, uri: bytes) -> str:
        """
        The id of the provider C{uri} is under, else C{"other"}.
        """
        provider = self._providers.get(uri)
        if provider is None:
            provider = next((provider for prefix, provider in self._prefixes if uri.startswith(prefix)), "other")
            if len(self._providers) < MAX_MEASURED_URLS:
                self._providers[uri] = provider
        return provider

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Any:
        provider, started = self.provider_of(uri), self._clock()
        d = self._agent.request(method, uri, headers, bodyProducer)
        return d.addBoth(self._measured, provider, started)

    def _measured(self, result: Any, provider: str, started: float) -> Any:
        status = "error" if isinstance(result, Failure) else result.code
        self._tally.record(provider, status, self._clock() - started)
        return result


class GatewayFigures(Protocol):
    """
    Calls counted as sums (L{openclaw.consumers.gateway_usage.GatewayUsage}).
    """

    def requests(self) -> Mapping[int, int]:
        """Calls so far, by HTTP status."""

    def tokens(self) -> tuple[int, int, int]:
        """C{(prompt, completion, reasoning)} tokens so far."""

    def spend(self) -> float:
        """US dollars so far."""


class ConsumerMetrics:
    """
    The consumers' counters (issue #19), labelled by consumer name (C{-}
    for GATEWAY_API_KEYS' keys): C{openclaw_consumer_requests_total
    {consumer,status}}, C{openclaw_consumer_tokens_total{consumer,kind}}
    (kind: prompt, completion, reasoning; reasoning is part of completion),
    C{openclaw_consumer_spend_usd_total{consumer}} and
    C{openclaw_consumer_limited_total{consumer,reason}} (reason: the error
    code, C{rate_limit_exceeded}, C{insufficient_quota},
    C{model_not_allowed}).  Names are the operator's, so the series are
    bounded by the consumers made; labelled children are resolved once.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._requests = LabelledCounts(
            "openclaw_consumer_requests",
            "Model calls by consumer and HTTP status (limited ones included)",
            ["consumer", "status"],
        )
        self._tokens = LabelledCounts(
            "openclaw_consumer_tokens",
            "Tokens by consumer and kind (prompt, completion, reasoning; reasoning is part of completion)",
            ["consumer", "kind"],
        )
        self._spend = LabelledCounts(
            "openclaw_consumer_spend_usd", "Spend in US dollars by consumer (priced models only)", ["consumer"]
        )
        self._limited = LabelledCounts(
            "openclaw_consumer_limited",
            "Calls refused by a consumer's limits, by consumer and reason",
            ["consumer", "reason"],
        )
        self._registry = registry
        if registry is not None:
            for family in (self._requests, self._tokens, self._spend, self._limited):
                registry.register(family)

    def count_pending(self, pending: Callable[[], int]) -> None:
        """
        C{openclaw_consumer_usage_rows_pending}: C{pending()} when scraped,
        the usage rows waiting for the consumers' database (it grows while
        the database cannot be written).
        """
        if self._registry is None:
            return
        gauge = Gauge(
            "openclaw_consumer_usage_rows_pending",
            "Usage rows waiting to be written to the consumers' database (growing: it cannot be written)",
            registry=self._registry,
        )
        gauge.set_function(pending)

    def requests(self, consumer: str, status: int) -> None:
        self._requests.add((consumer, str(status)))

    def tokens(self, consumer: str, prompt: int, completion: int, reasoning: int) -> None:
        add = self._tokens.add
        if prompt:
            add((consumer, "prompt"), prompt)
        if completion:
            add((consumer, "completion"), completion)
        if reasoning:
            add((consumer, "reasoning"), reasoning)

    def spend(self, consumer: str, usd: float) -> None:
        self._spend.add((consumer,), usd)

    def limited(self, consumer: str, reason: str) -> None:
        self._limited.add((consumer, reason))

    def count_gateway(self, consumer: str, usage: GatewayFigures) -> None:
        """
        Export C{usage}'s sums as C{consumer}'s requests, tokens and spend
        whenever the families are read: the calls of GATEWAY_API_KEYS' keys,
        counted there rather than here, one dict update per call.
        """
        self._requests.sources.append(
            lambda: {(consumer, str(status)): count for status, count in usage.requests().items()}
        )

        def tokens() -> dict[tuple[str, ...], float]:
            counts = zip(("prompt", "completion", "reasoning"), usage.tokens(), strict=True)
            return {(consumer, kind): count for kind, count in counts if count}

        self._tokens.sources.append(tokens)

        def spend() -> dict[tuple[str, ...], float]:
            spent = usage.spend()
            return {(consumer,): spent} if spent else {}

        self._spend.sources.append(spend)
