"""Run the GitHub Actions workflow of docs/ci.md: its ``run:`` steps, in order, with a
stub ``pip``, the real ``escalate`` and stand-in cost scripts, and check that each ends
as the guide says it does."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

CI_DOC = Path(__file__).parent.parent / "docs" / "ci.md"
GITHUB = {"github.run_id": "1234", "github.run_attempt": "1", "github.actor": "octocat"}


def github_workflow() -> str:
    text = CI_DOC.read_text(encoding="utf-8")
    section = text.split("## GitHub Actions", 1)[1]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def fenced_text_blocks() -> list[str]:
    section = CI_DOC.read_text(encoding="utf-8").split("## GitHub Actions", 1)[1].split("## GitLab", 1)[0]
    return [block.strip() for block in re.findall(r"```text\n(.*?)```", section, re.S)]


def expand(value: str) -> str:
    def known(match: re.Match[str]) -> str:
        return GITHUB[match.group(1)]

    return re.sub(r"\$\{\{\s*([\w.]+)\s*\}\}", known, value)


def parse(workflow: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The workflow's top-level ``env`` and its ``(job, run script)`` steps in order.

    A small reader for the shapes the guide uses (``run: cmd`` and ``run: |`` blocks),
    not a YAML parser."""
    env: dict[str, str] = {}
    steps: list[tuple[str, str]] = []
    lines = workflow.splitlines()
    job = ""
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if line.startswith("env:"):
            while index < len(lines) and lines[index].startswith("  "):
                key, _, value = lines[index].strip().partition(": ")
                env[key] = expand(value)
                index += 1
        elif re.fullmatch(r"  [\w-]+:", line):
            job = line.strip().rstrip(":")
        elif match := re.fullmatch(r"( *(?:- )?)run: (.*)", line):
            key_column, command = len(match.group(1)), match.group(2)
            if command != "|":
                steps.append((job, command))
                continue
            block = []
            while index < len(lines) and (not lines[index].strip()
                                          or len(lines[index]) - len(lines[index].lstrip()) > key_column):
                block.append(lines[index].strip())
                index += 1
            steps.append((job, "\n".join(block)))
    return env, steps


def make_executable(path: Path, body: str) -> None:
    path.write_text(body, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def run_workflow(tmp_path: Path, review_cost: str, fix_cost: str) -> tuple[list[tuple[str, int, str]], Path]:
    env_vars, steps = parse(github_workflow())
    workspace, bin_dir = tmp_path / "workspace", tmp_path / "bin"
    (workspace / "ci").mkdir(parents=True)
    bin_dir.mkdir()
    make_executable(bin_dir / "pip", "#!/bin/sh\necho \"pip $*: escalate is already installed\"\n")
    make_executable(bin_dir / "escalate", f"#!/bin/sh\nexec {sys.executable} -m escalate \"$@\"\n")
    make_executable(workspace / "ci" / "review.sh", f"#!/bin/sh\necho {review_cost}\n")
    make_executable(workspace / "ci" / "fix.sh", f"#!/bin/sh\necho {fix_cost}\n")
    summary = tmp_path / "step_summary.md"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("ESCALATE_", "GITHUB_")) and key not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(env_vars, GITHUB_ACTIONS="true", GITHUB_STEP_SUMMARY=str(summary),
               PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=str(Path(__file__).parent.parent))
    results = []
    for job, script in steps:
        # GitHub runs a step as: bash --noprofile --norc -eo pipefail {script}
        done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
                              cwd=workspace, env=env, capture_output=True, text=True, check=False)
        results.append((job, done.returncode, done.stdout + done.stderr))
    return results, summary


def test_the_guide_has_the_steps_it_describes() -> None:
    env, steps = parse(github_workflow())
    assert env == {"ESCALATE_RUNS_DIR": "runs", "RUN": "ci-1234-1", "ESCALATE_ACTOR": "octocat"}
    commands = "\n".join(script for _, script in steps)
    escalate_jobs = [job for job, script in steps if script.startswith("escalate")]
    assert escalate_jobs == ["open", "review", "fix", "gate"]
    for expected in ('escalate runs init "$RUN"', 'escalate reserve "$RUN" review',
                     'escalate release "$RUN" fix', 'escalate gate "$RUN"'):
        assert expected in commands


def test_within_budget_the_gate_passes(tmp_path: Path) -> None:
    results, summary = run_workflow(tmp_path, review_cost="3.10", fix_cost="2.40")
    assert [(job, code) for job, code, _ in results if code != 0] == []
    passed = fenced_text_blocks()[0]
    assert results[-1][0] == "gate"
    assert results[-1][2].strip() == passed
    assert "## escalate gate ✅ passed: run `ci-1234-1`" in summary.read_text(encoding="utf-8")


def test_over_budget_the_gate_fails_with_the_documented_annotation(tmp_path: Path) -> None:
    results, summary = run_workflow(tmp_path, review_cost="5.00", fix_cost="3.50")
    *work, (job, code, output) = results
    assert [c for _, c, _ in work] == [0] * len(work)
    assert (job, code) == ("gate", 3)
    annotation = fenced_text_blocks()[1]
    assert output.splitlines()[0] == annotation
    assert "## escalate gate ❌ failed: run `ci-1234-1`" in summary.read_text(encoding="utf-8")


def test_a_failed_job_still_releases_its_reservation(tmp_path: Path) -> None:
    # review.sh dies before it can say what it spent: the always() step releases the estimate.
    results, _ = run_workflow(tmp_path, review_cost="; exit 1", fix_cost="2.40")
    assert [job for job, code, _ in results if code != 0] == ["review"]  # the work step only
    job, code, output = results[-1]
    assert (job, code) == ("gate", 0)
    assert "still hold" not in output
    log = tmp_path / "workspace" / "runs" / "ci-1234-1" / "events.ndjson"
    released = {(event["task"], event["actual_micros"])
                for event in map(json.loads, log.read_text(encoding="utf-8").splitlines())
                if event["type"] == "released"}
    assert released == {("review", 4_000_000), ("fix", 2_400_000)}
