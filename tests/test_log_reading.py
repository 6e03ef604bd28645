"""Reading the log in chunks: exactly the complete lines, in linear time and bounded memory,
however long a line or a torn tail is."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path
from unittest import mock

from hypothesis import given
from hypothesis import strategies as st

from escalate import Ledger
from escalate.core import events
from escalate.core.events import iter_line_batches, iter_lines
from escalate.stores.file.log import LOG_NAME


def _reference(data: bytes, offset: int) -> list[tuple[bytes, int]]:
    """(line, end offset) of every newline-terminated line after ``offset``."""
    found, start = [], offset
    while (cut := data.find(b"\n", start)) >= 0:
        found.append((data[start:cut], cut + 1))
        start = cut + 1
    return found


@given(st.binary(max_size=80).map(lambda raw: raw.replace(b"\0", b"\n")), st.integers(1, 9),
       st.integers(0, 80))
def test_lines_and_offsets_match_a_plain_split_for_any_chunk_size(data: bytes, chunk: int,
                                                                  offset: int) -> None:
    offset = min(offset, len(data))
    with mock.patch.object(events, "_READ_CHUNK", chunk):
        assert list(iter_lines(io.BytesIO(data), offset)) == _reference(data, offset)
        flat = []
        for lines, start in iter_line_batches(io.BytesIO(data), offset):
            end = start
            for line in lines:
                end += len(line) + 1
                flat.append((line, end))
        assert flat == _reference(data, offset)


def test_a_long_torn_tail_is_read_in_bounded_memory(tmp_path: Path) -> None:
    """A writer meets a 32 MiB torn tail: reading past it and setting it aside holds a
    chunk at a time, not the tail (which used to be grown with += and split again per
    chunk: quadratic time, memory as large as the tail)."""
    run = Ledger.init(tmp_path, "r", cap="10", actor="tester")
    run.reserve("t", "1")
    tail = b"x" * (32 << 20)
    with (tmp_path / "r" / LOG_NAME).open("ab") as log:
        log.write(tail)
    with (tmp_path / "r" / LOG_NAME).open("rb") as stream:
        tracemalloc.start()
        try:
            assert sum(len(lines) for lines, _ in iter_line_batches(stream, 0)) == 2
            _, reading_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    tracemalloc.start()
    try:
        assert run.release("t", "1")["status"] == "released"
        _, writer_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A few chunks of 1 MiB at most (the old reader held twice the tail: 64 MiB here).
    assert reading_peak < 8 << 20 and writer_peak < 12 << 20, (reading_peak, writer_peak)
    [recovery] = [e for e in Ledger.open(tmp_path, "r").events()[0] if e["type"] == "recovery"]
    assert (tmp_path / "r" / recovery["saved_to"]).stat().st_size == len(tail)


def test_a_long_complete_line_is_read_whole(tmp_path: Path) -> None:
    long_line = b"y" * (3 * events._READ_CHUNK + 5)
    data = b"a\n" + long_line + b"\nb\n" + b"torn"
    path = tmp_path / "log"
    path.write_bytes(data)
    with path.open("rb") as stream:
        assert list(iter_lines(stream, 0)) == _reference(data, 0)


def test_the_fold_reads_a_lines_fields_by_the_key_objects_orjson_makes_for_every_line() -> None:
    """``events.parsed_keys``: the names given, as the very objects ``orjson.loads`` puts in
    each line's dict (so a lookup finds them by identity), whatever the order of the line."""
    import orjson

    keys = events.parsed_keys("ts", "task", "seq")
    assert keys == ("ts", "task", "seq")
    for line in (b'{"seq":2,"ts":"x","task":"t"}', b'{"task":"u","seq":3,"ts":"y","other":1}'):
        parsed = list(orjson.loads(line))
        for key in keys:
            assert any(found is key for found in parsed), key
