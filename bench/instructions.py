"""
Instructions per model call, gateway against relay: bench/data_plane_cpu.py's
in-memory harness run under valgrind's callgrind (with --control-plane,
instructions per ping, gateway against the bare Autobahn floor:
bench/control_plane_cpu.py's), which counts the machine
instructions the process executes instead of timing them.  The count
varies by 1 or 2 % between runs of the same code, whatever else the
machine is doing (timestamps, request ids, memory layout; the hash seed
is fixed), where a shared two-core host's timings vary by +-10 % between
rounds: two trees, or a change and its absence, compare more closely
than timings allow, and the ratio of two sides counted in one run more
closely still.

Each side runs twice, with FEW and MANY calls; the difference divided by
MANY - FEW is the count per call, start-up and imports cancelled out.
PYTHONHASHSEED is fixed so that both runs hash alike.

    .venv/bin/python bench/instructions.py [--few 200] [--many 600] [--provider kimi] [--without costs,...]
    .venv/bin/python bench/instructions.py --control-plane [--few 2000] [--many 6000]

Instructions are not CPU time (a cache miss costs many cycles, a simple
instruction less than one), but for the same interpreter running similar
code the two move together; the in-process harness leaves out the sockets
(bench/data_plane.py measures those).  Needs valgrind; about a minute per
run under it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DATA_PLANE = Path(__file__).resolve().parent / "data_plane_cpu.py"
CONTROL_PLANE = Path(__file__).resolve().parent / "control_plane_cpu.py"
_COLLECTED = re.compile(rb"Collected : (\d+)")


def instructions(harness: Path, count_flag: str, calls: int, harness_args: list[str]) -> int:
    """
    The instructions one run of C{harness} executes, all of it (start-up
    included), with C{calls} calls (given as C{count_flag}).

    @raise RuntimeError: the harness failed under valgrind.
    """
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={Path(tmp) / 'out'}",
                sys.executable,
                str(harness),
                count_flag,
                str(calls),
                *harness_args,
            ],
            env={**os.environ, "PYTHONHASHSEED": "0"},
            capture_output=True,
            check=False,
        )
    found = _COLLECTED.search(run.stderr)
    if run.returncode != 0 or found is None:
        raise RuntimeError(f"the harness failed under valgrind: {run.stderr[-2000:].decode(errors='replace')}")
    return int(found.group(1))


def per_call(harness: Path, count_flag: str, few: int, many: int, harness_args: list[str]) -> float:
    """
    Instructions per call: two runs (C{few} and C{many} calls) side by side,
    their difference over C{many - few}.
    """
    with ThreadPoolExecutor(2) as pool:
        small, large = pool.map(lambda n: instructions(harness, count_flag, n, harness_args), (few, many))
    return (large - small) / (many - few)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--control-plane", action="store_true", help="pings, gateway against the floor")
    parser.add_argument("--few", type=int, help="calls (or pings) of the shorter run: 200 (2000)")
    parser.add_argument("--many", type=int, help="calls (or pings) of the longer run: 600 (6000)")
    parser.add_argument("--provider", default="kimi", choices=("kimi", "gemini"))
    parser.add_argument("--without", default="", help="pieces stubbed out (bench/data_plane_cpu.py --without)")
    parser.add_argument(
        "--only",
        choices=("gateway",),
        help="count the gateway's side only (half the time: to compare two trees' gateways, or a change)",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        parser.exit(2, "valgrind is not installed (Debian: apt-get install valgrind)\n")
    few = args.few or (2000 if args.control_plane else 200)
    many = args.many or (6000 if args.control_plane else 600)
    if many <= few:
        parser.error("--many must be larger than --few")
    if args.control_plane:
        gateway = per_call(CONTROL_PLANE, "--messages", few, many, ["--only", "gateway"])
        if args.only:
            print(f"instructions per ping ({few} and {many} pings under callgrind), gateway: {gateway:,.0f}")
            return
        floor = per_call(CONTROL_PLANE, "--messages", few, many, ["--only", "floor"])
        print(f"instructions per ping ({few} and {many} pings under callgrind):")
        print(f"  gateway: {gateway:,.0f}")
        print(f"  floor: {floor:,.0f}")
        print(f"  ratio (floor over gateway, as bench/control_plane.py's): {floor / gateway:.3f}")
        return
    gateway_args = ["--provider", args.provider] + (["--without", args.without] if args.without else [])
    gateway = per_call(DATA_PLANE, "--calls", few, many, gateway_args)
    what = args.provider + (f" without {args.without}" if args.without else "")
    if args.only:
        print(f"instructions per call ({few} and {many} calls under callgrind), gateway ({what}): {gateway:,.0f}")
        return
    relay = per_call(DATA_PLANE, "--calls", few, many, ["--relay"])
    print(f"instructions per call ({few} and {many} calls under callgrind):")
    print(f"  gateway ({what}): {gateway:,.0f}")
    print(f"  relay: {relay:,.0f}")
    print(f"  ratio: {gateway / relay:.3f}")


if __name__ == "__main__":
    main()
