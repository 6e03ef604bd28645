"""The approver's commands from the shell: approve, pause, cancel, wait, the inbox, sweep and
``runs set``, with their exit codes, one-line errors and the ``--json`` keys scripts rely on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from rich.console import Console

from escalate import Ledger, Pending
from escalate.reports.render import escalation_table
from tests.conftest import FakeClock, Location, has_run, log_bytes, snapshot_store


def log_lines(store: Location, run: str = "r") -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in log_bytes(store, run).splitlines()]


def logs(store: Location) -> dict[str, bytes]:
    """Every run's log (in a runs folder: leaving out the checkpoints and locks beside them)."""
    return {k: v for k, v in snapshot_store(store).items()
            if not isinstance(store, Path) or k.endswith("/events.ndjson")}


def enforce(cli: Any, run: str = "r", *extra: str) -> None:
    result = cli("runs", "init", run, "--cap", "10", "--escalation", "enforce", "--approval-threshold", "2",
                 "--max-extension", "5", *extra)
    assert result.exit_code == 0, result.stderr


def escalate_task(cli: Any, task: str, amount: str = "3", run: str = "r") -> str:
    result = cli("reserve", run, task, "--estimate", amount, "--json")
    assert result.exit_code == 4, result.stderr
    return str(result.json()["escalation_id"])


def test_runs_init_records_every_policy_option(cli: Any, store: Location) -> None:
    result = cli("runs", "init", "r", "--cap", "10", "--task-cap", "6", "--escalation", "enforce",
                 "--approval-threshold", "2.5", "--escalation-timeout", "30m", "--max-extension", "4",
                 "--json")
    assert result.exit_code == 0
    policy = {"mode": "enforce", "approval_threshold_micros": 2_500_000, "timeout_s": 1800,
              "max_extension_micros": 4_000_000}
    assert result.json()["escalation"] == policy
    opened = log_lines(store)[0]
    assert (opened["type"], opened["task_cap_micros"], opened["escalation"]) == \
        ("run_opened", 6_000_000, policy)
    human = cli("runs", "init", "d", "--cap", "1")
    assert human.stdout.strip() == "run d: cap $1.00, task cap $1.00, escalation off"
    assert log_lines(store, "d")[0]["escalation"] == {
        "mode": "off", "approval_threshold_micros": None, "timeout_s": 3600, "max_extension_micros": 0}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--escalation", "sometimes"), "invalid escalation mode 'sometimes'"),
        (("--approval-threshold", "-1"), "approval threshold"),
        (("--escalation-timeout", "soon"), "invalid escalation timeout 'soon'"),
        (("--max-extension", "1e3"), "max extension"),
    ],
)
def test_runs_init_rejects_bad_policy(cli: Any, store: Location, args: tuple[str, ...], message: str) -> None:
    result = cli("runs", "init", "r", "--cap", "10", *args, "--json")
    assert result.exit_code == 2
    assert message in result.json()["message"]
    assert not has_run(store, "r")


def test_runs_set_is_recorded_and_idempotent(cli: Any, store: Location) -> None:
    assert cli("runs", "init", "r", "--cap", "10").exit_code == 0
    changed = cli("runs", "set", "r", "--escalation", "shadow", "--approval-threshold", "1",
                  "--escalation-timeout", "2h", "--max-extension", "3", "--by", "lead", "--json")
    assert changed.exit_code == 0
    policy = {"mode": "shadow", "approval_threshold_micros": 1_000_000, "timeout_s": 7200,
              "max_extension_micros": 3_000_000}
    assert changed.json() == {"run": "r", "status": "changed", "escalation": policy}
    event = log_lines(store)[-1]
    assert (event["type"], event["actor"], event["escalation"]) == ("policy_changed", "lead", policy)

    before = logs(store)
    again = cli("runs", "set", "r", "--escalation", "shadow")
    assert again.exit_code == 0 and "unchanged" in again.stdout
    assert logs(store) == before

    cleared = cli("runs", "set", "r", "--no-approval-threshold", "--json")
    assert cleared.json()["escalation"]["approval_threshold_micros"] is None
    assert cli("runs", "show", "r", "--json").json()["escalation"]["mode"] == "shadow"
    bad = cli("runs", "set", "r", "--escalation", "loud")
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1
    assert cli("runs", "set", "nope", "--escalation", "off").exit_code == 2


