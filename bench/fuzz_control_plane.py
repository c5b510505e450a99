"""
A long fuzz run over real sockets against the gateway as an operator runs it
(twistd -n openclaw), with its resident memory before and after: thousands
of hostile frames, then a ping must still work and memory must not have
grown without bound.

    .venv/bin/python bench/fuzz_control_plane.py [--rounds 2000] [--threads 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from control_plane import free_port, start_gateway
from wsload import run as load

from tests.wsfuzz import FuzzReport, fuzz


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--batches", type=int, default=4, help="RSS is measured after each batch")
    args = parser.parse_args()
    port = free_port()
    # MAX_AUTH_FAILURES at its most: a burst is 12 frames at most, so no
    # connection is closed for its failed authentications.
    gateway, token = start_gateway(
        port,
        extra_env={"MAX_MESSAGE_BYTES": "65536", "MAX_AUTH_FAILURES": "1000", "AUTH_LOCKOUT_EXEMPT": "127.0.0.1"},
    )
    ping = json.dumps({"token": token, "cmd": "ping"}).encode()
    try:
        load(port, ping, 10, 1.0, b'"ok":true')
        before = rss_kib(gateway.pid)
        started = time.monotonic()
        per_thread = args.rounds // args.threads // args.batches
        reports, rss = [], []
        with ThreadPoolExecutor(args.threads) as pool:
            for batch in range(args.batches):
                seeds = range(batch * args.threads, (batch + 1) * args.threads)
                reports += pool.map(lambda seed: fuzz("127.0.0.1", port, token, per_thread, seed), seeds)
                rss.append(rss_kib(gateway.pid))
        took = time.monotonic() - started
        after = rss[-1]
        check = load(port, ping, 10, 1.0, b'"ok":true')
    finally:
        gateway.terminate()
        gateway.wait()
    total = FuzzReport()
    for report in reports:
        total.rounds += report.rounds
        total.frames_sent += report.frames_sent
        total.answers += report.answers
        total.close_codes.update(report.close_codes)
        total.failures.extend(report.failures)
    print(f"fuzz: {total.summary()} in {took:.0f} s")
    for failure in total.failures[:10]:
        print("  failure:", failure)
    print(
        f"gateway RSS: {before} KiB before, after each batch: {', '.join(map(str, rss))} KiB ({after - before:+} KiB)"
    )
    print(f"ping afterwards: {check['round_trips']} round trips, {check['unexpected_answers']} not ok")


if __name__ == "__main__":
    main()
