"""One clock for a fleet (DESIGN §10): on the PostgreSQL store every line's time — its
``ts``, so the pool period its money counts in, escalation deadlines, timeouts — is the
database server's, read in the write's transaction. A writer whose own clock is a day ahead
moves no money there; it is only warned. On the file store the clock is the machine's
(docs/escalation.md, "What a wrong clock can and cannot do")."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import psycopg
import pytest

from escalate import Ledger
from escalate.config import Clock
from escalate.core.events import format_ts
from escalate.errors import Pending, Refused
from escalate.pools.pool import Pool
from tests.conftest import log_bytes

DAY = 86_400
HOUR = 3600


def server_now(url: str) -> str:
    with psycopg.connect(url) as connection:
        row = connection.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return format_ts(row[0])


def stamps(url: str, run_id: str) -> list[str]:
    return [orjson.loads(line)["ts"] for line in log_bytes(url, run_id).splitlines()]


def noon_zone(now: datetime) -> str:
    """A fixed-offset zone where it is about noon now: no day boundary near this test."""
    offset = 12 - now.hour  # -11 … +12 hours; Etc/GMT-N is N hours ahead of UTC
    return f"Etc/GMT{-offset:+d}" if offset else "UTC"


def ahead(days: float) -> Clock:
    """A writer's own clock that runs ``days`` ahead of the real time."""
    return lambda: datetime.now(UTC) + timedelta(days=days)


def test_a_writer_a_day_ahead_writes_the_servers_time_and_is_warned(
        server_clock_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    pg_url = server_clock_url
    before = server_now(pg_url)
    run = Ledger.init(pg_url, "r", cap="10", clock=ahead(1))
    run.reserve("a", "1")
    run.release("a", "1")
    after = server_now(pg_url)
    times = stamps(pg_url, "r")
    assert len(times) == 3 and all(before <= ts <= after for ts in times), (before, times, after)
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and "clock is 1d ahead of the clock of" in warnings[0]
    assert "nothing changes" in warnings[0]


def test_a_writer_a_day_ahead_cannot_spend_tomorrows_pool_budget(server_clock_url: str) -> None:
    pg_url = server_clock_url
    zone = noon_zone(datetime.now(UTC))
    Pool.init(pg_url, "team", cap="10", period="day", tz=zone)
    Ledger.init(pg_url, "r1", pool="team", cap="10")
    Ledger.init(pg_url, "r2", pool="team", cap="10")
    Ledger.open(pg_url, "r1").reserve("c", "10")  # today's $10 used
    with pytest.raises(Refused) as refused:
        Ledger.open(pg_url, "r2", clock=ahead(1)).reserve("c", "10")
    assert refused.value.code == "over_pool_budget"
    shown = Pool.open(pg_url, "team", clock=ahead(1)).show()  # today's period, by the server
    assert shown["period_start"] <= server_now(pg_url) < shown["period_end"]
    assert (shown["committed_micros"], shown["remaining_micros"]) == (10_000_000, 0)
    # A writer whose clock is right afterwards is not dragged into tomorrow either.
    Ledger.open(pg_url, "r1").release("c", "4")
    assert Ledger.open(pg_url, "r2").reserve("d", "6")["pool_remaining_micros"] == 0


def _escalating(store: Path | str, clock: Clock | None = None) -> tuple[Ledger, str]:
    run = Ledger.init(store, "r", cap="10", escalation="enforce", approval_threshold="1",
                      escalation_timeout_s=HOUR, **({"clock": clock} if clock else {}))
    with pytest.raises(Pending) as pending:
        run.reserve("big", "2")
    return run, str(pending.value.escalation_id)


def test_deadlines_and_timeouts_follow_the_servers_clock(server_clock_url: str) -> None:
    pg_url = server_clock_url
    before = server_now(pg_url)
    run, escalation_id = _escalating(pg_url, ahead(1))  # opened by a writer a day ahead
    expires_at = run.state().escalations[escalation_id].expires_at
    assert expires_at is not None and expires_at < format_ts(datetime.now(UTC) + timedelta(hours=2))
    assert expires_at > before
    # A writer two hours ahead does not time it out: the server says it has 58 minutes left.
    assert Ledger.open(pg_url, "r", clock=ahead(2 / 24)).sweep()["expired"] == []
    with pytest.raises(Pending) as still_open:  # nor does its wait, which follows the server
        Ledger.open(pg_url, "r", clock=ahead(2 / 24)).wait(escalation_id, timeout_s=0.2)
    assert still_open.value.code == "escalation_open"
    assert run.state().escalations[escalation_id].state == "open"


def test_on_the_file_store_the_machines_clock_times_the_lines(runs_dir: Path) -> None:
    """The contrast, documented: a runs folder has only the machine's clock, and a process
    whose clock is two hours ahead times out an escalation with one hour to run."""
    run, escalation_id = _escalating(runs_dir)
    assert Ledger.open(runs_dir, "r", clock=ahead(2 / 24)).sweep()["expired"] == [escalation_id]
    assert run.state().escalations[escalation_id].by == "timeout"
