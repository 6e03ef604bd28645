"""The storage seam's contract (escalate.stores.seam), held by every store: one base class of
seam-level tests, subclassed once per store. A new store passes these before anything above
the seam is tried on it; the CLI-level suite then runs on it through ``store``.

The tests call a ledger's Transaction directly (load, recovery, append, save_checkpoint,
derived, save_derived) and read back through the same seam."""

from __future__ import annotations

import gc
import os
from collections.abc import ItemsView, Iterator, ValuesView
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from escalate import Ledger
from escalate.config import utc_now
from escalate.core import fold
from escalate.core.events import format_ts, seal
from escalate.core.replay import Replayed
from escalate.errors import Pending
from escalate.stores.checkpoint import LazyRows
from escalate.stores.seam import LedgerStore, Store, Transaction, open_store
from tests.conftest import Location


def _lines(replayed: Replayed, *tasks: str) -> list[bytes]:
    """One write reserving $1 for each of ``tasks``, sealed after ``replayed``, folded into
    ``replayed.state`` as a writer folds what it appends."""
    state = replayed.state
    payloads = [{"type": "budget_reserved", "task": task, "amount_micros": 1_000_000} for task in tasks]
    sealed = seal(payloads, seq=state.seq, prev=state.last_hash, ts=format_ts(utc_now()), actor="tester",
                  grouped=len(payloads) > 1)
    for event, _, this_hash in sealed:
        fold.apply(state, event, this_hash)
    return [line + b"\n" for _, line, _ in sealed]


