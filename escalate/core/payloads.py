"""The typed definition of every event (schema v1): one TypedDict per event type, the
single source of the format. The JSON Schema and pydantic validation (:mod:`escalate.core.schema`),
the tables in ``docs/events.md`` and the constants of :mod:`escalate.core.events` derive from
these definitions, and tests hold them together.

The markers in the ``Annotated`` fields say which rule a value follows (:class:`Check`) and
what a field means where the rule does not say it all (:class:`Doc`), so this module needs
no pydantic. Only the schema imports it at run time (building TypedDicts costs a
millisecond or two, which the hot commands do not pay); the rest imports it for types.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal, NamedTuple, NotRequired, TypedDict

from escalate.core.events import (
    SCHEMA_VERSION,
    ApproversMatch,
    EscalationKind,
    EscalationReason,
    EventType,
    HaltReason,
    Mode,
    Period,
    Priority,
    Resolution,
    ResolvedMode,
    VoidReason,
)


class Check(Enum):
    """The rule a field's value follows; :mod:`escalate.core.schema` turns each into a constraint."""

    MICROS = "USD in integer micros (1 USD = 1,000,000)."
    SIGNED_MICROS = "Micros; negative once releases ran over the cap."
    ID = "A run, task or escalation id (no '..')."
    TIMESTAMP = "UTC, microseconds, fixed width: sorts as text."
    NAME = "A person or process: printable, no control characters."
    SEQ = "1, 2, 3 … with no gaps."
    HASH = ("First 16 hex characters of SHA-256 over the previous line without its newline; "
            "empty on the first line.")
    MORE = "A count of lines, at least 1."
    TIMEOUT = "Seconds, at most 1000 years."
    BYTES = "A count of bytes."
    TEXT = "Printable text."
    REASON = "Printable text, at most 1000 characters."
    FILE_NAME = "A file name: printable, 1-255 characters."
    DETAIL = "Printable text, at most 200 characters."
    ZONE = "An IANA time zone name, such as UTC or Europe/Berlin."


@dataclass(frozen=True, slots=True)
class Doc:
    """What a field means, where its :class:`Check` does not say it all."""

    text: str


MicrosInt = Annotated[int, Check.MICROS]
SignedMicrosInt = Annotated[int, Check.SIGNED_MICROS]
IdStr = Annotated[str, Check.ID]
TimestampStr = Annotated[str, Check.TIMESTAMP]
NameStr = Annotated[str, Check.NAME]
# Who wrote a resolution or a policy change, as the store vouches for it.
WriterRole = Annotated[NameStr, Doc(
    "Who the store vouches wrote it, beside the claimed by: the database role on PostgreSQL "
    "(current_user, which a client cannot choose; approver lists there name roles), the OS "
    "user of the writing process on the file store (from its uid). Absent on older lines.")]

class EscalationPolicy(TypedDict):
    """A run's escalation settings (``run_opened.escalation``, ``policy_changed.escalation``)."""

    mode: Mode
    approval_threshold_micros: Annotated[MicrosInt | None, Doc("null: no threshold.")]
    timeout_s: Annotated[Annotated[int, Check.TIMEOUT] | None, Doc("null: escalations never time out.")]
    max_extension_micros: MicrosInt
    approvers: NotRequired[Annotated[list[NameStr], Doc(
        "Who may approve, pause or cancel; absent or empty: anyone (never the requester).")]]
    renotify_every_s: NotRequired[Annotated[Annotated[int, Check.TIMEOUT], Doc(
        "Re-deliver an open escalation's notice this often (escalate sweep); absent: never.")]]
    quorum: NotRequired[Annotated[Annotated[int, Check.MORE], Doc(
        "Distinct approvers an approval needs (above quorum_above_micros, when set); absent: 1.")]]
    quorum_above_micros: NotRequired[Annotated[MicrosInt, Doc(
        "The quorum applies to escalations needing a cap extension above this; absent: to all.")]]
    approvers_match: NotRequired[Annotated[ApproversMatch, Doc(
        "vouched: approvers are matched, and the requester told apart, on role (who the store "
        "vouches for); absent or claimed: on the names given (docs/escalation.md, Who is who).")]]
    approver_keys: NotRequired[Annotated[dict[NameStr, list[str]], Doc(
        "Pinned OpenSSH public key lines by approver name; while present, every approve, pause and "
        "cancel carries a signature by one of its approver's keys. Absent: nothing pinned.")]]


