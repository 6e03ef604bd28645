"""The approver's view (docs/escalation.md, "The inbox"): the inbox holds 80 columns and
never drops a reason, what an escalation needs is computed when shown, a pool member's
escalation shows its pool's money and the limit that fired, ``escalations show`` shows one
escalation in full, and every notice carries the commands that answer it."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
from rich.cells import cell_len
from typer.testing import CliRunner

from escalate import Ledger
from escalate.cli import app
from escalate.errors import Pending
from escalate.pools import Pool
from escalate.reports.inbox import inbox
from tests.conftest import FakeClock, Location, snapshot_store

REASONS = {
    "nightly": "flaky shard rerun after the storage outage of this morning; see incident 4411 for the "
               "timeline and the owners of each shard",
    "hotfix-payments": "prod checkout is down",
    "docs": "new diagrams for the architecture guide, with a walkthrough of the pool books "
            "and a glossary",
}


def shown(*args: str, columns: int) -> str:
    """What ``escalate ARGS`` prints on a terminal ``columns`` wide (colour off)."""
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": str(columns), "NO_COLOR": "1"},
                                catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return result.stdout


def reason_column(table: str) -> str:
    """The text of the table's last column (the reason), its wrapped lines joined."""
    lines = table.splitlines()
    start = next(line for line in lines if line.rstrip().endswith("reason")).rstrip().rindex("reason")
    return " ".join(" ".join(line[start:].split()) for line in lines if line[start:].strip())


@pytest.fixture
def asked(runs_dir: Path) -> Path:
    for run, reason in REASONS.items():
        ledger = Ledger.init(runs_dir, run, cap="30", escalation="enforce", approval_threshold="5",
                             max_extension="10", actor="agent-7")
        with pytest.raises(Pending):
            ledger.reserve("e2e-suite", "28.000001", reason=reason, priority="high")
    return runs_dir


@pytest.mark.parametrize("columns", [60, 80, 120])
def test_the_inbox_never_drops_a_reason(asked: Path, columns: int) -> None:
    table = shown("escalations", columns=columns)
    whole = reason_column(table)
    for run, reason in REASONS.items():
        assert f"threshold: {reason}" in whole, (run, table)
        assert run in table
    if columns >= 80:  # at 80 columns it fits; narrower, lines grow rather than cut a word
        assert max(cell_len(line.rstrip()) for line in table.splitlines()) <= columns, table


def test_wide_shows_the_rest(asked: Path) -> None:
    table = shown("escalations", "--wide", columns=80)
    header = next(line for line in table.splitlines() if "offered" in line)
    for column in ("run", "id", "task", "priority", "amount", "needed", "remaining", "pool left", "from",
                   "reason", "state", "age", "expires", "offered"):
        assert column in header, column
    assert "extend/pause/cancel" in table and "agent-7" in table
    narrow = shown("escalations", columns=80)
    assert "offered" not in narrow and "extend/pause/cancel" not in narrow


def test_needed_is_computed_when_shown(store: Location, cli: Any) -> None:
    run = Ledger.init(store, "r", cap="10", escalation="enforce", max_extension="10", actor="bot")
    run.reserve("fill", "7")
    with pytest.raises(Pending):
        run.reserve("t", "4", reason="bigger model")  # $1.00 over the $3.00 left
    run.reserve("other", "1")  # another task reserves in between: $2.00 left

    [row] = inbox(store)["escalations"]
    assert (row["needed_extension_micros"], row["needed_now_micros"]) == (1_000_000, 2_000_000)
    assert row["run_remaining_now_micros"] == 2_000_000
    table = shown("escalations", columns=80).splitlines()
    row_at = next(index for index, line in enumerate(table) if "bigger model" in line)
    needed = table[row_at + 1].split()
    assert needed[needed.index("open,") - 1] == "$2.00", table  # needed now, under the amount
    assert table[row_at + 2].split() == ["(was", "$1.00)"], table
    assert "(was $1.00)" in shown("runs", "show", "r", columns=80)  # the run's own view too
    assert "$2.00 extension of the run (was $1.00 when asked)" in shown("escalations", "show", "r", row["id"],
                                                                        columns=80)
    # What was shown is what an approval grants.
    approved = cli("approve", "r", row["id"], "--by", "alice", "--json").json()
    assert approved["extension_micros"] == 2_000_000
    [settled] = inbox(store)["escalations"]
    assert settled["needed_now_micros"] is None  # settled: it needs nothing now


