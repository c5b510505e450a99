"""
Hostile input on both planes (issue #17, items 8 and 10): a model name with
control characters is refused at the door, and an unauthenticated message
of any shape is logged, counted and answered.
"""

from __future__ import annotations

import json

import openai
from prometheus_client import generate_latest
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from openclaw.control.plane import summarise
from openclaw.routing import MAX_MODEL_CHARS
from tests.support import open_client
from tests.test_cluster import ClusterCase, printed
from tests.test_cluster_keyspace import redis_command
from tests.test_dataplane import GATEWAY_KEY, DataPlaneTestCase
from tests.test_logs import FORGED
from tests.test_resilience import consumers_loaded

HOSTILE_MODELS = [FORGED, "kimi/moonshot\r\nX: y", "gemini/x\u202egnp.exe", "x\x00", "a\x85b"]


class ModelNameTests(DataPlaneTestCase):
    @inlineCallbacks
    def test_refused_at_the_door(self):
        gateway = self.gateway()
        for model in HOSTILE_MODELS:
            for path, body in [
                ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]}),
                ("/v1/embeddings", {"model": model, "input": "hi"}),
            ]:
                response, text = yield self.post(gateway, body, path=path)
                self.assertEqual(response.code, 400, (path, model, text))
                error = self.assertOpenAIError(text)
                self.assertEqual(error["param"], "model")
                self.assertIn("control or invisible characters", error["message"])
        self.assertEqual(self.upstream.gemini.requests + self.upstream.kimi.requests, 0)
        # Still serving everyone else.
        response, _ = yield self.post(gateway, {"model": "x", "messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(response.code, 200)

    @inlineCallbacks
    def test_space_inside(self):
        """
        A model name with a space between other characters (an env file's
        comment pasted along) is refused by both planes, saying why; spaces
        around a name are not part of it.
        """
        gateway = self.gateway()
        model = "gemini/gemini-2.5-flash   # the cheap one"
        for path, body in [
            ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]}),
            ("/v1/embeddings", {"model": model, "input": "hi"}),
        ]:
            response, text = yield self.post(gateway, body, path=path)
            self.assertEqual(response.code, 400, (path, text))
            self.assertIn("model holds a space", self.assertOpenAIError(text)["message"])
            # No env file in sight: not told about one (trial s30).
            self.assertNotIn("env file", self.assertOpenAIError(text)["message"])
        client = yield open_client(self, gateway.port)
        answer = yield client.command(gateway.token, "switch_provider", {"provider": "gemini", "model": model[7:]})
        self.assertIn("model holds a space", answer["error"])
        self.assertNotIn("env file", answer["error"])
        answer = yield client.command(
            gateway.token, "switch_provider", {"provider": "gemini", "model": " gemini-2.5-flash "}
        )
        self.assertTrue(answer["ok"], answer)
        self.assertEqual(answer["result"]["model"], "gemini-2.5-flash")
        response, text = yield self.post(
            gateway, {"model": " gemini/gemini-2.5-flash ", "messages": [{"role": "user", "content": "hi"}]}
        )
        self.assertEqual(response.code, 200, text)

    @inlineCallbacks
    def test_blank_names_none(self):
        """
        An empty or blank C{model} names no model: the call goes to the
        active route, as a call naming no provider's model does (README,
        "Routing"), not to the model-name rule's 400.
        """
        gateway = self.gateway()
        for model in ("", "   "):
            for path, body in [
                ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]}),
                ("/v1/embeddings", {"model": model, "input": "hi"}),
            ]:
                response, text = yield self.post(gateway, body, path=path)
                self.assertEqual(response.code, 200, (path, model, text))

    @inlineCallbacks
    def test_retrieve_refuses_unprintable(self):
        """
        C{GET /v1/models/{model}} with an escape code or a line break: the
        400 naming C{model} the other endpoints give, the name not echoed;
        no provider asked.
        """
        gateway = self.gateway()
        for quoted in ("kimi%2Fk%1B%5B2J", "gemini%2Fx%0D%0AX-Injected:%201", "x%E2%80%AE"):
            response = yield self.http().get(
                f"http://127.0.0.1:{gateway.api_port}/v1/models/{quoted}",
                headers={"Authorization": [f"Bearer {GATEWAY_KEY}"]},
            )
            text = yield response.text()
            self.assertEqual(response.code, 400, (quoted, text))
            error = self.assertOpenAIError(text)
            self.assertEqual(error["param"], "model")
            self.assertIn("control or invisible characters", error["message"])
            self.assertNotIn("Injected", error["message"])
        self.assertEqual(self.upstream.gemini.requests + self.upstream.kimi.requests, 0)

    @inlineCallbacks
    def test_retrieve_refuses(self):
        """
        C{client.models.retrieve} with a name too long: a 400 naming
        C{model}, the name not echoed in the answer or the log.
        """
        gateway = self.gateway()
        sdk = self.sdk(gateway)
        model = "kimi/" + "q" * 15_000
        with self.assertRaises(openai.BadRequestError) as caught:
            yield deferToThread(sdk.models.retrieve, model)
        self.assertEqual(caught.exception.param, "model")
        self.assertNotIn("q" * 300, caught.exception.message)
        self.assertEqual(self.upstream.kimi.requests, 0)
        for event in self.events:
            self.assertLess(len(formatEvent(event)), 4096)

    @inlineCallbacks
    def test_huge_names_not_echoed(self):
        """
        A provider id, a field name or a command of 40,000 characters is
        named cut short in the error (and so in the audit line), never
        whole; nor are three thousand unknown fields listed.
        """
        gateway = self.gateway()
        yield consumers_loaded(gateway)
        client = yield open_client(self, gateway.port)
        huge = "p" * 40_000
        for cmd, data in (
            ("switch_provider", {"provider": huge}),
            ("switch_provider", {"provider": "kimi", huge: 1}),
            ("status", {f"f{i}": 1 for i in range(3_000)}),
            (huge, None),
            ("usage", {"since": huge}),
            ("consumer_create", {"name": "big", "expires_at": huge}),
            ("consumer_create", {"name": "big", "models": [f"kimi/{huge}"]}),
            ("consumer_create", {"name": "big", huge: 1}),
            # Many long names, one of them a terminal escape: the consumer
            # commands' field check is the control plane's (audit s29: it
            # listed every name whole, the escape raw).
            ("key_create", {"name": "big", "\x1b[2J": 1, **{f"{'x' * 200}{i}": 1 for i in range(201)}}),
            ("consumer_update", {"name": "big", "\x1b[2J": 1}),
        ):
            answer = yield client.command(gateway.token, cmd, data)
            self.assertFalse(answer["ok"])
            self.assertLess(len(str(answer.get("cmd"))), 100)
            self.assertNotIn("not loaded", answer["error"])
            self.assertLess(len(answer["error"]), 400, answer["error"][:200])
            self.assertNotIn("\x1b", answer["error"])
        for event in self.events:
            self.assertLess(len(formatEvent(event)), 4096)

    @inlineCallbacks
    def test_switch_provider_refuses(self):
        gateway = self.gateway()
        client = yield open_client(self, gateway.port)
        for model in HOSTILE_MODELS:
            answer = yield client.command(gateway.token, "switch_provider", {"provider": "kimi", "model": model})
            self.assertFalse(answer["ok"], model)
            self.assertIn("control or invisible characters", answer["error"])
        status = yield client.command(gateway.token, "status")
        self.assertEqual(
            (status["result"]["provider_id"], status["result"]["model"]), ("gemini", "gemini-flash-latest")
        )


