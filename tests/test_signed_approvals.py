"""Signed approvals: a policy pins approvers' public SSH keys; every approve, pause and
cancel then carries an OpenSSH SSHSIG signature (namespace ``escalate``) over the
escalation's canonical content. Real keys made by ``ssh-keygen`` (ed25519, ecdsa, rsa);
signatures checked both ways between escalate and ``ssh-keygen -Y``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from escalate import Ledger, Pending
from escalate.core import sshsig
from escalate.errors import CorruptLedger, InputError
from escalate.escalation import signing
from escalate.transfer import import_log
from tests.conftest import log_bytes, rechained, snapshot_store
from tests.test_vouched import Person

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")

KINDS = {"ed25519": ["-t", "ed25519"], "ecdsa": ["-t", "ecdsa", "-b", "384"],
         "rsa": ["-t", "rsa", "-b", "2048"]}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Private key files by name (the .pub beside each): alice's of each kind, and mallory's."""
    folder = tmp_path_factory.mktemp("keys")
    made = {}
    for name, kind in [*((f"alice-{kind}", kind) for kind in KINDS), ("mallory", "ed25519")]:
        path = folder / name
        subprocess.run(["ssh-keygen", "-q", *KINDS[kind], "-N", "", "-C", f"{name}@host", "-f", str(path)],
                       check=True)
        made[name] = path
    return made


def pub(path: Path) -> str:
    return Path(f"{path}.pub").read_text().strip()


def approver(store: Any) -> str:
    """The name alice's key is pinned for: hers on the file store; on PostgreSQL the database
    role, which is who acts there whatever --by says (DESIGN §12)."""
    return "alice" if isinstance(store, Path) else str(urlsplit(store).username)


def escalated(cli: Any, keys: dict[str, Path], kind: str = "ed25519", run: str = "r",
              name: str = "alice") -> str:
    """A run pinning ``name``'s key (alice's of ``kind``), with bob's reservation waiting on a person."""
    made = cli("runs", "init", run, "--cap", "10", "--escalation", "enforce", "--approval-threshold", "1",
               "--max-extension", "5", "--approver-key", f"{name}={pub(keys[f'alice-{kind}'])}")
    assert made.exit_code == 0, made.stderr
    asked = cli("reserve", run, "t1", "--estimate", "2", "--by", "bob", "--json")
    assert asked.exit_code == 4, asked.stderr
    return str(asked.json()["escalation_id"])


def events(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in data.splitlines()]


@pytest.mark.parametrize("kind", KINDS)
def test_a_signed_approval_checks_out_in_escalate_and_in_ssh_keygen(
        cli: Any, keys: dict[str, Path], runs_dir: Path, tmp_path: Path, kind: str) -> None:
    escalation_id = escalated(cli, keys, kind)
    approved = cli("approve", "r", escalation_id, "--by", "alice", "--sign", str(keys[f"alice-{kind}"]),
                   "--json")
    assert approved.exit_code == 0, approved.stderr
    assert cli("runs", "verify", "r").exit_code == 0
    lines = events((runs_dir / "r" / "events.ndjson").read_bytes())
    resolved = next(e for e in lines if e["type"] == "escalation_resolved")
    assert resolved["key"] == sshsig.parse_key(pub(keys[f"alice-{kind}"])).fingerprint
    # An auditor rebuilds what was signed from the log alone (docs/escalation.md) …
    position = next(i for i, e in enumerate(lines) if e["type"] == "escalation")
    asked = lines[position]
    content = orjson.dumps({"run": "r", "escalation_id": asked["id"], "mode": resolved["mode"],
                            "amount_micros": asked["requested_micros"],
                            "escalation_line": lines[position + 1]["prev"], "by": resolved["by"],
                            # an approval's grant, as its line records it
                            "extension_micros": resolved["extension_micros"],
                            "pool_extension_micros": resolved.get("pool_extension_micros", 0)},
                           option=orjson.OPT_SORT_KEYS)
    # … and OpenSSH's own tool accepts the stored signature for alice in namespace escalate.
    (tmp_path / "allowed").write_text(f"alice {pub(keys[f'alice-{kind}'])}\n")
    (tmp_path / "sig").write_text(resolved["signature"])
    checked = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(tmp_path / "allowed"), "-I", "alice",
                              "-n", "escalate", "-s", str(tmp_path / "sig")], input=content,
                             capture_output=True, check=False)
    assert checked.returncode == 0, checked.stderr
    # The same content changed by one byte is refused by both.
    assert subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(tmp_path / "allowed"), "-I", "alice",
                           "-n", "escalate", "-s", str(tmp_path / "sig")],
                          input=content.replace(b'"r"', b'"s"'),
                          capture_output=True, check=False).returncode != 0
    with pytest.raises(sshsig.SignatureError, match="does not match"):
        sshsig.verify(resolved["signature"], content.replace(b'"r"', b'"s"'), [pub(keys[f"alice-{kind}"])])


