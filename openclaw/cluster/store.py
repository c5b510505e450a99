"""
What a cluster needs of its shared store (L{SharedStore}), and an
in-process one (L{MemoryStore}) for tests that run several nodes on one
L{twisted.internet.task.Clock}.

The store holds a few named, versioned values (C{route}, C{token}): every
write increments the version and publishes C{(name, version, value,
origin)} to every node, in the order the writes happened, so a node that
applies only versions newer than the one it knows converges on the last
write.

Each write carries a receipt (a random id): the store remembers the
version a receipt's write made, and L{SharedStore.confirm} answers it, or
fences the receipt so that its write, if it has not happened yet, never
will.  A node whose write timed out learns that way whether it happened.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Protocol

import attrs
from twisted.internet.defer import Deferred, fail, succeed


@attrs.frozen
class Versioned:
    """
    A shared value and its version (1 and up; every write adds 1).
    """

    version: int
    value: str
    #: The instance that wrote it, when known.
    origin: str = ""


@attrs.frozen
class Heartbeat:
    """
    What a heartbeat learns: how many instances are alive, and the version
    of each shared value (name -> version; 0 for none), to notice a
    published write this node missed; and each value (name -> value; ""
    for none), to notice one the store holds at the version this node
    knows but that is not the one it knows (the store lost the state and
    another instance wrote its own meanwhile); the store's clock (POSIX
    seconds, C{None} when unknown), which the cluster's decisions judge
    time by; and the counters of the changes published (name -> count:
    C{consumers}, C{expiring}, for the key rests and lockouts), which
    move with every change, to notice changes this node missed.
    """

    alive: int
    versions: dict[str, int]
    values: dict[str, str] = attrs.field(factory=dict)
    now: float | None = None
    changes: dict[str, int] = attrs.field(factory=dict)
    #: The store's epoch: a random mark the first heartbeat to find none
    #: writes (C{<CLUSTER_NAME>:epoch}, set if absent); another than the
    #: one a node saw last means the store lost its keys, whoever wrote
    #: the route and token back.
    epoch: str = ""
    #: The consumers' databases the instances alive use (as each gives
    #: it to its heartbeat: L{openclaw.consumers.store.ConsumerStore.identity});
    #: more than one: the cluster is split between databases.
    databases: frozenset[str] = frozenset()


#: Called with (name, version, value, origin) for every write anyone makes.
Listener = Callable[[str, int, str, str], None]

#: How long the store keeps a write's receipt (and a fence), in seconds:
#: far longer than any write can be held up and still happen.
RECEIPT_SECONDS = 3600


class WriteRefused(Exception):
    """
    The store refused a write outright, before making any of it (Redis
    out of memory, a read-only replica, an ACL without the scripting
    commands): nothing changed, and retrying as it stands will not help.

    @ivar reason: the store's own words, clipped (no secret: Redis does not
        echo values in these replies).
    @ivar advice: what the operator can do, in one clause.
    """

    def __init__(self, reason: str, advice: str) -> None:
        super().__init__(f"{reason} ({advice})")
        self.reason = reason
        self.advice = advice


class SharedStore(Protocol):
    """
    The operations a L{openclaw.cluster.node.ClusterNode} uses.  Every
    Deferred fails (with any exception) when the store cannot be reached in
    time; nothing here retries.
    """

    def write(
        self, name: str, value: str, origin: str, receipt: str, known: int, token_jti: str | None = None
    ) -> Deferred[int]:
        """
        Replace C{name}'s value (written by instance C{origin}), publish
        it, remember C{receipt} with the new version, and fire with that
        version; 0 (nothing written) when C{receipt} was fenced by
        L{confirm} first; -1 (nothing written) when C{token_jti} is given
        and the cluster's session token (C{token}'s value) is another's:
        the writer has not applied a rotation yet, and the command it
        writes for was authorised by a token the cluster has revoked.  The new version is one above the greater of the
        stored one and C{known} (the highest the caller knows), so the
        nodes apply it even if the store lost the value (a C{FLUSHALL})
        while they kept running.

        @raise WriteRefused: (as a failure) the store refused it before
            writing anything.
        """

    def holds_token(self, token_jti: str) -> Deferred[bool]:
        """
        Whether the cluster's session token (C{token}'s value) is the one of
        jti C{token_jti}, or none is held.
        """

    def confirm(self, receipt: str) -> Deferred[int]:
        """
        The version the write with C{receipt} made; 0 when it has not
        happened, in which case it never will (the receipt is fenced).
        """

    def ensure(self, name: str, value: str, version: int, origin: str) -> Deferred[Versioned]:
        """
        Set C{name} to C{value} at C{version} (written by instance
        C{origin}) only if it has no value (an atomic set-if-absent), and
        fire with what it holds afterwards.
        """

    def replace(self, name: str, jti: str, value: str, origin: str, known: int) -> Deferred[Versioned]:
        """
        Replace C{name}'s value (a JSON object) with C{value} (written by
        instance C{origin}) only if the one it holds has the C{jti} C{jti},
        or it holds none: an atomic compare-and-set, published as L{write}s
        are.  The new version is one above the greater of the stored one
        and C{known} (the highest the caller knows), so the nodes apply it
        even if the store lost the value (a C{FLUSHALL}) while they kept
        running.  Fire with what it holds afterwards.  Of several instances
        replacing the same value, one wins; the others get its value.
        """

    def rest(self, subject: str, key_fingerprint: str, seconds: float) -> Deferred[None]:
        """
        Record that a provider key rests for C{seconds} (a key expiring
        with it) and tell the other nodes; C{subject} names what for: a
        provider, or one of its models
        (L{rest_subject <openclaw.providers.keys.rest_subject>}).
        """

    def heartbeat(
        self, instance: str, ttl_seconds: int, names: tuple[str, ...], mark: bool, database: str = ""
    ) -> Deferred[Heartbeat]:
        """
        Mark C{instance} alive for C{ttl_seconds} (only if C{mark}: an
        instance not in step with the cluster yet only looks), and its
        consumers' C{database} ("" for none known) with it; fire with
        how many instances are alive, the versions of the values
        C{names}, and the databases of the instances alive.
        """

    def leave(self, instance: str) -> Deferred[None]:
        """
        C{instance} is no longer alive (it stops): it counts no more.
        """

    def count_failure(self, key: str, window: float, failures: int, duration: float, lock: bool) -> Deferred[bool]:
        """
        Count one failed authentication from client C{key} (a counter
        expiring C{window} seconds after the first failure it counts); when
        the count reaches C{failures} (or C{lock} is true: this node locked
        it out already), lock C{key} out for C{duration} seconds and tell
        every node.  Fire with whether this call locked it out.
        """

    def lockouts(self) -> Deferred[dict[str, float]]:
        """
        The clients locked out now: key -> seconds left.
        """

    def resting(self) -> Deferred[dict[tuple[str, str], float]]:
        """
        The provider keys resting now: (provider, key fingerprint) ->
        seconds left.
        """

    def other_databases(self) -> Deferred[tuple[int, ...]]:
        """
        The other databases of the same Redis server in which instances of
        this cluster's C{CLUSTER_NAME} are listening now (their channel,
        L{openclaw.cluster.redis.cluster_channel}, has a subscriber), in
        ascending order; C{()} for none.  Such instances are another
        cluster: they share nothing with this one but the name.

        @raise Exception: (as a failure) the store would not say (an ACL
            without C{PUBSUB}, a proxy without it) or could not be reached.
        """

    def reconnect(self, reason: str) -> None:
        """
        The store's connections seem dead (C{reason}: calls keep failing):
        drop them and connect afresh, telling the node it is down
        meanwhile (L{openclaw.cluster.node.ClusterNode.lost}).
        """


class MemoryStore:
    """
    A L{SharedStore} in one process: several nodes on one store behave as
    nodes on one Redis, without a network.  C{up = False} makes every call
    fail, as an unreachable Redis would.

    @ivar lose_replies: how many of the next writes are made without their
        answer ever arriving (a reply lost or late past the timeout).
    @ivar hold_writes: writes are queued (in L{held}) without being made
        until L{release} (a write held up on its way to the store).
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.up = True
        self.values: dict[str, Versioned] = {}
        self.rests: dict[tuple[str, str], float] = {}
        self.alive: dict[str, float] = {}
        self.listeners: list[Listener] = []
        self.rest_listeners: list[Callable[[str, str, float], None]] = []
        self.failures: dict[str, tuple[int, float]] = {}
        self.locks: dict[str, float] = {}
        self.lock_listeners: list[Callable[[str, float], None]] = []
        self.receipts: dict[str, int] = {}
        self.lose_replies = 0
        self.hold_writes = False
        self.held: list[tuple[str, str, str, str, int, Deferred[int]]] = []
        #: The reasons L{reconnect} was called with.
        self.reconnects: list[str] = []
        #: The counters of the changes published (L{Heartbeat.changes}).
        self.changes: dict[str, int] = {"consumers": 0, "expiring": 0}
        #: What L{other_databases} answers: databases, or an exception to
        #: fail with (a refusal).
        self.namesakes: tuple[int, ...] | Exception = ()
        #: How many times L{other_databases} was asked.
        self.namesake_looks = 0
        #: The store's epoch (L{Heartbeat.epoch}): made by the first
        #: heartbeat that finds none.
        self.epoch = ""
        #: The consumers' databases of the instances marked alive, each
        #: until when.
        self.databases: dict[str, float] = {}

    def flush(self) -> None:
        """
        Lose everything, as Redis does at C{FLUSHALL} or restarted empty:
        the shared values, the instances' heartbeats, the key rests, the
        failure counts and lockouts, the receipts; the change counters go
        back to 0.
        """
        for held in (self.values, self.alive, self.rests, self.failures, self.locks, self.receipts, self.databases):
            held.clear()
        self.changes = dict.fromkeys(self.changes, 0)
        self.epoch = ""

    def write(
        self, name: str, value: str, origin: str, receipt: str, known: int, token_jti: str | None = None
    ) -> Deferred[int]:
        if not self.up:
            return fail(ConnectionError("the store is down"))
        if self.hold_writes:
            pending: Deferred[int] = Deferred()
            self.held.append((name, value, origin, receipt, known, pending))
            return pending
        if token_jti is not None and receipt not in self.receipts:
            held = self.values.get("token")
            if held is not None and json.loads(held.value).get("jti") != token_jti:
                return succeed(-1)
        version = self._write(name, value, origin, receipt, known)
        if self.lose_replies:
            self.lose_replies -= 1
            return Deferred()
        return succeed(version)

    def _write(self, name: str, value: str, origin: str, receipt: str, known: int = 0) -> int:
        if receipt in self.receipts:
            return 0
        old = self.values.get(name)
        version = max(old.version if old else 0, known) + 1
        self.values[name] = Versioned(version, value, origin)
        self.receipts[receipt] = version
        for listener in list(self.listeners):
            listener(name, version, value, origin)
        return version

    def release(self) -> None:
        """
        Make the held writes now, in order (those fenced meanwhile do
        nothing); their answers go nowhere.
        """
        self.hold_writes = False
        held, self.held = self.held, []
        for name, value, origin, receipt, known, _ in held:
            self._write(name, value, origin, receipt, known)

    def holds_token(self, token_jti: str) -> Deferred[bool]:
        if not self.up:
            return fail(ConnectionError("the store is down"))
        held = self.values.get("token")
        return succeed(held is None or json.loads(held.value).get("jti") == token_jti)

    def confirm(self, receipt: str) -> Deferred[int]:
        if not self.up:
            return fail(ConnectionError("the store is down"))
        return succeed(self.receipts.setdefault(receipt, 0))

    def ensure(self, name: str, value: str, version: int, origin: str) -> Deferred[Versioned]:
        if not self.up:
            return fail(ConnectionError("the store is down"))
        return succeed(self.values.setdefault(name, Versioned(version, value, origin)))

    def replace(self, name: str, jti: str, value: str, origin: str, known: int) -> Deferred[Versioned]:
        if not self.up:
            return fail(ConnectionError("the store is down"))
        held = self.values.get(name)
        try:
            matches = held is None or json.loads(held.value)["jti"] == jti
        except (ValueError, KeyError, TypeError):
            matches = False
        if matches:
            self._write(name, value, origin, uuid.uuid4().hex, known)
        return succeed(self.values[name])

    def rest(self, subject: str, key_fingerprint: str, seconds: float) -> Deferred[None]:
        if not self.up:
            return fail(ConnectionError("the store is down"))
        self.rests[subject, key_fingerprint] = self.clock() + seconds
        self.changes["expiring"] += 1
        for listener in list(self.rest_listeners):
            listener(subject, key_fingerprint, seconds)
        return succeed(None)

    def count_failure(self, key: str, window: float, failures: int, duration: float, lock: bool) -> Deferred[bool]:
        if not self.up:
            return fail(ConnectionError("the store is down"))
        now = self.clock()
        if self.locks.get(key, 0.0) > now:
            return succeed(False)
        count, until = self.failures.get(key, (0, now + window))
        if until <= now:
            count, until = 0, now + window
        self.failures[key] = (count + 1, until)
        if count + 1 < failures and not lock:
            return succeed(False)
        self.locks[key] = now + duration
        self.failures.pop(key, None)
        self.changes["expiring"] += 1
        for listener in list(self.lock_listeners):
            listener(key, duration)
        return succeed(True)

    def lockouts(self) -> Deferred[dict[str, float]]:
        if not self.up:
            return fail(ConnectionError("the store is down"))
        now = self.clock()
        return succeed({key: until - now for key, until in self.locks.items() if until > now})

    def resting(self) -> Deferred[dict[tuple[str, str], float]]:
        if not self.up:
            return fail(ConnectionError("the store is down"))
        now = self.clock()
        return succeed({name: until - now for name, until in self.rests.items() if until > now})

    def reconnect(self, reason: str) -> None:
        self.reconnects.append(reason)

    def other_databases(self) -> Deferred[tuple[int, ...]]:
        self.namesake_looks += 1
        if not self.up:
            return fail(ConnectionError("the store is down"))
        if isinstance(self.namesakes, Exception):
            return fail(self.namesakes)
        return succeed(self.namesakes)

    def heartbeat(
        self, instance: str, ttl_seconds: int, names: tuple[str, ...], mark: bool, database: str = ""
    ) -> Deferred[Heartbeat]:
        if not self.up:
            return fail(ConnectionError("the store is down"))
        now = self.clock()
        if mark:
            self.alive[instance] = now + ttl_seconds
            if database:
                self.databases[database] = now + ttl_seconds
        databases = frozenset(name for name, until in self.databases.items() if until > now)
        versions = {name: self.values[name].version if name in self.values else 0 for name in names}
        values = {name: self.values[name].value if name in self.values else "" for name in names}
        alive = sum(1 for until in self.alive.values() if until > now)
        if not self.epoch:
            self.epoch = uuid.uuid4().hex
        return succeed(
            Heartbeat(
                alive, versions, values, now=now, changes=dict(self.changes), epoch=self.epoch, databases=databases
            )
        )

    def leave(self, instance: str) -> Deferred[None]:
        if not self.up:
            return fail(ConnectionError("the store is down"))
        self.alive.pop(instance, None)
        return succeed(None)
