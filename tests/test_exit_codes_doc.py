"""docs/exit-codes.md names every error code escalate can answer with: a script that
branches on ``error`` finds each one there."""

from __future__ import annotations

import re
from pathlib import Path

import escalate

ROOT = Path(escalate.__file__).parent


def test_every_error_code_is_in_the_exit_codes_page() -> None:
    codes = {code for path in ROOT.rglob("*.py")
             for code in re.findall(r'\bcode="([a-z_]+)"', path.read_text(encoding="utf-8"))}
    page = (ROOT.parent / "docs" / "exit-codes.md").read_text(encoding="utf-8")
    assert len(codes) > 30
    assert {code for code in codes if f"`{code}`" not in page} == set()
