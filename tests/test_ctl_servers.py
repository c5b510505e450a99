"""
openclawctl (the installed script) against servers on loopback that are
not the gateway it expects, or not as it expects: a TLS certificate by
another CA or for another name, a plain listener behind wss://, answers
that do not match the command, a head that never ends, redirects and
other HTTP answers, and servers that do not speak HTTP at all.  Each
says what is the matter, and what to do, in one line.

After changing C{openclaw/ctl.py}, reinstall (C{pip install .}, or
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
