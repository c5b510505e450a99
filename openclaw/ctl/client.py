"""
The exchange itself: the endpoint to the URL (TCP, TLS for C{wss://}, or
a UNIX socket: L{client_endpoint}), the Autobahn client protocol that
sends the one command and settles with the first reply or why the
connection ended first (L{OneCommand}, L{ConnectionClosed}), keeping the
head of a server's answer to the handshake up to L{MAX_HEAD_BYTES} and
the certificates a TLS server presented, and L{exchange}, which runs it
within C{--timeout}.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import attrs
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.util import parse_url
from cryptography import x509
from OpenSSL.SSL import Connection as TLSConnection
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from openclaw.ctl.request import Reply, Request, UsageError, unix_socket_path, websocket_url
from openclaw.reactors import IClientReactor
from openclaw.tls import HostnameChecked, trust_root_from_file


class ConnectionClosed(Exception):
    """
    The connection ended before the gateway answered.

    @ivar code: the WebSocket close code (1006 when there was no closing
        handshake, e.g. a failed TLS or WebSocket handshake).
    @ivar cause: why the transport was lost, when it says more than the code
        (a TLS verification error, for instance).
    @ivar opened: whether the WebSocket handshake had completed.
    @ivar received: what the server sent before the handshake completed
        (its answer's head, at most L{MAX_HEAD_BYTES}, and what came with
        it): whether it answered in HTTP at all, when Autobahn could not
        say, and the head's status and headers.
    @ivar certificates: the certificates the server presented in a TLS
        handshake (its own first), when it presented any: what to say
        about a wrong host name or a CA that did not sign them.
    """

    def __init__(
        self,
        code: int | None,
        reason: str | None,
        cause: BaseException | None = None,
        opened: bool = False,
        received: bytes = b"",
        certificates: Sequence[x509.Certificate] = (),
    ) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.cause = cause
        self.opened = opened
        self.received = received
        self.certificates = tuple(certificates)


#: The most bytes of the head (status line and headers) of the server's
#: answer to the handshake read: the gateway's is some 200 bytes, and
#: nginx and twisted.web take heads of 16 KiB.  Past it, openclawctl stops
#: reading (L{AnswerHeadTooLarge}): Autobahn looks for the head's end
#: anew in all it holds each time bytes come, so a server sending headers
#: for ever would keep it at full CPU, its buffer growing, until
#: C{--timeout}.
MAX_HEAD_BYTES = 64 * 1024


class AnswerHeadTooLarge(Exception):
    """
    The head of the server's answer to the handshake passed
    L{MAX_HEAD_BYTES} before it ended; openclawctl stopped reading it.
    """


class NotHTTP(Exception):
    """
    The server's first bytes in answer to the handshake are not
    C{HTTP/}; openclawctl stopped reading.
    """


def may_be_http(received: bytes) -> bool:
    """
    Whether C{received}, the first bytes of an answer, can be the start
    of an HTTP/1 answer: C{HTTP/}, or the first letters of it.
    """
    return b"HTTP/".startswith(received[:5])


class OneCommand(WebSocketClientProtocol):
    """
    Sends the factory's message once the handshake is done, settles the
    factory's C{answer} with the first reply (or the reason the connection
    ended first), and closes.
    """

    factory: OneCommandFactory
    _sent_at = 0.0
    #: The command was sent, on the open WebSocket connection.
    sent = False
    _lost: BaseException | None = None
    _opened = False
    _received = b""
    #: Where the head of the server's answer ends in C{_received}, once it has.
    _head_end: int | None = None
    _failed: Exception | None = None

    def connectionMade(self) -> None:
        self.factory.connected = self
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if self._opened:
            # Past the handshake, what Autobahn raises is not about reading
            # the server's HTTP answer: Twisted reports it (one line).
            super().dataReceived(data)
            return
        if self._failed is not None:
            return
        # The head of the server's answer to the handshake, kept to tell an
        # HTTP answer Autobahn could not read from no HTTP at all, and to
        # stop reading one that does not end (MAX_HEAD_BYTES).
        searched = max(0, len(self._received) - 3)
        self._received += data
        if self._head_end is None:
            end = self._received.find(b"\r\n\r\n", searched)
            if end >= 0:
                self._head_end = end + 4
        if (self._head_end or len(self._received)) > MAX_HEAD_BYTES:
            self._stop(AnswerHeadTooLarge())
            return
        if not may_be_http(self._received):
            # An SSH banner, an HTTP/2 preface, a TLS alert: not to be read
            # as HTTP, nor waited on until a head's end that will not come.
            self._stop(NotHTTP())
            return
        try:
            super().dataReceived(data)
        except Exception as e:
            # Autobahn could not read what the server sent (a reason phrase
            # that is not UTF-8): that is why the connection ends, said in
            # openclawctl's one line rather than as Twisted's "Unhandled
            # Error" and its traceback.
            self._stop(e)

    def _stop(self, why: Exception) -> None:
        """
        Stop reading the server's answer, for C{why} (the cause
        L{ConnectionClosed} gets): drop the connection at once.
        """
        self._failed = why
        cast(ITCPTransport, self.transport).abortConnection()

    def onOpen(self) -> None:
        self._opened = True
        self._sent_at = time.perf_counter()
        self.sendMessage(self.factory.payload)
        self.sent = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not self.factory.answer.called:
            self.factory.answer.callback(Reply(payload, time.perf_counter() - self._sent_at))
        self.sendClose()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Autobahn's onClose gets only a code and a text; keep the cause so a
        # TLS verification failure can be named as such.
        self._lost = self._failed or reason.value
        super().connectionLost(reason)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.answer.called:
            certificates = self.factory.tls.peer_certificates() if self.factory.tls is not None else []
            self.factory.answer.errback(
                ConnectionClosed(code, reason, self._lost, self._opened, self._received, certificates)
            )


@implementer(IOpenSSLClientConnectionCreator)
class KeepsPeerCertificates:
    """
    Twisted's client TLS options (C{optionsForClientTLS}: they verify the
    chain and the host name), keeping the TLS connection they make, so
    that the certificates the server presented can be named after a
    failed verification: Twisted's transport gives the peer's
    certificate only once it is verified.

    @ivar host: the host name or IP address the certificate must name.
    """

    def __init__(self, options: IOpenSSLClientConnectionCreator, host: str) -> None:
        self._options = options
        self.host = host
        self._connection: TLSConnection | None = None

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> TLSConnection:
        self._connection = self._options.clientConnectionForTLS(tlsProtocol)
        return self._connection

    def peer_certificates(self) -> list[x509.Certificate]:
        """
        The certificates the server sent (its own first), as far as the
        handshake got: none before its Certificate message.
        """
        chain = self._connection.get_peer_cert_chain() if self._connection is not None else None
        return [certificate.to_cryptography() for certificate in chain or ()]


class OneCommandFactory(WebSocketClientFactory):
    protocol = OneCommand  # type: ignore[assignment]

    def __init__(self, url: str, payload: bytes, tls: KeepsPeerCertificates | None = None) -> None:
        super().__init__(url)
        # The whole exchange is bounded by --timeout; Autobahn's own 5 s
        # handshake limit would only cut a longer --timeout short.
        self.setProtocolOptions(openHandshakeTimeout=0)
        self.payload = payload
        self.tls = tls
        self.answer: Deferred[Reply] = Deferred(self._abort)
        self.connected: OneCommand | None = None

    def _abort(self, answer: Deferred[Reply]) -> None:
        if self.connected is not None and self.connected.transport is not None:
            cast(ITCPTransport, self.connected.transport).abortConnection()


def _trust_root(cafile: Path) -> Any:
    """
    The CA certificates of C{--cafile} as a Twisted trust root.
    """
    try:
        return trust_root_from_file(cafile)
    except (OSError, ValueError) as e:
        raise UsageError(
            f"--cafile {cafile}: {getattr(e, 'strerror', None) or e}; give a PEM file of CA certificates"
        ) from None


def client_endpoint(
    reactor: IClientReactor, request: Request
) -> tuple[IStreamClientEndpoint, KeepsPeerCertificates | None]:
    """
    TCP to the URL's host (any of its addresses, IPv4 or IPv6), wrapped in
    TLS for C{wss://}: the host name is verified against the system's trust
    store, or against C{--cafile} when given.  For C{unix:PATH}, that
    UNIX socket.  With it, for C{wss://}, the TLS options, which keep the
    certificates the server presents.
    """
    path = unix_socket_path(request.url)
    if path is not None:
        return UNIXClientEndpoint(reactor, path, timeout=request.timeout), None
    secure, host, port = parse_url(request.url)[:3]
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, port, timeout=request.timeout)
    if not secure:
        return endpoint, None
    trust = _trust_root(request.cafile) if request.cafile is not None else None
    # The host name checked again when the handshake is done, whatever
    # service_identity raises (openclaw.tls.HostnameChecked).
    tls = KeepsPeerCertificates(HostnameChecked(optionsForClientTLS(host, trustRoot=trust), host), host)
    return wrapClientTLS(tls, endpoint), tls


class Unanswered(TimeoutError):
    """
    The gateway took the connection and the command (its WebSocket
    handshake done, the command sent), and did not answer in time.
    """


async def exchange(reactor: IClientReactor, request: Request) -> Reply:
    """
    Send the request and wait for its answer, within C{request.timeout};
    then close the connection properly (bounded by Autobahn's closing
    handshake timeout) so the gateway sees a clean goodbye.

    @raise ConnectionClosed: the connection ended before an answer.
    @raise Unanswered: the command was sent, and no answer came in time.
    @raise TimeoutError: the connection did not open in time.
    """
    endpoint, tls = client_endpoint(reactor, request)
    factory = OneCommandFactory(websocket_url(request.url), request.message(), tls)

    async def answered() -> Reply:
        await endpoint.connect(factory)
        return await factory.answer

    try:
        reply = await Deferred.fromCoroutine(answered()).addTimeout(request.timeout, reactor)
    except (TimeoutError, CancelledError):
        if factory.connected is not None and factory.connected.sent:
            raise Unanswered() from None
        raise
    if factory.connected is not None:
        await factory.connected.is_closed
    return reply


async def exchange_pages(reactor: IClientReactor, request: Request) -> Reply:
    """
    L{exchange}, and for C{consumer_list} of every consumer, each page
    after the first (the gateway's answer names the next in
    C{result.next}, asked for as C{data.after}, on a new connection):
    one reply whose C{result.consumers} holds them all, its round trip
    the pages' together, written as compact JSON as the gateway writes
    its answers (C{--json} prints every command's alike).  A page that is not a list (an error, an older
    gateway's answer without C{next}) ends it, as it is.

    @raise ValueError: a page's C{next} is not after the one before.
    """
    reply = await exchange(reactor, request)
    if request.cmd != "consumer_list" or (request.data or {}).get("name") is not None:
        return reply
    consumers: list[Any] = []
    too_long: list[Any] = []
    round_trip = 0.0
    after = ""
    while True:
        round_trip += reply.round_trip
        try:
            answer = json.loads(reply.payload)
        except ValueError:
            return reply
        result = answer.get("result") if isinstance(answer, dict) and answer.get("ok") is True else None
        if not isinstance(result, dict) or not isinstance(result.get("consumers"), list):
            return reply
        consumers += result["consumers"]
        if isinstance(result.get("too_long"), list):
            too_long += result["too_long"]
        page_end = result.get("next")
        if not isinstance(page_end, str):
            break
        if page_end <= after:
            # The gateway's pages move on by name (each holds one consumer
            # at least): not an answer of a gateway's to trust.
            raise ValueError(f"consumer_list's next page ({page_end!r}) is not after the one before ({after!r})")
        after = page_end
        reply = await exchange(reactor, attrs.evolve(request, data={**(request.data or {}), "after": after}))
    whole = {**answer, "result": {**result, "consumers": consumers, "next": None}}
    if too_long:
        whole["result"]["too_long"] = too_long
    # Compact, as the gateway writes every answer (orjson): --json prints
    # this one as it prints the others, the usage's included.
    return Reply(json.dumps(whole, ensure_ascii=False, separators=(",", ":")).encode("utf-8"), round_trip)
