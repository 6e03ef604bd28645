"""A run's append-only log on disk: the sidecar lock, reading, appending, torn tails.

This module knows bytes, locks and fsync, and nothing about money. It is a part of the
file store (:mod:`escalate.stores.file.store`), which puts it behind the storage seam.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from pathlib import Path
from types import ModuleType
from typing import BinaryIO

from escalate.errors import EscalateError, NoRunsFolder, StoreUnavailable, storage_error
from escalate.stores.file.run_folder import RunFolder, symlink_error

LOG_NAME = "events.ndjson"
LOCK_SUFFIX = ".lock"
LOCK_NAME = LOG_NAME + LOCK_SUFFIX
TORN_PREFIX = LOG_NAME + ".torn-"

_COPY_CHUNK = 1 << 20
_MAX_SIDE_FILES = 1000


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


def _write_over(fd: int, offset: int, data: bytes | BinaryIO) -> None:
    """Write ``data`` (bytes, or a stream read to its end a chunk at a time) at ``offset``
    and cut the file after it, then fsync.

    What was there is a torn tail (no newline), so at every moment in between the file
    is complete lines plus at most a torn tail: a crash part-way leaves nothing that a
    replay misreads, only a shorter torn tail for the next writer.
    """
    chunks = [data] if isinstance(data, bytes) else iter(lambda: data.read(_COPY_CHUNK), b"")
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    os.ftruncate(fd, offset)
    os.fsync(fd)


class _Naming:
    """:meth:`FileLog._naming` (a class, not a generator: it is on every write's path)."""

    __slots__ = ("path",)

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _: object) -> None:
        if isinstance(exc, OSError) and not isinstance(exc, EscalateError):
            raise storage_error(exc, self.path) from exc


# escalate.stores.file.lock (and filelock), imported by the first lock a process takes: a
# command that only reads never loads them; kept here, so that a lock is no import statement.
_LOCK: list[ModuleType] = []


def _import_lock() -> ModuleType:
    from escalate.stores.file import lock

    _LOCK.append(lock)
    return lock


class _Locked:
    """:meth:`FileLog.locked` (a class, not a generator: on every write's path)."""

    __slots__ = ("_fd", "_log", "_resolved")

    def __init__(self, log: FileLog) -> None:
        self._log = log
        self._fd: int | None = None

    def __enter__(self) -> None:
        lock = _LOCK[0] if _LOCK else _import_lock()
        log = self._log
        self._resolved = resolved = log.resolved()
        resolved.__enter__()
        try:
            self._fd = fd = log._open_lock(log.kept_folder())
            if fd is not None:
                log.lock_wait_s = lock.acquire(fd, log.lock_timeout, lock_file=log._lock_file)
            # A handle kept from before this lock (a read, or an attempt retried in the same
            # command) may be on a file another process has since moved away: under this lock
            # the log is opened again, by name, and checked again.
            log._drop_handle()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *_: object) -> None:
        try:
            if self._fd is not None:
                os.close(self._fd)  # closing the descriptor releases the lock
        finally:
            self._fd = None
            self._resolved.__exit__(None, None, None)


class _Handle:
    """:meth:`FileLog.handle`: the descriptor, whether it was asked for appending, and
    whether it can append."""

    __slots__ = ("asked_writable", "can_write", "fd")

    def __init__(self, fd: int, asked_writable: bool, can_write: bool) -> None:
        self.fd, self.asked_writable, self.can_write = fd, asked_writable, can_write


