"""
Lines of the text log: those that close a control connection (the
lockout's among them) show C{reason=} as the JSON format does, and
Twisted's accept-failure lines, one per socket in an C{EMFILE} flood, are
written at most once a minute with a count of those left out.
"""

from __future__ import annotations

import inspect
import io
import json
from typing import Any

from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase

from openclaw.logs import (
    ACCEPT_ERROR_FORMATS,
    DATAPLANE_NAMESPACE,
    HTTP2_FLOOD_FIELD,
    KEYLESS_FIELD,
    KEYLESS_REFUSAL_LINES,
    make_observer,
    text_line,
)
from tests.support import capture_log_events, open_client, start_gateway
from tests.test_auth_timeout import LOOPBACK


class ControlTextLineTests(TestCase):
    """
    The lines that close a control connection, in the text format.
    """

    timeout = 30

    @inlineCallbacks
    def test_control_text_lines_carry_reason(self):
        """
        The lockout line, and the other lines that close a control
        connection, show C{reason=} in the text format as in JSON.
        """
        events = capture_log_events(self)
        gateway = start_gateway(
            self, auth_lockout_failures=3, max_auth_failures=2, auth_timeout_seconds=1.0, trusted_clients=LOOPBACK
        )
        for _ in range(2):
            client = yield open_client(self, gateway.port)
            for _ in range(2):
                client.send({"token": "forged", "cmd": "ping"})
            yield client.closed
        idle = yield open_client(self, gateway.port, bind="127.0.0.2")
        yield idle.closed
        reasons = set()
        for event in events:
            if event.get("outcome") in ("locked_out", "closed"):
                line = text_line(event) or ""
                self.assertIn(f"reason={event['reason']}", line)
                reasons.add(event["reason"])
        self.assertEqual(reasons, {"auth_lockout", "auth_failures", "auth_timeout"})


