"""The run lock: the ``filelock`` package's OS lock on the ``events.ndjson.lock`` sidecar.

The sidecar is opened by the caller relative to the run folder's directory handle (never
through a symbolic link, never truncated, never deleted); this module only locks and waits.
The lock is ``filelock``'s native primitive on that descriptor (``flock`` on Unix,
``LockFileEx`` on Windows), which the kernel releases when the process dies. The wait polls
with a short back-off and a deadline from the monotonic clock, so the library installs no
signal handler and no timer, and a host that blocks or uses SIGALRM is not disturbed.

``filelock`` costs a few tens of milliseconds to import, so this module is imported only
by commands that lock (the read-only ones never do).
"""

from __future__ import annotations

import time

from filelock import lock_descriptor

from escalate.core.durations import format_duration
from escalate.errors import LockTimeout

# The wait backs off from 50 µs to 0.5 ms: a holder keeps the lock for about half a
# millisecond, so a waiter looks about as often as the lock can change hands, while eight
# waiters on two cores still leave the holder most of the CPU. (Measured with bench target 4
# against 20 µs–0.2 ms, 0.1–1 ms and 0.1–2 ms: all within the machine's noise, this a little
# ahead; see docs/performance.md.)
FIRST_POLL_S = 0.00005
MAX_POLL_S = 0.0005


def acquire(fd: int, timeout_s: float, *, lock_file: str) -> float:
    """Take the exclusive lock on ``fd`` within ``timeout_s`` seconds (0: try once) and
    return the seconds spent waiting; :class:`LockTimeout` (exit 7) names ``lock_file``.
    Closing ``fd`` releases the lock."""
    if lock_descriptor(fd, blocking=False):
        return 0.0
    started = time.monotonic()
    deadline = started + timeout_s
    pause = FIRST_POLL_S
    while (now := time.monotonic()) < deadline:
        time.sleep(min(pause, deadline - now))
        pause = min(pause * 2, MAX_POLL_S)
        if lock_descriptor(fd, blocking=False):
            return time.monotonic() - started
    raise LockTimeout(f"lock {lock_file} is held by another process after "
                      f"{format_duration(timeout_s)}; retry, or raise --lock-timeout",
                      lock_file=lock_file, timeout_s=timeout_s)
