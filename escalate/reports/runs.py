"""Library calls over many runs, and the verify report: what ``runs list``, ``escalations``,
``sweep`` and ``runs verify`` compute, for Python callers as for the CLI.

A runs folder that does not exist yet holds no runs (an empty answer, as on a fresh
checkout); a file in its place is bad input. One run that cannot be read never hides the
others: it is reported beside them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypedDict, cast, final

from escalate.core.events import PRIORITIES, Priority
from escalate.core.state import EscalationState, RunState
from escalate.errors import CorruptLedger, EscalateError, InputError
from escalate.escalation.delivery import SWEEP_LIMITS, SweepLimits, deliver_all
from escalate.service import Ledger
from escalate.stores.seam import LedgerStore, Store, is_store_url, open_store

RunWord = Literal["escalation open", "over cap", "halted tasks", "active", "idle", "archived"]


@final  # no further keys: `"error" in row` tells the two kinds of row apart
class RunRow(TypedDict):
    """One readable run of :func:`list_runs`: ``RunState.totals()``, when it was opened and
    one word for its state."""

    run: str
    cap_micros: int
    run_cap_micros: int
    task_cap_micros: int
    spent_micros: int
    reserved_micros: int
    committed_micros: int
    remaining_micros: int
    extended_micros: int
    events: int
    halts: int
    escalation: dict[str, Any]
    archived: bool  # retired by 'runs archive': listed only with every_run
    opened_at: str
    state: RunWord
    pool: str | None  # the pool the run belongs to (None: none)


@final
class BrokenRun(TypedDict):
    """A run :func:`list_runs` could not read: the error's code and message."""

    run: str
    error: str
    message: str
    opened_at: str  # empty: listed after the runs that say when they were opened


class InboxRow(TypedDict):
    """One escalation of :func:`inbox`: its run and ``Escalation.to_json()``."""

    run: str
    id: str
    task: str
    kind: str
    from_micros: int
    requested_micros: int
    remaining_micros: int
    reason: str
    offered: list[str]
    opened_at: str
    expires_at: str | None
    shadow: bool
    state: str
    mode: str | None
    by: str | None
    resolved_at: str | None
    extension_micros: int
    requested_by: str | None
    request_reason: str
    priority: str
    needed_extension_micros: int
    notify_attempts: int
    notified_at: str | None
    notified_ok: bool | None
    pool: str | None  # reason pool_cap: the pool whose approvers decide it
    # Computed when shown, not recorded: the log's needed_extension_micros is what it needed
    # when asked, and other tasks may have reserved or released since.
    fired: str  # the limit it fired on: run_cap, threshold, pool_cap or pool_threshold
    needed_now_micros: int | None  # the extension approving it needs now (None: not open)
    run_remaining_now_micros: int  # what is left of the run now
    run_pool: str | None  # the pool the run belongs to, whatever fired (None: none)
    pool_remaining_micros: int | None  # what is left of run_pool in its current period


class NoticeAttempt(TypedDict):
    """One attempt to deliver an escalation's notice (an ``escalation_notified`` line)."""

    attempt: int
    at: str
    ok: bool
    detail: str


class Approval(TypedDict):
    by: str
    role: str | None  # the identity the store vouched for (None: not recorded)
    at: str


class EscalationView(InboxRow):
    """``escalations show``: one escalation in full, with the money of its run and pool now,
    its approvals, every notice attempt, and the commands that answer it."""

    run_money: dict[str, int]
    pool_money: dict[str, Any] | None  # None: the run is in no pool, or it cannot be read
    approvers: list[str]  # who may answer it (empty: anyone but the requester)
    approvals: list[Approval]
    quorum: int  # approvals that decide it
    notices: list[NoticeAttempt]
    commands: dict[str, str]  # approve / pause / cancel: empty once it is settled


class SkippedRun(TypedDict):
    run: str
    error: str
    message: str


class Inbox(TypedDict):
    """The approver's inbox: escalations most urgent first, and the runs that could not be read."""

    escalations: list[InboxRow]
    skipped: list[SkippedRun]


class SweptEscalation(TypedDict):
    run: str
    escalation_id: str


class SweepFailure(TypedDict):
    """A run :func:`sweep_all` could not sweep: ``run`` and the error's ``to_json()`` (whose
    facts add further keys)."""

    run: str
    error: str
    message: str
    exit_code: int


