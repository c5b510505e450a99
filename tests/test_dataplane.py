"""
The data plane as an application sees it: the official openai SDK (and raw
HTTP where the exact bytes matter) against a gateway in this process, in
front of the stand-in upstream, all on 127.0.0.1.

The SDK is synchronous, so each call runs in a thread
(C{deferToThread}) while the reactor keeps serving the gateway.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import resource
import socket
import time
from typing import Any

import openai
from prometheus_client import generate_latest
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ResponseNeverReceived,
)
from twisted.web.resource import Resource
from twisted.web.server import Site

from openclaw.logs import KEYLESS_FIELD, KEYLESS_REFUSAL_INTERVAL_SECONDS, KEYLESS_REFUSAL_LINES, make_observer
from openclaw.routing import Route
from openclaw.testing import upstream as standin
from tests.support import (
    RunningGateway,
    capture_log_events,
    changed_providers,
    exchange,
    free_port,
    make_ca,
    open_client,
    start_gateway,
    start_upstream,
)

GATEWAY_KEY = "gw-key-0123456789abcdef"
OTHER_GATEWAY_KEY = "gw-key-second-0123456789"
KIMI_KEY = "sk-kimi-SECRET-0123456789abcdef"
GEMINI_KEY = "AIza-gemini-SECRET-0123456789abcdef"

HELLO = [{"role": "user", "content": "Say hello."}]


@inlineCallbacks
def upstream_let_go(upstream: standin.StandInUpstream, seconds: float = 2.0) -> Any:
    """
    Wait (up to C{seconds}) until the stand-in holds no request open: the
    gateway drops an upstream connection at once, but the stand-in, in this
    same reactor, may see it a turn after the client has its answer.
    """
    deadline = time.monotonic() + seconds
    while upstream.open_requests.requests and time.monotonic() < deadline:
        yield deferLater(reactor, 0.01)


#: An assistant turn with one tool call, and its answer.
CALL_A = {
    "role": "assistant",
    "content": None,
    "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
}
ANSWER_A = {"role": "tool", "tool_call_id": "a", "content": "42"}
#: A data URL whose data is not base64.
BAD_DATA = "data:image/png;base64,!!!"


class DataPlaneTestCase(TestCase):
    """
    A stand-in upstream, and helpers for a gateway in front of it with
    clients that are closed when the test ends.
    """

    timeout = 20

    def setUp(self) -> None:
        self.upstream = start_upstream(self, KIMI_KEY, GEMINI_KEY)
        self.events = capture_log_events(self)

    def gateway(self, **settings: Any) -> RunningGateway:
        fields = {
            "providers": self.upstream.provider_settings(),
            "gateway_api_keys": (GATEWAY_KEY, OTHER_GATEWAY_KEY),
            **settings,
        }
        gateway = start_gateway(self, api=True, **fields)
        # Runs before the service stops (cleanups run last-added first):
        # keep-alive connections of the clients would leave the reactor dirty.
        self.addCleanup(gateway.service.api_site.close_connections)
        return gateway

    def sdk(self, gateway: RunningGateway, key: str = GATEWAY_KEY) -> openai.OpenAI:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{gateway.api_port}/v1", api_key=key, max_retries=0, timeout=10
        )
        self.addCleanup(deferToThread, client.close)
        return client

    def http(self) -> HTTPClient:
        """
        A raw HTTP client, for asserting on status lines, headers and bytes.
        """
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        return HTTPClient(Agent(reactor, pool=pool))

    @inlineCallbacks
    def post(
        self, gateway: RunningGateway, body: Any, key: str | None = GATEWAY_KEY, path: str = "/v1/chat/completions"
    ) -> Any:
        """
        POST C{body} (JSON unless bytes); fire with C{(response, text)}.
        """
        headers = {"Content-Type": ["application/json"]}
        if key is not None:
            headers["Authorization"] = [f"Bearer {key}"]
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = yield self.http().post(f"http://127.0.0.1:{gateway.api_port}{path}", data=data, headers=headers)
        text = yield response.text("utf-8")
        return response, text

    def assertOpenAIError(self, text: str, code: str | None = None) -> dict[str, Any]:
        document = json.loads(text)
        self.assertEqual(set(document), {"error"})
        error = document["error"]
        self.assertEqual(set(error) - {"param"}, {"message", "type", "code"})
        self.assertIsInstance(error["message"], str)
        self.assertTrue(error["message"])
        if code is not None:
            self.assertEqual(error["code"], code)
        return error

    @inlineCallbacks
    def tls_provider(self, *names: str) -> Any:
        """
        An https stand-in on 127.0.0.1 (a certificate for C{names} from a
        CA of the test's own) that answers any request 200; its port and CA.
        """
        ca = make_ca()
        endpoint = SSL4ServerEndpoint(reactor, 0, ca.server_options(*names), interface="127.0.0.1")
        resource = Resource()
        resource.isLeaf = True  # type: ignore[misc]
        resource.render = lambda request: b"{}"  # type: ignore[method-assign]
        site = Site(resource)
        site.log = lambda request: None  # type: ignore[method-assign]
        port = yield endpoint.listen(site)
        self.addCleanup(port.stopListening)
        return port.getHost().port, ca


class ChatTests(DataPlaneTestCase):
    """
    Answers from both providers through the SDK, whole and streamed.
    """

    @inlineCallbacks
    def test_answers_asked_uncompressed(self):
        """
        Chat and embeddings calls ask for answers without a content coding
        (C{Accept-Encoding: identity}): with none said, any coding is
        acceptable (RFC 9110 section 12.5.3), and a gzipped answer (a
        proxy's) was unreadable, failed over as the provider's fault
        (trial s25).
        """
        gateway = self.gateway()
        client = self.sdk(gateway)
        for model in ("kimi/moonshot-v1-8k", "gemini/gemini-2.5-flash"):
            yield deferToThread(client.chat.completions.create, model=model, messages=HELLO)
            chunks = yield deferToThread(client.chat.completions.create, model=model, messages=HELLO, stream=True)
            yield deferToThread(list, chunks)
        yield deferToThread(client.embeddings.create, model="gemini/gemini-embedding-001", input="hi")
        self.assertEqual(self.upstream.kimi.accept_encodings, ["identity"] * 2)
        self.assertEqual(self.upstream.gemini.accept_encodings, ["identity"] * 3)

    @inlineCallbacks
    def test_gemini_completion(self):
        gateway = self.gateway()
        client = self.sdk(gateway)
        raw = yield deferToThread(
            client.chat.completions.with_raw_response.create,
            model="gpt-4o",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": "No emoji."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": [{"type": "text", "text": "Again"}]},
            ],
            temperature=0.5,
            top_p=0.9,
            max_tokens=64,
            stop=["END"],
        )
        self.assertEqual(raw.headers["x-openclaw-provider"], "gemini")
        completion = raw.parse()
        self.assertEqual(completion.object, "chat.completion")
        self.assertEqual(completion.model, "gemini-flash-latest")
        self.assertEqual(completion.choices[0].message.content, "Hello from the stand-in.")
        self.assertEqual(completion.choices[0].message.role, "assistant")
        self.assertEqual(completion.choices[0].finish_reason, "stop")
        self.assertEqual(completion.usage.prompt_tokens, 10)
        self.assertEqual(completion.usage.completion_tokens, 4)
        self.assertEqual(completion.usage.total_tokens, 14)
        self.assertEqual(
            self.upstream.gemini.last_body,
            {
                "contents": [
                    {"role": "user", "parts": [{"text": "Hi"}]},
                    {"role": "model", "parts": [{"text": "Hello!"}]},
                    {"role": "user", "parts": [{"text": "Again"}]},
                ],
                "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "No emoji."}]},
                "generationConfig": {
                    "temperature": 0.5,
                    "topP": 0.9,
                    "maxOutputTokens": 64,
                    "stopSequences": ["END"],
                },
            },
        )
        # The key travels in x-goog-api-key, never in the URL.
        self.assertEqual(self.upstream.gemini.uris, ["/gemini/v1beta/models/gemini-flash-latest:generateContent"])

    @inlineCallbacks
    def test_kimi_completion(self):
        gateway = self.gateway(default_provider="kimi")
        client = self.sdk(gateway)
        raw = yield deferToThread(
            client.chat.completions.with_raw_response.create,
            model="gpt-4o",
            messages=[{"role": "developer", "content": "Be brief."}, *HELLO],
            temperature=0.2,
        )
        self.assertEqual(raw.headers["x-openclaw-provider"], "kimi")
        completion = raw.parse()
        self.assertEqual(completion.model, "moonshot-v1-8k")
        self.assertEqual(completion.choices[0].message.content, "Hello from the stand-in.")
        # Passed through with the model substituted, developer as system.
        self.assertEqual(
            self.upstream.kimi.last_body,
            {
                "model": "moonshot-v1-8k",
                "messages": [{"role": "system", "content": "Be brief."}, *HELLO],
                "temperature": 0.2,
            },
        )

    @inlineCallbacks
    def test_streams(self):
        """
        Both providers stream chunk by chunk, ending with [DONE] (which the
        SDK consumes), usage last when asked for.
        """
        gateway = self.gateway()
        client = self.sdk(gateway)

        def consume(model: str) -> list[Any]:
            stream = client.chat.completions.create(
                model=model, messages=HELLO, stream=True, stream_options={"include_usage": True}
            )
            return list(stream)

        for model, served in (("gemini/gemini-2.5-pro", "gemini-2.5-pro"), ("kimi/moonshot-v1-32k", "moonshot-v1-32k")):
            chunks = yield deferToThread(consume, model)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            self.assertEqual(text, "Hello from the stand-in.", model)
            self.assertEqual({c.model for c in chunks}, {served})
            self.assertEqual({c.object for c in chunks}, {"chat.completion.chunk"})
            self.assertEqual(len({c.id for c in chunks}), 1)
            self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
            finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            self.assertEqual(finishes, ["stop"])
            self.assertEqual(chunks[-1].choices, [])
            self.assertEqual(chunks[-1].usage.total_tokens, 14)
        self.assertEqual(
            self.upstream.gemini.uris, ["/gemini/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse"]
        )
        self.assertIs(self.upstream.kimi.last_body["stream"], True)

    @inlineCallbacks
    def test_raw_stream(self):
        """
        The exact wire format: text/event-stream, one data line per event,
        [DONE] last.
        """
        gateway = self.gateway()
        response, text = yield self.post(gateway, {"messages": HELLO, "stream": True})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        self.assertEqual(response.headers.getRawHeaders("x-openclaw-provider"), ["gemini"])
        events = text.split("\n\n")
        self.assertEqual(events[-2:], ["data: [DONE]", ""])
        for event in events[:-2]:
            self.assertTrue(event.startswith("data: {"), event)
            self.assertEqual(json.loads(event[len("data: ") :])["object"], "chat.completion.chunk")
        # Small event writes go out at once: no Nagle on API connections.
        (connection,) = gateway.service.api_site.connections
        self.assertTrue(connection.transport.getTcpNoDelay())

    @inlineCallbacks
    def test_chunks_arrive_as_sent(self):
        """
        The upstream sends each event of a stream only once the client has
        every word sent before it (the stand-in's C{chunk_gate}): a gateway
        that held events back (until the end, or until more came) never
        gets the next one, and the call fails at the SDK's 10 s timeout.
        No clock is involved, so a loaded machine cannot fail it.
        """
        expected = self.upstream.gemini.reply_pieces()
        self.assertEqual(self.upstream.kimi.reply_pieces(), expected)
        words = len(expected)
        gateway = self.gateway()
        client = self.sdk(gateway)
        # Words carried by the events before event n: Gemini's stream has one
        # event per word; OpenAI's opens with a role-only event.
        words_before = {
            "gemini/gemini-flash-latest": lambda n: min(n, words),
            "kimi/moonshot-v1-8k": lambda n: min(max(n - 1, 0), words),
        }
        for model, before in words_before.items():
            received = [0]
            held: dict[int, list[Deferred[None]]] = {}

            gated: list[int] = []

            def gate(
                n: int, before: Any = before, received: list[int] = received, held: Any = held, gated: Any = gated
            ) -> Any:
                gated.append(n)
                wanted = before(n)
                if received[0] >= wanted:
                    return succeed(None)
                waiting: Deferred[None] = Deferred()
                held.setdefault(wanted, []).append(waiting)
                return waiting

            def arrived(received: list[int] = received, held: Any = held) -> None:
                received[0] += 1
                for waiting in held.pop(received[0], []):
                    waiting.callback(None)

            self.upstream.gemini.chunk_gate = self.upstream.kimi.chunk_gate = gate

            def read(model: str = model, arrived: Any = arrived) -> list[str]:
                pieces = []
                for chunk in client.chat.completions.create(model=model, messages=HELLO, stream=True):
                    if chunk.choices and chunk.choices[0].delta.content:
                        pieces.append(chunk.choices[0].delta.content)
                        reactor.callFromThread(arrived)
                return pieces

            pieces = yield deferToThread(read)
            self.assertEqual(pieces, expected, model)
            # Every word after the first waited for the client to have the one before.
            self.assertTrue({before(n) for n in gated} >= set(range(1, words)), (model, gated))

    @inlineCallbacks
    def test_concurrent_calls(self):
        # Fewer calls than the reactor has threads: the gateway resolves the
        # upstream's host name in that same thread pool.
        gateway = self.gateway()
        client = self.sdk(gateway)
        calls = [
            deferToThread(client.chat.completions.create, model=model, messages=HELLO)
            for model in ["kimi/moonshot-v1-8k", "gemini/gemini-2.5-flash"] * 3
        ]
        completions = yield gatherResults(calls)
        self.assertEqual(sorted(c.model for c in completions), ["gemini-2.5-flash"] * 3 + ["moonshot-v1-8k"] * 3)


class RoutingTests(DataPlaneTestCase):
    """
    The operator's switch decides who answers; "provider/model" overrides
    it for one call.
    """

    @inlineCallbacks
    def test_switch_between_calls(self):
        gateway = self.gateway()
        client = self.sdk(gateway)
        control = yield open_client(self, gateway.port)

        first = yield deferToThread(client.chat.completions.with_raw_response.create, model="gpt-4o", messages=HELLO)
        self.assertEqual(first.headers["x-openclaw-provider"], "gemini")
        self.assertEqual(first.parse().model, "gemini-flash-latest")

        answer = yield control.command(
            gateway.token, "switch_provider", {"provider": "kimi", "model": "moonshot-v1-32k"}
        )
        self.assertTrue(answer["ok"], answer)

        second = yield deferToThread(client.chat.completions.with_raw_response.create, model="gpt-4o", messages=HELLO)
        self.assertEqual(second.headers["x-openclaw-provider"], "kimi")
        self.assertEqual(second.parse().model, "moonshot-v1-32k")
        self.assertEqual((self.upstream.gemini.requests, self.upstream.kimi.requests), (1, 1))

        health = yield deferToThread(lambda: client.with_raw_response.models.list())
        self.assertEqual(health.headers["x-openclaw-provider"], "kimi")

    @inlineCallbacks
    def test_provider_prefix(self):
        gateway = self.gateway()  # gemini is active
        client = self.sdk(gateway)
        raw = yield deferToThread(
            client.chat.completions.with_raw_response.create, model="kimi/moonshot-v1-128k", messages=HELLO
        )
        self.assertEqual(raw.headers["x-openclaw-provider"], "kimi")
        self.assertEqual(raw.parse().model, "moonshot-v1-128k")
        self.assertEqual(self.upstream.kimi.last_body["model"], "moonshot-v1-128k")
        # For that call only.
        self.assertEqual(gateway.service.route.current.provider_id, "gemini")
        raw = yield deferToThread(
            client.chat.completions.with_raw_response.create, model="gemini/gemini-2.5-pro", messages=HELLO
        )
        self.assertEqual(raw.parse().model, "gemini-2.5-pro")
        self.assertEqual(self.upstream.gemini.uris[-1], "/gemini/v1beta/models/gemini-2.5-pro:generateContent")
        # Any other model name means the active one.
        for model in ("moonshot-v1-8k", "openai/gpt-4o", "gpt-4o-mini"):
            raw = yield deferToThread(client.chat.completions.with_raw_response.create, model=model, messages=HELLO)
            self.assertEqual(raw.headers["x-openclaw-provider"], "gemini")
            self.assertEqual(raw.parse().model, "gemini-flash-latest")

    @inlineCallbacks
    def test_models_and_healthz(self):
        gateway = self.gateway()
        client = self.sdk(gateway)
        models = yield deferToThread(lambda: [m.id for m in client.models.list()])
        self.assertEqual(models, self.upstream.gemini.models)
        gateway.service.route.switch(Route("kimi", "moonshot-v1-8k"))
        page = yield deferToThread(client.models.list)
        self.assertEqual([m.id for m in page], self.upstream.kimi.models)
        self.assertEqual({m.owned_by for m in page}, {"kimi"})
        self.assertEqual({m.object for m in page}, {"model"})

        response = yield self.http().get(f"http://127.0.0.1:{gateway.api_port}/healthz")
        self.assertEqual(response.code, 200)
        document = yield response.json()
        self.assertEqual(document, {"status": "ok", "provider": "kimi", "model": "moonshot-v1-8k"})
        response = yield self.http().head(f"http://127.0.0.1:{gateway.api_port}/healthz")
        self.assertEqual(response.code, 200)

    @inlineCallbacks
    def test_server_field(self):
        """
        Every answer's C{Server} names the product alone, as the control
        plane's handshake does: not twisted.web's default, which names
        Twisted's version (an attacker's first question).
        """
        gateway = self.gateway()
        base = f"http://127.0.0.1:{gateway.api_port}"
        client = self.sdk(gateway)
        raw = yield deferToThread(client.chat.completions.with_raw_response.create, model="m", messages=HELLO)
        self.assertEqual(raw.headers.get_list("server"), ["openclaw"])
        http = self.http()
        for path in ("/healthz", "/nowhere", "/v1/models"):
            response = yield http.get(base + path)
            yield response.text()
            self.assertEqual(response.headers.getRawHeaders("server"), ["openclaw"], path)
        # What twisted.web answers itself, before any resource (OPTIONS *,
        # RFC 9110 section 9.3.7), and what the gateway refuses before
        # twisted.web has a request (a target that is no path, no Host).
        for head in (
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\n",
            b"GET * HTTP/1.1\r\nHost: x\r\n",
            b"GET /v1/models HTTP/1.1\r\n",
        ):
            answer = yield deferToThread(exchange, gateway.api_port, head + b"Connection: close\r\n\r\n")
            self.assertEqual(answer.count(b"\r\nServer: openclaw\r\n"), 1, answer)
            self.assertNotIn(b"TwistedWeb", answer)


class StreamFailureTests(DataPlaneTestCase):
    """
    A stream that cannot finish never looks finished; a client that leaves
    releases the upstream.
    """

    @inlineCallbacks
    def test_large_body_file_let_go_when_read(self):
        """
        A body past 100 KB (twisted.web's temporary file) gives its
        descriptor back once read, not once answered: a call waiting on
        its provider held three descriptors where the API's share counts
        two (hostile trial s21).
        """
        if not os.path.isdir("/proc/self/fd"):
            raise SkipTest("listing open descriptors needs /proc")

        def temporary_files() -> set[tuple[str, str]]:
            # The process's open files that are deleted; files of earlier
            # tests may close meanwhile.
            found = set()
            for fd in os.listdir("/proc/self/fd"):
                with contextlib.suppress(OSError):
                    found.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
            return {entry for entry in found if entry[1].endswith("(deleted)")}

        self.upstream.kimi.mode = "hang"
        gateway = self.gateway(max_request_bytes=1_000_000, upstream_timeout=30)
        before = temporary_files()
        text = "x" * 200_000
        call = self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": [{"role": "user", "content": text}]})
        while not self.upstream.kimi.requests:
            yield deferLater(reactor, 0.02, lambda: None)
        # The stand-in's own (it runs in this process) holds the body it
        # was sent; the gateway's is gone.
        self.assertEqual(len(temporary_files() - before), 1)
        yield gateway.service.api_site.close_connections()
        yield call

    @inlineCallbacks
    def test_out_of_descriptors_is_the_gateways(self):
        """
        A call that finds no file descriptor free to reach its provider is
        the gateway's 503 (gateway_overloaded), logged as such: not a 502
        charged to the provider's breaker (hostile trial s21: the breaker
        of a healthy provider opened), nor failed over.
        """
        if not os.path.isdir("/proc/self/fd"):
            raise SkipTest("counting open descriptors needs /proc")
        gateway = self.gateway(breaker_failures=1)
        # Every module a call imports, imported before the limit comes down.
        response, _ = yield self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO})
        self.assertEqual(response.code, 200)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        body = json.dumps({"model": "kimi/moonshot-v1-8k", "messages": HELLO}).encode()
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
            + GATEWAY_KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        # No pooled provider connection to reuse: the call must make one.
        pool = gateway.service.providers.pool
        assert pool is not None
        yield pool.closeCachedConnections()
        client = socket.create_connection(("127.0.0.1", gateway.api_port))
        self.addCleanup(client.close)
        # Let the gateway accept it, and the pooled connections close on
        # both sides (the stand-in is in this process), before the limit
        # comes down.
        yield deferLater(reactor, 0.3, lambda: None)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # The limit bounds descriptor numbers: at the lowest free one, no
        # new descriptor can be had.
        lowest = os.open(os.devnull, os.O_RDONLY)
        os.close(lowest)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
        try:
            client.sendall(head + body)
            answer = b""
            deadline = time.monotonic() + 5
            while b"}}" not in answer and time.monotonic() < deadline:
                yield deferLater(reactor, 0.05, lambda: None)
                client.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    answer += client.recv(65536)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer[:300])
        self.assertIn(b'"code":"gateway_overloaded"', answer)
        self.assertEqual(gateway.service.providers.get("kimi").breaker.state, "closed")
        self.assertTrue(any(e.get("out_of_descriptors") for e in events))
        # Served again once descriptors are free.
        response, _ = yield self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO})
        self.assertEqual(response.code, 200)

    @inlineCallbacks
    def test_stop_ends_calls_at_the_grace(self):
        """
        A stream still under way when SHUTDOWN_GRACE_SECONDS runs out ends
        then, though a control client does not answer its close frame (up
        to CLOSE_HANDSHAKE_SECONDS, 5 s): the API's calls were ended only
        once the control plane's connections were gone (host trial s21).
        """
        self.upstream.kimi.mode = "stall"
        gateway = self.gateway(shutdown_grace_seconds=0.5)
        silent = socket.create_connection(("127.0.0.1", gateway.port))
        self.addCleanup(silent.close)
        silent.sendall(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        site = gateway.service.api_site
        stream = self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO, "stream": True})
        while site.context.in_flight < 1 or not gateway.service.factory.protocols:
            yield deferLater(reactor, 0.01, lambda: None)
        started = time.monotonic()
        stopped = gateway.service.stopService()
        response, text = yield stream
        self.assertLess(time.monotonic() - started, 2.5)
        self.assertIn('"code":"shutting_down"', text)
        yield stopped

    @inlineCallbacks
    def test_stop_ends_calls_honestly(self):
        """
        When a stop's grace period is over, a stream still under way ends
        with a 503 shutting_down event (no [DONE]) and a whole answer still
        awaited gets a 503: counted and logged as such, not as clients
        that went away (499).
        """
        self.upstream.kimi.mode = "stall"
        self.upstream.kimi.cut_after = 2
        self.upstream.gemini.mode = "hang"
        gateway = self.gateway()
        site = gateway.service.api_site
        stream = self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO, "stream": True})
        whole = self.post(gateway, {"model": "gemini/gemini-2.5-flash", "messages": HELLO})
        while site.context.in_flight < 2 or not self.upstream.gemini.requests:
            yield deferLater(reactor, 0.01, lambda: None)
        yield deferLater(reactor, 0.1, lambda: None)
        yield site.close_connections()
        response, text = yield stream
        self.assertEqual(response.code, 200)
        self.assertNotIn("[DONE]", text)
        events = [e for e in text.split("\n\n") if e]
        self.assertOpenAIError(events[-1][len("data: ") :], "shutting_down")
        response, text = yield whole
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["1"])
        self.assertOpenAIError(text, "shutting_down")
        # Both counted as the gateway's 503s, not as clients gone (499).
        metrics = generate_latest(gateway.service.metrics.registry).decode()
        self.assertIn('openclaw_api_requests_total{provider="kimi",status="503"} 1.0', metrics)
        self.assertIn('openclaw_api_requests_total{provider="gemini",status="503"} 1.0', metrics)
        self.assertNotIn('status="499"', metrics)

    @inlineCallbacks
    def test_stop_ends_a_whole_stream_as_whole(self):
        """
        A stream whose answer is whole (its finish and usage relayed, only
        [DONE] still to come) when a stop's grace is over ends with [DONE]
        and is counted a 200: not a shutting_down event after the whole
        answer, which told the client to retry what its consumer was
        charged for (trial s30).
        """
        self.upstream.kimi.mode = "linger"
        self.upstream.kimi.send_done = False
        gateway = self.gateway(shutdown_grace_seconds=0.5)
        site = gateway.service.api_site
        stream = self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO, "stream": True})
        while site.context.in_flight < 1:
            yield deferLater(reactor, 0.01, lambda: None)
        yield deferLater(reactor, 0.2, lambda: None)
        yield gateway.service.stopService()
        response, text = yield stream
        self.assertEqual(response.code, 200)
        events = [e for e in text.split("\n\n") if e]
        self.assertEqual(events[-1], "data: [DONE]")
        self.assertNotIn("shutting_down", text)
        metrics = generate_latest(gateway.service.metrics.registry).decode()
        self.assertIn('openclaw_api_requests_total{provider="kimi",status="200"} 1.0', metrics)

    @inlineCallbacks
    def test_cut_mid_answer(self):
        for behaviour in (self.upstream.kimi, self.upstream.gemini):
            behaviour.mode = "cut"
            behaviour.cut_after = 2
        gateway = self.gateway()
        for model in ("kimi/moonshot-v1-8k", "gemini/gemini-2.5-flash"):
            response, text = yield self.post(gateway, {"model": model, "messages": HELLO, "stream": True})
            self.assertEqual(response.code, 200)
            self.assertNotIn("[DONE]", text)
            events = [e for e in text.split("\n\n") if e]
            self.assertEqual(len(events), 3, text)  # two chunks, then the error
            error = self.assertOpenAIError(events[-1][len("data: ") :], "upstream_stream_broken")
            self.assertIn("mid-answer", error["message"])

        # The SDK raises rather than returning a cut answer as whole.
        client = self.sdk(gateway)

        def consume() -> list[Any]:
            return list(client.chat.completions.create(model="gemini/gemini-2.5-flash", messages=HELLO, stream=True))

        failure = yield self.assertFailure(deferToThread(consume), openai.APIError)
        self.assertIn("mid-answer", failure.message)

    @inlineCallbacks
    def test_stall_mid_answer(self):
        """
        The gap between chunks is bounded by UPSTREAM_TIMEOUT.
        """
        self.upstream.kimi.mode = "stall"
        gateway = self.gateway(upstream_timeout=0.3)
        response, text = yield self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO, "stream": True})
        self.assertEqual(response.code, 200)
        self.assertNotIn("[DONE]", text)
        events = [e for e in text.split("\n\n") if e]
        error = self.assertOpenAIError(events[-1][len("data: ") :], "upstream_timeout")
        self.assertIn("UPSTREAM_TIMEOUT", error["message"])

    @inlineCallbacks
    def test_complete_stream_whose_body_lingers(self):
        """
        A Gemini stream whose every choice has finished is whole, even if
        its body does not end (Gemini has no end marker): closed with its
        finish reason and [DONE] after COMPLETE_STREAM_GRACE_SECONDS, not
        failed at UPSTREAM_TIMEOUT (the SDK raised, and an agent ran its
        tool call twice), and the provider's connection let go then, not
        held until UPSTREAM_TIMEOUT.
        """
        self.upstream.gemini.mode = "linger"
        gateway = self.gateway(upstream_timeout=30)
        client = self.sdk(gateway)

        def consume() -> list[Any]:
            return list(
                client.chat.completions.create(
                    model="gemini/gemini-2.5-flash",
                    messages=HELLO,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )

        started = reactor.seconds()
        chunks = yield deferToThread(consume)
        # Well within UPSTREAM_TIMEOUT (30), with room for a loaded host
        # (a CI run beside two helpers took 13.7 s; 2 s when quiet).
        self.assertLess(reactor.seconds() - started, 20)
        self.assertEqual([c.choices[0].finish_reason for c in chunks if c.choices][-1], "stop")
        self.assertEqual(chunks[-1].usage.prompt_tokens, 10)
        yield self.upstream.gemini.when_streams_lost(1)
        self.assertLess(reactor.seconds() - started, 20)
        self.assertEqual(
            "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), self.upstream.gemini.reply
        )

    @inlineCallbacks
    def test_finished_stream_whose_connection_is_cut(self):
        """
        A Gemini stream whose every choice has finished is whole even if
        its connection is cut before its body's end: closed with its finish
        reason and [DONE] (the held-back finish was lost and the SDK
        raised); one cut before its finish still fails.
        """
        gemini = self.upstream.gemini
        gemini.mode, gemini.cut_after = "cut", 100
        gateway = self.gateway()
        client = self.sdk(gateway)

        def consume() -> list[Any]:
            return list(client.chat.completions.create(model="gemini/gemini-2.5-flash", messages=HELLO, stream=True))

        chunks = yield deferToThread(consume)
        self.assertEqual([c.choices[0].finish_reason for c in chunks if c.choices][-1], "stop")
        gemini.cut_after = 2
        yield self.assertFailure(deferToThread(consume), openai.APIError)

    @inlineCallbacks
    def test_stream_whose_body_lingers_after_done(self):
        """
        A Kimi stream ends at [DONE]; a body kept open after it is let go
        within COMPLETE_STREAM_GRACE_SECONDS, not held to UPSTREAM_TIMEOUT.
        """
        self.upstream.kimi.mode = "linger"
        gateway = self.gateway(upstream_timeout=30)
        client = self.sdk(gateway)
        started = reactor.seconds()
        chunks = yield deferToThread(
            lambda: list(client.chat.completions.create(model="kimi/moonshot-v1-8k", messages=HELLO, stream=True))
        )
        self.assertEqual([c.choices[0].finish_reason for c in chunks if c.choices][-1], "stop")
        yield self.upstream.kimi.when_streams_lost(1)
        self.assertLess(reactor.seconds() - started, 10)

    @inlineCallbacks
    def test_kimi_stream_without_done(self):
        """
        A Kimi stream every choice of which finished, its usage in, but no
        [DONE]: whole when its body ends, and within
        COMPLETE_STREAM_GRACE_SECONDS when the body stays open (it failed
        at UPSTREAM_TIMEOUT).  With n 2 and one choice finished, a body that
        ends without [DONE] is not whole.
        """
        kimi = self.upstream.kimi
        kimi.send_done = False
        gateway = self.gateway(upstream_timeout=30, fallback="off")
        client = self.sdk(gateway)

        def consume(n: int = 1) -> list[Any]:
            return list(
                client.chat.completions.create(
                    model="kimi/moonshot-v1-8k",
                    messages=HELLO,
                    stream=True,
                    n=n,
                    stream_options={"include_usage": True},
                )
            )

        for mode in ("ok", "linger"):
            kimi.mode = mode
            started = reactor.seconds()
            chunks = yield deferToThread(consume)
            self.assertEqual([c.choices[0].finish_reason for c in chunks if c.choices][-1], "stop", mode)
            self.assertEqual(chunks[-1].usage.prompt_tokens, 10, mode)
            self.assertLess(reactor.seconds() - started, 10, mode)
        # n 2: the stand-in finishes one choice only; the answer is not whole.
        kimi.mode = "ok"
        yield self.assertFailure(deferToThread(consume, 2), openai.APIError)

    @inlineCallbacks
    def test_stream_cut_at_its_longest(self):
        """
        A provider that goes on sending (an event every 0.1 s, for 4 s: a
        model looping, a proxy feeding events) is cut at
        UPSTREAM_STREAM_MAX_SECONDS from the request's arrival, on either
        wire: the stream ends with an error event saying so, and the
        provider's request is let go; it ran as long as the provider went
        on.  A stream that ends in time is whole.
        """
        gateway = self.gateway(default_provider="kimi", upstream_stream_max_seconds=1.0)
        client = self.sdk(gateway)

        def consume(model: str) -> list[Any]:
            chunks: list[Any] = []
            try:
                chunks.extend(client.chat.completions.create(model=model, messages=HELLO, stream=True))
            except openai.APIError as e:
                return [chunks, e]
            return [chunks, None]

        for provider, model in (
            (self.upstream.kimi, "kimi/moonshot-v1-8k"),
            (self.upstream.gemini, "gemini/gemini-2.5-flash"),
        ):
            provider.chunk_interval = 0.1
            provider.reply = " ".join(["word"] * 40)
            started = reactor.seconds()
            chunks, error = yield deferToThread(consume, model)
            self.assertLess(reactor.seconds() - started, 2.5, model)
            self.assertGreater(len(chunks), 3, model)
            self.assertIsInstance(error, openai.APIError, model)
            self.assertIn("still going after 1 s (UPSTREAM_STREAM_MAX_SECONDS), and was cut there", str(error))
            yield provider.when_streams_lost(1)
            provider.reply = "one two three"
            chunks, error = yield deferToThread(consume, model)
            self.assertIsNone(error, model)
            self.assertEqual(chunks[-1].choices[0].finish_reason, "stop", model)
        lines = [e for e in self.events if e.get("outcome") == "stream_too_long"]
        self.assertEqual([line["status"] for line in lines], [504, 504])

    @inlineCallbacks
    def test_stream_longest_is_not_a_stall(self):
        """
        A stream that has sent nothing of its answer when
        UPSTREAM_STREAM_MAX_SECONDS (below UPSTREAM_TIMEOUT) has passed is
        a stall, failed over as one, not cut as a stream that went on too
        long (review s47: it was a 504 stream_too_long, not failed over).
        """
        # Its headers, then keep-alive comments only.
        self.upstream.kimi.mode = "trickle"
        self.upstream.kimi.cut_after = 0
        gateway = self.gateway(default_provider="kimi", upstream_stream_max_seconds=0.3, upstream_timeout=1.0)
        client = self.sdk(gateway)

        def consume() -> Any:
            return list(client.chat.completions.create(model="moonshot-v1-8k", messages=HELLO, stream=True))

        chunks = yield deferToThread(consume)
        self.assertEqual(chunks[-1].choices[0].finish_reason, "stop")
        self.assertEqual([e for e in self.events if e.get("outcome") == "stream_too_long"], [])

    @inlineCallbacks
    def test_client_disconnect_cancels_upstream(self):
        self.upstream.kimi.chunk_interval = 0.2
        self.upstream.kimi.reply = "one two three four five six seven eight"
        gateway = self.gateway(default_provider="kimi")
        client = self.sdk(gateway)

        def read_one_and_leave() -> str:
            stream = client.chat.completions.create(model="x", messages=HELLO, stream=True)
            first = next(iter(stream))
            stream.close()
            return first.choices[0].delta.role

        role = yield deferToThread(read_one_and_leave)
        self.assertEqual(role, "assistant")
        yield self.upstream.kimi.when_streams_lost(1)
        gone = [e for e in self.events if e.get("outcome") == "client gone"]
        self.assertEqual(len(gone), 1)
        self.assertEqual(gone[0]["status"], 499)

    @inlineCallbacks
    def test_client_disconnect_cancels_whole_call(self):
        """
        A client that gives up on an answer in one piece releases the
        upstream request too.
        """
        self.upstream.gemini.mode = "hang"
        gateway = self.gateway()
        call = self.http().post(
            f"http://127.0.0.1:{gateway.api_port}/v1/chat/completions",
            data=json.dumps({"messages": HELLO}).encode(),
            headers={"Authorization": [f"Bearer {GATEWAY_KEY}"]},
        )
        while not self.upstream.open_requests.requests:
            yield deferLater(reactor, 0.01)
        call.cancel()
        yield self.assertFailure(call, ResponseNeverReceived)
        yield upstream_let_go(self.upstream)
        self.assertEqual(self.upstream.open_requests.requests, set())
        self.assertEqual([e["status"] for e in self.events if e.get("outcome") == "client gone"], [499])

    @inlineCallbacks
    def test_upstream_error_event(self):
        """
        An error the upstream reports inside its stream ends the client's
        stream the same way.
        """
        # The role chunk and the first word, then {"error": {"message":
        # "overloaded", "type": "engine_overloaded_error"}} (Moonshot's
        # shape for a 503).  (After the role chunk alone, the stream has
        # not begun its answer: test_stream_start.EmptyFirstEventTests.)
        kimi = self.upstream.kimi
        kimi.mode, kimi.cut_after, kimi.error_status, kimi.error_message = "stream_error", 2, 503, "overloaded"
        gateway = self.gateway()
        response, text = yield self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO, "stream": True})
        self.assertEqual(response.code, 200)
        self.assertNotIn("[DONE]", text)
        events = [e for e in text.split("\n\n") if e]
        self.assertEqual(len(events), 3, text)
        self.assertEqual(json.loads(events[1][len("data: ") :])["choices"][0]["delta"], {"content": "Hello"})
        error = self.assertOpenAIError(events[-1][len("data: ") :], "upstream_stream_error")
        # The provider's words, and what kind of error it said it was (trial
        # s30: the kind was dropped, which other errors keep).
        self.assertEqual(error["message"], "kimi: overloaded [type=engine_overloaded_error]")
        gemini = self.upstream.gemini
        gemini.mode, gemini.cut_after, gemini.error_status, gemini.error_message = "stream_error", 1, 503, "overloaded"
        body = {"model": "gemini/gemini-2.5-flash", "messages": HELLO, "stream": True}
        response, text = yield self.post(gateway, body)
        events = [e for e in text.split("\n\n") if e]
        error = self.assertOpenAIError(events[-1][len("data: ") :], "upstream_stream_error")
        self.assertEqual(error["message"], "gemini: overloaded [status=UNAVAILABLE, code=503]")


class ErrorTests(DataPlaneTestCase):
    """
    Every error status, OpenAI-shaped.
    """

    @inlineCallbacks
    def test_unauthorized(self):
        gateway = self.gateway()
        for key in (None, "wrong-key", GATEWAY_KEY + "x", ""):
            response, text = yield self.post(gateway, {"messages": HELLO}, key=key)
            self.assertEqual(response.code, 401, key)
            self.assertEqual(response.headers.getRawHeaders("www-authenticate"), ["Bearer"])
            error = self.assertOpenAIError(text, "invalid_api_key")
            if key:
                self.assertNotIn(key, text)
            # Said to a client: what to send, never the operator's setting.
            self.assertNotIn("GATEWAY_API_KEYS", error["message"])
            if key is None:
                self.assertIn("send your API key as the header 'Authorization: Bearer <key>'", error["message"])
        # Either configured key works.
        for key in (GATEWAY_KEY, OTHER_GATEWAY_KEY):
            response, _ = yield self.post(gateway, {"messages": HELLO}, key=key)
            self.assertEqual(response.code, 200)
        # The models listing needs a key too; /healthz does not.
        response = yield self.http().get(f"http://127.0.0.1:{gateway.api_port}/v1/models")
        self.assertEqual(response.code, 401)
        yield response.text()
        client = self.sdk(gateway, key="wrong-key")
        failure = yield self.assertFailure(
            deferToThread(client.chat.completions.create, model="x", messages=HELLO), openai.AuthenticationError
        )
        self.assertEqual(failure.status_code, 401)
        self.assertEqual(self.upstream.gemini.requests, 2)

    @inlineCallbacks
    def test_no_keys_configured(self):
        gateway = self.gateway(gateway_api_keys=())
        for key in (None, "anything"):
            response, text = yield self.post(gateway, {"messages": HELLO}, key=key)
            self.assertEqual(response.code, 401)
            error = self.assertOpenAIError(text, "gateway_api_keys_not_set")
            self.assertIn("GATEWAY_API_KEYS is not set", error["message"])
        self.assertEqual(self.upstream.gemini.requests, 0)

    @inlineCallbacks
    def test_valid_tool_history_accepted(self):
        """
        Kimi repeats call ids across turns (get_weather:0): a history that
        answers each turn's calls right after it is valid.
        """
        gateway = self.gateway()
        turn = {**CALL_A, "tool_calls": [{**CALL_A["tool_calls"][0], "id": "get_weather:0"}]}
        answer = {**ANSWER_A, "tool_call_id": "get_weather:0"}
        body = {"model": "kimi/moonshot-v1-8k", "messages": [*HELLO, turn, answer, *HELLO, turn, answer]}
        response, text = yield self.post(gateway, body)
        self.assertEqual(response.code, 200, text)

    @inlineCallbacks
    def test_bad_bodies(self):
        gateway = self.gateway()
        cases = [
            (b"{not json", "not valid JSON"),
            (b"[1, 2]", "JSON object"),
            ({}, "messages is required"),
            ({"messages": []}, "non-empty list"),
            ({"messages": "hi"}, "non-empty list"),
            ({"messages": ["hi"]}, "messages[0] must be an object"),
            ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role must be one of"),
            ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "1"}]}, "matches no tool call"),
            ({"messages": [{"role": "user"}]}, "messages[0].content is required"),
            ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content must be"),
            (
                {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                "must be a base64 data URL",
            ),
            ({"messages": HELLO, "temperature": "hot"}, "temperature must be a number"),
            ({"messages": HELLO, "max_tokens": 0}, "max_tokens must be a whole number"),
            ({"messages": HELLO, "n": True}, "n must be a whole number"),
            ({"messages": HELLO, "stream": "yes"}, "stream must be true or false"),
            ({"messages": HELLO, "stop": [1]}, "stop must be"),
            ({"messages": HELLO, "model": 4}, "model must be a string"),
            ({"messages": HELLO, "model": "kimi/"}, "names no model"),
            ({"messages": HELLO, "tools": [{"type": "function"}]}, "tools[0].function must be an object"),
            # Every tool call answered right after its assistant message, once.
            ({"messages": [*HELLO, CALL_A, {"role": "user", "content": "and?"}]}, "'a' have no tool message"),
            ({"messages": [*HELLO, CALL_A]}, "'a' have no tool message"),
            ({"messages": [*HELLO, CALL_A, ANSWER_A, ANSWER_A]}, "answers no open call"),
            (
                {"messages": [*HELLO, CALL_A, ANSWER_A, {"role": "user", "content": "x"}, ANSWER_A]},
                "answers no open call",
            ),
            (
                {"messages": [*HELLO, {**CALL_A, "tool_calls": CALL_A["tool_calls"] * 2}, ANSWER_A]},
                "'a' is used twice in this message",
            ),
            (
                {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": BAD_DATA}}]}]},
                "image_url.url is a data URL whose data is not base64 (RFC 4648",
            ),
            (
                {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": BAD_DATA}}]}]},
                "file.file_data is a data URL whose data is not base64 (RFC 4648",
            ),
            (
                {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": "file-abc"}}]}]},
                "file.file_data must be a base64 data URL",
            ),
            (
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "input_audio", "input_audio": {"data": "!!!", "format": "wav"}}],
                        }
                    ]
                },
                "input_audio.data must be base64",
            ),
        ]
        for body, expected in cases:
            response, text = yield self.post(gateway, body)
            self.assertEqual(response.code, 400, (body, text))
            error = self.assertOpenAIError(text)
            self.assertIn(expected, error["message"], body)
            self.assertEqual(error["type"], "invalid_request_error")
        self.assertEqual(self.upstream.gemini.requests + self.upstream.kimi.requests, 0)
        client = self.sdk(gateway)
        failure = yield self.assertFailure(
            deferToThread(client.chat.completions.create, model="x", messages=[]), openai.BadRequestError
        )
        self.assertIn("non-empty list", failure.message)

    @inlineCallbacks
    def test_not_found_and_method(self):
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        gateway = self.gateway()
        http = self.http()
        base = f"http://127.0.0.1:{gateway.api_port}"
        for path in ("/", "/v1", "/v1/completions", "/v1/chat/completions/x", "/v2/models", "/healthz/x"):
            response = yield http.get(base + path)
            self.assertEqual(response.code, 404, path)
            self.assertOpenAIError((yield response.text()), "unknown_url")
        for method, path, allowed in (
            ("GET", "/v1/chat/completions", "POST"),
            ("PUT", "/v1/chat/completions", "POST"),
            ("POST", "/v1/models", "GET"),
            ("DELETE", "/healthz", "GET"),
        ):
            response = yield http.request(method, base + path)
            self.assertEqual(response.code, 405, (method, path))
            self.assertEqual(response.headers.getRawHeaders("allow"), [allowed])
            self.assertOpenAIError((yield response.text()), "method_not_allowed")
        # Each is counted, and logged (at info, as every refused request).
        response = yield http.get(base + "/metrics")
        text = yield response.text()
        self.assertIn('openclaw_api_requests_total{provider="-",status="404"} 6.0', text)
        self.assertIn('openclaw_api_requests_total{provider="-",status="405"} 4.0', text)
        refused = [e for e in events if e.get("status") in (404, 405)]
        self.assertEqual(len(refused), 10)
        self.assertEqual(refused[0]["outcome"], "unknown_url")

    @inlineCallbacks
    def test_client_request_id_logged(self):
        """
        An id the client gives its request (C{X-Client-Request-Id}, as
        OpenAI takes it) is logged with the request's line, so that a
        client that gave up before any answer (a timeout: no
        C{x-request-id} reached it) finds its call (trial s34).  One that
        is not printable ASCII of at most 512 characters is not logged,
        and fails nothing.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        gateway = self.gateway()
        http = self.http()
        base = f"http://127.0.0.1:{gateway.api_port}"
        for given, logged in (
            ("trace-123", "trace-123"),
            ("x" * 513, None),
            ("bad\x1b[31m", None),
        ):
            response = yield http.get(base + "/v1/nowhere", headers={"X-Client-Request-Id": [given.encode("latin-1")]})
            self.assertEqual(response.code, 404)
            yield response.text()
            line = [e for e in events if e.get("status") == 404][-1]
            self.assertEqual(line["client_request_id"], logged, given)
            said = formatEvent(line)
            if logged is None:
                self.assertNotIn("client's id", said)
            else:
                self.assertIn("(client's id trace-123)", said)
                self.assertIn(f"request {response.headers.getRawHeaders('x-request-id')[0]}", said)

    @inlineCallbacks
    def test_paths_read_as_twisted_web_reads_them(self):
        """
        The API's one root resource finds a handler as a tree of resources
        would: C{%xx} escapes in a segment decoded, a trailing or doubled
        slash a 404.
        """
        gateway = self.gateway()
        http = self.http()
        base = f"http://127.0.0.1:{gateway.api_port}"
        response = yield http.get(base + "/%68ealthz")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads((yield response.text()))["status"], "ok")
        for path in ("/healthz/", "//healthz", "/v1/chat%2Fcompletions"):
            response = yield http.get(base + path)
            self.assertEqual(response.code, 404, path)
            self.assertOpenAIError((yield response.text()), "unknown_url")

    @inlineCallbacks
    def test_upstream_error(self):
        self.upstream.kimi.mode = "error"
        self.upstream.kimi.error_status = 503
        self.upstream.gemini.mode = "forbidden"
        gateway = self.gateway(fallback="off")
        response, text = yield self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO})
        self.assertEqual(response.code, 502)
        self.assertEqual(response.headers.getRawHeaders("x-openclaw-upstream-status"), ["503"])
        self.assertEqual(response.headers.getRawHeaders("x-openclaw-provider"), ["kimi"])
        error = self.assertOpenAIError(text, "upstream_http_error")
        self.assertIn("HTTP 503", error["message"])
        self.assertIn("The engine is currently overloaded", error["message"])
        # Gemini's 403 quotes the key; the gateway does not pass it on.  A
        # 403 is the provider's permission denied, passed on as a 403.
        response, text = yield self.post(gateway, {"messages": HELLO, "stream": True})
        self.assertEqual(response.code, 403)
        error = self.assertOpenAIError(text, "permission_denied")
        self.assertIn("HTTP 403", error["message"])
        self.assertNotIn(GEMINI_KEY, text)
        # An unknown model is the upstream's 404, passed on as a 404, with
        # no hint about the base URL (the host answered).
        self.upstream.kimi.mode = "ok"
        response, text = yield self.post(gateway, {"model": "kimi/no-such-model", "messages": HELLO})
        self.assertEqual(response.code, 404)
        error = self.assertOpenAIError(text, "model_not_found")
        self.assertEqual((error["type"], error["param"]), ("invalid_request_error", "model"))
        self.assertIn("Not found the model no-such-model", error["message"])
        self.assertNotIn("BASE_URL", error["message"])
        client = self.sdk(gateway)
        failure = yield self.assertFailure(
            deferToThread(client.chat.completions.create, model="x", messages=HELLO), openai.InternalServerError
        )
        self.assertEqual(failure.status_code, 502)

    @inlineCallbacks
    def test_upstream_refused(self):
        port = free_port()
        gateway = self.gateway(
            providers=changed_providers(
                self.upstream.provider_settings(), kimi={"base_url": f"http://127.0.0.1:{port}/v1"}
            ),
            default_provider="kimi",
            fallback="off",
        )
        response, text = yield self.post(gateway, {"messages": HELLO, "stream": True})
        self.assertEqual(response.code, 502)
        error = self.assertOpenAIError(text, "upstream_unreachable")
        # The provider's address and the setting are the operator's (the
        # log line's: tests.test_upstream_messages), not the client's.
        self.assertIn("kimi: the provider could not be reached (connection refused)", error["message"])
        self.assertNotIn(str(port), error["message"])
        self.assertNotIn("KIMI_BASE_URL", error["message"])

    @inlineCallbacks
    def test_upstream_certificate_refused(self):
        """
        A provider whose certificate is not trusted, or not for its host
        (trial s34): 502 upstream_unreachable (it could not be reached
        safely), not upstream_answer_broken; said in words, with what to
        set, never service_identity's repr, in the request's log line
        (the client is told the handshake failed, not the provider's
        address: trial s36).
        """
        events = capture_log_events(self)
        port, ca = yield self.tls_provider("api.example.test")
        url = f"https://127.0.0.1:{port}/v1"
        for extra, said, hint in (
            ({}, "certificate verify failed", "set UPSTREAM_CA_FILE"),
            (
                {"upstream_ca_pem": ca.pem},
                "the certificate is not valid for 127.0.0.1 (it names api.example.test)",
                "set KIMI_BASE_URL to a host name the certificate holds",
            ),
        ):
            gateway = self.gateway(
                providers=changed_providers(self.upstream.provider_settings(), kimi={"base_url": url}),
                default_provider="kimi",
                fallback="off",
                **extra,
            )
            del events[:]
            response, text = yield self.post(gateway, {"messages": HELLO})
            self.assertEqual(response.code, 502, text)
            error = self.assertOpenAIError(text, "upstream_unreachable")
            self.assertIn("the TLS handshake with it failed", error["message"])
            self.assertNotIn(str(port), error["message"])
            [line] = [e for e in events if e.get("status") == 502]
            self.assertIn(f"TLS handshake with 127.0.0.1:{port} failed ({said}", line["error_message"])
            self.assertIn(hint, line["error_message"])
            self.assertNotIn("Mismatch", line["error_message"])

    @inlineCallbacks
    def test_upstream_redirect(self):
        """
        A provider's redirect is not followed: 502 upstream_http_error,
        whose message names the setting to change.
        """
        resource = Resource()
        resource.isLeaf = True  # type: ignore[misc]

        def moved(request: Any) -> bytes:
            request.setResponseCode(301)
            request.setHeader(b"Location", b"https://elsewhere.example/v1/chat/completions")
            return b""

        resource.render = moved  # type: ignore[method-assign]
        site = Site(resource)
        site.log = lambda request: None  # type: ignore[method-assign]
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/v1"
        gateway = self.gateway(
            providers=changed_providers(self.upstream.provider_settings(), kimi={"base_url": url}),
            default_provider="kimi",
            fallback="off",
        )
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 502, text)
        error = self.assertOpenAIError(text, "upstream_http_error")
        self.assertIn("HTTP 301 Moved Permanently", error["message"])
        self.assertIn("ask the operator to set KIMI_BASE_URL to the final URL", error["message"])

    @inlineCallbacks
    def test_whole_answer_cut(self):
        """
        A whole answer the provider began and cut is a 502 saying so
        (upstream_answer_broken), not a provider that could not be reached.
        """
        self.upstream.kimi.mode, self.upstream.kimi.cut_after = "cut", 0
        gateway = self.gateway(default_provider="kimi", fallback="off")
        response, text = yield self.post(gateway, {"messages": HELLO})
        self.assertEqual(response.code, 502)
        self.assertOpenAIError(text, "upstream_answer_broken")

    @inlineCallbacks
    def test_upstream_timeout(self):
        self.upstream.gemini.mode = "hang"
        self.upstream.kimi.mode = "stall"  # headers and half a body
        gateway = self.gateway(upstream_timeout=0.3, fallback="off")
        for body in (
            {"messages": HELLO},
            {"messages": HELLO, "stream": True},
            {"model": "kimi/moonshot-v1-8k", "messages": HELLO},
        ):
            started = time.monotonic()
            response, text = yield self.post(gateway, body)
            elapsed = time.monotonic() - started
            self.assertEqual(response.code, 504, body)
            error = self.assertOpenAIError(text, "upstream_timeout")
            self.assertIn("UPSTREAM_TIMEOUT", error["message"])
            self.assertLess(elapsed, 2.0)
        # The hung requests were let go, not left open upstream.
        yield upstream_let_go(self.upstream)
        self.assertEqual(self.upstream.open_requests.requests, set())

    @inlineCallbacks
    def test_provider_key_missing(self):
        gateway = self.gateway(providers=changed_providers(self.upstream.provider_settings(), kimi={"api_key": None}))
        response, text = yield self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO})
        self.assertEqual(response.code, 503)
        error = self.assertOpenAIError(text, "provider_key_not_set")
        self.assertIn("KIMI_API_KEY is not set", error["message"])
        self.assertEqual(self.upstream.kimi.requests, 0)

    @inlineCallbacks
    def test_keys_never_leak(self):
        self.upstream.gemini.mode = "forbidden"  # its message quotes the key
        gateway = self.gateway(fallback="off")
        seen = []
        for key in (GATEWAY_KEY, "wrong-" + GATEWAY_KEY):
            for body in ({"messages": HELLO}, {"messages": HELLO, "stream": True}, {"messages": []}):
                _, text = yield self.post(gateway, body, key=key)
                seen.append(text)
        everything = (
            "".join(seen) + repr(self.events) + repr(gateway.service.api_site) + repr(gateway.service.providers)
        )
        for secret in (GATEWAY_KEY, OTHER_GATEWAY_KEY, KIMI_KEY, GEMINI_KEY):
            self.assertNotIn(secret, everything)
        logged = [e for e in self.events if e.get("log_namespace") == "openclaw.dataplane"]
        self.assertEqual(len(logged), 6)
        # The first 403 has the key checked; once that listing is refused
        # too, the key is set aside and calls get 502.
        statuses = {e["status"] for e in logged}
        self.assertIn(403, statuses)
        self.assertLessEqual(statuses, {401, 400, 403, 502})


