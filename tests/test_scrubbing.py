"""
Provider keys never reach a client, a report or a log line: every text that
comes from a provider passes one scrubber (L{openclaw.providers.errors.Scrubber}),
on every path.  A stand-in that echoes its key (whole, as a prefix,
URL-encoded) is swept over every path: whole answers, error bodies, stream
error events, C{/v1/models}, C{/v1/embeddings} and health checks, for both
providers.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import inlineCallbacks
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from openclaw.providers.errors import MIN_PREFIX_CHARS, REDACTED, Scrubber
from openclaw.testing import upstream as standin
from tests.support import open_client
from tests.test_dataplane import GATEWAY_KEY, DataPlaneTestCase

#: Keys with characters that URL encoding changes, so the encoded form differs.
KIMI_KEY = "sk-kimi/SECRET+0123456789abcdef=="
GEMINI_KEY = "AIza-gemini/SECRET+0123456789abcdef=="
KEYS = {"kimi": KIMI_KEY, "gemini": GEMINI_KEY}


def echoes(key: str) -> list[str]:
    """
    Messages a provider might send that quote C{key}.
    """
    return [
        f"API key {key} is not valid",
        f"Consumer 'api_key:{key[: MIN_PREFIX_CHARS + 3]}' has been suspended",
        f"GET /v1/models?key={quote(key, safe='')} refused",
    ]


def leaks(text: str, key: str) -> list[str]:
    """
    The forms of C{key} found in C{text}.
    """
    forms = {key, quote(key, safe=""), key[:MIN_PREFIX_CHARS], quote(key, safe="")[:MIN_PREFIX_CHARS]}
    return [form for form in forms if form in text]


class ScrubberTests(SynchronousTestCase):
    def test_forms(self) -> None:
        scrubber = Scrubber((KIMI_KEY, GEMINI_KEY))
        for key in KEYS.values():
            for message in echoes(key):
                for text in (scrubber.text(message), scrubber.data(message.encode()).decode()):
                    self.assertEqual(leaks(text, key), [], text)
                    self.assertIn(REDACTED, text)

    def test_json_escaped(self) -> None:
        """
        A key with any of its characters written as JSON escapes (RFC 8259
        section 7) is read back whole by the client's parser: found in
        every such form, in a whole body and in a stream's event.
        """
        scrubber = Scrubber((KIMI_KEY, GEMINI_KEY))
        for key in KEYS.values():
            escaped_all = "".join(f"\\u{ord(c):04x}" for c in key)
            forms = [
                escaped_all,
                escaped_all.upper().replace("\\U", "\\u"),
                key[0] + f"\\u{ord(key[1]):04x}" + key[2:],
                key.replace("/", "\\/"),
                # Only its start, escaped: the prefix rule holds too.
                "".join(f"\\u{ord(c):04x}" for c in key[:MIN_PREFIX_CHARS]) + " and more",
            ]
            for form in forms:
                body = ('{"choices": [{"message": {"content": "the key: %s."}}]}' % form).encode()
                for data in (body, b"data: " + body + b"\n\n"):
                    scrubbed = scrubber.data(data)
                    decoded = json.loads(scrubbed.removeprefix(b"data: "))
                    self.assertEqual(leaks(json.dumps(decoded, ensure_ascii=False), key), [], form)
                    self.assertIn(REDACTED, decoded["choices"][0]["message"]["content"])
                self.assertEqual(leaks(json.loads('"%s"' % scrubber.text(form)), key), [], form)
        # Escapes without a key stay as they are.
        data = b'{"content": "caf\\u00e9 \\/ sk-kimi"}'
        self.assertEqual(scrubber.data(data), data)

    def test_unchanged_without_a_key(self) -> None:
        data = b'{"choices": [{"delta": {"content": "sk-kimi/SEC"}}]}'
        self.assertIs(Scrubber((KIMI_KEY,)).data(data), data)
        self.assertEqual(Scrubber(()).text("text"), "text")

    def test_short_keys(self) -> None:
        # Eight to eleven characters: only whole; shorter: only as a token.
        self.assertEqual(Scrubber(("12345678",)).text("x12345678y and 1234567"), f"x{REDACTED}y and 1234567")
        self.assertEqual(Scrubber(("k",)).text("key k, kite"), f"key {REDACTED}, kite")


class EveryPathTests(DataPlaneTestCase):
    """
    The sweep: each provider, each path, each echo; the client's text and
    every log line are searched for the key.
    """

    timeout = 60

    def setUp(self) -> None:
        super().setUp()
        self.upstream.kimi.key = KIMI_KEY
        self.upstream.gemini.key = GEMINI_KEY

    def assertClean(self, text: str, where: str) -> None:
        for provider, key in KEYS.items():
            self.assertEqual(leaks(text, key), [], f"{provider} key in {where}: {text}")

    def assertLogsClean(self) -> None:
        for event in self.events:
            self.assertClean(formatEvent(event), "a log line")
            self.assertClean(repr({k: v for k, v in event.items() if not k.startswith("log_")}), "a log field")

    @inlineCallbacks
    def sweep_chat(self, provider: str, mode: str, status: int, stream: bool) -> Any:
        gateway = self.gateway(default_provider=provider, fallback="off")
        behaviour = self.upstream.behaviour(provider)
        behaviour.mode = mode
        behaviour.error_status = status
        for first, message in enumerate(echoes(KEYS[provider])):
            behaviour.error_message = message
            behaviour.reply = message
            response, text = yield self.post(
                gateway, {"model": "x", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
            )
            where = f"{provider} {mode} {status} stream={stream}"
            self.assertClean(text, where)
            if mode == standin.Mode.OK:
                self.assertEqual(response.code, 200, text)
            if not first:
                # Later calls may find the key resting or set aside.
                self.assertIn("redacted", text, where)

    @inlineCallbacks
    def test_chat(self):
        for provider in KEYS:
            for stream in (False, True):
                yield self.sweep_chat(provider, standin.Mode.OK, 200, stream)
                for status in (400, 401, 403, 429, 500):
                    yield self.sweep_chat(provider, standin.Mode.ERROR, status, stream)
            yield self.sweep_chat(provider, standin.Mode.STREAM_ERROR, 500, True)
        self.assertLogsClean()

    @inlineCallbacks
    def test_models_embeddings_and_health(self):
        for provider in KEYS:
            gateway = self.gateway(default_provider=provider)
            behaviour = self.upstream.behaviour(provider)
            behaviour.mode = standin.Mode.ERROR
            client = yield open_client(self, gateway.port)
            for status in (400, 401, 403, 500):
                behaviour.error_status = status
                for first, message in enumerate(echoes(KEYS[provider])):
                    behaviour.error_message = message
                    response = yield self.http().get(
                        f"http://127.0.0.1:{gateway.api_port}/v1/models",
                        headers={"Authorization": [f"Bearer {GATEWAY_KEY}"]},
                    )
                    text = yield response.text("utf-8")
                    self.assertClean(text, f"{provider} /v1/models {status}")
                    if provider == "gemini":
                        _, text = yield self.post(
                            gateway, {"model": "gemini-embedding-001", "input": "hi"}, path="/v1/embeddings"
                        )
                        self.assertClean(text, f"/v1/embeddings {status}")
                    answer = yield client.command(gateway.token, "health_check")
                    self.assertClean(json.dumps(answer), f"{provider} health_check {status}")
                    if not first:
                        self.assertIn("redacted", json.dumps(answer))
        self.assertLogsClean()

    @inlineCallbacks
    def test_listed_model_ids(self):
        """
        A models listing whose ids hold the key (whole, its beginning) is
        scrubbed like any text of the provider's (one holding it
        URL-encoded is not listed: no model name holds an escape): on
        C{/v1/models}, and on C{/v1/models/{model}}, which finds an id as
        the listing shows it, and not by the key (no way to test a guess).
        """
        for provider, key in KEYS.items():
            behaviour = self.upstream.behaviour(provider)
            behaviour.models = [
                *behaviour.models,
                f"leak-{key}",
                f"cut-{key[: MIN_PREFIX_CHARS + 3]}",
                f"enc-{quote(key, safe='')}",
            ]
            gateway = self.gateway(default_provider=provider)
            headers = {"Authorization": [f"Bearer {GATEWAY_KEY}"]}
            base = f"http://127.0.0.1:{gateway.api_port}/v1/models"
            response = yield self.http().get(base, headers=headers)
            text = yield response.text("utf-8")
            self.assertEqual(response.code, 200, text)
            self.assertClean(text, f"{provider} /v1/models")
            ids = [model["id"] for model in json.loads(text)["data"]]
            # The URL-encoded one is not listed at all: a model name holding
            # a percent-escape is refused (routing.model_refusal).
            self.assertEqual(ids[-2:], [f"leak-{REDACTED}", f"cut-{REDACTED}"])
            self.assertFalse([i for i in ids if i.startswith("enc-")])
            response = yield self.http().get(f"{base}/{quote(ids[-2], safe='')}", headers=headers)
            text = yield response.text("utf-8")
            self.assertEqual((response.code, json.loads(text)["id"]), (200, f"leak-{REDACTED}"), text)
            self.assertLogsClean()
            # The key itself, as a client might guess it: not listed.
            response = yield self.http().get(f"{base}/{quote(f'leak-{key}', safe='')}", headers=headers)
            text = yield response.text("utf-8")
            self.assertEqual(response.code, 404, text)
            self.events.clear()
