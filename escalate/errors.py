"""One error hierarchy: every refusal carries its exit code, a stable code and the facts.

The CLI maps these to exit codes and JSON in one place; the library raises the same
objects, so a scheduler calling in-process sees exactly what a shell script sees.
"""

# No ``from __future__ import annotations`` here: a TypedDict compiles each annotation it
# is given as text (a ForwardRef), on every start-up, where an evaluated one costs far less.
import errno
import os
from collections.abc import Mapping
from typing import Any, ClassVar, TypedDict, Unpack


class Facts(TypedDict, total=False):
    """The facts every error may carry: the run it concerns (the service adds it)."""

    run: str


class EscalateError(Exception):
    """Base of every error escalate reports on purpose.

    ``code`` is a stable machine word (``over_budget``, ``conflict`` …), ``exit_code``
    the CLI's exit status, ``facts`` the values a caller needs to decide what to do. Every
    fact is also an attribute (``error.task``, as filelock's ``Timeout.lock_file``); each
    subclass declares the ones it carries, as attributes (so a caller reads them typed) and
    as the keywords of its constructor (a TypedDict, so mypy refuses a fact it does not
    declare). The facts keep the order they were given in (``to_json``).
    """

    exit_code: ClassVar[int] = 1
    default_code: ClassVar[str] = "internal"
    run: str | None = None

    def __init__(self, message: str, *, code: str | None = None, **facts: Unpack[Facts]) -> None:
        self._setup(message, code, facts)

    def _setup(self, message: str, code: str | None, facts: Mapping[str, Any]) -> None:
        """What every constructor does: the message, the code and the facts (each also an
        attribute)."""
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.facts: dict[str, Any] = dict(facts)
        for name, value in facts.items():
            setattr(self, name, value)

    def to_json(self) -> dict[str, Any]:
        """The error as the one JSON object the CLI prints with ``--json``."""
        return {"error": self.code, "message": self.message, "exit_code": self.exit_code, **self.facts}


class InputFacts(Facts, total=False):
    """:class:`InputError`'s facts."""

    value: str | None
    escalation_id: str
    pool: str | None
    path: str
    scheme: str
    current: str | None
    line: int
    problem: str
    problems: int


class InputError(EscalateError, ValueError):
    """Bad input: usage, an invalid amount or id, an unknown run (exit 2)."""

    exit_code = 2
    default_code = "invalid_input"
    value: str | None = None  # the bad input, quoted and cut to a readable length
    escalation_id: str | None = None
    pool: str | None = None
    path: str | None = None  # a file named in the input (a key, a log to import)
    scheme: str | None = None  # a store URL's scheme that names no store
    current: str | None = None
    line: int | None = None  # a line of an input file that breaks a rule, and how
    problem: str | None = None
    problems: int | None = None  # how many lines break a rule

    def __init__(self, message: str, *, code: str | None = None, **facts: Unpack[InputFacts]) -> None:
        self._setup(message, code, facts)


class InvalidAmount(InputError):
    default_code = "invalid_amount"
    # The name of the amount (``new amount``) when an option stood where its value belongs:
    # the CLI names the option that gives it. Not a fact: the CLI's message carries it.
    option_missing_for: str | None = None


class TotalLimitFacts(InputFacts, total=False):
    """:class:`TotalLimit`'s facts."""

    task: str | None
    total_micros: int
    limit_micros: int


class TotalLimit(InputError):
    """A request that would carry a total (a run's, or its pool's in a period) past
    :data:`escalate.core.money.MAX_TOTAL_MICROS`; nothing is written."""

    default_code = "total_limit"
    task: str | None = None
    total_micros: int | None = None  # the total the request would have made
    limit_micros: int | None = None

    def __init__(self, message: str, *, code: str | None = None, **facts: Unpack[TotalLimitFacts]) -> None:
        self._setup(message, code, facts)


class InvalidId(InputError):
    default_code = "invalid_id"


class UnknownRunFacts(InputFacts, total=False):
    """:class:`UnknownRun`'s facts."""

    torn_bytes: int


class UnknownRun(InputError):
    default_code = "unknown_run"
    torn_bytes: int | None = None  # a first line torn as it was written: its length

    def __init__(self, message: str, *, code: str | None = None, **facts: Unpack[UnknownRunFacts]) -> None:
        self._setup(message, code, facts)


