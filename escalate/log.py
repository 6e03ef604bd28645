"""A run's append-only log on disk: the sidecar lock, reading, appending, torn tails.

This module knows bytes, locks and fsync, and nothing about money. :class:`LogBackend`
is the interface the service uses, so a second backend (a server database for fleets
of machines) can be added without touching the ledger rules.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

from escalate.errors import InputError, LockTimeout

LOG_NAME = "events.ndjson"
LOCK_SUFFIX = ".lock"
TORN_PREFIX = LOG_NAME + ".torn-"

# Where a timer signal cannot bound a blocking flock (not the main thread, or the program
# uses SIGALRM itself), the wait polls a non-blocking flock, backing off from 0.1 to 2 ms.
_FIRST_POLL_S = 0.0001
_MAX_POLL_S = 0.002


class _LockWaitExpired(Exception):
    """Raised by the timer signal to end a blocking flock wait."""


def _expire_lock_wait(signum: int, frame: object) -> None:
    raise _LockWaitExpired


def _timer_is_ours() -> bool:
    """A blocking flock bounded by SIGALRM is only safe where nothing else uses the timer."""
    return (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)
            and signal.getitimer(signal.ITIMER_REAL)[0] == 0)


def _lock_blocking(fd: int, timeout: float) -> bool:
    """Wait in the kernel's queue: the lock is handed over the moment its holder lets go."""
    previous = signal.signal(signal.SIGALRM, _expire_lock_wait)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _LockWaitExpired:
        return False  # (if it fired just after the flock, closing the fd lets go again)
    finally:
        signal.signal(signal.SIGALRM, previous)
    return True


def _lock_polling(fd: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    pause = _FIRST_POLL_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            now = time.monotonic()
            if now >= deadline:
                return False
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, _MAX_POLL_S)


class LogBackend(Protocol):
    """What the service needs from a run's storage."""

    def exists(self) -> bool: ...
    def locked(self) -> AbstractContextManager[None]: ...
    def reader(self) -> BinaryIO: ...
    def size(self) -> int: ...
    def append(self, data: bytes, *, torn_from: int | None = None) -> None: ...
    def sync(self) -> None: ...
    def side_file_name(self, offset: int) -> str: ...
    def set_aside(self, offset: int, name: str) -> int: ...
    def create(self, first_line: bytes, recovery: Callable[[int, str], bytes],
               has_run: Callable[[], bool]) -> bool: ...


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _write_or_roll_back(fd: int, start: int, write: Callable[[], None]) -> None:
    """Run ``write`` (which writes from ``start``); if it fails part-way (a full disk, an I/O
    error), cut the file back to ``start`` and make that durable before re-raising, so a
    failed write leaves no part of itself for a reader to count."""
    try:
        write()
    except BaseException:
        os.ftruncate(fd, start)
        os.fsync(fd)
        raise


