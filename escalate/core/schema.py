"""The event format (schema v1) as frozen pydantic models, its JSON Schema, and the tables
of ``docs/events.md`` — all derived from the TypedDicts of :mod:`escalate.core.payloads`.

The hot path writes plain dicts (:mod:`escalate.core.events`); these models describe the same
lines for ``escalate schema``, for validation in tests, and for anyone who reads a log.
A new field or event type is written once, in :mod:`escalate.core.payloads`; a new kind of
value once more here, in ``_CHECKS`` (what its :class:`~escalate.core.payloads.Check` means).
Only ``escalate schema`` and ``runs verify`` import this module, so pydantic never loads on
``reserve``/``increase``/``release``. Readers ignore fields they do not know, so every
model allows extra fields.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from typing import Annotated, Any, BinaryIO, Literal, NotRequired, Union, get_args, get_origin, get_type_hints

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    model_validator,
)

from escalate.core import events, payloads
from escalate.core.events import (
    MAX_ACTOR_LENGTH,
    MAX_FILE_NAME_LENGTH,
    MAX_REASON_LENGTH,
    MAX_TIMEOUT_S,
    SCHEMA_VERSION,
    iter_lines,
    parse_ts,
)
from escalate.core.ids import ID_PATTERN
from escalate.core.money import MAX_MICROS
from escalate.core.payloads import PAYLOADS, Check, Doc
from escalate.core.rules import task_cap_fits


def _printable(value: str) -> str:
    if not value.isprintable():
        raise ValueError("must be printable (no control characters)")
    return value


def _known_zone(value: str) -> str:
    from escalate.core.periods import zone

    zone(value)  # an InputError (a ValueError) names an unknown zone
    return value


def _no_dot_dot(value: str) -> str:
    if ".." in value:
        raise ValueError("an id must not contain '..'")
    return value


def _real_moment(value: str) -> str:
    parse_ts(value)  # a ValueError names a 13th month or a 30 February
    return value


Printable = AfterValidator(_printable)
# What each rule of :mod:`escalate.core.events` means for pydantic: the one place that says it.
_CHECKS: dict[Check, Any] = {
    Check.MICROS: Annotated[int, Field(ge=0, le=MAX_MICROS, description=Check.MICROS.value)],
    Check.SIGNED_MICROS: Annotated[int, Field(description=Check.SIGNED_MICROS.value)],
    Check.ID: Annotated[str, Field(pattern=f"^{ID_PATTERN.pattern}$", description=Check.ID.value),
                        AfterValidator(_no_dot_dot)],
    Check.TIMESTAMP: Annotated[str, Field(pattern=f"^{events.TIMESTAMP_PATTERN.pattern}$",
                                          description=Check.TIMESTAMP.value), AfterValidator(_real_moment)],
    Check.NAME: Annotated[str, Field(min_length=1, max_length=MAX_ACTOR_LENGTH, description=Check.NAME.value),
                          Printable],
    Check.SEQ: Annotated[int, Field(ge=1, description=Check.SEQ.value)],
    Check.HASH: Annotated[str, Field(pattern=f"^{events.HASH_PATTERN.pattern}$",
                                     description=Check.HASH.value)],
    Check.MORE: Annotated[int, Field(ge=1)],
    Check.TIMEOUT: Annotated[int, Field(ge=0, le=MAX_TIMEOUT_S)],
    Check.BYTES: Annotated[int, Field(ge=0)],
    Check.TEXT: Annotated[str, Printable],
    Check.REASON: Annotated[str, Field(max_length=MAX_REASON_LENGTH), Printable],
    Check.FILE_NAME: Annotated[str, Field(min_length=1, max_length=MAX_FILE_NAME_LENGTH), Printable],
    Check.DETAIL: Annotated[str, Field(max_length=events.MAX_DETAIL_LENGTH), Printable],
    Check.ZONE: Annotated[str, Field(min_length=1, max_length=MAX_FILE_NAME_LENGTH), Printable,
                          AfterValidator(_known_zone)],
}


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow", strict=True)


def _pydantic_type(hint: Any) -> Any:
    """``hint`` from a TypedDict of :mod:`escalate.core.events`, with its markers made constraints."""
    if get_origin(hint) is Annotated:
        base, *marks = get_args(hint)
        checks = [mark for mark in marks if isinstance(mark, Check)]
        return _CHECKS[checks[0]] if checks else _pydantic_type(base)
    if get_origin(hint) in (Union, types.UnionType):
        return Union[tuple(_pydantic_type(arg) for arg in get_args(hint))]  # noqa: UP007
    if get_origin(hint) is list:
        return types.GenericAlias(list, _pydantic_type(get_args(hint)[0]))  # list[…], of a type made here
    if isinstance(hint, type) and hint in _MODELS_OF:
        return _MODELS_OF[hint]
    return hint


def _field(hint: Any) -> tuple[Any, Any]:
    """``(type, FieldInfo)`` for one TypedDict field: a ``NotRequired`` one reads as null."""
    optional = get_origin(hint) is NotRequired
    if optional:
        hint = get_args(hint)[0]
    doc = None
    if get_origin(hint) is Annotated:
        doc = next((mark.text for mark in get_args(hint)[1:] if isinstance(mark, Doc)), None)
    shape = _pydantic_type(hint)
    # A description only when there is one: None would hide the one the rule's type has.
    if optional:
        return shape | None, (Field(None, description=doc) if doc else Field(None))
    return shape, (Field(description=doc) if doc else Field())


def _model(definition: type, base: type[_Model]) -> type[_Model]:
    hints = get_type_hints(definition, include_extras=True)
    fields: dict[str, Any] = {name: _field(hint) for name, hint in hints.items()
                              if name not in base.model_fields}
    model: type[_Model] = create_model(definition.__name__, __base__=base, __doc__=definition.__doc__,
                                       __module__=__name__, **fields)
    return model


_MODELS_OF: dict[type, type[_Model]] = {}
EscalationPolicy = _MODELS_OF[payloads.EscalationPolicy] = _model(payloads.EscalationPolicy, _Model)
_Envelope = _model(payloads.Envelope, _Model)


class _TaskCapRule(_Model):
    """``run_opened``'s rule across two of its fields (mixed into its model below)."""

    @model_validator(mode="after")
    def _task_cap_within_run_cap(self: Any) -> Any:  # (the fields are run_opened's: made at run time)
        if not task_cap_fits(self.task_cap_micros, self.run_cap_micros):
            raise ValueError("task_cap_micros must not be above run_cap_micros")
        return self


