"""Durations: one parser and one formatter, each bound checked in one place.

Text like ``90``, ``1.5s``, ``250ms``, ``30m``, ``1h`` or ``2d`` is parsed exactly (integer
milliseconds, never a float product), and every duration has a documented maximum: a
value past it would overflow a timer or a date further on, long after it was accepted.
"""

from __future__ import annotations

import math
import re

from escalate.errors import InputError

MS_PER_UNIT = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DAY_S = 86_400

# The maxima (seconds). The escalation timeout is also the bound a reader of a log should
# hold ``timeout_s`` of ``run_opened`` / ``policy_changed`` to: expires_at must stay a date.
MAX_ESCALATION_TIMEOUT_S = 365 * _DAY_S
MAX_LOCK_TIMEOUT_S = _DAY_S
MAX_WAIT_S = 365 * _DAY_S  # wait --timeout, reserve --wait --timeout, runs watch --timeout
MAX_INTERVAL_S = 3_600  # runs watch --interval
MAX_NOTIFY_TIMEOUT_S = 3_600
MAX_SWEEP_DEADLINE_S = 3_600  # sweep --deadline

# Text, compiled by ``re`` (and kept in its cache) when first used: most commands parse no duration.
_DURATION = r"(?a)([0-9]*)(?:\.([0-9]*))?(ms|s|m|h|d)?"
_EXAMPLES = "a number of seconds or 250ms, 30s, 15m, 1h, 2d"


def parse_duration(text: str, *, what: str, maximum: float, minimum: float = 0) -> float:
    """``90``, ``1.5s``, ``250ms``, ``30m``, ``1h``, ``2d`` → seconds, whole milliseconds.

    Raises :class:`InputError` (``invalid_duration``) naming ``what`` for malformed text,
    a finer unit than 1ms, or a value outside ``minimum`` … ``maximum`` seconds.
    """
    raw = text.strip().lower()
    match = re.fullmatch(_DURATION, raw)
    whole, fraction, unit = match.groups() if match else ("", None, None)
    if match is None or not (whole or fraction):
        raise _invalid(what, repr(text), f"use {_EXAMPLES}")
    whole = whole.lstrip("0")
    if len(whole) > 15:  # far above every maximum; avoids building huge ints from hostile input
        raise _invalid(what, repr(text), _over(maximum))
    fraction = (fraction or "").rstrip("0")
    scale = MS_PER_UNIT[unit or "s"]
    numerator = int(whole or "0") * 10 ** len(fraction) + int(fraction or "0")
    ms, rest = divmod(numerator * scale, 10 ** len(fraction))
    if rest:
        raise _invalid(what, repr(text), "finer than 1ms; round to whole milliseconds")
    return check_duration(ms / 1000, what=what, maximum=maximum, minimum=minimum, shown=repr(text))


def check_duration(seconds: float, *, what: str, maximum: float, minimum: float = 0,
                   shown: str | None = None) -> float:
    """``seconds`` if it is a finite number within ``minimum`` … ``maximum``, else
    :class:`InputError`. The library's numeric arguments come through here, parsed text too."""
    number = isinstance(seconds, int | float) and not isinstance(seconds, bool)
    shown = shown if shown is not None else f"{seconds!r}" + ("s" if number else "")
    if not number:
        raise _invalid(what, shown, f"expected seconds as a number, not {type(seconds).__name__}")
    if isinstance(seconds, float) and not math.isfinite(seconds):
        raise _invalid(what, shown, f"use {_EXAMPLES}")
    if seconds > maximum:  # (an int too large for a float is compared exactly here)
        raise _invalid(what, shown, _over(maximum))
    if seconds < minimum:
        raise _invalid(what, shown, f"give at least {format_duration(minimum)}" if minimum else
                       "give 0 or more")
    return seconds


def format_duration(seconds: float, *, exact: bool = True) -> str:
    """Seconds as text that :func:`parse_duration` reads back: ``90s``, ``30m``, ``1h``,
    ``2d``, ``1.5s``, ``0.25s`` (whole milliseconds). ``exact=False`` is for tables: the two largest units,
    rounded down (``45s``, ``12m``, ``3h05m``, ``2d04h``; below zero is ``0s``)."""
    if not exact:
        return _rounded(max(0, int(seconds)))
    ms = round(seconds * 1000)
    sign, ms = ("-" if ms < 0 else ""), abs(ms)
    if ms == 0:
        return "0s"
    for unit in ("d", "h", "m", "s"):
        if ms % MS_PER_UNIT[unit] == 0:
            return f"{sign}{ms // MS_PER_UNIT[unit]}{unit}"
    return f"{sign}{ms // 1000}.{ms % 1000:03d}".rstrip("0") + "s"


def _rounded(whole: int) -> str:
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m"
    if whole < _DAY_S:
        hours, minutes = divmod(whole // 60, 60)
        return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"
    days, hours = divmod(whole // 3600, 24)
    return f"{days}d{hours:02d}h" if hours else f"{days}d"


def _over(maximum: float) -> str:
    return f"above the limit of {format_duration(maximum)}; give {format_duration(maximum)} or less"


def _invalid(what: str, shown: str, advice: str) -> InputError:
    """``shown`` is the value as the message quotes it: ``'9999999d'`` for text, ``1e+21s``
    for a number."""
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return InputError(f"invalid {what} {shown}: {advice}", code="invalid_duration", value=shown)
