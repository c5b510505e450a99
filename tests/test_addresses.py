"""
One normalisation of client addresses for both planes
(L{openclaw.addresses}): IPv6 counted by its /64, C{::ffff:a.b.c.d} as
a.b.c.d; the control plane's unauthenticated connections and the API's
connections per address count under the same key.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SkipTest, TestCase

from openclaw.addresses import (
    AddressSlots,
    address_family,
    bind_address,
    client_key,
    counted_key,
    host_of,
    host_port,
    peer_host,
    without_port,
)
from openclaw.dataplane.head import client_address
from openclaw.listeners import Listener, check_free


class CountedKeyTests(TestCase):
    def test_one_rule_for_both_planes(self) -> None:
        """
        The control plane's unauthenticated connections and the API's
        connections per address count under L{counted_key}.
        """
        self.assertEqual(counted_key("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(counted_key("2001:db8::1"), "2001:db8::/64")
        self.assertEqual(counted_key("not-an-address"), "not-an-address")
        self.assertIsNone(counted_key(None))
        self.assertEqual(client_address(IPv6Address("TCP", "2001:db8::2", 1)), "2001:db8::/64")
        self.assertIsNone(client_address(UNIXAddress("/run/x.sock")))


class PeerHostTests(TestCase):
    """
    One reading of a Twisted address's host (L{peer_host}, L{host_of}) and
    one label of a host and port (L{host_port}) for every listener, log
    line and message.
    """

    def test_peer_host(self) -> None:
        """
        An IP address's host as it is; L{None} for a UNIX socket or no
        address; C{-} in a log line (L{host_of}).
        """
        self.assertEqual(peer_host(IPv4Address("TCP", "192.0.2.7", 1)), "192.0.2.7")
        self.assertEqual(peer_host(IPv6Address("TCP", "2001:db8::1", 1)), "2001:db8::1")
        self.assertIsNone(peer_host(UNIXAddress("/run/x.sock")))
        self.assertIsNone(peer_host(None))
        self.assertEqual(host_of(IPv6Address("TCP", "2001:db8::1", 1)), "2001:db8::1")
        self.assertEqual(host_of(UNIXAddress("/run/x.sock")), "-")

    def test_host_port(self) -> None:
        """
        An IPv6 address (with a zone too) in brackets, anything else as it
        is (RFC 3986 section 3.2.2).
        """
        self.assertEqual(host_port("127.0.0.1", 18790), "127.0.0.1:18790")
        self.assertEqual(host_port("::", 18790), "[::]:18790")
        self.assertEqual(host_port("fe80::1%eth0", 1), "[fe80::1%eth0]:1")
        self.assertEqual(host_port("gateway.example", 443), "gateway.example:443")


class AddressSlotsTests(TestCase):
    """
    L{AddressSlots}, the count behind every per-address cap: slots taken
    and given back per address, none for a peer without one.
    """

    def test_take_and_release(self) -> None:
        """
        Each L{AddressSlots.take} is one more slot for its address, each
        L{AddressSlots.release} one fewer; an address holding none is left
        out of the mapping, so that an empty one equals C{{}}.
        """
        slots = AddressSlots()
        slots.take("192.0.2.1")
        slots.take("192.0.2.1")
        slots.take("2001:db8::/64")
        self.assertEqual((slots.held("192.0.2.1"), slots.held("2001:db8::/64"), slots.held("192.0.2.2")), (2, 1, 0))
        self.assertEqual(slots, {"192.0.2.1": 2, "2001:db8::/64": 1})
        slots.release("192.0.2.1")
        slots.release("2001:db8::/64")
        self.assertEqual((dict(slots), len(slots), "2001:db8::/64" in slots), ({"192.0.2.1": 1}, 1, False))
        slots.release("192.0.2.1")
        self.assertEqual((slots, slots.held("192.0.2.1")), ({}, 0))

    def test_no_address(self) -> None:
        """
        L{None} (a peer without an address, as on a UNIX socket) is never
        counted: it holds 0 slots however many it takes.
        """
        slots = AddressSlots()
        slots.take(None)
        slots.take(None)
        self.assertEqual((slots.held(None), slots), (0, {}))
        slots.release(None)
        self.assertEqual(slots, {})

    def test_release_unheld(self) -> None:
        """
        Giving back a slot an address does not hold changes nothing: a
        count never goes below 0, and a later take counts from 0.
        """
        slots = AddressSlots()
        slots.release("192.0.2.1")
        self.assertEqual((slots.held("192.0.2.1"), slots), (0, {}))
        slots.take("192.0.2.1")
        self.assertEqual(slots.held("192.0.2.1"), 1)


class AddressKeyTests(TestCase):
    """
    One normalisation for both listeners: IPv6 by /64, C{::ffff:a.b.c.d}
    as a.b.c.d.
    """

    def test_api_counts_ipv6_by_64(self):
        def key(host: str) -> str | None:
            return client_address(IPv6Address("TCP", host, 1))

        self.assertEqual(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"))
        self.assertEqual(key("2001:db8:1:2::1"), "2001:db8:1:2::/64")
        self.assertNotEqual(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"))
        self.assertEqual(key("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(client_address(IPv4Address("TCP", "192.0.2.7", 1)), "192.0.2.7")
        for host in ("2001:db8:1:2::1", "::ffff:192.0.2.7", "fe80::1%eth0"):
            self.assertEqual(key(host), client_key(host))
        self.assertIsNone(client_address(UNIXAddress("/run/x.sock")))


class AuthorityTests(TestCase):
    """
    One rule for a host without its port (the metrics listener's C{Host}
    check, the control plane's forwarding headers) and one for the family
    of C{--interface} (the port checks and the workers' shared sockets,
    as Twisted's TCP port decides it).
    """

    def test_without_port(self) -> None:
        for authority, host in [
            ("[2001:db8::1]:4711", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("2001:db8::1", "2001:db8::1"),
            ("192.0.2.1:80", "192.0.2.1"),
            ("192.0.2.1", "192.0.2.1"),
            ("gateway.example:443", "gateway.example"),
            ("[unclosed", "[unclosed"),
        ]:
            self.assertEqual(without_port(authority), host, authority)

    def test_address_family(self) -> None:
        self.assertEqual(address_family("::"), socket.AF_INET6)
        self.assertEqual(address_family("::ffff:127.0.0.1"), socket.AF_INET6)
        self.assertEqual(address_family("127.0.0.1"), socket.AF_INET)
        self.assertEqual(address_family("0.0.0.0"), socket.AF_INET)
        # A name is bound as IPv4, as twisted.internet.tcp.Port binds it.
        self.assertEqual(address_family("localhost"), socket.AF_INET)

    def test_bind_address_keeps_the_zone(self) -> None:
        """
        An IPv6 address with a zone binds to that interface, as Twisted's
        TCP port binds it (re-attack s19: --interface fe80::...%eth0 was
        refused, "Invalid argument", by the start-up check that Twisted
        passes): the zone is the scope id of the address bound.
        """
        self.assertEqual(bind_address("127.0.0.1", 80), ("127.0.0.1", 80))
        self.assertEqual(bind_address("::1", 80), ("::1", 80, 0, 0))
        link_local = _link_local_address()
        if link_local is None:
            raise SkipTest("no IPv6 link-local address on this host")
        address, name, index = link_local
        self.assertEqual(bind_address(f"{address}%{name}", 80)[3], index)
        check_free(Listener(f"[{address}%{name}]:0", "API_PORT", "--api-port"), f"{address}%{name}", 0)


def _link_local_address() -> tuple[str, str, int] | None:
    """
    An IPv6 link-local address of this host (from /proc/net/if_inet6:
    scope 0x20), its interface's name and index; L{None} if none.
    """
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hexaddress, index, _, scope, flags, name = line.split()
        # Not one still tentative or whose duplicate detection failed
        # (IFA_F_TENTATIVE, IFA_F_DADFAILED): it cannot be bound yet.
        if scope == "20" and not int(flags, 16) & 0x48:
            address = str(ipaddress.IPv6Address(bytes.fromhex(hexaddress)))
            return address, name, int(index, 16)
    return None
