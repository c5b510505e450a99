"""
Why a provider could not be used, in words an operator can act on.

Every reason produced here is meant to end up in a health report or a log
line, so each one says what happened, where, and (when there is something
to do) what to check; none ever contains an API key.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import TypeVar
from urllib.parse import quote

import attrs
from hyperlink import URL, URLParseError
from service_identity import VerificationError
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http import stringToDatetime

from openclaw.addresses import host_port
from openclaw.dataplane.errors import CONTEXT_LENGTH_EXCEEDED
from openclaw.providers.keys import DEFAULT_REST_SECONDS
from openclaw.tls import describe_tls_error, is_tls_error
from openclaw.web import status_line

#: Longest upstream message quoted in a reason; error bodies can be pages of HTML.
MAX_MESSAGE_CHARS = 200

REDACTED = "[redacted]"
_REDACTED_BYTES = REDACTED.encode()

#: Secrets at least this long are scrubbed wherever they occur; shorter
#: ones only as whole tokens (see L{Scrubber}).
MIN_BARE_SECRET_CHARS = 8

#: Any run of this many characters or more that begins a key is scrubbed
#: (see L{Scrubber}): long enough that no ordinary word or key prefix such
#: as C{sk-proj-} or C{AIzaSy} matches alone.
MIN_PREFIX_CHARS = 12


class ProviderError(Exception):
    """
    A provider could not be used.  C{str()} is the operator-facing reason.
    """


class Unreachable(ProviderError):
    """
    No answer came from the provider (the connection refused, cut, its
    TLS handshake failed): C{str()} is the operator's reason, which names
    the provider's address; C{explained} has the client's words too.
    """

    def __init__(self, explained: Explained) -> None:
        super().__init__(explained.operator)
        self.explained = explained


class MissingKey(ProviderError):
    """
    No API key is configured, so no request was made.
    """


class UnknownProvider(LookupError):
    """
    A provider id that the registry does not know.
    """


class MalformedResponse(ProviderError):
    """
    The provider answered 2xx with a body that is not what its API returns.
    """


class BodyTooLarge(ProviderError):
    """
    A response body exceeded the reader's limit.
    """


class HandshakeTimedOut(Exception):
    """
    An https provider's TLS handshake was not done within C{seconds}
    (C{UPSTREAM_CONNECT_TIMEOUT}) of its TCP connection: the gateway
    aborted the connection (L{openclaw.providers.endpoints}).  The
    connecting's failure, as a refused connection's is.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the TLS handshake did not finish within {seconds:g} s (UPSTREAM_CONNECT_TIMEOUT)")
        #: The deadline passed, in seconds.
        self.seconds = seconds


class HeadTooLarge(ProviderError):
    """
    The gateway itself closed a provider's connection: the heads of its
    response (status lines and header fields, interim 1xx heads
    included) passed C{limit} bytes
    (L{MAX_RESPONSE_HEAD_BYTES <openclaw.providers.endpoints.MAX_RESPONSE_HEAD_BYTES>}).
    Delivered as the connection's reason for closing, so Twisted's client
    fails the request with it wrapped (C{ResponseFailed}).
    """

    def __init__(self, limit: int) -> None:
        super().__init__(self.said(limit))
        #: The bound passed, in bytes.
        self.limit = limit

    @staticmethod
    def said(limit: int, where: str | None = None) -> str:
        """
        The reason, the head's source C{where} (C{host:port}) named when given.
        """
        source = "" if where is None else f" from {where}"
        return (
            f"the response's head{source} passed {limit // 1024} KiB (MAX_RESPONSE_HEAD_BYTES): the gateway closed "
            "the connection; the provider, or a proxy on the way, sends headers without end"
        )


class ProbeTimedOut(ProviderError):
    """
    The whole exchange (connect, headers and body) overran its time limit.
    """


class UpstreamHTTPError(ProviderError):
    """
    The provider answered with a non-2xx status.
    """

    def __init__(self, status: int, message: str, hint: str | None = None, refusal: Refusal | None = None) -> None:
        text = f"{status_line(status)}: {message}"
        if hint:
            text += f" ({hint})"
        super().__init__(text)
        self.status = status
        self.message = message
        #: The answer read as a chat call's would be (L{classify}), so that
        #: the client gets the same status, code and C{Retry-After}; None
        #: when it was not read so.
        self.refusal = refusal


