"""
Data-plane overhead: what the gateway adds to a model call, against the
bare relay (bench/proxy_floor.py) measured in the same run.

Starts the stand-in upstream (python -m openclaw.testing.upstream, answering
at once, no access log), the gateway in front of it as an operator would
(twistd -n openclaw) and the relay (bench/proxy_floor.py: a bare twisted.web
site on Twisted's Agent, pooled as the gateway's is, with none of the
gateway's work), each its own process, and drives them with the same lean
load generator (bench/httpload.py, a fourth process).  The same whole Kimi
(OpenAI-shaped) chat call goes straight to the stand-in, through the gateway
and through the relay, one after the other in each round, the order rotating
from round to round.  Per round and as medians with their range it prints:

- at concurrency 1, the p50 and p99 latency the gateway adds (gateway minus
  straight) and the relay adds (relay minus straight), and their ratio;
  and the CPU each takes per call there (at concurrency 1 a call waits on
  each process's whole CPU time for it, so the two figures track each
  other);
- at concurrency 32, the CPU the gateway process and the relay process take
  per call (the process's CPU seconds during the run over the calls), and
  their ratio;
- a verdict against the targets: added p50 <= 1.15 x the relay's, CPU per
  call <= 1.3 x the relay's.

The relay relays bytes, so only Kimi's OpenAI-shaped answer compares fairly;
Gemini (translated by the gateway) is shown for the gateway alone, as are
streamed answers with --streams.  Requests per second are printed for
information only: on a small machine the stand-in and the load generator
share the CPUs, so throughput is not a figure of the gateway.

    .venv/bin/python bench/data_plane.py [--seconds 3] [--rounds 7] [--providers kimi,gemini]
        [--streams] [--sdk-headers] [--log-level info] [--profile gateway.prof]
        [--gateway-bin OTHER_VENV/bin]

--tools adds an agent's tool-calling request (3 tools with nested schemas,
a 6-message history holding one tool round) against the plain chat call
through the gateway at concurrency 1, per provider, and the in-process cost
of the Gemini translation for both (target, issue #14: the translation adds
< 0.1 ms p50 over a plain chat call).

--gateway-bin runs the gateway and the stand-in from another install (for
a before/after comparison, e.g. a venv built from an older commit); the
relay and the load generator always come from this checkout and the Python
running this script.

The client sends four headers (Host, Content-Type, Content-Length and the
key), the least any client sends; --sdk-headers adds the thirteen more the
openai Python SDK sends, on every path.
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
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

from control_plane import private_directory

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
GATEWAY_KEY = "bench-gateway-key-0123456789"
KIMI_KEY = "bench-kimi-key-0123456789"
GEMINI_KEY = "bench-gemini-key-0123456789"
SECRET = "bench-secret-bench-secret-bench-secret-0123"

#: Issue #16: the gateway against the relay, same run.
P50_TARGET = 1.15
CPU_TARGET = 1.3

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


class Install:
    """
    Where the gateway and the stand-in come from: this checkout's working
    tree under this Python (the default), or another installed copy.
    """

    def __init__(self, gateway_bin: str | None) -> None:
        if gateway_bin is None:
            self.bin = BIN
            # The working tree, not a possibly older installed copy.
            self.env = dict(os.environ, PYTHONPATH=str(REPO))
            self.cwd = str(REPO)
            self.label = f"this checkout ({REPO})"
        else:
            path = Path(gateway_bin).resolve()
            self.bin = path / "bin" if (path / "bin" / "twistd").exists() else path
            if not (self.bin / "twistd").exists():
                raise SystemExit(f"no twistd in {self.bin}")
            # Its own installed copy: nothing from this checkout on the path.
            self.env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            self.cwd = "/tmp"
            self.label = f"installed copy in {self.bin}"


def start_upstream(install: Install, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            str(install.bin / "python"),
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
        env=install.env,
        cwd=install.cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process, "the stand-in upstream")
    return process


def start_gateway(
    install: Install, api_port: int, upstream_port: int, profile: str | None, log_level: str
) -> subprocess.Popen[bytes]:
    env = dict(
        install.env,
        JWT_SECRET=SECRET,
        GATEWAY_API_KEYS=GATEWAY_KEY,
        DEFAULT_PROVIDER="kimi",
        KIMI_BASE_URL=f"http://127.0.0.1:{upstream_port}/kimi/v1",
        KIMI_API_KEY=KIMI_KEY,
        GEMINI_BASE_URL=f"http://127.0.0.1:{upstream_port}/gemini/v1beta",
        GEMINI_API_KEY=GEMINI_KEY,
        LOG_LEVEL=log_level,
        # A directory of its own (0700): /tmp, its working directory, may not hold the database.
        STATE_DIR=private_directory(),
    )
    profiling = ["--profile", profile, "--profiler", "cprofile", "--savestats"] if profile else []
    process = subprocess.Popen(
        [
            str(install.bin / "twistd"),
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


def start_relay(port: int, upstream_port: int) -> subprocess.Popen[bytes]:
    # Always this checkout's relay under this Python, whatever --gateway-bin says.
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
    wait_for_port(port, process, "the relay")
    return process


def targets(
    upstream_port: int, api_port: int, relay_port: int, provider: str, stream: bool
) -> dict[str, dict[str, Any]]:
    """
    The same call straight to the stand-in, through the gateway and (whole
    Kimi answers only) through the relay.
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
        # The relay adds the key itself; the client's header is only a header.
        relay = {**straight, "port": relay_port, "header": "X-Bench: relay"}
        return {"gateway": gateway, "relay": relay, "straight": straight}
    return {"gateway": gateway, "straight": straight}


