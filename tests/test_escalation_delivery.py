"""Delivery you can rely on: every notify attempt is recorded after the fact as
``escalation_notified`` (never the hook's output), a failed or hanging hook is re-delivered
by ``sweep`` with backoff (driven by a fake clock: no sleeping), reminders follow
``--renotify-every``, and recording never changes a decision or an exit code."""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from escalate import Ledger, Pending
from escalate.escalation.delivery import retry_delay_s
from tests.conftest import FakeClock, Location, log_bytes, snapshot_tree


def escalate(runs_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """One real ``python -m escalate`` process."""
    environment = {key: value for key, value in os.environ.items() if key != "ESCALATE_NOTIFY_CMD"}
    environment.update({"ESCALATE_RUNS_DIR": str(runs_dir), "ESCALATE_ACTOR": "ci-bot", "NO_COLOR": "1",
                        **env})
    return subprocess.run([sys.executable, "-m", "escalate", *args], capture_output=True, text=True,
                          env=environment, timeout=60, check=False)


def log(runs_dir: Path, run: str = "r") -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (runs_dir / run / "events.ndjson").read_bytes().splitlines()]


def notices(runs_dir: Path, run: str = "r") -> list[tuple[int, bool, str]]:
    return [(e["attempt"], e["ok"], e["detail"]) for e in log(runs_dir, run)
            if e["type"] == "escalation_notified"]


def init_cli(runs_dir: Path) -> None:
    assert escalate(runs_dir, "runs", "init", "r", "--cap", "10", "--escalation", "enforce",
                    "--approval-threshold", "2").returncode == 0


@pytest.mark.parametrize(("hook", "detail"), [
    ("cat > /dev/null; echo SECRET-TOKEN; echo SECRET-TOKEN >&2; exit 7", "exit 7"),
    ("cat > /dev/null; echo SECRET-TOKEN; sleep 30 & wait", "timed out after 0.3s"),
    ("echo SECRET-TOKEN; cat > /dev/null", "exit 0"),
], ids=["failing", "hanging", "delivered"])
def test_each_attempt_is_recorded_without_the_hooks_output(tmp_path: Path, hook: str, detail: str) -> None:
    runs = tmp_path / "runs"
    init_cli(runs)
    asked = escalate(runs, "reserve", "r", "t", "--estimate", "3", "--notify-cmd", hook, "--json",
                     ESCALATE_NOTIFY_TIMEOUT="300ms")
    assert asked.returncode == 4  # the decision's exit code, whatever the hook did
    assert orjson.loads(asked.stdout)["escalation_id"] == "esc-2"
    assert notices(runs) == [(1, detail == "exit 0", detail)]
    assert b"SECRET-TOKEN" not in (runs / "r" / "events.ndjson").read_bytes()
    assert escalate(runs, "runs", "verify", "r").returncode == 0
    [escalation] = orjson.loads(escalate(runs, "escalations", "--json").stdout)["escalations"]
    assert (escalation["notify_attempts"], escalation["notified_ok"], escalation["state"]) == \
        (1, detail == "exit 0", "open")


def test_a_recording_that_fails_only_warns(tmp_path: Path) -> None:
    """The hook leaves another process holding the run's lock: the attempt cannot be
    recorded within the lock timeout, and the command still answers as decided."""
    runs = tmp_path / "runs"
    init_cli(runs)
    lock, held, release = runs / "r" / "events.ndjson.lock", tmp_path / "held", tmp_path / "release"
    holder = (f"import fcntl, os, time; f = open({str(lock)!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
              f"open({str(held) + '.new'!r}, 'w').write(str(os.getpid())); "
              f"os.rename({str(held) + '.new'!r}, {str(held)!r})\n"
              f"while not os.path.exists({str(release)!r}): time.sleep(0.01)")
    hook = (f"cat > /dev/null; {shlex.quote(sys.executable)} -c {shlex.quote(holder)} >/dev/null 2>&1 & "
            f"while [ ! -e {shlex.quote(str(held))} ]; do sleep 0.01; done")
    try:
        asked = escalate(runs, "reserve", "r", "t", "--estimate", "3", "--notify-cmd", hook, "--json",
                         "--lock-timeout", "0.3")
    finally:
        release.touch()
        if held.exists():  # the holder is the hook's child, not ours: wait for its exit here
            with contextlib.suppress(ProcessLookupError):
                waited = os.pidfd_open(int(held.read_text()))
                try:
                    select.select([waited], [], [], 30)
                finally:
                    os.close(waited)
    assert asked.returncode == 4, asked.stderr
    assert orjson.loads(asked.stdout)["error"] == "escalation_open"
    assert "warning: the notify attempt for esc-2 was not recorded" in asked.stderr
    assert notices(runs) == []
    assert [e["type"] for e in log(runs)] == ["run_opened", "escalation"]


