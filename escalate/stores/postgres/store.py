"""The PostgreSQL store: ledgers as rows of a database server many machines share.

Behind the seam of :mod:`escalate.stores.seam`, as the file store is. Each command is one
database transaction: ``SET LOCAL lock_timeout``, the ledger's row locked with ``SELECT …
FOR UPDATE`` (no advisory lock), the checkpoint and the lines after it loaded, the new
lines inserted, the checkpoint updated, a ``pg_notify`` for waiters, commit. Acknowledged
means committed, so :meth:`PgLedger.sync` has nothing left to do. The tables are described
in :mod:`escalate.stores.postgres.tables`; the lines are the file store's NDJSON bytes, folded by the
same :func:`escalate.core.replay.replay`.

psycopg 3 is imported only by the pg_ modules, when such a store is opened.

Failures: a lock wait over the timeout is :class:`~escalate.errors.LockTimeout` (exit 7);
the rest are in :mod:`escalate.stores.postgres.failures`. The time of every line is the server's
(:mod:`escalate.stores.postgres.clock`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime
from typing import TYPE_CHECKING, Any, BinaryIO

import psycopg

from escalate.config import Clock
from escalate.core.durations import format_duration
from escalate.core.replay import Progress, Replayed, replay
from escalate.errors import InputError, LockTimeout, UnknownRun
from escalate.stores.postgres import tables
from escalate.stores.postgres.clock import ServerClock
from escalate.stores.postgres.connect import (
    ConnectionPool,
    connect,
    describe,
    in_transaction,
    parse_url,
    quiet_psycopg_log,
)
from escalate.stores.postgres.failures import Outcome, failure
from escalate.stores.postgres.reading import fetch_lines, fold, lines_of
from escalate.stores.postgres.rows import line_stream
from escalate.stores.postgres.tables import ensure_schema
from escalate.stores.postgres.transaction import (
    CHANNEL,
    Connection,
    PgTransaction,
    insert_first_lines,
    last_row,
    measured,
    rollback,
    text_literal,
)
from escalate.stores.seam import Closing, RecoveredFirstLines

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

# Called with each step of a writing command's transaction ("connected", "locked", "loaded",
# "appended", "checkpointed", "before_commit", "committed"): tests cut the connection there.
STEP_HOOK: Callable[[str], None] | None = None

# How much longer than its own wait a waiter asks commits to notify: a waiter that waits
# again soon (runs watch, Ledger.wait) then writes its row about once a minute, not per wake.
_LISTEN_AHEAD_S = 60
# The savepoint of a transaction opened inside another one of the same store.
_NESTED = "escalate_nested"
# Opening a run (LedgerStore.head): the schema's version, the ledger's line count and its
# first line, in one round trip.
_HEAD = ("SELECT (SELECT max(version) FROM escalate_schema_version), "
         "(SELECT lines FROM escalate_ledgers WHERE ledger = %s), "
         "(SELECT line FROM escalate_events WHERE ledger = %s AND seq = 1)")


def _step(name: str) -> None:
    if STEP_HOOK is not None:
        STEP_HOOK(name)


class PgStore(Closing):
    """A PostgreSQL database holding ledgers (:class:`escalate.stores.seam.Store`), reached by a
    URL (one connection, kept for the life of the store in this process), an open
    connection, or a pool."""

    def __init__(self, source: str | Connection | ConnectionPool) -> None:
        quiet_psycopg_log()
        self._url = source if isinstance(source, str) else None
        self._given = source if isinstance(source, psycopg.Connection) else None
        self._pool = None if isinstance(source, (str, psycopg.Connection)) else source
        self._kept: Connection | None = None
        self._kept_pid = 0
        self._listener: Connection | None = None  # LISTENs, for waits (a URL's store only)
        self._listener_pid = 0
        self._listener_guard = threading.Lock()
        self._schema_ready = False
        # Threads sharing one connection take turns: a transaction is the connection's.
        self._guard = threading.RLock()
        # The connection of the transaction open in this process (a pool's, while a member
        # run is written): a nested transaction joins it, so both commit together.
        self._active: Connection | None = None
        self._role: tuple[Connection, str] | None = None  # current_user of _kept, once asked
        self._password = ""
        self._where = "a PostgreSQL database"
        self._described = False  # a pool's database is named by its first connection
        self.server_clock = ServerClock()
        self.outcome = Outcome()  # of its writes: what a failure leaves behind
        if self._url is not None:
            info = parse_url(self._url)
            self._password = str(info.get("password") or "")
            self._where = describe(info)
        elif self._given is not None:
            self._where = describe(self._given.info.get_parameters())

    @property
    def where(self) -> str:
        return self._where

    def close(self) -> None:
        """Close the connections this store opened itself (from a URL; in this process)."""
        for connection, pid in ((self._kept, self._kept_pid), (self._listener, self._listener_pid)):
            if connection is not None and pid == os.getpid():
                connection.close()
        self._kept = self._listener = None

    def __del__(self) -> None:
        # A safety net, kept for a reason: the library never asked callers to close a Ledger
        # opened from a URL before ``close()`` existed; such a store's connections still end
        # with it (psycopg would end them too, but with a ResourceWarning for each).
        # Everything in escalate closes what it opens.
        with contextlib.suppress(Exception):
            self.close()

    def check_usable(self) -> None:
        with self.connection():
            pass

    def ledger(self, run_id: str, *, lock_timeout: float) -> PgLedger:
        return PgLedger(self, run_id, lock_timeout=lock_timeout)

    def now(self, clock: Clock) -> datetime:
        return self.server_clock.now(self, clock)

    def run_ids(self) -> Iterator[str]:
        with self.connection() as connection:
            rows = connection.execute("SELECT ledger FROM escalate_ledgers WHERE lines > 0 "
                                      "ORDER BY ledger").fetchall()
        for (run_id,) in rows:
            yield run_id

    def prepare(self) -> int:
        """Create or upgrade the tables (``escalate store init``); the steps applied."""
        with self.connection(schema=False) as connection:
            applied = ensure_schema(connection)
            self._schema_ready = True
            return applied

    @contextmanager
    def connection(self, *, schema: bool = True) -> Iterator[Connection]:
        """A connection outside any transaction, the schema in place (``schema``); every
        psycopg error inside is reported as escalate's."""
        with self._guard, self.translated():
            if self._active is not None:  # inside this store's open transaction: join it
                yield self._active
                return
            lent = self._pool.connection() if self._pool is not None else nullcontext(self._own())
            with lent as connection:
                if self._pool is not None and not self._described:
                    self._where, self._described = describe(connection.info.get_parameters()), True
                if in_transaction(connection):
                    raise InputError("the PostgreSQL connection given to escalate is inside a "
                                     "transaction: commit or roll it back first (escalate commits "
                                     "each command itself)", code="connection_busy")
                try:
                    if schema and not self._schema_ready:
                        ensure_schema(connection)
                        self._schema_ready = True
                    yield connection
                finally:
                    # Outside autocommit mode, psycopg opened a transaction for a read: end it,
                    # so the connection is as idle as it was given.
                    if not connection.autocommit and not connection.broken and in_transaction(connection):
                        connection.rollback()

    @property
    def in_transaction(self) -> bool:
        """True inside a ledger's transaction of this store, in this process (:meth:`joined`)."""
        return self._active is not None

    @contextmanager
    def joined(self, connection: Connection) -> Iterator[None]:
        """Inside, ``connection`` is in a ledger's transaction: every connection asked of
        this store is that one (a member run's transaction inside its pool's is a savepoint
        of it, and both commit together)."""
        self._active = connection
        try:
            yield
        finally:
            self._active = None

    def current_role(self) -> str:
        """``current_user`` on this store's connection. On a connection or pool it was given,
        asked each time: one connection may serve several people with ``SET ROLE`` between
        commands. On the connection it opened itself from a URL, which nothing but escalate
        uses and escalate never sets a role on, asked once per connection (not a round trip
        per command)."""
        with self.connection() as connection:
            known = self._role
            if known is not None and known[0] is connection:
                return known[1]
            row = connection.execute("SELECT current_user").fetchone()
            role = str(row[0]) if row is not None else ""
            if connection is self._kept:
                self._role = (connection, role)
            return role

    def schema_checked(self) -> None:
        """The schema was found up to date (by a query that asked for its version): no
        connection needs to check it again."""
        self._schema_ready = True

    @contextmanager
    def listening(self) -> Iterator[Connection]:
        """A connection that listens on :data:`CHANNEL`: one kept for it when the store was
        given a URL, else a connection of the pool (or the one given) for as long as this
        lasts."""
        if self._url is None:
            with self.connection() as connection:
                # Notices arrive between transactions only: the wait runs in autocommit mode.
                autocommit, connection.autocommit = connection.autocommit, True
                connection.execute(f"LISTEN {CHANNEL}")
                try:
                    yield connection
                finally:
                    if not connection.broken:
                        connection.execute(f"UNLISTEN {CHANNEL}")
                        connection.autocommit = autocommit
            return
        with self._listener_guard, self.translated():
            if self._listener is None or self._listener.closed or self._listener_pid != os.getpid():
                self._listener = connect(self._url)
                self._listener_pid = os.getpid()
                self._listener.execute(f"LISTEN {CHANNEL}")
            yield self._listener

    def _own(self) -> Connection:
        """The connection this store keeps (a new one after a fork, or after it broke)."""
        if self._given is not None:
            return self._given
        if self._kept is None or self._kept.closed or self._kept_pid != os.getpid():
            assert self._url is not None
            self._kept = connect(self._url)
            self._kept_pid = os.getpid()
        return self._kept

    @contextmanager
    def translated(self) -> Iterator[None]:
        """psycopg's errors as escalate's (:mod:`escalate.stores.postgres.failures`); a connection that
        broke is opened again by the next command."""
        try:
            yield
        except BaseException as exc:
            # (Only a commit that went out unconfirmed may have an unknown outcome.)
            outcome, self.outcome = self.outcome, self.outcome._replace(commit_sent=False)
            if self._kept is not None and self._kept.broken:
                self._kept = None
            if self._listener is not None and self._listener.broken:
                self._listener = None
            error = failure(exc, self.where, self._password, outcome)
            if error is None:
                raise
            raise error from None


