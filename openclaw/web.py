"""
What the API's resources and the C{/metrics} ones answer alike, on
twisted.web: imported by L{openclaw.dataplane} and L{openclaw.metrics}
both, so it imports neither.
"""

from __future__ import annotations

from twisted.web.iweb import IRequest


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


__all__ = ["head_or_body"]
