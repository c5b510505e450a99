"""
API flood figures (#17 item 5): what a gateway with its file limit at 1024
survives from loopback while an operator's ``ping`` and an authenticated
chat call still succeed.

A real ``twistd -n openclaw`` (file limit set with ``resource.setrlimit``
before exec) in front of the stand-in upstream (a process of its own),
flooded from this process over 127.0.0.0/8 source addresses with idle
connections (nothing sent), half-sent heads (keyless, a header line cut
short) and half-sent bodies (a key, a ``Content-Length`` never reached).
While the flood is held open: ``openclawctl ping`` over the control plane
and one chat call with the official ``openai`` SDK from 127.0.0.1.

Reported per scenario: connections attempted, held open by the gateway
after a second, the gateway's process still alive, the ping's and the
call's outcome and latency, and the connections still held after
``API_HEADER_TIMEOUT_SECONDS``/``API_BODY_TIMEOUT_SECONDS``.

    .venv/bin/python bench/api_flood.py [--nofile 1024] [--per-kind 1500] [--addresses 3 32]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

GATEWAY_KEY = "bench-gateway-key-0123456789"
KIMI_KEY = "sk-kimi-bench-0123456789"
GEMINI_KEY = "AIza-gemini-bench-0123456789"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listening on {port}")


def flood(api_port: int, per_kind: int, addresses: int) -> list[socket.socket]:
    """
    Open C{per_kind} connections of each kind, spread over C{addresses}
    source addresses 127.0.1.x; the ones that could be opened.
    """
    kinds = [
        b"",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: aaaa",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + GATEWAY_KEY.encode()
        + b"\r\nContent-Length: 100000\r\n\r\n{",
    ]
    opened = []
    for i in range(per_kind * len(kinds)):
        source = f"127.0.1.{i % addresses + 1}"
        try:
            sock = socket.create_connection(("127.0.0.1", api_port), timeout=1, source_address=(source, 0))
            data = kinds[i % len(kinds)]
            if data:
                sock.sendall(data)
            opened.append(sock)
        except OSError:
            pass
    return opened


def held(socks: list[socket.socket]) -> int:
    count = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            data = sock.recv(65536)
            count += data != b"" and not data.startswith(b"HTTP/1.1 4")
        except BlockingIOError:
            count += 1
        except OSError:
            pass
    return count


def ping(port: int, token_file: Path) -> tuple[bool, float]:
    started = time.monotonic()
    done = subprocess.run(
        [str(BIN / "openclawctl"), "--url", f"ws://127.0.0.1:{port}", "--token-file", str(token_file), "ping"],
        capture_output=True,
        timeout=30,
    )
    return done.returncode == 0, time.monotonic() - started


def chat(api_port: int) -> tuple[str, float]:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=10)
    started = time.monotonic()
    try:
        answer = client.chat.completions.create(
            model="kimi/moonshot-v1-8k", messages=[{"role": "user", "content": "Say hello."}]
        )
        outcome = "ok" if answer.choices else "empty"
    except Exception as e:
        outcome = type(e).__name__
    finally:
        client.close()
    return outcome, time.monotonic() - started


def scenario(nofile: int, per_kind: int, addresses: int, header_timeout: float, body_timeout: float) -> None:
    upstream_port, port, api_port = free_port(), free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="api-flood-"))
    token_file = work / "token"
    upstream = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "openclaw.testing.upstream",
            "--port",
            str(upstream_port),
            "--quiet",
            "--kimi-key",
            KIMI_KEY,
            "--gemini-key",
            GEMINI_KEY,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert upstream.stdout is not None
    pointers: dict[str, str] = {}
    while len(pointers) < 4:
        line = upstream.stdout.readline().decode().strip()
        if not line:
            raise SystemExit("the stand-in upstream did not start")
        name, sep, value = line.partition("=")
        if sep and name.isupper():
            pointers[name] = value
    env = {
        **os.environ,
        "JWT_SECRET": "b" * 48,
        "GATEWAY_API_KEYS": GATEWAY_KEY,
        **pointers,
        "DEFAULT_PROVIDER": "kimi",
        "TOKEN_FILE": str(token_file),
        "LOG_LEVEL": "warn",
        "API_HEADER_TIMEOUT_SECONDS": str(header_timeout),
        "API_BODY_TIMEOUT_SECONDS": str(body_timeout),
    }

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    gateway = subprocess.Popen(
        [
            str(BIN / "twistd"),
            "-n",
            "--pidfile=",
            "openclaw",
            "--port",
            str(port),
            "--api-port",
            str(api_port),
            "--interface",
            "127.0.0.1",
        ],
        env=env,
        cwd=work,
        preexec_fn=limit,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(api_port)
        wait_port(port)
        socks = flood(api_port, per_kind, addresses)
        time.sleep(1.0)
        kept = held(socks)
        ok, ping_seconds = ping(port, token_file)
        outcome, chat_seconds = chat(api_port)
        time.sleep(max(header_timeout, body_timeout) + 1.5)
        after = held(socks)
        alive = gateway.poll() is None
        for sock in socks:
            sock.close()
        print(
            f"nofile={nofile} addresses={addresses}: flood attempted {per_kind * 3} "
            f"({per_kind} idle + {per_kind} half-sent heads + {per_kind} half-sent bodies), "
            f"opened {len(socks)}, held by the gateway {kept}; "
            f"ping {'ok' if ok else 'FAILED'} in {ping_seconds * 1000:.0f} ms (openclawctl, process start included); "
            f"chat {outcome} in {chat_seconds * 1000:.0f} ms; "
            f"held after the deadlines {after}; gateway {'alive' if alive else 'DEAD'}"
        )
    finally:
        gateway.terminate()
        upstream.terminate()
        output = gateway.communicate(timeout=30)[0].decode(errors="replace")
        upstream.wait(timeout=30)
        for line in output.splitlines():
            if "capped" in line or "refused" in line:
                print("   gateway:", line[:220])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--nofile", type=int, default=1024, help="the gateway's RLIMIT_NOFILE")
    parser.add_argument("--per-kind", type=int, default=1500, help="flood connections of each kind")
    parser.add_argument("--addresses", type=int, nargs="+", default=[3, 32], help="flood source addresses")
    parser.add_argument("--header-timeout", type=float, default=10.0)
    parser.add_argument("--body-timeout", type=float, default=10.0)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for addresses in args.addresses:
        scenario(args.nofile, args.per_kind, addresses, args.header_timeout, args.body_timeout)


if __name__ == "__main__":
    main()
