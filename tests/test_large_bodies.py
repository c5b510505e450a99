"""
Large chat bodies are parsed, checked and encoded in a thread
(L{openclaw.dataplane.offload}): the other clients are served meanwhile
(trial s32: four 6.5 MB bodies of tool calls to Gemini held C{/healthz}
up for 5 s), the answers and refusals are those of a body worked on in
the reactor's thread, a client that leaves meanwhile has no call made,
and no more than the pool's threads work at once.
"""

from __future__ import annotations

import json
import math
import random
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar, cast

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers
from zope.interface import implementer

from openclaw.dataplane import call, resource
from openclaw.dataplane.offload import OFFLOAD_BYTES, BodyWorkers, HeldLog
from openclaw.dataplane.request import parse_chat_request
from openclaw.providers.gemini import GeminiAdapter
from openclaw.testing.upstream import GeminiAnswer
from tests.support import free_port, spawn_gateway, within
from tests.test_dataplane import GATEWAY_KEY, OTHER_GATEWAY_KEY, DataPlaneTestCase
from tests.test_twistd import base_env

GEMINI_MODEL = "gemini/gemini-flash-latest"
T = TypeVar("T")


def tool_loop(calls: int, model: str = GEMINI_MODEL, **fields: Any) -> dict[str, Any]:
    """
    A chat body of one assistant turn of C{calls} tool calls and their
    C{calls} results (trial s32's body: 45,000 calls are 6.5 MB).
    """
    return {
        "model": model,
        "messages": [
            {"role": "user", "content": "a"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    for i in range(calls)
                ],
            },
            *({"role": "tool", "tool_call_id": f"c{i}", "content": "r"} for i in range(calls)),
        ],
        **fields,
    }


def open_chat(test: TestCase, port: int, body: bytes, key: str = GATEWAY_KEY) -> Deferred[socket.socket]:
    """
    A connection to the API on C{port} that has sent a chat request of
    C{body} with C{key}, its answer unread: a test closes it to leave
    mid-call (closed at the test's end anyway).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    test.addCleanup(sock.close)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer " + key.encode()
    head += b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    return deferToThread(sock.sendall, head + body).addCallback(lambda _: sock)


def http_post(port: int, body: bytes, headers: bytes = b"", key: str = GATEWAY_KEY) -> tuple[bytes, bytes, float]:
    """
    POST C{body} to the chat completions of the API on C{port} with a
    blocking socket (call it in a thread), with C{key}; the status line,
    the rest of the answer, and the seconds it took.
    """
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer "
        + key.encode()
        + b"\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + headers
        + b"Content-Length: %d\r\n\r\n" % len(body)
    )
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head + body)
        answer = b""
        while chunk := sock.recv(1 << 20):
            answer += chunk
    status, _, rest = answer.partition(b"\r\n")
    return status, rest, time.monotonic() - started


def healthz(port: int) -> float:
    """
    Seconds a C{GET /healthz} on C{port} took to be answered (blocking).
    """
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
    return time.monotonic() - started


def probed_while(port: int, work: Any) -> tuple[Any, list[float]]:
    """
    C{work()}, while C{/healthz} on C{port} is asked every 10 ms from
    another thread: its result and the probes' times (blocking).
    """
    probes: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            probes.append(healthz(port))
            done.wait(0.01)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        result = work()
    finally:
        done.set()
        prober.join(30)
    return result, probes


class StandInProcess(ProcessProtocol):
    """
    The stand-in upstream's command line (C{python -m
    openclaw.testing.upstream}) as a process; L{stop} ends it.
    """

    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    def stop(self) -> Deferred[None]:
        if not self.ended.called:
            self.transport.signalProcess("TERM")
        return self.ended


def wait_for_port(port: int, seconds: float = 30) -> None:
    """
    Return once something listens on C{port} of 127.0.0.1 (blocking).
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


_DURATION = re.compile(rb"POST /v1/chat/completions 200 via gemini/gemini-flash-latest .* in ([0-9.]+) ms")


