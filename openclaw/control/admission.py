"""
The first layer of protection: which peer addresses may open a control
connection at all, what the forwarding headers say, and how many opening
handshakes one address may hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from openclaw.addresses import AddressSlots, IPAddress, client_key, normalise, without_port
from openclaw.settings import IPNetwork

if TYPE_CHECKING:
    # Only a type: openclaw.metrics imports this module.
    from openclaw.metrics import ControlRefusal

__all__ = [
    "ClientAddressResolver",
    "HandshakeBudget",
    "IPAddress",
    "PeerAllowlist",
    "client_key",
    "normalise",
]


class HandshakeBudget:
    """
    How many TCP connections may be in their opening handshake, per source
    address and for peers outside the allowlist, so that no address can
    take every slot and an allowlisted operator always gets in.

    Of C{whole} slots (all TCP connections the control listener keeps),
    one address (by L{client_key}) may hold a quarter in their opening
    handshake at once, and outsiders (peers neither in
    C{TRUSTED_CLIENT_IPS} nor in C{TRUSTED_PROXIES}) half, all of them
    together, for their whole life (they are only ever told 1008).  A
    connection that is turned away here is dropped without an answer.
    """

    def __init__(self, whole: int) -> None:
        self.whole = whole
        self.per_address = max(1, whole // 4)
        self.outsiders = max(1, whole // 2)
        self._by_address = AddressSlots()
        self._outsiders = 0

    def take(self, key: str | None, outsider: bool) -> ControlRefusal | None:
        """
        Take a slot for a new connection from C{key} (L{None}: no address,
        as on a UNIX socket).

        @return: L{None} when taken (give it back with L{release}); else
            the reason it was refused, for the log and metrics.
        """
        if outsider and self._outsiders >= self.outsiders:
            return "too_many_outsider_handshakes"
        if self._by_address.held(key) >= self.per_address:
            return "too_many_handshakes_from_address"
        self._by_address.take(key)
        if outsider:
            self._outsiders += 1
        return None

    def release(self, key: str | None, outsider: bool) -> None:
        """
        Give back a slot L{take} gave.
        """
        self._by_address.release(key)
        if outsider:
            self._outsiders -= 1

    def held(self, key: str) -> int:
        """
        Slots C{key} holds.
        """
        return self._by_address.held(key)


class PeerAllowlist:
    """
    C{TRUSTED_CLIENT_IPS}: addresses and networks whose peers may connect.
    """

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self._networks = tuple(networks)

    def allows(self, host: str) -> bool:
        """
        Whether a peer at C{host} may connect.  Anything that is not an IP
        address is refused.
        """
        try:
            address = normalise(host)
        except ValueError:
            return False
        return any(address in network for network in self._networks)


def _strip_port(entry: str) -> str:
    """
    An address from a forwarding header, without quotes, brackets or port:
    C{"[2001:db8::1]:4711"} -> C{2001:db8::1}, C{192.0.2.1:80} -> C{192.0.2.1}.
    """
    return without_port(entry.strip().strip('"'))


def _x_forwarded_for(value: str) -> list[str]:
    return [_strip_port(entry) for entry in value.split(",")]


def _forwarded(value: str) -> list[str]:
    """
    The C{for=} addresses of an RFC 7239 C{Forwarded} header, in order.
    An element without C{for=} counts as an unknown hop.
    """
    hops = []
    for element in value.split(","):
        address = "unknown"
        for pair in element.split(";"):
            name, _, data = pair.partition("=")
            if name.strip().lower() == "for":
                address = _strip_port(data)
        hops.append(address)
    return hops


class ClientAddressResolver:
    """
    Who is really on the other end of a connection.

    Behind a reverse proxy the TCP peer is the proxy.  The forwarding
    headers (C{X-Forwarded-For}, C{Forwarded}) are believed only when that
    peer is in C{TRUSTED_PROXIES}; then the client is the right-most address
    that is not itself a trusted proxy.  A proxy appends the address it saw
    to the header it manages, so anything a client forged sits further
    left and is never reached.  When both headers are present they must
    name the same client: a proxy that manages only one of them passes a
    forged other one through unchanged, and the disagreement exposes it.
    """

    def __init__(self, trusted_proxies: PeerAllowlist) -> None:
        self._proxies = trusted_proxies

    def is_proxy(self, peer_host: str) -> bool:
        """
        Whether the TCP peer is a trusted proxy.
        """
        return self._proxies.allows(peer_host)

    def resolve(self, peer_host: str, headers: Mapping[str, str]) -> str | None:
        """
        The client's address, or L{None} when the headers of a trusted proxy
        do not name one that can be believed (garbage, C{unknown},
        disagreement) or name none at all (a stream proxy, or a location
        without C{proxy_set_header}: believing it would admit every client
        as the proxy): such a connection is refused.

        @param headers: the request's fields, names lower-cased, a repeated
            field joined with C{", "} (Autobahn's C{ConnectionRequest.headers}).
        """
        if not self._proxies.allows(peer_host):
            return peer_host
        candidates = []
        for name, parse in (("x-forwarded-for", _x_forwarded_for), ("forwarded", _forwarded)):
            value = headers.get(name)
            if value is not None:
                candidates.append(self._rightmost_client(parse(value)))
        if not candidates:
            return None
        first = candidates[0]
        if first is None or any(other != first for other in candidates[1:]):
            return None
        return str(first)

    def _rightmost_client(self, hops: list[str]) -> IPAddress | None:
        client = None
        for hop in reversed(hops):
            try:
                client = normalise(hop)
            except ValueError:
                return None
            if not self._proxies.allows(str(client)):
                return client
        return client
