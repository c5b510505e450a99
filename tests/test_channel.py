"""
The API's connections are twisted.web's own (L{APISite} adds only a record
of which are open): answers in order on a keep-alive connection, pipelined
requests, 400 for a bad head, whole answers before a close, and a stop that
closes every connection.  All over real sockets.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import INegotiated
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

import openclaw
from openclaw.dataplane.connection import CLOSE_DEADLINE_SECONDS, KEYLESS_GRACE_SECONDS, APIConnection
from openclaw.dataplane.site import APILimits, APIRequest, APISite
from openclaw.settings import Settings
from tests.support import exchange

#: The limits of a site built from the default settings.
DEFAULT_LIMITS = APILimits.from_settings(Settings())


def status_lines(answer: bytes) -> list[bytes]:
    return re.findall(rb"HTTP/1\.[01] \d{3}", answer)


class _Served(TestCase):
    """
    An L{APISite} on a real port whose requests are recorded and answered
    by C{self.answer(request)}.
    """

    timeout = 20

    def setUp(self) -> None:
        self.seen: list[tuple[bytes, bytes, bytes]] = []
        test = self

        class Recording(APIRequest):
            def process(self) -> None:
                test.seen.append((self.method, self.uri, self.content.read()))
                test.answer(self)

        self.site = APISite(Resource(), DEFAULT_LIMITS, context=None)
        self.site.requestFactory = Recording
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.addCleanup(self.site.close_connections)

    def answer(self, request: APIRequest) -> None:
        body = request.uri
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def send(self, data: bytes) -> Any:
        return deferToThread(exchange, self.port.getHost().port, data)

    @inlineCallbacks
    def wait_until_closed(self) -> Any:
        for _ in range(500):
            if not len(self.site.connections):
                return
            yield deferLater(reactor, 0.01, lambda: None)


class SiteProtocolTests(SynchronousTestCase):
    def test_twisted_web_protocol(self) -> None:
        """
        The site builds what twisted.web's L{Site} builds (which switches
        to HTTP/2 when TLS negotiates it), wrapped only to be recorded.
        """
        self.assertIs(APISite.protocol, Site.protocol)
        connection = APISite(Resource(), DEFAULT_LIMITS, context=None).buildProtocol(None)
        self.assertIsInstance(connection, APIConnection)
        self.assertIs(type(connection.protocol), type(Site(Resource()).buildProtocol(None)))

    def test_public_api_only(self) -> None:
        """
        No module of the package reaches into Twisted's private state.
        """
        forbidden = re.compile(r"_HTTPChannel__|_tempDataBuffer|dataBuffer|_writeDisconnected|_raiseSynchronously")
        package = Path(openclaw.__file__).parent
        found = [
            f"{path.relative_to(package)}:{number}"
            for path in sorted(package.rglob("*.py"))
            for number, line in enumerate(path.read_text().splitlines(), 1)
            if forbidden.search(line)
        ]
        self.assertEqual(found, [])


@implementer(INegotiated)
class _NegotiatedTransport(StringTransport):
    """
    A TLS transport as twisted.web sees one, its ALPN protocol given.
    """

    def __init__(self, negotiated: bytes) -> None:
        super().__init__()
        self.negotiatedProtocol = negotiated

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


class IdleTimeoutTests(SynchronousTestCase):
    """
    An HTTP/1.1 connection has only its own deadlines, not twisted.web's
    idle timer as well; an HTTP/2 connection keeps that timer.
    """

    def connect(self, transport: StringTransport) -> tuple[Clock, APISite, APIConnection]:
        clock = Clock()
        timeout = Site.timeOut * 2
        # The keyless deadline later still: the clock's jumps below are
        # stalls, after which a deadline fires a turn late (overdue), so
        # one due at the same time would answer first.
        limits = APILimits.from_settings(
            Settings(api_header_timeout_seconds=timeout, api_keyless_timeout_seconds=2 * timeout)
        )
        site = APISite(Resource(), limits, context=None, reactor=clock)
        connection = site.buildProtocol(None)
        assert connection is not None
        connection.makeConnection(transport)
        return clock, site, connection

    def test_http11_idle_past_twisted_timeout(self) -> None:
        transport = StringTransport()
        clock, site, connection = self.connect(transport)
        connection.dataReceived(b"GET / HT")
        clock.advance(site.timeOut + 1)
        self.assertFalse(transport.disconnecting)
        clock.advance(site.limits.header_timeout)
        self.assertTrue(transport.disconnecting)
        self.assertIn(b"API_HEADER_TIMEOUT_SECONDS", transport.value())

    def test_http2_idle_timeout(self) -> None:
        """
        twisted.web's idle timer, for an HTTP/2 connection, outlasts what a
        call may wait on providers without a frame (UPSTREAM_TIMEOUT, and
        again after a failover): a call's own 504 goes out before it.
        """
        transport = _NegotiatedTransport(b"h2")
        clock, site, connection = self.connect(transport)
        connection.dataReceived(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        self.assertEqual(connection.protocol.timeOut, site.limits.http2_idle_timeout)
        self.assertGreater(site.limits.http2_idle_timeout, 2 * Settings().upstream_timeout)
        clock.advance(2 * Settings().upstream_timeout + 1)
        self.assertFalse(transport.disconnecting)
        clock.advance(site.limits.http2_idle_timeout)
        self.assertTrue(transport.disconnecting)


class _Held(Resource):
    """
    Answers nothing until the test finishes the request itself.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render(self, request: Request) -> object:
        self.requests.append(request)
        return NOT_DONE_YET


