"""The replay engine: fold a ledger's lines into its state, checking every line.

Each line is parsed, its envelope and chain checked and its event folded by
:func:`escalate.core.fold.apply`; a write of several lines counts whole or not at all
(the ``more`` markers); what follows the last complete line is a torn tail. A store
hands the engine its lines as a byte stream (:class:`LineSource`), so the same checks
run on every store.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

import orjson

from escalate.core import fold
from escalate.core.events import SCHEMA_VERSION, iter_line_batches, iter_lines, parsed_keys
from escalate.core.ids import all_ids
from escalate.core.state import ForgedSignature, RuleViolation, RunState
from escalate.errors import CorruptLedger, UnknownRun

# The envelope's keys every line is read by, as orjson's own objects (events.parsed_keys).
_ENVELOPE = parsed_keys("ts", "seq", "prev", "actor", "v", "type", "more")


class LineSource(Protocol):
    """Where a ledger's lines are read from: its bytes as one stream of NDJSON lines."""

    @property
    def where(self) -> str:
        """What to call the lines in a message (the file store: the log's path)."""
        ...

    def reader(self) -> BinaryIO:
        """The lines, from byte 0, as a binary stream the caller closes."""
        ...


class Replayed:
    """A folded log: the state, where the last folded line ends, and what follows it."""

    # A plain slotted class, not a dataclass: every command imports it, and a dataclass is
    # built (its methods compiled) on import.
    __slots__ = (
        "checkpoint_current",
        "forged",
        "last_line_start",
        "lines",
        "offset",
        "problem",
        "problems",
        "state",
        "torn_bytes",
        "warnings",
    )

    def __init__(self, state: RunState, offset: int, torn_bytes: int, problem: CorruptLedger | None = None,
                 problems: list[tuple[int, str]] | None = None, warnings: list[tuple[int, str]] | None = None,
                 forged: list[int] | None = None, lines: int = 0, last_line_start: int = 0,
                 checkpoint_current: bool = False) -> None:
        self.state = state
        self.offset = offset
        self.torn_bytes = torn_bytes
        self.problem = problem
        self.problems = [] if problems is None else problems
        self.warnings = [] if warnings is None else warnings  # tolerant replays only
        self.forged = [] if forged is None else forged  # the lines of problems that are forged signatures
        self.lines = lines
        self.last_line_start = last_line_start
        self.checkpoint_current = checkpoint_current  # the checkpoint already holds everything folded


Progress = Callable[[int, int], None]  # (bytes folded so far, bytes in the log)


