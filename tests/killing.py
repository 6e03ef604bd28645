"""The killer of the kill tests: real processes SIGKILLed at random moments.

Each slot runs a process that prints ``ready`` once it is past its imports and about to
write. Until ``enough(kills)`` holds (or, on a machine far too slow, the time limit is up),
at a random moment a ready process is killed, ``after_kill`` leaves whatever damage the test
wants (under the run's lock), and the slot is started again. A process that fails to start,
or exits by itself, fails the test.
"""

from __future__ import annotations

import random
import select
import signal
import subprocess
import time
from collections.abc import Callable

Spawn = Callable[[int], "subprocess.Popen[bytes]"]  # slot → a started process


def _failure(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stderr is not None
    return proc.stderr.read().decode()[-3000:]


def kill_storm(spawn: Spawn, slots: int, limit_s: float, rng: random.Random,
               after_kill: Callable[[], None], *, enough: Callable[[int], bool]) -> int:
    """Run ``slots`` processes from ``spawn`` and kill them at random until ``enough(kills)``
    holds, or at most ``limit_s`` seconds (a count, not a time, is what the tests need: a
    loaded machine starts fewer processes a second, a quiet one is done sooner); returns how
    many were killed. Every process is gone when this returns."""
    import pytest

    procs = [spawn(slot) for slot in range(slots)]
    ready = [False] * slots
    kills = 0
    limit = time.monotonic() + limit_s
    try:
        while not enough(kills) and time.monotonic() < limit:
            # A random moment for the next kill; meanwhile note the processes that finished
            # starting. Only a ready one (past its imports, in its loop) is killed.
            kill_at = time.monotonic() + rng.uniform(0.0, 0.3)
            while (wait := kill_at - time.monotonic()) > 0:
                starting = {procs[slot].stdout: slot for slot in range(slots) if not ready[slot]}
                readable, _, _ = select.select(list(starting), [], [], wait)
                for pipe in readable:
                    slot = starting[pipe]
                    if pipe is None or pipe.readline() != b"ready\n":
                        pytest.fail(f"process {slot} failed to start: {_failure(procs[slot])}")
                    ready[slot] = True
            candidates = [slot for slot in range(slots) if ready[slot]]
            if not candidates:
                continue
            slot = rng.choice(candidates)
            if procs[slot].poll() is not None:
                pytest.fail(f"process {slot} exited by itself: {_failure(procs[slot])}")
            procs[slot].send_signal(signal.SIGKILL)
            procs[slot].wait()
            kills += 1
            after_kill()
            procs[slot] = spawn(slot)
            ready[slot] = False
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    return kills
