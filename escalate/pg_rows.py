"""The PostgreSQL store's reading helpers: the checkpoint's rows as a lazy mapping (a
writer reads only the tasks and escalations a command touches) and a ledger's lines as one
seekable byte stream, with the offsets the file store's log would have.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, Generic, TypeVar

from escalate.cache_rows import _CODECS
from escalate.store import CacheInvalid

V = TypeVar("V")

# (sql, parameters) → rows: one query in the caller's transaction.
Query = Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]


class PgRows(MutableMapping[str, V], Generic[V]):
    """``escalate_tasks`` or ``escalate_escalations`` of one ledger as a mapping: a row is
    read when the fold asks for it and kept, because the fold changes it in place;
    :meth:`dirty` hands back every row read or added, to be written."""

    def __init__(self, query: Query, table: str, ledger: str) -> None:
        self._query = query
        self._table = table
        self._ledger = ledger
        self._encode, self._decode, _ = _CODECS[table]
        self._touched: dict[str, V] = {}
        self._known_missing: set[str] = set()
        self._new: dict[str, None] = {}  # keys this command added, in order

    def _rows(self, where: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._query(f"SELECT key, data FROM escalate_{self._table} WHERE ledger = %s{where}",
                           (self._ledger, *parameters))

    def _decoded(self, key: str, data: bytes) -> V:
        try:
            value: V = self._decode(key, bytes(data))
        except (ValueError, TypeError, KeyError) as exc:  # orjson's error is a ValueError
            raise CacheInvalid(f"row {key!r} of {self._table} cannot be read ({exc})") from exc
        return value

    def __getitem__(self, key: str) -> V:
        if key in self._touched:
            return self._touched[key]
        if key in self._known_missing:
            raise KeyError(key)
        rows = self._rows(" AND key = %s", (key,))
        if not rows:
            self._known_missing.add(key)
            raise KeyError(key)
        value = self._decoded(key, rows[0][1])
        self._touched[key] = value
        return value

    def __setitem__(self, key: str, value: V) -> None:
        if key not in self._touched and (key in self._known_missing or key not in self):
            self._new[key] = None
        self._known_missing.discard(key)
        self._touched[key] = value

    def __delitem__(self, key: str) -> None:
        raise TypeError("the ledger never forgets a task or an escalation")

    def __iter__(self) -> Iterator[str]:
        for key, _ in self.items():
            yield key

    def __len__(self) -> int:
        [(count,)] = self._query(f"SELECT count(*) FROM escalate_{self._table} WHERE ledger = %s",
                                 (self._ledger,))
        return int(count) + len(self._new)

    def items(self) -> Iterator[tuple[str, V]]:  # type: ignore[override]
        """All rows in the order they were first written, with this command's changes."""
        for key, data in self._rows(" ORDER BY n"):
            yield key, self._touched[key] if key in self._touched else self._decoded(key, data)
        for key in self._new:
            yield key, self._touched[key]

    def values(self) -> Iterator[V]:  # type: ignore[override]
        for _, value in self.items():
            yield value

    def dirty(self) -> Iterator[tuple[str, bytes]]:
        """``(key, row)`` of every row read or added by this command."""
        for key, value in self._touched.items():
            yield key, self._encode(key, value)


# (after_offset, up_to) → [(line, end_offset), …] in order: the lines ending after
# ``after_offset`` and at most at ``up_to``, a batch at a time.
Fetch = Callable[[int, int], list[tuple[bytes, int]]]


class LineStream(io.RawIOBase):
    """A ledger's lines as one read-only file of ``size`` bytes, fetched a batch of rows at a
    time from where it is read (``replay`` and ``read_events`` seek, then read on)."""

    def __init__(self, fetch: Fetch, size: int) -> None:
        super().__init__()
        self._fetch = fetch
        self._size = size
        self._position = 0
        self._buffer = b""
        self._buffer_start = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, target: Any) -> int:
        view = memoryview(target).cast("B")
        if self._position >= self._size or not len(view):
            return 0
        within = self._position - self._buffer_start
        if not 0 <= within < len(self._buffer):
            rows = self._fetch(self._position, self._size)
            if not rows:
                return 0
            first_line, first_end = rows[0]
            self._buffer_start = first_end - len(first_line)
            self._buffer = b"".join(bytes(line) for line, _ in rows)
            within = self._position - self._buffer_start
        piece = self._buffer[within:within + len(view)]
        view[:len(piece)] = piece
        self._position += len(piece)
        return len(piece)
