"""
The first layer of protection: which peer addresses may open a control
connection at all, what the forwarding headers say, and how many opening
handshakes one address may hold.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from openclaw.addresses import IPAddress, client_key, normalise, without_port
from openclaw.settings import IPNetwork

__all__ = [
    "ClientAddressResolver",
    "HandshakeBudget",
    "IPAddress",
    "MalformedHeaderBlock",
    "PeerAllowlist",
    "client_key",
    "normalise",
    "parse_header_block",
]


class MalformedHeaderBlock(ValueError):
    """
    An opening handshake's header block is not well-formed HTTP/1.1; the
    message says why (it is safe to send back: it quotes nothing).
    """


#: A field name is a token (RFC 9110 section 5.1).
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Control characters other than HTAB are not allowed in a request line or
#: field (RFC 9110 section 5.5, RFC 9112 section 3), and U+0085 (NEL, byte
#: 0x85 as Autobahn decodes it, ISO-8859-1) is a line break to Python's
#: str.splitlines, as are 0x0B, 0x0C and 0x1C-0x1E.
_FORBIDDEN = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f\x85]")


def parse_header_block(data: bytes) -> dict[str, str]:
    """
    The header fields of an HTTP/1.1 request head (request line, fields,
    and the empty line), split at CRLF only, as a proxy in front of the
    gateway reads them (RFC 9112 section 2.2).  Names are lower-cased;
    a field sent more than once is joined with C{", "}, in order (RFC 9110
    section 5.3).  Values are ISO-8859-1 text without surrounding
    whitespace.

    @raise MalformedHeaderBlock: a bare CR or LF, any other control
        character (0x0B, 0x0C and 0x1C-0x1E split lines for Autobahn's
        parser, which would then see a field no proxy saw), byte 0x85, a
        folded line (obsolete, RFC 9112 section 5.2), a line without a
        colon or a field name that is not a token.  Refuse the request with
        400.
    """
    head = data.removesuffix(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields: dict[str, str] = {}
    for number, line in enumerate(lines):
        if _FORBIDDEN.search(line):
            raise MalformedHeaderBlock("the request head holds a control character or a line break other than CRLF")
        if number == 0:
            continue  # the request line; Autobahn checks it
        if line[:1] in (b" ", b"\t"):
            raise MalformedHeaderBlock("folded header lines (obs-fold) are not accepted")
        name, colon, value = line.partition(b":")
        if not colon or not _FIELD_NAME.fullmatch(name):
            raise MalformedHeaderBlock("a header line is not 'name: value' with a token for its name")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("iso-8859-1")
        fields[key] = f"{fields[key]}, {text}" if key in fields else text
    return fields


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
        self._by_address: dict[str, int] = {}
        self._outsiders = 0

    def take(self, key: str | None, outsider: bool) -> str | None:
        """
        Take a slot for a new connection from C{key} (L{None}: no address,
        as on a UNIX socket).

        @return: L{None} when taken (give it back with L{release}); else
            the reason it was refused, for the log and metrics.
        """
        if outsider and self._outsiders >= self.outsiders:
            return "too_many_outsider_handshakes"
        if key is not None:
            held = self._by_address.get(key, 0)
            if held >= self.per_address:
                return "too_many_handshakes_from_address"
            self._by_address[key] = held + 1
        if outsider:
            self._outsiders += 1
        return None

    def release(self, key: str | None, outsider: bool) -> None:
        """
        Give back a slot L{take} gave.
        """
        if key is not None:
            held = self._by_address.pop(key, 0) - 1
            if held > 0:
                self._by_address[key] = held
        if outsider:
            self._outsiders -= 1

    def held(self, key: str) -> int:
        """
        Slots C{key} holds.
        """
        return self._by_address.get(key, 0)


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

        @param headers: the request's fields as L{parse_header_block}
            reads them.
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
