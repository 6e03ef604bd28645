"""Library calls over many runs, and the verify report: what ``runs list``, ``sweep`` and
``runs verify`` compute, for Python callers as for the CLI (``escalations``:
:mod:`escalate.reports.inbox`).

A runs folder that does not exist yet holds no runs (an empty answer, as on a fresh
checkout); a file in its place is bad input. One run that cannot be read never hides the
others: it is reported beside them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Literal, TypedDict, Unpack, cast, final

from escalate.core.state import RunState, Totals
from escalate.errors import EscalateError
from escalate.escalation.delivery import SWEEP_LIMITS, SweepLimits, deliver_all
from escalate.pools.verify import VerifyReport, verify_ledger
from escalate.service import Ledger, LedgerOptions
from escalate.stores.seam import LedgerStore, Store, StoreLocation, owned_store

RunWord = Literal["escalation open", "over cap", "halted tasks", "active", "idle", "archived"]


@final  # no further keys: `"error" in row` tells the two kinds of row apart
class RunRow(Totals):
    """One readable run of :func:`list_runs`: ``RunState.totals()`` (an archived run is listed
    only with ``every_run``), when it was opened and one word for its state."""

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


@contextmanager
def opened_store(location: StoreLocation) -> Iterator[Store]:
    """The store at ``location`` for the calls that look at every run, opened once (so every
    run is read through one connection) and closed at the end if opened here; a file there
    is a wrong folder."""
    with owned_store(location) as store:
        store.check_usable()
        yield store


def list_runs(location: StoreLocation, *,
              every_run: bool = False) -> list[RunRow | BrokenRun]:
    """Every run under ``location`` with its totals and state, newest first; a run that
    cannot be read is a :class:`BrokenRun` row. Archived runs only with ``every_run``."""
    rows: list[RunRow | BrokenRun] = []
    with opened_store(location) as store:
        for run_id in iter_run_ids(store):
            try:
                with Ledger.open(store, run_id) as ledger:
                    state, pool = ledger.state(), ledger.pool_id()
            except EscalateError as error:
                rows.append({"run": run_id, "error": error.code, "message": error.message, "opened_at": ""})
                continue
            if state.archived and not every_run:
                continue
            rows.append({**state.totals(), "opened_at": state.opened_at, "state": run_word(state),
                         "pool": pool})
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


def sweep_all(location: StoreLocation, *, run: str | None = None,
              limits: SweepLimits = SWEEP_LIMITS, **options: Unpack[LedgerOptions]) -> SweepReport:
    """Pause by timeout every expired escalation in every run (or in ``run`` only), then
    send again the notices that are due within ``limits`` (:meth:`Ledger.sweep`): every
    expiry is written before any hook runs, and a notice not started by the deadline is
    listed in ``deferred`` and due at the next sweep. ``options`` are
    :meth:`Ledger.open`'s. A run that fails is listed in ``failures`` and the others are
    still swept; with ``run`` its error is raised."""
    with opened_store(location) as store, ExitStack() as opened:
        run_ids = [run] if run is not None else list(iter_run_ids(store))
        expired: list[SweptEscalation] = []
        due: list[dict[str, Any]] = []
        ledgers: dict[str, Ledger] = {}
        failures: list[SweepFailure] = []
        for run_id in run_ids:
            try:
                ledger = opened.enter_context(Ledger.open(store, run_id, **options))
                swept, notices = ledger.expire()
            except EscalateError as error:
                if run is not None:
                    raise
                # (A cast: the error's facts are further keys, which no TypedDict can list.)
                failures.append(cast(SweepFailure, {"run": run_id, **error.to_json()}))
                continue
            expired += [{"run": run_id, "escalation_id": escalation_id} for escalation_id in swept["expired"]]
            if notices:  # (only these ledgers are used again, until their notices are sent)
                ledgers[run_id] = ledger
                due += notices
            else:
                ledger.close()  # (a sweep of many runs keeps none of their handles open)
        sent, left = deliver_all(due, lambda notice: ledgers[notice["run"]].send_notice(notice), limits)
    return {"status": "swept", "runs": len(run_ids), "expired": expired,
            "notified": [{"run": notice["run"], **outcome} for notice, outcome in sent],
            "deferred": [{"run": notice["run"], "escalation_id": notice["id"]} for notice in left],
            "failures": failures}


def verify_report(ledger: Ledger | LedgerStore, *, runs: Store | None = None) -> VerifyReport:
    """Check every line of ``ledger``'s log (a run's, or any ledger's in a store): the JSON,
    the seq run, the prev chain, the ledger rules and the event schema, and for a pool's
    member the approvals its pool decides against the keys the pool pins (in ``runs``, the
    store holding the pool: a :class:`Ledger`'s own, unless given). Problems are reported,
    not raised."""
    store = ledger.store if isinstance(ledger, Ledger) else ledger
    runs = ledger.runs_store if runs is None and isinstance(ledger, Ledger) else runs
    return verify_ledger(store, runs)


def iter_run_ids(location: StoreLocation) -> Iterator[str]:
    """The ids of the runs in a store (a runs folder: folders with a log), sorted; a pool's
    ledger is no run."""
    from escalate.pools.book import ledger_kinds

    with owned_store(location) as store:
        yield from (ledger_id for ledger_id, kind in ledger_kinds(store) if kind != "pool_opened")
