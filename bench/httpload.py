"""
A lean HTTP/1.1 load generator: N keep-alive connections on one thread
(selectors), each sending the same request and waiting for the whole answer
before sending the next.  Prints one JSON line: requests per second, latency
percentiles (full answer, and the first SSE event for streams), errors, and
its own CPU time, so that a run can show the generator was not the limit.

    python bench/httpload.py --port 18790 --path /v1/chat/completions \\
        --header 'Authorization: Bearer k' --body '{"messages": [...]}' \\
        --connections 32 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import resource
import selectors
import socket
import time


class Exchange:
    """
    One keep-alive connection and the answer it is reading.
    """

    def __init__(self, sock: socket.socket, request: bytes) -> None:
        self.sock = sock
        self.request = request
        self.sent_at = 0.0
        self.first_event_at: float | None = None
        self._reset()

    def _reset(self) -> None:
        self.buffer = b""
        self.status = 0
        self.headers_done = False
        self.length: int | None = None
        self.chunked = False
        self.body_seen = 0
        self.first_event_at = None

    def send(self) -> None:
        self._reset()
        self.sent_at = time.perf_counter()
        self.sock.sendall(self.request)

    def feed(self, data: bytes, now: float) -> bool:
        """
        Take bytes; True once the whole answer is in.
        """
        self.buffer += data
        if not self.headers_done:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return False
            head, self.buffer = self.buffer[:end].decode("latin-1"), self.buffer[end + 4 :]
            lines = head.split("\r\n")
            self.status = int(lines[0].split(" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    self.length = int(value)
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    self.chunked = True
            self.headers_done = True
        if self.first_event_at is None and b"data:" in self.buffer:
            self.first_event_at = now
        if self.chunked:
            return self._chunks_done()
        assert self.length is not None, "an answer without Content-Length or chunking"
        return len(self.buffer) >= self.length

    def _chunks_done(self) -> bool:
        # Consume complete chunks from the front; done at the zero chunk.
        while True:
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                return False
            size = int(self.buffer[:line_end].split(b";")[0], 16)
            if size == 0:
                return self.buffer.endswith(b"\r\n\r\n")
            if len(self.buffer) < line_end + 2 + size + 2:
                return False
            self.buffer = self.buffer[line_end + 2 + size + 2 :]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run(args: argparse.Namespace) -> dict[str, object]:
    body = args.body.encode()
    head = [f"POST {args.path} HTTP/1.1", f"Host: {args.host}:{args.port}", "Content-Type: application/json"]
    head += args.header
    head.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body

    selector = selectors.DefaultSelector()
    exchanges = []
    for _ in range(args.connections):
        sock = socket.create_connection((args.host, args.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        exchange = Exchange(sock, request)
        selector.register(sock, selectors.EVENT_READ, exchange)
        exchanges.append(exchange)

    latencies: list[float] = []
    first_events: list[float] = []
    errors = 0
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    deadline = started + args.seconds
    for exchange in exchanges:
        exchange.send()
    open_exchanges = len(exchanges)
    while open_exchanges:
        for key, _ in selector.select(timeout=10):
            exchange = key.data
            data = exchange.sock.recv(262144)
            now = time.perf_counter()
            if not data:
                raise SystemExit("the server closed a keep-alive connection")
            if not exchange.feed(data, now):
                continue
            if exchange.status != 200:
                errors += 1
            latencies.append(now - exchange.sent_at)
            if exchange.first_event_at is not None:
                first_events.append(exchange.first_event_at - exchange.sent_at)
            if now < deadline:
                exchange.send()
            else:
                selector.unregister(exchange.sock)
                exchange.sock.close()
                open_exchanges -= 1
    elapsed = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    result: dict[str, object] = {
        "requests": len(latencies),
        "seconds": elapsed,
        "per_second": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "errors": errors,
        "generator_cpu_s": cpu,
    }
    if first_events:
        result["first_event_p50_ms"] = percentile(first_events, 0.50) * 1000
        result["first_event_p99_ms"] = percentile(first_events, 0.99) * 1000
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--body", required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()
