"""The PostgreSQL server of the tests: ``$ESCALATE_TEST_POSTGRES_URL``, or a throwaway one
(:mod:`tests.pg_throwaway`, well under a second), once per test session; the ``pg_server``
fixture of ``conftest.py`` uses it too.

:func:`fresh_database` gives each test its own empty database on it, so tests never see
each other's ledgers; the ``pg_url`` fixture is that, as a URL.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from tests.pg_throwaway import ThrowawayServer

_names = itertools.count(1)


@functools.cache
def server() -> tuple[str, Path | None]:
    """The session's server: its URL (of its ``postgres`` database) and, for a throwaway one
    (:mod:`tests.pg_throwaway`, removed when the process ends), its data folder (None for a
    server given by ``$ESCALATE_TEST_POSTGRES_URL``)."""
    given = os.environ.get("ESCALATE_TEST_POSTGRES_URL")
    if given:
        return given, None
    started = ThrowawayServer()
    atexit.register(started.remove)
    started.start()
    return started.url(), started.pgdata


def url_of(database: str, *, user: str | None = None, password: str | None = None) -> str:
    """The server's URL with another database (and user) in it."""
    parts = urlsplit(server()[0])
    login = parts.netloc.rpartition("@")
    netloc = login[2]
    name = user or (login[0].split(":")[0] if login[1] else "")
    if name:
        netloc = f"{name}{':' + password if password is not None else ''}@{netloc}"
    return urlunsplit((parts.scheme, netloc, f"/{database}", parts.query, parts.fragment))


def admin() -> psycopg.Connection[tuple[object, ...]]:
    """A connection to the server's ``postgres`` database, in autocommit mode."""
    return psycopg.connect(server()[0], autocommit=True)


def fresh_database() -> str:
    """The URL of a new, empty database."""
    name = f"escalate_test_{os.getpid()}_{next(_names)}"
    with admin() as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {name}")
        connection.execute(f"CREATE DATABASE {name}")
    return url_of(name)


@pytest.fixture
def pg_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A new database's URL; the ESCALATE_* variables a test could inherit are cleared, and
    a test's clock stands in for the server's (as with ``tests.conftest.pg_url``)."""
    monkeypatch.setattr("escalate.stores.postgres.clock.WRITERS_CLOCK_STANDS_IN", True)
    for name in ("ESCALATE_STORE", "ESCALATE_RUNS_DIR", "ESCALATE_NOTIFY_CMD", "ESCALATE_LOCK_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ESCALATE_ACTOR", "tester")
    url = fresh_database()
    yield url
    name = urlsplit(url).path.lstrip("/")
    with admin() as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
