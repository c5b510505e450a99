"""
Where the providers' HTTP connections go: one endpoint per upstream,
built once, and the certificate checks for https ones.
"""

from __future__ import annotations

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTCP, IStreamClientEndpoint
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from openclaw.tls import trust_root_from_pem


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

    @param tls_policy: How https connections are checked; by default
        browser-like checks against the system's trust store (see
        L{https_policy}).
    """

    def __init__(self, reactor: IReactorTCP, tls_policy: IPolicyForHTTPS | None = None) -> None:
        self._reactor = reactor
        self._tls_policy = tls_policy or BrowserLikePolicyForHTTPS()
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._tcp(uri.host.decode("ascii"), uri.port)
            if uri.scheme == b"https":
                creator = self._tls_policy.creatorForNetloc(uri.host, uri.port)
                endpoint = wrapClientTLS(creator, endpoint)
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
        if isIPAddress(host):
            return TCP4ClientEndpoint(self._reactor, host, port)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(self._reactor, host, port)
        return HostnameEndpoint(self._reactor, host.encode("ascii"), port)
