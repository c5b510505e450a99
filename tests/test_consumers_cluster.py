"""
Consumers in a cluster (#19): two C{twistd -n openclaw} instances on one
real C{redis-server} and one real PostgreSQL, the stand-in providers and
the openai SDK, all on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import attrs
import openai
import txredisapi
from psycopg.conninfo import conninfo_to_dict
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, gatherResults, inlineCallbacks, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols.portforward import ProxyFactory, ProxyServer
from twisted.trial.unittest import SkipTest, TestCase

from openclaw.cluster.node import HEARTBEAT_INTERVAL_SECONDS
from openclaw.consumers.estimate import MAX_TOKEN_COUNT
from openclaw.consumers.model import Consumer, period_key
from openclaw.consumers.shared import ANSWER_WAIT_SECONDS, SEED, UNSHARED, UNTOLD, SharedConsumers, SharedCounters
from openclaw.consumers.store import ConsumerStore
from openclaw.consumers.table import RESERVATION_SECONDS, REVOKE_RETRY_SECONDS, TOKEN_RESERVATION_SECONDS, Holder
from openclaw.dataplane.errors import APIError
from openclaw.urls import masked_url
from tests.postgres_server import Locker, postgres_database
from tests.redis_server import DelayingProxy, RedisServer
from tests.support import free_port, open_client, spawn_gateway, start_upstream
from tests.test_consumers import burst_call, http_get
from tests.test_twistd import SECRET, base_env

GATEWAY_KEY = "gw-key-0123456789abcdef"
HELLO = [{"role": "user", "content": "hi"}]
MODEL = "kimi/moonshot-v1-8k"
#: libfaketime (Debian's faketime package), to start an instance whose
#: host's clock is off.
FAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
#: One call on the stand-in costs 0.00001 USD: the budget of one call a day.
CHEAP = {"name": "cheap", "budget_usd": 0.00001, "budget_period": "day"}


def sleep(seconds: float) -> Any:
    return deferLater(reactor, seconds, lambda: None)


def redis_command(port: int, *args: str) -> bytes:
    """
    One command over RESP, with a plain socket (no client library needed):
    its raw reply.
    """
    request = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(request)
        return s.recv(65536)


def redis_get(port: int, key: str) -> bytes | None:
    """
    C{GET key}.
    """
    reply = redis_command(port, "GET", key)
    if reply.startswith(b"$-1"):
        return None
    return reply.split(b"\r\n")[1]


def redis_keys(port: int, pattern: str) -> list[str]:
    """
    C{KEYS pattern}, sorted.
    """
    lines = redis_command(port, "KEYS", pattern).split(b"\r\n")
    return sorted(line.decode() for line in lines[1:] if line and not line.startswith((b"$", b"*")))


def spend_key(port: int, name: str, period: str) -> str:
    """
    The one Redis key of consumer C{name}'s spend in C{period} (keys name
    the consumer's creation too).
    """
    [key] = redis_keys(port, f"openclaw:consumer:{name}:*:spend:{period}")
    return key


def window_total(port: int, name: str, what: str) -> int:
    """
    What consumer C{name}'s C{what} window (C{rpm}, C{tpm}) holds in Redis,
    whatever the seconds (0 without one).
    """
    keys = redis_keys(port, f"openclaw:consumer:{name}:*:{what}")
    if not keys:
        return 0
    [key] = keys
    lines = redis_command(port, "HVALS", key).split(b"\r\n")
    return sum(int(line) for line in lines[1:] if line and not line.startswith((b"$", b"*")))


class _CutProxyServer(ProxyServer):
    def connectionMade(self) -> None:
        self.factory.open.add(self)  # type: ignore[attr-defined]
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        self.factory.open.discard(self)  # type: ignore[attr-defined]
        super().connectionLost(reason)


class DatabaseLink:
    """
    A TCP relay on 127.0.0.1 to a PostgreSQL, which the test can cut (its
    connections dropped, new ones refused) and mend, on the same port.
    """

    def __init__(self, database_url: str) -> None:
        parameters = conninfo_to_dict(database_url)
        self.factory = ProxyFactory("127.0.0.1", int(parameters["port"]))
        self.factory.protocol = _CutProxyServer
        self.factory.open = set()  # type: ignore[attr-defined]
        self.port = free_port()
        self.url = database_url.replace(f":{parameters['port']}/", f":{self.port}/")
        self.listening: Any = None
        self.mend()

    def mend(self) -> None:
        self.listening = reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")

    def cut(self) -> Any:
        for server in list(self.factory.open):  # type: ignore[attr-defined]
            server.transport.abortConnection()
        stopped, self.listening = self.listening.stopListening(), None
        return stopped

    def close(self) -> Any:
        return self.cut() if self.listening is not None else None


class ConsumersOnTwoInstances(TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.redis = RedisServer()
        self.redis.start()
        self.addCleanup(self.redis.cleanup)
        self.upstream = start_upstream(self, "kimi-key", "gemini-key")
        self.database = postgres_database()

    @inlineCallbacks
    def refused_within(self, sdk: Any, seconds: float, message: str, step: float) -> Any:
        """
        Call with C{sdk} every C{step} seconds until its key is refused
        (401), failing with C{message} if that takes C{seconds} or more.
        """
        revoked = time.monotonic()
        while True:
            status = yield self.status(sdk)
            if status[0] == 401:
                return
            self.assertLess(time.monotonic() - revoked, seconds, message)
            yield sleep(step)

    @inlineCallbacks
    def two(self, *extra: dict[str, str]) -> Any:
        """
        Two instances, each with its C{extra} environment if given; fires
        with (process, token, control client, API port) for each.
        """
        env = base_env(
            JWT_SECRET=SECRET,
            REDIS_URL=self.redis.url,
            REDIS_TIMEOUT_SECONDS="0.5",
            REDIS_RECONNECT_MAX_SECONDS="0.5",
            GATEWAY_API_KEYS=GATEWAY_KEY,
            DATABASE_URL=self.database,
            **self.upstream.environment(),
        )
        instances = []
        for own in extra or ({}, {}):
            port, api_port = free_port(), free_port()
            process = spawn_gateway(
                self, ["--port", str(port), "--api-port", str(api_port), "--interface", "127.0.0.1"], {**env, **own}
            )
            token = yield process.token
            control = yield open_client(self, port)
            instances.append((process, token, control, api_port))
        for _, token, control, _ in instances:
            yield self.loaded(control, token)
        return instances

    @inlineCallbacks
    def loaded(self, control: Any, token: str) -> Any:
        """
        Wait until the instance behind C{control} has loaded its consumers
        from the database (it answers commands before that).
        """
        deadline = time.monotonic() + 20
        while True:
            answer = yield control.command(token, "consumer_list")
            if answer["ok"]:
                return
            self.assertIn("not loaded yet", str(answer), answer)
            self.assertLess(time.monotonic(), deadline, "the consumers were not loaded within 20 s")
            yield sleep(0.1)

    def sdk(self, api_port: int, key: str) -> openai.OpenAI:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key=key, max_retries=0, timeout=10)
        self.addCleanup(deferToThread, client.close)
        return client

    @inlineCallbacks
    def command(self, control: Any, token: str, cmd: str, data: Any = None) -> Any:
        answer = yield control.command(token, cmd, data)
        self.assertTrue(answer["ok"], answer)
        return answer["result"]

    @inlineCallbacks
    def status(self, sdk: openai.OpenAI) -> Any:
        try:
            yield deferToThread(sdk.chat.completions.create, model=MODEL, messages=HELLO)
        except openai.APIStatusError as e:
            return e.status_code, e.code
        return 200, None

    @inlineCallbacks
    def reaches(self, control: Any, token: str, name: str) -> Any:
        """
        Seconds until the instance behind C{control} lists consumer C{name}.
        """
        started = time.monotonic()
        while True:
            listed = yield self.command(control, token, "consumer_list")
            if name in [c["name"] for c in listed["consumers"]]:
                return time.monotonic() - started
            self.assertLess(time.monotonic() - started, 1.0, f"{name} did not reach the other instance in 1 s")
            yield sleep(0.05)

    @inlineCallbacks
    def test_limits_are_the_clusters_and_changes_reach_every_instance(self) -> Any:
        """
        10 rpm admits 10 calls in total across both instances, not 20, and
        the x-ratelimit-* headers say what is left of the cluster's minute;
        a key revoked on one is refused on the other within 1 s.
        """
        (_, token, on_a, api_a), (_, _, on_b, api_b) = yield self.two()
        created = yield self.command(on_a, token, "consumer_create", {"name": "team", "rpm": 10})
        yield self.reaches(on_b, token, "team")
        sdks = [self.sdk(api_a, created["key"]), self.sdk(api_b, created["key"])]
        for remaining, sdk in (("9", sdks[0]), ("8", sdks[1])):
            raw = yield deferToThread(sdk.chat.completions.with_raw_response.create, model=MODEL, messages=HELLO)
            self.assertEqual(
                (raw.headers["x-ratelimit-limit-requests"], raw.headers["x-ratelimit-remaining-requests"]),
                ("10", remaining),
            )
            # The cluster counts whole seconds: the call's for 61 s from
            # its second's start.
            self.assertEqual(raw.headers["x-ratelimit-reset-requests"], "1m1s")
            self.assertNotIn("x-ratelimit-limit-tokens", raw.headers)
        statuses = [(200, None)] * 2
        for i in range(18):
            status = yield self.status(sdks[i % 2])
            statuses.append(status)
        self.assertEqual(statuses.count((200, None)), 10, statuses)
        self.assertEqual(statuses.count((429, "rate_limit_exceeded")), 10, statuses)

        other = yield self.command(on_a, token, "consumer_create", {"name": "other"})
        yield self.reaches(on_b, token, "other")
        on_b_sdk = self.sdk(api_b, other["key"])
        status = yield self.status(on_b_sdk)
        self.assertEqual(status, (200, None))
        yield self.command(on_a, token, "key_revoke", {"name": "other", "key_prefix": other["key_prefix"]})
        yield self.refused_within(on_b_sdk, 1.0, "the revoked key still works on the other instance", 0.05)

    @inlineCallbacks
    def test_unsaved_revoke_refused_everywhere_and_written_by_another(self) -> Any:
        """
        A key revoked on A while the database holds the keys' table (so
        too a full disk, PostgreSQL down) is refused on B too within 1 s,
        through Redis; A stops before the database takes it; B writes it
        once the lock goes, and Redis forgets it.  B served the key until
        the database took writes again, and A's stop lost the revoke
        (left s45).
        """
        (a, token, on_a, _), (b, _, on_b, api_b) = yield self.two()
        created = yield self.command(on_a, token, "consumer_create", {"name": "team"})
        yield self.reaches(on_b, token, "team")
        on_b_sdk = self.sdk(api_b, created["key"])
        status = yield self.status(on_b_sdk)
        self.assertEqual(status, (200, None))
        locker = Locker(self, self.database)
        yield locker.lock("consumer_keys")
        revoked = yield self.command(on_a, token, "key_revoke", {"name": "team", "key_prefix": created["key_prefix"]})
        self.assertIs(revoked["saved"], False, revoked)
        self.assertIn("it is kept in Redis, where every instance reads it", revoked["warning"])
        yield self.refused_within(on_b_sdk, 1.0, "the unsaved revoke did not reach the other instance", 0.05)
        listed = yield self.command(on_b, token, "consumer_list", {"name": "team"})
        self.assertEqual(listed["consumers"][0]["revokes_unsaved"], [created["key_prefix"]])
        yield a.stop()
        self.assertIn(b"the cluster keeps it in Redis", a.stdout)
        self.assertIn(b"was revoked on another instance", b.stdout)
        yield locker.release()
        store = ConsumerStore.open(self.database, Path("."), reactor)
        self.addCleanup(store.close)
        deadline = time.monotonic() + REVOKE_RETRY_SECONDS + 3
        while True:
            snapshot = yield store.load(time.time())
            if not snapshot.keys:
                break
            self.assertLess(time.monotonic(), deadline, "the other instance did not write the revoke")
            yield sleep(0.2)
        yield sleep(0.3)
        self.assertEqual(redis_command(self.redis.port, "HLEN", "openclaw:consumers:revoking"), b":0\r\n")
        listed = yield self.command(on_b, token, "consumer_list", {"name": "team"})
        self.assertNotIn("revokes_unsaved", listed["consumers"][0])
        status = yield self.status(on_b_sdk)
        self.assertEqual(status[0], 401)

    @inlineCallbacks
    def test_instances_on_different_databases_said(self) -> Any:
        """
        An instance whose DATABASE_URL names another database: each says,
        within a heartbeat or two, that the cluster is split between
        databases, naming its own (trial s46: a cluster key refused, 401,
        by that instance, and nothing said anywhere).
        """
        other = postgres_database()
        (a, token, on_a, _), (b, _, on_b, _) = yield self.two({}, {"DATABASE_URL": other})
        words = b"other consumers' database(s)"
        deadline = time.monotonic() + 2.5 * HEARTBEAT_INTERVAL_SECONDS
        while not (words in a.stdout and words in b.stdout):
            self.assertLess(time.monotonic(), deadline, "the split was not said by both instances")
            yield sleep(0.2)
        self.assertIn(f"besides this instance's, {masked_url(self.database)} (DATABASE_URL)".encode(), a.stdout)
        self.assertIn(f"besides this instance's, {masked_url(other)} (DATABASE_URL)".encode(), b.stdout)
        self.assertIn(b"give every instance the same DATABASE_URL", a.stdout)

    @inlineCallbacks
    def test_key_revoked_while_an_instance_stood_still_refused_when_it_resumes(self) -> Any:
        """
        The second instance stopped (SIGSTOP) while a key is revoked on
        the first, and resumed 2.5 s later: a call sent to it meanwhile,
        answered once it runs again, is not served (trial s34: 200, the
        Redis message and the reload coming after the waiting requests),
        but answered 503 C{consumers_catching_up} (or 401, if the reload
        was quicker); the key is refused within 1 s, and the stall said.
        """
        (_, token, on_a, _), (b, _, on_b, api_b) = yield self.two()
        created = yield self.command(on_a, token, "consumer_create", {"name": "team"})
        yield self.reaches(on_b, token, "team")
        on_b_sdk = self.sdk(api_b, created["key"])
        status = yield self.status(on_b_sdk)
        self.assertEqual(status, (200, None))
        os.kill(b.transport.pid, signal.SIGSTOP)
        self.addCleanup(os.kill, b.transport.pid, signal.SIGCONT)
        yield self.command(on_a, token, "key_revoke", {"name": "team", "key_prefix": created["key_prefix"]})
        # Sent after the revoke's answer, waiting in B's socket.
        calling = self.status(on_b_sdk)
        yield sleep(2.5)
        os.kill(b.transport.pid, signal.SIGCONT)
        status = yield calling
        self.assertIn(status, [(503, "consumers_catching_up"), (401, "invalid_api_key")])
        yield self.refused_within(on_b_sdk, 1.0, "the revoked key still works on the resumed instance", 0.05)
        self.assertIn(b"the event loop stood still for", b.stdout)

    @inlineCallbacks
    def test_stood_still_with_its_database_away_not_ready_until_reloaded(self) -> Any:
        """
        The second instance stopped (SIGSTOP) while a key is revoked on the
        first, and its database unreachable when it resumes: its reload
        after the stall fails, so /readyz answers 503 with the reason
        (while /healthz, liveness, answers 200), and the reload is tried
        again, quietly, until the database is back: then ready again, the
        key refused (before, the reload was not tried again until the next
        change, the revoked key served there meanwhile, the instance ready
        throughout).
        """
        link = DatabaseLink(self.database)
        self.addCleanup(link.close)
        (_, token, on_a, _), (b, _, on_b, api_b) = yield self.two({}, {"DATABASE_URL": link.url})
        created = yield self.command(on_a, token, "consumer_create", {"name": "team"})
        yield self.reaches(on_b, token, "team")
        on_b_sdk = self.sdk(api_b, created["key"])
        status = yield self.status(on_b_sdk)
        self.assertEqual(status, (200, None))

        @inlineCallbacks
        def probe(path: str) -> Any:
            code, body = yield deferToThread(http_get, f"http://127.0.0.1:{api_b}{path}")
            return code, json.loads(body)

        ready = yield probe("/readyz")
        self.assertEqual(ready[0], 200, ready)
        os.kill(b.transport.pid, signal.SIGSTOP)
        self.addCleanup(os.kill, b.transport.pid, signal.SIGCONT)
        yield self.command(on_a, token, "key_revoke", {"name": "team", "key_prefix": created["key_prefix"]})
        yield link.cut()
        yield sleep(2.5)
        os.kill(b.transport.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while True:
            ready = yield probe("/readyz")
            if "could not be reloaded" in ready[1].get("reason", ""):
                break
            self.assertLess(time.monotonic(), deadline, f"not reported not ready with the reason in 10 s: {ready}")
            yield sleep(0.1)
        self.assertEqual((ready[0], ready[1]["ready"]), (503, False))
        alive = yield probe("/healthz")
        self.assertEqual(alive[0], 200, alive)
        # Some tries fail (after 1, 2 and 4 s) while the database is away.
        yield sleep(7.5)
        ready = yield probe("/readyz")
        self.assertEqual(ready[0], 503, ready)
        link.mend()
        # The next try (8 s after the last) finds it.
        deadline = time.monotonic() + 12
        while True:
            ready = yield probe("/readyz")
            if ready[0] == 200:
                break
            self.assertLess(time.monotonic(), deadline, f"not ready again in 12 s: {ready}")
            yield sleep(0.2)
        status = yield self.status(on_b_sdk)
        self.assertEqual(status, (401, "invalid_api_key"))
        # One warning of the failed reload, and one line once in step again,
        # not one per try.
        self.assertEqual(b.stdout.count(b"could not be reloaded after the event loop stood still"), 1)
        self.assertEqual(b.stdout.count(b"reloaded after the event loop stood still: in step again"), 1)

    @inlineCallbacks
    def test_silent_subscription_misses_no_consumer_change(self) -> Any:
        """
        The second instance reaches Redis through a proxy that silences its
        subscription without closing it (a NAT or firewall dropping an idle
        connection's traffic).  A key revoked on the first is refused there
        within a heartbeat (each reads the count of consumer changes), not
        accepted until the next change or a restart; the silence itself is
        noticed (its own heartbeat message never comes back on it), said,
        and the subscription made afresh, after which changes reach it at
        once again.
        """
        proxy = DelayingProxy(self.redis)
        self.addCleanup(proxy.stop)
        (_, token, on_a, _), (b, _, on_b, api_b) = yield self.two({}, {"REDIS_URL": proxy.url})
        created = yield self.command(on_a, token, "consumer_create", {"name": "team"})
        yield self.reaches(on_b, token, "team")
        on_b_sdk = self.sdk(api_b, created["key"])
        status = yield self.status(on_b_sdk)
        self.assertEqual(status, (200, None))
        subscribes = proxy.subscribes
        proxy.silence()
        yield self.command(on_a, token, "key_revoke", {"name": "team", "key_prefix": created["key_prefix"]})
        yield self.refused_within(
            on_b_sdk,
            HEARTBEAT_INTERVAL_SECONDS + 2,
            "the revoked key still works on the instance whose subscription went silent",
            0.25,
        )
        deadline = time.monotonic() + 3 * HEARTBEAT_INTERVAL_SECONDS
        while proxy.subscribes == subscribes:
            self.assertLess(time.monotonic(), deadline, "the silent subscription was not made afresh")
            yield sleep(0.25)
        self.assertIn(b"the subscription to the cluster's channel went silent without closing", b.stdout)
        yield sleep(1.0)
        yield self.command(on_a, token, "consumer_create", {"name": "later"})
        yield self.reaches(on_b, token, "later")

    @inlineCallbacks
    def test_revoked_as_redis_stops_answering(self) -> Any:
        """
        A key revoked just as Redis stops answering without closing its
        connections (frozen, as in a partition): the revocation holds on
        this instance, and its answer says the others may not have been
        told (it said nothing: they went on taking the key).
        """
        (_, token, on_a, api_a), _ = yield self.two()
        created = yield self.command(on_a, token, "consumer_create", {"name": "team"})
        assert self.redis.process is not None
        os.kill(self.redis.process.pid, signal.SIGSTOP)
        self.addCleanup(os.kill, self.redis.process.pid, signal.SIGCONT)
        revoked = yield self.command(on_a, token, "key_revoke", {"name": "team", "key_prefix": created["key_prefix"]})
        self.assertIn("restart them to apply it at once", revoked.get("warning", ""), revoked)
        status = yield self.status(self.sdk(api_a, created["key"]))
        self.assertEqual(status[0], 401)

    @inlineCallbacks
    def test_clock_off_on_one_instance(self) -> Any:
        """
        An instance whose host's clock is 25 h ahead (libfaketime) judges
        the cluster's state by Redis's clock: it adopts the operators'
        token (expired by its own clock) rather than replacing it on every
        instance, and a consumer's rpm window is the cluster's minute, not
        one of its own; its log says how far off its clock is.
        """
        if not os.path.exists(FAKETIME):
            raise SkipTest(f"libfaketime is not installed ({FAKETIME}: 'apt-get install faketime', as make test does)")
        ahead = {"LD_PRELOAD": FAKETIME, "FAKETIME": "+25h", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        (_, token, on_a, api_a), (d, token_d, on_d, api_d) = yield self.two({}, ahead)
        self.assertEqual(token_d, token)
        yield self.command(on_a, token, "ping")
        created = yield self.command(on_a, token, "consumer_create", {"name": "team", "rpm": 3})
        yield self.reaches(on_d, token, "team")
        on_a_sdk, on_d_sdk = self.sdk(api_a, created["key"]), self.sdk(api_d, created["key"])
        for _ in range(3):
            status = yield self.status(on_a_sdk)
            self.assertEqual(status, (200, None))
        status = yield self.status(on_d_sdk)
        self.assertEqual(status, (429, "rate_limit_exceeded"))
        # 25 h, within the round trip's measure (89999.9 as well as 90000.0).
        self.assertRegex(d.stdout, rb"this host's clock is (89999\.\d|9000[01]\.\d) s ahead")
        self.assertIn(b"s ahead of the cluster store's (Redis's TIME)", d.stdout)

    @inlineCallbacks
    def test_tpm_holds_against_a_parallel_burst_on_both(self) -> Any:
        """
        tpm 30, 20 parallel calls of 14 tokens shared between the two
        instances, answered after 0.5 s: the reservations are the
        cluster's, so 3 are admitted in all (0, 14, 28 < 30), not 3 per
        instance; the rest get 429 with Retry-After.
        """
        self.upstream.kimi.delay = 0.5
        (_, token, on_a, api_a), (_, _, on_b, api_b) = yield self.two()
        created = yield self.command(on_a, token, "consumer_create", {"name": "tpmc", "tpm": 30})
        yield self.reaches(on_b, token, "tpmc")
        sdks = [self.sdk(api_a, created["key"]), self.sdk(api_b, created["key"])]
        answers = yield gatherResults([deferToThread(burst_call, sdks[i % 2]) for i in range(20)])
        self.assertEqual(sorted(a[0] for a in answers), [200] * 3 + [429] * 17, answers)
        for status, code, retry_after in answers:
            if status == 429:
                self.assertEqual(code, "rate_limit_exceeded")
                self.assertTrue(1 <= int(retry_after or 0) <= 60, retry_after)

    @inlineCallbacks
    def test_spend_survives_a_redis_restart(self) -> Any:
        """
        A budget spent across both instances is still enforced after Redis
        restarts empty: the spends are re-seeded from the database.
        """
        (_, token, on_a, api_a), (_, _, on_b, api_b) = yield self.two()
        # One call costs 0.00001 USD on the stand-in: the budget takes two.
        created = yield self.command(
            on_a, token, "consumer_create", {"name": "payer", "budget_usd": 0.00002, "budget_period": "month"}
        )
        yield self.reaches(on_b, token, "payer")
        on_a_sdk, on_b_sdk = self.sdk(api_a, created["key"]), self.sdk(api_b, created["key"])
        first = yield self.status(on_a_sdk)
        second = yield self.status(on_b_sdk)
        self.assertEqual((first, second), ((200, None), (200, None)))
        key = spend_key(self.redis.port, "payer", time.strftime("%Y-%m", time.gmtime()))
        deadline = time.monotonic() + 5
        while float(redis_get(self.redis.port, key) or 0) < 0.000015:
            self.assertLess(time.monotonic(), deadline, "the second call's cost never reached Redis")
            yield sleep(0.05)
        # Either instance lists the cluster's spend, not its own share.
        for control in (on_a, on_b):
            listed = yield self.command(control, token, "consumer_list", {"name": "payer"})
            self.assertAlmostEqual(listed["consumers"][0]["spent_usd"], 0.00002, places=12)
        spent = yield self.status(on_a_sdk)
        self.assertEqual(spent, (429, "insufficient_quota"))

        before = float(redis_get(self.redis.port, key) or 0)
        self.assertGreater(before, 0.000015)
        # Spends reach the database within a second (USAGE rows' batches).
        yield sleep(1.2)
        self.redis.stop()
        yield sleep(0.3)
        self.redis.start()
        self.assertIsNone(redis_get(self.redis.port, key))
        # Both reconnect within REDIS_RECONNECT_MAX_SECONDS and one re-seeds.
        deadline = time.monotonic() + 10
        while redis_get(self.redis.port, key) is None:
            self.assertLess(time.monotonic(), deadline, "the spend was not re-seeded from the database")
            yield sleep(0.1)
        self.assertAlmostEqual(float(redis_get(self.redis.port, key) or 0), before, places=9)
        for sdk in (on_a_sdk, on_b_sdk):
            status = yield self.status(sdk)
            self.assertEqual(status, (429, "insufficient_quota"))

    @inlineCallbacks
    def test_rpm_after_redis_restarted_empty(self) -> Any:
        """
        The README's example: --rpm 10, two instances, Redis stopped: each
        admits 10 calls on its own (and refuses the 11th); Redis restarted
        empty: each adds its 10 to the cluster's window as it reconnects,
        so the next call within the minute is refused on either (it was
        admitted: the window started empty, 10 more in the minute).
        """
        (a, token, on_a, api_a), (b, _, on_b, api_b) = yield self.two()
        created = yield self.command(on_a, token, "consumer_create", {"name": "team", "rpm": 10})
        yield self.reaches(on_b, token, "team")
        sdks = [self.sdk(api_a, created["key"]), self.sdk(api_b, created["key"])]
        self.redis.stop()
        for sdk in sdks:
            for _ in range(10):
                status = yield self.status(sdk)
                self.assertEqual(status, (200, None))
            status = yield self.status(sdk)
            self.assertEqual(status, (429, "rate_limit_exceeded"))
        ups = [process.stdout.count(b"cluster store up:") for process in (a, b)]
        self.redis.start()
        deadline = time.monotonic() + 15
        while any(p.stdout.count(b"cluster store up:") <= up for p, up in zip((a, b), ups, strict=True)):
            self.assertLess(time.monotonic(), deadline, "the instances did not reconnect to Redis within 15 s")
            yield sleep(0.1)
        # The merges follow the reconnections (no failure here if they
        # never come: the calls below say what the window holds).
        deadline = time.monotonic() + 5
        while window_total(self.redis.port, "team", "rpm") < 20 and time.monotonic() < deadline:
            yield sleep(0.1)
        for sdk in sdks:
            status = yield self.status(sdk)
            self.assertEqual(status, (429, "rate_limit_exceeded"))
        self.assertEqual(window_total(self.redis.port, "team", "rpm"), 20)
        for process in (a, b):
            self.assertIn(b"added 10 request(s) and ", process.stdout)

    @inlineCallbacks
    def test_spend_missed_by_redis_raised_when_it_is_back(self) -> Any:
        """
        Costs the database has and Redis's running figure lacks (counted
        while Redis was away, or not yet written when it was re-seeded)
        reach Redis once the instances are back: each raises the figure to
        the database's a few seconds after reconnecting, never lowers it.
        """
        (_, token, on_a, api_a), _ = yield self.two()
        created = yield self.command(on_a, token, "consumer_create", {"name": "drift"})
        sdk = self.sdk(api_a, created["key"])
        for _ in range(2):
            status = yield self.status(sdk)
            self.assertEqual(status, (200, None))
        key = spend_key(self.redis.port, "drift", time.strftime("%Y-%m", time.gmtime()))
        # Both calls' rows are in the database within a second.
        yield sleep(1.2)
        spent = float(redis_get(self.redis.port, key) or 0)
        self.assertAlmostEqual(spent, 0.00002, places=12)
        # Redis lost them (it stays seeded), and the instances reconnect.
        yield deferToThread(redis_command, self.redis.port, "SET", key, "0")
        for kind in ("normal", "pubsub"):
            yield deferToThread(redis_command, self.redis.port, "CLIENT", "KILL", "TYPE", kind)
        deadline = time.monotonic() + 15
        while float(redis_get(self.redis.port, key) or 0) < spent * 0.99:
            self.assertLess(time.monotonic(), deadline, "the spend was not raised to the database's")
            yield sleep(0.2)
        self.assertAlmostEqual(float(redis_get(self.redis.port, key) or 0), spent, places=12)

    @inlineCallbacks
    def test_spent_is_the_clusters_without_a_budget(self) -> Any:
        """
        A consumer with no budget: 2 calls through A and 4 through B, and
        both list the cluster's spend (Redis's), not their own share.
        """
        (_, token, on_a, api_a), (_, _, on_b, api_b) = yield self.two()
        created = yield self.command(on_a, token, "consumer_create", {"name": "we", "rpm": 1000})
        yield self.reaches(on_b, token, "we")
        on_a_sdk, on_b_sdk = self.sdk(api_a, created["key"]), self.sdk(api_b, created["key"])
        for sdk in [on_a_sdk] * 2 + [on_b_sdk] * 4:
            status = yield self.status(sdk)
            self.assertEqual(status, (200, None))
        key = spend_key(self.redis.port, "we", time.strftime("%Y-%m", time.gmtime()))
        deadline = time.monotonic() + 5
        while float(redis_get(self.redis.port, key) or 0) < 0.000055:
            self.assertLess(time.monotonic(), deadline, "the calls' cost never reached Redis")
            yield sleep(0.05)
        for control in (on_a, on_b):
            listed = yield self.command(control, token, "consumer_list", {"name": "we"})
            self.assertAlmostEqual(listed["consumers"][0]["spent_usd"], 0.00006, places=12)
            every = yield self.command(control, token, "consumer_list")
            self.assertAlmostEqual(every["consumers"][0]["spent_usd"], 0.00006, places=12)

    @inlineCallbacks
    def test_recreated_on_another_instance(self) -> Any:
        """
        Spent on instance B, deleted and created again on A: B admits the
        new consumer's first call, and Redis holds only its spend.
        """
        (_, token, on_a, _), (_, _, on_b, api_b) = yield self.two()
        created = yield self.command(on_a, token, "consumer_create", CHEAP)
        yield self.reaches(on_b, token, "cheap")
        on_b_sdk = self.sdk(api_b, created["key"])
        first = yield self.status(on_b_sdk)
        spent = yield self.status(on_b_sdk)
        self.assertEqual((first, spent), ((200, None), (429, "insufficient_quota")))
        today = time.strftime("%Y-%m-%d", time.gmtime())
        old_key = spend_key(self.redis.port, "cheap", today)
        yield self.command(on_a, token, "consumer_delete", {"name": "cheap"})
        again = yield self.command(on_a, token, "consumer_create", CHEAP)
        self.assertEqual(again["consumer"]["spent_usd"], 0)
        # A call of the deleted consumer still running on an instance that
        # has not heard of the delete counts its cost after A's delete
        # removed its counters: it cannot reach the new consumer's.
        redis_command(self.redis.port, "INCRBYFLOAT", old_key, "0.00001")
        new_sdk = self.sdk(api_b, again["key"])
        for _ in range(50):
            status = yield self.status(new_sdk)
            if status[0] != 401:
                break
            yield sleep(0.05)
        self.assertEqual(status, (200, None))
        # The call's cost reaches Redis once answered: on a loaded host a
        # moment after the answer.
        for _ in range(100):
            keys = [k for k in redis_keys(self.redis.port, f"openclaw:consumer:cheap:*:spend:{today}") if k != old_key]
            if keys:
                break
            yield sleep(0.05)
        [key] = keys
        self.assertAlmostEqual(float(redis_get(self.redis.port, key) or 0), 0.00001, places=12)
        listed = yield self.command(on_b, token, "consumer_list", {"name": "cheap"})
        self.assertAlmostEqual(listed["consumers"][0]["spent_usd"], 0.00001, places=12)


class RedisScripts:
    """
    What L{SharedCounters} needs of the cluster's store, on a real
    C{redis-server} through txredisapi's public API.
    """

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def key(self, *parts: str) -> str:
        return ":".join(("openclaw", *parts))

    def script(self, source: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        evaluated: Deferred[Any] = self.connection.eval(source, keys, args)
        return evaluated

    def publish_consumer(self, instance: str, name: str) -> Deferred[Any]:
        return succeed(None)

    def revokes(self) -> Deferred[Any]:
        return succeed({})


class SharedTpmReservations(TestCase):
    timeout = 30

    @inlineCallbacks
    def counters(self) -> Any:
        redis = RedisServer()
        redis.start()
        self.addCleanup(redis.cleanup)
        connection = yield txredisapi.Connection("127.0.0.1", redis.port, reconnect=False)
        self.addCleanup(connection.disconnect)
        counters = SharedCounters(RedisScripts(connection), reactor, 5.0)
        counters.up = True
        return counters, redis

    @inlineCallbacks
    def test_admissions_refused_then_taken_merged(self) -> Any:
        """
        Redis refusing writes for less than a heartbeat (out of memory):
        the calls admitted here meanwhile go to its rpm window at the
        first admission it takes again (trial s46: they were never merged,
        and the minute admitted past rpm).
        """
        counters, redis = yield self.counters()
        consumer = Consumer("a", rpm=5, created_at=5.0)
        now = float(int(time.time()))
        redis_command(redis.port, "CONFIG", "SET", "maxmemory", "1")
        redis_command(redis.port, "CONFIG", "SET", "maxmemory-policy", "noeviction")
        for _ in range(3):
            answer = yield counters.admit(consumer, now, Holder("a", "p", 5.0))
            self.assertIsNone(answer)
        self.assertEqual(window_total(redis.port, "a", "rpm"), 0)
        redis_command(redis.port, "CONFIG", "SET", "maxmemory", "0")
        answer = yield counters.admit(consumer, now, Holder("a", "p", 5.0))
        self.assertIsNone(answer)
        for _ in range(50):
            if window_total(redis.port, "a", "rpm") == 4:
                break
            yield sleep(0.02)
        self.assertEqual(window_total(redis.port, "a", "rpm"), 4)
        answers = []
        for _ in range(3):
            answer = yield counters.admit(consumer, now, Holder("a", "p", 5.0))
            answers.append(answer is None)
        self.assertEqual(answers, [True, False, False])

    @inlineCallbacks
    def test_tpm_reserved_atomically_in_redis(self) -> Any:
        """
        Concurrent admissions in Redis reserve their tokens in the script
        that checks them: tpm 30 and 14 tokens a call admits 3 of 6 sent at
        once; a count replaces a reservation by the actual tokens; a
        reservation never counted lapses after TOKEN_RESERVATION_SECONDS.
        """
        counters, redis = yield self.counters()
        consumer = Consumer("a", tpm=30, created_at=5.0)
        now = float(int(time.time()))
        holders = [Holder("a", "p", 5.0) for _ in range(6)]
        answers = yield gatherResults([counters.admit(consumer, now, h, 0.0, 14) for h in holders])
        self.assertEqual([a is None for a in answers], [True] * 3 + [False] * 3)
        # What each admission left of the cluster's tpm, for its answer's
        # x-ratelimit-* headers: 30 - 14, - 28, - 42 (reservations
        # included), the window empty once the last one's second leaves it
        # (61 s after that second's start: a cluster counts whole seconds).
        self.assertEqual(
            [dict(h.rate_limits.headers()) for h in holders[:3] if h.rate_limits is not None],
            [
                {
                    b"x-ratelimit-limit-tokens": b"30",
                    b"x-ratelimit-remaining-tokens": remaining,
                    b"x-ratelimit-reset-tokens": b"1m1s",
                }
                for remaining in (b"16", b"2", b"0")
            ],
        )
        refused = answers[3]
        self.assertEqual(refused.code, "rate_limit_exceeded")
        # Nothing used yet: the calls in flight hold it all (trial s27:
        # "over its tpm limit", Retry-After 60), a short wait for them.
        self.assertEqual((refused.type, dict(refused.headers)[b"Retry-After"]), ("tokens_reserved", b"2"))
        self.assertTrue(
            refused.message.startswith(
                "consumer 'a': calls in flight hold 42 tokens of its tpm limit of 30 per minute (0 used"
            ),
            refused.message,
        )
        # Decided from the cluster's figures: some may be a crashed
        # instance's, which hold until they lapse (60 s of tpm), or until
        # the operator releases them.
        self.assertTrue(
            refused.message.endswith(
                "or set max_tokens so that each call reserves less. Some of those calls may be another instance's "
                "of the cluster: if it crashed, its reservations lapse after 60 s, or the operator can release "
                "them at once (openclawctl consumer release a); openclawctl consumer list shows what is held"
            ),
            refused.message,
        )
        [reserved_key] = redis_keys(redis.port, "openclaw:consumer:a:*:reserved_tokens")
        self.assertEqual(redis_command(redis.port, "HGET", reserved_key, str(int(now))), b"$2\r\n42\r\n")
        # Counted with 5 of its 14 tokens, then another: 10 + 14 < 30 admits.
        counters.counted("a", 5, 0.0, now + 1, holders[0])
        counters.counted("a", 5, 0.0, now + 1, holders[1])
        yield sleep(0.2)
        self.assertEqual(redis_command(redis.port, "HGET", reserved_key, str(int(now))), b"$2\r\n14\r\n")
        admitted = yield counters.admit(consumer, now + 1, Holder("a", "p", 5.0), 0.0, 14)
        self.assertIsNone(admitted)
        # Reservations whose calls never end are forgotten (the window's
        # tokens are long gone too).
        later = now + TOKEN_RESERVATION_SECONDS + 2
        admitted = yield gatherResults(
            [counters.admit(consumer, later, Holder("a", "p", 5.0), 0.0, 14) for _ in range(3)]
        )
        self.assertEqual([a is None for a in admitted], [True, True, True])
        # The window's own tokens at tpm: over it, until they leave the
        # window (their second's field, 61 s after its start).
        counters.counted("a", 30, 0.0, later, Holder("a", "p", 5.0))
        yield sleep(0.2)
        over = yield counters.admit(consumer, later + 1, Holder("a", "p", 5.0), 0.0, 14)
        self.assertEqual((over.type, dict(over.headers)[b"Retry-After"]), ("tokens", b"60"))
        self.assertIn("is over its tpm limit of 30", over.message)

    @inlineCallbacks
    def test_budget_held_by_calls_in_flight_in_redis(self) -> Any:
        """
        In Redis as here: a budget refusal due to the reservations of calls
        in flight only is to be retried (rate_limit_exceeded, Retry-After);
        one with the budget spent is final (insufficient_quota,
        x-should-retry false).
        """
        counters, redis = yield self.counters()
        redis_command(redis.port, "SET", "openclaw:consumers:seeded:2", "1")
        consumer = Consumer("b", budget_usd=1.0, budget_period="total", created_at=5.0)
        now = float(int(time.time()))
        first = Holder("b", "p", 5.0)
        holders = (first, Holder("b", "p", 5.0), Holder("b", "p", 5.0))
        answers = yield gatherResults([counters.admit(consumer, now, h, 0.6) for h in holders])
        self.assertEqual(answers[:2], [None, None])
        held = answers[2]
        self.assertEqual((held.code, held.type), ("rate_limit_exceeded", "budget_reserved"))
        self.assertEqual(dict(held.headers), {b"Retry-After": b"2"})
        # The message as a single gateway's, then what a cluster adds: a
        # crashed instance's budget reservations lapse after 15 minutes.
        self.assertEqual(
            held.message,
            (
                "consumer 'b': calls in flight hold the rest of its budget of 1 USD in total (spent 0 USD, 1.2 USD "
                "reserved by calls in flight until they are counted); retry after 2 s, once they end, or set "
                "max_tokens so that each call reserves less. Some of those calls may be another instance's of the "
                "cluster: if it crashed, its reservations lapse after 15 minutes, or the operator can release them "
                "at once (openclawctl consumer release b); openclawctl consumer list shows what is held"
            ),
        )
        counters.counted("b", 10, 1.0, now, first)
        yield sleep(0.2)
        spent = yield counters.admit(consumer, now, Holder("b", "p", 5.0), 0.6)
        self.assertEqual((spent.code, dict(spent.headers)), ("insufficient_quota", {b"x-should-retry": b"false"}))
        self.assertIn("has used its budget of 1 USD in total (spent 1 USD, 0.6 USD more reserved", spent.message)

    @inlineCallbacks
    def test_largest_reservation_admitted_in_redis(self) -> Any:
        """
        The largest reservation an admission makes (MAX_TOKEN_COUNT tokens,
        and the price of as many) goes through Redis's script: admitted,
        and the next call told the calls in flight hold the rest (past
        int64 the script failed, re-attack s27).
        """
        counters, redis = yield self.counters()
        consumer = Consumer("a", tpm=20_000, budget_usd=1e9, budget_period="total", created_at=5.0)
        now = float(int(time.time()))
        self.assertIsNone((yield counters.admit(consumer, now, Holder("a", "p", 5.0), 2e6, MAX_TOKEN_COUNT)))
        refused = yield counters.admit(consumer, now, Holder("a", "p", 5.0), 0.0, 14)
        self.assertEqual(refused.type, "tokens_reserved")

    @inlineCallbacks
    def test_held_read_from_redis(self) -> Any:
        """
        What a consumer's calls in flight hold is read from Redis with its
        spend (consumer_list): the cluster's reservations, those another
        instance made (one that died: trial s27, the list showed nothing
        while they locked the consumer out) included, and only live ones.
        """
        counters, redis = yield self.counters()
        redis_command(redis.port, "SET", "openclaw:consumers:seeded:2", "1")
        consumer = Consumer("crash", budget_usd=1.0, budget_period="total", tpm=10_000, created_at=5.0)
        now = float(int(time.time()))
        other = SharedCounters(counters.redis, reactor, 5.0)
        other.up = True
        self.assertIsNone((yield other.admit(consumer, now, Holder("crash", "p", 5.0), 0.25, 1010)))
        self.assertEqual(counters.held("crash", now), (0.0, 0))
        yield counters.read_spends([consumer], now)
        self.assertEqual(counters.held("crash", now), (0.25, 1010))
        # The tpm reservation lapses after 60 s, the budget's after 15 minutes.
        yield counters.read_spends([consumer], now + TOKEN_RESERVATION_SECONDS + 1)
        self.assertEqual(counters.held("crash", now), (0.25, 0))
        yield counters.read_spends([consumer], now + RESERVATION_SECONDS + 1)
        self.assertEqual(counters.held("crash", now), (0.0, 0))

    @inlineCallbacks
    def test_held_read_again_or_local(self) -> Any:
        """
        A read of one consumer's reservations leaves the others' as read;
        one made while Redis is away gives this instance's own figure, not
        the cluster's from before the outage (review s27).
        """
        counters, redis = yield self.counters()
        redis_command(redis.port, "SET", "openclaw:consumers:seeded:2", "1")
        now = float(int(time.time()))
        a = Consumer("a", budget_usd=1.0, budget_period="total", created_at=5.0)
        b = Consumer("b", budget_usd=1.0, budget_period="total", created_at=5.0)
        other = SharedCounters(counters.redis, reactor, 5.0)
        other.up = True
        for consumer in (a, b):
            self.assertIsNone((yield other.admit(consumer, now, Holder(consumer.name, "p", 5.0), 0.25)))
        yield counters.read_spends([a, b], now)
        yield counters.read_spends([a], now)
        self.assertEqual(counters.held("b", now), (0.25, 0))
        counters.up = False
        yield counters.read_spends([a], now)
        self.assertEqual(counters.held("a", now), (0.0, 0))
        self.assertEqual(counters.held("b", now), (0.25, 0))

    @inlineCallbacks
    def test_spend_lost_by_redis_not_shown(self) -> Any:
        """
        A spend Redis no longer has (a restart lost it, and the database
        never had it: its instance was killed before writing its rows) is
        not shown from an earlier read: consumer_list shows what every
        other instance shows, and what admissions go by (trial s30).
        """
        counters, redis = yield self.counters()
        redis_command(redis.port, "SET", "openclaw:consumers:seeded:2", "1")
        now = float(int(time.time()))
        consumer = Consumer("lost", budget_usd=1.0, budget_period="month", created_at=5.0)
        other = SharedCounters(counters.redis, reactor, 5.0)
        other.up = True
        holder = Holder("lost", "p", 5.0)
        self.assertIsNone((yield other.admit(consumer, now, holder, 0.25)))
        other.counted("lost", 10, 0.125, now, holder)
        yield sleep(0.2)
        yield counters.read_spends([consumer], now)
        self.assertEqual(counters.spent("lost", "month", now), 0.125)
        [spend_key] = redis_keys(redis.port, "openclaw:consumer:lost:*:spend:" + period_key("month", now))
        redis_command(redis.port, "DEL", spend_key)
        yield counters.read_spends([consumer], now)
        self.assertEqual(counters.spent("lost", "month", now), 0.0)

    @inlineCallbacks
    def test_rpm_set_later_counts_the_clusters_last_minute(self) -> Any:
        """
        Requests made while a consumer had no rpm are in the cluster's
        window when one is set: a consumer without limits makes no
        admission round trip, and its request reaches Redis with the
        call's count; one with a budget only is counted by the admission.
        """
        counters, redis = yield self.counters()
        redis_command(redis.port, "SET", "openclaw:consumers:seeded:2", "1")
        now = float(int(time.time()))
        free, budgeted = Consumer("f", created_at=5.0), Consumer("b", budget_usd=100.0, created_at=5.0)
        for _ in range(3):
            holder = Holder("f", "p", 5.0)
            self.assertIsNone(counters.admit(free, now, holder))
            self.assertEqual(holder.request_at, int(now))
            counters.counted("f", 0, 0.0, now + 1, holder)
            self.assertEqual(holder.request_at, 0)
            admitted = yield counters.admit(budgeted, now, Holder("b", "p", 5.0), 0.001)
            self.assertIsNone(admitted)
        yield sleep(0.2)
        for name, consumer in (("f", free), ("b", budgeted)):
            [key] = redis_keys(redis.port, f"openclaw:consumer:{name}:*:rpm")
            # Another instance, its own counts empty, judges the cluster's.
            elsewhere = SharedCounters(counters.redis, reactor, 5.0)
            elsewhere.up = True
            refused = yield elsewhere.admit(attrs.evolve(consumer, rpm=3), now + 2, Holder(name, "p", 5.0))
            self.assertEqual((refused.code, refused.type), ("rate_limit_exceeded", "requests"), name)
            admitted = yield elsewhere.admit(attrs.evolve(consumer, rpm=4), now + 2, Holder(name, "p", 5.0))
            self.assertIsNone(admitted, name)
        # A window no admission reads is kept to the last minute all the
        # same, not one field a second for as long as the consumer is busy.
        [key] = redis_keys(redis.port, "openclaw:consumer:f:*:rpm")
        for second in range(70):
            redis_command(redis.port, "HSET", key, str(int(now) - 200 - second), "1")
        holder = Holder("f", "p", 5.0)
        counters.admit(free, now + 2, holder)
        counters.counted("f", 10, 0.0, now + 2, holder)
        yield sleep(0.2)
        self.assertEqual(redis_command(redis.port, "HLEN", key), b":2\r\n")


class Unreachable:
    """
    A Redis that never answers: every script fails as a refused connection would.
    """

    def key(self, *parts: str) -> str:
        return ":".join(("openclaw", *parts))

    def script(self, source: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        return fail(ConnectionRefusedError("Redis is down"))

    def publish_consumer(self, instance: str, name: str) -> Deferred[Any]:
        return fail(ConnectionRefusedError("Redis is down"))

    def revokes(self) -> Deferred[Any]:
        return fail(ConnectionRefusedError("Redis is down"))


class RedisAwayTests(TestCase):
    def test_counted_per_instance_while_redis_is_away(self) -> None:
        """
        Redis unreachable (known, or failing a call): the instance's own
        counts decide, never a refusal for everyone.
        """
        clock = Clock()
        clock.advance(1000)
        counters = SharedCounters(Unreachable(), clock, 0.5)
        self.addCleanup(self.flushLoggedErrors)
        consumer = Consumer("a", rpm=2)
        counters.up = True
        answers: list[Any] = []
        admitted = counters.admit(consumer, clock.seconds(), Holder("a", "p"))
        assert isinstance(admitted, Deferred)
        admitted.addCallback(answers.append)
        counters.up = False
        answers.append(counters.admit(consumer, clock.seconds(), Holder("a", "p")))
        refused = counters.admit(consumer, clock.seconds(), Holder("a", "p"))
        self.assertEqual(answers, [None, None])
        assert isinstance(refused, APIError)
        self.assertEqual(refused.code, "rate_limit_exceeded")
        # No limit at all: no round trip, whatever Redis does.
        counters.up = True
        self.assertIsNone(counters.admit(Consumer("free"), clock.seconds(), Holder("free", "p")))


class _Table:
    """
    What L{SharedConsumers} needs of a consumer table: reloads counted.
    """

    def __init__(self) -> None:
        self.loaded = True
        self.refreshes = 0

    def refresh(self) -> None:
        self.refreshes += 1

    def load_unwritten(self) -> Deferred[Any]:
        return Deferred()  # the re-seeding after a reconnection: not the point here

    def adopt_revokes(self, revokes: dict[str, tuple[str, str]]) -> None:
        pass


class _Channel:
    """
    The cluster's channel as one instance's connection reaches it.
    """

    def __init__(self, bus: list[Any]) -> None:
        self.bus = bus
        self.connected = True

    def key(self, *parts: str) -> str:
        return ":".join(("openclaw", *parts))

    def publish_consumer(self, instance: str, name: str) -> Deferred[Any]:
        if not self.connected:
            return Deferred()  # queued behind a dead connection
        for deliver in self.bus:
            deliver(instance, name)
        return succeed(1)

    def revokes(self) -> Deferred[Any]:
        return Deferred() if not self.connected else succeed({})


class OneInstanceAwayTests(TestCase):
    """
    Only instance A loses Redis (its own link); B never does, so B would
    never reload by itself: A's consumer changes meanwhile are announced
    when A is back.
    """

    def test_changes_announced_on_reconnection(self) -> None:
        bus: list[Any] = []
        instances = []
        for name in ("a", "b"):
            table, channel = _Table(), _Channel(bus)
            counters = SharedCounters(channel, Clock(), 1.0)  # type: ignore[arg-type]
            counters.up = True
            shared = SharedConsumers(table, counters, channel, name)  # type: ignore[arg-type]
            bus.append(shared.received)
            instances.append((shared, table, channel))
        (a, a_table, a_channel), (_, b_table, _) = instances
        a_channel.connected = False
        a.up(False)
        self.assertIsNotNone(a.unshared(a.announced))
        a.publish("alice")  # a key revoked on A
        self.assertEqual(b_table.refreshes, 0)
        a_channel.connected = True
        a.up(True)
        self.assertEqual(b_table.refreshes, 1)

    def test_failed_announcement_told_again(self) -> None:
        """
        An announcement that fails while Redis still looks up (a timeout,
        a connection lost just now) is told again: with the next change,
        or when the connection is back.
        """
        bus: list[Any] = []
        instances = []
        for name in ("a", "b"):
            table, channel = _Table(), _Channel(bus)
            clock = Clock()
            counters = SharedCounters(channel, clock, 1.0)  # type: ignore[arg-type]
            counters.up = True
            shared = SharedConsumers(table, counters, channel, name)  # type: ignore[arg-type]
            bus.append(shared.received)
            instances.append((shared, table, channel, clock))
        (a, a_table, a_channel, a_clock), (_, b_table, _, _) = instances
        a_channel.connected = False  # not noticed yet: counters.up stays true
        a.publish("alice")
        a_clock.advance(1.0)  # the announcement times out
        self.assertEqual(b_table.refreshes, 0)
        a.up(False)
        a_channel.connected = True
        a.up(True)
        self.assertEqual(b_table.refreshes, 1)
        # Or with the next change, when the connection never looked down.
        a_channel.connected = False
        a.publish("bob")
        a_clock.advance(1.0)
        a_channel.connected = True
        a.publish("carol")
        self.assertEqual(b_table.refreshes, 3)

    def test_announcement_failing_at_once_kept(self) -> None:
        """
        An announcement whose failure comes before the send returns (a
        connection that refuses at once) is kept to be told again, even
        when earlier ones go out with it (review s25: it was cleared with
        them, and never told).
        """
        table, channel, clock = _Table(), _Channel([]), Clock()
        counters = SharedCounters(channel, clock, 1.0)  # type: ignore[arg-type]
        counters.up = True
        shared = SharedConsumers(table, counters, channel, "a")  # type: ignore[arg-type]
        sent: list[str] = []
        refusing = {"alice", "bob"}

        def publish_consumer(instance: str, name: str) -> Deferred[Any]:
            if name in refusing:
                return fail(ConnectionRefusedError())
            sent.append(name)
            return succeed(1)

        channel.publish_consumer = publish_consumer  # type: ignore[method-assign]
        shared.publish("alice")
        shared.publish("bob")  # alice told again with it; both refused at once
        self.assertEqual(sent, [])
        refusing.clear()
        shared.publish("carol")
        self.assertEqual(sorted(sent), ["alice", "bob", "carol"])

    def test_answer_waits_for_the_announcement(self) -> None:
        """
        A change made while Redis looks up but has stopped answering (its
        connection still open, as in a partition): the change's answer
        waits for its announcement, and warns once it goes unconfirmed
        (within the store's timeout); one Redis took has no warning.
        """
        table, channel, clock = _Table(), _Channel([]), Clock()
        counters = SharedCounters(channel, clock, 1.0)  # type: ignore[arg-type]
        counters.up = True
        shared = SharedConsumers(table, counters, channel, "a")  # type: ignore[arg-type]
        since = shared.announced
        shared.publish("alice")
        self.assertIsNone(shared.unshared(since))
        # Nothing changed since: nothing to wait on.
        self.assertIsNone(shared.unshared(shared.announced))
        channel.connected = False  # silent: not noticed, counters.up stays true
        since = shared.announced
        shared.publish("alice")
        told = shared.unshared(since)
        assert isinstance(told, Deferred)
        self.assertNoResult(told)
        clock.advance(1.0)
        self.assertEqual(self.successResultOf(told), UNTOLD)
        self.assertIn("did not confirm", UNTOLD)
        # Known down: the warning at once.
        shared.up(False)
        self.assertEqual(shared.unshared(shared.announced), UNSHARED)

    def test_no_change_missed(self) -> None:
        """
        Whatever else is announced meanwhile (earlier names told again
        with a change, another command's change), each change's answer
        warns when its own announcement went unconfirmed, and waits
        ANSWER_WAIT_SECONDS at most.
        """
        table, channel, clock = _Table(), _Channel([]), Clock()
        counters = SharedCounters(channel, clock, 30.0)  # type: ignore[arg-type]
        counters.up = True
        shared = SharedConsumers(table, counters, channel, "a")  # type: ignore[arg-type]
        channel.connected = False
        shared.publish("bob")
        clock.advance(30.0)  # bob's announcement unconfirmed: told again with the next change
        channel.connected = True
        late: list[Deferred[Any]] = []
        channel.publish_consumer = lambda instance, name: late.pop(0) if late else succeed(1)  # type: ignore[method-assign]
        # carol's change: bob's (taken at once) is announced after carol's
        # own, which Redis never takes.
        late.append(Deferred())
        since = shared.announced
        shared.publish("carol")
        told = shared.unshared(since)
        assert isinstance(told, Deferred)
        clock.advance(ANSWER_WAIT_SECONDS)
        self.assertEqual(self.successResultOf(told), UNTOLD)
        clock.advance(30.0)
        # Two commands interleaved: dave's answer waits on erin's too.
        dave_since = shared.announced
        late.append(Deferred())
        shared.publish("dave")
        erin_since = shared.announced
        shared.publish("erin")
        self.assertIsNone(shared.unshared(erin_since))
        told = shared.unshared(dave_since)
        assert isinstance(told, Deferred)
        self.assertNoResult(told)
        clock.advance(ANSWER_WAIT_SECONDS)
        self.assertEqual(self.successResultOf(told), UNTOLD)


class _Snapshot:
    def __init__(self) -> None:
        self.spend: dict[Any, float] = {}
        self.consumers: dict[str, Any] = {}


class _SeedingTable(_Table):
    """
    A table whose rows are written at once, over a database that holds no
    spend.
    """

    def clock(self) -> float:
        return 1000.0

    def load_unwritten(self) -> Deferred[Any]:
        return succeed((_Snapshot(), {}))


class _ScriptChannel(_Channel):
    def __init__(self) -> None:
        super().__init__([])
        self.scripts: list[str] = []

    def script(self, source: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        self.scripts.append(source)
        # SEED: seeded, and the marker's value.
        return succeed([1, "1"] if source == SEED else 1)


class ReconcileTests(TestCase):
    def test_raised_after_a_reconnection_and_never_after_stop(self) -> None:
        """
        Each reconnection seeds (if Redis has no spends) and, RECONCILE_SECONDS
        later, raises Redis's spends to the database's; once stopped, a
        reconnection or a seed finishing schedules nothing (no timer left
        for a stopped service, nor a reconciliation against a closed
        database).
        """
        from openclaw.consumers.shared import RAISE, RECONCILE_SECONDS, SEED

        clock = Clock()
        channel = _ScriptChannel()
        counters = SharedCounters(channel, clock, 1.0)  # type: ignore[arg-type]
        shared = SharedConsumers(_SeedingTable(), counters, channel, "a")  # type: ignore[arg-type]
        shared.up(True)
        self.assertEqual(channel.scripts, [SEED])
        clock.advance(RECONCILE_SECONDS)
        self.assertEqual(channel.scripts, [SEED, RAISE])
        shared.up(False)
        shared.up(True)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        shared.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
        shared.up(True)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(channel.scripts, [SEED, RAISE, SEED, SEED])