class NoRunsFolder(InputError):
    """The runs folder given is a file (``no_runs_dir``): one code and one message wherever
    it is found."""

    runs_dir: str

    def __init__(self, runs_dir: object) -> None:
        blocker = _file_above(str(runs_dir))
        where = f"is inside {blocker}, which is a file" if blocker else "is a file"
        self._setup(f"the runs folder {runs_dir} {where}; give a folder with --runs-dir or "
                    "ESCALATE_RUNS_DIR", "no_runs_dir", {"runs_dir": str(runs_dir)})


def _file_above(path: str) -> str | None:
    """The file among ``path``'s parents (a runs folder under a file cannot be made), if any."""
    parent = os.path.dirname(path)
    while parent and parent != path:
        if os.path.isfile(parent):
            return parent
        path, parent = parent, os.path.dirname(parent)
    return None


class RefusedFacts(Facts, total=False):
    """:class:`Refused`'s facts (a failed gate's carry its verdict too)."""

    task: str | None
    state: str
    reason: str | None
    requested_micros: int
    remaining_micros: int
    task_cap_micros: int | None
    cap_micros: int
    escalation_id: str
    shadow_escalation_id: str
    by: str | None
    requested_by: str | None
    approvers: list[str]
    mode: str
    resolved_at: str | None
    quorum: int
    pool: str
    period: str
    needed_micros: int
    extension_left_micros: int
    pool_remaining_micros: int


class Refused(EscalateError):
    """The ledger said no: over a cap, halted or cancelled (exit 3)."""

    exit_code = 3
    default_code = "refused"
    task: str | None = None
    state: str | None = None
    reason: str | None = None
    requested_micros: int | None = None
    remaining_micros: int | None = None
    task_cap_micros: int | None = None
    cap_micros: int | None = None
    escalation_id: str | None = None
    shadow_escalation_id: str | None = None  # the escalation shadow mode recorded instead
    # not_an_approver, self_approval, not_the_requester: who tried, who asked, who may.
    by: str | None = None
    requested_by: str | None = None
    approvers: list[str] | None = None
    mode: str | None = None  # an escalation resolved: how, and when
    resolved_at: str | None = None
    quorum: int | None = None
    # A pool's cap or extension limit: in which period, what is needed and what is left.
    pool: str | None = None
    period: str | None = None
    needed_micros: int | None = None
    extension_left_micros: int | None = None
    pool_remaining_micros: int | None = None

    def __init__(self, message: str, *, code: str | None = None, **facts: Unpack[RefusedFacts]) -> None:
        self._setup(message, code, facts)


class PendingFacts(Facts, total=False):
    """:class:`Pending`'s facts."""

    escalation_id: str
    task: str | None
    by: str | None
    mode: str | None
    resolved_at: str | None
    requested_micros: int
    remaining_micros: int
    offered: list[str]
    expires_at: str | None
    pool: str
    approvers: list[str]


class Pending(EscalateError):
    """A human has to decide first: an open escalation, or a paused task (exit 4)."""

    exit_code = 4
    default_code = "escalation_open"
    escalation_id: str  # always: the escalation to wait for
    task: str | None = None
    by: str | None = None  # who paused it (``timeout`` on expiry)
    mode: str | None = None  # a resolved escalation: how, and when
    resolved_at: str | None = None
    requested_micros: int | None = None
    remaining_micros: int | None = None
    offered: list[str] | None = None
    expires_at: str | None = None
    # A pool_cap escalation on a member run: the pool whose approvers (only) decide it.
    pool: str | None = None
    approvers: list[str] | None = None

    def __init__(self, message: str, *, code: str | None = None, **facts: Unpack[PendingFacts]) -> None:
        self._setup(message, code, facts)


class ConflictFacts(Facts, total=False):
    """:class:`Conflict`'s facts."""

    task: str | None
    state: str
    escalation_id: str
    mode: str | None
    by: str | None
    resolved_at: str | None
    pool: str | None
    cap_micros: int
    task_cap_micros: int | None
    escalation: dict[str, Any]
    requested_micros: int
    escalated_micros: int
    actual_micros: int | None
    reserved_micros: int
    extended_micros: int
    max_extension_micros: int
    held: list[str]
    escalations: list[str]
    period: str
    tz: str
    quorum: int
    approvers: list[str]