def replay(log: LineSource, run_id: str, *, tolerant: bool = False,
           start: Replayed | None = None, progress: Progress | None = None,
           stop_after: int | None = None, each_id: bool = False) -> Replayed:
    """Fold the whole log, or only what follows ``start`` (a checkpoint). Strict: stop at
    the first problem (``problem``); tolerant: note every problem and go on (``problems``),
    for ``runs verify``.

    A write of several lines is atomic as a unit (:func:`~escalate.core.events.seal`, grouped):
    when the complete lines end inside one, the fold is redone up to the line before it
    (``stop_after``, a line count) and its bytes count as the torn tail. A task id first seen
    is checked with the others of its chunk; when one is not an id, the whole log is folded
    again with each checked on its line (``each_id``), which names it there.
    """
    folding = _Fold(run_id, log.where, tolerant, start.state if start else None,
                    start.lines if start else 0, each_id)
    offset = start.offset if start else 0
    last_line_start = start.last_line_start if start else 0
    complete_end = offset
    with log.reader() as stream:
        total = os.fstat(stream.fileno()).st_size if progress is not None else 0
        # A chunk of lines at a time: offsets are worked out per chunk, and per line only
        # where the fold stops.
        for batch, batch_start in iter_line_batches(stream, offset):
            lines = batch if stop_after is None else batch[:stop_after - folding.line_no]
            folded = lines[:folding.lines(lines)]
            if not folding.ids_hold():  # (the state is the first fold's: start from the first line)
                return replay(log, run_id, tolerant=tolerant, progress=progress, stop_after=stop_after,
                              each_id=True)
            if folded:
                offset = batch_start + sum(map(len, folded)) + len(folded)
                last_line_start = offset - len(folded[-1]) - 1
            complete_end = offset + (len(lines[len(folded)]) + 1 if folding.problem is not None else 0)
            if folding.problem is not None or folding.line_no == stop_after:
                break
            if progress is not None:
                progress(offset, total)
        if progress is not None:
            progress(total, total)  # done (also when a problem stopped the fold early)
        # After a problem, count the lines that were not folded, so that only bytes after
        # the last newline are reported as a torn tail.
        for _, end in iter_lines(stream, complete_end) if folding.problem is not None else ():
            folding.line_no += 1
            complete_end = end
        size = stream.seek(0, os.SEEK_END)
    if folding.group_due and folding.problem is None:
        # Rare (a cut write, or one still being written): fold again without the group
        # rather than buffer every group's lines in the hot loop.
        before = folding.group_first - 1
        return replay(log, run_id, tolerant=tolerant, stop_after=before, each_id=each_id,
                      start=start if start is not None and start.lines <= before else None)
    if folding.state is None:
        if folding.problem is not None:
            raise folding.problem
        raise UnknownRun(
            f"run {run_id} has no complete first line ({size} bytes of an unfinished one, left by "
            f"a crash during 'escalate runs init'); run 'escalate runs init {run_id} --cap USD' again "
            "to set them aside and create it", run=run_id, torn_bytes=size)
    return Replayed(state=folding.state, offset=offset, torn_bytes=size - complete_end,
                    problem=folding.problem, problems=folding.problems, warnings=folding.warnings,
                    forged=folding.forged, lines=folding.line_no, last_line_start=last_line_start)


