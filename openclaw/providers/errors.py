"""
Why a provider could not be used, in words an operator can act on.

Every reason produced here is meant to end up in a health report or a log
line, so each one says what happened, where, and (when there is something
to do) what to check; none ever contains an API key.
"""

from __future__ import annotations

import re

from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http import RESPONSES

from openclaw.tls import describe_tls_error, is_tls_error

#: Longest upstream message quoted in a reason; error bodies can be pages of HTML.
MAX_MESSAGE_CHARS = 200

REDACTED = "[redacted]"

#: Secrets at least this long are scrubbed wherever they occur; shorter
#: ones only as whole tokens (see L{scrub}).
MIN_BARE_SECRET_CHARS = 8


class ProviderError(Exception):
    """
    A provider could not be used.  C{str()} is the operator-facing reason.
    """


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


class ProbeTimedOut(ProviderError):
    """
    The whole exchange (connect, headers and body) overran its time limit.
    """


class UpstreamHTTPError(ProviderError):
    """
    The provider answered with a non-2xx status.
    """

    def __init__(self, status: int, message: str, hint: str | None = None) -> None:
        phrase = RESPONSES.get(status, b"").decode("ascii", "replace")
        text = f"HTTP {status}{' ' + phrase if phrase else ''}: {message}"
        if hint:
            text += f" ({hint})"
        super().__init__(text)
        self.status = status
        self.message = message


def scrub(text: str, secret: str | None) -> str:
    """
    Remove C{secret} from C{text}: some providers quote the key back in
    their error messages, and reasons end up in logs and reports.
    """
    if not secret:
        return text
    if len(secret) >= MIN_BARE_SECRET_CHARS:
        return text.replace(secret, REDACTED)
    # A toy key ("k" on a test setup) would mangle ordinary words if replaced
    # everywhere; replace it only where it stands as a token of its own.
    return re.sub(rf"(?<![\w-]){re.escape(secret)}(?![\w-])", REDACTED, text)


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """
    Collapse whitespace and cut C{text} to C{limit} characters.
    """
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


def http_hint(status: int, message: str, key_variable: str, base_url_variable: str) -> str | None:
    """
    What an operator should check after a given status (and message: Gemini
    rejects a bad key with a plain 400).
    """
    if status in (401, 403) or (status == 400 and "api key" in message.lower()):
        return f"check {key_variable}"
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
    One line saying why an exchange with C{host:port} failed.

    Twisted's web client wraps transport errors (L{ResponseNeverReceived},
    L{ResponseFailed}); the first wrapped reason is the telling one.
    """
    where = f"{host}:{port}"
    value = reason.value
    if isinstance(value, (ResponseNeverReceived, ResponseFailed)) and value.reasons:
        inner = value.reasons[0]
        if inner.check(neterror.ConnectionDone, neterror.ConnectionLost):
            when = "before answering" if isinstance(value, ResponseNeverReceived) else "mid-response"
            return f"connection closed by {where} {when}"
        return describe_failure(inner, host, port, base_url_variable)
    if isinstance(value, ProviderError):
        return str(value)
    if isinstance(value, CancelledError):
        return f"request to {where} cancelled (the gateway is stopping)"
    if isinstance(value, neterror.ConnectionRefusedError):
        return f"connection refused by {where}; is {base_url_variable} right and the service up?"
    if isinstance(value, neterror.DNSLookupError):
        return f"DNS lookup failed for {host}; check {base_url_variable} and this host's resolver"
    if isinstance(value, (neterror.TimeoutError, neterror.TCPTimedOutError)):
        return f"connecting to {where} timed out"
    if isinstance(value, neterror.NoRouteError):
        return f"no route to {where}; check the network"
    if is_tls_error(value):
        return f"TLS handshake with {where} failed ({clip(describe_tls_error(value), 120)})"
    if isinstance(value, neterror.ConnectError):
        return f"could not connect to {where}: {clip(str(value), 120)}"
    if isinstance(value, (neterror.ConnectionDone, neterror.ConnectionLost)):
        return f"connection to {where} lost"
    return f"request to {where} failed: {type(value).__name__}: {clip(str(value), 120)}"
