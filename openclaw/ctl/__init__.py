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

The modules, each with one job:

- L{request<openclaw.ctl.request>}: what one invocation asks (a
  L{Request}, the forms of its URL) and what comes back (a L{Reply}).
- L{cli<openclaw.ctl.cli>}: the command line: the argument parser, the
  token chosen, the checks made before connecting (L{parse_request}).
- L{client<openclaw.ctl.client>}: the exchange: the endpoint to the URL
  and the Autobahn client protocol that sends the command (L{exchange}).
- L{answer<openclaw.ctl.answer>}: the answer decoded and checked, a
  rotated token saved to C{--token-file} (L{conclude}).
- L{show<openclaw.ctl.show>}: what is printed: the server's text made
  safe for a terminal, each answer formatted, the exit status (L{render}).
- L{diagnose<openclaw.ctl.diagnose>}: why no answer came, and what to do
  (L{explain_failure}).
- L{log<openclaw.ctl.log>}: Twisted's and Autobahn's log, one line per
  error (L{OneLineLog}).

This module runs them (L{main}, the console script) and re-exports their
public names.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from twisted.internet.task import react
from twisted.logger import globalLogBeginner

from openclaw.consumers.model import usd
from openclaw.ctl.answer import check_answer, conclude, decode_answer, holds_token, save_token
from openclaw.ctl.cli import (
    CLEAR,
    CLEARED,
    CommandLineParser,
    build_parser,
    choose_token,
    consumer_request,
    dash_hint,
    parse_request,
    token_file_warning,
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
    exchange_pages,
    may_be_http,
)
from openclaw.ctl.diagnose import (
    LOCATION_SHOWN,
    AnswerHead,
    answer_head,
    explain_failure,
)
from openclaw.ctl.log import AUTOBAHN_CLIENT_NAMESPACE, OneLineLog
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
from openclaw.reactors import IClientReactor
from openclaw.tls import NAMES_SHOWN, certificate_names

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
    "exchange_pages",
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
    "token_file_warning",
    "unix_socket_path",
    "usd",
    "websocket_url",
]


async def _run(reactor: IClientReactor, request: Request) -> None:
    try:
        reply = await exchange_pages(reactor, request)
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
    for warning in request.warnings:
        sys.stderr.write(f"{PROG}: warning: {warning}\n")
    globalLogBeginner.beginLoggingTo([OneLineLog(sys.stderr)], redirectStandardIO=False)
    react(_run, (request,))
