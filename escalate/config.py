"""Settings from the environment and their defaults, each variable read in one place.

The CLI passes what was given on the command line and ``None`` otherwise; the library
resolves ``None`` here, so a bad value in a variable is reported under its own name and
a Python caller gets the same defaults as the ``escalate`` command.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from escalate.durations import MAX_LOCK_TIMEOUT_S, MAX_NOTIFY_TIMEOUT_S, check_duration, parse_duration
from escalate.errors import InputError

DEFAULT_LOCK_TIMEOUT_S = 30.0
DEFAULT_ESCALATION_TIMEOUT_S = 3600
DEFAULT_NOTIFY_TIMEOUT_S = 10.0

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The default clock."""
    return datetime.now(UTC)


def default_runs_dir() -> Path:
    """``$ESCALATE_RUNS_DIR`` or ``./runs``."""
    return Path(os.environ.get("ESCALATE_RUNS_DIR") or "runs")


def lock_timeout(given: float | None) -> float:
    """``given`` (checked), else ``$ESCALATE_LOCK_TIMEOUT`` (seconds, or 500ms, 2m …; at most
    1d), else 30."""
    if given is not None:
        return check_duration(given, what="lock timeout", maximum=MAX_LOCK_TIMEOUT_S)
    return _duration_from_env("ESCALATE_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT_S, MAX_LOCK_TIMEOUT_S)


def notify_timeout(given: float | None) -> float:
    """``given`` (checked), else ``$ESCALATE_NOTIFY_TIMEOUT`` (seconds, or 500ms, 30s …; at
    most 1h), else 10."""
    if given is not None:
        return check_duration(given, what="notify timeout", maximum=MAX_NOTIFY_TIMEOUT_S)
    return _duration_from_env("ESCALATE_NOTIFY_TIMEOUT", DEFAULT_NOTIFY_TIMEOUT_S, MAX_NOTIFY_TIMEOUT_S)


def _duration_from_env(name: str, default: float, maximum: float) -> float:
    # An empty variable counts as unset, as the CLI's other environment variables do.
    raw = os.environ.get(name)
    return parse_duration(raw, what=name, maximum=maximum) if raw else default


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
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid-{os.getuid()}"


def check_actor(name: str) -> str:
    """``name`` if it can be recorded as who acted; :class:`InputError` otherwise."""
    if not name or len(name) > 128 or not name.isprintable():
        raise InputError(f"invalid actor {name[:40]!r}: use 1-128 printable characters",
                         code="invalid_actor", value=name[:40])
    return name
