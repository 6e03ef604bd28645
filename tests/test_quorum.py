"""Quorum (docs/escalation.md, "Who is who"): ``--quorum N --quorum-above USD`` on runs and
pools. Each approval short of N is recorded as ``escalation_approved`` and the escalation
stays open; the N-th distinct approver resolves it; a pause or cancel resolves at once; the
requester never counts and the same approver twice counts once. On both stores; the race
with real processes too."""

from __future__ import annotations

import multiprocessing
import shutil
import subprocess
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from escalate import Conflict, Ledger, Pending, Refused
from escalate.cli import app
from escalate.core import sshsig
from escalate.errors import EscalateError, InputError
from escalate.reports.inbox import inbox
from escalate.transfer import export_lines, import_log
from tests.conftest import rechained
from tests.test_signed_approvals import keys, pub, quorum_of_two
from tests.test_vouched import Person, person, pg_url

__all__ = ["keys", "person", "pg_url"]  # the fixtures, imported for the tests below

CONTEXT = multiprocessing.get_context("fork")


def _log(where: Any, run_id: str = "r") -> list[dict[str, Any]]:
    return [orjson.loads(line) for chunk in export_lines(where, run_id) for line in chunk.splitlines()]


def _asked(person: Person, quorum: int = 2, above: str | None = None, estimate: str = "4",
           **policy: Any) -> tuple[str, Any]:
    """Run r (cap $10, $7 held, max extension $5) asked by worker for ``estimate``: an
    escalation that needs a cap extension of ``estimate`` - 3."""
    where, _ = person("worker")
    run = Ledger.init(where, "r", cap="10", escalation="enforce", max_extension="5", quorum=quorum,
                      quorum_above=above, actor="worker", **policy)
    run.reserve("held", "7")
    with pytest.raises(Pending) as pending:
        run.reserve("t", estimate)
    return pending.value.escalation_id, where


def _asked_of_pool(person: Person) -> str:
    """Run r in pool team (cap $3, quorum 2, max extension $5) asked by worker for $4: the
    pool's escalation, needing $1 more."""
    from escalate.pools.pool import Pool

    where, _ = person("worker")
    Pool.init(where, "team", cap="3", escalation="enforce", max_extension="5", quorum=2, actor="worker")
    run = Ledger.init(where, "r", cap="10", pool="team", actor="worker")
    with pytest.raises(Pending) as pending:
        run.reserve("t", "4")
    return pending.value.escalation_id


def _approve(person: Person, who: str, escalation_id: str) -> dict[str, Any]:
    where, _ = person(who)
    return dict(Ledger.open(where, "r", actor=who).approve(escalation_id))


def test_the_escalation_stays_open_until_the_nth_distinct_approver(person: Person) -> None:
    esc, where = _asked(person)
    first = _approve(person, "alice", esc)
    assert (first["status"], first["approvals"], first["quorum"]) == ("recorded", ["alice"], 2)
    assert Ledger.open(where, "r").state().escalations[esc].state == "open"
    with pytest.raises(EscalateError) as still_open:  # wait returns only at the final resolution
        Ledger.open(where, "r").wait(esc, timeout_s=0)
    assert still_open.value.code == "escalation_open"
    [row] = inbox(where, open_only=True)["escalations"]
    assert [approval["by"] for approval in row["approvals"]] == ["alice"] and row["quorum"] == 2
    shown = CliRunner().invoke(app, ["escalations", "--open", "--store", str(where)],
                               env={"COLUMNS": "300"})
    assert "1 of 2 approvals (alice)" in shown.stdout, shown.stdout
    second = _approve(person, "bob", esc)
    assert (second["status"], second["by"]) == ("approved", "bob")
    assert Ledger.open(where, "r").wait(esc, timeout_s=0)["status"] == "approved"
    kinds = [(line["type"], line.get("by")) for line in _log(where) if line["type"].startswith("escalation_")]
    assert kinds[-2:] == [("escalation_approved", "alice"), ("escalation_resolved", "bob")]
    assert Ledger.open(where, "r").verify().problems == []


def test_the_same_approver_twice_counts_once_and_writes_nothing(person: Person) -> None:
    esc, where = _asked(person)
    _approve(person, "alice", esc)
    before = _log(where)
    again = _approve(person, "alice", esc)
    assert (again["status"], again["approvals"]) == ("exists", ["alice"])
    assert _log(where) == before


def test_the_requester_never_counts(person: Person) -> None:
    esc, where = _asked(person)
    before = _log(where)
    with pytest.raises(Refused) as refused:
        Ledger.open(where, "r", actor="worker").approve(esc)
    assert refused.value.code == "self_approval"
    assert _log(where) == before


def test_any_approvers_pause_or_cancel_resolves_at_once(person: Person) -> None:
    esc, where = _asked(person)
    _approve(person, "alice", esc)
    where, _ = person("bob")
    assert Ledger.open(where, "r", actor="bob").pause(esc)["status"] == "paused"
    assert Ledger.open(where, "r").state().escalations[esc].mode == "pause"


