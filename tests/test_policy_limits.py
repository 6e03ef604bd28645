"""Who may change a policy is asked even when nothing would change, and no setting of a run
or of its pool may leave a member's escalations needing more approvals than there are
approvers who may give them (docs/escalation.md, "Who is who"). On both stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from escalate import Conflict, Ledger, Refused
from escalate.cli import app
from escalate.pools.pool import Pool
from escalate.transfer import export_lines
from tests.test_vouched import Person, person, pg_url

__all__ = ["person", "pg_url"]  # the fixtures, imported for the tests below


def _log(where: Any, ledger_id: str) -> bytes:
    """A run's or a pool's log, every line, as the store holds it."""
    if ledger_id == "team":
        with Pool.open(where, ledger_id).store.reader() as stream:
            return stream.read()
    return b"".join(export_lines(where, ledger_id))


def _names(person: Person, *who: str) -> list[str]:
    """What approver lists name for each person: the name (file store), or the role."""
    return [person(name)[1] for name in who]


def test_an_unchanged_policy_by_someone_who_may_not_change_it_is_refused(person: Person) -> None:
    approvers = _names(person, "alice", "bob")
    where, _ = person("alice")
    Ledger.init(where, "r", cap="10", approvers=approvers, actor="alice")
    Pool.init(where, "team", cap="10", approvers=approvers, actor="alice")
    before = (_log(where, "r"), _log(where, "team"))
    mallory, _ = person("mallory")
    with pytest.raises(Refused) as run_refused:
        Ledger.open(mallory, "r", actor="mallory").set_policy(approvers=approvers)
    with pytest.raises(Refused) as pool_refused:
        Pool.open(mallory, "team", actor="mallory").set_policy(cap="10", approvers=approvers)
    assert (run_refused.value.code, pool_refused.value.code) == ("not_an_approver", "not_an_approver")
    assert (_log(where, "r"), _log(where, "team")) == before
    # An approver's change that changes nothing still answers "unchanged", writing nothing.
    assert Ledger.open(where, "r", actor="alice").set_policy(approvers=approvers)["status"] == "exists"
    assert Pool.open(where, "team", actor="alice").set_policy(cap="10")["status"] == "exists"
    assert (_log(where, "r"), _log(where, "team")) == before


def test_runs_set_that_changes_nothing_by_a_non_approver_exits_3(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    runner = CliRunner()
    assert runner.invoke(app, ["runs", "init", "r", "--cap", "10", "--approvers", "alice,bob",
                               "--runs-dir", str(root)]).exit_code == 0
    before = (root / "r" / "events.ndjson").read_bytes()
    done = runner.invoke(app, ["runs", "set", "r", "--approvers", "alice,bob", "--by", "mallory",
                               "--runs-dir", str(root)])
    assert done.exit_code == 3 and "not one of its approvers" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and (root / "r" / "events.ndjson").read_bytes() == before
    same = runner.invoke(app, ["runs", "set", "r", "--approvers", "alice,bob", "--by", "alice",
                               "--runs-dir", str(root)])
    assert same.exit_code == 0 and "unchanged" in same.stdout


def test_a_members_quorum_above_its_pools_approvers_is_refused(person: Person) -> None:
    approvers = _names(person, "alice", "bob")
    where, _ = person("alice")
    Pool.init(where, "team", cap="10", escalation="enforce", approvers=approvers, actor="alice")
    with pytest.raises(Conflict) as at_init:
        Ledger.init(where, "r", pool="team", quorum=3, actor="alice")
    assert (at_init.value.code, at_init.value.quorum) == ("unreachable_quorum", 3)
    assert "quorum 3" in at_init.value.message and "only 2 approvers" in at_init.value.message
    with pytest.raises(Exception, match="no run r"):
        Ledger.open(where, "r").state()
    run = Ledger.init(where, "r", pool="team", quorum=2, actor="alice")
    before = _log(where, "r")
    with pytest.raises(Conflict) as at_set:
        run.set_policy(quorum=3)
    assert at_set.value.code == "unreachable_quorum" and _log(where, "r") == before


def test_a_pool_setting_that_leaves_a_member_short_of_approvers_is_refused(person: Person) -> None:
    two, three = _names(person, "alice", "bob"), _names(person, "alice", "bob", "carol")
    where, _ = person("alice")
    Pool.init(where, "team", cap="10", escalation="enforce", approvers=three, actor="alice")
    Ledger.init(where, "r", pool="team", quorum=3, actor="alice")
    pool = Pool.open(where, "team", actor="alice")
    before = _log(where, "team")
    with pytest.raises(Conflict) as removed:  # approvers removed below the member's quorum
        pool.set_policy(approvers=two)
    assert removed.value.code == "unreachable_quorum" and "only 2 approvers" in removed.value.message
    assert _log(where, "team") == before
    # The pool names nobody: its escalations are the member's own approvers' to resolve.
    Ledger.open(where, "r", actor="alice").set_policy(quorum=1)
    pool.set_policy(approvers=())
    Ledger.open(where, "r", actor="alice").set_policy(approvers=two)
    before = _log(where, "team")
    with pytest.raises(Conflict) as raised:
        pool.set_policy(quorum=3)
    assert raised.value.code == "unreachable_quorum" and _log(where, "team") == before
    pool.set_policy(quorum=2)
    before = _log(where, "r")
    with pytest.raises(Conflict) as fewer:  # the member's own list cut below the pool's quorum
        Ledger.open(where, "r", actor="alice").set_policy(approvers=two[:1])
    assert fewer.value.code == "unreachable_quorum" and _log(where, "r") == before


def test_with_nobody_named_there_is_nothing_to_count(person: Person) -> None:
    where, _ = person("alice")
    Pool.init(where, "team", cap="10", escalation="enforce", actor="alice")
    run = Ledger.init(where, "r", pool="team", quorum=5, actor="alice")
    assert Pool.open(where, "team", actor="alice").set_policy(quorum=7)["status"] == "changed"
    assert run.set_policy(quorum=6)["status"] == "changed"


def test_the_cli_names_both_numbers_and_exits_5(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    runner = CliRunner()
    assert runner.invoke(app, ["pools", "init", "team", "--cap", "10", "--approvers", "alice,bob",
                               "--runs-dir", str(root)]).exit_code == 0
    done = runner.invoke(app, ["runs", "init", "r", "--pool", "team", "--quorum", "3",
                               "--runs-dir", str(root), "--json"])
    assert done.exit_code == 5 and done.stderr.count("\n") == 1, done.stderr
    assert "quorum 3" in done.stderr and "only 2 approvers" in done.stderr
    assert not (root / "r").exists()
