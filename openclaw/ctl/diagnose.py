"""
Why no answer came, and what to do (L{explain_failure}): a connection
refused or timed out, a UNIX socket that is not there or not open to
this user, a TLS handshake that failed (the certificate's names, its CA,
a server that does not speak TLS), the gateway's refusal (its close
codes), and a server's answer to the handshake that is not the
gateway's (read as an HTTP head: a redirect, a 404, a server that is no
WebSocket server, or that does not speak HTTP).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import stat
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType

import attrs
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.util import parse_url
from cryptography import x509
from OpenSSL.SSL import Error as OpenSSLError
from service_identity import CertificateError, VerificationError
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost, ConnectionRefusedError, DNSLookupError

from openclaw.addresses import host_port
from openclaw.control.closecodes import (
    GOING_AWAY,
    POLICY_VIOLATION,
    PROXY_NAMED_NO_CLIENT_REASON,
    UNTRUSTED_PEER_REASON,
)
from openclaw.ctl.client import MAX_HEAD_BYTES, AnswerHeadTooLarge, ConnectionClosed, Unanswered, may_be_http
from openclaw.ctl.request import Request, unix_socket_path, websocket_url
from openclaw.ctl.show import QUOTED_MAX, printable
from openclaw.files import kind_of
from openclaw.tls import NAMES_SHOWN, certificate_names, describe_tls_error, is_tls_error, read_ca_file

#: Autobahn's reason for a WebSocket handshake the server answered with
#: another HTTP status than 101 (C{connection was closed uncleanly
#: ("WebSocket connection upgrade failed [429]: too many ...; retry in 300
#: s")}): the status (any digits the server sent), and the reason phrase
#: the server gave.
_HTTP_REFUSAL = re.compile(r'upgrade failed \[(?P<status>\d+)\]:? ?(?P<reason>.*?)(?:"\))?$', re.DOTALL)


def _status_line(received: bytes) -> str:
    """
    The first line of what the server sent, as text (bytes that are not
    UTF-8 shown as C{\\xff}), not yet L{printable}.
    """
    return received.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "backslashreplace")


def _may_be_tls(received: bytes) -> bool:
    """
    Whether C{received} starts like a TLS record (RFC 8446 section 5.1: a
    content type from 20 to 23, then a version 3.x): a TLS server's
    answer (an alert) to a plain handshake.
    """
    return received[0] in range(20, 24) and received[1:2] in (b"", b"\x03")


@attrs.frozen
class AnswerHead:
    """
    The head of the server's HTTP answer to the handshake, read leniently
    (to say what it was, not to act on it).  Its texts are as the server
    sent them: UTF-8 where they are, the other bytes as C{\\xff}; not
    yet L{printable}.
    """

    status: str
    reason: str
    #: (name in lower case, value) in their order.
    headers: tuple[tuple[str, str], ...]
    #: What came after the head, with it (as much of the body as there was).
    body: bytes

    def header(self, name: str) -> str | None:
        """
        The first value of the header C{name} (lower case), None without one.
        """
        return next((value for key, value in self.headers if key == name), None)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace")


def answer_head(received: bytes) -> AnswerHead | None:
    """
    The head of C{received}, the server's answer to the handshake, when
    it is HTTP (it starts with C{HTTP/}); None otherwise.
    """
    if not received.startswith(b"HTTP/"):
        return None
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            headers.append((_text(name.strip()).lower(), _text(value.strip(b" \t"))))
    return AnswerHead(
        status=_text(parts[1]) if len(parts) > 1 else "",
        reason=_text(parts[2].strip(b" ")) if len(parts) > 2 else "",
        headers=tuple(headers),
        body=body,
    )


#: HTTP's redirects that name where with C{Location} (RFC 9110 section 15.4).
_REDIRECTS = frozenset({"301", "302", "303", "307", "308"})

#: The most characters of a redirect's C{Location} shown, and suggested.
LOCATION_SHOWN = 300

#: The WebSocket scheme for an HTTP one in a redirect's C{Location}.
_WEBSOCKET_SCHEMES = MappingProxyType({"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"})


def _redirect_url(url: str, location: str) -> str | None:
    """
    The C{--url} a redirect to C{location} (a URL or a path) suggests,
    from C{url} (a C{ws://} or C{wss://} one): the same with C{http}
    read as C{ws} and C{https} as C{wss}; None when the location is no
    URL openclawctl can use as it is (not printable ASCII, spaces,
    another scheme, longer than L{LOCATION_SHOWN}).
    """
    if (
        not url.startswith(("ws:", "wss:"))
        or len(location) > LOCATION_SHOWN
        or not location.isascii()
        or not location.isprintable()
        or " " in location
    ):
        return None
    try:
        joined = urllib.parse.urlsplit(urllib.parse.urljoin(url, location))
        scheme = _WEBSOCKET_SCHEMES.get(joined.scheme.lower())
        if scheme is None or not joined.netloc:
            return None
        suggested = urllib.parse.urlunsplit((scheme, *joined[1:]))
        parse_url(suggested)
    except ValueError:
        return None
    return suggested


def _not_found(url: str, reason: str, body: bytes) -> str:
    """
    What to say about a 404 to the handshake: the gateway's API port
    given for the control plane's, when the answer is the API's (its JSON
    error: C{{"error": {"message", "type", ...}}}); else that nothing is
    at that path there.
    """
    if _is_api_error(body):
        return (
            f"{url} answered the WebSocket handshake with HTTP 404: is that the gateway's API port "
            "(API_PORT)? openclawctl talks to the control plane, on WS_CONTROL_PORT (default 18789)"
        )
    path = parse_url(websocket_url(url))[3]
    return (
        f"{url} answered the WebSocket handshake with HTTP 404 ({printable(reason, QUOTED_MAX) or 'no reason given'})"
        f": the path {printable(path, QUOTED_MAX)} was not found there; check the URL's path (behind a proxy, the "
        "location that leads to the gateway's control plane) and port"
    )


def _is_api_error(body: bytes) -> bool:
    """
    Whether C{body} is the gateway's API's error (its JSON error object,
    L{openclaw.dataplane.errors.APIError.document}); a body sent in
    chunks is read from its first C{{} to its last C{}}.
    """
    start, end = body.find(b"{"), body.rfind(b"}")
    try:
        document = json.loads(body[start : end + 1]) if 0 <= start < end else None
    except ValueError:
        return False
    error = document.get("error") if isinstance(document, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str)


def _http_answer(head: AnswerHead, url: str) -> str | None:
    """
    What to say about the server's HTTP answer to the handshake, when its
    status says more than its reason: a success (it is no WebSocket
    server), a redirect (where to), a 404 (L{_not_found}); None for any
    other status.
    """
    said = f"{url} answered the WebSocket handshake with HTTP {printable(head.status, QUOTED_MAX)}"
    if head.reason:
        said += f" ({printable(head.reason, QUOTED_MAX)})"
    if len(head.status) == 3 and head.status.startswith("2") and head.status.isdigit():
        return (
            f"{said}, not 101 Switching Protocols: it is not a WebSocket server; check the URL's host, port and "
            "path (openclawctl talks to the gateway's control plane: WS_CONTROL_PORT, default 18789)"
        )
    location = head.header("location")
    if head.status in _REDIRECTS and location is not None:
        suggested = _redirect_url(url, location)
        said = f"{said}, a redirect to {printable(location, LOCATION_SHOWN)}, which openclawctl does not follow"
        if suggested is None:
            return f"{said}; check the URL"
        other = parse_url(suggested)[1] != parse_url(url)[1]
        trust = " (another host: only if you trust it with the token)" if other else ""
        return f"{said}: use --url {suggested}{trust}"
    if head.status == "404":
        return _not_found(url, head.reason, head.body)
    return None


def _unread_http_answer(error: ConnectionClosed, url: str) -> str | None:
    """
    What to say when the server answered the handshake in HTTP (its
    first bytes are C{HTTP/}) but Autobahn gave no status for it: the
    answer could not be read (a reason phrase that is not UTF-8 fails
    Autobahn's decoding), or it ended, or was no WebSocket handshake,
    before the handshake completed.  None when it is not that case.
    """
    if error.opened or not error.received.startswith(b"HTTP/"):
        return None
    line = _status_line(error.received)
    cause = error.cause
    if cause is not None and not isinstance(cause, (ConnectionDone, ConnectionLost)):
        return (
            f"{url} answered the WebSocket handshake with an HTTP response openclawctl could not read "
            f"({printable(f'{type(cause).__name__}: {cause}')}): {printable(line)}"
        )
    return (
        f"{url} answered the WebSocket handshake with an HTTP response that did not complete it "
        f"({printable(str(error.reason))}): {printable(line)}"
    )


def _policy_violation(reason: str | None, url: str) -> str:
    """
    What to say about a close with 1008 before an answer, by its reason
    (L{openclaw.control.closecodes}): an address outside
    TRUSTED_CLIENT_IPS (or no reason, from a gateway that gave none), an
    address in TRUSTED_PROXIES that named no client (openclawctl speaks
    for itself, not as a proxy), or any other, shown as the gateway gave it.
    """
    refused = f"the gateway at {url} refused this connection (close code 1008)"
    if not reason or reason == UNTRUSTED_PEER_REASON:
        return (
            f"{refused}: this address is not in TRUSTED_CLIENT_IPS (through a proxy in its TRUSTED_PROXIES, the "
            "address the proxy named for this client); add it to the gateway's TRUSTED_CLIENT_IPS, or connect "
            "from an address that is"
        )
    if reason == PROXY_NAMED_NO_CLIENT_REASON:
        return (
            f"{refused}: this address is in the gateway's TRUSTED_PROXIES, so its connections must name a "
            "client (X-Forwarded-For or Forwarded), and openclawctl's do not; connect through the proxy (one "
            "that sends X-Forwarded-For: if openclawctl went through one, set the proxy to send it), from an "
            "address in TRUSTED_CLIENT_IPS that is not a proxy, or to a unix: control listener (--url unix:PATH)"
        )
    return f"{refused}: {printable(reason)}"


#: OpenSSL's reasons for a TLS handshake answered with what is not TLS
#: (a plain HTTP listener's C{HTTP/1.1 400 Bad Request}, read as a TLS
#: record whose version is C{TP}).
_NOT_TLS_REASONS = ("wrong version number", "packet length too long")

#: A host name that can be put in a suggested C{--url} as it is.
_PLAIN_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?")


def _plain_host(name: str) -> bool:
    """
    Whether C{name} (from a certificate) can be put in a suggested URL as
    it is: an IP address, or a host name of letters, digits, dots and
    dashes (not a wildcard).
    """
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return _PLAIN_HOST_NAME.fullmatch(name) is not None
    return True


def _url_with_host(url: str, host: str) -> str:
    """
    C{url} (C{wss://...}) with C{host} in place of its host: its port and
    path kept.
    """
    secure, _, port, resource = parse_url(url)[:4]
    return f"{'wss' if secure else 'ws'}://{host_port(host, port)}{resource if resource != '/' else ''}"


def _host_mismatch(certificates: Sequence[x509.Certificate], request: Request) -> str:
    """
    What to say when the server's certificate does not name the URL's
    host (service_identity's C{VerificationError}): the names it holds,
    and to connect by one of them or give the server a certificate for
    this host; not C{--cafile}, which cannot help.
    """
    host = parse_url(request.url)[1]
    names = certificate_names(certificates[0]) if certificates else None
    fix = f"give the server a certificate that names {host}"
    if names is None:
        return f"the server's certificate does not name {host}; connect by a name it holds, or {fix}"
    if not names:
        return (
            f"the server's certificate names no host (it has no subjectAltName, and a certificate's CN is not "
            f"used); {fix}"
        )
    shown = ", ".join(printable(name, 100) for name in names[:NAMES_SHOWN])
    if len(names) > NAMES_SHOWN:
        shown += f" and {len(names) - NAMES_SHOWN} more"
    usable = [name for name in names if _plain_host(name)]
    by = f" (--url {_url_with_host(request.url, usable[0])}, where that name reaches this server)" if usable else ""
    return (
        f"the server's certificate does not name {host}, it names {shown}; connect by "
        f"{'that name' if len(names) == 1 else 'one of them'}{by}, or {fix}"
    )


def _ca_file_subjects(cafile: Path) -> set[x509.Name] | None:
    """
    The subjects of the CA certificates in C{cafile}, None when it can no
    longer be read.
    """
    try:
        return {ca.subject for ca in x509.load_pem_x509_certificates(read_ca_file(cafile))}
    except (OSError, ValueError):
        return None


def _tls_failure(error: BaseException, certificates: Sequence[x509.Certificate], request: Request) -> str:
    """
    Why the TLS handshake failed, and what to do: the server's
    certificate does not name the host (L{_host_mismatch}); the server
    did not speak TLS (a plain listener: use C{ws://}); the certificate
    is not signed by the CA(s) of C{--cafile} (named, with the issuer the
    certificate gives), or, without C{--cafile}, by one the system
    trusts (pass C{--cafile}).
    """
    failed = f"TLS handshake with {request.url} failed"
    if isinstance(error, VerificationError):
        return f"{failed}: {_host_mismatch(certificates, request)}"
    reason = printable(describe_tls_error(error))
    if any(text in reason for text in _NOT_TLS_REASONS):
        return (
            f"{failed}: {reason}: the server did not answer in TLS; is the control listener TLS? (a plain "
            "listener takes ws://)"
        )
    if request.cafile is None:
        return f"{failed}: {reason}; if the gateway's certificate is signed by your own CA, pass --cafile CA.pem"
    if isinstance(error, OpenSSLError) and "certificate verify failed" in reason:
        subjects = _ca_file_subjects(request.cafile)
        if subjects is None or not any(c.issuer in subjects or c.subject in subjects for c in certificates):
            issuer = (
                f" (it was issued by {printable(certificates[0].issuer.rfc4514_string(), 200)})" if certificates else ""
            )
            return (
                f"{failed}: {reason}: the CA file {request.cafile} did not sign the server's certificate{issuer}; "
                "pass --cafile the certificate of the CA that did"
            )
    return f"{failed}: {reason} (trusting the CA file {request.cafile})"


def _unix_connect_failure(path: str, error: ConnectError) -> str:
    """
    Why a UNIX socket could not be connected to, by the C{connect(2)}
    error Twisted kept (C{osError}), and what to check: a sentence, not
    Twisted's C{An error occurred while connecting: 2: No such file or
    directory.}.
    """
    number = error.osError if isinstance(error.osError, int) else None
    if number in (errno.ENOENT, errno.ENOTDIR):
        return f"there is no such socket file; is the gateway running, and is {path} its --listen unix: path?"
    if number in (errno.EACCES, errno.EPERM):
        return (
            f"this user may not open the socket {path} (its mode, or a directory above it); run openclawctl as "
            "a user the gateway's --listen unix:PATH:mode= lets in"
        )
    if isinstance(error, ConnectionRefusedError):
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = stat.S_IFSOCK
        if not stat.S_ISSOCK(mode):
            return f"{path} is {kind_of(mode)}, not a socket; give the gateway's --listen unix: path"
        return (
            f"nothing listens on {path} (a socket file left by a gateway that stopped?); is the gateway "
            "running, and is this its --listen unix: path?"
        )
    reason = os.strerror(number) if number else printable(str(error.args[0] or "connect failed"))
    return f"{reason}; is the gateway running, and is {path} its --listen unix: path?"


#: What a command the gateway took and did not answer may wait on
#: (L{_awaited}): its writes of the state file (switch_provider) and
#: of TOKEN_FILE (rotate_token) are made one at a time, each fsynced.
_FILE_WAIT = MappingProxyType(
    {
        "switch_provider": "the write of its state file (STATE_DIR's, on a slow disk: a stalled fsync or NFS server)",
        "rotate_token": (
            "the write of its TOKEN_FILE (on a slow disk: a stalled fsync or NFS server; the current token stays "
            "valid until the new one is written)"
        ),
    }
)


def _awaited(cmd: str) -> str:
    """
    What the gateway may be waiting on before it answers C{cmd}: a file
    write for C{switch_provider} and C{rotate_token}, either that or the
    consumers' database for the gateway's other commands, the database
    for the consumer commands (a switch behind a slow disk
    was said to wait on the database).
    """
    if cmd in _FILE_WAIT:
        return (
            _FILE_WAIT[cmd]
            + ", one at a time behind its other file writes, or in a cluster on the cluster store (Redis): see the "
            "gateway's log"
        )
    if cmd == "health_check":
        return "the providers' health checks (each bounded by HEALTH_CHECK_TIMEOUT; see the gateway's log)"
    if cmd in ("ping", "status"):
        return "nothing but itself: it answers these at once, so its event loop may be stalled (see the gateway's log)"
    return "its consumers' database (a long usage report, or a database that stopped answering: see the gateway's log)"


def _unreached(error: BaseException, request: Request) -> str | None:
    """
    What to say when the gateway was not reached, or did not answer in
    time: the connection refused, a host name that does not resolve, a
    command sent and not answered (L{Unanswered}), or no connection within
    C{--timeout}; None for any other error.
    """
    url = request.url
    if isinstance(error, ConnectionRefusedError):
        return (
            f"cannot connect to {url}: connection refused; is the gateway running, "
            "and listening on that port (WS_CONTROL_PORT, default 18789)? (a gateway that is stopping closes its "
            "ports first while it finishes its calls: let it)"
        )
    if isinstance(error, DNSLookupError):
        return f"cannot connect to {url}: the host name does not resolve"
    if isinstance(error, Unanswered):
        return (
            f"the gateway at {url} took the command but did not answer within {request.timeout:g} s; it may be "
            f"waiting on {_awaited(request.cmd)}, or raise --timeout"
        )
    if isinstance(error, (TimeoutError, CancelledError)):
        return (
            f"no answer from {url} within {request.timeout:g} s; "
            "check the gateway is running and reachable, or raise --timeout"
        )
    return None


def _closed_early(error: ConnectionClosed, request: Request) -> str:
    """
    Why the connection ended before an answer: the gateway's close code
    (a refusal, L{_policy_violation}; a shutdown), a TLS handshake that
    failed (L{_tls_failure}), a head too large (L{AnswerHeadTooLarge}),
    the server's answer to the handshake (L{_handshake_answer}), or else
    how it closed (L{_dropped}).
    """
    url = request.url
    if error.code == POLICY_VIOLATION:
        return _policy_violation(error.reason, url)
    if error.code == GOING_AWAY:
        return f"the gateway at {url} is shutting down (close code 1001); try again once it is back"
    if isinstance(error.cause, CertificateError):
        why = printable(str(error.cause).rstrip("."), QUOTED_MAX * 2)
        return (
            f"TLS handshake with {url} failed: the server's certificate cannot be checked for "
            f"{parse_url(url)[1]}: {why}; give the server a certificate whose subjectAltName names are valid, "
            "one of them this host; nothing was sent"
        )
    if is_tls_error(error.cause):
        return _tls_failure(error.cause, error.certificates, request)
    if isinstance(error.cause, AnswerHeadTooLarge):
        return (
            f"{url} answered the WebSocket handshake with a head too large: its status line and headers "
            f"passed {MAX_HEAD_BYTES // 1024} KiB, and openclawctl stopped reading (an OpenClaw gateway's is "
            f"some 200 bytes: check the URL): {printable(_status_line(error.received))}"
        )
    said = _handshake_answer(error, url)
    if said is not None:
        return said
    return _dropped(error, url)


def _handshake_answer(error: ConnectionClosed, url: str) -> str | None:
    """
    What to say about what the server sent in answer to the handshake,
    when it was not the gateway's: an HTTP answer (L{_http_answer}, a
    status Autobahn refused with, L{_unread_http_answer}), or what is not
    HTTP (nor TLS); None when it sent nothing, or no more than may be
    the start of an HTTP answer or of a TLS record.
    """
    head = None if error.opened else answer_head(error.received)
    said = _http_answer(head, url) if head is not None else None
    if said is not None:
        return said
    status = _HTTP_REFUSAL.search(str(error.reason))
    if status is not None and status["status"] == "404":
        return _not_found(url, status["reason"], b"")
    if status is not None:
        # The server spoke HTTP, so TLS is not the matter; its reason
        # (a lockout's "retry in N s", for instance) says what is:
        # as the server sent it (UTF-8), which Autobahn reads as Latin-1.
        reason = head.reason if head is not None and head.status == status["status"] else status["reason"]
        return (
            f"{url} refused the WebSocket handshake with HTTP {printable(status['status'])}: "
            f"{printable(reason) or 'no reason given'}"
        )
    unread = _unread_http_answer(error, url)
    if unread is not None:
        # HTTP too, so no question about TLS either.
        return unread
    if not (error.opened or may_be_http(error.received) or _may_be_tls(error.received)):
        shown = _status_line(error.received[:QUOTED_MAX])
        return (
            f"{url} answered the WebSocket handshake with what is not HTTP ({printable(shown, QUOTED_MAX)}): "
            "the server does not speak HTTP or WebSocket; check the URL's port (the gateway's control plane: "
            "WS_CONTROL_PORT, default 18789)"
        )
    return None


def _dropped(error: ConnectionClosed, url: str) -> str:
    """
    The connection's close code and reason, and, when it was dropped
    before the WebSocket handshake completed with no more said, whether
    the URL's scheme matches the listener (TLS or plain).
    """
    closed = f"the connection to {url} closed before an answer (code {error.code}: {printable(str(error.reason))})"
    if (
        error.code == WebSocketProtocol.CLOSE_STATUS_CODE_ABNORMAL_CLOSE
        and not error.opened
        and url.startswith(("ws:", "wss:"))
    ):
        # Dropped before the WebSocket handshake completed, with no HTTP
        # answer and no TLS error named: most likely TLS spoken to a
        # plain listener, or the reverse.
        other = "a plain listener takes ws://" if url.startswith("wss:") else "then use wss://"
        return f"{closed}, before the WebSocket handshake completed: is the control listener TLS? ({other})"
    return closed


def explain_failure(error: BaseException, request: Request) -> str:
    """
    Why no answer came, and what to check: the operator's next step.
    """
    url = request.url
    path = unix_socket_path(url)
    if path is not None and isinstance(error, ConnectError):
        return f"cannot connect to {url}: {_unix_connect_failure(path, error)}"
    unreached = _unreached(error, request)
    if unreached is not None:
        return unreached
    if isinstance(error, ConnectionClosed):
        return _closed_early(error, request)
    if isinstance(error, ConnectError):
        return f"cannot connect to {url}: {error}"
    if isinstance(error, ValueError):
        return f"{url} did not answer like an OpenClaw gateway: {printable(str(error))}"
    return f"talking to {url} failed: {printable(repr(error))}"