class OtherClientsServedTests(TestCase):
    """
    A gateway as an operator runs it (its own process), in front of the
    stand-in: C{/healthz} is answered while a large body is worked on.
    """

    timeout = 120

    @inlineCallbacks
    def test_healthz_answered_during_large_body(self):
        """
        Trial s32: a 6.5 MB body of tool calls to Gemini took the
        reactor's thread for 1.35 s, and every other client waited as
        long.  Here (4 MB) the slowest C{/healthz} answered while it is
        worked on takes a small part of the large request's own time (by
        the gateway's log line), not the whole.
        """
        # The stand-in in a process of its own too: its parse of the
        # translated body would hold up this process's probes.
        upstream_port = free_port()
        standin = StandInProcess()
        reactor.spawnProcess(
            standin,
            sys.executable,
            [sys.executable, "-m", "openclaw.testing.upstream", "--port", str(upstream_port), "--key", "gemini=g-key"],
            env=base_env(),
        )
        self.addCleanup(standin.stop)
        yield deferToThread(wait_for_port, upstream_port)
        api_port = free_port()
        process = spawn_gateway(
            self,
            ["--port", str(free_port()), "--api-port", str(api_port), "--interface", "127.0.0.1"],
            base_env(
                GATEWAY_API_KEYS=GATEWAY_KEY,
                LOG_LEVEL="debug",
                GEMINI_BASE_URL=f"http://127.0.0.1:{upstream_port}/gemini/v1beta",
                GEMINI_API_KEY="g-key",
            ),
        )
        yield within(process.token, 60, "the gateway's banner")
        body = json.dumps(tool_loop(30_000)).encode()
        (status, _, _), probes = yield deferToThread(probed_while, api_port, lambda: http_post(api_port, body))
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        # The gateway's line is written as it answers: a moment later here.
        for _ in range(100):
            found = _DURATION.search(process.stdout)
            if found:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        assert found is not None, process.stdout[-2000:]
        took = float(found.group(1)) / 1000
        # Long enough for the bound to mean something on any host.
        self.assertGreater(took, 0.25)
        self.assertGreater(len(probes), 3)
        self.assertLess(max(probes), took / 3, f"probes {sorted(probes)[-5:]}, the large request {took:.2f} s")


def _same(document: Any) -> Any:
    """
    C{document} without what differs from one answer to the next (ids,
    times).
    """
    if isinstance(document, dict):
        return {
            name: _same(value)
            for name, value in document.items()
            if name not in ("id", "created", "system_fingerprint")
        }
    if isinstance(document, list):
        return [_same(value) for value in document]
    return document


def _stream(text: bytes) -> list[Any]:
    """
    The events of a streamed answer's body (its chunked framing left in
    place is skipped), without their ids and times.
    """
    return [
        _same(json.loads(line[6:])) if line != b"data: [DONE]" else "[DONE]"
        for line in (line.rstrip(b"\r") for line in text.split(b"\n"))
        if line.startswith(b"data: ")
    ]


@attrs.define(eq=False)
class CountedWorkers(BodyWorkers):
    """
    L{BodyWorkers} that count the works they were given.
    """

    runs: int = 0

    def run(self, work: Callable[[], T], whose: Hashable | None = None) -> Deferred[T]:
        self.runs += 1
        return super().run(work, whose)


@attrs.define(eq=False)
class HeldWorkers(CountedWorkers):
    """
    L{CountedWorkers} whose C{held}-th work's result is held back until
    L{release}.
    """

    held: int = 2
    _release: Deferred[None] | None = None

    def run(self, work: Callable[[], T], whose: Hashable | None = None) -> Deferred[T]:
        done = super().run(work, whose)
        if self.runs != self.held:
            return done
        self._release = Deferred()
        return self._release.addCallback(lambda _: done)

    def release(self) -> None:
        assert self._release is not None
        self._release.callback(None)


