"""
System calls per model call, gateway against relay: starts the stand-in,
the gateway and the relay as bench/data_plane.py does, drives each with
bench/httpload.py at concurrency 1 while C{strace -c -f} is attached to
its process, and prints each system call's count per answered call.

    .venv/bin/python bench/syscalls.py [--seconds 3]

strace slows the traced process, so only the counts mean anything here,
not the rates; Linux with strace installed only.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import data_plane as dp

_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def counts(path: Path) -> dict[str, int]:
    """
    The calls column of an C{strace -c} summary, by system call.
    """
    found: dict[str, int] = {}
    for line in path.read_text().splitlines():
        row = _ROW.match(line)
        if row and row.group(2) != "total":
            found[row.group(2)] = int(row.group(1))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    install = dp.Install(None)
    upstream_port, api_port, relay_port = dp.free_port(), dp.free_port(), dp.free_port()
    upstream = dp.start_upstream(install, upstream_port)
    gateway = dp.start_gateway(install, api_port, upstream_port, None, "info")
    relay = dp.start_relay(relay_port, upstream_port)
    pair = dp.targets(upstream_port, api_port, relay_port, "kimi", False)
    per_call: dict[str, dict[str, float]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, process in (("gateway", gateway), ("relay", relay)):
                dp.load(pair[name], 1, 1.0, {})  # warm: pool connection made
                out = Path(tmp) / name
                tracer = subprocess.Popen(
                    ["strace", "-c", "-f", "-p", str(process.pid), "-o", str(out)], stderr=subprocess.DEVNULL
                )
                time.sleep(1.0)  # attached
                calls = dp.load(pair[name], 1, args.seconds, {})["requests"]
                time.sleep(0.3)
                tracer.send_signal(signal.SIGINT)
                tracer.wait()
                per_call[name] = {call: n / calls for call, n in counts(out).items()}
    finally:
        for process in (gateway, upstream, relay):
            process.terminate()
            process.wait()
    names = sorted(set(per_call["gateway"]) | set(per_call["relay"]), key=lambda c: -per_call["gateway"].get(c, 0))
    print(f"{'system call':<16} {'gateway':>9} {'relay':>9}   (per answered call, concurrency 1)")
    for call in names:
        print(f"{call:<16} {per_call['gateway'].get(call, 0):9.3f} {per_call['relay'].get(call, 0):9.3f}")
    print(f"{'all':<16} {sum(per_call['gateway'].values()):9.3f} {sum(per_call['relay'].values()):9.3f}")


if __name__ == "__main__":
    main()
