"""
The first layer of protection: which peer addresses may open a control
connection at all.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

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
