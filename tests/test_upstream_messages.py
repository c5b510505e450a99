"""
What a client of the data plane is told when a provider cannot be
reached, and what the operator's log line and health check keep: the
provider's address (its base URL's C{host:port}, often an internal
proxy's) and the setting to fix are the operator's, never in a client's
error (trial s36).  Real sockets on loopback.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from openclaw.dataplane.errors import amended, for_operator, upstream_failed
from openclaw.providers.errors import Explained, Scrubber, named_addresses
from tests.support import capture_log_events, changed_providers, free_port
from tests.test_dataplane import HELLO, DataPlaneTestCase


class DetailTests(TestCase):
    """
    L{APIError.detail}, the operator's words: in the log line, never in
    the client's document, kept through a message's amendments.
    """

    def test_left_out_of_the_document(self):
        error = upstream_failed("kimi", Explained("could not be reached", "refused by 10.0.0.7:8443"))
        self.assertEqual(error.message, "kimi: could not be reached")
        self.assertEqual(for_operator(error), "kimi: refused by 10.0.0.7:8443")
        self.assertEqual(error.document()["error"]["message"], "kimi: could not be reached")  # type: ignore[index]
        self.assertNotIn(b"10.0.0.7", error.body())

    def test_same_words(self):
        """
        Words that are the same for both leave no detail.
        """
        error = upstream_failed("kimi", Explained("the stream ended", "the stream ended"))
        self.assertIsNone(error.detail)
        self.assertEqual(for_operator(error), "kimi: the stream ended")
        self.assertIsNone(upstream_failed("kimi", "odd").detail)

    def test_amended(self):
        """
        An amendment (a failover's note) goes to the message and the
        detail alike; an error without detail gets none.
        """
        error = upstream_failed("kimi", Explained("unreachable", "refused by 10.0.0.7:1"))
        told = amended(error, lambda text: f"{text} (not failed over to acme: it is failing)")
        self.assertEqual(told.message, "kimi: unreachable (not failed over to acme: it is failing)")
        self.assertEqual(told.detail, "kimi: refused by 10.0.0.7:1 (not failed over to acme: it is failing)")
        self.assertIsNone(amended(upstream_failed("kimi", "odd"), str.upper).detail)


class _Gateways(DataPlaneTestCase):
    """
    Gateways in front of providers at addresses of the test's, and the
    request lines they log.
    """

    def setUp(self) -> None:
        super().setUp()
        self.lines = capture_log_events(self)

    def kimi_at(self, url: str, **settings: Any) -> Any:
        """
        A gateway whose kimi is at C{url}, failover off, kimi the default.
        """
        settings.setdefault("fallback", "off")
        return self.gateway(
            providers=changed_providers(self.upstream.provider_settings(), kimi={"base_url": url}),
            default_provider="kimi",
            **settings,
        )

    def logged(self, status: int) -> str:
        """
        The error message of the one request line logged with C{status}.
        """
        [line] = [e for e in self.lines if e.get("status") == status and "error_message" in e]
        message: str = line["error_message"]
        return message

    def assertNoAddress(self, message: str, *addresses: str) -> None:
        for address in addresses:
            self.assertNotIn(address, message)
        self.assertNotIn("BASE_URL", message)


class ClientMessageTests(_Gateways):
    @inlineCallbacks
    def test_connection_refused(self):
        """
        A provider that refuses the connection: the client is told kimi
        could not be reached and why, and to try again later, not the
        provider's address nor the setting; the request's log line keeps
        both.  Streamed or not; the type and code as before.
        """
        port = free_port()
        gateway = self.kimi_at(f"http://127.0.0.1:{port}/v1")
        for stream in (False, True):
            del self.lines[:]
            response, text = yield self.post(gateway, {"messages": HELLO, "stream": stream})
            self.assertEqual(response.code, 502, text)
            error = self.assertOpenAIError(text, "upstream_unreachable")
            self.assertEqual(error["type"], "upstream_error")
            self.assertEqual(
                error["message"],
                "kimi: the provider could not be reached (connection refused); try again later, and tell the "
                "gateway's operator if it lasts",
            )
            self.assertNoAddress(text, f":{port}", "127.0.0.1")
            logged = self.logged(502)
            self.assertIn(f"connection refused by 127.0.0.1:{port}; is KIMI_BASE_URL right and the service up?", logged)
        # The health check, the operator's, keeps them too.
        result = yield gateway.service.providers.get("kimi").probe()
        self.assertIn(f"connection refused by 127.0.0.1:{port}; is KIMI_BASE_URL right", result.error)

    @inlineCallbacks
    def test_failover_both_unreachable(self):
        """
        Both providers unreachable: the client's message tells both
        failures, neither address; the log line has both.
        """
        kimi, gemini = free_port(), free_port()
        providers = changed_providers(
            self.upstream.provider_settings(),
            kimi={"base_url": f"http://127.0.0.1:{kimi}/v1"},
            gemini={"base_url": f"http://127.0.0.1:{gemini}/v1beta"},
        )
        gateway = self.gateway(providers=providers, default_provider="kimi", fallback="auto")
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 502, text)
        error = self.assertOpenAIError(text, "upstream_unreachable")
        self.assertIn("kimi: the provider could not be reached (connection refused)", error["message"])
        self.assertIn("failed over to gemini: gemini: the provider could not be reached", error["message"])
        self.assertNoAddress(text, f":{kimi}", f":{gemini}", "127.0.0.1")
        logged = self.logged(502)
        self.assertIn(f"connection refused by 127.0.0.1:{kimi}; is KIMI_BASE_URL right", logged)
        self.assertIn(f"connection refused by 127.0.0.1:{gemini}; is GEMINI_BASE_URL right", logged)

    @inlineCallbacks
    def test_models_listing_unreachable(self):
        """
        A models listing no provider answered: the same words, no address.
        """
        kimi, gemini = free_port(), free_port()
        providers = changed_providers(
            self.upstream.provider_settings(),
            kimi={"base_url": f"http://127.0.0.1:{kimi}/v1"},
            gemini={"base_url": f"http://127.0.0.1:{gemini}/v1beta"},
        )
        gateway = self.gateway(providers=providers, default_provider="kimi")
        response = yield self.http().get(
            f"http://127.0.0.1:{gateway.api_port}/v1/models",
            headers={"Authorization": ["Bearer gw-key-0123456789abcdef"]},
        )
        text = yield response.text("utf-8")
        self.assertEqual(response.code, 502, text)
        error = self.assertOpenAIError(text, "upstream_unreachable")
        self.assertIn("the provider could not be reached (connection refused)", error["message"])
        self.assertNoAddress(text, f":{kimi}", f":{gemini}", "127.0.0.1")

    @inlineCallbacks
    def test_certificate_refused(self):
        """
        A provider whose certificate is for another host: the client is
        told the TLS handshake failed, not the address, nor the names in
        the certificate; the log line has them and what to set.
        """
        port, ca = yield self.tls_provider("api.internal.test")
        gateway = self.kimi_at(f"https://127.0.0.1:{port}/v1", upstream_ca_pem=ca.pem)
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 502, text)
        error = self.assertOpenAIError(text, "upstream_unreachable")
        self.assertIn("kimi: the provider could not be reached securely (the TLS handshake with it failed)", text)
        self.assertNoAddress(error["message"], f":{port}", "127.0.0.1", "api.internal.test")
        logged = self.logged(502)
        self.assertIn(f"TLS handshake with 127.0.0.1:{port} failed (the certificate is not valid for 127.0.0.1", logged)
        self.assertIn("api.internal.test", logged)
        self.assertIn("set KIMI_BASE_URL to a host name the certificate holds", logged)

    @inlineCallbacks
    def test_handshake_never_answered(self):
        """
        A provider's port that takes the connection and never answers in
        TLS (a tarpit, a middlebox dropping TLS): the call fails over at
        once UPSTREAM_CONNECT_TIMEOUT passed, the client's answer the
        other provider's; failover off, a 502 that says the handshake did
        not finish, no address; the log line has it and what to check.
        Before: the call hung until UPSTREAM_TIMEOUT, then a 504 that
        asked to raise it.
        """
        silent = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
        self.addCleanup(silent.stopListening)
        port = silent.getHost().port
        url = f"https://127.0.0.1:{port}/v1"
        gateway = self.kimi_at(url, upstream_connect_timeout=0.5, upstream_timeout=30, fallback="auto")
        started = reactor.seconds()
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 200, text)
        self.assertEqual(response.headers.getRawHeaders("x-openclaw-provider"), ["gemini"])
        self.assertLess(reactor.seconds() - started, 5)
        gateway = self.kimi_at(url, upstream_connect_timeout=0.5, upstream_timeout=30)
        del self.lines[:]
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 502, text)
        error = self.assertOpenAIError(text, "upstream_unreachable")
        self.assertEqual(
            error["message"],
            "kimi: the provider could not be reached (the TLS handshake with it did not finish in time); try again "
            "later, and tell the gateway's operator if it lasts",
        )
        self.assertNoAddress(text, f":{port}", "127.0.0.1", "UPSTREAM")
        self.assertIn(
            f"TLS handshake with 127.0.0.1:{port}: the TLS handshake did not finish within 0.5 s "
            "(UPSTREAM_CONNECT_TIMEOUT); is KIMI_BASE_URL an https service",
            self.logged(502),
        )

    @inlineCallbacks
    def test_cut_before_answering(self):
        """
        A provider that closes the connection without answering: said so,
        without its address.
        """

        class Hangup(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.loseConnection()

        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Hangup))
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        gateway = self.kimi_at(f"http://127.0.0.1:{port}/v1")
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 502, text)
        error = self.assertOpenAIError(text)
        self.assertIn("the provider closed the connection before answering", error["message"])
        self.assertNoAddress(text, f":{port}", "127.0.0.1")
        self.assertIn(f"connection closed by 127.0.0.1:{port} before answering", self.logged(502))

    @inlineCallbacks
    def test_stream_cut_mid_answer(self):
        """
        A stream cut mid-answer: its error event names no address.
        """
        self.upstream.kimi.mode, self.upstream.kimi.cut_after = "cut", 2
        gateway = self.gateway(default_provider="kimi")
        response, text = yield self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO, "stream": True})
        self.assertEqual(response.code, 200)
        events = [e for e in text.split("\n\n") if e]
        error = self.assertOpenAIError(events[-1][len("data: ") :], "upstream_stream_broken")
        self.assertIn("the stream broke mid-answer: the provider closed the connection mid-response", error["message"])
        self.assertNoAddress(text, "127.0.0.1")

    @inlineCallbacks
    def test_embeddings_unreachable(self):
        """
        An embeddings call to a provider that refuses the connection: the
        client's words, no address; the log line has it.
        """
        port = free_port()
        providers = changed_providers(
            self.upstream.provider_settings(), gemini={"base_url": f"http://127.0.0.1:{port}/v1beta"}
        )
        gateway = self.gateway(providers=providers, fallback="off")
        response, text = yield self.post(
            gateway, {"model": "gemini/gemini-embedding-001", "input": "hi"}, path="/v1/embeddings"
        )
        self.assertEqual(response.code, 502, text)
        error = self.assertOpenAIError(text, "upstream_unreachable")
        self.assertIn("gemini: the provider could not be reached (connection refused)", error["message"])
        self.assertNoAddress(text, f":{port}", "127.0.0.1")
        self.assertIn(f"connection refused by 127.0.0.1:{port}; is GEMINI_BASE_URL right", self.logged(502))


class SelfNaming(Resource):
    """
    A provider (or a proxy on its way) that answers every request 500 with
    an error naming its own address, as Envoy's "upstream connect error"
    and many proxies' pages do, in a shape both providers' errors share.
    """

    isLeaf = True

    def render(self, request: Any) -> bytes:
        port = request.getHost().port
        request.setResponseCode(500)
        request.setHeader(b"Content-Type", b"application/json")
        message = f"upstream connect error: http://127.0.0.1:{port}/v1 refused (backend 127.0.0.1:{port})"
        return json.dumps({"error": {"code": 500, "message": message, "status": "INTERNAL"}}).encode()


class QuotedAddressTests(_Gateways):
    """
    A provider's own error text that names the provider's address: the
    client gets it without the address (Scrubber.quoted), the request's
    log line with it (trial s37).
    """

    @inlineCallbacks
    def setUp(self) -> None:
        super().setUp()
        site = Site(SelfNaming())
        site.log = lambda request: None  # type: ignore[method-assign]
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port

    @inlineCallbacks
    def test_chat(self):
        gateway = self.kimi_at(f"http://127.0.0.1:{self.port}/v1")
        for stream in (False, True):
            del self.lines[:]
            response, text = yield self.post(gateway, {"messages": HELLO, "stream": stream})
            self.assertEqual(response.code, 502, text)
            error = self.assertOpenAIError(text, "upstream_http_error")
            self.assertIn("upstream connect error: [redacted]/v1 refused (backend [redacted])", error["message"])
            self.assertNotIn(str(self.port), text)
            self.assertIn(f"upstream connect error: http://127.0.0.1:{self.port}/v1 refused", self.logged(502))

    @inlineCallbacks
    def test_models_listing(self):
        gateway = self.kimi_at(f"http://127.0.0.1:{self.port}/v1")
        response = yield self.http().get(
            f"http://127.0.0.1:{gateway.api_port}/v1/models",
            headers={"Authorization": ["Bearer gw-key-0123456789abcdef"]},
        )
        text = yield response.text("utf-8")
        self.assertEqual(response.code, 502, text)
        self.assertIn("(backend [redacted])", self.assertOpenAIError(text)["message"])
        self.assertNotIn(str(self.port), text)

    @inlineCallbacks
    def test_embeddings(self):
        providers = changed_providers(
            self.upstream.provider_settings(), gemini={"base_url": f"http://127.0.0.1:{self.port}/v1beta"}
        )
        gateway = self.gateway(providers=providers, fallback="off")
        response, text = yield self.post(
            gateway, {"model": "gemini/gemini-embedding-001", "input": "hi"}, path="/v1/embeddings"
        )
        self.assertEqual(response.code, 502, text)
        self.assertIn("(backend [redacted])", self.assertOpenAIError(text)["message"])
        self.assertNotIn(str(self.port), text)

    def test_named_addresses(self):
        self.assertEqual(
            named_addresses("https://proxy.internal/v1"),
            ("https://proxy.internal:443", "proxy.internal:443", "https://proxy.internal", "proxy.internal"),
        )
        self.assertEqual(
            named_addresses("http://[::1]:8000/v1"),
            ("http://[::1]:8000", "[::1]:8000", "http://[::1]", "[::1]", "::1"),
        )
        # A one-label host alone is also a word ("proxy error"): not looked for.
        self.assertEqual(named_addresses("http://proxy/v1"), ("http://proxy:80", "proxy:80", "http://proxy"))
        scrubber = Scrubber(("k" * 20,), named_addresses("https://proxy.internal/v1"))
        self.assertEqual(
            scrubber.quoted(b"see https://proxy.internal/v1 and proxy.internal:443 with kkkkkkkkkkkkkkkkkkkk"),
            b"see [redacted]/v1 and [redacted] with [redacted]",
        )
        # In any case (RFC 3986: scheme and host are case-insensitive), with
        # JSON-escaped slashes, the host alone; not inside a longer address.
        scrubber = Scrubber((), named_addresses("http://10.0.0.7:8443/v1"))
        self.assertEqual(
            scrubber.quoted(b'{"message": "HTTP://10.0.0.7:8443/v1 or http:\\/\\/10.0.0.7:8443\\/v1: 10.0.0.7 down."}'),
            b'{"message": "[redacted]/v1 or [redacted]\\/v1: [redacted] down."}',
        )
        self.assertEqual(scrubber.quoted(b"110.0.0.75, 10.0.0.75, 10.0.0.7.5"), b"110.0.0.75, 10.0.0.75, 10.0.0.7.5")
        # Percent-encoded (quoted from a query string), in any case; next
        # to a "_" or a percent-encoded delimiter.
        self.assertEqual(
            scrubber.quoted(
                b"redirect_uri=http%3A%2F%2F10.0.0.7%3A8443%2Fv1 or http%3a%2f%2f10.0.0.7%3a8443, "
                b"10.0.0.7%3A8443, %2F10.0.0.7%2F, key_10.0.0.7_8443"
            ),
            b"redirect_uri=[redacted]%2Fv1 or [redacted], [redacted], %2F[redacted]%2F, key_[redacted]_8443",
        )
        self.assertEqual(scrubber.quoted(b"10.0.0.7%3A84430, 10.0.0.70"), b"[redacted]%3A84430, 10.0.0.70")
        # A percent-encoded digit is part of the address (%31 is "1": 110.0.0.7).
        self.assertEqual(scrubber.quoted(b"%3110.0.0.7"), b"%3110.0.0.7")
        # An IPv6 address bracketed or not, percent-encoded too; not inside a longer one.
        scrubber = Scrubber((), named_addresses("http://[::1]:8000/v1"))
        self.assertEqual(
            scrubber.quoted(
                b"Failed to connect to ::1 port 8000; [::1]:8000, %5B%3A%3A1%5D%3A8000; fe80::1, ::10, fe80:::1, ::1:2"
            ),
            b"Failed to connect to [redacted] port 8000; [redacted], [redacted]; fe80::1, ::10, fe80:::1, ::1:2",
        )
        # Answers keep them (data): a model may name a host.
        self.assertEqual(scrubber.data(b"https://proxy.internal/v1"), b"https://proxy.internal/v1")
