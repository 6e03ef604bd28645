"""A run's (or a pool's) escalation settings as given: :class:`PolicySettings`, the
keywords that become it (:class:`PolicyOptions`), their checks (:func:`make_policy`,
:func:`merge_policy`, :func:`run_caps`) and ``runs init``'s comparison with an existing run.

Only a command that sets them loads this module: building the frozen dataclass and the
TypedDicts costs every process that imports them (a reserve does not).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, TypedDict

from escalate.config import DEFAULT_ESCALATION_TIMEOUT_S, check_actor
from escalate.core import events
from escalate.core.durations import MAX_ESCALATION_TIMEOUT_S, check_duration, format_duration
from escalate.core.money import Amount, Micros, parse_micros
from escalate.core.money import format_usd as usd
from escalate.core.state import Policy, RunState
from escalate.errors import Conflict, InputError

Approvers = str | list[str] | tuple[str, ...]


def check_approvers(names: Approvers) -> tuple[str, ...]:
    """The approvers of ``runs init``/``runs set --approvers a,b``: each name checked as an
    actor, duplicates dropped, order kept; empty means anyone may approve."""
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    if not isinstance(names, (list, tuple)):
        raise InputError(f"invalid approvers {names!r}: give names, e.g. --approvers alice,bob",
                         code="invalid_actor", value=repr(names)[:40])
    return tuple(dict.fromkeys(check_actor(name) for name in names))


ApproverKeys = list[str] | tuple[str, ...] | Mapping[str, str | list[str] | tuple[str, ...]]


def check_approver_keys(keys: ApproverKeys) -> dict[str, tuple[str, ...]]:
    """The pinned keys of ``--approver-key NAME=KEY`` (repeatable; a name may have several),
    or a mapping of names to key lines: each name checked as an actor, each key as an
    OpenSSH public key line (ed25519, ecdsa or rsa); empty (or ``""`` only) pins nothing."""
    from escalate.core.sshsig import KEY_TYPES, SignatureError, parse_key

    pairs: list[tuple[Any, Any]]
    if isinstance(keys, Mapping):
        pairs = [(name, line) for name, lines in keys.items()
                 for line in ([lines] if isinstance(lines, str) else lines)]
    elif isinstance(keys, (list, tuple)):
        # ``--approver-key ""`` pins nothing: on ``set``, it unpins every key.
        pairs = [(item.split("=", 1)[0], item.split("=", 1)[1]) if isinstance(item, str) and "=" in item
                 else (item, None) for item in keys if item != ""]
    else:
        raise InputError(f"invalid approver keys {keys!r}: give NAME=KEY", code="invalid_key",
                         value=repr(keys)[:40])
    pinned: dict[str, tuple[str, ...]] = {}
    for given, line in pairs:
        if not isinstance(line, str) or not isinstance(given, str):
            raise InputError(f"invalid approver key {str(given)[:40]!r}: give NAME=KEY, e.g. "
                             "--approver-key 'alice=ssh-ed25519 AAAA… alice@host'", code="invalid_key",
                             value=str(given)[:40])
        name = check_actor(given.strip())
        try:
            key = parse_key(line).line
        except SignatureError as exc:
            raise InputError(f"invalid approver key for {name}: {exc}; give one line of a .pub file "
                             f"({', '.join(KEY_TYPES)})", code="invalid_key", value=line[:40]) from None
        pinned[name] = tuple(dict.fromkeys((*pinned.get(name, ()), key)))
    return pinned



class Unchanged(enum.Enum):
    """The type of :data:`UNCHANGED`: ``set_policy`` leaves such a setting as it is
    (``None`` already means "none" for some of them)."""

    UNCHANGED = "unchanged"


UNCHANGED: Final = Unchanged.UNCHANGED


def run_caps(cap: Amount, task_cap: Amount | None) -> tuple[int, int | None]:
    """``(run cap, task cap or None)`` in micros, checked (``runs init``)."""
    # Zero is refused too, so a negative cap gets the same advice, not "give 0 or more".
    run_cap = 0 if _below_zero(cap) else parse_micros(cap, what="cap")
    if run_cap == 0:
        raise InputError(f"invalid cap {str(cap)[:40]!r}: must be more than 0; give --cap, e.g. --cap 10",
                         code="invalid_amount")
    task_cap_micros = None if task_cap is None else parse_micros(task_cap, what="task cap")
    if task_cap_micros is not None and task_cap_micros > run_cap:
        raise InputError("invalid task cap: it is above the run cap; lower --task-cap or raise --cap",
                         code="invalid_amount")
    return run_cap, task_cap_micros


class PolicyOptions(TypedDict, total=False):
    """The escalation settings a caller names as keywords (``Pool.init``, ``Pool.set_policy``):
    :class:`PolicySettings`' fields. One left out takes its default on ``init`` and keeps its
    value on ``set_policy``."""

    escalation: str
    approval_threshold: Amount | None
    escalation_timeout_s: float | None
    max_extension: Amount
    approvers: Approvers
    approvers_match: str
    approver_keys: ApproverKeys
    quorum: int
    quorum_above: Amount | None


class RunPolicyOptions(PolicyOptions, total=False):
    """A run's escalation settings as keywords (``Ledger.init``, ``Ledger.set_policy``): a
    pool's, and how often open escalations are notified again."""

    renotify_every_s: float | None


