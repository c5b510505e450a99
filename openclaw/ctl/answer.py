"""
What the gateway's answer comes to: decoded (L{decode_answer}), checked
to be the answer to the command asked (L{check_answer}), a rotated token
saved to C{--token-file} (L{save_token}), and the output and exit status
(L{conclude}).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from openclaw.ctl.request import PROG, Reply, Request
from openclaw.ctl.show import PRINTED_MAX, QUOTED_MAX, Report, printable, render
from openclaw.files import OwnerNotKept
from openclaw.session import MAX_TOKEN_FILE_BYTES, UnsafeTokenFile, read_token_file, token_text, write_token_file


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
    return held is not None and token_text(held) == token.encode("utf-8")


def save_token(token_file: Path, token: str, presented: str | None = None) -> Literal["written", "held", "newer"]:
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
    @return: C{"written"}; C{"held"}: it held C{token} already (written
        by the gateway); C{"newer"}: it holds a newer one, left as it is.
    @raise openclaw.files.OwnerNotKept: the file there is another user's
        and this user may not give the new one to it; it is left as it was.
    @raise OSError: it cannot be written; it is left as it was.
    """
    if holds_token(token_file, token):
        return "held"
    if presented is not None and not holds_token(token_file, presented) and token_file.exists():
        return "newer"
    write_token_file(token_file, token, keep_owner=True)
    return "written"


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
    by_gateway = False
    if answer["ok"] and request.cmd == "rotate_token" and request.token_file is not None:
        failed = f"{PROG}: error: the token was rotated but writing it to {request.token_file} failed"
        keep = "the new token is on stdout: keep it"
        try:
            presented = request.token if request.token_from_file else None
            saved = save_token(request.token_file, answer["result"]["token"], presented)
            if saved != "newer":
                saved_to, by_gateway = request.token_file, saved == "held"
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
    return render(
        request, reply, answer, saved_to=saved_to, save_error=save_error, note=note, saved_by_gateway=by_gateway
    )
