"""The storage seam: what the ledger needs from a store, and :func:`open_store`.

A store holds ledgers (runs). :class:`~escalate.service.Ledger` decides with pure code and
asks its :class:`LedgerStore` for three things only:

- a critical section (:meth:`LedgerStore.transaction`): load the checkpointed state and
  the lines after it, append this command's lines atomically, save the checkpoint —
  with no other writer in between;
- lock-free reading: the fold of the run as a reader sees it, every line checked
  (:meth:`LedgerStore.read`, :meth:`LedgerStore.verify`), and the raw lines
  (:meth:`LedgerStore.reader`) for ``runs watch``, ``--events`` and an export;
- durability (:meth:`LedgerStore.sync`): acknowledged means durable.

The lines are the NDJSON bytes the file store writes, in every store, and they are
folded by the same :func:`escalate.core.replay.replay`. The file store
(:mod:`escalate.stores.file.store`) and the PostgreSQL store
(:mod:`escalate.stores.postgres.store`) implement them; another store is a folder of
``escalate/stores`` that implements these protocols, and its branch in :func:`open_store`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, Self, TypeAlias

import orjson

from escalate.config import Clock
from escalate.core.ids import valid_id
from escalate.core.replay import Progress, Replayed
from escalate.core.state import RunState
from escalate.errors import InputError, UnknownRun

if TYPE_CHECKING:
    from typing_extensions import TypeIs

    from escalate.core.payloads import Recovery
    from escalate.stores.postgres.connect import ConnectionPool
    from escalate.stores.postgres.transaction import Connection

# Where ledgers live, as a caller names it: a runs folder, a store's URL, an open psycopg
# connection or pool, or a store (:func:`open_store` opens each).
StoreLocation: TypeAlias = "str | os.PathLike[str] | Store | Connection | ConnectionPool"

# The patterns are text, compiled by ``re`` (and kept in its cache) when first used: every
# command imports this module, and a runs folder's name, with no ":" or "=" in it, needs none.
# ``postgresql://…`` as a URL; also what ``Path`` makes of one (it folds ``//`` into ``/``).
_POSTGRES_URL = r"(?i)^postgres(ql)?:/"
_POSTGRES_URL_WHOLE = r"(?i)^postgres(ql)?://"
# Any other ``scheme:/…`` is a URL escalate cannot open (a typo such as ``postgressql://``),
# never a folder to create: a fleet would quietly stop sharing its budget.
_OTHER_URL = r"^[A-Za-z][A-Za-z0-9+.-]*:/"
# ``postgresql:`` or ``mysql:`` with nothing after it is a URL cut short, never a folder name.
_BARE_SCHEME = r"^[A-Za-z][A-Za-z0-9+.-]+:$"
# libpq's keyword form (``host=db password=… dbname=x``): a store escalate cannot open, and a
# folder named after it would write its password into a path on disk.
_KEYWORD_DSN = (r"(?i)(?:^|\s)(?:host|hostaddr|port|dbname|user|password|passfile|service|"
                r"sslmode|options|connect_timeout|application_name)\s*=")


class Transaction(Protocol):
    """One command's critical section on one ledger: no other writer runs in between."""

    def load(self) -> Replayed:
        """The state as of the last complete write: the checkpoint plus the lines after
        it. A problem (a bad line) is in :attr:`Replayed.problem`, never raised here."""
        ...

    def now(self, clock: Clock) -> datetime:
        """The time of this write, read under its lock: the file store's is the machine's
        (``clock``, the writer's own); a database's is its server's, read in this transaction,
        so a writer's clock never moves money there."""
        ...

    def recovery(self, replayed: Replayed) -> Recovery | None:
        """The ``recovery`` payload to record before this command's events when the store
        found what a crashed writer left (the file store: a torn tail), else ``None``."""
        ...

    def append(self, replayed: Replayed, lines: list[bytes]) -> None:
        """Write ``lines`` (each ending in a newline) after ``replayed``, all or nothing,
        first setting aside what :meth:`recovery` recorded."""
        ...

    def save_checkpoint(self, replayed: Replayed, state: RunState, lines: list[bytes]) -> None:
        """Keep ``state`` (``replayed`` plus ``lines``) as the checkpoint the next command
        starts from. It only ever saves time: a failure here changes no answer."""
        ...

    # A pool keeps its derived totals beside its log: a small key → bytes map that only
    # writers holding the pool's critical section read and write. It is disposable: the
    # pool module validates what it reads and rebuilds it from the member runs' logs.

    def derived(self, keys: Iterable[str]) -> dict[str, bytes] | None:
        """The values stored under ``keys`` (a key never saved is left out); None when they
        cannot be read (a damaged store): the caller rebuilds them from the logs."""
        ...

    def derived_epoch(self) -> str:
        """What the derived values were saved under: it changes when they may have been lost
        without a trace (the file store does not sync them: this boot of the machine), and
        values saved under another epoch are not trusted."""
        ...

    def save_derived(self, values: Mapping[str, bytes | None], *, replace: bool = False) -> bool:
        """Store ``values`` (``None`` deletes the key) all or nothing; ``replace``: drop every
        other key first. No sync is needed. True when stored; if they cannot be stored,
        everything stored is discarded (the next :meth:`derived` finds nothing) and False is
        returned; if even that fails, raise :class:`~escalate.errors.StoreUnavailable`: a
        stale value must never be read back."""
        ...


