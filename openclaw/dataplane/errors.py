"""
Errors the API answers with, always in OpenAI's shape::

    {"error": {"message": "...", "type": "...", "param": null, "code": "..."}}

so that any OpenAI client library raises its usual exception with the
message intact.  Each message says what went wrong and, when the caller or
the operator can do something about it, what.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import attrs
import orjson
from twisted.internet.error import ConnectError
from twisted.python.failure import Failure

from openclaw.settings.values import MAX_DURATION_SECONDS
from openclaw.web import status_line

if TYPE_CHECKING:
    # Not at run time: the providers import this package.
    from openclaw.providers.errors import Explained, Refusal

#: OpenAI's code for a prompt longer than the model's context window (a
#: 400 with C{param} C{messages}): the one error an agent can mend by
#: itself, by trimming or summarising its history, and agent frameworks
#: look for this code to do so.  A provider's own words for it are read
#: by its adapter (L{openclaw.providers.errors.Refusal.code}).
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
#: The header that names the provider that answered (or was to answer).
PROVIDER_HEADER = b"X-OpenClaw-Provider"
#: The header that carries an upstream's own status on a 502.
UPSTREAM_STATUS_HEADER = b"X-OpenClaw-Upstream-Status"
#: The header that says a call was failed over: C{kimi->gemini; reason=http_5xx}.
FALLBACK_HEADER = b"X-OpenClaw-Fallback"
#: The header that tells the official OpenAI SDKs whether to retry, read
#: before anything else (openai-python C{BaseClient._should_retry},
#: openai-node C{shouldRetry}); otherwise they retry 408, 409, 429 and 5xx.
SHOULD_RETRY_HEADER = b"x-should-retry"

#: Codes no retry within one call can mend: the operator must act first
#: (the gateway's own keys refused, the provider account unable to serve).
NOT_RETRYABLE_CODES = frozenset({"upstream_auth_failed", "upstream_account_error", "provider_key_not_set"})

#: The longest C{Retry-After}, in seconds, a client is left to sleep inside
#: one call: openai-python 1.x and 2.x follow a C{Retry-After} only up to
#: 60 s (C{BaseClient._calculate_retry_timeout}), else retry within
#: seconds; openai-python 3.x up to 120 s (C{MAX_RETRY_AFTER_DELAY});
#: openai-node (6.x C{retryRequest}) sleeps whatever it is told.
MAX_SLEPT_RETRY_AFTER_SECONDS = 60


@attrs.frozen(auto_exc=True)
class APIError(Exception):
    """
    An answer other than success; raise it anywhere under a resource.

    @ivar headers: extra response headers (C{Allow}, C{WWW-Authenticate}),
        its C{Retry-After} among them when C{retry_after} is set.
    @ivar retry_after: the seconds the client is told to wait before it
        retries (a whole number, L{retry_after_seconds}), or None: the one
        source of its C{Retry-After} header, which construction (and
        C{attrs.evolve}) puts in C{headers} (replacing any other there),
        last but for an C{x-should-retry}.  A C{Retry-After} given in C{headers} alone (by a provider
        plugin) is read into it when it is delay-seconds (RFC 9110 section
        10.2.3), else left as it is, and this None.
    @ivar detail: the message as the operator reads it in the request's
        log line (L{APIContext.completed
        <openclaw.dataplane.context.APIContext.completed>}), never in the
        answer, when it differs from C{message}: it names the provider's
        address (C{host:port}, often an internal proxy's) and the setting
        to check, which no client holding a key is to learn
        (L{openclaw.providers.errors.Explained}); None when the message
        says all.
    """

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    retry_after: int | None = None
    detail: str | None = None

    def __attrs_post_init__(self) -> None:
        """
        Write C{retry_after} as the C{Retry-After} header, and add
        C{x-should-retry: false} (L{SHOULD_RETRY_HEADER}) to an answer no
        retry within the call can help: a code of L{NOT_RETRYABLE_CODES},
        or a C{retry_after} over L{MAX_SLEPT_RETRY_AFTER_SECONDS}, which an
        SDK would otherwise sleep through (openai-node) or ignore and retry
        at once (openai-python 1.x, 2.x).  Never C{true}: the SDKs' own
        defaults stand elsewhere.  Kept as is when the header is already
        there.
        """
        headers = self.headers
        if self.retry_after is None:
            said = next((value for name, value in headers if name.lower() == b"retry-after"), None)
            if said is not None and said.isdigit():
                object.__setattr__(self, "retry_after", int(said))
        if self.retry_after is not None:
            # Before an x-should-retry (added last), else last.
            others = [(name, value) for name, value in headers if name.lower() != b"retry-after"]
            at = next((n for n, (name, _) in enumerate(others) if name.lower() == SHOULD_RETRY_HEADER), len(others))
            headers = (*others[:at], (b"Retry-After", b"%d" % self.retry_after), *others[at:])
        too_long = self.retry_after is not None and self.retry_after > MAX_SLEPT_RETRY_AFTER_SECONDS
        if (self.code in NOT_RETRYABLE_CODES or too_long) and not any(
            name.lower() == SHOULD_RETRY_HEADER for name, _ in headers
        ):
            headers = (*headers, (SHOULD_RETRY_HEADER, b"false"))
        object.__setattr__(self, "headers", headers)

    def document(self) -> dict[str, object]:
        """
        The JSON error object, as an API response body or an SSE event.
        """
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return orjson.dumps(self.document())


#: OpenAI's codes for a request field at fault (its API's 400s, C{param}
#: naming the field): of the wrong JSON type, not one of the values
#: allowed, missing, an empty list.  A number out of range is
#: C{integer_below_min_value}, C{decimal_above_max_value} and so on
#: (L{openclaw.dataplane.request.out_of_range}).
INVALID_TYPE = "invalid_type"
INVALID_VALUE = "invalid_value"
MISSING_REQUIRED_PARAMETER = "missing_required_parameter"
EMPTY_ARRAY = "empty_array"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """
    The request itself is wrong; C{param} names the offending field, and
    C{code} says how, in OpenAI's words where one fits (L{INVALID_TYPE},
    ...), else None, as OpenAI's own answers have for many.
    """
    return APIError(400, message, "invalid_request_error", code, param)


#: The API's endpoints, as the 404 for any other path lists them.
_ENDPOINTS = (
    "POST /v1/chat/completions, POST /v1/embeddings, GET /v1/models, GET /v1/models/{model}, GET /healthz, GET /readyz"
)


def not_found(path: str, metrics_apart: bool = False) -> APIError:
    """
    404 C{unknown_url} for a path the API does not serve, listing those it
    does: C{GET /metrics} among them unless C{metrics_apart} (metrics are
    served on a listener of their own, C{--metrics-listen}), in which case
    a request for C{/metrics} is told where they are.
    """
    if not metrics_apart:
        served = f"this gateway serves {_ENDPOINTS} and GET /metrics"
    elif path == "/metrics":
        served = (
            "metrics are served on the metrics listener (--metrics-listen, METRICS_LISTEN), not on the API's; "
            f"the API serves {_ENDPOINTS}"
        )
    else:
        served = f"the API serves {_ENDPOINTS} (metrics are on the metrics listener, --metrics-listen)"
    return APIError(404, f"no such endpoint: {path}; {served}", "invalid_request_error", "unknown_url")


def model_not_found(model: str) -> APIError:
    """
    404 for C{GET /v1/models/{model}} naming a model this key's listing
    lacks (OpenAI's answer, code C{model_not_found}, C{param} C{model}, as
    a chat call's).
    """
    return APIError(
        404,
        f"The model {model!r} does not exist or you do not have access to it; "
        "GET /v1/models lists the models this key may use",
        "invalid_request_error",
        "model_not_found",
        "model",
    )


def shutting_down() -> APIError:
    """
    503 for a call the gateway ends because it is stopping: retry (another
    instance, or this one once it is back).
    """
    return APIError(
        503,
        "the gateway is shutting down and ended this call; retry it",
        "server_error",
        "shutting_down",
        retry_after=1,
    )


def method_not_allowed(method: str, allowed: tuple[bytes, ...]) -> APIError:
    """
    405 C{method_not_allowed}, naming the methods the path takes
    (C{allowed}, also its C{Allow} header: RFC 9110 section 15.5.6).
    """
    names = ", ".join(m.decode() for m in allowed)
    return APIError(
        405,
        f"method {method} is not allowed here; use {names}",
        "invalid_request_error",
        "method_not_allowed",
        headers=((b"Allow", names.encode()),),
    )


def unauthorized(message: str, code: str = "invalid_api_key") -> APIError:
    """
    401 with C{WWW-Authenticate: Bearer} (RFC 6750 section 3), OpenAI's
    C{invalid_request_error} type and C{code}.
    """
    return APIError(401, message, "invalid_request_error", code, headers=((b"WWW-Authenticate", b"Bearer"),))


def provider_not_configured(provider_id: str, key_variable: str) -> APIError:
    """
    503: the chosen provider has no key, so no call was made.  Not a 502:
    no upstream was asked, and the fix is on this side.
    """
    return APIError(
        503,
        f"{key_variable} is not set, so the gateway cannot call {provider_id}; "
        f"the operator must set {key_variable} and restart the gateway, or "
        "switch_provider to another provider",
        "provider_not_configured",
        "provider_key_not_set",
    )


def upstream_http_error(provider_id: str, status: int, reason: str) -> APIError:
    """
    502 for an upstream non-2xx answer; C{reason} already holds the status
    and the provider's message ("HTTP 429 Too Many Requests: ...").
    """
    return APIError(
        502,
        f"{provider_id} answered {reason}",
        "upstream_error",
        "upstream_http_error",
        headers=((UPSTREAM_STATUS_HEADER, b"%d" % status),),
    )


#: The code of a 502 for a whole (not streamed) answer the provider began
#: but did not finish: its connection cut, or its body over the limit.
ANSWER_BROKEN = "upstream_answer_broken"
#: The code of the error that ends a stream the provider broke or ended
#: before the answer was whole, or sent an event of that cannot be read
#: (not JSON, not an object, longer than the decoder takes): a 502 when
#: nothing of it was sent yet.
STREAM_BROKEN = "upstream_stream_broken"
#: The code of the error that ends a stream in which the provider put an
#: error of its own (an error event: its message and kind kept).
STREAM_ERROR = "upstream_stream_error"


def upstream_failed(provider_id: str, reason: str | Explained, code: str = "upstream_unreachable") -> APIError:
    """
    502 for an upstream that could not be reached or answered nonsense:
    C{reason} in one line, or in the client's and the operator's words
    (L{Explained}: the operator's are the error's C{detail}).
    """
    if isinstance(reason, str):
        return APIError(502, f"{provider_id}: {reason}", "upstream_error", code)
    detail = None if reason.operator == reason.client else f"{provider_id}: {reason.operator}"
    return APIError(502, f"{provider_id}: {reason.client}", "upstream_error", code, detail=detail)


def for_operator(error: APIError) -> str:
    """
    C{error}'s message as the operator reads it: its C{detail}, else its
    message.
    """
    return error.message if error.detail is None else error.detail


def amended(error: APIError, amend: Callable[[str], str]) -> APIError:
    """
    C{error} with C{amend} applied to its message, and to its C{detail}
    when it has one (a failover's note, a key scrubbed).
    """
    detail = None if error.detail is None else amend(error.detail)
    return attrs.evolve(error, message=amend(error.message), detail=detail)


def out_of_descriptors(reason: Failure) -> bool:
    """
    Whether C{reason}, a provider request's failure, is this process out
    of file descriptors (C{EMFILE}, or the system's C{ENFILE}): Twisted's
    L{ConnectBindError} when the socket could not be made, or any
    C{OSError} with that errno.
    """
    value = reason.value
    code = value.osError if isinstance(value, ConnectError) else getattr(value, "errno", None)
    return code in (errno.EMFILE, errno.ENFILE)


def descriptors_exhausted() -> APIError:
    """
    503 for a call the gateway could not send for want of a file
    descriptor (L{out_of_descriptors}).
    """
    return APIError(
        503,
        "the gateway has no file descriptor free to reach the provider (its limit is reached); "
        "retry shortly, and tell the operator if it lasts",
        "server_error",
        "gateway_overloaded",
        retry_after=1,
    )


def upstream_timeout(
    provider_id: str, seconds: float, waiting_for: str, variable: str = "UPSTREAM_TIMEOUT"
) -> APIError:
    """
    504: C{variable} (the setting that holds C{seconds}) ran out.
    """
    return APIError(
        504,
        f"{provider_id} did not answer in time: {seconds:g} s ({variable}) ran out while the "
        f"gateway waited for {waiting_for}; try again, or ask the operator to raise {variable}",
        "upstream_error",
        "upstream_timeout",
    )


def stream_too_long(provider_id: str, seconds: float) -> APIError:
    """
    504: a streamed answer was still coming after C{seconds}
    (C{UPSTREAM_STREAM_MAX_SECONDS}), counted from the request's arrival.
    """
    return APIError(
        504,
        f"{provider_id}'s streamed answer was still going after {seconds:g} s (UPSTREAM_STREAM_MAX_SECONDS), and "
        "was cut there; ask for a shorter answer (max_completion_tokens), or ask the operator to raise "
        "UPSTREAM_STREAM_MAX_SECONDS",
        "upstream_error",
        "stream_too_long",
    )


def internal_error() -> APIError:
    """
    500 C{internal_error}: a bug of the gateway's (logged with its
    traceback), never a provider's failure.
    """
    return APIError(
        500,
        "the gateway failed to handle this request; the details are in its log",
        "server_error",
        "internal_error",
    )


def retry_after_seconds(seconds: float) -> int:
    """
    A wait as a C{Retry-After} tells it (RFC 9110 section 10.2.3: a whole
    number of seconds): C{seconds} rounded up, at least 1 and at most
    L{MAX_DURATION_SECONDS}, the longest any setting gives (30 days), so
    no value, not even an infinite or NaN one, is written out whole (a
    C{BREAKER_COOLDOWN_SECONDS} of C{1e308} was a 309-digit header).
    """
    if not seconds < MAX_DURATION_SECONDS:
        return int(MAX_DURATION_SECONDS)
    if not seconds > 1:
        return 1
    return math.ceil(seconds)


def upstream_refused(
    provider_id: str,
    refusal: Refusal,
    key_setting: str,
    *,
    names_model: bool,
    base_url_setting: str | None = None,
    prompt_param: str = "messages",
) -> APIError:
    """
    The client's answer when a provider refused a chat call; the status
    follows what the provider said (the table in the README's "When a
    provider fails"), the provider's message (already scrubbed) kept, its
    status in C{X-OpenClaw-Upstream-Status}:

      - the request at fault (400, 404, 409, 413, 422): the same status,
        C{invalid_request_error}; a 404 to a call that C{names_model}
        (chat, embeddings) is OpenAI's own answer for a model it does not
        have, C{model_not_found} with C{param} C{model} (Moonshot's 404
        "Not found the model ..." and Gemini's 404 C{NOT_FOUND} "models/...
        is not found" are how both say so), any other 404 (a models
        listing: C{names_model} false) C{not_found_error}
        C{upstream_not_found}; a 404 whose body is not the provider's
        error document (L{Refusal.stated}: a web server's page, no API at
        that path) also tells the operator to check C{base_url_setting}
        (C{KIMI_BASE_URL}), the likelier cause when every call gets it;
        a prompt over the model's context window (L{Refusal.code}
        C{context_length_exceeded}, however the provider said it) is
        OpenAI's own answer, code C{context_length_exceeded} with C{param}
        C{prompt_param} (C{messages}; an embeddings call's C{input}),
        which agent frameworks read to trim their history;
      - 429: 429 C{rate_limit_exceeded}, with C{Retry-After} when the
        provider said how long;
      - the gateway's own key refused (401, Google's C{API_KEY_INVALID}):
        502 C{upstream_auth_failed} naming C{key_setting} (and, as
        C{upstream_account_error} and a C{Retry-After} over a minute,
        C{x-should-retry: false}: L{APIError});
      - permission denied (403: the model not available to the gateway's
        key, as Moonshot's C{permission_denied_error} says, or the key or
        its account not allowed at all: suspended, or without access to
        the API): 403 C{permission_denied}, whose hint names both;
      - the provider account cannot serve (Google's C{FAILED_PRECONDITION},
        an OpenAI-compatible API's 429 for a quota or balance spent):
        502 C{upstream_account_error}, with a hint for the operator;
      - a redirect (3xx): 502 C{upstream_http_error}, telling the operator
        to set C{base_url_setting} to the final URL (redirects are not
        followed);
      - anything else (5xx): 502 C{upstream_http_error}, with the
        provider's C{Retry-After} when it gave one (RFC 9110 section
        10.2.3: a 503 may say when to come back).
    """
    said = f"{status_line(refusal.status)}: {refusal.message}"
    upstream = ((UPSTREAM_STATUS_HEADER, b"%d" % refusal.status),)
    retry_after = None if refusal.retry_after is None else retry_after_seconds(refusal.retry_after)
    kind = refusal.kind
    if kind == "request":
        refused = f"{provider_id} refused the request: {said}"
        if refusal.code == CONTEXT_LENGTH_EXCEEDED:
            return APIError(
                refusal.status,
                f"{refused}; the prompt is longer than the model's context window: shorten the {prompt_param} "
                + ("(drop or summarise earlier turns)" if prompt_param == "messages" else "(or split it into parts)")
                + " or use a model with a longer context",
                "invalid_request_error",
                CONTEXT_LENGTH_EXCEEDED,
                prompt_param,
                headers=upstream,
            )
        if refusal.status != 404:
            if refusal.advice is not None:
                refused = f"{refused}; {refusal.advice}"
            return APIError(
                refusal.status,
                refused,
                "invalid_request_error",
                "upstream_invalid_request",
                refusal.param,
                headers=upstream,
            )
        if not refusal.stated and base_url_setting is not None:
            refused += (
                f"; that answer is not {provider_id}'s own error document, so its API may not be at the URL the "
                f"gateway uses: if every call gets it, ask the operator to check {base_url_setting} "
                "(openclawctl health-check)"
            )
        if names_model:
            return APIError(404, refused, "invalid_request_error", "model_not_found", "model", headers=upstream)
        return APIError(404, refused, "not_found_error", "upstream_not_found", headers=upstream)
    if kind == "rate_limited":
        return APIError(
            429,
            f"{provider_id} is rate limiting the gateway: {said}; "
            + ("retry later" if retry_after is None else f"retry in {retry_after} s"),
            "rate_limit_error",
            "rate_limit_exceeded",
            headers=upstream,
            retry_after=retry_after,
        )
    if kind == "auth":
        return APIError(
            502,
            f"the gateway's own key for {provider_id} was refused ({said}); this is not about your "
            f"API key: the operator must fix {key_setting}",
            "upstream_error",
            "upstream_auth_failed",
            headers=upstream,
        )
    if kind == "forbidden":
        return APIError(
            403,
            f"{provider_id} denied permission: {said}; the key this gateway holds for {provider_id} is not allowed "
            "this call: the model may not be available to it (GET /v1/models lists the models it serves), or the "
            "key or its account may have no access (suspended, or not enabled for this API); use another model, or "
            f"ask the operator to check the {provider_id} key and account",
            "permission_denied_error",
            "permission_denied",
            headers=upstream,
        )
    if kind == "account":
        return APIError(
            502,
            f"{provider_id} cannot serve calls for the gateway's account ({said}); this is not about your "
            f"request: the operator must fix the {provider_id} account (its location, balance or billing)",
            "upstream_error",
            "upstream_account_error",
            headers=upstream,
        )
    hint = "; the provider is failing, try again later" if refusal.status >= 500 else ""
    if 300 <= refusal.status < 400 and base_url_setting is not None:
        # Redirects are not followed (one could carry the key to another
        # host): the URL the gateway uses is the operator's to set.
        hint = f"; the gateway does not follow redirects: ask the operator to set {base_url_setting} to the final URL"
    headers: tuple[tuple[bytes, bytes], ...] = upstream
    if refusal.status < 500 and refusal.status not in (408, 409):
        # A refusal of another kind (402, 405, a redirect...): the same call
        # would be refused again; 408 and 409 may pass on a retry (the SDKs
        # retry them).
        headers = (*headers, (SHOULD_RETRY_HEADER, b"false"))
    return APIError(
        502,
        f"{provider_id} answered {said}{hint}",
        "upstream_error",
        "upstream_http_error",
        headers=headers,
        retry_after=retry_after,
    )


def no_usable_key(provider_id: str, key_setting: str, back_in: float | None, model: str | None = None) -> APIError:
    """
    Every key of the provider's pool rests (429: C{back_in} seconds until
    the first is back; for C{model}'s calls, when its keys rest by model)
    or was refused (502).
    """
    if back_in is not None:
        scope = "" if model is None else f" for {model} (its other models may take calls)"
        return APIError(
            429,
            f"every key the gateway holds for {provider_id} is rate limited{scope}; retry in "
            f"{retry_after_seconds(back_in)} s",
            "rate_limit_error",
            "rate_limit_exceeded",
            retry_after=retry_after_seconds(back_in),
        )
    return APIError(
        502,
        f"every key the gateway holds for {provider_id} was refused by the provider; this is not about "
        f"your API key: the operator must fix {key_setting} (a health_check puts keys that work back in use)",
        "upstream_error",
        "upstream_auth_failed",
    )


def every_key_resting(
    provider_id: str, seconds: float, fallbacks: Sequence[tuple[str, float, str | None]], model: str | None = None
) -> APIError:
    """
    429: every key of the call's provider (C{provider_id}, back in
    C{seconds}; for C{model} alone, when it is that model's rests that keep
    them away) rests after a 429, and so does every key of each provider
    the call could fail over to (C{fallbacks}: their ids, each with the
    seconds until it may take the call and the model its keys rest for,
    or None), so no provider can take it now.  Said as such, each
    provider's wait named, soonest first, and the client told to retry
    (C{Retry-After}) when the first of them can: not the call's
    provider's wait alone, as if the fallback could take it.
    """
    waits = sorted(
        [(provider_id, seconds), *((fallback, wait) for fallback, wait, _ in fallbacks)], key=lambda entry: entry[1]
    )
    soonest = waits[0][1]
    others = " and ".join(
        fallback + ("" if rested is None else f" (for {rested})") for fallback, _, rested in fallbacks
    )
    first, *rest = waits
    told = f"{first[0]} may take the call in {retry_after_seconds(first[1])} s" + "".join(
        f", {other} in {retry_after_seconds(wait)} s" for other, wait in rest
    )
    scope = "" if model is None else f" for {model}"
    return APIError(
        429,
        f"every key the gateway holds for {provider_id} is rate limited{scope}, and so is every key it holds for "
        f"{others}, where the call would fail over ({told}); retry in {retry_after_seconds(soonest)} s",
        "rate_limit_error",
        "rate_limit_exceeded",
        retry_after=retry_after_seconds(soonest),
    )


def every_breaker_open(provider_id: str, seconds: float, fallbacks: Sequence[tuple[str, float]]) -> APIError:
    """
    503: the breaker of the call's provider (C{provider_id}, open for
    C{seconds} more) is open, and so is the breaker of each provider the
    call could fail over to (C{fallbacks}: their ids, each with the seconds
    until it may take the call), so no provider can take it now.  Said as
    such, each provider's wait named, soonest first, and the client told to
    retry (C{Retry-After}) when the first of them can; not the call's
    provider's alone with "ask the operator to switch_provider", which
    would only move the call to another failing provider.
    """
    waits = sorted([(provider_id, seconds), *fallbacks], key=lambda entry: entry[1])
    soonest = retry_after_seconds(waits[0][1])
    others = " and ".join(fallback for fallback, _ in fallbacks)
    told = ", ".join(f"{provider} in {retry_after_seconds(wait)} s" for provider, wait in waits)
    return APIError(
        503,
        f"{provider_id} has been failing, and so {'has' if len(fallbacks) == 1 else 'have'} {others}, where the "
        "call would fail over, so the gateway "
        f"sends them no calls for a while (BREAKER_COOLDOWN_SECONDS: {told}); retry in {soonest} s, and if "
        "every provider keeps failing, ask the operator to look at them (openclawctl status)",
        "server_error",
        "provider_unavailable",
        retry_after=soonest,
    )


def sooner_elsewhere(error: APIError, provider_id: str, seconds: float) -> APIError:
    """
    C{error} (a 429 or 503 whose C{Retry-After} says when its provider
    takes calls again) told to come back in C{seconds}, when sooner: the
    call could then fail over to C{provider_id}.  A client waits for
    the route, not for one of its providers (a spent daily quota's hour
    while the fallback rests for seconds).  Unchanged otherwise.
    """
    wait = retry_after_seconds(seconds)
    if error.retry_after is None or error.retry_after <= wait:
        return error
    # Its x-should-retry: false for a wait too long to sleep, if any, is
    # decided again.
    kept = tuple((name, value) for name, value in error.headers if name.lower() != SHOULD_RETRY_HEADER)
    told = amended(error, lambda text: f"{text}; {provider_id} may take the call in {wait} s (failover)")
    return attrs.evolve(told, headers=kept, retry_after=wait)


def breaker_open(provider_id: str, remaining: float, pinned: bool = False) -> APIError:
    """
    503: the provider's circuit breaker is open, so no call was sent; the
    client may come back when the cooldown is over.

    @param pinned: the call named its provider (C{"kimi/<model>"}), which
        a C{switch_provider} does not move: the client is told to name
        another provider's model instead.
    """
    instead = "name another provider's model" if pinned else "ask the operator to switch_provider"
    if remaining > 0:
        message = (
            f"{provider_id} has been failing, so the gateway sends it no calls for {retry_after_seconds(remaining)} s more "
            f"(BREAKER_COOLDOWN_SECONDS); retry after that, or {instead}"
        )
    else:
        message = (
            f"{provider_id} has been failing and one trial call is under way to see whether it is back; "
            f"retry in a second, or {instead}"
        )
    return APIError(
        503,
        message,
        "server_error",
        "provider_unavailable",
        retry_after=retry_after_seconds(remaining),
    )
