"""
Several gateways as one (#18): two C{twistd -n openclaw} instances on one
real C{redis-server}, the stand-in providers and the openai SDK.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from openclaw.providers.keys import fingerprint
from openclaw.urls import masked_url
from tests.redis_server import DelayingProxy, RedisServer
from tests.support import (
    TOKEN_LINE,
    GatewayProcess,
    WaitedTooLong,
    free_port,
    make_ca,
    open_client,
    spawn_gateway,
    start_gateway,
    start_upstream,
    within,
)
from tests.test_allowlist_proxies import send_head
from tests.test_twistd import SECRET, base_env

GATEWAY_KEY = "gw-key-0123456789abcdef"


def sleep(seconds: float) -> Any:
    return deferLater(reactor, seconds, lambda: None)


def store_up(api_port: int) -> Any:
    """
    The C{openclaw_cluster_store_up} gauge of the gateway whose API is on
    C{api_port}.
    """

    def scrape() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        found = re.search(r"^openclaw_cluster_store_up (\S+)$", text, re.MULTILINE)
        assert found, text
        return float(found.group(1))

    return deferToThread(scrape)


@inlineCallbacks
def store_up_becomes(api_port: int, wanted: float, seconds: float = 15) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = yield store_up(api_port)
        if value == wanted or time.monotonic() > deadline:
            return value
        yield sleep(0.1)


def observed(waiting: Deferred[Any]) -> Deferred[Any]:
    """
    A new Deferred with C{waiting}'s result, leaving C{waiting} alone (for
    L{within}, which cancels what it bounds).
    """
    copy: Deferred[Any] = Deferred()

    def relay(result: Any) -> Any:
        if not copy.called:
            copy.callback(result)
        return result

    waiting.addCallback(relay)
    return copy


@inlineCallbacks
def printed(process: Any, text: bytes, count: int = 1, seconds: float = 20) -> Any:
    """
    Wait until C{process} has printed C{text} C{count} times: what another
    instance does on a message from Redis (it applies a route, adopts a
    token, rests a key) happens after the instance that wrote it has
    answered, never at once.
    """
    deadline = time.monotonic() + seconds
    while process.stdout.count(text) < count:
        if time.monotonic() > deadline:
            raise WaitedTooLong(
                f"waited {seconds:g} s for {text!r} (x{count}) in the gateway's output: {process.stdout[-3000:]!r}"
            )
        yield sleep(0.02)


class ClusterCase(TestCase):
    """
    Instances on one real C{redis-server} (helpers; no tests).
    """

    timeout = 90
    extra: dict[str, str] = {}  # noqa: RUF012 (replaced, never mutated)

    def setUp(self) -> None:
        self.redis = RedisServer()
        self.redis.start()
        self.addCleanup(self.redis.cleanup)
        self.upstream = start_upstream(self, "kimi-key", "gemini-key")

    def env(self) -> dict[str, str]:
        return base_env(
            JWT_SECRET=SECRET,
            REDIS_URL=self.redis.url,
            REDIS_TIMEOUT_SECONDS="0.5",
            REDIS_RECONNECT_MAX_SECONDS="0.5",
            GATEWAY_API_KEYS=GATEWAY_KEY,
            **self.upstream.environment(),
            **self.extra,
        )

    def spawn(self, port: int | None = None, api_port: int | None = None, **env: str) -> Any:
        port = port or free_port()
        api_port = api_port or free_port()
        process = spawn_gateway(
            self,
            ["--port", str(port), "--api-port", str(api_port), "--interface", "127.0.0.1"],
            {**self.env(), **env},
        )
        process.port, process.api_port = port, api_port
        # Its banner, or its exit: never a test that waits for ever.
        within(process.token, 60, f"the banner of the gateway on port {port}")
        return process

    def sdk(self, api_port: int) -> openai.OpenAI:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{api_port}/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=30
        )
        self.addCleanup(deferToThread, client.close)
        return client

    def chat_model(self, client: openai.OpenAI) -> Any:
        def call() -> str:
            answer = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}])
            return answer.model

        return deferToThread(call)

    def client(self, port: int) -> Any:
        return open_client(self, port)

    @inlineCallbacks
    def status_becomes(self, client: Any, token: str, provider: str, seconds: float = 10) -> Any:
        """
        C{status} on C{client} until its C{provider_id} is C{provider}.
        """
        deadline = time.monotonic() + seconds
        while True:
            status = yield client.ask(token, "status")
            if status["result"]["provider_id"] == provider or time.monotonic() > deadline:
                return status
            yield sleep(0.05)


@inlineCallbacks
def consumer_created(client: Any, token: str, name: str, seconds: float = 15) -> Any:
    """
    C{consumer_create} of C{name} on C{client}, asked again while the
    instance has not loaded its consumers yet (it answers so at start).
    """
    deadline = time.monotonic() + seconds
    while True:
        answer = yield client.ask(token, "consumer_create", {"name": name})
        if answer["ok"] or "not loaded yet" not in answer.get("error", "") or time.monotonic() > deadline:
            return answer
        yield sleep(0.1)


class TwoInstances(ClusterCase):
    @inlineCallbacks
    def test_switch_and_rotate_reach_the_other_instance(self):
        """
        One token for both (the second adopts the first's); a switch on A is
        B's route for its next call; a rotation on A revokes the old token on
        B's open connection; status names the instance and counts both.
        """
        a = self.spawn()
        token = yield a.token
        # Without DATABASE_URL, each instance's consumers are its own: said.
        self.assertIn(b"REDIS_URL is set without DATABASE_URL: consumers", a.stdout)
        self.assertRegex(a.stdout, rb"kept in the SQLite file \S+openclaw\.db, this instance's own; instances")
        b = self.spawn()
        token_b = yield b.token
        self.assertEqual(token_b, token)
        on_a = yield self.client(a.port)
        on_b = yield self.client(b.port)
        # And with each consumer change once other instances are seen (B
        # sees A at its first heartbeat, whose answer may come a moment
        # after B took the token: CI s45 asked 55 ms after B's start):
        # its key works where its file is.
        for _ in range(50):
            status = yield on_b.ask(token, "status")
            if status["result"]["instances_seen"] == 2:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(status["result"]["instances_seen"], 2, status)
        created = yield consumer_created(on_b, token, "team")
        self.assertTrue(created["ok"], created)
        self.assertIn("this change holds only on the instances that use that file", created["result"]["warning"])
        sdk_b = self.sdk(b.api_port)
        model = yield self.chat_model(sdk_b)
        self.assertIn("gemini", model)

        answer = yield on_a.ask(token, "switch_provider", {"provider": "kimi"})
        self.assertTrue(answer["ok"], answer)
        self.assertEqual((answer["result"]["previous"], answer["result"]["active"]), ("gemini", "kimi"))
        yield printed(b, b"applied the cluster's route kimi/")
        model = yield self.chat_model(sdk_b)
        self.assertNotIn("gemini", model)
        status = yield on_b.ask(token, "status")
        self.assertEqual(status["result"]["provider_id"], "kimi")
        # The audit line is A's, naming A; B logs that it applied A's change.
        status_a = yield on_a.ask(token, "status")
        instance_a = status_a["result"]["instance"].encode()
        self.assertRegex(
            a.stdout, rb"switch_provider from 127\.0\.0\.1:\d+ \(token \S+\) on instance " + instance_a + b": ok"
        )
        self.assertNotIn(b"switch_provider from", b.stdout)
        self.assertRegex(
            b.stdout, rb"applied the cluster's route kimi/\S+ \(version \d+, switched on " + instance_a + rb"\)"
        )
        self.assertNotIn(b"applied the cluster's route", a.stdout)
        # An instance started now serves the cluster's route, and says it is
        # not its DEFAULT_PROVIDER's (trial s25: said at info only).
        c = self.spawn()
        yield c.token
        yield printed(c, b"the active provider is kimi/")
        self.assertRegex(
            c.stdout,
            rb"ClusterNode#warn\] the active provider is kimi/\S+, the cluster's .* rather than gemini/",
        )
        self.assertNotIn(b"the active provider is", a.stdout + b.stdout)

        adopted = b.stdout.count(b"adopted from the cluster")
        answer = yield on_a.ask(token, "rotate_token")
        self.assertTrue(answer["ok"], answer)
        new_token = answer["result"]["token"]
        yield printed(b, b"adopted from the cluster", adopted + 1)
        answer = yield on_b.ask(token, "ping")
        self.assertEqual(answer, {"ok": False, "cmd": "ping", "error": "token revoked"})
        status = yield on_b.ask(new_token, "status")
        self.assertTrue(status["ok"], status)
        self.assertRegex(
            a.stdout, rb"rotate_token from 127\.0\.0\.1:\d+ \(token \S+\) on instance " + instance_a + b": ok"
        )
        self.assertIn(b"adopted from the cluster (issued on " + instance_a + b")", b.stdout)
        self.assertNotIn(b"rotate_token from", b.stdout)
        status_a = yield on_a.ask(new_token, "status")
        self.assertEqual(status["result"]["worker"], 0)
        self.assertNotEqual(status["result"]["instance"], status_a["result"]["instance"])
        # B started second: its first heartbeat saw A's.
        self.assertEqual(status["result"]["instances_seen"], 2)

    @inlineCallbacks
    def test_redis_gone_and_back(self):
        """
        Redis stopped: both keep serving with what they knew, a switch is
        refused with nothing changed, naming the store (its password
        masked) and what to do, and status says the store is down; Redis
        back (empty): the instances write back route and token, and the
        switch works.
        """
        # A's URL has a password (any works for Redis's default user).
        a = self.spawn(REDIS_URL=f"redis://default:s3cret@127.0.0.1:{self.redis.port}/0")
        token = yield a.token
        b = self.spawn()
        yield b.token
        on_a = yield self.client(a.port)
        answer = yield on_a.ask(token, "switch_provider", {"provider": "kimi"})
        self.assertTrue(answer["ok"], answer)
        up = yield store_up(a.api_port)
        self.assertEqual(up, 1)
        status = yield on_a.ask(token, "status")
        self.assertEqual(status["result"]["cluster_store"], "up")
        self.assertNotIn("cluster_store_error", status["result"])
        answer = yield on_a.ask(token, "consumer_create", {"name": "before"})
        self.assertTrue(answer["ok"], answer)
        self.assertNotIn("warning", answer["result"])
        self.redis.stop()
        up = yield store_up_becomes(a.api_port, 0)
        self.assertEqual(up, 0)
        # A consumer change meanwhile holds here, and says what it leaves
        # undone on the other instances.
        answer = yield on_a.ask(token, "key_create", {"name": "before"})
        self.assertTrue(answer["ok"], answer)
        self.assertIn("the cluster store (Redis) is unreachable", answer["result"]["warning"])
        self.assertIn(b"consumer before changed here but the other instances were not told", a.stdout)
        model = yield self.chat_model(self.sdk(b.api_port))
        self.assertNotIn("gemini", model)
        answer = yield on_a.ask(token, "switch_provider", {"provider": "gemini"})
        refusal = (
            f"cluster store at redis://default:***@127.0.0.1:{self.redis.port}/0 unavailable: nothing changed; "
            "retry once it is reachable"
        )
        self.assertEqual(answer, {"ok": False, "cmd": "switch_provider", "error": refusal})
        answer = yield on_a.ask(token, "rotate_token")
        self.assertEqual(answer["error"], refusal)
        status = yield on_a.ask(token, "status")
        self.assertEqual(status["result"]["cluster_store"], "down")
        # Why, as logged: the connection lost, then (once an attempt to
        # connect again has failed) that attempt's reason.
        self.assertRegex(
            status["result"]["cluster_store_error"],
            r"^(lost the connection to Redis|could not connect: .*Connection refused.*)$",
        )
        self.assertLessEqual(
            status["result"]["cluster_store_since"], time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        )
        on_b = yield self.client(b.port)
        answer = yield on_b.ask(token, "status")
        self.assertEqual(answer["result"]["provider_id"], "kimi")
        # Reconnection tried many times over (REDIS_RECONNECT_MAX_SECONDS
        # 0.5), lockout failures counted here alone: one line for the
        # outage, none per failed call.
        yield on_b.ask("forged", "ping")
        yield sleep(1.5)
        for process in (a, b):
            self.assertEqual(process.stdout.count(b"cluster store unreachable"), 1, process.stdout[-3000:])
            self.assertEqual(process.stdout.count(b"cluster store up:"), 1)

        self.redis.start()
        deadline = time.monotonic() + 15
        while True:
            answer = yield on_a.ask(token, "switch_provider", {"provider": "gemini"})
            if answer["ok"] or time.monotonic() > deadline:
                break
            yield sleep(0.2)
        self.assertTrue(answer["ok"], answer)
        # B may still be resubscribing when A's switch goes out: it has the
        # change from its reload, within moments.
        deadline = time.monotonic() + 5
        while True:
            model = yield self.chat_model(self.sdk(b.api_port))
            if "gemini" in model or time.monotonic() > deadline:
                break
            yield sleep(0.1)
        self.assertIn("gemini", model)
        answer = yield on_b.ask(token, "ping")
        self.assertTrue(answer["ok"], answer)
        for process in (a, b):
            up = yield store_up_becomes(process.api_port, 1)
            self.assertEqual(up, 1)
            self.assertEqual(process.stdout.count(b"cluster store unreachable"), 1)
            self.assertEqual(process.stdout.count(b"cluster store up:"), 2)
            self.assertLessEqual(process.stdout.count(b"could not reload the cluster's route and token"), 1)

    @inlineCallbacks
    def test_key_rest_shared(self):
        """
        A 429 on one of Kimi's two keys, met on A, rests that key on B (told
        at once) and on C (started later: it reloads the rests): neither
        sends to it while it rests.
        """
        self.extra = {"DEFAULT_PROVIDER": "kimi", "KIMI_API_KEYS": "kimi-key-2"}
        kimi = self.upstream.kimi
        kimi.extra_keys = ["kimi-key-2"]
        kimi.rate_limited_keys = {"kimi-key"}
        kimi.retry_after = 60
        a = self.spawn()
        yield a.token
        b = self.spawn()
        yield b.token
        model = yield self.chat_model(self.sdk(a.api_port))
        self.assertNotIn("gemini", model)
        self.assertEqual(kimi.keys_seen, ["kimi-key", "kimi-key-2"])
        # The key would work again, but rests for 60 s on every instance.
        kimi.rate_limited_keys = set()
        kimi.keys_seen.clear()
        yield printed(b, b"resting 60 s (rate limited on another instance)")
        sdk_b = self.sdk(b.api_port)
        for _ in range(3):
            yield self.chat_model(sdk_b)
        self.assertEqual(kimi.keys_seen, ["kimi-key-2"] * 3)
        self.assertIn(b"resting 60 s (rate limited on another instance)", b.stdout)
        c = self.spawn()
        yield c.token
        kimi.keys_seen.clear()
        sdk_c = self.sdk(c.api_port)
        for _ in range(2):
            yield self.chat_model(sdk_c)
        self.assertEqual(kimi.keys_seen, ["kimi-key-2"] * 2)

    @inlineCallbacks
    def test_write_timed_out_but_made(self):
        """
        A's switch reaches Redis, which makes it, but the reply comes back
        later than REDIS_TIMEOUT_SECONDS (a slow link: a proxy holds it):
        A asks Redis whether the write was made and answers the truth —
        switched, as B was — never "nothing changed".
        """
        proxy = DelayingProxy(self.redis)
        self.addCleanup(proxy.stop)
        a = self.spawn(REDIS_URL=proxy.url)
        token = yield a.token
        b = self.spawn()
        yield b.token
        on_a = yield self.client(a.port)
        on_b = yield self.client(b.port)
        proxy.hold(delay=1.0, window=0.3)
        answer = yield on_a.ask(token, "switch_provider", {"provider": "kimi"})
        self.assertEqual(answer["result"], {"previous": "gemini", "active": "kimi", "model": answer["result"]["model"]})
        self.assertIn(b"writing route to the cluster store failed", a.stdout)
        self.assertIn(b"route was written to the cluster store after all", a.stdout)
        yield printed(b, b"applied the cluster's route kimi/")
        for client in (on_a, on_b):
            status = yield client.ask(token, "status")
            self.assertEqual(status["result"]["provider_id"], "kimi")

    @inlineCallbacks
    def test_lockout_counted_across_instances(self):
        """
        AUTH_LOCKOUT_FAILURES=4: two bad tokens on A and two on B lock the
        address out on both (neither counted 4 on its own); the lockout is
        on Redis, so an instance started later refuses it too.
        """
        self.extra = {"AUTH_LOCKOUT_FAILURES": "4"}
        a = self.spawn()
        yield a.token
        b = self.spawn()
        yield b.token
        for process in (a, b):
            client = yield self.client(process.port)
            for _ in range(2):
                answer = yield client.ask("forged", "ping")
                self.assertFalse(answer["ok"], answer)
        # B counted the fourth failure: it locks out, and tells A.
        yield printed(b, b"too many failed authentications across the cluster")
        yield printed(a, b"decided by another instance of the cluster")
        for process in (a, b):
            response, sock = yield deferToThread(send_head, process.port, [])
            sock.close()
            self.assertIn(b" 429 ", response.split(b"\r\n")[0])
        self.assertIn(b"too many failed authentications across the cluster", b.stdout)
        self.assertIn(b"decided by another instance of the cluster", a.stdout)
        c = self.spawn()
        yield c.token
        response, sock = yield deferToThread(send_head, c.port, [])
        sock.close()
        self.assertIn(b" 429 ", response.split(b"\r\n")[0])

    @inlineCallbacks
    def test_restart_keeps_the_token(self):
        """
        Restarting one instance does not invalidate the operators' token.
        """
        a = self.spawn()
        token = yield a.token
        b = self.spawn()
        yield b.token
        yield a.stop()
        again = self.spawn(a.port, a.api_port)
        token_again = yield again.token
        self.assertEqual(token_again, token)
        on_again = yield self.client(again.port)
        answer = yield on_again.ask(token, "ping")
        self.assertTrue(answer["ok"], answer)


OTHER_SECRET = "another-secret-of-at-least-32-bytes!!"


class SeparateDatabases(ClusterCase):
    """
    Two clusters of one C{CLUSTER_NAME} in two databases of one Redis:
    Redis's channels are the server's, not a database's, so each
    database's cluster has its own channel.
    """

    def test_channel_names(self) -> None:
        """
        Database 0 (or none named) keeps the channel of the versions
        before (C{<CLUSTER_NAME>:events}: single-database deployments
        upgrade as before); another database's channel names it.
        """
        from openclaw.cluster.redis import RedisStore, cluster_channel, redis_database

        self.assertEqual(cluster_channel("openclaw", None), "openclaw:events")
        self.assertEqual(cluster_channel("openclaw", 0), "openclaw:events")
        self.assertEqual(cluster_channel("openclaw", 5), "openclaw:5:events")
        for url, database in (
            ("redis://h:1/5", 5),
            ("rediss://:p@h/12", 12),
            ("redis://h", None),
            ("redis://h/0", 0),
            ("redis://h?db=7", 7),
            ("unix:///run/r.sock?db=3&password=x", 3),
            ("unix:///run/r.sock", None),
        ):
            self.assertEqual(redis_database(url), database, url)
        self.assertEqual(RedisStore("redis://h:1/05", "c", 1, 1, reactor).channel, "c:5:events")

    def test_channel_database(self) -> None:
        """
        The database of a cluster's channel, read back for the look for
        namesakes in other databases: only a channel L{cluster_channel}
        makes for that name is one; the glob escapes what it must.
        """
        from openclaw.cluster.redis import channel_database, channel_pattern, cluster_channel

        for database in (0, 1, 5, 15, 100, 2**31 - 1):
            self.assertEqual(channel_database("edge", cluster_channel("edge", database)), database)
        for channel in (
            # No Redis database has such an index; anyone who may SUBSCRIBE
            # can make the channel (trial s27: past 2**64 it broke status,
            # past 4,300 digits every look).
            "edge:2147483648:events",
            "edge:18446744073709551616:events",
            "edge:" + "9" * 5000 + ":events",
            "edge:00000000000000000001:events",
            "edge:x:events",
            "edge:-1:events",
            "edge:events:x",
            "edge2:events",
            "other:edge:3:events",
            "edge:3:4:events",
            "edge:\u0663:events",
            "edge:",
        ):
            self.assertIsNone(channel_database("edge", channel), channel)
        self.assertEqual(channel_pattern("edge.prod_1-a"), "edge.prod_1-a:*events")
        self.assertEqual(channel_pattern("a*b?[c]"), "a\\*b\\?\\[c\\]:*events")

    @inlineCallbacks
    def test_clusters_in_two_databases_do_not_steer_each_other(self):
        """
        A on database 3 and B on database 5, same CLUSTER_NAME: B's
        switch_provider and rotate_token change nothing on A (its route,
        its token), and A writes nothing of B's into database 3.
        """
        base = self.redis.url.rsplit("/", 1)[0]
        a = self.spawn(REDIS_URL=f"{base}/3")
        token_a = yield a.token
        b = self.spawn(REDIS_URL=f"{base}/5")
        token_b = yield b.token
        self.assertNotEqual(token_a, token_b)
        on_a = yield self.client(a.port)
        on_b = yield self.client(b.port)
        answer = yield on_b.ask(token_b, "switch_provider", {"provider": "kimi"})
        self.assertTrue(answer["ok"], answer)
        answer = yield on_b.ask(token_b, "rotate_token")
        self.assertTrue(answer["ok"], answer)
        # A publication reaches the other instances within milliseconds.
        yield sleep(1.5)
        status = yield on_a.ask(token_a, "status")
        self.assertTrue(status["ok"], status)
        self.assertEqual(status["result"]["provider_id"], "gemini")
        for noise in (
            b"applied the cluster's route",
            b"adopted from the cluster",
            b"refused the cluster's session token",
            b"the store lost",
            b"the cluster store lost",
        ):
            self.assertNotIn(noise, a.stdout)
        channels = yield deferToThread(redis_command, self.redis, "PUBSUB", "CHANNELS", "openclaw:*")
        self.assertIn(b"openclaw:3:events", channels)
        self.assertIn(b"openclaw:5:events", channels)

    @inlineCallbacks
    def test_namesakes_in_another_database_warned_of(self):
        """
        A on database 0 and B, its REDIS_URL's database mistyped (1), of
        one CLUSTER_NAME: B warns as it joins that instances of its name
        listen in database 0, naming both databases and what to do, and
        its C{status} lists database 0; it serves all the same.  A, which
        joined first, looks again when it comes back after an outage
        (here, Redis closing the subscribed connections) and warns too; B
        does not warn twice.
        """
        base = self.redis.url.rsplit("/", 1)[0]
        a = self.spawn(REDIS_URL=f"{base}/0")
        token_a = yield a.token
        b = self.spawn(REDIS_URL=f"{base}/1")
        token_b = yield b.token
        warning = (
            rb"ClusterNode#warn\] another cluster named openclaw is on database 0 of this Redis \(its instances "
            rb"listen on its channel\), while this instance uses database 1 \(redis://127\.0\.0\.1:\d+/1\): the clusters "
            rb"share nothing but the name: each has its own session token and route, .*; if they are meant to be one "
            rb"cluster, set the same database in every instance's REDIS_URL; if not, give them different "
            rb"CLUSTER_NAMEs, which silences this"
        )
        yield printed(b, b"another cluster named openclaw is on database 0")
        self.assertRegex(b.stdout, warning)
        on_b = yield self.client(b.port)
        status = yield on_b.ask(token_b, "status")
        self.assertEqual(status["result"]["cluster_name_in_other_databases"], [0], status)
        self.assertEqual(status["result"]["cluster_store"], "up", status)
        self.assertNotIn(b"another cluster named", a.stdout)

        redis_command(self.redis, "CLIENT", "KILL", "TYPE", "pubsub")
        yield printed(
            a,
            b"another cluster named openclaw is on database 1 of this Redis (its instances listen on its channel), while this instance uses database 0",
        )
        on_a = yield self.client(a.port)
        deadline = time.monotonic() + 15
        while True:
            status = yield on_a.ask(token_a, "status")
            if status["result"]["cluster_store"] == "up" or time.monotonic() > deadline:
                break
            yield sleep(0.1)
        self.assertEqual(status["result"]["cluster_name_in_other_databases"], [1], status)
        yield printed(b, b"cluster store up", 2)
        yield sleep(1)
        self.assertEqual(b.stdout.count(b"another cluster named"), 1)
        # Neither the warning nor the look stopped anything.
        status = yield on_b.ask(token_b, "status")
        self.assertTrue(status["ok"], status)

    @inlineCallbacks
    def test_no_namesake_warning_in_one_database_or_under_another_name(self):
        """
        Two instances on database 0, and a third on database 1 under
        another CLUSTER_NAME (the way to keep two clusters on one Redis
        apart, said by the warning): no warning, and no
        C{cluster_name_in_other_databases} in C{status}, though each looked
        (Redis counts the C{PUBSUB CHANNELS} commands it answered: none
        would pass the rest of this test too).
        """
        base = self.redis.url.rsplit("/", 1)[0]
        a = self.spawn(REDIS_URL=f"{base}/0")
        token = yield a.token
        b = self.spawn(REDIS_URL=f"{base}/0")
        yield b.token
        c = self.spawn(REDIS_URL=f"{base}/1", CLUSTER_NAME="other")
        token_c = yield c.token
        # Each looked as it joined (an answer within milliseconds).
        yield sleep(1.5)
        self.assertGreaterEqual(pubsub_channels_answered(self.redis), 3)
        for process in (a, b, c):
            self.assertNotIn(b"another cluster named", process.stdout)
        on_b = yield self.client(b.port)
        status = yield on_b.ask(token, "status")
        self.assertEqual(status["result"]["instances_seen"], 2, status)
        self.assertNotIn("cluster_name_in_other_databases", status["result"])
        on_c = yield self.client(c.port)
        status = yield on_c.ask(token_c, "status")
        self.assertNotIn("cluster_name_in_other_databases", status["result"])

    @inlineCallbacks
    def test_namesakes_unknown_without_pubsub(self):
        """
        An ACL user without C{PUBSUB}: the instance joins and serves as
        ever, saying at debug level, once, that it could not look.
        """
        self.assertTrue(redis_command(self.redis, "ACL", "SETUSER", "default", "-pubsub").startswith(b"+OK"))
        self.addCleanup(redis_command, self.redis, "ACL", "SETUSER", "default", "+@all")
        base = self.redis.url.rsplit("/", 1)[0]
        a = self.spawn(REDIS_URL=f"{base}/0")
        yield a.token
        b = self.spawn(REDIS_URL=f"{base}/1", LOG_LEVEL="debug")
        token_b = yield b.token
        yield printed(b, b"could not look for instances of cluster openclaw in other databases")
        self.assertRegex(b.stdout, rb"\(PUBSUB CHANNELS\): NOPERM")
        on_b = yield self.client(b.port)
        status = yield on_b.ask(token_b, "status")
        self.assertEqual(status["result"]["cluster_store"], "up", status)
        self.assertNotIn("cluster_name_in_other_databases", status["result"])
        redis_command(self.redis, "CLIENT", "KILL", "TYPE", "pubsub")
        yield printed(b, b"cluster store up", 2)
        yield sleep(1)
        self.assertEqual(b.stdout.count(b"could not look for instances"), 1)
        self.assertNotIn(b"another cluster named", a.stdout + b.stdout)


class StoreTroubleTests(ClusterCase):
    """
    A cluster through Redis's troubles: a connection comes back after Redis
    froze, a token is checked before it is adopted, a lockout closes other
    instances' unauthenticated connections, reconnection is quiet, and
    Redis's own refusals are said.
    """

    def freeze(self) -> None:
        assert self.redis.process is not None
        pid = self.redis.process.pid
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(self.thaw)

    def thaw(self) -> None:
        if self.redis.process is not None:
            os.kill(self.redis.process.pid, signal.SIGCONT)

    @inlineCallbacks
    def switch_soon(self, client: Any, token: str, provider: str, seconds: float = 5) -> Any:
        began = time.monotonic()
        while True:
            answer = yield client.ask(token, "switch_provider", {"provider": provider})
            if answer["ok"] or time.monotonic() - began > seconds:
                break
            yield sleep(0.1)
        self.assertTrue(answer["ok"], answer)
        return time.monotonic() - began

    @inlineCallbacks
    def test_redis_frozen_then_back(self):
        """
        Redis frozen (SIGSTOP) past REDIS_TIMEOUT_SECONDS while a switch
        is written, for 1.5 s and then for 4 s (13 times the timeout), then
        continued; then restarted empty.  Each time the store goes down
        (gauge 0, one line), the switch after it works within seconds
        (gauge 1, one line), and nothing else is logged about it: no
        retries, no dead connections, no txredisapi errors.
        """
        a = self.spawn(REDIS_TIMEOUT_SECONDS="0.3")
        token = yield a.token
        b = self.spawn(REDIS_TIMEOUT_SECONDS="0.3")
        yield b.token
        on_a = yield self.client(a.port)
        on_b = yield self.client(b.port)
        for outage, (stall, provider) in enumerate(((1.5, "kimi"), (4.0, "gemini")), start=1):
            began = time.monotonic()
            self.freeze()
            answer = yield on_a.ask(
                token, "switch_provider", {"provider": "kimi" if provider == "gemini" else "gemini"}
            )
            self.assertFalse(answer["ok"], answer)
            up = yield store_up_becomes(a.api_port, 0, seconds=1)
            self.assertEqual(up, 0)
            yield sleep(max(0.0, stall - (time.monotonic() - began)))
            self.thaw()
            took = yield self.switch_soon(on_a, token, provider)
            self.assertLess(took, 5)
            up = yield store_up_becomes(a.api_port, 1)
            self.assertEqual(up, 1)
            self.assertEqual(a.stdout.count(b"cluster store unreachable ("), outage, a.stdout[-3000:])
            # Frozen, not gone: the line says it timed out.
            self.assertEqual(
                a.stdout.count(b"cluster store unreachable (Redis timed out: no answer within 0.3 s"), outage
            )
            self.assertEqual(a.stdout.count(b"cluster store up:"), outage + 1)
            status = yield self.status_becomes(on_b, token, provider)
            self.assertEqual(status["result"]["provider_id"], provider)
        # Restarted (empty): the same.
        self.redis.stop()
        up = yield store_up_becomes(a.api_port, 0)
        self.assertEqual(up, 0)
        yield sleep(1.5)
        self.redis.start()
        yield self.switch_soon(on_a, token, "kimi", seconds=10)
        for process in (a, b):
            up = yield store_up_becomes(process.api_port, 1)
            self.assertEqual(up, 1)
            for noise in (b"Scheduling retry", b"Discarding dead connection", b"Redis error"):
                self.assertNotIn(noise, process.stdout)
        self.assertEqual(a.stdout.count(b"cluster store unreachable ("), 3)
        self.assertEqual(a.stdout.count(b"cluster store up:"), 4)
        self.assertEqual(b.stdout.count(b"cluster store unreachable ("), b.stdout.count(b"cluster store up:") - 1)

    @inlineCallbacks
    def test_token_of_another_secret_refused(self):
        """
        An instance whose JWT_SECRET is not the cluster's refuses to start,
        with one line saying what to do; it never adopts the cluster's
        token.
        """
        a = self.spawn()
        yield a.token
        b = self.spawn(JWT_SECRET=OTHER_SECRET)
        ended = yield b.ended
        self.assertEqual(ended, 1)  # a failure for a unit manager, not a stop
        self.assertFalse(TOKEN_LINE.search(b.stdout))
        self.assertEqual(
            b.stdout.count(
                b"the cluster store at " + self.redis.url.encode() + b" holds a session token this instance "
                b"cannot trust (it is signed with another JWT_SECRET): give every instance of cluster openclaw "
                b"the same JWT_SECRET, or a CLUSTER_NAME of its own"
            ),
            1,
            b.stdout[-3000:],
        )

    @inlineCallbacks
    def test_lockout_closes_unauthenticated_connections_elsewhere(self):
        """
        AUTH_LOCKOUT_FAILURES=4, all four guesses on A: B's connections from
        that address that have not authenticated are closed with 1008 at
        once, before they can guess.
        """
        self.extra = {"AUTH_LOCKOUT_FAILURES": "4"}
        a = self.spawn()
        token = yield a.token
        b = self.spawn()
        yield b.token
        waiting = []
        for _ in range(2):
            client = yield self.client(b.port)
            waiting.append(client)
        authenticated = yield self.client(b.port)
        answer = yield authenticated.ask(token, "ping")
        self.assertTrue(answer["ok"], answer)
        for _ in range(2):
            client = yield self.client(a.port)
            for _ in range(2):
                answer = yield client.ask("forged", "ping")
                self.assertFalse(answer["ok"], answer)
        for client in waiting:
            code, reason = yield client.closed.addTimeout(5, reactor)
            self.assertEqual(code, 1008)
            self.assertIn("too many failed authentications", reason)
        answer = yield authenticated.ask(token, "ping")
        self.assertTrue(answer["ok"], answer)

    @inlineCallbacks
    def test_database_out_of_range_said_once(self):
        """
        REDIS_URL naming a database Redis does not have: Redis's own error,
        once, with what to do.
        """
        process = spawn_gateway(
            self,
            ["--port", str(free_port()), "--interface", "127.0.0.1"],
            {**self.env(), "REDIS_URL": self.redis.url.rsplit("/", 1)[0] + "/99"},
        )
        yield printed(process, b"ERR DB index is out of range")
        # Said once, however often it tries again; the wait's line points
        # at it, where it said to check that Redis was running.
        yield printed(process, b"not listening yet: waiting for the cluster store", seconds=10)
        self.assertFalse(process.token.called)
        self.assertEqual(process.stdout.count(b"ERR DB index is out of range"), 1, process.stdout[-3000:])
        self.assertIn(b"REDIS_URL names a database this Redis does not have", process.stdout)
        self.assertNotIn(b"Redis error", process.stdout)
        self.assertIn(
            b"Redis answers but refuses this instance: do what its refusal, logged above, says", process.stdout
        )
        self.assertNotIn(b"check that Redis is running", process.stdout)

    @inlineCallbacks
    def test_subscription_never_confirmed(self):
        """
        A subscription Redis never confirms (its replies lost): given up
        after REDIS_TIMEOUT_SECONDS and made again on fresh connections.
        """
        proxy = DelayingProxy(self.redis)
        self.addCleanup(proxy.stop)
        proxy.mute_subscribes = 1
        a = self.spawn(REDIS_URL=proxy.url, REDIS_TIMEOUT_SECONDS="0.3")
        token = yield a.token.addTimeout(10, reactor)
        self.assertGreaterEqual(proxy.subscribes, 2)
        on_a = yield self.client(a.port)
        answer = yield on_a.ask(token, "switch_provider", {"provider": "kimi"})
        self.assertTrue(answer["ok"], answer)


class _Silent(Protocol):
    """
    A server that accepts and never answers (a frozen or wrong service);
    its connections are aborted when the test ends.
    """

    def connectionMade(self) -> None:
        self.factory.connections.add(self)

    def connectionLost(self, reason: Any) -> None:
        self.factory.connections.discard(self)


def silent_server(testcase: TestCase) -> int:
    """
    Listen with L{_Silent} on a free loopback port, until the test ends:
    the port.
    """
    factory = Factory.forProtocol(_Silent)
    factory.connections = set()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")

    def stop() -> Any:
        for connection in list(factory.connections):
            connection.transport.abortConnection()
        return port.stopListening()

    testcase.addCleanup(stop)
    return int(port.getHost().port)


def tls_redis(testcase: TestCase, client_certificates: bool = False) -> tuple[RedisServer, Path]:
    """
    A C{redis-server} serving TLS only, with a certificate for
    C{127.0.0.1} from a throwaway CA (asking clients for theirs if
    C{client_certificates}), stopped when the test ends: the server and
    the CA's PEM file (for C{SSL_CERT_FILE}).
    """
    # Absolute: redis-server reads the files from its --dir.
    directory = Path(testcase.mktemp()).resolve()
    directory.mkdir(parents=True)
    ca = make_ca()
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca.pem)
    redis = RedisServer(
        tls=(ca_file, *ca.server_files(directory, "127.0.0.1")), client_certificates=client_certificates
    )
    # Before it starts: one that never answers is stopped too.
    testcase.addCleanup(redis.cleanup)
    redis.start()
    return redis, ca_file


class StopWithTLSStuck(ClusterCase):
    """
    SIGTERM while a C{rediss://} connection is stuck in its TLS handshake
    (the server never answers it: its close cannot finish cleanly either):
    the process still ends within SHUTDOWN_GRACE_SECONDS and a little.
    """

    grace = 2.0

    def env(self) -> dict[str, str]:
        return {**super().env(), "SHUTDOWN_GRACE_SECONDS": str(self.grace)}

    def spawn_stuck(self, url: str) -> Any:
        """
        A gateway on C{url}, which it cannot reach: it waits for the store.
        """
        return spawn_gateway(
            self, ["--port", str(free_port()), "--interface", "127.0.0.1"], {**self.env(), "REDIS_URL": url}
        )

    @inlineCallbacks
    def stops_in_time(self, process: Any) -> Any:
        """
        SIGTERM to C{process} once connected, and (REDIS_TIMEOUT_SECONDS
        0.5) its subscription given up and its connections dropped at
        least once: it ends within SHUTDOWN_GRACE_SECONDS and a little.
        """

        def kill() -> None:
            # The cleanup's SIGTERM would not end a hung process.
            if not process.ended.called:
                process.transport.signalProcess("KILL")

        self.addCleanup(kill)
        yield sleep(2.5)
        self.assertFalse(process.ended.called, process.stdout[-3000:])
        began = time.monotonic()
        process.transport.signalProcess("TERM")
        limit = self.grace + 3
        try:
            yield within(observed(process.ended), limit, "the gateway's exit after SIGTERM")
        except WaitedTooLong:
            self.fail(f"still running {limit:g} s after SIGTERM: {process.stdout[-3000:]!r}")
        self.assertLess(time.monotonic() - began, limit)

    def test_server_that_never_answers(self):
        """
        C{rediss://} to a server that accepts and never answers.
        """
        port = silent_server(self)
        return self.stops_in_time(self.spawn_stuck(f"rediss://:pw@127.0.0.1:{port}/3"))

    def test_plain_redis(self):
        """
        C{rediss://} to a plain (not TLS) Redis, which takes the TLS
        handshake for the start of a command and waits for its end.
        """
        return self.stops_in_time(self.spawn_stuck(f"rediss://127.0.0.1:{self.redis.port}/3"))

    @inlineCallbacks
    def test_tls_redis_frozen(self):
        """
        A TLS Redis (its CA given with C{SSL_CERT_FILE}) frozen (SIGSTOP)
        while the instance runs: the instance still ends in time.
        """
        redis, ca_file = tls_redis(self)
        a = self.spawn(REDIS_URL=redis.url, SSL_CERT_FILE=str(ca_file))
        yield a.token
        assert redis.process is not None
        os.kill(redis.process.pid, signal.SIGSTOP)
        self.addCleanup(os.kill, redis.process.pid, signal.SIGCONT)
        yield self.stops_in_time(a)


class ConnectionFailuresSaid(ClusterCase):
    """
    Why the connection attempts to Redis fail is logged (with what to do),
    once for each reason however often they are tried again, not only
    "not listening yet: waiting for the cluster store".
    """

    def spawn_waiting(self, url: str, **env: str) -> Any:
        return spawn_gateway(
            self, ["--port", str(free_port()), "--interface", "127.0.0.1"], {**self.env(), "REDIS_URL": url, **env}
        )

    @inlineCallbacks
    def said_once(self, process: Any, line: bytes) -> Any:
        yield printed(process, line)
        # Tried again (REDIS_RECONNECT_MAX_SECONDS=0.5) several times.
        yield sleep(2.5)
        self.assertFalse(process.token.called)
        self.assertEqual(process.stdout.count(line), 1, process.stdout[-3000:])
        self.assertEqual(process.stdout.count(b"could not connect to the cluster store"), 1, process.stdout[-3000:])

    @inlineCallbacks
    def test_untrusted_certificate(self):
        """
        C{rediss://} to a Redis whose certificate is from a CA the system
        does not trust: the TLS error, and how to give the CA.  With it in
        C{SSL_CERT_FILE}, the instance joins, and says nothing of the kind.
        """
        redis, ca_file = tls_redis(self)
        untrusting = self.spawn_waiting(redis.url)
        yield self.said_once(
            untrusting,
            b"could not connect to the cluster store at " + redis.url.encode() + b": the TLS handshake failed: "
            b"certificate verify failed; if Redis's certificate is from a CA of your own, add it to the system's "
            b"trust store or give it with SSL_CERT_FILE",
        )
        trusting = self.spawn_waiting(redis.url, SSL_CERT_FILE=str(ca_file))
        yield within(trusting.token, 30, "the banner of the gateway given the CA")
        self.assertNotIn(b"could not connect to the cluster store", trusting.stdout)

    def test_client_certificate_asked(self):
        """
        A TLS Redis that asks for a client certificate (its default,
        C{tls-auth-clients yes}): how to make it not ask.
        """
        redis, ca_file = tls_redis(self, client_certificates=True)
        asked = self.spawn_waiting(redis.url, SSL_CERT_FILE=str(ca_file))
        return self.said_once(
            asked,
            b"certificate required; this Redis asks for a client certificate, which the gateway does not send: "
            b"set tls-auth-clients no (or optional) in its redis.conf",
        )

    @inlineCallbacks
    def test_no_redis_there(self):
        """
        Nothing listening on REDIS_URL's port, no socket at its path, an
        HTTP server on its port: each said, once.
        """
        refused = self.spawn_waiting(f"redis://:pw@127.0.0.1:{free_port()}/3")
        # (Short: a socket path is at most 107 bytes.)
        missing = self.spawn_waiting("unix:///nonexistent-openclaw-test/redis.sock?db=3")
        http = self.spawn_waiting(f"redis://127.0.0.1:{self.upstream.port}/3")
        yield self.said_once(refused, b"Connection refused; check that Redis is running")
        yield self.said_once(missing, b"No such file or directory; check that Redis is running")
        yield self.said_once(
            http,
            b"the server closed the connection without a Redis answer; check that REDIS_URL's host and port are "
            b"Redis's, and its scheme",
        )


class LockoutBeforeTheToken(TestCase):
    @inlineCallbacks
    def test_locked_out_connection_gets_no_guess(self):
        """
        A lockout imposed while a connection is open and unauthenticated
        (decided elsewhere): its next message, even with the right token,
        is not evaluated; the connection is closed with 1008.
        """
        gateway = start_gateway(self)
        client = yield open_client(self, gateway.port)
        gateway.service.factory.lockout.impose("127.0.0.1", reactor.seconds() + 300)
        client.send({"token": gateway.token, "cmd": "ping"})
        code, reason = yield client.closed.addTimeout(5, reactor)
        self.assertEqual(code, 1008)
        self.assertIn("too many failed authentications", reason)
        self.assertEqual(client.received.pending, [])


class ListenOnceSynced(TestCase):
    timeout = 60

    def waiting(self, args: list[str]) -> tuple[RedisServer, GatewayProcess]:
        """
        A Redis not started yet, and an instance of its cluster started on
        C{args}, which waits for it.
        """
        redis = RedisServer()
        self.addCleanup(redis.cleanup)
        env = base_env(
            JWT_SECRET=SECRET,
            REDIS_URL=redis.url,
            REDIS_TIMEOUT_SECONDS="0.5",
            REDIS_RECONNECT_MAX_SECONDS="0.5",
            GATEWAY_API_KEYS=GATEWAY_KEY,
        )
        return redis, spawn_gateway(self, args, env)

    @inlineCallbacks
    def test_listens_only_once_in_step(self):
        """
        With Redis unreachable at start-up the instance does not listen (it
        has no cluster token or route to answer with) and says so every
        few seconds; once Redis is there it reloads, prints the cluster's
        token and listens.
        """
        port = free_port()
        redis, process = self.waiting(["--port", str(port), "--interface", "127.0.0.1"])
        yield sleep(5.8)
        yield printed(process, b"not listening yet: waiting for the cluster store at " + redis.url.encode())
        self.assertFalse(process.token.called)
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        redis.start()
        yield printed(process, b"in step with cluster openclaw: listening", seconds=30)
        token = yield process.token
        client = yield open_client(self, port)
        answer = yield client.ask(token, "ping")
        self.assertTrue(answer["ok"], answer)

    @inlineCallbacks
    def test_port_taken_meanwhile_ends_it(self):
        """
        A port taken while the instance waited for Redis: once in step, it
        cannot listen there, says so in one critical line and ends with
        status 1 (so that a unit's Restart=on-failure starts it again),
        where it ran on without its API listener, silently, and stopped
        with status 0 (review s30).
        """
        port, api_port = free_port(), free_port()
        redis, process = self.waiting(["--port", str(port), "--api-port", str(api_port), "--interface", "127.0.0.1"])
        yield printed(process, b"not listening yet: waiting for the cluster store at " + redis.url.encode())
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", api_port))
        taken.listen()
        redis.start()
        status = yield process.ended.addTimeout(30, reactor)
        self.assertEqual(status, 1)
        self.assertIn(
            f"openclaw: cannot listen on 127.0.0.1:{api_port} (API_PORT, from the command line): address already "
            "in use".encode(),
            process.stdout + process.stderr,
        )
        self.assertIn(b"; the gateway stops", process.stdout + process.stderr)


class StoreRefusals(ClusterCase):
    @inlineCallbacks
    def test_refused_writes_answer_at_once(self):
        """
        Redis refusing the write itself (out of memory, a read-only
        replica, a failed RDB snapshot, an ACL user without the scripting
        commands): the command
        answers at once with Redis's words and what to do, nothing changed
        and the store still up; it answered "did not confirm the change in
        time" after the confirmation attempts, the cause in the log only.
        """
        a = self.spawn()
        token = yield a.token
        on_a = yield self.client(a.port)
        where = f"cluster store at redis://127.0.0.1:{self.redis.port}/0 refused the change: "
        # Redis's snapshot fails: a directory where its file goes.
        snapshot = Path(self.redis.directory) / "dump.rdb"
        cases = [
            (
                [("CONFIG", "SET", "maxmemory", "1")],
                [("CONFIG", "SET", "maxmemory", "0")],
                "OOM command not allowed when used memory > 'maxmemory'; nothing changed: free memory in that Redis "
                "or raise its maxmemory, or set a maxmemory-policy that evicts other keys",
            ),
            (
                [("REPLICAOF", "127.0.0.1", str(free_port()))],
                [("REPLICAOF", "NO", "ONE")],
                "READONLY You can't write against a read only replica; nothing changed: "
                "REDIS_URL points at a read-only replica: point it at the primary",
            ),
            (
                [("CONFIG", "SET", "save", '"3600 1"'), ("BGSAVE",)],
                # Back to no snapshots (a stop would try one and fail).
                [("CONFIG", "SET", "stop-writes-on-bgsave-error", "no"), ("CONFIG", "SET", "save", '""')],
                "; nothing changed: that Redis cannot persist to disk (its RDB snapshot or its append-only file "
                "failed; its log says why: a full disk, a directory it cannot write): fix that",
            ),
            (
                [("ACL", "SETUSER", "default", "-evalsha", "-eval")],
                [("ACL", "SETUSER", "default", "+@all")],
                "; nothing changed: grant the Redis ACL user of REDIS_URL the scripting commands (EVAL, EVALSHA, "
                "SCRIPT)",
            ),
        ]
        snapshot.mkdir()
        # Redis stops only once its snapshot is saved, unless none is asked.
        self.addCleanup(redis_command, self.redis, "CONFIG", "SET", "save", '""')
        for refuse, allow, said in cases:
            for words in refuse:
                self.assertTrue(redis_command(self.redis, *words).startswith(b"+"), words)
            if refuse[-1] == ("BGSAVE",):
                yield self.snapshot_failed()
            for command, args in (("switch_provider", {"provider": "kimi"}), ("rotate_token", None)):
                began = time.monotonic()
                answer = yield on_a.ask(token, command, args)
                took = time.monotonic() - began
                self.assertFalse(answer["ok"], answer)
                self.assertTrue(answer["error"].startswith(where), answer)
                self.assertTrue(answer["error"].endswith(said), answer)
                self.assertNotIn("did not confirm", answer["error"])
                # Under REDIS_TIMEOUT_SECONDS (0.5): no confirmation asked.
                self.assertLess(took, 0.4, answer)
            status = yield on_a.ask(token, "status")
            self.assertEqual(status["result"]["cluster_store"], "up", status)
            self.assertEqual(status["result"]["provider_id"], "gemini")
            for words in allow:
                self.assertTrue(redis_command(self.redis, *words).startswith(b"+OK"), words)
        self.assertIn(b"the cluster store refused to write route (OOM command not allowed", a.stdout)
        self.assertNotIn(b"asking the store whether it was written", a.stdout)
        # The token held is still the cluster's: nothing was rotated.
        answer = yield on_a.ask(token, "switch_provider", {"provider": "kimi"})
        self.assertTrue(answer["ok"], answer)

    @inlineCallbacks
    def test_refused_heartbeats_keep_the_store_up(self):
        """
        Redis refusing writes for a while (out of memory): its refusal of
        the heartbeats is said once with what to do, and the instance
        stays in step, its commands answered with Redis's refusal (after
        two heartbeats it went down, and commands answered "unavailable").
        """
        a = self.spawn()
        token = yield a.token
        on_a = yield self.client(a.port)
        self.assertTrue(redis_command(self.redis, "CONFIG", "SET", "maxmemory", "1").startswith(b"+OK"))
        self.addCleanup(redis_command, self.redis, "CONFIG", "SET", "maxmemory", "0")
        yield printed(a, b"the cluster store refuses this instance's heartbeat (OOM command not allowed", seconds=30)
        yield printed(a, b"every change is refused until it takes writes again: free memory in that Redis")
        status = yield on_a.ask(token, "status")
        self.assertEqual(status["result"]["cluster_store"], "up", status)
        answer = yield on_a.ask(token, "switch_provider", {"provider": "kimi"})
        self.assertIn("refused the change: OOM command not allowed", answer.get("error", ""), answer)
        self.assertTrue(redis_command(self.redis, "CONFIG", "SET", "maxmemory", "0").startswith(b"+OK"))
        answer = yield on_a.ask(token, "switch_provider", {"provider": "kimi"})
        self.assertTrue(answer["ok"], answer)
        self.assertEqual(a.stdout.count(b"refuses this instance's heartbeat"), 1)

    @inlineCallbacks
    def snapshot_failed(self) -> Any:
        """
        Wait for Redis's background save to fail (it writes the snapshot in
        a child process).
        """
        deadline = time.monotonic() + 10
        while b"rdb_last_bgsave_status:err" not in redis_command(self.redis, "INFO", "persistence"):
            self.assertLess(time.monotonic(), deadline, "Redis's snapshot did not fail")
            yield sleep(0.05)


class StoreDownReasons(ClusterCase):
    @inlineCallbacks
    def error_becomes(self, client: Any, token: str, wanted: str, seconds: float = 15) -> Any:
        deadline = time.monotonic() + seconds
        while True:
            status = yield client.ask(token, "status")
            error = status["result"].get("cluster_store_error") or ""
            if wanted in error or time.monotonic() > deadline:
                return error
            yield sleep(0.1)

    @inlineCallbacks
    def test_status_says_why_the_store_is_down(self):
        """
        While Redis wants a password it was not given, then refuses
        connections, C{status}'s C{cluster_store_error} says so, as the log
        does; it said that the subscription was not confirmed, or that no
        answer came in time.
        """
        a = self.spawn()
        token = yield a.token
        on_a = yield self.client(a.port)
        self.assertTrue(redis_command(self.redis, "CONFIG", "SET", "requirepass", "hunter2").startswith(b"+OK"))
        for kind in ("normal", "pubsub"):
            redis_command(self.redis, "AUTH", "hunter2\r\nCLIENT", "KILL", "TYPE", kind)
        error = yield self.error_becomes(on_a, token, "NOAUTH")
        self.assertIn("NOAUTH Authentication required", error)
        yield sleep(1.5)
        error = yield self.error_becomes(on_a, token, "NOAUTH", seconds=0)
        self.assertIn("NOAUTH Authentication required", error)
        # The subscription's refusal too says to put the password in
        # REDIS_URL, not to grant an ACL (cluster trial s43).
        yield printed(a, b"refused the subscription to the cluster's channel")
        self.assertNotIn(b"SUBSCRIBE command", a.stdout)
        self.redis.stop()
        error = yield self.error_becomes(on_a, token, "Connection refused")
        self.assertTrue(error.startswith("could not connect: "), error)
        self.assertIn("Connection refused", error)
        yield sleep(1.5)
        error = yield self.error_becomes(on_a, token, "Connection refused", seconds=0)
        self.assertIn("Connection refused", error)

    @inlineCallbacks
    def test_status_says_redis_refused_the_subscription(self):
        """
        An ACL user that may not subscribe to the cluster's channel: the
        log and C{status} say that Redis refused the subscription and what
        to grant; both said it was not confirmed in time (Redis had
        answered at once).
        """
        a = self.spawn()
        token = yield a.token
        on_a = yield self.client(a.port)
        self.assertTrue(redis_command(self.redis, "ACL", "SETUSER", "default", "resetchannels").startswith(b"+OK"))
        self.addCleanup(redis_command, self.redis, "ACL", "SETUSER", "default", "allchannels")
        redis_command(self.redis, "CLIENT", "KILL", "TYPE", "pubsub")
        error = yield self.error_becomes(on_a, token, "refused the subscription")
        self.assertTrue(error.startswith("Redis refused the subscription to the cluster's channel: NOPERM"), error)
        self.assertNotIn("not confirmed", error)
        # Said once, not again in brackets.
        self.assertEqual(error.count("NOPERM"), 1, error)
        yield printed(a, b"grant the Redis ACL user of REDIS_URL the SUBSCRIBE command and that channel")
        self.assertTrue(redis_command(self.redis, "ACL", "SETUSER", "default", "allchannels").startswith(b"+OK"))
        deadline = time.monotonic() + 30
        while True:
            status = yield on_a.ask(token, "status")
            if status["result"]["cluster_store"] == "up" or time.monotonic() > deadline:
                break
            yield sleep(0.1)
        self.assertEqual(status["result"]["cluster_store"], "up", status)


def redis_command(redis: RedisServer, *words: str) -> bytes:
    """
    One command to C{redis}, from a blocking socket (the reactor does not
    run meanwhile): the start of its reply.
    """
    with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as s:
        s.sendall(" ".join(words).encode() + b"\r\n")
        return s.recv(65536)


def pubsub_channels_answered(redis: RedisServer) -> int:
    """
    How many C{PUBSUB CHANNELS} commands C{redis} has answered since it
    started (C{INFO commandstats}, Redis 7's C{cmdstat_pubsub|channels}).
    """
    with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as s:
        s.sendall(b"INFO commandstats\r\n")
        info = s.recv(65536)
        # A bulk string: $<length>\r\n<length bytes>\r\n.
        header, _, _ = info.partition(b"\r\n")
        while len(info) < len(header) + int(header[1:]) + 4:
            chunk = s.recv(65536)
            if not chunk:
                break
            info += chunk
    found = re.search(rb"^cmdstat_pubsub\|channels:calls=(\d+),", info, re.MULTILINE)
    return int(found.group(1)) if found else 0


class _Node:
    """
    What L{RedisStore} tells its node: here, only that it is connected.
    """

    up = False
    instance = "a"

    def __init__(self) -> None:
        self.in_step: Deferred[None] = Deferred()

    def connected(self) -> None:
        if not self.in_step.called:
            self.in_step.callback(None)

    def lost(self, reason: str) -> None:
        pass


class StoreConnections(TestCase):
    """
    L{RedisStore}'s own connections, on a real C{redis-server}, with no
    gateway.
    """

    timeout = 30

    def setUp(self) -> None:
        self.redis = RedisServer()
        self.redis.start()
        self.addCleanup(self.redis.cleanup)

    @inlineCallbacks
    def connected_store(self, url: str) -> Any:
        from openclaw.cluster.redis import RedisStore

        store = RedisStore(url, "p", 2.0, 0.5, reactor)
        node = _Node()
        store.start(node)  # type: ignore[arg-type]
        self.addCleanup(store.stop)
        yield within(node.in_step, 10, "the store's subscription")
        return store

    def clients(self) -> int:
        reply = redis_command(self.redis, "INFO", "clients").decode()
        found = re.search(r"^connected_clients:(\d+)", reply, re.MULTILINE)
        assert found, reply
        # Less the connection asking.
        return int(found.group(1)) - 1

    @inlineCallbacks
    def test_stop_right_after_a_rebuild(self):
        """
        L{RedisStore.stop} before the connections a rebuild dropped are
        disconnected (the next turn of the reactor): they are
        disconnected too, and the Deferred it returns waits for them.
        """
        store = yield self.connected_store(self.redis.url)
        # Both connections (commands, subscription) as Redis counts them: it
        # may count the second a moment after the subscription is confirmed.
        for _ in range(500):
            if self.clients() == 2:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.clients(), 2)
        store.rebuild("a rebuild")
        yield store.stop()
        # Redis sees the closes on its own time; the reactor does not run
        # meanwhile (it would disconnect what stop left over).
        deadline = time.monotonic() + 5
        while self.clients() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(self.clients(), 0)

    @inlineCallbacks
    def test_epoch(self):
        """
        The heartbeat script's epoch: made by the first heartbeat, the same
        at the next, another after a FLUSHALL (what tells every instance
        the store lost its keys, whoever wrote the state back first).
        """
        store = yield self.connected_store(self.redis.url)
        first = yield store.heartbeat("a", 30, ("route", "token"), True)
        again = yield store.heartbeat("a", 30, ("route", "token"), True)
        self.assertEqual(len(first.epoch), 32)
        self.assertEqual(again.epoch, first.epoch)
        self.assertEqual(redis_command(self.redis, "GET", "p:epoch"), b"$32\r\n" + first.epoch.encode() + b"\r\n")
        redis_command(self.redis, "FLUSHALL")
        flushed = yield store.heartbeat("a", 30, ("route", "token"), True)
        self.assertNotEqual(flushed.epoch, first.epoch)
        self.assertEqual(flushed.databases, frozenset())

    @inlineCallbacks
    def test_databases(self):
        """
        The heartbeat script's consumers' databases: each instance's, kept
        while it is marked alive (not when it only looks), read by all.
        """
        store = yield self.connected_store(self.redis.url)
        beat = yield store.heartbeat("a", 30, ("route", "token"), True, "db-1")
        self.assertEqual(beat.databases, frozenset({"db-1"}))
        beat = yield store.heartbeat("b", 30, ("route", "token"), False, "db-2")
        self.assertEqual(beat.databases, frozenset({"db-1"}))
        beat = yield store.heartbeat("b", 30, ("route", "token"), True, "db-2")
        self.assertEqual(beat.databases, frozenset({"db-1", "db-2"}))
        beat = yield store.heartbeat("c", 30, ("route", "token"), True)
        self.assertEqual(beat.databases, frozenset({"db-1", "db-2"}))

    @inlineCallbacks
    def test_unsaved_revokes(self):
        """
        The key revokes kept for the other instances: written with their
        consumers' announcements, read back, forgotten.
        """
        store = yield self.connected_store(self.redis.url)
        yield store.publish_revokes("a", {"h1": ("team", "Pre00001"), "h2": ("ops", "Pre00002")}, ["team", "ops"])
        revokes = yield store.revokes()
        self.assertEqual(revokes, {"h1": ("team", "Pre00001"), "h2": ("ops", "Pre00002")})
        self.assertEqual(redis_command(self.redis, "HGET", "p:changes", "consumers"), b"$1\r\n2\r\n")
        yield store.revokes_saved(["h1"])
        revokes = yield store.revokes()
        self.assertEqual(revokes, {"h2": ("ops", "Pre00002")})

    @inlineCallbacks
    def test_password_kept_out_of_the_identity(self):
        """
        A password in C{REDIS_URL} is sent in the handshake, and kept out
        of the connection's identity (txredisapi's C{uuid}).
        """
        from openclaw.cluster.redis import _Commands, redis_endpoint

        self.assertTrue(redis_command(self.redis, "CONFIG", "SET", "requirepass", "hunter2").startswith(b"+OK"))
        url = f"redis://:hunter2@127.0.0.1:{self.redis.port}/0"
        store = yield self.connected_store(url)
        factory = _Commands(store, redis_endpoint(url, reactor, 2.0)[1])
        self.assertNotIn("hunter2", factory.uuid)
        self.assertEqual(factory.uuid, f"redis://:***@127.0.0.1:{self.redis.port}/0")

    @inlineCallbacks
    def test_password_as_a_query_parameter(self):
        """
        A password given as C{?password=} (as redis-py takes it) is sent in
        the handshake too, and never shown: the store connects, and its
        identity and the redacted URL have C{***} in its place.
        """
        from openclaw.cluster.redis import _Commands, redis_endpoint

        self.assertTrue(redis_command(self.redis, "CONFIG", "SET", "requirepass", "hunter2").startswith(b"+OK"))
        url = f"redis://127.0.0.1:{self.redis.port}/0?password=hunter2"
        store = yield self.connected_store(url)
        factory = _Commands(store, redis_endpoint(url, reactor, 2.0)[1])
        self.assertEqual(factory.uuid, f"redis://127.0.0.1:{self.redis.port}/0?password=***")
        self.assertEqual(masked_url("unix:///run/r.sock?db=0&password=a%26b"), "unix:///run/r.sock?db=0&password=***")


class Settings18(TestCase):
    def test_masked_url_masks_the_whole_password(self):
        """
        C{masked_url} masks a query password to the URL's end, whatever
        it holds (C{?} is a query character, RFC 3986 3.4; an unencoded
        C{&} may be the password's: C{?password=sec&ret}; C{#} ends the URL
        where it is not percent-encoded), a userinfo password up to its
        last C{@}, and never shows a fragment.
        """

        for url, shown in (
            ("unix:///tmp/r.sock?db=0&password=top?secret", "unix:///tmp/r.sock?db=0&password=***"),
            ("unix:///tmp/r.sock?password=top?secret&db=1", "unix:///tmp/r.sock?password=***"),
            ("unix:///tmp/r.sock?db=0?password=top?secret", "unix:///tmp/r.sock?db=0?password=***"),
            ("redis://127.0.0.1:1/x?password=top#secret", "redis://127.0.0.1:1/x?password=***"),
            ("redis://127.0.0.1:1/0?password=top@secret", "redis://127.0.0.1:1/0?password=***"),
            ("redis://h/0?pass%77ord=topsecret", "redis://h/0?pass%77ord=***"),
            ("redis://u:top#secret@h:1/0", "redis://u:***@h:1/0"),
            ("redis://:top/sec@ret@h:1/0?db=0", "redis://:***@h:1/0?db=0"),
            ("redis://h:1/0#topsecret", "redis://h:1/0"),
            ("redis://h:1/0?db=0#topsecret", "redis://h:1/0?db=0"),
            ("redis://user@h:1/0", "redis://user@h:1/0"),
        ):
            self.assertEqual(masked_url(url), shown, url)

    def test_password_field_masked_to_the_end(self):
        """
        Once a C{password} field starts, after a C{?}, C{&} or C{;} (C{;}
        or C{?} written where C{&} was meant, so the password is another
        field's value) and in any case, everything from its value to the
        URL's end is masked: an unencoded C{&} in it (C{sec&ret}) showed
        the password's tail, and C{?db=0;password=...}, refused (its
        C{db} no number), showed it in clear.  One C{password=} in the
        user information (after C{&} or C{;}, an C{@} after it) is that
        password's.
        """
        from openclaw.settings import ConfigError, load_settings

        for url, shown in (
            ("redis://h/0?db=0;password=hunter22", "redis://h/0?db=0;password=***"),
            ("unix:///r.sock?password=sec&ret", "unix:///r.sock?password=***"),
            ("unix:///r.sock?db=0&password=sec&ret&db=1", "unix:///r.sock?db=0&password=***"),
            ("redis://h/0?db=1;PassWord=hunter22&x=1", "redis://h/0?db=1;PassWord=***"),
            ("redis://h/0;password=hunter22", "redis://h/0;password=***"),
            ("redis://u:sec;password=ret@h:1/0", "redis://u:***@h:1/0"),
            ("redis://u:sec&password=ret@h:1/0?password=top", "redis://u:***@h:1/0?password=***"),
        ):
            self.assertEqual(masked_url(url), shown, url)
        for bad in ("redis://h/0?db=0;password=Sekr1tQ", "redis://h/0?db=0;password=Sek&r1tQ"):
            with self.subTest(bad), self.assertRaises(ConfigError) as raised:
                load_settings({"REDIS_URL": bad, "JWT_SECRET": SECRET}, env_file=None)
            message = str(raised.exception)
            self.assertIn("REDIS_URL='redis://h/0?db=0;password=***' is invalid", message)
            self.assertNotIn("Sek", message)
            self.assertNotIn("r1tQ", message)

    def test_bad_redis_url_hides_its_password(self):
        from openclaw.settings import ConfigError, load_settings

        with self.assertRaises(ConfigError) as raised:
            load_settings({"REDIS_URL": "redis://user:hunter2@h:port/0", "JWT_SECRET": SECRET}, env_file=None)
        self.assertNotIn("hunter2", str(raised.exception))
        self.assertIn("redis://user:***@h:port/0", str(raised.exception))

    def test_bad_unix_socket_query_refused_password_hidden(self):
        """
        A UNIX socket's C{?db=} that is no whole number >= 0 (as with a
        second C{?} where C{&} was meant: C{?db=0?password=...} is the
        C{db} C{0?password=...}) is the one-line configuration error, the
        password after the second C{?} shown as C{***}: not C{int()}'s
        traceback at start-up with the password in it.  A C{?} in a
        password is the password's (RFC 3986 3.4), taken.
        """
        from openclaw.settings import ConfigError, load_settings

        for bad, shown in (
            ("unix:///run/redis/redis.sock?db=0?password=Sekr1tQ", "unix:///run/redis/redis.sock?db=0?password=***"),
            ("unix:///run/redis.sock?db=abc", "unix:///run/redis.sock?db=abc"),
            ("unix:///run/redis.sock?db=-1", "unix:///run/redis.sock?db=-1"),
            ("unix:///run/redis.sock?db=0&db=x", "unix:///run/redis.sock?db=0&db=x"),
            ("redis://h:6379/?db=abc&password=Sekr1tQ", "redis://h:6379/?db=abc&password=***"),
        ):
            with self.subTest(bad), self.assertRaises(ConfigError) as raised:
                load_settings({"REDIS_URL": bad, "JWT_SECRET": SECRET}, env_file=None)
            message = str(raised.exception)
            self.assertNotIn("Sekr1tQ", message)
            self.assertIn(f"REDIS_URL={shown!r} is invalid", message)
            self.assertNotIn("\n", message)
        for good in (
            "unix:///run/redis.sock?db=0&password=Sekr1tQ",
            "unix:///run/redis.sock?db=0&password=Sekr1t?Q",
            "unix:///run/redis.sock?password=Sekr1tQ?db=1",
        ):
            settings = load_settings({"REDIS_URL": good, "JWT_SECRET": SECRET}, env_file=None)
            self.assertEqual(settings.redis_url, good)

    def test_fragment_refused_password_hidden(self):
        """
        A C{#} in C{REDIS_URL} (one in a password, not percent-encoded,
        which ends the URL for its readers) is the one-line configuration
        error saying to write it C{%23}, the URL shown without what
        follows it and the password as C{***}.
        """
        from openclaw.settings import ConfigError, load_settings

        for bad, shown in (
            ("redis://127.0.0.1:1/x?password=top#Sekr1tQ", "redis://127.0.0.1:1/x?password=***"),
            ("redis://:top#Sekr1tQ@127.0.0.1:1/0", "redis://:***@127.0.0.1:1/0"),
            ("redis://127.0.0.1:1/0#Sekr1tQ", "redis://127.0.0.1:1/0"),
        ):
            with self.subTest(bad), self.assertRaises(ConfigError) as raised:
                load_settings({"REDIS_URL": bad, "JWT_SECRET": SECRET}, env_file=None)
            message = str(raised.exception)
            self.assertIn(f"REDIS_URL={shown!r} has a #", message)
            self.assertIn("percent-encode a # in a password as %23", message)
            self.assertNotIn("Sekr1tQ", message)
            self.assertNotIn("top", message)
            self.assertNotIn("\n", message)

    def test_redis_needs_a_shared_secret(self):
        from openclaw.settings import ConfigError, load_settings

        with self.assertRaises(ConfigError) as raised:
            load_settings({"REDIS_URL": "redis://127.0.0.1:6379/0"}, env_file=None)
        self.assertIn("JWT_SECRET", str(raised.exception))
        for bad in ("http://x", "redis://", "redis://h:port", "redis://h/db"):
            with self.assertRaises(ConfigError):
                load_settings({"REDIS_URL": bad, "JWT_SECRET": SECRET}, env_file=None)
        settings = load_settings(
            {"REDIS_URL": "unix:///run/redis.sock?db=2", "JWT_SECRET": SECRET, "CLUSTER_NAME": "team-a"}, env_file=None
        )
        self.assertEqual((settings.cluster_name, settings.redis_timeout_seconds), ("team-a", 1.0))


class Workers(TestCase):
    """
    C{--workers 2}: two gateway processes on the sockets one twistd bound.
    """

    timeout = 90

    def setUp(self) -> None:
        self.redis = RedisServer()
        self.redis.start()
        self.addCleanup(self.redis.cleanup)

    @inlineCallbacks
    def status_until(
        self, port: int, token: str, wanted: Any, tries: int = 80, pause: float = 0.0, seconds: float = 20.0
    ) -> Any:
        """
        Open control connections (kept open) until C{wanted(statuses)};
        the connections and their statuses.  C{tries} of them C{pause}
        apart, then more, 0.2 s apart, until C{seconds} have passed: a
        worker still starting on a loaded host (two test runners at once)
        is not there for the first ones.
        """
        seen: list[tuple[Any, dict[str, Any]]] = []
        deadline = time.monotonic() + seconds
        attempts = 0
        while attempts < tries or time.monotonic() < deadline:
            attempts += 1
            gap = pause if attempts < tries else max(pause, 0.2)
            try:
                client = yield open_client(self, port)
            except (ConnectionError, ConnectError):
                # Queued on the socket of a worker just killed: reset.
                yield sleep(gap)
                continue
            answer = yield client.ask(token, "status")
            self.assertTrue(answer["ok"], answer)
            seen.append((client, answer["result"]))
            if wanted([status for _, status in seen]):
                return seen
            yield sleep(gap)
        self.fail(f"not seen in {attempts} connections: {[status['instance'] for _, status in seen]}")

    @inlineCallbacks
    def test_two_workers_heal_and_drain(self):
        port = free_port()
        env = base_env(JWT_SECRET=SECRET, REDIS_URL=self.redis.url, REDIS_RECONNECT_MAX_SECONDS="0.5")
        process = spawn_gateway(self, ["--workers", "2", "--port", str(port), "--interface", "127.0.0.1"], env)
        token = yield process.token
        # The banner is the first worker's: the other may start later, and
        # counts among the instances seen once its first heartbeat is in.
        seen = yield self.status_until(
            port,
            token,
            lambda statuses: {s["worker"] for s in statuses} == {0, 1} and statuses[-1]["instances_seen"] == 2,
            # Each instance counts the others at its heartbeat (every 10 s).
            tries=300,
            pause=0.05,
        )
        instances = {status["worker"]: status["instance"] for _, status in seen}
        self.assertNotEqual(instances[0], instances[1])

        # Worker 1 killed: its connections end, it is started again.
        killed = instances[1]
        os.kill(int(killed.rsplit("-", 1)[1]), signal.SIGKILL)
        seen = yield self.status_until(
            port,
            token,
            lambda statuses: any(s["worker"] == 1 and s["instance"] != killed for s in statuses),
            pause=0.1,
        )
        self.assertIn(b"worker 1 ended", process.stdout)
        survivors = [client for client, status in seen if status["instance"] != killed]

        # SIGTERM to the parent drains both workers: 1001 to every client.
        ended = yield process.stop()
        self.assertIn(ended, (0, -15))  # twistd ends with the signal it stopped on
        self.assertEqual({status["worker"] for client, status in seen if client in survivors}, {0, 1})
        codes = []
        for client, status in seen:
            if client in survivors:
                code, reason = yield within(
                    observed(client.closed), 30, f"the close of a client of worker {status['worker']}"
                )
                codes.append((status["worker"], status["instance"], code, reason))
        self.assertEqual({code for _, _, code, _ in codes}, {1001}, (codes, process.stdout[-4000:]))
        self.assertIn(b"all workers stopped", process.stdout)

    @inlineCallbacks
    def test_port_taken_by_another_program(self):
        """
        Both workers end and another program listens on the port before
        they are started again: each says which port and who to look for,
        and once neither can listen the gateway stops with exit status 1,
        not started again and again while it serves nothing (trial s31:
        restarted with back-off for as long as the port stayed taken).
        """
        port = free_port()
        env = base_env(JWT_SECRET=SECRET, REDIS_URL=self.redis.url, REDIS_RECONNECT_MAX_SECONDS="0.5")
        process = spawn_gateway(self, ["--workers", "2", "--port", str(port), "--interface", "127.0.0.1"], env)
        token = yield process.token
        seen = yield self.status_until(
            port, token, lambda statuses: {s["worker"] for s in statuses} == {0, 1}, tries=300, pause=0.05
        )
        for _, status in seen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(status["instance"].rsplit("-", 1)[1]), signal.SIGKILL)
        other = socket.socket()
        self.addCleanup(other.close)
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 10
        while True:
            try:
                other.bind(("127.0.0.1", port))
                break
            except OSError:
                # Until both workers' sockets are closed.
                self.assertLess(time.monotonic(), deadline, "the workers' sockets stayed open")
                yield sleep(0.01)
        other.listen(5)
        status = yield within(process.ended, 60, "the gateway's stop")
        self.assertEqual(status, 1, process.stdout[-4000:])
        self.assertIn(
            f"cannot listen on 127.0.0.1:{port}: another program is listening there (not this gateway's workers); "
            f"find it (ss -ltnp 'sport = :{port}')".encode(),
            process.stdout,
        )
        self.assertIn(b"no worker can listen: another program listens on a port of this gateway", process.stdout)

    @inlineCallbacks
    def test_worker_started_again_keeps_the_settings_read_at_start(self):
        """
        The operator edits the env file (another KIMI_API_KEY) and the
        JWT_SECRET_FILE while a C{--workers 2} gateway runs, then worker 1
        is killed: started again, it runs with the settings the twistd
        process read at its start, as worker 0 does (the first key; the
        cluster's token, signed with the first secret, accepted), not the
        files as they are by then: it read them again, and with the other
        secret refused the cluster's token and ended again and again.
        """
        conf = Path(self.mktemp()).resolve()
        conf.mkdir(parents=True)
        secret_file, env_file = conf / "jwt.secret", conf / "openclaw.env"
        secret_file.write_text("a" * 40)
        secret_file.chmod(0o600)
        env_file.write_text(f"JWT_SECRET_FILE={secret_file}\nKIMI_API_KEY=key-one-{'1' * 20}\n")
        env_file.chmod(0o600)
        first_key = fingerprint(f"key-one-{'1' * 20}")
        port = free_port()
        env = base_env(REDIS_URL=self.redis.url, REDIS_RECONNECT_MAX_SECONDS="0.5")
        args = ["--workers", "2", "--port", str(port), "--interface", "127.0.0.1", "--env-file", str(env_file)]
        process = spawn_gateway(self, args, env)
        token = yield process.token
        seen = yield self.status_until(
            port, token, lambda statuses: {s["worker"] for s in statuses} == {0, 1}, pause=0.05
        )
        self.assertEqual({tuple(status["providers"]["kimi"]["keys"]) for _, status in seen}, {(first_key,)})
        killed = next(status["instance"] for _, status in seen if status["worker"] == 1)

        # The operator's edits, then worker 1 killed (a crash, the OOM killer).
        env_file.write_text(f"JWT_SECRET_FILE={secret_file}\nKIMI_API_KEY=key-two-{'2' * 20}\n")
        secret_file.write_text("b" * 40)
        os.kill(int(killed.rsplit("-", 1)[1]), signal.SIGKILL)
        seen = yield self.status_until(
            port,
            token,
            lambda statuses: any(s["worker"] == 1 and s["instance"] != killed for s in statuses),
            pause=0.1,
        )
        again = [status for _, status in seen if status["worker"] == 1 and status["instance"] != killed]
        self.assertEqual(list(again[-1]["providers"]["kimi"]["keys"]), [first_key])
        self.assertEqual(process.stdout.count(b"worker 1 ended"), 1, process.stdout[-3000:])
        ended = yield process.stop()
        self.assertIn(ended, (0, -15))

    @inlineCallbacks
    def test_second_gateway_on_the_same_ports_refused(self):
        """
        A second C{twistd -n openclaw --workers 2} of the same user (another
        directory, so another pidfile) on the ports of one running: refused
        with one line saying what to do, where it started and joined the
        first one's C{SO_REUSEPORT} group (the kernel spreading connections
        over both gateways); a single-process gateway there is refused as
        ever.  The first one serves on with both workers.
        """
        port, api_port = free_port(), free_port()
        env = base_env(JWT_SECRET=SECRET, REDIS_URL=self.redis.url)
        args = ["--workers", "2", "--port", str(port), "--api-port", str(api_port), "--interface", "127.0.0.1"]
        first = spawn_gateway(self, args, env)
        token = yield first.token
        yield self.status_until(port, token, lambda statuses: {s["worker"] for s in statuses} == {0, 1})
        second = spawn_gateway(self, args, env)
        status = yield within(observed(second.ended), 30, "the second gateway's refusal")
        self.assertEqual(status, 1, (second.stderr, second.stdout[-3000:]))
        self.assertEqual(
            second.stderr.decode().splitlines(),
            [
                f"openclaw: cannot listen on 127.0.0.1:{port} (WS_CONTROL_PORT, from the command line): another "
                f"gateway (or another program) is already listening on 127.0.0.1:{port}; stop it, or choose another "
                "port with --port"
            ],
        )
        single = spawn_gateway(self, args[2:], base_env(JWT_SECRET=SECRET))
        status = yield within(observed(single.ended), 30, "the single gateway's refusal")
        self.assertEqual(status, 1, (single.stderr, single.stdout[-3000:]))
        self.assertIn(b"address already in use; is another gateway running?", single.stderr)
        self.assertFalse(first.ended.called)
        # Every connection still reaches one of its two workers (its token).
        yield self.status_until(port, token, lambda statuses: len(statuses) == 8, pause=0.05)
        ended = yield first.stop()
        self.assertIn(ended, (0, -15))

    @inlineCallbacks
    def test_crash_loop_backs_off(self):
        """
        Worker 1 dies at once, again and again (killed as soon as it is
        started): it is started again after 0.5, 1, 2, then 4 s, each time
        logged, never in a tight loop; worker 0 serves throughout; a stop
        while a restart waits ends at once.
        """
        port = free_port()
        env = base_env(JWT_SECRET=SECRET, REDIS_URL=self.redis.url, REDIS_RECONNECT_MAX_SECONDS="0.5")
        process = spawn_gateway(self, ["--workers", "2", "--port", str(port), "--interface", "127.0.0.1"], env)
        token = yield process.token
        started = re.compile(rb"worker 1 started \(pid (\d+)\)")
        killed: list[bytes] = []
        starts: list[float] = []
        deadline = time.monotonic() + 20
        while len(killed) < 4 and time.monotonic() < deadline:
            for pid in started.findall(process.stdout):
                if pid not in killed:
                    starts.append(time.monotonic())
                    killed.append(pid)
                    os.kill(int(pid), signal.SIGKILL)
            yield sleep(0.01)
        self.assertEqual(len(killed), 4, process.stdout[-3000:])
        gaps = [later - earlier for earlier, later in zip(starts, starts[1:], strict=False)]
        for gap, delay in zip(gaps, (0.5, 1, 2), strict=True):
            self.assertGreater(gap, delay - 0.05, gaps)
        # The fourth end is logged once the parent has reaped it, a moment
        # after the kill.
        yield printed(process, b"; starting it again in 4 s")
        for delay in (b"0.5", b"1", b"2", b"4"):
            self.assertIn(b"; starting it again in " + delay + b" s", process.stdout)
        self.assertIn(b"4 times in a row within 10 s of its start", process.stdout)
        # Worker 0 has served all along; worker 1 waits 4 s to start again.
        seen = yield self.status_until(port, token, lambda statuses: len(statuses) == 3, pause=0.05)
        self.assertEqual({status["worker"] for _, status in seen}, {0})
        began = time.monotonic()
        ended = yield process.stop()
        self.assertIn(ended, (0, -15))
        self.assertLess(time.monotonic() - began, 3.5)
        self.assertEqual(started.findall(process.stdout), killed)
        self.assertIn(b"all workers stopped", process.stdout)

    @inlineCallbacks
    def test_workers_say_they_share_their_consumers(self):
        """
        Without DATABASE_URL the workers of one gateway share its SQLite
        file, so their consumers: the warning says that (once, for all of
        them), and that instances using another file have their own.
        """
        port = free_port()
        env = base_env(JWT_SECRET=SECRET, REDIS_URL=self.redis.url)
        process = spawn_gateway(self, ["--workers", "2", "--port", str(port), "--interface", "127.0.0.1"], env)
        token = yield process.token
        yield self.status_until(port, token, lambda statuses: {s["worker"] for s in statuses} == {0, 1}, pause=0.05)
        said = re.findall(rb"REDIS_URL is set without DATABASE_URL: [^\n]*", process.stdout)
        self.assertEqual(len(said), 1, said)
        self.assertIn(b"are kept in the SQLite file ", said[0])
        self.assertIn(b"which this gateway's 2 workers share; instances of the cluster that use another file", said[0])
        # Both workers see each other, and no other instance: a consumer
        # change, shared by both, carries no warning.
        seen = yield self.status_until(port, token, lambda statuses: statuses[-1]["instances_seen"] == 2, pause=0.2)
        created = yield consumer_created(seen[-1][0], token, "team")
        self.assertTrue(created["ok"], created)
        self.assertNotIn("warning", created["result"])
        ended = yield process.stop()
        self.assertIn(ended, (0, -15))

    @inlineCallbacks
    def test_sigusr1_reopens_every_workers_log(self):
        """
        logrotate's way with C{--workers 2} and C{--logfile}: the log file
        is moved away and SIGUSR1 sent to twistd (the pidfile's process
        only); every worker's lines after it go to the new file, and none
        to the moved one.
        """
        logs = Path(self.mktemp()).resolve()
        logs.mkdir(parents=True)
        logfile, rotated = logs / "gw.log", logs / "gw.log.1"
        port = free_port()
        env = base_env(JWT_SECRET=SECRET, REDIS_URL=self.redis.url)
        args = ["--workers", "2", "--port", str(port), "--interface", "127.0.0.1", "--log-format", "json"]
        process = spawn_gateway(self, args, env, twistd_args=["--logfile", str(logfile)])
        token = yield process.token
        seen = yield self.status_until(port, token, lambda statuses: {s["worker"] for s in statuses} == {0, 1})
        clients = {status["instance"]: client for client, status in seen}
        self.assertEqual(len(clients), 2, clients)

        def audited(path: Path) -> list[str]:
            if not path.exists():
                return []  # not reopened yet
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            return [line["instance"] for line in lines if line.get("cmd") == "health_check"]

        @inlineCallbacks
        def health_checks_in(path: Path) -> Any:
            # Each worker reopens on its own SIGUSR1, a moment after the
            # parent: asked until the lines of both are in the file.
            deadline = time.monotonic() + 15
            while set(audited(path)) != set(clients):
                if time.monotonic() > deadline:
                    self.fail(f"health_check lines in {path.name} from {audited(path)}, not from both {set(clients)}")
                for client in clients.values():
                    answer = yield client.ask(token, "health_check")
                    self.assertTrue(answer["ok"], answer)
                yield sleep(0.1)

        yield health_checks_in(logfile)
        logfile.rename(rotated)
        os.kill(process.transport.pid, signal.SIGUSR1)
        yield health_checks_in(logfile)
        before, written = rotated.read_text(), len(audited(logfile))
        for client in clients.values():
            answer = yield client.ask(token, "health_check")
            self.assertTrue(answer["ok"], answer)
        deadline = time.monotonic() + 5
        while len(audited(logfile)) < written + 2 and time.monotonic() < deadline:
            yield sleep(0.05)
        self.assertEqual(len(audited(logfile)), written + 2)
        self.assertEqual(rotated.read_text(), before)
        ended = yield process.stop()
        self.assertIn(ended, (0, -15))

    @inlineCallbacks
    def test_sigusr1_while_a_worker_starts(self):
        """
        SIGUSR1 again and again while a worker is started again: one that
        reaches the worker before its handler is installed waits for it
        (blocked), rather than ending the worker by its default action.
        """
        logs = Path(self.mktemp()).resolve()
        logs.mkdir(parents=True)
        logfile = logs / "gw.log"
        port = free_port()
        env = base_env(JWT_SECRET=SECRET, REDIS_URL=self.redis.url)
        args = ["--workers", "2", "--port", str(port), "--interface", "127.0.0.1"]
        process = spawn_gateway(self, args, env, twistd_args=["--logfile", str(logfile)])
        token = yield process.token
        seen = yield self.status_until(port, token, lambda statuses: {s["worker"] for s in statuses} == {0, 1})
        killed = next(status["instance"] for _, status in seen if status["worker"] == 1)
        os.kill(int(killed.rsplit("-", 1)[1]), signal.SIGKILL)
        # Started again 0.5 s later, then a second or so to its handler.
        until = time.monotonic() + 4
        while time.monotonic() < until:
            os.kill(process.transport.pid, signal.SIGUSR1)
            yield sleep(0.02)
        yield self.status_until(
            port, token, lambda statuses: statuses[-1]["worker"] == 1 and statuses[-1]["instance"] != killed
        )
        self.assertEqual(logfile.read_text().count("worker 1 ended"), 1, logfile.read_text()[-3000:])
        ended = yield process.stop()
        self.assertIn(ended, (0, -15))

    @inlineCallbacks
    def test_workers_stop_when_their_parent_is_killed(self):
        """
        SIGKILL to the parent (twistd): each worker notices within a second
        or so that its parent is gone and stops as on SIGTERM (1001 to its
        control clients), so the port stops answering; they kept serving,
        reparented, and a new start ran more workers beside them.  The
        last of them removes the directory of their metrics sockets.
        """
        port = free_port()
        tmp = Path(tempfile.mkdtemp(prefix="ocw-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, tmp, True)
        env = base_env(JWT_SECRET=SECRET, REDIS_URL=self.redis.url, TMPDIR=str(tmp))
        process = spawn_gateway(self, ["--workers", "2", "--port", str(port), "--interface", "127.0.0.1"], env)
        token = yield process.token
        seen = yield self.status_until(port, token, lambda statuses: {s["worker"] for s in statuses} == {0, 1})
        pids = {int(status["instance"].rsplit("-", 1)[1]) for _, status in seen}
        self.assertEqual(len(pids), 2)
        os.kill(process.transport.pid, signal.SIGKILL)
        killed_at = time.monotonic()

        def alive(pid: int) -> bool:
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    # A zombie (not reaped yet by whoever adopted it) has ended.
                    return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
            except FileNotFoundError:
                return False

        while any(alive(pid) for pid in pids) and time.monotonic() - killed_at < 10:
            yield sleep(0.1)
        self.assertEqual([pid for pid in pids if alive(pid)], [], process.stdout[-3000:])
        self.assertLess(time.monotonic() - killed_at, 6)
        codes = []
        for client, status in seen:
            code, _ = yield within(observed(client.closed), 5, f"the close of a client of worker {status['worker']}")
            codes.append(code)
        self.assertEqual(set(codes), {1001})
        self.assertIn(b"has ended; stopping this worker (drained, as on SIGTERM)", process.stdout)
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        # The metrics sockets' directory, which the parent would have
        # removed, is removed by the last worker to stop.
        self.assertEqual(list(tmp.iterdir()), [])

    @inlineCallbacks
    def test_metrics_sockets_removed_by_a_cleaner(self):
        """
        The directory of the workers' metrics sockets removed while the
        gateway runs (a cleaner of the temporary directory): within a few
        seconds every worker listens on its socket again (the directory
        made again, mode 0700), so a scrape holds every worker's series
        again, each worker saying once that it did; they stayed missing
        until their worker was started again.
        """
        tmp = Path(tempfile.mkdtemp(prefix="ocw-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, tmp, True)
        port, api_port = free_port(), free_port()
        env = base_env(JWT_SECRET=SECRET, REDIS_URL=self.redis.url, GATEWAY_API_KEYS=GATEWAY_KEY, TMPDIR=str(tmp))
        args = ["--workers", "2", "--port", str(port), "--api-port", str(api_port), "--interface", "127.0.0.1"]
        process = spawn_gateway(self, args, env)
        token = yield process.token
        yield self.status_until(port, token, lambda statuses: {s["worker"] for s in statuses} == {0, 1})

        def scrape() -> tuple[float | None, set[str]]:
            with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=10) as response:
                families = list(text_string_to_metric_families(response.read().decode()))
            samples = [sample for family in families for sample in family.samples]
            scraped = next((s.value for s in samples if s.name == "openclaw_workers_scraped"), None)
            return scraped, {sample.labels["worker"] for sample in samples if "worker" in sample.labels}

        @inlineCallbacks
        def scraped_until(wanted: float, seconds: float) -> Any:
            deadline = time.monotonic() + seconds
            while True:
                # A new connection each: either worker may answer it.
                found = yield deferToThread(scrape)
                if found[0] == wanted or time.monotonic() > deadline:
                    return found
                yield sleep(0.1)

        found = yield scraped_until(2.0, 20)
        self.assertEqual(found, (2.0, {"0", "1"}))
        directory = next(tmp.iterdir())
        shutil.rmtree(directory)
        removed = time.monotonic()
        # Each worker looks once a second: both listen again within a few.
        while not all(os.path.lexists(directory / f"{index}.sock") for index in (0, 1)):
            self.assertLess(time.monotonic() - removed, 5, process.stdout[-3000:])
            yield sleep(0.1)
        self.assertEqual(stat.S_IMODE(directory.stat().st_mode), 0o700)
        self.assertEqual(sorted(path.name for path in directory.iterdir()), ["0.sock", "1.sock"])
        for _ in range(6):
            found = yield deferToThread(scrape)
            self.assertEqual(found, (2.0, {"0", "1"}), process.stdout[-3000:])
        for index in (0, 1):
            said = re.findall(
                rf"worker {index}'s metrics socket \S+ (and its directory )?had gone".encode(), process.stdout
            )
            self.assertEqual(len(said), 1, process.stdout[-3000:])
        self.assertNotIn(b"Traceback", process.stdout)
        ended = yield process.stop()
        self.assertIn(ended, (0, -15))
        self.assertEqual(list(tmp.iterdir()), [])

    @inlineCallbacks
    def test_metrics_hold_every_workers_series(self):
        """
        C{/metrics} under C{--workers 2}, on the API port: whichever worker
        a scrape reaches, it holds both workers' series, each labelled
        C{worker}, and C{openclaw_api_requests_total} summed over workers
        is the calls made.  Worker 1 killed: the scrapes go on without its
        series, counted and logged once; started again (its socket left
        behind stands in the way of nothing), it is back.  The sockets'
        directory (mode 0700 in TMPDIR, sockets 0600) goes at stop.
        """
        upstream = start_upstream(self, "kimi-key", "gemini-key")
        # Short: a UNIX socket's path is at most 107 bytes.
        tmp = Path(tempfile.mkdtemp(prefix="ocw-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, tmp, True)
        port, api_port = free_port(), free_port()
        env = base_env(
            JWT_SECRET=SECRET,
            REDIS_URL=self.redis.url,
            GATEWAY_API_KEYS=GATEWAY_KEY,
            TMPDIR=str(tmp),
            **upstream.environment(),
        )
        args = ["--workers", "2", "--port", str(port), "--api-port", str(api_port), "--interface", "127.0.0.1"]
        process = spawn_gateway(self, args, env)
        token = yield process.token
        seen = yield self.status_until(port, token, lambda statuses: {s["worker"] for s in statuses} == {0, 1})
        directory = next(tmp.iterdir())
        self.assertTrue(directory.name.startswith("openclaw-workers-"), directory)
        self.assertEqual(stat.S_IMODE(directory.stat().st_mode), 0o700)
        self.assertEqual(sorted(path.name for path in directory.iterdir()), ["0.sock", "1.sock"])
        for path in directory.iterdir():
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)

        def call() -> None:
            # A connection of its own each: the kernel spreads them.
            request = urllib.request.Request(
                f"http://127.0.0.1:{api_port}/v1/chat/completions",
                data=json.dumps({"model": "default", "messages": [{"role": "user", "content": "hi"}]}).encode(),
                headers={"Authorization": f"Bearer {GATEWAY_KEY}", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                self.assertEqual(response.status, 200)

        def scrape() -> dict[str, Any]:
            for attempt in range(20):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=10) as response:
                        text = response.read().decode()
                    break
                except OSError:
                    # Queued on the socket of the worker just killed: reset.
                    if attempt == 19:
                        raise
                    time.sleep(0.1)
            families = list(text_string_to_metric_families(text))
            names = [family.name for family in families]
            self.assertEqual(len(names), len(set(names)), "a family given twice")
            samples = [sample for family in families for sample in family.samples]
            requests: dict[str, float] = {}
            for sample in samples:
                if sample.name == "openclaw_api_requests_total":
                    worker = sample.labels["worker"]
                    requests[worker] = requests.get(worker, 0.0) + sample.value
            single = {sample.name: sample.value for sample in samples if not sample.labels}
            return {
                "workers": {sample.labels.get("worker") for sample in samples} - {None},
                "requests": requests,
                "scraped": single.get("openclaw_workers_scraped"),
                "failures": sum(
                    sample.value for sample in samples if sample.name == "openclaw_worker_scrape_failures_total"
                ),
                "text": text,
            }

        calls = 0
        deadline = time.monotonic() + 30
        while True:
            for _ in range(4):
                yield deferToThread(call)
                calls += 1
            scraped = yield deferToThread(scrape)
            if all(scraped["requests"].get(worker) for worker in ("0", "1")) or time.monotonic() > deadline:
                break
        self.assertEqual(set(scraped["requests"]), {"0", "1"}, (calls, scraped["requests"]))
        for _ in range(8):
            # Each on a new connection: either worker may answer it.
            scraped = yield deferToThread(scrape)
            self.assertEqual(scraped["workers"], {"0", "1"})
            self.assertEqual(scraped["scraped"], 2.0)
            self.assertEqual(sum(scraped["requests"].values()), calls, scraped["requests"])
            self.assertTrue(all(scraped["requests"].values()), scraped["requests"])

        # Worker 1 killed: its series are left out, each scrape counted.
        killed = next(status["instance"] for _, status in seen if status["worker"] == 1)
        os.kill(int(killed.rsplit("-", 1)[1]), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            scraped = yield deferToThread(scrape)
            if scraped["scraped"] == 1.0 or time.monotonic() > deadline:
                break
            yield sleep(0.05)
        self.assertEqual(scraped["scraped"], 1.0)
        self.assertEqual(scraped["workers"], {"0"})
        self.assertGreaterEqual(scraped["failures"], 1.0)
        # Started again on the socket's path its predecessor left.
        deadline = time.monotonic() + 30
        while scraped["workers"] != {"0", "1"} and time.monotonic() < deadline:
            yield sleep(0.2)
            scraped = yield deferToThread(scrape)
        self.assertEqual(scraped["workers"], {"0", "1"}, process.stdout[-3000:])
        self.assertEqual(scraped["scraped"], 2.0)
        said = re.findall(rb"worker 1's series are left out of the scrapes", process.stdout)
        self.assertEqual(len(said), 1, process.stdout[-3000:])

        ended = yield process.stop()
        self.assertIn(ended, (0, -15))
        self.assertEqual(list(tmp.iterdir()), [])

    def test_workers_need_redis(self):
        from openclaw.settings import ConfigError, load_settings

        with self.assertRaises(ConfigError) as raised:
            load_settings({"WORKERS": "2", "JWT_SECRET": SECRET}, env_file=None)
        self.assertIn("needs REDIS_URL", str(raised.exception))