class NoUsableKey(ProviderError):
    """
    Every key of the provider's pool rests after a 429 or was set aside
    as refused (L{openclaw.providers.keys.KeyPool}): no request was made.
    """

    def __init__(self, message: str, back_in: float | None, model: str | None = None) -> None:
        super().__init__(message)
        #: Seconds until the first resting key is back; None when none rests.
        self.back_in = back_in
        #: The model whose own rests keep every key away (the provider's
        #: other models may take calls: L{KeyPool.resting_model
        #: <openclaw.providers.keys.KeyPool.resting_model>}); else None.
        self.model = model


class BreakerOpen(ProviderError):
    """
    The provider's circuit breaker keeps calls away: no request was made.
    """

    def __init__(self, message: str, remaining: float) -> None:
        super().__init__(message)
        #: Seconds of cooldown left (0 while the half-open trial is under way).
        self.remaining = remaining


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """
    Collapse whitespace and cut C{text} to C{limit} characters.
    """
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


def http_hint(status: int, key_refused: bool, key_variable: str, base_url_variable: str) -> str | None:
    """
    What an operator should check after a given status; C{key_refused}: the
    provider's adapter read the answer as its key refused
    (L{RefusalKind.AUTH}: 401, and whatever its provider's own rule adds,
    such as Gemini's 400 C{API_KEY_INVALID}).
    """
    if key_refused:
        return f"check {key_variable}"
    if status == 403:
        return f"permission denied; check that {key_variable} may use this model or API"
    if status == 404:
        return f"check {base_url_variable}"
    if status == 429:
        return "rate limited or out of quota; check the provider account"
    if 300 <= status < 400:
        return f"the API redirected; set {base_url_variable} to the final URL"
    if status >= 500:
        return "the provider is failing; try again later"
    return None


def describe_failure(reason: Failure, host: str, port: int, base_url_variable: str) -> str:
    """
    One line saying why an exchange with C{host:port} failed
    (L{host_port}: an IPv6 address in brackets), for the operator: a
    health report, a log line (L{explain_failure}'s C{operator}).
    """
    return explain_failure(reason, host, port, base_url_variable).operator


@attrs.frozen
class Explained:
    """
    Why an exchange with a provider failed, in two sets of words.
    """

    #: For a client of the data plane: what failed, in the provider's
    #: terms, and what it can do; never the provider's address, its base
    #: URL or a setting, which are the operator's configuration (an
    #: internal proxy's address among them).
    client: str
    #: For the operator (a health report, the request's log line): where
    #: (C{host:port}) and what to check (C{base_url_variable}).
    operator: str


#: What a client can do when the provider could not be reached.
_RETRY_LATER = "try again later, and tell the gateway's operator if it lasts"


