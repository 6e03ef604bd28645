"""A pool's pinned keys bind its members' logs: a ``pool_cap`` escalation is approved in the
member run's log, signed by a key the pool pins. Every reader of a member — ``runs verify``,
``gate`` of the run, ``gate --pool``, ``pools verify`` and the writers that count its money
for the pool — checks those approvals against the pool's keys, on both stores, by the one
rule a run's own keys are checked by."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from escalate import Ledger
from escalate.core import sshsig
from escalate.core.events import line_hash
from escalate.errors import Refused
from escalate.escalation import signing
from tests.conftest import drop_books, log_bytes, rechained, snapshot_store
from tests.test_signed_approvals import approver, events, keys, pub

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")
__all__ = ["keys"]  # (the module's fixture, shared)

Location = Path | str


def put_log(store: Location, run_id: str, data: bytes) -> None:
    """Replace ``run_id``'s log with ``data`` as someone who can write the store could: the
    file and its checkpoint gone, or (PostgreSQL) the table's owner past its append-only trigger."""
    if isinstance(store, Path):
        (store / run_id / "events.ndjson").write_bytes(data)
        for checkpoint in (store / run_id).glob("*.sqlite*"):
            checkpoint.unlink()
        return
    lines = data.splitlines(keepends=True)
    with psycopg.connect(store, autocommit=True) as connection:
        connection.execute("ALTER TABLE escalate_events DISABLE TRIGGER escalate_events_append_only")
        connection.execute("DELETE FROM escalate_events WHERE ledger = %s", (run_id,))
        offset = 0
        for seq, line in enumerate(lines, start=1):
            offset += len(line)
            connection.execute("INSERT INTO escalate_events (ledger, seq, end_offset, line) "
                               "VALUES (%s, %s, %s, %s)", (run_id, seq, offset, line))
        connection.execute("ALTER TABLE escalate_events ENABLE TRIGGER escalate_events_append_only")
        for table in ("escalate_tasks", "escalate_escalations"):
            connection.execute(f"DELETE FROM {table} WHERE ledger = %s", (run_id,))
        connection.execute("UPDATE escalate_ledgers SET size = %s, lines = %s, checkpoint = NULL, "
                           "checkpoint_lines = 0 WHERE ledger = %s", (offset, len(lines), run_id))


def approved_member(cli: Any, keys: dict[str, Path], store: Location) -> tuple[bytes, int]:
    """Pool team pinning alice's ecdsa key, members r and r2; r's pool_cap escalation approved
    with alice's signature. r's log, and the line of the resolution in it."""
    assert cli("pools", "init", "team", "--cap", "3", "--max-extension", "5", "--escalation", "enforce",
               "--approver-key", f"{approver(store)}={pub(keys['alice-ecdsa'])}").exit_code == 0
    for run in ("r", "r2"):
        assert cli("runs", "init", run, "--cap", "10", "--pool", "team").exit_code == 0
    asked = cli("reserve", "r", "t1", "--estimate", "4", "--by", "bob", "--json")
    assert asked.exit_code == 4, asked.stdout
    approved = cli("approve", "r", asked.json()["escalation_id"], "--by", "alice",
                   "--sign", str(keys["alice-ecdsa"]))
    assert approved.exit_code == 0, approved.stderr
    signed = log_bytes(store, "r")
    line = 1 + next(i for i, e in enumerate(events(signed)) if e["type"] == "escalation_resolved")
    return signed, line


def forged_logs(signed: bytes, keys: dict[str, Path]) -> dict[str, bytes]:
    """r's log with its pool_cap approval forged, the chain rebuilt: unsigned, or signed by a
    key the pool does not pin."""
    lines = events(signed)
    at = next(i for i, e in enumerate(lines) if e["type"] == "escalation_resolved")
    asked = next(e for e in lines if e["type"] == "escalation")
    content = sshsig.canonical_content("r", asked["id"], "extend", asked["requested_micros"],
                                       lines[at]["prev"], lines[at]["by"],
                                       sshsig.line_grant("extend", lines[at]))
    mallory = {"signature": signing.sign(content, keys["mallory"]),
               "key": sshsig.parse_key(pub(keys["mallory"])).fingerprint}

    def edited(change: dict[str, Any], drop: tuple[str, ...] = ()) -> bytes:
        copy = [dict(e) for e in lines]
        copy[at].update(change)
        for key in drop:
            del copy[at][key]
        return rechained(copy)

    return {"unsigned": edited({}, ("signature", "key")), "mallory's key": edited(mallory)}


