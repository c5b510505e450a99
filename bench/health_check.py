"""
health_check under a burst: 100 concurrent commands (one per control
connection) against a stand-in upstream that answers its models listing in
50 ms.  Prints the wall time from the first command sent to the last answer
received, and the upstream requests made (a probe in flight is shared:
one request per provider for the burst, not one per command).

    .venv/bin/python bench/health_check.py [--commands 100] [--delay 0.05]
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import time
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import serverFromString

from openclaw.service import GatewayService
from openclaw.settings import Settings
from openclaw.testing.upstream import StandInUpstream


class Checker(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.answer.callback(json.loads(payload))


def open_checker(port: int) -> Deferred[Checker]:
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}")
    factory.protocol = Checker
    factory.opened = Deferred()
    reactor.connectTCP("127.0.0.1", port, factory)
    return factory.opened


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@inlineCallbacks
def burst(commands: int, delay: float) -> Any:
    upstream = StandInUpstream(reactor)
    upstream.kimi.delay = upstream.gemini.delay = delay
    upstream.listen(0, "127.0.0.1")
    port = free_port()
    settings = Settings(providers=upstream.provider_settings(), jwt_secret=b"b" * 32)
    endpoint = serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1")
    service = GatewayService(settings, reactor, endpoint, stdout=io.StringIO())
    service.startService()
    token = service.sessions.current.token
    checkers = yield gatherResults([open_checker(port) for _ in range(commands)])
    message = json.dumps({"token": token, "cmd": "health_check"}).encode()
    started = time.perf_counter()
    for checker in checkers:
        checker.answer = Deferred()
        checker.sendMessage(message)
    answers = yield gatherResults([checker.answer for checker in checkers])
    wall = time.perf_counter() - started
    healthy = sum(1 for a in answers if a["ok"] and all(p["ok"] for p in a["result"]["providers"].values()))
    requests = upstream.kimi.requests + upstream.gemini.requests
    for checker in checkers:
        checker.sendClose()
    yield service.stopService()
    yield upstream.stop()
    return {"wall_ms": wall * 1000, "upstream_requests": requests, "healthy_answers": healthy}


@inlineCallbacks
def main(_reactor: Any) -> Any:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=100)
    parser.add_argument("--delay", type=float, default=0.05)
    args = parser.parse_args()
    print(f"health_check: {args.commands} concurrent commands, upstream answers in {args.delay * 1000:.0f} ms")
    print(f"{'wall ms':>9} {'upstream requests':>18} {'healthy answers':>16}")
    result = yield burst(args.commands, args.delay)
    print(f"{result['wall_ms']:>9.1f} {result['upstream_requests']:>18} {result['healthy_answers']:>16}")


if __name__ == "__main__":
    task.react(main)
