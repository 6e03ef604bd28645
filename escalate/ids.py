"""Identifiers for runs, tasks and escalations.

An id is checked before any file is opened, so no id can name a path outside the
runs root: no separators, no ``..``, no leading dot, no control or non-ASCII characters.
"""

from __future__ import annotations

import re

from escalate.errors import InvalidId

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", re.ASCII)


def check_id(value: str, *, what: str = "id") -> str:
    """Return ``value`` unchanged if it is a valid id, else raise :class:`InvalidId`."""
    if not isinstance(value, str) or _ID.fullmatch(value) is None or ".." in value:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise InvalidId(
            f"invalid {what} {shown}: use 1-128 ASCII letters, digits and . _ : - "
            "starting with a letter or digit (no '..', '/' or spaces)",
            value=shown,
        )
    return value
