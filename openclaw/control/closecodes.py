"""
The WebSocket close codes the gateway sends and C{openclawctl} explains
(RFC 6455 section 7.4.1).  Autobahn's public C{sendClose} takes only 1000
and 3000-4999, so these are sent as close frames of their own
(L{openclaw.control.protocol.ControlProtocol.close_with}).
"""

#: The gateway is shutting down (or restarting).
GOING_AWAY = 1001
#: A message of a kind the gateway does not take (binary).
UNSUPPORTED_DATA = 1003
#: The peer is not allowed: address not allowlisted, too many failed
#: authentications.
POLICY_VIOLATION = 1008