@pytest.mark.parametrize("kind", KINDS)
def test_a_signature_ssh_keygen_made_verifies_in_escalate(keys: dict[str, Path], kind: str) -> None:
    message = b'{"any":"bytes"}'
    made = subprocess.run(["ssh-keygen", "-Y", "sign", "-n", "escalate", "-f", str(keys[f"alice-{kind}"])],
                          input=message, capture_output=True, check=True).stdout.decode()
    alice = pub(keys[f"alice-{kind}"])
    assert sshsig.verify(made, message, [alice]).kind == alice.split()[0]
    with pytest.raises(sshsig.SignatureError, match="not pinned"):
        sshsig.verify(made, message, [pub(keys["mallory"])])
    other = subprocess.run(["ssh-keygen", "-Y", "sign", "-n", "file", "-f", str(keys[f"alice-{kind}"])],
                           input=message, capture_output=True, check=True).stdout.decode()
    with pytest.raises(sshsig.SignatureError, match="namespace 'file'"):
        sshsig.verify(other, message, [pub(keys[f"alice-{kind}"])])


@pytest.mark.parametrize("mode", ["approve", "pause", "cancel"])
def test_an_unsigned_or_wrongly_signed_resolution_is_refused_and_nothing_is_written(
        cli: Any, keys: dict[str, Path], store: Any, mode: str) -> None:
    escalation_id = escalated(cli, keys, name=approver(store))
    before = snapshot_store(store)
    for args, code in [([], "unsigned"),
                       (["--sign", str(keys["mallory"])], "bad_signature"),  # alice's name, mallory's key
                       (["--sign", str(keys["alice-ecdsa"])], "bad_signature"),  # a key alice never pinned
                       *([(["--by", "mallory", "--sign", str(keys["mallory"])], "not_an_approver")]
                         if isinstance(store, Path) else [])]:
        by = [] if "--by" in args else ["--by", "alice"]
        refused = cli(mode, "r", escalation_id, *by, *args, "--json")
        assert (refused.exit_code, refused.json()["error"]) == (3, code), refused.stderr
        assert refused.stderr.count("\n") == 1
        assert snapshot_store(store) == before
    done = cli(mode, "r", escalation_id, "--by", "alice", "--sign", str(keys["alice-ed25519"]), "--json")
    assert done.exit_code in (0, 3) and done.json()["status"] in ("approved", "paused", "cancelled")
    assert Ledger.open(store, "r").verify().problems == []


def test_a_signature_made_for_another_resolution_is_refused(cli: Any, keys: dict[str, Path],
                                                            runs_dir: Path) -> None:
    escalation_id = escalated(cli, keys)
    run = Ledger.open(runs_dir, "r")
    for_pause = signing.sign(run.signing_content(escalation_id, "pause", "alice"), keys["alice-ed25519"])
    before = (runs_dir / "r" / "events.ndjson").read_bytes()
    with pytest.raises(Exception, match="does not match") as refused:
        run.approve(escalation_id, by="alice", signature=for_pause)
    assert getattr(refused.value, "code", None) == "bad_signature"
    assert (runs_dir / "r" / "events.ndjson").read_bytes() == before
    assert run.pause(escalation_id, by="alice", signature=for_pause)["status"] == "paused"