def explain_failure(reason: Failure, host: str, port: int, base_url_variable: str) -> Explained:
    """
    Why an exchange with C{host:port} failed, for a client and for the
    operator (L{Explained}).

    Twisted's web client wraps transport errors (L{ResponseNeverReceived},
    L{ResponseFailed}); the first wrapped reason is the telling one.
    """
    where = host_port(host, port)
    value = reason.value
    if isinstance(value, (ResponseNeverReceived, ResponseFailed)) and value.reasons:
        inner = value.reasons[0]
        if inner.check(neterror.ConnectionDone, neterror.ConnectionLost):
            when = "before answering" if isinstance(value, ResponseNeverReceived) else "mid-response"
            return Explained(f"the provider closed the connection {when}", f"connection closed by {where} {when}")
        return explain_failure(inner, host, port, base_url_variable)
    if isinstance(value, HeadTooLarge):
        return Explained(HeadTooLarge.said(value.limit), HeadTooLarge.said(value.limit, where))
    if isinstance(value, ProbeTimedOut):
        return Explained("the provider did not answer in time", str(value))
    if isinstance(value, ProviderError):
        return Explained(str(value), str(value))
    if cancelled(reason):
        return Explained(
            "the request to the provider was cancelled (the gateway is stopping)",
            f"request to {where} cancelled (the gateway is stopping)",
        )
    if isinstance(value, neterror.ConnectionRefusedError):
        return Explained(
            f"the provider could not be reached (connection refused); {_RETRY_LATER}",
            f"connection refused by {where}; is {base_url_variable} right and the service up?",
        )
    if isinstance(value, neterror.DNSLookupError):
        return Explained(
            f"the provider could not be reached (its host name did not resolve); {_RETRY_LATER}",
            f"DNS lookup failed for {host}; check {base_url_variable} and this host's resolver",
        )
    if isinstance(value, (neterror.TimeoutError, neterror.TCPTimedOutError)):
        return Explained(
            f"the provider could not be reached (connecting timed out); {_RETRY_LATER}",
            f"connecting to {where} timed out (UPSTREAM_CONNECT_TIMEOUT); is {base_url_variable} right and the "
            "host up, and does the network on the way let the connection through?",
        )
    if isinstance(value, HandshakeTimedOut):
        return Explained(
            f"the provider could not be reached (the TLS handshake with it did not finish in time); {_RETRY_LATER}",
            f"TLS handshake with {where}: {value}; is {base_url_variable} an https service, and does the network "
            "on the way (a firewall, a proxy) let TLS through?",
        )
    if isinstance(value, neterror.NoRouteError):
        return Explained(
            f"the provider could not be reached (no route to it); {_RETRY_LATER}",
            f"no route to {where}; check the network",
        )
    if is_tls_error(value):
        return Explained(
            "the provider could not be reached securely (the TLS handshake with it failed); tell the gateway's "
            "operator",
            f"TLS handshake with {where} failed ({clip(describe_tls_error(value), 200)}); "
            f"{_tls_hint(value, base_url_variable)}",
        )
    if isinstance(value, neterror.ConnectError):
        return Explained(
            f"the provider could not be reached (the connection failed); {_RETRY_LATER}",
            f"could not connect to {where}: {clip(str(value), 120)}",
        )
    if isinstance(value, (neterror.ConnectionDone, neterror.ConnectionLost)):
        return Explained("the connection to the provider was lost", f"connection to {where} lost")
    return Explained(
        f"the request to the provider failed ({type(value).__name__})",
        f"request to {where} failed: {type(value).__name__}: {clip(str(value), 120)}",
    )


#: OpenSSL's reasons for a server that did not answer in TLS (a plain HTTP
#: port reached with https).
_NOT_TLS_REASONS = ("wrong version number", "packet length too long", "http request")


def _tls_hint(error: BaseException, base_url_variable: str) -> str:
    """
    What to do after a failed TLS handshake with a provider (C{error}, as
    L{is_tls_error} tells it): a certificate for another host, to call it
    by a name the certificate holds; a server that did not answer in TLS,
    to check the URL's scheme; a certificate not verified, to trust its CA
    with C{UPSTREAM_CA_FILE} (a private CA, a TLS-inspecting proxy) or to
    check C{base_url_variable} (the README's "UPSTREAM_CA_FILE").
    """
    if isinstance(error, VerificationError):
        return (
            f"set {base_url_variable} to a host name the certificate holds, or give the provider (or the proxy on "
            "the way) a certificate for this one"
        )
    reason = describe_tls_error(error)
    if any(text in reason for text in _NOT_TLS_REASONS):
        return f"the server did not answer in TLS: is {base_url_variable} right (http:// for a plain port)?"
    if "certificate verify failed" in reason:
        return (
            "the certificate is not signed by an authority the gateway trusts (or is expired): for a provider "
            "behind a private CA or a TLS-inspecting proxy, set UPSTREAM_CA_FILE to that CA's PEM file; "
            f"else check {base_url_variable}"
        )
    return f"check {base_url_variable} and the provider's TLS set-up (UPSTREAM_CA_FILE for a private CA)"


def cancelled(reason: Failure) -> bool:
    """
    Whether an exchange failed because the gateway cancelled it (a stop),
    not because of anything the provider did: a L{CancelledError}, or
    Twisted's L{ConnectingCancelledError <neterror.ConnectingCancelledError>}
    (cancelled while connecting), as such or as the first reason Twisted's
    web client wraps (L{describe_failure}).
    """
    value = reason.value
    if isinstance(value, (ResponseNeverReceived, ResponseFailed)) and value.reasons:
        return cancelled(value.reasons[0])
    return isinstance(value, (CancelledError, neterror.ConnectingCancelledError))


AnyStr = TypeVar("AnyStr", str, bytes)


