"""Faults on the PostgreSQL store, as real processes (tests/pg_fault_driver.py) stopped at
every step of a command's transaction: the connection cut (``pg_terminate_backend``), the
writer killed (SIGKILL), the server stopped as if it crashed (``pg_ctl stop -m immediate``).

Whatever happens, the command either answers exit 8 (nothing was written; once its commit
was sent, the outcome may be unknown) or, cut after its commit, its answer; nothing partial
is ever stored; and retrying the same command settles it exactly once (one reservation,
never two), with ``runs verify`` clean and the independent audit of conftest passing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from tests.conftest import audit_log, log_bytes
from tests.pg_throwaway import ThrowawayServer

DRIVER = Path(__file__).with_name("pg_fault_driver.py")
# Every step escalate.stores.postgres.store reports, in the order a writing command passes them.
STEPS = ("connected", "locked", "loaded", "appended", "checkpointed", "before_commit", "committed")
# Who is the driver, among the server's backends (set in its URL).
DRIVER_APP = "escalate-fault-driver"
TIMEOUT_S = 60


def _with_app_name(url: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}application_name={DRIVER_APP}"


class Driver:
    """``escalate reserve RUN TASK -e 1 --json`` in its own process, held at ``step``."""

    def __init__(self, url: str, step: str, run_id: str, task: str) -> None:
        env = {**os.environ, "ESCALATE_STORE": _with_app_name(url), "ESCALATE_ACTOR": "driver"}
        env.pop("ESCALATE_RUNS_DIR", None)
        self.process = subprocess.Popen(
            [sys.executable, str(DRIVER), step, "reserve", run_id, task, "--estimate", "1", "--json",
             "--lock-timeout", "30s"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line != f"at {step}\n".encode():
            _, err = self.process.communicate(timeout=TIMEOUT_S)
            raise AssertionError(f"the driver never reached {step}: {line!r} {err.decode()}")

    def go_on(self) -> tuple[int, dict[str, Any], str]:
        """Let the command continue: (exit code, its JSON answer, its stderr)."""
        out, err = self.process.communicate(b"go\n", timeout=TIMEOUT_S)
        return self.process.returncode, orjson.loads(out), err.decode()


def _terminate_driver_backends(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as admin:
        rows = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE application_name = %s", (DRIVER_APP,)).fetchall()
    return sum(1 for (done,) in rows if done)


def _reservations(url: str, run_id: str, task: str) -> int:
    return sum(1 for event in audit_log(log_bytes(url, run_id)).of_type("budget_reserved")
               if event["task"] == task)


def _retry_settles(cli: Any, run_id: str, task: str, *, first_committed: bool) -> None:
    """The same command again: it reserves if the first never committed, else finds it."""
    again = cli("reserve", run_id, task, "--estimate", "1", "--json")
    assert again.exit_code == 0, again.stderr
    assert again.json()["status"] == ("exists" if first_committed else "reserved")


def _assert_clean(cli: Any, url: str, run_id: str) -> None:
    verified = cli("runs", "verify", run_id, "--json")
    assert verified.exit_code == 0, verified.stdout + verified.stderr
    audited = audit_log(log_bytes(url, run_id))  # seq 1..N, the chain, the cap at every prefix
    reserved = [event["task"] for event in audited.of_type("budget_reserved")]
    assert len(reserved) == len(set(reserved)), "a task was reserved twice"


@pytest.fixture
def pg_run(store: Any, cli: Any) -> str:
    """A run with room for every step's reservation, in the test's database (the tests below
    take only the PostgreSQL store: the file store's faults are test_killed_writers.py's)."""
    assert isinstance(store, str)
    assert cli("runs", "init", "faults", "--cap", "100").exit_code == 0
    return store


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
@pytest.mark.parametrize("step", STEPS)
def test_a_cut_connection_answers_8_and_a_retry_settles_once(pg_run: str, cli: Any, step: str) -> None:
    url, task = pg_run, f"cut-{step}"
    driver = Driver(url, step, "faults", task)
    before = log_bytes(url, "faults")
    assert _terminate_driver_backends(url) >= 1
    code, answer, stderr = driver.go_on()

    committed = step == "committed"
    if committed:
        # Cut after the commit: the reservation stands, whatever the answer says.
        assert code in (0, 8), stderr
        assert _reservations(url, "faults", task) == 1
    else:
        assert (code, answer["error"]) == (8, "store_unavailable"), stderr
        assert len(stderr.splitlines()) == 1, stderr  # one line, that says what to do
        line = stderr.strip()
        assert "/escalate_test_" in line
        # Cut while it still reads (no query follows the fold of this reserve but the one
        # that carries its writes and the commit), nothing was written; once that was sent,
        # the outcome may be unknown, and a retry is safe.
        sent = STEPS.index(step) >= STEPS.index("loaded")
        assert answer["commit_sent"] is sent
        assert ("may be unknown" in line and "safe" in line) is sent
        assert ("nothing was written" in line) is not sent
        assert log_bytes(url, "faults") == before  # nothing of the command was kept
    _retry_settles(cli, "faults", task, first_committed=committed)
    assert _reservations(url, "faults", task) == 1
    _assert_clean(cli, url, "faults")


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
@pytest.mark.parametrize("step", STEPS)
def test_a_writer_killed_mid_transaction_leaves_nothing_partial(pg_run: str, cli: Any, step: str) -> None:
    url, task = pg_run, f"killed-{step}"
    driver = Driver(url, step, "faults", task)
    before = log_bytes(url, "faults")
    os.kill(driver.process.pid, signal.SIGKILL)
    driver.process.communicate(timeout=TIMEOUT_S)
    assert driver.process.returncode == -signal.SIGKILL

    committed = step == "committed"
    # The server rolls back what a vanished client left uncommitted: all of it, or (after
    # the commit) none of it is lost.
    if committed:
        assert _reservations(url, "faults", task) == 1
    else:
        assert log_bytes(url, "faults") == before
    _retry_settles(cli, "faults", task, first_committed=committed)
    assert _reservations(url, "faults", task) == 1
    _assert_clean(cli, url, "faults")


@pytest.fixture(scope="module")
def crashable_server() -> Iterator[ThrowawayServer]:
    """A server of this module's own, durable as a real one: these tests stop it."""
    server = ThrowawayServer(durable=True)
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def crashable_url(crashable_server: ThrowawayServer, runs_dir: Path,
                  monkeypatch: pytest.MonkeyPatch) -> str:
    """The server's own database (each test makes a run of its own there), where CLI calls
    land too (after ``runs_dir`` set them up for a runs folder)."""
    monkeypatch.delenv("ESCALATE_RUNS_DIR")
    monkeypatch.setenv("ESCALATE_STORE", crashable_server.url())
    return crashable_server.url()


