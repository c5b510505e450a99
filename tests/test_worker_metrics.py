"""
C{/metrics} under C{--workers}, in one process (L{openclaw.cluster.scrape}):
each worker's own series on its private UNIX socket, every worker's in a
scrape, labelled C{worker}; a sibling that does not answer is left out,
counted and logged, the scrape answered all the same.  (The real
C{twistd --workers 2}: L{tests.test_cluster.Workers}.)
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.defer import fail, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from openclaw.cluster.scrape import (
    FAILURE_LOG_SECONDS,
    MAX_SOCKET_PATH_BYTES,
    OwnMetrics,
    PrivateSocketEndpoint,
    PrivateSocketWatch,
    WorkersExposition,
    WorkerSockets,
    decode_families,
    encode_families,
    ensure_socket_directory,
    make_socket_directory,
    remove_empty_directory,
    remove_socket_directory,
    socket_directory_problem,
)
from openclaw.dataplane.metrics_site import MetricsRoot, MetricsSite
from openclaw.providers.fetch import read_body
from openclaw.service import GatewayService, ListeningService
from openclaw.settings import ConfigError, Settings
from tests.support import SECRET, RecordingEndpoint, capture_log_events, exchange

KEY = "gw-key-0123456789abcdef"


def series(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """
    Every sample of an exposition, read with C{prometheus_client}'s own
    parser (which refuses what Prometheus would), by name and labels;
    a family given twice fails the test's assertion.
    """
    found = list(text_string_to_metric_families(text))
    twice = [name for name, count in collections.Counter(family.name for family in found).items() if count > 1]
    assert not twice, f"families given twice (Prometheus refuses the scrape): {twice}"
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value for family in found for sample in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return series(text).get((name, frozenset(labels.items())))


def own_series(encoded: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """
    Every sample of a worker's own families as its private socket gives
    them (JSON: L{encode_families}), by name and labels.
    """
    return {
        (name, frozenset(labels.items())): float(number)
        for _, _, _, _, samples in json.loads(encoded)
        for name, labels, number, _ in samples
    }


def socket_directory(testcase: Any, count: int) -> WorkerSockets:
    sockets = make_socket_directory(count)
    testcase.addCleanup(remove_socket_directory, sockets)
    return sockets


def serve_own(testcase: Any, registry: CollectorRegistry, path: Path) -> Any:
    """
    A worker's private socket at C{path}, serving C{registry}.
    """
    site = MetricsSite(MetricsRoot(OwnMetrics(registry)), 5.0, 16, reactor)
    listening = PrivateSocketEndpoint(reactor, path).listen(site)
    listening.addCallback(lambda port: testcase.addCleanup(port.stopListening))
    return listening


class _Silent(Protocol):
    """
    Takes a connection and never answers (a worker stuck on a long task).
    """

    def connectionMade(self) -> None:
        self.factory.held.append(self.transport)


def serve_nothing(testcase: Any, path: Path) -> Any:
    factory = Factory.forProtocol(_Silent)
    factory.held = []

    def listened(port: Any) -> None:
        testcase.addCleanup(port.stopListening)
        testcase.addCleanup(lambda: [transport.abortConnection() for transport in factory.held])

    return UNIXServerEndpoint(reactor, str(path)).listen(factory).addCallback(listened)


@inlineCallbacks
def get_over(path: Path, uri: bytes = b"http://localhost/metrics") -> Any:
    """
    GET C{uri} over the UNIX socket at C{path}: the answer's status and text.
    """
    from twisted.internet.endpoints import UNIXClientEndpoint

    class Endpoints:
        def endpointForURI(self, uri: Any) -> Any:
            return UNIXClientEndpoint(reactor, str(path))

    agent = Agent.usingEndpointFactory(reactor, Endpoints(), HTTPConnectionPool(reactor, persistent=False))
    response = yield agent.request(b"GET", uri)
    body = yield read_body(response)
    return response.code, body.decode()


class ExpositionTests(TestCase):
    """
    L{WorkersExposition}: worker 0's answer, its siblings served on real
    UNIX sockets.
    """

    timeout = 30

    def registry(self, calls: float) -> CollectorRegistry:
        registry = CollectorRegistry()
        counter = Counter("demo_calls", "Calls, by status", ["status"], registry=registry)
        counter.labels("200").inc(calls)
        # A label value holding what the text format quotes and escapes.
        counter.labels('odd}"\\\nvalue').inc()
        Gauge("demo_open", "Open connections", registry=registry).set(calls * 10)
        return registry

    @inlineCallbacks
    def test_sibling_not_answering_is_left_out(self):
        """
        Worker 2 takes the connection and never answers: each scrape
        answers within the bound with workers 0 and 1, counts the miss
        (C{openclaw_worker_scrape_failures_total{sibling="2"}}, in worker
        0's own series) and says how many workers it holds; the miss is
        logged once, not at every scrape.
        """
        sockets = socket_directory(self, 3)
        own = self.registry(3)
        yield serve_own(self, self.registry(5), sockets.path(1))
        yield serve_nothing(self, sockets.path(2))
        events = capture_log_events(self)
        exposition = WorkersExposition(reactor, own, sockets, 0, timeout=0.5)
        texts = []
        for _ in range(2):
            began = time.monotonic()
            body = yield exposition.exposition()
            self.assertLess(time.monotonic() - began, 2.0)
            texts.append(body.decode())
        for scrape, text in enumerate(texts, start=1):
            self.assertEqual(value(text, "demo_calls_total", status="200", worker="0"), 3.0)
            self.assertEqual(value(text, "demo_calls_total", status="200", worker="1"), 5.0)
            self.assertEqual(value(text, "demo_calls_total", status='odd}"\\\nvalue', worker="1"), 1.0)
            self.assertEqual(value(text, "demo_open", worker="1"), 50.0)
            self.assertNotIn('worker="2"', text)
            self.assertEqual(value(text, "openclaw_workers_scraped"), 2.0)
            self.assertEqual(value(text, "openclaw_workers"), 3.0)
            self.assertEqual(
                value(text, "openclaw_worker_scrape_failures_total", sibling="2", worker="0"), float(scrape)
            )
            self.assertEqual(value(text, "openclaw_worker_scrape_failures_total", sibling="1", worker="0"), 0.0)
            # Every series but the two about the scrape carries its worker.
            unlabelled = {name for name, labels in series(text) if "worker" not in dict(labels)}
            self.assertEqual(unlabelled, {"openclaw_workers_scraped", "openclaw_workers"})
        warnings = [event for event in events if event.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertEqual(warnings[0]["sibling"], 2)
        self.assertEqual(warnings[0]["error"], "no answer in time")
        self.assertIn("at most once a minute per worker", warnings[0]["log_format"])

    @inlineCallbacks
    def test_sibling_without_socket(self):
        """
        A sibling not listening (starting, or killed and not started again
        yet): left out at once, counted; logged again only once
        L{FAILURE_LOG_SECONDS} have passed.
        """
        from twisted.internet.task import Clock

        sockets = socket_directory(self, 2)
        events = capture_log_events(self)

        class Reactor:
            """The real reactor's sockets, a clock of the test's."""

            def __init__(self) -> None:
                self.clock = Clock()

            def __getattr__(self, name: str) -> Any:
                return getattr(self.clock if name in ("seconds", "callLater") else reactor, name)

        clocked = Reactor()
        exposition = WorkersExposition(clocked, self.registry(1), sockets, 1)
        for step in (0.0, FAILURE_LOG_SECONDS - 1, 1.0):
            clocked.clock.advance(step)
            text = (yield exposition.exposition()).decode()
            self.assertEqual(value(text, "demo_calls_total", status="200", worker="1"), 1.0)
            self.assertNotIn('worker="0"', text)
            self.assertEqual(value(text, "openclaw_workers_scraped"), 1.0)
        self.assertEqual(value(text, "openclaw_worker_scrape_failures_total", sibling="0", worker="1"), 3.0)
        warnings = [event for event in events if event.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn("No such file or directory", warnings[0]["error"])

    @inlineCallbacks
    def test_sibling_of_odd_families_is_left_out(self):
        """
        A sibling answering families prometheus_client could not write (a
        label value that is a number: a sibling of another version, or a
        bug) is left out of the scrape, counted and logged, as one that
        does not answer; the scrape holds the others' series (the whole
        exposition failed: a 500 for every scrape).
        """
        sockets = socket_directory(self, 3)
        yield serve_own(self, self.registry(5), sockets.path(1))

        class Odd(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                return b'[["demo_odd", "Odd", "gauge", "", [["demo_odd", {"label": 1}, 1, null]]]]'

        listening = yield UNIXServerEndpoint(reactor, str(sockets.path(2))).listen(Site(Odd()))
        self.addCleanup(listening.stopListening)
        events = capture_log_events(self)
        exposition = WorkersExposition(reactor, self.registry(3), sockets, 0)
        text = (yield exposition.exposition()).decode()
        self.assertEqual(value(text, "demo_calls_total", status="200", worker="1"), 5.0)
        self.assertNotIn("demo_odd", text)
        self.assertEqual(value(text, "openclaw_workers_scraped"), 2.0)
        self.assertEqual(value(text, "openclaw_worker_scrape_failures_total", sibling="2", worker="0"), 1.0)
        warnings = [event for event in events if event.get("log_level") == LogLevel.warn]
        self.assertEqual([event["sibling"] for event in warnings], [2])
        self.assertEqual(warnings[0]["error"], "not a worker's metric families: 1 is not a string")

    @inlineCallbacks
    def test_concurrent_scrapes_share_one_read(self):
        """
        Scrapes that come together share one read of each sibling: 40 at
        once (a private socket takes 16 connections at a time) all hold
        the sibling's series (re-attack s28: up to 44 of 300 lacked it).
        """
        sockets = socket_directory(self, 2)
        yield serve_own(self, self.registry(2), sockets.path(1))
        exposition = WorkersExposition(reactor, self.registry(1), sockets, 0)
        texts = yield gatherResults([exposition.exposition() for _ in range(40)])
        for text in texts:
            text = text.decode()
            self.assertEqual(value(text, "openclaw_workers_scraped"), 2.0)
            self.assertEqual(value(text, "demo_calls_total", status="200", worker="1"), 2.0)
        # And the next scrape reads again.
        text = yield exposition.exposition()
        self.assertEqual(value(text.decode(), "demo_calls_total", status="200", worker="1"), 2.0)

    def test_read_ended_at_once(self):
        """
        A read of the siblings that ends at once (none to read) answers
        the scrape with the worker's own series, and the next one too
        (review s34: the scrape was added to a list already cleared).
        """
        sockets = socket_directory(self, 1)
        exposition = WorkersExposition(reactor, self.registry(1), sockets, 0)
        for _ in range(2):
            text = self.successResultOf(exposition.exposition()).decode()
            self.assertEqual(value(text, "demo_calls_total", status="200", worker="0"), 1.0)
            self.assertEqual(value(text, "openclaw_workers_scraped"), 1.0)

    @inlineCallbacks
    def test_private_socket_serves_its_own_series(self):
        """
        The private socket answers with its worker's series only, as a
        single gateway's /metrics does: no C{worker} label, no sibling
        asked.
        """
        sockets = socket_directory(self, 2)
        yield serve_own(self, self.registry(2), sockets.path(0))
        code, text = yield get_over(sockets.path(0))
        self.assertEqual(code, 200)
        own = own_series(text)
        self.assertEqual(own[("demo_calls_total", frozenset({("status", "200")}))], 2.0)
        self.assertFalse([labels for _, labels in own if "worker" in dict(labels)])
        self.assertEqual(stat.S_IMODE(os.stat(sockets.path(0)).st_mode), 0o600)


class GatewayWorkerTests(TestCase):
    """
    A gateway service built as worker 0 of 2 (C{worker_sockets}), its
    sibling a second service in this process as worker 1.
    """

    timeout = 30

    def worker(self, sockets: WorkerSockets, index: int) -> tuple[GatewayService, int]:
        state_dir = Path(self.mktemp())
        state_dir.mkdir(parents=True)
        settings = Settings(
            jwt_secret=SECRET, jwt_secret_is_ephemeral=False, state_dir=state_dir, gateway_api_keys=(KEY,)
        )
        api = RecordingEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
        service = GatewayService(
            settings,
            reactor,
            RecordingEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")),
            stdout=io.StringIO(),
            api_endpoint=api,
            worker=index,
            worker_sockets=sockets,
        )
        service.startService()
        self.addCleanup(service.stopService)
        assert api.port is not None
        return service, api.port.getHost().port

    @inlineCallbacks
    def test_scrape_holds_both_workers(self):
        from twisted.internet.threads import deferToThread

        sockets = socket_directory(self, 2)
        zero, port = self.worker(sockets, 0)
        one, _ = self.worker(sockets, 1)
        zero.metrics.api_requests.record("kimi", 200, 0.1)
        one.metrics.api_requests.record("kimi", 200, 0.1)
        one.metrics.api_requests.record("kimi", 200, 0.1)
        request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        answer = yield deferToThread(exchange, port, request)
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(b"Content-Type: text/plain; version=", head)
        text = body.decode()
        for worker, calls in (("0", 1.0), ("1", 2.0)):
            self.assertEqual(
                value(text, "openclaw_api_requests_total", provider="kimi", status="200", worker=worker), calls
            )
        self.assertEqual(value(text, "openclaw_workers_scraped"), 2.0)
        # HEAD: the length of the answer, no body.
        answer = yield deferToThread(exchange, port, b"HEAD" + request[3:])
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual(body, b"")
        self.assertRegex(head, rb"Content-Length: [1-9]\d+")
        # The access rules of /metrics stand: a web page's request is refused.
        answer = yield deferToThread(exchange, port, request.replace(b"\r\n\r\n", b"\r\nOrigin: http://x\r\n\r\n"))
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 "), answer[:200])
        self.assertNotIn(b"openclaw_", answer)
        # Worker 1's private socket: its own series, without the label.
        code, text = yield get_over(sockets.path(1))
        self.assertEqual(code, 200)
        own = own_series(text)
        self.assertEqual(
            own[("openclaw_api_requests_total", frozenset({("provider", "kimi"), ("status", "200")}))], 2.0
        )
        self.assertFalse([labels for _, labels in own if "worker" in dict(labels)])
        self.assertFalse([name for name, _ in own if name.startswith("openclaw_workers")])

    @inlineCallbacks
    def test_own_series_failing(self):
        """
        A collector of a worker failing (a bug: no sibling's doing): a
        scrape that reaches that worker is a plain 500 saying where to
        look, logged with its traceback; one that reaches its sibling
        leaves it out (its socket answered 500), counted.  Both serve on:
        the next scrapes, the collector mended, hold both workers' series.
        """
        from twisted.internet.threads import deferToThread

        class Failing:
            failing = True

            def describe(self) -> list[Any]:
                return []

            def collect(self) -> list[Any]:
                if self.failing:
                    raise RuntimeError("a collector's bug")
                return []

        sockets = socket_directory(self, 2)
        zero, zero_port = self.worker(sockets, 0)
        one, one_port = self.worker(sockets, 1)
        failing = Failing()
        zero.metrics.registry.register(failing)
        events = capture_log_events(self)
        request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        answer = yield deferToThread(exchange, zero_port, request)
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 500 "), head)
        self.assertIn(b"Content-Type: text/plain; charset=utf-8", head)
        self.assertIn(b"\r\nthe workers' metrics could not be gathered: see the gateway's log\n\r\n", body)
        failures = [event for event in events if event.get("log_failure") is not None]
        self.assertEqual([event["log_format"] for event in failures], ["could not gather the workers' metrics"])
        self.assertTrue(failures[0]["log_failure"].check(RuntimeError))
        answer = yield deferToThread(exchange, one_port, request)
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual(value(body.decode(), "openclaw_workers_scraped"), 1.0)
        self.assertEqual(value(body.decode(), "openclaw_worker_scrape_failures_total", sibling="0", worker="1"), 1.0)
        failing.failing = False
        for port in (zero_port, one_port):
            answer = yield deferToThread(exchange, port, request)
            head, _, body = answer.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
            self.assertEqual(value(body.decode(), "openclaw_workers_scraped"), 2.0)
        # Logged: by worker 0's scrape and its private socket's answer.
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    @inlineCallbacks
    def test_single_process_unchanged(self):
        """
        Without C{worker_sockets}: no C{worker} label, no scrape counters.
        """
        from tests.support import get_text, start_gateway

        gateway = start_gateway(self, api=True, gateway_api_keys=(KEY,))
        text = yield get_text(gateway.api_port, "/metrics")
        self.assertRegex(text, r"(?m)^openclaw_api_connections \d")
        self.assertNotIn("worker", text)


class SocketFileTests(SynchronousTestCase):
    def test_directory_is_private(self):
        sockets = make_socket_directory(4)
        self.addCleanup(remove_socket_directory, sockets)
        self.assertEqual(stat.S_IMODE(os.stat(sockets.directory).st_mode), 0o700)
        self.assertIsNone(socket_directory_problem(sockets.directory))
        self.assertEqual(sockets.path(3), sockets.directory / "3.sock")
        other = make_socket_directory(4)
        self.addCleanup(remove_socket_directory, other)
        self.assertNotEqual(other.directory, sockets.directory)

    def test_directory_others_may_use_is_refused(self):
        directory = Path(self.mktemp())
        directory.mkdir(mode=0o755)
        directory.chmod(0o755)
        self.assertEqual(socket_directory_problem(directory), "others than its owner may use it (mode 0755)")
        self.assertEqual(socket_directory_problem(directory / "none"), "No such file or directory")

    def test_parent_others_may_write_is_refused(self):
        """
        The directory is not made where another user could rename it away
        and put their own in its place (a worker reads its siblings by
        path): a parent others may write, unless sticky as /tmp is.
        """
        # Short: the sockets' paths must fit (MAX_SOCKET_PATH_BYTES).
        parent = Path(tempfile.mkdtemp(dir="/tmp"))
        self.addCleanup(parent.rmdir)
        parent.chmod(0o777)
        nested = parent / "sub"
        nested.mkdir(mode=0o755)
        self.addCleanup(nested.rmdir)
        # The directory it is made in, or any above it (re-attack s28: one
        # level up was not looked at).
        for where in (parent, nested):
            with self.assertRaises(ConfigError) as raised:
                make_socket_directory(2, str(where))
            self.assertIn(f"{str(parent)!r}, which group or others may write (mode 0777)", str(raised.exception))
            self.assertIn("set TMPDIR to a directory only the gateway's user may write", str(raised.exception))
            self.assertEqual(list(nested.iterdir()), [])
        self.assertEqual(list(parent.iterdir()), [nested])
        parent.chmod(0o1777)
        sockets = make_socket_directory(2, str(parent))
        self.addCleanup(remove_socket_directory, sockets)
        self.assertEqual(sockets.directory.parent, parent)

    def test_made_again_when_gone(self):
        """
        A directory a temporary-files cleaner removed is made again (mode
        0700) before a worker is started, which would refuse to start
        without it; one still there is left as it is.
        """
        sockets = make_socket_directory(2)
        self.addCleanup(remove_socket_directory, sockets)
        sockets.directory.rmdir()
        ensure_socket_directory(sockets)
        self.assertEqual(stat.S_IMODE(os.stat(sockets.directory).st_mode), 0o700)
        self.assertIsNone(socket_directory_problem(sockets.directory))
        (sockets.directory / "kept").write_text("")
        ensure_socket_directory(sockets)
        self.assertTrue((sockets.directory / "kept").exists())
        (sockets.directory / "kept").unlink()

    def test_path_too_long(self):
        parent = Path(self.mktemp()).resolve()
        deep = parent / ("d" * (MAX_SOCKET_PATH_BYTES - len(str(parent)) - 10))
        deep.mkdir(parents=True)
        with self.assertRaises(ConfigError) as raised:
            make_socket_directory(2, str(deep))
        self.assertIn("set TMPDIR to a shorter directory", str(raised.exception))
        self.assertEqual(list(deep.iterdir()), [])

    def test_removed_with_sockets_left(self):
        sockets = make_socket_directory(2)
        with socket.socket(socket.AF_UNIX) as left:
            left.bind(str(sockets.path(1)))
        remove_socket_directory(sockets)
        self.assertFalse(sockets.directory.exists())

    def test_refused_directory_left_alone(self):
        """
        A directory at the run's name that the workers refuse to listen in
        (here of another mode: put there once a cleaner removed the run's)
        is not the run's: its sockets and itself are left at stop
        (re-attack s29: they were removed).
        """
        sockets = make_socket_directory(2)
        self.addCleanup(shutil.rmtree, sockets.directory, True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left:
            left.bind(str(sockets.path(0)))
        sockets.directory.chmod(0o755)
        remove_socket_directory(sockets)
        self.assertTrue(stat.S_ISSOCK(os.lstat(sockets.path(0)).st_mode))
        os.unlink(sockets.path(0))
        remove_empty_directory(sockets)
        self.assertTrue(sockets.directory.is_dir())
        sockets.directory.chmod(0o700)
        remove_empty_directory(sockets)
        self.assertFalse(sockets.directory.exists())


class PrivateSocketTests(TestCase):
    @inlineCallbacks
    def test_stale_socket_replaced(self):
        """
        A socket left by a worker killed (never removed) does not keep the
        next one from listening; anything else at the path is left alone.
        """
        sockets = socket_directory(self, 1)
        path = sockets.path(0)
        with socket.socket(socket.AF_UNIX) as left:
            left.bind(str(path))
        yield serve_own(self, CollectorRegistry(), path)
        code, _ = yield get_over(path)
        self.assertEqual(code, 200)

        other = sockets.directory / "other.sock"
        other.write_text("not a socket")
        with self.assertRaises(CannotListenError):
            yield PrivateSocketEndpoint(reactor, other).listen(Factory.forProtocol(Protocol))
        self.assertEqual(other.read_text(), "not a socket")
        other.unlink()


class PrivateSocketWatchTests(TestCase):
    """
    L{PrivateSocketWatch}: a worker's private socket removed while it runs
    (a cleaner of the temporary directory), alone or with its directory,
    is listened on again at the next check.
    """

    timeout = 30

    @inlineCallbacks
    def until_listening(self, path: Path) -> Any:
        deadline = time.monotonic() + 5
        while not os.path.lexists(path) or not stat.S_ISSOCK(os.lstat(path).st_mode):
            self.assertLess(time.monotonic(), deadline, f"{path} not listened on again")
            yield deferLater(reactor, 0.02, lambda: None)
        code, _ = yield get_over(path)
        self.assertEqual(code, 200)

    def test_stop_never_fails(self):
        """
        A stop of the listener that fails (its socket file removed as it
        closed) is logged, and the watch's stop succeeds: its parent, a
        MultiService, does not consume its children's failures (an
        "Unhandled error in Deferred" at garbage collection: review s30).
        """
        sockets = socket_directory(self, 2)

        class Failing(Service):
            def stopService(self) -> Any:
                super().stopService()
                return fail(OSError("the socket file has gone"))

        listening = Failing()
        watch = PrivateSocketWatch(reactor, sockets, 1, listening, interval=60)
        events = capture_log_events(self)
        self.assertIsNone(self.successResultOf(watch.stopService()))
        self.assertIn("the socket file has gone", " ".join(formatEvent(e) for e in events))

    @inlineCallbacks
    def test_listened_on_again(self):
        sockets = socket_directory(self, 2)
        path = sockets.path(1)
        site = MetricsSite(MetricsRoot(OwnMetrics(CollectorRegistry())), 5.0, 16, reactor)
        listening = ListeningService(PrivateSocketEndpoint(reactor, path), site)
        # The watch listens (the worker's service starts no other way).
        watch = PrivateSocketWatch(reactor, sockets, 1, listening, interval=0.05)
        watch.startService()
        self.addCleanup(watch.stopService)
        yield self.until_listening(path)
        events = capture_log_events(self)

        def warnings() -> list[str]:
            return [formatEvent(event) for event in events if event.get("log_level") == LogLevel.warn]

        # The whole directory removed: made again (0700), the socket 0600.
        shutil.rmtree(sockets.directory)
        yield self.until_listening(path)
        self.assertEqual(stat.S_IMODE(os.stat(sockets.directory).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.lstat(path).st_mode), 0o600)
        self.assertEqual(len(warnings()), 1, warnings())
        self.assertIn("and its directory had gone; made the directory again (mode 0700) and listening", warnings()[0])
        # The socket alone.
        path.unlink()
        yield self.until_listening(path)
        self.assertEqual(len(warnings()), 2, warnings())
        self.assertIn(f"metrics socket {path} had gone; listening on it again", warnings()[1])
        # A directory others may use in its place: not listened in, said once.
        shutil.rmtree(sockets.directory)
        sockets.directory.mkdir()
        sockets.directory.chmod(0o755)
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(os.path.lexists(path))
        errors = [formatEvent(event) for event in events if event.get("log_level") == LogLevel.error]
        self.assertEqual(len(errors), 1, errors)
        self.assertIn(
            "its directory cannot be used (others than its owner may use it (mode 0755)); its series are missing",
            errors[0],
        )
        sockets.directory.chmod(0o700)
        yield self.until_listening(path)
        # Stopped: its socket goes, and it is not made again.
        yield watch.stopService()
        yield listening.stopService()
        self.assertFalse(os.path.lexists(path))
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertFalse(os.path.lexists(path))

    @inlineCallbacks
    def test_listened_on_again_after_a_failed_listen(self):
        """
        A listen again that fails (out of descriptors, say) leaves the
        empty file the watch put there for Twisted's port to remove, and no
        port to remove it: the next check listens all the same (review
        s29: the file stood in for the socket, and it never listened again).
        """
        sockets = socket_directory(self, 2)
        path = sockets.path(1)
        site = MetricsSite(MetricsRoot(OwnMetrics(CollectorRegistry())), 5.0, 16, reactor)
        endpoint = _FailingOnce(reactor, path)
        listening = ListeningService(endpoint, site)
        watch = PrivateSocketWatch(reactor, sockets, 1, listening, interval=0.05)
        watch.startService()
        self.addCleanup(watch.stopService)
        yield self.until_listening(path)
        capture_log_events(self)
        endpoint.failures = 1
        path.unlink()
        yield self.until_listening(path)
        self.assertEqual(endpoint.failures, 0)

    @inlineCallbacks
    def test_directory_unusable_at_start(self):
        """
        A worker whose metrics directory cannot be used when it starts (of
        another mode, here) starts all the same: its watch says so once
        and listens once the directory is fit, where the worker refused to
        start and, started again after a crash, ended again and again,
        serving no API call either (re-attack s29).
        """
        sockets = socket_directory(self, 2)
        sockets.directory.chmod(0o755)
        path = sockets.path(0)
        site = MetricsSite(MetricsRoot(OwnMetrics(CollectorRegistry())), 5.0, 16, reactor)
        listening = ListeningService(PrivateSocketEndpoint(reactor, path), site)
        watch = PrivateSocketWatch(reactor, sockets, 0, listening, interval=0.05)
        events = capture_log_events(self)
        watch.startService()
        self.addCleanup(watch.stopService)
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(os.path.lexists(path))
        errors = [formatEvent(event) for event in events if event.get("log_level") == LogLevel.error]
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("the worker serves on, and looks again every 0.05 s", errors[0])
        sockets.directory.chmod(0o700)
        yield self.until_listening(path)
        # Its first listen is no socket "gone": no warning.
        self.assertEqual([event for event in events if event.get("log_level") == LogLevel.warn], [])
        yield watch.stopService()
        self.assertFalse(os.path.lexists(path))

    @inlineCallbacks
    def test_predecessors_socket_replaced(self):
        """
        A worker started again after its predecessor was killed finds the
        socket that one left (not removed: killed): its watch listens in
        its place, where it took the dead socket for its own and never
        listened (review s29).
        """
        sockets = socket_directory(self, 2)
        path = sockets.path(1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
            dead.bind(str(path))
        site = MetricsSite(MetricsRoot(OwnMetrics(CollectorRegistry())), 5.0, 16, reactor)
        listening = ListeningService(PrivateSocketEndpoint(reactor, path), site)
        watch = PrivateSocketWatch(reactor, sockets, 1, listening, interval=0.05)
        capture_log_events(self)
        watch.startService()
        self.addCleanup(watch.stopService)
        yield self.until_listening(path)
        self.assertIsNotNone(listening.port)


class _FailingOnce(PrivateSocketEndpoint):
    """
    A private socket's endpoint whose next C{failures} listens fail as out
    of descriptors.
    """

    failures = 0

    def listen(self, protocolFactory: Any) -> Any:
        if self.failures:
            self.failures -= 1
            return fail(CannotListenError(None, str(self.path), OSError(24, "Too many open files")))
        return super().listen(protocolFactory)


class FamiliesTests(SynchronousTestCase):
    def test_round_trip(self):
        """
        A worker's families go to a sibling as JSON and come back as they
        were, each sample labelled with the worker, values that are not
        finite included.
        """
        registry = CollectorRegistry()
        Counter("demo_calls", "Calls", ["label"], registry=registry).labels('with "quotes" and } and \\ and \n').inc(2)
        Gauge("demo_odd", "Odd values", ["kind"], registry=registry).labels("nan").set(float("nan"))
        Gauge("demo_odd_inf", "Odd values", registry=registry).set(float("-inf"))
        rebuilt = CollectorRegistry()
        rebuilt.register(Families(decode_families(encode_families(registry), 3)))
        original = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in registry.collect()
            for sample in family.samples
        }
        found = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in rebuilt.collect()
            for sample in family.samples
        }
        self.assertEqual(len(found), len(original))
        for (name, labels), number in original.items():
            got = found[(name, tuple(sorted({**dict(labels), "worker": "3"}.items())))]
            self.assertTrue(got == number or (math.isnan(got) and math.isnan(number)), (name, got, number))

    def test_not_families(self):
        for encoded in (
            b"",
            b"{}",
            b"[1]",
            b'[["a", "b", "no such type", "", []]]',
            b'[["a", "b", "gauge", "", [["a", {}, "x", null]]]]',
            # What prometheus_client could not write (the whole scrape's
            # exposition failing): labels, names and texts that are not
            # strings, a timestamp that is not a number.
            b'[["a", "b", "gauge", "", [["a", {"l": 1}, 1, null]]]]',
            b'[["a", "b", "gauge", "", [["a", {}, 1, "x"]]]]',
            b'[["a", 5, "gauge", "", [["a", {}, 1, null]]]]',
            b'[["a", "b", "gauge", "", [[5, {}, 1, null]]]]',
            b'[["a", "b", "gauge", "", [["a", [], 1, null]]]]',
        ):
            with self.assertRaises(ValueError):
                decode_families(encoded, 0)


class Families:
    def __init__(self, families: Any) -> None:
        self.families = families

    def collect(self) -> Any:
        return self.families
