"""
Request bodies the gateway cannot read as sent: a compressed body (415
with C{Accept-Encoding: identity}, RFC 9110 sections 8.4 and 15.5.16) and
a body that is not UTF-8 (400 saying so, RFC 8259 section 8.1), on every
C{POST /v1/...}; raw HTTP against a gateway in this process, in front of
the stand-in upstream, and the official openai SDK.
"""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import openai
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from tests.test_dataplane import GATEWAY_KEY, HELLO, DataPlaneTestCase

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
BODIES = {CHAT: {"messages": HELLO}, EMBEDDINGS: {"input": "hello"}}


class BodyEncodingTests(DataPlaneTestCase):
    @inlineCallbacks
    def send(self, gateway: Any, path: str, data: bytes, **headers: str) -> Any:
        """
        POST C{data} as sent, with the gateway's key and C{headers}
        (C{Content_Encoding="gzip"}); fire with C{(response, text)}.
        """
        fields = {
            "Content-Type": ["application/json"],
            "Authorization": [f"Bearer {GATEWAY_KEY}"],
            **{name.replace("_", "-"): [value] for name, value in headers.items()},
        }
        response = yield self.http().post(f"http://127.0.0.1:{gateway.api_port}{path}", data=data, headers=fields)
        text = yield response.text("utf-8")
        return response, text

    def upstream_requests(self) -> int:
        return self.upstream.kimi.requests + self.upstream.gemini.requests

    @inlineCallbacks
    def test_compressed_body_refused_with_415(self):
        """
        A gzip body declared so (curl's C{-H 'Content-Encoding: gzip'
        --data-binary @body.json.gz}) gets 415 saying to send it
        uncompressed, with C{Accept-Encoding: identity}, chat and
        embeddings alike; no provider is asked.
        """
        gateway = self.gateway()
        for path, body in BODIES.items():
            for coding in ("gzip", "GZIP", "identity, gzip"):
                response, text = yield self.send(
                    gateway, path, gzip.compress(json.dumps(body).encode()), Content_Encoding=coding
                )
                self.assertEqual(response.code, 415, (path, coding, text))
                self.assertEqual(response.phrase, b"Unsupported Media Type")
                self.assertEqual(response.headers.getRawHeaders("accept-encoding"), ["identity"])
                error = self.assertOpenAIError(text, "unsupported_content_encoding")
                self.assertEqual(error["type"], "invalid_request_error")
                self.assertIn("Content-Encoding: gzip,", error["message"])
                self.assertIn("send the body uncompressed, with no Content-Encoding header", error["message"])
                self.assertNotIn("UTF-8", error["message"])
        self.assertEqual(self.upstream_requests(), 0)

    @inlineCallbacks
    def test_codings_named_only_when_plain(self):
        gateway = self.gateway()
        response, text = yield self.send(gateway, CHAT, b"\x28\xb5\x2f\xfd", Content_Encoding="br, zstd")
        self.assertEqual(response.code, 415)
        self.assertIn("Content-Encoding: br, zstd,", self.assertOpenAIError(text)["message"])
        # Not a token (RFC 9110 section 5.6.2): not quoted back.
        response, text = yield self.send(gateway, CHAT, b"\x1f\x8b", Content_Encoding="x" * 40)
        self.assertEqual(response.code, 415)
        message = self.assertOpenAIError(text)["message"]
        self.assertIn("Content-Encoding: a content coding,", message)
        self.assertNotIn("x" * 40, message)

    @inlineCallbacks
    def test_identity_is_no_coding(self):
        """
        C{Content-Encoding: identity} (RFC 9110 section 8.4.1) is no
        coding: a body that is not JSON gets the usual 400.
        """
        gateway = self.gateway()
        response, text = yield self.send(gateway, CHAT, b"{not json", Content_Encoding="identity")
        self.assertEqual(response.code, 400, text)
        self.assertIn("not valid JSON", self.assertOpenAIError(text, "invalid_json")["message"])
        response, text = yield self.send(gateway, CHAT, json.dumps(BODIES[CHAT]).encode(), Content_Encoding="identity")
        self.assertEqual(response.code, 200, text)

    @inlineCallbacks
    def test_sdk_sees_415(self):
        """
        The SDK (its own C{post}, which sends the bytes given) raises its
        usual error with the message intact.  A JSON body that reads as
        sent is served whatever C{Content-Encoding} claims: only a body
        that does not parse is looked at further.
        """
        gateway = self.gateway()
        client = self.sdk(gateway)
        for path, answer in ((CHAT, ChatCompletion), (EMBEDDINGS, CreateEmbeddingResponse)):
            failure = yield self.assertFailure(
                deferToThread(
                    client.post,
                    path.removeprefix("/v1"),
                    cast_to=answer,
                    content=gzip.compress(json.dumps(BODIES[path]).encode()),
                    options={"headers": {"Content-Type": "application/json", "Content-Encoding": "gzip"}},
                ),
                openai.APIStatusError,
            )
            self.assertEqual((failure.status_code, failure.code), (415, "unsupported_content_encoding"))
            self.assertIn("send the body uncompressed", failure.message)
        served = yield deferToThread(
            client.chat.completions.create, messages=HELLO, model="x", extra_headers={"Content-Encoding": "gzip"}
        )
        self.assertEqual(served.choices[0].message.content, "Hello from the stand-in.")

    @inlineCallbacks
    def test_body_not_utf8(self):
        """
        Latin-1 text in a body: a 400 that says the body must be UTF-8,
        not the JSON parser's "surrogates not allowed"; a gzip or zstd
        body sent without C{Content-Encoding} is told it looks compressed
        (agent trial s45: told to encode it as UTF-8).
        """
        gateway = self.gateway()
        latin1 = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'
        utf8 = "JSON must be sent as UTF-8 (RFC 8259 section 8.1): encode the body as UTF-8"
        compressed = "it looks {}-compressed, which the gateway does not read: send the JSON uncompressed"
        for path, data, offset, advice in (
            (CHAT, latin1, latin1.index(b"\xe9"), utf8),
            (EMBEDDINGS, b'{"input": "caf\xe9"}', 14, utf8),
            (CHAT, gzip.compress(json.dumps(BODIES[CHAT]).encode()), 1, compressed.format("gzip")),
            (CHAT, b"\x28\xb5\x2f\xfd\x20\x00\x01\x00\x00", 1, compressed.format("zstd")),
            (CHAT, zlib.compress(json.dumps(BODIES[CHAT]).encode()), 1, compressed.format("deflate")),
        ):
            response, text = yield self.send(gateway, path, data)
            self.assertEqual(response.code, 400, (path, text))
            message = self.assertOpenAIError(text, "invalid_json")["message"]
            self.assertIn(f"it is not UTF-8 (an invalid byte at offset {offset})", message)
            self.assertTrue(message.endswith(advice), message)
            self.assertNotIn("surrogates", message)
        self.assertEqual(self.upstream_requests(), 0)

    @inlineCallbacks
    def test_zstd_skippable_frame(self):
        """
        A zstd stream that begins with a skippable frame (RFC 8878 section
        3.1.2), whose header is ASCII and so valid UTF-8, is told it looks
        compressed too (trial s45: "not valid JSON" alone).
        """
        gateway = self.gateway()
        skippable = b"\x50\x2a\x4d\x18\x04\x00\x00\x00abcd\x28\xb5\x2f\xfd\x20\x00\x01\x00\x00"
        response, text = yield self.send(gateway, CHAT, skippable)
        self.assertEqual(response.code, 400, text)
        message = self.assertOpenAIError(text, "invalid_json")["message"]
        self.assertTrue(
            message.endswith("it looks zstd-compressed, which the gateway does not read: send the JSON uncompressed"),
            message,
        )
        self.assertEqual(self.upstream_requests(), 0)

    @inlineCallbacks
    def test_nan_and_infinity(self):
        """
        NaN and Infinity, which Python's json.dumps writes by default, are
        no JSON: a 400 that names them and says what to send (agent trial
        s45: "unexpected character" alone).  The same words in a string
        are no such value.
        """
        gateway = self.gateway()
        for data in (
            b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
            b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": -Infinity}}',
            b'{"input": ["hi"], "dimensions": Infinity}',
        ):
            path = EMBEDDINGS if b"input" in data else CHAT
            response, text = yield self.send(gateway, path, data)
            self.assertEqual(response.code, 400, (path, text))
            message = self.assertOpenAIError(text, "invalid_json")["message"]
            self.assertIn("it holds NaN or Infinity, which JSON has no number for", message)
            self.assertIn("allow_nan=False", message)
        response, text = yield self.send(gateway, CHAT, b'{"messages": [{"content": "NaN"}], x}')
        self.assertNotIn("NaN or Infinity", self.assertOpenAIError(text, "invalid_json")["message"])
        self.assertEqual(self.upstream_requests(), 0)

    @inlineCallbacks
    def test_lone_surrogate_escape(self):
        """
        A C{\\uD83D} escape without its other half (a string cut inside an
        emoji, as JavaScript's slice can; Python's json writes one for a
        lone surrogate): a 400 that says what is wrong and what to send.
        """
        gateway = self.gateway()
        for path, data in (
            (CHAT, json.dumps({"messages": [{"role": "user", "content": "Hi \ud83d"}]}).encode()),
            (CHAT, json.dumps({"messages": [{"role": "user", "content": "Hi \ud83d\u0041"}]}).encode()),
            (EMBEDDINGS, json.dumps({"input": "\ude00 low half"}).encode()),
        ):
            self.assertIn(b"\\ud", data)
            response, text = yield self.send(gateway, path, data)
            self.assertEqual(response.code, 400, (path, text))
            message = self.assertOpenAIError(text, "invalid_json")["message"]
            self.assertIn("half of a UTF-16 surrogate pair, without its other half", message)
            self.assertIn("send text as UTF-8", message)
            self.assertIn("do not cut strings between the two halves", message)
        self.assertEqual(self.upstream_requests(), 0)

    @inlineCallbacks
    def test_number_past_a_double(self):
        """
        A number past a double's range (an integer of 310 digits or more,
        C{1e400}) is valid JSON no field takes: a 400 that says so and what
        to send (agent trial s42: "number is infinity when parsed as
        double" alone).
        """
        gateway = self.gateway()
        for path, data in (
            (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "n": 1' + b"0" * 400 + b"}"),
            (EMBEDDINGS, b'{"input": "hi", "dimensions": -1e400}'),
        ):
            response, text = yield self.send(gateway, path, data)
            self.assertEqual(response.code, 400, (path, text))
            message = self.assertOpenAIError(text, "invalid_json")["message"]
            self.assertIn("holds a number too large to read", message)
            self.assertIn("send every number within it", message)
        self.assertEqual(self.upstream_requests(), 0)
