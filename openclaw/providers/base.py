"""
The provider plug-in point: L{ProviderAdapter}, the one class a provider
module subclasses, and the probe logic every provider shares.

A provider module declares, as class attributes, who it is (C{id},
C{display_name}), the settings it reads (C{key_variables},
C{base_url_variable} and C{default_base_url}, C{model_variable} and
C{default_model_id}), its chat format (C{wire}) and, when it has one, its
embeddings API (C{embeddings}); and, as methods, how
to authenticate, how to read its models listing and where its chat
endpoint is (L{ProviderAdapter.auth_headers},
L{ProviderAdapter.fetch_model_ids}, L{ProviderAdapter.chat_url}).  A
provider whose error answers say more than OpenAI's do declares how to
read them too: its own rules for what a refusal means
(L{ProviderAdapter.refusal}), the wait its error bodies state
(L{ProviderAdapter.retry_delay}) and its names for statuses
(L{ProviderAdapter.error_statuses}); the defaults suit an OpenAI-compatible
API.
Reading its settings (L{openclaw.settings.load_settings}), building it
(L{ProviderAdapter.from_settings}), time limits, error wording and key
hygiene live here and in the registry, once for all providers.

The built-in providers are registered in one place,
L{openclaw.providers.BUILTIN_PROVIDERS}.
"""

from __future__ import annotations

import abc
import difflib
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Self

import attrs
from hyperlink import URL
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from openclaw.addresses import host_port
from openclaw.consumers.prices import Price
from openclaw.providers.breaker import BreakerState, CircuitBreaker
from openclaw.providers.embeddings import EmbeddingsWire
from openclaw.providers.errors import (
    BreakerOpen,
    Explained,
    MissingKey,
    NoUsableKey,
    ProbeTimedOut,
    ProviderError,
    Refusal,
    RefusalKind,
    Scrubber,
    Unreachable,
    UpstreamHTTPError,
    cancelled,
    classify,
    clip,
    describe_failure,
    explain_failure,
    http_hint,
    named_addresses,
)
from openclaw.providers.event_errors import NO_STATUSES
from openclaw.providers.fetch import Exchange, get_json, post, upstream_message
from openclaw.providers.keys import KeyPool, fingerprint
from openclaw.providers.wire import Wire
from openclaw.routing import model_refusal
from openclaw.settings import Settings
from openclaw.stalls import add_deadline, boot_clock


def _without_trailing_slash(url: str) -> str:
    return url.rstrip("/")


#: A provider id: lower-case letters, digits and "-", starting with a letter
#: (it is a path segment, a metrics label and part of variable names).
PROVIDER_ID = re.compile(r"[a-z][a-z0-9-]*")

#: What a provider module must declare (see L{ProviderAdapter}).
REQUIRED_DECLARATIONS = (
    "id",
    "display_name",
    "key_variables",
    "base_url_variable",
    "default_base_url",
    "model_variable",
    "default_model_id",
    "wire",
)


class ProviderDeclarationError(TypeError):
    """
    A provider module's adapter class does not declare what a provider
    must (L{REQUIRED_DECLARATIONS}), or declares it wrongly; the message
    says what to change.
    """


def check_declaration(cls: type[ProviderAdapter]) -> None:
    """
    Check a concrete provider declaration: every one of
    L{REQUIRED_DECLARATIONS} present, C{id} matching L{PROVIDER_ID},
    C{key_variables} a non-empty tuple of names.

    @raise ProviderDeclarationError: it does not hold.
    """
    name = f"{cls.__module__}.{cls.__qualname__}"
    missing = [attribute for attribute in REQUIRED_DECLARATIONS if not hasattr(cls, attribute)]
    if missing:
        raise ProviderDeclarationError(
            f"provider class {name} does not declare {', '.join(missing)}: declare each as a class attribute "
            "(see openclaw.providers.kimi for a whole provider module)"
        )
    if not isinstance(cls.id, str) or not PROVIDER_ID.fullmatch(cls.id):
        raise ProviderDeclarationError(
            f"provider class {name} has id {cls.id!r}: use lower-case letters, digits and '-', starting with a "
            "letter (such as 'example' or 'example-eu')"
        )
    variables = cls.key_variables
    if not isinstance(variables, tuple) or not variables or not all(isinstance(v, str) and v for v in variables):
        raise ProviderDeclarationError(
            f"provider class {name} has key_variables {variables!r}: use a tuple of one or more variable names, "
            "such as ('EXAMPLE_API_KEY',)"
        )