def _redact_runs(haystack: AnyStr, form: AnyStr, redacted: AnyStr) -> AnyStr:
    """
    Replace in C{haystack} every run of at least L{MIN_PREFIX_CHARS} that
    is a prefix of C{form} (the whole of it included) by C{redacted}.
    """
    head = form[:MIN_PREFIX_CHARS]
    start = haystack.find(head)
    if start < 0:
        return haystack
    pieces: list[AnyStr] = []
    done = 0
    while start >= 0:
        end = start + len(head)
        limit = min(len(haystack), start + len(form))
        while end < limit and haystack[end] == form[end - start]:
            end += 1
        pieces.append(haystack[done:start])
        pieces.append(redacted)
        done = end
        start = haystack.find(head, end)
    pieces.append(haystack[done:])
    return haystack[:0].join(pieces)


def _json_escaped(form: str) -> re.Pattern[bytes]:
    """
    A pattern for C{form} with any of its characters written as JSON
    escapes (RFC 8259 section 7: C{\\uXXXX}, its hex digits in either
    case, and C{\\/} for a slash), which a client's JSON parser reads back
    as the key: its first L{MIN_PREFIX_CHARS} characters (all of it, if
    shorter), then as much of the rest as follows.
    """

    def one(character: str) -> bytes:
        options = [re.escape(character.encode("utf-8"))]
        if ord(character) < 0x10000:
            digits = "".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in f"{ord(character):04x}")
            options.append(rb"\\u" + digits.encode("ascii"))
        if character == "/":
            options.append(rb"\\/")
        return b"(?:" + b"|".join(options) + b")"

    head, rest = form[:MIN_PREFIX_CHARS], form[MIN_PREFIX_CHARS:]
    tail = b""
    for character in reversed(rest):
        tail = b"(?:" + one(character) + tail + b")?"
    return re.compile(b"".join(one(character) for character in head) + tail)


#: What can hide a key's characters in JSON text (L{_json_escaped}).
_JSON_ESCAPES = (b"\\u", b"\\/")


