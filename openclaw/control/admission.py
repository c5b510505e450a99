"""
The first layer of protection: which peer addresses may open a control
connection at all.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from openclaw.settings import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def normalise(host: str) -> IPAddress:
    """
    Parse a peer's address.  An IPv4-mapped IPv6 address
    (C{::ffff:1.2.3.4}, how a dual-stack listener reports IPv4 clients) is
    the IPv4 address it carries; Python 3.11's L{ipaddress} does not make
    that equivalence by itself.

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
    entry = entry.strip().strip('"')
    if entry.startswith("["):
        return entry[1 : entry.find("]")] if "]" in entry else entry
    if entry.count(":") == 1:
        return entry.split(":", 1)[0]
    return entry


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

    def resolve(self, peer_host: str, headers: Mapping[str, str]) -> str | None:
        """
        The client's address, or L{None} when the headers of a trusted proxy
        do not name one that can be believed (garbage, C{unknown},
        disagreement): such a connection is refused.
        """
        if not self._proxies.allows(peer_host):
            return peer_host
        candidates = []
        for name, parse in (("x-forwarded-for", _x_forwarded_for), ("forwarded", _forwarded)):
            value = headers.get(name)
            if value is not None:
                candidates.append(self._rightmost_client(parse(value)))
        if not candidates:
            return peer_host
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
