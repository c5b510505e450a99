"""
Moonshot's vision inputs beside OpenAI's
(U{https://platform.moonshot.ai/docs/guide/use-kimi-vision-model}; its chat
reference: "The url field of image_url and video_url supports base64 format
and ms://<file_id> format"): an C{image_url} or C{video_url} part whose
C{url} is C{ms://<file_id>}, a file uploaded to Moonshot, and a
C{video_url} part of a base64 video.  Kimi gets them as sent, whole and
streamed; their shapes are checked at the door, on either provider, with
a 400 saying what the gateway takes; Gemini, which cannot read them,
refuses them with a 400 naming the part and saying to use a kimi model,
and a failed Kimi call holding one is not failed over to it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks

from tests.test_dataplane import DataPlaneTestCase

KIMI = "kimi/kimi-k2-0905-preview"
GEMINI = "gemini/gemini-2.5-flash"
IMAGE_FILE = {"type": "image_url", "image_url": {"url": "ms://cn0787ce2sgfp2q3ckl0"}}
VIDEO_FILE = {"type": "video_url", "video_url": {"url": "ms://d1a2b3c4-e5_f6"}}
VIDEO_DATA = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAAIGZ0eXBpc29t"}}
TEXT = {"type": "text", "text": "What happens in this video?"}


def asking(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [TEXT, *parts]}]


class KimiTests(DataPlaneTestCase):
    """
    Kimi gets Moonshot's forms as sent; any other shape of them is a 400
    naming the field, on either provider, saying which forms the gateway
    takes (it said "must be one of file, image_url, input_audio, text"
    and "must be a base64 data URL ... or an http(s):// or gs:// URL",
    not that these were a gateway's limits: trial s29).
    """

    @inlineCallbacks
    def test_passed_on(self):
        gateway = self.gateway()
        # A video's data URL of any video type, in any case (RFC 2045).
        videos = [
            {"type": "video_url", "video_url": {"url": f"data:{media_type};base64,AAAAIGZ0eXBpc29t"}}
            for media_type in ("video/webm", "video/quicktime", "Video/X-FLV", "video/3gpp")
        ]
        for stream in (False, True):
            for part in (IMAGE_FILE, VIDEO_FILE, VIDEO_DATA, *videos):
                messages = asking(part)
                response, text = yield self.post(gateway, {"model": KIMI, "messages": messages, "stream": stream})
                self.assertEqual(response.code, 200, text)
                self.assertEqual(self.upstream.kimi.last_body["messages"], messages)

    @inlineCallbacks
    def test_bad_shapes(self):
        gateway = self.gateway()
        for part, param, words in (
            (
                {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}},
                "messages[0].content[1].video_url.url",
                "must be a base64 data URL (data:video/mp4;base64,...) or ms://<file_id> (a video uploaded to "
                "Moonshot), the forms Moonshot documents for Kimi's vision models; the gateway takes no other",
            ),
            ({"type": "video_url", "video_url": "ms://abc"}, "messages[0].content[1].video_url", "must be an object"),
            ({"type": "video_url", "video_url": {}}, "messages[0].content[1].video_url.url", "base64 data URL"),
            (
                {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,not base64!"}},
                "messages[0].content[1].video_url.url",
                "whose data is not base64",
            ),
            *(
                (
                    {"type": "video_url", "video_url": {"url": f"data:{media_type};base64,AAAAIGZ0eXBpc29t"}},
                    "messages[0].content[1].video_url.url",
                    f"messages[0].content[1].video_url.url is a data URL of {shown}, not a video: a video_url part "
                    "takes a video (Moonshot's vision guide lists mp4, mpeg, mov, avi, x-flv, mpg, webm, wmv and "
                    "3gpp, as data:video/mp4;base64,...); send an image in an image_url part",
                )
                # Any media type but a video's (re-attack s29: Kimi was
                # passed an image and text as a video), named back clipped.
                for media_type, shown in (
                    ("image/png", "'image/png'"),
                    ("text/plain", "'text/plain'"),
                    ("application/octet-stream", "'application/octet-stream'"),
                    ("videos/mp4", "'videos/mp4'"),
                    ("x/" + "v" * 200, "'x/" + "v" * 61 + "…'"),
                )
            ),
            *(
                (
                    {"type": kind, kind: {"url": url}},
                    f"messages[0].content[1].{kind}.url",
                    "is not ms://<file_id>, Moonshot's URL of an uploaded file",
                )
                for kind in ("image_url", "video_url")
                for url in ("ms://", "ms://a/b", "ms:abc", "MS://x y", "ms://" + "a" * 129)
            ),
            (
                {"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}},
                "messages[0].content[1].image_url.url",
                "an http(s):// or gs:// URL, or, for a kimi model, ms://<file_id> (an image uploaded to Moonshot); "
                "the gateway takes no other kind of URL here",
            ),
        ):
            for model in (KIMI, GEMINI):
                response, text = yield self.post(gateway, {"model": model, "messages": asking(part)})
                self.assertEqual(response.code, 400, (part, text))
                error = self.assertOpenAIError(text)
                self.assertEqual(error["param"], param, part)
                self.assertIn(words, error["message"])
        # A user's part only: Moonshot's assistant messages carry text.
        messages = [*asking(), {"role": "assistant", "content": [VIDEO_FILE]}, *asking()]
        response, text = yield self.post(gateway, {"model": KIMI, "messages": messages})
        self.assertEqual(response.code, 400, text)
        error = self.assertOpenAIError(text)
        self.assertEqual(error["param"], "messages[1].content[0].type")
        self.assertIn("must be one of refusal, text here, the part types the gateway carries", error["message"])
        # A type of no provider's: the same, naming those a user's part may be.
        response, text = yield self.post(gateway, {"model": KIMI, "messages": asking({"type": "input_video"})})
        self.assertEqual(response.code, 400, text)
        self.assertIn(
            "must be one of file, image_url, input_audio, text, video_url here, the part types the gateway carries "
            "(got 'input_video')",
            self.assertOpenAIError(text)["message"],
        )
        self.assertEqual(self.upstream.kimi.requests + self.upstream.gemini.requests, 0)


class GeminiTests(DataPlaneTestCase):
    """
    Gemini cannot read Moonshot's files and is sent no video: a request
    holding one (in its history too, after a switch_provider) is a 400
    naming the part and saying to use a kimi model, whether it names
    Gemini or Gemini is the active route, before anything is sent; and a
    Kimi call holding one that fails is not failed over to Gemini.
    """

    @inlineCallbacks
    def test_refused(self):
        pinned = self.gateway()
        active = self.gateway(default_provider="gemini")
        for gateway, model in ((pinned, GEMINI), (active, "gpt-4o")):
            for stream in (False, True):
                for part, param, what in (
                    (IMAGE_FILE, "messages[0].content[1].image_url.url", "an ms:// URL (a file uploaded to Moonshot)"),
                    (VIDEO_FILE, "messages[0].content[1]", "a video_url part (Moonshot's video input)"),
                    (VIDEO_DATA, "messages[0].content[1]", "a video_url part (Moonshot's video input)"),
                ):
                    messages = [*asking(part), {"role": "assistant", "content": "A cat."}, *asking()]
                    response, text = yield self.post(gateway, {"model": model, "messages": messages, "stream": stream})
                    self.assertEqual(response.code, 400, text)
                    error = self.assertOpenAIError(text)
                    self.assertEqual(error["param"], param)
                    self.assertIn(f"is {what}, which only Kimi's vision models take", error["message"])
                    self.assertIn('send this conversation to a kimi model (model "kimi/<model>"', error["message"])
        self.assertEqual(self.upstream.gemini.requests, 0)

    @inlineCallbacks
    def test_not_failed_over(self):
        gateway = self.gateway(default_provider="kimi", fallback="auto")
        kimi = self.upstream.kimi
        kimi.mode, kimi.error_status = "error", 503
        for part, why in (
            (VIDEO_DATA, "messages[0].content[1] is a video_url part"),
            (IMAGE_FILE, "messages[0].content[1].image_url.url is an ms:// URL"),
        ):
            response, text = yield self.post(gateway, {"messages": asking(part)})
            self.assertEqual(response.code, 502, text)
            message = self.assertOpenAIError(text, "upstream_http_error")["message"]
            self.assertIn(f"(not failed over to gemini: it cannot take this request: {why}", message)
            self.assertIsNone(response.headers.getRawHeaders("x-openclaw-fallback"))
        self.assertEqual(self.upstream.gemini.requests, 0)
        # An image Gemini reads is failed over.
        image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
        response, text = yield self.post(gateway, {"messages": asking(image)})
        self.assertEqual(response.code, 200, text)
        self.assertEqual(response.headers.getRawHeaders("x-openclaw-fallback"), ["kimi->gemini; reason=http_5xx"])
