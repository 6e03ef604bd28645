"""The library: :class:`Ledger`, one method per command, each ``lock → fold → decide → append``.

:class:`Ledger` is what ``from escalate import Ledger`` gives a Python scheduler, and
what the CLI calls. It only orchestrates: the settings come from :mod:`escalate.config`,
the rules from :mod:`escalate.core.fold` and :mod:`escalate.core.decide`, the lines and the lock from a store
(:mod:`escalate.stores.seam`), the hook from :mod:`escalate.escalation.notify`. Refusals raise
:class:`~escalate.errors.EscalateError` subclasses after the events that record them are
durable.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, BinaryIO, TypedDict, Unpack

from escalate import config
from escalate.config import Clock
from escalate.core import resolve
from escalate.core.decide import (
    Decision,
    decide_archive,
    decide_increase,
    decide_notified,
    decide_release,
    decide_reserve,
    run_opened_payload,
)
from escalate.core.events import Event, ResolvedMode, format_ts
from escalate.core.ids import check_id
from escalate.core.money import Amount, Micros, parse_micros
from escalate.core.replay import Progress, Replayed, read_events
from escalate.core.state import EscalationState, Policy, RunState
from escalate.errors import CorruptLedger, EscalateError, InputError, UnknownRun
from escalate.stores.seam import (
    Closing,
    LedgerStore,
    Store,
    StoreLocation,
    first_event,
    first_event_in,
    is_a_pool,
    open_store,
    pool_of,
)
from escalate.write import Decide, MembershipChanged, R, asked_by, first_lines, write

if TYPE_CHECKING:
    from escalate.core.payloads import Payload, RunOpened
    from escalate.core.pool_state import PoolView
    from escalate.escalation.delivery import SweepLimits
    from escalate.results import (  # (types only: the answers are the decisions' dicts)
        ArchiveResult,
        DeliveryResult,
        PolicyAnswer,
        PolicyResult,
        ResolutionResult,
        SweepAnswer,
        SweepResult,
        TaskResult,
    )
# A key file to sign a resolution with (a private key, or the .pub of a key in ssh-agent).
KeyFile = str | os.PathLike[str]


def _write_run(runs: Store, pool_id: str | None, store: LedgerStore, decide: Decide[R], *, actor: str,
              clock: Clock, lock_timeout: float, copied: bool = False) -> tuple[int, Decision[R]]:
    """A write to a run, under its pool's critical section first when it names one (the
    first line, read again under the run's lock, must agree: :class:`MembershipChanged`).
    ``copied``: the first line names another run (a copy of another member's folder)."""
    if pool_id is None:
        return write(store, decide, actor=actor, clock=clock)
    from escalate.pools.book import write_member  # (a run without a pool never loads it)

    return write_member(runs, pool_id, store, decide, actor=actor, clock=clock, lock_timeout=lock_timeout,
                        copied=copied)


class LedgerOptions(TypedDict, total=False):
    """:class:`Ledger`'s own options (what :meth:`Ledger.open` takes besides the run), as
    keywords passed on by the calls over many runs."""

    lock_timeout: float | None
    actor: str | None
    clock: Clock | None
    notify_cmd: str | None
    notify_timeout: float | None


if TYPE_CHECKING:  # (the settings' module is loaded by the commands that set them)
    from escalate.settings import RunPolicyOptions

    class InitOptions(RunPolicyOptions, LedgerOptions, total=False):
        """:meth:`Ledger.init`'s keywords besides the cap and the pool: the run's escalation
        settings, and :class:`Ledger`'s own options."""


class Ledger(Closing):
    """One run's budget ledger: the library API the CLI is a thin layer over.

    It keeps handles open between commands (the run's checkpoint; a store's connections
    when it opened the store from a URL): :meth:`close` releases them, and ``with
    Ledger.open(...) as run:`` closes it on the way out."""

    def __init__(
        self,
        location: StoreLocation,
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
        self.lock_timeout = timeout = config.lock_timeout(lock_timeout)
        self.actor = config.actor(actor)
        self.clock = clock or config.utc_now
        self.notify_cmd = config.notify_cmd(notify_cmd)
        self.notify_timeout = config.notify_timeout(notify_timeout)
        # The store holding every run (a runs folder), and this run in it.
        self.runs_store = open_store(location)
        # A store opened here (from a path or a URL) is this Ledger's to close; one given is the caller's.
        self._owns_store = self.runs_store is not location
        # Set by :meth:`init`: whether this call created the run, or found it with the same
        # settings (two pipelines that picked the same run id should be able to tell).
        self.created = False
        self.store: LedgerStore = self.runs_store.ledger(self.run_id, lock_timeout=timeout)
        self._pool: tuple[str | None] | None = None  # (the run's pool,), once read
        self._copied = False  # a member's first line names another run (a copied folder)

    def close(self) -> None:
        """Release what this Ledger holds open: its run's kept checkpoint connection, and the
        store's connections when it opened the store itself. A closed Ledger still works:
        its next command opens what it needs again."""
        self.store.close()
        if self._owns_store:
            self.runs_store.close()

    def pool_id(self) -> str | None:
        """The pool the run belongs to (None: none), read once from its first line;
        :class:`InputError` (exit 2) when the id is a pool's."""
        if self._pool is None:
            return self._pool_from(first_event(self.store))
        return self._pool[0]

    def _pool_from(self, first: Event | None) -> str | None:
        """:meth:`pool_id`, from the run's first event as read."""
        if first is None:
            return None  # no run yet (or a torn first write): read again next time
        if first.get("type") == "pool_opened":
            raise is_a_pool(self.run_id)
        self._pool = (pool_of(first),)
        self._copied = self._pool[0] is not None and first.get("run") != self.run_id
        return self._pool[0]

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
        location: StoreLocation,
        run_id: str,
        *,
        cap: Amount | None = None,
        task_cap: Amount | None = None,
        pool: str | None = None,
        **options: Unpack[InitOptions],
    ) -> Ledger:
        """Create a run (idempotent: the same settings again is fine; different ones conflict).

        ``options``: the run's escalation settings (:class:`escalate.settings.PolicySettings`'
        fields, its defaults for those left out) and :class:`Ledger`'s own options. Amounts
        are USD as ``str`` or ``Decimal``, or ``Micros``; ``escalation_timeout_s`` is
        whole seconds, 1 to 365 days, or ``None`` for never; ``approvers`` are the names that
        may resolve escalations (a list, or ``"a,b"``; empty: anyone but the requester);
        ``renotify_every_s`` (1 minute to 365 days, ``None``: never) is how often ``sweep``
        reminds of an open escalation; ``approvers_match="vouched"`` matches approvers on who
        the store vouches for; ``quorum`` distinct approvers grant an escalation needing a cap
        extension above ``quorum_above`` (USD; ``None``: any). ``pool``: the run joins that pool
        for good (``cap`` defaults to the pool's). ``approver_keys``: ``NAME=KEY`` strings (or
        names mapped to OpenSSH key lines) whose signatures every resolution then needs."""
        from escalate.pools import book as pool_book  # (a run without a pool never loads the pool modules)
        from escalate.pools import void
        from escalate.settings import PolicySettings, RunPolicyOptions, make_policy, run_caps

        settings, ledger_options = PolicySettings.split(options, RunPolicyOptions.__optional_keys__)
        run = cls(location, run_id, **ledger_options)
        with run.closed_on_error():  # (a run that fails to open is closed, not left to the collector)
            run.runs_store.check_usable()
            joining = None if pool is None else pool_book.read_pool(run.runs_store, pool, run.lock_timeout)
            if cap is None:
                if joining is None or joining.pool is None:
                    raise InputError("give the run's cap, e.g. --cap 10 (or --pool POOL to take the pool's)",
                                     code="invalid_amount")
                cap = Micros(joining.pool.cap_micros)
            run_cap, task_cap_micros = run_caps(cap, task_cap)
            policy = make_policy(settings)
            payload = run_opened_payload(run.run_id, run_cap, task_cap_micros, policy)
            if joining is not None:
                payload["pool"] = joining.run_id
                from escalate.core.policy import member_quorum_refused  # (a policy's rules: loaded when used)

                unreachable = member_quorum_refused((run_id, policy), (joining.run_id, joining.policy))
                if unreachable is not None:  # (before anything is written)
                    raise unreachable
            line, recovery = first_lines(payload, format_ts(run.runs_store.now(run.clock)), run.actor)
            if joining is None or void.void_if_taken(run, joining):
                # (An existing run is never joined: it is the same init again, or a conflict. A
                # torn first write is no run: the join comes first, then the create sets it aside.)
                run.created = run.store.create(line, recovery)
            else:
                run.created = void.join(run.runs_store, joining.run_id, run.store, actor=run.actor,
                                        clock=run.clock, lock_timeout=run.lock_timeout,
                                        create=lambda: run.store.create(line, recovery))
            if not run.created:
                run._check_same(run_cap, payload, policy)
        return run

    def _check_same(self, run_cap: int, payload: RunOpened, policy: Policy) -> None:
        """``init`` of an existing run: the same settings are fine (``created`` stays False,
        so a script can tell a reused run id); others conflict."""
        from escalate.settings import check_same_run

        existing = self.store.read().state
        if existing.pool is not None:
            raise is_a_pool(self.run_id)
        check_same_run(existing, self.pool_id(), run_cap, payload["task_cap_micros"], policy,
                       payload.get("pool"))

    @classmethod
    def open(cls, location: StoreLocation, run_id: str, *, lock_timeout: float | None = None,
             actor: str | None = None, clock: Clock | None = None, notify_cmd: str | None = None,
             notify_timeout: float | None = None) -> Ledger:
        """Open an existing run; :class:`UnknownRun` (exit 2) if there is none. ``location``
        is a runs folder, a store URL (:func:`escalate.stores.seam.open_store`) or a store;
        the keywords are those of :class:`Ledger`."""
        run = cls(location, run_id, lock_timeout=lock_timeout, actor=actor, clock=clock,
                  notify_cmd=notify_cmd, notify_timeout=notify_timeout)
        with run.closed_on_error():
            exists, first_line = run.store.head()  # (PostgreSQL: one round trip, the first line too)
            if not exists:
                raise UnknownRun(
                    f"no run {run_id} under {run.runs_store.where}; see 'escalate runs list' (or check "
                    f"--store or --runs-dir), or create it with 'escalate runs init {run_id} --cap USD'",
                    run=run_id)
            if first_line is None:
                run.pool_id()
            else:
                run._pool_from(first_event_in(first_line))
        return run

    # ------------------------------------------------------------------ commands

    def reserve(self, task: str, amount: Amount, *, reason: str = "", priority: str = "normal") -> TaskResult:
        """Reserve ``amount`` for ``task`` before spending it; ``reason`` and ``priority``
        (low, normal, high, urgent) are shown to an approver if it escalates."""
        task_id = check_id(task, what="task id")
        micros = parse_micros(amount, what="estimate")
        level = config.check_request(reason, priority)
        return {"run": self.run_id, **self._mutate(asked_by(self.store.role(),
            lambda state, now, _, pool: decide_reserve(state, task_id, micros, now, reason,
                                                                 level, pool)))}

    def increase(self, task: str, to: Amount, *, reason: str = "", priority: str = "normal") -> TaskResult:
        """Raise ``task``'s reservation to the absolute amount ``to``; ``reason`` is recorded,
        and with ``priority`` shown to an approver if it escalates."""
        task_id = check_id(task, what="task id")
        micros = parse_micros(to, what="new amount")
        level = config.check_request(reason, priority)
        return {"run": self.run_id, **self._mutate(asked_by(self.store.role(),
            lambda state, now, _, pool: decide_increase(state, task_id, micros, now, reason,
                                                                  level, pool)))}

    def release(self, task: str, actual: Amount) -> TaskResult:
        """Settle ``task`` with what it actually cost (may exceed the reservation); an open
        escalation of the task is withdrawn in the same write."""
        task_id = check_id(task, what="task id")
        micros = parse_micros(actual, what="actual")
        return {"run": self.run_id, **self._mutate(asked_by(self.store.role(),
            lambda state, now, _, pool: decide_release(state, task_id, micros, self.actor, pool)))}

    def archive(self) -> ArchiveResult:
        """Retire a finished run (``runs archive``: no holds, no open escalation; docs/pools.md)."""
        return {"run": self.run_id, **self._mutate(lambda state, now, _, pool: decide_archive(state))}

    def approve(self, escalation_id: str, *, by: str | None = None, sign: KeyFile | None = None,
                signature: str | None = None) -> ResolutionResult:
        """Grant an escalation: the extension and the task's reservation in one write.
        ``sign``: a private key file (or the .pub of a key in ssh-agent) to sign with, as a
        policy that pins approvers' keys requires; ``signature``: one made elsewhere
        (:meth:`signing_content` says what it covers)."""
        return self._resolve(escalation_id, "extend", by, sign, signature)

    def pause(self, escalation_id: str, *, by: str | None = None, sign: KeyFile | None = None,
              signature: str | None = None) -> ResolutionResult:
        """Park the task; it may ask again later (``sign``, ``signature``: as :meth:`approve`)."""
        return self._resolve(escalation_id, "pause", by, sign, signature)

    def cancel(self, escalation_id: str, *, by: str | None = None, sign: KeyFile | None = None,
               signature: str | None = None) -> ResolutionResult:
        """End the task for good (``halt`` with reason ``cancelled``; ``sign``, ``signature``:
        as :meth:`approve`)."""
        return self._resolve(escalation_id, "cancel", by, sign, signature)

    def signing_content(self, escalation_id: str, mode: str, by: str | None = None) -> bytes:
        """The bytes a signature of resolving ``escalation_id`` as ``mode`` (``extend``,
        ``pause`` or ``cancel``) by ``by`` (default: the ledger's actor) covers:
        :func:`escalate.core.sshsig.canonical_content`, which names the approver and, for an
        approval, the extension it grants now (:func:`escalate.core.resolve.grant_of`,
        from what a write sees now: asked as one, which appends only what any write does,
        an expiry that is due; if the grant moves before the approval is written, the
        approval is refused: sign again)."""
        from escalate.core import sshsig

        check_id(escalation_id, what="escalation id")
        state = self.state()
        escalation = state.escalations.get(escalation_id)
        if escalation is None:
            raise InputError(f"no escalation {escalation_id} in run {self.run_id}; list them with "
                             f"'escalate escalations --run {self.run_id}'", code="unknown_escalation",
                             escalation_id=escalation_id)
        grant = self._mutate(lambda current, _, __, pool: Decision(result=resolve.grant_of(
            current, current.escalations[escalation_id],
            None if pool is None else pool.remaining(pool.current)))) if mode == "extend" else None
        return sshsig.canonical_content(self.run_id, escalation_id, mode, escalation.requested_micros,
                                        escalation.line_hash, config.check_actor(by or self.actor), grant)

    def withdraw(self, escalation_id: str, *, by: str | None = None) -> ResolutionResult:
        """Take back an open escalation (its requester only); the task keeps what it holds."""
        return self._resolve(escalation_id, "withdraw", by)

    def set_policy(self, *, sign: KeyFile | None = None, signature: str | None = None,
                   **changes: Unpack[RunPolicyOptions]) -> PolicyResult:
        """Change the escalation policy; settings left out keep their current value
        (``approval_threshold=None`` removes the threshold, ``escalation_timeout_s=None``
        makes escalations never time out, ``approvers=()`` lets anyone approve,
        ``renotify_every_s=None`` stops reminders; ``approver_keys`` replaces the pinned keys).
        While keys are pinned the change must be signed: ``sign`` and ``signature`` as for
        :meth:`approve` (:meth:`policy_signing_content` says what it covers)."""
        from escalate.core.policy import decide_policy  # (a policy's rules: loaded when used)
        from escalate.settings import PolicySettings, RunPolicyOptions, merge_policy

        # An unknown setting is a TypeError before anything is opened for writing.
        PolicySettings().changed(changes, RunPolicyOptions.__optional_keys__)
        if sign is not None and signature is None:
            from escalate.escalation.signing import sign_change

            signature = sign_change(self.policy_signing_content(**changes), sign)

        def decide(state: RunState, now: str, expired: list[str],
                   pool: PoolView | None) -> Decision[PolicyAnswer]:
            policy = merge_policy(state.policy, changes)
            return decide_policy(state, policy, self.actor, role, pool,
                                         self.store.approvers_are_roles, signature)
        role = self.store.role()
        return {"run": self.run_id, **self._mutate(decide)}

    def policy_signing_content(self, **changes: Unpack[RunPolicyOptions]) -> bytes | None:
        """The bytes a signature of this policy change covers now
        (:func:`escalate.core.sshsig.policy_content`); None while no keys are pinned (the
        first pinning is not signed). Another change written first makes it stale."""
        from escalate.settings import merge_policy

        state = self.state()
        if not state.policy.approver_keys:
            return None
        policy = merge_policy(state.policy, changes)
        from escalate.core.policy import policy_change, policy_signing_content

        return policy_signing_content(state, policy_change(state, policy))

    def sweep(self, *, redeliver: bool = True, limits: SweepLimits | None = None) -> SweepResult:
        """Resolve expired escalations (``expired``), then send again each notice due within
        ``limits`` (:func:`escalate.escalation.delivery.deliver_all`; None: its
        ``SWEEP_LIMITS``; ``notified``; ``deferred``: left)."""
        from escalate.escalation.delivery import SWEEP_LIMITS, deliver_all

        result, due = self.expire(redeliver=redeliver)
        sent, left = deliver_all(due, self.send_notice, SWEEP_LIMITS if limits is None else limits)
        result["notified"], result["deferred"] = [outcome for _, outcome in sent], [n["id"] for n in left]
        return result

    def expire(self, *, redeliver: bool = True) -> tuple[SweepResult, list[dict[str, Any]]]:
        """:meth:`sweep`'s write: the expiries, and the notices due again (unsent)."""
        from escalate.escalation.delivery import delivery_due, notice_again

        due: list[tuple[EscalationState, bool]] = []

        def decide(state: RunState, now: str, expired: list[str],
                   pool: PoolView | None) -> Decision[SweepAnswer]:
            # Every write expires what is due before it decides; a sweep is a write that only
            # that, and it notes (under the lock) which notices are due again, and whether the
            # policy that decides each pins approvers' keys (its answers are signed).
            due.clear()
            if redeliver and self.notify_cmd:
                due.extend((e, bool((pool.policy if pool is not None and e.reason == "pool_cap"
                                     else state.policy).approver_keys))
                           for e in state.open_escalations.values()
                           if delivery_due(e, state.policy, now))
            return Decision(result={"status": "swept", "expired": expired})

        result: SweepResult = {"run": self.run_id, **self._mutate(decide), "notified": [], "deferred": []}
        return result, [notice_again(self.run_id, escalation, signed=signed) for escalation, signed in due]

    def wait(self, escalation_id: str, *, timeout_s: float | None = None) -> ResolutionResult:
        """Block until the escalation is resolved, without holding the lock.

        Returns on approval; raises :class:`Refused` on cancel and :class:`Pending` on
        pause (a timeout's too) or when ``timeout_s`` passes first.
        """
        from escalate.escalation.waiting import wait_for

        return wait_for(self, escalation_id, timeout_s)

    # ------------------------------------------------------------------ reading

    def state(self) -> RunState:
        """The run's state now, read without the lock; :class:`CorruptLedger` if unreadable."""
        replayed = self.store.read()
        if replayed.problem is not None:
            raise replayed.problem
        return replayed.state

    def verified_state(self) -> RunState:
        """The run's state from a strict fold of the whole log with every check, never from
        the checkpoint; :class:`CorruptLedger` on the first problem ``runs verify`` would report.
        For verdicts such as a CI gate: the checkpoint's key cannot see an edit in place before
        its checkpoint when lines were appended after it (see :mod:`escalate.stores.file.checkpoint`)."""
        replayed = self.store.read(checkpoint=False)
        if replayed.problem is not None:
            raise replayed.problem
        # Fields the fold does not use are judged too, as runs verify judges them: a verdict
        # never passes a log that verify fails (pydantic, loaded only here).
        from escalate.core.schema import line_problems

        with self.read_log() as stream:
            for line, problem in line_problems(stream):
                raise CorruptLedger(
                    f"{self.store.where} line {line}: {problem}; inspect with "
                    f"'escalate runs verify {self.run_id}'", run=self.run_id, line=line,
                    problem=problem, first_suspect_line=line)
        if replayed.state.member_of is not None:  # its pool decides some of its approvals
            from escalate.pools.signatures import member_problems

            for line, problem, forged in member_problems(self.runs_store, self.store)[:1]:
                raise CorruptLedger(
                    f"{self.store.where} line {line}: {problem}; inspect with "
                    f"'escalate runs verify {self.run_id}'", code="forged_signature" if forged else None,
                    run=self.run_id, line=line, problem=problem, first_suspect_line=line)
        return replayed.state

    def replayed(self) -> Replayed:
        """The state as a reader sees it, with what the reader should be warned about (a
        torn tail, corruption: the totals then stop before the first doubtful line)."""
        return self.store.read()

    def verify(self) -> Replayed:
        """Fold every line, noting each problem with its line (``runs verify``); for a pool's
        member, its pool's decisions too, against the pool's policy (a ``pool_cap``
        escalation's approvals are the pool's to check: its own fold cannot see that policy)."""
        replayed = self.store.verify()
        if replayed.state.member_of is not None:
            from escalate.pools.signatures import member_problems

            found = {line for line, _ in replayed.problems}
            more = [each for each in member_problems(self.runs_store, self.store) if each.line not in found]
            replayed.problems = sorted([*replayed.problems, *((each.line, each.problem) for each in more)])
            replayed.forged += [each.line for each in more if each.forged]
        return replayed

    def log_size(self) -> int:
        """The bytes in the log so far: it grows with every write (``runs watch`` polls it)."""
        return self.store.size()

    def wait_for_change(self, seen_size: int, timeout_s: float, *, poll_s: float = 0.05) -> bool:
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

    def _resolve(self, escalation_id: str, mode: ResolvedMode, by: str | None, sign: KeyFile | None = None,
                 signature: str | None = None) -> ResolutionResult:
        check_id(escalation_id, what="escalation id")
        resolver = config.check_actor(by or self.actor)
        role = self.store.role()  # who the store vouches acts: the OS user, or the database role
        roles = self.store.approvers_are_roles
        if sign is not None and signature is None:
            from escalate.escalation import signing

            # Signed before the lock is taken (a passphrase or the agent may ask a person):
            # what it covers is fixed once the escalation's line is written.
            signature = signing.sign(self.signing_content(escalation_id, mode, resolver), sign)
        return {"run": self.run_id, **self._mutate(
            lambda state, now, _, pool: resolve.decide_resolution(state, escalation_id, mode, resolver,
                                                                  pool, role, signature, roles))}

    def _mutate(self, decide: Decide[R]) -> R:
        """One write of ``decide``'s decision, through the run's pool when it has one; its
        answer once durable (the command adds the run), or its error raised."""
        # One command: the answer's sync goes through the run folder the write resolved.
        with self.store.command():
            pool_id = self.pool_id()
            if self._pool is None:
                # No run when its first line was read: never a write without its pool's lock.
                # The store's fold says why (unknown, or a torn first write); a run created
                # meanwhile has its first line now.
                self.store.read()
                pool_id = self.pool_id()
                if self._pool is None:
                    raise UnknownRun(f"no run {self.run_id} under {self.runs_store.where}; see "
                                     "'escalate runs list'", run=self.run_id)
            try:
                first_seq, decision = _write_run(self.runs_store, pool_id, self.store, decide,
                                                actor=self.actor, clock=self.clock,
                                                lock_timeout=self.lock_timeout, copied=self._copied)
            except MembershipChanged as changed:  # this Ledger read the run before it was made again
                self._pool = (changed.pool,)
                first_seq, decision = _write_run(self.runs_store, changed.pool, self.store, decide,
                                                actor=self.actor, clock=self.clock,
                                                lock_timeout=self.lock_timeout)
            return self._answer(first_seq, decision)

    def _answer(self, first_seq: int, decision: Decision[R]) -> R:
        """Report a decision once everything it rests on is durable."""
        # Durable before anything is reported: this sync covers our lines and every line
        # before them (an answer like "exists" may rest on another process's write).
        self.store.sync()
        self._notify(first_seq, decision.events)
        if decision.error is not None:
            decision.error.facts.setdefault("run", self.run_id)
        return decision.answer()

    def _notify(self, first_seq: int, events: list[Payload]) -> None:
        """Run the notify hook for each escalation a person must answer, and record it."""
        if not self.notify_cmd:
            return
        from escalate.escalation.delivery import new_notices  # (only where a hook is set)

        for notice in new_notices(self.run_id, first_seq, self.actor, events, self._answers_signed):
            self.send_notice(notice)

    def _answers_signed(self, reason: str) -> bool:
        """Whether the policy deciding an escalation that fired for ``reason`` (the pool's for
        ``pool_cap``) pins approvers' keys, so that its notice's commands take ``--sign``. Read
        after the write, only for a notice; unreadable, the commands go without it."""
        try:
            pool_id = self.pool_id() if reason == "pool_cap" else None
            if pool_id is None:
                return bool(self.state().policy.approver_keys)
            from escalate.pools import book as pool_book

            return bool(pool_book.read_pool(self.runs_store, pool_id, self.lock_timeout).policy.approver_keys)
        except EscalateError:
            return False

    def send_notice(self, notice: dict[str, Any]) -> DeliveryResult:
        """Send ``notice`` with the hook; the attempt is recorded in a write of its own."""
        from escalate.escalation.delivery import deliver

        escalation_id = notice["id"]
        return deliver(self.notify_cmd or "", self.notify_timeout, notice, lambda ok, detail: self._mutate(
            lambda state, now, _, pool: decide_notified(state, escalation_id, ok, detail)))


# ---------------------------------------------------------------------- many runs
