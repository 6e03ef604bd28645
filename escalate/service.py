"""The library: one method per command, each ``lock → fold → decide → append``.

:class:`Ledger` is what ``from escalate import Ledger`` gives a Python scheduler, and
what the CLI calls. Refusals raise :class:`~escalate.errors.EscalateError` subclasses
after the events that record them are durable.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import getpass
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

import orjson

from escalate import ledger
from escalate.cache import CacheInvalid, Checkpoint
from escalate.durations import (
    MAX_ESCALATION_TIMEOUT_S,
    MAX_LOCK_TIMEOUT_S,
    MAX_NOTIFY_TIMEOUT_S,
    MAX_WAIT_S,
    check_duration,
    format_duration,
    parse_duration,
)
from escalate.errors import (
    Conflict,
    CorruptLedger,
    EscalateError,
    InputError,
    LockTimeout,
    Pending,
    Refused,
    StoreUnavailable,
    UnknownRun,
)
from escalate.events import Event, format_ts, iter_line_batches, iter_lines, seal
from escalate.ids import check_id
from escalate.ledger import Decision, Policy, RuleViolation, RunState
from escalate.log import LOG_NAME, FileLog, LogBackend
from escalate.money import Amount, Micros, parse_micros
from escalate.money import format_usd as usd

DEFAULT_LOCK_TIMEOUT_S = 30.0
DEFAULT_ESCALATION_TIMEOUT_S = 3600
DEFAULT_NOTIFY_TIMEOUT_S = 10.0
_WAIT_POLL_S = 0.05

Clock = Callable[[], datetime]


class Unchanged(enum.Enum):
    """The type of :data:`UNCHANGED`: ``set_policy`` leaves such a setting as it is
    (``None`` already means "none" for some of them)."""

    UNCHANGED = "unchanged"


UNCHANGED: Final = Unchanged.UNCHANGED


def _utc_now() -> datetime:
    return datetime.now(UTC)


def default_runs_dir() -> Path:
    """``$ESCALATE_RUNS_DIR`` or ``./runs``."""
    return Path(os.environ.get("ESCALATE_RUNS_DIR") or "runs")


def default_lock_timeout() -> float:
    """``$ESCALATE_LOCK_TIMEOUT`` (seconds, or 500ms, 2m …; at most 1d) or 30."""
    return _duration_from_env("ESCALATE_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT_S, MAX_LOCK_TIMEOUT_S)


def default_notify_timeout() -> float:
    """``$ESCALATE_NOTIFY_TIMEOUT`` (seconds, or 500ms, 30s …; at most 1h) or 10."""
    return _duration_from_env("ESCALATE_NOTIFY_TIMEOUT", DEFAULT_NOTIFY_TIMEOUT_S, MAX_NOTIFY_TIMEOUT_S)


def _duration_from_env(name: str, default: float, maximum: float) -> float:
    # An empty variable counts as unset, as the CLI's other environment variables do.
    raw = os.environ.get(name)
    return parse_duration(raw, what=name, maximum=maximum) if raw else default


def default_actor() -> str:
    """``$ESCALATE_ACTOR``, else the OS user."""
    actor = os.environ.get("ESCALATE_ACTOR")
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid-{os.getuid()}"


def _check_actor(actor: str) -> str:
    if not actor or len(actor) > 128 or not actor.isprintable():
        raise InputError(f"invalid actor {actor[:40]!r}: use 1-128 printable characters",
                         code="invalid_actor", value=actor[:40])
    return actor


@dataclass(slots=True)
class Replayed:
    """A folded log: the state, where the last folded line ends, and what follows it."""

    state: RunState
    offset: int
    torn_bytes: int
    problem: CorruptLedger | None = None
    problems: list[tuple[int, str]] = field(default_factory=list)
    warnings: list[tuple[int, str]] = field(default_factory=list)  # tolerant replays only
    lines: int = 0
    last_line_start: int = 0
    from_checkpoint: bool = False
    checkpoint_current: bool = False  # the checkpoint already holds everything folded


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _in_one_folder(method: Callable[Concatenate[Ledger, _P], _R]) -> Callable[Concatenate[Ledger, _P], _R]:
    """Resolve the run folder once for the whole call: a folder swapped for a link
    half-way cannot split a command across two folders."""

    @functools.wraps(method)
    def resolved(self: Ledger, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self.log.resolved():
            return method(self, *args, **kwargs)

    return resolved


Progress = Callable[[int, int], None]  # (bytes folded so far, bytes in the log)


def replay(log: LogBackend, run_id: str, *, tolerant: bool = False,
           start: Replayed | None = None, progress: Progress | None = None,
           stop_after: int | None = None) -> Replayed:
    """Fold the whole log, or only what follows ``start`` (a checkpoint). Strict: stop at
    the first problem (``problem``); tolerant: note every problem and go on (``problems``),
    for ``runs verify``.

    A write of several lines is atomic as a unit (:func:`~escalate.events.seal`, grouped):
    when the complete lines end inside one, the fold is redone up to the line before it
    (``stop_after``, a line count) and its bytes count as the torn tail.
    """
    state: RunState | None = start.state if start else None
    offset = start.offset if start else 0
    last_line_start = start.last_line_start if start else 0
    line_no = start.lines if start else 0
    problem: CorruptLedger | None = None
    problems: list[tuple[int, str]] = []
    warnings: list[tuple[int, str]] = []
    complete_end = offset
    group_due = 0  # lines still due in the open multi-line write, which began on group_first
    group_first = 0
    # The hot loop: a chunk of lines at a time, names bound locally, line_hash inlined (it is
    # the same text); offsets are worked out per chunk, and per line only where one stops.
    loads, json_error, sha256, apply = orjson.loads, orjson.JSONDecodeError, hashlib.sha256, ledger.apply
    with log.reader() as stream:
        total = os.fstat(stream.fileno()).st_size if progress is not None else 0
        for batch, batch_start in iter_line_batches(stream, offset):
            lines = batch if stop_after is None else batch[:stop_after - line_no]
            first_line_no = line_no
            for line in lines:
                line_no += 1
                this_hash = sha256(line).digest()[:8].hex()
                event: Any = None
                try:
                    event = loads(line)
                    if type(event) is not dict:
                        raise RuleViolation("the line is not a JSON object")
                    if group_due or "more" in event:
                        group_first = group_first if group_due else line_no
                        group_due = _group_due(event, group_due, group_first)
                    if state is None:
                        state = ledger.open_run(event, this_hash)
                    else:
                        if tolerant:
                            _note_clock(state, event, line_no, warnings)
                        apply(state, event, this_hash)
                except (json_error, RuleViolation) as exc:
                    reason = f"unparsable JSON ({exc})" if isinstance(exc, json_error) else str(exc)
                    # A broken chain vouches for nothing from the line before it on.
                    first_suspect = line_no
                    if isinstance(exc, RuleViolation) and state is not None \
                            and _only_chain_broken(state, event):
                        first_suspect = line_no - 1
                        reason += (f": line {line_no - 1} was changed after this line was written, or "
                                   "a line was removed or inserted before this one")
                    problems.append((line_no, reason))
                    if not tolerant or state is None:
                        problem = CorruptLedger(
                            f"{log_path(log)} line {line_no}: {reason}; writes are refused — "
                            f"inspect with 'escalate runs verify {run_id}'",
                            run=run_id, line=line_no, problem=reason, first_suspect_line=first_suspect)
                        break
                    _resync(state, event if type(event) is dict else None, this_hash)
                    group_due = 0  # one bad marker is reported once, not on every line after it
            folded = lines[:line_no - first_line_no - (problem is not None)]
            if folded:
                offset = batch_start + sum(map(len, folded)) + len(folded)
                last_line_start = offset - len(folded[-1]) - 1
            complete_end = offset + (len(lines[len(folded)]) + 1 if problem is not None else 0)
            if problem is not None or line_no == stop_after:
                break
            if progress is not None:
                progress(offset, total)
        if progress is not None:
            progress(total, total)  # done (also when a problem stopped the fold early)
        # After a problem, count the lines that were not folded, so that only bytes after
        # the last newline are reported as a torn tail.
        for _, end in iter_lines(stream, complete_end) if problem is not None else ():
            line_no += 1
            complete_end = end
        size = stream.seek(0, os.SEEK_END)
    if group_due and problem is None:
        # Rare (a cut write, or one still being written): fold again without the group
        # rather than buffer every group's lines in the hot loop.
        before = group_first - 1
        return replay(log, run_id, tolerant=tolerant, stop_after=before,
                      start=start if start is not None and start.lines <= before else None)
    if state is None:
        if problem is not None:
            raise problem
        raise UnknownRun(
            f"run {run_id} has no complete first line ({size} bytes of an unfinished one, left by "
            f"a crash during 'escalate runs init'); run 'escalate runs init {run_id} --cap USD' again "
            "to set them aside and create it", run=run_id, torn_bytes=size)
    return Replayed(state=state, offset=offset, torn_bytes=size - complete_end, problem=problem,
                    problems=problems, warnings=warnings, lines=line_no,
                    last_line_start=last_line_start)


def _group_due(event: dict[str, Any], due: int, first: int) -> int:
    """The lines still due in a multi-line write after ``event``: its ``more`` marker, which
    must be what the write's earlier lines announced (``due`` − 1, counting down to none)."""
    more = event.get("more", 0)
    if type(more) is not int or more < 0:
        raise RuleViolation(f"field 'more' must be a non-negative integer, got {more!r}")
    if due and more != due - 1:
        raise RuleViolation(f"the write that began on line {first} needs {due - 1} more line(s) "
                            f"after this one, but this line says {more}")
    return more


