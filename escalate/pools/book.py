"""A pool's books: its money per period, derived from its member runs, kept beside the pool's
log for the writers, and checked on every write to a member run.

Every write to a member run holds the pool's critical section, then the run's (always that
order). Under the pool's, the writer opens the :class:`PoolBook`: the pool's settings and
its totals per period, kept in the store's derived values (``Transaction.derived``) so a
write reads a few small values instead of folding every member. The book is disposable
and never trusted blindly:

- it names the format, the machine's boot and the pool log's size it was built at; any
  difference (a pool write it missed, a machine crash that lost unsynced values) means a
  rebuild from the logs of every member;
- it names the pool log's stamp (:meth:`LedgerStore.stamp`) and last line's hash: a log of
  the same size with another stamp is read whole before the book is trusted (an edit in
  place: a broken chain is refused, another last line is a rebuild);
- a member whose log cannot be read (gone, damaged) is refused, never counted as nothing
  (:func:`escalate.pools.member.member_unreadable`);
- before a writer appends to a member run it records the run as its *intent*; after the
  append it folds the new lines into the book and clears the intent, in one save. A writer
  killed in between leaves the intent: the next writer refolds that run from its log;
- each member's entry names the byte offset of its log it was folded to; the writer of a
  run whose entry is behind refolds that run first.

So a stale book never lets a reservation past the pool's cap (``tests/test_pools_faults.py``).
Money stays in the run logs; it counts in the period it is added in (:mod:`escalate.pools.member`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import orjson

from escalate.config import Clock
from escalate.core.decide import Decision
from escalate.core.ids import check_id
from escalate.core.periods import period_key
from escalate.core.pool_state import PeriodTotals, PoolFacts, PoolView, check_total_limit
from escalate.core.replay import Replayed
from escalate.core.state import Policy, RunState
from escalate.errors import CorruptLedger, EscalateError, InputError, UnknownRun
from escalate.pools.member import Member, facts_of, fold_member, member_unreadable, own_first_line
from escalate.stores.seam import LedgerStore, Store, Transaction, first_event
from escalate.write import Decide, R, write

if TYPE_CHECKING:
    from escalate.core.payloads import Payload
    from escalate.results import PoolLogAnswer

# 5: a task holds money from each period it was added in; the pool log's stamp and last
# line's hash (an edit in place at the same size). 6: each member's last line's hash (an
# edit in place of a member's log at the same size). Books of an earlier format are rebuilt.
FORMAT = 6
# Each value of the books is saved behind a digest of its key and bytes: a value damaged, or
# edited by hand (a cap raised in the SQLite file), no longer matches, and the books are
# rebuilt from the logs. (It catches damage, not a forger who recomputes it: see
# docs/reliability.md — the gate folds the logs themselves.)
_DIGEST = 16


def _seal(key: str, value: bytes) -> bytes:
    return hashlib.blake2b(key.encode() + b"\0" + value, digest_size=_DIGEST).digest() + value


def unsealed(found: dict[str, bytes] | None) -> dict[str, bytes] | None:
    """The values of ``found`` without their digests; None (read as "cannot be read": the
    books are rebuilt) when any of them does not match."""
    if found is None:
        return None
    values = {}
    for key, sealed in found.items():
        value = sealed[_DIGEST:]
        if len(sealed) < _DIGEST or _seal(key, value) != sealed:
            return None
        values[key] = value
    return values


def ledger_kinds(store: Store) -> Iterator[tuple[str, str | None]]:
    """Each ledger's id in ``store`` with the type of its first line (``run_opened``,
    ``pool_opened``; None when it cannot be read: a run that lists as broken), sorted."""
    for ledger_id in store.run_ids():
        try:
            first = first_event(store.ledger(ledger_id, lock_timeout=0))
        except (OSError, EscalateError):
            first = None
        yield ledger_id, None if first is None else first.get("type")


def read_pool(runs: Store, pool_id: str, lock_timeout: float) -> RunState:
    """The pool ``pool_id``'s log folded (settings and members, read without the lock);
    :class:`InputError` (exit 2) when there is no such pool, or it is a run."""
    check_id(pool_id, what="pool id")
    store = runs.ledger(pool_id, lock_timeout=lock_timeout)
    if not store.exists():
        raise InputError(f"no pool {pool_id} under {runs.where}; see 'escalate pools list', or create "
                         f"it with 'escalate pools init {pool_id} --cap USD'", code="unknown_pool",
                         pool=pool_id)
    replayed = store.read(checkpoint=False)
    if replayed.problem is not None:
        raise replayed.problem
    facts_of(replayed.state)
    return replayed.state


class PoolBook:
    """A pool's settings and totals per period, opened by a writer holding the pool's
    critical section (:func:`open_book`)."""

    def __init__(self, transaction: Transaction, runs: Store, pool_id: str, meta: dict[str, Any],
                 lock_timeout: float) -> None:
        self.transaction = transaction
        self.runs = runs
        self.pool_id = pool_id
        self.meta = meta
        self.lock_timeout = lock_timeout
        self.members: dict[str, Member] = {}
        self.periods: dict[str, PeriodTotals] = {}  # the totals read or changed so far
        # Complete: every member and period is in memory (after a rebuild); what is missing
        # is then zero. Otherwise what is missing is read from the store.
        self.complete = False
        self.policy = Policy(**meta["policy"])
        self.intent: bytes | None = None  # the member a killed writer was appending to
        self._facts: PoolFacts | None = None  # the pool's log folded, once a member is (re)read

    def key_at(self, ts: str) -> str:
        """The key of the period the moment ``ts`` falls in."""
        return period_key(self.meta["period"], self.meta["tz"], ts)

    def has_entry(self, run_id: str) -> bool:
        """Whether the book counts ``run_id`` (every member joined has an entry)."""
        if run_id not in self.members and not self.complete:
            data = self._read([f"member:{run_id}"]).get(f"member:{run_id}")
            if data is not None:
                self.members[run_id] = Member.from_bytes(data)
        return run_id in self.members

    def member(self, run_id: str) -> Member:
        if run_id not in self.members:
            found = self._read([f"member:{run_id}"])
            data = found.get(f"member:{run_id}")
            self.members[run_id] = Member() if data is None else Member.from_bytes(data)
        return self.members[run_id]

    def totals(self, keys: Iterable[str]) -> dict[str, PeriodTotals]:
        missing = sorted(set(keys) - set(self.periods))
        if missing:
            found = self._read([f"period:{key}" for key in missing])
            for key in missing:
                if f"period:{key}" in found:
                    self.periods[key] = PeriodTotals.from_list(orjson.loads(found[f"period:{key}"]))
        return {key: self.periods[key] for key in keys if key in self.periods}

    def _read(self, keys: list[str]) -> dict[str, bytes]:
        """Values from the store; nothing once the book is complete in memory. A store that
        cannot be read now is no answer of zero: the book is then filled from the logs."""
        if self.complete:
            return {}
        found = unsealed(self.transaction.derived(keys))
        if found is None:
            self.fill(self.transaction.load().state)
            return {}
        return found

    def view(self, now: str) -> PoolView:
        """What a decision on a member run at ``now`` knows of the pool."""
        current = self.key_at(now)
        totals = self.totals([current])
        for key, period in totals.items():
            check_total_limit(self.pool_id, key, period)
        return PoolView(pool_id=self.pool_id, cap_micros=self.meta["cap"], policy=self.policy,
                        period=self.meta["period"], current=current, totals=totals)

    def replace(self, run_id: str, member: Member, **more: bytes | None) -> None:
        """Save ``member`` as ``run_id``'s entry, the totals moved by the difference, and
        ``more`` values, in one save."""
        old = self.member(run_id)
        deltas: dict[str, PeriodTotals] = {}
        for key, totals in member.periods.items():
            deltas.setdefault(key, PeriodTotals()).add(totals)
        for key, totals in old.periods.items():
            deltas.setdefault(key, PeriodTotals()).add(totals, -1)
        self.members[run_id] = member
        self.save_changes(run_id, deltas, **more)

    def save_changes(self, run_id: str, deltas: dict[str, PeriodTotals], **more: bytes | None) -> None:
        """Add ``deltas`` to the totals, and save them with ``run_id``'s entry and ``more``."""
        self.totals(deltas)
        for key, delta in deltas.items():
            self.periods.setdefault(key, PeriodTotals()).add(delta)
        values: dict[str, bytes | None] = {f"period:{key}": orjson.dumps(self.periods[key].to_list())
                                           for key in deltas}
        values[f"member:{run_id}"] = self.members[run_id].to_bytes()
        values.update(more)
        self.save(values)

    def save(self, values: dict[str, bytes | None], *, replace: bool = False) -> None:
        """Save ``values``; if the store could not keep them (it then holds nothing), the
        book lives on in memory, complete, for the rest of this write: nothing is read back
        from a store that lost what was saved."""
        sealed = {key: None if value is None else _seal(key, value) for key, value in values.items()}
        if not self.transaction.save_derived(sealed, replace=replace) and not self.complete:
            self.fill(self.transaction.load().state)

    def facts(self) -> PoolFacts:
        """The pool's settings and members as its log says (folded once per write, when a
        member is (re)read: the first line each member's log must have)."""
        if self._facts is None:
            replayed = self.transaction.load()
            if replayed.problem is not None:
                raise replayed.problem
            self._facts = facts_of(replayed.state)
        return self._facts

    def fill(self, state: RunState) -> None:
        """Every member folded from its log, and the totals summed: the whole book in memory."""
        self._facts = facts_of(state)
        self.members = {run_id: self.fold_log(run_id) for run_id in self._facts.members}
        self.periods = {}
        for member in self.members.values():
            for key, period in member.periods.items():
                self.periods.setdefault(key, PeriodTotals()).add(period)
        for key, period in self.periods.items():  # before any of it is saved
            check_total_limit(self.pool_id, key, period)
        self.complete = True

    def fold_log(self, run_id: str, stop: int | None = None) -> Member:
        store = self.runs.ledger(run_id, lock_timeout=self.lock_timeout)
        facts = self.facts()
        return fold_member(store, self.pool_id, self.key_at, self.runs, stop=stop,
                           opened=facts.opened.get(run_id), at=facts.at.get(run_id))