def test_runs_set_cannot_take_back_granted_extension(cli: Any, store: Location) -> None:
    enforce(cli)
    assert cli("reserve", "r", "f", "--estimate", "2").exit_code == 0
    assert cli("reserve", "r", "g", "--estimate", "2").exit_code == 0
    assert cli("reserve", "r", "h", "--estimate", "2").exit_code == 0
    assert cli("reserve", "r", "i", "--estimate", "2").exit_code == 0
    esc = escalate_task(cli, "t", "3")  # $2 left: needs $1
    assert cli("approve", "r", esc, "--by", "alice").exit_code == 0
    result = cli("runs", "set", "r", "--max-extension", "0.5", "--json")
    assert result.exit_code == 5
    assert result.json()["error"] == "conflict"


def test_reserve_that_escalates(cli: Any, store: Location) -> None:
    enforce(cli)
    result = cli("reserve", "r", "t", "--estimate", "3", "--json")
    assert result.exit_code == 4
    body = result.json()
    assert (body["error"], body["escalation_id"], body["offered"]) == \
        ("escalation_open", "esc-2", ["extend", "pause", "cancel"])
    human = cli("reserve", "r", "t", "--estimate", "3")
    assert human.exit_code == 4 and human.stdout == ""
    assert human.stderr.count("\n") == 1
    assert "escalation esc-2 offers extend/pause/cancel" in human.stderr
    assert "escalate wait r esc-2" in human.stderr


def test_extend_not_offered_says_why(cli: Any, store: Location) -> None:
    assert cli("runs", "init", "r", "--cap", "1", "--escalation", "enforce").exit_code == 0
    assert cli("reserve", "r", "f", "--estimate", "0.5").exit_code == 0
    result = cli("reserve", "r", "t", "--estimate", "1")
    assert result.exit_code == 4
    assert "offers pause/cancel" in result.stderr
    assert "extend not offered: needs $0.50 but only $0.00 of the max extension is left" in result.stderr


def test_increase_that_escalates_names_the_escalation(cli: Any, store: Location) -> None:
    enforce(cli)
    assert cli("reserve", "r", "t", "--estimate", "1").exit_code == 0
    result = cli("increase", "r", "t", "--to", "2.5", "--reason", "long diff", "--json")
    assert result.exit_code == 4
    assert result.json()["escalation_id"] == "esc-3"
    approved = cli("approve", "r", "esc-3", "--by", "alice", "--json")
    assert approved.json()["status"] == "approved"
    increased = log_lines(store)[-1]
    assert (increased["type"], increased["from_micros"], increased["to_micros"]) == \
        ("budget_increased", 1_000_000, 2_500_000)


def test_approve_pause_cancel_json_and_text(cli: Any, store: Location) -> None:
    enforce(cli)
    ids = [escalate_task(cli, task) for task in ("a", "b", "c")]
    approved = cli("approve", "r", ids[0], "--by", "alice", "--json")
    assert approved.exit_code == 0
    assert {k: approved.json()[k] for k in ("run", "status", "escalation_id", "task", "mode", "by",
                                             "reserved_micros", "extension_micros")} == {
        "run": "r", "status": "approved", "escalation_id": ids[0], "task": "a", "mode": "extend",
        "by": "alice", "reserved_micros": 3_000_000, "extension_micros": 0}
    paused = cli("pause", "r", ids[1], "--by", "bob")
    assert (paused.exit_code, paused.stdout.strip()) == (0, f"{ids[1]} paused by bob")
    cancelled = cli("cancel", "r", ids[2], "--by", "carol", "--json")
    assert (cancelled.exit_code, cancelled.json()["status"], cancelled.json()["escalation_id"]) == \
        (0, "cancelled", ids[2])
    assert log_lines(store)[-1]["reason"] == "cancelled"
    assert cli("reserve", "r", "c", "--estimate", "3").exit_code == 3

    # The second resolver loses, told who won, how and when; the winner may repeat itself.
    lost = cli("cancel", "r", ids[0], "--by", "mallory", "--json")
    assert lost.exit_code == 5
    body = lost.json()
    assert (body["error"], body["escalation_id"], body["mode"], body["by"]) == \
        ("conflict", ids[0], "extend", "alice")
    assert f"extend by alice at {body['resolved_at']}" in body["message"]
    before = logs(store)
    repeat = cli("approve", "r", ids[0], "--by", "alice")
    assert repeat.exit_code == 0 and "already resolved extend by alice; nothing changed" in repeat.stdout
    assert logs(store) == before

    unknown = cli("approve", "r", "esc-99", "--json")
    assert (unknown.exit_code, unknown.json()["error"]) == (2, "unknown_escalation")
    assert cli("approve", "r", "../etc").exit_code == 2
    assert cli("approve", "nope", "esc-1").exit_code == 2


