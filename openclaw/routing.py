"""
Which provider and model answer the gateway's model calls right now.
"""

from __future__ import annotations

from typing import Literal, get_args

import attrs

#: Why a call was failed over to another provider: the C{reason} of its
#: C{X-OpenClaw-Fallback} header and of C{openclaw_api_fallbacks_total}.
#: C{http_5xx}: a 5xx (or a stream's first event an error standing for
#: one); C{timeout}: no headers, body or first event within
#: UPSTREAM_TIMEOUT; C{connect}: no connection (refused, reset, no such
#: host); C{broken}: a 2xx body or stream cut or malformed; C{rate_limited},
#: C{auth}: a 429, a refused key (or every key resting, or set aside);
#: C{account}: the provider account cannot serve (Gemini's
#: C{FAILED_PRECONDITION}); C{no_key}: none configured; C{breaker_open}:
#: the provider's circuit breaker is open.
FallbackReason = Literal[
    "http_5xx", "timeout", "connect", "broken", "rate_limited", "auth", "account", "no_key", "breaker_open"
]
#: Every L{FallbackReason}, in that order.
FALLBACK_REASONS: tuple[FallbackReason, ...] = get_args(FallbackReason)

#: Why a model name is refused when it holds characters no model name has.
UNPRINTABLE_MODEL = (
    "model names hold no control or invisible characters (such as ESC, CR, LF, U+2028 or U+202E); "
    "send the model name as the provider lists it"
)


#: The longest model name either plane takes, prefix included
#: (C{gemini/...}).  The longest real ids are far shorter: OpenAI's
#: fine-tuned models, C{ft:<base>:<organization>:<suffix of at most 64>:<id>},
#: about 120 characters; Gemini's C{models/<id>} and C{tunedModels/<id>}
#: (ids of at most 63 characters, Google's AIP-122), Moonshot's
#: C{kimi-k2-0905-preview}, under 50.  A model name goes into the
#: C{X-OpenClaw-Model} header, log lines and Gemini's URL path: one without
#: a bound made answers that clients cannot read (the openai SDK, http.client
#: refuse headers of 64 KB) and URLs the provider drops, counted against its
#: circuit breaker for everyone.
MAX_MODEL_CHARS = 256


def model_too_long(model: str) -> str | None:
    """
    Why C{model} is refused for its length (over L{MAX_MODEL_CHARS}
    characters), or None.
    """
    if len(model) <= MAX_MODEL_CHARS:
        return None
    return (
        f"model is {len(model)} characters long; model names are at most {MAX_MODEL_CHARS}: "
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