class ModelLengthTests(DataPlaneTestCase):
    """
    A model name is at most L{MAX_MODEL_CHARS} characters: a longer one
    would be copied into the X-OpenClaw-Model header and the log line (a
    header the openai SDK cannot read), and into Gemini's URL, which the
    provider drops, counted against its breaker for everyone.
    """

    @inlineCallbacks
    def test_refused_at_the_door(self):
        gateway = self.gateway()
        sdk = self.sdk(gateway)
        for model in ("kimi/" + "z" * (1 << 20), "gemini/" + "a" * 20_000, "x" * (MAX_MODEL_CHARS + 1)):
            for _ in range(5):
                try:
                    yield deferToThread(
                        sdk.chat.completions.create, model=model, messages=[{"role": "user", "content": "hi"}]
                    )
                except openai.BadRequestError as e:
                    self.assertEqual(e.param, "model")
                    self.assertIn(f"model is {len(model)} characters long", e.message)
                    self.assertIn(f"at most {MAX_MODEL_CHARS}", e.message)
                else:
                    self.fail(f"a model of {len(model)} characters was taken")
            try:
                yield deferToThread(sdk.embeddings.create, model=model, input="hi")
            except openai.BadRequestError as e:
                self.assertEqual(e.param, "model")
                self.assertIn(f"model is {len(model)} characters long", e.message)
            else:
                self.fail(f"an embeddings model of {len(model)} characters was taken")
        self.assertEqual(self.upstream.gemini.requests + self.upstream.kimi.requests, 0)
        for event in self.events:
            self.assertLess(len(formatEvent(event)), 4096)
        # Gemini's breaker is still closed.
        answer = yield deferToThread(
            sdk.chat.completions.create,
            model="gemini/gemini-flash-latest",
            messages=[{"role": "user", "content": "hi"}],
        )
        self.assertEqual(answer.choices[0].message.content, "Hello from the stand-in.")
        # A name of the longest length goes to the provider (which knows no
        # such model).
        longest = "kimi/" + "m" * (MAX_MODEL_CHARS - len("kimi/"))
        with self.assertRaises(openai.NotFoundError):
            yield deferToThread(
                sdk.chat.completions.create, model=longest, messages=[{"role": "user", "content": "hi"}]
            )
        self.assertEqual(self.upstream.kimi.last_body["model"], longest.removeprefix("kimi/"))

    @inlineCallbacks
    def test_switch_provider_refuses(self):
        gateway = self.gateway()
        client = yield open_client(self, gateway.port)
        answer = yield client.command(
            gateway.token, "switch_provider", {"provider": "kimi", "model": "m" * (MAX_MODEL_CHARS + 1)}
        )
        self.assertFalse(answer["ok"])
        self.assertIn(f"data.model is {MAX_MODEL_CHARS + 1} characters long", answer["error"])


