"""The CI budget gate as a library call: the verdict, its GitHub annotations and step summary.

:func:`evaluate` is the pure decision over a folded :class:`~escalate.core.state.RunState`: pass
or fail, the reasons it failed, and warnings worth showing even when it passes (an allowed
halt, a run close to its limit). :func:`check_gate` is what ``escalate gate`` calls: it folds
a run strictly and returns a :class:`GateResult` that also carries the annotations and the
Markdown summary as data. Where they go (stdout, ``GITHUB_STEP_SUMMARY``) is the caller's
business: nothing here reads the environment or writes a file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from escalate.core.money import Amount, parse_micros
from escalate.core.money import format_usd as usd
from escalate.core.state import RunState, Totals
from escalate.errors import CorruptLedger
from escalate.reports.report import halted_tasks, percent, pool_period_line, run_markdown, usage_level

if TYPE_CHECKING:
    from escalate.pools.pool import Pool, PoolReport
    from escalate.service import Ledger

# How many tasks or escalations a finding names before it says "…".
NAMED = 5

# What ``gate --pool --json`` reports of the pool's period (``pools show --json``'s keys).
POOL_GATE_KEYS = ("pool", "period", "period_kind", "tz", "period_start", "period_end", "cap_micros",
                  "pool_cap_micros", "extended_micros", "spent_micros", "reserved_micros",
                  "committed_micros", "remaining_micros")


class FindingJson(TypedDict):
    code: str
    message: str


class VerdictJson(TypedDict):
    run: str
    passed: bool
    max_spent_micros: int
    spent_micros: int
    committed_micros: int
    failures: list[FindingJson]
    warnings: list[FindingJson]


@dataclass(frozen=True, slots=True)
class Finding:
    """One reason a gate failed, or one warning: a stable code and a sentence for people."""

    code: str  # over_max_spent | over_max_committed | halted | escalation_open | near_limit | held
    message: str

    def to_json(self) -> FindingJson:
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

    def to_json(self) -> VerdictJson:
        return {
            "run": self.run,
            "passed": self.passed,
            "max_spent_micros": self.max_spent_micros,
            "spent_micros": self.spent_micros,
            "committed_micros": self.committed_micros,
            "failures": [finding.to_json() for finding in self.failures],
            "warnings": [finding.to_json() for finding in self.warnings],
        }


def gate_subject(noun: str, ledger_id: str, period: Mapping[str, Any] | None = None) -> str:
    """``run r1``, ``pool team`` or, for a pool with periods, ``pool team (day 2026-11-30)``;
    ``period``: a pool's ``pools show --json`` keys (or ``gate --pool --json``'s)."""
    if period is None or period["period_kind"] == "none":
        return f"{noun} {ledger_id}"
    return f"{noun} {ledger_id} ({period['period_kind']} {period['period']})"


def github_annotation(level: Literal["error", "warning"], message: str) -> str:
    """``message`` as one GitHub Actions workflow command (``::error title=…::…``), its data
    escaped as the runner expects: a newline in a value from the log cannot start a command."""
    escaped = message.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return f"::{level} title=escalate gate::{escaped}"


@dataclass(frozen=True, slots=True)
class Annotation:
    """One GitHub annotation as data: its level and its message (not yet escaped)."""

    level: Literal["error", "warning"]
    message: str

    @property
    def command(self) -> str:
        """The workflow command line a runner reads (see :func:`github_annotation`)."""
        return github_annotation(self.level, self.message)


@dataclass(frozen=True, slots=True)
class GateResult:
    """A gate's verdict over a run, with what CI shows of it."""

    state: RunState
    verdict: Verdict
    noun: str = "run"  # pool: ``state`` is the pool's period (check_pool_gate)
    period: PoolReport | None = None  # a pool's: the period the gate looked at
    failed_runs: tuple[str, ...] = ()  # a pool's: the member runs with a failure of their own
    over_pool: bool = False  # a pool's: its own money failed (not only a member's gate)

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    @property
    def failures(self) -> tuple[Finding, ...]:
        return self.verdict.failures

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return self.verdict.warnings

    @property
    def name(self) -> str:
        """What the gate looked at, for people (:func:`gate_subject`)."""
        return gate_subject(self.noun, self.state.run_id, self.period)

    def see(self) -> list[str]:
        """The commands that show what failed: the run's ``runs show``; for a pool,
        ``pools show`` when its money failed and each failing member's ``runs show``."""
        if self.noun == "run":
            return [f"escalate runs show {self.state.run_id}"]
        return ([f"escalate pools show {self.state.run_id}"] if self.over_pool else []) + [
            f"escalate runs show {run}" for run in self.failed_runs[:NAMED]]

    @property
    def annotations(self) -> tuple[Annotation, ...]:
        """An error per failure, then a warning per warning, each naming the run (or pool)."""
        name = self.name
        return (tuple(Annotation("error", f"{name}: {f.message}") for f in self.failures)
                + tuple(Annotation("warning", f"{name}: {f.message}") for f in self.warnings))

    @property
    def summary_markdown(self) -> str:
        """The step summary: the verdict, the totals, top tasks, halts and escalations (and
        for a pool, which period)."""
        summary = run_markdown(self.state, verdict=self.verdict, noun=self.noun)
        if self.period is None:
            return summary
        heading, _, rest = summary.partition("\n")
        return f"{heading}\n\n{pool_period_line(self.period)}\n{rest}"

    def totals(self) -> Totals:
        """The run's money, as ``runs show --json`` reports it."""
        return self.state.totals()

    def to_json(self) -> dict[str, Any]:
        """What ``escalate gate --json`` prints: the totals and the verdict."""
        if self.period is not None:
            verdict = {k: v for k, v in self.verdict.to_json().items() if k != "run"}
            return {**{key: value for key, value in self.period.items() if key in POOL_GATE_KEYS}, **verdict}
        return {**self.totals(), **self.verdict.to_json()}


