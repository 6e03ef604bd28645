"""The PostgreSQL store on a real server (tests/pg_server.py): its schema, its refusals,
its errors, who acted, and moving runs between stores."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import psycopg
import pytest

from escalate import Conflict, Ledger, Pending, Refused, StoreUnavailable
from escalate.stores.postgres import store as pg_store_module
from escalate.stores.postgres.store import PgStore
from escalate.stores.postgres.tables import SCHEMA_VERSION
from escalate.transfer import export_lines, import_log
from tests.conftest import FakeClock
from tests.pg_server import admin, pg_url, server, url_of
from tests.pg_throwaway import RoundTrips

__all__ = ["pg_url"]  # the fixture, imported for the tests below

_FORK = multiprocessing.get_context("fork")
RESULT_TIMEOUT_S = 60


def _escalate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "escalate", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})}, check=False)


def _database(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def _count(url: str, table: str) -> int:
    with psycopg.connect(url) as connection:
        row = connection.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


# ---------------------------------------------------------------------- the store


def test_a_reserve_and_release_round_trip(pg_url: str) -> None:
    run = Ledger.init(pg_url, "r", cap="10", actor="tester")
    assert run.created
    assert run.reserve("t", "2.50")["remaining_micros"] == 7_500_000
    assert run.release("t", "1")["remaining_micros"] == 9_000_000
    again = Ledger.open(pg_url, "r", actor="tester")
    assert again.state().spent_micros == 1_000_000
    with pytest.raises(Conflict, match="already released"):
        again.reserve("t", "2.50")
    assert again.verify().problems == []


@pytest.mark.parametrize("autocommit", [True, False])
def test_an_open_connection_and_a_pool_are_stores(pg_url: str, autocommit: bool) -> None:
    with psycopg.connect(pg_url, autocommit=autocommit) as connection:
        run = Ledger.init(connection, "r", cap="10", escalation="enforce", approval_threshold="5",
                          actor="tester")
        run.reserve("a", "1")
        assert run.state().reserved_micros == 1_000_000 and len(run.events()[0]) == 2
        with pytest.raises(Pending) as pending:
            run.reserve("big", "6")
        Ledger.open(connection, "r", actor="boss").approve(pending.value.escalation_id)
        assert run.wait(pending.value.escalation_id, timeout_s=10)["status"] == "approved"
        assert connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE

    class Pool:  # what psycopg_pool offers: connections lent by a context manager
        def __init__(self) -> None:
            self.lent = 0

        def connection(self) -> Any:
            self.lent += 1
            return psycopg.connect(pg_url)

    pool = Pool()
    assert Ledger.open(pool, "r", actor="tester").reserve("b", "1")["remaining_micros"] == 2_000_000
    assert pool.lent >= 2


def test_a_connection_inside_a_transaction_is_refused(pg_url: str) -> None:
    with psycopg.connect(pg_url) as connection:
        connection.execute("SELECT 1")  # opens a transaction (not autocommit)
        with pytest.raises(Exception, match="inside a transaction") as refused:
            Ledger.init(connection, "r", cap="10", actor="tester")
        assert getattr(refused.value, "exit_code", None) == 2


def test_the_checkpoint_follows_every_write_and_a_lost_one_is_rebuilt(pg_url: str) -> None:
    run = Ledger.init(pg_url, "r", cap="100", actor="tester")
    for number in range(5):
        run.reserve(f"t{number}", "1")
    run.release("t0", "0.5")
    with psycopg.connect(pg_url) as connection:
        lines, checkpoint_lines = connection.execute(
            "SELECT lines, checkpoint_lines FROM escalate_ledgers").fetchone() or (0, 0)
        assert lines == checkpoint_lines == 7
        connection.execute("UPDATE escalate_ledgers SET checkpoint = NULL")
        connection.execute("DELETE FROM escalate_tasks")
    assert run.state().reserved_micros == 4_000_000  # folded from the lines alone
    run.reserve("t9", "1")  # and the writer builds the checkpoint again
    with psycopg.connect(pg_url) as connection:
        assert connection.execute("SELECT count(*) FROM escalate_tasks").fetchone() == (6,)
    assert run.state().reserved_micros == 5_000_000


# ---------------------------------------------------------------------- the schema


def test_the_schema_is_made_once_and_again_changes_nothing(pg_url: str) -> None:
    assert PgStore(pg_url).prepare() == SCHEMA_VERSION
    assert PgStore(pg_url).prepare() == 0
    with psycopg.connect(pg_url) as connection:
        versions = connection.execute("SELECT version FROM escalate_schema_version ORDER BY 1").fetchall()
    assert versions == [(step,) for step in range(SCHEMA_VERSION + 1)]
    result = _escalate("store", "init", "--store", pg_url, "--json")
    assert result.returncode == 0 and orjson.loads(result.stdout)["status"] == "current"


def test_an_older_schema_is_upgraded_on_first_use(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from escalate.stores.postgres import tables as pg_schema

    steps = pg_schema._STEPS
    monkeypatch.setattr(pg_schema, "_STEPS", steps[:1])
    monkeypatch.setattr(pg_schema, "SCHEMA_VERSION", 1)
    Ledger.init(pg_url, "r", cap="10", actor="tester")  # made in tables of version 1
    monkeypatch.setattr(pg_schema, "_STEPS", steps)
    monkeypatch.setattr(pg_schema, "SCHEMA_VERSION", len(steps))
    assert Ledger.open(pg_url, "r", actor="tester").reserve("b", "1")["remaining_micros"] == 9_000_000
    with psycopg.connect(pg_url) as connection:
        assert connection.execute("SELECT max(version) FROM escalate_schema_version").fetchone() \
            == (len(steps),)


def _first_use(url: str, number: int, barrier: Any) -> None:
    barrier.wait(RESULT_TIMEOUT_S)
    Ledger.init(url, f"r{number}", cap="1", actor="tester")


def test_eight_processes_using_an_empty_database_at_once_make_the_schema_once(pg_url: str) -> None:
    barrier = _FORK.Barrier(8)
    workers = [_FORK.Process(target=_first_use, args=(pg_url, number, barrier)) for number in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(RESULT_TIMEOUT_S)
    assert [worker.exitcode for worker in workers] == [0] * 8
    with psycopg.connect(pg_url) as connection:
        assert connection.execute("SELECT version FROM escalate_schema_version ORDER BY 1").fetchall() \
            == [(step,) for step in range(SCHEMA_VERSION + 1)]
    assert list(PgStore(pg_url).run_ids()) == [f"r{number}" for number in range(8)]


@pytest.mark.parametrize("statement", [
    "UPDATE escalate_events SET line = line || 'x'::bytea",
    "DELETE FROM escalate_events",
    "TRUNCATE escalate_events",
])
def test_the_events_table_refuses_rewriting_even_to_its_owner(pg_url: str, statement: str) -> None:
    Ledger.init(pg_url, "r", cap="10", actor="tester").reserve("t", "1")
    with psycopg.connect(pg_url) as connection:
        before = connection.execute("SELECT seq, line FROM escalate_events ORDER BY seq").fetchall()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            connection.execute(statement)
        connection.rollback()
        assert connection.execute("SELECT seq, line FROM escalate_events ORDER BY seq").fetchall() == before


# ---------------------------------------------------------------------- export and import


def _same_history(location: Any, *, escalate: bool = True) -> Ledger:
    """The same commands at the same moments, as the same actor, on any store (an escalation
    and its approval record the database role on PostgreSQL: ``escalate=False`` leaves both
    out, so the two stores write the same bytes)."""
    clock = FakeClock()
    run = Ledger.init(location, "r", cap="10", escalation="enforce", approval_threshold="3",
                      actor="tester", clock=clock)
    run.reserve("a", "2")
    clock.advance(1)
    if escalate:
        with pytest.raises(Pending) as pending:
            run.reserve("b", "4", reason="big diff", priority="high")
    clock.advance(1)
    run.release("a", "1.25")
    if escalate:
        Ledger.open(location, "r", actor="boss", clock=clock).approve(pending.value.escalation_id)
    return run


def test_an_export_is_byte_for_byte_the_file_stores_log_and_verifies(pg_url: str, tmp_path: Path) -> None:
    _same_history(tmp_path / "files", escalate=False)
    _same_history(pg_url, escalate=False)
    exported = b"".join(export_lines(pg_url, "r"))
    assert exported == (tmp_path / "files" / "r" / "events.ndjson").read_bytes()
    result = _escalate("runs", "export", "r", "--store", pg_url)
    assert result.returncode == 0 and result.stdout.encode() == exported
    import_log(tmp_path / "back", "r", exported)
    verified = _escalate("runs", "verify", "r", "--runs-dir", str(tmp_path / "back"), "--json")
    assert verified.returncode == 0 and orjson.loads(verified.stdout)["ok"] is True


def test_an_import_moves_a_file_run_into_the_database(pg_url: str, tmp_path: Path) -> None:
    _same_history(tmp_path)
    log = tmp_path / "r" / "events.ndjson"
    result = _escalate("runs", "import", "moved", str(log), "--store", pg_url, "--json")
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout)["lines"] == log.read_bytes().count(b"\n")
    assert b"".join(export_lines(pg_url, "moved")) == log.read_bytes()
    moved = Ledger.open(pg_url, "moved", actor="tester")
    assert moved.state().totals() | {"run": "r"} == Ledger.open(tmp_path, "r").state().totals()
    moved.reserve("c", "1")  # and it takes writes, from the checkpoint the import left
    assert moved.verify().problems == []


@pytest.mark.parametrize("damage", ["changed", "torn", "not json"])
def test_an_import_refuses_a_damaged_log_and_writes_nothing(
        pg_url: str, tmp_path: Path, damage: str) -> None:
    _same_history(tmp_path)
    lines = (tmp_path / "r" / "events.ndjson").read_bytes().splitlines(keepends=True)
    if damage == "changed":  # an amount edited: the next line's prev no longer matches
        lines[1] = lines[1].replace(b'"amount_micros":2000000', b'"amount_micros":1000000')
    elif damage == "torn":
        lines[-1] = lines[-1][:20]
    else:
        lines[2] = b"{oops\n"
    bad = tmp_path / "bad.ndjson"
    bad.write_bytes(b"".join(lines))
    PgStore(pg_url).prepare()
    result = _escalate("runs", "import", "r", str(bad), "--store", pg_url, "--json")
    assert result.returncode == 2, result.stderr
    assert orjson.loads(result.stdout)["error"] == "invalid_log"
    assert result.stderr.count("\n") == 1 and "nothing was imported" in result.stderr
    assert _count(pg_url, "escalate_ledgers") == _count(pg_url, "escalate_events") == 0


def test_an_import_refuses_an_existing_run_and_changes_nothing(pg_url: str, tmp_path: Path) -> None:
    _same_history(tmp_path)
    Ledger.init(pg_url, "r", cap="5", actor="tester").reserve("x", "1")
    before = b"".join(export_lines(pg_url, "r"))
    result = _escalate("runs", "import", "r", str(tmp_path / "r" / "events.ndjson"), "--store", pg_url,
                       "--json")
    assert result.returncode == 5 and orjson.loads(result.stdout)["error"] == "run_exists"
    assert b"".join(export_lines(pg_url, "r")) == before
    assert _count(pg_url, "escalate_events") == 2


# ---------------------------------------------------------------------- failures


def test_a_held_row_lock_is_a_lock_timeout(pg_url: str) -> None:
    Ledger.init(pg_url, "r", cap="10", actor="tester")
    with psycopg.connect(pg_url) as holder:
        holder.execute("SELECT * FROM escalate_ledgers WHERE ledger = 'r' FOR UPDATE")
        result = _escalate("reserve", "r", "t", "--estimate", "1", "--store", pg_url,
                           "--lock-timeout", "200ms", "--json")
        assert result.returncode == 7, result.stderr
        assert orjson.loads(result.stdout)["error"] == "lock_timeout"
        assert result.stderr.count("\n") == 1 and "run r is locked" in result.stderr
    assert _count(pg_url, "escalate_events") == 1  # nothing was written
    assert _escalate("reserve", "r", "t", "--estimate", "1", "--store", pg_url).returncode == 0


def test_no_server_is_exit_8_naming_host_and_database(tmp_path: Path) -> None:
    # A socket folder where no server listens: as a server that is down.
    url = f"postgresql://ledger:hunter2@/budgets?host={tmp_path}"
    result = _escalate("reserve", "r", "t", "--estimate", "1", "--json", env={"ESCALATE_STORE": url})
    assert result.returncode == 8
    assert orjson.loads(result.stdout)["error"] == "connection_failed"
    line = result.stderr
    assert line.count("\n") == 1 and f"host={tmp_path}" in line and "budgets" in line
    assert "nothing was written" in line and "may be unknown" not in line
    assert "hunter2" not in result.stdout + line


@pytest.fixture
def password_role(pg_url: str) -> Iterator[str]:
    """A role that must log in with a password (the server trusts everyone else)."""
    _, data = server()
    if data is None:
        pytest.skip("needs the embedded server, whose pg_hba.conf this test edits")
    hba = data / "pg_hba.conf"
    original = hba.read_text()
    with admin() as connection:
        connection.execute("DROP ROLE IF EXISTS escalate_pw")
        connection.execute("CREATE ROLE escalate_pw LOGIN PASSWORD 'right-one'")
        hba.write_text("local all escalate_pw scram-sha-256\nhost all escalate_pw all scram-sha-256\n"
                       + original)
        connection.execute("SELECT pg_reload_conf()")
    try:
        yield "escalate_pw"
    finally:
        hba.write_text(original)
        with admin() as connection:
            connection.execute("SELECT pg_reload_conf()")


def test_a_wrong_password_is_exit_8_without_the_password(pg_url: str, password_role: str) -> None:
    database = _database(pg_url)
    url = url_of(database, user=password_role, password="wrong-secret")
    result = _escalate("runs", "list", "--store", url, "--json")
    assert result.returncode == 8, result.stderr
    assert "password authentication failed" in result.stderr
    assert result.stderr.count("\n") == 1 and database in result.stderr
    assert "wrong-secret" not in result.stdout + result.stderr


def test_the_step_hook_sees_every_step_of_a_write_in_order(pg_url: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    run = Ledger.init(pg_url, "r", cap="10", actor="tester")
    steps: list[str] = []
    monkeypatch.setattr(pg_store_module, "STEP_HOOK", steps.append)
    run.reserve("t", "1")
    assert steps == ["connected", "locked", "loaded", "appended", "checkpointed", "before_commit",
                     "committed"]


def test_a_connection_cut_before_the_commit_is_exit_8_and_a_retry_settles_it(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run = Ledger.init(pg_url, "r", cap="10", actor="tester")

    def cut(step: str) -> None:
        if step == "before_commit":
            with admin() as connection:
                connection.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE datname = %s AND pid <> pg_backend_pid()", (_database(pg_url),))

    monkeypatch.setattr(pg_store_module, "STEP_HOOK", cut)
    with pytest.raises(StoreUnavailable, match="may be unknown"):
        run.reserve("t", "1")
    monkeypatch.setattr(pg_store_module, "STEP_HOOK", None)
    assert run.reserve("t", "1")["remaining_micros"] == 9_000_000  # the retry: once, not twice
    assert run.reserve("t", "1")["status"] == "exists"


# ---------------------------------------------------------------------- who acted


@pytest.fixture
def roles(pg_url: str) -> Iterator[dict[str, str]]:
    """A worker's and an approver's URL, each its own database role."""
    database = _database(pg_url)
    PgStore(pg_url).prepare()
    names = {"worker": "escalate_worker_t", "approver": "escalate_approver_t"}
    with admin() as connection:
        for name in names.values():
            connection.execute(f"DROP ROLE IF EXISTS {name}")
            connection.execute(f"CREATE ROLE {name} LOGIN")
    with psycopg.connect(pg_url, autocommit=True) as connection:
        for name in names.values():
            connection.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON escalate_ledgers, escalate_tasks, "
                               f"escalate_escalations TO {name}")
            connection.execute(f"GRANT SELECT, INSERT ON escalate_events, escalate_schema_version TO {name}")
            connection.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {name}")
    yield {role: url_of(database, user=name) for role, name in names.items()}
    with admin() as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        for name in names.values():
            connection.execute(f"DROP ROLE IF EXISTS {name}")


def test_an_approval_records_the_database_role_and_approvers_are_roles(roles: dict[str, str]) -> None:
    run = Ledger.init(roles["worker"], "r", cap="10", escalation="enforce", approval_threshold="1",
                      approvers="escalate_approver_t", actor="ci-bot")
    with pytest.raises(Pending) as pending:
        run.reserve("t", "2")
    escalation_id = pending.value.escalation_id
    # The worker's role is no approver, whatever name it gives.
    with pytest.raises(Refused) as refused:
        Ledger.open(roles["worker"], "r", actor="mallory").approve(escalation_id, by="escalate_approver_t")
    assert refused.value.code == "not_an_approver"
    approved = Ledger.open(roles["approver"], "r", actor="Alice Example").approve(escalation_id)
    assert approved["status"] == "approved"
    [resolved] = [event for event in Ledger.open(roles["worker"], "r").events()[0]
                  if event["type"] == "escalation_resolved"]
    assert resolved["role"] == "escalate_approver_t" and resolved["by"] == "Alice Example"
    assert Ledger.open(roles["worker"], "r").verify().problems == []


def test_an_approver_role_may_not_approve_what_it_asked_for_under_another_name(
        roles: dict[str, str]) -> None:
    lead = Ledger.init(roles["approver"], "r", cap="10", escalation="enforce", approval_threshold="1",
                       approvers="escalate_approver_t", actor="lead")
    with pytest.raises(Pending) as pending:
        lead.reserve("t", "2")
    [asked] = [event for event in lead.events()[0] if event["type"] == "escalation"]
    assert asked["role"] == "escalate_approver_t"
    with pytest.raises(Refused) as refused:
        Ledger.open(roles["approver"], "r", actor="lead").approve(pending.value.escalation_id,
                                                                   by="someone-else")
    assert refused.value.code == "self_approval" and "database role" in refused.value.message
    assert lead.verify().problems == []


def test_the_role_is_asked_for_each_command_and_withdraw_checks_it(roles: dict[str, str],
                                                                   pg_url: str) -> None:
    """One connection serving several people with SET ROLE, as a service would: each command
    acts as the role of that moment; another role cannot withdraw a request by naming its
    requester."""
    worker = Ledger.init(roles["worker"], "r", cap="10", escalation="enforce", approval_threshold="1",
                         approvers="escalate_approver_t", actor="bot")
    with pytest.raises(Pending) as first:
        worker.reserve("t", "2")
    with pytest.raises(Pending) as second:
        worker.reserve("u", "3")
    with psycopg.connect(pg_url, autocommit=True) as shared:
        store = PgStore(shared)
        shared.execute("SET ROLE escalate_approver_t")
        Ledger.open(store, "r", actor="lead").state()  # a first request, as the approver
        shared.execute("SET ROLE escalate_worker_t")
        with pytest.raises(Refused) as refused:
            Ledger.open(store, "r", actor="lead").approve(first.value.escalation_id, by="lead")
        assert refused.value.code == "not_an_approver"
        shared.execute("SET ROLE escalate_approver_t")
        approved = Ledger.open(store, "r", actor="lead").approve(first.value.escalation_id)
        assert approved["status"] == "approved"
        with pytest.raises(Refused) as not_theirs:  # the approver's role, claiming the requester's name
            Ledger.open(store, "r").withdraw(second.value.escalation_id, by="bot")
        assert not_theirs.value.code == "not_the_requester"
    assert worker.withdraw(second.value.escalation_id, by="bot")["status"] == "withdrawn"


# ---------------------------------------------------------------------- choosing the store


@pytest.mark.parametrize("url", ["postgresql://ledger:hunter2@/db?bogus=1",
                                 "postgresql://ledger:hunter2@[::1/db",
                                 "postgres://ledger:hunter2%PW@db/x",  # an unencoded %
                                 "postgresql://ledger:hunter2@db:port/x"])
def test_an_invalid_url_is_bad_input_without_the_password(url: str) -> None:
    result = _escalate("runs", "list", "--store", url, "--json")
    assert result.returncode == 2 and orjson.loads(result.stdout)["error"] == "invalid_store"
    assert result.stderr.count("\n") == 1 and "hunter2" not in result.stdout + result.stderr


@pytest.mark.parametrize("url", [
    *(f"postgresql://ledger:hunter2@/db?host=/nonexist&{option}=bogus" for option in
      ("sslmode", "target_session_attrs", "gssencmode", "load_balance_hosts", "channel_binding")),
    "postgresql://ledger:hunter2@/db?host=/nonexist&connect_timeout=abc",
    "postgresql://ledger:hunter2@127.0.0.1:99999/db"])
def test_an_option_value_libpq_rejects_is_exit_2_never_retry(url: str, tmp_path: Path) -> None:
    # libpq checks these values only when it connects: the failure is the URL's, and a
    # script retrying on exit 8 would loop for ever.
    for command in (("runs", "list"), ("runs", "init", "r", "--cap", "1"),
                    ("reserve", "r", "t", "--estimate", "1")):
        result = _escalate(*command, "--store", url, "--json", env={"PGPASSWORD": ""})
        answer = orjson.loads(result.stdout)
        assert (result.returncode, answer["error"]) == (2, "invalid_store"), (command, result.stderr)
        assert result.stderr.count("\n") == 1 and "invalid store URL" in result.stderr
        assert "retry" not in result.stderr and "hunter2" not in result.stdout + result.stderr


def test_two_places_for_the_runs_are_refused(tmp_path: Path) -> None:
    both = _escalate("runs", "list", "--store", str(tmp_path / "a"), "--runs-dir", str(tmp_path / "b"))
    assert both.returncode == 2 and "--store and --runs-dir" in both.stderr
    variables = _escalate("runs", "list", env={"ESCALATE_STORE": str(tmp_path / "a"),
                                               "ESCALATE_RUNS_DIR": str(tmp_path / "b")})
    assert variables.returncode == 2 and "unset one" in variables.stderr
    Ledger.init(tmp_path / "a", "r", cap="1", actor="tester")
    listed = _escalate("runs", "list", "--json", env={"ESCALATE_STORE": str(tmp_path / "a"),
                                                      "ESCALATE_RUNS_DIR": ""})
    assert [row["run"] for row in orjson.loads(listed.stdout)["runs"]] == ["r"]
    assert list(tmp_path.iterdir()) == [tmp_path / "a"]  # nothing made anywhere else


# ---------------------------------------------------------------------- cost per command


def test_a_command_reads_and_writes_only_the_rows_it_touches(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run = Ledger.init(pg_url, "r", cap="1000", actor="tester")
    for number in range(60):
        run.reserve(f"t{number}", "1")
    queries: list[str] = []
    execute = psycopg.Connection.execute

    def counted(self: psycopg.Connection[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        queries.append(query.decode() if isinstance(query, bytes) else str(query))
        return execute(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "execute", counted)
    run.release("t7", "0.5")
    reads = [query for query in queries if "FROM escalate_tasks" in query]
    assert len(reads) == 1 and "key = %s" in reads[0]  # one task, looked up by key
    [commit] = [query for query in queries if query.endswith("COMMIT")]
    assert commit.count("'t7'") == 1 and "'t8'" not in commit  # one task row written
    assert "pg_notify" not in commit  # nobody waits on this run: no notice to queue commits on
    assert not any("FROM escalate_events" in query for query in queries)  # the checkpoint is current


def test_wait_wakes_on_the_commit_without_polling(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run = Ledger.init(pg_url, "r", cap="10", escalation="enforce", approval_threshold="1",
                      actor="alice")
    with pytest.raises(Pending) as pending:
        run.reserve("t", "2")
    sizes: list[int] = []
    size = run.store.size
    monkeypatch.setattr(run.store, "size", lambda: sizes.append(1) or size())
    approver = _FORK.Process(target=_approve_later, args=(pg_url, pending.value.escalation_id))
    approver.start()
    assert run.wait(pending.value.escalation_id, timeout_s=30)["status"] == "approved"
    approver.join(RESULT_TIMEOUT_S)
    # Polling every 50 ms would look dozens of times in the 1.5 s before the approval.
    assert len(sizes) <= 6


def _approve_later(url: str, escalation_id: str) -> None:
    import time

    time.sleep(1.5)  # the waiter is blocked on its LISTEN by then; how long is what is measured
    Ledger.open(url, "r", actor="bob").approve(escalation_id)


def test_runs_watch_prints_a_commit_as_it_happens_not_at_its_interval(pg_url: str) -> None:
    Ledger.init(pg_url, "r", cap="10", actor="tester")
    watch = subprocess.Popen([sys.executable, "-m", "escalate", "runs", "watch", "r", "--store", pg_url,
                              "-n", "1", "--interval", "1h", "--timeout", "60s", "--json"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert watch.stdout is not None
        assert orjson.loads(watch.stdout.readline())["type"] == "run_opened"
        Ledger.open(pg_url, "r", actor="tester").reserve("t", "1")
        assert orjson.loads(watch.stdout.readline())["task"] == "t"  # long before an hour
    finally:
        watch.kill()
        watch.wait()


def test_a_server_gone_silent_is_noticed_unless_the_url_says_otherwise(pg_url: str) -> None:
    from escalate.stores.postgres.connect import connect

    def options(url: str) -> dict[str, bytes | None]:
        with connect(url) as connection:
            return {option.keyword.decode(): option.val for option in connection.pgconn.info}

    chosen = options(pg_url)
    assert (chosen["connect_timeout"], chosen["keepalives_idle"], chosen["tcp_user_timeout"]) \
        == (b"10", b"30", b"60000")
    assert options(f"{pg_url}{'&' if '?' in pg_url else '?'}keepalives_idle=5")["keepalives_idle"] == b"5"


@pytest.mark.parametrize("pool", [None, "pool", "pool_opened", "url"])
def test_opening_a_run_is_one_round_trip(pg_url: str, pool: str | None) -> None:
    """Ledger.open asks the schema's version, whether the run exists and its first line (its
    pool) in one query, on a connection given to it and on the one a store opens from its
    URL (as a command does); a pool's id is still refused as a run, and an unknown run
    named. Counted in libpq's trace: round trips, not statements."""
    from escalate.errors import InputError, UnknownRun
    from escalate.pools.pool import Pool

    Pool.init(pg_url, "p", cap="100", period="day", actor="tester")
    Ledger.init(pg_url, "r", cap="10", actor="tester", pool="p" if pool == "pool" else None)
    with PgStore(pg_url) if pool == "url" else psycopg.connect(pg_url, autocommit=True) as where:
        if isinstance(where, PgStore):
            with where.connection(schema=False) as connection:  # connected: no query sent yet
                pass
        else:
            connection = where
        with RoundTrips(connection) as trips:
            if pool == "pool_opened":
                with pytest.raises(InputError, match="pool"):
                    Ledger.open(where, "p", actor="tester")
            else:
                run = Ledger.open(where, "r", actor="tester")
                assert run.pool_id() == ("p" if pool == "pool" else None)
        assert trips.count == 1
        with pytest.raises(UnknownRun):
            Ledger.open(where, "nope", actor="tester")
    assert Ledger.open(pg_url, "r", actor="tester").reserve("t", "1")["status"] == "reserved"


def test_a_url_stores_role_is_asked_once_per_connection(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the connection a store opened from its URL (nobody else's, and escalate sets no
    role on it), who acts is asked once, not in a round trip per command; escalations still
    record it."""
    Ledger.init(pg_url, "r", cap="10", escalation="enforce", approval_threshold="1")
    run = Ledger.open(pg_url, "r")
    run.reserve("a", "0.5")
    sent: list[str] = []
    execute = psycopg.Connection.execute

    def counted(self: psycopg.Connection[Any], query: Any, *args: Any, **options: Any) -> Any:
        sent.append(str(query))
        return execute(self, query, *args, **options)

    monkeypatch.setattr(psycopg.Connection, "execute", counted)
    run.reserve("b", "0.5")
    run.release("b", "0.5")
    with pytest.raises(Pending) as pending:
        run.reserve("c", "2")
    assert sent and not [query for query in sent if "current_user" in query]
    with psycopg.connect(pg_url) as connection:
        user = connection.execute("SELECT current_user").fetchone()
    assert user is not None and run.state().escalations[pending.value.escalation_id].requested_role == user[0]
