"""
The parsers of one setting's text each, and the bounds they hold it to:
each returns the value or raises C{ValueError} (L{InvalidValue} with its
reason), which L{openclaw.settings.load_settings} turns into one
L{ConfigError} line naming the setting, its value and where it came from.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography.x509 import load_pem_x509_certificates
from hyperlink import URL, URLParseError

from openclaw.files import NotARegularFile
from openclaw.routing import model_refusal
from openclaw.settings.directories import _absolute
from openclaw.settings.errors import ConfigError, InvalidValue
from openclaw.settings.permissions import check_token_directory
from openclaw.tls import MAX_CA_FILE_BYTES, read_ca_file
from openclaw.urls import masked_url

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


#: A port as people write it: ASCII digits only.
_DIGITS = re.compile(r"[0-9]+")


def numeral(text: str) -> str:
    """
    C{text} if it is a number as people write one: ASCII, without the
    C{_} between digits that Python's C{int} and C{float} take
    (C{"1_000"}, C{"6_0"}: no setting's value anyone meant), nor the other
    scripts' digits C{int} takes (C{"\uff16\uff10"}).

    @raise ValueError: it is not.
    """
    if not text.isascii():
        raise InvalidValue("write it in ASCII digits (0-9)")
    if "_" in text:
        raise InvalidValue("write it without '_' between digits (1000, not 1_000)")
    return text


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
        value = float(numeral(text))
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
    value = float(numeral(text))
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
    status 1.

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
    value = int(numeral(text))
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
        value = int(numeral(text))
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
# 99999999999999999999999 was taken by each.
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
    # In any case, as a model's provider prefix is (ids are lower case).
    order = tuple(part.strip().lower() for part in text.split(","))
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


#: An ASCII host name: labels of letters, digits, C{-} and C{_}, between
#: dots (an IPv4 address is one too).
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
#: A bracketed IPv6 authority: the address, then nothing or C{:port}.
_BRACKETED = re.compile(r"\[[^\]]*\](?::[0-9]*)?")


def _url(text: str) -> str:
    """
    A provider's base URL: C{http://} or C{https://} (in any case, given
    back in lower case: RFC 3986 section 3.1), a host (a name, an IPv4
    address, or an IPv6 one in brackets, without a zone), an optional
    port, a path; without the final C{/}.  Parsed as treq parses it
    (hyperlink's L{URL}), so that what is taken here is what the gateway
    connects to.

    @raise InvalidValue: anything else, with what is wrong: another scheme,
        a user or password (the provider's key has a setting of its own,
        and a URL is echoed in errors), a query or fragment (the gateway
        appends the API's paths), a port out of range, no host, an IPv6
        address without brackets, or with a zone (C{%25lo}, which treq's
        URLs refuse), anything after an IPv6 address's C{]} but C{:port}.
    """
    text = text.strip()
    if "@" in text:
        # Before any parsing, whose errors could quote a password.
        raise InvalidValue(
            "it holds '@': a user or password, which a provider's base URL never carries "
            "(its key has a setting of its own)"
        )
    scheme, separator, rest = text.partition("://")
    if not separator or scheme.lower() not in ("http", "https"):
        raise InvalidValue("use an http:// or https:// URL")
    text = f"{scheme.lower()}://{rest}"
    authority = rest.split("/", 1)[0]
    if authority.startswith("["):
        if "%" in authority:
            raise InvalidValue(
                "its IPv6 address has a zone (%...), which the gateway's HTTP client cannot connect with; "
                "use a global or loopback address, or a host name"
            )
        if "]" not in authority:
            raise InvalidValue("it is not a URL: its IPv6 address's '[' is not closed by ']'")
        if not _BRACKETED.fullmatch(authority.split("?", 1)[0].split("#", 1)[0]):
            raise InvalidValue("after an IPv6 address's ']' comes ':' and a port, or nothing")
    elif authority.count(":") > 1:
        raise InvalidValue("an IPv6 address goes in brackets: http://[::1]:8000/v1")
    port_text = authority.rpartition("]")[2] if authority.startswith("[") else authority
    if ":" in port_text and not _DIGITS.fullmatch(port_text.rpartition(":")[2].split("?", 1)[0].split("#", 1)[0]):
        # int() takes "1_0", " 80", "+80" and other scripts' digits: no
        # port anyone meant, and not the one shown (review 2 s41).
        raise InvalidValue("its port is not written in ASCII digits (0-9) alone")
    try:
        url = URL.from_text(text)
    except URLParseError as e:
        # A bracket left open, a port that is not a number.
        raise InvalidValue(f"it is not a URL ({e})") from None
    host = url.host
    if not host:
        raise InvalidValue("it names no host")
    if any(c.isspace() or not c.isprintable() for c in host):
        raise InvalidValue("its host holds a space or control character")
    if authority.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            # hyperlink takes [name] and [v1.x], which treq then looks up
            # by name (review 2 s41).
            raise InvalidValue("between '[' and ']' goes an IPv6 address alone") from None
    elif host.isascii():
        if not _HOST_NAME.fullmatch(host.removesuffix(".")):
            # A percent-encoded, empty-labelled or punctuated host that
            # every request would then fail on (review 2 s41).
            raise InvalidValue(
                "its host is neither a name (letters, digits, '-', '_' and dots between labels) nor an address: "
                "write the host's name itself"
            )
    else:
        try:
            url.to_uri()
        except (ValueError, UnicodeError) as e:
            # What treq does with an international name before every
            # request (IDNA, RFC 5891).
            raise InvalidValue(f"its host is no name the gateway's HTTP client can look up ({e})") from None
    if url.port == 0:
        raise InvalidValue("port 0 is not a port to connect to")
    if url.port is not None and not 1 <= url.port <= 65535:
        raise InvalidValue(f"port out of range: {url.port} (a port is 1 to 65535)")
    if url.query or url.fragment or "?" in text or "#" in text:
        raise InvalidValue("the gateway appends the API's paths to it: leave out ?query and #fragment")
    return text.rstrip("/")


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