@pytest.mark.parametrize("forgery", ["unsigned", "mallory's key"])
def test_a_forged_pool_cap_approval_fails_every_reader_of_the_member(
        cli: Any, keys: dict[str, Path], store: Location, forgery: str) -> None:
    signed, line = approved_member(cli, keys, store)
    put_log(store, "r", forged_logs(signed, keys)[forgery])
    readers = (["runs", "verify", "r"], ["gate", "r"], ["gate", "--pool", "team"],
               ["pools", "verify", "team"])
    for args in readers:
        refused = cli(*args, "--json")
        assert refused.exit_code == 6, (args, refused.stdout, refused.stderr)
        assert f"line {line}" in refused.stderr + refused.stdout or \
            f'"line": {line}' in refused.stdout, (args, refused.stdout)
        assert "pool_cap escalation" in refused.stderr + refused.stdout, (args, refused.stdout)
    assert cli("gate", "r", "--json").json()["error"] == "forged_signature"
    verified = cli("runs", "verify", "r", "--json").json()
    assert [problem["line"] for problem in verified["problems"]] == [line]
    # Money writes into the member, and (once the books are folded again) into its pool, are
    # refused rather than count the forged extension; nothing is written.
    before = snapshot_store(store)
    for run in ("r", "r2"):
        if run == "r2":
            drop_books(store, "team")
        refused = cli("reserve", run, "t9", "--estimate", "0.5", "--json")
        assert refused.exit_code == 6, (run, refused.stdout, refused.stderr)
        assert refused.json()["error"] == "member_unreadable" and refused.json()["run"] == "r"
        assert f"line {line}" in refused.stderr and refused.stderr.count("\n") == 1
        assert {k: v for k, v in snapshot_store(store).items() if "derived" not in k} == \
            {k: v for k, v in before.items() if "derived" not in k}
    # The genuine log back: every reader passes, and the writes go through.
    put_log(store, "r", signed)
    drop_books(store, "team")
    for args in (["runs", "verify", "r"], ["gate", "r"], ["pools", "verify", "team"]):
        assert cli(*args).exit_code == 0, args
    assert cli("gate", "--pool", "team", "--allow-halts").exit_code != 6
    assert cli("reserve", "r2", "t9", "--estimate", "0.5").exit_code != 6
    assert Ledger.open(store, "r").verify().problems == []


def pool_log(store: Location, pool_id: str) -> bytes:
    """The pool's log as the store holds it: the file, or the rows of the database."""
    if isinstance(store, Path):
        return (store / pool_id / "events.ndjson").read_bytes()
    with psycopg.connect(store, autocommit=True) as connection:
        rows = connection.execute("SELECT line FROM escalate_events WHERE ledger = %s ORDER BY seq",
                                  (pool_id,)).fetchall()
    return b"".join(bytes(row[0]) if not isinstance(row[0], str) else row[0].encode() for row in rows)


def refused_by_every_reader(cli: Any, line: int) -> None:
    """``runs verify`` and ``gate`` of member r, ``gate --pool`` and ``pools verify`` of its
    pool all exit 6 naming r's line ``line``."""
    for args in (["runs", "verify", "r"], ["gate", "r"], ["gate", "--pool", "team"],
                 ["pools", "verify", "team"]):
        refused = cli(*args, "--json")
        assert refused.exit_code == 6, (args, refused.stdout, refused.stderr)
        assert f"line {line}" in refused.stderr + refused.stdout or \
            f'"line": {line}' in refused.stdout, (args, refused.stdout)


