"""The verify report of one ledger (what ``runs verify`` prints, and each log of a pool's):
every line checked — the JSON, the seq run, the prev chain, the ledger rules and the event
schema — and, for a pool's member, its approvals against the keys its pool pins.

It sits here, below :mod:`escalate.reports.runs` (which serves it for a :class:`Ledger`), so
that ``verify_pool`` checks its members without importing up the architecture.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

from escalate.errors import CorruptLedger

if TYPE_CHECKING:
    from escalate.stores.seam import LedgerStore, Store


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


def verify_ledger(store: LedgerStore, runs: Store | None = None) -> VerifyReport:
    """Check every line of ``store``'s log: the JSON, the seq run, the prev chain, the
    ledger rules and the event schema, and for a pool's member the approvals its pool
    decides against the keys the pool pins (in ``runs``, the store holding the pool; none
    given: not checked). Problems are reported, not raised."""
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
    if runs is not None and report is not None:
        from escalate.pools.signatures import member_problems

        found = dict(problems)
        problems = sorted([*problems, *((line, text) for line, text, _ in member_problems(runs, store)
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
