"""The notify hook: a shell command run with a new escalation's JSON on stdin.

It runs after the lock is released and after the write is durable; whatever it does —
fail, hang, print — only warns: the decision is already made and answered. The service
records each attempt afterwards (``escalation_notified``) from what this returns.
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


def run_hook(command: str, event: Mapping[str, Any], *, timeout_s: float) -> tuple[bool, str]:
    """Run ``command`` with ``event`` as JSON on stdin; failure or a hang only warns.

    Returns whether it succeeded and what happened (``exit 0``, ``exit 7``, ``timed out
    after 10s``, ``failed to start``), for the ``escalation_notified`` record: never the
    hook's output, which may hold anything (a webhook URL with its token).

    The hook runs in its own process group so that a timeout kills everything it
    started: a grandchild holding the pipes open would otherwise keep us waiting.
    """
    try:
        hook = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
    except OSError as exc:
        _warn(f"notify command failed to start ({exc})")
        return False, "failed to start"
    try:
        _, stderr = hook.communicate(orjson.dumps(event), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(hook.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            hook.communicate(timeout=1)
        detail = f"timed out after {format_duration(timeout_s)}"
        _warn(f"notify command {detail} and was killed")
        return False, detail
    if hook.returncode != 0:
        lines = stderr.decode(errors="replace").strip().splitlines()
        _warn(f"notify command exited {hook.returncode}" + (f" ({lines[-1][:200]})" if lines else ""))
    return hook.returncode == 0, f"exit {hook.returncode}"


def _warn(problem: str) -> None:
    print(f"escalate: warning: {problem}; the decision stands (the attempt is recorded, and "
          "'escalate sweep' delivers it again)", file=sys.stderr)
