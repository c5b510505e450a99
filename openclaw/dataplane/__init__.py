"""
The data plane: an OpenAI-compatible HTTP API that sends every call to the
active provider.

Applications written against the OpenAI API point their base URL at
C{http://gateway:API_PORT/v1}; the operator's C{switch_provider} decides who
answers, from the very next call.  The modules, each with one job:

- L{resource<openclaw.dataplane.resource>}: the C{twisted.web} resources.
- L{request<openclaw.dataplane.request>}: checking a chat request, choosing
  its route.
- L{call<openclaw.dataplane.call>}: carrying one call upstream and back.
- L{wire<openclaw.dataplane.wire>}: each provider's chat format.
- L{gemini<openclaw.dataplane.gemini>}: the Gemini translation.
- L{sse<openclaw.dataplane.sse>}: server-sent events in and out.
- L{auth<openclaw.dataplane.auth>}, L{errors<openclaw.dataplane.errors>},
  L{context<openclaw.dataplane.context>}, L{site<openclaw.dataplane.site>}.
"""

from __future__ import annotations

from typing import Any

from openclaw.dataplane.context import APIContext
from openclaw.dataplane.resource import build_resource
from openclaw.dataplane.site import APISite
from openclaw.metrics import RequestTally
from openclaw.providers import ProviderRegistry
from openclaw.routing import ActiveRoute
from openclaw.settings import Settings


def build_site(
    route: ActiveRoute,
    providers: ProviderRegistry,
    settings: Settings,
    reactor: Any,
    tally: RequestTally,
) -> APISite:
    """
    The API's C{twisted.web} site (a L{twisted.web.server.Site}).

    @param tally: where each finished request is counted (the service's
        C{openclaw_api_requests} metrics).
    """
    context = APIContext.from_settings(route, providers, settings, reactor, tally)
    # The API takes JSON only: twisted.web's form decoding (which parses the
    # Content-Type of every POST with the email package) would be waste.
    site = APISite(build_resource(context), context, reactor=reactor, parsePOSTFormSubmission=False)
    site.max_request_bytes = settings.max_request_bytes
    return site


__all__ = ["APISite", "build_site"]
