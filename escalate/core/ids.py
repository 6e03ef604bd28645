"""Identifiers for runs, tasks and escalations.

An id is checked before any file is opened, so no id can name a path outside the
runs folder: no separators, no ``..``, no leading dot, no control or non-ASCII characters.
"""

from __future__ import annotations

import re
from typing import TypeGuard

from escalate.errors import InvalidId

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", re.ASCII)
# Ids joined by newlines (all_ids): the same rule for each, in one match for them all.
_IDS_PATTERN = re.compile(rf"(?:{ID_PATTERN.pattern}\n)*{ID_PATTERN.pattern}", re.ASCII)


def check_id(value: str, *, what: str = "id") -> str:
    """Return ``value`` unchanged if it is a valid id, else raise :class:`InvalidId`."""
    if not valid_id(value):
        shown = shown_value(value)
        raise InvalidId(
            f"invalid {what} {shown}: use 1-128 ASCII letters, digits and . _ : - "
            "starting with a letter or digit (no '..', '/' or spaces)",
            value=shown,
        )
    return value


def valid_id(value: object) -> TypeGuard[str]:
    """True if ``value`` is a str that follows the id rule (the ledger checks ids in logs)."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None and ".." not in value


def all_ids(values: list[str]) -> bool:
    """True if every str of ``values`` follows the id rule (:func:`valid_id`), checked
    together: one match of the rule over them joined by newlines, which costs a fraction of
    one match per id (a fold checks each task id it has not seen before). An id with a
    newline of its own shows as a newline too many."""
    joined = "\n".join(values)
    return not values or (_IDS_PATTERN.fullmatch(joined) is not None and ".." not in joined
                          and joined.count("\n") == len(values) - 1)


def shown_value(value: object) -> str:
    """``value`` quoted, at most 60 characters: a long id is cut inside its quotes (``'aaa...'``)."""
    shown = repr(value)
    if len(shown) <= 60:
        return shown
    if not isinstance(value, str):
        return shown[:57] + "..."
    cut = value[:56]
    while len(repr(cut + "...")) > 60:  # escapes make a character's repr longer than one
        cut = cut[:-1]
    return repr(cut + "...")
