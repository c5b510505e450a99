"""
The control plane's CPU per ping, without sockets: what bench/control_plane.py
measures end to end, taken apart.

The gateway's own control-plane factory (that of a L{GatewayService}, not
started) and bench/floor_server.py's bare Autobahn protocol each get one
in-memory connection: an opening handshake, then masked text frames of the
same size (a ping with a session token, as a client sends it), one per
C{dataReceived}, as a reactor reads them.  The gateway answers each
(JSON in and out, the token check, the command's count); the floor answers
every message with one fixed reply.  Rounds alternate between the two
(the machine is shared and noisy), and the ratio is the floor's CPU per
message over the gateway's: as bench/control_plane.py's, higher is better,
1.0 is the floor.

    .venv/bin/python bench/control_plane_cpu.py [--messages 20000] [--rounds 3] [--profile] [--only gateway]

With --profile, one round of each under cProfile, the top functions by own
time.  bench/instructions.py --control-plane counts the instructions of the
same two paths.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from tempfile import mkdtemp
from typing import Any

import orjson
from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogBeginner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from floor_server import Floor

from openclaw.logs import make_observer
from openclaw.service import GatewayService
from openclaw.settings import Settings

_HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1:18789\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
_MASK = b"\x1f\x2e\x3d\x4c"


def text_frame(payload: bytes) -> bytes:
    """
    One masked text frame (RFC 6455 section 5.2), as a client sends it;
    C{payload} shorter than 64 KiB.
    """
    size = len(payload)
    head = bytes([0x81, 0x80 | size]) if size < 126 else bytes([0x81, 0x80 | 126]) + size.to_bytes(2, "big")
    return head + _MASK + bytes(byte ^ _MASK[i % 4] for i, byte in enumerate(payload))


class Side:
    """
    One server protocol on an in-memory connection, opened, with the frame
    it is fed.
    """

    def __init__(self, factory: Any, frame: bytes, answer: bytes) -> None:
        peer = IPv4Address("TCP", "127.0.0.1", 40001)
        self.transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 18789))
        self.protocol = factory.buildProtocol(peer)
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(_HANDSHAKE)
        status = self.transport.value().split(b"\r\n", 1)[0]
        assert b" 101 " in status, status
        self.transport.clear()
        self.frame = frame
        self.ping()
        assert answer in self.transport.value(), self.transport.value()
        self.transport.clear()

    def ping(self) -> None:
        self.protocol.dataReceived(self.frame)

    def run(self, messages: int) -> float:
        """
        µs of CPU per message over C{messages} messages.
        """
        ping, clear = self.ping, self.transport.clear
        started = time.process_time()
        for _ in range(messages):
            ping()
            clear()
        return (time.process_time() - started) / messages * 1e6


def sides() -> tuple[Side, Side]:
    """
    The gateway's side and the floor's, fed frames of the same size.
    """
    devnull = open(os.devnull, "w")
    globalLogBeginner.beginLoggingTo([make_observer(devnull, "text", "info")], redirectStandardIO=False)
    settings = Settings(
        jwt_secret=b"bench-secret-bench-secret-bench-secret-0123",
        jwt_secret_is_ephemeral=False,
        state_dir=Path(mkdtemp()),
    ).with_provider("kimi", api_key="bench-kimi-key-0123456789", base_url="http://127.0.0.1:9/kimi/v1")
    # Never started: nothing listens; only its control-plane factory is used.
    service = GatewayService(settings, reactor, None, stdout=devnull)  # type: ignore[arg-type]
    token = service.sessions.issue().token
    message = orjson.dumps({"token": token, "cmd": "ping"})
    gateway = Side(service.factory, text_frame(message), b'"pong":true')
    floor_factory = WebSocketServerFactory()
    floor_factory.protocol = Floor
    # The floor reads a message of the same size (its token is not checked).
    floor = Side(floor_factory, text_frame(orjson.dumps({"token": "x" * len(token), "cmd": "ping"})), b"pong")
    return gateway, floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--only", choices=("gateway", "floor"), help="one round of one side (bench/instructions.py)")
    args = parser.parse_args()
    gateway, floor = sides()
    if args.only:
        side = gateway if args.only == "gateway" else floor
        print(f"{args.only}: {side.run(args.messages):.2f} µs of CPU per message")
        return
    if args.profile:
        for name, side in (("gateway", gateway), ("floor", floor)):
            profiler = cProfile.Profile()
            profiler.enable()
            side.run(args.messages)
            profiler.disable()
            print(f"{name}, {args.messages} messages under cProfile:")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)
        return
    ratios = []
    for n in range(args.rounds):
        # Alternating which goes first.
        order = (("gateway", gateway), ("floor", floor)) if n % 2 == 0 else (("floor", floor), ("gateway", gateway))
        figures = {name: side.run(args.messages) for name, side in order}
        ratios.append(figures["floor"] / figures["gateway"])
        print(
            f"round {n + 1}: µs of CPU per message: gateway {figures['gateway']:.2f}, floor {figures['floor']:.2f}, "
            f"ratio {ratios[-1]:.3f}",
            flush=True,
        )
    print(f"median ratio (floor's CPU per message over the gateway's): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
