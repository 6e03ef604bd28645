"""The budget rules: exactly at a limit fits; the task cap is named before the run cap; no
total passes the limit on totals."""

from __future__ import annotations

from hypothesis import event, example, given, settings, target
from hypothesis import strategies as st

from escalate.core.decide import decide_increase, decide_release, decide_reserve, run_opened_payload
from escalate.core.events import seal
from escalate.core.fold import initial_state
from escalate.core.money import MAX_MICROS, MAX_TOTAL_MICROS
from escalate.core.rules import (
    extension_left,
    needed_extension,
    over_cap,
    over_left,
    over_threshold,
    task_cap_fits,
)
from escalate.core.state import Policy
from escalate.errors import TotalLimit
from escalate.write import seal_into

amounts = st.integers(0, 10**15)


def test_exactly_at_a_limit_fits() -> None:
    assert over_cap(5, 5, task_cap_micros=5, remaining=5) is None
    assert over_cap(6, 1, task_cap_micros=5, remaining=99) == "task_cap"
    assert over_cap(5, 5, task_cap_micros=9, remaining=4) == "run_cap"
    assert over_cap(6, 6, task_cap_micros=5, remaining=4) == "task_cap"  # no extension lifts it
    assert task_cap_fits(5, 5) and not task_cap_fits(6, 5)


@given(new=amounts, remaining=st.integers(-10**15, 10**15))
def test_the_needed_extension_is_exactly_what_makes_it_fit(new: int, remaining: int) -> None:
    needed = needed_extension(new, remaining)
    assert needed >= 0
    assert over_cap(new, new, task_cap_micros=new, remaining=remaining + needed) is None
    if needed:
        assert over_cap(new, new, task_cap_micros=new, remaining=remaining + needed - 1) == "run_cap"


def test_the_extension_left_goes_negative_when_a_policy_lowered_it() -> None:
    assert extension_left(5, 2) == 3
    assert extension_left(1, 2) == -1


# Amounts that reach the limit on totals in a few steps: mostly $1B, the largest amount
# there is, or a micro less. Reservations (mostly $0) come first: a reservation must fit
# the cap, a release far above its reservation need not. Then any request, mostly releases.
_BIG = st.sampled_from([MAX_MICROS] * 4 + [MAX_MICROS - 1, MAX_MICROS // 2, 1, 0, 0])
_HOLDS = st.lists(st.sampled_from([0, 0, 1, MAX_MICROS // 16]), min_size=14, max_size=16)
_STEPS = st.lists(st.tuples(st.sampled_from(["reserve", "increase"] + ["release"] * 4),
                            st.integers(0, 15), _BIG), min_size=16, max_size=30)


@settings(max_examples=150)
@example(cap=MAX_MICROS, holds=[0] * 10, steps=[("release", number, MAX_MICROS) for number in range(10)])
@given(cap=st.sampled_from([1, MAX_MICROS // 2, MAX_MICROS]), holds=_HOLDS, steps=_STEPS)
def test_no_accepted_request_takes_a_total_past_the_limit(cap: int, holds: list[int],
                                                          steps: list[tuple[str, int, int]]) -> None:
    """Whatever sequence of requests a run gets, what the decisions accept (and the fold then
    accepts too) never carries a total past the limit; a release that would is refused, with
    nothing to write, and is the only request refused for it."""
    now = "2026-11-23T14:00:00.000000Z"
    [(opened, _, first_hash)] = seal([run_opened_payload("r", cap, None, Policy())], seq=0, prev="",
                                     ts=now, actor="p")
    state = initial_state(opened, first_hash)
    for op, number, amount in [("reserve", number, amount) for number, amount in enumerate(holds)] + steps:
        task = f"t{number}"
        if op == "reserve":
            decision = decide_reserve(state, task, amount, now)
        elif op == "increase":
            decision = decide_increase(state, task, amount, now)
        else:
            decision = decide_release(state, task, amount, "p", None)
        if isinstance(decision.error, TotalLimit):
            event("a release refused at the limit")
            assert op == "release" and decision.events == []
            assert state.committed_micros - state.tasks[task].reserved_micros + amount > MAX_TOTAL_MICROS
            continue
        seal_into(state, decision.events, now, "p")  # the fold's own checks, as a writer's
        assert 0 <= state.committed_micros <= MAX_TOTAL_MICROS
        assert 0 <= state.cap_micros <= MAX_TOTAL_MICROS
        assert -MAX_TOTAL_MICROS <= state.remaining_micros <= MAX_TOTAL_MICROS
    target(state.committed_micros / MAX_TOTAL_MICROS)


def test_the_threshold_and_what_is_left_are_rules_of_their_own() -> None:
    # Both the run's and the pool's checks ask these (docs/architecture.md: a rule is in rules).
    assert not over_threshold(None, 10**12) and not over_threshold(5, 5) and over_threshold(5, 6)
    assert not over_left(5, 5) and over_left(6, 5) and over_left(1, -1)