def test_an_extension_at_or_below_quorum_above_needs_one_approver(person: Person) -> None:
    esc, _ = _asked(person, above="1", estimate="4")  # needs $1 more: not above $1
    assert _approve(person, "alice", esc)["status"] == "approved"


def test_a_pool_cap_escalation_needs_the_pools_quorum(person: Person) -> None:
    escalation_id = _asked_of_pool(person)
    assert _approve(person, "alice", escalation_id)["status"] == "recorded"
    assert _approve(person, "bob", escalation_id)["status"] == "approved"


def test_a_quorum_nobody_could_reach_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    runner = CliRunner()
    root = tmp_path / "runs"
    for args in (["--quorum", "0"], ["--quorum", "101"], ["--quorum", "3", "--approvers", "a,b"],
                 ["--quorum", "2", "--quorum-above", "-1"]):
        done = runner.invoke(app, ["runs", "init", "r", "--cap", "3", "--runs-dir", str(root), "--json",
                                   *args])
        assert done.exit_code == 2, (args, done.stdout)
        assert not (root / "r").exists()
    assert runner.invoke(app, ["runs", "init", "r", "--cap", "3", "--runs-dir", str(root)]).exit_code == 0
    before = (root / "r" / "events.ndjson").read_bytes()
    done = runner.invoke(app, ["runs", "set", "r", "--quorum", "0", "--runs-dir", str(root)])
    assert done.exit_code == 2 and (root / "r" / "events.ndjson").read_bytes() == before


def test_verify_refuses_a_grant_short_of_the_quorum_and_an_approver_counted_twice(person: Person) -> None:
    esc, where = _asked(person)
    _approve(person, "alice", esc)
    _approve(person, "bob", esc)
    lines = _log(where)
    short = [dict(line) for line in lines if line["type"] != "escalation_approved"]
    for seq, line in enumerate(short, start=1):
        line["seq"] = seq
    with pytest.raises(InputError) as refused:
        import_log(where, "short", rechained(short))
    assert "of the 2 approvals" in refused.value.message
    twice = [dict(line, by="alice", **({"role": lines[-3].get("role")} if "role" in line else {}))
             if line["type"] == "escalation_resolved" else line for line in lines]
    with pytest.raises(InputError) as counted:
        import_log(where, "twice", rechained(twice))
    assert "approved twice" in counted.value.message


def _approve_after_barrier(where: Any, who: str, escalation_id: str, barrier: Barrier,
                           results: Any) -> None:
    """In a child process: wait for the others, then approve as ``who`` and report it."""
    barrier.wait()
    try:
        approved = Ledger.open(where, "r", actor=who, lock_timeout=60).approve(escalation_id)
        results.put((who, approved["status"]))
    except Conflict as conflict:
        results.put((who, conflict.code))


def test_six_racing_approvers_with_quorum_two_give_one_resolution_by_two_people(person: Person) -> None:
    esc, _ = _asked(person)
    places = {who: person(who)[0] for who in (f"approver{n}" for n in range(6))}
    barrier = CONTEXT.Barrier(len(places))
    results = CONTEXT.Queue()
    children = [CONTEXT.Process(target=_approve_after_barrier, args=(where, who, esc, barrier, results))
                for who, where in places.items()]
    for child in children:
        child.start()
    outcomes = dict(results.get(timeout=120) for _ in children)
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert sorted(outcomes.values()) == ["approved", *["conflict"] * 4, "recorded"]
    where = places["approver0"]
    lines = _log(where)
    [approval] = [line for line in lines if line["type"] == "escalation_approved"]
    [resolution] = [line for line in lines if line["type"] == "escalation_resolved"]
    assert outcomes[approval["by"]] == "recorded" and outcomes[resolution["by"]] == "approved"
    assert (approval["by"] != resolution["by"] and approval["role"] != resolution["role"]) or \
        isinstance(where, Path)  # (one OS user on the file store: the names tell them apart)
    assert Ledger.open(where, "r").verify().problems == []


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")
def test_a_partial_approval_under_pinned_keys_is_signed_and_checks_out_in_ssh_keygen(
        person: Person, keys: dict[str, Path], tmp_path: Path) -> None:
    escalation_id, signers = quorum_of_two(person, keys)
    where, _ = person("alice")
    first = Ledger.open(where, "r", actor="alice").approve(escalation_id, sign=signers["alice"])
    assert first["status"] == "recorded"
    lines = _log(where)
    [approved] = [e for e in lines if e["type"] == "escalation_approved"]
    assert approved["key"] == sshsig.parse_key(pub(signers["alice"])).fingerprint
    # The content an auditor rebuilds from the log alone (the resolution's, mode extend) …
    position = next(i for i, e in enumerate(lines) if e["type"] == "escalation")
    content = sshsig.canonical_content("r", escalation_id, "extend", lines[position]["requested_micros"],
                                       lines[position + 1]["prev"], "alice",
                                       sshsig.line_grant("extend", approved))
    # … is what OpenSSH's own tool accepts alice's stored signature over.
    (tmp_path / "allowed").write_text(f"alice {pub(signers['alice'])}\n")
    (tmp_path / "sig").write_text(approved["signature"])
    checked = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(tmp_path / "allowed"), "-I", "alice",
                              "-n", "escalate", "-s", str(tmp_path / "sig")], input=content,
                             capture_output=True, check=False)
    assert checked.returncode == 0, checked.stderr
    where, _ = person("bob")
    second = Ledger.open(where, "r", actor="bob").approve(escalation_id, sign=signers["bob"])
    assert second["status"] == "approved"
    [resolved] = [e for e in _log(where) if e["type"] == "escalation_resolved"]
    assert resolved["key"] == sshsig.parse_key(pub(signers["bob"])).fingerprint
    assert Ledger.open(where, "r").verify().problems == []


