"""
L{ClusterNode} and L{SharedLockout} as plain objects: several nodes on one
L{MemoryStore} and one L{Clock}, no socket, no Redis; L{WorkerSupervisor}'s
restarts on a clock that pretends to spawn processes.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
from collections.abc import Generator
from pathlib import Path
from typing import Any
from unittest import mock

import attrs
from twisted.application.service import Application, IServiceCollection
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, formatEvent, textFileLogObserver
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from openclaw.cluster import ClusterNode, MemoryStore, StoreUnavailable
from openclaw.cluster.lockout import SharedLockout
from openclaw.cluster.node import (
    HEARTBEAT_INTERVAL_SECONDS,
    HEARTBEAT_TTL_SECONDS,
    UNAVAILABLE,
    StoreUnconfirmed,
    TokenBehind,
)
from openclaw.cluster.records import encode_token
from openclaw.cluster.scrape import WorkerSockets
from openclaw.cluster.store import Versioned, WriteRefused
from openclaw.cluster.workers import INSTALLED_AGAIN_STATUS, SETTINGS_FD, WorkerSupervisor, settings_bytes
from openclaw.control.lockout import AuthLockout
from openclaw.routing import ActiveRoute, Route
from openclaw.session import SessionAuthority
from openclaw.settings import Settings
from tests.support import capture_log_events

SECRET = b"0123456789abcdef0123456789abcdef"


class Nodes(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = MemoryStore(self.clock.seconds)
        self.ups: dict[str, list[bool]] = {}
        self.locks: dict[str, list[tuple[str, float]]] = {}
        self.rests: dict[str, list[tuple[str, str, float]]] = {}
        self.nodes = [self.node("a"), self.node("b")]
        for node in self.nodes:
            node.connected()

    def node(self, name: str) -> ClusterNode:
        ups = self.ups.setdefault(name, [])
        locks = self.locks.setdefault(name, [])
        rests = self.rests.setdefault(name, [])
        node = ClusterNode(
            self.store,
            ActiveRoute(Route("gemini", "g-1")),
            SessionAuthority(SECRET, 3600, clock=self.clock.seconds),
            name,
            self.clock,
            1.0,
            ("gemini", "kimi"),
            on_up=ups.append,
            on_lock=lambda key, seconds: locks.append((key, seconds)),
            on_rest=lambda provider, key, seconds: rests.append((provider, key, seconds)),
        )
        self.store.listeners.append(node.received)
        self.store.lock_listeners.append(lambda key, seconds: node.locked("elsewhere", key, seconds))
        return node

    def test_one_token_and_route(self) -> None:
        a, b = self.nodes
        self.assertEqual(a.sessions.current.jti, b.sessions.current.jti)
        self.assertEqual(self.ups, {"a": [True], "b": [True]})
        self.successResultOf(a.switch(Route("kimi", "k-1")))
        self.assertEqual(b.route.current, Route("kimi", "k-1"))
        token = self.successResultOf(b.rotate(b.sessions.mint()))
        self.assertEqual(a.sessions.current.jti, token.jti)

    def test_missed_rest_and_lockout_taken_at_the_next_heartbeat(self) -> None:
        """
        A key rest and a lockout whose messages a node missed (its
        subscription gone silent without closing) are taken at its next
        heartbeat: the store's count of them moved since the last one.
        """
        a, b = self.nodes
        self.store.lock_listeners.clear()
        b.beat()
        a.rest("kimi", "abc123", 20.0)
        self.assertTrue(self.successResultOf(a.count_failure("10.0.0.9", 60, 1, 30, False)))
        self.assertEqual((self.rests["b"], self.locks["b"]), ([], []))
        b.beat()
        self.assertEqual((self.rests["b"], self.locks["b"]), ([("kimi", "abc123", 20.0)], [("10.0.0.9", 30.0)]))

    def test_heartbeat_that_raises_goes_on(self) -> None:
        """
        A beat that raises (here the store's heartbeat call, a fault of
        ours) is logged, naming the heartbeat, and the next beat comes at
        its interval (review s33: the loop stopped for good after one
        line, the instance dropped out of instances_seen and its token's
        renewals stopped).
        """
        events = capture_log_events(self)
        a, b = self.nodes
        heartbeat = self.store.heartbeat
        calls: list[str] = []

        def flaky(instance: str, *args: Any) -> Deferred[Any]:
            if instance == "a":
                calls.append(instance)
                if len(calls) == 2:
                    raise RuntimeError("a fault of ours")
            return heartbeat(instance, *args)

        self.patch(self.store, "heartbeat", flaky)
        a.start()
        self.addCleanup(a.stop)
        for _ in range(3):
            self.clock.advance(HEARTBEAT_INTERVAL_SECONDS)
        self.assertEqual(len(calls), 4)
        self.assertTrue(a._heartbeat.running)
        logged = [formatEvent(e) for e in events if "log_failure" in e]
        self.assertEqual(len(logged), 1, logged)
        self.assertIn("the cluster heartbeat (this instance counted in instances_seen", logged[0])
        self.assertIn("failed (a fault of ours); it goes on", logged[0])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        # Still counted by the others past the heartbeat's time to live.
        self.clock.advance(HEARTBEAT_TTL_SECONDS)
        b.beat()
        self.assertEqual(b.instances_seen, 2)

    def test_fault_handling_a_heartbeat_answer_logged_with_its_context(self) -> None:
        """
        A fault in the handling of the store's answer to a heartbeat (here
        the token's renewal raising) is logged naming what it was doing,
        not left to an "Unhandled error in Deferred" with no context
        (review s33); the next heartbeat handles its answer as usual.
        """
        events = capture_log_events(self)
        a, b = self.nodes
        renew = a._renew
        faults = [RuntimeError("a fault in the renewal")]
        renewals: list[None] = []

        def faulty() -> None:
            if faults:
                raise faults.pop()
            renewals.append(None)
            renew()

        self.patch(a, "_renew", faulty)
        a.beat()
        logged = [formatEvent(e) for e in events if "log_failure" in e]
        self.assertEqual(len(logged), 1, logged)
        self.assertIn("the handling of the cluster store's answer to a heartbeat", logged[0])
        self.assertIn("failed (a fault in the renewal)", logged[0])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        a.beat()
        self.assertEqual(len(renewals), 1)
        again = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.info]
        self.assertIn(
            "the handling of the cluster store's answer to a heartbeat (this instance counted, the token's renewal, "
            "a reload of what the store lost or changed): succeeded again, after 1 failed attempts",
            again,
        )

    def test_switch_answers_the_route_it_replaced(self) -> None:
        a, b = self.nodes
        self.assertEqual(self.successResultOf(a.switch(Route("kimi", "k-1"))), Route("gemini", "g-1"))

    def test_write_made_but_its_reply_lost(self) -> None:
        """
        A write the store made but whose answer never came (late past the
        timeout): the node asks the store by the write's receipt, learns it
        was made, and answers so, applied here as on every other node.
        """
        a, b = self.nodes
        self.store.lose_replies = 1
        switched = a.switch(Route("kimi", "k-1"))
        self.assertNoResult(switched)
        self.clock.advance(1.0)
        self.assertEqual(self.successResultOf(switched), Route("gemini", "g-1"))
        self.assertEqual((a.route.current, b.route.current), (Route("kimi", "k-1"),) * 2)
        self.store.lose_replies = 1
        token = a.sessions.mint()
        rotated = a.rotate(token)
        self.clock.advance(1.0)
        self.assertEqual(self.successResultOf(rotated), token)
        self.assertEqual((a.sessions.current.jti, b.sessions.current.jti), (token.jti, token.jti))

    def test_write_held_up_is_fenced(self) -> None:
        """
        A write that has not reached the store when it times out: the
        node's question fences it, so "nothing changed" stays true when
        the write arrives later.
        """
        a, b = self.nodes
        self.store.hold_writes = True
        switched = a.switch(Route("kimi", "k-1"))
        self.clock.advance(1.0)
        failure = self.failureResultOf(switched, StoreUnavailable)
        self.assertEqual(str(failure.value), UNAVAILABLE)
        self.store.release()
        self.assertEqual((a.route.current, b.route.current), (Route("gemini", "g-1"),) * 2)
        self.assertNotIn("kimi", self.store.values["route"].value)

    def test_store_down_said_with_where_and_what_to_do(self) -> None:
        """
        The store lost: a change is refused naming the store (as given:
        the service masks its password) and saying to retry once it is
        reachable; the node keeps when and why it went down (for status).
        """
        node = ClusterNode(
            self.store,
            ActiveRoute(Route("gemini", "g-1")),
            SessionAuthority(SECRET, 3600, clock=self.clock.seconds),
            "c",
            self.clock,
            1.0,
            ("gemini", "kimi"),
            where="redis://default:***@10.0.0.5:6379/0",
        )
        node.connected()
        self.assertEqual((node.up, node.down_reason), (True, None))
        self.clock.advance(5)
        node.lost("lost the connection to Redis")
        self.assertEqual(
            (node.up, node.up_since, node.down_reason), (False, 1_800_000_005, "lost the connection to Redis")
        )
        failure = self.failureResultOf(node.switch(Route("kimi", "k-1")), StoreUnavailable)
        self.assertEqual(
            str(failure.value),
            "cluster store at redis://default:***@10.0.0.5:6379/0 unavailable: nothing changed; retry once it "
            "is reachable",
        )
        # Still down, for another reason: status tells the last, as logged;
        # since when it is down does not move.
        self.clock.advance(5)
        node.lost("Redis refused the connection: WRONGPASS invalid username-password pair")
        self.assertEqual(
            (node.up, node.up_since, node.down_reason),
            (False, 1_800_000_005, "Redis refused the connection: WRONGPASS invalid username-password pair"),
        )

    def test_write_outcome_unknown(self) -> None:
        """
        The reply lost and the store gone before it could be asked: the
        answer says the change may have been applied everywhere (it was:
        every node applies what the store published), never "nothing
        changed".
        """
        a, b = self.nodes
        self.store.lose_replies = 1
        switched = a.switch(Route("kimi", "k-1"))
        self.store.up = False
        self.clock.advance(1.0)
        self.assertNoResult(switched)
        self.clock.advance(0.25)
        self.clock.advance(0.25)
        failure = self.failureResultOf(switched, StoreUnconfirmed)
        self.assertNotIn("nothing changed", str(failure.value))
        self.assertTrue(
            str(failure.value).endswith(
                "; once the store is back (status's cluster_store up), run status before retrying: until then it shows the route as it was, and the switch may still be made"
            ),
            failure.value,
        )
        self.assertNotIn("token", str(failure.value))
        self.assertEqual((a.route.current, b.route.current), (Route("kimi", "k-1"),) * 2)

    def test_rotation_outcome_unknown(self) -> None:
        """
        A rotation whose outcome is unknown: the answer says to read the
        token file, never to run status, which with a token the rotation
        revoked would count as a failed authentication (toward a lockout).
        """
        a, b = self.nodes
        self.store.lose_replies = 1
        rotated = a.rotate(a.sessions.mint())
        self.store.up = False
        for _ in range(3):
            self.clock.advance(1.0)
        message = str(self.failureResultOf(rotated, StoreUnconfirmed).value)
        self.assertNotIn("status", message)
        self.assertIn("it may have been applied on every instance; once the store is back, read the token", message)
        self.assertIn("in TOKEN_FILE (openclawctl --token-file) or the log's banner before any other command", message)
        self.assertIn("a command with a revoked token counts as a failed authentication", message)

    def test_heartbeat_catches_up(self) -> None:
        """
        A node whose subscription went silent (it missed a switch and a
        rotation) catches up at its next heartbeat.
        """
        a, b = self.nodes
        a.start()
        b.start()
        self.addCleanup(a.stop)
        self.addCleanup(b.stop)
        self.store.listeners.remove(b.received)
        self.successResultOf(a.switch(Route("kimi", "k-1")))
        token = self.successResultOf(a.rotate(a.sessions.mint()))
        self.assertEqual(b.route.current, Route("gemini", "g-1"))
        self.clock.advance(10)
        self.clock.advance(1)
        self.assertEqual(b.route.current, Route("kimi", "k-1"))
        self.assertEqual(b.sessions.current.jti, token.jti)

    def test_change_by_a_node_behind_a_rotation_refused(self) -> None:
        """
        A node that has not applied the cluster's rotation yet (stalled,
        its message late) may take a command signed with the token the
        rotation revoked: its change is refused by the store, which holds
        the new token, and nothing changes anywhere (trial s25: the stalled
        instance's switch, on the revoked token, replaced a newer one on
        every instance).
        """
        a, b = self.nodes
        self.store.listeners.remove(b.received)
        old = b.sessions.current.jti
        token = self.successResultOf(a.rotate(a.sessions.mint()))
        self.successResultOf(a.switch(Route("kimi", "k-1")))
        self.assertEqual(b.sessions.current.jti, old)
        # Nor may it make any other change (consumers': the fence first).
        self.successResultOf(a.fence())
        for change in (b.switch(Route("gemini", "g-2")), b.rotate(b.sessions.mint()), b.fence()):
            failure = self.failureResultOf(change, TokenBehind)
            self.assertIn("has not applied the rotation yet; nothing changed", str(failure.value))
        self.assertEqual(a.route.current, Route("kimi", "k-1"))
        self.assertEqual(json.loads(self.store.values["token"].value)["jti"], token.jti)
        # Caught up (its next heartbeat), it changes the route again.
        b.start()
        self.addCleanup(b.stop)
        self.clock.advance(10)
        self.clock.advance(1)
        self.assertEqual(b.sessions.current.jti, token.jti)
        self.successResultOf(b.switch(Route("gemini", "g-2")))
        self.assertEqual(a.route.current, Route("gemini", "g-2"))

    def test_store_down_refuses_changes_and_logs_transitions(self) -> None:
        a, b = self.nodes
        self.store.up = False
        a.lost()
        self.failureResultOf(a.switch(Route("kimi", "k-1")), StoreUnavailable)
        self.assertEqual(b.route.current, Route("gemini", "g-1"))
        self.assertEqual(self.ups["a"], [True, False])
        # Back: the reload fails while the store still refuses (logged
        # once, not once per retry), then succeeds on a retry.
        events = capture_log_events(self)
        a.connected()
        self.assertFalse(a.up)
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        reloads = [event for event in events if "could not reload" in event.get("log_format", "")]
        self.assertEqual(len(reloads), 1)
        self.store.up = True
        self.clock.advance(1.0)
        self.assertTrue(a.up)
        self.assertEqual(self.ups["a"], [True, False, True])

    def test_empty_store_gets_the_known_state_back(self) -> None:
        a, b = self.nodes
        self.successResultOf(a.switch(Route("kimi", "k-1")))
        jti = a.sessions.current.jti
        self.store.flush()
        a.lost()
        a.connected()
        self.assertEqual(self.store.values["token"].version, 1)
        self.assertIn(jti, self.store.values["token"].value)
        self.assertIn("kimi", self.store.values["route"].value)

    def test_lockout_counted_across_nodes(self) -> None:
        a, b = self.nodes
        imposed: list[list[str]] = [[], []]
        lockouts = [
            SharedLockout(
                AuthLockout(self.clock.seconds, failures=4, window=60, duration=300), node, on_imposed=told.append
            )
            for node, told in zip(self.nodes, imposed, strict=True)
        ]
        for lockout in lockouts:
            self.assertIsNone(lockout.record_failure("192.0.2.7"))
            self.assertIsNone(lockout.record_failure("192.0.2.7"))
        # The 4th failure in the store locked it out on the node that
        # counted it; the other was told.
        self.assertIsNotNone(lockouts[1].locked_until("192.0.2.7"))
        self.assertEqual(self.locks["a"], [("192.0.2.7", 300)])
        # Imposed by the cluster's count (not its own): its connections
        # are told to close (on_imposed, given at construction).
        self.assertEqual(imposed, [[], ["192.0.2.7"]])
        lockouts[0].impose(*self.locks["a"][0])
        self.assertIsNotNone(lockouts[0].locked_until("192.0.2.7"))
        self.assertEqual(imposed, [["192.0.2.7"], ["192.0.2.7"]])
        # Store away: each node counts alone.
        self.store.up = False
        a.lost()
        for _ in range(3):
            self.assertIsNone(lockouts[0].record_failure("192.0.2.8"))
        self.assertIsNotNone(lockouts[0].record_failure("192.0.2.8"))
        self.assertIsNone(lockouts[1].locked_until("192.0.2.8"))


class _Processes(Clock):
    """
    A clock that also spawns (pretend) processes: what
    L{WorkerSupervisor} needs of a reactor.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Any] = []
        #: Per spawn: its command line, environment, descriptors and process.
        self.spawns: list[tuple[Any, Any, Any, Any]] = []
        self.refuse = False
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def spawnProcess(self, protocol: Any, executable: str, args: Any, env: Any = None, childFDs: Any = None) -> Any:
        if self.refuse:
            raise OSError(11, "Resource temporarily unavailable")
        self.spawned.append(protocol)
        process = mock.Mock(pid=1000 + len(self.spawned))
        self.spawns.append((args, env, childFDs, process))
        protocol.makeConnection(process)
        return process