class _UnreadTransport(StringTransport):
    """
    A connection whose client takes nothing: closing it politely never
    ends.  Like a TCP transport, it lets its producer be resumed while it
    waits to close.
    """

    def resumeProducing(self) -> None:
        self.producerState = "producing"


class CloseDeadlineTests(SynchronousTestCase):
    """
    A connection closing politely is aborted after CLOSE_DEADLINE_SECONDS
    if its client does not take what is left, whatever happens on it
    meanwhile.
    """

    def test_answer_finished_while_closing(self) -> None:
        """
        An answer finished while the connection closes (here: the keyless
        deadline passed while the request was answered) does not move the
        abort out to API_HEADER_TIMEOUT_SECONDS.
        """
        clock = Clock()
        resource = _Held()
        limits = APILimits.from_settings(
            Settings(
                api_header_timeout_seconds=CLOSE_DEADLINE_SECONDS * 10,
                api_keyless_timeout_seconds=KEYLESS_GRACE_SECONDS * 2,
            )
        )
        site = APISite(resource, limits, context=None, reactor=clock)
        connection = site.buildProtocol(None)
        assert connection is not None
        transport = _UnreadTransport()
        connection.makeConnection(transport)
        connection.dataReceived(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
        [request] = resource.requests
        clock.advance(KEYLESS_GRACE_SECONDS)  # counted keyless
        clock.advance(site.limits.keyless_timeout - KEYLESS_GRACE_SECONDS)
        self.assertIn(b"API_KEYLESS_TIMEOUT_SECONDS", transport.value())
        self.assertTrue(transport.disconnecting)
        request.finish()
        clock.advance(CLOSE_DEADLINE_SECONDS)
        self.assertTrue(transport.disconnected)


class KeepAliveTests(_Served):
    @inlineCallbacks
    def test_pipelined_in_order(self):
        """
        Requests pipelined in one segment are each answered, in order.
        """
        answer = yield self.send(
            b"GET /a HTTP/1.1\r\nHost: gw\r\n\r\n"
            b'POST /b HTTP/1.1\r\nHost: gw\r\nContent-Length: 7\r\n\r\n{"a":1}'
            b"GET /c HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual([uri for _, uri, _ in self.seen], [b"/a", b"/b", b"/c"])
        self.assertEqual(self.seen[1], (b"POST", b"/b", b'{"a":1}'))
        self.assertEqual(status_lines(answer), [b"HTTP/1.1 200"] * 3)
        self.assertEqual(re.findall(rb"\r\n\r\n(/\w)", answer), [b"/a", b"/b", b"/c"])

    @inlineCallbacks
    def test_slow_answer_first(self):
        """
        A first answer given later (from a timed call, as a provider call
        answers) still goes out before the next request's.
        """

        def answer(request: APIRequest) -> None:
            delay = 0.1 if request.uri == b"/slow" else 0
            reactor.callLater(delay, _Served.answer, self, request)

        self.answer = answer  # type: ignore[method-assign]
        answer_bytes = yield self.send(
            b"GET /slow HTTP/1.1\r\nHost: gw\r\n\r\nGET /fast HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(re.findall(rb"\r\n\r\n(/[a-z]+)", answer_bytes), [b"/slow", b"/fast"])

    @inlineCallbacks
    def test_answer_then_close(self):
        """
        On a connection that closes after its answer (HTTP/1.0, or
        C{Connection: close}), the answer goes out whole first.
        """
        for head in (b"GET /x HTTP/1.0\r\n\r\n", b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"):
            answer = yield self.send(head)
            self.assertTrue(answer.startswith(b"HTTP/1."), answer)
            self.assertTrue(answer.endswith(b"\r\n\r\n/x"), answer)


#: Heads twisted.web refuses with 400 (and then closes the connection).
BAD_HEADS = {
    "no colon": b"GET / HTTP/1.1\r\nHost gw\r\n\r\n",
    "blank before the colon": b"GET / HTTP/1.1\r\nHost : gw\r\n\r\n",
    "nul in a value": b"GET / HTTP/1.1\r\nX-A: a\x00b\r\n\r\n",
    "length and chunked": (
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    ),
    "two lengths": b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
    "length not digits": b"POST / HTTP/1.1\r\nContent-Length: 3x\r\n\r\nabc",
    "bad request line": b"GET /\r\nHost: gw\r\n\r\n",
    "too many headers": b"GET / HTTP/1.1\r\n" + b"X-A: a\r\n" * 501 + b"\r\n",
}


class BadHeadTests(_Served):
    @inlineCallbacks
    def test_bad_heads(self):
        for name, head in BAD_HEADS.items():
            answer = yield self.send(head)
            self.assertEqual(status_lines(answer), [b"HTTP/1.1 400"], name)
        self.assertEqual(self.seen, [])

    @inlineCallbacks
    def test_bad_head_after_good(self):
        """
        A bad request pipelined behind a good one: the good one is answered
        first, then the 400, then the connection closes.
        """
        answer = yield self.send(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nNo colon here\r\n\r\n")
        self.assertEqual(status_lines(answer), [b"HTTP/1.1 200", b"HTTP/1.1 400"])
        self.assertEqual([uri for _, uri, _ in self.seen], [b"/1"])


class StopTests(_Served):
    @inlineCallbacks
    def test_answer_then_stop(self):
        """
        A stop closing the connections right after an answer was written
        still lets the answer out first, and fires once all are closed.
        """
        closing = []

        def answer(request: APIRequest) -> None:
            _Served.answer(self, request)
            closing.append(self.site.close_connections())

        self.answer = answer  # type: ignore[method-assign]
        answer_bytes = yield self.send(b"GET /kept HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertTrue(answer_bytes.startswith(b"HTTP/1.1 200 OK\r\n"), answer_bytes)
        self.assertTrue(answer_bytes.endswith(b"\r\n\r\n/kept"), answer_bytes)
        yield closing[0]
        self.assertEqual(len(self.site.connections), 0)

    @inlineCallbacks
    def test_stop_with_a_call_under_way(self):
        """
        A connection whose request is still unanswered is closed too, and
        the request learns that its client is gone.
        """
        lost = []

        def answer(request: APIRequest) -> None:
            request.notifyFinish().addErrback(lost.append)

        self.answer = answer  # type: ignore[method-assign]
        client = socket.create_connection(("127.0.0.1", self.port.getHost().port))
        self.addCleanup(client.close)
        client.sendall(b"GET /pending HTTP/1.1\r\nHost: a\r\n\r\n")
        for _ in range(500):
            if self.seen:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        yield self.site.close_connections()
        self.assertEqual(len(lost), 1)
        self.assertEqual(len(self.site.connections), 0)


class APILimitsTests(SynchronousTestCase):
    """
    L{APILimits.from_settings}: the settings' values, the per-address caps
    derived when unset, and every connection cap within the descriptors.
    """

    def test_from_settings(self) -> None:
        settings = Settings(
            max_request_bytes=1000,
            api_max_connections=1600,
            api_header_timeout_seconds=1.0,
            api_body_timeout_seconds=2.0,
            api_send_timeout_seconds=3.0,
            api_keyless_timeout_seconds=4.0,
        )
        self.assertEqual(
            APILimits.from_settings(settings),
            APILimits(
                max_request_bytes=1000,
                max_connections=1600,
                max_connections_per_address=400,
                keyless_per_address=100,
                header_timeout=1.0,
                body_timeout=2.0,
                send_timeout=3.0,
                keyless_timeout=4.0,
                # UPSTREAM_TIMEOUT (60) twice, and 10 s for the answer.
                http2_idle_timeout=130.0,
            ),
        )
        capped = APILimits.from_settings(settings, descriptors=160)
        self.assertEqual(
            (capped.max_connections, capped.max_connections_per_address, capped.keyless_per_address), (160, 40, 10)
        )
        # Which limits the cap lowered: their refusals say to raise the
        # open-file limit, not the setting (hostile trial s40).
        self.assertEqual(
            capped.lowered,
            {
                "api_max_connections",
                "api_max_connections_per_address",
                "api_keyless_connections_per_address",
                "api_keyless_share",
            },
        )
        self.assertEqual(APILimits.from_settings(settings).lowered, frozenset())
        self.assertEqual(APILimits.from_settings(settings, descriptors=5000).lowered, frozenset())

    def test_set_caps_within_the_caps_above(self) -> None:
        settings = Settings(
            api_max_connections=100, api_max_connections_per_address=500, api_keyless_connections_per_address=900
        )
        limits = APILimits.from_settings(settings, descriptors=50)
        self.assertEqual(
            (limits.max_connections, limits.max_connections_per_address, limits.keyless_per_address), (50, 50, 50)
        )
