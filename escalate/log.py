"""A run's append-only log on disk: the sidecar lock, reading, appending, torn tails.

This module knows bytes, locks and fsync, and nothing about money. :class:`LogBackend`
is the interface the service uses, so a second backend (a server database for fleets
of machines) can be added without touching the ledger rules.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

from escalate.errors import InputError, LockTimeout

LOG_NAME = "events.ndjson"
LOCK_SUFFIX = ".lock"
TORN_PREFIX = LOG_NAME + ".torn-"

# Lock waits poll a non-blocking flock. Starting small and backing off keeps the handover
# between processes near the cost of an fsync instead of a fixed coarse interval.
_FIRST_POLL_S = 0.0002
_MAX_POLL_S = 0.005


class LogBackend(Protocol):
    """What the service needs from a run's storage."""

    def exists(self) -> bool: ...
    def locked(self) -> AbstractContextManager[None]: ...
    def reader(self) -> BinaryIO: ...
    def size(self) -> int: ...
    def append(self, data: bytes, *, torn_from: int | None = None) -> None: ...
    def side_file_name(self, offset: int) -> str: ...
    def set_aside(self, offset: int, name: str) -> int: ...
    def create(self, first_line: bytes, recovery: Callable[[int, str], bytes]) -> bool: ...


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
        # A link could lead a write (or the lock's O_CREAT) outside the runs root.
        for path in (self.run_dir, self.path, self.lock_path):
            if path.is_symlink():
                raise InputError(
                    f"{path} is a symbolic link; escalate only uses real run folders, logs and lock "
                    "files (replace the link with what it points to)", code="symlink", path=str(path))
        if self.run_dir.exists() and not self.run_dir.is_dir():
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
        """Hold the run's exclusive lock (an OS flock the kernel drops if this process dies)."""
        from filelock import UnixFileLock

        self._check_not_symlink()
        lock = UnixFileLock(str(self.lock_path), thread_local=False, fallback_to_soft=False,
                            preserve_lock_file=True)
        deadline = time.monotonic() + self.lock_timeout
        pause = _FIRST_POLL_S
        while True:
            try:
                lock.acquire(blocking=False)
                break
            except TimeoutError:
                now = time.monotonic()
                if now >= deadline:
                    raise LockTimeout(
                        f"lock {self.lock_path} is held by another process after "
                        f"{self.lock_timeout:g}s; retry, or raise --lock-timeout",
                        lock_file=str(self.lock_path), timeout_s=self.lock_timeout) from None
                time.sleep(min(pause, deadline - now))
                pause = min(pause * 2, _MAX_POLL_S)
        try:
            yield
        finally:
            lock.release()

    def reader(self) -> BinaryIO:
        """The log opened for reading (never following a symlink)."""
        self._check_not_symlink()
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        return os.fdopen(fd, "rb", buffering=0)

    def size(self) -> int:
        return self.path.stat().st_size

    def append(self, data: bytes, *, torn_from: int | None = None) -> None:
        """Append whole lines with one write, then fsync. The caller holds the lock.

        ``torn_from``: the log ends in a torn tail from there, already copied by
        :meth:`set_aside`; the lines are written over it, never after it.
        """
        if torn_from is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            _write_over(fd, torn_from, data)
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

    def create(self, first_line: bytes, recovery: Callable[[int, str], bytes]) -> bool:
        """Create the run folder and write its first line; False if the run already exists.

        A crash during an earlier create can leave a first line without its newline: those
        bytes are set aside like any torn tail, and ``recovery(torn_bytes, saved_to)`` gives
        the line written right after the new first line, in the same write.
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
                if self._has_complete_line():
                    return False
                name = self.side_file_name(0)
                first_line += recovery(self.set_aside(0, name), name)
            # An empty log is what a crash during creation leaves: it is safe to write into.
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                _write_over(fd, 0, first_line)
            finally:
                os.close(fd)
            _fsync_dir(self.run_dir)
        return True

    def _has_complete_line(self) -> bool:
        with self.reader() as stream:
            while chunk := stream.read(1 << 16):
                if b"\n" in chunk:
                    return True
        return False