@attrs.frozen
class Scrubber:
    """
    Removes a provider's keys from any text that came from the provider
    (whole answers, error bodies, stream events, listings, probe reasons)
    before it reaches a client, a log line or a report.

    Each key is looked for as it is and URL-encoded (RFC 3986 percent
    encoding, as it would appear quoted back from a query string), and
    replaced by C{[redacted]}:

      - a key of L{MIN_PREFIX_CHARS} characters or more wherever any
        L{MIN_PREFIX_CHARS}-character prefix of it occurs, through as much
        of the key as follows (a message cut short, or a provider that
        quotes only the start of the key, still hides it);
      - a shorter key of L{MIN_BARE_SECRET_CHARS} or more wherever it
        occurs whole;
      - a toy key (shorter still, "k" on a test set-up) only where it
        stands as a token of its own, so ordinary words stay readable.

    Longer keys are handled first, so no key is left half-replaced.  A
    key of L{MIN_BARE_SECRET_CHARS} characters or more is also found with
    any of its characters written as JSON escapes (C{k\\u002d...}), which a
    client's JSON parser would read back as the key.
    """

    secrets: tuple[str, ...]
    #: How the provider's own error text may name its address (L{quoted}):
    #: the operator's configuration (an internal proxy's often), which no
    #: client holding a key is to learn.  Not looked for in answers.
    addresses: tuple[str, ...] = ()
    _forms: tuple[str, ...] = attrs.field(init=False, repr=False)
    _byte_forms: tuple[bytes, ...] = attrs.field(init=False, repr=False)
    #: Per byte form, worked out once: C{(what to look for first, the
    #: form, whether runs of its prefixes go, the token pattern of a toy
    #: key or None)}.
    _byte_plan: tuple[tuple[bytes, bytes, bool, re.Pattern[bytes] | None], ...] = attrs.field(init=False, repr=False)
    #: Per key long enough, the pattern of its JSON-escaped forms.
    _escaped: tuple[re.Pattern[bytes], ...] = attrs.field(init=False, repr=False)
    #: The L{addresses} as one pattern (L{_address_pattern}), or None.
    _named: re.Pattern[bytes] | None = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_named", _address_pattern(self.addresses))
        forms = dict.fromkeys(
            form
            for secret in sorted((s for s in self.secrets if s), key=len, reverse=True)
            for form in (secret, quote(secret, safe=""))
        )
        object.__setattr__(self, "_forms", tuple(forms))
        byte_forms = tuple(form.encode("utf-8") for form in forms)
        object.__setattr__(self, "_byte_forms", byte_forms)
        object.__setattr__(
            self,
            "_byte_plan",
            tuple(
                (
                    form[:MIN_PREFIX_CHARS],
                    form,
                    len(form) >= MIN_PREFIX_CHARS,
                    None
                    if len(form) >= MIN_BARE_SECRET_CHARS
                    else re.compile(rb"(?<![\w-])" + re.escape(form) + rb"(?![\w-])"),
                )
                for form in byte_forms
            ),
        )

        object.__setattr__(
            self,
            "_escaped",
            tuple(
                _json_escaped(secret)
                for secret in sorted(set(self.secrets), key=len, reverse=True)
                if len(secret) >= MIN_BARE_SECRET_CHARS
            ),
        )

    def text(self, text: str) -> str:
        """
        C{text} without any of the keys.
        """
        for form in self._forms:
            if len(form) >= MIN_PREFIX_CHARS:
                text = _redact_runs(text, form, REDACTED)
            elif len(form) >= MIN_BARE_SECRET_CHARS:
                text = text.replace(form, REDACTED)
            else:
                text = re.sub(rf"(?<![\w-]){re.escape(form)}(?![\w-])", REDACTED, text)
        if "\\u" in text or "\\/" in text:
            text = self._unescaped(text.encode("utf-8")).decode("utf-8")
        return text

    def data(self, data: bytes) -> bytes:
        """
        C{data} (UTF-8: a JSON body, server-sent events) without any of
        the keys; the same bytes object when none occurs.
        """
        for head, form, runs, pattern in self._byte_plan:
            if head not in data:
                continue
            if runs:
                data = _redact_runs(data, form, _REDACTED_BYTES)
            elif pattern is None:
                data = data.replace(form, _REDACTED_BYTES)
            else:
                data = pattern.sub(_REDACTED_BYTES, data)
        for escape in _JSON_ESCAPES:
            if escape in data:
                return self._unescaped(data)
        return data

    def quoted(self, data: bytes) -> bytes:
        """
        C{data}, an error a client gets (a JSON body, an SSE error event),
        without any of the keys (L{data}) nor the provider's address
        (L{addresses}, in their order): a provider, or a proxy on its way,
        that names itself in its error text ("upstream connect error:
        http://10.0.0.7:8443/v1/... refused").  Found in any case (RFC 3986
        section 6.2.2.1: a scheme and a host name are case-insensitive),
        with its slashes JSON-escaped or not, and only where it stands on
        its own (C{10.0.0.7} is not found in C{110.0.0.75}).
        """
        data = self.data(data)
        if self._named is not None:
            data = self._named.sub(_REDACTED_BYTES, data)
        return data

    def _unescaped(self, data: bytes) -> bytes:
        """
        C{data} without the keys' JSON-escaped forms (L{_json_escaped}).
        """
        for pattern in self._escaped:
            data = pattern.sub(_REDACTED_BYTES, data)
        return data


def named_addresses(base_url: str) -> tuple[str, ...]:
    """
    How a provider's error text may name the address of C{base_url}
    (L{Scrubber.addresses}), each form before those it holds:
    C{scheme://host:port}, C{host:port} (L{host_port}, the scheme's port
    when the URL gives none), C{scheme://host}, and the host alone when
    it is an IP address or a name with a dot in it (a one-label name such
    as C{proxy} is also a word of the error's own text); an IPv6 address
    also without its brackets (C{::1}, as curl's "Failed to connect to ::1
    port 8000" names it).
    """
    try:
        url = URL.from_text(base_url)
    except URLParseError:
        # Refused at start-up (the settings' check of a base URL): none here.
        return ()
    host = url.host
    if not host:
        return ()
    port = url.port or (443 if url.scheme == "https" else 80)
    bracketed = host_port(host, port).rsplit(":", 1)[0]
    authority = host_port(host, port)
    forms: tuple[str, ...] = (f"{url.scheme}://{authority}", authority, f"{url.scheme}://{bracketed}")
    if "." in host or ":" in host:
        forms += (bracketed,)
    if ":" in host:
        forms += (host,)
    return forms


