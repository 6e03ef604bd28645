"""Connecting to the PostgreSQL store: a URL's connection, and how a server, a failure and
a connection are named in a message (never with the password)."""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager
from typing import Any, Protocol

import psycopg
from psycopg.conninfo import conninfo_to_dict

from escalate.pg_transaction import Connection


class ConnectionPool(Protocol):
    """Any pool that lends connections with ``with pool.connection() as conn`` (such as
    ``psycopg_pool.ConnectionPool``)."""

    def connection(self) -> AbstractContextManager[Connection]: ...


def connect(url: str) -> Connection:
    """A new connection in autocommit mode (each command opens its own transaction). It
    waits 10 s at most to connect unless the URL or ``PGCONNECT_TIMEOUT`` says otherwise
    (libpq's own default is to wait for ever)."""
    if "connect_timeout" in conninfo_to_dict(url) or os.environ.get("PGCONNECT_TIMEOUT"):
        return psycopg.connect(url, autocommit=True)
    return psycopg.connect(url, autocommit=True, connect_timeout=10)


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