class PeerLineLimiterTests(TestCase):
    """
    Twisted's accept-failure lines, one per socket in a flood, are written
    at most once a minute, with a count of those left out; so is
    twisted.web's error line for an HTTP/2 client that does not read its
    control frames' answers, at info; the data plane's lines of refusals
    without an accepted key, a few a second.
    """

    def test_metrics_refusals(self) -> None:
        """
        The metrics listener's refusals (info, naming the peer): a few a
        second; its scrapes (debug) are not counted.
        """
        from openclaw.logs import METRICS_NAMESPACE

        def event(when: float, level: LogLevel = LogLevel.info) -> dict[str, Any]:
            return {
                "log_format": "refused a request with {status} for {peer}: {reason}",
                "log_time": when,
                "log_level": level,
                "log_namespace": METRICS_NAMESPACE,
                "status": 400,
                "peer": "203.0.113.7",
                "reason": "send no request body",
            }

        out = io.StringIO()
        observer = make_observer(out, "json", "info")
        for n in range(100):
            observer(event(1000 + n * 0.005))
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(len(lines), KEYLESS_REFUSAL_LINES)

    def test_keyless_refusals(self) -> None:
        """
        Lines marked L{KEYLESS_FIELD}: L{KEYLESS_REFUSAL_LINES} a second,
        the first one after a full second saying how many were left out
        and since when; the data plane's other lines all go through.
        """

        def event(when: float, **fields: Any) -> dict[str, Any]:
            return {
                "log_format": "GET /v1/models {status} from {peer}",
                "log_time": when,
                "log_level": LogLevel.info,
                "log_namespace": DATAPLANE_NAMESPACE,
                "status": 401,
                "peer": "203.0.113.7",
                **fields,
            }

        out = io.StringIO()
        observer = make_observer(out, "json", "info")
        for n in range(100):
            observer(event(1000 + n * 0.005, **{KEYLESS_FIELD: True}))
            observer(event(1000 + n * 0.005, status=400))
        observer(event(1001.5, **{KEYLESS_FIELD: True}))
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        keyless = [line for line in lines if line["status"] == 401]
        self.assertEqual(len(keyless), KEYLESS_REFUSAL_LINES + 1)
        self.assertEqual(len(lines) - len(keyless), 100)
        self.assertNotIn("keyless_refusals_suppressed", keyless[-2])
        self.assertEqual(keyless[-1]["keyless_refusals_suppressed"], 100 - KEYLESS_REFUSAL_LINES)
        self.assertEqual(
            keyless[-1]["message"],
            f"GET /v1/models 401 from 203.0.113.7 ({100 - KEYLESS_REFUSAL_LINES} similar lines suppressed "
            "in the last 2 s)",
        )

    def test_control_refusals_per_reason(self) -> None:
        """
        The control plane's refusal lines: L{REFUSED_CONNECTION_LINES} a
        second for each reason, so a flood of one (bad handshakes) does not
        hide the lines of another (an untrusted peer).
        """
        from openclaw.logs import CONTROLPLANE_NAMESPACE, REFUSED_CONNECTION_FIELD, REFUSED_CONNECTION_LINES

        def event(when: float, reason: str) -> dict[str, Any]:
            return {
                "log_format": "refused control connection from {peer}: {reason}",
                "log_time": when,
                "log_level": LogLevel.warn,
                "log_namespace": CONTROLPLANE_NAMESPACE,
                "peer": "203.0.113.7:4000",
                "reason": reason,
                REFUSED_CONNECTION_FIELD: reason,
            }

        out = io.StringIO()
        observer = make_observer(out, "json", "info")
        for n in range(100):
            observer(event(1000 + n * 0.005, "bad_handshake"))
        observer(event(1000.6, "untrusted_peer"))
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([line["reason"] for line in lines].count("bad_handshake"), REFUSED_CONNECTION_LINES)
        self.assertEqual(lines[-1]["reason"], "untrusted_peer")
        self.assertNotIn("control_refusals_suppressed", lines[-1])

    def test_http2_floods(self) -> None:
        """
        Lines marked L{HTTP2_FLOOD_FIELD} (an HTTP/2 connection aborted for
        what its client sent after twisted.web ended it): one a minute, the
        next saying how many were left out.
        """

        def event(when: float) -> dict[str, Any]:
            return {
                "log_format": "HTTP/2 connection from {peer} aborted",
                "log_time": when,
                "log_level": LogLevel.info,
                "log_namespace": DATAPLANE_NAMESPACE,
                "peer": "203.0.113.7",
                HTTP2_FLOOD_FIELD: True,
            }

        out = io.StringIO()
        observer = make_observer(out, "json", "info")
        for n in range(30):
            observer(event(1000 + n))
        observer(event(1061))
        first, last = (json.loads(line) for line in out.getvalue().splitlines())
        self.assertEqual(first["message"], "HTTP/2 connection from 203.0.113.7 aborted")
        self.assertEqual(last["http2_floods_suppressed"], 29)
        self.assertIn("(29 similar lines suppressed in the last 61 s)", last["message"])

    def test_rate_limited(self) -> None:
        out = io.StringIO()
        observer = make_observer(out, "text", "info")

        def event(log_format: str, when: float, **fields: Any) -> dict[str, Any]:
            return {
                "log_format": log_format,
                "log_time": when,
                "log_level": LogLevel.info,
                "log_namespace": "twisted.internet.tcp.Port",
                **fields,
            }

        for n in range(100):
            observer(event("Could not accept new connection ({acceptError})", 1000 + n * 0.1, acceptError="EMFILE"))
            observer(event("EMFILE recovery: Closed socket from {address}", 1000 + n * 0.1, address=("10.0.0.1", n)))
        observer(event("something else {n}", 1005, n=1))
        observer(event("Could not accept new connection ({acceptError})", 1061, acceptError="ENFILE"))
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 3, lines)
        self.assertIn("Could not accept new connection (EMFILE)", lines[0])
        self.assertIn("something else 1", lines[1])
        self.assertIn(
            "Could not accept new connection (ENFILE) (199 similar lines suppressed in the last 61 s)", lines[2]
        )

    def test_formats_are_twisteds(self) -> None:
        # Twisted writes two of them as adjacent literals: "a;" " b".
        source = inspect.getsource(tcp).replace('" "', "")
        for log_format in ACCEPT_ERROR_FORMATS:
            self.assertIn(f'"{log_format}"', source)

    def test_upstream_interim_answers(self) -> None:
        """
        Twisted's HTTP client logs each interim (1xx) answer it skips: a
        provider sending them without end is shown once a minute.
        """

        def event(when: float) -> dict[str, Any]:
            # As Twisted's HTTPClientParser logs it (that it does, under
            # this namespace, is proved through a real Agent by
            # tests.test_agent's test_interim_answers_logged_once).
            return {
                "log_format": "Ignoring unexpected {code} response",
                "log_time": when,
                "log_level": LogLevel.info,
                "log_namespace": "twisted.web._newclient.HTTPClientParser",
                "code": 103,
            }

        out = io.StringIO()
        observer = make_observer(out, "json", "info")
        for n in range(1000):
            observer(event(1000 + n * 0.01))
        observer(event(1061))
        first, last = (json.loads(line) for line in out.getvalue().splitlines())
        self.assertEqual(first["message"], "Ignoring unexpected 103 response")
        self.assertEqual(last["upstream_interim_answers_suppressed"], 999)

    def test_http2_control_frames(self) -> None:
        def event(when: float, port: int) -> dict[str, Any]:
            # As twisted.web's H2Connection logs it (that it does, under
            # this namespace, is proved over a real HTTP/2 connection by
            # tests.test_listen's test_http2_ping_flood_is_no_error).
            return {
                "log_format": "Maximum number of control frame bytes buffered: {bufferedControlFrameBytes} > = "
                "{maxBufferedControlFrameBytes}. Aborting connection to client: {client} ",
                "log_time": when,
                "log_level": LogLevel.error,
                "log_namespace": "twisted.web._http2.H2Connection",
                "bufferedControlFrameBytes": 17629,
                "maxBufferedControlFrameBytes": 17408,
                "client": IPv4Address("TCP", "203.0.113.7", port),
            }

        out = io.StringIO()
        observer = make_observer(out, "json", "info")
        for n in range(50):
            observer(event(1000 + n * 0.1, n))
        observer(event(1061, 99))
        first, last = (json.loads(line) for line in out.getvalue().splitlines())
        self.assertEqual((first["level"], first["peer"]), ("info", "203.0.113.7"))
        self.assertEqual(
            first["message"],
            "HTTP/2 connection from 203.0.113.7 aborted: its client sent control frames (PING, SETTINGS) and did "
            "not read the answers (17629 bytes held, at most 17408)",
        )
        self.assertEqual(last["http2_control_frames_suppressed"], 49)
        self.assertIn("(49 similar lines suppressed in the last 61 s)", last["message"])
        # Below LOG_LEVEL=warn, not shown at all.
        quiet = io.StringIO()
        make_observer(quiet, "text", "warn")(event(1000, 1))
        self.assertEqual(quiet.getvalue(), "")
