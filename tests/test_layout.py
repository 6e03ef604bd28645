"""The layout of the code (docs/architecture.md): folders by job, one job per module, and
functions that stay short. A module is split when it holds two jobs, not at a line count;
what stays checkable is the length of a function and that the architecture page names
every module where it lives."""

from __future__ import annotations

import ast
from pathlib import Path

import escalate

PACKAGE = Path(escalate.__file__).parent
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"
MAX_FUNCTION_LINES = 60


def _function_sizes() -> dict[str, int]:
    """Lines per function (``path:name``, paths from the package), def line to last line."""
    sizes = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                sizes[f"{name}:{node.name}"] = node.end_lineno - node.lineno + 1
    return sizes


def test_no_function_is_over_its_limit() -> None:
    over = {name: lines for name, lines in _function_sizes().items() if lines > MAX_FUNCTION_LINES}
    assert over == {}, "split these by job (docs/architecture.md says where each part goes)"


def _tree() -> set[str]:
    """The modules the architecture page's tree names, as paths from the package."""
    block = ARCHITECTURE.read_text(encoding="utf-8").split("```", 2)[1]
    named: set[str] = set()
    folders: list[str] = []
    for line in block.splitlines()[2:]:  # the lines under "escalate/"
        indent = len(line) - len(line.lstrip(" "))
        if not line.strip() or indent > 8:
            continue  # a description carried over from the line above
        depth = indent // 2 - 1
        del folders[depth:]
        first = line.strip().split("  ")[0]
        if first.endswith("/"):
            folders.append(first)
            continue
        for name in first.split(", "):  # "money, durations, ids": several leaf modules
            named.add("".join(folders) + name)
    return named


def test_the_architecture_page_names_every_module_where_it_lives() -> None:
    modules = {path.relative_to(PACKAGE).with_suffix("").as_posix()
               for path in PACKAGE.rglob("*.py")
               if path.name not in {"__init__.py", "__main__.py", "_version.py"}
               and not path.name.endswith("_cmds.py")}
    named = {name for name in _tree() if not name.endswith("__init__")}
    assert modules - named == set(), "name these in docs/architecture.md's tree"
    assert named - modules == set(), "the tree names modules that are not there"
