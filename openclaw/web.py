"""
What the API's resources, the C{/metrics} ones and the providers' errors
say of HTTP alike, on twisted.web: imported by L{openclaw.dataplane},
L{openclaw.metrics} and L{openclaw.providers}, so it imports none of them.
"""

from __future__ import annotations

from http import HTTPStatus
from types import MappingProxyType

from twisted.web.http import RESPONSES
from twisted.web.iweb import IRequest

#: The C{Server} field of every answer (RFC 9110 section 10.2.4), the API's
#: and C{/metrics}' (L{openclaw.dataplane.head.SERVER_FIELD}) and the control plane's
#: handshake (L{openclaw.control.protocol}): the product alone, where
#: twisted.web's and Autobahn's defaults name their versions.
SERVER_NAME = "openclaw"

#: Reason phrases by status, as the IANA registry of RFC 9110 section
#: 16.2.1 names them (L{HTTPStatus}): twisted.web's table lacks some (429
#: Too Many Requests, RFC 6585) and keeps RFC 2616's older wording for
#: others ("Gateway Time-out").
REASON_PHRASES = MappingProxyType({status.value: status.phrase.encode("ascii") for status in HTTPStatus})


def reason_phrase(status: int) -> bytes | None:
    """
    The reason phrase of an HTTP status line: the standard one
    (L{REASON_PHRASES}), else twisted.web's; L{None} for a status with
    none.
    """
    return REASON_PHRASES.get(status) or RESPONSES.get(status)


def status_line(status: int) -> str:
    """
    A status as people read it in a message: C{"HTTP 429 Too Many
    Requests"}, or C{"HTTP 599"} for a status with no phrase.
    """
    phrase = reason_phrase(status)
    return f"HTTP {status}{' ' + phrase.decode('ascii', 'replace') if phrase else ''}"


def head_or_body(request: IRequest, body: bytes) -> bytes:
    """
    What a resource's C{render} returns for C{request}, whose answer (to
    C{GET}) is C{body}: C{body} itself; to C{HEAD}, C{b""}, with
    C{Content-Length} set to C{len(body)} (bytes), the GET answer's length
    without its body (RFC 9110 section 9.3.2).  twisted.web leaves a HEAD
    answer's body out by itself, but logs a line (the request's whole URI
    in it) for every HEAD whose resource returned one.
    """
    if request.method == b"HEAD":
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return b""
    return body


__all__ = ["REASON_PHRASES", "head_or_body", "reason_phrase", "status_line"]


#: A body's first bytes that tell its compression (gzip, RFC 1952; zstd,
#: RFC 8878; zlib, RFC 1950, as HTTP's deflate is sent, at each level),
#: by the content coding's name (L{compression_of}).
_COMPRESSED = MappingProxyType(
    {
        b"\x1f\x8b": "gzip",
        b"\x28\xb5\x2f\xfd": "zstd",
        b"\x78\x01": "deflate",
        b"\x78\x5e": "deflate",
        b"\x78\x9c": "deflate",
        b"\x78\xda": "deflate",
    }
)


def compression_of(body: bytes) -> str | None:
    """
    The content coding (C{"gzip"}, C{"zstd"}, C{"deflate"}) C{body} looks
    compressed with, by its first bytes, or None: for the refusal of a
    body that does not parse, sent compressed without a
    C{Content-Encoding} naming it (a client's, or a provider's that
    compressed an answer the gateway did not ask compressed).
    """
    if body[1:4] == b"\x2a\x4d\x18" and body[:1] >= b"\x50" and body[:1] <= b"\x5f":
        # A zstd skippable frame (magic 0x184D2A5?, RFC 8878 section
        # 3.1.2), which may come first: a seekable archive's, a pzstd's.
        return "zstd"
    return _COMPRESSED.get(body[:4]) or _COMPRESSED.get(body[:2])