class LedgerStore(Protocol):
    """One ledger (a run) in a store."""

    run_id: str
    # Called as a fold reads the lines (the CLI shows a bar for a large run).
    progress: Progress | None

    @property
    def where(self) -> str:
        """What to call the store in a message (the file store: the runs folder)."""
        ...

    def command(self) -> AbstractContextManager[None]:
        """Everything inside is one command on one ledger (the file store resolves the run
        folder once, so a folder swapped half-way cannot split a command); nests."""
        ...

    def close(self) -> None:
        """Release what this ledger keeps open between commands (the file store: the
        checkpoint's connection and the folder handle that goes with it). It can be used
        again: a later command opens what it needs."""
        ...

    def exists(self) -> bool:
        """True when the ledger holds at least its first line."""
        ...

    def head(self) -> tuple[bool, bytes | None]:
        """:meth:`exists`, and the ledger's first line where the store reads it on the same
        trip (PostgreSQL: one round trip to open a run), else None (:func:`first_event`
        reads it)."""
        ...

    def create(self, first_lines: bytes | BinaryIO, recovered: RecoveredFirstLines) -> bool:
        """Write a new ledger's first lines; False if the ledger already exists. A stream
        (an imported log, already verified) is read from where it is to its end, a chunk
        at a time."""
        ...

    def transaction(self, *, checkpoint: bool = True) -> AbstractContextManager[Transaction]:
        """The critical section of one command (``checkpoint=False``: load without the
        checkpoint, after :class:`CheckpointInvalid`)."""
        ...

    def read(self, *, checkpoint: bool = True) -> Replayed:
        """The fold as a reader sees it, without the writers' lock. A problem is reported
        only if a fold under the lock confirms it, and the state then stops before the
        first line it casts doubt on. ``checkpoint=False``: every line, never a checkpoint."""
        ...

    def verify(self) -> Replayed:
        """A tolerant fold of every line that notes each problem (``runs verify``)."""
        ...

    def reader(self) -> BinaryIO:
        """The raw lines from byte 0, read without the lock; the caller closes it."""
        ...

    def size(self) -> int:
        """The bytes of lines stored so far: it grows with every write."""
        ...

    def stamp(self) -> str | None:
        """What tells a change of the stored lines that leaves their :meth:`size` (an edit
        in place), without reading them; None while a later change could still leave it
        as it is. A pool's books trust the pool's log only at the stamp they were saved at."""
        ...

    def sync(self) -> None:
        """Make every line written so far durable (called after the critical section)."""
        ...

    # True where approver lists name what :meth:`role` answers whatever the policy says
    # (PostgreSQL's database roles); a runs folder matches them only under ``approvers_match:
    # vouched``, so that one OS user may run a whole script under several names.
    approvers_are_roles: bool

    def role(self) -> str | None:
        """Who the store vouches is acting (recorded as ``role`` beside the claimed ``by``):
        on PostgreSQL ``current_user``, which a client cannot choose; in a runs folder the OS
        user of this process, from its effective uid. None: the store vouches for nobody."""
        ...

    def wait_for_change(self, seen_size: int, timeout_s: float, *, poll_s: float) -> bool:
        """Block until :meth:`size` may differ from ``seen_size``, at most ``timeout_s``:
        True when it changed. A store that can only poll checks every ``poll_s``; one that
        is told of changes (PostgreSQL's LISTEN/NOTIFY) wakes when told."""
        ...


