"""
The upstream agent (L{openclaw.providers.agent}) against scripted servers on
127.0.0.1: each test's server answers with exact bytes, so every way an
upstream can answer (or fail to) is checked at the socket, with the
L{IAgent}/L{IResponse} behaviour callers rely on.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import (
    PartialDownloadError,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    readBody,
)
from twisted.web.http_headers import Headers

from openclaw.providers.agent import (
    BytesProducer,
    UpstreamAgent,
    parse_target,
    request_bytes,
)
from openclaw.providers.endpoints import CachedEndpoints
from openclaw.providers.errors import BodyTooLarge
from openclaw.providers.fetch import read_body
from tests.support import free_port


def ok(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), b"".join(extra), body)


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
        self.addCleanup(self.drop_server_connections)
        return self.server

    def drop_server_connections(self) -> Any:
        for connection in self.server.connections:
            if connection.transport.connected:
                connection.transport.abortConnection()
        return deferLater(reactor, 0, lambda: None)

    def agent(self, max_idle: int = 8, idle_seconds: float = 30.0) -> UpstreamAgent:
        agent = UpstreamAgent(reactor, CachedEndpoints(reactor), max_idle=max_idle, idle_seconds=idle_seconds)
        self.addCleanup(agent.close)
        return agent

    def post(self, agent: UpstreamAgent, body: bytes = b'{"q": 1}', headers: Headers | None = None) -> Any:
        return agent.request(b"POST", self.url, headers or Headers({"Content-Type": ["application/json"]}),
                             BytesProducer(body))


class RequestTests(TestCase):
    def test_request_bytes(self):
        """
        One write: request line, Host (with a non-default port), the
        caller's headers, Content-Length, body.
        """
        target = parse_target(b"http://example.test:8080/v1/models/x:generateContent?alt=sse")
        raw = request_bytes(b"POST", target, Headers({"Authorization": ["Bearer k"]}), b"{}")
        self.assertEqual(
            raw,
            b"POST /v1/models/x:generateContent?alt=sse HTTP/1.1\r\nHost: example.test:8080\r\n"
            b"Authorization: Bearer k\r\nContent-Length: 2\r\n\r\n{}",
        )
        self.assertEqual(parse_target(b"https://api.moonshot.ai/v1").host, b"api.moonshot.ai")
        self.assertEqual(parse_target(b"http://[::1]:9/x").host, b"[::1]:9")
        self.assertEqual(parse_target(b"http://[::1]:9/x").key, (b"http", b"::1", 9))

    def test_header_values_cannot_split_the_request(self):
        raw = request_bytes(b"GET", parse_target(b"http://h/"), Headers({"X-A": ["a\r\nInjected: 1"]}), None)
        self.assertNotIn(b"\r\nInjected", raw)

    def test_invalid_target_refused(self):
        """
        A URL that could split the request line (a model name with a space
        or a line break in it) is refused before anything is sent, as
        Twisted's Agent does.
        """
        agent = UpstreamAgent(reactor, CachedEndpoints(reactor), max_idle=1, idle_seconds=1)
        for url in (b"http://h/models/a b:generateContent", b"http://h/x\r\nHost: evil", b"http://h/\x00"):
            failure = self.failureResultOf(agent.request(b"POST", url, None, BytesProducer(b"")))
            failure.trap(ValueError)
        self.failureResultOf(agent.request(b"GET\r\n", b"http://h/", None, None)).trap(ValueError)


class PoolTests(AgentTestCase):
    @inlineCallbacks
    def test_connection_reused(self):
        """
        Sequential requests share one connection; the server sees exactly
        the bytes sent.
        """
        server = yield self.serve(ok(b"one"), ok(b"two"), ok(b"three"))
        agent = self.agent()
        bodies = []
        for _ in range(3):
            response = yield self.post(agent)
            self.assertEqual(response.code, 200)
            bodies.append((yield read_body(response)))
        self.assertEqual(bodies, [b"one", b"two", b"three"])
        self.assertEqual(len(server.connections), 1)
        self.assertEqual(
            server.requests[0],
            b"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: 8\r\n\r\n{\"q\": 1}" % server.connections[0].transport.getHost().port,
        )

    @inlineCallbacks
    def test_concurrent_requests_use_their_own_connections(self):
        server = yield self.serve(ok(b"a"), ok(b"b"), ok(b"c"))
        agent = self.agent()
        responses = yield Deferred.fromCoroutine(_gather([self.post(agent) for _ in range(3)]))
        bodies = yield Deferred.fromCoroutine(_gather([read_body(r) for r in responses]))
        self.assertEqual(sorted(bodies), [b"a", b"b", b"c"])
        self.assertEqual(len(server.connections), 3)

    @inlineCallbacks
    def test_connection_close_honoured(self):
        """
        An answer with C{Connection: close} (or HTTP/1.0) is the
        connection's last: the next request opens another.
        """
        server = yield self.serve(
            ok(b"one", b"Connection: close\r\n"), b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\ntwo", ok(b"three")
        )
        agent = self.agent()
        for expected in (b"one", b"two", b"three"):
            response = yield self.post(agent)
            self.assertEqual((yield read_body(response)), expected)
        self.assertEqual(len(server.connections), 3)

    @inlineCallbacks
    def test_max_idle(self):
        server = yield self.serve(ok(b"a"), ok(b"b"), ok(b"c"))
        agent = self.agent(max_idle=1)
        responses = yield Deferred.fromCoroutine(_gather([self.post(agent) for _ in range(3)]))
        yield Deferred.fromCoroutine(_gather([read_body(r) for r in responses]))
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(sum(1 for c in server.connections if c.transport.connected), 1)

    @inlineCallbacks
    def test_idle_connections_closed(self):
        server = yield self.serve(ok(b"a"))
        agent = self.agent(idle_seconds=0.1)
        yield read_body((yield self.post(agent)))
        yield server.connections[0].closed
        yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(agent.connection_count, 0)

    @inlineCallbacks
    def test_closed_by_server_while_idle(self):
        """
        A pooled connection the server closes is dropped from the pool, and
        the next request goes out on a new one.
        """
        server = yield self.serve(ok(b"a"), ok(b"b"))
        agent = self.agent()
        yield read_body((yield self.post(agent)))
        server.connections[0].transport.loseConnection()
        yield server.connections[0].closed
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((yield read_body((yield self.post(agent)))), b"b")
        self.assertEqual(len(server.connections), 2)

    @inlineCallbacks
    def test_close(self):
        """
        L{UpstreamAgent.close} closes idle connections and those with a
        request under way, and the agent takes no more requests.
        """
        server = yield self.serve(ok(b"a"), None)
        agent = self.agent()
        answers: list[Any] = []
        hanging = Deferred.fromCoroutine(_first_of(self.post(agent), self.post(agent), answers))
        while not answers:
            yield deferLater(reactor, 0.01, lambda: None)
        yield read_body(answers[0])
        self.assertEqual(agent.connection_count, 2)
        yield agent.close()
        yield self.assertFailure(hanging, ResponseNeverReceived)
        self.assertEqual(agent.connection_count, 0)
        for connection in server.connections:
            yield connection.closed
        yield self.assertFailure(self.post(agent), RuntimeError)


    @inlineCallbacks
    def test_closed_while_connecting(self):
        """
        A connection that completes after L{UpstreamAgent.close} is dropped
        and its request fails: nothing outlives the agent.
        """
        server = yield self.serve(ok(b"a"))
        agent = self.agent()
        d = self.post(agent)
        yield agent.close()
        yield self.assertFailure(d, RuntimeError)
        for connection in server.connections:
            yield connection.closed
        self.assertEqual(server.requests, [])
        self.assertEqual(agent.connection_count, 0)


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
        agent = self.agent()
        response = yield self.post(agent)
        got: list[bytes] = []
        ended: Deferred[Any] = Deferred()

        class Body(Protocol):
            def dataReceived(self, data: bytes) -> None:
                got.append(data)

            def connectionLost(self, reason: Any) -> None:
                ended.callback([reason])

        response.deliverBody(Body())
        while not got:
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(got, [b"hello"])
        first[0].transport.write(b"6\r\n world\r\n0\r\n\r\n")
        (reason,) = yield ended
        self.assertTrue(reason.check(ResponseDone))
        self.assertEqual(got, [b"hello", b" world"])
        self.assertEqual((yield read_body((yield self.post(agent)))), b"again")
        self.assertEqual(len(server.connections), 1)

    @inlineCallbacks
    def test_body_delimited_by_close(self):
        """
        No length and no chunking: the body is what arrives before the
        server closes, and it ends with PotentialDataLoss (as Agent does).
        """

        def answer(server: ScriptedServer) -> None:
            server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
            server.transport.loseConnection()

        yield self.serve(answer)
        response = yield self.post(self.agent())
        self.assertEqual((yield read_body(response)), b"all of it")
        # Twisted's readBody (as with Agent) says the end is uncertain.
        yield self.serve(answer)
        response = yield self.post(self.agent())
        yield self.assertFailure(readBody(response), PartialDownloadError)

    @inlineCallbacks
    def test_response_interface(self):
        yield self.serve(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nX-Thing: a\r\nX-Thing: b\r\n\r\nno")
        response = yield self.post(self.agent())
        self.assertEqual((response.code, response.phrase, response.version), (404, b"Not Found", (b"HTTP", 1, 1)))
        self.assertEqual(response.headers.getRawHeaders(b"x-thing"), [b"a", b"b"])
        self.assertEqual(response.length, 2)
        self.assertEqual((yield read_body(response)), b"no")

    @inlineCallbacks
    def test_informational_answer_skipped(self):
        yield self.serve(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + ok(b"final"))
        response = yield self.post(self.agent())
        self.assertEqual(response.code, 200)
        self.assertEqual((yield read_body(response)), b"final")

    @inlineCallbacks
    def test_body_read_later(self):
        """
        A body that arrived with the headers waits for L{deliverBody}.
        """
        yield self.serve(ok(b"kept"))
        response = yield self.post(self.agent())
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((yield read_body(response)), b"kept")


class FailureTests(AgentTestCase):
    @inlineCallbacks
    def test_closed_before_answering(self):
        yield self.serve(lambda server: server.transport.loseConnection())
        failure = yield self.assertFailure(self.post(self.agent()), ResponseNeverReceived)
        self.assertTrue(failure.reasons[0].check(ConnectionDone))

    @inlineCallbacks
    def test_cut_mid_headers(self):
        def answer(server: ScriptedServer) -> None:
            server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Le")
            server.transport.loseConnection()

        yield self.serve(answer)
        yield self.assertFailure(self.post(self.agent()), ResponseFailed)

    @inlineCallbacks
    def test_not_http(self):
        yield self.serve(b"SSH-2.0-OpenSSH_9.6\r\n")
        failure = yield self.assertFailure(self.post(self.agent()), ResponseNeverReceived, ResponseFailed)
        self.assertIn("HttpParser", type(failure.reasons[0].value).__name__)

    @inlineCallbacks
    def test_oversized_headers(self):
        yield self.serve(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"x" * 70000 + b"\r\n\r\n")
        failure = yield self.assertFailure(self.post(self.agent()), ResponseFailed)
        self.assertIn("exceed", str(failure.reasons[0].value.__context__ or failure.reasons[0].value))

    @inlineCallbacks
    def test_unsolicited_bytes_drop_the_connection(self):
        """
        Bytes nobody asked for (a second answer to one request) mean the
        connection cannot be trusted: it is dropped, not pooled.
        """
        server = yield self.serve(ok(b"one") + ok(b"extra"), ok(b"two"))
        agent = self.agent()
        self.assertEqual((yield read_body((yield self.post(agent)))), b"one")
        yield server.connections[0].closed
        self.assertEqual((yield read_body((yield self.post(agent)))), b"two")
        self.assertEqual(len(server.connections), 2)

    @inlineCallbacks
    def test_cancel_before_headers(self):
        server = yield self.serve(None)
        d = self.post(self.agent())
        while not server.requests:
            yield deferLater(reactor, 0.01, lambda: None)
        d.cancel()
        yield self.assertFailure(d, CancelledError)
        yield server.connections[0].closed

    def test_refused(self):
        agent = self.agent()
        d = agent.request(b"GET", b"http://127.0.0.1:%d/" % free_port(), None, None)
        return self.assertFailure(d, ConnectionRefusedError)


class BodyReadingTests(AgentTestCase):
    """
    A body read whole (L{read_body}, which the agent's responses serve
    without a body protocol) and one delivered to a protocol (Twisted's
    C{readBody}, through C{deliverBody}) give the same results.
    """

    readers = {"read_body": read_body, "deliverBody": readBody}

    @inlineCallbacks
    def test_body_before_and_after_the_reader(self):
        for name, reader in self.readers.items():
            for later in (False, True):
                yield self.serve(ok(b"the body " + name.encode()))
                response = yield self.post(self.agent())
                if later:
                    # Headers and body are both in before anyone reads.
                    yield deferLater(reactor, 0.05, lambda: None)
                self.assertEqual((yield reader(response)), b"the body " + name.encode(), (name, later))

    @inlineCallbacks
    def test_body_in_pieces(self):
        def answer(server: ScriptedServer) -> None:
            server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
            reactor.callLater(0.02, server.transport.write, b"56789")

        for name, reader in self.readers.items():
            yield self.serve(answer)
            response = yield self.post(self.agent())
            self.assertEqual((yield reader(response)), b"0123456789", name)

    @inlineCallbacks
    def test_cut_mid_body(self):
        def answer(server: ScriptedServer) -> None:
            server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
            server.transport.loseConnection()

        for name, reader in self.readers.items():
            yield self.serve(answer)
            response = yield self.post(self.agent())
            failure = yield self.assertFailure(reader(response), ResponseFailed)
            self.assertTrue(failure.reasons[0].check(ConnectionDone), name)

    @inlineCallbacks
    def test_cancel_drops_the_connection(self):
        """
        Cancelling a read (for a body protocol, its transport's
        C{stopProducing}, which Twisted's C{readBody} calls through
        C{abortConnection}) drops the connection.
        """
        for name, reader in self.readers.items():
            server = yield self.serve(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome")
            response = yield self.post(self.agent())
            reading = reader(response)
            reading.cancel()
            yield self.assertFailure(reading, CancelledError)
            yield server.connections[0].closed

    @inlineCallbacks
    def test_body_over_the_limit(self):
        """
        A body past the reader's limit fails with L{BodyTooLarge} and its
        connection is dropped, whether the excess was in before the read or
        arrives during it.
        """
        for later in (False, True):
            server = yield self.serve(ok(b"x" * 100))
            agent = self.agent()
            response = yield self.post(agent)
            if later:
                yield deferLater(reactor, 0.05, lambda: None)
                # Read to its end already: the connection went back to the
                # pool, and the reader refuses the body all the same.
                yield self.assertFailure(read_body(response, limit=10), BodyTooLarge)
                self.assertEqual(agent.connection_count, 1)
            else:
                yield self.assertFailure(read_body(response, limit=10), BodyTooLarge)
                yield server.connections[0].closed

    @inlineCallbacks
    def test_body_delivered_once(self):
        yield self.serve(ok(b"once"))
        response = yield self.post(self.agent())
        self.assertEqual((yield read_body(response)), b"once")
        self.assertRaises(RuntimeError, read_body, response)
        self.assertRaises(RuntimeError, response.deliverBody, Protocol())


async def _first_of(one: Deferred[Any], other: Deferred[Any], answered: list[Any]) -> Any:
    """
    Put the response of whichever request is answered first in
    C{answered}; the outcome of the other one.
    """
    pending = {id(one): one, id(other): other}

    def got(response: Any, d: Deferred[Any]) -> None:
        pending.pop(id(d))
        answered.append(response)

    one.addCallback(got, one)
    other.addCallback(got, other)
    while not answered:
        await deferLater(reactor, 0.01, lambda: None)
    (left,) = pending.values()
    return await left


async def _gather(deferreds: list[Deferred[Any]]) -> list[Any]:
    return [await d for d in deferreds]

