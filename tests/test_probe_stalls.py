"""
Health probes and models listings after the gateway's event loop stood
still (the process stopped, its host or VM paused, swapping): the
reactor's timers go by the wall clock, so on resume a time limit that
passed meanwhile fired at once, before the reactor had read what came
meanwhile: the provider, which had no time to answer, was judged timed
out (a health check reporting it down, a models listing charged to its
breaker).  Such a limit now begins anew (L{openclaw.stalls.add_deadline}).

Most tests move two clocks by hand: the reactor's (C{Clock}, the wall
clock) and a monotonic one, apart.  The last stops the real reactor's
thread while a stand-in provider on a thread of its own answers.
"""

from __future__ import annotations

from typing import Any, ClassVar

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from openclaw.providers.base import ProbeResult
from openclaw.providers.breaker import CircuitBreaker
from openclaw.providers.errors import ProbeTimedOut
from openclaw.providers.fetch import Exchange
from openclaw.providers.kimi import KimiAdapter
from openclaw.stalls import LATE_SECONDS, add_deadline
from tests.support import capture_log_events, open_client, start_gateway
from tests.test_stalled_loop import StillAnswering, still_answering_kimi

KIMI_KEY = "sk-kimi-secret-0123456789"
TIMEOUT = 5.0
MODELS = ["moonshot-v1-8k", "kimi-k2"]