def _forgeries(data: bytes, keys: dict[str, Path]) -> dict[str, bytes]:
    """Hand edits of a signed log, each with its hash chain rebuilt."""
    lines = events(data)
    at = next(i for i, e in enumerate(lines) if e["type"] == "escalation_resolved")
    resolved = lines[at]
    escalation = next(e for e in lines if e["type"] == "escalation")
    content = sshsig.canonical_content("r", escalation["id"],
                                       resolved["mode"], escalation["requested_micros"], lines[at]["prev"],
                                       resolved["by"], sshsig.line_grant(resolved["mode"], resolved))
    mallory = signing.sign(content, keys["mallory"])

    def edited(**changes: Any) -> bytes:
        copy = [dict(e) for e in lines]
        copy[at].update(changes)
        for key in [k for k, v in changes.items() if v is None]:
            del copy[at][key]
        return rechained(copy)

    return {
        "mallory's signature": edited(signature=mallory,
                                      key=sshsig.parse_key(pub(keys["mallory"])).fingerprint),
        "no signature": edited(signature=None, key=None),
        "another name": edited(by="carol"),
        "a broken signature": edited(signature=resolved["signature"].replace("A", "B", 1)),
        "a wrong key field": edited(key=sshsig.parse_key(pub(keys["mallory"])).fingerprint),
    }


def test_a_forged_signature_in_a_rechained_log_fails_verify_gate_and_import(
        cli: Any, keys: dict[str, Path], runs_dir: Path, tmp_path: Path, pg_url: str) -> None:
    escalation_id = escalated(cli, keys)
    signed = cli("approve", "r", escalation_id, "--by", "alice", "--sign", str(keys["alice-ed25519"]))
    assert signed.exit_code == 0, signed.stderr
    signed = (runs_dir / "r" / "events.ndjson").read_bytes()
    assert rechained(events(signed)) == signed  # the forger's tool rebuilds a good chain
    for name, forged in _forgeries(signed, keys).items():
        (runs_dir / "r" / "events.ndjson").write_bytes(forged)
        for checkpoint in runs_dir.glob("r/*.sqlite*"):
            checkpoint.unlink()
        verified = cli("runs", "verify", "r", "--json")
        assert verified.exit_code == 6, (name, verified.stdout)
        assert "escalation_resolved" in verified.stdout or "sign" in verified.stdout, name
        assert cli("gate", "r").exit_code == 6, name
        for target in (tmp_path / f"copy-{len(name)}", pg_url):
            with pytest.raises(CorruptLedger, match="nothing was imported") as refused:
                import_log(target, "moved", forged)
            assert (refused.value.code, refused.value.exit_code) == ("forged_signature", 6), name
        assert cli("runs", "list", "--runs-dir", str(tmp_path / f"copy-{len(name)}"), "--json").json() == {
            "runs": []} or not (tmp_path / f"copy-{len(name)}" / "moved").exists()
        (tmp_path / "forged.ndjson").write_bytes(forged)
        imported = cli("runs", "import", "moved", str(tmp_path / "forged.ndjson"), "--json")
        assert (imported.exit_code, imported.json()["error"]) == (6, "forged_signature"), name
        assert imported.stderr.count("\n") == 1 and "signature" in imported.stderr, name
    assert not (runs_dir / "moved").exists()
    # Other damage is still bad input (exit 2): a line changed without its chain rebuilt.
    damaged = signed.replace(b'"run_cap_micros":10000000', b'"run_cap_micros":90000000', 1)
    assert damaged != signed
    for target in (tmp_path / "damaged", pg_url):
        with pytest.raises(InputError, match="nothing was imported") as bad:
            import_log(target, "moved", damaged)
        assert (bad.value.code, bad.value.exit_code) == ("invalid_log", 2)
    # The genuine log imports into both stores and verifies there.
    for target in (tmp_path / "good", pg_url):
        import_log(target, "moved", signed)
        assert Ledger.open(target, "moved").verify().problems == []


