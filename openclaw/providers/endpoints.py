"""
Where the providers' HTTP connections go: one endpoint per upstream,
built once, the certificate checks for https ones, a bound on the time
connecting takes (C{UPSTREAM_CONNECT_TIMEOUT}) and on the response heads
read from them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from openclaw.providers.errors import HandshakeTimedOut, HeadTooLarge
from openclaw.reactors import IClientReactor
from openclaw.stalls import add_timeout
from openclaw.tls import HostnameChecked, trust_root_from_pem


def https_policy(ca_pem: bytes | None = None) -> IPolicyForHTTPS:
    """
    Browser-like certificate checks (chain and host name) for https
    provider URLs: against the CAs in the PEM text C{ca_pem} if given (an
    operator's private CA, or a TLS-inspecting proxy's: UPSTREAM_CA_FILE,
    as L{openclaw.settings} read and checked it), else the system's trust
    store.

    @raise ValueError: C{ca_pem} holds no PEM certificate.
    """
    if ca_pem is None:
        return BrowserLikePolicyForHTTPS()
    return BrowserLikePolicyForHTTPS(trustRoot=trust_root_from_pem(ca_pem))


@implementer(IAgentEndpointFactory)
class CachedEndpoints:
    """
    The endpoints C{Agent} would make (a C{HostnameEndpoint}, wrapped in TLS
    for https with the certificate checks of C{tls_policy}), made once per
    scheme, host and port.  C{Agent}'s own factory builds a fresh endpoint
    (host name IDNA-encoded and all) for every request, even one that then
    reuses a pooled connection.  The hosts come from the settings, so the
    cache stays as small as they are.

    @param reactor: what the endpoints connect with: TCP to an address, a
        host name's addresses tried in turn (C{HostnameEndpoint}: TCP,
        timers and a name resolver, L{IClientReactor}).
    @param tls_policy: How https connections are checked; by default
        browser-like checks against the system's trust store (see
        L{https_policy}).
    @param connect_timeout: seconds a TCP connection may take to be
        established (C{UPSTREAM_CONNECT_TIMEOUT}; for a host name, all
        its addresses' attempts together); Twisted's own default is 30.
    """

    def __init__(
        self, reactor: IClientReactor, tls_policy: IPolicyForHTTPS | None = None, connect_timeout: float = 30.0
    ) -> None:
        self._reactor = reactor
        self._tls_policy = tls_policy or BrowserLikePolicyForHTTPS()
        self._connect_timeout = connect_timeout
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._tcp(uri.host.decode("ascii"), uri.port)
            if uri.scheme == b"https":
                creator = self._tls_policy.creatorForNetloc(uri.host, uri.port)
                endpoint = wrapClientTLS(HostnameChecked(creator, uri.host.decode("ascii"), tell_names=True), endpoint)
            self._endpoints[key] = endpoint
        return endpoint

    def _tcp(self, host: str, port: int) -> IStreamClientEndpoint:
        """
        TCP to C{host}: straight to an IP address, else through
        C{HostnameEndpoint} (every address the name resolves to, IPv6 and
        IPv4 staggered, RFC 8305).  An address gets no staggering: a
        refused connection then fails at once, rather than after
        C{HostnameEndpoint}'s attempt delay, so failover is not held up.
        """
        # Twisted annotates timeout as int; it is a callLater delay, any float.
        timeout = cast(int, self._connect_timeout)
        if isIPAddress(host):
            return TCP4ClientEndpoint(self._reactor, host, port, timeout=timeout)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(self._reactor, host, port, timeout=timeout)
        return HostnameEndpoint(self._reactor, host.encode("ascii"), port, timeout=timeout)


#: The most the heads of a provider's response (status lines and header
#: fields, interim 1xx heads and the final one together) may take, in
#: bytes.  Twisted's HTTP client keeps every header line it reads, with no
#: bound (its server side has one: C{HTTPChannel.totalHeadersSize}, 16
#: KiB), so a broken or hostile upstream could send header lines, or
#: interim answers, until C{UPSTREAM_TIMEOUT}.
MAX_RESPONSE_HEAD_BYTES = 64 * 1024


def _head_end(data: bytes, start: int = 0) -> int:
    """
    Where the empty line that ends a head ends in C{data} (searched from
    C{start}), or -1: a line ends at LF, a CR before it dropped (RFC 9112
    section 2.2, as Twisted's client reads lines).
    """
    lf = data.find(b"\n\n", start)
    crlf = data.find(b"\n\r\n", start)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf + 3
    return lf + 2 if lf >= 0 else -1


def _interim(head: bytes) -> bool:
    """
    Whether a head whose first bytes (its first line whole) are C{head} is
    an interim answer (1xx), read as Twisted's client reads it: the line
    without a CR before its LF, its status code the C{int()} of the second
    of up to three space-separated parts.
    """
    if head.startswith((b"HTTP/1.1 2", b"HTTP/1.1 3", b"HTTP/1.1 4", b"HTTP/1.1 5")):
        # The usual final head: a status from 200 up (no int() of a part
        # beginning so is from 100 to 199).
        return False
    line = head.split(b"\n", 1)[0]
    if line.endswith(b"\r"):
        line = line[:-1]
    parts = line.split(b" ", 2)
    if len(parts) < 2:
        return False
    try:
        code = int(parts[1])
    except ValueError:
        return False
    return 100 <= code < 200


@implementer(IHandshakeListener)
class _HeadLimitedProtocol(ProtocolWrapper):
    """
    Between Twisted's HTTP client protocol and its transport: counts the
    bytes of the heads of each response (any interim 1xx heads and the
    final one together) and aborts the connection once they pass
    L{MAX_RESPONSE_HEAD_BYTES}, the client's protocol then told the
    connection ended with L{HeadTooLarge} (and so failing the request
    with it wrapped: C{ResponseFailed}, or C{ResponseNeverReceived}), not
    with the abort's C{ConnectionLost}, which reads as the provider's
    close.  Heads are expected from each request written on: Twisted's
    client writes a request whole, before its response is read, and one
    at a time on a connection.

    Over TLS it is told when the handshake is done (C{IHandshakeListener}):
    L{_HeadLimitedEndpoint} hands the connection over only then.
    """

    #: Fires once the TLS handshake is done (C{None}), or fails with the
    #: connection's end before; set by L{_HeadLimitedEndpoint} while it
    #: waits for the handshake.
    handshake: Deferred[None] | None = None
    #: The TLS handshake is done.
    secured = False
    #: Why the gateway itself aborted the connection, told to the client's
    #: protocol as its end (L{connectionLost}); None: it did not.
    aborted_for: HeadTooLarge | None = None

    #: Bytes of the response's heads read so far; None while none is read.
    _seen: int | None = None
    #: The head's first bytes, through its first line once that is whole.
    _first = b""
    #: The head's last two bytes so far (an empty line may span reads).
    _last = b""

    def write(self, data: bytes) -> None:
        self._expect_head()
        super().write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self._expect_head()
        super().writeSequence(data)

    def _expect_head(self) -> None:
        if self._seen is None:
            self._seen, self._first, self._last = 0, b"", b""

    # Twisted's HTTP client pauses and resumes its transport (this wrapper)
    # around every response: passed on here, where ProtocolWrapper would
    # look each up through __getattr__, after a failed lookup, at every call.

    def pauseProducing(self) -> None:
        cast(IPushProducer, self.transport).pauseProducing()

    def resumeProducing(self) -> None:
        cast(IPushProducer, self.transport).resumeProducing()

    def stopProducing(self) -> None:
        cast(IPushProducer, self.transport).stopProducing()

    def handshakeCompleted(self) -> None:
        # A check of the certificate's host name done in the handshake's
        # last step (openclaw.tls.HostnameChecked) fails the connection
        # there and disconnects it; the handshake is still said to be done
        # right after: the connection's end, coming, is its outcome.
        self.secured = True
        waiting, self.handshake = self.handshake, None
        if waiting is not None and not _tls(self).disconnecting:
            waiting.callback(None)
        elif waiting is not None:
            self.handshake = waiting

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.aborted_for is not None:
            reason = Failure(self.aborted_for)
        waiting, self.handshake = self.handshake, None
        if waiting is not None:
            waiting.errback(reason)
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        if self._seen is None or self._within_limit(data):
            super().dataReceived(data)

    def _within_limit(self, data: bytes) -> bool:
        at = 0
        while self._seen is not None and at < len(data):
            if not self._first.endswith(b"\n"):
                # Its first line is not whole yet (_first ends at its LF).
                newline = data.find(b"\n", at)
                self._first += data[at : newline + 1 if newline >= 0 else len(data)]
            # An empty line begun in the last read and ended in this one
            # comes first; else one within this read.
            end = _head_end(self._last + data[at : at + 2]) if self._last else -1
            end = at + end - len(self._last) if end >= 0 else _head_end(data, at)
            self._seen += (len(data) if end < 0 else end) - at
            if self._seen > MAX_RESPONSE_HEAD_BYTES:
                self._seen = None
                self.aborted_for = HeadTooLarge(MAX_RESPONSE_HEAD_BYTES)
                cast(ITCPTransport, self.transport).abortConnection()
                return False
            if end < 0:
                self._last = data[-2:] if len(data) - at >= 2 else (self._last + data[at:])[-2:]
                return True
            at = end
            if _interim(self._first):
                # The final head follows, within what is left of the bound.
                self._first, self._last = b"", b""
            else:
                self._seen, self._first, self._last = None, b"", b""
        return True


def _wrapped(wrapper: IProtocol) -> IProtocol:
    """
    The client's own protocol, as the endpoint would give it: the agent
    and its pool call its methods.
    """
    assert isinstance(wrapper, ProtocolWrapper)
    protocol: IProtocol = wrapper.wrappedProtocol
    return protocol


class _HeadLimitedFactory(WrappingFactory):
    protocol = _HeadLimitedProtocol
    # No "Starting factory" line for each connection to a provider.
    noisy = False


@implementer(IStreamClientEndpoint)
class _HeadLimitedEndpoint:
    """
    C{endpoint}'s connections, each response head bounded
    (L{_HeadLimitedProtocol}); with C{secure} (an https URL: C{endpoint}
    wraps TLS), a connection is handed over once its TLS handshake is
    done, certificate checks passed: a handshake that fails then fails
    the connecting, with its reason (OpenSSL's C{SSL.Error},
    L{CertificateNotForHost <openclaw.tls.CertificateNotForHost>}), as a
    refused connection does, and not the request written on it (which
    Twisted's client would fail as an answer never received,
    C{ResponseNeverReceived}).  Cancelling while the handshake is under
    way aborts the connection; so does a handshake not done within
    C{handshake_deadline}'s seconds from the TCP connection
    (L{HandshakeTimedOut}: a server or a middlebox that accepts the
    connection and never answers in TLS would otherwise hold each call
    for its whole C{UPSTREAM_TIMEOUT}, and be told as a slow answer).
    """

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        secure: bool = False,
        handshake_deadline: tuple[IReactorTime, float] | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._secure = secure
        self._handshake_deadline = handshake_deadline

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        connecting = self._endpoint.connect(_HeadLimitedFactory(protocolFactory))
        if self._secure:
            connecting.addCallback(_secured, self._handshake_deadline)
        return connecting.addCallback(_wrapped)


def _tls(wrapper: _HeadLimitedProtocol) -> TLSMemoryBIOProtocol:
    """
    The TLS connection C{wrapper} is over (wrapClientTLS's, an https
    URL's): its C{disconnecting} is set once it is failed or closed.
    """
    return cast(TLSMemoryBIOProtocol, wrapper.transport)


def _secured(wrapper: IProtocol, deadline: tuple[IReactorTime, float] | None = None) -> IProtocol | Deferred[IProtocol]:
    """
    C{wrapper} (a L{_HeadLimitedProtocol}) once its TLS handshake is done,
    or its connection's end before that (a Deferred when it is not done
    yet), or L{HandshakeTimedOut} once C{deadline} (a clock and seconds)
    passed first, the connection aborted (C{openclaw.stalls.add_timeout}:
    a deadline found due after the gateway itself stood still is judged
    after what came meanwhile is read).
    """
    assert isinstance(wrapper, _HeadLimitedProtocol)
    if wrapper.secured and not _tls(wrapper).disconnecting:
        return wrapper

    def cancel(done: Deferred[None]) -> None:
        # Failed by the cancellation (CancelledError): the abort's
        # connectionLost, a turn later, finds no handshake left to fail.
        wrapper.handshake = None
        _tls(wrapper).abortConnection()

    done: Deferred[None] = Deferred(cancel)
    wrapper.handshake = done
    if deadline is not None:
        clock, seconds = deadline
        add_timeout(done, seconds, clock, _handshake_timed_out)
    return done.addCallback(lambda _: wrapper)


def _handshake_timed_out(result: object, seconds: float) -> Failure:
    """
    The cancelled handshake's outcome once its deadline passed.
    """
    return Failure(HandshakeTimedOut(seconds))


@implementer(IAgentEndpointFactory)
class HeadLimitedEndpoints:
    """
    The endpoints of C{endpoints} (an C{IAgentEndpointFactory}), with each
    response head read through them bounded by L{MAX_RESPONSE_HEAD_BYTES},
    and an https connection's TLS handshake by C{handshake_deadline} (a
    clock and seconds, C{UPSTREAM_CONNECT_TIMEOUT}), when given.
    """

    def __init__(
        self, endpoints: IAgentEndpointFactory, handshake_deadline: tuple[IReactorTime, float] | None = None
    ) -> None:
        self._endpoints = endpoints
        self._handshake_deadline = handshake_deadline

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return _HeadLimitedEndpoint(
            self._endpoints.endpointForURI(uri), uri.scheme == b"https", self._handshake_deadline
        )
