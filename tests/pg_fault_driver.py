"""One escalate command as a real process that stops at a step of its transaction on the
PostgreSQL store, for tests/test_pg_faults.py.

    python tests/pg_fault_driver.py STEP escalate-args...

The store comes from ``ESCALATE_STORE``. When the command's transaction reaches ``STEP``
(one of ``escalate.stores.postgres.store``'s steps), this prints ``at STEP`` on stdout and waits for a line
on stdin: meanwhile the test cuts the connection, stops the server, or kills this process.
Then the command goes on, and this process exits with the command's exit code.
"""

from __future__ import annotations

import sys

from escalate.cli import app
from escalate.stores.postgres import store as pg_store


def main() -> None:
    step, args = sys.argv[1], sys.argv[2:]
    held = False

    def hook(name: str) -> None:
        nonlocal held
        if name == step and not held:  # the first time only: a retried decision goes on
            held = True
            sys.stdout.write(f"at {name}\n")
            sys.stdout.flush()
            sys.stdin.readline()

    pg_store.STEP_HOOK = hook
    app(args, prog_name="escalate")


if __name__ == "__main__":
    main()
