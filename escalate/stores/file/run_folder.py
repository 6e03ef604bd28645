"""A run folder opened once per command, and every file in it opened through that handle.

Within :meth:`RunFolder.resolved` (one command), the run folder is opened once, without
following a symbolic link, and every file is opened relative to that handle: swapping the
folder or a path above it for a link cannot move a lock, a read or a write to another
folder. A file must be a regular file; one a writer uses must have a single hard link.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from escalate.errors import InputError, NoRunsFolder, storage_error

# Every file is opened relative to the run folder's handle and never through a symbolic
# link; O_NONBLOCK keeps a FIFO planted as the log from blocking the open (a regular file
# ignores it), O_NOCTTY keeps a terminal device from becoming ours.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_FILE_FLAGS = (_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_NONBLOCK", 0))
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_DIRECTORY", 0)


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


def symlink_error(path: Path) -> InputError:
    return InputError(f"{path} is a symbolic link; escalate only uses real run folders, logs and lock "
                      "files (replace the link with what it points to)", code="symlink", path=str(path))


_PROC_FD = "/proc/self/fd"
_HAS_PROC_FD: list[bool] = []  # asked once per process


def via_folder(dir_fd: int | None, run_dir: str | os.PathLike[str], name: str) -> str:
    """A path to ``name`` in the run folder held open as ``dir_fd``, for code that can only
    open by name (SQLite): through ``/proc/self/fd/<dir_fd>/`` where the system offers it, so
    that a run folder swapped for a link after the command resolved it leads nowhere else.
    Without a handle, or without ``/proc``, the plain path. (A string: the hot path parses
    no ``Path``.)"""
    if dir_fd is not None:
        if not _HAS_PROC_FD:
            _HAS_PROC_FD.append(os.path.isdir(_PROC_FD))
        if _HAS_PROC_FD[0]:
            return f"{_PROC_FD}/{dir_fd}/{name}"
    return os.path.join(run_dir, name)


class _Held:
    """A handle already open for this command, as a context manager that leaves it open
    (cheaper than a generator-based one: this is on every command's path)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *_: object) -> None:
        return None


class _Nested:
    """One more level of an already resolved command (see :meth:`RunFolder.resolved`)."""

    __slots__ = ("_command",)

    def __init__(self, command: threading.local) -> None:
        self._command = command
        command.depth += 1

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        self._command.depth -= 1


class _Resolved:
    """:meth:`RunFolder.resolved` at the outer level: the run folder opened on the way in,
    and everything the command kept open closed on the way out (a class, not a generator:
    this is on every command's path)."""

    __slots__ = ("_folder",)

    def __init__(self, folder: RunFolder) -> None:
        self._folder = folder

    def __enter__(self) -> None:
        folder = self._folder
        command = folder._command
        try:
            command.fd = folder._open_run_dir()
        except FileNotFoundError:
            command.fd = None
        command.depth = 1

    def __exit__(self, *_: object) -> None:
        command = self._folder._command
        command.depth = 0
        self._folder._end_command()


class RunFolder:
    """``RUNS/<run>``: its handle for the current command, and safe opens inside it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._run_dir_path = str(run_dir)  # (opened by every command: made once)
        self._command = threading.local()  # each thread's resolved run folder

    @property
    def dir_fd(self) -> int | None:
        """The run folder's handle for this command (inside :meth:`resolved`), else None.
        A file beside the log (the checkpoint) is opened relative to it, like the log."""
        fd: int | None = getattr(self._command, "fd", None)
        return fd

    def kept_folder(self) -> int:
        """The run folder's handle for this command (inside :meth:`resolved`), opened now and
        kept for the rest of the command if it has none yet (the folder appeared meanwhile).
        ``FileNotFoundError`` when there is no such folder."""
        fd: int | None = getattr(self._command, "fd", None)
        if fd is None:
            fd = self._command.fd = self._open_run_dir()
        return fd

    def bound_path(self, name: str) -> str:
        """``name`` in this command's run folder, for opens by name (:func:`via_folder`)."""
        return via_folder(self.dir_fd, self.run_dir, name)

    def resolved(self) -> AbstractContextManager[None]:
        """Resolve the run folder once for everything inside (one command); nests. A run
        folder that does not exist yet is resolved by whatever first needs it."""
        if getattr(self._command, "depth", 0):
            return _Nested(self._command)
        return _Resolved(self)

    def _end_command(self) -> None:
        """Close what the command that ends kept open: the run folder's handle."""
        fd, self._command.fd = self._command.fd, None
        if fd is not None:
            os.close(fd)

    def _folder(self) -> AbstractContextManager[int]:
        """The run folder's handle: this command's, else one opened for this call only.
        ``FileNotFoundError`` when there is no such folder."""
        if getattr(self._command, "depth", 0):
            return _Held(self.kept_folder())  # (the folder appeared during the command: kept)
        return self._folder_once()

    @contextmanager
    def _folder_once(self) -> Iterator[int]:
        fd = self._open_run_dir()
        try:
            yield fd
        finally:
            os.close(fd)

    def _open_runs_root(self) -> int:
        root = self.run_dir.parent
        try:
            return os.open(root, _DIR_FLAGS)
        except NotADirectoryError:
            raise NoRunsFolder(root) from None
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise storage_error(exc, root) from exc

    def _open_run_dir(self) -> int:
        # The runs root is the user's choice and may be a link; the run folder may not. In one
        # call where all is well (O_NOFOLLOW holds for the last part of the path only, the run
        # folder); anything else is looked at again part by part, to say what is wrong.
        try:
            return os.open(self._run_dir_path, _DIR_FLAGS | _NOFOLLOW)
        except OSError:
            pass
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
                        raise symlink_error(self.run_dir) from None
                    if not stat.S_ISDIR(mode):
                        raise InputError(f"{self.run_dir} is {_kind(mode)}, not a run folder; move it "
                                         "away or pick another run id", code="not_a_run",
                                         path=str(self.run_dir)) from None
            raise symlink_error(self.run_dir)  # a folder and a link, turn about, while looked at
        finally:
            os.close(root_fd)

    def _open(self, dir_fd: int, name: str, flags: int, *, writing: bool) -> int:
        """Open ``name`` in the run folder: a regular file, never a link; a file a writer
        uses must have no second hard link (a write through it would change another file)."""
        try:
            fd = os.open(name, flags | _FILE_FLAGS, 0o644, dir_fd=dir_fd)
        except FileNotFoundError:
            raise
        except OSError as exc:
            path = self.run_dir / name
            if exc.errno == errno.ELOOP:  # (O_NOFOLLOW met a link)
                raise symlink_error(path) from None
            if exc.errno not in (errno.EISDIR, errno.ENXIO):
                raise storage_error(exc, path) from exc
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            raise self._not_a_file(path, mode) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise self._not_a_file(self.run_dir / name, info.st_mode)
            if writing and info.st_nlink > 1:
                raise self._hard_linked(self.run_dir / name, info.st_nlink)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _hard_linked(path: Path, links: int) -> InputError:
        """The error for a file a writer would use that has ``links`` hard links: a write
        through it would change another file."""
        return InputError(
            f"{path} has {links} hard links; escalate refuses to write a log or lock file "
            "that is also another file — replace it with a copy of itself", code="hard_link",
            path=str(path))

    @staticmethod
    def _not_a_file(path: Path, mode: int) -> InputError:
        return InputError(f"{path} is {_kind(mode)}; escalate only uses regular files in a run folder "
                          "(move it away)", code="not_a_file", path=str(path))
