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
import tempfile
from collections.abc import Mapping
from typing import Any

import orjson

from escalate.core.durations import format_duration


def run_hook(command: str, event: Mapping[str, Any], *, timeout_s: float) -> tuple[bool, str]:
    """Run ``command`` with ``event`` as JSON on stdin; failure or a hang only warns.

    Returns whether it succeeded and what happened (``exit 0``, ``exit 7``, ``timed out
    after 10s``, ``failed to start``), for the ``escalation_notified`` record: never the
    hook's output, which may hold anything (a webhook URL with its token).

    The hook runs in its own process group so that a timeout kills everything it
    started: a grandchild holding the pipes open would otherwise keep us waiting.
    """
    # The hook's stderr goes to a file, of which only the end is read: a hook that prints
    # without end can neither fill this process's memory nor block on a full pipe.
    with tempfile.TemporaryFile() as errors:
        try:
            hook = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=errors,
                                    start_new_session=True)
        except OSError as exc:
            _warn(f"notify command failed to start ({exc})")
            return False, "failed to start"
        try:
            hook.communicate(orjson.dumps(event), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(hook.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                hook.communicate(timeout=1)
            detail = f"timed out after {format_duration(timeout_s)}"
            _warn(f"notify command {detail} and was killed")
            return False, detail
        if hook.returncode != 0:
            from escalate.core.text import printable  # (only on this path: off the hot import path)

            last = _last_line(errors)
            _warn(f"notify command exited {hook.returncode}" + (f" ({printable(last, 200)})" if last else ""))
    return hook.returncode == 0, f"exit {hook.returncode}"


def _last_line(errors: Any) -> str:
    """The last line the hook wrote to stderr (from the file's last few KB)."""
    size = errors.seek(0, os.SEEK_END)
    errors.seek(max(0, size - 4096))
    lines = errors.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


def _warn(problem: str) -> None:
    print(f"escalate: warning: {problem}; the decision stands (the attempt is recorded, and "
          "'escalate sweep' delivers it again)", file=sys.stderr)
