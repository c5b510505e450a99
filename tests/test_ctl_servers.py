"""
openclawctl (the installed script) against servers on loopback that are
not the gateway it expects, or not as it expects: a TLS certificate by
another CA or for another name, a plain listener behind wss://, answers
that do not match the command, a head that never ends, redirects and
other HTTP answers, and servers that do not speak HTTP at all.  Each
says what is the matter, and what to do, in one line.

After changing C{openclaw/ctl/}, reinstall (C{pip install .}, or
C{make-overlay.sh}) before running these.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from openclaw import ctl
from openclaw.session import write_token_file
from tests.test_ctl import TOKEN_LIKE, HTTPAnswersFactory, make_certificates, run_ctl


class TLSAdviceTests(TestCase):
    """
    A TLS handshake that fails says why, and what to do about that cause:
    not always C{--cafile}.
    """

    timeout = 20

    @inlineCallbacks
    def listen_tls(self, names: list[x509.GeneralName] | None = None) -> Any:
        """
        A TLS listener with a certificate for C{names} signed by a CA of
        its own (C{self.signer}, its PEM file) that says nothing.
        """
        self.signer, options = make_certificates(Path(self.mktemp()), names, ca_name="openclaw signing CA")
        endpoint = SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1")
        port = yield endpoint.listen(Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @inlineCallbacks
    def test_cafile_of_another_ca(self) -> Any:
        """
        --cafile given, and the server's certificate signed by another CA:
        the file named, and the CA that did sign it, not "pass --cafile".
        """
        port = yield self.listen_tls()
        other, _ = make_certificates(Path(self.mktemp()), ca_name="another CA")
        url = f"wss://127.0.0.1:{port}"
        out, err, code = yield run_ctl("--url", url, "--token", "T", "--cafile", str(other), "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertEqual(
            err,
            f"openclawctl: error: TLS handshake with {url} failed: certificate verify failed: the CA file {other} "
            "did not sign the server's certificate (it was issued by CN=openclaw signing CA); pass --cafile the "
            "certificate of the CA that did\n",
        )
        # The right CA: the handshake passes (and the silent server times out).
        out, err, code = yield run_ctl(
            "--url", url, "--token", "T", "--cafile", str(self.signer), "--timeout", "0.5", "ping"
        )
        self.assertIn("no answer from", err)

    @inlineCallbacks
    def test_host_not_named(self) -> Any:
        """
        A certificate for another name than the URL's host: the names it
        holds and the URL to use, not service_identity's repr nor
        --cafile; with or without --cafile, with its own CA or another.
        """
        port = yield self.listen_tls([x509.DNSName("other.example")])
        url = f"wss://127.0.0.1:{port}/control"
        other, _ = make_certificates(Path(self.mktemp()), ca_name="another CA")
        expected = (
            f"openclawctl: error: TLS handshake with {url} failed: the server's certificate does not name "
            f"127.0.0.1, it names other.example; connect by that name (--url wss://other.example:{port}/control, "
            "where that name reaches this server), or give the server a certificate that names 127.0.0.1\n"
        )
        for cafile in ([], ["--cafile", str(self.signer)], ["--cafile", str(other)]):
            out, err, code = yield run_ctl("--url", url, "--token", "T", *cafile, "ping")
            self.assertEqual((out, err, code), ("", expected, 2), cafile)

    @inlineCallbacks
    def test_host_not_named_among_several(self) -> Any:
        """
        Several names, a wildcard among them: each shown, and a URL
        suggested with the first that can be connected to.
        """
        port = yield self.listen_tls(
            [x509.DNSName("*.gw.example"), x509.DNSName("gw\x1b.example"), x509.DNSName("gw.example")]
        )
        url = f"wss://localhost:{port}"
        out, err, code = yield run_ctl("--url", url, "--token", "T", "--cafile", str(self.signer), "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertEqual(
            err,
            f"openclawctl: error: TLS handshake with {url} failed: the server's certificate does not name "
            "localhost, it names *.gw.example, gw\\x1b.example, gw.example; connect by one of them (--url "
            f"wss://gw.example:{port}, where that name reaches this server), or give the server a certificate "
            "that names localhost\n",
        )

    @inlineCallbacks
    def test_names_that_cannot_be_checked(self) -> Any:
        """
        A certificate, by a trusted CA, whose only name is a wildcard
        service_identity cannot use (C{*.example}): Twisted logs that and
        lets the handshake through; openclawctl checks the name again
        before it sends the token, and refuses the server, in one line.
        """
        self.signer, options = make_certificates(Path(self.mktemp()), [x509.DNSName("*.example")])
        factory = CannedAnswerFactory({"ok": True, "cmd": "ping", "result": {"pong": True}})
        port = yield SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        url = f"wss://127.0.0.1:{port.getHost().port}"
        out, err, code = yield run_ctl("--url", url, "--token", TOKEN_LIKE, "--cafile", str(self.signer), "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertEqual(
            err,
            f"openclawctl: error: TLS handshake with {url} failed: the server's certificate cannot be checked for "
            "127.0.0.1: Certificate's DNS-ID b'*.example' has too few host components for wildcard usage; give the "
            "server a certificate whose subjectAltName names are valid, one of them this host; nothing was sent\n",
        )
        self.assertEqual(factory.asked, [])

    @inlineCallbacks
    def test_wss_to_a_plain_http_listener(self) -> Any:
        """
        wss:// to a plain HTTP listener that answers the TLS handshake in
        HTTP (nginx's plain listener: a 400): OpenSSL's "wrong version
        number", and the question whether the listener is TLS.
        """
        factory = HTTPAnswersFactory(
            [b"HTTP/1.1 400 Bad Request\r\nServer: nginx\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"]
        )
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        url = f"wss://127.0.0.1:{port.getHost().port}"
        out, err, code = yield run_ctl("--url", url, "--token", "T", "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertEqual(
            err,
            f"openclawctl: error: TLS handshake with {url} failed: wrong version number: the server did not "
            "answer in TLS; is the control listener TLS? (a plain listener takes ws://)\n",
        )


class CannedAnswer(WebSocketServerProtocol):
    """
    A WebSocket server that answers every message with its factory's
    C{answer}, whatever was asked.
    """

    factory: CannedAnswerFactory

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.asked.append(json.loads(payload))
        self.sendMessage(json.dumps(self.factory.answer).encode())


class CannedAnswerFactory(WebSocketServerFactory):
    protocol = CannedAnswer

    def __init__(self, answer: dict[str, Any]) -> None:
        super().__init__()
        self.answer = answer
        self.asked: list[dict[str, Any]] = []


class AnswerMatchTests(TestCase):
    """
    An answer that does not answer the command asked (another "cmd", a
    ping's result without its pong, a new token that is no token) is an
    error, exit status 2 as for any answer that is not the gateway's;
    nothing of it is written to --token-file.
    """

    timeout = 20

    @inlineCallbacks
    def listen(self, answer: dict[str, Any]) -> Any:
        factory = CannedAnswerFactory(answer)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return f"ws://127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def test_rotation_to_what_is_no_token(self) -> Any:
        """
        A rotate_token answer whose "token" is no JWT (terminal control
        characters): refused, the token file left as it was.
        """
        url = yield self.listen(
            {"ok": True, "cmd": "rotate_token", "result": {"token": "\x1b[2J", "jti": "\x1b", "expires": "\n"}}
        )
        token_file = Path(self.mktemp())
        token_file.parent.mkdir(parents=True, exist_ok=True)
        write_token_file(token_file, TOKEN_LIKE)
        for json_option in ([], ["--json"]):
            out, err, code = yield run_ctl("--url", url, "--token-file", str(token_file), *json_option, "rotate-token")
            self.assertEqual((out, code), ("", 2), err)
            self.assertEqual(
                err,
                f'openclawctl: error: {url} did not answer like an OpenClaw gateway: its new "token" is not a token '
                f"(three base64url segments, as a JWT): '\\x1b[2J'; nothing was written to {token_file}\n",
            )
            self.assertEqual(token_file.read_text(), TOKEN_LIKE + "\n")
        # Given by --token, printed rather than written: refused all the same.
        out, err, code = yield run_ctl("--url", url, "--token", TOKEN_LIKE, "rotate-token")
        self.assertEqual((out, code), ("", 2), err)
        self.assertIn("is not a token", err)
        self.assertNotIn("nothing was written", err)

    @inlineCallbacks
    def test_ping_answered_for_another_command(self) -> Any:
        url = yield self.listen(
            {"ok": True, "cmd": "rotate_token", "result": {"token": TOKEN_LIKE, "jti": "j", "expires": "e"}}
        )
        out, err, code = yield run_ctl("--url", url, "--token", "T", "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertEqual(
            err,
            f"openclawctl: error: {url} did not answer like an OpenClaw gateway: the answer is to 'rotate_token', "
            "not to 'ping' (its \"cmd\")\n",
        )
        # A refusal to another command, too; one without a "cmd" (the
        # gateway's to a message it could not read) is a refusal.
        url = yield self.listen({"ok": False, "cmd": "status", "error": "invalid token"})
        out, err, code = yield run_ctl("--url", url, "--token", "T", "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertIn("the answer is to 'status', not to 'ping'", err)
        url = yield self.listen({"ok": False, "cmd": None, "error": "message is not valid JSON"})
        out, err, code = yield run_ctl("--url", url, "--token", "T", "ping")
        self.assertEqual((out, err, code), ("", "openclawctl: ping failed: message is not valid JSON\n", 1))

    @inlineCallbacks
    def test_ping_without_pong(self) -> Any:
        url = yield self.listen({"ok": True, "cmd": "ping", "result": {}})
        out, err, code = yield run_ctl("--url", url, "--token", "T", "ping")
        self.assertEqual((out, code), ("", 2))
        self.assertEqual(
            err,
            f"openclawctl: error: {url} did not answer like an OpenClaw gateway: the answer to ping does not say "
            '"pong": true: {}\n',
        )
        url = yield self.listen({"ok": True, "cmd": "ping", "result": {"pong": True, "ts": 1}})
        out, err, code = yield run_ctl("--url", url, "--token", "T", "ping")
        self.assertEqual((err, code), ("", 0))
        self.assertTrue(out.startswith("pong ("), out)


class EndlessHead(Protocol):
    """
    Answers the handshake with a status line, then a 4,000-byte header
    every millisecond for as long as the connection lasts.
    """

    def dataReceived(self, data: bytes) -> None:
        if self.transport is None or hasattr(self, "sending"):
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\n")
        self.sending = LoopingCall(self.transport.write, b"X-Endless: " + b"v" * 4000 + b"\r\n")
        self.sending.start(0.001)

    def connectionLost(self, reason: Failure) -> None:
        if hasattr(self, "sending"):
            self.sending.stop()


class EndlessHeadTests(TestCase):
    timeout = 20

    @inlineCallbacks
    def test_head_that_does_not_end(self) -> Any:
        """
        A server sending headers for ever: openclawctl stops reading once
        the head passes MAX_HEAD_BYTES, and says the head was too large,
        at once rather than at its timeout (at full CPU until then).
        """
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(EndlessHead))
        self.addCleanup(port.stopListening)
        url = f"ws://127.0.0.1:{port.getHost().port}"
        started = time.monotonic()
        out, err, code = yield run_ctl("--url", url, "--token", "T", "--timeout", "8", "ping")
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual((out, code), ("", 2))
        self.assertEqual(
            err,
            f"openclawctl: error: {url} answered the WebSocket handshake with a head too large: its status line "
            f"and headers passed {ctl.MAX_HEAD_BYTES // 1024} KiB, and openclawctl stopped reading (an OpenClaw "
            "gateway's is some 200 bytes: check the URL): HTTP/1.1 200 OK\n",
        )


class Banner(Protocol):
    """
    Says its factory's C{banner} on connecting, then nothing, and never
    hangs up: an SSH server waiting for the client's banner.
    """

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.factory.banner)  # type: ignore[attr-defined]


class HTTPAnswerTests(TestCase):
    """
    The server answered the handshake in HTTP with what says more than
    its reason phrase (a success, a redirect, a 404), or not in HTTP at
    all: each said as what it is, in one line.
    """

    timeout = 20

    @inlineCallbacks
    def listen(self, *answers: bytes) -> Any:
        self.answers = HTTPAnswersFactory(list(answers))
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.answers)
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        return f"ws://127.0.0.1:{self.port}"

    @inlineCallbacks
    def ping(self, url: str) -> Any:
        """
        C{openclawctl --url URL ping}: its stderr, after checking it
        printed nothing else, in one line, with exit status 2.
        """
        out, err, code = yield run_ctl("--url", url, "--token", "T", "ping")
        self.assertEqual((out, code), ("", 2), err)
        self.assertEqual(err.count("\n"), 1, err)
        return err.removeprefix("openclawctl: error: ").removesuffix("\n")

    @inlineCallbacks
    def test_reason_in_utf8(self) -> Any:
        """
        A reason phrase in UTF-8 is shown as such, not read as Latin-1
        (as Autobahn reads it: "fÃ¼r"), its C1 and format characters
        escaped all the same.
        """
        url = yield self.listen(
            "HTTP/1.1 403 Zugriff für diese Adresse gesperrt — à bientôt\r\n\r\n".encode(),
            "HTTP/1.1 403 Forbidden \u009b2J x\u202eevil\r\n\r\n".encode(),
        )
        said = yield self.ping(url)
        self.assertEqual(
            said, f"{url} refused the WebSocket handshake with HTTP 403: Zugriff für diese Adresse gesperrt — à bientôt"
        )
        said = yield self.ping(url)
        self.assertEqual(said, f"{url} refused the WebSocket handshake with HTTP 403: Forbidden \\x9b2J x\\u202eevil")

    @inlineCallbacks
    def test_success_is_no_websocket_server(self) -> Any:
        url = yield self.listen(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 18\r\n\r\n<html>hello</html>",
            b"HTTP/1.0 200 OK\r\n\r\n",
        )
        expected = (
            f"{url} answered the WebSocket handshake with HTTP 200 (OK), not 101 Switching Protocols: it is not a "
            "WebSocket server; check the URL's host, port and path (openclawctl talks to the gateway's control "
            "plane: WS_CONTROL_PORT, default 18789)"
        )
        for _ in range(2):
            said = yield self.ping(url)
            self.assertEqual(said, expected)

    @inlineCallbacks
    def test_redirect(self) -> Any:
        """
        A redirect: where to, escaped and capped, and the URL to use (an
        http:// location as ws://; a path joined to the URL); none when
        the location is no URL to use as it is.  nginx's 301 for a
        location given without its trailing slash, first.
        """
        url = yield self.listen()
        self.answers.answers.extend(
            [
                b"HTTP/1.1 301 Moved Permanently\r\nServer: nginx\r\nContent-Type: text/html\r\n"
                b"Location: http://127.0.0.1:%d/openclaw/\r\nConnection: close\r\n\r\n<html></html>" % self.port,
                b"HTTP/1.1 308 Permanent Redirect\r\nLocation: /control\r\n\r\n",
                b"HTTP/1.1 302 Found\r\nLocation: https://gateway.example/openclaw/\r\n\r\n",
                b"HTTP/1.1 301 Moved Permanently\r\nLocation: ws://evil.example/\x1b[2J\r\n\r\n",
                b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /" + b"a" * 5000 + b"\r\n\r\n",
            ]
        )
        said = yield self.ping(f"{url}/openclaw")
        self.assertEqual(
            said,
            f"{url}/openclaw answered the WebSocket handshake with HTTP 301 (Moved Permanently), a redirect to "
            f"http://127.0.0.1:{self.port}/openclaw/, which openclawctl does not follow: use --url {url}/openclaw/",
        )
        said = yield self.ping(f"{url}/openclaw/")
        self.assertEqual(
            said,
            f"{url}/openclaw/ answered the WebSocket handshake with HTTP 308 (Permanent Redirect), a redirect to "
            f"/control, which openclawctl does not follow: use --url {url}/control",
        )
        said = yield self.ping(url)
        self.assertEqual(
            said,
            f"{url} answered the WebSocket handshake with HTTP 302 (Found), a redirect to "
            "https://gateway.example/openclaw/, which openclawctl does not follow: use --url "
            "wss://gateway.example/openclaw/ (another host: only if you trust it with the token)",
        )
        said = yield self.ping(url)
        self.assertEqual(
            said,
            f"{url} answered the WebSocket handshake with HTTP 301 (Moved Permanently), a redirect to "
            "ws://evil.example/\\x1b[2J, which openclawctl does not follow; check the URL",
        )
        said = yield self.ping(url)
        self.assertEqual(
            said,
            f"{url} answered the WebSocket handshake with HTTP 307 (Temporary Redirect), a redirect to /"
            + "a" * (ctl.LOCATION_SHOWN - 1)
            + "…, which openclawctl does not follow; check the URL",
        )

    @inlineCallbacks
    def test_not_found(self) -> Any:
        """
        A 404 is blamed on the gateway's API port only when it is the
        API's JSON error; any other says the path was not found there.
        """
        url = yield self.listen(
            b"HTTP/1.1 404 Not Found\r\nServer: nginx\r\nContent-Type: text/html\r\nContent-Length: 20\r\n\r\n"
            b"<html>404</html>\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n\r\n"
            b'{"error":{"message":"no such endpoint: /","type":"invalid_request_error","param":null,'
            b'"code":"unknown_url"}}',
        )
        said = yield self.ping(f"{url}/openclaw")
        self.assertEqual(
            said,
            f"{url}/openclaw answered the WebSocket handshake with HTTP 404 (Not Found): the path /openclaw was not "
            "found there; check the URL's path (behind a proxy, the location that leads to the gateway's control "
            "plane) and port",
        )
        said = yield self.ping(url)
        self.assertEqual(
            said,
            f"{url} answered the WebSocket handshake with HTTP 404: is that the gateway's API port (API_PORT)? "
            "openclawctl talks to the control plane, on WS_CONTROL_PORT (default 18789)",
        )

    @inlineCallbacks
    def test_not_http(self) -> Any:
        """
        An SSH banner, an HTTP/2 server's SETTINGS frame, terminal
        controls: not HTTP, said so with their first bytes (escaped), not
        asked whether the listener is TLS.
        """
        url = yield self.listen(
            b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
            b"\x00\x00\x12\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64\x00\x04\x00\x01\x00\x00\x00\x05\x00\x00",
            b"\x1b[2J\x1b]0;owned\x07garbage\r\n\r\n",
        )
        tail = (
            ": the server does not speak HTTP or WebSocket; check the URL's port (the gateway's control plane: "
            "WS_CONTROL_PORT, default 18789)"
        )
        for first in (
            "SSH-2.0-OpenSSH_9.2p1 Debian-2",
            "\\x00\\x00\\x12\\x04\\x00\\x00\\x00\\x00\\x00\\x00\\x03\\x00\\x00\\x00d\\x00\\x04\\x00\\x01\\x00\\x00"
            "\\x00\\x05\\x00\\x00",
            "\\x1b[2J\\x1b]0;owned\\x07garbage",
        ):
            said = yield self.ping(url)
            self.assertEqual(said, f"{url} answered the WebSocket handshake with what is not HTTP ({first}){tail}")

    @inlineCallbacks
    def test_not_http_and_silent(self) -> Any:
        """
        A server that says something other than HTTP and waits (sshd for
        the client's banner): said at once, not after --timeout.
        """
        factory = Factory.forProtocol(Banner)
        factory.banner = b"SSH-2.0-OpenSSH_9.2p1\r\n"  # type: ignore[attr-defined]
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        url = f"ws://127.0.0.1:{port.getHost().port}"
        started = time.monotonic()
        out, err, code = yield run_ctl("--url", url, "--token", "T", "--timeout", "8", "ping")
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual((out, code), ("", 2))
        self.assertIn("answered the WebSocket handshake with what is not HTTP (SSH-2.0-OpenSSH_9.2p1)", err)
