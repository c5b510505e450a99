"""
C{openclawctl}: the gateway's command-line client.

One invocation is one control-plane command: connect, send
C{{"token", "cmd", "data"}}, wait for the one answer, close, and turn the
answer into output and an exit status.  Everything but the exchange itself
is a plain function (parsing arguments, choosing the token, formatting,
mapping outcomes to exit codes), so it is tested without a reactor; the
protocol only sends the message and hands back what came back.

Exit status: 0 when the gateway answered C{ok: true}, 1 when it answered
C{ok: false} (its error goes to stderr), 2 when there was no answer to judge
(bad usage, no token, no connection, refused peer, timeout, an answer
that is not the gateway's answer to the command asked).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import attrs
from autobahn.twisted.websocket import WebSocketClientProtocol
from service_identity import CertificateError
from twisted.internet.task import react
from twisted.logger import ILogObserver, LogEvent, LogLevel, PredicateResult, formatEvent, globalLogBeginner
from twisted.python.failure import Failure
from zope.interface import implementer

from openclaw.consumers.model import usd
from openclaw.ctl.cli import (
    CLEAR,
    CLEARED,
    CommandLineParser,
    build_parser,
    choose_token,
    consumer_request,
    dash_hint,
    parse_request,
)
from openclaw.ctl.client import (
    MAX_HEAD_BYTES,
    AnswerHeadTooLarge,
    ConnectionClosed,
    KeepsPeerCertificates,
    NotHTTP,
    OneCommand,
    OneCommandFactory,
    Unanswered,
    client_endpoint,
    exchange,
    may_be_http,
)
from openclaw.ctl.diagnose import (
    LOCATION_SHOWN,
    NAMES_SHOWN,
    AnswerHead,
    answer_head,
    certificate_names,
    explain_failure,
)
from openclaw.ctl.request import (
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    HEALTH_CHECK_TIMEOUT,
    PROG,
    TOKEN_VARIABLE,
    UNIX_SCHEME,
    UNIX_WEBSOCKET_URL,
    Reply,
    Request,
    UsageError,
    unix_socket_path,
    websocket_url,
)
from openclaw.ctl.show import (
    FAILED,
    NO_ANSWER,
    OK,
    PRINTED_MAX,
    QUOTED_MAX,
    Report,
    describe_error,
    exit_code,
    format_consumers,
    format_duration,
    format_health,
    format_milliseconds,
    format_ping,
    format_provider_states,
    format_rotation,
    format_status,
    format_switch,
    format_usage,
    printable,
    printable_json,
    printable_tree,
    render,
)
from openclaw.files import OwnerNotKept
from openclaw.logs import PeerTLSErrors
from openclaw.reactors import IClientReactor
from openclaw.session import MAX_TOKEN_FILE_BYTES, UnsafeTokenFile, read_token_file, write_token_file

__all__ = [
    "AUTOBAHN_CLIENT_NAMESPACE",
    "CLEAR",
    "CLEARED",
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "FAILED",
    "HEALTH_CHECK_TIMEOUT",
    "LOCATION_SHOWN",
    "MAX_HEAD_BYTES",
    "NAMES_SHOWN",
    "NO_ANSWER",
    "OK",
    "PRINTED_MAX",
    "PROG",
    "QUOTED_MAX",
    "TOKEN_VARIABLE",
    "UNIX_SCHEME",
    "UNIX_WEBSOCKET_URL",
    "AnswerHead",
    "AnswerHeadTooLarge",
    "CommandLineParser",
    "ConnectionClosed",
    "KeepsPeerCertificates",
    "NotHTTP",
    "OneCommand",
    "OneCommandFactory",
    "OneLineLog",
    "Reply",
    "Report",
    "Request",
    "Unanswered",
    "UsageError",
    "answer_head",
    "build_parser",
    "certificate_names",
    "check_answer",
    "choose_token",
    "client_endpoint",
    "conclude",
    "consumer_request",
    "dash_hint",
    "decode_answer",
    "describe_error",
    "exchange",
    "exit_code",
    "explain_failure",
    "format_consumers",
    "format_duration",
    "format_health",
    "format_milliseconds",
    "format_ping",
    "format_provider_states",
    "format_rotation",
    "format_status",
    "format_switch",
    "format_usage",
    "holds_token",
    "main",
    "may_be_http",
    "parse_request",
    "printable",
    "printable_json",
    "printable_tree",
    "render",
    "save_token",
    "unix_socket_path",
    "usd",
    "websocket_url",
]


# -- arguments -----------------------------------------------------------


# -- answers -------------------------------------------------------------


def decode_answer(payload: bytes) -> dict[str, Any]:
    """
    The answer as an object with a boolean C{ok}.

    @raise ValueError: it is not one: whatever answered is not an OpenClaw
        gateway (or not this version of one).
    """
    try:
        # UTF-8 as RFC 8259 section 8.1 says (json.loads would take UTF-16
        # and UTF-32 bytes too, which --json then could not print).
        answer = json.loads(payload.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"the answer is not JSON: {printable(repr(payload[:PRINTED_MAX]))}") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise ValueError(f'the answer has no "ok": {printable(repr(payload[:PRINTED_MAX]))}')
    if answer["ok"] and not isinstance(answer.get("result"), dict):
        raise ValueError(f'the answer has no "result" object: {printable(repr(payload[:PRINTED_MAX]))}')
    return answer


#: What a session token is: a JWT, three base64url segments (RFC 7519
#: section 3; the gateway's rule for what its TOKEN_FILE may hold,
#: L{openclaw.session.check_token_file}).
_TOKEN = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def check_answer(request: Request, answer: Mapping[str, Any]) -> None:
    """
    Whether C{answer} (L{decode_answer}'s) answers C{request}: its
    C{"cmd"} is the command asked (a refusal may have none: the gateway
    gives none to a message it could not read); a C{ping}'s result says
    C{"pong": true}; a C{rotate_token}'s C{"token"} is a token (a JWT,
    at most L{MAX_TOKEN_FILE_BYTES}), as it is written to C{--token-file}
    and read back from it.

    @raise ValueError: it does not: whatever answered is not an OpenClaw
        gateway, or not answering this command; nothing was written.
    """
    cmd = answer.get("cmd")
    if cmd != request.cmd and (answer["ok"] or cmd is not None):
        raise ValueError(f'the answer is to {printable(repr(cmd), QUOTED_MAX)}, not to {request.cmd!r} (its "cmd")')
    if not answer["ok"]:
        return
    result = answer["result"]
    if request.cmd == "ping" and result.get("pong") is not True:
        raise ValueError(f'the answer to ping does not say "pong": true: {printable(repr(result), QUOTED_MAX)}')
    if request.cmd == "rotate_token":
        token = result.get("token")
        if not (isinstance(token, str) and _TOKEN.fullmatch(token) and len(token) < MAX_TOKEN_FILE_BYTES):
            kept = f"; nothing was written to {request.token_file}" if request.token_file is not None else ""
            raise ValueError(
                f'its new "token" is not a token (three base64url segments, as a JWT): '
                f"{printable(repr(token), QUOTED_MAX)}{kept}"
            )


# -- the exchange ----------------------------------------------------------


def holds_token(token_file: Path, token: str) -> bool:
    """
    Whether C{token_file} already holds C{token} (and at most a newline),
    as a gateway's C{TOKEN_FILE} does once it has answered the rotation:
    read as the gateway reads it (L{openclaw.session.read_token_file});
    False when it cannot be read.
    """
    try:
        held = read_token_file(token_file)
    except (OSError, UnsafeTokenFile):
        return False
    # Read as choose_token reads it (stripped: a CRLF or a trailing space
    # of a file written by hand).
    return held is not None and held.strip() == token.encode("utf-8")


def save_token(token_file: Path, token: str, presented: str | None = None) -> bool:
    """
    Write a rotated C{token} to C{token_file}: nothing to do when it holds
    it already (the gateway's own C{TOKEN_FILE}, which the gateway rewrote
    before answering: left as the gateway wrote it); otherwise replaced
    atomically, mode 0600, keeping the owner and group of the file there
    (L{openclaw.session.write_token_file}'s C{keep_owner}), so root
    rotating with the C{TOKEN_FILE} of a gateway that runs as another user
    leaves that user able to read it.

    @param presented: the token the rotation was asked with, when it was
        read from C{token_file}: a file that holds neither it nor C{token}
        now was rewritten since by the gateway, with a newer token (another
        rotation, a cluster's renewal), and is left as it is.
    @return: whether C{token_file} holds C{token} now (False: a newer one).
    @raise openclaw.files.OwnerNotKept: the file there is another user's
        and this user may not give the new one to it; it is left as it was.
    @raise OSError: it cannot be written; it is left as it was.
    """
    if holds_token(token_file, token):
        return True
    if presented is not None and not holds_token(token_file, presented) and token_file.exists():
        return False
    write_token_file(token_file, token, keep_owner=True)
    return True


def conclude(request: Request, reply: Reply) -> Report:
    """
    Judge the answer; for a rotation with a token file, save the new token
    there first (L{save_token}; and say so loudly if that fails: the old
    token is dead).

    @raise ValueError: the answer is not one (L{decode_answer}), or not
        to this command (L{check_answer}); nothing was saved.
    """
    answer = decode_answer(reply.payload)
    check_answer(request, answer)
    saved_to = None
    save_error = note = None
    if answer["ok"] and request.cmd == "rotate_token" and request.token_file is not None:
        failed = f"{PROG}: error: the token was rotated but writing it to {request.token_file} failed"
        keep = "the new token is on stdout: keep it"
        try:
            presented = request.token if request.token_from_file else None
            if save_token(request.token_file, answer["result"]["token"], presented):
                saved_to = request.token_file
            else:
                note = (
                    f"{PROG}: note: {request.token_file} was rewritten since with a newer token (by the gateway: "
                    "another rotation, or a renewal in a cluster), which replaced this one; it was left as it is: "
                    "use the token it holds"
                )
        except OwnerNotKept as e:
            save_error = (
                f"{failed}: it belongs to uid {e.uid}, and this user cannot give the new file to that user, so it "
                f"was left as it was; {keep}, and write it there as uid {e.uid}"
            )
        except OSError as e:
            save_error = f"{failed}: {e.strerror or e}; {keep}"
    return render(request, reply, answer, saved_to=saved_to, save_error=save_error, note=note)


async def _run(reactor: IClientReactor, request: Request) -> None:
    try:
        reply = await exchange(reactor, request)
        report = conclude(request, reply)
    except UsageError as e:
        _exit(Report("", f"{PROG}: error: {e}\n", NO_ANSWER))
    except Exception as e:
        _exit(Report("", f"{PROG}: error: {explain_failure(e, request)}\n", NO_ANSWER))
    _exit(report)


def _exit(report: Report) -> NoReturn:
    sys.stdout.write(report.stdout)
    sys.stderr.write(report.stderr)
    sys.stdout.flush()
    raise SystemExit(report.code)


#: The log namespace of Autobahn's WebSocket client protocol (txaio's
#: logger, named after the class that makes it), under which
#: L{OneCommand} logs, at error, a connection lost to a TLS error
#: (L{PEER_TLS_ERROR_PREFIX}), as the gateway's L{openclaw.logs} knows it
#: for the server protocol.
AUTOBAHN_CLIENT_NAMESPACE = f"{WebSocketClientProtocol.__module__}.{WebSocketClientProtocol.__name__}"


#: Autobahn's line for openclawctl's connection lost to a TLS error, as
#: the gateway's log knows it for its own connections.
_CLIENT_TLS_ERRORS = PeerTLSErrors((AUTOBAHN_CLIENT_NAMESPACE,))


@implementer(ILogObserver)
@attrs.frozen
class OneLineLog:
    """
    The log of Twisted and Autobahn, for the operator: each error as one
    line on C{stream} (L{printable}), an exception as its type and
    message, never a traceback.  Without it, Twisted prints an exception
    a library raised while reading the server's answer (an HTTP reason
    that is not UTF-8, in Autobahn) as C{Unhandled Error} and a
    traceback.  Less than errors (Autobahn's warning that it drops a
    connection whose handshake failed, which openclawctl explains in its
    own line) is not shown, nor Autobahn's error for a connection lost to
    a TLS error (L{AUTOBAHN_CLIENT_NAMESPACE}, L{PEER_TLS_ERROR_PREFIX}:
    C{SSL error: certificate verify failed (in )}): openclawctl's own line
    names the TLS error and what to do (L{explain_failure}), nor Twisted's
    for a certificate whose names service_identity cannot check (a
    C{CertificateError}: openclawctl refuses that server and says so).
    """

    stream: TextIO

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_level") not in (LogLevel.error, LogLevel.critical):
            return
        if _CLIENT_TLS_ERRORS(event) is PredicateResult.no:
            return
        # log_failure in a twisted.logger event, failure in a legacy
        # twisted.python.log one (log.err, as a transport logs what its
        # protocol raised).
        failure = event.get("log_failure", event.get("failure"))
        if isinstance(failure, Failure) and failure.check(CertificateError):
            # Twisted's log of a certificate it could not check the host
            # name against: openclawctl refuses it and says so itself.
            return
        if isinstance(failure, Failure):
            name = failure.type.__name__ if isinstance(failure.type, type) else str(failure.type)
            text = f"unexpected error: {name}: {failure.getErrorMessage()}"
        else:
            text = f"error: {formatEvent(event)}"
        self.stream.write(f"{PROG}: {printable(text)}\n")
        self.stream.flush()


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """
    The console script.  The command line is judged before the reactor
    starts; L{react} runs the one exchange and exits with its status.
    Twisted's log goes to stderr as L{OneLineLog}'s lines.
    """
    try:
        request = parse_request(sys.argv[1:] if argv is None else argv, os.environ)
    except UsageError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        raise SystemExit(NO_ANSWER) from None
    globalLogBeginner.beginLoggingTo([OneLineLog(sys.stderr)], redirectStandardIO=False)
    react(_run, (request,))
