"""The event format (schema v1) as frozen pydantic models, and its JSON Schema.

The hot path writes plain dicts (:mod:`escalate.events`); these models describe the same
lines for ``escalate schema``, for validation in tests, and for anyone who reads a log.
Only the ``schema`` command imports this module, so pydantic never loads on
``reserve``/``increase``/``release``. Readers ignore fields they do not know, so every
model allows extra fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from escalate.events import SCHEMA_VERSION
from escalate.money import MAX_MICROS

Micros = Annotated[int, Field(ge=0, le=MAX_MICROS, description="USD in integer micros (1 USD = 1,000,000).")]
SignedMicros = Annotated[int, Field(description="Micros; negative once releases ran over the cap.")]
Id = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$",
                          description="A run, task or escalation id.")]
Timestamp = Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$",
                                 description="UTC, microseconds, fixed width: sorts as text.")]
Resolution = Literal["extend", "pause", "cancel"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow", strict=True)


class EscalationPolicy(_Model):
    """A run's escalation settings (``run_opened.escalation``, ``policy_changed.escalation``)."""

    mode: Literal["off", "shadow", "enforce"]
    approval_threshold_micros: Micros | None = Field(description="null: no threshold.")
    timeout_s: Annotated[int, Field(ge=0)] | None = Field(description="null: escalations never time out.")
    max_extension_micros: Micros


class _Envelope(_Model):
    v: Literal[1] = Field(description=f"Schema version ({SCHEMA_VERSION}).")
    seq: Annotated[int, Field(ge=1)] = Field(description="1, 2, 3 … with no gaps.")
    ts: Timestamp
    prev: Annotated[str, Field(pattern=r"^([0-9a-f]{16})?$")] = Field(
        description="First 16 hex characters of SHA-256 over the previous line without its "
        "newline; empty on the first line.")
    actor: Annotated[str, Field(min_length=1, max_length=128)] = Field(
        description="--by, else $ESCALATE_ACTOR, else the OS user.")
    more: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="On every line of a multi-line write but its last: how many "
        "lines of the same write follow. A log whose complete lines end inside such a write "
        "ends in a torn tail from the write's first line.")


class RunOpened(_Envelope):
    """The first line of every run."""

    type: Literal["run_opened"]
    run: Id
    run_cap_micros: Micros
    task_cap_micros: Micros
    escalation: EscalationPolicy


class BudgetReserved(_Envelope):
    """A reservation is in flight."""

    type: Literal["budget_reserved"]
    task: Id
    amount_micros: Micros


class BudgetIncreased(_Envelope):
    """A task's reservation was raised to an absolute new amount."""

    type: Literal["budget_increased"]
    task: Id
    from_micros: Micros
    to_micros: Micros
    reason: str


class Released(_Envelope):
    """A reservation was settled with the task's actual cost."""

    type: Literal["released"]
    task: Id
    reserved_micros: Micros
    actual_micros: Micros


class Halt(_Envelope):
    """A task was refused for good."""

    type: Literal["halt"]
    task: Id
    requested_micros: Micros
    remaining_micros: SignedMicros
    reason: Literal["run_cap", "task_cap", "cancelled"]


class Escalation(_Envelope):
    """A request waits for a person (or, with ``shadow``, is only recorded)."""

    type: Literal["escalation"]
    id: Id
    task: Id
    kind: Literal["reserve", "increase"] | None = Field(
        default=None, description="Whether a reserve or an increase asked.")
    from_micros: Micros | None = Field(default=None, description="What the task held before.")
    requested_micros: Micros = Field(description="The absolute reservation asked for.")
    remaining_micros: SignedMicros
    reason: Literal["run_cap", "threshold"]
    offered: list[Resolution]
    needed_extension_micros: Micros | None = Field(
        default=None, description="The cap extension an approval needs (0 when only the threshold fired).")
    expires_at: Timestamp | None = Field(description="null: never expires (or shadow).")
    shadow: bool
    note: str | None = Field(default=None, description="Why extend is not offered, when it is not.")


class EscalationResolved(_Envelope):
    """The first resolution of an escalation (``by: "timeout"`` on expiry)."""

    type: Literal["escalation_resolved"]
    id: Id
    mode: Resolution
    by: Annotated[str, Field(min_length=1)]
    extension_micros: Micros


class Recovery(_Envelope):
    """A torn tail (a final line without a newline) was moved to a side file."""

    type: Literal["recovery"]
    torn_bytes: Annotated[int, Field(ge=0)]
    saved_to: str


class PolicyChanged(_Envelope):
    """The run's escalation policy changed (``escalate runs set``)."""

    type: Literal["policy_changed"]
    escalation: EscalationPolicy


MODELS: tuple[type[_Envelope], ...] = (RunOpened, BudgetReserved, BudgetIncreased, Released, Halt,
                                       Escalation, EscalationResolved, Recovery, PolicyChanged)

Event = Annotated[
    RunOpened | BudgetReserved | BudgetIncreased | Released | Halt | Escalation | EscalationResolved
    | Recovery | PolicyChanged,
    Field(discriminator="type"),
]

_ADAPTER: TypeAdapter[Any] = TypeAdapter(Event)


def validate_event(event: dict[str, Any]) -> _Envelope:
    """Parse one event line's object; raises :class:`pydantic.ValidationError` if it is not
    a valid v1 event."""
    return _ADAPTER.validate_python(event)  # type: ignore[no-any-return]


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one line of ``events.ndjson``."""
    schema = _ADAPTER.json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"escalate event (schema v{SCHEMA_VERSION})",
        "description": "One line of RUNS/<run>/events.ndjson. Readers ignore fields they do not know.",
        **schema,
    }
