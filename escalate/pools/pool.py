"""Pools as library calls: one budget shared by many runs, optionally per day, week or
month (``docs/pools.md``).

:class:`Pool` is what ``escalate pools …`` calls: create a pool, read its totals for a
period, change its cap and policy. A run joins a pool when it is created
(``Ledger.init(..., pool=...)``) and never leaves; every write to a member run checks the
pool (:mod:`escalate.pools.book`). What :meth:`Pool.show` reports is folded from the member
runs' logs, never from the writers' books.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from escalate import config
from escalate.config import Clock
from escalate.core.events import format_ts
from escalate.core.ids import check_id
from escalate.core.money import Amount, parse_micros
from escalate.core.money import format_usd as usd
from escalate.core.periods import bounds, check_new_zone, check_period, key_of_date, period_key, period_name
from escalate.core.policy import policy_change, policy_signing_content
from escalate.core.pool_state import PeriodTotals, PoolFacts, PoolView, check_total_limit
from escalate.core.state import RunState
from escalate.errors import Conflict, CorruptLedger, EscalateError, InputError
from escalate.pools import book as pool_book
from escalate.pools.member import Member, fold_member, member_first
from escalate.settings import (
    UNCHANGED,
    PolicyOptions,
    PolicySettings,
    Unchanged,
    make_policy,
    merge_policy,
    run_caps,
)
from escalate.stores.seam import (
    Closing,
    LedgerStore,
    StoreLocation,
    first_event,
    open_store,
    owned_store,
)
from escalate.write import first_lines

if TYPE_CHECKING:
    from escalate.core.decide import Decision
    from escalate.core.payloads import EscalationPolicy, PoolOpened
    from escalate.pools.verify import LineProblem, LineWarning, LogHead, VerifyReport
    from escalate.results import PoolPolicyAnswer, PoolPolicyResult
    from escalate.service import Ledger


class PoolRun(TypedDict):
    run: str
    committed_micros: int


class UnreadableMember(TypedDict):
    run: str
    error: str  # member_unreadable
    message: str  # what is wrong, and how to bring it back
    line: int  # the line of its log that is damaged (1 when there is no log)
    problem: str


class PoolReport(TypedDict):
    """``pools show --json``: the pool's money in one period."""

    pool: str
    period: str  # the period's key: 2026-11-30, 2026-W48, 2026-11, or all
    period_kind: str  # none, day, week or month
    tz: str
    current: bool  # whether it is the period now
    period_start: str | None
    period_end: str | None  # when the next period starts
    cap_micros: int  # the pool's cap in the period, its extensions included
    pool_cap_micros: int
    extended_micros: int
    spent_micros: int
    reserved_micros: int
    committed_micros: int
    remaining_micros: int
    escalation: EscalationPolicy
    runs: list[PoolRun]
    # Members whose logs cannot be read: the totals above leave them out (a warning; money
    # writes in the pool and gate --pool refuse until they are back).
    unreadable: list[UnreadableMember]


class PoolInitOptions(PolicyOptions, total=False):
    """:meth:`Pool.init`'s keywords besides the cap and the period: the pool's escalation
    settings, and :class:`Pool`'s own options."""

    lock_timeout: float | None
    actor: str | None
    clock: Clock | None