class Envelope(TypedDict):
    """The fields every line starts with, in this order."""

    v: Annotated[Literal[1], Doc(f"Schema version ({SCHEMA_VERSION}).")]
    seq: Annotated[int, Check.SEQ]
    ts: TimestampStr
    prev: Annotated[str, Check.HASH]
    actor: Annotated[str, Check.NAME, Doc("--by, else $ESCALATE_ACTOR, else the OS user.")]
    more: NotRequired[Annotated[Annotated[int, Check.MORE], Doc(
        "On every line of a multi-line write but its last: how many lines of the same write "
        "follow. A log whose complete lines end inside such a write ends in a torn tail from the "
        "write's first line.")]]


class RunOpened(TypedDict):
    """The first line of every run."""

    type: Literal["run_opened"]
    run: IdStr
    run_cap_micros: MicrosInt
    task_cap_micros: MicrosInt
    escalation: EscalationPolicy
    pool: NotRequired[Annotated[IdStr, Doc(
        "The pool the run belongs to, for good (its run_joined line comes first).")]]


class BudgetReserved(TypedDict):
    """A reservation is in flight."""

    type: Literal["budget_reserved"]
    task: IdStr
    amount_micros: MicrosInt


class BudgetIncreased(TypedDict):
    """A task's reservation was raised to an absolute new amount."""

    type: Literal["budget_increased"]
    task: IdStr
    from_micros: MicrosInt
    to_micros: MicrosInt
    reason: Annotated[str, Check.REASON]


class Released(TypedDict):
    """A reservation was settled with the task's actual cost."""

    type: Literal["released"]
    task: IdStr
    reserved_micros: MicrosInt
    actual_micros: MicrosInt


class Halt(TypedDict):
    """A task was refused for good."""

    type: Literal["halt"]
    task: IdStr
    requested_micros: MicrosInt
    remaining_micros: SignedMicrosInt
    reason: HaltReason


class Escalation(TypedDict):
    """A request waits for a person (or, with ``shadow``, is only recorded)."""

    type: Literal["escalation"]
    id: IdStr
    task: IdStr
    kind: NotRequired[Annotated[EscalationKind, Doc("Whether a reserve or an increase asked.")]]
    from_micros: NotRequired[Annotated[MicrosInt, Doc("What the task held before.")]]
    requested_micros: Annotated[MicrosInt, Doc("The absolute reservation asked for.")]
    remaining_micros: SignedMicrosInt
    reason: EscalationReason
    offered: list[Resolution]
    needed_extension_micros: NotRequired[Annotated[MicrosInt, Doc(
        "The cap extension an approval needs (0 when only the threshold fired).")]]
    expires_at: Annotated[TimestampStr | None, Doc("null: never expires (or shadow).")]
    shadow: bool
    note: NotRequired[Annotated[Annotated[str, Check.TEXT],
                                Doc("Why extend is not offered, when it is not.")]]
    request_reason: NotRequired[Annotated[Annotated[str, Check.REASON], Doc(
        "Why the requester needs it (--reason); empty when none was given.")]]
    priority: NotRequired[Annotated[Priority, Doc("How urgent the requester says it is (--priority).")]]
    pool: NotRequired[Annotated[IdStr, Doc(
        "reason pool_cap: the pool whose policy decides it (its approvers, its max extension).")]]
    quorum: NotRequired[Annotated[Annotated[int, Check.MORE], Doc(
        "The distinct approvers the policy asked for when it fired (the run's, and a pool_cap "
        "escalation's pool's): it binds the escalation though the policy is lowered later. "
        "Absent: 1, or an older line, which follows the policy.")]]
    role: NotRequired[Annotated[NameStr, Doc(
        "Who the store vouches asked: the database role (current_user) on PostgreSQL, the OS "
        "user of the writing process on the file store. Self-approval compares it (docs/"
        "escalation.md, Who is who). Absent on older lines.")]]


