"""
Configuration, read once into one immutable L{Settings} object.

Every value is looked up in this order: the plugin's command-line option, the
process environment, the env file (C{--env-file PATH}, else C{.env} in the
working directory when there is one), the default.  Nothing else in the
package reads the environment: the settings object is passed down.

Each provider's settings (its key, base URL and default model) are read
from the variables its adapter declares (L{openclaw.providers.base}); the
providers read are the declarations L{load_settings} is given, the
built-in ones (L{openclaw.providers.BUILTIN_PROVIDERS}) unless told
otherwise.

A bad value stops start-up with one L{ConfigError} line that names the
variable, the value, where it came from (the command line, the environment
or which env file) and what to do about it.

Files that hold secrets or settings are held to ssh's rule
(L{check_private_file}): a secret file (C{JWT_SECRET_FILE}) or env file
that anyone but its owner may write, or that belongs to neither the
gateway's user nor root, is refused; a secret file others may read is a
warning (L{Settings.warnings}, logged at start-up), and so is an env file
that gives a secret setting (L{env_file_secrets}), as is an env-file key
that is no setting but close to one (C{GEMINI_MODLE}), and an env-file
line that is neither blank, a comment nor C{NAME=VALUE} (L{unread_lines}).
The directories of C{TOKEN_FILE} are held to the rule of those files'
directories (L{check_token_directory}); the directory of the consumers'
SQLite database too, and more strictly (L{check_state_directory}).

The path settings used once the gateway runs (C{TOKEN_FILE}, C{STATE_DIR},
a C{unix:} listener's socket) are made absolute as they are read, against
the working directory at launch (L{_absolute}): twistd's C{-d DIR} changes
it after.  The files read only here (C{JWT_SECRET_FILE}, C{PRICES_FILE},
C{UPSTREAM_CA_FILE}, the env file) are read before it does.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import re
import secrets
import socket
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import attrs
from cryptography.x509 import load_pem_x509_certificates
from decouple import Config, RepositoryEmpty, RepositoryEnv, strtobool

from openclaw.files import NotARegularFile, kind_of, read_regular_file
from openclaw.routing import model_refusal
from openclaw.spelling import CLOSE_CUTOFF, meant
from openclaw.tls import MAX_CA_FILE_BYTES, read_ca_file
from openclaw.urls import masked_fields, masked_url, url_passwords

if TYPE_CHECKING:
    from openclaw.consumers.prices import Price
    from openclaw.providers.base import ProviderAdapter

#: RFC 7518 section 3.2: an HS256 key must be at least as long as the hash.
MIN_SECRET_BYTES = 32

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

T = TypeVar("T")


class ConfigError(ValueError):
    """
    A configuration value is unusable; the message is meant for the operator
    and says which variable, which value, and what would be accepted.
    """


def builtin_providers() -> tuple[type[ProviderAdapter], ...]:
    """
    The providers the gateway ships with (L{openclaw.providers.BUILTIN_PROVIDERS}),
    the default wherever no declarations are given.  Imported when called:
    the provider modules import this one.
    """
    from openclaw.providers import BUILTIN_PROVIDERS

    return BUILTIN_PROVIDERS


@attrs.frozen(kw_only=True)
class ProviderSettings:
    """
    How one provider is reached: read from the variables its adapter
    declares.
    """

    #: The provider's adapter class (its declaration); its C{id} is this
    #: entry's key in L{Settings.providers}.
    adapter: type[ProviderAdapter]
    #: The API's base URL, without a trailing slash.
    base_url: str
    #: The model served when an operator switches to this provider without
    #: naming one.
    model: str
    api_key: str | None = attrs.field(default=None, repr=False)
    #: More keys (C{<ID>_API_KEYS}, comma-separated): with C{api_key}, the
    #: provider's key pool (see L{keys}).
    api_keys: tuple[str, ...] = attrs.field(default=(), repr=False)
    #: The model a call failed over to this provider asks for
    #: (C{FALLBACK_MODEL_<ID>}); None: L{model}.
    fallback_model: str | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        """
        Every key of the pool: C{api_key} then C{api_keys}, each once.
        """
        from openclaw.providers.keys import merge_keys

        return merge_keys((self.api_key,) if self.api_key else (), self.api_keys)

    @classmethod
    def defaults(cls, adapter: type[ProviderAdapter]) -> ProviderSettings:
        """
        The provider as its adapter declares it when no variable is set: its
        default base URL and model, no key.
        """
        return cls(adapter=adapter, base_url=adapter.default_base_url, model=adapter.default_model_id)


def provider_table(
    entries: Mapping[str, ProviderSettings] | Iterable[ProviderSettings],
) -> Mapping[str, ProviderSettings]:
    """
    A read-only mapping of provider id to L{ProviderSettings}, in the order
    given (the order reports list the providers in).

    @raise ValueError: an id is given twice, or keyed under another id.
    @raise openclaw.providers.base.ProviderDeclarationError: two providers
        read the same variable.
    """
    from openclaw.providers.base import check_declarations

    pairs = list(entries.items()) if isinstance(entries, Mapping) else [(e.adapter.id, e) for e in entries]
    table: dict[str, ProviderSettings] = {}
    for key, entry in pairs:
        if key != entry.adapter.id or key in table:
            raise ValueError(f"provider settings for {entry.adapter.id!r} given as {key!r} or twice")
        table[key] = entry
    check_declarations(entry.adapter for entry in table.values())
    return MappingProxyType(table)


def read_only_prices(prices: Mapping[str, Price]) -> Mapping[str, Price]:
    """
    C{prices} (C{provider/model} -> price) as a read-only copy.
    """
    return MappingProxyType(dict(prices))


def read_only_sources(sources: Mapping[str, str]) -> Mapping[str, str]:
    """
    C{sources} (setting name -> where its value came from) as a read-only
    copy.
    """
    return MappingProxyType(dict(sources))


def _builtin_provider_table() -> Mapping[str, ProviderSettings]:
    return provider_table(ProviderSettings.defaults(adapter) for adapter in builtin_providers())


def _builtin_default_provider() -> str:
    from openclaw.providers import DEFAULT_PROVIDER

    return DEFAULT_PROVIDER.id


def _builtin_embedding_provider() -> str | None:
    from openclaw.providers import DEFAULT_EMBEDDING_PROVIDER

    return DEFAULT_EMBEDDING_PROVIDER.id


def _builtin_embedding_model() -> str:
    from openclaw.providers import DEFAULT_EMBEDDING_PROVIDER

    embeddings = DEFAULT_EMBEDDING_PROVIDER.embeddings
    assert embeddings is not None, "the default embedding provider declares an embeddings API"
    return embeddings.default_model


@attrs.frozen
class Settings:
    """
    Everything the gateway was configured with.

    Tests build one directly (C{Settings(port=0, ...)}); the daemon builds one
    with L{load_settings}.
    """

    port: int = 18789
    interface: str = "::"
    session_ttl_hours: float = 24.0
    jwt_secret: bytes = attrs.field(repr=False, factory=lambda: secrets.token_bytes(32))
    jwt_secret_is_ephemeral: bool = True
    trusted_clients: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    )
    #: The provider calls go to until a switch; by default the built-in one
    #: (L{openclaw.providers.DEFAULT_PROVIDER}).
    default_provider: str = attrs.field(factory=_builtin_default_provider)
    token_file: Path | None = None

    #: Every provider by id, in the order reports list them: by default the
    #: built-in ones, unconfigured.  Read-only; given as a mapping or as
    #: L{ProviderSettings} in order.
    providers: Mapping[str, ProviderSettings] = attrs.field(
        factory=_builtin_provider_table, converter=provider_table, hash=False
    )
    health_check_timeout: float = 5.0
    log_level: str = "info"

    # The data plane (OpenAI-compatible API).
    api_port: int = 18790
    gateway_api_keys: tuple[str, ...] = attrs.field(repr=False, default=())
    upstream_timeout: float = 60.0
    max_request_bytes: int = 8 * 1024 * 1024
    #: Idle persistent connections kept per provider host (scheme, host,
    #: port).  Twisted's default of 2 would make every concurrent call
    #: beyond the second open, then close, a connection of its own.
    upstream_pool_size: int = 128
    #: Seconds an idle provider connection is kept: below the 60 s idle
    #: cut-off common in load balancers, since a POST sent on a connection
    #: the far end dropped silently is not retried (it is not idempotent).
    upstream_idle_seconds: float = 50.0
    #: The CA certificates trusted for https provider URLs, in place of the
    #: system's: the PEM bytes of UPSTREAM_CA_FILE, read (and checked)
    #: once at start-up; None: the system's trust store.
    upstream_ca_pem: bytes | None = None
    #: EMBEDDING_MODEL: the provider and model C{POST /v1/embeddings} uses
    #: (embeddings do not follow switch_provider: an application's vectors
    #: must stay comparable).  The provider is one whose adapter declares
    #: an embeddings API; None when no declared provider has one.  By
    #: default the built-in one (L{openclaw.providers.DEFAULT_EMBEDDING_PROVIDER})
    #: and its embeddings API's default model.
    embedding_provider: str | None = attrs.field(factory=_builtin_embedding_provider)
    embedding_model: str = attrs.field(factory=_builtin_embedding_model)

    # Running as a daemon.
    #: Twisted endpoint strings; when set they replace port/interface.
    control_listen: str | None = None
    api_listen: str | None = None
    metrics_listen: str | None = None
    state_dir: Path = attrs.field(factory=Path.cwd)
    log_format: str = "text"
    shutdown_grace_seconds: float = 10.0

    # Limits of the control plane.
    allowed_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[IPNetwork, ...] = ()
    max_message_bytes: int = 65536
    max_connections: int = 4096
    handshake_timeout_seconds: float = 5.0
    ping_interval_seconds: float = 30.0
    ping_timeout_seconds: float = 10.0
    max_auth_failures: int = 5

    # When a provider fails (failover, circuit breaker).
    #: C{"auto"}: a call to the active provider that fails before its answer
    #: started is sent once to the next provider in declaration order (the
    #: order of L{providers}); C{"off"}: never; a tuple of provider ids: to
    #: the next of those, in that order (see L{fallback_order}).
    fallback: str | tuple[str, ...] = "auto"
    #: Consecutive 5xx/timeout/connection failures that open a provider's breaker.
    breaker_failures: int = 5
    #: Seconds an open breaker keeps calls away from its provider.
    breaker_cooldown_seconds: float = 30.0

    # Several instances as one (a cluster over Redis).
    #: C{redis://[user:password@]host[:port][/db]}, C{rediss://} (TLS) or
    #: C{unix:///path[?db=N]}; None: a single instance, no shared state.
    redis_url: str | None = attrs.field(default=None, repr=False)
    #: Prefix of every Redis key and channel, so several gateways can share one Redis.
    cluster_name: str = "openclaw"
    #: Bound on every Redis call, in seconds.
    redis_timeout_seconds: float = 1.0
    #: Longest wait between two reconnection attempts to Redis, in seconds.
    redis_reconnect_max_seconds: float = 5.0
    #: Gateway processes sharing the listening sockets (C{--workers});
    #: above 1 needs C{redis_url}.
    workers: int = 1

    # Limits of the API listener (issue #17).
    #: Open API connections at most; lowered at start-up to what
    #: RLIMIT_NOFILE leaves after the control plane's reserve.
    api_max_connections: int = 4096
    #: Open API connections at most from one client address; None: a
    #: quarter of the (possibly lowered) API_MAX_CONNECTIONS.
    api_max_connections_per_address: int | None = None
    #: Seconds a request's head may take to arrive (from the connection's
    #: opening, or the end of the previous answer); not extended by bytes.
    api_header_timeout_seconds: float = 10.0
    #: Seconds a request's body may take to arrive once its head is in.
    api_body_timeout_seconds: float = 30.0
    #: Seconds a client may take to take each part of a large answer
    #: (between two successive writes, as nginx's C{send_timeout}), not
    #: the whole transfer; past it its connection is aborted.
    api_send_timeout_seconds: float = 60.0
    #: Offer HTTP/2 on a TLS API listener (ALPN), where the C{h2} package
    #: is installed (C{API_HTTP2}); HTTP/1.1 only when off.
    api_http2: bool = True
    #: Host names C{/metrics} also answers to, beyond localhost names and
    #: the listener's own address (a defence against DNS rebinding).
    metrics_allowed_hosts: tuple[str, ...] = ()

    # Lockout across connections (openclaw.control.lockout).
    #: Failed authentications from one client address within
    #: C{auth_lockout_window_seconds} that lock it out.
    auth_lockout_failures: int = 10
    auth_lockout_window_seconds: float = 60.0
    #: Seconds a locked-out address's handshakes are refused (HTTP 429).
    auth_lockout_seconds: float = 300.0
    #: Addresses and networks never locked out (loopback is not, unless listed).
    auth_lockout_exempt: tuple[IPNetwork, ...] = ()

    #: Things found while reading the configuration that do not stop
    #: start-up but that an operator should fix (a secret file others may
    #: read, an env-file key that looks like a misspelt setting): logged
    #: as warnings when the gateway starts.
    warnings: tuple[str, ...] = ()
    #: Where each setting given a value took it from, by name: C{"from the
    #: command line"}, C{"from the environment"} or C{"from env file
    #: '/etc/openclaw/openclaw.env'"}, as L{load_settings} read it (a
    #: setting left to its default is not in it).  For the refusals made
    #: once the settings are read (a TOKEN_FILE another gateway holds, a
    #: listener that cannot be used), whose line says where the value came
    #: from as a bad value's does (L{source}).  Read-only.
    sources: Mapping[str, str] = attrs.field(
        factory=dict, converter=read_only_sources, hash=False, eq=False, repr=False
    )
    #: The directories L{load_settings} made for the state (C{STATE_DIR}
    #: or the default one, with any parents it made), the deepest first: a
    #: start refused after the settings are read removes them again
    #: (L{remove_made_directories}).
    made_directories: tuple[Path, ...] = attrs.field(default=(), hash=False, eq=False, repr=False)

    # Consumers (issue #19, openclaw.consumers).
    #: C{postgresql://user:password@host:port/db}; None: SQLite in
    #: C{STATE_DIR/openclaw.db}.
    database_url: str | None = attrs.field(default=None, repr=False)
    #: Days usage rows are kept.
    usage_retention_days: int = 90
    #: The prices C{PRICES_FILE} holds (C{provider/model} -> price), over
    #: the shipped table.  Read-only.
    price_overrides: Mapping[str, Price] = attrs.field(factory=dict, converter=read_only_prices, hash=False)
    #: Completion tokens a consumer's call without C{max_tokens} reserves
    #: of its budget while in flight (priced at the model's completion price).
    consumer_reserve_tokens: int = 1000

    # Connections that never authenticate (issue #17, attacker review).
    #: Seconds an open control connection has to send a message with a
    #: valid token; then it is closed with 1008.
    auth_timeout_seconds: float = 10.0
    #: Open API connections at most from one client address that have not
    #: yet sent a request with an accepted key; None: a sixteenth of the
    #: (possibly lowered) API_MAX_CONNECTIONS.
    api_keyless_connections_per_address: int | None = None
    #: Seconds an API connection has, from its opening, to send a request
    #: head with an accepted key; then it is closed.
    api_keyless_timeout_seconds: float = 5.0

    def __attrs_post_init__(self) -> None:
        if self.default_provider not in self.providers:
            raise ValueError(
                f"default_provider {self.default_provider!r} is not among the providers: {', '.join(self.providers)}"
            )
        if isinstance(self.fallback, tuple):
            _fallback_order(",".join(self.fallback), self.provider_ids)
        elif self.fallback not in ("auto", "off"):
            raise ValueError(f"fallback {self.fallback!r} is none of auto, off or a tuple of provider ids")

    def source(self, name: str) -> str | None:
        """
        Where the value of setting C{name} came from (L{sources}), such as
        C{"from the environment"}; L{None} when it was not given (its
        default) or these settings were not read by L{load_settings}.
        """
        return self.sources.get(name)

    @property
    def fallback_order(self) -> tuple[str, ...] | None:
        """
        The providers failed-over calls go to, in the order tried: the
        declaration order for C{FALLBACK=auto}, the list given, or None
        when C{FALLBACK=off}.
        """
        if self.fallback == "off":
            return None
        return self.provider_ids if self.fallback == "auto" else tuple(self.fallback)

    @property
    def provider_ids(self) -> tuple[str, ...]:
        """
        The providers' ids, in order.
        """
        return tuple(self.providers)

    def default_model(self, provider_id: str) -> str:
        """
        The model a provider serves when an operator switches to it without
        naming one.

        @raise KeyError: no provider has this id.
        """
        return self.providers[provider_id].model

    def with_provider(self, provider_id: str, **changes: Any) -> Settings:
        """
        These settings with one provider's entry changed
        (C{settings.with_provider("kimi", api_key=None)}).
        """
        entry = attrs.evolve(self.providers[provider_id], **changes)
        return attrs.evolve(self, providers={**self.providers, provider_id: entry})


#: A port as people write it: ASCII digits only.
_DIGITS = re.compile(r"[0-9]+")


def _port(text: str) -> int:
    if not _DIGITS.fullmatch(text.strip()):
        # int() takes any Unicode digit, a sign and underscores: "４２１９３",
        # "+42193" and "4_2193" are no port anyone meant.
        raise ValueError
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError
    return port


#: The longest duration a setting in seconds takes: 30 days (a lockout
#: of a week is a choice some make).  Anything longer is no deadline in
#: practice, and a huge one (C{1e308}) was written out whole where a wait
#: is told (a C{Retry-After} of 309 digits; each is also clamped where it
#: is written, L{openclaw.dataplane.errors.retry_after_seconds}).
MAX_DURATION_SECONDS = 30 * 86400.0

#: The shortest deadline for an exchange over the network (a provider's
#: answer, a health check, a request's head or body, a client taking an
#: answer, a control connection's first message): a shorter one
#: (C{UPSTREAM_TIMEOUT=1e-9}) failed every exchange, while half a second
#: is a choice on a local network.
MIN_DEADLINE_SECONDS = 0.1

#: The shortest bound on a Redis call, and on the wait between
#: reconnections: Redis is near (a call takes about a millisecond on a
#: LAN), but a bound of nothing failed every call, and a wait of nothing
#: made reconnection a busy loop.
MIN_REDIS_SECONDS = 0.1

#: How the bound reads in a hint.
_AT_MOST = f"at most {MAX_DURATION_SECONDS:.0f} (30 days)"

# The hints a refused value's message ends with (L{load_settings}) that
# several settings share; some add an example (", such as 5") or what
# leaving the setting unset means.
#: A TCP port (C{WS_CONTROL_PORT}, C{API_PORT}).
_PORT_HINT = "use a whole number from 1 to 65535"
#: A count above 0 (L{_positive_int}).
_WHOLE_NUMBER_HINT = "use a whole number > 0"
#: A deadline for an exchange over the network (L{MIN_DEADLINE_SECONDS}).
_DEADLINE_HINT = f"use a number of seconds of at least {MIN_DEADLINE_SECONDS:g} and {_AT_MOST}"
#: A duration that must be above 0 (C{_seconds(0, above=True)}).
_ABOVE_ZERO_SECONDS_HINT = f"use a number of seconds greater than 0 and {_AT_MOST}"
#: A bound on Redis calls or reconnections (L{MIN_REDIS_SECONDS}).
_REDIS_SECONDS_HINT = f"use a number of seconds of at least {MIN_REDIS_SECONDS:g} and {_AT_MOST}"
#: One of Autobahn's connection timers (L{_timer_seconds}).
_TIMER_HINT = f"use a number of seconds, 1 or more and {_AT_MOST} (Autobahn's timers tick in whole seconds)"
#: The address to listen on (L{_interface}).
_INTERFACE_HINT = (
    "use an IP address such as :: (every address), 127.0.0.1 or fe80::1%eth0 (link-local, with its zone), "
    "not a host name"
)
#: Addresses and networks (L{_networks}).
_NETWORKS_HINT = "use comma-separated IPv4/IPv6 addresses or CIDR networks"
#: A listener (L{_listener}); each setting names its default port.
_ENDPOINT_HINT = "use a Twisted endpoint such as"


def _seconds(low: float, above: bool = False, high: float = MAX_DURATION_SECONDS) -> Callable[[str], float]:
    """
    A setting in seconds: at least C{low} (or, when C{above}, greater than
    C{low}) and at most C{high}.

    @return: its parser, raising L{ValueError} for anything else (not a
        number, NaN, infinite).
    """

    def parse(text: str) -> float:
        value = float(text)
        if not (low < value if above else low <= value) or not value <= high:
            raise ValueError
        return value

    return parse


#: The shortest token lifetime C{SESSION_TTL_HOURS} gives, in seconds:
#: time for a script that reads C{TOKEN_FILE} to use the token (and
#: C{rotate_token}).  A shorter one was born all but expired, and a single
#: instance renews nothing: its control plane stayed shut until a restart.
MIN_SESSION_TTL_SECONDS = 10

#: The longest, in hours: 10 years.
MAX_SESSION_TTL_HOURS = 87600


def _hours(text: str) -> float:
    """
    C{SESSION_TTL_HOURS}: hours from L{MIN_SESSION_TTL_SECONDS} to
    L{MAX_SESSION_TTL_HOURS}.

    @raise ValueError: anything else (not a number, NaN, infinite).
    """
    value = float(text)
    if not MIN_SESSION_TTL_SECONDS / 3600 <= value <= MAX_SESSION_TTL_HOURS:
        raise ValueError
    return value


def _networks(text: str) -> tuple[IPNetwork, ...]:
    return tuple(parse_network(entry) for entry in text.split(",") if entry.strip())


def parse_network(entry: str) -> IPNetwork:
    """
    Parse one allowlist entry: an address or a CIDR network.  An
    IPv4-mapped IPv6 address (C{::ffff:10.0.0.1}) means its IPv4 address, as
    it does for peers.
    """
    network = ipaddress.ip_network(entry.strip(), strict=True)
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen == 128:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.ip_network(mapped)
    return network


def _non_empty(text: str) -> str:
    if not text.strip():
        raise ValueError
    return text.strip()


def _interface(text: str) -> str:
    """
    C{INTERFACE}: the IP address to listen on, as Twisted's TCP port takes
    it: IPv4, or IPv6 without the brackets a URL puts round it (a
    link-local one with its zone, C{fe80::1%eth0}).  A host name is
    refused here, as an empty value is: it was looked up only when the
    gateway came to listen, and one that did not resolve (C{999.1.1.1}
    too) stopped it there with "Name or service not known" and exit
    status 1 (trial s31).

    @raise InvalidValue: it is in brackets.
    @raise ValueError: it is empty, or not an IP address.
    """
    text = _non_empty(text)
    if text.startswith("[") or text.endswith("]"):
        raise InvalidValue("an IPv6 address is given without brackets (:: or ::1, not [::1])")
    ipaddress.ip_address(text)
    return text


def _model_name(text: str) -> str:
    """
    A model name, without surrounding spaces, held to the rule both planes
    apply to the model names clients send (L{model_refusal}).

    @raise InvalidValue: it is refused, for the reason given.
    """
    model = text.strip()
    refusal = model_refusal(model, setting=True)
    if refusal is not None:
        raise InvalidValue(refusal)
    return model


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError
    return value


def _whole_number(low: int, high: int) -> Callable[[str], int]:
    """
    A whole-number setting from C{low} to C{high}, both taken.

    @return: its parser, raising L{ValueError} for anything else (not a
        whole number, below C{low}, above C{high}).
    """

    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError
        return value

    return parse


#: The least C{MAX_MESSAGE_BYTES}: the answer of every state-changing
#: command (C{rotate_token}'s token, C{consumer_create}'s key), cut to
#: its short fields when need be, fits in it.
MIN_MESSAGE_BYTES = 1024

# The upper bounds of the whole-number settings: each refuses more (one
# line, as any bad value), where more is meaningless or broke something;
# 99999999999999999999999 was taken by each (trial s31).
#: C{MAX_MESSAGE_BYTES}, 64 MiB: a thousand times the default.  Autobahn
#: holds a message whole in memory, before it authenticates too (each
#: connection may send 2 x (C{MAX_AUTH_FAILURES} + 1) of them), and an
#: answer that would be longer is asked for in parts (C{consumer_list}
#: pages, C{usage} with C{since} and C{until}).
MAX_CONTROL_MESSAGE_BYTES = 64 * 1024 * 1024
#: C{MAX_REQUEST_BYTES}, 1 GiB: a body is held whole (in memory or a
#: temporary file), parsed as JSON in memory and sent on whole, and a
#: lingering close reads twice as much; no provider takes an inline
#: request of that size (large files go by URL or a provider's file API).
MAX_REQUEST_BODY_BYTES = 1024 * 1024 * 1024
#: C{MAX_AUTH_FAILURES} and C{AUTH_LOCKOUT_FAILURES}: a thousand failed
#: authentications is guessing, not a typo.  The lockout keeps the time
#: of each failure within its window for every address it tracks (a
#: count past what a C{deque} holds broke the control plane: the first
#: failed authentication dropped its connection with an OverflowError);
#: an address never to be locked out goes in C{AUTH_LOCKOUT_EXEMPT}.
MAX_AUTH_FAILURE_COUNT = 1000
#: C{BREAKER_FAILURES}: a billion consecutive failures, which no provider
#: fails without one success in between: the value that turns the
#: breaker off in practice (at 1000 failed calls a second, 11 days).
MAX_BREAKER_FAILURES = 1_000_000_000
#: C{MAX_CONNECTIONS}, C{API_MAX_CONNECTIONS}, C{UPSTREAM_POOL_SIZE},
#: C{API_MAX_CONNECTIONS_PER_ADDRESS} and
#: C{API_KEYLESS_CONNECTIONS_PER_ADDRESS}: 2**31 - 1, the most file
#: descriptors a process can have (a descriptor is a C int: Linux's
#: C{fs.nr_open}, and so C{RLIMIT_NOFILE}, is at most that).  Each is
#: also held to C{API_MAX_CONNECTIONS} where the limits are made
#: (L{openclaw.dataplane.site.APILimits}).
MAX_CONNECTION_COUNT = 2**31 - 1
#: C{WORKERS}: 1024 processes, more than any host has cores to give them
#: (each a whole gateway: its connections, its Redis link, its memory).
MAX_WORKERS = 1024
#: How the bound reads in a hint.
_CONNECTIONS_HINT = f"use a whole number of connections from 1 to {MAX_CONNECTION_COUNT}"
#: C{USAGE_RETENTION_DAYS}: 36500 days (100 years), rows kept for good in
#: practice; a huge one stopped start-up with a traceback (days in
#: seconds past what a float holds), and a cut-off before 1970 purges
#: nothing a shorter one would.
MAX_USAGE_RETENTION_DAYS = 36500
#: C{CONSUMER_RESERVE_TOKENS}: a million completion tokens, more than any
#: model completes in one call.  A reservation is a price held of the
#: consumer's budget (and tokens of its C{tpm}) while the call is in
#: flight: a larger one admits a call only when nothing else is in
#: flight, as the reservation of 99999999999999999999999 tokens did
#: (held to 10**12, L{openclaw.consumers.estimate.MAX_TOKEN_COUNT}).
MAX_RESERVE_TOKENS = 1_000_000


def _timer_seconds(text: str) -> float:
    # Autobahn's connection timers are batched into whole seconds: a shorter
    # delay can fire at once and drop healthy connections.
    return _seconds(1)(text)


def _host_names(text: str) -> tuple[str, ...]:
    names = []
    for entry in text.split(","):
        entry = entry.strip().lower().rstrip(".")
        if entry.startswith("[") and entry.endswith("]"):
            entry = entry[1:-1]
        if not entry:
            continue
        if "/" in entry or any(c.isspace() for c in entry):
            raise ValueError(entry)
        if ":" in entry:
            ipaddress.IPv6Address(entry)  # else a port was given: ValueError
        names.append(entry)
    return tuple(names)


#: The fewest characters of a C{GATEWAY_API_KEYS} key: 16 of the bearer
#: token alphabet are about 96 bits even if each is drawn at random, and
#: a shorter key is a password someone chose, not a key.
MIN_API_KEY_CHARS = 16
#: The most characters of a C{GATEWAY_API_KEYS} key: its C{Authorization}
#: header must fit the API's 16 KiB request head with the rest, and no
#: key needs more.
MAX_API_KEY_CHARS = 1024
#: A bearer token (RFC 6750 section 2.1, C{b64token}): letters, digits and
#: C{- . _ ~ + /}, then C{=} at the end only.  Anything else (a space, a
#: control character, a non-ASCII letter) cannot be sent as
#: C{Authorization: Bearer <key>} by a client that follows the RFC.
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*\Z")
#: How to make a key, for the refusals of a bad one.
_MAKE_KEY = "make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def _keys(text: str) -> tuple[str, ...]:
    """
    Comma-separated keys (a provider's C{<ID>_API_KEYS}), blanks around
    them and empty entries dropped.
    """
    return tuple(key.strip() for key in text.split(",") if key.strip())


#: What a value refused for a C{#} after a blank is told: python-decouple
#: reads an env file's C{NAME=VALUE  # note} whole, the note included.
_COMMENT_IS_VALUE = "in an env file, a '# comment' after the value is part of it: put the comment on a line of its own"

#: A C{#} after a blank: what L{_COMMENT_IS_VALUE} explains.
_TRAILING_COMMENT = re.compile(r"\s#")

#: Why a provider key holding a space or a control character is refused.
_KEY_WITH_SPACE = (
    "holds a space or a control character, which no provider's key holds (in an env file, a '# comment' after "
    "the value is part of it): give the key alone"
)


def _provider_key(text: str) -> str:
    """
    A provider's key (C{KIMI_API_KEY}, ...), blanks around it dropped.

    @raise ValueError: it holds a space or a control character: every
        call would be refused by the provider (a 502 for each, nothing at
        start-up).  The message never shows the key.
    """
    key = text.strip()
    if any(c.isspace() or not c.isprintable() for c in key):
        raise ValueError(f"the key {_KEY_WITH_SPACE}")
    return key


def _provider_keys(text: str) -> tuple[str, ...]:
    """
    A provider's C{<ID>_API_KEYS} (L{_keys}), each key held to
    L{_provider_key}'s rule.

    @raise ValueError: naming the entry by its place, never its value.
    """
    entries = text.split(",")
    for number, entry in enumerate(entries, 1):
        key = entry.strip()
        if any(c.isspace() or not c.isprintable() for c in key):
            raise ValueError(f"entry {number} of {len(entries)} {_KEY_WITH_SPACE}")
    return _keys(text)


def _gateway_keys(text: str) -> tuple[str, ...]:
    """
    C{GATEWAY_API_KEYS}: comma-separated keys (L{_keys}), each a bearer
    token of L{MIN_API_KEY_CHARS} to L{MAX_API_KEY_CHARS} characters,
    C{=} padding not counted towards the least.

    @raise ConfigError: a key is not a bearer token (RFC 6750 section
        2.1), or is too short or too long.  The message names the key by
        its place in the comma-separated list, never by its value.
    """
    entries = text.split(",")
    for number, entry in enumerate(entries, 1):
        key = entry.strip()
        if not key:
            continue
        which = f"GATEWAY_API_KEYS' entry {number} of {len(entries)}"
        if not _BEARER_TOKEN.match(key):
            raise ConfigError(
                f"{which} holds a character a bearer token cannot (RFC 6750 section 2.1: letters, digits and "
                f"- . _ ~ + /, then = at the end only; in an env file, a '# comment' after the value is part of "
                f"it); {_MAKE_KEY}"
            )
        if len(key.rstrip("=")) < MIN_API_KEY_CHARS:
            raise ConfigError(
                f"{which} is {len(key.rstrip('='))} characters long (= padding aside); a key must be at least "
                f"{MIN_API_KEY_CHARS}: {_MAKE_KEY}"
            )
        if len(key) > MAX_API_KEY_CHARS:
            raise ConfigError(
                f"{which} is {len(key)} characters long; a key must be at most {MAX_API_KEY_CHARS}, or no request "
                f"could carry it (the API reads at most 16 KiB of request head): {_MAKE_KEY}"
            )
    return _keys(text)


def _origins(text: str) -> tuple[str, ...]:
    origins = []
    for entry in text.split(","):
        entry = entry.strip().rstrip("/")
        if not entry:
            continue
        scheme, sep, rest = entry.partition("://")
        if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
            raise ValueError
        origins.append(entry.lower())
    return tuple(origins)


def _listener(text: str) -> str:
    """
    A listener's Twisted endpoint string (C{CONTROL_LISTEN},
    C{API_LISTEN}, C{METRICS_LISTEN}), stripped, with a C{unix:} socket's
    relative path made absolute (L{_absolute}): Twisted binds it (and
    makes its C{.lock}) when the service starts, after twistd's C{-d DIR}
    has changed the working directory.  The files of an C{ssl:} endpoint
    are read as it is parsed, before that, and Twisted keeps them absolute.

    @raise ValueError: it is empty.
    """
    from openclaw.listeners import endpoint_fields

    text = _non_empty(text)
    fields, named = endpoint_fields(text)
    if fields[0] in ("tcp", "tcp6", "ssl"):
        # Twisted's parser takes int() of the port: "+18789", "18_789" or
        # "１８７８９" are no port anyone meant.
        port = fields[1] if len(fields) > 1 else named.get("port")
        if port is not None and not _DIGITS.fullmatch(port):
            raise InvalidValue(f"its port {port!r} is not a number of ASCII digits")
    if fields[0] != "unix":
        return text
    if "address" in named:
        address = named["address"]
    elif len(fields) > 1:
        address = fields[1]
    else:
        return text  # no address: Twisted's parser says so
    if not address or address.startswith(("/", "\0")):
        # Absolute already, or a Linux abstract socket's name (a NUL first).
        return text
    absolute = str(_absolute(address))
    if "address" in named:
        named["address"] = absolute
    else:
        fields[1] = absolute
    return ":".join(
        [fields[0], *(_endpoint_quoted(field) for field in fields[1:])]
        + [f"{_endpoint_quoted(name)}={_endpoint_quoted(value)}" for name, value in named.items()]
    )


def _endpoint_quoted(text: str) -> str:
    """
    C{text} as one field of a Twisted endpoint string: C{\\}, C{:} and
    C{=} escaped with C{\\} (C{serverFromString}'s grammar takes the
    character after a C{\\} as it is).
    """
    return "".join("\\" + character if character in "\\:=" else character for character in text)


def _log_format(text: str) -> str:
    text = text.strip().lower()
    if text not in ("text", "json"):
        raise ValueError
    return text


def _log_level(text: str) -> str:
    """
    C{LOG_LEVEL}: C{debug}, C{info}, C{warn}, C{error} or C{critical},
    case ignored; C{warning} (Python's and syslog's name) is C{warn}.

    @raise ValueError: anything else.
    """
    text = text.strip().lower()
    if text == "warning":
        return "warn"
    if text not in ("debug", "info", "warn", "error", "critical"):
        raise ValueError
    return text


def _fallback_order(text: str, ids: Sequence[str]) -> tuple[str, ...]:
    """
    C{FALLBACK}'s comma-separated provider ids, each known and given once.

    @raise ConfigError: one is unknown or given twice; the message names
        the known ids.
    """
    order = tuple(part.strip() for part in text.split(","))
    known = ", ".join(ids)
    for provider_id in order:
        if provider_id not in ids:
            raise ConfigError(
                f"FALLBACK={text!r} names {provider_id!r}, which is no provider: list the providers to fail over "
                f"to, in order, from {known} (or use auto or off)"
            )
    if len(set(order)) != len(order):
        raise ConfigError(f"FALLBACK={text!r} names a provider twice: name each of {known} at most once")
    return order


def _fallback(ids: Sequence[str]) -> Callable[[str], str | tuple[str, ...]]:
    def parse(text: str) -> str | tuple[str, ...]:
        text = text.strip()
        if text.lower() in ("auto", "off"):
            return text.lower()
        if not text:
            raise ValueError
        return _fallback_order(text, ids)

    return parse


def _without_credentials(text: str) -> str:
    """
    C{text}, if a URL, with what precedes the last C{@} of its authority
    shown as C{***} (a user, a password, or a token passed as either), and
    its query and fragment as C{?***} and C{#***} (where a key goes, as
    Gemini's C{?key=}).
    """
    scheme, separator, rest = text.partition("://")
    if not separator:
        return text
    rest, fragment, _ = rest.partition("#")
    rest, query, _ = rest.partition("?")
    if "@" in rest:
        rest = f"***@{rest.rpartition('@')[2]}"
    return f"{scheme}{separator}{rest}{'?***' if query else ''}{'#***' if fragment else ''}"


class InvalidValue(ValueError):
    """
    A setting's value is invalid, for the reason given (shown before the
    setting's hint).
    """


def _url(text: str) -> str:
    """
    A provider's base URL: C{http://} or C{https://}, a host (a name, an
    IPv4 address, or an IPv6 one in brackets), an optional port, a path;
    without the final C{/}.

    @raise ValueError: anything else, with what is wrong: a user or
        password (the provider's key has a setting of its own, and a URL
        is echoed in errors), a query or fragment (the gateway appends the
        API's paths), a port out of range, no host.
    """
    text = text.strip()
    if "@" in text:
        # Before any parsing, whose errors could quote a password.
        raise InvalidValue(
            "it holds '@': a user or password, which a provider's base URL never carries "
            "(its key has a setting of its own)"
        )
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        # A bracket left open, a port that is not a number or out of range.
        raise InvalidValue(f"it is not a URL ({str(e)[:1].lower()}{str(e)[1:]})") from None
    if parts.scheme not in ("http", "https") or not text.startswith(f"{parts.scheme}://"):
        raise ValueError
    host = parts.hostname
    if not host:
        raise InvalidValue("it names no host")
    if any(c.isspace() or not c.isprintable() for c in host):
        raise InvalidValue("its host holds a space or control character")
    if port == 0:
        raise InvalidValue("port 0 is not a port to connect to")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise InvalidValue("the gateway appends the API's paths to it: leave out ?query and #fragment")
    return text.rstrip("/")


def _read_embedding_model(
    read: Callable[[str, Callable[[str], Any], Any, str], Any],
    declared: tuple[type[ProviderAdapter], ...],
    defaults: Settings,
) -> tuple[str | None, str]:
    """
    EMBEDDING_MODEL as C{(provider, model)}: C{<provider>/<model>} for a
    declared provider whose adapter has an embeddings API
    (L{ProviderAdapter.embeddings}), or a bare model name for the default
    one (the built-in default when declared, else the first declared that
    has one), as that API names it (Gemini's C{models/<model>} is read as
    C{<model>}).  Unset: the default provider's default model; C{(None, "")}
    when no declared provider has embeddings.

    @raise ConfigError: it names a provider without embeddings, or no model.
    @raise InvalidValue: it is refused as a model name (L{model_refusal}).
    """
    providers = {adapter.id: adapter for adapter in declared if adapter.embeddings is not None}
    ids = [adapter.id for adapter in declared]
    default = providers.get(defaults.embedding_provider or "") or next(iter(providers.values()), None)
    having = ", ".join(providers) or "none of the declared providers"

    def parse(text: str) -> tuple[str | None, str]:
        refusal = model_refusal(text.strip(), setting=True)
        if refusal is not None:
            raise InvalidValue(refusal)
        provider_id, slash, model = text.strip().partition("/")
        if slash and provider_id in ids:
            adapter = providers.get(provider_id)
            if adapter is None:
                raise ConfigError(
                    f"EMBEDDING_MODEL={text!r} names {provider_id}, which has no embeddings API; "
                    f"use <provider>/<model> with a provider that has one ({having})"
                )
        elif default is None:
            raise ConfigError(
                f"EMBEDDING_MODEL={text!r} is set but no declared provider has an embeddings API; unset it"
            )
        elif not slash and provider_id in ids:
            # A provider's id alone is a slip for <provider>/<model>, not a model.
            raise ConfigError(
                f"EMBEDDING_MODEL={text!r} names a provider, not a model: use <provider>/<model> with a provider "
                f"that has an embeddings API ({having}), or a bare {default.id} model name"
            )
        else:
            adapter, model = default, text
        assert adapter.embeddings is not None
        return adapter.id, adapter.embeddings.model_name(model)

    if default is None:
        unset: tuple[str | None, str] = (None, "")
    else:
        assert default.embeddings is not None
        same = default.id == defaults.embedding_provider
        unset = (default.id, defaults.embedding_model if same else default.embeddings.default_model)
    example = "" if default is None else f", or a bare {default.id} model name such as {unset[1]}"
    embedding: tuple[str | None, str] = read(
        "EMBEDDING_MODEL",
        parse,
        unset,
        f"use <provider>/<model> with a provider that has an embeddings API ({having}){example}",
    )
    return embedding


def _absolute(text: str | Path) -> Path:
    """
    A path setting as the gateway keeps it: a relative one taken against
    the working directory now, at launch, as twistd makes its C{--pidfile}
    absolute.  twistd's C{-d DIR}
    (C{--rundir}) changes the working directory after the settings are
    read: a path kept relative was checked in one directory and used in
    another (daemon trial s18: a token file's lock left in the launch
    directory, a consumers' database never usable).  Not normalised
    (C{..} is left for the kernel to follow, through any link).
    """
    return Path(text).absolute()


def _writable_file(path: str) -> Path:
    """
    A file the gateway will write (C{TOKEN_FILE}), made absolute
    (L{_absolute}) and its directory resolved (links followed, C{..}
    taken: the path it is written, locked and named at, as the banner
    shows it): the directory must exist and be writable now, not at the
    first rotation, and is held to the rule of secret files' directories
    (L{check_token_directory}).
    """
    absolute = _absolute(path)
    directory = absolute.parent.resolve()
    if not directory.is_dir():
        raise ConfigError(
            f"TOKEN_FILE={path!r}: the directory {str(directory)!r} does not exist; "
            "create it (mode 0700) for the gateway's user"
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(
            f"TOKEN_FILE={path!r}: the directory {str(directory)!r} is not writable by the gateway's user "
            "(its mode, owner, a read-only file system); make it so, or put TOKEN_FILE in a directory that is"
        )
    check_token_directory(absolute, f"TOKEN_FILE={path!r}")
    return directory / absolute.name


def _ca_file(path: str) -> bytes:
    """
    The bytes of a PEM file of one or more CA certificates, read and
    checked now rather than at the first provider call (and read once: a
    file changed or removed later makes no difference), as an untrusted
    file: only a regular file of at most L{MAX_CA_FILE_BYTES}
    (L{read_ca_file}).
    """
    try:
        data = read_ca_file(Path(path))
    except NotARegularFile as e:
        raise ConfigError(
            f"UPSTREAM_CA_FILE={path!r} is refused: {e}; point UPSTREAM_CA_FILE at a regular PEM file of "
            f"at most {MAX_CA_FILE_BYTES // 1024 // 1024} MiB"
        ) from None
    except OSError as e:
        raise ConfigError(
            f"UPSTREAM_CA_FILE={path!r} cannot be read: {e.strerror}; make it readable by the gateway's user, "
            "or point UPSTREAM_CA_FILE at another PEM file"
        ) from None
    try:
        load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(
            f"UPSTREAM_CA_FILE={path!r} holds no readable PEM certificate; "
            "give a file of -----BEGIN CERTIFICATE----- blocks"
        ) from None
    return data


def _checked_redis_url(text: str) -> str:
    """
    C{REDIS_URL} as given, checked (L{_redis_url}); never shown but
    masked (L{masked_url}): it may hold a password.

    @raise ConfigError: it is not a Redis URL, or has a C{#}.
    """
    if "#" in text:
        # Redis URLs have no use for a fragment: one is an unencoded #
        # in a password (?password=top#secret, read as "top").
        raise ConfigError(
            f"REDIS_URL={masked_url(text)!r} has a # (a fragment, of no use to Redis): "
            "percent-encode a # in a password as %23"
        )
    try:
        _redis_url(text)
    except ValueError:
        raise ConfigError(
            f"REDIS_URL={masked_url(text)!r} is invalid: use redis://host:port/db, "
            "rediss://host:port/db (TLS) or unix:///path/to/redis.sock?db=N (more parameters after &, "
            "as ?db=0&password=...)"
        ) from None
    return text


def _database_number(text: str) -> bool:
    # ASCII digits only: str.isdigit() takes "²", which int() refuses.
    return not text or (text.isascii() and text.isdigit())


def _redis_url(text: str) -> str:
    """
    C{REDIS_URL} checked as L{openclaw.cluster.redis.redis_endpoint} will
    read it: the database a whole number >= 0, in the path
    (C{redis://host/N}) or as C{?db=N} (C{unix:///path?db=N}; so
    C{?db=0?password=x}, C{&} meant, is refused: its C{db} is
    C{0?password=x}).  A C{?} in a query value is the value's (RFC 3986
    3.4: C{?db=0&password=top?secret} is the password C{top?secret}).

    @raise ValueError: C{text} is no such URL.
    """
    parsed = urlsplit(text)
    databases = parse_qs(parsed.query, keep_blank_values=True).get("db", [])
    if not all(_database_number(database) for database in databases):
        raise ValueError
    if parsed.scheme in ("redis", "rediss"):
        if not parsed.hostname:
            raise ValueError
        parsed.port  # noqa: B018 (raises ValueError on a bad port)
        if not _database_number(parsed.path.strip("/")):
            raise ValueError
    elif parsed.scheme == "unix":
        if not parsed.path:
            raise ValueError
    else:
        raise ValueError
    return text


def _cluster_name(text: str) -> str:
    if not text or not all(c.isalnum() or c in "-_." for c in text):
        raise ValueError
    return text


def _trusted_links(path: Path, what: str, euid: int, fix: str) -> list[tuple[Path, os.stat_result]]:
    """
    The symbolic links met on the way to C{path} (L{_links_of}), each
    belonging to the gateway's user or root: one of another user's was
    placed by that user, who chose where it points.

    @param fix: what to do, closing the refusal.
    @raise ConfigError: one line naming the link, its owner and C{fix}.
    """
    links = _links_of(path)
    for link, held_link in links:
        if held_link.st_uid not in (euid, 0):
            raise ConfigError(
                f"{what} is reached through the symbolic link {str(link)!r}, which belongs to uid "
                f"{held_link.st_uid}, neither the gateway's user (uid {euid}) nor root, so that user chose "
                f"where it points; {fix}"
            )
    return links


def untrusted_log_file(path: Path, euid: int | None = None) -> str | None:
    """
    Why the gateway may not append to C{path} as its log file (twistd's
    C{--logfile}), or None: a symbolic link met on the way that belongs to
    neither the gateway's user nor root (its owner chose where the log
    lines go: say C{/tmp/openclaw.log -> /root/.bashrc}, as Linux's
    C{fs.protected_symlinks} would refuse to follow in a sticky
    directory), or a file there that belongs to another user.  (What is
    there but is not a regular file, a FIFO say, is refused when it is
    opened: L{openclaw.files.open_regular_file}.)

    @param euid: the gateway's user id (default: this process's).
    """
    euid = os.geteuid() if euid is None else euid
    fix = "name a log file of the gateway's own (--logfile)"
    try:
        _trusted_links(path, "the log file", euid, fix)
    except ConfigError as e:
        return str(e)
    try:
        info = path.stat()
    except OSError:
        return None  # opening it says why
    if info.st_uid not in (euid, 0):
        return (
            f"the log file belongs to uid {info.st_uid}, neither the gateway's user (uid {euid}) nor root, so that "
            f"user could read or change what is logged; {fix}, or chown {euid} it"
        )
    return None


def check_private_file(path: Path, what: str, secret: bool, euid: int | None = None) -> str | None:
    """
    Hold a file that holds secrets or settings to ssh's rule for its
    private files (sshd(8), C{StrictModes}): it must belong to the
    gateway's user or to root (so root-owned Docker and Kubernetes secrets
    and systemd credentials stay usable), and no one but its owner may
    write it.  Links are followed: the file itself is checked, and so is
    every symbolic link met on the way (C{lstat}): one that belongs to
    neither the gateway's user nor root is refused, as Linux's
    C{fs.protected_symlinks} refuses to follow another user's link in a
    sticky directory: its owner chose where it points (say
    C{/tmp/x -> /etc/passwd}).

    So are the directories it is reached through, up to C{/}, both the
    path as named (where a link sits) and the file's real one: each must
    belong to the gateway's user or root, and no one else may write it
    unless it has the sticky bit (as C{/tmp}: then others cannot rename
    or remove an entry they do not own).  Whoever can write a directory
    can replace the file in it with their own, whatever the file's mode,
    so such a file is refused, not warned about, as sshd's C{StrictModes}
    refuses it.

    @param what: how the operator named it (C{"JWT_SECRET_FILE='/etc/x'"}).
    @param secret: warn too when group or others may read it.
    @param euid: the gateway's user id (default: this process's).
    @return: a warning line, or None.
    @raise ConfigError: one line naming the file and the fix.
    """
    euid = os.geteuid() if euid is None else euid
    try:
        info = path.stat()
    except OSError:
        return None  # reading it says why, in its own words
    mode = stat.S_IMODE(info.st_mode)
    links = _trusted_links(path, what, euid, "name the file itself, or replace the link with one of your own")
    if info.st_uid not in (euid, 0):
        raise ConfigError(
            f"{what} belongs to uid {info.st_uid}, neither the gateway's user (uid {euid}) nor root, "
            f"so that user could change it; chown {euid} {str(path)!r} (or root) and chmod 600 it"
        )
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(open_to_others(path, mode, what))
    _check_directories(path, [link for link, _ in links], what, euid, "move the file")
    if secret and mode & (stat.S_IRGRP | stat.S_IROTH):
        return open_to_others(path, mode, what)
    return None


def open_to_others(path: Path, mode: int, what: str) -> str:
    """
    The line saying that group or others may read or write a private
    file, and to C{chmod 600} it: the rule of L{check_private_file}
    (which refuses a secret file others may write, and warns of one they
    may read), and of C{openclawctl --token-file}'s warning.

    @param mode: the file's permission bits (C{stat.S_IMODE}).
    @param what: how the operator named it (C{"JWT_SECRET_FILE='/etc/x'"}).
    @return: C{"<what> may be read by group or others (mode 0644); run:
        chmod 600 '<path>'"}; C{written}, or C{read and written}, as
        C{mode} has it; an empty string when C{mode} gives group and
        others neither.
    """
    readable = mode & (stat.S_IRGRP | stat.S_IROTH)
    writable = mode & (stat.S_IWGRP | stat.S_IWOTH)
    if not (readable or writable):
        return ""
    may = "read and written" if readable and writable else "written" if writable else "read"
    return f"{what} may be {may} by group or others (mode {mode:04o}); run: chmod 600 {str(path)!r}"


def _check_directories(path: Path, links: Sequence[Path], what: str, euid: int, move: str) -> None:
    """
    The rule of secret files' directories (L{check_private_file}, after
    sshd's C{StrictModes}): every directory C{path} is reached through
    (L{_directories_of}: as named, through C{links}, and as resolved, up
    to C{/}) must belong to the gateway's user or root, and no one else
    may write it unless it has the sticky bit (C{/tmp}: others cannot
    rename or remove an entry they do not own there).  Whoever can write
    a directory can replace the file in it with their own.

    @param what: how the operator named the file.
    @param move: the other way out, in the refusal (C{"move the file"}).
    @raise ConfigError: one line naming the directory and the fix.
    """
    for directory in _directories_of(path, links):
        try:
            held = directory.stat()
        except OSError:
            continue
        name = str(directory)
        if held.st_uid not in (euid, 0):
            raise ConfigError(
                f"{what} is in directory {name!r}, which belongs to uid {held.st_uid}, neither the gateway's "
                f"user (uid {euid}) nor root, so that user could replace the file; {move}, or "
                f"chown {euid} {name!r} (or root)"
            )
        dmode = stat.S_IMODE(held.st_mode)
        if dmode & (stat.S_IWGRP | stat.S_IWOTH) and not dmode & stat.S_ISVTX:
            raise ConfigError(
                f"{what} is in directory {name!r}, which group or others may write (mode {dmode:04o}), so they "
                f"could replace the file; run: chmod go-w {name!r}, or {move}"
            )


def check_private_directories(path: Path, what: str, fix: str, euid: int | None = None) -> None:
    """
    Hold the directories C{path} is reached through to the rule of secret
    files' directories (L{_check_directories}), and every symbolic link
    met on the way to L{check_private_file}'s: for a file (or directory)
    the gateway makes at C{path}, which may not be there yet, that others
    must not be able to replace.

    @param what: how the operator named it.
    @param fix: the other way out, in the refusal.
    @param euid: the gateway's user id (default: this process's).
    @raise ConfigError: one line naming the directory or link and the fix.
    """
    euid = os.geteuid() if euid is None else euid
    links = _trusted_links(path, what, euid, fix)
    _check_directories(path, [link for link, _ in links], what, euid, fix)


def check_token_directory(path: Path, what: str, euid: int | None = None) -> None:
    """
    Hold the directories of C{TOKEN_FILE} to the rule of secret files'
    directories (L{_check_directories}), and every symbolic link met on
    the way to it to L{check_private_file}'s: the token file is a secret
    the gateway writes there, beside its lock file (trial s25 F3: in a
    0777 directory, anyone could remove the lock and let a second gateway
    overwrite the first's token).  The file itself, which may not be
    there yet, is checked when the gateway starts
    (L{openclaw.session.check_token_file}).

    @param what: how the operator named it (C{"TOKEN_FILE='/run/x/token'"}).
    @param euid: the gateway's user id (default: this process's).
    @raise ConfigError: one line naming the directory or link and the fix.
    """
    fix = "point TOKEN_FILE at a new path in a directory of the gateway's own (such as /run/openclaw/token)"
    check_private_directories(path, what, fix, euid)


def check_state_directory(path: Path, what: str, fix: str, euid: int | None = None) -> str | None:
    """
    Hold the directory of the consumers' SQLite database (C{STATE_DIR}
    with C{DATABASE_URL} unset: C{openclaw.db} and its C{-wal} and C{-shm}
    files, L{openclaw.consumers.store.sqlite_file}) to the rule of secret
    files' directories (L{check_private_file}, after sshd's
    C{StrictModes}): every symbolic link met on the way to it must belong
    to the gateway's user or root, and so must it and every directory
    above it, up to C{/}, both as named and as resolved; those above it
    may be written by others only with the sticky bit, and written by
    their group (a home directory's C{~/src} made under umask 002) is a
    warning, as the group is often the gateway's user's own.

    The directory itself is held more strictly, since the gateway creates
    the database's files there by name: whoever can add an entry to it
    could be first to put a link or a database of their own under one of
    those names (trial s17 F1: a 0777 C{STATE_DIR}).  Others may not
    write it, sticky or not (as C{/tmp}); group-writable (a checkout made
    under umask 002, a Kubernetes C{fsGroup} volume, mode 2775) is a
    warning, as the group is often the gateway's user's own.  The files
    themselves are opened without following a link and refused when
    another user's (L{openclaw.consumers.store.private}).

    @param path: the state directory, which exists (made before this is
        called).
    @param what: how the operator named it (C{"STATE_DIR='/x' (from the
        environment)"}).
    @param fix: what else to do, appended after C{"or "} (C{"point
        STATE_DIR / --state-dir at a directory of the gateway's own"}).
    @param euid: the gateway's user id (default: this process's).
    @return: a warning line (group-writable), or None.
    @raise ConfigError: one line naming the directory and the fix.
    """
    euid = os.geteuid() if euid is None else euid
    links = _trusted_links(path, what, euid, f"name the directory itself, or {fix}")
    try:
        itself = path.stat()
    except OSError:
        return None  # using it says why
    warning = None
    # The directories of an entry in it: it (as named and as resolved) and those above.
    for directory in _directories_of(path / STATE_ENTRY, [link for link, _ in links]):
        try:
            held = directory.stat()
        except OSError:
            continue
        name = str(directory)
        if held.st_uid not in (euid, 0):
            raise ConfigError(
                f"{what}: directory {name!r} belongs to uid {held.st_uid}, neither the gateway's user "
                f"(uid {euid}) nor root, so that user could put files of their own in place of the consumers' "
                f"database; chown {euid} {name!r} (or root), or {fix}"
            )
        dmode = stat.S_IMODE(held.st_mode)
        if not dmode & (stat.S_IWGRP | stat.S_IWOTH):
            continue
        if (held.st_dev, held.st_ino) != (itself.st_dev, itself.st_ino):
            if dmode & stat.S_ISVTX:
                continue
            if dmode & stat.S_IWOTH:
                raise ConfigError(
                    f"{what}: directory {name!r} may be written by others (mode {dmode:04o}), so they could "
                    f"replace the state directory in it; run: chmod o-w {name!r}, or {fix}"
                )
            if warning is None:
                warning = (
                    f"{what}: directory {name!r} may be written by its group (mode {dmode:04o}), whose members "
                    f"could replace the state directory in it; unless that group is the gateway's user's alone, "
                    f"run: chmod g-w {name!r}"
                )
        elif dmode & stat.S_IWOTH and dmode & stat.S_ISVTX:
            raise ConfigError(
                f"{what}: directory {name!r} is shared (mode {dmode:04o}, as /tmp), so others could be first to "
                f"put a link or a database of their own where the gateway creates the consumers' database; {fix}"
            )
        elif dmode & stat.S_IWOTH:
            raise ConfigError(
                f"{what}: directory {name!r} may be written by others (mode {dmode:04o}), so they could put a "
                f"link or a database of their own where the gateway creates the consumers' database; run: "
                f"chmod o-w {name!r}, or {fix}"
            )
        elif warning is None:
            warning = (
                f"{what}: directory {name!r} may be written by its group (mode {dmode:04o}), whose members could "
                f"remove or replace the consumers' database files in it; unless that group is the gateway's "
                f"user's alone, run: chmod g-w {name!r}"
            )
    return warning


#: A name in the state directory, for the directories it is reached through.
STATE_ENTRY = "openclaw.db"


def _directories_of(path: Path, links: Sequence[Path] = ()) -> list[Path]:
    """
    The directories a file is reached through: those of its path as named
    (made absolute), of each link on the way and of its real path, each
    from C{/} down, once.
    """
    found: dict[Path, None] = {}
    for start in (path.absolute(), *links, path.resolve()):
        for directory in reversed(start.parents):
            found[directory] = None
    return list(found)


#: Links followed at most while resolving a path, as Linux's C{ELOOP} limit.
MAX_LINKS_FOLLOWED = 40


def _links_of(path: Path) -> list[tuple[Path, os.stat_result]]:
    """
    Every symbolic link met while resolving C{path}, component by
    component as the kernel does (path_resolution(7)), each with its own
    C{lstat}; stops at a component that cannot be read (reading the file
    then says why) or after L{MAX_LINKS_FOLLOWED} links.
    """
    found: list[tuple[Path, os.stat_result]] = []
    absolute = path.absolute()
    current = Path(absolute.anchor)
    pending = list(reversed(absolute.parts[1:]))
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent
            continue
        candidate = current / name
        try:
            info = os.lstat(candidate)
        except OSError:
            break
        if not stat.S_ISLNK(info.st_mode):
            current = candidate
            continue
        found.append((candidate, info))
        if len(found) > MAX_LINKS_FOLLOWED:
            break
        try:
            target = Path(os.readlink(candidate))
        except OSError:
            break
        if target.is_absolute():
            current = Path(target.anchor)
        pending.extend(reversed(target.parts[1:] if target.is_absolute() else target.parts))
    return found


def default_state_dir(environ: Mapping[str, str], euid: int, home: Path) -> Path:
    """
    Where a daemon keeps its state when C{STATE_DIR} is not set: systemd's
    C{$STATE_DIRECTORY} (from C{StateDirectory=}, its first entry), else
    C{$XDG_STATE_HOME/openclaw} (XDG Base Directory Specification), else
    C{/var/lib/openclaw} for root (FHS), else C{~/.local/state/openclaw}.
    """
    systemd = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return Path(systemd)
    xdg = environ.get("XDG_STATE_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "openclaw"
    if euid == 0:
        return Path("/var/lib/openclaw")
    return home / ".local" / "state" / "openclaw"


def remove_made_directories(made: Iterable[Path]) -> None:
    """
    Remove the directories made for a start that was refused (the deepest
    first), each only if it is still empty: a refusal leaves nothing behind,
    and never removes what holds something.  One that is not empty is
    passed over, not the end: through C{..}, one made may come before the
    one made in it (C{new/b/../c} made C{new/b} as well as C{new/c}).
    """
    for directory in made:
        with contextlib.suppress(OSError):
            directory.rmdir()


def _own_directory(path: Path, made: list[Path]) -> Path:
    """
    Create the default state directory, mode 0700, if it is missing
    (adding what was made to C{made}).
    """
    problem = _make_state_directory(path, made)
    if problem:
        raise ConfigError(
            f"cannot use the state directory {str(path)!r} ({problem}); "
            "create it (mode 0700) for the gateway's user, or set STATE_DIR / --state-dir"
        )
    return path


def _state_dir(text: str, made: list[Path]) -> Path:
    """
    An explicit C{STATE_DIR}, made absolute (L{_absolute}): created like
    the default one (mode 0700, parents as needed, adding what was made to
    C{made}) and checked writable now, not at the first write.
    """
    path = _absolute(text)
    problem = _make_state_directory(path, made)
    if problem:
        raise ConfigError(
            f"STATE_DIR={text!r} cannot be used ({problem}); create it (mode 0700) as a directory the "
            "gateway's user can write, or point STATE_DIR / --state-dir at one"
        )
    return path


def _make_state_directory(path: Path, made: list[Path] | None = None) -> str:
    """
    Create C{path} (mode 0700, parents as needed) if it is missing; what is
    wrong with it for the gateway's state, or C{""} if nothing.

    @param made: the directories this call created are added to it, the
        deepest first (L{remove_made_directories} takes them back): only
        those whose own C{mkdir(2)} succeeded here, never one that was
        there (through C{..}, a path can name one that was).
    """
    created: list[Path] = []
    try:
        _make_directories(path, 0o700, created)
    except FileExistsError:
        return "a file is in the way, not a directory"
    except OSError as e:
        return e.strerror or str(e)
    finally:
        if made is not None:
            made.extend(created)
    if not os.access(path, os.W_OK | os.X_OK):
        return "not writable"
    return ""


def _make_directories(path: Path, mode: int, created: list[Path]) -> None:
    """
    C{path.mkdir(mode, parents=True, exist_ok=True)}, its parents made
    with mode 0755 (which the umask may narrow: never writable by others,
    which L{check_state_directory} refuses above the state, as a parent
    made 0777 under umask 000 was), adding each directory
    it creates to the front of C{created}.

    @raise FileExistsError: something that is not a directory is in the way.
    @raise OSError: a directory cannot be made.
    """
    try:
        os.mkdir(path, mode)
    except FileNotFoundError:
        if path.parent == path:
            raise
        _make_directories(path.parent, 0o755, created)
        # Once, not again through this function: a parent that is there
        # and still answers ENOENT (procfs, /proc/x) would recurse for ever.
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            if not path.is_dir():
                raise
        else:
            created.insert(0, path)
    except OSError:
        # There already (EEXIST, or, in a directory this user may not
        # write, EACCES): as Path.mkdir's exist_ok takes it.
        if not path.is_dir():
            raise
    else:
        created.insert(0, path)


#: A password this long is masked wherever it appears in libpq's words; a
#: shorter one only where it stands whole (no letter or digit either side,
#: as a quoted value does), so that C{p} does not turn libpq's
#: C{encryption} into C{encry***tion}.
_MASK_ANYWHERE = 8


def _masked(text: str, secrets: Iterable[str], quoted: Iterable[str] = ()) -> str:
    """
    C{text} (libpq's words) with each of C{secrets} shown as C{***}: where
    it stands whole, and anywhere when it is C{_MASK_ANYWHERE} characters
    or more; and each of C{quoted} where it stands whole in double quotes,
    as libpq quotes a token of the URL.
    """
    for token in quoted:
        text = text.replace(f'"{token}"', '"***"')
    for secret in secrets:
        if len(secret) >= _MASK_ANYWHERE:
            text = text.replace(secret, "***")
        else:
            text = re.sub(rf"(?<![^\W_]){re.escape(secret)}(?![^\W_])", "***", text)
    return text


def _database_url(text: str) -> str:
    """
    C{DATABASE_URL}, a libpq connection URI
    (U{https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING-URIS}),
    as libpq reads it (psycopg's C{conninfo_to_dict}).

    @raise ConfigError: one line naming C{DATABASE_URL} and what is wrong,
        with the password in it masked (C{***}), libpq's own words included.
    """
    from psycopg import Error as PsycopgError
    from psycopg.conninfo import conninfo_to_dict

    hidden = url_passwords(text)
    fields = masked_fields(text)
    masked = masked_url(text)
    shown = f"DATABASE_URL={masked!r}"
    form = "use postgresql://user:password@host:port/database, or leave it unset for SQLite in STATE_DIR"
    try:
        parsed = urlsplit(text)
        parsed.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        raise ConfigError(f"{shown} is invalid: {form}") from None
    if parsed.scheme not in ("postgresql", "postgres") or not (parsed.hostname or parsed.query):
        raise ConfigError(f"{shown} is invalid: {form}")
    try:
        conninfo_to_dict(text)
    except PsycopgError as e:
        # The URL where libpq repeats it, masked where its password is;
        # any other repetition of the password (a token libpq quotes) too.
        said = masked.join(_masked(piece, hidden, fields) for piece in str(e).strip().split(text))
        if "percent-encoded" in said:
            hint = (
                "percent-encode a % in the user name, password or database name as %25 (@ as %40, : as %3A, / as %2F)"
            )
        elif "query parameter" in said:
            hint = "after ? use only libpq's connection parameters (https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PARAMKEYWORDS)"
        else:
            hint = form
        raise ConfigError(f"{shown} is not a connection URI libpq can read ({said}): {hint}") from None
    refused = _libpq_refusal(text)
    if refused is not None:
        said = "; ".join(line for line in (_masked(" ".join(part.split()), hidden, fields) for part in refused) if line)
        raise ConfigError(
            f"{shown} has a parameter value libpq refuses ({said}): give it one libpq takes "
            "(https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PARAMKEYWORDS)"
        )
    return text


#: What libpq says against a parameter value on any transport, wherever
#: the hosts and ports come from (fe-connect.c, C{connectOptions1},
#: C{connectOptions2}, C{PQconnectPoll}'s port check; C{parseServiceInfo}):
#: a whole line of its message.  Anything else the probe meets (its own
#: missing socket, GSSAPI refused over a UNIX socket, words of a later
#: libpq) is left for the connection itself to report.
_LIBPQ_VALUE_ERRORS = re.compile(
    "|".join(
        (
            r'invalid [\w-]+ value: ".*"',
            r'invalid integer value ".*" for connection option ".*"',
            r'invalid port number: ".*"',
            r"could not match \d+ port numbers to \d+ hosts",
            r"invalid SSL protocol version range",
            r'weak sslmode ".*" may not be used with .*',
            r'(negative )?require_auth method ".*" (cannot be mixed with .*|is specified more than once)',
            r'[\w-]+ value ".*" invalid when .* support is not compiled in',
            r'definition of service ".*" not found',
            r'service file ".*" not found',
            r'(syntax error in|line \d+ too long in|nested service specifications not supported in) service file ".*"',
        )
    )
)


def _libpq_refusal(database_url: str) -> list[str] | None:
    """
    What libpq (and psycopg) say against C{database_url}'s parameter
    values before any connection is attempted (C{sslmode=bogus},
    C{connect_timeout=abc}, C{?port=x}, an unknown C{service}), as lines;
    None when they take them.

    Asked of libpq itself, so its rules are the ones of the libpq psycopg
    runs on (C{PQconnectStart} checks the values before it connects:
    U{https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PQCONNECTSTARTPARAMS}),
    without connecting anywhere: each of the probe's hosts is
    C{os.devnull}, whose socket C{/dev/null/.s.PGSQL.N} nobody can create
    (C{connect} fails at once, C{ENOTDIR}; no file is made, none is left),
    with C{hostaddr} set empty so that C{PGHOSTADDR} does not apply.  The
    one lookup the probe may make is a service file's C{ldap://} entry
    (for C{?service=}, C{PGSERVICE}), which libpq resolves over the network
    when it meets one (U{https://www.postgresql.org/docs/current/libpq-ldap.html}).

    The probe's hosts and ports are the URL's own only: as many as the URL
    names hosts (else ports), and C{port} set empty when the URL names
    none, so that neither C{PGHOST}/C{PGPORT} nor a service file's
    C{host}/C{port} reach the probe (their counts are not the probe's to
    match: a service file with two hosts and two ports is a working URL).
    Only the lines of libpq's message that are one of its value errors
    (L{_LIBPQ_VALUE_ERRORS}) count: what depends on the transport (GSSAPI
    encryption over a UNIX socket) does not, nor the probe's own failure
    (C{connection to server on socket "/dev/null/.s.PGSQL.5432" failed:
    Not a directory}, naming C{/dev/null}).  Values libpq reads only on a
    TCP connection (C{keepalives_idle}, C{tcp_user_timeout}) are not
    checked here; C{connect_timeout} is, by L{_connect_timeout_refusal}.

    The lines are matched in English: libpq's messages as the binary
    wheel's libpq (which has no translations) writes them.  A system
    libpq that translates them (C{LANG}, C{LC_MESSAGES}) makes this
    refuse nothing: a value it refuses is then found when the gateway
    connects, which logs libpq's words and tries again with back-off.
    """
    from psycopg import pq
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    parameters = conninfo_to_dict(database_url)
    timeout = _connect_timeout_refusal(parameters.get("connect_timeout"))
    if timeout is not None:
        return [timeout]
    # libpq counts hostaddr's entries first, then host's (connectOptions2).
    hosts = str(parameters.get("hostaddr") or parameters.get("host") or parameters.get("port") or "")
    port = str(parameters.get("port") or "")
    probe = {**parameters, "host": ",".join([os.devnull] * len(hosts.split(","))), "hostaddr": "", "port": port}
    connection = pq.PGconn.connect_start(make_conninfo("", **probe).encode())
    try:
        if connection.status != pq.ConnStatus.BAD:
            return None
        said = connection.get_error_message()
    finally:
        connection.finish()
    refused = [line.strip() for line in said.splitlines() if _LIBPQ_VALUE_ERRORS.fullmatch(line.strip())]
    return refused or None


def _connect_timeout_refusal(value: object) -> str | None:
    """
    What is wrong with a URL's C{connect_timeout} (None when it has none),
    in psycopg's words (C{bad value for connect_timeout: 'abc'}), or None.

    libpq documents it as a decimal integer number of seconds
    (U{https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNECT-CONNECT-TIMEOUT}),
    but libpq does not read it here: psycopg connects with
    C{PQconnectStart}/C{PQconnectPoll}, where libpq leaves the timeout to
    the application, and reads it itself, taking a decimal number too
    (C{5.0}, truncated: U{https://github.com/psycopg/psycopg/pull/796}),
    while what is no finite number (C{abc}, C{inf}, an empty value) stops
    every connection with psycopg's error.  So the decimal integers libpq
    documents, and what Python's C{float} reads as a finite number, are
    taken; anything else is refused.
    """
    if value is None:
        return None
    try:
        seconds = float(str(value))
    except ValueError:
        seconds = math.nan
    return None if math.isfinite(seconds) else f"bad value for connect_timeout: {value!r}"


def _prices(path: str) -> Mapping[str, Price]:
    from openclaw.consumers.prices import PricesError, load_prices_file

    try:
        return load_prices_file(Path(path))
    except PricesError as e:
        raise ConfigError(f"{e}; see README.rst, Consumers, for the form") from None


def _jwt_secret(text: str) -> bytes:
    """
    C{JWT_SECRET} as bytes (UTF-8); empty for none (a random secret for
    the process).

    @raise ConfigError: it is shorter than L{MIN_SECRET_BYTES}, or not
        UTF-8; the line never shows it.
    """
    try:
        secret = text.encode("utf-8")
    except UnicodeEncodeError:
        # Bytes the environment could not decode (os.environ's
        # surrogateescape): never shown.
        raise ConfigError(
            "JWT_SECRET holds bytes that are not UTF-8; use a secret of printable characters, such as one made "
            "with: python3 -c 'import secrets; print(secrets.token_urlsafe(48))'"
        ) from None
    if secret:
        _check_secret_length(secret, "JWT_SECRET is")
    return secret


def _check_secret_length(secret: bytes, what: str) -> None:
    """
    Refuse an HS256 secret shorter than L{MIN_SECRET_BYTES} (RFC 7518
    section 3.2: a key at least as long as the hash).

    @param what: the start of the line (C{"JWT_SECRET is"}).
    @raise ConfigError: it is.
    """
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{what} {len(secret)} bytes long; it must be at least {MIN_SECRET_BYTES} bytes (RFC 7518 "
            "section 3.2). Generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(48))'"
        )


#: The most bytes of C{JWT_SECRET_FILE} read: a secret is a few dozen.
MAX_SECRET_FILE_BYTES = 64 * 1024


def _read_secret_file(path: str, warnings: list[str] | None = None) -> bytes:
    """
    The secret in a file (systemd credentials, Docker and Kubernetes
    secrets), without the trailing newline editors and C{echo} add.  Only
    a regular file of at most L{MAX_SECRET_FILE_BYTES} is read (a FIFO
    would hang start-up, a device never end), without waiting on it
    (L{read_regular_file}); links are followed, as Kubernetes mounts its
    secrets, and vetted by L{check_private_file}, whose warning is
    appended to C{warnings}.

    @raise ConfigError: it cannot be read, is no regular file, is refused
        by L{check_private_file}, or holds a secret shorter than
        L{MIN_SECRET_BYTES}.
    """
    what = f"JWT_SECRET_FILE={path!r}"
    fix = "point JWT_SECRET_FILE at a regular file holding the secret"
    try:
        info = os.stat(path)
    except OSError as e:
        raise ConfigError(
            f"{what} cannot be read: {e.strerror}; make it readable by the gateway's user, or {fix}"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{what} is {kind_of(info.st_mode)}, not a regular file; {fix}")
    warning = check_private_file(Path(path), what, secret=True)
    if warning is not None and warnings is not None:
        warnings.append(warning)
    try:
        secret = read_regular_file(Path(path), MAX_SECRET_FILE_BYTES, follow_links=True).rstrip(b"\r\n")
    except NotARegularFile as e:
        raise ConfigError(f"{what} is refused: {e}; {fix} (a secret is a few dozen bytes)") from None
    except OSError as e:
        raise ConfigError(
            f"{what} cannot be read: {e.strerror}; make it readable by the gateway's user, or {fix}"
        ) from None
    if not secret:
        raise ConfigError(f"{what} is empty; put a secret of 32 bytes or more in it")
    _check_secret_length(secret, f"the secret in {what} is")
    return secret


#: How env files are read: UTF-8, a byte-order mark at the start ignored.
ENV_FILE_ENCODING = "utf-8-sig"


@attrs.frozen
class EnvFile:
    """
    The env file read (L{_open_repository}), as L{check_private_file}
    names it.
    """

    path: Path
    #: How refusals and warnings name it: C{"env file '/x' (--env-file)"}.
    what: str


def _open_repository(env_file: str | None, cwd: Path) -> tuple[RepositoryEmpty, EnvFile | None]:
    """
    The env file to read: the one named, else C{.env} in the working
    directory if present.  (decouple's C{AutoConfig} would search from this
    module's directory, which is site-packages once installed.)  Read as
    L{ENV_FILE_ENCODING}: UTF-8, a byte-order mark ignored.  Held to
    L{check_private_file}'s rule before it is read; whether others may
    read it is told once its secrets are known (L{env_file_secrets}).

    @return: its contents, and the file (L{None}: none is read).
    """
    if env_file is not None:
        path = Path(env_file)
        if not path.is_file():
            raise ConfigError(f"--env-file {env_file!r} does not exist or is not a file")
        what = f"env file {env_file!r} (--env-file)"
    else:
        path = cwd / ".env"
        if not path.is_file():
            return RepositoryEmpty(), None
        what = f"env file {str(path)!r} (.env in the working directory)"
    check_private_file(path, what, secret=False)
    try:
        # utf-8-sig: a byte-order mark some editors write first is no part
        # of the first name (it made GATEWAY_API_KEYS an unknown setting).
        return RepositoryEnv(str(path), encoding=ENV_FILE_ENCODING), EnvFile(path, what)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read env file {str(path)!r}: {e}") from None


def secret_settings(declared: Iterable[type[ProviderAdapter]]) -> frozenset[str]:
    """
    The settings whose values are secrets: C{JWT_SECRET},
    C{GATEWAY_API_KEYS}, and each of the C{declared} providers' key
    variables (its C{key_variables}, its C{<ID>_API_KEYS}).  A refusal
    never shows their values.
    """
    names = {"JWT_SECRET", "GATEWAY_API_KEYS"}
    for adapter in declared:
        names.update(adapter.key_variables)
        names.add(adapter.key_list_variable())
    return frozenset(names)


def env_file_secrets(values: Mapping[str, str], declared: Iterable[type[ProviderAdapter]]) -> list[str]:
    """
    The settings an env file (C{values}: its names and values) gives a
    secret, in the file's order: a non-empty C{JWT_SECRET} or
    C{GATEWAY_API_KEYS}, a key of one of the C{declared} providers (each of
    its C{key_variables}, its C{<ID>_API_KEYS}), a C{REDIS_URL} or
    C{DATABASE_URL} holding a password (L{url_passwords}).  Such a file is
    held to the rule of a secret file: a warning when group or others may
    read it (L{check_private_file}).
    """
    secret_names = secret_settings(declared)
    return [
        name
        for name, value in values.items()
        if value.strip() and (name in secret_names or (name in ("REDIS_URL", "DATABASE_URL") and url_passwords(value)))
    ]


def load_settings(
    options: Mapping[str, Any] | None = None,
    env_file: str | None = None,
    cwd: Path | None = None,
    make_secret: Callable[[], bytes] = lambda: secrets.token_bytes(32),
    providers: Iterable[type[ProviderAdapter]] | None = None,
    daemon: bool = False,
) -> Settings:
    """
    Build the L{Settings} from options, environment, env file and defaults.

    @param options: plugin options already given on the command line, keyed by
        variable name (C{{"WS_CONTROL_PORT": "9000"}}); L{None} values are
        treated as not given.
    @param cwd: where C{.env} is looked for, and the state directory of
        a foreground run without C{STATE_DIR} (default: the working
        directory).  Relative path settings are taken against the working
        directory (L{_absolute}).
    @param providers: the provider declarations (adapter classes) whose
        variables are read, in order; by default L{builtin_providers}.
    @param daemon: the gateway runs as a daemon (twistd without C{-n}):
        without C{STATE_DIR}, state goes to a directory of its own
        (L{default_state_dir}, created 0700), not the working directory;
        so it does under systemd (C{$STATE_DIRECTORY} set) too.
    @raise ConfigError: a value is invalid; the message names it.  The
        directories made for the state (L{Settings.made_directories}) are
        removed again first, when still empty.
    """
    made: list[Path] = []
    try:
        return _load_settings(options, env_file, cwd, make_secret, providers, daemon, made)
    except BaseException:
        remove_made_directories(made)
        raise


@attrs.define
class _Reader:
    """
    Reads settings by name, for L{load_settings}: from the command line
    (plugin options), else the environment, else the env file, as
    decouple's L{Config} looks them up; and keeps what it read.

    @ivar given: the options given on the command line, by variable name
        (none L{None}).
    @ivar config: the environment and the env file.
    @ivar env_path: the env file, as a message names it.
    @ivar secret_names: the settings whose value a refusal never shows
        (L{secret_settings}).
    @ivar known: every setting name looked up, for the env file's
        misspellings (L{misspelt_settings}).
    @ivar sources: where each value read came from, by name
        (L{Settings.sources}), in the order read.
    """

    given: Mapping[str, Any]
    config: Config
    env_path: str
    secret_names: frozenset[str]
    known: set[str] = attrs.Factory(set)
    sources: dict[str, str] = attrs.Factory(dict)

    def source(self, name: str) -> str:
        """
        Where the value of C{name} came from, for an error message.
        """
        if name in self.given:
            return "from the command line"
        if name in os.environ:
            return "from the environment"
        return f"from env file {self.env_path!r}"

    def given_where(self, name: str) -> str:
        """
        Where the value of C{name} came from, for an error message, the
        default included.
        """
        if self.config.get(name, default=None) is None and name not in self.given:
            return "the default"
        return self.source(name)

    def read(self, name: str, cast: Callable[[str], T], default: T, hint: str) -> T:
        """
        The value of setting C{name} given C{cast}, else C{default}.  A
        bad one is refused in one line that says where it came from: the
        L{ConfigError} C{cast} raises, else C{name}, the value and C{hint}.
        """
        self.known.add(name)
        raw = self.given.get(name)
        if raw is None:
            raw = self.config.get(name, default=None)
        if raw is None:
            return default
        self.sources[name] = self.source(name)
        try:
            return cast(str(raw))
        except ConfigError as e:
            raise ConfigError(f"{e} (the value came {self.source(name)})") from None
        except ValueError as e:
            # A secret is never shown, nor a URL's user, password and query
            # (a provider's base URL refuses them).
            if name in self.secret_names:
                raise ConfigError(f"{name} ({self.source(name)}) is invalid: {hint or e}") from None
            shown = _without_credentials(str(raw))
            why = f"{e}; " if isinstance(e, InvalidValue) else ""
            if _TRAILING_COMMENT.search(str(raw)):
                hint = f"{hint} ({_COMMENT_IS_VALUE})"
            raise ConfigError(f"{name}={shown!r} ({self.source(name)}) is invalid: {why}{hint}") from None


def _read_jwt_secret(reader: _Reader, warnings: list[str]) -> bytes:
    """
    The secret tokens are signed with: C{JWT_SECRET}, or what the file
    C{JWT_SECRET_FILE} names holds; C{b""} when neither is set.

    @param warnings: where a warning about the file is added
        (L{_read_secret_file}).
    @raise ConfigError: both are set, or the one set is refused.
    """
    no_secret = b""
    secret_file = reader.read("JWT_SECRET_FILE", str, "", "")
    if secret_file and reader.read("JWT_SECRET", str, "", ""):
        raise ConfigError(
            f"JWT_SECRET ({reader.source('JWT_SECRET')}) and JWT_SECRET_FILE ({reader.source('JWT_SECRET_FILE')}) "
            "are both set; keep only one"
        )
    if secret_file:
        return reader.read("JWT_SECRET_FILE", lambda path: _read_secret_file(path, warnings), no_secret, "")
    return reader.read("JWT_SECRET", _jwt_secret, no_secret, "")


def _declared_ids(declared: tuple[type[ProviderAdapter], ...]) -> list[str]:
    """
    The ids of the declared providers, in order.

    @raise ConfigError: none is declared, or a declaration is refused
        (L{openclaw.providers.base.check_declarations}).
    """
    ids = [adapter.id for adapter in declared]
    if not ids:
        raise ConfigError(
            "no provider is declared: pass load_settings at least one ProviderAdapter class "
            "(openclaw.settings.builtin_providers() lists the built-in ones)"
        )
    from openclaw.providers.base import ProviderDeclarationError, check_declarations

    try:
        check_declarations(declared)
    except ProviderDeclarationError as e:
        raise ConfigError(str(e)) from None
    return ids


def _read_provider(reader: _Reader, adapter: type[ProviderAdapter]) -> ProviderSettings:
    """
    One provider's settings, from the variables its adapter declares: its
    key (the first of C{key_variables} set) and more keys (its
    C{key_list_variable}), one pool without repeats; its base URL (the
    first of C{base_url_variable} and its aliases set), its model and its
    fallback model.
    """
    key = ""
    for variable in adapter.key_variables:
        key = reader.read(variable, _provider_key, "", "")
        if key:
            break
    no_keys: tuple[str, ...] = ()
    more = reader.read(adapter.key_list_variable(), _provider_keys, no_keys, "")
    pool = tuple(dict.fromkeys(((key,) if key else ()) + more))
    base_url = adapter.default_base_url
    for variable in (adapter.base_url_variable, *adapter.base_url_aliases):
        url = reader.read(variable, _url, None, "use an http:// or https:// URL")
        if url is not None:
            base_url = url
            break
    return ProviderSettings(
        adapter=adapter,
        base_url=base_url,
        model=reader.read(
            adapter.model_variable,
            _model_name,
            adapter.default_model_id,
            f"or unset it for the default, {adapter.default_model_id}",
        ),
        api_key=pool[0] if pool else None,
        api_keys=pool[1:],
        fallback_model=reader.read(
            adapter.fallback_model_variable(),
            _model_name,
            None,
            f"or unset it to fail over to {adapter.model_variable}'s model",
        ),
    )


def _read_cluster_size(reader: _Reader, secret: bytes, defaults: Settings) -> tuple[str | None, int]:
    """
    C{REDIS_URL} and C{WORKERS}, each held to the setting it needs as soon
    as it is read: several instances share tokens, which they must all
    sign with the same secret, and several workers share state through
    Redis.

    @param secret: the secret read (L{_read_jwt_secret}); C{b""}: none.
    @return: the Redis URL (L{None}: unset) and the number of workers.
    @raise ConfigError: either is refused; C{REDIS_URL} is set without
        C{JWT_SECRET} (or C{JWT_SECRET_FILE}); C{WORKERS} is above 1
        without C{REDIS_URL}.
    """
    no_url: str | None = None
    redis_url = reader.read("REDIS_URL", lambda text: _checked_redis_url(text) if text else None, no_url, "")
    if redis_url and not secret:
        raise ConfigError(
            f"REDIS_URL is set ({reader.source('REDIS_URL')}) but JWT_SECRET (or JWT_SECRET_FILE) is not: every "
            "instance of a cluster must sign tokens with the same secret; set JWT_SECRET to the same 32 bytes or "
            "more on each"
        )
    workers = reader.read(
        "WORKERS",
        _whole_number(1, MAX_WORKERS),
        defaults.workers,
        f"use a whole number of processes from 1 to {MAX_WORKERS}, such as 2",
    )
    if workers > 1 and not redis_url:
        raise ConfigError(
            f"WORKERS (--workers)={workers} ({reader.source('WORKERS')}) needs REDIS_URL: the workers share the "
            "token, route and lockouts through Redis; set REDIS_URL or use --workers 1"
        )
    return redis_url, workers


@attrs.frozen
class _StateDirectory:
    """
    The state directory, as L{check_state_directory} is told of it.
    """

    path: Path
    #: How a message names it: C{"STATE_DIR='/x' (from the environment)"}.
    named: str
    #: What to do when it is refused.
    fix: str


def _read_state_dir(reader: _Reader, cwd: Path, daemon: bool, made: list[Path]) -> _StateDirectory:
    """
    The state directory: C{STATE_DIR}, made if missing; else a daemon's
    own (L{default_state_dir}, made if missing) when C{daemon} or under
    systemd (C{$STATE_DIRECTORY} set); else C{cwd}.

    @param made: where the directories made are added.
    @raise ConfigError: it cannot be used or made.
    """
    no_state_dir: Path | None = None
    state_dir = reader.read("STATE_DIR", lambda text: _state_dir(text, made) if text else None, no_state_dir, "")
    if state_dir is not None:
        return _StateDirectory(
            path=state_dir,
            named=f"STATE_DIR={str(state_dir)!r} ({reader.source('STATE_DIR')})",
            fix="point STATE_DIR / --state-dir at a directory of the gateway's own",
        )
    fix = "set STATE_DIR / --state-dir to a directory of the gateway's own"
    if daemon or os.environ.get("STATE_DIRECTORY"):
        path = _own_directory(_absolute(default_state_dir(os.environ, os.geteuid(), Path.home())), made)
        return _StateDirectory(path=path, named=f"the state directory {str(path)!r}", fix=fix)
    path = cwd.absolute()
    named = f"the state directory {str(path)!r} (the working directory: STATE_DIR is unset)"
    return _StateDirectory(path=path, named=named, fix=fix)


def _load_settings(
    options: Mapping[str, Any] | None,
    env_file: str | None,
    cwd: Path | None,
    make_secret: Callable[[], bytes],
    providers: Iterable[type[ProviderAdapter]] | None,
    daemon: bool,
    made: list[Path],
) -> Settings:
    """
    L{load_settings}, adding the directories it makes to C{made}.
    """
    given = {k: v for k, v in (options or {}).items() if v is not None}
    base = cwd or Path.cwd()
    repository, read_env_file = _open_repository(env_file, base)
    defaults = Settings(jwt_secret=b"", jwt_secret_is_ephemeral=True)
    declared = tuple(builtin_providers() if providers is None else providers)
    env_path = env_file or str(base / ".env")
    reader = _Reader(given, Config(repository), env_path, secret_settings(declared))
    warnings: list[str] = []
    secret = _read_jwt_secret(reader, warnings)
    ids = _declared_ids(declared)
    # The built-in default when declared, else the first declared.
    default_provider = defaults.default_provider if defaults.default_provider in ids else ids[0]
    id_list = " or ".join(", ".join(ids).rsplit(", ", 1))

    def provider_id(text: str) -> str:
        if text not in ids:
            raise ValueError
        return text

    redis_url, workers = _read_cluster_size(reader, secret, defaults)
    embedding = _read_embedding_model(reader.read, declared, defaults)
    no_pem: bytes | None = None
    ca_pem = reader.read("UPSTREAM_CA_FILE", lambda text: _ca_file(text) if text else None, no_pem, "")
    no_prices: Mapping[str, Price] = {}
    state = _read_state_dir(reader, base, daemon, made)
    # After the state directory, which is made if missing: a token file
    # in it is then in a directory that exists.
    no_path: Path | None = None
    token_file = reader.read("TOKEN_FILE", lambda text: _writable_file(text) if text else None, no_path, "")

    settings = Settings(
        port=reader.read("WS_CONTROL_PORT", _port, defaults.port, _PORT_HINT),
        interface=reader.read("INTERFACE", _interface, "", _INTERFACE_HINT) or default_interface(),
        session_ttl_hours=reader.read(
            "SESSION_TTL_HOURS",
            _hours,
            defaults.session_ttl_hours,
            f"use a number of hours of at least {MIN_SESSION_TTL_SECONDS} seconds "
            f"({MIN_SESSION_TTL_SECONDS / 3600:.4f}) and at most {MAX_SESSION_TTL_HOURS} "
            "(10 years), such as 24 or 0.5",
        ),
        jwt_secret=secret or make_secret(),
        jwt_secret_is_ephemeral=not secret,
        trusted_clients=reader.read(
            "TRUSTED_CLIENT_IPS",
            _networks,
            defaults.trusted_clients,
            f"{_NETWORKS_HINT}, such as 127.0.0.1,::1,10.0.0.0/8",
        ),
        default_provider=reader.read("DEFAULT_PROVIDER", provider_id, default_provider, f"use {id_list}"),
        providers=[_read_provider(reader, adapter) for adapter in declared],
        token_file=token_file,
        health_check_timeout=reader.read(
            "HEALTH_CHECK_TIMEOUT",
            _seconds(MIN_DEADLINE_SECONDS),
            defaults.health_check_timeout,
            f"{_DEADLINE_HINT}, such as 5",
        ),
        log_level=reader.read(
            "LOG_LEVEL", _log_level, defaults.log_level, "use debug, info, warn (or warning), error or critical"
        ),
        api_port=reader.read("API_PORT", _port, defaults.api_port, _PORT_HINT),
        gateway_api_keys=reader.read("GATEWAY_API_KEYS", _gateway_keys, (), "use comma-separated keys"),
        upstream_timeout=reader.read(
            "UPSTREAM_TIMEOUT",
            _seconds(MIN_DEADLINE_SECONDS),
            defaults.upstream_timeout,
            f"{_DEADLINE_HINT}, such as 60",
        ),
        max_request_bytes=reader.read(
            "MAX_REQUEST_BYTES",
            _whole_number(1, MAX_REQUEST_BODY_BYTES),
            defaults.max_request_bytes,
            f"use a whole number of bytes from 1 to {MAX_REQUEST_BODY_BYTES} (1 GiB)",
        ),
        upstream_pool_size=reader.read(
            "UPSTREAM_POOL_SIZE", _whole_number(1, MAX_CONNECTION_COUNT), defaults.upstream_pool_size, _CONNECTIONS_HINT
        ),
        upstream_idle_seconds=reader.read(
            "UPSTREAM_IDLE_SECONDS",
            _seconds(0, above=True),
            defaults.upstream_idle_seconds,
            f"{_ABOVE_ZERO_SECONDS_HINT}, such as 50",
        ),
        upstream_ca_pem=ca_pem,
        embedding_provider=embedding[0],
        embedding_model=embedding[1],
        control_listen=reader.read("CONTROL_LISTEN", _listener, None, f"{_ENDPOINT_HINT} tcp:18789"),
        api_listen=reader.read("API_LISTEN", _listener, None, f"{_ENDPOINT_HINT} tcp:18790"),
        metrics_listen=reader.read("METRICS_LISTEN", _listener, None, f"{_ENDPOINT_HINT} tcp:9108"),
        state_dir=state.path,
        log_format=reader.read("LOG_FORMAT", _log_format, defaults.log_format, "use text or json"),
        shutdown_grace_seconds=reader.read(
            "SHUTDOWN_GRACE_SECONDS",
            _seconds(0),
            defaults.shutdown_grace_seconds,
            f"use a number of seconds, 0 or more and {_AT_MOST}",
        ),
        allowed_origins=reader.read(
            "ALLOWED_ORIGINS", _origins, (), "use comma-separated scheme://host[:port] origins"
        ),
        trusted_proxies=reader.read("TRUSTED_PROXIES", _networks, (), _NETWORKS_HINT),
        max_message_bytes=reader.read(
            "MAX_MESSAGE_BYTES",
            _whole_number(MIN_MESSAGE_BYTES, MAX_CONTROL_MESSAGE_BYTES),
            defaults.max_message_bytes,
            f"use a whole number of bytes from {MIN_MESSAGE_BYTES} (the answers of rotate_token and "
            f"consumer_create must fit) to {MAX_CONTROL_MESSAGE_BYTES} (64 MiB)",
        ),
        max_connections=reader.read(
            "MAX_CONNECTIONS", _whole_number(1, MAX_CONNECTION_COUNT), defaults.max_connections, _CONNECTIONS_HINT
        ),
        handshake_timeout_seconds=reader.read(
            "HANDSHAKE_TIMEOUT_SECONDS",
            _timer_seconds,
            defaults.handshake_timeout_seconds,
            _TIMER_HINT,
        ),
        ping_interval_seconds=reader.read(
            "PING_INTERVAL_SECONDS",
            _timer_seconds,
            defaults.ping_interval_seconds,
            _TIMER_HINT,
        ),
        ping_timeout_seconds=reader.read(
            "PING_TIMEOUT_SECONDS",
            _timer_seconds,
            defaults.ping_timeout_seconds,
            _TIMER_HINT,
        ),
        max_auth_failures=reader.read(
            "MAX_AUTH_FAILURES",
            _whole_number(1, MAX_AUTH_FAILURE_COUNT),
            defaults.max_auth_failures,
            f"use a whole number of failed authentications from 1 to {MAX_AUTH_FAILURE_COUNT}, such as 5",
        ),
        fallback=reader.read(
            "FALLBACK",
            _fallback(ids),
            defaults.fallback,
            f"use auto (fail over to the next provider in the order {', '.join(ids)}), off, or a comma-separated "
            "list of provider ids giving the order",
        ),
        breaker_failures=reader.read(
            "BREAKER_FAILURES",
            _whole_number(1, MAX_BREAKER_FAILURES),
            defaults.breaker_failures,
            f"use a whole number of consecutive failures from 1 to {MAX_BREAKER_FAILURES}, such as 5",
        ),
        breaker_cooldown_seconds=reader.read(
            "BREAKER_COOLDOWN_SECONDS",
            _seconds(0, above=True),
            defaults.breaker_cooldown_seconds,
            f"{_ABOVE_ZERO_SECONDS_HINT}, such as 30",
        ),
        redis_url=redis_url,
        cluster_name=reader.read(
            "CLUSTER_NAME", _cluster_name, defaults.cluster_name, "use letters, digits, '-', '_' or '.'"
        ),
        redis_timeout_seconds=reader.read(
            "REDIS_TIMEOUT_SECONDS",
            _seconds(MIN_REDIS_SECONDS),
            defaults.redis_timeout_seconds,
            f"{_REDIS_SECONDS_HINT}, such as 1",
        ),
        redis_reconnect_max_seconds=reader.read(
            "REDIS_RECONNECT_MAX_SECONDS",
            _seconds(MIN_REDIS_SECONDS),
            defaults.redis_reconnect_max_seconds,
            f"{_REDIS_SECONDS_HINT}, such as 5",
        ),
        workers=workers,
        api_max_connections=reader.read(
            "API_MAX_CONNECTIONS",
            _whole_number(1, MAX_CONNECTION_COUNT),
            defaults.api_max_connections,
            f"{_CONNECTIONS_HINT}, such as 4096",
        ),
        api_max_connections_per_address=reader.read(
            "API_MAX_CONNECTIONS_PER_ADDRESS",
            _whole_number(1, MAX_CONNECTION_COUNT),
            defaults.api_max_connections_per_address,
            f"{_CONNECTIONS_HINT}, or leave it unset for a quarter of API_MAX_CONNECTIONS",
        ),
        api_header_timeout_seconds=reader.read(
            "API_HEADER_TIMEOUT_SECONDS",
            _seconds(MIN_DEADLINE_SECONDS),
            defaults.api_header_timeout_seconds,
            f"{_DEADLINE_HINT}, such as 10",
        ),
        api_body_timeout_seconds=reader.read(
            "API_BODY_TIMEOUT_SECONDS",
            _seconds(MIN_DEADLINE_SECONDS),
            defaults.api_body_timeout_seconds,
            f"{_DEADLINE_HINT}, such as 30",
        ),
        api_send_timeout_seconds=reader.read(
            "API_SEND_TIMEOUT_SECONDS",
            _seconds(MIN_DEADLINE_SECONDS),
            defaults.api_send_timeout_seconds,
            f"{_DEADLINE_HINT}, such as 60",
        ),
        api_http2=reader.read("API_HTTP2", strtobool, defaults.api_http2, "use on or off"),
        metrics_allowed_hosts=reader.read(
            "METRICS_ALLOWED_HOSTS",
            _host_names,
            defaults.metrics_allowed_hosts,
            "use comma-separated host names or IP addresses without ports, such as gw.internal,10.0.0.5",
        ),
        auth_lockout_failures=reader.read(
            "AUTH_LOCKOUT_FAILURES",
            _whole_number(1, MAX_AUTH_FAILURE_COUNT),
            defaults.auth_lockout_failures,
            f"use a whole number of failed authentications from 1 to {MAX_AUTH_FAILURE_COUNT}, such as 10 (list "
            "an address never to be locked out in AUTH_LOCKOUT_EXEMPT)",
        ),
        auth_lockout_window_seconds=reader.read(
            "AUTH_LOCKOUT_WINDOW_SECONDS",
            _seconds(0, above=True),
            defaults.auth_lockout_window_seconds,
            f"{_ABOVE_ZERO_SECONDS_HINT}, such as 60",
        ),
        auth_lockout_seconds=reader.read(
            "AUTH_LOCKOUT_SECONDS",
            _seconds(0, above=True),
            defaults.auth_lockout_seconds,
            f"{_ABOVE_ZERO_SECONDS_HINT}, such as 300",
        ),
        auth_lockout_exempt=reader.read(
            "AUTH_LOCKOUT_EXEMPT",
            _networks,
            defaults.auth_lockout_exempt,
            f"{_NETWORKS_HINT}, such as 127.0.0.1,::1",
        ),
        database_url=reader.read(
            "DATABASE_URL",
            _database_url,
            None,
            "use postgresql://user:password@host:port/database, or leave it unset for SQLite in STATE_DIR",
        ),
        usage_retention_days=reader.read(
            "USAGE_RETENTION_DAYS",
            _whole_number(1, MAX_USAGE_RETENTION_DAYS),
            defaults.usage_retention_days,
            f"use a whole number of days from 1 to {MAX_USAGE_RETENTION_DAYS} (100 years), such as 90",
        ),
        price_overrides=reader.read("PRICES_FILE", lambda path: _prices(path) if path else no_prices, no_prices, ""),
        auth_timeout_seconds=reader.read(
            "AUTH_TIMEOUT_SECONDS",
            _seconds(MIN_DEADLINE_SECONDS),
            defaults.auth_timeout_seconds,
            f"{_DEADLINE_HINT}, such as 10",
        ),
        api_keyless_connections_per_address=reader.read(
            "API_KEYLESS_CONNECTIONS_PER_ADDRESS",
            _whole_number(1, MAX_CONNECTION_COUNT),
            defaults.api_keyless_connections_per_address,
            f"{_CONNECTIONS_HINT}, or leave it unset for a sixteenth of API_MAX_CONNECTIONS",
        ),
        api_keyless_timeout_seconds=reader.read(
            "API_KEYLESS_TIMEOUT_SECONDS",
            _seconds(MIN_DEADLINE_SECONDS),
            defaults.api_keyless_timeout_seconds,
            f"{_DEADLINE_HINT}, such as 5",
        ),
        consumer_reserve_tokens=reader.read(
            "CONSUMER_RESERVE_TOKENS",
            _whole_number(1, MAX_RESERVE_TOKENS),
            defaults.consumer_reserve_tokens,
            f"use a whole number of completion tokens from 1 to {MAX_RESERVE_TOKENS} (reserved of a consumer's "
            "budget per call in flight), such as 1000",
        ),
    )

    _distinct_ports(settings, reader.given_where)
    if not settings.trusted_clients and not (settings.control_listen or "").startswith("unix:"):
        # Allowed (a unix: listener's clients need no address), but with
        # a TCP control listener no client can ever connect.
        warnings.append(
            f"TRUSTED_CLIENT_IPS is empty ({reader.source('TRUSTED_CLIENT_IPS')}): every control-plane connection over TCP "
            "is refused; list the addresses that may connect (such as 127.0.0.1,::1), or unset it for the default"
        )
    if settings.database_url is None:
        # SQLite: the consumers' database is created in it by name.
        state_warning = check_state_directory(state.path, state.named, state.fix)
        if state_warning is not None:
            warnings.append(state_warning)
    for adapter in declared:
        reader.known.update(adapter.variables())
    if read_env_file is not None:
        held = env_file_secrets(_env_file_values(repository), declared)
        if held:
            names = " and ".join(", ".join(held).rsplit(", ", 1))
            readable = check_private_file(
                read_env_file.path, f"{read_env_file.what}, which holds {names},", secret=True
            )
            if readable is not None:
                warnings.append(readable)
    if isinstance(repository, RepositoryEnv):
        warnings.extend(unread_lines(env_path))
    warnings.extend(misspelt_settings(_env_file_keys(repository), reader.known, env_path))
    # The environment too: systemd's EnvironmentFile= hands an env file's
    # lines over as variables.
    warnings.extend(misspelt_settings(os.environ, reader.known, None))
    return attrs.evolve(settings, warnings=tuple(warnings), sources=reader.sources, made_directories=tuple(made))


def _distinct_ports(settings: Settings, given_where: Callable[[str], str]) -> None:
    """
    Check that the control plane and the API do not ask for the same TCP
    port: when both listen as ports (C{WS_CONTROL_PORT}, C{API_PORT}; no
    C{CONTROL_LISTEN} or C{API_LISTEN} in their place) they share
    C{INTERFACE}, so one port for both cannot be bound twice.  Port 0 (any
    free port) never clashes.  Endpoint strings (C{CONTROL_LISTEN},
    C{API_LISTEN}, C{METRICS_LISTEN}) are not compared: a clash between
    them is told, in one line, when the second one cannot listen.

    @param given_where: where a setting's value came from, by name.
    @raise ConfigError: both are the same port; the message says which to
        change, and how.
    """
    if settings.control_listen is not None or settings.api_listen is not None:
        return
    if settings.port == 0 or settings.port != settings.api_port:
        return
    raise ConfigError(
        f"WS_CONTROL_PORT and API_PORT are both {settings.port} (WS_CONTROL_PORT {given_where('WS_CONTROL_PORT')}, "
        f"API_PORT {given_where('API_PORT')}): the control plane and the API need a port each; "
        "change one (--port or --api-port)"
    )


def _env_file_keys(repository: RepositoryEmpty) -> list[str]:
    return list(_env_file_values(repository))


def _env_file_values(repository: RepositoryEmpty) -> dict[str, str]:
    """
    The names and values an env file holds, as decouple read them (none
    for L{RepositoryEmpty}).
    """
    data = getattr(repository, "data", None)
    return {str(name): str(value) for name, value in data.items()} if isinstance(data, dict) else {}


def unread_lines(path: str) -> list[str]:
    """
    A warning for each line of the env file at C{path} that python-decouple's
    C{RepositoryEnv} skips or reads as nothing although it is neither
    blank nor a comment: a line holding no C{=}, or no name before its
    first C{=} (decouple reads the file as UTF-8, a byte-order mark
    ignored (L{ENV_FILE_ENCODING}), line by line;
    after stripping whitespace it skips an empty line, one starting with
    C{#} and one without C{=}, and reads any other as C{NAME=VALUE}).  The
    warning gives the line's number, not its text, which may hold a secret.
    A file that cannot be read again (changed since decouple read it) gets
    none.  A name given on more than one line gets a warning too, naming
    the lines: decouple keeps the last.
    """
    numbers: list[int] = []
    #: name -> the lines that give it.
    given: dict[str, list[int]] = {}
    try:
        with open(path, encoding=ENV_FILE_ENCODING) as lines:
            for number, line in enumerate(lines, 1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                name = text.partition("=")[0].strip()
                if "=" not in text or not name:
                    numbers.append(number)
                else:
                    given.setdefault(name, []).append(number)
    except (OSError, UnicodeDecodeError):
        return []
    warnings = [
        f"env file {path!r}: line {number} is not NAME=VALUE: ignored; write it as NAME=VALUE, "
        "or start it with # to keep it as a comment"
        for number in numbers
    ]
    warnings += [
        f"env file {path!r}: {name} is set on lines {', '.join(map(str, found))}: only the last counts; keep one"
        for name, found in given.items()
        if len(found) > 1
    ]
    return warnings


def misspelt_settings(keys: Iterable[str], known: Iterable[str], where: str | None) -> list[str]:
    """
    A warning for each of C{keys} (an env file's) that is no setting but
    close to one (L{openclaw.spelling.meant}): C{GEMINI_MODLE} names
    C{GEMINI_MODEL}, and C{export GEMINI_MODEL} (a shell's line, which
    decouple reads as a key with C{export} in it) says to drop the
    C{export}.  Keys close to nothing are left alone: an env file may
    serve other programs too.

    @param where: the env file's path; None for the environment (what
        systemd's C{EnvironmentFile=} gives).
    """
    origin = "environment" if where is None else f"env file {where!r}"
    names = sorted(set(known))
    warnings = []
    for key in keys:
        if key in names:
            continue
        word, _, rest = key.partition(" ")
        if word == "export" and rest.strip():
            # A shell's "export NAME=VALUE": decouple reads the key as "export NAME".
            name = rest.strip()
            close = meant(name, names)
            if close is not None:
                warnings.append(
                    f"{origin}: export {name}= is ignored (the key read is {key!r}); "
                    f"write it as {close}=VALUE, without export"
                )
            continue
        # Names are upper case: gemini_model is GEMINI_MODEL's typo too
        # (L{meant} ignores case).
        upper = key.upper()
        close = meant(key, names, cutoff=0.9 if where is None else CLOSE_CUTOFF)
        if (
            close is not None
            and where is None
            and close != upper
            and close.partition("_")[0] != upper.partition("_")[0]
        ):
            # The environment holds other programs' variables too
            # (OPENAI_BASE_URL, KIMI_API_BASE): only a near miss of the
            # same first word is taken for a typo.
            close = None
        if close is not None:
            warnings.append(f"{origin}: {key} is not a setting and is ignored; did you mean {close}?")
    return warnings


def default_interface() -> str:
    """
    C{::} (dual-stack: IPv4 clients arrive as C{::ffff:a.b.c.d}) where the
    host has IPv6, else C{0.0.0.0}.
    """
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
    except OSError:
        return "0.0.0.0"
    return "::"


__all__ = [
    "ConfigError",
    "EnvFile",
    "ProviderSettings",
    "Settings",
    "builtin_providers",
    "check_private_file",
    "check_state_directory",
    "check_token_directory",
    "default_state_dir",
    "env_file_secrets",
    "load_settings",
    "misspelt_settings",
    "open_to_others",
    "parse_network",
    "provider_table",
    "unread_lines",
]
