"""
Client addresses as the gateway counts them, one rule for every listener:
the control plane's handshake budget and lockout, and the API's
connection caps.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator, Mapping
from typing import Any

from twisted.internet.abstract import isIPv6Address

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def peer_host(address: object) -> str | None:
    """
    The host of a Twisted address (a transport's C{getPeer()} or
    C{getHost()}, a request's C{getClientAddress()}): an L{IPv4Address} or
    L{IPv6Address}'s C{host}, an IP address as text (C{"192.0.2.7"},
    C{"2001:db8::1"}); L{None} for an address without one (a
    L{UNIXAddress}, or no address).
    """
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else None


def host_of(address: object) -> str:
    """
    The host of a peer's address, for a log line: L{peer_host}; C{-} for
    one without a host (a UNIX socket).
    """
    return peer_host(address) or "-"


def host_port(host: str, port: int) -> str:
    """
    A host and port as messages, logs and URLs show them (RFC 3986
    section 3.2.2): C{"[::]:18790"}, C{"[2001:db8::1]:51234"} for an IPv6
    address (L{isIPv6Address}, a zone C{%eth0} too), C{"127.0.0.1:18790"},
    C{"gateway.example:443"} otherwise.
    """
    return f"[{host}]:{port}" if isIPv6Address(host) else f"{host}:{port}"


def without_port(authority: str) -> str:
    """
    The host of an authority or a forwarding header's entry, without
    brackets or port: C{"[2001:db8::1]:4711"} -> C{"2001:db8::1"},
    C{"192.0.2.1:80"} -> C{"192.0.2.1"}, C{"gateway.example:443"} ->
    C{"gateway.example"}; an IPv6 address without brackets (more than one
    colon, as C{X-Forwarded-For} may carry one) is kept whole.
    """
    if authority.startswith("["):
        return authority[1 : authority.find("]")] if "]" in authority else authority
    if authority.count(":") == 1:
        return authority.partition(":")[0]
    return authority


def address_family(interface: str) -> socket.AddressFamily:
    """
    The socket family Twisted's TCP port takes for C{interface}
    (C{--interface}): C{AF_INET6} for an IPv6 address, else C{AF_INET}
    (L{twisted.internet.abstract.isIPv6Address}, as
    L{twisted.internet.tcp.Port} decides).
    """
    return socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET


def bind_address(interface: str, port: int) -> tuple[Any, ...]:
    """
    The address to C{bind()} a socket of L{address_family}'s family to,
    as Twisted's TCP port binds it: an IPv6 address with its zone
    (C{fe80::1%eth0}) as the 4-tuple whose scope id names the interface
    (RFC 3493 section 3.3, C{getaddrinfo} with C{AI_NUMERICHOST}), else
    C{(interface, port)}.

    @raise OSError: an IPv6 address with a zone no interface has.
    """
    if address_family(interface) == socket.AF_INET6:
        return tuple(
            socket.getaddrinfo(interface, port, socket.AF_INET6, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)[0][4]
        )
    return (interface, port)


def normalise(host: str) -> IPAddress:
    """
    Parse a peer's address.  An IPv4-mapped IPv6 address
    (C{::ffff:1.2.3.4}, how a dual-stack listener reports IPv4 clients) is
    the IPv4 address it carries (RFC 4291 section 2.5.5.2); Python 3.11's
    L{ipaddress} does not make that equivalence by itself.  A zone
    (C{fe80::1%eth0}) is dropped.

    @raise ValueError: C{host} is not an IP address.
    """
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            address = ipaddress.IPv6Address(host.split("%", 1)[0])
        mapped = address.ipv4_mapped
        if mapped is not None:
            return mapped
    return address


def client_key(address: IPAddress | str) -> str:
    """
    The name a client is counted under (handshake budget, lockout, API
    connection caps): its IPv4 address, or the /64 network of its IPv6
    address (a host's usual allocation, RFC 6177: one host can pick any
    address in it).

    @raise ValueError: C{address} is not an IP address.
    """
    if isinstance(address, str):
        address = normalise(address)
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def counted_key(host: str | None) -> str | None:
    """
    What a connection from C{host} counts against (the control plane's
    unauthenticated connections, the API's connections per address):
    L{client_key} of an IP address; C{host} itself when it is not one;
    L{None} (not counted) for no host, as on a UNIX socket.
    """
    if host is None:
        return None
    try:
        return client_key(host)
    except ValueError:
        return host


class AddressSlots(Mapping[str, int]):
    """
    How many slots (connections, opening handshakes, HTTP/2 streams) each
    client address holds now, by the names L{counted_key} gives: the one
    count behind every per-address cap of the gateway (the control plane's
    handshake budget, the API's and the metrics listener's connections).

    A plain count, without a limit: the caller compares L{held} with its
    own cap (and may add several counts up against one) before it
    L{take}s.  L{None} stands for a peer without an address (a UNIX
    socket), which is never counted.

    As a mapping, read-only: address -> slots held (1 or more), the
    addresses holding none left out, so that an empty one is equal to
    C{{}}.
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    def take(self, key: str | None) -> None:
        """
        Count one more slot for C{key} (nothing for L{None}).
        """
        if key is not None:
            held = self._held
            held[key] = held.get(key, 0) + 1

    def release(self, key: str | None) -> None:
        """
        Give back one of C{key}'s slots (nothing for L{None}, or for an
        address holding none: a count never goes below 0).
        """
        if key is not None:
            left = self._held.pop(key, 0) - 1
            if left > 0:
                self._held[key] = left

    def held(self, key: str | None) -> int:
        """
        Slots C{key} holds: 0 for L{None} and for an address holding none.
        """
        return self._held.get(key, 0) if key is not None else 0

    def __getitem__(self, key: str) -> int:
        return self._held[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._held)

    def __len__(self) -> int:
        return len(self._held)

    def __repr__(self) -> str:
        return f"AddressSlots({self._held!r})"


__all__ = [
    "AddressSlots",
    "IPAddress",
    "address_family",
    "bind_address",
    "client_key",
    "counted_key",
    "host_of",
    "host_port",
    "normalise",
    "peer_host",
    "without_port",
]
