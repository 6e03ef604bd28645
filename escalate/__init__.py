"""escalate: keep the money of concurrent work honest.

``from escalate import Ledger`` gives the library (and ``check_gate``, ``list_runs``, ``inbox``,
``sweep_all``, ``verify_report`` for CI and for many runs); the ``escalate`` command is a thin
layer over it. Names load lazily so the CLI's hot commands import only what they use.
"""

from __future__ import annotations

# Not typing's TYPE_CHECKING: the console script imports this package before anything else,
# while the collector still runs (escalate.__main__ pauses it), and loading typing then costs
# a command its collections; type checkers read this constant as typing's.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from escalate._version import __version__
    from escalate.core.money import Micros
    from escalate.errors import (
        Conflict,
        CorruptLedger,
        EscalateError,
        InputError,
        InvalidAmount,
        InvalidId,
        LockTimeout,
        Pending,
        Refused,
        StoreUnavailable,
        TotalLimit,
        UnknownRun,
    )
    from escalate.reports.gate import GateResult, check_gate
    from escalate.reports.inbox import inbox
    from escalate.reports.runs import list_runs, sweep_all, verify_report
    from escalate.service import Ledger

__all__ = [
    "Conflict",
    "CorruptLedger",
    "EscalateError",
    "GateResult",
    "InputError",
    "InvalidAmount",
    "InvalidId",
    "Ledger",
    "LockTimeout",
    "Micros",
    "Pending",
    "Refused",
    "StoreUnavailable",
    "TotalLimit",
    "UnknownRun",
    "__version__",
    "check_gate",
    "inbox",
    "list_runs",
    "sweep_all",
    "verify_report",
]

# Where each lazily loaded name lives (the errors are in escalate.errors).
_HOMES = {"__version__": "escalate._version", "Ledger": "escalate.service", "Micros": "escalate.core.money",
          "GateResult": "escalate.reports.gate", "check_gate": "escalate.reports.gate",
          "inbox": "escalate.reports.inbox", "list_runs": "escalate.reports.runs",
          "sweep_all": "escalate.reports.runs", "verify_report": "escalate.reports.runs"}


def __getattr__(name: str) -> Any:
    if name in __all__:
        import importlib

        return getattr(importlib.import_module(_HOMES.get(name, "escalate.errors")), name)
    raise AttributeError(f"module 'escalate' has no attribute {name!r}")
