"""The run lock: filelock's OS lock on the sidecar, waited for in the kernel's queue with a deadline.

The library installs no signal handler and no timer and never pauses the garbage collector,
so a host program that blocks or uses SIGALRM, or counts on its collector, is not disturbed.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from escalate import Ledger, LockTimeout

_BLOCKED_SIGALRM_HOST = """
import signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
from escalate.cli import main
sys.argv = ["escalate", *sys.argv[1:]]
main()
"""


def test_a_host_with_sigalrm_blocked_still_times_out_after_the_lock_timeout(
        runs_dir: Path, lock_holder: Any) -> None:
    Ledger.init(runs_dir, "r", cap="10")
    lock = runs_dir / "r" / "events.ndjson.lock"
    argv = [sys.executable, "-c", _BLOCKED_SIGALRM_HOST, "reserve", "r", "t", "--estimate", "1",
            "--lock-timeout", "1", "--json"]
    with lock_holder(lock):
        started = time.monotonic()
        # (A wait that ignores its timeout would last until the holder lets go: the 30 s here.)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        took = time.monotonic() - started
    assert done.returncode == 7, done.stderr
    assert str(lock) in done.stderr and "escalate: lock" in done.stderr
    assert 1.0 <= took < 10, took
    assert Ledger.open(runs_dir, "r").state().tasks == {}


def _sample_host_state(stop: threading.Event, seen: list[tuple[Any, tuple[float, float], bool]]) -> None:
    while not stop.is_set():
        seen.append((signal.getsignal(signal.SIGALRM), signal.getitimer(signal.ITIMER_REAL), gc.isenabled()))


def test_a_library_call_installs_no_handler_or_timer_and_leaves_gc_on(runs_dir: Path,
                                                                       lock_holder: Any) -> None:
    run = Ledger.init(runs_dir, "r", cap="1000")
    for task in range(200):
        run.reserve(f"t{task}", "1")
    clean = (signal.SIG_DFL, (0.0, 0.0), True)

    # While the main thread waits for a lock another process holds:
    seen: list[tuple[Any, tuple[float, float], bool]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_host_state, args=(stop, seen))
    with lock_holder(runs_dir / "r" / "events.ndjson.lock"):
        sampler.start()
        try:
            with pytest.raises(LockTimeout):
                Ledger.open(runs_dir, "r", lock_timeout=0.5).reserve("late", "1")
        finally:
            stop.set()
            sampler.join()
    assert len(seen) > 10 and set(seen) == {clean}

    # While a replay folds the log (the progress callback runs inside the fold):
    during_replay: list[tuple[Any, tuple[float, float], bool]] = []
    reader = Ledger.open(runs_dir, "r")
    (runs_dir / "r" / "events.ndjson.cache.sqlite").unlink(missing_ok=True)
    reader.progress = lambda done, total: during_replay.append(
        (signal.getsignal(signal.SIGALRM), signal.getitimer(signal.ITIMER_REAL), gc.isenabled()))
    assert reader.verify().lines == 201
    assert during_replay and set(during_replay) == {clean}


def test_a_host_sigalrm_handler_is_never_called_or_replaced(runs_dir: Path, lock_holder: Any) -> None:
    Ledger.init(runs_dir, "r", cap="10")
    fired: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    try:
        with lock_holder(runs_dir / "r" / "events.ndjson.lock"), pytest.raises(LockTimeout):
            Ledger.open(runs_dir, "r", lock_timeout=0.3).reserve("t", "1")
        assert fired == [] and signal.getsignal(signal.SIGALRM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert Ledger.open(runs_dir, "r").reserve("t", "1")["status"] == "reserved"


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


def test_a_thread_that_is_not_main_times_out_too(runs_dir: Path, lock_holder: Any) -> None:
    Ledger.init(runs_dir, "r", cap="10")
    with lock_holder(runs_dir / "r" / "events.ndjson.lock"):
        error = _timeout_in_thread(runs_dir)
    assert isinstance(error, LockTimeout) and error.exit_code == 7
    assert Ledger.open(runs_dir, "r").reserve("t", "1")["status"] == "reserved"


def test_a_zero_timeout_tries_once(runs_dir: Path, lock_holder: Any) -> None:
    Ledger.init(runs_dir, "r", cap="10")
    with lock_holder(runs_dir / "r" / "events.ndjson.lock"), pytest.raises(LockTimeout):
        Ledger.open(runs_dir, "r", lock_timeout=0).reserve("t", "1")


def test_the_lock_file_is_kept_as_it_is(runs_dir: Path) -> None:
    run = Ledger.init(runs_dir, "r", cap="10")
    lock = runs_dir / "r" / "events.ndjson.lock"
    lock.write_bytes(b"left by someone")  # escalate never truncates, replaces or deletes it
    inode = lock.stat().st_ino
    run.reserve("t", "1")
    assert lock.read_bytes() == b"left by someone" and lock.stat().st_ino == inode


def test_reading_commands_do_not_import_filelock(runs_dir: Path) -> None:
    run = Ledger.init(runs_dir, "r", cap="10")
    run.reserve("t", "1")
    probe = ("import sys\nfrom escalate.cli import main\nsys.argv = ['escalate', *sys.argv[1:]]\n"
             "try:\n    main()\nfinally:\n    print('filelock' in sys.modules, file=sys.stderr)\n")
    for args, loaded in ((["runs", "show", "r", "--json"], "False"),
                         (["reserve", "r", "t", "--estimate", "1"], "True")):
        done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True,
                              timeout=60, check=False, env={**os.environ})
        assert done.returncode == 0, done.stderr
        assert done.stderr.strip().splitlines()[-1] == loaded, (args, done.stderr)


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


# ---------------------------------------------------------------------- waiting in the kernel's queue


@pytest.fixture
def ctrl_c_raises() -> Any:
    """SIGINT raising KeyboardInterrupt in this process, as in a terminal, for the test: a
    suite started in the background by a shell inherits SIGINT ignored, and Python then
    installs no handler for it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _lock_descriptors(lock_path: Path) -> int:
    """This process's open descriptors on ``lock_path``."""
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(lock_path.resolve()))


