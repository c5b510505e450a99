"""
What the audit line of a consumer command says besides who ran it and
how it went: the consumer's C{name}, the key prefix made or revoked (the
8 characters after C{ock-}, never a key) and the fields a create or
update set (C{changed}).  Field values are never logged: a budget or a
pattern says nothing an operator needs in the audit trail, and C{name}
and the prefix are checked to be what they claim before they are logged.
"""

from __future__ import annotations

import re
from typing import Any

from openclaw.consumers.model import _FIELDS, SHOWN_CHARS, check_name

_PREFIX = re.compile(f"[A-Za-z0-9_-]{{{SHOWN_CHARS}}}")
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
        try:
            fields["consumer"] = check_name(data["name"])
        except ValueError:
            fields["consumer"] = _INVALID
    if cmd == "key_revoke":
        fields["key_prefix"] = _prefix(data.get("key_prefix"))
    if cmd in ("consumer_create", "consumer_update"):
        fields["changed"] = ",".join(sorted(data.keys() & (_FIELDS - {"name"}))) or "-"
    return fields


def note_result(result: Any, fields: dict[str, str]) -> Any:
    """
    Add what the answer adds to C{fields} (the prefix of a key just made),
    and pass C{result} on.
    """
    if isinstance(result, dict) and "key_prefix" in result:
        fields["key_prefix"] = _prefix(result["key_prefix"])
    return result


__all__ = ["audit_fields", "note_result"]