def _note_clock(state: RunState, event: dict[str, Any], line_no: int,
                warnings: list[tuple[int, str]]) -> None:
    """Warn of a timestamp earlier than the line before it. Not corruption: the ledger's
    rules do not depend on timestamps, and logs written before writers floored them at the
    last line's may hold a clock that went back; refusing those would fail runs for nothing."""
    ts = event.get("ts")
    if type(ts) is str and type(state.last_ts) is str and ts < state.last_ts:
        warnings.append((line_no, f"timestamp {ts} is earlier than the line before it "
                                  f"({state.last_ts}): a writer's clock was behind"))


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
        ledger.apply_payload(state, event)
    seq = event.get("seq")
    state.seq = seq if type(seq) is int else state.seq + 1
    state.last_hash = this_hash


def log_path(log: LogBackend) -> str:
    return str(getattr(log, "path", "log"))


class Ledger:
    """One run's budget ledger: the library API the CLI is a thin layer over."""

    def __init__(
        self,
        runs_dir: str | os.PathLike[str],
        run_id: str,
        *,
        lock_timeout: float | None = None,
        actor: str | None = None,
        clock: Clock | None = None,
        notify_cmd: str | None = None,
        notify_timeout: float | None = None,
    ) -> None:
        self.run_id = check_id(run_id, what="run id")
        self.runs_dir = Path(runs_dir)
        timeout = default_lock_timeout() if lock_timeout is None else \
            check_duration(lock_timeout, what="lock timeout", maximum=MAX_LOCK_TIMEOUT_S)
        self.actor = _check_actor(actor or default_actor())
        self.clock = clock or _utc_now
        self.notify_cmd = notify_cmd if notify_cmd is not None else os.environ.get("ESCALATE_NOTIFY_CMD")
        # Read up front, so a bad value is an input error before anything is written.
        self.notify_timeout = default_notify_timeout() if notify_timeout is None else \
            check_duration(notify_timeout, what="notify timeout", maximum=MAX_NOTIFY_TIMEOUT_S)
        self.log = FileLog(self.runs_dir / self.run_id, lock_timeout=timeout)
        # Called as a replay reads the log (the CLI shows a bar for a large one).
        self.progress: Progress | None = None
        # The checkpoint is a file beside the log: a speed-up the file backend offers.
        self.checkpoint: Checkpoint | None = Checkpoint(self.runs_dir / self.run_id, lambda: self.log.dir_fd)

    # ------------------------------------------------------------------ opening

    @classmethod
    def init(
        cls,
        runs_dir: str | os.PathLike[str],
        run_id: str,
        *,
        cap: Amount,
        task_cap: Amount | None = None,
        escalation: str = "off",
        approval_threshold: Amount | None = None,
        escalation_timeout_s: float | None = DEFAULT_ESCALATION_TIMEOUT_S,
        max_extension: Amount = "0",
        **options: Any,
    ) -> Ledger:
        """Create a run (idempotent: the same settings again is fine; different ones conflict).

        Amounts are USD as ``str`` or ``Decimal``, or ``Micros``; ``escalation_timeout_s`` is
        whole seconds, 1 to 365 days, or ``None`` for never.
        """
        run = cls(runs_dir, run_id, **options)
        if run.runs_dir.exists() and not run.runs_dir.is_dir():
            raise InputError(f"the runs folder {run.runs_dir} is a file; give a folder with --runs-dir "
                             "or ESCALATE_RUNS_DIR", code="not_a_folder", path=str(run.runs_dir))
        # Zero is refused too, so a negative cap gets the same advice, not "give 0 or more".
        run_cap = 0 if _below_zero(cap) else parse_micros(cap, what="cap")
        if run_cap == 0:
            raise InputError(f"invalid cap {str(cap)[:40]!r}: must be more than 0; give --cap, e.g. --cap 10",
                             code="invalid_amount")
        task_cap_micros = None if task_cap is None else parse_micros(task_cap, what="task cap")
        if task_cap_micros is not None and task_cap_micros > run_cap:
            raise InputError("invalid task cap: it is above the run cap; lower --task-cap or raise --cap",
                             code="invalid_amount")
        policy = make_policy(escalation, approval_threshold, escalation_timeout_s, max_extension)
        payload = ledger.run_opened_payload(run.run_id, run_cap, task_cap_micros, policy)
        now = format_ts(run.clock())
        [(_, line, _)] = seal([payload], seq=0, prev="", ts=now, actor=run.actor)

        def recovery(torn_bytes: int, saved_to: str) -> bytes:
            # run_opened must stay the first line, so a torn first line is recorded right after
            # it, in one group: a cut between the two leaves no run, only a torn tail.
            sealed = seal([payload, {"type": "recovery", "torn_bytes": torn_bytes, "saved_to": saved_to}],
                          seq=0, prev="", ts=now, actor=run.actor, grouped=True)
            return b"".join(line + b"\n" for _, line, _ in sealed)

        if run.log.create(line + b"\n", recovery, run._has_first_line):
            return run
        existing = run._replay().state
        wanted = (run_cap, payload["task_cap_micros"], policy)
        have = (existing.run_cap_micros, existing.task_cap_micros, existing.policy)
        if wanted == have:
            return run
        differences = _setting_differences(existing, run_cap, payload["task_cap_micros"], policy)
        only_policy = (existing.run_cap_micros, existing.task_cap_micros) == wanted[:2]
        raise Conflict(
            f"run {run.run_id} already exists with {'; '.join(differences)}; pick a new run id"
            + (", or change the escalation policy with 'escalate runs set'" if only_policy else ""),
            run=run.run_id, cap_micros=existing.run_cap_micros,
            task_cap_micros=existing.task_cap_micros, escalation=existing.policy.to_json())

    @classmethod
    def open(cls, runs_dir: str | os.PathLike[str], run_id: str, **options: Any) -> Ledger:
        """Open an existing run; :class:`UnknownRun` (exit 2) if there is none."""
        run = cls(runs_dir, run_id, **options)
        if not run.log.exists():
            raise UnknownRun(
                f"no run {run_id} under {run.runs_dir}; see 'escalate runs list' (or check "
                f"--runs-dir), or create it with 'escalate runs init {run_id} --cap USD'", run=run_id)
        return run

    # ------------------------------------------------------------------ commands

    def reserve(self, task: str, amount: Amount) -> dict[str, Any]:
        """Reserve ``amount`` for ``task`` before spending it."""
        task_id = check_id(task, what="task id")
        micros = parse_micros(amount, what="estimate")
        return self._mutate(lambda state, now: ledger.decide_reserve(state, task_id, micros, now))

    def increase(self, task: str, to: Amount, *, reason: str = "") -> dict[str, Any]:
        """Raise ``task``'s reservation to the absolute amount ``to``."""
        task_id = check_id(task, what="task id")
        micros = parse_micros(to, what="new amount")
        if len(reason) > 1000 or not reason.isprintable():
            raise InputError(f"invalid reason {reason[:40]!r}: use up to 1000 printable characters",
                             code="invalid_reason", value=reason[:40])
        return self._mutate(lambda state, now: ledger.decide_increase(state, task_id, micros, reason, now))

    def release(self, task: str, actual: Amount) -> dict[str, Any]:
        """Settle ``task`` with what it actually cost (may exceed the reservation)."""
        task_id = check_id(task, what="task id")
        micros = parse_micros(actual, what="actual")
        return self._mutate(lambda state, now: ledger.decide_release(state, task_id, micros))

    def approve(self, escalation_id: str, *, by: str | None = None) -> dict[str, Any]:
        """Grant an escalation: the extension and the task's reservation in one write."""
        return self._resolve(escalation_id, "extend", by)

    def pause(self, escalation_id: str, *, by: str | None = None) -> dict[str, Any]:
        """Park the task; it may ask again later."""
        return self._resolve(escalation_id, "pause", by)

    def cancel(self, escalation_id: str, *, by: str | None = None) -> dict[str, Any]:
        """End the task for good (``halt`` with reason ``cancelled``)."""
        return self._resolve(escalation_id, "cancel", by)

    def set_policy(
        self,
        *,
        escalation: str | Unchanged = UNCHANGED,
        approval_threshold: Amount | Unchanged | None = UNCHANGED,
        escalation_timeout_s: float | Unchanged | None = UNCHANGED,
        max_extension: Amount | Unchanged = UNCHANGED,
    ) -> dict[str, Any]:
        """Change the escalation policy; settings left out keep their current value
        (``approval_threshold=None`` removes the threshold, ``escalation_timeout_s=None``
        makes escalations never time out)."""
        def decide(state: RunState, now: str) -> Decision:
            current = state.policy
            threshold = current.approval_threshold_micros
            policy = make_policy(
                current.mode if escalation is UNCHANGED else escalation,
                (None if threshold is None else Micros(threshold)) if approval_threshold is UNCHANGED
                else approval_threshold,
                current.timeout_s if escalation_timeout_s is UNCHANGED else escalation_timeout_s,
                Micros(current.max_extension_micros) if max_extension is UNCHANGED else max_extension)
            return ledger.decide_policy(state, policy)
        return self._mutate(decide)

    def sweep(self) -> dict[str, Any]:
        """Resolve expired escalations (``pause`` by ``timeout``); ``expired`` lists their ids."""
        # The expiry itself happens in _mutate, before any decision; telling which
        # resolutions this write added takes the set that was open before it.
        was_open = set(self.state().open_escalations)

        def decide(state: RunState, now: str) -> Decision:
            # (the expiries are stamped with the write's time, now the state's last)
            expired = [e.id for e in state.escalations.values()
                       if e.id in was_open and e.by == "timeout" and e.resolved_at == state.last_ts]
            return Decision(result={"status": "swept", "expired": expired})
        return self._mutate(decide)

    def wait(self, escalation_id: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        """Block until the escalation is resolved, without holding the lock.

        Returns on approval; raises :class:`Refused` on cancel and :class:`Pending` on
        pause (a timeout's too) or when ``timeout_s`` passes first.
        """
        check_id(escalation_id, what="escalation id")
        if timeout_s is not None:
            check_duration(timeout_s, what="wait timeout", maximum=MAX_WAIT_S)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_size = -1
        waiting: tuple[ledger.Escalation, Policy] | None = None
        while True:
            size = self.log.size()
            if size != last_size:
                last_size = size
                state = self.state()
                escalation = state.escalations.get(escalation_id)
                if escalation is None or escalation.shadow or escalation.state == "resolved":
                    # An answer rests only on durable bytes: the writer of what was read may
                    # not have synced yet, and this fsync covers every byte written before it.
                    self.log.sync()
                if escalation is None:
                    raise InputError(f"no escalation {escalation_id} in run {self.run_id}; list them "
                                     f"with 'escalate escalations --run {self.run_id}'",
                                     code="unknown_escalation", escalation_id=escalation_id)
                if escalation.shadow:
                    raise Conflict(f"escalation {escalation_id} was recorded in shadow mode and needs "
                                   "nobody; there is nothing to wait for", escalation_id=escalation_id,
                                   state="resolved", mode=None)
                if escalation.state == "resolved":
                    return _outcome(self.run_id, escalation)
                waiting = (escalation, state.policy)
            # Expiry follows the clock, not the log: nobody else may ever write to this run again.
            if waiting is not None and ledger.is_expired(*waiting, format_ts(self.clock())):
                waiting = None
                self.sweep()
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise Pending(
                    f"escalation {escalation_id} is still open after {format_duration(timeout_s or 0)}; "
                    f"wait again or ask an approver to run 'escalate approve {self.run_id} {escalation_id}'",
                    code="escalation_open", escalation_id=escalation_id, run=self.run_id)
            time.sleep(_WAIT_POLL_S)

    # ------------------------------------------------------------------ reading

    def state(self) -> RunState:
        """The run's state now, read without the lock; :class:`CorruptLedger` if unreadable."""
        replayed = self._replay()
        if replayed.problem is not None:
            raise replayed.problem
        return replayed.state

    def verified_state(self) -> RunState:
        """The run's state from a strict fold of the whole log with every check, never from
        the cache; :class:`CorruptLedger` on the first problem ``runs verify`` would report.
        For verdicts such as a CI gate: the cache's key cannot see an edit in place before
        its checkpoint when lines were appended after it (see :mod:`escalate.cache`)."""
        replayed = self._replay(use_cache=False)
        if replayed.problem is not None:
            raise replayed.problem
        return replayed.state

    def snapshot(self) -> Replayed:
        """The state with what a reader should be warned about (a torn tail, corruption)."""
        return self._replay()

    def verify(self) -> Replayed:
        """Fold every line, noting each problem with its line (``runs verify``)."""
        def fold() -> Replayed:
            return replay(self.log, self.run_id, tolerant=True, progress=self.progress)

        replayed = fold()
        return self._confirmed(replayed, fold) if replayed.problems else replayed

    def events(self, *, last: int | None = None, after_offset: int = 0) -> tuple[list[Event], int]:
        """The log's complete lines as events (the ``last`` ones only, if given), read from
        byte ``after_offset`` without the lock; returns them with the offset to read on from.
        An unparsable line is skipped here: ``runs verify`` is the place that names it."""
        if not self.log.exists():
            raise UnknownRun(f"no run {self.run_id} under {self.runs_dir}; check the run id "
                             "with 'escalate runs list'", run=self.run_id)
        kept: collections.deque[bytes] = collections.deque(maxlen=last)
        offset = after_offset
        with self.log.reader() as stream:
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

    # ------------------------------------------------------------------ internals

    @_in_one_folder
    def _replay(self, *, writable: bool = False, use_cache: bool = True) -> Replayed:
        """Fold the log, from the checkpoint when it still matches the log (then only the
        lines after it are read) and ``use_cache``. Only a writer holding the lock may build
        the checkpoint; a reader's problem is confirmed under the lock."""
        replayed = self._fold(writable=writable, use_cache=use_cache)
        if writable or replayed.problem is None:
            return replayed
        return self._confirmed(replayed, lambda: self._fold(writable=False, use_cache=use_cache))

    def _confirmed(self, replayed: Replayed, fold: Callable[[], Replayed]) -> Replayed:
        """A problem that a reader without the lock finds may be a writer's recovery seen
        half-way: a torn tail written over between two of its reads glues the old torn bytes
        to the end of the new lines. It is reported only if a fold under the run's lock
        finds it too. Where the lock cannot be had (read-only media, a lock held past the
        timeout) the first reading stands."""
        try:
            with self.log.locked():
                return fold()
        except (LockTimeout, StoreUnavailable, OSError):
            return replayed

    def _fold(self, *, writable: bool, use_cache: bool) -> Replayed:
        if not self.log.exists():
            raise UnknownRun(f"no run {self.run_id} under {self.runs_dir}; check the run id with "
                             "'escalate runs list'", run=self.run_id)
        start = None
        if self.checkpoint is not None and use_cache:
            loaded = self.checkpoint.load(self.log.bound_path(LOG_NAME), writable=writable)
            if loaded is not None:
                state, offset, last_line_start, lines = loaded
                start = Replayed(state=state, offset=offset, torn_bytes=0, lines=lines,
                                 last_line_start=last_line_start)
        replayed = replay(self.log, self.run_id, start=start, progress=self.progress)
        replayed.from_checkpoint = start is not None
        replayed.checkpoint_current = start is not None and replayed.lines == start.lines
        if start is not None and replayed.problem is not None:
            # A problem is only ever reported from the log itself, never from the cache.
            replayed = replay(self.log, self.run_id, progress=self.progress)
        if replayed.problem is not None and not writable:
            # What a reader shows stops before the first line the problem casts doubt on
            # (with a broken chain, the line before the one that names it).
            trusted = replayed.problem.first_suspect_line - 1
            if 0 < trusted < replayed.state.seq:
                replayed.state = replay(self.log, self.run_id, stop_after=trusted).state
        # A run is what its folder is called (a copied run folder is that copy).
        replayed.state.run_id = self.run_id
        return replayed

    def _has_first_line(self) -> bool:
        """True when the log holds a complete first write (a run exists, perhaps corrupt)."""
        with contextlib.suppress(UnknownRun):
            replay(self.log, self.run_id, stop_after=1)
            return True
        return False

    def _save_checkpoint(self, replayed: Replayed, state: RunState, lines: list[bytes]) -> None:
        if self.checkpoint is None:
            return
        offset = replayed.offset + sum(map(len, lines))
        last_line_start = offset - len(lines[-1]) if lines else replayed.last_line_start
        self.checkpoint.save(state, offset, last_line_start, replayed.lines + len(lines),
                             self.log.bound_path(LOG_NAME))

    def _resolve(self, escalation_id: str, mode: str, by: str | None) -> dict[str, Any]:
        check_id(escalation_id, what="escalation id")
        resolver = _check_actor(by or self.actor)
        return self._mutate(lambda state, now: ledger.decide_resolution(state, escalation_id, mode, resolver))

    @_in_one_folder
    def _mutate(self, decide: Callable[[RunState, str], Decision]) -> dict[str, Any]:
        try:
            return self._mutate_once(decide)
        except CacheInvalid:
            # A cache row failed its checksum, or SQLite a read, before anything was written:
            # decide again from the log alone. That write replaces the cache under the lock
            # (removing it here, unlocked, would pull it from under another thread's command).
            return self._mutate_once(decide, use_cache=False)

    def _mutate_once(self, decide: Callable[[RunState, str], Decision], *,
                     use_cache: bool = True) -> dict[str, Any]:
        notify: list[Event] = []
        with self.log.locked():
            replayed = self._replay(writable=True, use_cache=use_cache)
            if replayed.problem is not None:
                raise replayed.problem
            state = replayed.state
            # Deadlines follow this writer's clock; the lines' timestamps never go back: the
            # log's last one is their floor (docs/escalation.md: what a wrong clock can do).
            clock_now = format_ts(self.clock())
            now = max(clock_now, state.last_ts) if type(state.last_ts) is str else clock_now
            seq, prev = state.seq, state.last_hash
            # A torn tail is recorded first and only moved aside when this write happens, so
            # a command refused below leaves the log as it found it.
            saved_to = self.log.side_file_name(replayed.offset) if replayed.torn_bytes else ""
            payloads: list[Event] = []
            if saved_to:
                payloads.append({"type": "recovery", "torn_bytes": replayed.torn_bytes,
                                 "saved_to": saved_to})
            payloads += ledger.expire(state, clock_now)
            lines = self._seal(state, payloads, now)
            decision = decide(state, clock_now)
            if isinstance(decision.error, InputError):
                raise decision.error  # bad input changes nothing on disk
            first_seq = state.seq + 1
            lines += self._seal(state, decision.events, now)
            if len(lines) > 1:
                # Everything one command writes is one group: a reader counts all of it or
                # none (a grant never without its reservation). Sealed again with the
                # markers, which changes only the hashes of the new lines.
                sealed = seal(payloads + decision.events, seq=seq, prev=prev, ts=now,
                              actor=self.actor, grouped=True)
                lines = [line + b"\n" for _, line, _ in sealed]
                state.last_hash = sealed[-1][2]
            if saved_to:
                self.log.set_aside(replayed.offset, saved_to)
            if lines:
                self.log.append(b"".join(lines), torn_from=replayed.offset if saved_to else None)
            if lines or not replayed.checkpoint_current:
                self._save_checkpoint(replayed, state, lines)
            notify = [e for e in decision.events if e["type"] == "escalation" and not e["shadow"]]
        # Durable before anything is reported: this fsync covers our lines and every line
        # before them (an answer like "exists" may rest on another process's write).
        self.log.sync()
        for event in notify:
            self._notify({"run": self.run_id, "seq": first_seq, **event})
        if decision.error is not None:
            decision.error.facts.setdefault("run", self.run_id)
            raise decision.error
        return {"run": self.run_id, **decision.result}

    def _seal(self, state: RunState, payloads: Iterable[Event], now: str) -> list[bytes]:
        """Envelope the payloads after ``state`` and fold them in, so nothing is written that
        a replay would refuse."""
        lines = []
        for event, line, this_hash in seal(payloads, seq=state.seq, prev=state.last_hash, ts=now,
                                           actor=self.actor):
            try:
                ledger.apply(state, event, this_hash)
            except RuleViolation as exc:  # a bug: refuse to write it
                raise EscalateError(f"internal error: refusing to write an invalid event ({exc}); "
                                    "nothing was written — please report this bug") from exc
            lines.append(line + b"\n")
        return lines

    def _notify(self, event: Event) -> None:
        """Run the notify hook with the event on stdin; failure or a hang only warns.

        The hook runs in its own process group so that a timeout kills everything it
        started: a grandchild holding the pipes open would otherwise keep us waiting.
        """
        if not self.notify_cmd:
            return
        try:
            hook = subprocess.Popen(self.notify_cmd, shell=True, stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    start_new_session=True)
        except OSError as exc:
            _warn(f"notify command failed to start ({exc})")
            return
        try:
            _, stderr = hook.communicate(orjson.dumps(event), timeout=self.notify_timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(hook.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                hook.communicate(timeout=1)
            _warn(f"notify command timed out after {format_duration(self.notify_timeout)} and was killed")
            return
        if hook.returncode != 0:
            detail = stderr.decode(errors="replace").strip().splitlines()
            _warn(f"notify command exited {hook.returncode}" + (f" ({detail[-1][:200]})" if detail else ""))


def _warn(problem: str) -> None:
    print(f"escalate: warning: {problem}; the ledger is unchanged", file=sys.stderr)

def _setting_differences(existing: RunState, run_cap: int, task_cap: int, policy: Policy) -> list[str]:
    """What ``runs init`` asked for that the existing run does not have, in words."""
    differences = []
    if existing.run_cap_micros != run_cap:
        differences.append(f"cap {usd(existing.run_cap_micros)}, not {usd(run_cap)}")
    if existing.task_cap_micros != task_cap:
        differences.append(f"task cap {usd(existing.task_cap_micros)}, not {usd(task_cap)}")
    have, want = existing.policy.to_json(), policy.to_json()
    differences += [f"{key.removesuffix('_micros').replace('_', ' ')} {have[key]!r}, not {want[key]!r}"
                    for key in have if have[key] != want[key]]
    return differences


def make_policy(mode: str, threshold: Amount | None, timeout_s: float | None,
                max_extension: Amount) -> Policy:
    """Validate the escalation settings of ``runs init`` / ``runs set``."""
    if mode not in ledger.MODES:
        raise InputError(f"invalid escalation mode {mode!r}: use off, shadow or enforce",
                         code="invalid_mode", value=mode)
    if timeout_s is not None:
        # An escalation that expires as it opens could never be approved; one past the
        # maximum would have no expiry date to write.
        check_duration(timeout_s, what="escalation timeout", minimum=1, maximum=MAX_ESCALATION_TIMEOUT_S)
        if timeout_s != int(timeout_s):
            raise InputError(f"invalid escalation timeout {format_duration(timeout_s)}: give whole "
                             "seconds, e.g. 90s, 30m or 1h", code="invalid_duration",
                             value=format_duration(timeout_s))
    return Policy(
        mode=mode,
        approval_threshold_micros=(None if threshold is None
                                   else parse_micros(threshold, what="approval threshold")),
        timeout_s=None if timeout_s is None else int(timeout_s),
        max_extension_micros=parse_micros(max_extension, what="max extension"),
    )


def _outcome(run_id: str, escalation: ledger.Escalation) -> dict[str, Any]:
    facts = {"run": run_id, "escalation_id": escalation.id, "task": escalation.task,
             "mode": escalation.mode, "by": escalation.by, "resolved_at": escalation.resolved_at}
    if escalation.mode == "extend":
        return {"status": "approved", "reserved_micros": escalation.requested_micros,
                "extension_micros": escalation.extension_micros, **facts}
    if escalation.mode == "cancel":
        raise Refused(f"escalation {escalation.id} was cancelled by {escalation.by}; task "
                      f"{escalation.task} is halted for good — use a new task id", code="cancelled",
                      **facts)
    raise Pending(f"escalation {escalation.id} was paused by {escalation.by}; task "
                  f"{escalation.task} may ask again later with the same reserve", code="paused", **facts)


# ---------------------------------------------------------------------- many runs


def _below_zero(amount: Amount) -> bool:
    """Whether ``amount`` reads as a negative number: ``"-5"``, ``Decimal(-5)``, ``-5``; an
    option taken for a value (``"--json"``) is not one."""
    if isinstance(amount, str):
        text = amount.strip()
        return text.startswith("-") and not text.startswith("--")
    if isinstance(amount, Decimal):
        return amount.is_signed() and not amount.is_nan()
    return isinstance(amount, Micros) and amount < 0


def iter_run_ids(runs_dir: str | os.PathLike[str]) -> Iterator[str]:
    """The ids of runs under ``runs_dir`` (folders with a log), sorted."""
    root = Path(runs_dir)
    if not root.is_dir():
        return
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not entry.is_symlink() and (entry / LOG_NAME).is_file():
            yield entry.name

