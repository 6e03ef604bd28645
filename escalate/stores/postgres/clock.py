"""The PostgreSQL store's clock: one clock for a fleet (DESIGN §10). Every line's time — its
``ts``, so the pool period its money counts in, the deadlines it sets, the timeouts it
applies — is the database server's, read in the write's transaction with the row lock
(:class:`escalate.stores.postgres.transaction.PgTransaction`), or with one query outside a write. A
writer's own clock only decides whether it is warned that it is off."""

from __future__ import annotations

import contextlib
import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING

from escalate.config import Clock
from escalate.core.durations import format_duration

if TYPE_CHECKING:
    from escalate.stores.postgres.store import PgStore

# Tests that move time by hand on both stores set this, so that the writer's clock (a
# Ledger's ``clock=``) stands in for the server's; nothing else may: on this store a
# writer's clock never moves money.
WRITERS_CLOCK_STANDS_IN = False
# A writer whose own clock is further than this from the server's is warned (once per store).
SKEW_WARNING_S = 60


class ServerClock:
    """The time of a store's lines: what its server said, checked against a writer's clock."""

    def __init__(self) -> None:
        self._warned = False

    def now(self, store: PgStore, clock: Clock) -> datetime:
        """The server's time now (one query; inside a write, in its transaction)."""
        if WRITERS_CLOCK_STANDS_IN:
            return clock()
        with store.connection() as connection:
            row = connection.execute("SELECT clock_timestamp()").fetchone()
        assert row is not None
        return self.time(row[0], clock, store.where)

    def time(self, moment: datetime, clock: Clock, where: str, read_at: float | None = None) -> datetime:
        """``moment``, read from the server ``where`` (at ``read_at`` on the monotonic clock,
        if not just now), which every line's time is; a writer whose own ``clock`` is far off
        it is warned on stderr (once), and nothing else changes."""
        if WRITERS_CLOCK_STANDS_IN:
            return clock()
        if not self._warned:
            with contextlib.suppress(Exception):  # a clock that fails only loses the warning
                # (A long fold since the row was read is no skew.)
                since = 0.0 if read_at is None else time.monotonic() - read_at
                skew = (clock() - moment).total_seconds() - since
                if abs(skew) > SKEW_WARNING_S:
                    self._warned = True
                    print(f"escalate: warning: this machine's clock is "
                          f"{format_duration(abs(skew), exact=False)} "
                          f"{'ahead of' if skew > 0 else 'behind'} the clock of {where}; the "
                          "server's clock times every line, so nothing changes — synchronise this "
                          "machine's clock (NTP)", file=sys.stderr)
        return moment
