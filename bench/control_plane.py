"""
Control-plane speed: the gateway against the floor of its own stack.

Starts the gateway as an operator would (twistd -n openclaw) and a bare
Autobahn server that answers every message with a fixed reply, then drives
each with the same load generator in a separate process (N connections, each
sending ping and waiting for the answer) and prints round trips per second,
p50/p99 latency, the CPU each side used, and the ratio gateway/floor.

Rounds alternate: each round measures the gateway and the floor back to back
(in turn gateway first and floor first), so drift in what else the machine
runs lands on both; each round's ratio is printed, and the median of them is
the figure.

The load generator must be faster than the floor, or it caps the floor more
than the gateway and the ratio looks better than it is.  The default is the
Node ``ws`` client (bench/wsload.mjs), which does saturate it; install it
with ``npm install`` inside bench/.  ``--client python`` uses bench/wsload.py,
which needs nothing but is slower than the floor.

    .venv/bin/python bench/control_plane.py [--client node|python]
        [--connections 50] [--seconds 5] [--rounds 7]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SECRET = "bench-secret-bench-secret-bench-secret-0123"


def private_directory() -> str:
    """
    A new directory of this user's alone (mode 0700), removed at exit.
    """
    path = tempfile.mkdtemp(prefix="openclaw-bench-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_gateway(port: int, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    # A directory of its own (0700): /tmp, its working directory, may not hold the database.
    env = dict(os.environ, JWT_SECRET=SECRET, LOG_LEVEL="info", STATE_DIR=private_directory(), **(extra_env or {}))
    process = subprocess.Popen(
        [
            str(BIN / "twistd"),
            "-n",
            "--pidfile=",
            "openclaw",
            "--port",
            str(port),
            "--api-port",
            str(free_port()),
            "--interface",
            "127.0.0.1",
        ],
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


def node_client() -> list[str] | None:
    """
    The command that runs the Node load generator, or L{None} when Node or
    its C{ws} package is not installed.
    """
    node = shutil.which("node")
    if node is None or not (HERE / "node_modules" / "ws").is_dir():
        return None
    return [node, str(HERE / "wsload.mjs")]


def load(client: list[str], port: int, pid: int, message: str, connections: int, seconds: float) -> dict[str, float]:
    before = cpu_seconds(pid)
    out = subprocess.run(
        [
            *client,
            "--port",
            str(port),
            "--message",
            message,
            "--connections",
            str(connections),
            "--seconds",
            str(seconds),
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
    parser.add_argument("--client", choices=("node", "python"), help="load generator (default: node when installed)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    node = node_client()
    if args.client == "node" and node is None:
        raise SystemExit("the Node load generator needs node and its ws package: cd bench && npm install")
    if args.client is None and node is None:
        print(
            "note: Node or bench/node_modules/ws is missing (cd bench && npm install); using the Python client,"
            " which caps the floor: the ratio reads high",
            file=sys.stderr,
        )
    client = node if args.client != "python" and node is not None else [sys.executable, str(HERE / "wsload.py")]
    client_name = "node ws" if client is node else "python"

    gateway_port, floor_port = free_port(), free_port()
    gateway, token = start_gateway(gateway_port)
    floor = start_floor(floor_port)
    ping = json.dumps({"token": token, "cmd": "ping"})
    servers = {"gateway": (gateway_port, gateway.pid), "floor": (floor_port, floor.pid)}
    rounds: list[dict[str, dict[str, float]]] = []
    try:
        for port, pid in servers.values():
            load(client, port, pid, ping, args.connections, 1.0)  # warm up
        for index in range(args.rounds):
            order = ("gateway", "floor") if index % 2 == 0 else ("floor", "gateway")
            rounds.append({name: load(client, *servers[name], ping, args.connections, args.seconds) for name in order})
    finally:
        gateway.terminate()
        floor.terminate()
        gateway.wait()
        floor.wait()

    print(
        f"control plane: {args.connections} connections, ping and wait, {client_name} client, "
        f"{args.rounds} alternating rounds x {args.seconds:g} s each"
    )
    print(
        f"{'round':<6} {'server':<8} {'round trips/s':>14} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'server CPU':>11} {'µs/trip':>8} {'generator CPU':>14} {'ratio':>6}"
    )
    ratios = []
    for index, measured in enumerate(rounds, 1):
        ratio = measured["gateway"]["per_second"] / measured["floor"]["per_second"]
        ratios.append(ratio)
        for name in ("gateway", "floor"):
            run = measured[name]
            if run["unexpected_answers"]:
                raise SystemExit(f"{name}: {run['unexpected_answers']} answers were not ok")
            print(
                f"{index:<6} {name:<8} {run['per_second']:>14,.0f} {run['p50_ms']:>8.3f} {run['p99_ms']:>8.3f} "
                f"{run['server_cpu_s'] / run['seconds']:>10.0%} {run['server_cpu_s'] / run['round_trips'] * 1e6:>8.1f} "
                f"{run['generator_cpu_s'] / run['seconds']:>13.0%}" + (f" {ratio:>6.3f}" if name == "gateway" else "")
            )
    medians = {name: statistics.median(r[name]["per_second"] for r in rounds) for name in ("gateway", "floor")}
    cpu = {
        name: statistics.median(r[name]["server_cpu_s"] / r[name]["round_trips"] * 1e6 for r in rounds)
        for name in ("gateway", "floor")
    }
    print(f"median server CPU per round trip: gateway {cpu['gateway']:.1f} µs, floor {cpu['floor']:.1f} µs")
    print(f"rounds' ratios: {', '.join(f'{r:.3f}' for r in ratios)} (spread {min(ratios):.3f}-{max(ratios):.3f})")
    print(
        f"median: gateway {medians['gateway']:,.0f}/s, floor {medians['floor']:,.0f}/s; "
        f"median ratio gateway/floor = {statistics.median(ratios):.3f} (target >= 0.85)"
    )


if __name__ == "__main__":
    main()
