"""
What one invocation of C{openclawctl} asks, and what comes back: the
L{Request} resolved from the command line (with the defaults it is
resolved with, and L{UsageError} for a command line that cannot be acted
on), the forms of its C{--url} (C{ws://}, C{wss://}, C{unix:PATH}), and
the L{Reply} as received.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

PROG = "openclawctl"
DEFAULT_URL = "ws://127.0.0.1:18789"
DEFAULT_TIMEOUT = 10.0
#: health_check waits for every provider's probe (HEALTH_CHECK_TIMEOUT each,
#: 5 s by default, plus queueing behind a probe already in flight).
HEALTH_CHECK_TIMEOUT = 30.0
TOKEN_VARIABLE = "OPENCLAW_TOKEN"
#: The environment variable whose value is the default C{--url}.
URL_VARIABLE = "OPENCLAW_URL"


class UsageError(Exception):
    """
    The command line cannot be acted on; the message says what to change.
    """


@attrs.frozen
class Request:
    """
    One fully resolved invocation: what to send where, and how to report it.
    """

    url: str
    cmd: str
    data: dict[str, Any] | None
    token: str = attrs.field(repr=False)
    token_file: Path | None
    as_json: bool
    timeout: float
    cafile: Path | None
    #: The token was read from C{token_file} (not given by --token or the
    #: environment).
    token_from_file: bool = False
    #: Lines for stderr before the exchange (C{openclawctl: warning: ...}),
    #: about the command line: a token file others may read
    #: (L{openclaw.ctl.cli.token_file_warning}).
    warnings: tuple[str, ...] = ()

    def message(self) -> bytes:
        message: dict[str, Any] = {"token": self.token, "cmd": self.cmd}
        if self.data is not None:
            message["data"] = self.data
        return json.dumps(message).encode("utf-8")


@attrs.frozen
class Reply:
    """
    The gateway's answer as received, and how long it took to come.
    """

    payload: bytes
    round_trip: float


#: The scheme of C{--url unix:/run/openclaw/control.sock}: the gateway's
#: C{--listen unix:PATH} listener.
UNIX_SCHEME = "unix:"
#: The WebSocket URL spoken over a UNIX socket (RFC 6455 needs one: its
#: host becomes the C{Host} header).
UNIX_WEBSOCKET_URL = "ws://localhost"


def unix_socket_path(url: str) -> str | None:
    """
    The socket path of a C{unix:PATH} URL (C{unix:///PATH} too), None for
    any other URL.
    """
    if not url.startswith(UNIX_SCHEME):
        return None
    path = url[len(UNIX_SCHEME) :]
    return path[2:] if path.startswith("///") else path


def websocket_url(url: str) -> str:
    """
    The URL the WebSocket handshake names: C{--url} itself, or
    L{UNIX_WEBSOCKET_URL} over a UNIX socket.
    """
    return UNIX_WEBSOCKET_URL if unix_socket_path(url) is not None else url