def test_a_pool_members_escalation_shows_the_pools_money_and_the_limit(store: Location, cli: Any) -> None:
    Pool.init(store, "team", cap="5", escalation="enforce", max_extension="5", approval_threshold="4")
    a = Ledger.init(store, "a", pool="team", cap="100", actor="bot")
    b = Ledger.init(store, "b", pool="team", cap="100", actor="bot")
    with pytest.raises(Pending):
        a.reserve("big", "6", reason="the e2e suite")  # over the pool's $5.00: pool_cap
    with pytest.raises(Pending):
        a.reserve("mid", "4.5")  # within the pool, over its $4.00 threshold
    c = Ledger.init(store, "c", pool="team", cap="1", escalation="enforce", max_extension="1", actor="bot")
    c.reserve("first", "0.5")
    with pytest.raises(Pending):
        c.reserve("huge", "0.75")  # over the $0.50 the run has left, within the pool
    b.reserve("fill", "1.5")  # the pool has $3.00 left now

    rows = {row["task"]: row for row in inbox(store)["escalations"]}
    assert {task: (row["fired"], row["pool"], row["run_pool"], row["pool_remaining_micros"])
            for task, row in rows.items()} == {
        "big": ("pool_cap", "team", "team", 3_000_000),
        "mid": ("pool_threshold", "team", "team", 3_000_000),
        "huge": ("run_cap", None, "team", 3_000_000)}
    big = rows["big"]
    assert (big["needed_extension_micros"], big["needed_now_micros"]) == (1_000_000, 3_000_000)
    assert (rows["mid"]["needed_extension_micros"], rows["mid"]["needed_now_micros"]) == (0, 1_500_000)
    table = shown("escalations", columns=80)
    whole = reason_column(table)
    assert "pool_cap of pool team: the e2e suite pool team: $3.00 left" in whole, table
    assert "pool_threshold of pool team pool team: $3.00 left" in whole, table
    assert "run_cap pool team: $3.00 left" in whole, table

    view = cli("escalations", "show", "a", rows["big"]["id"], "--json").json()
    assert view["pool_money"]["remaining_micros"] == 3_000_000 and view["fired"] == "pool_cap"
    human = shown("escalations", "show", "a", rows["big"]["id"], columns=80)
    assert "pool_cap: over what the pool had left (pool team)" in human
    assert "$3.00 extension of the pool (was $1.00 when asked)" in human
    assert re.search(r"pool +team \(all\): cap \$5\.00, committed \$2\.00, \$3\.00 left", human), human
    approved = cli("approve", "a", rows["big"]["id"], "--by", "alice", "--json").json()
    assert approved["pool_extension_micros"] == 3_000_000  # what was shown is what was granted