class FileLog(RunFolder):
    """``RUNS/<run>/events.ndjson`` with its ``events.ndjson.lock`` sidecar, opened through
    the run folder's handle (:class:`~escalate.stores.file.run_folder.RunFolder`)."""

    def __init__(self, run_dir: Path, *, lock_timeout: float) -> None:
        super().__init__(run_dir)
        self.path = run_dir / LOG_NAME
        self.lock_path = run_dir / LOCK_NAME
        self._lock_file = str(self.lock_path)  # (named by every lock wait: made once)
        self.lock_timeout = lock_timeout
        self.lock_wait_s = 0.0  # how long the last lock took to get (the benchmark reads it)

    @property
    def where(self) -> str:
        """The log's path, as messages name it."""
        return str(self.path)

    def handle(self, *, writable: bool) -> int:
        """This command's one handle on the log (inside :meth:`resolved`; the command's end
        closes it): the fold's checks, the checkpoint's, the append and the sync go through it,
        one open instead of one per step, and all on the file that was checked. Taking the run's
        lock closes a handle kept from before it (:meth:`locked`): one never outlives the lock
        it was opened under into the next. ``writable``:
        open it for appending too, where this user may write it (else it is opened for
        reading, and :meth:`append` says why it cannot write). ``FileNotFoundError`` when there
        is no log."""
        command = self._command
        if not getattr(command, "depth", 0):  # (no command to close it: kept by nobody)
            raise RuntimeError("FileLog.handle outside a command")
        kept: _Handle | None = getattr(command, "log", None)
        if kept is not None and (kept.asked_writable or not writable):
            return kept.fd
        if kept is not None:
            self._drop_handle()
        with self._folder() as dir_fd:
            can_write = writable
            try:
                fd = self._open(dir_fd, LOG_NAME, (os.O_RDWR | os.O_APPEND) if writable else os.O_RDONLY,
                                writing=False)
            except StoreUnavailable as error:
                if error.code not in ("read_only", "permission_denied"):
                    raise
                fd, can_write = self._open(dir_fd, LOG_NAME, os.O_RDONLY, writing=False), False
        command.log = _Handle(fd, writable, can_write)
        return fd

    def _drop_handle(self) -> None:
        """Close the command's kept handle on the log, if any (the next :meth:`handle` opens
        one again)."""
        kept: _Handle | None = getattr(self._command, "log", None)
        if kept is not None:
            self._command.log = None
            os.close(kept.fd)

    def _end_command(self) -> None:
        self._drop_handle()
        super()._end_command()

    # ------------------------------------------------------------------ the interface

    def exists(self) -> bool:
        """True when the run has a log with at least its first line."""
        try:
            with self._folder() as dir_fd:
                # A linked lock file is refused by readers too, so it is found at once.
                try:
                    if stat.S_ISLNK(os.stat(LOCK_NAME, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                        raise symlink_error(self.lock_path)
                except FileNotFoundError:
                    pass
                info = os.stat(LOG_NAME, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise storage_error(exc, self.path) from exc
        if stat.S_ISLNK(info.st_mode):
            raise symlink_error(self.path)
        if not stat.S_ISREG(info.st_mode):
            raise self._not_a_file(self.path, info.st_mode)
        return info.st_size > 0

    def locked(self) -> AbstractContextManager[None]:
        """Hold the run's exclusive lock (:mod:`escalate.stores.file.lock`) on the sidecar file, which
        is never deleted or replaced. On read-only media the sidecar is locked read-only (a
        command that only answers still works; a write then fails as ``read_only``)."""
        return _Locked(self)

    def _open_lock(self, dir_fd: int) -> int | None:
        try:
            return self._open(dir_fd, LOCK_NAME, os.O_RDWR | os.O_CREAT, writing=True)
        except StoreUnavailable as error:
            if error.code != "read_only":
                raise
        try:
            return self._open(dir_fd, LOCK_NAME, os.O_RDONLY, writing=True)
        except FileNotFoundError:
            return None  # nothing can be written here, so there is nothing to exclude

    def reader(self) -> BinaryIO:
        """The log opened for reading (a regular file, never through a link)."""
        with self._folder() as dir_fd:
            fd = self._open(dir_fd, LOG_NAME, os.O_RDONLY, writing=False)
        return os.fdopen(fd, "rb", buffering=0)

    def size(self) -> int:
        return self.stat().st_size

    def stat(self) -> os.stat_result:
        """The log's ``stat`` (through the run folder's handle, never following a link)."""
        try:
            with self._folder() as dir_fd:
                return os.stat(LOG_NAME, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            raise storage_error(exc, self.path) from exc

    def append(self, data: bytes, *, torn_from: int | None = None) -> None:
        """Append whole lines with one write. The caller holds the lock, and calls
        :meth:`sync` before it reports anything.

        ``torn_from``: the log ends in a torn tail from there, already copied by
        :meth:`set_aside`; the lines are written over it, never after it.

        A write that fails part-way is rolled back (the log is cut back to where it started;
        over a torn tail, to ``torn_from``: its bytes are in the side file) before the error
        is raised.
        """
        kept: _Handle | None = getattr(self._command, "log", None)
        if torn_from is None and kept is not None and kept.can_write:
            try:
                info = os.fstat(kept.fd)
                if info.st_nlink > 1:
                    raise self._hard_linked(self.path, info.st_nlink)
                _write_or_roll_back(kept.fd, info.st_size, lambda: _write_all(kept.fd, data))
            except OSError as exc:  # (_naming, inlined)
                raise storage_error(exc, self.path) from exc
            return
        with self._folder() as dir_fd, self._naming(self.path):
            if torn_from is None:
                fd = self._open(dir_fd, LOG_NAME, os.O_WRONLY | os.O_APPEND, writing=True)
                try:
                    _write_or_roll_back(fd, os.fstat(fd).st_size, lambda: _write_all(fd, data))
                finally:
                    os.close(fd)
                return
            fd = self._open(dir_fd, LOG_NAME, os.O_WRONLY, writing=True)
            try:
                _write_or_roll_back(fd, torn_from, lambda: _write_over(fd, torn_from, data))
            finally:
                os.close(fd)

    def sync(self) -> None:
        """fsync the log: every line written so far, by this process or any before it, is
        durable when this returns. Called after the lock is released, so the fsyncs of
        processes queued on the lock overlap instead of following one another."""
        kept: _Handle | None = getattr(self._command, "log", None)
        if kept is not None:  # (the file this command wrote: the one to make durable)
            try:
                os.fsync(kept.fd)
            except OSError as exc:  # (_naming, inlined)
                raise storage_error(exc, self.path) from exc
            return
        with self._folder() as dir_fd, self._naming(self.path):
            fd = self._open(dir_fd, LOG_NAME, os.O_RDONLY, writing=False)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    @staticmethod
    def _naming(path: Path) -> _Naming:
        """Report an ``OSError`` as the error that names ``path`` and the cause."""
        return _Naming(path)

    def side_file_name(self, offset: int) -> str:
        """A name in the run folder for the torn tail that starts at ``offset``.

        ``events.ndjson.torn-<offset>``, with ``.1``, ``.2`` … when a torn tail was already
        set aside at the same offset (a recovery write that was itself torn). An empty file
        of that name (left by a copy that failed, e.g. on a full disk) is reused: no
        ``recovery`` event can name it, since the event is written only after the copy is
        durable. The caller holds the lock, so the name stays free until :meth:`set_aside`.
        """
        with self._folder() as dir_fd, self._naming(self.run_dir):
            for attempt in range(_MAX_SIDE_FILES):
                name = f"{TORN_PREFIX}{offset}" + (f".{attempt}" if attempt else "")
                try:
                    info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    return name
                if stat.S_ISREG(info.st_mode) and info.st_size == 0 and info.st_nlink == 1:
                    return name
        raise StoreUnavailable(f"{self.run_dir} holds {_MAX_SIDE_FILES} torn-tail copies for offset "
                               f"{offset}; move them away, then retry", code="too_many_side_files",
                               path=str(self.run_dir))

    def set_aside(self, offset: int, name: str) -> int:
        """Copy the bytes after ``offset`` (a torn tail) into the side file ``name`` and
        make it durable; returns how many. The caller holds the lock and then calls
        ``append(lines, torn_from=offset)``, which writes over those bytes.

        The copy is durable before the log changes, so a crash in between loses nothing
        (it leaves a side file no ``recovery`` event names, holding bytes the log still has).
        It goes a chunk at a time: memory stays small however long the tail.
        """
        with self._folder() as dir_fd, self.reader() as stream, self._naming(self.run_dir / name):
            side = self._open(dir_fd, name, os.O_WRONLY | os.O_CREAT, writing=True)
            if os.fstat(side).st_size:  # side_file_name gave a free or empty name
                os.close(side)
                raise FileExistsError(errno.EEXIST, "a side file of that name is not empty", name)
            copied = 0
            try:
                stream.seek(offset)
                while chunk := stream.read(_COPY_CHUNK):
                    _write_all(side, chunk)
                    copied += len(chunk)
                os.fsync(side)
                os.fsync(dir_fd)
            except BaseException:
                # Leave no partial copy behind: an empty file is reused by the next writer.
                with suppress(OSError):
                    os.ftruncate(side, 0)
                raise
            finally:
                os.close(side)
        return copied

    def create(self, first_line: bytes | BinaryIO, recovery: Callable[[int, str], bytes],
               has_run: Callable[[], bool]) -> bool:
        """Create the run folder and write its first line (or, from a stream, an imported
        log); False if the run already exists (``has_run()``, asked under the lock: the log
        holds a complete first write).

        A crash during an earlier create can leave an unfinished first write: those bytes are
        set aside like any torn tail, and ``recovery(torn_bytes, saved_to)`` gives the lines
        written instead of ``first_line`` (the first line and its ``recovery``), in one write.
        """
        runs_root = self.run_dir.parent
        try:
            runs_root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # a file in its place, or above it
            raise NoRunsFolder(runs_root) from None
        except OSError as exc:
            raise storage_error(exc, runs_root) from exc
        root_fd = self._open_runs_root()
        try:
            with self._naming(self.run_dir), suppress(FileExistsError):
                os.mkdir(self.run_dir.name, 0o777, dir_fd=root_fd)
                os.fsync(root_fd)
        finally:
            os.close(root_fd)
        with self.resolved():
            if self.exists() and has_run():
                return False  # (also: a linked log or lock is refused before a lock file is made)
            return self._create_locked(first_line, recovery, has_run)

    def _create_locked(self, first_line: bytes | BinaryIO, recovery: Callable[[int, str], bytes],
                       has_run: Callable[[], bool]) -> bool:
        with self.locked(), self._folder() as dir_fd:
            if self.exists():
                if has_run():
                    return False
                name = self.side_file_name(0)
                first_line = recovery(self.set_aside(0, name), name)
            # An empty log is what a crash during creation leaves: it is safe to write into.
            with self._naming(self.path):
                fd = self._open(dir_fd, LOG_NAME, os.O_WRONLY | os.O_CREAT, writing=True)
                try:
                    _write_or_roll_back(fd, 0, lambda: _write_over(fd, 0, first_line))
                finally:
                    os.close(fd)
                os.fsync(dir_fd)
        return True
