"""
The WebSocket close codes the gateway sends and C{openclawctl} explains
(RFC 6455 section 7.4.1).  Autobahn's public C{sendClose} takes only 1000
and 3000-4999, so these are sent as close frames of their own
(L{openclaw.control.protocol.ControlProtocol.close_with}).

The values are Autobahn's own constants; importing them installs no
reactor (C{openclawctl} imports this module).
"""

from autobahn.websocket.protocol import WebSocketProtocol

#: 1001: the gateway is shutting down (or restarting).
GOING_AWAY: int = WebSocketProtocol.CLOSE_STATUS_CODE_GOING_AWAY
#: 1003: a message of a kind the gateway does not take (binary).
UNSUPPORTED_DATA: int = WebSocketProtocol.CLOSE_STATUS_CODE_UNSUPPORTED_DATA
#: 1008: the peer is not allowed: address not allowlisted, too many failed
#: authentications.
POLICY_VIOLATION: int = WebSocketProtocol.CLOSE_STATUS_CODE_POLICY_VIOLATION
