"""
What start-up tells an operator: one warning line for each thing they would
otherwise find out the hard way.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.components import proxyForInterface
from twisted.trial.unittest import SynchronousTestCase, TestCase

from openclaw.reactors import IGatewayReactor
from openclaw.routing import Route
from openclaw.service import GatewayService, StartRefused
from openclaw.settings import Settings
from openclaw.state import RouteStore
from openclaw.tap import RUNS_AS_ROOT, with_root_warning
from tests.support import RecordingEndpoint, capture_log_events, start_gateway


class StartupWarningTests(TestCase):
    def warnings_of(self, **settings: Any) -> list[str]:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            start_gateway(self, **settings)
        finally:
            globalLogPublisher.removeObserver(events.append)
        return [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]

    def test_nothing_to_say(self):
        """
        Keys for every provider and for clients, the configured route: no
        warning.
        """
        configured = Settings().with_provider("kimi", api_key="k").with_provider("gemini", api_key="g")
        warnings = self.warnings_of(api=True, providers=configured.providers, gateway_api_keys=("client",))
        self.assertEqual(warnings, [])

    def test_missing_keys(self):
        """
        A provider without a key and an API without client keys: one line
        each, naming the setting and what follows from it.
        """
        configured = Settings().with_provider("kimi", api_key="k")
        warnings = self.warnings_of(api=True, providers=configured.providers)
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn(
            "GEMINI_API_KEY is not set: calls to gemini fail over to another provider (FALLBACK) when one can "
            "take them, and calls pinned to it (gemini/...) are refused with 503, until it is set",
            warnings[0],
        )
        self.assertIn("GATEWAY_API_KEYS is not set: every /v1 call will be refused with 401", warnings[1])
        # With FALLBACK=off, nothing fails over.
        warnings = self.warnings_of(api=True, providers=configured.providers, gateway_api_keys=("c",), fallback="off")
        self.assertEqual(
            warnings, ["GEMINI_API_KEY is not set: calls to gemini are refused with 503 (FALLBACK=off) until it is set"]
        )

    def test_no_api_no_key_warnings(self):
        """
        Without an API listener nothing calls a provider: keys are not
        warned about.
        """
        self.assertEqual(self.warnings_of(api=False), [])

    def test_restored_route(self):
        """
        An active provider restored from the state file, other than
        DEFAULT_PROVIDER's, is said once; the configured one is not.
        """
        state_dir = Path(self.mktemp())
        state_dir.mkdir()
        store = RouteStore(state_dir, ("kimi", "gemini"))
        store.save(Route("kimi", "moonshot-v1-32k"))
        warnings = self.warnings_of(state_dir=state_dir, default_provider="gemini")
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("the active provider is kimi/moonshot-v1-32k, restored from", warnings[0])
        self.assertIn("rather than DEFAULT_PROVIDER=gemini", warnings[0])

        store.save(Route("gemini", Settings().default_model("gemini")))
        self.assertEqual(self.warnings_of(state_dir=state_dir, default_provider="gemini"), [])


class PrivilegeSwitchTests(TestCase):
    """
    twistd's --uid/--gid switch the process to another user between
    privilegedStartService and startService, once the gateway's files were
    checked and made as the user it started as (daemon trial s18: a
    root-owned database the dropped process could not open, /readyz 503
    for ever): the service refuses to run then.
    """

    def test_switched_ids_refused(self):
        """
        Effective ids at startService other than those the service was
        built with: one critical line saying what to do instead, exit
        status 1 and L{StartRefused} (twistd's, and its starting
        process's, through its status pipe), and nothing started: no token
        issued or written, no listener, no database opened.
        """
        state_dir = Path(self.mktemp())
        state_dir.mkdir()
        ids = iter([(0, 0), (65534, 65534)])
        stops: list[None] = []
        gateway_reactor = StopRecordingReactor(reactor, stops)
        endpoint = RecordingEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
        stdout = io.StringIO()
        service = GatewayService(
            Settings(jwt_secret=b"s" * 32, state_dir=state_dir, token_file=state_dir / "token"),
            gateway_reactor,
            endpoint,
            stdout=stdout,
            ids=lambda: next(ids),
        )
        self.addCleanup(service.consumer_store.close, 5.0)
        events = capture_log_events(self)
        with self.assertRaises(StartRefused) as refused:
            service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(
            refused.exception.code, "openclaw: twistd's --uid/--gid are not supported; the log says what to do"
        )
        critical = [e for e in events if e.get("log_level") == LogLevel.critical]
        self.assertEqual(
            [formatEvent(e) for e in critical],
            [
                "the gateway was set up as uid 0 gid 0 but runs as uid 65534 gid 65534: twistd's --uid/--gid "
                "are not supported: the gateway's files would be made by one user and used by another; start "
                "twistd as the gateway's user instead (systemd: User=, as contrib/openclaw.service does), and "
                "for a port below 1024 grant that user CAP_NET_BIND_SERVICE (systemd: "
                "AmbientCapabilities=CAP_NET_BIND_SERVICE)"
            ],
        )
        self.assertEqual(service.exit_status, 1)
        self.assertEqual(stops, [])
        self.assertIsNone(service.sessions.current_or_none)
        self.assertEqual(stdout.getvalue(), "")
        self.assertFalse((state_dir / "token").exists())
        self.assertIsNone(endpoint.port)
        self.assertFalse(hasattr(service, "consumers_ready"))
        self.assertFalse(service.running)

    def test_same_ids_start(self):
        """
        The same ids at both times: the gateway starts as usual.
        """
        state_dir = Path(self.mktemp())
        state_dir.mkdir()
        endpoint = RecordingEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
        service = GatewayService(
            Settings(jwt_secret=b"s" * 32, state_dir=state_dir),
            reactor,
            endpoint,
            stdout=io.StringIO(),
            ids=lambda: (1000, 1000),
        )
        service.startService()
        self.addCleanup(service.stopService)
        self.assertIsNotNone(service.sessions.current_or_none)
        self.assertIsNotNone(endpoint.port)
        self.assertEqual(service.exit_status, 0)


class StopRecordingReactor(proxyForInterface(IGatewayReactor)):  # type: ignore[misc]
    """
    The reactor, running (C{callWhenRunning} calls at once, as a running
    reactor does), but for C{stop}, which is recorded in C{stops}.
    """

    def __init__(self, original: IGatewayReactor, stops: list[None]) -> None:
        super().__init__(original)
        self.stops = stops

    def callWhenRunning(self, callable: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        callable(*args, **kwargs)

    def stop(self) -> None:
        self.stops.append(None)


class RootWarningTests(SynchronousTestCase):
    def test_root_warned(self) -> None:
        """
        Started as root, the gateway warns (on the terminal and in its
        log, as every settings warning: operator trial s41, nothing did);
        as any other user, not.
        """
        settings = Settings(warnings=("an earlier warning",))
        self.assertEqual(with_root_warning(settings, 0).warnings, ("an earlier warning", RUNS_AS_ROOT))
        self.assertIs(with_root_warning(settings, 1000), settings)
        self.assertIn("run it as a user of its own", RUNS_AS_ROOT)
