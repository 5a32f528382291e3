"""Imports run one way: read from the source (AST), every import of the package (at module level, under
`TYPE_CHECKING` and inside functions) makes a graph with no cycle, in which no floor imports a higher one.

Like the rule that every raise is a `ReGradError` (test_errors.py), this is checked over the source, so that a new
import that goes up a floor or closes a circle fails here rather than at someone's import time.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "regrad_hf"

# The floors of regrad_hf, from the ground up. A room is a sub-package, or "" for the package's own top-level modules
# (the shared floor: errors, config, prompting, files, log, scopes, defaults, auto_registration). A module may import
# its own room and the rooms of lower floors: never another room of its floor, never a higher one. `regrad_hf/__init__`
# (the public names) stands above every floor: it may import anything, and nothing imports it.
FLOORS: list[tuple[str, ...]] = [
    ("",),
    ("adaptation", "hub"),
    ("data",),
    ("bank",),
    ("modeling",),
    ("evaluation", "serving"),
    ("training",),
    ("cli",),
]
# (importer, imported) -> why it cannot be avoided. Empty: keep it so.
ALLOWED: dict[tuple[str, str], str] = {}


def modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Every module of the package at `root`: dotted name -> (file, whether it is a package's `__init__`)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _known(name: str, known: Mapping) -> str | None:
    """`name` if it is a module of the package, else its longest dotted prefix that is (`name` is a name in it)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return None


def imported_modules(name: str, path: Path, is_package: bool, known: Mapping) -> set[str]:
    """The package's modules that `name` imports anywhere in its source, as written: `from . import x` is the module
    `x` when there is one, `from .x import Name` is `x`, relative imports are resolved from `name`'s package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            targets = [f"{module}.{alias.name}" for alias in node.names]  # a module, or a name in `module`
        else:
            continue
        found.update(target for target in map(lambda t: _known(t, known), targets) if target and target != name)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules importing it runs. Importing `a.b.c` from outside package `a.b` also runs `a.b`'s
    `__init__` (and `a`'s, the importer's own root, already running), so that edge is added too."""
    known = modules(root)
    graph = {}
    for name, (path, is_package) in known.items():
        edges = set()
        for target in imported_modules(name, path, is_package, known):
            edges.add(target)
            parts = target.split(".")
            for end in range(2, len(parts)):
                package = ".".join(parts[:end])
                if package in known and not (name == package or name.startswith(package + ".")):
                    edges.add(package)
        graph[name] = edges
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def room_of(module: str, packages: set[str]) -> str | None:
    """The sub-package `module` belongs to, "" for a top-level module, None for the package's own `__init__`."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    return parts[1] if ".".join(parts[:2]) in packages else ""


def floor_violations(root: Path, floors: Sequence[Sequence[str]]) -> list[str]:
    """Each import of a room on the same floor or a higher one, and each module whose room has no floor."""
    graph = import_graph(root)
    packages = {name for name, (_, is_package) in modules(root).items() if is_package}
    floor = {room: number for number, rooms in enumerate(floors) for room in rooms}
    problems = []
    for importer in sorted(graph):
        here = room_of(importer, packages)
        if here is not None and here not in floor:
            problems.append(f"{importer}: its room {here!r} is on no floor; add it to FLOORS")
            continue
        for imported in sorted(graph[importer]):
            there = room_of(imported, packages)
            if (importer, imported) in ALLOWED or here is None or there == here:
                continue
            if there is None:
                problems.append(f"{importer} imports the package's __init__ {imported}")
            elif there in floor and floor[there] >= floor[here]:
                problems.append(f"{importer} (floor {floor[here]}) imports {imported} (floor {floor[there]})")
    return problems


GRAPH = import_graph(SOURCE)


def test_the_package_has_no_import_cycle():
    assert cycles(GRAPH) == []


def test_no_floor_imports_its_own_floor_or_a_higher_one():
    assert floor_violations(SOURCE, FLOORS) == []


def test_every_room_is_on_exactly_one_floor():
    rooms = [room for rooms in FLOORS for room in rooms]
    assert len(rooms) == len(set(rooms))
    packages = {name for name, (_, is_package) in modules(SOURCE).items() if is_package}
    present = {room_of(module, packages) for module in GRAPH} - {None}
    assert present == set(rooms)


def test_the_graph_reads_every_kind_of_import():
    """Relative imports, `from . import module`, imports under TYPE_CHECKING and inside functions all count."""
    assert {"regrad_hf.bank.index", "regrad_hf.bank.persistence"} <= GRAPH["regrad_hf.bank.gradient_bank"]
    assert "regrad_hf.adaptation.learner" in GRAPH["regrad_hf.bank.gradient_bank"]  # `from ..adaptation.learner`
    assert "regrad_hf.adaptation" in GRAPH["regrad_hf.bank.gradient_bank"]  # that runs adaptation/__init__ too
    assert "regrad_hf.scopes" in GRAPH["regrad_hf.adaptation.per_sample"]  # `from .. import scopes`
    assert "regrad_hf.cli.verbs" in GRAPH["regrad_hf.cli.main"]  # inside a function


def write_package(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "pkg"


def test_an_injected_cycle_is_reported(tmp_path):
    """The checker itself: cycles closed by a function-level import, by a TYPE_CHECKING import and through a
    sub-package's `__init__` are found; a clean package passes."""
    package = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from . import b\n",
            "b.py": "def later():\n    from .a import thing\n",
            "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import D\n",
            "d.py": "from .c import C\n",
            "low.py": "from .sub.leaf import value\n",
            "sub/__init__.py": "from .other import thing\n",
            "sub/leaf.py": "value = 1\n",
            "sub/other.py": "from ..low import something\n",
            "fine.py": "import os\nfrom . import a\n",
        },
    )
    assert cycles(import_graph(package)) == [
        ["pkg.a", "pkg.b"],
        ["pkg.c", "pkg.d"],
        ["pkg.low", "pkg.sub", "pkg.sub.other"],
    ]
    clean = write_package(tmp_path / "clean", {"__init__.py": "", "a.py": "from . import b\n", "b.py": "import os\n"})
    assert cycles(import_graph(clean)) == []


def test_an_import_up_a_floor_is_reported(tmp_path):
    package = write_package(
        tmp_path,
        {
            "__init__.py": "from .high import run\n",
            "base.py": "def f():\n    from .high.top import run\n",
            "high/__init__.py": "",
            "high/top.py": "from ..base import f\nfrom ..side import s\n",
            "side/__init__.py": "",
        },
    )
    floors = [("",), ("high", "side")]
    assert floor_violations(package, floors) == [
        "pkg.base (floor 0) imports pkg.high (floor 1)",
        "pkg.base (floor 0) imports pkg.high.top (floor 1)",
        "pkg.high.top (floor 1) imports pkg.side (floor 1)",
    ]
    assert floor_violations(package, [("",), ("high",)]) == [
        "pkg.base (floor 0) imports pkg.high (floor 1)",
        "pkg.base (floor 0) imports pkg.high.top (floor 1)",
        "pkg.side: its room 'side' is on no floor; add it to FLOORS",
    ]
