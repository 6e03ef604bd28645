"""The library: one method per command, each ``lock → fold → decide → append``.

:class:`Ledger` is what ``from escalate import Ledger`` gives a Python scheduler, and
what the CLI calls. Refusals raise :class:`~escalate.errors.EscalateError` subclasses
after the events that record them are durable.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from escalate import ledger
from escalate.errors import (
    Conflict,
    CorruptLedger,
    EscalateError,
    InputError,
    Pending,
    Refused,
    UnknownRun,
)
from escalate.events import Event, format_ts, iter_lines, line_hash, seal
from escalate.ids import check_id
from escalate.ledger import Decision, Policy, RuleViolation, RunState
from escalate.log import LOG_NAME, FileLog, LogBackend
from escalate.money import Amount, parse_micros

DEFAULT_LOCK_TIMEOUT_S = 30.0
DEFAULT_ESCALATION_TIMEOUT_S = 3600
NOTIFY_TIMEOUT_S = 10.0
_WAIT_POLL_S = 0.05

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def default_runs_dir() -> Path:
    """``$ESCALATE_RUNS_DIR`` or ``./runs``."""
    return Path(os.environ.get("ESCALATE_RUNS_DIR") or "runs")


def default_lock_timeout() -> float:
    """``$ESCALATE_LOCK_TIMEOUT`` (seconds) or 30."""
    raw = os.environ.get("ESCALATE_LOCK_TIMEOUT")
    return DEFAULT_LOCK_TIMEOUT_S if raw is None else parse_seconds(raw, what="ESCALATE_LOCK_TIMEOUT")


def default_actor() -> str:
    """``$ESCALATE_ACTOR``, else the OS user."""
    actor = os.environ.get("ESCALATE_ACTOR")
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid-{os.getuid()}"


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_seconds(text: str, *, what: str = "duration") -> float:
    """``90``, ``1.5s``, ``30m``, ``1h``, ``2d``, ``250ms`` → seconds (non-negative, finite)."""
    raw = text.strip().lower()
    unit = next((u for u in ("ms", "s", "m", "h", "d") if raw.endswith(u)), "")
    number = raw[: len(raw) - len(unit)] if unit else raw
    if not number or not all(c.isdigit() or c == "." for c in number) or number.count(".") > 1 \
            or not number.isascii() or number == ".":
        raise InputError(f"invalid {what} {text!r}: use a number of seconds or 30s, 15m, 1h, 2d",
                         code="invalid_duration", value=text)
    return float(number) * _UNITS[unit or "s"]


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
    lines: int = 0


def replay(log: LogBackend, run_id: str, *, tolerant: bool = False) -> Replayed:
    """Fold the whole log. Strict: stop at the first problem (``problem``); tolerant: note
    every problem and go on (``problems``), for ``runs verify``."""
    state: RunState | None = None
    offset = 0
    line_no = 0
    problem: CorruptLedger | None = None
    problems: list[tuple[int, str]] = []
    with log.reader() as stream:
        for line, end in iter_lines(stream, 0):
            line_no += 1
            this_hash = line_hash(line)
            try:
                event = orjson.loads(line)
                if not isinstance(event, dict):
                    raise RuleViolation("the line is not a JSON object")
                if state is None:
                    state = ledger.open_run(event, this_hash)
                else:
                    ledger.apply(state, event, this_hash)
            except (orjson.JSONDecodeError, RuleViolation) as exc:
                reason = f"unparsable JSON ({exc})" if isinstance(exc, orjson.JSONDecodeError) else str(exc)
                if not tolerant or state is None:
                    problem = CorruptLedger(
                        f"{log_path(log)} line {line_no}: {reason}; writes are refused — "
                        f"inspect with 'escalate runs verify {run_id}'",
                        run=run_id, line=line_no, problem=reason)
                    problems.append((line_no, reason))
                    break
                problems.append((line_no, reason))
                _resync(state, event if isinstance(event, dict) else None, this_hash)
            offset = end
        size = stream.seek(0, os.SEEK_END)
    if state is None:
        if problem is not None:
            raise problem
        raise UnknownRun(f"run {run_id} has no complete first line; create it with 'escalate runs init'",
                         run=run_id)
    return Replayed(state=state, offset=offset, torn_bytes=size - offset, problem=problem,
                    problems=problems, lines=line_no)


def _resync(state: RunState, event: dict[str, Any] | None, this_hash: str) -> None:
    """After a bad line in tolerant mode: keep what the payload says if it folds, and
    continue the chain from this line so one bad line is reported once."""
    if event is not None:
        with contextlib.suppress(RuleViolation, KeyError, TypeError):
            ledger.apply_payload(state, event)
        seq = event.get("seq")
        state.seq = seq if type(seq) is int else state.seq + 1
    else:
        state.seq += 1
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
    ) -> None:
        self.run_id = check_id(run_id, what="run id")
        self.runs_dir = Path(runs_dir)
        timeout = default_lock_timeout() if lock_timeout is None else lock_timeout
        if not timeout >= 0:
            raise InputError(f"invalid lock timeout {timeout!r}: must be 0 or more seconds",
                             code="invalid_duration")
        self.actor = _check_actor(actor or default_actor())
        self.clock = clock or _utc_now
        self.notify_cmd = notify_cmd if notify_cmd is not None else os.environ.get("ESCALATE_NOTIFY_CMD")
        self.log: LogBackend = FileLog(self.runs_dir / self.run_id, lock_timeout=timeout)

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
        escalation_timeout_s: int | None = DEFAULT_ESCALATION_TIMEOUT_S,
        max_extension: Amount = 0,
        **options: Any,
    ) -> Ledger:
        """Create a run (idempotent: the same settings again is fine; different ones conflict)."""
        run = cls(runs_dir, run_id, **options)
        run_cap = parse_micros(cap, what="cap")
        if run_cap == 0:
            raise InputError("invalid cap 0: a run needs a cap above zero", code="invalid_amount")
        task_cap_micros = None if task_cap is None else parse_micros(task_cap, what="task cap")
        if task_cap_micros is not None and task_cap_micros > run_cap:
            raise InputError("invalid task cap: it is above the run cap", code="invalid_amount")
        policy = make_policy(escalation, approval_threshold, escalation_timeout_s, max_extension)
        payload = ledger.run_opened_payload(run.run_id, run_cap, task_cap_micros, policy)
        [(_, line, _)] = seal([payload], seq=0, prev="", ts=format_ts(run.clock()), actor=run.actor)
        if run.log.create(line + b"\n"):
            return run
        existing = run._replay().state
        wanted = (run_cap, payload["task_cap_micros"], policy)
        have = (existing.run_cap_micros, existing.task_cap_micros, existing.policy)
        if wanted == have:
            return run
        raise Conflict(
            f"run {run.run_id} already exists with different settings (cap "
            f"{existing.run_cap_micros} micros); pick a new run id",
            run=run.run_id, cap_micros=existing.run_cap_micros)

    @classmethod
    def open(cls, runs_dir: str | os.PathLike[str], run_id: str, **options: Any) -> Ledger:
        """Open an existing run; :class:`UnknownRun` (exit 2) if there is none."""
        run = cls(runs_dir, run_id, **options)
        if not run.log.exists():
            raise UnknownRun(
                f"no run {run_id} under {run.runs_dir}; create it with "
                f"'escalate runs init {run_id} --cap USD' or check --runs-dir", run=run_id)
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

    def set_policy(self, **changes: Any) -> dict[str, Any]:
        """Change the escalation policy; unnamed settings keep their current value."""
        def decide(state: RunState, now: str) -> Decision:
            current = state.policy
            policy = make_policy(
                changes.get("escalation", current.mode),
                changes.get("approval_threshold", current.approval_threshold_micros),
                changes.get("escalation_timeout_s", current.timeout_s),
                changes.get("max_extension", current.max_extension_micros))
            return ledger.decide_policy(state, policy)
        return self._mutate(decide)

    def sweep(self) -> dict[str, Any]:
        """Resolve expired escalations (``pause`` by ``timeout``); a no-op otherwise."""
        result = self._mutate(lambda state, now: Decision(result={"status": "swept"}))
        return result

    def wait(self, escalation_id: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        """Block until the escalation is resolved, without holding the lock.

        Returns on approval; raises :class:`Refused` on cancel and :class:`Pending` on
        pause or when ``timeout_s`` passes first.
        """
        check_id(escalation_id, what="escalation id")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_size = -1
        while True:
            size = self.log.size()
            if size != last_size:
                last_size = size
                state = self.state()
                escalation = state.escalations.get(escalation_id)
                if escalation is None:
                    raise InputError(f"no escalation {escalation_id} in run {self.run_id}",
                                     code="unknown_escalation", escalation_id=escalation_id)
                if escalation.state == "resolved":
                    return _outcome(self.run_id, escalation)
                if escalation.expires_at is not None and escalation.expires_at <= format_ts(self.clock()):
                    self.sweep()
                    continue
            if deadline is not None and time.monotonic() >= deadline:
                raise Pending(
                    f"escalation {escalation_id} is still open after {timeout_s:g}s; "
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

    def snapshot(self) -> Replayed:
        """The state with what a reader should be warned about (a torn tail, corruption)."""
        return self._replay()

    def verify(self) -> Replayed:
        """Fold every line, noting each problem with its line (``runs verify``)."""
        return replay(self.log, self.run_id, tolerant=True)

    # ------------------------------------------------------------------ internals

    def _replay(self) -> Replayed:
        if not self.log.exists():
            raise UnknownRun(f"no run {self.run_id} under {self.runs_dir}", run=self.run_id)
        return replay(self.log, self.run_id)

    def _resolve(self, escalation_id: str, mode: str, by: str | None) -> dict[str, Any]:
        check_id(escalation_id, what="escalation id")
        resolver = _check_actor(by or self.actor)
        return self._mutate(lambda state, now: ledger.decide_resolution(state, escalation_id, mode, resolver))

    def _mutate(self, decide: Callable[[RunState, str], Decision]) -> dict[str, Any]:
        notify: list[Event] = []
        with self.log.locked():
            replayed = self._replay()
            if replayed.problem is not None:
                raise replayed.problem
            state = replayed.state
            now = format_ts(self.clock())
            lines: list[bytes] = []
            if replayed.torn_bytes:
                torn, saved_to = self.log.set_aside(replayed.offset)
                lines += self._seal(state, [{"type": "recovery", "torn_bytes": torn,
                                             "saved_to": saved_to}], now)
            lines += self._seal(state, ledger.expire(state, now), now)
            decision = decide(state, now)
            if isinstance(decision.error, InputError):
                raise decision.error  # bad input changes nothing on disk
            first_seq = state.seq + 1
            lines += self._seal(state, decision.events, now)
            if lines:
                self.log.append(b"".join(lines))
            notify = [e for e in decision.events if e["type"] == "escalation" and not e["shadow"]]
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
                raise EscalateError(f"internal error: refusing to write an invalid event ({exc})") from exc
            lines.append(line + b"\n")
        return lines

    def _notify(self, event: Event) -> None:
        """Run the notify hook with the event on stdin; failure only warns."""
        if not self.notify_cmd:
            return
        try:
            completed = subprocess.run(self.notify_cmd, shell=True, input=orjson.dumps(event),
                                       capture_output=True, timeout=NOTIFY_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            print(f"escalate: warning: notify command timed out after {NOTIFY_TIMEOUT_S:g}s; "
                  "the ledger is unchanged", file=sys.stderr)
            return
        except OSError as exc:
            print(f"escalate: warning: notify command failed to start ({exc}); the ledger is "
                  "unchanged", file=sys.stderr)
            return
        if completed.returncode != 0:
            detail = completed.stderr.decode(errors="replace").strip().splitlines()
            print(f"escalate: warning: notify command exited {completed.returncode}"
                  + (f" ({detail[-1][:200]})" if detail else "") + "; the ledger is unchanged",
                  file=sys.stderr)


def make_policy(mode: str, threshold: Amount | None, timeout_s: float | None,
                max_extension: Amount) -> Policy:
    """Validate the escalation settings of ``runs init`` / ``runs set``."""
    if mode not in ledger.MODES:
        raise InputError(f"invalid escalation mode {mode!r}: use off, shadow or enforce",
                         code="invalid_mode", value=mode)
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
                      f"{escalation.task} is halted for good", code="cancelled", **facts)
    raise Pending(f"escalation {escalation.id} was paused by {escalation.by}; task "
                  f"{escalation.task} may ask again later", code="paused", **facts)


# ---------------------------------------------------------------------- many runs


def iter_run_ids(runs_dir: str | os.PathLike[str]) -> Iterator[str]:
    """The ids of runs under ``runs_dir`` (folders with a log), sorted."""
    root = Path(runs_dir)
    if not root.is_dir():
        return
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not entry.is_symlink() and (entry / LOG_NAME).is_file():
            yield entry.name

