"""
Which provider and model answer the gateway's model calls right now.
"""

from __future__ import annotations

import attrs

#: Why a model name is refused when it holds characters no model name has.
UNPRINTABLE_MODEL = (
    "model names hold no control or invisible characters (such as ESC, CR, LF, U+2028 or U+202E); "
    "send the model name as the provider lists it"
)


def printable_model(model: str) -> bool:
    """
    Whether C{model} holds only printable characters (L{str.isprintable}:
    no Unicode C* or Z* category but the ASCII space), as every provider's
    model ids do.  A name that fails this would carry terminal escapes or
    line breaks into logs and reports: both planes refuse it.
    """
    return model.isprintable()


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
