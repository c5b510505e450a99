"""
The active route survives a restart; a damaged state file never stops the
gateway.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from twisted.internet.defer import inlineCallbacks
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from openclaw.routing import MAX_MODEL_CHARS, Route
from openclaw.state import MAX_STATE_BYTES, STATE_FILE, RouteStore, read_state_file
from tests.support import capture_log_events, open_client, start_gateway

#: A model name no client could send (#17 review): an escape code, CRLF and
#: a forged header line, 5,000 characters long.
HOSTILE_MODEL = "gemini-flash-latest\x1b[2J\r\nX-Injected: 1" + "a" * 5000


class RouteStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir(parents=True)
        self.store = RouteStore(self.directory, ("kimi", "gemini"))

    def test_missing_means_defaults(self) -> None:
        self.assertIsNone(self.store.load())

    def test_round_trip(self) -> None:
        self.store.save(Route("kimi", "moonshot-v1-32k"))
        self.assertEqual(self.store.load(), Route("kimi", "moonshot-v1-32k"))
        self.assertEqual(
            json.loads((self.directory / STATE_FILE).read_text()), {"provider": "kimi", "model": "moonshot-v1-32k"}
        )
        self.assertEqual(sorted(p.name for p in self.directory.iterdir()), [STATE_FILE])

    def test_corrupt_ignored(self) -> None:
        for content in [
            b"{not json",
            b"[]",
            b'{"provider": "openai", "model": "x"}',
            b'{"provider": "kimi"}',
            b"\xff",
            b'{"provider": [], "model": "x"}',
            b"[" * 100000 + b"]" * 100000,
        ]:
            (self.directory / STATE_FILE).write_bytes(content)
            self.assertIsNone(self.store.load(), content)

    def test_unwritable_is_logged_not_raised(self) -> None:
        store = RouteStore(self.directory / "missing-dir", ("kimi",))
        warning = store.save(Route("kimi", "m"))
        self.assertIsNone(store.load())
        self.assertIn("could not be saved to", warning)
        self.assertIsNone(self.store.save(Route("kimi", "m")))


class RestartTests(TestCase):
    timeout = 20

    @inlineCallbacks
    def test_route_survives_restart(self):
        state_dir = Path(self.mktemp())
        state_dir.mkdir(parents=True)
        gateway = start_gateway(self, state_dir=state_dir)
        client = yield open_client(self, gateway.port)
        yield client.command(gateway.token, "switch_provider", {"provider": "kimi", "model": "moonshot-v1-32k"})
        yield gateway.service.stopService()
        restarted = start_gateway(self, state_dir=state_dir)
        client = yield open_client(self, restarted.port)
        status = yield client.command(restarted.token, "status")
        self.assertEqual((status["result"]["provider_id"], status["result"]["model"]), ("kimi", "moonshot-v1-32k"))
        self.assertNotIn(restarted.token, (state_dir / STATE_FILE).read_text())

    @inlineCallbacks
    def test_unsaved_switch_says_so(self):
        """
        A switch that could not be saved (the state file's place taken by
        a directory, STATE_DIR read-only) is made, and its answer's
        warning says it will not survive a restart and what to do.
        """
        state_dir = Path(self.mktemp())
        state_dir.mkdir(parents=True)
        (state_dir / STATE_FILE).mkdir()
        gateway = start_gateway(self, state_dir=state_dir)
        client = yield open_client(self, gateway.port)
        answer = yield client.command(gateway.token, "switch_provider", {"provider": "kimi", "model": "moonshot-v1-8k"})
        self.assertTrue(answer["ok"], answer)
        self.assertEqual(answer["result"]["active"], "kimi")
        self.assertIn("could not be saved", answer["result"]["warning"])
        self.assertIn("a restart will go back to the route saved before", answer["result"]["warning"])
        self.flushLoggedErrors()
        # Once it can be saved, no warning.
        (state_dir / STATE_FILE).rmdir()
        answer = yield client.command(gateway.token, "switch_provider", {"provider": "kimi", "model": "moonshot-v1-8k"})
        self.assertNotIn("could not be saved", answer["result"].get("warning", ""))

    @inlineCallbacks
    def test_refused_model_not_restored(self):
        """
        A state file naming a model the API and switch_provider refuse
        (control characters, over MAX_MODEL_CHARS) is not the active route
        after a restart: the defaults are.
        """
        state_dir = Path(self.mktemp())
        state_dir.mkdir(parents=True)
        (state_dir / STATE_FILE).write_text(json.dumps({"provider": "kimi", "model": HOSTILE_MODEL}))
        gateway = start_gateway(self, state_dir=state_dir)
        client = yield open_client(self, gateway.port)
        status = yield client.command(gateway.token, "status")
        self.assertEqual(
            (status["result"]["provider_id"], status["result"]["model"]), ("gemini", "gemini-flash-latest")
        )

    @inlineCallbacks
    def test_corrupt_state_survived(self):
        state_dir = Path(self.mktemp())
        state_dir.mkdir(parents=True)
        (state_dir / STATE_FILE).write_text("garbage")
        gateway = start_gateway(self, state_dir=state_dir)
        client = yield open_client(self, gateway.port)
        status = yield client.command(gateway.token, "status")
        self.assertEqual(status["result"]["provider_id"], "gemini")


class UntrustedFileTests(SynchronousTestCase):
    """
    A state file that is not a small regular file is ignored with a
    warning, at once (#17 item 11).
    """

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir(parents=True)
        self.store = RouteStore(self.directory, ("kimi", "gemini"))
        self.path = self.directory / STATE_FILE
        self.events = capture_log_events(self)

    def assertIgnored(self, expected: str) -> None:
        started = time.monotonic()
        self.assertIsNone(self.store.load())
        self.assertLess(time.monotonic() - started, 2)
        warnings = [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn(expected, warnings[0])
        self.assertIn(str(self.path), warnings[0])

    def test_fifo(self) -> None:
        os.mkfifo(self.path)
        self.assertIgnored("not a regular file")

    def test_symlink_to_dev_zero(self) -> None:
        self.path.symlink_to("/dev/zero")
        self.assertIgnored("symbolic link")

    def test_symlink_to_a_good_file(self) -> None:
        (self.directory / "elsewhere.json").write_text(json.dumps({"provider": "kimi", "model": "m"}))
        self.path.symlink_to(self.directory / "elsewhere.json")
        self.assertIgnored("symbolic link")

    def test_directory(self) -> None:
        self.path.mkdir()
        self.assertIgnored("not a regular file")

    def test_huge_file(self) -> None:
        with self.path.open("wb") as f:
            f.truncate(300 * 1024 * 1024)  # sparse: 300 MB that take no disk
        self.assertIgnored("more than the 65536")

    def test_limit(self) -> None:
        document = json.dumps({"provider": "kimi", "model": "m"}).encode()
        self.path.write_bytes(document + b" " * (MAX_STATE_BYTES - len(document)))
        self.assertEqual(self.store.load(), Route("kimi", "m"))
        self.path.write_bytes(document + b" " * (MAX_STATE_BYTES + 1 - len(document)))
        self.assertIgnored("more than")

    def test_refused_model(self) -> None:
        """
        A model name the API and switch_provider refuse (L{model_refusal}) is
        ignored with one warning naming the reason, never the name (which
        would carry its escape codes and line breaks into the log).
        """
        for model, reason in [
            (HOSTILE_MODEL, "control or invisible characters"),
            ("x\u2028y", "control or invisible characters"),
            ("k" * (MAX_MODEL_CHARS + 1), f"model is {MAX_MODEL_CHARS + 1} characters long"),
            ("   ", "non-empty string"),
        ]:
            del self.events[:]
            self.path.write_text(json.dumps({"provider": "kimi", "model": model}))
            self.assertIgnored(reason)
            said = next(formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.warn)
            self.assertIn("switch_provider again", said)
            for part in ("\x1b", "\r", "\n", "\u2028", "aaaaaaaaaa", "kkkkkkkkkk"):
                self.assertNotIn(part, said)
        self.path.write_text(json.dumps({"provider": "kimi", "model": "m" * MAX_MODEL_CHARS}))
        self.assertEqual(self.store.load(), Route("kimi", "m" * MAX_MODEL_CHARS))

    def test_short_reads(self) -> None:
        """
        A file system whose reads return less than asked (FUSE, NFS, 9p)
        does not truncate what is read: reading goes on to the end.
        """
        document = json.dumps({"provider": "kimi", "model": "m" * 100}).encode()
        self.path.write_bytes(document)
        real = os.read
        self.patch(os, "read", lambda fd, n: real(fd, min(n, 7)))
        self.assertEqual(read_state_file(self.path), document)
        self.assertEqual(self.store.load(), Route("kimi", "m" * 100))


class StartupTests(TestCase):
    timeout = 20

    @inlineCallbacks
    def test_fifo_does_not_hang_startup(self):
        state_dir = Path(self.mktemp())
        state_dir.mkdir(parents=True)
        os.mkfifo(state_dir / STATE_FILE)
        gateway = start_gateway(self, state_dir=state_dir)
        client = yield open_client(self, gateway.port)
        status = yield client.command(gateway.token, "status")
        self.assertEqual(status["result"]["provider_id"], "gemini")