class ClusterRouteTests(ClusterCase):
    """
    The cluster's route in Redis is held to the rule the API and
    C{switch_provider} apply to model names (L{model_refusal}): a route
    someone wrote there with a model holding an escape code, or longer than
    L{MAX_MODEL_CHARS}, is not applied, as one naming an unknown provider.
    """

    @inlineCallbacks
    def test_refused_model_not_applied(self):
        """
        Written to Redis and published as an instance would: each refused
        route is logged with the reason, never the name, and the instance
        keeps its route; then a good one written the same way is applied.
        """
        a = self.spawn()
        token = yield a.token
        on_a = yield self.client(a.port)
        key, channel = "openclaw:state:route", "openclaw:events"
        version = int((yield deferToThread(redis_command, self.redis.port, "HGET", key, "version")))
        for model, reason in [
            ("moonshot-v1-8k\x1b[2J\r\nX-Injected: 1" + "a" * 5000, b"model holds control or invisible characters"),
            ("k" * (MAX_MODEL_CHARS + 1), f"model is {MAX_MODEL_CHARS + 1} characters long".encode()),
            ("moonshot-v1-8k", None),
        ]:
            version += 1
            value = json.dumps({"provider": "kimi", "model": model})
            yield deferToThread(
                redis_command, self.redis.port, "HSET", key, "version", str(version), "value", value, "origin", "x"
            )
            yield deferToThread(redis_command, self.redis.port, "PUBLISH", channel, f"v\troute\t{version}\tx\t{value}")
            if reason is None:
                yield printed(a, b"applied the cluster's route kimi/moonshot-v1-8k")
                break
            said = f"ignoring the cluster's route (version {version}): its ".encode() + reason
            yield printed(a, said)
            status = yield on_a.ask(token, "status")
            self.assertEqual(
                (status["result"]["provider_id"], status["result"]["model"]), ("gemini", "gemini-flash-latest")
            )
        status = yield on_a.ask(token, "status")
        self.assertEqual((status["result"]["provider_id"], status["result"]["model"]), ("kimi", "moonshot-v1-8k"))
        for raw in (b"\x1b", b"\\x1b", b"X-Injected", b"a" * 100, b"k" * 100):
            self.assertNotIn(raw, a.stdout)


