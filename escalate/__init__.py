"""escalate: keep the money of concurrent work honest.

``from escalate import Ledger`` gives the library; the ``escalate`` command is a thin
layer over it. Names load lazily so the CLI's hot commands import only what they use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from escalate._version import __version__

if TYPE_CHECKING:
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
        UnknownRun,
    )
    from escalate.money import Micros
    from escalate.service import Ledger

__all__ = [
    "Conflict",
    "CorruptLedger",
    "EscalateError",
    "InputError",
    "InvalidAmount",
    "InvalidId",
    "Ledger",
    "LockTimeout",
    "Micros",
    "Pending",
    "Refused",
    "StoreUnavailable",
    "UnknownRun",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "Ledger":
        from escalate.service import Ledger

        return Ledger
    if name == "Micros":
        from escalate.money import Micros

        return Micros
    if name in __all__:
        from escalate import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'escalate' has no attribute {name!r}")
