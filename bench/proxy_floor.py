"""
The floor for the data plane: a Twisted relay that does nothing but relay.
A bare twisted.web site whose one resource POSTs each request body, as is,
to a fixed upstream URL through the same kind of agent as the gateway
(Twisted's C{Agent} on L{CachedEndpoints}, with an C{HTTPConnectionPool} of
the gateway's default size and idle timeout) and writes the upstream body
back.  No keys, no checks, no routing, no translation, no logging.

    python bench/proxy_floor.py UPSTREAM_URL KEY_HEADER PORT
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from openclaw.providers.endpoints import CachedEndpoints
from openclaw.providers.fetch import BytesProducer, read_body
from openclaw.settings import Settings


class Relay(Resource):
    isLeaf = True

    def __init__(self, agent: IAgent, url: bytes, headers: Headers) -> None:
        super().__init__()
        self._agent, self._url, self._headers = agent, url, headers

    def render_POST(self, request: Request) -> Any:
        d = self._agent.request(b"POST", self._url, self._headers, BytesProducer(request.content.read()))
        d.addCallback(read_body)
        d.addCallback(self._answer, request)
        return NOT_DONE_YET

    def _answer(self, body: bytes, request: Request) -> None:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.write(body)
        request.finish()


def main() -> None:
    url, key_header, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    name, _, value = key_header.partition(":")
    defaults = Settings()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = defaults.upstream_pool_size
    pool.cachedConnectionTimeout = defaults.upstream_idle_seconds
    agent = Agent.usingEndpointFactory(reactor, CachedEndpoints(reactor), pool=pool)
    headers = Headers({name.strip(): [value.strip()], "Content-Type": ["application/json"]})
    site = Site(Relay(agent, url.encode(), headers), parsePOSTFormSubmission=False)
    site.log = lambda request: None
    reactor.listenTCP(port, site, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