def test_escalations_show_gives_one_escalation_in_full(store: Location, cli: Any, tmp_path: Path) -> None:
    received = tmp_path / "notice.json"
    clock = FakeClock()
    run = Ledger.init(store, "r", cap="10", escalation="enforce", approval_threshold="2", max_extension="5",
                      escalation_timeout_s=None, actor="agent-7", notify_cmd="exit 7",
                      clock=clock)
    with pytest.raises(Pending) as pending:
        run.reserve("gpu", "3", reason="fine-tune run", priority="urgent")
    escalation_id = pending.value.escalation_id
    clock.advance(600)  # the failed notice is due again
    Ledger.open(store, "r", notify_cmd=f"cat > {shlex.quote(str(received))}", clock=clock).sweep()

    view = cli("escalations", "show", "r", escalation_id, "--json").json()
    assert (view["run"], view["id"], view["task"], view["requested_micros"], view["request_reason"],
            view["priority"], view["requested_by"], view["state"]) == \
        ("r", escalation_id, "gpu", 3_000_000, "fine-tune run", "urgent", "agent-7", "open")
    assert view["run_money"] == {"cap_micros": 10_000_000, "committed_micros": 0,
                                 "remaining_micros": 10_000_000, "extended_micros": 0,
                                 "extension_left_micros": 5_000_000}
    assert (view["pool_money"], view["needed_now_micros"], view["fired"]) == (None, 0, "threshold")
    assert (view["approvers"], view["approvals"], view["quorum"]) == ([], [], 1)
    assert [(n["attempt"], n["ok"], n["detail"]) for n in view["notices"]] == [(1, False, "exit 7"),
                                                                               (2, True, "exit 0")]
    commands = {command: f"escalate {command} r {escalation_id}"
                for command in ("approve", "pause", "cancel")}
    assert view["commands"] == commands

    human = shown("escalations", "show", "r", escalation_id, columns=80)
    for part in ("$3.00 for task gpu (reserve)", "fine-tune run", "urgent", "claimed agent-7",
                 "no extension: it fits", "cap $10.00, committed $0.00, $10.00 left; extension left $5.00",
                 "0 of 1 approvals; approvers: anyone but the requester", "1: failed ", "(exit 7)",
                 "2: delivered ",
                 *commands.values()):
        assert part in human, (part, human)
    assert max(cell_len(line.rstrip()) for line in human.splitlines()) <= 80
    # The identity the store vouches for, beside the name claimed, where it recorded one.
    vouched = view.get("requested_role")
    assert ("claimed agent-7, vouched" in human) == (vouched is not None)
    assert vouched is None or f"claimed agent-7, vouched {vouched}" in human

    # The commands shown are exact: run as given, the approve one approves it.
    assert cli(*shlex.split(commands["approve"])[1:], "--by", "alice").exit_code == 0
    done = cli("escalations", "show", "r", escalation_id, "--json").json()
    assert (done["commands"], [a["by"] for a in done["approvals"]]) == ({}, ["alice"])
    assert done["needed_now_micros"] is None
    assert "1 of 1 approvals (alice " in shown("escalations", "show", "r", escalation_id, columns=80)


@pytest.mark.parametrize(("args", "code"), [
    (["r", "esc-99"], "unknown_escalation"), (["r", "../esc-2"], "invalid_id"), (["nope", "esc-2"], None)])
def test_escalations_show_refuses_what_is_not_there(store: Location, cli: Any, args: list[str],
                                                    code: str | None) -> None:
    run = Ledger.init(store, "r", cap="10", escalation="enforce", approval_threshold="2", actor="bot")
    with pytest.raises(Pending):
        run.reserve("t", "3")
    before = snapshot_store(store)
    refused = cli("escalations", "show", *args, "--json")
    assert refused.exit_code == 2
    if code is not None:
        assert refused.json()["error"] == code
    human = cli("escalations", "show", *args)
    assert human.exit_code == 2 and human.stderr.startswith("escalate: ")
    assert len(human.stderr.splitlines()) == 1
    assert snapshot_store(store) == before


