"""
The path of one control message: parse, authenticate, dispatch to the
commands (L{openclaw.control.commands}), answer, and account for it in the
audit log.  No reactor and no socket: the WebSocket protocol
(L{openclaw.control.protocol}) hands it bytes and sends back what it returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import attrs
import orjson
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from openclaw.consumers.audit import audit_fields, note_result, without_keys
from openclaw.control.commands import (
    AUDITED,
    CONSUMER_COMMANDS,
    FENCED,
    MAX_LOGGED_CMD_CHARS,
    STATE_CHANGING,
    Audited,
    CommandError,
    ControlCommands,
    Result,
    cluster_refusal,
    quoted,
    summarise,
)
from openclaw.logs import STALE_TOKEN_FIELD
from openclaw.metrics import INVALID, GatewayMetrics
from openclaw.session import GENUINE_REFUSALS, MISSING, SessionAuthority, TokenRejected


def from_peer(proxy: str | None) -> tuple[str, dict[str, str]]:
    """
    How a log line names a connection's client: C{"from {peer}"}, and
    C{" through proxy {proxy}"} with the C{proxy} field when it came
    through a trusted proxy.

    @return: the words (a format string) and the fields to log with them.
    """
    if proxy is None:
        return "from {peer}", {}
    return "from {peer} through proxy {proxy}", {"proxy": proxy}


#: orjson's reasons for JSON it does not read, by their words, and what
#: to send instead (L{unreadable_json}).
_PAST_WHAT_IS_READ = (
    ("depth limit", "nest at most 1024 levels"),
    ("infinity", "keep numbers within a double's range"),
    ("surrogate", "escape a character past U+FFFF as its whole surrogate pair"),
)


def unreadable_json(payload: bytes, error: orjson.JSONDecodeError) -> str:
    """
    What a message (C{payload}) that does not parse is told: not UTF-8
    (Autobahn refuses such a text message before it comes here: checked
    all the same), not JSON, or JSON past what the gateway reads (orjson's
    limits: 1024 levels of nesting, numbers within a double, no lone UTF-16
    surrogate), with orjson's reason and where it is (C{line 1 column 6
    (char 5)}), never the message itself.  orjson's reasons are told apart
    by their words, which the tests pin.
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"message is not UTF-8 (an invalid byte at offset {bad.start}): send JSON encoded as UTF-8"
    reason = str(error)
    for words, advice in _PAST_WHAT_IS_READ:
        if words in reason:
            return f"message is JSON past what the gateway reads ({reason}): {advice}"
    if text[error.pos : error.pos + 8].startswith(("NaN", "Infinity")):
        return (
            f"message is not valid JSON ({reason}): it holds NaN or Infinity, which JSON has no number for "
            "(RFC 8259 section 6); send a number or null there"
        )
    return f"message is not valid JSON ({reason})"


@attrs.define
class Connection:
    """
    What the control plane remembers about one open connection.
    """

    #: The client's address as logged ("203.0.113.9:51234"; behind a
    #: TRUSTED_PROXIES proxy, the address it named, "203.0.113.9").
    peer: str
    #: Behind a TRUSTED_PROXIES proxy, the proxy's address and port
    #: ("127.0.0.1:50412"), logged in the C{proxy} field; else None.
    proxy: str | None = None
    #: Messages in a row that did not authenticate (bad token, or, before
    #: the connection authenticated, no well-formed message to carry one);
    #: reset by a good token.
    failed_auths: int = 0
    #: Whether a message of it has carried a good token: its malformed
    #: messages are then an operator's mistakes, answered but not counted
    #: as failed authentications (nor towards its address's lockout).
    authenticated: bool = False
    #: What its close at AUTH_TIMEOUT_SECONDS says (L{_refusal_close_reason})
    #: when the last token it sent was one the gateway signed
    #: (L{GENUINE_REFUSALS <openclaw.session.GENUINE_REFUSALS>}: expired,
    #: replaced, not known here yet) and no guess came since: that close
    #: is then no failed authentication either (a dashboard kept open
    #: with the token a renewal replaced was closed at each deadline, and
    #: each close locked its address out a step further).  None otherwise.
    genuine_refusal: str | None = None
    #: Tokens of the gateway's own (expired, replaced, not known here yet)
    #: it sent in a row: no failed authentications, but past
    #: MAX_AUTH_FAILURES it is closed all the same
    #: (L{ControlPlane.too_many_stale}), not counted toward the lockout,
    #: so that such a token (one from an old log or backup) does not buy
    #: an unbounded run of refusals, each a log line.
    stale_refusals: int = 0


