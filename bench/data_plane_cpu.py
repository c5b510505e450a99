"""
The gateway's CPU per model call, without sockets: what bench/data_plane.py
measures end to end, taken apart.

The real API site and upstream agent (Twisted's C{Agent} and its pool) of a
L{GatewayService}, with in-memory transports on both sides: each round feeds a chat request into an API
connection, takes the upstream request the agent writes, feeds back a canned
upstream answer (the bytes the stand-in sends) and reads the client's
answer.  Logging goes through the gateway's own observer (to /dev/null) at
the chosen level, as under twistd.  Prints microseconds of CPU per call;
with --profile, the top functions by own time.

With --relay, the same harness drives bench/proxy_floor.py's bare relay
(a twisted.web site POSTing each body through the same kind of Agent and
pool) instead of the gateway: the floor, measured like for like, so the
difference is the gateway's own per-call work.

    .venv/bin/python bench/data_plane_cpu.py [--calls 20000] [--provider kimi] [--relay] [--profile [--sort cumulative] [--top 60]]
        [--without log,costs,scrub,client-gone,single-fields,upstream-metrics,route-headers] [--phases]

--without stubs out the named pieces of the gateway's per-call work (see
L{ABLATIONS}), to show what each costs and what is left without them all:
an experiment on the harness only, never a way to run the gateway.

No syscalls are counted here: bench/data_plane.py shows what the sockets
add.  Use this one to see where the gateway's own time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path
from tempfile import mkdtemp
from typing import Any
from unittest import mock

import orjson
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogBeginner
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.server import Site

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from httpload import OPENAI_SDK_HEADERS
from proxy_floor import Relay

from openclaw.dataplane.call import ChatCall
from openclaw.dataplane.context import APIContext
from openclaw.dataplane.site import APIRequest
from openclaw.logs import make_observer
from openclaw.metrics import MeasuredAgent
from openclaw.providers import ProviderRegistry
from openclaw.providers.errors import Scrubber
from openclaw.service import GatewayService
from openclaw.settings import Settings

GATEWAY_KEY = "bench-gateway-key-0123456789"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "What is the capital of France? One word, please."},
]
KIMI_ANSWER = {
    "id": "chatcmpl-standin-1",
    "object": "chat.completion",
    "created": 1764000000,
    "model": "moonshot-v1-8k",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32},
}
GEMINI_ANSWER = {
    "candidates": [{"content": {"role": "model", "parts": [{"text": "Paris."}]}, "finishReason": "STOP", "index": 0}],
    "usageMetadata": {"promptTokenCount": 30, "candidatesTokenCount": 2, "totalTokenCount": 32},
    "modelVersion": "gemini-flash-latest",
}


class _NeverFires:
    """
    Stands for the C{notifyFinish} Deferred a call watches for its
    client leaving, for C{--without client-gone}.
    """

    def addErrback(self, *args: Any) -> _NeverFires:
        return self


def _ablations() -> dict[str, Any]:
    """
    What C{--without NAME} stubs out, by name: each a patch of one piece of
    the gateway's own per-call work.
    """
    return {
        # The call's log line and the request counters (APIContext.completed).
        "log": mock.patch.object(APIContext, "completed", lambda *args, **kwargs: None),
        # Token metrics, the gateway's own-time histogram, usage accounting.
        "costs": mock.patch.object(ChatCall, "_count_costs", lambda self, status, now: None),
        # The search of every answer for the provider's key.
        "scrub": mock.patch.object(Scrubber, "data", lambda self, data: data),
        # Watching for the client leaving (Request.notifyFinish).
        "client-gone": mock.patch.object(APIRequest, "notifyFinish", lambda self: _NeverFires()),
        # The 400 for a repeated Host or Authorization field.
        "single-fields": mock.patch("openclaw.dataplane.site._SINGLE_FIELDS", ()),
        # The upstream request metrics (the MeasuredAgent wrapper).
        "upstream-metrics": mock.patch.object(
            MeasuredAgent,
            "request",
            lambda self, method, uri, headers=None, bodyProducer=None: self._agent.request(
                method, uri, headers, bodyProducer
            ),
        ),
        # X-OpenClaw-Provider and X-OpenClaw-Model on the answer.
        "route-headers": mock.patch.object(ChatCall, "_route_headers", lambda self: None),
    }


#: The names --without takes.
ABLATIONS = tuple(_ablations())


def http_response(document: Any) -> bytes:
    body = json.dumps(document).encode()
    return (
        b"HTTP/1.1 200 OK\r\nServer: TwistedWeb/26.10.0\r\nDate: Tue, 25 Nov 2026 04:00:00 GMT\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )


class Upstream:
    """
    An endpoint factory whose connections are in-memory transports.
    """

    def __init__(self) -> None:
        self.transports: list[StringTransport] = []
        self.protocols: list[Any] = []

    def endpointForURI(self, uri: Any) -> Any:
        return self

    def connect(self, factory: Any) -> Any:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        self.protocols.append(protocol)
        return succeed(protocol)


def print_phases(
    calls: int, channel: Any, request: bytes, client: Any, upstream: Any, connection: Any, answer: bytes
) -> None:
    """
    Time C{calls} calls in four phases (wall clock, µs per call), split at
    the last write of each turn: the request read up to the upstream
    request written, the rest of that turn, the upstream answer read up to
    the client's answer written, the rest of that turn.  A running
    reactor sends what was written only on its next turn, after the rest
    of the current one: at concurrency 1 all four phases are on the call's
    path.
    """
    clock = time.perf_counter_ns
    written = {"upstream": 0, "client": 0}

    def timed(transport: Any, name: str) -> None:
        write = transport.write

        def timed_write(data: bytes) -> None:
            write(data)
            written[name] = clock()

        transport.write = timed_write

    timed(upstream, "upstream")
    timed(client, "client")
    totals = [0, 0, 0, 0]
    for n in range(calls):
        start = clock()
        channel.dataReceived(request)
        read = clock()
        upstream.clear()
        answered = clock()
        connection.dataReceived(answer)
        end = clock()
        totals[0] += written["upstream"] - start
        totals[1] += read - written["upstream"]
        totals[2] += written["client"] - answered
        totals[3] += end - written["client"]
        client.clear()
        if n % 64 == 0:
            reactor.runUntilCurrent()
    to_upstream, after_upstream, to_client, after_client = (total / calls / 1000 for total in totals)
    print(
        f"phases, µs per call: request to upstream write {to_upstream:.1f}, rest of turn {after_upstream:.1f}; "
        f"answer to client write {to_client:.1f}, rest of turn {after_client:.1f}"
    )
    del client.write, upstream.write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--provider", default="kimi", choices=("kimi", "gemini"))
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--sdk-headers", action="store_true", help="also send the headers the openai Python SDK sends")
    parser.add_argument("--relay", action="store_true", help="drive bench/proxy_floor.py's relay, not the gateway")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sort", default="tottime", help="profile order: tottime, cumulative, ...")
    parser.add_argument("--top", type=int, default=30, help="profile entries shown")
    parser.add_argument("--dump", help="with --profile, also save the profile's stats to this file")
    parser.add_argument(
        "--phases",
        action="store_true",
        help="also time each call's four phases, split at its last write upstream and to the client",
    )
    parser.add_argument(
        "--without",
        default="",
        help=f"comma-separated pieces of the gateway's work to stub out: {', '.join(ABLATIONS)}",
    )
    args = parser.parse_args()
    without = [name for name in args.without.split(",") if name]
    unknown = set(without) - set(ABLATIONS)
    if unknown:
        parser.error(f"--without takes {', '.join(ABLATIONS)}, not {', '.join(sorted(unknown))}")
    patches = _ablations()
    for name in without:
        patches[name].start()

    devnull = open(os.devnull, "w")
    globalLogBeginner.beginLoggingTo([make_observer(devnull, "text", args.log_level)], redirectStandardIO=False)
    settings = (
        Settings(
            jwt_secret=b"bench-secret-bench-secret-bench-secret-0123",
            jwt_secret_is_ephemeral=False,
            gateway_api_keys=(GATEWAY_KEY,),
            default_provider=args.provider,
            log_level=args.log_level,
            state_dir=Path(mkdtemp()),
        )
        .with_provider("kimi", api_key="bench-kimi-key-0123456789", base_url="http://127.0.0.1:9/kimi/v1")
        .with_provider("gemini", api_key="bench-gemini-key-0123456789", base_url="http://127.0.0.1:9/gemini/v1beta")
    )
    unused = Upstream()  # never listened on: the service is not started
    upstream = Upstream()
    # The service builds its providers' agent on the in-memory endpoints.
    build_registry = ProviderRegistry.from_settings
    with mock.patch.object(
        ProviderRegistry,
        "from_settings",
        lambda *args, **kwargs: build_registry(*args, endpoints=upstream, **kwargs),
    ):
        service = GatewayService(settings, reactor, unused, stdout=devnull, api_endpoint=unused)  # type: ignore[arg-type]
    site: Any = service.api_site
    assert site is not None, "the service built no API site"
    if args.relay:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = settings.upstream_pool_size
        pool.cachedConnectionTimeout = settings.upstream_idle_seconds
        agent = Agent.usingEndpointFactory(reactor, upstream, pool=pool)
        headers = Headers({"Authorization": ["Bearer bench-kimi-key-0123456789"], "Content-Type": ["application/json"]})
        site = Site(
            Relay(agent, b"http://127.0.0.1:9/kimi/v1/chat/completions", headers), parsePOSTFormSubmission=False
        )
        site.log = lambda request: None

    body = orjson.dumps({"model": "gpt-4o", "messages": MESSAGES})
    sdk_headers = "".join(f"{line}\r\n" for line in OPENAI_SDK_HEADERS).encode()
    client_headers = sdk_headers if args.sdk_headers else b"User-Agent: bench\r\nAccept: */*\r\n"
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:18790\r\n%sAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (client_headers, GATEWAY_KEY.encode(), len(body), body)
    )
    answer = http_response(KIMI_ANSWER if args.provider == "kimi" else GEMINI_ANSWER)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    client = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    channel.makeConnection(client)

    def call() -> None:
        channel.dataReceived(request)
        upstream.transports[-1].clear()
        connection.dataReceived(answer)

    # Warm up: the upstream connection is opened by the first call, then pooled.
    channel.dataReceived(request)
    (connection,) = upstream.protocols
    connection.dataReceived(answer)
    call()
    out = client.value()
    assert out.startswith(b"HTTP/1.1 200"), out[:300]
    client.clear()

    if args.phases:
        print_phases(args.calls, channel, request, client, upstream.transports[-1], connection, answer)
    profiler = cProfile.Profile() if args.profile else None
    started = time.process_time()
    if profiler:
        profiler.enable()
    for n in range(args.calls):
        call()
        client.clear()
        if n % 64 == 0:
            # What a running reactor does between reads: run what is due,
            # drop the timers cancelled meanwhile.
            reactor.runUntilCurrent()
    if profiler:
        profiler.disable()
    elapsed = time.process_time() - started
    what = "relay" if args.relay else args.provider
    if without:
        what += f" without {','.join(without)}"
    print(
        f"{what}, LOG_LEVEL={args.log_level}: {elapsed / args.calls * 1e6:.1f} µs CPU per call "
        f"({args.calls} calls{', under cProfile' if profiler else ''})"
    )
    if profiler:
        if args.dump:
            profiler.dump_stats(args.dump)
        pstats.Stats(profiler).sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()
