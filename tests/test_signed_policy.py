"""While a run or a pool pins approvers' keys, every change to its policy is signed by a key
pinned (before the change) for whoever makes it, over the change's canonical content
(docs/escalation.md, "How to pin keys and sign"): a claimed name cannot unpin or swap the
keys, nor lift any other limit. Refused at write (exit 3, nothing written), and a forged
change in a re-chained log fails replay (exit 6). The first pinning is trusted on first use."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest

from escalate import Ledger, Pending
from escalate.core import sshsig
from escalate.escalation import signing
from escalate.transfer import import_log
from tests.conftest import FakeClock, log_bytes, rechained, snapshot_store
from tests.test_signed_approvals import approver, escalated, events, keys, pub

__all__ = ["keys"]  # the fixture, imported for the tests below

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")

# Every setting a policy change can make: each one lifts a limit or changes who decides.
CHANGES = {
    "unpin every key": ["--approver-key", ""],
    "swap alice's key for mallory's": ["--approver-key", "alice=MALLORY"],
    "lower the quorum": ["--quorum", "1"],
    "raise the max extension": ["--max-extension", "1000"],
    "turn escalation off": ["--escalation", "off"],
    "drop the threshold": ["--no-approval-threshold"],
    "name other approvers": ["--approvers", "mallory,eve"],
    "match approvers on vouched identities": ["--approvers-match", "vouched"],
    "raise the threshold": ["--approval-threshold", "900"],
}


def _kept(store: Any) -> dict[str, bytes]:
    """What the store keeps, but a pool's books (derived from the logs, rebuilt at will)."""
    return {name: data for name, data in snapshot_store(store).items() if ".derived.sqlite" not in name}


def _args(change: list[str], keys: dict[str, Path], name: str) -> list[str]:
    return [arg.replace("alice=MALLORY", f"{name}={pub(keys['mallory'])}") for arg in change]


@pytest.mark.parametrize("what", ["run", "pool"])
def test_a_policy_change_under_pinned_keys_needs_a_pinned_approvers_signature(
        cli: Any, keys: dict[str, Path], store: Any, what: str) -> None:
    """The attack: on the file store under claimed names anyone may say --by alice; unpinning
    or swapping her key, or any other change, unsigned or signed by another key, is refused."""
    name = approver(store)
    made = cli(f"{what}s", "init", "r" if what == "run" else "team", "--cap", "3", "--max-extension", "5",
               "--escalation", "enforce", "--approval-threshold", "1", "--quorum", "2",
               "--approver-key", f"{name}={pub(keys['alice-ed25519'])}")
    assert made.exit_code == 0, made.stderr
    set_cmd = ["runs", "set", "r"] if what == "run" else ["pools", "set", "team"]
    before = _kept(store)
    for label, change in {**CHANGES, "raise the cap": ["--cap", "1000"]}.items():
        if label == "raise the cap" and what == "run":
            continue
        args = [*set_cmd, *_args(change, keys, name), "--by", "alice", "--json"]
        unsigned = cli(*args)
        assert (unsigned.exit_code, unsigned.json()["error"]) == (3, "unsigned"), (label, unsigned.stdout)
        assert unsigned.stderr.count("\n") == 1 and "--sign" in unsigned.stderr, label
        forged = cli(*args, "--sign", str(keys["mallory"]))
        assert (forged.exit_code, forged.json()["error"]) == (3, "bad_signature"), (label, forged.stdout)
        assert forged.stderr.count("\n") == 1, label
        assert _kept(store) == before, label
    signed = cli(*set_cmd, "--approver-key", "", "--by", "alice", "--sign", str(keys["alice-ed25519"]))
    assert signed.exit_code == 0, signed.stderr
    assert cli(*set_cmd, "--quorum", "1", "--by", "alice").exit_code == 0  # nothing pinned: not signed
    verify = ["runs", "verify", "r"] if what == "run" else ["pools", "verify", "team"]
    assert cli(*verify).exit_code == 0


