"""The layout of the code (docs/architecture.md): folders by job, one job per module, and
functions that stay short. A module is split when it holds two jobs, not at a line count;
what stays checkable is the length of a function and that the architecture page names
every module where it lives."""

from __future__ import annotations

import ast
import importlib
import re
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


# The casts and ``type: ignore``s escalate may keep: what the type checker cannot see, each
# said where it is (a comment on its line or the one above, beside the ignore itself).
MAX_UNCHECKED = 5
_UNCHECKED = re.compile(r"(?<![.\w])cast\(|# type: ignore")


def _unchecked() -> dict[str, bool]:
    """Every cast and ``type: ignore`` in escalate (``path:line``), and whether a comment
    gives its reason."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if _UNCHECKED.search(line):
                own = re.sub(r"# type: ignore\[[^]]*\]", "", line)
                before = lines[number - 2] if number > 1 else ""
                found[f"{path.relative_to(PACKAGE)}:{number}"] = "#" in own or "#" in before
    return found


def test_casts_and_ignores_are_few_and_each_says_why() -> None:
    unchecked = _unchecked()
    assert [where for where, why in unchecked.items() if not why] == [], "say why, in a comment"
    assert len(unchecked) <= MAX_UNCHECKED, f"type these instead: {sorted(unchecked)}"


def test_the_architecture_page_names_every_module_where_it_lives() -> None:
    modules = {path.relative_to(PACKAGE).with_suffix("").as_posix()
               for path in PACKAGE.rglob("*.py")
               if path.name not in {"__init__.py", "__main__.py", "_version.py"}
               and not path.name.endswith("_cmds.py")}
    named = {name for name in _tree() if not name.endswith("__init__")}
    assert modules - named == set(), "name these in docs/architecture.md's tree"
    assert named - modules == set(), "the tree names modules that are not there"


# The one import that may close a circle: the store factory picks an implementation, which
# in turn implements the seam's protocols.
FACTORY = ("escalate.stores.seam", "open_store")


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    """Each module's imports of escalate's modules that run (at module level or inside a
    function; not those only a type checker reads), the factory's left out."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        unread = {id(node) for branch in ast.walk(tree) if isinstance(branch, ast.If)
                  and "TYPE_CHECKING" in ast.unparse(branch.test)
                  for statement in branch.body for node in ast.walk(statement)}
        factory = {id(node) for function in ast.walk(tree) if isinstance(function, ast.FunctionDef)
                   and (name, function.name) == FACTORY for node in ast.walk(function)}
        for node in ast.walk(tree):
            if id(node) in unread | factory:
                continue
            if isinstance(node, ast.ImportFrom) and node.module:
                # ``from package import module``: an edge to the module. (It runs the package's
                # __init__ first, whose module level imports only leaves such as errors; its lazy
                # __getattr__ runs for a name it re-exports, and then the edge is to the package.)
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                           else node.module for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {target for target in targets if target in modules and target != name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The groups of modules that import each other, directly or around a circle."""
    reach = {name: set(targets) for name, targets in graph.items()}
    changed = True
    while changed:
        changed = False
        for name, reached in reach.items():
            more = set().union(*(reach[target] for target in reached)) - reached
            if more:
                reach[name] = reached | more
                changed = True
    groups: list[set[str]] = []
    for name in sorted(graph):
        group = {name} | {other for other in reach[name] if name in reach[other]}
        if len(group) > 1 and group not in groups:
            groups.append(group)
    return groups


def test_no_import_circle_but_the_store_factory() -> None:
    assert _circles(_imports()) == []


def test_the_circle_check_finds_a_circle() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


# The imports that go up the architecture page's tree, as the page names them (lazy, each
# inside one function): none.
UPWARD: set[tuple[str, str]] = set()


def _layers() -> list[str]:
    """The top-level entries of the architecture page's tree (folders and modules), in order."""
    block = ARCHITECTURE.read_text(encoding="utf-8").split("```", 2)[1]
    return [line.strip().split("  ")[0].rstrip("/") for line in block.splitlines()[2:]
            if line.startswith("  ") and not line.startswith("   ")]


def _upward(graph: dict[str, set[str]], layers: list[str]) -> set[tuple[str, str]]:
    """The imports from a module to one in a layer above its own on the page."""
    def layer(module: str) -> int | None:
        parts = module.split(".")
        return layers.index(parts[1]) if len(parts) > 1 and parts[1] in layers else None

    return {(name, target) for name, targets in graph.items() for target in targets
            if (mine := layer(name)) is not None and (theirs := layer(target)) is not None and theirs < mine}


def test_the_imports_run_down_the_architecture_page_but_where_it_says() -> None:
    assert _upward(_imports(), _layers()) == UPWARD, \
        "docs/architecture.md: reorder its tree, or name the import there and here"


def test_the_layer_check_finds_an_import_that_goes_up() -> None:
    graph = {"escalate.core.x": {"escalate.service"}, "escalate.service": {"escalate.core.x"}}
    assert _upward(graph, ["service", "core"]) == {("escalate.core.x", "escalate.service")}


_CROSS_REFERENCE = re.compile(r":(?:mod|func|class|meth|attr|data|exc):`~?(escalate(?:\.\w+)+)(?:\(\))?`")


def _names_something(dotted: str) -> bool:
    """Whether ``dotted`` names a module of escalate, or something defined in one."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False


def test_every_cross_reference_in_the_code_names_what_is_there() -> None:
    """A docstring that points at code that moved leads a reader nowhere."""
    stale = [f"{path.relative_to(PACKAGE)}:{number}: {match}"
             for path in sorted(PACKAGE.rglob("*.py"))
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             for match in _CROSS_REFERENCE.findall(line) if not _names_something(match)]
    assert stale == []


def _dodges(source: str) -> list[str]:
    """The names imported from escalate under another name while the module binds the
    imported name itself (a function, an argument, a variable): the clash the page forbids."""
    tree = ast.parse(source)
    bound = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    bound |= {node.arg for node in ast.walk(tree) if isinstance(node, ast.arg)}
    bound |= {node.id for node in ast.walk(tree)
              if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    return [f"{alias.name} as {alias.asname}" for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("escalate")
            for alias in node.names if alias.asname and alias.name in bound]


def test_no_module_is_imported_under_another_name_to_dodge_a_local_one() -> None:
    dodges = {path.relative_to(PACKAGE).as_posix(): found for path in sorted(PACKAGE.rglob("*.py"))
              if (found := _dodges(path.read_text(encoding="utf-8")))}
    assert dodges == {}, "name the local apart, or import the module (docs/architecture.md: Names)"


def test_the_dodge_check_finds_a_dodge() -> None:
    assert _dodges("def f(sign):\n    from escalate.x import sign as s\n") == ["sign as s"]
    assert _dodges("from escalate.x import format_usd as usd\n") == []
