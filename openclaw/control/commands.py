"""
The control plane's commands: what each one checks and does, and the
result it answers with.  Messages reach them through
L{openclaw.control.plane.ControlPlane}, which parses, authenticates and
audits; nothing here touches a socket.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs
import orjson
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from openclaw.cluster.node import StoreUnavailable, TokenNotAdoptedHere
from openclaw.routing import ActiveRoute, Route, model_refusal
from openclaw.session import RotationUnderWay, SessionAuthority, SessionToken, TokenFileUnwritable
from openclaw.timefmt import isoformat

Result = dict[str, Any]


@attrs.frozen
class Audited:
    """
    A command's result with what its audit line adds: what the command
    changed.  The client is answered C{result} alone; C{fields} go into the
    audit event (as C{name=value} in the text line, as keys in a JSON line).
    """

    result: Result
    #: Field name to value, as the audit event carries them.
    fields: Mapping[str, str]


#: What a handler returns: the result at once, or a Deferred of it for
#: commands that wait on something (the maybeDeferred idiom); a command that
#: changes state may wrap its result in L{Audited}.  The read-only commands
#: answer at once, with no Deferred on the hot path.
Answer = Result | Audited | Deferred[Result] | Deferred[Audited]

#: The gateway's own commands (L{ControlCommands}).
GATEWAY_COMMANDS: tuple[str, ...] = ("ping", "status", "switch_provider", "health_check", "rotate_token")

#: The consumer commands (issue #19, L{openclaw.consumers.commands}); each
#: is audited like switch_provider.
CONSUMER_COMMANDS = (
    "consumer_create",
    "consumer_update",
    "consumer_delete",
    "consumer_list",
    "key_create",
    "key_revoke",
    "usage",
    "consumer_release",
)
#: Every command, in the order errors list them.
COMMANDS = GATEWAY_COMMANDS + CONSUMER_COMMANDS
#: Commands that change something or read consumers' data: each is written
#: to the audit log.  The others (ping, status) are read-only and
#: high-rate: debug level only.
AUDITED = frozenset({"switch_provider", "health_check", "rotate_token", *CONSUMER_COMMANDS})
#: The commands that change the gateway's state: carried out once their
#: answer is made, whatever becomes of it.
STATE_CHANGING = frozenset(
    {
        "switch_provider",
        "rotate_token",
        "consumer_create",
        "consumer_update",
        "consumer_delete",
        "key_create",
        "key_revoke",
        "consumer_release",
    }
)

#: The state-changing commands whose change the cluster's store does not
#: write itself (the consumers' database does): in a cluster they are made
#: only once the store says this instance holds the cluster's session
#: token (the C{fence} of L{openclaw.control.plane.ControlPlane}); the store's write
#: of a route or token checks that itself.
FENCED = STATE_CHANGING - {"switch_provider", "rotate_token"}


class CommandError(Exception):
    """
    A command was refused; the message tells the client why.
    """


class Provider(Protocol):
    """
    What the commands need to know of a provider adapter.
    """

    @property
    def id(self) -> str: ...

    @property
    def display_name(self) -> str: ...

    @property
    def default_model(self) -> str: ...

    def missing_key_warning(self) -> str | None: ...

    def unavailable_warning(self, model: str | None = None) -> str | None: ...

    def unlisted_model_warning(self, model: str) -> str | None: ...

    def normalize_model(self, model: str) -> str: ...


class Providers(Protocol):
    """
    What the commands need of the provider registry.
    """

    @property
    def ids(self) -> tuple[str, ...]: ...

    def get(self, provider_id: str) -> Provider: ...

    def health_check(self, active_id: str, active_model: str) -> Deferred[Result]: ...


#: The most characters of a peer's C{cmd} an auth failure's log line quotes.
MAX_LOGGED_CMD_CHARS = 80


def summarise(value: object, limit: int = MAX_LOGGED_CMD_CHARS) -> str:
    """
    What a peer sent (as C{cmd}, a provider's id, a field's name), for a
    log line or an error message: a string
    cut to C{limit} characters, and quoted (C{repr}, control characters
    as escapes) unless printable; a number, C{true}/C{false} or C{null} as JSON
    writes it; a list or an object only by its type and length, never its
    contents.  Never raises, however deep or large the value: a list
    nested a thousand deep is C{"<list of 1 item>"}.
    """
    if isinstance(value, str):
        head = value[:limit]
        return (head if head.isprintable() else repr(head)) + ("…" if len(value) > limit else "")
    if value is None or isinstance(value, bool):
        return orjson.dumps(value).decode()
    if isinstance(value, (int, float)):
        # orjson parses no integer beyond 64 bits: repr is short.
        return repr(value)[:limit]
    if isinstance(value, list):
        return f"<list of {len(value)} item{'' if len(value) == 1 else 's'}>"
    if isinstance(value, dict):
        return f"<object of {len(value)} key{'' if len(value) == 1 else 's'}>"
    return f"<{type(value).__name__}>"


def quoted(value: object) -> str:
    """
    L{summarise}, a string quoted as Python quotes it (C{'kimi'}).
    """
    return repr(summarise(value)) if isinstance(value, str) else summarise(value)


def _named(names: list[str]) -> str:
    """
    The first L{MAX_NAMED_CONSUMERS} of C{names}, then how many more.
    """
    shown = ", ".join(names[:MAX_NAMED_CONSUMERS])
    if len(names) > MAX_NAMED_CONSUMERS:
        shown += f" and {len(names) - MAX_NAMED_CONSUMERS} more"
    return shown


def command_data(data: object, allowed: frozenset[str] | None = None) -> Mapping[str, Any]:
    """
    Check a command's C{data}: absent (as C{{}}) or a JSON object, and,
    when C{allowed} is given, with no fields other than C{allowed}.  An
    error names at most L{MAX_NAMED_FIELDS} unknown fields, each
    L{summarise}d (cut, control characters escaped): a peer's field names
    are never echoed whole.

    @raise CommandError: it is not an object, or has an unknown field.
    """
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CommandError("data must be a JSON object")
    unknown = data.keys() - allowed if allowed is not None else ()
    if unknown:
        named = sorted(unknown)
        more = f" and {len(named) - MAX_NAMED_FIELDS} more" if len(named) > MAX_NAMED_FIELDS else ""
        raise CommandError(
            "unknown field(s) in data: "
            + ", ".join(summarise(name) for name in named[:MAX_NAMED_FIELDS])
            + more
            + (f"; allowed: {', '.join(sorted(allowed))}" if allowed else "; this command takes none")
        )
    return data


#: Unknown fields an error names, before "and N more".
MAX_NAMED_FIELDS = 5
_NONE: frozenset[str] = frozenset()
_SWITCH_FIELDS = frozenset({"provider", "model"})
#: Consumers a switch_provider warning names, before "and N more".
MAX_NAMED_CONSUMERS = 5


@attrs.frozen
class ControlCommands:
    """
    The handlers of the gateway's own commands (L{GATEWAY_COMMANDS}).  Each takes the message's C{data} and
    returns the C{result} object, or a Deferred firing with it, or raises
    (or fails with) L{CommandError}.  Everything they use is given at
    construction (C{attrs.evolve} makes a changed copy).
    """

    route: ActiveRoute
    providers: Providers
    sessions: SessionAuthority
    rotate: Callable[[], SessionToken | Deferred[SessionToken]]
    connections: Callable[[], int]
    started_at: float
    clock: Callable[[], float] = time.time
    #: The monotonic clock's reading at C{started_at}, and that clock: the
    #: uptime goes by them, so that a step of the wall clock does not
    #: make it jump (or go below 0); None: by the wall clock.
    started_monotonic: float | None = None
    monotonic: Callable[[], float] = time.monotonic
    #: Called with the new route after every switch, to keep it: None once
    #: kept, else why not (a warning for the answer); or a Deferred firing
    #: with that once the write (off the reactor thread) is done, the
    #: switch answered only then.
    persist: Callable[[Route], str | Deferred[str | None] | None] = lambda route: None
    #: Sees every health report (the provider-up gauges).
    on_health: Callable[[Result], Result] = lambda report: report
    #: Per provider id, its circuit breaker and keys now
    #: (L{openclaw.providers.ProviderRegistry.states}); shown by C{status}.
    provider_states: Callable[[], dict[str, Any]] | None = None
    #: In a cluster: writes a switch to the shared store and applies it,
    #: firing with the route it replaced (or failing with the reason
    #: nothing changed), in place of switching here alone.
    share_switch: Callable[[Route], Deferred[Route]] | None = None
    #: Extra fields of C{status}: C{instance}, C{worker}, C{instances_seen}.
    instance_status: Callable[[], dict[str, Any]] | None = None
    #: More commands by name (the consumer commands), after the gateway's own.
    extra: Mapping[str, Callable[[object], Result | Deferred[Result]]] = attrs.Factory(dict)
    #: The consumers whose C{models} exclude a provider's model
    #: (L{openclaw.consumers.table.ConsumerTable.excluding}).
    excluded_consumers: Callable[[str, str], list[str]] = lambda provider, model: []
    #: The consumers with a budget, when a provider's model has no price
    #: (L{openclaw.consumers.table.ConsumerTable.unpriced_budgets}).
    unpriced_consumers: Callable[[str, str], list[str]] = lambda provider, model: []

    def table(self) -> dict[str, Callable[[object], Answer]]:
        return {
            "ping": self.ping,
            "status": self.status,
            "switch_provider": self.switch_provider,
            "health_check": self.health_check,
            "rotate_token": self.rotate_token,
            **self.extra,
        }

    def ping(self, data: object) -> Result:
        # Without data (as ping and status are sent, at a high rate) there
        # is nothing to check: no call.
        if data is not None:
            command_data(data, _NONE)
        return {"pong": True, "ts": math.floor(self.clock() * 1000)}

    def status(self, data: object) -> Result:
        if data is not None:
            command_data(data, _NONE)
        route = self.route.current
        now = self.clock()
        return {
            "provider": self.providers.get(route.provider_id).display_name,
            "provider_id": route.provider_id,
            "model": route.model,
            "uptime": round(
                now - self.started_at if self.started_monotonic is None else self.monotonic() - self.started_monotonic,
                3,
            ),
            "started_at": isoformat(self.started_at),
            "token_expires": self.sessions.current.expires,
            "connections": self.connections(),
            **({} if self.provider_states is None else {"providers": self.provider_states()}),
            **({} if self.instance_status is None else self.instance_status()),
        }

    def switch_provider(self, data: object) -> Answer:
        fields = command_data(data, _SWITCH_FIELDS)
        provider_id = fields.get("provider")
        if provider_id is None:
            raise CommandError("switch_provider needs data.provider: one of " + ", ".join(self.providers.ids))
        if isinstance(provider_id, str):
            # In any case, as a model's provider prefix (ids are lower case).
            provider_id = provider_id.strip().lower() or provider_id
        if not isinstance(provider_id, str) or provider_id not in self.providers.ids:
            raise CommandError(f"unknown provider {quoted(provider_id)}; use one of " + ", ".join(self.providers.ids))
        provider = self.providers.get(provider_id)
        model = fields.get("model")
        if model is None:
            # Null is "not given", as on the data plane.
            model = provider.default_model
        if not isinstance(model, str):
            raise CommandError("data.model must be a non-empty string when given")
        refusal = model_refusal(model)
        if refusal is not None:
            raise CommandError(f"data.{refusal}")
        model = model.strip()
        named, slash, rest = model.partition("/")
        named = named.lower()
        if slash and named in self.providers.ids:
            # provider/model, as the data plane takes it: the provider's own
            # prefix is dropped; another provider's is a mistake.
            if named != provider_id:
                # A provider serving others' models (an aggregator such as
                # OpenRouter: openai/gpt-4o) takes them behind its own prefix.
                raise CommandError(
                    f"data.model {model!r} names provider {named!r}, not {provider_id!r}: to use it, switch "
                    f"to {named!r} (switch_provider {named} --model {rest}); if {provider_id!r} serves a model "
                    f"named {model!r}, name it {provider_id}/{model}"
                )
            model = rest
        # As the provider lists it (Gemini's "models/" prefix dropped), so
        # that prices, consumers' model patterns and usage see one name.
        model = provider.normalize_model(model.strip())
        if not model:
            raise CommandError("data.model must name a model")
        route = Route(provider_id, model)

        def switched(previous: Route, unsaved: str | None = None) -> Audited:
            result: Result = {"previous": previous.provider_id, "active": provider_id, "model": model}
            # The switch is made all the same: an operator may know better
            # than a listing (a model served but not listed, one just added).
            warnings = [
                w
                for w in (
                    unsaved,
                    provider.missing_key_warning(),
                    provider.unavailable_warning(model),
                    provider.unlisted_model_warning(model),
                )
                if w
            ]
            excluded = self.excluded_consumers(provider_id, model)
            if excluded:
                warnings.append(
                    f"the models of consumer(s) {_named(excluded)} exclude {provider_id}/{model}: their calls to "
                    "the active route get 403 model_not_allowed; widen their models with consumer_update, or "
                    "switch back"
                )
            unpriced = self.unpriced_consumers(provider_id, model)
            if unpriced:
                warnings.append(
                    f"consumer(s) {_named(unpriced)} have a budget and {provider_id}/{model} has no price: their "
                    "calls to the active route get 403 model_not_priced; add its price to PRICES_FILE, or switch "
                    "back"
                )
            if warnings:
                result["warning"] = "; ".join(warnings)
            # The route before and after, in the names the command takes.
            changed = {
                "previous_provider": previous.provider_id,
                "previous_model": previous.model,
                "provider": provider_id,
                "model": model,
            }
            return Audited(result, changed)

        if self.share_switch is not None:
            return self.share_switch(route).addCallbacks(switched, cluster_refusal)
        previous = self.route.switch(route)
        saved = self.persist(route)
        if isinstance(saved, Deferred):
            # Answered once written (or not: the answer's warning says so).
            return saved.addCallback(lambda unsaved: switched(previous, unsaved))
        return switched(previous, saved)

    def health_check(self, data: object) -> Deferred[Result]:
        command_data(data, _NONE)
        route = self.route.current
        return self.providers.health_check(route.provider_id, route.model).addCallback(self.on_health)

    def rotate_token(self, data: object) -> Answer:
        command_data(data, _NONE)
        try:
            issued = self.rotate()
        except TokenFileUnwritable as e:
            raise _unwritable(e) from None
        except RotationUnderWay as e:
            raise CommandError(str(e)) from None
        if isinstance(issued, Deferred):
            return issued.addCallbacks(_rotated, _rotation_refused)
        return _rotated(issued)


def _rotated(issued: SessionToken) -> Result:
    return {"token": issued.token, "jti": issued.jti, "expires": issued.expires}


def _unwritable(error: TokenFileUnwritable) -> CommandError:
    """
    C{rotate_token}'s refusal when the new token could not be written: the
    file is written first (L{SessionAuthority.adopt}, C{adopt_later}), so
    nothing was rotated and the current token stays valid.  Its write
    dropped at the gateway's stop (or asked after it began): said so.
    """
    if error.stopping:
        return CommandError(
            "nothing was rotated: the gateway is stopping, and the new token's write to TOKEN_FILE had not begun "
            "(a stop finishes only the write under way): the current token stays valid until the stop ends; "
            "the gateway, once started again, issues a new token (in TOKEN_FILE)"
        )
    return CommandError(
        f"nothing was rotated: the new token could not be written to TOKEN_FILE ({error.error}), so the "
        "current token stays valid; fix what stops the gateway's user writing there (a missing or "
        "read-only directory, a full disk), then rotate again"
    )


def _rotation_refused(failure: Failure) -> Failure:
    """
    A rotation that failed once asked (its token file written off the
    reactor thread, or the cluster's store): L{_unwritable}, or
    L{cluster_refusal} (a cluster's rotation made, and not adopted here,
    included: L{TokenNotAdoptedHere}, never "nothing was rotated").
    Reactor thread.
    """
    if isinstance(failure.value, TokenFileUnwritable):
        return Failure(_unwritable(failure.value))
    return cluster_refusal(failure)


def cluster_refusal(failure: Failure) -> Failure:
    """
    A change the cluster could not take (L{StoreUnavailable}), or a
    rotation it took that this instance could not adopt
    (L{TokenNotAdoptedHere}): its reason, and what to do, told to the
    client.
    """
    if failure.check(StoreUnavailable, TokenNotAdoptedHere):
        return Failure(CommandError(str(failure.value)))
    return failure
