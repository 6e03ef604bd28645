"""Pools on the PostgreSQL store (docs/pools.md, docs/scale-out.md): the same rules through
the same seam, and a write to a member run commits in one database transaction with the
pool's books, so a writer killed half-way leaves neither."""

from __future__ import annotations

import multiprocessing

import orjson
import psycopg
import pytest

from escalate import Ledger
from escalate.errors import Pending, Refused
from escalate.pools.pool import Pool
from tests.test_pools_processes import POOL_CAP, RUNS, audit_pool, killed_after_the_append, make_pool

FORK = multiprocessing.get_context("fork")


def test_a_member_run_must_fit_its_pool(pg_url: str) -> None:
    Pool.init(pg_url, "team", cap="200", period="day", tz="Europe/Berlin", max_extension="50",
              escalation="enforce")
    api = Ledger.init(pg_url, "api", pool="team", cap="150", actor="ci")
    web = Ledger.init(pg_url, "web", pool="team", cap="150", actor="ci")
    assert api.reserve("build", "120")["pool_remaining_micros"] == 80_000_000
    with pytest.raises(Pending) as asked:
        web.reserve("build", "100")
    assert web.state().escalations[asked.value.escalation_id].reason == "pool_cap"
    shown = Pool.open(pg_url, "team").show()
    assert (shown["reserved_micros"], shown["remaining_micros"]) == (120_000_000, 80_000_000)
    assert sorted(row["run"] for row in shown["runs"]) == ["api", "web"]
    api.release("build", "110")
    assert Pool.open(pg_url, "team").show()["spent_micros"] == 110_000_000


def test_a_writer_killed_inside_the_pool_commits_nothing(pg_url: str) -> None:
    make_pool(pg_url)
    for run in RUNS:
        Ledger.open(pg_url, run).reserve("warm", "0")  # the books exist and are current
    killed = FORK.Process(target=killed_after_the_append, args=(pg_url,))
    killed.start()
    killed.join(60)
    assert killed.exitcode == 9
    with Ledger.open(pg_url, "r0").read_log() as stream:
        assert b'"task":"doomed"' not in stream.read()  # the run's lines died with the pool's
    assert Ledger.open(pg_url, "r2").reserve("all", "40")["pool_remaining_micros"] == 0
    with pytest.raises(Refused):
        Ledger.open(pg_url, "r3").reserve("more", "0.01")
    assert audit_pool(pg_url) == {"all": (0, POOL_CAP)}


def test_the_books_are_rows_that_commit_with_the_write(pg_url: str) -> None:
    make_pool(pg_url)
    Ledger.open(pg_url, "r0").reserve("a", "37")
    with psycopg.connect(pg_url, autocommit=True) as connection:
        keys = {key for (key,) in connection.execute(
            "SELECT key FROM escalate_derived WHERE ledger = 'pool'").fetchall()}
        assert "member:r0" in keys
        connection.execute("DELETE FROM escalate_derived")  # disposable: rebuilt from the logs
    with pytest.raises(Refused):
        Ledger.open(pg_url, "r1").reserve("b", "3.01")
    assert Ledger.open(pg_url, "r1").reserve("c", "3")["pool_remaining_micros"] == 0


def test_the_least_privilege_roles_of_the_docs_run_a_pool() -> None:
    """docs/scale-out.md's grants, run as written: a worker role reserves in a pool and asks,
    an approver role grants the pool's extension; the role is what the log records."""
    from pathlib import Path
    from urllib.parse import urlsplit

    from escalate.stores.postgres.store import PgStore
    from tests.pg_server import admin, fresh_database, url_of

    docs = (Path(__file__).resolve().parents[1] / "docs" / "scale-out.md").read_text()
    grants = docs.split("### Roles: least privilege", 1)[1].split("```sql\n", 1)[1].split("```", 1)[0]
    url = fresh_database()
    database = urlsplit(url).path.lstrip("/")
    PgStore(url).prepare()  # 'escalate store init', as the owner
    with admin() as connection:
        for role in ("escalate_worker", "escalate_approver"):
            connection.execute(f"DROP ROLE IF EXISTS {role}")
    try:
        with psycopg.connect(url, autocommit=True) as owner:
            owner.execute(grants.replace("'…'", "'secret'").encode())
        worker = url_of(database, user="escalate_worker")
        approver = url_of(database, user="escalate_approver")
        Pool.init(worker, "team", cap="10", escalation="enforce", approval_threshold="100",
                  max_extension="5", approvers="escalate_approver", actor="ci")
        run = Ledger.init(worker, "nightly", pool="team", cap="50", actor="ci")
        run.reserve("a", "8")
        with pytest.raises(Pending) as asked:
            run.reserve("b", "4")
        granted = Ledger.open(approver, "nightly", actor="lead").approve(asked.value.escalation_id)
        assert granted["pool_extension_micros"] == 2_000_000
        resolved = [line for line in Ledger.open(worker, "nightly").events()[0]
                    if line["type"] == "escalation_resolved"]
        assert [(line["by"], line.get("role")) for line in resolved] == [("lead", "escalate_approver")]
        with pytest.raises(Pending) as again:
            run.reserve("c", "3")
        with pytest.raises(Refused) as refused:  # whatever name it gives, the worker's role is no approver
            Ledger.open(worker, "nightly", actor="ci").approve(again.value.escalation_id, by="lead")
        assert refused.value.code == "not_an_approver"
        # Changing the pool is the approvers' too, checked and recorded by role, not by name.
        with pytest.raises(Refused) as not_theirs:
            Pool.open(worker, "team", actor="escalate_approver").set_policy(cap="50")
        assert not_theirs.value.code == "not_an_approver"
        assert Pool.open(approver, "team", actor="lead").set_policy(cap="50")["status"] == "changed"
        with psycopg.connect(url) as connection:
            lines = [orjson.loads(line) for (line,) in connection.execute(
                "SELECT line FROM escalate_events WHERE ledger = 'team' ORDER BY seq").fetchall()]
        changes = [line.get("role") for line in lines if line["type"] == "policy_changed"]
        assert changes == ["escalate_approver"]
    finally:
        with admin() as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            for role in ("escalate_worker", "escalate_approver"):
                connection.execute(f"DROP ROLE IF EXISTS {role}")
