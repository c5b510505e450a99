"""
The gateway's upstream HTTP client (Twisted's C{Agent} over the pool that
L{ProviderRegistry.from_settings} builds, L{CachedEndpoints}, and
L{read_body}) against stand-ins on 127.0.0.1: what callers rely on, checked
at the socket.

Most stand-ins here are scripted TCP servers that answer with exact bytes,
so that every way an upstream can answer (or fail to: cut mid-body, closed
before answering, an answer nobody asked for) can be played; the TLS ones
are twisted.web sites behind a CA made for the test.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

from OpenSSL.SSL import Error as TLSError
from service_identity import CertificateError
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import VerificationError
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from openclaw.logs import make_observer
from openclaw.providers import ProviderRegistry
from openclaw.providers.endpoints import CachedEndpoints, HeadLimitedEndpoints
from openclaw.providers.errors import BodyTooLarge, HandshakeTimedOut, HeadTooLarge, describe_failure
from openclaw.providers.fetch import Exchange, get_json, post, read_body
from openclaw.settings import Settings
from tests.support import free_port, make_ca, start_gateway

JSON = Headers({"Content-Type": ["application/json"]})


def ok(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), b"".join(extra), body)


def tick(seconds: float = 0.01) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class ScriptedServer(Protocol):
    """
    Answers each request (a head, and a body of its Content-Length) with the
    next of the factory's answers; records what it was sent.
    """

    factory: ScriptedFactory

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.buffer = b""
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.factory.requests.append(head + b"\r\n\r\n" + rest[:length])
            self.buffer = rest[length:]
            answer = self.factory.answers.pop(0) if self.factory.answers else None
            if answer is None:
                continue  # hang
            if callable(answer):
                answer(self)
            else:
                self.transport.write(answer)

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(None)


class ScriptedFactory(Factory):
    protocol = ScriptedServer

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.connections: list[ScriptedServer] = []

    def open_connections(self) -> int:
        return sum(1 for c in self.connections if c.transport.connected)


def hang_up(server: ScriptedServer) -> None:
    server.transport.loseConnection()


class AgentTestCase(TestCase):
    @inlineCallbacks
    def serve(self, *answers: Any) -> Any:
        """
        A scripted server answering C{answers} in turn (None: never
        answer; a callable: do what it does with the server protocol).
        """
        self.server = ScriptedFactory(list(answers))
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.server)
        self.addCleanup(port.stopListening)
        self.url = b"http://127.0.0.1:%d/v1/chat" % port.getHost().port
        self.addCleanup(self.drop_server_connections, self.server)
        return self.server

    def drop_server_connections(self, server: ScriptedFactory) -> Any:
        for connection in server.connections:
            if connection.transport.connected:
                connection.transport.abortConnection()
        return tick(0)

    def kimi_gateway(self, **settings: Any) -> Any:
        """
        A gateway whose Kimi is the scripted server (L{serve}, its
        C{self.url}), Kimi its default provider, C{gateway-key-0123456789}
        its key; C{settings} on top.
        """
        return start_gateway(
            self,
            api=True,
            default_provider="kimi",
            providers=Settings()
            .with_provider("kimi", base_url=self.url.decode().removesuffix("/chat"), api_key="sk-kimi-test")
            .providers,
            gateway_api_keys=("gateway-key-0123456789",),
            **settings,
        )

    def registry(self, **settings: Any) -> ProviderRegistry:
        """
        The providers' registry the gateway would build from C{settings}:
        its C{pool} and its first adapter's C{agent} and C{http} client
        (every adapter's are over the same agent) are what is tested.
        """
        registry = ProviderRegistry.from_settings(Settings(**settings), reactor)
        self.addCleanup(registry.close)
        return registry

    def post(self, registry: ProviderRegistry, body: bytes = b'{"q": 1}') -> Deferred[Any]:
        """
        A chat call's request, as L{ProviderAdapter.post_chat} sends it.
        """
        return post(next(iter(registry)).agent, self.url, JSON, body)


class PoolTests(AgentTestCase):
    @inlineCallbacks
    def test_connection_reused(self):
        """
        Sequential calls share one connection, each reused once its answer
        was read whole; the server sees the request sent.
        """
        server = yield self.serve(ok(b"one"), ok(b"two"), ok(b"three"))
        registry = self.registry()
        bodies = []
        for _ in range(3):
            response = yield self.post(registry)
            self.assertEqual(response.code, 200)
            bodies.append((yield read_body(response)))
        self.assertEqual(bodies, [b"one", b"two", b"three"])
        self.assertEqual(len(server.connections), 1)
        head, _, body = server.requests[0].partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"POST /v1/chat HTTP/1.1")
        self.assertIn(b"Content-Length: 8", lines)
        self.assertIn(b"Content-Type: application/json", lines)
        self.assertEqual(body, b'{"q": 1}')

    @inlineCallbacks
    def test_concurrent_requests_use_their_own_connections(self):
        server = yield self.serve(ok(b"a"), ok(b"b"), ok(b"c"))
        registry = self.registry()
        responses = yield Deferred.fromCoroutine(_gather([self.post(registry) for _ in range(3)]))
        bodies = yield Deferred.fromCoroutine(_gather([read_body(r) for r in responses]))
        self.assertEqual(sorted(bodies), [b"a", b"b", b"c"])
        self.assertEqual(len(server.connections), 3)

    @inlineCallbacks
    def test_connection_close_honoured(self):
        """
        An answer with C{Connection: close} is the connection's last: the
        next request opens another.
        """
        server = yield self.serve(ok(b"one", b"Connection: close\r\n"), ok(b"two"))
        registry = self.registry()
        for expected in (b"one", b"two"):
            response = yield self.post(registry)
            self.assertEqual((yield read_body(response)), expected)
        self.assertEqual(len(server.connections), 2)

    @inlineCallbacks
    def test_pool_size(self):
        """
        UPSTREAM_POOL_SIZE idle connections are kept per host; the others
        are closed once their answers are read.
        """
        server = yield self.serve(ok(b"a"), ok(b"b"), ok(b"c"))
        registry = self.registry(upstream_pool_size=1)
        responses = yield Deferred.fromCoroutine(_gather([self.post(registry) for _ in range(3)]))
        yield Deferred.fromCoroutine(_gather([read_body(r) for r in responses]))
        while server.open_connections() > 1:
            yield tick()
        yield tick(0.05)
        self.assertEqual(server.open_connections(), 1)

    @inlineCallbacks
    def test_idle_connections_closed(self):
        """
        An idle connection is closed after UPSTREAM_IDLE_SECONDS.
        """
        server = yield self.serve(ok(b"a"))
        registry = self.registry(upstream_idle_seconds=0.1)
        yield read_body((yield self.post(registry)))
        self.assertEqual(server.open_connections(), 1)
        yield server.connections[0].closed

    @inlineCallbacks
    def test_closed_by_server_while_idle(self):
        """
        A pooled connection the server closes is dropped from the pool, and
        the next request goes out on a new one.
        """
        server = yield self.serve(ok(b"a"), ok(b"b"))
        registry = self.registry()
        yield read_body((yield self.post(registry)))
        server.connections[0].transport.loseConnection()
        yield server.connections[0].closed
        yield tick(0.05)
        self.assertEqual((yield read_body((yield self.post(registry)))), b"b")
        self.assertEqual(len(server.connections), 2)

    @inlineCallbacks
    def test_abandoned_body_not_reused(self):
        """
        A connection whose answer was not read to its end (the reader gave
        up on it) is dropped, not pooled: the next call opens another.
        """
        server = yield self.serve(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome", ok(b"next"))
        registry = self.registry()
        response = yield self.post(registry)
        reading = read_body(response)
        reading.cancel()
        yield self.assertFailure(reading, CancelledError)
        yield server.connections[0].closed
        self.assertEqual((yield read_body((yield self.post(registry)))), b"next")
        self.assertEqual(len(server.connections), 2)

    @inlineCallbacks
    def test_stale_connection_retried_for_get(self):
        """
        A GET sent on a pooled connection the server closes without
        answering (it timed the connection out as the request went out) is
        sent again on a new connection: the caller sees the answer.
        """
        server = yield self.serve(ok(b"[]"), hang_up, ok(b"[1]"))
        registry = self.registry()
        self.assertEqual((yield (yield next(iter(registry)).http.get(self.url)).content()), b"[]")
        self.assertEqual((yield (yield next(iter(registry)).http.get(self.url)).content()), b"[1]")
        self.assertEqual(len(server.connections), 2)
        self.assertEqual(len(server.requests), 3)

    @inlineCallbacks
    def test_stale_connection_not_retried_for_post(self):
        """
        A chat call (a POST, not idempotent) in the same case fails: this is
        why UPSTREAM_IDLE_SECONDS stays below the far end's idle cut-off.
        """
        server = yield self.serve(ok(b"a"), hang_up)
        registry = self.registry()
        yield read_body((yield self.post(registry)))
        yield self.assertFailure(self.post(registry), ResponseNeverReceived)
        self.assertEqual(len(server.connections), 1)

    @inlineCallbacks
    def test_close(self):
        """
        L{ProviderRegistry.close} closes the pool's idle connections and
        fires once they are closed: nothing is left for trial to find.
        """
        server = yield self.serve(ok(b"a"), ok(b"b"))
        registry = self.registry()
        responses = yield Deferred.fromCoroutine(_gather([self.post(registry) for _ in range(2)]))
        yield Deferred.fromCoroutine(_gather([read_body(r) for r in responses]))
        self.assertEqual(server.open_connections(), 2)
        yield registry.close()
        for connection in server.connections:
            yield connection.closed

    @inlineCallbacks
    def test_no_cookies_kept(self):
        """
        A provider's C{Set-Cookie} on a models listing is not sent back
        with the next one: the GET client keeps no cookies.
        """
        server = yield self.serve(ok(b"{}", b"Set-Cookie: session=abc; Path=/\r\n"), ok(b"{}"))
        registry = self.registry()
        for _ in range(2):
            status, _ = yield Deferred.fromCoroutine(
                get_json(
                    next(iter(registry)).http,
                    self.url.decode(),
                    headers={},
                    params=None,
                    exchange=Exchange(started=time.monotonic()),
                    what="models listing",
                )
            )
            self.assertEqual(status, 200)
        self.assertEqual(len(server.requests), 2)
        self.assertNotIn(b"\r\ncookie:", server.requests[1].lower())


class GatewayStopTests(AgentTestCase):
    timeout = 20

    @inlineCallbacks
    def test_pool_closed_on_stop(self):
        """
        A gateway's stop closes its pooled provider connections.
        """
        answer = json.dumps(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1764000000,
                "model": "moonshot-v1-8k",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi."}, "finish_reason": "stop"}],
            }
        ).encode()
        server = yield self.serve(ok(answer, b"Content-Type: application/json\r\n"))
        gateway = self.kimi_gateway()
        client_pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield HTTPClient(Agent(reactor, pool=client_pool)).post(
            f"http://127.0.0.1:{gateway.api_port}/v1/chat/completions",
            json={"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Hello"}]},
            headers={"Authorization": ["Bearer gateway-key-0123456789"]},
        )
        self.assertEqual(response.code, 200, (yield response.text()))
        yield response.content()
        self.assertEqual(server.requests[0].split(b"\r\n")[0], b"POST /v1/chat/completions HTTP/1.1")
        self.assertEqual(server.open_connections(), 1)
        yield gateway.service.stopService()
        yield server.connections[0].closed


class AnswerTests(AgentTestCase):
    @inlineCallbacks
    def test_chunked_body_streamed(self):
        """
        A chunked body reaches the body protocol chunk by chunk, as it
        arrives, then ends with ResponseDone; the connection is reused.
        """
        first: list[ScriptedServer] = []

        def start(server: ScriptedServer) -> None:
            first.append(server)
            server.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")

        server = yield self.serve(start, ok(b"again"))
        registry = self.registry()
        response = yield self.post(registry)
        got: list[bytes] = []
        ended: Deferred[Any] = Deferred()

        class Body(Protocol):
            def dataReceived(self, data: bytes) -> None:
                got.append(data)

            def connectionLost(self, reason: Any) -> None:
                ended.callback([reason])

        response.deliverBody(Body())
        while not got:
            yield tick()
        self.assertEqual(got, [b"hello"])
        first[0].transport.write(b"6\r\n world\r\n0\r\n\r\n")
        (reason,) = yield ended
        self.assertTrue(reason.check(ResponseDone))
        self.assertEqual(got, [b"hello", b" world"])
        self.assertEqual((yield read_body((yield self.post(registry)))), b"again")
        self.assertEqual(len(server.connections), 1)

    @inlineCallbacks
    def test_body_delimited_by_close(self):
        """
        No length and no chunking: L{read_body} gives what arrived before
        the server closed.
        """

        def answer(server: ScriptedServer) -> None:
            server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
            server.transport.loseConnection()

        yield self.serve(answer)
        response = yield self.post(self.registry())
        self.assertEqual((yield read_body(response)), b"all of it")

    @inlineCallbacks
    def test_error_status(self):
        yield self.serve(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nX-Thing: a\r\nX-Thing: b\r\n\r\nno")
        response = yield self.post(self.registry())
        self.assertEqual((response.code, response.phrase), (404, b"Not Found"))
        self.assertEqual(response.headers.getRawHeaders(b"x-thing"), [b"a", b"b"])
        self.assertEqual((yield read_body(response)), b"no")

    @inlineCallbacks
    def test_informational_answer_skipped(self):
        yield self.serve(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + ok(b"final"))
        response = yield self.post(self.registry())
        self.assertEqual(response.code, 200)
        self.assertEqual((yield read_body(response)), b"final")

    @inlineCallbacks
    def test_interim_answers_logged_once(self):
        """
        Twisted's client logs each interim answer it skips; the gateway's
        observer shows the first and holds back the rest (L{PEER_CAUSED_LINES}
        names the client's logger: this fails if Twisted renames it).
        """
        out = io.StringIO()
        observer = make_observer(out, "json", "info")
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        yield self.serve(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" * 50 + ok(b"final"))
        response = yield self.post(self.registry())
        self.assertEqual((yield read_body(response)), b"final")
        interim = [line for line in out.getvalue().splitlines() if "Ignoring unexpected 103" in line]
        self.assertEqual(len(interim), 1, out.getvalue())

    @inlineCallbacks
    def test_oversized_header_line(self):
        yield self.serve(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"x" * 70000 + b"\r\n\r\n")
        yield self.assertFailure(self.post(self.registry()), ResponseFailed, ResponseNeverReceived)

    @inlineCallbacks
    def test_endless_head_dropped(self):
        """
        Header lines without end (Twisted's client keeps them all): the
        connection is dropped once the head passes
        C{MAX_RESPONSE_HEAD_BYTES}, not left to grow until the timeout.
        """

        def answer(server: ScriptedServer) -> None:
            lines = b"".join(b"X-Pad-%d: %s\r\n" % (n, b"x" * 200) for n in range(2000))
            server.transport.write(b"HTTP/1.1 200 OK\r\n" + lines)

        server = yield self.serve(answer)
        started = time.monotonic()
        call = self.post(self.registry()).addTimeout(5, reactor)
        failure = yield self.assertFailure(call, ResponseFailed, ResponseNeverReceived)
        self.assertLess(time.monotonic() - started, 2)
        self.assertFalse(any(reason.check(CancelledError) for reason in failure.reasons), failure.reasons)
        # Said as the gateway's own abort, not as the provider's close.
        port = int(self.url.split(b":")[2].split(b"/")[0])
        self.assertEqual(
            describe_failure(Failure(failure), "127.0.0.1", port, "KIMI_BASE_URL"),
            f"the response's head from 127.0.0.1:{port} passed 64 KiB (MAX_RESPONSE_HEAD_BYTES): the gateway "
            "closed the connection; the provider, or a proxy on the way, sends headers without end",
        )
        yield tick(0.05)
        self.assertEqual(server.open_connections(), 0)

    @inlineCallbacks
    def test_heads_bounded_together(self):
        """
        The bound holds for all the heads of one answer: interim answers
        without end; an interim status only Twisted's reading of it sees
        as one (C{0100}, C{+100}), before endless header lines; a head
        sent whole in one read.
        """
        pad = b"".join(b"X-Pad-%d: %s\r\n" % (n, b"x" * 200) for n in range(2000))
        for answer in (
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 5000,
            b"HTTP/1.1 0100 X\r\n\r\nHTTP/1.1 200 OK\r\n" + pad,
            b"HTTP/1.1 +100 X\r\n\r\nHTTP/1.1 200 OK\r\n" + pad,
            b"HTTP/1.1 200 OK\r\n" + pad[:131000] + b"\r\nbody",
        ):

            def send(server: ScriptedServer, answer: bytes = answer) -> None:
                server.transport.write(answer)

            server = yield self.serve(send)
            started = time.monotonic()
            call = self.post(self.registry()).addTimeout(5, reactor)
            failure = yield self.assertFailure(call, ResponseFailed, ResponseNeverReceived)
            self.assertLess(time.monotonic() - started, 2, answer[:40])
            self.assertFalse(any(reason.check(CancelledError) for reason in failure.reasons), failure.reasons)
            self.assertTrue(failure.reasons[0].check(HeadTooLarge), failure.reasons)
            yield tick(0.05)
            self.assertEqual(server.open_connections(), 0)

    @inlineCallbacks
    def test_head_in_pieces(self):
        """
        A head whose empty line is split across reads (CR LF, then CR LF;
        LF, then LF) ends there: its body is read.
        """
        for end in ((b"\r\n", b"\r\n"), (b"\n", b"\n"), (b"\r\n\r", b"\n")):

            def answer(server: ScriptedServer, end: tuple[bytes, bytes] = end) -> None:
                server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4" + end[0])
                reactor.callLater(0.02, server.transport.write, end[1] + b"body")

            yield self.serve(answer)
            response = yield self.post(self.registry()).addTimeout(5, reactor)
            self.assertEqual((yield read_body(response)), b"body")

    @inlineCallbacks
    def test_body_read_later(self):
        """
        A body that arrived with the headers waits for its reader.
        """
        yield self.serve(ok(b"kept"))
        response = yield self.post(self.registry())
        yield tick(0.05)
        self.assertEqual((yield read_body(response)), b"kept")


class FailureTests(AgentTestCase):
    @inlineCallbacks
    def test_closed_before_answering(self):
        yield self.serve(hang_up)
        failure = yield self.assertFailure(self.post(self.registry()), ResponseNeverReceived)
        self.assertTrue(failure.reasons[0].check(ConnectionDone))

    @inlineCallbacks
    def test_cut_mid_headers(self):
        def answer(server: ScriptedServer) -> None:
            server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Le")
            server.transport.loseConnection()

        yield self.serve(answer)
        yield self.assertFailure(self.post(self.registry()), ResponseFailed, ResponseNeverReceived)

    @inlineCallbacks
    def test_not_http(self):
        yield self.serve(b"SSH-2.0-OpenSSH_9.6\r\n")
        yield self.assertFailure(self.post(self.registry()), ResponseFailed, ResponseNeverReceived)

    @inlineCallbacks
    def test_unsolicited_bytes_drop_the_connection(self):
        """
        Bytes nobody asked for on an idle pooled connection (a second
        answer to one request) mean it cannot be trusted: it is dropped.
        """
        server = yield self.serve(ok(b"one"), ok(b"two"))
        registry = self.registry()
        self.assertEqual((yield read_body((yield self.post(registry)))), b"one")
        yield tick(0.02)
        server.connections[0].transport.write(ok(b"extra"))
        yield server.connections[0].closed
        self.assertEqual((yield read_body((yield self.post(registry)))), b"two")
        self.assertEqual(len(server.connections), 2)

    @inlineCallbacks
    def test_cancel_before_headers(self):
        """
        Cancelling a call still waiting for its answer's headers closes its
        connection (what a client that goes away, or a timeout, does).
        """
        server = yield self.serve(None)
        d = self.post(self.registry())
        while not server.requests:
            yield tick()
        d.cancel()
        failure = yield self.assertFailure(d, ResponseNeverReceived)
        self.assertTrue(failure.reasons[0].check(CancelledError))
        yield server.connections[0].closed

    @inlineCallbacks
    def test_refused(self):
        """
        A refused connection to an IP address fails at once (no
        HostnameEndpoint attempt delay, which would hold failover up).
        """
        registry = self.registry()
        for host in (b"127.0.0.1", b"[::1]"):
            started = time.monotonic()
            d = next(iter(registry)).agent.request(b"GET", b"http://%s:%d/" % (host, free_port()))
            yield self.assertFailure(d, ConnectionRefusedError)
            self.assertLess(time.monotonic() - started, 0.2, host)

    def test_invalid_target_refused(self):
        """
        A URL that could split the request line (a model name with a space
        or a line break in it) is refused before anything is sent.
        """
        registry = self.registry()
        for url in (b"http://h/models/a b:generateContent", b"http://h/x\r\nHost: evil"):
            self.failureResultOf(post(next(iter(registry)).agent, url, JSON, b"")).trap(ValueError)


class BodyReadingTests(AgentTestCase):
    """
    L{read_body}.  (Twisted's C{readBody} has no size limit, and cannot
    abort a body from C{Agent}: it looks for an C{abortConnection} that
    C{Agent}'s body transport does not have, and warns.)
    """

    @inlineCallbacks
    def test_body_in_pieces(self):
        def answer(server: ScriptedServer) -> None:
            server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
            reactor.callLater(0.02, server.transport.write, b"56789")

        yield self.serve(answer)
        response = yield self.post(self.registry())
        self.assertEqual((yield read_body(response)), b"0123456789")

    @inlineCallbacks
    def test_cut_mid_body(self):
        """
        An answer cut mid-body fails with L{ResponseFailed}.
        """

        def answer(server: ScriptedServer) -> None:
            server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
            server.transport.loseConnection()

        yield self.serve(answer)
        response = yield self.post(self.registry())
        failure = yield self.assertFailure(read_body(response), ResponseFailed)
        self.assertTrue(failure.reasons[0].check(ConnectionDone))

    @inlineCallbacks
    def test_cancel_drops_the_connection(self):
        """
        Cancelling L{read_body} drops the connection.
        """
        server = yield self.serve(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome")
        response = yield self.post(self.registry())
        reading = read_body(response)
        reading.cancel()
        yield self.assertFailure(reading, CancelledError)
        yield server.connections[0].closed

    @inlineCallbacks
    def test_body_over_the_limit(self):
        """
        A body that runs past the limit as it arrives fails with
        L{BodyTooLarge}, and its connection is dropped.
        """
        server = yield self.serve(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 50)
        response = yield self.post(self.registry())
        yield self.assertFailure(read_body(response, limit=10), BodyTooLarge)
        yield server.connections[0].closed

    @inlineCallbacks
    def test_whole_body_over_the_limit(self):
        """
        A body already read to its end is refused all the same; its
        connection, whose answer was whole, stays in the pool.
        """
        server = yield self.serve(ok(b"x" * 100), ok(b"small"))
        registry = self.registry()
        response = yield self.post(registry)
        yield tick(0.05)
        yield self.assertFailure(read_body(response, limit=10), BodyTooLarge)
        self.assertEqual((yield read_body((yield self.post(registry)))), b"small")
        self.assertEqual(len(server.connections), 1)


class Models(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"data": []}'

    def render_POST(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"echo": ' + request.content.read() + b"}"


class TLSTests(AgentTestCase):
    """
    https upstreams: a twisted.web stand-in on 127.0.0.1 with a certificate
    from a CA made for the test, checked as a provider's would be.
    """

    @inlineCallbacks
    def serve_tls(self, *names: str) -> Any:
        self.ca = make_ca()
        endpoint = SSL4ServerEndpoint(reactor, 0, self.ca.server_options(*names), interface="127.0.0.1")
        site = Site(Models())
        site.log = lambda request: None  # type: ignore[method-assign]
        self.tls_connections = 0
        build = site.buildProtocol

        def counted(address: Any) -> Any:
            self.tls_connections += 1
            return build(address)

        site.buildProtocol = counted  # type: ignore[method-assign]
        port = yield endpoint.listen(site)
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        self.url = b"https://127.0.0.1:%d/v1/chat" % self.port

    def trusting(self) -> ProviderRegistry:
        """
        The gateway's agent with a TLS policy that trusts the test's CA.
        """
        policy = BrowserLikePolicyForHTTPS(trustRoot=self.ca.trust_root())
        registry = ProviderRegistry.from_settings(
            Settings(), reactor, endpoints=CachedEndpoints(reactor, tls_policy=policy)
        )
        self.addCleanup(registry.close)
        return registry

    @inlineCallbacks
    def test_trusted_ca(self):
        """
        A certificate from a trusted CA for the URL's host: the call goes
        through, and its connection is reused.
        """
        yield self.serve_tls("127.0.0.1", "localhost")
        registry = self.trusting()
        for n in range(2):
            response = yield self.post(registry, b"%d" % n)
            self.assertEqual((yield read_body(response)), b'{"echo": %d}' % n)

    @inlineCallbacks
    def test_ca_file_setting(self):
        """
        UPSTREAM_CA_FILE's certificates (read by the settings) are the CAs
        the gateway's agent trusts.
        """
        yield self.serve_tls("localhost")
        registry = self.registry(upstream_ca_pem=self.ca.pem)
        url = "https://localhost:%d/v1/models" % self.port
        self.assertEqual((yield (yield next(iter(registry)).http.get(url)).content()), b'{"data": []}')

    @inlineCallbacks
    def test_untrusted_ca(self):
        """
        With the default trust (the system's), the test's CA is unknown:
        the call fails with a certificate error as its connecting (not as
        an answer never received: the chat call's 502 is then
        C{upstream_unreachable}, failed over), and the adapter's reason
        says it was TLS, why, and what to set.
        """
        yield self.serve_tls("127.0.0.1")
        failure = yield self.assertFailure(self.post(self.registry()), TLSError)
        self.assertIn("certificate verify failed", str(failure))
        reason = describe_failure(Failure(failure), "127.0.0.1", self.port, "KIMI_BASE_URL")
        self.assertIn("TLS handshake with 127.0.0.1:%d failed" % self.port, reason)
        self.assertEqual(
            reason,
            f"TLS handshake with 127.0.0.1:{self.port} failed (certificate verify failed); the certificate is not "
            "signed by an authority the gateway trusts (or is expired): for a provider behind a private CA or a "
            "TLS-inspecting proxy, set UPSTREAM_CA_FILE to that CA's PEM file; else check KIMI_BASE_URL",
        )

    @inlineCallbacks
    def test_wrong_host_name(self):
        """
        A certificate from a trusted CA, but for another host: refused, as
        the connecting's failure, said in words (the names the certificate
        holds), not as service_identity's repr.
        """
        yield self.serve_tls("api.example.test", "10.9.8.7")
        failure = yield self.assertFailure(self.post(self.trusting()), VerificationError, TLSError)
        self.assertIsInstance(failure, VerificationError)
        reason = describe_failure(Failure(failure), "127.0.0.1", self.port, "KIMI_BASE_URL")
        self.assertEqual(
            reason,
            f"TLS handshake with 127.0.0.1:{self.port} failed (the certificate is not valid for 127.0.0.1 (it "
            "names api.example.test, 10.9.8.7)); set KIMI_BASE_URL to a host name the certificate holds, or give "
            "the provider (or the proxy on the way) a certificate for this one",
        )
        self.assertNotIn("Mismatch", reason)

    @inlineCallbacks
    def test_plain_port(self):
        """
        An https URL to a plain port whose server answers in HTTP: said to
        be no TLS, with the URL to check.
        """

        self.server = ScriptedFactory([])
        self.server.protocol = _Blurt
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.server)
        self.addCleanup(port.stopListening)
        self.addCleanup(self.drop_server_connections, self.server)
        self.url = b"https://127.0.0.1:%d/v1/chat" % port.getHost().port
        failure = yield self.assertFailure(self.post(self.registry()).addTimeout(5, reactor), TLSError)
        reason = describe_failure(Failure(failure), "127.0.0.1", port.getHost().port, "KIMI_BASE_URL")
        self.assertIn("the server did not answer in TLS: is KIMI_BASE_URL right (http:// for a plain port)?", reason)

    @inlineCallbacks
    def test_cancelled_during_the_handshake(self):
        """
        A connecting cancelled while its TLS handshake is under way (a
        call's timeout, its client gone) fails with C{CancelledError} and
        nothing else: the abort's end of the connection, a turn later, did
        not fail the handshake's Deferred again (review s34: an
        C{AlreadyCalledError} logged critical, and the client's protocol
        never told the connection ended).
        """
        silent = Factory.forProtocol(Protocol)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(silent)
        self.addCleanup(port.stopListening)
        endpoint = HeadLimitedEndpoints(CachedEndpoints(reactor)).endpointForURI(
            URI.fromBytes(b"https://127.0.0.1:%d/" % port.getHost().port)
        )
        lost: list[Failure] = []

        class Client(Protocol):
            def connectionLost(self, reason: Failure = connectionDone) -> None:
                lost.append(reason)

        connecting = endpoint.connect(Factory.forProtocol(Client))
        yield deferLater(reactor, 0.2, lambda: None)
        connecting.cancel()
        yield self.assertFailure(connecting, CancelledError)
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(self.flushLoggedErrors(), [])
        # The client's protocol was told its connection ended, once.
        self.assertEqual(len(lost), 1)

    @inlineCallbacks
    def test_handshake_deadline(self):
        """
        A server that accepts the TCP connection and never answers in TLS
        (a tarpit, a middlebox that drops TLS): the connecting fails with
        L{HandshakeTimedOut} once UPSTREAM_CONNECT_TIMEOUT passed, the
        connection aborted, and the reason says so and what to check
        (before: the call hung until UPSTREAM_TIMEOUT, told as a slow
        answer).
        """
        silent = Factory.forProtocol(Protocol)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(silent)
        self.addCleanup(port.stopListening)
        self.url = b"https://127.0.0.1:%d/v1/chat" % port.getHost().port
        started = time.monotonic()
        failure = yield self.assertFailure(
            self.post(self.registry(upstream_connect_timeout=0.3)).addTimeout(5, reactor), HandshakeTimedOut
        )
        self.assertLess(time.monotonic() - started, 2)
        self.assertEqual(failure.seconds, 0.3)
        reason = describe_failure(Failure(failure), "127.0.0.1", port.getHost().port, "KIMI_BASE_URL")
        self.assertEqual(
            reason,
            f"TLS handshake with 127.0.0.1:{port.getHost().port}: the TLS handshake did not finish within 0.3 s "
            "(UPSTREAM_CONNECT_TIMEOUT); is KIMI_BASE_URL an https service, and does the network on the way (a "
            "firewall, a proxy) let TLS through?",
        )
        self.assertEqual(self.flushLoggedErrors(), [])

    @inlineCallbacks
    def test_handshake_deadline_ends_with_the_handshake(self):
        """
        A handshake done in time leaves its connection be: reused by the
        next call after the deadline's seconds have passed, one TCP
        connection for both.
        """
        yield self.serve_tls("127.0.0.1")
        policy = BrowserLikePolicyForHTTPS(trustRoot=self.ca.trust_root())
        registry = ProviderRegistry.from_settings(
            Settings(upstream_connect_timeout=0.2), reactor, endpoints=CachedEndpoints(reactor, tls_policy=policy)
        )
        self.addCleanup(registry.close)
        for n in range(2):
            response = yield self.post(registry, b"%d" % n)
            self.assertEqual((yield read_body(response)), b'{"echo": %d}' % n)
            yield deferLater(reactor, 0.4, lambda: None)
        self.assertEqual(self.tls_connections, 1)


class _Blurt(ScriptedServer):
    """
    A plain HTTP server's answer to whatever it is sent first.
    """

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.transport.loseConnection()


class CountingModels(Models):
    """
    L{Models}, counting the requests it is sent.
    """

    requests = 0

    def render(self, request: Any) -> bytes:
        type(self).requests += 1
        return super().render(request)


class HostNameCheckTests(AgentTestCase):
    trusting = TLSTests.trusting

    @inlineCallbacks
    def test_certificate_names_that_cannot_be_checked(self):
        """
        A certificate from a trusted CA whose names service_identity cannot
        read (a wildcard over a single label, C{*.example}): refused before
        the request (and its key) is sent.  Twisted's verify callback logs
        any error but VerificationError and lets the handshake through.
        """
        CountingModels.requests = 0
        self.ca = make_ca()
        endpoint = SSL4ServerEndpoint(reactor, 0, self.ca.server_options("*.example"), interface="127.0.0.1")
        site = Site(CountingModels())
        site.log = lambda request: None  # type: ignore[method-assign]
        port = yield endpoint.listen(site)
        self.addCleanup(port.stopListening)
        self.url = b"https://127.0.0.1:%d/v1/chat" % port.getHost().port
        failure = yield self.assertFailure(self.post(self.trusting()), CertificateError)
        self.flushLoggedErrors()
        self.assertEqual(CountingModels.requests, 0)
        reason = describe_failure(Failure(failure), "127.0.0.1", port.getHost().port, "KIMI_BASE_URL")
        self.assertIn("TLS handshake with 127.0.0.1:%d failed" % port.getHost().port, reason)
        self.assertIn("too few host components for wildcard usage", reason)
        self.assertIn("the certificate's names cannot be checked", reason)


async def _gather(deferreds: list[Deferred[Any]]) -> list[Any]:
    return [await d for d in deferreds]
