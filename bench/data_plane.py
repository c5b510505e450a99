"""
Data-plane overhead: what the gateway adds to a model call.

Starts the stand-in upstream (python -m openclaw.testing.upstream, answering
at once, no access log) and the gateway in front of it as an operator would
(twistd -n openclaw), each its own process, then drives both with the same
lean load generator (bench/httpload.py, a third process): the same chat
call straight to the stand-in and through the gateway, alternating, in
rounds.  Prints, per provider and concurrency, requests per second and
p50/p99 latency each way, the latency the gateway adds (gateway minus
straight, per percentile), the throughput ratio (the median of the rounds'
ratios, each round's two runs back to back, and their range), the CPU each
process used; and for streams, the time to the first event.

For scale, whole Kimi answers also go through the floor (bench/proxy_floor.py):
a bare relay on twisted.web and Twisted's Agent, pooled as the gateway's
is, with none of the gateway's work.

    .venv/bin/python bench/data_plane.py [--seconds 3] [--rounds 5] [--sdk-headers] [--profile gateway.prof]

The client sends four headers (Host, Content-Type, Content-Length and the
key), the least any client sends; --sdk-headers adds the thirteen more the
openai Python SDK sends, to both the stand-in and the gateway.

Targets: added p50 < 1 ms and p99 < 3 ms at concurrency 1; throughput
through the gateway >= 0.8 x straight at concurrency 32.

--tools also sends, through the gateway at concurrency 1, an agent's
tool-calling request (3 tools with nested schemas, a 6-message history
holding one tool round) next to the plain chat call, and prints the p50
it adds per provider; and the in-process cost of the Gemini translation
(to_gemini and from_gemini, a call answer) for both requests.  Target: the
translation adds < 0.1 ms p50 over a plain chat call.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import socket
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
GATEWAY_KEY = "bench-gateway-key-0123456789"
KIMI_KEY = "bench-kimi-key-0123456789"
GEMINI_KEY = "bench-gemini-key-0123456789"
SECRET = "bench-secret-bench-secret-bench-secret-0123"

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "What is the capital of France? One word, please."},
]


_PLACE = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "country": {"type": "string", "enum": ["FR", "IT", "DE"]},
        "coordinates": {
            "type": "object",
            "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
            "required": ["lat", "lon"],
        },
    },
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather at a place",
            "parameters": {
                "type": "object",
                "properties": {"place": _PLACE, "unit": {"type": ["string", "null"], "enum": ["C", "F", None]}},
                "required": ["place"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search_flights",
            "description": "Flights between two places on a day",
            "parameters": {
                "type": "object",
                "properties": {
                    "from": _PLACE,
                    "to": _PLACE,
                    "date": {"type": "string", "format": "date"},
                    "passengers": {
                        "type": "array",
                        "items": {"type": "object", "properties": {"age": {"type": "integer"}}},
                    },
                },
                "required": ["from", "to", "date"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "book_hotel",
            "description": "Book a room",
            "parameters": {
                "type": "object",
                "properties": {
                    "place": _PLACE,
                    "nights": {"type": "integer", "minimum": 1},
                    "guests": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["place", "nights"],
            },
        },
    },
]
TOOL_MESSAGES = [
    {"role": "system", "content": "You are a travel agent. Use the tools."},
    {"role": "user", "content": "Is it sunny in Paris today?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_0123456789abcdef01234567",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"place": {"city": "Paris", "country": "FR"}}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_0123456789abcdef01234567", "content": '{"sky": "sunny", "temp_c": 21}'},
    {"role": "assistant", "content": "Yes: sunny, 21 degrees."},
    {"role": "user", "content": "Then find me a flight from Rome tomorrow."},
]


def translation_microbench(repeat: int = 20000) -> dict[str, float]:
    """
    p50 microseconds of the Gemini translation in this process: request
    (to_gemini) and a function-call answer (from_gemini), for the plain and
    the tool-calling request.
    """
    import orjson

    from openclaw.dataplane.request import parse_chat_request
    from openclaw.providers.gemini.translate import from_gemini, to_gemini

    answers = {
        "plain": {"candidates": [{"content": {"parts": [{"text": "Paris."}]}, "finishReason": "STOP"}]},
        "tools": {
            "candidates": [
                {
                    "content": {
                        "parts": [
                            {
                                "functionCall": {
                                    "name": "search_flights",
                                    "args": {"from": {"city": "Rome"}},
                                    "id": "x",
                                },
                                "thoughtSignature": "c2lnbmF0dXJl" * 20,
                            }
                        ]
                    },
                    "finishReason": "STOP",
                }
            ]
        },
    }
    raws = {
        "plain": orjson.dumps({"messages": MESSAGES}),
        "tools": orjson.dumps({"messages": TOOL_MESSAGES, "tools": TOOLS}),
    }
    result = {}
    for name, raw in raws.items():
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            chat = parse_chat_request(raw)
            orjson.dumps(to_gemini(chat.body, "gemini-flash-latest"))
            orjson.dumps(from_gemini(answers[name], "m", "chatcmpl-1", 0))
            times.append(time.perf_counter() - started)
        result[name] = median(times) * 1e6
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port}")


def start_upstream(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "openclaw.testing.upstream",
            "--port",
            str(port),
            "--quiet",
            "--kimi-key",
            KIMI_KEY,
            "--gemini-key",
            GEMINI_KEY,
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process, "the stand-in upstream")
    return process


def start_gateway(api_port: int, upstream_port: int, profile: str | None, log_level: str) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        # The working tree, not a possibly older installed copy.
        PYTHONPATH=str(REPO),
        JWT_SECRET=SECRET,
        GATEWAY_API_KEYS=GATEWAY_KEY,
        DEFAULT_PROVIDER="kimi",
        KIMI_BASE_URL=f"http://127.0.0.1:{upstream_port}/kimi/v1",
        KIMI_API_KEY=KIMI_KEY,
        GEMINI_BASE_URL=f"http://127.0.0.1:{upstream_port}/gemini/v1beta",
        GEMINI_API_KEY=GEMINI_KEY,
        LOG_LEVEL=log_level,
    )
    profiling = ["--profile", profile, "--profiler", "cprofile", "--savestats"] if profile else []
    process = subprocess.Popen(
        [
            str(BIN / "twistd"),
            "-n",
            "--pidfile=",
            *profiling,
            "openclaw",
            "--port",
            str(free_port()),
            "--api-port",
            str(api_port),
            "--interface",
            "127.0.0.1",
        ],
        env=env,
        cwd="/tmp",
        stdout=subprocess.DEVNULL,  # the log goes here, as in production
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(api_port, process, "the gateway")
    return process


def start_floor(port: int, upstream_port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "proxy_floor.py"),
            f"http://127.0.0.1:{upstream_port}/kimi/v1/chat/completions",
            f"Authorization: Bearer {KIMI_KEY}",
            str(port),
        ],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process, "the floor relay")
    return process


def targets(
    upstream_port: int, api_port: int, floor_port: int, provider: str, stream: bool
) -> dict[str, dict[str, Any]]:
    """
    The same call, straight to the stand-in and through the gateway.
    """
    if provider == "kimi":
        straight = {
            "port": upstream_port,
            "path": "/kimi/v1/chat/completions",
            "header": f"Authorization: Bearer {KIMI_KEY}",
            "body": {"model": "moonshot-v1-8k", "messages": MESSAGES, "stream": stream},
        }
    else:
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        straight = {
            "port": upstream_port,
            "path": f"/gemini/v1beta/models/gemini-flash-latest:{method}",
            "header": f"x-goog-api-key: {GEMINI_KEY}",
            "body": {
                "systemInstruction": {"parts": [{"text": MESSAGES[0]["content"]}]},
                "contents": [{"role": "user", "parts": [{"text": MESSAGES[1]["content"]}]}],
            },
        }
    gateway = {
        "port": api_port,
        "path": "/v1/chat/completions",
        "header": f"Authorization: Bearer {GATEWAY_KEY}",
        "body": {
            "model": f"{provider}/{'moonshot-v1-8k' if provider == 'kimi' else 'gemini-flash-latest'}",
            "messages": MESSAGES,
            "stream": stream,
        },
    }
    if provider == "kimi" and not stream:
        floor = {**straight, "port": floor_port, "header": "X-Bench: floor"}
        return {"straight": straight, "gateway": gateway, "floor": floor}
    return {"straight": straight, "gateway": gateway}


def load(
    target: dict[str, Any], connections: int, seconds: float, pids: dict[str, int], sdk_headers: bool = False
) -> dict[str, Any]:
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    out = subprocess.run(
        [
            sys.executable,
            str(HERE / "httpload.py"),
            "--port",
            str(target["port"]),
            "--path",
            target["path"],
            "--header",
            target["header"],
            "--body",
            json.dumps(target["body"]),
            "--connections",
            str(connections),
            "--seconds",
            str(seconds),
            *(["--sdk-headers"] if sdk_headers else []),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    if result["errors"]:
        raise SystemExit(f"{result['errors']} answers were not 200 from {target['path']}")
    for name, pid in pids.items():
        result[f"{name}_cpu"] = (cpu_seconds(pid) - before[name]) / result["seconds"]
    result["generator_cpu"] = result["generator_cpu_s"] / result["seconds"]
    return result


def middle(runs: list[dict[str, Any]], key: str) -> float:
    return median(run[key] for run in runs)


def ratios(through: list[dict[str, Any]], straight: list[dict[str, Any]]) -> list[float]:
    """
    Throughput through the gateway over straight, round by round: each
    pair ran back to back, so a slow spell of the machine weighs on both.
    """
    return sorted(t["per_second"] / s["per_second"] for t, s in zip(through, straight))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians are reported")
    parser.add_argument("--providers", default="kimi,gemini")
    parser.add_argument("--profile", help="write the gateway's cProfile stats here and print the top entries")
    parser.add_argument(
        "--sdk-headers",
        action="store_true",
        help="the client also sends the 13 headers the openai Python SDK sends (both ways)",
    )
    parser.add_argument(
        "--tools", action="store_true", help="also the tool-calling request at concurrency 1 (see above)"
    )
    parser.add_argument(
        "--log-level", default="info", help="the gateway's LOG_LEVEL (info, as deployed; debug logs every call)"
    )
    args = parser.parse_args()

    upstream_port, api_port, floor_port = free_port(), free_port(), free_port()
    upstream = start_upstream(upstream_port)
    gateway = start_gateway(api_port, upstream_port, args.profile, args.log_level)
    floor = start_floor(floor_port, upstream_port)
    pids = {"gateway": gateway.pid, "upstream": upstream.pid, "floor": floor.pid}
    rows = []
    try:
        for provider in args.providers.split(","):
            for stream in (False, True):
                pair = targets(upstream_port, api_port, floor_port, provider, stream)
                for connections in (1, 32):
                    for target in pair.values():  # warm up: connections, pools, caches
                        load(target, connections, 0.5, pids, args.sdk_headers)
                    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in pair}
                    for _ in range(args.rounds):
                        for name, target in pair.items():
                            runs[name].append(load(target, connections, args.seconds, pids, args.sdk_headers))
                    rows.append((provider, stream, connections, runs))
        tool_rows = []
        for provider in args.providers.split(",") if args.tools else ():
            plain = targets(upstream_port, api_port, floor_port, provider, False)["gateway"]
            tools = {**plain, "body": {**plain["body"], "messages": TOOL_MESSAGES, "tools": TOOLS}}
            for target in (plain, tools):
                load(target, 1, 0.5, pids, args.sdk_headers)
            measured: dict[str, list[dict[str, Any]]] = {"plain": [], "tools": []}
            for _ in range(args.rounds):
                for name, target in (("plain", plain), ("tools", tools)):
                    measured[name].append(load(target, 1, args.seconds, pids, args.sdk_headers))
            tool_rows.append((provider, measured))
    finally:
        for process in (gateway, upstream, floor):
            process.terminate()
            process.wait()

    client_headers = "the openai SDK's" if args.sdk_headers else "minimal"
    print(
        f"data plane: stand-in upstream answering at once; {args.rounds} alternating rounds x "
        f"{args.seconds:g} s per figure, medians; {os.cpu_count()} CPUs; gateway LOG_LEVEL={args.log_level}; "
        f"client headers: {client_headers}"
    )
    print(
        f"{'provider':<8} {'mode':<7} {'conc':>4} {'path':<9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'1st ev p50':>10} {'proxy CPU':>9} {'up CPU':>7} {'gen CPU':>7}"
    )
    summary = []
    for provider, stream, connections, runs in rows:
        for name, r in runs.items():
            first = f"{middle(r, 'first_event_p50_ms'):>10.3f}" if stream else f"{'':>10}"
            proxy_cpu = middle(r, f"{name}_cpu") if name != "straight" else 0.0
            print(
                f"{provider:<8} {'stream' if stream else 'whole':<7} {connections:>4} {name:<9} "
                f"{middle(r, 'per_second'):>8,.0f} {middle(r, 'p50_ms'):>8.3f} {middle(r, 'p99_ms'):>8.3f} "
                f"{first} {proxy_cpu:>9.0%} {middle(r, 'upstream_cpu'):>7.0%} "
                f"{middle(r, 'generator_cpu'):>7.0%}"
            )
        straight, through = runs["straight"], runs["gateway"]
        added_p50 = middle(through, "p50_ms") - middle(straight, "p50_ms")
        added_p99 = middle(through, "p99_ms") - middle(straight, "p99_ms")
        by_round = ratios(through, straight)
        ratio = median(by_round)
        line = (
            f"  -> added p50 {added_p50:.3f} ms, p99 {added_p99:.3f} ms, throughput ratio {ratio:.2f} "
            f"(rounds {by_round[0]:.2f}-{by_round[-1]:.2f})"
        )
        if stream:
            added_first = middle(through, "first_event_p50_ms") - middle(straight, "first_event_p50_ms")
            line += f", time to first event added (p50) {added_first:.3f} ms"
        if "floor" in runs:
            floor_ratio = median(ratios(runs["floor"], straight))
            floor_p50 = middle(runs["floor"], "p50_ms") - middle(straight, "p50_ms")
            line += f"; floor: added p50 {floor_p50:.3f} ms, ratio {floor_ratio:.2f}"
        print(line)
        summary.append((provider, stream, connections, added_p50, added_p99, ratio))

    print("targets (whole answers):")
    for provider, stream, connections, added_p50, added_p99, ratio in summary:
        if stream:
            continue
        if connections == 1:
            verdict = "met" if added_p50 < 1 and added_p99 < 3 else "MISSED"
            print(f"  {provider} c=1: added p50 {added_p50:.3f} ms (< 1), p99 {added_p99:.3f} ms (< 3): {verdict}")
        else:
            verdict = "met" if ratio >= 0.8 else "MISSED"
            print(f"  {provider} c=32: throughput ratio {ratio:.3f} (>= 0.8): {verdict}")

    if args.tools:
        print("tool-calling request through the gateway, concurrency 1 (whole answers):")
        for provider, measured in tool_rows:
            plain_p50, tools_p50 = middle(measured["plain"], "p50_ms"), middle(measured["tools"], "p50_ms")
            print(
                f"  {provider}: plain chat p50 {plain_p50:.3f} ms, tool request p50 {tools_p50:.3f} ms, "
                f"added {tools_p50 - plain_p50:.3f} ms"
            )
        micro = translation_microbench()
        added = (micro["tools"] - micro["plain"]) / 1000
        verdict = "met" if added < 0.1 else "MISSED"
        print(
            f"  Gemini translation in process (parse + to_gemini + from_gemini), p50: plain {micro['plain']:.1f} us, "
            f"tools {micro['tools']:.1f} us; added {added:.3f} ms (< 0.1): {verdict}"
        )

    if args.profile:
        time.sleep(0.5)
        print(f"\ngateway profile ({args.profile}), top 25 by own time:")
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
