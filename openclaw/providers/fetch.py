"""
Provider requests: one JSON GET, cancellable end to end; one chat POST; a
whole body read with a size limit.

Cancelling what L{get_json} returns (which is what C{Deferred.addTimeout}
does) closes the connection whether the request is still waiting for its
headers or already reading the body.  treq's C{timeout=} stops at the
headers, and neither C{treq.content} nor Twisted's C{readBody} has a size
limit, nor can they abort a body coming through just any L{IAgent} (a
body's transport need only be an C{IPushProducer}; C{readBody} looks for
C{abortConnection}, which Twisted's own body transport does not have), so
the body is read here with the transport's C{IPushProducer.stopProducing}
as the canceller: on Twisted's C{Agent} that closes the connection, which
then never goes back to the pool.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import attrs
import orjson
from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from openclaw.providers.errors import BodyTooLarge, MalformedResponse
from openclaw.providers.wire import json_or_none, reported_error, with_kind

#: A models listing is tens of kilobytes; anything near this is not one.
MAX_BODY_BYTES = 8 * 1024 * 1024


@implementer(IBodyProducer)
@attrs.frozen
class BytesProducer:
    """
    A request body already in memory, written to the connection in one go
    when the agent asks for it.  (Twisted's C{FileBodyProducer}, which treq
    wraps around bytes, hands a body over through a cooperator instead, a
    reactor turn after the request's head.)
    """

    body: bytes

    @property
    def length(self) -> int:
        return len(self.body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@attrs.define
class Exchange:
    """
    What an exchange got to before it ended, so that a timeout can say
    whether the provider never answered or stalled mid-body.
    """

    started: float
    #: Status of the latest response whose headers arrived.
    status: int | None = None
    #: What the exchange is waiting for now, for timeout messages.
    waiting_for: str = "the response"
    #: The key to authenticate with; None: the adapter's first.
    key: str | None = attrs.field(default=None, repr=False)
    #: The C{Retry-After} of the latest response, when it had one.
    retry_after: str | None = None


class BodyReader(Protocol):
    """
    Collects a response body (L{IResponse.deliverBody}) and hands it over
    once, with no Deferred in between: C{done(body)} once the body has
    ended (a body delimited only by the connection closing included), or
    C{failed(reason)}: L{BodyTooLarge} past C{limit} bytes (its connection
    dropped), else the reason the body was cut (C{ResponseFailed}).
    Neither is called after L{cancel}.
    """

    def __init__(
        self, done: Callable[[bytes], object], failed: Callable[[Failure], object], limit: int = MAX_BODY_BYTES
    ) -> None:
        self._done = done
        self._failed = failed
        self._limit = limit
        self._chunks: list[bytes] = []
        #: The body's bytes received so far.
        self.received = 0
        self._over = False

    def dataReceived(self, data: bytes) -> None:
        if self._over:
            return
        self.received += len(data)
        if self.received > self._limit:
            self._over = True
            self._stop()
            self._failed(Failure(BodyTooLarge(f"response body larger than {self._limit} bytes")))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._over:
            return
        self._over = True
        # The exception itself (Failure.check would spell out the qualified
        # names of its classes, at every body's end).
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            self._done(b"".join(self._chunks))
        else:
            self._failed(reason)

    def cancel(self) -> None:
        """
        No more of this body is wanted: drop the connection (it never goes
        back to the pool); neither callback is called.
        """
        if not self._over:
            self._over = True
            self._stop()

    def _stop(self) -> None:
        if self.transport is not None:
            # A response body's transport is an IPushProducer (IResponse.deliverBody).
            cast(IPushProducer, self.transport).stopProducing()


def read_body(
    response: IResponse, limit: int = MAX_BODY_BYTES, reading: Callable[[BodyReader], object] | None = None
) -> Deferred[bytes]:
    """
    The whole body of C{response}, once it has ended (a body delimited only
    by the connection closing included).  Cancelling the result closes the
    connection.

    @param reading: given the body's reader at once (its
        L{BodyReader.received} tells how much has come).

    @raise BodyTooLarge: (in the Deferred) the body ran past C{limit}
        bytes; its connection is dropped.
    @raise ResponseFailed: (in the Deferred) the connection was lost before
        the body's end.
    """
    finished: Deferred[bytes] = Deferred(lambda _: reader.cancel())
    reader = BodyReader(finished.callback, finished.errback, limit)
    if reading is not None:
        reading(reader)
    response.deliverBody(reader)
    return finished


class ProviderURL(EncodedURL):
    """
    A provider URL as treq is given it.  treq makes every URL a URI with
    hyperlink's C{to_uri}, which IDNA-encodes the host, and fails for an
    IPv6 address such as C{::1} (python-hyper/hyperlink#188; IDNA applies
    to names only, RFC 5890) and for an ASCII name IDNA refuses but DNS
    and the chat calls take (C{kimi_proxy}, a container's name with C{_}):
    here such a host is left as it is (an ASCII name needs no encoding),
    the rest of the URL (path, the query treq adds) encoded as hyperlink
    does; an international name is IDNA-encoded.
    """

    def to_uri(self) -> EncodedURL:
        if not self.host or (":" not in self.host and not self.host.isascii()):
            return super().to_uri()
        return super().replace(host="").to_uri().replace(host=self.host)


async def get_json(
    http: HTTPClient,
    url: str,
    *,
    headers: Mapping[str, str],
    params: Mapping[str, str] | None,
    exchange: Exchange,
    what: str,
) -> tuple[int, Any]:
    """
    GET C{url} and parse its body.

    @param what: What the body is ("models listing"), for error messages.
    @return: C{(status, document)} for a 2xx answer, or C{(status, body
        bytes)} for any other status so the caller can word the error.
    @raise MalformedResponse: a 2xx body that is not JSON.
    """
    # Redirects are not followed: a listing endpoint has no reason to
    # redirect, and following one could carry a key header to another host.
    response = await http.get(
        ProviderURL.from_text(url),
        headers=Headers({name: [value] for name, value in headers.items()}),
        params=params,
        allow_redirects=False,
        unbuffered=True,
    )
    exchange.status = response.code
    retry_after = response.headers.getRawHeaders(b"retry-after")
    exchange.retry_after = None if retry_after is None else retry_after[0].decode("latin-1")
    exchange.waiting_for = f"the {what} body"
    body = await read_body(response)
    exchange.waiting_for = "the response"
    if not 200 <= response.code < 300:
        return response.code, body
    try:
        return response.code, orjson.loads(body)
    except orjson.JSONDecodeError:  # invalid UTF-8 included
        raise MalformedResponse(f"malformed JSON in {what} (HTTP {response.code})") from None


def post(agent: IAgent, url: bytes, headers: Headers, body: bytes) -> Deferred[IResponse]:
    """
    POST C{body} to C{url}; fires with the response once its headers are in.

    Straight through Twisted's C{Agent} (the same agent and pool treq's
    client uses for the models listings), not through treq: for every
    request treq parses the URL again (hyperlink), wraps the agent in a
    cookie agent, a gzip content decoder and, unless told otherwise, a
    redirect agent, and wraps the response; a model call wants none of
    them (no cookies, no redirect: one could carry the key header to
    another host), and they would all be on its path (what they cost:
    bench/README.rst, "treq for the chat POST").
    The body goes out with the request's head (L{BytesProducer}).
    Cancelling the result before the headers arrive closes the connection
    (or stops connecting).

    @raise ValueError: (in the Deferred) C{url} holds what a request line
        cannot carry (Twisted's C{Agent} raises it at once; a caller waiting
        on the Deferred gets it there like any other failure).
    """
    try:
        return agent.request(b"POST", url, headers, BytesProducer(body))
    except ValueError:
        return fail()


def upstream_message(body: bytes) -> str:
    """
    The provider's own explanation in an error body, whole (its callers
    scrub and clip it): OpenAI/Moonshot's C{{"error": {"message", "type",
    "code"}}} and Google's C{{"error": {"code", "message", "status"}}} as
    a stream's error event is told (L{with_kind}: "API key not valid.
    [status=INVALID_ARGUMENT, code=400]"), else the body's C{message},
    else the raw text.
    """
    document = json_or_none(body)
    error = reported_error(document)
    if error is not None and (error.stated is not None or isinstance(error.value, str)):
        return with_kind(error, limit=None)
    if isinstance(document, dict) and isinstance(document.get("message"), str):
        return str(document["message"])
    text = body.decode("utf-8", "replace").strip()
    return text or "(empty body)"