class Pool(Closing):
    """One pool in a store (a runs folder)."""

    def __init__(self, location: StoreLocation, pool_id: str, *,
                 lock_timeout: float | None = None, actor: str | None = None,
                 clock: Clock | None = None) -> None:
        self.pool_id = check_id(pool_id, what="pool id")
        self.lock_timeout = config.lock_timeout(lock_timeout)
        self.actor = config.actor(actor)
        self.clock = clock or config.utc_now
        self.runs_store = open_store(location)
        # A store opened here (from a path or a URL) is this Pool's to close; one given is the caller's.
        self._owns_store = self.runs_store is not location
        self.store: LedgerStore = self.runs_store.ledger(self.pool_id, lock_timeout=self.lock_timeout)
        self.created = False

    def close(self) -> None:
        """Release what this Pool holds open (the store's connections when it opened the
        store itself); ``with Pool.open(...) as pool:`` closes it on the way out."""
        self.store.close()
        if self._owns_store:
            self.runs_store.close()

    @classmethod
    def init(
        cls,
        location: StoreLocation,
        pool_id: str,
        *,
        cap: Amount,
        period: str = "none",
        tz: str = "UTC",
        **options: Unpack[PoolInitOptions],
    ) -> Pool:
        """Create a pool (the same settings again is fine; different ones conflict).
        ``period``: none, day, week or month, in the IANA zone ``tz``; ``options``: the
        escalation settings (:class:`escalate.settings.PolicyOptions`) and :class:`Pool`'s own
        options; ``max_extension`` is what approvals of ``pool_cap`` escalations may add per
        period."""
        settings, pool_options = PolicySettings.split(options, PolicyOptions.__optional_keys__)
        pool = cls(location, pool_id, **pool_options)
        with pool.closed_on_error():  # (a pool that fails to open is closed, not left to the collector)
            pool.runs_store.check_usable()
            cap_micros, _ = run_caps(cap, None)
            kind = check_period(period)
            check_new_zone(tz)
            policy = make_policy(settings)
            payload: PoolOpened = {"type": "pool_opened", "pool": pool.pool_id, "cap_micros": cap_micros,
                                   "period": kind, "tz": tz, "escalation": policy.to_json()}
            line, recovery = first_lines(payload, format_ts(pool.runs_store.now(pool.clock)), pool.actor)
            if pool.store.create(line, recovery):
                pool.created = True
                return pool
            existing = pool.state()
            facts = existing.pool
            assert facts is not None  # state() refuses a run
            if (facts.cap_micros, facts.period, facts.tz, existing.policy) != (cap_micros, kind, tz, policy):
                raise Conflict(f"pool {pool.pool_id} already exists with other settings (cap "
                               f"{usd(facts.cap_micros)}, period {facts.period}, tz {facts.tz}); pick a new "
                               f"pool id, or change its cap or policy with 'escalate pools set'",
                               pool=pool.pool_id, cap_micros=facts.cap_micros, period=facts.period,
                               tz=facts.tz)
            return pool

    @classmethod
    def open(cls, location: StoreLocation, pool_id: str, *, lock_timeout: float | None = None,
             actor: str | None = None, clock: Clock | None = None) -> Pool:
        """Open an existing pool; :class:`InputError` (exit 2) if there is none, or the id
        is a run's."""
        pool = cls(location, pool_id, lock_timeout=lock_timeout, actor=actor, clock=clock)
        with pool.closed_on_error():
            pool.state()
        return pool

    def state(self) -> RunState:
        """The pool's log folded: its settings (``state.pool``) and escalation policy."""
        return pool_book.read_pool(self.runs_store, self.pool_id, self.lock_timeout)

    @property
    def facts(self) -> PoolFacts:
        facts = self.state().pool
        assert facts is not None  # state() refuses a run
        return facts

    def members(self) -> tuple[dict[str, Member], list[UnreadableMember]]:
        """Each member run's money by period, folded from its log (no lock, no checkpoint), and
        the members whose logs cannot be read (moved away, damaged: nothing of theirs is
        counted, so their pool's writers and ``gate --pool`` refuse)."""
        facts = self.facts

        def key_at(ts: str) -> str:
            return period_key(facts.period, facts.tz, ts)

        members: dict[str, Member] = {}
        unreadable: list[UnreadableMember] = []
        for run_id in facts.members:
            try:
                members[run_id] = fold_member(self.runs_store.ledger(run_id, lock_timeout=self.lock_timeout),
                                              self.pool_id, key_at, self.runs_store,
                                              opened=facts.opened.get(run_id), at=facts.at.get(run_id))
            except CorruptLedger as error:
                unreadable.append({"run": run_id, "error": error.code, "message": error.message,
                                   "line": error.line, "problem": error.problem})
        return members, unreadable

    def show(self, period: str | None = None) -> PoolReport:
        """The pool's money in the period now, or in the earlier one holding ``period`` (a
        date such as ``2026-11-30``, or the pool's key form such as ``2026-W48``); a period
        not yet begun is :class:`InputError` (``invalid_period``)."""
        state = self.state()
        facts = state.pool
        assert facts is not None
        current = period_key(facts.period, facts.tz, format_ts(self.runs_store.now(self.clock)))
        key = current if period is None else key_of_date(facts.period, period)
        if key > current:  # keys sort as text; a period to come holds nothing yet
            raise InputError(f"invalid period {period!r}: the {facts.period} {key} has not begun (the "
                             f"current one is {current}); give a date up to today", code="invalid_period",
                             value=period, current=current)
        members, unreadable = self.members()
        totals = PeriodTotals()
        for member in members.values():
            totals.add(member.periods.get(key) or PeriodTotals())
        check_total_limit(self.pool_id, key, totals)
        start, end = bounds(facts.period, facts.tz, key)
        view = PoolView(pool_id=self.pool_id, cap_micros=facts.cap_micros, policy=state.policy,
                        period=facts.period, current=key, totals={key: totals})
        cap = view.cap_in(key)
        return {
            "pool": self.pool_id, "period": key, "period_kind": facts.period, "tz": facts.tz,
            "current": key == current, "period_start": start, "period_end": end,
            "cap_micros": cap, "pool_cap_micros": facts.cap_micros,
            "extended_micros": totals.extended_micros, "spent_micros": totals.spent_micros,
            "reserved_micros": totals.reserved_micros, "committed_micros": totals.committed_micros,
            "remaining_micros": view.remaining(key), "escalation": state.policy.to_json(),
            "runs": [{"run": run_id,
                      "committed_micros": (member.periods.get(key) or PeriodTotals()).committed_micros}
                     for run_id, member in members.items()],
            "unreadable": unreadable,
        }

    def set_policy(self, *, cap: Amount | Unchanged = UNCHANGED, sign: str | os.PathLike[str] | None = None,
                   signature: str | None = None, **changes: Unpack[PolicyOptions]) -> PoolPolicyResult:
        """Change the pool's cap or escalation policy (recorded as ``policy_changed``);
        settings left out keep their value. A cap below what is committed is allowed: new
        reservations are refused until there is room again. While the pool pins keys the
        change must be signed: ``sign`` (a key file) or ``signature``, as for a run's
        (:meth:`policy_signing_content`)."""
        from escalate.pools.decide import decide_pool_policy, deciders

        names = PolicyOptions.__optional_keys__
        # Checked before the lock too: a bad value is refused with nothing opened for writing.
        merge_policy(self.state().policy, changes, names)
        cap_micros = None if cap is UNCHANGED else _pool_cap(cap)
        if sign is not None and signature is None:
            from escalate.escalation.signing import sign_change

            signature = sign_change(self.policy_signing_content(cap=cap, **changes), sign)

        def decide(state: RunState, now: str, expired: list[str], pool: Any) -> Decision[PoolPolicyAnswer]:
            policy = merge_policy(state.policy, changes, names)
            lowered = policy.max_extension_micros < state.policy.max_extension_micros
            counted = (policy.approvers, policy.quorum) != (state.policy.approvers, state.policy.quorum)
            members = self._members(state) if counted or deciders(policy) != deciders(state.policy) else {}
            return decide_pool_policy(state, policy, cap_micros, self.actor, role,
                                      self._granted(now) if lowered else None, self.store.approvers_are_roles,
                                      signature, {run: member.policy for run, member in members.items()}
                                      if counted else None, members)

        role = self.store.role()  # who the store vouches acts: the OS user, or the database role

        with self.store.command():
            _, decision = pool_book.write_pool(self.runs_store, self.store, decide, actor=self.actor,
                                               clock=self.clock, lock_timeout=self.lock_timeout)
            self.store.sync()
        return {"pool": self.pool_id, **decision.answer()}


    def policy_signing_content(self, *, cap: Amount | Unchanged = UNCHANGED,
                               **changes: Unpack[PolicyOptions]) -> bytes | None:
        """The bytes a signature of this change covers now (as
        :meth:`escalate.service.Ledger.policy_signing_content`); None while no keys are pinned."""
        state = self.state()
        if not state.policy.approver_keys:
            return None
        policy = merge_policy(state.policy, changes, PolicyOptions.__optional_keys__)
        change = policy_change(state, policy, None if cap is UNCHANGED else _pool_cap(cap))
        return policy_signing_content(state, change)

    def _members(self, state: RunState) -> dict[str, RunState]:
        """Each member run's state: its policy, its last line (asked under the pool's lock,
        which a member's policy change takes first, and every member's write; a member that
        cannot be read takes no writes and is left out)."""
        members = {}
        for run_id in state.pool.members if state.pool is not None else ():
            try:
                member = self.runs_store.ledger(run_id, lock_timeout=self.lock_timeout)
                members[run_id] = member.read().state
            except EscalateError:
                continue
        return members

    def _granted(self, now: str) -> tuple[int, str]:
        """What approvals extended the pool by in the period ``now`` falls in, folded from
        its members' logs (asked under the pool's lock, so no grant slips in before the
        change; a member that cannot be read counts nothing), and `` in the day …``."""
        facts = self.facts
        key = period_key(facts.period, facts.tz, now)
        members, _ = self.members()
        granted = sum((member.periods.get(key) or PeriodTotals()).extended_micros
                      for member in members.values())
        return granted, "" if facts.period == "none" else f" in {period_name(facts.period, key)}"


