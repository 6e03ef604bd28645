"""A run's append-only log on disk: the sidecar lock, reading, appending, torn tails.

This module knows bytes, locks and fsync, and nothing about money. It is a part of the
file store (:mod:`escalate.file_store`), which puts it behind the storage seam.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from escalate.errors import EscalateError, InputError, StoreUnavailable, storage_error

LOG_NAME = "events.ndjson"
LOCK_SUFFIX = ".lock"
LOCK_NAME = LOG_NAME + LOCK_SUFFIX
TORN_PREFIX = LOG_NAME + ".torn-"

# Every file is opened relative to the run folder's handle and never through a symbolic
# link; O_NONBLOCK keeps a FIFO planted as the log from blocking the open (a regular file
# ignores it), O_NOCTTY keeps a terminal device from becoming ours.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_FILE_FLAGS = (_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_NONBLOCK", 0))
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_DIRECTORY", 0)
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


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _symlink_error(path: Path) -> InputError:
    return InputError(f"{path} is a symbolic link; escalate only uses real run folders, logs and lock "
                      "files (replace the link with what it points to)", code="symlink", path=str(path))


_PROC_FD = Path("/proc/self/fd")
_HAS_PROC_FD: list[bool] = []  # asked once per process


def via_folder(dir_fd: int | None, run_dir: Path, name: str) -> Path:
    """A path to ``name`` in the run folder held open as ``dir_fd``, for code that can only
    open by name (SQLite): through ``/proc/self/fd/<dir_fd>/`` where the system offers it, so
    that a run folder swapped for a link after the command resolved it leads nowhere else.
    Without a handle, or without ``/proc``, the plain path."""
    if dir_fd is not None:
        if not _HAS_PROC_FD:
            _HAS_PROC_FD.append(_PROC_FD.is_dir())
        if _HAS_PROC_FD[0]:
            return _PROC_FD / str(dir_fd) / name
    return run_dir / name


class FileLog:
    """``RUNS/<run>/events.ndjson`` with its ``events.ndjson.lock`` sidecar.

    Within :meth:`resolved` (one command), the run folder is opened once, without following
    a symbolic link, and every file is opened relative to that handle: swapping the folder
    or a path above it for a link cannot move a lock, a read or a write to another folder.
    """

    def __init__(self, run_dir: Path, *, lock_timeout: float) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOG_NAME
        self.lock_path = run_dir / LOCK_NAME
        self.lock_timeout = lock_timeout
        self.lock_wait_s = 0.0  # how long the last lock took to get (the benchmark reads it)
        self._command = threading.local()  # each thread's resolved run folder

    @property
    def where(self) -> str:
        """The log's path, as messages name it."""
        return str(self.path)

    # ------------------------------------------------------------------ the run folder

    @property
    def dir_fd(self) -> int | None:
        """The run folder's handle for this command (inside :meth:`resolved`), else None.
        A file beside the log (the cache) is opened relative to it, like the log."""
        fd: int | None = getattr(self._command, "fd", None)
        return fd

    def bound_path(self, name: str) -> Path:
        """``name`` in this command's run folder, for opens by name (:func:`via_folder`)."""
        return via_folder(self.dir_fd, self.run_dir, name)

    @contextmanager
    def resolved(self) -> Iterator[None]:
        """Resolve the run folder once for everything inside (one command); nests. A run
        folder that does not exist yet is resolved by whatever first needs it."""
        if getattr(self._command, "depth", 0):
            self._command.depth += 1
            try:
                yield
            finally:
                self._command.depth -= 1
            return
        try:
            self._command.fd = self._open_run_dir()
        except FileNotFoundError:
            self._command.fd = None
        self._command.depth = 1
        try:
            yield
        finally:
            self._command.depth = 0
            fd, self._command.fd = self._command.fd, None
            if fd is not None:
                os.close(fd)

    @contextmanager
    def _folder(self) -> Iterator[int]:
        """The run folder's handle: this command's, else one opened for this call only.
        ``FileNotFoundError`` when there is no such folder."""
        if self.dir_fd is not None:
            yield self.dir_fd
            return
        fd = self._open_run_dir()
        if getattr(self._command, "depth", 0):
            self._command.fd = fd  # the folder appeared during the command: keep this one
            yield fd
            return
        try:
            yield fd
        finally:
            os.close(fd)

    def _open_runs_root(self) -> int:
        root = self.run_dir.parent
        try:
            return os.open(root, _DIR_FLAGS)
        except NotADirectoryError:
            raise InputError(f"the runs folder {root} is a file; give a folder with --runs-dir or "
                             "ESCALATE_RUNS_DIR", code="not_a_folder", path=str(root)) from None
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise storage_error(exc, root) from exc

    def _open_run_dir(self) -> int:
        # The runs root is the user's choice and may be a link; the run folder may not.
        root_fd = self._open_runs_root()
        try:
            for _ in range(3):  # (the entry may change between the open and the lstat)
                try:
                    return os.open(self.run_dir.name, _DIR_FLAGS | _NOFOLLOW, dir_fd=root_fd)
                except FileNotFoundError:
                    raise
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise storage_error(exc, self.run_dir) from exc
                    # With O_DIRECTORY, Linux reports a link as ENOTDIR rather than ELOOP.
                    mode = os.lstat(self.run_dir.name, dir_fd=root_fd).st_mode
                    if stat.S_ISLNK(mode):
                        raise _symlink_error(self.run_dir) from None
                    if not stat.S_ISDIR(mode):
                        raise InputError(f"{self.run_dir} is {_kind(mode)}, not a run folder; move it "
                                         "away or pick another run id", code="not_a_run",
                                         path=str(self.run_dir)) from None
            raise _symlink_error(self.run_dir)  # a folder and a link, turn about, while looked at
        finally:
            os.close(root_fd)

    def _open(self, dir_fd: int, name: str, flags: int, *, writing: bool) -> int:
        """Open ``name`` in the run folder: a regular file, never a link; a file a writer
        uses must have no second hard link (a write through it would change another file)."""
        path = self.run_dir / name
        try:
            fd = os.open(name, flags | _FILE_FLAGS, 0o644, dir_fd=dir_fd)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # (O_NOFOLLOW met a link)
                raise _symlink_error(path) from None
            if exc.errno not in (errno.EISDIR, errno.ENXIO):
                raise storage_error(exc, path) from exc
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            raise self._not_a_file(path, mode) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise self._not_a_file(path, info.st_mode)
            if writing and info.st_nlink > 1:
                raise InputError(
                    f"{path} has {info.st_nlink} hard links; escalate refuses to write a log or lock file "
                    "that is also another file — replace it with a copy of itself", code="hard_link",
                    path=str(path))
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _not_a_file(path: Path, mode: int) -> InputError:
        return InputError(f"{path} is {_kind(mode)}; escalate only uses regular files in a run folder "
                          "(move it away)", code="not_a_file", path=str(path))

    # ------------------------------------------------------------------ the interface

    def exists(self) -> bool:
        """True when the run has a log with at least its first line."""
        try:
            with self._folder() as dir_fd:
                # A linked lock file is refused by readers too, so it is found at once.
                with suppress(FileNotFoundError):
                    if stat.S_ISLNK(os.stat(LOCK_NAME, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                        raise _symlink_error(self.lock_path)
                info = os.stat(LOG_NAME, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise storage_error(exc, self.path) from exc
        if stat.S_ISLNK(info.st_mode):
            raise _symlink_error(self.path)
        if not stat.S_ISREG(info.st_mode):
            raise self._not_a_file(self.path, info.st_mode)
        return info.st_size > 0

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run's exclusive lock (:mod:`escalate.lock`) on the sidecar file, which
        is never deleted or replaced. On read-only media the sidecar is locked read-only (a
        command that only answers still works; a write then fails as ``read_only``)."""
        from escalate import lock

        with self.resolved(), self._folder() as dir_fd:
            fd = self._open_lock(dir_fd)
            try:
                if fd is not None:
                    self.lock_wait_s = lock.acquire(fd, self.lock_timeout, lock_file=str(self.lock_path))
                yield
            finally:
                if fd is not None:
                    os.close(fd)  # closing the descriptor releases the lock

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
        try:
            with self._folder() as dir_fd:
                return os.stat(LOG_NAME, dir_fd=dir_fd, follow_symlinks=False).st_size
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
        with self._folder() as dir_fd, self._naming(self.path):
            fd = self._open(dir_fd, LOG_NAME, os.O_RDONLY, writing=False)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    @staticmethod
    @contextmanager
    def _naming(path: Path) -> Iterator[None]:
        """Report an ``OSError`` as the error that names ``path`` and the cause."""
        try:
            yield
        except EscalateError:
            raise
        except OSError as exc:
            raise storage_error(exc, path) from exc

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

    def create(self, first_line: bytes, recovery: Callable[[int, str], bytes],
               has_run: Callable[[], bool]) -> bool:
        """Create the run folder and write its first line; False if the run already exists
        (``has_run()``, asked under the lock: the log holds a complete first write).

        A crash during an earlier create can leave an unfinished first write: those bytes are
        set aside like any torn tail, and ``recovery(torn_bytes, saved_to)`` gives the lines
        written instead of ``first_line`` (the first line and its ``recovery``), in one write.
        """
        runs_root = self.run_dir.parent
        try:
            runs_root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise InputError(f"the runs folder {runs_root} is a file; give a folder with --runs-dir or "
                             "ESCALATE_RUNS_DIR", code="not_a_folder", path=str(runs_root)) from None
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

    def _create_locked(self, first_line: bytes, recovery: Callable[[int, str], bytes],
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
