"""
URLs that may hold a password (C{DATABASE_URL}, C{REDIS_URL}) as they are
shown in a log line or an error message: one rule for both,
L{masked_url}, and the passwords it masks, L{url_passwords}, for masking
another program's words about the URL (libpq's).

A URL is shown when it is mistyped, so the rule does not trust its
punctuation: it masks whatever any reader of the URL (libpq, Python's
C{urlsplit} and C{parse_qs} as L{openclaw.cluster.redis.redis_endpoint}
reads a Redis URL) may take for a password, and what the user may have
meant for one.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

#: A query field's name, after the C{?}, C{&} or C{;} that starts it, up
#: to its C{=}.
_FIELD = re.compile(r"[?&;]([^?&;=#]*)=")

_MASK = "***"


def masked_url(url: str) -> str:
    """
    C{url} with its passwords shown as C{***} and without a fragment
    (C{#...}, which may be the rest of a password holding an unencoded
    C{#}); the user name and everything else as written.

    A password is:

      - the user information's, after its first C{:} up to the last C{@}
        before the query's password field (so one holding an unencoded
        C{/}, C{?} or C{#} is masked whole);

      - from the value of the first C{password} field (its name after a
        C{?}, C{&} or C{;}, percent-decoded, in any case) to the end of the
        URL: a value may hold an unencoded C{&} (C{password=sec&ret}) or
        C{?} (RFC 3986 3.4 allows it in a query: C{parse_qs} reads
        C{password=top?secret} whole), and a C{;} or C{?} written where
        C{&} was meant (C{?db=0;password=...}) makes the password part of
        another field's value, which an error then quotes.  Neither
        reader takes C{;} as a separator nor names in another case
        (libpq's URI parser splits on C{&} only and matches names
        exactly; C{parse_qs} splits on C{&} only since Python 3.9.2), but
        such a field is a mistyped password, and a mistyped URL is the
        one shown in an error.  A C{password=} after a C{&} or C{;} in the
        authority with an C{@} after it is the user information's
        password's, as both readers take it;

      - when libpq would read the user information up to the first C{@}
        not after a C{/} (C{u:a?password=b@host}: libpq's password is
        C{a?password=b}, C{urlsplit}'s C{b@host}), everything after the
        user name's C{:}.

    @param url: any text; it need not be a URL any reader takes.
    @return: C{url} masked, as one string.
    """
    shown = ""
    position = 0
    for start, end in _password_spans(url):
        segment = url[position:start]
        if "#" in segment:
            # A fragment: left out, with whatever follows it.
            return shown + segment.partition("#")[0]
        shown += segment + _MASK
        position = end
    return shown + url[position:].partition("#")[0]


def url_passwords(url: str) -> list[str]:
    """
    The texts L{masked_url} masks in C{url}, and the parts of them another
    program may quote: up to the first C{&} (libpq's value of a field,
    C{require;password=hunter2}) or C{@} (libpq's user information's
    password), the value of each later C{password} field in them, and each
    percent-decoded (as libpq decodes a URI's values).

    @return: the distinct non-empty texts, longest first (so that one
        masked inside another leaves no tail).
    """
    found: set[str] = set()
    for start, end in _password_spans(url):
        text = url[start:end]
        first, *fields = text.split("&")
        pieces = [text, first, text.partition("@")[0]]
        for field in fields:
            name, equals, value = field.partition("=")
            if equals and unquote(name).lower() == "password":
                pieces.append(value)
        found.update(pieces)
        found.update(unquote(piece) for piece in pieces)
    found.discard("")
    return sorted(found, key=lambda secret: (-len(secret), secret))


def masked_fields(url: str) -> list[str]:
    """
    Each C{&}-separated field of what L{masked_url} masks in C{url}, its
    name and its value (raw and percent-decoded): what libpq quotes whole
    in its words about a URI's query (C{missing key/value separator "="
    in URI query parameter: "ret"} for C{password=sec&ret}, or C{invalid
    sslmode value: "bogus"} for C{password=x&sslmode=bogus}, both masked
    in the URL shown).  To be masked only where quoted whole: as prose,
    C{port} or C{1} are libpq's own words.

    @return: the distinct non-empty texts, longest first.
    """
    found: set[str] = set()
    for start, end in _password_spans(url):
        for field in url[start:end].split("&"):
            name, _, value = field.partition("=")
            found.update((field, name, value, unquote(field), unquote(name), unquote(value)))
    found.discard("")
    return sorted(found, key=lambda text: (-len(text), text))


def _password_spans(url: str) -> list[tuple[int, int]]:
    """
    Where L{masked_url}'s passwords are in C{url}: C{(start, end)} offsets,
    in order, not overlapping.
    """
    separator = url.find("://")
    start = separator + 3 if separator >= 0 else 0
    rest = url[start:]
    value = _password_value(rest)
    before = rest if value is None else rest[:value]
    spans = []
    at = before.rfind("@")
    user = _user(before[: max(at, 0)])
    if at >= 0 and user is not None:
        spans.append((start + len(user) + 1, start + at))
    elif value is not None:
        # libpq ends the user information at the first @ not after a /.
        first = rest.find("@")
        user = _user(rest[: max(first, 0)])
        if first >= 0 and "/" not in rest[:first] and user is not None:
            return [(start + len(user) + 1, len(url))]
    if value is not None:
        spans.append((start + value, len(url)))
    return spans


def _user(userinfo: str) -> str | None:
    # The user name of a userinfo that has a password: what precedes its
    # first :, holding none of /?# (else the @ ending it is no userinfo's).
    user, colon, _ = userinfo.partition(":")
    if not colon or any(c in user for c in "/?#"):
        return None
    return user


def _password_value(rest: str) -> int | None:
    # Where the value of the first password field of rest (a URL after
    # ://) starts, or None.
    for field in _FIELD.finditer(rest):
        if unquote(field.group(1)).lower() != "password":
            continue
        in_authority = not any(c in rest[: field.start()] for c in "/?")
        if field.group(0)[0] in "&;" and in_authority and "@" in rest[field.end() :]:
            continue  # the user information's password holds it
        return field.end()
    return None
