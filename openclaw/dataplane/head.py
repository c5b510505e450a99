"""
What twisted.web leaves to its users about a request's head, for both of
the gateway's sites (the API's, L{openclaw.dataplane.site}, and the
C{/metrics} listener's, L{openclaw.dataplane.metrics_site}): the checks of
RFC 9112 and RFC 9110 that its parser does not make (one C{Host} field that
is a host, a request target in origin form or an http(s) URL, a body
framed by its length or chunked), the answers written straight to a
connection before twisted.web has a request to answer with
(L{raw_response}), the base of both sites' requests (L{NextTurnRequest})
and the protocol of a connection turned away past a cap
(L{RefusedConnection}).
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterable
from typing import cast
from urllib.parse import urlsplit

from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    ISSLTransport,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import Request, Site

from openclaw.addresses import counted_key, peer_host
from openclaw.dataplane.answer import http11_channel
from openclaw.dataplane.context import REQUEST_ID_HEADER, new_request_id
from openclaw.dataplane.errors import APIError
from openclaw.web import SERVER_NAME, reason_phrase

#: The C{Server} field of the API's and C{/metrics}' answers.
SERVER_FIELD = SERVER_NAME.encode("ascii")


def client_address(addr: IAddress | None) -> str | None:
    """
    The client a connection counts against, by the control plane's rule
    (L{openclaw.addresses.counted_key}): its IPv4 address (an IPv4-mapped
    IPv6 address as the IPv4 one), or the /64 of its IPv6 address; None
    for a peer with no IP address (a UNIX socket), which no per-address
    cap applies to.
    """
    return counted_key(peer_host(addr))


def repeated_field(request: Request, name: bytes) -> bool:
    """
    Whether a request's head holds the field C{name} more than once.  Host
    (RFC 9112 section 3.2) and Authorization (one set of credentials, not
    a list: RFC 9110 sections 11.6.2 and 5.3) must come once; such a
    request is answered 400, since twisted.web would take the last and a
    proxy in front may have checked another.
    """
    return len(request.requestHeaders.getRawHeaders(name, ())) > 1


#: A registered name or IPv4 address (RFC 3986 section 3.2.2): runs of
#: unreserved and sub-delims characters between %-escapes of two hex
#: digits (no alternation per character: the field is read on every
#: request); empty too.
_NAME = rb"[A-Za-z0-9\-._~!$&'()*+,;=]*(?:%[0-9A-Fa-f]{2}[A-Za-z0-9\-._~!$&'()*+,;=]*)*"
#: A C{Host} field's value: C{uri-host [ ":" port ]} (RFC 9112 section 3.2,
#: RFC 3986 section 3.2.2): an IP literal in brackets or a name, then a
#: port of digits.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|" + _NAME + rb")(?::[0-9]*)?\Z")
#: The authority of an http or https URL: the same, with a host that is
#: not empty (RFC 9110 section 4.2.1).
_AUTHORITY = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|(?=[^:])" + _NAME + rb")(?::[0-9]*)?\Z")


def invalid_host(request: Request) -> bool:
    """
    Whether C{request}'s C{Host} field (if it has one) holds what is not
    a host and optional port: a server must answer such a request 400
    (RFC 9112 section 3.2).
    """
    host = request.getHeader(b"host")
    return host is not None and _HOST.match(host) is None


def lacks_host(request: Request, version: bytes) -> bool:
    """
    Whether a request is an HTTP/1.1 one without a C{Host} field, which a
    server must answer 400 (RFC 9112 section 3.2); HTTP/1.0 needs none.
    """
    return version == b"HTTP/1.1" and not request.requestHeaders.hasHeader(b"host")


def unframed_body(request: Request) -> bool:
    """
    Whether C{request} has C{Transfer-Encoding} fields other than exactly
    one C{chunked}: RFC 9112 section 6.3 has a server answer a request
    whose final transfer coding is not chunked 400 and close the
    connection, as its body's length cannot be told.  twisted.web ignores a
    field of C{identity} (or one line of C{chunked}, another of
    C{identity}) and frames the body by C{Content-Length}, or as empty,
    where a proxy in front may take it as chunked: the rest of the body
    would be read as another request (request smuggling).
    """
    codings = request.requestHeaders.getRawHeaders(b"transfer-encoding")
    return codings is not None and (len(codings) != 1 or codings[0].strip().lower() != b"chunked")


def head_end(tail: bytes, data: bytes) -> int:
    """
    Where, in C{data}, a request head's blank line ends (RFC 9112 section
    2.1: the head ends with CRLF CRLF): the index of the first byte after
    it, -1 when none ends in C{data}.  A split there is never wrong (the
    parser takes a request in any pieces), only needless where a body
    holds CRLF CRLF.

    @param tail: the last bytes read before C{data} (3 are enough), in
        which the blank line may have begun.
    """
    if tail[-1:] in (b"\r", b"\n"):
        for taken in (1, 2, 3):
            if len(data) >= taken and (tail + data[:taken]).endswith(b"\r\n\r\n"):
                return taken
    end = data.find(b"\r\n\r\n")
    return -1 if end < 0 else end + 4


def lose_connection(transport: ITransport) -> None:
    """
    Close C{transport} once what was written to it is sent.  twisted.web's
    channel (C{HTTPChannel}, C{H2Connection}) is the transport's producer
    and unregisters only in its own close, while a TLS transport closes
    only once no producer is registered (it would wait for an abort):
    the channel is unregistered first, as its own close does.
    """
    cast(IConsumer, transport).unregisterProducer()
    transport.loseConnection()


def origin_form(request: Request, method: bytes, target: bytes | None, version: bytes) -> bytes | None:
    """
    The path of a request target (C{/path?query}, or C{*} for C{OPTIONS}),
    taken from an HTTP/1.x absolute-form target too: a server must accept
    C{http://host:port/path?query} (RFC 9112 section 3.2.2), and then use
    its authority as the request's host, whatever the C{Host} field said
    (section 3.2.2 again; the field's presence was checked first, section
    3.2).  HTTP/2's C{:path} is never a URL (RFC 9113 section 8.3.1).

    @return: the path; L{None} for any other target, to be answered 400
        without echoing it: a URL whose authority is not a host (not
        empty, RFC 9110 section 4.2.1) and optional port (user information
        included, which RFC 9110 section 4.2.4 says to treat as an error),
        one of another scheme, one that is not a URL (C{http://[::1/}),
        an HTTP/2 C{:path} that is not a path, or none (an HTTP/2
        C{CONNECT}, RFC 9113 section 8.5).
    """
    if target is None:
        return None
    if target[:1] == b"/" or (target == b"*" and method == b"OPTIONS"):
        # C{*} is for OPTIONS only (RFC 9112 section 3.2.4).
        return target
    if not (version.startswith(b"HTTP/1.") and target[:8].lower().startswith((b"http://", b"https://"))):
        return None
    try:
        split = urlsplit(target)
    except ValueError:
        # A bracket that does not close, or an IPv6 literal that is not one.
        return None
    if _AUTHORITY.match(split.netloc) is None:
        return None
    request.requestHeaders.setRawHeaders(b"host", [split.netloc])
    return (split.path or b"/") + (b"?" + split.query if split.query else b"")


class _SiteChannel(typing.Protocol):
    """
    A twisted.web channel as a request sees it: with the L{Site} that made
    it (L{NextTurnRequest.channel_site}).
    """

    site: Site


class NextTurnRequest(Request):
    """
    A request that, over HTTP/2, is answered on the reactor's turn after
    its stream is whole (L{ready}).  twisted.web's HTTP/2 hands over a
    whole stream as it reads it, before the frames read with it are seen: a
    RST_STREAM in the same read (a client that gave up at once, a "rapid
    reset" flood) reaches the request only after, and an answer written at
    once went to a stream h2 had closed (StreamIDTooLowError, logged as a
    failure for every such stream).  On the next turn the reset is known.
    """

    #: Over HTTP/2: L{ready} put L{process} off to the next turn.
    _turned = False
    #: The connection (over HTTP/2: the stream) was lost.
    _lost = False

    def connectionLost(self, reason: Failure) -> None:
        self._lost = True
        super().connectionLost(reason)

    def setHeader(self, name: str | bytes, value: str | bytes) -> None:
        # twisted.web's process() sets a Server field naming Twisted's
        # version, also on the answers it makes itself (OPTIONS *, a
        # request for * with any other method): the product alone, as the
        # control plane's handshake.
        if name == b"Server":
            value = SERVER_FIELD
        super().setHeader(name, value)

    @property
    def channel_site(self) -> Site:
        """
        The site of the request's channel, known from the start (the
        request's own C{site} is set only once the request is whole):
        twisted.web's L{Site.buildProtocol} gives every channel it makes
        the site, and each HTTP/2 stream is given its connection's.
        """
        # Set by Site.buildProtocol on the channel it makes (its code, not
        # its documented API: HTTPChannel's class has no annotation for it)
        # and by H2Connection on each H2Stream; every API request reads it,
        # so a Twisted that stopped setting it fails every test.
        return cast(_SiteChannel, self.channel).site

    def ready(self) -> bool:
        """
        Whether L{process} may answer now: not the first time over HTTP/2
        (it is called again on the next turn), nor once the request is lost.
        """
        if not self._turned and http11_channel(self) is None:
            self._turned = True
            self.channel_site.reactor.callLater(0, self.process)
            return False
        return not self._lost


class RefusedConnection(Protocol):
    """
    The protocol of a connection turned away as it comes (past a cap):
    closed at once.  A factory that returns L{None} instead would do the
    same for a TCP listener, but a TLS listener's factory (Twisted's
    L{TLSMemoryBIOFactory <twisted.protocols.tls.TLSMemoryBIOFactory>})
    cannot wrap L{None}: it fails, and the connection stays open.
    """

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        if ISSLTransport.providedBy(transport):
            # Not waiting on a handshake the client may never finish.
            cast(ITCPTransport, transport).abortConnection()
        else:
            transport.loseConnection()


def raw_response(
    status: int,
    body: bytes,
    content_type: bytes = b"application/json",
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> bytes:
    """
    A whole HTTP/1.1 response (RFC 9112), closing the connection: for
    answers written before twisted.web has a request to answer with.  Its
    C{Server} names the product, as every answer's does; its C{Date} (RFC
    9110 section 6.6.1, as twisted.web's answers have) is now, in
    IMF-fixdate (L{http.datetimeToString}).

    @param status: its status code; the reason phrase is L{reason_phrase}'s.
    @param body: its body, sent with its C{Content-Length}.
    @param content_type: its C{Content-Type}.
    @param headers: more header fields, after C{Content-Type}.
    """
    reason = reason_phrase(status) or b"Error"
    fields = b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)
    head = (
        b"HTTP/1.1 %d %s\r\nServer: %s\r\nDate: %s\r\nContent-Type: %s\r\n%sContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n"
    )
    return head % (status, reason, SERVER_FIELD, http.datetimeToString(), content_type, fields, len(body)) + body


def raw_error_response(error: APIError, request_id: str | None = None) -> bytes:
    """
    L{raw_response} carrying C{error} in OpenAI's error shape, and the
    request's id (C{x-request-id}; a new one if none is given).
    """
    if request_id is None:
        request_id = new_request_id()
    headers = (*error.headers, (REQUEST_ID_HEADER, request_id.encode("ascii")))
    return raw_response(error.status, error.body(), headers=headers)