class SupervisorLogObserver(TestCase):
    def test_offered_to_application(self) -> None:
        """
        The supervisor's log observer is the one twistd logs to: set on
        the application it joins (L{openclaw.logs.offer_log_observer}).
        """
        observer = textFileLogObserver(io.StringIO())
        sockets = {"control": socket.socket()}
        self.addCleanup(sockets["control"].close)
        supervisor = WorkerSupervisor(
            _Processes(), 2, sockets, ["twistd"], Settings(), stop_timeout=5, env={}, log_observer=observer
        )
        application = Application("openclaw")
        supervisor.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), observer)
        self.assertEqual(list(IServiceCollection(application)), [supervisor])


class Supervisor(TestCase):
    def setUp(self) -> None:
        self.reactor = _Processes()
        self.sockets = {"control": socket.socket()}
        self.settings = Settings(jwt_secret=SECRET, jwt_secret_is_ephemeral=False)
        self.supervisor = WorkerSupervisor(
            self.reactor, 2, self.sockets, ["twistd"], self.settings, stop_timeout=5, env={"PATH": "/bin"}
        )
        self.supervisor.startService()

    def end(self, index: int) -> None:
        worker = self.supervisor.workers[index]
        worker.processEnded(Failure(ProcessTerminated(signal=9)))

    def test_crash_loop_backs_off(self) -> None:
        """
        A worker that dies at once, again and again, is started again
        after 0.5, 1, 2, 4 ... s (up to 30 s), not at once; the other one is
        left alone; a run of 10 s or more starts the count again.
        """
        self.assertEqual(len(self.reactor.spawned), 2)
        delays = []
        for _ in range(8):
            self.end(1)
            before = len(self.reactor.spawned)
            waited = 0.0
            while len(self.reactor.spawned) == before:
                self.reactor.advance(0.25)
                waited += 0.25
            delays.append(waited)
        self.assertEqual(delays, [0.5, 1, 2, 4, 8, 16, 30, 30])
        self.assertEqual(self.supervisor.quick_ends[1], 8)
        self.assertIn(0, self.supervisor.workers)
        self.reactor.advance(10)
        self.end(1)
        self.reactor.advance(0.5)
        self.assertEqual(len(self.reactor.spawned), 11)

    def test_settings_through_a_pipe(self) -> None:
        """
        Every worker, started and started again, is given this process's
        settings, pickled once (L{settings_bytes}): written into a pipe
        on its descriptor L{SETTINGS_FD}, which is closed then; never on
        its command line or in its environment (the secret would show in
        C{ps} and C{/proc/PID/environ}).
        """
        self.end(1)
        self.reactor.advance(0.5)
        self.assertEqual(len(self.reactor.spawns), 3)
        for args, env, child_fds, process in self.reactor.spawns:
            self.assertEqual(child_fds, {0: 0, 1: 1, 2: 2, SETTINGS_FD: "w"})
            self.assertEqual(
                process.method_calls,
                [
                    mock.call.writeToChild(SETTINGS_FD, settings_bytes(self.settings)),
                    mock.call.closeChildFD(SETTINGS_FD),
                ],
            )
            self.assertEqual(env, {"PATH": "/bin"})
            self.assertNotIn(SECRET.decode(), " ".join(args))

    def test_installed_again(self) -> None:
        """
        A worker that refused this process's settings as another
        installation's (openclaw upgraded in place, L{INSTALLED_AGAIN_STATUS})
        is not started again, for ever ending at once: the gateway stops,
        with exit status 1, for its unit manager to start it again on the
        new installation (re-attack s29: the twistd process stayed up,
        nothing listening once every worker had been started again).
        """
        worker = self.supervisor.workers[1]
        worker.processEnded(Failure(ProcessTerminated(exitCode=INSTALLED_AGAIN_STATUS)))
        self.assertTrue(self.reactor.stopped)
        # Another worker ending so in the same turn (restarted together):
        # the stop is not asked twice (ReactorNotRunning).
        self.reactor.stopped = False
        self.supervisor.workers[0].processEnded(Failure(ProcessTerminated(exitCode=INSTALLED_AGAIN_STATUS)))
        self.assertFalse(self.reactor.stopped)
        self.assertEqual(self.supervisor.exit_status, 1)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_socket_directory_not_made(self) -> None:
        """
        A worker started again while its metrics directory cannot be made
        (the temporary directory above it removed) is started all the same
        (its watch listens there once it can), where the error escaped the
        timed call and the worker was never started again (re-attack s29).
        """
        parent = Path(self.mktemp())
        parent.mkdir()
        sockets = WorkerSockets(parent / "openclaw-workers-x", 2)
        supervisor = WorkerSupervisor(
            self.reactor, 2, {}, ["twistd"], self.settings, stop_timeout=5, env={}, worker_sockets=sockets
        )
        supervisor.startService()
        self.assertEqual(len(self.reactor.spawned), 4)
        supervisor.workers[1].processEnded(Failure(ProcessTerminated(signal=9)))
        shutil.rmtree(parent)
        self.reactor.advance(0.5)
        self.assertEqual(len(self.reactor.spawned), 5)
        self.assertIn(1, supervisor.workers)
        args = self.reactor.spawns[-1][0]
        self.assertEqual(args[args.index("--metrics-sockets") + 1], str(sockets.directory))

    def test_spawn_failure_tried_again(self) -> None:
        """
        A worker that cannot be started (fork failing) is tried again
        with the same backoff, not left out for good.
        """
        self.reactor.refuse = True
        self.end(0)
        self.reactor.advance(0.5)
        self.reactor.advance(1.0)
        self.assertEqual(self.supervisor.quick_ends[0], 3)
        self.reactor.refuse = False
        self.reactor.advance(2.0)
        self.assertIn(0, self.supervisor.workers)

    def test_stop_cancels_restarts(self) -> None:
        """
        A stop while workers wait to be started again: no restart is left
        pending, and the reserved sockets are closed.
        """
        self.end(0)
        self.end(1)
        stopped = self.supervisor.stopService()
        self.successResultOf(stopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.sockets["control"].fileno(), -1)