class RecoveredFirstLines(Protocol):
    def __call__(self, torn_bytes: int, saved_to: str) -> bytes:
        """The first lines to write instead, recording ``torn_bytes`` set aside in
        ``saved_to`` (what a crash during an earlier create left)."""
        ...


class Store(Protocol):
    """Where ledgers live: a runs folder, or a database."""

    @property
    def where(self) -> str:
        """What to call the store in a message."""
        ...

    def check_usable(self) -> None:
        """:class:`InputError` if new ledgers cannot be made here (a file as the folder)."""
        ...

    def prepare(self) -> int:
        """Create or upgrade what the store needs (``escalate store init``; idempotent):
        the number of steps applied, 0 when there was nothing to do."""
        ...

    def ledger(self, run_id: str, *, lock_timeout: float) -> LedgerStore:
        """The ledger ``run_id`` (which may not exist yet)."""
        ...

    def now(self, clock: Clock) -> datetime:
        """The time now as this store's lines tell it (a new ledger's first line, a pool's
        current period, a wait's deadline): the machine's (``clock``) for a runs folder, the
        server's for a database (:meth:`Transaction.now`)."""
        ...

    def run_ids(self) -> Iterator[str]:
        """The ids of the ledgers in the store, sorted."""
        ...

    def close(self) -> None:
        """Close what the store opened itself (a URL's connections); what it was given (a
        connection, a pool) stays the caller's."""
        ...


class Closing:
    """``with`` for what has a ``close()``: it is closed on the way out, whatever happens."""

    def close(self) -> None:
        """Release what is held open."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @contextmanager
    def closed_on_error(self) -> Iterator[None]:
        """Inside, an error closes this object before it propagates (a constructor's
        caller never gets it, so it could not close it)."""
        try:
            yield
        except BaseException:
            self.close()
            raise


@contextmanager
def owned_store(location: StoreLocation) -> Iterator[Store]:
    """:func:`open_store` for the length of a call: a store opened here (from a path or a
    URL) is closed at the end; a store given stays open, the caller's."""
    store = open_store(location)
    try:
        yield store
    finally:
        if store is not location:
            store.close()


def is_store_url(location: str) -> bool:
    """True when ``location`` names a database store, not a runs folder: the one place that
    tells a store's URL (``postgresql://``, also as ``Path`` folds it) from a folder."""
    return ":" in location and re.match(_POSTGRES_URL, location) is not None


def is_store(location: object) -> TypeIs[Store]:
    """Whether ``location`` is a store object (told apart as :class:`Store` is defined: by
    what it does)."""
    return hasattr(location, "ledger") and hasattr(location, "run_ids")


