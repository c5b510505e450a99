"""
Findings of a code review and a fresh-user review, each with the test that
shows it fixed.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import openai
from twisted.internet import reactor
from twisted.internet.address import IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from openclaw.addresses import counted_key
from openclaw.cluster import ClusterNode, MemoryStore
from openclaw.cluster.node import encode_route
from openclaw.consumers.table import Counters
from openclaw.dataplane.errors import APIError, reason_phrase
from openclaw.dataplane.site import client_address, raw_error_response
from openclaw.providers.errors import MAX_RETRY_AFTER_SECONDS, RefusalKind, classify, parse_retry_after
from openclaw.providers.keys import DEFAULT_REST_SECONDS
from openclaw.routing import ActiveRoute, Route
from openclaw.service import USAGE_PURGE_SECONDS, usage_purger
from openclaw.session import SessionAuthority
from tests.support import capture_log_events, changed_providers
from tests.test_attack_review import exchange
from tests.test_consumers import GatewayCase
from tests.test_dataplane import GATEWAY_KEY, HELLO, KIMI_KEY, DataPlaneTestCase
from tests.test_resilience import ResilienceTestCase


class FlakyStore:
    """
    A consumers' store whose purges fail while C{failing} is true.
    """

    def __init__(self) -> None:
        self.failing = True
        self.purged: list[float] = []

    def purge(self, before: float) -> Deferred[int]:
        self.purged.append(before)
        if self.failing:
            return fail(RuntimeError("database is locked"))
        return succeed(0)


class UsagePurgeTests(TestCase):
    """
    The hourly purge of usage rows older than USAGE_RETENTION_DAYS.
    """

    def test_failed_purge_is_retried(self) -> None:
        """
        A purge that fails is logged (saying what to check) and tried again
        at the next interval; the loop keeps running.
        """
        events = capture_log_events(self)
        clock = Clock()
        store = FlakyStore()
        purger = usage_purger(store, clock, 86400.0, "openclaw.db", Logger())  # type: ignore[arg-type]
        self.addCleanup(purger.stop)
        clock.advance(USAGE_PURGE_SECONDS)
        self.assertEqual(store.purged, [USAGE_PURGE_SECONDS - 86400.0])
        logged = [event for event in events if "log_failure" in event]
        self.assertEqual(len(logged), 1)
        self.assertIn("check that the database", logged[0]["log_format"])
        self.assertTrue(purger.running)
        store.failing = False
        clock.advance(USAGE_PURGE_SECONDS)
        self.assertEqual(len(store.purged), 2)
        self.assertTrue(purger.running)
        self.flushLoggedErrors(RuntimeError)


@attrs.define
class BrokenCounters:
    """
    Counters whose admissions fail, as the cluster's do on a Redis reply
    of an unexpected shape.
    """

    counters: Counters

    def admit(self, *args: Any, **kwargs: Any) -> Deferred[None]:
        return fail(ValueError("unexpected reply from Redis"))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.counters, name)


class FailedAdmissionTests(GatewayCase):
    """
    An admission that fails answers the client (500 in OpenAI's shape) and
    leaves no call in flight.
    """

    @inlineCallbacks
    def test_failed_admission_answers_and_stop_does_not_wait(self) -> Any:
        gateway, client = yield self.gateway(shutdown_grace_seconds=30.0)
        created = yield self.command(gateway, client, "consumer_create", {"name": "app", "rpm": 100})
        consumers = gateway.service.consumers
        consumers.counters = BrokenCounters(consumers.counters)
        sdk = self.sdk(gateway, created["key"])
        for call in (
            lambda: sdk.chat.completions.create(model="kimi/moonshot-v1-8k", messages=HELLO),
            lambda: sdk.models.list(),
        ):
            began = reactor.seconds()
            try:
                yield deferToThread(call)
            except openai.InternalServerError as e:
                self.assertEqual(e.status_code, 500)
                self.assertEqual(e.body["code"], "internal_error")  # type: ignore[index]
            else:
                self.fail("the call was not refused")
            self.assertLess(reactor.seconds() - began, 5.0)
        self.assertEqual(gateway.service.api_site.context.in_flight, 0)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)
        began = reactor.seconds()
        yield gateway.service.stopService()
        self.assertLess(reactor.seconds() - began, 10.0)


class RetryAfterTests(TestCase):
    """
    A provider's C{Retry-After} that is neither ASCII digits nor an
    HTTP-date (RFC 9110 section 10.2.3) is no usable delay.
    """

    def test_unreadable(self) -> None:
        # As twisted.web decodes header bytes (latin-1): 0xB2 is "²", which
        # str.isdigit takes for a digit and float() refuses.
        for value in ("\xb2", "1\xb2", " ", "", "9" * 400, "Sun, 06 Nov 99" + "9" * 400 + " 08:49:37 GMT"):
            self.assertIsNone(parse_retry_after(value, 0.0), repr(value))
        refusal = classify(429, b'{"error": {"message": "slow down"}}', "\xb2", 0.0)
        # No usable delay: the key's default rest, told to the client too.
        self.assertEqual((refusal.kind, refusal.retry_after), (RefusalKind.RATE_LIMITED, DEFAULT_REST_SECONDS))
        self.assertEqual(classify(429, b"{}", None, 0.0).retry_after, DEFAULT_REST_SECONDS)
        self.assertIsNone(classify(503, b"{}", None, 0.0).retry_after)

    def test_bounded(self) -> None:
        """
        A provider's wait is followed for an hour at most, however far off
        its Retry-After (or the wait its error body states) puts it: one
        wrong header must not take a key out until a restart.
        """
        for value in ("99999999999999999999999", "Wed, 21 Oct 2099 07:28:00 GMT"):
            self.assertEqual(classify(429, b"{}", value, 1_800_000_000.0).retry_after, MAX_RETRY_AFTER_SECONDS)
        # As is the wait a provider's error body states (Gemini's
        # RetryInfo: tests.test_gemini_errors).
        self.assertEqual(classify(429, b"{}", None, 0.0, 86400.0).retry_after, MAX_RETRY_AFTER_SECONDS)
        self.assertEqual(classify(429, b"{}", "120", 0.0).retry_after, 120.0)

    def test_readable(self) -> None:
        self.assertEqual(parse_retry_after(" 7 ", 0.0), 7.0)
        self.assertEqual(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", 784111770.0), 7.0)


class RetryAfterEndToEndTests(ResilienceTestCase):
    @inlineCallbacks
    def test_unreadable_retry_after_rests_the_key(self) -> Any:
        """
        A 429 whose Retry-After is unreadable rests the key for the default
        time and the call goes on with the next key.
        """
        second = "sk-kimi-SECOND-0123456789abcdef"
        kimi = self.behaviour("kimi")
        kimi.extra_keys = [second]
        kimi.rate_limited_keys = {KIMI_KEY}
        kimi.retry_after_header = b"\xb2"
        providers = changed_providers(self.upstream.provider_settings(), kimi={"api_keys": (second,)})
        gateway = self.gateway(providers=providers, default_provider="kimi", fallback="off")
        for _ in range(2):
            response, _ = yield self.post(gateway, {"messages": HELLO})
            self.assertEqual(response.code, 200)
        self.assertEqual(kimi.keys_seen, [KIMI_KEY, second, second])


class ClusterNodeStopTests(TestCase):
    def test_stop_leaves_nothing_pending(self) -> None:
        """
        A stop cancels the heartbeat, the reload's back-off retry and the
        catch-up a heartbeat scheduled: nothing runs against a closed store.
        """
        clock = Clock()
        clock.advance(1_800_000_000)
        store = MemoryStore(clock.seconds)
        node = ClusterNode(
            store,
            ActiveRoute(Route("gemini", "g-1")),
            SessionAuthority(b"0123456789abcdef0123456789abcdef", 3600, clock=clock.seconds),
            "a",
            clock,
            1.0,
            ("gemini", "kimi"),
        )
        node.connected()
        node.start()
        self.assertTrue(node.up)
        # A change this node missed (its publication lost): the next beat
        # schedules a second look.
        store.write("route", encode_route(Route("kimi", "k-1")), "b", "receipt-1", 0)
        node.beat()
        # Then the store goes away and a reload fails: a retry is due.
        store.up = False
        node.connected()
        self.assertGreaterEqual(len(clock.getDelayedCalls()), 3)
        node.stop()
        self.assertEqual(clock.getDelayedCalls(), [])


class CountedKeyTests(TestCase):
    def test_one_rule_for_both_planes(self) -> None:
        """
        The control plane's unauthenticated connections and the API's
        connections per address count under L{counted_key}.
        """
        self.assertEqual(counted_key("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(counted_key("2001:db8::1"), "2001:db8::/64")
        self.assertEqual(counted_key("not-an-address"), "not-an-address")
        self.assertIsNone(counted_key(None))
        self.assertEqual(client_address(IPv6Address("TCP", "2001:db8::2", 1)), "2001:db8::/64")
        self.assertIsNone(client_address(UNIXAddress("/run/x.sock")))


class TwoAuthorizationFieldsTests(DataPlaneTestCase):
    @inlineCallbacks
    def test_refused_in_either_order(self) -> Any:
        """
        A request with two Authorization fields is answered 400 in OpenAI's
        shape, whichever comes first (twisted.web would take the last).
        """
        gateway = self.gateway()
        good, bad = f"Authorization: Bearer {GATEWAY_KEY}\r\n", "Authorization: Bearer wrong\r\n"
        head = "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        answer = yield deferToThread(exchange, gateway.api_port, (head + good + "\r\n").encode())
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:200])
        for fields in (bad + good, good + bad, good + good):
            answer = yield deferToThread(exchange, gateway.api_port, (head + fields + "\r\n").encode())
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:200])
            error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
            self.assertEqual(error["code"], "invalid_authorization")
            self.assertIn("send exactly one", error["message"])


class ReasonPhraseTests(ResilienceTestCase):
    @inlineCallbacks
    def test_429_status_line(self) -> Any:
        """
        A 429 goes out as "429 Too Many Requests" (twisted.web's table has
        no phrase for it: "429 Unknown Status").
        """
        kimi = self.behaviour("kimi")
        kimi.rate_limited_keys = {KIMI_KEY}
        gateway = self.gateway(default_provider="kimi", fallback="off")
        body = json.dumps({"model": "kimi/moonshot-v1-8k", "messages": HELLO}).encode()
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
            % (GATEWAY_KEY.encode(), len(body), body)
        )
        answer = yield deferToThread(exchange, gateway.api_port, request)
        self.assertTrue(answer.startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), answer[:200])
        refused = raw_error_response(APIError(429, "slow down", "rate_limit_error", "rate_limited"))
        self.assertTrue(refused.startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), refused[:100])
        # RFC 9110's wording where twisted.web keeps RFC 2616's.
        for status, phrase in ((504, b"Gateway Timeout"), (408, b"Request Timeout"), (503, b"Service Unavailable")):
            self.assertEqual(reason_phrase(status), phrase)
            line = raw_error_response(APIError(status, "x", "server_error", "x")).split(b"\r\n")[0]
            self.assertEqual(line, b"HTTP/1.1 %d %s" % (status, phrase))


class GatewayKeysUsageTests(GatewayCase):
    """
    The usage of GATEWAY_API_KEYS' keys, recorded under "-", can be asked
    for by that name (and only asked for: no consumer may take it).
    """

    @inlineCallbacks
    def test_usage_of_gateway_keys(self) -> Any:
        from tests.test_ctl import run_ctl

        gateway, client = yield self.gateway()
        sdk = self.sdk(gateway, GATEWAY_KEY)
        for _ in range(2):
            yield deferToThread(sdk.chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO)
        out, err, code = yield run_ctl(
            "--url", f"ws://127.0.0.1:{gateway.port}", "--token", gateway.token, "--json", "usage", "--name", "-"
        )
        self.assertEqual((err, code), ("", 0))
        result = json.loads(out)["result"]
        self.assertEqual((result["name"], result["total"]["requests"]), ("-", 2))
        answer = yield client.command(gateway.token, "usage", {"name": "-", "group_by": "model"})
        self.assertTrue(answer["ok"], answer)
        self.assertEqual(answer["result"]["total"]["requests"], 2)
        for cmd in ("consumer_create", "consumer_update"):
            answer = yield client.command(gateway.token, cmd, {"name": "-"})
            self.assertFalse(answer["ok"], answer)
            self.assertIn("not '-' alone", json.dumps(answer))
