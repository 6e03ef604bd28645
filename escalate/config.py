"""The environment and its defaults (each variable read in one place), and the checks of
who acts and of a request (a run's escalation settings are :mod:`escalate.settings`').

The CLI passes what was given on the command line and ``None`` otherwise; the library
resolves ``None`` here, so a bad value in a variable is reported under its own name and
a Python caller gets the same defaults as the ``escalate`` command.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from escalate.core import events
from escalate.core.durations import MAX_LOCK_TIMEOUT_S, MAX_NOTIFY_TIMEOUT_S, check_duration, parse_duration
from escalate.errors import InputError

DEFAULT_LOCK_TIMEOUT_S = 30.0
DEFAULT_ESCALATION_TIMEOUT_S = 3600
DEFAULT_NOTIFY_TIMEOUT_S = 10.0

Clock = Callable[[], datetime]


MIN_NOTIFY_TIMEOUT_S = 0.1


def utc_now() -> datetime:
    """The default clock."""
    return datetime.now(UTC)


def default_runs_dir() -> Path:
    """``$ESCALATE_RUNS_DIR`` or ``./runs``."""
    return Path(os.environ.get("ESCALATE_RUNS_DIR") or "runs")


def default_store() -> str | Path:
    """``$ESCALATE_STORE`` (a ``postgresql://`` URL or a runs folder), else
    :func:`default_runs_dir`. Both variables set is an error: which one holds the money
    would be a guess."""
    store = os.environ.get("ESCALATE_STORE")
    if not store:
        return default_runs_dir()
    if os.environ.get("ESCALATE_RUNS_DIR"):
        raise InputError("ESCALATE_STORE and ESCALATE_RUNS_DIR are both set: unset one (a runs "
                         "folder can be given as ESCALATE_STORE too)", code="ambiguous_store")
    return store


def lock_timeout(given: float | None) -> float:
    """``given`` (checked), else ``$ESCALATE_LOCK_TIMEOUT`` (seconds, or 500ms, 2m …; at most
    1d), else 30."""
    if given is not None:
        return check_duration(given, what="lock timeout", maximum=MAX_LOCK_TIMEOUT_S)
    return _duration_from_env("ESCALATE_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT_S, MAX_LOCK_TIMEOUT_S)


def notify_timeout(given: float | None) -> float:
    """``given`` (checked), else ``$ESCALATE_NOTIFY_TIMEOUT`` (seconds, or 500ms, 30s …; at
    most 1h), else 10."""
    # At least a tenth of a second: a hook killed as it starts only records failures.
    if given is not None:
        return check_duration(given, what="notify timeout", maximum=MAX_NOTIFY_TIMEOUT_S,
                              minimum=MIN_NOTIFY_TIMEOUT_S)
    return _duration_from_env("ESCALATE_NOTIFY_TIMEOUT", DEFAULT_NOTIFY_TIMEOUT_S, MAX_NOTIFY_TIMEOUT_S,
                              minimum=MIN_NOTIFY_TIMEOUT_S)


def _duration_from_env(name: str, default: float, maximum: float, minimum: float = 0) -> float:
    # An empty variable counts as unset, as the CLI's other environment variables do.
    raw = os.environ.get(name)
    return parse_duration(raw, what=name, maximum=maximum, minimum=minimum) if raw else default


def notify_cmd(given: str | None) -> str | None:
    """``given``, else ``$ESCALATE_NOTIFY_CMD`` (empty: none)."""
    return given if given is not None else (os.environ.get("ESCALATE_NOTIFY_CMD") or None)


def actor(given: str | None) -> str:
    """``given`` (checked), else ``$ESCALATE_ACTOR``, else the OS user."""
    return check_actor(given or _default_actor())


def _default_actor() -> str:
    name = os.environ.get("ESCALATE_ACTOR")
    if name:
        return name
    # What getpass.getuser() reads, without importing it (it loads termios too): start-up
    # is on every command's path.
    for variable in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        if user := os.environ.get(variable):
            return user
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, OSError):
        return f"uid-{os.getuid()}"


def check_actor(name: str) -> str:
    """``name`` if it can be recorded as who acted; :class:`InputError` otherwise."""
    if not isinstance(name, str):
        raise InputError(f"invalid actor {name!r}: give a name as text (1-128 printable characters)",
                         code="invalid_actor", value=repr(name)[:40])
    if not name or len(name) > 128 or not name.isprintable() or name != name.strip():
        # (No space at either end: "bob " would pass for bob to a person, not to a check.)
        raise InputError(f"invalid actor {name[:40]!r}: use 1-128 printable characters, no space "
                         "at either end", code="invalid_actor", value=name[:40])
    if name.casefold() == events.TIMEOUT_ACTOR:
        # Expiry resolves as "timeout": a person acting under that name could fake one.
        raise InputError(f"invalid actor {name!r}: the name is reserved for expiry; act under "
                         "your own name (--by or $ESCALATE_ACTOR)", code="reserved_actor", value=name)
    return name


def check_request(reason: Any, priority: Any) -> events.Priority:
    """What a requester tells an approver: a printable reason and a known priority (returned,
    as its type)."""
    if not isinstance(reason, str) or len(reason) > events.MAX_REASON_LENGTH or not reason.isprintable():
        shown = reason if isinstance(reason, str) else repr(reason)
        raise InputError(f"invalid reason {shown[:40]!r}: use up to {events.MAX_REASON_LENGTH} printable "
                         "characters", code="invalid_reason", value=shown[:40])
    if priority not in events.PRIORITIES:
        raise InputError(f"invalid priority {str(priority)[:40]!r}: use one of "
                         f"{', '.join(events.PRIORITIES)}", code="invalid_priority", value=str(priority)[:40])
    known: events.Priority = priority  # (one of them: checked above)
    return known