def open_book(transaction: Transaction, pool_store: LedgerStore, runs: Store, *,
              lock_timeout: float) -> PoolBook:
    """The pool's book, checked (see the module's docstring), rebuilt if it cannot be trusted."""
    book = _current_book(transaction, pool_store, runs, lock_timeout)
    if book is None:
        return _rebuild(transaction, pool_store, runs, lock_timeout)
    intent = book.intent
    if intent is not None:  # a writer was killed between a member's append and the book
        run_id = intent.decode()
        book.replace(run_id, book.fold_log(run_id), intent=None)
        book.intent = None
    return book


def _current_book(transaction: Transaction, pool_store: LedgerStore, runs: Store,
                  lock_timeout: float) -> PoolBook | None:
    """The book as saved, if it was saved for the pool's log as it is now; else None. A log
    of the same size whose stamp changed (or could not be told apart yet) may have been
    edited in place: its whole chain is checked (:class:`CorruptLedger` naming the line)
    and must end in the line the book was built to."""
    values = unsealed(transaction.derived(["meta", "intent"])) or {}
    meta = orjson.loads(values["meta"]) if "meta" in values else None
    if (meta is None or meta.get("format") != FORMAT or meta.get("epoch") != transaction.derived_epoch()
            or meta.get("log_size") != pool_store.size()):
        return None
    book = PoolBook(transaction, runs, pool_store.run_id, meta, lock_timeout)
    stamp = pool_store.stamp()  # (before the log is read: a change after it shows next time)
    if meta.get("stamp") is None or meta["stamp"] != stamp:
        replayed = transaction.load()
        if replayed.problem is not None:
            raise replayed.problem
        if replayed.state.last_hash != meta.get("head"):
            return None
        book.meta = {**meta, "stamp": stamp}
        book.save({"meta": orjson.dumps(book.meta)})
    book.intent = values.get("intent")
    return book


