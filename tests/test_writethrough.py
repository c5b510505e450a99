"""
L{write_through} sends at once what a TCP connection writes when nothing
is queued before it, and otherwise does exactly what C{transport.write}
does: real connections on loopback, the far end a plain socket read
without giving the reactor a turn.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from openclaw import writethrough
from openclaw.writethrough import write_through


class _Held(Protocol):
    """
    One end of a connection under test: tells when it is up and when lost.
    """

    def __init__(self) -> None:
        self.made: Deferred[_Held] = Deferred()
        #: Fires with the reason (a Failure, not as an error).
        self.lost: Deferred[list[Failure]] = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback([reason])


def _pending(peer: socket.socket) -> bytes | None:
    """
    What has reached C{peer} by now, without waiting; L{None} for nothing.
    """
    try:
        return peer.recv(1 << 20)
    except BlockingIOError:
        return None


@inlineCallbacks
def _receive(peer: socket.socket, size: int, seconds: float = 5.0) -> Any:
    """
    Read C{size} bytes on C{peer} (or up to its end), turning the reactor
    meanwhile.
    """
    got = b""
    deadline = time.monotonic() + seconds
    while len(got) < size and time.monotonic() < deadline:
        data = _pending(peer)
        if data == b"":
            break
        if data:
            got += data
        else:
            yield deferLater(reactor, 0.005, lambda: None)
    return got


class WriteThroughTests(TestCase):
    @inlineCallbacks
    def connect(self) -> Any:
        """
        A server-side Twisted transport, and a plain non-blocking socket at
        the other end.
        """
        server = _Held()
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peer = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(peer.close)
        peer.setblocking(False)
        yield server.made

        def close() -> Any:
            server.transport.abortConnection()
            return server.lost

        self.addCleanup(close)
        return server, peer

    @inlineCallbacks
    def test_sent_at_once(self) -> Any:
        """
        With nothing queued, the bytes are on their way before the reactor
        turns (C{transport.write} alone would hold them until it does).
        """
        server, peer = yield self.connect()
        write_through(server.transport, b"hello")
        self.assertEqual(_pending(peer), b"hello")
        write_through(server.transport, b", again")
        self.assertEqual(_pending(peer), b", again")

    @inlineCallbacks
    def test_behind_queued_bytes(self) -> Any:
        """
        Bytes the transport still holds go first: the write waits behind
        them.
        """
        server, peer = yield self.connect()
        server.transport.write(b"first ")
        write_through(server.transport, b"second")
        self.assertIsNone(_pending(peer))
        got = yield _receive(peer, len(b"first second"))
        self.assertEqual(got, b"first second")

    @inlineCallbacks
    def test_rest_queued(self) -> Any:
        """
        What the socket does not take at once is queued, and what is
        written after it follows it.
        """
        server, peer = yield self.connect()
        server.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = bytes(range(256)) * 16384  # 4 MB: more than the socket buffers take
        write_through(server.transport, big)
        write_through(server.transport, b"tail")
        first = _pending(peer)
        self.assertTrue(first and big.startswith(first))
        self.assertLess(len(first), len(big))
        rest = yield _receive(peer, len(big) + 4 - len(first))
        self.assertEqual(first + rest, big + b"tail")

    @inlineCallbacks
    def test_after_lose_connection(self) -> Any:
        """
        After C{loseConnection}, as C{transport.write}: sent before the
        connection closes.
        """
        server, peer = yield self.connect()
        server.transport.loseConnection()
        write_through(server.transport, b"last words")
        got = yield _receive(peer, 100)
        self.assertEqual(got, b"last words")
        yield server.lost

    @inlineCallbacks
    def test_after_abort(self) -> Any:
        """
        After C{abortConnection}, nothing more is sent.
        """
        server, peer = yield self.connect()
        server.transport.abortConnection()
        write_through(server.transport, b"never")
        self.assertIsNone(_pending(peer))
        yield server.lost
        # Reset, as an abort does, with nothing before it.
        self.assertRaises(ConnectionResetError, peer.recv, 100)

    @inlineCallbacks
    def test_broken_connection(self) -> Any:
        """
        A connection the other end has reset: no exception from the write,
        the loss is reported the usual way.
        """
        server, peer = yield self.connect()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.close()
        for _ in range(3):
            write_through(server.transport, b"into the void")
        (reason,) = yield server.lost
        self.assertIsInstance(reason, Failure)

    @inlineCallbacks
    def test_client_side(self) -> Any:
        """
        The connections the gateway opens (to the providers) are sent at
        once too.
        """
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = _Held()
        factory = ClientFactory.forProtocol(lambda: client)
        connector = reactor.connectTCP("127.0.0.1", listener.getsockname()[1], factory)
        self.addCleanup(connector.disconnect)
        yield client.made
        peer, _ = listener.accept()
        self.addCleanup(peer.close)
        peer.setblocking(False)
        write_through(client.transport, b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(_pending(peer), b"GET / HTTP/1.1\r\n\r\n")


class OtherTransportTests(SynchronousTestCase):
    def test_not_tcp(self) -> None:
        """
        Any other transport (TLS, in-memory, ...) gets a plain C{write}.
        """
        transport = StringTransport()
        write_through(transport, b"one ")
        write_through(transport, b"two")
        self.assertEqual(transport.value(), b"one two")

    def test_layout_known(self) -> None:
        """
        This Twisted keeps its transport state where L{write_through} looks
        (else every write would take the slow path, silently).
        """
        self.assertTrue(writethrough._transport_layout_known())