def _write_over(fd: int, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` and cut the file after it, then fsync.

    What was there is a torn tail (no newline), so at every moment in between the file
    is complete lines plus at most a torn tail: a crash part-way leaves nothing that a
    replay misreads, only a shorter torn tail for the next writer.
    """
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
    os.ftruncate(fd, offset)
    os.fsync(fd)


class FileLog:
    """``RUNS/<run>/events.ndjson`` with its ``events.ndjson.lock`` sidecar."""

    def __init__(self, run_dir: Path, *, lock_timeout: float) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOG_NAME
        self.lock_path = run_dir / (LOG_NAME + LOCK_SUFFIX)
        self.lock_timeout = lock_timeout

    def _check_not_symlink(self) -> None:
        # A link could lead a write (or the lock's O_CREAT) outside the runs root. One lstat
        # a path: this runs on every command.
        for path in (self.run_dir, self.path, self.lock_path):
            try:
                mode = os.lstat(path).st_mode
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat.S_ISLNK(mode):
                raise InputError(
                    f"{path} is a symbolic link; escalate only uses real run folders, logs and lock "
                    "files (replace the link with what it points to)", code="symlink", path=str(path))
            if path == self.run_dir and not stat.S_ISDIR(mode):
                raise InputError(f"{self.run_dir} is not a folder; move it away or pick another run id",
                                 code="not_a_run", path=str(self.run_dir))

    def exists(self) -> bool:
        """True when the run has a log with at least its first line."""
        self._check_not_symlink()
        try:
            return self.path.stat().st_size > 0
        except FileNotFoundError:
            return False

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run's exclusive lock: an OS ``flock`` on the sidecar file, which the
        kernel drops if this process dies. The lock file is never deleted or replaced."""
        self._check_not_symlink()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                wait = _lock_blocking if self.lock_timeout > 0 and _timer_is_ours() else _lock_polling
                if not wait(fd, self.lock_timeout):
                    raise LockTimeout(
                        f"lock {self.lock_path} is held by another process after "
                        f"{self.lock_timeout:g}s; retry, or raise --lock-timeout",
                        lock_file=str(self.lock_path), timeout_s=self.lock_timeout) from None
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def reader(self) -> BinaryIO:
        """The log opened for reading (never following a symlink; callers have checked the
        run folder with :meth:`exists` or :meth:`locked`)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        return os.fdopen(fd, "rb", buffering=0)

    def size(self) -> int:
        return self.path.stat().st_size

    def append(self, data: bytes, *, torn_from: int | None = None) -> None:
        """Append whole lines with one write. The caller holds the lock, and calls
        :meth:`sync` before it reports anything.

        ``torn_from``: the log ends in a torn tail from there, already copied by
        :meth:`set_aside`; the lines are written over it, never after it.

        A write that fails part-way is rolled back (the log is cut back to where it started;
        over a torn tail, to ``torn_from``: its bytes are in the side file) before the error
        is raised.
        """
        if torn_from is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
            try:
                _write_or_roll_back(fd, os.fstat(fd).st_size, lambda: _write_all(fd, data))
            finally:
                os.close(fd)
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            _write_or_roll_back(fd, torn_from, lambda: _write_over(fd, torn_from, data))
        finally:
            os.close(fd)

    def sync(self) -> None:
        """fsync the log: every line written so far, by this process or any before it, is
        durable when this returns. Called after the lock is released, so the fsyncs of
        processes queued on the lock overlap instead of following one another."""
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def side_file_name(self, offset: int) -> str:
        """A free name in the run folder for the torn tail that starts at ``offset``.

        ``events.ndjson.torn-<offset>``, with ``.1``, ``.2`` … when a torn tail was already
        set aside at the same offset (a recovery write that was itself torn). The caller
        holds the lock, so the name stays free until :meth:`set_aside` creates it.
        """
        for attempt in range(1000):
            name = f"{TORN_PREFIX}{offset}" + (f".{attempt}" if attempt else "")
            if not os.path.lexists(self.run_dir / name):
                return name
        raise OSError(errno.EEXIST, "too many side files for one offset", str(self.run_dir))

    def set_aside(self, offset: int, name: str) -> int:
        """Copy the bytes after ``offset`` (a torn tail) into the new side file ``name`` and
        make it durable; returns how many. The caller holds the lock and then calls
        ``append(lines, torn_from=offset)``, which writes over those bytes.

        The copy is durable before the log changes, so a crash in between loses nothing
        (it leaves a side file no ``recovery`` event names, holding bytes the log still has).
        """
        with self.reader() as stream:
            stream.seek(offset)
            torn = stream.read()
        self._write_side_file(name, torn)
        return len(torn)

    def _write_side_file(self, name: str, torn: bytes) -> None:
        fd = os.open(self.run_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            _write_all(fd, torn)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.run_dir)

    def create(self, first_line: bytes, recovery: Callable[[int, str], bytes],
               has_run: Callable[[], bool]) -> bool:
        """Create the run folder and write its first line; False if the run already exists
        (``has_run()``, asked under the lock: the log holds a complete first write).

        A crash during an earlier create can leave an unfinished first write: those bytes are
        set aside like any torn tail, and ``recovery(torn_bytes, saved_to)`` gives the lines
        written instead of ``first_line`` (the first line and its ``recovery``), in one write.
        """
        runs_root = self.run_dir.parent
        self._check_not_symlink()
        runs_root.mkdir(parents=True, exist_ok=True)
        try:
            self.run_dir.mkdir()
            _fsync_dir(runs_root)
        except FileExistsError:
            pass
        with self.locked():
            if self.exists():
                if has_run():
                    return False
                name = self.side_file_name(0)
                first_line = recovery(self.set_aside(0, name), name)
            # An empty log is what a crash during creation leaves: it is safe to write into.
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                _write_or_roll_back(fd, 0, lambda: _write_over(fd, 0, first_line))
            finally:
                os.close(fd)
            _fsync_dir(self.run_dir)
        return True
