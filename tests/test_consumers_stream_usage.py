"""
A consumer's stream left early is still counted: the gateway reads the
rest of the upstream stream for its usage, and a stream that breaks with
no usage is counted an estimate, never 0 tokens.  The openai SDK against
a gateway in this process, the stand-in upstream on 127.0.0.1.
"""

from __future__ import annotations

import time
from typing import Any

import openai
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from openclaw.consumers.estimate import MESSAGE_TOKENS, REPLY_TOKENS
from tests.test_consumers import GatewayCase
from tests.test_dataplane import HELLO


class StreamLeftEarlyTests(GatewayCase):
    @inlineCallbacks
    def usage_of(self, gateway: Any, client: Any, name: str, requests: int = 1) -> Any:
        """
        The consumer's usage total once C{requests} calls are counted (a
        stream left early is counted when its upstream ends).
        """
        for _ in range(100):
            usage = yield self.command(gateway, client, "usage", {"name": name})
            if usage["total"]["requests"] >= requests:
                return usage["total"]
            yield deferToThread(time.sleep, 0.05)
        self.fail(f"{name}'s call was never counted")

    @inlineCallbacks
    def test_left_after_finish_reason(self) -> Any:
        """
        A client that closes a Kimi stream after the chunk with
        finish_reason, before the usage chunk, is counted the stream's
        usage all the same: the gateway reads the rest of the stream.
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "leaver", "tpm": 100000})
        self.upstream.kimi.chunk_interval = 0.2
        sdk = self.sdk(gateway, created["key"])

        def leave_at_finish() -> str:
            text = ""
            stream = sdk.chat.completions.create(model="kimi/moonshot-v1-8k", messages=HELLO, stream=True)
            for chunk in stream:
                self.assertIsNone(chunk.usage)
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    if chunk.choices[0].finish_reason:
                        break
            stream.close()
            return text

        text = yield deferToThread(leave_at_finish)
        self.assertEqual(text, self.upstream.kimi.reply)
        total = yield self.usage_of(gateway, client, "leaver")
        self.check_counted(total)

    def check_counted(self, total: dict[str, Any]) -> None:
        # The stand-in's usage: 10 prompt tokens, one completion token a word.
        self.assertEqual((total["prompt_tokens"], total["completion_tokens"]), (10, 4))
        self.assertGreater(total["cost_usd"], 0)

    @inlineCallbacks
    def test_left_after_finish_reason_body_lingers(self) -> Any:
        """
        Read out for its usage, a stream whose body stays open after
        [DONE] is counted and let go within COMPLETE_STREAM_GRACE_SECONDS,
        not held to UPSTREAM_TIMEOUT (its connection, and its count).
        """
        gateway, client = yield self.gateway(upstream_timeout=30)
        created = yield self.command(gateway, client, "consumer_create", {"name": "leaver", "tpm": 100000})
        self.upstream.kimi.mode, self.upstream.kimi.chunk_interval = "linger", 0.2
        sdk = self.sdk(gateway, created["key"])

        def leave_at_finish() -> None:
            stream = sdk.chat.completions.create(model="kimi/moonshot-v1-8k", messages=HELLO, stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    break
            stream.close()

        yield deferToThread(leave_at_finish)
        total = yield self.usage_of(gateway, client, "leaver")
        self.check_counted(total)
        yield self.upstream.kimi.when_streams_lost(1)

    @inlineCallbacks
    def test_left_once_whole_body_lingers(self) -> Any:
        """
        A Gemini stream whole already (every choice finished, its usage
        in) whose body lingers, left by its client within the grace: counted
        at once, not held to UPSTREAM_TIMEOUT.
        """
        gateway, client = yield self.gateway(upstream_timeout=30)
        created = yield self.command(gateway, client, "consumer_create", {"name": "leaver", "tpm": 100000})
        self.upstream.gemini.mode = "linger"
        sdk = self.sdk(gateway, created["key"])

        def leave_once_whole() -> None:
            stream = sdk.chat.completions.create(model="gemini/gemini-2.5-flash", messages=HELLO, stream=True)
            next(iter(stream))
            time.sleep(0.5)  # every event is in; the stream waits for its body's end
            stream.close()

        yield deferToThread(leave_once_whole)
        total = yield self.usage_of(gateway, client, "leaver")
        self.assertEqual(total["prompt_tokens"], 10)

    @inlineCallbacks
    def test_no_usage_ever_is_estimated(self) -> Any:
        """
        A stream that breaks after some text, with no usage, is counted an
        estimate (characters / 4, rounded up, and the prompt's chat
        template tokens), never 0 tokens.
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "cut"})
        self.upstream.kimi.mode = "cut"
        self.upstream.kimi.cut_after = 3
        sdk = self.sdk(gateway, created["key"])

        def read_all() -> str:
            text = ""
            try:
                for chunk in sdk.chat.completions.create(model="kimi/moonshot-v1-8k", messages=HELLO, stream=True):
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
            except openai.APIError:
                pass
            return text

        text = yield deferToThread(read_all)
        self.assertTrue(text)
        total = yield self.usage_of(gateway, client, "cut")
        prompt = HELLO[0]["content"]
        self.assertEqual(total["prompt_tokens"], -(-len(prompt) // 4) + MESSAGE_TOKENS + REPLY_TOKENS)
        self.assertEqual(total["completion_tokens"], -(-len(text) // 4))


class LeftDuringTranslationTests(GatewayCase):
    timeout = 60
    usage_of = StreamLeftEarlyTests.usage_of

    @inlineCallbacks
    def test_counted_with_its_usage(self) -> Any:
        """
        A consumer's client that leaves while its large whole answer is
        translated in a thread (past OFFLOAD_BYTES) is counted the answer's
        usage once translated, as the provider billed it (review s34:
        counted its prompt's estimate only, 0 completion tokens).
        """
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        from openclaw.testing.upstream import GeminiAnswer
        from tests.test_large_bodies import ASK, HeldWorkers, calls_answer, open_chat

        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "leaver", "tpm": 10_000_000})
        context = gateway.service.api_site.context
        context.bodies = workers = HeldWorkers.of(reactor)
        workers.held = 1
        self.addCleanup(workers.stop)
        self.upstream.gemini.answers[:] = [GeminiAnswer((), document=calls_answer(20_000))]
        sock = yield open_chat(self, gateway.api_port, ASK, created["key"])
        for _ in range(200):
            if workers.runs == 1:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        sock.close()
        yield deferLater(reactor, 0.3, lambda: None)
        workers.release()
        total = yield self.usage_of(gateway, client, "leaver")
        self.assertEqual((total["prompt_tokens"], total["completion_tokens"]), (10, 20_000))
