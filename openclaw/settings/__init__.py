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

Here: L{Settings}, L{load_settings} and the env file.  Beside them:
L{openclaw.settings.values} (each setting's parser and bounds),
L{openclaw.settings.permissions} (who may change the files given: the
rule below), L{openclaw.settings.directories} (the state directory, path
settings made absolute), L{openclaw.settings.database} (C{DATABASE_URL}
as libpq reads it) and L{openclaw.settings.errors}.

Files that hold secrets or settings are held to ssh's rule
(L{openclaw.settings.permissions.check_private_file}): a secret file
(C{JWT_SECRET_FILE}) or env file that anyone but its owner may write, or
that belongs to neither the gateway's user nor root, is refused; a secret
file others may read is a warning (L{Settings.warnings}, logged at
start-up), and so is an env file that gives a secret setting
(L{env_file_secrets}), as is an env-file key that is no setting but close
to one (C{GEMINI_MODLE}), and an env-file line that is neither blank, a
comment nor C{NAME=VALUE} (L{unread_lines}).  The directories of
C{TOKEN_FILE} are held to the rule of those files' directories
(L{openclaw.settings.permissions.check_token_directory}); the directory of
the consumers' SQLite database too, and more strictly
(L{openclaw.settings.permissions.check_state_directory}).

The path settings used once the gateway runs (C{TOKEN_FILE}, C{STATE_DIR},
a C{unix:} listener's socket) are made absolute as they are read, against
the working directory at launch
(L{openclaw.settings.directories._absolute}): twistd's C{-d DIR} changes
it after.  The files read only here (C{JWT_SECRET_FILE}, C{PRICES_FILE},
C{UPSTREAM_CA_FILE}, the env file) are read before it does.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import socket
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
from decouple import Config, RepositoryEmpty, RepositoryEnv, strtobool

from openclaw.files import NotARegularFile, kind_of, named_uid, read_regular_file
from openclaw.routing import model_refusal
from openclaw.settings.database import _database_url
from openclaw.settings.directories import (
    _absolute,
    _own_directory,
    _state_dir,
    default_state_dir,
    remove_made_directories,
)
from openclaw.settings.errors import ConfigError, InvalidValue
from openclaw.settings.permissions import check_private_file, check_state_directory
from openclaw.settings.values import (
    _ABOVE_ZERO_SECONDS_HINT,
    _AT_MOST,
    _COMMENT_IS_VALUE,
    _CONNECTIONS_HINT,
    _DEADLINE_HINT,
    _ENDPOINT_HINT,
    _INTERFACE_HINT,
    _NETWORKS_HINT,
    _PORT_HINT,
    _REDIS_SECONDS_HINT,
    _TIMER_HINT,
    _TRAILING_COMMENT,
    MAX_AUTH_FAILURE_COUNT,
    MAX_BREAKER_FAILURES,
    MAX_CONNECTION_COUNT,
    MAX_CONTROL_MESSAGE_BYTES,
    MAX_REQUEST_BODY_BYTES,
    MAX_RESERVE_TOKENS,
    MAX_SESSION_TTL_HOURS,
    MAX_USAGE_RETENTION_DAYS,
    MAX_WORKERS,
    MIN_DEADLINE_SECONDS,
    MIN_MESSAGE_BYTES,
    MIN_REDIS_SECONDS,
    MIN_SESSION_TTL_SECONDS,
    IPNetwork,
    _ca_file,
    _checked_redis_url,
    _cluster_name,
    _fallback,
    _fallback_order,
    _gateway_keys,
    _host_names,
    _hours,
    _interface,
    _listener,
    _log_format,
    _log_level,
    _model_name,
    _networks,
    _origins,
    _port,
    _provider_key,
    _provider_keys,
    _seconds,
    _timer_seconds,
    _url,
    _whole_number,
    _without_credentials,
    _writable_file,
)
from openclaw.spelling import CLOSE_CUTOFF, meant
from openclaw.urls import url_passwords

if TYPE_CHECKING:
    from openclaw.consumers.prices import Price
    from openclaw.providers.base import ProviderAdapter

#: RFC 7518 section 3.2: an HS256 key must be at least as long as the hash.
MIN_SECRET_BYTES = 32

T = TypeVar("T")


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
    #: Seconds a provider connection may take to be made: its TCP
    #: connection, then (https) its TLS handshake, each.  A provider that
    #: cannot be connected to fails over at once, not after
    #: C{upstream_timeout}.
    upstream_connect_timeout: float = 10.0
    #: Seconds a streamed answer may last, from the request's arrival: a
    #: provider that goes on sending (a model looping, a proxy feeding
    #: events) is cut there, the stream ended with an error event.
    upstream_stream_max_seconds: float = 3600.0
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

    def named(self, name: str, option: str, value: str) -> str:
        """
        A setting as a refusal names it: C{NAME (--option)='value'}, then
        where the value came from (L{source}), as the line of a bad value
        does (L{load_settings}): C{TOKEN_FILE (--token-file)='/x' (from the
        environment)}.
        """
        source = self.source(name)
        return f"{name} ({option})={value!r}" + (f" ({source})" if source else "")

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
        if not path.exists():
            raise ConfigError(f"--env-file {env_file!r} does not exist: give the path of the env file")
        if not path.is_file():
            # A directory, a FIFO, a device: not read (a FIFO would block
            # the start until something wrote to it).
            raise ConfigError(
                f"--env-file {env_file!r} is not a regular file (a directory, a FIFO or a device): "
                "give the path of the env file itself"
            )
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
    except UnicodeDecodeError:
        raise ConfigError(_not_utf8(path)) from None
    except PermissionError as e:
        raise ConfigError(
            f"cannot read env file {str(path)!r} ({e.strerror}): the gateway's user, {named_uid(os.geteuid())}, "
            "may not read it; make it that user's (chown, mode 0600), or leave --env-file out and have whoever "
            "starts the gateway read the file into its environment (set -a; . FILE; or systemd's EnvironmentFile=)"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read env file {str(path)!r}: {e}") from None


def _not_utf8(path: Path) -> str:
    """
    Why the env file at C{path}, which a UTF-8 decoder refused, cannot be
    read: the line of its first byte that is not UTF-8 (counted in the
    whole file: the decoder's own offset is within the block it read),
    never the bytes (a secret's may be among them).
    """
    raw = path.read_bytes()
    try:
        raw.decode(ENV_FILE_ENCODING)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        byte = f"{raw[e.start]:#04x}"
    else:
        line, byte = 0, "?"  # changed since: said without a line
    where = f"line {line}" if line else "it"
    return (
        f"cannot read env file {str(path)!r}: {where} is not UTF-8 (byte {byte}); save the file as UTF-8 "
        "(iconv -f <its encoding> -t utf-8, or your editor's encoding setting)"
    )


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
            # Of its kind (L{HostTrouble}: another exit status).
            raise type(e)(f"{e} (the value came {self.source(name)})") from None
        except ValueError as e:
            # A secret is never shown, nor a URL's user, password and query
            # (a provider's base URL refuses them).
            if name in self.secret_names:
                raise ConfigError(f"{name} ({self.source(name)}) is invalid: {hint or e}") from None
            shown = _without_credentials(str(raw))
            # What is wrong, then the setting's hint (none: the reason says
            # what to do).
            why = (f"{e}; " if hint else str(e)) if isinstance(e, InvalidValue) else ""
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
        prefix, slash, model = text.strip().partition("/")
        # A provider's id in any case, as in a request's model.
        provider_id = prefix.strip().lower()
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


def _read_provider(reader: _Reader, adapter: type[ProviderAdapter], ids: Sequence[str]) -> ProviderSettings:
    """
    One provider's settings, from the variables its adapter declares: its
    key (the first of C{key_variables} set) and more keys (its
    C{key_list_variable}), one pool without repeats; its base URL (the
    first of C{base_url_variable} and its aliases set), its model and its
    fallback model (L{_provider_model}: written with its own provider's
    prefix, the prefix is dropped; another declared provider's, C{ids},
    is refused).
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
        url = reader.read(variable, _url, None, "")
        if url is not None:
            base_url = url
            break
    return ProviderSettings(
        adapter=adapter,
        base_url=base_url,
        model=reader.read(
            adapter.model_variable,
            _provider_model(adapter.id, ids),
            adapter.default_model_id,
            f"or unset it for the default, {adapter.default_model_id}",
        ),
        api_key=pool[0] if pool else None,
        api_keys=pool[1:],
        fallback_model=reader.read(
            adapter.fallback_model_variable(),
            _provider_model(adapter.id, ids),
            None,
            f"or unset it to fail over to {adapter.model_variable}'s model",
        ),
    )


def _provider_model(own: str, ids: Sequence[str]) -> Callable[[str], str]:
    """
    The parser of provider C{own}'s model settings (C{KIMI_MODEL},
    C{FALLBACK_MODEL_KIMI}): a model name (L{_model_name}); written
    C{<provider>/<model>} as a request's model may be, C{own}'s prefix (in
    any case) is dropped, and another declared provider's is refused (it
    was sent to the provider as written: every call a 404).
    """

    def parse(text: str) -> str:
        model = _model_name(text)
        prefix, slash, rest = model.partition("/")
        provider_id = prefix.strip().lower()
        if slash and provider_id == own:
            return _model_name(rest)
        if slash and provider_id in ids:
            raise InvalidValue(
                f"it names another provider's model ({provider_id}): give a {own} model here, and set "
                f"{provider_id}'s own model setting or DEFAULT_PROVIDER={provider_id} for that one"
            )
        return model

    return parse


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
        # In any case, as a model's provider prefix is (ids are lower case).
        text = text.strip().lower()
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
        providers=[_read_provider(reader, adapter, ids) for adapter in declared],
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
        upstream_connect_timeout=reader.read(
            "UPSTREAM_CONNECT_TIMEOUT",
            _seconds(MIN_DEADLINE_SECONDS),
            defaults.upstream_connect_timeout,
            f"{_DEADLINE_HINT}, such as 10",
        ),
        upstream_stream_max_seconds=reader.read(
            "UPSTREAM_STREAM_MAX_SECONDS",
            _seconds(MIN_DEADLINE_SECONDS),
            defaults.upstream_stream_max_seconds,
            f"{_DEADLINE_HINT}, such as 3600",
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
    # Read again for its names: decouple's repository lists none.
    lines = EnvFileLines.read(env_path) if isinstance(repository, RepositoryEnv) else EnvFileLines({}, [])
    if read_env_file is not None:
        held = env_file_secrets(lines.values(repository), declared)
        if held:
            names = " and ".join(", ".join(held).rsplit(", ", 1))
            readable = check_private_file(
                read_env_file.path, f"{read_env_file.what}, which holds {names},", secret=True
            )
            if readable is not None:
                warnings.append(readable)
    if isinstance(repository, RepositoryEnv):
        warnings.extend(lines.warnings(env_path))
    warnings.extend(misspelt_settings(list(lines.values(repository)), reader.known, env_path))
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


@attrs.frozen
class EnvFileLines:
    """
    What an env file's lines hold, read as python-decouple's
    C{RepositoryEnv} reads them: as UTF-8, a byte-order mark ignored
    (L{ENV_FILE_ENCODING}), line by line; after stripping whitespace an
    empty line, one starting with C{#} and one without C{=} are skipped,
    and any other is C{NAME=VALUE} (the name stripped).  decouple's
    repository answers only for a name asked of it (its public
    C{__contains__} and C{__getitem__}): the names it holds, for the
    misspelt-settings warnings and the secrets check, are read here.
    """

    #: Each name given, in the file's order, with the numbers of the lines
    #: that give it (decouple keeps the last).
    names: dict[str, list[int]]
    #: The numbers of the lines that are neither blank, a comment nor
    #: C{NAME=VALUE}: no C{=}, or no name before the first.
    unread: list[int]

    @classmethod
    def read(cls, path: str) -> EnvFileLines:
        """
        The env file at C{path}'s lines; none when it cannot be read again
        (changed since decouple read it).
        """
        unread: list[int] = []
        names: dict[str, list[int]] = {}
        try:
            with open(path, encoding=ENV_FILE_ENCODING) as lines:
                for number, line in enumerate(lines, 1):
                    text = line.strip()
                    if not text or text.startswith("#"):
                        continue
                    name = text.partition("=")[0].strip()
                    if "=" not in text or not name:
                        unread.append(number)
                    else:
                        names.setdefault(name, []).append(number)
        except (OSError, UnicodeDecodeError):
            return cls({}, [])
        return cls(names, unread)

    def values(self, repository: RepositoryEmpty) -> dict[str, str]:
        """
        The value of each name given, as decouple read it from the same
        file (C{repository}): a name it does not hold (the file changed
        between the two reads) is left out.
        """
        values = {}
        for name in self.names:
            # decouple's __contains__ also asks the environment: a name the
            # file no longer holds (changed between the reads) raises.
            with contextlib.suppress(KeyError):
                values[name] = str(repository[name])
        return values

    def warnings(self, path: str) -> list[str]:
        """
        A warning for each line decouple skips or reads as nothing although
        it is neither blank nor a comment (L{unread}), and for each name
        given on more than one line, naming the lines (decouple keeps the
        last).  A warning gives the line's number, not its text, which may
        hold a secret.
        """
        warnings = [
            f"env file {path!r}: line {number} is not NAME=VALUE: ignored; write it as NAME=VALUE, "
            "or start it with # to keep it as a comment"
            for number in self.unread
        ]
        warnings += [
            f"env file {path!r}: {name} is set on lines {', '.join(map(str, found))}: only the last counts; keep one"
            for name, found in self.names.items()
            if len(found) > 1
        ]
        return warnings


def unread_lines(path: str) -> list[str]:
    """
    The warnings for the env file at C{path}'s lines (L{EnvFileLines}):
    a line python-decouple skips or reads as nothing although it is
    neither blank nor a comment, a name given on more than one line.  A
    file that cannot be read again gets none.
    """
    return EnvFileLines.read(path).warnings(path)


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
    "EnvFileLines",
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
