"""The library: :class:`Ledger`, one method per command, each ``lock → fold → decide → append``.

:class:`Ledger` is what ``from escalate import Ledger`` gives a Python scheduler, and
what the CLI calls. It only orchestrates: the settings come from :mod:`escalate.config`,
the rules from :mod:`escalate.fold` and :mod:`escalate.decide`, the lines and the lock from a store
(:mod:`escalate.store`), the hook from :mod:`escalate.notify`. Refusals raise
:class:`~escalate.errors.EscalateError` subclasses after the events that record them are
durable.
"""

from __future__ import annotations

import enum
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, Final, cast

from escalate import config
from escalate import decide as decisions
from escalate import fold as folding
from escalate.config import DEFAULT_ESCALATION_TIMEOUT_S, Clock
from escalate.decide import Decision
from escalate.durations import MAX_WAIT_S, check_duration, format_duration
from escalate.errors import (
    Conflict,
    CorruptLedger,
    EscalateError,
    InputError,
    Pending,
    UnknownRun,
)
from escalate.events import MAX_REASON_LENGTH, PRIORITIES, Event, format_ts, parse_ts, seal
from escalate.ids import check_id
from escalate.money import Amount, Micros, parse_micros
from escalate.notify import run_hook
from escalate.replay import Progress, Replayed, read_events
from escalate.results import (
    DeliveryResult,
    PolicyResult,
    ResolutionResult,
    SweepResult,
    TaskResult,
    resolution_outcome,
)
from escalate.state import EscalationState, Policy, RuleViolation, RunState
from escalate.store import CacheInvalid, LedgerStore, Store, open_store

_WAIT_POLL_S = 0.05
# How long a wait sleeps at most before it looks at the clock again (expiry follows it).
_WAIT_WAKE_S = 1.0

# A decision from the state, the write's time and the escalations this write expires.
Decide = Callable[[RunState, str, list[str]], Decision]


class Unchanged(enum.Enum):
    """The type of :data:`UNCHANGED`: ``set_policy`` leaves such a setting as it is
    (``None`` already means "none" for some of them)."""

    UNCHANGED = "unchanged"


UNCHANGED: Final = Unchanged.UNCHANGED