class StoreContract:
    """What every store does at the seam. A subclass gives :meth:`location`."""

    @pytest.fixture
    def location(self, runs_dir: Path) -> Location:
        raise NotImplementedError

    @pytest.fixture
    def runs(self, location: Location) -> Store:
        Ledger.init(location, "r", cap="10")
        return open_store(location)

    @pytest.fixture
    def ledger(self, runs: Store) -> LedgerStore:
        return runs.ledger("r", lock_timeout=5)

    def test_a_transaction_appends_every_line_and_the_next_one_loads_them(self, ledger: LedgerStore) -> None:
        size = ledger.size()
        with ledger.transaction() as transaction:
            replayed = transaction.load()
            assert replayed.problem is None and transaction.recovery(replayed) is None
            lines = _lines(replayed, "a", "b")
            transaction.append(replayed, lines)
            transaction.save_checkpoint(replayed, replayed.state, lines)
        ledger.sync()
        assert ledger.size() == size + sum(map(len, lines))
        with ledger.reader() as stream:
            assert stream.read().endswith(b"".join(lines))
        with ledger.transaction() as transaction:
            again = transaction.load()
        assert again.state.reserved_micros == 2_000_000 and again.state.seq == replayed.state.seq
        assert again.checkpoint_current and again.offset == ledger.size()

    def test_a_checkpoint_folds_as_the_lines_do(self, ledger: LedgerStore) -> None:
        for task in ("a", "b", "c"):
            with ledger.transaction() as transaction:
                replayed = transaction.load()
                lines = _lines(replayed, task)
                transaction.append(replayed, lines)
                transaction.save_checkpoint(replayed, replayed.state, lines)
        from_checkpoint, from_lines = ledger.read(), ledger.read(checkpoint=False)
        assert from_checkpoint.state.reserved_micros == from_lines.state.reserved_micros == 3_000_000
        assert dict(from_checkpoint.state.tasks) == dict(from_lines.state.tasks)
        assert (from_checkpoint.offset, from_checkpoint.lines, from_checkpoint.last_line_start) == \
            (from_lines.offset, from_lines.lines, from_lines.last_line_start)

    def test_a_checkpoints_rows_are_a_mapping_with_its_views(self, ledger: LedgerStore) -> None:
        with ledger.transaction() as transaction:
            replayed = transaction.load()
            lines = _lines(replayed, "a", "b")
            transaction.append(replayed, lines)
            transaction.save_checkpoint(replayed, replayed.state, lines)
        ledger.sync()
        with ledger.transaction() as transaction:
            tasks = transaction.load().state.tasks
            assert isinstance(tasks.rows, LazyRows)  # a writer's rows, read from the checkpoint as asked
            for table in (tasks, tasks.rows):
                items, values = table.items(), table.values()
                assert isinstance(items, ItemsView) and isinstance(values, ValuesView)
                assert len(items) == len(values) == len(table) == 2
                assert ("a", table["a"]) in items and table["b"] in values
                assert [key for key, _ in items] == list(table) == ["a", "b"]
                assert list(values) == [table["a"], table["b"]]

    def test_a_transaction_left_by_an_error_before_its_append_writes_nothing(self,
                                                                             ledger: LedgerStore) -> None:
        size = ledger.size()
        with pytest.raises(RuntimeError), ledger.transaction() as transaction:
            _lines(transaction.load(), "a")
            raise RuntimeError("refused")
        assert ledger.size() == size and ledger.read().state.reserved_micros == 0

    def test_derived_values_are_saved_all_together_and_read_back(self, ledger: LedgerStore) -> None:
        with ledger.transaction() as transaction:
            epoch = transaction.derived_epoch()
            assert transaction.derived(["meta"]) == {}
            assert transaction.save_derived({"meta": b"1", "period:a": b"2", "member:x": b"3"})
        with ledger.transaction() as transaction:
            assert transaction.derived_epoch() == epoch
            assert transaction.derived(["meta", "period:a", "nothing"]) == {"meta": b"1", "period:a": b"2"}
            assert transaction.save_derived({"meta": None, "period:a": b"4"})
        with ledger.transaction() as transaction:
            assert transaction.derived(["meta", "period:a", "member:x"]) == {"period:a": b"4",
                                                                             "member:x": b"3"}
            assert transaction.save_derived({"intent": b"5"}, replace=True)
        with ledger.transaction() as transaction:
            assert transaction.derived(["period:a", "member:x", "intent"]) == {"intent": b"5"}

    def test_the_store_lists_its_ledgers(self, runs: Store, location: Location) -> None:
        Ledger.init(location, "s", cap="10")
        assert sorted(runs.run_ids()) == ["r", "s"]
        assert runs.ledger("s", lock_timeout=5).exists()
        assert not runs.ledger("t", lock_timeout=5).exists()

    def test_a_command_is_one_pass_and_the_role_is_asked_before_its_lock(
            self, location: Location, monkeypatch: pytest.MonkeyPatch) -> None:
        """One reserve that escalates: the store's command is entered once, and who the store
        vouches for is asked before its critical section, never inside it."""
        Ledger.init(location, "e", cap="10", escalation="enforce", approval_threshold="1")
        run = Ledger.open(location, "e")
        store = run.store
        seen: list[str] = []
        inside = [False]
        command, transaction, role = store.command, store.transaction, store.role

        def counted_command() -> AbstractContextManager[None]:
            seen.append("command")
            return command()

        @contextmanager
        def watched_transaction(**options: bool) -> Iterator[Transaction]:
            with transaction(**options) as opened:
                inside[0] = True
                try:
                    yield opened
                finally:
                    inside[0] = False

        def watched_role() -> str | None:
            seen.append("role inside" if inside[0] else "role")
            return role()

        monkeypatch.setattr(store, "command", counted_command)
        monkeypatch.setattr(store, "transaction", watched_transaction)
        monkeypatch.setattr(store, "role", watched_role)
        with pytest.raises(Pending) as pending:
            run.reserve("t", "2")
        assert seen == ["role", "command"]
        escalation = run.state().escalations[pending.value.escalation_id]
        assert escalation.requested_role == role()

    def test_closing_releases_every_handle_a_write_kept(self, location: Location,
                                                         no_collector: None) -> None:
        Ledger.init(location, "r", cap="10").close()
        before = _handles()
        run = Ledger.open(location, "r")
        with run:
            run.reserve("a", "1")
            # Kept for the next command: the checkpoint's connection and folder handle, or
            # the database connection of a store opened from a URL.
            assert _handles() > before
        assert _handles() == before  # released at once, while the Ledger is still referenced
        run.reserve("b", "1")  # a closed Ledger opens what it needs again
        assert run.state().reserved_micros == 2_000_000
        run.close()
        assert _handles() == before

    def test_a_store_given_stays_open_when_the_ledger_closes(self, runs: Store) -> None:
        with Ledger.open(runs, "r") as run:
            run.reserve("a", "1")
        held = _handles()
        assert runs.ledger("r", lock_timeout=5).read().state.reserved_micros == 1_000_000
        assert _handles() == held  # (the store's connection, if any, was not closed: the caller's)
        runs.close()


@pytest.fixture
def no_collector() -> Iterator[None]:
    """What earlier tests left to the garbage collector is collected first, and nothing is
    collected meanwhile: the count of handles moves only with what the test does."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _handles() -> int:
    """The file descriptors this process holds open (files, folders, sockets)."""
    return len(os.listdir("/proc/self/fd"))


class TestFileStore(StoreContract):
    @pytest.fixture
    def location(self, runs_dir: Path) -> Location:
        return runs_dir


class TestPostgresStore(StoreContract):
    @pytest.fixture
    def location(self, pg_url: str) -> Location:
        return pg_url