@pytest.mark.parametrize("backdated", ["the decision", "the escalation and its decision"])
def test_a_backdated_pool_cap_decision_is_held_to_the_pools_keys(
        cli: Any, keys: dict[str, Path], store: Location, backdated: str) -> None:
    # A pool_cap approval stripped of its signature, dated before the pool existed: the
    # pool's policy that governs it is never chosen by the line's own time alone.
    signed, line = approved_member(cli, keys, store)
    lines = events(signed)
    for event in lines[line - 1:]:
        event.update(ts="1999-12-31T23:59:59.000000Z")
        event.pop("signature", None)
        event.pop("key", None)
    if backdated != "the decision":
        next(e for e in lines if e["type"] == "escalation").update(ts="1999-12-31T23:59:58.000000Z")
    put_log(store, "r", rechained(lines))
    refused_by_every_reader(cli, line)
    verified = cli("runs", "verify", "r", "--json")
    assert "pool_cap escalation" in verified.stdout
    if backdated != "the decision":
        assert "before its pool team was opened" in verified.stdout


def test_a_decision_dated_before_its_member_joined_is_held_to_the_pools_policy_since(
        cli: Any, keys: dict[str, Path], store: Location) -> None:
    # The pool pins keys after it opened, then r joins: a forged unsigned approval dated
    # between the pool's opening and the pinning still needs the key.
    assert cli("pools", "init", "team", "--cap", "3", "--max-extension", "5", "--escalation",
               "enforce").exit_code == 0
    opened = events(pool_log(store, "team"))[0]["ts"]
    assert cli("pools", "set", "team", "--approver-key",
               f"{approver(store)}={pub(keys['alice-ecdsa'])}").exit_code == 0
    assert cli("runs", "init", "r", "--cap", "10", "--pool", "team").exit_code == 0
    asked = cli("reserve", "r", "t1", "--estimate", "4", "--by", "bob", "--json").json()["escalation_id"]
    assert cli("approve", "r", asked, "--by", "alice", "--sign", str(keys["alice-ecdsa"])).exit_code == 0
    signed = log_bytes(store, "r")
    lines = events(signed)
    line = 1 + next(i for i, e in enumerate(lines) if e["type"] == "escalation_resolved")
    for event in lines[line - 2:]:
        event.update(ts=opened)
        event.pop("signature", None)
        event.pop("key", None)
    put_log(store, "r", rechained(lines))
    refused_by_every_reader(cli, line)
    put_log(store, "r", signed)
    assert cli("runs", "verify", "r").exit_code == 0


@pytest.mark.parametrize("forgery", ["an appended unchained line", "a rechained unsigned change"])
def test_a_members_readers_trust_no_pool_policy_its_pools_log_does_not_vouch_for(
        cli: Any, keys: dict[str, Path], store: Location, forgery: str) -> None:
    # r's unsigned pool_cap approval is refused while the pool pins keys; a policy change
    # lifting them that the pool's own fold refuses (off the chain, or unsigned while keys
    # are pinned) lifts nothing for the readers of r.
    signed, line = approved_member(cli, keys, store)
    lines = events(signed)
    lines[line - 1].pop("signature")
    lines[line - 1].pop("key")
    put_log(store, "r", rechained(lines))
    refused_by_every_reader(cli, line)
    pool = events(pool_log(store, "team"))
    lifted = {"v": 1, "seq": len(pool) + 1, "ts": pool[-1]["ts"], "type": "policy_changed",
              "actor": "mallory",
              "escalation": {**pool[0]["escalation"], "approver_keys": {}}}
    if forgery == "an appended unchained line":
        put_log(store, "team", pool_log(store, "team") + orjson.dumps(lifted) + b"\n")
    else:
        put_log(store, "team", rechained([*pool, lifted]))
    for args in (["runs", "verify", "r"], ["gate", "r"]):
        refused = cli(*args, "--json")
        assert refused.exit_code == 6, (args, refused.stdout, refused.stderr)
        assert "pool's log fails at line" in refused.stdout + refused.stderr, (args, refused.stdout)
    for args in (["gate", "--pool", "team"], ["pools", "verify", "team"]):
        assert cli(*args).exit_code == 6, args