class EscalationResolved(TypedDict):
    """The first resolution of an escalation (``by: "timeout"`` on expiry; ``withdraw``: taken back)."""

    type: Literal["escalation_resolved"]
    id: IdStr
    mode: ResolvedMode
    by: NameStr
    extension_micros: MicrosInt
    pool_extension_micros: NotRequired[Annotated[MicrosInt, Doc(
        "Approving a pool_cap escalation: the pool's extension, for the period it is granted in.")]]
    role: NotRequired[WriterRole]
    signature: NotRequired[Annotated[str, Doc(
        "Under a policy that pins approvers' keys: the armored OpenSSH SSHSIG signature (namespace "
        "escalate) of the escalation's canonical content (docs/escalation.md).")]]
    key: NotRequired[Annotated[str, Doc("With signature: the SHA256 fingerprint of the key that made it.")]]


class Recovery(TypedDict):
    """A torn tail (a final line without a newline) was moved to a side file."""

    type: Literal["recovery"]
    torn_bytes: Annotated[int, Check.BYTES]
    saved_to: Annotated[str, Check.FILE_NAME]


class PolicyChanged(TypedDict):
    """The run's (or pool's) escalation policy changed (``escalate runs set``, ``pools set``)."""

    type: Literal["policy_changed"]
    escalation: EscalationPolicy
    cap_micros: NotRequired[Annotated[MicrosInt, Doc("A pool's new cap (pools only).")]]
    role: NotRequired[WriterRole]
    signature: NotRequired[Annotated[str, Doc(
        "While the policy before it pins approvers' keys: the armored OpenSSH SSHSIG signature "
        "(namespace escalate) of the change's canonical content by a key pinned for its actor.")]]
    key: NotRequired[Annotated[str, Doc("With signature: the SHA256 fingerprint of the key that made it.")]]
    members_at: NotRequired[Annotated[dict[IdStr, list[int | str]], Doc(
        "A pool's change of who decides its escalations (keys, approvers, quorum): each member run's "
        "line count and last line's hash then; its decisions after that line follow this policy.")]]


class EscalationNotified(TypedDict):
    """One delivery attempt of an escalation's notify hook, recorded after it ran."""

    type: Literal["escalation_notified"]
    id: IdStr
    attempt: Annotated[Annotated[int, Check.MORE], Doc("1 for the first delivery, then 2, 3 …")]
    ok: Annotated[bool, Doc("Whether the hook exited 0 within its timeout.")]
    detail: Annotated[Annotated[str, Check.DETAIL], Doc(
        "What happened: 'exit 0', 'exit 7', 'timed out after 10s', 'failed to start' (never the "
        "hook's output).")]


class PoolOpened(TypedDict):
    """The first line of every pool: one cap over its member runs, per period."""

    type: Literal["pool_opened"]
    pool: IdStr
    cap_micros: MicrosInt
    period: Annotated[Period, Doc("none, or the calendar day, ISO week or month the cap repeats by.")]
    tz: Annotated[Annotated[str, Check.ZONE], Doc("Where a period starts and ends.")]
    escalation: Annotated[EscalationPolicy, Doc(
        "As a run's; max_extension_micros is per period, timeout and approvers apply to pool_cap "
        "escalations.")]


class RunJoined(TypedDict):
    """A run joined the pool (written before the run's own first line); it never leaves."""

    type: Literal["run_joined"]
    run: IdStr


class RunArchived(TypedDict):
    """A finished run was retired (escalate runs archive); no line follows; a pool still counts it."""

    type: Literal["run_archived"]


class RunJoinVoided(TypedDict):
    """A join whose runs init found the id taken by another ledger: the run was never the pool's member."""

    type: Literal["run_join_voided"]
    run: IdStr
    reason: Annotated[VoidReason, Doc("What holds the id: a run of no pool, of another pool, or a pool.")]


