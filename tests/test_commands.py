"""
The message path without sockets: parsing, authentication, validation and
each command's answer, through L{ControlPlane.handle}.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import attrs
import jwt
import orjson
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from openclaw.cluster.node import TokenBehind, TokenNotAdoptedHere
from openclaw.control.commands import ControlCommands
from openclaw.control.plane import Connection, ControlPlane, unreadable_json
from openclaw.logs import COMMANDS_NAMESPACE, REFUSED_CONNECTION_LINES, make_observer
from openclaw.routing import ActiveRoute, Route
from openclaw.session import SessionAuthority

SECRET = b"c" * 32


def orjson_error(payload: bytes) -> orjson.JSONDecodeError:
    try:
        orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        return e
    raise AssertionError(f"{payload!r} parses")


@attrs.define
class FakeProvider:
    id: str
    display_name: str
    default_model: str
    key_missing: bool = False

    def missing_key_warning(self) -> str | None:
        return f"{self.id.upper()}_API_KEY is not set" if self.key_missing else None

    def unavailable_warning(self, model: str | None = None) -> str | None:
        return None

    def unlisted_model_warning(self, model: str) -> str | None:
        return None

    def normalize_model(self, model: str) -> str:
        return model.removeprefix("models/")


@attrs.define
class FakeProviders:
    ids: tuple[str, ...] = ("kimi", "gemini")
    checks: list[tuple[str, str]] = attrs.Factory(list)
    kimi_key_missing: bool = False

    def get(self, provider_id: str) -> FakeProvider:
        if provider_id == "kimi":
            return FakeProvider("kimi", "Kimi (Moonshot AI)", "moonshot-v1-8k", self.kimi_key_missing)
        return FakeProvider("gemini", "Google Gemini", "gemini-flash-latest")

    def health_check(self, active_id: str, active_model: str) -> Deferred[dict[str, Any]]:
        self.checks.append((active_id, active_model))
        return succeed({"active": active_id})


class ControlPlaneTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.now = 1_800_000_000.0
        self.events: list[dict[str, Any]] = []
        self.sessions = SessionAuthority(SECRET, 3600, clock=lambda: self.now)
        self.token = self.sessions.issue().token
        self.route = ActiveRoute(Route("gemini", "gemini-flash-latest"))
        self.providers = FakeProviders()
        self.commands = ControlCommands(
            route=self.route,
            providers=self.providers,
            sessions=self.sessions,
            rotate=self.sessions.issue,
            connections=lambda: 3,
            started_at=self.now - 12.5,
            clock=lambda: self.now,
        )
        self.plane = ControlPlane(self.sessions, self.commands, Logger(observer=self.events.append), debug=True)
        self.connection = Connection("127.0.0.1:5000")

    def with_extra(self, extra: dict[str, Any], fence: Callable[[], Deferred[None]] | None = None) -> ControlPlane:
        """
        A plane like L{setUp}'s whose commands add (or replace) C{extra}
        (L{ControlCommands.extra}: the consumer commands' way in), with
        C{fence} (L{ControlPlane}'s: a cluster's).
        """
        commands = attrs.evolve(self.commands, extra=extra)
        return ControlPlane(self.sessions, commands, Logger(observer=self.events.append), debug=True, fence=fence)

    def test_token_not_known_yet(self) -> None:
        """
        In a cluster, a token signed with its secret and issued after the
        current one (the cluster's newest, not applied here yet) is
        answered "token not known here yet" with what to do: no failed
        authentication, but a stale token for the bound (review s44: any
        holder of the newest token could loop on a lagging instance
        without end), so MAX_AUTH_FAILURES of them in a row close the
        connection saying so; a guess after them resets the run and
        counts, and the close at the deadline is then a guess's.
        """
        sessions = SessionAuthority(SECRET, 3600, clock=lambda: self.now, shared=True)
        current = sessions.issue()
        plane = ControlPlane(sessions, self.commands, Logger(observer=self.events.append), max_auth_failures=2)
        claims = {"iss": "openclaw-gateway", "jti": "newer", "iat": current.issued_at + 5, "exp": current.expires_at}
        newer = jwt.encode(claims, SECRET, algorithm="HS256")
        said = (
            "token not known here yet: this instance has not heard of the cluster's latest rotation; retry in a moment"
        )

        def send(token: str) -> dict[str, Any]:
            answer = plane.handle(json.dumps({"token": token, "cmd": "status"}).encode(), self.connection)
            assert isinstance(answer, bytes)
            return dict(json.loads(answer))

        self.assertEqual(send(newer)["error"], said)
        self.assertFalse(plane.too_many_stale(self.connection))
        self.assertEqual(self.connection.genuine_refusal, said)
        self.assertEqual(send(newer)["error"], said)
        self.assertTrue(plane.too_many_stale(self.connection))
        self.assertFalse(plane.too_many_failures(self.connection))
        self.assertEqual(send("forged")["error"], "invalid token")
        self.assertEqual((self.connection.stale_refusals, self.connection.failed_auths), (0, 1))
        self.assertIsNone(self.connection.genuine_refusal)
        # A message with no token at all is a guess too.
        send(newer)
        plane.handle(b"not json", self.connection)
        self.assertEqual((self.connection.stale_refusals, self.connection.genuine_refusal), (0, None))
        self.assertEqual(send(current.token)["ok"], True)
        self.assertEqual((self.connection.stale_refusals, self.connection.failed_auths), (0, 0))

    def test_stale_token_lines_limited(self) -> None:
        """
        The refusals of a stale token (revoked, expired) are logged as
        refused connections are, a few a second with the count of those
        left out (recheck s44: a client reconnecting with one wrote 3,900
        lines a second); every guess is logged.
        """
        out = io.StringIO()
        log = Logger(namespace=COMMANDS_NAMESPACE, observer=make_observer(out, "json", "info"))
        plane = ControlPlane(self.sessions, self.commands, log, max_auth_failures=1000)
        revoked = self.token
        self.sessions.issue()
        for _ in range(100):
            plane.handle(json.dumps({"token": revoked, "cmd": "ping"}).encode(), Connection("203.0.113.7:1"))
        for _ in range(20):
            plane.handle(json.dumps({"token": "forged", "cmd": "ping"}).encode(), Connection("203.0.113.8:1"))
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([line.get("reason") for line in lines].count("token revoked"), REFUSED_CONNECTION_LINES)
        self.assertEqual([line.get("reason") for line in lines].count("invalid token"), 20)

    def send(self, message: Any) -> dict[str, Any]:
        payload = message if isinstance(message, bytes) else json.dumps(message).encode()
        answer = self.plane.handle(payload, self.connection)
        if isinstance(answer, Deferred):
            answer = self.successResultOf(answer)
        return json.loads(answer)

    def command(self, cmd: Any, data: Any = None, token: Any = "") -> dict[str, Any]:
        message = {"token": self.token if token == "" else token, "cmd": cmd}
        if data is not None:
            message["data"] = data
        return self.send(message)

    def test_answer_longer_than_a_message(self) -> None:
        """
        An answer longer than MAX_MESSAGE_BYTES is an error saying so, on
        the fast path (ping and status, not debug) too.
        """
        for debug in (False, True):
            plane = ControlPlane(
                self.sessions, self.commands, Logger(observer=self.events.append), debug=debug, max_answer_bytes=200
            )
            answer = json.loads(
                plane.handle(json.dumps({"token": self.token, "cmd": "status"}).encode(), self.connection)
            )  # type: ignore[arg-type]
            self.assertFalse(answer["ok"], debug)
            self.assertIn("is longer than MAX_MESSAGE_BYTES (200) allows; raise MAX_MESSAGE_BYTES", answer["error"])
            answer = json.loads(
                plane.handle(json.dumps({"token": self.token, "cmd": "ping"}).encode(), self.connection)
            )  # type: ignore[arg-type]
            self.assertTrue(answer["ok"])

    def test_cut_answer_still_too_long(self) -> None:
        """
        A state-changing command is carried out before its answer is made:
        one too long is cut to its fields that are not objects or lists,
        with a warning saying so first, audited as done (it was an error,
        "ask for less", for a change that was made); one whose own fields
        are still too long (a switch's warning naming consumers), and an
        error longer than the limit (a refusal listing a consumer's key
        prefixes), are cut to fit: Autobahn sent nothing.
        """
        commands = attrs.evolve(
            self.commands, excluded_consumers=lambda provider, model: [f"{'c' * 60}-{i}" for i in range(5)]
        )
        plane = ControlPlane(
            self.sessions, commands, Logger(observer=self.events.append), debug=True, max_answer_bytes=300
        )
        message = {"token": self.token, "cmd": "switch_provider", "data": {"provider": "kimi"}}
        encoded = plane.handle(json.dumps(message).encode(), self.connection)
        assert isinstance(encoded, bytes)
        self.assertLessEqual(len(encoded), 300)
        answer = json.loads(encoded)
        self.assertTrue(answer["ok"])
        self.assertEqual(answer["result"]["active"], "kimi")
        warning = answer["result"]["warning"]
        self.assertTrue(warning.startswith("the answer ("), warning)
        self.assertIn("allows: the change was made", warning)
        self.assertTrue(warning.endswith("...(cut)"), warning)
        [audit] = [e for e in self.events if e.get("cmd") == "switch_provider"]
        self.assertEqual((audit["outcome"], audit["answer"]), ("ok", "cut"))
        error = plane._error("key_revoke", "x" * 5000)
        self.assertLessEqual(len(error), 300)
        self.assertIn("cut to fit MAX_MESSAGE_BYTES", json.loads(error)["error"])
        # Cut in bytes, not characters: a CJK model name of 256 characters.
        long_ok = {"model": "模" * 256, "warning": "w" * 2000}
        fitted = plane._cut(long_ok, "switch_provider", 5000)
        self.assertLessEqual(len(fitted), 300)
        self.assertIn("warning", json.loads(fitted)["result"])
        # A refusal quoting what was sent, before any command ran.
        refused = plane.handle(json.dumps({"token": self.token, "cmd": "\U000e0001" * 100}).encode(), self.connection)
        assert isinstance(refused, bytes)
        self.assertLessEqual(len(refused), 300)
        self.assertFalse(json.loads(refused)["ok"])

    def test_cut_answer_keeps_its_key_whatever_else_goes(self) -> None:
        """
        A state-changing command's answer whose texts do not fit even cut
        keeps its new key or token whole, with the warning that nothing
        else fits; an error cut to fit says so.
        """
        plane = ControlPlane(
            self.sessions, self.commands, Logger(observer=self.events.append), debug=True, max_answer_bytes=300
        )
        result = {"key": "k" * 120, **{f"field{i}": "x" * 200 for i in range(8)}, "limits": {"rpm": 1}}
        encoded = plane._cut(result, "key_create", 5000)
        self.assertLessEqual(len(encoded), 300)
        self.assertEqual(
            json.loads(encoded),
            {
                "ok": True,
                "cmd": "key_create",
                "result": {
                    "key": "k" * 120,
                    "warning": "the answer is longer than MAX_MESSAGE_BYTES allows, even cut; raise MAX_MESSAGE_BYTES",
                },
            },
        )
        error = json.loads(plane._error("c" * 81, "x" * 5000))
        self.assertIsNone(error["cmd"])
        self.assertEqual(error["error"], "x" * 150 + "...(cut) (cut to fit MAX_MESSAGE_BYTES)")

    def test_ping(self) -> None:
        self.assertEqual(
            self.command("ping"), {"ok": True, "cmd": "ping", "result": {"pong": True, "ts": 1_800_000_000_000}}
        )

    def test_status(self) -> None:
        self.assertEqual(
            self.command("status")["result"],
            {
                "provider": "Google Gemini",
                "provider_id": "gemini",
                "model": "gemini-flash-latest",
                "uptime": 12.5,
                "started_at": "2027-01-15T07:59:47Z",
                "token_expires": "2027-01-15T09:00:00Z",
                "connections": 3,
            },
        )

    def test_uptime_by_the_monotonic_clock(self) -> None:
        """
        With the monotonic clock's reading at the start, the uptime goes by
        it: the wall clock set back an hour since does not make it
        negative (trial s31: "uptime: -3578.6s").
        """
        self.commands = attrs.evolve(
            self.commands, clock=lambda: 1_800_000_000.0 - 3600, started_monotonic=500.0, monotonic=lambda: 512.5
        )
        self.plane = ControlPlane(self.sessions, self.commands, Logger(observer=self.events.append))
        self.assertEqual(self.command("status")["result"]["uptime"], 12.5)

    def test_switch_provider(self) -> None:
        answer = self.command("switch_provider", {"provider": "kimi", "model": "moonshot-v1-32k"})
        self.assertEqual(
            answer,
            {
                "ok": True,
                "cmd": "switch_provider",
                "result": {"previous": "gemini", "active": "kimi", "model": "moonshot-v1-32k"},
            },
        )
        self.assertEqual(self.route.current, Route("kimi", "moonshot-v1-32k"))
        status = self.command("status")["result"]
        self.assertEqual((status["provider"], status["model"]), ("Kimi (Moonshot AI)", "moonshot-v1-32k"))

    def test_switch_default_model(self) -> None:
        result = self.command("switch_provider", {"provider": "kimi"})["result"]
        self.assertEqual(result["model"], "moonshot-v1-8k")
        # Null is "not given", as everywhere.
        self.command("switch_provider", {"provider": "gemini"})
        result = self.command("switch_provider", {"provider": "kimi", "model": None})["result"]
        self.assertEqual(result["model"], "moonshot-v1-8k")

    def test_switch_provider_prefix(self) -> None:
        """
        A model named with its provider's prefix, as the data plane takes
        it: the prefix in any letter case, space around the whole ignored.
        """
        for model in ("kimi/moonshot-v1-32k", "KIMI/moonshot-v1-32k", " Kimi/moonshot-v1-32k "):
            result = self.command("switch_provider", {"provider": "kimi", "model": model})["result"]
            self.assertEqual(result["model"], "moonshot-v1-32k", model)

    def test_switch_provider_id_in_any_case(self) -> None:
        """
        data.provider in any letter case, space around it ignored, as the
        model's prefix (recheck s41: "KIMI" was an unknown provider).
        """
        for given in ("KIMI", " Kimi "):
            result = self.command("switch_provider", {"provider": given})["result"]
            self.assertEqual(result["model"], "moonshot-v1-8k", given)
            self.assertEqual(self.route.current.provider_id, "kimi")

    def test_switch_warns_when_key_missing(self) -> None:
        self.providers.kimi_key_missing = True
        result = self.command("switch_provider", {"provider": "kimi"})["result"]
        self.assertEqual(result["warning"], "KIMI_API_KEY is not set")
        self.assertEqual(self.route.current.provider_id, "kimi")

    def test_switch_refusals_change_nothing(self) -> None:
        for data, expected in [
            (None, "needs data.provider"),
            ({}, "needs data.provider"),
            ({"provider": "openai"}, "unknown provider 'openai'"),
            ({"provider": 7}, "unknown provider 7"),
            ({"provider": " "}, "unknown provider ' '"),
            ({"provider": "kimi", "model": ""}, "non-empty string"),
            ({"provider": "kimi", "model": "  "}, "non-empty string"),
            ({"provider": "kimi", "model": 8}, "non-empty string"),
            ({"provider": "kimi", "extra": 1}, "unknown field(s) in data: extra"),
            ("kimi", "data must be a JSON object"),
            ([1], "data must be a JSON object"),
        ]:
            message = {"token": self.token, "cmd": "switch_provider", "data": data}
            answer = self.send(message)
            self.assertEqual(answer["ok"], False, data)
            self.assertEqual(answer["cmd"], "switch_provider")
            self.assertIn(expected, answer["error"])
        self.assertEqual(self.route.current, Route("gemini", "gemini-flash-latest"))

    def test_health_check_asks_providers_with_active_route(self) -> None:
        self.assertEqual(self.command("health_check")["result"], {"active": "gemini"})
        self.assertEqual(self.providers.checks, [("gemini", "gemini-flash-latest")])

    def test_rotate_token(self) -> None:
        old = self.token
        result = self.command("rotate_token")["result"]
        self.assertEqual(set(result), {"token", "jti", "expires"})
        self.assertEqual(result["jti"], self.sessions.current.jti)
        self.assertEqual(self.command("ping", token=old)["error"], "token revoked")
        self.assertTrue(self.command("ping", token=result["token"])["ok"])

    def test_rotation_made_and_not_adopted_here(self) -> None:
        """
        A cluster's rotation written to the store that this instance could
        not adopt (L{TokenNotAdoptedHere}) is refused with its own message
        (made cluster-wide, what to do), not "nothing was rotated" nor an
        internal error.
        """
        plane = ControlPlane(
            self.sessions,
            attrs.evolve(self.commands, rotate=lambda: fail(TokenNotAdoptedHere("new-jti", "Not a directory"))),
            Logger(observer=self.events.append),
            debug=True,
        )
        answer = json.loads(
            self.successResultOf(
                plane.handle(json.dumps({"token": self.token, "cmd": "rotate_token"}).encode(), self.connection)
            )
        )  # type: ignore[arg-type]
        self.assertFalse(answer["ok"])
        self.assertIn("the session token was rotated cluster-wide (new token id new-jti", answer["error"])
        self.assertIn("(Not a directory)", answer["error"])
        self.assertNotIn("nothing was rotated", answer["error"])

    def test_bad_json(self) -> None:
        answer = self.send(b"{not json")
        self.assertEqual((answer["ok"], answer["cmd"]), (False, None))
        # orjson's reason and where: line 1 column 2 (char 1).
        self.assertTrue(answer["error"].startswith("message is not valid JSON ("), answer)
        self.assertIn("(char 1)", answer["error"])

    def test_nan(self) -> None:
        """
        NaN and Infinity are named, as on the data plane (recheck s45).
        """
        for payload in (b'{"cmd": "ping", "data": {"n": NaN}}', b'{"cmd": "ping", "data": {"n": -Infinity}}'):
            error = self.send(payload)["error"]
            self.assertTrue(error.startswith("message is not valid JSON ("), error)
            self.assertTrue(
                error.endswith(
                    "it holds NaN or Infinity, which JSON has no number for "
                    "(RFC 8259 section 6); send a number or null there"
                ),
                error,
            )

    def test_json_past_what_is_read(self) -> None:
        """
        JSON orjson does not read (too deep, a number past a double, a lone
        surrogate) is said as such, with orjson's reason and what to send,
        not as "not valid JSON" (re-attack s32).
        """
        for payload, reason, advice in [
            (b'{"cmd": "ping", "data": {"n": 1e999}}', "number is infinity", "keep numbers within a double's range"),
            (b"[" * 2000 + b"]" * 2000, "depth limit exceeded", "nest at most 1024 levels"),
            (b'{"cmd": "ping", "data": {"name": "\\ud800"}}', "surrogate", "as its whole surrogate pair"),
        ]:
            error = self.send(payload)["error"]
            self.assertTrue(error.startswith("message is JSON past what the gateway reads ("), error)
            self.assertIn(reason, error)
            # What to do about its own reason, not the others' (hostile
            # trial s45: a lone surrogate was told to nest less).
            self.assertTrue(error.endswith(advice), error)
        # Not UTF-8 (orjson's reason names surrogates too): said as such.
        self.assertEqual(
            unreadable_json(b'{"cmd": "caf\xe9"}', orjson_error(b'{"cmd": "caf\xe9"}')),
            "message is not UTF-8 (an invalid byte at offset 12): send JSON encoded as UTF-8",
        )

    def test_not_an_object(self) -> None:
        for payload in [b"[]", b"1", b'"ping"', b"null"]:
            answer = self.send(payload)
            self.assertEqual((answer["ok"], answer["cmd"]), (False, None))
            self.assertIn("must be a JSON object", answer["error"])

    def test_token_errors_echo_cmd(self) -> None:
        self.assertEqual(self.send({"cmd": "ping"}), {"ok": False, "cmd": "ping", "error": "missing token"})
        self.assertEqual(self.command("ping", token=5), {"ok": False, "cmd": "ping", "error": "invalid token"})
        self.assertEqual(self.command(["ping"], token="x")["cmd"], None)

    def test_cmd_must_be_string(self) -> None:
        for cmd in [None, 3, ["ping"], {"a": 1}]:
            answer = self.command(cmd)
            self.assertEqual((answer["ok"], answer["cmd"]), (False, None))
            self.assertIn("cmd must be a string", answer["error"])

    def test_unknown_command(self) -> None:
        answer = self.command("reboot")
        self.assertEqual((answer["ok"], answer["cmd"]), (False, "reboot"))
        self.assertIn("unknown command 'reboot'", answer["error"])
        self.assertIn("switch_provider", answer["error"])

    def test_unknown_fields_refused(self) -> None:
        answer = self.command("ping", {"verbose": True})
        self.assertEqual(answer["ok"], False)
        self.assertIn("verbose", answer["error"])

    def test_state_changing_commands_fenced(self) -> None:
        """
        In a cluster, a state-changing command waits for the store's word
        that this instance holds the cluster's token, and changes nothing
        when it does not (re-attack s25: an instance stalled through a
        rotation made a consumer and a key on the revoked token); the
        others do not wait.
        """
        asked: list[str] = []

        def behind() -> Deferred[None]:
            asked.append("fence")
            return fail(TokenBehind())

        extra = {"key_create": lambda data: asked.append("key_create") or {"key": "ock-x"}}
        self.plane = self.with_extra(extra, fence=behind)
        answer = self.command("key_create", {"name": "team"})
        self.assertEqual(answer["ok"], False)
        self.assertIn("has not applied the rotation yet; nothing changed", answer["error"])
        self.assertEqual(asked, ["fence"])
        # Not the reads, nor a switch (the store's write checks the token).
        self.assertEqual(self.command("status")["ok"], True)
        self.assertEqual(self.command("switch_provider", {"provider": "kimi"})["ok"], True)
        self.assertEqual(asked, ["fence"])
        self.plane = self.with_extra(extra, fence=lambda: succeed(None))
        self.assertEqual(self.command("key_create", {"name": "team"})["result"], {"key": "ock-x"})
        self.assertEqual(asked, ["fence", "key_create"])

    def test_internal_error_is_answered(self) -> None:
        def broken(data: object) -> Deferred[Any]:
            raise RuntimeError("boom")

        self.plane = self.with_extra({"ping": broken})
        answer = self.command("ping")
        self.assertEqual(answer["ok"], False)
        self.assertIn("internal error", answer["error"])
        self.assertNotIn("boom", answer["error"])
        failures = [e["log_failure"] for e in self.events if "log_failure" in e]
        self.assertEqual([f.type for f in failures], [RuntimeError])

    def test_audit_log(self) -> None:
        """
        State-changing commands and auth failures are logged at info/warn
        with peer, jti, outcome and duration; ping/status at debug only.
        """
        self.command("ping")
        self.command("switch_provider", {"provider": "kimi"})
        self.command("status", token="forged")
        by_level = [(e["log_level"], e.get("cmd"), e.get("outcome")) for e in self.events]
        self.assertEqual(
            by_level,
            [
                (LogLevel.debug, "ping", "ok"),
                (LogLevel.info, "switch_provider", "ok"),
                (LogLevel.warn, "status", "auth_failed"),
            ],
        )
        audited = self.events[1]
        self.assertEqual(audited["peer"], "127.0.0.1:5000")
        self.assertEqual(audited["jti"], self.sessions.current.jti)
        # Rounded to hundredths as the data plane's lines are (README trial
        # s43: 3.513629999361001 in a JSON line).
        self.assertEqual(audited["duration_ms"], round(audited["duration_ms"], 2))
        self.assertNotIn(self.token, json.dumps([repr(e) for e in self.events]))

    def test_switch_audit_records_the_route_before_and_after(self) -> None:
        """
        The audit event of switch_provider carries the route it replaced
        and the one it set, as fields and in the text; the answer is
        unchanged by them.
        """
        answer = self.command("switch_provider", {"provider": "kimi", "model": "moonshot-v1-32k"})
        self.assertEqual(answer["result"], {"previous": "gemini", "active": "kimi", "model": "moonshot-v1-32k"})
        audited = self.events[-1]
        self.assertEqual(
            {key: audited.get(key) for key in ("outcome", "previous_provider", "previous_model", "provider", "model")},
            {
                "outcome": "ok",
                "previous_provider": "gemini",
                "previous_model": "gemini-flash-latest",
                "provider": "kimi",
                "model": "moonshot-v1-32k",
            },
        )
        self.assertIn(
            "previous_provider=gemini previous_model=gemini-flash-latest provider=kimi model=moonshot-v1-32k",
            formatEvent(audited),
        )

    def test_failed_switch_audit_records_the_error(self) -> None:
        """
        A refused switch_provider is audited with the error its client was
        told, and nothing of a route.
        """
        answer = self.command("switch_provider", {"provider": "acme"})
        audited = self.events[-1]
        self.assertEqual((audited["cmd"], audited["outcome"]), ("switch_provider", "error"))
        self.assertEqual(audited["error"], answer["error"])
        self.assertIn("unknown provider 'acme'", formatEvent(audited))
        self.assertNotIn("provider", audited)

    def test_log_lines_cannot_be_forged(self) -> None:
        self.command("ping\n2026-11-25 [openclaw] switched to evil", token="forged")
        self.assertNotIn("\n", self.events[-1]["cmd"])

    def test_malformed_messages_count_as_failures(self) -> None:
        for _ in range(5):
            self.send(b"x")
        self.assertTrue(self.plane.too_many_failures(self.connection))

    def test_malformed_messages_after_authenticating_are_not_failures(self) -> None:
        """
        Once a connection has authenticated, its malformed messages are
        answered with their error but are no failed authentications; a
        bad token still is one.
        """
        self.assertTrue(self.command("ping")["ok"])
        for _ in range(5):
            self.assertTrue(self.send(b"NaN")["error"].startswith("message is not valid JSON ("))
            self.assertIn("must be a JSON object", self.send(b"[]")["error"])
        self.assertEqual(self.connection.failed_auths, 0)
        self.assertFalse(self.plane.too_many_failures(self.connection))
        self.command("ping", token="forged")
        self.assertEqual(self.connection.failed_auths, 1)

    def test_failed_auths_counted_in_a_row(self) -> None:
        """
        Failed authentications count up per connection; a good token resets
        the count; the plane says when the limit is reached.
        """
        for expected in range(1, 5):
            self.command("ping", token="forged")
            self.assertEqual(self.connection.failed_auths, expected)
            self.assertFalse(self.plane.too_many_failures(self.connection))
        self.command("ping")
        self.assertEqual(self.connection.failed_auths, 0)
        for _ in range(5):
            self.command("ping", token=None)
        self.assertTrue(self.plane.too_many_failures(self.connection))
