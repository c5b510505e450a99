"""
The consumers as the data plane sees them: held in memory (loaded from the
database at start, changed by the control-plane commands), so checking a
key and its limits costs no database or network round trip.  Usage is
counted after each answer and written to the database in batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from openclaw.consumers.estimate import MAX_TOKEN_COUNT, count_or_zero, token_count
from openclaw.consumers.gateway_usage import GatewayUsage
from openclaw.consumers.limits import RateLimits, SlidingWindow, reset_after
from openclaw.consumers.model import (
    NO_CONSUMER,
    Consumer,
    NewKey,
    ctl_arguments,
    key_hash,
    period_end,
    period_key,
    retired_name,
    usd,
)
from openclaw.consumers.prices import PriceTable
from openclaw.consumers.store import (
    CommandTimedOut,
    ConsumerExists,
    ConsumerStore,
    DatabaseFileLost,
    RowIds,
    Snapshot,
    UsageRow,
    database_error,
    log_database_failure,
    unwritten_error,
)
from openclaw.dataplane.errors import MAX_SLEPT_RETRY_AFTER_SECONDS, APIError
from openclaw.deferreds import InFlight
from openclaw.loops import LoggedStep
from openclaw.timefmt import isoformat

if TYPE_CHECKING:
    from openclaw.consumers.freshness import StallWatch
    from openclaw.consumers.unsaved import UnsavedRevokesFile

#: Rows kept waiting for the database at most (when it is down): past it
#: the oldest are dropped, and the loss is logged.
MAX_PENDING_ROWS = 100_000
#: Rows one write (one transaction) takes at most; the rest wait for the
#: next, which follows at once when a write was full.  A backlog grown
#: while the database could not be written (a full disk) then fits again
#: once small writes do: in one transaction it never did, and a stop gave
#: it up (1,595 paid calls gone from spend and usage).
MAX_ROWS_PER_WRITE = 250
#: A budget reservation of a call never counted (its client went away
#: before the call started, its instance crashed) is forgotten after this
#: long, in seconds.
RESERVATION_SECONDS = 900
#: Seconds between the log lines of usage rows that still cannot be written.
FAILURE_LOG_SECONDS = 60
#: A write of usage rows the database has held this long, in seconds (a
#: lock another session holds on its tables, a database that stopped
#: answering: no error comes), is logged; then once every
#: L{FAILURE_LOG_SECONDS} while it lasts, and once when it ends.
HELD_LOG_SECONDS = 10
#: How long the usage command waits for a write of usage rows under way,
#: in seconds, before it reads what the database has (and says how many
#: rows it lacks).
USAGE_WAIT_SECONDS = 2.0
#: At stop, a failed write of the last usage rows is tried again after
#: this long, in seconds, then twice as long each time, up to
#: L{STOP_RETRY_MAX_SECONDS}; the last try starts no later than this long
#: before the end of the shutdown grace (L{ConsumerTable.stop}).
STOP_RETRY_SECONDS = 0.1
STOP_RETRY_MAX_SECONDS = 1.0
#: The one line of the last usage rows given up at stop (L{ConsumerTable.stop}).
GIVEN_UP = (
    "could not write the last {count} usage rows at stop ({error}); given up (usage and spend will not count "
    "them): check DATABASE_URL / STATE_DIR"
)
#: The C{Retry-After} (seconds) of a budget refusal due to calls in flight
#: only (L{budget_spent}): a short wait, for them to end and be counted.
BUDGET_RETRY_SECONDS = 2
#: The C{Retry-After} (seconds) at most of a C{tpm} refusal due to calls in
#: flight only (L{tpm_refused}): as a budget's, a short wait for them to end.
TOKENS_RETRY_SECONDS = BUDGET_RETRY_SECONDS
#: A C{tpm} reservation lapses after the window it counts in (60 s): a
#: call never counted (its instance crashed) must not hold a consumer's
#: tokens for longer than the limit's own memory; a call still running
#: then is counted when it ends, like any other.
TOKEN_RESERVATION_SECONDS = 60
#: The provider and model of the usage row of a call refused before its
#: body was read (L{ConsumerTable.refused_unread}): none was named yet.
UNREAD = "-"

_Amount = TypeVar("_Amount", int, float)


class NotReleased(Exception):
    """
    A consumer's reservations could not be released
    (L{ConsumerTable.release_reservations}): C{str()} says why, and what
    to do.
    """


#: How often a key revoke the database did not take is tried again, in
#: seconds (L{ConsumerTable.revoke_key}); the key is refused meanwhile.
REVOKE_RETRY_SECONDS = 5.0
#: How many revokes taken at once (L{ConsumerTable.adopt_revokes}) are
#: said one line each: the rest in one line (every key of a leak revoked
#: while the database was down).
ADOPTED_REVOKES_SAID = 10


class RevokeNotSaved(Exception):
    """
    A key revoke the database did not take (C{reason}, the store's
    failure): the key is refused by this table all the same, and the
    revoke is written again every L{REVOKE_RETRY_SECONDS} until the
    database takes it (L{ConsumerTable.revoke_key}).

    @ivar kept_in: the file in C{STATE_DIR} that keeps it for the next
        start (L{UnsavedRevokesFile}), None when it is not kept there.
    """

    def __init__(self, reason: Failure, kept_in: Path | None = None) -> None:
        super().__init__(reason.getErrorMessage())
        self.reason = reason
        self.kept_in = kept_in


class ConsumerGone(Exception):
    """
    A change to a consumer found it gone: deleted meanwhile, by another
    command or on another instance.  C{str()} is its name.
    """


@attrs.define(eq=False)
class Holder:
    """
    Who presented a key: a consumer (its name and the key's prefix) or,
    for C{GATEWAY_API_KEYS}' keys, L{GATEWAY}.  One per request: it also
    carries what the request reserved of its consumer's budget and C{tpm}
    until its answer is counted (see L{ConsumerTable.admit}).
    """

    consumer: str
    prefix: str
    #: The consumer's C{created_at}: which consumer of that name (one
    #: deleted and created again is another, L{ConsumerTable.current}).
    created_at: float = 0.0
    #: US dollars reserved at admission, released when the call is counted.
    reserved: float = 0.0
    #: Tokens reserved of the C{tpm} window at admission, replaced by the
    #: call's actual tokens when it is counted.
    reserved_tokens: int = 0
    #: The second (POSIX, whole) the reservations were made in.
    reserved_at: int = 0
    #: How many times the operator had released its consumer's
    #: reservations on this instance when it made its own
    #: (L{LocalCounters.release_held}): released since, they are no longer
    #: its to release (another call's of the same second may be there).
    reserved_epoch: int = 0
    #: The answer to every request of this holder (an expired consumer's
    #: 401), given by the resource so the refusal names its consumer.
    refusal: APIError | None = None
    #: What its admission left of the consumer's C{rpm} and C{tpm}, for
    #: the answer's C{x-ratelimit-*} headers; L{None} with neither limit.
    rate_limits: RateLimits | None = None
    #: In a cluster, the second (POSIX, whole) of an admission the
    #: cluster's requests window has yet to count: a consumer with no
    #: limit makes no admission round trip to Redis, and its request is
    #: counted there with the call's tokens (L{Counters.counted}); 0 once
    #: counted, or when nothing is left to count.
    request_at: int = 0


GATEWAY = Holder(NO_CONSUMER, NO_CONSUMER)


class ConsumerMetricsLike(Protocol):
    def requests(self, consumer: str, status: int) -> None: ...
    def tokens(self, consumer: str, prompt: int, completion: int, reasoning: int) -> None: ...
    def spend(self, consumer: str, usd: float) -> None: ...
    def limited(self, consumer: str, reason: str) -> None: ...
    def count_pending(self, pending: Callable[[], int]) -> None: ...


def usage_counts(usage: Any) -> tuple[int, int, int, int]:
    """
    C{(prompt, completion, reasoning, cached prompt)} tokens of OpenAI's
    C{usage} object, each read by L{token_count} (0 for what is missing or
    no count).  Whether a consumer is charged these or an estimate is
    L{known_counts}' to say (see L{openclaw.dataplane.call}).

    The cached prompt tokens are OpenAI's
    C{usage.prompt_tokens_details.cached_tokens}: a provider's own field
    for them is given that place by its wire before the usage is counted
    (L{OpenAIWire.usage_shape
    <openclaw.providers.openai_compatible.OpenAIWire.usage_shape>}:
    Moonshot's top-level C{cached_tokens}).
    """
    if not isinstance(usage, dict):
        return 0, 0, 0, 0
    completion_details = usage.get("completion_tokens_details")
    prompt_details = usage.get("prompt_tokens_details")
    cached = token_count(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else None
    return (
        count_or_zero(usage.get("prompt_tokens")),
        count_or_zero(usage.get("completion_tokens")),
        count_or_zero(completion_details.get("reasoning_tokens")) if isinstance(completion_details, dict) else 0,
        cached if cached is not None else 0,
    )


def completion_limit(body: dict[str, Any]) -> int | None:
    """
    The completion tokens a chat request bounds its answer to:
    C{max_completion_tokens}, else C{max_tokens} (OpenAI's names), else None.
    """
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if type(value) is int and value > 0:
            return value
    return None


def rate_limited(consumer: str, what: str, limit: int, retry_after: int) -> APIError:
    """
    The 429 of a consumer over its C{rpm} or C{tpm} (C{what}), in the
    shape of OpenAI's own: code C{rate_limit_exceeded}, type C{requests}
    for a requests limit and C{tokens} for a tokens limit (as OpenAI's
    "Rate limit reached ... on tokens per min (TPM)" answers), with
    C{Retry-After}: C{retry_after}, but 60 s at most, a minute, for which
    the openai SDKs sleep and retry (L{MAX_SLEPT_RETRY_AFTER_SECONDS}); a
    cluster counts whole seconds, so a call may hold its window 61 s
    (L{openclaw.consumers.shared.CLUSTER_WINDOW_SECONDS}), and a retry a
    second early is told 1 s more (told 61, the SDK raised at
    once, where a single gateway's 60 had it retry).
    """
    retry_after = min(retry_after, MAX_SLEPT_RETRY_AFTER_SECONDS)
    return APIError(
        429,
        f"consumer {consumer!r} is over its {what} limit of {limit} per minute (a sliding window of a minute); "
        f"retry after {retry_after} s, or ask the operator to raise {what} with consumer_update",
        "tokens" if what == "tpm" else "requests",
        "rate_limit_exceeded",
        retry_after=retry_after,
    )


def _held_in_cluster(consumer: str, lapse_seconds: int) -> str:
    """
    What a refusal due to calls in flight (C{tokens_reserved},
    C{budget_reserved}) decided from the cluster's figures in Redis adds at
    its end: calls in flight on another instance may hold the
    reservations, and a crashed one's hold until they lapse after
    C{lapse_seconds} (L{TOKEN_RESERVATION_SECONDS} of C{tpm},
    L{RESERVATION_SECONDS} of a budget), unless the operator releases them
    (C{openclawctl consumer release NAME}: C{consumer_release});
    C{openclawctl consumer list} shows what is held.
    """
    lapse = f"{lapse_seconds // 60} minutes" if lapse_seconds % 60 == 0 and lapse_seconds > 60 else f"{lapse_seconds} s"
    return (
        f". Some of those calls may be another instance's of the cluster: if it crashed, its reservations lapse "
        f"after {lapse}, or the operator can release them at once (openclawctl consumer release "
        f"{ctl_arguments(consumer)}); "
        "openclawctl consumer list shows what is held"
    )


def tpm_refused(
    consumer: str, limit: int, used: int, held: int, retry_after: int, *, cluster: bool = False
) -> APIError:
    """
    The 429 of a consumer refused by its C{tpm} (the admission rule of
    L{ConsumerTable.admit}: the C{used} tokens of the last 60 s plus those
    C{held} by its calls in flight reach C{limit}).

    With the window's own tokens at the limit: L{rate_limited}, its
    C{Retry-After} when the window has room.  Otherwise the calls in
    flight's reservations make the rest (their prompt's estimate and their
    C{max_tokens}, or C{CONSUMER_RESERVE_TOKENS} without one): a refusal
    that says so, type C{tokens_reserved} (code C{rate_limit_exceeded}, as
    the budget's C{budget_reserved}), with a C{Retry-After} of
    L{TOKENS_RETRY_SECONDS} at most (retried by the openai SDKs; a call is
    admitted whatever it reserves once they end), saying to retry or to set
    C{max_tokens} so that each call reserves less.  Trial s27: a C{tpm} of
    1000, one call in flight without C{max_tokens} (1001 reserved, 14 used):
    "over its tpm limit", C{Retry-After: 59}.

    @param retry_after: seconds until the window has room were each call
        in flight counted as it was admitted (L{SlidingWindow.retry_after}).
    @param cluster: the figures are the cluster's, from Redis: the
        C{tokens_reserved} message ends with L{_held_in_cluster}.
    """
    if used >= limit or held <= 0:
        return rate_limited(consumer, "tpm", limit, retry_after)
    retry = min(TOKENS_RETRY_SECONDS, retry_after)
    hint = _held_in_cluster(consumer, TOKEN_RESERVATION_SECONDS) if cluster else ""
    return APIError(
        429,
        f"consumer {consumer!r}: calls in flight hold {held} tokens of its tpm limit of {limit} per minute "
        f"({used} used in the last minute, {held} reserved by calls in flight until they are counted); "
        f"retry after {retry} s, once they end, or set max_tokens so that each call reserves less{hint}",
        "tokens_reserved",
        "rate_limit_exceeded",
        retry_after=retry,
    )


def budget_spent(
    consumer: Consumer, spent: float, now: float, reserved: float = 0.0, *, cluster: bool = False
) -> APIError:
    """
    The 429 of a consumer refused by its budget (the admission rule of
    L{ConsumerTable.admit}: the period's C{spent} plus the US dollars
    C{reserved} by its calls in flight reach C{budget_usd}).

    With the budget spent (C{spent} alone reaches it): OpenAI's answer for
    spent quota, code and type C{insufficient_quota}, with
    C{x-should-retry: false}, as no retry helps before the operator acts
    or the period renews.  Otherwise the calls in flight hold the rest of
    it until they are counted, and a call admitted whatever it reserves
    once they end (the rule) may pass then: a temporary refusal, closer to
    OpenAI's rate limits, 429 code C{rate_limit_exceeded}, type
    C{budget_reserved}, with C{Retry-After: }L{BUDGET_RETRY_SECONDS}
    (retried by the openai SDKs), saying to retry or to set C{max_tokens}
    so that each call reserves less.

    @param cluster: the figures are the cluster's, from Redis: the
        C{budget_reserved} message ends with L{_held_in_cluster}.
    """
    period = consumer.budget_period
    budget = consumer.budget_usd or 0
    described = {"day": "per UTC day", "month": "per UTC calendar month", "total": "in total"}[period]
    if reserved > 0 and spent < budget:
        return APIError(
            429,
            f"consumer {consumer.name!r}: calls in flight hold the rest of its budget of {usd(budget)} USD "
            f"{described} (spent {usd(spent)} USD, {usd(reserved)} USD reserved by calls in flight until they "
            f"are counted); retry after {BUDGET_RETRY_SECONDS} s, once they end, or set max_tokens so that "
            f"each call reserves less{_held_in_cluster(consumer.name, RESERVATION_SECONDS) if cluster else ''}",
            "budget_reserved",
            "rate_limit_exceeded",
            retry_after=BUDGET_RETRY_SECONDS,
        )
    end = period_end(period, now)
    renews = f"; it renews at {isoformat(end)}" if end is not None else ""
    held = f", {usd(reserved)} USD more reserved by calls in flight" if reserved > 0 else ""
    return APIError(
        429,
        f"consumer {consumer.name!r} has used its budget of {usd(budget)} USD "
        f"{described} (spent {usd(spent)} USD{held}){renews}; ask the operator to raise budget_usd with consumer_update",
        "insufficient_quota",
        "insufficient_quota",
        # Not worth retrying before the operator acts: the openai SDKs
        # retry every 429 unless the answer says not to (x-should-retry).
        headers=((b"x-should-retry", b"false"),),
    )


def model_not_priced(consumer: Consumer, provider: str, model: str) -> APIError:
    """
    The 403 of a consumer with a budget calling a model the price table
    does not know: its calls could not be counted against the budget.
    """
    return APIError(
        403,
        f"consumer {consumer.name!r} has a budget and {provider}/{model} has no price in the gateway's table, "
        "so its calls could not be counted against that budget: name a priced model, or ask the operator "
        "to add this model's price (PRICES_FILE) or to remove the budget with consumer_update",
        "invalid_request_error",
        "model_not_priced",
        "model",
    )


def model_not_allowed(consumer: Consumer, provider: str, model: str) -> APIError:
    return APIError(
        403,
        f"consumer {consumer.name!r} may not use {provider}/{model}; its models are "
        f"{', '.join(consumer.models)}: name one of those (as provider/model), or ask the operator to add "
        "this one to its models with consumer_update",
        "invalid_request_error",
        "model_not_allowed",
        "model",
    )


class Counters(Protocol):
    """
    Where the per-minute windows and the period's spend are kept: in this
    process (L{LocalCounters}), or in Redis for a cluster.
    """

    def admit(
        self, consumer: Consumer, now: float, holder: Holder | None = None, reserve: float = 0.0, tokens: int = 0
    ) -> APIError | Deferred[APIError | None] | None: ...

    def refusal(self, consumer: Consumer, now: float) -> APIError | None: ...

    def counted(self, consumer: str, tokens: int, cost: float, now: float, holder: Holder | None = None) -> None: ...

    def spent(self, consumer: str, period: str, now: float) -> float: ...

    def load(self, spend: dict[tuple[str, str], float]) -> None: ...

    def forget(self, consumer: str) -> None: ...

    def deleted(self, consumer: Consumer, now: float) -> None: ...

    def read_spends(self, consumers: list[Consumer], now: float) -> Deferred[None]: ...

    def held(self, consumer: str, now: float) -> tuple[float, int]: ...

    def release_held(self, consumer: Consumer, now: float) -> Deferred[tuple[float, int]]: ...


@attrs.define
class LocalCounters:
    """
    The windows and spends of one instance, in memory: a check is a few
    dict lookups.
    """

    requests: dict[str, SlidingWindow] = attrs.Factory(dict)
    tokens: dict[str, SlidingWindow] = attrs.Factory(dict)
    #: (consumer, period key) -> US dollars.
    spend: dict[tuple[str, str], float] = attrs.Factory(dict)
    #: consumer -> {second of admission: US dollars reserved by calls in flight}.
    reservations: dict[str, dict[int, float]] = attrs.Factory(dict)
    #: consumer -> {second of admission: tokens reserved by calls in flight}.
    token_reservations: dict[str, dict[int, int]] = attrs.Factory(dict)
    #: consumer -> how many times its reservations were released
    #: (L{release_held}; absent: never).
    releases: dict[str, int] = attrs.Factory(dict)

    def load(self, spend: dict[tuple[str, str], float]) -> None:
        # The database's figure, unless this instance counted more (rows
        # not yet written).
        for key, spent in spend.items():
            if spent > self.spend.get(key, 0.0):
                self.spend[key] = spent

    def spent(self, consumer: str, period: str, now: float) -> float:
        return self.spend.get((consumer, period_key(period, now)), 0.0)

    def reserved(self, consumer: str, now: float) -> float:
        """
        US dollars reserved by calls admitted within the last
        L{RESERVATION_SECONDS} and not counted yet.
        """
        held = _live(self.reservations.get(consumer), now)
        return max(0.0, sum(held.values())) if held else 0.0

    def reserved_tokens(self, consumer: str, now: float) -> dict[int, int]:
        """
        {second of admission: tokens} reserved by calls admitted within
        the last L{TOKEN_RESERVATION_SECONDS} and not counted yet.
        """
        return _live(self.token_reservations.get(consumer), now, TOKEN_RESERVATION_SECONDS) or {}

    def reserve(self, consumer: str, holder: Holder | None, reserve: float, now: float, tokens: int = 0) -> None:
        if holder is None or (reserve <= 0 and tokens <= 0):
            return
        at = int(now)
        holder.reserved_at = at
        holder.reserved_epoch = self.releases.get(consumer, 0)
        if reserve > 0:
            held = self.reservations.setdefault(consumer, {})
            held[at] = held.get(at, 0.0) + reserve
            holder.reserved = reserve
        if tokens > 0:
            tokens_held = self.token_reservations.setdefault(consumer, {})
            tokens_held[at] = tokens_held.get(at, 0) + tokens
            holder.reserved_tokens = tokens

    def release(self, consumer: str, holder: Holder | None) -> None:
        if holder is None:
            return
        if holder.reserved_epoch != self.releases.get(consumer, 0):
            # Released by the operator since (L{release_held}): nothing of
            # its is left here.
            holder.reserved, holder.reserved_tokens = 0.0, 0
            return
        if holder.reserved > 0:
            held = self.reservations.get(consumer)
            if held is not None and holder.reserved_at in held:
                left = held[holder.reserved_at] - holder.reserved
                if left > 1e-12:
                    held[holder.reserved_at] = left
                else:
                    del held[holder.reserved_at]
            holder.reserved = 0.0
        if holder.reserved_tokens > 0:
            tokens_held = self.token_reservations.get(consumer)
            if tokens_held is not None and holder.reserved_at in tokens_held:
                tokens_left = tokens_held[holder.reserved_at] - holder.reserved_tokens
                if tokens_left > 0:
                    tokens_held[holder.reserved_at] = tokens_left
                else:
                    del tokens_held[holder.reserved_at]
            holder.reserved_tokens = 0

    def refusal(self, consumer: Consumer, now: float) -> APIError | None:
        """
        The 429 L{admit} answers C{consumer} now whatever its call would
        reserve (its budget spent or held by calls in flight, its C{tpm}
        or C{rpm} window full), or None; counts nothing.  The same
        refusal, in the same order, as L{admit}'s: L{admit} decides with
        it first.
        """
        name = consumer.name
        if consumer.budget_usd is not None:
            spent = self.spent(name, consumer.budget_period, now)
            reserved = self.reserved(name, now)
            if spent + reserved >= consumer.budget_usd:
                return budget_spent(consumer, spent, now, reserved)
        if consumer.tpm is not None:
            # No window yet: nothing counted (and none made for a refusal).
            window = self.tokens.get(name, None)
            if window is None:
                window = SlidingWindow()
            held = self.reserved_tokens(name, now)
            used, reserved_tokens = window.used(now), sum(held.values())
            if used + reserved_tokens >= consumer.tpm:
                retry = window.retry_after(now, consumer.tpm, sorted(held.items()))
                return tpm_refused(name, consumer.tpm, used, reserved_tokens, retry)
        if consumer.rpm is not None:
            requests = self.requests.get(name, None)
            if requests is None:
                requests = SlidingWindow()
            if requests.used(now) >= consumer.rpm:
                return rate_limited(name, "rpm", consumer.rpm, requests.retry_after(now, consumer.rpm))
        return None

    def admit(
        self, consumer: Consumer, now: float, holder: Holder | None = None, reserve: float = 0.0, tokens: int = 0
    ) -> APIError | None:
        if consumer.tpm is not None and consumer.name not in self.tokens:
            self.tokens[consumer.name] = SlidingWindow()
        refused = self.refusal(consumer, now)
        if refused is not None:
            return refused
        # Every consumer's requests are counted, with an rpm or without
        # (as its tokens are, L{counted}): an rpm set later judges the
        # last 60 s, not only the requests made since.
        window = self.requests.get(consumer.name)
        if window is None:
            window = self.requests[consumer.name] = SlidingWindow()
        window.add(now)
        self._reserve(consumer, holder, reserve, tokens, now)
        if holder is not None and (consumer.rpm is not None or consumer.tpm is not None):
            holder.rate_limits = self.rate_limits(consumer, now)
        return None

    def rate_limits(self, consumer: Consumer, now: float) -> RateLimits:
        """
        What this instance's windows hold of C{consumer}'s C{rpm} and
        C{tpm} now (the tokens reserved by calls in flight counted as used).
        """
        name = consumer.name
        requests = self.requests.get(name)
        used_requests = 0 if requests is None else requests.used(now)
        tokens = self.tokens.get(name)
        used_tokens = 0 if tokens is None else tokens.used(now)
        held = self.reserved_tokens(name, now)
        latest = [
            float(at) for at in (None if tokens is None else tokens.newest(), max(held, default=None)) if at is not None
        ]
        newest = max(latest, default=None)
        return RateLimits(
            consumer.rpm,
            (consumer.rpm or 0) - used_requests,
            reset_after(None if requests is None else requests.newest(), now),
            consumer.tpm,
            (consumer.tpm or 0) - used_tokens - sum(held.values()),
            reset_after(newest, now),
        )

    def _reserve(self, consumer: Consumer, holder: Holder | None, reserve: float, tokens: int, now: float) -> None:
        self.reserve(
            consumer.name,
            holder,
            reserve if consumer.budget_usd is not None else 0.0,
            now,
            tokens if consumer.tpm is not None else 0,
        )

    def admitted(
        self, consumer: Consumer, now: float, holder: Holder | None = None, reserve: float = 0.0, tokens: int = 0
    ) -> None:
        """
        Count a call admitted elsewhere (by Redis, for the cluster, or
        without a check for a consumer with no limit) without checking it:
        this instance's figures stay close to the cluster's for when Redis
        goes away.
        """
        window = self.requests.get(consumer.name)
        if window is None:
            window = self.requests[consumer.name] = SlidingWindow()
        window.add(now)
        self._reserve(consumer, holder, reserve, tokens, now)

    def counted(self, consumer: str, tokens: int, cost: float, now: float, holder: Holder | None = None) -> None:
        self.release(consumer, holder)
        if tokens:
            window = self.tokens.get(consumer)
            if window is None:
                window = self.tokens[consumer] = SlidingWindow()
            window.add(now, tokens)
        if cost:
            for period in ("day", "month", "total"):
                key = (consumer, period_key(period, now))
                self.spend[key] = self.spend.get(key, 0.0) + cost
        # Spends of periods now over are never read again.
        if len(self.spend) > 3 * (len(self.requests) + len(self.tokens) + 16):
            current = {period_key(p, now) for p in ("day", "month", "total")}
            self.spend = {k: v for k, v in self.spend.items() if k[1] in current}

    def forget(self, consumer: str) -> None:
        """
        Drop everything counted for C{consumer} (deleted, here or on
        another instance): a consumer created again under its name starts
        from nothing.
        """
        self.requests.pop(consumer, None)
        self.tokens.pop(consumer, None)
        self.reservations.pop(consumer, None)
        self.token_reservations.pop(consumer, None)
        self.releases.pop(consumer, None)
        self.spend = {key: usd for key, usd in self.spend.items() if key[0] != consumer}

    def deleted(self, consumer: Consumer, now: float) -> None:
        self.forget(consumer.name)

    def read_spends(self, consumers: list[Consumer], now: float) -> Deferred[None]:
        # This instance's spends are the whole of them.
        return succeed(None)

    def held(self, consumer: str, now: float) -> tuple[float, int]:
        """
        What C{consumer}'s calls in flight hold now: C{(US dollars of its
        budget, tokens of its tpm)} (L{reserved}, L{reserved_tokens}).
        """
        return self.reserved(consumer, now), sum(self.reserved_tokens(consumer, now).values())

    def release_held(self, consumer: Consumer, now: float) -> Deferred[tuple[float, int]]:
        """
        Release every reservation of C{consumer}'s calls in flight (the
        operator's C{consumer_release}): its budget and C{tpm} are judged
        without them from now on; the calls are counted when they end, as
        any other (their count then releases nothing).

        @return: (a Deferred firing at once with) the US dollars and the
            tokens released: those L{held} counted.
        """
        name = consumer.name
        released = self.held(name, now)
        self.reservations.pop(name, None)
        self.token_reservations.pop(name, None)
        # The calls reserved before are not to release anything now.
        self.releases[name] = self.releases.get(name, 0) + 1
        return succeed(released)


def _live(
    held: dict[int, _Amount] | None, now: float, lifetime: int = RESERVATION_SECONDS
) -> dict[int, _Amount] | None:
    """
    C{held} (second of admission -> amount reserved) without the
    reservations older than C{lifetime} seconds, which it forgets.
    """
    if held:
        horizon = now - lifetime
        for at in [at for at in held if at <= horizon]:
            del held[at]
    return held


class ConsumerTable:
    """
    Consumers and their keys' hashes, in memory; the checks the data plane
    makes, and the accounting after each call.

    @param clock: POSIX seconds (C{reactor.seconds}).
    @param flush_seconds: how often usage rows are written, in one batch.
    @param reserve_tokens: completion tokens a call without C{max_tokens}
        reserves of its consumer's budget and C{tpm} while in flight
        (C{CONSUMER_RESERVE_TOKENS}).
    @param changed: called with a consumer's name after every change a
        command made to it (in a cluster: announce it,
        L{openclaw.consumers.shared.SharedConsumers.publish}).
    @param revoke_unsaved: called with the keys of a revoke the database
        did not take (a key's SHA-256 hex -> (consumer, prefix)), at each
        try (in a cluster: keep it in Redis for the other instances,
        L{openclaw.consumers.shared.SharedConsumers.share_revokes}).
    @param revoke_saved: called with the hashes of a revoke's keys once
        the database has it (in a cluster: forget it in Redis).
    @param revokes_file: where the revokes not saved are kept for the
        next start (C{STATE_DIR}'s); None: not kept.
    @param held_log_seconds: how long a write of usage rows the database
        holds goes unsaid, in seconds (L{HELD_LOG_SECONDS} by default).
    @param hold_until_loaded: write no usage rows until the table is
        L{loaded} (the gateway's: its schema is made, or found, first; a
        database that could not be used at start has no table to write
        them to): they wait, and are written by the first flush after the
        load; at stop they are tried all the same, and given up in one
        line, without a traceback, if the database still cannot take them.
    """

    _log = Logger()

    def __init__(
        self,
        store: ConsumerStore,
        prices: PriceTable,
        clock: Callable[[], float] = time.time,
        metrics: ConsumerMetricsLike | None = None,
        counters: Counters | None = None,
        flush_seconds: float = 1.0,
        reserve_tokens: int = 1000,
        changed: Callable[[str], None] = lambda name: None,
        revoke_unsaved: Callable[[dict[str, tuple[str, str]]], None] = lambda revokes: None,
        revoke_saved: Callable[[list[str]], None] = lambda hashes: None,
        revokes_file: UnsavedRevokesFile | None = None,
        held_log_seconds: float = HELD_LOG_SECONDS,
        hold_until_loaded: bool = False,
    ) -> None:
        self.store = store
        self.hold_until_loaded = hold_until_loaded
        self.prices = prices
        self.clock = clock
        self.metrics = metrics
        self.counters: Counters = counters if counters is not None else LocalCounters()
        self.flush_seconds = flush_seconds
        self.reserve_tokens = reserve_tokens
        #: The table has been read from the database once: consumer keys
        #: are answered 503 until then (L{openclaw.dataplane.auth}).
        self.loaded = False
        self._reloading: Deferred[None] | None = None
        self._reload_again = False
        #: What the callers of L{refresh} wait on: fired when the next
        #: reload to begin has ended.
        self._refresh_waiters: list[Deferred[bool]] = []
        #: One of them wants that reload's failure logged (not all are
        #: C{quiet}).
        self._refresh_said = False
        #: In a cluster, what tells whether the table may have missed
        #: changes because the event loop stood still
        #: (L{openclaw.consumers.freshness.StallWatch}); None elsewhere.
        self.stall_watch: StallWatch | None = None
        #: How many snapshots L{adopt} has taken (L{update} reads the
        #: table again after one taken while it ran).
        self._adopted = 0
        self.consumers: dict[str, Consumer] = {}
        #: SHA-256 hex of a key -> (consumer, prefix).
        self.keys: dict[str, tuple[str, str]] = {}
        self._pending: list[UsageRow] = []
        #: Names whose delete is not yet written to the database: kept
        #: from a create until it is (L{delete}).
        self.deleting: set[str] = set()
        #: SHA-256 hex of a key whose revoke is not yet written to the
        #: database -> (consumer, prefix): refused from the revoke on
        #: (L{revoke_key}), whatever a reload brings back.
        self.revoking: dict[str, tuple[str, str]] = {}
        #: The revokes being written, as (consumer, prefix).
        self._revokes_writing: set[tuple[str, str]] = set()
        #: The next try of the revokes the database did not take.
        self._revoke_retry: IDelayedCall | None = None
        #: A round of those tries is under way (L{_retry_round}).
        self._retrying = False
        #: The keys of this table's usage rows (L{UsageRow.row_id}).
        self.row_ids = RowIds()
        #: The calls of GATEWAY_API_KEYS' keys (consumer C{-}), summed.
        self.gateway_usage = GatewayUsage(prices, self.row_ids)
        if metrics is not None:
            metrics.count_pending(self.pending_rows)
        self._flusher: LoopingCall | None = None
        #: Since when (clock) writes of usage rows have failed, and when
        #: that was last logged: one line at the first failure, then one a
        #: minute, then one when they are written again.
        self._failing_since: float | None = None
        self._failure_logged_at = 0.0
        #: A write of usage rows under way (L{flush}): each of its callers
        #: waits on a Deferred of its own.
        self._flushing: InFlight[None] | None = None
        #: A load of the spends under way (L{load_unwritten}): no write
        #: starts meanwhile.
        self._loading: InFlight[Snapshot] | None = None
        #: L{stop} was called: a failed write is not tried again by the
        #: timer, only by L{stop} until its deadline.
        self._stopping = False
        #: Why the last write failed while stopping (logged if given up).
        self._stop_failure: Failure | None = None
        #: L{stop} gave the last rows up, and said so: a write still under
        #: way then keeps nothing, and says nothing, when it fails.
        self._given_up = False
        #: How many rows the write under way (L{_flushing}) holds.
        self._writing = 0
        self.changed = changed
        self.revoke_unsaved = revoke_unsaved
        self.revoke_saved = revoke_saved
        self.revokes_file = revokes_file
        #: The revokes not saved are kept for the other instances (a
        #: cluster's, in Redis), not lost at this one's stop.
        self.revokes_shared = False
        self.held_log_seconds = held_log_seconds
        #: The reactor of L{start}: times the writes the database holds.
        self._reactor: IReactorTime | None = None
        #: The next log line of a write the database holds (L{_watch}).
        self._held: IDelayedCall | None = None

    # -- loading ---------------------------------------------------------------

    def adopt(self, snapshot: Snapshot) -> None:
        """
        Replace the table with C{snapshot} (start-up, or a cluster reload).
        A consumer deleted meanwhile (gone, or created again since) is
        forgotten: its counters, and its rows not yet written go under
        its retired name.
        """
        for name, old in self.consumers.items():
            new = snapshot.consumers.get(name)
            if new is None or new.created_at != old.created_at:
                self._retire(old)
                self.counters.forget(name)
        self.consumers = snapshot.consumers
        self.keys = snapshot.keys
        self.counters.load(snapshot.spend)
        self.loaded = True
        self._adopted += 1

    def reload(self) -> Deferred[None]:
        return self.store.load(self.clock()).addCallback(self.adopt)

    def refresh(self, quiet: bool = False) -> Deferred[bool]:
        """
        Reload from the database, because another instance changed a
        consumer (cluster mode).  Reloads in a row are coalesced: one under
        way, at most one more after it.  A reload that succeeds tells the
        L{stall_watch} (L{StallWatch.in_step}).

        @param quiet: log no failure of the reload unless another caller
            waiting on it wants it logged (L{StallWatch}'s tries again,
            said once by the watch; before, a critical line per try).
        @return: fires once a reload that began after this call has ended
            (not one under way already, which may have read the database
            before the change): with True when the table took the
            database's consumers, False when the reload failed (logged
            here, unless C{quiet}).  Never fails.
        """
        ended: Deferred[bool] = Deferred()
        self._refresh_waiters.append(ended)
        if not quiet:
            self._refresh_said = True
        if self._reloading is not None:
            self._reload_again = True
            return ended
        waiters, self._refresh_waiters = self._refresh_waiters, []
        said, self._refresh_said = self._refresh_said, False
        succeeded = False

        def adopted(_: None) -> None:
            nonlocal succeeded
            succeeded = True

        def failed(reason: Failure) -> None:
            if said:
                log_database_failure(
                    self._log, "could not reload the consumers after a change elsewhere ({error})", reason
                )

        def done(result: object) -> None:
            self._reloading = None
            for waiter in waiters:
                waiter.callback(succeeded)
            if succeeded and self.stall_watch is not None:
                # A reload begun for a change may bring the table in step
                # before the watch's next try.
                self.stall_watch.in_step()
            if isinstance(result, Failure):
                # A fault of ours in failed (the reload's own are failed's).
                self._log.failure(
                    "a fault of the gateway handling the reload of the consumers ({error}): report it with this "
                    "traceback",
                    result,
                    error=result.getErrorMessage() or repr(result.value),
                )
            if self._reload_again:
                self._reload_again = False
                # Its waiters are those that came meanwhile (and whether
                # one of them wants its failure logged).
                self.refresh(quiet=True)

        reloading = self._reloading = self.reload()
        reloading.addCallbacks(adopted, failed).addBoth(done)
        return ended

    def start(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        # On LoggedStep: a flush that raises is logged and the next one
        # comes all the same (the loop stopped for good otherwise, and the
        # usage rows piled up unwritten).
        flusher = self._flusher = LoopingCall(
            LoggedStep(self.flush, self._log, f"the write of the usage rows every {self.flush_seconds:g} s")
        )
        flusher.clock = reactor
        flusher.start(self.flush_seconds, now=False).addErrback(lambda f: self._log.failure("usage flusher stopped", f))
        if self.revoking:
            # Taken from another instance before the start.
            self._retry_revokes_later()

    def stop(self, reactor: IReactorTime | None = None, until: float | None = None) -> Deferred[None]:
        """
        Stop the timer and write what is pending.  A write that fails is
        tried again after L{STOP_RETRY_SECONDS}, then twice as long each
        time up to L{STOP_RETRY_MAX_SECONDS}, while the next try can start
        L{STOP_RETRY_SECONDS} before C{until}; a write that has not ended
        by C{until} (a database that does not answer) is waited for no
        longer.  Then the rows are given up, and logged in one line
        (README: the last usage rows have until SHUTDOWN_GRACE_SECONDS is
        over); no write starts after that, and a write still under way
        that fails later is not tried again nor logged.

        This is the only deadline of the last rows: the caller waits for
        the returned Deferred, then closes the store (L{openclaw.service}).

        @param reactor: schedules the tries again and the deadline; without
            it, or without C{until}, rows a write fails are given up at
            once, and a write that does not end is waited for.
        @param until: when to give up, in the seconds of C{clock}.
        @return: fires with None once the rows are written or given up (by
            C{until}); never fails.
        """
        if self._flusher is not None and self._flusher.running:
            self._flusher.stop()
        self._flusher = None
        if self._revoke_retry is not None and self._revoke_retry.active():
            self._revoke_retry.cancel()
        self._revoke_retry = None
        kept = self._kept_at_stop()
        unsaved = sorted(set(self.revoking.values()))
        # Each named when it is lost (to be revoked again); ten when kept.
        for name, prefix in unsaved[:ADOPTED_REVOKES_SAID] if kept else unsaved:
            self._log.critical(
                "the revoke of key ock-{key_prefix} of consumer {consumer!r} was never written to the database"
                + (
                    " by this instance: the cluster keeps it in Redis, whose other instances refuse the key and "
                    "write the revoke"
                    if self.revokes_shared
                    else ""
                )
                + (
                    ": kept in {path}, so the key is refused again at the next start, which writes it"
                    if kept
                    else (
                        " (if Redis lost it, revoke the key again once the database takes writes)"
                        if self.revokes_shared
                        else ": the key works again when the gateway starts; revoke it again once the database "
                        "takes writes"
                    )
                ),
                consumer=name,
                key_prefix=prefix,
                path=None if self.revokes_file is None else str(self.revokes_file.path),
            )
        if kept and len(unsaved) > ADOPTED_REVOKES_SAID:
            self._log.critical(
                "and {count} more key revokes never written to the database, kept in {path} likewise",
                count=len(unsaved) - ADOPTED_REVOKES_SAID,
                path=None if self.revokes_file is None else str(self.revokes_file.path),
            )
        # No next try by the timer: from now on only this one writes, until
        # `until`.
        self._stopping = True
        writing = Deferred.fromCoroutine(self._write_last(reactor, until))

        def written(_: None) -> None:
            # A write given up at the deadline is not watched any longer.
            self._unwatch()

        return writing.addCallback(written)

    def _kept_at_stop(self) -> bool:
        """
        Whether the revokes not saved are in their file for the next start:
        written now, blocking, as they are now (the file writer takes no
        more writes at the stop; its last write may be older, have failed,
        or the file been removed since: recheck s47, the stop said "kept"
        of a file removed, and the next start served the key).
        """
        revokes_file = self.revokes_file
        if revokes_file is None or not self.revoking:
            return False
        return revokes_file.save_now(self.revoking)

    async def _write_last(self, reactor: IReactorTime | None, until: float | None) -> None:
        # A write under way first (its rows kept if it fails).
        if self._flushing is not None and not await self._ended(self.flush(), reactor, until):
            return self._give_up_unanswered()
        delay = STOP_RETRY_SECONDS
        while True:
            self._stop_failure = None
            if not await self._ended(self.flush(), reactor, until):
                return self._give_up_unanswered()
            failure = self._stop_failure
            if failure is None:
                if not self._pending:
                    return None
                # Rows that came in meanwhile.
                continue
            left = -1.0 if until is None else until - STOP_RETRY_SECONDS - self.clock()
            if reactor is None or left <= 0:
                self._given_up = True
                rows, self._pending = self._pending, []
                if self.hold_until_loaded and not self.loaded:
                    # Never loaded (its schema perhaps never made: "no such
                    # table"): the database's trouble, said at the start.
                    self._log.critical(GIVEN_UP, count=len(rows), error=database_error(failure))
                else:
                    log_database_failure(self._log, GIVEN_UP, failure, count=len(rows))
                return None
            await deferLater(reactor, min(delay, left))
            delay = min(delay * 2, STOP_RETRY_MAX_SECONDS)

    async def _ended(self, writing: Deferred[None], reactor: IReactorTime | None, until: float | None) -> bool:
        """
        Wait for C{writing} (L{flush}) until C{until}: whether it ended.
        It is not cancelled at C{until}: a cancelled write only keeps its
        rows, and the store's close deals with a query still under way.
        """
        if reactor is None or until is None:
            await writing
            return True
        ended: Deferred[None] = Deferred()
        writing.addBoth(lambda _: None if ended.called else ended.callback(None))
        try:
            await ended.addTimeout(max(until - self.clock(), 0.0), reactor)
        except DeferredTimeoutError:
            return False
        return True

    def _give_up_unanswered(self) -> None:
        """
        Give up the rows of the write still under way at the deadline, and
        those waiting behind it, with the one line.
        """
        self._given_up = True
        rows, self._pending = self._pending, []
        self._log.critical(
            GIVEN_UP,
            count=self._writing + len(rows),
            error="the database did not answer by the end of the shutdown grace",
        )

    # -- the data plane --------------------------------------------------------

    @property
    def has_keys(self) -> bool:
        return bool(self.keys)

    def identify(self, presented: bytes) -> Holder | None:
        """
        The holder of a consumer key (for a key of an expired consumer,
        one whose C{refusal} is the 401 to answer), None for a key that is
        no consumer's.  The key is looked
        up by its SHA-256: timing tells nothing of a key with that hash.
        """
        hashed = key_hash(presented)
        entry = self.keys.get(hashed)
        if entry is None or hashed in self.revoking:
            return None
        name, prefix = entry
        consumer = self.consumers.get(name)
        if consumer is None or name in self.deleting:
            return None
        if consumer.expired(self.clock()):
            expired = APIError(
                401,
                f"this key's consumer {name!r} expired at {isoformat(consumer.expires_at or 0)}; "
                "ask the operator to extend expires_at with consumer_update",
                "invalid_request_error",
                "expired_api_key",
            )
            return Holder(name, prefix, consumer.created_at, refusal=expired)
        return Holder(name, prefix, consumer.created_at)

    def current(self, holder: Holder) -> Consumer | None:
        """
        The holder's consumer, None if it was deleted since its key was
        looked up (even if one of that name was created again).
        """
        consumer = self.consumers.get(holder.consumer)
        if consumer is None or consumer.created_at != holder.created_at:
            return None
        return consumer

    def refused(self, holder: Holder, refusal: APIError) -> None:
        """
        Count a request of the holder refused before any model was chosen
        (an expired consumer's): C{openclaw_consumer_requests_total} and
        C{openclaw_consumer_limited_total} (reason: the error's code).
        """
        if self.metrics is not None and holder is not GATEWAY:
            self.metrics.limited(holder.consumer, refusal.code or "refused")
            self.metrics.requests(holder.consumer, refusal.status)

    def listed(self, holder: Holder, status: int) -> None:
        """
        Count a models listing the holder made (C{GET /v1/models}; it makes
        no usage row) in C{openclaw_consumer_requests_total}.
        """
        if self.metrics is not None:
            self.metrics.requests(holder.consumer, status)

    def admit(
        self,
        holder: Holder,
        provider: str,
        model: str,
        max_tokens: int | None = None,
        prompt_tokens: int | Callable[[], int] = 0,
        choices: int = 1,
    ) -> APIError | Deferred[APIError | None] | None:
        """
        Whether the holder may call C{provider/model} now: None, or the
        403/429 to answer (counted as limited).  A consumer with a budget
        may call only a model with a price (L{model_not_priced}).

        An admitted call of a consumer with a budget or C{tpm} reserves its
        expected tokens: C{prompt_tokens} (the estimate of
        L{openclaw.consumers.estimate}, or a function giving it, called at
        most once and only for such a consumer) plus C{max_tokens}
        completion tokens (L{reserve_tokens} when it sets none; 0 for a
        call that completes nothing, as embeddings) for each of its
        C{choices} (L{choice_count}), at most L{MAX_TOKEN_COUNT} in all
        (a count past it is no call's), until its answer is
        counted (L{account}), or for L{RESERVATION_SECONDS} at most.

        The budget rule: a call is admitted while the period's spend plus
        the reservations (the price of those tokens) of the consumer's
        calls in flight is below the budget.  The C{tpm} rule: while the
        tokens of the last 60 s plus the tokens reserved by calls in
        flight are below C{tpm}; when the call is counted its reservation
        is replaced by its actual tokens.  With nothing used or in
        flight, a call is admitted whatever it reserves.  Concurrent calls
        therefore take a consumer past a limit by less than the last
        admitted call's reservation plus what the calls in flight use
        beyond their reservations (prompts longer than the estimate,
        completions longer than L{reserve_tokens} when no C{max_tokens}
        bounds them).
        """
        if holder is GATEWAY:
            return None
        consumer = self.current(holder)
        if consumer is None:
            # Deleted since the key was looked up: as if unknown.
            return APIError(401, "this key's consumer was deleted", "invalid_request_error", "invalid_api_key")
        refusal: APIError | Deferred[APIError | None] | None
        if not consumer.allows(provider, model):
            refusal = model_not_allowed(consumer, provider, model)
        elif consumer.budget_usd is not None and not self.prices.priced(provider, model):
            refusal = model_not_priced(consumer, provider, model)
        else:
            reserve, tokens = 0.0, 0
            if consumer.budget_usd is not None or consumer.tpm is not None:
                prompt = prompt_tokens() if callable(prompt_tokens) else prompt_tokens
                # At most MAX_TOKEN_COUNT: max_tokens and n may be as large as
                # JSON's integers, past what Redis's counters hold (int64).
                completion = min(
                    (self.reserve_tokens if max_tokens is None else max(0, max_tokens)) * choices, MAX_TOKEN_COUNT
                )
                if consumer.budget_usd is not None:
                    reserve = self.prices.cost(provider, model, prompt, completion) or 0.0
                if consumer.tpm is not None:
                    tokens = min(prompt + completion, MAX_TOKEN_COUNT)
            refusal = self.counters.admit(consumer, self.clock(), holder, reserve, tokens)
        if isinstance(refusal, Deferred):
            return refusal.addCallback(self._limited, holder, provider, model)
        return self._limited(refusal, holder, provider, model)

    def refused_unread(self, holder: Holder) -> APIError | None:
        """
        The 429 L{admit} would answer the holder's call now whatever it
        asks (its budget spent, its C{tpm} or C{rpm} window full: the
        counters' L{refusal <LocalCounters.refusal>}), for a request
        whose body is not read yet; None when its body may decide (or it
        is admitted).  A refusal is counted as L{admit}'s are (the
        metrics, a usage row marked limited), under provider and model
        C{-}: none was read.  The caller answers it (its log line);
        L{admit} is not asked.

        A large body's work (L{openclaw.dataplane.offload}) is not done for
        a consumer refused whatever it sends (150 bodies
        of 8 MB from a consumer with an C{rpm} of 1 were each parsed
        before its admission refused 149 of them).  A refusal that depends
        on the body (the model it names, what it would reserve) is still
        decided by L{admit} once it is read.
        """
        if holder is GATEWAY:
            return None
        consumer = self.current(holder)
        if consumer is None:
            # Deleted since its key was looked up: L{admit} answers it.
            return None
        return self._limited(self.counters.refusal(consumer, self.clock()), holder, UNREAD, UNREAD)

    def admit_listing(self, holder: Holder) -> APIError | Deferred[APIError | None] | None:
        """
        Whether the holder may list models now (C{GET /v1/models}): only
        its C{rpm} applies (a listing costs no tokens).  A refusal is
        counted in the metrics, not as a usage row (no model was called).
        """
        if holder is GATEWAY:
            return None
        consumer = self.current(holder)
        if consumer is None:
            return APIError(401, "this key's consumer was deleted", "invalid_request_error", "invalid_api_key")
        now = self.clock()
        refusal = self.counters.admit(attrs.evolve(consumer, budget_usd=None, tpm=None), now, holder)
        if consumer.rpm is None:
            # Counted in the requests window all the same (an rpm set later
            # judges the last 60 s); in a cluster, sent now (no call's
            # count will carry it).
            if holder.request_at:
                self.counters.counted(holder.consumer, 0, 0.0, now, holder)
            return None
        if isinstance(refusal, Deferred):
            return refusal.addCallback(self._limited, holder, None, None)
        return self._limited(refusal, holder, None, None)

    def may_not_use(self, holder: Holder, provider: str, model: str) -> str | None:
        """
        Why the holder may not call C{provider/model}, for a call sent
        elsewhere than admitted (a failover); None when it may.  A
        consumer may use only its C{models}, and with a budget only a
        priced model; a deleted consumer may use nothing.
        """
        if holder is GATEWAY:
            return None
        consumer = self.current(holder)
        if consumer is None or not consumer.allows(provider, model):
            return f"this key may not use {provider}'s model"
        if consumer.budget_usd is not None and not self.prices.priced(provider, model):
            return f"this key has a budget and {provider}'s model has no price"
        return None

    def excluding(self, provider: str, model: str) -> list[str]:
        """
        The consumers, by name, whose C{models} exclude C{provider/model}.
        """
        return sorted(name for name, consumer in self.consumers.items() if not consumer.allows(provider, model))

    @property
    def newer_schema(self) -> Exception | None:
        """
        Why the consumers' database cannot be used for good (a later
        openclaw's schema: L{openclaw.consumers.store.NewerSchema}), or None.
        """
        return None if self.store is None else self.store.newer_schema

    def unpriced_budgets(self, provider: str, model: str) -> list[str]:
        """
        The consumers, by name, with a budget, when C{provider/model} has no
        price: their calls to it get 403 C{model_not_priced}.
        """
        if self.prices.priced(provider, model):
            return []
        return sorted(name for name, consumer in self.consumers.items() if consumer.budget_usd is not None)

    def allowed(self, holder: Holder, provider: str, models: list[str]) -> list[str]:
        """
        Those of C{provider}'s C{models} the holder may call: within its
        C{models}, and with a budget only those with a price.
        """
        consumer = self.consumers.get(holder.consumer) if holder is not GATEWAY else None
        if consumer is None or (not consumer.models and consumer.budget_usd is None):
            return models
        priced = self.prices.priced
        return [
            model
            for model in models
            if consumer.allows(provider, model) and (consumer.budget_usd is None or priced(provider, model))
        ]

    def _limited(
        self, refusal: APIError | None, holder: Holder, provider: str | None, model: str | None
    ) -> APIError | None:
        if refusal is None:
            return None
        reason = refusal.code or "limited"
        if self.metrics is not None:
            self.metrics.limited(holder.consumer, reason)
            self.metrics.requests(holder.consumer, refusal.status)
        if provider is not None and model is not None:
            self._add(
                UsageRow(
                    self.clock(),
                    holder.consumer,
                    holder.prefix,
                    provider,
                    model,
                    refusal.status,
                    limited=True,
                    created_at=holder.created_at,
                    row_id=self.row_ids(),
                )
            )
        return refusal

    def account(self, holder: Holder, provider: str, model: str, status: int, usage: Any, seconds: float) -> None:
        """
        Count one call that reached a provider, once its answer is over:
        its tokens (from the answer's or the stream's final C{usage}), its
        cost (None when the model has no price), into the windows, the
        spend, the metrics and a usage row.

        A consumer's call gets a row of its own (issue #19); the calls of
        GATEWAY_API_KEYS' keys (L{GATEWAY}: no limits to keep) are summed in
        memory per UTC minute, provider, model and status (L{GatewayUsage}),
        and written at the flush as one row with their C{requests} count,
        its C{ts} the minute's start; they are counted in the metrics (as
        consumer C{-}) call by call, like a consumer's.
        """
        self.account_tokens(holder, provider, model, status, usage_counts(usage), seconds)

    def account_tokens(
        self, holder: Holder, provider: str, model: str, status: int, tokens: tuple[int, int, int, int], seconds: float
    ) -> None:
        """
        L{account}, with the usage read already (L{usage_counts}).
        """
        now = self.clock()
        prompt, completion, reasoning, cached = tokens
        cost = self.prices.cost(provider, model, prompt, completion, cached)
        name = holder.consumer
        metrics = self.metrics
        if metrics is not None:
            metrics.requests(name, status)
            metrics.tokens(name, prompt, completion, reasoning)
            if cost:
                metrics.spend(name, cost)
        if holder is GATEWAY:
            self.gateway_usage.count(provider, model, status, tokens, seconds, now)
            return
        consumer = self.current(holder)
        if consumer is not None:
            self.counters.counted(name, prompt + completion, cost or 0.0, now, holder)
        # A call of a consumer deleted while it ran: recorded, counted for nobody alive.
        row_name = name if consumer is not None else retired_name(Consumer(name, created_at=holder.created_at))
        self._add(
            UsageRow(
                now,
                row_name,
                holder.prefix,
                provider,
                model,
                status,
                prompt,
                completion,
                reasoning,
                cost,
                seconds * 1000,
                # Which consumer: the database writes the row under its
                # retired name if it was deleted before the row is written.
                created_at=holder.created_at if consumer is not None else None,
                row_id=self.row_ids(),
            )
        )

    # -- writing usage ---------------------------------------------------------

    def pending_rows(self) -> int:
        """
        Usage rows not yet in the database: waiting, and being written
        (a write a locked SQLite or a stalled PostgreSQL holds for
        minutes, while none is written, counts).
        """
        return len(self._pending) + self._writing

    def behind(self) -> int:
        """
        Usage rows the database has not taken when it should have: the
        rows not yet in it (L{pending_rows}) while its writes fail or one
        is under way (held by a locked SQLite, a stalled PostgreSQL); 0
        while writes succeed (the rows of calls since the last write, which
        the next takes within L{flush_seconds}, are not behind).
        """
        if self._failing_since is None and self._flushing is None:
            return 0
        return self.pending_rows()

    def _add(self, row: UsageRow) -> None:
        pending = self._pending
        pending.append(row)
        if len(pending) > MAX_PENDING_ROWS:
            del pending[: len(pending) - MAX_PENDING_ROWS]
            self._log.error("usage rows dropped: the database has not taken them; check DATABASE_URL / STATE_DIR")

    def flush(self) -> Deferred[None]:
        """
        Write the pending rows, L{MAX_ROWS_PER_WRITE} at most in one
        transaction (a full write is followed at once by the next, the
        rest); on failure they wait for the next flush.  Fires (with None; never fails) once written (or
        failed and kept).  While a write, or L{load_unwritten}'s read, is
        under way: writes nothing, fires once that has ended.  Each call's
        Deferred is its own (what its callbacks return or raise is no
        other caller's).
        """
        busy: InFlight[Any] | None = self._flushing if self._flushing is not None else self._loading
        if busy is not None:
            # One write at a time, and none while load_unwritten reads:
            # wait for the one under way (a read that fails is its own
            # caller's).
            return busy.observe().addBoth(lambda _: None)
        if self.hold_until_loaded and not self.loaded and not self._stopping:
            # No schema yet, perhaps (a full disk, a database away at
            # start): the rows wait for the load (the gateway's keys' sums
            # among them, bounded as the others).
            for row in self.gateway_usage.take():
                self._add(row)
            return succeed(None)
        # The gateway's rows taken first: should that raise, the rows
        # pending stay pending.
        taken = self.gateway_usage.take()
        pending = self._pending
        pending.extend(taken)
        rows, self._pending = pending[:MAX_ROWS_PER_WRITE], pending[MAX_ROWS_PER_WRITE:]
        if not rows:
            return succeed(None)
        succeeded = False

        def failed(reason: Failure) -> None:
            if self._given_up:
                # L{stop} gave them up already, and said so.
                return
            self._pending[:0] = rows
            if self._stopping:
                # L{stop} tries again, or gives them up.
                self._stop_failure = reason
                return
            now = self.clock()
            error = database_error(reason)
            if self._failing_since is None:
                # Once; with its traceback only for a fault of ours, not
                # for a database away (L{unreachable}).  An error, not yet
                # critical: nothing is lost, and a write that failed once
                # (a connection cut at its commit, a pooler's restart) is
                # usually written at the next try (a critical
                # line a second through a flaky link, nothing lost).
                self._failing_since = self._failure_logged_at = now
                log_database_failure(
                    self._log,
                    "could not write {count} usage rows ({error}); kept, and tried again every {every:g} s: "
                    "check DATABASE_URL / STATE_DIR (openclaw_consumer_usage_rows_pending counts them)",
                    reason,
                    LogLevel.error,
                    count=len(rows),
                    every=self.flush_seconds,
                )
            elif now - self._failure_logged_at >= FAILURE_LOG_SECONDS:
                # Failing for a minute and more: critical, each minute.
                self._failure_logged_at = now
                self._log.critical(
                    "still cannot write usage rows after {seconds:.0f} s ({error}): {pending} waiting",
                    seconds=now - self._failing_since,
                    error=error,
                    pending=len(self._pending),
                )

        def written(result: None) -> None:
            nonlocal succeeded
            succeeded = True
            failing_since, self._failing_since = self._failing_since, None
            if failing_since is not None:
                self._log.info(
                    "usage rows written again after {seconds:.0f} s of failures ({count} rows)",
                    seconds=self.clock() - failing_since,
                    count=len(rows),
                )

        def done(result: object) -> None:
            self._flushing = None
            self._writing = 0
            # Its callers' Deferreds fire once it is over (L{_flushing}
            # unset, for L{_load_unwritten}).
            flushing.end(None)
            if succeeded and len(rows) == MAX_ROWS_PER_WRITE and self._pending and not self._stopping:
                # A backlog: the next part at once (a stop's own loop
                # writes them all).
                self.flush()
            if isinstance(result, Failure):
                # A fault of ours in written or failed (the write's own
                # failure is failed's).
                self._log.failure(
                    "a fault of the gateway handling the end of a write of {count} usage rows ({error}): report it "
                    "with this traceback",
                    result,
                    count=len(rows),
                    error=result.getErrorMessage() or repr(result.value),
                )

        self._writing = len(rows)
        # A store that raises (a fault of ours) fails the write as one
        # that fails later: its rows kept for the next flush.
        recording: Deferred[None] = maybeDeferred(self.store.record, rows)
        flushing = self._flushing = InFlight[None]()
        self._watch(recording)
        recording.addCallbacks(written, failed).addBoth(done)
        return flushing.observe()

    async def _load_unwritten(self) -> tuple[Snapshot, dict[tuple[str, str], float]]:
        while True:
            await self.flush()
            if self._flushing is None and self._loading is None:
                break
        loaded = self.store.load(self.clock())
        loading = self._loading = InFlight[Snapshot]()
        loaded.addBoth(loading.end)
        try:
            snapshot = await loading.observe()
        finally:
            self._loading = None
        # Read now: the rows counted during the load are not in it either.
        unwritten: dict[tuple[str, str], float] = {}
        for row in self._pending:
            consumer = snapshot.consumers.get(row.consumer)
            if not row.cost_usd or consumer is None or consumer.created_at != row.created_at:
                # No cost, or not a running consumer's: the database adds
                # it to no spend of a consumer it has.
                continue
            for period in ("day", "month", "total"):
                key = (row.consumer, period_key(period, row.ts))
                unwritten[key] = unwritten.get(key, 0.0) + row.cost_usd
        return snapshot, unwritten

    def load_unwritten(self) -> Deferred[tuple[Snapshot, dict[tuple[str, str], float]]]:
        """
        This instance's usage rows written (L{flush}), then the database
        read (L{ConsumerStore.load}) with no write of them under way, and
        the costs of this instance's rows that read lacks: those counted
        since the write (or kept by a failed one), as C{{(consumer, period
        key): US dollars}} for their day, month and total, of the consumers
        the read holds (the same C{created_at}).  No row is both in the
        read and in those costs: none is written while it reads.

        @return: fires with (snapshot, unwritten costs); fails as the
            read does.
        """
        return Deferred.fromCoroutine(self._load_unwritten())

    def _watch(self, writing: Deferred[None]) -> None:
        """
        Log a write of usage rows the database holds past
        C{held_log_seconds} (no error comes, only the pending rows' metric
        grows), then every L{FAILURE_LOG_SECONDS} while it lasts, and once
        when it is written.
        """
        reactor = self._reactor
        if reactor is None:
            return
        started = self.clock()
        logged: list[float] = []

        def held() -> None:
            seconds = self.clock() - started
            logged.append(seconds)
            self._held = reactor.callLater(FAILURE_LOG_SECONDS, held)
            self._log.warn(
                "the consumers' database has held a write of {count} usage rows for {seconds:.0f} s, without an "
                "error ({pending} more rows waiting): another session holds a lock on its tables, or it stopped "
                "answering; see what holds it (PostgreSQL: pg_stat_activity, pg_locks), check DATABASE_URL / "
                "STATE_DIR",
                count=self._writing,
                seconds=seconds,
                pending=len(self._pending),
            )

        self._held = reactor.callLater(self.held_log_seconds, held)

        def ended(result: object) -> object:
            self._unwatch()
            if logged and not isinstance(result, Failure):
                self._log.info(
                    "the consumers' database took the usage rows it held, after {seconds:.0f} s",
                    seconds=self.clock() - started,
                )
            return result

        writing.addBoth(ended)

    def _unwatch(self) -> None:
        if self._held is not None and self._held.active():
            self._held.cancel()
        self._held = None

    def settle(self, seconds: float) -> Deferred[None]:
        """
        L{flush}, waited for C{seconds} at most (once L{start}ed; else
        until it ends): the write goes on after that.  Never fails.
        """
        flushed = self.flush()
        reactor = self._reactor
        if reactor is None or flushed.called:
            return flushed
        settled: Deferred[None] = Deferred()

        def done(_: object = None) -> None:
            if timer.active():
                timer.cancel()
            if not settled.called:
                settled.callback(None)

        timer = reactor.callLater(seconds, done)
        flushed.addBoth(done)
        return settled

    # -- the commands ----------------------------------------------------------

    def create(self, consumer: Consumer) -> Deferred[NewKey]:
        """
        Write a new consumer and its first key, then take them here.

        @raise ConsumerExists: (in the Deferred) the database has a
            consumer of that name already, which this table lacks (another
            command's or instance's create, committed first): the table is
            reloaded, so that it has it.
        """
        key = NewKey.make()

        def created(_: None) -> NewKey:
            self.consumers[consumer.name] = consumer
            self.keys[key.hash] = (consumer.name, key.prefix)
            self.changed(consumer.name)
            return key

        def exists(reason: Failure) -> Failure:
            reason.trap(ConsumerExists)
            # Its announcement may come later, or (Redis away) not before
            # Redis is back.
            self.refresh()
            return reason

        return self.store.create(consumer, key.hash, key.prefix).addCallbacks(created, exists)

    def _still_here(self, consumer: Consumer, written: bool) -> None:
        """
        After a change to C{consumer} written (or not: C{written}) to the
        database: raise L{ConsumerGone} when it was not there to change, or
        has left the table since (a delete, a reload after another
        instance's), rather than put it back.
        """
        current = self.consumers.get(consumer.name)
        if not written or current is None or current.created_at != consumer.created_at:
            raise ConsumerGone(consumer.name)

    def update(self, consumer: Consumer, fields: Mapping[str, Any]) -> Deferred[Consumer]:
        """
        Change the fields a command's C{fields} names of C{consumer} (this
        table's copy: which consumer) in the database, checked against its
        row there and leaving the others as the database has them
        (L{ConsumerStore.update}), then take the row as the database
        holds it after the change, not this table's copy changed: another
        instance's change this table has not heard of yet is kept.  A
        reload under way or made meanwhile (another instance's change) may
        hold the row as it was before or after this change: the table is
        read again, once.

        @return: (a Deferred firing with) the consumer as the database
            holds it now.
        @raise ConsumerGone: (in the Deferred) it was deleted meanwhile.
        @raise InvalidConsumer: (in the Deferred) C{fields} do not go with
            the database's row (a C{budget_period} where another change
            removed the budget).
        """
        adopted = self._adopted

        def updated(row: Consumer | None) -> Consumer:
            if row is None:
                raise ConsumerGone(consumer.name)
            self._still_here(consumer, True)
            self.consumers[consumer.name] = row
            self.changed(consumer.name)
            if self._reloading is not None or self._adopted != adopted:
                self.refresh()
            return row

        return self.store.update(consumer, fields).addCallback(updated)

    def _retire(self, consumer: Consumer) -> None:
        # Its rows not yet written go under its retired name, as those written will.
        name, retired = consumer.name, retired_name(consumer)
        self._pending = [
            attrs.evolve(row, consumer=retired, created_at=None)
            if row.consumer == name and row.created_at == consumer.created_at
            else row
            for row in self._pending
        ]

    def delete(self, name: str) -> Deferred[None]:
        """
        Delete a consumer: its keys, counters and spend go; its usage rows
        are kept under its retired name (L{retired_name}), so that one
        created again under C{name} starts from nothing.  Its keys are
        refused from the start (L{deleting}); it leaves the table once the
        database has the delete, and is served again if the database
        refuses it or the delete is given up: nothing changed, its usage
        rows not written yet still its own.  Rows written before the delete
        are renamed by it; those still here then are renamed here, and a
        row of it written later goes under the retired name too
        (L{openclaw.consumers.store.ConsumerStore.record}).
        """
        consumer = self.consumers[name]
        # Refused from now on (identify), and the name not free, until the
        # database has the delete.
        self.deleting.add(name)

        def deleted(_: None) -> None:
            # Its rows not written yet, those of calls under way when the
            # delete began included.
            self._retire(consumer)
            current = self.consumers.get(name)
            # The same consumer, if a reload (another instance's change) put
            # a copy of it in the table meanwhile; not one created again.
            if current is not None and current.created_at == consumer.created_at:
                del self.consumers[name]
                self.keys = {h: entry for h, entry in self.keys.items() if entry[0] != name}
            # Its counters (here, and in Redis) go with it.
            self.counters.deleted(consumer, self.clock())
            self.changed(name)

        def written(result: object) -> object:
            self.deleting.discard(name)
            return result

        if self._flushing is None:
            deleting = self.store.delete(name, retired_name(consumer))
        else:
            # After the write under way (its rows still carry the name),
            # within the command's deadline (the database may hold it).
            deleting = self.store.delete(name, retired_name(consumer), after=self._flushing.observe())
        return deleting.addCallback(deleted).addBoth(written)

    def add_key(self, name: str) -> Deferred[NewKey]:
        """
        Give consumer C{name} a new key.

        @raise ConsumerGone: (in the Deferred) it was deleted meanwhile.
        """
        key = NewKey.make()
        consumer = self.consumers[name]

        def added(written: bool) -> NewKey:
            self._still_here(consumer, written)
            self.keys[key.hash] = (name, key.prefix)
            self.changed(name)
            return key

        return self.store.add_key(consumer, key.hash, key.prefix, self.clock()).addCallback(added)

    def revoke_key(self, name: str, prefix: str) -> Deferred[int]:
        """
        Revoke the key of consumer C{name} whose prefix is C{prefix}: it is
        refused from now on (L{revoking}), and out of the table once the
        database has the revoke.  A revoke the database does not take (a
        full disk, a database down or read-only) keeps the key refused here
        and is written again every L{REVOKE_RETRY_SECONDS} until it is
        (said once when it fails, once when it is written); a restart
        before then serves the key again, as the database still has it.

        @return: a Deferred firing with how many keys went (the database's
            count, or the table's when larger).
        @raise RevokeNotSaved: (in the Deferred) the database did not take
            it this time.
        """
        revoked = (name, prefix)
        first = revoked not in self.revoking.values()
        for hashed, entry in self.keys.items():
            if entry == revoked:
                self.revoking[hashed] = revoked

        def unsaved(reason: Failure) -> Deferred[int]:
            return self._keep_revokes().addCallback(said, reason)

        def said(kept: bool, reason: Failure) -> Failure:
            kept_in = self.revokes_file.path if kept and self.revokes_file is not None else None
            if first:
                format = (
                    "the revoke of key ock-{key_prefix} of consumer {consumer!r} could not be written ({error}): "
                    "the key is refused by this gateway all the same, and the revoke is written again every "
                    "{retry_seconds:g} s; until it is, "
                    + (
                        "it is kept in {path} for a restart"
                        if kept_in is not None
                        else "a restart of this gateway serves the key again"
                    )
                )
                fields: dict[str, Any] = {
                    "consumer": name,
                    "key_prefix": prefix,
                    "retry_seconds": REVOKE_RETRY_SECONDS,
                    "path": None if kept_in is None else str(kept_in),
                }
                if reason.check(CommandTimedOut, DatabaseFileLost):
                    self._log.critical(format, error=unwritten_error(reason), **fields)
                else:
                    log_database_failure(self._log, format, reason, **fields)
            return Failure(RevokeNotSaved(reason, kept_in))

        return self._write_revoke(revoked).addErrback(unsaved)

    def keep_revokes_again(self) -> Deferred[bool] | None:
        """
        Write the revokes not saved to C{STATE_DIR} again, if any: the
        file may have gone with the directory (an C{rm -rf} of
        C{STATE_DIR}, whose SQLite database the gateway just copied back:
        L{openclaw.consumers.service.ConsumersService.check_database_file}).

        @return: None when there is nothing to keep, else a Deferred firing
            with whether they are on disk.
        """
        if self.revokes_file is None or not self.revoking:
            return None
        return self.revokes_file.save(self.revoking, again=True)

    def _keep_revokes(self) -> Deferred[bool]:
        """
        Keep the revokes not saved (L{revoking}) in C{STATE_DIR} for the
        next start (L{UnsavedRevokesFile.save}): fires with whether they
        are on disk (false without a file).
        """
        if self.revokes_file is None:
            return succeed(False)
        return self.revokes_file.save(self.revoking)

    def _write_revoke(self, revoked: tuple[str, str]) -> Deferred[int]:
        name, prefix = revoked
        self._revokes_writing.add(revoked)

        def written(count: int) -> int:
            self._revokes_writing.discard(revoked)
            before = len(self.keys)
            self.keys = {h: entry for h, entry in self.keys.items() if entry != revoked}
            saved = [h for h, entry in self.revoking.items() if entry == revoked]
            self.revoking = {h: entry for h, entry in self.revoking.items() if entry != revoked}
            if saved:
                self.revoke_saved(saved)
                self._keep_revokes()
            removed = before - len(self.keys)
            if count or removed:
                # Not when another instance wrote it and this table has
                # it already (each would announce it to every other).
                self.changed(name)
            return max(count, removed)

        def failed(reason: Failure) -> Failure:
            self._revokes_writing.discard(revoked)
            self.revoke_unsaved({h: entry for h, entry in self.revoking.items() if entry == revoked})
            self._retry_revokes_later()
            return reason

        return self.store.revoke_key(name, prefix).addCallbacks(written, failed)

    def _retry_revokes_later(self) -> None:
        if self._revoke_retry is None and self._reactor is not None and not self._stopping:
            self._revoke_retry = self._reactor.callLater(REVOKE_RETRY_SECONDS, self._retry_revokes)

    def _retry_revokes(self) -> None:
        """
        Write the revokes not saved again, one after the other: the first
        the database refuses ends the round (the next is in
        L{REVOKE_RETRY_SECONDS}), so that thousands of them (every key of a
        leak revoked while the database is down) make one failing write a
        round, not thousands.
        """
        self._revoke_retry = None
        if self._retrying:
            # A round still under way (a slow database): the next after it.
            self._retry_revokes_later()
            return
        revokes_file = self.revokes_file
        if revokes_file is not None and self.revoking and revokes_file.missing():
            # Removed while the gateway runs (an rm, a cleaner): the next
            # start would serve those keys.  Said once (a write that fails
            # says why, and is tried again at each round, unsaid).
            if revokes_file.kept:
                self._log.warn(
                    "{path}, which keeps the key revokes not saved to the database for the next start, was "
                    "removed while the gateway ran: written again; keep cleaners away from STATE_DIR",
                    path=str(revokes_file.path),
                )
            revokes_file.save(self.revoking, again=True)
        Deferred.fromCoroutine(self._retry_round())

    async def _retry_round(self) -> None:
        self._retrying = True
        try:
            await self._retry_each()
        finally:
            self._retrying = False

    async def _retry_each(self) -> None:
        written = 0
        for revoked in sorted(set(self.revoking.values()) - self._revokes_writing):
            if self._stopping:
                # The stop writes nothing more but the usage rows.
                return
            if revoked in self._revokes_writing or revoked not in set(self.revoking.values()):
                # Given again by a command meanwhile (that write is its), or
                # written since (by a command, or another instance's).
                continue
            try:
                await self._write_revoke(revoked)
            except Exception:
                # Tried again next round (L{_write_revoke}), said at its
                # first failure.
                return
            written += 1
            if written <= ADOPTED_REVOKES_SAID:
                self._log.info(
                    "the revoke of key ock-{key_prefix} of consumer {consumer!r} is written to the database now",
                    consumer=revoked[0],
                    key_prefix=revoked[1],
                )
        if written > ADOPTED_REVOKES_SAID:
            self._log.info(
                "and {count} more key revokes are written to the database now", count=written - ADOPTED_REVOKES_SAID
            )

    def adopt_revokes(self, revokes: Mapping[str, tuple[str, str]], earlier_run: bool = False) -> None:
        """
        Key revokes not written to the database yet, a key's SHA-256 hex ->
        (consumer, prefix): another instance's (a cluster's, from Redis:
        L{openclaw.consumers.shared.SharedConsumers.read_revokes}), kept in
        C{STATE_DIR} for this start too; or, C{earlier_run}, those an
        earlier run of this gateway kept there (L{UnsavedRevokesFile.load}).
        Refused here too, and written from here too (L{revoke_key}), each
        said once.
        """
        adopted = {hashed: entry for hashed, entry in revokes.items() if hashed not in self.revoking}
        if not adopted:
            return
        self.revoking.update(adopted)
        revoked = sorted(set(adopted.values()))
        for name, prefix in revoked[:ADOPTED_REVOKES_SAID]:
            self._log.warn(
                (
                    "the revoke of key ock-{key_prefix} of consumer {consumer!r} was not written to the database "
                    "by an earlier run (kept in {path}): the key is refused, and the revoke"
                    if earlier_run
                    else "key ock-{key_prefix} of consumer {consumer!r} was revoked on another instance, which could "
                    "not write the revoke to the database: refused here too, and"
                )
                + " written from here every {retry_seconds:g} s until the database takes it",
                consumer=name,
                key_prefix=prefix,
                retry_seconds=REVOKE_RETRY_SECONDS,
                path=None if self.revokes_file is None else str(self.revokes_file.path),
            )
        if len(revoked) > ADOPTED_REVOKES_SAID:
            self._log.warn(
                "and {count} more key revokes not written to the database yet, likewise (consumer_list shows each "
                "under revokes_unsaved)",
                count=len(revoked) - ADOPTED_REVOKES_SAID,
            )
        if not earlier_run:
            self._keep_revokes()
        self._retry_revokes_later()

    def unsaved_revokes(self, name: str) -> list[str]:
        """
        The prefixes of consumer C{name}'s keys whose revoke is not yet
        written to the database (refused here meanwhile), sorted.
        """
        return sorted({prefix for consumer, prefix in self.revoking.values() if consumer == name})

    def key_prefixes(self, name: str) -> list[str]:
        """
        The prefixes of consumer C{name}'s keys, sorted; not those being
        revoked (L{unsaved_revokes}).
        """
        return sorted(
            prefix
            for hashed, (consumer, prefix) in self.keys.items()
            if consumer == name and hashed not in self.revoking
        )

    def read_spends(self, names: list[str]) -> Deferred[None]:
        """
        Bring the spends L{describe} shows of the consumers C{names} up to
        date (a cluster's, from Redis); never fails.
        """
        consumers = [self.consumers[name] for name in names if name in self.consumers]
        return self.counters.read_spends(consumers, self.clock())

    def release_reservations(self, name: str) -> Deferred[tuple[float, int]]:
        """
        Release the reservations of consumer C{name}'s calls in flight
        (L{Counters.release_held}): in a cluster, the cluster's in Redis
        (every instance's calls, a crashed one's included); on a single
        gateway, those in its memory (its own calls').

        @return: (a Deferred firing with) the US dollars and the tokens
            released.
        @raise NotReleased: (in the Deferred) in a cluster, Redis could not
            be reached, or did not answer in time.
        """
        return self.counters.release_held(self.consumers[name], self.clock())

    def describe(self, name: str) -> dict[str, Any]:
        consumer = self.consumers[name]
        now = self.clock()
        document = consumer.describe([{"prefix": prefix} for prefix in self.key_prefixes(name)])
        unsaved = self.unsaved_revokes(name)
        if unsaved:
            # Refused here, but still in the database (L{revoke_key}).
            document["revokes_unsaved"] = unsaved
        document["spent_usd"] = round(self.counters.spent(name, consumer.budget_period, now), 10)
        # What calls in flight hold, when any (those of an instance that
        # died hold until they lapse: RESERVATION_SECONDS for the budget,
        # TOKEN_RESERVATION_SECONDS for tpm).
        reserved, tokens = self.counters.held(name, now)
        if reserved > 0:
            document["reserved_usd"] = round(reserved, 10)
        if tokens > 0:
            document["reserved_tokens"] = tokens
        return document


__all__ = [
    "GATEWAY",
    "ConsumerTable",
    "Counters",
    "Holder",
    "LocalCounters",
    "NotReleased",
    "RevokeNotSaved",
    "completion_limit",
    "tpm_refused",
    "usage_counts",
]
