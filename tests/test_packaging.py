"""The repository as a newcomer meets it: the package name, the install lines, the pinned
dev tools, and a bare ``pytest`` from the root."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
DISTRIBUTION = "escalate-ledger"


def test_the_distribution_has_a_name_of_its_own() -> None:
    # `escalate` on the package index is someone else's project with its own `escalate` command.
    assert PROJECT["name"] == DISTRIBUTION
    assert PROJECT["scripts"] == {"escalate": "escalate.__main__:main"}


def test_every_install_line_installs_this_project() -> None:
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    targets = {}
    for document in documents:
        for line_number, line in enumerate(document.read_text(encoding="utf-8").splitlines(), start=1):
            for match in re.finditer(r"\b(?:pipx|pip) install ([^\s`]+)", line):
                targets[f"{document.name}:{line_number}"] = match.group(1)
    assert targets, "no install line found"
    # This project by name, from a checkout (.), or a wheel built from one; or a tool it
    # develops with (the throwaway PostgreSQL of docs/scale-out.md), exactly as its dev extra pins it.
    wrong = {where: target for where, target in targets.items()
             if target.strip("'\"").split("[")[0] not in (DISTRIBUTION, ".")
             and not re.fullmatch(r"[\w/]*escalate_ledger-\*\.whl", target)
             and target.strip("'\"") not in PROJECT["optional-dependencies"]["dev"]}
    assert wrong == {}


def test_an_install_from_the_package_index_is_marked_for_after_the_first_release() -> None:
    # Not on the index yet: wherever a document installs it by name, it says so, and how to
    # install it from a checkout or a wheel built there until then.
    for document in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = " ".join(document.read_text(encoding="utf-8").split())
        if re.search(rf"\b(?:pipx|pip) install '?{DISTRIBUTION}\b", text):
            assert "after the first release" in text, document.name
            from_a_checkout = (r"\bpipx? install "
                               r"(?:'\.\[(?:postgres|signing)\]'|\.|[\w/]*escalate_ledger-\*\.whl)")
            assert re.search(from_a_checkout, text), document.name


def test_the_dev_tools_are_pinned_to_what_lint_runs_with() -> None:
    pins = dict(re.fullmatch(r"([\w-]+)==([\w.]+)", requirement).groups()  # type: ignore[union-attr]
                for requirement in PROJECT["optional-dependencies"]["dev"]
                if requirement.startswith(("ruff", "mypy")))
    assert pins == {"ruff": version("ruff"), "mypy": version("mypy")}


def test_a_bare_pytest_from_the_root_collects_the_suite(tmp_path: Path) -> None:
    # `pytest`, not `python -m pytest`: the script does not put the working folder on
    # sys.path. Nor does a regular install, which puts only the package there; the editable
    # install in .venv adds the whole checkout and would hide a test importing `tests.…`. So
    # this runs pytest's entry point as its script does, with the package "installed" alone.
    installed = tmp_path / "site-packages"
    installed.mkdir()
    (installed / "escalate").symlink_to(ROOT / "escalate")
    as_the_script = (
        "import sys; from pathlib import Path; "
        f"sys.path[:] = [{str(installed)!r}] + [p for p in sys.path if p and Path(p).resolve() != "
        f"Path({str(ROOT)!r})]; import pytest; sys.exit(pytest.console_main())")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-P", "-c", as_the_script, "--collect-only", "-q",
                           "-p", "no:cacheprovider"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^\d+ tests collected", done.stdout, re.M), done.stdout[-3000:]
    assert "test_packaging.py::test_a_bare_pytest_from_the_root_collects_the_suite" in done.stdout


@pytest.mark.parametrize("writes", ["runs/r/events.ndjson", None])
def test_a_suite_that_writes_into_the_checkout_fails(tmp_path: Path, writes: str | None) -> None:
    # A checkout of its own with the suite's guard (from tests/conftest.py) and one test,
    # which writes a run into the checkout's runs/ as the default runs root would, or only
    # under tmp_path (and __pycache__, ignored as in this repository): only the first fails.
    checkout = tmp_path / "checkout"
    (checkout / "checks").mkdir(parents=True)
    shutil.copy(ROOT / ".gitignore", checkout / ".gitignore")
    (checkout / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (checkout / "conftest.py").write_text("from tests.conftest import the_tree_stays_clean  # noqa: F401\n",
                                          encoding="utf-8")
    (checkout / "checks" / "test_one.py").write_text(
        "from pathlib import Path\n\n\n"
        "def test_one(tmp_path: Path) -> None:\n"
        f"    for path in (tmp_path / 'runs/r/events.ndjson', Path({writes!r} or tmp_path / 'x')):\n"
        "        path.parent.mkdir(parents=True, exist_ok=True)\n"
        "        path.write_text('{}\\n')\n", encoding="utf-8")
    subprocess.run(["git", "init", "-q", str(checkout)], check=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "checks"],
                          cwd=checkout, env=env, capture_output=True, text=True, timeout=300, check=False)
    if writes is None:
        assert done.returncode == 0, done.stdout[-3000:]
    else:
        assert done.returncode == 1, done.stdout[-3000:]
        assert ("the tests changed the repository (write under tmp_path): ?? runs/r/events.ndjson"
                in done.stdout), done.stdout[-3000:]


@pytest.mark.parametrize(("pytest_exit", "make_fails", "says"), [
    (0, False, ""), (1, True, ""), (5, True, "make test: pytest collected no tests\n")])
def test_make_test_shows_the_command_not_its_recipe(tmp_path: Path, pytest_exit: int, make_fails: bool,
                                                    says: str) -> None:
    # A stand-in python in place of .venv's (its set-up stamp already made): what `make test`
    # prints around pytest, and how pytest's exit status becomes make's.
    (tmp_path / "bin").mkdir()
    stand_in = tmp_path / "bin" / "python"
    stand_in.write_text(f"#!/bin/sh\nexit {pytest_exit}\n", encoding="utf-8")
    stand_in.chmod(0o755)
    (tmp_path / "stamp").touch()
    done = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "test",
                           f"BIN={tmp_path}/bin", f"STAMP={tmp_path}/stamp"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout == f"{tmp_path}/bin/python -m pytest -q -p no:cacheprovider\n"
    assert (done.returncode != 0) == make_fails
    assert done.stderr.startswith(says)
    assert "rc=" not in done.stderr
