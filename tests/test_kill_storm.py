"""A kill storm: writers and an approver share task ids on one enforce-mode run while a
killer SIGKILLs them at random moments, and between kills leaves torn lines, torn
multi-line writes and a damaged checkpoint behind.

Afterwards, folded by the independent audit in ``tests/conftest.py`` (not escalate's
code): the log verifies, committed money never passed the cap plus granted extensions at
any prefix, and every event a process was told was written is there.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
from pathlib import Path

import orjson

# No pytest import up here: this file is also each writer's program.
from escalate import Ledger
from escalate.errors import Conflict, EscalateError, Pending, Refused
from escalate.stores.file.log import LOG_NAME, FileLog

if __name__ != "__main__":  # under pytest, not as a writer
    import pytest

    # Seconds of killing writers: `pytest -m "not slow"` leaves it out of a quick run.
    pytestmark = pytest.mark.slow

WORKERS = 5
# The storm ends once it has done what the test needs; this only bounds a machine far too slow.
LIMIT_S = 120.0
SEED = 20261201
SHARED_TASKS = 300
CHECKPOINT_NAME = LOG_NAME + ".cache.sqlite"


def _ack_file(path: str) -> int:
    """The process's fsynced record of what it was told; then tell the killer it is ready."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    return fd


def _ack(fd: int, kind: str, key: str) -> None:
    os.write(fd, f"{kind} {key}\n".encode())
    os.fsync(fd)


def _worker(root: str, acks: str, seed: int) -> None:
    """Reserve shared task ids and release some of them; record every acknowledged event."""
    run = Ledger.open(root, "r", actor=f"w{seed}", lock_timeout=60)
    rng = random.Random(seed)
    fd = _ack_file(acks)
    while True:
        task = f"t{rng.randrange(SHARED_TASKS)}"
        amount = f"0.{rng.randint(1, 40):02d}"
        try:
            result = run.reserve(task, amount)
        except Refused:
            _ack(fd, "halt", task)
            continue
        except Pending as pending:
            if pending.code == "escalation_open":
                _ack(fd, "escalation", task)
            continue
        except Conflict:
            continue  # another process holds this id with another amount, or settled it
        _ack(fd, "budget_reserved", task)
        if result["status"] == "reserved" and rng.random() < 0.7:
            try:
                run.release(task, f"0.{rng.randint(0, int(amount[2:])):02d}")
            except Conflict:
                continue  # another holder of the same id released it first
            _ack(fd, "released", task)


def _approver(root: str, acks: str, seed: int) -> None:
    """Approve open escalations as they appear (pause those the max extension cannot take)."""
    run = Ledger.open(root, "r", actor="approver", lock_timeout=60)
    fd = _ack_file(acks)
    while True:
        for escalation_id in list(run.state().open_escalations):
            try:
                try:
                    run.approve(escalation_id, by="approver")
                except Refused:  # over what the max extension has left
                    run.pause(escalation_id, by="approver")
            except Conflict:
                continue  # resolved meanwhile (our own earlier try, killed before its ack)
            _ack(fd, "escalation_resolved", escalation_id)


def _spawn(role: str, root: Path, acks: Path, seed: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, role, str(root), str(acks), str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)




def _last_event(path: Path) -> tuple[dict[str, object], bytes]:
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n")]
    line = complete.rsplit(b"\n", 1)[-1]
    return orjson.loads(line), line


def _tear(root: Path, rng: random.Random) -> None:
    """Leave what a writer killed mid-write leaves: a cut line, or a cut multi-line write
    (a whole, correctly chained first line announcing one more, and part of the second)."""
    import hashlib

    log_path = root / "r" / LOG_NAME
    with FileLog(root / "r", lock_timeout=60).locked():
        data = log_path.read_bytes()
        if not data.endswith(b"\n"):
            return  # a torn tail is already there; a writer would have recovered it first
        last, line = _last_event(log_path)
        seq = int(str(last["seq"]))
        # Halts over the task cap: lines a writer could really have written at this point.
        remaining = Ledger.open(root, "r").state().remaining_micros
        envelope = {"v": 1, "ts": last["ts"], "type": "halt", "actor": "torn"}
        payload = {"requested_micros": 500_000, "remaining_micros": remaining, "reason": "task_cap"}
        first = orjson.dumps({**envelope, "seq": seq + 1, "prev": hashlib.sha256(line).hexdigest()[:16],
                              "more": 1, "task": f"torn{seq}", **payload})
        second = orjson.dumps({**envelope, "seq": seq + 2, "prev": hashlib.sha256(first).hexdigest()[:16],
                               "task": f"torn{seq}b", **payload})
        torn = (first + b"\n" + second[:rng.randint(0, len(second))] if rng.random() < 0.5
                else second[:rng.randint(1, len(second))])
        with log_path.open("ab") as handle:
            handle.write(torn)
            handle.flush()
            os.fsync(handle.fileno())