def _rebuild(transaction: Transaction, pool_store: LedgerStore, runs: Store, lock_timeout: float) -> PoolBook:
    """Fold the pool's log and every member's, and save them as the whole book."""
    stamp = pool_store.stamp()  # (before the log is read: a change after it shows next time)
    replayed = transaction.load()
    if replayed.problem is not None:
        raise replayed.problem
    state = replayed.state
    facts = facts_of(state)
    meta = _meta(state, facts, pool_store.size(), transaction.derived_epoch(), stamp)
    book = PoolBook(transaction, runs, state.run_id, meta, lock_timeout)
    book.fill(state)
    values: dict[str, bytes | None] = {f"member:{run_id}": member.to_bytes()
                                       for run_id, member in book.members.items()}
    values.update({f"period:{key}": orjson.dumps(period.to_list()) for key, period in book.periods.items()})
    values["meta"] = orjson.dumps(meta)
    book.save(values, replace=True)
    return book


def _meta(state: RunState, facts: PoolFacts, log_size: int, epoch: str, stamp: str | None) -> dict[str, Any]:
    return {"format": FORMAT, "epoch": epoch, "log_size": log_size, "stamp": stamp, "head": state.last_hash,
            "cap": facts.cap_micros, "policy": state.policy.to_json(), "period": facts.period, "tz": facts.tz}


