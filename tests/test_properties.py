"""
Property tests of the message path: whatever arrives, the answer is a
well-formed JSON object, and nothing unauthenticated changes any state.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from openclaw.control.commands import ControlCommands
from openclaw.control.plane import Connection, ControlPlane
from openclaw.routing import ActiveRoute, Route
from openclaw.session import SessionAuthority
from tests.test_commands import FakeProviders

SECRET = b"p" * 32
COMMANDS = ["ping", "status", "switch_provider", "health_check", "rotate_token"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
commands = st.sampled_from(COMMANDS) | json_values
datas = (
    st.none()
    | json_values
    | st.fixed_dictionaries(
        {}, optional={"provider": st.sampled_from(["kimi", "gemini", "openai"]) | json_values, "model": json_values}
    )
)


class MessagePathProperties(SynchronousTestCase):
    def setUp(self) -> None:
        self.failures: list[dict[str, Any]] = []
        self.sessions = SessionAuthority(SECRET, 3600)
        self.token = self.sessions.issue().token
        self.route = ActiveRoute(Route("gemini", "gemini-flash-latest"))
        self.plane = ControlPlane(
            self.sessions,
            ControlCommands(
                route=self.route,
                providers=FakeProviders(),
                sessions=self.sessions,
                rotate=self.sessions.issue,
                connections=lambda: 1,
                started_at=0.0,
            ),
            Logger(observer=lambda e: self.failures.append(e) if "log_failure" in e else None),
        )

    def answer(self, payload: bytes) -> dict[str, Any]:
        result = self.plane.handle(payload, Connection("fuzz"))
        if isinstance(result, Deferred):
            result = self.successResultOf(result)
        self.assertIsInstance(result, bytes)
        answer = json.loads(result)
        self.assertIsInstance(answer, dict)
        self.assertIsInstance(answer["ok"], bool)
        self.assertTrue(answer["cmd"] is None or isinstance(answer["cmd"], str))
        if answer["ok"]:
            self.assertIsInstance(answer["result"], dict)
        else:
            self.assertIsInstance(answer["error"], str)
            self.assertTrue(answer["error"])
        self.assertEqual(self.failures, [])
        return answer

    def assertUnchanged(self, token: str) -> None:
        self.assertEqual(self.route.current, Route("gemini", "gemini-flash-latest"))
        self.assertEqual(self.sessions.current.token, token)

    @settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=300))
    def test_any_bytes(self, payload: bytes) -> None:
        answer = self.answer(payload)
        self.assertFalse(answer["ok"])
        self.assertUnchanged(self.token)

    @settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
    @given(json_values)
    def test_any_json(self, value: Any) -> None:
        answer = self.answer(json.dumps(value).encode())
        self.assertFalse(answer["ok"])
        self.assertUnchanged(self.token)

    @settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
    @given(st.none() | st.text(max_size=400) | json_values, commands, datas)
    def test_unauthenticated_changes_nothing(self, token: Any, cmd: Any, data: Any) -> None:
        if token == self.token:
            return
        message = {"token": token, "cmd": cmd, "data": data}
        answer = self.answer(json.dumps(message).encode())
        self.assertFalse(answer["ok"])
        self.assertIn(answer["error"], {"missing token", "invalid token", "token expired", "token revoked"})
        self.assertUnchanged(self.token)

    @settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
    @given(commands, datas)
    def test_authenticated_always_answered(self, cmd: Any, data: Any) -> None:
        message = {"token": self.sessions.current.token, "cmd": cmd, "data": data}
        answer = self.answer(json.dumps(message).encode())
        if not answer["ok"]:
            self.assertIn(self.route.current.provider_id, ("kimi", "gemini"))
