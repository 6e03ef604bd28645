"""The sessions docs/escalation.md calls real output are replayed command by command in real
processes (all but the steps that must wait a second or a minute): each prints what the guide
shows, times and ages aside, so the guide cannot drift from what people actually see."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "escalation.md"
# What differs from one run to the next: instants, ages and times left.
_TIMES = [(re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z"), "<time>"),
          (re.compile(r"\b(?:in )?\d+[hms](?:\d+m)?\b *"), "<age> ")]


def console_blocks(section: str) -> list[str]:
    """The ``console`` blocks of the guide's section headed ``section``, in order."""
    text = GUIDE.read_text(encoding="utf-8").split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```console\n(.*?)```", text, re.S)


def steps(block: str) -> list[tuple[str, list[str]]]:
    """``(command, lines it prints, ending in [exit N])`` for each ``$`` line of ``block``."""
    found: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            found.append((line[2:], []))
        else:
            found[-1][1].append(line)
    return found


def _without_times(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        plain = line.rstrip()
        for pattern, placeholder in _TIMES:
            plain = pattern.sub(placeholder, plain)
        out.append(plain)
    return out


# The guide's sessions run in the OS account ``ci``, whatever account runs the tests: what
# the file store vouches for (``alice [ci]``) is then the same everywhere.
_AS_CI = '''import pwd, os
_real = pwd.getpwuid
def getpwuid(uid):
    return _real(uid) if uid != os.geteuid() else pwd.struct_passwd(("ci", *_real(uid)[1:]))
pwd.getpwuid = getpwuid
'''


def session_env(runs_dir: Path) -> dict[str, str]:
    """The environment of the guide's sessions: ``COLUMNS=100``, ``ESCALATE_ACTOR=ci``, the
    OS account ``ci`` (:data:`_AS_CI`), ``runs_dir``."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("ESCALATE_") and key not in ("NO_COLOR", "FORCE_COLOR")}
    shim = runs_dir.parent / "as-ci"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(_AS_CI)
    env.update(COLUMNS="100", ESCALATE_ACTOR="ci", ESCALATE_RUNS_DIR=str(runs_dir),
               PYTHONPATH=str(shim),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def replay(blocks: list[str], runs_dir: Path) -> None:
    """Run every command of ``blocks`` in order as the guide says (:func:`session_env`)
    and compare what it prints, stdout and stderr as a terminal shows them, with the
    guide. A command ending in ``&`` runs in the background: the lines under it are what it
    prints before it waits, and a later block without commands is what it prints when it
    ends (exit 0)."""
    env = session_env(runs_dir)
    background: subprocess.Popen[str] | None = None
    for block in blocks:
        if not block.startswith("$ "):
            assert background is not None, block
            rest, _ = background.communicate(timeout=60)
            assert background.returncode == 0
            assert _without_times(rest.splitlines()) == _without_times(block.splitlines())
            background = None
            continue
        for command, shown in steps(block):
            if command.endswith(" &"):
                background = subprocess.Popen(["bash", "-c", f"{command[:-2]} 2>&1"], env=env,
                                              cwd=runs_dir.parent, stdout=subprocess.PIPE, text=True)
                assert background.stdout is not None
                # Reading its lines is waiting until it has asked: no race with what follows.
                printed = [background.stdout.readline().rstrip("\n") for _ in shown]
                assert _without_times(printed) == _without_times(shown), command
                continue
            done = subprocess.run(["bash", "-c", f"{command} 2>&1; echo \"[exit $?]\""], env=env,
                                  cwd=runs_dir.parent, stdout=subprocess.PIPE, text=True, timeout=60,
                                  check=False)
            assert _without_times(done.stdout.splitlines()) == _without_times(shown), command
    assert background is None


def test_the_inbox_prints_what_the_guide_shows(tmp_path: Path) -> None:
    # Up to the sweep, which resends notices only a minute later.
    replay(console_blocks("The inbox")[:1], tmp_path / "runs")


def test_a_teams_session_prints_what_the_guide_shows(tmp_path: Path) -> None:
    # All but the hotfix run, whose escalation must first outlive its one-second timeout.
    blocks = [block for block in console_blocks("A team's session") if "--escalation-timeout 1s" not in block]
    assert len(blocks) == 7
    replay(blocks, tmp_path / "runs")
