"""
One gateway instance's part in a cluster (L{ClusterNode}): it keeps the
instance's route and session token equal to the cluster's, writes
C{switch_provider} and C{rotate_token} to the shared store before applying
them, and carries on with the last state it knew while the store is away.

When the store lost the state (Redis restarted empty, C{FLUSHALL},
C{FLUSHDB}, an eviction), the instances that knew it write it back, and a
newcomer never overrides them; the rule (L{ClusterNode._outranks}):

 - an instance that has never been in step with the cluster (just
   started) proposes its configured route and a fresh token at version 1,
   set only if the store holds none, and otherwise takes what it holds;
   but when the store lacks either and the instance was in step with
   this cluster in an earlier run (L{ClusterNode.was_in_step}: a file in
   C{STATE_DIR}), or instances in step are alive (their heartbeats), the
   store lost the state: it first waits, up to
   L{ClusterNode.write_back_grace}, for one of them to write it back,
   and takes that (an instance restarted during a
   Redis outage reached the emptied store first and served its configured
   route and a token of its own for a second or two);
 - an instance that has been in step (it knows a version of the route or
   token) and finds in the store a different value at a LOWER version
   than it knows writes back its own (a write one version above both, so
   every instance, the newcomer included, applies it);
 - at the SAME version: a value set by a switch, rotation, renewal or
   first proposal wins over one written back (its record marked
   C{"restored": true}: L{is_restored}), so an instance that missed a
   switch or rotation cannot undo it by writing its old value back;
   between two of a kind, for the token, the one issued earlier (C{iat},
   then its record's C{at}, to the millisecond, then C{jti}:
   L{token_rank}) wins, so a token minted by a newcomer loses to the one
   the operators hold, even one minted within the same second; for the
   route, the one set earlier (its record's
   C{at}: L{route_rank}) wins, so the route the cluster served before the
   loss wins over a newcomer's configured one; when only one of the two
   route or token records has an C{at} (the other written by an earlier
   version), the one the instance holds wins, as only the other can have been
   written after the loss.  A token the instance cannot verify (another
   C{JWT_SECRET}) is written over by an instance in step that has not
   refused the cluster's token before, so that its own can be renewed;
   one that has refused it never writes its own back (no war).  The instance holding the
   winner writes it back (one version above), the others adopt it; as
   every instance ranks any two values alike, two of them never write
   back in turn (no write-back war);
 - a HIGHER version in the store is the cluster's latest change: applied.

Each heartbeat also reads the store's versions and values (one round
trip): a version lower than the instance knows (0: the key is gone) means
the store lost it; the version it knows with a value it does not hold (a
token of another C{jti}, another route record) means the store lost it
and a newcomer that reached it first wrote its own at that version.
Either way the instance reloads at once, writing back what it knows or
adopting what the store holds by the same rule.  The heartbeat also reads
the counters of the consumer changes and of the key rests and lockouts
(L{openclaw.cluster.redis.CHANGES}): when one moved since the last beat
the instance reloads its consumers, or the rests and lockouts in force,
so that one whose subscription went silent misses none for longer than a
heartbeat.  And it reads Redis's clock: the cluster's decisions (the
session token's expiry and renewal, the records' C{at}, the consumers'
windows, budget periods and key expiries) go by it
(L{ClusterClock}), never by a host's clock that may be off.

When it comes up, and at a heartbeat once a minute
(L{NAMESAKE_CHECK_SECONDS}), the instance also asks the store in which
other databases of the same Redis instances of its C{CLUSTER_NAME} listen
(L{ClusterNode.other_databases}): a database mistyped in one
C{REDIS_URL} makes a second cluster of the same name, which nothing else
would say.  A warning, never a refusal.

Plain object: the store (L{openclaw.cluster.store.SharedStore}) and a clock
are given; no socket here.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import attrs
from twisted.application.internet import backoffPolicy
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    fail,
    gatherResults,
    inlineCallbacks,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from openclaw.cluster.clock import ClusterClock
from openclaw.cluster.records import (
    ROUTE,
    TOKEN,
    decode_token,
    encode_route,
    encode_token,
    is_restored,
    provenance,
    record_at,
    record_identity,
    renewal_time,
    route_rank,
    token_rank,
)
from openclaw.cluster.store import Heartbeat, SharedStore, Versioned, WriteRefused
from openclaw.deferreds import InFlight
from openclaw.loops import LoggedFailures, LoggedStep
from openclaw.routing import ActiveRoute, Route, model_refusal
from openclaw.session import SessionAuthority, SessionToken, TokenFileUnwritable, UntrustedToken

#: An instance counts in C{instances_seen} for this long after its last heartbeat.
HEARTBEAT_TTL_SECONDS = 30
HEARTBEAT_INTERVAL_SECONDS = 10.0
#: Reads of the route (or the token) L{ClusterNode._reload} makes in a row
#: while each is answered after a change applied meanwhile (stale); past
#: them it gives up until its next try (L{StaleReads}).
MAX_STALE_READS = 5
#: Heartbeats failed in a row after which the store's connections are
#: deemed dead and rebuilt (L{SharedStore.reconnect}).
HEARTBEAT_MISSES = 2
#: How often (seconds) an instance in step looks for instances of its
#: C{CLUSTER_NAME} in other databases of the same Redis
#: (L{ClusterNode.other_databases}): when it comes up (starts, or is back
#: after an outage), then at the first heartbeat after this long.
NAMESAKE_CHECK_SECONDS = 60.0
#: The first wait before a failed reload is tried again, in seconds (at
#: most REDIS_TIMEOUT_SECONDS); it doubles up to the node's C{retry_max}.
RELOAD_RETRY_SECONDS = 1.0
#: How often (seconds) an instance waiting for the cluster's state to be
#: written back into an empty store looks again (L{ClusterNode.was_in_step}).
WRITE_BACK_POLL_SECONDS = 1.0


def unavailable(where: str = "") -> str:
    """
    What a state-changing command answers when its change cannot be written
    to the store at C{where} (its address, for the operator: no password):
    nothing was applied anywhere, not even here.
    """
    at = f" at {where}" if where else ""
    return f"cluster store{at} unavailable: nothing changed; retry once it is reachable"


#: L{unavailable} for a store of no known address.
UNAVAILABLE = unavailable()

#: What it answers when a write timed out and the store could not be asked
#: (L{CONFIRM_ATTEMPTS} times) whether it happened: it may yet apply on
#: every instance (this one included), or on none; never on some only.
UNCONFIRMED = "cluster store did not confirm the change in time: it may have been applied on every instance"

#: What to do then, by what was written: the route is seen with
#: C{status}; a token rotated may have revoked the one the operator holds,
#: with which C{status} would count as a failed authentication (toward
#: AUTH_LOCKOUT_FAILURES), so the token file is read instead (each
#: instance writes the token it adopts to its TOKEN_FILE).
UNCONFIRMED_HINTS = MappingProxyType(
    {
        ROUTE: (
            "once the store is back (status's cluster_store up), run status before retrying: until then it shows "
            "the route as it was, and the switch may still be made"
        ),
        TOKEN: (
            "once the store is back, read the token in TOKEN_FILE (openclawctl --token-file) or the log's banner "
            "before any other command, as each instance puts a new one there: a command with a revoked token counts "
            "as a failed authentication"
        ),
    }
)

#: What to check when the cluster's token cannot be adopted here (its
#: TOKEN_FILE cannot be written: L{TokenFileUnwritable}).
TOKEN_FILE_ADVICE = "check that TOKEN_FILE's directory is writable and its disk not full"

#: How many times a node asks the store whether a write that timed out
#: happened, each bounded by REDIS_TIMEOUT_SECONDS, before it answers
#: L{UNCONFIRMED}.
CONFIRM_ATTEMPTS = 3


class StaleReads(Exception):
    """
    L{ClusterNode._reload} read the cluster's C{name} L{MAX_STALE_READS}
    times, and each read was answered after another change of it was
    applied here (changes coming faster than a read's round trip): given
    up until its next try, rather than read for ever.
    """

    def __init__(self, name: str) -> None:
        super().__init__(
            f"the cluster's {name} changed during each of {MAX_STALE_READS} reads in a row (changes faster than "
            "the cluster store answers)"
        )


class StoreUnavailable(Exception):
    """
    The shared store could not take a change (down, slow, or this instance
    has not reloaded since it came back); nothing changed.
    """

    def __init__(self, message: str = UNAVAILABLE) -> None:
        super().__init__(message)


class TokenBehind(StoreUnavailable):
    """
    The cluster's session token is not the one this instance holds: it
    has not applied a rotation yet (a stalled process, a late message), so
    the token that authorised the change may be revoked; nothing changed.
    """

    def __init__(self) -> None:
        super().__init__(
            "the cluster's session token has been rotated and this instance has not applied the rotation yet; "
            "nothing changed: read the current token (TOKEN_FILE, or from whoever rotated it) and retry"
        )


class StoreUnconfirmed(StoreUnavailable):
    """
    A write of C{name} (L{ROUTE}, L{TOKEN}) timed out and whether it
    happened could not be learnt: it happened on every instance or on
    none (L{UNCONFIRMED}, and what to do: L{UNCONFIRMED_HINTS}).
    """

    def __init__(self, name: str) -> None:
        super().__init__(f"{UNCONFIRMED}; {UNCONFIRMED_HINTS[name]}")


class TokenNotAdoptedHere(Exception):
    """
    A C{rotate_token} written to the store (so in force on the cluster's
    other instances, the previous token refused there), which this
    instance could not adopt: its TOKEN_FILE could not be written
    (C{error}).  It keeps the previous token until it can, and adopts the
    new one at a heartbeat once it can (L{ClusterNode.beat}).  The message
    says so, and what to do, for the operator who rotated; it never holds
    the token (an error is recorded in the audit log).
    """

    def __init__(self, jti: str, error: str, stopping: bool = False) -> None:
        if stopping:
            # Its write dropped at the stop (or asked after): nothing to fix.
            super().__init__(
                f"the session token was rotated cluster-wide (new token id {jti}: the cluster store holds it, the "
                "other instances adopt it and refuse the previous one), but this instance is stopping and did not "
                "write it to its TOKEN_FILE (the write had not begun when the stop came); do not rotate again: read "
                "the new token from another instance's TOKEN_FILE (openclawctl --token-file)"
            )
            return
        super().__init__(
            f"the session token was rotated cluster-wide (new token id {jti}: the cluster store holds it, the other "
            f"instances adopt it and refuse the previous one), but this instance could not write it to TOKEN_FILE "
            f"({error}), so it keeps accepting the previous token until it can; do not rotate again: fix what stops "
            "the gateway's user writing TOKEN_FILE (a missing or read-only directory, a full disk), and within a "
            f"heartbeat ({HEARTBEAT_INTERVAL_SECONDS:g} s) this instance adopts the new token and writes it there: "
            "read it from TOKEN_FILE then (openclawctl --token-file), or now from another instance's TOKEN_FILE"
        )


@attrs.define
class _Adoption:
    """
    The cluster's token of one C{jti} being adopted (its token file
    written off the reactor thread: L{ClusterNode._apply_token}).

    @ivar flight: what its askers wait for (each on a Deferred of its own).
    @ivar version: the highest version it was asked at: recorded once
        adopted, and counted meanwhile as known (L{ClusterNode._known}).
    @ivar at: that version's record's C{at} (L{record_at}).
    @ivar restored: whether that version's record was written back
        (L{is_restored}).
    """

    flight: InFlight[None]
    version: int
    at: float | None
    restored: bool


def _databases(databases: tuple[int, ...]) -> str:
    """
    C{"database 1"}, C{"databases 1 and 3"}, C{"databases 1, 3 and 7"}.
    """
    if len(databases) == 1:
        return f"database {databases[0]}"
    *first, last = (str(database) for database in databases)
    return f"databases {', '.join(first)} and {last}"


def describe(error: object, timeout: float) -> str:
    """
    What went wrong with a store call, for the log: C{error} as it reads,
    or, for a call bounded by C{timeout} seconds (REDIS_TIMEOUT_SECONDS)
    that got no answer in time, that.
    """
    if isinstance(error, TimeoutError):
        return f"no answer from the cluster store within {timeout:g} s (REDIS_TIMEOUT_SECONDS)"
    return str(error) or repr(error)


class ClusterNode:
    """
    Keeps this instance in step with the cluster.

    @ivar up: the store is reachable and this instance has reloaded the
        cluster's state since it last came back: state-changing commands
        are taken only then.
    @ivar instances_seen: instances with a heartbeat in the last
        L{HEARTBEAT_TTL_SECONDS} (this one included), as of the last beat.
    @ivar up_since: when (C{reactor.seconds}) C{up} last changed, or the
        node was made.
    @ivar down_reason: why the store is down (C{up} false): the last error,
        as logged; None while up.
    @ivar other_databases: the other databases of the store's Redis in
        which instances of this C{CLUSTER_NAME} were listening when this
        instance last looked (L{SharedStore.other_databases}, when it came
        up and every L{NAMESAKE_CHECK_SECONDS} since), ascending; C{()}
        for none, or when the store would not say at the last look.
    @param where: the store's address as an operator knows it (no
        password), for the refusals (L{unavailable}).
    @param on_consumers: called when a heartbeat finds that consumers
        changed since the last one (to reload them: their message may have
        been missed).
    @param on_lost: called when a heartbeat finds that the store lost the
        state this instance knows in place (flushed, evicted, restarted
        under the connection), once it writes that state back: the store's
        other keys went with it; so too when its epoch changed (another
        instance wrote that state back first).
    @param on_writable: called when the store takes a heartbeat again
        after refusing them (out of memory, read-only): what this instance
        counted alone meanwhile goes to it.
    @param clock: the cluster's clock, which the node keeps measured
        (shared with whatever else judges the cluster's state by it).
    @param cluster_name: C{CLUSTER_NAME}, and C{database} the store's
        database (C{REDIS_URL}'s), for the warning about instances of the
        same name in other databases.
    @param on_in_step: called each time this instance is in step with the
        cluster (up: at start, and after each outage), and C{on_route} with
        each route of the cluster's it applies, to record them for the next
        run (L{openclaw.cluster.membership.Membership.record}).
    @ivar was_in_step: this instance was in step with this cluster in an
        earlier run (L{openclaw.cluster.membership.Membership.read}, read
        at start): should it find the store without the route or the
        token (or both) while it has never been in step in this run, the
        store lost them, and it waits up to L{write_back_grace} for an
        instance in step to write them back before it proposes its own.
    @ivar write_back_grace: how long (seconds) that wait lasts at most:
        a heartbeat interval (the instances in step notice a flush at
        their next heartbeat), the reconnection backoff's cap (they notice
        a restart when they reconnect) and two store timeouts.
    @ivar remembered_route: the route this instance last served in the
        cluster in an earlier run (its record in C{STATE_DIR}), or None:
        proposed, rather than the configured one, should it find the
        store without the cluster's route and none write it back (every
        instance restarted with the store: else the cluster comes back
        on DEFAULT_PROVIDER, the operator's switch lost).
    """

    _log = Logger()

    def __init__(
        self,
        store: SharedStore,
        route: ActiveRoute,
        sessions: SessionAuthority,
        instance: str,
        reactor: IReactorTime,
        timeout: float,
        provider_ids: tuple[str, ...],
        on_token: Callable[[SessionToken, bool, str], None] = lambda token, here, origin: None,
        on_up: Callable[[bool], None] = lambda up: None,
        on_rest: Callable[[str, str, float], None] = lambda subject, key, seconds: None,
        on_lock: Callable[[str, float], None] = lambda key, seconds: None,
        on_foreign_token: Callable[[str], None] = lambda error: None,
        retry_max: float = 5.0,
        where: str = "",
        on_consumers: Callable[[], None] = lambda: None,
        on_lost: Callable[[], None] = lambda: None,
        on_writable: Callable[[], None] = lambda: None,
        clock: ClusterClock | None = None,
        cluster_name: str = "openclaw",
        database: int = 0,
        on_in_step: Callable[[], object] = lambda: None,
        on_route: Callable[[Route], object] = lambda route: None,
    ) -> None:
        self.store = store
        self.where = where
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
        self._on_foreign_token = on_foreign_token
        self._on_consumers = on_consumers
        self._on_lost = on_lost
        self._on_writable = on_writable
        self.clock = ClusterClock(reactor) if clock is None else clock
        #: The counters of the changes published, as the last heartbeat
        #: (or reload) read them (L{Heartbeat.changes}); None before.
        self._changes: dict[str, int] | None = None
        self._retry_max = max(retry_max, min(timeout, RELOAD_RETRY_SECONDS))
        self._on_in_step = on_in_step
        self._on_route = on_route
        self.was_in_step = False
        self.remembered_route: Route | None = None
        #: This instance has been up (in step) in this run.
        self._been_up = False
        self.write_back_grace = HEARTBEAT_INTERVAL_SECONDS + self._retry_max + 2 * timeout
        #: When (C{reactor.seconds}) this instance, not yet in step in
        #: this run, first found the store without the route or token it
        #: waits to be written back (L{_awaits_write_back}), since the
        #: store was last reached; None when it does not wait.
        self._empty_since: float | None = None
        self.up = False
        self.up_since = reactor.seconds()
        self.down_reason: str | None = "not reached yet"
        self.instances_seen = 1
        self.cluster_name = cluster_name
        self.database = database
        self.other_databases: tuple[int, ...] = ()
        #: When (C{reactor.seconds}) this instance last looked for its
        #: namesakes in other databases; None: at the next beat while up.
        self._namesakes_looked: float | None = None
        #: A look failed (an ACL without PUBSUB): said once, at debug.
        self._namesakes_unknown = False
        self.versions: dict[str, int] = {}
        #: When the route this instance holds was set (its record's C{at}:
        #: L{encode_route}); C{None} for a record without one.
        self._route_at: float | None = None
        #: When the token this instance holds was put forward (its record's
        #: C{at}: L{encode_token}); C{None} for a record without one.
        self._token_at: float | None = None
        #: Whether the route and token records this instance holds were
        #: written back after a loss (L{is_restored}).
        self._route_restored = False
        self._token_restored = False
        self._connected = False
        #: A failed reload was logged: the next ones are not, until one works.
        self._reload_failing = False
        #: The next reload attempt, while one waits; and the wait after it.
        self._retry: IDelayedCall | None = None
        #: The second look at the store after a heartbeat showed a change
        #: this instance has not seen (L{beat}).
        self._catching_up: IDelayedCall | None = None
        #: The wait before each reload attempt after a failed one: from
        #: RELOAD_RETRY_SECONDS (or the timeout, if shorter), doubling up
        #: to retry_max; and the attempts failed in a row.
        self._retry_policy = backoffPolicy(
            min(timeout, RELOAD_RETRY_SECONDS), self._retry_max, factor=2.0, jitter=lambda: 0.0
        )
        self._retries = 0
        #: Heartbeats failed in a row.
        self._missed_beats = 0
        #: Why the store refuses this instance's heartbeats (a write it
        #: refuses, L{WriteRefused}), while it does: said once.
        self._heartbeat_refused: str | None = None
        #: The store's epoch as the last heartbeat read it
        #: (L{Heartbeat.epoch}); "" before the first.
        self._epoch = ""
        #: This instance's consumers' database, once known: its identity
        #: (L{openclaw.consumers.store.ConsumerStore.identity}) and where it
        #: is as the operator wrote it.  Each heartbeat carries it, and
        #: reads the other instances' (L{Heartbeat.databases}).
        self.consumers_database: tuple[str, str] | None = None
        #: The other databases said (L{_compare_databases}).
        self._databases_said: frozenset[str] = frozenset()
        #: Why the cluster's token was last refused (not signed with this
        #: instance's JWT_SECRET), if it was.
        self._foreign_token: str | None = None
        #: The heartbeat, every HEARTBEAT_INTERVAL_SECONDS: a beat that
        #: raises is logged and the next one comes all the same (not on
        #: LoggedStep, the loop stopped for good after one line: this
        #: instance dropped out of instances_seen and its token's renewals
        #: stopped).
        self._heartbeat = LoopingCall(
            LoggedStep(
                self.beat,
                self._log,
                "the cluster heartbeat (this instance counted in instances_seen, the token's renewal, the changes "
                "it missed caught up)",
            )
        )
        self._heartbeat.clock = reactor
        #: The handling of the store's answers to the heartbeats (L{beat}
        #: does not wait for them): a fault there logged with its context.
        self._heartbeat_answers = LoggedFailures(
            self._log,
            "the handling of the cluster store's answer to a heartbeat (this instance counted, the token's "
            "renewal, a reload of what the store lost or changed)",
        )
        #: The renewal of the cluster's token, when due (L{_renew}); and
        #: whether a renewal is on its way to the store.
        self._renewal: IDelayedCall | None = None
        self._renewing = False
        #: The waits between the attempts of L{_confirm}, while one waits.
        self._confirm_waits: set[Deferred[None]] = set()
        #: L{stop} was called: nothing more is scheduled on the reactor
        #: (a store's answer arriving afterwards included).
        self._stopped = False
        #: The cluster's tokens being adopted (their token file written off
        #: the reactor thread: L{_apply_token}), by jti.
        self._adopting: dict[str, _Adoption] = {}

    def _bounded(self, pending: Deferred[Any]) -> Deferred[Any]:
        return pending.addTimeout(self._timeout, self._reactor)

    def _known(self, name: str) -> int | None:
        """
        The highest version of C{name} this instance knows: the one it
        applied (C{versions}) or, for the token, one it is adopting (its
        token file being written: L{_apply_token}); None for one it has
        never been in step with.  What every comparison with the store's
        versions goes by, so that a token being adopted is never undone by
        an older one arriving meanwhile (a late reply, a late message).
        """
        known = self.versions.get(name)
        if name == TOKEN and self._adopting:
            adopting = max(adoption.version for adoption in self._adopting.values())
            return adopting if known is None else max(known, adopting)
        return known

    def _held(self, name: str) -> tuple[object, ...]:
        """
        What this instance holds of C{name}, and is adopting (the token):
        when it changed while the store was read (a message applied
        meanwhile), the read is stale, and so is what it was compared with.
        """
        if name == ROUTE:
            return (
                self.versions.get(ROUTE),
                self.route.current,
                self._route_at,
                self._route_restored,
            )
        adopting = tuple(sorted((jti, adoption.version) for jti, adoption in self._adopting.items()))
        return (
            self.versions.get(TOKEN),
            self.sessions.current_or_none,
            self._token_at,
            self._token_restored,
            self._foreign_token,
            adopting,
        )

    def _adopted(self) -> Deferred[None]:
        """
        Fire once no adoption of the cluster's token is under way (each
        asker of one says its failure, if it fails); at once if none.
        """
        if not self._adopting:
            return succeed(None)
        waits = [adoption.flight.observe().addErrback(lambda _: None) for adoption in self._adopting.values()]
        return gatherResults(waits).addCallback(lambda _: None)

    # The store's connection.

    def connected(self) -> Deferred[None]:
        """
        The store is reachable (again): reload the cluster's route and
        token (writing back the ones this instance knows if the store lost
        them), then take state-changing commands again.
        """
        self._connected = True
        self._retries = 0
        self._cancel_retry()
        return self._reload()

    def lost(self, reason: str = "") -> None:
        """
        The store went away (C{reason}, for the log): keep serving with
        what is known, refuse changes.
        """
        self._connected = False
        self._cancel_retry()
        # A wait for a write-back starts again once back: the time away
        # is no time the instances in step had to write.
        self._empty_since = None
        # Back up, it looks again (Redis may be another server now).
        self._namesakes_looked = None
        # Back up, the consumers catch up on what this instance counted
        # meanwhile (the reconnection does it: on_up), whatever the store
        # lost or refused before: the next heartbeat's epoch and answer
        # start afresh, not taken for a loss or a refusal that ended.
        self._epoch = ""
        self._heartbeat_refused = None
        self._set_up(False, reason)

    def still_down(self, reason: str) -> None:
        """
        While the store is down, why (C{reason}, as logged: a connection
        refused, Redis's refusal): C{status}'s C{cluster_store_error}.
        Nothing when it is up.
        """
        if not self.up:
            self._set_up(False, reason)

    def _cancel_retry(self) -> None:
        retry, self._retry = self._retry, None
        if retry is not None and retry.active():
            retry.cancel()

    def _set_up(self, up: bool, reason: str = "") -> None:
        if up == self.up:
            if not up and reason:
                # Still down, for a new reason (Redis back with another
                # password, say): status tells the last one, as logged.
                self.down_reason = reason
            return
        self.up = up
        self.up_since = self._reactor.seconds()
        self.down_reason = None if up else reason or "unknown"
        if up:
            self._log.info(
                "cluster store up: route {route}, token {jti}; taking state-changing commands",
                route=f"{self.route.current.provider_id}/{self.route.current.model}",
                jti=self.sessions.current.jti,
            )
            self._been_up = True
            self._on_in_step()
        else:
            self._log.warn(
                "cluster store unreachable{why}: serving with the last known route and token; "
                "switch_provider and rotate_token are refused until it is back",
                why=f" ({reason})" if reason else "",
            )
        self._on_up(up)

    @inlineCallbacks
    def _reload(self) -> Any:
        """
        Read the cluster's route and token (L{SharedStore.ensure}:
        proposing this instance's to a store that holds none), write back
        this instance's where the store lost them (L{_outranks}), replace
        a token due for renewal, and apply what the store holds; then take
        the key rests and lockouts, and be up.

        A read answered after this instance applied (or began adopting) a
        newer value meanwhile (a message, a command's write) is stale, and
        so is what this instance had to compare it with: read again, never
        written back nor applied (a late read rolled a finished
        rotation back cluster-wide).  A read of the token waits for any
        adoption under way first (its token file being written), so that
        what it is compared with is the token in force.
        """
        before = {name: self._known(name) for name in (ROUTE, TOKEN)}
        try:
            # Redis's clock first, to judge the token by; and the counters
            # of the changes, read before what they count is reloaded.
            sent = self._reactor.seconds()
            heartbeat = yield self._bounded(
                self.store.heartbeat(self.instance, HEARTBEAT_TTL_SECONDS, (ROUTE, TOKEN), self.up, self._database())
            )
            self._heard(heartbeat, sent)
            if self._awaits_write_back(heartbeat):
                return
            mine, route = yield self._read_fresh(ROUTE, lambda: self._mine(ROUTE))
            if self._outranks(ROUTE, mine, route):
                route = yield self._bounded(self._write_back(ROUTE, mine, route))
            # Proposed as the cluster's first token if this instance holds
            # none; kept only if the cluster has none (set-if-absent): an
            # instance never replaces the cluster's token on its own.
            proposal: SessionToken | None = None

            def my_token() -> str:
                nonlocal proposal
                current = self.sessions.current_or_none
                if current is None:
                    proposal = current = self.sessions.mint() if proposal is None else proposal
                if TOKEN in self.versions:
                    return encode_token(current, self._token_at, self._token_restored)
                return encode_token(current, self._now())

            mine, token = yield self._read_fresh(TOKEN, my_token)
            if self._outranks(TOKEN, mine, token):
                token = yield self._bounded(self._write_back(TOKEN, mine, token))
            if self._due(token):
                # An expired token (or one due for renewal) counts as
                # absent: replaced by a compare-and-set on its jti, so one
                # instance wins and the others adopt its token.
                token = yield self._bounded(self._replace(token))
        except Exception as e:
            # Logged once per outage, not once per retry.
            if not self._reload_failing:
                self._reload_failing = True
                if self.up:
                    then = f"trying again at the next heartbeat (every {HEARTBEAT_INTERVAL_SECONDS:g} s)"
                else:
                    then = (
                        # At start-up, before it was ever in step, it
                        # does not listen: it has no route or token.
                        ("serving with the last known route and token" if self._been_up else "not listening")
                        + " and refusing changes meanwhile; "
                        f"trying again in {self._retry_policy(self._retries):g} s, then backing off up to "
                        f"{self._retry_max:g} s "
                        "between attempts, until it works"
                    )
                self._log.warn(
                    "could not reload the cluster's route and token from its store ({error}); {then}",
                    error=describe(e, self._timeout),
                    then=then,
                )
            self._retry_later()
            return
        try:
            for name, versioned in ((ROUTE, route), (TOKEN, token)):
                known = self._known(name)
                if known != before[name] and known is not None and known > versioned.version:
                    continue  # a newer write arrived (or is being adopted) while reloading
                # The token's file written off the reactor thread: in step
                # (and listening, at start) once it is.
                yield self._apply(name, versioned, here=versioned.origin == self.instance)
        except Exception as e:
            if isinstance(e, TokenFileUnwritable) and e.stopping:
                # Its write refused by the gateway's stop: nothing to retry.
                self._log.info("did not adopt the cluster's session token at a reload: the gateway is stopping")
                return
            # The cluster's token could not be adopted (its version is not
            # recorded): not in step, so retried as a failed reload is.
            if not self._reload_failing:
                self._reload_failing = True
                self._log.failure(
                    "could not adopt the cluster's session token; retrying: {advice}", advice=TOKEN_FILE_ADVICE
                )
            self._retry_later()
            return
        if self.sessions.current_or_none is None and self._foreign_token is not None:
            # Never in step: no token this instance can trust.
            self._on_foreign_token(self._foreign_token)
            return
        self._reload_failing = False
        self._retries = 0
        # Before listening: a lockout decided while this instance was away
        # holds from its first connection.
        yield self._reload_expiring()
        if self._connected:
            coming_up = not self.up
            self._set_up(True)
            if coming_up:
                # Counted among the instances at once.  Not after a reload
                # a heartbeat asked for, already up: the next heartbeat
                # looks again, so that a disagreement left costs a reload a
                # heartbeat, never a loop.
                self.beat()

    @property
    def awaiting_write_back(self) -> float | None:
        """
        While this instance waits for the instances in step to write the
        cluster's state back (L{_awaits_write_back}), the seconds left of
        that wait; else None (the store out of reach meanwhile included).
        """
        if self._empty_since is None or self.up or not self._connected:
            return None
        return max(0.0, self._empty_since + self.write_back_grace - self._reactor.seconds())

    def _awaits_write_back(self, heartbeat: Heartbeat) -> bool:
        """
        Whether this reload stops here, to look again in
        L{WRITE_BACK_POLL_SECONDS}, rather than propose this instance's
        route or token: it has never been in step in this run, the store
        lacks the route, the token or both (C{heartbeat}'s versions are 0),
        and either it was in step in an earlier run (L{was_in_step}) or
        instances in step are alive (C{heartbeat.alive}: only those count)
        — the store lost the cluster's state, which they will write back
        (one key evicted, a newcomer printed a token of its own)
        — and it has waited less than L{write_back_grace} since it first
        found it so.  Logged when the wait begins and when it ends with
        nothing written back.
        """
        missing = [name for name in (ROUTE, TOKEN) if not heartbeat.versions.get(name)]
        # Not up yet in this run: a route or token applied from a message
        # meanwhile does not end the wait (the token still
        # missing, it proposed its own).
        if not missing or self._been_up or not (self.was_in_step or heartbeat.alive > 0):
            self._empty_since = None
            return False
        now = self._reactor.seconds()
        names = " and no ".join(missing)
        if self._empty_since is None:
            self._empty_since = now
            self._log.warn(
                "the cluster store holds no {names}, and {why}: it lost the cluster's state (restarted empty, "
                "flushed or evicted); waiting up to {grace:g} s for an instance in step to write it back before "
                "proposing this instance's own",
                names=names,
                why=(
                    "this instance was in step with the cluster before it started (its record in STATE_DIR)"
                    if self.was_in_step
                    else f"{heartbeat.alive} instance(s) in step are alive"
                ),
                grace=self.write_back_grace,
            )
        elif now - self._empty_since >= self.write_back_grace:
            self._log.warn(
                "no instance wrote the cluster's {names} back into its store within {grace:g} s: proposing this "
                "instance's own (every instance of the cluster restarted with the store, or none reaches it)",
                names=" and ".join(missing),
                grace=self.write_back_grace,
            )
            return False
        if self._connected and self._retry is None:
            self._retry = self._reactor.callLater(WRITE_BACK_POLL_SECONDS, self._retry_reload)
        return True

    @inlineCallbacks
    def _read_fresh(self, name: str, mine: Callable[[], str]) -> Any:
        """
        Read the cluster's C{name} (L{SharedStore.ensure}: proposing
        C{mine()}, this instance's record of it, to a store that holds
        none) until a read is not stale: this instance applied (or began
        adopting) no other C{name} while it was on its way (L{_held});
        else it is read again, C{mine()} taken again.  A read of the token
        waits for any adoption under way first (L{_adopted}), so that what
        it is compared with is the token in force.  Each read bounded by
        the node's timeout.  For L{_reload}.

        @return: a Deferred firing with C{(mine, versioned)}: the record
            proposed and the store's answer (L{Versioned}).
        @raise StaleReads: (as a failure) L{MAX_STALE_READS} reads in a
            row were stale.
        @raise Exception: (as a failure) the store's failure, or its
            timeout, as L{_bounded}'s.
        """
        for _ in range(MAX_STALE_READS):
            if name == TOKEN:
                yield self._adopted()
            held = self._held(name)
            proposed = mine()
            versioned = yield self._bounded(
                self.store.ensure(name, proposed, self.versions.get(name, 1), self.instance)
            )
            if self._held(name) == held:
                return proposed, versioned
            # Another value applied, or a token's adoption begun, meanwhile:
            # this read is stale.
        raise StaleReads(name)

    def _mine(self, name: str) -> str:
        """
        This instance's record of C{name} (L{ROUTE} only), as it would
        propose or write it back: the route it holds, set when the
        cluster's record says, or now if it has never been in step.
        """
        if ROUTE not in self.versions:
            return encode_route(self._proposed_route(), self._now())
        return encode_route(self.route.current, self._route_at, self._route_restored)

    def _proposed_route(self) -> Route:
        """
        The route this instance proposes to a store without one: the one
        it last served in the cluster (L{remembered_route}), when this
        instance can serve it (a provider it declares, a model the API
        takes), else the one in force (the configured one).
        """
        remembered = self.remembered_route
        if (
            remembered is not None
            and remembered.provider_id in self._provider_ids
            and model_refusal(remembered.model) is None
        ):
            return remembered
        return self.route.current

    def _now(self) -> float:
        """
        Now, as a record's C{at} (POSIX seconds on the cluster's clock, to
        the millisecond).
        """
        return round(self.clock.seconds(), 3)

    def _replaced(self, name: str, held: str) -> bool:
        """
        Whether C{held}, what the store holds for C{name} at the version
        this instance knows (a heartbeat's read), is not what this instance
        holds: the store lost the state and another instance (a newcomer)
        wrote its own at that version.  Never for a token while this
        instance refuses the cluster's (another C{JWT_SECRET}).
        """
        try:
            if name == ROUTE:
                return record_identity(ROUTE, json.loads(held)) != record_identity(ROUTE, json.loads(self._mine(ROUTE)))
            current = self.sessions.current_or_none
            if current is None or self._foreign_token is not None:
                return False
            return decode_token(held).jti != current.jti
        except (ValueError, KeyError, TypeError):
            return True

    def _outranks(self, name: str, mine: str, held: Versioned) -> bool:
        """
        Whether this instance's C{mine} (its route or token, encoded) must
        replace C{held}, what the store holds for C{name}: the store lost
        the state and holds one this instance did not know (see the
        module's docstring for the rule).  Never for an instance that has
        not been in step with the cluster yet.  The version it knows
        counts a token being adopted (L{_known}).
        """
        known = self._known(name)
        if known is None or held.version > known:
            return False
        try:
            theirs = json.loads(held.value)
        except ValueError:
            return True  # nothing any instance can apply
        ours = json.loads(mine)
        if not isinstance(theirs, dict):
            return True  # nothing any instance can apply
        if record_identity(name, theirs) == record_identity(name, ours):
            return False
        if name == ROUTE:
            if held.version < known:
                return True
            try:
                rank = route_rank(held.value)
            except (ValueError, KeyError, TypeError):
                return True  # nothing any instance can apply
            if rank[1] not in self._provider_ids or model_refusal(rank[2]) is not None:
                return True  # nor this one: written back rather than refused at every heartbeat
            if is_restored(ours) != is_restored(theirs):
                # A switch (or a first proposal) wins over a write-back:
                # the written-back one is older than the version says.
                return not is_restored(ours)
            if ("at" in ours) != ("at" in theirs):
                # Written by an earlier version (no C{at}) and by this one:
                # they differ only because one was written after the store
                # lost the state, never the one this instance held.
                return True
            return route_rank(mine) < rank
        if self._foreign_token is not None:
            return False  # this instance refused the cluster's token: its own is not the cluster's
        try:
            held_token = decode_token(held.value)
            held_rank = token_rank(held.value)
        except (ValueError, KeyError, TypeError):
            return True
        try:
            self.sessions.check(held_token)
        except UntrustedToken:
            # Another JWT_SECRET's (an instance that reached the emptied
            # store first): this one, in step with the cluster and holding
            # the token the operators use, writes it back, so that it can
            # be renewed (a compare-and-set on its jti).
            return True
        if held.version < known:
            return True
        if held_token.jti == ours.get("jti"):
            return False  # the same token: its records differ only in how they were written
        if is_restored(ours) != is_restored(theirs):
            return not is_restored(ours)  # a rotation or renewal wins over a write-back
        if ("at" in ours) != ("at" in theirs):
            # As for the route: two tokens, one recorded by an earlier
            # version (no C{at}); only the other can have been minted
            # after the loss.
            return True
        return token_rank(mine) < held_rank

    def _write_back(self, name: str, mine: str, held: Versioned) -> Deferred[Versioned]:
        """
        Write C{mine} back as C{name} in place of C{held} (L{_outranks}),
        one version above both; fires with what was written.
        """
        known = self._known(name) or 0
        if held.version == known:
            # The same version, another value ("version 1
            # where this instance knew version 1" read as no loss at all).
            self._log.warn(
                "the cluster store holds another {name} at the version this instance knows ({version}, written by "
                "{origin}): the store lost the cluster's state (restarted empty, flushed or evicted) and another "
                "instance wrote its own; writing back the {name} this instance knows, set earlier",
                name=name,
                version=held.version,
                origin=held.origin or "an unknown instance",
            )
        else:
            self._log.warn(
                "the cluster store holds {name} version {version} (written by {origin}) where this instance knew "
                "version {known}: the store lost the cluster's state (restarted empty, flushed or evicted); "
                "writing back the {name} this instance knows",
                name=name,
                version=held.version,
                origin=held.origin or "an unknown instance",
                known=known,
            )

        document = json.loads(mine)
        document["restored"] = True
        restored = json.dumps(document)

        def written(version: int) -> Versioned:
            return Versioned(version, restored, self.instance)

        wrote: Deferred[int] = self.store.write(name, restored, self.instance, uuid.uuid4().hex, known)
        return wrote.addCallback(written)

    def _due(self, versioned: Versioned) -> bool:
        """
        Whether the cluster's token C{versioned} is one this instance trusts
        (signed with its C{JWT_SECRET}) and has expired or is due for
        renewal (L{renewal_time}).  A token it does not trust is never
        replaced here: L{_apply} refuses it.
        """
        try:
            token = decode_token(versioned.value)
            self.sessions.check(token)
        except (ValueError, KeyError, TypeError):
            return False
        return self.clock.seconds() >= renewal_time(token)

    def _replace(self, versioned: Versioned) -> Deferred[Versioned]:
        """
        Propose a new token in place of the cluster's token C{versioned}
        (a compare-and-set on its jti: L{SharedStore.replace}); fires with
        the token the store holds afterwards (this one's or the winner's).
        The new token's version is above every one this instance knows, so
        that it is applied even if the store lost the token meanwhile.
        """
        expired = decode_token(versioned.value)
        known = max(versioned.version, self._known(TOKEN) or 0)
        fresh = self.sessions.mint()
        self._log.info(
            "the cluster's session token {jti} {state} (expires {expires}); proposing {fresh} in its place",
            jti=expired.jti,
            state="has expired" if self.clock.seconds() >= expired.expires_at else "is due for renewal",
            expires=expired.expires,
            fresh=fresh.jti,
        )
        replaced: Deferred[Versioned] = self.store.replace(
            TOKEN, expired.jti, encode_token(fresh, self._now()), self.instance, known
        )
        return replaced

    def _schedule_renewal(self, token: SessionToken) -> None:
        self._cancel_renewal()
        if self._stopped:
            return  # a store's answer after stop(): nothing left on the reactor
        delay = max(0.0, renewal_time(token) - self.clock.seconds())
        self._renewal = self._reactor.callLater(delay, self._renewal_time)

    def _renewal_time(self) -> None:
        self._renewal = None
        self._renew()

    def _cancel_renewal(self) -> None:
        renewal, self._renewal = self._renewal, None
        if renewal is not None and renewal.active():
            renewal.cancel()

    def _renew(self) -> None:
        """
        Replace the cluster's token if it is due (L{renewal_time}); while
        the store is away, the reload on its return does it.  A failure is
        retried at the next heartbeat.
        """
        current = self.sessions.current_or_none
        if (
            self._stopped
            or self._renewing
            or not (self.up and self._connected)
            or current is None
            or TOKEN not in self.versions
        ):
            return
        held = Versioned(self.versions[TOKEN], encode_token(current))
        if not self._due(held):
            return
        self._renewing = True

        def replaced(versioned: Versioned) -> Deferred[None] | None:
            if versioned.version > (self._known(TOKEN) or 0):
                return self._apply(TOKEN, versioned, here=versioned.origin == self.instance)
            return None

        def failed(failure: Failure) -> None:
            self._log.warn(
                "could not renew the cluster's session token {jti}: {error}; trying again at the next heartbeat",
                jti=current.jti,
                error=describe(failure.value, self._timeout),
            )

        def not_adopted(failure: Failure) -> None:
            # Not swallowed: the token's version is recorded only once it
            # is adopted (L{_apply}), so the next heartbeat tries again.
            self._log.failure(
                "could not adopt the cluster's renewed session token; keeping {jti} and trying again at the next "
                "heartbeat: {advice}",
                failure,
                jti=current.jti,
                advice=TOKEN_FILE_ADVICE,
            )

        def done(_: object) -> None:
            self._renewing = False

        # Its adoption is not bounded: a token file slow to write is not the
        # store's failure.
        self._bounded(self._replace(held)).addCallbacks(replaced, failed).addErrback(not_adopted).addBoth(done)

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
                error=describe(failure.value, self._timeout),
            )

        return gatherResults(
            [
                self._bounded(self.store.resting()).addCallbacks(rests, failed),
                self._bounded(self.store.lockouts()).addCallbacks(lockouts, failed),
            ]
        )

    def _retry_later(self) -> None:
        if self._connected and self._retry is None:
            # Never given up while connected: backing off, up to retry_max
            # between attempts.
            self._retry = self._reactor.callLater(self._retry_policy(self._retries), self._retry_reload)
            self._retries += 1

    def _retry_reload(self) -> None:
        self._retry = None
        if self._connected and not self.up:
            self._reload()

    def received(self, name: str, version: int, value: str, origin: str = "") -> None:
        """
        Another write (from any instance, this one included: instance
        C{origin}) was published: applied if newer than what this instance
        knows (a token being adopted included: L{_known}).
        """
        if version > (self._known(name) or 0):
            self._apply(name, Versioned(version, value, origin), here=origin == self.instance).addErrback(
                self._not_adopted, version
            )

    def _not_adopted(self, reason: Failure, version: int) -> None:
        """
        The cluster's token of C{version}, published, could not be adopted
        (C{reason}: its token file could not be written): logged; its
        version is not recorded, so the next heartbeat or reload adopts
        it; said at info, without a traceback, when it was because the
        gateway is stopping.  Reactor thread.
        """
        if isinstance(reason.value, TokenFileUnwritable) and reason.value.stopping:
            self._log.info(
                "did not adopt the cluster's session token (version {version}): the gateway is stopping",
                version=version,
            )
            return
        self._log.failure(
            "could not adopt the cluster's session token (version {version}); trying again at the next "
            "heartbeat: {advice}",
            reason,
            version=version,
            advice=TOKEN_FILE_ADVICE,
        )

    def rested(self, origin: str, subject: str, key_fingerprint: str, seconds: float) -> None:
        """
        An instance rested a provider key after a 429, for C{subject} (a
        provider, or one of its models).
        """
        if origin != self.instance:
            self._on_rest(subject, key_fingerprint, seconds)

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

    def _apply(self, name: str, versioned: Versioned, here: bool = False) -> Deferred[None]:
        """
        Apply the cluster's C{name} (L{ROUTE}: L{_apply_route}; L{TOKEN}:
        L{_apply_token}) at C{versioned}, written by this instance if
        C{here}.  One that is not a record of its kind, or a route this
        instance refuses (C{ValueError}, C{KeyError}, C{TypeError}), is
        logged and ignored.  Reactor thread.

        @return: a Deferred firing once applied (a token: once its token
            file is written, off the reactor thread), or ignored.
        @raise openclaw.session.TokenFileUnwritable: (as a failure) the
            token could not be adopted (L{_apply_token}).
        """
        try:
            document = json.loads(versioned.value)
            if name == ROUTE:
                self._apply_route(document, versioned, here)
            elif name == TOKEN:
                return self._apply_token(document, versioned, here)
        except (ValueError, KeyError, TypeError) as e:
            self._log.error(
                "ignoring the cluster's {name} (version {version}): {error}",
                name=name,
                version=versioned.version,
                error=str(e),
            )
        return succeed(None)

    def _apply_route(self, document: dict[str, Any], versioned: Versioned, here: bool) -> None:
        """
        Switch to the cluster's route, C{document} decoded from
        C{versioned}, and record its version; said in the log when it
        replaces the configured route, or another instance's switch
        changed it.

        @raise ValueError: it names a provider not configured here, or a
            model refused; (or L{KeyError}, L{TypeError}) it is not a
            route record.  Nothing changed.
        """
        route = Route(str(document["provider"]), str(document["model"]))
        if route.provider_id not in self._provider_ids:
            raise ValueError(f"unknown provider {route.provider_id!r}")
        # The reason only, never the name (unprintable, or long).
        refusal = model_refusal(route.model)
        if refusal is not None:
            raise ValueError(f"its {refusal}")
        self._route_at = record_at(document)
        self._route_restored = is_restored(document)
        first = ROUTE not in self.versions
        self.versions[ROUTE] = versioned.version
        previous = self.route.switch(route)
        if first or previous != route:
            self._on_route(route)
        if first and previous != route:
            # The configured route (DEFAULT_PROVIDER and its model)
            # gives way to the cluster's: said, as a standalone
            # gateway says its state file's.
            self._log.warn(
                "the active provider is {route}, the cluster's (its last switch_provider), rather than "
                "{previous} from DEFAULT_PROVIDER; switch_provider changes it",
                route=f"{route.provider_id}/{route.model}",
                previous=f"{previous.provider_id}/{previous.model}",
            )
        elif previous != route and not here:
            self._log.info(
                "applied the cluster's route {route} (version {version}, {source}); was {previous}",
                route=f"{route.provider_id}/{route.model}",
                previous=f"{previous.provider_id}/{previous.model}",
                version=versioned.version,
                source=provenance(document, versioned, "switched on"),
            )

    def _apply_token(self, document: dict[str, Any], versioned: Versioned, here: bool) -> Deferred[None]:
        """
        Adopt the cluster's session token, C{versioned} (C{document}
        decoded from it), unless it is the current one or one this
        instance cannot trust (L{_refuse_token}), and record its version.
        Its token file is written off the reactor thread
        (L{SessionAuthority.adopt_later}): the token is current, its
        version recorded, once it is; meanwhile its version counts as known
        (L{_known}).  The same token asked again while its adoption is
        under way (its publication and its write's answer both) waits for
        that adoption, not written twice (the highest version asked is
        recorded).  Each asker waits on a Deferred of its own
        (L{InFlight}), which it may cancel: the adoption goes on, and its
        failure, had every asker given up, is logged here.  Reactor
        thread.

        @return: a Deferred firing once adopted (or nothing to adopt).
        @raise ValueError: (or L{KeyError}, L{TypeError}) it is not a
            token record (L{decode_token}): nothing changed.
        @raise openclaw.session.TokenFileUnwritable: (as a failure) the
            token file could not be written: the token is not adopted,
            its version not recorded.
        """
        token = decode_token(versioned.value)
        at = record_at(document)
        current = self.sessions.current_or_none
        if current is not None and current.token == token.token:
            self.versions[TOKEN] = versioned.version
            self._token_restored = is_restored(document)
            self._token_at = at
            return succeed(None)
        try:
            self.sessions.check(token)
        except UntrustedToken as e:
            self._refuse_token(token, document, versioned, current, e)
            return succeed(None)
        self._foreign_token = None
        if current is not None and current.jti == token.jti:
            self.versions[TOKEN] = versioned.version
            self._token_restored = is_restored(document)
            self._token_at = at
            return succeed(None)
        adoption = self._adopting.get(token.jti)
        if adoption is not None:
            if versioned.version > adoption.version:
                # The same token written back (one version above): the
                # version recorded once adopted.
                adoption.version, adoption.at, adoption.restored = versioned.version, at, is_restored(document)
            return adoption.flight.observe()
        adoption = self._adopting[token.jti] = _Adoption(InFlight(), versioned.version, at, is_restored(document))

        def adopted(_: object) -> None:
            # Not recorded below a version recorded meanwhile: the reload
            # that follows puts it right.
            self.versions[TOKEN] = max(adoption.version, self.versions.get(TOKEN, 0))
            self._token_restored = adoption.restored
            self._token_at = adoption.at
            self._schedule_renewal(token)
            self._on_token(token, here, provenance(document, versioned, "issued on"))

        def settled(result: object) -> None:
            # Not recorded on failure: a later message, reload or
            # heartbeat applies this token again.
            del self._adopting[token.jti]
            given = adoption.flight.end(result if isinstance(result, Failure) else None)
            if isinstance(result, Failure) and not given:
                # Every asker gave up (a rotation cut short at stop).
                self._not_adopted(result, adoption.version)

        # Adopted (and recorded) even if who asked gave up: its
        # Deferred is its own, asked for before the adoption (which may
        # end at once: no writer).
        asker = adoption.flight.observe()
        self.sessions.adopt_later(token).addCallback(adopted).addBoth(settled)
        return asker

    def _refuse_token(
        self,
        token: SessionToken,
        document: dict[str, Any],
        versioned: Versioned,
        current: SessionToken | None,
        error: UntrustedToken,
    ) -> None:
        """
        The cluster's session token C{token} (C{versioned}, C{document}
        decoded from it) is not one this instance can trust (C{error}):
        keep C{current} (L{None}: none adopted), say so in the log, and
        record its version; stop (C{on_foreign_token}) if it was written
        back after the store lost it while this instance has a token.
        """
        self._foreign_token = str(error)
        if is_restored(document) and current is not None:
            # Written back by an instance in step with the
            # cluster before its store lost the token: the
            # cluster's, which this instance, another
            # JWT_SECRET's, proposed its own in place of (it
            # reached the emptied store first).  It stops, as
            # it would not have started (it stayed,
            # the cluster's token refused).
            self._on_foreign_token(str(error))
        self._log.error(
            "refused the cluster's session token {jti} (version {version}, written by {origin}): {error}; {kept}",
            jti=token.jti,
            version=versioned.version,
            origin=versioned.origin or "an unknown instance",
            error=str(error),
            kept="keeping token " + current.jti if current is not None else "no token adopted",
        )
        self.versions[TOKEN] = versioned.version

    # State-changing commands.

    def switch(self, route: Route) -> Deferred[Route]:
        """
        Write C{route} to the store, then apply it here; fire with the
        route it replaced.

        @raise StoreUnavailable: (as a failure) it was not written: nothing
            changed.
        @raise StoreUnconfirmed: (as a failure) it timed out and the store
            could not say whether it was written.
        """
        previous = self.route.current
        return self._write(ROUTE, encode_route(route, self._now())).addCallback(lambda _: previous)

    def fence(self) -> Deferred[None]:
        """
        Before a state-changing command: fire once the store says the
        cluster's session token is the one this instance holds; fail with
        L{TokenBehind} when it says another (a rotation this instance has
        not applied: the command's token may be revoked).  While the store
        is down or does not answer in time, fire all the same: the commands
        that need it refuse then by themselves, and the others (consumers')
        go on as they would without a cluster, saying so.
        """
        if not self.up:
            return succeed(None)

        def told(holds: bool) -> None:
            if not holds:
                raise TokenBehind()

        asked: Deferred[bool] = self._bounded(self.store.holds_token(self.sessions.current.jti))
        return asked.addCallbacks(told, lambda failure: None)

    def rotate(self, token: SessionToken) -> Deferred[SessionToken]:
        """
        Make C{token} the cluster's session token; fire with it once
        written and adopted here (failures as for L{switch}).

        @raise TokenNotAdoptedHere: (as a failure) written (in force on
            the other instances), but its TOKEN_FILE here could not be
            written: this instance keeps the previous token until it can.
        """
        return self._write(TOKEN, encode_token(token, self._now())).addCallback(lambda _: token)

    def _write(self, name: str, value: str) -> Deferred[None]:
        """
        Write C{name} with a new receipt; applied here once the store has
        it.  A write that fails or times out may still have been made (a
        reply lost or late): the store is asked, by its receipt, whether it
        was (which also fences it if it was not), so that the answer is the
        truth: written, or not written and never to be.  Its version is
        above every one this instance knows, so that it is applied even if
        the store lost the value meanwhile.
        """
        receipt = uuid.uuid4().hex

        def written(version: int) -> Deferred[None]:
            if version == -1:
                raise TokenBehind()
            if version == 0:
                raise StoreUnavailable(unavailable(self.where))
            if version >= (self._known(name) or 0):
                # Answered once applied: a token once its file is written
                # (its adoption joined if its publication began it).
                applied = self._apply(name, Versioned(version, value, self.instance), here=True)
                return applied.addErrback(not_adopted, version)
            return succeed(None)

        def not_adopted(failure: Failure, version: int) -> None:
            # Written: in force on the other instances, whatever this
            # one's TOKEN_FILE; never answered as a change not made.
            failure.trap(TokenFileUnwritable)
            assert isinstance(failure.value, TokenFileUnwritable)
            jti = decode_token(value).jti
            if failure.value.stopping:
                self._log.info(
                    "rotated the cluster's session token to {jti} (version {version}); not adopted here: the "
                    "gateway is stopping",
                    jti=jti,
                    version=version,
                )
                raise TokenNotAdoptedHere(jti, failure.value.error, stopping=True)
            self._log.error(
                "rotated the cluster's session token to {jti} (version {version}), but could not adopt it here "
                "({error}): keeping token {kept} until it can be; adopted at a heartbeat once it can: {advice}",
                jti=jti,
                version=version,
                error=failure.value.error,
                kept=self.sessions.current.jti,
                advice=TOKEN_FILE_ADVICE,
            )
            raise TokenNotAdoptedHere(jti, failure.value.error)

        def failed(failure: Failure) -> Deferred[int]:
            refusal = failure.value
            if isinstance(refusal, WriteRefused):
                # Refused before anything was written: nothing to confirm.
                self._log.warn(
                    "the cluster store refused to write {name} ({reason}); nothing changed: {advice}",
                    name=name,
                    reason=refusal.reason,
                    advice=refusal.advice,
                )
                at = f" at {self.where}" if self.where else ""
                raise StoreUnavailable(
                    f"cluster store{at} refused the change: {refusal.reason}; nothing changed: {refusal.advice}"
                )
            error = describe(failure.value, self._timeout)
            self._log.warn(
                "writing {name} to the cluster store failed ({error}); asking the store whether it was written",
                name=name,
                error=error,
            )
            return self._confirm(name, receipt)

        def refused(failure: Failure) -> Failure:
            if not failure.check(StoreUnavailable, TokenNotAdoptedHere, CancelledError):
                self._log.failure("writing {name} to the cluster store failed unexpectedly", failure, name=name)
                return Failure(StoreUnavailable(unavailable(self.where)))
            return failure

        if not self.up:
            self._log.warn("{name} not written: the cluster store is unreachable; nothing changed", name=name)
            return fail(StoreUnavailable(unavailable(self.where)))
        return (
            self._bounded(
                self.store.write(name, value, self.instance, receipt, self._known(name) or 0, self.sessions.current.jti)
            )
            .addErrback(failed)
            .addCallback(written)
            .addErrback(refused)
        )

    @inlineCallbacks
    def _confirm(self, name: str, receipt: str) -> Any:
        """
        The version the write with C{receipt} made, from the store (0: not
        made, and fenced); L{StoreUnconfirmed} when the store cannot say.
        """
        error = ""
        for attempt in range(CONFIRM_ATTEMPTS):
            if attempt:
                wait: Deferred[None] = deferLater(self._reactor, min(self._timeout, 0.25), lambda: None)
                self._confirm_waits.add(wait)
                try:
                    yield wait
                except CancelledError:
                    break  # stop(): no further attempt
                finally:
                    self._confirm_waits.discard(wait)
            try:
                version = yield self._bounded(self.store.confirm(receipt))
            except Exception as e:
                error = describe(e, self._timeout)
                continue
            self._log.warn(
                "{name} was written to the cluster store after all (version {version})"
                if version
                else "{name} was not written to the cluster store, and now never will be; nothing changed",
                name=name,
                version=version,
            )
            return int(version)
        self._log.error(
            "could not learn whether {name} was written to the cluster store ({error}): "
            "every instance applies it if it was, none if not",
            name=name,
            error=error,
        )
        raise StoreUnconfirmed(name)

    def rest(self, subject: str, key_fingerprint: str, seconds: float) -> None:
        """
        Tell the cluster a key rests, for C{subject} (a provider, or one of
        its models: L{rest_subject <openclaw.providers.keys.rest_subject>});
        best effort: a failure leaves the rest on this instance only.
        """
        if not self.up:
            return
        self._bounded(self.store.rest(subject, key_fingerprint, seconds)).addErrback(
            lambda failure: self._log.debug("key rest not shared: {error}", error=failure.getErrorMessage())
        )

    # Heartbeats.

    def start(self) -> None:
        self._stopped = False
        self._heartbeat.start(HEARTBEAT_INTERVAL_SECONDS, now=True).addErrback(
            lambda failure: self._log.failure("heartbeat stopped", failure)
        )

    def stop(self) -> Deferred[None]:
        """
        Stop beating, and leave the cluster's count of instances (best
        effort, within REDIS_TIMEOUT_SECONDS: the returned Deferred fires
        when done, and never fails).  Leave nothing pending on the
        reactor: no reload retry, no catch-up, no further attempt to
        confirm a write (its command is answered L{UNCONFIRMED}); the
        store is about to be closed.
        """
        self._stopped = True
        if self._heartbeat.running:
            self._heartbeat.stop()
        self._connected = False
        self._cancel_retry()
        self._cancel_renewal()
        for wait in list(self._confirm_waits):
            wait.cancel()
        catching_up, self._catching_up = self._catching_up, None
        if catching_up is not None and catching_up.active():
            catching_up.cancel()

        def failed(failure: Failure) -> None:
            self._log.debug(
                "could not leave the cluster's count of instances: {error}", error=failure.getErrorMessage()
            )

        left: Deferred[None] = self._bounded(self.store.leave(self.instance)).addErrback(failed)
        return left

    def _look_for_namesakes(self) -> None:
        """
        When up, and due (L{NAMESAKE_CHECK_SECONDS}), ask the store for
        the other databases in which instances of this C{CLUSTER_NAME}
        listen (L{other_databases}): a database mistyped in one instance's
        C{REDIS_URL} makes a second cluster of the same name on the same
        Redis, with its own token and route, and nothing else says so.
        Warned when a database appears there; never more than a warning
        (two clusters of one name in two databases may be meant).  A store
        that will not say (an ACL without C{PUBSUB}) is said once, at
        debug level.
        """
        now = self._reactor.seconds()
        if (
            self._stopped
            or not self.up
            or (self._namesakes_looked is not None and now - self._namesakes_looked < NAMESAKE_CHECK_SECONDS)
        ):
            return
        self._namesakes_looked = now

        def found(databases: tuple[int, ...]) -> None:
            if self._stopped:
                return
            known, self.other_databases = self.other_databases, tuple(databases)
            if set(databases) - set(known):
                self._log.warn(
                    "another cluster named {name} is on {others} of this Redis (its instances listen on its "
                    "channel), while this instance uses database {database} ({where}): the clusters share nothing but "
                    "the name: each has its own session token and route, and switch_provider, rotate_token, "
                    "lockouts and consumer changes on one do not reach the other{upgrade}; if they are meant to "
                    "be one cluster, set the same database in every instance's REDIS_URL; if not, give them "
                    "different CLUSTER_NAMEs, which silences this",
                    name=self.cluster_name,
                    others=_databases(databases),
                    database=self.database,
                    where=self.where or "REDIS_URL",
                    upgrade=(
                        f" (or instances of a version before the channel named its database are still running: "
                        f"they listen on database 0's, {self.cluster_name}:events, whatever their database)"
                        if 0 in databases and self.database != 0
                        else ""
                    ),
                )
            elif known and not databases:
                self._log.info(
                    "no other cluster named {name} is on another database of this Redis any more",
                    name=self.cluster_name,
                )

        def unknown(failure: Failure) -> None:
            # Not known any more: status does not go on naming them.
            self.other_databases = ()
            if not self._namesakes_unknown:
                self._namesakes_unknown = True
                self._log.debug(
                    "could not look for instances of cluster {name} in other databases of this Redis "
                    "(PUBSUB CHANNELS): {error}",
                    name=self.cluster_name,
                    error=describe(failure.value, self._timeout),
                )

        self._bounded(self.store.other_databases()).addCallbacks(found, unknown)

    def _catch_up(self, versions: dict[str, int]) -> None:
        self._catching_up = None
        missed = {name: version for name, version in versions.items() if version > (self._known(name) or 0)}
        if missed and self.up:
            self._log.warn(
                "missed a change published by the cluster store ({missed}); reloading",
                missed=", ".join(f"{name} version {version}" for name, version in sorted(missed.items())),
            )
            self._reload()

    def _database(self) -> str:
        return "" if self.consumers_database is None else self.consumers_database[0]

    def _compare_databases(self, databases: frozenset[str]) -> None:
        """
        Say, once for each, the consumers' databases the other instances
        alive use besides this one's: a consumer key made in one is refused
        (401) where the other is used, and limits and budgets are
        counted apart (trial s46: nothing said).  Said again, once, when
        every instance uses the same one.
        """
        if self.consumers_database is None:
            return
        own, where = self.consumers_database
        others = databases - {own}
        if not others:
            if self._databases_said:
                self._databases_said = frozenset()
                self._log.info(
                    "every instance of the cluster uses this instance's consumers' database {where} again", where=where
                )
            return
        if others <= self._databases_said:
            return
        self._databases_said |= others
        self._log.critical(
            "instances of this cluster use {count} other consumers' database(s) (identity {others}) besides this "
            "instance's, {where} (identity {own}): a consumer key made in one is refused (401) by the instances "
            "of the other, and limits and budgets are counted apart; give every instance the same DATABASE_URL "
            "(each instance's log names its own database in this line)",
            count=len(others),
            others=", ".join(sorted(others)),
            where=where,
            own=own,
        )

    def _heard(self, heartbeat: Heartbeat, sent: float) -> None:
        """
        What any read of the heartbeat (asked at C{sent}) says besides the
        versions: Redis's clock (L{ClusterClock.measured}), and whether
        consumers, key rests or lockouts changed since the last read:
        reloaded then (their message may have been lost on a subscription
        gone silent), when up (the reload on coming up does it otherwise).
        """
        if heartbeat.now is not None:
            self.clock.measured(sent, self._reactor.seconds(), heartbeat.now)
        self._compare_databases(heartbeat.databases)
        known, self._changes = self._changes, heartbeat.changes
        if known is None or not self.up:
            return
        moved = sorted(name for name, count in heartbeat.changes.items() if count != known.get(name))
        if moved:
            self._log.debug("changes published since the last heartbeat ({names}); reloading", names=", ".join(moved))
        if "consumers" in moved:
            self._on_consumers()
        if "expiring" in moved:
            self._reload_expiring()

    def beat(self) -> None:
        """
        Say this instance is alive (only once in step with the cluster: an
        instance that has not reloaded its state, or refuses its token,
        does not count in C{instances_seen}), count the others, and catch
        up on any change the store holds that this instance missed (a
        publication lost on a subscription that went silent without
        closing).
        """

        def seen(heartbeat: Heartbeat) -> None:
            self._missed_beats = 0
            refused, self._heartbeat_refused = self._heartbeat_refused, None
            if refused is not None and self.up:
                # The store refused writes (out of memory, read-only), and
                # was never down: the consumers' calls counted here alone
                # meanwhile, and their changes not announced, go to it
                # now that it takes them (trial s46: limits passed).
                self._log.info(
                    "the cluster store takes writes again (it refused them: {reason}); adding the consumer calls "
                    "this instance counted alone meanwhile",
                    reason=refused,
                )
                self._on_writable()
            self.instances_seen = max(1, heartbeat.alive)
            self._heard(heartbeat, sent)
            self._look_for_namesakes()
            # A renewal that failed (or was due while the store was away)
            # is tried again here.
            self._renew()
            if not self._connected or self._catching_up is not None:
                return  # stopped or gone meanwhile, or a look already due
            lost = sorted(name for name, version in heartbeat.versions.items() if version < self.versions.get(name, 0))
            epoch, self._epoch = self._epoch, heartbeat.epoch
            if not lost and epoch and heartbeat.epoch and heartbeat.epoch != epoch and self.up:
                # Another instance wrote the route and token back first
                # (trial s46: only the first to see the loss put its calls
                # back): the rest of the store's keys (the consumers'
                # windows, the spends' marker) went all the same.
                self._log.warn(
                    "the cluster store lost its keys since this instance's last heartbeat (flushed, evicted or "
                    "restarted empty; another instance wrote the route and token back); adding this instance's "
                    "last minute of consumer calls back"
                )
                self._on_lost()
            if lost and self.up:
                # Versions never go down: the store lost these (FLUSHALL,
                # FLUSHDB, an eviction, a restart the connection survived).
                self._log.warn(
                    "the cluster store lost the {names} this instance knows (flushed, evicted or restarted empty); "
                    "writing {them} back",
                    names=" and ".join(lost),
                    them="them" if len(lost) > 1 else "it",
                )
                self._reload()
                # The rest of its keys went with them (the consumers' windows).
                self._on_lost()
                return
            replaced = sorted(
                name
                for name, version in heartbeat.versions.items()
                if version == self.versions.get(name)
                and name in heartbeat.values
                and self._replaced(name, heartbeat.values[name])
            )
            if replaced and self.up:
                # The same version with another value: the store lost the
                # state and an instance that reached it first (a newcomer)
                # wrote its own at the version this one knows.  The reload
                # settles it by L{_outranks}: the earlier wins (written
                # back, one version above), else is adopted here.
                self._log.warn(
                    "the cluster store holds a {names} this instance does not know at the version it knows "
                    "(the store lost the cluster's state and another instance wrote its own); keeping the one "
                    "set earlier",
                    names=" and ".join(replaced),
                )
                self._reload()
                return
            if any(version > (self._known(name) or 0) for name, version in heartbeat.versions.items()):
                # Its publication may be on its way still: look again in a
                # moment.
                self._catching_up = self._reactor.callLater(1.0, self._catch_up, heartbeat.versions)

        def missed(failure: Failure) -> None:
            refusal = failure.value
            if isinstance(refusal, WriteRefused):
                # The store answers, and refuses every write (out of
                # memory, read-only, its disk failing): no instance can
                # change anything, and this one is not cut off from it.
                # Said once, not taken for an outage: the instances whose
                # heartbeats it refuses stop being counted meanwhile.
                self._missed_beats = 0
                if self._heartbeat_refused != refusal.reason:
                    self._heartbeat_refused = refusal.reason
                    self._log.warn(
                        "the cluster store refuses this instance's heartbeat ({reason}): other instances stop "
                        "counting it, and every change is refused until it takes writes again: {advice}",
                        reason=refusal.reason,
                        advice=refusal.advice,
                    )
                return
            self._missed_beats += 1
            if self._missed_beats >= HEARTBEAT_MISSES:
                # A connection can stay dead without closing (a reconnection
                # that gave up): not a word from the store in this long.
                self._missed_beats = 0
                error = describe(failure.value, self._timeout)
                self.store.reconnect(f"no successful heartbeat in {HEARTBEAT_MISSES} intervals ({error})")

        sent = self._reactor.seconds()
        # Not waited for by the loop (a store slower than the interval
        # delays no beat); a fault in seen or missed (_renew, _reload, ...)
        # is logged with its context, not left to "Unhandled error in
        # Deferred".
        self._heartbeat_answers.watch(
            self._bounded(
                self.store.heartbeat(self.instance, HEARTBEAT_TTL_SECONDS, (ROUTE, TOKEN), self.up, self._database())
            ).addCallbacks(seen, missed)
        )
