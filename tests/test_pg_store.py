"""The PostgreSQL store on a real server (tests/pg_server.py): its schema, its refusals,
its errors, and moving runs between stores."""

from __future__ import annotations

import psycopg
import pytest

from escalate import Conflict, Ledger
from escalate.pg_store import PgStore
from tests.pg_server import pg_url

__all__ = ["pg_url"]  # the fixture, imported for the tests below


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


def test_the_schema_is_made_once_and_again_changes_nothing(pg_url: str) -> None:
    store = PgStore(pg_url)
    assert store.prepare() == 1
    assert PgStore(pg_url).prepare() == 0
    with psycopg.connect(pg_url) as connection:
        versions = connection.execute("SELECT version FROM escalate_schema_version ORDER BY 1").fetchall()
    assert versions == [(0,), (1,)]
