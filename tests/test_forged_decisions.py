"""Logs forged by someone who can write a run's log and rebuild its hash chain: a reader
(``runs verify``, ``gate``, ``runs import`` into either store, ``Ledger.verify``) refuses
what a live write refuses, by the same rule. Where the run pins approvers' keys the
forgery is exit 6 (``forged_signature``) everywhere; otherwise the import is exit 2
(``invalid_log``) and ``runs verify`` and ``gate`` exit 6, as for other damage."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from escalate import Ledger, Pending
from escalate.core import sshsig
from escalate.core.events import format_ts, line_hash, parse_ts
from escalate.errors import CorruptLedger, InputError, UnknownRun
from escalate.escalation import signing
from escalate.pools.pool import Pool
from escalate.transfer import import_log
from tests.conftest import rechained
from tests.test_signed_approvals import events, keys, pub, quorum_of_two

__all__ = ["keys"]  # the fixture, imported for the tests below


def _appended(log: bytes, *added: dict[str, Any], change: dict[str, Any] | None = None) -> bytes:
    """``log`` with its last line changed by ``change`` and ``added`` lines after it (their
    seq numbered on), the chain rebuilt."""
    lines = events(log)
    lines[-1].update(change or {})
    ts = lines[-1]["ts"]
    for seq, line in enumerate(added, start=len(lines) + 1):
        lines.append({"v": 1, "seq": seq, "ts": ts, **line})
    return rechained(lines)


def _refused(cli: Any, runs_dir: Path, tmp_path: Path, pg_url: str, forged: bytes, said: str,
             *, keyed: bool) -> None:
    """``forged``, planted as run r's log, fails ``runs verify`` and ``gate`` (exit 6,
    saying ``said``) and an import into each store (nothing imported)."""
    (runs_dir / "r" / "events.ndjson").write_bytes(forged)
    for checkpoint in runs_dir.glob("r/*.sqlite*"):
        checkpoint.unlink()
    verified = cli("runs", "verify", "r", "--json")
    assert verified.exit_code == 6 and said in verified.stdout, verified.stdout
    gated = cli("gate", "r")
    assert gated.exit_code == 6 and said in gated.stderr, gated.stderr
    for target in (tmp_path / "copy", pg_url):
        with pytest.raises(CorruptLedger if keyed else InputError, match="nothing was imported") as refused:
            import_log(target, "moved", forged)
        assert said in refused.value.message
        assert (refused.value.code, refused.value.exit_code) == (
            ("forged_signature", 6) if keyed else ("invalid_log", 2))
        with pytest.raises(UnknownRun):
            Ledger.open(target, "moved").state()
    assert not (tmp_path / "copy" / "moved").exists()


@pytest.mark.parametrize("keyed", [True, False], ids=["keys pinned", "no keys"])
def test_a_pool_cap_label_in_a_run_of_no_pool_is_damage(
        cli: Any, keys: dict[str, Path], runs_dir: Path, tmp_path: Path, pg_url: str, keyed: bool) -> None:
    """``pool_cap`` hands an escalation to a pool's rules: in a run of no pool it would waive
    the run's own keys, approvers and quorum, and no writer gives it there."""
    pinned = ["--approver-key", f"alice={pub(keys['alice-ed25519'])}",
              "--approver-key", f"bob={pub(keys['alice-ecdsa'])}"] if keyed else []
    assert cli("runs", "init", "r", "--cap", "10", "--escalation", "enforce", "--max-extension", "50",
               "--approvers", "alice,bob", "--quorum", "2", *pinned, "--by", "alice").exit_code == 0
    assert cli("reserve", "r", "t1", "--estimate", "8", "--by", "worker").exit_code == 0
    asked = cli("reserve", "r", "t2", "--estimate", "8", "--by", "worker", "--json")
    assert asked.exit_code == 4
    escalation = events((runs_dir / "r" / "events.ndjson").read_bytes())[-1]
    forged = _appended(
        (runs_dir / "r" / "events.ndjson").read_bytes(),
        {"type": "escalation_approved", "actor": "m1", "id": escalation["id"], "by": "m1", "quorum": 2},
        {"type": "escalation_resolved", "actor": "m2", "id": escalation["id"], "mode": "extend", "by": "m2",
         "extension_micros": escalation["needed_extension_micros"]},
        {"type": "budget_reserved", "actor": "m2", "task": "t2", "amount_micros": 8_000_000},
        change={"reason": "pool_cap"})
    _refused(cli, runs_dir, tmp_path, pg_url, forged, "is in no pool", keyed=keyed)


