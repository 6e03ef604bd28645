"""The PostgreSQL store's tables, created and upgraded by numbered steps.

``escalate_schema_version`` lists the steps applied. :func:`ensure_schema` applies the
missing ones in one transaction each, so it is idempotent, and it is safe when several
processes make their first use of an empty database at once: the steps run while the row
``version = 0`` of that table is locked (a row lock, as the ledgers use: no advisory lock,
no ``LOCK TABLE``), and a process that loses the race to create the table itself retries.

Tables (every name starts with ``escalate_``):

- ``escalate_ledgers``: one row per ledger (a run), the row a writer locks. ``size`` and
  ``lines`` count what is stored; ``checkpoint`` is the fold's run-wide part as of
  ``checkpoint_lines`` lines (``NULL``: none yet), disposable like the file store's checkpoint;
  ``listened_until``: commits send a notice until then (someone waits).
- ``escalate_derived``: a pool's books, ``(ledger, key)`` → bytes, disposable.
- ``escalate_events``: ``(ledger, seq)`` → the exact NDJSON line bytes (with the newline)
  and ``end_offset``, where the line ends when the lines are read as one file. A trigger
  refuses ``UPDATE``, ``DELETE`` and ``TRUNCATE``.
- ``escalate_tasks`` and ``escalate_escalations``: the checkpoint's rows, one per task or
  escalation, each the object ``runs show --json`` lists; ``n`` keeps first-seen order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

_STEPS: tuple[str, ...] = (
    # 1: the ledgers, the append-only events, the checkpoint's rows.
    """
    CREATE TABLE escalate_ledgers (
        ledger text PRIMARY KEY,
        size bigint NOT NULL,
        lines bigint NOT NULL,
        checkpoint bytea,
        checkpoint_lines bigint NOT NULL DEFAULT 0,
        created_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE escalate_events (
        ledger text NOT NULL,
        seq bigint NOT NULL,
        end_offset bigint NOT NULL,
        line bytea NOT NULL,
        PRIMARY KEY (ledger, seq)
    );
    CREATE UNIQUE INDEX escalate_events_by_offset ON escalate_events (ledger, end_offset);
    CREATE TABLE escalate_tasks (
        ledger text NOT NULL,
        key text NOT NULL,
        n bigserial,
        data bytea NOT NULL,
        PRIMARY KEY (ledger, key)
    );
    CREATE TABLE escalate_escalations (
        ledger text NOT NULL,
        key text NOT NULL,
        n bigserial,
        data bytea NOT NULL,
        PRIMARY KEY (ledger, key)
    );
    CREATE FUNCTION escalate_refuse_rewrite() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'escalate_events is append-only: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END;
    $$;
    CREATE TRIGGER escalate_events_append_only BEFORE UPDATE OR DELETE ON escalate_events
        FOR EACH ROW EXECUTE FUNCTION escalate_refuse_rewrite();
    CREATE TRIGGER escalate_events_no_truncate BEFORE TRUNCATE ON escalate_events
        FOR EACH STATEMENT EXECUTE FUNCTION escalate_refuse_rewrite();
    """,
    # 2: until when a waiter listens for this ledger's commits (they notify only then).
    """
    ALTER TABLE escalate_ledgers ADD COLUMN listened_until timestamptz NOT NULL DEFAULT '-infinity';
    """,
    # 3: a pool's books (escalate.pools.book): disposable values derived from its member runs,
    # written in the transaction of the write they follow.
    """
    CREATE TABLE escalate_derived (
        ledger text NOT NULL,
        key text NOT NULL,
        value bytea NOT NULL,
        PRIMARY KEY (ledger, key)
    );
    """,
)

SCHEMA_VERSION = len(_STEPS)


def schema_version(connection: psycopg.Connection[tuple[Any, ...]]) -> int:
    """The last step applied (0: none, or no table yet). Runs in its own transaction."""
    import psycopg

    try:
        with connection.transaction():
            row = connection.execute("SELECT max(version) FROM escalate_schema_version").fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return int(row[0]) if row is not None and row[0] is not None else 0


def ensure_schema(connection: psycopg.Connection[tuple[Any, ...]]) -> int:
    """Apply the steps this database lacks; returns how many were applied. ``connection``
    is idle (outside a transaction)."""
    if schema_version(connection) >= SCHEMA_VERSION:
        return 0
    _create_version_table(connection)
    applied = 0
    with connection.transaction():
        # Whoever holds this row applies the steps; the others wait, then find them done.
        connection.execute("SELECT version FROM escalate_schema_version WHERE version = 0 FOR UPDATE")
        row = connection.execute("SELECT max(version) FROM escalate_schema_version").fetchone()
        done = int(row[0]) if row is not None and row[0] is not None else 0
        for version in range(done + 1, SCHEMA_VERSION + 1):
            connection.execute(_STEPS[version - 1].encode())
            connection.execute("INSERT INTO escalate_schema_version (version) VALUES (%s)", (version,))
            applied += 1
    return applied


def _create_version_table(connection: psycopg.Connection[tuple[Any, ...]]) -> None:
    """The version table with its lock row. Two first uses at once may both try to create it:
    the loser's ``CREATE … IF NOT EXISTS`` can still fail on the catalog's unique index, and
    then finds the table on its next try."""
    import psycopg

    for attempt in range(5):
        try:
            with connection.transaction():
                connection.execute("CREATE TABLE IF NOT EXISTS escalate_schema_version ("
                                   "version integer PRIMARY KEY, "
                                   "applied_at timestamptz NOT NULL DEFAULT now())")
                connection.execute("INSERT INTO escalate_schema_version (version) VALUES (0) "
                                   "ON CONFLICT (version) DO NOTHING")
            return
        except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable,
                psycopg.errors.DuplicateObject):
            if attempt == 4:
                raise