@dataclass(frozen=True)
class PolicySettings:
    """A run's (or pool's) escalation settings as given, before they are checked: the one
    object the keywords of ``init`` and ``set_policy`` become, passed through to
    :meth:`policy`. The defaults are those of ``runs init``."""

    escalation: str = "off"
    approval_threshold: Amount | None = None
    escalation_timeout_s: float | None = DEFAULT_ESCALATION_TIMEOUT_S
    max_extension: Amount = "0"
    approvers: Approvers = ()
    renotify_every_s: float | None = None
    approvers_match: str = "claimed"
    approver_keys: ApproverKeys = ()
    quorum: int = 1
    quorum_above: Amount | None = None

    @classmethod
    def of(cls, policy: Policy) -> PolicySettings:
        """The settings ``policy`` was made from (amounts as :class:`Micros`)."""
        def micros(value: int | None) -> Micros | None:
            return None if value is None else Micros(value)

        return cls(escalation=policy.mode, approval_threshold=micros(policy.approval_threshold_micros),
                   escalation_timeout_s=policy.timeout_s, max_extension=Micros(policy.max_extension_micros),
                   approvers=policy.approvers, renotify_every_s=policy.renotify_every_s,
                   approvers_match=policy.approvers_match, approver_keys=policy.approver_keys,
                   quorum=policy.quorum, quorum_above=micros(policy.quorum_above_micros))

    @classmethod
    def split(cls, options: Mapping[str, Any],
              names: frozenset[str]) -> tuple[PolicySettings, dict[str, Any]]:
        """``options`` as the settings among ``names`` (a TypedDict's keys: what the caller
        may set) and the other keywords, left for the caller's constructor."""
        return (cls(**{key: value for key, value in options.items() if key in names}),
                {key: value for key, value in options.items() if key not in names})

    def changed(self, changes: Mapping[str, Any], names: frozenset[str]) -> PolicySettings:
        """These settings with ``changes`` (keys among ``names``) applied; an unknown
        setting is a :class:`TypeError`, as an unknown keyword is."""
        unknown = sorted(changes.keys() - names)
        if unknown:
            raise TypeError(f"set_policy() got an unexpected keyword argument {unknown[0]!r}")
        return dataclasses.replace(self, **changes)


def make_policy(settings: PolicySettings) -> Policy:
    """Validate the escalation settings of ``runs init`` / ``runs set``."""
    approvers_match, renotify_every_s = settings.approvers_match, settings.renotify_every_s
    mode, timeout_s = settings.escalation, settings.escalation_timeout_s
    if approvers_match not in events.APPROVERS_MATCHES:
        raise InputError(f"invalid approvers match {str(approvers_match)[:40]!r}: use claimed (the names "
                         "given) or vouched (who the store vouches for)", code="usage",
                         value=str(approvers_match)[:40])
    if renotify_every_s is not None:
        # At least a minute: sweep runs from cron, and a reminder a second is spam.
        check_duration(renotify_every_s, what="renotify interval", minimum=60,
                       maximum=MAX_ESCALATION_TIMEOUT_S)
        if renotify_every_s != int(renotify_every_s):
            raise InputError(f"invalid renotify interval {format_duration(renotify_every_s)}: give whole "
                             "seconds, e.g. 15m or 1h", code="invalid_duration",
                             value=format_duration(renotify_every_s))
    if mode not in events.MODES:
        raise InputError(f"invalid escalation mode {mode!r}: use off, shadow or enforce",
                         code="invalid_mode", value=mode)
    if timeout_s is not None:
        # An escalation that expires as it opens could never be approved; one past the
        # maximum would have no expiry date to write.
        check_duration(timeout_s, what="escalation timeout", minimum=1, maximum=MAX_ESCALATION_TIMEOUT_S)
        if timeout_s != int(timeout_s):
            raise InputError(f"invalid escalation timeout {format_duration(timeout_s)}: give whole "
                             "seconds, e.g. 90s, 30m or 1h", code="invalid_duration",
                             value=format_duration(timeout_s))
    threshold = settings.approval_threshold
    return Policy(
        mode=mode,
        approval_threshold_micros=(None if threshold is None
                                   else parse_micros(threshold, what="approval threshold")),
        timeout_s=None if timeout_s is None else int(timeout_s),
        max_extension_micros=parse_micros(settings.max_extension, what="max extension"),
        approvers=check_approvers(settings.approvers),
        renotify_every_s=None if renotify_every_s is None else int(renotify_every_s),
        approvers_match=approvers_match,
        approver_keys=check_approver_keys(settings.approver_keys) if settings.approver_keys else {},
        **_quorum(settings.quorum, settings.quorum_above, settings.approvers),
    )


