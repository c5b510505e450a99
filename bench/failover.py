"""
Failover figures (#15): how long clients see failures when the active
provider goes down, and what a failed-over call costs.

One process, real sockets on 127.0.0.1: the gateway (its service, as
``twistd openclaw`` builds it), a stand-in Kimi and a stand-in Gemini on
ports of their own (so that stopping Kimi's leaves Gemini's up), and a
client sending one chat call after another.  All share one reactor, so
the figures are relative, not absolute.

1. Outage: while the client calls Kimi (the active provider) back to back,
   Kimi's stand-in stops (listening port closed, connections aborted);
   measured is the time from the stop to the first answer that came from
   Gemini by failover.  Median over the runs.
2. Added latency: the median latency of a call failed over from a stopped
   Kimi (connection refused, then Gemini) over a call sent to Gemini
   directly (pinned ``gemini/...``); with the breaker left closed
   (every call tries Kimi first) and with it open (calls go straight to
   Gemini after BREAKER_FAILURES failures).

    .venv/bin/python bench/failover.py [--runs 5] [--calls 200]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import react
from twisted.web.client import Agent, HTTPConnectionPool

from openclaw.service import GatewayService
from openclaw.settings import ProviderSettings, Settings
from openclaw.testing.upstream import StandInUpstream

GATEWAY_KEY = "bench-gateway-key-0123456789"
BODY = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hello."}]}).encode()
PINNED = json.dumps({"model": "gemini/gemini-flash-latest", "messages": [{"role": "user", "content": "Hi."}]}).encode()


class Recording(TCP4ServerEndpoint):
    port: Any = None

    def listen(self, factory: Any) -> Any:
        return super().listen(factory).addCallback(self._keep)

    def _keep(self, port: Any) -> Any:
        self.port = port
        return port


async def start(reactor: Any, breaker_failures: int) -> tuple[GatewayService, int, StandInUpstream, StandInUpstream]:
    kimi, gemini = StandInUpstream(reactor), StandInUpstream(reactor)
    kimi.listen(0, access_log=False)
    gemini.listen(0, access_log=False)
    from openclaw.providers import GeminiAdapter, KimiAdapter

    settings = Settings(
        port=0,
        api_port=0,
        jwt_secret=b"b" * 32,
        jwt_secret_is_ephemeral=False,
        state_dir=Path(tempfile.mkdtemp()),
        gateway_api_keys=(GATEWAY_KEY,),
        default_provider="kimi",
        log_level="warn",
        breaker_failures=breaker_failures,
        providers=[
            ProviderSettings(
                adapter=KimiAdapter, base_url=kimi.base_url("kimi"), model="moonshot-v1-8k", api_key=kimi.kimi.key
            ),
            ProviderSettings(
                adapter=GeminiAdapter,
                base_url=gemini.base_url("gemini"),
                model="gemini-flash-latest",
                api_key=gemini.gemini.key,
            ),
        ],
    )
    api = Recording(reactor, 0, interface="127.0.0.1")
    service = GatewayService(
        settings, reactor, TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), stdout=io.StringIO(), api_endpoint=api
    )
    service.startService()
    return service, api.port.getHost().port, kimi, gemini


async def call(http: HTTPClient, port: int, body: bytes = BODY) -> tuple[int, str | None, float]:
    started = time.perf_counter()
    response = await http.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"Authorization": [f"Bearer {GATEWAY_KEY}"], "Content-Type": ["application/json"]},
    )
    await response.content()
    fallback = response.headers.getRawHeaders("x-openclaw-fallback", [None])[0]
    return response.code, fallback, time.perf_counter() - started


async def stop(service: GatewayService, *upstreams: StandInUpstream) -> None:
    await service.stopService()
    for upstream in upstreams:
        await upstream.stop()


async def outage(reactor: Any, http: HTTPClient) -> float:
    service, port, kimi, gemini = await start(reactor, 5)
    for _ in range(20):  # warm: pooled connections to both
        await call(http, port)
        await call(http, port, PINNED)
    stopping = ensureDeferred(_stop_later(reactor, kimi))
    while True:
        code, fallback, _ = await call(http, port)
        if stopping.called and fallback is not None and code == 200:
            recovered = time.perf_counter()
            break
    stopped_at = stopping.result
    await stop(service, gemini)
    return recovered - stopped_at


async def _stop_later(reactor: Any, upstream: StandInUpstream) -> float:
    from twisted.internet.task import deferLater

    await deferLater(reactor, 0.2)
    stopped_at = time.perf_counter()
    await upstream.stop()
    return stopped_at


async def latencies(reactor: Any, http: HTTPClient, calls: int, breaker_failures: int) -> tuple[float, float]:
    service, port, kimi, gemini = await start(reactor, breaker_failures)
    await kimi.stop()
    for _ in range(20):
        await call(http, port)
        await call(http, port, PINNED)
    direct, failed_over = [], []
    for _ in range(calls):
        code, fallback, seconds = await call(http, port, PINNED)
        assert code == 200 and fallback is None
        direct.append(seconds)
        code, fallback, seconds = await call(http, port)
        assert code == 200 and fallback is not None, (code, fallback)
        failed_over.append(seconds)
    await stop(service, gemini)
    return median(direct), median(failed_over)


async def main(reactor: Any, runs: int, calls: int) -> None:
    pool = HTTPConnectionPool(reactor, persistent=True)
    http = HTTPClient(Agent(reactor, pool=pool))
    times = [await outage(reactor, http) for _ in range(runs)]
    print(
        f"outage -> first failed-over answer: median {median(times) * 1000:.2f} ms "
        f"(range {min(times) * 1000:.2f}-{max(times) * 1000:.2f} ms, {runs} runs)"
    )
    for label, failures in (("breaker closed (Kimi tried first)", 10**9), ("breaker open (straight to Gemini)", 5)):
        pairs = [await latencies(reactor, http, calls, failures) for _ in range(runs)]
        direct = median(d for d, _ in pairs)
        over = median(f for _, f in pairs)
        print(
            f"{label}: direct {direct * 1000:.3f} ms, failed over {over * 1000:.3f} ms, "
            f"added {(over - direct) * 1000:.3f} ms ({over / direct:.2f}x), median of {runs} runs x {calls} calls"
        )
    await pool.closeCachedConnections()


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    react(lambda reactor: ensureDeferred(main(reactor, args.runs, args.calls)))


if __name__ == "__main__":
    run()
