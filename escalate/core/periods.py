"""A pool's periods: calendar days, ISO weeks (Monday first) or months in the pool's time
zone, named by a key that sorts as text (``2026-11-30``, ``2026-W48``, ``2026-11``; a pool
without a period has one, ``all``).

Pure: the zone database is read through :mod:`zoneinfo`, which caches each zone.
"""

from __future__ import annotations

import functools
import os
import re
import zoneinfo
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from escalate.core.events import PERIODS, Period, format_ts, parse_ts
from escalate.errors import InputError

ALL = "all"  # the one period of a pool whose cap never repeats


def period_name(period: str, key: str) -> str:
    """``the day 2026-11-30``, ``the week 2026-W48`` …; ``all time`` for a pool without one."""
    return "all time" if period == "none" else f"the {period} {key}"


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


# Files in the zone folder that are no IANA zone name: a placeholder zone, the machine's zone
# and the template for POSIX TZ strings. (right/… and posix/… are never listed as names.)
_NOT_ZONE_NAMES = frozenset({"Factory", "localtime", "posixrules"})


def check_new_zone(name: str) -> ZoneInfo:
    """The zone of a new pool: :func:`zone`, and refused (exit 2) unless ``name`` is an IANA
    zone name exactly as the zone database lists it (a zone or a link to one, such as
    ``Europe/Berlin``, ``UTC``, ``Etc/UTC`` or ``US/Eastern``): ``right/…`` zones carry leap
    seconds that :mod:`zoneinfo` misreads (``right/Europe/Berlin`` is an hour off in winter),
    ``posix/…`` and ``posixrules`` are the folder's copies and templates, ``Factory`` is a
    placeholder, and ``localtime`` (or a name the zone folder links to ``/etc/localtime``) is
    whatever each machine is set to."""
    found = zone(name)
    if name.lower() == "localtime" or _follows_the_machine(name):
        raise InputError(f"time zone {name[:60]!r} means whatever zone each machine is set to; give "
                         "an IANA name such as UTC or Europe/Berlin", code="invalid_zone", value=name[:60])
    if name in _NOT_ZONE_NAMES or name not in _zone_names(tuple(zoneinfo.TZPATH)):
        raise InputError(f"time zone {name[:60]!r} is not an IANA zone name; give one such as UTC or "
                         "Europe/Berlin", code="invalid_zone", value=name[:60])
    return found


@functools.cache
def _zone_names(tzpath: tuple[str, ...]) -> frozenset[str]:
    """The names the zone database in the folders ``tzpath`` lists (walked once per set of
    folders: only new pools ask)."""
    return frozenset(zoneinfo.available_timezones())


def _follows_the_machine(name: str) -> bool:
    """Whether the file zoneinfo reads for ``name`` is (through symbolic links) one outside
    the zone folders, such as ``/etc/localtime``."""
    roots = [os.path.join(os.path.abspath(root), "") for root in zoneinfo.TZPATH]
    for root in roots:
        path = os.path.join(root, name)
        if not os.path.exists(path):
            continue
        for _ in range(40):  # a chain of links; a loop would not have existed above
            if not os.path.islink(path):
                return False
            path = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
            if not any(path.startswith(inside) for inside in roots):
                return True
        return True
    return False


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
    moment = parse_ts(ts)
    try:
        day = moment.astimezone(zone(tz)).date()
    except OverflowError:  # the calendar's first or last hours, in a zone that leaves it
        day = date.min if moment.year == 1 else date.max
    return key_of_day(period, day)


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
    try:
        end = _midnight(next_first_day(period, key), tz)
    except (OverflowError, ValueError):  # the last period a date can name: it ends with time
        end = format_ts(datetime.max.replace(tzinfo=UTC))
    try:
        start = _midnight(first_day(period, key), tz)
    except (OverflowError, ValueError):  # the first period a date can name: it starts with time
        start = format_ts(datetime.min.replace(tzinfo=UTC))
    return start, end


def _midnight(day: date, tz: str) -> str:
    return format_ts(datetime(day.year, day.month, day.day, tzinfo=zone(tz)).astimezone(UTC))


# A period's days must have midnights that UTC timestamps can name (years 1 and 9999 cannot
# hold a whole period in every zone); no reservation is older than 1970.
FIRST_YEAR, LAST_YEAR = 1970, 9998

_FORMS = {"none": "a date such as 2026-11-30", "day": "a date such as 2026-11-30",
          "week": "a date such as 2026-11-30, or a week such as 2026-W48",
          "month": "a date such as 2026-11-30, or a month such as 2026-11"}
_KEY_FORMS = {"week": re.compile(r"(\d{4})-W(\d{2})"), "month": re.compile(r"(\d{4})-(\d{2})")}
_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")


def key_of_date(period: str, text: str) -> str:
    """The key of the period holding ``text``: a date inside it (``2026-11-30``, a real
    calendar day) or the pool's own key form (``2026-W48`` for a week pool, ``2026-11`` for
    a month pool); :class:`InputError` (``invalid_period``) for anything else."""
    day = _parse_day(period, text)
    if day is not None:
        return key_of_day(period, day)
    # key_of_day of the period's first day gives back the key only when the key is real
    # (week 53 of a 52-week year, month 13 are refused).
    if _KEY_FORMS.get(period, _DATE).fullmatch(text) and _year_ok(text):
        try:
            if key_of_day(period, first_day(period, text)) == text:
                return text
        except ValueError:
            pass
    raise _invalid(period, text)


def _parse_day(period: str, text: str) -> date | None:
    """``text`` as a calendar date (YYYY-MM-DD only); None when it has another form."""
    if not isinstance(text, str) or not _DATE.fullmatch(text):
        return None
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise _invalid(period, text) from None
    if not _year_ok(text):
        raise _invalid(period, text)
    return day


def _year_ok(text: str) -> bool:
    return FIRST_YEAR <= int(text[:4]) <= LAST_YEAR


def _invalid(period: str, text: object) -> InputError:
    value = str(text)[:40]
    return InputError(f"invalid period {value!r}: give {_FORMS[period]} (years {FIRST_YEAR} to "
                      f"{LAST_YEAR})", code="invalid_period", value=value)
