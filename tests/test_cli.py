"""The issue-2 commands through the CLI: human and --json output, and every exit code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import typer.main

from tests.conftest import Location, log_bytes

SHOW_KEYS = {"run", "cap_micros", "spent_micros", "reserved_micros", "committed_micros",
             "remaining_micros", "extended_micros", "tasks", "escalations"}
TASK_KEYS = {"task", "state", "reserved_micros", "actual_micros"}
ESCALATION_KEYS = {"id", "task", "state", "mode", "by"}


def one_json_object(stdout: str) -> dict[str, Any]:
    """--json prints exactly one JSON object on one line, and nothing else."""
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    value = orjson.loads(lines[0])
    assert isinstance(value, dict)
    return value


def assert_error(result: Any, exit_code: int, error: str) -> dict[str, Any]:
    """A failure: its exit code, one stderr line, and with --json one object with the code."""
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    assert len(result.stderr.splitlines()) == 1, result.stderr
    payload = one_json_object(result.stdout)
    assert payload["error"] == error
    assert isinstance(payload["message"], str) and payload["message"]
    assert payload["exit_code"] == exit_code
    return payload


def log_of(runs_dir: Path, run: str) -> Path:
    return runs_dir / run / "events.ndjson"


@pytest.fixture
def run10(request: pytest.FixtureRequest, cli: Any) -> str:
    """A run with a $10 cap and a $5 task cap (in the test's ``store`` if it takes one)."""
    if "store" in request.fixturenames:
        request.getfixturevalue("store")
    result = cli("runs", "init", "r", "--cap", "10", "--task-cap", "5")
    assert result.exit_code == 0, result.stderr
    return "r"


# ---------------------------------------------------------------------- runs init


def test_runs_init_human_and_json(cli: Any, runs_dir: Path) -> None:
    human = cli("runs", "init", "alpha", "--cap", "12.5", "--task-cap", "$2")
    assert human.exit_code == 0
    assert human.stderr == ""
    assert "alpha" in human.stdout and "$12.50" in human.stdout and "$2.00" in human.stdout
    assert log_of(runs_dir, "alpha").is_file()
    assert (runs_dir / "alpha" / "events.ndjson.lock").is_file()

    created = cli("runs", "init", "beta", "--cap", "3", "--json")
    assert created.exit_code == 0
    payload = one_json_object(created.stdout)
    assert payload["run"] == "beta"
    assert payload["cap_micros"] == payload["remaining_micros"] == 3_000_000
    assert payload["task_cap_micros"] == 3_000_000  # defaults to the run cap
    assert payload["spent_micros"] == payload["reserved_micros"] == payload["committed_micros"] == 0


def test_runs_init_same_settings_is_idempotent_and_different_ones_conflict(
        cli: Any, store: Location) -> None:
    assert cli("runs", "init", "r", "--cap", "10").exit_code == 0
    before = log_bytes(store, "r")
    again = cli("runs", "init", "r", "--cap", "10.000000", "--json")
    assert again.exit_code == 0
    assert one_json_object(again.stdout)["cap_micros"] == 10_000_000
    assert_error(cli("runs", "init", "r", "--cap", "11", "--json"), 5, "conflict")
    assert log_bytes(store, "r") == before


def test_runs_init_writes_a_valid_first_event(cli: Any, store: Location) -> None:
    assert cli("runs", "init", "r", "--cap", "7", "--by", "alice").exit_code == 0
    [line] = log_bytes(store, "r").splitlines()
    event = orjson.loads(line)
    assert {k: event[k] for k in ("v", "seq", "type", "prev", "actor", "run_cap_micros",
                                  "task_cap_micros")} == {
        "v": 1, "seq": 1, "type": "run_opened", "prev": "", "actor": "alice",
        "run_cap_micros": 7_000_000, "task_cap_micros": 7_000_000}
    assert event["escalation"]["mode"] == "off"
    assert event["ts"].endswith("Z")


# ---------------------------------------------------------------------- reserve / increase / release


def test_reserve_increase_release_human(cli: Any, store: Location, run10: str) -> None:
    reserved = cli("reserve", run10, "t1", "--estimate", "2.50")
    assert reserved.exit_code == 0 and reserved.stderr == ""
    assert "t1" in reserved.stdout and "$2.50" in reserved.stdout and "$7.50" in reserved.stdout

    increased = cli("increase", run10, "t1", "--to", "4", "--reason", "long diff")
    assert increased.exit_code == 0
    assert "$4.00" in increased.stdout and "$6.00" in increased.stdout

    released = cli("release", run10, "t1", "--actual", "3.25")
    assert released.exit_code == 0
    assert "$3.25" in released.stdout and "$6.75" in released.stdout


def test_reserve_increase_release_json(cli: Any, run10: str, store: Location) -> None:
    reserved = one_json_object(cli("reserve", run10, "t1", "-e", "2.5", "--json").stdout)
    assert reserved == {"run": run10, "status": "reserved", "task": "t1",
                        "reserved_micros": 2_500_000, "remaining_micros": 7_500_000}
    increased = one_json_object(cli("increase", run10, "t1", "--to", "4", "--json").stdout)
    assert increased["status"] == "increased"
    assert (increased["reserved_micros"], increased["remaining_micros"]) == (4_000_000, 6_000_000)
    released = one_json_object(cli("release", run10, "t1", "-a", "3.25", "--json").stdout)
    assert released["status"] == "released"
    assert (released["reserved_micros"], released["actual_micros"], released["remaining_micros"]) == (
        4_000_000, 3_250_000, 6_750_000)
    types = [orjson.loads(line)["type"] for line in log_bytes(store, run10).splitlines()]
    assert types == ["run_opened", "budget_reserved", "budget_increased", "released"]
    increase_event = orjson.loads(log_bytes(store, run10).splitlines()[2])
    assert (increase_event["from_micros"], increase_event["to_micros"]) == (2_500_000, 4_000_000)


def test_idempotent_repeats_exit_0_and_append_nothing(cli: Any, run10: str, store: Location) -> None:
    assert cli("reserve", run10, "t", "--estimate", "1").exit_code == 0
    assert cli("increase", run10, "t", "--to", "2").exit_code == 0
    before = log_bytes(store, run10)
    for args in (["reserve", run10, "t", "--estimate", "2"],  # the amount it now holds
                 ["increase", run10, "t", "--to", "2.000000"]):
        result = cli(*args, "--json")
        assert result.exit_code == 0
        assert one_json_object(result.stdout)["status"] == "exists"
        assert log_bytes(store, run10) == before
    assert cli("release", run10, "t", "--actual", "1.5").exit_code == 0
    before = log_bytes(store, run10)
    human = cli("release", run10, "t", "--actual", "1.50")
    assert human.exit_code == 0 and "nothing changed" in human.stdout
    assert log_bytes(store, run10) == before


def test_release_after_a_halted_increase_and_over_run(cli: Any, run10: str, store: Location) -> None:
    assert cli("reserve", run10, "t", "--estimate", "4").exit_code == 0
    halted = assert_error(cli("increase", run10, "t", "--to", "6", "--json"), 3, "over_task_cap")
    assert halted["task"] == "t"
    assert_error(cli("increase", run10, "t", "--to", "4.5", "--json"), 3, "halted")
    # Release is allowed after the halt, and may exceed the reservation.
    released = one_json_object(cli("release", run10, "t", "--actual", "12", "--json").stdout)
    assert released["status"] == "released"
    assert released["remaining_micros"] == -2_000_000
    show = one_json_object(cli("runs", "show", run10, "--json").stdout)
    assert (show["spent_micros"], show["reserved_micros"], show["remaining_micros"]) == (
        12_000_000, 0, -2_000_000)


# ---------------------------------------------------------------------- runs show / runs list


def test_runs_show_json_has_the_documented_keys(cli: Any, store: Location, run10: str) -> None:
    cli("reserve", run10, "held", "--estimate", "1.5")
    cli("reserve", run10, "done", "--estimate", "2")
    cli("release", run10, "done", "--actual", "1.25")
    cli("reserve", run10, "big", "--estimate", "5.01")  # over the task cap: halted
    result = cli("runs", "show", run10, "--json")
    assert result.exit_code == 0
    show = one_json_object(result.stdout)
    assert show.keys() >= SHOW_KEYS
    assert show["run"] == run10
    assert show["cap_micros"] == 10_000_000
    assert show["spent_micros"] == 1_250_000
    assert show["reserved_micros"] == 1_500_000
    assert show["committed_micros"] == 2_750_000
    assert show["remaining_micros"] == 7_250_000
    assert show["extended_micros"] == 0
    assert show["escalations"] == []
    tasks = {task["task"]: task for task in show["tasks"]}
    for task in tasks.values():
        assert task.keys() >= TASK_KEYS
        assert task["state"] in {"reserved", "released", "halted", "escalated", "paused"}
    # reserved_micros is what a task holds or, once settled, what it had reserved; holding
    # says whether it still counts as reserved.
    assert {name: (t["state"], t["reserved_micros"], t["holding"], t["actual_micros"])
            for name, t in tasks.items()} == {
        "held": ("reserved", 1_500_000, True, None),
        "done": ("released", 2_000_000, False, 1_250_000),
        "big": ("halted", 0, False, None),
    }


def test_runs_show_human(cli: Any, store: Location, run10: str) -> None:
    cli("reserve", run10, "held", "--estimate", "3")
    cli("reserve", run10, "done", "--estimate", "2")
    cli("release", run10, "done", "--actual", "2")
    result = cli("runs", "show", run10)
    assert result.exit_code == 0
    out = result.stdout
    for label, amount in (("cap", "$10.00"), ("spent", "$2.00"), ("reserved", "$3.00"),
                          ("committed", "$5.00"), ("remaining", "$5.00")):
        [row] = [line for line in out.splitlines() if line.split() and line.split()[0] == label]
        assert amount in row
    assert "█" in out and "50%" in out  # the usage bar
    assert "held" in out and "done" in out and "released" in out


def test_runs_list_human_and_json(cli: Any, runs_dir: Path) -> None:
    runs_dir.mkdir()
    empty = cli("runs", "list", "--json")
    assert empty.exit_code == 0
    assert orjson.loads(empty.stdout) == {"runs": []}
    cli("runs", "init", "one", "--cap", "1")
    cli("runs", "init", "two", "--cap", "2")
    cli("reserve", "two", "t", "--estimate", "0.5")
    listed = cli("runs", "list", "--json")
    assert listed.exit_code == 0
    assert len(listed.stdout.splitlines()) == 1
    rows = {row["run"]: row for row in orjson.loads(listed.stdout)["runs"]}
    assert set(rows) == {"one", "two"}
    assert (rows["two"]["cap_micros"], rows["two"]["committed_micros"], rows["two"]["remaining_micros"]) == (
        2_000_000, 500_000, 1_500_000)
    human = cli("runs", "list")
    assert human.exit_code == 0
    assert "one" in human.stdout and "two" in human.stdout and "$1.50" in human.stdout


def test_runs_dir_option_beats_the_environment(cli: Any, tmp_path: Path, runs_dir: Path) -> None:
    other = tmp_path / "elsewhere"
    assert cli("runs", "init", "r", "--cap", "1", "--runs-dir", str(other)).exit_code == 0
    assert (other / "r" / "events.ndjson").is_file()
    assert not runs_dir.exists()
    assert cli("reserve", "r", "t", "-e", "1", "--runs-dir", str(other)).exit_code == 0
    assert_error(cli("reserve", "r", "t", "-e", "1", "--json"), 2, "unknown_run")


# ---------------------------------------------------------------------- every exit code


def test_exit_2_bad_input(cli: Any, store: Location, run10: str) -> None:
    assert_error(cli("reserve", run10, "t", "--estimate", "1e2", "--json"), 2, "invalid_amount")
    assert_error(cli("reserve", run10, "../x", "--estimate", "1", "--json"), 2, "invalid_id")
    payload = assert_error(cli("reserve", "ghost", "t", "--estimate", "1", "--json"), 2, "unknown_run")
    assert "ghost" in payload["message"]
    usage = cli("reserve", run10, "t")  # missing --estimate
    assert usage.exit_code == 2
    assert len(usage.stderr.splitlines()) == 1 and "--estimate" in usage.stderr


def test_exit_3_refused(cli: Any, run10: str, store: Location) -> None:
    assert cli("reserve", run10, "a", "--estimate", "5").exit_code == 0
    assert cli("reserve", run10, "b", "--estimate", "5").exit_code == 0
    payload = assert_error(cli("reserve", run10, "c", "--estimate", "0.01", "--json"), 3, "over_budget")
    assert (payload["task"], payload["requested_micros"], payload["remaining_micros"]) == ("c", 10_000, 0)
    halt = orjson.loads(log_bytes(store, run10).splitlines()[-1])
    assert (halt["type"], halt["task"], halt["reason"]) == ("halt", "c", "run_cap")
    # A halted task is terminal: asking again is exit 3 and appends nothing.
    before = log_bytes(store, run10)
    again = cli("reserve", run10, "c", "--estimate", "0.01")
    assert again.exit_code == 3 and "halted" in again.stderr
    assert log_bytes(store, run10) == before


def test_exit_4_pending_escalation(cli: Any, store: Location) -> None:
    assert cli("runs", "init", "e", "--cap", "10", "--escalation", "enforce").exit_code == 0
    assert cli("reserve", "e", "a", "--estimate", "8").exit_code == 0
    payload = assert_error(cli("reserve", "e", "b", "--estimate", "5", "--json"), 4, "escalation_open")
    escalation_id = payload["escalation_id"]
    before = log_bytes(store, "e")
    # Asking again meets the same escalation and appends nothing.
    again = assert_error(cli("reserve", "e", "b", "--estimate", "5", "--json"), 4, "escalation_open")
    assert again["escalation_id"] == escalation_id
    assert log_bytes(store, "e") == before
    show = one_json_object(cli("runs", "show", "e", "--json").stdout)
    [escalation] = show["escalations"]
    assert escalation.keys() >= ESCALATION_KEYS
    assert (escalation["id"], escalation["task"], escalation["state"]) == (escalation_id, "b", "open")


def test_exit_5_conflicts(cli: Any, run10: str, store: Location) -> None:
    cli("reserve", run10, "t", "--estimate", "2")
    before = log_bytes(store, run10)
    different = assert_error(cli("reserve", run10, "t", "--estimate", "3", "--json"), 5, "conflict")
    assert "$2.00" in different["message"] and "$3.00" in different["message"]  # names both values
    lower = assert_error(cli("increase", run10, "t", "--to", "1", "--json"), 5, "conflict")
    assert "$2.00" in lower["message"] and "$1.00" in lower["message"]
    nothing = assert_error(cli("release", run10, "never", "--actual", "1", "--json"), 5, "conflict")
    assert "unknown" in nothing["message"]
    assert_error(cli("increase", run10, "never", "--to", "1", "--json"), 5, "conflict")
    assert log_bytes(store, run10) == before
    cli("release", run10, "t", "--actual", "1")
    reused = assert_error(cli("reserve", run10, "t", "--estimate", "2", "--json"), 5, "conflict")
    assert "released" in reused["message"]
    settled = assert_error(cli("release", run10, "t", "--actual", "1.5", "--json"), 5, "conflict")
    assert "$1.00" in settled["message"] and "$1.50" in settled["message"]


@pytest.mark.parametrize("damage", ["unparsable", "edited-amount"])
def test_exit_6_corrupt_ledger_refuses_to_write(cli: Any, run10: str, runs_dir: Path, damage: str) -> None:
    for task in ("a", "b", "c"):
        cli("reserve", run10, task, "--estimate", "1")
    log = log_of(runs_dir, run10)
    lines = log.read_bytes().splitlines(keepends=True)
    assert len(lines) == 4
    if damage == "unparsable":
        lines[2] = b'{"v":1,"seq":3,' + b"\n"
        bad_line = 3
    else:
        lines[2] = lines[2].replace(b'"amount_micros":1000000', b'"amount_micros":1')
        bad_line = 4  # the next line's prev no longer matches
    log.write_bytes(b"".join(lines))
    before = log.read_bytes()
    for args in (["reserve", run10, "d", "--estimate", "1"], ["increase", run10, "a", "--to", "2"],
                 ["release", run10, "a", "--actual", "1"]):
        payload = assert_error(cli(*args, "--json"), 6, "corrupt_ledger")
        assert payload["line"] == bad_line
        assert f"line {bad_line}" in payload["message"]
        human = cli(*args)
        assert human.exit_code == 6 and f"line {bad_line}" in human.stderr
    assert log.read_bytes() == before


def test_exit_7_lock_timeout(cli: Any, run10: str, runs_dir: Path, lock_holder: Any) -> None:
    lock_file = runs_dir / run10 / "events.ndjson.lock"
    before = log_of(runs_dir, run10).read_bytes()
    with lock_holder(lock_file):
        for args in (["reserve", run10, "t", "--estimate", "1"], ["increase", run10, "t", "--to", "2"],
                     ["release", run10, "t", "--actual", "1"]):
            payload = assert_error(cli(*args, "--lock-timeout", "0.1", "--json"), 7, "lock_timeout")
            assert str(lock_file) in payload["message"]
            human = cli(*args, "--lock-timeout", "100ms")
            assert human.exit_code == 7 and str(lock_file) in human.stderr
    assert log_of(runs_dir, run10).read_bytes() == before
    assert cli("reserve", run10, "t", "--estimate", "1", "--lock-timeout", "5").exit_code == 0


def test_exit_7_from_the_environment(cli: Any, run10: str, runs_dir: Path, lock_holder: Any,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESCALATE_LOCK_TIMEOUT", "0.1")
    with lock_holder(runs_dir / run10 / "events.ndjson.lock"):
        assert cli("reserve", run10, "t", "--estimate", "1").exit_code == 7


# ---------------------------------------------------------------------- the installed entry point


def test_installed_entry_point(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("escalate")
    command = [str(script)] if script.is_file() else [shutil.which("escalate") or "escalate"]
    env = {**os.environ, "ESCALATE_RUNS_DIR": str(tmp_path / "runs"), "ESCALATE_ACTOR": "ci"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*command, *args], capture_output=True, text=True, env=env,
                              timeout=60, check=False)

    assert run("runs", "init", "ep", "--cap", "5").returncode == 0
    assert run("reserve", "ep", "t", "--estimate", "2").returncode == 0
    released = run("release", "ep", "t", "--actual", "1.5", "--json")
    assert released.returncode == 0
    assert one_json_object(released.stdout)["status"] == "released"
    shown = run("runs", "show", "ep", "--json")
    assert shown.returncode == 0
    show = one_json_object(shown.stdout)
    assert (show["spent_micros"], show["reserved_micros"], show["remaining_micros"]) == (
        1_500_000, 0, 3_500_000)
    refused = run("reserve", "ep", "u", "--estimate", "4", "--json")
    assert refused.returncode == 3
    assert one_json_object(refused.stdout)["error"] == "over_budget"
    assert len(refused.stderr.splitlines()) == 1
    # python -m escalate is the same program.
    module = subprocess.run([sys.executable, "-m", "escalate", "runs", "show", "ep", "--json"],
                            capture_output=True, text=True, env=env, timeout=60, check=False)
    assert module.returncode == 0
    assert one_json_object(module.stdout)["spent_micros"] == 1_500_000


# What a hot command loads: a shell loop pays each process's start-up.
_HOT_START = """
import sys
from escalate.cli import main
sys.argv = ["escalate", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in {
        "getpass", "termios", "rich", "pydantic", "psycopg", "queue", "escalate"})
    print(" ".join(loaded), exit.code)
"""


def test_a_reserve_process_loads_only_what_a_reserve_uses(runs_dir: Path) -> None:
    """``escalate reserve`` (and increase, release) loads no notice delivery, no pool, report
    or PostgreSQL module, no policy change's rules or settings, no rich, pydantic, getpass or
    termios (the OS user is read without them), no ``queue`` (only a wait for the lock needs
    it), and typer builds its one command only, with no shell completion's options."""
    from escalate.cli import build_app

    env = {key: value for key, value in os.environ.items()
           if key not in {"LOGNAME", "USER", "LNAME", "USERNAME", "ESCALATE_ACTOR"}}
    run = [sys.executable, "-c", _HOT_START]
    assert subprocess.run([*run, "runs", "init", "r", "--cap", "10", "--runs-dir", str(runs_dir)],
                          env=env, capture_output=True, text=True, check=True).stdout.endswith(" 0\n")
    for command in (["reserve", "r", "t", "-e", "1"], ["increase", "r", "t", "--to", "2"],
                    ["release", "r", "t", "-a", "1"]):
        done = subprocess.run([*run, *command, "--runs-dir", str(runs_dir)], env=env,
                              capture_output=True, text=True, check=True)
        *loaded, code = done.stdout.splitlines()[-1].split()
        assert code == "0", done.stderr
        assert not {"getpass", "termios", "rich", "pydantic", "psycopg", "queue"} & set(loaded), loaded
        unused = ("escalate.escalation.", "escalate.pools", "escalate.reports", "escalate.stores.postgres",
                  "escalate.results", "escalate.core.policy", "escalate.settings", "escalate._version")
        assert not [name for name in loaded if name.startswith(unused)], loaded
        app = build_app(["ledger_cmds"], only=command[0])
        assert [info.callback.__name__ for info in app.registered_commands if info.callback] == [command[0]]
        # Its first word is the command's name: it builds no root option (--version, completion).
        assert [param.name for param in typer.main.get_command(app).params] == []


# As the console script starts (escalate.__main__.main), counting the collections that ran
# before anything was frozen.
_COLLECTOR = """
import gc, sys
unfrozen = []  # per collection: whether nothing was frozen yet
gc.callbacks.append(lambda phase, info: phase == "start" and unfrozen.append(gc.get_freeze_count() == 0))
from escalate.__main__ import main
sys.argv = ["escalate", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    from escalate.service import Ledger
    listed = {id(thing) for thing in gc.get_objects()}  # the frozen are not listed
    lock = sys.modules.get("escalate.stores.file.lock")
    walked = [id(Ledger.reserve) in listed, lock is None or id(vars(lock)) in listed]
    print(gc.isenabled(), gc.get_freeze_count(), sum(unfrozen), *walked, exit.code)
"""


def test_a_command_keeps_what_start_up_loaded_out_of_the_collectors_walks(runs_dir: Path) -> None:
    """What a command loaded before it runs (typer, click, the CLI; for a hot command, the
    library too, and on a runs folder the file store and its lock) lives until the process
    exits: no collection walks it while it loads (the collector is paused from the console
    script's first import), it is frozen out of the collector's walks (each full
    collection's, and the last one at exit), and the collector is on for everything the
    command makes."""
    run = [sys.executable, "-c", _COLLECTOR]
    for command, library in ((["runs", "init", "r", "--cap", "10"], "True"),
                             (["reserve", "r", "t", "-e", "1"], "False")):
        done = subprocess.run([*run, *command, "--runs-dir", str(runs_dir)], capture_output=True,
                              text=True, check=True)
        enabled, frozen, collected, *walked, code = done.stdout.splitlines()[-1].split()
        assert (enabled, code) == ("True", "0"), done.stderr
        assert int(frozen) > 10_000  # typer and click alone make tens of thousands
        assert collected == "0", command
        assert walked == [library, library], command


def test_importing_the_package_loads_no_typing() -> None:
    """The console script imports ``escalate`` before its entry pauses the collector:
    ``typing`` (which typer loads later, while the collector is paused) is not loaded then."""
    code = "import sys; import escalate; print('typing' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False"]


def test_a_reserve_on_postgresql_loads_its_store_not_the_file_stores_before_it_runs(runs_dir: Path) -> None:
    """A hot command whose store is a URL (given, or ESCALATE_STORE) loads the PostgreSQL
    store (and psycopg) with its start-up, frozen out of the collector's walks with it, and
    not the file store and ``filelock``: nothing there would use them."""
    probe = ("import gc, sys\nfrom escalate.__main__ import main\nsys.argv = ['escalate', *sys.argv[1:]]\n"
             "try:\n    main()\nfinally:\n    listed = {id(thing) for thing in gc.get_objects()}\n"
             "    walked = id(vars(sys.modules['psycopg'])) in listed\n"
             "    print('filelock' in sys.modules, walked, file=sys.stderr)\n")
    url = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"
    env = {key: value for key, value in os.environ.items() if not key.startswith("ESCALATE_")}
    for given, environment in ((["--store", url], {}), ([f"--store={url}"], {}),
                               ([], {"ESCALATE_STORE": url})):
        done = subprocess.run([sys.executable, "-c", probe, "reserve", "r", "t", "-e", "1", *given],
                              capture_output=True, text=True, timeout=60, check=False,
                              env={**env, **environment})
        assert done.returncode != 0 and "escalate: " in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1] == "False False", (given, done.stderr)