def test_pinned_keys_are_changed_only_by_a_pinned_approver(cli: Any, keys: dict[str, Path],
                                                           store: Any) -> None:
    if isinstance(store, Path):
        escalated(cli, keys)
    else:  # a key pinned for another role: this role may not change the policy
        escalated(cli, keys, name="alice")
        before = snapshot_store(store)
        refused = cli("runs", "set", "r", "--approver-key", f"{approver(store)}={pub(keys['mallory'])}",
                      "--json")
        assert (refused.exit_code, refused.json()["error"]) == (3, "not_an_approver")
        assert snapshot_store(store) == before
        return
    before = snapshot_store(store)
    refused = cli("runs", "set", "r", "--approver-key", f"mallory={pub(keys['mallory'])}", "--by", "mallory",
                  "--json")
    assert (refused.exit_code, refused.json()["error"]) == (3, "not_an_approver")
    assert snapshot_store(store) == before
    bad = cli("runs", "set", "r", "--approver-key", "alice=ssh-ed25519 notbase64!", "--by", "alice", "--json")
    assert (bad.exit_code, bad.json()["error"]) == (2, "invalid_key")
    assert bad.stderr.count("\n") == 1 and snapshot_store(store) == before
    changed = cli("runs", "set", "r", "--approver-key", f"alice={pub(keys['alice-rsa'])}", "--by", "alice",
                  "--sign", str(keys["alice-ed25519"]))  # (a change to a policy that pins keys is signed)
    assert changed.exit_code == 0, changed.stderr
    assert Ledger.open(store, "r").state().policy.approver_keys == {"alice": (pub(keys["alice-rsa"]),)}
    refused = cli("runs", "set", "r", "--approver-key", "", "--by", "mallory", "--json")
    assert (refused.exit_code, refused.json()["error"]) == (3, "not_an_approver")
    unpinned = cli("runs", "set", "r", "--approver-key", "", "--by", "alice",
                   "--sign", str(keys["alice-rsa"]))
    assert unpinned.exit_code == 0, unpinned.stderr
    assert Ledger.open(store, "r").state().policy.approver_keys == {}
    assert "approver_keys" not in Ledger.open(store, "r").state().policy.to_json()


def test_a_bad_key_creates_nothing(cli: Any, store: Any) -> None:
    before = snapshot_store(store)
    for value in ["alice", "alice=", "alice=ssh-dss AAAAB3NzaC1kc3M=", "=ssh-ed25519 AAAA",
                  "alice=ssh-ed25519 AAAA"]:
        refused = cli("runs", "init", "r", "--cap", "1", "--approver-key", value, "--json")
        assert refused.exit_code == 2, value
        assert refused.stderr.count("\n") == 1
    assert snapshot_store(store) == before


def test_a_pool_cap_escalation_needs_the_pools_pinned_key(cli: Any, keys: dict[str, Path],
                                                          store: Any) -> None:
    assert cli("pools", "init", "team", "--cap", "3", "--max-extension", "5", "--escalation", "enforce",
               "--approver-key", f"{approver(store)}={pub(keys['alice-ecdsa'])}").exit_code == 0
    assert cli("runs", "init", "r", "--cap", "10", "--pool", "team", "--escalation", "enforce").exit_code == 0
    asked = cli("reserve", "r", "t1", "--estimate", "4", "--by", "bob", "--json")
    assert asked.exit_code == 4 and "pool's remaining budget" in asked.stdout, asked.stdout
    escalation_id = asked.json()["escalation_id"]

    def logs() -> dict[str, bytes]:  # (a pool's derived index may be refreshed by a read)
        return {name: data for name, data in snapshot_store(store).items() if "sqlite" not in name}

    before = logs()
    for args, code in [([], "unsigned"), (["--sign", str(keys["alice-ed25519"])], "bad_signature")]:
        refused = cli("approve", "r", escalation_id, "--by", "alice", *args, "--json")
        assert (refused.exit_code, refused.json()["error"]) == (3, code)
    assert logs() == before
    approved = cli("approve", "r", escalation_id, "--by", "alice", "--sign", str(keys["alice-ecdsa"]),
                   "--json")
    assert approved.exit_code == 0, approved.stderr
    resolved = [e for e in events(log_bytes(store, "r")) if e["type"] == "escalation_resolved"]
    assert resolved[0]["key"] == sshsig.parse_key(pub(keys["alice-ecdsa"])).fingerprint
    assert Ledger.open(store, "r").verify().problems == []
    assert cli("pools", "verify", "team").exit_code == 0


