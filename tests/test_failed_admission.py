"""
A consumer's admission that fails (the cluster's counters on a Redis reply
of an unexpected shape) answers the client 500 in OpenAI's shape, leaves
no call in flight, and does not hold up a stop.
"""

from __future__ import annotations

from typing import Any

import attrs
import openai
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks
from twisted.internet.threads import deferToThread

from openclaw.consumers.table import Counters
from tests.test_consumers import GatewayCase
from tests.test_dataplane import HELLO


@attrs.define
class BrokenCounters:
    """
    Counters whose admissions fail, as the cluster's do on a Redis reply
    of an unexpected shape.
    """

    counters: Counters

    def admit(self, *args: Any, **kwargs: Any) -> Deferred[None]:
        return fail(ValueError("unexpected reply from Redis"))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.counters, name)


class FailedAdmissionTests(GatewayCase):
    """
    An admission that fails answers the client (500 in OpenAI's shape) and
    leaves no call in flight.
    """

    @inlineCallbacks
    def test_failed_admission_answers_and_stop_does_not_wait(self) -> Any:
        gateway, client = yield self.gateway(shutdown_grace_seconds=30.0)
        created = yield self.command(gateway, client, "consumer_create", {"name": "app", "rpm": 100})
        consumers = gateway.service.consumers
        consumers.counters = BrokenCounters(consumers.counters)
        sdk = self.sdk(gateway, created["key"])
        for call in (
            lambda: sdk.chat.completions.create(model="kimi/moonshot-v1-8k", messages=HELLO),
            lambda: sdk.models.list(),
        ):
            began = reactor.seconds()
            try:
                yield deferToThread(call)
            except openai.InternalServerError as e:
                self.assertEqual(e.status_code, 500)
                self.assertEqual(e.body["code"], "internal_error")  # type: ignore[index]
            else:
                self.fail("the call was not refused")
            self.assertLess(reactor.seconds() - began, 5.0)
        self.assertEqual(gateway.service.api_site.context.in_flight, 0)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)
        began = reactor.seconds()
        yield gateway.service.stopService()
        self.assertLess(reactor.seconds() - began, 10.0)