def test_a_reserve_on_postgresql_without_psycopg_says_which_extra_to_install(runs_dir: Path) -> None:
    """Start-up loads a URL's store before the command runs; without psycopg that fails
    quietly there, and the command reports it as ever: one line, exit 2."""
    code = ("import sys; sys.modules['psycopg'] = None\nfrom escalate.__main__ import main\n"
            "sys.argv = ['escalate', *sys.argv[1:]]\nmain()\n")
    done = subprocess.run([sys.executable, "-c", code, "reserve", "r", "t", "-e", "1", "--store",
                           "postgresql://nobody@127.0.0.1:1/none"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "escalate: the PostgreSQL store needs psycopg: pip install 'escalate-ledger[postgres]'"]


_BUILT_ON_IMPORT = """
import dataclasses, sys, typing
from escalate.cli import main
kind = {"dataclass": dataclasses.is_dataclass, "typeddict": typing.is_typeddict,
        "namedtuple": lambda value: issubclass(value, tuple) and hasattr(value, "_fields")}[sys.argv[1]]
sys.argv = ["escalate", *sys.argv[2:]]
try:
    main()
except SystemExit as exit:
    built = sorted(f"{module.__name__}.{name}" for module in list(sys.modules.values())
                   if module.__name__.startswith("escalate") for name, value in vars(module).items()
                   if isinstance(value, type) and value.__module__ == module.__name__ and kind(value))
    print(" ".join(built), exit.code)
"""


def _built_by_a_reserve(runs_dir: Path, kind: str) -> list[str]:
    """The classes of ``kind`` (dataclass, typeddict) a reserve process has built."""
    run = [sys.executable, "-c", _BUILT_ON_IMPORT, kind]
    subprocess.run([*run, "runs", "init", "r", "--cap", "10", "--runs-dir", str(runs_dir)], check=True,
                   capture_output=True)
    done = subprocess.run([*run, "reserve", "r", "t", "-e", "1", "--runs-dir", str(runs_dir)],
                          capture_output=True, text=True, check=True)
    *built, code = done.stdout.splitlines()[-1].split()
    assert code == "0", done.stderr
    return built


def test_a_reserve_process_builds_no_dataclass(runs_dir: Path) -> None:
    """A dataclass is built on import (its ``__init__``, ``__repr__`` and ``__eq__`` compiled
    from generated source, about 0.3–1 ms each): a reserve builds none, neither the fold's
    state's, the policy settings', the decision's, the request's nor the replay's."""
    assert _built_by_a_reserve(runs_dir, "dataclass") == []


def test_a_reserve_process_builds_no_named_tuple_of_the_pure_core(runs_dir: Path) -> None:
    """A ``NamedTuple`` is built on import (each annotation compiled from its text, its
    methods generated, about 0.2 ms): the core's request is a plain slotted class."""
    built = _built_by_a_reserve(runs_dir, "namedtuple")
    assert [name for name in built if name.startswith("escalate.core.")] == [], built


def test_the_errors_facts_are_built_from_evaluated_annotations(runs_dir: Path) -> None:
    """A TypedDict is built on import: one whose annotations are text compiles each of them
    (a ``ForwardRef``). Every command loads the errors' facts (one per error class that takes
    facts), so they are built from evaluated annotations."""
    import typing

    from escalate import errors

    facts = [name.removeprefix("escalate.errors.") for name in _built_by_a_reserve(runs_dir, "typeddict")
             if name.startswith("escalate.errors.")]
    assert len(facts) >= 8, facts
    texts = {name: hint for name in facts for hint in vars(errors)[name].__annotations__.values()
             if isinstance(hint, typing.ForwardRef)}
    assert texts == {}
