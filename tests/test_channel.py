"""
L{APIChannel} reads a plain request head in one pass; whatever the bytes,
it must see exactly what twisted.web's own L{HTTPChannel} sees: the same
requests (method, target, version, headers, body) and the same refusals.
Two parsers that disagree are how requests get smuggled, so every case,
and a few hundred generated ones, runs through both and is compared.

What it writes in a turn is sent at the turn's end, as one write, and
never out of order.
"""

from __future__ import annotations

import re
import socket
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http import HTTPChannel, Request
from twisted.web.resource import Resource
from twisted.web.server import Site

from openclaw.dataplane.channel import APIChannel
from openclaw.dataplane.site import APIRequest, APISite


class _Site:
    """
    What an L{APIChannel} tells its site: its connections, and the ones with
    answers to send at the end of the turn (here, when L{end_turn} says).
    """

    def __init__(self) -> None:
        self.channels: set[Any] = set()
        self.unsent: list[Any] = []

    def channel_closed(self, channel: Any) -> None:
        self.channels.discard(channel)

    def send_at_end_of_turn(self, channel: Any) -> None:
        self.unsent.append(channel)

    def end_turn(self) -> None:
        channels, self.unsent = self.unsent, []
        for channel in channels:
            channel.send_unsent()


def _recording_request(seen: list[tuple[Any, ...]]) -> type[Request]:
    class Recording(Request):
        def process(self) -> None:
            headers = sorted((name, tuple(values)) for name, values in self.requestHeaders.getAllRawHeaders())
            seen.append((self.method, self.uri, self.clientproto, headers, self.content.read()))
            self.setHeader(b"Content-Length", b"2")
            self.write(b"ok")
            self.finish()

    return Recording


def _feed(channel_type: type[HTTPChannel], segments: list[bytes]) -> tuple[Any, ...]:
    """
    Feed C{segments} to a new channel of C{channel_type}: what it parsed,
    what it wrote, and whether it hung up.
    """
    seen: list[tuple[Any, ...]] = []
    channel = channel_type()
    channel.requestFactory = _recording_request(seen)
    channel.timeOut = None
    channel.site = _Site()  # type: ignore[attr-defined]
    transport = StringTransport()
    channel.makeConnection(transport)
    for segment in segments:
        if transport.disconnecting:
            break
        channel.dataReceived(segment)
        if isinstance(channel, APIChannel):
            channel.site.end_turn()
    written = transport.value()
    # Status lines only: the Date header differs from one second to the next.
    status_lines = re.findall(rb"HTTP/1\.[01] \d{3} [^\r]*", written)
    return seen, status_lines, transport.disconnecting


def _one_pass_reads(segment: bytes) -> bool:
    """
    Whether L{APIChannel} read this head itself (twisted.web's per-header
    method never ran).
    """
    calls: list[bytes] = []

    class Watched(APIChannel):
        def headerReceived(self, line: bytes) -> bool:
            calls.append(line)
            return super().headerReceived(line)

    seen, _, _ = _feed(Watched, [segment])
    return bool(seen) and not calls


HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer k\r\n"
    b"Content-Type: application/json\r\nContent-Length: 7\r\n\r\n"
)

