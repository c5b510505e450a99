"""
The API's HTTP/1.1 connection: twisted.web's L{HTTPChannel}, reading a
request head in one pass.

twisted.web splits a head into lines one at a time and handles each header
through several method calls: with the 17 headers the openai SDK sends,
about a fifth of the gateway's own CPU per model call
(C{bench/data_plane_cpu.py --sdk-headers}: 104 µs before, 84 after).  When
a whole head has arrived and every line of it is plain (a token name, a
colon, a value without NUL, CR or LF: what every HTTP client sends),
L{APIChannel} checks it with one regular expression per line and stores the
headers directly.
Anything else (a head in pieces, an obsolete folded line, an invalid name
or value, over the size or count limits, a request pipelined behind
another) takes twisted.web's own path, which answers the bad ones with 400;
the request line and the end of the head always do, so the request is
created, parsed and checked (C{Content-Length} against C{Transfer-Encoding}
included) by twisted.web itself.

What it writes in a turn of the reactor is sent at the turn's end, as one
write per connection, without the transport's round trip through epoll
(see L{openclaw.writethrough}): status line, headers and body in one
segment, the answers of a busy turn in one burst.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web import http_headers
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

from openclaw.writethrough import write_through

#: One plain header line: a token, a colon, optional blanks, then a value of
#: any bytes but NUL, CR and LF (as twisted.web accepts), whose trailing
#: blanks are stripped after the match.  No lazy or nested repetition: the
#: match is linear in the line, whatever a client sends.
_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00\r\n]*)")
#: Headers that decide how the body is framed, as twisted.web names them.
_FRAMING = {b"content-length": b"Content-Length", b"transfer-encoding": b"Transfer-Encoding"}
#: The parts of twisted.web the one-pass read relies on beyond its public
#: API: HTTPChannel's request state and framing check, the header name
#: canonicalizer and the table L{Headers} keeps (documented as its ivar).
#: Should a Twisted release change them, every head takes twisted.web's
#: own path (slower, never wrong).
_ONE_PASS = all(
    hasattr(HTTPChannel, name)
    for name in ("_HTTPChannel__first_line", "_HTTPChannel__header", "_maybeChooseTransferDecoder")
) and hasattr(http_headers, "_nameEncoder") and "_rawHeaders" in getattr(http_headers.Headers, "__slots__", ())


class APIChannel(HTTPChannel):
    """
    An HTTP/1.1 connection that reads plain request heads in one pass, and
    tells its site when it opens and closes.
    """

    site: Any
    #: The local address, asked for once (see L{getHost}).
    _host: Any = None
    #: Written this turn and not sent yet (see L{send_unsent}), or L{None}.
    _unsent: list[bytes] | None = None

    def connectionMade(self) -> None:
        # HTTPChannel turns Nagle's algorithm off, which streams rely on:
        # their events are small writes in quick succession, and Nagle
        # would hold each back until the client ACKs the previous one (up
        # to 40 ms with a delayed ACK).  A test checks it stays off.
        super().connectionMade()
        self.site.channels.add(self)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.site.channel_closed(self)

    # -- writing ---------------------------------------------------------------

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        if not isinstance(headers, Headers):
            # The form no part of Twisted uses any more: its own path.
            super().writeHeaders(version, code, reason, headers)
            return
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head.extend((name, b": ", value, b"\r\n"))
        head.append(b"\r\n")
        self.writeSequence(head)

    def write(self, data: bytes) -> None:
        self.writeSequence((data,))

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        if self._unsent is None:
            self._unsent = list(iovec)
            self.site.send_at_end_of_turn(self)
        else:
            self._unsent.extend(iovec)

    def requestDone(self, request: Any) -> None:
        if self._unsent and getattr(self, "_busyReceiving", True):
            # Answered in the middle of a read, which goes on as soon as
            # this returns: the answer goes first.  (Bytes that came in
            # meanwhile are read through dataReceived, which sends first.)
            self.send_unsent()
        super().requestDone(request)

    def loseConnection(self) -> None:
        # The transport closes once its own buffer is empty: what is still
        # unsent here goes into it first.
        self.send_unsent()
        super().loseConnection()

    def send_unsent(self) -> None:
        """
        Send what was written since the last time, as one write, at once.
        """
        unsent, self._unsent = self._unsent, None
        if unsent:
            write_through(self.transport, b"".join(unsent))

    def getHost(self) -> Any:
        # Every Request asks, and a TCP transport answers with a
        # getsockname(2) each time: the local address of a connection
        # never changes, so ask once.
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def dataReceived(self, data: bytes) -> None:
        if self._unsent:
            # Answers go out before anything more is read: a request
            # pipelined behind one is read now, and twisted.web writes some
            # answers (100 Continue, 400) straight to the transport.
            self.send_unsent()
        if not (_ONE_PASS and self._at_request_start()):
            return super().dataReceived(data)
        end = data.find(b"\r\n\r\n")
        if end < 0 or end + 4 > self.totalHeadersSize:
            return super().dataReceived(data)
        request_line, *lines = data[:end].split(b"\r\n")
        if not request_line or len(lines) > self.maxHeaders:
            return super().dataReceived(data)
        headers = []
        for line in lines:
            match = _HEADER_LINE.fullmatch(line)
            if match is None:
                return super().dataReceived(data)
            name, value = match.groups()
            headers.append((name, value.rstrip(b" \t")))
        self.resetTimeout()
        self._busyReceiving = True
        try:
            if not self._head_received(request_line, headers):
                return None
        finally:
            self._busyReceiving = False
        # The body and whatever follows, in whatever mode the head left the
        # connection (and anything buffered meanwhile, after it).
        self._buffer = data[end + 4 :] + self._buffer
        if self._buffer:
            LineReceiver.dataReceived(self, b"")
        return None

    def _at_request_start(self) -> bool:
        """
        Whether the next bytes begin a request: in line mode, with nothing
        buffered, not inside another read, and the request line still to
        come.  (Only asked when L{_ONE_PASS} found the state it reads.)
        """
        return bool(
            self.line_mode
            and not self._buffer
            and not self._busyReceiving
            and not self.paused
            and self.persistent
            and self._HTTPChannel__first_line == 1
            and not self._HTTPChannel__header
        )

    def _head_received(self, request_line: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
        """
        Hand a checked head to twisted.web: the request line and the end of
        the head through its own L{lineReceived}, the headers straight into
        the new request.  False if the request was refused on the way.
        """
        count = len(self.requests)
        self.lineReceived(request_line)
        if self.transport.disconnecting or len(self.requests) != count + 1:
            return False
        # As Headers.addRawHeader stores them, without its per-call checks:
        # the name is a token and the value holds no line break, both
        # matched already.
        table = self.requests[-1].requestHeaders._rawHeaders
        canonical = http_headers._nameEncoder.encode
        for name, value in headers:
            framing = _FRAMING.get(name.lower())
            if framing is not None and not self._maybeChooseTransferDecoder(framing, value):
                return False
            key = canonical(name)
            values = table.get(key)
            if values is None:
                table[key] = [value]
            else:
                values.append(value)
        self.lineReceived(b"")
        return not self.transport.disconnecting
