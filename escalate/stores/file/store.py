"""The file store: a runs folder with one folder per run (the default store).

``RUNS/<run>/events.ndjson`` is the log (:class:`~escalate.stores.file.log.FileLog`: the sidecar lock,
crash-safe appends, torn tails), ``events.ndjson.cache.sqlite`` beside it the checkpoint
(:class:`~escalate.stores.file.checkpoint.Checkpoint`). This module puts them behind the seam of
:mod:`escalate.stores.seam`; every guarantee is theirs, listed in ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

from escalate.config import Clock
from escalate.core.replay import Progress, Replayed, replay
from escalate.core.state import RunState
from escalate.errors import LockTimeout, NoRunsFolder, StoreUnavailable, UnknownRun, storage_error
from escalate.stores.checkpoint import fold_from, mark_after
from escalate.stores.file.checkpoint import Checkpoint
from escalate.stores.file.log import LOG_NAME, FileLog
from escalate.stores.file.run_folder import via_folder
from escalate.stores.seam import Closing, RecoveredFirstLines, first_line

if TYPE_CHECKING:
    from escalate.core.payloads import Recovery

# A pool's derived totals (escalate.stores.seam.Transaction.derived), beside its log.
DERIVED_NAME = "events.ndjson.derived.sqlite"
# How long after a log's last change its times tell every later change (FileLedger.stamp):
# many clock ticks (Linux keeps file times in steps of a tick, at most 10 ms).
_SETTLED_NS = 100_000_000


class FileStore(Closing):
    """A runs folder (:class:`escalate.stores.seam.Store`). It keeps nothing open:
    ``close()`` has nothing to do (each of its ledgers closes its own checkpoint)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def where(self) -> str:
        return str(self.root)

    def check_usable(self) -> None:
        """:class:`NoRunsFolder` (exit 2) when the runs folder is a file or lies under one: bad
        input, never an I/O error to retry. A missing folder is made by the first write."""
        try:
            mode = os.stat(self.root).st_mode
        except NotADirectoryError:  # (a file among its parents)
            raise NoRunsFolder(self.root) from None
        except OSError:
            return  # missing, or unreadable: the command's own reads and writes say so
        if not stat.S_ISDIR(mode):
            raise NoRunsFolder(self.root)

    def prepare(self) -> int:
        """Create the runs folder (1) if it is not there yet (0)."""
        self.check_usable()
        if self.root.is_dir():
            return 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except (NotADirectoryError, FileExistsError):  # a file in its place, or above it, meanwhile
            raise NoRunsFolder(self.root) from None
        except OSError as exc:
            raise storage_error(exc, self.root) from exc
        return 1

    def ledger(self, run_id: str, *, lock_timeout: float) -> FileLedger:
        return FileLedger(self, run_id, lock_timeout=lock_timeout)

    def now(self, clock: Clock) -> datetime:
        return clock()  # the machine's clock: a runs folder has no other

    def run_ids(self) -> Iterator[str]:
        """The ids of runs here (folders with a log), sorted."""
        if not self.root.is_dir():
            return
        for entry in sorted(self.root.iterdir()):
            if entry.is_dir() and not entry.is_symlink() and (entry / LOG_NAME).is_file():
                yield entry.name


@functools.cache
def os_user() -> str:
    """The OS user of this process, from its effective uid (``uid:N`` without a passwd
    entry): what a runs folder vouches for. Not ``$USER`` nor ``$LOGNAME``, which anyone
    sets; a process without root cannot change its uid. Read once per process, so never
    inside a critical section but the first."""
    import pwd

    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid:{uid}"


