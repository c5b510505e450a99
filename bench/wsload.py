"""
A lean WebSocket load generator: N connections, each sending one command and
waiting for its answer, for a fixed time.  Frames are built once and the
loop is a plain selector over raw sockets, so that the generator costs far
less CPU per round trip than the server it measures (it reports its own CPU
time so that can be checked).

    python bench/wsload.py --port P --message JSON --connections 50 --seconds 5

Prints one JSON object: round trips, seconds, latencies (p50, p99 in ms),
and the generator's CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import selectors
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.wsfuzz import frame, handshake, server_frames


def connect(port: int) -> socket.socket:
    """
    An open WebSocket connection, ready for the selector loop.
    """
    sock, _ = handshake("127.0.0.1", port, timeout=None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def run(port: int, message: bytes, connections: int, seconds: float, check: bytes) -> dict[str, object]:
    text = frame(0x1, message)
    selector = selectors.DefaultSelector()
    sockets = [connect(port) for _ in range(connections)]
    buffers = {s.fileno(): b"" for s in sockets}
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    deadline = start + seconds
    for s in sockets:
        selector.register(s, selectors.EVENT_READ)
        sent_at[s.fileno()] = time.perf_counter()
        s.send(text)
    unexpected = 0
    while True:
        now = time.perf_counter()
        if now >= deadline:
            break
        for key, _ in selector.select(timeout=deadline - now):
            s = key.fileobj
            fd = key.fd
            data = s.recv(65536)
            if not data:
                raise ConnectionError("server closed a connection")
            frames, buffers[fd] = server_frames(buffers[fd] + data)
            messages = [payload for _, payload in frames]
            if messages:
                received = time.perf_counter()
                for answer in messages:
                    if check not in answer:
                        unexpected += 1
                latencies.append(received - sent_at[fd])
                if received < deadline:
                    sent_at[fd] = time.perf_counter()
                    s.send(text)
    elapsed = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    for s in sockets:
        s.close()
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000, 3)

    return {
        "round_trips": len(latencies),
        "seconds": round(elapsed, 3),
        "per_second": round(len(latencies) / elapsed, 1),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "unexpected_answers": unexpected,
        "generator_cpu_s": round(
            (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime), 3
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--message", required=True)
    parser.add_argument("--expect", default='"ok":true', help="substring every answer must hold")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    result = run(args.port, args.message.encode(), args.connections, args.seconds, args.expect.encode())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
