"""Golden run logs: fixed files under tests/golden that every version must keep replaying to
the same totals. They were written once by the scripts below (with a FakeClock) and are
committed as they are; the tests only ever copy them (into a runs folder, or with ``runs
import`` into a PostgreSQL database: every test here runs on both stores).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import FakeClock, Location, log_bytes

from escalate import Ledger, Refused

GOLDEN = Path(__file__).parent / "golden"


def write_basic(root: Location) -> None:
    """``ledger_basic``: reserve, increase and release inside the caps."""
    clock = FakeClock()
    run = Ledger.init(root, "golden-basic", cap="50", task_cap="20", actor="golden", clock=clock)
    steps: list[Callable[[], Any]] = [
        lambda: run.reserve("a", "10"),
        lambda: run.reserve("b", "7.25"),
        lambda: run.increase("a", "12.5", reason="longer than planned"),
        lambda: run.release("b", "6.999999"),
        lambda: run.reserve("c", "0.000001"),
        lambda: run.release("a", "12.50"),
        lambda: run.reserve("d", "$20"),  # exactly the task cap
    ]
    for step in steps:
        clock.advance(1)
        step()


def write_halts(root: Location) -> None:
    """``ledger_halts``: halts on both caps, an exact-fit increase, a halted increase that is
    still released, and releases that over-run their reservations."""
    clock = FakeClock()
    run = Ledger.init(root, "golden-halts", cap="10", task_cap="6", actor="golden", clock=clock)

    def refused(call: Callable[[], Any]) -> Callable[[], None]:
        def expect() -> None:
            with pytest.raises(Refused):
                call()
        return expect

    steps: list[Callable[[], Any]] = [
        lambda: run.reserve("a", "4"),
        lambda: run.reserve("b", "5"),
        refused(lambda: run.reserve("c", "1.000001")),  # $1 left: run_cap
        refused(lambda: run.reserve("d", "7")),  # over the $6 task cap
        lambda: run.increase("a", "5"),  # takes the last $1 exactly
        refused(lambda: run.increase("b", "5.5")),  # nothing left: halted, still holds $5
        lambda: run.release("b", "5.25"),  # allowed after the halt; over-runs by $0.25
        lambda: run.release("a", "7"),  # over-runs by $2
        refused(lambda: run.reserve("e", "0")),  # remaining is negative: even $0 is refused
    ]
    for step in steps:
        clock.advance(1)
        step()


GOLDENS = {"ledger_basic": ("golden-basic", write_basic), "ledger_halts": ("golden-halts", write_halts)}

# Totals worked out by hand from the scripts above (micros).
#
# ledger_basic, cap $50, task cap $20:
#   spent    = b 6.999999 + a 12.50           = 19.499999 -> 19_499_999
#   reserved = c 0.000001 + d 20.00           = 20.000001 -> 20_000_001
#   committed = 19.499999 + 20.000001         = 39.50     -> 39_500_000
#   remaining = 50 - 39.50                    = 10.50     -> 10_500_000
#   lines: run_opened + 7 calls, none refused = 8 events, 0 halts
#
# ledger_halts, cap $10, task cap $6:
#   a 4 + b 5 = 9 reserved, $1 left; c asks 1.000001 -> halt run_cap; d asks 7 -> halt task_cap
#   a 4 -> 5 uses the last $1 (reserved 10, remaining 0); b 5 -> 5.5 -> halt run_cap
#   release b at 5.25 (held 5), release a at 7 (held 5)
#   spent    = 5.25 + 7                       = 12.25 -> 12_250_000
#   reserved = 0
#   remaining = 10 - 12.25                    = -2.25 -> -2_250_000
#   e asks 0 > -2.25 -> halt run_cap
#   lines: run_opened + 9 calls (every one writes a line) = 10 events, 4 halts (c, d, b, e)
EXPECTED: dict[str, dict[str, Any]] = {
    "ledger_basic": {
        "cap_micros": 50_000_000, "task_cap_micros": 20_000_000, "spent_micros": 19_499_999,
        "reserved_micros": 20_000_001, "committed_micros": 39_500_000, "remaining_micros": 10_500_000,
        "extended_micros": 0, "events": 8, "halts": 0,
        "tasks": {"a": ("released", None, 12_500_000), "b": ("released", None, 6_999_999),
                  "c": ("reserved", 1, None), "d": ("reserved", 20_000_000, None)},
    },
    "ledger_halts": {
        "cap_micros": 10_000_000, "task_cap_micros": 6_000_000, "spent_micros": 12_250_000,
        "reserved_micros": 0, "committed_micros": 12_250_000, "remaining_micros": -2_250_000,
        "extended_micros": 0, "events": 10, "halts": 4,
        "tasks": {"a": ("released", None, 7_000_000), "b": ("released", None, 5_250_000),
                  "c": ("halted", None, None), "d": ("halted", None, None), "e": ("halted", None, None)},
    },
}


@pytest.fixture(params=sorted(GOLDENS))
def golden(request: pytest.FixtureRequest, store: Location, cli: Any) -> tuple[str, str, Location]:
    """(golden name, run id, the store holding a private copy of the golden log as that run):
    the file copied into a runs folder, or imported into a database as it is."""
    name = request.param
    run_id = GOLDENS[name][0]
    if isinstance(store, Path):
        copy = store / run_id / "events.ndjson"
        copy.parent.mkdir(parents=True)
        shutil.copyfile(GOLDEN / f"{name}.ndjson", copy)
    else:
        imported = cli("runs", "import", run_id, str(GOLDEN / f"{name}.ndjson"))
        assert imported.exit_code == 0, imported.stderr
    assert log_bytes(store, run_id) == (GOLDEN / f"{name}.ndjson").read_bytes()
    return name, run_id, store


def test_golden_replays_to_the_hand_checked_totals(golden: tuple[str, str, Location]) -> None:
    name, run_id, store = golden
    expected = EXPECTED[name]
    state = Ledger.open(store, run_id).state()
    totals = state.totals()
    for key in ("cap_micros", "task_cap_micros", "spent_micros", "reserved_micros", "committed_micros",
                "remaining_micros", "extended_micros", "events", "halts"):
        assert totals[key] == expected[key], key
    assert {task_id: (task.state, task.reserved_micros if task.holding else None, task.actual_micros)
            for task_id, task in state.tasks.items()} == expected["tasks"]


def test_golden_passes_the_independent_audit(golden: tuple[str, str, Location], audit: Any) -> None:
    name, run_id, store = golden
    expected = EXPECTED[name]
    found = audit(log_bytes(store, run_id))
    assert len(found.events) == expected["events"]
    assert found.spent_micros == expected["spent_micros"]
    assert found.reserved_micros == expected["reserved_micros"]
    assert found.types["halt"] == expected["halts"]


def test_golden_through_runs_show_json(golden: tuple[str, str, Location], cli: Any) -> None:
    name, run_id, _ = golden
    expected = EXPECTED[name]
    result = cli("runs", "show", run_id, "--json")
    assert result.exit_code == 0
    show = result.json()
    for key in ("cap_micros", "spent_micros", "reserved_micros", "committed_micros", "remaining_micros",
                "extended_micros"):
        assert show[key] == expected[key], key
    assert {task["task"]: task["state"] for task in show["tasks"]} == {
        task_id: facts[0] for task_id, facts in expected["tasks"].items()}


def test_golden_halt_reasons() -> None:
    halts = [orjson.loads(line) for line in (GOLDEN / "ledger_halts.ndjson").read_bytes().splitlines()]
    halts = [event for event in halts if event["type"] == "halt"]
    assert [(h["task"], h["reason"], h["requested_micros"], h["remaining_micros"]) for h in halts] == [
        ("c", "run_cap", 1_000_001, 1_000_000),
        ("d", "task_cap", 7_000_000, 1_000_000),
        ("b", "run_cap", 5_500_000, 0),
        ("e", "run_cap", 0, -2_250_000),
    ]


def test_a_writer_continues_a_golden_log(golden: tuple[str, str, Location]) -> None:
    name, run_id, store = golden
    original = log_bytes(store, run_id)
    run = Ledger.open(store, run_id, actor="later")
    if EXPECTED[name]["remaining_micros"] > 0:
        assert run.reserve("later", "0.5")["status"] == "reserved"
    else:
        with pytest.raises(Refused):
            run.reserve("later", "0.5")
    data = log_bytes(store, run_id)
    assert data.startswith(original)  # nothing earlier is ever rewritten
    [new_line] = data[len(original):].splitlines()
    event = orjson.loads(new_line)
    assert event["seq"] == EXPECTED[name]["events"] + 1
    last = original.splitlines()[-1]
    assert event["prev"] == hashlib.sha256(last).hexdigest()[:16]
    assert (GOLDEN / f"{name}.ndjson").read_bytes() == original  # the golden itself is untouched


CONTRACT = {  # docs/events.md: the envelope and each type's payload fields
    "run_opened": ("run_cap_micros", "task_cap_micros", "escalation"),
    "budget_reserved": ("task", "amount_micros"),
    "budget_increased": ("task", "from_micros", "to_micros", "reason"),
    "released": ("task", "reserved_micros", "actual_micros"),
    "halt": ("task", "requested_micros", "remaining_micros", "reason"),
}


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_the_writer_still_writes_what_the_golden_says(name: str, store: Location) -> None:
    """Re-running the script writes the same contract fields line by line (new fields may be
    added to events; none of the documented ones may change)."""
    run_id, write = GOLDENS[name]
    write(store)
    fresh = [orjson.loads(line) for line in log_bytes(store, run_id).splitlines()]
    kept = [orjson.loads(line) for line in (GOLDEN / f"{name}.ndjson").read_bytes().splitlines()]
    assert len(fresh) == len(kept)
    for new, old in zip(fresh, kept, strict=True):
        keys = ("v", "seq", "ts", "type", "actor", *CONTRACT[old["type"]])
        assert {k: new[k] for k in keys} == {k: old[k] for k in keys}
