"""What to do when two writers change an agent's state from the same version.

Pure logic, no I/O: the checksum saved state carries, and the three-way merge of the
``merge`` conflict policy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Final, Literal

import orjson

ConflictPolicy = Literal["reject", "last_write_wins", "merge"]
CONFLICT_POLICIES: Final[tuple[str, ...]] = ("reject", "last_write_wins", "merge")

_MISSING: Final = object()


class FieldConflictError(Exception):
    """Both writers changed the same fields to different values.

    Attributes:
        fields: The dotted paths of those fields.
    """

    def __init__(self, fields: list[str]) -> None:
        super().__init__(f"both writers changed {', '.join(fields)}")
        self.fields = fields


def canonical_json(state: Mapping[str, Any]) -> bytes:
    """The state's JSON with sorted keys: the same bytes for the same state, anywhere."""
    return orjson.dumps(state, option=orjson.OPT_SORT_KEYS)


def state_checksum(state: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of the state's canonical JSON."""
    return checksum_of(canonical_json(state))


def checksum_of(canonical: bytes) -> str:
    """``sha256:<hex>`` of a state's canonical JSON (`canonical_json`)."""
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def merge_states(
    base: Mapping[str, Any], ours: Mapping[str, Any], theirs: Mapping[str, Any]
) -> dict[str, Any]:
    """Merge two states written from `base`, field by field (nested objects too).

    A field changed (or added, or removed) by one side only takes that side's value;
    a field both sides changed to the same value takes it.

    Raises:
        FieldConflictError: Fields both sides changed to different values.
    """
    conflicts: list[str] = []
    merged = _merge(base, ours, theirs, "", conflicts)
    if conflicts:
        raise FieldConflictError(conflicts)
    return merged


def _merge(
    base: Mapping[str, Any],
    ours: Mapping[str, Any],
    theirs: Mapping[str, Any],
    path: str,
    conflicts: list[str],
) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for name in sorted({*base, *ours, *theirs}):
        b = base.get(name, _MISSING)
        o = ours.get(name, _MISSING)
        t = theirs.get(name, _MISSING)
        if o == t:
            value = o
        elif o == b:
            value = t
        elif t == b:
            value = o
        elif isinstance(o, dict) and isinstance(t, dict) and (isinstance(b, dict) or b is _MISSING):
            value = _merge(b if isinstance(b, dict) else {}, o, t, f"{path}{name}.", conflicts)
        else:
            conflicts.append(f"{path}{name}")
            continue
        if value is not _MISSING:
            merged[name] = value
    return merged
