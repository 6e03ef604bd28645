"""Event lines (schema v1): the envelope, the hash chain, timestamps and encoding.

An event is a plain ``dict`` on the hot path (orjson keeps insertion order, so every
line starts ``{"v":1,"seq":…,"ts":…,"type":…,"prev":…,"actor":…``). The pydantic models
in :mod:`escalate.schema` describe the same shapes for validation and documentation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

import orjson

SCHEMA_VERSION = 1
EVENT_TYPES = (
    "run_opened",
    "budget_reserved",
    "budget_increased",
    "released",
    "halt",
    "escalation",
    "escalation_resolved",
    "recovery",
    "policy_changed",
)

Event = dict[str, Any]

_READ_CHUNK = 1 << 20


def line_hash(line: bytes) -> str:
    """The chain link: first 16 hex characters of SHA-256 over a line without its newline."""
    # The hex of the first 8 bytes, not the first 16 of the full hex: the same text, made
    # for a quarter of the cost (this runs once per line of every replay).
    return hashlib.sha256(line).digest()[:8].hex()


def format_ts(moment: datetime) -> str:
    """``2026-11-23T14:00:00.123456Z``: fixed width, UTC, so timestamps sort as text."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(text: str) -> datetime:
    """Inverse of :func:`format_ts`; raises ``ValueError`` on anything else."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def add_seconds(ts: str, seconds: int) -> str:
    """``ts`` plus ``seconds``, in the same format."""
    return format_ts(parse_ts(ts) + timedelta(seconds=seconds))


def seal(
    payloads: Iterable[Event], *, seq: int, prev: str, ts: str, actor: str, grouped: bool = False
) -> list[tuple[Event, bytes, str]]:
    """Wrap payloads in envelopes that continue the chain after (``seq``, ``prev``).

    ``grouped``: the lines are one write, atomic as a unit: every line but the last carries
    ``"more": K``, the number of lines of the same write that follow it, so a reader can
    tell a write cut after its first lines from a complete one (a lone line carries none).
    Returns ``(event, line_without_newline, line_hash)`` for each, in order.
    """
    payloads = list(payloads)
    sealed: list[tuple[Event, bytes, str]] = []
    for index, payload in enumerate(payloads):
        seq += 1
        event: Event = {"v": SCHEMA_VERSION, "seq": seq, "ts": ts, "type": payload["type"],
                        "prev": prev, "actor": actor}
        if grouped and index < len(payloads) - 1:
            event["more"] = len(payloads) - 1 - index
        event.update((key, value) for key, value in payload.items() if key != "type")
        line = orjson.dumps(event)
        prev = line_hash(line)
        sealed.append((event, line, prev))
    return sealed


def iter_lines(stream: BinaryIO, offset: int) -> Iterator[tuple[bytes, int]]:
    """Yield ``(line_without_newline, end_offset)`` for each complete line from ``offset``.

    A final piece without a newline is not yielded: it is a torn tail, and the caller
    finds it as the bytes between the last ``end_offset`` and the end of the file.
    Reads in chunks so memory does not grow with the log.
    """
    for lines, start in iter_line_batches(stream, offset):
        end = start
        for line in lines:
            end += len(line) + 1
            yield line, end


def iter_line_batches(stream: BinaryIO, offset: int) -> Iterator[tuple[list[bytes], int]]:
    """Like :func:`iter_lines`, a chunk at a time: yield ``(lines_without_newline, start)``,
    where ``start`` is the offset of the first of them, for a caller that does not need
    every line's end (a full replay: no per-line generator step or offset sum).

    Linear time, and memory of a chunk plus the longest complete line: only the bytes of
    one chunk are split at a time, and a piece with no newline in the next chunk is not
    kept while it grows — its end is looked for first, then the line is read in one go
    (a torn tail, which has no end, is never held at all).
    """
    stream.seek(offset)
    start = offset  # where the first line not yet yielded begins
    pending = b""  # its bytes read so far: less than one chunk
    while chunk := stream.read(_READ_CHUNK):
        cut = chunk.rfind(b"\n")
        if cut < 0:
            end = _next_newline(stream, start + len(pending) + len(chunk))
            if end is None:
                return  # a torn tail
            stream.seek(start)
            line = stream.read(end - start)
            stream.seek(end + 1)
            yield [line], start
            start, pending = end + 1, b""
            continue
        lines = (pending + chunk[:cut]).split(b"\n") if pending else chunk[:cut].split(b"\n")
        yield lines, start
        start += len(pending) + cut + 1
        pending = chunk[cut + 1:]


def _next_newline(stream: BinaryIO, position: int) -> int | None:
    """The offset of the first newline at or after ``position`` (where ``stream`` is), or
    None at the end of the file; reads on a chunk at a time, keeping none of them."""
    while chunk := stream.read(_READ_CHUNK):
        found = chunk.find(b"\n")
        if found >= 0:
            return position + found
        position += len(chunk)
    return None
