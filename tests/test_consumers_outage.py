"""
The consumers' database unreachable: at start-up (the gateway retries with
back-off until it answers, then loads the consumers) and at stop (a
PostgreSQL that accepts connections and never answers must not keep the
process from exiting).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import openai
import psycopg
from psycopg.conninfo import conninfo_to_dict
from twisted.application.internet import backoffPolicy
from twisted.enterprise import adbapi
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, fail, gatherResults, inlineCallbacks, succeed
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from openclaw.consumers.store import (
    POSTGRES_DEFAULTS,
    RETRY_MAX_SECONDS,
    ConsumerStore,
    Retrying,
    StoreNotStarted,
    database_advice,
    postgres_conninfo,
)
from tests.postgres_server import PostgresServer
from tests.support import (
    GatewayProcess,
    capture_log_events,
    free_port,
    open_client,
    start_gateway,
    start_upstream,
    twistd_path,
)

KIMI_KEY = "sk-kimi-outage-test-key-0123456789"
GEMINI_KEY = "AIza-gemini-outage-test-key-0123456789"
GATEWAY_KEY = "gw-key-outage-test-0123456789"
SECRET = "outage-secret-outage-secret-outage-secret-42"


def silent_postgres(testcase: TestCase) -> int:
    """
    A loopback port that takes TCP connections (the kernel completes the
    handshake) and never answers a byte: a PostgreSQL hung, or behind a
    firewall that drops its replies.  Closed when the test ends.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    testcase.addCleanup(listener.close)
    port: int = listener.getsockname()[1]
    return port


@inlineCallbacks
def wait_for(predicate: Any, limit: float) -> Any:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit} s")
        yield task.deferLater(reactor, 0.1, lambda: None)


class ConnectionParametersTests(TestCase):
    timeout = 60

    def test_defaults_unless_the_url_sets_them(self) -> None:
        """
        A connection attempt gives up and a silent peer is detected,
        unless DATABASE_URL says otherwise.
        """
        parameters = conninfo_to_dict(postgres_conninfo("postgresql://u:p@db.example:5433/openclaw"))
        for name, value in POSTGRES_DEFAULTS.items():
            self.assertEqual(parameters[name], value)
        self.assertEqual(
            (parameters["host"], parameters["port"], parameters["dbname"]), ("db.example", "5433", "openclaw")
        )
        own = conninfo_to_dict(postgres_conninfo("postgresql://u@db.example/x?connect_timeout=3&keepalives_idle=5"))
        self.assertEqual((own["connect_timeout"], own["keepalives_idle"]), ("3", "5"))
        self.assertEqual(own["keepalives"], "1")

    @inlineCallbacks
    def test_silent_database_fails_within_connect_timeout(self) -> Any:
        """
        The store on a PostgreSQL that never answers: its migration fails
        within the default connect_timeout (10 s), instead of holding a
        pool thread for ever; the store then closes at once.
        """
        port = silent_postgres(self)
        store = ConsumerStore.open(f"postgresql://postgres@127.0.0.1:{port}/postgres", Path(self.mktemp()), reactor)
        started = time.monotonic()
        with self.assertRaises(psycopg.OperationalError):
            yield store.migrate()
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, float(POSTGRES_DEFAULTS["connect_timeout"]) + 4)
        closed = yield store.close(5.0)
        self.assertTrue(closed)

    @inlineCallbacks
    def test_close_does_not_wait_for_a_blocked_thread(self) -> Any:
        """
        A pool thread blocked connecting (here for up to 60 s): close()
        neither blocks the reactor thread nor waits past its timeout, and
        the reactor's shutdown trigger no longer joins the pool's threads.
        """
        port = silent_postgres(self)
        store = ConsumerStore.open(
            f"postgresql://postgres@127.0.0.1:{port}/postgres?connect_timeout=60", Path(self.mktemp()), reactor
        )
        migrating = store.migrate()
        migrating.addErrback(lambda failure: None)
        yield task.deferLater(reactor, 0.5, lambda: None)
        started = time.monotonic()
        closing = store.close(1.0)
        # Returned without joining the blocked thread on this thread.
        self.assertLess(time.monotonic() - started, 0.5)
        closed = yield closing
        self.assertFalse(closed)
        self.assertLess(time.monotonic() - started, 3.0)
        self.assertIsNone(store.pool.shutdownID)
        self.assertTrue(all(thread.daemon for thread in store.pool.threadpool.threads))


