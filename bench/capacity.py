"""
Capacity: many concurrent authenticated control connections held open.

Starts the gateway (twistd -n openclaw), opens N WebSocket connections
(default 10,000), sends a ping on each and checks every answer, keeps them
all open, then measures the gateway's resident memory per idle connection
and the ping latency (p50/p99) of 50 of them pinging in a loop while the
rest are held.  The file limit is raised here, for this script and the
gateway it starts, not in the gateway's defaults.

    .venv/bin/python bench/capacity.py [--connections 10000]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from control_plane import free_port, start_gateway
from fuzz_control_plane import rss_kib
from wsload import connect, run

from tests.wsfuzz import frame, server_frames


def raise_file_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else min(max(soft, wanted), hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def ping_all(sockets: list[socket.socket], text: bytes) -> tuple[int, float]:
    """
    Send one ping on every connection and wait for every answer.
    """
    selector = selectors.DefaultSelector()
    buffers: dict[int, bytes] = {}
    for s in sockets:
        buffers[s.fileno()] = b""
        selector.register(s, selectors.EVENT_READ)
    started = time.perf_counter()
    for s in sockets:
        s.send(text)
    waiting, ok = len(sockets), 0
    deadline = started + 120
    while waiting and time.perf_counter() < deadline:
        for key, _ in selector.select(timeout=1):
            messages, buffers[key.fd] = server_frames(buffers[key.fd] + key.fileobj.recv(65536))
            for _, message in messages:
                waiting -= 1
                ok += b'"ok":true' in message
    for s in sockets:
        selector.unregister(s)
    return ok, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    args = parser.parse_args()
    limit = raise_file_limit(args.connections + 1000)
    port = free_port()
    gateway, token = start_gateway(port, extra_env={"MAX_CONNECTIONS": str(args.connections + 1000)})
    ping = json.dumps({"token": token, "cmd": "ping"}).encode()
    text = frame(0x1, ping)
    try:
        time.sleep(0.5)
        baseline = rss_kib(gateway.pid)
        started = time.perf_counter()
        sockets = [connect(port) for _ in range(args.connections)]
        opened = time.perf_counter() - started
        ok, pinged = ping_all(sockets, text)
        time.sleep(1)
        held = rss_kib(gateway.pid)
        latency = run(port, ping, 50, 3.0, b'"ok":true')
        still_open = sum(1 for s in sockets if s.fileno() != -1)
        for s in sockets:
            s.close()
    finally:
        gateway.terminate()
        gateway.wait()
    per_connection = (held - baseline) * 1024 / args.connections
    print(f"capacity: {args.connections:,} connections (file limit raised to {limit:,})")
    print(f"  opened in {opened:.1f} s; one ping on each: {ok:,} answered ok in {pinged:.2f} s")
    print(
        f"  gateway RSS: {baseline:,} KiB idle, {held:,} KiB holding them: {per_connection / 1024:.1f} KiB per connection (target < 30 KB)"
    )
    print(
        f"  ping while held (50 connections, ping and wait, 3 s): {latency['per_second']:,.0f}/s, "
        f"p50 {latency['p50_ms']:.2f} ms, p99 {latency['p99_ms']:.2f} ms"
    )
    print(f"  {still_open:,} connections still open at the end")


if __name__ == "__main__":
    main()