class AccountingTests(DataPlaneTestCase):
    """
    Every finished request is counted in C{/metrics}; refusals and failures
    are logged at info, successes (the high-rate case) only at debug.
    """

    @inlineCallbacks
    def metrics(self, gateway: RunningGateway) -> Any:
        response = yield self.http().get(f"http://127.0.0.1:{gateway.api_port}/metrics")
        text = yield response.text("utf-8")
        return text

    def request_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_namespace") == "openclaw.dataplane"]

    @inlineCallbacks
    def test_counted_and_failures_logged(self):
        gateway = self.gateway()
        for _ in range(2):
            response, _ = yield self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO})
            self.assertEqual(response.code, 200)
        response, _ = yield self.post(gateway, {"messages": HELLO}, key=None)
        self.assertEqual(response.code, 401)
        self.upstream.gemini.mode = "unauthorized"
        response, _ = yield self.post(gateway, {"model": "gemini/gemini-flash-latest", "messages": HELLO})
        self.assertEqual(response.code, 502)
        text = yield self.metrics(gateway)
        self.assertIn('openclaw_api_requests_total{provider="kimi",status="200"} 2.0', text)
        self.assertIn('openclaw_api_requests_total{provider="-",status="401"} 1.0', text)
        self.assertIn('openclaw_api_requests_total{provider="gemini",status="502"} 1.0', text)
        self.assertIn('openclaw_api_request_seconds_count{provider="kimi"} 2.0', text)
        self.assertIn('openclaw_api_request_seconds_bucket{le="+Inf",provider="kimi"} 2.0', text)
        # The successes built no event at all at LOG_LEVEL=info.
        logged = [(e["log_level"].name, e["status"], e["outcome"], e["peer"]) for e in self.request_events()]
        self.assertEqual(
            logged,
            [("info", 401, "invalid_api_key", "127.0.0.1"), ("info", 502, "upstream_auth_failed", "127.0.0.1")],
        )
        # The audit trail's text names the client refused.
        self.assertIn("from 127.0.0.1", formatEvent(self.request_events()[0]))

    @inlineCallbacks
    def test_keyless_refusals_limited(self):
        """
        A burst of requests refused without an accepted key (401 without a
        key or with a wrong one, 404, 405: trial s17 made 13.5 MB of log in
        4.7 s) makes a few lines a second through the gateway's log
        observer (L{make_observer}), and the next one let through says how
        many were left out; every refusal is counted in the metrics.  A key
        holder's refusals (a 400 for a bad body, a 404) in the same second
        are each logged.
        """
        out = io.StringIO()
        observer = make_observer(out, "json", "info")
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        gateway = self.gateway()
        head = b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        kinds = [
            b"GET /v1/models" + head + b"\r\n",
            b"GET /v1/models" + head + b"Authorization: Bearer wrong-key-0123456789\r\n\r\n",
            b"GET /nope/" + b"a" * 200 + head + b"\r\n",
            b"DELETE /healthz" + head + b"\r\n",
        ]
        rounds = 75
        burst = b"".join(kinds) * rounds + b"GET /nope" + head + b"Connection: close\r\n\r\n"
        started = time.monotonic()
        answers = yield deferToThread(exchange, gateway.api_port, burst)
        seconds = time.monotonic() - started
        refused = len(kinds) * rounds + 1
        self.assertEqual(answers.count(b"HTTP/1.1 "), refused)
        base = f"http://127.0.0.1:{gateway.api_port}"
        for _ in range(3):
            response, _ = yield self.post(gateway, b"{")
            self.assertEqual(response.code, 400)
            response = yield self.http().get(base + "/nope", headers={"Authorization": [f"Bearer {GATEWAY_KEY}"]})
            self.assertEqual(response.code, 404)
        # The next window: a body without a key (refused by the site).
        yield deferLater(reactor, KEYLESS_REFUSAL_INTERVAL_SECONDS)
        response, _ = yield self.post(gateway, {"messages": HELLO}, key=None)
        self.assertEqual(response.code, 401)
        refused += 1
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        requests = [line for line in lines if line["namespace"] == "openclaw.dataplane"]
        keyless = [line for line in requests if line.get("keyless")]
        self.assertLessEqual(len(keyless), KEYLESS_REFUSAL_LINES * (math.ceil(seconds) + 2))
        suppressed = [line.get("keyless_refusals_suppressed", 0) for line in keyless]
        self.assertEqual(len(keyless) + sum(suppressed), refused)
        self.assertGreater(suppressed[-1], 0)
        self.assertIn(f"({suppressed[-1]} similar lines suppressed in the last ", keyless[-1]["message"])
        self.assertEqual((keyless[-1]["status"], keyless[-1]["peer"]), (401, "127.0.0.1"))
        self.assertEqual(
            sorted((line["status"], line["outcome"]) for line in requests if not line.get("keyless")),
            [(400, "invalid_json")] * 3 + [(404, "unknown_url")] * 3,
        )
        text = yield self.metrics(gateway)
        self.assertIn('openclaw_api_requests_total{provider="-",status="401"} %d.0' % (2 * rounds + 1), text)
        self.assertIn('openclaw_api_requests_total{provider="-",status="404"} %d.0' % (rounds + 1 + 3), text)
        self.assertIn('openclaw_api_requests_total{provider="-",status="405"} %d.0' % rounds, text)

    @inlineCallbacks
    def test_deadline_after_a_key_is_no_keyless_refusal(self):
        """
        A 408 at the body deadline on a connection whose key was accepted
        (a slow body after a keyed request) is logged as a key holder's
        refusal, each time: not marked keyless, so not among the lines the
        observer holds back.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        gateway = self.gateway(api_body_timeout_seconds=1.0)
        key = f"Authorization: Bearer {GATEWAY_KEY}\r\n".encode()
        head = b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + key
        sent = b"GET /v1/models" + head + b"\r\n" + b"POST /v1/chat/completions" + head
        sent += b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        answers = yield deferToThread(exchange, gateway.api_port, sent)
        self.assertIn(b"HTTP/1.1 200 ", answers)
        self.assertIn(b"HTTP/1.1 408 ", answers)
        timed_out = [event for event in events if event.get("status") == 408 and "log_format" in event]
        self.assertEqual(len(timed_out), 1, timed_out)
        self.assertNotIn(KEYLESS_FIELD, timed_out[0])

    @inlineCallbacks
    def test_successes_logged_at_debug(self):
        gateway = self.gateway(log_level="debug")
        response, _ = yield self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO})
        self.assertEqual(response.code, 200)
        (event,) = self.request_events()
        self.assertEqual(event["log_level"].name, "debug")
        self.assertEqual(
            (event["method"], event["path"], event["status"], event["route"], event["stream"]),
            ("POST", "/v1/chat/completions", 200, "kimi/moonshot-v1-8k", False),
        )
        self.assertGreaterEqual(event["duration_ms"], 0)

    @inlineCallbacks
    def test_nothing_logged_at_warn(self):
        gateway = self.gateway(log_level="warn")
        response, _ = yield self.post(gateway, {"messages": HELLO}, key=None)
        self.assertEqual(response.code, 401)
        self.assertEqual(self.request_events(), [])
        text = yield self.metrics(gateway)
        self.assertIn('openclaw_api_requests_total{provider="-",status="401"} 1.0', text)


class ShutdownTests(DataPlaneTestCase):
    """
    What a stop uses: wait for the calls in flight, then close every
    connection.
    """

    def start_stream(self, gateway: RunningGateway) -> Any:
        return self.post(gateway, {"model": "kimi/moonshot-v1-8k", "messages": HELLO, "stream": True})

    @inlineCallbacks
    def wait_for_upstream_request(self) -> Any:
        while not self.upstream.kimi.requests:
            yield deferLater(reactor, 0.01)

    @inlineCallbacks
    def test_drain_waits_for_calls(self):
        self.upstream.kimi.chunk_interval = 0.05
        gateway = self.gateway()
        site = gateway.service.api_site
        self.assertTrue(site.context.idle().called)
        call = self.start_stream(gateway)
        yield self.wait_for_upstream_request()
        drained = site.drain()
        self.assertFalse(drained.called)
        # A stop bounds the wait with a timeout, which cancels.
        abandoned = site.drain()
        abandoned.cancel()
        self.failureResultOf(abandoned, CancelledError)
        response, text = yield call
        self.assertTrue(text.endswith("data: [DONE]\n\n"))
        self.assertTrue(drained.called)

    @inlineCallbacks
    def test_close_mid_stream(self):
        self.upstream.kimi.chunk_interval = 0.2
        gateway = self.gateway()
        body = json.dumps({"model": "kimi/moonshot-v1-8k", "messages": HELLO, "stream": True}).encode()
        headers = {"Content-Type": ["application/json"], "Authorization": [f"Bearer {GATEWAY_KEY}"]}
        # treq fires at the answer's head: the stream has started (before
        # it, a close answers 503 shutting_down, another test's case).
        response = yield self.http().post(
            f"http://127.0.0.1:{gateway.api_port}/v1/chat/completions", data=body, headers=headers
        )
        self.assertEqual(response.code, 200)
        yield gateway.service.api_site.close_connections()
        yield self.upstream.kimi.when_streams_lost(1)
        # Ended with what happened, not cut: an error event, no [DONE].
        text = yield response.text("utf-8")
        self.assertNotIn("[DONE]", text)
        self.assertIn('"code":"shutting_down"', text.strip().split("\n\n")[-1])
        self.assertEqual(gateway.service.api_site.context.in_flight, 0)
