"""The budget rules: exactly at a limit fits; the task cap is named before the run cap."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from escalate.rules import extension_left, needed_extension, over_cap, task_cap_fits

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