def test_pools_verify_finds_a_forged_pool_cap_signature_in_a_member_log(
        cli: Any, keys: dict[str, Path], runs_dir: Path) -> None:
    # The pool pins the keys; the resolution is in the member run's log, whose own fold
    # cannot see them: pools verify checks it against the pool's log.
    assert cli("pools", "init", "team", "--cap", "3", "--max-extension", "5", "--escalation", "enforce",
               "--approver-key", f"alice={pub(keys['alice-ecdsa'])}").exit_code == 0
    assert cli("runs", "init", "r", "--cap", "10", "--pool", "team", "--escalation", "enforce").exit_code == 0
    asked = cli("reserve", "r", "t1", "--estimate", "4", "--by", "bob", "--json")
    approved = cli("approve", "r", asked.json()["escalation_id"], "--by", "alice",
                   "--sign", str(keys["alice-ecdsa"]))
    assert approved.exit_code == 0, approved.stderr
    log = runs_dir / "r" / "events.ndjson"
    signed = log.read_bytes()
    assert cli("pools", "verify", "team").exit_code == 0
    for name, forged in _forgeries(signed, keys).items():
        if name == "a wrong key field":
            continue  # the fingerprint is a label; the signature is what is checked
        log.write_bytes(forged)
        for checkpoint in runs_dir.glob("r/*.sqlite*"):
            checkpoint.unlink()
        verified = cli("pools", "verify", "team", "--json")
        assert verified.exit_code == 6, (name, verified.stdout)
        assert "pool_cap escalation" in verified.stdout, name


def test_signing_through_ssh_agent_with_the_public_half(
        cli: Any, keys: dict[str, Path], runs_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("ssh-agent") is None or shutil.which("ssh-add") is None:
        pytest.skip("needs ssh-agent")
    escalation_id = escalated(cli, keys)
    socket = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket)], stdout=subprocess.DEVNULL)
    try:
        while not socket.exists():
            assert agent.poll() is None
        monkeypatch.setenv("SSH_AUTH_SOCK", str(socket))
        subprocess.run(["ssh-add", "-q", str(keys["alice-ed25519"])], check=True, capture_output=True)
        only_public = tmp_path / "alice.pub"  # no private key beside it: only the agent can sign
        only_public.write_text(pub(keys["alice-ed25519"]) + "\n")
        approved = cli("approve", "r", escalation_id, "--by", "alice", "--sign", str(only_public))
        assert approved.exit_code == 0, approved.stderr
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait()
    assert cli("runs", "verify", "r").exit_code == 0


def test_without_the_signing_extra_a_pinned_log_fails_closed(cli: Any, keys: dict[str, Path],
                                                            runs_dir: Path) -> None:
    escalation_id = escalated(cli, keys)
    signed = cli("approve", "r", escalation_id, "--by", "alice", "--sign", str(keys["alice-ed25519"]))
    assert signed.exit_code == 0, signed.stderr
    before = (runs_dir / "r" / "events.ndjson").read_bytes()
    for checkpoint in runs_dir.glob("r/*.sqlite*"):
        checkpoint.unlink()
    # cryptography made unimportable, as on a machine without the extra.
    code = ("import sys; sys.modules['cryptography'] = None; from escalate.cli import main; "
            "sys.argv = ['escalate', *sys.argv[1:]]; main()")
    for args in (["runs", "verify", "r"], ["gate", "r"], ["reserve", "r", "t2", "--estimate", "0.5"]):
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                              env={**os.environ, "ESCALATE_RUNS_DIR": str(runs_dir)}, check=False)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert "pip install 'escalate-ledger[signing]'" in done.stderr and done.stderr.count("\n") == 1
    assert (runs_dir / "r" / "events.ndjson").read_bytes() == before


