"""
What a second attacker review of issue #17's fixes found, each as a kind,
over real sockets and a real C{twistd} where it is about descriptors: idle
pooled provider connections within the descriptor budget, authentication
timeouts counted by the lockout, newcomers not taken for keyless ones,
symlinks owned by another user, and WebSocket versions other than 13.
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from openclaw import listeners
from openclaw.service import GatewayService
from openclaw.settings import ConfigError, Settings, check_private_file, load_settings
from tests.support import (
    RecordingEndpoint,
    capture_log_events,
    free_port,
    limited_twistd,
    open_client,
    open_many,
    spawn_gateway,
    start_gateway,
    start_upstream,
    still_open,
)

KEY = "gw-key-0123456789abcdef"
KIMI_KEY = "sk-kimi-SECRET-0123456789abcdef"
GEMINI_KEY = "AIza-gemini-SECRET-0123456789abcdef"


def chat_request(model: str) -> bytes:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (KEY.encode(), len(body), body)
    )


def send_calls(port: int, model: str, sources: list[str], pace: float = 0.01) -> list[socket.socket]:
    """
    One chat call from each of C{sources}, sent whole, not read; the
    sockets the gateway accepted (and did not close at once).
    """
    sent = []
    for source in sources:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
            sock.sendall(chat_request(model))
            sent.append(sock)
            # Paced, so that each head is read before the next connection.
            time.sleep(pace)
        except OSError:
            pass
    return sent


def statuses(socks: list[socket.socket]) -> list[int]:
    """
    Each answer's status (0: closed or reset without one), read to the end.
    """
    found = []
    for sock in socks:
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
        sock.close()
        found.append(int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") else 0)
    return found


def healthz(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


class PoolShareTests(SynchronousTestCase):
    """
    Item 1: the providers' idle pooled connections have a share of the
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
    Item 1: a real C{twistd} at 256 descriptors.  Calls to Kimi from many
    addresses leave their provider connections idle in the pool while as
    many calls to Gemini (another host) are in flight, and outsiders hold
    their control share: the operator still gets in, no C{EMFILE}.
    """

    timeout = 90

    @inlineCallbacks
    def test_idle_pool_within_budget(self):
        kimi_upstream = start_upstream(self, KIMI_KEY, GEMINI_KEY)
        gemini_upstream = start_upstream(self, KIMI_KEY, GEMINI_KEY)
        kimi_upstream.kimi.delay = 2.0
        gemini_upstream.gemini.delay = 8.0
        port, api_port = free_port(), free_port()
        env = {
            **os.environ,
            "JWT_SECRET": "r" * 40,
            "GATEWAY_API_KEYS": KEY,
            "LOG_LEVEL": "info",
            "HANDSHAKE_TIMEOUT_SECONDS": "30",
            "KIMI_API_KEY": KIMI_KEY,
            "GEMINI_API_KEY": GEMINI_KEY,
            "KIMI_BASE_URL": kimi_upstream.base_url("kimi"),
            "GEMINI_BASE_URL": gemini_upstream.base_url("gemini"),
            "PYTHONPATH": "",
        }
        args = ["--port", str(port), "--api-port", str(api_port), "--interface", "127.0.0.1"]
        process = spawn_gateway(self, args, env, twistd=limited_twistd(self, 256))
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


LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


class AuthTimeoutLockoutTests(TestCase):
    """
    Item 2: a connection closed at AUTH_TIMEOUT_SECONDS is a failed
    authentication for the lockout, so a client that opens handshakes and
    never sends cannot keep reconnecting for ever; an operator on the
    control plane's UNIX socket is never locked out with loopback.
    """

    timeout = 30

    @inlineCallbacks
    def test_timeouts_lock_out(self):
        events = capture_log_events(self)
        state_dir = Path(self.mktemp())
        state_dir.mkdir(parents=True)
        short = Path(tempfile.mkdtemp(prefix="oc"))  # AF_UNIX paths are short
        self.addCleanup(shutil.rmtree, short, True)
        path = short / "control.sock"
        settings = Settings(
            jwt_secret=b"s" * 32,
            jwt_secret_is_ephemeral=False,
            state_dir=state_dir,
            auth_timeout_seconds=0.5,
            auth_lockout_failures=3,
            trusted_clients=LOOPBACK,
        )
        tcp = RecordingEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
        service = GatewayService(settings, reactor, tcp, stdout=io.StringIO())
        service.startService()
        self.addCleanup(service.stopService)
        unix = UNIXServerEndpoint(reactor, str(path), mode=0o600)
        listening = yield unix.listen(service.factory)
        self.addCleanup(listening.stopListening)
        assert tcp.port is not None
        port = tcp.port.getHost().port
        token = service.sessions.current.token
        for _ in range(3):
            idle = yield open_client(self, port, bind="127.0.0.2")
            code, reason = yield idle.closed
            self.assertEqual((code, reason), (1008, "no authenticated message within AUTH_TIMEOUT_SECONDS"))
        with self.assertRaises(ConnectionError) as refused:
            yield open_client(self, port, bind="127.0.0.2")
        self.assertIn("429", str(refused.exception))
        (locked,) = [event for event in events if event.get("reason") == "auth_lockout"]
        self.assertEqual(locked["client"], "127.0.0.2")
        # Every local user shares loopback: lock it out, and the operator
        # on the UNIX socket (mode 600) still gets in.
        for _ in range(3):
            idle = yield open_client(self, port, bind="127.0.0.1")
            yield idle.closed
        with self.assertRaises(ConnectionError):
            yield open_client(self, port, bind="127.0.0.1")
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        operator = yield open_client(self, 0, unix=str(path))
        answer = yield operator.command(token, "ping")
        self.assertEqual(answer["ok"], True, answer)


def connect_all(port: int, sources: list[str]) -> list[socket.socket | None]:
    """
    One connection from each of C{sources}, nothing sent (None: refused).
    """
    opened: list[socket.socket | None] = []
    for source in sources:
        try:
            opened.append(socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)))
        except OSError:
            opened.append(None)
    return opened


def call_on(socks: list[socket.socket | None], model: str) -> list[int]:
    """
    A chat call with the key on each of C{socks} (sent on all, then read);
    each answer's status, 0 for a connection reset or closed before it.
    """
    sent = []
    for sock in socks:
        try:
            if sock is None:
                raise OSError
            sock.sendall(chat_request(model))
            sent.append(sock)
        except OSError:
            sent.append(None)
    return [0 if sock is None else statuses([sock])[0] for sock in sent]


class KeyHolderNewcomerTests(TestCase):
    """
    Item 3: a new connection is not keyless until it had its chance to
    send its first head (L{KEYLESS_GRACE_SECONDS}), so key holders' new
    connections are never closed to make room for anyone, while keyless
    ones still hold at most half the cap.
    """

    timeout = 60

    def gateway(self) -> Any:
        upstream = start_upstream(self, KIMI_KEY, GEMINI_KEY)
        upstream.kimi.delay = 0.2
        gateway = start_gateway(
            self, api=True, gateway_api_keys=(KEY,), providers=upstream.provider_settings(), api_max_connections=72
        )
        self.addCleanup(gateway.service.api_site.close_connections)
        site = gateway.service.api_site
        # As at nofile 256 before the pool's share: half of 72 for keyless ones.
        self.assertEqual((site.max_connections_per_address, site.keyless_per_address), (18, 4))
        return gateway

    @inlineCallbacks
    def test_burst_of_key_holders(self):
        """
        72 key holders from 72 addresses call at once (each sends its
        call as soon as it is connected; the gateway accepts them in
        batches, before it reads their heads): none is taken for keyless
        and closed (15 to 36 were).
        """
        gateway = self.gateway()
        sources = [f"127.0.3.{n}" for n in range(1, 73)]
        socks = yield deferToThread(send_calls, gateway.api_port, "kimi/moonshot-v1-8k", sources, 0)
        found = yield deferToThread(statuses, socks)
        found += [0] * (72 - len(socks))
        self.assertEqual(found, [200] * 72, (found, gateway.service.api_site.context.refused_connections))
        self.assertEqual(gateway.service.api_site.context.refused_connections, {})

    @inlineCallbacks
    def test_outsiders_and_key_holders(self):
        """
        100 outsider addresses with 4 idle connections each, reopening
        those the gateway closed between the key holders' connects and
        their first heads; 200 connections of a key holder from one
        address, 18 at a time: every call is answered, and the outsiders'
        keyless connections hold at most half the cap.
        """
        gateway = self.gateway()
        port = gateway.api_port
        site = gateway.service.api_site
        outsiders = [f"127.0.4.{n}" for n in range(1, 101) for _ in range(4)]
        held: list[socket.socket | None] = yield deferToThread(connect_all, port, outsiders)
        self.addCleanup(lambda: [sock.close() for sock in held if sock is not None])
        yield deferToThread(time.sleep, 1.5)
        self.assertLessEqual(site.keyless_total, 36)

        def reopen() -> None:
            # The outsiders reopen what was closed (up to 36 at a time).
            reopened = 0
            for index, sock in enumerate(held):
                if reopened == 36:
                    break
                if sock is None or still_open([sock], 0) == 0:
                    if sock is not None:
                        sock.close()
                    (held[index],) = connect_all(port, [outsiders[index]])
                    reopened += 1

        def key_holder() -> list[int]:
            found: list[int] = []
            while len(found) < 200:
                socks = connect_all(port, ["127.0.0.50"] * 18)
                reopen()
                found += call_on(socks, "kimi/moonshot-v1-8k")
            return found

        found = yield deferToThread(key_holder)
        self.assertEqual(found.count(200), len(found), found)
        self.assertLessEqual(site.keyless_total, 36)


class ForeignSymlinkTests(SynchronousTestCase):
    """
    Item 4: a secret file reached through a symbolic link that another
    user owns (in a sticky directory, where the directory check lets it
    be) is refused, as C{fs.protected_symlinks} refuses to follow it.
    """

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("needs root, to give a link to another user (os.lchown)")
        self.sticky = Path(self.mktemp()).absolute()
        self.sticky.mkdir(parents=True)
        self.sticky.chmod(0o1777)
        self.secret = self.sticky / "jwt_secret"
        self.secret.write_text("x" * 40 + "\n")
        self.secret.chmod(0o600)

    def link(self, name: str, target: Path | str, uid: int) -> Path:
        link = self.sticky / name
        link.symlink_to(target)
        os.lchown(link, uid, uid)
        return link

    def test_foreign_link_refused(self) -> None:
        # /tmp/r17-secret-link -> /etc/passwd, made by uid 65534.
        link = self.link("r17-secret-link", "/etc/passwd", 65534)
        with self.assertRaises(ConfigError) as caught:
            check_private_file(link, f"JWT_SECRET_FILE={str(link)!r}", secret=True)
        message = str(caught.exception)
        self.assertIn(str(link), message)
        self.assertIn("uid 65534", message)
        # Through a directory link of another user, too.
        folder = self.link("dir-link", self.sticky, 65534)
        with self.assertRaises(ConfigError) as caught:
            check_private_file(folder / "jwt_secret", "JWT_SECRET_FILE", secret=True)
        self.assertIn(str(folder), str(caught.exception))

    def test_own_and_roots_links_accepted(self) -> None:
        for name, uid in (("mine", os.geteuid()), ("roots", 0)):
            link = self.link(name, self.secret, uid)
            self.assertIsNone(check_private_file(link, "JWT_SECRET_FILE", secret=True))
        chain = self.link("chain", self.sticky / "mine", 0)
        self.assertIsNone(check_private_file(chain, "JWT_SECRET_FILE", secret=True))
        environ = {"JWT_SECRET_FILE": str(self.link("foreign", self.secret, 65534))}
        self.patch(os, "environ", environ)
        with self.assertRaises(ConfigError):
            load_settings(cwd=self.sticky)


class WebSocketVersionTests(TestCase):
    """
    Item 5: only RFC 6455 (version 13) handshakes are accepted: a draft
    version 8 one, whose origin is in C{Sec-WebSocket-Origin}, got 101.
    """

    timeout = 20

    @inlineCallbacks
    def test_only_version_13(self):
        gateway = start_gateway(self)

        def handshake(version: int, origin: str | None) -> bytes:
            head = (
                "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}\r\n"
            )
            if origin is not None:
                head += f"Sec-WebSocket-Origin: {origin}\r\n"
            with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
                sock.sendall((head + "\r\n").encode())
                return sock.recv(65536)

        for origin in ("http://evil", None):
            answer = yield deferToThread(handshake, 8, origin)
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:200])
            self.assertIn(b"Sec-WebSocket-Version: 13", answer)
        answer = yield deferToThread(handshake, 13, None)
        self.assertTrue(answer.startswith(b"HTTP/1.1 101 "), answer[:200])