class _Fold:
    """A fold in progress: what the hot loop carries from one chunk of lines to the next."""

    __slots__ = (
        "forged",
        "group_due",
        "group_first",
        "line_no",
        "new_ids",
        "problem",
        "problems",
        "run_id",
        "state",
        "tolerant",
        "warnings",
        "where",
    )

    def __init__(self, run_id: str, where: str, tolerant: bool, state: RunState | None, line_no: int,
                 each_id: bool) -> None:
        self.run_id = run_id
        self.where = where
        self.tolerant = tolerant
        self.state = state
        self.line_no = line_no  # lines folded so far
        self.group_due = 0  # lines still due in the open multi-line write, which began on group_first
        self.group_first = 0
        self.problem: CorruptLedger | None = None
        self.problems: list[tuple[int, str]] = []
        self.warnings: list[tuple[int, str]] = []
        self.forged: list[int] = []
        self.new_ids: list[str] | None = None if each_id else []  # task ids first seen, to check

    def ids_hold(self) -> bool:
        """Whether every task id first seen in the chunk just folded follows the id rule (a
        reservation leaves them to the replay: fold.MONEY_HANDLERS)."""
        new_ids = self.new_ids
        if not new_ids:
            return True
        held = all_ids(new_ids)
        new_ids.clear()
        return held

    def lines(self, lines: list[bytes]) -> int:
        """Fold ``lines`` (complete, no newlines): how many folded (all, or those before :attr:`problem`)."""
        # The hot loop (line_hash, the clock check inlined): a money line with the envelope the chain asks
        # for (the same actor) goes to its handler directly; any other through fold.apply. The chain
        # (_chain) is kept in locals, written to the state before anything else reads it (_keep_chain).
        loads, json_error, sha256, v1 = orjson.loads, orjson.JSONDecodeError, hashlib.sha256, SCHEMA_VERSION
        (reserve, increase, release), first_8 = fold.MONEY_HANDLERS, slice(8)  # (a slice built once)
        k_ts, k_seq, k_prev, k_actor, k_v, k_type, k_more = _ENVELOPE
        state, line_no, first_line_no, tolerant = self.state, self.line_no, self.line_no, self.tolerant
        group_due, group_first, warnings = self.group_due, self.group_first, self.warnings
        (seq_now, last_hash, last_ts, last_actor, closed), event, new_ids = _chain(state), None, self.new_ids
        for line in lines:
            line_no += 1
            this_hash = sha256(line).digest()[first_8].hex()
            try:
                event = loads(line)
                try:  # one name at a time: no tuple built and taken apart per line
                    ts = event[k_ts]
                    seq = event[k_seq]
                    prev = event[k_prev]
                    actor = event[k_actor]
                    version = event[k_v]
                    kind = event[k_type]  # compared, not hashed for a dict: a new str on every line
                    handler = reserve if kind == "budget_reserved" else release if kind == "released" \
                        else increase if kind == "budget_increased" else None
                except (KeyError, TypeError):  # TypeError: not an object
                    if type(event) is not dict:
                        raise RuleViolation("the line is not a JSON object") from None
                    ts, handler = event.get("ts"), None
                if group_due or k_more in event:
                    group_first = group_first if group_due else line_no
                    group_due = _group_due(event, group_due, group_first)
                if tolerant:  # (no state yet: last_ts is "", and no line is earlier)
                    try:  # both str on a line a writer wrote: no type() call per line
                        back = ts < last_ts
                    except (TypeError, RecursionError):  # other types (deeply nested lists): no clock
                        back = False
                    if back and type(ts) is str and type(last_ts) is str:
                        warnings.append((line_no, _clock_warning(ts, last_ts)))
                # ``type(seq) is int`` too: 2.0 equals 2, and would be copied forward (see fold.apply).
                if handler is None or seq != seq_now + 1 or type(seq) is not int or prev != last_hash \
                        or actor != last_actor or version is not v1 or closed:  # (closed with no state yet)
                    state = _apply(state, event, this_hash, seq_now, last_hash, last_ts)
                    seq_now, last_hash, last_ts, last_actor, closed = _chain(state)
                    continue
                handler(state, event, new_ids)
                seq_now, last_hash, last_ts = seq, this_hash, ts  # (no tuple built)
            except (json_error, RuleViolation) as exc:
                event = None if isinstance(exc, json_error) else event  # (not the line before's)
                _keep_chain(state, seq_now, last_hash, last_ts)
                if self._stops(exc, state, event, line_no, this_hash):
                    line_no -= 1
                    break
                seq_now, last_hash, last_ts, last_actor, closed = _chain(state)
                group_due = 0  # one bad marker is reported once, not on every line after it
        self.state, self.line_no, self.group_due, self.group_first = state, line_no, group_due, group_first
        _keep_chain(state, seq_now, last_hash, last_ts)
        if self.problem is not None:
            self.line_no += 1  # the line that stopped the fold is counted, not folded
        return line_no - first_line_no

    def _stops(self, exc: Exception, state: RunState | None, event: Any, line_no: int,
               this_hash: str) -> bool:
        """Note the problem ``exc`` on line ``line_no``; True when it stops the fold (strict,
        or no first line yet), else the fold goes on past the line (tolerant)."""
        is_json_error = isinstance(exc, orjson.JSONDecodeError)
        reason = f"unparsable JSON ({exc})" if is_json_error else str(exc)
        # A broken chain vouches for nothing from the line before it on.
        first_suspect = line_no
        if not is_json_error and state is not None and _only_chain_broken(state, event):
            first_suspect = line_no - 1
            reason += (f": line {line_no - 1} was changed after this line was written, or "
                       "a line was removed or inserted before this one")
        self.problems.append((line_no, reason))
        forged = isinstance(exc, ForgedSignature)
        if forged:
            self.forged.append(line_no)
        if not self.tolerant or state is None:
            check = "pools verify" if state is not None and state.pool is not None else "runs verify"
            self.problem = CorruptLedger(
                f"{self.where} line {line_no}: {reason}; writes are refused — "
                f"inspect with 'escalate {check} {self.run_id}'",
                code="forged_signature" if forged else None, run=self.run_id, line=line_no,
                problem=reason, first_suspect_line=first_suspect)
            return True
        _resync(state, event if type(event) is dict else None, this_hash)
        return False