class Conflict(EscalateError):
    """The current state forbids the request (exit 5); the message says what the state is."""

    exit_code = 5
    default_code = "conflict"
    task: str | None = None
    state: str | None = None  # the task's or the escalation's state that forbids the request
    escalation_id: str | None = None
    mode: str | None = None
    by: str | None = None
    resolved_at: str | None = None
    pool: str | None = None
    # ``runs init`` / ``pools init`` of an existing one with other settings: what it has.
    cap_micros: int | None = None
    task_cap_micros: int | None = None
    escalation: dict[str, Any] | None = None
    period: str | None = None
    tz: str | None = None
    # The amounts the request and the state disagree on.
    requested_micros: int | None = None
    escalated_micros: int | None = None
    actual_micros: int | None = None
    reserved_micros: int | None = None
    extended_micros: int | None = None
    max_extension_micros: int | None = None
    held: list[str] | None = None  # what a run still holds when it cannot be archived
    escalations: list[str] | None = None
    # unreachable_quorum: the approvals asked for, and the approvers who may give them.
    quorum: int | None = None
    approvers: list[str] | None = None

    def __init__(self, message: str, *, code: str | None = None, **facts: Unpack[ConflictFacts]) -> None:
        self._setup(message, code, facts)


class CorruptFacts(Facts, total=False):
    """:class:`CorruptLedger`'s facts (``runs verify``'s and ``pools verify``'s failures
    carry their report too)."""

    line: int
    problem: str
    first_suspect_line: int
    pool: str
    period: str
    limit_micros: int


class CorruptLedger(EscalateError):
    """The log breaks a rule of its own format; writers refuse (exit 6)."""

    exit_code = 6
    default_code = "corrupt_ledger"
    line: int  # the first line that breaks a rule (1-based)
    problem: str
    first_suspect_line: int  # the first line the problem casts doubt on
    pool: str | None = None
    period: str | None = None  # a pool's period whose total passes the limit
    limit_micros: int | None = None

    def __init__(self, message: str, *, code: str | None = None, **facts: Unpack[CorruptFacts]) -> None:
        self._setup(message, code, facts)


class LockTimeout(EscalateError, TimeoutError):
    """The run's lock was not free within the timeout (exit 7)."""

    exit_code = 7
    default_code = "lock_timeout"
    lock_file: str
    timeout_s: float

    def __init__(self, message: str, *, lock_file: str, timeout_s: float) -> None:
        self._setup(message, None, {"lock_file": lock_file, "timeout_s": timeout_s})


class StorageFacts(Facts, total=False):
    """:class:`StoreUnavailable`'s facts."""

    path: str
    errno: int | None
    commit_sent: bool


class StoreUnavailable(EscalateError):
    """The store cannot do what was asked: a full disk, a read-only file system, an I/O
    error, no permission (exit 8). Nothing was recorded that a retry could double: repeating
    the same command once the cause is fixed is safe."""

    exit_code = 8
    default_code = "store_unavailable"
    path: str
    errno: int | None
    # PostgreSQL store: True when the connection was lost after a write's commit was sent
    # (its outcome may be unknown until read back); False when nothing was written.
    commit_sent: bool | None = None

    def __init__(self, message: str, *, code: str | None = None,
                 **facts: Unpack[StorageFacts]) -> None:
        self._setup(message, code, facts)


# errno → (stable code, what it means, what to do next)
_STORAGE_CAUSES: dict[int, tuple[str, str, str]] = {
    errno.ENOSPC: ("disk_full", "the disk is full", "free some space"),
    errno.EDQUOT: ("disk_full", "the disk quota is used up", "free some space or raise the quota"),
    errno.EROFS: ("read_only", "the file system is read-only",
                  "use a writable --runs-dir (reading commands still work here)"),
    errno.EIO: ("io_error", "an I/O error", "check the disk and the system log"),
    errno.EACCES: ("permission_denied", "permission denied", "check who owns the folder and its mode"),
    errno.EPERM: ("permission_denied", "not permitted", "check who owns the folder and its mode"),
}


def storage_error(exc: OSError, path: object) -> EscalateError:
    """The error to report for ``exc``, raised while using the file ``path``: it names the
    file and the cause. Causes in the environment are :class:`StoreUnavailable` (exit 8)."""
    cause = _STORAGE_CAUSES.get(exc.errno or 0)
    if cause is None:
        reason = exc.strerror or str(exc)
        return StoreUnavailable(f"cannot use {path}: {reason}; check the path, the disk and its "
                                "permissions, then retry", code="io_error", path=str(path),
                                errno=exc.errno)
    code, meaning, next_step = cause
    return StoreUnavailable(f"cannot use {path}: {meaning}; {next_step}, then retry "
                            "(repeating the same command is safe)", code=code, path=str(path),
                            errno=exc.errno)
