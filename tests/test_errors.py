"""Errors carry their facts as named attributes, and print them the same in JSON."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest

from escalate import Ledger, errors
from escalate.errors import Conflict, EscalateError, LockTimeout, Pending, Refused


def test_every_fact_is_a_named_attribute_and_stays_in_the_json() -> None:
    error = Conflict("task t was released", task="t", state="released", actual_micros=5)
    assert (error.task, error.state, error.actual_micros) == ("t", "released", 5)  # type: ignore[attr-defined]
    assert error.to_json() == {"error": "conflict", "message": "task t was released", "exit_code": 5,
                               "task": "t", "state": "released", "actual_micros": 5}
    # A fact the class declares but this error does not carry reads as None.
    assert error.escalation_id is None
    assert LockTimeout("held", lock_file="/x.lock", timeout_s=2.5).lock_file == "/x.lock"


def test_library_refusals_name_their_facts(runs_dir: Path) -> None:
    run = Ledger.init(runs_dir, "r", cap="5", task_cap="4", escalation="enforce",
                      approval_threshold="3")
    with pytest.raises(Pending) as pending:
        run.reserve("t1", "3.5")
    assert pending.value.escalation_id == "esc-2"
    assert (pending.value.task, pending.value.requested_micros) == ("t1", 3_500_000)
    with pytest.raises(Refused) as refused:
        run.reserve("t2", "4.5")
    assert (refused.value.code, refused.value.task_cap_micros) == ("over_task_cap", 4_000_000)
    assert isinstance(refused.value, EscalateError)


def _error_classes() -> list[type[EscalateError]]:
    from escalate.core.sshsig import SigningUnavailable
    from escalate.write import MembershipChanged

    found = [value for value in vars(errors).values()
             if isinstance(value, type) and issubclass(value, EscalateError)]
    return [*found, MembershipChanged, SigningUnavailable]


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_declares_the_facts_its_constructor_takes(cls: type[EscalateError]) -> None:
    # An explicit constructor: its keywords are typed (mypy refuses a fact the class does not
    # declare), and each is an attribute the class declares, so a caller reads it typed.
    hints = typing.get_type_hints(cls.__init__, vars(errors), include_extras=True)
    keywords = [parameter for parameter in inspect.signature(cls.__init__).parameters.values()
                if parameter.kind in (parameter.KEYWORD_ONLY, parameter.VAR_KEYWORD)]
    declared = typing.get_type_hints(cls)
    for parameter in keywords:
        hint = hints[parameter.name]
        if parameter.kind is parameter.VAR_KEYWORD:
            assert typing.get_origin(hint) is typing.Unpack, (cls, parameter)
            (facts,) = typing.get_args(hint)
            names = facts.__required_keys__ | facts.__optional_keys__
        else:
            assert hint is not typing.Any, (cls, parameter)
            names = frozenset() if parameter.name == "code" else {parameter.name}
        assert names <= declared.keys(), (cls, names - declared.keys())


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_reports_the_code_it_declares(cls: type[EscalateError]) -> None:
    # A class's code is its ``default_code``: a class attribute named ``code`` is shadowed by
    # the instance's, so the error would report its parent's code instead.
    assert "code" not in vars(cls)


def test_a_missing_signing_package_is_signing_unavailable() -> None:
    from escalate.core.sshsig import SigningUnavailable

    error = SigningUnavailable("checking signatures needs the cryptography package")
    assert (error.code, error.exit_code, error.to_json()["error"]) == ("signing_unavailable", 2,
                                                                       "signing_unavailable")
