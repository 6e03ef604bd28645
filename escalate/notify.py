"""The notify hook: a shell command run with a new escalation's JSON on stdin.

It runs after the lock is released and after the write is durable; whatever it does —
fail, hang, print — only warns: the ledger is already unchanged by it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import orjson

from escalate.durations import format_duration


def run_hook(command: str, event: Mapping[str, Any], *, timeout_s: float) -> None:
    """Run ``command`` with ``event`` as JSON on stdin; failure or a hang only warns.

    The hook runs in its own process group so that a timeout kills everything it
    started: a grandchild holding the pipes open would otherwise keep us waiting.
    """
    try:
        hook = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
    except OSError as exc:
        _warn(f"notify command failed to start ({exc})")
        return
    try:
        _, stderr = hook.communicate(orjson.dumps(event), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(hook.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            hook.communicate(timeout=1)
        _warn(f"notify command timed out after {format_duration(timeout_s)} and was killed")
        return
    if hook.returncode != 0:
        detail = stderr.decode(errors="replace").strip().splitlines()
        _warn(f"notify command exited {hook.returncode}" + (f" ({detail[-1][:200]})" if detail else ""))


def _warn(problem: str) -> None:
    print(f"escalate: warning: {problem}; the ledger is unchanged", file=sys.stderr)
