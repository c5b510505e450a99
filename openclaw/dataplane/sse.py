"""
Server-sent events, read incrementally and written one at a time.

The decoder follows the WHATWG event-stream rules that matter to model
APIs: lines end in LF, CR or CRLF (Gemini uses CRLF, OpenAI-style APIs LF),
C{data:} lines of one event are joined with LF, a blank line ends the event,
lines starting with a colon are comments (keep-alives).  It takes bytes as
they come off the socket, split anywhere, and returns each event as soon as
its blank line has arrived.
"""

from __future__ import annotations

from typing import NamedTuple

#: The end marker OpenAI-style streams close with.
DONE = b"[DONE]"

#: No single event of a model API comes near this; a peer that sends one is
#: not speaking SSE.
MAX_EVENT_BYTES = 8 * 1024 * 1024


class SSEError(ValueError):
    """
    The stream is not server-sent events (an event beyond L{MAX_EVENT_BYTES}).
    """


class Event(NamedTuple):
    #: The C{event:} field, empty when none was sent.
    name: bytes
    data: bytes


def encode(data: bytes) -> bytes:
    """
    One event carrying C{data} (which must hold no line breaks: JSON from
    orjson never does).
    """
    return b"data: " + data + b"\n\n"


class SSEDecoder:
    """
    Feed it bytes, get back the events they complete.
    """

    def __init__(self) -> None:
        #: The line not ended yet, in the pieces it came in, and their
        #: total length: joined once, when its line end comes, so that a
        #: long line arriving in small reads costs time linear in its
        #: length.
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._data: list[bytes] = []
        self._name = b""
        #: The last chunk ended in CR: an LF starting the next one is that
        #: line's CRLF, not a blank line.
        self._skip_lf = False
        self._size = 0

    def feed(self, chunk: bytes) -> list[Event]:
        """
        The events completed by C{chunk}, in order.

        @raise SSEError: an event grew beyond L{MAX_EVENT_BYTES}.
        """
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = chunk[-1:] == b"\r"
        # Only the new bytes are searched for a line end.
        end = max(chunk.rfind(b"\n"), chunk.rfind(b"\r")) + 1
        if not end:
            if chunk:
                self._pending.append(chunk)
                self._pending_size += len(chunk)
                self._check_size()
            return []
        ended, rest = chunk[:end], chunk[end:]
        if self._pending:
            self._pending.append(ended)
            ended = b"".join(self._pending)
        self._pending = [rest] if rest else []
        self._pending_size = len(rest)
        lines = ended.splitlines()
        events: list[Event] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(Event(self._name, b"\n".join(self._data)))
                self._data = []
                self._name = b""
                self._size = 0
                continue
            field, colon, value = line.partition(b":")
            if not field:
                continue  # a comment
            if colon and value[:1] == b" ":
                value = value[1:]
            if field == b"data":
                self._data.append(value)
                # The line as it came, its end included: empty data lines
                # ("data:", endless) take room too, one list entry each.
                self._size += len(line) + 1
            elif field == b"event":
                self._name = value
            # "id" and "retry" mean nothing to a relay.
        self._check_size()
        return events

    def _check_size(self) -> None:
        if self._size + self._pending_size > MAX_EVENT_BYTES:
            raise SSEError(f"a server-sent event longer than {MAX_EVENT_BYTES} bytes")
