"""
Large whole answers on slow HTTP/1.1 clients, over real sockets: an answer
goes out part by part as the client takes it, so the next request's head
deadline (C{API_HEADER_TIMEOUT_SECONDS}) starts only once it was all
handed over and does not cut it; a client that stops reading mid-answer is
let go after C{API_SEND_TIMEOUT_SECONDS}, and one a stop cuts is counted
503 shutting_down.  A refusal stuck behind pipelined answers the client
does not read is counted once (no 408 at its body deadline after it).  A
client that pipelines small requests and reads none of the answers is
read no more once the send buffer is full, and let go after
C{API_SEND_TIMEOUT_SECONDS}.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource

from openclaw.dataplane.answer import CLIENT_GONE, SEND_TIMEOUT, SHUTTING_DOWN, WholeAnswer, send_whole
from openclaw.dataplane.site import APILimits, APIRequest, APISite
from openclaw.settings import Settings
from tests.support import RunningGateway, capture_log_events, exchange, start_gateway, start_upstream
from tests.test_api_exhaustion import high_levels, raw

KEY = "gw-key-0123456789abcdef"
KIMI_KEY = "sk-kimi-SECRET-0123456789abcdef"
GEMINI_KEY = "AIza-gemini-SECRET-0123456789abcdef"
#: A reply of 4 MB: a chat answer far over one transport buffer (64 KB).
LARGE_REPLY = ("0123456789abcde " * 256 * 1024).rstrip()
#: The client's receive buffer: small, so that the kernel holds little of
#: the answer on the client's side.
RECEIVE_BUFFER = 16 * 1024
#: The gateway's send buffer for a connection, when a test sets it.
SEND_BUFFER = 32 * 1024


def post(port: int, path: str, document: Any, key: str = KEY) -> bytes:
    """
    A raw HTTP/1.1 POST of C{document} as JSON.
    """
    body = json.dumps(document).encode()
    return (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (path.encode(), port, key.encode(), len(body), body)
    )


def chat_request(port: int) -> bytes:
    return post(
        port, "/v1/chat/completions", {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "hi"}]}
    )


def embeddings_request(port: int) -> bytes:
    """
    64 texts of 3072 dimensions each (the most the stand-in gives, as the
    providers' largest models): an answer of about 1.2 MB.
    """
    return post(port, "/v1/embeddings", {"input": [f"text {i}" for i in range(64)], "dimensions": 3072})


def content_length(head: bytes) -> int:
    return int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])


@attrs.define
class SlowReader:
    """
    A client on a connection with a small receive buffer that reads an
    answer C{part} bytes at a time at about C{rate} bytes a second (in a
    thread: L{read}), until its C{Content-Length} is in or the server
    closes; after C{stop_after} bytes of body it stops reading until
    L{resume} is set.
    """

    port: int
    request: bytes
    rate: float
    part: int = 8192
    stop_after: int | None = None
    resume: threading.Event = attrs.field(factory=threading.Event)
    #: The answer's head, once in.
    head: bytes = b""
    #: Bytes of the body received so far.
    received: int = 0
    #: The server reset the connection.
    reset: bool = False
    #: Once resumed, close the connection rather than read on.
    leave: bool = False

    def read(self) -> bytes:
        """
        The body read (the head is L{head}).
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.settimeout(30)
        try:
            sock.connect(("127.0.0.1", self.port))
            sock.sendall(self.request)
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = sock.recv(self.part)
                if not chunk:
                    return b""
                received += chunk
            self.head, _, body = received.partition(b"\r\n\r\n")
            length = content_length(self.head)
            self.received = len(body)
            while len(body) < length:
                if self.stop_after is not None and len(body) >= self.stop_after:
                    self.stop_after = None
                    self.resume.wait(30)
                    if self.leave:
                        break
                time.sleep(self.part / self.rate)
                try:
                    chunk = sock.recv(self.part)
                except ConnectionResetError:
                    self.reset = True
                    break
                if not chunk:
                    break
                body += chunk
                self.received = len(body)
            return body
        finally:
            sock.close()


class GatewayCase(TestCase):
    """
    A gateway on the stand-in providers, its log captured.
    """

    timeout = 60

    def setUp(self) -> None:
        self.upstream = start_upstream(self, KIMI_KEY, GEMINI_KEY)
        self.events = capture_log_events(self)

    def gateway(self, **settings: Any) -> RunningGateway:
        gateway = start_gateway(
            self,
            api=True,
            providers=self.upstream.provider_settings(),
            gateway_api_keys=(KEY,),
            default_provider="kimi",
            # Successes are logged too (at debug), to be checked.
            log_level="debug",
            **settings,
        )
        self.addCleanup(gateway.service.api_site.close_connections)
        return gateway

    def read_slowly(self, reader: SlowReader) -> Deferred[bytes]:
        # Let the reader go on if the test fails before it resumes it.
        self.addCleanup(reader.resume.set)
        return deferToThread(reader.read)

    @inlineCallbacks
    def wait_for(self, condition: Callable[[], bool], what: str, seconds: float = 20.0) -> Any:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"waited {seconds:g} s for {what}")
            yield deferLater(reactor, 0.02, lambda: None)

    @inlineCallbacks
    def slow_link(self, site: APISite) -> Any:
        """
        Once the client has connected (the provider told to answer after a
        delay), give the gateway's end a send buffer the kernel does not
        grow to megabytes, as it does on loopback (and over a slow link it
        would not): such a buffer takes in most of an answer however the
        gateway writes it.
        """
        yield self.wait_for(lambda: len(site.connections) == 1, "the connection")
        for connection in site.connections:
            connection.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)

    @inlineCallbacks
    def reader_that_stops(self, gateway: RunningGateway) -> Any:
        """
        A client of C{gateway} on a slow link that takes the head of a
        large embeddings answer and stops reading: the site, the
        L{SlowReader} and the Deferred of its read.
        """
        assert gateway.api_port is not None
        site = gateway.service.api_site
        self.upstream.gemini.delay = 1.0
        reader = SlowReader(gateway.api_port, embeddings_request(gateway.api_port), 4 * 1024 * 1024, stop_after=1)
        reading = self.read_slowly(reader)
        yield self.slow_link(site)
        yield self.wait_for(lambda: reader.head != b"", "the answer's head")
        self.assertTrue(reader.head.startswith(b"HTTP/1.1 200 "), reader.head[:200])
        return site, reader, reading

    def completed(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("route") == "kimi/moonshot-v1-8k" or e.get("path") == "/v1/embeddings"]


