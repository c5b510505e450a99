"""
Consumers in a cluster (C{REDIS_URL} set): the per-minute windows, the
reservations of calls in flight and the period's spend live in Redis, so a
limit holds across every instance instead of multiplying by their number;
consumer changes reach every instance through the cluster's channel.

Admission is one Lua script (L{ADMIT}: one round trip, EVALSHA once
known) that checks the budget, C{tpm} and C{rpm} and, when admitted,
counts the request and reserves the call's estimated cost and tokens,
atomically.
Counting after the answer is another (L{COUNT}), off the admission path.

Redis keys (C{<CLUSTER_NAME>:consumer:<name>:<created>:...}, C{created}
the consumer's C{created_at}: a consumer deleted and created again under
its name is another, whose counters a late count of the deleted one's
calls, on any instance, cannot reach): C{rpm} and C{tpm}
(hashes of whole POSIX seconds -> amount, expiring after
L{WINDOW_KEY_SECONDS}; a sliding window at 1 s resolution, each second
counted for L{CLUSTER_WINDOW_SECONDS}: a call for 60 to 61 s), C{reserved} (second of admission -> US
dollars) and C{reserved_tokens} (second of admission -> tokens), both
expiring after L{RESERVATION_SECONDS}, C{spend:<period>} (US dollars, C{INCRBYFLOAT}; a day's kept 3
days, a month's 40).  C{<CLUSTER_NAME>:consumers:seeded:2} says the spends
were seeded from the database: a Redis that comes back empty has no such
key, so spends are not counted there (they still reach the database) and
budgets are checked per instance until an instance re-seeds them from the
database (L{SharedConsumers.seed}).  Its value, new at each seed, says
which Redis an instance's counts went to (L{MERGE}).

While Redis is unreachable, each instance counts on its own
(L{openclaw.consumers.table.LocalCounters}, kept up to date all along):
limits hold per instance then, and nobody is refused for Redis's absence.
When Redis is back, each instance adds what it counted meanwhile to the
rpm and tpm windows, and what it counted into Redis in the last minute if
Redis came back without it (L{MERGE}, L{SharedCounters.merge_windows}); and
the reservations of its calls still in flight that it made on its own go
to Redis's, while those its calls admitted through Redis hold there are
released for the calls that ended meanwhile (L{CARRY},
L{SharedCounters.carry}).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from openclaw.cluster.redis import write_refusal
from openclaw.consumers.freshness import StallWatch
from openclaw.consumers.limits import WINDOW_SECONDS, RateLimits, reset_after
from openclaw.consumers.model import Consumer, ctl_arguments, period_key
from openclaw.consumers.store import Snapshot, database_error
from openclaw.consumers.table import (
    RESERVATION_SECONDS,
    TOKEN_RESERVATION_SECONDS,
    Holder,
    LocalCounters,
    NotReleased,
    budget_spent,
    rate_limited,
    tpm_refused,
)
from openclaw.dataplane.errors import APIError

if TYPE_CHECKING:
    from openclaw.consumers.table import ConsumerTable

#: How long, in whole seconds, a cluster's rpm and tpm windows count a
#: second: the field of second K (POSIX, Redis's clock) holds the calls
#: made in [K, K + 1), so it is counted while the second now is at most
#: K + 60 and dropped once it is K + 61 or later.  A call is thus counted
#: for 60 to 61 s, never less than a single gateway's exact
#: L{WINDOW_SECONDS} (with 60, a call made at K.9 left at K + 60.0: the
#: window was 59 to 60 s, and up to twice C{rpm} passed within 60 s).
CLUSTER_WINDOW_SECONDS = int(WINDOW_SECONDS) + 1
#: The lifetime (seconds) of a window's key, set at each write: past its
#: newest field's L{CLUSTER_WINDOW_SECONDS}, with a second to spare for an
#: instance's view of Redis's clock.
WINDOW_KEY_SECONDS = CLUSTER_WINDOW_SECONDS + 1

#: Lua, composed into the scripts that count into or read the windows
#: (L{ADMIT}, L{COUNT}, L{MERGE}): C{WINDOW} (L{CLUSTER_WINDOW_SECONDS}: the
#: field of second C{at} counts while C{at > now - WINDOW}) and
#: C{WINDOW_TTL} (L{WINDOW_KEY_SECONDS}).
_WINDOW = f"""
local WINDOW, WINDOW_TTL = {CLUSTER_WINDOW_SECONDS}, {WINDOW_KEY_SECONDS}
"""

#: KEYS: seeded marker, spend (the budget's period), reserved, tpm, rpm,
#: reserved tokens.
#: ARGV: now (whole seconds), budget or '', tpm or '', rpm or '', US
#: dollars to reserve, reservation lifetime (seconds), tokens to reserve,
#: token reservation lifetime (seconds).
#: Reply: {code, spent, extra}: 0 admitted, 1 budget spent (extra: the
#: reservations), 2 tpm, 3 rpm (extra: Retry-After), 4 spends not seeded;
#: 2 goes on with the tokens of the window and those reserved (whether
#: calls in flight make the rest, L{tpm_refused}).
#: A window counts the fields of the seconds after C{now - WINDOW}
#: (L{CLUSTER_WINDOW_SECONDS}); a refusal's Retry-After is when enough of
#: them will have left, a field of second C{at} leaving at C{at + WINDOW}.
#: Admitted, the request is counted in the rpm window, with an rpm or
#: without (an rpm set later judges the last minute), and it goes on with
#: what the windows hold now, for the answer's
#: x-ratelimit-* headers: the requests of the rpm window (-1 without
#: rpm), the tokens of the tpm window plus those reserved (-1 without
#: tpm), the second of the latest of those tokens (0: none).
#: The tpm check counts the window's tokens plus the reserved tokens; its
#: Retry-After takes each reservation as counted at its admission second
#: (L{openclaw.consumers.limits.SlidingWindow.retry_after}).
ADMIT = (
    _WINDOW
    + """
