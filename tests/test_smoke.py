from pathlib import Path

from escalate import Ledger


def test_reserve_release_round_trip(runs_dir: Path) -> None:
    run = Ledger.init(runs_dir, "r1", cap="1")
    assert run.reserve("t", "0.4")["status"] == "reserved"
    assert run.release("t", "0.3")["status"] == "released"
    assert run.state().spent_micros == 300_000