# orjson rather than the standard library's json: parsing and encoding are
# most of the gateway's own work per message (bench/README.rst), and it is
# stricter: invalid UTF-8, NaN and Infinity are refused (RFC 8259).
_encode = orjson.dumps


#: An answer to an authenticated command: the encoded answer, its outcome
#: (C{ok} or C{error}), and what its audit line adds (L{Audited}; for an
#: error, the C{error} told to the client), if anything.
_Answered = tuple[bytes, str, Mapping[str, str] | None]


#: How to ask a command for a shorter answer (L{ControlPlane._succeeded}).
_ASK_FOR_LESS = MappingProxyType(
    {
        "consumer_list": "one consumer at a time: consumer_list {name}",
        "usage": "a narrower one: usage with name, since and until, or another group_by",
    }
)


#: Fields of a cut answer that are never cut themselves: a new key or
#: token must reach the client whole (L{ControlPlane._cut}).
_SHORT = frozenset({"key", "token"})

#: The answer when nothing of it fits MAX_MESSAGE_BYTES.
_UNFIT = "the answer is longer than MAX_MESSAGE_BYTES allows, even cut; raise MAX_MESSAGE_BYTES"


#: What a command cut short by the stop is told (L{ControlPlane._failed}):
#: its wait outlasted SHUTDOWN_GRACE_SECONDS (a file write on a slow
#: disk, the consumers' database, a provider).
_CUT_SHORT_ANY = (
    "the gateway is stopping and {cmd} was not answered within SHUTDOWN_GRACE_SECONDS: whether it took effect "
    "is not known; check once the gateway is back"
)
_CUT_SHORT = MappingProxyType(
    {
        "switch_provider": (
            "the gateway is stopping and switch_provider was not answered within SHUTDOWN_GRACE_SECONDS: its save "
            "(to the state file, or in a cluster to the cluster store) may not have been made, and the gateway, "
            "started again, may go back to the route saved before: check with status then"
        ),
        "rotate_token": (
            "the gateway is stopping and rotate_token was not answered within SHUTDOWN_GRACE_SECONDS: its new "
            "token may not have been written (to TOKEN_FILE, or in a cluster to the cluster store); the gateway, "
            "started again, issues or adopts a token (in TOKEN_FILE)"
        ),
    }
)


def _cut_text(text: str, room: int) -> str:
    """
    C{text} cut to at most C{room} bytes of UTF-8 (never inside a
    character), marked as cut when it was.
    """
    data = text.encode()
    if len(data) <= room:
        return text
    return data[:room].decode(errors="ignore") + "...(cut)"


def _refusal_close_reason(rejected: TokenRejected) -> str:
    """
    What a connection whose last token was refused for a genuine reason
    (L{GENUINE_REFUSALS}) is told as it is closed at AUTH_TIMEOUT_SECONDS:
    the refusal, and what to do (the refusal's own hint when it has one:
    C{token not known here yet}, a single gateway's own token expired).
    At most 123 bytes (RFC 6455 section 5.5).
    """
    told = str(rejected)
    if told != rejected.reason:
        return told
    return f"{rejected.reason}: reconnect with the current token (TOKEN_FILE, or the gateway's banner)"