class SameAnswerTests(DataPlaneTestCase):
    """
    A body past L{OFFLOAD_BYTES} gets the answer, the refusal and the log
    line one worked on in the reactor's thread gets.
    """

    timeout = 60

    def both_ways(self, body: bytes, headers: bytes = b"", runs: int = 1, **settings: Any) -> Any:
        """
        POST C{body} once worked on in the reactor's thread, once in a
        thread of the pool (each checked to be so: C{runs} works in the
        pool); fire with both C{(status line, answer, log event of the
        request, whether it was failed over)}.  C{settings}: the gateway's.
        """
        # Debug: successes are logged too.
        gateway = self.gateway(log_level="debug", **settings)
        context = gateway.service.api_site.context
        context.bodies = workers = CountedWorkers.of(reactor)
        self.addCleanup(workers.stop)
        self.assertGreater(len(body), OFFLOAD_BYTES)

        @inlineCallbacks
        def answers() -> Any:
            found = []
            for above in (math.inf, OFFLOAD_BYTES):
                context.bodies.above = above
                before = len(self.events)
                status, rest, _ = yield deferToThread(http_post, gateway.api_port, body, headers)
                lines = yield self.request_lines(before)
                self.assertEqual(len(lines), 1)
                head, _, answer = rest.partition(b"\r\n\r\n")
                line = {name: lines[0][name] for name in ("status", "outcome", "param", "route", "provider")}
                found.append((status, answer, line, b"x-openclaw-fallback" in head.lower()))
            self.assertEqual(workers.runs, runs)
            return found

        return answers()

    @inlineCallbacks
    def request_lines(self, since: int = 0) -> Any:
        """
        Fire with the log events of chat requests after the first
        C{since} events, once there is one (a stream's line may come a
        moment after its client has the whole answer), or after 20 s.
        """
        for _ in range(400):
            lines = [e for e in self.events[since:] if e.get("path") == "/v1/chat/completions"]
            if lines:
                return lines
            yield deferLater(reactor, 0.05, lambda: None)
        return []

    @inlineCallbacks
    def test_whole_answer(self):
        body = json.dumps(tool_loop(3000)).encode()
        (inline, upstream_inline), (apart, upstream_apart) = yield self.each_with_upstream_body(body)
        self.assertEqual(inline[0], b"HTTP/1.1 200 OK")
        self.assertEqual(upstream_inline, upstream_apart)
        self.assertEqual(_same(json.loads(inline[1])), _same(json.loads(apart[1])))
        self.assertEqual(inline[2], apart[2])

    @inlineCallbacks
    def test_streamed_answer(self):
        body = json.dumps(tool_loop(3000, stream=True, stream_options={"include_usage": True})).encode()
        (inline, upstream_inline), (apart, upstream_apart) = yield self.each_with_upstream_body(body)
        self.assertEqual(inline[0], b"HTTP/1.1 200 OK")
        self.assertEqual(upstream_inline, upstream_apart)
        events = _stream(inline[1])
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual(events, _stream(apart[1]))
        self.assertEqual(inline[2], apart[2])

    @inlineCallbacks
    def test_failover(self):
        """
        A large request failed over (Kimi answers 500) is encoded for
        Gemini in a thread too, and Gemini gets the same body, the client
        the same answer.
        """
        self.upstream.kimi.mode = "error"
        body = json.dumps(tool_loop(3000, model="moonshot-v1-8k")).encode()
        (inline, upstream_inline), (apart, upstream_apart) = yield self.each_with_upstream_body(
            body, runs=2, default_provider="kimi"
        )
        self.assertEqual(inline[0], b"HTTP/1.1 200 OK")
        self.assertTrue(inline[3])
        self.assertEqual(upstream_inline, upstream_apart)
        self.assertEqual(_same(json.loads(inline[1])), _same(json.loads(apart[1])))
        self.assertEqual(inline[2:], apart[2:])
        self.assertEqual(self.upstream.kimi.requests, 2)

    @inlineCallbacks
    def test_failover_measured_as_the_body(self):
        """
        A request whose client body is past the threshold (its work done in
        a thread) has its failover encoded in a thread too, though its
        upstream body is under the threshold: the one measure is the
        client's body (review s33: the failover measured the upstream
        body, which an indented request's is far shorter than).
        """
        self.upstream.kimi.mode = "error"
        gateway = self.gateway(default_provider="kimi")
        context = gateway.service.api_site.context
        context.bodies = workers = CountedWorkers.of(reactor)
        self.addCleanup(workers.stop)
        body = json.dumps(tool_loop(3000, model="moonshot-v1-8k"), indent=8).encode()
        compact = len(json.dumps(json.loads(body), separators=(",", ":")))
        self.assertGreater(len(body), 2 * compact)
        context.bodies.above = (len(body) + compact) // 2
        status, rest, _ = yield deferToThread(http_post, gateway.api_port, body)
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertIn(b"x-openclaw-fallback", rest.partition(b"\r\n\r\n")[0].lower())
        self.assertLess(len(self.upstream.gemini.bodies[0]), context.bodies.above)
        self.assertEqual((self.upstream.kimi.requests, self.upstream.gemini.requests), (1, 1))
        self.assertEqual(workers.runs, 2)

    @inlineCallbacks
    def each_with_upstream_body(self, body: bytes, runs: int = 1, **settings: Any) -> Any:
        """
        L{both_ways}, each answer with the body Gemini's stand-in got.
        """
        found = yield self.both_ways(body, runs=runs, **settings)
        bodies = self.upstream.gemini.bodies
        self.assertEqual(len(bodies), 2)
        return list(zip(found, bodies, strict=True))

    @inlineCallbacks
    def test_refusals(self):
        """
        Refusals found at each step, at the end of a large body: by the
        checks (a result of no call, invalid JSON, a content coding), by
        the route (a provider named with no model) and by Gemini's
        encoding (a token bias): the same status, text and log line.
        """
        calls = tool_loop(3000)
        unanswered = {
            **calls,
            "messages": [*calls["messages"], {"role": "tool", "tool_call_id": "nope", "content": "r"}],
        }
        cases = [
            (json.dumps(unanswered).encode(), b"", 400),
            (json.dumps(calls).encode()[:-1], b"", 400),
            (json.dumps(calls).encode()[:-1], b"Content-Encoding: gzip\r\n", 415),
            (json.dumps({**calls, "model": "gemini/ "}).encode(), b"", 400),
            (json.dumps({**calls, "logit_bias": {"1": 5}}).encode(), b"", 400),
        ]
        for body, headers, code in cases:
            self.upstream.gemini.reset()
            (inline, apart) = yield self.both_ways(body, headers)
            self.assertTrue(inline[0].startswith(b"HTTP/1.1 %d " % code), inline[0])
            self.assertEqual(inline, apart)
            self.assertEqual(self.upstream.gemini.requests, 0)

    @inlineCallbacks
    def test_headers_read_in_the_reactors_thread(self):
        """
        A large body sent with a content coding is refused (415) as a short
        one is, its C{Content-Encoding} read in the reactor's thread: the
        request's C{Headers} (which share twisted.web's cache of header
        names) are not touched by the body's worker thread (review s33).
        """
        threads = []
        read = Headers.getRawHeaders

        def recorded(headers: Headers, name: bytes, default: Any = None) -> Any:
            threads.append(threading.current_thread())
            return read(headers, name, default)

        self.patch(Headers, "getRawHeaders", recorded)
        body = json.dumps(tool_loop(3000)).encode()[:-1]
        (inline, apart) = yield self.both_ways(body, b"Content-Encoding: gzip\r\n")
        self.assertTrue(apart[0].startswith(b"HTTP/1.1 415 "), apart[0])
        self.assertEqual(inline, apart)
        self.assertTrue(threads)
        self.assertEqual(set(threads), {threading.main_thread()})

    @inlineCallbacks
    def test_client_gone(self):
        """
        A client that leaves while its large body is worked on: no call
        is made, the request is logged as 499 C{client gone}, and nothing
        as an error.
        """
        gateway = self.gateway()
        body = json.dumps(tool_loop(45_000)).encode()

        def send_and_leave() -> None:
            with socket.create_connection(("127.0.0.1", gateway.api_port), timeout=30) as sock:
                sock.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer "
                    + GATEWAY_KEY.encode()
                    + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                    + body
                )

        yield deferToThread(send_and_leave)
        lines = yield self.request_lines()
        self.assertEqual([(e["status"], e["outcome"], e["provider"]) for e in lines], [(499, "client gone", "-")])
        self.assertEqual(self.upstream.gemini.requests, 0)
        self.assertEqual(gateway.service.api_site.context.in_flight, 0)
        errors = [e for e in self.events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]
        self.assertEqual(errors, [])

    @inlineCallbacks
    def test_stop_during_the_work(self):
        """
        A stop begun while a large body is worked on waits for the call it
        makes (within the grace), which is answered: the end of the work
        left no call in flight for a moment, and the stop closed the
        connection of the call about to start, which was made all the same
        (review s32: the client got nothing, logged 499).
        """
        gateway = self.gateway(shutdown_grace_seconds=20)
        context = gateway.service.api_site.context
        context.bodies = workers = HeldWorkers.of(reactor)
        workers.held = 1
        self.addCleanup(workers.stop)
        body = json.dumps(tool_loop(3000)).encode()
        self.assertGreater(len(body), OFFLOAD_BYTES)
        answer = deferToThread(http_post, gateway.api_port, body)
        for _ in range(400):
            if workers.runs == 1:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(workers.runs, 1)
        stopped = gateway.service.stopService()
        yield deferLater(reactor, 0.2, lambda: None)
        workers.release()
        status, _, _ = yield answer
        yield stopped
        self.assertIn(b" 200 ", status)
        self.assertEqual(self.upstream.gemini.requests, 1)
        self.assertEqual(context.in_flight, 0)

    @inlineCallbacks
    def test_grace_over_during_the_work(self):
        """
        A stop whose grace runs out while a large body is still worked on
        answers it 503 C{shutting_down}, logged and counted once as such,
        as a call still under way then is; no call is made once the work
        is done (review s33: the client got nothing, no status line, and
        the request was logged as 499 C{client gone}).
        """
        gateway = self.gateway(shutdown_grace_seconds=0.5)
        context = gateway.service.api_site.context
        context.bodies = workers = HeldWorkers.of(reactor)
        workers.held = 1
        self.addCleanup(workers.stop)
        body = json.dumps(tool_loop(3000)).encode()
        self.assertGreater(len(body), OFFLOAD_BYTES)
        answer = deferToThread(http_post, gateway.api_port, body)
        for _ in range(400):
            if workers.runs == 1:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(workers.runs, 1)
        stopped = gateway.service.stopService()
        status, rest, _ = yield answer
        yield self.request_lines()
        workers.release()
        yield stopped
        yield deferLater(reactor, 0.1, lambda: None)
        self.assertIn(b" 503 ", status)
        error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
        self.assertEqual(error["code"], "shutting_down")
        self.assertIn("retry it", error["message"])
        lines = [e for e in self.events if e.get("path") == "/v1/chat/completions"]
        self.assertEqual([(e["status"], e["outcome"], e["provider"]) for e in lines], [(503, "shutting_down", "-")])
        self.assertEqual(self.upstream.gemini.requests, 0)
        self.assertEqual((context.in_flight, context.chat_calls), (0, set()))
        errors = [e for e in self.events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]
        self.assertEqual(errors, [])

    @inlineCallbacks
    def leave_during_failover_encoding(self) -> Any:
        """
        Send a large request to Kimi, which answers 500, and leave while
        it is encoded again for the fallback (Gemini); fire with the
        request's log lines once the encoding is let go on, and the API's
        context.
        """
        self.upstream.kimi.mode = "error"
        gateway = self.gateway(default_provider="kimi")
        context = gateway.service.api_site.context
        context.bodies = workers = HeldWorkers.of(reactor)
        self.addCleanup(workers.stop)
        body = json.dumps(tool_loop(3000, model="moonshot-v1-8k")).encode()
        sock = yield open_chat(self, gateway.api_port, body)
        for _ in range(400):
            if workers.runs == 2:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(workers.runs, 2)
        sock.close()
        lines = yield self.request_lines()
        workers.release()
        yield deferLater(reactor, 0.1, lambda: None)
        return lines, context

    @inlineCallbacks
    def test_client_gone_during_failover_encoding(self):
        """
        A client that leaves while its large request is encoded again for
        the fallback: the fallback is not called, the call is counted
        once, as 499, and nothing is logged as an error.
        """
        lines, context = yield self.leave_during_failover_encoding()
        self.assertEqual([(e["status"], e["outcome"]) for e in lines], [(499, "client gone")])
        self.assertEqual((self.upstream.kimi.requests, self.upstream.gemini.requests), (1, 0))
        self.assertEqual(context.in_flight, 0)
        errors = [e for e in self.events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]
        self.assertEqual(errors, [])

    @inlineCallbacks
    def test_bug_in_failover_encoding_after_client_gone(self):
        """
        A bug in the fallback's encoding (an exception other than an
        L{APIError}) is logged as the call's bug even when the call is
        over by then (its client gone): it was swallowed (review s33).
        The call is still counted once, as 499.
        """

        def broken(*args: Any) -> bytes:
            raise RuntimeError("a bug in the encoding")

        self.patch(call, "encode_request", broken)
        lines, context = yield self.leave_during_failover_encoding()
        self.assertEqual([(e["status"], e["outcome"]) for e in lines], [(499, "client gone")])
        self.assertEqual((self.upstream.kimi.requests, self.upstream.gemini.requests), (1, 0))
        self.assertEqual(context.in_flight, 0)
        errors = [e for e in self.events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]
        self.assertEqual([e["log_format"] for e in errors], ["chat call failed unexpectedly"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


def calls_answer(calls: int, finish_reason: str = "STOP", *extra: dict[str, Any]) -> dict[str, Any]:
    """
    A Gemini C{generateContent} answer of one candidate of C{calls}
    C{functionCall} parts (and the C{extra} parts after them), finished
    with C{finish_reason} (hostile trial s34's: 100,000 calls, 4 MB).
    """
    parts = [{"functionCall": {"name": "f", "args": {"i": i}}} for i in range(calls)]
    return {
        "candidates": [{"content": {"role": "model", "parts": [*parts, *extra]}, "finishReason": finish_reason}],
        "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": calls, "totalTokenCount": 10 + calls},
    }


#: A small request to Gemini (its answer is what is large).
ASK = json.dumps({"model": GEMINI_MODEL, "messages": [{"role": "user", "content": "call f"}]}).encode()


class LargeAnswerTests(DataPlaneTestCase):
    """
    A whole answer past L{OFFLOAD_BYTES} is translated for the client in a
    thread of L{BodyWorkers} (hostile trial s34: 4 MB of 100,000 Gemini
    C{functionCall} parts held every other client up for 1.25-2 s): the
    client gets the bytes the wire makes of it, its warnings are logged
    from the reactor's thread, and a call over meanwhile is counted once.
    """

    timeout = 60

    def setUp(self) -> None:
        super().setUp()
        # The ids (the answer's, its calls') the same each time: answers
        # compared byte for byte.
        self.patch(random, "getrandbits", lambda bits: 0x5EED)

    def counted(self, **settings: Any) -> tuple[Any, CountedWorkers]:
        gateway = self.gateway(log_level="debug", **settings)
        context = gateway.service.api_site.context
        context.bodies = workers = CountedWorkers.of(reactor)
        self.addCleanup(workers.stop)
        return gateway, workers

    def translated(self, document: dict[str, Any], created: int) -> bytes:
        """
        The answer the wire makes of C{document} (called here directly) to
        L{ASK}, as at C{created}; its warnings held (not logged).
        """
        chat = parse_chat_request(ASK)
        body = json.dumps(document).encode()
        return GeminiAdapter.wire.completion(body, GEMINI_MODEL.partition("/")[2], created, chat, HeldLog()).body

    @inlineCallbacks
    def test_answer_translated_apart(self):
        """
        The answer is the wire's, byte for byte, translated in a thread
        (one work in the pool) or, short enough, in the reactor's thread;
        an unknown finish reason is warned of once, from the reactor's
        thread, either way.
        """
        gateway, workers = self.counted()
        document = calls_answer(20_000, "SOMETHING_NEW")
        self.assertGreater(len(json.dumps(document)), OFFLOAD_BYTES)
        threads: list[threading.Thread] = []

        def warned(event: dict[str, Any]) -> None:
            if "finishReason this gateway does not know" in event.get("log_format", ""):
                threads.append(threading.current_thread())

        globalLogPublisher.addObserver(warned)
        self.addCleanup(globalLogPublisher.removeObserver, warned)
        answers = []
        for above, runs in ((OFFLOAD_BYTES, 1), (math.inf, 1)):
            workers.above = above
            self.upstream.gemini.answers[:] = [GeminiAnswer((), document=document)]
            status, rest, _ = yield deferToThread(http_post, gateway.api_port, ASK)
            self.assertEqual(status, b"HTTP/1.1 200 OK")
            self.assertEqual(workers.runs, runs)
            answer = rest.partition(b"\r\n\r\n")[2]
            self.assertEqual(answer, self.translated(document, json.loads(answer)["created"]))
            answers.append(json.loads(answer))
        apart, inline = answers
        self.assertEqual(len(apart["choices"][0]["message"]["tool_calls"]), 20_000)
        self.assertEqual(apart["choices"][0]["finish_reason"], "tool_calls")
        self.assertEqual(_same(apart), _same(inline))
        self.assertEqual(threads, [threading.main_thread()] * 2)

    @inlineCallbacks
    def test_refusals_as_inline(self):
        """
        An answer the wire refuses, translated in a thread, gets the
        answer, the status and log line it gets in the reactor's thread:
        an image part (502 C{unsupported_output}, the model's failure),
        a call without a name (C{upstream_malformed}: the provider's,
        here with failover off), JSON nested too deep to write
        (C{upstream_malformed}).
        """
        gateway, workers = self.counted(fallback="off")
        deep: Any = "x"
        for _ in range(300):
            deep = {"a": deep}
        cases = [
            (
                calls_answer(20_000, "STOP", {"inlineData": {"mimeType": "image/png", "data": "AA=="}}),
                "unsupported_output",
            ),
            (calls_answer(20_000, "STOP", {"functionCall": {"args": {}}}), "upstream_malformed"),
            (
                calls_answer(20_000, "STOP", {"functionCall": {"name": "g", "args": {"deep": deep}}}),
                "upstream_malformed",
            ),
        ]
        for runs, (document, code) in enumerate(cases, 1):
            found = []
            for above in (OFFLOAD_BYTES, math.inf):
                workers.above = above
                self.upstream.gemini.answers[:] = [GeminiAnswer((), document=document)]
                before = len(self.events)
                status, rest, _ = yield deferToThread(http_post, gateway.api_port, ASK)
                self.assertEqual(status, b"HTTP/1.1 502 Bad Gateway", code)
                self.assertEqual(json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"], code)
                lines = [e for e in self.events[before:] if e.get("path") == "/v1/chat/completions"]
                self.assertEqual(len(lines), 1)
                found.append((rest.partition(b"\r\n\r\n")[2], {k: lines[0][k] for k in ("status", "outcome")}))
            self.assertEqual(workers.runs, runs)
            self.assertEqual(found[0], found[1])
        errors = [e for e in self.events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]
        self.assertEqual(errors, [])

    @inlineCallbacks
    def test_no_timeout_while_translated(self):
        """
        The provider's answer is whole once read: its translation, however
        long, is not the provider's delay (no 504, no failover, no
        breaker charged).
        """
        gateway = self.gateway(upstream_timeout=0.5, log_level="debug")
        context = gateway.service.api_site.context
        context.bodies = workers = HeldWorkers.of(reactor)
        workers.held = 1
        self.addCleanup(workers.stop)
        self.upstream.gemini.answers[:] = [GeminiAnswer((), document=calls_answer(20_000))]
        answer = deferToThread(http_post, gateway.api_port, ASK)
        yield self.until(lambda: workers.runs == 1)
        yield deferLater(reactor, 1, lambda: None)
        workers.release()
        status, _, _ = yield answer
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual((self.upstream.gemini.requests, self.upstream.kimi.requests), (1, 0))
        lines = [e for e in self.events if e.get("path") == "/v1/chat/completions"]
        self.assertEqual([(e["status"], e["provider"]) for e in lines], [(200, "gemini")])

    @inlineCallbacks
    def until(self, done: Callable[[], bool]) -> Any:
        """
        Fire once C{done()} holds (asked every 50 ms), or fail after 20 s.
        """
        for _ in range(400):
            if done():
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail("never happened")

    @inlineCallbacks
    def test_client_gone_during_translation(self):
        """
        A client that leaves while its large answer is translated: counted
        once, 499 C{client gone}; the translation that comes back then
        is dropped (nothing written, nothing counted again, no error).
        """
        gateway = self.gateway()
        context = gateway.service.api_site.context
        context.bodies = workers = HeldWorkers.of(reactor)
        workers.held = 1
        self.addCleanup(workers.stop)
        self.upstream.gemini.answers[:] = [GeminiAnswer((), document=calls_answer(20_000, "SOMETHING_NEW"))]
        sock = yield open_chat(self, gateway.api_port, ASK)
        yield self.until(lambda: workers.runs == 1)
        sock.close()
        yield self.until(lambda: any(e.get("path") == "/v1/chat/completions" for e in self.events))
        workers.release()
        yield self.until(lambda: any("does not know" in e.get("log_format", "") for e in self.events))
        yield deferLater(reactor, 0.1, lambda: None)
        lines = [e for e in self.events if e.get("path") == "/v1/chat/completions"]
        self.assertEqual([(e["status"], e["outcome"], e["provider"]) for e in lines], [(499, "client gone", "gemini")])
        self.assertEqual((context.in_flight, context.chat_calls), (0, set()))
        errors = [e for e in self.events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]
        self.assertEqual(errors, [])

    @inlineCallbacks
    def test_grace_over_during_translation(self):
        """
        A stop whose grace runs out while a large answer is translated
        answers it 503 C{shutting_down}, counted once; the translation
        that comes back then is dropped.
        """
        gateway = self.gateway(shutdown_grace_seconds=0.5)
        context = gateway.service.api_site.context
        context.bodies = workers = HeldWorkers.of(reactor)
        workers.held = 1
        self.addCleanup(workers.stop)
        self.upstream.gemini.answers[:] = [GeminiAnswer((), document=calls_answer(20_000))]
        answer = deferToThread(http_post, gateway.api_port, ASK)
        yield self.until(lambda: workers.runs == 1)
        stopped = gateway.service.stopService()
        status, rest, _ = yield answer
        workers.release()
        yield stopped
        yield deferLater(reactor, 0.1, lambda: None)
        self.assertIn(b" 503 ", status)
        self.assertEqual(json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"], "shutting_down")
        lines = [e for e in self.events if e.get("path") == "/v1/chat/completions"]
        self.assertEqual([(e["status"], e["outcome"]) for e in lines], [(503, "shutting_down")])
        self.assertEqual((context.in_flight, context.chat_calls), (0, set()))
        errors = [e for e in self.events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]
        self.assertEqual(errors, [])


@implementer(IReactorCore, IReactorFromThreads)
class TriggerReactor:
    """
    The real reactor's C{callFromThread}, and system event triggers of its
    own: only C{("during", "shutdown")} ones, kept in L{during_shutdown}
    by handle, which L{shut_down} runs as Twisted does (each taken out of
    the list before it runs: removing it then is a C{ValueError}).
    """

    def __init__(self) -> None:
        self.during_shutdown: dict[object, Callable[[], object]] = {}

    def callFromThread(self, f: Callable[..., object], *args: object, **kwargs: object) -> None:
        reactor.callFromThread(f, *args, **kwargs)

    def addSystemEventTrigger(self, phase: str, event: str, f: Callable[[], object]) -> object:
        assert (phase, event) == ("during", "shutdown")
        handle = object()
        self.during_shutdown[handle] = f
        return handle

    def removeSystemEventTrigger(self, handle: object) -> None:
        if handle not in self.during_shutdown:
            raise ValueError("no such trigger")
        del self.during_shutdown[handle]

    def shut_down(self) -> None:
        while self.during_shutdown:
            self.during_shutdown.pop(next(iter(self.during_shutdown)))()


class BodyWorkersTests(TestCase):
    """
    The pool's bound: more bodies than threads wait their turn.
    """

    @inlineCallbacks
    def test_at_most_size_at_once(self):
        workers = BodyWorkers.of(reactor)
        lock = threading.Lock()
        running = [0]
        most = [0]

        def work() -> int:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.05)
            with lock:
                running[0] -= 1
            return 1

        results = yield gatherResults([workers.run(work) for _ in range(8)])
        self.assertEqual(results, [1] * 8)
        self.assertEqual(most[0], workers.size)
        # Never threads that keep the process from exiting.
        daemon = yield workers.run(lambda: threading.current_thread().daemon)
        self.assertTrue(daemon)
        # As at the reactor's shutdown; once more does nothing.
        workers.stop()
        workers.stop()

    @inlineCallbacks
    def test_shutdown_trigger_taken_back(self):
        """
        Each start of the pool adds the shutdown trigger that stops it, and
        each stop takes it back (s33: every restart added one more, none
        removed); at the reactor's shutdown the trigger stops the pool
        (without removing itself, which the reactor refuses as it runs it).
        """
        triggers = TriggerReactor()
        workers = BodyWorkers(triggers)
        for _ in range(3):
            result = yield workers.run(lambda: 1)
            self.assertEqual(result, 1)
            self.assertEqual(len(triggers.during_shutdown), 1)
            workers.stop()
            self.assertEqual(triggers.during_shutdown, {})
        yield workers.run(lambda: 2)
        triggers.shut_down()
        self.assertEqual(triggers.during_shutdown, {})
        # Stopped: once more does nothing (no trigger left to remove).
        workers.stop()

    def test_no_threads_without_a_threaded_reactor(self):
        workers = BodyWorkers.of(Clock())
        self.assertEqual(workers.above, math.inf)
        self.assertRaises(RuntimeError, workers.run, lambda: None)


class BoundTests(DataPlaneTestCase):
    """
    The large bodies in the pool are bounded, overall and per key holder
    (hostile trial s33: 200 bodies of 8 MB from one key holder queued
    without a bound took the process to 1.7 GB, and held every client up
    for 6-11 s): past either bound, a body is refused at once, with
    C{Retry-After}, logged and counted, and not worked on.
    """

    timeout = 60

    @inlineCallbacks
    def test_bounds(self):
        gateway = self.gateway()
        context = gateway.service.api_site.context
        # One thread, no place to wait: the first body fills the pool.
        context.bodies = workers = CountedWorkers(reactor, size=1, queue=0, per_holder=1)
        self.addCleanup(workers.stop)
        go_on = threading.Event()
        self.addCleanup(go_on.set)
        prepare = resource.prepare_chat

        def held(*args: Any) -> Any:
            # The first body's work waits for the test.
            go_on.wait(30)
            return prepare(*args)

        self.patch(resource, "prepare_chat", held)
        body = json.dumps(tool_loop(3000)).encode()
        first = deferToThread(http_post, gateway.api_port, body)
        for _ in range(400):
            if workers.runs == 1:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((workers.runs, workers.given), (1, 1))
        before = len(self.events)
        answers = []
        # The same key again: its holder's bound; another key: the pool's.
        for key in (GATEWAY_KEY, OTHER_GATEWAY_KEY):
            status, rest, _ = yield deferToThread(http_post, gateway.api_port, body, b"", key)
            head, _, answer = rest.partition(b"\r\n\r\n")
            self.assertIn(b"retry-after: 1\r\n", head.lower() + b"\r\n")
            answers.append((status, json.loads(answer)["error"]))
        (held_status, held_error), (full_status, full_error) = answers
        self.assertEqual(held_status, b"HTTP/1.1 429 Too Many Requests")
        self.assertEqual(held_error["code"], "too_many_large_requests")
        self.assertIn("wait for their answers", held_error["message"])
        self.assertEqual(full_status, b"HTTP/1.1 503 Service Unavailable")
        self.assertEqual(full_error["code"], "gateway_overloaded")
        self.assertIn("send smaller requests", full_error["message"])
        self.assertEqual(workers.runs, 1)
        lines = [e for e in self.events[before:] if e.get("path") == "/v1/chat/completions"]
        self.assertEqual(
            [(e["status"], e["outcome"], e["provider"]) for e in lines],
            [(429, "too_many_large_requests", "-"), (503, "gateway_overloaded", "-")],
        )
        go_on.set()
        status, _, _ = yield first
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(workers.given, 0)
        # Bodies are taken again.
        status, _, _ = yield deferToThread(http_post, gateway.api_port, body, b"", OTHER_GATEWAY_KEY)
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual((workers.runs, workers.given), (2, 0))


class BodyWorkersBoundTests(TestCase):
    """
    L{BodyWorkers.full}: per holder first, then the pool's queue; a work
    given without a holder (a failover's encoding) counts in the pool but
    is never refused; every count is given back with the result.
    """

    @inlineCallbacks
    def test_full(self):
        workers = BodyWorkers(cast(Any, reactor), size=1, queue=1, per_holder=2)
        self.addCleanup(workers.stop)
        go_on = threading.Event()
        self.addCleanup(go_on.set)

        def work() -> int:
            go_on.wait(30)
            return 1

        self.assertIsNone(workers.full("a"))
        done = [workers.run(work, "a")]
        self.assertIsNone(workers.full("a"))
        done.append(workers.run(work, "a"))
        self.assertEqual(workers.full("a"), "holder")
        self.assertEqual(workers.full("b"), "pool")
        done.append(workers.run(work))
        self.assertEqual(workers.given, 3)
        go_on.set()
        results = yield gatherResults(done)
        self.assertEqual(results, [1, 1, 1])
        self.assertEqual((workers.given, workers.full("a"), workers.full("b")), (0, None, None))
        # A work that fails gives its count back too.
        with self.assertRaises(ZeroDivisionError):
            yield workers.run(lambda: 1 // 0, "a")
        self.assertEqual((workers.given, workers.full("a")), (0, None))
        self.assertIsNone(BodyWorkers.of(Clock()).full("a"))


class RetryAfterTests(TestCase):
    """
    L{BodyWorkers.retry_after}: a refused body is told to wait the time
    the threads take to get through the bodies they have, not always 1 s
    (re-check s33: 16 bodies of 8 MB from one key told 1 s ran out of the
    openai SDK's two retries); between 1 and MAX_RETRY_AFTER seconds.
    """

    @inlineCallbacks
    def test_from_the_work_done(self):
        workers = BodyWorkers(cast(Any, reactor), size=1, queue=10, per_holder=10)
        self.addCleanup(workers.stop)
        self.assertEqual(workers.retry_after(), 1)
        yield workers.run(lambda: time.sleep(0.3))
        # Nothing in the pool: a place is free now.
        self.assertEqual(workers.retry_after(), 1)
        go_on = threading.Event()
        self.addCleanup(go_on.set)
        done = [workers.run(lambda: go_on.wait(30)) for _ in range(8)]
        # Eight bodies of at least 0.3 s each ahead, one thread.
        self.assertGreaterEqual(workers.retry_after(), 3)
        self.assertLessEqual(workers.retry_after(), 60)
        go_on.set()
        yield gatherResults(done)
        # A failed work's count is given back as before.
        with self.assertRaises(ZeroDivisionError):
            yield workers.run(lambda: 1 // 0)
        self.assertEqual((workers.given, workers.retry_after()), (0, 1))
