"""Event lines (schema v1): the typed definition of every event, the envelope, the hash
chain, timestamps and encoding.

The TypedDicts below are the one definition of the format: the constants (modes,
resolutions, reasons, event types), the JSON Schema and pydantic validation
(:mod:`escalate.schema`) and the table in ``docs/events.md`` are derived from them. An
event is still a plain ``dict`` on the hot path (orjson keeps insertion order, so every
line starts ``{"v":1,"seq":…,"ts":…,"type":…,"prev":…,"actor":…``); the TypedDicts only
type it, and the markers in their ``Annotated`` fields (:class:`Check`, :class:`Doc`) say
which rule a value follows, so this module needs no pydantic.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Annotated, Any, BinaryIO, Literal, NotRequired, TypedDict, get_args

import orjson

SCHEMA_VERSION = 1
# An escalation's expiry must stay a date (datetime ends in year 9999): 1000 years is plenty.
MAX_TIMEOUT_S = 1000 * 366 * 86400
MAX_ACTOR_LENGTH = 128
MAX_REASON_LENGTH = 1000
MAX_FILE_NAME_LENGTH = 255
# The exact text format_ts writes; parse_ts then rejects a 13th month or a 30 February.
TIMESTAMP_PATTERN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z", re.ASCII)
HASH_PATTERN = re.compile(r"([0-9a-f]{16})?", re.ASCII)

Event = dict[str, Any]  # one parsed line, as the reader sees it: nothing checked yet


class Check(Enum):
    """The rule a field's value follows; :mod:`escalate.schema` turns each into a constraint."""

    MICROS = "USD in integer micros (1 USD = 1,000,000)."
    SIGNED_MICROS = "Micros; negative once releases ran over the cap."
    ID = "A run, task or escalation id (no '..')."
    TIMESTAMP = "UTC, microseconds, fixed width: sorts as text."
    NAME = "A person or process: printable, no control characters."
    SEQ = "1, 2, 3 … with no gaps."
    HASH = ("First 16 hex characters of SHA-256 over the previous line without its newline; "
            "empty on the first line.")
    MORE = "A count of lines, at least 1."
    TIMEOUT = "Seconds, at most 1000 years."
    BYTES = "A count of bytes."
    TEXT = "Printable text."
    REASON = "Printable text, at most 1000 characters."
    FILE_NAME = "A file name: printable, 1-255 characters."


@dataclass(frozen=True, slots=True)
class Doc:
    """What a field means, where its :class:`Check` does not say it all."""

    text: str


MicrosInt = Annotated[int, Check.MICROS]
SignedMicrosInt = Annotated[int, Check.SIGNED_MICROS]
IdStr = Annotated[str, Check.ID]
TimestampStr = Annotated[str, Check.TIMESTAMP]
NameStr = Annotated[str, Check.NAME]

Mode = Literal["off", "shadow", "enforce"]
# How a person answers an escalation. ``extend`` grants the request (extending the cap when
# it needs it): the command is ``approve``, its result status ``approved``.
Resolution = Literal["extend", "pause", "cancel"]
HaltReason = Literal["run_cap", "task_cap", "cancelled"]
EscalationKind = Literal["reserve", "increase"]
EscalationReason = Literal["run_cap", "threshold"]
EventType = Literal["run_opened", "budget_reserved", "budget_increased", "released", "halt", "escalation",
                    "escalation_resolved", "recovery", "policy_changed"]

MODES: tuple[Mode, ...] = get_args(Mode)
RESOLUTIONS: tuple[Resolution, ...] = get_args(Resolution)
HALT_REASONS: tuple[HaltReason, ...] = get_args(HaltReason)
ESCALATION_KINDS: tuple[EscalationKind, ...] = get_args(EscalationKind)
ESCALATION_REASONS: tuple[EscalationReason, ...] = get_args(EscalationReason)
EVENT_TYPES: tuple[EventType, ...] = get_args(EventType)


class EscalationPolicy(TypedDict):
    """A run's escalation settings (``run_opened.escalation``, ``policy_changed.escalation``)."""

    mode: Mode
    approval_threshold_micros: Annotated[MicrosInt | None, Doc("null: no threshold.")]
    timeout_s: Annotated[Annotated[int, Check.TIMEOUT] | None, Doc("null: escalations never time out.")]
    max_extension_micros: MicrosInt