def test_every_notice_carries_the_commands_that_answer_it(runs_dir: Path, cli: Any, tmp_path: Path) -> None:
    received = tmp_path / "notices"
    received.mkdir()
    hook = f"cat > $(mktemp -p {shlex.quote(str(received))})"  # one file a notice: hooks run at once

    def notices() -> list[dict[str, Any]]:
        found = [orjson.loads(path.read_bytes()) for path in received.iterdir()]
        for path in received.iterdir():
            path.unlink()
        return sorted(found, key=lambda notice: int(notice["seq"]))

    clock = FakeClock()
    run = Ledger.init(runs_dir, "r", cap="10", escalation="enforce", approval_threshold="2.5",
                      max_extension="1", renotify_every_s=60, escalation_timeout_s=None, actor="bot",
                      notify_cmd=hook, clock=clock)
    with pytest.raises(Pending):
        run.reserve("t", "3")  # extend offered
    for task in ("fill-1", "fill-2", "fill-3"):
        run.reserve(task, "2")
    with pytest.raises(Pending):
        run.reserve("big", "5.5")  # needs $1.50 but only $1.00 may be added: no approve
    first = notices()
    small, big = (notice["id"] for notice in first)
    assert [notice["commands"] for notice in first] == [
        {"approve": f"escalate approve r {small}", "pause": f"escalate pause r {small}",
         "cancel": f"escalate cancel r {small}"},
        {"pause": f"escalate pause r {big}", "cancel": f"escalate cancel r {big}"}]
    # A reminder (sweep) carries them too.
    clock.advance(3600)
    Ledger.open(runs_dir, "r", notify_cmd=hook, clock=clock).sweep()
    again = {notice["id"]: notice["commands"] for notice in notices()}
    assert again == {notice["id"]: notice["commands"] for notice in first}


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")
def test_where_keys_are_pinned_the_commands_sign(runs_dir: Path, cli: Any, tmp_path: Path) -> None:
    key = tmp_path / "alice"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    pinned = f"alice={Path(f'{key}.pub').read_text().strip()}"
    received = tmp_path / "notices"
    received.mkdir()
    hook = f"cat > $(mktemp -p {shlex.quote(str(received))})"
    assert cli("pools", "init", "team", "--cap", "3", "--max-extension", "5", "--escalation", "enforce",
               "--approver-key", pinned).exit_code == 0
    for run, pin in (("signed", ["--approver-key", pinned]), ("pooled", ["--pool", "team"])):
        assert cli("runs", "init", run, "--cap", "10", "--escalation", "enforce", "--approval-threshold", "5",
                   *pin).exit_code == 0
    asked = {run: cli("reserve", run, "t", "--estimate", "4" if run == "pooled" else "6", "--by", "bob",
                      "--notify-cmd", hook, "--json").json()["escalation_id"] for run in ("signed", "pooled")}
    notices = {notice["run"]: notice["commands"]
               for notice in (orjson.loads(path.read_bytes()) for path in received.iterdir())}
    for run, escalation_id in asked.items():
        commands = {command: f"escalate {command} {run} {escalation_id} --sign KEYFILE"
                    for command in ("approve", "pause", "cancel")}
        assert notices[run] == commands
        assert cli("escalations", "show", run, escalation_id, "--json").json()["commands"] == commands
        # Exact: with the approver's own key file in place of KEYFILE, it answers.
        done = cli(*shlex.split(commands["approve"].replace("KEYFILE", str(key)))[1:], "--by", "alice")
        assert done.exit_code == 0, done.stderr


def test_the_approvals_so_far_against_the_quorum(store: Location, cli: Any) -> None:
    run = Ledger.init(store, "r", cap="10", escalation="enforce", approval_threshold="2", quorum=2,
                      actor="bot")
    with pytest.raises(Pending) as pending:
        run.reserve("t", "3", reason="two keys")
    escalation_id = pending.value.escalation_id
    assert cli("escalations", "show", "r", escalation_id, "--json").json()["quorum"] == 2
    assert cli("approve", "r", escalation_id, "--by", "alice").exit_code == 0  # one of two
    view = cli("escalations", "show", "r", escalation_id, "--json").json()
    assert (view["state"], [a["by"] for a in view["approvals"]], view["quorum"]) == ("open", ["alice"], 2)
    assert "1 of 2 approvals (alice" in shown("escalations", "show", "r", escalation_id, columns=80)
    assert "open: 1 of 2 approvals (alice)" in " ".join(shown("escalations", columns=200).split())
