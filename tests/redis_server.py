"""
A real C{redis-server} for the cluster tests, on a free loopback port in a
temporary directory, with no persistence (and a L{DelayingProxy} to put in front of it, for a
slow Redis).  Missing binary: the tests fail
with how to install it (C{make test} installs it where it can); they never
skip.
"""

from __future__ import annotations

import random
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.protocols.portforward import ProxyClient, ProxyClientFactory, ProxyFactory, ProxyServer


def ephemeral_ports() -> range:
    """
    The ports the kernel picks a connection's source port (and a C{bind}
    to port 0) from: C{net.ipv4.ip_local_port_range}, Linux's default when
    unreadable.
    """
    try:
        low, high = (int(part) for part in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


# Every port this test process has handed out: a test takes two or more
# (a gateway's control and API ports) before the first server binds, and a
# random pick may otherwise repeat (it did, once in a CI run: the gateway
# then found its API port taken by its own control listener).
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """
    A free loopback port for a server started later (a C{twistd}, a
    C{redis-server}), outside the ephemeral range.  A port taken with
    C{bind(("127.0.0.1", 0))} and released is in that range: until the
    server binds it, any connection on the machine (another test run on
    a shared CI host, the gateways reconnecting to a stopped Redis) can be
    given it as its source port, and the server then fails with address
    already in use.  Outside the range only an explicit bind can take it.
    """
    ephemeral = ephemeral_ports()
    candidates = [port for port in range(20000, 32768) if port not in ephemeral and port not in _HANDED_OUT]
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.add(port)
            return port
    # No room below the ephemeral range (a host that made it start low).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """
    One C{redis-server} process; L{stop} and L{start} again on the same
    port (a restart without persistence comes back empty).  With C{tls}
    (the CA's PEM file, a certificate it signed for C{127.0.0.1} and its
    key), it serves TLS only (C{rediss://}), without client certificates
    unless C{client_certificates} (Redis's C{tls-auth-clients yes}).
    """

    def __init__(self, tls: tuple[Path, Path, Path] | None = None, client_certificates: bool = False) -> None:
        self.tls = tls
        self.client_certificates = client_certificates
        binary = shutil.which("redis-server") or next(
            (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if Path(p).exists()), None
        )
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: run `apt-get install -y redis-server` (as root) "
                "or put redis-server on PATH; make test installs it when it can"
            )
        self.binary = binary
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="openclaw-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        ports = ["--port", str(self.port)]
        if self.tls is not None:
            ca, certificate, key = self.tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-ca-cert-file", str(ca)]
            ports += ["--tls-cert-file", str(certificate), "--tls-key-file", str(key), "--tls-auth-clients"]
            ports.append("yes" if self.client_certificates else "no")
        self.process = subprocess.Popen(
            [
                self.binary,
                *ports,
                "--bind", "127.0.0.1",
                "--dir", self.directory,
                "--save", "",
                "--appendonly", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as plain:
                    s = plain
                    if self.tls is not None:
                        context = ssl.create_default_context(cafile=str(self.tls[0]))
                        if self.client_certificates:
                            # Its own: signed by the CA it trusts.
                            context.load_cert_chain(self.tls[1], self.tls[2])
                        s = context.wrap_socket(plain, server_hostname="127.0.0.1")
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited ({self.process.returncode}) instead of serving on port {self.port}: "
                        f"is the port taken? (ss -ltnp 'sport = :{self.port}')"
                    ) from None
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer PING on port {self.port} within 10 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class _HoldingClient(ProxyClient):
    """
    The proxy's side towards Redis: what Redis sends while the proxy holds
    replies reaches the gateway that much later, in order.
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        self.queue: list[tuple[float, bytes]] = []

    def dataReceived(self, data: bytes) -> None:
        proxy: DelayingProxy = self.peer.factory.proxy
        if self.peer.muted:
            return
        now = reactor.seconds()
        release = now + proxy.delay if now < proxy.hold_until else now
        if self.queue:
            release = max(release, self.queue[-1][0])
        if release <= now:
            super().dataReceived(data)
            return
        self.queue.append((release, data))
        proxy.timers.add(reactor.callLater(release - now, self._flush))

    def _flush(self) -> None:
        if self.peer is None:
            # The gateway's side closed meanwhile: nobody to deliver to.
            self.queue.clear()
            return
        proxy: DelayingProxy = self.peer.factory.proxy
        proxy.timers = {timer for timer in proxy.timers if timer.active()}
        now = reactor.seconds()
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.pop(0)
            if self.peer.transport is not None:
                self.peer.transport.write(data)


class _HoldingClientFactory(ProxyClientFactory):
    protocol = _HoldingClient


class _HoldingServer(ProxyServer):
    clientProtocolFactory = _HoldingClientFactory
    #: Nothing Redis sends reaches the gateway (see L{DelayingProxy.mute_subscribes}).
    muted = False
    #: The gateway asked to subscribe on this connection.
    subscribed = False

    def dataReceived(self, data: bytes) -> None:
        proxy: DelayingProxy = self.factory.proxy
        if b"SUBSCRIBE" in data.upper():
            self.subscribed = True
            proxy.subscribes += 1
            if proxy.mute_subscribes:
                proxy.mute_subscribes -= 1
                self.muted = True
        super().dataReceived(data)

    def connectionMade(self) -> None:
        self.factory.proxy.connections.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        self.factory.proxy.connections.discard(self)
        super().connectionLost(reason)


class DelayingProxy:
    """
    A TCP proxy on a free loopback port in front of a L{RedisServer}, in
    the test's reactor: L{hold} makes what Redis answers in the next
    moments reach the gateway late (a slow network: Redis has done the
    work, its reply is late past REDIS_TIMEOUT_SECONDS).
    """

    def __init__(self, redis: RedisServer) -> None:
        factory = ProxyFactory("127.0.0.1", redis.port)
        factory.protocol = _HoldingServer
        factory.proxy = self
        self.delay = 0.0
        self.hold_until = 0.0
        #: How many of the next connections that subscribe get no answer
        #: from Redis, ever (a subscription never confirmed).
        self.mute_subscribes = 0
        #: Connections that asked to subscribe.
        self.subscribes = 0
        self.timers: set[Any] = set()
        self.connections: set[_HoldingServer] = set()
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port.getHost().port}/0"

    def hold(self, delay: float, window: float) -> None:
        """
        Replies Redis sends in the next C{window} seconds arrive C{delay}
        seconds late.
        """
        self.delay = delay
        self.hold_until = reactor.seconds() + window

    def silence(self) -> None:
        """
        Nothing Redis sends on the connections subscribed so far reaches
        the gateway from now on, and they stay open (a subscription gone
        silent without closing: a NAT or firewall dropping an idle
        connection's traffic).
        """
        for connection in self.connections:
            if connection.subscribed:
                connection.muted = True

    def stop(self) -> Any:
        for timer in self.timers:
            if timer.active():
                timer.cancel()
        for connection in list(self.connections):
            connection.transport.abortConnection()
        return self.port.stopListening()
