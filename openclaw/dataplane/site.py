"""
The API's L{Site}: twisted.web's own connections (HTTP/1.1, and HTTP/2 on a
TLS listener when C{h2} is installed), a limit on request bodies
(L{APIRequest}), no access log of its own (the data plane counts every call
and logs a structured event for each failure instead), and what a stop
needs: wait for the calls in flight (L{APISite.drain}), then close every
connection and know when they are gone (L{APISite.close_connections}).

Against unauthenticated exhaustion of the port (issue #17): a body is read
only from a key holder (L{APIRequest.gotLength} answers 401 as soon as the
headers are in); connections are capped in all (C{API_MAX_CONNECTIONS},
lowered at start-up to what C{RLIMIT_NOFILE} leaves after the control
plane's share, L{openclaw.listeners.share_descriptors}) and per client address
(C{API_MAX_CONNECTIONS_PER_ADDRESS}), extra ones closed at once; and a
request's head and body each have a deadline of their own
(C{API_HEADER_TIMEOUT_SECONDS}, C{API_BODY_TIMEOUT_SECONDS}), which more
bytes do not extend, as Twisted's idle timeout is; a large answer's parts
each have one too (C{API_SEND_TIMEOUT_SECONDS},
L{openclaw.dataplane.answer.WholeAnswer}), and so do the answers of a
client that pipelines requests, which are read no further until it takes
them (L{APIConnection.pauseProducing}).
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterable
from typing import Any, assert_never, cast, get_args
from urllib.parse import urlsplit

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    INegotiated,
    IProtocol,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from zope.interface import alsoProvides, implementer

from openclaw.addresses import AddressSlots, counted_key, host_of, peer_host
from openclaw.connections import OpenConnections
from openclaw.consumers.table import Holder
from openclaw.dataplane.answer import Stream, StreamSendDeadline, WholeAnswer, http11_channel
from openclaw.dataplane.context import REQUEST_ID_HEADER, APIContext, clipped, new_request_id
from openclaw.dataplane.deadlines import SEND_TIMEOUT, ConnectionDeadlines
from openclaw.dataplane.errors import APIError, shutting_down
from openclaw.dataplane.resource import build_resource
from openclaw.listeners import descriptor_shares
from openclaw.logs import HTTP2_FLOOD_FIELD, METRICS_NAMESPACE
from openclaw.metrics import APIRefusal
from openclaw.settings import Settings
from openclaw.web import SERVER_NAME, head_or_body, reason_phrase

#: The C{Server} field of the API's and C{/metrics}' answers.
_SERVER = SERVER_NAME.encode("ascii")

#: How long API connections get to close politely on a stop, or after an
#: early refusal (L{APIConnection.close_politely}; a lingering close, too:
#: L{APIConnection.close_lingering}).
CLOSE_DEADLINE_SECONDS = 2.0
#: A lingering close (L{APIConnection.close_lingering}) ends, the
#: connection closed, once its client has sent nothing for this long
#: (seconds; nginx's C{lingering_timeout})...
LINGER_QUIET_SECONDS = 1.0
#: ... or, aborted, once it has read and dropped this many bytes (or
#: twice C{MAX_REQUEST_BYTES}, if more: L{APILimits.linger_bytes}), or
#: at L{CLOSE_DEADLINE_SECONDS} from the refusal (nginx's
#: C{lingering_time}), whichever comes first.
LINGER_MIN_BYTES = 16 * 1024 * 1024
#: Seconds a new API connection has to send its first request head before
#: it counts as keyless (if that head carried no accepted key, it counts
#: from then on): a client's first head arrives in one round trip, so a
#: key holder's new connection is never taken for a keyless one.
KEYLESS_GRACE_SECONDS = 1.0
#: The metrics listener's events.  Not an attribute of L{MetricsSite}: a
#: L{Logger} declared on a class takes the class's name as its namespace
#: (L{Logger.__get__}), and an instance attribute of a twisted.web site
#: would read like the site's own state.
_metrics_log = Logger(namespace=METRICS_NAMESPACE)


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


def _repeated_host() -> APIError:
    return APIError(
        400,
        "the request has more than one Host header field (RFC 9112 section 3.2); send exactly one",
        "invalid_request_error",
        "invalid_host",
    )


def _repeated_authorization() -> APIError:
    return APIError(
        400,
        "the request has more than one Authorization header field; send exactly one (Authorization: Bearer <key>)",
        "invalid_request_error",
        "invalid_authorization",
    )


def _invalid_host() -> APIError:
    return APIError(
        400,
        "the Host header field is not a host and optional port (RFC 9112 section 3.2, RFC 3986 section 3.2.2); "
        "send the server's host name or address, and a numeric port if any",
        "invalid_request_error",
        "invalid_host",
    )


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


def _missing_host() -> APIError:
    return APIError(
        400,
        "the HTTP/1.1 request has no Host header field (RFC 9112 section 3.2); send one",
        "invalid_request_error",
        "missing_host",
    )


def lacks_host(request: Request, version: bytes) -> bool:
    """
    Whether a request is an HTTP/1.1 one without a C{Host} field, which a
    server must answer 400 (RFC 9112 section 3.2); HTTP/1.0 needs none.
    """
    return version == b"HTTP/1.1" and not request.requestHeaders.hasHeader(b"host")


#: The fields an API request may carry once only, and the 400 for a repeat.
_SINGLE_FIELDS = ((b"host", _repeated_host), (b"authorization", _repeated_authorization))


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


def _unframed_body() -> APIError:
    return APIError(
        400,
        "the request's Transfer-Encoding is not chunked alone (RFC 9112 section 6.3: a body whose final transfer "
        "coding is not chunked has no length to read it by); send the body with a Content-Length, or with "
        "Transfer-Encoding: chunked only",
        "invalid_request_error",
        "invalid_transfer_encoding",
    )


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


def _invalid_target() -> APIError:
    return APIError(
        400,
        "the request target is neither a path nor an http(s) URL whose authority is a host and optional port "
        "(RFC 9112 section 3.2.2; no user information, RFC 9110 section 4.2.4); send the path alone, such as "
        "/v1/chat/completions",
        "invalid_request_error",
        "invalid_request_target",
    )


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
            value = _SERVER
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


class MetricsRequest(NextTurnRequest):
    """
    A request of the C{/metrics} listener (C{--metrics-listen}): one with
    more than one C{Host} field, a C{Host} that is not one, or a body (the
    listener serves C{GET /metrics} only) is answered 400, as soon as its
    head is in, and the connection closed (over HTTP/2: answered once its
    stream ends, but a stream whose body comes is reset); nothing of a
    body is kept.
    """

    def gotLength(self, length: int | None) -> None:
        repeated = repeated_field(self, b"host")
        channel = http11_channel(self)
        if repeated:
            self._refuse(self._BODY)
        elif invalid_host(self):
            self._refuse(self._INVALID_HOST)
        elif length or (length is None and channel is not None) or unframed_body(self):
            # A length, or (HTTP/1.1) chunked, or another transfer coding: a body.
            self._refuse(self._NO_BODY)
        # Nothing of a body is kept, refused or not (none is read).
        super().gotLength(0)

    def _refuse(self, body: bytes) -> None:
        """
        Answer 400 with C{body}: over HTTP/1.1 at once (the connection
        closed); over HTTP/2 once the stream ends (L{process}).
        """
        if self._refused is not None:
            return
        self._refused = body
        channel = http11_channel(self)
        if channel is not None:
            self.requestHeaders.removeHeader(b"expect")
            self._bad_request(channel, body)

    #: The body of the 400 the request is refused with, if it is.
    _refused: bytes | None = None
    _BODY = b"more than one Host header field (RFC 9112 section 3.2); send exactly one\n"
    _NO_BODY = b"this listener (--metrics-listen) serves GET /metrics only: send no request body\n"
    _INVALID_HOST = b"the Host header field is not a host and optional port (RFC 9112 section 3.2); send one\n"
    _NO_HOST = b"the HTTP/1.1 request has no Host header field (RFC 9112 section 3.2); send one\n"

    _INVALID_TARGET = (
        b"the request target is neither a path nor an http(s) URL whose authority is a host and optional port "
        b"(RFC 9112 section 3.2.2); send the path alone: /metrics\n"
    )

    def requestReceived(self, command: bytes, path: bytes | None, version: bytes) -> None:
        if http11_channel(self) is not None and lacks_host(self, version):
            self._refuse(self._NO_HOST)
        target = origin_form(self, command, path, version)
        if target is None:
            self._refuse(self._INVALID_TARGET)
            # Never routed (refused), nor echoed.
            target = b"/"
        super().requestReceived(command, target, version)

    def _bad_request(self, channel: HTTPChannel, body: bytes) -> None:
        """
        Answer 400 with C{body} (plain text), close the connection, and log
        the refusal at info (the site's L{MetricsSite.log} never sees it).
        """
        transport = channel.transport
        assert transport is not None
        transport.write(raw_response(400, body, b"text/plain; charset=utf-8"))
        lose_connection(transport)
        self._log_refusal(body)

    def _log_refusal(self, body: bytes) -> None:
        _metrics_log.info(
            "refused a request with {status} for {peer}: {reason}",
            status=400,
            peer=host_of(self.getClientAddress()),
            reason=body.decode("ascii").rstrip("\n"),
        )

    def process(self) -> None:
        if not self.ready() or self._reset:
            return
        if self._refused is None:
            super().process()
        elif http11_channel(self) is None:
            # An HTTP/2 stream, now whole: answer it the usual way.
            self.setResponseCode(400)
            self.setHeader(b"content-type", b"text/plain; charset=utf-8")
            self.write(self._refused)
            self.finish()

    def handleContentChunk(self, data: bytes) -> None:
        # A body: dropped (over HTTP/2 its length may not have been given).
        if not data or self._reset:
            return
        self._refuse(self._NO_BODY)
        if http11_channel(self) is None:
            # An HTTP/2 stream would be answered only once it ends, which a
            # client sending for ever would put off: reset, on the next
            # turn (twisted.web is still going through the frames read with
            # this one, some of which may be the stream's), and logged.
            self._reset = True
            self._log_refusal(self._NO_BODY)
            self.channel_site.reactor.callLater(0, self._reset_stream, self.channel)

    def _reset_stream(self, stream: object) -> None:
        if not self._lost:
            # The H2Stream: RST_STREAM.
            cast(ITCPTransport, stream).abortConnection()

    #: Over HTTP/2: the stream is reset for its body.
    _reset = False


class MetricsRoot(Resource):
    """
    The root of the C{/metrics} listener (C{--metrics-listen}): C{metrics}
    at C{/metrics}, and for any other path a short plain-text 404 saying
    what the listener serves, rather than twisted.web's HTML "No Such
    Resource" page.
    """

    def __init__(self, metrics: Resource) -> None:
        super().__init__()
        self.putChild(b"metrics", metrics)

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _MetricsNotFound()

    def render(self, request: Request) -> bytes:
        return _MetricsNotFound().render(request)


class _MetricsNotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return head_or_body(request, b"no such endpoint: this listener (--metrics-listen) serves GET /metrics only\n")


class MetricsSite(Site):
    """
    The site of the C{/metrics} listener (C{--metrics-listen}), serving
    C{resource}: its requests are L{MetricsRequest}s, and each one is
    logged as a structured event (method, path, status, peer), a refusal
    at info (a 400 L{MetricsRequest} writes itself: status, peer and
    reason) and a scrape at debug, like the data plane's calls, instead of
    twisted.web's access line at info for every scrape.
    """

    requestFactory = MetricsRequest

    def __init__(
        self, resource: Resource, idle_timeout: float, max_connections: int, reactor: IReactorTime | None = None
    ) -> None:
        # A connection idle (no bytes from the client) this long is closed.
        super().__init__(resource, timeout=idle_timeout, reactor=reactor)
        #: Connections open at most: past them a new one is closed at once.
        self.max_connections = max_connections
        #: Connections open at most from one client address (a quarter).
        self.max_connections_per_address = max(1, max_connections // 4)
        #: Connections open now.
        self.open_connections = 0
        #: Connections open now, per client address.
        self.per_address = AddressSlots()

    # IProtocolFactory.buildProtocol gives any IProtocol; twisted.web's
    # HTTPFactory annotates it with its own channel's type.
    def buildProtocol(self, addr: IAddress | None) -> IProtocol:  # type: ignore[override]
        address = client_address(addr)
        if (
            self.open_connections >= self.max_connections
            or self.per_address.held(address) >= self.max_connections_per_address
        ):
            return RefusedConnection()
        self.open_connections += 1
        self.per_address.take(address)
        return CountedConnection(super().buildProtocol(addr), self, address)

    def connection_closed(self, address: str | None) -> None:
        """
        One of its connections, from C{address}, is gone
        (L{CountedConnection}).
        """
        self.open_connections -= 1
        self.per_address.release(address)

    def log(self, request: http.Request) -> None:
        status = request.code
        _metrics_log.emit(
            LogLevel.info if status >= 400 else LogLevel.debug,
            "{method} {path} {status} for {peer}",
            method=clipped(request.method.decode("ascii", "replace")),
            path=clipped(request.path.decode("ascii", "replace")),
            status=status,
            peer=host_of(request.getClientAddress()),
        )


class CountedConnection(proxyForInterface(IProtocol, "protocol")):  # type: ignore[misc]
    """
    A connection of a L{MetricsSite}: the protocol twisted.web built for it,
    which it passes every event to, telling the site once it is gone.
    """

    def __init__(self, protocol: IProtocol, site: MetricsSite, address: str | None) -> None:
        self.protocol = protocol
        self.site = site
        self.address = address

    def connectionLost(self, reason: Failure) -> None:
        try:
            self.protocol.connectionLost(reason)
        finally:
            self.site.connection_closed(self.address)


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


class APIRequest(NextTurnRequest):
    """
    A request whose body may not exceed the site's C{max_request_bytes},
    and is read only from a key holder.

    twisted.web reads the whole body (to memory, or a temporary file past
    100 KB) before any resource sees it, with no limit of its own: without
    this a client, authenticated or not, could fill memory or the disk.
    Nothing past the limit is kept.  Over HTTP/1.1 a declared length over
    the limit gets a 413 at once and the connection is closed with a
    lingering close (the client may still be sending:
    L{APIConnection.close_lingering}), and a chunked body that runs past it
    is cut off the same way.  Over HTTP/2 only the stream is refused: the rest of its
    body is read and dropped, and the 413 goes out when the stream ends.

    A request that comes with a body (a C{Content-Length} over 0, or
    chunked) without an accepted key in C{Authorization} is answered 401
    the same way, as soon as its headers are in, whatever its path: only
    C{/v1} calls take a body, and they all need a key.

    It tells its connection (L{APIConnection}) when its head and its body
    are complete and when its answer is finished, for their deadlines.

    Each has an id (L{request_id}), sent with its answer as
    C{x-request-id} and logged with it.
    """

    #: The request's id (L{openclaw.dataplane.context.new_request_id}):
    #: its answer's C{x-request-id} and its log lines' C{request_id}.
    request_id: str
    #: The site: the channel's (every channel of the API's site is given it
    #: when made, by twisted.web's C{HTTPFactory.buildProtocol}), not the
    #: request's own C{site}, which twisted.web sets only once the request
    #: is whole.  Looked up once, as the request is made.
    api_site: APISite

    #: Who holds the request's key, once its head was checked (requests
    #: with a body); None until then.
    holder: Holder | None = None

    _received = 0
    _refusal: APIError | None = None
    #: An HTTP/2 stream's C{(length, has_body)} until its head is whole
    #: and checked (L{gotLength}).
    _head_unchecked: tuple[int | None, bool] | None = None
    #: The request's connection, looked up once its head is whole.
    _connection: APIConnection | None = None
    #: Over HTTP/2: the stream's body deadline (L{_stream_late}), until
    #: the request is whole; and the client address its slot (if it holds
    #: one: L{APISite.admit_stream}) counts against.
    _stream_deadline: IDelayedCall | None = None
    #: Over HTTP/2: C{(client address,)} while the stream holds a slot
    #: (L{APISite.admit_stream}).
    holds_slot: tuple[str | None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request_id = new_request_id()
        self.api_site = cast(APISite, self.channel_site)

    @property
    def max_request_bytes(self) -> int:
        """
        The site's limit (the site every twisted.web channel is given).
        """
        return self.api_site.limits.max_request_bytes

    @property
    def connection(self) -> APIConnection | None:
        """
        The HTTP/1.1 connection this request came on (None over HTTP/2).
        """
        channel = http11_channel(self)
        return self.api_site.connection_of(channel.transport) if channel is not None else None

    @property
    def stream_send_deadline(self) -> StreamSendDeadline | None:
        """
        Over HTTP/2, a new send deadline for a large answer on this
        request's stream (C{API_SEND_TIMEOUT_SECONDS} per pause of its flow
        control); None over HTTP/1.1 (the connection keeps that deadline).
        """
        if http11_channel(self) is not None:
            return None
        site = self.api_site
        # An H2Stream (twisted.web types every request's channel HTTPChannel).
        stream = cast(Stream, self.channel)
        return StreamSendDeadline(site.reactor, site.limits.send_timeout, stream, site.http2_answers)

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        """
        Set the status, with its standard reason phrase (L{reason_phrase})
        when none is given: twisted.web's own table lacks some (429 went
        out as "429 Unknown Status").
        """
        super().setResponseCode(code, reason_phrase(code) if message is None else message)

    def gotLength(self, length: int | None) -> None:
        # Called by twisted.web once the head is whole (requestHeaders set);
        # over HTTP/2 as soon as the content-length field is read.
        connection = self._connection = self.connection
        has_body = length is None or length > 0
        if connection is not None:
            connection.head_received(has_body, self.channel)
        elif http11_channel(self) is None:
            # An HTTP/2 stream: twisted.web calls this on reading its
            # content-length field, before the fields after it (an
            # Authorization among them).  Its head is checked once whole:
            # with the first part of its body, or the whole request.
            # Until then its body has no buffer of its own (twisted.web's
            # is a temporary file past 100 KB, or with no length).
            self._head_unchecked = (length, has_body)
            super().gotLength(0)
            if self._stream_deadline is None:
                # Once: twisted.web calls this again for each repeated
                # content-length field.
                site = self.api_site
                self._stream_deadline = site.reactor.callLater(site.limits.body_timeout, self._stream_late)
            return
        refusal = self._check_head(length, has_body, connection)
        if refusal is not None:
            super().gotLength(0)
            self._refuse(refusal, unread_body=has_body)
            return
        super().gotLength(length)

    def _check_head(self, length: int | None, has_body: bool, connection: APIConnection | None) -> APIError | None:
        """
        The refusal a whole request head gets, if any: a repeated C{Host}
        or C{Authorization} (400), a body without an accepted key (401,
        whatever its size: README, "No body without a key"), a declared
        length over C{MAX_REQUEST_BYTES} (413).  A key found is kept
        (L{holder}), and the connection told.  First, C{Transfer-Encoding}
        fields other than one C{chunked} (400, L{unframed_body}).
        """
        if unframed_body(self):
            return _unframed_body()
        for name, refusal in _SINGLE_FIELDS:
            if repeated_field(self, name):
                return refusal()
        if invalid_host(self):
            return _invalid_host()
        context = self.api_site.context
        if has_body:
            if context is not None:
                holder = context.keys.identify(self.getHeader(b"authorization"))
                if isinstance(holder, APIError):
                    return holder
                # Known now; the resource need not look the key up again.
                self.holder = holder
                if connection is not None:
                    connection.key_accepted()
            if length is not None and length > self.max_request_bytes:
                return self._too_large()
        elif connection is not None and connection.keyless and context is not None:
            # Looked up once per connection until a key is accepted on it.
            authorization = self.getHeader(b"authorization")
            if authorization is not None:
                found = context.keys.identify(authorization)
                if not isinstance(found, APIError):
                    self.holder = found
                    connection.key_accepted()
            if connection.keyless:
                # A head without an accepted key: keyless from now on.
                connection.count_keyless()
        return None

    def _check_whole_head(self) -> None:
        """
        An HTTP/2 stream's head is whole now: check it (L{_check_head}),
        its key counted for its connection (L{APISite.http2_connection}).
        """
        unchecked, self._head_unchecked = self._head_unchecked, None
        if unchecked is not None and self._refusal is None:
            connection = self.api_site.http2_connection((self.getHost(), self.getClientAddress()))
            refusal = self._check_head(*unchecked, connection)
            if refusal is None:
                # Accepted (its key checked, if it has a body): a slot, then
                # the body's buffer for its declared length.
                refusal = self.api_site.admit_stream(self)
            if refusal is not None:
                self._refuse(refusal)
            else:
                super().gotLength(unchecked[0])

    def handleContentChunk(self, data: bytes) -> None:
        if self._head_unchecked is not None:
            length, has_body = self._head_unchecked
            if not has_body:
                if not data:
                    # An empty DATA frame (some clients end a GET so): the
                    # head is checked once the request is whole.
                    return
                # Data on a stream its head declared bodiless: a body, which
                # needs a key as any (a keyless GET sending DATA held a slot).
                self._head_unchecked = (length, True)
            self._check_whole_head()
        if self._refusal is not None:
            return
        self._received += len(data)
        if self._received > self.max_request_bytes:
            self._refuse(self._too_large(), unread_body=True)
            return
        super().handleContentChunk(data)

    def _stream_late(self) -> None:
        """
        An HTTP/2 stream's request is not whole within
        C{API_BODY_TIMEOUT_SECONDS} of its head: logged and counted as the
        408 an HTTP/1.1 connection gets, and the stream reset (nothing can
        be answered on a stream before its request ends), its slot and any
        buffer of its body let go.
        """
        self._stream_deadline = None
        if self._lost or self.finished:
            return
        site = self.api_site
        seconds = site.limits.body_timeout
        if site.context is not None:
            error = APIError(
                408,
                f"the request did not arrive whole in time: its HTTP/2 stream took more than "
                f"API_BODY_TIMEOUT_SECONDS ({seconds:g} s); send the whole request at once",
                "invalid_request_error",
                "request_timeout",
            )
            holder = self.holder
            site.context.refused_early(
                error,
                peer=host_of(self.getClientAddress()),
                consumer=None if holder is None else holder.consumer,
                request_id=self.request_id,
            )
        self.reset_stream()

    def _ended_connection(self) -> bool:
        """
        Whether this HTTP/2 stream's connection was ended by twisted.web
        meanwhile: its rapid-reset limit ends a connection in the middle of
        a read, and the streams that read still brings are handed over all
        the same, to a connection that can write no answer (each was an h2
        C{ProtocolError} logged at critical).  Such a stream is let go when
        the connection is.
        """
        connection = self.api_site.http2_connection((self.getHost(), self.getClientAddress()))
        return connection is not None and connection.ended_by_http2

    def _end_stream_deadline(self) -> None:
        deadline, self._stream_deadline = self._stream_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def reset_stream(self) -> None:
        """
        Reset this request's HTTP/2 stream (RST_STREAM) and let go of its
        slot (L{APISite.admit_stream}): twisted.web's
        C{H2Stream.abortConnection} drops the stream without telling its
        request, so that neither C{notifyFinish} nor C{connectionLost}
        ever comes.  Every reset the gateway makes goes through here.
        """
        site = self.api_site
        cast(ITCPTransport, self.channel).abortConnection()
        site.stream_done(self)

    def connectionLost(self, reason: Failure) -> None:
        if self._stream_deadline is not None:
            self._end_stream_deadline()
        super().connectionLost(reason)

    def requestReceived(self, command: bytes, path: bytes | None, version: bytes) -> None:
        if self._stream_deadline is not None:
            self._end_stream_deadline()
        connection = self._connection
        if connection is not None:
            connection.body_received()
        if self._head_unchecked is not None:
            self._check_whole_head()
        if self._refusal is None and lacks_host(self, version):
            # The version is known only now, with the whole request.  A
            # target that is not a path is not logged: it may be a URL
            # carrying a password.
            self._refuse(_missing_host(), command, path if path is not None and path[:1] == b"/" else None)
        target = origin_form(self, command, path, version)
        if target is None:
            if self._refusal is None:
                # Logged without the target: it may carry a password.
                self._refuse(_invalid_target(), command, None)
            target = b"/"
        super().requestReceived(command, target, version)

    def process(self) -> None:
        if not self.ready() or (self._turned and self._ended_connection()):
            # Reset before it was answered (or its HTTP/2 connection ended):
            # nothing to answer, nothing to count (it never reached the
            # gateway's code).  Only an HTTP/2 stream is turned.
            return
        # Whatever answers (a resource, twisted.web's own 404 or 500).
        self.setHeader(REQUEST_ID_HEADER, self.request_id.encode("ascii"))
        refusal = self._refusal
        if refusal is None:
            super().process()
        elif http11_channel(self) is None:
            # An HTTP/2 stream, now whole: answer it the usual way.
            self._refused(refusal, self.method, self.path)
            body = refusal.body()
            self.setResponseCode(refusal.status)
            self.setHeader(b"Server", _SERVER)
            self.setHeader(b"Date", http.datetimeToString())
            self.setHeader(b"Content-Type", b"application/json")
            for name, value in refusal.headers:
                self.setHeader(name, value)
            self.setHeader(b"Content-Length", b"%d" % len(body))
            self.write(body)
            self.finish()
        # Over HTTP/1.1 the refusal went out already and the connection is closing.

    def finish(self) -> None:
        if self._stream_deadline is not None:
            self._end_stream_deadline()
        connection = self._connection
        if connection is not None:
            # Before twisted.web goes on to a pipelined request's head.
            connection.response_finished()
        super().finish()

    def _refuse(
        self, refusal: APIError, command: bytes | None = None, uri: bytes | None = None, unread_body: bool = False
    ) -> None:
        """
        Answer C{refusal} before any resource sees the request, logged and
        counted (L{APIContext.refused_early}).  Over HTTP/1.1 at once, and
        the connection closed (with a lingering close,
        L{APIConnection.close_lingering}, if the client may still be
        sending C{unread_body}); over HTTP/2 once the stream is whole
        (L{process}).

        @param command: the request's method, once twisted.web has it
            (L{requestReceived}: only with the whole request, so a refusal
            made as the head comes in is logged with C{-}).
        @param uri: the request's target, likewise.
        @param unread_body: the request has a body not read (whole).
        """
        self._refusal = refusal
        channel = http11_channel(self)
        if channel is None:
            return  # answered in process(), once the stream is whole
        self._refused(refusal, command, uri)
        # No "100 Continue" after the refusal (twisted.web sends one on
        # Expect once gotLength returns).
        self.requestHeaders.removeHeader(b"expect")
        transport = channel.transport
        assert transport is not None
        transport.write(raw_error_response(refusal, self.request_id))
        connection = self._connection
        if connection is None:
            transport.loseConnection()
        elif unread_body:
            # The client may be sending the body still (README, "Early
            # refusals reach the client").
            connection.close_lingering()
        else:
            # Not a 408 too, should the refusal not go out before the
            # request's deadline.
            connection.close_politely()

    def _refused(self, refusal: APIError, command: bytes | None, uri: bytes | None) -> None:
        """
        Log and count C{refusal} as the request's answer.
        """
        context = self.api_site.context
        if context is None:
            return
        holder = self.holder
        context.refused_early(
            refusal,
            peer=host_of(self.getClientAddress()),
            method="-" if command is None else command.decode("ascii", "replace"),
            path="-" if uri is None else uri.split(b"?", 1)[0].decode("ascii", "replace"),
            consumer=None if holder is None else holder.consumer,
            request_id=self.request_id,
        )

    def _too_large(self) -> APIError:
        limit = self.max_request_bytes
        return APIError(
            413,
            f"the request body is larger than this gateway's limit ({limit} bytes): shorten the request "
            "(send large images by https:// URL instead of an inline data: URL), or ask the operator to "
            "raise MAX_REQUEST_BYTES",
            "invalid_request_error",
            "request_too_large",
        )


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
    return head % (status, reason, _SERVER, http.datetimeToString(), content_type, fields, len(body)) + body


def raw_error_response(error: APIError, request_id: str | None = None) -> bytes:
    """
    L{raw_response} carrying C{error} in OpenAI's error shape, and the
    request's id (C{x-request-id}; a new one if none is given).
    """
    if request_id is None:
        request_id = new_request_id()
    headers = (*error.headers, (REQUEST_ID_HEADER, request_id.encode("ascii")))
    return raw_response(error.status, error.body(), headers=headers)


@implementer(IPushProducer)
class APIConnection(proxyForInterface(IProtocol, "protocol")):  # type: ignore[misc]
    """
    One client connection of an L{APISite}: the protocol twisted.web built
    for it (whatever HTTP version it turns out to speak), which it passes
    every event to, registered in the site's L{OpenConnections} from the
    moment it is made until the protocol has handled its loss.

    The protocol gets the real transport: nothing is added on the write path.

    It keeps the deadlines of an HTTP/1.1 connection: from the moment it
    opens, and from the end of each answer, the next request's head must be
    whole within C{API_HEADER_TIMEOUT_SECONDS}; a body, once its head is
    in, within C{API_BODY_TIMEOUT_SECONDS}.  Each starts once, not
    restarted by the bytes that trickle in.  Past a deadline the client
    gets a 408 (if it had begun a request) and the connection is closed.
    While a large answer goes out part by part (L{WholeAnswer}), each
    part must be taken within
    C{API_SEND_TIMEOUT_SECONDS} (L{sending}), else the connection is
    aborted.  The same holds for any answer of an HTTP/1.1 connection:
    from its first request it stands as the transport's producer in place
    of twisted.web's channel (which it passes every pause and resume on),
    and while the transport has it paused (the client does not take what
    was written) it reads no more requests and the client has
    C{API_SEND_TIMEOUT_SECONDS} to read again (L{pauseProducing}).  These
    deadlines cover every
    wait twisted.web's own idle timeout would (it is off while a request is
    answered), so that timer, moved at every request, is not kept for an
    HTTP/1.1 connection; an HTTP/2 connection is left to it instead.  The
    keyless deadline (C{API_KEYLESS_TIMEOUT_SECONDS} from opening, for a
    connection no request head on which has carried an accepted key)
    holds for both: an HTTP/2 stream's head counts for its connection
    (L{APISite.http2_connection}).

    The timers of these deadlines, and of its close, are kept by a plain
    L{ConnectionDeadlines}: this connection passes its events on to it,
    and acts at its callbacks (L{_expired}, L{_stalled}, L{_grace_over},
    L{_keyless_due}).

    @ivar protocol: the protocol twisted.web built.
    @ivar transport: the connection's transport, once made.
    @ivar address: the client address it counts against (L{client_address}).
    """

    transport: ITransport | None = None
    #: No request head on it has carried an accepted key yet.
    keyless = True
    #: Counted among the site's keyless connections (and so liable to be
    #: closed to make room): it sent a head without an accepted key, or
    #: sent none within L{KEYLESS_GRACE_SECONDS}, or speaks HTTP/2 over
    #: other than IP (L{APISite.http2_opened}).
    counted_keyless = False
    #: Bytes arrived since the last answer: a request is under way.
    _started = False
    #: A request's head is whole and its body is still to come (HTTP/1.1).
    _awaiting_body = False
    #: The large answer going out, while its send deadline is in force.
    _sending: WholeAnswer | None = None
    #: A stop closes the connection once that answer is all handed over.
    _close_after_answer = False
    _http2 = False
    #: The protocol has handled the connection's loss.
    _lost = False
    #: twisted.web's HTTP/1.1 channel, once the transport's producer is
    #: this connection (L{head_received}); and the transport's reading.
    _channel: IPushProducer | None = None
    _reading: IPushProducer | None = None
    #: A lingering close (L{close_lingering}) under way, or the HTTP/2
    #: connection ended (L{_http2_ended}): bytes read and dropped since.
    _lingered: int | None = None
    #: The gateway has begun to close the connection itself (L{_lose}).
    _closing = False
    #: twisted.web's HTTP/2 connection ended the connection, and what comes
    #: is dropped (L{_http2_ended}).
    _ended_by_http2 = False
    #: An HTTP/2 connection's local and peer addresses, by which its
    #: streams' requests find it (L{APISite.http2_connection}).
    http2_key: tuple[IAddress, IAddress] | None = None

    @property
    def ended_by_http2(self) -> bool:
        """
        twisted.web's HTTP/2 connection has ended the connection
        (L{_http2_ended}): its streams can be answered no more.
        """
        return self._ended_by_http2

    def _arrived(self) -> int:
        return self._received

    @property
    def tcp(self) -> ITCPTransport:
        """
        The connection's transport (TCP, or TLS or a UNIX socket: each can
        be closed and aborted), once made.
        """
        assert self.transport is not None, "not connected"
        return cast(ITCPTransport, self.transport)

    def __init__(self, protocol: IProtocol, site: APISite, address: str | None) -> None:
        super().__init__(protocol)
        self._site = site
        self.address = address
        #: The bytes received so far (its request deadline's
        #: L{CatchingUp <openclaw.stalls.CatchingUp>}).
        self._received = 0
        #: Its timers (L{ConnectionDeadlines}): this connection passes its
        #: events on, and acts at their callbacks.
        self._deadlines = ConnectionDeadlines(
            site.reactor,
            late=self._expired,
            stalled=self._stalled,
            grace_over=self._grace_over,
            keyless=self._keyless_due,
            arrived=self._arrived,
        )

    def makeConnection(self, transport: ITransport) -> None:
        self.transport = transport
        limits = self._site.limits
        self._site.opened(self)
        self._deadlines.arm(limits.header_timeout, "API_HEADER_TIMEOUT_SECONDS", "its head")
        self._deadlines.start_keyless(limits.keyless_grace, limits.keyless_timeout)
        # No idle timer for HTTP/1.1: the deadlines above take its place.
        self.protocol.timeOut = None
        self.protocol.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self._received += len(data)
        if self._lingered is not None:
            self._linger_read(data)
            return
        if not self._started:
            self._started = True
            transport = self.transport
            if INegotiated.providedBy(transport) and transport.negotiatedProtocol == b"h2":
                self._http2 = True
                # twisted.web's idle timeout, which the HTTP/2 protocol
                # twisted.web switches to now takes on.
                self.protocol.timeOut = self._site.limits.http2_idle_timeout
                self._deadlines.end_request_deadlines()
                if not self._site.http2_opened(self):
                    # Its requests cannot find it: their keys are not
                    # counted, and it is keyless for its whole life.
                    self._deadlines.stop_keyless()
                    self.count_keyless()
        self.protocol.dataReceived(data)
        if self._http2 and not self._closing and getattr(self.transport, "disconnecting", False):
            self._http2_ended()

    def connectionLost(self, reason: Failure) -> None:
        # First: an answer finished while the protocol handles the loss
        # arms no deadline.
        self._lost = True
        self._sending = None
        self._deadlines.lost()
        try:
            self.protocol.connectionLost(reason)
        finally:
            self._site.closed(self)

    def key_accepted(self) -> None:
        """
        A request head on this connection carried an accepted key: it is no
        longer counted among the keyless ones, and has no keyless deadline.
        """
        if self.keyless:
            self.keyless = False
            self._deadlines.stop_keyless()
            if self.counted_keyless:
                self.counted_keyless = False
                self._site.key_accepted(self)

    def count_keyless(self) -> None:
        """
        This connection had its chance to send a key and did not: count it
        among the site's keyless connections (L{APISite.became_keyless},
        which may close it, or the oldest keyless one, to keep within the
        keyless shares).
        """
        if self.keyless and not self.counted_keyless and self in self._site.connections:
            self.counted_keyless = True
            self._site.became_keyless(self)

    def _grace_over(self) -> bool:
        """
        L{KEYLESS_GRACE_SECONDS} passed without a head carrying a key: the
        connection counts as keyless (L{count_keyless}).

        @return: whether its keyless deadline follows (it is still
            counted, and open).
        """
        if not self.keyless or self._sending is not None:
            # A large answer going out has its send deadline instead.
            return False
        self.count_keyless()
        return self.counted_keyless and self in self._site.connections

    def _keyless_due(self) -> None:
        if not self.keyless or self._sending is not None:
            # A large answer going out has its send deadline instead.
            return
        if self._http2:
            # No answer to write, as HTTP/1.1's 401: closed, with its streams.
            self._close_http2()
            return
        # The request's deadline (waiting for the resume, if paused) gives
        # way to this one.
        armed = self._deadlines.drop_request_deadline()
        seconds = self._site.limits.keyless_timeout
        if self._started and armed is not None and armed[1] == "API_HEADER_TIMEOUT_SECONDS":
            # A request head begun but not whole: it is late, not keyless
            # (its key may be in the part still to come), and logged as
            # refused at the keyless deadline all the same.
            self._expired(seconds, "API_KEYLESS_TIMEOUT_SECONDS", armed[2], outcome="keyless_timeout")
            return
        self._refused_late(
            APIError(
                401,
                f"no request with an accepted API key within API_KEYLESS_TIMEOUT_SECONDS ({seconds:g} s) of "
                "connecting; send 'Authorization: Bearer <key>' with the first request",
                "invalid_request_error",
                "keyless_timeout",
            )
        )

    def head_received(self, has_body: bool, channel: object) -> None:
        """
        A request's head is whole: its body, if it has one, may now take
        up to C{API_BODY_TIMEOUT_SECONDS}.  A request is under way (a 408
        at its deadline), also for a pipelined request's head, which
        twisted.web hands over from its buffer once the answer before it
        is finished.

        @param channel: the request's channel (twisted.web's
            L{HTTPChannel}): at the first request this connection becomes
            the transport's producer in its place (L{pauseProducing}).
        """
        if self._channel is None:
            self._produce_for(cast(IPushProducer, channel))
        self._started = True
        self._awaiting_body = has_body
        if has_body:
            self._deadlines.arm(self._site.limits.body_timeout, "API_BODY_TIMEOUT_SECONDS", "its body")
        else:
            self._deadlines.disarm()

    def body_received(self) -> None:
        """
        A request is whole: no deadline while it is answered (calls have
        UPSTREAM_TIMEOUT).
        """
        self._awaiting_body = False
        self._deadlines.disarm()

    def response_finished(self) -> None:
        """
        An answer is complete: the next request's head has
        C{API_HEADER_TIMEOUT_SECONDS} from now (if the connection is still
        open).
        """
        if self._lost:
            return
        self._started = False
        self._sending = None
        if self._close_after_answer:
            self.close_politely()
            return
        self._deadlines.arm(self._site.limits.header_timeout, "API_HEADER_TIMEOUT_SECONDS", "its head")

    def _produce_for(self, channel: IPushProducer) -> None:
        """
        Stand as the transport's producer in place of C{channel}, which
        registered itself when the connection was made (nothing was
        written to the transport since, so it has not paused it).
        """
        self._channel = channel
        if self._lost or self._deadlines.closing:
            return
        transport = self.tcp
        self._reading = IPushProducer(transport, None)
        consumer = cast(IConsumer, transport)
        consumer.unregisterProducer()
        consumer.registerProducer(self, True)

    def pauseProducing(self) -> None:
        """
        The transport holds more than its buffer: the client is not taking
        the answers (or not as fast as they come).  twisted.web's channel
        is paused (and so any answer going out part by part), the
        transport reads no more requests, and the client has
        C{API_SEND_TIMEOUT_SECONDS} to take what was written (the
        transport resumes its producer once it has handed it all to the
        kernel), else the connection is aborted; the request's own
        deadline, if any, waits meanwhile (L{resumeProducing}).

        twisted.web's channel stops reading itself only when it is paused
        between requests: paused while it answers one (as a small answer
        is written, before the request is finished), it goes on reading
        and answering pipelined requests, so the answers of a client that
        sends requests and never reads pile up in memory without bound.
        Here only the rest of what it has read already is answered.

        The transport pauses its producer at every write past its buffer:
        the deadline runs from the first, not moved by the gateway's own
        writes.
        """
        assert self._channel is not None
        self._channel.pauseProducing()
        if self._reading is not None:
            self._reading.pauseProducing()
        # None over HTTP/2, nor once the connection closes.
        self._deadlines.pause(self._site.limits.send_timeout, "the answers written")

    def resumeProducing(self) -> None:
        """
        The transport has handed all it held to the kernel: the send
        deadline ends, and the request's deadline that waited runs again,
        afresh; twisted.web's channel is resumed (it reads again once no
        request is in hand).
        """
        self._deadlines.resume()
        assert self._channel is not None
        self._channel.resumeProducing()

    def stopProducing(self) -> None:
        assert self._channel is not None
        self._channel.stopProducing()

    def sending(self, answer: WholeAnswer) -> None:
        """
        C{answer} hands the transport a part now: the client has
        C{API_SEND_TIMEOUT_SECONDS} from now to take it (the transport
        resumes the answer only once it has sent this part, so this is the
        time between two successive writes, as nginx's C{send_timeout},
        not the whole transfer).  Past it the connection
        is aborted (the status line is out: no error can be sent), and
        C{answer} told (L{WholeAnswer.timed_out}), so that its call is
        counted with outcome C{send_timeout}.
        """
        if self._lost:
            return
        self._sending = answer
        self._deadlines.arm(self._site.limits.send_timeout, SEND_TIMEOUT, "a part of the answer")

    def _stalled(self, seconds: float, setting: str, part: str) -> None:
        """
        The send deadline passed (L{sending}, L{pauseProducing}): the
        connection is aborted, the answer going out told.
        """
        answer, self._sending = self._sending, None
        if answer is not None:
            answer.timed_out()
        elif self._site.context is not None and not self._started:
            # Answers finished and counted already: the abort is logged
            # (a call under way, a stream, logs its own ending).
            self._site.context.log.info(
                "API connection from {peer} aborted: its client had not taken all of {part} within "
                "{setting} ({seconds:g} s)",
                peer=host_of(self.tcp.getPeer()),
                part=part,
                setting=setting,
                seconds=seconds,
            )
        self.tcp.abortConnection()

    def _expired(self, seconds: float, setting: str, part: str, outcome: str | None = None) -> None:
        self._refused_late(
            APIError(
                408,
                f"the request did not arrive whole in time: {part} took more than "
                f"{setting} ({seconds:g} s); send the whole request at once",
                "invalid_request_error",
                "request_timeout",
            ),
            outcome,
        )

    def _refused_late(self, error: APIError, outcome: str | None = None) -> None:
        """
        Close the connection at a deadline: with C{error} if the client
        had begun a request, silently if it was idle between requests.

        @param outcome: the log's C{outcome} when not C{error}'s code
            (L{APIContext.refused_early}).
        """
        if self._started:
            self._answer_raw(error, outcome)
        self.close_politely()

    def _answer_raw(self, error: APIError, outcome: str | None = None) -> None:
        """
        Answer the request under way with C{error}, written as it is
        (L{raw_error_response}: twisted.web is not answering it), logged
        and counted (L{APIContext.refused_early}); the caller closes.
        """
        transport = self.tcp
        request_id = new_request_id()
        if self._site.context is not None:
            self._site.context.refused_early(
                error, outcome, host_of(transport.getPeer()), request_id=request_id, keyless=self.keyless
            )
        transport.write(raw_error_response(error, request_id))

    def close_lingering(self) -> None:
        """
        Close the connection after an answer written while its client may
        still be sending (an early refusal: the body was not read), so that
        the client gets the answer: a lingering close (RFC 9112 section
        9.6; nginx's C{lingering_close}, Apache's lingering close).  A
        server that closes while bytes come in, or with bytes unread, has
        its kernel reset the connection, and a client still sending (the
        openai SDKs) may then lose the answer to the reset and see a
        connection error (EPIPE, ECONNRESET) instead.

        So only the sending side is closed once the answer is sent
        (C{ITCPTransport.loseWriteConnection}: a FIN after the answer), and
        what the client sends is read and dropped, until it closes its own
        side (then the connection is closed), or sends nothing for
        L{LINGER_QUIET_SECONDS} (closed), or has sent more than
        L{APILimits.linger_bytes} (aborted), or C{API_BODY_TIMEOUT_SECONDS}
        have passed (aborted: the time the client had to send a body; a
        deadline of the polite close's 2 s cut an upload slower than that
        short, with the EPIPE this avoids), and no more than
        C{API_KEYLESS_TIMEOUT_SECONDS} for a connection that has shown no
        key (a 401): no longer than any keyless connection is kept.

        Over TLS, and HTTP/2 (only over TLS), a polite close
        (L{close_politely}) instead: Twisted's TLS transport has no
        half-close of its own (C{loseWriteConnection} would shut the TCP
        connection's sending side under the TLS layer, with no
        C{close_notify}, while it may still have TLS records to send).
        """
        transport = self.transport
        if (
            self._http2
            or self._deadlines.closing
            or ISSLTransport.providedBy(transport)
            or not ITCPTransport.providedBy(transport)
        ):
            self.close_politely()
            return
        self.close_politely(linger=True)

    def _linger_read(self, data: bytes) -> None:
        """
        C{data} came during a lingering close, or after twisted.web's HTTP/2
        connection ended the connection (L{_http2_ended}): dropped, and the
        connection aborted past L{APILimits.linger_bytes}.
        """
        lingered = self._lingered = (self._lingered or 0) + len(data)
        self._deadlines.heard()
        if lingered > self._site.limits.linger_bytes:
            if self._ended_by_http2:
                self._site.http2_flooded(self)
            self.tcp.abortConnection()

    def _close_http2(self) -> None:
        """
        Close an HTTP/2 connection at the gateway's word (its keyless
        deadline): twisted.web's connection is unregistered as the TLS
        transport's producer, so that the transport sends its
        C{close_notify} and closes once the client answers it, with no
        more written (a TLS transport closes only once no producer is
        registered, L{lose_connection}); what comes meanwhile is dropped
        (L{_linger_read}), and the connection aborted at
        L{CLOSE_DEADLINE_SECONDS} (L{close_politely}).
        """
        self._lingered = 0
        lose_connection(self.tcp)
        self.close_politely()

    def _http2_ended(self) -> None:
        """
        twisted.web's HTTP/2 connection has ended the connection (h2 found a
        protocol error in what the client sent, such as a header block not
        ended within 64 CONTINUATION frames; or the client sent GOAWAY; or
        twisted.web's own idle or control-frame limit), yet the TLS
        transport reads on while that connection is its producer, and
        twisted.web hands h2 all that comes, which h2 then keeps without
        bound: one connection without a key could hold the gateway's memory
        without limit (CVE-2024-27316's class).

        From now on what comes is read and dropped (L{_linger_read}): the
        connection is aborted once more than L{APILimits.linger_bytes} came
        (logged, L{APISite.http2_flooded}), or L{CLOSE_DEADLINE_SECONDS}
        from now; a client that closes its side (after its GOAWAY) is gone
        at once, as before.  Seen from here by the TLS transport's
        C{disconnecting} (set by C{loseConnection}, and by an abort): no
        close of the gateway's own is under way then (L{_closing}).
        """
        self._ended_by_http2 = True
        self._lingered = 0
        self.close_politely()

    def readConnectionLost(self) -> None:
        """
        The client closed its sending side during a lingering close (this
        connection is then an C{IHalfCloseableProtocol}): closed once the
        answer is all sent (it may not be yet: a client that half-closes
        right after its request).
        """
        self.tcp.loseConnection()

    def writeConnectionLost(self) -> None:
        """
        The answer of a lingering close is sent and the sending side
        closed: reading on, as before.
        """

    def close_politely(self, linger: bool = False) -> None:
        """
        Close the connection once what was written to it is sent, and abort
        it if that takes more than L{CLOSE_DEADLINE_SECONDS} (a client that
        does not read could hold a polite close open); no other deadline
        of the connection runs from now on.

        @param linger: close only the sending side, and read on
            (L{close_lingering}, which checks the transport can).
        """
        if self._deadlines.closing:
            return
        transport = self.tcp
        if linger:
            self._linger()
        else:
            self._lose()
        # A lingering client gets the time it had for a body it may still be
        # sending (nginx's lingering_time is 30 s too), one without a key
        # no more than any keyless connection; a polite close, the time to
        # read its answer.
        limits = self._site.limits
        if linger:
            deadline = min(limits.keyless_timeout, limits.body_timeout) if self.keyless else limits.body_timeout
        else:
            deadline = CLOSE_DEADLINE_SECONDS
        self._deadlines.close(deadline, transport.abortConnection)

    def shutting_down(self) -> None:
        """
        The gateway is stopping: close this connection politely, at once,
        or, while a large answer goes out (L{WholeAnswer}), once it was all
        handed over (L{response_finished}).  Not before: a transport asked
        to close while its producer is paused resumes the producer when its
        buffer is empty rather than closing, and would then wait for a write
        that never comes.  An answer the stop cuts short (the site aborts
        what is left after L{CLOSE_DEADLINE_SECONDS}) is counted as the
        stop's (L{WholeAnswer.shutting_down}).
        """
        if self._sending is not None:
            self._sending.shutting_down()
            self._close_after_answer = True
        elif self._awaiting_body and not self._http2 and not self._deadlines.closing:
            # A request whose body was still coming when the stop began
            # (re-check s32: closed with nothing said, nor logged): 503
            # shutting_down, logged and counted, and the close lingers,
            # for the client may still be sending.
            self._awaiting_body = False
            self._answer_raw(
                attrs.evolve(
                    shutting_down(),
                    message="the gateway is shutting down and its request's body was still arriving; retry it",
                )
            )
            self.close_lingering()
        else:
            self._lose()

    def _linger(self) -> None:
        """
        Begin a lingering close (L{close_lingering}): the sending side
        closed once what was written is sent, reading on (resumed, should
        the transport have it paused), what comes dropped.
        """
        transport = self.tcp
        # The transport half-closes only once no producer is registered
        # (twisted.web's channel, or this connection in its place).
        cast(IConsumer, transport).unregisterProducer()
        self._lingered = 0
        # Closed once the client sends nothing for LINGER_QUIET_SECONDS.
        self._deadlines.start_quiet(LINGER_QUIET_SECONDS, transport.loseConnection)
        # The client's end of input is then read as that side's close
        # (readConnectionLost), not as the connection's loss, which would
        # drop an answer not yet all sent.
        alsoProvides(self, IHalfCloseableProtocol)
        transport.loseWriteConnection()
        reading = self._reading if self._reading is not None else IPushProducer(transport, None)
        if reading is not None:
            reading.resumeProducing()

    def abort(self) -> None:
        """
        Drop the connection now, at the gateway's word (a cap on keyless
        connections): not taken for twisted.web's own end of it.
        """
        self._closing = True
        self.tcp.abortConnection()

    def _lose(self) -> None:
        """
        Close the connection once what was written to it is sent.  Over
        HTTP/2, twisted.web's connection writes a finished answer's body
        (and the stop's own 503s) frame by frame on the turns after, which a
        TLS transport takes only while that connection is still its
        producer: it is left so, and the transport closes at the abort
        after L{CLOSE_DEADLINE_SECONDS} instead (L{lose_connection}).
        """
        self._closing = True
        if self._http2:
            self.tcp.loseConnection()
        else:
            lose_connection(self.tcp)


#: Seconds an HTTP/2 connection's idle timeout leaves past the longest a
#: call waits on providers, for its answer to go out (L{APILimits}).
HTTP2_IDLE_MARGIN_SECONDS = 10.0


@attrs.frozen(kw_only=True)
class APILimits:
    """
    The limits an L{APISite} keeps, read once from L{Settings}
    (L{from_settings}).
    """

    #: The largest request body accepted (C{MAX_REQUEST_BYTES}).
    max_request_bytes: int
    #: Open connections at most, in all (C{API_MAX_CONNECTIONS}, within
    #: the L{descriptor_budget}) and from one client address
    #: (C{API_MAX_CONNECTIONS_PER_ADDRESS}).
    max_connections: int
    max_connections_per_address: int
    #: Seconds a request's head, and then its body, may take to arrive
    #: (C{API_HEADER_TIMEOUT_SECONDS}, C{API_BODY_TIMEOUT_SECONDS}).
    header_timeout: float
    body_timeout: float
    #: Seconds a client may take to take each part of a large answer
    #: (C{API_SEND_TIMEOUT_SECONDS}; L{APIConnection.sending}).
    send_timeout: float
    #: Keyless connections (that sent a request head without an accepted
    #: key, or none within C{keyless_grace} of opening) at most from one
    #: address (C{API_KEYLESS_CONNECTIONS_PER_ADDRESS}; past it one that
    #: becomes keyless is closed), in all (half of C{max_connections}, or
    #: one address's share if that is more; past it the oldest keyless
    #: connection is closed to make room), and the seconds from opening
    #: they get to send a head with a key (C{API_KEYLESS_TIMEOUT_SECONDS}).
    #: A connection in its grace counts against C{max_connections} and
    #: its address's C{max_connections_per_address} only.
    keyless_per_address: int
    keyless_timeout: float
    #: Seconds an HTTP/2 connection may go without a frame from its client
    #: or to it (twisted.web's idle timeout, which tears the connection
    #: down, its streams' answers with it): longer than a call can wait on
    #: providers without one (C{UPSTREAM_TIMEOUT} for the provider and again
    #: for the one a failover tries), so that its own 504 goes out first;
    #: never less than twisted.web's 60.
    http2_idle_timeout: float = 60.0
    keyless_grace: float = KEYLESS_GRACE_SECONDS
    #: Bytes a lingering close reads and drops at most before it aborts
    #: (L{APIConnection.close_lingering}): L{LINGER_MIN_BYTES}, or twice
    #: C{MAX_REQUEST_BYTES} if more, so that a body a little over the
    #: limit is read to its end.
    linger_bytes: int = LINGER_MIN_BYTES
    #: Offer HTTP/2 on a TLS listener (C{API_HTTP2}).
    http2: bool = True
    #: The refusal reasons whose limit the descriptor cap lowered below
    #: what the settings alone give (L{from_settings}): raising the
    #: setting would not raise it; raising C{RLIMIT_NOFILE} would.
    lowered: frozenset[APIRefusal] = frozenset()

    def limit(self, reason: APIRefusal) -> int:
        """
        The value of the limit whose refusals are counted as C{reason}.
        """
        if reason == "api_max_connections":
            return self.max_connections
        if reason == "api_max_connections_per_address":
            return self.max_connections_per_address
        if reason == "api_keyless_connections_per_address":
            return self.keyless_per_address
        if reason == "api_keyless_share":
            # Half the connections, or one address's share if that is more.
            return max(self.keyless_per_address, self.max_connections // 2)
        assert_never(reason)

    @classmethod
    def from_settings(cls, settings: Settings, descriptors: int | None = None) -> APILimits:
        """
        The limits C{settings} give, connections capped at C{descriptors}
        too (the API's share of the process's file descriptors,
        L{openclaw.listeners.DescriptorShares.api}; None: no cap but
        C{API_MAX_CONNECTIONS}).  Unset, C{API_MAX_CONNECTIONS_PER_ADDRESS}
        is a quarter of the connections, and
        C{API_KEYLESS_CONNECTIONS_PER_ADDRESS} a sixteenth; neither is more
        than the cap above it.
        """
        max_connections = settings.api_max_connections
        if descriptors is not None:
            max_connections = min(descriptors, max_connections)
        per_address = settings.api_max_connections_per_address
        if per_address is None:
            per_address = max(1, max_connections // 4)
        per_address = min(per_address, max_connections)
        keyless = settings.api_keyless_connections_per_address
        if keyless is None:
            keyless = max(1, max_connections // 16)
        limits = cls(
            max_request_bytes=settings.max_request_bytes,
            max_connections=max_connections,
            max_connections_per_address=per_address,
            header_timeout=settings.api_header_timeout_seconds,
            body_timeout=settings.api_body_timeout_seconds,
            send_timeout=settings.api_send_timeout_seconds,
            keyless_per_address=min(keyless, per_address),
            keyless_timeout=settings.api_keyless_timeout_seconds,
            http2_idle_timeout=max(60.0, 2 * settings.upstream_timeout + HTTP2_IDLE_MARGIN_SECONDS),
            linger_bytes=max(LINGER_MIN_BYTES, 2 * settings.max_request_bytes),
            http2=settings.api_http2,
        )
        if descriptors is None or descriptors >= settings.api_max_connections:
            return limits
        uncapped = cls.from_settings(settings)
        lowered = frozenset(reason for reason in get_args(APIRefusal) if limits.limit(reason) < uncapped.limit(reason))
        return attrs.evolve(limits, lowered=lowered)


class APISite(Site):
    """
    A L{Site} for the API.

    @ivar limits: its limits (L{APILimits}).
    @ivar connections: the open client connections (L{APIConnection}s).
    """

    requestFactory = APIRequest

    def __init__(self, resource: IResource, limits: APILimits, context: APIContext | None, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.limits = limits
        #: The API's context; None for a site of plain resources (no model
        #: calls, no request log or metrics), as the tests build one.
        self.context = context
        self.connections: OpenConnections[APIConnection] = OpenConnections()
        #: Open connections per client address (L{client_address}).
        self.per_address = AddressSlots()
        #: Open keyless connections, per client address, and all of them,
        #: oldest first.
        self.keyless = AddressSlots()
        self._keyless_order: dict[APIConnection, None] = {}
        self._by_transport: dict[ITransport, APIConnection] = {}
        #: Large answers going out on HTTP/2 streams (L{StreamSendDeadline}):
        #: a stop that cuts one counts it as the stop's.
        self.http2_answers: set[WholeAnswer] = set()
        #: Open HTTP/2 connections by their local and peer addresses
        #: (L{http2_opened}).
        self._http2_by_addresses: dict[tuple[IAddress, IAddress], APIConnection] = {}
        #: HTTP/2 streams holding a slot (L{admit_stream}), in all and per
        #: client address.
        self.http2_streams = 0
        self.streams_per_address = AddressSlots()

    def acceptableProtocols(self) -> list[bytes]:
        """
        The protocols a TLS listener offers (ALPN,
        L{IProtocolNegotiationFactory}): twisted.web's, without C{h2}
        when C{API_HTTP2} is off.
        """
        offered: list[bytes] = super().acceptableProtocols()
        if self.limits.http2:
            return offered
        return [protocol for protocol in offered if protocol != b"h2"]

    # IProtocolFactory.buildProtocol gives any IProtocol; twisted.web's
    # HTTPFactory annotates it with its own channel's type.
    def buildProtocol(self, addr: IAddress | None) -> APIConnection | RefusedConnection:  # type: ignore[override]
        """
        The connection's protocol, or a L{RefusedConnection} (closed at
        once) past C{max_connections_per_address} from the client's
        address, or past C{max_connections} in all when no keyless
        connection can make room (the oldest is closed if there is one);
        HTTP/2 streams in flight count as connections (L{admit_stream}).

        A new connection is not keyless yet: it counts against the caps
        only, until it has had its chance to send a key (L{became_keyless}).
        """
        address = client_address(addr)
        if self.slots_held(address) >= self.limits.max_connections_per_address:
            self._refused("api_max_connections_per_address", address)
            return RefusedConnection()
        # HTTP/2 streams in flight hold slots as connections do.
        if len(self.connections) + self.http2_streams >= self.limits.max_connections:
            if not self._keyless_order:
                self._refused("api_max_connections", address)
                return RefusedConnection()
            # Room for the newcomer: the oldest keyless one goes.
            self._evict(next(iter(self._keyless_order)), "api_max_connections")
        return APIConnection(super().buildProtocol(addr), self, address)

    def admit_stream(self, request: APIRequest) -> APIError | None:
        """
        Give an HTTP/2 stream's C{request} a slot, or the 503 that refuses
        it.  Each stream in flight may hold what an HTTP/1.1 connection's
        request does (a temporary file for a body past 100 KB, a
        connection to a provider) on the one connection: it counts as a
        connection against C{max_connections} (the API's share of the
        descriptors) and its address's C{max_connections_per_address}, so
        that streams cannot take the descriptors the control plane and
        the other clients need (twisted.web lets a client open 100 streams
        on each connection).  The slot is let go when the request is
        finished or its stream lost.
        """
        if request.holds_slot is not None:
            return None
        limits = self.limits
        address = client_address(request.getClientAddress())
        if len(self.connections) + self.http2_streams >= limits.max_connections:
            setting = "API_MAX_CONNECTIONS"
            self._refused("api_max_connections", address)
        elif self.slots_held(address) >= limits.max_connections_per_address:
            setting = "API_MAX_CONNECTIONS_PER_ADDRESS"
            self._refused("api_max_connections_per_address", address)
        else:
            self.http2_streams += 1
            self.streams_per_address.take(address)
            request.holds_slot = (address,)
            request.notifyFinish().addBoth(lambda _: self.stream_done(request))
            return None
        return APIError(
            503,
            f"too many requests in flight: each HTTP/2 stream counts as a connection, and {setting} "
            "is reached; wait for an answer before sending more, or retry shortly",
            "server_error",
            "too_many_requests_in_flight",
            retry_after=1,
        )

    def stream_done(self, request: APIRequest) -> None:
        """
        Let go of C{request}'s slot (L{admit_stream}), if it holds one: once
        finished, or lost, or reset by the gateway (twisted.web tells a
        request nothing of a reset it sends).
        """
        held, request.holds_slot = request.holds_slot, None
        if held is None:
            return
        (address,) = held
        self.http2_streams -= 1
        self.streams_per_address.release(address)

    def slots_held(self, address: str | None) -> int:
        """
        The slots C{address} holds against C{max_connections_per_address}:
        its open connections and its HTTP/2 streams in flight (0 for
        L{None}, a peer without an address).
        """
        return self.per_address.held(address) + self.streams_per_address.held(address)

    def became_keyless(self, connection: APIConnection) -> None:
        """
        C{connection} had its chance to send a key and did not: count it
        among the keyless ones.  Past C{keyless_per_address} from its
        address it is closed; past the keyless share of all (half of
        C{max_connections}) the oldest keyless connection is closed to
        make room.
        """
        address = connection.address
        if self.keyless.held(address) >= self.limits.keyless_per_address:
            connection.counted_keyless = False
            connection.abort()
            self._refused("api_keyless_connections_per_address", address)
            return
        if self.keyless_total >= self.limits.limit("api_keyless_share"):
            self._evict(next(iter(self._keyless_order)), "api_keyless_share")
        self._count_keyless(connection, 1)

    def _evict(self, oldest: APIConnection, reason: APIRefusal) -> None:
        """
        Close C{oldest}, the oldest keyless connection, to make room:
        counted and logged under C{reason}, the limit reached.
        """
        self._count_keyless(oldest, -1)
        oldest.counted_keyless = False
        oldest.keyless = False
        oldest.abort()
        self._refused(reason, oldest.address)

    def _refused(self, reason: APIRefusal, address: str | None) -> None:
        """
        A connection from C{address} was refused (or closed to make room)
        for C{reason}: told to the context, with the limit's value and
        whether the descriptor cap lowered it (L{APILimits.lowered}).
        """
        if self.context is not None:
            limits = self.limits
            self.context.connection_refused(reason, limits.limit(reason), address, reason in limits.lowered)

    def http2_flooded(self, connection: APIConnection) -> None:
        """
        C{connection}, an HTTP/2 one twisted.web had ended, is aborted for
        the bytes its client sent on (L{APIConnection._http2_ended}): logged
        at info with the peer, marked L{HTTP2_FLOOD_FIELD} for the log
        observer, which lets one such line through a minute (any client can
        cause it at will; L{openclaw.logs.PEER_CAUSED_LINES}).
        """
        if self.context is None:
            return
        self.context.log.info(
            "HTTP/2 connection from {peer} aborted: its client sent more than {limit} bytes after twisted.web "
            "had ended the connection (h2 found a protocol error in what it sent, such as a header block "
            "without end)",
            peer=host_of(connection.tcp.getPeer()),
            limit=self.limits.linger_bytes,
            **{HTTP2_FLOOD_FIELD: True},
        )

    def opened(self, connection: APIConnection) -> None:
        self.connections.add(connection)
        assert connection.transport is not None
        self._by_transport[connection.transport] = connection
        self.per_address.take(connection.address)

    def key_accepted(self, connection: APIConnection) -> None:
        """
        C{connection} is no longer keyless.
        """
        if connection in self.connections:
            self._count_keyless(connection, -1)

    @property
    def keyless_total(self) -> int:
        """
        Open keyless connections.
        """
        return len(self._keyless_order)

    def _count_keyless(self, connection: APIConnection, change: int) -> None:
        if change > 0:
            self._keyless_order[connection] = None
            self.keyless.take(connection.address)
        else:
            self._keyless_order.pop(connection, None)
            self.keyless.release(connection.address)

    def http2_opened(self, connection: APIConnection) -> bool:
        """
        C{connection} speaks HTTP/2: known from now on by its local and
        peer addresses, which its streams' requests give
        (C{IRequest.getHost}, C{getClientAddress}: twisted.web's stream
        passes on those of the connection's transport), so that a key on
        one of its requests counts for it (L{http2_connection}).

        @return: whether it is known so: only with IP addresses (a pair
            that one TCP connection at a time has); an HTTP/2 connection
            over anything else cannot be told from another.
        """
        transport = connection.tcp
        key = (transport.getHost(), transport.getPeer())
        if not all(isinstance(address, (IPv4Address, IPv6Address)) for address in key):
            return False
        connection.http2_key = key
        self._http2_by_addresses[key] = connection
        return True

    def http2_connection(self, addresses: tuple[IAddress, IAddress]) -> APIConnection | None:
        """
        The open HTTP/2 connection with these local and peer addresses
        (L{http2_opened}), if any.
        """
        return self._http2_by_addresses.get(addresses)

    def closed(self, connection: APIConnection) -> None:
        if connection.transport is not None:
            self._by_transport.pop(connection.transport, None)
        if connection.http2_key is not None and self._http2_by_addresses.get(connection.http2_key) is connection:
            del self._http2_by_addresses[connection.http2_key]
        address = connection.address
        if connection.counted_keyless and connection in self.connections:
            self._count_keyless(connection, -1)
        if connection in self.connections:
            self.per_address.release(address)
        self.connections.discard(connection)

    def connection_of(self, transport: ITransport | None) -> APIConnection | None:
        """
        The connection of a transport (an HTTP/1.1 request's), if open.
        """
        return self._by_transport.get(transport) if transport is not None else None

    @property
    def in_flight(self) -> int:
        """
        How many API calls are waiting on a provider right now.
        """
        return 0 if self.context is None else self.context.in_flight

    def drain(self) -> Deferred[None]:
        """
        Fires once no API call is waiting on a provider (at once if none
        is).  For a stop: after the listener is closed, bounded by the
        caller's grace period, before L{close_connections}.
        """
        if self.context is None:
            return succeed(None)
        self.context.draining = True
        return self.context.idle()

    def log(self, request: http.Request) -> None:
        """
        No access log line: the data plane counts every request in the
        metrics and logs a structured event for it (failures at info,
        successes at debug), so a second, unstructured line would only
        duplicate it.
        """

    def close_connections(self) -> Deferred[None]:
        """
        Close every client connection and fire once all are closed.  For a
        stop, after the listener is closed and the calls drained.

        Each is closed politely: what was written to it still goes out
        first.  A call still under way then loses its client, so its
        upstream request is cancelled (a stream ends without C{[DONE]}).
        A client that stopped reading would hold a polite close open until
        its send buffer drains: connections still open after
        L{CLOSE_DEADLINE_SECONDS} are aborted.
        """
        if self.context is not None:
            self.context.shut_down_calls()
        closed = self.connections.all_closed()
        if closed.called:
            return closed
        for answer in self.http2_answers:
            answer.shutting_down()
        for connection in self.connections:
            connection.shutting_down()
        straggle = self.reactor.callLater(CLOSE_DEADLINE_SECONDS, self._abort_all)

        def cancel_straggle(result: None) -> None:
            if straggle.active():
                straggle.cancel()
            return result

        return closed.addBoth(cancel_straggle)

    def _abort_all(self) -> None:
        for connection in self.connections:
            connection.tcp.abortConnection()


#: Connections the C{/metrics} listener (C{--metrics-listen}) holds at
#: once: scrapers are few (Prometheus keeps one connection per target), and
#: the descriptors come out of those the process keeps for itself
#: (L{openclaw.listeners.MIN_RESERVED_DESCRIPTORS} at least).
METRICS_MAX_CONNECTIONS = 16


def metrics_listener(resource: Resource, settings: Settings, reactor: IReactorTime) -> MetricsSite:
    """
    The C{/metrics} listener's factory: a L{MetricsSite} serving
    C{resource}, whose connections are closed after
    C{API_HEADER_TIMEOUT_SECONDS} without a byte from the client, at most
    L{METRICS_MAX_CONNECTIONS} of them open, so that the listener can
    never take the descriptors the API and the control plane need.
    """
    return MetricsSite(resource, settings.api_header_timeout_seconds, METRICS_MAX_CONNECTIONS, reactor)


def build_site(
    context: APIContext,
    settings: Settings,
    reactor: IReactorTime,
    max_connections: int | None = None,
    metrics: IResource | None = None,
) -> APISite:
    """
    The API's C{twisted.web} site (a L{twisted.web.server.Site}) over
    C{context} (L{APIContext.from_settings}).

    @param max_connections: the API's share of the process's descriptors
        (L{openclaw.listeners.DescriptorShares.api}); by default computed
        from this process's C{RLIMIT_NOFILE} now.
    @param metrics: served at C{/metrics} beside the API (the
        L{openclaw.metrics.MetricsResource}); L{None}: not served there.
    """
    # The API takes JSON only: twisted.web's form decoding (which parses the
    # Content-Type of every POST with the email package) would be waste.
    shares = descriptor_shares(settings, api=True)
    if max_connections is None:
        max_connections = shares.api
    limits = APILimits.from_settings(settings, max_connections)
    if limits.max_connections < settings.api_max_connections:
        context.log.warn(
            "API connections are capped at {cap}, below API_MAX_CONNECTIONS={configured}, so that the "
            "control plane keeps file descriptors however the API is flooded (RLIMIT_NOFILE is {limit}); "
            "raise the limit (LimitNOFILE= in the systemd unit, ulimit -n) to allow more",
            cap=limits.max_connections,
            configured=settings.api_max_connections,
            limit=shares.limit,
        )
    # The API takes JSON only: twisted.web's form decoding (which parses the
    # Content-Type of every POST with the email package) would be waste.
    resource = build_resource(context)
    if metrics is not None:
        resource.putChild(b"metrics", metrics)
    return APISite(resource, limits, context, reactor=reactor, parsePOSTFormSubmission=False)