class MemberOpened(TypedDict):
    """A member's first line is written: its log is this one for good (the pool checks it on every read)."""

    type: Literal["member_opened"]
    run: IdStr
    first_line: Annotated[str, Check.HASH, Doc(
        "The chain hash of the member's first line (what its line 2's prev holds); never empty.")]


class EscalationApproved(TypedDict):
    """One approval of an escalation that needs a quorum, short of the last: the escalation
    stays open; the approval that completes the quorum is its ``escalation_resolved``."""

    type: Literal["escalation_approved"]
    id: IdStr
    by: NameStr
    role: NotRequired[WriterRole]
    quorum: Annotated[Annotated[int, Check.MORE], Doc(
        "How many distinct approvers the policy asked for when this approval was written.")]
    signature: NotRequired[Annotated[str, Doc(
        "Under a policy that pins approvers' keys: this approver's signature, as escalation_resolved's "
        "(the same canonical content, mode extend).")]]
    key: NotRequired[Annotated[str, Doc("With signature: the SHA256 fingerprint of the key that made it.")]]
    extension_micros: NotRequired[Annotated[MicrosInt, Doc(
        "With signature: the run's extension this approver signed to grant (its signature covers it).")]]
    pool_extension_micros: NotRequired[Annotated[MicrosInt, Doc(
        "With signature: the pool's extension this approver signed to grant (its signature covers it).")]]


Payload = (RunOpened | BudgetReserved | BudgetIncreased | Released | Halt | Escalation
           | EscalationResolved | Recovery | PolicyChanged | EscalationNotified | PoolOpened | RunJoined
           | RunArchived | RunJoinVoided | MemberOpened | EscalationApproved)
# Every payload definition, in EVENT_TYPES order (a test holds the two together).
PAYLOADS: tuple[type[Any], ...] = (
    RunOpened, BudgetReserved, BudgetIncreased, Released, Halt, Escalation, EscalationResolved,
    Recovery, PolicyChanged, EscalationNotified, PoolOpened, RunJoined, RunArchived, RunJoinVoided,
    MemberOpened, EscalationApproved)


class Total(Enum):
    """A sum that money fields move (:data:`MONEY`)."""

    CAP = "the run's cap"
    RESERVED = "what the run's tasks hold"
    SPENT = "what the run spent"
    POOL_CAP = "a pool's cap (in the pool's own log)"
    POOL_EXTENDED = "a pool's extension in the period of the line (in a member's log)"


class Move(NamedTuple):
    """How a money field moves a :class:`Total`: ``sets`` it to the value, ``adds`` or
    ``takes`` the value."""

    total: Total
    how: Literal["sets", "adds", "takes"]


# Every money field (micros) of every event, and how it moves the totals; None: it only
# reports (what was asked, what was left, a limit). An event type that moves money gets its
# row here with its payload: tests/test_money_events.py holds every payload's money fields,
# escalate's fold, a pool's member fold (escalate.pools.member), runs show --events
# (escalate.reports.report.describe_event) and the tests' own audit fold to this table.
MONEY: dict[EventType, dict[str, Move | None]] = {
    "run_opened": {"run_cap_micros": Move(Total.CAP, "sets"), "task_cap_micros": None},
    "budget_reserved": {"amount_micros": Move(Total.RESERVED, "adds")},
    "budget_increased": {"from_micros": Move(Total.RESERVED, "takes"),
                         "to_micros": Move(Total.RESERVED, "adds")},
    "released": {"reserved_micros": Move(Total.RESERVED, "takes"),
                 "actual_micros": Move(Total.SPENT, "adds")},
    "halt": {"requested_micros": None, "remaining_micros": None},
    "escalation": {"from_micros": None, "requested_micros": None, "remaining_micros": None,
                   "needed_extension_micros": None},
    "escalation_resolved": {"extension_micros": Move(Total.CAP, "adds"),
                            "pool_extension_micros": Move(Total.POOL_EXTENDED, "adds")},
    "policy_changed": {"cap_micros": Move(Total.POOL_CAP, "sets")},
    "pool_opened": {"cap_micros": Move(Total.POOL_CAP, "sets")},
}