def load(
    target: dict[str, Any], connections: int, seconds: float, pids: dict[str, int], sdk_headers: bool = False
) -> dict[str, Any]:
    """
    One run of the load generator; adds each server's CPU seconds during it.
    """
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
        result[f"{name}_cpu_s"] = cpu_seconds(pid) - before[name]
    return result


def cpu_us_per_call(run: dict[str, Any], process: str) -> float:
    return float(run[f"{process}_cpu_s"]) / int(run["requests"]) * 1e6


def divide(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def defined(values: list[float]) -> list[float]:
    """
    The values that are numbers: a ratio is undefined (nan) in a round
    where the relay's added latency was not above zero.
    """
    return [v for v in values if v == v]


def spread(values: list[float], fmt: str) -> str:
    """
    The median and the range, e.g. '0.412 (0.390-0.455)', over the rounds
    where the figure is defined.
    """
    numbers = defined(values)
    if not numbers:
        return "undefined"
    text = f"{median(numbers):{fmt}} ({min(numbers):{fmt}}-{max(numbers):{fmt}})"
    if len(numbers) < len(values):
        text += f" [{len(values) - len(numbers)} rounds undefined]"
    return text


def measure(
    pair: dict[str, dict[str, Any]],
    connections: int,
    args: argparse.Namespace,
    pids: dict[str, int],
    figures_of: Callable[[dict[str, dict[str, Any]]], dict[str, float]],
    line_of: Callable[[dict[str, float]], str],
) -> list[dict[str, float]]:
    """
    Rounds of one run per path, the order rotating so that no path always
    runs first or last; prints each round's figures as it ends.
    """
    names = list(pair)
    for target in pair.values():  # warm up: connections, pools, caches
        load(target, connections, 0.5, pids, args.sdk_headers)
    figures = []
    for i in range(args.rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        runs = {name: load(pair[name], connections, args.seconds, pids, args.sdk_headers) for name in order}
        figures.append(figures_of(runs))
        print(f"  round {i + 1} ({'/'.join(order)}): {line_of(figures[-1])}", flush=True)
    return figures


def latency_figures(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    straight = runs["straight"]
    figures = {
        "gw_p50": runs["gateway"]["p50_ms"] - straight["p50_ms"],
        "gw_p99": runs["gateway"]["p99_ms"] - straight["p99_ms"],
        "straight_p50": straight["p50_ms"],
        "gw_c1_us": cpu_us_per_call(runs["gateway"], "gateway"),
    }
    if "first_event_p50_ms" in straight:
        figures["gw_first"] = runs["gateway"]["first_event_p50_ms"] - straight["first_event_p50_ms"]
    if "relay" in runs:
        figures["relay_p50"] = runs["relay"]["p50_ms"] - straight["p50_ms"]
        figures["relay_p99"] = runs["relay"]["p99_ms"] - straight["p99_ms"]
        figures["p50_ratio"] = divide(figures["gw_p50"], figures["relay_p50"])
        figures["p99_ratio"] = divide(figures["gw_p99"], figures["relay_p99"])
        figures["relay_c1_us"] = cpu_us_per_call(runs["relay"], "relay")
        figures["c1_cpu_ratio"] = divide(figures["gw_c1_us"], figures["relay_c1_us"])
    return figures


def cpu_figures(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    figures = {
        "gw_us": cpu_us_per_call(runs["gateway"], "gateway"),
        "gw_rps": runs["gateway"]["per_second"],
        "straight_rps": runs["straight"]["per_second"],
    }
    if "relay" in runs:
        figures["relay_us"] = cpu_us_per_call(runs["relay"], "relay")
        figures["relay_rps"] = runs["relay"]["per_second"]
        figures["cpu_ratio"] = divide(figures["gw_us"], figures["relay_us"])
    return figures


def tool_figures(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {"tools_p50": runs["tools"]["p50_ms"] - runs["plain"]["p50_ms"]}


def tool_line(f: dict[str, float]) -> str:
    return f"tool request p50 {f['tools_p50']:+.3f} ms over plain chat"


def latency_line(f: dict[str, float]) -> str:
    line = f"added p50/p99 ms: gateway {f['gw_p50']:.3f}/{f['gw_p99']:.3f}"
    if "relay_p50" in f:
        line += (
            f", relay {f['relay_p50']:.3f}/{f['relay_p99']:.3f}"
            f", ratio p50 {f['p50_ratio']:.2f} p99 {f['p99_ratio']:.2f}"
        )
    if "gw_first" in f:
        line += f"; first event added {f['gw_first']:.3f}"
    line += f"; CPU µs/call gateway {f['gw_c1_us']:.0f}"
    if "relay_c1_us" in f:
        line += f", relay {f['relay_c1_us']:.0f}"
    return line + f"  (straight p50 {f['straight_p50']:.3f})"


def cpu_line(f: dict[str, float]) -> str:
    line = f"CPU µs/call: gateway {f['gw_us']:.0f}"
    if "relay_us" in f:
        line += f", relay {f['relay_us']:.0f}, ratio {f['cpu_ratio']:.2f}"
    line += f"  (req/s gateway {f['gw_rps']:,.0f}"
    if "relay_rps" in f:
        line += f", relay {f['relay_rps']:,.0f}"
    return line + f", straight {f['straight_rps']:,.0f})"


def summary(figures: list[dict[str, float]], key: str, fmt: str) -> str:
    return spread([f[key] for f in figures], fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; medians and ranges are reported")
    parser.add_argument("--providers", default="kimi,gemini")
    parser.add_argument("--streams", action="store_true", help="also streamed answers (gateway only)")
    parser.add_argument("--profile", help="write the gateway's cProfile stats here and print the top entries")
    parser.add_argument(
        "--sdk-headers",
        action="store_true",
        help="the client also sends the 13 headers the openai Python SDK sends (every path)",
    )
    parser.add_argument(
        "--log-level", default="info", help="the gateway's LOG_LEVEL (info, as deployed; debug logs every call)"
    )
    parser.add_argument(
        "--gateway-bin",
        help="a venv (or its bin/) whose twistd and python run the gateway and the stand-in; "
        "default: this checkout under this Python",
    )
    parser.add_argument(
        "--tools", action="store_true", help="also an agent's tool-calling request at concurrency 1 (issue #14)"
    )
    args = parser.parse_args()
    install = Install(args.gateway_bin)

    client_headers = "the openai SDK's" if args.sdk_headers else "minimal"
    print(
        f"data plane against the bare relay: {time.strftime('%Y-%m-%d %H:%M %Z')}; {args.rounds} rounds x "
        f"{args.seconds:g} s per run, order rotating; {os.cpu_count()} CPUs; gateway and stand-in: "
        f"{install.label}; gateway LOG_LEVEL={args.log_level}; client headers: {client_headers}",
        flush=True,
    )

    upstream_port, api_port, relay_port = free_port(), free_port(), free_port()
    upstream = start_upstream(install, upstream_port)
    gateway = start_gateway(install, api_port, upstream_port, args.profile, args.log_level)
    relay = start_relay(relay_port, upstream_port)
    pids = {"gateway": gateway.pid, "upstream": upstream.pid, "relay": relay.pid}
    results: list[tuple[str, bool, list[dict[str, float]], list[dict[str, float]]]] = []
    tool_rows: list[tuple[str, list[dict[str, float]]]] = []
    try:
        for provider in args.providers.split(","):
            for stream in (False, True) if args.streams else (False,):
                pair = targets(upstream_port, api_port, relay_port, provider, stream)
                kind = f"{provider} {'streamed' if stream else 'whole'}"
                per_block: dict[int, list[dict[str, float]]] = {}
                for connections, figures_of, line_of in (
                    (1, latency_figures, latency_line),
                    (32, cpu_figures, cpu_line),
                ):
                    print(f"{kind}, concurrency {connections}:", flush=True)
                    per_block[connections] = measure(pair, connections, args, pids, figures_of, line_of)
                results.append((kind, "relay" in pair, per_block[1], per_block[32]))
        for provider in args.providers.split(",") if args.tools else ():
            plain = targets(upstream_port, api_port, relay_port, provider, False)["gateway"]
            tools = {**plain, "body": {**plain["body"], "messages": TOOL_MESSAGES, "tools": TOOLS}}
            print(f"{provider} tool-calling request against plain chat, through the gateway, concurrency 1:")
            tool_rows.append(
                (provider, measure({"tools": tools, "plain": plain}, 1, args, pids, tool_figures, tool_line))
            )
    finally:
        for process in (gateway, upstream, relay):
            process.terminate()
            process.wait()

    print(f"\nmedians (range) over {args.rounds} rounds:")
    for kind, with_relay, lat, cpu in results:
        print(f"  {kind}, c=1, added p50 ms: gateway {summary(lat, 'gw_p50', '.3f')}", end="")
        print(
            f", relay {summary(lat, 'relay_p50', '.3f')}, ratio {summary(lat, 'p50_ratio', '.2f')}"
            if with_relay
            else ""
        )
        print(f"  {kind}, c=1, added p99 ms: gateway {summary(lat, 'gw_p99', '.3f')}", end="")
        print(
            f", relay {summary(lat, 'relay_p99', '.3f')}, ratio {summary(lat, 'p99_ratio', '.2f')}"
            if with_relay
            else ""
        )
        print(f"  {kind}, c=1, CPU µs/call: gateway {summary(lat, 'gw_c1_us', '.0f')}", end="")
        print(
            f", relay {summary(lat, 'relay_c1_us', '.0f')}, ratio {summary(lat, 'c1_cpu_ratio', '.2f')}"
            if with_relay
            else ""
        )
        if "gw_first" in lat[0]:
            print(f"  {kind}, c=1, first event added ms: gateway {summary(lat, 'gw_first', '.3f')}")
        print(f"  {kind}, c=32, CPU µs/call: gateway {summary(cpu, 'gw_us', '.0f')}", end="")
        print(
            f", relay {summary(cpu, 'relay_us', '.0f')}, ratio {summary(cpu, 'cpu_ratio', '.2f')}" if with_relay else ""
        )
        print(f"  {kind}, c=32, req/s (information): gateway {summary(cpu, 'gw_rps', ',.0f')}", end="")
        if with_relay:
            print(f", relay {summary(cpu, 'relay_rps', ',.0f')}", end="")
        print(f", straight {summary(cpu, 'straight_rps', ',.0f')}")

    print("targets (issue #16, gateway against the relay):")
    for kind, with_relay, lat, cpu in results:
        if not with_relay:
            continue
        p50_ratio = median(defined([f["p50_ratio"] for f in lat]) or [float("nan")])
        cpu_ratio = median(defined([f["cpu_ratio"] for f in cpu]) or [float("nan")])
        verdict = "met" if p50_ratio <= P50_TARGET else "MISSED"
        print(f"  {kind}: added p50 at c=1, {p50_ratio:.2f} x the relay's (<= {P50_TARGET}): {verdict}")
        verdict = "met" if cpu_ratio <= CPU_TARGET else "MISSED"
        print(f"  {kind}: CPU per call at c=32, {cpu_ratio:.2f} x the relay's (<= {CPU_TARGET}): {verdict}")

    if args.tools:
        print("tool-calling request (issue #14), c=1, p50 added over plain chat through the gateway:")
        for provider, figures in tool_rows:
            print(f"  {provider}: {summary(figures, 'tools_p50', '.3f')} ms")
        micro = translation_microbench()
        added = (micro["tools"] - micro["plain"]) / 1000
        verdict = "met" if added < 0.1 else "MISSED"
        print(
            f"  Gemini translation in process (parse + to_gemini + from_gemini), p50: plain {micro['plain']:.1f} µs, "
            f"tools {micro['tools']:.1f} µs; the translation adds {added:.3f} ms (< 0.1): {verdict}"
        )

    if args.profile:
        time.sleep(0.5)
        print(f"\ngateway profile ({args.profile}), top 25 by own time:")
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