def test_a_quorum_lowered_after_an_approval_still_binds_that_escalation(person: Person) -> None:
    """An approval counted against a quorum fixes it for that escalation: lowering the
    policy afterwards lets nobody grant it alone, and the same approver again is answered
    \"exists\" with nothing written (it was an internal error)."""
    esc, where = _asked(person)
    _approve(person, "alice", esc)
    alice_where, _ = person("alice")
    Ledger.open(alice_where, "r", actor="alice").set_policy(quorum=1)
    before = _log(where)
    again = _approve(person, "alice", esc)
    assert (again["status"], again["state"], again["quorum"]) == ("exists", "open", 2)
    assert _log(where) == before
    assert _approve(person, "bob", esc)["status"] == "approved"
    assert Ledger.open(where, "r").verify().problems == []


def test_a_quorum_lowered_before_any_approval_still_binds_the_open_escalation(person: Person) -> None:
    """The quorum that applied when an escalation fired is recorded on its line: lowering
    the policy before anyone approved lets nobody grant it alone; raising it applies too."""
    esc, where = _asked(person)
    alice_where, _ = person("alice")
    Ledger.open(alice_where, "r", actor="alice").set_policy(quorum=1)
    alone = _approve(person, "alice", esc)
    assert (alone["status"], alone["state"], alone["quorum"]) == ("recorded", "open", 2)
    assert _approve(person, "bob", esc)["status"] == "approved"
    assert Ledger.open(where, "r").verify().problems == []
    assert [line["quorum"] for line in _log(where) if line["type"] == "escalation"] == [2]
    # A log where it was granted alone after the quorum was lowered is refused on replay.
    lines = [line for line in _log(where) if line["type"] != "escalation_approved"]
    for seq, line in enumerate(lines, start=1):
        line["seq"] = seq
    with pytest.raises(InputError) as refused:
        import_log(where, "alone", rechained(lines))
    assert "of the 2 approvals" in refused.value.message


def test_a_pools_quorum_lowered_before_any_approval_still_binds_its_open_escalation(person: Person) -> None:
    from escalate.pools.pool import Pool

    escalation_id = _asked_of_pool(person)
    alice_where, _ = person("alice")
    Pool.open(alice_where, "team", actor="alice").set_policy(quorum=1)
    assert _approve(person, "alice", escalation_id)["status"] == "recorded"
    assert _approve(person, "bob", escalation_id)["status"] == "approved"


def test_an_escalation_without_a_recorded_quorum_follows_the_policy(tmp_path: Path) -> None:
    """Logs written before the escalation line recorded its quorum replay by the policy."""
    where = tmp_path / "runs"
    esc, _ = _asked(lambda who: (where, who))
    lines = [{key: value for key, value in line.items() if key != "quorum" or line["type"] != "escalation"}
             for line in _log(where)]
    lines.append({**lines[-1], "seq": len(lines) + 1, "type": "policy_changed",
                  "escalation": {**lines[0]["escalation"], "quorum": 1}})
    for key in ("id", "task", "kind", "from_micros", "requested_micros", "remaining_micros", "reason",
                "offered", "needed_extension_micros", "expires_at", "shadow", "request_reason",
                "priority"):
        lines[-1].pop(key, None)
    import_log(where, "old", rechained(lines))
    assert Ledger.open(where, "old", actor="alice").approve(esc)["status"] == "approved"


def test_one_key_pinned_for_two_names_approves_once(person: Person, keys: dict[str, Path]) -> None:
    """A live write counts an approver by the same rule as a reader: the second approval
    signed with a key that already approved, under another name, is ``exists``, nothing
    written (both stores)."""
    names = {who: person(who)[1] for who in ("alice", "carol")}
    where, _ = person("worker")
    run = Ledger.init(where, "r", cap="10", escalation="enforce", max_extension="5", quorum=2, actor="worker",
                      approver_keys=[f"{names[who]}={pub(keys['alice-ed25519'])}" for who in names])
    run.reserve("held", "7")
    with pytest.raises(Pending) as pending:
        run.reserve("t", "4")
    logs = []
    for who, status in (("alice", "recorded"), ("carol", "exists")):
        at, _ = person(who)
        approved = Ledger.open(at, "r", actor=who).approve(pending.value.escalation_id,
                                                           sign=keys["alice-ed25519"])
        assert approved["status"] == status, who
        logs.append(_log(where))
    assert logs[0] == logs[1] and logs[1][-1]["type"] == "escalation_approved"