class SlowReaderTests(GatewayCase):
    @inlineCallbacks
    def test_large_answer_to_slow_reader_arrives_whole(self):
        """
        A 4 MB answer read at about 1 MB/s takes over 3 seconds, longer
        than the next request's head deadline (1 s here) and the polite
        close after it (2 s): it arrives whole all the same, as that
        deadline starts only once the last part was handed over.
        """
        self.upstream.kimi.reply = LARGE_REPLY
        self.upstream.kimi.delay = 1.0
        gateway = self.gateway(api_header_timeout_seconds=1.0)
        assert gateway.api_port is not None
        site = gateway.service.api_site
        reader = SlowReader(gateway.api_port, chat_request(gateway.api_port), 1024 * 1024)
        reading = self.read_slowly(reader)
        yield self.slow_link(site)
        yield self.wait_for(lambda: reader.received > 0, "the answer's first part")
        # The call is in flight (a stop waits for it) while its answer goes out.
        self.assertEqual(site.context.in_flight, 1)
        body = yield reading
        self.assertTrue(reader.head.startswith(b"HTTP/1.1 200 "), reader.head[:200])
        length = content_length(reader.head)
        self.assertGreater(length, 4 * 1024 * 1024)
        self.assertEqual(len(body), length)
        self.assertEqual(json.loads(body)["choices"][0]["message"]["content"], LARGE_REPLY)
        yield self.wait_for(lambda: bool(self.completed()), "the call to be counted")
        self.assertEqual([(e["status"], e["outcome"]) for e in self.completed()], [(200, None)])

    @inlineCallbacks
    def test_reader_that_stops_is_let_go(self):
        """
        A client that stops reading mid-answer has its connection aborted
        once a part has waited API_SEND_TIMEOUT_SECONDS to be taken (the
        head deadline does not run while an answer is sent), and the call
        is logged with outcome send_timeout; the gateway serves others
        meanwhile and after.
        """
        gateway = self.gateway(api_send_timeout_seconds=1.0, api_header_timeout_seconds=30.0)
        site, reader, reading = yield self.reader_that_stops(gateway)
        # Another client is served while this one holds its answer.
        answer = yield deferToThread(
            raw, gateway.api_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:100])
        yield self.wait_for(lambda: bool(self.completed()), "the send deadline")
        self.assertEqual([(e["status"], e["outcome"]) for e in self.completed()], [(408, "send_timeout")])
        yield self.wait_for(lambda: len(site.connections) == 0, "the connection to close")
        self.assertEqual(site.context.in_flight, 0)
        reader.resume.set()
        body = yield reading
        self.assertLess(len(body), content_length(reader.head))
        self.assertTrue(reader.reset)
        answer = yield deferToThread(
            raw, gateway.api_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:100])

    @inlineCallbacks
    def test_stop_lets_large_answer_out(self):
        """
        A stop waits for the calls in flight, then closes the connections
        (politely, aborting them CLOSE_DEADLINE_SECONDS later): a large
        answer still going out to a slow client counts as in flight until
        it was all handed over, so the client gets it whole.
        """
        gateway = self.gateway(api_header_timeout_seconds=30.0)
        assert gateway.api_port is not None
        site = gateway.service.api_site
        self.upstream.gemini.delay = 1.0
        reader = SlowReader(gateway.api_port, embeddings_request(gateway.api_port), 1024 * 1024)
        reading = self.read_slowly(reader)
        yield self.slow_link(site)
        yield self.wait_for(lambda: reader.received > 0, "the answer's first part")
        self.assertEqual(site.context.in_flight, 1)
        yield gateway.service.stopService()
        body = yield reading
        self.assertTrue(reader.head.startswith(b"HTTP/1.1 200 "), reader.head[:200])
        self.assertEqual(len(body), content_length(reader.head))
        self.assertEqual(len(json.loads(body)["data"]), 64)
        self.assertEqual([(e["status"], e["outcome"]) for e in self.completed()], [(200, None)])

    @inlineCallbacks
    def test_answer_a_stop_cuts_is_counted_shutting_down(self):
        """
        A client that stops reading a large answer holds it past a stop's
        grace period (0.5 s here) and the polite close after it
        (CLOSE_DEADLINE_SECONDS): the connection is aborted then, and the
        call is counted as the stop's, 503 shutting_down, not 499 client
        gone.
        """
        gateway = self.gateway(shutdown_grace_seconds=0.5, api_header_timeout_seconds=30.0)
        site, reader, reading = yield self.reader_that_stops(gateway)
        yield gateway.service.stopService()
        yield self.wait_for(lambda: bool(self.completed()), "the call to be counted")
        self.assertEqual([(e["status"], e["outcome"]) for e in self.completed()], [(503, "shutting_down")])
        self.assertEqual(len(site.connections), 0)
        reader.resume.set()
        body = yield reading
        self.assertLess(len(body), content_length(reader.head))

    @inlineCallbacks
    def test_client_leaving_mid_answer_is_counted(self):
        """
        A client that leaves while a large answer goes out: the call is
        counted out, 499 client gone (as a stream's), and nothing raises.
        """
        self.upstream.kimi.reply = LARGE_REPLY
        self.upstream.kimi.delay = 1.0
        gateway = self.gateway()
        assert gateway.api_port is not None
        site = gateway.service.api_site
        reader = SlowReader(gateway.api_port, chat_request(gateway.api_port), 1024 * 1024, stop_after=1)
        reading = self.read_slowly(reader)
        yield self.slow_link(site)
        yield self.wait_for(lambda: reader.received > 0, "the answer's first part")
        # Closed with unread bytes: the gateway sees a reset.
        reader.leave = True
        reader.resume.set()
        yield reading
        yield self.wait_for(lambda: bool(self.completed()), "the call to be counted")
        self.assertEqual([(e["status"], e["outcome"]) for e in self.completed()], [(499, "client gone")])
        self.assertEqual(site.context.in_flight, 0)
        self.assertEqual(high_levels(self.events), [])


