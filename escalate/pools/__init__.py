"""Budgets over many runs and periods: ``from escalate.pools import Pool, list_pools,
verify_pool`` (loaded lazily, so a write to a member run loads only what it uses)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from escalate.pools.pool import Pool, list_pools, verify_pool

__all__ = ["Pool", "list_pools", "verify_pool"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from escalate.pools import pool

        return getattr(pool, name)
    raise AttributeError(f"module 'escalate.pools' has no attribute {name!r}")
