"""
An API connection's deadlines (L{ConnectionDeadlines}) as a plain object on
a fake clock, without sockets: the request's one timer moved from step to
step, its suspension while the transport has the connection paused, the
keyless grace and deadline, a lingering close's quiet timer, the close
deadline, and nothing once the connection closes.  What the connection
does at each (the 408s, 401s, aborts and log lines, on real sockets) is in
test_api_exhaustion, test_send_deadline, test_keyless_connections and
test_lingering_close.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from openclaw.dataplane.deadlines import SEND_TIMEOUT, ConnectionDeadlines

HEAD = (10.0, "API_HEADER_TIMEOUT_SECONDS", "its head")
BODY = (30.0, "API_BODY_TIMEOUT_SECONDS", "its body")


class DeadlineTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.calls: list[tuple[object, ...]] = []
        self.keep_keyless = True
        self.deadlines = ConnectionDeadlines(
            self.clock,
            late=lambda *armed: self.calls.append(("late", *armed)),
            stalled=lambda *armed: self.calls.append(("stalled", *armed)),
            grace_over=self.grace_over,
            keyless=lambda: self.calls.append(("keyless",)),
        )

    def grace_over(self) -> bool:
        self.calls.append(("grace_over",))
        return self.keep_keyless


class RequestDeadlineTests(DeadlineTestCase):
    def test_due_once(self) -> None:
        self.deadlines.arm(*HEAD)
        self.clock.advance(9.9)
        self.assertEqual(self.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.calls, [("late", *HEAD)])
        self.clock.advance(100)
        self.assertEqual(self.calls, [("late", *HEAD)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_rearm_moves_the_same_timer(self) -> None:
        self.deadlines.arm(*HEAD)
        (timer,) = self.clock.getDelayedCalls()
        self.clock.advance(5)
        self.deadlines.arm(*BODY)
        self.assertEqual(self.clock.getDelayedCalls(), [timer])
        self.assertEqual(timer.getTime(), 35.0)
        self.clock.advance(29.9)
        self.assertEqual(self.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.calls, [("late", *BODY)])

    def test_disarm_leaves_the_timer_to_no_effect(self) -> None:
        self.deadlines.arm(*HEAD)
        (timer,) = self.clock.getDelayedCalls()
        self.deadlines.disarm()
        # Not cancelled: moved again at the next arm.
        self.deadlines.arm(*BODY)
        self.assertEqual(self.clock.getDelayedCalls(), [timer])
        self.deadlines.disarm()
        self.clock.advance(100)
        self.assertEqual(self.calls, [])
        # Once fired, the next arm starts a timer afresh.
        self.deadlines.arm(*HEAD)
        self.clock.advance(10)
        self.assertEqual(self.calls, [("late", *HEAD)])

    def test_send_deadline_is_stalled(self) -> None:
        self.deadlines.arm(5.0, SEND_TIMEOUT, "a part of the answer")
        self.clock.advance(5)
        self.assertEqual(self.calls, [("stalled", 5.0, SEND_TIMEOUT, "a part of the answer")])

    def test_ended_for_http2(self) -> None:
        self.deadlines.arm(*HEAD)
        self.deadlines.end_request_deadlines()
        self.deadlines.arm(*BODY)
        self.deadlines.pause(5.0, "the answers written")
        self.clock.advance(100)
        self.assertEqual(self.calls, [])


class PauseTests(DeadlineTestCase):
    def test_send_deadline_while_paused(self) -> None:
        self.deadlines.arm(*HEAD)
        self.clock.advance(8)
        self.deadlines.pause(5.0, "the answers written")
        # The same timer, moved; a second pause does not move it again.
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(4)
        self.deadlines.pause(5.0, "the answers written")
        self.clock.advance(1)
        self.assertEqual(self.calls, [("stalled", 5.0, SEND_TIMEOUT, "the answers written")])

    def test_resume_runs_the_waiting_deadline_afresh(self) -> None:
        self.deadlines.arm(*HEAD)
        self.clock.advance(8)
        self.deadlines.pause(5.0, "the answers written")
        self.clock.advance(4)
        self.deadlines.resume()
        # The head's whole 10 s again, from the resume.
        self.clock.advance(9.9)
        self.assertEqual(self.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.calls, [("late", *HEAD)])

    def test_armed_while_paused_waits_for_the_resume(self) -> None:
        self.deadlines.pause(5.0, "the answers written")
        self.deadlines.arm(*BODY)
        self.clock.advance(4)
        self.deadlines.resume()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(29.9)
        self.assertEqual(self.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.calls, [("late", *BODY)])

    def test_disarmed_while_paused(self) -> None:
        self.deadlines.arm(*HEAD)
        self.deadlines.pause(5.0, "the answers written")
        self.deadlines.disarm()
        self.clock.advance(4)
        self.deadlines.resume()
        self.clock.advance(100)
        self.assertEqual(self.calls, [])

    def test_drop_request_deadline(self) -> None:
        self.deadlines.arm(*HEAD)
        self.assertEqual(self.deadlines.drop_request_deadline(), HEAD)
        self.assertIsNone(self.deadlines.drop_request_deadline())
        self.deadlines.arm(*BODY)
        self.deadlines.pause(5.0, "the answers written")
        # While paused: the waiting one; the send deadline holds.
        self.assertEqual(self.deadlines.drop_request_deadline(), BODY)
        self.deadlines.resume()
        self.clock.advance(100)
        self.assertEqual(self.calls, [])


class KeylessTests(DeadlineTestCase):
    def test_grace_then_deadline(self) -> None:
        self.deadlines.start_keyless(1.0, 30.0)
        self.clock.advance(1)
        self.assertEqual(self.calls, [("grace_over",)])
        self.clock.advance(28.9)
        self.assertEqual(self.calls, [("grace_over",)])
        self.clock.advance(0.1)
        self.assertEqual(self.calls, [("grace_over",), ("keyless",)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_grace_over_says_no_deadline(self) -> None:
        self.keep_keyless = False
        self.deadlines.start_keyless(1.0, 30.0)
        self.clock.advance(100)
        self.assertEqual(self.calls, [("grace_over",)])

    def test_no_grace_when_not_shorter(self) -> None:
        self.deadlines.start_keyless(5.0, 3.0)
        self.clock.advance(3)
        self.assertEqual(self.calls, [("keyless",)])

    def test_stopped(self) -> None:
        self.deadlines.start_keyless(1.0, 30.0)
        self.clock.advance(1)
        self.deadlines.stop_keyless()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(self.calls, [("grace_over",)])


class CloseTests(DeadlineTestCase):
    def test_close_ends_the_other_deadlines(self) -> None:
        overdue: list[float] = []
        self.deadlines.arm(*HEAD)
        self.deadlines.start_keyless(1.0, 30.0)
        self.assertFalse(self.deadlines.closing)
        self.deadlines.close(2.0, lambda: overdue.append(self.clock.seconds()))
        self.assertTrue(self.deadlines.closing)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        # Nothing arms again, a second close changes nothing.
        self.deadlines.arm(*BODY)
        self.deadlines.pause(5.0, "the answers written")
        self.deadlines.resume()
        self.deadlines.close(9.0, lambda: overdue.append(-1))
        self.clock.advance(1.9)
        self.assertEqual(overdue, [])
        self.clock.advance(0.1)
        self.clock.advance(100)
        self.assertEqual((self.calls, overdue), ([], [2.0]))

    def test_lost_cancels_everything(self) -> None:
        closed: list[str] = []
        self.deadlines.arm(*HEAD)
        self.deadlines.start_keyless(1.0, 30.0)
        self.deadlines.start_quiet(1.0, lambda: closed.append("quiet"))
        self.deadlines.close(2.0, lambda: closed.append("overdue"))
        self.deadlines.lost()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.deadlines.arm(*HEAD)
        self.deadlines.close(2.0, lambda: closed.append("after"))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual((self.calls, closed), ([], []))

    def test_nothing_after_lost(self) -> None:
        overdue: list[str] = []
        self.deadlines.arm(*HEAD)
        self.deadlines.start_keyless(1.0, 30.0)
        self.deadlines.lost()
        self.assertTrue(self.deadlines.closing)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.deadlines.arm(*BODY)
        self.deadlines.pause(5.0, "the answers written")
        self.deadlines.close(2.0, lambda: overdue.append("overdue"))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual((self.calls, overdue), ([], []))

    def test_quiet_timer_not_moved_at_every_read(self) -> None:
        closed: list[float] = []
        self.deadlines.start_quiet(1.0, lambda: closed.append(self.clock.seconds()))
        (timer,) = self.clock.getDelayedCalls()
        self.clock.advance(0.5)
        self.deadlines.heard()
        self.clock.advance(0.2)
        self.deadlines.heard()
        # Still the first timer, due at 1.0, which runs on to 0.7 + 1.0.
        self.assertEqual(self.clock.getDelayedCalls(), [timer])
        self.clock.advance(0.3)
        self.assertEqual(closed, [])
        self.clock.advance(0.69)
        self.assertEqual(closed, [])
        self.clock.advance(0.01)
        self.assertEqual(closed, [1.7])

    def test_quiet_timer_survives_the_close(self) -> None:
        closed: list[str] = []
        self.deadlines.start_quiet(1.0, lambda: closed.append("quiet"))
        self.deadlines.close(30.0, lambda: closed.append("overdue"))
        self.clock.advance(1)
        self.assertEqual(closed, ["quiet"])
