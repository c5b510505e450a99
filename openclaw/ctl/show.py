"""
What C{openclawctl} prints: text from the server made safe for a
terminal (L{printable}, L{printable_json}), each command's answer
formatted for people (C{format_*}), and the output and exit status of an
answered command (L{render}, a L{Report}).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import attrs

from openclaw.consumers.model import plain_decimal, usd
from openclaw.ctl.request import PROG, Reply, Request

#: The most characters of a server's text (an HTTP reason phrase, a close
#: reason, an error in an answer) put in one of openclawctl's lines: the
#: gateway's longest errors, which quote a model name (up to
#: openclaw.routing.MAX_MODEL_CHARS, 256) three times, are whole; a
#: hostile server's 20,000 characters are not.
PRINTED_MAX = 1000
#: The most characters of a server's unexpected value quoted in an error.
QUOTED_MAX = 100

#: The exit statuses: the gateway answered C{ok: true}, or C{ok: false},
#: or there was no answer to judge (L{openclaw.ctl} says when).
OK, FAILED, NO_ANSWER = 0, 1, 2

#: What to do about each token error the gateway can give.
_TOKEN_HINTS = MappingProxyType(
    {
        "missing token": "give a token with --token, --token-file or OPENCLAW_TOKEN",
        "invalid token": "this is not a token of this gateway; use the one its banner or TOKEN_FILE shows",
        "token expired": (
            "tokens live SESSION_TTL_HOURS: a single gateway issues a new one when restarted; a cluster (REDIS_URL) "
            "replaces its token before it expires: use the current one from the banner or TOKEN_FILE"
        ),
        "token revoked": (
            "the token was replaced: by rotate_token or a restart of a single gateway, or by a cluster's "
            "(REDIS_URL) renewal before expiry; use the current one from the gateway's banner or TOKEN_FILE"
        ),
    }
)


@attrs.frozen
class Report:
    """
    What to print and which status to exit with.
    """

    stdout: str
    stderr: str
    code: int


def _escaped(character: str) -> str:
    # As Python's repr shows it in a string (\x1b, \n, \u202e).
    return repr(character)[1:-1]


def printable(text: str, limit: int | None = PRINTED_MAX) -> str:
    """
    Text that came from the server (or through a library from it), as it is
    safe to put on the operator's terminal: each character Python does not
    count as printable (C{str.isprintable}: the controls C0, DEL and C1,
    ESC among them, which start a terminal's escape sequences, and line
    breaks; the format characters, such as the bidirectional overrides
    and zero-width ones, which reorder or hide text; separators,
    surrogates, unassigned code points) shown as its escape (C{\\x1b},
    C{\\n}, C{\\u202e}), and at most C{limit} characters, the rest replaced
    by C{…}.  Every server-provided text openclawctl prints goes through
    this (or, in a C{--json} answer, through L{printable_json}).

    @param limit: the most characters kept (escapes counted as shown), or
        None for no limit (a formatted answer, which holds the new token).
    """
    if text.isprintable() and (limit is None or len(text) <= limit):
        return text
    shown: list[str] = []
    length = 0
    for character in text:
        piece = character if character.isprintable() else _escaped(character)
        if limit is not None and length + len(piece) > limit:
            return "".join(shown) + "…"
        shown.append(piece)
        length += len(piece)
    return "".join(shown)


def printable_json(text: str) -> str:
    """
    A JSON text (already parsed, so with no raw C0 control but the
    whitespace between tokens) with every character inside its strings
    that L{printable} would escape written as JSON's escape
    (C{\\u009b}, C{\\u202e}; RFC 8259 section 7): the same value, and
    nothing in it a terminal acts on or hides.
    """
    if text.isprintable():
        return text
    return "".join(
        character
        if character.isprintable() or character in "\n\t"
        # A CR can only be whitespace between tokens (a string holds it
        # escaped): left out, as a terminal would move back over the line.
        else ""
        if character == "\r"
        # JSON's own escape (RFC 8259 section 7), a surrogate pair past U+FFFF.
        else json.dumps(character)[1:-1]
        for character in text
    )


def printable_tree(value: Any) -> Any:
    """
    C{value} (a decoded JSON answer) with every string in it, keys
    included, made L{printable} without a length limit: what the
    formatted (not C{--json}) output is made from.
    """
    if isinstance(value, str):
        return printable(value, None)
    if isinstance(value, Mapping):
        return {printable_tree(key): printable_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [printable_tree(item) for item in value]
    return value


def format_consumers(result: Mapping[str, Any]) -> str:
    """
    A table for people: one consumer per line.
    """
    if "consumers" not in result:
        consumer = result.get("consumer")
        lines = []
        if consumer is not None:
            lines.append(format_consumers({"consumers": [consumer]}))
        if result.get("deleted"):
            kept = result.get("usage_kept_as")
            lines.append(f"deleted {result['deleted']}" + (f"; its usage is kept as {kept}" if kept else ""))
        if "released_usd" in result:
            lines.append(
                f"released the reservations of {result['name']}'s calls in flight: "
                f"{usd(result['released_usd'])} USD, {result['released_tokens']} tokens"
            )
        if result.get("revoked"):
            unsaved = (
                " (refused by this gateway, not saved yet: see the warning)" if result.get("saved") is False else ""
            )
            lines.append(
                f"revoked {result['name']}'s key ock-{result['revoked']}...{unsaved}; {result['keys_left']} left"
            )
        if result.get("key"):
            lines.append(f"key (shown once, keep it now): {result['key']}")
        return "\n".join(lines)
    # What calls in flight hold, shown only when some consumer's do.
    held = any(c.get("reserved_usd") or c.get("reserved_tokens") for c in result["consumers"])
    rows: list[tuple[str, ...]] = [
        ("NAME", "BUDGET", "SPENT", *(("RESERVED",) if held else ()), "RPM", "TPM", "MODELS", "EXPIRES", "KEYS")
    ]
    for c in result["consumers"]:
        budget = "-" if c["budget_usd"] is None else f"{plain_decimal(c['budget_usd'])}/{c['budget_period']}"
        reserved = [
            f"{usd(c['reserved_usd'])} USD" if c.get("reserved_usd") else "",
            f"{c['reserved_tokens']} tokens" if c.get("reserved_tokens") else "",
        ]
        rows.append(
            (
                c["name"],
                budget,
                usd(c.get("spent_usd", 0)),
                *((", ".join(part for part in reserved if part) or "-",) if held else ()),
                str(c["rpm"] or "-"),
                str(c["tpm"] or "-"),
                ",".join(c["models"]) or "*",
                c["expires_at"] or "-",
                ",".join(
                    [k["prefix"] for k in c.get("keys", [])]
                    # Refused, but not yet out of the database.
                    + [f"{prefix}(revoke unsaved)" for prefix in c.get("revokes_unsaved", [])]
                )
                or "-",
            )
        )
    too_long = result.get("too_long")
    if too_long:
        # Names from the gateway, made safe for a terminal as any of its text.
        return _table(rows) + (
            f"\nnot listed, each longer than MAX_MESSAGE_BYTES allows alone: {printable(', '.join(map(str, too_long)))}"
            " (raise the gateway's MAX_MESSAGE_BYTES to see them)"
        )
    return _table(rows)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def format_usage(result: Mapping[str, Any]) -> str:
    group = result.get("group_by")
    groups = result.get("groups") if group else [result["total"]]
    rows: list[tuple[str, ...]] = [
        (
            (group or "").upper() or "TOTAL",
            "REQUESTS",
            "LIMITED",
            "PROMPT",
            "COMPLETION",
            "REASONING",
            "COST_USD",
            "UNPRICED",
        )
    ]

    def cells(label: str, g: Mapping[str, Any]) -> tuple[str, ...]:
        return (
            label,
            str(g["requests"]),
            str(g["limited"]),
            str(g["prompt_tokens"]),
            str(g["completion_tokens"]),
            str(g["reasoning_tokens"]),
            "-" if g["cost_usd"] is None else usd(g["cost_usd"]),
            str(g["unpriced_tokens"]),
        )

    rows.extend(cells(str(g.get(group, "all")) if group else "all", g) for g in groups or [])
    total = result.get("total")
    if group and isinstance(total, Mapping):
        # The sum of the groups, under them.
        rows.append(cells("TOTAL", total))
    return _table(rows)


def format_milliseconds(ms: float) -> str:
    """
    C{ms} milliseconds as printed: one decimal under 10 ("4.2 ms"), none
    from 10 ("37 ms").
    """
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:.0f} ms"


def format_duration(seconds: float) -> str:
    """
    C{3723.4} as C{1h 2m 3s}: uptimes are read by people.
    """
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    while parts[0][0] == 0:
        parts.pop(0)
    return " ".join(f"{value}{unit}" for value, unit in parts)


def format_ping(result: Mapping[str, Any], round_trip: float) -> str:
    """
    The line for C{ping}'s answer, C{round_trip} the seconds from the
    command sent to its answer read: "pong (4.2 ms round trip)".
    """
    return f"pong ({format_milliseconds(round_trip * 1000)} round trip)"


def format_status(result: Mapping[str, Any]) -> str:
    """
    Every field the gateway sent, as aligned C{key: value} lines, in its
    order (new fields show up without a client change).
    """
    if not result:
        return ""
    width = max(len(key) for key in result) + 1
    lines = []
    for key, value in result.items():
        if key == "providers" and isinstance(value, Mapping):
            shown: Any = format_provider_states(value)
        else:
            shown = format_duration(value) if key == "uptime" and isinstance(value, (int, float)) else value
        lines.append(f"{key + ':':<{width}} {'-' if shown is None else shown}")
    return "\n".join(lines)


def format_provider_states(providers: Mapping[str, Any]) -> str:
    """
    C{"kimi breaker closed, keys 2/2; gemini breaker open, keys 0/1"}:
    each provider's circuit breaker and how many of its keys are usable.
    """
    parts = []
    for provider_id, state in providers.items():
        if not isinstance(state, Mapping):
            parts.append(f"{provider_id} {state}")
            continue
        if state.get("configured") is False:
            parts.append(f"{provider_id} not configured")
            continue
        keys = state.get("keys")
        text = f"{provider_id} breaker {state.get('breaker', '?')}"
        if isinstance(keys, Mapping):
            text += f", keys {sum(1 for v in keys.values() if _usable(v))}/{len(keys)}"
            # A key resting for some models only (Gemini's) serves the others.
            partly = [str(v) for v in keys.values() if _partly(v)]
            if partly:
                text += f" ({printable('; '.join(partly), 200)})"
        parts.append(text)
    return "; ".join(parts)


def _partly(state: object) -> bool:
    """
    Whether a key's state is a rest for some models only (C{"resting for
    <model>, ..."}: L{openclaw.providers.keys.KeyPool.states}).
    """
    return isinstance(state, str) and state.startswith("resting for ")


def _usable(state: object) -> bool:
    """
    Whether a key in C{state} takes calls (of some model, for a key
    resting for some models only).
    """
    return state == "ok" or _partly(state)


def format_switch(result: Mapping[str, Any]) -> str:
    """
    The line for C{switch_provider}'s result (C{previous}, C{active},
    C{model}): "gemini -> kimi (moonshot-v1-8k)".
    """
    return f"{result.get('previous')} -> {result.get('active')} ({result.get('model')})"


def format_health(result: Mapping[str, Any]) -> str:
    """
    One line per provider, columns aligned: name (active marked), ok,
    FAILED or not configured (no key: not probed), latency, model count,
    then whether the model in use exists upstream or, for a failure, the
    error, and the pool's keys out of use, if any (C{keys 1/2 usable
    (ab12cd34 set_aside)}), and the seconds the gateway stood still during
    the probe, if it did (its C{stalled_s}, counted in the latency).
    """
    active = result.get("active")
    rows = []
    for provider_id, entry in (result.get("providers") or {}).items():
        name = f"{provider_id} (active)" if provider_id == active else provider_id
        latency = entry.get("latency_ms")
        models = entry.get("models")
        if entry.get("ok"):
            available = entry.get("active_model_available")
            which = "active model" if provider_id == active else "default model"
            detail = {True: f"{which} available", False: f"{which} NOT LISTED", None: ""}.get(available, "")
        else:
            detail = entry.get("error") or "failed"
        keys = entry.get("keys")
        if isinstance(keys, Mapping) and any(state != "ok" for state in keys.values()):
            # A pool's key out of use: the listing probed may still be ok.
            usable = sum(1 for state in keys.values() if _usable(state))
            out = ", ".join(f"{printable(str(k), 16)} {printable(str(v), 200)}" for k, v in keys.items() if v != "ok")
            detail = f"{detail}; keys {usable}/{len(keys)} usable ({out})".lstrip("; ")
        stalled = entry.get("stalled_s")
        if isinstance(stalled, (int, float)) and not isinstance(stalled, bool):
            # The probe's latency counts the seconds the gateway's loop stood still.
            note = f"the gateway stood still {stalled:.1f} s or more during the probe, counted in its latency"
            detail = f"{detail}; {note}".lstrip("; ")
        rows.append(
            [
                name,
                "ok" if entry.get("ok") else "not configured" if entry.get("configured") is False else "FAILED",
                "-" if latency is None else format_milliseconds(latency),
                "-" if models is None else f"{models} models",
                detail,
            ]
        )
    if not rows:
        return "no providers"
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]).rstrip()
        for row in rows
    )


def format_rotation(result: Mapping[str, Any], saved_to: Path | None, by_gateway: bool = False) -> str:
    """
    The lines for C{rotate_token}'s result (C{jti}, C{expires}, C{token}):
    the new token's id and expiry, then where it was written (C{saved_to};
    C{by_gateway}: the gateway's own C{TOKEN_FILE}, which it wrote before
    answering) or, with no file, the token itself.
    """
    head = f"token rotated (id {result.get('jti')}, expires {result.get('expires')}); the old token no longer works"
    if saved_to is not None and by_gateway:
        return f"{head}\nnew token in {saved_to} (written by the gateway: its TOKEN_FILE)"
    if saved_to is not None:
        return f"{head}\nnew token written to {saved_to}"
    return f"{head}\nnew token: {result.get('token')}"


def exit_code(answer: Mapping[str, Any]) -> int:
    """
    The exit status for a command's answer: L{OK} (0) when its C{ok} is
    true, else L{FAILED}.
    """
    return OK if answer.get("ok") is True else FAILED


def describe_error(cmd: str, error: object) -> str:
    """
    The gateway's error (L{printable}), and what to do about it when it is
    about the token.
    """
    hint = _TOKEN_HINTS.get(error) if isinstance(error, str) else None
    return f"{PROG}: {cmd} failed: {printable(str(error))}" + (f" ({hint})" if hint else "")


def render(
    request: Request,
    reply: Reply,
    answer: Mapping[str, Any],
    saved_to: Path | None = None,
    save_error: str | None = None,
    note: str | None = None,
    saved_by_gateway: bool = False,
) -> Report:
    """
    The output of one answered command.  stdout carries the answer (as is
    with C{--json}, formatted otherwise); stderr carries the gateway's error,
    warnings and notes, the same in both modes.  What the gateway sent is
    printed through L{printable} (L{printable_json} with C{--json}): no
    control character of its reaches the terminal.
    """
    code = exit_code(answer)
    errors: list[str] = []
    if code != OK:
        errors.append(describe_error(request.cmd, answer.get("error")))
    result = printable_tree(answer.get("result") or {})
    if code == OK and result.get("warning"):
        errors.append(f"{PROG}: warning: {printable(str(answer['result']['warning']))}")
    if save_error:
        errors.append(save_error)
        code = FAILED
    if note:
        errors.append(note)
    if request.as_json:
        out = printable_json(reply.payload.decode("utf-8"))
    elif code == OK or save_error:
        out = {
            "ping": lambda: format_ping(result, reply.round_trip),
            "status": lambda: format_status(result),
            "switch_provider": lambda: format_switch(result),
            "health_check": lambda: format_health(result),
            "rotate_token": lambda: format_rotation(result, saved_to, saved_by_gateway),
            "usage": lambda: format_usage(result),
        }.get(request.cmd, lambda: format_consumers(result))()
    else:
        out = ""
    return Report(
        stdout=out + "\n" if out else "",
        stderr="".join(line + "\n" for line in errors),
        code=code,
    )
