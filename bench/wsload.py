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
import base64
import json
import os
import resource
import selectors
import socket
import struct
import time


def masked_text_frame(payload: bytes) -> bytes:
    """
    A client text frame.  Clients must mask; one random key for every copy
    of the frame is still a valid mask.
    """
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    return header + key + masked


def handshake(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during handshake")
        response += chunk
    if not response.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(response.split(b"\r\n", 1)[0].decode())
    sock.setblocking(False)
    return sock


def frames_in(buffer: bytearray) -> tuple[int, list[bytes]]:
    """
    Take the complete unmasked server frames off the front of C{buffer}.
    """
    messages = []
    offset = 0
    while len(buffer) - offset >= 2:
        length = buffer[offset + 1] & 0x7F
        start = offset + 2
        if length == 126:
            if len(buffer) - offset < 4:
                break
            (length,) = struct.unpack_from("!H", buffer, offset + 2)
            start = offset + 4
        elif length == 127:
            if len(buffer) - offset < 10:
                break
            (length,) = struct.unpack_from("!Q", buffer, offset + 2)
            start = offset + 10
        if len(buffer) < start + length:
            break
        messages.append(bytes(buffer[start : start + length]))
        offset = start + length
    return offset, messages


def run(port: int, message: bytes, connections: int, seconds: float, check: bytes) -> dict[str, object]:
    frame = masked_text_frame(message)
    selector = selectors.DefaultSelector()
    sockets = [handshake(port) for _ in range(connections)]
    buffers = {s.fileno(): bytearray() for s in sockets}
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    deadline = start + seconds
    for s in sockets:
        selector.register(s, selectors.EVENT_READ)
        sent_at[s.fileno()] = time.perf_counter()
        s.send(frame)
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
            buffer = buffers[fd]
            buffer += data
            used, messages = frames_in(buffer)
            del buffer[:used]
            if messages:
                received = time.perf_counter()
                for answer in messages:
                    if check not in answer:
                        unexpected += 1
                latencies.append(received - sent_at[fd])
                if received < deadline:
                    sent_at[fd] = time.perf_counter()
                    s.send(frame)
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
