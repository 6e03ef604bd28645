"""Every answer rests on synced bytes: ``wait`` too, even when the writer it reads from has
not finished its fsync (real processes; the approver's fsync blocks until the test lets go)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from escalate import EscalateError, Ledger
from escalate.stores.file.log import LOG_NAME

# The approver's fsync says so on stdout, then blocks until a line arrives on stdin.
_SLOW_FSYNC = """
import os, sys
real_fsync = os.fsync
def blocked_fsync(fd):
    print("blocked", flush=True)
    sys.stdin.readline()
    real_fsync(fd)
os.fsync = blocked_fsync
sys.argv = ["escalate", *sys.argv[1:]]
from escalate.cli import main
main()
"""

# The waiter's fsync prints how many bytes of which file it covers before it syncs them.
_TRACED_FSYNC = """
import os, sys
real_fsync = os.fsync
def traced_fsync(fd):
    print("fsync", os.fstat(fd).st_size, flush=True)
    real_fsync(fd)
os.fsync = traced_fsync
sys.argv = ["escalate", *sys.argv[1:]]
from escalate.cli import main
main()
"""


def _escalate(script: str, *args: str, stdin: int | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", script, *args], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "NO_COLOR": "1"})


def test_wait_answers_only_after_the_approval_is_synced(tmp_path: Path) -> None:
    # The real clock: the approver and the waiter are other processes.
    run = Ledger.init(tmp_path, "r", cap="10", escalation="enforce", max_extension="10")
    run.reserve("a", "6")
    with pytest.raises(EscalateError) as pending:
        run.reserve("t1", "7")
    escalation_id = str(pending.value.escalation_id)

    approver = _escalate(_SLOW_FSYNC, "approve", "r", escalation_id, "--by", "boss",
                         "--runs-dir", str(tmp_path), stdin=subprocess.PIPE)
    try:
        assert approver.stdout is not None and approver.stdin is not None
        ready, _, _ = select.select([approver.stdout], [], [], 60)
        assert ready and approver.stdout.readline() == b"blocked\n"
        # The approval is written (not yet synced by its writer, which has not answered).
        approved_size = (tmp_path / "r" / LOG_NAME).stat().st_size
        assert run.state().escalations[escalation_id].state == "resolved"

        waiter = _escalate(_TRACED_FSYNC, "wait", "r", escalation_id, "--timeout", "30", "--json",
                           "--runs-dir", str(tmp_path))
        out, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 0, err
        first, answer = out.decode().splitlines()
        assert first == f"fsync {approved_size}"  # synced every byte read, before answering
        assert orjson.loads(answer)["status"] == "approved"
        assert approver.poll() is None  # the approver is still inside its fsync
    finally:
        if approver.stdin is not None:
            approver.stdin.write(b"go\n")
            approver.stdin.close()
        approver.wait(60)
    assert approver.returncode == 0
