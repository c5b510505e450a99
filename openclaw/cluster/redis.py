"""
The shared store on Redis, through txredisapi (Twisted-native: lazy
connections that reconnect with a backoff, pub/sub through
C{SubscriberFactory}).  Two connections: one for commands, one subscribed
to the cluster's channel; the subscribed one tells the node when Redis
comes and goes.

Keys (C{<CLUSTER_NAME>:...}): C{state:route} and C{state:token} (hashes of
C{version}, C{value} and C{origin}, the instance that wrote it),
C{write:<receipt>} (the version a write made, or 0 once fenced; expiring
after L{RECEIPT_SECONDS}), C{failures:<client key>} (a lockout's count),
C{databases} (a sorted set of the consumers' databases the instances
alive use, L{openclaw.consumers.store.ConsumerStore.identity}, scored with
expiry times as C{instances}: more than one is a cluster split between
databases), C{epoch} (a random mark, set by the first heartbeat that finds none: a
new one tells every instance the store lost its keys),
C{consumers:revoking} (a hash of key revokes an instance could not write
to the consumers' database yet: a key's SHA-256 hex -> C{consumer<TAB>prefix},
refused by every instance that reads it until one writes it),
C{changes} (a hash of counters each change published on the channel adds
1 to: C{consumers} for a consumer changed, C{expiring} for a key rest or a
lockout; each heartbeat reads them, so an instance whose subscription went
silent without closing learns what it missed: L{CHANGES});
three sorted sets scored with expiry times (milliseconds since the epoch,
on Redis's own clock, C{TIME}): C{instances} (the ids of the instances in
step with the cluster, each expiring 30 s after its last heartbeat and
removed when it stops), C{rests} (C{<provider>:<key fingerprint>}, or
C{<provider>/<model>:<key fingerprint>} for a rest of one model's calls:
L{openclaw.providers.keys.rest_subject}) and C{lockouts} (client keys); one channel, L{cluster_channel}
(C{<CLUSTER_NAME>:events}, or C{<CLUSTER_NAME>:<db>:events} on a
database other than 0: Redis's channels are the server's, not a
database's).
Each write is a Lua script, so the value, its version and its publication
are one atomic step and every node sees the writes in the order Redis made
them.  No script scans the keyspace: each costs O(log N) in the entries of
the keys it names (the expired ones are removed by score as it goes), so
unrelated keys in the same database cost nothing.  (The keys of earlier
versions, C{instance:*}, C{rest:*} and C{lockout:*}, are ignored and expire
on their own.)
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.application.internet import backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from openclaw.cluster.store import RECEIPT_SECONDS, Heartbeat, Versioned, WriteRefused
from openclaw.reactors import IClientReactor
from openclaw.tls import HostnameChecked, describe_tls_error, is_tls_error
from openclaw.urls import masked_url

if TYPE_CHECKING:
    from openclaw.cluster.node import ClusterNode

_WRITE = """
if redis.call('EXISTS', KEYS[3]) == 1 then
  return 0
end
if ARGV[6] ~= '' then
  local held = redis.call('HGET', KEYS[4], 'value')
  if held then
    local ok, document = pcall(cjson.decode, held)
    if not (ok and type(document) == 'table' and document['jti'] == ARGV[6]) then
      return -1
    end
  end
end
local v = math.max(tonumber(redis.call('HGET', KEYS[1], 'version') or '0'), tonumber(ARGV[5])) + 1
redis.call('HSET', KEYS[1], 'version', v, 'value', ARGV[2], 'origin', ARGV[3])
redis.call('SET', KEYS[3], v, 'PX', ARGV[4])
redis.call('PUBLISH', KEYS[2], 'v\\t' .. ARGV[1] .. '\\t' .. v .. '\\t' .. ARGV[3] .. '\\t' .. ARGV[2])
return v
"""

#: Redis's error replies that refuse a write before any of it is made
#: (their first word), and what to do about each.  OOM and READONLY come at
#: the script's first write (Redis checks neither once a script has
#: written; a replica writes nothing), MISCONF at its first write too (its
#: RDB snapshot or its append-only file failed: Redis refuses every write
#: until one succeeds, and none ends while a script runs), NOPERM on the script command itself
#: (a NOPERM from inside the script, which may come after its writes, is
#: not one of these).  Redis's documentation: "Script flags" (OOM in
#: scripts), ACL (NOPERM), replication (READONLY replicas), persistence
#: (C{stop-writes-on-bgsave-error}).
WRITE_REFUSALS: Mapping[str, str] = MappingProxyType({
    "OOM": "free memory in that Redis or raise its maxmemory, or set a maxmemory-policy that evicts other keys",
    "READONLY": "REDIS_URL points at a read-only replica: point it at the primary",
    "MISCONF": (
        "that Redis cannot persist to disk (its RDB snapshot or its append-only file failed; its log says why: "
        "a full disk, a directory it cannot write): fix that"
    ),
    "NOPERM": "grant the Redis ACL user of REDIS_URL the scripting commands (EVAL, EVALSHA, SCRIPT)",
})  # fmt: skip
#: How much of Redis's reply a refusal quotes (characters).
REFUSAL_CHARACTERS = 160


def _refused_write(failure: Failure) -> Failure:
    if failure.check(txredisapi.ResponseError):
        refusal = write_refusal(failure.getErrorMessage())
        if refusal is not None:
            return Failure(refusal)
    return failure


def write_refusal(message: str) -> WriteRefused | None:
    """
    The L{WriteRefused} for Redis's error reply C{message} when it is one
    of L{WRITE_REFUSALS} (nothing of the write was made); C{None} for any
    other (which may have come after part of it).
    """
    kind = message.split(" ", 1)[0]
    advice = WRITE_REFUSALS.get(kind)
    if advice is None or (kind == "NOPERM" and "@user_script" in message):
        return None
    # Redis's words without where in the script it stopped.
    reason = message.split(" script: ", 1)[0].rstrip(". ")
    if len(reason) > REFUSAL_CHARACTERS:
        reason = reason[: REFUSAL_CHARACTERS - 3] + "..."
    return WriteRefused(reason, advice)


#: Whether the cluster's session token (C{KEYS[1]}'s value) is the one of
#: jti C{ARGV[1]}, or none is held: 1, else 0.
_HOLDS_TOKEN = """
local held = redis.call('HGET', KEYS[1], 'value')
if not held then
  return 1
