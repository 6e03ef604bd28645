"""Killed writers: real processes hammer one run while a killer SIGKILLs them at random
moments, and torn lines are left in the log between kills (as a crash mid-write does).

Afterwards the log verifies (after the next writer's recovery), the run was never over
its cap at any prefix of the log, and every event a writer was told was written is there.
Each writer appends what it was told to its own fsynced side-channel file.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

import orjson

# No pytest import up here: this file is also each writer's program, and a writer that
# starts faster is killed more often in the same time.
from escalate import Ledger, Micros, Refused
from escalate.stores.file.log import LOG_NAME, FileLog

if __name__ != "__main__":  # under pytest, not as a writer
    import pytest

    # Seconds of killing writers: `pytest -m "not slow"` leaves it out of a quick run.
    pytestmark = pytest.mark.slow

WRITERS = 5
# The storm ends once it has done what the test needs; this only bounds a machine far too slow.
LIMIT_S = 120.0
SEED = 20261123
CAP_MICROS = 40_000_000


def _writer(root: str, acks: str, seed: int) -> None:
    """Reserve and release forever; record each acknowledged event before the next call."""
    from escalate.errors import Refused

    run = Ledger.open(root, "r", actor=f"w{seed}", lock_timeout=60)
    rng = random.Random(seed)
    fd = os.open(acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.write("ready\n")  # the killer's barrier: this writer is loaded and about to write
    sys.stdout.flush()

    def ack(text: str) -> None:
        os.write(fd, text.encode() + b"\n")
        os.fsync(fd)

    for n in range(10**9):
        task = f"p{os.getpid()}-{n}"
        amount = rng.randint(1, 400_000)
        try:
            run.reserve(task, Micros(amount))
        except Refused:
            ack(f"halt {task}")
            continue
        ack(f"budget_reserved {task}")
        if rng.random() < 0.7:
            run.release(task, Micros(rng.randint(0, amount)))  # never over the reservation
            ack(f"released {task}")


def _spawn(root: Path, acks: Path, seed: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, str(root), str(acks), str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _pipe(stream: IO[bytes] | None) -> IO[bytes]:
    assert stream is not None
    return stream


def _tear(root: Path, rng: random.Random) -> int:
    """Leave a torn line, as a writer that died mid-write would (under the lock)."""
    log = FileLog(root / "r", lock_timeout=60)
    with log.locked():
        last = orjson.loads((root / "r" / LOG_NAME).read_bytes().rsplit(b"\n", 2)[-2]) \
            if log.size() else {"seq": 0}
        line = orjson.dumps({"v": 1, "seq": last["seq"] + 1, "ts": "2026-11-23T14:00:00.000000Z",
                             "type": "budget_reserved", "prev": "0" * 16, "actor": "torn",
                             "task": "torn", "amount_micros": 1})
        torn = line[:rng.randint(1, len(line))]
        with (root / "r" / LOG_NAME).open("ab") as handle:
            handle.write(torn)
            handle.flush()
            os.fsync(handle.fileno())
    return len(torn)


def test_killed_writers_lose_nothing_and_never_overspend(tmp_path: Path) -> None:
    from tests.killing import kill_storm

    root = tmp_path / "runs"
    Ledger.init(root, "r", cap=Micros(CAP_MICROS), task_cap=Micros(400_000), actor="tester")
    rng = random.Random(SEED)
    acks = [tmp_path / f"acks-{slot}" for slot in range(WRITERS)]
    tears = 0

    def tear() -> None:
        nonlocal tears
        if rng.random() < 0.3:
            _tear(root, rng)
            tears += 1

    def acknowledged() -> set[tuple[str, ...]]:
        return {tuple(line.split(" ")) for path in acks if path.exists()
                for line in path.read_text().splitlines()}

    kills = kill_storm(lambda slot: _spawn(root, acks[slot], rng.randrange(2**32)), WRITERS, LIMIT_S,
                       rng, tear, enough=lambda kills: kills >= 30 and len(acknowledged()) > 100)
    print(f"{kills} writers killed, {tears} torn lines left")
    assert kills >= 30

    # The next writer recovers whatever tail the last kill or tear left.
    run = Ledger.open(root, "r", actor="tester")
    with contextlib.suppress(Refused):  # a write sets aside what the last kill or tear left
        run.reserve("after-the-kills", Micros(1))  # (a halt is a write too)
    report = run.verify()
    assert report.problems == [] and report.torn_bytes == 0

    events = [orjson.loads(line) for line in (root / "r" / LOG_NAME).read_bytes().splitlines()]
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))

    # A fold written here from docs/concepts.md ("Totals and caps"): committed = spent +
    # in-flight, never above the cap.
    holding: dict[str, int] = {}
    spent = 0
    for event in events:
        if event["type"] == "budget_reserved":
            holding[event["task"]] = event["amount_micros"]
        elif event["type"] == "released":
            spent += event["actual_micros"]
            del holding[event["task"]]
        assert spent + sum(holding.values()) <= CAP_MICROS, event["seq"]

    # Every event a writer was told was written is in the log.
    written = {(event["type"], event.get("task")) for event in events}
    acked = acknowledged()
    assert len(acked) > 100
    assert acked <= written, sorted(acked - written)[:5]

    # Every torn tail was set aside byte for byte and recorded.
    recoveries = [event for event in events if event["type"] == "recovery"]
    print(f"{len(acked)} acknowledged events, {len(events)} lines, {len(recoveries)} recoveries")
    assert recoveries or not tears
    for event in recoveries:
        assert (root / "r" / event["saved_to"]).stat().st_size == event["torn_bytes"]
    # The lock file was never removed: everyone locked the same inode.
    assert (root / "r" / f"{LOG_NAME}.lock").exists()


HOLDER = """
import sys
from escalate.stores.file.log import FileLog
with FileLog(__import__("pathlib").Path(sys.argv[1]), lock_timeout=5).locked():
    print("holding", flush=True)
    sys.stdin.read()
"""


def test_a_killed_lock_holder_never_blocks_and_a_live_one_times_out(tmp_path: Path) -> None:
    from escalate.errors import LockTimeout

    root = tmp_path / "runs"
    run = Ledger.init(root, "r", cap="5", actor="tester")
    lock_file = root / "r" / f"{LOG_NAME}.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root / "r")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert _pipe(holder.stdout).readline() == b"holding\n"  # barrier: the lock is held
        waiting = Ledger.open(root, "r", actor="tester", lock_timeout=0.2)
        try:
            waiting.reserve("t", "1")
            raise AssertionError("the lock was not exclusive")
        except LockTimeout as timeout:
            assert timeout.exit_code == 7 and str(lock_file) in timeout.message
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's flock; the same lock file is used again.
    inode = lock_file.stat().st_ino
    assert Ledger.open(root, "r", actor="tester", lock_timeout=5).reserve("t", "1")["status"] == "reserved"
    assert lock_file.stat().st_ino == inode
    assert run.verify().problems == []


if __name__ == "__main__":
    _writer(sys.argv[1], sys.argv[2], int(sys.argv[3]))
