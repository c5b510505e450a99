"""
Twisted's and Autobahn's log as C{openclawctl} shows it
(L{OneLineLog}): each error as one line on stderr, never a traceback,
and nothing for what openclawctl explains in its own line.
"""

from __future__ import annotations

from typing import TextIO

import attrs
from autobahn.twisted.websocket import WebSocketClientProtocol
from service_identity import CertificateError
from twisted.logger import ILogObserver, LogEvent, LogLevel, PredicateResult, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from openclaw.ctl.request import PROG
from openclaw.ctl.show import printable
from openclaw.logs import PeerTLSErrors

#: The log namespace of Autobahn's WebSocket client protocol (txaio's
#: logger, named after the class that makes it), under which
#: L{openclaw.ctl.client.OneCommand} logs, at error, a connection lost to
#: a TLS error (L{openclaw.logs.PEER_TLS_ERROR_PREFIX}), as the gateway's
#: L{openclaw.logs} knows it for the server protocol.
AUTOBAHN_CLIENT_NAMESPACE = f"{WebSocketClientProtocol.__module__}.{WebSocketClientProtocol.__name__}"


#: Autobahn's line for openclawctl's connection lost to a TLS error, as
#: the gateway's log knows it for its own connections.
_CLIENT_TLS_ERRORS = PeerTLSErrors((AUTOBAHN_CLIENT_NAMESPACE,))


@implementer(ILogObserver)
@attrs.frozen
class OneLineLog:
    """
    The log of Twisted and Autobahn, for the operator: each error as one
    line on C{stream} (L{printable}), an exception as its type and
    message, never a traceback.  Without it, Twisted prints an exception
    a library raised while reading the server's answer (an HTTP reason
    that is not UTF-8, in Autobahn) as C{Unhandled Error} and a
    traceback.  Less than errors (Autobahn's warning that it drops a
    connection whose handshake failed, which openclawctl explains in its
    own line) is not shown, nor Autobahn's error for a connection lost to
    a TLS error (L{AUTOBAHN_CLIENT_NAMESPACE},
    L{openclaw.logs.PEER_TLS_ERROR_PREFIX}: C{SSL error: certificate
    verify failed (in )}): openclawctl's own line names the TLS error and
    what to do (L{openclaw.ctl.diagnose.explain_failure}), nor Twisted's
    for a certificate whose names service_identity cannot check (a
    C{CertificateError}: openclawctl refuses that server and says so).
    """

    stream: TextIO

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_level") not in (LogLevel.error, LogLevel.critical):
            return
        if _CLIENT_TLS_ERRORS(event) is PredicateResult.no:
            return
        # log_failure in a twisted.logger event, failure in a legacy
        # twisted.python.log one (log.err, as a transport logs what its
        # protocol raised).
        failure = event.get("log_failure", event.get("failure"))
        if isinstance(failure, Failure) and failure.check(CertificateError):
            # Twisted's log of a certificate it could not check the host
            # name against: openclawctl refuses it and says so itself.
            return
        if isinstance(failure, Failure):
            name = failure.type.__name__ if isinstance(failure.type, type) else str(failure.type)
            text = f"unexpected error: {name}: {failure.getErrorMessage()}"
        else:
            text = f"error: {formatEvent(event)}"
        self.stream.write(f"{PROG}: {printable(text)}\n")
        self.stream.flush()
