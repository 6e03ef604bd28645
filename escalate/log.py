"""A run's append-only log on disk: the sidecar lock, reading, appending, torn tails.

This module knows bytes, locks and fsync, and nothing about money. :class:`LogBackend`
is the interface the service uses, so a second backend (a server database for fleets
of machines) can be added without touching the ledger rules.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
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
    def append(self, data: bytes) -> None: ...
    def set_aside(self, offset: int) -> tuple[int, str]: ...
    def create(self, first_line: bytes) -> bool: ...


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


class FileLog:
    """``RUNS/<run>/events.ndjson`` with its ``events.ndjson.lock`` sidecar."""

    def __init__(self, run_dir: Path, *, lock_timeout: float) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOG_NAME
        self.lock_path = run_dir / (LOG_NAME + LOCK_SUFFIX)
        self.lock_timeout = lock_timeout

    def _check_not_symlink(self) -> None:
        for path in (self.run_dir, self.path):
            if path.is_symlink():
                raise InputError(
                    f"{path} is a symbolic link; escalate only uses real run folders and logs "
                    "(replace the link with the folder it points to)", code="symlink", path=str(path))

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

    def append(self, data: bytes) -> None:
        """Append whole lines with one write, then fsync. The caller holds the lock."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def set_aside(self, offset: int) -> tuple[int, str]:
        """Move the bytes after ``offset`` (a torn tail) to a side file, then truncate.

        Returns ``(torn_bytes, side_file_name)``. The side file is durable before the
        log is shortened, so a crash in between loses nothing. The caller holds the lock.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            torn = os.pread(fd, os.fstat(fd).st_size - offset, offset)
            name = self._write_side_file(offset, torn)
            os.ftruncate(fd, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        return len(torn), name

    def _write_side_file(self, offset: int, torn: bytes) -> str:
        for attempt in range(1000):
            name = f"{TORN_PREFIX}{offset}" + (f".{attempt}" if attempt else "")
            try:
                fd = os.open(self.run_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o644)
            except FileExistsError:
                continue
            try:
                _write_all(fd, torn)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(self.run_dir)
            return name
        raise OSError(errno.EEXIST, "too many side files for one offset", str(self.run_dir))

    def create(self, first_line: bytes) -> bool:
        """Create the run folder and write its first line; False if the run already exists."""
        runs_root = self.run_dir.parent
        runs_root.mkdir(parents=True, exist_ok=True)
        try:
            self.run_dir.mkdir()
            _fsync_dir(runs_root)
        except FileExistsError:
            pass
        with self.locked():
            if self.exists():
                return False
            # An empty log is what a crash during creation leaves: it is safe to write into.
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
            try:
                _write_all(fd, first_line)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(self.run_dir)
        return True