def _address_pattern(addresses: tuple[str, ...]) -> re.Pattern[bytes] | None:
    """
    One pattern for L{Scrubber.quoted}: any of C{addresses} (the first
    that matches where several start), in any case, a C{/} also as JSON's
    C{\\/}, each also percent-encoded (RFC 3986 section 2.1: quoted from
    a query string, C{redirect_uri=http%3A%2F%2F...}), not inside a longer
    name, number or address (a C{_} or a percent-encoded delimiter, space
    or punctuation next to it is no part of one; a percent-encoded digit or
    letter is).
    """
    if not addresses:
        return None
    forms: list[bytes] = []
    for address in addresses:
        form = re.escape(address.encode("utf-8")).replace(b"/", rb"(?:/|\\/)")
        if ":" in address and not address.startswith(("[", "http")):
            # An IPv6 address without brackets: not inside a longer one
            # (::1 in fe80:::1 or ::1:2).
            form = rb"(?<!:)" + form + rb"(?!:)"
        forms.append(form)
        encoded = quote(address, safe="")
        if encoded != address:
            forms.append(re.escape(encoded.encode("ascii")))
    return re.compile(
        rb"(?:(?<=%(?:2[0-9A-Fa-f]|3[A-Fa-f]|40|5[BDbd]))|(?<![A-Za-z0-9.-]))(?:"
        + b"|".join(forms)
        + rb")(?![A-Za-z0-9-]|\.[A-Za-z0-9])",
        re.IGNORECASE,
    )


class RefusalKind(StrEnum):
    """
    What a provider's non-2xx answer to a chat call means, and so who must
    act (see L{classify}).
    """

    #: The request is at fault (400, 404, 409, 413, 422): passed on as is.
    REQUEST = "request"
    #: 429 (Moonshot's rate limit, Gemini's C{RESOURCE_EXHAUSTED}): the key rests.
    RATE_LIMITED = "rate_limited"
    #: 401, or a provider's own rule for a refused key (Gemini's 400 with
    #: reason C{API_KEY_INVALID}, read by its adapter's C{refusal}): the
    #: gateway's own key is refused as invalid; the key is set aside.
    AUTH = "auth"
    #: 403: permission denied, often for the model named (Moonshot's
    #: C{permission_denied_error} "The model ... is not available for your
    #: organization", Google's C{PERMISSION_DENIED} on a tuned model), so
    #: not evidence against the key on its own word: the client is told,
    #: and the key is checked with its free models listing
    #: (L{openclaw.providers.base.ProviderAdapter.check_key}).
    FORBIDDEN = "forbidden"
    #: The provider account behind the gateway cannot serve the call: a
    #: 402 Payment Required, or a provider's own rule (Gemini's 400
    #: C{FAILED_PRECONDITION}, an unsupported location or billing
    #: required, read by its adapter's C{refusal}): the operator's to fix,
    #: not the client's, not the key's; another provider may answer.
    ACCOUNT = "account"
    #: 5xx: the provider is failing.
    SERVER = "server"
    #: Anything else (a redirect, an unusual 4xx).
    OTHER = "other"


#: Statuses that mean the request itself is at fault.
REQUEST_STATUSES = frozenset({400, 404, 409, 413, 422})


@attrs.frozen
class Refusal:
    """
    A provider's non-2xx answer, read: its status, what it means, the
    provider's own message (clipped; the caller scrubs keys) and how long to
    wait before trying again, when the provider said.
    """

    status: int
    kind: RefusalKind
    message: str
    #: Seconds, from the provider's C{Retry-After} header, else from the
    #: wait its error body states (read by its adapter:
    #: L{retry_delay <openclaw.providers.base.ProviderAdapter.retry_delay>});
    #: None when it said nothing.
    retry_after: float | None = None
    #: The body was the provider's own error document (OpenAI's or
    #: Google's C{{"error": ...}}); not so for a web server's page for a
    #: path with no API behind it (a base URL set wrong).
    stated: bool = True
    #: OpenAI's error code for what the provider said, when it is one that
    #: OpenAI's clients act on; each provider reads its own words for it
    #: (its adapter's C{refusal}).  Only L{CONTEXT_LENGTH_EXCEEDED} so far.
    code: str | None = None
    #: The request field a refused request's fault is in (OpenAI's
    #: C{param}), when the provider's words name it (its adapter's
    #: C{refusal}); and what the client can do about it, in a clause.
    param: str | None = None
    advice: str | None = None


