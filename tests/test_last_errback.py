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
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from openclaw.providers.embeddings import EmbeddingsWire
from openclaw.providers.openai_compatible import OpenAICompatibleAdapter, OpenAIEmbeddings
from openclaw.settings import load_settings
from tests.support import RunningGateway, free_port, openai_client, start_gateway_from

GATEWAY_KEY = "gw-key-0123456789abcdef"


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
