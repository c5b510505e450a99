"""
The reservations of calls in flight after an outage of Redis: those an
instance made on its own while Redis was away are carried into Redis's
when it is back, so that every instance counts them, and released there
once, when their calls end (L{SharedCounters.carry}); those Redis holds of
calls that ended while it was away are released there.  Instances in this
process (consumer table, counters and cluster sync each) on one real
C{redis-server} and one SQLite database, as in
L{tests.test_consumers_windows}.
"""

from __future__ import annotations

import time
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from openclaw.consumers.model import Consumer
from openclaw.consumers.shared import CARRY, ReservationLog, SharedCounters
from openclaw.consumers.table import RESERVATION_SECONDS, TOKEN_RESERVATION_SECONDS, Holder
from openclaw.dataplane.errors import APIError
from tests import test_consumers_windows
from tests.redis_server import RedisServer
from tests.test_consumers_cluster import RedisScripts, redis_command
from tests.test_consumers_outage import wait_for
from tests.test_consumers_windows import CREATED, Instance

RESERVED = f"openclaw:consumer:team:{CREATED!r}:reserved"
RESERVED_TOKENS = f"openclaw:consumer:team:{CREATED!r}:reserved_tokens"


def held(port: int, key: str) -> dict[int, float]:
    """
    A reservations hash in Redis: {second of admission: amount}.
    """
    reply = redis_command(port, "HGETALL", key)
    items = [line for line in reply.split(b"\r\n")[1:] if line and not line.startswith((b"$", b"*"))]
    return {int(at): float(amount) for at, amount in zip(items[::2], items[1::2], strict=True)}


