"""Shared fixtures: a private runs root, a CLI runner with a fixed width, a settable clock."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from escalate.cli import app


@pytest.fixture
def runs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty runs root, also set as ESCALATE_RUNS_DIR so CLI calls land there."""
    root = tmp_path / "runs"
    monkeypatch.setenv("ESCALATE_RUNS_DIR", str(root))
    monkeypatch.setenv("ESCALATE_ACTOR", "tester")
    monkeypatch.delenv("ESCALATE_NOTIFY_CMD", raising=False)
    monkeypatch.delenv("ESCALATE_LOCK_TIMEOUT", raising=False)
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setenv("NO_COLOR", "1")
    return root


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
    """Every file under ``root`` with its bytes, to assert that nothing changed."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
