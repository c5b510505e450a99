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

from typing import Any, assert_never, cast, get_args

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IReactorTime,
    ITCPTransport,
    ITransport,
)
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource
from twisted.web.server import Site

from openclaw.addresses import AddressSlots, host_of
from openclaw.connections import OpenConnections
from openclaw.consumers.table import Holder
from openclaw.dataplane.answer import Stream, StreamSendDeadline, WholeAnswer, http11_channel
from openclaw.dataplane.connection import (
    CLOSE_DEADLINE_SECONDS,
    KEYLESS_GRACE_SECONDS,
    KEYLESS_HTTP2_MAX_BYTES,
    LINGER_MIN_BYTES,
    APIConnection,
)
from openclaw.dataplane.context import REQUEST_ID_HEADER, APIContext, new_request_id
from openclaw.dataplane.errors import APIError
from openclaw.dataplane.head import (
    SERVER_FIELD,
    NextTurnRequest,
    RefusedConnection,
    client_address,
    invalid_host,
    lacks_host,
    origin_form,
    raw_error_response,
    repeated_field,
    unframed_body,
)
from openclaw.dataplane.resource import build_resource
from openclaw.listeners import descriptor_shares
from openclaw.logs import HTTP2_FLOOD_FIELD
from openclaw.metrics import APIRefusal
from openclaw.settings import Settings
from openclaw.web import reason_phrase


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


def _missing_host() -> APIError:
    return APIError(
        400,
        "the HTTP/1.1 request has no Host header field (RFC 9112 section 3.2); send one",
        "invalid_request_error",
        "missing_host",
    )


def _unframed_body() -> APIError:
    return APIError(
        400,
        "the request's Transfer-Encoding is not chunked alone (RFC 9112 section 6.3: a body whose final transfer "
        "coding is not chunked has no length to read it by); send the body with a Content-Length, or with "
        "Transfer-Encoding: chunked only",
        "invalid_request_error",
        "invalid_transfer_encoding",
    )


def _invalid_target() -> APIError:
    return APIError(
        400,
        "the request target is neither a path nor an http(s) URL whose authority is a host and optional port "
        "(RFC 9112 section 3.2.2; no user information, RFC 9110 section 4.2.4); send the path alone, such as "
        "/v1/chat/completions",
        "invalid_request_error",
        "invalid_request_target",
    )


#: The fields an API request may carry once only, and the 400 for a repeat.
_SINGLE_FIELDS = ((b"host", _repeated_host), (b"authorization", _repeated_authorization))


#: A body may come in this many pieces (chunks, DATA frames) of any
#: size; past them, pieces of L{MIN_PIECE_BYTES} on average, else it
#: is refused (400 C{request_body_fragmented}): twisted.web hands each
#: chunk of a chunked body over in a call of its own, so a key holder's
#: 2.5 MB body in 1-byte chunks cost seconds of the reactor's time,
#: where one in pieces of any usual size costs next to nothing.
MAX_SMALL_PIECES = 1024
MIN_PIECE_BYTES = 64


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
    #: The pieces the body came in so far (a chunk of a chunked body, a
    #: DATA frame), when they are the client's (L{_framed}).
    _pieces = 0
    #: The body comes in pieces of the client's choosing: chunked, or over
    #: HTTP/2 (set at L{gotLength}).
    _framed = True
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
        self._framed = length is None or connection is None
        has_body = length is None or length > 0
        if connection is not None:
            connection.head_received(has_body, self.channel, chunked=length is None)
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
        if self._framed:
            # Pieces the client chose (chunks, DATA frames), not the reads
            # of a body of known length, which a slow link makes small
            # (such a body was refused).
            self._pieces = pieces = self._pieces + 1
        else:
            pieces = 0
        if pieces > MAX_SMALL_PIECES and self._received < pieces * MIN_PIECE_BYTES:
            self._refuse(self._too_fragmented(), unread_body=True)
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
            self.setHeader(b"Server", SERVER_FIELD)
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

    def _too_fragmented(self) -> APIError:
        return APIError(
            400,
            f"the request body came in {self._pieces} pieces of {self._received // self._pieces} bytes on "
            f"average (chunks of a chunked body, or HTTP/2 DATA frames): send it with a Content-Length, or in "
            f"pieces of {MIN_PIECE_BYTES} bytes or more on average",
            "invalid_request_error",
            "request_body_fragmented",
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

    def http2_keyless_flood(self, connection: APIConnection) -> None:
        """
        C{connection}, an HTTP/2 one whose client has shown no key, is
        aborted for sending more than
        L{KEYLESS_HTTP2_MAX_BYTES <openclaw.dataplane.connection.KEYLESS_HTTP2_MAX_BYTES>}:
        logged at info with the peer, within the lines of
        L{HTTP2_FLOOD_FIELD} (one a minute: any client can cause it).
        """
        if self.context is None:
            return
        self.context.log.info(
            "HTTP/2 connection from {peer} aborted: its client sent more than {limit} bytes without showing a "
            "key (frames such as SETTINGS or PING, each answered: a flood)",
            peer=host_of(connection.tcp.getPeer()),
            limit=KEYLESS_HTTP2_MAX_BYTES,
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
    resource = build_resource(context)
    if metrics is not None:
        resource.putChild(b"metrics", metrics)
    # The API takes JSON only: twisted.web's form decoding (which parses the
    # Content-Type of every POST with the email package) would be waste.
    return APISite(resource, limits, context, reactor=reactor, parsePOSTFormSubmission=False)
