"""The docs keep up with the code: every command is in the generated CLI reference, the
reference is not stale, every event the code writes validates against ``escalate schema``,
and the hot commands never load rich or pydantic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from escalate import Ledger, Pending, Refused
from escalate.cli.reference import iter_commands, render
from escalate.core.events import EVENT_TYPES
from tests.conftest import FakeClock

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"


def test_cli_reference_is_current() -> None:
    """Regenerate with: python -m escalate.cli.reference > docs/cli.md"""
    assert (DOCS / "cli.md").read_text(encoding="utf-8") == render(), (
        "docs/cli.md is stale: run 'python -m escalate.cli.reference > docs/cli.md'")


def test_every_command_is_documented() -> None:
    reference = (DOCS / "cli.md").read_text(encoding="utf-8")
    paths = [path for path, _ in iter_commands()]
    assert {"escalate gate", "escalate schema", "escalate runs show", "escalate runs watch",
            "escalate reserve"} <= set(paths)
    for path, context in iter_commands():
        assert f"\n## {path}\n" in reference, f"{path} is missing from docs/cli.md"
        assert (context.command.help or "").strip(), f"{path} has no help text"
    # The guides name every top-level command a user types at least once.
    guides = "".join(p.read_text(encoding="utf-8") for p in DOCS.glob("*.md") if p.name != "cli.md")
    for path in paths[1:]:
        assert f"`{path}" in guides or f"{path} " in guides, f"no guide mentions {path}"


def test_docs_link_to_files_that_exist() -> None:
    import re

    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if target == "escalation.md" and not (DOCS / target).exists():
                continue  # written alongside the escalation commands
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def drive_every_event_type(runs_dir: Path) -> None:
    """A run through reserve, increase, release, halts, escalations (approved, paused,
    cancelled, timed out, shadow, extend not offered), a policy change and a torn tail."""
    clock = FakeClock()
    run = Ledger.init(runs_dir, "all", cap="10", task_cap="6", escalation="enforce",
                      approval_threshold="3", escalation_timeout_s=60, max_extension="1", clock=clock)

    def escalated(task: str, amount: str) -> str:
        with pytest.raises(Pending) as pending:
            run.reserve(task, amount)
        return str(pending.value.escalation_id)

    run.reserve("t1", "2")
    run.increase("t1", "2.5", reason="long diff")
    run.release("t1", "2.2")
    run.approve(escalated("t2", "4"), by="lead")
    run.pause(escalated("t3", "5"), by="lead")
    run.cancel(escalated("t4", "3.5"), by="lead")
    with pytest.raises(Refused):
        run.reserve("t5", "7")  # over the task cap
    escalated("t6", "5.5")  # needs 1.7 more than is left: extend not offered, with a note
    clock.advance(61)
    run.set_policy(escalation="shadow")  # also times out t6's escalation first
    with pytest.raises(Refused):
        run.reserve("t7", "5")  # shadow escalation, then the run-cap halt
    with (runs_dir / "all" / "events.ndjson").open("ab") as log:
        log.write(b'{"v":1,"seq"')  # a torn tail: the next write sets it aside
    run.reserve("t8", "0.1")
    hooked = Ledger.init(runs_dir, "hooked", cap="1", escalation="enforce", approval_threshold="0.5",
                         renotify_every_s=600, clock=clock, notify_cmd="exit 3")
    with pytest.raises(Pending):
        hooked.reserve("big", "0.75", reason="needs a GPU", priority="urgent")  # a failed notice on record
    off = Ledger.init(runs_dir, "off", cap="1", clock=clock)
    off.reserve("x", "1")
    off.release("x", "1.5")
    off.archive()  # finished: retired for good
    # A pool (pool_opened, run_joined, its policy_changed with a cap) and a member run's
    # pool_cap escalation approved with a pool extension, then a pool_cap halt.
    from escalate.pools.pool import Pool

    pool = Pool.init(runs_dir, "pool", cap="2", period="day", tz="Europe/Berlin", escalation="enforce",
                     max_extension="1", clock=clock)
    member = Ledger.init(runs_dir, "member", pool="pool", cap="5", clock=clock)
    member.approve(escalated_in(member, "p1", "2.5"), by="lead")
    pool.set_policy(escalation="off", cap="2.5")
    with pytest.raises(Refused):
        member.reserve("p2", "1")
    # A 'runs init off --pool pool' that lost the race for the id: its join is voided.
    from escalate.pools import void

    void.join(member.runs_store, "pool", off.store, actor="tester", clock=clock, lock_timeout=5,
              create=lambda: False)
    # A quorum of two: the first approval is recorded short of it (escalation_approved).
    quorate = Ledger.init(runs_dir, "quorate", cap="1", escalation="enforce", approval_threshold="0.5",
                          quorum=2, clock=clock)
    asked = escalated_in(quorate, "q", "0.75")
    quorate.approve(asked, by="alice")
    quorate.approve(asked, by="bob")


def escalated_in(run: Ledger, task: str, amount: str) -> str:
    with pytest.raises(Pending) as pending:
        run.reserve(task, amount)
    return str(pending.value.escalation_id)


def test_every_written_event_validates_against_the_schema(runs_dir: Path) -> None:
    from escalate.core.schema import MODELS, json_schema, validate_event

    drive_every_event_type(runs_dir)
    seen: dict[str, int] = {}
    resolutions, halt_reasons, extras = set(), set(), set()
    fields = {model.model_fields["type"].annotation.__args__[0]: set(model.model_fields)  # type: ignore[union-attr]
              for model in MODELS}
    for run_id in sorted(path.name for path in runs_dir.iterdir()):  # runs and pools
        for line in (runs_dir / run_id / "events.ndjson").read_bytes().splitlines():
            event: dict[str, Any] = json.loads(line)
            validate_event(event)
            unknown = set(event) - fields[event["type"]]
            assert not unknown, f"{event['type']} writes fields the schema does not describe: {unknown}"
            seen[event["type"]] = seen.get(event["type"], 0) + 1
            if event["type"] == "escalation_resolved":
                resolutions.add((event["mode"], event["by"]))
            if event["type"] == "halt":
                halt_reasons.add(event["reason"])
            extras |= {key for key in ("note", "kind", "needed_extension_micros", "request_reason",
                                       "priority", "pool", "pool_extension_micros", "cap_micros")
                       if key in event and event["type"] not in ("pool_opened", "run_joined")}
            extras |= {key for key in ("renotify_every_s",) if key in event.get("escalation", {})}
    assert set(seen) == set(EVENT_TYPES)
    assert {("extend", "lead"), ("pause", "lead"), ("cancel", "lead"), ("pause", "timeout")} <= resolutions
    assert halt_reasons == {"run_cap", "task_cap", "cancelled", "pool_cap"}
    assert extras == {"note", "kind", "needed_extension_micros", "request_reason", "priority",
                      "renotify_every_s", "pool", "pool_extension_micros", "cap_micros"}
    schema = json_schema()
    assert schema["$schema"].endswith("2020-12/schema")
    assert {m.__name__ for m in MODELS} <= set(schema["$defs"])


def test_schema_rejects_what_no_writer_produces() -> None:
    from pydantic import ValidationError

    from escalate.core.schema import validate_event

    good = {"v": 1, "seq": 2, "ts": "2026-11-23T14:00:00.000000Z", "type": "budget_reserved",
            "prev": "0123456789abcdef", "actor": "a", "task": "t", "amount_micros": 5}
    validate_event(good)
    validate_event({**good, "future_field": 1})  # readers ignore fields they do not know
    for broken in ({"amount_micros": 2.5}, {"amount_micros": -1}, {"amount_micros": "5"},
                   {"type": "budget_reserve"}, {"prev": "xyz"}, {"task": "../etc"}, {"v": 2},
                   {"ts": "2026-11-23 14:00:00"}):
        with pytest.raises(ValidationError):
            validate_event({**good, **broken})


def test_schema_command_prints_the_schema(cli: Any) -> None:
    from escalate.core.schema import json_schema

    result = cli("schema")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == json_schema()
    assert json.loads(cli("schema", "--json").stdout) == json_schema()


HOT_PROBE = """
import sys
{setup}
for argv in (['reserve', 'hot', 't', '-e', '1'], ['increase', 'hot', 't', '--to', '2'],
             ['release', 'hot', 't', '-a', '1'], ['reserve', 'hot', 'u', '-e', '99']):
    {call}
