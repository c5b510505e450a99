"""
A request answered later (C{NOT_DONE_YET}) is never left without an
answer: when the code answering it raises (a bug), the client gets 500
C{internal_error} in OpenAI's error shape, not a hang
(L{openclaw.dataplane.resource.answer_bug}).  A provider module defined
only here makes the listing and the embeddings path raise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import attrs
import openai
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from openclaw.dataplane.request import ChatRequest
from openclaw.dataplane.sse import Event
from openclaw.providers.embeddings import EmbeddingsWire
from openclaw.providers.openai_compatible import OpenAICompatibleAdapter, OpenAIEmbeddings, OpenAIStream, OpenAIWire
from openclaw.providers.wire import Wire
from openclaw.settings import load_settings
from openclaw.testing.upstream import ProviderBehaviour, StandInUpstream
from tests.support import KIMI_AND_GEMINI, RunningGateway, free_port, openai_client, start_gateway_from

GATEWAY_KEY = "gw-key-0123456789abcdef"
HELLO = [{"role": "user", "content": "Hello"}]


class Unserialisable:
    """
    A model id no JSON encoder takes.
    """


@attrs.define(kw_only=True)
class FaultyAdapter(OpenAICompatibleAdapter):
    """
    A provider module with two bugs: its listing holds a model id that is
    not a string, and describing a failed exchange raises.
    """

    id: ClassVar[str] = "faulty"
    display_name: ClassVar[str] = "Faulty"
    key_variables: ClassVar[tuple[str, ...]] = ("FAULTY_API_KEY",)
    base_url_variable: ClassVar[str] = "FAULTY_BASE_URL"
    default_base_url: ClassVar[str] = "https://api.faulty.example/v1"
    model_variable: ClassVar[str] = "FAULTY_MODEL"
    default_model_id: ClassVar[str] = "faulty-chat"
    embeddings: ClassVar[EmbeddingsWire | None] = OpenAIEmbeddings(default_model="faulty-embed")

    def list_models(self) -> Deferred[list[str]]:
        return succeed([Unserialisable()])  # type: ignore[list-item]

    def describe(self, reason: Failure) -> str:
        raise RuntimeError("a bug in describe")


class LastErrbackTests(TestCase):
    timeout = 60

    def gateway(self) -> RunningGateway:
        cwd = Path(self.mktemp())
        cwd.mkdir(parents=True)
        variables = {
            "FAULTY_API_KEY": "sk-faulty-0123456789",
            # Nothing listens there: the embeddings call fails to connect.
            "FAULTY_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
            "GATEWAY_API_KEYS": GATEWAY_KEY,
            "EMBEDDING_MODEL": "faulty/faulty-embed",
        }
        settings = load_settings(variables, cwd=cwd, providers=(FaultyAdapter,))
        return start_gateway_from(self, settings, fallback="off")

    def sdk(self, gateway: RunningGateway) -> openai.OpenAI:
        client: openai.OpenAI = openai_client(self, gateway.api_port, GATEWAY_KEY, timeout=5)
        return client

    def assertInternalError(self, error: Any) -> None:
        self.assertIsInstance(error, openai.InternalServerError)
        self.assertEqual(error.status_code, 500)
        self.assertEqual(error.body["code"], "internal_error")
        self.assertEqual(error.body["type"], "server_error")
        self.assertIn("details are in its log", error.body["message"])

    @inlineCallbacks
    def call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            yield deferToThread(function, *args, **kwargs)
        except openai.APIError as error:
            return error
        self.fail("the call succeeded")

    @inlineCallbacks
    def test_models_listing(self) -> Any:
        """
        Writing the listing raises: 500, and the gateway serves the next
        call.
        """
        gateway = self.gateway()
        client = self.sdk(gateway)
        for _ in range(2):
            error = yield self.call(client.models.list)
            self.assertInternalError(error)
        self.flushLoggedErrors(TypeError)

    @inlineCallbacks
    def test_embeddings(self) -> Any:
        """
        Turning the failed call into an error raises: 500.
        """
        gateway = self.gateway()
        client = self.sdk(gateway)
        error = yield self.call(client.embeddings.create, model="faulty/faulty-embed", input="a b")
        self.assertInternalError(error)
        self.flushLoggedErrors(RuntimeError)


class BuggyStream(OpenAIStream):
    """
    A stream translation with a bug: it raises on the event numbered
    L{BuggyWire.fails_at} (from 1).
    """

    def payloads(self, event: Event) -> list[bytes]:
        self.seen = getattr(self, "seen", 0) + 1
        if self.seen == BuggyWire.fails_at[0]:
            raise RuntimeError("a bug in the stream's translation")
        return super().payloads(event)


class BuggyWire(OpenAIWire):
    #: The event whose translation raises (a list: set by the test).
    fails_at: ClassVar[list[int]] = [1]

    def stream(self, chat: ChatRequest, model: str, created: int) -> OpenAIStream:
        return BuggyStream(include_usage=chat.include_usage)


@attrs.define(kw_only=True)
class BuggyAdapter(OpenAICompatibleAdapter):
    """
    An OpenAI-compatible provider module whose stream translation raises.
    """

    id: ClassVar[str] = "buggy"
    display_name: ClassVar[str] = "Buggy"
    key_variables: ClassVar[tuple[str, ...]] = ("BUGGY_API_KEY",)
    base_url_variable: ClassVar[str] = "BUGGY_BASE_URL"
    default_base_url: ClassVar[str] = "https://api.buggy.example/v1"
    model_variable: ClassVar[str] = "BUGGY_MODEL"
    default_model_id: ClassVar[str] = "buggy-chat"
    wire: ClassVar[Wire] = BuggyWire()


class StreamTranslationBugTests(TestCase):
    """
    A bug in translating a provider's stream is the gateway's fault, not
    the provider's (review s25): logged with its traceback and answered
    C{internal_error} (a 500 before the stream began, its last event
    after), never failed over nor counted by the provider's breaker.
    Left to escape, Twisted's HTTP client dropped the upstream connection
    and the call read that as the provider's stream cut short: no
    traceback, a failover, and after BREAKER_FAILURES calls the breaker
    open.
    """

    timeout = 60
    declared = (*KIMI_AND_GEMINI, BuggyAdapter)

    def setUp(self) -> None:
        self.upstream = StandInUpstream(
            reactor,
            providers=self.declared,
            behaviours={"buggy": ProviderBehaviour(key="sk-buggy-0123456789", models=["buggy-chat"])},
        )
        self.upstream.listen(0, "127.0.0.1")
        self.addCleanup(self.upstream.stop)
        self.addCleanup(BuggyWire.fails_at.__setitem__, 0, 1)

    def gateway(self) -> RunningGateway:
        cwd = Path(self.mktemp())
        cwd.mkdir(parents=True)
        variables = {
            **self.upstream.environment(self.declared),
            "GATEWAY_API_KEYS": GATEWAY_KEY,
            "DEFAULT_PROVIDER": "buggy",
            "BREAKER_FAILURES": "2",
        }
        settings = load_settings(variables, cwd=cwd, providers=self.declared)
        return start_gateway_from(self, settings)

    @inlineCallbacks
    def test_before_the_first_chunk(self) -> Any:
        gateway = self.gateway()
        client: openai.OpenAI = openai_client(self, gateway.api_port, GATEWAY_KEY, timeout=5)

        def streamed() -> Any:
            try:
                list(client.chat.completions.with_raw_response.create(model="x", messages=HELLO, stream=True).parse())
            except openai.APIError as error:
                return error
            self.fail("the call succeeded")

        for _ in range(3):
            error = yield deferToThread(streamed)
            self.assertIsInstance(error, openai.InternalServerError)
            self.assertEqual(error.body["code"], "internal_error")
            self.assertNotIn("x-openclaw-fallback", error.response.headers)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)
        self.assertEqual(self.upstream.kimi.requests + self.upstream.gemini.requests, 0)
        # Three calls over BREAKER_FAILURES, none counted against the provider.
        self.assertEqual(gateway.service.providers.get("buggy").breaker.state, "closed")

    @inlineCallbacks
    def test_mid_stream(self) -> Any:
        BuggyWire.fails_at[0] = 3
        gateway = self.gateway()
        client: openai.OpenAI = openai_client(self, gateway.api_port, GATEWAY_KEY, timeout=5)

        def streamed() -> Any:
            chunks = []
            try:
                for chunk in client.chat.completions.create(model="x", messages=HELLO, stream=True):
                    chunks.append(chunk)  # noqa: PERF402 (those before the error are kept)
            except openai.APIError as error:
                return chunks, error
            self.fail("the call succeeded")

        chunks, error = yield deferToThread(streamed)
        self.assertTrue(chunks)
        self.assertIn("details are in its log", error.message)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.upstream.kimi.requests + self.upstream.gemini.requests, 0)