def quorum_of_two(person: Person, keys: dict[str, Path]) -> tuple[str, dict[str, Path]]:
    """Run r pinning alice's ed25519 key and bob's (alice's ecdsa file) under quorum 2, with
    worker's reservation waiting on two approvers; its escalation id, and each approver's key."""
    names = {who: person(who)[1] for who in ("alice", "bob")}
    signers = {"alice": keys["alice-ed25519"], "bob": keys["alice-ecdsa"]}
    where, _ = person("worker")
    pinned = [f"{names[who]}={pub(key)}" for who, key in signers.items()]
    run = Ledger.init(where, "r", cap="10", escalation="enforce", max_extension="5", quorum=2,
                      actor="worker", approver_keys=pinned)
    run.reserve("held", "7")
    with pytest.raises(Pending) as pending:
        run.reserve("t", "4")
    return pending.value.escalation_id, signers


def test_a_forged_partial_approval_in_a_rechained_log_fails_verify_gate_and_import(
        cli: Any, keys: dict[str, Path], runs_dir: Path, tmp_path: Path, pg_url: str) -> None:
    # (On the file store under claimed names, each approver is who --by names.)
    escalation_id, signers = quorum_of_two(lambda who: (runs_dir, who), keys)
    for who in ("alice", "bob"):
        Ledger.open(runs_dir, "r", actor=who).approve(escalation_id, sign=signers[who])
    signed = (runs_dir / "r" / "events.ndjson").read_bytes()
    assert cli("runs", "verify", "r").exit_code == 0
    lines = events(signed)
    at = next(i for i, e in enumerate(lines) if e["type"] == "escalation_approved")
    resolved = next(e for e in lines if e["type"] == "escalation_resolved")
    position = next(i for i, e in enumerate(lines) if e["type"] == "escalation")
    mallory = signing.sign(sshsig.canonical_content("r", escalation_id, "extend",
                                                    lines[position]["requested_micros"],
                                                    lines[position + 1]["prev"], lines[at]["by"],
                                                    sshsig.line_grant("extend", lines[at])),
                             keys["mallory"])

    def edited(**changes: Any) -> bytes:
        copy = [dict(e) for e in lines]
        copy[at].update({k: v for k, v in changes.items() if v is not None})
        for key in [k for k, v in changes.items() if v is None]:
            del copy[at][key]
        return rechained(copy)

    forgeries = {
        "no signature": edited(signature=None, key=None),
        "bob's signature on alice's approval": edited(signature=resolved["signature"], key=resolved["key"]),
        "mallory's signature": edited(signature=mallory,
                                      key=sshsig.parse_key(pub(keys["mallory"])).fingerprint),
        "a wrong key field": edited(key=resolved["key"]),
    }
    for name, forged in forgeries.items():
        (runs_dir / "r" / "events.ndjson").write_bytes(forged)
        for checkpoint in runs_dir.glob("r/*.sqlite*"):
            checkpoint.unlink()
        verified = cli("runs", "verify", "r", "--json")
        assert verified.exit_code == 6, (name, verified.stdout)
        assert "sign" in verified.stdout, (name, verified.stdout)
        assert cli("gate", "r").exit_code == 6, name
        for target in (tmp_path / f"copy-{len(name)}", pg_url):
            with pytest.raises(CorruptLedger, match="nothing was imported") as refused:
                import_log(target, "moved", forged)
            assert (refused.value.code, refused.value.exit_code) == ("forged_signature", 6), name
        assert not (tmp_path / f"copy-{len(name)}" / "moved").exists(), name
    for target in (tmp_path / "good", pg_url):
        import_log(target, "moved", signed)
        assert Ledger.open(target, "moved").verify().problems == []
