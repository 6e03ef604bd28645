"""Every event that moves money, held to one table (``escalate.core.payloads.MONEY``): the
money fields of every payload, escalate's fold, a pool's member fold, ``runs show --events``
(``describe_event``) and the tests' own audit fold (``conftest.AUDITED_MONEY``, written
apart from escalate) all count what the table says. An event type that moves money fails
here until it has its row and each of them counts it."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Annotated, Any, NotRequired, Union, get_args, get_origin, get_type_hints

import pytest
from conftest import AUDITED_MONEY, audit_log

from escalate import Ledger
from escalate.core.money import format_usd
from escalate.core.payloads import MONEY, PAYLOADS, Check, Total
from escalate.errors import Pending
from escalate.pools.pool import Pool
from escalate.reports.report import describe_event

RUN_TOTALS = (Total.CAP, Total.RESERVED, Total.SPENT)  # what a run's own log moves


def _is_money(hint: Any) -> bool:
    """Whether a payload field's type is micros (``MicrosInt``, ``SignedMicrosInt``, or
    either or null)."""
    if get_origin(hint) is NotRequired:
        return _is_money(get_args(hint)[0])
    if get_origin(hint) is Annotated:
        base, *marks = get_args(hint)
        return any(mark in (Check.MICROS, Check.SIGNED_MICROS) for mark in marks) or _is_money(base)
    if get_origin(hint) in (Union, types.UnionType):
        return any(_is_money(arg) for arg in get_args(hint))
    return False


def _money_fields() -> dict[str, set[str]]:
    """Each event type's top-level money fields, read from its payload TypedDict."""
    found = {}
    for payload in PAYLOADS:
        hints = get_type_hints(payload, include_extras=True)
        fields = {name for name, hint in hints.items() if _is_money(hint)}
        if fields:
            found[get_args(hints["type"])[0]] = fields
    return found


def _table(events: list[dict[str, Any]]) -> dict[Total, int]:
    """The totals ``events`` come to as :data:`MONEY` says, and nothing else."""
    sums = dict.fromkeys(Total, 0)
    for event in events:
        for name, move in MONEY.get(event["type"], {}).items():
            if move is None or name not in event:
                continue
            value = event[name]
            sums[move.total] = (value if move.how == "sets" else
                                sums[move.total] + (value if move.how == "adds" else -value))
    return sums


def _events(runs_dir: Path, ledger_id: str) -> list[dict[str, Any]]:
    """The lines of a run's or a pool's log (the file store's)."""
    return [json.loads(line) for line in (runs_dir / ledger_id / "events.ndjson").read_bytes().splitlines()]


@pytest.fixture
def logs(runs_dir: Path) -> Path:
    """A run and a pool's member run whose logs hold every event type that moves money: a
    reservation, an increase, an approval that extends the run and one that extends the
    pool, releases under and over what was held, a pool's cap changed."""
    run = Ledger.init(runs_dir, "r", cap="10", escalation="enforce", max_extension="5", actor="worker")
    run.reserve("a", "3")
    run.increase("a", "4")
    with pytest.raises(Pending) as asked:
        run.reserve("b", "8")  # $6 left: the run's cap is extended by $2
    run.approve(asked.value.escalation_id, by="lead")
    run.release("a", "3.5")
    run.release("b", "9")
    Pool.init(runs_dir, "team", cap="10", escalation="enforce", max_extension="5", actor="owner").close()
    member = Ledger.init(runs_dir, "m", pool="team", cap="100", actor="worker")
    member.reserve("a", "4")
    member.increase("a", "6")
    with pytest.raises(Pending) as asked:
        member.reserve("b", "6")  # $4 left of the pool: the pool is extended by $2
    member.approve(asked.value.escalation_id, by="lead")
    member.release("a", "5")
    member.release("b", "7")
    with Pool.open(runs_dir, "team", actor="owner") as pool:
        pool.set_policy(cap="12")
    return runs_dir


def test_every_money_field_of_every_event_has_its_row() -> None:
    rows = {kind: set(fields) for kind, fields in MONEY.items()}
    assert _money_fields() == rows, (
        "a money field without its row in escalate.core.payloads.MONEY (or a row for no such "
        "field): say how it moves the totals, or None when it only reports")


def test_the_scenario_writes_every_event_type_that_moves_money(logs: Path) -> None:
    written = {event["type"] for ledger in ("r", "m", "team") for event in _events(logs, ledger)}
    moving = {kind for kind, fields in MONEY.items() if any(fields.values())}
    assert moving <= written, f"write {sorted(moving - written)} in the logs fixture, so the checks see it"


def test_the_fold_counts_a_runs_money_as_the_table_says(logs: Path) -> None:
    for run_id in ("r", "m"):
        with Ledger.open(logs, run_id) as run:
            state = run.state()
        table = _table(_events(logs, run_id))
        assert (state.cap_micros, state.reserved_micros, state.spent_micros) == \
            (table[Total.CAP], table[Total.RESERVED], table[Total.SPENT])


def test_a_pool_counts_its_members_money_as_the_table_says(logs: Path) -> None:
    table = _table(_events(logs, "m"))
    pool_table = _table(_events(logs, "team"))
    with Pool.open(logs, "team") as pool:
        shown = pool.show()  # the member fold (escalate.pools.member), by period
        cap = pool.facts.cap_micros
    assert (shown["reserved_micros"], shown["spent_micros"], shown["extended_micros"]) == \
        (table[Total.RESERVED], table[Total.SPENT], table[Total.POOL_EXTENDED])
    assert table[Total.POOL_EXTENDED] == 2_000_000 and cap == pool_table[Total.POOL_CAP] == 12_000_000


def test_runs_show_events_names_every_amount_that_moves_a_runs_money(logs: Path) -> None:
    for event in _events(logs, "r") + _events(logs, "m"):
        moves = {name: move for name, move in MONEY.get(event["type"], {}).items()
                 if move is not None and move.total in RUN_TOTALS and event.get(name)}
        if not moves:
            continue
        described = describe_event(event)
        assert "unknown to this version" not in described, f"describe_event knows no {event['type']}"
        for name in moves:
            assert format_usd(event[name]) in described, f"describe_event leaves out {event['type']}.{name}"


def test_the_audit_fold_counts_what_the_table_says(logs: Path) -> None:
    words = {Total.CAP: "cap", Total.RESERVED: "held", Total.SPENT: "spent"}
    table = {kind: {name: words[move.total] for name, move in fields.items()
                    if move is not None and move.total in RUN_TOTALS}
             for kind, fields in MONEY.items()}
    assert {kind: fields for kind, fields in table.items() if fields} == AUDITED_MONEY, (
        "escalate.core.payloads.MONEY changed what moves a run's money: fold it in "
        "tests/conftest.audit_log (independently of escalate) and update AUDITED_MONEY beside it")
    for run_id in ("r", "m"):
        audit = audit_log(logs / run_id / "events.ndjson")
        sums = _table(_events(logs, run_id))
        assert (audit.cap_micros, audit.reserved_micros, audit.spent_micros) == \
            (sums[Total.CAP], sums[Total.RESERVED], sums[Total.SPENT])
