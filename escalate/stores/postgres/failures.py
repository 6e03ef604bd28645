"""What a PostgreSQL failure means for a command, as escalate's errors: a URL the server
refuses as written is exit 2 (``invalid_store``); a read-only database, a missing database
or role, a connection that failed or was lost, no permission are exit 8, each with its code.
Each says whether anything may have been written: nothing, unless the connection was lost
after a write's commit was sent — only then may the outcome be unknown."""

from __future__ import annotations

import re
from typing import NamedTuple

import psycopg

from escalate.errors import EscalateError, StoreUnavailable
from escalate.stores.postgres.connect import NotConnected, first_line, invalid_url


class Refusal(NamedTuple):
    """Why no connection could be opened: a stable code, and what to do next."""

    code: str
    advice: str


# What a server says when it refuses a connection, in its words (its messages are English
# unless its lc_messages says otherwise: then the refusal is reported as connection_failed).
_REFUSALS = (
    (re.compile(r'database "[^"]*" does not exist'),
     Refusal(code="unknown_database", advice="create the database, or fix its name in the URL")),
    (re.compile(r'role "[^"]*" does not exist'),
     Refusal(code="unknown_role", advice="create the role, or fix the user name in the URL")),
)
_NO_CONNECTION = Refusal(code="connection_failed",
                         advice="check that the server runs and the host, port and login in the URL")
# An option of the URL the server refuses (-c bogus=1, -c statement_timeout=abc), or whose
# value libpq refuses before connecting (sslmode=bogus, a port past 65535): the URL is wrong,
# and exit 8's "retry" would send a script round for ever.
_REFUSED_OPTION = re.compile(r"configuration parameter|invalid value for parameter|invalid \w+ value|"
                             r"invalid port number|invalid integer value .* for connection option")
_READ_ONLY = ("is read-only (a hot standby, or default_transaction_read_only is on)",
              "give --store the primary server; commands that only read work here")


class Outcome(NamedTuple):
    """Where a command stood when it failed: whether its write's commit was sent and not
    confirmed, whether a write of it was confirmed before, and whether writes wait in its
    open transaction (a member run's, inside its pool's) for the commit."""

    commit_sent: bool = False
    confirmed: bool = False
    held: bool = False


def failure(exc: BaseException, where: str, password: str, outcome: Outcome) -> EscalateError | None:
    """escalate's error for psycopg's ``exc`` on the store ``where`` (never quoting
    ``password``); None for anything else (a bug: it is raised as it is)."""
    if isinstance(exc, psycopg.errors.InvalidSchemaName) or \
            (isinstance(exc, NotConnected) and _REFUSED_OPTION.search(str(exc))):
        return invalid_url(exc, password)  # also options=-c search_path=nowhere
    if isinstance(exc, NotConnected):
        text = str(exc)
        found = next((refusal for pattern, refusal in _REFUSALS if pattern.search(text)), _NO_CONNECTION)
        return unavailable(exc, where, password, Outcome(), code=found.code, advice=found.advice)
    answered = outcome._replace(commit_sent=False)  # the server said no: nothing was written
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        state, advice = _READ_ONLY
        return unavailable(exc, where, password, answered, code="read_only", state=state, advice=advice)
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return unavailable(exc, where, password, answered, code="permission_denied",
                           advice="grant the role its rights (see docs/scale-out.md)")
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return unavailable(exc, where, password, outcome)
    return None


def unavailable(exc: psycopg.Error, where: str, password: str, outcome: Outcome, *,
                code: str = "store_unavailable", advice: str = "check the server and the URL",
                state: str = "is unavailable") -> StoreUnavailable:
    """exit 8, one line: where, why, whether anything may have been written, and that a
    retry is safe."""
    cause = first_line(exc)
    if password:
        cause = cause.replace(password, "***")
    if outcome.commit_sent:
        return StoreUnavailable(
            f"the PostgreSQL store {where} was lost before it confirmed this command's commit "
            f"({cause}); the outcome of this command may be unknown: {advice}, then retry — "
            "repeating the same command is safe", code=code, path=where, errno=None, commit_sent=True)
    written = "what it confirmed before stands, nothing more was written" if outcome.confirmed \
        else "nothing was written"
    return StoreUnavailable(f"the PostgreSQL store {where} {state} ({cause}); {written}: {advice}, then "
                            "retry", code=code, path=where, errno=None, commit_sent=False)