class Ledger:
    """One run's budget ledger: the library API the CLI is a thin layer over."""

    def __init__(
        self,
        runs_dir: str | os.PathLike[str] | Store,
        run_id: str,
        *,
        lock_timeout: float | None = None,
        actor: str | None = None,
        clock: Clock | None = None,
        notify_cmd: str | None = None,
        notify_timeout: float | None = None,
    ) -> None:
        self.run_id = check_id(run_id, what="run id")
        # Every setting is read up front, so a bad value is an input error before anything
        # is written.
        timeout = config.lock_timeout(lock_timeout)
        self.actor = config.actor(actor)
        self.clock = clock or config.utc_now
        self.notify_cmd = config.notify_cmd(notify_cmd)
        self.notify_timeout = config.notify_timeout(notify_timeout)
        # The store holding every run (a runs folder), and this run in it.
        self.runs_store = open_store(runs_dir)
        # Set by :meth:`init`: whether this call created the run, or found it with the same
        # settings (two pipelines that picked the same run id should be able to tell).
        self.created = False
        self.store: LedgerStore = self.runs_store.ledger(self.run_id, lock_timeout=timeout)

    @property
    def progress(self) -> Progress | None:
        """Called as a fold reads the log, with (bytes so far, bytes in all): the CLI shows
        a bar for a large one."""
        return self.store.progress

    @progress.setter
    def progress(self, report: Progress | None) -> None:
        self.store.progress = report

    # ------------------------------------------------------------------ opening

    @classmethod
    def init(
        cls,
        runs_dir: str | os.PathLike[str] | Store,
        run_id: str,
        *,
        cap: Amount,
        task_cap: Amount | None = None,
        escalation: str = "off",
        approval_threshold: Amount | None = None,
        escalation_timeout_s: float | None = DEFAULT_ESCALATION_TIMEOUT_S,
        max_extension: Amount = "0",
        approvers: str | list[str] | tuple[str, ...] = (),
        renotify_every_s: float | None = None,
        **options: Any,
    ) -> Ledger:
        """Create a run (idempotent: the same settings again is fine; different ones conflict).

        Amounts are USD as ``str`` or ``Decimal``, or ``Micros``; ``escalation_timeout_s`` is
        whole seconds, 1 to 365 days, or ``None`` for never; ``approvers`` are the names that
        may resolve escalations (a list, or ``"a,b"``; empty: anyone but the requester);
        ``renotify_every_s`` (1 minute to 365 days, ``None``: never) is how often ``sweep``
        reminds of an open escalation.
        """
        run = cls(runs_dir, run_id, **options)
        run.runs_store.check_usable()
        run_cap, task_cap_micros = config.run_caps(cap, task_cap)
        policy = config.make_policy(escalation, approval_threshold, escalation_timeout_s, max_extension,
                                    approvers=approvers, renotify_every_s=renotify_every_s)
        payload = decisions.run_opened_payload(run.run_id, run_cap, task_cap_micros, policy)
        now = format_ts(run.clock())
        [(_, line, _)] = seal([payload], seq=0, prev="", ts=now, actor=run.actor)

        def recovery(torn_bytes: int, saved_to: str) -> bytes:
            # run_opened must stay the first line, so a torn first line is recorded right after
            # it, in one group: a cut between the two leaves no run, only a torn tail.
            sealed = seal([payload, {"type": "recovery", "torn_bytes": torn_bytes, "saved_to": saved_to}],
                          seq=0, prev="", ts=now, actor=run.actor, grouped=True)
            return b"".join(line + b"\n" for _, line, _ in sealed)

        if run.store.create(line + b"\n", recovery):
            run.created = True
            return run
        existing = run.store.read().state
        wanted = (run_cap, payload["task_cap_micros"], policy)
        have = (existing.run_cap_micros, existing.task_cap_micros, existing.policy)
        if wanted == have:
            return run  # (``created`` stays False: a script can tell a reused run id)
        differences = config.setting_differences(existing, run_cap, payload["task_cap_micros"], policy)
        only_policy = (existing.run_cap_micros, existing.task_cap_micros) == wanted[:2]
        raise Conflict(
            f"run {run.run_id} already exists with {'; '.join(differences)}; pick a new run id"
            + (", or change the escalation policy with 'escalate runs set'" if only_policy else ""),
            run=run.run_id, cap_micros=existing.run_cap_micros,
            task_cap_micros=existing.task_cap_micros, escalation=existing.policy.to_json())

    @classmethod
    def open(cls, runs_dir: str | os.PathLike[str] | Store, run_id: str, **options: Any) -> Ledger:
        """Open an existing run; :class:`UnknownRun` (exit 2) if there is none. ``runs_dir``
        is a runs folder, a store URL (:func:`escalate.store.open_store`) or a store."""
        run = cls(runs_dir, run_id, **options)
        if not run.store.exists():
            raise UnknownRun(
                f"no run {run_id} under {run.runs_store.where}; see 'escalate runs list' (or check "
                f"--runs-dir), or create it with 'escalate runs init {run_id} --cap USD'", run=run_id)
        return run

    # ------------------------------------------------------------------ commands

    def reserve(self, task: str, amount: Amount, *, reason: str = "", priority: str = "normal") -> TaskResult:
        """Reserve ``amount`` for ``task`` before spending it; ``reason`` and ``priority``
        (low, normal, high, urgent) are shown to an approver if it escalates."""
        task_id = check_id(task, what="task id")
        micros = parse_micros(amount, what="estimate")
        _check_request(reason, priority)
        return cast(TaskResult, self._mutate(
            lambda state, now, _: decisions.decide_reserve(state, task_id, micros, now, reason, priority)))

    def increase(self, task: str, to: Amount, *, reason: str = "", priority: str = "normal") -> TaskResult:
        """Raise ``task``'s reservation to the absolute amount ``to``; ``reason`` is recorded,
        and with ``priority`` shown to an approver if it escalates."""
        task_id = check_id(task, what="task id")
        micros = parse_micros(to, what="new amount")
        _check_request(reason, priority)
        return cast(TaskResult, self._mutate(
            lambda state, now, _: decisions.decide_increase(state, task_id, micros, reason, now, priority)))

    def release(self, task: str, actual: Amount) -> TaskResult:
        """Settle ``task`` with what it actually cost (may exceed the reservation); an open
        escalation of the task is withdrawn in the same write."""
        task_id = check_id(task, what="task id")
        micros = parse_micros(actual, what="actual")
        return cast(TaskResult, self._mutate(
            lambda state, now, _: decisions.decide_release(state, task_id, micros, self.actor)))

    def approve(self, escalation_id: str, *, by: str | None = None) -> ResolutionResult:
        """Grant an escalation: the extension and the task's reservation in one write."""
        return self._resolve(escalation_id, "extend", by)

    def pause(self, escalation_id: str, *, by: str | None = None) -> ResolutionResult:
        """Park the task; it may ask again later."""
        return self._resolve(escalation_id, "pause", by)

    def cancel(self, escalation_id: str, *, by: str | None = None) -> ResolutionResult:
        """End the task for good (``halt`` with reason ``cancelled``)."""
        return self._resolve(escalation_id, "cancel", by)

    def withdraw(self, escalation_id: str, *, by: str | None = None) -> ResolutionResult:
        """Take back an open escalation (its requester only); the task keeps what it holds."""
        return self._resolve(escalation_id, "withdraw", by)

    def set_policy(
        self,
        *,
        escalation: str | Unchanged = UNCHANGED,
        approval_threshold: Amount | Unchanged | None = UNCHANGED,
        escalation_timeout_s: float | Unchanged | None = UNCHANGED,
        max_extension: Amount | Unchanged = UNCHANGED,
        approvers: str | list[str] | tuple[str, ...] | Unchanged = UNCHANGED,
        renotify_every_s: float | Unchanged | None = UNCHANGED,
    ) -> PolicyResult:
        """Change the escalation policy; settings left out keep their current value
        (``approval_threshold=None`` removes the threshold, ``escalation_timeout_s=None``
        makes escalations never time out, ``approvers=()`` lets anyone approve,
        ``renotify_every_s=None`` stops reminders)."""
        def decide(state: RunState, now: str, expired: list[str]) -> Decision:
            current = state.policy
            threshold = current.approval_threshold_micros
            policy = config.make_policy(
                current.mode if escalation is UNCHANGED else escalation,
                (None if threshold is None else Micros(threshold)) if approval_threshold is UNCHANGED
                else approval_threshold,
                current.timeout_s if escalation_timeout_s is UNCHANGED else escalation_timeout_s,
                Micros(current.max_extension_micros) if max_extension is UNCHANGED else max_extension,
                approvers=current.approvers if approvers is UNCHANGED else approvers,
                renotify_every_s=(current.renotify_every_s if renotify_every_s is UNCHANGED
                                  else renotify_every_s))
            return decisions.decide_policy(state, policy, self.actor, role)
        role = self.store.role()
        return cast(PolicyResult, self._mutate(decide))

    def sweep(self, *, redeliver: bool = True) -> SweepResult:
        """Resolve expired escalations (``pause`` by ``timeout``); ``expired`` lists their ids.

        With a notify hook, then send again the notice of each open escalation that is due
        (:func:`escalate.decide.delivery_due`: a failed delivery after its backoff, or every
        ``renotify_every_s``); ``notified`` lists those attempts."""
        due: list[EscalationState] = []

        def decide(state: RunState, now: str, expired: list[str]) -> Decision:
            # Every write expires what is due before it decides; a sweep is a write that only
            # that, and it notes (under the lock) which notices are due again.
            due.clear()
            if redeliver and self.notify_cmd:
                due.extend(e for e in state.open_escalations.values()
                           if decisions.delivery_due(e, state.policy, now))
            return Decision(result={"status": "swept", "expired": expired})

        result = cast(SweepResult, self._mutate(decide))
        result["notified"] = [self._deliver(self._notice(escalation), escalation.id) for escalation in due]
        return result

    def wait(self, escalation_id: str, *, timeout_s: float | None = None) -> ResolutionResult:
        """Block until the escalation is resolved, without holding the lock.

        Returns on approval; raises :class:`Refused` on cancel and :class:`Pending` on
        pause (a timeout's too) or when ``timeout_s`` passes first.
        """
        check_id(escalation_id, what="escalation id")
        if timeout_s is not None:
            check_duration(timeout_s, what="wait timeout", maximum=MAX_WAIT_S)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_size = -1
        waiting: tuple[EscalationState, Policy] | None = None
        while True:
            size = self.store.size()
            if size != last_size:
                last_size = size
                state = self.state()
                escalation = state.escalations.get(escalation_id)
                if escalation is None or escalation.shadow or escalation.state == "resolved":
                    # An answer rests only on durable bytes: the writer of what was read may
                    # not have synced yet, and this fsync covers every byte written before it.
                    self.store.sync()
                if escalation is None:
                    raise InputError(f"no escalation {escalation_id} in run {self.run_id}; list them "
                                     f"with 'escalate escalations --run {self.run_id}'",
                                     code="unknown_escalation", escalation_id=escalation_id)
                if escalation.shadow:
                    raise Conflict(f"escalation {escalation_id} was recorded in shadow mode and needs "
                                   "nobody; there is nothing to wait for", escalation_id=escalation_id,
                                   state="resolved", mode=None)
                if escalation.state == "resolved":
                    return resolution_outcome(self.run_id, escalation)
                waiting = (escalation, state.policy)
            # Expiry follows the clock, not the log: nobody else may ever write to this run again.
            if waiting is not None and decisions.is_expired(*waiting, format_ts(self.clock())):
                waiting = None
                self.sweep(redeliver=False)
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise Pending(
                    f"escalation {escalation_id} is still open after {format_duration(timeout_s or 0)}; "
                    f"wait again or ask an approver to run 'escalate approve {self.run_id} {escalation_id}'",
                    code="escalation_open", escalation_id=escalation_id, run=self.run_id)
            wake = _WAIT_WAKE_S if deadline is None else min(_WAIT_WAKE_S, deadline - time.monotonic())
            self.store.wait_for_change(last_size, max(wake, 0.0), poll_s=_WAIT_POLL_S)

    # ------------------------------------------------------------------ reading

    def state(self) -> RunState:
        """The run's state now, read without the lock; :class:`CorruptLedger` if unreadable."""
        replayed = self.store.read()
        if replayed.problem is not None:
            raise replayed.problem
        return replayed.state

    def verified_state(self) -> RunState:
        """The run's state from a strict fold of the whole log with every check, never from
        the cache; :class:`CorruptLedger` on the first problem ``runs verify`` would report.
        For verdicts such as a CI gate: the cache's key cannot see an edit in place before
        its checkpoint when lines were appended after it (see :mod:`escalate.cache`)."""
        replayed = self.store.read(use_cache=False)
        if replayed.problem is not None:
            raise replayed.problem
        # Fields the fold does not use are judged too, as runs verify judges them: a verdict
        # never passes a log that verify fails (pydantic, loaded only here).
        from escalate.schema import line_problems

        with self.read_log() as stream:
            for line, problem in line_problems(stream):
                raise CorruptLedger(
                    f"{self.store.where} line {line}: {problem}; inspect with "
                    f"'escalate runs verify {self.run_id}'", run=self.run_id, line=line,
                    problem=problem, first_suspect_line=line)
        return replayed.state

    def replayed(self) -> Replayed:
        """The state as a reader sees it, with what the reader should be warned about (a
        torn tail, corruption: the totals then stop before the first doubtful line)."""
        return self.store.read()

    def verify(self) -> Replayed:
        """Fold every line, noting each problem with its line (``runs verify``)."""
        return self.store.verify()

    def log_size(self) -> int:
        """The bytes in the log so far: it grows with every write (``runs watch`` polls it)."""
        return self.store.size()

    def wait_for_change(self, seen_size: int, timeout_s: float, *, poll_s: float = _WAIT_POLL_S) -> bool:
        """Block until :meth:`log_size` may differ from ``seen_size``, at most ``timeout_s``
        (``runs watch``): the PostgreSQL store wakes on its notice, the file store polls
        every ``poll_s``. True when it changed."""
        return self.store.wait_for_change(seen_size, timeout_s, poll_s=poll_s)

    def read_log(self) -> BinaryIO:
        """The log's bytes, read without the lock, for checks of every line (``runs
        verify``'s schema check); the caller closes it."""
        return self.store.reader()

    def events(self, *, last: int | None = None, after_offset: int = 0) -> tuple[list[Event], int]:
        """The log's complete lines as events (the ``last`` ones only, if given), read from
        byte ``after_offset`` without the lock; returns them with the offset to read on from.
        An unparsable line is skipped here: ``runs verify`` is the place that names it."""
        if not self.store.exists():
            raise UnknownRun(f"no run {self.run_id} under {self.runs_store.where}; check the run id "
                             "with 'escalate runs list'", run=self.run_id)
        with self.store.reader() as stream:
            return read_events(stream, last=last, after_offset=after_offset)

    # ------------------------------------------------------------------ writing

    def _resolve(self, escalation_id: str, mode: str, by: str | None) -> ResolutionResult:
        check_id(escalation_id, what="escalation id")
        resolver = config.check_actor(by or self.actor)
        role = self.store.role()  # who acts, as the database knows it (None: a runs folder)
        return cast(ResolutionResult, self._mutate(
            lambda state, now, _: decisions.decide_resolution(state, escalation_id, mode, resolver, role)))

    def _mutate(self, decide: Decide) -> dict[str, Any]:
        with self.store.command():
            try:
                return self._mutate_once(decide, use_cache=True)
            except CacheInvalid:
                # A cache row failed its checksum, or SQLite a read, before anything was
                # written: decide again from the log alone. That write replaces the cache under
                # the lock (removing it here, unlocked, would pull it from under another
                # thread's command).
                return self._mutate_once(decide, use_cache=False)

    def _mutate_once(self, decide: Decide, *, use_cache: bool) -> dict[str, Any]:
        with self.store.transaction(use_cache=use_cache) as transaction:
            replayed = transaction.load()
            if replayed.problem is not None:
                raise replayed.problem
            state = replayed.state
            # Deadlines follow this writer's clock; the lines' timestamps never go back: the
            # log's last one is their floor (docs/escalation.md: what a wrong clock can do).
            clock_now = format_ts(self.clock())
            now = max(clock_now, self._floor_ts(state))
            seq, prev = state.seq, state.last_hash
            recovery = transaction.recovery(replayed)
            payloads: list[Event] = [recovery] if recovery is not None else []
            expiries = decisions.expire(state, clock_now)
            payloads += expiries
            lines = self._seal(state, payloads, now)
            decision = decide(state, clock_now, [event["id"] for event in expiries])
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
            if recovery is not None and not expiries and not decision.events:
                # Only the torn tail would be written: an answer that needs no write (an
                # idempotent repeat, a refusal already on record) leaves it for the next
                # writer, so it works on a full disk or read-only media too. The state folded
                # the recovery, so it is no checkpoint either.
                return self._answer(first_seq, decision)
            transaction.append(replayed, lines)
            transaction.save_checkpoint(replayed, state, lines)
        return self._answer(first_seq, decision)

    def _answer(self, first_seq: int, decision: Decision) -> dict[str, Any]:
        """Report a decision once everything it rests on is durable."""
        # Durable before anything is reported: this sync covers our lines and every line
        # before them (an answer like "exists" may rest on another process's write).
        self.store.sync()
        self._notify(first_seq, decision.events)
        if decision.error is not None:
            decision.error.facts.setdefault("run", self.run_id)
            raise decision.error
        return {"run": self.run_id, **decision.result}

    def _floor_ts(self, state: RunState) -> str:
        """The last line's ``ts``, which the next line's may not go below. The fold checks a
        ``ts`` only where it keeps one for itself; this one it now uses, so it must be a
        timestamp exactly as escalate writes them (checked once per command, not per line)."""
        try:
            if format_ts(parse_ts(state.last_ts)) == state.last_ts:
                return state.last_ts
        except (TypeError, ValueError, AttributeError):
            pass
        raise CorruptLedger(
            f"{self.store.where} line {state.seq}: field 'ts' must be a UTC timestamp like "
            f"2026-11-23T14:00:00.123456Z; writes are refused — inspect with "
            f"'escalate runs verify {self.run_id}'", run=self.run_id, line=state.seq,
            problem="invalid ts", first_suspect_line=state.seq)

    def _seal(self, state: RunState, payloads: Iterable[Event], now: str) -> list[bytes]:
        """Envelope the payloads after ``state`` and fold them in, so nothing is written that
        a replay would refuse."""
        lines = []
        for event, line, this_hash in seal(payloads, seq=state.seq, prev=state.last_hash, ts=now,
                                           actor=self.actor):
            try:
                folding.apply(state, event, this_hash)
            except RuleViolation as exc:  # a bug: refuse to write it
                raise EscalateError(f"internal error: refusing to write an invalid event ({exc}); "
                                    "nothing was written — please report this bug") from exc
            lines.append(line + b"\n")
        return lines

    def _notify(self, first_seq: int, events: list[Event]) -> None:
        """Run the notify hook for each escalation a person must answer, and record it."""
        if not self.notify_cmd:
            return
        for event in events:
            if event["type"] == "escalation" and not event["shadow"]:
                self._deliver({"run": self.run_id, "seq": first_seq, "requested_by": self.actor, "attempt": 1,
                               **event}, event["id"])

    def _notice(self, escalation: EscalationState) -> dict[str, Any]:
        """An open escalation's notice sent again, with the fields of its ``escalation``
        line (its ``seq`` is in its id) and the attempt this is."""
        fields = escalation.to_json()
        return {"run": self.run_id, "seq": int(escalation.id.rpartition("-")[2] or 0),
                "requested_by": escalation.requested_by, "attempt": escalation.notify_attempts + 1,
                "type": "escalation",
                **{key: fields[key] for key in (
                    "id", "task", "kind", "from_micros", "requested_micros", "remaining_micros", "reason",
                    "offered", "needed_extension_micros", "expires_at", "shadow", "request_reason",
                    "priority")}}

    def _deliver(self, notice: dict[str, Any], escalation_id: str) -> DeliveryResult:
        """Run the hook, then record the attempt as ``escalation_notified`` in a second,
        separate write. The decision it follows is already durable and answered, so a
        failure to record is only a warning: it never reaches the caller or its exit code."""
        ok, detail = run_hook(self.notify_cmd or "", notice, timeout_s=self.notify_timeout)
        try:
            recorded = self._mutate(
                lambda state, now, _: decisions.decide_notified(state, escalation_id, ok, detail))
        except Exception as exc:  # anything at all: the answer it follows stands regardless
            print(f"escalate: warning: the notify attempt for {escalation_id} was not recorded ({exc}); "
                  "the decision stands", file=sys.stderr)
            return {"escalation_id": escalation_id, "attempt": None, "ok": ok, "detail": detail}
        return {"escalation_id": escalation_id, "attempt": recorded.get("attempt"), "ok": ok,
                "detail": detail}


def _check_request(reason: Any, priority: Any) -> None:
    """What a requester tells an approver: a printable reason and a known priority."""
    if not isinstance(reason, str) or len(reason) > MAX_REASON_LENGTH or not reason.isprintable():
        shown = reason if isinstance(reason, str) else repr(reason)
        raise InputError(f"invalid reason {shown[:40]!r}: use up to {MAX_REASON_LENGTH} printable characters",
                         code="invalid_reason", value=shown[:40])
    if priority not in PRIORITIES:
        raise InputError(f"invalid priority {str(priority)[:40]!r}: use one of {', '.join(PRIORITIES)}",
                         code="invalid_priority", value=str(priority)[:40])


# ---------------------------------------------------------------------- many runs


def iter_run_ids(runs_dir: str | os.PathLike[str] | Store) -> Iterator[str]:
    """The ids of the runs in a store (a runs folder: folders with a log), sorted."""
    return open_store(runs_dir).run_ids()