@pytest.mark.parametrize("step", STEPS)
def test_a_server_crash_mid_run_answers_8_then_retries_settle(
        crashable_server: ThrowawayServer, crashable_url: str, cli: Any, step: str) -> None:
    url, run_id, task = crashable_url, f"crash-{step}", "crashed"
    assert cli("runs", "init", run_id, "--cap", "100").exit_code == 0
    assert cli("reserve", run_id, "before", "--estimate", "1").exit_code == 0
    driver = Driver(url, step, run_id, task)
    before = log_bytes(url, run_id)
    crashable_server.stop("immediate")
    try:
        code, answer, stderr = driver.go_on()
        committed = step == "committed"
        if not committed:
            assert (code, answer["error"]) == (8, "store_unavailable"), stderr
        else:
            assert code in (0, 8), stderr
        # While the server is down, every command answers 8 and says a retry is safe.
        down = cli("reserve", run_id, task, "--estimate", "1", "--json")
        assert (down.exit_code, down.json()["error"]) == (8, "connection_failed")
        assert "nothing was written" in down.json()["message"]
    finally:
        crashable_server.start()
    # After the crash recovery: what was committed is there, nothing else is.
    if committed:
        assert _reservations(url, run_id, task) == 1
    else:
        assert log_bytes(url, run_id) == before
    _retry_settles(cli, run_id, task, first_committed=committed)
    _retry_settles(cli, run_id, task, first_committed=True)
    _assert_clean(cli, url, run_id)
    assert audit_log(log_bytes(url, run_id)).types == Counter(run_opened=1, budget_reserved=2)
