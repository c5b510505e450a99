"""
Issue #17, "Allowlist and proxies", as plain objects: the header block as a
proxy reads it, the handshake budget, the lockout on a fake clock, and
their settings.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from openclaw.control.admission import (
    ClientAddressResolver,
    HandshakeBudget,
    PeerAllowlist,
    client_key,
)
from openclaw.control.lockout import AuthLockout
from openclaw.listeners import HANDSHAKE_HEADROOM
from openclaw.settings import ConfigError, load_settings


class ResolverTests(SynchronousTestCase):
    def test_trusted_proxy_naming_no_client(self) -> None:
        resolver = ClientAddressResolver(PeerAllowlist([ipaddress.ip_network("127.0.0.1/32")]))
        self.assertIsNone(resolver.resolve("127.0.0.1", {"host": "gw"}))
        self.assertEqual(resolver.resolve("127.0.0.1", {"x-forwarded-for": "10.0.0.5"}), "10.0.0.5")
        # A peer that is not a proxy is itself the client.
        self.assertEqual(resolver.resolve("127.0.0.2", {}), "127.0.0.2")


class ClientKeyTests(SynchronousTestCase):
    def test_keys(self) -> None:
        self.assertEqual(client_key("::ffff:192.0.2.1"), client_key("192.0.2.1"))
        self.assertEqual(client_key("2001:db8:1:2::1"), client_key("2001:db8:1:2:ffff::9"))
        self.assertEqual(client_key("2001:db8:1:2::1"), "2001:db8:1:2::/64")
        self.assertNotEqual(client_key("2001:db8:1:2::1"), client_key("2001:db8:1:3::1"))
        self.assertEqual(client_key("fe80::1%eth0"), "fe80::/64")
        with self.assertRaises(ValueError):
            client_key("unix")


class HandshakeBudgetTests(SynchronousTestCase):
    def test_shares_grow_with_max_connections(self) -> None:
        default = HandshakeBudget(4096 + HANDSHAKE_HEADROOM)
        self.assertGreaterEqual(default.per_address, 1000)
        self.assertLess(default.per_address, default.whole)
        small = HandshakeBudget(1 + HANDSHAKE_HEADROOM)
        self.assertEqual((small.per_address, small.outsiders), (64, 128))

    def test_one_address_cannot_take_every_slot(self) -> None:
        budget = HandshakeBudget(8)
        self.assertEqual([budget.take("a", False) for _ in range(2)], [None, None])
        self.assertEqual(budget.take("a", False), "too_many_handshakes_from_address")
        self.assertIsNone(budget.take("b", False))
        budget.release("a", False)
        self.assertEqual(budget.held("a"), 1)
        self.assertIsNone(budget.take("a", False))

    def test_outsiders_together_take_half(self) -> None:
        budget = HandshakeBudget(8)
        taken = [budget.take(str(n), True) for n in range(6)]
        self.assertEqual(taken, [None] * 4 + ["too_many_outsider_handshakes"] * 2)
        self.assertIsNone(budget.take("operator", False))
        budget.release("0", True)
        self.assertIsNone(budget.take("9", True))
        # No address: a UNIX socket; counted only in the whole.
        self.assertIsNone(budget.take(None, False))


class LockoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.lockout = AuthLockout(self.clock.seconds, failures=10, window=60, duration=300)

    def fail_from(self, client: str, times: int, every: float = 1.0) -> list[float | None]:
        results = []
        for _ in range(times):
            results.append(self.lockout.record_failure(client))
            self.clock.advance(every)
        return results

    def test_locks_after_failures_within_window(self) -> None:
        self.assertEqual(self.fail_from("192.0.2.1", 9), [None] * 9)
        self.assertIsNone(self.lockout.locked_until("192.0.2.1"))
        until = self.lockout.record_failure("192.0.2.1")
        self.assertEqual(until, 9 + 300)
        self.assertEqual(self.lockout.locked_until("192.0.2.1"), until)
        # Failures while locked start no new lockout (logged once).
        self.assertIsNone(self.lockout.record_failure("192.0.2.1"))
        self.assertIsNone(self.lockout.locked_until("192.0.2.2"))
        self.clock.advance(299.9)
        self.assertIsNotNone(self.lockout.locked_until("192.0.2.1"))
        self.clock.advance(0.2)
        self.assertIsNone(self.lockout.locked_until("192.0.2.1"))
        # A fresh start: ten more failures are needed.
        self.assertEqual(self.fail_from("192.0.2.1", 9), [None] * 9)

    def test_slow_failures_never_lock(self) -> None:
        self.assertEqual(self.fail_from("192.0.2.1", 100, every=6.7), [None] * 100)

    def test_one_client_however_written(self) -> None:
        self.fail_from("::ffff:192.0.2.1", 5)
        self.fail_from("192.0.2.1", 4)
        self.assertIsNotNone(self.lockout.record_failure("::ffff:192.0.2.1"))
        self.assertIsNotNone(self.lockout.locked_until("192.0.2.1"))

    def test_ipv6_by_64(self) -> None:
        for n in range(10):
            self.lockout.record_failure(f"2001:db8:0:1::{n + 1:x}")
        self.assertIsNotNone(self.lockout.locked_until("2001:db8:0:1:abcd::1"))
        self.assertIsNone(self.lockout.locked_until("2001:db8:0:2::1"))

    def test_loopback_not_exempt_unless_listed(self) -> None:
        self.fail_from("127.0.0.1", 10)
        self.assertIsNotNone(self.lockout.locked_until("127.0.0.1"))
        exempt = AuthLockout(self.clock.seconds, exempt=[ipaddress.ip_network("127.0.0.0/8")])
        self.assertEqual([exempt.record_failure("127.0.0.1") for _ in range(50)], [None] * 50)
        self.assertIsNone(exempt.locked_until("127.0.0.1"))
        self.assertEqual(len(exempt), 0)

    def test_not_an_address(self) -> None:
        self.assertIsNone(self.lockout.record_failure("unix"))
        self.assertIsNone(self.lockout.locked_until("unix"))

    def test_memory_bounded(self) -> None:
        """
        Many addresses cannot grow the tables beyond their cap; the oldest
        entries go first.
        """
        lockout = AuthLockout(self.clock.seconds, failures=2, window=60, duration=300, max_clients=3)
        for n in range(1000):
            lockout.record_failure(f"10.0.{n // 256}.{n % 256}")
        self.assertLessEqual(len(lockout), 3)
        for n in range(5):
            lockout.record_failure(f"192.0.2.{n}")
            lockout.record_failure(f"192.0.2.{n}")
        self.assertLessEqual(len(lockout), 6)
        self.assertIsNone(lockout.locked_until("192.0.2.0"))  # the oldest lockout, forgotten
        self.assertIsNotNone(lockout.locked_until("192.0.2.4"))


class LockoutSettingsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(os, "environ", {})
        self.cwd = Path(self.mktemp())
        self.cwd.mkdir(parents=True)

    def test_defaults_and_values(self) -> None:
        settings = load_settings(cwd=self.cwd)
        self.assertEqual(
            (
                settings.auth_lockout_failures,
                settings.auth_lockout_window_seconds,
                settings.auth_lockout_seconds,
                settings.auth_lockout_exempt,
            ),
            (10, 60.0, 300.0, ()),
        )
        settings = load_settings(
            {
                "AUTH_LOCKOUT_FAILURES": "3",
                "AUTH_LOCKOUT_WINDOW_SECONDS": "10",
                "AUTH_LOCKOUT_SECONDS": "1.5",
                "AUTH_LOCKOUT_EXEMPT": "127.0.0.1, ::ffff:10.0.0.1,2001:db8::/64",
            },
            cwd=self.cwd,
        )
        self.assertEqual(settings.auth_lockout_failures, 3)
        self.assertEqual(settings.auth_lockout_window_seconds, 10.0)
        self.assertEqual(settings.auth_lockout_seconds, 1.5)
        self.assertEqual(
            settings.auth_lockout_exempt,
            tuple(ipaddress.ip_network(n) for n in ("127.0.0.1/32", "10.0.0.1/32", "2001:db8::/64")),
        )

    def test_invalid(self) -> None:
        for name, value, hint in (
            ("AUTH_LOCKOUT_FAILURES", "0", "whole number"),
            ("AUTH_LOCKOUT_WINDOW_SECONDS", "-1", "seconds"),
            ("AUTH_LOCKOUT_SECONDS", "inf", "seconds"),
            ("AUTH_LOCKOUT_EXEMPT", "localhost", "CIDR"),
        ):
            with self.assertRaises(ConfigError) as caught:
                load_settings({name: value}, cwd=self.cwd)
            self.assertIn(name, str(caught.exception))
            self.assertIn(hint, str(caught.exception))
