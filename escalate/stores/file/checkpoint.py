"""A derived, disposable checkpoint of a run's fold, so a command costs the same at a
million events as at a thousand.

``events.ndjson.cache.sqlite`` beside the log holds the fold as of a byte offset: the
small run-wide state as one blob, and tasks and escalations as rows looked up by id (a
command reads only the rows it touches). It is keyed by the offset, the start and the
hash of the last folded line: before use, that line is read back from the log and hashed,
so a log that was truncated, replaced or rewritten at that point is noticed and the checkpoint
is rebuilt from the log. Blob and rows carry CRCs; a checkpoint that is missing, stale,
truncated or garbage changes no answer, only speed. The log stays the only truth.

Only a writer holding the run's lock saves or removes the checkpoint; readers use it read-only.
Any error from the checkpoint — a failed CRC, a damaged SQLite page, a file that cannot be
opened, written or removed, a path that is not a plain file — means: bypass the checkpoint and
fold the log. Nothing the checkpoint does after an append can change a command's answer.

What the key cannot see is an edit in place *before* the checkpointed offset combined with an
append after it: the log grew, so its size and times changed as an append changes them,
and the last folded line is intact. Writers refuse any log that changed behind the checkpoint
(they rebuild from the whole log, and find the edit); readers accept a grown log, so a
reader through the checkpoint does not see such an edit — ``runs verify`` and ``gate`` never
use the checkpoint. Catching it here would mean re-reading every byte before the offset,
which is the cost of the fold the checkpoint exists to avoid.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import stat
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson

from escalate.core.events import line_hash
from escalate.core.state import EscalationState, RunState, TaskRow, TaskTable
from escalate.stores.checkpoint import (
    CODECS,
    CheckpointInvalid,
    LazyRows,
    LoadedRows,
    check_blob,
    checked,
    encode_escalation,
    encode_task,
    run_fields,
    state_from_blob,
    with_rows,
)
from escalate.stores.file.run_folder import via_folder

V = TypeVar("V")

# The file keeps the name it had when the checkpoint was called a cache: run folders made by
# earlier versions keep theirs.
CHECKPOINT_NAME = "events.ndjson.cache.sqlite"
# SQLite opens these beside the database by name.
_SIDE_SUFFIXES = ("-wal", "-shm", "-journal")
# The statements of every write, by table: made once (a new string per command would be
# hashed again to find its compiled statement in the connection's cache).
_SELECT_ROW = {table: f"SELECT data, crc FROM {table} WHERE key = ?" for table in CODECS}
_UPSERT = {table: f"INSERT INTO {table} (key, data, crc) VALUES (?, ?, ?) "
                  "ON CONFLICT(key) DO UPDATE SET data = excluded.data, crc = excluded.crc"
           for table in CODECS}


class Rows(LazyRows[V]):
    """A table of the SQLite checkpoint (every row checked against its CRC)."""

    def __init__(self, connection: sqlite3.Connection, table: str,
                 guard: threading.RLock, saved: dict[str, bytes] | None = None) -> None:
        super().__init__(table)
        self._connection = connection
        self._guard = guard
        # Rows this process saved last, as the file holds them (Checkpoint._saved): not read back.
        self._saved = saved or {}

    def _read_one(self, key: str) -> V | None:
        if key in self._saved:
            value: V = self._decode(key, self._saved[key])
            return value
        row = self._fetch(_SELECT_ROW[self._table], (key,))
        return None if row is None else self._checked_row(key, row[0], row[1])

    def _stored(self, key: str) -> bool:
        if key in self._saved:
            return True
        return self._fetch(f"SELECT 1 FROM {self._table} WHERE key = ?", (key,)) is not None

    def _stored_count(self) -> int:
        return int(self._fetch_all(f"SELECT count(*) FROM {self._table}")[0][0])

    def _stored_rows(self) -> Iterator[tuple[str, Callable[[], V]]]:
        for key, data, crc in self._fetch_all(f"SELECT key, data, crc FROM {self._table} ORDER BY n"):
            yield key, functools.partial(self._checked_row, key, data, crc)

    def _checked_row(self, key: str, data: bytes, crc: int) -> V:
        value: V = self._decode(key, checked(key, data, crc))  # (the table's codec: CODECS)
        return value

    def _fetch_all(self, sql: str, parameters: tuple[str, ...] = ()) -> list[Any]:
        """Run one query on the shared connection, under the guard that keeps a thread from
        closing it meanwhile; a damaged file (any SQLite error) is :class:`CheckpointInvalid`."""
        with self._guard:
            try:
                return self._connection.execute(sql, parameters).fetchall()
            except sqlite3.Error as exc:
                raise CheckpointInvalid(f"the checkpoint cannot be read ({exc})") from exc

    def _fetch(self, sql: str, parameters: tuple[str, ...]) -> Any:
        rows = self._fetch_all(sql, parameters)
        return rows[0] if rows else None

    def read_all(self) -> LoadedRows[V]:
        """Every row, checked, read now (for readers, inside their read transaction)."""
        rows = self._fetch_all(f"SELECT data, crc FROM {self._table} ORDER BY n")
        crc32, prefix = zlib.crc32, CODECS[self._table][2]
        for number, (data, crc) in enumerate(rows):  # _checked, inlined: once per task of the run
            if crc32(data) != crc or not data.startswith(prefix):
                raise CheckpointInvalid(f"row {number + 1} of {self._table} fails its checksum")
        return LoadedRows([row[0] for row in rows], self._table)


class Checkpoint:
    """The checkpoint file of one run."""

    def __init__(self, run_dir: Path, folder: Callable[[], int | None] = lambda: None) -> None:
        self._run_dir = run_dir
        # The run folder's handle for the current command: every open by name goes through
        # it (see escalate.stores.file.run_folder.via_folder), never through a path that may
        # have been swapped.
        self._folder = folder
        self._writer_dir: int | None = None  # the handle the kept connection's path goes through
        # A writer keeps its connection for its next command: opening one costs more than
        # the rest of the checkpoint's work. It is only used under the run's lock, and dropped
        # after a fork or when the file at the path is no longer the one it opened.
        self._writer: sqlite3.Connection | None = None
        self._writer_for = (0, 0, 0)  # (pid, st_dev, st_ino)
        # The run-wide part this process saved last (decoded, and as the bytes written, which
        # hold a random token of that save), the rows it wrote then (by table), the kept
        # connection it went through, and the state it saved. The run row is always read back;
        # only where it is these very bytes (the file is this save, not a copy put back in place
        # nor another file) and the log is as it was at the save (checked as for any load) are
        # they not decoded, nor those rows read back. The state is handed to one command only
        # (it folds into it in place): a command that fails or saves nothing leaves none kept.
        self._saved: tuple[sqlite3.Connection, dict[str, Any], bytes,
                           dict[str, dict[str, bytes]], RunState | None] | None = None
        # Threads sharing a Ledger take turns under the run's lock; this guard also keeps
        # one thread from closing the kept connection while another runs a statement on it
        # (which crashes inside SQLite), whatever the lock does.
        self._guard = threading.RLock()

    @property
    def path(self) -> str:
        """The checkpoint file in this command's run folder."""
        return via_folder(self._folder(), self._run_dir, CHECKPOINT_NAME)

    def _plain_file(self) -> tuple[int, int]:
        """``(st_dev, st_ino)`` of the checkpoint file, once it and SQLite's side files beside it
        (where present) are checked to be plain files with one link each. SQLite opens them
        by name and follows links, which could lead its writes out of the run folder; a
        folder or a device is no checkpoint either. :class:`CheckpointInvalid` otherwise."""
        folder = self._folder()
        if folder is None:
            path, folder = os.path.join(self._run_dir, CHECKPOINT_NAME), None
        else:
            path = CHECKPOINT_NAME  # (relative to the run folder's handle: no path to build or walk)
        identity = _plain(path, folder)
        for suffix in _SIDE_SUFFIXES:  # (_plain with missing_ok, inlined: on every write's path)
            # A journal is there only outside WAL mode: asked first whether the name exists
            # (no link followed), which raises nothing where it does not, as a stat would.
            if suffix == "-journal" and not os.access(path + suffix, os.F_OK, dir_fd=folder,
                                                      follow_symlinks=False):
                continue
            try:
                info = os.stat(path + suffix, dir_fd=folder, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                raise CheckpointInvalid(f"{path + suffix} is not a plain file with one link")
        return identity

    def _writer_connection(self) -> sqlite3.Connection:
        dev, ino = self._plain_file()
        key = (os.getpid(), dev, ino)
        if self._writer is None or self._writer_for != key:
            self._drop_writer()
            self._writer = self._connect_writer()
            self._writer_for = key
        return self._writer

    def _connect_writer(self, *, create: bool = False) -> sqlite3.Connection:
        """The connection a writer keeps across commands. SQLite reopens and removes its side
        files by the name it was given, so that name goes through a handle of the run folder
        kept as long as the connection (the command's own is closed when it ends)."""
        folder = self._folder()
        kept = os.dup(folder) if folder is not None else None
        try:
            connection = self._connect(via_folder(kept, self._run_dir, CHECKPOINT_NAME), writable=True,
                                       create=create)
        except BaseException:
            if kept is not None:
                os.close(kept)
            raise
        self._writer_dir = kept
        return connection

    def end(self) -> None:
        """The writer's command ends: a transaction it began and did not save is let go."""
        with self._guard:
            if self._writer is not None and self._writer.in_transaction:
                try:
                    self._writer.rollback()
                except sqlite3.Error:
                    self._drop_writer()

    def close(self) -> None:
        """End the kept connection and the folder handle that goes with it (the next
        writing command opens them again)."""
        with self._guard:
            self._drop_writer()

    def __del__(self) -> None:
        # A safety net, kept for a reason: the library never asked callers to close a Ledger
        # before ``close()`` existed, and the folder handle is a bare descriptor that nothing
        # else would ever close, so a scheduler opening a Ledger per task would run out of
        # handles. Everything in escalate closes what it opens.
        with contextlib.suppress(Exception):
            self._drop_writer()

    def _drop_writer(self) -> None:
        self._saved = None
        if self._writer is not None and self._writer_for[0] == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                self._writer.close()
            if self._writer_dir is not None:
                os.close(self._writer_dir)
        self._writer, self._writer_dir = None, None

    def _connect(self, path: str, *, writable: bool, create: bool = False) -> sqlite3.Connection:
        connection = sqlite3.connect(f"file:{path}?mode={'rw' if writable else 'ro'}", uri=True,
                                     isolation_level=None, check_same_thread=False)
        try:
            connection.execute("PRAGMA busy_timeout = 5000")
            if create:
                # WAL (recorded in the file) lets a reader keep one consistent snapshot while a
                # writer commits, and keeps a transaction all-or-nothing if a process dies.
                connection.execute("PRAGMA journal_mode = WAL")
            if writable:
                connection.execute("PRAGMA synchronous = OFF")  # disposable: never worth an fsync
            else:
                # Every lazy row read of this state comes from the same snapshot as its totals.
                connection.execute("BEGIN")
        except sqlite3.Error:
            connection.close()
            raise
        return connection

    def _create(self) -> sqlite3.Connection:
        """A new, empty checkpoint file made here (never through a link), kept as the writer's."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        os.close(fd)
        dev, ino = self._plain_file()
        self._writer = self._connect_writer(create=True)  # SQLite takes an empty file as new
        self._writer_for = (os.getpid(), dev, ino)
        return self._writer

    def load(self, log: int, *, writable: bool,
             info: os.stat_result | None = None) -> tuple[RunState, int, int, int] | None:
        """``(state, offset, last_line_start, lines)`` from the checkpoint if it matches the log
        (``log``: the command's handle on it; ``info``: its ``fstat``, if the caller just took
        it) at its offset, else ``None``. For a writer, the
        log then ends at ``offset``: it is the same file, untouched since the save
        (:func:`_check_log_at`).

        A writer's state reads rows lazily (a row that fails its checksum, or a read that
        SQLite fails, then raises :class:`CheckpointInvalid` mid-command, before anything is
        written, and the command is redone from the log); a reader's state is read whole,
        and checked, right here.
        """
        if writable:
            with self._guard:
                try:
                    connection = self._writer_connection()
                    # One SQLite transaction for the whole command (its reads, then the save),
                    # not one per statement: the run's lock keeps every other writer out anyway.
                    if not connection.in_transaction:  # (a load again in the same command)
                        connection.execute("BEGIN IMMEDIATE")
                    return self._load(connection, log, writable, info)
                except (CheckpointInvalid, sqlite3.Error, orjson.JSONDecodeError, KeyError, TypeError,
                        ValueError, OSError):
                    self._drop_writer()
                    return None
        try:
            self._plain_file()
            connection = self._connect(self.path, writable=False)
        except (CheckpointInvalid, sqlite3.Error, OSError):
            return None
        try:
            loaded = self._load(connection, log, writable)
            state = loaded[0]
            assert isinstance(state.tasks.rows, Rows) and isinstance(state.escalations, Rows)
            state.tasks = TaskTable(state.tasks.rows.read_all())
            state.escalations = state.escalations.read_all()
            state.open_escalations = {key: state.escalations[key] for key in state.open_escalations}
            return loaded
        except (CheckpointInvalid, sqlite3.Error, orjson.JSONDecodeError, KeyError, TypeError, ValueError,
                OSError):
            return None
        finally:
            connection.close()

    def _load(self, connection: sqlite3.Connection, log: int, writable: bool,
              info: os.stat_result | None = None) -> tuple[RunState, int, int, int]:
        log_info = os.fstat(log) if info is None else info
        saved = None
        if writable:
            saved, self._saved = self._saved, None  # (for this command only: its save keeps one again)
        rows: dict[str, dict[str, bytes]] = {}
        row = connection.execute("SELECT data, crc FROM run WHERE key = 'run'").fetchone()
        if row is None:
            raise CheckpointInvalid("empty")
        if saved is not None and saved[0] is connection and row[0] == saved[2]:
            blob, rows = saved[1], saved[3]  # (the log is checked below as for a row read back)
        else:
            blob, saved = orjson.loads(checked("run", row[0], row[1])), None
        offset, start = blob["offset"], blob["last_line_start"]
        _check_log_at(log, log_info, blob["identity"], start, offset, blob["last_hash"],
                      appended_ok=not writable)
        # A reader's rows need no guard: its connection is its own.
        guard = self._guard if writable else threading.RLock()
        # (Typed by annotation, not by Rows[...](...): calling a subscripted class makes an alias
        # and stores it on each instance.)
        tasks: Rows[TaskRow] = Rows(connection, "tasks", guard, rows.get("tasks"))
        escalations: Rows[EscalationState] = Rows(connection, "escalations", guard, rows.get("escalations"))
        if saved is None or saved[4] is None:
            return state_from_blob(blob, tasks, escalations), offset, start, blob["lines"]
        # The state this writer saved is the blob's, field for field (run_fields read them from
        # it): it is not built again, only checked and given this command's rows, as
        # state_from_blob does.
        check_blob(blob)
        return with_rows(saved[4], blob, TaskTable(tasks), escalations), offset, start, blob["lines"]

    def save(self, state: RunState, offset: int, last_line_start: int, lines: int,
             log: int) -> None:
        """Write the fold as of ``offset`` of the log (``log``: the command's handle on it; the
        caller holds the run's lock). This runs after
        the append and before its fsync, and the checkpoint only ever costs speed: any failure is
        swallowed after removing the file (or, if even that fails, leaving it to be bypassed)."""
        with self._guard:
            try:
                self._save(state, offset, last_line_start, lines, log)
            except Exception:  # nothing here may change the answer or skip the fsync
                if self._writer is not None:
                    with contextlib.suppress(sqlite3.Error):
                        self._writer.rollback()
                self.discard()

    def _save(self, state: RunState, offset: int, last_line_start: int, lines: int,
              log: int) -> None:
        self._saved = None
        tasks, escalations = state.tasks.rows, state.escalations
        incremental = isinstance(tasks, Rows) and isinstance(escalations, Rows)
        connection = tasks._connection if isinstance(tasks, Rows) and incremental else None
        if connection is None:
            self.discard()
            connection = self._create()
        if not connection.in_transaction:  # (begun by the load: Checkpoint.load)
            connection.execute("BEGIN IMMEDIATE")
        if not incremental:
            for table in ("tasks", "escalations"):
                connection.execute(f"CREATE TABLE {table} (n INTEGER PRIMARY KEY, key TEXT UNIQUE "
                                   "NOT NULL, data BLOB NOT NULL, crc INTEGER NOT NULL)")
            connection.execute("CREATE TABLE run (key TEXT PRIMARY KEY, data BLOB, crc INTEGER)")
        rows: dict[str, Any] = {
            "tasks": tasks.dirty() if isinstance(tasks, Rows) else
            ((key, encode_task(key, task)) for key, task in tasks.items()),
            "escalations": escalations.dirty() if isinstance(escalations, Rows) else
            ((key, encode_escalation(key, e)) for key, e in escalations.items()),
        }
        written: dict[str, dict[str, bytes]] = {}
        for table, pairs in rows.items():
            if incremental:
                if not (pairs := list(pairs)):
                    continue  # (no row of this table was read or added: most writes touch no escalation)
                written[table] = dict(pairs)
                if len(pairs) == 1:  # (most writes: one task's row, one statement)
                    [(key, data)] = pairs
                    connection.execute(_UPSERT[table], (key, _blob(data), zlib.crc32(data)))
                    continue
            connection.executemany(_UPSERT[table], ((key, data, zlib.crc32(data)) for key, data in pairs))
        fields = run_fields(state, offset, last_line_start, lines, _identity(os.fstat(log)))
        # This save's own token: the next load trusts what it kept of this save only where the
        # file's run row is still these bytes (Checkpoint._load).
        fields["save"] = os.urandom(8).hex()
        blob = orjson.dumps(fields)
        # The row is there once the checkpoint was loaded: changed in place (a replace would
        # delete it and insert it again, writing its index too).
        connection.execute("UPDATE run SET data = ?, crc = ? WHERE key = 'run'" if incremental else
                           "INSERT INTO run (key, data, crc) VALUES ('run', ?, ?)",
                           (_blob(blob), zlib.crc32(blob)))
        connection.execute("COMMIT")
        if connection is self._writer:
            # (A state folded from the whole log holds every task: not kept past its command.)
            self._saved = (connection, fields, blob, written, state if incremental else None)

    def discard(self) -> None:
        """Remove the checkpoint (and SQLite's side files); the next writer rebuilds it. What
        cannot be removed (a folder, another user's file) is left, and bypassed."""
        with self._guard:
            self._drop_writer()
            for suffix in ("", *_SIDE_SUFFIXES):
                with contextlib.suppress(OSError):
                    os.unlink(f"{self.path}{suffix}")


def _blob(data: bytes) -> bytearray:
    """``data`` as sqlite3 binds it without looking for an adapter: a ``bytes`` parameter is
    looked up as adaptable first, which makes and drops an error per parameter; a
    ``bytearray`` is bound as it is (the same BLOB is stored, and read back as ``bytes``)."""
    return bytearray(data)


def _plain(path: str, dir_fd: int | None = None, *, missing_ok: bool = False) -> tuple[int, int]:
    """``(st_dev, st_ino)`` of ``path`` (relative to ``dir_fd``, if given) if it is a plain
    file with one link (not followed); ``missing_ok``: ``(0, 0)`` when there is none."""
    try:
        info = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        if missing_ok:
            return 0, 0
        raise
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        raise CheckpointInvalid(f"{path} is not a plain file with one link")
    return info.st_dev, info.st_ino


def _identity(info: os.stat_result) -> list[int]:
    """What the checkpoint keeps of the log it was folded from: its file, size and times."""
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def _check_log_at(log: int, info: os.stat_result, identity: list[int], start: int, offset: int,
                  expected: str, *, appended_ok: bool) -> None:
    """The log is the file the checkpoint was saved beside, untouched since (same size and times),
    and its line ``[start, offset)`` still hashes to ``expected``.

    A log that grew since is accepted only for reading (``appended_ok``): readers fold the
    new lines while a writer is between its append and its checkpoint save. A writer that finds
    the log changed behind the checkpoint rebuilds from the log, so an edit in place before the
    checkpoint can never be written after.
    """
    dev, ino, size, mtime_ns, ctime_ns = identity
    if info.st_ino != ino or info.st_dev != dev or not 0 <= start < offset <= size:
        raise CheckpointInvalid("the log is another file")
    untouched = info.st_size == size and info.st_mtime_ns == mtime_ns and info.st_ctime_ns == ctime_ns
    if not untouched and not (appended_ok and info.st_size > size):
        raise CheckpointInvalid("the log changed since the checkpoint was saved")
    line = os.pread(log, offset - start, start)
    # (find, not "in": a bytes needle "in" bytes is first tried as an int, an error made and dropped)
    if not line.endswith(b"\n") or line.find(b"\n") != len(line) - 1 or line_hash(line[:-1]) != expected:
        raise CheckpointInvalid("the log's line at the checkpointed offset is not the one folded")
