"""
Control-plane speed: the gateway against the floor of its own stack.

Starts the gateway as an operator would (twistd -n openclaw) and a bare
Autobahn server that answers every message with a fixed reply, then drives
each with the same load generator in a separate process (N connections, each
sending ping and waiting for the answer) and prints round trips per second,
p50/p99 latency, the CPU each side used, and the ratio gateway/floor.

    .venv/bin/python bench/control_plane.py [--connections 50] [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SECRET = "bench-secret-bench-secret-bench-secret-0123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_gateway(port: int, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    env = dict(os.environ, JWT_SECRET=SECRET, LOG_LEVEL="info", **(extra_env or {}))
    process = subprocess.Popen(
        [str(BIN / "twistd"), "-n", "--pidfile=", "openclaw", "--port", str(port), "--api-port", str(free_port()), "--interface", "127.0.0.1"],
        env=env,
        stdout=subprocess.PIPE,
        cwd="/tmp",
    )
    assert process.stdout is not None
    for line in process.stdout:
        found = re.match(rb"   Token    : (\S+)", line)
        if found:
            # Keep draining stdout so the gateway never blocks on a full pipe.
            subprocess.Popen(["cat"], stdin=process.stdout, stdout=subprocess.DEVNULL)
            return process, found.group(1).decode()
    raise RuntimeError("the gateway exited before printing its token")


def start_floor(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, str(HERE / "floor_server.py"), str(port)], stdout=subprocess.PIPE)
    assert process.stdout is not None
    process.stdout.readline()
    return process


def load(port: int, pid: int, message: str, connections: int, seconds: float) -> dict[str, float]:
    before = cpu_seconds(pid)
    out = subprocess.run(
        [
            sys.executable,
            str(HERE / "wsload.py"),
            "--port", str(port),
            "--message", message,
            "--connections", str(connections),
            "--seconds", str(seconds),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = json.loads(out)
    result["server_cpu_s"] = round(cpu_seconds(pid) - before, 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    gateway_port, floor_port = free_port(), free_port()
    gateway, token = start_gateway(gateway_port)
    floor = start_floor(floor_port)
    ping = json.dumps({"token": token, "cmd": "ping"})
    try:
        for port, pid in ((gateway_port, gateway.pid), (floor_port, floor.pid)):
            load(port, pid, ping, args.connections, 1.0)  # warm up
        results: dict[str, list[dict[str, float]]] = {"floor": [], "gateway": []}
        for _ in range(args.rounds):
            results["floor"].append(load(floor_port, floor.pid, ping, args.connections, args.seconds))
            results["gateway"].append(load(gateway_port, gateway.pid, ping, args.connections, args.seconds))
    finally:
        gateway.terminate()
        floor.terminate()
        gateway.wait()
        floor.wait()

    print(f"control plane: {args.connections} connections, ping and wait, {args.rounds} x {args.seconds:.0f} s each")
    print(f"{'server':<8} {'round trips/s':>14} {'p50 ms':>8} {'p99 ms':>8} {'server CPU':>11} {'generator CPU':>14}")
    best: dict[str, dict[str, float]] = {}
    for name, runs in results.items():
        for run in runs:
            print(
                f"{name:<8} {run['per_second']:>14,.0f} {run['p50_ms']:>8.3f} {run['p99_ms']:>8.3f} "
                f"{run['server_cpu_s'] / run['seconds']:>10.0%} {run['generator_cpu_s'] / run['seconds']:>13.0%}"
            )
            if run["unexpected_answers"]:
                raise SystemExit(f"{name}: {run['unexpected_answers']} answers were not ok")
        best[name] = sorted(runs, key=lambda r: r["per_second"])[len(runs) // 2]
    ratio = best["gateway"]["per_second"] / best["floor"]["per_second"]
    print(
        f"median: gateway {best['gateway']['per_second']:,.0f}/s, floor {best['floor']['per_second']:,.0f}/s, "
        f"ratio gateway/floor = {ratio:.2f} (target >= 0.85)"
    )


if __name__ == "__main__":
    main()