def test_ledger_verify_checks_a_members_pool_cap_decisions_against_its_pool(
        keys: dict[str, Path], runs_dir: Path) -> None:
    """The library's verify of a member reads its pool's keys, as ``runs verify`` does: a
    ``pool_cap`` resolution is never accepted without the pool's check."""
    Pool.init(runs_dir, "team", cap="3", max_extension="5", escalation="enforce",
              approver_keys=[f"alice={pub(keys['alice-ecdsa'])}"])
    run = Ledger.init(runs_dir, "m", cap="10", pool="team", escalation="enforce", actor="worker")
    with pytest.raises(Pending) as pending:
        run.reserve("t1", "4")
    assert Ledger.open(runs_dir, "m").verify().problems == []
    asked = events((runs_dir / "m" / "events.ndjson").read_bytes())[-1]
    assert asked["reason"] == "pool_cap"
    forged = _appended((runs_dir / "m" / "events.ndjson").read_bytes(),
                       {"type": "escalation_resolved", "actor": "mallory", "more": 1,
                        "id": pending.value.escalation_id, "mode": "extend", "by": "mallory",
                        "extension_micros": 0, "pool_extension_micros": 1_000_000},
                       {"type": "budget_reserved", "actor": "mallory", "task": "t1",
                        "amount_micros": 4_000_000})
    (runs_dir / "m" / "events.ndjson").write_bytes(forged)
    for checkpoint in runs_dir.glob("m/*.sqlite*"):
        checkpoint.unlink()
    verified = Ledger.open(runs_dir, "m").verify()
    assert [line for line, _ in verified.problems] == [len(events(forged)) - 1], verified.problems
    assert "pool_cap escalation" in verified.problems[0][1] and verified.forged == [verified.problems[0][0]]


def test_a_partial_approvals_signature_copied_onto_another_approvers_grant_is_refused(
        cli: Any, keys: dict[str, Path], runs_dir: Path, tmp_path: Path, pg_url: str) -> None:
    """Under claimed names, alice's approval signed with her key, copied onto a grant whose
    line names bob (vouched as alice), or a fresh one of hers naming bob, is not a second
    approver: the signature names its approver, and one key counts once."""
    escalation_id, signers = quorum_of_two(lambda who: (runs_dir, who), keys)
    Ledger.open(runs_dir, "r", actor="alice").approve(escalation_id, sign=signers["alice"])
    log = (runs_dir / "r" / "events.ndjson").read_bytes()
    lines = events(log)
    approved, asked = lines[-1], lines[-2]

    def fresh() -> str:
        content = sshsig.canonical_content("r", escalation_id, "extend", asked["requested_micros"],
                                           line_hash(log.splitlines()[-2]), "bob",
                                           (asked["needed_extension_micros"], 0))  # (the grant below)
        return signing.sign(content, signers["alice"])

    for signature in (lambda: approved["signature"], fresh):
        forged = _appended(log, {"type": "escalation_resolved", "actor": "bob", "more": 1,
                                 "id": escalation_id,
                                 "mode": "extend", "by": "bob", "role": "alice",
                                 "extension_micros": asked["needed_extension_micros"],
                                 "signature": signature(), "key": approved["key"]},
                           {"type": "budget_reserved", "actor": "bob", "task": "t",
                            "amount_micros": 4_000_000})
        _refused(cli, runs_dir, tmp_path, pg_url, forged, "approved twice", keyed=True)


def test_a_signature_moved_to_another_approvers_line_is_refused(
        cli: Any, keys: dict[str, Path], runs_dir: Path, tmp_path: Path, pg_url: str) -> None:
    """The signed content names the approver: alice's signed grant, its line renamed to bob
    (vouched as alice, so her key is one the reader tries), no longer checks out."""
    assert cli("runs", "init", "r", "--cap", "10", "--escalation", "enforce", "--approval-threshold", "1",
               "--approver-key", f"alice={pub(keys['alice-ed25519'])}",
               "--approver-key", f"bob={pub(keys['alice-ecdsa'])}").exit_code == 0
    asked = cli("reserve", "r", "t1", "--estimate", "2", "--by", "worker", "--json")
    approved = cli("approve", "r", asked.json()["escalation_id"], "--by", "alice",
                   "--sign", str(keys["alice-ed25519"]))
    assert approved.exit_code == 0, approved.stderr
    lines = events((runs_dir / "r" / "events.ndjson").read_bytes())
    at = next(i for i, e in enumerate(lines) if e["type"] == "escalation_resolved")
    lines[at].update(by="bob", role="alice")
    _refused(cli, runs_dir, tmp_path, pg_url, rechained(lines), "does not check out", keyed=True)