def test_approve_over_the_remaining_ceiling(cli: Any, store: Location) -> None:
    init = cli("runs", "init", "r", "--cap", "4", "--escalation", "enforce", "--max-extension", "1")
    assert init.exit_code == 0
    assert cli("reserve", "r", "f", "--estimate", "1").exit_code == 0
    esc = escalate_task(cli, "t", "3.5")  # needs $0.50 of the $1 ceiling
    assert cli("reserve", "r", "other", "--estimate", "1").exit_code == 0  # now it needs $1.50
    before = logs(store)
    refused = cli("approve", "r", esc, "--by", "alice", "--json")
    assert (refused.exit_code, refused.json()["error"]) == (3, "extension_limit")
    assert "runs set" in refused.json()["message"]
    assert logs(store) == before
    assert cli("runs", "set", "r", "--max-extension", "1.5").exit_code == 0
    approved = cli("approve", "r", esc, "--by", "alice")
    assert approved.exit_code == 0
    assert approved.stdout.strip() == f"{esc} approved by alice: $3.50 reserved for t, cap extended by $1.50"


def test_wait_exit_codes(cli: Any, store: Location) -> None:
    enforce(cli)
    ids = [escalate_task(cli, task) for task in ("a", "b", "c", "d")]
    cli("approve", "r", ids[0], "--by", "alice")
    cli("cancel", "r", ids[1], "--by", "alice")
    cli("pause", "r", ids[2], "--by", "alice")
    approved = cli("wait", "r", ids[0], "--json")
    assert (approved.exit_code, approved.json()["status"], approved.json()["escalation_id"]) == \
        (0, "approved", ids[0])
    cancelled = cli("wait", "r", ids[1], "--json")
    assert (cancelled.exit_code, cancelled.json()["error"], cancelled.json()["escalation_id"]) == \
        (3, "cancelled", ids[1])
    paused = cli("wait", "r", ids[2])
    assert paused.exit_code == 4 and f"{ids[2]} was paused by alice" in paused.stderr
    still_open = cli("wait", "r", ids[3], "--timeout", "0", "--json")
    assert (still_open.exit_code, still_open.json()["error"], still_open.json()["escalation_id"]) == \
        (4, "escalation_open", ids[3])
    assert cli("wait", "r", "esc-99").exit_code == 2
    assert cli("wait", "r", ids[3], "--timeout", "later").exit_code == 2


def test_reserve_wait_with_timeout_gives_up_with_exit_4(cli: Any, store: Location) -> None:
    enforce(cli)
    result = cli("reserve", "r", "t", "--estimate", "3", "--wait", "--timeout", "0", "--json")
    assert result.exit_code == 4
    assert (result.json()["error"], result.json()["escalation_id"]) == ("escalation_open", "esc-2")
    # Waiting again meets the same escalation (de-dup), and an approval releases it at once.
    cli("approve", "r", "esc-2", "--by", "alice")
    again = cli("reserve", "r", "t", "--estimate", "3", "--wait", "--timeout", "0", "--json")
    assert again.exit_code == 0
    assert again.json()["status"] == "exists"


def test_inbox(cli: Any, runs_dir: Path) -> None:
    enforce(cli, "alpha")
    enforce(cli, "beta")
    escalate_task(cli, "a1", run="alpha")
    escalate_task(cli, "a2", run="alpha")
    escalate_task(cli, "b1", "4.25", run="beta")
    cli("approve", "alpha", "esc-2", "--by", "alice")

    everything = cli("escalations", "--json")
    assert everything.exit_code == 0
    rows = everything.json()["escalations"]
    assert {(r["run"], r["id"], r["task"], r["state"], r["mode"], r["by"]) for r in rows} == {
        ("alpha", "esc-2", "a1", "resolved", "extend", "alice"),
        ("alpha", "esc-3", "a2", "open", None, None),
        ("beta", "esc-2", "b1", "open", None, None),
    }
    open_only = cli("escalations", "--open", "--json").json()["escalations"]
    assert sorted((r["run"], r["id"]) for r in open_only) == [("alpha", "esc-3"), ("beta", "esc-2")]
    assert [r["task"] for r in cli("escalations", "--run", "beta", "--json").json()["escalations"]] == ["b1"]

    table = cli("escalations", "--open", "--wide")
    assert table.exit_code == 0
    header = next(line for line in table.stdout.splitlines() if "task" in line)
    for column in ("run", "id", "task", "amount", "remaining", "state", "age", "expires", "offered"):
        assert column in header, column
    b1 = next(line for line in table.stdout.splitlines() if "b1" in line)
    assert "$4.25" in b1 and "$10.00" in b1 and "extend/pause/cancel" in b1
    assert "in 59m" in b1 or "in 1h" in b1
    assert "open escalations (2)" in table.stdout

    assert cli("escalations", "--run", "nope").exit_code == 2
    (runs_dir / "empty").mkdir()
    assert cli("escalations", "--runs-dir", str(runs_dir / "empty"), "--json").json() == {"escalations": []}
    missing = cli("escalations", "--runs-dir", str(runs_dir / "missing"), "--json")
    assert (missing.exit_code, missing.json()) == (0, {"escalations": []})