def _damage_checkpoint(root: Path, rng: random.Random) -> None:
    """Delete, truncate or scribble over the disposable checkpoint (under the run's lock)."""
    checkpoint = root / "r" / CHECKPOINT_NAME
    with FileLog(root / "r", lock_timeout=60).locked():
        if not checkpoint.exists():
            return
        how = rng.choice(["delete", "truncate", "scribble"])
        size = checkpoint.stat().st_size
        if how == "delete" or size == 0:
            checkpoint.unlink()
            return
        with checkpoint.open("r+b") as handle:
            if how == "truncate":
                handle.truncate(rng.randrange(size))
            else:
                handle.seek(rng.randrange(size))
                handle.write(os.urandom(rng.randint(1, 4096)))


def test_kill_storm_loses_nothing_and_never_overspends(tmp_path: Path) -> None:
    from tests.conftest import audit_log
    from tests.killing import kill_storm

    root = tmp_path / "runs"
    Ledger.init(root, "r", cap="30", task_cap="0.40", escalation="enforce", approval_threshold="0.30",
                max_extension="5", escalation_timeout_s=3600, actor="tester")
    rng = random.Random(SEED)
    roles = ["worker"] * WORKERS + ["approver"]
    acks = [tmp_path / f"acks-{slot}" for slot in range(len(roles))]
    tears = damages = 0

    def damage() -> None:
        nonlocal tears, damages
        if rng.random() < 0.3:
            _tear(root, rng)
            tears += 1
        if rng.random() < 0.2:
            _damage_checkpoint(root, rng)
            damages += 1

    def acknowledged() -> set[tuple[str, ...]]:
        return {tuple(line.split(" ")) for path in acks if path.exists()
                for line in path.read_text().splitlines()}

    def enough(kills: int) -> bool:  # the storm goes on until it has done all it must, no longer
        done = acknowledged()
        return (kills >= 30 and tears >= 5 and damages >= 3 and len(done) > 100
                and any(kind == "escalation_resolved" for kind, *_ in done))

    kills = kill_storm(lambda slot: _spawn(roles[slot], root, acks[slot], rng.randrange(2**32)),
                       len(roles), LIMIT_S, rng, damage, enough=enough)
    print(f"{kills} processes killed, {tears} torn writes, {damages} checkpoint damages")
    assert kills >= 30 and tears >= 5 and damages >= 3

    run = Ledger.open(root, "r", actor="tester")
    # The next write sets aside whatever the last kill or tear left (an answer that needs no
    # write, such as a sweep with nothing expired, leaves it in place).
    with contextlib.suppress(EscalateError):  # halted or escalated: recorded all the same
        run.reserve("after-the-storm", "0.01")
    report = run.verify()
    assert report.problems == [] and report.torn_bytes == 0

    audit = audit_log(root / "r" / LOG_NAME)  # seq 1..N, the chain, the cap at every prefix
    assert not any(str(event.get("task", "")).startswith("torn") for event in audit.events), \
        "a line of an unfinished write was counted"
    keys = {(event["type"], event["id"] if event["type"] == "escalation_resolved" else event.get("task"))
            for event in audit.events}
    acked = acknowledged()
    print(f"{len(acked)} acknowledged events, {len(audit.events)} lines, "
          f"{audit.types['escalation_resolved']} resolutions, {audit.types['recovery']} recoveries")
    assert len(acked) > 100 and audit.types["escalation_resolved"] > 0
    assert acked <= keys, sorted(acked - keys)[:5]
    for event in audit.of_type("recovery"):
        assert (root / "r" / event["saved_to"]).stat().st_size == event["torn_bytes"]
    # The state escalate reports agrees with the independent fold.
    state = run.state()
    assert (state.spent_micros, state.reserved_micros) == (audit.spent_micros, audit.reserved_micros)


if __name__ == "__main__":
    {"worker": _worker, "approver": _approver}[sys.argv[1]](sys.argv[2], sys.argv[3], int(sys.argv[4]))