CASES: dict[str, list[bytes]] = {
    "post, head and body together": [HEAD + b'{"a":1}'],
    "post, body later": [HEAD, b'{"a":1}'],
    "post, body in pieces": [HEAD + b'{"a', b'":1}'],
    "head in pieces": [HEAD[:20], HEAD[20:] + b'{"a":1}'],
    "get": [b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"],
    "no headers": [b"GET / HTTP/1.1\r\n\r\n"],
    "two requests in one segment": [b"GET /a HTTP/1.1\r\nHost: gw\r\n\r\nGET /b HTTP/1.1\r\nHost: gw\r\n\r\n"],
    "pipelined post then get": [HEAD + b'{"a":1}GET /b HTTP/1.1\r\n\r\n'],
    "blanks around values": [b"GET / HTTP/1.1\r\nX-A:   spaced \t \r\nX-B:\tv\r\nX-C:\r\nX-D: \r\n\r\n"],
    "repeated header": [b"GET / HTTP/1.1\r\nX-A: 1\r\nx-a: 2\r\nX-A: 3\r\n\r\n"],
    "odd case and symbols in names": [b"GET / HTTP/1.1\r\ncontent-TYPE: a\r\nX-!#$%&'*+.^_`|~: b\r\n\r\n"],
    "high bytes and controls in a value": [b"GET / HTTP/1.1\r\nX-A: caf\xc3\xa9 \x01\x7f\x0b\x0c\x1c\x85\r\n\r\n"],
    "folded header": [b"GET / HTTP/1.1\r\nX-A: one\r\n  two\r\nX-B: b\r\n\r\n"],
    "blank before the colon": [b"GET / HTTP/1.1\r\nHost : gw\r\n\r\n"],
    "no colon": [b"GET / HTTP/1.1\r\nHost gw\r\n\r\n"],
    "empty name": [b"GET / HTTP/1.1\r\n: v\r\n\r\n"],
    "nul in a value": [b"GET / HTTP/1.1\r\nX-A: a\x00b\r\n\r\n"],
    "bare cr in a value": [b"GET / HTTP/1.1\r\nX-A: a\rb\r\n\r\n"],
    "bare lf in a value": [b"GET / HTTP/1.1\r\nX-A: a\nb\r\n\r\n"],
    "length and chunked": [
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    ],
    "two lengths": [b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"],
    "length not digits": [b"POST / HTTP/1.1\r\nContent-Length: 3x\r\n\r\nabc"],
    "length with sign": [b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc"],
    "chunked": [b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"],
    "unknown transfer coding": [b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"],
    "identity transfer coding": [b"POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\nContent-Length: 1\r\n\r\na"],
    "http/1.0": [b"GET / HTTP/1.0\r\nHost: gw\r\n\r\nGET /after HTTP/1.0\r\n\r\n"],
    "connection close": [b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET /after HTTP/1.1\r\n\r\n"],
    "expect continue": [b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n", b"a"],
    "leading empty line": [b"\r\nGET / HTTP/1.1\r\nHost: gw\r\n\r\n"],
    "bad request line": [b"GET /\r\nHost: gw\r\n\r\n"],
    "bad version": [b"GET / HTTP/2.0\r\nHost: gw\r\n\r\n"],
    "bad target": [b"GET /a\x7fb HTTP/1.1\r\n\r\n"],
    "too many headers": [b"GET / HTTP/1.1\r\n" + b"X-A: a\r\n" * 501 + b"\r\n"],
    "head just too large": [b"GET / HTTP/1.1\r\nX-A: " + b"a" * 16370 + b"\r\n\r\n"],
    "long value of blanks": [b"GET / HTTP/1.1\r\nX-A: a" + b" " * 8000 + b"b\r\n\r\n"],
}


class OnePassHeadTests(SynchronousTestCase):
    def test_same_as_twisted(self) -> None:
        for name, segments in CASES.items():
            twisted_web = _feed(HTTPChannel, segments)
            one_pass = _feed(APIChannel, segments)
            self.assertEqual(one_pass, twisted_web, name)

    def test_cases_cover_both_paths(self) -> None:
        """
        The cases above would prove nothing if the one-pass read never ran,
        or ran where it must not.
        """
        self.assertTrue(_one_pass_reads(HEAD + b'{"a":1}'))
        self.assertTrue(_one_pass_reads(CASES["odd case and symbols in names"][0]))
        self.assertTrue(_one_pass_reads(CASES["get"][0]))
        self.assertFalse(_one_pass_reads(CASES["folded header"][0]))
        self.assertFalse(_one_pass_reads(CASES["leading empty line"][0]))
        seen, status_lines, _ = _feed(APIChannel, CASES["length and chunked"])
        self.assertEqual((seen, status_lines), ([], [b"HTTP/1.1 400 Bad Request"]))

    def test_body_follows_head(self) -> None:
        seen, status_lines, disconnecting = _feed(APIChannel, CASES["pipelined post then get"])
        self.assertEqual([(method, uri, body) for method, uri, _, _, body in seen], [
            (b"POST", b"/v1/chat/completions", b'{"a":1}'),
            (b"GET", b"/b", b""),
        ])
        self.assertEqual(status_lines, [b"HTTP/1.1 200 OK"] * 2)
        self.assertFalse(disconnecting)


_NAMES = st.sampled_from(
    [b"Host", b"content-length", b"Transfer-Encoding", b"X-A", b"x-a", b"Expect", b"Connection"]
)
_VALUES = st.sampled_from(
    [b"", b"1", b"3", b"chunked", b"close", b"100-continue", b" v ", b"a\tb"]
) | st.binary(max_size=12)
_LINES = st.one_of(
    st.tuples(_NAMES, st.sampled_from([b":", b": ", b" :", b":\t"]), _VALUES).map(b"".join),
    st.binary(max_size=16),
)
_HEADS = st.tuples(
    st.sampled_from([b"GET / HTTP/1.1", b"POST /v1 HTTP/1.1", b"GET / HTTP/1.0", b"GET  / HTTP/1.1", b""]),
    st.lists(_LINES, max_size=6),
    st.binary(max_size=24),
).map(lambda parts: b"\r\n".join([parts[0], *parts[1], b""]) + b"\r\n" + parts[2])


class OnePassHeadProperties(SynchronousTestCase):
    @settings(max_examples=400, deadline=None)
    @given(_HEADS, st.integers(min_value=0, max_value=80))
    def test_same_as_twisted(self, raw: bytes, cut: int) -> None:
        for segments in ([raw], [raw[:cut], raw[cut:]]):
            self.assertEqual(_feed(APIChannel, segments), _feed(HTTPChannel, segments), segments)


class _Writes(StringTransport):
    """
    A transport that keeps each write apart.
    """

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def writeSequence(self, seq: Any) -> None:
        self.write(b"".join(seq))


class _WebSite(Site, _Site):
    """
    A twisted.web site (what L{APIRequest} reads), telling as L{_Site}.
    """

    max_request_bytes = 1 << 20

    def __init__(self) -> None:
        Site.__init__(self, Resource())
        _Site.__init__(self)


def _answering(answer: Any) -> tuple[APIChannel, _Writes, list[APIRequest]]:
    """
    An L{APIChannel} whose requests are answered by C{answer(request)}.
    """
    started: list[APIRequest] = []

    class Answered(APIRequest):
        def process(self) -> None:
            started.append(self)
            answer(self)

    channel = APIChannel()
    channel.requestFactory = Answered
    channel.timeOut = None
    channel.site = _WebSite()  # type: ignore[attr-defined]
    transport = _Writes()
    channel.makeConnection(transport)
    return channel, transport, started


class ResponseWriteTests(SynchronousTestCase):
    """
    What an L{APIChannel} writes in a turn of the reactor goes out at its
    end, as one write (see L{openclaw.writethrough}), and never out of
    order.
    """

    def test_answer_in_one_write(self) -> None:
        """
        Status line, headers and body: one write, one segment, at the end
        of the turn.
        """
        channel, transport, started = _answering(lambda request: None)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        (request,) = started
        request.setHeader(b"Content-Length", b"5")
        request.write(b"hello")
        request.finish()
        self.assertEqual(transport.writes, [])
        channel.site.end_turn()
        (written,) = transport.writes
        self.assertTrue(written.startswith(b"HTTP/1.1 200 OK\r\n"), written)
        self.assertTrue(written.endswith(b"\r\n\r\nhello"), written)

    def test_answered_while_reading(self) -> None:
        """
        An answer given while its request is being read (a refusal, say)
        goes out as the request is done, in one write: the rest of the read
        comes after it.
        """

        def answer(request: APIRequest) -> None:
            request.setHeader(b"Content-Length", b"2")
            request.write(b"no")
            request.finish()

        channel, transport, started = _answering(answer)
        channel.dataReceived(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(len(started), 2)
        first, second = transport.writes
        self.assertTrue(first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(b"\r\n\r\nno"), first)
        self.assertTrue(second.startswith(b"HTTP/1.1 200 OK\r\n") and second.endswith(b"\r\n\r\nno"), second)

    def test_one_write_per_turn(self) -> None:
        """
        A stream: what it writes in one turn goes as one write; what it
        writes in the next, as another.
        """
        channel, transport, started = _answering(lambda request: None)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        (request,) = started
        request.write(b"")
        request.write(b"first")
        channel.site.end_turn()
        request.write(b"last")
        request.finish()
        channel.site.end_turn()
        head, end = transport.writes
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"), head)
        self.assertTrue(head.endswith(b"\r\n\r\n5\r\nfirst\r\n"), head)
        self.assertEqual(end, b"4\r\nlast\r\n0\r\n\r\n")

    def test_answer_before_next_request(self) -> None:
        """
        An answer goes out before the channel reads on: the request
        pipelined behind it is read as it finishes, and twisted.web answers
        a bad one straight to the transport, which must not overtake it.
        """
        channel, transport, started = _answering(lambda request: None)
        channel.dataReceived(
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /2 HTTP/1.1\r\nNo colon here\r\n\r\n"
        )
        (first,) = started
        first.write(b"one")
        first.finish()
        channel.site.end_turn()
        written = transport.value()
        self.assertEqual(re.findall(rb"HTTP/1\.1 \d{3}", written), [b"HTTP/1.1 200", b"HTTP/1.1 400"])
        self.assertIn(b"3\r\none\r\n0\r\n\r\n", written)
        self.assertTrue(transport.disconnecting)


    def test_answer_before_next_read(self) -> None:
        """
        An answer still unsent when the next request arrives, later in the
        same turn, goes out before that request is read.
        """
        channel, transport, started = _answering(lambda request: None)
        channel.dataReceived(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
        (first,) = started
        first.write(b"one")
        first.finish()
        channel.dataReceived(b"GET /2 HTTP/1.1\r\nNo colon here\r\n\r\n")
        channel.site.end_turn()
        written = transport.value()
        self.assertEqual(re.findall(rb"HTTP/1\.1 \d{3}", written), [b"HTTP/1.1 200", b"HTTP/1.1 400"])


class EndOfTurnTests(TestCase):
    def test_site_sends_at_end_of_turn(self) -> None:
        """
        An L{APISite} sends what its connections wrote in a turn once the
        turn is over, all of them from one timed call.
        """
        clock = Clock()
        site = APISite(Resource(), context=None, reactor=clock)
        sent: list[str] = []

        class Channel:
            def __init__(self, name: str) -> None:
                self.name = name

            def send_unsent(self) -> None:
                sent.append(self.name)

        a, b = Channel("a"), Channel("b")
        site.send_at_end_of_turn(a)  # type: ignore[arg-type]
        site.send_at_end_of_turn(b)  # type: ignore[arg-type]
        self.assertEqual((sent, len(clock.getDelayedCalls())), ([], 1))
        clock.advance(0)
        self.assertEqual((sent, clock.getDelayedCalls()), (["a", "b"], []))
        site.send_at_end_of_turn(a)  # type: ignore[arg-type]
        clock.advance(0)
        self.assertEqual(sent, ["a", "b", "a"])

    @inlineCallbacks
    def answer_over_a_real_connection(self, request_bytes: bytes, then: Any = None) -> Any:
        """
        Send C{request_bytes} over a real connection to an L{APISite}, answer
        it from outside the read as a call does (then call C{then(site)} if
        given), and return what the client
        got by the time the gateway closed the connection or 5 seconds
        passed; and what of it had arrived before the turn was over.
        """
        started: list[APIRequest] = []

        class Waiting(APIRequest):
            def process(self) -> None:
                started.append(self)

        site = APISite(Resource(), context=None)
        site.requestFactory = Waiting
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        client.sendall(request_bytes)
        for _ in range(500):
            if started:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        (request,) = started
        request.setHeader(b"Content-Length", b"2")
        request.write(b"ok")
        request.finish()
        if then is not None:
            then(site)
        try:
            early = client.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            early = b""

        def receive() -> bytes:
            client.settimeout(5)
            got = early
            try:
                while not got.endswith(b"\r\n\r\nok"):
                    data = client.recv(4096)
                    if not data:
                        break
                    got += data
            except TimeoutError:
                pass
            return got

        answer = yield deferToThread(receive)
        client.close()
        for _ in range(500):
            if not site.channels:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        return early, answer

    @inlineCallbacks
    def test_answer_over_a_real_connection(self) -> Any:
        """
        Over a real connection: nothing is sent while the turn goes on,
        then the whole answer at once.
        """
        early, answer = yield self.answer_over_a_real_connection(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(early, b"")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer)
        self.assertTrue(answer.endswith(b"\r\n\r\nok"), answer)

    @inlineCallbacks
    def test_answer_then_close(self) -> Any:
        """
        On a connection that closes after its answer (HTTP/1.0, or
        C{Connection: close}), the answer still goes out whole before it
        does.
        """
        for head in (b"GET / HTTP/1.0\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"):
            _, answer = yield self.answer_over_a_real_connection(head)
            self.assertTrue(answer.startswith(b"HTTP/1."), answer)
            self.assertTrue(answer.endswith(b"\r\n\r\nok"), answer)

    @inlineCallbacks
    def test_answer_then_stop(self) -> Any:
        """
        A stop closing the idle connections right after an answer was
        written still lets the answer out first.
        """
        _, answer = yield self.answer_over_a_real_connection(
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", then=lambda site: site.close_connections()
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer)
        self.assertTrue(answer.endswith(b"\r\n\r\nok"), answer)
