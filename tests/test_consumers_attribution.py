"""
An expired consumer's refusals are logged (method, path, consumer) and
counted in its metrics, as its models listings are; a consumer whose
expiry is already past at creation is refused.  The openai SDK against a
gateway in this process.
"""

from __future__ import annotations

from typing import Any

import openai
from prometheus_client import generate_latest
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from tests.test_consumers import GatewayCase


class AttributionTests(GatewayCase):
    @inlineCallbacks
    def test_expired_and_listing_attributed(self) -> Any:
        """
        An expired consumer's refusals are logged with method, path and
        consumer and counted in its metrics; a models listing counts in
        openclaw_consumer_requests_total.
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "old"})
        sdk = self.sdk(gateway, created["key"])
        yield deferToThread(lambda: list(sdk.models.list()))
        updated = yield self.command(gateway, client, "consumer_update", {"name": "old", "expires_at": "2020-01-01"})
        self.assertIn("expires_at is past", updated["warning"])
        refused = yield self.refused(sdk, "kimi/moonshot-v1-8k")
        self.assertEqual((refused.status_code, refused.code), (401, "expired_api_key"))
        try:
            yield deferToThread(lambda: list(sdk.models.list()))
        except openai.AuthenticationError as e:
            self.assertEqual(e.code, "expired_api_key")
        else:
            self.fail("an expired consumer listed the models")
        lines = [e for e in self.events if e.get("status") == 401]
        self.assertEqual(
            [(e["method"], e["path"], e["consumer"]) for e in lines],
            [("POST", "/v1/chat/completions", "old"), ("GET", "/v1/models", "old")],
        )
        metrics = generate_latest(gateway.service.metrics.registry).decode()
        self.assertIn('openclaw_consumer_requests_total{consumer="old",status="401"} 2.0', metrics)
        self.assertIn('openclaw_consumer_requests_total{consumer="old",status="200"} 1.0', metrics)
        self.assertIn('openclaw_consumer_limited_total{consumer="old",reason="expired_api_key"} 2.0', metrics)

    @inlineCallbacks
    def test_expiry_already_past_at_creation(self) -> Any:
        gateway, client = yield self.gateway()
        answer = yield client.command(gateway.token, "consumer_create", {"name": "late", "expires_at": "2020-01-01"})
        self.assertFalse(answer["ok"])
        self.assertIn("already past", answer["error"])
