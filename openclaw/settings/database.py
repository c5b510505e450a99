"""
C{DATABASE_URL} checked as libpq would read it, its password never shown
in a refusal.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from openclaw.settings.errors import ConfigError
from openclaw.urls import masked_fields, masked_url, url_passwords

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


#: A C{password} in libpq's keyword/value form
#: (U{https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING-KEYWORD-VALUE}):
#: the keyword (C{sslpassword} too) and its value, bare or single-quoted.
_KEYWORD_PASSWORD = re.compile(r"(\b\w*password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


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
    # libpq's keyword form (host=... password=...), which is no URI and
    # refused below, shown without its password too.
    masked = _KEYWORD_PASSWORD.sub(r"\1***", masked_url(text))
    shown = f"DATABASE_URL={masked!r}"
    form = "use postgresql://user:password@host:port/database, or leave it unset for SQLite in STATE_DIR"
    try:
        parsed = urlsplit(text)
        parsed.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        raise ConfigError(f"{shown} is invalid: {form}") from None
    if parsed.scheme not in ("postgresql", "postgres") or not (parsed.hostname or parsed.query):
        raise ConfigError(f"{shown} is invalid: {form}")
    if parsed.netloc.count("@") > 1:
        # libpq takes the user information to the first @, so what follows
        # it in the password would be taken for the host, and said (in
        # clear) in every connection error.
        raise ConfigError(
            f"{shown} holds an @ in its user name or password: percent-encode it as %40 (and a : as %3A, / as "
            "%2F, % as %25, # as %23, ? as %3F)"
        )
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