class SweptNotice(TypedDict):
    """A notice :func:`sweep_all` sent again: ``attempt`` is ``None`` if not recorded."""

    run: str
    escalation_id: str
    attempt: int | None
    ok: bool
    detail: str


class SweepReport(TypedDict):
    status: Literal["swept"]
    runs: int
    expired: list[SweptEscalation]
    notified: list[SweptNotice]
    deferred: list[SweptEscalation]  # due, but not started before the deadline
    failures: list[SweepFailure]


class LogHead(TypedDict):
    seq: int
    hash: str


class LineProblem(TypedDict):
    line: int
    problem: str


class LineWarning(TypedDict):
    line: int
    warning: str


class VerifyReport(TypedDict):
    """What ``runs verify --json`` prints: ``ok`` when no line has a problem."""

    run: str
    ok: bool
    lines: int | None  # None when the first line is unreadable: nothing could be folded
    events: int
    torn_bytes: int | None
    head: LogHead | None
    problems: list[LineProblem]
    warnings: list[LineWarning]


def runs_root(runs_dir: str | os.PathLike[str] | Store) -> Path | Store:
    """``runs_dir`` for the calls that look at every run; a file there is a wrong folder.
    A store URL is opened once, so every run is read through one connection."""
    if not isinstance(runs_dir, (str, os.PathLike)) or is_store_url(os.fspath(runs_dir)):
        return open_store(runs_dir)
    root = Path(runs_dir)
    if root.exists() and not root.is_dir():
        raise InputError(f"the runs folder {root} is a file; give a folder with --runs-dir or "
                         "ESCALATE_RUNS_DIR", code="no_runs_dir", runs_dir=str(root))
    return root


def list_runs(runs_dir: str | os.PathLike[str] | Store, *,
              every_run: bool = False) -> list[RunRow | BrokenRun]:
    """Every run under ``runs_dir`` with its totals and state, newest first; a run that
    cannot be read is a :class:`BrokenRun` row. Archived runs only with ``every_run``."""
    root = runs_root(runs_dir)
    rows: list[RunRow | BrokenRun] = []
    for run_id in iter_run_ids(root):
        try:
            ledger = Ledger.open(root, run_id)
            state = ledger.state()
        except EscalateError as error:
            rows.append({"run": run_id, "error": error.code, "message": error.message, "opened_at": ""})
            continue
        if state.archived and not every_run:
            continue
        rows.append(cast(RunRow, {**state.totals(), "opened_at": state.opened_at,
                                  "state": run_word(state), "pool": ledger.pool_id()}))
    rows.sort(key=lambda row: (row["opened_at"], row["run"]), reverse=True)
    return rows


def run_word(state: RunState) -> RunWord:
    """The one word ``runs list`` shows for a run, the most urgent first."""
    if state.archived:  # finished for good: nothing open, nothing held
        return "archived"
    if state.open_escalations:
        return "escalation open"
    if state.remaining_micros < 0:
        return "over cap"
    if state.halts:
        return "halted tasks"
    return "active" if state.reserved_micros else "idle"


def inbox(runs_dir: str | os.PathLike[str] | Store, *, run: str | None = None,
          open_only: bool = False) -> Inbox:
    """Escalations across runs (or of ``run`` only), most urgent first: open before settled,
    then by priority, then newest first; ``open_only`` keeps those waiting for a person.
    An unreadable run is skipped and listed, unless it is ``run``."""
    root = runs_root(runs_dir)
    run_ids = [run] if run is not None else list(iter_run_ids(root))
    rows: list[InboxRow] = []
    skipped: list[SkippedRun] = []
    pools: dict[str, int | None] = {}  # each pool's remaining, read once for all its runs
    for run_id in run_ids:
        try:
            ledger = Ledger.open(root, run_id)
            state = ledger.state()
            pool = ledger.pool_id()
        except EscalateError as error:
            if run is not None:
                raise
            skipped.append({"run": run_id, "error": error.code, "message": error.message})
            continue
        if pool is not None and pool not in pools:
            pools[pool] = pool_remaining(root, pool)
        rows += [escalation_row(state, item, pool, None if pool is None else pools[pool])
                 for item in state.escalations.values() if not open_only or item.state == "open"]
    # Most urgent first: what waits for a person before what is settled, then by priority,
    # then newest first (two stable sorts).
    rows.sort(key=lambda row: row["opened_at"], reverse=True)
    rows.sort(key=lambda row: (row["state"] != "open" or row["shadow"], -PRIORITIES.index(
        cast(Priority, row["priority"]))))
    return {"escalations": rows, "skipped": skipped}


