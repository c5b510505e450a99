"""
The process's file descriptors are shared out so that no flood starves
the operator or the process: the control listener keeps a share under a
half-open WebSocket flood, and the providers' idle pooled connections
have a share of their own (the API's is what they leave), so no
C{EMFILE}.  L{openclaw.listeners.share_descriptors} alone, then a real
C{twistd} with its file limit at 256, over real sockets.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import attrs
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from openclaw import listeners
from openclaw.settings import Settings
from tests.support import free_port, limited_twistd, open_client, open_many, spawn_gateway, start_upstream, still_open
from tests.test_keyless_connections import GEMINI_KEY, KEY, KIMI_KEY, send_calls, statuses


class ControlDescriptorTests(TestCase):
    """
    A real C{twistd} with its file limit at 256, flooded with half-open
    WebSocket handshakes from one address, keeps descriptors for an
    operator from another.
    """

    timeout = 60

    @inlineCallbacks
    def test_half_open_flood_under_low_limit(self):
        port, api_port = free_port(), free_port()
        process = spawn_limited(self, port, api_port)
        token = yield process.token
        head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        flood = yield deferToThread(open_many, port, 300, "127.0.0.2", head)
        self.addCleanup(lambda: [sock.close() for sock in flood])
        held = yield deferToThread(still_open, flood)
        # 256 descriptors: 64 kept back, a quarter of the rest (48) for the
        # control listener, a quarter of that (12) per address.
        self.assertLessEqual(held, 12)
        self.assertGreater(held, 0)
        client = yield open_client(self, port, bind="127.0.0.1")
        answer = yield client.command(token, "ping")
        self.assertEqual(answer["ok"], True, answer)
        output = process.stdout + process.stderr
        self.assertIn(b"control connections are capped at 48", output)
        self.assertNotIn(b"EMFILE", output)


def spawn_limited(testcase: Any, port: int, api_port: int, **settings: str) -> Any:
    """
    A C{twistd openclaw} on loopback with C{port} and C{api_port}, under a
    limit of 256 descriptors, with C{settings} in its environment.
    """
    env = {
        **os.environ,
        "JWT_SECRET": "r" * 40,
        "GATEWAY_API_KEYS": KEY,
        "LOG_LEVEL": "info",
        "HANDSHAKE_TIMEOUT_SECONDS": "30",
        **settings,
        "PYTHONPATH": "",
    }
    args = ["--port", str(port), "--api-port", str(api_port), "--interface", "127.0.0.1"]
    return spawn_gateway(testcase, args, env, twistd=limited_twistd(testcase, 256))


def healthz(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


class PoolShareTests(SynchronousTestCase):
    """
    The providers' idle pooled connections have a share of the
    descriptors, and the API's is what they leave.
    """

    def test_shares(self) -> None:
        wanted = (4096 + 256, 4096)
        # Two provider hosts at UPSTREAM_POOL_SIZE=128.
        self.assertEqual(attrs.astuple(listeners.share_descriptors(256, *wanted, 2, 128))[1:], (48, 54, 18, 2))
        self.assertEqual(attrs.astuple(listeners.share_descriptors(1024, *wanted, 2, 128))[1:], (224, 252, 84, 2))
        self.assertEqual(attrs.astuple(listeners.share_descriptors(65536, *wanted, 2, 128))[1:], (4352, 4096, 128, 2))
        for limit in (200, 256, 300, 1024, 4096, 20000):
            for hosts in (1, 2, 5):
                shares = listeners.share_descriptors(limit, *wanted, hosts, 128)
                reserve = max(64, limit // 8)
                used = shares.control + 2 * shares.api + shares.pool_per_host * hosts
                self.assertLessEqual(used + reserve, limit, (limit, hosts, shares))

    def test_hosts(self) -> None:
        from openclaw.providers.gemini import GeminiAdapter
        from openclaw.providers.kimi import KimiAdapter
        from openclaw.settings import ProviderSettings, provider_table

        def hosts(*urls: str) -> int:
            adapters = (KimiAdapter, GeminiAdapter)
            table = provider_table(
                ProviderSettings(adapter=adapter, base_url=url, model=adapter.default_model_id)
                for adapter, url in zip(adapters, urls, strict=True)
            )
            return listeners.provider_hosts(Settings(jwt_secret=b"s" * 32, providers=table))

        self.assertEqual(hosts("https://a.example/v1", "https://b.example/v1beta"), 2)
        self.assertEqual(hosts("https://a.example/v1", "https://a.example:443/v1beta"), 1)
        self.assertEqual(hosts("http://127.0.0.1:81/kimi", "http://127.0.0.1:82/gemini"), 2)


class PooledDescriptorTests(TestCase):
    """
    A real C{twistd} at 256 descriptors.  Calls to Kimi from many addresses
    leave their provider connections idle in the pool while as many calls
    to Gemini (another host) are in flight, and outsiders hold their
    control share: the operator still gets in, no C{EMFILE}.
    """

    timeout = 90

    @inlineCallbacks
    def test_idle_pool_within_budget(self):
        kimi_upstream = start_upstream(self, KIMI_KEY, GEMINI_KEY)
        gemini_upstream = start_upstream(self, KIMI_KEY, GEMINI_KEY)
        kimi_upstream.kimi.delay = 2.0
        gemini_upstream.gemini.delay = 8.0
        port, api_port = free_port(), free_port()
        process = spawn_limited(
            self,
            port,
            api_port,
            KIMI_API_KEY=KIMI_KEY,
            GEMINI_API_KEY=GEMINI_KEY,
            KIMI_BASE_URL=kimi_upstream.base_url("kimi"),
            GEMINI_BASE_URL=gemini_upstream.base_url("gemini"),
        )
        token = yield process.token
        head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        outsiders: list[socket.socket] = []
        self.addCleanup(lambda: [sock.close() for sock in outsiders])
        for n in range(2, 7):
            outsiders += yield deferToThread(open_many, port, 60, f"127.0.0.{n}", head)
        sources = [f"127.0.2.{n}" for n in range(1, 73)]
        kimi = yield deferToThread(send_calls, api_port, "kimi/moonshot-v1-8k", sources)
        kimi_statuses = yield deferToThread(statuses, kimi)
        self.assertIn(200, kimi_statuses)
        # Kimi's connections now idle in the pool (UPSTREAM_IDLE_SECONDS
        # is 50); as many calls to Gemini, each on its own provider
        # connection, are in flight.
        gemini = yield deferToThread(send_calls, api_port, "gemini/gemini-2.5-flash", sources)
        self.addCleanup(lambda: [sock.close() for sock in gemini])
        yield deferToThread(time.sleep, 2)
        # The gateway's descriptors now (the wrapper execs twistd: same pid).
        held = len(os.listdir(f"/proc/{process.transport.pid}/fd"))
        # Well within the limit: at least half the reserve (64) still free
        # for the process's own files, whatever the calls did.
        self.assertLessEqual(held, 256 - 32, (held, kimi_statuses.count(200), len(gemini)))
        client = yield open_client(self, port, bind="127.0.0.1")
        answer = yield client.command(token, "ping")
        self.assertEqual(answer["ok"], True, answer)
        gemini_statuses = yield deferToThread(statuses, gemini)
        self.assertIn(200, gemini_statuses)
        self.assertTrue(set(gemini_statuses) <= {0, 200}, gemini_statuses)
        answer = yield deferToThread(healthz, api_port)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:200])
        output = process.stdout + process.stderr
        for line in (b"idle provider connections are capped at 18 per provider host (2 hosts)", b"capped at 54"):
            self.assertTrue(line in output, line)
        for bad in (b"EMFILE", b"Too many open files"):
            self.assertFalse(bad in output, bad)
