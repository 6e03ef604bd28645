"""The run lock: the ``filelock`` package's OS lock on the ``events.ndjson.lock`` sidecar.

The sidecar is opened by the caller relative to the run folder's directory handle (never
through a symbolic link, never truncated, never deleted); this module only locks and waits.
The lock is ``filelock``'s native primitive on that descriptor (``flock`` on Unix,
``LockFileEx`` on Windows), which the kernel releases when the process dies.

A waiter first gives up the CPU once and tries again (a holder preempted on its CPU
usually finishes meanwhile). Then it sleeps in the kernel's queue for the lock: a helper
thread (kept for the next wait) makes the blocking ``flock`` call (the primitive ``filelock`` takes without
blocking), and the caller's thread waits for it with its deadline from the monotonic
clock. The kernel wakes a waiter when the holder lets go, so the lock changes hands at
once and a waiter spends no CPU (a polling waiter looked again up to 0.5 ms later, and
eight of them took the holder's CPU). The library installs no signal handler and no
timer, and a host that blocks or uses SIGALRM is not disturbed. Where there is no
``flock`` (Windows) the wait polls ``filelock`` with a short back-off instead.

``filelock`` costs a few tens of milliseconds to import, so this module is imported only
by commands that lock (the read-only ones never do).
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import suppress
from typing import TYPE_CHECKING

from filelock import lock_descriptor

from escalate.core.durations import format_duration
from escalate.errors import LockTimeout

if TYPE_CHECKING:
    import queue

try:
    import fcntl
except ImportError:  # Windows: the polling wait
    fcntl = None  # type: ignore[assignment]  # (mypy knows fcntl only as the module)

# Where the wait polls: it backs off from 50 µs to 0.5 ms, about as often as the lock can
# change hands, while eight waiters on two cores still leave the holder most of the CPU.
FIRST_POLL_S = 0.00005
MAX_POLL_S = 0.0005
# The longest a waiting caller sleeps at once. A signal (Ctrl-C) that lands just before the
# caller goes to sleep on its lock runs its handler only when the sleep ends: in slices, the
# caller acts on it within this long, not at the deadline.
SIGNAL_SLICE_S = 0.1


def acquire(fd: int, timeout_s: float, *, lock_file: str) -> float:
    """Take the exclusive lock on ``fd`` within ``timeout_s`` seconds (0: try once) and
    return the seconds spent waiting; :class:`LockTimeout` (exit 7) names ``lock_file``.
    Closing ``fd`` releases the lock."""
    if lock_descriptor(fd, blocking=False):
        return 0.0
    started = time.monotonic()
    if timeout_s > 0 and _tried_after_yield(fd):
        return time.monotonic() - started
    deadline = started + timeout_s
    if timeout_s > 0 and (Waiter(fd).wait(deadline) if fcntl is not None else _poll(fd, deadline)):
        return time.monotonic() - started
    raise LockTimeout(f"lock {lock_file} is held by another process after "
                      f"{format_duration(timeout_s)}; retry, or raise --lock-timeout",
                      lock_file=lock_file, timeout_s=timeout_s)


def _tried_after_yield(fd: int) -> bool:
    """Give up the CPU once, then try once more, before queueing on a helper thread: a
    critical section lasts a fraction of a millisecond, and a holder preempted on this CPU
    finishes first; a lock taken here is the caller's at once, without the helper's two
    wake-ups. One try, however long the wait: nobody polls behind the kernel's queue."""
    if not hasattr(os, "sched_yield"):
        return False
    os.sched_yield()
    return lock_descriptor(fd, blocking=False)


# The descriptors of waits under way: each caller's and its helper's duplicate. A child
# forked meanwhile (by another thread) has neither the caller nor the helper to close its
# copies, which would keep the lock's open file, and so a granted lock, alive for as long
# as the child lives: it closes them at once.
_QUEUED: set[int] = set()


def _close_queued_in_child() -> None:
    for fd in _QUEUED:
        with suppress(OSError):
            os.close(fd)
    _QUEUED.clear()
    _IDLE.clear()  # (their threads are the parent's: a child starts its own)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_queued_in_child)


