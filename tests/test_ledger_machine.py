"""A hypothesis state machine: random reserve/increase/release calls against the library,
checked after every step against a tiny reference model written here from docs/concepts.md
("Reservations", "Totals and caps"; not from escalate/core/fold.py or escalate/core/decide.py). It runs
on both stores: a runs folder and a PostgreSQL database."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import Location, audit_log, log_bytes
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from escalate import Conflict, EscalateError, Ledger, Micros, Refused
from escalate.core.money import MICROS_PER_USD
from escalate.stores.seam import Store, open_store

TASKS = st.sampled_from([f"t{i}" for i in range(16)])
# Amounts are drawn as eighths of the cap (up to 10/8: over the run and task caps) plus a
# small jitter, so exact fits, one-micro misses and idempotent repeats all come up often.
SHARES = st.one_of(st.integers(min_value=0, max_value=3), st.integers(min_value=0, max_value=10))
JITTER = st.one_of(st.sampled_from([0, 0, 0, -1, 1]), st.integers(min_value=-50_000, max_value=50_000))
FORMS = st.sampled_from(["text", "dollar-text", "decimal", "int"])


def as_amount(micros: int, form: str) -> Any:
    """The same money in each form the library accepts."""
    whole, fraction = divmod(micros, MICROS_PER_USD)
    text = f"{whole}.{fraction:06d}".rstrip("0").rstrip(".")
    if form == "text":
        return text
    if form == "dollar-text":
        return "$" + text
    if form == "decimal":
        return Decimal(text)
    return Micros(micros)


@dataclass
class ModelTask:
    state: str  # reserved | released | halted
    amount: int = 0  # the reservation it holds (when holding)
    holding: bool = False
    actual: int | None = None


class Model:
    """The rules of docs/concepts.md in as few lines as possible; outcomes are 'ok', 'exists'
    or an error class."""

    def __init__(self, cap: int, task_cap: int) -> None:
        self.cap = cap
        self.task_cap = task_cap
        self.tasks: dict[str, ModelTask] = {}
        self.spent = 0
        self.reserved = 0
        self.events = 1  # run_opened

    @property
    def remaining(self) -> int:
        return self.cap - self.spent - self.reserved

    def _halt(self, task_id: str) -> type[EscalateError]:
        task = self.tasks.setdefault(task_id, ModelTask("halted"))
        task.state = "halted"
        self.events += 1
        return Refused

    def reserve(self, task_id: str, amount: int) -> str | type[EscalateError]:
        task = self.tasks.get(task_id)
        if task is not None:
            if task.state == "released":
                return Conflict
            if task.state == "halted":
                return Refused
            return "exists" if task.amount == amount else Conflict
        if amount > self.task_cap or amount > self.remaining:
            return self._halt(task_id)
        self.tasks[task_id] = ModelTask("reserved", amount=amount, holding=True)
        self.reserved += amount
        self.events += 1
        return "ok"

    def increase(self, task_id: str, to: int) -> str | type[EscalateError]:
        task = self.tasks.get(task_id)
        if task is None or task.state == "released":
            return Conflict
        if task.state == "halted":
            return Refused
        if to < task.amount:
            return Conflict
        if to == task.amount:
            return "exists"
        if to > self.task_cap or to - task.amount > self.remaining:
            return self._halt(task_id)  # keeps holding what it had: release settles it
        self.reserved += to - task.amount
        task.amount = to
        self.events += 1
        return "ok"

    def release(self, task_id: str, actual: int) -> str | type[EscalateError]:
        task = self.tasks.get(task_id)
        if task is not None and task.state == "released":
            return "exists" if task.actual == actual else Conflict
        if task is None or not task.holding:
            return Conflict
        self.reserved -= task.amount
        self.spent += actual
        task.state, task.holding, task.actual = "released", False, actual
        self.events += 1
        return "ok"


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self, store: Location, run_id: str) -> None:
        super().__init__()
        self.store = store
        # What the checks read through: a database is reached by one store (one connection)
        # for the example, not by three new connections after every step; each check still
        # opens a new Ledger, which folds what the database holds.
        self.reads: Location | Store = store if isinstance(store, Path) else open_store(store)
        self.run_id = run_id
        self.root = Path(tempfile.mkdtemp(prefix="escalate-machine-"))
        self.model: Model | None = None
        self.run: Ledger | None = None
        self.last_call: tuple[str, str, int] | None = None

    @initialize(cap=st.sampled_from([1_000_000, 3_000_000, 5_000_000, 4_999_999]),
                task_cap_share=st.sampled_from([None, 1, 2, 3]), form=FORMS)
    def open_run(self, cap: int, task_cap_share: int | None, form: str) -> None:
        task_cap = cap if task_cap_share is None else cap * task_cap_share // 4
        self.run = Ledger.init(self.store, self.run_id, cap=as_amount(cap, form),
                               task_cap=None if task_cap_share is None else as_amount(task_cap, form),
                               actor="machine")
        self.model = Model(cap, task_cap)

    # ------------------------------------------------------------------ calls

    def _call(self, op: str, task_id: str, micros: int, form: str) -> None:
        assert self.run is not None and self.model is not None
        events_before = self.model.events
        expected = getattr(self.model, op)(task_id, micros)
        if self.model.events > events_before:
            self.last_call = (op, task_id, micros)
        method = getattr(self.run, op)
        if isinstance(expected, str):
            result = method(task_id, as_amount(micros, form))
            assert result["status"] == ("exists" if expected == "exists" else
                                        {"reserve": "reserved", "increase": "increased",
                                         "release": "released"}[op])
            assert result["task"] == task_id
        else:
            with pytest.raises(EscalateError) as caught:
                method(task_id, as_amount(micros, form))
            assert type(caught.value) is expected, caught.value.message
            assert caught.value.exit_code == {Refused: 3, Conflict: 5}[expected]
            assert caught.value.task == task_id
        if op in ("reserve", "increase") and expected == "ok":
            # The heart of it: a successful reservation never takes committed past the cap.
            state = self.run.state()
            assert state.committed_micros <= state.cap_micros
            assert self.model.spent + self.model.reserved <= self.model.cap

    def _amount(self, share: int, jitter: int) -> int:
        assert self.model is not None
        return max(self.model.cap * share // 8 + jitter, 0)

    def _held(self) -> list[str]:
        assert self.model is not None
        return sorted(t for t, task in self.model.tasks.items() if task.holding)

    def _live(self) -> list[str]:
        """Held tasks that are not halted: the ones an increase can still move."""
        assert self.model is not None
        return [t for t in self._held() if self.model.tasks[t].state == "reserved"]

    @rule(task_id=TASKS, share=SHARES, jitter=JITTER, exact=st.sampled_from([False] * 4 + [True]),
          form=FORMS)
    def reserve(self, task_id: str, share: int, jitter: int, exact: bool, form: str) -> None:
        """A share of the cap, or (``exact``) what is left give or take a micro: AMOUNT ==
        remaining fits, one micro more is refused."""
        assert self.model is not None
        near_remaining = max(self.model.remaining + max(min(jitter, 1), -1), 0)
        amount = near_remaining if exact else self._amount(share, jitter)
        self._call("reserve", task_id, amount, form)

    @rule(data=st.data(), share=st.one_of(st.integers(0, 2), st.integers(0, 6)), jitter=JITTER,
          exact=st.sampled_from([False] * 4 + [True]), form=FORMS)
    def increase(self, data: st.DataObject, share: int, jitter: int, exact: bool, form: str) -> None:
        """Mostly a live task by a share of the cap (fits, run-cap and task-cap halts, repeats
        of the current amount, lower amounts); sometimes any task (conflicts, halted tasks)."""
        assert self.model is not None
        live = self._live()
        if live and data.draw(st.sampled_from([True, True, False])):
            task_id = data.draw(st.sampled_from(live))
        else:
            task_id = data.draw(TASKS)
        task = self.model.tasks.get(task_id)
        current = task.amount if task is not None else 0
        delta = (max(self.model.remaining + max(min(jitter, 1), -1), 1) if exact
                 else self.model.cap * share // 8 + jitter)
        self._call("increase", task_id, max(current + delta, 0), form)

    @rule(data=st.data(), share=st.integers(min_value=0, max_value=12), jitter=JITTER, form=FORMS)
    def release(self, data: st.DataObject, share: int, jitter: int, form: str) -> None:
        """Mostly a held task (halted or not) at an actual cost that may over-run; sometimes
        any task (conflicts, or a repeat of a settled one)."""
        held = self._held()
        if held and data.draw(st.sampled_from([True, True, True, False])):
            task_id = data.draw(st.sampled_from(held))
        else:
            task_id = data.draw(TASKS)
        self._call("release", task_id, self._amount(share, jitter), form)

    @precondition(lambda self: self.last_call is not None)
    @rule(form=FORMS)
    def repeat_last_call(self, form: str) -> None:
        """The last call that wrote a line, again, in any amount form: success is idempotent
        (nothing appended), and a halt is terminal (refused, nothing appended)."""
        assert self.last_call is not None
        self._call(*self.last_call, form)

    # ------------------------------------------------------------------ checks

    @invariant()
    def totals_match_the_model_and_a_fresh_replay(self) -> None:
        if self.model is None or self.run is None:
            return
        model = self.model
        live = self.run.state()
        # Replay the log alone from scratch: a copy in an empty runs root has no checkpoint to start
        # from; the store's own fold of every line (never its checkpoint) must agree too.
        log = log_bytes(self.reads, self.run_id)
        scratch = self.root / "scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        (scratch / self.run_id).mkdir(parents=True)
        (scratch / self.run_id / "events.ndjson").write_bytes(log)
        fresh = Ledger.open(scratch, self.run_id).state()
        reopened = Ledger.open(self.reads, self.run_id).state()
        every_line = Ledger.open(self.reads, self.run_id).verified_state()
        audited = audit_log(log)  # folded without escalate's code
        assert (audited.spent_micros, audited.reserved_micros) == (model.spent, model.reserved)
        for state in (live, fresh, reopened, every_line):
            assert state.spent_micros == model.spent
            assert state.reserved_micros == model.reserved
            assert state.cap_micros == model.cap
            assert state.committed_micros == model.spent + model.reserved
            assert state.remaining_micros == model.remaining
            assert state.seq == model.events  # refusals without a halt appended nothing
            assert {t: (v.state, v.holding) for t, v in state.tasks.items()} == {
                t: (v.state, v.holding) for t, v in model.tasks.items()}
        assert fresh.totals() == live.totals()
        assert fresh.last_hash == live.last_hash

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if not isinstance(self.reads, Path):
            self.reads.close()


def test_ledger_machine(store: Location) -> None:
    """Each example opens a run of its own in ``store`` (a runs folder, or a database)."""
    numbers = itertools.count()

    def machine() -> LedgerMachine:
        return LedgerMachine(store, f"machine-{next(numbers)}")

    run_state_machine_as_test(machine, settings=settings(
        max_examples=50,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    ))
