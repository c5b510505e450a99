"""
The data plane: an OpenAI-compatible HTTP API that sends every call to the
active provider.
"""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Site

from openclaw.providers import ProviderRegistry
from openclaw.routing import ActiveRoute
from openclaw.settings import Settings


def build_site(route: ActiveRoute, providers: ProviderRegistry, settings: Settings, reactor: Any) -> Site:
    """
    The API's C{twisted.web} site.
    """
    return Site(Resource())