class CountingPool(adbapi.ConnectionPool):
    """
    A SQLite pool that counts its L{finalClose} calls.
    """

    final_closes = 0

    def finalClose(self) -> None:
        self.final_closes += 1
        super().finalClose()


class CloseTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_second_close_shares_the_first(self) -> Any:
        """
        close() called again while the first is under way closes nothing
        more (adbapi's finalClose runs once): both calls fire with the
        first's result, and one made after it too.
        """
        state = Path(self.mktemp())
        state.mkdir()
        pool = CountingPool(
            "sqlite3", str(state / "openclaw.db"), check_same_thread=False, cp_min=1, cp_max=1, cp_reactor=reactor
        )
        store = ConsumerStore(pool, "sqlite", reactor)
        yield store.migrate()
        first = store.close(5.0)
        second = store.close(5.0)
        closed = yield gatherResults([first, second])
        self.assertEqual(closed, [True, True])
        self.assertEqual(pool.final_closes, 1)
        again = yield store.close(5.0)
        self.assertTrue(again)
        self.assertEqual(pool.final_closes, 1)


class NotStartedTests(TestCase):
    """
    A store opened with C{start=False} (the gateway's) makes nothing until
    L{ConsumerStore.start} (task s31).
    """

    def open(self) -> ConsumerStore:
        state = Path(self.mktemp())
        state.mkdir()
        return ConsumerStore.open(None, state, reactor, check_file=False, start=False)

    def test_used_before_start(self) -> None:
        """
        Used before it is started, it fails (a Deferred's failure, not an
        exception), and its pool is not there.
        """
        store = self.open()
        self.assertFalse(store.started)
        self.failureResultOf(store.migrate(), StoreNotStarted)
        with self.assertRaises(StoreNotStarted):
            getattr(store, "pool")  # noqa: B009 (a property read for its exception)

    def test_closed_before_start(self) -> None:
        """
        Closed before it was started: nothing to close (C{True} at once),
        and it is not started after.
        """
        store = self.open()
        self.assertTrue(self.successResultOf(store.close(5.0)))
        with self.assertRaises(StoreNotStarted):
            store.start()
        self.assertFalse(store.started)

    @inlineCallbacks
    def test_started(self) -> Any:
        """
        Started (again: nothing more), it is used and closed as one opened
        started.
        """
        store = self.open()
        store.start()
        pool = store.pool
        store.start()
        self.assertIs(store.pool, pool)
        version = yield store.migrate()
        self.assertGreater(version, 0)
        closed = yield store.close(5.0)
        self.assertTrue(closed)


