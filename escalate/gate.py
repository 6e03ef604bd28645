"""The CI budget gate: pure decisions over a folded run (no I/O, no CLI).

:func:`evaluate` takes a :class:`~escalate.ledger.RunState` and the gate's options and
returns a :class:`Verdict`: pass or fail, the reasons it failed, and warnings worth
showing even when it passes (an allowed halt, a run close to its limit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from escalate.ledger import RunState
from escalate.money import format_usd as usd

# At or above this share of the limit a passing gate still warns.
NEAR_LIMIT_SHARE = 0.8


@dataclass(frozen=True, slots=True)
class Finding:
    """One reason a gate failed, or one warning: a stable code and a sentence for people."""

    code: str  # over_max_spent | over_max_committed | halted | escalation_open | near_limit | held
    message: str

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the gate decided for one run."""

    run: str
    max_spent_micros: int
    spent_micros: int
    committed_micros: int
    failures: tuple[Finding, ...] = ()
    warnings: tuple[Finding, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures

    def reason(self) -> str:
        """The failures as one line (empty when the gate passes)."""
        return "; ".join(finding.message for finding in self.failures)

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "passed": self.passed,
            "max_spent_micros": self.max_spent_micros,
            "spent_micros": self.spent_micros,
            "committed_micros": self.committed_micros,
            "failures": [finding.to_json() for finding in self.failures],
            "warnings": [finding.to_json() for finding in self.warnings],
        }


def evaluate(
    state: RunState,
    *,
    max_spent_micros: int | None = None,
    allow_halts: bool = False,
    allow_open_escalations: bool = False,
    fail_on_held: bool = False,
) -> Verdict:
    """Decide whether ``state`` passes the gate.

    Fails when spent, or committed (spent plus what is still reserved), is over
    ``max_spent_micros`` (default: the run's cap including granted extensions); when a
    task was halted (unless ``allow_halts``); when an escalation is open (unless
    ``allow_open_escalations``). Exactly at the limit passes. Reservations still held warn
    (a job that crashed before its release leaks its hold), or fail with ``fail_on_held``.
    """
    limit = state.cap_micros if max_spent_micros is None else max_spent_micros
    limit_name = "the cap" if max_spent_micros is None else "--max-spent"
    failures: list[Finding] = []
    warnings: list[Finding] = []

    if state.spent_micros > limit:
        failures.append(Finding("over_max_spent", f"spent {usd(state.spent_micros)} is over "
                                f"{limit_name} {usd(limit)}"))
    elif state.committed_micros > limit:
        failures.append(Finding("over_max_committed", (
            f"committed {usd(state.committed_micros)} (spent {usd(state.spent_micros)} + reserved "
            f"{usd(state.reserved_micros)}) is over {limit_name} {usd(limit)}")))
    elif limit > 0 and state.committed_micros >= limit * NEAR_LIMIT_SHARE:
        warnings.append(Finding("near_limit", f"committed {usd(state.committed_micros)} is "
                                f"{percent(state.committed_micros, limit)} of {limit_name} {usd(limit)}"))

    halted = halted_tasks(state)
    if halted:
        finding = Finding("halted", f"{_count(len(halted), 'task')} halted ("
                          + ", ".join(f"{task}: {reason}" for task, reason in halted[:5])
                          + (", …" if len(halted) > 5 else "") + ")")
        (warnings if allow_halts else failures).append(finding)

    open_escalations = list(state.open_escalations.values())
    if open_escalations:
        finding = Finding("escalation_open", f"{_count(len(open_escalations), 'escalation')} open ("
                          + ", ".join(f"{e.id} for {e.task}" for e in open_escalations[:5])
                          + (", …" if len(open_escalations) > 5 else "") + ")")
        (warnings if allow_open_escalations else failures).append(finding)

    held = [(task_id, task.reserved_micros) for task_id, task in state.tasks.items() if task.holding]
    if held:
        finding = Finding("held", f"{_count(len(held), 'task')} still "
                          + ("holds" if len(held) == 1 else "hold") + f" {usd(state.reserved_micros)} ("
                          + ", ".join(f"{task}: {usd(amount)}" for task, amount in held[:5])
                          + (", …" if len(held) > 5 else "") + "); a job that ended without its release "
                          f"leaks its hold — release it with 'escalate release {state.run_id} TASK "
                          "--actual USD'")
        (failures if fail_on_held else warnings).append(finding)

    return Verdict(run=state.run_id, max_spent_micros=limit, spent_micros=state.spent_micros,
                   committed_micros=state.committed_micros, failures=tuple(failures),
                   warnings=tuple(warnings))


def halted_tasks(state: RunState) -> list[tuple[str, str]]:
    """``(task, halt reason)`` for every task that was halted, in log order."""
    return [(task_id, task.halt_reason or "") for task_id, task in state.tasks.items()
            if task.halt_reason is not None]


def top_tasks(state: RunState, limit: int = 10) -> list[tuple[str, int, str]]:
    """The most expensive tasks: ``(task, cost, state)``, where cost is the actual cost of a
    released task and what an in-flight task holds; ties keep log order."""
    costs: list[tuple[str, int, str]] = []
    for task_id, task in state.tasks.items():
        if task.actual_micros is not None:
            costs.append((task_id, task.actual_micros, task.state))
        elif task.holding:
            costs.append((task_id, task.reserved_micros, task.state))
    return sorted(costs, key=lambda row: -row[1])[:limit]


def percent(part: int, whole: int) -> str:
    """``part`` as a whole percentage of ``whole``, rounded down (99.96 % of a cap is not
    100 %), in integer arithmetic; every bar and message shows this one."""
    return f"{part * 100 // whole}%" if whole > 0 else "100%"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")