class Envelope(TypedDict):
    """The fields every line starts with, in this order."""

    v: Annotated[Literal[1], Doc(f"Schema version ({SCHEMA_VERSION}).")]
    seq: Annotated[int, Check.SEQ]
    ts: TimestampStr
    prev: Annotated[str, Check.HASH]
    actor: Annotated[str, Check.NAME, Doc("--by, else $ESCALATE_ACTOR, else the OS user.")]
    more: NotRequired[Annotated[Annotated[int, Check.MORE], Doc(
        "On every line of a multi-line write but its last: how many lines of the same write "
        "follow. A log whose complete lines end inside such a write ends in a torn tail from the "
        "write's first line.")]]


class RunOpened(TypedDict):
    """The first line of every run."""

    type: Literal["run_opened"]
    run: IdStr
    run_cap_micros: MicrosInt
    task_cap_micros: MicrosInt
    escalation: EscalationPolicy


class BudgetReserved(TypedDict):
    """A reservation is in flight."""

    type: Literal["budget_reserved"]
    task: IdStr
    amount_micros: MicrosInt


class BudgetIncreased(TypedDict):
    """A task's reservation was raised to an absolute new amount."""

    type: Literal["budget_increased"]
    task: IdStr
    from_micros: MicrosInt
    to_micros: MicrosInt
    reason: Annotated[str, Check.REASON]


class Released(TypedDict):
    """A reservation was settled with the task's actual cost."""

    type: Literal["released"]
    task: IdStr
    reserved_micros: MicrosInt
    actual_micros: MicrosInt


class Halt(TypedDict):
    """A task was refused for good."""

    type: Literal["halt"]
    task: IdStr
    requested_micros: MicrosInt
    remaining_micros: SignedMicrosInt
    reason: HaltReason


class Escalation(TypedDict):
    """A request waits for a person (or, with ``shadow``, is only recorded)."""

    type: Literal["escalation"]
    id: IdStr
    task: IdStr
    kind: NotRequired[Annotated[EscalationKind, Doc("Whether a reserve or an increase asked.")]]
    from_micros: NotRequired[Annotated[MicrosInt, Doc("What the task held before.")]]
    requested_micros: Annotated[MicrosInt, Doc("The absolute reservation asked for.")]
    remaining_micros: SignedMicrosInt
    reason: EscalationReason
    offered: list[Resolution]
    needed_extension_micros: NotRequired[Annotated[MicrosInt, Doc(
        "The cap extension an approval needs (0 when only the threshold fired).")]]
    expires_at: Annotated[TimestampStr | None, Doc("null: never expires (or shadow).")]
    shadow: bool
    note: NotRequired[Annotated[Annotated[str, Check.TEXT],
                                Doc("Why extend is not offered, when it is not.")]]


class EscalationResolved(TypedDict):
    """The first resolution of an escalation (``by: "timeout"`` on expiry)."""

    type: Literal["escalation_resolved"]
    id: IdStr
    mode: Resolution
    by: NameStr
    extension_micros: MicrosInt


class Recovery(TypedDict):
    """A torn tail (a final line without a newline) was moved to a side file."""

    type: Literal["recovery"]
    torn_bytes: Annotated[int, Check.BYTES]
    saved_to: Annotated[str, Check.FILE_NAME]


class PolicyChanged(TypedDict):
    """The run's escalation policy changed (``escalate runs set``)."""

    type: Literal["policy_changed"]
    escalation: EscalationPolicy


Payload = (RunOpened | BudgetReserved | BudgetIncreased | Released | Halt | Escalation
           | EscalationResolved | Recovery | PolicyChanged)
# Every payload definition, in EVENT_TYPES order (a test holds the two together).
PAYLOADS: tuple[type[Mapping[str, Any]], ...] = (
    RunOpened, BudgetReserved, BudgetIncreased, Released, Halt, Escalation, EscalationResolved,
    Recovery, PolicyChanged)

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
