"""A pool's periods: calendar days, ISO weeks (Monday first) or months in the pool's time
zone, named by a key that sorts as text (``2026-11-30``, ``2026-W48``, ``2026-11``; a pool
without a period has one, ``all``).

Pure: the zone database is read through :mod:`zoneinfo`, which caches each zone.
"""

from __future__ import annotations

import functools
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from escalate.errors import InputError
from escalate.events import PERIODS, Period, format_ts, parse_ts

ALL = "all"  # the one period of a pool whose cap never repeats


@functools.cache
def zone(name: str) -> ZoneInfo:
    """The time zone ``name`` (an IANA name such as ``Europe/Berlin``); :class:`InputError`
    (exit 2) if the zone database does not know it."""
    if not isinstance(name, str) or not name or len(name) > 255 or not name.isprintable() or ".." in name:
        raise InputError(f"unknown time zone {str(name)[:60]!r}: give an IANA name such as UTC or "
                         "Europe/Berlin", code="invalid_zone", value=str(name)[:60])
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InputError(f"unknown time zone {name[:60]!r}: give an IANA name such as UTC or "
                         "Europe/Berlin", code="invalid_zone", value=name[:60]) from None


def check_period(period: str) -> Period:
    """``period`` if it is one of none, day, week, month; :class:`InputError` otherwise."""
    if period not in PERIODS:
        raise InputError(f"invalid period {str(period)[:40]!r}: use none, day, week or month",
                         code="invalid_period", value=str(period)[:40])
    return period


def key_of_day(period: str, day: date) -> str:
    """The key of the period holding the local calendar ``day``."""
    if period == "day":
        return day.isoformat()
    if period == "week":
        year, week, _ = day.isocalendar()
        return f"{year}-W{week:02d}"
    if period == "month":
        return f"{day.year}-{day.month:02d}"
    return ALL


def period_key(period: str, tz: str, ts: str) -> str:
    """The key of the period the moment ``ts`` (an event's UTC timestamp) falls in."""
    if period == "none":
        return ALL
    return key_of_day(period, parse_ts(ts).astimezone(zone(tz)).date())


def first_day(period: str, key: str) -> date:
    """The first local day of the period ``key`` (not for ``none``)."""
    if period == "day":
        return date.fromisoformat(key)
    if period == "week":
        year, week = key.split("-W")
        return date.fromisocalendar(int(year), int(week), 1)
    year, month = key.split("-")
    return date(int(year), int(month), 1)


def next_first_day(period: str, key: str) -> date:
    """The first local day of the period after ``key``."""
    start = first_day(period, key)
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(days=7)
    return date(start.year + start.month // 12, start.month % 12 + 1, 1)


def bounds(period: str, tz: str, key: str) -> tuple[str | None, str | None]:
    """When the period ``key`` starts and when the next one starts, as UTC timestamps
    (local midnights); ``(None, None)`` for a pool without a period."""
    if period == "none":
        return None, None
    return _midnight(first_day(period, key), tz), _midnight(next_first_day(period, key), tz)


def _midnight(day: date, tz: str) -> str:
    return format_ts(datetime(day.year, day.month, day.day, tzinfo=zone(tz)).astimezone(UTC))


def key_of_date(period: str, text: str) -> str:
    """The key of the period holding ``text``: a date inside it (``2026-11-30``) or the key
    itself (``2026-W48``, ``2026-11``); :class:`InputError` otherwise."""
    if period == "none":
        return ALL
    try:
        return key_of_day(period, date.fromisoformat(text))
    except ValueError:
        pass
    try:
        if key_of_day(period, first_day(period, text)) == text:
            return text
    except ValueError:
        pass
    example = {"day": "2026-11-30", "week": "2026-11-30 or 2026-W48", "month": "2026-11-30 or 2026-11"}
    raise InputError(f"invalid period {text[:40]!r}: give a date inside it, e.g. {example[period]}",
                     code="invalid_period", value=text[:40])
