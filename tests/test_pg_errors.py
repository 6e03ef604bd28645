"""What the PostgreSQL store answers when it cannot do what was asked (docs/exit-codes.md),
against a real server: a read-only database is exit 8 ``read_only``; a URL whose options
the driver or the server refuses is exit 2 ``invalid_store``, never echoing the password; a
missing database or role and a refused connection are exit 8 with codes of their own. Each
is one JSON object with ``--json`` and one line for people, and only a write whose commit
was sent says that its outcome may be unknown — everything else says nothing was written."""

from __future__ import annotations

import socket
from typing import Any

import orjson
import pytest

from escalate import Ledger, StoreUnavailable
from escalate.pools.pool import Pool
from escalate.stores.postgres import store as pg_store_module
from tests.conftest import log_bytes
from tests.pg_server import admin, pg_url, url_of
from tests.test_pg_store import _database, _escalate

__all__ = ["pg_url"]  # the fixture (a database of its own), imported for the tests below

PASSWORD = "hunter2-secret"
RESERVE = ("reserve", "r", "t", "--estimate", "1")
READS = (("runs", "show", "r"), ("runs", "list"))


def _answers(command: tuple[str, ...], url: str) -> tuple[dict[str, Any], str]:
    """``command`` on the store at ``url``: its one JSON object with --json, and the one
    line people get without it (the same exit code both times)."""
    as_json = _escalate(*command, "--store", url, "--json")
    for_people = _escalate(*command, "--store", url)
    answer = orjson.loads(as_json.stdout)  # one JSON object, nothing else on stdout
    assert isinstance(answer, dict)
    assert for_people.returncode == as_json.returncode == answer["exit_code"], for_people.stderr
    assert for_people.stdout == "" and for_people.stderr.count("\n") == 1, for_people.stderr
    assert for_people.stderr == f"escalate: {answer['message']}\n"
    return answer, for_people.stderr


def _with(url: str, option: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{option}"


def _free_port() -> int:
    """A port on this machine that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_read_only_database_is_exit_8_read_only_and_reads_still_work(pg_url: str) -> None:
    assert _escalate("runs", "init", "r", "--cap", "10", "--store", pg_url).returncode == 0
    before = log_bytes(pg_url, "r")
    with admin() as connection:
        connection.execute(f"ALTER DATABASE {_database(pg_url)} SET default_transaction_read_only = on")
    for command in (RESERVE, ("runs", "init", "r2", "--cap", "5"), ("release", "r", "t", "--actual", "1")):
        answer, line = _answers(command, pg_url)
        assert (answer["exit_code"], answer["error"], answer["commit_sent"]) == (8, "read_only", False)
        assert "is read-only" in line and "nothing was written" in line and "may be unknown" not in line
    for command in READS:
        assert _escalate(*command, "--store", pg_url, "--json").returncode == 0
    assert log_bytes(pg_url, "r") == before


@pytest.mark.parametrize("option", ["connect_timeout=abc", "options=-c%20search_path%3Dnowhere",
                                    "options=-c%20no_such_setting%3D1"])
def test_a_url_option_refused_is_exit_2_invalid_store_without_the_password(pg_url: str, option: str) -> None:
    assert _escalate("runs", "init", "r", "--cap", "10", "--store", pg_url).returncode == 0
    before = log_bytes(pg_url, "r")
    url = _with(url_of(_database(pg_url), password=PASSWORD), option)
    for command in (RESERVE, *READS):
        answer, line = _answers(command, url)
        assert (answer["exit_code"], answer["error"]) == (2, "invalid_store")
        assert PASSWORD not in line and "invalid store URL" in line
    assert log_bytes(pg_url, "r") == before


@pytest.mark.parametrize(("case", "code"), [("database", "unknown_database"), ("role", "unknown_role"),
                                            ("refused", "connection_failed")])
def test_no_connection_is_exit_8_with_its_own_code_and_nothing_written(
        pg_url: str, case: str, code: str) -> None:
    url = {"database": url_of("no_such_database", password=PASSWORD),
           "role": url_of(_database(pg_url), user="no_such_role", password=PASSWORD),
           "refused": f"postgresql://ledger:{PASSWORD}@127.0.0.1:{_free_port()}/budgets"}[case]
    for command in (RESERVE, *READS):
        answer, line = _answers(command, url)
        assert (answer["exit_code"], answer["error"], answer["commit_sent"]) == (8, code, False)
        assert "nothing was written" in line and "may be unknown" not in line
        assert PASSWORD not in line


def _cut_every_connection(url: str) -> None:
    with admin() as connection:
        connection.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = %s AND pid <> pg_backend_pid()", (_database(url),))


def test_a_read_cut_off_never_says_the_outcome_may_be_unknown(pg_url: str) -> None:
    writer = Ledger.init(pg_url, "r", cap="10", actor="tester")
    writer.reserve("a", "1")  # confirmed
    reader = Ledger.open(pg_url, "r")
    reader.state()
    _cut_every_connection(pg_url)
    with pytest.raises(StoreUnavailable) as read:
        reader.state()
    assert (read.value.code, read.value.commit_sent) == ("store_unavailable", False)
    assert "nothing was written" in read.value.message and "may be unknown" not in read.value.message
    _cut_every_connection(pg_url)
    with pytest.raises(StoreUnavailable) as after_a_write:
        writer.state()  # what the writer confirmed stands: no "nothing was written" either
    assert "what it confirmed before stands" in after_a_write.value.message
    assert "may be unknown" not in after_a_write.value.message
    assert writer.state().reserved_micros == 1_000_000



def test_a_member_runs_write_cut_at_its_pools_commit_may_be_unknown(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A member run's lines are written in a savepoint of its pool's transaction and go out
    with the pool's commit: lost there, the outcome may be unknown (never "nothing was
    written"), and the retry records the reservation once."""
    Pool.init(pg_url, "team", cap="10")
    member = Ledger.init(pg_url, "r", pool="team", cap="10", actor="tester")
    commits: list[str] = []

    def cut(step: str) -> None:
        if step == "before_commit":
            commits.append(step)
            if len(commits) == 2:  # the pool's, after the member run's savepoint
                _cut_every_connection(pg_url)

    monkeypatch.setattr(pg_store_module, "STEP_HOOK", cut)
    with pytest.raises(StoreUnavailable) as lost:
        member.reserve("t", "1")
    monkeypatch.setattr(pg_store_module, "STEP_HOOK", None)
    assert lost.value.commit_sent is True and "may be unknown" in lost.value.message
    assert member.reserve("t", "1")["status"] in ("reserved", "exists")
    assert Ledger.open(pg_url, "r").state().reserved_micros == 1_000_000
