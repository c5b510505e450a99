"""
Which provider and model answer the gateway's model calls right now.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Route:
    """
    A provider and one of its models.
    """

    provider_id: str
    model: str


@attrs.define
class ActiveRoute:
    """
    The route in force.  The control plane changes it; the data plane reads
    it on every call, so a switch takes effect on the very next request.
    """

    current: Route

    def switch(self, route: Route) -> Route:
        """
        Make C{route} the active one.

        @return: the route it replaces.
        """
        previous, self.current = self.current, route
        return previous
