"""
The command line: the argument parser of C{openclawctl} and its
subcommands, and the L{Request} built from what it parsed
(L{parse_request}): the command and its data, the token to present
(L{choose_token}), and the checks made before connecting, each failure a
L{UsageError} that says what to change.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from autobahn.websocket.util import parse_url

from openclaw.consumers.model import MAX_BUDGET_USD, MAX_PER_MINUTE, MIN_BUDGET_USD
from openclaw.ctl.request import (
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    HEALTH_CHECK_TIMEOUT,
    PROG,
    TOKEN_VARIABLE,
    URL_VARIABLE,
    Request,
    UsageError,
    unix_socket_path,
)
from openclaw.files import MAX_UNIX_PATH_BYTES, kind_of, read_regular_file
from openclaw.session import MAX_TOKEN_FILE_BYTES, UnsafeTokenFile, check_token_file, holds_a_token, token_text
from openclaw.settings.errors import InvalidValue
from openclaw.settings.permissions import open_to_others
from openclaw.settings.values import numeral


def _written(text: str) -> str:
    """
    C{text} if written as people write a number (L{numeral}); else an
    argparse error saying why.
    """
    try:
        return numeral(text)
    except InvalidValue as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(_written(text))
    except ValueError:
        seconds = 0.0
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds greater than 0")
    return seconds


def _connection_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """
    The options every subcommand shares.  They are declared on the main
    parser (with defaults) and again on each subcommand with no defaults,
    so they may come before or after the subcommand: C{rotate-token
    --token-file F} and C{--token-file F rotate-token} both work.
    Without C{SUPPRESS}, a subparser's defaults would overwrite what was
    given before the subcommand.
    """

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    group = parser.add_argument_group("connection options")
    group.add_argument(
        "--url",
        default=default(None),
        help=(
            f"the control plane's ws:// or wss:// URL, or unix:PATH for a UNIX socket (default ${URL_VARIABLE}, "
            f"else {DEFAULT_URL})"
        ),
    )
    group.add_argument(
        "--token", default=default(None), help="the session token (beats --token-file and OPENCLAW_TOKEN)"
    )
    group.add_argument(
        "--token-file",
        type=Path,
        default=default(None),
        metavar="FILE",
        help="read the token from FILE (the gateway's TOKEN_FILE); rotate-token writes the new token back to it",
    )
    group.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=default(None),
        metavar="SECONDS",
        help=f"give up after this long (default {DEFAULT_TIMEOUT:g}, health-check {HEALTH_CHECK_TIMEOUT:g})",
    )
    group.add_argument(
        "--cafile",
        type=Path,
        default=default(None),
        metavar="PATH",
        help="trust the CA certificate(s) in this PEM file for wss:// (default: the system's trust store)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the gateway's JSON answer as is, for scripts",
    )


class _Malformed(Exception):
    """
    The command line does not parse: C{message} is argparse's error, by
    the parser (of the subcommand) that found it.
    """

    def __init__(self, parser: CommandLineParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class CommandLineParser(argparse.ArgumentParser):
    """
    An argument parser that leaves its errors to L{parse_request}, which
    knows the whole command line and adds what to do (L{dash_hint}).
    """

    #: The subcommands this parser chooses among (its C{add_subparsers}'
    #: action: the commands, or a command's actions), or None.
    commands: argparse.Action | None = None

    def add_subparsers(self, **kwargs: Any) -> Any:
        self.commands = super().add_subparsers(**kwargs)
        return self.commands

    def error(self, message: str) -> NoReturn:
        raise _Malformed(self, message)

    def fail(self, message: str) -> NoReturn:
        """
        Print the usage and C{message}, and exit with status 2: argparse's
        own report of an error.
        """
        super().error(message)


def dash_hint(message: str, argv: Sequence[str], prog: str) -> str:
    """
    What to add to argparse's error C{message} about C{argv}: when a
    positional argument is missing and a value starting with C{-} (a key
    prefix, a consumer's name) was given, that argparse read it as an
    option and that C{--} before it makes it a value.
    """
    if not message.startswith("the following arguments are required"):
        return ""
    dashed = [argument for argument in argv if argument.startswith("-") and not argument.startswith("--")]
    if not dashed:
        return ""
    return (
        f" ({dashed[0]!r} starts with '-', so it was read as an option: to give it as a value, put -- before "
        f"it, after every option: {prog} ... -- {dashed[0]})"
    )


def did_you_mean(parser: argparse.ArgumentParser, message: str, argv: Sequence[str]) -> str | None:
    """
    The one line that replaces argparse's C{invalid choice} error
    C{message} when a word of C{argv} is not one of C{parser}'s commands
    (or a command's actions) but close to one (C{helth-check}, C{stauts}):
    the command it most likely meant, in any letter case (C{PING}), among
    the names, and their C{_} aliases for a word written with C{_}.

    @return: the line (with C{prog: error:}, without the newline), or None:
        C{message} is another error, or no command is close.
    """
    commands = getattr(parser, "commands", None)
    if commands is None or not commands.choices:
        return None
    names = list(commands.choices)
    # The names as the README spells them (health-check), unless the word
    # has a "_" (helth_check: the protocol's own spelling, health_check).
    spelled = [name for name in names if "_" not in name or name.replace("_", "-") not in commands.choices]
    for word in argv:
        if word in commands.choices or f"invalid choice: {word!r}" not in message:
            continue
        close = difflib.get_close_matches(word.lower(), names if "_" in word else spelled, n=1)
        if not close:
            return None
        noun = (commands.metavar or "command").lower()
        return f"{parser.prog}: error: unknown {noun} {word!r}; did you mean {close[0]!r}?"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog=PROG,
        description="Drive an OpenClaw gateway's control plane.",
        epilog=(
            "The token is taken from --token, else --token-file, else the OPENCLAW_TOKEN "
            "environment variable.  Exit status: 0 ok, 1 the gateway refused the command, "
            "2 usage or connection error."
        ),
    )
    _connection_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        # The protocol's own name too (health_check, as README's tables and
        # the gateway's answers spell it), listed beside it.
        aliases = [name.replace("-", "_")] if "-" in name else []
        sub: argparse.ArgumentParser = commands.add_parser(name, help=help, description=help, aliases=aliases)
        _connection_options(sub, defaults=False)
        return sub

    command("ping", "check the gateway answers, and how fast")
    command("status", "show the active provider and model, uptime and connections")
    switch = command("switch-provider", "route requests to another provider")
    switch.add_argument("provider", help="the provider id, as health-check lists it")
    switch.add_argument(
        "model_id",
        nargs="?",
        metavar="model",
        help="the model to use (default: the provider's configured default); or --model",
    )
    switch.add_argument("--model", help="the model to use, as the model argument")
    command("health-check", "probe every provider's models listing")
    command("rotate-token", "replace the session token; every earlier token stops working")
    _consumer_commands(command)
    return parser


#: What C{none} (or C{--model '*'}) parses to: the field is sent as null,
#: which removes the limit (or the restriction).
CLEAR = "none"


class _Cleared:
    """
    The value of a limit given as C{none}: sent as JSON null.
    """

    def __repr__(self) -> str:
        return CLEAR


CLEARED: Any = _Cleared()


def _whole_or_none(text: str) -> Any:
    if text.strip().lower() == CLEAR:
        return CLEARED
    try:
        value = int(_written(text))
    except ValueError:
        value = 0
    if not 0 < value <= MAX_PER_MINUTE:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a whole number from 1 to {MAX_PER_MINUTE}, or none to remove the limit"
        )
    return value


def _usd_or_none(text: str) -> Any:
    if text.strip().lower() == CLEAR:
        return CLEARED
    try:
        value = float(_written(text))
    except ValueError:
        value = -1.0
    # NaN and infinities fail the range; -0 its sign.
    if not 0 <= value <= MAX_BUDGET_USD or math.copysign(1, value) < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a number of US dollars from 0 to {MAX_BUDGET_USD} (0 lets no call through), "
            "or none for no budget"
        )
    if value and value < MIN_BUDGET_USD:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the smallest budget is {MIN_BUDGET_USD:f} US dollars (one millionth: prices are per "
            "million tokens); give 0 to let no call through, or at least 0.000001"
        )
    return value


def _when_or_none(text: str) -> Any:
    return CLEARED if text.strip().lower() == CLEAR else text


def _consumer_fields(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--budget-usd",
        type=_usd_or_none,
        metavar="USD",
        help=f"spend allowed per budget period, at most {MAX_BUDGET_USD} (0: no call; none: no budget)",
    )
    sub.add_argument(
        "--budget-period", choices=("day", "month", "total"), help="UTC day, month (the default), or total"
    )
    sub.add_argument(
        "--rpm", type=_whole_or_none, metavar="N", help="requests per minute (sliding 60 s window; none: no limit)"
    )
    sub.add_argument(
        "--tpm", type=_whole_or_none, metavar="N", help="tokens per minute (prompt + completion; none: no limit)"
    )
    sub.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="PATTERN",
        help="allowed provider/model pattern (repeat; '*' or none alone: every model)",
    )
    sub.add_argument(
        "--expires-at",
        type=_when_or_none,
        metavar="WHEN",
        help=(
            "ISO date or UTC datetime from which its keys are refused (a date alone: its start, 00:00 UTC, "
            "so give the day after the last day of use; none: never)"
        ),
    )


def _consumer_commands(command: Any) -> None:
    """
    C{consumer create|update|delete|list|release}, C{key create|revoke},
    C{usage} (issue #19).
    """

    def action(actions: Any, name: str, help: str) -> argparse.ArgumentParser:
        # The connection options after the action too (consumer list --json).
        sub: argparse.ArgumentParser = actions.add_parser(name, help=help, description=help)
        _connection_options(sub, defaults=False)
        return sub

    consumer = command("consumer", "manage consumers: a key per team or app, with budgets and rate limits")
    actions = consumer.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = action(actions, "create", "create a consumer; prints its first key (shown once)")
    create.add_argument("name")
    _consumer_fields(create)
    update = action(
        actions, "update", "change a consumer's limits; none removes a limit, --model '*' lifts the restriction"
    )
    update.add_argument("name")
    _consumer_fields(update)
    action(actions, "delete", "delete a consumer and its keys").add_argument("name")
    action(actions, "list", "list consumers and their key prefixes").add_argument("name", nargs="?")
    action(
        actions,
        "release",
        "release what a consumer's calls in flight reserve of its budget and tpm (a crashed instance's hold "
        "until they lapse)",
    ).add_argument("name")
    key = command("key", "make or revoke a consumer's keys")
    key_actions = key.add_subparsers(dest="action", metavar="ACTION", required=True)
    action(key_actions, "create", "a new key for a consumer (shown once)").add_argument("name")
    revoke = action(key_actions, "revoke", "revoke a key by the 8 characters after ock-")
    revoke.add_argument("name")
    revoke.add_argument("key_prefix")
    usage = command("usage", "requests, tokens and cost per consumer, model or day")
    usage.add_argument(
        "--name",
        help="one consumer only ('-': the calls made with GATEWAY_API_KEYS' keys; NAME@CREATED: a deleted one's)",
    )
    usage.add_argument("--since", help="ISO date or UTC datetime (inclusive)")
    usage.add_argument("--until", help="ISO date or UTC datetime (exclusive)")
    usage.add_argument("--group-by", choices=("consumer", "model", "day"))


def consumer_request(args: argparse.Namespace) -> tuple[str, dict[str, Any] | None]:
    """
    The command and data of a consumer, key or usage command line.
    """
    data: dict[str, Any] = {}
    if args.command == "usage":
        for field in ("name", "since", "until", "group_by"):
            if getattr(args, field) is not None:
                data[field] = getattr(args, field)
        return "usage", data
    cmd = f"{args.command}_{args.action}"
    if getattr(args, "name", None) is not None:
        data["name"] = args.name
    if cmd == "key_revoke":
        data["key_prefix"] = args.key_prefix
    if cmd in ("consumer_create", "consumer_update"):
        for field in ("budget_usd", "budget_period", "rpm", "tpm", "models", "expires_at"):
            value = getattr(args, field)
            if field == "models" and value is not None and any(p.strip().lower() in ("*", CLEAR) for p in value):
                if len(value) > 1:
                    raise UsageError("--model '*' (or none) means every model: give it alone")
                value = CLEARED
            if value is not None:
                data[field] = None if value is CLEARED else value
        if cmd == "consumer_create" and "budget_period" in data and data.get("budget_usd") is None:
            raise UsageError("--budget-period needs --budget-usd: give the budget it applies to")
        if cmd == "consumer_update" and data.keys() == {"name"}:
            raise UsageError(
                "nothing to change: give at least one of --budget-usd, --budget-period, --rpm, --tpm, --model, "
                "--expires-at"
            )
    return cmd, data


def choose_token(token: str | None, token_file: Path | None, environ: Mapping[str, str]) -> str:
    """
    The token to present: C{--token}, else the content of C{--token-file},
    else C{OPENCLAW_TOKEN}.  A token file that was named but cannot be read
    is an error rather than a reason to fall back to the environment: the
    operator asked for that file.  It is read as the gateway reads its
    C{TOKEN_FILE} (L{openclaw.files.read_regular_file}, links followed): a
    regular file of at most L{MAX_TOKEN_FILE_BYTES}; a FIFO (which would
    wait for a writer for ever) or a device (C{/dev/zero}, which never
    ends) is refused unread.

    @raise UsageError: no token, or the token file cannot be used; the
        message says why, in one line.
    """
    if token:
        return token.strip()
    if token_file is not None:
        try:
            raw = read_regular_file(token_file, MAX_TOKEN_FILE_BYTES, follow_links=True)
        except OSError as e:
            raise UsageError(
                f"cannot read the token file {token_file}: {getattr(e, 'strerror', None) or e}; "
                "the gateway writes it when started with TOKEN_FILE / --token-file"
            ) from None
        content = token_text(raw)
        if not content:
            raise UsageError(
                f"the token file {token_file} is empty; name the file the gateway was started with "
                "(TOKEN_FILE / --token-file: it writes the token there at start and at each rotate_token), "
                "or pass --token TOKEN"
            )
        if not holds_a_token(content):
            # Not sent: a wrong path (an env file) would send its secrets to
            # whatever --url names.
            raise UsageError(
                f"the token file {token_file} does not hold a session token (one line of three base64url "
                "segments, as the gateway writes it), so nothing was sent; name the file the gateway was "
                "started with (TOKEN_FILE / --token-file), or pass --token TOKEN"
            )
        return content.decode("ascii")
    from_environment = environ.get(TOKEN_VARIABLE, "").strip()
    if from_environment:
        return from_environment
    raise UsageError(
        "no token: pass --token TOKEN or --token-file FILE, or set OPENCLAW_TOKEN; "
        "the gateway prints its token at start-up (and writes it to TOKEN_FILE when set)"
    )


def token_file_warning(token_file: Path) -> str | None:
    """
    The warning C{--token-file} gets when group or others may read or
    write the file (links followed, as it is read), in the words of the
    gateway's rule for its secret files (L{open_to_others}): whoever may
    read it may drive the gateway with its token.  Only a warning, as
    openclawctl may run as another user than the gateway, whose file it
    is: the command goes on.

    @return: the line (without C{openclawctl: warning:}), or None: the
        file is private, or cannot be looked at (reading or writing it
        says why).
    """
    try:
        mode = stat.S_IMODE(token_file.stat().st_mode)
    except OSError:
        return None
    return open_to_others(token_file, mode, f"the token file {token_file}") or None


def _check_url(url: str, named: str = "--url") -> None:
    path = unix_socket_path(url)
    if path is not None:
        if not path:
            raise UsageError(f"{named} {url!r} names no socket; use e.g. unix:/run/openclaw/control.sock")
        size = len(os.fsencode(path))
        if size > MAX_UNIX_PATH_BYTES:
            raise UsageError(
                f"{named} {url!r}: the socket path is {size} bytes long, and a UNIX socket's is at most "
                f"{MAX_UNIX_PATH_BYTES} (unix(7)); the gateway cannot be listening there: give its --listen "
                "unix: path"
            )
        return
    try:
        parse_url(url)
    except ValueError as e:
        raise UsageError(
            f"{named} {url!r}: {e}; use e.g. {DEFAULT_URL}, wss://host:port or unix:/run/openclaw/control.sock"
        ) from None


def _check_writable(token_file: Path) -> None:
    """
    Refuse to rotate when the new token could not be saved: after a
    rotation the old token is dead, so a failed write would lock the
    operator out of a gateway whose banner they cannot see.

    Every check that can be made before the rotation, as
    L{openclaw.session.write_token_file} will write (a temporary file in
    the directory, renamed over C{token_file}): the directory exists and
    this user may create files in it (its mode, owner, a read-only file
    system); at C{token_file} there is nothing yet or a regular file (a
    directory cannot be replaced, and a symbolic link, FIFO, socket or
    device is no token file: it would be replaced by one, as the gateway
    refuses to do with its C{TOKEN_FILE}), and a regular file there is
    empty or holds one token (the gateway's own rule for an existing
    C{TOKEN_FILE}, L{openclaw.session.check_token_file}: anything else,
    a C{~/.bashrc} given by mistake, is someone else's and is not
    replaced); a file of another user's is replaced only by root, who
    gives the new file the same owner (L{openclaw.files.write_atomically}'s
    C{keep_owner}): one that another user (not root) replaced would be
    that user's, mode 0600, which its owner (the gateway, for its
    C{TOKEN_FILE}) could no longer read.  (That covers C{rename(2)}'s rule
    in a sticky directory, C{/tmp}, too.)

    @raise UsageError: one of them fails; the message says which, and that
        nothing was rotated.
    """
    directory = token_file.parent

    def refuse(why: str) -> NoReturn:
        raise UsageError(f"cannot write the new token to {token_file}: {why}; nothing was rotated")

    if not directory.is_dir():
        refuse(f"the directory {directory} does not exist; create it, or give --token-file a path in one that does")
    if not os.access(directory, os.W_OK | os.X_OK):
        refuse(
            f"this user may not create files in {directory} (its mode, owner, a read-only file system); "
            "give --token-file a path in a directory that is writable"
        )
    try:
        info = os.lstat(token_file)
    except FileNotFoundError:
        info = None
    except OSError as e:
        refuse(f"it cannot be examined ({e.strerror or e})")
    if info is not None and stat.S_ISDIR(info.st_mode):
        refuse(f"it is a directory; give the path of a file, such as {token_file / 'token'}")
    if info is not None and stat.S_ISLNK(info.st_mode):
        refuse(
            "it is a symbolic link, which the new token would replace rather than write through; "
            f"give the file it points to ({token_file.resolve()})"
        )
    if info is not None and not stat.S_ISREG(info.st_mode):
        refuse(f"it is {kind_of(info.st_mode)}, not a regular file; give the path of a token file, or of none yet")
    if info is not None:
        try:
            check_token_file(token_file)
        except UnsafeTokenFile as e:
            refuse(
                f"{e.reason}, and only a token file (empty, or one token) is replaced, as the gateway does with "
                "its TOKEN_FILE; give the path of a token file, or of none yet"
            )
    euid = os.geteuid()
    if info is not None and euid != 0 and info.st_uid != euid:
        owner = info.st_uid
        refuse(
            f"it belongs to uid {owner}, and this user (uid {euid}) cannot give the new file to uid {owner}, "
            f"who could then no longer read it (a gateway, its TOKEN_FILE); run openclawctl as uid {owner} or "
            "root, or leave out --token-file: the new token is printed, and a gateway rewrites its own "
            "TOKEN_FILE itself"
        )


def parse_request(argv: Sequence[str], environ: Mapping[str, str]) -> Request:
    """
    Turn the command line into a L{Request}.

    @raise SystemExit: (status 2) from argparse, for a malformed command
        line, after it printed the usage; (status 0) for C{--help}.
    @raise UsageError: the command line parses but cannot be acted on.
    """
    try:
        args = build_parser().parse_args(argv)
    except _Malformed as malformed:
        suggestion = did_you_mean(malformed.parser, malformed.message, argv)
        if suggestion is not None:
            malformed.parser.exit(2, suggestion + "\n")
        malformed.parser.fail(malformed.message + dash_hint(malformed.message, argv, malformed.parser.prog))
    named = "--url"
    if args.url is None:
        # As OPENCLAW_TOKEN gives the token: a gateway on another port or
        # host without --url on every call.
        args.url = environ.get(URL_VARIABLE, "").strip() or DEFAULT_URL
        named = URL_VARIABLE if environ.get(URL_VARIABLE, "").strip() else named
    _check_url(args.url, named)
    if args.cafile is not None and not args.url.startswith("wss:"):
        raise UsageError("--cafile is only for wss:// URLs")
    token = choose_token(args.token, args.token_file, environ)
    warning = None if args.token_file is None else token_file_warning(args.token_file)
    cmd = args.command.replace("-", "_")
    data: dict[str, Any] | None = None
    if cmd in ("consumer", "key", "usage"):
        cmd, data = consumer_request(args)
    if cmd == "switch_provider":
        data = {"provider": args.provider}
        if args.model is not None and args.model_id is not None and args.model != args.model_id:
            raise UsageError(f"switch-provider: two models given ({args.model_id} and --model {args.model}): give one")
        model = args.model if args.model is not None else args.model_id
        if model is not None:
            data["model"] = model
    if cmd == "rotate_token" and args.token_file is not None:
        _check_writable(args.token_file)
    timeout = args.timeout or (HEALTH_CHECK_TIMEOUT if cmd == "health_check" else DEFAULT_TIMEOUT)
    return Request(
        url=args.url,
        cmd=cmd,
        data=data,
        token=token,
        token_file=args.token_file,
        as_json=args.json,
        timeout=timeout,
        cafile=args.cafile,
        token_from_file=not args.token and args.token_file is not None,
        warnings=() if warning is None else (warning,),
    )
