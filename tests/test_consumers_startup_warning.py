"""
The start-up warning of a gateway without GATEWAY_API_KEYS says every
/v1 call will be refused unless it carries a consumer's key.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from tests.support import start_gateway
from tests.test_consumers import GatewayCase


class StartupWarningTests(GatewayCase):
    def test_startup_warning_names_consumer_keys(self) -> None:
        warnings: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_level") == LogLevel.warn:
                warnings.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        try:
            start_gateway(self, api=True, providers=self.upstream.provider_settings())
        finally:
            globalLogPublisher.removeObserver(observe)
        [line] = [w for w in warnings if "GATEWAY_API_KEYS" in w]
        self.assertIn("unless it carries a consumer's key", line)
