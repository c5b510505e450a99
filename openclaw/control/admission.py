"""
The first layer of protection: which peer addresses may open a control
connection at all, what the forwarding headers say, and how many opening
handshakes one address may hold.

The whole policy (L{Admission}) is a plain object, without a reactor or a
socket: the control factory (L{openclaw.control.protocol.ControlFactory})
asks it, and counts, logs and answers what it decides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import attrs
from autobahn.websocket.types import ConnectionDeny

from openclaw.addresses import AddressSlots, IPAddress, client_key, normalise, without_port
from openclaw.control.closecodes import (
    PROXY_CLIENT_UNREADABLE_REASON,
    PROXY_NAMED_NO_CLIENT_REASON,
    UNTRUSTED_PEER_REASON,
)
from openclaw.dataplane.errors import retry_after_seconds
from openclaw.listeners import HANDSHAKE_HEADROOM
from openclaw.settings import Settings
from openclaw.settings.values import IPNetwork

if TYPE_CHECKING:
    # Only types: openclaw.metrics imports this module, and
    # openclaw.control.lockout imports it.
    from openclaw.control.lockout import LockoutStore
    from openclaw.metrics import ControlRefusal

__all__ = [
    "Admission",
    "ClientAddressResolver",
    "HandshakeBudget",
    "IPAddress",
    "LockedOut",
    "PeerAllowlist",
    "Refused",
    "client_key",
    "normalise",
]

#: RFC 6585 section 4.
TOO_MANY_REQUESTS = HTTPStatus.TOO_MANY_REQUESTS.value


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


class LockedOut(ConnectionDeny):
    """
    A handshake refused because its client is locked out: HTTP 429 with
    C{Retry-After} (RFC 6585 section 4, RFC 9110 section 10.2.3).
    """

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            TOO_MANY_REQUESTS,
            f"too many failed authentications from this address; retry in {retry_after} s",
        )
        self.retry_after = retry_after


@attrs.frozen
class Refused:
    """
    A connection L{Admission} refuses: what the factory counts, logs and
    answers.
    """

    #: The C{reason} label of C{openclaw_control_refused_connections_total}
    #: and of the log line.
    reason: ControlRefusal
    #: The answer: a L{ConnectionDeny} refuses the handshake with its HTTP
    #: status; a text accepts the handshake only to close the connection at
    #: once with 1008 and this reason.
    answer: ConnectionDeny | str
    #: Whether the refusal is logged (a lockout's are not: its line is
    #: logged once, when it began).
    log: bool = True
    #: Further fields of the log line (C{origin}, C{client}).
    fields: Mapping[str, Any] = attrs.field(factory=dict)


class Admission:
    """
    Who may connect to the control plane, as a plain object (no reactor,
    no socket): the listener's capacity and the slots kept for operators,
    the handshake budgets per address and for outsiders, the
    unauthenticated connections per client, C{ALLOWED_ORIGINS},
    C{TRUSTED_CLIENT_IPS}, C{TRUSTED_PROXIES} and the lockout.

    @param capacity: the TCP connections the listener may hold, of every
        kind (the process's descriptors' share,
        L{openclaw.listeners.share_descriptors}); L{None}: MAX_CONNECTIONS
        plus L{HANDSHAKE_HEADROOM}, which is also the most.
    @param clock: seconds on the lockout's clock (a monotonic one,
        L{openclaw.control.lockout.AuthLockout}).
    """

    def __init__(
        self,
        settings: Settings,
        lockout: LockoutStore,
        clock: Callable[[], float],
        capacity: int | None = None,
    ) -> None:
        self.allowlist = PeerAllowlist(settings.trusted_clients)
        self.proxies = PeerAllowlist(settings.trusted_proxies)
        self.resolver = ClientAddressResolver(self.proxies)
        self.allowed_origins = frozenset(settings.allowed_origins)
        wanted = settings.max_connections + HANDSHAKE_HEADROOM
        #: TCP connections held at most, of every kind: at most
        #: MAX_CONNECTIONS plus L{HANDSHAKE_HEADROOM}.
        self.capacity = wanted if capacity is None else max(1, min(wanted, capacity))
        #: Accepted connections at most.
        self.max_connections = min(settings.max_connections, self.capacity)
        #: The last slots of the capacity, kept for an allowlisted address
        #: that holds no handshake or unauthenticated connection yet.
        self.reserved = min(max(2, self.capacity // 16), self.capacity // 2)
        self.lockout = lockout
        self.clock = clock
        #: TCP connections in their opening handshake, or open but not
        #: authenticated, per address of the TCP peer.
        self.budget = HandshakeBudget(self.capacity)
        #: Accepted connections not authenticated yet, per client (as
        #: resolved behind a proxy): a quarter of MAX_CONNECTIONS each.
        self.unauthenticated = HandshakeBudget(self.max_connections)

    def handshake_slot(self, host: str | None) -> tuple[str | None, bool]:
        """
        The budget a new TCP connection from C{host} counts against: its
        address key (L{None} without an IP) and whether it is an outsider
        (neither allowlisted nor a trusted proxy).
        """
        if host is None:
            return None, False
        try:
            key = client_key(host)
        except ValueError:
            return None, True
        return key, not (self.allowlist.allows(host) or self.proxies.allows(host))

    def tcp_refusal(self, key: str | None, outsider: bool, held: int) -> ControlRefusal | None:
        """
        Whether a new TCP connection (L{handshake_slot}) must be dropped
        at once, before its handshake, when the listener holds C{held} TCP
        connections: it is at its capacity, or in its reserve and this peer
        is an outsider or an address that already holds a slot in
        L{budget}.

        @return: the reason, for the log and metrics; or L{None}.
        """
        if held >= self.capacity:
            return "too_many_handshakes"
        if held >= self.capacity - self.reserved and (outsider or (key is not None and self.budget.held(key))):
            return "reserved_for_operators"
        return None

    def client(self, host: str | None, headers: Mapping[str, str], local: bool = False) -> str | None:
        """
        The client of a connection from C{host} (L{None}: no IP, or a UNIX
        socket, C{local}): the TCP peer, or the client a trusted proxy
        named (L{ClientAddressResolver}); L{None} when none can be believed.
        """
        return None if local or host is None else self.resolver.resolve(host, headers)

    def refusal(
        self,
        host: str | None,
        headers: Mapping[str, str],
        accepted: int,
        local: bool = False,
        client: str | None = None,
    ) -> Refused | None:
        """
        Whether a connection asking to open must be refused, when
        C{accepted} control connections are open.

        A peer on a UNIX socket (C{local}) has no address to check: the
        socket file's permissions (C{unix:PATH:mode=600}) decide who can
        connect, so C{TRUSTED_CLIENT_IPS} does not apply to it (forwarding
        headers are ignored there too).  The token is required all the same.

        @param host: the TCP peer's IP address (L{None} without one).
        @param headers: the request's fields, names lower-cased
            (L{openclaw.control.protocol.ControlProtocol.admit}).
        @param client: the client's address as L{client} resolved it
            (L{None}: none to believe).
        @return: L{None} to accept it, or the refusal.
        """
        if accepted >= self.max_connections:
            return Refused(
                "too_many_connections",
                ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "too many control connections; try again later"),
            )
        origin = headers.get("origin")
        if origin is not None and origin.lower().rstrip("/") not in self.allowed_origins:
            return Refused(
                "origin_not_allowed",
                ConnectionDeny(
                    ConnectionDeny.FORBIDDEN,
                    "cross-origin WebSocket refused: this Origin is not in ALLOWED_ORIGINS",
                ),
                fields={"origin": origin},
            )
        if local:
            return None
        if client is None and host is not None and self.resolver.is_proxy(host):
            if "x-forwarded-for" in headers or "forwarded" in headers:
                return Refused("proxy_client_unreadable", PROXY_CLIENT_UNREADABLE_REASON)
            return Refused("proxy_named_no_client", PROXY_NAMED_NO_CLIENT_REASON)
        if client is None or not self.allowlist.allows(client):
            return Refused("untrusted_peer", UNTRUSTED_PEER_REASON, fields={"client": client})
        until = self.lockout.locked_until(client)
        if until is not None:
            # Logged once, when the lockout began; counted every time.
            return Refused("locked_out", LockedOut(retry_after_seconds(until - self.clock())), log=False)
        return None

    def take_unauthenticated(self, key: str | None) -> Refused | None:
        """
        Count an accepted connection of client C{key} (L{counted_key
        <openclaw.addresses.counted_key>}; L{None}: not counted) among the
        ones not authenticated yet (give it back with
        L{release_unauthenticated}), unless that client holds its share
        already.
        """
        if self.unauthenticated.take(key, False) is None:
            return None
        return Refused(
            "too_many_unauthenticated",
            ConnectionDeny(
                ConnectionDeny.SERVICE_UNAVAILABLE,
                "too many connections from this address have not authenticated; authenticate or close them first",
            ),
        )

    def release_unauthenticated(self, key: str | None) -> None:
        """
        Give back what L{take_unauthenticated} took.
        """
        self.unauthenticated.release(key, False)

    def logged_peer(self, host: str | None, peer: str, client: str | None) -> tuple[str, str | None]:
        """
        Who a connection's log line names: the client a trusted proxy named
        (its address, as L{ClientAddressResolver} resolved it, without a
        port), and the proxy (C{peer}, the TCP peer's C{address:port});
        else the TCP peer, and L{None}.

        @param host: the TCP peer's IP address (L{None} without one).
        @param client: the resolved client (L{None}: none to believe).
        """
        if client is not None and host is not None and self.resolver.is_proxy(host):
            return client, peer
        return peer, None

    def locked_out(self, client: str) -> bool:
        """
        Whether C{client} (an address) is locked out now.
        """
        return self.lockout.locked_until(client) is not None