class ControlPlane:
    """
    The path of one control message: parse, authenticate, dispatch, answer,
    and account for it in the audit log.

    @param log: the logger for the audit trail.  C{ping} and C{status} are
        logged at debug level only, and only when C{debug} is set: they
        are the control plane's hot path, where even an event the log
        observer then drops has a cost (see bench/README.rst).
    @param instance: in a cluster, this instance's id: the audit line of a
        state-changing command names the instance that ran it (the others
        log that they applied the change).
    @param max_answer_bytes: the longest answer a WebSocket message may
        carry (C{MAX_MESSAGE_BYTES}: Autobahn refuses to send a longer
        one); a longer answer is an error saying how to ask for less, or,
        for a change already made, cut (L{_cut}); a longer error is cut
        (L{_error}): never dropped.
    @param fence: in a cluster, what a state-changing command the store
        does not write itself (L{FENCED}) waits on first: the store's word
        that this instance holds the cluster's session token
        (L{openclaw.cluster.node.ClusterNode.fence}); L{None}: none.
    """

    def __init__(
        self,
        sessions: SessionAuthority,
        commands: ControlCommands,
        log: Logger,
        clock: Callable[[], float] = time.monotonic,
        debug: bool = False,
        max_auth_failures: int = 5,
        metrics: GatewayMetrics | None = None,
        instance: str | None = None,
        max_answer_bytes: int = 0,
        fence: Callable[[], Deferred[None]] | None = None,
    ) -> None:
        self.max_auth_failures = max_auth_failures
        self._max_answer_bytes = max_answer_bytes
        #: In a cluster, this instance's id (L{None} outside one); the
        #: gateway sets it again once twistd has daemonized (its pid).
        self.instance = instance
        self._audit_line = (
            "{cmd} from {peer} (token {jti}): {outcome} in {duration_ms:.1f} ms"
            if instance is None
            else "{cmd} from {peer} (token {jti}) on instance {instance}: {outcome} in {duration_ms:.1f} ms"
        )
        self._fence = fence
        self._in_flight: set[Deferred[bytes]] = set()
        self._draining = False
        self._sessions = sessions
        self._table = commands.table()
        self._names = ", ".join(self._table)
        self._metrics = metrics or GatewayMetrics(self._table, ())
        #: The count of each command answered C{ok}, for the high-rate ones.
        self._answered_ok = self._metrics.commands_answered("ok")
        self._log = log
        self._clock = clock
        self._debug = debug

    def handle(self, payload: bytes, connection: Connection) -> bytes | Deferred[bytes]:
        """
        Answer one text message.

        @return: the encoded answer, or (for a command that waits on
            something) a Deferred firing with it; it never fails.
        """
        peer = connection.peer
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError as e:
            if not connection.authenticated:
                # No token in it: an authentication failure like any other.
                self._auth_failed(connection, MISSING, None)
            return self._refuse(None, unreadable_json(payload, e))
        if type(message) is not dict:
            if not connection.authenticated:
                self._auth_failed(connection, MISSING, None)
            return self._refuse(None, 'message must be a JSON object: {"token", "cmd", "data"}')
        cmd = message.get("cmd")
        try:
            jti = self._sessions.verify(message.get("token"))
        except TokenRejected as rejected:
            if rejected.reason in GENUINE_REFUSALS:
                # Signed here (expired, replaced, or the cluster's newest
                # not applied here yet): no guess, not counted; bounded
                # all the same (too_many_stale).
                connection.genuine_refusal = _refusal_close_reason(rejected)
                connection.stale_refusals += 1
                self._auth_failed(connection, rejected.reason, cmd, counted=False)
            else:
                self._auth_failed(connection, rejected.reason, cmd)
            return self._refuse(cmd, str(rejected))
        if connection.failed_auths or connection.stale_refusals:
            connection.failed_auths = connection.stale_refusals = 0
        connection.authenticated = True
        if type(cmd) is not str:
            return self._refuse(None, f"cmd must be a string: one of {self._names}")
        handler = self._table.get(cmd)
        if handler is None:
            return self._refuse(cmd, f"unknown command {quoted(cmd)}; use one of {self._names}")
        if self._draining:
            return self._refuse(cmd, "the gateway is shutting down; reconnect when it is back")

        audited = cmd in AUDITED
        # Only audited commands are timed: the others' answers say nothing
        # of how long they took, and they are the high-rate ones.
        started = self._clock() if audited else 0.0
        # Which consumer, key and fields a consumer command (all audited) concerns.
        fields = audit_fields(cmd, message.get("data")) if audited and cmd in CONSUMER_COMMANDS else None
        if audited and connection.proxy is not None:
            fields = {**(fields or {}), "proxy": connection.proxy}
        try:
            if self._fence is not None and cmd in FENCED:
                # In a cluster, only while this instance holds the cluster's
                # token: one stalled through a rotation would take a change
                # on the token it revoked.
                result: Any = self._fenced(handler, message.get("data"))
            else:
                result = handler(message.get("data"))
        except Exception:
            answer = self._failed(Failure(), cmd)
        else:
            # A result is a dict, or a Deferred firing with one (an
            # isinstance check against Deferred, an ABC, is the slower).
            if type(result) is not dict and isinstance(result, Deferred):
                if fields is not None:
                    result.addCallback(note_result, fields)
                pending = result.addCallbacks(
                    self._succeeded, self._failed, callbackArgs=(cmd,), errbackArgs=(cmd,)
                ).addCallback(self._audit, cmd, peer, jti, started, fields)
                return self._track(pending)
            if fields is not None:
                note_result(result, fields)
            if not audited and not self._debug:
                # The common case (ping, status): answered and counted, no
                # log event to build.
                encoded = _encode({"ok": True, "cmd": cmd, "result": result})
                if len(encoded) <= self._max_answer_bytes or not self._max_answer_bytes:
                    self._answered_ok[cmd].inc()
                    return encoded
            answer = self._succeeded(result, cmd)
        return self._audit(answer, cmd, peer, jti, started, fields)

    def _fenced(self, handler: Callable[[object], Any], data: object) -> Deferred[Any]:
        """
        C{handler} called with C{data} once the fence allows it (L{FENCED}
        commands, in a cluster), or the refusal the fence failed with.
        """
        assert self._fence is not None
        return self._fence().addCallbacks(lambda _: handler(data), cluster_refusal)

    def _auth_failed(self, connection: Connection, reason: str, cmd: object, counted: bool = True) -> None:
        """
        Count and log one authentication failure of C{connection} (a
        token refused for C{reason}, or a message before authentication
        with no token at all), with the proxy it came through if any.
        Not C{counted} toward the connection's failures in a row (and so
        its close and its address's lockout): a token the gateway signed,
        expired or replaced (L{GENUINE_REFUSALS
        <openclaw.session.GENUINE_REFUSALS>}), is no guess.
        """
        if counted:
            connection.failed_auths += 1
            connection.genuine_refusal = None
            connection.stale_refusals = 0
        # Counted first, and logged with a summary that cannot raise:
        # whatever the peer sent, the failure is accounted for.
        self._metrics.auth_failed(reason)
        who, fields = from_peer(connection.proxy)
        self._log.warn(
            "auth failure "
            + who
            + ": {reason} (cmd {cmd}, "
            + ("{failed_auths} in a row)" if counted else "a token of this gateway's: not counted toward the lockout)"),
            peer=connection.peer,
            reason=reason,
            cmd=summarise(cmd),
            outcome="auth_failed",
            failed_auths=connection.failed_auths,
            # Not counted: limited in the log as refused connections are
            # (logs.PEER_CAUSED_LINES), every one counted in the metric.
            **({} if counted else {STALE_TOKEN_FIELD: reason}),
            **fields,
        )

    def _refuse(self, cmd: object, message: str) -> bytes:
        self._metrics.command(cmd if isinstance(cmd, str) and cmd in self._table else INVALID, "error")
        # Echoed back for the client to match the answer with, unless it
        # is longer than any command (it may be megabytes long).
        return self._error(cmd if isinstance(cmd, str) and len(cmd) <= MAX_LOGGED_CMD_CHARS else None, message)

    def _track(self, pending: Deferred[bytes]) -> Deferred[bytes]:
        if pending.called:
            return pending
        self._in_flight.add(pending)

        def done(encoded: bytes) -> bytes:
            self._in_flight.discard(pending)
            return encoded

        return pending.addBoth(done)

    @property
    def in_flight(self) -> int:
        """
        How many commands are being carried out right now.
        """
        return len(self._in_flight)

    def drain(self) -> Deferred[Any]:
        """
        Refuse new commands from now on; fire once the ones in flight have
        been answered.
        """
        self._draining = True
        # Not Outstanding: cancelling this wait (grace over) must cancel the commands, answered cut short.
        return DeferredList(list(self._in_flight), consumeErrors=True)

    def too_many_failures(self, connection: Connection) -> bool:
        """
        Whether a connection has failed to authenticate too often in a row
        and must be closed: guessing tokens is not free.
        """
        return connection.failed_auths >= self.max_auth_failures

    def too_many_stale(self, connection: Connection) -> bool:
        """
        Whether a connection has sent tokens of the gateway's own (expired,
        replaced, not known here yet) MAX_AUTH_FAILURES times in a row and
        must be closed (saying what to do: L{_refusal_close_reason}), not
        counted toward the lockout: no guess, but no client to serve
        either.
        """
        return connection.stale_refusals >= self.max_auth_failures

    def _succeeded(self, result: Result | Audited, cmd: str) -> _Answered:
        fields = None
        if isinstance(result, Audited):
            fields = result.fields
            result = result.result
        encoded = _encode({"ok": True, "cmd": cmd, "result": result})
        if not self._too_long(encoded):
            return encoded, "ok", fields
        if cmd in STATE_CHANGING:
            # Carried out already: never told as a failure.
            return self._cut(result, cmd, len(encoded)), "ok", {**(fields or {}), "answer": "cut"}
        less = _ASK_FOR_LESS.get(cmd)
        if cmd == "consumer_list" and len(result.get("consumers") or ()) <= 1:
            # One consumer already: there is no less to ask for.
            less = None
        message = (
            f"the answer ({len(encoded)} bytes) is longer than MAX_MESSAGE_BYTES ({self._max_answer_bytes}) allows; "
            + (f"ask for less ({less}), or raise MAX_MESSAGE_BYTES" if less else "raise MAX_MESSAGE_BYTES")
        )
        return self._error(cmd, message), "error", {**(fields or {}), "error": message}

    def _too_long(self, encoded: bytes) -> bool:
        """
        Whether an encoded answer is longer than MAX_MESSAGE_BYTES (never,
        without a limit).
        """
        return 0 < self._max_answer_bytes < len(encoded)

    def _cut(self, result: Result, cmd: str, length: int) -> bytes:
        """
        The answer of a state-changing command, carried out, whose whole
        answer (C{length} bytes) is longer than MAX_MESSAGE_BYTES, cut to
        fit it, in bytes: its fields that are not objects or lists (a key,
        a token, a name; at least 1024 bytes fit:
        L{openclaw.settings.values.MIN_MESSAGE_BYTES}), with a warning naming
        those left out, first; should they not fit, their texts cut too (a
        new key or token never); should even that not fit, only its key or
        token and the warning L{_UNFIT}.  Never nothing.
        """
        kept = {name: value for name, value in result.items() if not isinstance(value, (dict, list))}
        left_out = ", ".join(sorted(result.keys() - kept.keys()))
        said = (
            f"the answer ({length} bytes) is longer than MAX_MESSAGE_BYTES ({self._max_answer_bytes}) allows: "
            f"the change was made; left out: {left_out or '-'} (consumer_list shows a consumer)"
        )
        earlier = kept.get("warning")
        # First, so that it stays should the warning be cut.
        kept["warning"] = said if not earlier else f"{said}; {earlier}"
        encoded = _encode({"ok": True, "cmd": cmd, "result": kept})
        if not self._too_long(encoded):
            return encoded
        room = max(self._max_answer_bytes // 4, 128)
        cut = {
            name: value if name in _SHORT or not isinstance(value, str) else _cut_text(value, room)
            for name, value in kept.items()
            # A tuple is a JSON array too.
            if not isinstance(value, tuple)
        }
        encoded = _encode({"ok": True, "cmd": cmd, "result": cut})
        if not self._too_long(encoded):
            return encoded
        short = {name: value for name, value in cut.items() if name in _SHORT}
        return _encode({"ok": True, "cmd": cmd, "result": {**short, "warning": _UNFIT}})

    def _error(self, cmd: str | None, message: str) -> bytes:
        """
        The encoded error answer C{{"ok": false, "cmd": cmd, "error":
        message}}, cut to fit MAX_MESSAGE_BYTES, in bytes: then C{cmd} is
        L{None} if longer than L{MAX_LOGGED_CMD_CHARS} bytes, and the
        message cut to half the limit, saying so; should even that not fit,
        the message is L{_UNFIT}.  Never nothing.
        """
        encoded = _encode({"ok": False, "cmd": cmd, "error": message})
        if not self._too_long(encoded):
            return encoded
        if cmd is not None and len(cmd.encode()) > MAX_LOGGED_CMD_CHARS:
            cmd = None
        cut = _cut_text(message, self._max_answer_bytes // 2) + " (cut to fit MAX_MESSAGE_BYTES)"
        encoded = _encode({"ok": False, "cmd": cmd, "error": cut})
        return encoded if not self._too_long(encoded) else _encode({"ok": False, "cmd": cmd, "error": _UNFIT})

    def _failed(self, failure: Failure, cmd: str) -> _Answered:
        """
        The error answer to a command that failed, with the C{error} its
        audit line records: the message the client is told, any consumer
        key in it cut to what logs show of one.
        """
        if failure.check(CommandError):
            message = str(failure.value)
        elif self._draining and failure.check(CancelledError):
            # Cut short by the stop (SHUTDOWN_GRACE_SECONDS over): no fault
            # of the gateway's; its audit line (every command that waits is
            # audited) says it, else this one.
            message = _CUT_SHORT.get(cmd, _CUT_SHORT_ANY).format(cmd=cmd)
            if cmd not in AUDITED:
                self._log.warn("command {cmd} was cut short by the gateway's stop: {error}", cmd=cmd, error=message)
        else:
            self._log.failure("command {cmd} failed unexpectedly", failure, cmd=cmd)
            message = "internal error; the gateway log has the details"
        return self._error(cmd, message), "error", {"error": without_keys(message)}

    def _audit(
        self,
        answer: _Answered,
        cmd: str,
        peer: str,
        jti: str,
        started: float,
        fields: dict[str, str] | None = None,
    ) -> bytes:
        encoded, outcome, changed = answer
        self._metrics.command(cmd, outcome)
        if cmd in AUDITED:
            if changed:
                fields = {**(fields or {}), **changed}
            took = self._clock() - started
            self._metrics.command_took(cmd, took)
            line = self._audit_line
            if fields:
                line += "".join(f" {name}={{{name}}}" for name in fields)
            self._log.info(
                line,
                cmd=cmd,
                peer=peer,
                jti=jti,
                outcome=outcome,
                duration_ms=round(took * 1000, 2),
                **({} if self.instance is None else {"instance": self.instance}),
                **(fields or {}),
            )
        elif self._debug:
            self._log.debug(
                "{cmd} from {peer} (token {jti}): {outcome}",
                cmd=cmd,
                peer=peer,
                jti=jti,
                outcome=outcome,
            )
        return encoded
