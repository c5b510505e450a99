"""
Which provider and model answer the gateway's model calls right now.
"""

from __future__ import annotations

import re
from typing import Literal, get_args
from urllib.parse import unquote

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

#: How a consumer key starts (README, "Consumers"): defined here, where
#: model names are refused when they hold one.
KEY_PREFIX = "ock-"
#: A whole consumer key within a text: C{ock-} with no key character
#: before it (C{mock-...} is none), then its 40 key characters and no more
#: (C{tunedModels/ock-sentiment-classifier-2024-abcdefgh} is a name).
_CONSUMER_KEY = re.compile(r"(?<![A-Za-z0-9_-])ock-[A-Za-z0-9_-]{40}(?![A-Za-z0-9_-])")

#: A percent-escape (RFC 3986 section 2.1), which no provider's model id
#: holds: one in a model name hides what it holds (a key: C{kimi%2Fock-...}).
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")

#: What to do about a refused model name, closing every refusal.
_AS_LISTED = "use the model's id as the provider lists it"


def model_refusal(model: str, setting: bool = False) -> str | None:
    """
    Why C{model} is refused as a model name, in one line that says what to
    do, or None when it is taken.  The one rule for model names wherever
    they come in: the API's C{model} (chat, embeddings, C{GET
    /v1/models/{model}}), C{switch_provider}'s C{data.model}, the
    C{*_MODEL}, C{FALLBACK_MODEL_*} and C{EMBEDDING_MODEL} settings, the
    state file and the cluster's route in Redis.  Refused, in this order:

      - a name holding a character L{str.isprintable} refuses (a Unicode
        C* or Z* category but the ASCII space: ESC, CR, LF, NUL, U+0085,
        U+2028, U+202E), which no provider's model ids hold and which would
        carry terminal escapes or line breaks into logs, reports and the
        C{X-OpenClaw-Model} header;
      - an empty or blank one (only spaces);
      - one over L{MAX_MODEL_CHARS} characters;
      - one holding a space between other characters, which no provider's
        model ids hold either: most often an env file's C{# comment} read
        as part of the value;
      - one holding a percent-escape (C{%2F}), which hides what it holds;
      - one holding a consumer key (L{KEY_PREFIX}), pasted where the model
        goes: it would be logged, written in usage rows and sent upstream.

    The reason starts with C{"model "} (a caller may prefix it, as
    C{"data."}) and never quotes the name: it may be unprintable or
    megabytes long.  Callers decide whether to strip C{model} first.

    @param setting: C{model} is a setting's value, which may come from an
        env file: a space is said to be maybe a comment read as part of it.
    """
    if not model.isprintable():
        return (
            "model holds control or invisible characters (such as ESC, CR, LF, U+2028 or U+202E), "
            f"which no model name has: {_AS_LISTED}"
        )
    if not model.strip():
        return f"model must be a non-empty string: {_AS_LISTED}"
    if len(model) > MAX_MODEL_CHARS:
        return f"model is {len(model)} characters long; model names are at most {MAX_MODEL_CHARS}: {_AS_LISTED}"
    if " " in model.strip():
        comment = (
            " (in an env file, a # comment after the value is part of it: put comments on lines of their own)"
            if setting
            else ""
        )
        return f"model holds a space, which no model name has{comment}: {_AS_LISTED}"
    escaped = "%" in model and _ESCAPE.search(model) is not None
    if KEY_PREFIX in model and _CONSUMER_KEY.search(unquote(model) if escaped else model):
        return (
            f"model holds one of this gateway's API keys ({KEY_PREFIX}...), which would be logged, recorded "
            "and sent to the provider: send a key in the Authorization header only (and revoke one that was "
            f"shared: openclawctl key revoke); {_AS_LISTED}"
        )
    if escaped:
        return (
            "model holds a percent-escape (such as %2F), which no model name has: send the id unescaped "
            f"(JSON needs no escaping; a URL path does, once): {_AS_LISTED}"
        )
    return None


@attrs.frozen
class Route:
    """
    A provider and one of its models.

    Not checked here: a route is built one to three times per data-plane
    call, always from names already checked by L{model_refusal} where they
    came in (the API, C{switch_provider}, the settings, the state file, the
    cluster's store) or derived from such a name (its provider prefix or
    Gemini's C{models/} dropped).  Build one only from such a name.
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