def test_a_member_log_forged_in_place_at_the_same_size_is_refused_by_its_next_write(
        cli: Any, keys: dict[str, Path], store: Location) -> None:
    # The pool's books counted r up to the byte where its log ends; an edit that keeps the
    # size (one character of the signature, the chain rebuilt) ends the log in another line.
    signed, line = approved_member(cli, keys, store)
    assert cli("reserve", "r", "t2", "--estimate", "0.5").exit_code in (0, 3, 4)  # the books are current
    signed = log_bytes(store, "r")
    lines = events(signed)
    at = line - 1
    lines[at] = {**lines[at], "signature": lines[at]["signature"].replace("A", "B", 1)}
    forged = rechained(lines)
    assert len(forged) == len(signed) and forged != signed
    put_log(store, "r", forged)
    before = {k: v for k, v in snapshot_store(store).items() if "derived" not in k}
    refused = cli("reserve", "r", "t3", "--estimate", "0.5", "--json")
    assert refused.exit_code == 6, (refused.stdout, refused.stderr)
    assert refused.json()["error"] == "member_unreadable" and f"line {line}" in refused.stderr
    assert {k: v for k, v in snapshot_store(store).items() if "derived" not in k} == before
    put_log(store, "r", signed)
    assert cli("reserve", "r", "t3", "--estimate", "0.5").exit_code != 6


def test_a_signed_pool_approval_cannot_be_made_to_grant_more(cli: Any, keys: dict[str, Path],
                                                             store: Location) -> None:
    # alice signed a pool extension of $1; the same line re-chained to extend the pool by the
    # whole max extension no longer checks out: her signature covers the grant.
    signed, line = approved_member(cli, keys, store)
    lines = events(signed)
    assert lines[line - 1]["pool_extension_micros"] == 1_000_000
    lines[line - 1]["pool_extension_micros"] = 5_000_000
    put_log(store, "r", rechained(lines))
    refused_by_every_reader(cli, line)
    drop_books(store, "team")  # (the books counted r up to the same byte: fold it again)
    before = snapshot_store(store)
    refused = cli("reserve", "r2", "t9", "--estimate", "3", "--json")
    assert refused.exit_code == 6, refused.stdout
    assert refused.json()["error"] == "member_unreadable" and refused.json()["run"] == "r"
    assert {k: v for k, v in snapshot_store(store).items() if "derived" not in k} == \
        {k: v for k, v in before.items() if "derived" not in k}


def test_an_approval_signed_before_its_grant_grew_is_refused(keys: dict[str, Path], store: Location,
                                                             cli: Any) -> None:
    # alice signs a $1 pool extension; r2 then takes more of the pool, so approving now would
    # extend it by $2: her signature does not cover that, and nothing is written.
    assert cli("pools", "init", "team", "--cap", "3", "--max-extension", "5", "--escalation", "enforce",
               "--approver-key", f"{approver(store)}={pub(keys['alice-ecdsa'])}").exit_code == 0
    for run in ("r", "r2"):
        assert cli("runs", "init", run, "--cap", "10", "--pool", "team").exit_code == 0
    asked = cli("reserve", "r", "t1", "--estimate", "4", "--by", "bob", "--json").json()["escalation_id"]
    content = Ledger.open(store, "r").signing_content(asked, "extend")
    assert b'"pool_extension_micros":1000000' in content
    early = signing.sign(content, keys["alice-ecdsa"])
    assert cli("reserve", "r2", "t1", "--estimate", "1").exit_code == 0
    before = snapshot_store(store)
    with pytest.raises(Refused) as error:
        Ledger.open(store, "r").approve(asked, by="alice", signature=early)
    assert error.value.code == "bad_signature", error.value
    assert "pool $2.00" in str(error.value)
    assert {k: v for k, v in snapshot_store(store).items() if "derived" not in k} == \
        {k: v for k, v in before.items() if "derived" not in k}
    again = Ledger.open(store, "r").approve(asked, by="alice", sign=keys["alice-ecdsa"])
    assert again["status"] == "approved" and again.get("pool_extension_micros") == 2_000_000
    assert cli("runs", "verify", "r").exit_code == 0 and cli("pools", "verify", "team").exit_code == 0


