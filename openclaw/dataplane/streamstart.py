"""
A stream's start, as the client sees it: the events that carry nothing of
the answer are held back, with the client's status line and headers, until
one that begins it (L{StreamStart}).

A plain object: the call (L{openclaw.dataplane.call.ChatCall}) hands it the
events and the time, and does what it says (writes, opens the stream); no
request, reactor or metrics in here.
"""

from __future__ import annotations

import attrs

#: What a stream's call waits for, for its timeout's message
#: (L{openclaw.dataplane.errors.upstream_timeout}): nothing yet.
FIRST_EVENT = "the stream's first event"
#: After events that carried nothing of the answer (L{StreamStart.held}).
ANSWER_START = "the stream's first event of the answer (those before it carried none of it)"
#: The stream has been opened to the client.
NEXT_EVENT = "the stream's next event"

#: The most bytes of events held back before the answer begins
#: (L{StreamStart.held}): past it the stream is opened all the same, as a
#: provider that sends nothing but roles and empty text is answering.
MAX_HELD_BYTES = 64 * 1024
#: The longest a stream's events are held back before its answer begins
#: (seconds, L{StreamStart.held}): past it the stream is opened at the next
#: event all the same, so that a client's read timeout (the openai SDK
#: times each read) is not run out by a provider that keeps sending empty
#: events (a thinking model's empty deltas) while the call is alive.
MAX_HELD_SECONDS = 5.0


@attrs.define(eq=False)
class StreamStart:
    """
    Whether a stream has reached its client yet, and what it holds back
    until it does.

    The rules:

      - events that carry nothing of the answer (Moonshot's first chunk, a
        role and C{""}; Gemini's C{{"text": ""}}; a usage) are held
        (L{hold}), as the bytes they are, and nothing reaches the client:
        an error, a cut or a stall after them is a stream that failed
        before its answer started, answered, failed over and counted by
        the breaker like any failed attempt;
      - the first event that begins the answer (text, reasoning, a tool
        call, a finish reason: L{StreamTranslation.answer_begun
        <openclaw.providers.wire.StreamTranslation.answer_begun>}) opens
        the stream (L{begin}), everything held going ahead of it, byte for
        byte and in order;
      - so does the stream's end, whole (L{end}): what was held goes ahead
        of its closing chunks;
      - held past L{max_bytes} bytes, or once an event comes more than
        L{max_seconds} after the first one held, the stream is opened all
        the same with what was held (a provider answering with nothing
        but empty events; a client's read timeout): its first token is
        then still to be counted (L{first_token_due});
      - whether an event begins the answer is the caller's to say: one that
        failed its checks in the same read does not (the relay's C{begun},
        L{openclaw.dataplane.call._StreamRelay});
      - a dropped attempt (L{drop}) leaves nothing held: what it held back
        is not the next attempt's answer, whose stream starts anew.

    Once the stream is open (L{sent}) this object has no more say: the
    caller writes each event as it comes.

    @ivar max_bytes: L{MAX_HELD_BYTES} unless given.
    @ivar max_seconds: L{MAX_HELD_SECONDS} unless given.
    """

    max_bytes: int = MAX_HELD_BYTES
    max_seconds: float = MAX_HELD_SECONDS
    #: The stream's first bytes (and with them the client's status line
    #: and headers) have gone to the client, or go with what the method
    #: that set it returned: never undone.
    sent: bool = attrs.field(default=False, init=False)
    #: The events held back until one begins the answer, as the bytes they
    #: are.
    held: bytes = attrs.field(default=b"", init=False)
    #: When the first of L{held} came (seconds, the caller's clock).
    held_since: float = attrs.field(default=0.0, init=False)
    #: The stream was opened before its answer began (held too long or
    #: too much): its time to the first token is to be counted when the
    #: answer begins (the caller clears it then).
    first_token_due: bool = attrs.field(default=False, init=False)
    #: What the stream waits for: L{FIRST_EVENT}, L{ANSWER_START} or
    #: L{NEXT_EVENT}, for a timeout's message.
    waiting_for: str = attrs.field(default=FIRST_EVENT, init=False)

    def hold(self, events: bytes, now: float) -> bytes:
        """
        C{events}, none of which begins the answer, came at C{now}
        (seconds) before the stream was opened: held.

        @return: C{b""}, or, past L{max_bytes} held or L{max_seconds}
            since the first of them, all that was held, C{events} last:
            the stream is opened with it (L{sent}, L{first_token_due}).
        """
        if not self.held:
            self.held_since = now
        self.held += events
        self.waiting_for = ANSWER_START
        if len(self.held) > self.max_bytes or now - self.held_since > self.max_seconds:
            # Nothing but roles and empty text, more or longer than a
            # stream's start: a provider answering.
            self.first_token_due = True
            held = self.end()
            # Still waited for (the caller sets L{NEXT_EVENT} once it begins).
            self.waiting_for = ANSWER_START
            return held
        return b""

    def begin(self, events: bytes) -> bytes:
        """
        C{events} begin the answer: the stream is opened (L{sent}) with
        them.

        @return: all that was held, then C{events}.
        """
        # As end(), inline: this is every stream's first event.
        held, self.held = self.held, b""
        self.sent = True
        self.waiting_for = NEXT_EVENT
        return held + events

    def end(self) -> bytes:
        """
        The stream is opened (if it was not) for its last bytes.

        @return: what was held, to go ahead of them; C{b""} if nothing.
        """
        held, self.held = self.held, b""
        self.sent = True
        self.waiting_for = NEXT_EVENT
        return held

    def drop(self) -> None:
        """
        The attempt whose stream this was is let go before anything of it
        reached the client: what it held is forgotten, and the next
        attempt's stream starts anew.
        """
        self.held = b""
        self.held_since = 0.0
        self.waiting_for = FIRST_EVENT


__all__ = ["ANSWER_START", "FIRST_EVENT", "MAX_HELD_BYTES", "MAX_HELD_SECONDS", "NEXT_EVENT", "StreamStart"]
