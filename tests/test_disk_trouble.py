"""Disk trouble on a real small file system: a full disk, a read-only mount, an I/O error,
and run files that are not what escalate made (a folder, a FIFO, a hard link).

Each names the file and the cause with its own exit code (8 for the environment, 2 for
something escalate never made), and never makes a run unwritable for good.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from escalate import EscalateError, Ledger, StoreUnavailable
from escalate.errors import storage_error
from escalate.stores.file.log import LOG_NAME, TORN_PREFIX


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (needs root; skipped where mounting is not allowed)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(disk: Path) -> Path:
    """Take every free block of ``disk``; returns the file to delete to free them."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 1024)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def _escalate(runs_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "escalate", *args, "--json", "--runs-dir", str(runs_dir)],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "ESCALATE_ACTOR": "tester"})


def test_a_full_disk_is_exit_8_disk_full_naming_the_file_and_passes_once_freed(small_disk: Path) -> None:
    runs_dir = small_disk / "runs"
    Ledger.init(runs_dir, "r", cap="1000", actor="tester")
    filler = _fill(small_disk)
    with pytest.raises(StoreUnavailable) as raised:
        for task in range(100):  # the log's last page fills up after a few lines
            Ledger.open(runs_dir, "r", actor="tester").reserve(f"t{task}", "1")
    assert raised.value.code == "disk_full" and raised.value.exit_code == 8
    assert str(runs_dir / "r") in raised.value.message and "disk is full" in raised.value.message
    done = _escalate(runs_dir, "reserve", "r", "again", "--estimate", "1")
    assert done.returncode == 8, done.stderr
    assert orjson.loads(done.stdout)["error"] == "disk_full"
    assert done.stderr.startswith(f"escalate: cannot use {runs_dir / 'r'}/")
    assert "free some space" in done.stderr
    filler.unlink()
    assert Ledger.open(runs_dir, "r", actor="tester").reserve("again", "1")["status"] == "reserved"
    assert Ledger.open(runs_dir, "r").verify().problems == []


def test_failed_copies_of_a_torn_tail_never_make_the_run_unwritable(small_disk: Path) -> None:
    runs_dir = small_disk / "runs"
    Ledger.init(runs_dir, "r", cap="1000", actor="tester")
    torn = b'{"v":1,"seq":2,"ts":'
    with (runs_dir / "r" / LOG_NAME).open("ab") as log:
        log.write(torn)
    filler = _fill(small_disk)
    codes = set()
    for _ in range(1001):  # more than there are names for side files at one offset
        try:
            Ledger.open(runs_dir, "r", actor="tester").reserve("t", "1")
        except (EscalateError, OSError) as error:
            codes.add(getattr(error, "code", type(error).__name__))
    assert codes == {"disk_full"}
    assert len(list((runs_dir / "r").glob(TORN_PREFIX + "*"))) <= 1  # an empty copy is reused
    filler.unlink()
    assert Ledger.open(runs_dir, "r", actor="tester").reserve("t", "1")["status"] == "reserved"
    [recovery] = [e for e in Ledger.open(runs_dir, "r").events()[0] if e["type"] == "recovery"]
    assert (runs_dir / "r" / recovery["saved_to"]).read_bytes() == torn
    assert sorted(p.name for p in (runs_dir / "r").glob(TORN_PREFIX + "*")) == [recovery["saved_to"]]


def test_on_a_read_only_mount_reading_answers_work_and_a_write_is_exit_8_read_only(
        small_disk: Path) -> None:
    runs_dir = small_disk / "runs"
    Ledger.init(runs_dir, "r", cap="10", actor="tester").reserve("t1", "1")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        repeat = _escalate(runs_dir, "reserve", "r", "t1", "--estimate", "1")
        assert repeat.returncode == 0, repeat.stderr
        assert orjson.loads(repeat.stdout)["status"] == "exists"
        for args in (("runs", "show", "r"), ("runs", "verify", "r"), ("gate", "r")):
            assert _escalate(runs_dir, *args).returncode == 0, args
        write = _escalate(runs_dir, "reserve", "r", "t2", "--estimate", "1")
        assert write.returncode == 8, write.stderr
        assert orjson.loads(write.stdout)["error"] == "read_only"
        assert str(runs_dir / "r" / LOG_NAME) in write.stderr and "read-only" in write.stderr
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)


def test_a_torn_tail_on_a_read_only_mount_still_lets_repeats_answer(small_disk: Path) -> None:
    """A repeat needs no write: it answers and leaves the torn tail for the next writer."""
    runs_dir = small_disk / "runs"
    run = Ledger.init(runs_dir, "r", cap="10", actor="tester")
    run.reserve("t1", "1")
    run.reserve("t2", "1")
    run.release("t2", "0.5")
    log = runs_dir / "r" / LOG_NAME
    with log.open("ab") as handle:
        handle.write(b'{"v":1,"seq')  # a writer's crash mid-line
    before = log.read_bytes()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        for args in (("reserve", "r", "t1", "--estimate", "1"), ("release", "r", "t2", "--actual", "0.5")):
            repeat = _escalate(runs_dir, *args)
            assert repeat.returncode == 0, repeat.stderr
            assert orjson.loads(repeat.stdout)["status"] == "exists"
        write = _escalate(runs_dir, "reserve", "r", "t3", "--estimate", "1")
        assert write.returncode == 8 and orjson.loads(write.stdout)["error"] == "read_only"
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert log.read_bytes() == before
    assert Ledger.open(runs_dir, "r").reserve("t3", "1")["status"] == "reserved"  # recovers it now
    assert Ledger.open(runs_dir, "r").verify().problems == []