def check_gate(
    source: Ledger | RunState,
    *,
    max_spent: Amount | None = None,
    allow_halts: bool = False,
    allow_open_escalations: bool = False,
    fail_on_held: bool = False,
) -> GateResult:
    """Run the CI gate over ``source``: a :class:`~escalate.Ledger` is folded strictly first
    (every check, never the checkpoint: :meth:`~escalate.Ledger.verified_state`), a ``RunState``
    is taken as it is. ``max_spent`` is an amount (USD ``str``/``Decimal`` or ``Micros``).
    Raises what reading the run raises (``UnknownRun``, ``CorruptLedger`` …); a failed gate
    is not an error here: see :attr:`GateResult.passed`."""
    limit = None if max_spent is None else parse_micros(max_spent, what="max_spent")
    state = source if isinstance(source, RunState) else source.verified_state()
    verdict = evaluate(state, max_spent_micros=limit, allow_halts=allow_halts,
                       allow_open_escalations=allow_open_escalations, fail_on_held=fail_on_held)
    return GateResult(state, verdict)


def check_pool_gate(
    pool: Pool,
    *,
    max_spent: Amount | None = None,
    allow_halts: bool = False,
    allow_open_escalations: bool = False,
    fail_on_held: bool = False,
) -> GateResult:
    """The CI gate over a pool: its money in the period now (spent or committed over
    ``max_spent``, default the pool's cap in the period, fails), and every member run's own
    gate (each folded strictly), its findings named by run."""
    from escalate.pools.member import member_first
    from escalate.service import Ledger

    limit = None if max_spent is None else parse_micros(max_spent, what="max_spent")
    report = pool.show()
    opened = pool.facts.opened
    for unreadable in report["unreadable"]:  # its money is not in the totals: never a pass
        raise CorruptLedger(unreadable["message"], code=unreadable["error"], run=unreadable["run"],
                            pool=pool.pool_id, line=unreadable["line"], problem=unreadable["problem"],
                            first_suspect_line=unreadable["line"])
    state = RunState(run_id=pool.pool_id, run_cap_micros=report["pool_cap_micros"],
                     task_cap_micros=report["pool_cap_micros"], policy=pool.state().policy,
                     opened_at="", spent_micros=report["spent_micros"],
                     reserved_micros=report["reserved_micros"], extended_micros=report["extended_micros"])
    money = evaluate(state, max_spent_micros=limit)
    failures, warnings = list(money.failures), list(money.warnings)
    failed_runs: list[str] = []
    for member in report["runs"]:
        # show() counted it as the pool's member; a ledger moved in since fails as it would there.
        store = pool.runs_store.ledger(member["run"], lock_timeout=pool.lock_timeout)
        member_first(store, pool.pool_id, opened.get(member["run"]))
        run = Ledger.open(pool.runs_store, member["run"], lock_timeout=pool.lock_timeout)
        verdict = evaluate(run.verified_state(), allow_halts=allow_halts,
                           allow_open_escalations=allow_open_escalations, fail_on_held=fail_on_held)
        failed_runs += [member["run"]] if verdict.failures else []
        failures += [Finding(f.code, f"run {member['run']}: {f.message}") for f in verdict.failures]
        warnings += [Finding(f.code, f"run {member['run']}: {f.message}") for f in verdict.warnings]
    verdict = Verdict(run=pool.pool_id, max_spent_micros=money.max_spent_micros,
                      spent_micros=state.spent_micros, committed_micros=state.committed_micros,
                      failures=tuple(failures), warnings=tuple(warnings))
    return GateResult(state, verdict, noun="pool", period=report, failed_runs=tuple(failed_runs),
                      over_pool=bool(money.failures))


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
    elif limit > 0 and usage_level(state.committed_micros, limit) != "low":
        warnings.append(Finding("near_limit", f"committed {usd(state.committed_micros)} is "
                                f"{percent(state.committed_micros, limit)} of {limit_name} {usd(limit)}"))

    halted = halted_tasks(state)
    if halted:
        finding = Finding("halted", f"{_count(len(halted), 'task')} halted ("
                          + _named(f"{task}: {reason}" for task, reason in halted) + ")")
        (warnings if allow_halts else failures).append(finding)

    open_escalations = list(state.open_escalations.values())
    if open_escalations:
        finding = Finding("escalation_open", f"{_count(len(open_escalations), 'escalation')} open ("
                          + _named(f"{e.id} for {e.task}" for e in open_escalations) + ")")
        (warnings if allow_open_escalations else failures).append(finding)

    held = [(task_id, task.reserved_micros) for task_id, task in state.tasks.items() if task.holding]
    if held:
        finding = Finding("held", f"{_count(len(held), 'task')} still "
                          + ("holds" if len(held) == 1 else "hold") + f" {usd(state.reserved_micros)} ("
                          + _named(f"{task}: {usd(amount)}" for task, amount in held)
                          + "); a job that ended without its release leaks its hold — release it "
                          f"with 'escalate release {state.run_id} TASK --actual USD'")
        (failures if fail_on_held else warnings).append(finding)

    return Verdict(run=state.run_id, max_spent_micros=limit, spent_micros=state.spent_micros,
                   committed_micros=state.committed_micros, failures=tuple(failures),
                   warnings=tuple(warnings))


def _named(items: Iterable[str]) -> str:
    """The first :data:`NAMED` of ``items``, comma-separated, with ``…`` when there are more."""
    listed = list(items)
    return ", ".join(listed[:NAMED]) + (", …" if len(listed) > NAMED else "")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")
