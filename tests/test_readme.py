"""The README's quickstart is a real session: every command in it prints what it shows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _quickstart() -> list[tuple[str, list[str]]]:
    block = re.search(r"## Quickstart\n\n```console\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md has no quickstart console block"
    steps: list[tuple[str, list[str]]] = []
    for line in block.group(1).splitlines():
        if line.startswith("$ "):
            steps.append((line[2:].split("  #")[0].strip(), []))
        else:
            steps[-1][1].append(line)
    return steps


def test_the_quickstart_prints_what_the_readme_shows(tmp_path: Path) -> None:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "ESCALATE_RUNS_DIR": str(tmp_path / "runs"), "NO_COLOR": "1"}
    last_exit = 0
    steps = _quickstart()
    assert len(steps) >= 6
    for shown, expected in steps:
        if shown == "echo $?":
            assert [str(last_exit)] == expected
            continue
        command = shown
        if "| jq " in shown:  # jq may not be installed: read the same key with Python
            command, key = shown.split(" | jq .")
            command += f" | {sys.executable} -c \"import json,sys; print(json.load(sys.stdin)['{key}'])\""
        done = subprocess.run(command, shell=True, env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, check=False)
        last_exit = done.returncode
        assert (done.stdout + done.stderr).splitlines() == expected, shown


def test_the_library_example_runs_and_prints_what_its_comment_says(tmp_path: Path) -> None:
    block = re.search(r"## Library\n.*?```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md has no library example"
    done = subprocess.run([sys.executable, "-c", block.group(1)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, check=True)
    promised = re.search(r"print\(run\.state\(\)\.remaining_micros\)\s+# (\d+)", block.group(1))
    assert promised
    assert done.stdout.splitlines()[0] == promised.group(1)
    assert done.stdout.splitlines()[1].split()[0] in ("over_budget", "over_task_cap")
