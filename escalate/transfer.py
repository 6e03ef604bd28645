"""Moving runs between stores, and preparing a store: ``escalate runs export``, ``runs
import`` and ``store init`` as library calls.

A run moves as its log: the NDJSON lines, the same bytes in every store. An export is the
log's complete lines; an import checks a log as ``runs verify`` does (every line, the seq
run, the chain, the rules, the schema) before anything is written, and then writes it as a
new run in one write (one transaction on the PostgreSQL store). A log given as a stream
is copied to a private temporary file and read from there a chunk at a time: memory does
not grow with its size, and the bytes written are the bytes verified.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import Iterator
from typing import BinaryIO, TypedDict, Unpack

from escalate.core.ids import check_id
from escalate.core.replay import replay
from escalate.errors import Conflict, CorruptLedger, InputError, storage_error
from escalate.service import Ledger, LedgerOptions
from escalate.stores.seam import StoreLocation, owned_store

_CHUNK = 1 << 20


class ImportResult(TypedDict):
    run: str
    status: str  # "imported"
    lines: int
    bytes: int


class StoreInitResult(TypedDict):
    store: str
    status: str  # "created" (steps were applied) or "current"
    steps_applied: int


def export_lines(location: StoreLocation, run_id: str) -> Iterator[bytes]:
    """The complete lines of run ``run_id``'s log, in chunks (a torn tail is left out):
    byte for byte the file a file store holds for it."""
    with Ledger.open(location, run_id) as ledger, ledger.read_log() as stream:
        pending = b""
        while chunk := stream.read(_CHUNK):
            pending += chunk
            cut = pending.rfind(b"\n") + 1
            if cut:
                yield pending[:cut]
                pending = pending[cut:]


class _Source:
    """A log to import, as :func:`escalate.core.replay.replay` reads lines: bytes, or a file
    read again from its start by each reader (which leaves the file open)."""

    def __init__(self, where: str, data: bytes | BinaryIO) -> None:
        self.where = where
        self._data = data

    def reader(self) -> BinaryIO:
        if isinstance(self._data, bytes):
            return io.BytesIO(self._data)
        stream = open(self._data.fileno(), "rb", closefd=False)  # noqa: SIM115 (the caller closes it)
        stream.seek(0)
        return stream


def import_log(location: StoreLocation, run_id: str, data: bytes | BinaryIO, *,
               source: str = "the file", **options: Unpack[LedgerOptions]) -> ImportResult:
    """Create run ``run_id`` from the log ``data`` after checking every line of it; an
    :class:`InputError` names the first problem and nothing is written. A run that
    exists already is a :class:`Conflict`. ``options`` are :class:`Ledger`'s.

    ``data``: the log's bytes, or a binary stream (a file, stdin), read to its end into a
    private temporary file (in the system's temporary folder, gone when the call returns):
    it is never held whole in memory, and nobody can change it between the check and the
    write."""
    check_id(run_id, what="run id")
    if isinstance(data, bytes):
        return _import(location, run_id, _Source(source, data), options)
    with tempfile.TemporaryFile() as copy:
        try:
            shutil.copyfileobj(data, copy, _CHUNK)
            copy.flush()  # (the readers read the file's descriptor, not this buffer)
        except OSError as exc:
            raise storage_error(exc, f"{source}, copied to {tempfile.gettempdir()}") from exc
        return _import(location, run_id, _Source(source, copy), options)


def _import(location: StoreLocation, run_id: str, log: _Source,
            options: LedgerOptions) -> ImportResult:
    source = log.where
    with log.reader() as stream:
        _check_identity(source, run_id, stream.readline())
    problems, lines, forged = _log_problems(log, run_id)
    # A forgery is the first thing wrong with the log: a line after other damage may fail
    # its signature check only because the damage came first.
    for line, problem in [problem for problem in problems[:1] if problem[0] in forged]:
        raise CorruptLedger(f"{source} line {line}: {problem}; a signature the log requires is missing or "
                            "forged, so nothing was imported — check it with 'escalate runs verify' on a "
                            "runs folder holding it", code="forged_signature", line=line, problem=problem,
                            first_suspect_line=line)
    if problems:
        line, problem = problems[0]
        raise InputError(f"{source} line {line}: {problem}; nothing was imported — check it with "
                         "'escalate runs verify' on a runs folder holding it", code="invalid_log",
                         line=line, problem=problem, problems=len(problems))
    with Ledger(location, run_id, **options) as ledger:
        ledger.runs_store.check_usable()

        def refuse(torn_bytes: int, saved_to: str) -> bytes:
            raise InputError(f"run {run_id} holds {torn_bytes} bytes of an unfinished create; "
                             f"remove that run's folder, then import again", code="run_exists",
                             run=run_id)

        with log.reader() as stream:
            created = ledger.store.create(stream, refuse)
            size = stream.tell()
        if not created:
            raise Conflict(f"run {run_id} already exists in {ledger.runs_store.where}; nothing was "
                           "imported — remove it there first, or import into another store",
                           code="run_exists", run=run_id)
        # The checkpoint, so the first command on a large run does not fold every line. It only
        # saves time: a failure here changes nothing the import did.
        with ledger.store.transaction() as transaction:
            replayed = transaction.load()
            if replayed.problem is None:
                transaction.save_checkpoint(replayed, replayed.state, [])
        return {"run": run_id, "status": "imported", "lines": lines, "bytes": size}


def _check_identity(source: str, run_id: str, first_line: bytes) -> None:
    """A pool's member (or a pool) is counted by the pool's books, so it cannot move on its
    own; a run without a pool may move under another id."""
    import orjson

    try:
        first = orjson.loads(first_line)
    except orjson.JSONDecodeError:
        return  # the checks of every line name the problem
    if not isinstance(first, dict):
        return
    if first.get("type") == "pool_opened":
        raise InputError(f"{source} is the log of pool {first.get('pool')!s:.128}, not of a run; "
                         "pools cannot be imported — create the pool with 'escalate pools init'",
                         code="invalid_log", line=1, problem="a pool's log")
    if first.get("type") != "run_opened":
        return
    if "pool" in first:
        raise InputError(f"{source} is the log of run {first.get('run')!s:.128}, a member of pool "
                         f"{first['pool']!s:.128}: a pool's runs move only with their pool, and "
                         "pools cannot be imported; nothing was imported", code="invalid_log",
                         line=1, problem="a pool member's log")


def _log_problems(log: _Source, run_id: str) -> tuple[list[tuple[int, str]], int, set[int]]:
    """Every problem ``runs verify`` would report for the log, and a torn tail; its number
    of complete lines; and the lines whose problem is a forged or missing signature."""
    from escalate.core.schema import line_problems
    from escalate.errors import UnknownRun

    with log.reader() as stream:
        if not stream.read(1):
            return [(1, "the file is empty")], 0, set()
    try:
        replayed = replay(log, run_id, tolerant=True)
    except (CorruptLedger, UnknownRun) as error:
        if "torn_bytes" in error.facts:  # (replay's advice is for a crashed 'runs init', not an import)
            return [(1, f"the first line is not a complete line ({error.facts['torn_bytes']} bytes with "
                        "no newline), so it is not a run_opened line")], 0, set()
        return [(getattr(error, "line", 1), getattr(error, "problem", error.message))], 0, set()
    problems = list(replayed.problems)
    found = {line for line, _ in problems}
    with log.reader() as stream:
        problems += [(line, text) for line, text in line_problems(stream) if line not in found]
    if replayed.torn_bytes:
        problems.append((replayed.lines + 1, f"{replayed.torn_bytes} bytes after the last complete "
                         "line (a torn or unfinished write)"))
    return sorted(problems), replayed.lines, set(replayed.forged)


def init_store(location: StoreLocation) -> StoreInitResult:
    """Create or upgrade what the store needs (``escalate store init``): the PostgreSQL
    store's tables (idempotent: steps already applied are skipped), a runs folder."""
    with owned_store(location) as store:
        applied = store.prepare()
        return {"store": store.where, "status": "created" if applied else "current",
                "steps_applied": applied}