local now = tonumber(ARGV[1])
local function window(key, horizon)
  local h = redis.call('HGETALL', key)
  local sum, old, live = 0, {}, {}
  for i = 1, #h, 2 do
    local at = tonumber(h[i])
    if at <= horizon then
      old[#old + 1] = h[i]
    else
      sum = sum + tonumber(h[i + 1])
      live[#live + 1] = {at, tonumber(h[i + 1])}
    end
  end
  if #old > 0 then redis.call('HDEL', key, unpack(old)) end
  return sum, live
end
local function trim(key, horizon)
  if redis.call('HLEN', key) > 64 then window(key, horizon) end
end
local function retry(live, used, limit)
  table.sort(live, function(a, b) return a[1] < b[1] end)
  for _, e in ipairs(live) do
    used = used - e[2]
    if used < limit then return math.max(1, e[1] + WINDOW - now) end
  end
  return 1
end
local spent, requests_used, tokens_used, tokens_newest = 0, -1, -1, 0
if ARGV[2] ~= '' then
  if redis.call('EXISTS', KEYS[1]) == 0 then return {4, '0', '0'} end
  spent = tonumber(redis.call('GET', KEYS[2]) or '0')
  local reserved = window(KEYS[3], now - tonumber(ARGV[6]))
  if spent + reserved >= tonumber(ARGV[2]) then return {1, tostring(spent), tostring(reserved)} end
end
if ARGV[3] ~= '' then
  local used, live = window(KEYS[4], now - WINDOW)
  local held, pending = window(KEYS[6], now - tonumber(ARGV[8]))
  if used + held >= tonumber(ARGV[3]) then
    for _, e in ipairs(pending) do live[#live + 1] = e end
    return {2, tostring(spent), tostring(retry(live, used + held, tonumber(ARGV[3]))), tostring(used), tostring(held)}
  end
  tokens_used = used + held
  for _, e in ipairs(live) do tokens_newest = math.max(tokens_newest, e[1]) end
  for _, e in ipairs(pending) do tokens_newest = math.max(tokens_newest, e[1]) end
end
if ARGV[4] ~= '' then
  local used, live = window(KEYS[5], now - WINDOW)
  if used >= tonumber(ARGV[4]) then
    return {3, tostring(spent), tostring(retry(live, used, tonumber(ARGV[4])))}
  end
  requests_used = used + 1
else
  trim(KEYS[5], now - WINDOW)
end
redis.call('HINCRBY', KEYS[5], ARGV[1], 1)
redis.call('EXPIRE', KEYS[5], WINDOW_TTL)
if ARGV[2] ~= '' and tonumber(ARGV[5]) > 0 then
  redis.call('HINCRBYFLOAT', KEYS[3], ARGV[1], ARGV[5])
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[6]) + 1)
end
if ARGV[3] ~= '' and tonumber(ARGV[7]) > 0 then
  redis.call('HINCRBY', KEYS[6], ARGV[1], ARGV[7])
  redis.call('EXPIRE', KEYS[6], tonumber(ARGV[8]) + 1)
  tokens_used = tokens_used + tonumber(ARGV[7])
  tokens_newest = now
end
return {0, tostring(spent), '0', tostring(requests_used), tostring(tokens_used), tostring(tokens_newest)}
"""
)

#: Lua, composed into the scripts that read what calls in flight hold
#: (L{SPENDS}, L{RELEASE}): C{held(key, horizon)}, the sum of the amounts
#: of reservations hash C{key} (second of admission -> amount) made after
#: second C{horizon} (those within their lifetime, as L{ADMIT} counts them).
_HELD = """
local function held(key, horizon)
  local h = redis.call('HGETALL', key)
  local sum = 0
  for i = 1, #h, 2 do
    if tonumber(h[i]) > horizon then sum = sum + tonumber(h[i + 1]) end
  end
  return sum
end
"""

#: Lua, composed into the scripts that release a call's reservation
#: (L{COUNT}, L{CARRY}): C{release(key, at, amount, float)} takes C{amount}
#: (a string; US dollars with C{float}, else tokens) from the field
#: C{at} (the call's second of admission) of reservations hash C{key} if
#: Redis has it, the field gone once nothing is left (at most 1e-12 US
#: dollars: the floats' rounding); true if it had it.
_RELEASE = """
local function release(key, at, amount, float)
  if redis.call('HEXISTS', key, at) == 0 then return false end
  local left
  if float then
    left = tonumber(redis.call('HINCRBYFLOAT', key, at, '-' .. amount))
  else
    left = redis.call('HINCRBY', key, at, '-' .. amount)
  end
  if left <= 1e-12 then redis.call('HDEL', key, at) end
  return true
end
"""

#: KEYS: per consumer, its spend, reserved and reserved tokens.
#: ARGV: now (whole seconds), reservation lifetime, token reservation
#: lifetime (seconds).
#: Reply: per consumer, its spend (nil where none), the US dollars and the
#: tokens its calls in flight hold (the reservations made within their
#: lifetime, as L{ADMIT} counts them).  Reads only.
SPENDS = (
    _HELD
    + """
local now = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS, 3 do
  out[#out + 1] = redis.call('GET', KEYS[i])
  out[#out + 1] = tostring(held(KEYS[i + 1], now - tonumber(ARGV[2])))
  out[#out + 1] = tostring(held(KEYS[i + 2], now - tonumber(ARGV[3])))
end
return out
"""
)

#: KEYS: seeded marker, tpm, reserved, day, month and total spends,
#: reserved tokens, rpm.
#: ARGV: now, tokens, cost, US dollars reserved, second of the
#: reservations, tokens reserved, second of an admission the rpm window
#: has yet to count (0: none; L{Holder.request_at}).  The tokens'
#: reservation is replaced by the tokens counted in one step.  A window
#: no admission reads (the consumer has no such limit) is kept to its
#: last L{CLUSTER_WINDOW_SECONDS} here, once it holds more than 64 seconds.
COUNT = (
    _WINDOW
    + _RELEASE
    + """
local now = tonumber(ARGV[1])
local function trim(key)
  if redis.call('HLEN', key) > 64 then
    local h, old = redis.call('HKEYS', key), {}
    for _, at in ipairs(h) do
      if tonumber(at) <= now - WINDOW then old[#old + 1] = at end
    end
    if #old > 0 then redis.call('HDEL', key, unpack(old)) end
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('HINCRBY', KEYS[2], ARGV[1], ARGV[2])
  redis.call('EXPIRE', KEYS[2], WINDOW_TTL)
  trim(KEYS[2])
end
if tonumber(ARGV[7] or '0') > now - WINDOW then
  redis.call('HINCRBY', KEYS[8], ARGV[7], 1)
  redis.call('EXPIRE', KEYS[8], WINDOW_TTL)
  trim(KEYS[8])
end
if tonumber(ARGV[4]) > 0 then release(KEYS[3], ARGV[5], ARGV[4], true) end
if tonumber(ARGV[6]) > 0 then release(KEYS[7], ARGV[5], ARGV[6], false) end
if tonumber(ARGV[3]) > 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('INCRBYFLOAT', KEYS[4], ARGV[3])
  redis.call('EXPIRE', KEYS[4], 259200)
  redis.call('INCRBYFLOAT', KEYS[5], ARGV[3])
  redis.call('EXPIRE', KEYS[5], 3456000)
  redis.call('INCRBYFLOAT', KEYS[6], ARGV[3])
end
return 1
"""
)

#: KEYS: seeded marker, then spends; ARGV: (US dollars, seconds to keep or
#: 0) per spend, then the marker's value if it seeds (a token new at each
#: seed: which Redis the windows were counted in, L{MERGE}).
#: Reply: {1 seeded or 0 seeded already, the marker's value}.
SEED = """
local marker = redis.call('GET', KEYS[1])
if marker then return {0, marker} end
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], ARGV[2 * i - 3])
  local ttl = tonumber(ARGV[2 * i - 2])
  if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
end
redis.call('SET', KEYS[1], ARGV[#ARGV])
return {1, ARGV[#ARGV]}
"""

#: KEYS: seeded marker, then per consumer its rpm and tpm windows.
#: ARGV: now (whole seconds); the marker's value this instance last saw,
#: after '=' ('' when it saw none); then per consumer the requests and
#: the tokens it counted while Redis was away, and those it counted into
#: Redis before, each as 'second:amount second:amount ...'.
#: Each amount of a second the window still counts (after C{now - WINDOW},
#: L{CLUSTER_WINDOW_SECONDS}) is added to the window's
#: field of that second (HINCRBY, as L{ADMIT} and L{COUNT} count): those
#: counted while Redis was away always, those counted into Redis only
#: when Redis lost them (the marker is gone, or another: a Redis that came
#: back empty, seeded again since).  An instance that never saw a marker
#: (its seed never ran: the database was away) cannot tell, and adds only
#: what Redis never had.
#: Reply: {1 Redis lost them or 0, the marker's value ('' none), requests
#: added, tokens added}.
MERGE = (
    _WINDOW
    + """
local now = tonumber(ARGV[1])
local marker = redis.call('GET', KEYS[1])
local lost = ARGV[2] ~= '' and ('=' .. (marker or '')) ~= ARGV[2]
local added = {0, 0}
local function merge(key, counts, which)
  local any = false
  for at, amount in string.gmatch(counts, '(%d+):(%d+)') do
    if tonumber(at) > now - WINDOW then
      redis.call('HINCRBY', key, at, amount)
      added[which] = added[which] + tonumber(amount)
      any = true
    end
  end
  if any then redis.call('EXPIRE', key, WINDOW_TTL) end
end
for i = 2, #KEYS, 2 do
  -- Consumer (i - 2) / 2 + 1: its four arguments start at ARGV[2i - 1].
  local a = 2 * i - 1
  merge(KEYS[i], ARGV[a], 1)
  merge(KEYS[i + 1], ARGV[a + 1], 2)
  if lost then
    merge(KEYS[i], ARGV[a + 2], 1)
    merge(KEYS[i + 1], ARGV[a + 3], 2)
  end
end
return {lost and 1 or 0, marker or '', tostring(added[1]), tostring(added[2])}
"""
)

#: KEYS: per consumer its reserved and reserved tokens.
#: ARGV: reservation lifetime, token reservation lifetime (seconds); then
#: per consumer the US dollars and the tokens to reserve, and the US
#: dollars and the tokens to release, each as 'second:amount ...' (the
#: second of the call's admission: the field L{ADMIT} reserves in and
#: L{COUNT} releases from).
#: Reserved: added to the field of that second (as L{ADMIT} reserves:
#: L{COUNT} releases them when their calls end).  Released: taken from the
#: field of that second if Redis has it (as L{COUNT} releases), the field
#: gone once nothing is left.
#: Reply: {US dollars reserved, tokens reserved, US dollars released,
#: tokens released}.
CARRY = (
    _RELEASE
    + """
local done = {0, 0, 0, 0}
local function reserve(key, held, lifetime, which, float)
  local any = false
  for at, amount in string.gmatch(held, '(%d+):([%d.]+)') do
    if float then
      redis.call('HINCRBYFLOAT', key, at, amount)
    else
      redis.call('HINCRBY', key, at, amount)
    end
    done[which] = done[which] + tonumber(amount)
    any = true
  end
  if any then redis.call('EXPIRE', key, lifetime + 1) end
end
local function release_each(key, held, which, float)
  for at, amount in string.gmatch(held, '(%d+):([%d.]+)') do
    if release(key, at, amount, float) then done[which] = done[which] + tonumber(amount) end
  end
end
for i = 1, #KEYS, 2 do
  -- Consumer (i + 1) / 2: its four arguments start at ARGV[2i + 1].
  local a = 2 * i + 1
  reserve(KEYS[i], ARGV[a], tonumber(ARGV[1]), 1, true)
  reserve(KEYS[i + 1], ARGV[a + 1], tonumber(ARGV[2]), 2, false)
  release_each(KEYS[i], ARGV[a + 2], 3, true)
  release_each(KEYS[i + 1], ARGV[a + 3], 4, false)
end
return {tostring(done[1]), tostring(done[2]), tostring(done[3]), tostring(done[4])}
"""
)

#: KEYS: seeded marker, then spends; ARGV: (US dollars, seconds to keep or
#: 0) per spend.  Each spend Redis holds below the figure given (the
#: database's, with the instance's rows not yet written) is raised to it;
#: none is lowered (Redis may hold costs of other instances' rows not
#: written yet).  The number raised.
RAISE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local raised = 0
for i = 2, #KEYS do
  local known = ARGV[2 * i - 3]
  if tonumber(known) > tonumber(redis.call('GET', KEYS[i]) or '0') then
    redis.call('SET', KEYS[i], known)
    local ttl = tonumber(ARGV[2 * i - 2])
    if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
    raised = raised + 1
  end
end
return raised
"""

#: Seconds after Redis comes back before an instance raises Redis's
#: spends to the database's (L{SharedConsumers.reconcile}): long enough for
#: the usage rows every instance counted meanwhile to be written (each
#: writes its rows every second).
RECONCILE_SECONDS = 5.0

#: KEYS: a deleted consumer's windows, reservations and running spends.
FORGET = "return redis.call('DEL', unpack(KEYS))"

#: KEYS: a consumer's reserved and reserved tokens.
#: ARGV: now (whole seconds), reservation lifetime, token reservation
#: lifetime (seconds).
#: Both are deleted (the operator's C{consumer_release}); the reply is
#: what they held: {US dollars, tokens} of the reservations made within
#: their lifetime (as L{ADMIT} and L{SPENDS} count them).
RELEASE = (
    _HELD
    + """
local now = tonumber(ARGV[1])
local usd = held(KEYS[1], now - tonumber(ARGV[2]))
local tokens = held(KEYS[2], now - tonumber(ARGV[3]))
redis.call('DEL', KEYS[1], KEYS[2])
return {tostring(usd), tostring(tokens)}
"""
)

#: How long a period's spend is kept in Redis, in seconds (0: always).
SPEND_TTL = MappingProxyType({"day": 3 * 86400, "month": 40 * 86400, "total": 0})


def consumer_key(redis: ScriptRunner, name: str, created_at: float, *parts: str) -> str:
    """
    The Redis key of a counter of consumer C{name} created at C{created_at}
    (C{<CLUSTER_NAME>:consumer:<name>:<created_at>:<parts>}).
    """
    return redis.key("consumer", name, repr(float(created_at)), *parts)


def seeded_key(redis: ScriptRunner) -> str:
    """
    The key saying Redis's spends were seeded from the database.  Its
    C{:2}: the spends' keys name the consumer's creation since, so Redis
    holding only the older keys is seeded again.
    """
    return redis.key("consumers", "seeded", "2")


def _usd(value: float) -> str:
    # Fixed-point: what Redis's INCRBYFLOAT and Lua's tonumber both read.
    return f"{value:.15f}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


#: A consumer in Redis's keys: its name and its C{created_at}.
_Whose = tuple[str, float]


@attrs.define
class WindowLog:
    """
    Requests and tokens this instance counted for each consumer in each
    second Redis's windows still count (the last
    L{CLUSTER_WINDOW_SECONDS}): C{{(name, created_at): {POSIX second
    (whole, Redis's clock): [requests, tokens]}}}, for L{MERGE}.  Memory:
    about 61 entries per consumer counted (older seconds are dropped as
    newer ones come, and by L{take}).
    """

    counts: dict[_Whose, dict[int, list[int]]] = attrs.Factory(dict)
    #: The second up to which every consumer's older seconds were last
    #: dropped (L{add}): a consumer no longer called keeps none past a
    #: minute.
    pruned_at: int = 0

    def __bool__(self) -> bool:
        return bool(self.counts)

    def add(self, whose: _Whose, second: int, requests: int = 0, tokens: int = 0) -> None:
        if second - self.pruned_at >= CLUSTER_WINDOW_SECONDS:
            self.pruned_at = second
            self.counts = self._after(second - CLUSTER_WINDOW_SECONDS)
        seconds = self.counts.get(whose)
        if seconds is None:
            seconds = self.counts[whose] = {}
        counted = seconds.get(second)
        if counted is None:
            if len(seconds) > CLUSTER_WINDOW_SECONDS + 4:
                horizon = second - CLUSTER_WINDOW_SECONDS
                for old in [at for at in seconds if at <= horizon]:
                    del seconds[old]
            counted = seconds[second] = [0, 0]
        counted[0] += requests
        counted[1] += tokens

    def absorb(self, other: WindowLog) -> None:
        """
        Add what C{other} holds to this log.
        """
        for whose, seconds in other.counts.items():
            for second, (requests, tokens) in seconds.items():
                self.add(whose, second, requests, tokens)

    def take(self, now: int) -> WindowLog:
        """
        Empty this log: what it held of the seconds after C{now - }
        L{CLUSTER_WINDOW_SECONDS} (those Redis's windows still count).
        """
        taken = WindowLog(self._after(now - CLUSTER_WINDOW_SECONDS))
        self.counts = {}
        return taken

    def _after(self, horizon: float) -> dict[_Whose, dict[int, list[int]]]:
        """
        What this log holds of the seconds after C{horizon}, by consumer
        (those with none left out).
        """
        return {
            whose: live
            for whose, seconds in self.counts.items()
            if (live := {at: counted for at, counted in seconds.items() if at > horizon})
        }

    def forget(self, name: str) -> None:
        self.counts = {whose: seconds for whose, seconds in self.counts.items() if whose[0] != name}

    def field(self, whose: _Whose, which: int) -> str:
        """
        C{whose} requests (C{which} 0) or tokens (1), as L{MERGE} reads
        them: C{'second:amount ...'}.
        """
        seconds = self.counts.get(whose, {})
        return " ".join(f"{at}:{counted[which]}" for at, counted in sorted(seconds.items()) if counted[which] > 0)


@attrs.define
class ReservationLog:
    """
    Reservations of each consumer's calls, by the second (POSIX, whole,
    Redis's clock) of their admission: C{{(name, created_at): {second:
    [US dollars, tokens]}}}, for L{CARRY}.  Memory: one entry per consumer
    and second of admission, for L{RESERVATION_SECONDS} at most (older
    ones are dropped by L{take}).
    """

    held: dict[_Whose, dict[int, list[float]]] = attrs.Factory(dict)

    def __bool__(self) -> bool:
        return bool(self.held)

    def add(self, whose: _Whose, second: int, usd: float, tokens: int) -> None:
        if usd <= 0 and tokens <= 0:
            return
        amounts = self.held.setdefault(whose, {}).setdefault(second, [0.0, 0])
        amounts[0] += max(0.0, usd)
        amounts[1] += max(0, tokens)

    def absorb(self, other: ReservationLog) -> None:
        """
        Add what C{other} holds to this log.
        """
        for whose, seconds in other.held.items():
            for second, (usd, tokens) in seconds.items():
                self.add(whose, second, usd, int(tokens))

    def take(self, now: int) -> ReservationLog:
        """
        Empty this log: what it held that has not lapsed at C{now} (US
        dollars admitted after C{now - }L{RESERVATION_SECONDS}, tokens
        after C{now - }L{TOKEN_RESERVATION_SECONDS}), as L{ADMIT} counts
        them.
        """
        taken = ReservationLog()
        for whose, seconds in self.held.items():
            for second, (usd, tokens) in seconds.items():
                taken.add(
                    whose,
                    second,
                    usd if second > now - RESERVATION_SECONDS else 0.0,
                    int(tokens) if second > now - TOKEN_RESERVATION_SECONDS else 0,
                )
        self.held = {}
        return taken

    def forget(self, name: str) -> None:
        self.held = {whose: seconds for whose, seconds in self.held.items() if whose[0] != name}

    def field(self, whose: _Whose, which: int) -> str:
        """
        C{whose} US dollars (C{which} 0) or tokens (1), as L{CARRY} reads
        them: C{'second:amount ...'}.
        """
        seconds = self.held.get(whose, {})
        return " ".join(
            f"{at}:{_usd(amounts[0]) if which == 0 else int(amounts[1])}"
            for at, amounts in sorted(seconds.items())
            if amounts[which] > 0
        )


class ScriptRunner(Protocol):
    """
    What this module needs of L{openclaw.cluster.redis.RedisStore}.
    """

    def key(self, *parts: str) -> str: ...

    def script(self, source: str, keys: list[str], args: list[str]) -> Deferred[Any]: ...

    def publish_consumer(self, instance: str, name: str) -> Deferred[Any]: ...

    def publish_revokes(
        self, instance: str, revokes: Mapping[str, tuple[str, str]], names: list[str]
    ) -> Deferred[Any]: ...

    def revokes(self) -> Deferred[dict[str, tuple[str, str]]]: ...

    def revokes_saved(self, hashes: list[str]) -> Deferred[Any]: ...


#: L{SharedCounters.unshared} is pruned of lapsed reservations once it
#: holds this many calls (and then twice as many as it kept).
UNSHARED_PRUNED_AT = 1024


class SharedCounters:
    """
    L{openclaw.consumers.table.Counters} in Redis, falling back to the
    instance's own L{LocalCounters} (kept up to date all along) while
    Redis is unreachable (C{up} false) or does not answer within
    C{timeout} seconds.
    """

    _log = Logger()

    def __init__(
        self, redis: ScriptRunner, reactor: IReactorTime, timeout: float, unseeded: Callable[[], None] = lambda: None
    ) -> None:
        """
        @param unseeded: called when Redis answers that its spends are not
            seeded (L{SharedConsumers.seed} seeds them).
        """
        self.redis = redis
        self.reactor = reactor
        self.timeout = timeout
        self.local = LocalCounters()
        #: Redis is reachable (set by the cluster node's up/down).
        self.up = False
        self.unseeded = unseeded
        #: (consumer, period key) -> the spend Redis last reported.
        self.seen: dict[tuple[str, str], float] = {}
        #: consumer -> (US dollars, tokens) its calls in flight hold in
        #: Redis, as the last L{read_spends} read them (for L{held}).
        self.held_seen: dict[str, tuple[float, int]] = {}
        #: The requests and tokens of the last minute this instance
        #: counted only here (Redis away, or failing the call), those it
        #: counted into Redis since it last came back, and those it
        #: counted into Redis before that, not yet merged (L{merge_windows}).
        self.away = WindowLog()
        self.sent = WindowLog()
        self.before = WindowLog()
        #: The seeded marker's value (L{SEED}) this instance last saw:
        #: which Redis its counts went to; L{None} before it saw one.
        self.generation: str | None = None
        #: The calls in flight whose reservations (of the budget, of tpm)
        #: this instance made on its own (Redis away, or its spends not
        #: seeded): held in its memory only, until carried into Redis
        #: (L{carry}); their holders, in order of admission.
        self.unshared: dict[Holder, None] = {}
        #: How many it may hold before those lapsed are dropped (L{_unshared}).
        self._prune_unshared_at = UNSHARED_PRUNED_AT
        #: Redis refused an admission or a count outright since the last
        #: write it took (L{_unanswered}, L{counted}).
        self._writes_refused = False
        #: Called at the first admission or count Redis takes after
        #: refusing one (L{SharedConsumers.writes_taken}: the costs counted
        #: meanwhile go to its spends, the reservations to its).
        self.writes_taken: Callable[[], None] = lambda: None
        #: Those of them being carried (L{CARRY} sent, not answered yet):
        #: holder -> None while its call runs, what it reserved (US dollars,
        #: tokens, second of admission) once it ended (released in Redis
        #: once carried there).
        self.carrying: dict[Holder, tuple[float, int, int] | None] = {}
        #: What Redis holds of the reservations of calls that ended while
        #: Redis was away (admitted through it before), to release there
        #: when it is back (L{carry}).
        self.unreleased = ReservationLog()

    def _keys(self, name: str, created_at: float, *parts: str) -> str:
        return consumer_key(self.redis, name, created_at, *parts)

    def load(self, spend: dict[tuple[str, str], float]) -> None:
        self.local.load(spend)

    def forget(self, consumer: str) -> None:
        self.local.forget(consumer)
        for log in (self.away, self.sent, self.before):
            log.forget(consumer)
        self.unreleased.forget(consumer)
        self.unshared = {holder: None for holder in self.unshared if holder.consumer != consumer}
        self.carrying = {holder: ended for holder, ended in self.carrying.items() if holder.consumer != consumer}
        self.seen = {key: usd for key, usd in self.seen.items() if key[0] != consumer}
        self.held_seen.pop(consumer, None)

    def deleted(self, deleted: Consumer, now: float) -> None:
        """
        C{deleted} was deleted on this instance: forgotten here, and its
        counters removed from Redis (a consumer created again under its
        name has counters of its own: L{consumer_key}).
        """
        consumer = deleted.name
        self.forget(consumer)
        if not self.up:
            self._log.warn(
                "Redis is unreachable: the deleted consumer {consumer!r}'s counters stay there until its "
                "periods end (its running total spend until removed by hand: {pattern})",
                consumer=consumer,
                pattern=self._keys(consumer, deleted.created_at, "*"),
            )
            return
        created = deleted.created_at
        keys = [
            self._keys(consumer, created, "reserved"),
            self._keys(consumer, created, "reserved_tokens"),
            self._keys(consumer, created, "tpm"),
            self._keys(consumer, created, "rpm"),
            *(self._keys(consumer, created, "spend", period_key(period, now)) for period in ("day", "month", "total")),
        ]
        sent: Deferred[Any] = self.redis.script(FORGET, keys, [])
        sent.addTimeout(self.timeout, self.reactor).addErrback(
            lambda reason: self._log.warn(
                "the deleted consumer {consumer!r}'s counters were not removed from Redis ({error})",
                consumer=consumer,
                error=reason.getErrorMessage() or repr(reason.value),
            )
        )

    def spent(self, consumer: str, period: str, now: float) -> float:
        key = (consumer, period_key(period, now))
        return max(self.local.spent(consumer, period, now), self.seen.get(key, 0.0))

    def read_spends(self, consumers: list[Consumer], now: float) -> Deferred[None]:
        """
        Read the budget periods' spends of C{consumers} from Redis (the
        cluster's, which every instance's calls add to, a consumer's with
        no budget too), so that L{spent} answers them rather than this
        instance's last sight of them.  Never fails: without Redis,
        L{spent} keeps what it had.
        """
        # What their calls in flight hold is read again, or (Redis away, the
        # read failed) this instance's own figure answers: never one read
        # before an outage.  Other consumers' figures stay.
        for c in consumers:
            self.held_seen.pop(c.name, None)
        if not self.up or not consumers:
            return succeed(None)
        keys = [
            key
            for c in consumers
            for key in (
                self._keys(c.name, c.created_at, "spend", period_key(c.budget_period, now)),
                self._keys(c.name, c.created_at, "reserved"),
                self._keys(c.name, c.created_at, "reserved_tokens"),
            )
        ]

        def number(value: Any) -> float:
            return float(value.decode() if isinstance(value, bytes) else value)

        def read(values: list[Any]) -> None:
            for n, consumer in enumerate(consumers):
                value, reserved, tokens = values[3 * n : 3 * n + 3]
                key = (consumer.name, period_key(consumer.budget_period, now))
                if value is not None:
                    self.seen[key] = number(value)
                else:
                    # Redis has none (lost with a restart, not seeded yet):
                    # not a figure from before, which every other instance
                    # no longer shows.
                    self.seen.pop(key, None)
                self.held_seen[consumer.name] = (number(reserved), int(number(tokens)))

        args = [str(int(now)), str(RESERVATION_SECONDS), str(TOKEN_RESERVATION_SECONDS)]
        asked: Deferred[Any] = self.redis.script(SPENDS, keys, args)

        def unanswered(reason: Failure) -> None:
            self._log.debug(
                "consumers' spends not read from Redis ({error}); this instance's view answers",
                error=reason.getErrorMessage() or repr(reason.value),
            )

        def fault(reason: Failure) -> None:
            # Not Redis away: a fault of ours reading its answer.
            self._log.failure(
                "consumers' spends read from Redis could not be used ({error}); this instance's view answers for "
                "those not read: report it with this traceback",
                reason,
                error=reason.getErrorMessage() or repr(reason.value),
            )

        asked.addTimeout(self.timeout, self.reactor)
        return asked.addCallbacks(read, unanswered).addErrback(fault)

    def held(self, consumer: str, now: float) -> tuple[float, int]:
        """
        What C{consumer}'s calls in flight hold: the cluster's figure as
        L{read_spends} last read it from Redis (every instance's calls,
        those of an instance that died included), else (Redis away at the
        last read, or the read failed) this instance's.
        """
        seen = self.held_seen.get(consumer)
        return seen if seen is not None else self.local.held(consumer, now)

    def release_held(self, consumer: Consumer, now: float) -> Deferred[tuple[float, int]]:
        """
        Release every reservation the cluster holds in Redis of
        C{consumer}'s calls in flight (the operator's C{consumer_release},
        L{RELEASE}): those of every instance's calls, a crashed one's
        included.  The calls still running are counted when they end, as
        any other, and until then the cluster judges the consumer's budget
        and C{tpm} without them.  Their count releases their reservation
        from the field of their second of admission if Redis has one
        (L{COUNT}): one admitted before the release's second finds none,
        but one admitted in that second, before the release, takes its
        amount from that second's field, which by then holds the
        reservations of the calls admitted after the release in that
        second: those are held short by up to that amount (until they end,
        or lapse).
        This instance's own figures (what it judges by while Redis is
        away) keep its calls' reservations: they are running.

        @return: (a Deferred firing with) the US dollars and the tokens
            released (those made within their lifetime).
        @raise NotReleased: (in the Deferred) Redis is unreachable, or
            failed or did not answer the script within the timeout (then
            it may have run).
        """
        name = consumer.name
        if not self.up:
            return fail(
                NotReleased(
                    "the cluster store (Redis) is unreachable, and the cluster's reservations are there (while it is "
                    "away each instance judges by its own calls only): nothing was released; retry once it is back "
                    "(openclawctl status shows cluster_store)"
                )
            )
        keys = [
            self._keys(name, consumer.created_at, "reserved"),
            self._keys(name, consumer.created_at, "reserved_tokens"),
        ]
        args = [str(int(now)), str(RESERVATION_SECONDS), str(TOKEN_RESERVATION_SECONDS)]

        def released(reply: Any) -> tuple[float, int]:
            # Read again from Redis by the next list.
            self.held_seen.pop(name, None)
            return float(_text(reply[0])), int(float(_text(reply[1])))

        def failed(reason: Failure) -> Failure:
            return Failure(
                NotReleased(
                    f"the cluster store (Redis) did not release them ({reason.getErrorMessage() or repr(reason.value)}"
                    "); it may have, if its answer was lost: see what is held (openclawctl consumer list "
                    f"{ctl_arguments(name)}) before retrying, as a release also drops the "
                    "reservations of calls admitted since"
                )
            )

        releasing: Deferred[Any] = self.redis.script(RELEASE, keys, args)
        return releasing.addTimeout(self.timeout, self.reactor).addCallbacks(released, failed)

    def admit(
        self, consumer: Consumer, now: float, holder: Holder | None = None, reserve: float = 0.0, tokens: int = 0
    ) -> APIError | Deferred[APIError | None] | None:
        if consumer.budget_usd is None and consumer.tpm is None and consumer.rpm is None:
            # No round trip to check nothing: the request is counted here,
            # and in Redis's window with the call's tokens (L{counted}).
            self.local.admitted(consumer, now, holder)
            if holder is not None:
                holder.request_at = int(now)
            return None
        if not self.up:
            return self._here(consumer, now, holder, reserve, tokens)
        name, created = consumer.name, consumer.created_at
        second = int(now)
        keys = [
            seeded_key(self.redis),
            self._keys(name, created, "spend", period_key(consumer.budget_period, now)),
            self._keys(name, created, "reserved"),
            self._keys(name, created, "tpm"),
            self._keys(name, created, "rpm"),
            self._keys(name, created, "reserved_tokens"),
        ]
        args = [
            str(second),
            "" if consumer.budget_usd is None else _usd(consumer.budget_usd),
            "" if consumer.tpm is None else str(consumer.tpm),
            "" if consumer.rpm is None else str(consumer.rpm),
            _usd(reserve),
            str(RESERVATION_SECONDS),
            str(max(0, tokens)),
            str(TOKEN_RESERVATION_SECONDS),
        ]
        asked: Deferred[Any] = self.redis.script(ADMIT, keys, args)
        asked.addTimeout(self.timeout, self.reactor)
        return asked.addCallbacks(
            self._decided,
            self._unanswered,
            callbackArgs=(consumer, now, holder, reserve, tokens),
            errbackArgs=(consumer, now, holder, reserve, tokens),
        )

    def refusal(self, consumer: Consumer, now: float) -> APIError | None:
        """
        The 429 L{admit} surely answers C{consumer} now whatever its call
        would reserve, or None (L{LocalCounters.refusal}, for a request
        whose body is not read yet).  While Redis is away, this instance
        decides alone (L{_here}): its own counters' refusal.  With Redis,
        the cluster decides, from every instance's counts; this instance
        knows for sure only a budget spent (a period's spend only grows,
        and the cluster's is at least what this instance counted or last
        read from Redis): that 429 C{insufficient_quota}, whose figures
        are this instance's last sight of the cluster's.  Its C{rpm} and
        C{tpm} windows hold only its own calls, and the cluster's
        reservations may have been released since: those are left to
        Redis's admission.
        """
        if not self.up:
            return self.local.refusal(consumer, now)
        budget = consumer.budget_usd
        if budget is None:
            return None
        spent = self.spent(consumer.name, consumer.budget_period, now)
        return budget_spent(consumer, spent, now, cluster=True) if spent >= budget else None

    def _decided(
        self, reply: Any, consumer: Consumer, now: float, holder: Holder | None, reserve: float, tokens: int
    ) -> APIError | None:
        code = int(reply[0])
        if code == 4:
            self.unseeded()
            # Nothing reserved in Redis: carried there once it is seeded.
            return self._here(consumer, now, holder, reserve, tokens, shared=False)
        name = consumer.name
        spent = float(reply[1])
        if consumer.budget_usd is not None:
            key = (name, period_key(consumer.budget_period, now))
            self.seen[key] = spent
            # The cluster's figure, for when Redis goes away.
            self.local.load({key: spent})
        if code == 1:
            return budget_spent(consumer, spent, now, float(reply[2]), cluster=True)
        if code == 2:
            assert consumer.tpm is not None
            used, held = (int(float(value)) for value in reply[3:5])
            return tpm_refused(name, consumer.tpm, used, held, int(float(reply[2])), cluster=True)
        if code == 3:
            assert consumer.rpm is not None
            return rate_limited(name, "rpm", consumer.rpm, int(float(reply[2])))
        # Admitted: counted here too, for when Redis goes away, and for
        # when it comes back without it.
        self.local.admitted(consumer, now, holder, reserve, tokens)
        self.sent.add((name, consumer.created_at), int(now), requests=1)
        self._taken(now)
        if holder is not None and (consumer.rpm is not None or consumer.tpm is not None) and len(reply) >= 6:
            holder.rate_limits = _rate_limits(consumer, now, reply)
        return None

    def _unanswered(
        self, reason: Failure, consumer: Consumer, now: float, holder: Holder | None, reserve: float, tokens: int
    ) -> APIError | None:
        self._log.warn(
            "a consumer's admission failed in Redis (no answer, or an error: {error}): counted on this instance only",
            error=reason.getErrorMessage() or repr(reason.value),
        )
        refused = write_refusal(reason.getErrorMessage()) is not None
        if refused:
            # Refused outright (out of memory, read-only): nothing of it was
            # made; merged, its reservations carried, at the first write
            # Redis takes again (L{_taken}).
            self._writes_refused = True
        # Otherwise its script may have run (its answer came too late): its
        # reservations are taken as in Redis, released there when the call
        # ends, as before; not carried (they would be held twice).
        return self._here(consumer, now, holder, reserve, tokens, shared=not refused)

    def _taken(self, now: float) -> None:
        """
        Redis took an admission or a count: if it refused one outright
        since (out of memory, read-only), what this instance counted alone
        meanwhile goes to its windows now (L{merge_windows}), and the
        rest (the reservations, the costs) through L{writes_taken}, not
        at the next heartbeat: a refusal shorter than one was never caught
        up (trial s46).
        """
        if self._writes_refused:
            self._writes_refused = False
            self.merge_windows(now)
            self.writes_taken()

    def _here(
        self,
        consumer: Consumer,
        now: float,
        holder: Holder | None,
        reserve: float,
        tokens: int,
        shared: bool = False,
    ) -> APIError | None:
        """
        Decide on this instance's own counts; an admitted request is kept
        for Redis's window (L{merge_windows}), and its reservations, unless
        C{shared} (they may be in Redis already), for Redis's (L{carry}).
        (One whose script failed for want of an answer in time may be in
        Redis too: merged, it counts twice there for the rest of its minute.)
        """
        refused = self.local.admit(consumer, now, holder, reserve, tokens)
        if refused is None:
            self.away.add((consumer.name, consumer.created_at), int(now), requests=1)
            if not shared and holder is not None and (holder.reserved > 0 or holder.reserved_tokens > 0):
                self._unshared(holder, int(now))
        return refused

    def _unshared(self, holder: Holder, second: int) -> None:
        """
        Keep C{holder}'s reservations for L{carry}.  Those of calls never
        counted (a client gone before its call started) are dropped once
        lapsed, as their number doubles: the memory held is that of the
        calls in flight admitted here while Redis is away, whatever its
        outage lasts.
        """
        self.unshared[holder] = None
        if len(self.unshared) >= self._prune_unshared_at:
            self.unshared = {
                held: None
                for held in self.unshared
                if held.reserved_at > second - (RESERVATION_SECONDS if held.reserved > 0 else TOKEN_RESERVATION_SECONDS)
            }
            self._prune_unshared_at = max(UNSHARED_PRUNED_AT, 2 * len(self.unshared))

    def counted(self, consumer: str, tokens: int, cost: float, now: float, holder: Holder | None = None) -> None:
        reserved, reserved_tokens, reserved_at, request_at = (
            (holder.reserved, holder.reserved_tokens, holder.reserved_at, holder.request_at)
            if holder is not None
            else (0.0, 0, 0, 0)
        )
        self.local.counted(consumer, tokens, cost, now, holder)
        if holder is not None:
            holder.request_at = 0
            if (reserved > 0 or reserved_tokens > 0) and not self._shared(
                holder, reserved, reserved_tokens, reserved_at
            ):
                # Not in Redis (yet): nothing to release there now.
                reserved, reserved_tokens = 0.0, 0
        if holder is None or not (tokens or cost or reserved or reserved_tokens or request_at):
            # No holder, no consumer to count for in Redis (which one of that name).
            return
        created = holder.created_at
        second = int(now)
        # What the script adds to Redis's windows (L{COUNT}).
        requests = 1 if request_at > second - CLUSTER_WINDOW_SECONDS else 0

        def window(log: WindowLog) -> None:
            whose = (consumer, created)
            if tokens > 0:
                log.add(whose, second, tokens=tokens)
            if requests:
                log.add(whose, request_at, requests=1)

        if not self.up:
            window(self.away)
            # Released in Redis once it is back (L{carry}).
            self.unreleased.add((consumer, created), reserved_at, reserved, reserved_tokens)
            return
        keys = [
            seeded_key(self.redis),
            self._keys(consumer, created, "tpm"),
            self._keys(consumer, created, "reserved"),
            *(self._keys(consumer, created, "spend", period_key(period, now)) for period in ("day", "month", "total")),
            self._keys(consumer, created, "reserved_tokens"),
            self._keys(consumer, created, "rpm"),
        ]
        args = [
            str(int(now)),
            str(tokens),
            _usd(cost),
            _usd(reserved),
            str(reserved_at),
            str(reserved_tokens),
            str(request_at),
        ]

        def unsent(reason: Failure) -> None:
            window(self.away)
            if write_refusal(reason.getErrorMessage()) is not None:
                # Refused outright: its reservations are still held in
                # Redis (released by the next carry) and its cost is not in
                # the spends (raised to the database's: L{writes_taken}).
                self._writes_refused = True
                self.unreleased.add((consumer, created), reserved_at, reserved, reserved_tokens)
            self._log.warn(
                "a consumer's usage was not counted in Redis ({error}); the database has it",
                error=reason.getErrorMessage() or repr(reason.value),
            )

        def taken(_: object) -> None:
            window(self.sent)
            self._taken(now)

        sent: Deferred[Any] = self.redis.script(COUNT, keys, args)
        sent.addTimeout(self.timeout, self.reactor).addCallbacks(taken, unsent)

    def _shared(self, holder: Holder, reserved: float, tokens: int, at: int) -> bool:
        """
        Whether Redis holds the reservations of C{holder}'s call, which has
        just ended (C{reserved} US dollars and C{tokens} tokens, made in
        second C{at}), so that its count releases them there: not those
        this instance made on its own and never carried (forgotten now),
        nor those being carried (released once they are there, L{carry}).
        """
        if holder in self.unshared:
            del self.unshared[holder]
            return False
        if holder in self.carrying:
            self.carrying[holder] = (reserved, tokens, at)
            return False
        return True

    def uncarried(self) -> bool:
        """
        Whether L{carry} has anything to carry into Redis or release there.
        """
        return bool(self.unshared or self.unreleased)

    def carry(self, clock: Callable[[], float]) -> Deferred[None]:
        """
        Bring the cluster's reservations in Redis up to this instance's
        calls, in one L{CARRY} for every consumer: add the reservations of
        its calls still in flight that it made on its own (Redis away, or
        its spends not seeded: L{unshared}), so that every instance counts
        them, and take away those Redis holds of its calls that ended while
        Redis was away (L{unreleased}).  Each carried reservation is
        released in Redis once at most, when its call ends (L{COUNT}; once
        carried, if it ends while the carry is under way).  A reservation
        that has lapsed (L{RESERVATION_SECONDS} of the budget,
        L{TOKEN_RESERVATION_SECONDS} of tpm) is neither carried nor
        released.  A carry that fails (an error, or no answer within the
        timeout: Redis may have run it) keeps the reservations of the calls
        still running for the next (Redis back again, or its spends
        seeded): if it had run, they are held twice until one is released
        when the call ends and the other lapses.  Its releases are not
        sent again (a release sent twice would take the reservations of
        other calls admitted in the same second): if it had not run, those
        reservations are held in Redis until they lapse, as are, if it had,
        those it carried of calls that ended while it was under way.
        Never fails; logs what it did.

        @param clock: the time now, POSIX seconds, Redis's clock (the
            table's C{clock}): read when the carry starts, and again by
            the carry that follows it for the calls that ended meanwhile,
            each judging what has lapsed by its own second.
        """
        second = int(clock())
        holders, self.unshared = list(self.unshared), {}
        reserving = ReservationLog()
        running: list[Holder] = []
        for holder in holders:
            at = holder.reserved_at
            # What has lapsed is no longer reserved, here as in Redis.
            if at <= second - RESERVATION_SECONDS:
                holder.reserved = 0.0
            if at <= second - TOKEN_RESERVATION_SECONDS:
                holder.reserved_tokens = 0
            if holder.reserved > 0 or holder.reserved_tokens > 0:
                running.append(holder)
                reserving.add((holder.consumer, holder.created_at), at, holder.reserved, holder.reserved_tokens)
        releasing = self.unreleased.take(second)
        consumers = sorted(reserving.held.keys() | releasing.held.keys())
        if not consumers:
            return succeed(None)
        for holder in running:
            self.carrying[holder] = None
        keys: list[str] = []
        args = [str(RESERVATION_SECONDS), str(TOKEN_RESERVATION_SECONDS)]
        for whose in consumers:
            keys += [self._keys(*whose, "reserved"), self._keys(*whose, "reserved_tokens")]
            args += [reserving.field(whose, 0), reserving.field(whose, 1)]
            args += [releasing.field(whose, 0), releasing.field(whose, 1)]

        def ended() -> list[tuple[Holder, tuple[float, int, int]]]:
            # The calls carried, out of L{carrying}: those that ended meanwhile.
            done = []
            for holder in running:
                end = self.carrying.pop(holder, None)
                if end is not None:
                    done.append((holder, end))
            return done

        def carried(reply: Any) -> None:
            usd, tokens, usd_released, tokens_released = (float(_text(value)) for value in reply[:4])
            if usd or tokens or usd_released or tokens_released:
                self._log.info(
                    "the cluster's reservations in Redis brought up to this instance's calls: added {usd} USD and "
                    "{tokens} tokens reserved by its calls in flight admitted while Redis was away, released "
                    "{usd_released} USD and {tokens_released} tokens of its calls that ended meanwhile",
                    usd=round(usd, 10),
                    tokens=int(tokens),
                    usd_released=round(usd_released, 10),
                    tokens_released=int(tokens_released),
                )
            done = ended()
            for holder, (reserved, reserved_tokens, at) in done:
                # Its count found it not in Redis yet: released now.
                self.unreleased.add((holder.consumer, holder.created_at), at, reserved, reserved_tokens)
            if done and self.up:
                self.carry(clock)

        def failed(reason: Failure) -> None:
            # Those still running are carried next time; those that ended
            # are in Redis only if it ran the script (its answer lost):
            # they lapse there.  The releases are not sent again: Redis may
            # have made them, and a release takes its amount from the field
            # of its second, which other calls admitted then share (sent
            # twice, it would take theirs).  If Redis did not, those
            # reservations lapse there too.
            ended()
            for holder in running:
                if holder.reserved > 0 or holder.reserved_tokens > 0:
                    self.unshared[holder] = None
            self._log.warn(
                "could not carry the reservations of this instance's calls in flight into the cluster's in Redis "
                "({error}); tried again when Redis is next back, while they last{unreleased}",
                error=reason.getErrorMessage() or repr(reason.value),
                unreleased=(
                    "; the release of what its calls that ended hold there is not (Redis may have made it): if "
                    f"not, that holds until it lapses ({RESERVATION_SECONDS // 60} minutes of a budget, "
                    f"{TOKEN_RESERVATION_SECONDS} s of tpm)"
                    if releasing
                    else ""
                ),
            )

        carrying: Deferred[Any] = self.redis.script(CARRY, keys, args)
        carrying.addTimeout(self.timeout, self.reactor).addCallbacks(carried, failed)
        return carrying.addErrback(
            lambda reason: self._log.failure("carrying this instance's reservations into Redis failed", reason)
        )

    def reconnected(self) -> None:
        """
        Redis is back: what this instance counted into it before may be
        lost (a Redis that came back empty), until L{merge_windows} knows.
        """
        self.before.absorb(self.sent)
        self.sent = WindowLog()

    def unmerged(self) -> bool:
        """
        Whether L{merge_windows} has anything to add.
        """
        return bool(self.away or self.before)

    def learned(self, marker: Any) -> None:
        """
        Redis's seeded marker has value C{marker} (L{SEED}, L{MERGE}; ''
        or None: none).
        """
        if marker:
            self.generation = _text(marker)

    def merge_windows(self, now: float) -> Deferred[None]:
        """
        Add to the cluster's rpm and tpm windows in Redis, per second (one
        L{MERGE} for every consumer, atomically), the requests and tokens of
        the last minute that this instance counted while Redis was away,
        and those it counted into Redis before, if Redis lost them (it came
        back empty: its seeded marker is gone, or another since).  Each is
        merged once; a merge that fails keeps them for the next (Redis
        back again, or its spends seeded), until they are a minute old.
        Merged, they count as counted into this Redis (L{sent}): merged
        again if it too comes back empty.  Never fails; logs what it did.

        @param now: POSIX seconds, Redis's clock (the table's).
        """
        second = int(now)
        away, before = self.away.take(second), self.before.take(second)
        consumers = sorted(away.counts.keys() | before.counts.keys())
        if not consumers:
            return succeed(None)
        keys = [seeded_key(self.redis)]
        args = [str(second), "" if self.generation is None else "=" + self.generation]
        for name, created in consumers:
            keys += [self._keys(name, created, "rpm"), self._keys(name, created, "tpm")]
            args += [away.field((name, created), 0), away.field((name, created), 1)]
            args += [before.field((name, created), 0), before.field((name, created), 1)]

        def merged(reply: Any) -> None:
            # All in this Redis now (merged, or kept by it): lost with it
            # if it comes back empty again within the minute.
            self.sent.absorb(away)
            self.sent.absorb(before)
            lost, marker, requests, tokens = (_text(value) for value in reply[:4])
            self.learned(marker)
            if int(requests) or int(tokens):
                self._log.info(
                    "added {requests} request(s) and {tokens} token(s) of the last minute to the cluster's rpm/tpm "
                    "windows in Redis: counted on this instance while Redis was away{lost}",
                    requests=int(requests),
                    tokens=int(tokens),
                    lost=", or before (Redis came back without them)" if lost == "1" else "",
                )

        def failed(reason: Failure) -> None:
            self.away.absorb(away)
            self.before.absorb(before)
            self._log.warn(
                "could not add the calls this instance counted while Redis was away to the cluster's rpm/tpm "
                "windows ({error}); tried again when Redis is next back, while they are in the last minute",
                error=reason.getErrorMessage() or repr(reason.value),
            )

        merging: Deferred[Any] = self.redis.script(MERGE, keys, args)
        merging.addTimeout(self.timeout, self.reactor).addCallbacks(merged, failed)
        return merging.addErrback(
            lambda reason: self._log.failure("the merge of this instance's rpm/tpm counts into Redis failed", reason)
        )


#: A consumer change's warning while Redis is unreachable (L{SharedConsumers.unshared}).
UNSHARED = (
    "the cluster store (Redis) is unreachable: the change is in the database and holds on this "
    "instance, but the other instances apply it only once Redis is back (until then a revoked key "
    "or a deleted consumer still works there, and a new key is refused there); restart them to "
    "apply it at once"
)
#: How long a change's answer waits for its announcement at most (an
#: C{openclawctl} waits 10 s for an answer by default).
ANSWER_WAIT_SECONDS = 5.0
#: And when Redis did not confirm its announcement in time.
UNTOLD = (
    "the cluster store (Redis) did not confirm telling the other instances (it refused, or did not answer in "
    "time): the change is in the database and holds on this instance; the others may apply it only once Redis "
    "takes writes again (until then "
    "a revoked key or a deleted consumer may still work there, and a new key be refused there); restart them "
    "to apply it at once"
)


class SharedConsumers:
    """
    Keeps an instance's consumer table in step with the cluster: publishes
    its changes, reloads the table from the shared database on another
    instance's, and seeds Redis's spends from the database when Redis has
    none (first start, or a Redis that came back empty).

    The table and the counters are built first, and told of it at their
    construction: the table's C{changed} calls L{publish}, the counters'
    C{unseeded} calls L{seed} (late-binding, as these are built on them).
    """

    _log = Logger()

    def __init__(
        self,
        table: ConsumerTable,
        counters: SharedCounters,
        redis: ScriptRunner,
        instance: str,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        """
        @param monotonic: the clock of the table's L{StallWatch}, in
            seconds, which never steps and goes on while the process is
            stopped (the gateway's C{CLOCK_BOOTTIME}); by default the
            counters' reactor's.
        """
        self.table = table
        self.counters = counters
        self.redis = redis
        self.instance = instance
        #: Holds consumer keys after the event loop stood still, until the
        #: table is reloaded (the others' changes may have been missed
        #: meanwhile): started at the table's first load (L{loaded}).
        self.watch = table.stall_watch = StallWatch(
            table, counters.reactor, monotonic if monotonic is not None else counters.reactor.seconds
        )
        self._seeding: Deferred[Any] | None = None
        #: The reconciliation to come (L{reconcile}), if any.
        self._reconciling: IDelayedCall | None = None
        #: L{stop} was called: no reconciliation is started.
        self._stopped = False
        #: Consumers changed here while Redis was unreachable: announced
        #: when it is back (the other instances may never have lost it,
        #: and would not reload by themselves).
        self._unannounced: set[str] = set()
        #: The announcement of the last change, firing with whether Redis
        #: took it: what the change's answer waits on (L{unshared}).
        #: How many announcements this instance has made (L{unshared}'s
        #: C{since}), the serial of the last one Redis did not take, and
        #: those under way.
        self.announced = 0
        self._untold = 0
        self._in_flight: dict[Deferred[bool], int] = {}
        #: The hashes of the key revokes not saved that Redis holds, as far
        #: as this instance knows (kept there by it, or read there):
        #: announced once each (L{share_revokes}).
        self._revokes_told: set[str] = set()
        table.revokes_shared = True
        counters.writes_taken = self.writes_taken

    def unshared(self, since: int) -> str | Deferred[str | None] | None:
        """
        What the consumer changes made since L{announced} read C{since}
        leave undone elsewhere, for the command's answer: a warning while
        Redis is unreachable; else, once the announcements under way are
        settled (each within C{REDIS_TIMEOUT_SECONDS}; the answer waits
        L{ANSWER_WAIT_SECONDS} at most), None when Redis took every one
        made since (the other instances are told) and a warning when it did
        not take one (a Redis that stopped answering without closing its
        connection, as in a network partition, still looks up).  A change
        made meanwhile by another command may add its warning; none is missed.
        """
        waiting = {announcing for announcing, serial in self._in_flight.items() if serial > since}
        if not waiting or not self.counters.up:
            return self._said(since, waiting)
        answer: Deferred[str | None] = Deferred()

        def settled(told: object) -> object:
            if not answer.called and not waiting & self._in_flight.keys():
                timer.cancel()
                answer.callback(self._said(since, waiting))
            return told

        def late() -> None:
            if not answer.called:
                answer.callback(self._said(since, waiting))

        timer = self.counters.reactor.callLater(min(self.counters.timeout, ANSWER_WAIT_SECONDS), late)
        for announcing in waiting:
            announcing.addBoth(settled)
        return answer

    def _said(self, since: int, waited: set[Deferred[bool]]) -> str | None:
        if not self.counters.up:
            return UNSHARED
        if self._untold > since or waited & self._in_flight.keys():
            # Not taken, or not known to be yet.
            return UNTOLD
        return None

    def publish(self, name: str) -> None:
        if not self.counters.up:
            # Not queued behind a connection that may not come back soon:
            # announced once Redis is back (L{up}).
            self._unannounced.add(name)
            self._log.warn(
                "consumer {name} changed here but the other instances were not told (the cluster store is "
                "unreachable); they are told when Redis is back",
                name=name,
            )
            return
        # Earlier changes whose announcement failed while Redis seemed up:
        # told with this one.  Taken first: an announcement that fails at
        # once (its failure handled before the send returns) is kept for
        # the next time, not cleared with those.
        earlier, self._unannounced = sorted(self._unannounced - {name}), set()
        for each in (name, *earlier):
            self._send(each)

    def share_revokes(self, revokes: dict[str, tuple[str, str]]) -> None:
        """
        Keep key revokes the database did not take (a key's SHA-256 hex ->
        (consumer, prefix)) in Redis, where the other instances read them
        (L{read_revokes}) and refuse the keys; their consumers are announced
        as changed the first time, counted for L{unshared}.  Called at each
        failed write (every L{openclaw.consumers.table.REVOKE_RETRY_SECONDS}):
        a Redis that was unreachable, or lost them, gets them then.
        """
        if not self.counters.up:
            return
        new = {hashed: entry for hashed, entry in revokes.items() if hashed not in self._revokes_told}
        names = sorted({name for name, _ in new.values()})

        def kept(reply: Any) -> Any:
            self._revokes_told.update(revokes)
            return reply

        sent = self.redis.publish_revokes(self.instance, revokes, names).addCallback(kept)
        if names:
            self._send(names[0], sent)
        else:
            sent.addTimeout(self.counters.timeout, self.counters.reactor)
            sent.addErrback(lambda reason: None)

    def revokes_saved(self, hashes: list[str]) -> None:
        """
        The database has the revokes of the keys C{hashes}: forgotten in
        Redis.  When Redis does not take it, the instances that read them
        there write them again (nothing to delete then) and forget them.
        """
        self._revokes_told.difference_update(hashes)
        if not self.counters.up:
            return
        forgetting = self.redis.revokes_saved(hashes)
        forgetting.addTimeout(self.counters.timeout, self.counters.reactor)
        forgetting.addErrback(lambda reason: None)

    def read_revokes(self) -> None:
        """
        Read the key revokes another instance could not write to the
        database (L{share_revokes}): refused here too, and written from
        here too (L{ConsumerTable.adopt_revokes}).
        """
        if not self.counters.up:
            return

        def adopt(revokes: dict[str, tuple[str, str]]) -> None:
            self._revokes_told.update(revokes)
            self.table.adopt_revokes(revokes)

        def unread(reason: Failure) -> None:
            self._log.warn(
                "could not read the key revokes the other instances could not write to the database ({error}); "
                "read again at the next consumer change or Redis reconnection",
                error=reason.getErrorMessage() or repr(reason.value),
            )

        reading = self.redis.revokes()
        reading.addTimeout(self.counters.timeout, self.counters.reactor)
        reading.addCallbacks(adopt, unread)

    def _send(self, name: str, sending: Deferred[Any] | None = None) -> None:
        """
        Announce that consumer C{name} changed (C{sending}: the announcement
        under way, made by another script), counted for L{unshared}; kept
        in L{_unannounced} when Redis does not take it.
        """

        def unsent(reason: Failure) -> bool:
            # Told again when this instance's Redis is back (L{up}): the
            # others may never have lost theirs, and would not reload.
            self._unannounced.add(name)
            self._log.warn(
                "consumer {name} changed here but Redis did not confirm telling the other instances ({error}); "
                "they are told again once Redis takes this instance's writes again (its connection back, or a "
                "heartbeat taken after refusals)",
                name=name,
                error=reason.getErrorMessage() or repr(reason.value),
            )
            return False

        sent = self.redis.publish_consumer(self.instance, name) if sending is None else sending
        sent.addTimeout(self.counters.timeout, self.counters.reactor)
        self.announced += 1
        serial = self.announced
        announcing = sent.addCallbacks(lambda _: True, unsent)
        self._in_flight[announcing] = serial

        def settled(told: object) -> object:
            self._in_flight.pop(announcing, None)
            if told is not True:
                self._untold = max(self._untold, serial)
            return told

        announcing.addBoth(settled)

    def received(self, instance: str, name: str) -> None:
        """
        An instance changed consumer C{name}: reload (this instance's own
        changes are in its table already).
        """
        if instance != self.instance:
            # A key revoke it could not write to the database, maybe.
            self.read_revokes()
        if instance != self.instance and self.table.loaded:
            self.table.refresh()

    def missed(self) -> None:
        """
        Consumers changed since the cluster's last heartbeat (its counter
        moved): reload, as their message may have been lost on a
        subscription gone silent without closing (a reload already due
        absorbs this one).
        """
        self.read_revokes()
        if self.table.loaded:
            self.table.refresh()

    def up(self, up: bool) -> None:
        """
        Redis came (back) or went: when back, changes may have been missed,
        and Redis may have come back empty; the calls counted here
        meanwhile go to its windows first (L{SharedCounters.merge_windows}),
        and the reservations of the calls in flight admitted here meanwhile
        to its reservations (L{SharedCounters.carry}), then its spends are
        seeded if it has none.  (Before the table's
        first load, that load does both.)
        """
        self.counters.up = up
        if up:
            self.counters.reconnected()
        if up and self._unannounced:
            names, self._unannounced = sorted(self._unannounced), set()
            for name in names:
                self.publish(name)
        if up:
            self.read_revokes()
        if up and self.table.loaded:
            self.table.refresh()
            self.merge_windows()
            self.seed()

    def writable(self) -> None:
        """
        Redis takes writes again after refusing them (out of memory with
        C{noeviction}, a read-only replica promoted), without having been
        away: as when it comes back (L{up}), the calls counted here alone
        meanwhile go to its windows and their reservations to its, the
        changes not announced are announced, and the table is reloaded.
        """
        if self.counters.up:
            self.up(True)

    def writes_taken(self) -> None:
        """
        Redis took an admission or a count after refusing one outright
        (L{SharedCounters._taken}, which merged the windows): the
        reservations of the calls admitted here meanwhile go to its, those
        of the calls whose count it refused are released there
        (L{SharedCounters.carry}), and the costs it refused reach its spends
        (L{reconcile}, soon).
        """
        if self.counters.uncarried():
            self.counters.carry(self.table.clock)
        self._reconcile_later()

    def lost(self) -> None:
        """
        Redis lost its keys in place (a heartbeat found the cluster's state
        gone: C{FLUSHALL}, an eviction, a restart under the connection):
        as when it comes back empty, this instance's last minute goes back
        into the rpm and tpm windows and the spends are seeded again.
        (The calls admitted between the loss and the heartbeat that found
        it are in the new windows already: added again, they count twice
        for the rest of their minute.)
        """
        if not self.counters.up:
            return
        self.counters.reconnected()
        if self.table.loaded:
            self.merge_windows()
            self.seed()

    def merge_windows(self) -> None:
        """
        Add the calls this instance counted that Redis's rpm and tpm
        windows lack to them (L{SharedCounters.merge_windows}), and the
        reservations of its calls in flight that Redis lacks to Redis's
        (L{SharedCounters.carry}), if any.
        """
        if self.counters.unmerged():
            self.counters.merge_windows(self.table.clock())
        if self.counters.uncarried():
            self.counters.carry(self.table.clock)

    def loaded(self) -> None:
        """
        The table's first load is done: seed Redis if it is reachable, and
        watch for stalls of the event loop (L{StallWatch}).
        """
        if not self._stopped:
            self.watch.start()
        if self.counters.up:
            self.read_revokes()
            self.seed()

    def seed(self) -> None:
        """
        Write the database's spends of the running periods to Redis unless
        it has them (one seeding at a time).
        """
        if self._seeding is not None:
            return
        table = self.table

        def write(loaded: tuple[Snapshot, dict[tuple[str, str], float]]) -> Deferred[Any]:
            snapshot, unwritten = loaded
            # Meanwhile this instance checks budgets against the database's
            # spends (its own counts already hold its unwritten rows).
            self.counters.load(snapshot.spend)
            # With this instance's rows not written yet: their counts
            # reached a Redis not seeded (sent before this), which took none.
            keys, args = self._spends(snapshot, unwritten)
            # The marker's value if this seeds: any other than the one an
            # instance saw says Redis lost its windows since (L{MERGE}).
            return self.redis.script(SEED, keys, [*args, secrets.token_hex(8)])

        def seeded(written: Any) -> None:
            if int(written[0]) == 1:
                self._log.info("consumers' spends seeded in Redis from the database")
            self.counters.learned(written[1])
            # Calls admitted here while Redis had no spends (and those of
            # a merge that failed) reach its windows.
            self.merge_windows()
            # Either way: costs counted while Redis was away (here, or on
            # instances whose rows were not written yet when the seed read
            # the database) reach its running figures.
            self._reconcile_later()

        def failed(reason: Failure) -> None:
            self._log.warn(
                "could not seed the consumers' spends in Redis ({error}); budgets are checked per instance meanwhile",
                error=database_error(reason),
            )

        def done(result: object) -> None:
            self._seeding = None
            if isinstance(result, Failure):
                # A fault of ours in seeded or failed (a Redis away is
                # failed's).
                self._log.failure(
                    "a fault of the gateway handling the seed of the consumers' spends in Redis ({error}); the next "
                    "reconnection to Redis seeds again: report it with this traceback",
                    result,
                    error=result.getErrorMessage() or repr(result.value),
                )

        # This instance's rows first: their spend is then in the database.
        seeding = self._seeding = table.load_unwritten().addCallback(write)
        seeding.addCallbacks(seeded, failed).addBoth(done)

    def _spends(self, snapshot: Snapshot, unwritten: dict[tuple[str, str], float]) -> tuple[list[str], list[str]]:
        """
        The keys (the seeded marker first) and arguments of L{SEED} and
        L{RAISE} for the spends of C{snapshot} (a database load) in the
        running periods, with the C{unwritten} costs of this instance's
        rows it lacks (L{ConsumerTable.load_unwritten}) added.
        """
        keys = [seeded_key(self.redis)]
        args: list[str] = []
        now = self.table.clock()
        spend = dict(snapshot.spend)
        for counted, usd in unwritten.items():
            spend[counted] = spend.get(counted, 0.0) + usd
        for period in ("day", "month", "total"):
            running = period_key(period, now)
            for (name, key), usd in sorted(spend.items()):
                consumer = snapshot.consumers.get(name)
                # A spend no consumer has (a deleted one's) is not seeded.
                if key == running and consumer is not None:
                    keys.append(consumer_key(self.redis, name, consumer.created_at, "spend", key))
                    args += [_usd(usd), str(SPEND_TTL[period])]
        return keys, args

    def _reconcile_later(self) -> None:
        if self._stopped:
            return
        if self._reconciling is None or not self._reconciling.active():
            self._reconciling = self.counters.reactor.callLater(RECONCILE_SECONDS, self.reconcile)

    def reconcile(self) -> None:
        """
        Raise each running spend Redis holds below the database's figure
        plus this instance's rows not written yet
        (L{ConsumerTable.load_unwritten}) to it (L{RAISE}): after Redis
        came back, it lacks the costs this instance counted while it could
        not reach it, and a Redis that came back empty was seeded from a
        database that lacked the rows other instances had not written yet.
        The rows this instance has not written are in the figure (Redis
        counted them: without them, the raise would undo them); those of
        the other instances are not, and each instance's own
        reconciliation counts its own.  (A spend is never lowered: Redis
        holds costs of rows not written yet.)
        """
        if self._reconciling is not None and self._reconciling.active():
            # Called before its time: this one does it.
            self._reconciling.cancel()
        self._reconciling = None
        if self._stopped or not self.counters.up:
            return
        table = self.table

        def write(loaded: tuple[Snapshot, dict[tuple[str, str], float]]) -> Deferred[Any]:
            # With this instance's rows not written yet, which Redis
            # counted (a figure without them would undo them).
            keys, args = self._spends(*loaded)
            return self.redis.script(RAISE, keys, args)

        def raised(count: Any) -> None:
            if int(count):
                self._log.info(
                    "raised {count} consumer spend(s) in Redis to the database's (costs counted while Redis was away)",
                    count=int(count),
                )

        def failed(reason: Failure) -> None:
            self._log.warn(
                "could not bring the consumers' spends in Redis up to the database's ({error}); they are "
                "tried again when Redis is next back",
                error=database_error(reason),
            )

        table.load_unwritten().addCallback(write).addCallbacks(raised, failed)

    def stop(self) -> None:
        """
        Cancel a reconciliation still to come, and start none from now on
        (a seed or a reconnection finishing while the service stops).
        """
        self._stopped = True
        self.watch.stop()
        if self._reconciling is not None and self._reconciling.active():
            self._reconciling.cancel()
        self._reconciling = None


def _rate_limits(consumer: Consumer, now: float, reply: Any) -> RateLimits:
    """
    The cluster's rpm and tpm windows as an admission's reply (L{ADMIT})
    gives them.
    """
    requests_used, tokens_used, tokens_newest = (int(float(value)) for value in reply[3:6])
    return RateLimits(
        consumer.rpm,
        (consumer.rpm or 0) - requests_used,
        # This call's request was counted in this second's field: the
        # window is empty again once that field leaves it, 61 s after the
        # second's start (L{CLUSTER_WINDOW_SECONDS}).
        reset_after(int(now), now, CLUSTER_WINDOW_SECONDS) if requests_used > 0 else 0.0,
        consumer.tpm,
        (consumer.tpm or 0) - tokens_used,
        reset_after(tokens_newest or None, now, CLUSTER_WINDOW_SECONDS),
    )


__all__ = [
    "ADMIT",
    "CARRY",
    "CLUSTER_WINDOW_SECONDS",
    "COUNT",
    "MERGE",
    "RAISE",
    "RELEASE",
    "SEED",
    "WINDOW_KEY_SECONDS",
    "ReservationLog",
    "SharedConsumers",
    "SharedCounters",
    "WindowLog",
    "consumer_key",
    "seeded_key",
]