def nested(depth: int) -> object:
    value: object = "ping"
    for _ in range(depth):
        value = [value]
    return value


class AuthFailureTests(DataPlaneTestCase):
    @inlineCallbacks
    def test_any_cmd_logged_counted_answered(self):
        """
        C{{"token": "x", "cmd": <a list nested 1000 deep>}} and other
        shapes: logged (summarised), counted and answered, and the
        connection keeps serving.
        """
        gateway = self.gateway(max_auth_failures=100)
        client = yield open_client(self, gateway.port)
        deep = "[" * 1000 + '"ping"' + "]" * 1000
        shapes = [
            deep,
            '{"a": ' + deep[100:-100] + "}",
            *(json.dumps(v) for v in ("x" * 60_000, 1e308, None, True, FORGED)),
        ]
        for cmd in shapes:
            # Written by hand: the standard json module cannot encode 1000 deep.
            client.send(b'{"token": "x", "cmd": ' + cmd.encode() + b"}")
            answer = yield client.received.get()
            self.assertEqual((answer["ok"], answer["error"]), (False, "invalid token"))
        failures = [e for e in self.events if e.get("outcome") == "auth_failed"]
        self.assertEqual(len(failures), len(shapes))
        logged = [e["cmd"] for e in failures]
        self.assertEqual(logged[:2], ["<list of 1 item>", "<object of 1 key>"])
        for event in failures:
            self.assertLessEqual(len(event["cmd"]), 100)
            self.assertNotIn("\n", formatEvent(event))
        exposition = generate_latest(gateway.service.metrics.registry).decode()
        self.assertIn(f'openclaw_control_auth_failures_total{{reason="invalid token"}} {len(shapes)}.0', exposition)
        answer = yield client.command(gateway.token, "ping")
        self.assertTrue(answer["ok"])

    @inlineCallbacks
    def test_messages_without_token_before_authentication(self):
        """
        Text that is not JSON, or JSON that is not an object, sent before
        authenticating: an authentication failure like any other (it
        counts toward the lockout), so logged and counted too (missing
        token); after authenticating, only answered.
        """
        gateway = self.gateway(max_auth_failures=100)
        client = yield open_client(self, gateway.port)
        for payload in (b"not json", b"[1, 2]", b'"ping"'):
            client.send(payload)
            answer = yield client.received.get()
            self.assertFalse(answer["ok"])
        failures = [e for e in self.events if e.get("outcome") == "auth_failed"]
        self.assertEqual(
            [(e["reason"], e["failed_auths"]) for e in failures], [("missing token", n) for n in (1, 2, 3)]
        )
        exposition = generate_latest(gateway.service.metrics.registry).decode()
        self.assertIn('openclaw_control_auth_failures_total{reason="missing token"} 3.0', exposition)
        answer = yield client.command(gateway.token, "ping")
        self.assertTrue(answer["ok"])
        client.send(b"not json")
        answer = yield client.received.get()
        self.assertFalse(answer["ok"])
        self.assertEqual(len([e for e in self.events if e.get("outcome") == "auth_failed"]), 3)


class SummaryTests(SynchronousTestCase):
    def test_never_raises(self) -> None:
        self.assertEqual(summarise(nested(100_000)), "<list of 1 item>")
        self.assertEqual(summarise("status"), "status")
        self.assertEqual(summarise("a\x1bb"), "'a\\x1bb'")
        self.assertEqual(summarise("y" * 200), "y" * 80 + "…")
        self.assertEqual(summarise(None), "null")
        self.assertEqual(summarise(2.5), "2.5")
        self.assertEqual(json.loads(json.dumps(summarise({}))), "<object of 0 keys>")
