"""The checkpoint every store keeps, as bytes: one codec for all of them.

A checkpoint is the fold of a ledger as of a byte offset: the run-wide state as one blob
(:func:`run_blob`, derived from :class:`~escalate.core.state.RunState`'s fields, so a new
field is kept without a change here) and tasks and escalations as rows looked up by id (a
command reads only the rows it touches). A store keeps the bytes (the file store in SQLite
beside the log, :mod:`escalate.stores.file.checkpoint`; PostgreSQL in its tables) and says
how a row is read: a writer's :class:`LazyRows` reads a row only when the fold asks for it
and hands back what changed; a reader's :class:`LoadedRows` holds every row, checked, read
in one go. Any doubt about a checkpoint is :class:`CheckpointInvalid`: fold the log instead.
"""

from __future__ import annotations

import operator
import zlib
from collections.abc import Callable, ItemsView, Iterator, MutableMapping, ValuesView
from typing import Any, Generic, TypeVar

import orjson

from escalate.core.money import MAX_TOTAL_MICROS
from escalate.core.replay import LineSource, Progress, Replayed, replay
from escalate.core.state import (
    EscalationState,
    PassItems,
    PassValues,
    Policy,
    RunState,
    TaskRow,
    TaskTable,
    task_json,
    task_row,
)

V = TypeVar("V")

# 5: escalations keep their requester, reason, priority, needed extension and delivery (with
# the failures in a row); a checkpoint of an older format lacks them, so it is rebuilt.
# 7: whether the run is archived. 8: the hash of each escalation's line (signed approvals).
# 9: the blob derived from RunState's fields. 10: an escalation's quorum as it fired.
# 11: the hash of the line that set the policy (signed policy changes). 12: the key that
# signed each approval so far (an approver counts once, whatever name it gives). 13: the
# least grant the approvals so far signed for (a grant above it is refused).
FORMAT = 13

# RunState's fields the blob does not hold, and why: tasks and escalations are rows of their
# own; last_actor only spares the fold a check (the next line is checked anyway); a pool's
# log is never checkpointed. Every other field is kept as it is, but these two: the policy
# as its JSON, the open escalations as their ids.
_NOT_IN_BLOB = frozenset({"tasks", "escalations", "last_actor", "pool"})
BLOB_FIELDS = tuple(name for name in RunState.__slots__ if name not in _NOT_IN_BLOB)
_PLAIN_FIELDS = tuple(name for name in BLOB_FIELDS if name not in {"policy", "open_escalations"})
_plain_values = operator.attrgetter(*_PLAIN_FIELDS)  # (every save reads them: in one call)


class CheckpointInvalid(Exception):
    """A checkpoint turned out not to match the lines (or to be damaged) part-way through a
    command, before anything was written: the command is decided again without it."""


def run_blob(state: RunState, offset: int, last_line_start: int, lines: int,
             identity: list[int]) -> bytes:
    """The run-wide part of a checkpoint, as of the byte ``offset`` after ``lines`` lines
    (``identity``: what the store knows of the log it was folded from)."""
    return orjson.dumps(run_fields(state, offset, last_line_start, lines, identity))


def run_fields(state: RunState, offset: int, last_line_start: int, lines: int,
               identity: list[int]) -> dict[str, Any]:
    """:func:`run_blob` before it is encoded: what :func:`state_from_blob` takes (plain JSON
    values, none shared with ``state``)."""
    fields: dict[str, Any] = {"format": FORMAT, "identity": identity, "offset": offset,
                              "last_line_start": last_line_start, "lines": lines}
    fields.update(zip(_PLAIN_FIELDS, _plain_values(state), strict=True))
    fields["policy"] = state.policy.to_json()
    fields["open_escalations"] = sorted(state.open_escalations)
    return fields


def check_blob(blob: dict[str, Any]) -> None:
    """:class:`CheckpointInvalid` unless the run-wide part ``blob`` (what :func:`run_fields`
    gives) is of this format and within the limit on totals: the checks of every state taken
    from a checkpoint, built from it or kept by the writer that saved it."""
    if blob["format"] != FORMAT:
        raise CheckpointInvalid("another format")
    if blob["spent_micros"] + blob["reserved_micros"] > MAX_TOTAL_MICROS:
        # Saved by a version without the limit: the fold of the log names the line past it.
        raise CheckpointInvalid("a checkpoint past the limit on totals")


def state_from_blob(blob: dict[str, Any], tasks: MutableMapping[str, TaskRow],
                    escalations: MutableMapping[str, EscalationState]) -> RunState:
    """The state a :func:`run_blob` holds, with its tasks and escalations in ``tasks`` and
    ``escalations`` (read lazily by a writer); a missing key is ``KeyError``."""
    check_blob(blob)
    table = TaskTable(tasks)
    state = RunState(**{name: blob[name] for name in _PLAIN_FIELDS}, policy=Policy(**blob["policy"]),
                     tasks=table)
    return with_rows(state, blob, table, escalations)