def check_declarations(adapters: Iterable[type[ProviderAdapter]]) -> None:
    """
    Check that providers registered together can be told apart: no id
    twice, and no environment variable read by two of them (C{open-ai} and
    C{open_ai} would both read C{OPEN_AI_API_KEYS}).

    @raise ProviderDeclarationError: two clash; the message names both.
    """
    owners: dict[str, str] = {}
    ids: set[str] = set()
    for adapter in adapters:
        if adapter.id in ids:
            raise ProviderDeclarationError(
                f"provider id {adapter.id!r} is registered twice: register each provider once"
            )
        ids.add(adapter.id)
        for variable in adapter.variables():
            owner = owners.setdefault(variable, adapter.id)
            if owner != adapter.id:
                raise ProviderDeclarationError(
                    f"providers {owner!r} and {adapter.id!r} both read {variable}: give one of them another id "
                    "or other variable names"
                )


@attrs.frozen
class ProbeResult:
    """
    The outcome of one health probe, before it is compared with a model.
    """

    ok: bool
    latency_ms: float | None = None
    status: int | None = None
    #: Model ids listed, or None when no listing could be had.
    models: tuple[str, ...] | None = None
    #: Why the probe failed; None when it succeeded.
    error: str | None = None
    #: Seconds (at least) the gateway's event loop stood still while the
    #: probe was under way, its time limit begun anew after (the longest
    #: such stall); None when it did not.
    stalled: float | None = None

    def report(self, active_model_available: bool | None) -> dict[str, Any]:
        """
        The JSON-able per-provider entry of a health check.
        """
        entry: dict[str, Any] = {
            "ok": self.ok,
            "latency_ms": self.latency_ms,
            "status": self.status,
            "models": None if self.models is None else len(self.models),
            "active_model_available": active_model_available,
        }
        if not self.ok:
            entry["error"] = self.error
        if self.stalled is not None:
            entry["stalled_s"] = round(self.stalled, 1)
        return entry


