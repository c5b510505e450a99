"""
Deadlines after the event loop stood still (the process stopped, its host
or VM paused, swapping): Twisted's reactors run the timers that are due
before they read their sockets, so a deadline that passed while the loop
stood still fired before what had arrived meanwhile was read: a
provider's answer waiting in its socket was a 504 charged to the
provider's breaker (a chat call's, an embeddings call's), a client's
request waiting in its socket a 408.  Such a deadline is now judged one
turn of the loop later (L{openclaw.stalls.overdue},
L{openclaw.stalls.add_timeout}), and again while the answer or the
request goes on arriving: one larger than a turn's read (64 KiB) takes
several (L{openclaw.stalls.CatchingUp}).

The stall is real: the reactor's thread sleeps (C{time.sleep}, scheduled
with C{callFromThread}) while a provider on a thread of its own answers,
or a client on a thread of its own sends its request.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from typing import Any, ClassVar

import openai
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from openclaw.dataplane.deadlines import ConnectionDeadlines
from openclaw.providers import GeminiAdapter
from openclaw.providers.kimi import KimiAdapter
from openclaw.settings import ProviderSettings, provider_table
from openclaw.stalls import LATE_SECONDS, CatchingUp, add_timeout, overdue
from tests.support import start_gateway
from tests.test_dataplane import GATEWAY_KEY, GEMINI_KEY, HELLO, KIMI_KEY

#: How long the reactor's thread stands still, in seconds: the deadlines
#: below pass during it, and fire more than LATE_SECONDS late.
STALL = 2.5
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1764000000,
    "model": "moonshot-v1-8k",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
}


def stand_still(seconds: float) -> None:
    """
    Make the reactor's thread stand still for C{seconds} (from another
    thread): returns once it has begun.
    """
    begun = threading.Event()

    def freeze() -> None:
        begun.set()
        time.sleep(seconds)

    reactor.callFromThread(freeze)
    if not begun.wait(10):
        raise AssertionError("the reactor did not run the stall")


class StillAnswering(http.server.BaseHTTPRequestHandler):
    """
    A provider on a thread of its own that answers while the gateway's
    loop stands still (L{STALL} seconds, from when a request arrives):
    C{document} (JSON, 200) to each request of C{method}.
    """

    method = "POST"
    document: ClassVar[Any] = ANSWER

    def answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        stand_still(STALL)
        body = json.dumps(self.document).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.answer()

    def do_GET(self) -> None:
        self.answer()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def still_answering_kimi(testcase: TestCase, handler: type[StillAnswering] = StillAnswering) -> Any:
    """
    C{Settings.providers} with Kimi at a L{StillAnswering} server of
    C{handler}'s, stopped when C{testcase} ends.
    """
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    testcase.addCleanup(server.server_close)
    testcase.addCleanup(server.shutdown)
    base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    return provider_table(
        [ProviderSettings(adapter=KimiAdapter, base_url=base, model="moonshot-v1-8k", api_key=KIMI_KEY)]
    )


def sdk_client(testcase: TestCase, gateway: Any) -> openai.OpenAI:
    """
    An SDK client of C{gateway}'s API, no retries, closed when C{testcase}
    ends.
    """
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{gateway.api_port}/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=20
    )
    testcase.addCleanup(client.close)
    return client


def chat_gateway(testcase: TestCase, handler: type[StillAnswering]) -> tuple[Any, openai.OpenAI]:
    """
    A gateway whose Kimi is a server of C{handler}'s (L{still_answering_kimi})
    with a 0.5 s UPSTREAM_TIMEOUT and a breaker that opens at one failure,
    and an SDK client of it; stopped when C{testcase} ends.
    """
    gateway = start_gateway(
        testcase,
        api=True,
        providers=still_answering_kimi(testcase, handler),
        default_provider="kimi",
        gateway_api_keys=(GATEWAY_KEY,),
        fallback="off",
        upstream_timeout=0.5,
        breaker_failures=1,
    )
    testcase.addCleanup(gateway.service.api_site.close_connections)
    return gateway, sdk_client(testcase, gateway)


class ProviderAnswerTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_answer_that_came_during_the_stall_is_taken(self) -> Any:
        """
        The provider answered while the loop stood still, past
        UPSTREAM_TIMEOUT: the answer is taken, and the breaker not charged
        (before: 504 upstream_timeout, one failure of the provider's).
        """
        gateway, client = chat_gateway(self, StillAnswering)
        answer = yield deferToThread(client.chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO)
        self.assertEqual(answer.choices[0].message.content, "Paris.")
        self.assertEqual(gateway.service.providers.get("kimi").breaker.state, "closed")


class Unreachable(StillAnswering):
    """
    A provider that closes every connection unanswered (at once).
    """

    def answer(self) -> None:
        self.close_connection = True


class EmbeddingAnswer(StillAnswering):
    """
    Gemini's C{batchEmbedContents} answer, for one input, while the loop
    stands still.
    """

    document: ClassVar[Any] = {"embeddings": [{"values": [0.6, 0.8]}]}


#: An answer's size (bytes) well past what Twisted's TCP transport reads
#: from a socket in one turn of the loop (64 KiB).
LARGE_BYTES = 400_000
#: Values of an embedding (Gemini's gemini-embedding-001 has 3072).
LARGE_VALUES = [0.0123456789012345] * 3072
#: Inputs whose Gemini answer passes LARGE_BYTES.
LARGE_INPUTS = 8


class LargeAnswer(StillAnswering):
    """
    A chat answer of over L{LARGE_BYTES}, while the loop stands still.
    """

    document: ClassVar[Any] = {
        **ANSWER,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Paris. " * (LARGE_BYTES // 7)},
                "finish_reason": "stop",
            }
        ],
    }


class LargeEmbeddingAnswer(StillAnswering):
    """
    Gemini's C{batchEmbedContents} answer for L{LARGE_INPUTS} inputs of
    3072 values, over L{LARGE_BYTES}, while the loop stands still.
    """

    document: ClassVar[Any] = {"embeddings": [{"values": LARGE_VALUES} for _ in range(LARGE_INPUTS)]}


class LargeAnswerTests(TestCase):
    """
    An answer larger than a turn's read (64 KiB), come while the loop
    stood still past its deadline: read whole over the turns it takes,
    not cut by the deadline after the first (before: 504, the breaker
    charged).
    """

    timeout = 30

    def test_sizes(self) -> None:
        self.assertGreater(len(json.dumps(LargeAnswer.document)), LARGE_BYTES)
        self.assertGreater(len(json.dumps(LargeEmbeddingAnswer.document)), LARGE_BYTES)

    @inlineCallbacks
    def test_chat(self) -> Any:
        gateway, client = chat_gateway(self, LargeAnswer)
        answer = yield deferToThread(client.chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO)
        self.assertEqual(answer.choices[0].message.content, LargeAnswer.document["choices"][0]["message"]["content"])
        self.assertEqual(gateway.service.providers.get("kimi").breaker.state, "closed")

    @inlineCallbacks
    def test_embeddings(self) -> Any:
        gateway, client = embeddings_gateway(self, LargeEmbeddingAnswer)
        answer = yield deferToThread(
            client.embeddings.create,
            model="gemini/gemini-embedding-001",
            input=["hello"] * LARGE_INPUTS,
            encoding_format="float",
        )
        # Whole: every input's vector, every value (as floats go through
        # JSON), not compared as lists (a failure's diff would take minutes).
        self.assertEqual(len(answer.data), LARGE_INPUTS)
        for item in answer.data:
            self.assertTrue(len(item.embedding) == len(LARGE_VALUES) and set(item.embedding) == {item.embedding[0]})
            # Normalised to unit length, as the gateway gives Gemini's.
            self.assertAlmostEqual(item.embedding[0], len(LARGE_VALUES) ** -0.5, places=6)
        self.assertEqual(gateway.service.providers.get("gemini").breaker.state, "closed")


def embeddings_gateway(testcase: TestCase, handler: type[StillAnswering]) -> tuple[Any, openai.OpenAI]:
    """
    A gateway whose Gemini (the embeddings provider) is a server of
    C{handler}'s, and an SDK client of it; stopped when C{testcase} ends.
    """
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    testcase.addCleanup(server.server_close)
    testcase.addCleanup(server.shutdown)
    base = f"http://127.0.0.1:{server.server_address[1]}/v1beta"
    providers = provider_table(
        [ProviderSettings(adapter=GeminiAdapter, base_url=base, model="gemini-2.5-flash", api_key=GEMINI_KEY)]
    )
    gateway = start_gateway(
        testcase,
        api=True,
        providers=providers,
        default_provider="gemini",
        embedding_provider="gemini",
        embedding_model="gemini-embedding-001",
        gateway_api_keys=(GATEWAY_KEY,),
        fallback="off",
        upstream_timeout=0.5,
        breaker_failures=1,
    )
    testcase.addCleanup(gateway.service.api_site.close_connections)
    return gateway, sdk_client(testcase, gateway)


class EmbeddingsAnswerTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_answer_that_came_during_the_stall_is_taken(self) -> Any:
        """
        The provider answered an embeddings call while the loop stood
        still, past UPSTREAM_TIMEOUT: the answer is taken, and the breaker
        not charged (before: 504 upstream_timeout, one failure of the
        provider's, as a chat call's was).
        """
        gateway, client = embeddings_gateway(self, EmbeddingAnswer)
        answer = yield deferToThread(
            client.embeddings.create, model="gemini/gemini-embedding-001", input="hello", encoding_format="float"
        )
        self.assertEqual(answer.data[0].embedding, [0.6, 0.8])
        self.assertEqual(gateway.service.providers.get("gemini").breaker.state, "closed")


class ClientRequestTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_request_that_came_during_the_stall_is_answered(self) -> Any:
        """
        A client connected, then sent its request while the loop stood
        still, past API_HEADER_TIMEOUT_SECONDS: answered, not 408.
        """
        gateway = start_gateway(self, api=True, gateway_api_keys=(GATEWAY_KEY,), api_header_timeout_seconds=0.5)
        self.addCleanup(gateway.service.api_site.close_connections)

        def ask() -> bytes:
            with socket.create_connection(("127.0.0.1", gateway.api_port), timeout=20) as connection:
                # Accepted (its head's deadline armed) before the stall.
                time.sleep(0.2)
                stand_still(STALL)
                connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := connection.recv(65536):
                    answer += chunk
                return answer

        answer = yield deferToThread(ask)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:200])

    @inlineCallbacks
    def test_large_body_that_came_during_the_stall_is_read(self) -> Any:
        """
        A request body larger than a turn's read (64 KiB), sent while the
        loop stood still past API_BODY_TIMEOUT_SECONDS: read whole over
        the turns it takes, and the request answered (here 502: no
        provider listens), not 408 after its first 64 KiB.
        """
        gateway = start_gateway(
            self,
            api=True,
            providers=still_answering_kimi(self, Unreachable),
            default_provider="kimi",
            gateway_api_keys=(GATEWAY_KEY,),
            fallback="off",
            api_body_timeout_seconds=0.5,
        )
        self.addCleanup(gateway.service.api_site.close_connections)
        body = json.dumps(
            {"model": "kimi/moonshot-v1-8k", "messages": [{"role": "user", "content": "x" * LARGE_BYTES}]}
        )
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {GATEWAY_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )

        def ask() -> bytes:
            with socket.create_connection(("127.0.0.1", gateway.api_port), timeout=20) as connection:
                connection.sendall(head.encode())
                # The head read (its body's deadline armed) before the stall.
                time.sleep(0.2)
                stand_still(STALL)
                connection.sendall(body.encode())
                answer = b""
                while chunk := connection.recv(65536):
                    answer += chunk
                return answer

        answer = yield deferToThread(ask)
        self.assertTrue(answer.startswith(b"HTTP/1.1 502 "), answer[:300])


class CatchingUpTests(SynchronousTestCase):
    """
    L{CatchingUp} over a clock moved by hand: put off when found late,
    then for as long as the answer grows, turn after turn.
    """

    def test_rule(self) -> None:
        clock = Clock()
        arrived = [0]
        catching_up = CatchingUp(lambda: arrived[0])
        timer = clock.callLater(5, lambda: None)
        clock.advance(5)
        # On time, however much arrives: judged now.
        arrived[0] = 10
        self.assertFalse(catching_up.put_off(timer, clock))
        timer = clock.callLater(5, lambda: None)
        clock.advance(5 + LATE_SECONDS + 0.5)
        self.assertTrue(catching_up.put_off(timer, clock))
        # The turns after it: put off while the answer grows.
        turn = clock.callLater(0, lambda: None)
        for more in (65536, 65536, 1):
            arrived[0] += more
            self.assertTrue(catching_up.put_off(turn, clock))
        self.assertFalse(catching_up.put_off(turn, clock))
        # Done with: growth alone no longer puts off a deadline on time.
        arrived[0] += 1
        self.assertFalse(catching_up.put_off(turn, clock))


class OverdueTests(SynchronousTestCase):
    """
    The rule itself, over a clock moved by hand.
    """

    def test_only_a_late_timer(self) -> None:
        clock = Clock()
        fired: list[bool] = []
        timer = clock.callLater(5, lambda: fired.append(overdue(timer, clock)))
        clock.advance(5)
        timer = clock.callLater(5, lambda: fired.append(overdue(timer, clock)))
        clock.advance(5 + LATE_SECONDS + 0.5)
        self.assertEqual(fired, [False, True])

    def test_late_deadline_still_fires(self) -> None:
        """
        A request deadline that fires late is judged a turn later, and
        then fires as it would have (C{Clock} runs that turn in the same
        C{advance}: nothing is read in between).
        """
        clock = Clock()
        late: list[tuple[float, str, str]] = []
        deadlines = ConnectionDeadlines(
            clock,
            late=lambda *a: late.append(a),
            stalled=lambda *a: None,
            grace_over=lambda: False,
            keyless=lambda: None,
        )
        deadlines.arm(1.0, "API_HEADER_TIMEOUT_SECONDS", "its head")
        clock.advance(1.0 + LATE_SECONDS + 2.0)
        self.assertEqual(late, [(1.0, "API_HEADER_TIMEOUT_SECONDS", "its head")])
        self.assertEqual(clock.getDelayedCalls(), [])


class AddTimeoutTests(SynchronousTestCase):
    """
    L{add_timeout} over a clock moved by hand: C{Deferred.addTimeout}, but
    a deadline found due late is judged a turn later.
    """

    def timed(self, clock: Clock) -> tuple[Deferred[str], list[object]]:
        """
        A Deferred under a 5 s L{add_timeout} over C{clock}, and what it
        fires with, once it has.
        """
        waited: Deferred[str] = Deferred()
        fired: list[object] = []
        add_timeout(waited, 5.0, clock, lambda result, seconds: ("timed out", seconds, type(result.value)))
        waited.addBoth(fired.append)
        return waited, fired

    def test_in_time(self) -> None:
        """
        Due on time: cancelled at once, as C{addTimeout} does, and its
        result what C{on_timeout} makes of the cancellation.
        """
        clock = Clock()
        _, fired = self.timed(clock)
        clock.advance(5.0)
        self.assertEqual(fired, [("timed out", 5.0, CancelledError)])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_late_deadline_still_fires(self) -> None:
        """
        Found due late, it is judged a turn later, and then cancels as it
        would have (C{Clock} runs that turn in the same C{advance}:
        nothing is read in between).
        """
        clock = Clock()
        _, fired = self.timed(clock)
        clock.advance(5.0 + LATE_SECONDS + 2.0)
        self.assertEqual(fired, [("timed out", 5.0, CancelledError)])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_answer_before_the_deadline(self) -> None:
        """
        What fires in time is left as it is, and the timer cancelled.
        """
        clock = Clock()
        waited, fired = self.timed(clock)
        clock.advance(4.0)
        waited.callback("answer")
        self.assertEqual(fired, ["answer"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_failure_before_the_deadline(self) -> None:
        """
        A failure before the deadline is no timeout: C{on_timeout} is not
        called.
        """
        clock = Clock()
        waited, fired = self.timed(clock)
        waited.errback(Failure(ValueError("refused")))
        self.assertEqual([type(f.value) for f in fired if isinstance(f, Failure)], [ValueError])
        self.assertEqual(clock.getDelayedCalls(), [])
