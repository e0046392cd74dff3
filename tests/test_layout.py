"""The package's import rules (README "Layout"), read from the source with ``ast``: every import
statement counts, also lazy ones inside functions and ``if TYPE_CHECKING:`` blocks.

- ``diffusion/`` imports neither ``models/`` nor Lightning;
- ``models/`` does not import ``diffusion/``;
- ``evaluation/`` imports neither the training CLI (``glide_lightning.cli``) nor ``callbacks/``;
- ``sampling/`` (checkpoints to images, the ``sample`` command) imports none of its consumers: ``evaluation/``,
  ``callbacks/``, the training module and CLI, the benchmark and the front door (``commands.py``);
- the package keeps its concepts in folders: at most ``MAX_TOP_LEVEL_MODULES`` top-level files;
- no import cycle between files, nor between folders (each top-level file counts as its own folder).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

PACKAGE = "glide_lightning"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
SAMPLING_CONSUMERS = ("evaluation", "callbacks", "module", "cli", "bench", "commands", "clip_module")
"""What uses ``sampling/`` and so must stay out of it (folders and top-level modules of the package)."""
MAX_TOP_LEVEL_MODULES = 15
"""``glide_lightning/*.py``, ``__init__`` and ``__main__`` included: a new concept gets a folder or joins one."""



def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imported_names(path: Path, name: str) -> set[str]:
    """Every module name an import statement of the file names (absolute; ``from a import b`` gives
    ``a`` and ``a.b``: the caller keeps the names that are modules)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's package, one level up per extra dot
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph(modules: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(file-level edges between package modules, external top-level packages each module imports)."""
    internal: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        outside: set[str] = set()
        for imported in imported_names(path, name):
            if imported.split(".")[0] != PACKAGE:
                outside.add(imported.split(".")[0])
                continue
            # the longest prefix that is a module of the package: ``a.b.c`` (a function c) → ``a.b``
            parts = imported.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts and ".".join(parts) != name:
                targets.add(".".join(parts))
        internal[name], external[name] = targets, outside
    return internal, external


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle ``[a, b, …, a]`` of the directed graph, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def folder(name: str) -> str:
    """``glide_lightning.diffusion.losses`` → ``glide_lightning.diffusion``; a top-level file is its own folder."""
    parts = name.split(".")
    return ".".join(parts[:2])


def in_folder(name: str, folder_name: str) -> bool:
    return name == f"{PACKAGE}.{folder_name}" or name.startswith(f"{PACKAGE}.{folder_name}.")


def edges(graph: dict[str, set[str]]) -> Iterable[tuple[str, str]]:
    return ((a, b) for a, targets in sorted(graph.items()) for b in sorted(targets))


def test_the_graph_sees_every_kind_of_import():
    """The checker is not vacuous: top-level, lazy (inside functions) and package-level imports all appear."""
    graph, external = import_graph(package_modules())
    assert "glide_lightning.diffusion" in graph["glide_lightning.sampling.batch"]  # from glide_lightning.diffusion import …
    assert "glide_lightning.sampling.cascade" in graph["glide_lightning.sampling"]  # a package's __init__ re-exporting
    assert "glide_lightning.evaluation.fid" in graph["glide_lightning.callbacks.metrics"]  # lazy, in a method
    assert "glide_lightning.diffusion.gaussian" in graph["glide_lightning.diffusion.losses"]
    assert "lightning" in external["glide_lightning.module"] and "torch" in external["glide_lightning.diffusion.losses"]


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_folders_import_only_what_the_layout_allows():
    graph, external = import_graph(package_modules())
    violations = []
    for name in graph:
        if in_folder(name, "diffusion"):
            violations += [f"{name} imports {t} (diffusion/ must not import models/)"
                           for t in graph[name] if in_folder(t, "models")]
            violations += [f"{name} imports {t} (diffusion/ must not import Lightning: the network is an argument)"
                           for t in external[name] & {"lightning", "pytorch_lightning"}]
        if in_folder(name, "models"):
            violations += [f"{name} imports {t} (models/ must not import diffusion/)"
                           for t in graph[name] if in_folder(t, "diffusion")]
        if in_folder(name, "evaluation"):
            violations += [f"{name} imports {t} (evaluation/ must not import the training CLI or callbacks/)"
                           for t in graph[name] if t == f"{PACKAGE}.cli" or in_folder(t, "callbacks")]
        if in_folder(name, "sampling"):
            violations += [f"{name} imports {t} (sampling/ must not import what uses it)"
                           for t in graph[name] if any(in_folder(t, consumer) for consumer in SAMPLING_CONSUMERS)]
    assert not violations, "\n".join(sorted(violations))


def test_no_import_cycle_between_files():
    graph, _ = import_graph(package_modules())
    kept: dict[str, set[str]] = {name: set() for name in graph}
    for a, b in edges(graph):
        kept[a].add(b)
    cycle = find_cycle(kept)
    assert cycle is None, "import cycle between files: " + " -> ".join(cycle)


def test_no_import_cycle_between_folders():
    graph, _ = import_graph(package_modules())
    folders: dict[str, set[str]] = {}
    for a, b in edges(graph):
        folders.setdefault(folder(a), set())
        if folder(a) != folder(b):
            folders[folder(a)].add(folder(b))
    cycle = find_cycle(folders)
    assert cycle is None, "import cycle between folders: " + " -> ".join(cycle)


def test_the_sampling_rule_sees_an_upward_import():
    """The sampling rule is not vacuous: the graph holds the sampling files, and their consumers import them."""
    graph, _ = import_graph(package_modules())
    assert {"glide_lightning.sampling.command", "glide_lightning.sampling.checkpoints"} <= graph.keys()
    assert "glide_lightning.sampling.command" in graph["glide_lightning.commands"]
    assert any(in_folder(t, "sampling") for t in graph["glide_lightning.evaluation.zero_shot"])


def test_top_level_modules_stay_few():
    top_level = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(top_level) <= MAX_TOP_LEVEL_MODULES, (
        f"{len(top_level)} top-level modules ({', '.join(top_level)}): put a new one in the folder of its concept")
