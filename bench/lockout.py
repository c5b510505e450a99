"""
How long an attacker from one address needs for 10,000 token guesses under
the lockout across connections (issue #17).

The figure is computed from the settings (AUTH_LOCKOUT_FAILURES guesses,
then AUTH_LOCKOUT_SECONDS refused), and the rate it assumes is checked over
a short run against a real gateway on loopback with a short lockout: an
attacker that reconnects after every MAX_AUTH_FAILURES - 1 guesses and
retries the handshake as fast as it can.

    .venv/bin/python bench/lockout.py [--seconds 6] [--lockout 1.5]
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread

from openclaw.service import GatewayService
from openclaw.settings import Settings
from tests.wsfuzz import frame, handshake, server_frames

GUESSES = 10_000


def attack(port: int, seconds: float, per_connection: int) -> tuple[int, int]:
    """
    Guess for C{seconds}; the guesses the gateway answered (each one a
    token it checked) and the handshakes it refused.
    """
    answered = refused = 0
    guess = frame(0x1, json.dumps({"token": "forged", "cmd": "ping"}).encode())
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sock, data = handshake("127.0.0.1", port, timeout=5)
        except ConnectionError:
            refused += 1
            time.sleep(0.01)
            continue
        with sock:
            sock.sendall(guess * per_connection)
            closed = False
            got = 0
            while got < per_connection and not closed:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                frames, data = server_frames(data + chunk)
                for opcode, _ in frames:
                    got += opcode == 0x1
                    closed = closed or opcode == 0x8
            answered += got
    return answered, refused


@inlineCallbacks
def main(reactor_: object, args: argparse.Namespace) -> object:
    with TemporaryDirectory() as state:
        settings = Settings(port=0, state_dir=Path(state), auth_lockout_seconds=args.lockout)
        port = free_port()
        endpoint = serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1")
        service = GatewayService(settings, reactor, endpoint, stdout=io.StringIO())
        service.startService()
        answered, refused = yield deferToThread(attack, port, args.seconds, settings.max_auth_failures - 1)
        yield service.stopService()
    defaults = Settings()
    failures, lockout = defaults.auth_lockout_failures, defaults.auth_lockout_seconds
    # Every AUTH_LOCKOUT_FAILURES guesses cost one lockout.
    predicted_rate = settings.auth_lockout_failures / settings.auth_lockout_seconds
    measured_rate = answered / args.seconds
    hours = GUESSES / failures * lockout / 3600
    print(
        f"short run: AUTH_LOCKOUT_SECONDS={args.lockout:g} for {args.seconds:g} s: {answered} guesses checked, "
        f"{refused} handshakes refused (429); {measured_rate:.2f} guesses/s measured, "
        f"at most {predicted_rate:.2f}/s (+ {failures} for the first burst) predicted"
    )
    print(
        f"defaults ({failures} failures, then {lockout:g} s locked out): {failures / lockout:.4f} guesses/s, "
        f"{GUESSES:,} guesses take {GUESSES // failures} lockouts = {hours:.1f} h ({hours / 24:.1f} days)"
    )
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--lockout", type=float, default=1.5)
    task.react(main, [parser.parse_args()])
