"""The PostgreSQL store's reading side: a ledger's lines streamed from its rows, and its
fold from the checkpoint in tables (or from the first line), by the same
:func:`escalate.core.replay.replay` the file store uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO

import orjson

from escalate.core.replay import Replayed
from escalate.core.state import EscalationState, TaskRow
from escalate.stores.checkpoint import CheckpointInvalid, LoadedRows, fold_from, state_from_blob
from escalate.stores.postgres.rows import PgRows, line_stream
from escalate.stores.postgres.transaction import Connection

# Rows fetched per query when lines are streamed.
BATCH = 2000


def fetch_lines(connection: Connection, run_id: str, after: int, up_to: int) -> list[tuple[bytes, int]]:
    """The lines ending after byte ``after`` and at most at ``up_to``, at most :data:`BATCH`."""
    return connection.execute(
        "SELECT line, end_offset FROM escalate_events WHERE ledger = %s AND end_offset > %s "
        "AND end_offset <= %s ORDER BY end_offset LIMIT %s", (run_id, after, up_to, BATCH)).fetchall()


class Lines:
    """A ledger's lines as :func:`replay` reads them (:class:`escalate.core.replay.LineSource`)."""

    def __init__(self, where: str, open_stream: Callable[[], BinaryIO]) -> None:
        self.where = where
        self._open = open_stream

    def reader(self) -> BinaryIO:
        return self._open()


def lines_of(connection: Connection, run_id: str, where: str, size: int) -> Lines:
    """The first ``size`` bytes of lines of ``run_id``, read in ``connection``'s transaction."""
    return Lines(where, lambda: line_stream(
        lambda after, up_to: fetch_lines(connection, run_id, after, up_to), size))


def fold(connection: Connection, run_id: str, where: str, row: tuple[Any, ...], *, writable: bool,
         checkpoint: bool) -> Replayed:
    """Fold the ledger from its checkpoint (then only the lines after it are read), or
    from its first line when there is none, ``checkpoint`` is off or it cannot be read.
    ``row``: the ledger's (size, lines, checkpoint, checkpoint_lines)."""
    size, _, saved, checkpoint_lines = row[:4]
    lines = lines_of(connection, run_id, where, size)
    start = _checkpoint(connection, run_id, saved, checkpoint_lines, writable) \
        if checkpoint and saved is not None else None
    return fold_from(lines, run_id, start, writable=writable)


def _checkpoint(connection: Connection, run_id: str, checkpoint: bytes, checkpoint_lines: int,
                writable: bool) -> Replayed | None:
    """The checkpoint as a start for :func:`replay`, or None when it cannot be used. A
    writer's tasks and escalations are read as the fold asks for them; a reader's all
    at once, in its snapshot."""
    def query(sql: str, parameters: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return connection.execute(sql.encode(), parameters).fetchall()

    try:
        blob = orjson.loads(checkpoint)
        if blob["lines"] != checkpoint_lines:
            return None
        tasks: Any
        escalations: Any
        if writable:
            tasks = PgRows[TaskRow](query, "tasks", run_id)
            escalations = PgRows[EscalationState](query, "escalations", run_id)
        else:
            tasks, escalations = (LoadedRows([bytes(data) for (data,) in query(
                f"SELECT data FROM escalate_{table} WHERE ledger = %s ORDER BY n",
                (run_id,))], table) for table in ("tasks", "escalations"))
        state = state_from_blob(blob, tasks, escalations)
    except (CheckpointInvalid, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return Replayed(state=state, offset=blob["offset"], torn_bytes=0, lines=blob["lines"],
                    last_line_start=blob["last_line_start"])
