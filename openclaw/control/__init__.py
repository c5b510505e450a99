"""
The control plane: an authenticated WebSocket API for operators.

- L{protocol<openclaw.control.protocol>}: the Autobahn protocol and factory
  (thin: connection limits, admission, close codes).
- L{admission<openclaw.control.admission>}: which peers may connect
  (C{TRUSTED_CLIENT_IPS}, C{TRUSTED_PROXIES}).
- L{plane<openclaw.control.plane>}: one message's path: parse,
  authenticate, dispatch, answer, audit.
- L{commands<openclaw.control.commands>}: the commands themselves.
- L{closecodes<openclaw.control.closecodes>}: the close codes sent.
"""
