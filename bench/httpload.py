"""
A lean HTTP/1.1 load generator: N keep-alive connections on one thread
(epoll), each sending the same request and waiting for the whole answer
before sending the next.  Prints one JSON line: requests per second, latency
percentiles (full answer, and the first SSE event for streams), errors, and
its own CPU time, so that a run can show the generator was not the limit.

On two cores the generator shares the machine with the servers it
measures, so its own cost per answer matters: the head of an answer is read
with one regular expression, a body of known length is only counted, and
the loop talks to epoll directly (C{selectors} adds a key object and a
lookup per event).

    python bench/httpload.py --port 18790 --path /v1/chat/completions \\
        --header 'Authorization: Bearer k' --body '{"messages": [...]}' \\
        --connections 32 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import select
import socket
import time

#: Status code, and the length or chunking header wherever it is in the head.
_STATUS = re.compile(rb"\AHTTP/1\.[01] (\d{3}) ")
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked", re.IGNORECASE)


class Exchange:
    """
    One keep-alive connection and the answer it is reading.
    """

    __slots__ = ("buffer", "chunked", "first_event_at", "remaining", "request", "sent_at", "sock", "status")

    def __init__(self, sock: socket.socket, request: bytes) -> None:
        self.sock = sock
        self.request = request
        self.sent_at = 0.0
        self._reset()

    def _reset(self) -> None:
        self.buffer = b""
        self.status = 0
        #: Body bytes still to come (known length), or None before the head.
        self.remaining: int | None = None
        self.chunked = False
        self.first_event_at: float | None = None

    def send(self) -> None:
        self._reset()
        self.sent_at = time.perf_counter()
        self.sock.sendall(self.request)

    def feed(self, data: bytes, now: float) -> bool:
        """
        Take bytes; True once the whole answer is in.
        """
        if self.remaining is not None:
            self.remaining -= len(data)
            return self.remaining <= 0
        if self.chunked:
            self.buffer += data
            if self.first_event_at is None and b"data:" in data:
                self.first_event_at = now
            return self._chunks_done()
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head, body = self.buffer[: end + 2], self.buffer[end + 4 :]
        status = _STATUS.match(head)
        self.status = int(status.group(1)) if status else 0
        length = _LENGTH.search(head)
        if length is not None:
            self.buffer = b""
            self.remaining = int(length.group(1)) - len(body)
            return self.remaining <= 0
        assert _CHUNKED.search(head), "an answer without Content-Length or chunking"
        self.chunked = True
        self.buffer = body
        if b"data:" in body:
            self.first_event_at = now
        return self._chunks_done()

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


#: What the official openai Python SDK sends besides Host, Content-Type,
#: Content-Length and Authorization (--sdk-headers).
OPENAI_SDK_HEADERS = (
    "Accept: application/json",
    "Accept-Encoding: gzip, deflate",
    "Connection: keep-alive",
    "User-Agent: OpenAI/Python 1.99.9",
    "X-Stainless-Lang: python",
    "X-Stainless-Package-Version: 1.99.9",
    "X-Stainless-OS: Linux",
    "X-Stainless-Arch: x64",
    "X-Stainless-Runtime: CPython",
    "X-Stainless-Runtime-Version: 3.11.7",
    "X-Stainless-Async: false",
    "X-Stainless-Retry-Count: 0",
    "X-Stainless-Read-Timeout: 600",
)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run(args: argparse.Namespace) -> dict[str, object]:
    body = args.body.encode()
    head = [f"POST {args.path} HTTP/1.1", f"Host: {args.host}:{args.port}", "Content-Type: application/json"]
    head += args.header
    if args.sdk_headers:
        head += OPENAI_SDK_HEADERS
    head.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body

    poller = select.epoll()
    exchanges: dict[int, Exchange] = {}
    for _ in range(args.connections):
        sock = socket.create_connection((args.host, args.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        exchanges[sock.fileno()] = Exchange(sock, request)
        poller.register(sock.fileno(), select.EPOLLIN)

    latencies: list[float] = []
    first_events: list[float] = []
    errors = 0
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    deadline = started + args.seconds
    for exchange in exchanges.values():
        exchange.send()
    open_exchanges = len(exchanges)
    perf_counter = time.perf_counter
    while open_exchanges:
        events = poller.poll(10)
        if not events:
            raise SystemExit("no answer for 10 s")
        for fd, _ in events:
            exchange = exchanges[fd]
            data = exchange.sock.recv(262144)
            now = perf_counter()
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
                poller.unregister(fd)
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
    parser.add_argument("--sdk-headers", action="store_true", help="also send the headers the openai Python SDK sends")
    parser.add_argument("--body", required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()
