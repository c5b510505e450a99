"""
Tests for L{openclaw.dataplane.streamstart}: a stream's start held back
until its answer begins, the object alone (no reactor, no request).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from openclaw.dataplane.streamstart import (
    ANSWER_START,
    FIRST_EVENT,
    MAX_HELD_BYTES,
    MAX_HELD_SECONDS,
    NEXT_EVENT,
    StreamStart,
)

#: Moonshot's first chunk (a role and empty text), as the client gets it.
ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
EMPTY = b'data: {"choices":[{"index":0,"delta":{"content":""}}]}\n\n'
TEXT = b'data: {"choices":[{"index":0,"delta":{"content":"Hi."}}]}\n\n'


class HeldTests(SynchronousTestCase):
    def test_held_until_an_event_begins_the_answer(self) -> None:
        """
        Events that carry nothing of the answer are held: nothing is to be
        written, nothing has reached the client.
        """
        start = StreamStart()
        self.assertEqual((start.sent, start.waiting_for), (False, FIRST_EVENT))
        self.assertEqual(start.hold(ROLE, 100.0), b"")
        self.assertEqual(start.hold(EMPTY, 101.0), b"")
        self.assertFalse(start.sent)
        self.assertEqual(start.held, ROLE + EMPTY)
        self.assertEqual(start.waiting_for, ANSWER_START)

    def test_held_bytes_go_ahead_in_order(self) -> None:
        """
        The event that begins the answer opens the stream: all that was
        held goes ahead of it, byte for byte and in the order it came.
        """
        start = StreamStart()
        start.hold(ROLE, 100.0)
        start.hold(EMPTY, 100.5)
        self.assertEqual(start.begin(TEXT), ROLE + EMPTY + TEXT)
        self.assertTrue(start.sent)
        self.assertEqual(start.held, b"")
        self.assertEqual(start.waiting_for, NEXT_EVENT)
        # Its time to the first token is the caller's to count now.
        self.assertFalse(start.first_token_due)

    def test_first_event_begins_the_answer(self) -> None:
        """
        A stream whose first event begins the answer (the common path) has
        it written as it is: not copied.
        """
        start = StreamStart()
        events = TEXT + EMPTY
        self.assertIs(start.begin(events), events)
        self.assertTrue(start.sent)
        self.assertFalse(start.first_token_due)

    def test_defaults(self) -> None:
        """
        The limits are L{MAX_HELD_BYTES} (64 KiB) and L{MAX_HELD_SECONDS}
        (5 s) unless given.
        """
        start = StreamStart()
        self.assertEqual((start.max_bytes, start.max_seconds), (MAX_HELD_BYTES, MAX_HELD_SECONDS))
        self.assertEqual((MAX_HELD_BYTES, MAX_HELD_SECONDS), (64 * 1024, 5.0))


class ReleasedTests(SynchronousTestCase):
    def test_past_64_kib(self) -> None:
        """
        Held past L{MAX_HELD_BYTES}, the stream is opened all the same with
        what was held, in order; its first token is still to be counted.
        """
        start = StreamStart()
        first = b"a" * (MAX_HELD_BYTES - 1)
        self.assertEqual(start.hold(first, 100.0), b"")
        self.assertEqual(start.hold(b"b", 100.0), b"")  # 64 KiB exactly: held still
        self.assertFalse(start.sent)
        self.assertEqual(start.hold(b"c", 100.0), first + b"bc")
        self.assertTrue(start.sent)
        self.assertTrue(start.first_token_due)
        self.assertEqual(start.held, b"")
        # Opened, but the answer is still waited for (a timeout says so).
        self.assertEqual(start.waiting_for, ANSWER_START)

    def test_past_5_seconds(self) -> None:
        """
        An event that comes more than L{MAX_HELD_SECONDS} after the first
        one held opens the stream with all of them, itself last, however
        close it came to the one before it.
        """
        start = StreamStart()
        self.assertEqual(start.hold(ROLE, 100.0), b"")
        self.assertEqual(start.hold(EMPTY, 103.0), b"")
        self.assertEqual(start.hold(EMPTY, 105.0), b"")  # 5 s exactly: held still
        self.assertFalse(start.sent)
        self.assertEqual(start.hold(b"x", 105.25), ROLE + EMPTY + EMPTY + b"x")
        self.assertTrue(start.sent)
        self.assertTrue(start.first_token_due)

    def test_given_limits(self) -> None:
        """
        The limits given are the ones kept.
        """
        start = StreamStart(max_bytes=4, max_seconds=0.5)
        self.assertEqual(start.hold(b"abcd", 1.0), b"")
        self.assertEqual(start.hold(b"e", 1.0), b"abcde")
        start = StreamStart(max_bytes=4, max_seconds=0.5)
        self.assertEqual(start.hold(b"a", 1.0), b"")
        self.assertEqual(start.hold(b"b", 1.6), b"ab")


class EndTests(SynchronousTestCase):
    def test_end_sends_what_was_held(self) -> None:
        """
        A stream that ends whole before an event began its answer opens
        with its end: what was held goes ahead of its closing chunks.
        """
        start = StreamStart()
        start.hold(ROLE, 100.0)
        self.assertEqual(start.end(), ROLE)
        self.assertTrue(start.sent)
        self.assertFalse(start.first_token_due)
        self.assertEqual(start.end(), b"")

    def test_end_of_an_open_stream(self) -> None:
        """
        Once open, nothing is held: the end has nothing to send ahead.
        """
        start = StreamStart()
        start.begin(TEXT)
        self.assertEqual(start.end(), b"")
        self.assertTrue(start.sent)
        start = StreamStart()
        self.assertEqual(start.end(), b"")


class FailedBeforeTheAnswerTests(SynchronousTestCase):
    def test_failing_event_in_the_same_read(self) -> None:
        """
        The events of a read whose last event failed its checks are handed
        on as not beginning the answer (the relay's C{begun}) even when
        that event said it did: they are held, nothing has reached the
        client, so the failure is the attempt's, failed over.
        """
        start = StreamStart()
        self.assertEqual(start.hold(ROLE, 100.0), b"")
        self.assertFalse(start.sent)

    def test_drop_clears_what_was_held(self) -> None:
        """
        A dropped attempt leaves nothing held: the next attempt's stream
        starts anew, its first answering event sent alone, and its time
        held counted from its own first event.
        """
        start = StreamStart()
        start.hold(ROLE, 100.0)
        start.drop()
        self.assertEqual((start.held, start.sent, start.waiting_for), (b"", False, FIRST_EVENT))
        self.assertEqual(start.hold(EMPTY, 200.0), b"")
        self.assertEqual(start.hold(EMPTY, 204.0), b"")
        self.assertEqual(start.begin(TEXT), EMPTY + EMPTY + TEXT)
        start = StreamStart()
        start.hold(ROLE, 100.0)
        start.drop()
        self.assertEqual(start.begin(TEXT), TEXT)