class RetryingTests(TestCase):
    def test_back_off_doubles_up_to_the_cap(self) -> None:
        """
        Failed attempts are tried again after 1, 2, 4 ... s, at most
        RETRY_MAX_SECONDS (plus up to 1 s of jitter); the success reports
        how many failed before it; stop() cancels the wait.
        """
        clock = task.Clock()
        outcomes: list[Failure | str] = [Failure(OSError("refused"))] * 7 + ["loaded"]
        attempts: list[float] = []
        failures: list[tuple[int, float]] = []
        successes: list[tuple[str, int]] = []

        def attempt() -> Deferred[str]:
            attempts.append(clock.seconds())
            outcome = outcomes.pop(0)
            if isinstance(outcome, str):
                return succeed(outcome)
            return fail(outcome)

        retrying = Retrying(
            attempt,
            clock,
            lambda reason, count, delay: failures.append((count, delay)),
            lambda result, count: successes.append((result, count)),
            policy=backoffPolicy(1.0, RETRY_MAX_SECONDS, factor=2.0, jitter=lambda: 0.0),
        )
        retrying.start()
        clock.pump([0.5] * 200)
        self.assertEqual([delay for _, delay in failures], [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0])
        self.assertEqual([count for count, _ in failures], [1, 2, 3, 4, 5, 6, 7])
        self.assertEqual(attempts, [0.0, 1.0, 3.0, 7.0, 15.0, 31.0, 61.0, 91.0])
        self.assertEqual(successes, [("loaded", 7)])
        self.assertEqual(self.successResultOf(retrying.done), "loaded")

        default = Retrying(attempt, clock, lambda *a: None, lambda *a: None)
        for number, low in enumerate([1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]):
            self.assertTrue(low <= default.policy(number) < low + 1.0)

    def test_stop_cancels_the_wait_and_the_attempt(self) -> None:
        clock = task.Clock()
        pending: list[Deferred[None]] = []
        failures: list[int] = []

        def attempt() -> Deferred[None]:
            if not pending:
                pending.append(Deferred())
                return fail(Failure(OSError("refused")))
            pending.append(Deferred())
            return pending[-1]

        retrying = Retrying(attempt, clock, lambda reason, count, delay: failures.append(count), lambda *a: None)
        retrying.start()
        self.assertEqual(failures, [1])
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        retrying.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
        # Stopped during an attempt: it is cancelled, and no retry follows.
        again = Retrying(attempt, clock, lambda reason, count, delay: failures.append(count), lambda *a: None)
        again.start()
        again.stop()
        self.assertTrue(pending[-1].called)  # cancelled
        self.assertEqual((failures, clock.getDelayedCalls()), ([1], []))
        self.assertNoResult(again.done)


class DatabaseLaterTests(TestCase):
    """
    The gateway started while its PostgreSQL is down loads the consumers
    once it is up, without a restart.
    """

    timeout = 120

    @inlineCallbacks
    def test_consumers_load_once_the_database_is_up(self) -> Any:
        server = PostgresServer()
        self.addCleanup(deferToThread, server.stop)
        events = capture_log_events(self)
        gateway = start_gateway(self, database_url=server.url)
        yield gateway.service.consumers_ready
        self.assertFalse(gateway.service.consumers.loaded)
        client = yield open_client(self, gateway.port)
        answer = yield client.command(gateway.token, "consumer_list")
        self.assertFalse(answer["ok"])
        self.assertIn("not loaded yet", answer["error"])
        yield task.deferLater(reactor, 2.0, lambda: None)
        yield deferToThread(server.start)
        started = time.monotonic()
        # The back-off's wait is 30 s at most (plus 1 of jitter).
        yield wait_for(lambda: gateway.service.consumers.loaded, RETRY_MAX_SECONDS + 10)
        self.assertLess(time.monotonic() - started, RETRY_MAX_SECONDS + 5)
        answer = yield client.command(gateway.token, "consumer_create", {"name": "late"})
        self.assertTrue(answer["ok"], answer)
        answer = yield client.command(gateway.token, "consumer_list")
        self.assertEqual([c["name"] for c in answer["result"]["consumers"]], ["late"])
        # The outage's one log line: critical, with the reason, on one line
        # (PostgreSQL down is no fault of ours: no traceback).
        [said] = [e for e in events if "cannot be used" in e.get("log_format", "")]
        self.assertEqual(said["log_level"], LogLevel.critical)
        self.assertNotIn("log_failure", said)
        self.assertIn("Connection refused", formatEvent(said))
        self.assertNotIn("\n", formatEvent(said))
        # Both name the database as DATABASE_URL does (consumers trial
        # s42: an instance pointed at another database by a typo said
        # "DATABASE_URL" only), its password masked.
        [loaded] = [e for e in events if "at schema version" in e.get("log_format", "")]
        for line in (said, loaded):
            self.assertIn(f"consumers' database {server.url} (DATABASE_URL)", formatEvent(line))
        self.assertEqual(self.flushLoggedErrors(), [])


