"""The pool's policy decides its escalations in its members' logs: a ``pool_cap`` escalation
needs the pool's quorum and, where the pool pins keys, every approval of it (partial ones
too) is signed by a pinned key. The readers of a member check both by the rules a run's own
policy is checked by — the same answer from ``runs verify`` and ``gate`` of the run, ``gate
--pool``, ``pools verify`` and the writers — for each person on each store."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from escalate import Ledger, Pending
from escalate.cli import app
from escalate.errors import CorruptLedger
from escalate.pools.pool import Pool
from tests.conftest import drop_books, log_bytes, rechained
from tests.test_pool_signatures import put_log
from tests.test_signed_approvals import events, keys, pub
from tests.test_vouched import Person, person, pg_url

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")
__all__ = ["keys", "person", "pg_url"]  # the fixtures, imported for the tests below


def _quorum_member(person: Person, keys: dict[str, Path] | None, **policy: Any) -> Any:
    """Pool team (quorum 2; with ``keys``, alice's and bob's pinned; ``policy``: more of its
    settings) and its member r, whose pool_cap escalation alice approved first and bob
    granted (each signing under keys)."""
    signers = {"alice": keys["alice-ed25519"], "bob": keys["alice-ecdsa"]} if keys else {}
    names = {who: person(who)[1] for who in ("alice", "bob")}
    where, _ = person("worker")
    Pool.init(where, "team", cap="3", escalation="enforce", max_extension="5", quorum=2, actor="worker",
              approver_keys=[f"{names[who]}={pub(key)}" for who, key in signers.items()], **policy)
    run = Ledger.init(where, "r", cap="10", pool="team", actor="worker")
    Ledger.init(where, "r2", cap="10", pool="team", actor="worker")
    with pytest.raises(Pending) as pending:
        run.reserve("t", "4")
    for who, status in (("alice", "recorded"), ("bob", "approved")):
        approving = Ledger.open(person(who)[0], "r", actor=who)
        assert approving.approve(pending.value.escalation_id, sign=signers.get(who))["status"] == status
    return person("worker")[0]


def _env(where: Any) -> dict[str, str]:
    return {"ESCALATE_STORE": where} if isinstance(where, str) else {"ESCALATE_RUNS_DIR": str(where)}


def _line_of(where: Any, kind: str) -> int:
    return 1 + next(i for i, e in enumerate(events(log_bytes(where, "r"))) if e["type"] == kind)



def _every_reader_refuses(where: Any, owner: Any, line: int, said: str, code: str) -> None:
    """runs verify and gate of r, gate --pool and pools verify: exit 6 naming ``line``; money
    writes into r and (its pool's books folded again) into r2: refused, nothing written.
    ``owner``: where the store's owner acts (the runs folder, or the database as its owner);
    ``code``: what ``gate`` of r answers (a forged signature, or another broken rule)."""
    readers = (["runs", "verify", "r"], ["gate", "r"], ["gate", "--pool", "team"],
               ["pools", "verify", "team"])
    for args in readers:
        refused = CliRunner().invoke(app, [*args, "--json"], env=_env(where))
        assert refused.exit_code == 6, (args, refused.stdout)
        assert f"line {line}" in refused.stdout.replace('"line": ', "line "), (args, refused.stdout)
        assert said in refused.stdout, (args, refused.stdout)
        if args == ["gate", "r"]:
            assert orjson.loads(refused.stdout)["error"] == code
    for run in ("r", "r2"):
        drop_books(owner, "team")  # (r's entry is behind its log anyway)
        before = log_bytes(where, run)
        with pytest.raises(CorruptLedger) as refused:
            Ledger.open(where, run, actor="worker").reserve("more", "0.5")
        assert refused.value.code == "member_unreadable" and f"line {line}" in refused.value.message
        assert log_bytes(where, run) == before


Lines = list[dict[str, Any]]


def _forged_member(where: Any, owner: Any, change: Callable[[Lines], Lines]) -> None:
    """r's log edited by ``change`` (its lines in, the forged lines out), renumbered and re-chained."""
    lines = change(events(log_bytes(where, "r")))
    for seq, line in enumerate(lines, start=1):
        line["seq"] = seq
    put_log(owner, "r", rechained(lines))


def test_a_member_log_short_of_its_pools_quorum_fails_every_reader(
        person: Person, request: pytest.FixtureRequest) -> None:
    # A pool's quorum is its policy, not the run's: the run's own fold holds the run's quorum
    # and what its escalation line recorded; the pool's log tells the rest.
    where = _quorum_member(person, None)
    owner = request.getfixturevalue("pg_url") if isinstance(where, str) else where

    def one_approver(lines: Lines) -> Lines:
        kept = [dict(line) for line in lines if line["type"] != "escalation_approved"]
        for line in kept:
            if line["type"] == "escalation":
                line.pop("quorum", None)
        return kept

    _forged_member(where, owner, one_approver)
    _every_reader_refuses(where, owner, _line_of(where, "escalation_resolved"),
                          "granted with 1 of the 2 approvals the pool team's quorum needs", "corrupt_ledger")


def test_a_forged_partial_approval_of_a_pool_cap_escalation_fails_every_reader(
        person: Person, keys: dict[str, Path], request: pytest.FixtureRequest) -> None:
    where = _quorum_member(person, keys)
    owner = request.getfixturevalue("pg_url") if isinstance(where, str) else where
    assert CliRunner().invoke(app, ["pools", "verify", "team"], env=_env(where)).exit_code == 0

    def unsigned(lines: Lines) -> Lines:
        return [{k: v for k, v in line.items() if k not in ("signature", "key")}
                if line["type"] == "escalation_approved" else line for line in lines]

    _forged_member(where, owner, unsigned)
    _every_reader_refuses(where, owner, _line_of(where, "escalation_approved"),
                          "is not signed, but the pool team pins approvers' keys", "forged_signature")


def test_a_pool_cap_grant_by_an_identity_off_a_vouched_pool_list_fails_every_reader(
        person: Person, request: pytest.FixtureRequest) -> None:
    # Under the pool's --approvers-match vouched, its list names vouched identities; a member's
    # own fold cannot hold a pool's list, so the readers of the member check it.
    names = [person(who)[1] for who in ("alice", "bob")]
    where = _quorum_member(person, None, approvers=names, approvers_match="vouched")
    owner = request.getfixturevalue("pg_url") if isinstance(where, str) else where
    carol = person("carol")[1]

    def by_carol(lines: Lines) -> Lines:
        return [dict(line, role=carol) if line["type"] == "escalation_resolved" else line for line in lines]

    _forged_member(where, owner, by_carol)
    _every_reader_refuses(where, owner, _line_of(where, "escalation_resolved"),
                          f"resolved by '{carol}', who is not one of the approvers", "corrupt_ledger")
