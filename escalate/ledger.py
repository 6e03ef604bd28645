"""The names :mod:`escalate.ledger` had before it was split, re-exported while callers move.

The fold lives in :mod:`escalate.fold` (state classes in :mod:`escalate.state`), the
decisions in :mod:`escalate.decide`, the budget arithmetic in :mod:`escalate.rules`, the
event constants in :mod:`escalate.events`. Old names map to new ones: ``Escalation`` is
:class:`~escalate.state.EscalationState`, ``open_run`` is :func:`~escalate.fold.initial_state`.
"""

from __future__ import annotations

from escalate.decide import (
    Decision,
    decide_increase,
    decide_policy,
    decide_release,
    decide_reserve,
    decide_resolution,
    expire,
    is_expired,
    run_opened_payload,
)
from escalate.events import (
    ESCALATION_KINDS,
    ESCALATION_REASONS,
    HALT_REASONS,
    MAX_ACTOR_LENGTH,
    MAX_TIMEOUT_S,
    MODES,
    RESOLUTIONS,
)
from escalate.fold import apply, apply_payload
from escalate.fold import initial_state as open_run
from escalate.state import EscalationState as Escalation
from escalate.state import Policy, RuleViolation, RunState, Task

__all__ = [
    "ESCALATION_KINDS", "ESCALATION_REASONS", "HALT_REASONS", "MAX_ACTOR_LENGTH", "MAX_TIMEOUT_S", "MODES",
    "RESOLUTIONS", "Decision", "Escalation", "Policy", "RuleViolation", "RunState", "Task", "apply",
    "apply_payload", "decide_increase", "decide_policy", "decide_release", "decide_reserve",
    "decide_resolution", "expire", "is_expired", "open_run", "run_opened_payload",
]