def pool_remaining(runs_dir: Path | Store, pool_id: str) -> int | None:
    """What is left of pool ``pool_id`` in its current period; None when the pool cannot be
    read (its members' escalations are still listed)."""
    from escalate.pools.pool import Pool

    try:
        return Pool.open(runs_dir, pool_id).show()["remaining_micros"]
    except EscalateError:
        return None


def escalation_row(state: RunState, escalation: EscalationState, pool: str | None,
                   pool_left: int | None) -> InboxRow:
    """``escalation`` of the run ``state`` as the inbox lists it, with what it needs now:
    the extension an approval would grant if given now, from what is left now of the run
    (or, for a ``pool_cap`` escalation, of ``pool``, which has ``pool_left``)."""
    from escalate.core.decide import fired_limit
    from escalate.core.resolve import grant_delta
    from escalate.core.rules import needed_extension

    row = escalation.to_json()
    needed: int | None = None
    if escalation.state == "open" and not escalation.shadow:
        left = pool_left if escalation.reason == "pool_cap" else state.remaining_micros
        needed = None if left is None else needed_extension(grant_delta(state, escalation), left)
    # A run belongs to one pool for good: its pool_cap escalations are that pool's.
    return cast(InboxRow, {"run": state.run_id, **row,
                           "pool": pool if escalation.reason == "pool_cap" else None,
                           "fired": fired_limit(row), "needed_now_micros": needed,
                           "run_remaining_now_micros": state.remaining_micros, "run_pool": pool,
                           "pool_remaining_micros": pool_left})


def escalation_view(runs_dir: str | os.PathLike[str] | Store, run_id: str,
                    escalation_id: str) -> EscalationView:
    """Escalation ``escalation_id`` of run ``run_id`` in full (:class:`EscalationView`),
    computed now from the run's log and its pool's; an unknown id is :class:`InputError`."""
    from escalate.core.ids import check_id
    from escalate.core.resolve import unknown_escalation
    from escalate.core.rules import extension_left
    from escalate.escalation.delivery import answer_commands

    root = runs_root(runs_dir)
    check_id(escalation_id, what="escalation id")
    ledger = Ledger.open(root, run_id)
    state = ledger.state()
    escalation = state.escalations.get(escalation_id)
    if escalation is None:
        raise unknown_escalation(state.run_id, escalation_id)
    pool = ledger.pool_id()
    report = None
    if pool is not None:
        from escalate.pools.pool import Pool

        try:
            report = Pool.open(root, pool).show()
        except EscalateError:
            report = None  # the run's own money and the escalation are still shown
    row = escalation_row(state, escalation, pool, None if report is None else report["remaining_micros"])
    policy = report["escalation"] if report is not None and escalation.reason == "pool_cap" else \
        state.policy.to_json()
    events, _ = ledger.events()
    waiting = escalation.state == "open" and not escalation.shadow
    return {
        **row,
        "run_money": {"cap_micros": state.cap_micros, "committed_micros": state.committed_micros,
                      "remaining_micros": state.remaining_micros, "extended_micros": state.extended_micros,
                      "extension_left_micros": extension_left(state.policy.max_extension_micros,
                                                              state.extended_micros)},
        "pool_money": None if report is None else {
            "pool": report["pool"], "period": report["period"], "cap_micros": report["cap_micros"],
            "committed_micros": report["committed_micros"], "remaining_micros": report["remaining_micros"],
            "extended_micros": report["extended_micros"],
            "extension_left_micros": extension_left(report["escalation"]["max_extension_micros"],
                                                    report["extended_micros"])},
        "approvers": list(policy.get("approvers", [])),
        "approvals": [{"by": escalation.by, "role": _resolver_role(events, escalation_id),
                       "at": escalation.resolved_at or ""}]
        if escalation.mode == "extend" and escalation.by else [],
        "quorum": 1,
        "notices": [{"attempt": event["attempt"], "at": event["ts"], "ok": event["ok"],
                     "detail": event.get("detail", "")}
                    for event in events if event.get("type") == "escalation_notified"
                    and event.get("id") == escalation_id],
        "commands": answer_commands(state.run_id, escalation_id, escalation.offered) if waiting else {},
    }


