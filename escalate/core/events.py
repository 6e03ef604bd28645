"""Event lines (schema v1): the envelope, the hash chain, timestamps and encoding, and the
constants of the format.

The one definition of every event's fields is in :mod:`escalate.core.payloads` (TypedDicts,
kept off the hot path: building them costs more than the rest of this module); the value
sets below (modes, resolutions, reasons, event types) are the ``Literal`` types those
definitions use, and the tuples are derived from them. An event is a plain ``dict`` on the
hot path (orjson keeps insertion order, so every line starts
``{"v":1,"seq":…,"ts":…,"type":…,"prev":…,"actor":…``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO, Literal, get_args

import orjson

SCHEMA_VERSION = 1
# An escalation's expiry must stay a date (datetime ends in year 9999): 1000 years is plenty.
MAX_TIMEOUT_S = 1000 * 366 * 86400
MAX_ACTOR_LENGTH = 128
MAX_REASON_LENGTH = 1000
MAX_FILE_NAME_LENGTH = 255
MAX_DETAIL_LENGTH = 200  # escalation_notified.detail: an exit status or a timeout, never output
# The exact text format_ts writes; parse_ts then rejects a 13th month or a 30 February.
TIMESTAMP_PATTERN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z", re.ASCII)
HASH_PATTERN = re.compile(r"([0-9a-f]{16})?", re.ASCII)

Event = dict[str, Any]  # one parsed line, as the reader sees it: nothing checked yet


Mode = Literal["off", "shadow", "enforce"]
# How a person answers an escalation. ``extend`` grants the request (extending the cap when
# it needs it): the command is ``approve``, its result status ``approved``.
Resolution = Literal["extend", "pause", "cancel"]
# How an escalation ended: a person's resolution, or ``withdraw`` (its task's own side took
# the request back: ``escalate withdraw``, or a release that settles the task).
ResolvedMode = Literal["extend", "pause", "cancel", "withdraw"]
HaltReason = Literal["run_cap", "task_cap", "cancelled", "pool_cap"]
EscalationKind = Literal["reserve", "increase"]
# pool_cap: the pool's policy decides it (over the pool's remaining, or its threshold).
EscalationReason = Literal["run_cap", "threshold", "pool_cap"]
# How urgent the requester says an escalation is; the inbox lists the most urgent first.
Priority = Literal["low", "normal", "high", "urgent"]
EventType = Literal["run_opened", "budget_reserved", "budget_increased", "released", "halt", "escalation",
                    "escalation_resolved", "recovery", "policy_changed", "escalation_notified",
                    "pool_opened", "run_joined", "run_archived", "run_join_voided", "member_opened",
                    "escalation_approved"]
# Why a pool's join was voided: its 'runs init --pool' found the id taken by a run of no
# pool, a run of another pool, or a pool.
VoidReason = Literal["run_of_no_pool", "run_of_another_pool", "a_pool"]
# What an approver list is matched on: the name each person gives (``--by``), or the
# identity the store vouches for (the line's ``role``: the OS user, or the database role).
ApproversMatch = Literal["claimed", "vouched"]
# How a pool's cap repeats: never, per calendar day, ISO week or month in the pool's zone.
Period = Literal["none", "day", "week", "month"]

MODES: tuple[Mode, ...] = get_args(Mode)
RESOLUTIONS: tuple[Resolution, ...] = get_args(Resolution)
RESOLVED_MODES: tuple[ResolvedMode, ...] = get_args(ResolvedMode)
# The actor name expiry writes as ``by``: no person or process may act under it.
TIMEOUT_ACTOR = "timeout"
HALT_REASONS: tuple[HaltReason, ...] = get_args(HaltReason)
VOID_REASONS: tuple[VoidReason, ...] = get_args(VoidReason)
ESCALATION_KINDS: tuple[EscalationKind, ...] = get_args(EscalationKind)
ESCALATION_REASONS: tuple[EscalationReason, ...] = get_args(EscalationReason)
PRIORITIES: tuple[Priority, ...] = get_args(Priority)
EVENT_TYPES: tuple[EventType, ...] = get_args(EventType)
PERIODS: tuple[Period, ...] = get_args(Period)
# Most approvers a quorum may ask for.
MAX_QUORUM = 100
APPROVERS_MATCHES: tuple[ApproversMatch, ...] = get_args(ApproversMatch)


_READ_CHUNK = 1 << 20


def parsed_keys(*names: str) -> tuple[str, ...]:
    """``names`` as the very str objects ``orjson.loads`` makes for those keys of a line.

    orjson keeps one object per key it has parsed (its key cache) and hands the same one
    out for every line, so a fold that reads a line's fields by these objects finds each
    one by identity, without comparing its characters (a third to a half of a field's
    lookup; a key the cache let go of is still found, by its characters)."""
    parsed = orjson.loads(orjson.dumps(dict.fromkeys(names, 0)))
    own = {key: key for key in parsed}  # (looked up by name: the value is orjson's object)
    return tuple(own[name] for name in names)


def line_hash(line: bytes) -> str:
    """The chain link: first 16 hex characters of SHA-256 over a line without its newline."""
    # The hex of the first 8 bytes, not the first 16 of the full hex: the same text, made
    # for a quarter of the cost (this runs once per line of every replay).
    return hashlib.sha256(line).digest()[:8].hex()


def format_ts(moment: datetime) -> str:
    """``2026-11-23T14:00:00.123456Z``: fixed width, UTC, so timestamps sort as text (the
    year always has four digits: ``%Y`` writes year 999 as ``999``, which sorts after 2026)."""
    # (isoformat pads the year to four digits and, with this timespec, always writes the
    # microseconds; its "+00:00" is cut: a third of the cost of formatting each field.)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def parse_ts(text: str) -> datetime:
    """Inverse of :func:`format_ts`; raises ``ValueError`` on anything else."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def add_seconds(ts: str, seconds: int) -> str:
    """``ts`` plus ``seconds``, in the same format; past the last moment a timestamp can
    name (year 9999), that moment."""
    try:
        return format_ts(parse_ts(ts) + timedelta(seconds=seconds))
    except OverflowError:
        return "9999-12-31T23:59:59.999999Z"


def seal(
    payloads: Iterable[Mapping[str, Any]], *, seq: int, prev: str, ts: str, actor: str, grouped: bool = False
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
        # The chunk split as it is (no copy of it first); the piece after its last newline
        # waits for the next chunk, and the piece before its first joins what waited.
        lines = chunk.split(b"\n")
        rest = lines.pop()
        if pending:
            lines[0] = pending + lines[0]
        yield lines, start
        start += len(pending) + cut + 1
        pending = rest


def _next_newline(stream: BinaryIO, position: int) -> int | None:
    """The offset of the first newline at or after ``position`` (where ``stream`` is), or
    None at the end of the file; reads on a chunk at a time, keeping none of them."""
    while chunk := stream.read(_READ_CHUNK):
        found = chunk.find(b"\n")
        if found >= 0:
            return position + found
        position += len(chunk)
    return None
