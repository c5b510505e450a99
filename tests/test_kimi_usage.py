"""
A Kimi answer's usage as OpenAI's clients read it: Moonshot counts the
prompt tokens its context cache served in a top-level C{cached_tokens};
the openai SDK reads OpenAI's C{usage.prompt_tokens_details.cached_tokens}
(which Gemini's answers through the gateway carry), so the count is given
there too, whole and streamed, Moonshot's field kept, and a
C{prompt_tokens_details} Moonshot sent not overwritten (trial s33: it was
passed as it came, and an agent read no cache hit).  The rule on
L{moonshot_usage} alone, and through a gateway in front of the stand-in
upstream with the official openai SDK.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from openclaw.providers.kimi import moonshot_usage
from openclaw.testing.upstream import OpenAIAnswer
from tests.test_dataplane import HELLO, DataPlaneTestCase

MODEL = "kimi/moonshot-v1-8k"
#: Moonshot's shape (openclaw/openclaw pull request 25436 quotes it).
MOONSHOT = {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105, "cached_tokens": 80}


class MoonshotUsageTests(SynchronousTestCase):
    def test_cached_tokens_given_as_openai_s(self) -> None:
        shaped = moonshot_usage(MOONSHOT)
        self.assertEqual(shaped, {**MOONSHOT, "prompt_tokens_details": {"cached_tokens": 80}})
        # Null is not sent; a whole float is a count.
        self.assertEqual(
            moonshot_usage({**MOONSHOT, "prompt_tokens_details": None})["prompt_tokens_details"], {"cached_tokens": 80}
        )
        self.assertEqual(
            moonshot_usage({"cached_tokens": 80.0})["prompt_tokens_details"],
            {"cached_tokens": 80},
        )

    def test_provider_details_not_overwritten(self) -> None:
        # Kimi K2.5's answers carry OpenAI's field too: left as it is.
        for details in ({"cached_tokens": 80}, {"cached_tokens": 70}, {"cached_tokens": None}, "x", [1]):
            usage = {**MOONSHOT, "prompt_tokens_details": details}
            self.assertIs(moonshot_usage(usage), usage, details)
        # An object without the count gets it, its other fields kept.
        usage = {**MOONSHOT, "prompt_tokens_details": {"audio_tokens": 0}}
        self.assertEqual(moonshot_usage(usage)["prompt_tokens_details"], {"audio_tokens": 0, "cached_tokens": 80})
        self.assertEqual(usage["prompt_tokens_details"], {"audio_tokens": 0})

    def test_nothing_to_give(self) -> None:
        for usage in ({"prompt_tokens": 1}, {"cached_tokens": None}, {"cached_tokens": "80"}, {"cached_tokens": -1}):
            self.assertIs(moonshot_usage(usage), usage)


class GatewayTests(DataPlaneTestCase):
    """
    Through the gateway with the openai SDK, against the stand-in Kimi.
    """

    def usages(self, client: Any) -> tuple[Any, Any]:
        whole = client.chat.completions.create(model=MODEL, messages=HELLO)
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True}
            )
        )
        return whole.usage, chunks[-1].usage

    @inlineCallbacks
    def test_whole_and_streamed(self):
        self.upstream.kimi.answers[:] = [OpenAIAnswer("x", usage=MOONSHOT), OpenAIAnswer("x", usage=MOONSHOT)]
        client = self.sdk(self.gateway())
        for usage in (yield deferToThread(self.usages, client)):
            self.assertEqual(usage.prompt_tokens_details.cached_tokens, 80)
            # Moonshot's own field is kept.
            self.assertEqual(usage.model_extra["cached_tokens"], 80)

    @inlineCallbacks
    def test_usage_inside_the_choice(self):
        """
        Moonshot's habit of putting the usage inside C{choices[0].usage}:
        the usage the client gets (top level, and the closing usage chunk)
        has the count too.
        """
        self.upstream.kimi.usage_in_choice = True
        self.upstream.kimi.answers[:] = [OpenAIAnswer("x", usage=MOONSHOT), OpenAIAnswer("x", usage=MOONSHOT)]
        client = self.sdk(self.gateway())
        for usage in (yield deferToThread(self.usages, client)):
            self.assertEqual(usage.prompt_tokens_details.cached_tokens, 80)

    @inlineCallbacks
    def test_provider_details_kept(self):
        usage = {**MOONSHOT, "prompt_tokens_details": {"cached_tokens": 70}}
        self.upstream.kimi.answers[:] = [OpenAIAnswer("x", usage=usage), OpenAIAnswer("x", usage=usage)]
        client = self.sdk(self.gateway())
        for got in (yield deferToThread(self.usages, client)):
            self.assertEqual(got.prompt_tokens_details.cached_tokens, 70)