def _pool_cap(cap: Amount) -> int:
    micros = parse_micros(cap, what="cap")
    if micros == 0:
        raise InputError("invalid cap: a pool's cap must be more than 0; give --cap, e.g. --cap 200",
                         code="invalid_amount")
    return micros


class RunPool(TypedDict):
    """The pool of a run, as ``runs show --json`` reports it (all None: no pool)."""

    pool: str | None
    pool_remaining_micros: int | None  # what is left of the pool in the current period
    pool_escalation: EscalationPolicy | None  # the pool's policy: it binds the run besides its own


def pool_of_run(ledger: Ledger) -> RunPool:
    """The pool ``ledger``'s run belongs to, what is left of it now (a run's own ``remaining``
    says nothing of the money its pool has left) and the pool's policy, which binds the run
    whatever its own says."""
    pool_id = ledger.pool_id()
    if pool_id is None:
        return {"pool": None, "pool_remaining_micros": None, "pool_escalation": None}
    pool = Pool.open(ledger.runs_store, pool_id, lock_timeout=ledger.lock_timeout, clock=ledger.clock)
    shown = pool.show()
    return {"pool": pool_id, "pool_remaining_micros": shown["remaining_micros"],
            "pool_escalation": shown["escalation"]}


class PoolRow(TypedDict):
    pool: str
    cap_micros: int
    period: str
    tz: str
    runs: int