# (A model made at run time is a value to mypy, which cannot be a class's base: create_model.)
_RunOpenedRule: type[_Model] = create_model("_RunOpenedRule", __base__=(_Envelope, _TaskCapRule),
                                            __module__=__name__)


# The pydantic model of each event, named as its TypedDict (``escalate schema`` names them).
MODELS: tuple[type[_Model], ...] = tuple(
    _model(payload, _RunOpenedRule if payload is payloads.RunOpened else _Envelope) for payload in PAYLOADS)

EventModel: Any = Annotated[Union[MODELS], Field(discriminator="type")]  # noqa: UP007

_ADAPTER: TypeAdapter[_Model] = TypeAdapter(EventModel)


def validate_event(event: dict[str, Any]) -> _Model:
    """Parse one event line's object; raises :class:`pydantic.ValidationError` if it is not
    a valid v1 event."""
    return _ADAPTER.validate_python(event)


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


# ---------------------------------------------------------------- docs/events.md tables

MARKDOWN_BEGIN = ("<!-- generated by `python -m escalate.core.schema --markdown`"
                  " from escalate/core/payloads.py -->")
MARKDOWN_END = "<!-- end of generated tables -->"


def markdown_tables() -> str:
    """The envelope and event-type tables of ``docs/events.md``, from the TypedDicts of
    :mod:`escalate.core.payloads` (a test fails when the committed tables differ)."""
    rows = ["| field | meaning |", "|---|---|"]
    for name, hint in get_type_hints(payloads.Envelope, include_extras=True).items():
        rows.append(f"| `{name}` | {_meaning(hint)} |")
    rows += ["", "## Types", "", "| type | payload | meaning |", "|---|---|---|"]
    for payload in PAYLOADS:
        hints = get_type_hints(payload, include_extras=True)
        kind = get_args(hints.pop("type"))[0]
        fields = ", ".join(_payload_field(name, hint) for name, hint in hints.items())
        rows.append(f"| `{kind}` | {fields} | {(payload.__doc__ or '').strip()} |")
    return "\n".join([MARKDOWN_BEGIN, "", *rows, "", MARKDOWN_END]) + "\n"


def _meaning(hint: Any) -> str:
    """A field's meaning: its :class:`~escalate.core.payloads.Doc`, else what its rule says."""
    marks = _marks(hint)
    docs = [mark.text for mark in marks if isinstance(mark, Doc)]
    checks = [mark.value for mark in marks if isinstance(mark, Check)]
    return " ".join(docs or checks) or "—"


def _marks(hint: Any) -> list[Any]:
    if get_origin(hint) is NotRequired:
        return _marks(get_args(hint)[0])
    if get_origin(hint) is Annotated:
        base, *marks = get_args(hint)
        return marks + _marks(base)
    if get_origin(hint) in (Union, types.UnionType):
        return [mark for arg in get_args(hint) for mark in _marks(arg)]
    return []


def _payload_field(name: str, hint: Any) -> str:
    """``name`` with its choices (a Literal) or its object's fields, and when it may be absent."""
    optional = get_origin(hint) is NotRequired
    shape = _bare(hint)
    if get_origin(shape) is list:
        shape = _bare(get_args(shape)[0])
    text = f"`{name}`"
    if get_origin(shape) is Literal:
        text += " (" + "/".join(f"`{choice}`" for choice in get_args(shape)) + ")"
    elif isinstance(shape, type) and shape in _MODELS_OF:
        text += ": `{" + ", ".join(get_type_hints(shape)) + "}`"
    return text + (" (optional)" if optional else "")


def _bare(hint: Any) -> Any:
    """``hint`` without NotRequired, Annotated and None."""
    if get_origin(hint) in (NotRequired, Annotated):
        return _bare(get_args(hint)[0])
    if get_origin(hint) in (Union, types.UnionType):
        return _bare(next(arg for arg in get_args(hint) if arg is not type(None)))
    return hint


def main(argv: list[str]) -> int:
    """``python -m escalate.core.schema [--markdown]``: the JSON Schema, or the docs tables."""
    if argv == ["--markdown"]:
        print(markdown_tables(), end="")
    else:
        print(orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
