"""
Send what a connection writes at once, when nothing is queued before it.

A Twisted TCP transport never sends from C{write}: it queues the bytes,
asks epoll to report the socket writable (an C{epoll_ctl}), sends when the
reactor next polls, then tells epoll to stop (another C{epoll_ctl}): two
system calls and an extra dispatch per message, for a relay two of each
per call.  The gateway writes through in two places, each measured side
by side with C{bench/data_plane.py} at concurrency 32 (Kimi, whole
answers; throughput through the gateway over straight to the stand-in):

  - a request to a provider, sent as soon as it is made, so the provider
    starts on it while the gateway's turn goes on: 0.64 to 0.75;
  - the API's answers, gathered per connection and sent at the end of the
    reactor's turn (L{openclaw.dataplane.site.APISite.send_at_end_of_turn}),
    so a busy turn's answers reach the clients together: 0.78 to 0.88, and
    the gateway's CPU per call from 172 to 147 µs.  (Sending each answer
    at once instead woke the clients once per answer: 0.80.)

L{write_through} sends at once only when that cannot reorder or lose
anything: a plain TCP connection, open for writing, nothing queued.  Any
other case, and whatever the socket does not take at once, goes through
the transport's own C{write}, so the transport still reports every error
and keeps its flow control.  It reads a few attributes of Twisted's
transports that are not public; should a Twisted release change them,
every write takes the transport's own path (slower, never wrong).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import abstract, tcp


def _transport_layout_known() -> bool:
    """
    Whether Twisted's TCP transports keep their queue and state where
    L{write_through} looks.
    """
    queued = abstract.FileDescriptor(reactor=object())
    return (
        all(hasattr(queued, name) for name in ("_tempDataBuffer", "dataBuffer", "offset", "_writeDisconnected"))
        and all(hasattr(tcp.Connection, name) for name in ("_aborting", "TLS", "disconnecting", "connected"))
        and tcp.Server.write is tcp.Client.write
    )


#: Plain TCP transports, as C{listenTCP} and C{connectTCP} make them (a
#: subclass may write differently, a TLS layer is another class).
_PLAIN_TCP = (tcp.Server, tcp.Client) if _transport_layout_known() else ()


def write_through(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}: sent before returning when the socket
    takes it and nothing is queued ahead of it, else queued as by
    C{transport.write}.
    """
    if (
        type(transport) in _PLAIN_TCP
        and transport.connected
        and not transport.disconnecting
        and not transport._aborting
        and not transport._writeDisconnected
        and not transport.TLS
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # Full (EAGAIN) or broken: queued, the transport's next send
            # meets the same condition and handles it as it always does.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


__all__ = ["write_through"]