class _Gated(RedisScripts):
    """
    A Redis whose L{CARRY} scripts wait for L{open} before they are sent
    (a carry under way while a call ends).
    """

    def __init__(self, connection: Any) -> None:
        super().__init__(connection)
        self.gate: Deferred[None] | None = None

    def script(self, source: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        if source == CARRY and self.gate is not None:
            sent: Deferred[Any] = Deferred()
            self.gate.addCallback(lambda _: super(_Gated, self).script(source, keys, args).chainDeferred(sent))
            return sent
        return super().script(source, keys, args)

    def open(self) -> None:
        gate, self.gate = self.gate, None
        if gate is not None:
            gate.callback(None)


class _Lost(RedisScripts):
    """
    A Redis that runs the next L{CARRY} once L{lose} is set, but whose
    answer never comes back (a timeout, a connection lost after Redis ran
    it): the carry fails at its timeout.
    """

    def __init__(self, connection: Any) -> None:
        super().__init__(connection)
        self.lose = False
        #: What the lost carry's caller got: failed by its timeout.
        self.unanswered: Deferred[Any] = Deferred()

    def script(self, source: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        sent = super().script(source, keys, args)
        if source == CARRY and self.lose:
            self.lose = False
            sent.addErrback(lambda _: None)
            return self.unanswered
        return sent


class CarriedReservationsTests(TestCase):
    timeout = 30

    # The windows' tests' cluster: C{count} instances, Redis seeded (not
    # imported by name, or its tests would run here too).
    cluster = test_consumers_windows.MergedWindowsTests.cluster

    def admit(self, instance: Instance, usd: float = 0.0, tokens: int = 0, now: float | None = None) -> Any:
        """
        One call of C{team} admitted (or refused) on C{instance} at C{now}
        (the table's clock by default), reserving C{usd} and C{tokens}:
        fires with (refusal or None, holder).
        """
        holder = Holder("team", "p", CREATED)
        at = instance.table.clock() if now is None else now
        decided = instance.counters.admit(instance.table.consumers["team"], at, holder, usd, tokens)
        if not isinstance(decided, Deferred):
            return succeed((decided, holder))
        return decided.addCallback(lambda refusal: (refusal, holder))

    @inlineCallbacks
    def held_elsewhere(self, instance: Instance) -> Any:
        """
        Check that C{instance} sees 0.9 USD of C{team}'s budget of 1 USD
        held: it admits one call reserving 0.2 USD and refuses the next
        (C{budget_reserved}).
        """
        first, _ = yield self.admit(instance, usd=0.2)
        self.assertIsNone(first)
        second, _ = yield self.admit(instance, usd=0.2)
        assert isinstance(second, APIError)
        self.assertEqual(second.type, "budget_reserved")

    @inlineCallbacks
    def settled(self, instance: Instance) -> Any:
        """
        Fire once the scripts C{instance} sent so far are answered (one
        connection: in order).
        """
        yield instance.counters.read_spends([instance.table.consumers["team"]], instance.table.clock())

    @inlineCallbacks
    def test_reservations_made_alone_carried_into_redis(self) -> Any:
        """
        tpm 1000: instance A, away from Redis, admits a call reserving 900
        tokens, still running when it is back.  Its reservation is carried
        into Redis: B, whose burst of calls reserving 200 each passed the
        tpm by those 900 (five admitted, 1900 tokens held), admits one
        (900 + 200) and refuses the next, told the calls in flight hold
        1100.  When A's call ends, its reservation is released in Redis
        once: B's 200 are left, and a reconnection carries nothing again.
        """
        (a, b), redis = yield self.cluster(2, tpm=1000)
        a.shared.up(False)
        refused, running = yield self.admit(a, tokens=900)
        self.assertIsNone(refused)
        self.assertEqual(held(redis.port, RESERVED_TOKENS), {})
        a.shared.up(True)
        yield self.settled(a)
        self.assertEqual(held(redis.port, RESERVED_TOKENS), {running.reserved_at: 900})
        answers = []
        for _ in range(3):
            refused, _ = yield self.admit(b, tokens=200)
            answers.append(refused)
        self.assertIsNone(answers[0])
        refusal = answers[1]
        assert isinstance(refusal, APIError)
        self.assertEqual(refusal.type, "tokens_reserved")
        self.assertIn("calls in flight hold 1100 tokens of its tpm limit of 1000", refusal.message)
        # A's call ends: its 900 released in Redis, once (B's call at the
        # same second keeps its 200).
        a.counters.counted("team", 300, 0.0, a.table.clock(), running)
        yield self.settled(a)
        self.assertEqual(sum(held(redis.port, RESERVED_TOKENS).values()), 200)
        a.shared.up(False)
        a.shared.up(True)
        yield self.settled(a)
        self.assertEqual(sum(held(redis.port, RESERVED_TOKENS).values()), 200)

    @inlineCallbacks
    def test_budget_reservation_carried(self) -> Any:
        """
        Budget 1 USD: a call admitted on A while Redis was away reserves
        0.9 USD; carried into Redis when A is back, so that B refuses a
        call that would pass the budget by it (budget_reserved).
        """
        (a, b), redis = yield self.cluster(2, budget_usd=1.0, budget_period="total")
        a.shared.up(False)
        refused, running = yield self.admit(a, usd=0.9)
        self.assertIsNone(refused)
        a.shared.up(True)
        yield wait_for(lambda: held(redis.port, RESERVED), 5)
        self.assertAlmostEqual(held(redis.port, RESERVED)[running.reserved_at], 0.9)
        yield self.held_elsewhere(b)

    @inlineCallbacks
    def test_call_ending_while_carried(self) -> Any:
        """
        A's call ends while its reservation is being carried (the script
        sent, not answered): its count does not release it in Redis (it is
        not there yet, and would take another call's), and once carried it
        is released there: nothing left, B's reservation of the same second
        untouched.
        """
        (a, b), redis = yield self.cluster(2, tpm=10_000)
        gated = _Gated(a.counters.redis.connection)  # type: ignore[attr-defined]
        a.counters.redis = gated
        a.shared.up(False)
        refused, running = yield self.admit(a, tokens=900)
        self.assertIsNone(refused)
        refused, other = yield self.admit(b, tokens=50)
        self.assertIsNone(refused)
        gated.gate = Deferred()
        a.shared.up(True)
        self.assertIn(running, a.counters.carrying)
        a.counters.counted("team", 300, 0.0, a.table.clock(), running)
        yield self.settled(a)
        self.assertEqual(held(redis.port, RESERVED_TOKENS), {other.reserved_at: 50})
        gated.open()
        yield wait_for(lambda: not a.counters.carrying and not a.counters.unreleased, 5)
        yield self.settled(a)
        self.assertEqual(held(redis.port, RESERVED_TOKENS), {other.reserved_at: 50})

    @inlineCallbacks
    def test_call_ended_while_redis_was_away_released_there(self) -> Any:
        """
        Budget 1 USD: A admits a call through Redis (0.9 USD reserved
        there), then loses Redis; the call ends meanwhile (0.1 USD).  Back,
        A releases its reservation in Redis: it held the budget for 15
        minutes, B refusing every call but one (budget_reserved) though
        nothing was running.
        """
        (a, b), redis = yield self.cluster(2, budget_usd=1.0, budget_period="total")
        refused, running = yield self.admit(a, usd=0.9)
        self.assertIsNone(refused)
        self.assertAlmostEqual(sum(held(redis.port, RESERVED).values()), 0.9)
        a.shared.up(False)
        a.counters.counted("team", 100, 0.1, a.table.clock(), running)
        a.shared.up(True)
        yield wait_for(lambda: not held(redis.port, RESERVED), 5)
        for _ in range(3):
            refused, _ = yield self.admit(b, usd=0.2)
            self.assertIsNone(refused)
        # Once: a reconnection releases nothing more.
        a.shared.up(False)
        a.shared.up(True)
        yield self.settled(a)
        self.assertAlmostEqual(sum(held(redis.port, RESERVED).values()), 0.6)

    @inlineCallbacks
    def test_release_of_a_lost_carry_not_sent_again(self) -> Any:
        """
        A's call X (900 tokens) and B's call Y (50) admitted through Redis
        in the same second; X ends while Redis is away.  Back, A's carry
        releases X's 900 in Redis, but its answer is lost (it ran): the
        release is not sent again at the next carry (review s29: it took
        Y's 50, held in the field of that second too).  Y's 50 are held.
        """
        (a, b), redis = yield self.cluster(2, tpm=10_000)
        lost = _Lost(a.counters.redis.connection)  # type: ignore[attr-defined]
        a.counters.redis = lost
        a.counters.timeout = 0.5
        now = a.table.clock()
        refused, x = yield self.admit(a, tokens=900, now=now)
        self.assertIsNone(refused)
        refused, y = yield self.admit(b, tokens=50, now=now)
        self.assertIsNone(refused)
        self.assertEqual(held(redis.port, RESERVED_TOKENS), {y.reserved_at: 950})
        a.shared.up(False)
        a.counters.counted("team", 10, 0.0, a.table.clock(), x)
        lost.lose = True
        a.shared.up(True)
        yield wait_for(lambda: lost.unanswered.called, 5)
        yield self.settled(a)
        self.assertEqual(held(redis.port, RESERVED_TOKENS), {y.reserved_at: 50})
        a.shared.up(False)
        a.shared.up(True)
        yield self.settled(a)
        self.assertEqual(held(redis.port, RESERVED_TOKENS), {y.reserved_at: 50})
        self.assertFalse(a.counters.unreleased)

    @inlineCallbacks
    def test_reservation_made_while_not_seeded_carried(self) -> Any:
        """
        Budget 1 USD, Redis emptied (its spends not seeded): A admits a call
        reserving 0.9 USD on its own (Redis answers it cannot judge the
        budget), which seeds Redis.  The reservation is then carried into
        Redis's: B sees it held (consumer_list's figure) and refuses a call
        that would pass the budget by it (budget_reserved).
        """
        (a, b), redis = yield self.cluster(2, budget_usd=1.0, budget_period="total")
        redis_command(redis.port, "FLUSHALL")
        seen = a.counters.generation
        refused, running = yield self.admit(a, usd=0.9)
        self.assertIsNone(refused)
        # Told Redis is not seeded, the service seeds it (its unseeded).
        a.shared.seed()
        # Seeded again (a new marker), and carried in the same step.
        yield wait_for(lambda: a.counters.generation != seen, 5)
        yield self.settled(a)
        self.assertAlmostEqual(held(redis.port, RESERVED).get(running.reserved_at, 0.0), 0.9)
        team = b.table.consumers["team"]
        yield b.counters.read_spends([team], b.table.clock())
        self.assertAlmostEqual(b.counters.held("team", b.table.clock())[0], 0.9)
        yield self.held_elsewhere(b)

    @inlineCallbacks
    def test_refused_and_lapsed_not_carried(self) -> Any:
        """
        Only the reservations still held are carried: a call refused
        reserves nothing, and one whose tokens' reservation has lapsed
        (TOKEN_RESERVATION_SECONDS) carries its budget's only.
        """
        (a,), redis = yield self.cluster(1, tpm=500, budget_usd=5.0, budget_period="total")
        a.shared.up(False)
        refused, old = yield self.admit(a, usd=0.5, tokens=600)
        self.assertIsNone(refused)
        refused, _ = yield self.admit(a, usd=0.5, tokens=600)
        self.assertIsInstance(refused, APIError)
        old.reserved_at -= TOKEN_RESERVATION_SECONDS
        a.shared.up(True)
        yield wait_for(lambda: held(redis.port, RESERVED), 5)
        yield self.settled(a)
        self.assertEqual(held(redis.port, RESERVED_TOKENS), {})
        self.assertEqual(list(held(redis.port, RESERVED)), [old.reserved_at])
        self.assertEqual(old.reserved_tokens, 0)

    @inlineCallbacks
    def test_reservations_of_a_write_refusal_carried_and_released(self) -> Any:
        """
        Redis refusing writes (out of memory) for less than a heartbeat:
        the reservation of a call admitted here alone meanwhile goes to
        Redis's, and that of a call whose count Redis refused is released
        there, at the first write it takes again (they were neither: the
        one missing from the cluster's tpm, the other held until it
        lapsed, a minute of tpm or ten of a budget).
        """
        [a], redis = yield self.cluster(1, tpm=10_000)
        refused, first = yield self.admit(a, tokens=300)
        self.assertIsNone(refused)
        yield self.settled(a)
        self.assertEqual(sum(held(redis.port, RESERVED_TOKENS).values()), 300)
        redis_command(redis.port, "CONFIG", "SET", "maxmemory-policy", "noeviction")
        redis_command(redis.port, "CONFIG", "SET", "maxmemory", "1")
        self.addCleanup(redis_command, redis.port, "CONFIG", "SET", "maxmemory", "0")
        refused, alone = yield self.admit(a, tokens=200)
        self.assertIsNone(refused)
        a.counters.counted("team", 10, 0.0, a.table.clock(), first)
        yield self.settled(a)
        self.assertEqual(sum(held(redis.port, RESERVED_TOKENS).values()), 300)
        redis_command(redis.port, "CONFIG", "SET", "maxmemory", "0")
        refused, _ = yield self.admit(a, tokens=100)
        self.assertIsNone(refused)
        # The second call's 200 carried, the first's 300 released, the
        # third's 100 admitted in Redis.
        yield wait_for(lambda: sum(held(redis.port, RESERVED_TOKENS).values()) == 300, 5)
        yield self.settled(a)
        self.assertEqual(sum(held(redis.port, RESERVED_TOKENS).values()), 300)
        self.assertEqual(alone.reserved_tokens, 200)


class CarryScriptTests(TestCase):
    """
    L{CARRY} itself, on a real C{redis-server}: every consumer's arguments
    read at their own place; a release takes only what Redis holds.
    """

    timeout = 30

    @inlineCallbacks
    def test_two_consumers(self) -> Any:
        redis = RedisServer()
        redis.start()
        self.addCleanup(redis.cleanup)
        connection = yield txredisapi.Connection("127.0.0.1", redis.port, reconnect=False, convertNumbers=False)
        self.addCleanup(connection.disconnect)
        scripts = RedisScripts(connection)
        now = int(time.time())
        redis_command(redis.port, "HSET", "b:reserved_tokens", str(now - 1), "70")
        keys = ["a:reserved", "a:reserved_tokens", "b:reserved", "b:reserved_tokens"]
        log = ReservationLog()
        log.add(("a", 1.0), now, 0.25, 10)
        log.add(("a", 1.0), now, 0.25, 0)
        log.add(("b", 1.0), now - 2, 0.0, 40)
        releases = ReservationLog()
        releases.add(("b", 1.0), now - 1, 0.0, 30)
        releases.add(("b", 1.0), now - 3, 0.0, 99)  # not in Redis: nothing taken
        args = [str(RESERVATION_SECONDS), str(TOKEN_RESERVATION_SECONDS)]
        for whose in (("a", 1.0), ("b", 1.0)):
            args += [log.field(whose, 0), log.field(whose, 1), releases.field(whose, 0), releases.field(whose, 1)]
        reply = yield scripts.script(CARRY, keys, args)
        self.assertEqual([float(value) for value in reply], [0.5, 50.0, 0.0, 30.0])
        for key, expected in (
            ("a:reserved", {now: 0.5}),
            ("a:reserved_tokens", {now: 10}),
            ("b:reserved", {}),
            ("b:reserved_tokens", {now - 2: 40, now - 1: 40}),
        ):
            self.assertEqual(held(redis.port, key), expected, key)
        ttl = int(redis_command(redis.port, "TTL", "a:reserved").strip(b":\r\n"))
        self.assertGreater(ttl, RESERVATION_SECONDS - 5)


class _Answered:
    """
    A Redis whose L{CARRY} scripts wait for the test to answer them
    (L{carries}: the arguments and the Deferred of each).
    """

    def __init__(self) -> None:
        self.carries: list[tuple[list[str], Deferred[Any]]] = []

    def key(self, *parts: str) -> str:
        return ":".join(("openclaw", *parts))

    def script(self, source: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        answer: Deferred[Any] = Deferred()
        if source == CARRY:
            self.carries.append((args, answer))
        return answer

    def publish_consumer(self, instance: str, name: str) -> Deferred[Any]:
        return succeed(None)

    def revokes(self) -> Deferred[Any]:
        return succeed({})


class ChainedCarryTests(TestCase):
    def test_chained_carry_judges_lapses_by_its_own_second(self) -> None:
        """
        A call ends while its reservation is being carried; the carry's
        answer comes a while later, and the carry that releases it reads
        the clock again (review s29: it took the first carry's second): a
        reservation of tokens lapsed by then is not released.
        """
        clock = Clock()
        clock.advance(10_000)
        redis = _Answered()
        counters = SharedCounters(redis, clock, 600.0)
        team = Consumer("team", tpm=10_000, created_at=CREATED)
        holder = Holder("team", "p", CREATED)
        self.assertIsNone(counters.admit(team, clock.seconds(), holder, 0.0, 50))
        counters.up = True
        counters.carry(clock.seconds)
        [(args, answer)] = redis.carries
        self.assertEqual(args[2:], ["", "10000:50", "", ""])
        counters.counted("team", 10, 0.0, clock.seconds(), holder)
        clock.advance(TOKEN_RESERVATION_SECONDS + 5)
        answer.callback([b"0", b"50", b"0", b"0"])
        # Its reservation has lapsed (in Redis too): nothing to release.
        self.assertEqual(len(redis.carries), 1)
        self.assertFalse(counters.carrying)
        self.assertFalse(counters.unreleased)


class UnsharedPrunedTests(TestCase):
    def test_calls_never_counted_dropped_once_lapsed(self) -> None:
        """
        Redis away for long: the holders of calls never counted (a client
        gone before its call started) are not kept past their
        reservations' lapse, however many come.
        """
        clock = Clock()
        clock.advance(10_000)
        counters = SharedCounters(RedisScripts(None), clock, 1.0)
        team = Consumer("team", tpm=10**9, created_at=CREATED)
        for _ in range(1000):
            self.assertIsNone(counters.admit(team, clock.seconds(), Holder("team", "p", CREATED), 0.0, 5))
        clock.advance(TOKEN_RESERVATION_SECONDS + 1)
        live = [Holder("team", "p", CREATED) for _ in range(30)]
        for holder in live:
            self.assertIsNone(counters.admit(team, clock.seconds(), holder, 0.0, 5))
        self.assertEqual(list(counters.unshared), live)
