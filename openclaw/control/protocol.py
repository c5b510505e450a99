"""
The WebSocket face of the control plane.

The protocol is thin on purpose: it decides whether a connection may open,
hands each text message to L{openclaw.control.plane.ControlPlane}, and sends back
what it answers.  Everything else lives in plain objects.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import encode_truncate
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, ISSLTransport, ITCPTransport
from twisted.logger import Logger
from zope.interface import implementer

from openclaw.addresses import counted_key, host_port
from openclaw.connections import OpenConnections
from openclaw.control.admission import (
    TOO_MANY_REQUESTS,
    Admission,
    HandshakeBudget,
    LockedOut,
    client_key,
)
from openclaw.control.closecodes import (
    GOING_AWAY,
    POLICY_VIOLATION,
    UNSUPPORTED_DATA,
    UNTRUSTED_PEER_REASON,
)
from openclaw.control.lockout import AuthLockout, LockoutStore
from openclaw.control.plane import Connection, ControlPlane, from_peer
from openclaw.logs import REFUSED_CONNECTION_FIELD
from openclaw.metrics import ControlRefusal, GatewayMetrics
from openclaw.settings import Settings
from openclaw.tls import describe_tls_error, is_tls_error
from openclaw.web import SERVER_NAME

#: The opening handshake is a few hundred bytes; Autobahn buffers it with no
#: limit (and rescans the buffer on every read), so cap it.
MAX_HANDSHAKE_BYTES = 16384
_CONNECTING = WebSocketServerProtocol.STATE_CONNECTING
_OPEN = WebSocketServerProtocol.STATE_OPEN
#: Our close frame sent and its answer awaited, or the closing handshake
#: over and the connection being dropped (L{ControlProtocol.await_close_answer}).
_ENDING = frozenset({WebSocketServerProtocol.STATE_CLOSING, WebSocketServerProtocol.STATE_CLOSED})
#: The most characters of Autobahn's reason for refusing a handshake kept in
#: the refusal's log line (it may quote a header field of the peer's).
HANDSHAKE_DETAIL_MAX = 200
#: Seconds a peer has to answer our close frame, before its connection is
#: aborted (L{ControlProtocol.await_close_answer}; Autobahn's own default
#: is 1).
CLOSE_HANDSHAKE_SECONDS = 5
#: Seconds a peer closed for who it is (outside TRUSTED_CLIENT_IPS, locked
#: out, too many failed authentications) keeps its connection after the
#: 1008, for the close frame to reach it, before the connection is aborted;
#: nothing it sends is read meanwhile (L{ControlProtocol.close_unheard}).
UNHEARD_CLOSE_SECONDS = 1.0
#: The reason of the 1008 closing a connection that sent more than
#: L{ControlFactory.unauthenticated_bytes} before authenticating.
UNAUTHENTICATED_BYTES_REASON = "sent too much before authenticating: authenticate with the first message"
#: The close codes Autobahn sends for what a peer sent (RFC 6455 section
#: 7.4.1): a protocol error, a type it cannot take, bad UTF-8, a message
#: too big.
PROTOCOL_CLOSE_CODES = frozenset({1002, 1003, 1007, 1009})

_Refusal = TypeVar("_Refusal", bound=ConnectionDeny | str | None)

#: The reason of the 1008 closing a locked-out client's connections.
LOCKED_OUT_REASON = "too many failed authentications from this address; try again later"


def _describe(address: Any) -> tuple[str | None, str]:
    """
    The IP of a transport address (L{None} when it has none, as for a UNIX
    socket) and a short label for logs.
    """
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host, host_port(address.host, address.port)
    if isinstance(address, UNIXAddress):
        return None, "unix"
    return None, str(address)


@implementer(IPushProducer)
class ReadWhileWritable:
    """
    Backpressure for one connection: registered as the streaming producer
    of its transport, it is paused when the transport's write buffer is
    full and then stops reading from the peer (C{pauseProducing} of the
    transport) until the buffer has drained.  A client that sends commands
    but never reads their answers so fills its own TCP windows, not the
    gateway's memory.

    Pausing and resuming are the transport's own (it is an
    L{IPushProducer}); the transport is not registered as its own producer
    only because its C{stopProducing} closes the connection, and a
    transport (TLS's among them) calls its producer's C{stopProducing}
    when the connection is lost, where nothing is to be done.
    """

    def __init__(self, transport: IPushProducer) -> None:
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """
        The connection is gone; nothing to stop.
        """


class ControlProtocol(WebSocketServerProtocol):
    """
    One control connection.
    """

    factory: ControlFactory
    connection: Connection | None = None
    #: The client's address (the TCP peer, or the client a trusted proxy
    #: named) once accepted; L{None} on a UNIX socket.
    client: str | None = None
    #: Whether a message on this connection has carried a valid token.
    authenticated = False
    #: The handshake slot taken (see L{HandshakeBudget}): address key and
    #: whether the peer is an outsider; L{None} once given back.
    slot: tuple[str | None, bool] | None = None
    #: Seconds for the C{Retry-After} of a refusal with 429.
    retry_after: int | None = None
    #: The reason of the 1008 a peer refused for who it is is closed with
    #: once its handshake completes (L{ControlFactory.refusal}).
    refused_with: str | None = None
    #: The client key an accepted connection counts against among the
    #: unauthenticated ones (L{Admission.unauthenticated}), until it
    #: authenticates; L{None} when it does not count.
    pending: str | None = None
    #: AUTH_TIMEOUT_SECONDS, from the moment an accepted connection opens.
    auth_deadline: IDelayedCall | None = None
    #: Stops reading while the transport cannot take more to send.
    backpressure: ReadWhileWritable | None = None
    #: The abort ending a connection closed by L{close_unheard}, from which
    #: nothing more is read.
    unheard: IDelayedCall | None = None
    #: The abort ending a connection whose peer has not answered our close
    #: frame (L{await_close_answer}).
    unanswered: IDelayedCall | None = None

    @property
    def tcp(self) -> ITCPTransport:
        """
        The connection's transport (TCP, TLS over TCP or a UNIX socket: each
        can be aborted), once connected.
        """
        transport = self.transport
        assert transport is not None, "not connected"
        return cast(ITCPTransport, transport)

    def connectionMade(self) -> None:
        factory = self.factory
        admission = factory.admission
        host, peer = _describe(self.tcp.getPeer())
        slot = admission.handshake_slot(host)
        refused = admission.tcp_refusal(*slot, held=len(factory.protocols))
        if refused is None:
            refused = admission.budget.take(*slot)
        if refused is not None:
            factory.refuse(peer, refused, None)
            self.tcp.abortConnection()
            return
        self.slot = slot
        factory.protocols.add(self)
        super().connectionMade()
        # Autobahn's public hook onto the transport's own registerProducer.
        self.backpressure = ReadWhileWritable(cast(IPushProducer, self.tcp))
        self.registerProducer(self.backpressure, True)

    def release_slot(self) -> None:
        """
        Give back this connection's handshake slot and its place among the
        unauthenticated connections, if it still holds them, and stop its
        authentication deadline.
        """
        admission = self.factory.admission
        if self.slot is not None:
            admission.budget.release(*self.slot)
            self.slot = None
        if self.pending is not None:
            admission.release_unauthenticated(self.pending)
            self.pending = None
        deadline, self.auth_deadline = self.auth_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    #: Bytes received before the opening handshake is done.
    handshake_bytes = 0
    #: Bytes received since the opening handshake, until authenticated
    #: (L{ControlFactory.unauthenticated_bytes}).
    unauthenticated_bytes = 0
    #: Whether this connection was closed before it authenticated for what
    #: it sent, and that said (L{_refused_before_auth}).
    refused_before_auth = False
    #: Whether this handshake's outcome is accounted for: L{onConnect}
    #: judged it (and counted any refusal), or a refusal before it was
    #: counted (L{head_too_large}, L{onOpenHandshakeTimeout}, Autobahn's
    #: own checks in L{failHandshake}).
    handshake_counted = False

    @property
    def peer_label(self) -> str:
        """
        The TCP peer as logged (C{host:port}; the socket's path on a UNIX
        socket): behind a proxy, the proxy.
        """
        return _describe(self.tcp.getPeer())[1]

    def dataReceived(self, data: bytes) -> None:
        if self.unheard is not None:
            # Read already when the connection stopped reading: dropped.
            return
        if self.state == _CONNECTING:
            # The opening handshake may take MAX_HANDSHAKE_BYTES in all:
            # counted here, as it arrives, not in Autobahn's own buffer.
            self.handshake_bytes += len(data)
            if self.handshake_bytes > MAX_HANDSHAKE_BYTES:
                self.head_too_large()
                return
        elif not self.authenticated:
            # Until it authenticates, a connection may send only so much:
            # frames without payload, which no message's MAX_MESSAGE_BYTES
            # counts, kept one that never authenticated costing the
            # reactor each frame until AUTH_TIMEOUT_SECONDS.
            self.unauthenticated_bytes += len(data)
            if self.unauthenticated_bytes > self.factory.unauthenticated_bytes:
                self._refused_before_auth("too_much_before_auth", POLICY_VIOLATION, UNAUTHENTICATED_BYTES_REASON)
                self.close_unheard(POLICY_VIOLATION, UNAUTHENTICATED_BYTES_REASON)
                return
        WebSocketServerProtocol.dataReceived(self, data)
        # Autobahn's close frame for what it read (a protocol error, a
        # message too big, bad UTF-8) is sent here.
        if self.state in _ENDING:
            # Autobahn's public (documented, not underscored) attributes of
            # the close it sent: failedByMe when it failed the connection
            # for what the peer sent, with that close's code and reason.
            code = self.localCloseCode
            if (
                code is not None
                and code in PROTOCOL_CLOSE_CODES
                and self.failedByMe
                and not self.authenticated
                and self.connection is not None
            ):
                # Before authenticating: a refused connection, said and
                # counted (neither).
                reason = self.localCloseReason
                said = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason or "")
                self._refused_before_auth("protocol_error", code, said)
            self.await_close_answer()

    def await_close_answer(self) -> None:
        """
        Once our close frame is out and its answer awaited (Autobahn's
        C{STATE_CLOSING}: from L{close_with}, or Autobahn's own for what
        the peer sent), or the closing handshake is over and the connection
        being dropped (C{STATE_CLOSED}: Autobahn, a server, drops it at once
        when it answers the peer's close frame, politely, which over TLS
        waits for the peer's C{close_notify}), abort the connection if it
        is not gone within the factory's C{close_handshake_seconds}
        (L{CLOSE_HANDSHAKE_SECONDS} by default); cancelled by
        L{connectionLost}.

        Autobahn's own timer for this (C{closeHandshakeTimeout}) is off
        (L{ControlFactory}): it leaves it pending past the end of a
        connection whose peer closed TCP without answering, up to
        that many seconds later, holding the protocol.
        """
        if self.unanswered is None and self.state in _ENDING:
            self.unanswered = self.factory.reactor.callLater(
                self.factory.close_handshake_seconds, self.tcp.abortConnection
            )

    def head_too_large(self) -> None:
        """
        The opening handshake passed L{MAX_HANDSHAKE_BYTES}: answered 431
        (RFC 6585 section 5), counted and audited, and closed (as every
        refused handshake is: L{failHandshake}).
        """
        self.handshake_counted = True
        self.factory.refuse(self.peer_label, "handshake_too_large", None)
        self.failHandshake(f"the opening handshake sent over {MAX_HANDSHAKE_BYTES} bytes", 431)

    def connectionLost(self, reason: Any = None) -> None:
        if self not in self.factory.protocols:
            return  # turned away in connectionMade; Autobahn never set up
        error = getattr(reason, "value", None)
        if is_tls_error(error):
            # The peer's failure, not the gateway's: Autobahn's own line for
            # it (at error, with no peer) is not shown below LOG_LEVEL=debug
            # (openclaw.logs.PeerTLSErrors).  Any client can cause thousands
            # a second: the line is limited (openclaw.logs.PEER_CAUSED_LINES),
            # and one before the opening handshake completed is counted.
            if self.state == _CONNECTING and self.factory.metrics is not None:
                self.factory.metrics.refused_connection("tls_error")
            self.factory.events.info(
                "control connection from {peer} ended by a TLS error: {tls_error}",
                peer=self.peer_label,
                tls_error=describe_tls_error(error),
                outcome="tls_error",
            )
        self.release_slot()
        self.factory.connections.discard(self)
        for timer in (self.unheard, self.unanswered):
            if timer is not None and timer.active():
                timer.cancel()
        self.unheard = self.unanswered = None
        try:
            super().connectionLost(reason)
        finally:
            # Last: a stop waiting on close_all goes on once Autobahn is done.
            self.factory.protocols.discard(self)

    def onConnect(self, request: ConnectionRequest) -> None:
        self.handshake_counted = True
        try:
            self.admit(request.headers)
        except ConnectionDeny:
            raise
        except Exception:
            # Logged here: Autobahn's own line for it is not shown below
            # LOG_LEVEL=debug (openclaw.logs.QUIET_WEBSOCKET), and would
            # tell the peer the exception's text.
            self.factory.events.failure("control handshake from {peer} failed unexpectedly", peer=self.peer_label)
            raise ConnectionDeny(
                ConnectionDeny.INTERNAL_SERVER_ERROR, "internal error; the gateway log has the details"
            ) from None

    def admit(self, headers: dict[str, str]) -> None:
        """
        Decide whether the opening handshake may complete, from the request's
        header fields and the peer's address.

        @param headers: the fields as Autobahn parsed them: names lower-cased,
            a repeated field joined with C{", "}.  Since Autobahn 26.11.1 the
            head is split at CRLF only and a head holding any other line
            break or control character is refused before this (crossbario
            autobahn-python#2034), so these are the fields a proxy in front
            saw: none can be hidden from it behind a line break.
        @raise ConnectionDeny: refused with an HTTP status; the refusal is
            counted and audited (L{ControlFactory.refusal}).
        """
        factory = self.factory
        address = self.tcp.getPeer()
        host, peer = _describe(address)
        local = isinstance(address, UNIXAddress)
        client = factory.admission.client(host, headers, local)
        refusal = factory.refusal(host, peer, headers, local=local, client=client)
        if isinstance(refusal, LockedOut):
            self.retry_after = refusal.retry_after
        if isinstance(refusal, ConnectionDeny):
            raise refusal
        if isinstance(refusal, str):
            self.refused_with = refusal
        if refusal is None:
            key = counted_key(client)
            # The audit names the client a trusted proxy named, and the proxy.
            logged, proxy = factory.admission.logged_peer(host, peer, client)
            refused = factory.admission.take_unauthenticated(key)
            if refused is not None:
                raise factory.refuse(logged, refused.reason, cast(ConnectionDeny, refused.answer), proxy=proxy)
            self.pending = key
            self.client = client
            self.connection = Connection(logged, proxy)
            factory.connections.add(self)

    def onOpenHandshakeTimeout(self) -> None:
        if self.state == _CONNECTING and not self.handshake_counted:
            # A head that never ended (lines ended by a bare LF, a TLS
            # ClientHello on a plain listener, a client too slow): dropped
            # by Autobahn, counted and audited here.
            self.handshake_counted = True
            self.factory.refuse(self.peer_label, "handshake_timeout", None)
        super().onOpenHandshakeTimeout()

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        if not self.handshake_counted:
            # Refused by Autobahn before onConnect: a head that is not
            # well-formed HTTP/1.1 (a bare CR or LF, a control character, a
            # folded line) or not a WebSocket opening handshake.
            self.handshake_counted = True
            self.factory.refuse(self.peer_label, "bad_handshake", None, detail=reason[:HANDSHAKE_DETAIL_MAX])
        if code == TOO_MANY_REQUESTS and self.retry_after is not None:
            responseHeaders = [*(responseHeaders or ()), ("Retry-After", str(self.retry_after))]
        # Autobahn answers and closes the connection, but a TLS transport
        # then waits for the peer's close_notify, which a peer may withhold
        # for ever (and reading on until it comes, a peer could make the
        # gateway decrypt a flood): nothing more is read, and the
        # connection is aborted UNHEARD_CLOSE_SECONDS later if still open.
        self.stop_hearing()
        super().failHandshake(reason, code, responseHeaders)

    def onOpen(self) -> None:
        if self.connection is not None:
            # An accepted connection keeps its handshake slot until it
            # authenticates (or goes), and has AUTH_TIMEOUT_SECONDS to; a
            # refused one keeps its slot until it is gone.
            self.auth_deadline = self.factory.reactor.callLater(self.factory.auth_timeout, self._auth_timed_out)
        else:
            # An untrusted peer: 1008 must reach it, so the handshake is
            # completed first; nothing it sends is read.
            self.close_unheard(POLICY_VIOLATION, self.refused_with or UNTRUSTED_PEER_REASON)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        connection = self.connection
        if connection is None or self.state != _OPEN:
            # Untrusted, or closing: frames that arrived after our close
            # frame (in the same read) are not answered.
            return
        if isBinary:
            self.close_with(UNSUPPORTED_DATA, "binary messages are not accepted; send JSON text")
            return
        if not self.authenticated and self.client is not None and self.factory.locked_out(self.client):
            # Locked out since it opened (here, or by another instance of
            # a cluster): no further guess, not even a right one.
            self.close_unheard(POLICY_VIOLATION, LOCKED_OUT_REASON)
            return
        controlplane = self.factory.controlplane
        failed_before = connection.failed_auths
        answer = controlplane.handle(payload, connection)
        if isinstance(answer, bytes):
            self.sendMessage(answer)
        else:
            answer.addCallback(self._answer).addErrback(
                lambda failure: self.factory.events.failure(
                    "control answer to {peer} failed unexpectedly", failure, peer=self.peer_label
                )
            )
        if connection.failed_auths > failed_before:
            self.factory.auth_failed(self)
        elif connection.authenticated and not self.authenticated:
            self.authenticated = True
            self.release_slot()
        if connection.failed_auths and controlplane.too_many_failures(connection):
            who, fields = from_peer(connection.proxy)
            self.factory.events.warn(
                "closing control connection " + who + ": {failed_auths} failed authentications in a row "
                "(reason={reason})",
                peer=connection.peer,
                failed_auths=connection.failed_auths,
                outcome="closed",
                reason="auth_failures",
                **fields,
            )
            self.close_unheard(POLICY_VIOLATION, "too many failed authentications")
        elif connection.stale_refusals and controlplane.too_many_stale(connection):
            who, fields = from_peer(connection.proxy)
            self.factory.events.warn(
                "closing control connection " + who + ": {refusals} tokens of this gateway's (expired, replaced "
                "or not known here yet) in a row: not counted toward the lockout (reason={reason})",
                peer=connection.peer,
                refusals=connection.stale_refusals,
                outcome="closed",
                reason="stale_token",
                **{REFUSED_CONNECTION_FIELD: "stale_token"},
                **fields,
            )
            self.close_unheard(POLICY_VIOLATION, connection.genuine_refusal or "token revoked")

    def _refused_before_auth(self, reason: ControlRefusal, code: int, said: str) -> None:
        """
        Log (warn) and count (C{reason}) a connection closed before it
        authenticated for what it sent (C{code} and C{said}, the close
        frame's), once per connection.
        """
        if self.refused_before_auth:
            return
        self.refused_before_auth = True
        factory = self.factory
        if factory.metrics is not None:
            factory.metrics.refused_connection(reason)
        connection = self.connection
        who, fields = from_peer(connection.proxy if connection is not None else None)
        # Marked for the log observer, which lets REFUSED_CONNECTION_LINES
        # of them through a second (a client in
        # TRUSTED_CLIENT_IPS wrote a line per connection).
        factory.events.warn(
            "closing control connection " + who + " before it authenticated: {code} {said} (reason={reason})",
            peer=connection.peer if connection is not None else "?",
            code=code,
            said=said[:HANDSHAKE_DETAIL_MAX],
            outcome="closed",
            reason=reason,
            **{REFUSED_CONNECTION_FIELD: reason},
            **fields,
        )

    def _auth_timed_out(self) -> None:
        self.auth_deadline = None
        if self.authenticated or self.state != _OPEN:
            return
        factory = self.factory
        if factory.metrics is not None:
            factory.metrics.refused_connection("auth_timeout")
        connection = self.connection
        # Its last token one the gateway signed (expired, replaced, not
        # known here yet): a client left behind by a rotation, or ahead of
        # this instance, no guesser (plane.Connection).
        genuine = connection.genuine_refusal if connection is not None else None
        who, fields = from_peer(connection.proxy if connection is not None else None)
        factory.events.warn(
            "closing control connection " + who + ": no authenticated message within AUTH_TIMEOUT_SECONDS "
            "({seconds:g} s)"
            + (", its last token a token of this gateway's: not counted toward the lockout" if genuine else "")
            + " (reason={reason})",
            peer=connection.peer if connection is not None else "?",
            seconds=factory.auth_timeout,
            outcome="closed",
            reason="auth_timeout",
            # Its own kind of line for the limit: a client that reconnects
            # with a stale token hides no guesser's close.
            **({REFUSED_CONNECTION_FIELD: "stale_token_timeout"} if genuine else {}),
            **fields,
        )
        if genuine is not None:
            self.close_with(POLICY_VIOLATION, genuine)
            return
        self.close_with(POLICY_VIOLATION, "no authenticated message within AUTH_TIMEOUT_SECONDS")
        # A failed authentication too, for the lockout: otherwise a client
        # that never sends could reconnect at every deadline for ever.
        factory.auth_failed(self)

    def _answer(self, encoded: bytes) -> None:
        if self.state == _OPEN:
            self.sendMessage(encoded)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.connections.discard(self)

    def close_with(self, code: int, reason: str) -> None:
        """
        Start the closing handshake with any RFC 6455 code, including the
        ones the public C{sendClose} refuses (1001, 1003, 1008).
        """
        if self.state == _OPEN:
            # RFC 6455 section 5.5: a control frame's payload is at most 125
            # bytes, 2 of them the code; cut between characters.
            self.sendCloseFrame(code=code, reasonUtf8=encode_truncate(reason, 123))
            self.await_close_answer()

    def close_unheard(self, code: int, reason: str) -> None:
        """
        L{close_with}, for a peer closed for who it is (outside
        TRUSTED_CLIENT_IPS, locked out, too many failed authentications):
        nothing more it sends is read, and its connection is aborted
        L{UNHEARD_CLOSE_SECONDS} later.

        Autobahn reads and parses frames on until the peer answers the
        close frame, or C{CLOSE_HANDSHAKE_SECONDS} pass: a peer that sends
        frames instead of the answer (a flood of fragments) had megabytes
        of them read and parsed, the gateway's CPU with them.  Here the
        transport stops reading at once (C{pauseProducing}, after its
        producer is unregistered, so that nothing resumes it), the bytes
        already read are dropped (L{dataReceived}), and, on a plain TCP
        connection, the sending side is closed after the close frame
        (C{loseWriteConnection}: a FIN after it), so that a client sees the
        1008 and the end at once; Twisted's TLS transport has no half-close
        of its own.  A client that is still sending when the abort comes
        has had the close frame, and the grace to read it, first.
        """
        if self.state != _OPEN or self.unheard is not None:
            return
        self.close_with(code, reason)
        transport = self.tcp
        if ITCPTransport.providedBy(transport) and not ISSLTransport.providedBy(transport):
            transport.loseWriteConnection()
        self.stop_hearing()

    def stop_hearing(self) -> None:
        """
        Read nothing more from the peer (C{pauseProducing}, after the
        transport's producer is unregistered, so that nothing resumes it;
        bytes already read are dropped by L{dataReceived}), and abort the
        connection L{UNHEARD_CLOSE_SECONDS} from now unless it is gone.
        """
        if self.unheard is not None:
            return
        transport = self.tcp
        cast(IConsumer, transport).unregisterProducer()
        cast(IPushProducer, transport).pauseProducing()
        self.unheard = self.factory.reactor.callLater(UNHEARD_CLOSE_SECONDS, transport.abortConnection)


class ControlFactory(WebSocketServerFactory):
    """
    Builds L{ControlProtocol}s, asks its L{Admission} who may connect
    (counting, logging and answering each refusal), and knows the
    connections that are open.
    """

    protocol = ControlProtocol  # type: ignore[assignment]
    #: The control plane's log (Autobahn's factory has its own C{log}):
    #: refusals, connections opened and closed, handshake errors.
    events = Logger()

    def __init__(
        self,
        controlplane: ControlPlane,
        settings: Settings,
        metrics: GatewayMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        lockout: LockoutStore | None = None,
        capacity: int | None = None,
        close_handshake_seconds: float = CLOSE_HANDSHAKE_SECONDS,
        **kwargs: Any,
    ) -> None:
        # A neutral Server field: Autobahn's default names its version.
        kwargs.setdefault("server", SERVER_NAME)
        super().__init__(**kwargs)
        self.controlplane = controlplane
        self.metrics = metrics
        #: Who may connect (L{Admission}): asked here, its refusals counted,
        #: logged and answered here.
        self.admission = Admission(
            settings, lockout or AuthLockout.from_settings(settings, clock), clock, capacity=capacity
        )
        #: AUTH_TIMEOUT_SECONDS.
        self.auth_timeout = settings.auth_timeout_seconds
        #: Seconds a peer has to answer our close frame before its
        #: connection is aborted (L{ControlProtocol.await_close_answer});
        #: L{CLOSE_HANDSHAKE_SECONDS} by default.
        self.close_handshake_seconds = close_handshake_seconds
        #: The most bytes a connection may send before it authenticates: as
        #: many messages of MAX_MESSAGE_BYTES as MAX_AUTH_FAILURES lets fail,
        #: and one more, twice over for their frames' headers.
        self.unauthenticated_bytes = 2 * (settings.max_auth_failures + 1) * settings.max_message_bytes
        #: Accepted control connections (the ones status counts).
        self.connections: set[ControlProtocol] = set()
        #: Every live TCP connection, handshakes and refusals included.
        self.protocols: OpenConnections[ControlProtocol] = OpenConnections()
        self.setProtocolOptions(
            maxMessagePayloadSize=settings.max_message_bytes,
            maxFramePayloadSize=settings.max_message_bytes,
            openHandshakeTimeout=settings.handshake_timeout_seconds,
            autoPingInterval=settings.ping_interval_seconds,
            autoPingTimeout=settings.ping_timeout_seconds,
            # Send the close code (1009 too big, 1007 bad UTF-8, 1002
            # protocol error) instead of dropping the TCP connection, so
            # clients learn what they did wrong.
            failByDrop=False,
            # Let "Origin: null" (sandboxed pages, file://) reach refusal()
            # so it gets the same 403 as any other foreign origin.  Set in
            # this same call: every setProtocolOptions call resets it.
            allowNullOrigin=True,
            # Off (0): the wait for the answer to our close frame is
            # ControlProtocol.await_close_answer's, CLOSE_HANDSHAKE_SECONDS
            # (Autobahn's timer would outlive the connection when the peer
            # closes TCP without answering).  A busy client gets time to
            # read our close frame and answer it: a reset can discard the
            # close frame still unread in the client's buffer, which then
            # sees 1006 rather than (say) 1001 going away.
            closeHandshakeTimeout=0,
            # RFC 6455 only (version 13): the older drafts (8) carry the
            # page's origin in Sec-WebSocket-Origin, which the Origin
            # check would not see; Autobahn answers them 400 with
            # "Sec-WebSocket-Version: 13".
            versions=[13],
            # No HTML status page (naming Autobahn's version) for a plain
            # GET: it is refused as a request that is not a WebSocket one.
            webStatus=False,
        )

    @property
    def capacity(self) -> int:
        """
        TCP connections held at most, of every kind (L{Admission.capacity}).
        """
        return self.admission.capacity

    @property
    def budget(self) -> HandshakeBudget:
        """
        The handshake slots per address of the TCP peer (L{Admission.budget}).
        """
        return self.admission.budget

    @property
    def lockout(self) -> LockoutStore:
        """
        The lockout (L{Admission.lockout}).
        """
        return self.admission.lockout

    def refusal(
        self,
        host: str | None,
        peer: str,
        headers: dict[str, str],
        local: bool = False,
        client: str | None = None,
    ) -> ConnectionDeny | str | None:
        """
        Whether a connection asking to open must be refused
        (L{Admission.refusal}); a refusal is counted and logged (naming,
        behind a trusted proxy, the client it named, and the proxy:
        L{Admission.logged_peer}).

        @param host: the TCP peer's IP address (L{None} without one).
        @param peer: the TCP peer as logged (C{address:port}).
        @param headers: the request's fields (L{ControlProtocol.admit}).
        @param local: whether the peer is on a UNIX socket.
        @param client: the client's address as L{Admission.client}
            resolved it (L{None}: none to believe).
        @return: L{None} to accept it; a L{ConnectionDeny} to refuse the
            handshake with an HTTP status; or the reason for accepting the
            handshake only to close it at once with 1008 (an untrusted peer,
            a trusted proxy that named no client), sent as the close reason.
        """
        refused = self.admission.refusal(host, headers, len(self.connections), local=local, client=client)
        if refused is None:
            return None
        logged, proxy = self.admission.logged_peer(host, peer, client)
        return self.refuse(logged, refused.reason, refused.answer, log=refused.log, proxy=proxy, **refused.fields)

    def auth_failed(self, protocol: ControlProtocol) -> None:
        """
        Count a failed authentication on C{protocol} against its client's
        lockout.  When this failure locks the client out, log it (once per
        lockout), count it, and close with 1008 every connection of that
        client that has not authenticated; a failure from a client already
        locked out closes its connection.
        """
        client = protocol.client
        if client is None:
            return
        until = self.lockout.record_failure(client)
        if until is None:
            if self.lockout.locked_until(client) is not None:
                protocol.close_unheard(POLICY_VIOLATION, LOCKED_OUT_REASON)
            return
        if self.metrics is not None:
            self.metrics.lockouts.inc()
        key = client_key(client)
        self.events.warn(
            "locked out {client} for {seconds:.1f} s: too many failed authentications (reason={reason})",
            client=key,
            seconds=until - self.admission.clock(),
            outcome="locked_out",
            reason="auth_lockout",
        )
        protocol.close_unheard(POLICY_VIOLATION, LOCKED_OUT_REASON)
        self.close_locked_out(key)

    def locked_out(self, client: str) -> bool:
        """
        Whether C{client} (an address) is locked out now.
        """
        if not self.admission.locked_out(client):
            return False
        if self.metrics is not None:
            self.metrics.refused_connection("locked_out")
        return True

    def close_locked_out(self, key: str) -> None:
        """
        Close with 1008 every open connection of client C{key} (a
        L{client_key}) that has not authenticated: its client was just
        locked out (here, or by another instance of a cluster).
        """
        for other in list(self.connections):
            if not other.authenticated and other.client is not None and client_key(other.client) == key:
                other.close_unheard(POLICY_VIOLATION, LOCKED_OUT_REASON)

    def refuse(
        self,
        peer: str,
        reason: ControlRefusal,
        refusal: _Refusal,
        log: bool = True,
        proxy: str | None = None,
        **fields: Any,
    ) -> _Refusal:
        """
        Count a refused connection by C{reason}, log it (unless C{log} is
        false) with C{peer} (the client; behind a trusted proxy, the one it
        named, and the C{proxy}: L{logged_peer}) and C{fields}, and return
        C{refusal}.
        """
        if self.metrics is not None:
            self.metrics.refused_connection(reason)
        if not log:
            return refusal
        who, named = from_peer(proxy)
        fields.update(named)
        # Marked for the log observer, which lets REFUSED_CONNECTION_LINES
        # of them through a second (any client can cause thousands).
        self.events.warn(
            "refused control connection " + who + ": {reason}" + (" ({detail})" if "detail" in fields else ""),
            peer=peer,
            reason=reason,
            outcome="refused",
            **{REFUSED_CONNECTION_FIELD: reason},
            **fields,
        )
        return refusal

    def close_all(self, code: int = GOING_AWAY, reason: str = "gateway shutting down") -> Deferred[None]:
        """
        Close every open connection with C{code}, abort the ones still in
        their opening handshake, and fire with L{None} when they are all
        gone (or the closing handshake timed out and Autobahn dropped them).
        """
        for protocol in self.protocols:
            if protocol.state == _OPEN:
                protocol.close_with(code, reason)
            else:
                # Still in its opening handshake: nobody to say goodbye to.
                protocol.tcp.abortConnection()
        return self.protocols.all_closed()
