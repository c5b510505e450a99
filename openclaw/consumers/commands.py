"""
The control plane's consumer commands (issue #19), in the same envelope
as the others and audited like C{switch_provider}:

 - C{consumer_create} C{{name, budget_usd?, budget_period?, rpm?, tpm?,
   models?, expires_at?}} -> the consumer and its first key (shown once);
 - C{consumer_update} (the same fields; C{name} required) -> the consumer;
 - C{consumer_delete} C{{name}} -> C{usage_kept_as}: the name its usage
   rows are kept under (C{NAME@CREATED}); C{key_create} C{{name}} -> a new key;
 - C{key_revoke} C{{name, key_prefix}}; C{consumer_list} C{{name?}};
 - C{usage} C{{name?, since?, until?, group_by?}} -> C{total} and, with
   C{group_by}, C{groups} (one per consumer, model or day): C{requests},
   C{limited}, C{prompt_tokens}, C{completion_tokens},
   C{reasoning_tokens}, C{cost_usd} (the priced calls' cost; None only
   when tokens were counted and none of them had a price; 0 when nothing
   was counted), C{unpriced_tokens};
 - C{consumer_release} C{{name}} -> C{released_usd}, C{released_tokens}:
   the reservations of its calls in flight released (in a cluster the
   cluster's, in Redis: a crashed instance's included; on a single
   gateway those in its memory).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import orjson
import psycopg
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from openclaw.consumers.model import (
    FIELDS,
    KEY_PREFIX,
    NO_CONSUMER,
    Consumer,
    InvalidConsumer,
    NewKey,
    check_name,
    check_new_name,
    consumer_changes,
    consumer_fields,
    ctl_arguments,
    is_key_like,
    is_retired_name,
    models_warning,
    parse_time,
    retired_name,
    shown_key,
)
from openclaw.consumers.store import (
    GROUPS,
    CommandTimedOut,
    ConsumerExists,
    DatabaseFileLost,
    database_error,
    sqlite_file_advice,
    unreachable,
    unwritten_error,
)
from openclaw.consumers.table import (
    REVOKE_RETRY_SECONDS,
    USAGE_WAIT_SECONDS,
    ConsumerGone,
    ConsumerTable,
    NotReleased,
    RevokeNotSaved,
)
from openclaw.control.commands import (
    CONSUMER_COMMANDS,
    MAX_NAMED_CONSUMERS,
    STATE_CHANGING,
    CommandError,
    Result,
    command_data,
)
from openclaw.spelling import meant


def _name(data: Mapping[str, Any], check: Callable[[object], str] = check_name) -> str:
    try:
        return check(data.get("name"))
    except InvalidConsumer as e:
        raise CommandError(f"data.{e}") from None


#: What to do when the consumers' database cannot be used.
_CHECK_DATABASE = "check DATABASE_URL (or STATE_DIR) and the gateway's log, and retry"
#: What to do when the database held a command past its bound.
_HELD = (
    "another session holds a lock on the consumers' tables (a long transaction, a maintenance job), or the "
    "database stopped answering: see what holds it (PostgreSQL: pg_stat_activity, pg_locks) and the gateway's "
    "log, and retry"
)


def _held(failure: Failure) -> str | None:
    """
    What the database held a command's transaction past (its own
    C{lock_timeout} or C{statement_timeout}, or the gateway's
    C{bounds.seconds}), or None when it did not: the transaction was
    rolled back (or will be), nothing was changed.
    """
    if isinstance(failure.value, CommandTimedOut):
        return f"the consumers' database did not take the change within {failure.value.seconds:g} s"
    if failure.check(psycopg.errors.LockNotAvailable):
        return f"the consumers' database held the change waiting for a lock ({database_error(failure)})"
    if failure.check(psycopg.errors.QueryCanceled):
        return f"the consumers' database did not take the change in time ({database_error(failure)})"
    return None


def _exists(name: str) -> CommandError:
    """
    The refusal of a create of a name a consumer has: in this instance's
    table, or in the database only (another command's or instance's
    create committed first).
    """
    return CommandError(f"a consumer named {name!r} exists; change it with consumer_update")


def _database_failed(failure: Failure) -> Failure:
    if failure.check(CommandError):
        return failure
    if failure.check(ConsumerExists):
        return Failure(_exists(str(failure.value)))
    if failure.check(DatabaseFileLost):
        # Refused before anything was written: what happened, and what to do.
        return Failure(CommandError(str(failure.value)))
    if failure.check(InvalidConsumer):
        # Fields that do not go with the consumer as the database has it.
        return Failure(CommandError(str(failure.value)))
    if failure.check(ConsumerGone):
        return Failure(
            CommandError(
                f"consumer {str(failure.value)!r} was deleted meanwhile (by another command, or on another "
                "instance): the change was not made; see openclawctl consumer list"
            )
        )
    held = _held(failure)
    if held is not None:
        return Failure(CommandError(f"{held}; nothing was changed: {_HELD}"))
    if unreachable(failure):
        # A connection lost at the commit may have made the change: retried
        # blindly, a key would be made twice (the first never shown).
        return Failure(
            CommandError(
                f"the consumers' database could not be written: {database_error(failure)}; check DATABASE_URL "
                "(or STATE_DIR) and the gateway's log, and once it is reachable see whether the change was made "
                "(openclawctl consumer list: a connection lost at the commit may have made it) before retrying"
            )
        )
    refused = f"the consumers' database refused the change: {database_error(failure)}"
    advice = sqlite_file_advice(failure)
    if advice is None and failure.check(psycopg.errors.ReadOnlySqlTransaction):
        advice = (
            "DATABASE_URL names a database that takes no writes (a standby, or one with "
            "default_transaction_read_only on): point it at the primary, or make it writable"
        )
    if advice is not None:
        # The database cannot take it (full, not writable): the
        # transaction was rolled back.
        return Failure(CommandError(f"{refused}; nothing was changed: {advice}, and retry"))
    return Failure(CommandError(refused))


def _database_unread(failure: Failure) -> Failure:
    if failure.check(CommandError):
        return failure
    if failure.check(psycopg.errors.LockNotAvailable):
        return Failure(CommandError(f"the consumers' database could not be read: {database_error(failure)}; {_HELD}"))
    return Failure(
        CommandError(f"the consumers' database could not be read: {database_error(failure)}; {_CHECK_DATABASE}")
    )


def _warn(result: Result, warning: str | None) -> None:
    """
    Add C{warning} to C{result}'s (after one it has, with C{; }).
    """
    if warning is not None:
        earlier = result.get("warning")
        result["warning"] = warning if earlier is None else f"{earlier}; {warning}"


_COUNTS = ("requests", "limited", "prompt_tokens", "completion_tokens", "reasoning_tokens", "unpriced_tokens")


def usage_total(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """
    The sum of C{usage} groups: counts added; C{cost_usd} the sum of the
    priced groups' costs; None only when no group had a price and some
    tokens had none (as each group's: null means unpriced, not nothing).
    """
    total: dict[str, Any] = {name: sum(int(group[name]) for group in groups) for name in _COUNTS}
    costs = [group["cost_usd"] for group in groups if group["cost_usd"] is not None]
    total["cost_usd"] = round(sum(costs), 10) if costs or not total["unpriced_tokens"] else None
    return total


#: The commands that change consumers (their answers carry L{unshared}'s
#: warning); a release changes none (it has nothing to announce).
_CHANGES = (STATE_CHANGING & frozenset(CONSUMER_COMMANDS)) - {"consumer_release"}


#: What an answer to C{consumer_list} holds besides its consumers and the
#: names in C{too_long} (the envelope, C{next} and a name in it, the
#: C{too_long} key), in bytes at most: a page is cut to leave this much of
#: C{MAX_MESSAGE_BYTES}.
LIST_ENVELOPE_BYTES = 512


#: The least size of a consumer's description in JSON, in bytes: what
#: bounds the consumers a page may hold (L{_head}).
MIN_DESCRIPTION_BYTES = 64


def _head(names: list[str], limit: int) -> list[str]:
    """
    The first of C{names} that a page of C{limit} bytes could hold at most
    (every description is L{MIN_DESCRIPTION_BYTES} or longer), so that a
    page describes a bounded number of consumers, not every one left.
    """
    return names if not limit else names[: limit // MIN_DESCRIPTION_BYTES + 1]


@attrs.frozen
class Page:
    """
    What of a list of consumers' descriptions one answer holds
    (L{paged}).

    @ivar consumers: the descriptions that fit, in order.
    @ivar too_long: the names of those longer than a whole answer alone,
        left out (each is listed by name, for the operator to raise
        C{MAX_MESSAGE_BYTES}).
    @ivar taken: how many of the descriptions the page went through
        (held or left out): the next page starts after them.
    """

    consumers: list[dict[str, Any]]
    too_long: list[str]
    taken: int


def paged(described: list[dict[str, Any]], limit: int) -> Page:
    """
    The first of C{described} whose JSON together (with the names of
    those left out) is at most C{limit} bytes; 0: no limit.  A page
    always moves on: it goes through one description at least.
    """
    if not limit:
        return Page(described, [], len(described))
    held: list[dict[str, Any]] = []
    too_long: list[str] = []
    size = 0
    for count, consumer in enumerate(described):
        length = len(orjson.dumps(consumer)) + 1
        if length > limit:
            # Its name instead (quoted, and a comma).
            length, alone = len(orjson.dumps(consumer["name"])) + 1, True
        else:
            alone = False
        if size + length > limit and count:
            return Page(held, too_long, count)
        size += length
        if alone:
            too_long.append(consumer["name"])
        else:
            held.append(consumer)
    return Page(held, too_long, len(described))


class ConsumerCommands:
    """
    The consumer commands of the control plane.

    @ivar unshared: in a cluster, what the changes made since
        C{announced()} read its argument leave undone on the other
        instances (the cluster store is unreachable, or did not confirm
        telling them), for the answer's C{warning}; None when they are
        told; a Deferred firing with either while an announcement is under
        way (L{openclaw.consumers.shared.SharedConsumers.unshared}).
    @ivar announced: how many changes this instance has announced so far.
    @ivar provider_ids: the gateway's providers (their ids): a create or
        update whose C{models} patterns allow none of their models is
        answered with a C{warning} (L{models_warning}); empty: not checked.
    @ivar cluster: the gateway is an instance of a cluster (a revoke not
        saved says the other instances still serve the key).
    """

    def __init__(
        self,
        table: ConsumerTable,
        clock: Callable[[], float],
        unshared: Callable[[int], str | Deferred[str | None] | None] = lambda since: None,
        announced: Callable[[], int] = lambda: 0,
        provider_ids: Iterable[str] = (),
        list_bytes: int = 0,
        cluster: bool = False,
    ) -> None:
        self.table = table
        self.cluster = cluster
        self.clock = clock
        self.unshared = unshared
        self.announced = announced
        self.provider_ids = tuple(provider_ids)
        self.list_bytes = list_bytes

    def handlers(self) -> dict[str, Callable[[object], Result | Deferred[Result]]]:
        handlers: dict[str, Callable[[object], Result | Deferred[Result]]] = {
            "consumer_create": self.consumer_create,
            "consumer_update": self.consumer_update,
            "consumer_delete": self.consumer_delete,
            "consumer_list": self.consumer_list,
            "key_create": self.key_create,
            "key_revoke": self.key_revoke,
            "usage": self.usage,
            "consumer_release": self.consumer_release,
        }
        return {
            name: self._once_loaded(self._told(handler) if name in _CHANGES else handler)
            for name, handler in handlers.items()
        }

    def _told(
        self, handler: Callable[[object], Result | Deferred[Result]]
    ) -> Callable[[object], Result | Deferred[Result]]:
        def with_warning(result: Result, unshared: str | None) -> Result:
            if unshared is not None:
                earlier = result.get("warning")
                result["warning"] = unshared if earlier is None else f"{earlier}; {unshared}"
            return result

        def warned(result: Result, since: int) -> Result | Deferred[Result]:
            unshared = self.unshared(since)
            if isinstance(unshared, Deferred):
                return unshared.addCallback(lambda settled: with_warning(result, settled))
            return with_warning(result, unshared)

        def changed(data: object) -> Result | Deferred[Result]:
            since = self.announced()
            answer = handler(data)
            return answer.addCallback(warned, since) if isinstance(answer, Deferred) else warned(answer, since)

        return changed

    def _once_loaded(
        self, handler: Callable[[object], Result | Deferred[Result]]
    ) -> Callable[[object], Result | Deferred[Result]]:
        def checked(data: object) -> Result | Deferred[Result]:
            # Before the table is read, a name would look free and a list empty.
            if not self.table.loaded:
                if self.table.newer_schema is not None:
                    raise CommandError(
                        f"the consumers' database cannot be used: {self.table.newer_schema}; run the later "
                        "openclaw that upgraded it, or point DATABASE_URL (or STATE_DIR) at a database of this version"
                    )
                raise CommandError(
                    "the consumers are not loaded yet (the gateway is starting, or cannot reach their "
                    "database and is trying again every 30 s at most: see its log); retry in a few seconds"
                )
            return handler(data)

        return checked

    def _address(self, data: Mapping[str, Any]) -> str:
        """
        The consumer C{data.name} names.  A key typed in its place (no
        consumer has that name) is refused, never echoed: the error names
        the consumer it is a key of.
        """
        name = _name(data)
        if is_key_like(name) and name not in self.table.consumers:
            holder = self.table.identify(name.encode("ascii"))
            if holder is None:
                raise CommandError(
                    f"data.name starts with {KEY_PREFIX} as consumer keys do ({shown_key(name)}), and is neither a "
                    "consumer's name nor a key of one: give the consumer's name (openclawctl consumer list shows "
                    "each with its keys' prefixes)"
                )
            # An earlier consumer's name or key's prefix may start with '-'.
            values = ctl_arguments(holder.consumer, holder.prefix)
            raise CommandError(
                f"data.name is a key of consumer {holder.consumer!r} ({shown_key(name)}), not a consumer's name: "
                f"give the name, {holder.consumer}; to revoke that key: openclawctl key revoke {values}"
            )
        return name

    def _known(self, none: str) -> str:
        """
        The consumers' names an answer to a name that is none of them
        gives: the first L{MAX_NAMED_CONSUMERS} by name, then how many
        more (the answer, and the audit line logging it, stay one short
        line however many consumers there are); C{none} when there are none.
        """
        names = sorted(self.table.consumers)
        if not names:
            return none
        shown = ", ".join(names[:MAX_NAMED_CONSUMERS])
        if len(names) > MAX_NAMED_CONSUMERS:
            shown += f" and {len(names) - MAX_NAMED_CONSUMERS} more (openclawctl consumer list shows them all)"
        return shown

    def _meant(self, name: str) -> str:
        """
        What an answer to C{name}, no consumer's, suggests: C{" (did you
        mean 't01'? names are case-sensitive)"} when a consumer's name
        differs from it only in case, C{" (did you mean 'team01'?)"} when
        one is close (L{openclaw.spelling.meant}), else C{""}.
        """
        close = meant(name, self.table.consumers)
        if close is None:
            return ""
        if close.casefold() == name.casefold():
            return f" (did you mean {close!r}? names are case-sensitive)"
        return f" (did you mean {close!r}?)"

    def _existing(self, name: str) -> Consumer:
        consumer = self.table.consumers.get(name)
        if consumer is None:
            known = self._known("none yet; create one with consumer_create (openclawctl consumer create NAME)")
            raise CommandError(f"no consumer named {name!r}{self._meant(name)}; consumers: {known}")
        if name in self.table.deleting:
            raise CommandError(f"consumer {name!r} is being deleted; retry in a moment")
        return consumer

    def consumer_create(self, data: object) -> Deferred[Result]:
        fields = command_data(data, FIELDS)
        name = _name(fields, check_new_name)
        if name in self.table.deleting:
            # Its delete waits for the database (and a write of usage rows under way).
            raise CommandError(f"consumer {name!r} is being deleted; retry in a moment")
        if name in self.table.consumers:
            raise _exists(name)
        try:
            consumer = consumer_fields(fields, Consumer(name, created_at=self.clock()))
        except InvalidConsumer as e:
            raise CommandError(str(e)) from None
        if consumer.expired(self.clock()):
            # Born expired: a mistyped date, surely; its key would never work.
            raise CommandError(
                "data.expires_at is already past (a date alone is its day's start, 00:00 UTC): give a "
                "later ISO date or UTC datetime (the day after the last day its keys may be used), or "
                "leave it out for a consumer that does not expire"
            )

        # Names are case-sensitive (as the database compares them): one
        # told apart from another by case alone is likely a typo.
        alike = sorted(other for other in self.table.consumers if other.casefold() == name.casefold())

        def created(key: NewKey) -> Result:
            result: Result = {"consumer": self.table.describe(name), "key": key.key, "key_prefix": key.prefix}
            _warn(result, models_warning(consumer.models, self.provider_ids))
            if alike:
                _warn(
                    result,
                    f"consumer names are case-sensitive: {name!r} is another consumer than {', '.join(map(repr, alike))}"
                    " (delete one with consumer_delete if it is a typo)",
                )
            return result

        return self.table.create(consumer).addCallbacks(created, _database_failed)

    def consumer_update(self, data: object) -> Deferred[Result]:
        """
        Change the fields C{data} names, and those only: each is checked
        here, and with the others as the database holds them in the
        update's transaction (a C{budget_period} needs a budget); the
        answer is the consumer as the database holds it after the change.
        """
        fields = command_data(data, FIELDS)
        current = self._existing(self._address(fields))
        try:
            consumer_changes(fields)
        except InvalidConsumer as e:
            raise CommandError(str(e)) from None

        def spends(consumer: Consumer) -> Deferred[Consumer]:
            # The consumer as the database holds it after the change.
            return self.table.read_spends([consumer.name]).addCallback(lambda _: consumer)

        def updated(consumer: Consumer) -> Result:
            result: Result = {"consumer": self.table.describe(consumer.name)}
            if "expires_at" in fields and consumer.expired(self.clock()):
                # Allowed: it suspends a consumer, keeping its keys and usage.
                result["warning"] = (
                    f"expires_at is past: the keys of {consumer.name!r} are refused (401 expired_api_key) from now on; "
                    "set a future expires_at, or none, to let them in again"
                )
            if "models" in fields:
                _warn(result, models_warning(consumer.models, self.provider_ids))
            return result

        updating: Deferred[Any] = self.table.update(current, fields)
        return updating.addCallback(spends).addCallbacks(updated, _database_failed)

    def consumer_delete(self, data: object) -> Deferred[Result]:
        name = self._address(command_data(data, frozenset({"name"})))
        retired = retired_name(self._existing(name))
        return self.table.delete(name).addCallbacks(
            lambda _: {"deleted": name, "usage_kept_as": retired}, _database_failed
        )

    def consumer_list(self, data: object) -> Deferred[Result]:
        """
        The consumer C{data.name}, or every consumer by name, in pages: an
        answer that would be longer than C{list_bytes} (the control
        plane's C{MAX_MESSAGE_BYTES}, less room for the envelope) holds
        the first consumers that fit and, as C{next}, the name to give
        as C{data.after} for the rest (C{openclawctl consumer list} asks
        for every page); C{next} is null on the last page.  A consumer
        longer than a whole answer alone is named in C{too_long} instead.  Pages go by
        name, not by a snapshot: a consumer created meanwhile with a name
        before C{after} is on no later page.  Only a page's consumers are
        described and have their spends read (in a cluster, from Redis).
        """
        fields = command_data(data, frozenset({"name", "after"}))
        more = False
        if "name" in fields:
            if "after" in fields:
                raise CommandError("give data.name (one consumer) or data.after (the next page of all), not both")
            name = self._address(fields)
            self._existing(name)
            names = [name]
        else:
            names = sorted(self.table.consumers)
            after = fields.get("after")
            if after is not None:
                if not isinstance(after, str):
                    raise CommandError("data.after must be a consumer's name: the next of the page before")
                names = names[bisect.bisect_right(names, after) :]
            # Sized by the spends as this instance last saw them.
            taken = paged([self.table.describe(name) for name in _head(names, self.list_bytes)], self.list_bytes).taken
            names, more = names[:taken], taken < len(names)

        def listed(_: None) -> Result:
            # A consumer deleted meanwhile is left out.
            described = [self.table.describe(name) for name in names if name in self.table.consumers]
            if "name" in fields:
                return {"consumers": described}
            # The spends just read may have made the page longer.
            page = paged(described, self.list_bytes)
            if page.taken < len(described):
                rest: str | None = described[page.taken - 1]["name"]
            else:
                rest = names[-1] if more and names else None
            answer: Result = {"consumers": page.consumers, "next": rest}
            if page.too_long:
                answer["too_long"] = page.too_long
            return answer

        # The spends as the cluster counts them, not as this instance last saw them.
        return self.table.read_spends(names).addCallback(listed)

    def consumer_release(self, data: object) -> Deferred[Result]:
        """
        Release the reservations of consumer C{data.name}'s calls in
        flight (L{ConsumerTable.release_reservations}), for a crashed
        instance's that would hold its budget and C{tpm} until they lapse:
        answers the US dollars and the tokens released.  The calls still
        running are counted when they end, as any other, but are no longer
        reserved until then.
        """
        name = self._address(command_data(data, frozenset({"name"})))
        self._existing(name)

        def released(held: tuple[float, int]) -> Result:
            usd, tokens = held
            return {"name": name, "released_usd": round(usd, 10), "released_tokens": tokens}

        def refused(failure: Failure) -> Failure:
            failure.trap(NotReleased)
            return Failure(CommandError(f"the reservations of {name!r} were not released: {failure.value}"))

        return self.table.release_reservations(name).addCallbacks(released, refused)

    def key_create(self, data: object) -> Deferred[Result]:
        name = self._address(command_data(data, frozenset({"name"})))
        self._existing(name)
        return self.table.add_key(name).addCallbacks(
            lambda key: {"name": name, "key": key.key, "key_prefix": key.prefix}, _database_failed
        )

    def key_revoke(self, data: object) -> Deferred[Result]:
        fields = command_data(data, frozenset({"name", "key_prefix"}))
        name = self._address(fields)
        self._existing(name)
        prefix = fields.get("key_prefix")
        # A key whose revoke is not written yet may be revoked again (tried
        # again at once).
        if not isinstance(prefix, str) or (
            prefix not in self.table.key_prefixes(name) and prefix not in self.table.unsaved_revokes(name)
        ):
            listed = ", ".join(self.table.key_prefixes(name)) or "none"
            raise CommandError(
                f"data.key_prefix must be one of the keys of {name!r}, as consumer_list shows them (the 8 "
                f"characters after ock-): {listed}"
            )

        def answer() -> Result:
            return {"name": name, "revoked": prefix, "keys_left": len(self.table.key_prefixes(name))}

        def revoked(count: int) -> Result:
            return answer() | {"saved": True}

        def unsaved(failure: Failure) -> Result | Failure:
            if not isinstance(failure.value, RevokeNotSaved):
                return failure
            reason = failure.value.reason
            cause = _held(reason) or f"the consumers' database did not take it: {unwritten_error(reason)}"
            advice = sqlite_file_advice(reason)
            kept_in = failure.value.kept_in
            restart = (
                f"it is kept in {kept_in} too, so a restart of this "
                f"{'instance' if self.cluster else 'gateway'} before then refuses the key still"
                if kept_in is not None
                else (
                    "should Redis lose it before that, a restarted instance serves the key again"
                    if self.cluster
                    else "a restart before that serves the key again"
                )
            )
            kept = (
                "it is kept in Redis, where every instance reads it, refuses the key and writes the revoke "
                f"again every {REVOKE_RETRY_SECONDS:g} s until the database takes it (consumer_list shows the key "
                f"under revokes_unsaved until then); {restart}"
                if self.cluster
                else f"the gateway writes it again every {REVOKE_RETRY_SECONDS:g} s and logs when it has "
                f"(consumer_list shows the key under revokes_unsaved until then); {restart}"
            )
            return answer() | {
                "saved": False,
                "warning": (
                    f"the key is refused by this gateway from now on, but the revoke is not saved ({cause}"
                    f"{'; ' + advice if advice else ''}): {kept}"
                ),
            }

        return self.table.revoke_key(name, prefix).addCallbacks(revoked, unsaved).addErrback(_database_failed)

    def usage(self, data: object) -> Deferred[Result]:
        fields = command_data(data, frozenset({"name", "since", "until", "group_by"}))
        name = fields.get("name")
        if name is not None and name != NO_CONSUMER and not is_retired_name(name):
            # NO_CONSUMER ("-"): the calls made with GATEWAY_API_KEYS' keys;
            # NAME@CREATED: a deleted consumer's (retired_name).
            name = self._address(fields)
        # A name no consumer has now: the usage of the deleted ones of that name.
        retired = name is not None and name != NO_CONSUMER and name not in self.table.consumers
        group_by = fields.get("group_by")
        if group_by is not None and group_by not in GROUPS:
            raise CommandError(f"data.group_by must be one of {', '.join(GROUPS)}")
        try:
            since = None if fields.get("since") is None else parse_time(fields["since"], "since")
            until = None if fields.get("until") is None else parse_time(fields["until"], "until")
        except InvalidConsumer as e:
            raise CommandError(str(e)) from None
        if since is not None and until is not None and since >= until:
            raise CommandError(
                f"since ({fields['since']}) must come before until ({fields['until']}): since is inclusive, "
                "until exclusive"
            )
        # What is counted but not yet written is part of the answer (a
        # write the database holds is waited for a moment only: the answer
        # then says how many rows it lacks).
        flushed = self.table.settle(USAGE_WAIT_SECONDS)

        def query(_: None) -> Deferred[list[dict[str, Any]]]:
            return self.table.store.usage(name, since, until, group_by, retired)

        def answered(rows: list[dict[str, Any]]) -> Result:
            if (
                name is not None
                and name != NO_CONSUMER
                and name not in self.table.consumers
                and not any(r["requests"] or r["limited"] for r in rows)
            ):
                # A deleted consumer's usage is still answered; a name never used is a mistake.
                known = self._known("none yet")
                raise CommandError(
                    f"no consumer named {name!r}{self._meant(name)}, and no usage recorded under that name (a "
                    f"deleted consumer's is kept as NAME@CREATED: see usage --group-by consumer); consumers: {known}"
                )
            result: Result = {"name": name, "since": fields.get("since"), "until": fields.get("until")}
            if group_by is None:
                result["total"] = rows[0]
            else:
                result["group_by"] = group_by
                result["groups"] = rows
                result["total"] = usage_total(rows)
            behind = self.table.behind()
            if behind:
                result["warning"] = (
                    f"{behind} usage rows counted on this instance are not in the database yet (it has not taken "
                    "them: see the gateway's log), so these figures may be behind; they are written once it does"
                )
            return result

        return flushed.addCallback(query).addCallbacks(answered, _database_unread)


__all__ = ["CONSUMER_COMMANDS", "ConsumerCommands", "usage_total"]