class _Helper:
    """A daemon thread that makes the blocking ``flock`` calls of waits, one wait at a time,
    and sleeps between them: kept for the process's next wait (starting a thread for every
    wait cost more CPU than the rest of it, with eight processes taking turns on two cores).
    A process has as many as it ever had waits under way at once. One still queued when the
    process exits does not keep it alive (a daemon thread)."""

    def __init__(self) -> None:
        import queue  # (only a process that ever waits needs it: an uncontended command does not load it)

        self.requests: queue.SimpleQueue[Waiter] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="escalate-lock-waiter", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            waiter = self.requests.get()
            granted = waiter._run()
            _IDLE.append(self)
            if granted:
                # The caller is woken last, just before this thread sleeps in get() again: it
                # then finds the interpreter free instead of waiting for it (an extra sleep and
                # wake-up while the lock is held and nobody works under it).
                waiter.wake.release()

    @staticmethod
    def take() -> _Helper:
        """An idle helper, or a new one."""
        try:
            return _IDLE.pop()
        except IndexError:
            return _Helper()


_IDLE: list[_Helper] = []  # helpers waiting for a wait


class Waiter:
    """A blocking ``flock`` on a duplicate of the caller's descriptor, made by a helper
    thread (:class:`_Helper`).

    The duplicate shares the caller's open file, so the lock the helper is granted is the
    caller's. If the caller gave up first (its deadline, or an exception such as
    KeyboardInterrupt), the helper unlocks and closes the duplicate as soon as the kernel
    grants it the lock: the lock is let go at once and no descriptor is left open.
    """

    def __init__(self, fd: int) -> None:
        self.caller_fd = fd
        self.fd = os.dup(fd)
        # Set when the helper is done and the caller still waits; the caller sleeps on
        # ``wake`` (a plain lock the helper releases: less work per wait than an Event).
        self.granted = False
        self.wake = threading.Lock()
        self.wake.acquire()
        self.finished = threading.Lock()  # released when the helper is done, whoever waits
        self.finished.acquire()
        self.decided = threading.Lock()  # orders the helper's grant and the caller's giving up
        self.abandoned = False
        self.error: OSError | None = None
        _QUEUED.update((fd, self.fd))

    def _run(self) -> bool:
        """Wait in the kernel's queue; True when the caller still waits and is to be woken
        (:meth:`_Helper._serve` wakes it, as the last thing it does)."""
        error = None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)  # sleeps in the kernel's queue until granted
        except OSError as exc:
            error = exc
        with self.decided:
            if self.abandoned and error is None:
                # Unlocks the open file the caller shares, even before it closes its descriptor.
                with suppress(OSError):
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
            _QUEUED.discard(self.fd)
            os.close(self.fd)  # else the caller's descriptor keeps the lock
            self.error = error
            # (From here a caller giving up finds the lock granted, and takes it.)
            self.granted = granted = not self.abandoned
        self.finished.release()
        return granted

    def wait(self, deadline: float) -> bool:
        """True once the lock is the caller's; False, and given up, at ``deadline`` (on the
        monotonic clock). An error of the ``flock`` call is raised here."""
        # The helper is handed the wait only now, just before the caller sleeps: woken, it
        # finds the interpreter free rather than waiting for this thread to let go of it.
        try:
            helper = _Helper.take()
        except BaseException:  # (the wait not handed over: the duplicate is this thread's to close)
            _QUEUED.difference_update((self.caller_fd, self.fd))
            os.close(self.fd)
            raise
        try:
            # Handed over first thing in here: an exception raised as soon as the put returns
            # (a Ctrl-C landing during it) finds the wait the helper's, given up below.
            helper.requests.put(self)
            while (left := deadline - time.monotonic()) > 0:
                if self.wake.acquire(timeout=min(left, SIGNAL_SLICE_S)):
                    break
        finally:
            with self.decided:
                _QUEUED.discard(self.caller_fd)
                if not self.granted:
                    self.abandoned = True
        if self.granted and self.error is not None:
            raise self.error
        return self.granted


def _poll(fd: int, deadline: float) -> bool:
    """Where there is no ``flock`` to sleep on: try again after 50 µs, backing off to 0.5 ms."""
    pause = FIRST_POLL_S
    while (now := time.monotonic()) < deadline:
        time.sleep(min(pause, deadline - now))
        pause = min(pause * 2, MAX_POLL_S)
        if lock_descriptor(fd, blocking=False):
            return True
    return False