def stream_request(port: int) -> bytes:
    return post(
        port,
        "/v1/chat/completions",
        {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )


@attrs.define
class StreamReader:
    """
    A client on a connection with a small receive buffer that takes a
    stream's head, then reads nothing until L{resume} is set (or for
    C{pause} seconds), then reads on until the server closes (in a thread:
    L{read}).
    """

    port: int
    pause: float = 30.0
    resume: threading.Event = attrs.field(factory=threading.Event)
    #: The answer's head, once in.
    head: bytes = b""
    #: The server reset the connection.
    reset: bool = False

    def read(self) -> bytes:
        """
        The body read (chunked; the head is L{head}).
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.settimeout(30)
        try:
            sock.connect(("127.0.0.1", self.port))
            sock.sendall(stream_request(self.port))
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = sock.recv(1024)
                if not chunk:
                    return b""
                received += chunk
            self.head, _, body = received.partition(b"\r\n\r\n")
            self.resume.wait(self.pause)
            parts = [body]
            while True:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    self.reset = True
                    break
                if not chunk:
                    break
                parts.append(chunk)
                # The last chunk (the connection is kept open after it).
                if b"".join(parts[-2:]).endswith(b"\r\n0\r\n\r\n"):
                    break
            return b"".join(parts)
        finally:
            sock.close()


class StreamSendDeadlineTests(GatewayCase):
    """
    A stream whose client stops reading: the client's connection holds it
    back (the upstream read paused with it), and the client, not the
    provider, has a deadline to take more: C{API_SEND_TIMEOUT_SECONDS}, not
    UPSTREAM_TIMEOUT.
    """

    def setUp(self) -> None:
        super().setUp()
        # About 2 MB of events, all sent at once: far more than the
        # buffers between the gateway and the client hold.
        self.upstream.kimi.reply = " ".join(["word"] * 10_000)
        # Time to shrink the gateway's send buffer (slow_link) first.
        self.upstream.kimi.delay = 0.3

    @inlineCallbacks
    def test_client_that_stops_reading_is_a_send_timeout(self):
        """
        A client that takes a stream's head and then nothing: once it has
        held the stream back for API_SEND_TIMEOUT_SECONDS (0.5 s here) its
        connection is aborted, the upstream one dropped, and the call
        counted and logged 408 send_timeout; the provider is not blamed
        (no 504 upstream_timeout after UPSTREAM_TIMEOUT, 2 s here; its
        breaker, which one failure would open, stays closed).
        """
        # Then a comment every 0.1 s, for ever: the stream never ends.
        self.upstream.kimi.mode = "trickle"
        self.upstream.kimi.cut_after = 8_000
        gateway = self.gateway(
            api_send_timeout_seconds=0.5,
            upstream_timeout=2.0,
            breaker_failures=1,
            fallback="off",
            api_header_timeout_seconds=30.0,
        )
        assert gateway.api_port is not None
        site = gateway.service.api_site
        reader = StreamReader(gateway.api_port)
        self.addCleanup(reader.resume.set)
        reading = deferToThread(reader.read)
        yield self.slow_link(site)
        yield self.wait_for(lambda: bool(self.completed()), "the call to be counted")
        self.assertEqual([(e["status"], e["outcome"]) for e in self.completed()], [(408, "send_timeout")])
        self.assertTrue(reader.head.startswith(b"HTTP/1.1 200 "), reader.head[:200])
        yield self.wait_for(lambda: self.upstream.kimi.streams_lost == 1, "the upstream connection to drop")
        yield self.wait_for(lambda: len(site.connections) == 0, "the client's connection to close")
        self.assertEqual(site.context.in_flight, 0)
        self.assertEqual(gateway.service.providers.get("kimi").breaker.state, "closed")
        reader.resume.set()
        body = yield reading
        self.assertNotIn(b"upstream_timeout", body)
        self.assertEqual(high_levels(self.events), [])

    @inlineCallbacks
    def held_back_stream(self) -> Any:
        """
        A stream whose client holds it back 4 s (past UPSTREAM_TIMEOUT, 2 s
        here: a busy host's stand-in may take over 1 s to answer the
        headers; within API_SEND_TIMEOUT_SECONDS, 10 s) and then reads on
        over a slow link; fire with the reader and the body it got.
        """
        gateway = self.gateway(
            api_send_timeout_seconds=10.0, upstream_timeout=2.0, fallback="off", api_header_timeout_seconds=30.0
        )
        assert gateway.api_port is not None
        reader = StreamReader(gateway.api_port, pause=4.0)
        self.addCleanup(reader.resume.set)
        reading = deferToThread(reader.read)
        yield self.slow_link(gateway.service.api_site)
        return reader, dechunked((yield reading))

    @inlineCallbacks
    def test_client_that_resumes_gets_the_whole_stream(self):
        """
        A client that holds a stream back longer than UPSTREAM_TIMEOUT
        (2 s here), but within API_SEND_TIMEOUT_SECONDS, then reads on,
        gets the whole stream: the provider was not waited on meanwhile.
        """
        reader, body = yield self.held_back_stream()
        self.assertTrue(reader.head.startswith(b"HTTP/1.1 200 "), reader.head[:200])
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"), body[-300:])
        self.assertEqual(body.count(b'word"'), 10_000)
        yield self.wait_for(lambda: bool(self.completed()), "the call to be counted")
        self.assertEqual([(e["status"], e["outcome"]) for e in self.completed()], [(200, None)])

    @inlineCallbacks
    def test_provider_limit_runs_again_once_resumed(self):
        """
        Once the client reads on, the provider's time limit runs again: a
        stream that then brings no whole event within UPSTREAM_TIMEOUT (2 s
        here; only comments) ends with the upstream_timeout error event,
        after every event that came before it.
        """
        self.upstream.kimi.mode = "trickle"
        self.upstream.kimi.cut_after = 8_000
        reader, body = yield self.held_back_stream()
        self.assertGreater(body.count(b'word"'), 7_900)
        self.assertIn(b"upstream_timeout", body.rsplit(b"data: ", 1)[1])
        yield self.wait_for(lambda: bool(self.completed()), "the call to be counted")
        self.assertEqual([(e["status"], e["outcome"]) for e in self.completed()], [(504, "upstream_timeout")])


def dechunked(body: bytes) -> bytes:
    """
    A chunked HTTP/1.1 body's data.
    """
    parts = []
    while body:
        size, _, body = body.partition(b"\r\n")
        length = int(size, 16)
        parts.append(body[:length])
        body = body[length + 2 :]
    return b"".join(parts)


class SendWholeTests(TestCase):
    """
    L{send_whole} on an L{APISite} on a real port: a small answer is
    written and finished at once (the plain path, no producer); a large one
    goes out part by part, finished once its last part was handed over.
    """

    timeout = 20

    def setUp(self) -> None:
        #: Per request: the size asked for, what send_whole returned, and
        #: whether the request was finished when it returned.
        self.sent: list[tuple[int, Deferred[str | None] | None, bool]] = []
        #: The send buffer each connection is given before its answer, if any.
        self.send_buffer: int | None = None
        test = self

        class Answering(APIRequest):
            def process(self) -> None:
                size = int(self.uri.strip(b"/"))
                if test.send_buffer is not None:
                    handle = self.channel.transport.getHandle()  # type: ignore[union-attr]
                    handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, test.send_buffer)
                self.setHeader(b"Content-Length", b"%d" % size)
                sent = send_whole(self, b"%d" % (size % 10) * size)
                test.sent.append((size, sent, bool(self.finished)))

        self.site = APISite(Resource(), APILimits.from_settings(Settings()), context=None)
        self.site.requestFactory = Answering
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.addCleanup(self.site.close_connections)

    @inlineCallbacks
    def test_small_and_large(self):
        small, large = WholeAnswer.bufferSize, 3 * WholeAnswer.bufferSize + 1
        request = b"GET /%d HTTP/1.1\r\nHost: gw\r\n\r\n"
        answer = yield deferToThread(
            exchange,
            self.port.getHost().port,
            request % small + request % large + b"GET /1 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        )
        bodies = [part.split(b"\r\n\r\n", 1)[1] for part in answer.split(b"HTTP/1.1 200 OK\r\n")[1:]]
        self.assertEqual(
            [(len(body), set(body)) for body in bodies],
            [(size, {ord(str(size % 10))}) for size in (small, large, 1)],
        )
        self.assertEqual(
            [(size, finished) for size, _, finished in self.sent], [(small, True), (large, False), (1, True)]
        )
        self.assertIsNone(self.sent[0][1])
        done = self.sent[1][1]
        assert done is not None
        self.assertIsNone(self.successResultOf(done))

    @inlineCallbacks
    def test_last_part_sent_before_the_next_deadline(self):
        """
        A large answer is finished (and the next request's head deadline
        started) only once the transport has sent all it held of it: a
        slow but steady reader gets its tail, though the deadline (0.05 s
        here) and the polite close after it (2 s) are shorter than the time
        the last buffer takes to go out at its pace (24 KB/s).  (Two buffers
        exactly: written in buffer-sized parts after the head, the last one
        would not fill the transport's buffer, and the answer would be
        finished with it still held.)
        """
        # No key on this site's requests: not to be cut as a keyless one.
        self.site.limits = attrs.evolve(self.site.limits, header_timeout=0.05, keyless_timeout=60.0)
        # The kernel holds little: what is left of the answer is the
        # transport's.
        self.send_buffer = 4096
        size = 2 * WholeAnswer.bufferSize
        reader = SlowReader(self.port.getHost().port, b"GET /%d HTTP/1.1\r\nHost: gw\r\n\r\n" % size, 24 * 1024)
        reading = deferToThread(reader.read)
        body = yield reading
        self.assertFalse(reader.reset)
        self.assertEqual(len(body), size)

    @inlineCallbacks
    def test_stop_closes_in_order_once_an_answer_is_handed_over(self):
        """
        A stop closes a connection with a large answer going out only once
        the answer was all handed over, and then in order: the kernel
        delivers the rest to a reader still taking it after the site's
        CLOSE_DEADLINE_SECONDS (2 s).  Closed while its producer was paused,
        the transport would have resumed it instead of closing, waited for
        a write that never came, and been aborted (a reset) at that
        deadline, the answer's tail lost.
        """
        self.site.limits = attrs.evolve(self.site.limits, keyless_timeout=60.0)
        size = 3_000_000
        reader = SlowReader(self.port.getHost().port, b"GET /%d HTTP/1.1\r\nHost: gw\r\n\r\n" % size, 1_000_000)
        reading = deferToThread(reader.read)
        for _ in range(500):
            if self.sent:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        yield deferLater(reactor, 0.3, lambda: None)
        yield self.site.close_connections()
        body = yield reading
        self.assertFalse(reader.reset)
        self.assertEqual(len(body), size)


def pipeline_unread(port: int, data: bytes, done: threading.Event) -> None:
    """
    Send C{data} on a connection with a small receive buffer, and read
    nothing of the answers until C{done} is set (or 30 s pass).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    try:
        sock.connect(("127.0.0.1", port))
        sock.sendall(data)
        done.wait(30)
    finally:
        sock.close()


class _Sized(Resource):
    """
    Answers C{GET /<size>} with C{size} bytes, written whole (not over one
    transport buffer: no L{WholeAnswer}), on a connection whose send buffer
    is small.
    """

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        handle = request.channel.transport.getHandle()
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return b"x" * int(request.path.strip(b"/"))


class RefusalBehindAnswersTests(TestCase):
    """
    A refusal written behind pipelined answers the client does not read,
    on an L{APISite} with a real gateway's L{APIContext} (its refusals
    counted and logged).
    """

    timeout = 30

    def setUp(self) -> None:
        self.events = capture_log_events(self)
        gateway = start_gateway(self, api=True, gateway_api_keys=(KEY,))
        self.addCleanup(gateway.service.api_site.close_connections)
        # Not to be cut as a keyless connection meanwhile.
        limits = APILimits.from_settings(Settings(api_body_timeout_seconds=1.0, api_keyless_timeout_seconds=60.0))
        self.site = APISite(_Sized(), limits, gateway.service.api_site.context, reactor=reactor)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.addCleanup(self.site.close_connections)

    @inlineCallbacks
    def test_refusal_not_flushed_is_not_also_a_408(self):
        """
        A POST with a body and no key behind 4 pipelined GETs whose 64 KB
        answers the client does not read: its 401 cannot go out before its
        body deadline (1 s here), which does not run once it is refused:
        the request is counted and logged once, 401, and no 408 follows
        (the connection is aborted CLOSE_DEADLINE_SECONDS after the 401).
        """
        port = self.port.getHost().port
        data = b"GET /65536 HTTP/1.1\r\nHost: gw\r\n\r\n" * 4 + (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2\r\n\r\n{}"
        )
        done = threading.Event()
        self.addCleanup(done.set)
        sending = deferToThread(pipeline_unread, port, data, done)
        yield self.wait_for(lambda: bool(self.refusals()), "the 401")
        # Past the body deadline, until the connection is closed.
        yield deferLater(reactor, 1.5, lambda: None)
        yield self.wait_for(lambda: len(self.site.connections) == 0, "the close")
        done.set()
        yield sending
        self.assertEqual(
            [(e["method"], e["path"], e["status"], e["outcome"]) for e in self.refusals()],
            [("-", "-", 401, "invalid_api_key")],
        )

    wait_for = SlowReaderTests.wait_for

    def refusals(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_namespace") == "openclaw.dataplane" and "status" in e]


#: A small pipelined request, and its answer's body.
SMALL_REQUEST = b"GET /10 HTTP/1.1\r\nHost: gw\r\n\r\n"


class _Counted(Resource):
    """
    Answers every request with 10 bytes, on a connection whose send
    buffer is small, and counts the answers.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answered = 0

    def render_GET(self, request: Any) -> bytes:
        if not self.answered:
            handle = request.channel.transport.getHandle()
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.answered += 1
        return b"x" * 10


def pipeline_without_reading(port: int, seconds: float) -> tuple[int, bool]:
    """
    Pipeline L{SMALL_REQUEST}s on one connection for C{seconds}, reading
    none of the answers: the bytes sent, and whether the server closed
    the connection meanwhile.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = SMALL_REQUEST * 8192
    sent = 0
    try:
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                sent += sock.send(data[sent % len(SMALL_REQUEST) :])
            except BlockingIOError:
                time.sleep(0.005)
            except OSError:
                return sent, True
        return sent, False
    finally:
        sock.close()


def pipeline_and_read(port: int, count: int) -> int:
    """
    Pipeline C{count} L{SMALL_REQUEST}s at once while reading the answers
    as they come: the answers read whole.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sending = threading.Thread(target=sock.sendall, args=(SMALL_REQUEST * count,))
        sending.start()
        answers, tail = 0, b""
        answer_end = b"\r\n\r\n" + b"x" * 10
        while answers < count:
            chunk = sock.recv(65536)
            if not chunk:
                break
            # An answer's end may straddle two reads.
            received = tail + chunk
            answers += received.count(answer_end)
            tail = received[-(len(answer_end) - 1) :]
        sending.join()
        return answers


class PipelineUnreadTests(TestCase):
    """
    A client that pipelines small requests and never reads the answers:
    the gateway stops reading once its send buffer is full (twisted.web's
    channel, paused while it answers a request, would read and answer on,
    its answers piling up in memory), and aborts the connection
    C{API_SEND_TIMEOUT_SECONDS} later.  A client that reads as it
    pipelines gets every answer.
    """

    timeout = 30

    def listen(self, send_timeout: float) -> None:
        self.events = capture_log_events(self)
        gateway = start_gateway(self, api=True, gateway_api_keys=(KEY,))
        self.addCleanup(gateway.service.api_site.close_connections)
        limits = APILimits.from_settings(
            Settings(api_send_timeout_seconds=send_timeout, api_keyless_timeout_seconds=60.0)
        )
        self.resource = _Counted()
        self.site = APISite(self.resource, limits, gateway.service.api_site.context, reactor=reactor)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.addCleanup(self.site.close_connections)

    @inlineCallbacks
    def test_reading_stops_and_the_connection_is_aborted(self):
        """
        What the gateway answers is bounded by what it read before its
        send buffer filled and one read more (64 KB: about 2000 of these
        requests), not by what the client sends; the client is cut off
        after the send deadline, and that is logged.
        """
        self.listen(send_timeout=0.5)
        started = time.monotonic()
        sent, closed = yield deferToThread(pipeline_without_reading, self.port.getHost().port, 5.0)
        self.assertTrue(closed)
        self.assertLess(time.monotonic() - started, 4.0)
        self.assertLess(self.resource.answered, 8000)
        yield self.wait_for(lambda: len(self.site.connections) == 0, "the abort")
        (aborted,) = [e for e in self.events if "had not taken all of" in e.get("log_format", "")]
        self.assertEqual(
            (aborted["peer"], aborted["setting"], aborted["seconds"]), ("127.0.0.1", "API_SEND_TIMEOUT_SECONDS", 0.5)
        )

    @inlineCallbacks
    def test_pipelining_reader_gets_every_answer(self):
        # A reader (a thread of this process) that a busy host holds up for
        # more than half a second is no slow reader.
        self.listen(send_timeout=10.0)
        answers = yield deferToThread(pipeline_and_read, self.port.getHost().port, 20000)
        self.assertEqual(answers, 20000)
        self.assertEqual(self.resource.answered, 20000)

    wait_for = SlowReaderTests.wait_for


def h2_unread_then_small(
    port: int, ca: bytes, size: int, small: int, leave: bool = False
) -> tuple[float, list[str], bytes]:
    """
    Over HTTP/2 on TLS: ask for C{size} bytes on stream 1 and keep that
    stream's window shut (its data acknowledged for the connection only),
    until the server resets it (or, with C{leave}, reset it at its first
    data); then ask for C{small} bytes on stream 3 of the same connection,
    read normally.  The seconds stream 1 took to end, the events of each
    stream as they came, and stream 3's body.
    """
    import h2.connection
    import h2.events

    context = ssl.create_default_context(cadata=ca.decode())
    context.set_alpn_protocols(["h2"])
    events: list[str] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw_socket:
        with context.wrap_socket(raw_socket, server_hostname="127.0.0.1") as sock:
            connection = h2.connection.H2Connection()
            connection.initiate_connection()

            def ask(stream: int, length: int) -> None:
                connection.send_headers(
                    stream,
                    [(":method", "GET"), (":path", f"/{length}"), (":scheme", "https"), (":authority", "127.0.0.1")],
                    end_stream=True,
                )
                sock.sendall(connection.data_to_send())

            def until(stream: int, ends: tuple[type, ...]) -> bytes:
                body = b""
                while chunk := sock.recv(65536):
                    for event in connection.receive_data(chunk):
                        if isinstance(event, h2.events.DataReceived):
                            if event.stream_id == stream == 3:
                                body += event.data
                                connection.acknowledge_received_data(event.flow_controlled_length, stream)
                            else:
                                # The connection's window only: stream 1's stays shut.
                                connection.increment_flow_control_window(event.flow_controlled_length)
                                if leave:
                                    connection.reset_stream(1)
                                    sock.sendall(connection.data_to_send())
                                    events.append("1 left")
                                    return body
                        if isinstance(event, (h2.events.StreamReset, h2.events.StreamEnded)):
                            events.append(f"{event.stream_id} {type(event).__name__}")
                            if event.stream_id == stream and isinstance(event, ends):
                                sock.sendall(connection.data_to_send())
                                return body
                    sock.sendall(connection.data_to_send())
                return body

            started = time.monotonic()
            ask(1, size)
            until(1, (h2.events.StreamReset, h2.events.StreamEnded))
            took = time.monotonic() - started
            ask(3, small)
            return took, events, until(3, (h2.events.StreamEnded, h2.events.StreamReset))


def h2_hold_until_closed(port: int, ca: bytes, size: int) -> tuple[bytes, bytes, bool]:
    """
    Over HTTP/2 on TLS: ask for C{size} bytes on stream 1, keep its window
    shut, ask for C{/late} on stream 3 (acknowledged as it comes), and read
    until the server closes the connection (or 10 s pass): the data of
    stream 1 and of stream 3 received, and whether stream 3 ended.
    """
    import h2.connection
    import h2.events

    context = ssl.create_default_context(cadata=ca.decode())
    context.set_alpn_protocols(["h2"])
    received, late, ended = b"", b"", False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw_socket:
        with context.wrap_socket(raw_socket, server_hostname="127.0.0.1") as sock:
            connection = h2.connection.H2Connection()
            connection.initiate_connection()
            for stream, path in ((1, f"/{size}"), (3, "/late")):
                connection.send_headers(
                    stream,
                    [(":method", "GET"), (":path", path), (":scheme", "https"), (":authority", "127.0.0.1")],
                    end_stream=True,
                )
            sock.sendall(connection.data_to_send())
            while chunk := sock.recv(65536):
                for event in connection.receive_data(chunk):
                    if isinstance(event, h2.events.DataReceived):
                        if event.stream_id == 3:
                            late += event.data
                            connection.acknowledge_received_data(event.flow_controlled_length, 3)
                        else:
                            received += event.data
                            # The connection's window only: stream 1's stays shut.
                            connection.increment_flow_control_window(event.flow_controlled_length)
                    elif isinstance(event, h2.events.StreamEnded) and event.stream_id == 3:
                        ended = True
                sock.sendall(connection.data_to_send())
    return received, late, ended


def tls_idle_until_closed(port: int, ca: bytes) -> float:
    """
    An HTTP/1.1 connection over TLS that answers one request and then idles:
    the seconds from its answer to the server's close (or 10 s).
    """
    context = ssl.create_default_context(cadata=ca.decode())
    context.set_alpn_protocols(["http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw_socket:
        with context.wrap_socket(raw_socket, server_hostname="127.0.0.1") as sock:
            sock.sendall(b"GET /1 HTTP/1.1\r\nHost: gw\r\n\r\n")
            sock.recv(65536)
            answered = time.monotonic()
            while sock.recv(65536):
                pass
            return time.monotonic() - answered


class Http2SendDeadlineTests(TestCase):
    """
    Over HTTP/2 a large answer is paced by its stream's flow-control
    window: a client that keeps it shut gets the stream reset after
    C{API_SEND_TIMEOUT_SECONDS}, the answer counted C{send_timeout}, and
    the connection's other streams go on.
    """

    timeout = 20

    def setUp(self) -> None:
        from twisted.internet.endpoints import serverFromString
        from twisted.web.http import H2_ENABLED

        from tests.test_listen import write_certificates

        if not H2_ENABLED:
            raise SkipTest("h2 is not installed")
        self.sent: list[Deferred[str | None] | None] = []
        test = self

        #: Requests for /late, answered by the test itself.
        self.late: list[APIRequest] = []

        class Answering(APIRequest):
            def process(self) -> None:
                if self.path == b"/late":
                    test.late.append(self)
                    return
                size = int(self.path.strip(b"/"))
                self.setHeader(b"Content-Length", b"%d" % size)
                test.sent.append(send_whole(self, b"x" * size))

        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        self.ca, keyfile, certfile = write_certificates(directory)
        limits = APILimits.from_settings(Settings(api_send_timeout_seconds=0.5))
        self.site = APISite(Resource(), limits, context=None)
        self.site.requestFactory = Answering
        endpoint = serverFromString(reactor, f"ssl:0:interface=127.0.0.1:privateKey={keyfile}:certKey={certfile}")
        return endpoint.listen(self.site).addCallback(self._listening)

    def _listening(self, port: Any) -> None:
        self.port = port
        self.addCleanup(port.stopListening)
        self.addCleanup(self.site.close_connections)

    @inlineCallbacks
    def test_shut_window_resets_the_stream_only(self):
        took, events, body = yield deferToThread(
            h2_unread_then_small, self.port.getHost().port, self.ca, 4 * WholeAnswer.bufferSize, 10
        )
        self.assertEqual(events, ["1 StreamReset", "3 StreamEnded"])
        self.assertGreaterEqual(took, 0.5)
        self.assertEqual(body, b"x" * 10)
        large, small = self.sent
        assert large is not None
        self.assertEqual(self.successResultOf(large), SEND_TIMEOUT)
        self.assertIsNone(small)
        # The reset stream's slot is let go (twisted.web tells its request
        # nothing of a reset the gateway sends), as the finished one's is.
        self.assertEqual((self.site.http2_streams, self.site.streams_per_address), (0, {}))

    @inlineCallbacks
    def test_client_leaving_ends_the_deadline(self):
        """
        A client that resets a stream its answer waits on: the answer is
        counted C{client gone}, and its deadline is gone with it (a timer
        left behind would fail the test: trial checks the reactor is clean).
        """
        took, events, body = yield deferToThread(
            h2_unread_then_small, self.port.getHost().port, self.ca, 4 * WholeAnswer.bufferSize, 10, True
        )
        self.assertEqual(events, ["1 left", "3 StreamEnded"])
        self.assertLess(took, 0.5)
        self.assertEqual(body, b"x" * 10)
        large, small = self.sent
        assert large is not None
        self.assertEqual(self.successResultOf(large), CLIENT_GONE)

    @inlineCallbacks
    def test_steady_reader_gets_it_all(self):
        """
        A client that opens the window as it reads gets the whole answer:
        each of its many pauses ends within the deadline.
        """
        from tests.test_listen import h2_request

        size = 40 * WholeAnswer.bufferSize
        agreed, status, body = yield deferToThread(h2_request, self.port.getHost().port, self.ca, "GET", f"/{size}")
        self.assertEqual((agreed, status, len(body)), ("h2", 200, size))
        (done,) = self.sent
        assert done is not None
        self.assertIsNone(self.successResultOf(done))

    @inlineCallbacks
    def test_stop_over_tls(self):
        """
        A stop closes an HTTP/1.1 connection over TLS at once and in order
        (a TLS transport closes only once twisted.web's channel, its
        producer, is gone: it waited for the abort after
        CLOSE_DEADLINE_SECONDS, 2 s).  An HTTP/2 connection is left to
        that abort: its answers finished by then (here one finished in the
        stop's own turn, as the stop's 503s are) go out whole, frame by
        frame; an answer the stop cuts is counted as the stop's (503
        C{shutting_down}), not as its client gone.
        """
        self.site.limits = attrs.evolve(self.site.limits, keyless_timeout=60.0, send_timeout=30.0)
        port = self.port.getHost().port
        holding = deferToThread(h2_hold_until_closed, port, self.ca, 4 * WholeAnswer.bufferSize)
        idling = deferToThread(tls_idle_until_closed, port, self.ca)
        for _ in range(500):
            if len(self.sent) == 2 and self.late:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        yield deferLater(reactor, 0.2, lambda: None)
        (late,) = self.late
        late.setHeader(b"Content-Length", b"5")
        late.write(b"hello")
        late.finish()
        started = time.monotonic()
        yield self.site.close_connections()
        self.assertLess(time.monotonic() - started, 3.0)
        received, answered, ended = yield holding
        self.assertLess(len(received), 4 * WholeAnswer.bufferSize)
        self.assertEqual((answered, ended), (b"hello", True))
        idle = yield idling
        self.assertLess(idle, 1.5)
        large = next(done for done in self.sent if done is not None)
        self.assertEqual(self.successResultOf(large), SHUTTING_DOWN)