def list_pools(location: StoreLocation) -> list[PoolRow]:
    """Every pool in the store, by id, with its settings and how many runs it has."""
    rows: list[PoolRow] = []
    with owned_store(location) as store:
        for ledger_id, kind in pool_book.ledger_kinds(store):
            if kind == "pool_opened":
                facts = Pool.open(store, ledger_id).facts
                rows.append({"pool": ledger_id, "cap_micros": facts.cap_micros, "period": facts.period,
                             "tz": facts.tz, "runs": len(facts.members)})
    return rows


class PoolVerifyReport(TypedDict):
    """What ``pools verify --json`` prints: the pool's own log checked as ``runs verify``
    checks a run's, and every member's; ``ok`` when none of them has a problem."""

    pool: str
    ok: bool
    lines: int | None
    events: int
    torn_bytes: int | None
    head: LogHead | None
    problems: list[LineProblem]
    warnings: list[LineWarning]
    members: list[VerifyReport]  # each member's log, as runs verify reports it


def verify_pool(location: StoreLocation, pool_id: str, *,
                lock_timeout: float | None = None) -> PoolVerifyReport:
    """Check every line of the pool's log (the chain and the pool's rules) and of each member
    named in it (a member with no log, or whose id another ledger holds, is a problem too).
    Problems are reported, not raised;
    :class:`InputError` when there is no such pool, or it is a run."""
    from escalate.pools.verify import verify_ledger

    with owned_store(location) as runs:
        timeout = config.lock_timeout(lock_timeout)
        store = runs.ledger(check_id(pool_id, what="pool id"), lock_timeout=timeout)
        first = first_event(store)
        if first is None or first.get("type") != "pool_opened":
            pool_book.read_pool(runs, pool_id, timeout)  # says why: no such pool, or a run
        own = verify_ledger(store)
        members: list[VerifyReport] = []
        # The members the pool's log names, as far as it folds (a damaged line is passed over).
        facts = store.verify().state.pool if own["lines"] is not None else None
        opened = facts.opened if facts is not None else {}
        for run_id in facts.members if facts is not None else []:
            member = runs.ledger(run_id, lock_timeout=timeout)
            try:
                member_first(member, pool_id, opened.get(run_id))
            except CorruptLedger as problem:
                members.append({"run": run_id, "ok": False, "lines": None, "events": 0, "torn_bytes": None,
                                "head": None, "problems": [{"line": 1, "problem": problem.message}],
                                "warnings": []})
            else:
                members.append(verify_ledger(member, runs))
        return {"pool": pool_id, "ok": own["ok"] and all(member["ok"] for member in members),
                "lines": own["lines"], "events": own["events"], "torn_bytes": own["torn_bytes"],
                "head": own["head"], "problems": own["problems"], "warnings": own["warnings"],
                "members": members}

