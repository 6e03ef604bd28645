"""The PostgreSQL store's reading helpers: the checkpoint's rows as a lazy mapping (a
writer reads only the tasks and escalations a command touches) and a ledger's lines as one
seekable byte stream, with the offsets the file store's log would have.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar, cast

from escalate.stores.checkpoint import CheckpointInvalid, LazyRows

V = TypeVar("V")

# (sql, parameters) → rows: one query in the caller's transaction.
Query = Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]


class PgRows(LazyRows[V]):
    """``escalate_tasks`` or ``escalate_escalations`` of one ledger
    (:class:`escalate.stores.checkpoint.LazyRows`), read in the caller's transaction."""

    def __init__(self, query: Query, table: str, ledger: str) -> None:
        super().__init__(table)
        self._query = query
        self._ledger = ledger

    def _rows(self, where: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._query(f"SELECT key, data FROM escalate_{self._table} WHERE ledger = %s{where}",
                           (self._ledger, *parameters))

    def _decoded(self, key: str, data: bytes) -> V:
        try:
            value: V = self._decode(key, bytes(data))
        except (ValueError, TypeError, KeyError) as exc:  # orjson's error is a ValueError
            raise CheckpointInvalid(f"row {key!r} of {self._table} cannot be read ({exc})") from exc
        return value

    def _read_one(self, key: str) -> V | None:
        rows = self._rows(" AND key = %s", (key,))
        return self._decoded(key, rows[0][1]) if rows else None

    def _stored(self, key: str) -> bool:
        return bool(self._rows(" AND key = %s", (key,)))

    def _stored_count(self) -> int:
        [(count,)] = self._query(f"SELECT count(*) FROM escalate_{self._table} WHERE ledger = %s",
                                 (self._ledger,))
        return int(count)

    def _stored_rows(self) -> Iterator[tuple[str, Callable[[], V]]]:
        for key, data in self._rows(" ORDER BY n"):
            yield key, functools.partial(self._decoded, key, data)


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


def line_stream(fetch: Fetch, size: int) -> BinaryIO:
    """A :class:`LineStream`, as the seam's readers are typed."""
    # (A RawIOBase reads as a binary file does; typeshed types only the file and buffered
    # classes as BinaryIO, so this is the one place it is said.)
    return cast(BinaryIO, LineStream(fetch, size))
