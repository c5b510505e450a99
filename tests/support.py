"""
Test support: a real WebSocket client and a real gateway on a free port;
a throw-away certificate authority for TLS stand-ins.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from unittest import SkipTest

import attrs
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, inlineCallbacks
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.ssl import Certificate, CertificateOptions, trustRootFromCertificates
from twisted.python.failure import Failure
from zope.interface import implementer

from openclaw.consumers.model import NewKey
from openclaw.consumers.store import ConsumerStore
from openclaw.providers import GeminiAdapter, KimiAdapter
from openclaw.service import GatewayService
from openclaw.settings import ProviderSettings, Settings, provider_table

SECRET = b"s" * 32

#: The providers the tests written about Kimi and Gemini pin (the stand-in
#: of L{start_upstream} and the settings it gives), whatever else is built
#: in: a built-in provider added later changes none of their expectations
#: (C{FALLBACK=auto}'s order, C{health_check}'s entries, the provider a
#: failing Gemini fails over to).
KIMI_AND_GEMINI = (KimiAdapter, GeminiAdapter)

#: How long L{Client.ask} waits for a command's answer: the slowest command
#: a test sends (a health check, a cluster write bounded by
#: REDIS_TIMEOUT_SECONDS) answers well within it, even on a loaded machine.
ANSWER_SECONDS = 30.0


class WaitedTooLong(AssertionError):
    """
    A test waited longer than its bound for an event (L{within}).
    """


@inlineCallbacks
def sqlite_store_with(testcase: Any, consumer: Any) -> Any:
    """
    A consumers' store on a new SQLite file (migrated, closed at the
    test's end) holding C{consumer} with a new key: fires with the store.
    """
    directory = Path(testcase.mktemp())
    directory.mkdir(parents=True)
    store = ConsumerStore.open(None, directory, reactor)
    testcase.addCleanup(store.close)
    yield store.migrate()
    key = NewKey.make()
    yield store.create(consumer, key.hash, key.prefix)
    return store


def within(waiting: Deferred[Any], seconds: float, what: str) -> Deferred[Any]:
    """
    C{waiting}, failed with L{WaitedTooLong} naming C{what} when it has not
    fired within C{seconds} (it is cancelled then: C{Deferred.addTimeout}).
    """

    def named(failure: Failure) -> Failure:
        failure.trap(DeferredTimeoutError)
        raise WaitedTooLong(f"waited {seconds:g} s for {what}")

    return waiting.addTimeout(seconds, reactor).addErrback(named)


def changed_providers(
    providers: Mapping[str, ProviderSettings], **changes: Mapping[str, Any]
) -> Mapping[str, ProviderSettings]:
    """
    C{providers} with some entries changed, by provider id:
    C{changed_providers(upstream.provider_settings(), kimi={"api_key": None})}.
    """
    return provider_table(
        {provider_id: attrs.evolve(entry, **changes.get(provider_id, {})) for provider_id, entry in providers.items()}
    )


class Client(WebSocketClientProtocol):
    """
    A control-plane client that queues what it receives.
    """

    def __init__(self) -> None:
        super().__init__()
        self.received: DeferredQueue[Any] = DeferredQueue()
        self.opened: Deferred[Client] = Deferred()
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received.put(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"closed before open: {code} {reason}"))
        self.closed.callback((code, reason))

    def send(self, message: Any) -> None:
        payload = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.sendMessage(payload)

    def command(self, token: str | None, cmd: Any, data: Any = None, **extra: Any) -> Deferred[Any]:
        """
        Send one command and fire with the next answer.
        """
        message: dict[str, Any] = {"token": token, "cmd": cmd, **extra}
        if data is not None:
            message["data"] = data
        self.send(message)
        return self.received.get()

    def ask(
        self, token: str | None, cmd: Any, data: Any = None, seconds: float = ANSWER_SECONDS, **extra: Any
    ) -> Deferred[Any]:
        """
        L{command}, failed with L{WaitedTooLong} when no answer comes within
        C{seconds} (a gateway that never answers, a connection that closed).
        """

        def named(failure: Failure) -> Failure:
            failure.trap(DeferredTimeoutError)
            closed = " (the connection closed meanwhile)" if self.closed.called else ""
            raise WaitedTooLong(f"waited {seconds:g} s for the answer to {cmd!r}{closed}")

        return self.command(token, cmd, data, **extra).addTimeout(seconds, reactor).addErrback(named)


class ClientFactory(WebSocketClientFactory):
    """
    Builds one L{Client}; C{done} fires with it once its handshake is over,
    or fails when the connection cannot be made or is refused.
    """

    protocol = Client

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.done: Deferred[Client] = Deferred()

    def buildProtocol(self, addr: Any) -> Client:
        protocol = super().buildProtocol(addr)
        protocol.opened.addBoth(self._settle)
        return protocol

    def _settle(self, result: Any) -> Any:
        if not self.done.called:
            if isinstance(result, Client):
                self.done.callback(result)
            else:
                self.done.errback(result)
        return None

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        if not self.done.called:
            self.done.errback(reason)


def connect(
    port: int,
    host: str = "127.0.0.1",
    bind: str | None = None,
    headers: dict[str, str] | None = None,
    tls: Any = None,
    unix: str | None = None,
) -> Deferred[Client]:
    """
    Open a control connection; fire with the client once the handshake is
    done.  C{bind} picks the client's source address (any of 127.0.0.0/8
    works on loopback), to test the allowlist; C{tls} (client TLS options)
    makes it C{wss://}; C{unix} connects to a UNIX socket instead.
    """
    url_host = f"[{host}]" if ":" in host else host
    url = "ws://localhost" if unix else f"{'wss' if tls else 'ws'}://{url_host}:{port}"
    factory = ClientFactory(url, headers=headers)
    if unix is not None:
        reactor.connectUNIX(unix, factory)
    elif tls is not None:
        reactor.connectSSL(host, port, factory, tls, bindAddress=(bind, 0) if bind else None)
    else:
        reactor.connectTCP(host, port, factory, bindAddress=(bind, 0) if bind else None)
    return factory.done


@implementer(IStreamServerEndpoint)
@attrs.define
class RecordingEndpoint:
    """
    An endpoint that remembers the port it listened on, so a test can learn
    which free port the gateway got.
    """

    wrapped: IStreamServerEndpoint
    port: IListeningPort | None = None

    def listen(self, factory: Factory) -> Deferred[IListeningPort]:
        def record(port: IListeningPort) -> IListeningPort:
            self.port = port
            return port

        return self.wrapped.listen(factory).addCallback(record)


def start_metrics_listener(test: Any, settings: Settings) -> int:
    """
    A second gateway service with C{settings}, whose C{/metrics} is on a
    listener of its own (C{--metrics-listen}) on a free loopback port;
    stopped at the test's cleanup.  The listener's port.
    """
    endpoint = RecordingEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    service = GatewayService(
        settings,
        reactor,
        RecordingEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")),
        stdout=io.StringIO(),
        metrics_endpoint=endpoint,
    )
    service.startService()
    test.addCleanup(service.stopService)
    assert endpoint.port is not None
    return int(endpoint.port.getHost().port)


@attrs.define
class RunningGateway:
    service: GatewayService
    port: int
    stdout: io.StringIO
    #: The OpenAI-compatible API's port, when started with C{api=True}.
    api_port: int | None = None

    @property
    def token(self) -> str:
        return self.service.sessions.current.token


def start_gateway_from(testcase: Any, settings: Settings, **overrides: Any) -> RunningGateway:
    """
    Start a gateway with its API (L{start_gateway}) from C{settings} read
    as the daemon reads them (L{openclaw.settings.load_settings}): its
    providers, default provider, keys, embeddings and prices, with
    C{overrides} on top; its API connections are closed when the test ends.
    """
    gateway = start_gateway(
        testcase,
        api=True,
        **{
            "providers": settings.providers,
            "default_provider": settings.default_provider,
            "gateway_api_keys": settings.gateway_api_keys,
            "embedding_provider": settings.embedding_provider,
            "embedding_model": settings.embedding_model,
            "fallback": settings.fallback,
            "price_overrides": settings.price_overrides,
            **overrides,
        },
    )
    testcase.addCleanup(gateway.service.api_site.close_connections)
    return gateway


@inlineCallbacks
def get_text(api_port: int, path: str) -> Any:
    """
    GET C{path} of the API on C{api_port} (no key, a connection not kept),
    and fire with the answer's text.
    """
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    response = yield HTTPClient(Agent(reactor, pool=pool)).get(f"http://127.0.0.1:{api_port}{path}")
    text = yield response.text("utf-8")
    return text


def openai_client(testcase: Any, api_port: int, key: str, timeout: float = 10) -> Any:
    """
    The official C{openai} SDK's client of the API on C{api_port}, with
    C{key}, no retries and C{timeout} seconds; closed when the test ends.
    Call it in a thread (C{deferToThread}): it blocks.
    """
    import openai
    from twisted.internet.threads import deferToThread

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key=key, max_retries=0, timeout=timeout)
    testcase.addCleanup(deferToThread, client.close)
    return client


def start_gateway(
    testcase: Any,
    interface: str = "127.0.0.1",
    api: bool = False,
    service_options: Mapping[str, Any] | None = None,
    **settings: Any,
) -> RunningGateway:
    """
    Start a gateway on a free port of C{interface} (and its API on another
    when C{api} is true), with L{GatewayService}'s C{service_options} (its
    C{write_file}, say); it is stopped when the test ends.
    """
    settings.setdefault("jwt_secret", SECRET)
    if "state_dir" not in settings:
        settings["state_dir"] = Path(testcase.mktemp())
        settings["state_dir"].mkdir(parents=True)
    settings.setdefault("jwt_secret_is_ephemeral", False)
    config = Settings(**settings)
    endpoint_type = TCP6ServerEndpoint if ":" in interface else TCP4ServerEndpoint
    endpoint = RecordingEndpoint(endpoint_type(reactor, 0, interface=interface))
    api_endpoint = RecordingEndpoint(endpoint_type(reactor, 0, interface=interface)) if api else None
    stdout = io.StringIO()
    service = GatewayService(
        config, reactor, endpoint, stdout=stdout, api_endpoint=api_endpoint, **dict(service_options or {})
    )
    service.startService()
    testcase.addCleanup(service.stopService)
    assert endpoint.port is not None
    api_port = api_endpoint.port.getHost().port if api_endpoint and api_endpoint.port else None
    return RunningGateway(service, endpoint.port.getHost().port, stdout, api_port)


@inlineCallbacks
def open_client(testcase: Any, port: int, **kwargs: Any) -> Any:
    """
    L{connect}, and close the client when the test ends.
    """
    client = yield connect(port, **kwargs)
    testcase.addCleanup(close_client, client)
    return client


def close_client(client: Client) -> Deferred[Any]:
    if client.state == client.STATE_OPEN:
        client.sendClose()
    elif client.transport is not None and not client.closed.called:
        client.transport.loseConnection()
    return client.closed


TOKEN_LINE = re.compile(rb"   Token    : (\S+)\r?\n")


class GatewayProcess(ProcessProtocol):
    """
    A gateway started as an operator would (C{twistd -n openclaw}): C{token}
    fires with the token read from the banner on its stdout, C{ended} with
    the exit status (a negative signal number for a signal).
    """

    def __init__(self) -> None:
        self.stdout = b""
        self.stderr = b""
        self.token: Deferred[str] = Deferred()
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.stdout += data
        found = TOKEN_LINE.search(self.stdout)
        if found and not self.token.called:
            self.token.callback(found.group(1).decode())

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        status = -value.signal if getattr(value, "signal", None) else value.exitCode
        if not self.token.called:
            # twistd -n logs to stdout: its last lines say why it stopped.
            said = self.stderr + self.stdout[-2000:]
            self.token.errback(RuntimeError(f"gateway exited ({status}) before its banner: {said!r}"))
            self.token.addErrback(lambda failure: None)
        self.ended.callback(status)

    def stop(self) -> Deferred[int]:
        if not self.ended.called:
            self.transport.signalProcess("TERM")
        return self.ended


def make_unwritable(testcase: Any, directory: Path) -> None:
    """
    Make C{directory} one this user cannot create files in until the test
    ends: mode 0500, or (as root, whom modes do not stop) immutable with
    C{chattr +i}; skips the test where neither can be done.
    """
    if os.geteuid() != 0:
        directory.chmod(0o500)
        testcase.addCleanup(directory.chmod, 0o700)
    elif subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0:
        testcase.addCleanup(subprocess.run, ["chattr", "-i", str(directory)], check=True)
    else:
        raise SkipTest("root, and chattr cannot make a directory immutable here")


def free_port() -> int:
    """
    A free loopback port outside the ephemeral range (L{tests.redis_server.free_port}).
    """
    from tests.redis_server import free_port as outside_ephemeral_range

    return outside_ephemeral_range()


def twistd_path() -> str:
    """
    The twistd of the environment the tests run in: the one the package
    (and so its plugin) is installed into.
    """
    return str(Path(sys.executable).parent / "twistd")


def spawn_gateway(
    testcase: Any, args: list[str], env: dict[str, str], twistd: str | None = None, twistd_args: Sequence[str] = ()
) -> GatewayProcess:
    """
    C{twistd -n --pidfile= [twistd_args] openclaw [args]} in a directory of
    its own, stopped (SIGTERM) when the test ends.
    """
    twistd = twistd or twistd_path()
    if "--api-port" not in args:
        args = [*args, "--api-port", str(free_port())]
    process = GatewayProcess()
    cwd = Path(testcase.mktemp())
    cwd.mkdir(parents=True)
    argv = [twistd, "-n", "--pidfile=", *twistd_args, "openclaw", *args]
    reactor.spawnProcess(process, twistd, argv, env=env, path=str(cwd))
    testcase.addCleanup(process.stop)
    return process


def start_upstream(testcase: Any, kimi_key: str, gemini_key: str, interface: str = "127.0.0.1") -> Any:
    """
    A stand-in upstream for Kimi and Gemini only (L{KIMI_AND_GEMINI}) on
    a free port of C{interface} (a loopback address), expecting these
    keys; stopped when the test ends.
    Its C{provider_settings()} and C{environment()} configure those two.
    """
    from openclaw.testing.upstream import StandInUpstream

    upstream = StandInUpstream(reactor, providers=KIMI_AND_GEMINI)
    upstream.kimi.key = kimi_key
    upstream.gemini.key = gemini_key
    upstream.listen(0, interface)
    testcase.addCleanup(upstream.stop)
    return upstream


def capture_log_events(testcase: Any) -> list[dict[str, Any]]:
    """
    Every log event emitted until the test ends.
    """
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    testcase.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


@attrs.frozen
class ThrowawayCA:
    """
    A certificate authority made for one test.
    """

    key: Any
    certificate: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def trust_root(self) -> Any:
        return trustRootFromCertificates([Certificate.loadPEM(self.pem)])

    def server_options(self, *names: str) -> CertificateOptions:
        """
        TLS server options with a certificate this CA signed for C{names}
        (host names or IP addresses).
        """
        key, certificate = self._server_certificate(names)
        return CertificateOptions(privateKey=key, certificate=certificate)

    def server_files(self, directory: Path, *names: str) -> tuple[Path, Path]:
        """
        A certificate this CA signed for C{names} and its key, written as
        PEM files in C{directory} (for a server started as a process): the
        certificate's path and the key's.
        """
        key, certificate = self._server_certificate(names)
        certificate_path, key_path = directory / "server.crt", directory / "server.key"
        certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return certificate_path, key_path

    def _server_certificate(self, names: Sequence[str]) -> tuple[Any, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        alternative_names: list[x509.GeneralName] = []
        for name in names:
            try:
                alternative_names.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alternative_names.append(x509.DNSName(name))
        certificate = _sign(names[0], key.public_key(), self.certificate.subject, self.key, ca=False).add_extension(
            x509.SubjectAlternativeName(alternative_names), critical=False
        )
        return key, certificate.sign(self.key, hashes.SHA256())


def _sign(subject: str, public_key: Any, issuer: x509.Name, signer: Any, ca: bool) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )


def make_ca() -> ThrowawayCA:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "openclaw test CA")])
    builder = _sign("openclaw test CA", key.public_key(), name, key, ca=True).add_extension(
        x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )
    return ThrowawayCA(key, builder.sign(key, hashes.SHA256()))


def limited_twistd(testcase: Any, nofile: int) -> str:
    """
    A twistd that runs with its soft C{RLIMIT_NOFILE} at C{nofile}: a
    wrapper script that sets the limit (C{resource.setrlimit}, as a
    C{preexec_fn} would) and execs the environment's twistd, for
    L{spawn_gateway}'s C{twistd}.
    """
    wrapper = Path(testcase.mktemp())
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(
        f"#!{sys.executable}\n"
        "import os, resource, sys\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, hard))\n"
        f"os.execv({twistd_path()!r}, [{twistd_path()!r}, *sys.argv[1:]])\n"
    )
    wrapper.chmod(0o755)
    return str(wrapper.absolute())


def open_many(port: int, count: int, source: str, head: bytes = b"") -> list[socket.socket]:
    """
    C{count} TCP connections from C{source}, each sending C{head} (a
    handshake never finished); those the server refused or dropped are
    left out.
    """
    opened = []
    for _ in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=(source, 0))
            if head:
                sock.sendall(head)
            opened.append(sock)
        except OSError:
            pass
    return opened


def still_open(socks: list[socket.socket], settle: float = 0.5) -> int:
    """
    How many of C{socks} the server has not closed.
    """
    time.sleep(settle)
    held = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            held += sock.recv(1) != b""
        except BlockingIOError:
            held += 1
        except OSError:
            pass
    return held


def exchange(port: int, data: bytes) -> bytes:
    """
    Send C{data} and read until the server closes (or 5 s pass).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return answer


def bare_adapter(adapter: Any, api_key: str | None = "k") -> Any:
    """
    An adapter of class C{adapter} for reading answers (its C{refusal}):
    on a L{Clock}, with no HTTP client (it sends nothing).
    """
    from twisted.internet.task import Clock

    return adapter(
        http=None,
        agent=None,
        reactor=Clock(),
        base_url=adapter.default_base_url,
        api_key=api_key,
        default_model=adapter.default_model_id,
        timeout=1.0,
    )
