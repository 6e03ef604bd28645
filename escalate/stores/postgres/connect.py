"""Connecting to the PostgreSQL store: a URL's connection, and how a server, a failure and
a connection are named in a message (never with the password)."""

from __future__ import annotations

import functools
import logging
import os
import re
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from escalate.errors import InputError

if TYPE_CHECKING:
    from escalate.stores.postgres.transaction import Connection


class ConnectionPool(Protocol):
    """Any pool that lends connections with ``with pool.connection() as conn`` (such as
    ``psycopg_pool.ConnectionPool``)."""

    def connection(self) -> AbstractContextManager[Connection]: ...


# Without these, a server that vanishes from the network (a partition, a dead host) leaves
# a command waiting on TCP's own timeouts, for many minutes. (libpq option: value; the
# environment variable that, when set, is left to say it instead.)
_DEFAULTS = {
    "connect_timeout": ("10", "PGCONNECT_TIMEOUT"),  # libpq waits for ever to connect
    "keepalives": ("1", None),
    "keepalives_idle": ("30", None),
    "keepalives_interval": ("10", None),
    "keepalives_count": ("3", None),
    "tcp_user_timeout": ("60000", None),  # ms an unacknowledged write may wait
}


class NotConnected(psycopg.OperationalError):
    """No connection could be opened: nothing was sent, so nothing was written."""


@functools.cache
def quiet_psycopg_log() -> None:
    """psycopg logs an error it ignores while closing a pipeline on a lost connection; with no
    handler Python prints it on stderr, a second line beside the one-line exit 8. Done once,
    when the first store is made (importing this module changes nothing)."""
    logging.getLogger("psycopg").addHandler(logging.NullHandler())


def connect(url: str) -> Connection:
    """A new connection in autocommit mode (each command opens its own transaction), with
    bounded waits: 10 s to connect, and a server gone silent noticed within about a minute
    (TCP keepalives, ``tcp_user_timeout``), unless the URL (or ``PGCONNECT_TIMEOUT``) says
    otherwise. A URL whose options the driver rejects is :class:`InputError` (exit 2); a
    connection that could not be opened, :class:`NotConnected`."""
    given = conninfo_to_dict(url)
    options = {name: value for name, (value, variable) in _DEFAULTS.items()
               if name not in given and not (variable and os.environ.get(variable))}
    try:
        return psycopg.connect(make_conninfo(url, **options), autocommit=True)
    except psycopg.ProgrammingError as exc:  # such as connect_timeout=abc
        raise invalid_url(exc, str(given.get("password") or "")) from None
    except psycopg.OperationalError as exc:
        raise NotConnected(str(exc)) from None


def invalid_url(exc: Exception, password: str) -> InputError:
    """exit 2 for a URL the driver or the server refuses as written (an option's value),
    quoting what it says without the password."""
    cause = first_line(exc)
    if password:
        cause = cause.replace(password, "***")
    return InputError(f"invalid store URL ({cause}); fix the option in the URL, written as "
                      "postgresql://user@host:port/database?option=value", code="invalid_store")


def in_transaction(connection: Connection) -> bool:
    return connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE


def first_line(exc: Exception) -> str:
    """What psycopg says, in one line, the password of any URL in it (``://user:password@``)
    blanked."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def describe(info: dict[str, Any]) -> str:
    """``postgresql://host:port/database``, never the user's password."""
    host = str(info.get("host") or "localhost").split(",")[0]
    port = str(info.get("port") or "").split(",")[0]
    database = info.get("dbname") or info.get("user") or ""
    if host.startswith("/"):  # a Unix socket's folder, written as libpq's URLs write it
        return f"postgresql:///{database}?host={host}"
    return f"postgresql://{host}{':' + port if port else ''}/{database}"


def parse_url(url: str) -> dict[str, Any]:
    """The parts of a store URL; :class:`InputError` (exit 2) when it cannot be one. What
    libpq says is quoted without the pieces of the URL it names: one may be the password."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        cause = re.sub(r'"[^"]*"', '"…"', first_line(exc))
        raise InputError(f"invalid store URL ({cause}); write it as postgresql://user@host:port/database, "
                         "with % in a password written as %25", code="invalid_store") from None
    ports = str(info.get("port") or "").split(",")
    if any(port and not port.isdigit() for port in ports):
        raise InputError(f"invalid store URL (the port {info['port']!s:.40} is not a number); write it as "
                         "postgresql://user@host:port/database", code="invalid_store")
    return info
