"""
The audit line of a consumer command names the consumer, the key prefix
made or revoked (never the key), the fields changed and, for a refused
command, the error its client was told, in the text and as structured
fields.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from openclaw.consumers.audit import audit_fields
from tests.test_consumers import GatewayCase


class AuditFieldsTests(SynchronousTestCase):
    def test_names_usage_reads_are_logged_as_given(self) -> None:
        """
        The names C{usage} reads besides a consumer's, C{-} (the calls
        made with GATEWAY_API_KEYS' keys) and a deleted consumer's
        C{NAME@CREATED}, are logged as given, not as C{<invalid>}
        (trial s33 F7); what no name can be still is.
        """
        retired = "search@2026-11-25T02:39:29Z"
        self.assertEqual(audit_fields("usage", {"name": "-"}), {"consumer": "-"})
        self.assertEqual(audit_fields("usage", {"name": retired}), {"consumer": retired})
        self.assertEqual(audit_fields("usage", {"name": "search"}), {"consumer": "search"})
        for junk in ("a b", "x\x1b[2J", "search@yesterday", "-@2026-11-25T02:39:29", 7, None, "x" * 65):
            self.assertEqual(audit_fields("usage", {"name": junk}), {"consumer": "<invalid>"}, junk)


class AuditTests(GatewayCase):
    @inlineCallbacks
    def test_audit_lines_name_the_consumer(self) -> Any:
        """
        The audit line of a consumer command names the consumer, the key
        prefix made or revoked (never the key) and the fields changed, and
        a refused one the error its client was told, in the text and as
        structured fields.
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "search", "rpm": 5})
        yield self.command(gateway, client, "consumer_update", {"name": "search", "rpm": 9, "tpm": 900})
        made = yield self.command(gateway, client, "key_create", {"name": "search"})
        yield self.command(gateway, client, "key_revoke", {"name": "search", "key_prefix": made["key_prefix"]})
        refused = yield client.command(gateway.token, "consumer_update", {"name": "search", "rpm": -1})
        self.assertFalse(refused["ok"])
        audits = {}
        for event in self.events:
            if event.get("cmd", "").startswith(("consumer_", "key_")) and "outcome" in event:
                audits.setdefault(event["cmd"], []).append(event)
        lines = {cmd: [formatEvent(e) for e in events] for cmd, events in audits.items()}
        self.assertRegex(lines["consumer_create"][0], r": ok in [0-9.]+ ms consumer=search changed=rpm key_prefix=")
        self.assertEqual(audits["consumer_create"][0]["key_prefix"], created["key_prefix"])
        self.assertRegex(lines["consumer_update"][0], r": ok in [0-9.]+ ms consumer=search changed=rpm,tpm$")
        self.assertEqual(
            (audits["consumer_update"][0]["consumer"], audits["consumer_update"][0]["changed"]), ("search", "rpm,tpm")
        )
        self.assertRegex(
            lines["consumer_update"][1], r": error in [0-9.]+ ms consumer=search changed=rpm error=rpm must be a whole"
        )
        self.assertEqual(audits["consumer_update"][1]["error"], refused["error"])
        self.assertTrue(lines["key_create"][0].endswith(f"consumer=search key_prefix={made['key_prefix']}"))
        self.assertTrue(lines["key_revoke"][0].endswith(f"consumer=search key_prefix={made['key_prefix']}"))
        yield self.command(gateway, client, "usage", {"name": "-"})
        (usage,) = [event for event in self.events if event.get("cmd") == "usage" and "outcome" in event]
        self.assertEqual(usage["consumer"], "-")
        every = "\n".join(formatEvent(e) + repr(e) for e in self.events)
        for key in (created["key"], made["key"]):
            self.assertNotIn(key, every)
            self.assertNotIn(key[4:20], every)