def test_backoff_doubles_and_is_capped() -> None:
    assert [retry_delay_s(n) for n in range(1, 10)] == [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]
    assert retry_delay_s(10_000) == 3600


def test_sweep_redelivers_failed_notices_with_backoff_then_reminds(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    clock = FakeClock()
    # The hook fails twice, then works: a counter file counts its calls.
    calls, received = tmp_path / "calls", tmp_path / "received"
    hook = (f"cat >> {shlex.quote(str(received))}; echo >> {shlex.quote(str(received))}; "
            f"echo x >> {shlex.quote(str(calls))}; [ $(wc -l < {shlex.quote(str(calls))}) -ge 3 ]")
    run = Ledger.init(runs, "r", cap="10", escalation="enforce", approval_threshold="2",
                      escalation_timeout_s=7 * 86_400, clock=clock, notify_cmd=hook, actor="ci-bot")
    with pytest.raises(Pending):
        run.reserve("t", "3", reason="flaky shard", priority="high")
    assert notices(runs) == [(1, False, "exit 1")]

    def sweep_after(seconds: float) -> list[tuple[str, int | None, bool]]:
        clock.advance(seconds)
        return [(n["escalation_id"], n["attempt"], n["ok"]) for n in run.sweep()["notified"]]

    assert sweep_after(59) == []                     # 1 min after the first failure …
    assert sweep_after(1) == [("esc-2", 2, False)]   # … it is sent again, and fails again
    assert sweep_after(119) == []                    # then 2 min later
    assert sweep_after(1) == [("esc-2", 3, True)]
    assert sweep_after(86_000) == []                 # delivered: no reminders by default
    sent = [orjson.loads(line) for line in received.read_bytes().splitlines()]
    assert [(n["attempt"], n["id"], n["request_reason"], n["priority"], n["requested_by"]) for n in sent] == \
        [(a, "esc-2", "flaky shard", "high", "ci-bot") for a in (1, 2, 3)]
    assert sent[1]["seq"] == 2 and sent[1]["needed_extension_micros"] == 0

    run.set_policy(renotify_every_s=600)
    assert sweep_after(0) == [("esc-2", 4, True)]    # the last delivery is long past 10 min
    assert sweep_after(599) == []
    assert sweep_after(1) == [("esc-2", 5, True)]
    run.approve("esc-2", by="alice")
    assert sweep_after(3600) == []                   # resolved: nothing is sent any more
    assert [a for a, _, _ in notices(runs)] == [1, 2, 3, 4, 5]
    # Only escalation_notified lines were added by delivery: the money is as approved.
    assert run.state().tasks["t"].reserved_micros == 3_000_000


def test_cli_sweep_redelivers_what_failed(tmp_path: Path) -> None:
    """A real ``escalate sweep`` process re-delivers a notice that failed an hour ago (the
    log written with a clock an hour behind) and reports it."""
    runs = tmp_path / "runs"
    received = tmp_path / "received"
    clock = FakeClock(datetime.now(UTC) - timedelta(hours=1))
    run = Ledger.init(runs, "r", cap="10", escalation="enforce", approval_threshold="2", clock=clock,
                      notify_cmd="exit 9", escalation_timeout_s=86_400)
    with pytest.raises(Pending):
        run.reserve("t", "3", priority="urgent")
    swept = escalate(runs, "sweep", "--json", ESCALATE_NOTIFY_CMD=f"cat > {shlex.quote(str(received))}")
    assert swept.returncode == 0, swept.stderr
    report = orjson.loads(swept.stdout)
    assert report["notified"] == [{"run": "r", "escalation_id": "esc-2", "attempt": 2, "ok": True,
                                   "detail": "exit 0"}]
    assert orjson.loads(received.read_bytes())["priority"] == "urgent"
    assert notices(runs) == [(1, False, "exit 9"), (2, True, "exit 0")]
    again = escalate(runs, "sweep", ESCALATE_NOTIFY_CMD="true")
    assert again.returncode == 0 and "sent again" not in again.stdout


def test_renotify_every_is_a_bounded_policy_setting(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    created = escalate(runs, "runs", "init", "r", "--cap", "5", "--escalation", "enforce",
                       "--renotify-every", "30m", "--json")
    assert created.returncode == 0 and orjson.loads(created.stdout)["escalation"]["renotify_every_s"] == 1800
    # The same settings again is idempotent; a different interval is a conflict.
    same = escalate(runs, "runs", "init", "r", "--cap", "5", "--escalation", "enforce",
                    "--renotify-every", "30m")
    assert same.returncode == 0 and "already exists" in same.stdout
    other = escalate(runs, "runs", "init", "r", "--cap", "5", "--escalation", "enforce")
    assert other.returncode == 5 and "renotify every" in other.stderr
    before = (runs / "r" / "events.ndjson").read_bytes()
    for bad in ("10s", "400d", "soon"):
        refused = escalate(runs, "runs", "set", "r", "--renotify-every", bad)
        assert refused.returncode == 2 and refused.stderr.startswith("escalate: "), bad
    assert (runs / "r" / "events.ndjson").read_bytes() == before
    changed = escalate(runs, "runs", "set", "r", "--no-renotify")
    assert changed.returncode == 0 and "renotify every 30m → never" in changed.stdout
    assert "renotify_every_s" not in log(runs)[-1]["escalation"]


def test_a_failure_after_delivered_reminders_is_retried_in_a_minute(tmp_path: Path) -> None:
    """The backoff counts the failures since the last delivery, not every attempt."""
    runs, flag = tmp_path / "runs", tmp_path / "webhook-up"
    flag.touch()
    clock = FakeClock()
    run = Ledger.init(runs, "r", cap="10", escalation="enforce", approval_threshold="2",
                      escalation_timeout_s=7 * 86_400, clock=clock, actor="ci-bot",
                      notify_cmd=f"cat > /dev/null; [ -e {shlex.quote(str(flag))} ]")
    run.set_policy(renotify_every_s=60)
    with pytest.raises(Pending):
        run.reserve("t", "3")

    def sweep_after(seconds: float) -> list[tuple[int | None, bool]]:
        clock.advance(seconds)
        return [(n["attempt"], n["ok"]) for n in run.sweep()["notified"]]

    assert [sweep_after(60) for _ in range(3)] == [[(2, True)], [(3, True)], [(4, True)]]
    flag.unlink()  # the webhook goes down
    assert sweep_after(60) == [(5, False)]
    assert sweep_after(59) == []
    assert sweep_after(1) == [(6, False)]   # one minute after the first failure in a row
    assert sweep_after(119) == []
    assert sweep_after(1) == [(7, False)]   # then two


def _sweep(store: Location, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """One real ``escalate sweep --json`` process on ``store``."""
    where = ("--runs-dir", str(store)) if isinstance(store, Path) else ("--store", store)
    environment = {key: value for key, value in os.environ.items() if key != "ESCALATE_NOTIFY_CMD"}
    command = [sys.executable, "-m", "escalate", "sweep", *where, "--json", *args]
    return subprocess.run(command, capture_output=True, text=True, env={**environment, **env}, timeout=120,
                          check=False)


def _events(store: Location, run: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in log_bytes(store, run).splitlines()]


def _open_escalations(store: Location, run: str, count: int, clock: FakeClock, **settings: Any) -> None:
    """``count`` open escalations in a new run, written an hour ago: a first delivery
    failed, so each is due again now."""
    ledger = Ledger.init(store, run, cap="100", escalation="enforce", approval_threshold="1", clock=clock,
                         actor="ci-bot", **settings)
    for task in range(count):
        with pytest.raises(Pending):
            ledger.reserve(f"t{task}", "2")


def test_sweep_expires_first_then_delivers_several_at_a_time(store: Location) -> None:
    clock = FakeClock(datetime.now(UTC) - timedelta(hours=1))
    for run in ("a1", "a2"):  # swept before z: a sequential sweep would expire z last
        _open_escalations(store, run, 10, clock, notify_cmd="exit 9", escalation_timeout_s=86_400)
    _open_escalations(store, "z", 3, clock, escalation_timeout_s=60)
    started = time.monotonic()
    swept = _sweep(store, "--parallel", "5", ESCALATE_NOTIFY_CMD="cat > /dev/null; sleep 30",
                   ESCALATE_NOTIFY_TIMEOUT="1s")
    elapsed = time.monotonic() - started
    assert swept.returncode == 0, swept.stderr
    report = orjson.loads(swept.stdout)
    assert sorted((e["run"], e["escalation_id"]) for e in report["expired"]) == [
        ("z", "esc-2"), ("z", "esc-3"), ("z", "esc-4")]
    assert len(report["notified"]) == 20 and report["deferred"] == []
    assert {(n["run"], n["attempt"], n["ok"], n["detail"]) for n in report["notified"]} == {
        (run, 2, False, "timed out after 1s") for run in ("a1", "a2")}
    # Every expiry is on record before the first hook's attempt is.
    expiries = [e["ts"] for e in _events(store, "z") if e["type"] == "escalation_resolved"]
    attempts = [e["ts"] for run in ("a1", "a2") for e in _events(store, run)
                if e["type"] == "escalation_notified" and e["attempt"] == 2]
    assert len(expiries) == 3 and len(attempts) == 20 and max(expiries) < min(attempts)
    # Four rounds of five one-second hooks; one at a time would take more than 20 s.
    assert elapsed < 12, elapsed


def test_notices_not_started_by_the_deadline_are_sent_at_the_next_sweep(store: Location) -> None:
    clock = FakeClock(datetime.now(UTC) - timedelta(hours=1))
    _open_escalations(store, "r", 6, clock, notify_cmd="exit 9", escalation_timeout_s=86_400)
    first = _sweep(store, "--parallel", "1", "--deadline", "1500ms",
                   ESCALATE_NOTIFY_CMD="cat > /dev/null; sleep 30", ESCALATE_NOTIFY_TIMEOUT="1s")
    assert first.returncode == 0, first.stderr
    report = orjson.loads(first.stdout)
    tried = [n["escalation_id"] for n in report["notified"]]
    left = [d["escalation_id"] for d in report["deferred"]]
    opened = [e["id"] for e in _events(store, "r") if e["type"] == "escalation"]
    assert 1 <= len(tried) <= 2 and sorted(tried + left) == sorted(opened) and len(opened) == 6
    # Only the attempts made are on record: a deferred notice is simply still due.
    recorded = [e["id"] for e in _events(store, "r")
                if e["type"] == "escalation_notified" and e["attempt"] == 2]
    assert sorted(recorded) == sorted(tried)
    second = _sweep(store, ESCALATE_NOTIFY_CMD="cat > /dev/null")
    assert second.returncode == 0, second.stderr
    again = orjson.loads(second.stdout)
    # The deferred ones now; those that failed a minute ago wait for their backoff.
    assert sorted((n["escalation_id"], n["attempt"], n["ok"]) for n in again["notified"]) == sorted(
        (escalation_id, 2, True) for escalation_id in left)
    assert again["deferred"] == []


@pytest.mark.parametrize(("option", "value"), [("--parallel", "0"), ("--parallel", "33"),
                                               ("--deadline", "2h"), ("--deadline", "soon")])
def test_sweep_limits_are_bounded(runs_dir: Path, option: str, value: str) -> None:
    clock = FakeClock(datetime.now(UTC) - timedelta(hours=1))
    _open_escalations(runs_dir, "r", 1, clock, escalation_timeout_s=60)
    before = snapshot_tree(runs_dir)
    refused = _sweep(runs_dir, option, value, ESCALATE_NOTIFY_CMD="true")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert orjson.loads(refused.stdout)["error"] in ("invalid_input", "invalid_duration")
    assert snapshot_tree(runs_dir) == before
