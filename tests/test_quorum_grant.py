"""A quorum binds what is granted, not only what was asked when the escalation fired: the
grant of an escalation is worked out when it is approved, so money spent meanwhile grows it.
A grant above ``quorum_above`` needs the quorum whatever its escalation recorded, and no grant
exceeds what an earlier approval signed for. The writer refuses (nothing written); every
reader of a log (``runs verify``, ``pools verify``, an import) finds a log that breaks either
rule damaged (exit 6). Runs and pools, both stores."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from escalate import Conflict, Ledger, Pending
from escalate.core import rules
from escalate.pools.pool import Pool
from tests.conftest import drop_books, log_bytes, rechained
from tests.test_pool_signatures import put_log
from tests.test_signed_approvals import events, keys, pub
from tests.test_vouched import Person, person, pg_url

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")

__all__ = ["keys", "person", "pg_url"]  # the fixtures, imported for the tests below

SIGNERS = ("alice-ed25519", "alice-ecdsa")  # alice's key, and the one pinned for bob


def _asked(person: Person, keys: dict[str, Path], pooled: bool, above: str | None,
           amounts: tuple[str, str]) -> tuple[Any, str]:
    """Run r (in pool team, which decides, when ``pooled``), quorum 2 (above ``above``),
    both approvers' keys pinned: worker holds ``amounts[0]`` of the $10 cap and asks for
    ``amounts[1]`` more. Where worker acts, and the escalation's id."""
    names = {who: person(who)[1] for who in ("alice", "bob")}
    pinned = [f"{names[who]}={pub(keys[key])}" for who, key in zip(names, SIGNERS, strict=True)]
    where, _ = person("worker")
    policy: dict[str, Any] = {"escalation": "enforce", "max_extension": "50", "quorum": 2,
                              "quorum_above": above, "approver_keys": pinned, "actor": "worker"}
    if pooled:
        Pool.init(where, "team", cap="10", **policy)
        for run in ("r", "r2"):
            Ledger.init(where, run, cap="100", pool="team", actor="worker")
    else:
        Ledger.init(where, "r", cap="10", **policy)
    run = Ledger.open(where, "r", actor="worker")
    run.reserve("held", amounts[0])
    with pytest.raises(Pending) as pending:
        run.reserve("t", amounts[1])
    return where, pending.value.escalation_id


def _spend(where: Any, pooled: bool, amount: str) -> None:
    """Another task (of the other member, in a pool) takes ``amount`` of what is left."""
    Ledger.open(where, "r2" if pooled else "r", actor="worker").reserve("other", amount)


def _approve(person: Person, keys: dict[str, Path], who: str, escalation_id: str) -> dict[str, Any]:
    at, _ = person(who)
    key = keys[SIGNERS[0] if who == "alice" else SIGNERS[1]]
    return dict(Ledger.open(at, "r", actor=who).approve(escalation_id, sign=key))


def _granted(line: dict[str, Any]) -> int:
    return int(line.get("extension_micros", 0)) + int(line.get("pool_extension_micros", 0))


@pytest.mark.parametrize("pooled", [False, True], ids=["run", "pool"])
def test_a_grant_grown_above_quorum_above_needs_the_quorum(person: Person, keys: dict[str, Path],
                                                            pooled: bool) -> None:
    # It fires needing $0.90 (not above $1: a quorum of 1 recorded); then $1.50 more is spent,
    # so approving it now grants $2.40, above $1: two approvers, not bob alone.
    where, escalation_id = _asked(person, keys, pooled, "1", ("8.5", "2.4"))
    _spend(where, pooled, "1.5")
    first = _approve(person, keys, "bob", escalation_id)
    assert (first["status"], first["quorum"]) == ("recorded", 2), first
    lines = events(log_bytes(where, "r"))
    assert lines[-1]["type"] == "escalation_approved" and _granted(lines[-1]) == 2_400_000
    second = _approve(person, keys, "alice", escalation_id)
    assert second["status"] == "approved"
    assert Ledger.open(where, "r").verify().problems == []