class Healing(TestCase):
    """
    Review of #18: a node that keeps trying (reloads backing off, never
    given up; a store whose heartbeats keep failing is told to reconnect),
    and tokens checked against this instance's JWT_SECRET before adoption.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = MemoryStore(self.clock.seconds)
        self.foreign: list[str] = []

    def node(self, name: str, secret: bytes = SECRET) -> ClusterNode:
        node = ClusterNode(
            self.store,
            ActiveRoute(Route("gemini", "g-1")),
            SessionAuthority(secret, 3600, clock=self.clock.seconds),
            name,
            self.clock,
            1.0,
            ("gemini", "kimi"),
            on_foreign_token=self.foreign.append,
            retry_max=5.0,
        )
        self.store.listeners.append(node.received)
        return node

    def test_reload_retried_with_backoff(self) -> None:
        """
        A reload that keeps failing is tried again after 1, 2, 4, then
        every 5 s (retry_max), for as long as it takes.
        """
        a = self.node("a")
        self.store.up = False
        attempts: list[float] = []
        # A reload's first call: the heartbeat's read (Redis's clock).
        heartbeat = self.store.heartbeat

        def counted(*args: Any) -> Any:
            attempts.append(self.clock.seconds())
            return heartbeat(*args)

        self.store.heartbeat = counted  # type: ignore[method-assign]
        a.connected()
        for _ in range(400):
            self.clock.advance(0.25)
        gaps = [later - earlier for earlier, later in zip(attempts, attempts[1:], strict=False)]
        self.assertEqual(gaps[:5], [1, 2, 4, 5, 5])
        self.assertEqual(set(gaps[3:]), {5})
        self.assertFalse(a.up)
        self.store.up = True
        self.clock.advance(5)
        self.assertTrue(a.up)

    def test_failing_heartbeats_rebuild_the_connection(self) -> None:
        a = self.node("a")
        a.connected()
        a.start()
        self.addCleanup(a.stop)
        self.store.up = False
        self.clock.advance(10)
        self.assertEqual(self.store.reconnects, [])
        self.clock.advance(10)
        self.assertEqual(len(self.store.reconnects), 1)
        self.assertIn("no successful heartbeat in 2 intervals", self.store.reconnects[0])

    def test_refused_heartbeats_are_no_outage(self) -> None:
        """
        A store that answers and refuses every write (Redis out of memory,
        a read-only replica, its disk failing): the heartbeats it refuses
        are said once, with what to do, and neither rebuild the connection
        nor take the instance down (it did after two, and every command
        then answered "unavailable", not Redis's refusal).
        """
        events = capture_log_events(self)
        a = self.node("a")
        a.connected()
        a.start()
        self.addCleanup(a.stop)
        refusal = WriteRefused("OOM command not allowed when used memory > 'maxmemory'", "free memory")
        self.store.heartbeat = lambda *args: fail(refusal)  # type: ignore[method-assign]
        self.clock.advance(60)
        self.assertEqual(self.store.reconnects, [])
        self.assertTrue(a.up)
        said = [e for e in events if "refuses this instance's heartbeat" in e.get("log_format", "")]
        self.assertEqual(len(said), 1, said)
        self.assertEqual((said[0]["reason"], said[0]["advice"]), (refusal.reason, "free memory"))

    def test_foreign_token_refused_at_run_time(self) -> None:
        """
        A token published (or found on a reload) that this instance's
        JWT_SECRET did not sign, or whose claims are not the ones stored
        with it, is refused and logged; the last good token stays.
        """
        a = self.node("a")
        a.connected()
        good = a.sessions.current
        events = capture_log_events(self)
        forged = SessionAuthority(b"another-secret-of-at-least-32-bytes!", 3600, clock=self.clock.seconds).mint()
        self.store.write("token", encode_token(forged), "mallory", "r1", 0)
        self.assertEqual(a.sessions.current, good)
        relabelled = attrs.evolve(a.sessions.mint(), jti="someone-else")
        self.store.write("token", encode_token(relabelled), "mallory", "r2", 0)
        self.assertEqual(a.sessions.current, good)
        errors = [event["log_format"] for event in events if event["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 2, errors)
        self.assertTrue(all(line.startswith("refused the cluster's session token") for line in errors))
        # On a reload too; in step with the rest all the same.
        self.store.values["token"] = Versioned(9, encode_token(forged), "mallory")
        a.lost()
        a.connected()
        self.assertTrue(a.up)
        self.assertEqual(a.sessions.current, good)
        self.assertEqual(self.foreign, [])

    def test_foreign_token_at_start(self) -> None:
        """
        The cluster's token, at start-up, signed with another JWT_SECRET:
        the node never goes up, and says why (the service refuses to
        start).
        """
        self.node("a").connected()
        b = self.node("b", secret=b"another-secret-of-at-least-32-bytes!")
        b.connected()
        self.assertFalse(b.up)
        self.assertIsNone(b.sessions.current_or_none)
        self.assertEqual(self.foreign, ["it is signed with another JWT_SECRET"])

    def test_newcomer_of_another_secret_stops_when_the_token_is_written_back(self) -> None:
        """
        The store lost the cluster's token and an instance of another
        JWT_SECRET reached it first, proposing its own: an instance in step
        before writes the cluster's back, and the newcomer, which cannot
        trust it, stops as it would have at start-up (trial s25: it stayed,
        taking changes, while the others refused its token).
        """
        a = self.node("a")
        a.connected()
        good = a.sessions.current
        self.store.flush()
        b = self.node("b", secret=b"another-secret-of-at-least-32-bytes!")
        b.connected()
        self.assertEqual(self.foreign, [])
        a.lost()
        a.connected()
        self.assertEqual(json.loads(self.store.values["token"].value)["jti"], good.jti)
        self.assertEqual(self.foreign, ["it is signed with another JWT_SECRET"])
        self.assertEqual(a.sessions.current, good)

    def test_reconnection_delay_capped(self) -> None:
        """
        txredisapi's jitter is a normal variate around the delay: capped
        here at REDIS_RECONNECT_MAX_SECONDS.
        """
        from openclaw.cluster.redis import RedisStore, _Commands

        store = RedisStore("redis://127.0.0.1:1/0", "p", 1.0, 5.0, Clock())
        factory = _Commands(store, {"dbid": 0, "password": None, "username": None})
        factory.maxDelay = 5.0
        delays = [factory.retryDelay(attempt) for attempt in range(1, 400)]
        self.assertLessEqual(max(delays), 5.0)


class ConsumersDatabases(TestCase):
    """
    Instances of one cluster whose consumers are in different databases
    (a DATABASE_URL mistyped on one): said once by each, with its own
    database, and once more when they agree again (trial s46: a cluster
    key refused, 401, by one instance in N, and nothing said).
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = MemoryStore(self.clock.seconds)
        self.events = capture_log_events(self)

    def node(self, name: str, database: tuple[str, str] | None) -> ClusterNode:
        node = ClusterNode(
            self.store,
            ActiveRoute(Route("gemini", "g-1")),
            SessionAuthority(SECRET, 3600, clock=self.clock.seconds),
            name,
            self.clock,
            1.0,
            ("gemini", "kimi"),
        )
        node.consumers_database = database
        node.connected()
        node.start()
        return node

    def said(self, words: str) -> list[str]:
        return [formatEvent(e) for e in self.events if words in formatEvent(e)]

    def test_split_said_once_by_each(self) -> None:
        a = self.node("a", ("id-a", "postgresql://pg/prod (DATABASE_URL)"))
        self.addCleanup(a.stop)
        b = self.node("b", ("id-b", "postgresql://pg/prdo (DATABASE_URL)"))
        # Not known yet (its database not loaded): nothing to compare.
        c = self.node("c", None)
        self.addCleanup(c.stop)
        for _ in range(3):
            self.clock.advance(10)
        lines = self.said("other consumers' database(s)")
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(
            any(
                "besides this instance's, postgresql://pg/prod (DATABASE_URL) (identity id-a)" in line for line in lines
            )
        )
        self.assertTrue(any("(identity id-a) besides this instance's, postgresql://pg/prdo" in line for line in lines))
        self.assertIn("give every instance the same DATABASE_URL", lines[0])
        # B stopped: once its mark lapses, A says they agree again.
        b.stop()
        self.store.databases.pop("id-b")
        self.clock.advance(10)
        self.assertEqual(len(self.said("uses this instance's consumers' database postgresql://pg/prod")), 1)
        self.clock.advance(10)
        self.assertEqual(len(self.said("other consumers' database(s)")), 2)

    def test_one_database_nothing_said(self) -> None:
        for name in ("a", "b"):
            node = self.node(name, ("id-a", "postgresql://pg/prod"))
            self.addCleanup(node.stop)
        self.clock.advance(30)
        self.assertEqual(self.said("consumers' database"), [])
        self.assertEqual(set(self.store.databases), {"id-a"})


class Namesakes(TestCase):
    """
    Instances of the same CLUSTER_NAME in another database of the same
    Redis (a database mistyped in one REDIS_URL makes a second cluster of
    that name): looked for when a node comes up and every
    NAMESAKE_CHECK_SECONDS after, warned of once, never fatal.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = MemoryStore(self.clock.seconds)
        self.events = capture_log_events(self)

    def node(self, database: int = 0) -> ClusterNode:
        node = ClusterNode(
            self.store,
            ActiveRoute(Route("gemini", "g-1")),
            SessionAuthority(SECRET, 3600, clock=self.clock.seconds),
            "a",
            self.clock,
            1.0,
            ("gemini", "kimi"),
            where=f"redis://r:6379/{database}",
            cluster_name="edge",
            database=database,
        )
        node.connected()
        node.start()
        self.addCleanup(node.stop)
        return node

    def advance(self, seconds: int) -> None:
        """
        C{seconds} in steps of 1 s: a heartbeat every 10 (a L{LoopingCall}
        skips the beats one long step misses).
        """
        for _ in range(seconds):
            self.clock.advance(1)

    def said(self, text: str, level: LogLevel = LogLevel.warn) -> list[dict[str, Any]]:
        return [e for e in self.events if text in e.get("log_format", "") and e["log_level"] == level]

    def test_looked_for_on_joining_then_every_minute(self) -> None:
        """
        The node looks as it comes up (none found: nothing said), then at
        the first heartbeat a minute later, not at every one; a database
        found is warned of once, naming both databases, the store and what
        to do, and listed in C{other_databases} (C{status}'s) until gone.
        """
        a = self.node(database=1)
        self.assertEqual(self.store.namesake_looks, 1)
        self.assertEqual(a.other_databases, ())
        self.store.namesakes = (0, 3)
        self.advance(50)
        self.assertEqual(self.store.namesake_looks, 1)
        self.assertEqual(self.said("another cluster named"), [])
        self.advance(10)
        self.assertEqual(self.store.namesake_looks, 2)
        self.assertEqual(a.other_databases, (0, 3))
        [warning] = self.said("another cluster named")
        text = formatEvent(warning)
        self.assertTrue(
            text.startswith(
                "another cluster named edge is on databases 0 and 3 of this Redis (its instances listen on its "
                "channel), while this instance uses database 1 (redis://r:6379/1): the clusters share nothing but the "
                "name: each has its own session token and route, and switch_provider, rotate_token, lockouts and "
                "consumer changes on one do not reach the other (or instances of a version before the channel "
                "named its database are still running: they listen on database 0's, edge:events, whatever their "
                "database); "
            ),
            text,
        )
        self.assertTrue(
            text.endswith(
                "if they are meant to be one cluster, set the same database in every instance's REDIS_URL; if not, "
                "give them different CLUSTER_NAMEs, which silences this"
            ),
            text,
        )
        self.assertTrue(a.up)
        # Said once while it stays; again for a database new since.
        self.advance(120)
        self.assertEqual(len(self.said("another cluster named")), 1)
        self.store.namesakes = (0, 3, 7)
        self.advance(60)
        self.assertEqual(len(self.said("another cluster named")), 2)
        self.assertIn("on databases 0, 3 and 7 of this Redis", formatEvent(self.said("another cluster named")[-1]))
        self.store.namesakes = ()
        self.advance(60)
        self.assertEqual(a.other_databases, ())
        self.assertEqual(len(self.said("no other cluster named", LogLevel.info)), 1)

    def test_database_0_of_its_own_without_the_upgrade_note(self) -> None:
        """
        On database 0, another database's cluster is said without the note
        about earlier versions (whose channel is database 0's).
        """
        self.store.namesakes = (2,)
        a = self.node(database=0)
        self.assertEqual(a.other_databases, (2,))
        [warning] = self.said("another cluster named")
        self.assertIn("edge is on database 2 of this Redis", formatEvent(warning))
        self.assertIn("while this instance uses database 0 (redis://r:6379/0)", formatEvent(warning))
        self.assertNotIn("version before", formatEvent(warning))

    def test_looked_for_again_when_back(self) -> None:
        """
        A node back after an outage looks again at once (Redis may be
        another server now, or namesakes came meanwhile).
        """
        a = self.node()
        self.store.namesakes = (4,)
        a.lost("lost the connection to Redis")
        a.connected()
        self.assertEqual(self.store.namesake_looks, 2)
        self.assertEqual(a.other_databases, (4,))
        self.assertEqual(len(self.said("another cluster named")), 1)

    def test_refusal_said_once_at_debug_and_nothing_stops(self) -> None:
        """
        A store that will not say (an ACL without PUBSUB): said once, at
        debug level; the node stays up, its heartbeats go on and nothing
        is rebuilt.
        """
        self.store.namesakes = Exception("NOPERM User default has no permissions to run the 'pubsub|channels' command")
        a = self.node()
        self.advance(300)
        self.assertGreater(self.store.namesake_looks, 3)
        self.assertTrue(a.up)
        self.assertEqual(self.store.reconnects, [])
        self.assertEqual(a.other_databases, ())
        [said] = self.said("could not look for instances of cluster", LogLevel.debug)
        self.assertIn("(PUBSUB CHANNELS): NOPERM User default", formatEvent(said))
        self.assertEqual([e for e in self.events if e["log_level"] >= LogLevel.warn], [])

    def test_forgotten_when_no_longer_known(self) -> None:
        """
        Namesakes found, then a look that fails (a timeout, an ACL changed
        to refuse PUBSUB): C{other_databases} (C{status}'s) no longer
        names them, as nobody knows they are still there.
        """
        self.store.namesakes = (2,)
        a = self.node()
        self.assertEqual(a.other_databases, (2,))
        self.store.namesakes = Exception("NOPERM User default has no permissions to run the 'pubsub|channels' command")
        self.advance(60)
        self.assertEqual(self.store.namesake_looks, 2)
        self.assertEqual(a.other_databases, ())

    def test_not_looked_for_while_down(self) -> None:
        """
        A node that is not in step (the store down) does not look.
        """
        self.store.up = False
        ClusterNode(
            self.store,
            ActiveRoute(Route("gemini", "g-1")),
            SessionAuthority(SECRET, 3600, clock=self.clock.seconds),
            "a",
            self.clock,
            1.0,
            ("gemini", "kimi"),
        ).connected()
        self.advance(120)
        self.assertEqual(self.store.namesake_looks, 0)


def rebuild_recording_store(url: str) -> Any:
    """
    A RedisStore on C{url} (replies timed out after 0.3 s, on a L{Clock})
    that, told to rebuild its connections, records the reason (in C{told})
    and fires C{rebuilt} the first time, instead of reconnecting.
    """
    from openclaw.cluster.redis import RedisStore

    class RebuildRecordingStore(RedisStore):
        def __init__(self) -> None:
            super().__init__(url, "p", 0.3, 5.0, Clock())
            self.told: list[str] = []
            self.rebuilt: Deferred[None] = Deferred()

        def rebuild(self, reason: str, factory: Any = None) -> None:
            self.told.append(reason)
            if not self.rebuilt.called:
                self.rebuilt.callback(None)

    return RebuildRecordingStore()


class RedisTimeoutTests(TestCase):
    """
    A reply that takes longer than REDIS_TIMEOUT_SECONDS is said as a
    timeout (Redis frozen or overloaded, not gone), however the transport
    reports txredisapi's abort of the connection: over TLS the TLS layer
    shuts down and its protocol sees a plain loss, not an abort.
    """

    @inlineCallbacks
    def reasons(self, loss: BaseException) -> Generator[Deferred[object], object, list[str]]:
        """
        The reasons the store is told its connection went, when a GET goes
        unanswered past the timeout (0.3 s, on the reactor txredisapi
        times its replies with) on a transport whose abort is reported as
        C{loss}.
        """
        from twisted.internet.testing import StringTransport

        from openclaw.cluster.redis import _Commands

        store = rebuild_recording_store("rediss://127.0.0.1:1/0")
        protocol = _Commands(store, {"dbid": None, "password": None, "username": None}).buildProtocol(None)

        class Transport(StringTransport):
            def abortConnection(self) -> None:
                protocol.connectionLost(Failure(loss))

        protocol.makeConnection(Transport())
        protocol.execute_command("GET", "openclaw:route").addErrback(lambda failure: None)
        yield store.rebuilt.addTimeout(10, reactor)
        return store.told

    @inlineCallbacks
    def test_timeout_over_tls(self) -> Generator[Deferred[object], object, None]:
        from twisted.internet.error import ConnectionLost

        self.assertEqual(
            (yield self.reasons(ConnectionLost("the TLS connection was shut down"))),
            ["Redis timed out: no answer within 0.3 s (REDIS_TIMEOUT_SECONDS)"],
        )

    @inlineCallbacks
    def test_timeout_over_tcp(self) -> Generator[Deferred[object], object, None]:
        from twisted.internet.error import ConnectionAborted

        self.assertEqual(
            (yield self.reasons(ConnectionAborted())),
            ["Redis timed out: no answer within 0.3 s (REDIS_TIMEOUT_SECONDS)"],
        )

    def test_loss_without_timeout(self) -> None:
        """
        A connection lost with no reply overdue is a loss.
        """
        from twisted.internet.error import ConnectionLost

        from openclaw.cluster.redis import _Commands

        store = rebuild_recording_store("redis://127.0.0.1:1/0")
        protocol = _Commands(store, {"dbid": None, "password": None, "username": None}).buildProtocol(None)
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(store.told, ["lost the connection to Redis"])
