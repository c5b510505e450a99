"""
The WebSocket close codes the gateway sends and C{openclawctl} explains
(RFC 6455 section 7.4.1), and the reasons of the 1008s it tells apart.
Autobahn's public C{sendClose} takes only 1000 and 3000-4999, so these
are sent as close frames of their own
(L{openclaw.control.protocol.ControlProtocol.close_with}).

The values are Autobahn's own constants; importing them installs no
reactor (C{openclawctl} imports this module).
"""

from autobahn.websocket.protocol import WebSocketProtocol

#: 1001: the gateway is shutting down (or restarting).
GOING_AWAY: int = WebSocketProtocol.CLOSE_STATUS_CODE_GOING_AWAY
#: 1003: a message of a kind the gateway does not take (binary).
UNSUPPORTED_DATA: int = WebSocketProtocol.CLOSE_STATUS_CODE_UNSUPPORTED_DATA
#: 1008: the peer is not allowed: address not allowlisted, a trusted proxy
#: that named no client, too many failed authentications.
POLICY_VIOLATION: int = WebSocketProtocol.CLOSE_STATUS_CODE_POLICY_VIOLATION

#: The reason of the 1008 closing a peer whose address (the client a trusted
#: proxy named, or the TCP peer) is not in TRUSTED_CLIENT_IPS.
UNTRUSTED_PEER_REASON = "peer address is not in TRUSTED_CLIENT_IPS"
#: The reason of the 1008 closing a peer in TRUSTED_PROXIES whose handshake
#: carried neither X-Forwarded-For nor Forwarded: it named no client, and is
#: not taken for one (README, "A trusted proxy must name the client").
PROXY_NAMED_NO_CLIENT_REASON = (
    "this address is in TRUSTED_PROXIES but named no client: the proxy must send X-Forwarded-For or Forwarded"
)
#: The reason of the 1008 closing a peer in TRUSTED_PROXIES whose
#: X-Forwarded-For or Forwarded names no client that can be believed: not
#: an IP address (garbage, C{unknown}, an obfuscated C{for=} of RFC 7239
#: section 6.3), or the two fields naming different clients.  Like every
#: reason here, at most 123 bytes (RFC 6455 section 5.5).
PROXY_CLIENT_UNREADABLE_REASON = "this address is in TRUSTED_PROXIES but its X-Forwarded-For/Forwarded names no believable client: fix the proxy's headers"