print(sorted(m for m in ('rich', 'pydantic', 'escalate.reports.render', 'escalate.core.schema',
                        'escalate.core.payloads', 'escalate.reports.gate', 'escalate.reports.report',
                        'escalate.reports.runs', 'escalate.cli.runs_cmds', 'escalate.cli.escalation_cmds')
             if m in sys.modules))
"""


@pytest.mark.parametrize(("setup", "call", "loaded"), [
    # The CLI: rich, pydantic and our schema stay unloaded (typer is pinned below 0.29,
    # which would build a pydantic adapter for every option on every call), and so do the
    # other commands' modules: a hot command builds an app of its own module only.
    ("from escalate.cli import main",
     "sys.argv = ['escalate', *argv]\n    try:\n        main()\n    except SystemExit:\n        pass",
     []),
    # The library a scheduler imports: neither rich nor pydantic.
    ("from escalate import Ledger, EscalateError\nrun = Ledger.open('runs', 'hot')",
     "try:\n        getattr(run, argv[0])(argv[2], argv[4])\n    except EscalateError:\n        pass",
     []),
], ids=["cli", "library"])
def test_hot_commands_load_neither_rich_nor_our_schema(runs_dir: Path, setup: str, call: str,
                                                        loaded: list[str]) -> None:
    Ledger.init(runs_dir, "hot", cap="5")
    probe = HOT_PROBE.format(setup=setup, call=call)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          cwd=runs_dir.parent)
    assert done.stdout.strip().splitlines()[-1] == repr(loaded), done.stdout + done.stderr


def test_version_is_defined_in_one_place(cli: Any) -> None:
    import tomllib

    from escalate._version import __version__

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "escalate._version.__version__"}
    assert cli("--version").stdout == f"escalate {__version__}\n"


def test_every_declared_marker_is_used() -> None:
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    declared = [entry.split(":")[0] for entry in project["tool"]["pytest"]["ini_options"]["markers"]]
    tests = "".join(path.read_text(encoding="utf-8") for path in (ROOT / "tests").glob("test_*.py"))
    for marker in declared:
        assert re.search(rf"\bmark\.{marker}\b", tests), f"the {marker} marker is declared but not used"


def test_library_guide_runs_as_written(runs_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    import re

    text = (DOCS / "library.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    monkeypatch.chdir(runs_dir.parent)
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(compile(block, "docs/library.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    # Each print in the guide states its output in a trailing comment.
    promised = [line.split("# ", 1)[1].strip() for block in blocks for line in block.splitlines()
                if "print(" in line and "# " in line]
    assert len(promised) == 8
    assert printed == promised


def test_the_event_tables_in_the_docs_are_generated_from_the_definitions() -> None:
    from escalate.core.schema import MARKDOWN_BEGIN, MARKDOWN_END, markdown_tables

    text = (ROOT / "docs" / "events.md").read_text()
    committed = text[text.index(MARKDOWN_BEGIN):text.index(MARKDOWN_END) + len(MARKDOWN_END)] + "\n"
    assert committed == markdown_tables(), "paste the output of python -m escalate.core.schema --markdown"


def test_the_constants_and_the_schema_come_from_the_payload_definitions() -> None:
    from typing import get_args, get_type_hints

    from escalate.core import events, ids, payloads, schema

    kinds = tuple(get_args(get_type_hints(payload)["type"])[0] for payload in payloads.PAYLOADS)
    assert kinds == events.EVENT_TYPES
    assert [model.__name__ for model in schema.MODELS] == [payload.__name__ for payload in payloads.PAYLOADS]
    envelope = set(get_type_hints(payloads.Envelope))
    for model, payload in zip(schema.MODELS, payloads.PAYLOADS, strict=True):
        assert set(model.model_fields) == envelope | set(get_type_hints(payload))
    definitions = schema.json_schema()["$defs"]
    assert definitions["Halt"]["properties"]["reason"]["enum"] == list(events.HALT_REASONS)
    assert definitions["EscalationPolicy"]["properties"]["mode"]["enum"] == list(events.MODES)
    assert definitions["Escalation"]["properties"]["id"]["pattern"] == f"^{ids.ID_PATTERN.pattern}$"