@pytest.mark.parametrize("pooled", [False, True], ids=["run", "pool"])
def test_a_final_approval_granting_more_than_an_earlier_one_signed_for_is_refused(
        person: Person, keys: dict[str, Path], pooled: bool) -> None:
    # alice approves a grant of $6; $2 more is spent; bob's approval would grant $8.
    where, escalation_id = _asked(person, keys, pooled, None, ("8", "8"))
    assert _approve(person, keys, "alice", escalation_id)["status"] == "recorded"
    _spend(where, pooled, "2")
    before = log_bytes(where, "r")
    with pytest.raises(Conflict) as refused:
        _approve(person, keys, "bob", escalation_id)
    assert (refused.value.code, refused.value.exit_code) == ("grant_beyond_approvals", 5)
    assert "$8.00" in refused.value.message and "$6.00" in refused.value.message
    assert "approve the larger amount" in refused.value.message and "\n" not in refused.value.message
    assert log_bytes(where, "r") == before
    assert Ledger.open(where, "r").state().escalations[escalation_id].state == "open"


def _old_quorum(policies: Any, needed: int, granted: tuple[int, int], floor: int = 1) -> int:
    return rules.quorum_required(policies, needed, floor)  # (what was needed when it fired only)


def _writers_without(monkeypatch: pytest.MonkeyPatch, rule: str) -> None:
    """Every module's copy of ``rule`` as before it was a rule: a writer (and its own fold)
    that lets the grant through, as a forger's would."""
    lax: Callable[..., Any] = _old_quorum if rule == "grant_quorum" else (lambda *args: False)
    for module in ("escalate.core.resolve", "escalate.core.fold_escalations", "escalate.pools.signatures"):
        monkeypatch.setattr(f"{module}.{rule}", lax, raising=False)  # (none before the rule)


@pytest.mark.parametrize("pooled", [False, True], ids=["run", "pool"])
@pytest.mark.parametrize("rule", ["grant_quorum", "beyond_signed"])
def test_a_rechained_log_that_breaks_the_rule_fails_every_reader(
        person: Person, keys: dict[str, Path], pooled: bool, rule: str, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch, cli: Any) -> None:
    grown = rule == "grant_quorum"
    where, escalation_id = _asked(person, keys, pooled, "1" if grown else None,
                                  ("8.5", "2.4") if grown else ("8", "8"))
    with monkeypatch.context() as lax:
        _writers_without(lax, rule)
        if not grown:
            assert _approve(person, keys, "alice", escalation_id)["status"] == "recorded"
        _spend(where, pooled, "1.5" if grown else "2")
        assert _approve(person, keys, "bob", escalation_id)["status"] == "approved"
    lines = events(log_bytes(where, "r"))
    assert _granted(next(line for line in lines if line["type"] == "escalation_resolved")) == \
        (2_400_000 if grown else 8_000_000)
    owner = where if isinstance(where, Path) else request.getfixturevalue("pg_url")
    put_log(owner, "r", rechained(lines))
    if pooled:
        drop_books(owner, "team")
    store = str(owner)
    verified = cli("runs", "verify", "r", "--store", store, "--json")
    assert verified.exit_code == 6, verified.stdout
    gate = cli("gate", "r", "--store", store, "--json")
    assert gate.exit_code == 6, gate.stdout
    if not grown:  # (beyond what a signer signed for: a forgery where keys are pinned)
        assert gate.json()["error"] == "forged_signature", gate.stdout
    if pooled:
        assert cli("pools", "verify", "team", "--store", store).exit_code == 6


def test_without_pinned_keys_a_grant_past_an_earlier_approval_is_refused_too(person: Person) -> None:
    """Unsigned partial approvals record what their approver approved as well: bob alone
    cannot grant the $2 spent since alice approved $6 (both stores)."""
    where, _ = person("worker")
    run = Ledger.init(where, "r", cap="10", escalation="enforce", max_extension="50", quorum=2,
                      actor="worker")
    run.reserve("held", "8")
    with pytest.raises(Pending) as pending:
        run.reserve("t", "8")
    at, _ = person("alice")
    assert Ledger.open(at, "r", actor="alice").approve(pending.value.escalation_id)["status"] == "recorded"
    assert _granted(events(log_bytes(where, "r"))[-1]) == 6_000_000
    run.reserve("other", "2")
    before = log_bytes(where, "r")
    at, _ = person("bob")
    with pytest.raises(Conflict) as refused:
        Ledger.open(at, "r", actor="bob").approve(pending.value.escalation_id)
    assert refused.value.code == "grant_beyond_approvals"
    assert log_bytes(where, "r") == before
