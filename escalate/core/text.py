"""Text from a log, as people are shown it: safe on a terminal and cut to a length.

A leaf: the reports, the CLI and the notify hook's warnings show values through it.
"""

from __future__ import annotations

# A value from a log is shown to people cut to this many characters.
SHOWN_CHARS = 200


def printable(value: object, limit: int = SHOWN_CHARS) -> str:
    """``value`` as text that is safe on a terminal: control and other non-printable
    characters shown as escapes (``\\x1b``, ``\\n``, ``\\u202e``), cut to ``limit`` characters."""
    text = value if type(value) is str else str(value)
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    if not text.isprintable():
        text = "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
                       for char in text)
    return text