def open_store(location: StoreLocation) -> Store:
    """The store at ``location``: a ``postgresql://`` (or ``postgres://``) URL, an open
    psycopg connection or a pool with ``.connection()`` is the PostgreSQL store; a folder
    path is a file store (a runs folder); a store is itself."""
    if not isinstance(location, (str, os.PathLike)):
        if is_store(location):
            return location
        from escalate.stores.postgres.store import PgStore

        return PgStore(location)
    text = os.fspath(location)
    if is_store_url(text):
        if not re.match(_POSTGRES_URL_WHOLE, text):
            # ``Path("postgresql://h/db")`` is "postgresql:/h/db": the URL was lost on the way.
            raise InputError(f"invalid store URL {text.split('@')[-1][:80]!r}: give it with --store "
                             "or ESCALATE_STORE, as postgresql://user@host/database",
                             code="invalid_store")
        try:
            from escalate.stores.postgres.store import PgStore
        except ImportError:
            raise InputError("the PostgreSQL store needs psycopg: pip install "
                             "'escalate-ledger[postgres]'", code="store_not_supported") from None
        return PgStore(text)
    refuse_non_folder(text)
    from escalate.stores.file.store import FileStore

    return FileStore(text)


def refuse_non_folder(text: str) -> None:
    """:class:`InputError` (``invalid_store``, exit 2) when ``text``, given as a runs folder,
    is a URL escalate cannot open or a keyword connection string: it is never created as a
    folder (a fleet would quietly stop sharing its budget), and never quoted (it may hold a
    password)."""
    if ":" in text and (re.match(_OTHER_URL, text) or re.match(_BARE_SCHEME, text)):
        scheme = text.split(":", 1)[0]
        if is_store_url(scheme + ":/"):
            raise InputError(f"invalid store URL {scheme}: (nothing after it); write it as "
                             "postgresql://user@host/database", code="invalid_store")
        raise InputError(f"unknown store {scheme:.40}:// — give a runs folder, or a PostgreSQL URL "
                         "(postgresql://user@host/database)", code="invalid_store", scheme=scheme[:40])
    if "=" in text and re.search(_KEYWORD_DSN, text):
        raise InputError("a keyword connection string (host=… dbname=…) is not a store: write it as a "
                         "URL, postgresql://user@host/database, or give a runs folder; nothing was created",
                         code="invalid_store")


# A ledger's first line is read in chunks of this many bytes (it may be long).
_FIRST_LINE_CHUNK = 1 << 16


def first_event(store: LedgerStore) -> dict[str, Any] | None:
    """The ledger's first line (``run_opened`` or ``pool_opened``), or None when it has none
    yet (no ledger, or only a torn first write). It never changes, so what kind of ledger
    this is, and a run's pool, are read here — all of it, however long (a long approver
    list must not hide the pool)."""
    line = first_line(store)
    return None if line is None else first_event_in(line + b"\n")


def first_line(store: LedgerStore) -> bytes | None:
    """The ledger's complete first line without its newline (:func:`first_event`: its event),
    or None when it has none yet."""
    try:
        with store.reader() as stream:
            head = b""
            while b"\n" not in head and (chunk := stream.read(_FIRST_LINE_CHUNK)):
                head += chunk
    except (FileNotFoundError, UnknownRun):
        return None  # no such ledger: the command's own checks say so
    line, newline, _ = head.partition(b"\n")
    return line if newline else None


def first_event_in(head: bytes) -> dict[str, Any] | None:
    """The event of the complete first line that ``head`` (a ledger's first bytes) starts
    with; None when there is none (or it is no JSON object)."""
    line, newline, _ = head.partition(b"\n")
    if not newline:
        return None
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def pool_of(event: dict[str, Any] | None) -> str | None:
    """The pool a run's first line names (None: no pool)."""
    pool = None if event is None else event.get("pool")
    return pool if valid_id(pool) else None


def is_a_pool(ledger_id: str) -> InputError:
    """The error for a run command given a pool's id."""
    return InputError(f"{ledger_id} is a pool, not a run; see it with 'escalate pools show {ledger_id}' "
                      f"(check it with 'escalate pools verify {ledger_id}'), or give a run id",
                      code="is_a_pool", run=ledger_id)