def test_the_first_pinning_is_trusted_on_first_use_and_recorded_unsigned(
        cli: Any, keys: dict[str, Path], store: Any) -> None:
    assert cli("runs", "init", "r", "--cap", "10").exit_code == 0
    pinned = cli("runs", "set", "r", "--approver-key", f"{approver(store)}={pub(keys['alice-ed25519'])}",
                 "--by", "alice")
    assert pinned.exit_code == 0, pinned.stderr
    [line] = [e for e in events(log_bytes(store, "r")) if e["type"] == "policy_changed"]
    assert "signature" not in line
    assert cli("runs", "set", "r", "--max-extension", "9", "--by", "alice").exit_code == 3


def test_the_signature_covers_the_change_and_checks_out_in_ssh_keygen(
        cli: Any, keys: dict[str, Path], runs_dir: Path, tmp_path: Path) -> None:
    escalated(cli, keys)
    changed = cli("runs", "set", "r", "--max-extension", "6", "--by", "alice",
                  "--sign", str(keys["alice-ed25519"]))
    assert changed.exit_code == 0, changed.stderr
    lines = events((runs_dir / "r" / "events.ndjson").read_bytes())
    change = lines[-1]
    opened = (runs_dir / "r" / "events.ndjson").read_bytes().splitlines()[0]
    content = sshsig.policy_content("run", "r", change["escalation"], None, sshsig_hash(opened))
    assert orjson.loads(content) == {"change": "policy", "run": "r", "escalation": change["escalation"],
                                     "policy_line": sshsig_hash(opened)}
    (tmp_path / "content").write_bytes(content)
    (tmp_path / "sig").write_text(change["signature"])
    (tmp_path / "allowed").write_text(f"alice {pub(keys['alice-ed25519'])}\n")
    import subprocess

    checked = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(tmp_path / "allowed"), "-I", "alice",
                              "-n", "escalate", "-s", str(tmp_path / "sig")],
                             input=content, capture_output=True, check=False)
    assert checked.returncode == 0, checked.stderr


def sshsig_hash(line: bytes) -> str:
    from escalate.core.events import line_hash

    return line_hash(line)


def _policy_forgeries(log: bytes, keys: dict[str, Path]) -> dict[str, bytes]:
    """A signed policy change (the last line) forged every way a writer of the log could:
    unsigned, signed by another key over the right content, its genuine signature moved onto
    another change (a replay), and a change appended after it with its signature again."""
    lines = events(log)
    change = lines[-1]
    content = sshsig.policy_content("run", "r", change["escalation"], None, _policy_line(log))
    mallory = {"signature": signing.sign(content, keys["mallory"]),
               "key": sshsig.parse_key(pub(keys["mallory"])).fingerprint}
    other = {**change["escalation"], "max_extension_micros": 1_000_000_000}
    unsigned = {k: v for k, v in change.items() if k not in ("signature", "key")}
    return {
        "unsigned": rechained([*lines[:-1], unsigned]),
        "signed by another key": rechained([*lines[:-1], {**change, **mallory}]),
        "its signature on another change": rechained([*lines[:-1], {**change, "escalation": other}]),
        "its signature replayed on a later change": rechained(
            [*lines, {**change, "seq": change["seq"] + 1, "escalation": other}]),
    }


def _policy_line(log: bytes) -> str:
    """The hash of the line that set the policy the last line changes."""
    raw = log.splitlines()
    at = max(i for i, e in enumerate(events(log)[:-1]) if e["type"] in ("run_opened", "policy_changed"))
    return sshsig_hash(raw[at])


