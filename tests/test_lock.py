"""The run lock: a kernel-queued flock bounded by a timer in the main thread, a polling
wait elsewhere, and neither may disturb what the host program does with SIGALRM."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from escalate import Ledger, LockTimeout
from escalate.log import _timer_is_ours


def _timeout_in_thread(runs_dir: Path) -> BaseException | None:
    caught: list[BaseException | None] = [None]

    def attempt() -> None:
        try:
            Ledger.open(runs_dir, "r", lock_timeout=0.2).reserve("t", "1")
        except BaseException as error:  # handed to the test thread
            caught[0] = error

    worker = threading.Thread(target=attempt)
    worker.start()
    worker.join(30)
    assert not worker.is_alive()
    return caught[0]


def test_a_thread_that_is_not_main_waits_by_polling_and_times_out(runs_dir: Path,
                                                                   lock_holder: Any) -> None:
    Ledger.init(runs_dir, "r", cap="10")
    with lock_holder(runs_dir / "r" / "events.ndjson.lock"):
        error = _timeout_in_thread(runs_dir)
    assert isinstance(error, LockTimeout) and error.exit_code == 7
    assert Ledger.open(runs_dir, "r").reserve("t", "1")["status"] == "reserved"


def test_the_main_thread_timer_is_restored_and_a_host_handler_is_left_alone(
        runs_dir: Path, lock_holder: Any) -> None:
    Ledger.init(runs_dir, "r", cap="10")
    lock = runs_dir / "r" / "events.ndjson.lock"
    assert _timer_is_ours()
    with lock_holder(lock):
        started = time.monotonic()
        with pytest.raises(LockTimeout):
            Ledger.open(runs_dir, "r", lock_timeout=0.3).reserve("t", "1")
        assert time.monotonic() - started >= 0.3
    # The blocking wait put everything back: default handler, no timer left running.
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)

    fired: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    try:
        assert not _timer_is_ours()  # the host owns SIGALRM: escalate polls instead
        with lock_holder(lock), pytest.raises(LockTimeout):
            Ledger.open(runs_dir, "r", lock_timeout=0.2).reserve("t", "1")
        assert signal.getsignal(signal.SIGALRM) is not signal.SIG_DFL
        assert fired == []
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert Ledger.open(runs_dir, "r").reserve("t", "1")["status"] == "reserved"


def test_a_zero_timeout_tries_once(runs_dir: Path, lock_holder: Any) -> None:
    Ledger.init(runs_dir, "r", cap="10")
    with lock_holder(runs_dir / "r" / "events.ndjson.lock"), pytest.raises(LockTimeout):
        Ledger.open(runs_dir, "r", lock_timeout=0).reserve("t", "1")


def test_threads_sharing_one_ledger_take_turns(runs_dir: Path) -> None:
    from escalate import Refused

    run = Ledger.init(runs_dir, "r", cap="50")
    start = threading.Barrier(4)
    outcomes: list[str] = []

    def worker(number: int) -> None:
        start.wait()
        for task in range(25):
            try:
                outcomes.append(run.reserve(f"w{number}-{task}", "1")["status"])
            except Refused:
                outcomes.append("halted")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(set(outcomes)) == ["halted", "reserved"]
    assert outcomes.count("reserved") == 50 and outcomes.count("halted") == 50
    report = Ledger.open(runs_dir, "r").verify()
    assert report.problems == [] and report.lines == 101
    assert report.state.reserved_micros == 50_000_000