class MemberWrite:
    """A write to a member run, inside the pool's critical section (:class:`escalate.write.Inside`)."""

    def __init__(self, book: PoolBook, run_id: str, copied: bool = False) -> None:
        self.book = book
        self.run_id = run_id
        self.copied = copied  # the run's first line, as its Ledger read it, names another run

    def loaded(self, transaction: Transaction, replayed: Replayed) -> None:
        if not self.book.has_entry(self.run_id) and \
                self.run_id not in facts_of(self.book.transaction.load().state).members:
            raise CorruptLedger(
                f"run {self.run_id} names pool {self.book.pool_id} in its first line, but the pool "
                "does not list it (was a run folder renamed or copied?); give the folder its name "
                "back — its writes are refused until then", run=self.run_id, line=1,
                problem="a run its pool does not list", first_suspect_line=1)
        entry = self.book.member(self.run_id)
        if entry.offset != replayed.offset or entry.head != replayed.state.last_hash or self.copied:
            # The entry is behind the log (a new member, or a book rebuilt around a torn
            # tail), or the log ends in another line than the one it was folded to (edited
            # in place, its chain rebuilt): fold the run to where this write starts. A copy
            # of another member's folder under this id is refolded too, whatever its size:
            # the fold refuses it.
            self.book.replace(self.run_id, self.book.fold_log(self.run_id, stop=replayed.offset))

    def view(self, now: str) -> PoolView:
        return self.book.view(now)

    def before_append(self) -> None:
        self.book.save({"intent": self.run_id.encode()})

    def finish(self, events: list[Payload], now: str, offset: int, state: RunState) -> None:
        if not events:
            return
        member, deltas = self.book.member(self.run_id), dict[str, PeriodTotals]()
        for event in events:
            member.fold({**event, "ts": now}, self.book.key_at, deltas)
        member.offset, member.head = offset, state.last_hash
        self.book.save_changes(self.run_id, deltas, intent=None)


class PoolLogWrite:
    """A write to the pool's own log (a run joins, the policy changes): the book follows it
    in the same critical section; ``then`` runs last, still inside (a joining run is
    created there, so the pool counts it from its first line)."""

    def __init__(self, runs: Store, pool_store: LedgerStore, lock_timeout: float,
                 then: Callable[[], None] | None = None) -> None:
        self.runs, self.pool_store, self.lock_timeout, self.then = runs, pool_store, lock_timeout, then
        self.book: PoolBook | None = None

    def loaded(self, transaction: Transaction, replayed: Replayed) -> None:
        facts_of(replayed.state)  # a run's id given as a pool's
        # Only a current book is kept up to date; one that needs a rebuild or a refold is
        # left to the next member write (the log grows, so it cannot pass for current): the
        # pool's own log is written without its members' logs, so a member that cannot be
        # read never blocks a join (the retry of an init cut short) or a policy change.
        book = _current_book(transaction, self.pool_store, self.runs, self.lock_timeout)
        self.book = book if book is not None and book.intent is None else None

    def view(self, now: str) -> None:
        return None

    def before_append(self) -> None:
        pass  # the book's log size tells a missed write of the pool's own log

    def finish(self, events: list[Payload], now: str, offset: int, state: RunState) -> None:
        book = self.book
        # A void drops a member's entry and its totals: left to the next member write's rebuild.
        if book is not None and events and events[0]["type"] != "run_join_voided":
            book.meta = _meta(state, facts_of(state), offset, book.transaction.derived_epoch(),
                              self.pool_store.stamp())
            # A run joins before it is created: it has no lines to count yet.
            joined = {event["run"]: Member() for event in events if event["type"] == "run_joined"}
            book.members.update(joined)
            values: dict[str, bytes | None] = {f"member:{run_id}": member.to_bytes()
                                               for run_id, member in joined.items()}
            values["meta"] = orjson.dumps(book.meta)
            book.save(values)
        if self.then is not None:
            self.then()


