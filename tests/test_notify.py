"""The notify hook: it gets the escalation event on stdin after the lock is released, and its
failure or hang is one warning line that changes neither the ledger nor the exit code."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from escalate import Ledger, Pending
from tests.conftest import FakeClock


def log_lines(runs_dir: Path, run: str = "r") -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (runs_dir / run / "events.ndjson").read_bytes().splitlines()]


def payloads(runs_dir: Path, run: str = "r") -> list[dict[str, Any]]:
    """The events without the envelope fields that differ between two runs of the same steps."""
    return [{k: v for k, v in e.items() if k not in ("ts", "prev", "run", "actor", "expires_at")}
            for e in log_lines(runs_dir, run)]


def init(cli: Any, run: str = "r") -> None:
    assert cli("runs", "init", run, "--cap", "10", "--escalation", "enforce",
               "--approval-threshold", "2").exit_code == 0


def test_hook_receives_the_escalation_event(cli: Any, runs_dir: Path, tmp_path: Path) -> None:
    received = tmp_path / "received.json"
    hook = f"cat > {shlex.quote(str(received))}"
    init(cli)
    reserved = cli("reserve", "r", "small", "--estimate", "1", "--notify-cmd", hook)
    assert reserved.exit_code == 0
    assert not received.exists()  # nothing escalated, nothing sent

    escalated = cli("reserve", "r", "big", "--estimate", "3", "--notify-cmd", hook, "--json")
    assert escalated.exit_code == 4
    assert escalated.stderr.count("\n") == 1 and "warning" not in escalated.stderr
    event = orjson.loads(received.read_bytes())
    written = next(line for line in log_lines(runs_dir) if line["type"] == "escalation")
    assert event["run"] == "r"
    for key in ("seq", "type", "id", "task", "requested_micros", "remaining_micros", "offered",
                "expires_at", "shadow", "reason"):
        assert event[key] == written[key], key
    assert (event["type"], event["id"], event["task"]) == \
        ("escalation", escalated.json()["escalation_id"], "big")

    # The de-dup repeat opens nothing new and sends nothing.
    received.unlink()
    assert cli("reserve", "r", "big", "--estimate", "3", "--notify-cmd", hook).exit_code == 4
    assert not received.exists()


def test_hook_from_the_environment_and_for_increases(cli: Any, runs_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    received = tmp_path / "received.json"
    monkeypatch.setenv("ESCALATE_NOTIFY_CMD", f"cat > {shlex.quote(str(received))}")
    init(cli)
    assert cli("reserve", "r", "t", "--estimate", "1").exit_code == 0
    assert cli("increase", "r", "t", "--to", "2.5").exit_code == 4
    event = orjson.loads(received.read_bytes())
    assert (event["kind"], event["from_micros"], event["requested_micros"]) == \
        ("increase", 1_000_000, 2_500_000)


def test_shadow_escalations_notify_nobody(cli: Any, runs_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "called"
    assert cli("runs", "init", "r", "--cap", "10", "--escalation", "shadow",
               "--approval-threshold", "2").exit_code == 0
    result = cli("reserve", "r", "t", "--estimate", "3", "--notify-cmd", f"touch {shlex.quote(str(marker))}")
    assert result.exit_code == 0
    assert not marker.exists()


def test_hook_runs_after_the_lock_is_released(cli: Any, runs_dir: Path) -> None:
    # The hook itself writes to the same run with a lock timeout of zero: it could not if the
    # escalating command still held the lock.
    hook = (f"{shlex.quote(sys.executable)} -m escalate approve r esc-2 --by hook --lock-timeout 0 "
            f"--runs-dir {shlex.quote(str(runs_dir))}")
    init(cli)
    result = cli("reserve", "r", "t", "--estimate", "3", "--notify-cmd", hook)
    assert result.exit_code == 4, result.stderr
    assert "warning" not in result.stderr
    [resolved] = [line for line in log_lines(runs_dir) if line["type"] == "escalation_resolved"]
    assert resolved["by"] == "hook"


@pytest.mark.parametrize(
    ("hook", "warning"),
    [
        ("cat > /dev/null; echo 'webhook said 502' >&2; exit 7",
         "notify command exited 7 (webhook said 502)"),
        ("/nonexistent/notify-hook", "notify command exited 127"),
        # 64 MiB on stderr: read from a file's end, never held in memory or blocking a pipe.
        ("head -c 67108864 /dev/zero | tr '\\0' x >&2; echo >&2; echo 'the last words' >&2; exit 3",
         "notify command exited 3 (the last words)"),
        # Terminal escapes from a hook are shown escaped, never sent to the terminal.
        ("printf '\\033]0;pwned\\007\\033[2Jbad\\n' >&2; exit 7", "notify command exited 7 (\\x1b]0;pwned"),
    ],
    ids=["non-zero exit", "missing command", "a flood on stderr", "escapes on stderr"],
)
def test_failing_hook_only_warns(cli: Any, runs_dir: Path, hook: str, warning: str) -> None:
    init(cli, "quiet")
    assert cli("reserve", "quiet", "t", "--estimate", "3").exit_code == 4
    init(cli)
    result = cli("reserve", "r", "t", "--estimate", "3", "--notify-cmd", hook, "--json")
    assert result.exit_code == 4
    assert result.json()["escalation_id"] == "esc-2"
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert warning in warnings[0] and "the decision stands" in warnings[0]
    # The same decision as without a hook, then the failed attempt on record.
    *decided, notified = payloads(runs_dir)
    assert decided == payloads(runs_dir, "quiet")
    assert (notified["type"], notified["id"], notified["attempt"], notified["ok"]) == \
        ("escalation_notified", "esc-2", 1, False)


def test_hanging_hook_is_bounded_and_killed(cli: Any, runs_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESCALATE_NOTIFY_TIMEOUT", "300ms")
    pid_file = tmp_path / "sleeper.pid"
    # 'sleep' is a grandchild holding the hook's stderr open: killing only the shell would
    # leave the command waiting for it.
    hook = f"cat > /dev/null; sleep 30 & echo $! > {shlex.quote(str(pid_file))}; wait"
    init(cli)
    started = time.monotonic()
    result = cli("reserve", "r", "t", "--estimate", "3", "--notify-cmd", hook)
    elapsed = time.monotonic() - started
    assert result.exit_code == 4
    assert elapsed < 5, elapsed
    assert "notify command timed out after 0.3s and was killed; the decision stands" in result.stderr
    assert [e["type"] for e in log_lines(runs_dir)] == ["run_opened", "escalation", "escalation_notified"]
    notified = log_lines(runs_dir)[-1]
    assert (notified["ok"], notified["detail"]) == (False, "timed out after 0.3s")
    assert _gone_or_zombie(int(pid_file.read_text()))


def _gone_or_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_library_hook_and_timeout_options(runs_dir: Path, clock: FakeClock, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    received = tmp_path / "received.json"
    run = Ledger.init(runs_dir, "r", cap="10", escalation="enforce", approval_threshold="2", clock=clock,
                      notify_cmd=f"cat > {shlex.quote(str(received))}", notify_timeout=5)
    with pytest.raises(Pending) as escalated:
        run.reserve("t", "3")
    assert orjson.loads(received.read_bytes())["id"] == escalated.value.escalation_id
    slow = Ledger.open(runs_dir, "r", clock=clock, notify_cmd="sleep 20", notify_timeout=0.2)
    with pytest.raises(Pending):
        slow.reserve("u", "3")
    assert "timed out after 0.2s" in capsys.readouterr().err


@pytest.mark.parametrize("timeout", ["soon", "0", "50ms"])
def test_bad_notify_timeout_is_refused_before_writing(cli: Any, runs_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch, timeout: str) -> None:
    init(cli)
    before = (runs_dir / "r" / "events.ndjson").read_bytes()
    monkeypatch.setenv("ESCALATE_NOTIFY_TIMEOUT", timeout)  # (0 would kill every hook as it starts)
    result = cli("reserve", "r", "t", "--estimate", "3", "--notify-cmd", "true")
    assert result.exit_code == 2
    assert "ESCALATE_NOTIFY_TIMEOUT" in result.stderr
    assert (runs_dir / "r" / "events.ndjson").read_bytes() == before