class _HeldKimi(KimiAdapter):
    """
    Kimi whose models listings wait for the test to answer them.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.asked: list[Deferred[list[str]]] = []

    async def fetch_model_ids(self, exchange: Exchange) -> list[str]:
        asked: Deferred[list[str]] = Deferred()
        self.asked.append(asked)
        return await asked


class ClocksTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.monotonic = 1000.0
        self.adapter = _HeldKimi(
            http=None,
            agent=None,
            reactor=self.clock,
            base_url="http://127.0.0.1:9/v1",
            api_key=KIMI_KEY,
            default_model="moonshot-v1-8k",
            timeout=TIMEOUT,
            monotonic=lambda: self.monotonic,
            # One failure opens it: any charge shows.
            breaker=CircuitBreaker(self.clock.seconds, threshold=1),
        )
        self.events = capture_log_events(self)

    def stand_still(self, seconds: float) -> None:
        """
        The loop stands still for C{seconds}: both clocks go on, then the
        timers due run at once.
        """
        self.monotonic += seconds
        self.clock.advance(seconds)

    def step_wall(self, seconds: float) -> None:
        """
        The wall clock is stepped forward by C{seconds}; no time passes.
        """
        self.clock.advance(seconds)

    def answer(self) -> None:
        self.adapter.asked[-1].callback(list(MODELS))

    def warnings(self) -> list[str]:
        return [e["log_format"] for e in self.events if "stood still" in e.get("log_format", "")]


class ProbeTests(ClocksTestCase):
    def test_probe_after_a_stall_is_not_judged(self) -> None:
        """
        The loop stood still 60 s with a 5 s probe under way: not a
        timeout; the probe goes on, its limit begun anew, and the answer
        that comes is taken (before: "timed out after 5 s", the provider
        reported down).  The report and the log say the loop stood still.
        """
        probing = self.adapter.probe()
        self.stand_still(60.0)
        self.assertNoResult(probing)
        self.answer()
        result: ProbeResult = self.successResultOf(probing)
        self.assertIs(result.ok, True)
        self.assertEqual(result.stalled, 55.0)
        entry = result.report(True)
        self.assertEqual(entry["stalled_s"], 55.0)
        self.assertNotIn("error", entry)
        self.assertEqual(len(self.warnings()), 1)
        warned = next(e for e in self.events if "stood still" in e.get("log_format", ""))
        self.assertEqual((warned["provider"], warned["what"], warned["seconds"]), ("kimi", "health probe", 55.0))
        self.assertEqual(self.adapter.breaker.state, "closed")

    def test_probe_still_unanswered_after_a_stall_times_out(self) -> None:
        """
        After the stall the provider gets the whole limit again, as time
        the loop runs; unanswered by then, the probe has failed, saying the
        loop stood still during it.
        """
        probing = self.adapter.probe()
        self.stand_still(60.0)
        self.stand_still(TIMEOUT - 0.1)
        self.assertNoResult(probing)
        self.stand_still(0.1)
        result: ProbeResult = self.successResultOf(probing)
        self.assertIs(result.ok, False)
        self.assertIn("timed out after 5 s", result.error)
        self.assertEqual(result.stalled, 55.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_wall_clock_stepped_forward(self) -> None:
        """
        The wall clock stepped an hour forward 1 s into the probe: its
        timer fires, but the provider had 1 s of its 5: it waits the rest,
        by the monotonic clock, with no word of a stall (before: timed out
        at once).
        """
        probing = self.adapter.probe()
        self.stand_still(0.5)
        self.step_wall(3600.0)
        self.assertNoResult(probing)
        self.stand_still(TIMEOUT - 0.5 - 0.1)
        self.assertNoResult(probing)
        self.stand_still(0.1)
        result: ProbeResult = self.successResultOf(probing)
        self.assertIs(result.ok, False)
        self.assertIn("timed out after 5 s", result.error)
        self.assertIsNone(result.stalled)
        self.assertNotIn("stalled_s", result.report(None))
        self.assertEqual(self.warnings(), [])


class ListingTests(ClocksTestCase):
    def test_listing_after_a_stall_is_not_charged(self) -> None:
        """
        A models listing (C{GET /v1/models}) under way when the loop stood
        still is not a failure charged to the breaker (before: one
        timeout, the breaker open at C{BREAKER_FAILURES=1}); it goes on
        and its answer is taken.
        """
        listing = self.adapter.list_models()
        self.stand_still(60.0)
        self.assertNoResult(listing)
        self.assertEqual(self.adapter.breaker.state, "closed")
        self.answer()
        self.assertEqual(self.successResultOf(listing), MODELS)
        self.assertEqual(self.adapter.breaker.state, "closed")
        warned = [e for e in self.events if "stood still" in e.get("log_format", "")]
        self.assertEqual([e["what"] for e in warned], ["models listing"])

    def test_real_timeout_is_still_charged(self) -> None:
        """
        A listing unanswered for its whole limit of running time, stall
        or none, is the provider's failure, as before.
        """
        listing = self.adapter.list_models()
        self.stand_still(60.0)
        self.stand_still(TIMEOUT)
        self.failureResultOf(listing, ProbeTimedOut)
        self.assertEqual(self.adapter.breaker.state, "open")

    def test_short_delay_is_no_stall(self) -> None:
        """
        A timer found due less than LATE_SECONDS late (a busy loop) is
        judged: no stall.
        """
        listing = self.adapter.list_models()
        self.stand_still(TIMEOUT + LATE_SECONDS - 0.1)
        self.failureResultOf(listing, ProbeTimedOut)
        self.assertEqual(self.adapter.breaker.state, "open")
        self.assertEqual(self.warnings(), [])

    def test_wall_clock_set_back(self) -> None:
        """
        A wall clock set back holds the timer: found due late on the
        monotonic clock alone, the provider had more than its time, and
        it is judged.
        """
        listing = self.adapter.list_models()
        self.monotonic += 60.0
        self.clock.advance(TIMEOUT)
        self.failureResultOf(listing, ProbeTimedOut)
        self.assertEqual(self.adapter.breaker.state, "open")
        self.assertEqual(self.warnings(), [])


class DeadlineTests(SynchronousTestCase):
    def test_cancelled_by_its_caller(self) -> None:
        """
        A deferred cancelled by its caller is not turned into a timeout,
        and its timer is gone.
        """
        clock = Clock()
        d: Deferred[None] = Deferred()
        add_deadline(d, 5.0, clock, lambda f, s: self.fail("not a timeout"), monotonic=clock.seconds)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(clock.getDelayedCalls(), [])


class _Kimi(StillAnswering):
    """
    Moonshot's models listing, answered while the gateway's loop stands
    still (longer than the probe's limit).
    """

    document: ClassVar[Any] = {"object": "list", "data": [{"id": m, "object": "model"} for m in MODELS]}


class StoppedLoopTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_health_check_across_a_stall(self) -> Any:
        """
        The operator's health_check while the gateway's loop stands still
        2.5 s (its reactor's thread asleep), past a 0.5 s
        HEALTH_CHECK_TIMEOUT, the provider answering meanwhile: the
        provider is reported healthy, with the stall (before: "timed out
        after 0.5 s").
        """
        events = capture_log_events(self)
        providers = still_answering_kimi(self, _Kimi)
        gateway = start_gateway(
            self, providers=providers, default_provider="kimi", health_check_timeout=0.5, breaker_failures=1
        )
        client = yield open_client(self, gateway.port)
        answer = yield client.command(gateway.token, "health_check")
        kimi = answer["result"]["providers"]["kimi"]
        self.assertIs(kimi["ok"], True, kimi)
        self.assertEqual(kimi["models"], len(MODELS))
        self.assertGreater(kimi["stalled_s"], 1.0)
        self.assertEqual(kimi["breaker"], "closed")
        self.assertTrue(any("stood still" in e.get("log_format", "") for e in events))