class WrongDatabaseTests(TestCase):
    """
    A DATABASE_URL naming a database PostgreSQL does not have is said so,
    with what to do, rather than "check that PostgreSQL is running"
    (consumers trial s42: its advice was that of a server away, and
    waiting never helps); the user and password likewise.
    """

    timeout = 120

    @inlineCallbacks
    def test_missing_database(self) -> Any:
        server = PostgresServer()
        self.addCleanup(deferToThread, server.stop)
        yield deferToThread(server.start)
        events = capture_log_events(self)
        url = server.url.rsplit("/", 1)[0] + "/openclaw2"
        gateway = start_gateway(self, database_url=url)
        yield gateway.service.consumers_ready
        self.assertFalse(gateway.service.consumers.loaded)
        [said] = [e for e in events if "cannot be used" in e.get("log_format", "")]
        line = formatEvent(said)
        self.assertIn("check the database name in DATABASE_URL (or create it: createdb NAME)", line)
        self.assertIn(f"consumers' database {url} (DATABASE_URL)", line)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_credentials_advice(self) -> None:
        for said in ('password authentication failed for user "openclaw"', "fe_sendauth: no password supplied"):
            advice = database_advice(Failure(psycopg.OperationalError(said)))
            self.assertIn("check the user name and password in DATABASE_URL", advice)
            self.assertIn("%40", advice)


class StopWithSilentDatabaseTests(TestCase):
    """
    A real C{twistd -n openclaw} whose DATABASE_URL names a PostgreSQL that
    accepts and never answers, with usage rows waiting to be written.
    """

    timeout = 90

    @inlineCallbacks
    def test_sigterm_exits_within_the_grace(self) -> Any:
        upstream = start_upstream(self, KIMI_KEY, GEMINI_KEY)
        database = silent_postgres(self)
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        pidfile = directory / "gw.pid"
        port, api_port = free_port(), free_port()
        grace = 2.0
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "JWT_SECRET": SECRET,
            "KIMI_API_KEY": KIMI_KEY,
            "GEMINI_API_KEY": GEMINI_KEY,
            "KIMI_BASE_URL": upstream.base_url("kimi"),
            "GEMINI_BASE_URL": upstream.base_url("gemini"),
            "GATEWAY_API_KEYS": GATEWAY_KEY,
            "STATE_DIR": str(directory),
            "SHUTDOWN_GRACE_SECONDS": str(grace),
            # Each connection attempt waits a minute: longer than the test.
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{database}/postgres?connect_timeout=60",
        }
        process = GatewayProcess()
        twistd = twistd_path()
        args = [twistd, "-n", "--pidfile", str(pidfile), "openclaw", "--port", str(port)]
        args += ["--api-port", str(api_port), "--interface", "127.0.0.1"]
        reactor.spawnProcess(process, twistd, args, env=environment, path=str(directory))
        self.addCleanup(self._kill, process)
        yield process.token
        self.assertTrue(pidfile.exists())
        # A call with a gateway key: its usage row waits for the database.
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=10)
        self.addCleanup(deferToThread, sdk.close)
        yield deferToThread(
            sdk.chat.completions.create, model="kimi/moonshot-v1-8k", messages=[{"role": "user", "content": "hi"}]
        )
        yield task.deferLater(reactor, 1.5, lambda: None)
        started = time.monotonic()
        process.transport.signalProcess("TERM")
        ended: list[int] = []
        process.ended.addCallback(ended.append)
        limit = grace + 8.0
        yield wait_for(lambda: bool(ended), limit)
        self.assertLess(time.monotonic() - started, limit)
        self.assertIn(ended[0], (0, -15))
        self.assertFalse(pidfile.exists())
        said = process.stdout.decode()
        self.assertIn(
            "usage rows at stop (the database did not answer by the end of the shutdown grace); given up", said
        )
        self.assertIn("left to end with the process", said)

    @staticmethod
    def _kill(process: GatewayProcess) -> Deferred[int]:
        if not process.ended.called:
            process.transport.signalProcess("KILL")
        return process.ended