#: A provider's wait (C{Retry-After}, or one its error body states) is followed for
#: an hour at most: one wrong header (a proxy's, a far-off date) must not
#: take a key out until a restart, and a spent daily quota is simply asked
#: again each hour.
MAX_RETRY_AFTER_SECONDS = 3600.0


def parse_retry_after(value: str | None, now: float) -> float | None:
    """
    Seconds to wait from a C{Retry-After} header (RFC 9110 section 10.2.3:
    delay-seconds, ASCII digits only, or an HTTP-date), None when absent or
    unreadable (the caller's default applies).

    @param value: the header as decoded by twisted.web (latin-1): it may
        hold any byte, as 0xB2 (superscript two), which C{str.isdigit}
        takes for a digit.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(value)
        # Hundreds of digits read as infinity: no usable delay either.
        return seconds if math.isfinite(seconds) else None
    try:
        when = float(stringToDatetime(value.encode("latin-1")))
    except (ValueError, IndexError, OverflowError, UnicodeEncodeError):
        # twisted.web's parser fails with IndexError on an empty value and
        # ValueError (UnicodeDecodeError) on non-ASCII bytes; a year of
        # hundreds of digits overflows a float.
        return None
    return max(0.0, when - now)


def classify(
    status: int,
    body: bytes,
    retry_after_header: str | None = None,
    now: float = 0.0,
    body_delay: float | None = None,
) -> Refusal:
    """
    Read a provider's non-2xx answer to a chat call, by the rules every
    provider shares (RFC 9110: 401 refuses the credentials; a 403 is a
    permission denied, which may be about the model rather than the key,
    so it is L{RefusalKind.FORBIDDEN}); a provider with
    rules of its own adds them in its adapter's
    L{refusal <openclaw.providers.base.ProviderAdapter.refusal>} (Gemini's
    400 C{API_KEY_INVALID}: L{openclaw.providers.gemini.GeminiAdapter}).
    A request refused with OpenAI's C{error.code}
    L{CONTEXT_LENGTH_EXCEEDED} keeps that code (L{Refusal.code}).

    @param retry_after_header: the answer's C{Retry-After}, if any.
    @param now: POSIX time, to read a C{Retry-After} given as a date.
    @param body_delay: seconds to wait as the answer's body states it, if
        the provider's API says so there (read by its adapter:
        L{retry_delay <openclaw.providers.base.ProviderAdapter.retry_delay>});
        the C{Retry-After} header wins over it.
    """
    # fetch imports this module's errors: imported here, not at the top.
    from openclaw.providers.fetch import upstream_message
    from openclaw.providers.wire import json_or_none, reported_error

    message = clip(upstream_message(body))
    retry_after = parse_retry_after(retry_after_header, now)
    if retry_after is None:
        retry_after = body_delay
    if retry_after is not None:
        retry_after = min(retry_after, MAX_RETRY_AFTER_SECONDS)
    if status == 401:
        kind = RefusalKind.AUTH
    elif status == 403:
        kind = RefusalKind.FORBIDDEN
    elif status == 429:
        kind = RefusalKind.RATE_LIMITED
        if retry_after is None:
            # The rest the key gets (KeyPool.rest), told to the client too.
            retry_after = DEFAULT_REST_SECONDS
    elif status == 402:
        # Payment Required (RFC 9110 section 15.5.3: reserved; every API
        # that answers it means billing): the operator's account.
        kind = RefusalKind.ACCOUNT
    elif status in REQUEST_STATUSES:
        kind = RefusalKind.REQUEST
    elif status >= 500 or status < 100:
        # Below 100: no status at all (RFC 9110 section 15 defines three
        # digits from 100 to 599; twisted.web reads "000" as 0): a broken
        # provider, as a 5xx is.
        kind = RefusalKind.SERVER
    else:
        kind = RefusalKind.OTHER
    error = reported_error(json_or_none(body))
    stated = status != 404 or error is not None
    code = None
    if kind == RefusalKind.REQUEST and error is not None and error.fields.get("code") == CONTEXT_LENGTH_EXCEEDED:
        # OpenAI's own words (and those of APIs that copy its errors).
        code = CONTEXT_LENGTH_EXCEEDED
    return Refusal(status, kind, message, retry_after, stated, code)