@attrs.define(kw_only=True)
class ProviderAdapter(abc.ABC):
    """
    One model provider, reached over the shared HTTP client.

    The API key is kept out of C{repr()} (and so out of any log event that
    carries the adapter as its source) and is scrubbed from every reason.
    """

    #: Stable id used in settings, commands, reports, metrics labels and
    #: the data plane's C{"<id>/<model>"} model names ("kimi").
    id: ClassVar[str]
    #: Human name ("Kimi (Moonshot AI)").
    display_name: ClassVar[str]
    #: The environment variables an operator may set the key with, in order
    #: of precedence; the first is the one messages name
    #: (C{("KIMI_API_KEY", "MOONSHOT_API_KEY")}).
    key_variables: ClassVar[tuple[str, ...]]
    #: The environment variable for the API's base URL, and its value when
    #: unset (an http:// or https:// URL, without a trailing slash).
    base_url_variable: ClassVar[str]
    default_base_url: ClassVar[str]
    #: Other names the base URL may be given by, after
    #: C{base_url_variable} (the provider's own SDKs' names:
    #: C{("MOONSHOT_BASE_URL",)}), as C{key_variables} has for the key.
    base_url_aliases: ClassVar[tuple[str, ...]] = ()
    #: The environment variable for the model served when an operator
    #: switches here without naming one, and its value when unset.
    model_variable: ClassVar[str]
    default_model_id: ClassVar[str]
    #: Its chat format: what a request becomes upstream, and what the
    #: answer becomes on the way back (L{openclaw.providers.wire.Wire}).
    wire: ClassVar[Wire]
    #: The list prices of its models, model id -> L{Price} (USD per million
    #: tokens, as the provider publishes them), merged into the gateway's
    #: price table at start-up; C{PRICES_FILE} overrides them.  Optional.
    prices: ClassVar[Mapping[str, Price]] = MappingProxyType({})
    #: Its embeddings API (L{openclaw.providers.embeddings.EmbeddingsWire}),
    #: serving C{POST /v1/embeddings}; None when it has none (Kimi).
    embeddings: ClassVar[EmbeddingsWire | None] = None
    #: Its own names for statuses, as C{error.status} of an error event
    #: gives them, to the HTTP status each stands for
    #: (L{error_event_status <openclaw.providers.event_errors.error_event_status>}):
    #: Gemini's are Google's canonical codes ("UNAVAILABLE": 503).  Empty
    #: for an OpenAI-compatible API, whose C{error.type} is read for every
    #: provider.  Optional.
    error_statuses: ClassVar[Mapping[str, int]] = NO_STATUSES
    #: The provider limits each model apart, so a 429 rests a key for the
    #: model called only (L{KeyPool.rests_by_model}); off, for every model
    #: (an account's limits: Moonshot's).  Optional.
    rests_by_model: ClassVar[bool] = False

    http: HTTPClient = attrs.field(repr=False)
    reactor: IReactorTime = attrs.field(repr=False)
    base_url: str = attrs.field(converter=_without_trailing_slash)
    api_key: str | None = attrs.field(default=None, repr=False)
    #: The model served when an operator switches here without naming one.
    default_model: str
    #: Seconds one listing may take, connect to last body byte (all pages),
    #: of time the event loop ran (L{openclaw.stalls.add_deadline}).
    timeout: float
    #: The clock that never steps, that time is read on too
    #: (L{openclaw.stalls.boot_clock}).
    monotonic: Callable[[], float] = attrs.field(default=boot_clock, repr=False)
    #: The agent chat calls go through: the one under C{http}, sharing its
    #: connection pool (see L{openclaw.providers.fetch.post}).
    agent: IAgent = attrs.field(repr=False)
    #: The keys chat calls spread over (C{api_key} and C{<ID>_API_KEYS}).
    keys: KeyPool = attrs.field(
        default=attrs.Factory(
            lambda self: KeyPool((self.api_key,) if self.api_key else (), self.reactor.seconds, self.id),
            takes_self=True,
        ),
        repr=False,
    )
    #: Keeps calls away from this provider while it fails.
    breaker: CircuitBreaker = attrs.field(
        default=attrs.Factory(lambda self: CircuitBreaker(self.reactor.seconds), takes_self=True), repr=False
    )
    #: The model a call failed over to this provider asks for; None: C{default_model}.
    fallback_model: str | None = None
    #: The model ids of the last listing that succeeded (a health probe or a
    #: C{/v1/models} call), for L{unlisted_model_warning}; None until one has.
    listed_models: tuple[str, ...] | None = attrs.field(default=None, init=False, repr=False)
    #: The chat and embeddings request headers per key, built once each:
    #: they hold the key.
    _post_headers: dict[str, Headers] = attrs.field(factory=dict, init=False, repr=False)
    #: Key -> its check under way (L{check_key}).
    _key_checks: dict[str, Deferred[ProbeResult]] = attrs.field(factory=dict, init=False, repr=False)
    #: Removes every key of the pool from text the provider sent (L{scrub}).
    scrubber: Scrubber = attrs.field(
        default=attrs.Factory(
            lambda self: Scrubber(
                self.keys.keys + ((self.api_key,) if self.api_key else ()), named_addresses(self.base_url)
            ),
            takes_self=True,
        ),
        init=False,
        repr=False,
    )

    _log: ClassVar[Logger] = Logger()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        http: HTTPClient,
        reactor: IReactorTime,
        agent: IAgent,
        *,
        on_rest: Callable[[str, str, float, str | None], None] | None = None,
    ) -> Self:
        """
        Build the adapter its entry in C{settings.providers} describes.

        @param on_rest: told (provider id, key fingerprint, seconds, model
            or None) of every key rest its key pool decides
            (L{KeyPool.on_rest}: a cluster shares them); L{None}: kept here.

        @raise LookupError: C{settings} holds no entry for this provider (it
            was not among the declarations L{load_settings
            <openclaw.settings.load_settings>} was given).
        """
        configured = settings.providers.get(cls.id)
        if configured is None:
            raise LookupError(
                f"the settings hold nothing for provider {cls.id!r}: give its adapter to load_settings (providers=...)"
            )
        breaker = CircuitBreaker(
            reactor.seconds, threshold=settings.breaker_failures, cooldown=settings.breaker_cooldown_seconds
        )
        adapter = cls(
            http=http,
            agent=agent,
            reactor=reactor,
            base_url=configured.base_url,
            api_key=configured.api_key,
            keys=KeyPool(configured.keys, reactor.seconds, cls.id, cls.rests_by_model, on_rest=on_rest),
            breaker=breaker,
            default_model=configured.model,
            fallback_model=configured.fallback_model,
            timeout=settings.health_check_timeout,
        )
        return adapter

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """
        Check a provider declaration when its class is made: a class that
        declares an C{id} or any of the settings a provider reads is a
        provider, and must declare all of L{REQUIRED_DECLARATIONS}
        (L{check_declaration}); a base class declaring none of them (such
        as L{OpenAICompatibleAdapter
        <openclaw.providers.openai_compatible.OpenAICompatibleAdapter>}) is
        left alone.
        """
        super().__init_subclass__(**kwargs)
        if hasattr(cls, "id") or any(name in vars(cls) for name in REQUIRED_DECLARATIONS if name != "wire"):
            check_declaration(cls)

    def __attrs_post_init__(self) -> None:
        self.breaker.on_change = self._breaker_changed

    @classmethod
    def variables(cls) -> tuple[str, ...]:
        """
        Every environment variable this provider's settings are read from.
        """
        return (
            *cls.key_variables,
            cls.key_list_variable(),
            cls.base_url_variable,
            *cls.base_url_aliases,
            cls.model_variable,
            cls.fallback_model_variable(),
        )

    @classmethod
    def key_list_variable(cls) -> str:
        """
        The variable holding more keys, comma-separated: C{<ID>_API_KEYS}
        (C{KIMI_API_KEYS}).
        """
        return f"{cls._variable_id()}_API_KEYS"

    @classmethod
    def fallback_model_variable(cls) -> str:
        """
        The variable naming the model a failed-over call asks this provider
        for: C{FALLBACK_MODEL_<ID>} (C{FALLBACK_MODEL_GEMINI}).
        """
        return f"FALLBACK_MODEL_{cls._variable_id()}"

    @classmethod
    def _variable_id(cls) -> str:
        return re.sub(r"[^A-Za-z0-9]", "_", cls.id).upper()

    @property
    def keys_setting(self) -> str:
        """
        How messages name this provider's key settings
        (C{"KIMI_API_KEY / KIMI_API_KEYS"}).
        """
        return f"{self.key_variable} / {self.key_list_variable()}"

    def _breaker_changed(self, previous: BreakerState, state: BreakerState) -> None:
        if state is BreakerState.OPEN:
            self._log.warn(
                "{provider} circuit breaker open: no calls are sent to it for {cooldown:g} s (they fail over "
                "where FALLBACK allows, else are answered 503)",
                provider=self.id,
                breaker=str(state),
                cooldown=self.breaker.cooldown,
            )
        elif state is BreakerState.CLOSED:
            self._log.info("{provider} circuit breaker closed: calls flow again", provider=self.id, breaker=str(state))

    @abc.abstractmethod
    def chat_url(self, model: str, stream: bool) -> bytes:
        """
        Where a chat call for C{model} goes (absolute URL, never carrying
        the key).
        """

    @abc.abstractmethod
    def auth_headers(self, key: str) -> dict[str, str]:
        """
        The headers that authenticate a request with C{key}.
        """

    @abc.abstractmethod
    async def fetch_model_ids(self, exchange: Exchange) -> list[str]:
        """
        List the provider's models (every page), unbounded in time: the
        caller bounds it.
        """

    def normalize_model(self, model: str) -> str:
        """
        A model name as it appears in L{list_models}.
        """
        return model

    def has_model(self, models: tuple[str, ...] | None, model: str) -> bool | None:
        """
        Whether C{model} is among C{models}; None when there is no listing.
        """
        if models is None:
            return None
        return self.normalize_model(model) in models

    @property
    def key_variable(self) -> str:
        """
        The key's variable that messages name: the first of
        C{key_variables}.
        """
        return self.key_variables[0]

    @property
    def configured(self) -> bool:
        """
        Whether the operator gave this provider a key: a provider without
        one is "not configured" (not probed, not warned about unless
        calls are meant to go to it, no C{openclaw_provider_up}), not broken.
        """
        return bool(self.keys.keys or self.api_key)

    def missing_key_warning(self) -> str | None:
        """
        "KIMI_API_KEY is not set" when no key is configured, else None.
        """
        return None if self.api_key else f"{self.key_variable} is not set"

    def unavailable_warning(self, model: str | None = None) -> str | None:
        """
        Why calls to this provider (of C{model}) would not be sent now, for
        an operator making it the active one: its breaker open, or every
        key resting after a 429 (for C{model}, where keys rest by model) or
        refused.  None when they would be (or no key is set:
        L{missing_key_warning}).
        """
        keys = self.keys
        if not keys.keys:
            return None
        cooldown = self.breaker.remaining()
        if cooldown > 0:
            return (
                f"{self.id}'s circuit breaker is open for {math.ceil(cooldown)} s more: its calls fail over where "
                "FALLBACK allows, else are answered 503"
            )
        if keys.available_for(model):
            return None
        back_in = keys.back_in(model)
        if back_in is not None:
            scope = f" of {model}" if model is not None and keys.back_in() is None else ""
            return f"every key of {self.keys_setting} rests after a 429{scope} for {math.ceil(back_in)} s more"
        return f"every key of {self.keys_setting} was refused by {self.id}: fix them, then run health_check"

    def unlisted_model_warning(self, model: str) -> str | None:
        """
        A warning when C{model} is not in this provider's last models
        listing (L{listed_models}): its calls would be refused (404) unless
        the provider serves models it does not list.  None when it is
        listed, or when no listing has been had yet (none is fetched here).
        """
        if self.has_model(self.listed_models, model) is not False:
            return None
        assert self.listed_models is not None
        close = difflib.get_close_matches(self.normalize_model(model), self.listed_models, n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return (
            f"model {model!r} is not among the {len(self.listed_models)} models {self.id} listed at its last "
            f"health_check or models listing, so calls to it will likely be refused; {hint}"
            "check the name and switch again with the right model (health_check shows whether it is available)"
        )

    def post_chat(self, model: str, body: bytes, stream: bool, key: str | None = None) -> Deferred[IResponse]:
        """
        Send one chat call with C{key} (by default C{api_key}); fires with
        the response once its headers are in, whatever its status.
        Cancelling it closes the connection.  The caller picks a key from
        L{keys} first.

        @raise MissingKey: no key given and none configured.
        """
        key = key or self.api_key
        if key is None:
            raise MissingKey(f"{self.key_variable} is not set")
        return post(self.agent, self.chat_url(model, stream), self.post_headers(key), body)

    def post_headers(self, key: str) -> Headers:
        """
        The headers of a JSON C{POST} (a chat or embeddings call) sent with
        C{key}: C{Content-Type}, C{Accept-Encoding: identity} and
        L{auth_headers}, built once per key.  The answer is read as it
        comes, uncompressed: with no C{Accept-Encoding} any content coding
        would be acceptable (RFC 9110 section 12.5.3), and a compressed
        answer (a proxy's gzip) unreadable.
        """
        headers = self._post_headers.get(key)
        if headers is None:
            headers = self._post_headers[key] = Headers(
                {
                    "Content-Type": ["application/json"],
                    "Accept-Encoding": ["identity"],
                    **{name: [value] for name, value in self.auth_headers(key).items()},
                }
            )
        return headers

    def post_embeddings(self, model: str, body: bytes, key: str) -> Deferred[IResponse]:
        """
        Send one embeddings call (L{embeddings}'s C{url} and C{body}) with
        C{key}; fires with the response once its headers are in, whatever
        its status.  Cancelling it closes the connection.  The caller picks
        C{key} from L{keys} (L{pooled_call}).

        @raise TypeError: the provider declares no embeddings API.
        """
        if self.embeddings is None:
            raise TypeError(f"{self.id} declares no embeddings API")
        return post(self.agent, self.embeddings.url(self.base_url, model), self.post_headers(key), body)

    def refusal(self, status: int, body: bytes, retry_after: str | None = None) -> Refusal:
        """
        A non-2xx answer to a chat call, a models listing or a probe, read
        (L{classify}: the rules every provider shares), its message
        scrubbed of every key of the pool.  A provider with rules of its
        own (a key refused with another status) overrides it.
        """
        refusal = classify(status, body, retry_after, self.reactor.seconds(), self.retry_delay(body))
        return attrs.evolve(refusal, message=self.scrub(refusal.message))

    def retry_delay(self, body: bytes) -> float | None:
        """
        Seconds the provider says to wait in the body of its non-2xx answer
        C{body}, for an API that says it there; None when it does not
        (the default: an OpenAI-compatible API says it only in its
        C{Retry-After} header, which L{classify} reads for every provider).
        """
        return None

    def note_refusal(self, key: str, refusal: Refusal, model: str | None = None) -> None:
        """
        Tell the key pool what a refusal of a call made with C{key} (of
        C{model}; None: a models listing) means, the same for every kind of
        call (chat, embeddings, a models listing): after a 429 the key
        rests for the provider's wait (C{Retry-After}, else L{retry_delay},
        else L{DEFAULT_REST_SECONDS <openclaw.providers.keys.DEFAULT_REST_SECONDS>}),
        for C{model} only where the provider limits each model apart
        (L{rests_by_model});
        refused as invalid (401, or the provider's own rule: L{refusal}) it
        is set aside until a health check finds it good.  A 403 is not taken as
        the key's fault on its own word (it is often about the model named:
        any client could otherwise empty the pool by naming a model the
        provider keeps private): the key is checked (L{check_key}) and set
        aside only if its models listing is refused too.
        """
        if refusal.kind is RefusalKind.RATE_LIMITED:
            self.keys.rest(key, refusal.retry_after, model)
        elif refusal.kind is RefusalKind.AUTH:
            self.keys.set_aside(key)
        elif refusal.kind is RefusalKind.FORBIDDEN:
            self.check_key(key)

    def check_key(self, key: str) -> None:
        """
        Check C{key} with the provider's free models listing (the health
        probe's, L{probe}), unless a check of it is under way already (one
        per key at a time): refused (401 or 403, or the provider's own key
        rule) it is set aside; listed, it is restored.  Nothing is sent
        for a key not in the pool.
        """
        if key not in self.keys or key in self._key_checks:
            return
        check = self._key_checks[key] = self._probe_key(key)
        if check.called:
            del self._key_checks[key]
            return

        def done(result: ProbeResult) -> ProbeResult:
            if self._key_checks.get(key) is not check:
                # Forgotten: cancelled by a stop (cancel_key_checks), no news.
                return result
            del self._key_checks[key]
            self._log.info(
                "{provider} key {key} checked after a 403: {outcome}",
                provider=self.id,
                key=fingerprint(key),
                outcome="it lists models" if result.ok else result.error,
            )
            return result

        check.addCallback(done)

    def key_checked(self, key: str) -> Deferred[None]:
        """
        Fires once the check of C{key} under way (L{check_key}) is over; at
        once when none is.
        """
        running = self._key_checks.get(key)
        if running is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()

        def over(result: Any) -> Any:
            waiter.callback(None)
            return result

        running.addBoth(over)
        return waiter

    def cancel_key_checks(self) -> None:
        """
        Cancel the key checks under way (the service is stopping): their
        connections are dropped, and their ends are not logged.
        """
        checks = list(self._key_checks.values())
        self._key_checks.clear()
        for check in checks:
            check.cancel()

    @property
    def failover_model(self) -> str:
        """
        The model a call failed over to this provider goes to: its
        C{FALLBACK_MODEL_*} when set, else its C{*_MODEL}.
        """
        return self.fallback_model or self.default_model

    @property
    def serving(self) -> bool:
        """
        Whether a call may be sent now: at least one key of the pool is
        usable (not resting, not set aside) and the breaker is not open
        (closed, or half-open).  Read by C{openclaw_provider_up}.
        """
        return self.keys.available > 0 and self.breaker.state is not BreakerState.OPEN

    def pooled_call(self, avoid: Collection[str] = (), model: str | None = None) -> PooledCall:
        """
        Begin a call other than chat (embeddings of C{model}, a models
        listing) as a chat call begins: with the next usable key of L{keys}
        (round robin, none of C{avoid}), unless the L{breaker} is open.  It never takes
        the half-open trial, which is a chat call's: the breaker judges
        completions (L{PooledCall}).  The caller reports how it went on the
        L{PooledCall}.

        @raise MissingKey: the pool holds no key.
        @raise NoUsableKey: every key (but those of C{avoid}) rests or was
            set aside.
        @raise BreakerOpen: the breaker keeps calls away.
        """
        keys = self.keys
        if not keys.keys:
            raise MissingKey(f"{self.key_variable} is not set")
        key = keys.pick(avoid, model)
        if key is None:
            raise NoUsableKey(
                f"no key of {self.keys_setting} may be used now ({keys.unusable_reason(model)})",
                keys.back_in(model),
                keys.resting_model(model),
            )
        breaker = self.breaker
        if breaker.state is BreakerState.OPEN:
            raise BreakerOpen(f"the {self.id} circuit breaker is {breaker.state}", breaker.remaining())
        return PooledCall(self, key, model)

    def scrub(self, text: str) -> str:
        """
        C{text} without any key of this provider (whole, as a prefix, or
        URL-encoded: L{Scrubber}).
        """
        return self.scrubber.text(text)

    def upstream_error(self, status: int, body: bytes, retry_after: str | None = None) -> UpstreamHTTPError:
        """
        The error for a non-2xx answer: the provider's own message, clipped,
        without the key, and what to check; with the answer read as a chat
        call's (L{refusal}, C{retry_after} the answer's C{Retry-After}).
        """
        message = clip(self.scrub(upstream_message(body)))
        refusal = self.refusal(status, body, retry_after)
        hint = http_hint(status, refusal.kind is RefusalKind.AUTH, self.key_variable, self.base_url_variable)
        return UpstreamHTTPError(status, message, hint, refusal)

    def describe(self, reason: Failure) -> Explained:
        """
        Why an exchange with this provider failed, without the key, in a
        client's words ("the provider could not be reached (connection
        refused); try again later ...") and the operator's, which name its
        address and the setting to check ("connection refused by
        host:port; is KIMI_BASE_URL right ..."): L{Explained}.
        """
        host, port = self._address()
        explained = explain_failure(reason, host, port, self.base_url_variable)
        return Explained(self.scrub(explained.client), self.scrub(explained.operator))

    def list_models(self) -> Deferred[list[str]]:
        """
        The model ids the provider offers, within L{timeout}.

        Fails with L{MissingKey} (no request made), L{Unreachable} (no
        answer: refused, cut, a failed TLS handshake) or another
        L{ProviderError} whose message is an operator-facing reason.
        """
        warning = self.missing_key_warning()
        if warning is not None:
            return fail(MissingKey(warning))
        try:
            call = self.pooled_call()
        except ProviderError:
            return fail()
        exchange = Exchange(started=self.reactor.seconds(), key=call.key)

        def listed(models: list[str]) -> list[str]:
            call.answered(exchange.status or 200)
            return models

        def failed(reason: Failure) -> Failure:
            value = reason.value
            if isinstance(value, UpstreamHTTPError) and value.refusal is not None:
                self.note_refusal(call.key, value.refusal)
            if exchange.status is not None:
                call.answered(exchange.status)
            else:
                # Cancelled, whatever layer of Twisted's web client the
                # cancellation came through: the client left (or the gateway
                # is stopping), no fault of the provider's.
                call.unanswered(client_left=cancelled(reason))
            return reason

        d = self._bounded_listing(exchange, "models listing").addCallbacks(listed, failed)
        return d.addErrback(self._as_provider_error)

    def probe(self) -> Deferred[ProbeResult]:
        """
        Health-probe the provider by listing its models (never a paid call)
        with each key of its pool: a key refused as invalid is set aside
        (L{KeyPool.set_aside}), a key that lists is restored.  The result
        is the first key's that listed, else the first key's.  Never fails:
        every problem becomes a L{ProbeResult} with a reason.
        """
        warning = self.missing_key_warning()
        if warning is not None:
            self._log.debug("{provider} not probed: {error}", provider=self.id, error=warning)
            return succeed(ProbeResult(ok=False, error=warning))
        keys = self.keys.keys or ((self.api_key,) if self.api_key else ())
        probes = [self._probe_key(key) for key in keys]
        if len(probes) == 1:
            return probes[0]
        return gatherResults(probes).addCallback(lambda results: next((r for r in results if r.ok), results[0]))

    def _probe_key(self, key: str) -> Deferred[ProbeResult]:
        exchange = Exchange(started=self.reactor.seconds(), key=key)
        stalls: list[float] = []
        d = self._bounded_listing(exchange, "health probe", stalls.append)
        return d.addCallbacks(
            self._probe_succeeded,
            self._probe_failed,
            callbackArgs=(exchange, stalls),
            errbackArgs=(exchange, stalls),
        )

    async def get_json(
        self,
        path: str,
        exchange: Exchange,
        params: dict[str, str] | None = None,
        what: str = "models listing",
    ) -> Any:
        """
        GET C{base_url/path} with this provider's auth; the parsed 2xx body.

        @raise UpstreamHTTPError: for any other status, with the provider's
            own message.
        @raise MissingKey: the exchange has no key and none is configured.
        """
        key = exchange.key or self.api_key
        if key is None:
            raise MissingKey(f"{self.key_variable} is not set")
        status, document = await get_json(
            self.http,
            f"{self.base_url}/{path}",
            headers={"Accept": "application/json", **self.auth_headers(key)},
            params=params,
            exchange=exchange,
            what=what,
        )
        if not 200 <= status < 300:
            raise self.upstream_error(status, document, exchange.retry_after)
        return document

    def _bounded_listing(
        self, exchange: Exchange, what: str, stalled: Callable[[float], object] = lambda seconds: None
    ) -> Deferred[list[str]]:
        # The deadline cancels the whole chain: the coroutine passes the
        # cancellation to whatever it awaits (connect, headers or body), and
        # each of those closes the connection.  Found due after the event
        # loop stood still, it begins anew instead (add_deadline): the
        # provider had no time to answer, so it is not judged (neither a
        # failed probe nor a failure charged to the breaker).
        d = Deferred.fromCoroutine(self.fetch_model_ids(exchange)).addCallback(self._listed)

        def stood_still(seconds: float) -> None:
            self._log.warn(
                "{provider} {what}: the gateway's event loop stood still for {seconds:.1f} s or more (the "
                "process stopped, its host or VM paused, or swapping) when its {timeout:g} s time limit passed: "
                "not judged a timeout, given {timeout:g} s more",
                provider=self.id,
                what=what,
                seconds=seconds,
                timeout=self.timeout,
            )
            stalled(seconds)

        return add_deadline(
            d,
            self.timeout,
            self.reactor,
            lambda _, timeout: self._timed_out(exchange, timeout),
            monotonic=self.monotonic,
            on_stall=stood_still,
        )

    def _listed(self, models: list[str]) -> list[str]:
        # The ids are text the provider sent like any other (README, "Every
        # text a provider sends passes one scrubber"): one holding a key
        # must not reach a client's listing, a health check or a warning.
        # An id the API would refuse as a model name (control or invisible
        # characters, a line break, over MAX_MODEL_CHARS) is left out: a
        # client could not call it, and it would go into answers and logs.
        scrub = self.scrubber.text
        models = [scrub(model) for model in models if model_refusal(model) is None]
        self.listed_models = tuple(models)
        return models

    def _timed_out(self, exchange: Exchange, timeout: float) -> Failure:
        host, port = self._address()
        return Failure(
            ProbeTimedOut(
                f"timed out after {timeout:g} s waiting for {exchange.waiting_for} from {host_port(host, port)}"
            )
        )

    def _probe_succeeded(self, models: list[str], exchange: Exchange, stalls: list[float]) -> ProbeResult:
        if exchange.key is not None:
            self.keys.restore(exchange.key)
        latency_ms = self._elapsed_ms(exchange)
        self._log.debug(
            "{provider} healthy: {count} models in {latency_ms} ms",
            provider=self.id,
            count=len(models),
            latency_ms=latency_ms,
        )
        return ProbeResult(
            ok=True,
            latency_ms=latency_ms,
            status=exchange.status,
            models=tuple(models),
            stalled=max(stalls, default=None),
        )

    def _probe_failed(self, reason: Failure, exchange: Exchange, stalls: list[float]) -> ProbeResult:
        error = self._reason(reason)
        value = reason.value
        if (
            exchange.key is not None
            and isinstance(value, UpstreamHTTPError)
            and value.refusal is not None
            and value.refusal.kind in (RefusalKind.AUTH, RefusalKind.FORBIDDEN)
        ):
            # The key refused as a chat call's refusal reads it (refusal()),
            # or denied the models listing, which names no model: a 403
            # here is about the key.
            self.keys.set_aside(exchange.key)
        if not cancelled(reason):
            # Cancelled is the gateway's own doing (a stop): no news of the provider.
            self._log.warn(
                "{provider} health probe failed: {error}",
                provider=self.id,
                error=error,
                status=exchange.status,
                key=None if exchange.key is None else fingerprint(exchange.key),
            )
        latency_ms = None if exchange.status is None else self._elapsed_ms(exchange)
        return ProbeResult(
            ok=False, latency_ms=latency_ms, status=exchange.status, error=error, stalled=max(stalls, default=None)
        )

    def _as_provider_error(self, reason: Failure) -> Failure:
        if reason.check(ProviderError):
            return reason
        return Failure(Unreachable(self.describe(reason)))

    def _reason(self, reason: Failure) -> str:
        host, port = self._address()
        text = describe_failure(reason, host, port, self.base_url_variable)
        return self.scrub(text)

    def _address(self) -> tuple[str, int]:
        url = URL.from_text(self.base_url)
        return url.host, url.port or (443 if url.scheme == "https" else 80)

    def _elapsed_ms(self, exchange: Exchange) -> float:
        elapsed: float = self.reactor.seconds() - exchange.started
        return round(elapsed * 1000, 1)


@attrs.define(eq=False)
class PooledCall:
    """
    One call other than chat (embeddings, a models listing) begun by
    L{ProviderAdapter.pooled_call}: the key it goes with, and what it tells
    the provider's breaker, once (L{answered}, L{failed} or L{abandoned};
    later ones do nothing).

    The breaker judges completions: an answer of another endpoint, 2xx or
    5xx, says nothing of them (a free listing or a working embeddings
    endpoint kept a breaker closed while every chat call failed), so only
    a provider that could not be reached at all (L{failed}) counts as its
    failure.
    """

    adapter: ProviderAdapter
    #: The key of the pool to send the call with.
    key: str = attrs.field(repr=False)
    #: The model called (embeddings'); None for a models listing.
    model: str | None = None
    settled: bool = False

    def answered(self, status: int) -> None:
        """
        The provider answered with C{status}: no verdict on its completions.
        """
        self.settled = True

    def failed(self) -> None:
        """
        No answer: connection refused or reset, no headers in time; the
        provider's failure.
        """
        if not self.settled:
            self.settled = True
            self.adapter.breaker.unreachable()

    def abandoned(self) -> None:
        """
        The call ended with no verdict on the provider (its client left).
        """
        self.settled = True

    def unanswered(self, client_left: bool) -> None:
        """
        The call was cut short before the provider answered (nothing, if it
        has its verdict already): L{abandoned} when C{client_left} (or the
        gateway stops: no fault of the provider's), else L{failed} (no
        answer in time, no connection).
        """
        if client_left:
            self.abandoned()
        else:
            self.failed()

    def refused(self, status: int, body: bytes, retry_after: str | None = None) -> UpstreamHTTPError:
        """
        The provider answered C{status} (non-2xx) with C{body}: the
        breaker's verdict given, the key pool told (L{ProviderAdapter.note_refusal}),
        and the error to raise, read as a chat call's refusal.
        """
        self.answered(status)
        error = self.adapter.upstream_error(status, body, retry_after)
        assert error.refusal is not None
        self.adapter.note_refusal(self.key, error.refusal, self.model)
        return error