def with_rows(state: RunState, blob: dict[str, Any], tasks: TaskTable,
              escalations: MutableMapping[str, EscalationState]) -> RunState:
    """``state`` (the run-wide part ``blob`` holds) given a command's rows: its tasks, its
    escalations, and the open ones ``blob`` names; no actor (a checkpoint keeps none)."""
    state.tasks, state.escalations, state.last_actor = tasks, escalations, None
    state.open_escalations = {key: escalations[key] for key in blob["open_escalations"]}
    return state


def checked(key: str, data: bytes, crc: int) -> bytes:
    if zlib.crc32(data) != crc:
        raise CheckpointInvalid(f"row {key!r} fails its checksum")
    return data


class Mark:
    """Where a checkpoint stands: after ``lines`` lines, at the byte ``offset``, the last of
    them starting at ``last_line_start``. (A plain slotted class: every command imports this
    module, and a ``NamedTuple`` is built on import.)"""

    __slots__ = ("last_line_start", "lines", "offset")

    def __init__(self, offset: int, last_line_start: int, lines: int) -> None:
        self.offset, self.last_line_start, self.lines = offset, last_line_start, lines


def mark_after(replayed: Replayed, lines: list[bytes]) -> Mark | None:
    """Where the checkpoint of a write stands once ``lines`` follow the fold ``replayed``;
    None when there is nothing to save (no line written, and the checkpoint is current)."""
    if not lines and replayed.checkpoint_current:
        return None
    offset = replayed.offset + sum(map(len, lines))
    last_line_start = offset - len(lines[-1]) if lines else replayed.last_line_start
    return Mark(offset, last_line_start, replayed.lines + len(lines))


def fold_from(lines: LineSource, run_id: str, start: Replayed | None, *, writable: bool,
              progress: Progress | None = None) -> Replayed:
    """Fold a ledger's ``lines`` from the checkpoint ``start`` (then only the lines after it
    are read), or from the first line when it is None. A problem is only ever reported from
    the lines themselves: with one, the fold is done again without the checkpoint. What a
    reader (not ``writable``) shows stops before the first line the problem casts doubt on
    (with a broken chain, the line before the one that names it)."""
    replayed = replay(lines, run_id, start=start, progress=progress)
    replayed.checkpoint_current = start is not None and replayed.lines == start.lines
    if start is not None and replayed.problem is not None:
        replayed = replay(lines, run_id, progress=progress)
    if replayed.problem is not None and not writable:
        trusted = replayed.problem.first_suspect_line - 1
        if 0 < trusted < replayed.state.seq:
            replayed.state = replay(lines, run_id, stop_after=trusted).state
    # A ledger is what its store calls it (a copied run folder is that copy).
    replayed.state.run_id = run_id
    return replayed


# A row holds the object exactly as ``runs show --json`` lists it, so a reader can hand a
# whole table to the JSON output without rebuilding an object per row. The row's own id
# is its first field (covered by the row's CRC); the key column only indexes it, and a
# row found under a key that is not its own id is damage.


def encode_task(key: str, task: TaskRow) -> bytes:
    return orjson.dumps(task_json(key, task))


def _decode_task(key: str, data: bytes) -> TaskRow:
    fields = orjson.loads(data)
    if fields.get("task") != key:
        raise CheckpointInvalid(f"row {key!r} holds task {fields.get('task')!r}")
    return task_row(fields)


def encode_escalation(key: str, escalation: EscalationState) -> bytes:
    # The line's hash is kept for signed resolutions, not shown: it is not in to_json.
    return orjson.dumps({**escalation.to_json(), "line_hash": escalation.line_hash})


def _decode_escalation(key: str, data: bytes) -> EscalationState:
    fields = orjson.loads(data)
    if fields.get("id") != key:
        raise CheckpointInvalid(f"row {key!r} holds escalation {fields.get('id')!r}")
    return EscalationState(**fields)


# Per table: (encode, decode, how a stored row starts, before its id).
CODECS: dict[str, tuple[Any, Any, bytes]] = {
    "tasks": (encode_task, _decode_task, b'{"task":"'),
    "escalations": (encode_escalation, _decode_escalation, b'{"id":"'),
}


_MISSING: Any = object()  # (LazyRows.get: no row under the key)


