"""The fold's field checks: each reads one field of an event line, checks its type and
range, and returns it or raises :class:`~escalate.core.state.RuleViolation` with a message that
names the field. No I/O; used by :mod:`escalate.core.fold` and :mod:`escalate.core.fold_escalations`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from escalate.core.events import (
    APPROVERS_MATCHES,
    MAX_ACTOR_LENGTH,
    MAX_QUORUM,
    MAX_TIMEOUT_S,
    MODES,
    TIMESTAMP_PATTERN,
    parse_ts,
)
from escalate.core.ids import shown_value, valid_id
from escalate.core.money import MAX_MICROS
from escalate.core.state import Policy, RuleViolation

_TIMESTAMP = TIMESTAMP_PATTERN


def int_field(event: Mapping[str, Any], key: str, *, nullable: bool = False, limit: int = MAX_MICROS) -> Any:
    """A non-negative integer of at most ``limit`` (None too, if ``nullable``)."""
    value = event.get(key)
    if value is None and nullable:
        return None
    if type(value) is not int or not 0 <= value <= limit:
        raise not_int(key, value, limit)
    return value


def signed_field(event: Mapping[str, Any], key: str) -> int:
    """A signed amount (``remaining_micros`` is negative after an over-run release)."""
    value = event.get(key, 0)
    if type(value) is not int:
        raise RuleViolation(f"field {key!r} must be an integer amount in micros, got {shown_value(value)}")
    return value


def name_field(event: Mapping[str, Any], key: str, *, limit: int = MAX_ACTOR_LENGTH) -> str:
    """A printable string of 1 to ``limit`` characters (names, file names): shown to people."""
    value = event.get(key)
    if type(value) is not str or not 0 < len(value) <= limit or not value.isprintable():
        raise RuleViolation(f"field {key!r} must be 1-{limit} printable characters, got {shown_value(value)}")
    return value


def id_field(event: Mapping[str, Any], key: str) -> str:
    """A run, task or escalation id, by the rule of :mod:`escalate.core.ids`."""
    value = event.get(key)
    if not valid_id(value):
        raise RuleViolation(f"field {key!r} must be an id (1-128 of A-Z a-z 0-9 . _ : -, no '..'), "
                            f"got {shown_value(value)}")
    return value


def ts_field(event: Mapping[str, Any], key: str, *, nullable: bool = False) -> Any:
    """A timestamp exactly as :func:`escalate.core.events.format_ts` writes it."""
    value = event.get(key)
    if value is None and nullable:
        return None
    if type(value) is str and _TIMESTAMP.fullmatch(value):
        try:
            parse_ts(value)
            return value
        except ValueError:
            pass
    raise RuleViolation(f"field {key!r} must be a UTC timestamp like 2026-11-23T14:00:00.123456Z, "
                        f"got {shown_value(value)}")


def text_field(event: Mapping[str, Any], key: str, *, limit: int) -> str:
    """Printable text of at most ``limit`` characters, empty when absent (a reason)."""
    value = event.get(key, "")
    if type(value) is not str or len(value) > limit or not value.isprintable():
        raise RuleViolation(f"field {key!r} must be at most {limit} printable characters, "
                            f"got {shown_value(value)}")
    return value


def choice_field(event: Mapping[str, Any], key: str, choices: tuple[str, ...], default: Any = None) -> Any:
    """One of ``choices`` (``default`` when absent, if given)."""
    value = event.get(key, default)
    if type(value) is not str or value not in choices:
        raise RuleViolation(f"field {key!r} must be one of {', '.join(choices)}, got {shown_value(value)}")
    return value


def policy_field(raw: Any) -> Policy:
    """The ``escalation`` object of ``run_opened`` and ``policy_changed``."""
    if not isinstance(raw, dict):
        raise RuleViolation("field 'escalation' must be an object")
    mode = raw.get("mode")
    if type(mode) is not str or mode not in MODES:
        raise RuleViolation(f"unknown escalation mode {shown_value(mode)}")
    return Policy(
        mode=mode,
        approval_threshold_micros=int_field(raw, "approval_threshold_micros", nullable=True),
        timeout_s=int_field(raw, "timeout_s", nullable=True, limit=MAX_TIMEOUT_S),
        max_extension_micros=int_field(raw, "max_extension_micros"),
        approvers=_approvers(raw),
        approver_keys=_approver_keys(raw) if "approver_keys" in raw else {},
        # Absent in runs made before it existed, and in runs that never re-deliver.
        renotify_every_s=int_field(raw, "renotify_every_s", nullable=True, limit=MAX_TIMEOUT_S),
        # Absent in runs made before it existed: names as given.
        approvers_match=choice_field(raw, "approvers_match", APPROVERS_MATCHES, "claimed"),
        quorum=max(1, int_field(raw, "quorum", limit=MAX_QUORUM)) if "quorum" in raw else 1,
        quorum_above_micros=int_field(raw, "quorum_above_micros", nullable=True),
    )


def _approvers(raw: dict[str, Any]) -> tuple[str, ...]:
    """``escalation.approvers``: absent or a list of actor names (empty: anyone)."""
    names = raw.get("approvers", [])
    if type(names) is not list:
        raise RuleViolation(f"field 'approvers' must be a list of names, got {shown_value(names)}")
    return tuple(name_field({"approvers": name}, "approvers") for name in names)


def _approver_keys(raw: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """``escalation.approver_keys``: approver names, each with a list of OpenSSH key lines."""
    from escalate.core.sshsig import SignatureError, parse_key  # (only a policy that pins keys)

    pinned = raw["approver_keys"]
    if type(pinned) is not dict or not pinned:
        raise RuleViolation(f"field 'approver_keys' must map names to key lines, got {shown_value(pinned)}")
    keys = {}
    for name, lines in pinned.items():
        name_field({"approver_keys": name}, "approver_keys")
        if type(lines) is not list or not lines or not all(type(line) is str for line in lines):
            raise RuleViolation(f"field 'approver_keys' must list key lines for {name!r}")
        try:
            keys[name] = tuple(parse_key(line).line for line in lines)
        except SignatureError as exc:
            raise RuleViolation(f"field 'approver_keys': a key of {name!r} is not an OpenSSH public key "
                                f"line ({exc})") from None
    return keys


# The hot handlers of the fold check their fields inline (``type(x) is int``), in the order
# the messages name them; these build the messages.


def not_int(key: str, value: Any, limit: int = MAX_MICROS) -> RuleViolation:
    """The problem of a field that is not an integer amount from 0 to ``limit``."""
    return RuleViolation(f"field {key!r} must be a non-negative integer of at most {limit}, "
                         f"got {shown_value(value)}")


def not_task(task_id: Any) -> RuleViolation:
    """The problem of a ``task`` field that is not an id."""
    return RuleViolation("field 'task' must be an id (1-128 of A-Z a-z 0-9 . _ : -, no '..'), "
                         f"got {shown_value(task_id)}")
