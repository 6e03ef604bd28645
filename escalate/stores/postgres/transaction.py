"""The PostgreSQL store's writing side: a command's transaction (:class:`PgTransaction`),
whose writes go out with the commit in one round trip as SQL literals, and a new ledger's
first lines (:func:`insert_first_lines`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, BinaryIO

import psycopg

from escalate.config import Clock
from escalate.core.replay import Replayed
from escalate.core.state import RunState
from escalate.stores.checkpoint import encode_escalation, encode_task, mark_after, run_blob
from escalate.stores.postgres.failures import Outcome
from escalate.stores.postgres.rows import PgRows

if TYPE_CHECKING:
    from escalate.core.payloads import Recovery
    from escalate.stores.postgres.store import PgLedger

Connection = psycopg.Connection[tuple[Any, ...]]
# More rows than this written at once: an import or a rebuilt checkpoint.
MANY = 1000
# The channel every commit notifies, with the ledger's id as payload (run ids are longer
# than a channel name may be).
CHANNEL = "escalate_changes"


class PgTransaction:
    """A command's transaction, the ledger's row locked (:class:`escalate.stores.seam.Transaction`).
    The writes wait in :attr:`_writes` and go out with the commit, in one round trip, as
    literals (:func:`text_literal`, :func:`bytes_literal`; the values are ids, numbers and bytes)."""

    def __init__(self, ledger: PgLedger, connection: Connection, row: tuple[Any, ...], *,
                 checkpoint: bool, step: Callable[[str], None], savepoint: str | None = None) -> None:
        self._ledger = ledger
        self._step = step  # store.STEP_HOOK's caller (escalate.stores.postgres.store)
        self._connection = connection
        self._row = row
        self._read_at = time.monotonic()  # when the row (and the server's time) arrived
        self._from_checkpoint = checkpoint
        self._ledger_text = text_literal(ledger.run_id)
        self._size, self._lines = int(row[0]), int(row[1])
        self._writes: list[str] = []
        self._appended = False
        self._checkpoint: tuple[bytes, int] | None = None
        # Inside another ledger's transaction: the end releases this savepoint, and the
        # outer transaction commits both.
        self._savepoint = savepoint
        if savepoint is None:  # no writes of another transaction wait for this one's commit
            ledger._store.outcome = ledger._store.outcome._replace(held=False)

    def load(self) -> Replayed:
        replayed = self._ledger.fold(self._connection, self._row, writable=True,
                                      checkpoint=self._from_checkpoint)
        self._step("loaded")
        return replayed

    def now(self, clock: Clock) -> datetime:
        store = self._ledger._store
        return store.server_clock.time(self._row[5], clock, store.where, self._read_at)  # with the lock

    def recovery(self, replayed: Replayed) -> Recovery | None:
        return None  # a transaction leaves no torn tail behind

    def append(self, replayed: Replayed, lines: list[bytes]) -> None:
        if not lines:
            return
        rows = []
        seq, offset = replayed.lines, replayed.offset
        for line in lines:
            seq += 1
            offset += len(line)
            rows.append(f"({self._ledger_text}, {seq}, {offset}, {bytes_literal(line)})")
        self._writes.append(f"INSERT INTO escalate_events (ledger, seq, end_offset, line) VALUES "
                            f"{', '.join(rows)}")
        self._lines, self._size = seq, offset
        self._appended = True
        self._step("appended")

    def save_checkpoint(self, replayed: Replayed, state: RunState, lines: list[bytes]) -> None:
        mark = mark_after(replayed, lines)
        if mark is None:
            return
        tasks, escalations = state.tasks.rows, state.escalations
        rows: dict[str, Iterable[tuple[str, bytes]]]
        if isinstance(tasks, PgRows) and isinstance(escalations, PgRows):
            rows = {"tasks": tasks.dirty(), "escalations": escalations.dirty()}
        else:  # a fold from the first line: the rows are written anew
            self._writes += [f"DELETE FROM escalate_{table} WHERE ledger = {self._ledger_text}"
                             for table in ("tasks", "escalations")]
            rows = {"tasks": ((key, encode_task(key, task)) for key, task in tasks.items()),
                    "escalations": ((key, encode_escalation(key, escalation))
                                    for key, escalation in escalations.items())}
        for table, pairs in rows.items():
            values = [f"({self._ledger_text}, {text_literal(key)}, {bytes_literal(data)})"
                      for key, data in pairs]
            for start in range(0, len(values), MANY):
                self._writes.append(f"INSERT INTO escalate_{table} (ledger, key, data) VALUES "
                                    f"{', '.join(values[start:start + MANY])} "
                                    "ON CONFLICT (ledger, key) DO UPDATE SET data = excluded.data")
            if len(values) > MANY:
                # Fresh statistics: with the old ones the planner may take the big table for an
                # empty one and scan it whole, every command.
                self._writes.append(f"ANALYZE escalate_{table}")
        self._checkpoint = (run_blob(state, mark.offset, mark.last_line_start, mark.lines, []), mark.lines)
        self._step("checkpointed")

    def commit(self) -> None:
        """The writes, the ledger's row (what is stored now, the checkpoint), a notice to
        waiters and the commit, sent together."""
        if self._appended or self._checkpoint is not None:
            blob, count = self._checkpoint or (None, None)
            checkpoint = "" if blob is None else \
                f", checkpoint = {bytes_literal(blob)}, checkpoint_lines = {count}"
            self._writes.append(f"UPDATE escalate_ledgers SET size = {self._size}, lines = {self._lines}"
                                f"{checkpoint} WHERE ledger = {self._ledger_text}")
        if self._appended and self._row[4]:  # someone waits (PgLedger.wait_for_change)
            self._writes.append(f"SELECT pg_notify('{CHANNEL}', {self._ledger_text})")
        self._step("before_commit")
        end = "COMMIT" if self._savepoint is None else f"RELEASE SAVEPOINT {self._savepoint}"
        store = self._ledger._store
        if self._savepoint is not None:  # these writes go out with the outer commit
            self._connection.execute("; ".join([*self._writes, end]).encode())
            store.outcome = store.outcome._replace(held=store.outcome.held or bool(self._writes))
            return
        sent = bool(self._writes) or store.outcome.held
        if sent:  # from here until the server confirms, the writes may or may not be committed
            store.outcome = Outcome(commit_sent=True)
        self._connection.execute("; ".join([*self._writes, end]).encode())
        store.outcome = Outcome(confirmed=sent or store.outcome.confirmed)

    # A pool's books (escalate.pools.book), in escalate_derived: written at once, in this
    # transaction, so they commit with the write they follow or not at all.

    def derived_epoch(self) -> str:
        return "committed"  # durable with the lines: never lost without a trace

    def derived(self, keys: Iterable[str]) -> dict[str, bytes] | None:
        rows = self._connection.execute(
            "SELECT key, value FROM escalate_derived WHERE ledger = %s AND key = ANY(%s)",
            (self._ledger.run_id, list(keys))).fetchall()
        return {str(key): bytes(value) for key, value in rows}

    def save_derived(self, values: Mapping[str, bytes | None], *, replace: bool = False) -> bool:
        run_id = self._ledger.run_id
        with self._connection.cursor() as cursor:
            if replace:
                cursor.execute("DELETE FROM escalate_derived WHERE ledger = %s", (run_id,))
            deleted = [key for key, value in values.items() if value is None]
            if deleted:
                cursor.execute("DELETE FROM escalate_derived WHERE ledger = %s AND key = ANY(%s)",
                               (run_id, deleted))
            kept = [(run_id, key, value) for key, value in values.items() if value is not None]
            if kept:
                cursor.executemany("INSERT INTO escalate_derived (ledger, key, value) VALUES (%s, %s, %s) "
                                   "ON CONFLICT (ledger, key) DO UPDATE SET value = excluded.value", kept)
        return True


def text_literal(value: str) -> str:
    """``value`` as an SQL text literal. The values are ids (escalate.core.ids: no quote, no
    backslash), quotes doubled all the same; the transaction sets standard_conforming_strings,
    so a backslash is no escape either."""
    return "'" + value.replace("'", "''") + "'"


def bytes_literal(value: bytes) -> str:
    """``value`` as a bytea literal (hex digits only)."""
    return f"'\\x{value.hex()}'::bytea"


def last_row(connection: Connection, statements: str) -> tuple[Any, ...] | None:
    """Run several statements in one round trip; the first row of the last that returns rows."""
    with connection.cursor() as cursor:
        cursor.execute(statements.encode())
        while cursor.description is None and cursor.nextset():
            pass
        return cursor.fetchone() if cursor.description is not None else None


def rollback(connection: Connection) -> None:
    """End a transaction that will not commit (a connection already lost has none to end)."""
    if not connection.broken and not connection.closed:
        with contextlib.suppress(psycopg.Error):
            connection.rollback()


def measured(first_lines: bytes | BinaryIO) -> tuple[int, int, Iterable[bytes]]:
    """The size, the number of lines and the lines of a new ledger's first write. A stream
    (an import) is read twice, a chunk or a line at a time: to measure it, then the lines."""
    if isinstance(first_lines, bytes):
        return len(first_lines), first_lines.count(b"\n"), first_lines.splitlines(keepends=True)
    start, size, count = first_lines.tell(), 0, 0
    while chunk := first_lines.read(1 << 20):
        size, count = size + len(chunk), count + chunk.count(b"\n")
    first_lines.seek(start)
    return size, count, first_lines  # (a binary stream iterates over its lines)


def insert_first_lines(connection: Connection, run_id: str, lines: Iterable[bytes], count: int) -> None:
    """A new ledger's lines (one, or a whole imported log: COPY, then fresh statistics,
    without which the planner may take the big table for an empty one and scan it whole on
    every command; a role that does not own the table skips that, with a notice)."""
    with connection.cursor() as cursor, cursor.copy(
            "COPY escalate_events (ledger, seq, end_offset, line) FROM STDIN") as copy:
        offset = 0
        for seq, line in enumerate(lines, start=1):
            offset += len(line)
            copy.write_row((run_id, seq, offset, line))
    if count > MANY:
        connection.execute("ANALYZE escalate_events")
