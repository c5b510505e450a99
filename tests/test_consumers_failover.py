"""
A consumer's call is failed over only within the consumer's models: one
allowed only gemini/* gets Gemini's error, not Kimi's answer; one allowed
both is failed over as before.  The openai SDK against a gateway in this
process, the stand-in upstream on 127.0.0.1.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from tests.test_consumers import GatewayCase
from tests.test_dataplane import HELLO


class FailoverTests(GatewayCase):
    @inlineCallbacks
    def test_failover_stays_within_models(self) -> Any:
        """
        A consumer allowed only gemini/* whose call to a failing Gemini
        would fail over to Kimi gets Gemini's error instead; a consumer
        allowed both is failed over as before.
        """
        gateway, client = yield self.gateway()
        active = gateway.service.route.current
        self.assertEqual(active.provider_id, "gemini")
        gonly = yield self.command(gateway, client, "consumer_create", {"name": "gonly", "models": ["gemini/*"]})
        both = yield self.command(gateway, client, "consumer_create", {"name": "both"})
        self.upstream.gemini.mode = "error"
        kimi_calls = self.upstream.kimi.requests
        refused = yield self.refused(self.sdk(gateway, gonly["key"]), active.model)
        self.assertEqual(refused.status_code, 502)
        self.assertIn("(not failed over to kimi: this key may not use kimi's model)", refused.message)
        self.assertEqual(refused.response.headers.get("x-openclaw-provider"), "gemini")
        self.assertIsNone(refused.response.headers.get("x-openclaw-fallback"))
        self.assertEqual(self.upstream.kimi.requests, kimi_calls)
        self.assertTrue(
            any(
                "call not failed over" in str(e.get("log_format")) and e.get("consumer") == "gonly" for e in self.events
            )
        )
        answer = yield deferToThread(
            self.sdk(gateway, both["key"]).chat.completions.with_raw_response.create, model=active.model, messages=HELLO
        )
        self.assertEqual(answer.headers.get("x-openclaw-provider"), "kimi")
        [failover] = [e for e in self.events if str(e.get("log_format", "")).startswith("call failed over")]
        self.assertEqual(failover["consumer"], "both")
        usage = yield self.command(gateway, client, "usage", {"group_by": "consumer"})
        by_name = {group["consumer"]: group for group in usage["groups"]}
        self.assertEqual(by_name["gonly"]["requests"], 1)
        self.assertEqual(by_name["gonly"]["prompt_tokens"], 0)
