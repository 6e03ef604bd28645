"""What the approver sees: the requester's reason and priority, who asked and the extension
an approval needs, in the escalation event, the inbox (most urgent first) and the hook's
payload. Real processes: ``python -m escalate``, as a script would call it."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from escalate import Ledger
from escalate.errors import InputError


def escalate(runs_dir: Path, *args: str, actor: str = "tester",
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """One real ``python -m escalate`` process."""
    environment = {key: value for key, value in os.environ.items() if key != "ESCALATE_NOTIFY_CMD"}
    environment.update({"ESCALATE_RUNS_DIR": str(runs_dir), "ESCALATE_ACTOR": actor,
                        "NO_COLOR": "1", "COLUMNS": "240", **(env or {})})
    return subprocess.run([sys.executable, "-m", "escalate", *args], capture_output=True, text=True,
                          env=environment, timeout=60, check=False)


def log(runs_dir: Path, run: str = "r") -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (runs_dir / run / "events.ndjson").read_bytes().splitlines()]


def init(runs_dir: Path, run: str = "r", *extra: str) -> None:
    assert escalate(runs_dir, "runs", "init", run, "--cap", "10", "--escalation", "enforce",
                    "--approval-threshold", "2", "--max-extension", "5", *extra).returncode == 0


def fill(runs_dir: Path, run: str = "r") -> None:
    """Reserve $8 of the $10 cap in steps the threshold lets pass: $2 remains."""
    for index in range(4):
        assert escalate(runs_dir, "reserve", run, f"fill-{index}", "--estimate", "2").returncode == 0


def test_the_escalation_carries_reason_priority_and_needed_extension(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    init(runs)
    fill(runs)
    asked = escalate(runs, "reserve", "r", "more", "--estimate", "3.000001", "--reason",
                     "nightly rerun of flaky shards", "--priority", "urgent", actor="ci-bot")
    assert asked.returncode == 4, asked.stderr
    [event] = [e for e in log(runs) if e["type"] == "escalation"]
    assert (event["request_reason"], event["priority"], event["needed_extension_micros"], event["actor"]) == \
        ("nightly rerun of flaky shards", "urgent", 1_000_001, "ci-bot")
    assert escalate(runs, "approve", "r", event["id"], "--by", "alice").returncode == 0
    assert escalate(runs, "increase", "r", "more", "--to", "4", "--reason", "one more shard",
                    "--priority", "high", actor="ci-bot").returncode == 4
    increase = [e for e in log(runs) if e["type"] == "escalation"][-1]
    assert (increase["kind"], increase["request_reason"], increase["priority"]) == \
        ("increase", "one more shard", "high")


def test_inbox_lists_the_most_urgent_first_with_what_the_approver_needs(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    init(runs, "a")
    init(runs, "b")
    fill(runs, "b")
    # Opened oldest first: low, urgent, normal (no flags), high; then one resolved urgent one.
    assert escalate(runs, "reserve", "a", "t-low", "--estimate", "3", "--priority", "low",
                    "--reason", "can wait", actor="bot-1").returncode == 4
    assert escalate(runs, "reserve", "b", "t-urgent", "--estimate", "5.000001", "--priority", "urgent",
                    "--reason", "prod is down", actor="oncall").returncode == 4
    assert escalate(runs, "reserve", "a", "t-normal", "--estimate", "2.5").returncode == 4
    assert escalate(runs, "reserve", "b", "t-high", "--estimate", "4", "--priority", "high",
                    actor="bot-2").returncode == 4
    assert escalate(runs, "reserve", "a", "t-done", "--estimate", "4", "--priority", "urgent").returncode == 4
    done = next(e["id"] for e in log(runs, "a") if e.get("task") == "t-done")
    assert escalate(runs, "pause", "a", done, "--by", "alice").returncode == 0

    inbox = escalate(runs, "escalations", "--json")
    assert inbox.returncode == 0, inbox.stderr
    rows = orjson.loads(inbox.stdout)["escalations"]
    assert [row["task"] for row in rows] == ["t-urgent", "t-high", "t-normal", "t-low", "t-done"]
    urgent = rows[0]
    assert (urgent["run"], urgent["priority"], urgent["request_reason"], urgent["requested_by"],
            urgent["requested_micros"], urgent["needed_extension_micros"]) == \
        ("b", "urgent", "prod is down", "oncall", 5_000_001, 3_000_001)
    assert rows[1]["needed_extension_micros"] == 2_000_000  # $4 with $2 left
    assert rows[2]["priority"] == "normal" and rows[2]["request_reason"] == ""
    assert all(row["opened_at"] and "expires_at" in row and "offered" in row for row in rows)

    table = escalate(runs, "escalations", "--wide").stdout
    lines = [line for line in table.splitlines() if "t-" in line]
    assert [next(word for word in line.split() if word.startswith("t-")) for line in lines] == \
        ["t-urgent", "t-high", "t-normal", "t-low", "t-done"]
    for heading in ("priority", "needed", "from", "reason", "age", "expires", "offered"):
        assert heading in table
    assert "$5.000001" in lines[0] and "prod is down" in lines[0] and "oncall" in lines[0]
    assert "urgent" in lines[0] and "extend/pause/cancel" in lines[0]
    assert "$3.000001" in lines[0] and "$2.00" in lines[1] and "bot-2" in lines[1]


def test_the_hook_payload_carries_the_context(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    received = tmp_path / "received.json"
    init(runs)
    asked = escalate(runs, "reserve", "r", "t", "--estimate", "3", "--reason", "needs a GPU hour",
                     "--priority", "high", "--notify-cmd", f"cat > {shlex.quote(str(received))}",
                     actor="agent-7")
    assert asked.returncode == 4, asked.stderr
    payload = orjson.loads(received.read_bytes())
    assert (payload["request_reason"], payload["priority"], payload["needed_extension_micros"],
            payload["requested_by"], payload["run"]) == ("needs a GPU hour", "high", 0, "agent-7", "r")


@pytest.mark.parametrize(("flag", "value", "code"), [
    ("--priority", "asap", "invalid_priority"), ("--reason", "tab\there", "invalid_reason"),
    ("--reason", "x" * 1001, "invalid_reason")])
def test_bad_context_is_refused_before_writing(tmp_path: Path, flag: str, value: str, code: str) -> None:
    runs = tmp_path / "runs"
    init(runs)
    before = (runs / "r" / "events.ndjson").read_bytes()
    refused = escalate(runs, "reserve", "r", "t", "--estimate", "3", flag, value, "--json")
    assert refused.returncode == 2 and orjson.loads(refused.stdout)["error"] == code
    assert refused.stderr.startswith("escalate: ") and len(refused.stderr.splitlines()) == 1
    assert (runs / "r" / "events.ndjson").read_bytes() == before
    with pytest.raises(InputError):
        Ledger.open(runs, "r").increase("t", "3", priority=value if flag == "--priority" else "normal",
                                        reason=value if flag == "--reason" else "")


def test_old_escalation_lines_replay_with_defaults(tmp_path: Path) -> None:
    """A log written before reason and priority existed: normal, no reason, and the needed
    extension from the snapshot it recorded."""
    runs = tmp_path / "runs"
    init(runs)
    fill(runs)
    assert escalate(runs, "reserve", "r", "t", "--estimate", "4").returncode == 4
    path = runs / "r" / "events.ndjson"
    events = log(runs)
    for event in events:
        for key in ("request_reason", "priority", "needed_extension_micros", "kind", "from_micros"):
            event.pop(key, None)
    from escalate.core.events import seal  # re-chain the edited lines as an old writer wrote them
    lines = []
    prev = ""
    for index, event in enumerate(events):
        envelope = {k: event.pop(k) for k in ("v", "seq", "ts", "prev", "actor")}
        [(_, line, prev)] = seal([event], seq=index, prev=prev, ts=envelope["ts"], actor=envelope["actor"])
        lines.append(line + b"\n")
    path.write_bytes(b"".join(lines))
    (runs / "r" / "cache.sqlite").unlink(missing_ok=True)
    [escalation] = Ledger.open(runs, "r").verified_state().escalations.values()
    assert (escalation.priority, escalation.request_reason, escalation.needed_extension_micros) == \
        ("normal", "", 2_000_000)