def write_member(runs: Store, pool_id: str, run_store: LedgerStore, decide: Decide[R], *, actor: str,
                 clock: Clock, lock_timeout: float, copied: bool = False) -> tuple[int, Decision[R]]:
    """A write to a member run: the pool's critical section, then the run's (``copied``:
    :class:`MemberWrite`)."""
    pool_store = runs.ledger(pool_id, lock_timeout=lock_timeout)
    if not pool_store.exists():
        raise UnknownRun(f"run {run_store.run_id} belongs to pool {pool_id}, which is gone from "
                         f"{runs.where}; restore the pool's folder", run=run_store.run_id, pool=pool_id)
    with pool_store.command(), pool_store.transaction(checkpoint=False) as transaction:
        book = open_book(transaction, pool_store, runs, lock_timeout=lock_timeout)
        return write(run_store, decide, actor=actor, clock=clock,
                     inside=MemberWrite(book, run_store.run_id, copied), member_of=pool_id)


def join(runs: Store, pool_id: str, run_store: LedgerStore, *, actor: str, clock: Clock,
         lock_timeout: float, create: Callable[[], bool]) -> bool:
    """Join ``run_store``'s run to the pool and ``create`` it, in the pool's critical section:
    ``run_joined`` first, so a crash in between leaves a harmless join (the run is created
    by the retry), never a member the pool does not count. Returns what ``create`` did. A
    member whose first line the pool recorded (``member_opened``) and whose log is gone is
    never created again (:func:`escalate.pools.member.member_unreadable`): nothing is written."""
    from escalate.pools.decide import decide_join

    created: list[bool] = []
    opened: list[str] = []

    def decide(state: RunState, now: str, expired: list[str], pool: Any) -> Decision[PoolLogAnswer]:
        if state.pool is not None and run_store.run_id in state.pool.opened:
            opened.append(state.pool.opened[run_store.run_id])
        return decide_join(state, run_store.run_id)

    def then() -> None:
        if not opened or first_event(run_store) is not None:
            created.append(create())

    pool_store = runs.ledger(pool_id, lock_timeout=lock_timeout)
    with pool_store.command():
        _, decision = write_pool(runs, pool_store, decide, actor=actor, clock=clock,
                                 lock_timeout=lock_timeout, then=then)
    if decision.error is not None:
        raise decision.error
    if not created:
        raise member_unreadable(run_store, pool_id, "the pool recorded the first line of run "
                                f"{run_store.run_id}, but its log is gone from {runs.where}", missing=True,
                                opened=True)
    return created[0]


def open_member(runs: Store, pool_id: str, run_store: LedgerStore, *, actor: str, clock: Clock,
                lock_timeout: float) -> None:
    """Record the member's first line in the pool's log (``member_opened``), read in the
    pool's critical section, once it is durable: from then on the member's log is that one
    for good. Nothing when it is recorded already, or the ledger under the id is not this
    pool's run (a lost race: :mod:`escalate.pools.void`)."""
    from escalate.pools.decide import decide_opened

    pool_store = runs.ledger(pool_id, lock_timeout=lock_timeout)
    with pool_store.command():
        _, decision = write_pool(
            runs, pool_store,
            lambda state, now, _, pool: decide_opened(state, run_store.run_id,
                                                      own_first_line(run_store, pool_id)),
            actor=actor, clock=clock, lock_timeout=lock_timeout)
    if decision.error is not None:
        raise decision.error


def write_pool(runs: Store, pool_store: LedgerStore, decide: Decide[R], *, actor: str, clock: Clock,
               lock_timeout: float, then: Callable[[], None] | None = None) -> tuple[int, Decision[R]]:
    """A write to the pool's own log, its book kept with it."""
    return write(pool_store, decide, actor=actor, clock=clock, checkpoint=False,
                 inside=PoolLogWrite(runs, pool_store, lock_timeout, then))
