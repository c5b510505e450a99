"""
Where the providers' HTTP connections go: one endpoint per upstream,
built once.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer


@implementer(IAgentEndpointFactory)
class CachedEndpoints:
    """
    The endpoints C{Agent} would make (a C{HostnameEndpoint}, wrapped in TLS
    with browser-like certificate checks for https), made once per scheme,
    host and port.  C{Agent}'s own factory builds a fresh endpoint (host name
    IDNA-encoded and all) for every request, even one that then reuses a
    pooled connection: a cost on every model call for nothing.  The hosts
    come from the settings, so the cache stays as small as they are.
    """

    def __init__(self, reactor: Any, tls_policy: IPolicyForHTTPS | None = None) -> None:
        self._reactor = reactor
        self._tls_policy = tls_policy or BrowserLikePolicyForHTTPS()
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port)
            if uri.scheme == b"https":
                creator = self._tls_policy.creatorForNetloc(uri.host, uri.port)
                endpoint = wrapClientTLS(creator, endpoint)
            self._endpoints[key] = endpoint
        return endpoint
