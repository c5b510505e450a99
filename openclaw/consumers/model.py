"""
Consumers and their keys: what each field may hold, and how a key is made,
stored and shown.

A key is C{ock-} followed by 40 URL-safe random characters (about 240
bits from L{secrets.token_urlsafe}), the first a letter or a digit, so that
neither the key nor its prefix starts with C{-} (a command line would take
it for an option); it is shown once, when made.  The gateway keeps only
its SHA-256 (hex) and its I{prefix}: the first 8 characters after C{ock-},
which lists and logs show.
"""

from __future__ import annotations

import calendar
import fnmatch
import hashlib
import math
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import attrs

from openclaw.routing import KEY_PREFIX, MAX_MODEL_CHARS
from openclaw.shorten import shortened
from openclaw.timefmt import isoformat

#: Random characters after C{ock-}.
KEY_RANDOM_CHARS = 40
#: Characters after C{ock-} a key is listed and logged by.
SHOWN_CHARS = 8
PERIODS = ("day", "month", "total")
#: The largest C{budget_usd}: past it a budget is surely a typo (or a way to
#: say "no budget", which null says).
MAX_BUDGET_USD = 1_000_000_000
#: The smallest budget but 0: one millionth of a US dollar, as prices are
#: per million tokens; below it a budget is surely a typo, and shown in
#: full it would be hundreds of digits (1e-320).
MIN_BUDGET_USD = 0.000001
#: The largest C{rpm} and C{tpm}: past it a limit is surely a typo (or a
#: way to say "no limit", which null says); well within what the
#: databases' BIGINT and Redis' numbers hold exactly.
MAX_PER_MINUTE = 1_000_000_000_000
#: The most C{models} patterns a consumer may have.
MAX_MODEL_PATTERNS = 256
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: A deleted consumer's usage rows are kept under C{NAME@CREATED} (its
#: creation, UTC): no consumer can be named so.
_RETIRED = re.compile(r"[A-Za-z0-9._-]{1,64}@\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
#: The consumer name usage is recorded under for GATEWAY_API_KEYS' keys.
NO_CONSUMER = "-"


class InvalidConsumer(ValueError):
    """
    A consumer's fields are unusable; the message says which and what to send.
    """


def key_hash(key: bytes) -> str:
    """
    The SHA-256 of a key, in hex: what the database and the table hold.
    """
    return hashlib.sha256(key).hexdigest()


@attrs.frozen
class NewKey:
    """
    A key just made: C{key} is shown once, then only C{prefix} and C{hash}
    are kept.
    """

    key: str = attrs.field(repr=False)
    prefix: str
    hash: str = attrs.field(repr=False)

    @classmethod
    def make(cls) -> NewKey:
        while True:
            random = secrets.token_urlsafe(KEY_RANDOM_CHARS)[:KEY_RANDOM_CHARS]
            # Drawn again rather than changed: the first character is then
            # any of the 62 letters and digits alike (a key keeps 239.95 of
            # its 240 bits).  Keys made before keep working as they are.
            if len(random) == KEY_RANDOM_CHARS and random[0].isalnum():
                break
        key = KEY_PREFIX + random
        return cls(key, random[:SHOWN_CHARS], key_hash(key.encode("ascii")))


def creation_time(seconds: float) -> float:
    """
    A consumer's C{created_at}: POSIX seconds rounded to the millisecond,
    which reads back equal from any database (PostgreSQL with
    C{extra_float_digits=0} prints 15 significant digits), so that the
    creating instance, the others and the database name the same
    consumer.
    """
    return round(float(seconds), 3)


@attrs.frozen
class Consumer:
    """
    One consumer.

    @ivar budget_usd: spend allowed per C{budget_period}, in US dollars;
        None: no budget.
    @ivar budget_period: C{day} or C{month} (UTC calendar days and months)
        or C{total}.
    @ivar rpm: requests per minute (a sliding 60 s window); None: no limit.
    @ivar tpm: tokens (prompt + completion) per minute; None: no limit.
    @ivar models: allowed C{provider/model} patterns (L{fnmatch}, e.g.
        C{gemini/*}); empty: every model.
    @ivar expires_at: POSIX seconds after which its keys are refused.
    """

    name: str
    budget_usd: float | None = None
    budget_period: str = "month"
    rpm: int | None = None
    tpm: int | None = None
    models: tuple[str, ...] = ()
    expires_at: float | None = None
    #: POSIX seconds, to the millisecond (L{creation_time}): which consumer
    #: of that name it is.
    created_at: float = attrs.field(default=0.0, converter=creation_time)

    def allows(self, provider: str, model: str) -> bool:
        """
        Whether C{provider/model} matches one of L{models} (case-sensitive).
        """
        if not self.models:
            return True
        target = f"{provider}/{model}"
        return any(fnmatch.fnmatchcase(target, pattern) for pattern in self.models)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def describe(self, keys: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """
        The consumer as commands answer it (no key, no hash).
        """
        document: dict[str, Any] = {
            "name": self.name,
            "budget_usd": self.budget_usd,
            # A period without a budget means nothing.
            "budget_period": self.budget_period if self.budget_usd is not None else None,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "models": list(self.models),
            "expires_at": None if self.expires_at is None else isoformat(self.expires_at),
            "created_at": isoformat(self.created_at),
        }
        if keys is not None:
            document["keys"] = keys
        return document


#: 9999-12-31T23:59:59Z, the last second a time is shown to.
LAST_SECOND = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()


def parse_time(value: object, field: str) -> float:
    """
    An ISO date (C{2026-11-01}: its start, UTC) or datetime (naive: UTC) as
    POSIX seconds.

    @raise InvalidConsumer: anything else.
    """
    if not isinstance(value, str):
        raise InvalidConsumer(f"{field} must be an ISO date or datetime string, such as 2026-11-01")
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        # Not quoted: it may be megabytes long.
        raise InvalidConsumer(
            f"{field} is not an ISO date or datetime; use e.g. 2026-11-01 or 2026-11-01T12:00:00Z"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        # In UTC, as it is stored and shown: 9999-12-31T23:00:00-05:00
        # is past the last year a datetime holds.
        parsed.astimezone(UTC)
    except OverflowError:
        raise InvalidConsumer(f"{field} is out of range; use a time from 0001-01-01 to 9999-12-31 (UTC)") from None
    # As seconds (a float, as stored): 9999-12-31T23:59:59.99999Z rounds up
    # to the first second of year 10000, which nothing can show.
    return min(parsed.timestamp(), LAST_SECOND)


def period_key(period: str, now: float) -> str:
    """
    The budget period C{now} falls in: C{2026-11-03} (day), C{2026-11}
    (month) or C{total}; UTC.
    """
    if period == "total":
        return "total"
    moment = time.gmtime(now)
    if period == "day":
        return time.strftime("%Y-%m-%d", moment)
    return time.strftime("%Y-%m", moment)


def period_end(period: str, now: float) -> float | None:
    """
    When the period C{now} falls in ends (POSIX seconds), None for C{total}.
    """
    moment = time.gmtime(now)
    if period == "day":
        return calendar.timegm((moment.tm_year, moment.tm_mon, moment.tm_mday, 0, 0, 0)) + 86400.0
    if period == "month":
        year, month = (moment.tm_year + 1, 1) if moment.tm_mon == 12 else (moment.tm_year, moment.tm_mon + 1)
        return float(calendar.timegm((year, month, 1, 0, 0, 0)))
    return None


#: The fields of a consumer's definition (C{consumer_add}, C{consumer_update}).
FIELDS = frozenset({"name", "budget_usd", "budget_period", "rpm", "tpm", "models", "expires_at"})


def _optional_positive_int(value: object, field: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 < value <= MAX_PER_MINUTE:
        raise InvalidConsumer(f"{field} must be a whole number from 1 to {MAX_PER_MINUTE}, or null for no limit")
    return value


def retired_name(consumer: Consumer) -> str:
    """
    The name a deleted consumer's usage is kept under: C{NAME@CREATED}
    (C{team@2026-11-03T12:00:00Z}), so a consumer created again under
    C{NAME} starts from nothing.
    """
    return f"{consumer.name}@{isoformat(consumer.created_at)}"


def is_retired_name(value: object) -> bool:
    return isinstance(value, str) and _RETIRED.fullmatch(value) is not None


def check_name(value: object) -> str:
    """
    A consumer's name, as commands address one (L{check_new_name} is the
    stricter rule for a new one).
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value == NO_CONSUMER:
        raise InvalidConsumer(
            "name must be 1 to 64 letters, digits, '-', '_' or '.' (and not '-' alone), such as team-search"
        )
    return value


def is_key_like(value: str) -> bool:
    """
    Whether C{value} starts as a consumer key does (C{ock-}): a key, or a
    piece of one, typed where a name goes.  No new consumer is named so.
    """
    return value.startswith(KEY_PREFIX)


def shown_key(value: str) -> str:
    """
    What may be shown of a key-like value (L{is_key_like}): C{ock-} and
    the 8 characters after it, as lists and logs show a key, then C{...}
    when there was more.
    """
    shown = len(KEY_PREFIX) + SHOWN_CHARS
    return value[:shown] + ("..." if len(value) > shown else "")


def ctl_arguments(*values: str) -> str:
    """
    C{values} (consumer names, key prefixes) as openclawctl's arguments in
    a command a message names: joined by spaces, after C{--} when one
    starts with C{-} (which openclawctl would read as an option; names of
    consumers created before L{check_new_name} refused them may).
    """
    joined = " ".join(values)
    return f"-- {joined}" if any(value.startswith("-") for value in values) else joined


def check_new_name(value: object) -> str:
    """
    The name of a consumer being created: L{check_name}, and neither
    starting with C{-} (openclawctl would read it as an option) nor with
    C{ock-} (it would be taken for a key, and hidden as one in the log).
    Consumers named so before keep their names.
    """
    name = check_name(value)
    if name.startswith("-"):
        raise InvalidConsumer(
            f"name {name!r} starts with '-', which openclawctl reads as an option: start it with a letter, "
            "a digit, '_' or '.', such as team-search"
        )
    if is_key_like(name):
        raise InvalidConsumer(
            f"name may not start with {KEY_PREFIX}, as consumer keys do (was a key pasted?): choose another, "
            "such as team-search"
        )
    return name


def consumer_fields(data: Mapping[str, Any], base: Consumer | None = None) -> Consumer:
    """
    A consumer from a command's C{data}: a new one (C{base} None; C{name}
    required) or C{base} with the fields C{data} gives changed
    (L{consumer_changes}), checked as a whole (a C{budget_period} needs a
    budget, given or C{base}'s).

    @raise InvalidConsumer: a field is missing, unknown or invalid, or the
        fields given and C{base}'s do not go together.
    """
    changes = consumer_changes(data)
    current = base or Consumer(check_name(data.get("name")))
    if changes.get("budget_period") is not None and changes.get("budget_usd", current.budget_usd) is None:
        raise InvalidConsumer("budget_period needs budget_usd: give the budget it applies to (--budget-usd)")
    return attrs.evolve(current, **changes)


def consumer_changes(data: Mapping[str, Any]) -> dict[str, Any]:
    """
    The fields a command's C{data} sets, each checked on its own, as
    L{Consumer}'s attributes (C{budget_usd} a float or None, C{models} a
    tuple, C{expires_at} POSIX seconds or None); not C{name}, which is
    checked.  Whether they go together with the fields C{data} leaves as
    they are is L{consumer_fields}' to say.

    @raise InvalidConsumer: a field is missing (C{name}), unknown or invalid.
    """
    unknown = data.keys() - FIELDS
    if unknown:
        named = ", ".join(shortened(name, 40) for name in sorted(unknown)[:5])
        named += ", ..." if len(unknown) > 5 else ""
        raise InvalidConsumer(f"unknown field(s): {named}; allowed: {', '.join(sorted(FIELDS))}")
    check_name(data.get("name"))
    changes: dict[str, Any] = {}
    if "budget_usd" in data:
        budget = data["budget_usd"]
        if budget is not None and (
            type(budget) not in (int, float) or not 0 <= budget <= MAX_BUDGET_USD or math.copysign(1, budget) < 0
        ):
            # NaN and infinities fail the range; -0 its sign.
            raise InvalidConsumer(
                f"budget_usd must be a number of US dollars from 0 to {MAX_BUDGET_USD} (0 lets no call through), "
                "or null for no budget"
            )
        if budget and budget < MIN_BUDGET_USD:
            raise InvalidConsumer(
                f"budget_usd {budget:g} is below the smallest budget, {MIN_BUDGET_USD:f} US dollars (one millionth: "
                "prices are per million tokens): give 0 to let no call through, or at least 0.000001"
            )
        changes["budget_usd"] = None if budget is None else float(budget)
    if "budget_period" in data:
        period = data["budget_period"]
        if period not in PERIODS:
            raise InvalidConsumer("budget_period must be day, month or total (UTC calendar days and months)")
        changes["budget_period"] = period
    for field in ("rpm", "tpm"):
        if field in data:
            changes[field] = _optional_positive_int(data[field], field)
    if "models" in data:
        models = data["models"]
        if models is None or models == ["*"]:
            # What consumer_list shows for every model.
            models = []
        if not isinstance(models, list):
            raise InvalidConsumer(
                'models must be a list of provider/model patterns, such as ["gemini/*", "kimi/moonshot-v1-8k"]'
            )
        if len(models) > MAX_MODEL_PATTERNS:
            raise InvalidConsumer(f"models holds {len(models)} patterns; give at most {MAX_MODEL_PATTERNS}")
        for i, pattern in enumerate(models):
            if (
                not isinstance(pattern, str)
                or "/" not in pattern
                or pattern.strip() != pattern
                or not pattern.isprintable()
                or len(pattern) > MAX_MODEL_CHARS
            ):
                # Quoted only when short and printable.
                shown = (
                    f"models: {pattern!r}"
                    if isinstance(pattern, str) and len(pattern) <= 80 and pattern.isprintable()
                    else f"models[{i}]"
                )
                raise InvalidConsumer(
                    f"{shown} is no pattern; each must be provider/model or provider/* (at most "
                    f"{MAX_MODEL_CHARS} characters, as a model name), such as kimi/* or gemini/gemini-2.5-flash"
                )
        for pattern in models:
            if unclosed_bracket(pattern):
                shown = repr(pattern) if len(pattern) <= 80 else f"{pattern[:77]!r}..."
                raise InvalidConsumer(
                    f"models: {shown} holds a '[' with no closing ']', which would match a literal '[' only: close "
                    "the set (kimi/moonshot-v1-[0-9]*k), or write [[] for a literal '['"
                )
        changes["models"] = tuple(models)
    if "expires_at" in data:
        expires = data["expires_at"]
        changes["expires_at"] = None if expires is None else parse_time(expires, "expires_at")
    return changes


def unclosed_bracket(pattern: str) -> bool:
    """
    Whether C{pattern} holds a C{[} that L{fnmatch} takes literally as no
    C{]} closes it (C{kimi/[}, C{kimi/moonshot-v1-[8k}): the same scan as
    L{fnmatch.translate} (after C{[} and an optional C{!}, a first C{]}
    belongs to the set).
    """
    i, n = 0, len(pattern)
    while i < n:
        i += 1
        if pattern[i - 1] == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                return True
            i = j + 1
    return False


def pattern_providers(pattern: str, provider_ids: Iterable[str]) -> list[str]:
    """
    The ids among C{provider_ids} whose models C{pattern} may allow: those
    C{id} for which some C{id/model} matches it (L{Consumer.allows}).

    Exact for ids without glob characters (provider ids are lower-case
    letters, digits and C{-}): C{id/} then matches a leading part of the
    pattern that ends with the token consuming its C{/} (a C{/}, C{?},
    C{*} or a set C{[...]}), and any rest of a pattern matches some model
    name.
    """
    head, slash, _ = pattern.partition("/")
    if slash and not any(c in head for c in "*?["):
        return [provider for provider in provider_ids if provider == head]
    cuts = [i + 1 for i, c in enumerate(pattern) if c in "/*?]"]
    return [
        provider for provider in provider_ids if any(fnmatch.fnmatchcase(provider + "/", pattern[:cut]) for cut in cuts)
    ]


def models_warning(models: Iterable[str], provider_ids: Iterable[str]) -> str | None:
    """
    What a consumer's C{models} patterns allow nothing of, for a command's
    C{warning}: each pattern no provider of C{provider_ids} (the
    gateway's) can match, with the right spelling when an id differs only
    in case (C{KIMI/*}: C{kimi/*}); None when each may match one.
    """
    known = sorted(provider_ids)
    if not known:
        return None
    unmatched = []
    for pattern in models:
        if pattern_providers(pattern, known):
            continue
        said = f"{pattern!r}" if len(pattern) <= 80 else f"{pattern[:77]!r}..."
        cased = pattern_providers(pattern.lower(), known)
        head, slash, rest = pattern.partition("/")
        if cased and slash and not any(c in head for c in "*?["):
            said += f" (did you mean {cased[0] + '/' + rest!r}? provider ids are lower-case)"
        elif cased:
            said += f" (provider ids are lower-case: {', '.join(cased)})"
        unmatched.append(said)
    if not unmatched:
        return None
    return (
        f"models: {', '.join(unmatched)} {'names' if len(unmatched) == 1 else 'name'} no provider of this "
        f"gateway ({', '.join(known)}; patterns are provider/model, case-sensitive), so "
        f"{'it allows' if len(unmatched) == 1 else 'they allow'} no model; correct "
        f"{'it' if len(unmatched) == 1 else 'them'} with consumer_update (--model)"
    )


def plain_decimal(value: float) -> str:
    """
    C{value} in full (Python's shortest repr that reads back as it), never
    an exponent: C{0.000013}, not C{1.3e-05}; C{12345678.12345679}, not
    C{1.23457e+07}; so at most 17 significant digits and 24 characters for
    a budget (0, or from L{MIN_BUDGET_USD} to L{MAX_BUDGET_USD}).  A value
    outside that (a budget an earlier version took, such as C{1e-320}) is
    shown as Python's repr, with its exponent, rather than as hundreds of
    digits.
    """
    value = float(value)
    if value and not MIN_BUDGET_USD <= abs(value) <= MAX_BUDGET_USD:
        return repr(value)
    return format(Decimal(repr(value)), "f")


def usd(value: float) -> str:
    """
    US dollars spent, as every table shows them: to the cent at least, to
    6 significant digits below that, never an exponent (C{12345.68};
    C{0.0000032}, not C{0} or C{3.2e-06}).
    """
    if abs(value) >= 1000:
        return f"{value:.2f}"
    return format(Decimal(f"{value:.6g}"), "f")


__all__ = [
    "KEY_PREFIX",
    "MAX_BUDGET_USD",
    "MAX_PER_MINUTE",
    "MIN_BUDGET_USD",
    "NO_CONSUMER",
    "PERIODS",
    "Consumer",
    "InvalidConsumer",
    "NewKey",
    "check_name",
    "check_new_name",
    "consumer_changes",
    "consumer_fields",
    "ctl_arguments",
    "is_key_like",
    "is_retired_name",
    "key_hash",
    "models_warning",
    "parse_time",
    "pattern_providers",
    "period_end",
    "period_key",
    "plain_decimal",
    "retired_name",
    "shown_key",
    "unclosed_bracket",
    "usd",
]
