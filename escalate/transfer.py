"""Moving runs between stores, and preparing a store: ``escalate runs export``, ``runs
import`` and ``store init`` as library calls.

A run moves as its log: the NDJSON lines, the same bytes in every store. An export is the
log's complete lines; an import checks a log as ``runs verify`` does (every line, the seq
run, the chain, the rules, the schema) before anything is written, and then writes it as a
new run in one write (one transaction on the PostgreSQL store).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import Any, BinaryIO, TypedDict

from escalate.errors import Conflict, InputError
from escalate.ids import check_id
from escalate.replay import replay
from escalate.service import Ledger
from escalate.store import Store, open_store

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


def export_lines(location: str | os.PathLike[str] | Store, run_id: str) -> Iterator[bytes]:
    """The complete lines of run ``run_id``'s log, in chunks (a torn tail is left out):
    byte for byte the file a file store holds for it."""
    ledger = Ledger.open(location, run_id)
    with ledger.read_log() as stream:
        pending = b""
        while chunk := stream.read(_CHUNK):
            pending += chunk
            cut = pending.rfind(b"\n") + 1
            if cut:
                yield pending[:cut]
                pending = pending[cut:]


class _Bytes:
    """A log held in memory, as :func:`escalate.replay.replay` reads lines."""

    def __init__(self, where: str, data: bytes) -> None:
        self.where = where
        self._data = data

    def reader(self) -> BinaryIO:
        return io.BytesIO(self._data)


def import_log(location: str | os.PathLike[str] | Store, run_id: str, data: bytes, *,
               source: str = "the file", **options: Any) -> ImportResult:
    """Create run ``run_id`` from the log ``data`` after checking every line of it; an
    :class:`InputError` names the first problem and nothing is written. A run that
    exists already is a :class:`Conflict`. ``options`` are :class:`Ledger`'s."""
    check_id(run_id, what="run id")
    _check_identity(source, run_id, data)
    problems = _log_problems(source, run_id, data)
    if problems:
        line, problem = problems[0]
        raise InputError(f"{source} line {line}: {problem}; nothing was imported — check it with "
                         "'escalate runs verify' on a runs folder holding it", code="invalid_log",
                         line=line, problem=problem, problems=len(problems))
    ledger = Ledger(location, run_id, **options)
    ledger.runs_store.check_usable()

    def refuse(torn_bytes: int, saved_to: str) -> bytes:
        raise InputError(f"run {run_id} holds {torn_bytes} bytes of an unfinished create; "
                         f"remove that run's folder, then import again", code="run_exists",
                         run=run_id)

    if not ledger.store.create(data, refuse):
        raise Conflict(f"run {run_id} already exists in {ledger.runs_store.where}; nothing was "
                       "imported — remove it there first, or import into another store", code="run_exists",
                       run=run_id)
    # The checkpoint, so the first command on a large run does not fold every line. It only
    # saves time: a failure here changes nothing the import did.
    with ledger.store.transaction() as transaction:
        replayed = transaction.load()
        if replayed.problem is None:
            transaction.save_checkpoint(replayed, replayed.state, [])
    return {"run": run_id, "status": "imported", "lines": data.count(b"\n"), "bytes": len(data)}


def _check_identity(source: str, run_id: str, data: bytes) -> None:
    """A pool's member (or a pool) is counted by the pool's books, so it cannot move on its
    own; a run without a pool may move under another id."""
    import orjson

    try:
        first = orjson.loads(data[:data.find(b"\n")] if b"\n" in data else data)
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


def _log_problems(source: str, run_id: str, data: bytes) -> list[tuple[int, str]]:
    """Every problem ``runs verify`` would report for ``data``, and a torn tail."""
    from escalate.errors import CorruptLedger, UnknownRun
    from escalate.schema import line_problems

    if not data:
        return [(1, "the file is empty")]
    try:
        replayed = replay(_Bytes(source, data), run_id, tolerant=True)
    except (CorruptLedger, UnknownRun) as error:
        return [(getattr(error, "line", 1), getattr(error, "problem", error.message))]
    problems = list(replayed.problems)
    found = {line for line, _ in problems}
    problems += [(line, text) for line, text in line_problems(io.BytesIO(data)) if line not in found]
    if replayed.torn_bytes:
        problems.append((replayed.lines + 1, f"{replayed.torn_bytes} bytes after the last complete "
                         "line (a torn or unfinished write)"))
    return sorted(problems)


def init_store(location: str | os.PathLike[str] | Store) -> StoreInitResult:
    """Create or upgrade what the store needs (``escalate store init``): the PostgreSQL
    store's tables (idempotent: steps already applied are skipped), a runs folder."""
    store = open_store(location)
    applied = store.prepare()
    return {"store": store.where, "status": "created" if applied else "current",
            "steps_applied": applied}
