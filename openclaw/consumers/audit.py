"""
What the audit line of a consumer command says besides who ran it and
how it went: the consumer's C{name}, the key prefix made or revoked (the
8 characters after C{ock-}, never a key), the fields a create or
update set (C{changed}) and what a release released (C{released_usd},
C{released_tokens}).  Field values are never logged: a budget or a
pattern says nothing an operator needs in the audit trail, and C{name}
and the prefix are checked to be what they claim before they are logged.
The names C{usage} also reads, C{-} (the calls made with GATEWAY_API_KEYS'
keys) and a deleted consumer's C{NAME@CREATED}, are logged as given; any
other value no name can be is logged as C{<invalid>}.  A key typed where a
name goes is logged as lists show keys (L{shown_key}), and so is any key in
the C{error} an audit line records (L{without_keys}).
"""

from __future__ import annotations

import re
from typing import Any

from openclaw.consumers.model import (
    FIELDS,
    KEY_PREFIX,
    NO_CONSUMER,
    SHOWN_CHARS,
    check_name,
    is_key_like,
    is_retired_name,
    shown_key,
)

_PREFIX = re.compile(f"[A-Za-z0-9_-]{{{SHOWN_CHARS}}}")
#: More of a key than lists and logs show, starting where no key
#: character comes before it (C{/v1/mock-abcdefghij} holds none) or right
#: after a percent-escape (C{/v1/models/kimi%2Fock-...}, a path as sent).
_KEY = re.compile(
    f"(?:(?<![A-Za-z0-9_-])|(?<=%[0-9A-Fa-f]{{2}})){re.escape(KEY_PREFIX)}[A-Za-z0-9_-]{{{SHOWN_CHARS + 1},}}"
)
_INVALID = "<invalid>"


def _prefix(value: object) -> str:
    return value if isinstance(value, str) and _PREFIX.fullmatch(value) else _INVALID


def audit_fields(cmd: str, data: object) -> dict[str, str]:
    """
    The audit fields of a consumer command's C{data}: C{consumer},
    C{key_prefix} (key_revoke), C{changed} (create and update: the fields
    given, comma-separated, sorted).  Empty for other commands.
    """
    if not isinstance(data, dict):
        return {}
    fields: dict[str, str] = {}
    if "name" in data:
        given = data["name"]
        if given == NO_CONSUMER or is_retired_name(given):
            # Checked to be what they claim (usage reads them).
            name = given
        else:
            try:
                name = check_name(given)
            except ValueError:
                name = _INVALID
        fields["consumer"] = shown_key(name) if is_key_like(name) else name
    if cmd == "key_revoke":
        fields["key_prefix"] = _prefix(data.get("key_prefix"))
    if cmd in ("consumer_create", "consumer_update"):
        fields["changed"] = ",".join(sorted(data.keys() & (FIELDS - {"name"}))) or "-"
    return fields


def without_keys(text: str) -> str:
    """
    C{text} with each key in it (more of one than L{shown_key} shows) cut
    to what lists and logs show of a key.
    """
    return _KEY.sub(lambda key: shown_key(key.group()), text)


def note_result(result: Any, fields: dict[str, str]) -> Any:
    """
    Add what the answer adds to C{fields} (the prefix of a key just made;
    the US dollars and tokens a release released), and pass C{result} on.
    """
    if isinstance(result, dict):
        if "key_prefix" in result:
            fields["key_prefix"] = _prefix(result["key_prefix"])
        if result.get("saved") is False:
            # A key revoke the database did not take (refused here all the same).
            fields["saved"] = "false"
        for name in ("released_usd", "released_tokens"):
            if name in result:
                fields[name] = str(result[name])
    return result


__all__ = ["audit_fields", "note_result", "without_keys"]