def _chain(state: RunState | None) -> tuple[int, str, Any, str | None, bool]:
    """The chain as of ``state``'s last line, as the hot loop keeps it: seq, hash, time,
    actor, and whether the run is archived (no state yet: closed, so the first line goes to
    :func:`_apply`)."""
    if state is None:
        return 0, "", "", None, True
    return state.seq, state.last_hash, state.last_ts, state.last_actor, state.archived


def _keep_chain(state: RunState | None, seq: int, last_hash: str, last_ts: Any) -> None:
    """Write the chain the hot loop kept in locals back to ``state``."""
    if state is not None:
        state.seq, state.last_hash, state.last_ts = seq, last_hash, last_ts


def _apply(state: RunState | None, event: Any, this_hash: str, seq: int, last_hash: str,
           last_ts: Any) -> RunState:
    """A line the hot loop does not fold itself: the first (the state starts), or any
    other through :func:`fold.apply`, with the chain written back first."""
    if state is None:
        return fold.initial_state(event, this_hash)
    _keep_chain(state, seq, last_hash, last_ts)
    fold.apply(state, event, this_hash)
    return state


def _group_due(event: dict[str, Any], due: int, first: int) -> int:
    """The lines still due in a multi-line write after ``event``: its ``more`` marker, which
    must be what the write's earlier lines announced (``due`` − 1, counting down to none)."""
    more = event.get("more", 0)
    if type(more) is not int or more < ("more" in event):  # written only as 1 or more
        raise RuleViolation(f"field 'more' must be a positive integer, got {more!r}")
    if due and more != due - 1:
        raise RuleViolation(f"the write that began on line {first} needs {due - 1} more line(s) "
                            f"after this one, but this line says {more}")
    return more


def _clock_warning(ts: str, last_ts: str) -> str:
    """The warning for a timestamp earlier than the line before it. Not corruption: the
    ledger's rules do not depend on timestamps, and logs written before writers floored them
    at the last line's may hold a clock that went back; refusing those would fail runs for
    nothing."""
    return (f"timestamp {ts} is earlier than the line before it ({last_ts}): a writer's clock "
            "was behind")


def _only_chain_broken(state: RunState, event: Any) -> bool:
    """True when a line has the expected seq but not the previous line's hash."""
    return isinstance(event, dict) and event.get("v") == 1 and event.get("seq") == state.seq + 1 \
        and event.get("prev") != state.last_hash


def _resync(state: RunState, event: dict[str, Any] | None, this_hash: str) -> None:
    """After a bad line in tolerant mode: keep what the payload says if it folds, and
    continue the chain from this line so one bad line is reported once. A line that is no
    event at all is passed over, as if inserted: a line it replaced shows up as a seq gap."""
    if event is None:
        return
    with contextlib.suppress(RuleViolation, KeyError, TypeError):
        fold.apply_payload(state, event)
    seq = event.get("seq")
    state.seq = seq if type(seq) is int else state.seq + 1
    state.last_hash = this_hash


def read_events(stream: BinaryIO, *, last: int | None, after_offset: int) -> tuple[list[Any], int]:
    """The complete lines of ``stream`` from byte ``after_offset`` as events (the ``last``
    ones only, if given), with the offset to read on from. Nothing is checked: an unparsable
    line is skipped here, and ``runs verify`` is the place that names it."""
    kept: collections.deque[bytes] = collections.deque(maxlen=last)
    offset = after_offset
    for line, end in iter_lines(stream, after_offset):
        kept.append(line)
        offset = end
    parsed = []
    for line in kept:
        with contextlib.suppress(orjson.JSONDecodeError):
            event = orjson.loads(line)
            if isinstance(event, dict):
                parsed.append(event)
    return parsed, offset
