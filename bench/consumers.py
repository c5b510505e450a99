"""
#19 figures, single instance (default) or cluster mode (C{--cluster}: a
C{twistd} instance on a real redis-server and PostgreSQL):

1. the added latency of a consumer-key chat call over a gateway-key call at
   concurrency 1 (p50/p99 over N sequential calls each, interleaved), a
   gateway in this process in front of the stand-in upstream, urllib from
   a thread;
2. the database write load at 500 calls/s: the consumer table fed 500
   accounted calls a second for a few seconds against a real SQLite file,
   counting rows and batched transactions a second.

    .venv/bin/python bench/consumers.py [--calls 300] [--seconds 5] [--cluster]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import task
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from openclaw.consumers.prices import PriceTable
from openclaw.consumers.store import ConsumerStore
from openclaw.consumers.table import ConsumerTable, Holder
from tests.support import open_client, start_gateway, start_upstream
from tests.test_dataplane import GATEWAY_KEY, GEMINI_KEY, KIMI_KEY


class Harness:
    def __init__(self) -> None:
        self.cleanups: list[Any] = []

    def mktemp(self) -> str:
        return str(Path(tempfile.mkdtemp(prefix="openclaw-bench-")) / "d")

    def addCleanup(self, f: Any, *args: Any) -> None:
        self.cleanups.append((f, args))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def latencies(api_port: int, keys: list[str], calls: int) -> dict[str, list[float]]:
    body = b'{"model":"kimi/moonshot-v1-8k","messages":[{"role":"user","content":"hi"}]}'
    took: dict[str, list[float]] = {key: [] for key in keys}
    for i in range(calls * len(keys)):
        key = keys[i % len(keys)]
        request = urllib.request.Request(
            f"http://127.0.0.1:{api_port}/v1/chat/completions",
            data=body,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        started = time.perf_counter()
        with urllib.request.urlopen(request) as response:
            response.read()
        took[key].append(time.perf_counter() - started)
    return took


@inlineCallbacks
def compare(api_port: int, client: Any, token: str, calls: int, where: str) -> Any:
    """
    p50/p99 of gateway-key and consumer-key calls, interleaved; the
    consumer has an rpm, a tpm and a budget, so every check runs.
    """
    answer = yield client.command(
        token, "consumer_create", {"name": "bench", "rpm": 1_000_000, "tpm": 10**9, "budget_usd": 1e6}
    )
    assert answer["ok"], answer
    consumer_key = answer["result"]["key"]
    yield deferToThread(latencies, api_port, [GATEWAY_KEY, consumer_key], 20)  # warm up
    took = yield deferToThread(latencies, api_port, [GATEWAY_KEY, consumer_key], calls)
    plain, consumer = took[GATEWAY_KEY], took[consumer_key]
    print(f"chat call at concurrency 1, {where}, {calls} calls each (ms):")
    for name, values in (("gateway key", plain), ("consumer key", consumer)):
        print(f"  {name:13} p50 {percentile(values, 50) * 1000:.3f}  p99 {percentile(values, 99) * 1000:.3f}")
    print(f"  added p50 {(percentile(consumer, 50) - percentile(plain, 50)) * 1000:+.3f} ms")


@inlineCallbacks
def write_load(reactor: Any, store: ConsumerStore, seconds: float, rate: int, name: str) -> Any:
    """
    Feed a consumer table C{rate} accounted calls a second and count the
    rows and the batched transactions that reach the database.
    """
    yield store.migrate()
    table = ConsumerTable(store, PriceTable(), clock=reactor.seconds)
    transactions = [0]
    record = store.record

    def counted(rows: Any) -> Any:
        transactions[0] += 1
        return record(rows)

    store.record = counted  # type: ignore[method-assign]
    table.start(reactor)
    holder = Holder("bench-load", "AbCdEf12")
    usage = {"prompt_tokens": 10, "completion_tokens": 20}
    started = time.perf_counter()
    sent = 0
    while time.perf_counter() - started < seconds:
        for _ in range(rate // 10):
            table.account(holder, "kimi", "moonshot-v1-8k", 200, usage, 0.01)
        sent += rate // 10
        yield task.deferLater(reactor, 0.1, lambda: None)
    yield table.stop()
    elapsed = time.perf_counter() - started
    rows = yield store.pool.runQuery("SELECT COUNT(*) FROM usage_rows WHERE consumer = 'bench-load'")
    store.close()
    print(
        f"write load at {sent / elapsed:.0f} calls/s for {elapsed:.1f} s: "
        f"{rows[0][0] / elapsed:.0f} rows/s in {transactions[0] / elapsed:.2f} "
        f"batched transactions/s ({name})"
    )


@inlineCallbacks
def main(reactor: Any, calls: int, seconds: float, cluster: bool) -> Any:
    harness = Harness()
    try:
        upstream = start_upstream(harness, KIMI_KEY, GEMINI_KEY)
        if not cluster:
            gateway = start_gateway(
                harness, api=True, providers=upstream.provider_settings(), gateway_api_keys=(GATEWAY_KEY,)
            )
            yield gateway.service.consumers_ready
            client = yield open_client(harness, gateway.port)
            yield compare(gateway.api_port, client, gateway.token, calls, "one instance, SQLite")
            directory = Path(tempfile.mkdtemp(prefix="openclaw-bench-db-"))
            yield write_load(reactor, ConsumerStore.open(None, directory, reactor), seconds, 500, "SQLite, WAL")
            return
        from tests.postgres_server import postgres_database
        from tests.redis_server import RedisServer
        from tests.support import free_port, spawn_gateway
        from tests.test_twistd import SECRET, base_env

        redis = RedisServer()
        redis.start()
        harness.addCleanup(lambda: redis.cleanup())
        database = postgres_database()
        env = base_env(
            JWT_SECRET=SECRET,
            REDIS_URL=redis.url,
            GATEWAY_API_KEYS=GATEWAY_KEY,
            DATABASE_URL=database,
            LOG_LEVEL="warn",
            **upstream.environment(),
        )
        port, api_port = free_port(), free_port()
        process = spawn_gateway(
            harness, ["--port", str(port), "--api-port", str(api_port), "--interface", "127.0.0.1"], env
        )
        token = yield process.token
        client = yield open_client(harness, port)
        yield compare(api_port, client, token, calls, "cluster mode (Redis, PostgreSQL), twistd")
        yield write_load(reactor, ConsumerStore.open(database, Path("."), reactor), seconds, 500, "PostgreSQL")
    finally:
        for f, args in reversed(harness.cleanups):
            yield f(*args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--cluster", action="store_true", help="a twistd instance on Redis and PostgreSQL")
    options = parser.parse_args()
    task.react(main, (options.calls, options.seconds, options.cluster))