@pytest.mark.parametrize("keyed", [True, False], ids=["keys pinned", "no keys"])
def test_under_vouched_one_identity_under_two_names_fills_no_quorum(
        cli: Any, keys: dict[str, Path], runs_dir: Path, tmp_path: Path, pg_url: str, keyed: bool) -> None:
    """The reader tells approvers apart as the writer does (``same_approver``): under
    ``vouched``, two approvals vouched as the same role are one approver, whatever names
    they give."""
    pinned = ["--approver-key", f"alice={pub(keys['alice-ed25519'])}",
              "--approver-key", f"bob={pub(keys['alice-ecdsa'])}"] if keyed else []
    assert cli("runs", "init", "r", "--cap", "10", "--escalation", "enforce", "--approval-threshold", "1",
               "--approvers", "alice,bob", "--approvers-match", "vouched", "--quorum", "2",
               *pinned).exit_code == 0
    asked = cli("reserve", "r", "t1", "--estimate", "5", "--by", "worker", "--json")
    assert asked.exit_code == 4
    escalation_id = asked.json()["escalation_id"]
    log = (runs_dir / "r" / "events.ndjson").read_bytes()
    hashed = line_hash(log.splitlines()[-1])

    def signed(by: str) -> dict[str, str]:
        if not keyed:
            return {}
        content = sshsig.canonical_content("r", escalation_id, "extend", 5_000_000, hashed, by,
                                           (0, 0))  # (the lines below grant no extension)
        return {"signature": signing.sign(content, keys["alice-ed25519"]),
                "key": sshsig.parse_key(pub(keys["alice-ed25519"])).fingerprint}

    forged = _appended(log, {"type": "escalation_approved", "actor": "x", "id": escalation_id, "by": "x",
                             "quorum": 2, "role": "alice", **signed("x")},
                       {"type": "escalation_resolved", "actor": "y", "more": 1, "id": escalation_id,
                        "mode": "extend", "by": "y", "extension_micros": 0, "role": "alice", **signed("y")},
                       {"type": "budget_reserved", "actor": "y", "task": "t1", "amount_micros": 5_000_000})
    _refused(cli, runs_dir, tmp_path, pg_url, forged, "approved twice", keyed=keyed)


@pytest.mark.parametrize("keyed", [True, False], ids=["keys pinned", "no keys"])
def test_a_timeout_before_the_escalation_expires_is_damage(
        cli: Any, keys: dict[str, Path], runs_dir: Path, tmp_path: Path, pg_url: str, keyed: bool) -> None:
    """Only the expiry writes a pause by ``timeout``, once the escalation expired: one stamped
    before its ``expires_at`` (and after the line before it: a write whose clock is behind
    the log stamps that line's time, test_clock_jumps) is a decision nobody signed."""
    pinned = ["--approver-key", f"alice={pub(keys['alice-ed25519'])}"] if keyed else []
    assert cli("runs", "init", "r", "--cap", "10", "--escalation", "enforce", "--approval-threshold", "1",
               "--escalation-timeout", "1h", *pinned).exit_code == 0
    asked = cli("reserve", "r", "t1", "--estimate", "5", "--by", "worker", "--json")
    assert asked.exit_code == 4
    log = (runs_dir / "r" / "events.ndjson").read_bytes()
    assert events(log)[-1]["expires_at"] > events(log)[-1]["ts"]
    asked_at = events(log)[-1]["ts"]
    forged = _appended(log, {"type": "escalation_resolved", "actor": "timeout", "mode": "pause",
                             "by": "timeout", "id": asked.json()["escalation_id"], "extension_micros": 0,
                             "ts": format_ts(parse_ts(asked_at) + timedelta(minutes=1))})
    _refused(cli, runs_dir, tmp_path, pg_url, forged, "before it expired", keyed=keyed)
    # The expiry itself, at its time, replays.
    lines = events(forged)
    lines[-1]["ts"] = events(log)[-1]["expires_at"]
    (runs_dir / "r" / "events.ndjson").write_bytes(rechained(lines))
    for checkpoint in runs_dir.glob("r/*.sqlite*"):
        checkpoint.unlink()
    assert cli("runs", "verify", "r").exit_code == 0



def test_a_resolution_by_a_name_off_the_approver_list_is_damage(
        cli: Any, runs_dir: Path, tmp_path: Path, pg_url: str) -> None:
    """Under claimed names too, a reader holds a resolver to the run's approver list by the
    name a writer checks (``rules.listed``: ``by``, or the role where lists name roles)."""
    assert cli("runs", "init", "r", "--cap", "10", "--escalation", "enforce", "--approval-threshold", "1",
               "--approvers", "alice,bob").exit_code == 0
    asked = cli("reserve", "r", "t1", "--estimate", "2", "--by", "worker", "--json")
    assert asked.exit_code == 4
    log = (runs_dir / "r" / "events.ndjson").read_bytes()
    forged = _appended(log, {"type": "escalation_resolved", "actor": "mallory", "more": 1, "mode": "extend",
                             "id": asked.json()["escalation_id"], "by": "mallory", "role": "mallory",
                             "extension_micros": 0},
                       {"type": "budget_reserved", "actor": "mallory", "task": "t1",
                        "amount_micros": 2_000_000})
    _refused(cli, runs_dir, tmp_path, pg_url, forged, "not one of the approvers", keyed=False)