def test_a_decision_backdated_before_the_pool_pinned_keys_is_held_to_its_place_in_the_log(
        cli: Any, keys: dict[str, Path], store: Location) -> None:
    # r joined before the pool pinned keys; the pinning records where r's log ended, so a
    # forged unsigned approval written after it, dated before it, still needs the key.
    assert cli("pools", "init", "team", "--cap", "3", "--max-extension", "5", "--escalation",
               "enforce").exit_code == 0
    assert cli("runs", "init", "r", "--cap", "10", "--pool", "team").exit_code == 0
    opened = events(pool_log(store, "team"))[0]["ts"]
    assert cli("pools", "set", "team", "--approver-key",
               f"{approver(store)}={pub(keys['alice-ecdsa'])}").exit_code == 0
    pinned = events(pool_log(store, "team"))[-1]
    assert pinned["members_at"] == {"r": [1, line_hash(log_bytes(store, "r").splitlines()[0])]}
    asked = cli("reserve", "r", "t1", "--estimate", "4", "--by", "bob", "--json").json()["escalation_id"]
    assert cli("approve", "r", asked, "--by", "alice", "--sign", str(keys["alice-ecdsa"])).exit_code == 0
    signed = log_bytes(store, "r")
    assert cli("runs", "verify", "r").exit_code == 0
    lines = events(signed)
    line = 1 + next(i for i, e in enumerate(lines) if e["type"] == "escalation_resolved")
    for event in lines[1:]:
        event.update(ts=opened)
    for event in lines[line - 1:]:
        event.pop("signature", None)
        event.pop("key", None)
    put_log(store, "r", rechained(lines))
    refused_by_every_reader(cli, line)
    # r's first line rewritten too: the log is not the one the pool recorded.
    lines[0]["ts"] = opened
    put_log(store, "r", rechained(lines))
    verified = cli("runs", "verify", "r", "--json")
    assert verified.exit_code == 6 and "it was rewritten since" in verified.stdout
    put_log(store, "r", signed)
    assert cli("runs", "verify", "r").exit_code == 0


def test_one_identity_under_two_names_fills_no_pools_quorum(cli: Any, store: Location) -> None:
    # The pool tells approvers apart by vouched identity; its member's own policy does not.
    # Two approvals vouched as the same role are one approver of the pool's quorum of two,
    # whatever names they give, for every reader of the member (the writer's rule).
    assert cli("pools", "init", "team", "--cap", "3", "--max-extension", "5", "--escalation", "enforce",
               "--approvers", "alice,bob", "--approvers-match", "vouched", "--quorum", "2").exit_code == 0
    assert cli("runs", "init", "r", "--cap", "10", "--pool", "team").exit_code == 0
    assert cli("reserve", "r", "t1", "--estimate", "4", "--by", "bob", "--json").exit_code == 4
    lines = events(log_bytes(store, "r"))
    asked = lines[-1]
    assert (asked["reason"], asked["quorum"]) == ("pool_cap", 2)
    common = {"v": 1, "ts": asked["ts"], "id": asked["id"], "role": "alice"}
    lines += [{**common, "seq": len(lines) + 1, "type": "escalation_approved", "actor": "x", "by": "x",
               "quorum": 2},
              {**common, "seq": len(lines) + 2, "type": "escalation_resolved", "actor": "y", "by": "y",
               "more": 1, "mode": "extend", "extension_micros": 0,
               "pool_extension_micros": asked["needed_extension_micros"]},
              {"v": 1, "ts": asked["ts"], "seq": len(lines) + 3, "type": "budget_reserved", "actor": "y",
               "task": "t1", "amount_micros": asked["requested_micros"]}]
    put_log(store, "r", rechained(lines))
    refused_by_every_reader(cli, len(lines) - 1)
    assert "approved twice by 'alice'" in cli("runs", "verify", "r", "--json").stdout