def test_a_waiter_sleeps_in_the_kernels_queue_and_is_woken_when_the_holder_lets_go(
        runs_dir: Path, lock_holder: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two tries without blocking, then no polling: the kernel hands the lock over when its
    holder (another process) dies."""
    from escalate.stores.file import lock

    Ledger.init(runs_dir, "r", cap="10")
    tries: list[dict[str, Any]] = []
    real = lock.lock_descriptor

    def counted(fd: int, **options: Any) -> bool:
        tries.append(options)
        return real(fd, **options)

    monkeypatch.setattr(lock, "lock_descriptor", counted)
    run = Ledger.open(runs_dir, "r", lock_timeout=60)
    with lock_holder(runs_dir / "r" / "events.ndjson.lock") as holder:
        killer = threading.Timer(0.5, holder.kill)
        killer.start()
        started = time.monotonic()
        assert run.reserve("t", "1")["status"] == "reserved"
        took = time.monotonic() - started
        killer.join()
    # One try, and one more after giving up the CPU, however long the wait (a polling wait
    # tried about a thousand times here).
    assert tries == [{"blocking": False}] * 2
    assert 0.5 <= took < 30, took
    assert Ledger.open(runs_dir, "r").verify().lines == 2


def test_a_lock_let_go_while_the_waiter_gave_up_the_cpu_is_taken_without_queueing(
        runs_dir: Path, lock_holder: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A waiter gives up the CPU once and tries again before it queues on a helper thread: a
    holder that let go meanwhile (here it dies while the waiter yields) hands the lock over
    with no thread in between."""
    from escalate.stores.file import lock

    Ledger.init(runs_dir, "r", cap="10")
    run = Ledger.open(runs_dir, "r", lock_timeout=60)
    yields: list[int] = []

    def queued(fd: int) -> Any:
        raise AssertionError("the waiter queued on a helper thread")

    monkeypatch.setattr(lock, "Waiter", queued)
    with lock_holder(runs_dir / "r" / "events.ndjson.lock") as holder:
        def holder_lets_go() -> None:
            yields.append(1)
            holder.kill()
            holder.join()  # (the kernel has released its lock: the process is gone)

        monkeypatch.setattr(lock.os, "sched_yield", holder_lets_go)
        assert run.reserve("t", "1")["status"] == "reserved"
    assert yields == [1]
    assert Ledger.open(runs_dir, "r").verify().lines == 2


def test_the_caller_is_woken_only_once_its_helper_is_idle_again(
        runs_dir: Path, lock_holder: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper granted the lock wakes its caller as the last thing it does before it
    sleeps again, kept for the next wait: the woken caller never waits for the helper to let
    go of the interpreter while the lock is held."""
    from escalate.stores.file import lock

    Ledger.init(runs_dir, "r", cap="10")
    lock_path = runs_dir / "r" / "events.ndjson.lock"
    seen: list[bool] = []

    class Wake:  # the caller's wake-up, watched
        def __init__(self, real: Any, holder: Any) -> None:
            self.real, self.holder = real, holder

        def acquire(self, **options: Any) -> bool:
            if self.holder.is_alive():  # the caller is queued: the holder lets go now
                self.holder.kill()
                self.holder.join()
            return bool(self.real.acquire(**options))

        def release(self) -> None:  # (called on the helper's thread)
            seen.append(any(helper.thread is threading.current_thread() for helper in lock._IDLE))
            self.real.release()

    class Watched(lock.Waiter):
        def __init__(self, fd: int) -> None:
            super().__init__(fd)
            self.wake = Wake(self.wake, holder)  # type: ignore[assignment]

    monkeypatch.setattr(lock, "Waiter", Watched)
    monkeypatch.setattr(lock, "_tried_after_yield", lambda fd: False, raising=False)
    with lock_holder(lock_path) as holder:
        assert Ledger.open(runs_dir, "r", lock_timeout=60).reserve("t", "1")["status"] == "reserved"
    assert seen == [True]


@pytest.mark.parametrize("gives_up", ["deadline", "KeyboardInterrupt"])
def test_a_waiter_that_gave_up_lets_the_lock_go_as_soon_as_it_is_granted(
        runs_dir: Path, lock_holder: Any, gives_up: str, ctrl_c_raises: None) -> None:
    """The helper thread still queued after the caller gave up takes the lock when the
    holder lets go and releases it at once: no lock held, no descriptor left open, no
    ``flock`` call left waiting (the helper is idle again, kept for the next wait), and the
    run takes the next write without waiting."""
    from escalate.stores.file import lock

    Ledger.init(runs_dir, "r", cap="10")
    lock_path = runs_dir / "r" / "events.ndjson.lock"
    with lock_holder(lock_path):
        if gives_up == "deadline":
            with pytest.raises(LockTimeout):
                Ledger.open(runs_dir, "r", lock_timeout=0.2).reserve("t", "1")
        else:  # Ctrl-C in the host while its main thread waits
            interrupt = threading.Timer(0.3, signal.pthread_kill,
                                        (threading.main_thread().ident, signal.SIGINT))
            interrupt.start()
            with pytest.raises(KeyboardInterrupt):
                Ledger.open(runs_dir, "r", lock_timeout=60).reserve("t", "1")
            interrupt.join()
        helpers = [t for t in threading.enumerate() if t.name == "escalate-lock-waiter"]
        assert helpers and all(t.daemon for t in helpers)
        assert len(lock._IDLE) == len(helpers) - 1  # one queued still: the lock is held
        assert _lock_descriptors(lock_path) == 1  # the helper's, and only while it waits
    deadline = time.monotonic() + 30
    while len(lock._IDLE) < len(helpers):  # the queued one is granted, lets go, goes idle
        assert time.monotonic() < deadline, "the helper never got the lock it was queued for"
        time.sleep(0.01)
    assert all(t.is_alive() for t in helpers)
    assert _lock_descriptors(lock_path) == 0
    probe = ("import fcntl, sys\nwith open(sys.argv[1], 'rb') as f:\n"
             "    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n")
    free = subprocess.run([sys.executable, "-c", probe, str(lock_path)], check=False, timeout=60)
    assert free.returncode == 0
    assert Ledger.open(runs_dir, "r", lock_timeout=0).reserve("t", "1")["status"] == "reserved"
    assert Ledger.open(runs_dir, "r").state().tasks["t"].reserved_micros == 1_000_000


def test_a_ctrl_c_that_lands_before_the_caller_sleeps_is_acted_on_at_once_not_at_the_deadline(
        runs_dir: Path, lock_holder: Any, monkeypatch: pytest.MonkeyPatch, ctrl_c_raises: None) -> None:
    """A SIGINT whose handler runs without waking the caller's sleep (it lands just before
    the caller goes to sleep on its lock; here it is sent to the helper thread once the
    caller sleeps, so the caller's sleep is not interrupted, deterministically) raises
    KeyboardInterrupt within a slice of the wait (SIGNAL_SLICE_S), not when the lock timeout
    runs out; the helper still lets the lock go when it is granted."""
    from escalate.stores.file import lock

    Ledger.init(runs_dir, "r", cap="10")
    lock_path = runs_dir / "r" / "events.ndjson.lock"
    asleep, handed = threading.Event(), []

    class Wake:  # the caller's wake-up, watched: set once the caller goes to sleep on it
        def __init__(self, real: Any) -> None:
            self.real = real

        def acquire(self, **options: Any) -> bool:
            asleep.set()
            return bool(self.real.acquire(**options))

        def release(self) -> None:
            self.real.release()

    class Watched(lock.Waiter):
        def __init__(self, fd: int) -> None:
            super().__init__(fd)
            self.wake = Wake(self.wake)  # type: ignore[assignment]

    real_take = lock._Helper.take

    def take() -> Any:
        handed.append(real_take())
        return handed[-1]

    def interrupt_the_helper() -> None:
        assert asleep.wait(30)
        signal.pthread_kill(handed[0].thread.ident, signal.SIGINT)  # type: ignore[arg-type]

    monkeypatch.setattr(lock, "Waiter", Watched)
    monkeypatch.setattr(lock._Helper, "take", staticmethod(take))
    with lock_holder(lock_path):
        sender = threading.Thread(target=interrupt_the_helper)
        started = time.monotonic()
        sender.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                Ledger.open(runs_dir, "r", lock_timeout=20).reserve("t", "1")
            waited = time.monotonic() - started
        finally:
            sender.join()
    monkeypatch.undo()
    assert waited < 10, f"the caller slept {waited:.1f} s on a Ctrl-C"
    assert Ledger.open(runs_dir, "r", lock_timeout=30).reserve("t", "1")["status"] == "reserved"


def test_a_ctrl_c_right_after_the_wait_is_handed_over_leaves_the_helper_its_descriptor(
        runs_dir: Path, lock_holder: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A KeyboardInterrupt raised the moment the hand-over to the helper returns (a Ctrl-C
    landing during it) gives the wait up like one raised while the caller sleeps: the
    helper, not the caller, closes the duplicate descriptor it was handed, lets the lock go
    when granted and goes idle again; no descriptor is closed twice."""
    from escalate.stores.file import lock

    Ledger.init(runs_dir, "r", cap="10")
    lock_path = runs_dir / "r" / "events.ndjson.lock"

    class Interrupted:  # a helper's request queue whose put is followed by a Ctrl-C
        def __init__(self, real: Any) -> None:
            self.real = real

        def put(self, waiter: Any) -> None:
            self.real.put(waiter)
            raise KeyboardInterrupt

        def get(self) -> Any:
            return self.real.get()

    real_take = lock._Helper.take

    def take() -> Any:
        helper = real_take()
        if not isinstance(helper.requests, Interrupted):
            helper.requests = Interrupted(helper.requests)
        return helper

    try:
        with lock_holder(lock_path):
            monkeypatch.setattr(lock._Helper, "take", staticmethod(take))
            with pytest.raises(KeyboardInterrupt):
                Ledger.open(runs_dir, "r", lock_timeout=20).reserve("t", "1")
            monkeypatch.undo()
            helpers = [t for t in threading.enumerate() if t.name == "escalate-lock-waiter"]
        deadline = time.monotonic() + 30
        while len(lock._IDLE) < len(helpers):  # the queued one is granted, lets go, goes idle
            assert time.monotonic() < deadline, "the helper never came back from the wait it was handed"
            time.sleep(0.01)
    finally:
        for helper in lock._IDLE:  # (the next tests' waits are handed over plainly)
            if isinstance(helper.requests, Interrupted):
                helper.requests = helper.requests.real
    assert all(t.is_alive() for t in helpers)
    assert _lock_descriptors(lock_path) == 0
    assert Ledger.open(runs_dir, "r", lock_timeout=0).reserve("t", "1")["status"] == "reserved"


def test_a_grant_at_the_deadline_is_either_the_callers_lock_or_released(tmp_path: Path) -> None:
    """The caller giving up and the kernel granting the helper race; whichever wins, the
    caller holds the lock exactly when it was told so, and nothing else holds it."""
    import fcntl

    from escalate.stores.file.lock import Waiter

    lock_path = tmp_path / "lock"
    lock_path.touch()
    outcomes = set()
    for _ in range(200):
        fd = os.open(lock_path, os.O_RDWR)
        try:
            waiter = Waiter(fd)
            granted = waiter.wait(time.monotonic())  # the deadline has passed: a race
            assert waiter.finished.acquire(timeout=30)
            with open(lock_path, "rb") as other:  # another open file: it conflicts with fd's
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    free = True
                except BlockingIOError:
                    free = False
            assert free is not granted, "the lock must be held exactly when it was granted"
            outcomes.add(granted)
        finally:
            os.close(fd)
    assert _lock_descriptors(lock_path) == 0
    assert outcomes  # (which outcomes occur is the scheduler's choice)


def test_a_child_forked_while_a_waiter_is_queued_does_not_keep_the_lock(runs_dir: Path,
                                                                         lock_holder: Any) -> None:
    """A host thread forks while another thread waits for the run lock: the child (alive
    long after) holds no copy of the wait's descriptors, so the lock is free once the
    waiter has written."""
    import multiprocessing

    from escalate.stores.file import lock

    Ledger.init(runs_dir, "r", cap="10")
    lock_path = runs_dir / "r" / "events.ndjson.lock"
    outcome: list[str] = []
    writer = threading.Thread(target=lambda: outcome.append(
        Ledger.open(runs_dir, "r", lock_timeout=60).reserve("t", "1")["status"]))
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,), daemon=True)
    with lock_holder(lock_path):
        writer.start()
        deadline = time.monotonic() + 30
        while not lock._QUEUED:  # (the descriptors of a wait under way)
            assert time.monotonic() < deadline, "the writer never queued for the lock"
            time.sleep(0.01)
        child.start()  # forked while the writer is queued
    try:
        writer.join(30)
        assert outcome == ["reserved"]
        probe = ("import fcntl, sys\nwith open(sys.argv[1], 'rb') as f:\n"
                 "    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n")
        free = subprocess.run([sys.executable, "-c", probe, str(lock_path)], check=False, timeout=60)
        assert child.is_alive()
        assert free.returncode == 0, "the forked child keeps the lock"
    finally:
        child.kill()
        child.join(30)


def test_a_process_keeps_its_helper_thread_for_the_next_wait(runs_dir: Path, lock_holder: Any) -> None:
    """Waits one after another in one process are made by the same helper thread, not by a
    thread started for each (starting one cost more CPU than the rest of a wait)."""
    from escalate.stores.file import lock

    Ledger.init(runs_dir, "r", cap="10")
    lock_path = runs_dir / "r" / "events.ndjson.lock"
    seen = []
    for attempt in range(3):
        with lock_holder(lock_path), pytest.raises(LockTimeout):
            Ledger.open(runs_dir, "r", lock_timeout=0.2).reserve(f"t{attempt}", "1")
        deadline = time.monotonic() + 30
        while True:  # until its wait let go of the lock it was granted, and every helper is idle
            helpers = {t for t in threading.enumerate() if t.name == "escalate-lock-waiter"}
            if not lock._QUEUED and len(getattr(lock, "_IDLE", ())) == len(helpers):
                break
            assert time.monotonic() < deadline, "the helper never finished its wait"
            time.sleep(0.01)
        seen.append(helpers)  # (the Thread objects: an ident may be reused by a new thread)
    assert len(seen[0]) >= 1 and seen[0] == seen[1] == seen[2]