def _resolver_role(events: list[Any], escalation_id: str) -> str | None:
    """The identity the store recorded for whoever resolved ``escalation_id`` (its
    resolution's ``role``), if any."""
    return next((event.get("role") for event in events
                 if event.get("type") == "escalation_resolved" and event.get("id") == escalation_id), None)


def sweep_all(runs_dir: str | os.PathLike[str] | Store, *, run: str | None = None,
              limits: SweepLimits = SWEEP_LIMITS, **options: Any) -> SweepReport:
    """Pause by timeout every expired escalation in every run (or in ``run`` only), then
    send again the notices that are due within ``limits`` (:meth:`Ledger.sweep`): every
    expiry is written before any hook runs, and a notice not started by the deadline is
    listed in ``deferred`` and due at the next sweep. ``options`` are
    :meth:`Ledger.open`'s. A run that fails is listed in ``failures`` and the others are
    still swept; with ``run`` its error is raised."""
    root = runs_root(runs_dir)
    run_ids = [run] if run is not None else list(iter_run_ids(root))
    expired: list[SweptEscalation] = []
    due: list[dict[str, Any]] = []
    ledgers: dict[str, Ledger] = {}
    failures: list[SweepFailure] = []
    for run_id in run_ids:
        try:
            ledger = Ledger.open(root, run_id, **options)
            swept, notices = ledger.expire()
        except EscalateError as error:
            if run is not None:
                raise
            failures.append(cast(SweepFailure, {"run": run_id, **error.to_json()}))
            continue
        expired += [{"run": run_id, "escalation_id": escalation_id} for escalation_id in swept["expired"]]
        if notices:  # (only these ledgers are kept open until their notices are sent)
            ledgers[run_id] = ledger
            due += notices
    sent, left = deliver_all(due, lambda notice: ledgers[notice["run"]].send_notice(notice), limits)
    return {"status": "swept", "runs": len(run_ids), "expired": expired,
            "notified": [{"run": notice["run"], **outcome} for notice, outcome in sent],
            "deferred": [{"run": notice["run"], "escalation_id": notice["id"]} for notice in left],
            "failures": failures}


def verify_report(ledger: Ledger | LedgerStore) -> VerifyReport:
    """Check every line of ``ledger``'s log (a run's, or any ledger's in a store): the JSON,
    the seq run, the prev chain, the ledger rules and the event schema. Problems are
    reported, not raised."""
    store = ledger.store if isinstance(ledger, Ledger) else ledger
    try:
        replayed = store.verify()
    except CorruptLedger as error:  # the first line itself is bad: there is nothing to fold
        report = None
        problems = [(error.line, error.problem)]
    else:
        report = replayed
        problems = replayed.problems
    # Fields the fold does not use are checked too: every line against the event schema
    # (pydantic, loaded only here).
    from escalate.core.schema import line_problems

    with store.reader() as stream:
        found = dict(problems)
        problems = sorted([*problems, *((line, text) for line, text in line_problems(stream)
                                        if line not in found)])
    return {
        "run": store.run_id, "ok": not problems, "lines": report.lines if report else None,
        "events": report.state.seq if report else 0,
        "torn_bytes": report.torn_bytes if report else None,
        # The last line's hash: no later line vouches for it, so keep it elsewhere to
        # notice an edit of the last line later (see docs/reliability.md).
        "head": {"seq": report.state.seq, "hash": report.state.last_hash} if report else None,
        "problems": [{"line": line, "problem": text} for line, text in problems],
        "warnings": [{"line": line, "warning": text} for line, text in (report.warnings if report else [])],
    }


def iter_run_ids(runs_dir: str | os.PathLike[str] | Store) -> Iterator[str]:
    """The ids of the runs in a store (a runs folder: folders with a log), sorted; a pool's
    ledger is no run."""
    from escalate.pools.book import ledger_kinds

    store = open_store(runs_dir)
    return (ledger_id for ledger_id, kind in ledger_kinds(store) if kind != "pool_opened")
