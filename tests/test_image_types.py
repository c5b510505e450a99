"""
The media type of an C{image_url} part's base64 data URL, per provider:
each takes the image types its documentation lists, in any case (RFC
2045), and a request holding another is a 400 naming the part and the
types taken, before anything is sent (Kimi was passed C{text/html} and
C{image/svg+xml} as images: data s30).  Kimi takes Moonshot's (PNG, JPEG,
WEBP, GIF), Gemini Google's (PNG, JPEG, WEBP, HEIC, HEIF), another
OpenAI-shaped provider OpenAI's (PNG, JPEG, WEBP, non-animated GIF); a
call one provider could take and its fallback could not is not failed
over to it, nor told to wait for it.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from openclaw.dataplane.errors import APIError
from openclaw.dataplane.request import parse_chat_request
from openclaw.providers.openai_compatible import OpenAIWire
from tests.test_dataplane import KIMI_KEY
from tests.test_resilience import ResilienceTestCase

KIMI = "kimi/kimi-k2-0905-preview"
GEMINI = "gemini/gemini-2.5-flash"
#: Base64 of a few bytes: the types are judged by the URL, not the data.
DATA = "iVBORw0KGgo="
WHERE = "messages[0].content[1].image_url.url"


def asking(media_type: str) -> list[dict[str, Any]]:
    """
    A user message asking about an image given as a data URL of C{media_type}.
    """
    image = {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{DATA}"}}
    return [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]


class KimiTests(ResilienceTestCase):
    """
    Kimi takes Moonshot's types, and refuses any other with a 400.
    """

    @inlineCallbacks
    def test_refused(self) -> Any:
        gateway = self.gateway()
        for stream in (False, True):
            for media_type in ("text/html", "image/svg+xml", "IMAGE/SVG+XML", "image/heic", "image/bmp", "video/mp4"):
                body = {"model": KIMI, "messages": asking(media_type), "stream": stream}
                response, text = yield self.post(gateway, body)
                self.assertEqual(response.code, 400, (media_type, text))
                error = self.assertOpenAIError(text)
                self.assertEqual(error["param"], WHERE)
                self.assertEqual(
                    error["message"],
                    f"{WHERE} is a data URL of type {media_type!r}, not an image Kimi takes (Moonshot's vision guide): "
                    "an image must be PNG, JPEG, WEBP or GIF; convert it to one of those",
                )
        # A type named back clipped.
        response, text = yield self.post(gateway, {"model": KIMI, "messages": asking("x/" + "y" * 300)})
        self.assertEqual(response.code, 400, text)
        self.assertIn("of type 'x/" + "y" * 61 + "…', not an image", self.assertOpenAIError(text)["message"])
        self.assertEqual(self.upstream.kimi.requests, 0)

    @inlineCallbacks
    def test_taken(self) -> Any:
        """
        Moonshot's types, in any case, as C{image/jpg} and as its vision
        guide's example writes them (C{image/.png}), are passed on, in lower
        case (L{test_lower_case}).
        """
        gateway = self.gateway()
        for media_type in ("image/png", "IMAGE/JPEG", "image/jpg", "image/WebP", "image/gif", "image/.png"):
            messages = asking(media_type)
            response, text = yield self.post(gateway, {"model": KIMI, "messages": messages})
            self.assertEqual(response.code, 200, (media_type, text))
            self.assertEqual(self.upstream.kimi.last_body["messages"], asking(media_type.lower()))

    @inlineCallbacks
    def test_lower_case(self) -> Any:
        """
        An image data URL written in upper case (C{DATA:IMAGE/PNG;BASE64,},
        as RFC 2045 and RFC 2397 allow) reaches Kimi in lower case, the form
        Moonshot documents, whole and streamed; its parameters and data as
        written, and the rest of the body as sent (it was passed on as
        written: trial s31).
        """
        gateway = self.gateway()
        for stream in (False, True):
            url = f"DATA:Image/PNG;Name=A.PNG;BASE64,{DATA}"
            messages = [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": "low"}}]},
                {"role": "assistant", "content": "A picture."},
                asking("IMAGE/JPEG")[0],
            ]
            response, text = yield self.post(gateway, {"model": KIMI, "messages": messages, "stream": stream})
            self.assertEqual(response.code, 200, text)
            sent = self.upstream.kimi.last_body["messages"]
            self.assertEqual(
                sent[1]["content"],
                [
                    {
                        "type": "image_url",
                        "image_url": {"url": f"data:image/png;Name=A.PNG;base64,{DATA}", "detail": "low"},
                    }
                ],
            )
            self.assertEqual(sent[3], asking("image/jpeg")[0])
            self.assertEqual(sent[:1] + sent[2:3], messages[:1] + messages[2:3])
            # The caller's body is not changed: a fallback gets it as sent.
            self.assertEqual(messages[1]["content"][0]["image_url"]["url"], url)

    @inlineCallbacks
    def test_gemini_lower_case(self) -> Any:
        """
        Gemini's translation already sends a data URL's type in lower case
        (C{image/jpg} as C{image/jpeg}, Gemini's name).
        """
        gateway = self.gateway()
        for media_type, sent in (("IMAGE/PNG", "image/png"), ("Image/JPG", "image/jpeg"), ("image/WEBP", "image/webp")):
            response, text = yield self.post(gateway, {"model": GEMINI, "messages": asking(media_type)})
            self.assertEqual(response.code, 200, text)
            part = self.upstream.gemini.last_body["contents"][0]["parts"][1]
            self.assertEqual(part, {"inlineData": {"mimeType": sent, "data": DATA}})

    @inlineCallbacks
    def test_gemini_takes_its_own(self) -> Any:
        """
        Gemini takes HEIC, which Kimi does not, and refuses GIF, which
        Kimi takes: each provider its own list.
        """
        gateway = self.gateway()
        response, text = yield self.post(gateway, {"model": GEMINI, "messages": asking("image/HEIC")})
        self.assertEqual(response.code, 200, text)
        part = self.upstream.gemini.last_body["contents"][0]["parts"][1]
        self.assertEqual(part, {"inlineData": {"mimeType": "image/heic", "data": DATA}})
        response, text = yield self.post(gateway, {"model": GEMINI, "messages": asking("image/gif")})
        self.assertEqual(response.code, 400, text)
        self.assertIn("not an image Gemini takes", self.assertOpenAIError(text)["message"])
        response, text = yield self.post(gateway, {"model": KIMI, "messages": asking("image/gif")})
        self.assertEqual(response.code, 200, text)

    @inlineCallbacks
    def test_not_failed_over(self) -> Any:
        """
        A Gemini call holding an image Kimi cannot take that fails is not
        failed over to Kimi; one holding an image both take is.
        """
        gateway = self.gateway(default_provider="gemini", fallback="auto")
        gemini = self.upstream.gemini
        gemini.mode, gemini.error_status = "error", 503
        response, text = yield self.post(gateway, {"messages": asking("image/heic")})
        self.assertEqual(response.code, 502, text)
        message = self.assertOpenAIError(text, "upstream_http_error")["message"]
        self.assertIn(
            f"(not failed over to kimi: it cannot take this request: {WHERE} is a data URL of type 'image/heic', "
            "not an image Kimi takes",
            message,
        )
        self.assertIsNone(response.headers.getRawHeaders("x-openclaw-fallback"))
        self.assertEqual(self.upstream.kimi.requests, 0)
        response, text = yield self.post(gateway, {"messages": asking("image/png")})
        self.assertEqual(response.code, 200, text)
        self.assertEqual(response.headers.getRawHeaders("x-openclaw-fallback"), ["gemini->kimi; reason=http_5xx"])

    @inlineCallbacks
    def test_no_wait_told_for_kimi(self) -> Any:
        """
        While both providers' keys rest, a Gemini call holding an image
        Kimi cannot take is told Gemini's wait alone, not Kimi's shorter
        one (L{ChatCall._could_take
        <openclaw.dataplane.call.ChatCall._could_take>}).
        """
        gemini, kimi = self.behaviour("gemini"), self.behaviour("kimi")
        gemini.rate_limited_keys, gemini.retry_after = {self.upstream.gemini.key}, 75
        kimi.rate_limited_keys, kimi.retry_after = {KIMI_KEY}, 45
        gateway = self.gateway(default_provider="gemini", fallback="auto")
        # Gemini's 429, then Kimi's: both providers' keys rest.
        response, text = yield self.post(gateway, {"messages": asking("image/png")})
        self.assertEqual(response.code, 429, text)
        response, text = yield self.post(gateway, {"messages": asking("image/heic")})
        self.assertEqual(response.code, 429, text)
        message = json.loads(text)["error"]["message"]
        # Its key rests for the model called (Google limits each apart).
        self.assertTrue(
            message.startswith("every key the gateway holds for gemini is rate limited for gemini-flash-latest"),
            message,
        )
        self.assertNotIn("kimi", message)
        self.assertIn(response.headers.getRawHeaders("retry-after"), (["75"], ["74"]))
        response, text = yield self.post(gateway, {"messages": asking("image/png")})
        self.assertIn(response.headers.getRawHeaders("retry-after"), (["45"], ["44"]), text)


class OpenAIWireTests(TestCase):
    """
    An OpenAI-shaped provider that declares no image types takes
    OpenAI's, sent in lower case.
    """

    def test_openai_types(self) -> None:
        wire = OpenAIWire()
        for media_type in ("image/png", "image/JPEG", "image/webp", "image/gif"):
            chat = parse_chat_request(orjson.dumps({"messages": asking(media_type)}))
            self.assertEqual(orjson.loads(wire.request_body(chat, "m"))["messages"], asking(media_type.lower()))
        for media_type in ("image/heic", "image/.png", "text/html"):
            chat = parse_chat_request(orjson.dumps({"messages": asking(media_type)}))
            error = self.assertRaises(APIError, wire.request_body, chat, "m")
            self.assertEqual(error.param, WHERE)
            self.assertIn(
                f"is a data URL of type {media_type!r}, not an image this provider takes (OpenAI's supported image "
                "types): an image must be PNG, JPEG, WEBP or non-animated GIF",
                error.message,
            )

    def test_looked_for_only_where_named(self) -> None:
        """
        A request that names no image_url part (every plain chat) is not
        looked through for one; one that names it, or whose \\u escapes
        could spell it, is.
        """
        plain = parse_chat_request(orjson.dumps({"messages": [{"role": "user", "content": "hi"}]}))
        self.assertFalse(plain.images)
        self.assertTrue(parse_chat_request(orjson.dumps({"messages": asking("image/png")})).images)
        escaped = orjson.dumps({"messages": asking("text/html")}).replace(b'"image_url"', b'"image\\u005furl"')
        chat = parse_chat_request(escaped)
        self.assertTrue(chat.images)
        error = self.assertRaises(APIError, OpenAIWire().request_body, chat, "m")
        self.assertEqual(error.param, WHERE)