end
local ok, document = pcall(cjson.decode, held)
if ok and type(document) == 'table' and document['jti'] == ARGV[1] then
  return 1
end
return 0
"""

_CONFIRM = """
local v = redis.call('GET', KEYS[1])
if v then
  return tonumber(v)
end
redis.call('SET', KEYS[1], '0', 'PX', ARGV[1])
return 0
"""

_ENSURE = """
if redis.call('HSETNX', KEYS[1], 'value', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'version', ARGV[2], 'origin', ARGV[3])
end
return redis.call('HMGET', KEYS[1], 'version', 'value', 'origin')
"""

_REPLACE = """
local held = redis.call('HGET', KEYS[1], 'value')
local matches = not held
if held then
  local ok, document = pcall(cjson.decode, held)
  matches = ok and type(document) == 'table' and document['jti'] == ARGV[1]
end
if matches then
  local v = math.max(tonumber(redis.call('HGET', KEYS[1], 'version') or '0'), tonumber(ARGV[5])) + 1
  redis.call('HSET', KEYS[1], 'version', v, 'value', ARGV[2], 'origin', ARGV[3])
  redis.call('PUBLISH', KEYS[2], 'v\\t' .. ARGV[4] .. '\\t' .. v .. '\\t' .. ARGV[3] .. '\\t' .. ARGV[2])
end
return redis.call('HMGET', KEYS[1], 'version', 'value', 'origin')
"""

#: The start of the scripts that judge expiry: C{now}, Redis's clock in
#: milliseconds, and C{expiring(key, member, ms)}, which sets C{member}'s
#: expiry in the sorted set C{key}, removes the members that have expired
#: and lets the key expire with its last member.  (C{TIME} before a write
#: needs effects replication: the default from Redis 5, the only mode
#: from 7.)
_EXPIRY = """
if redis.replicate_commands then
  redis.replicate_commands()
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function expiring(key, member, ms)
  redis.call('ZADD', key, now + tonumber(ms), member)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', key, last[2])
end
"""

_REST = (
    _EXPIRY
    + """
expiring(KEYS[1], ARGV[3], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'expiring', 1)
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
"""
)

#: KEYS: instances, changes, channel, then the values' hashes, then epoch,
#: databases.  ARGV: TTL (seconds), instance, mark ('1' or '0'), the probe
#: to publish ('' for none), a new epoch (set when the store has none),
#: the instance's consumers' database ('' for none; marked with the
#: instance), then the counters of C{changes} to read.  Reply: the
#: instances alive, Redis's clock (milliseconds), the store's epoch, the
#: databases of the instances alive, the counters, then each value's
#: version and value.
_HEARTBEAT = (
    _EXPIRY
    + """
if ARGV[3] == '1' then
  expiring(KEYS[1], ARGV[2], tonumber(ARGV[1]) * 1000)
else
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
end
if ARGV[4] ~= '' then
  redis.call('PUBLISH', KEYS[3], ARGV[4])
