"""The event format (schema v1) as frozen pydantic models, and its JSON Schema.

The hot path writes plain dicts (:mod:`escalate.events`); these models describe the same
lines for ``escalate schema``, for validation in tests, and for anyone who reads a log.
Only ``escalate schema`` and ``runs verify`` import this module, so pydantic never loads on
``reserve``/``increase``/``release``. Readers ignore fields they do not know, so every
model allows extra fields.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, BinaryIO, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from escalate.events import SCHEMA_VERSION, iter_lines, parse_ts
from escalate.ledger import MAX_ACTOR_LENGTH, MAX_TIMEOUT_S
from escalate.money import MAX_MICROS


def _printable(value: str) -> str:
    if not value.isprintable():
        raise ValueError("must be printable (no control characters)")
    return value


def _no_dot_dot(value: str) -> str:
    if ".." in value:
        raise ValueError("an id must not contain '..'")
    return value


def _real_moment(value: str) -> str:
    parse_ts(value)  # a ValueError names a 13th month or a 30 February
    return value


Micros = Annotated[int, Field(ge=0, le=MAX_MICROS, description="USD in integer micros (1 USD = 1,000,000).")]
SignedMicros = Annotated[int, Field(description="Micros; negative once releases ran over the cap.")]
Id = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$",
                          description="A run, task or escalation id (no '..')."), AfterValidator(_no_dot_dot)]
Timestamp = Annotated[str, Field(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
                                         r"\.[0-9]{6}Z$",
                                 description="UTC, microseconds, fixed width: sorts as text."),
                      AfterValidator(_real_moment)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_ACTOR_LENGTH,
                            description="A person or process: printable, no control characters."),
                 AfterValidator(_printable)]
Resolution = Literal["extend", "pause", "cancel"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow", strict=True)


class EscalationPolicy(_Model):
    """A run's escalation settings (``run_opened.escalation``, ``policy_changed.escalation``)."""

    mode: Literal["off", "shadow", "enforce"]
    approval_threshold_micros: Micros | None = Field(description="null: no threshold.")
    timeout_s: Annotated[int, Field(ge=0, le=MAX_TIMEOUT_S)] | None = Field(
        description="null: escalations never time out.")
    max_extension_micros: Micros


class _Envelope(_Model):
    v: Literal[1] = Field(description=f"Schema version ({SCHEMA_VERSION}).")
    seq: Annotated[int, Field(ge=1)] = Field(description="1, 2, 3 … with no gaps.")
    ts: Timestamp
    prev: Annotated[str, Field(pattern=r"^([0-9a-f]{16})?$")] = Field(
        description="First 16 hex characters of SHA-256 over the previous line without its "
        "newline; empty on the first line.")
    actor: Name = Field(description="--by, else $ESCALATE_ACTOR, else the OS user.")
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

    @model_validator(mode="after")
    def _task_cap_within_run_cap(self) -> RunOpened:
        if self.task_cap_micros > self.run_cap_micros:
            raise ValueError("task_cap_micros must not be above run_cap_micros")
        return self


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
    reason: Annotated[str, Field(max_length=1000), AfterValidator(_printable)]


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
    note: Annotated[str, AfterValidator(_printable)] | None = Field(
        default=None, description="Why extend is not offered, when it is not.")


class EscalationResolved(_Envelope):
    """The first resolution of an escalation (``by: "timeout"`` on expiry)."""

    type: Literal["escalation_resolved"]
    id: Id
    mode: Resolution
    by: Name
    extension_micros: Micros


class Recovery(_Envelope):
    """A torn tail (a final line without a newline) was moved to a side file."""

    type: Literal["recovery"]
    torn_bytes: Annotated[int, Field(ge=0)]
    saved_to: Annotated[str, Field(min_length=1, max_length=255), AfterValidator(_printable)]


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


def line_problems(stream: BinaryIO) -> Iterator[tuple[int, str]]:
    """``(line number, problem)`` for each complete line of a log that is a JSON object but
    not a valid v1 event (``runs verify``; the fold names lines that are no JSON object)."""
    for number, (line, _) in enumerate(iter_lines(stream, 0), start=1):
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(event, dict):
            continue
        try:
            validate_event(event)
        except ValidationError as error:
            yield number, _first_error(error)


def _first_error(error: ValidationError) -> str:
    first = error.errors(include_url=False, include_input=False)[0]
    # The discriminated union puts the event type first in the location; the field follows.
    where = ".".join(str(part) for part in first["loc"][1:]) or str(first["loc"][0] if first["loc"] else "")
    count = error.error_count()
    more = f" (and {count - 1} more)" if count > 1 else ""
    return f"does not match the event schema: field {where!r}: {first['msg']}{more}"