class PgLedger:
    """One ledger's rows (:class:`escalate.stores.seam.LedgerStore`)."""

    def __init__(self, store: PgStore, run_id: str, *, lock_timeout: float) -> None:
        self.run_id = run_id
        # A progress bar reads the size of a file; these lines are fetched by query.
        self.progress: Progress | None = None
        self._store = store
        self.lock_timeout = lock_timeout

    @property
    def where(self) -> str:
        return self._store.where

    def command(self) -> AbstractContextManager[None]:
        return nullcontext()

    def close(self) -> None:
        """Nothing of its own to release: the connections are the store's."""

    def exists(self) -> bool:
        with self._store.connection() as connection:
            row = connection.execute("SELECT lines FROM escalate_ledgers WHERE ledger = %s",
                                     (self.run_id,)).fetchone()
        return row is not None and row[0] > 0

    def head(self) -> tuple[bool, bytes | None]:
        """One query: the schema's version, whether the ledger exists and its first line.
        Where the schema is missing or older, it is brought up to date first, as every
        connection does, and the ledger is asked again the usual way."""
        with self._store.connection(schema=False) as connection:
            try:
                row = connection.execute(_HEAD, (self.run_id, self.run_id)).fetchone()
            except psycopg.errors.UndefinedTable:
                row = None  # (no tables yet; connection() ends the failed transaction)
        if row is None or row[0] is None or row[0] < tables.SCHEMA_VERSION:
            return self.exists(), None
        self._store.schema_checked()
        exists = row[1] is not None and row[1] > 0
        return exists, bytes(row[2]) if exists and row[2] is not None else None

    def create(self, first_lines: bytes | BinaryIO, recovered: RecoveredFirstLines) -> bool:
        """Insert the ledger's row and its first lines; False if it exists. (``recovered``
        is for a torn first write, which a transaction never leaves.)"""
        size, count, lines = measured(first_lines)
        with self._store.connection() as connection:
            with connection.transaction():
                made = connection.execute(
                    "INSERT INTO escalate_ledgers (ledger, size, lines) VALUES (%s, %s, %s) "
                    "ON CONFLICT (ledger) DO NOTHING RETURNING ledger",
                    (self.run_id, size, count)).fetchone()
                if made is None:
                    return False
                insert_first_lines(connection, self.run_id, lines, count)
                self._store.outcome = Outcome(commit_sent=True)  # goes out now
            self._store.outcome = Outcome(confirmed=True)  # (for the life of this store)
        return True

    @contextmanager
    def transaction(self, *, checkpoint: bool = True) -> Iterator[PgTransaction]:
        """One round trip opens the transaction, bounds the lock wait and locks the row; the
        rows the fold asks for are read; one more sends every write and the commit. Opened
        inside another ledger's transaction of this store (a member run inside its pool's),
        it is a savepoint of that one: both commit together, or neither."""
        store = self._store
        with store.connection() as connection:
            outer = not store.in_transaction
            _step("connected")
            # At least a millisecond: 0 would mean "wait for ever" to PostgreSQL.
            lock_timeout = f"{max(1, round(self.lock_timeout * 1000))}ms"
            # (A connection that is not in autocommit mode opens the transaction itself.)
            begin = ("BEGIN; " if connection.autocommit else "") if outer else f"SAVEPOINT {_NESTED}; "
            try:
                # Literals are written with standard_conforming_strings on: see _text.
                row = last_row(connection, f"{begin}SET LOCAL standard_conforming_strings = on; "
                                f"SET LOCAL lock_timeout = '{lock_timeout}'; "
                                # The server's clock once the lock is held: this write's time.
                                "SELECT locked.*, clock_timestamp() FROM (SELECT size, lines, "
                                "checkpoint, checkpoint_lines, listened_until > now() AS listened "
                                f"FROM escalate_ledgers WHERE ledger = {text_literal(self.run_id)} "
                                "FOR UPDATE) AS locked")
                if row is None or not row[1]:
                    raise self._unknown()
                _step("locked")
                transaction = PgTransaction(self, connection, row, checkpoint=checkpoint, step=_step,
                                            savepoint=None if outer else _NESTED)
                with store.joined(connection) if outer else nullcontext():
                    yield transaction
                transaction.commit()
            except psycopg.errors.LockNotAvailable:
                self._undo(connection, outer)
                raise LockTimeout(
                    f"run {self.run_id} is locked by another command on {self.where} after "
                    f"{format_duration(self.lock_timeout)}; retry, or raise --lock-timeout",
                    lock_file=f"{self.where} ledger {self.run_id}",
                    timeout_s=self.lock_timeout) from None
            except BaseException:
                self._undo(connection, outer)
                raise
            _step("committed" if outer else "released")

    @staticmethod
    def _undo(connection: Connection, outer: bool) -> None:
        """Roll back a transaction that will not commit, or a nested one's savepoint."""
        if outer:
            rollback(connection)
        elif not connection.broken and not connection.closed:
            with contextlib.suppress(psycopg.Error):
                connection.execute(f"ROLLBACK TO SAVEPOINT {_NESTED}")

    def read(self, *, checkpoint: bool = True) -> Replayed:
        with self._snapshot() as (connection, row):
            return self.fold(connection, row, writable=False, checkpoint=checkpoint)

    def verify(self) -> Replayed:
        with self._snapshot() as (connection, row):
            return replay(lines_of(connection, self.run_id, self.where, row[0]), self.run_id, tolerant=True)

    def reader(self) -> BinaryIO:
        size = self.size()

        def fetch(after: int, up_to: int) -> list[tuple[bytes, int]]:
            with self._store.connection() as connection:
                return fetch_lines(connection, self.run_id, after, up_to)

        return line_stream(fetch, size)

    def size(self) -> int:
        with self._store.connection() as connection:
            row = connection.execute("SELECT size FROM escalate_ledgers WHERE ledger = %s",
                                     (self.run_id,)).fetchone()
        return int(row[0]) if row is not None else 0

    def stamp(self) -> str:
        """Empty: the events table refuses UPDATE and DELETE (a trigger), so lines never change."""
        return ""

    def sync(self) -> None:
        """Nothing to do: the commit made the lines durable before the command answered."""

    approvers_are_roles = True  # approver lists name database roles

    def role(self) -> str:
        """The database role acting now (``current_user``): :meth:`PgStore.current_role`."""
        return self._store.current_role()

    def wait_for_change(self, seen_size: int, timeout_s: float, *, poll_s: float) -> bool:
        """Wait for a commit's notice for this ledger (LISTEN/NOTIFY, no polling).

        A commit notifies only while the ledger's ``listened_until`` is ahead: a notice
        makes concurrent commits queue on one lock of the server, so runs nobody waits on
        do without. A waiter moves it ahead (a write, about once a minute) after it listens
        and before it looks at the size, so every commit it does not see is notified.
        """
        with self._store.listening() as connection:
            row = connection.execute(
                "SELECT size, listened_until > now() + make_interval(secs => %s) FROM escalate_ledgers "
                "WHERE ledger = %s", (timeout_s, self.run_id)).fetchone()
            if row is not None and not row[1]:
                # (The row lock waits for a writer that did not see the old value to commit:
                # the size returned includes its lines.)
                row = connection.execute(
                    "UPDATE escalate_ledgers SET listened_until = now() + make_interval(secs => %s) "
                    "WHERE ledger = %s RETURNING size", (timeout_s + _LISTEN_AHEAD_S, self.run_id)).fetchone()
            if (int(row[0]) if row is not None else 0) != seen_size:
                return True
            return any(notice.payload == self.run_id
                       for notice in connection.notifies(timeout=timeout_s))

    # ------------------------------------------------------------------ internals

    def _unknown(self) -> UnknownRun:
        return UnknownRun(f"no run {self.run_id} in {self.where}; check the run id with "
                          "'escalate runs list'", run=self.run_id)

    @contextmanager
    def _snapshot(self) -> Iterator[tuple[Connection, tuple[Any, ...]]]:
        """A read-only transaction that sees one moment: the checkpoint, the lines and the
        rows agree however many queries it takes."""
        with self._store.connection() as connection, \
                nullcontext() if self._store.in_transaction else connection.transaction():
            if not self._store.in_transaction:  # (inside a write, its transaction is the moment)
                connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            row = connection.execute("SELECT size, lines, checkpoint, checkpoint_lines FROM "
                                     "escalate_ledgers WHERE ledger = %s", (self.run_id,)).fetchone()
            if row is None or not row[1]:
                raise self._unknown()
            yield connection, row

    def fold(self, connection: Connection, row: tuple[Any, ...], *, writable: bool,
             checkpoint: bool) -> Replayed:
        """The ledger folded in ``connection``'s transaction
        (:func:`escalate.stores.postgres.reading.fold`)."""
        return fold(connection, self.run_id, self.where, row, writable=writable, checkpoint=checkpoint)