_EIO_ON_WRITE = """
import errno, os, sys
def failing_write(fd, data):
    raise OSError(errno.EIO, os.strerror(errno.EIO))
os.write = failing_write
from escalate.cli import main
sys.argv = ["escalate", *sys.argv[1:]]
main()
"""


def test_an_io_error_is_exit_8_io_error_naming_the_log(tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    Ledger.init(runs_dir, "r", cap="10", actor="tester")
    done = subprocess.run([sys.executable, "-c", _EIO_ON_WRITE, "reserve", "r", "t", "--estimate", "1",
                           "--json", "--runs-dir", str(runs_dir)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 8, done.stderr
    assert orjson.loads(done.stdout)["error"] == "io_error"
    assert f"cannot use {runs_dir / 'r' / LOG_NAME}: an I/O error" in done.stderr


def test_storage_errors_name_the_file_and_the_cause() -> None:
    for number, code in ((errno.ENOSPC, "disk_full"), (errno.EDQUOT, "disk_full"), (errno.EROFS, "read_only"),
                         (errno.EIO, "io_error"), (errno.EACCES, "permission_denied"),
                         (errno.ENAMETOOLONG, "io_error")):
        error = storage_error(OSError(number, os.strerror(number)), Path("runs/r/events.ndjson"))
        assert (error.code, error.exit_code) == (code, 8)
        assert error.message.startswith("cannot use runs/r/events.ndjson: ") and "retry" in error.message


def test_a_runs_dir_that_is_a_file_is_exit_2(cli: Any, runs_dir: Path) -> None:
    runs_dir.parent.mkdir(exist_ok=True)
    runs_dir.write_text("not a folder")
    for args in (("reserve", "r", "t", "--estimate", "1"), ("runs", "show", "r"),
                 ("runs", "init", "r", "--cap", "1")):
        result = cli(*args, "--json")
        assert result.exit_code == 2, (args, result)
        assert str(runs_dir) in result.stderr and result.json()["error"] in {"not_a_folder", "no_runs_dir"}
    assert runs_dir.read_text() == "not a folder"


def test_a_log_that_is_a_folder_or_a_fifo_is_named_and_refused(runs_dir: Path) -> None:
    for name, make in (("folder", os.mkdir), ("fifo", os.mkfifo)):
        (runs_dir / name).mkdir(parents=True)
        make(runs_dir / name / LOG_NAME)
        for args in (("runs", "init", name, "--cap", "1"), ("reserve", name, "t", "--estimate", "1"),
                     ("runs", "show", name)):
            # (A FIFO used to block 'runs init' forever, holding the run's lock.)
            done = _escalate(runs_dir, *args)
            assert done.returncode == 2, (name, args, done.stderr)
            assert orjson.loads(done.stdout)["error"] == "not_a_file"
            kind = "FIFO" if name == "fifo" else "folder"
            assert f"{runs_dir / name / LOG_NAME} is a {kind}" in done.stderr


def test_a_hard_linked_log_or_lock_is_not_written(runs_dir: Path, tmp_path: Path) -> None:
    for name in (LOG_NAME, LOG_NAME + ".lock"):
        run_id = "log" if name == LOG_NAME else "lock"
        Ledger.init(runs_dir, run_id, cap="10", actor="tester")
        elsewhere = tmp_path / f"elsewhere-{run_id}"
        os.link(runs_dir / run_id / name, elsewhere)
        before = elsewhere.read_bytes()
        with pytest.raises(EscalateError) as raised:
            Ledger.open(runs_dir, run_id, actor="tester").reserve("t", "1")
        assert (raised.value.code, raised.value.exit_code) == ("hard_link", 2)
        assert str(runs_dir / run_id / name) in raised.value.message
        assert elsewhere.read_bytes() == before


def test_a_runs_dir_under_a_file_is_exit_2_and_writes_nothing(
        cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    runs = blocker / "x"
    monkeypatch.setenv("ESCALATE_RUNS_DIR", str(runs))
    expected = {"error": "no_runs_dir", "exit_code": 2, "runs_dir": str(runs),
                "message": f"the runs folder {runs} is inside {blocker}, which is a file; give a folder "
                           "with --runs-dir or ESCALATE_RUNS_DIR"}
    for args in (("runs", "init", "q", "--cap", "1"), ("reserve", "q", "t", "--estimate", "1"),
                 ("runs", "show", "q"), ("runs", "list"), ("sweep",), ("store", "init"),
                 ("pools", "init", "p", "--cap", "1")):
        result = cli(*args, "--json")
        assert result.json() == expected, args
        assert result.stderr == f"escalate: {expected['message']}\n"  # one line
    assert blocker.read_text() == "not a folder" and list(tmp_path.iterdir()) == [blocker]


def test_a_runs_dir_that_is_a_file_has_one_code_and_one_message(cli: Any, runs_dir: Path) -> None:
    runs_dir.parent.mkdir(exist_ok=True)
    runs_dir.write_text("not a folder")
    expected = {"error": "no_runs_dir", "exit_code": 2, "runs_dir": str(runs_dir),
                "message": f"the runs folder {runs_dir} is a file; give a folder with --runs-dir or "
                           "ESCALATE_RUNS_DIR"}
    for args in (("reserve", "r", "t", "--estimate", "1"), ("runs", "show", "r"),
                 ("runs", "init", "r", "--cap", "1"), ("runs", "list"), ("sweep",)):
        assert cli(*args, "--json").json() == expected, args
    assert runs_dir.read_text() == "not a folder"
