"""
A WebSocket fuzzer for the control plane, on raw sockets.

Each round opens a connection, completes the handshake, sends a burst of
random frames (valid and invalid UTF-8, fragments, reserved opcodes and
bits, unmasked frames, huge length headers, oversized control frames,
binary, random JSON, raw garbage) and reads everything the gateway sends
back until it closes or goes quiet.  An outcome is a failure when an answer
is not a well-formed C{{"ok": ...}} object, or the close code is not one the
gateway documents.

Blocking code: run it in a thread or a separate process, never on the
reactor thread of the gateway it attacks.

    python -m tests.wsfuzz --port 18789 --token T --rounds 1000
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import socket
import struct
from collections import Counter
from collections.abc import Callable

import attrs

#: Close codes the gateway may answer bad input with.
DOCUMENTED_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009})


def frame(
    opcode: int, payload: bytes, fin: bool = True, mask: bool = True, rsv: int = 0, length: int | None = None
) -> bytes:
    """
    One frame as a client sends it; C{length} may lie about the payload.
    """
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    if n < 126:
        header = struct.pack("!BB", first, (0x80 if mask else 0) | n)
    elif n < 65536:
        header = struct.pack("!BBH", first, (0x80 if mask else 0) | 126, n)
    else:
        header = struct.pack("!BBQ", first, (0x80 if mask else 0) | 127, n)
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _random_json(rng: random.Random, token: str) -> bytes:
    cmd = rng.choice(["ping", "status", "switch_provider", "health_check", "nope", 7, None, ["ping"]])
    message: object = {
        "token": rng.choice([token, token[:-1] + "x", "", None, 5, "eyJhbGciOiJub25lIn0.e30."]),
        "cmd": cmd,
    }
    if rng.random() < 0.5:
        message["data"] = rng.choice(  # type: ignore[index]
            [{"provider": "kimi"}, {"provider": 1}, {"provider": "gemini", "model": ""}, [], "x", {"zz": 1}, None]
        )
    if rng.random() < 0.1:
        message = rng.choice([[], 1, "ping", None])
    return json.dumps(message).encode()


def _random_frames(rng: random.Random, token: str) -> list[bytes]:
    """
    A burst of one to twelve frames, mostly hostile.
    """
    burst = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.randrange(12)
        if kind <= 2:
            burst.append(frame(0x1, _random_json(rng, token)))
        elif kind == 3:
            burst.append(frame(0x1, rng.choice([b"\xff\xfe", b"\xc3\x28", b"ok\xed\xa0\x80"])))
        elif kind == 4:
            text = _random_json(rng, token)
            cut = rng.randint(0, len(text))
            burst.append(frame(0x1, text[:cut], fin=False))
            if rng.random() < 0.3:
                burst.append(frame(0x9, b"mid-message ping"))
            burst.append(frame(0x0, text[cut:], fin=rng.random() < 0.8))
        elif kind == 5:
            burst.append(frame(0x0, b"continuation with nothing to continue"))
        elif kind == 6:
            burst.append(frame(rng.choice([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]), rng.randbytes(rng.randint(0, 20))))
        elif kind == 7:
            burst.append(frame(0x1, b'{"cmd":"ping"}', rsv=rng.randint(1, 7)))
        elif kind == 8:
            burst.append(frame(0x1, b'{"cmd":"ping"}', mask=False))
        elif kind == 9:
            burst.append(frame(rng.choice([0x1, 0x2]), b"", length=rng.choice([2**63 - 1, 2**40, 10**7])))
        elif kind == 10:
            burst.append(frame(rng.choice([0x9, 0xA, 0x8]), rng.randbytes(rng.choice([126, 200, 1]))))
        else:
            burst.append(rng.choice([frame(0x2, rng.randbytes(rng.randint(0, 64))), rng.randbytes(rng.randint(1, 64))]))
    return burst


def handshake(host: str, port: int, timeout: float | None) -> tuple[socket.socket, bytes]:
    """
    A client's opening handshake on a new socket; the socket, and whatever
    the server sent after its 101 answer.
    """
    sock = socket.create_connection((host, port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        response += chunk
    if not response.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(response.split(b"\r\n", 1)[0].decode(errors="replace"))
    return sock, response.split(b"\r\n\r\n", 1)[1]


def server_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """
    The complete (unmasked) server frames at the front of C{data}, as
    C{(opcode, payload)}, and the bytes left over.
    """
    frames = []
    while len(data) >= 2:
        opcode, n = data[0] & 0x0F, data[1] & 0x7F
        start = 2
        if n == 126:
            if len(data) < 4:
                break
            n, start = struct.unpack_from("!H", data, 2)[0], 4
        elif n == 127:
            if len(data) < 10:
                break
            n, start = struct.unpack_from("!Q", data, 2)[0], 10
        if len(data) < start + n:
            break
        frames.append((opcode, data[start : start + n]))
        data = data[start + n :]
    return frames, data


@attrs.define
class FuzzReport:
    """
    What a fuzz run tried and found.
    """

    rounds: int = 0
    frames_sent: int = 0
    answers: int = 0
    close_codes: Counter[int | None] = attrs.Factory(Counter)
    failures: list[str] = attrs.Factory(list)

    def summary(self) -> str:
        codes = ", ".join(f"{code}: {count}" for code, count in sorted(self.close_codes.items(), key=str))
        return (
            f"{self.rounds} connections, {self.frames_sent} frames sent, {self.answers} answers, "
            f"close codes {{{codes}}}, {len(self.failures)} failures"
        )


def fuzz(
    host: str,
    port: int,
    token: str,
    rounds: int,
    seed: int = 0,
    timeout: float = 3.0,
    should_stop: Callable[[], bool] = lambda: False,
) -> FuzzReport:
    """
    Run C{rounds} fuzz connections against a gateway; reproducible by
    C{seed}.
    """
    rng = random.Random(seed)
    report = FuzzReport()
    for _ in range(rounds):
        if should_stop():
            break
        report.rounds += 1
        burst = _random_frames(rng, token)
        report.frames_sent += len(burst)
        sock, leftover = handshake(host, port, timeout)
        try:
            try:
                sock.sendall(b"".join(burst) + frame(0x8, struct.pack("!H", 1000)))
            except OSError:
                pass  # the gateway closed mid-burst: its close frame tells why
            _read_outcome(sock, leftover, report, timeout)
        finally:
            sock.close()
    return report


#: Enough bytes to complete any frame a gateway would wait for (one whose
#: header claims up to 65,535 bytes: longer claims beyond the message limit
#: are refused at once); the zeros after it are unmasked frames, a protocol
#: error.
_FILLER = b"\x00" * 70_000


def _read_outcome(sock: socket.socket, data: bytes, report: FuzzReport, timeout: float) -> None:
    sock.settimeout(timeout)
    code: int | None = None
    nudged = False
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            if not nudged:
                # Random bytes can make a well-formed frame header claiming
                # more payload than was sent (the close frame included):
                # the gateway is right to wait for it.  Send the rest.
                nudged = True
                try:
                    sock.sendall(_FILLER)
                except OSError:
                    pass
                continue
            report.failures.append("the gateway went quiet without closing")
            break
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            break
        frames, data = server_frames(data + chunk)
        for opcode, payload in frames:
            if opcode == 0x1:
                report.answers += 1
                try:
                    answer = json.loads(payload)
                    assert isinstance(answer, dict) and isinstance(answer["ok"], bool)
                except Exception:
                    report.failures.append(f"malformed answer {payload[:80]!r}")
            elif opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
    report.close_codes[code] += 1
    if code is not None and code != 1005 and code not in DOCUMENTED_CLOSE_CODES:
        report.failures.append(f"undocumented close code {code}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(fuzz(args.host, args.port, args.token, args.rounds, args.seed).summary())


if __name__ == "__main__":
    main()
