"""
The configured providers, the HTTP client under them (treq on Twisted's
C{Agent}, over one pool of persistent connections they share), and the
health check across all of them.

Probes for one provider are coalesced: callers that ask while a probe is in
flight wait for that probe instead of starting their own, so a burst of
health checks costs one upstream request per provider.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from http.cookiejar import DefaultCookiePolicy
from typing import Any

import attrs
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent, IAgentEndpointFactory

from openclaw.deferreds import InFlight
from openclaw.providers.base import ProbeResult, ProviderAdapter
from openclaw.providers.endpoints import CachedEndpoints, HeadLimitedEndpoints, https_policy
from openclaw.providers.errors import UnknownProvider
from openclaw.providers.keys import rest_scope
from openclaw.providers.wire import OfferedTools
from openclaw.reactors import IClientReactor
from openclaw.settings import Settings
from openclaw.timefmt import isoformat


def adapter_state(adapter: ProviderAdapter) -> dict[str, Any]:
    """
    C{{"breaker": "closed", "keys": {<fingerprint>: "ok" | "resting" | "resting for <model>" | "set_aside"}}}
    (L{KeyPool.states <openclaw.providers.keys.KeyPool.states>}),
    with C{"configured": false} for a provider without a key
    (L{ProviderAdapter.configured}).
    """
    state: dict[str, Any] = {"breaker": str(adapter.breaker.state), "keys": adapter.keys.states()}
    if not adapter.configured:
        state["configured"] = False
    return state


@attrs.define
class ProviderRegistry:
    """
    The providers by id.  Build it with L{from_settings} when the service
    starts and L{close} it when the service stops.
    """

    _adapters: tuple[ProviderAdapter, ...]
    reactor: IReactorTime = attrs.field(repr=False)
    #: The persistent connections under every adapter's agent, closed by
    #: L{close}.
    pool: HTTPConnectionPool | None = attrs.field(default=None, repr=False)
    #: The providers failed-over calls go to, in the order tried
    #: (L{Settings.fallback_order <openclaw.settings.Settings.fallback_order>});
    #: None: every provider, in their order.
    fallback_order: tuple[str, ...] | None = None
    #: Per provider id, the probe in flight, which its callers wait for.
    _probing: dict[str, InFlight[ProbeResult]] = attrs.field(factory=dict, init=False, repr=False)
    #: Probes under way, cancelled by L{close} so none outlives the service.
    _running: set[Deferred[ProbeResult]] = attrs.field(factory=set, init=False, repr=False)
    #: The adapters' ids, read on every model call.
    _ids: tuple[str, ...] = attrs.field(init=False, repr=False)
    #: The tool types beside functions their wires take, read on every
    #: chat call (L{openclaw.providers.wire.Wire.tool_types}).
    offered_tools: OfferedTools = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._ids = tuple(adapter.id for adapter in self._adapters)
        self.offered_tools = OfferedTools.of((adapter.id, adapter.wire) for adapter in self._adapters)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        reactor: IClientReactor,
        *,
        wrap_agent: Callable[[IAgent, str], IAgent] | None = None,
        endpoints: IAgentEndpointFactory | None = None,
        pool_size: int | None = None,
        on_rest: Callable[[str, str, float, str | None], None] | None = None,
    ) -> ProviderRegistry:
        """
        Every provider C{settings.providers} holds (in its order), sharing
        one pool of persistent connections
        (C{UPSTREAM_POOL_SIZE} idle ones kept per host, each for at most
        C{UPSTREAM_IDLE_SECONDS}).

        @param reactor: what the connections are made with (TCP, host
            names resolved, timers: L{IClientReactor}).
        @param wrap_agent: called with the one agent every provider request
            goes through and a provider's id, gives the agent that
            provider's adapter uses (for its models listings and model
            calls alike), to measure them.
        @param endpoints: where connections go; by default L{CachedEndpoints}
            checking https certificates against C{UPSTREAM_CA_FILE}, else
            the system's trust store, TCP connections bounded by
            C{UPSTREAM_CONNECT_TIMEOUT} (TLS handshakes are, whatever
            C{endpoints}).
        @param pool_size: idle connections kept per host, when the
            process's descriptors allow fewer than C{UPSTREAM_POOL_SIZE}
            (L{openclaw.listeners.DescriptorShares.pool_per_host}).
        @param on_rest: told (provider id, key fingerprint, seconds, model or
            None) of every key rest any provider's key pool decides (a cluster's store
            shares them: L{openclaw.cluster.node.ClusterNode.rest}).
        """
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = settings.upstream_pool_size if pool_size is None else pool_size
        # Twisted annotates it as int; it is a callLater delay, any float.
        pool.cachedConnectionTimeout = settings.upstream_idle_seconds  # type: ignore[assignment]
        if endpoints is None:
            endpoints = CachedEndpoints(
                reactor, https_policy(settings.upstream_ca_pem), connect_timeout=settings.upstream_connect_timeout
            )
        connecting = HeadLimitedEndpoints(endpoints, (reactor, settings.upstream_connect_timeout))
        shared: IAgent = Agent.usingEndpointFactory(reactor, connecting, pool=pool)
        adapters = []
        for provider_id, configured in settings.providers.items():
            agent = shared if wrap_agent is None else wrap_agent(shared, provider_id)
            # No cookies kept: a provider's cookie set on one listing would
            # be sent back with the next (treq keeps a jar per client), and
            # no provider API needs one.
            http = HTTPClient(agent, cookiejar=IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=())))
            adapters.append(configured.adapter.from_settings(settings, http, reactor, agent, on_rest=on_rest))
        return cls(
            tuple(adapters),
            reactor,
            pool=pool,
            fallback_order=settings.fallback_order or (),
        )

    @property
    def ids(self) -> tuple[str, ...]:
        return self._ids

    def __iter__(self) -> Iterator[ProviderAdapter]:
        return iter(self._adapters)

    def get(self, provider_id: str) -> ProviderAdapter:
        """
        @raise UnknownProvider: no provider has this id.
        """
        for adapter in self._adapters:
            if adapter.id == provider_id:
                return adapter
        raise UnknownProvider(f"unknown provider {provider_id!r}; use one of: {', '.join(self.ids)}")

    def probe(self, provider_id: str) -> Deferred[ProbeResult]:
        """
        Probe one provider, joining the probe in flight if there is one.
        Each caller gets its own L{Deferred}, so one caller's callbacks (or
        cancellation) cannot touch what the others receive.
        """
        adapter = self.get(provider_id)
        probing = self._probing.get(provider_id)
        if probing is None:
            # Registered before probing: a probe may fire at once (no key).
            probing = self._probing[provider_id] = InFlight()
            self._start(adapter).addBoth(self._settle, provider_id, probing)
        return probing.observe()

    def _start(self, adapter: ProviderAdapter) -> Deferred[ProbeResult]:
        probe = adapter.probe()
        if not probe.called:
            self._running.add(probe)
            probe.addBoth(self._finished, probe)
        return probe

    def _finished(self, result: Any, probe: Deferred[ProbeResult]) -> Any:
        self._running.discard(probe)
        return result

    def _settle(self, result: ProbeResult | Failure, provider_id: str, probing: InFlight[ProbeResult]) -> None:
        del self._probing[provider_id]
        probing.end(result)

    def health_check(self, active_id: str, active_model: str) -> Deferred[dict[str, Any]]:
        """
        Probe every provider at once (wall time is the slowest probe, each
        bounded by its timeout) and report::

            {"active": "kimi", "checked_at": "2026-11-25T02:39:29Z",
             "providers": {"kimi": {"ok": ..., "latency_ms": ..., "status": ...,
                                    "models": ..., "active_model_available": ...,
                                    "error": ...}, "gemini": {...}}}

        C{active_model_available} is about C{active_model} for the active
        provider and about each other provider's default model.  A provider
        without a key is not probed: its entry says C{"configured": false},
        C{"ok": false} and which variable to set.
        """
        self.get(active_id)
        probes = [self.probe(provider_id) for provider_id in self.ids]
        d = gatherResults(probes, consumeErrors=True)
        return d.addCallback(self._report, active_id, active_model)

    def _report(self, results: Iterable[ProbeResult], active_id: str, active_model: str) -> dict[str, Any]:
        providers = {}
        for adapter, result in zip(self._adapters, results, strict=True):
            model = active_model if adapter.id == active_id else adapter.default_model
            entry = result.report(adapter.has_model(result.models, model))
            entry.update(adapter_state(adapter))
            providers[adapter.id] = entry
        return {
            "active": active_id,
            "checked_at": isoformat(self.reactor.seconds()),
            "providers": providers,
        }

    def states(self) -> dict[str, dict[str, Any]]:
        """
        Per provider id, its breaker and keys now (no request made)::

            {"kimi": {"breaker": "closed", "keys": {"1a2b3c4d": "ok"}}, ...}
        """
        return {adapter.id: adapter_state(adapter) for adapter in self._adapters}

    def fallback_for(self, provider_id: str) -> ProviderAdapter | None:
        """
        Where a call failing on C{provider_id} may go: the next provider of
        L{fallback_order} after C{provider_id} (wrapping round; from the
        first when C{provider_id} is not in it) that has a usable key and
        whose breaker would let a call through; None when there is none.
        """
        order = self._ids if self.fallback_order is None else self.fallback_order
        start = order.index(provider_id) + 1 if provider_id in order else 0
        for step in range(len(order)):
            candidate = order[(start + step) % len(order)]
            if candidate == provider_id:
                continue
            adapter = self.get(candidate)
            if adapter.keys.available_for(adapter.failover_model) and adapter.breaker.would_allow():
                return adapter
        return None

    def fallback_waits(
        self, provider_id: str, models: Mapping[str, str] | None = None
    ) -> list[tuple[ProviderAdapter, float]]:
        """
        The providers a call failing on C{provider_id} may go to, in
        L{fallback_order}, each with the seconds until it may take one: its
        breaker's cooldown left, or its keys' rest (L{KeyPool.back_in}) for
        the model the call would ask of it (its C{failover_model}, unless
        C{models} names another for it: provider id -> model), whichever is
        longer; 0 when it may now.  Those that will not by themselves (no
        key set, every key refused) are left out.
        """
        order = self._ids if self.fallback_order is None else self.fallback_order
        waits = []
        for candidate in order:
            if candidate == provider_id:
                continue
            adapter = self.get(candidate)
            keys = adapter.keys
            if not keys.keys:
                continue
            model = adapter.failover_model if models is None else models.get(candidate, adapter.failover_model)
            rest = 0.0 if keys.available_for(model) else keys.back_in(model)
            if rest is not None:
                waits.append((adapter, max(rest, adapter.breaker.remaining())))
        return waits

    def rest_key(self, subject: str, key_fingerprint: str, seconds: float) -> None:
        """
        Rest a key another instance was answered 429 with, for what
        C{subject} names (L{rest_subject <openclaw.providers.keys.rest_subject>}:
        a provider, or one of its models); unknown providers and keys are
        ignored (another gateway's configuration may differ).
        """
        provider_id, model = rest_scope(subject)
        for adapter in self._adapters:
            if adapter.id == provider_id:
                adapter.keys.rest_shared(key_fingerprint, seconds, model)

    def close(self) -> Deferred[None]:
        """
        Cancel the probes and key checks under way (their callers get a
        failed report; their connections are dropped) and close the pool's
        idle connections; fires once those are closed.  Chat calls in flight are the data
        plane's to end first (a stop drains them, then closes their clients'
        connections, which cancels them).
        """
        for probe in list(self._running):
            probe.cancel()
        for adapter in self._adapters:
            adapter.cancel_key_checks()
        if self.pool is None:
            return succeed(None)
        closed: Deferred[None] = self.pool.closeCachedConnections()
        return closed