def test_a_forged_policy_change_in_a_rechained_log_fails_verify_gate_and_import(
        cli: Any, keys: dict[str, Path], runs_dir: Path, tmp_path: Path, pg_url: str) -> None:
    escalated(cli, keys)
    changed = cli("runs", "set", "r", "--max-extension", "6", "--by", "alice",
                  "--sign", str(keys["alice-ed25519"]))
    assert changed.exit_code == 0, changed.stderr
    log = runs_dir / "r" / "events.ndjson"
    signed = log.read_bytes()
    assert rechained(events(signed)) == signed
    for name, forged in _policy_forgeries(signed, keys).items():
        log.write_bytes(forged)
        for checkpoint in runs_dir.glob("r/*.sqlite*"):
            checkpoint.unlink()
        verified = cli("runs", "verify", "r", "--json")
        assert verified.exit_code == 6, (name, verified.stdout)
        assert "policy change" in verified.stdout, (name, verified.stdout)
        assert cli("gate", "r").exit_code == 6, name
        for target in (tmp_path / "copy", pg_url):
            with pytest.raises(Exception, match="nothing was imported") as refused:
                import_log(target, "moved", forged)
            assert (getattr(refused.value, "code", None), getattr(refused.value, "exit_code", None)) == (
                "forged_signature", 6), name
    for target in (tmp_path / "good", pg_url):  # the genuine log imports into both stores
        import_log(target, "moved", signed)
        assert Ledger.open(target, "moved").verify().problems == []


def test_pools_verify_finds_a_forged_change_of_a_pools_policy(
        cli: Any, keys: dict[str, Path], runs_dir: Path) -> None:
    assert cli("pools", "init", "team", "--cap", "3", "--escalation", "enforce",
               "--approver-key", f"alice={pub(keys['alice-ecdsa'])}").exit_code == 0
    changed = cli("pools", "set", "team", "--cap", "4", "--by", "alice", "--sign", str(keys["alice-ecdsa"]))
    assert changed.exit_code == 0, changed.stderr
    log = next(path for path in runs_dir.rglob("events.ndjson") if "team" in str(path))
    lines = events(log.read_bytes())
    assert lines[-1]["cap_micros"] == 4_000_000 and "signature" in lines[-1]
    assert cli("pools", "verify", "team").exit_code == 0
    unpinned = {k: v for k, v in lines[-1].items() if k not in ("signature", "key")}
    unpinned["escalation"] = {k: v for k, v in unpinned["escalation"].items() if k != "approver_keys"}
    for forged in ([*lines[:-1], unpinned], [*lines[:-1], {**lines[-1], "cap_micros": 1_000_000_000}]):
        log.write_bytes(rechained(forged))
        verified = cli("pools", "verify", "team", "--json")
        assert verified.exit_code == 6, verified.stdout
        assert "policy change" in verified.stdout, verified.stdout


def test_what_a_signature_covers_holds_when_its_line_is_written_beside_an_expiry(
        keys: dict[str, Path], store: Any, clock: FakeClock) -> None:
    """A write that first expires an escalation writes its own lines in one group with the
    expiry: every hash after the first changes as the group is sealed. The hashes a signature
    covers (the escalation's line, the line that set the policy) are the ones written, so a
    signed approval and a signed policy change made after such a write verify."""
    name = approver(store)
    run = Ledger.init(store, "r", cap="10", escalation="enforce", approval_threshold="1",
                      escalation_timeout_s=60, actor="worker", clock=clock,
                      approver_keys=[f"{name}={pub(keys['alice-ed25519'])}"])
    with pytest.raises(Pending):
        run.reserve("t1", "2")
    clock.advance(61)
    with pytest.raises(Pending) as pending:
        run.reserve("t2", "2")  # expires t1's escalation in the same write
    alice = Ledger.open(store, "r", actor="alice", clock=clock)
    assert alice.approve(pending.value.escalation_id, sign=keys["alice-ed25519"])["status"] == "approved"
    with pytest.raises(Pending):
        run.reserve("t3", "2")
    clock.advance(61)
    assert alice.set_policy(max_extension="7", sign=keys["alice-ed25519"])["status"] == "changed"
    assert alice.set_policy(max_extension="8", sign=keys["alice-ed25519"])["status"] == "changed"
    grouped = [e for e in events(log_bytes(store, "r")) if e["type"] == "policy_changed"]
    assert len(grouped) == 2 and all("signature" in e for e in grouped)
    assert Ledger.open(store, "r").verify().problems == []