def _quorum(quorum: int, above: Amount | None, approvers: Approvers) -> dict[str, Any]:
    """``--quorum N --quorum-above USD``, checked: 1 to 100 approvers, no more than the
    approver list names (a quorum nobody could reach would leave every escalation open)."""
    if type(quorum) is not int or not 1 <= quorum <= events.MAX_QUORUM:
        raise InputError(f"invalid quorum {str(quorum)[:40]!r}: give 1 to {events.MAX_QUORUM} approvers",
                         code="invalid_quorum", value=str(quorum)[:40])
    listed = check_approvers(approvers)
    if listed and len(listed) < quorum:
        raise InputError(f"invalid quorum {quorum}: only {len(listed)} approvers are listed "
                         f"({', '.join(listed)}); name more with --approvers, or ask for fewer",
                         code="invalid_quorum", value=str(quorum))
    above_micros = None if above is None else parse_micros(above, what="quorum threshold")
    return {"quorum": quorum, "quorum_above_micros": above_micros if quorum > 1 else None}


def merge_policy(current: Policy, changes: Mapping[str, Any],
                 names: frozenset[str] = RunPolicyOptions.__optional_keys__) -> Policy:
    """``current`` with the settings ``changes`` names changed (keys among ``names``),
    checked as :func:`make_policy` checks them."""
    return make_policy(PolicySettings.of(current).changed(changes, names))


def check_same_run(existing: RunState, pool: str | None, run_cap: int, task_cap: int, policy: Policy,
                   wanted_pool: str | None) -> None:
    """``runs init`` of an existing run: :class:`Conflict` unless it has these settings."""
    run_id = existing.run_id
    if pool != wanted_pool:
        raise Conflict(f"run {run_id} already exists " + (f"in pool {pool}" if pool else "in no pool")
                       + "; a run never joins or leaves a pool after it is created — pick a new run id",
                       run=run_id, pool=pool)
    wanted = (run_cap, task_cap, policy)
    if wanted == (existing.run_cap_micros, existing.task_cap_micros, existing.policy):
        return
    differences = setting_differences(existing, run_cap, task_cap, policy)
    only_policy = (existing.run_cap_micros, existing.task_cap_micros) == wanted[:2]
    raise Conflict(
        f"run {run_id} already exists with {'; '.join(differences)}; pick a new run id"
        + (", or change the escalation policy with 'escalate runs set'" if only_policy else ""),
        run=run_id, cap_micros=existing.run_cap_micros,
        task_cap_micros=existing.task_cap_micros, escalation=dict(existing.policy.to_json()))


def setting_differences(existing: RunState, run_cap: int, task_cap: int, policy: Policy) -> list[str]:
    """What ``runs init`` asked for that the existing run does not have, in words."""
    differences = []
    if existing.run_cap_micros != run_cap:
        differences.append(f"cap {usd(existing.run_cap_micros)}, not {usd(run_cap)}")
    if existing.task_cap_micros != task_cap:
        differences.append(f"task cap {usd(existing.task_cap_micros)}, not {usd(task_cap)}")
    have, want = existing.policy.to_json(), policy.to_json()
    differences += [f"{key.removesuffix('_micros').removesuffix('_s').replace('_', ' ')} "
                    f"{_setting(key, have.get(key))}, not {_setting(key, want.get(key))}"
                    for key in dict.fromkeys([*have, *want]) if have.get(key) != want.get(key)]
    return differences


def _setting(key: str, value: Any) -> str:
    """A policy value as people read it: money in USD, durations as 30m, none for unset."""
    if value is None:
        return "none"
    if key.endswith("_micros") and type(value) is int:
        return usd(value)
    if key.endswith("_s") and type(value) is int:
        return format_duration(value)
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def _below_zero(amount: Amount) -> bool:
    """Whether ``amount`` reads as a negative number: ``"-5"``, ``Decimal(-5)``, ``-5``; an
    option taken for a value (``"--json"``) is not one."""
    if isinstance(amount, str):
        text = amount.strip()
        return text.startswith("-") and not text.startswith("--")
    if isinstance(amount, Decimal):
        return amount.is_signed() and not amount.is_nan()
    return isinstance(amount, Micros) and amount < 0
