"""``escalate runs archive``: retire a finished run (docs/pools.md: an archived member's money
stays in its pool's count)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from escalate.cli import (
    ByOption,
    JsonOption,
    LockTimeoutOption,
    RunArg,
    RunsDirOption,
    echo_line,
    open_ledger,
    respond,
)


def archive(
    run: RunArg,
    runs_dir: RunsDirOption = None,
    lock_timeout: LockTimeoutOption = None,
    by: ByOption = None,
    json_out: JsonOption = False,
) -> None:
    """Retire RUN for good once it is finished (no reservation held, no escalation open): it
    leaves 'runs list' (see it with --all), its log stays readable and verifiable, it takes no
    more writes, and in a pool its money stays counted. Never move a run folder away instead."""

    def action() -> Mapping[str, Any]:
        return open_ledger(run, runs_dir, lock_timeout, by).archive()

    def human(result: dict[str, Any]) -> None:
        done = "was already archived" if result["status"] == "exists" else "archived"
        echo_line(f"run {result['run']} {done}; 'escalate runs list --all' lists it, "
                  f"'escalate runs show {result['run']}' still shows it")

    respond(json_out, action, human)