class LazyRows(MutableMapping[str, V], Generic[V]):
    """A checkpoint table as a mapping, with this command's reads and writes in memory: a
    row is read when the fold asks for it and kept, because the fold changes objects in
    place; :meth:`dirty` hands every row read or added back to be written. A store says
    how its rows are read (the file store's SQLite: ``stores.file.checkpoint.Rows``;
    PostgreSQL: ``stores.postgres.rows.PgRows``)."""

    def __init__(self, table: str) -> None:
        self._table = table
        self._encode, self._decode, _ = CODECS[table]
        self._touched: dict[str, V] = {}
        self._known_missing: set[str] = set()
        self._new: dict[str, None] = {}  # keys this command added, in order

    def _read_one(self, key: str) -> V | None:
        """The stored row ``key``, decoded and checked (None: no such row)."""
        raise NotImplementedError

    def _stored(self, key: str) -> bool:
        """Whether the row ``key`` is stored."""
        raise NotImplementedError

    def _stored_count(self) -> int:
        raise NotImplementedError

    def _stored_rows(self) -> Iterator[tuple[str, Callable[[], V]]]:
        """Every stored row's key, in the order first written, and how to decode it."""
        raise NotImplementedError

    def get(self, key: str, default: Any = None) -> Any:
        """The row ``key`` (read once, then kept), else ``default``; a missing row raises
        nothing (a new task's id is looked up by every reserve)."""
        touched = self._touched
        if key in touched:
            return touched[key]
        if key in self._known_missing:
            return default
        value = self._read_one(key)
        if value is None:
            self._known_missing.add(key)
            return default
        touched[key] = value
        return value

    def __getitem__(self, key: str) -> V:
        value: V = self.get(key, _MISSING)  # (get answers Any: a row, or the default given)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key, _MISSING) is not _MISSING

    def __setitem__(self, key: str, value: V) -> None:
        if key not in self._touched and (key in self._known_missing or not self._stored(key)):
            self._new[key] = None
        self._known_missing.discard(key)
        self._touched[key] = value

    def __delitem__(self, key: str) -> None:
        raise TypeError("the ledger never forgets a task or an escalation")

    def __iter__(self) -> Iterator[str]:
        for key, _ in self._each_row():
            yield key

    def __len__(self) -> int:
        return self._stored_count() + len(self._new)

    def items(self) -> ItemsView[str, V]:
        """All rows in the order they were first written, with this command's changes."""
        return PassItems(self, self._each_row)

    def values(self) -> ValuesView[V]:
        """The rows' values, as :meth:`items`."""
        return PassValues(self, self._each_row)

    def _each_row(self) -> Iterator[tuple[str, V]]:
        """``(key, value)`` of every row in the order first written, in one pass over the
        stored rows (a row not read yet is decoded from that pass, not fetched again by key)."""
        touched = self._touched
        for key, decode in self._stored_rows():
            yield key, touched[key] if key in touched else decode()
        for key in self._new:
            yield key, touched[key]

    def dirty(self) -> Iterator[tuple[str, bytes]]:
        """``(key, row)`` of every row read or added by this command."""
        for key, value in self._touched.items():
            yield key, self._encode(key, value)


class LoadedRows(MutableMapping[str, V], Generic[V]):
    """A reader's table: every row checked and in memory, each decoded only when used.

    :meth:`json_array` gives the whole table as the JSON array ``runs show --json``
    prints, straight from the stored rows for those nobody decoded.
    """

    def __init__(self, stored: list[bytes], table: str) -> None:
        self._stored = stored
        self._encode, self._decode, self._prefix = CODECS[table]
        self._ids: list[str] | None = None  # read from the rows on first need
        self._position: dict[str, int] | None = None  # built on the first lookup by key
        self._live: dict[str, V] = {}  # decoded (and maybe changed since) or added
        self._added: list[str] = []

    @property
    def _keys(self) -> list[str]:
        if self._ids is None:
            # Each row starts with its id: {"task":"<id>", … (ids never hold a quote).
            start = len(self._prefix)
            self._ids = [data[start:data.index(b'"', start)].decode() for data in self._stored]
        return self._ids

    def _index(self) -> dict[str, int]:
        if self._position is None:
            self._position = {key: number for number, key in enumerate(self._keys)}
        return self._position

    def __getitem__(self, key: str) -> V:
        if key in self._live:
            return self._live[key]
        value: V = self._decode(key, self._stored[self._index()[key]])
        self._live[key] = value
        return value

    def __setitem__(self, key: str, value: V) -> None:
        if key not in self._live and key not in self._index():
            self._added.append(key)
        self._live[key] = value

    def __delitem__(self, key: str) -> None:
        raise TypeError("the ledger never forgets a task or an escalation")

    def __iter__(self) -> Iterator[str]:
        yield from self._keys
        yield from self._added

    def __len__(self) -> int:
        return len(self._keys) + len(self._added)

    def json_array(self) -> bytes:
        """``[{…}, …]`` in first-seen order."""
        live, encode = self._live, self._encode
        if not live and self._stored:
            # One join over the rows as stored, the brackets riding on the first and last.
            ends = self._stored[0], self._stored[-1]
            self._stored[0] = b"[" + self._stored[0]
            self._stored[-1] = self._stored[-1] + b"]"
            try:
                return b",".join(self._stored)
            finally:
                self._stored[0], self._stored[-1] = ends
        parts = [encode(key, live[key]) if key in live else data
                 for key, data in zip(self._keys, self._stored, strict=True)]
        parts += [encode(key, live[key]) for key in self._added]
        return b"[" + b",".join(parts) + b"]"