class FileLedger:
    """One run folder (:class:`escalate.stores.seam.LedgerStore`)."""

    def __init__(self, store: FileStore, run_id: str, *, lock_timeout: float) -> None:
        self.run_id = run_id
        self.progress: Progress | None = None
        self._store = store
        self.log = FileLog(store.root / run_id, lock_timeout=lock_timeout)
        # A file beside the log, opened through the run folder's handle as the log is.
        self.checkpoint: Checkpoint | None = Checkpoint(store.root / run_id, lambda: self.log.dir_fd)

    @property
    def where(self) -> str:
        return self._store.where

    def command(self) -> contextlib.AbstractContextManager[None]:
        return self.log.resolved()

    def close(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint.close()

    def exists(self) -> bool:
        return self.log.exists()

    def head(self) -> tuple[bool, bytes | None]:
        # The run folder opened once for both: whether the log is there, and its first line.
        with self.log.resolved():
            if not self.exists():
                return False, None
            line = first_line(self)
        return True, None if line is None else line + b"\n"

    def create(self, first_lines: bytes | BinaryIO, recovered: RecoveredFirstLines) -> bool:
        return self.log.create(first_lines, recovered, self._has_first_line)

    def transaction(self, *, checkpoint: bool = True) -> contextlib.AbstractContextManager[FileTransaction]:
        return _Critical(self, checkpoint)

    def read(self, *, checkpoint: bool = True) -> Replayed:
        with self._present(), self.log.resolved():
            replayed = self.fold(writable=False, checkpoint=checkpoint)
            if replayed.problem is None:
                return replayed
            return self._confirmed(replayed, lambda: self.fold(writable=False, checkpoint=checkpoint))

    def verify(self) -> Replayed:
        def fold() -> Replayed:
            return replay(self.log, self.run_id, tolerant=True, progress=self.progress)

        with self._present():
            replayed = fold()
        return self._confirmed(replayed, fold) if replayed.problems else replayed

    def reader(self) -> BinaryIO:
        return self.log.reader()

    def size(self) -> int:
        return self.log.size()

    def stamp(self) -> str | None:
        """The log's file and its modification and change times: any write changes them,
        and nobody can set a change time back. Times are kept in coarse steps (a clock tick),
        so while the last change is that recent, a change after
        it might leave them as they are: None until then (then the log is read whole)."""
        info = self.log.stat()
        if time.time_ns() - max(info.st_mtime_ns, info.st_ctime_ns) < _SETTLED_NS:
            return None
        return f"{info.st_dev}:{info.st_ino}:{info.st_mtime_ns}:{info.st_ctime_ns}"

    def sync(self) -> None:
        self.log.sync()

    approvers_are_roles = False  # names as given, unless a policy says approvers_match vouched

    def role(self) -> str:
        """The OS user of this process (:func:`os_user`): who wrote the line, as far as a
        runs folder can vouch (docs/escalation.md, "Who is who")."""
        return os_user()

    def wait_for_change(self, seen_size: int, timeout_s: float, *, poll_s: float) -> bool:
        """Poll the log's size (a file tells nobody it grew)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.size() != seen_size:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(poll_s, left))

    # ------------------------------------------------------------------ internals

    def _unknown(self) -> UnknownRun:
        return UnknownRun(f"no run {self.run_id} under {self.where}; check the run id with "
                          "'escalate runs list'", run=self.run_id)

    @contextmanager
    def _present(self) -> Iterator[None]:
        """A run folder or log that disappears during a command (moved away, or swapped for
        a link and back) is no run, as if it had never been there: nothing was written."""
        try:
            yield
        except FileNotFoundError:
            raise self._unknown() from None

    def _confirmed(self, replayed: Replayed, fold: Callable[[], Replayed]) -> Replayed:
        """A problem that a reader without the lock finds may be a writer's recovery seen
        half-way: a torn tail written over between two of its reads glues the old torn bytes
        to the end of the new lines. It is reported only if a fold under the run's lock
        finds it too. Where the lock cannot be had (read-only media, a lock held past the
        timeout) the first reading stands."""
        try:
            with self.log.locked():
                return fold()
        except (LockTimeout, StoreUnavailable, OSError):
            return replayed

    def fold(self, *, writable: bool, checkpoint: bool) -> Replayed:
        """Fold the log, from the checkpoint when it still matches the log (then only the
        lines after it are read) and ``checkpoint``. Only a writer holding the lock may build
        the checkpoint (``writable``: :meth:`FileTransaction.load`)."""
        # A writer's lock file was opened without following a link; a reader checks it here.
        if not writable and not self.log.exists():
            raise self._unknown()
        info = None  # (a writer's: what the checkpoint is checked against, under the lock)
        try:
            log_fd = self.log.handle(writable=writable)
            if writable and (info := os.fstat(log_fd)).st_size == 0:
                raise self._unknown()
        except FileNotFoundError:
            raise self._unknown() from None
        start = None
        if self.checkpoint is not None and checkpoint:
            loaded = self.checkpoint.load(log_fd, writable=writable, info=info)
            if loaded is not None:
                state, offset, last_line_start, lines = loaded
                start = Replayed(state=state, offset=offset, torn_bytes=0, lines=lines,
                                 last_line_start=last_line_start)
                if writable:
                    # A writer's checkpoint matched the log to its last byte (Checkpoint.load),
                    # and the lock keeps every other writer out: no line follows it to fold.
                    state.run_id = self.run_id  # (a copied run folder is that copy)
                    start.checkpoint_current = True
                    if self.progress is not None:
                        self.progress(offset, offset)  # done, as a fold reports it
                    return start
        return fold_from(self.log, self.run_id, start, writable=writable, progress=self.progress)

    def _has_first_line(self) -> bool:
        """True when the log holds a complete first write (a run exists, perhaps corrupt)."""
        with contextlib.suppress(UnknownRun):
            replay(self.log, self.run_id, stop_after=1)
            return True
        return False


class _Critical:
    """:meth:`FileLedger.transaction`: the run's lock held around a :class:`FileTransaction`,
    and a run folder or log that disappears meanwhile reported as no run, as
    :meth:`FileLedger._present` does (a class, not a generator: on every write's path)."""

    __slots__ = ("_checkpoint", "_ledger", "_locked", "_transaction")

    def __init__(self, ledger: FileLedger, checkpoint: bool) -> None:
        self._ledger, self._checkpoint = ledger, checkpoint

    def __enter__(self) -> FileTransaction:
        self._locked = locked = self._ledger.log.locked()
        try:
            locked.__enter__()
        except FileNotFoundError:
            raise self._ledger._unknown() from None
        self._transaction = FileTransaction(self._ledger, checkpoint=self._checkpoint)
        return self._transaction

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        try:
            self._transaction.close()
        finally:
            try:
                self._locked.__exit__(kind, exc, traceback)
            except FileNotFoundError:
                raise self._ledger._unknown() from None
        if isinstance(exc, FileNotFoundError):
            raise self._ledger._unknown() from None


class FileTransaction:
    """A command's critical section: the run's lock is held (:class:`escalate.stores.seam.Transaction`)."""

    def __init__(self, ledger: FileLedger, *, checkpoint: bool) -> None:
        self._ledger = ledger
        self._from_checkpoint = checkpoint
        self._saved_to = ""
        self._db: sqlite3.Connection | None = None  # the derived values, opened on first use

    def load(self) -> Replayed:
        return self._ledger.fold(writable=True, checkpoint=self._from_checkpoint)

    def now(self, clock: Clock) -> datetime:
        return clock()

    def recovery(self, replayed: Replayed) -> Recovery | None:
        # A torn tail is recorded first and only moved aside when this write happens, so
        # a command refused after this leaves the log as it found it.
        if not replayed.torn_bytes:
            return None
        self._saved_to = self._ledger.log.side_file_name(replayed.offset)
        return {"type": "recovery", "torn_bytes": replayed.torn_bytes, "saved_to": self._saved_to}

    def append(self, replayed: Replayed, lines: list[bytes]) -> None:
        log = self._ledger.log
        if self._saved_to:
            log.set_aside(replayed.offset, self._saved_to)
        if lines:
            log.append(b"".join(lines), torn_from=replayed.offset if self._saved_to else None)

    def save_checkpoint(self, replayed: Replayed, state: RunState, lines: list[bytes]) -> None:
        checkpoint = self._ledger.checkpoint
        mark = mark_after(replayed, lines)
        if checkpoint is None or mark is None:
            return
        checkpoint.save(state, mark.offset, mark.last_line_start, mark.lines,
                        self._ledger.log.handle(writable=True))

    def derived_epoch(self) -> str:
        return _boot_id()  # not synced: values do not outlive this boot of the machine

    def derived(self, keys: Iterable[str]) -> dict[str, bytes] | None:
        wanted = list(keys)
        try:
            marks = ",".join("?" * len(wanted))
            rows = self._derived_db().execute(f"SELECT key, value FROM derived WHERE key IN ({marks})",
                                              wanted).fetchall()
        except (sqlite3.Error, OSError):
            return None  # damaged: the pool rebuilds it
        return {key: bytes(value) for key, value in rows}

    def save_derived(self, values: Mapping[str, bytes | None], *, replace: bool = False) -> bool:
        try:
            with self._derived_db() as db:
                if replace:
                    db.execute("DELETE FROM derived")
                deleted = [(key,) for key, value in values.items() if value is None]
                if deleted:
                    db.executemany("DELETE FROM derived WHERE key = ?", deleted)
                db.executemany("INSERT OR REPLACE INTO derived (key, value) VALUES (?, ?)",
                               [(key, value) for key, value in values.items() if value is not None])
        except (sqlite3.Error, OSError):
            self._db = None
            self._discard_derived()
            return False
        return True

    def close(self) -> None:
        """End of the critical section (the connections are kept for the next one)."""
        self._db = None
        if self._ledger.checkpoint is not None:
            self._ledger.checkpoint.end()

    def _derived_db(self) -> sqlite3.Connection:
        """The pool's derived store (see escalate.pools.book). Not synced: it is rebuilt after
        a crash of the machine; a killed writer's save is rolled back by SQLite's log, so
        what is read back is always one writer's whole save. The connection is kept for the
        process's next critical section on the same file (opening one costs more than the
        rest of a write)."""
        if self._db is None:
            self._db = _DERIVED.connection(self._ledger.log)
        return self._db

    def _discard_derived(self) -> None:
        _DERIVED.drop()
        path = self._ledger.log.bound_path(DERIVED_NAME)
        for name in (path, f"{path}-journal", f"{path}-wal", f"{path}-shm"):
            try:
                Path(name).unlink(missing_ok=True)
            except OSError as exc:
                raise storage_error(exc, self._ledger.log.run_dir / DERIVED_NAME) from exc


class _KeptConnection:
    """The derived store's connection kept across a process's critical sections: one
    file at a time, dropped after a fork or when the file at the path is another one. Its
    path goes through a handle of the pool's folder kept with it (as the run checkpoint's)."""

    def __init__(self) -> None:
        self._db: sqlite3.Connection | None = None
        self._key: tuple[int, ...] = (0,)
        self._folder: int | None = None

    def connection(self, log: FileLog) -> sqlite3.Connection:
        folder = log.dir_fd
        try:
            info = os.stat(DERIVED_NAME, dir_fd=folder, follow_symlinks=False) if folder is not None \
                else os.stat(log.run_dir / DERIVED_NAME, follow_symlinks=False)
            # The change time too: a file removed and made again may get the same inode.
            key: tuple[int, ...] = (os.getpid(), info.st_dev, info.st_ino, info.st_ctime_ns)
        except FileNotFoundError:
            key = (os.getpid(),)
        if self._db is not None and key == self._key:
            return self._db
        self.drop()
        kept = os.dup(folder) if folder is not None else None
        try:
            db = sqlite3.connect(via_folder(kept, log.run_dir, DERIVED_NAME), isolation_level=None,
                                 check_same_thread=False)
            # A write-ahead log: no journal file made and removed per save, which would also
            # weigh on the fsync of the run's log that follows on the same file system.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=OFF")
            db.execute("CREATE TABLE IF NOT EXISTS derived (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
            db.isolation_level = "DEFERRED"
            info = os.stat(via_folder(kept, log.run_dir, DERIVED_NAME))
        except BaseException:
            if kept is not None:
                os.close(kept)
            raise
        self._db, self._folder = db, kept
        self._key = (os.getpid(), info.st_dev, info.st_ino, info.st_ctime_ns)
        return db

    def drop(self) -> None:
        if self._db is not None and self._key[0] == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
        if self._folder is not None and self._key[0] == os.getpid():
            os.close(self._folder)
        self._db, self._folder, self._key = None, None, (0,)


_DERIVED = _KeptConnection()


@functools.cache
def _boot_id() -> str:
    """This boot of the machine."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as source:
            return source.read().strip()
    except OSError:
        return "unknown"
