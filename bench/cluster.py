"""
#18 figures: switch_provider and rotate_token propagation across two
`twistd -n openclaw` instances on one redis-server (p50, p99 over N), and
a chat call's latency through an instance with and without REDIS_URL
(the data plane must not touch Redis per call), and chat throughput at
concurrency 32 with --workers 1 and --workers 2 (bench/httpload.py in a
process of its own), with the CPU seconds of each process.

    .venv/bin/python bench/cluster.py [--rounds 100] [--calls 200] [--seconds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.redis_server import RedisServer
from tests.support import connect, free_port, spawn_gateway, start_upstream
from tests.test_twistd import SECRET, base_env

KEY = "gw-bench-key-0123456789"


class Harness:
    def __init__(self) -> None:
        self.cleanups: list[Any] = []

    def mktemp(self) -> str:
        return str(Path(tempfile.mkdtemp(prefix="openclaw-bench-")) / "cwd")

    def addCleanup(self, f: Any, *args: Any) -> None:
        self.cleanups.append((f, args))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def chat_latencies(api_port: int, calls: int) -> list[float]:
    body = b'{"model":"default","messages":[{"role":"user","content":"hi"}]}'
    took = []
    for _ in range(calls):
        request = urllib.request.Request(
            f"http://127.0.0.1:{api_port}/v1/chat/completions",
            data=body,
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        started = time.perf_counter()
        with urllib.request.urlopen(request) as response:
            response.read()
        took.append(time.perf_counter() - started)
    return took


def cpu_seconds(pid: int) -> float:
    """
    User and system CPU seconds of process C{pid} so far (/proc/PID/stat).
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def throughput(api_port: int, seconds: float, pids: list[int]) -> tuple[dict[str, Any], dict[int, float]]:
    before = {pid: cpu_seconds(pid) for pid in pids}
    run = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent / "httpload.py"),
            "--port", str(api_port),
            "--path", "/v1/chat/completions",
            "--header", f"Authorization: Bearer {KEY}",
            "--header", "Content-Type: application/json",
            "--body", '{"model":"default","messages":[{"role":"user","content":"hi"}]}',
            "--connections", "32",
            "--seconds", str(seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    used = {pid: cpu_seconds(pid) - before[pid] for pid in pids}
    return json.loads(run.stdout.strip().splitlines()[-1]), used


@inlineCallbacks
def workers_throughput(harness: Harness, redis: RedisServer, common: dict[str, str], seconds: float) -> Any:
    for workers in (1, 2):
        api_port = free_port()
        args = ["--workers", str(workers), "--port", str(free_port()), "--api-port", str(api_port)]
        args += ["--interface", "127.0.0.1"]
        process = spawn_gateway(harness, args, base_env(**common, REDIS_URL=redis.url))
        yield process.token
        yield deferLater(reactor, 1.0, lambda: None)
        parent = process.transport.pid
        pids = [parent, *children(parent)]
        result, used = yield deferToThread(throughput, api_port, seconds, pids)
        cpu = ", ".join(
            f"{'twistd parent' if pid == parent else 'worker'} {pid}: {seconds_used:.2f} s"
            for pid, seconds_used in used.items()
        )
        print(f"--workers {workers}, c=32, {seconds:g} s: {json.dumps(result)}; CPU {cpu}")
        yield process.stop()


@inlineCallbacks
def main(rounds: int, calls: int, seconds: float) -> Any:
    harness = Harness()
    redis = RedisServer()
    redis.start()
    upstream = start_upstream(harness, "kimi-key", "gemini-key")
    common = {"JWT_SECRET": SECRET, "GATEWAY_API_KEYS": KEY, **upstream.environment()}

    def spawn(env: dict[str, str]) -> Any:
        port, api_port = free_port(), free_port()
        process = spawn_gateway(
            harness, ["--port", str(port), "--api-port", str(api_port), "--interface", "127.0.0.1"], base_env(**env)
        )
        process.port, process.api_port = port, api_port
        return process

    try:
        a = spawn({**common, "REDIS_URL": redis.url})
        token = yield a.token
        b = spawn({**common, "REDIS_URL": redis.url})
        yield b.token
        single = spawn(common)
        yield single.token
        on_a = yield connect(a.port)
        on_b = yield connect(b.port)
        switches = []
        for i in range(rounds):
            target = "kimi" if i % 2 == 0 else "gemini"
            answer = yield on_a.command(token, "switch_provider", {"provider": target})
            assert answer["ok"], answer
            replied = time.perf_counter()
            while True:
                status = yield on_b.command(token, "status")
                if status["result"]["provider_id"] == target:
                    break
            switches.append(time.perf_counter() - replied)
        rotations = []
        for _ in range(rounds):
            answer = yield on_a.command(token, "rotate_token")
            assert answer["ok"], answer
            replied = time.perf_counter()
            token = answer["result"]["token"]
            while True:
                status = yield on_b.command(token, "ping")
                if status["ok"]:
                    break
            rotations.append(time.perf_counter() - replied)
        yield on_a.command(token, "switch_provider", {"provider": "gemini"})
        clustered = yield deferToThread(chat_latencies, b.api_port, calls)
        alone = yield deferToThread(chat_latencies, single.api_port, calls)
        ms = 1000
        print(
            f"switch propagation A->B (from A's reply to B's status), n={rounds}: "
            f"p50 {percentile(switches, 50) * ms:.2f} ms, p99 {percentile(switches, 99) * ms:.2f} ms"
        )
        print(
            f"rotation propagation A->B (from A's reply to B accepting the new token), n={rounds}: "
            f"p50 {percentile(rotations, 50) * ms:.2f} ms, p99 {percentile(rotations, 99) * ms:.2f} ms"
        )
        print(
            f"chat call at c=1 (stand-in upstream), n={calls}: with REDIS_URL p50 "
            f"{percentile(clustered, 50) * ms:.2f} ms p99 {percentile(clustered, 99) * ms:.2f} ms; "
            f"without p50 {percentile(alone, 50) * ms:.2f} ms p99 {percentile(alone, 99) * ms:.2f} ms"
        )
        for client in (on_a, on_b):
            client.sendClose()
        if seconds > 0:
            yield workers_throughput(harness, redis, common, seconds)
    finally:
        for f, args in reversed(harness.cleanups):
            with contextlib.suppress(Exception):
                yield f(*args)
        redis.cleanup()
        reactor.stop()  # type: ignore[attr-defined]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0, help="each throughput run (0: none)")
    options = parser.parse_args()
    reactor.callWhenRunning(main, options.rounds, options.calls, options.seconds)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
