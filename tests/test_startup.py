"""
What start-up tells an operator: one warning line for each thing they would
otherwise find out the hard way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from openclaw.routing import Route
from openclaw.settings import Settings
from openclaw.state import RouteStore
from tests.support import start_gateway


class StartupWarningTests(TestCase):
    def warnings_of(self, **settings: Any) -> list[str]:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            start_gateway(self, **settings)
        finally:
            globalLogPublisher.removeObserver(events.append)
        return [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]

    def test_nothing_to_say(self):
        """
        Keys for every provider and for clients, the configured route: no
        warning.
        """
        configured = Settings().with_provider("kimi", api_key="k").with_provider("gemini", api_key="g")
        warnings = self.warnings_of(api=True, providers=configured.providers, gateway_api_keys=("client",))
        self.assertEqual(warnings, [])

    def test_missing_keys(self):
        """
        A provider without a key and an API without client keys: one line
        each, naming the setting and what follows from it.
        """
        configured = Settings().with_provider("kimi", api_key="k")
        warnings = self.warnings_of(api=True, providers=configured.providers)
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn(
            "GEMINI_API_KEY is not set: calls to gemini fail over to another provider (FALLBACK) when one can "
            "take them, and calls pinned to it (gemini/...) are refused with 503, until it is set",
            warnings[0],
        )
        self.assertIn("GATEWAY_API_KEYS is not set: every /v1 call will be refused with 401", warnings[1])
        # With FALLBACK=off, nothing fails over.
        warnings = self.warnings_of(api=True, providers=configured.providers, gateway_api_keys=("c",), fallback="off")
        self.assertEqual(
            warnings, ["GEMINI_API_KEY is not set: calls to gemini are refused with 503 (FALLBACK=off) until it is set"]
        )

    def test_no_api_no_key_warnings(self):
        """
        Without an API listener nothing calls a provider: keys are not
        warned about.
        """
        self.assertEqual(self.warnings_of(api=False), [])

    def test_restored_route(self):
        """
        An active provider restored from the state file, other than
        DEFAULT_PROVIDER's, is said once; the configured one is not.
        """
        state_dir = Path(self.mktemp())
        state_dir.mkdir()
        store = RouteStore(state_dir, ("kimi", "gemini"))
        store.save(Route("kimi", "moonshot-v1-32k"))
        warnings = self.warnings_of(state_dir=state_dir, default_provider="gemini")
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("the active provider is kimi/moonshot-v1-32k, restored from", warnings[0])
        self.assertIn("rather than DEFAULT_PROVIDER=gemini", warnings[0])

        store.save(Route("gemini", Settings().default_model("gemini")))
        self.assertEqual(self.warnings_of(state_dir=state_dir, default_provider="gemini"), [])
