"""
One gateway instance's part in a cluster (L{ClusterNode}): it keeps the
instance's route and session token equal to the cluster's, writes
C{switch_provider} and C{rotate_token} to the shared store before applying
them, and carries on with the last state it knew while the store is away.

Plain object: the store (L{openclaw.cluster.store.SharedStore}) and a clock
are given; no socket here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, gatherResults, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from openclaw.cluster.store import SharedStore, Versioned
from openclaw.routing import ActiveRoute, Route
from openclaw.session import SessionAuthority, SessionToken

ROUTE = "route"
TOKEN = "token"
#: An instance counts in C{instances_seen} for this long after its last heartbeat.
HEARTBEAT_TTL_SECONDS = 30
HEARTBEAT_INTERVAL_SECONDS = 10.0

#: What a state-changing command answers when its change cannot be written
#: to the store: nothing was applied anywhere, not even here.
UNAVAILABLE = "cluster store unavailable: nothing changed"


class StoreUnavailable(Exception):
    """
    The shared store could not take a change (down, slow, or this instance
    has not reloaded since it came back); nothing changed.
    """

    def __init__(self) -> None:
        super().__init__(UNAVAILABLE)


def encode_route(route: Route) -> str:
    return json.dumps({"provider": route.provider_id, "model": route.model})


def encode_token(token: SessionToken) -> str:
    return json.dumps({"token": token.token, "jti": token.jti, "iat": token.issued_at, "exp": token.expires_at})


class ClusterNode:
    """
    Keeps this instance in step with the cluster.

    @ivar up: the store is reachable and this instance has reloaded the
        cluster's state since it last came back: state-changing commands
        are taken only then.
    @ivar instances_seen: instances with a heartbeat in the last
        L{HEARTBEAT_TTL_SECONDS} (this one included), as of the last beat.
    """

    _log = Logger(namespace="openclaw.cluster")

    def __init__(
        self,
        store: SharedStore,
        route: ActiveRoute,
        sessions: SessionAuthority,
        instance: str,
        reactor: IReactorTime,
        timeout: float,
        provider_ids: tuple[str, ...],
        on_token: Callable[[SessionToken, bool], None] = lambda token, here: None,
        on_up: Callable[[bool], None] = lambda up: None,
        on_rest: Callable[[str, str, float], None] = lambda provider, key, seconds: None,
        on_lock: Callable[[str, float], None] = lambda key, seconds: None,
    ) -> None:
        self.store = store
        self.route = route
        self.sessions = sessions
        self.instance = instance
        self._reactor = reactor
        self._timeout = timeout
        self._provider_ids = frozenset(provider_ids)
        self._on_token = on_token
        self._on_up = on_up
        self._on_rest = on_rest
        self._on_lock = on_lock
        self.up = False
        self.instances_seen = 1
        self.versions: dict[str, int] = {}
        self._connected = False
        self._heartbeat = LoopingCall(self.beat)
        self._heartbeat.clock = reactor

    def _bounded(self, pending: Deferred[Any]) -> Deferred[Any]:
        return pending.addTimeout(self._timeout, self._reactor)

    # The store's connection.

    def connected(self) -> Deferred[None]:
        """
        The store is reachable (again): reload the cluster's route and
        token (writing back the ones this instance knows if the store lost
        them), then take state-changing commands again.
        """
        self._connected = True
        return self._reload()

    def lost(self) -> None:
        """
        The store went away: keep serving with what is known, refuse
        changes.
        """
        self._connected = False
        self._set_up(False)

    def _set_up(self, up: bool) -> None:
        if up == self.up:
            return
        self.up = up
        if up:
            self._log.info(
                "cluster store up: route {route}, token {jti}; taking state-changing commands",
                route=f"{self.route.current.provider_id}/{self.route.current.model}",
                jti=self.sessions.current.jti,
            )
        else:
            self._log.warn(
                "cluster store unreachable: serving with the last known route and token; "
                "switch_provider and rotate_token are refused until it is back"
            )
        self._on_up(up)

    @inlineCallbacks
    def _reload(self) -> Any:
        before = dict(self.versions)
        try:
            route = yield self._bounded(
                self.store.ensure(ROUTE, encode_route(self.route.current), self.versions.get(ROUTE, 1))
            )
            current = self.sessions.current_or_none
            if current is None:
                # Proposed as the cluster's first token; kept only if the
                # cluster has none (set-if-absent): an instance never
                # replaces the cluster's token on its own.
                current = self.sessions.mint()
            token = yield self._bounded(self.store.ensure(TOKEN, encode_token(current), self.versions.get(TOKEN, 1)))
        except Exception as e:
            self._log.warn("could not reload the cluster's state: {error}; retrying", error=str(e) or repr(e))
            if self._connected:
                self._reactor.callLater(min(self._timeout, 1.0), self._retry_reload)
            return
        for name, versioned in ((ROUTE, route), (TOKEN, token)):
            known = self.versions.get(name)
            if known != before.get(name) and known is not None and known > versioned.version:
                continue  # a newer write arrived while reloading
            self._apply(name, versioned, reloading=True)
        # Before listening: a lockout decided while this instance was away
        # holds from its first connection.
        yield self._reload_expiring()
        if self._connected:
            self._set_up(True)
            self.beat()

    def _reload_expiring(self) -> Deferred[Any]:
        """
        Take the key rests and lockouts the cluster holds now (decided
        while this instance was away or not yet started); best effort.
        """

        def rests(found: dict[tuple[str, str], float]) -> None:
            for (provider, key_fingerprint), seconds in found.items():
                self._on_rest(provider, key_fingerprint, seconds)

        def lockouts(found: dict[str, float]) -> None:
            for key, seconds in found.items():
                self._on_lock(key, seconds)

        def failed(failure: Failure) -> None:
            self._log.warn(
                "could not reload the cluster's key rests and lockouts: {error}",
                error=failure.getErrorMessage() or repr(failure.value),
            )

        return gatherResults(
            [
                self._bounded(self.store.resting()).addCallbacks(rests, failed),
                self._bounded(self.store.lockouts()).addCallbacks(lockouts, failed),
            ]
        )

    def _retry_reload(self) -> None:
        if self._connected and not self.up:
            self._reload()

    def received(self, name: str, version: int, value: str) -> None:
        """
        Another write (from any instance, this one included) was published.
        """
        if version > self.versions.get(name, 0):
            self._apply(name, Versioned(version, value))

    def rested(self, origin: str, provider: str, key_fingerprint: str, seconds: float) -> None:
        """
        An instance rested a provider key after a 429.
        """
        if origin != self.instance:
            self._on_rest(provider, key_fingerprint, seconds)

    def locked(self, origin: str, key: str, seconds: float) -> None:
        """
        An instance locked client C{key} out for C{seconds}.
        """
        if origin != self.instance:
            self._on_lock(key, seconds)

    def count_failure(self, key: str, window: float, failures: int, duration: float, lock: bool) -> Deferred[bool]:
        """
        Count a failed authentication across the cluster (see
        L{SharedStore.count_failure}); fires with L{False} at once while
        the store is away (the instance's own count stands alone then).
        """
        if not self.up:
            return succeed(False)
        counted: Deferred[bool] = self._bounded(self.store.count_failure(key, window, failures, duration, lock))
        return counted.addErrback(lambda failure: False)

    def _apply(self, name: str, versioned: Versioned, reloading: bool = False, here: bool = False) -> None:
        try:
            document = json.loads(versioned.value)
            if name == ROUTE:
                route = Route(str(document["provider"]), str(document["model"]))
                if route.provider_id not in self._provider_ids:
                    raise ValueError(f"unknown provider {route.provider_id!r}")
                self.versions[name] = versioned.version
                previous = self.route.switch(route)
                if previous != route and not here:
                    self._log.info(
                        "applied the cluster's route {route} (version {version}); was {previous}",
                        route=f"{route.provider_id}/{route.model}",
                        previous=f"{previous.provider_id}/{previous.model}",
                        version=versioned.version,
                    )
            elif name == TOKEN:
                token = SessionToken(
                    token=str(document["token"]),
                    jti=str(document["jti"]),
                    issued_at=int(document["iat"]),
                    expires_at=int(document["exp"]),
                )
                self.versions[name] = versioned.version
                current = self.sessions.current_or_none
                if current is None or current.jti != token.jti:
                    self.sessions.adopt(token)
                    self._on_token(token, here)
        except (ValueError, KeyError, TypeError) as e:
            self._log.error(
                "ignoring the cluster's {name} (version {version}): {error}",
                name=name,
                version=versioned.version,
                error=str(e),
            )

    # State-changing commands.

    def switch(self, route: Route) -> Deferred[Route]:
        """
        Write C{route} to the store, then apply it here; fire with the
        route it replaced.

        @raise StoreUnavailable: (as a failure) it could not be written.
        """
        return self._write(ROUTE, encode_route(route)).addCallback(lambda _: self.route.current)

    def rotate(self, token: SessionToken) -> Deferred[SessionToken]:
        """
        Make C{token} the cluster's session token; fire with it once
        written and adopted here.
        """
        return self._write(TOKEN, encode_token(token)).addCallback(lambda _: token)

    def _write(self, name: str, value: str) -> Deferred[None]:
        def written(version: int) -> None:
            if version > self.versions.get(name, 0):
                self._apply(name, Versioned(version, value), here=True)

        def failed(failure: Failure) -> Failure:
            self._log.warn(
                "could not write {name} to the cluster store: {error}; nothing changed",
                name=name,
                error=failure.getErrorMessage() or repr(failure.value),
            )
            return Failure(StoreUnavailable())

        if not self.up:
            self._log.warn("{name} not written: the cluster store is unreachable; nothing changed", name=name)
            return fail(StoreUnavailable())
        return self._bounded(self.store.write(name, value)).addCallbacks(written, failed)

    def rest(self, provider: str, key_fingerprint: str, seconds: float) -> None:
        """
        Tell the cluster a key rests (best effort: a failure leaves the rest
        on this instance only).
        """
        if not self.up:
            return
        self._bounded(self.store.rest(provider, key_fingerprint, seconds)).addErrback(
            lambda failure: self._log.debug("key rest not shared: {error}", error=failure.getErrorMessage())
        )

    # Heartbeats.

    def start(self) -> None:
        self._heartbeat.start(HEARTBEAT_INTERVAL_SECONDS, now=True).addErrback(
            lambda failure: self._log.failure("heartbeat stopped", failure)
        )

    def stop(self) -> None:
        if self._heartbeat.running:
            self._heartbeat.stop()

    def beat(self) -> None:
        def seen(count: int) -> None:
            self.instances_seen = max(1, int(count))

        self._bounded(self.store.heartbeat(self.instance, HEARTBEAT_TTL_SECONDS)).addCallbacks(
            seen, lambda failure: None
        )
