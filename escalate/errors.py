"""One error hierarchy: every refusal carries its exit code, a stable code and the facts.

The CLI maps these to exit codes and JSON in one place; the library raises the same
objects, so a scheduler calling in-process sees exactly what a shell script sees.
"""

from __future__ import annotations

from typing import Any, ClassVar


class EscalateError(Exception):
    """Base of every error escalate reports on purpose.

    ``code`` is a stable machine word (``over_budget``, ``conflict`` …), ``exit_code``
    the CLI's exit status, ``facts`` the values a caller needs to decide what to do.
    """

    exit_code: ClassVar[int] = 1
    default_code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, code: str | None = None, **facts: Any) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.facts: dict[str, Any] = facts

    def to_json(self) -> dict[str, Any]:
        """The error as the one JSON object the CLI prints with ``--json``."""
        return {"error": self.code, "message": self.message, "exit_code": self.exit_code, **self.facts}


class InputError(EscalateError, ValueError):
    """Bad input: usage, an invalid amount or id, an unknown run (exit 2)."""

    exit_code = 2
    default_code = "invalid_input"


class InvalidAmount(InputError):
    default_code = "invalid_amount"


class InvalidId(InputError):
    default_code = "invalid_id"


class UnknownRun(InputError):
    default_code = "unknown_run"


class Refused(EscalateError):
    """The ledger said no: over a cap, halted or cancelled (exit 3)."""

    exit_code = 3
    default_code = "refused"


class Pending(EscalateError):
    """A human has to decide first: an open escalation, or a paused task (exit 4)."""

    exit_code = 4
    default_code = "escalation_open"


class Conflict(EscalateError):
    """The current state forbids the request (exit 5); the message says what the state is."""

    exit_code = 5
    default_code = "conflict"


class CorruptLedger(EscalateError):
    """The log breaks a rule of its own format; writers refuse (exit 6)."""

    exit_code = 6
    default_code = "corrupt_ledger"


class LockTimeout(EscalateError, TimeoutError):
    """The run's lock was not free within the timeout (exit 7)."""

    exit_code = 7
    default_code = "lock_timeout"
