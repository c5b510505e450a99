"""
Prometheus metrics, in a registry of the service's own (no process-wide
state), served at C{GET /metrics} to allowlisted peers.

Every family is a C{prometheus_client} metric (L{Counter}, L{Histogram},
L{Gauge}).  On the paths taken per message and per model call, each
labelled child is resolved once (C{labels()}) and kept in a dict keyed by
its label values, so counting is a dict lookup and the child's own
C{inc} or C{observe}.  The label values that come from clients or
upstreams (statuses, model names) are bounded (L{_MAX_STATUS_SERIES},
L{MAX_MODEL_SERIES}), so are the children kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, Literal, get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from openclaw.addresses import IPAddress, normalise, peer_host, without_port
from openclaw.consumers.estimate import count_or_zero
from openclaw.control.admission import PeerAllowlist
from openclaw.logs import METRICS_NAMESPACE
from openclaw.providers.breaker import BreakerState, CircuitBreaker
from openclaw.routing import FALLBACK_REASONS
from openclaw.web import head_or_body

#: The label a message gets when it names no known command.
INVALID = "_invalid"
OUTCOMES = ("ok", "error")
#: Why a token was refused (L{openclaw.session}): the C{reason} label of
#: C{openclaw_control_auth_failures_total}.  C{token not known here yet} is
#: not counted toward MAX_AUTH_FAILURES nor AUTH_LOCKOUT_FAILURES.
AUTH_REASONS = ("missing token", "invalid token", "token expired", "token revoked", "token not known here yet")

#: Why a control connection was refused, or failed before it opened: the
#: C{reason} label of C{openclaw_control_refused_connections_total}.  Before
#: the handshake (the TCP connection dropped): C{too_many_handshakes},
#: C{reserved_for_operators}, C{too_many_outsider_handshakes},
#: C{too_many_handshakes_from_address}.  The handshake refused:
#: C{too_many_connections}, C{too_many_unauthenticated},
#: C{origin_not_allowed}, C{handshake_too_large}, C{handshake_timeout},
#: C{bad_handshake} (Autobahn's own refusal), C{tls_error}.  Opened only
#: to be closed with 1008: C{untrusted_peer}, C{proxy_client_unreadable},
#: C{proxy_named_no_client}, C{locked_out}.  Closed for not
#: authenticating in time: C{auth_timeout}; for what it sent before it
#: authenticated: C{too_much_before_auth} (1008), C{protocol_error}
#: (Autobahn's 1002, 1003, 1007 or 1009).
ControlRefusal = Literal[
    "too_many_handshakes",
    "reserved_for_operators",
    "too_many_outsider_handshakes",
    "too_many_handshakes_from_address",
    "too_many_connections",
    "too_many_unauthenticated",
    "origin_not_allowed",
    "handshake_too_large",
    "handshake_timeout",
    "bad_handshake",
    "tls_error",
    "untrusted_peer",
    "proxy_client_unreadable",
    "proxy_named_no_client",
    "locked_out",
    "auth_timeout",
    "too_much_before_auth",
    "protocol_error",
]
CONTROL_REFUSALS: tuple[ControlRefusal, ...] = get_args(ControlRefusal)
#: Why an API connection was closed as it opened, or to make room: the
#: C{reason} label of C{openclaw_api_refused_connections_total}, each the
#: limit it hit (C{API_MAX_CONNECTIONS}: a newcomer refused, or the oldest
#: keyless connection closed to make room for it; C{API_MAX_CONNECTIONS_PER_ADDRESS};
#: C{API_KEYLESS_CONNECTIONS_PER_ADDRESS}; and C{api_keyless_share}: the
#: oldest keyless connection closed when keyless ones hold half of
#: C{API_MAX_CONNECTIONS}).
APIRefusal = Literal[
    "api_max_connections",
    "api_max_connections_per_address",
    "api_keyless_connections_per_address",
    "api_keyless_share",
]
API_REFUSALS: tuple[APIRefusal, ...] = get_args(APIRefusal)


#: The scrapes' events (a L{Logger} on a class would take its name as
#: namespace: L{Logger.__get__}).
_log = Logger(namespace=METRICS_NAMESPACE)

#: Statuses are a small set in practice; this only bounds the series kept
#: should an upstream invent many (the rest are counted under "other").
_MAX_STATUS_SERIES = 256


class RequestTally:
    """
    Requests counted by provider and status (a L{Counter}, exported as
    C{<name>_total{provider,status}}) and timed by provider (a
    L{Histogram}, C{<name>_bucket{provider,le}} and so on), for the data
    plane's busiest path: the children are kept by label values, so
    recording one is two dict lookups, an C{inc} and an C{observe}.

    The first L{_MAX_STATUS_SERIES} C{(provider, status)} pairs get a
    series each; later statuses are counted under C{"other"}.

    @param counter: the counter's name (without C{_total}) and help text.
    @param histogram: the histogram's name and help text.
    @param providers: the providers timed from the start: their histogram
        series are exported (at 0) before any request.
    @param buckets: the histogram's upper bounds, in seconds, ascending.
    @param registry: where both are registered; None for nowhere.
    """

    def __init__(
        self,
        counter: tuple[str, str],
        histogram: tuple[str, str],
        providers: Iterable[str] = (),
        buckets: Iterable[float] = Histogram.DEFAULT_BUCKETS,
        registry: CollectorRegistry | None = None,
    ) -> None:
        name, documentation = counter
        self._counter = Counter(name, documentation, ["provider", "status"], registry=registry)
        name, documentation = histogram
        self._histogram = Histogram(name, documentation, ["provider"], buckets=tuple(buckets), registry=registry)
        #: (provider, status as recorded) -> its counter child.
        self._counts: dict[tuple[str, int | str], Counter] = {}
        #: provider -> its histogram child.
        self._timings: dict[str, Histogram] = {}
        for provider in providers:
            self._timing(provider)

    def record(self, provider: str, status: int | str, seconds: float) -> None:
        """
        Count one request to C{provider} that ended with C{status} (an
        HTTP status, or a word such as C{"error"}) after C{seconds}.
        """
        count = self._counts.get((provider, status))
        if count is None:
            count = self._count(provider, status)
        count.inc()
        timing = self._timings.get(provider)
        if timing is None:
            timing = self._timing(provider)
        timing.observe(seconds)

    def _count(self, provider: str, status: int | str) -> Counter:
        counts = self._counts
        if len(counts) >= _MAX_STATUS_SERIES:
            status = "other"
            count = counts.get((provider, status))
            if count is not None:
                return count
        count = counts[(provider, status)] = self._counter.labels(provider, str(status))
        return count

    def _timing(self, provider: str) -> Histogram:
        timing = self._timings[provider] = self._histogram.labels(provider)
        return timing

    def count(self, provider: str, status: int | str) -> int:
        """
        How many requests to C{provider} ended with C{status} so far.
        """
        labels = {"provider": provider, "status": str(status)}
        for family in self._counter.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels == labels:
                    return int(sample.value)
        return 0


#: Distinct models counted per provider in C{openclaw_api_tokens_total};
#: any further one is counted as L{OTHER_MODEL}.
MAX_MODEL_SERIES = 32
OTHER_MODEL = "other"
#: The gateway's own time per call is small: from 0.1 ms up.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, float("inf"))
#: A model may think for a while before its first token.
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, float("inf"))


class CallCosts:
    """
    What model calls cost: C{openclaw_api_tokens_total{provider,model,kind}},
    C{openclaw_api_time_to_first_token_seconds{provider}} (a histogram) and
    C{openclaw_api_overhead_seconds} (a histogram of the gateway's own time
    per call).

    The C{model} label is the route's model as the client or operator
    named it, resolved once per C{(provider, model)}; only the first
    L{MAX_MODEL_SERIES} distinct ones per provider get their own series,
    later ones are counted under L{OTHER_MODEL}, so random model names
    cannot grow the series without bound (and tokens are only counted
    from answers, which a provider gives only for a model it serves).

    @param registry: where the families are registered; None for nowhere.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._tokens = Counter(
            "openclaw_api_tokens",
            "Tokens of model calls from the answers' usage, by provider, model and kind "
            "(prompt, completion, reasoning; reasoning is part of completion)",
            ["provider", "model", "kind"],
            registry=registry,
        )
        self._first_token = Histogram(
            "openclaw_api_time_to_first_token_seconds",
            "Time from a streamed call's arrival to its first chunk sent to the client, by provider",
            ["provider"],
            buckets=FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self._overhead = Histogram(
            "openclaw_api_overhead_seconds",
            "The gateway's own time per model call: its whole time minus the time spent waiting on the provider",
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        #: (provider, model) -> the model label, for the models with series.
        self._model_labels: dict[tuple[str, str], str] = {}
        self._models: dict[str, set[str]] = {}
        #: (provider, model label, kind) -> its counter child.
        self._token_children: dict[tuple[str, str, str], Counter] = {}
        self._first_token_children: dict[str, Histogram] = {}

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
            count_or_zero(usage.get("prompt_tokens")),
            count_or_zero(usage.get("completion_tokens")),
            count_or_zero(details.get("reasoning_tokens")) if isinstance(details, dict) else 0,
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
        if prompt:
            self._add_tokens((provider, label, "prompt"), prompt)
        if completion:
            self._add_tokens((provider, label, "completion"), completion)
        if reasoning:
            self._add_tokens((provider, label, "reasoning"), reasoning)

    def _add_tokens(self, labels: tuple[str, str, str], count: int) -> None:
        child = self._token_children.get(labels)
        if child is None:
            child = self._token_children[labels] = self._tokens.labels(*labels)
        child.inc(count)

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
        self._overhead.observe(max(seconds, 0.0))


class GatewayMetrics:
    """
    Every metric the gateway exports.
    """

    def __init__(
        self,
        commands: Iterable[str],
        providers: Iterable[str],
        unconfigured: Iterable[str] = (),
        *,
        serving: Callable[[str], bool] | None = None,
        control_connections: Callable[[], int] | None = None,
        api_connections: Callable[[], int] | None = None,
        breaker: Callable[[str], CircuitBreaker] | None = None,
        cluster: bool = False,
    ) -> None:
        """
        Every reader below is called when C{/metrics} is scraped, never
        here: it may name an object built after this one (the gateway
        passes late-binding lambdas: the providers and the listeners count
        into these metrics, and these metrics read them).

        @param commands: every control command's name.
        @param providers: every provider's id.
        @param unconfigured: those without a key: no C{openclaw_provider_up}
            for them (not configured is not down).
        @param serving: given a provider's id, whether it may be sent calls
            now (L{ProviderAdapter.serving
            <openclaw.providers.base.ProviderAdapter.serving>}):
            C{openclaw_provider_up{provider}} for each configured provider.
            L{None}: no such series.
        @param control_connections: the open control connections, for
            C{openclaw_control_connections} (L{None}: 0).
        @param api_connections: the open API connections, for
            C{openclaw_api_connections} (L{None}: 0).
        @param breaker: given a provider's id, its circuit breaker: when
            given (the API is served), C{openclaw_provider_breaker_open} and
            C{openclaw_provider_breaker_state} for each provider and
            C{openclaw_api_fallbacks_total} are exported, and
            L{count_fallback} counts into the latter.
        @param cluster: in a cluster (C{REDIS_URL}): export
            L{cluster_store_up}.
        """
        self.registry = CollectorRegistry()
        providers = tuple(providers)
        self._build_connections(control_connections, api_connections)
        self._build_providers(providers, frozenset(unconfigured), serving)
        self._build_commands(commands)
        #: Tokens, time to first token and overhead of model calls.
        self.call_costs = CallCosts(self.registry)
        #: C{openclaw_cluster_store_up}: 1 while the cluster's store (Redis)
        #: is reachable and this instance has reloaded its state, else 0;
        #: L{None} outside a cluster (C{cluster} false).
        self.cluster_store_up: Gauge | None = None
        if cluster:
            self.cluster_store_up = Gauge(
                "openclaw_cluster_store_up",
                "1 while the cluster store (REDIS_URL) is reachable and this instance is in step with it",
                registry=self.registry,
            )
        #: Counts one failover, C{(from, to, reason)}, into
        #: C{openclaw_api_fallbacks_total}; L{None} unless C{breaker} was
        #: given.
        self.count_fallback: Callable[[str, str, str], None] | None = None
        if breaker is not None:
            self.count_fallback = self._watch_failover(providers, breaker)

    def _build_connections(
        self, control_connections: Callable[[], int] | None, api_connections: Callable[[], int] | None
    ) -> None:
        """
        The connections' series: C{connections} and C{api_connections}
        (the open ones, read from C{control_connections} and
        C{api_connections} when scraped, as L{__init__} says), the
        connections refused, the failed authentications and C{lockouts}.
        """
        registry = self.registry
        self.connections = Gauge("openclaw_control_connections", "Open control-plane connections", registry=registry)
        auth_failures = Counter(
            "openclaw_control_auth_failures",
            "Control-plane messages with a token refused, by reason",
            ["reason"],
            registry=registry,
        )
        self._auth_failures = {reason: auth_failures.labels(reason) for reason in AUTH_REASONS}
        refused = Counter(
            "openclaw_control_refused_connections",
            "Control connections refused or failed before they opened, by reason",
            ["reason"],
            registry=registry,
        )
        # Every reason's series exported (at 0) from the start: rate() and
        # alerts see the first refusal, not the series appearing with it.
        self._refused = {reason: refused.labels(reason) for reason in CONTROL_REFUSALS}
        self.api_connections = Gauge(
            "openclaw_api_connections",
            "Open data-plane API connections (an HTTP/2 connection counts once)",
            registry=registry,
        )
        api_refused = Counter(
            "openclaw_api_refused_connections",
            "Data-plane API connections closed as they opened, or to make room, by the limit they hit",
            ["reason"],
            registry=registry,
        )
        self._api_refused = {reason: api_refused.labels(reason) for reason in API_REFUSALS}
        #: Client addresses locked out after too many failed authentications.
        self.lockouts = Counter(
            "openclaw_control_lockouts",
            "Client addresses locked out after AUTH_LOCKOUT_FAILURES failed authentications",
            registry=registry,
        )
        if control_connections is not None:
            self.connections.set_function(control_connections)
        if api_connections is not None:
            self.api_connections.set_function(api_connections)

    def _build_providers(
        self, providers: tuple[str, ...], without_key: frozenset[str], serving: Callable[[str], bool] | None
    ) -> None:
        """
        The providers' series: C{provider_up} (for those of C{providers}
        not C{without_key}, read from C{serving} when scraped, as
        L{__init__} says), C{health_check_ok}, and the requests to them
        (C{upstream_requests}) and to the data plane (C{api_requests}).
        """
        registry = self.registry
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
        self.upstream_requests = RequestTally(
            ("openclaw_upstream_requests", "HTTP requests to providers, by provider and status"),
            ("openclaw_upstream_request_seconds", "Time to the response headers of provider requests"),
            providers,
            registry=registry,
        )
        #: Model API calls, counted here rather than logged one by one.
        self.api_requests = RequestTally(
            (
                "openclaw_api_requests",
                "Data-plane API requests answered, by the provider called (- if none was) and status",
            ),
            ("openclaw_api_request_seconds", "Time to answer data-plane API requests, by the provider called"),
            registry=registry,
        )
        if serving is not None:
            for provider in providers:
                if provider not in without_key:
                    self.provider_up.labels(provider).set_function(partial(_as_gauge, partial(serving, provider)))

    def _build_commands(self, commands: Iterable[str]) -> None:
        """
        The control commands' series: those answered, by outcome, and the
        time taken, for each of C{commands} and L{INVALID}.
        """
        registry = self.registry
        command_seconds = Histogram(
            "openclaw_control_command_seconds",
            "Time to answer state-changing control commands",
            ["cmd"],
            registry=registry,
        )
        answered = Counter(
            "openclaw_control_commands",
            "Control-plane messages answered, by command and outcome",
            ["cmd", "outcome"],
            registry=registry,
        )
        names = [*commands, INVALID]
        # Every command's children made now: each series is exported (at 0) from the start.
        self._commands: dict[str, dict[str, Counter]] = {outcome: {} for outcome in OUTCOMES}
        for cmd in names:
            for outcome in OUTCOMES:
                self._commands[outcome][cmd] = answered.labels(cmd, outcome)
        self._command_seconds = {cmd: command_seconds.labels(cmd) for cmd in names}

    def command(self, cmd: str, outcome: str) -> None:
        """
        Count one control-plane message answered: C{cmd} one of the
        commands given at construction or L{INVALID}, C{outcome} one of
        L{OUTCOMES}.
        """
        self._commands[outcome][cmd].inc()

    def commands_answered(self, outcome: str) -> Mapping[str, Counter]:
        """
        The counters of L{command} for C{outcome} (one of L{OUTCOMES}), by
        command: for a caller that counts every message (the control
        plane's C{ping} and C{status}), one lookup and C{inc}.
        """
        return self._commands[outcome]

    def command_took(self, cmd: str, seconds: float) -> None:
        """
        A state-changing command C{cmd} took C{seconds}, from its message
        read to its answer made.
        """
        self._command_seconds[cmd].observe(seconds)

    def auth_failed(self, reason: str) -> None:
        """
        Count one failed authentication, C{reason} one of
        L{AUTH_REASONS}.
        """
        self._auth_failures[reason].inc()

    def refused_connection(self, reason: ControlRefusal) -> None:
        """
        Count one control connection refused, or failed before it opened.
        """
        self._refused[reason].inc()

    def refused_api_connection(self, reason: APIRefusal) -> None:
        """
        Count one API connection closed as it opened, or to make room.
        """
        self._api_refused[reason].inc()

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

    def _watch_failover(
        self, providers: Iterable[str], breaker: Callable[[str], CircuitBreaker]
    ) -> Callable[[str, str, str], None]:
        """
        Export C{openclaw_provider_breaker_open{provider}} (1 while the
        provider's circuit breaker is open, read when scraped) and
        C{openclaw_provider_breaker_state{provider,state}} for each of
        C{providers}, their breakers found by C{breaker}, and
        C{openclaw_api_fallbacks_total{from,to,reason}}; returns the
        function that counts one failover.
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
        for provider in providers:
            gauge.labels(provider).set_function(partial(_breaker_in, breaker, provider, BreakerState.OPEN))
            for state in BreakerState:
                states.labels(provider, state).set_function(partial(_breaker_in, breaker, provider, state))
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


def _breaker_in(breaker: Callable[[str], CircuitBreaker], provider: str, state: BreakerState) -> float:
    return 1.0 if breaker(provider).state is state else 0.0


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
    @param exposition: under C{--workers}, what a scrape is answered with
        once the checks passed: every worker's series
        (L{openclaw.cluster.scrape.WorkersExposition.exposition}, in the
        text format); L{None} (one process): C{metrics}' registry, at
        once.
    """

    isLeaf = True

    def __init__(
        self,
        metrics: GatewayMetrics,
        allowlist: PeerAllowlist,
        allowed_hosts: Iterable[str] = (),
        exposition: Callable[[], Deferred[bytes]] | None = None,
    ) -> None:
        super().__init__()
        self._metrics = metrics
        self._allowlist = allowlist
        self._allowed_hosts = frozenset(("localhost", *allowed_hosts))
        self._exposition = exposition

    def render(self, request: Request) -> bytes | int:
        """
        C{GET} and C{HEAD}; any other method gets a plain 405 with C{Allow}
        (RFC 9110 section 15.5.6), not twisted.web's HTML 405 or 501.
        """
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"method not allowed: /metrics answers GET and HEAD\n"
        answer = self.render_GET(request)
        return answer if isinstance(answer, int) else head_or_body(request, answer)

    def render_GET(self, request: Request) -> bytes | int:
        host = peer_host(request.getClientAddress())
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
        if self._exposition is not None:
            return self._answer_later(request, self._exposition())
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self._metrics.registry)

    def _answer_later(self, request: Request, exposition: Deferred[bytes]) -> int:
        """
        Answer C{request} with C{exposition} once it fires (C{HEAD}: its
        length only), unless the client has gone by then; a failure (a bug:
        a sibling's absence is not one) is a plain 500, logged.
        """
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def answer(body: bytes) -> None:
            if gone:
                return
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            # Its length, as the single process's answer has (not chunked).
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(head_or_body(request, body))
            request.finish()

        def failed(reason: Failure) -> None:
            _log.failure("could not gather the workers' metrics", reason)
            if gone:
                return
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.write(head_or_body(request, b"the workers' metrics could not be gathered: see the gateway's log\n"))
            request.finish()

        exposition.addCallbacks(answer, failed)
        return NOT_DONE_YET

    def _host_allowed(self, request: Request) -> bool:
        header = request.getHeader(b"host")
        if header is None:
            return True  # HTTP/1.0 without Host: not a browser
        name = _host_name(header.decode("latin-1"))
        if name in self._allowed_hosts:
            return True
        try:
            address = normalise(name)
        except ValueError:
            return False
        if address.is_loopback:
            return True
        own = peer_host(request.getHost())
        return own is not None and _same_address(own, address)

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
    return without_port(header.strip().lower()).rstrip(".")


def _same_address(own: str, address: IPAddress) -> bool:
    try:
        return normalise(own) == address
    except ValueError:
        return False


@implementer(IAgent)
class MeasuredAgent:
    """
    An agent that counts every request it sends for one provider by status
    and times it to the response headers: each provider's adapter is
    given its own, around the one agent (and connection pool) they all
    share, so health probes, models listings and model calls are counted
    alike without the adapter knowing, and under the provider that sent
    them whatever their URLs.

    @param provider: the provider id the requests are counted under.
    @param clock: seconds, as C{IReactorTime.seconds}.
    """

    def __init__(self, agent: IAgent, tally: RequestTally, provider: str, clock: Callable[[], float]) -> None:
        self._agent = agent
        self._tally = tally
        self.provider = provider
        self._clock = clock

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: IBodyProducer | None = None
    ) -> Deferred[IResponse]:
        d = self._agent.request(method, uri, headers, bodyProducer)
        return d.addBoth(self._measured, self._clock())

    def _measured(self, result: IResponse | Failure, started: float) -> IResponse | Failure:
        status = "error" if isinstance(result, Failure) else result.code
        self._tally.record(self.provider, status, self._clock() - started)
        return result


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
    bounded by the consumers made; labelled children are resolved once
    and kept by label values.

    @param registry: where the families are registered; None for nowhere.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._requests = Counter(
            "openclaw_consumer_requests",
            "Model calls by consumer and HTTP status (limited ones included)",
            ["consumer", "status"],
            registry=registry,
        )
        self._tokens = Counter(
            "openclaw_consumer_tokens",
            "Tokens by consumer and kind (prompt, completion, reasoning; reasoning is part of completion)",
            ["consumer", "kind"],
            registry=registry,
        )
        self._spend = Counter(
            "openclaw_consumer_spend_usd",
            "Spend in US dollars by consumer (priced models only)",
            ["consumer"],
            registry=registry,
        )
        self._limited = Counter(
            "openclaw_consumer_limited",
            "Calls refused by a consumer's limits, by consumer and reason",
            ["consumer", "reason"],
            registry=registry,
        )
        self._registry = registry
        #: The children of each family, by label values.
        self._request_children: dict[tuple[str, int], Counter] = {}
        self._token_children: dict[tuple[str, str], Counter] = {}
        self._spend_children: dict[str, Counter] = {}
        self._limited_children: dict[tuple[str, str], Counter] = {}

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
        """
        Count one call of C{consumer} answered with the HTTP C{status}.
        """
        child = self._request_children.get((consumer, status))
        if child is None:
            child = self._request_children[(consumer, status)] = self._requests.labels(consumer, str(status))
        child.inc()

    def tokens(self, consumer: str, prompt: int, completion: int, reasoning: int) -> None:
        """
        Count one call's tokens (whole numbers, 0 for none).
        """
        if prompt:
            self._add_tokens(consumer, "prompt", prompt)
        if completion:
            self._add_tokens(consumer, "completion", completion)
        if reasoning:
            self._add_tokens(consumer, "reasoning", reasoning)

    def _add_tokens(self, consumer: str, kind: str, count: int) -> None:
        child = self._token_children.get((consumer, kind))
        if child is None:
            child = self._token_children[(consumer, kind)] = self._tokens.labels(consumer, kind)
        child.inc(count)

    def spend(self, consumer: str, usd: float) -> None:
        """
        Count C{usd} US dollars spent by C{consumer} (0 or more).
        """
        child = self._spend_children.get(consumer)
        if child is None:
            child = self._spend_children[consumer] = self._spend.labels(consumer)
        child.inc(usd)

    def limited(self, consumer: str, reason: str) -> None:
        """
        Count one call of C{consumer} refused by its limits, C{reason} the
        refusal's error code.
        """
        child = self._limited_children.get((consumer, reason))
        if child is None:
            child = self._limited_children[(consumer, reason)] = self._limited.labels(consumer, reason)
        child.inc()
