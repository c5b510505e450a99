"""
A consumer's C{models} patterns checked against the gateway's providers
(trial s27: C{KIMI/*}, C{kimi/[} and C{openai/*} were taken without a word,
and the C{KIMI/*} consumer got 403 model_not_allowed on every model).
"""

from __future__ import annotations

import fnmatch
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from openclaw.consumers.model import (
    InvalidConsumer,
    consumer_changes,
    models_warning,
    pattern_providers,
    unclosed_bracket,
)
from tests.test_consumers import GatewayCase

PROVIDERS = ("gemini", "kimi")


class PatternTests(TestCase):
    def test_providers_a_pattern_may_allow(self) -> None:
        """
        Exactly the providers some C{provider/model} of which the pattern
        matches (fnmatch's C{*} spans C{/}: C{*x/foo} matches
        C{kimi/x/foo}).
        """
        for pattern, providers in (
            ("kimi/*", ["kimi"]),
            ("KIMI/*", []),
            ("openai/*", []),
            ("*/gpt-4o", ["gemini", "kimi"]),
            ("gem?ni/*", ["gemini"]),
            ("[gk]*/x", ["gemini", "kimi"]),
            ("k*/x", ["kimi"]),
            ("*x/foo", ["gemini", "kimi"]),
            ("kim/*", []),
            ("kimi-2/*", []),
        ):
            self.assertEqual(pattern_providers(pattern, PROVIDERS), providers, pattern)
            for provider in PROVIDERS:
                # Checked against a model the pattern's rest matches.
                model = "x/foo" if pattern == "*x/foo" else ("gpt-4o" if "gpt" in pattern else "x")
                self.assertEqual(
                    fnmatch.fnmatchcase(f"{provider}/{model}", pattern), provider in providers, (pattern, provider)
                )

    def test_warning_names_the_pattern_and_the_providers(self) -> None:
        warning = models_warning(["KIMI/*"], PROVIDERS)
        assert warning is not None
        self.assertIn("'KIMI/*'", warning)
        self.assertIn("did you mean 'kimi/*'?", warning)
        self.assertIn("(gemini, kimi;", warning)
        self.assertIn("allows no model", warning)
        warning = models_warning(["openai/*", "kimi/moonshot-v9"], PROVIDERS)
        assert warning is not None
        self.assertIn("'openai/*' names no provider of this gateway", warning)
        self.assertNotIn("moonshot-v9", warning)
        self.assertIn("lower-case: kimi", models_warning(["K*/x"], PROVIDERS) or "")
        for fine in (["kimi/*"], ["*/x"], ["gemini/gemini-2.5-*", "kimi/moonshot-v1-8k"], []):
            self.assertIsNone(models_warning(fine, PROVIDERS), fine)
        # Not checked without the gateway's providers.
        self.assertIsNone(models_warning(["KIMI/*"], ()))

    def test_unclosed_bracket_refused(self) -> None:
        """
        fnmatch takes a C{[} no C{]} closes as a literal C{[}: C{kimi/[}
        would allow the model named C{[} only.  Refused; a closed set or
        C{[[]} (a literal C{[}) is taken.
        """
        for pattern, unclosed in (
            ("kimi/[", True),
            ("kimi/moonshot-v1-[8k", True),
            ("kimi/[]", True),
            ("kimi/[]]", False),
            ("kimi/[!]x]", False),
            ("kimi/moonshot-v1-[0-9]*k", False),
            ("kimi/[[]", False),
            ("kimi/a]", False),
        ):
            self.assertEqual(unclosed_bracket(pattern), unclosed, pattern)
            # As fnmatch reads it: unclosed, the '[' is a literal.
            self.assertEqual(fnmatch.fnmatchcase(pattern, pattern), unclosed or pattern == "kimi/a]", pattern)
        with self.assertRaises(InvalidConsumer) as caught:
            consumer_changes({"name": "a", "models": ["kimi/*", "kimi/["]})
        self.assertIn("models: 'kimi/[' holds a '[' with no closing ']'", str(caught.exception))
        self.assertIn("[[]", str(caught.exception))
        self.assertEqual(consumer_changes({"name": "a", "models": ["kimi/[[]"]})["models"], ("kimi/[[]",))


class PatternCommandTests(GatewayCase):
    @inlineCallbacks
    def test_create_and_update_warn(self) -> Any:
        """
        The gateway's providers (the stand-in's kimi and gemini) are what
        the patterns are checked against; the consumer is made all the same.
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "shout", "models": ["KIMI/*"]})
        self.assertEqual(created["consumer"]["models"], ["KIMI/*"])
        self.assertIn("did you mean 'kimi/*'?", created["warning"])
        self.assertIn("(gemini, kimi;", created["warning"])
        fine = yield self.command(gateway, client, "consumer_create", {"name": "fine", "models": ["kimi/*"]})
        self.assertNotIn("warning", fine)
        updated = yield self.command(
            gateway,
            client,
            "consumer_update",
            {"name": "fine", "models": ["openai/*", "kimi/moonshot-v9"], "expires_at": "2020-01-01"},
        )
        self.assertIn("expires_at is past", updated["warning"])
        self.assertIn("; models: 'openai/*' names no provider of this gateway", updated["warning"])
        # Other fields changed: the patterns are not checked again.
        unchanged = yield self.command(gateway, client, "consumer_update", {"name": "shout", "rpm": 5})
        self.assertNotIn("warning", unchanged)
        refused = yield client.command(gateway.token, "consumer_update", {"name": "fine", "models": ["kimi/["]})
        self.assertFalse(refused["ok"])
        self.assertIn("holds a '[' with no closing ']'", str(refused))
