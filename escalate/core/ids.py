"""Identifiers for runs, tasks and escalations.

An id is checked before any file is opened, so no id can name a path outside the
runs folder: no separators, no ``..``, no leading dot, no control or non-ASCII characters.
"""

from __future__ import annotations

import re
from typing import TypeGuard

from escalate.errors import InvalidId

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", re.ASCII)


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