def test_inbox_skips_a_broken_run_with_a_warning(cli: Any, runs_dir: Path) -> None:
    enforce(cli, "good")
    escalate_task(cli, "t", run="good")
    enforce(cli, "bad")
    log = runs_dir / "bad" / "events.ndjson"
    log.write_bytes(log.read_bytes() + b"not json\n" + b'{"v":1}\n')
    result = cli("escalations", "--json")
    assert result.exit_code == 0
    assert [r["run"] for r in result.json()["escalations"]] == ["good"]
    assert "warning: skipped bad" in result.stderr
    assert cli("escalations", "--run", "bad").exit_code == 6


def test_inbox_relative_times() -> None:
    now = datetime(2026, 11, 23, 15, 0, tzinfo=UTC)

    def row(opened: timedelta, expires: timedelta | None, **extra: Any) -> dict[str, Any]:
        base = {"run": "r", "id": "esc-2", "task": "t", "requested_micros": 3_000_000,
                "remaining_micros": 1_000_000, "offered": ["pause", "cancel"], "shadow": False,
                "state": "open", "mode": None, "by": None,
                "opened_at": (now - opened).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "expires_at": None if expires is None else (now + expires).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
        return {**base, **extra}

    rows = [
        row(timedelta(minutes=12), timedelta(minutes=48)),
        row(timedelta(hours=2, minutes=5), timedelta(minutes=-5)),
        row(timedelta(seconds=40), None),
        row(timedelta(days=3, hours=4), timedelta(hours=1), state="resolved", mode="pause", by="timeout"),
        row(timedelta(minutes=1), None, shadow=True, state="resolved"),
    ]
    out = Console(width=160, no_color=True, record=True)
    out.print(escalation_table(rows, title="escalations", now=now, wide=True))
    lines = [line for line in out.export_text().splitlines() if "esc-2" in line]
    assert "12m" in lines[0] and "in 48m" in lines[0]
    assert "2h05m" in lines[1] and "overdue 5m" in lines[1]
    assert "40s" in lines[2] and "never" in lines[2]
    assert "3d04h" in lines[3] and "paused by timeout" in lines[3] and "in 1h" not in lines[3]
    assert "shadow" in lines[4]


def test_runs_show_counts_escalations(cli: Any, store: Location) -> None:
    assert cli("runs", "init", "r", "--cap", "10", "--escalation", "shadow",
               "--approval-threshold", "1").exit_code == 0
    shadow = cli("reserve", "r", "a", "--estimate", "2")
    assert shadow.exit_code == 0 and "would have escalated (shadow esc-2)" in shadow.stdout
    assert cli("reserve", "r", "b", "--estimate", "3", "--json").json()["shadow_escalation_id"] == "esc-4"
    assert cli("reserve", "r", "c", "--estimate", "0.5").exit_code == 0
    over = cli("reserve", "r", "d", "--estimate", "6", "--json")
    assert (over.exit_code, over.json()["error"], over.json()["shadow_escalation_id"]) == \
        (3, "over_budget", "esc-7")
    cli("runs", "set", "r", "--escalation", "enforce")
    escalate_task(cli, "e", "2")

    view = cli("runs", "show", "r", "--json").json()
    assert (view["shadow_escalations"], view["open_escalations"]) == (3, 1)
    assert [(e["id"], e["task"], e["state"], e["shadow"]) for e in view["escalations"]] == [
        ("esc-2", "a", "resolved", True), ("esc-4", "b", "resolved", True),
        ("esc-7", "d", "resolved", True), ("esc-10", "e", "open", False)]
    human = cli("runs", "show", "r")
    assert human.exit_code == 0
    counts = next(line for line in human.stdout.splitlines() if line.startswith("escalations "))
    assert "1 open, 3 shadow" in counts
    assert "esc-10" in human.stdout


def test_sweep_cli(cli: Any, store: Location) -> None:
    # Escalations opened an hour and a half ago with the default 1h timeout are overdue now.
    past = FakeClock(datetime.now(UTC) - timedelta(minutes=90))
    for run_id in ("a", "b"):
        run = Ledger.init(store, run_id, cap="10", escalation="enforce", approval_threshold="1",
                          clock=past)
        with pytest.raises(Pending):
            run.reserve("t", "2")
    fresh = Ledger.init(store, "c", cap="10", escalation="enforce", approval_threshold="1")
    with pytest.raises(Pending):
        fresh.reserve("t", "2")

    one = cli("sweep", "a", "--json")
    assert one.exit_code == 0
    assert one.json()["expired"] == [{"run": "a", "escalation_id": "esc-2"}]
    resolved = log_lines(store, "a")[-1]
    assert (resolved["type"], resolved["mode"], resolved["by"]) == ("escalation_resolved", "pause", "timeout")

    every = cli("sweep")
    assert every.exit_code == 0
    assert every.stdout.splitlines() == ["swept 3 run(s): 1 escalation(s) paused by timeout", "  b esc-2"]
    assert cli("escalations", "--open", "--json").json()["escalations"][0]["run"] == "c"
    before = logs(store)
    assert cli("sweep", "--json").json()["expired"] == []
    assert logs(store) == before
    assert cli("sweep", "nope").exit_code == 2


def test_approvers_from_the_command_line(cli: Any, runs_dir: Path) -> None:
    enforce(cli, "r", "--approvers", "alice,bob")
    esc = escalate_task(cli, "t")
    refused = cli("approve", "r", esc, "--by", "carol", "--json")
    assert (refused.exit_code, refused.json()["error"], refused.json()["approvers"]) == \
        (3, "not_an_approver", ["alice", "bob"])
    assert refused.stderr.startswith("escalate: cannot resolve") and "alice, bob" in refused.stderr
    timeout = cli("pause", "r", esc, "--by", "timeout", "--json")
    assert (timeout.exit_code, timeout.json()["error"]) == (2, "reserved_actor")
    # Only an approver changes the list (nobody adds themselves).
    assert cli("runs", "set", "r", "--approvers", "lead,alice", "--by", "lead").exit_code == 3
    changed = cli("runs", "set", "r", "--approvers", "carol", "--by", "alice")
    assert changed.stdout.strip() == "run r: approvers alice, bob → carol"
    cleared = cli("runs", "set", "r", "--approvers", "", "--by", "carol")
    assert cleared.stdout.strip() == "run r: approvers carol → anyone"
    assert cli("approve", "r", esc, "--by", "dave").exit_code == 0


def test_withdraw_and_release_from_the_command_line(cli: Any, runs_dir: Path) -> None:
    enforce(cli)
    esc = escalate_task(cli, "t")
    assert cli("withdraw", "r", esc, "--by", "alice", "--json").json()["error"] == "not_the_requester"
    withdrawn = cli("withdraw", "r", esc)
    assert (withdrawn.exit_code, withdrawn.stdout.strip()) == (0, f"{esc} withdrawn by tester")
    assert cli("reserve", "r", "u", "--estimate", "1").exit_code == 0
    raised = cli("increase", "r", "u", "--to", "3", "--json")
    assert raised.exit_code == 4
    released = cli("release", "r", "u", "--actual", "2", "--json")
    assert (released.exit_code, released.json()["withdrawn_escalation_id"]) == \
        (0, raised.json()["escalation_id"])
    assert cli("reserve", "r", "v", "--estimate", "1").exit_code == 0
    esc_v = cli("increase", "r", "v", "--to", "3", "--json").json()["escalation_id"]
    settled = cli("release", "r", "v", "--actual", "1")
    assert settled.stdout.strip().endswith(f"; its escalation {esc_v} is withdrawn")


@pytest.mark.parametrize("name", ["timeout ", "Timeout", "TIMEOUT", " alice", "alice "])
def test_names_that_pass_for_another_are_refused(cli: Any, runs_dir: Path, name: str) -> None:
    """A trailing space or another case must not pass for expiry, or for an approver."""
    cli("runs", "init", "r", "--cap", "10", "--escalation", "enforce", "--approval-threshold", "1")
    assert cli("reserve", "r", "t", "--estimate", "2", "--by", "wk").exit_code == 4
    log = (runs_dir / "r" / "events.ndjson").read_bytes()
    refused = cli("pause", "r", "esc-2", "--by", name, "--json")
    assert refused.exit_code == 2 and refused.json()["error"] in ("invalid_actor", "reserved_actor")
    assert (runs_dir / "r" / "events.ndjson").read_bytes() == log