end
local epoch = redis.call('GET', KEYS[#KEYS - 1])
if not epoch then
  epoch = ARGV[5]
  redis.call('SET', KEYS[#KEYS - 1], epoch)
end
if ARGV[3] == '1' and ARGV[6] ~= '' then
  expiring(KEYS[#KEYS], ARGV[6], tonumber(ARGV[1]) * 1000)
else
  redis.call('ZREMRANGEBYSCORE', KEYS[#KEYS], '-inf', now)
end
local found = {redis.call('ZCARD', KEYS[1]), now, epoch, redis.call('ZRANGE', KEYS[#KEYS], 0, -1)}
for i = 7, #ARGV do
  table.insert(found, tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '0'))
end
for i = 4, #KEYS - 2 do
  local held = redis.call('HMGET', KEYS[i], 'version', 'value')
  table.insert(found, tonumber(held[1] or '0'))
  table.insert(found, held[2] or '')
end
return found
"""
)


_FAILURE = (
    _EXPIRY
    + """
local locked = redis.call('ZSCORE', KEYS[2], ARGV[6])
if locked and tonumber(locked) > now then
  return 0
end
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
if n < tonumber(ARGV[2]) and ARGV[4] == '0' then
  return 0
end
expiring(KEYS[2], ARGV[6], ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('HINCRBY', KEYS[4], 'expiring', 1)
redis.call('PUBLISH', KEYS[3], ARGV[5])
return 1
"""
)

#: KEYS: changes, channel; ARGV: the message.  A consumer changed.
_CONSUMER = """
redis.call('HINCRBY', KEYS[1], 'consumers', 1)
return redis.call('PUBLISH', KEYS[2], ARGV[1])
"""

#: KEYS: revoking, changes, channel; ARGV: the number of fields, then
#: field, value pairs (a key's hash, C{consumer<TAB>prefix}), then the
#: messages.  Key revokes not yet in the database (L{publish_revokes}),
#: each consumer announced as changed.
_REVOKES = """
local fields = tonumber(ARGV[1])
for i = 2, 1 + 2 * fields, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
for i = 2 + 2 * fields, #ARGV do
  redis.call('HINCRBY', KEYS[2], 'consumers', 1)
  redis.call('PUBLISH', KEYS[3], ARGV[i])
end
return fields
"""

#: The counters of the hash C{<CLUSTER_NAME>:changes} (see the module):
#: C{consumers} (a consumer created, changed or deleted, a key added or
#: revoked) and C{expiring} (a key rest or a lockout).
CHANGES = ("consumers", "expiring")

#: How long after it was published an instance's heartbeat message (a
#: probe of its own subscription) must have come back on the cluster's
#: channel, in seconds, before the next heartbeat deems the subscription
#: silent.
PROBE_SECONDS = 2.0

#: The members of the sorted set KEYS[1] that have not expired, each
#: followed by its milliseconds left.
_EXPIRING = (
    _EXPIRY
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local found = {}
for i = 1, #held, 2 do
  table.insert(found, held[i])
  table.insert(found, tonumber(held[i + 1]) - now)
end
return found
"""
)


def _versioned(reply: list[Any]) -> Versioned:
    """
    A value's C{HMGET} of C{version}, C{value} and C{origin}.
    """
    held, text, origin = (item.decode() if isinstance(item, bytes) else item for item in reply)
    return Versioned(int(held), str(text), "" if origin is None else str(origin))


def redis_database(url: str) -> int | None:
    """
    The database a C{REDIS_URL} names: its path (C{redis://host/N}), else
    its C{db} query parameter (C{unix:///path?db=N}); L{None} when it
    names none (Redis's 0).

    @raise ValueError: the database is not a whole number (a URL that
        L{openclaw.settings} let through is never such).
    """
    parsed = urlsplit(url)
    query = parse_qs(parsed.query)
    if parsed.scheme == "unix":
        database = query.get("db", [""])[0]
    else:
        database = parsed.path.strip("/") or query.get("db", [""])[0]
    return int(database) if database else None


def cluster_channel(prefix: str, database: int | None) -> str:
    """
    The pub/sub channel of the cluster C{prefix} (C{CLUSTER_NAME}) whose
    store is Redis database C{database}: C{<prefix>:events} on database 0
    (or none named), C{<prefix>:<database>:events} on another.  Redis's
    channels belong to the server, not to a database ("Pub/Sub has no
    relation to the key space ... including database numbers",
    https://redis.io/docs/latest/develop/interact/pubsub/), so clusters of
    one name in two databases of one Redis would otherwise hear each
    other's changes.  (A C{CLUSTER_NAME} has no C{:}, so no cluster's
    channel on database 0 is another's on database N.)
    """
    return f"{prefix}:{database}:events" if database else f"{prefix}:events"


#: The largest database index Redis takes (its C{databases} setting is a
#: C int): a channel naming a larger one is no instance's (anyone who may
#: SUBSCRIBE can make one, with any digits).
MAX_DATABASE = 2**31 - 1


def channel_database(prefix: str, channel: str) -> int | None:
    """
    The database whose cluster C{prefix} (C{CLUSTER_NAME}) has the channel
    C{channel} (L{cluster_channel}'s inverse: C{<prefix>:events} is 0,
    C{<prefix>:<N>:events} is N); L{None} for a channel that is no
    cluster's of that name, such as one naming a database past
    L{MAX_DATABASE}.
    """
    if not channel.endswith(":events"):
        return None
    if channel == f"{prefix}:events":
        return 0
    head, _, middle = channel.removesuffix(":events").rpartition(":")
    if head != prefix or not (middle.isascii() and middle.isdigit()) or len(middle) > len(str(MAX_DATABASE)):
        return None
    database = int(middle)
    return database if database <= MAX_DATABASE else None


def channel_pattern(prefix: str) -> str:
    """
    The C{PUBSUB CHANNELS} glob of every channel of a cluster named
    C{prefix}, whatever its database (its glob characters escaped: a
    C{CLUSTER_NAME} has none, but the pattern does not rely on it).
    """
    escaped = "".join(f"\\{c}" if c in "*?[]\\^" else c for c in prefix)
    return f"{escaped}:*events"


def redis_endpoint(url: str, reactor: IClientReactor, timeout: float) -> tuple[IStreamClientEndpoint, dict[str, Any]]:
    """
    The client endpoint of a C{REDIS_URL} and the connection's C{dbid},
    C{username} and C{password}: the password from the URL's user
    information, else from a C{password} query parameter (as redis-py
    reads a UNIX socket's, C{unix:///path?db=0&password=...}).
    """
    parsed = urlsplit(url)
    query = parse_qs(parsed.query)
    endpoint: IStreamClientEndpoint
    if parsed.scheme == "unix":
        endpoint = UNIXClientEndpoint(reactor, parsed.path, timeout=timeout)
    else:
        host = parsed.hostname or "localhost"
        endpoint = HostnameEndpoint(reactor, host, parsed.port or 6379, timeout=timeout)
        if parsed.scheme == "rediss":
            endpoint = wrapClientTLS(HostnameChecked(optionsForClientTLS(host), host), endpoint)
    return endpoint, {
        "dbid": redis_database(url),
        "username": unquote(parsed.username) if parsed.username else None,
        "password": unquote(parsed.password) if parsed.password else query.get("password", [None])[0],
    }


class _Handshake:
    """
    What both connections tell the store: a Redis refusal of their
    handshake (C{AUTH}, C{SELECT}: Redis's own error, kept for the log) and
    the loss of the connection.  Public methods of txredisapi's protocol,
    extended.
    """

    factory: Any
    #: A reply took longer than txredisapi's C{replyTimeout}
    #: (REDIS_TIMEOUT_SECONDS), after which it aborts the connection.
    timed_out = False
    #: The server has sent a reply (Redis's protocol: what is not, an
    #: HTTP server's answer say, txredisapi ignores).
    answered = False

    def replyReceived(self, reply: Any) -> None:
        self.answered = True
        super().replyReceived(reply)  # type: ignore[misc]

    def execute_command(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        result: Deferred[Any] = super().execute_command(*args, **kwargs)  # type: ignore[misc]
        return result.addErrback(self._note_timeout)

    def _note_timeout(self, failure: Failure) -> Failure:
        if failure.check(txredisapi.TimeoutError):
            self.timed_out = True
        return failure

    def auth(self, password: Any, username: Any = None) -> Deferred[Any]:
        answered: Deferred[Any] = super().auth(password, username)  # type: ignore[misc]
        return answered.addErrback(self.factory.refused)

    def select(self, index: Any) -> Deferred[Any]:
        answered: Deferred[Any] = super().select(index)  # type: ignore[misc]
        return answered.addErrback(self.factory.refused)

    def connectionMade(self) -> Any:
        self.factory.opened.add(self)
        return super().connectionMade()  # type: ignore[misc]

    def connectionLost(self, why: Any) -> None:
        self.factory.opened.discard(self)
        # Said before txredisapi fails the commands waiting (and the store
        # rebuilds for that): why the connection went is known here.
        if is_tls_error(why.value):
            self.factory.store.attempt_failed(why.value, self.factory)
        elif not self.answered and not self.timed_out:
            self.factory.store.closed_unanswered(self.factory)
        super().connectionLost(why)  # type: ignore[misc]
        if self.timed_out:
            # Aborted by txredisapi at its replyTimeout: Redis frozen or
            # overloaded, not gone.  (Noted where it happens: over TLS the
            # abort reaches the protocol as a plain loss, the TLS layer's.)
            timeout = self.factory.store.timeout
            reason = f"Redis timed out: no answer within {timeout:g} s (REDIS_TIMEOUT_SECONDS)"
        else:
            reason = "lost the connection to Redis"
        self.factory.store.rebuild(reason, self.factory)


class _Command(_Handshake, txredisapi.RedisProtocol):  # type: ignore[misc]
    """
    The commands' connection.
    """


class _Subscriber(_Handshake, txredisapi.SubscriberProtocol):  # type: ignore[misc]
    """
    The subscribed connection: subscribes on connect and hands the store
    what is published.
    """

    def connectionMade(self) -> Any:
        made = super().connectionMade()
        self.whenConnected().addCallback(self._subscribe)
        return made

    def _subscribe(self, _: Any) -> None:
        self.factory.store.subscribing(self.factory, self.subscribe(self.factory.store.channel))

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.store.received(message)


class _Reconnecting:
    """
    What both factories add to txredisapi's: reconnection delays capped at
    C{maxDelay} (txredisapi's jitter is a normal variate around the
    delay, which can pass it), and a failed handshake handed to the store
    (txredisapi stops reconnecting that connection for good).
    """

    store: RedisStore
    maxDelay: float
    deferred: Deferred[Any] | None
    #: Redis's own answer when it refused the handshake (C{AUTH}, C{SELECT}).
    refusal: str | None = None
    #: The connections made (their protocols) and not lost yet, in the
    #: pool or still in their handshake (set in each C{__init__}).
    opened: set[Any]

    def retryDelay(self, attempt: int) -> float:
        return min(float(super().retryDelay(attempt)), self.maxDelay)  # type: ignore[misc]

    def refused(self, failure: Failure) -> Failure:
        if failure.check(txredisapi.ResponseError):
            self.refusal = failure.getErrorMessage()
        return failure

    def connectionError(self, why: str) -> None:
        super().connectionError(why)  # type: ignore[misc]
        # The connection whose handshake failed: still open when a reply
        # timed out (txredisapi aborts it next); lost, it said why itself.
        timed_out = any(protocol.timed_out for protocol in self.opened)
        self.store.handshake_failed(self, self.refusal, timed_out)
        self.refusal = None

    def quiet(self) -> None:
        """
        Nobody waits on C{deferred}, which a failed handshake fails.
        """
        if self.deferred is not None:
            self.deferred.addErrback(lambda failure: None)

    def abort(self) -> None:
        """
        Abort every connection still open (C{abortConnection}): one whose
        close did not finish (over TLS, C{loseConnection} waits for the
        server's end of the TLS handshake or its C{close_notify}, which a
        frozen server, or one that does not speak TLS, never sends).
        """
        for protocol in list(self.opened):
            if protocol.transport is not None:
                protocol.transport.abortConnection()


class _Commands(_Reconnecting, txredisapi.RedisFactory):  # type: ignore[misc]
    protocol = _Command

    def __init__(self, store: RedisStore, options: dict[str, Any]) -> None:
        super().__init__(
            # txredisapi's uuid: the connection's identity (a hash ring's
            # key), never its credentials, which go separately.
            masked_url(store.url),
            options["dbid"],
            1,
            # Not lazy: txredisapi then leaves a failed handshake to
            # connectionError (logged here, once) instead of logging it on
            # every attempt.
            isLazy=False,
            password=options["password"],
            username=options["username"],
            replyTimeout=store.timeout,
            convertNumbers=False,
        )
        self.store = store
        self.opened = set()
        self.quiet()


class _Subscribers(_Reconnecting, txredisapi.SubscriberFactory):  # type: ignore[misc]
    protocol = _Subscriber

    def __init__(self, store: RedisStore, options: dict[str, Any]) -> None:
        super().__init__(isLazy=False)
        self.store = store
        self.password = options["password"]
        self.username = options["username"]
        self.convertNumbers = False
        self.opened = set()
        self.quiet()


@implementer(IStreamClientEndpoint)
class _NotingEndpoint:
    """
    A C{REDIS_URL}'s endpoint, for the connections of C{factory}, that
    tells the store why a connection attempt failed
    (L{RedisStore.attempt_failed}): txredisapi's C{ClientService} tries
    again, saying nothing.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, store: RedisStore, factory: Any) -> None:
        self._endpoint = endpoint
        self._store = store
        self._factory = factory

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        connecting: Deferred[IProtocol] = self._endpoint.connect(protocolFactory)
        return connecting.addErrback(self._failed)

    def _failed(self, failure: Failure) -> Failure:
        # Cancelled: the store stopped or dropped these connections (an
        # attempt cancelled while resolving the host name fails with
        # DNSLookupError: the store then no longer uses the factory).
        if failure.value is not None and not failure.check(CancelledError):
            self._store.attempt_failed(failure.value, self._factory)
        return failure


#: What to do about a connection attempt that failed for a TLS error
#: (L{RedisStore.attempt_failed}).
_TLS_HINT = (
    "if Redis's certificate is from a CA of your own, add it to the system's trust store or give it with "
    "SSL_CERT_FILE (a PEM bundle of the system's CAs and Redis's: it replaces the system's store for the whole "
    "gateway), and check that REDIS_URL's host is a name (or address) the certificate names; a Redis without "
    "TLS needs redis://"
)

#: What to do about a Redis that wants a client certificate (its
#: C{tls-auth-clients}, C{yes} by default; OpenSSL's "certificate
#: required" alert).
_CLIENT_CERTIFICATE_HINT = (
    "this Redis asks for a client certificate, which the gateway does not send: set tls-auth-clients no "
    "(or optional) in its redis.conf, and keep it on a private network with a password"
)

#: How the reason the store is down (L{ClusterNode.down_reason}) starts
#: when Redis answered and refused this instance (its handshake, or the
#: subscription): a setting to change, logged with what to do, which
#: retrying will not mend.
REDIS_REFUSED = "Redis refused"

#: What to do about a server that gives no Redis answer.
_NOT_REDIS_HINT = (
    "check that REDIS_URL's host and port are Redis's, and its scheme: rediss:// for a Redis that takes TLS, "
    "redis:// for one that does not"
)

#: What to do about Redis refusing this instance's handshake, by the
#: start of Redis's error.
_REFUSAL_HINTS = (
    ("ERR DB index is out of range", "REDIS_URL names a database this Redis does not have: name one below its "
     "'databases' setting (16 by default), or raise that setting in redis.conf"),
    ("WRONGPASS", "check the user name and password in REDIS_URL"),
    ("NOAUTH", "this Redis wants a password: put it in REDIS_URL (redis://:PASSWORD@host:port/db)"),
    ("ERR AUTH", "this Redis has no password set: remove it from REDIS_URL, or set requirepass"),
)  # fmt: skip


class RedisStore:
    """
    L{openclaw.cluster.store.SharedStore} on Redis.  L{start} connects
    (txredisapi retries a connection that cannot be made, backing off up
    to C{reconnect_max} seconds); calls made while it connects wait for it:
    the node bounds each one with C{REDIS_TIMEOUT_SECONDS}.

    A connection lost, a handshake that failed (txredisapi then stops
    reconnecting for good: a C{SELECT} that timed out while Redis was
    frozen), a call that found no connection, a subscription not confirmed
    within C{REDIS_TIMEOUT_SECONDS}, or the node's word that heartbeats
    keep failing (L{reconnect}): the store drops both connections and
    connects afresh (L{rebuild}) after a delay that doubles from 0.25 s up
    to C{reconnect_max} (back to the start once in step again), telling
    the node it is down meanwhile; the node reloads the cluster's state
    once the new subscription is confirmed.
    """

    _log = Logger()

    def __init__(
        self,
        url: str,
        prefix: str,
        timeout: float,
        reconnect_max: float,
        reactor: IClientReactor,
        on_consumer: Callable[[str, str], None] | None = None,
    ) -> None:
        """
        @param on_consumer: called with (instance, consumer) for each
            consumer change an instance published (L{publish_consumer});
            see L{openclaw.consumers.shared.SharedConsumers.received}.
        """
        self.url = url
        self.prefix = prefix
        self.channel = cluster_channel(prefix, redis_database(url))
        self.timeout = timeout
        self.reconnect_max = reconnect_max
        self.reactor = reactor
        self.node: ClusterNode | None = None
        self.on_consumer = on_consumer
        #: The connections' factories in use (none while rebuilding).
        self._factories: list[Any] = []
        self._redis: Any = None
        #: The fresh connections' start, while waiting to make them.
        self._pending: IDelayedCall | None = None
        #: Rebuilds since a call last succeeded, and the wait before the
        #: next: 0.25 s, doubling up to reconnect_max.
        self._attempts = 0
        self._rebuild_policy = backoffPolicy(min(0.25, reconnect_max), reconnect_max, factor=2.0, jitter=lambda: 0.0)
        #: What was logged since a call last succeeded: Redis's refusals
        #: and why connection attempts failed.
        self._refusals: set[str] = set()
        #: The factories a rebuild dropped, until L{_discard} disconnects
        #: them (at C{_discard_call}); then their disconnections under way.
        self._undiscarded: list[Any] = []
        self._discard_call: IDelayedCall | None = None
        self._discarding: set[Deferred[Any]] = set()
        #: The current connections' subscription is confirmed.
        self._subscribed = False
        #: This instance's last heartbeat message not heard back yet on the
        #: subscription, and when (C{reactor.seconds}) it was published.
        self._probe: tuple[str, float] | None = None
        #: Why the last connection attempt failed (refused, no such host,
        #: Redis's refusal of the handshake), since the connections were
        #: last in step: the node's reason while down (C{status}'s
        #: C{cluster_store_error}), which a rebuild for a vaguer reason (a
        #: heartbeat or subscription timed out meanwhile) keeps.
        self._connection_failure: str | None = None

    def start(self, node: ClusterNode) -> None:
        self.node = node
        self._connect()

    def _connect(self) -> None:
        self._pending = None
        self._subscribed = False
        self._probe = None
        endpoint, options = redis_endpoint(self.url, self.reactor, self.timeout)
        factories: list[Any] = [_Commands(self, options), _Subscribers(self, options)]
        self._factories = factories
        self._redis = factories[0].handler
        for factory in factories:
            factory.maxDelay = self.reconnect_max
            factory.initialDelay = min(0.25, self.reconnect_max)
            factory.startConnecting(_NotingEndpoint(endpoint, self, factory))

    def stop(self) -> Deferred[Any]:
        """
        Stop connecting and close every connection, the ones a rebuild
        dropped included; fires once all are closed, within
        C{REDIS_TIMEOUT_SECONDS} (L{_disconnect}), and never fails.
        """
        self.node = None
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if self._discard_call is not None:
            self._discard_call.cancel()
            self._discard_call = None
        factories = [*self._factories, *self._undiscarded]
        self._factories, self._undiscarded = [], []
        stopping = [self._disconnect(factory) for factory in factories]
        return gatherResults([*stopping, *self._discarding], consumeErrors=True)

    def _disconnect(self, factory: Any) -> Deferred[None]:
        """
        Close C{factory}'s connections and stop it reconnecting
        (txredisapi's C{disconnect}), within C{REDIS_TIMEOUT_SECONDS}: the
        connections whose close has not finished by then are aborted
        (L{_Reconnecting.abort}), so a stop never waits on a server that
        does not answer.  Fires once they are all closed.
        """
        stopping: Deferred[Any] = factory.disconnect()
        aborting = self.reactor.callLater(self.timeout, factory.abort)

        def closed(result: object) -> None:
            if aborting.active():
                aborting.cancel()

        return stopping.addBoth(closed)

    def rebuild(self, reason: str, factory: Any = None) -> None:
        """
        Drop both connections and connect afresh after a delay (see the
        class); the node is told the store is down, with C{reason}.  Done
        once for the connections of C{factory} (L{None}: the current ones):
        what the dropped ones report afterwards is ignored.
        """
        node = self.node
        if node is None or self._pending is not None or (factory is not None and factory not in self._factories):
            return
        self._undiscarded.extend(self._factories)
        self._factories = []
        # Not from inside the connection's own callbacks: txredisapi's
        # ClientService cannot be stopped in the middle of a transition.
        if self._discard_call is None:
            self._discard_call = self.reactor.callLater(0, self._discard)
        delay = self._rebuild_policy(self._attempts)
        self._attempts += 1
        self._pending = self.reactor.callLater(delay, self._connect)
        failure = self._connection_failure
        node.lost(reason if failure is None or failure == reason else f"{failure} ({reason})")

    def reconnect(self, reason: str) -> None:
        """
        The node's word that the connections are not working
        (L{SharedStore.reconnect}): L{rebuild}.
        """
        self.rebuild(reason)

    def _discard(self) -> None:
        self._discard_call = None
        factories, self._undiscarded = self._undiscarded, []
        for factory in factories:
            stopping = self._disconnect(factory)
            self._discarding.add(stopping)
            stopping.addBoth(self._discarded, stopping)

    def _discarded(self, _: object, stopping: Deferred[Any]) -> None:
        self._discarding.discard(stopping)

    def handshake_failed(self, factory: Any, refusal: str | None, timed_out: bool) -> None:
        """
        A connection's handshake failed: Redis refused it (C{refusal}, its
        error: logged once until in step again, with what to do), did not
        answer in time (C{timed_out}: logged as L{attempt_failed} is), or
        the connection was lost (said by the connection).
        """
        if factory in self._factories:
            self._connection_failure = (
                f"{REDIS_REFUSED} the connection: {refusal}"
                if refusal
                else "Redis did not answer the connection's set-up"
            )
        if refusal is not None and refusal not in self._refusals:
            self._refusals.add(refusal)
            hint = next(
                (hint for start, hint in _REFUSAL_HINTS if refusal.startswith(start)),
                "check REDIS_URL and the Redis server's settings",
            )
            self._log.error(
                "the cluster store at {where} refused this instance: {refusal}; {hint}",
                where=masked_url(self.url),
                refusal=refusal,
                hint=hint,
            )
        elif timed_out:
            self._say_once(
                f"no answer to the connection's set-up (AUTH, SELECT) within {self.timeout:g} s "
                "(REDIS_TIMEOUT_SECONDS)",
                _NOT_REDIS_HINT + " (a Redis frozen or overloaded does not answer either)",
                factory,
            )
        self.rebuild(
            f"{REDIS_REFUSED} the connection: {refusal}" if refusal else "Redis did not answer the connection's set-up",
            factory,
        )

    def attempt_failed(self, error: BaseException, factory: Any) -> None:
        """
        A connection attempt (of C{factory}'s connections) failed with
        C{error}: a TLS handshake that failed (its reason, as
        L{openclaw.tls.describe_tls_error} words it: "certificate verify
        failed"), or a connection that could not be made (refused, no
        such host, no such socket, timed out).  Logged with what to do
        (L{_say_once}): the attempts go on, silently.
        """
        if is_tls_error(error):
            reason = f"the TLS handshake failed: {describe_tls_error(error)}"
            hint = _CLIENT_CERTIFICATE_HINT if "certificate required" in reason else _TLS_HINT
        else:
            reason = (str(error) or type(error).__name__).rstrip(". ")
            hint = "check that Redis is running and that REDIS_URL's host and port (or socket path) are right"
        self._failed_to_connect(reason, factory)
        self._say_once(reason, hint, factory)

    def closed_unanswered(self, factory: Any) -> None:
        """
        The server closed a connection of C{factory} without a Redis
        answer (an HTTP server, or a Redis that takes only TLS reached
        with C{redis://}): logged (L{_say_once}).
        """
        reason = "the server closed the connection without a Redis answer"
        self._failed_to_connect(reason, factory)
        self._say_once(reason, _NOT_REDIS_HINT, factory)

    def _failed_to_connect(self, reason: str, factory: Any) -> None:
        """
        A connection attempt of the connections in use failed for
        C{reason}: remembered, and the node's reason while down from now
        on (L{ClusterNode.still_down}).
        """
        if factory not in self._factories:
            return
        self._connection_failure = f"could not connect: {reason}"
        if self.node is not None:
            self.node.still_down(self._connection_failure)

    def _say_once(self, reason: str, hint: str, factory: Any) -> None:
        """
        Log why a connection attempt failed, with what to do: once for
        each C{reason} until a call succeeds again, and only for the
        connections in use (of C{factory}), not those being closed.
        """
        if self.node is None or factory not in self._factories:
            return
        if reason in self._refusals:
            return
        self._refusals.add(reason)
        self._log.warn(
            "could not connect to the cluster store at {where}: {reason}; {hint}",
            where=masked_url(self.url),
            reason=reason,
            hint=hint,
        )

    def subscribing(self, factory: Any, subscribed: Deferred[Any]) -> None:
        """
        The subscription of C{factory}'s connection was asked for: once
        confirmed, the node is connected; refused by Redis (its error
        reply, said with what to do) or not confirmed within
        C{REDIS_TIMEOUT_SECONDS}, the connections are rebuilt.
        """

        def confirmed(_: Any) -> None:
            if self.node is not None and factory in self._factories:
                self._subscribed = True
                self._connection_failure = None
                self.node.connected()

        def failed(failure: Failure) -> None:
            if failure.check(txredisapi.ResponseError):
                # Redis answered, and said no (an ACL without SUBSCRIBE or
                # without the channel): the node's reason while down.
                refusal = failure.getErrorMessage()
                reason = f"{REDIS_REFUSED} the subscription to the cluster's channel: {refusal}"
                if factory in self._factories:
                    self._connection_failure = reason
                # A password asked or refused (set on Redis meanwhile) is
                # said as the handshake's is, not as a missing ACL grant.
                hint = next((hint for start, hint in _REFUSAL_HINTS if refusal.startswith(start)), None)
                self._say_once(
                    f"Redis refused the subscription to the cluster's channel {self.channel!r}: {refusal}",
                    hint
                    or "grant the Redis ACL user of REDIS_URL the SUBSCRIBE command and that channel "
                    f"(ACL SETUSER <user> +subscribe &{self.channel})",
                    factory,
                )
                self.rebuild(reason, factory)
                return
            if failure.check(DeferredTimeoutError):
                # (Not a lost connection: that said why itself.)
                self._say_once(
                    f"the subscription to the cluster's channel was not confirmed within {self.timeout:g} s "
                    "(REDIS_TIMEOUT_SECONDS)",
                    _NOT_REDIS_HINT + " (a Redis frozen or overloaded does not answer either)",
                    factory,
                )
            self.rebuild(f"the subscription was not confirmed within {self.timeout:g} s", factory)

        subscribed.addTimeout(self.timeout, self.reactor).addCallbacks(confirmed, failed)

    def received(self, message: Any) -> None:
        node = self.node
        if node is None:
            return
        text = message.decode() if isinstance(message, bytes) else str(message)
        parts = text.split("\t", 4)
        try:
            if parts[0] == "v" and len(parts) == 5:
                node.received(parts[1], int(parts[2]), parts[4], parts[3])
            elif parts[0] == "r" and len(parts) == 5:
                node.rested(parts[1], parts[2], parts[3], float(parts[4]))
            elif parts[0] == "l" and len(parts) == 4:
                node.locked(parts[1], parts[2], float(parts[3]))
            elif parts[0] == "c" and len(parts) == 3 and self.on_consumer is not None:
                self.on_consumer(parts[1], parts[2])
            elif parts[0] == "p" and len(parts) == 3 and parts[1] == node.instance and parts[2] == self._probe_nonce():
                self._probe = None
        except ValueError:
            self._log.warn("ignoring a malformed cluster message")

    def _probe_nonce(self) -> str | None:
        return None if self._probe is None else self._probe[0]

    def _eval(self, script: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        if not self._factories:
            return fail(txredisapi.ConnectionError("reconnecting to the cluster store"))
        factory = self._factories[0]

        def succeeded(reply: Any) -> Any:
            if self.node is not None and self.node.up:
                # Back in step: the next outage starts from short delays.
                self._attempts = 0
                self._refusals.clear()
            return reply

        def failed(failure: Failure) -> Failure:
            # "Not connected": txredisapi gave this connection up.
            if failure.check(txredisapi.ConnectionError) and not failure.check(txredisapi.TimeoutError):
                self.rebuild(f"a call found no connection ({failure.getErrorMessage()})", factory)
            return failure

        evaluated: Deferred[Any] = self._redis.eval(script, keys, args)
        return evaluated.addCallbacks(succeeded, failed)

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def key(self, *parts: str) -> str:
        """
        The Redis key C{<CLUSTER_NAME>:<part>:...}.
        """
        return self._key(*parts)

    def script(self, source: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        """
        Run a Lua script (one round trip: txredisapi sends EVALSHA once the
        script is known); fires with its reply, or fails.
        """
        return self._eval(source, keys, args)

    def publish_consumer(self, instance: str, name: str) -> Deferred[Any]:
        """
        Tell every instance that consumer C{name} changed (C{c} messages
        on the cluster's channel), and count the change (C{changes}'
        C{consumers}) for the instances that miss the message.
        """
        return self._eval(_CONSUMER, [self._key("changes"), self.channel], [f"c\t{instance}\t{name}"])

    def publish_revokes(self, instance: str, revokes: Mapping[str, tuple[str, str]], names: list[str]) -> Deferred[Any]:
        """
        Keep C{revokes} (a key's SHA-256 hex -> (consumer, prefix)), key
        revokes the database has not taken yet, in C{consumers:revoking},
        and announce the consumers C{names} as changed (L{publish_consumer}),
        in one step: an instance told reads them (L{revokes}).
        """
        fields = [part for hashed, (name, prefix) in sorted(revokes.items()) for part in (hashed, f"{name}\t{prefix}")]
        return self._eval(
            _REVOKES,
            [self._key("consumers", "revoking"), self._key("changes"), self.channel],
            [str(len(revokes)), *fields, *(f"c\t{instance}\t{name}" for name in names)],
        )

    def revokes(self) -> Deferred[dict[str, tuple[str, str]]]:
        """
        The key revokes an instance could not write to the database yet
        (L{publish_revokes}): a key's SHA-256 hex -> (consumer, prefix).
        """

        def read(reply: Any) -> dict[str, tuple[str, str]]:
            flat = [part.decode() if isinstance(part, bytes) else str(part) for part in reply or []]
            revokes: dict[str, tuple[str, str]] = {}
            for hashed, value in zip(flat[::2], flat[1::2], strict=True):
                name, tab, prefix = value.partition("\t")
                if tab:
                    revokes[hashed] = (name, prefix)
            return revokes

        return self._eval(
            "return redis.call('HGETALL', KEYS[1])", [self._key("consumers", "revoking")], []
        ).addCallback(read)

    def revokes_saved(self, hashes: list[str]) -> Deferred[Any]:
        """
        Forget the key revokes of C{hashes}: the database has them.
        """
        return self._eval(
            "return redis.call('HDEL', KEYS[1], unpack(ARGV))", [self._key("consumers", "revoking")], hashes
        )

    def write(
        self, name: str, value: str, origin: str, receipt: str, known: int, token_jti: str | None = None
    ) -> Deferred[int]:
        return self._eval(
            _WRITE,
            [self._key("state", name), self.channel, self._key("write", receipt), self._key("state", "token")],
            [name, value, origin, str(RECEIPT_SECONDS * 1000), str(known), token_jti or ""],
        ).addCallbacks(int, _refused_write)

    def holds_token(self, token_jti: str) -> Deferred[bool]:
        return self._eval(_HOLDS_TOKEN, [self._key("state", "token")], [token_jti]).addCallback(lambda held: held == 1)

    def confirm(self, receipt: str) -> Deferred[int]:
        return self._eval(_CONFIRM, [self._key("write", receipt)], [str(RECEIPT_SECONDS * 1000)]).addCallback(int)

    def ensure(self, name: str, value: str, version: int, origin: str) -> Deferred[Versioned]:
        return self._eval(_ENSURE, [self._key("state", name)], [value, str(version), origin]).addCallback(_versioned)

    def replace(self, name: str, jti: str, value: str, origin: str, known: int) -> Deferred[Versioned]:
        return self._eval(
            _REPLACE, [self._key("state", name), self.channel], [jti, value, origin, name, str(known)]
        ).addCallback(_versioned)

    def rest(self, subject: str, key_fingerprint: str, seconds: float) -> Deferred[None]:
        assert self.node is not None
        message = f"r\t{self.node.instance}\t{subject}\t{key_fingerprint}\t{seconds}"
        return self._eval(
            _REST,
            [self._key("rests"), self.channel, self._key("changes")],
            [str(max(1, round(seconds * 1000))), message, f"{subject}:{key_fingerprint}"],
        ).addCallback(lambda _: None)

    def count_failure(self, key: str, window: float, failures: int, duration: float, lock: bool) -> Deferred[bool]:
        assert self.node is not None
        message = f"l\t{self.node.instance}\t{key}\t{duration}"
        return self._eval(
            _FAILURE,
            [self._key("failures", key), self._key("lockouts"), self.channel, self._key("changes")],
            [
                str(max(1, round(window * 1000))),
                str(failures),
                str(max(1, round(duration * 1000))),
                "1" if lock else "0",
                message,
                key,
            ],
        ).addCallback(lambda locked: int(locked) == 1)

    def _expiring(self, name: str) -> Deferred[dict[str, float]]:
        """
        The members of the sorted set C{name} that have not expired:
        member -> seconds left.
        """

        def pairs(reply: list[Any]) -> dict[str, float]:
            found: dict[str, float] = {}
            for member, left in zip(reply[::2], reply[1::2], strict=True):
                found[member.decode() if isinstance(member, bytes) else str(member)] = int(left) / 1000
            return found

        return self._eval(_EXPIRING, [self._key(name)], []).addCallback(pairs)

    def lockouts(self) -> Deferred[dict[str, float]]:
        return self._expiring("lockouts")

    def resting(self) -> Deferred[dict[tuple[str, str], float]]:
        def split(found: dict[str, float]) -> dict[tuple[str, str], float]:
            resting: dict[tuple[str, str], float] = {}
            for member, seconds in found.items():
                provider, _, key_fingerprint = member.rpartition(":")
                resting[provider, key_fingerprint] = seconds
            return resting

        return self._expiring("rests").addCallback(split)

    def heartbeat(
        self, instance: str, ttl_seconds: int, names: tuple[str, ...], mark: bool, database: str = ""
    ) -> Deferred[Heartbeat]:
        """
        See L{SharedStore.heartbeat}; also checks that the subscription
        hears: once subscribed, each heartbeat publishes a message of this
        instance's (C{p}) unless the last one is still on its way; one not
        heard back within L{PROBE_SECONDS} (a subscription gone silent
        without closing: a NAT or firewall that drops an idle connection's
        traffic) makes the store L{rebuild} its connections, which the node
        sees as an outage and a reload of everything the channel carries.
        """
        probe = ""
        if self._subscribed:
            if self._probe is None:
                nonce = uuid.uuid4().hex
                self._probe = (nonce, self.reactor.seconds())
                probe = f"p\t{instance}\t{nonce}"
            elif self.reactor.seconds() - self._probe[1] >= PROBE_SECONDS:
                since = self.reactor.seconds() - self._probe[1]
                self.rebuild(
                    f"the subscription to the cluster's channel went silent without closing: this instance's heartbeat "
                    f"message of {since:.0f} s ago never came back on it (check the network path to Redis for a NAT "
                    "or firewall that drops an idle connection's traffic)"
                )
        sent = self._probe

        def heard(reply: list[Any]) -> Heartbeat:
            epoch = reply[2].decode() if isinstance(reply[2], bytes) else str(reply[2])
            databases = frozenset(each.decode() if isinstance(each, bytes) else str(each) for each in reply[3] or [])
            counters = reply[4 : 4 + len(CHANGES)]
            held = reply[4 + len(CHANGES) :]
            values = [value.decode() if isinstance(value, bytes) else str(value) for value in held[1::2]]
            return Heartbeat(
                int(reply[0]),
                {name: int(version) for name, version in zip(names, held[::2], strict=True)},
                dict(zip(names, values, strict=True)),
                now=int(reply[1]) / 1000,
                changes={name: int(count) for name, count in zip(CHANGES, counters, strict=True)},
                epoch=epoch,
                databases=databases,
            )

        def failed(failure: Failure) -> Failure:
            if probe and self._probe is sent:
                # Published or not: not judged.
                self._probe = None
            # A refusal of its first write (it writes before it reads).
            return _refused_write(failure)

        return self._eval(
            _HEARTBEAT,
            [
                self._key("instances"),
                self._key("changes"),
                self.channel,
                *(self._key("state", name) for name in names),
                self._key("epoch"),
                self._key("databases"),
            ],
            [str(ttl_seconds), instance, "1" if mark else "0", probe, uuid.uuid4().hex, database, *CHANGES],
        ).addCallbacks(heard, failed)

    def other_databases(self) -> Deferred[tuple[int, ...]]:
        """
        See L{SharedStore.other_databases}: Redis's C{PUBSUB CHANNELS} with
        L{channel_pattern} (the channels with a subscriber, server-wide;
        it goes over the server's channels, never its keys), this store's
        own channel left out.
        """
        if not self._factories:
            return fail(txredisapi.ConnectionError("reconnecting to the cluster store"))
        own = redis_database(self.url) or 0

        def databases(reply: Any) -> tuple[int, ...]:
            found: set[int] = set()
            for item in reply or ():
                channel = item.decode(errors="replace") if isinstance(item, bytes) else str(item)
                database = channel_database(self.prefix, channel)
                if database is not None and database != own:
                    found.add(database)
            return tuple(sorted(found))

        listed: Deferred[Any] = self._redis.execute_command("PUBSUB", "CHANNELS", channel_pattern(self.prefix))
        return listed.addCallback(databases)

    def leave(self, instance: str) -> Deferred[None]:
        if not self._factories:
            return fail(txredisapi.ConnectionError("reconnecting to the cluster store"))
        removed: Deferred[Any] = self._redis.zrem(self._key("instances"), instance)
        return removed.addCallback(lambda _: None)