def test_a_run_cap_escalation_relabelled_pool_cap_extends_no_run(cli: Any, keys: dict[str, Path],
                                                                  store: Location) -> None:
    # r pins its own key, its pool none: its run_cap escalation relabelled pool_cap (the
    # pool's to decide) and granted unsigned, extending the run, is a line no writer appends —
    # approving a pool_cap escalation extends the pool, never the run.
    assert cli("pools", "init", "team", "--cap", "1000", "--max-extension", "50", "--escalation",
               "enforce").exit_code == 0
    assert cli("runs", "init", "r", "--pool", "team", "--cap", "10", "--escalation", "enforce",
               "--max-extension", "50", "--approver-key",
               f"{approver(store)}={pub(keys['alice-ecdsa'])}").exit_code == 0
    assert cli("reserve", "r", "t1", "--estimate", "8", "--by", "worker").exit_code == 0
    assert cli("reserve", "r", "t2", "--estimate", "8", "--by", "worker").exit_code == 4
    lines = events(log_bytes(store, "r"))
    asked = lines[-1]
    assert asked["reason"] == "run_cap"
    asked.update(reason="pool_cap", pool="team")
    common = {"v": 1, "ts": asked["ts"], "actor": "mallory"}
    lines += [{**common, "seq": len(lines) + 1, "type": "escalation_resolved", "more": 1, "id": asked["id"],
               "mode": "extend", "by": "mallory", "extension_micros": asked["needed_extension_micros"]},
              {**common, "seq": len(lines) + 2, "type": "budget_reserved", "task": asked["task"],
               "amount_micros": asked["requested_micros"]}]
    put_log(store, "r", rechained(lines))
    refused_by_every_reader(cli, len(lines) - 1)
    assert "extends the pool, never the run" in cli("runs", "verify", "r", "--json").stdout


@pytest.mark.parametrize("edit", ["cut", "rewritten"])
def test_a_member_log_cut_behind_its_pools_members_at_fails_every_reader_and_the_pools_writes(
        cli: Any, keys: dict[str, Path], store: Location, edit: str) -> None:
    # r holds no pool decision; the pool recorded where r's log ended when it pinned a key.
    # r's log cut (or its reservation rewritten) behind that point, the books thrown away:
    # the $8 the pool counted there is never read as nothing, by any reader or writer.
    assert cli("pools", "init", "team", "--cap", "10", "--max-extension", "50", "--escalation",
               "enforce").exit_code == 0
    assert cli("runs", "init", "r", "--cap", "100", "--pool", "team").exit_code == 0
    assert cli("reserve", "r", "t1", "--estimate", "8", "--by", "bob").exit_code == 0
    assert cli("pools", "set", "team", "--approver-key",
               f"{approver(store)}={pub(keys['alice-ecdsa'])}").exit_code == 0
    assert events(pool_log(store, "team"))[-1]["members_at"]["r"][0] == 2
    assert cli("runs", "init", "r2", "--cap", "100", "--pool", "team").exit_code == 0
    kept = log_bytes(store, "r")
    lines = events(kept)
    if edit == "cut":
        put_log(store, "r", kept.splitlines(keepends=True)[0])
    else:
        lines[1]["amount_micros"] = 1_000_000
        put_log(store, "r", rechained(lines))
    drop_books(store, "team")
    refused_by_every_reader(cli, 2)
    assert "its log is not the one its pool recorded" in cli("runs", "verify", "r").stderr
    shown = cli("pools", "show", "team", "--json")
    assert [each["run"] for each in shown.json()["unreadable"]] == ["r"], shown.stdout
    before = logs(store)
    for args in (["reserve", "r2", "t2", "--estimate", "9"], ["reserve", "r", "t3", "--estimate", "1"]):
        refused = cli(*args, "--by", "bob")
        assert refused.exit_code == 6 and "its log is not the one its pool recorded" in refused.stderr, args
    assert logs(store) == before
    put_log(store, "r", kept)  # the log back as the pool recorded it: read again, and counted
    for args in (["runs", "verify", "r"], ["pools", "verify", "team"], ["gate", "--pool", "team"]):
        assert cli(*args).exit_code == 0, args
    assert cli("reserve", "r2", "t2", "--estimate", "9", "--by", "bob").exit_code == 4


def logs(store: Location) -> dict[str, bytes]:
    """:func:`snapshot_store` but the pool's books (disposable: a refused write may rebuild them)."""
    return {name: data for name, data in snapshot_store(store).items() if ".derived." not in name}
