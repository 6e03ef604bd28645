"""The checkpoint's tables of tasks and escalations as mappings, for the fold to use as
``RunState.tasks`` and ``RunState.escalations`` (see :mod:`escalate.stores.file.checkpoint`).

A writer's :class:`Rows` reads a row only when the fold asks for it and hands back what
changed; a reader's :class:`LoadedRows` holds every row, checked, read in one go.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
import zlib
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, Generic, TypeVar, cast

import orjson

from escalate.core.state import EscalationState, Task
from escalate.stores.seam import CacheInvalid

V = TypeVar("V")


def checked(key: str, data: bytes, crc: int) -> bytes:
    if zlib.crc32(data) != crc:
        raise CacheInvalid(f"row {key!r} fails its checksum")
    return data


# A row holds the object exactly as ``runs show --json`` lists it, so a reader can hand a
# whole table to the JSON output without rebuilding an object per row. The row's own id
# is its first field (covered by the row's CRC); the key column only indexes it, and a
# row found under a key that is not its own id is damage.


def encode_task(key: str, task: Task) -> bytes:
    return orjson.dumps(task.to_json(key))


def _decode_task(key: str, data: bytes) -> Task:
    fields = orjson.loads(data)
    if fields.get("task") != key:
        raise CacheInvalid(f"row {key!r} holds task {fields.get('task')!r}")
    return Task.from_json(fields)


def encode_escalation(key: str, escalation: EscalationState) -> bytes:
    # The line's hash is kept for signed resolutions, not shown: it is not in to_json.
    return orjson.dumps({**escalation.to_json(), "line_hash": escalation.line_hash})


def _decode_escalation(key: str, data: bytes) -> EscalationState:
    fields = orjson.loads(data)
    if fields.get("id") != key:
        raise CacheInvalid(f"row {key!r} holds escalation {fields.get('id')!r}")
    return EscalationState(**fields)


# Per table: (encode, decode, how a stored row starts, before its id).
_CODECS: dict[str, tuple[Any, Any, bytes]] = {
    "tasks": (encode_task, _decode_task, b'{"task":"'),
    "escalations": (encode_escalation, _decode_escalation, b'{"id":"'),
}


class LazyRows(MutableMapping[str, V], Generic[V]):
    """A checkpoint table as a mapping, with this command's reads and writes in memory: a
    row is read when the fold asks for it and kept, because the fold changes objects in
    place; :meth:`dirty` hands every row read or added back to be written. A store says
    how its rows are read (the SQLite cache: :class:`Rows`; PostgreSQL: ``pg_rows.PgRows``)."""

    def __init__(self, table: str) -> None:
        self._table = table
        self._encode, self._decode, _ = _CODECS[table]
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

    def __getitem__(self, key: str) -> V:
        if key in self._touched:
            return self._touched[key]
        if key in self._known_missing:
            raise KeyError(key)
        value = self._read_one(key)
        if value is None:
            self._known_missing.add(key)
            raise KeyError(key)
        self._touched[key] = value
        return value

    def __setitem__(self, key: str, value: V) -> None:
        if key not in self._touched and (key in self._known_missing or not self._stored(key)):
            self._new[key] = None
        self._known_missing.discard(key)
        self._touched[key] = value

    def __delitem__(self, key: str) -> None:
        raise TypeError("the ledger never forgets a task or an escalation")

    def __iter__(self) -> Iterator[str]:
        for key, _ in self.items():
            yield key

    def __len__(self) -> int:
        return self._stored_count() + len(self._new)

    def items(self) -> Iterator[tuple[str, V]]:  # type: ignore[override]
        """All rows in the order they were first written, with this command's changes."""
        touched = self._touched
        for key, decode in self._stored_rows():
            yield key, touched[key] if key in touched else decode()
        for key in self._new:
            yield key, touched[key]

    def values(self) -> Iterator[V]:  # type: ignore[override]
        for _, value in self.items():
            yield value

    def dirty(self) -> Iterator[tuple[str, bytes]]:
        """``(key, row)`` of every row read or added by this command."""
        for key, value in self._touched.items():
            yield key, self._encode(key, value)


class Rows(LazyRows[V]):
    """A table of the SQLite cache (every row checked against its CRC)."""

    def __init__(self, connection: sqlite3.Connection, table: str,
                 guard: threading.RLock) -> None:
        super().__init__(table)
        self._connection = connection
        self._guard = guard

    def _read_one(self, key: str) -> V | None:
        row = self._fetch(f"SELECT data, crc FROM {self._table} WHERE key = ?", (key,))
        return None if row is None else self._checked_row(key, row[0], row[1])

    def _stored(self, key: str) -> bool:
        return self._fetch(f"SELECT 1 FROM {self._table} WHERE key = ?", (key,)) is not None

    def _stored_count(self) -> int:
        return int(self._fetch_all(f"SELECT count(*) FROM {self._table}")[0][0])

    def _stored_rows(self) -> Iterator[tuple[str, Callable[[], V]]]:
        for key, data, crc in self._fetch_all(f"SELECT key, data, crc FROM {self._table} ORDER BY n"):
            yield key, functools.partial(self._checked_row, key, data, crc)

    def _checked_row(self, key: str, data: bytes, crc: int) -> V:
        return cast(V, self._decode(key, checked(key, data, crc)))

    def _fetch_all(self, sql: str, parameters: tuple[str, ...] = ()) -> list[Any]:
        """Run one query on the shared connection, under the guard that keeps a thread from
        closing it meanwhile; a damaged file (any SQLite error) is :class:`CacheInvalid`."""
        with self._guard:
            try:
                return self._connection.execute(sql, parameters).fetchall()
            except sqlite3.Error as exc:
                raise CacheInvalid(f"the cache cannot be read ({exc})") from exc

    def _fetch(self, sql: str, parameters: tuple[str, ...]) -> Any:
        rows = self._fetch_all(sql, parameters)
        return rows[0] if rows else None

    def read_all(self) -> LoadedRows[V]:
        """Every row, checked, read now (for readers, inside their read transaction)."""
        rows = self._fetch_all(f"SELECT data, crc FROM {self._table} ORDER BY n")
        crc32, prefix = zlib.crc32, _CODECS[self._table][2]
        for number, (data, crc) in enumerate(rows):  # _checked, inlined: once per task of the run
            if crc32(data) != crc or not data.startswith(prefix):
                raise CacheInvalid(f"row {number + 1} of {self._table} fails its checksum")
        return LoadedRows([row[0] for row in rows], self._table)


class LoadedRows(MutableMapping[str, V], Generic[V]):
    """A reader's table: every row checked and in memory, each decoded only when used.

    :meth:`json_array` gives the whole table as the JSON array ``runs show --json``
    prints, straight from the stored rows for those nobody decoded.
    """

    def __init__(self, stored: list[bytes], table: str) -> None:
        self._stored = stored
        self._encode, self._decode, self._prefix = _CODECS[table]
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
