"""What people read: exact money in every message and summary, and names from the log that
cannot inject Markdown, HTML or a GitHub workflow command."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

HOSTILE_BY = "**Approved by CFO** [policy](https://example.com/p) <img src=x onerror=alert(1)> `x` | y"


def test_money_under_a_cent_is_shown_exactly(cli: Any, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli("runs", "init", "r", "--cap", "1").exit_code == 0
    assert cli("reserve", "r", "t", "--estimate", "1").exit_code == 0
    released = cli("release", "r", "t", "--actual", "1.004")
    assert released.exit_code == 0
    assert released.stdout.strip() == "released t: $1.004 actual of $1.00 reserved (remaining -$0.004)"

    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    gate = cli("gate", "r")
    assert gate.exit_code == 3
    assert "spent $1.004 is over the cap $1.00" in gate.stderr
    assert "::error title=escalate gate::run r: spent $1.004 is over the cap $1.00" in gate.stdout
    written = summary.read_text(encoding="utf-8")
    assert "| spent | $1.004 |" in written and "| remaining | -$0.004 |" in written
    for shown in (released.stdout, gate.stdout, gate.stderr, written, cli("runs", "show", "r").stdout):
        assert "-$0.00 " not in shown and "-$0.00)" not in shown and "$1.00 actual" not in shown


def test_a_share_under_the_cap_never_reads_as_full(cli: Any) -> None:
    assert cli("runs", "init", "r", "--cap", "1").exit_code == 0
    assert cli("reserve", "r", "t", "--estimate", "0.9996").exit_code == 0
    outputs = [cli("runs", "show", "r").stdout, cli("runs", "show", "r", "--format", "markdown").stdout,
               cli("runs", "list").stdout, cli("gate", "r").stderr]
    for shown in outputs:
        assert "99%" in shown and "100%" not in shown, shown


def test_an_approver_name_cannot_inject_markdown_or_html(cli: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli("runs", "init", "r", "--cap", "5", "--task-cap", "5", "--escalation", "enforce",
               "--max-extension", "5", "--approval-threshold", "1").exit_code == 0
    assert cli("reserve", "r", "t", "--estimate", "2").exit_code == 4
    assert cli("approve", "r", "esc-2", "--by", HOSTILE_BY).exit_code == 0

    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    cli("gate", "r")
    shown = cli("runs", "show", "r", "--format", "markdown", "--events", "5").stdout
    for markdown in (summary.read_text(encoding="utf-8"), shown):
        row = next(line for line in markdown.splitlines() if line.startswith("| esc-2 "))
        # Five cells, whatever the name holds, and the name reads back exactly when unescaped.
        assert len(re.findall(r"(?<!\\)\|", row)) == 6, row
        assert not re.search(r"(?<!\\)<img", markdown)
        assert "**Approved" not in markdown and "[policy](" not in markdown
        assert _unescaped(row.split(" by ", 1)[1].rsplit(" |", 1)[0]) == HOSTILE_BY


def _unescaped(markdown: str) -> str:
    return re.sub(r"\\(.)", r"\1", markdown)


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=80))
def test_a_markdown_cell_shows_its_value_and_nothing_else(value: str) -> None:
    from escalate.reports.report import _cell

    cell = _cell(value)
    if value.isprintable():
        assert _unescaped(cell) == value
    # Every character with a meaning in Markdown or HTML is escaped.
    assert not re.search(r"(?<!\\)[*_\[\]<>|`~&$]", cell.replace("\\\\", "")), cell


def test_an_annotation_cannot_be_forged() -> None:
    from escalate.reports.gate import github_annotation

    line = github_annotation("error", "run r: 100% over\n::error::forged\r%0A")
    assert line == "::error title=escalate gate::run r: 100%25 over%0A::error::forged%0D%250A"
