"""
L{EmbeddingsCall} alone, without a reactor or sockets: a stand-in agent
whose answers the test gives one by one, a stand-in context that records
what is counted.  What the end-to-end tests (tests/test_embeddings.py)
cannot pin down: what a consumer is billed when its client leaves part of
the way through a call of several batches, and the breaker's verdicts on
the provider call cut short.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from openclaw.consumers.table import GATEWAY
from openclaw.dataplane.answer import CLIENT_GONE
from openclaw.dataplane.context import APIContext
from openclaw.dataplane.embeddings import EmbeddingRequest, EmbeddingsCall, estimated_tokens
from openclaw.providers.breaker import BreakerState, CircuitBreaker
from openclaw.providers.embeddings import EmbeddingsWire
from openclaw.providers.keys import KeyPool
from openclaw.providers.openai_compatible import OpenAICompatibleAdapter, OpenAIEmbeddings
from openclaw.routing import Route

#: Five texts, three batches of at most two.
INPUTS = ("alpha text", "beta text", "gamma text", "delta text", "epsilon")


@attrs.define(kw_only=True)
class AcmeAdapter(OpenAICompatibleAdapter):
    """
    An OpenAI-compatible provider whose embeddings API takes two texts a call.
    """

    id: ClassVar[str] = "acme"
    display_name: ClassVar[str] = "Acme"
    key_variables: ClassVar[tuple[str, ...]] = ("ACME_API_KEY",)
    base_url_variable: ClassVar[str] = "ACME_BASE_URL"
    default_base_url: ClassVar[str] = "http://acme.invalid/v1"
    model_variable: ClassVar[str] = "ACME_MODEL"
    default_model_id: ClassVar[str] = "acme-chat"
    embeddings: ClassVar[EmbeddingsWire | None] = OpenAIEmbeddings(default_model="acme-embed", batch_size=2)


@implementer(IAgent)
class HeldAgent:
    """
    Each request waits until the test answers it (L{Held.answer}).
    """

    def __init__(self) -> None:
        self.held: list[Deferred[IResponse]] = []

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: IBodyProducer | None = None
    ) -> Deferred[IResponse]:
        held: Deferred[IResponse] = Deferred()
        self.held.append(held)
        return held


@implementer(IResponse)
@attrs.define
class Answer:
    """
    A whole upstream answer: its body delivered at once.
    """

    code: int
    body: bytes
    headers: Headers = attrs.field(factory=Headers)
    phrase: bytes = b""
    version: tuple[bytes, int, int] = (b"HTTP", 1, 1)
    length: int = 0
    request: Any = None
    previousResponse: Any = None

    def deliverBody(self, protocol: Any) -> None:
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))

    def setPreviousResponse(self, response: Any) -> None:
        pass


def vectors(count: int, tokens: int) -> Answer:
    """
    OpenAI's answer with C{count} vectors, counting C{tokens} input tokens.
    """
    data = ",".join(f'{{"index": {i}, "embedding": [0.5, 0.25]}}' for i in range(count))
    return Answer(200, f'{{"data": [{data}], "usage": {{"prompt_tokens": {tokens}}}}}'.encode())


@attrs.define
class Accounting:
    """
    What a consumer table is told (L{ConsumerTable.account}).
    """

    rows: list[tuple[str, int, Any]] = attrs.field(factory=list)

    def account(self, holder: Any, provider: str, model: str, status: int, usage: Any, seconds: float) -> None:
        self.rows.append((provider, status, usage))


@attrs.define
class Context:
    """
    What an L{EmbeddingsCall} reads of its L{APIContext}: the counts it
    makes recorded.
    """

    reactor: Clock = attrs.field(factory=Clock)
    timeout: float = 30.0
    consumers: Accounting = attrs.field(factory=Accounting)
    log: Logger = attrs.field(factory=Logger)
    in_flight: int = 0
    #: The calls a stop's grace tells (L{APIContext.chat_calls}).
    chat_calls: set[Any] = attrs.field(factory=set)
    #: C{(status, outcome, provider)} of each request counted.
    completed_calls: list[tuple[int, str | None, str | None]] = attrs.field(factory=list)

    def call_started(self) -> None:
        self.in_flight += 1

    def call_ended(self) -> None:
        self.in_flight -= 1

    def completed(
        self, request: Any, started: float, status: int, route: Any = None, *, outcome: str | None = None, **rest: Any
    ) -> None:
        self.completed_calls.append((status, outcome, rest.get("provider")))


class ClientRequest:
    """
    The client's request, as far as an embeddings call uses it for an
    answer that fits one write.
    """

    def __init__(self) -> None:
        self.finished: Deferred[None] = Deferred()
        self.code = 200
        self.headers: dict[bytes, bytes] = {}
        self.written = b""
        self.done = False

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value

    def write(self, data: bytes) -> None:
        self.written += data

    def finish(self) -> None:
        self.done = True

    def notifyFinish(self) -> Deferred[None]:
        return self.finished

    def leave(self) -> None:
        self.finished.errback(Failure(ConnectionError("the client left")))


class EmbeddingsCallTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.context = Context()
        self.agent = HeldAgent()
        clock = self.context.reactor
        # One failure opens it: a verdict the call should not give shows.
        self.breaker = CircuitBreaker(clock.seconds, threshold=1)
        self.adapter = AcmeAdapter(
            http=cast(Any, None),
            reactor=clock,
            base_url="http://acme.invalid/v1",
            api_key="acme-key-1",
            default_model="acme-chat",
            timeout=30.0,
            agent=self.agent,
            keys=KeyPool(("acme-key-1", "acme-key-2"), clock.seconds, "acme"),
            breaker=self.breaker,
        )
        self.request = ClientRequest()
        parsed = EmbeddingRequest(INPUTS, "acme", "acme-embed", None, "float")
        self.call = EmbeddingsCall(
            cast(APIContext, self.context),
            cast(Any, self.request),
            self.adapter,
            parsed,
            Route("acme", "acme-embed"),
            0.0,
            GATEWAY,
        )

    def test_client_leaves_after_two_of_three_batches(self) -> None:
        """
        A client that leaves while the second of three batches is with the
        provider: its call is cancelled, the third batch never sent, no
        verdict given to the breaker (it is no failure of the provider's),
        and the call counted 499 C{client gone}, billed the estimate of
        the four texts sent, not of all five.
        """
        self.call.start()
        self.assertEqual(self.context.in_flight, 1)
        self.agent.held[0].callback(vectors(2, 7))
        self.assertEqual(len(self.agent.held), 2)
        self.request.leave()
        self.assertTrue(self.call.client_gone)
        self.assertEqual(len(self.agent.held), 2)
        self.assertEqual(self.context.completed_calls, [(499, CLIENT_GONE, "acme")])
        sent = {"prompt_tokens": estimated_tokens(INPUTS[:4])}
        self.assertEqual(self.context.consumers.rows, [("acme", 499, sent)])
        self.assertNotEqual(sent, {"prompt_tokens": estimated_tokens(INPUTS)})
        self.assertEqual(self.context.in_flight, 0)
        self.assertIs(self.breaker.state, BreakerState.CLOSED)

    def test_stop_after_two_of_three_batches(self) -> None:
        """
        A stop whose grace runs out while the second of three batches is
        with the provider: the client is answered 503 C{shutting_down}, the
        call cancelled (the third batch never sent, no verdict to the
        breaker), counted once as 503 and billed the four texts sent, as
        for a client gone; the call is no longer among those a stop tells.
        """
        self.call.start()
        self.assertEqual(self.context.chat_calls, {self.call})
        self.agent.held[0].callback(vectors(2, 7))
        self.call.shut_down()
        self.assertEqual((self.request.code, self.request.done), (503, True))
        self.assertIn(b"shutting_down", self.request.written)
        self.assertEqual(self.request.headers[b"Retry-After"], b"1")
        self.assertEqual(len(self.agent.held), 2)
        self.assertEqual(self.context.completed_calls, [(503, "shutting_down", "acme")])
        self.assertEqual(self.context.consumers.rows, [("acme", 503, {"prompt_tokens": estimated_tokens(INPUTS[:4])})])
        self.assertEqual((self.context.in_flight, self.context.chat_calls), (0, set()))
        self.assertIs(self.breaker.state, BreakerState.CLOSED)
        # Told again, or its client leaving then: nothing more.
        self.call.shut_down()
        self.request.leave()
        self.assertEqual(len(self.context.completed_calls), 1)

    def test_client_leaves_before_any_call(self) -> None:
        """
        A client that leaves once nothing was sent (no usable key): billed
        nothing, the provider counted as not called.
        """
        for key in self.adapter.keys.keys:
            self.adapter.keys.set_aside(key)
        self.request.leave()
        self.call.start()
        self.assertEqual(self.agent.held, [])
        self.assertEqual(self.context.completed_calls, [(499, CLIENT_GONE, "-")])
        self.assertEqual(self.context.consumers.rows, [("acme", 499, None)])

    def test_client_leaves_during_a_retry(self) -> None:
        """
        A batch refused with 429 on one key and made once more on another
        was sent once: a client that leaves meanwhile is billed the
        estimate of that batch's two texts, not of two batches' four (the
        count of provider calls is not the count of batches).
        """
        self.call.start()
        self.agent.held[0].callback(Answer(429, b'{"error": {"message": "slow down"}}'))
        self.assertEqual(len(self.agent.held), 2)
        self.assertEqual(len(self.call.calls), 2)
        self.request.leave()
        self.assertEqual(self.context.completed_calls, [(499, CLIENT_GONE, "acme")])
        self.assertEqual(self.context.consumers.rows, [("acme", 499, {"prompt_tokens": estimated_tokens(INPUTS[:2])})])

    def test_no_answer_in_time(self) -> None:
        """
        A provider that does not answer the second batch within
        UPSTREAM_TIMEOUT: its call is the provider's failure (the breaker
        opens at its threshold of one), the client answered 504
        C{upstream_timeout} and the consumer billed nothing (a failure).
        """
        self.call.start()
        self.agent.held[0].callback(vectors(2, 7))
        self.context.reactor.advance(self.context.timeout)
        self.assertIs(self.breaker.state, BreakerState.OPEN)
        self.assertEqual((self.request.code, self.request.done), (504, True))
        self.assertIn(b"upstream_timeout", self.request.written)
        self.assertEqual(self.context.completed_calls, [(504, "upstream_timeout", "acme")])
        self.assertEqual(self.context.consumers.rows, [("acme", 504, None)])
        self.assertEqual(self.context.in_flight, 0)
