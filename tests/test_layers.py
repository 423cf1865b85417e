"""Layering you can draw, read from the source (ast): core <- protocol <- flower (Flower glue) <-
entry points (apps/, the deca-flower CLI); Flower's non-public API only behind
deca_flower/flower/internals; no import cycles; the library and the benchmarks never import apps/
or tests/; the ServerApp process holds no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_FLOWER = ("flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.simulation", "flwr_datasets")
DOOR = "deca_flower.flower.internals"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function, `importlib.import_module("...")` included."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from package import module`
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(node.args[0].value)
    return found


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def within(module: str, *roots: str) -> bool:
    return any(module == root or module.startswith(f"{root}.") for root in roots)


LIBRARY = {module_name(p): imports_of(p) for p in sources("deca_flower", "apps")}


def test_only_the_door_reaches_past_flowers_public_api():
    reaching = {module: sorted(i for i in found if within(i, "flwr") and not within(i, *PUBLIC_FLOWER))
                for module, found in LIBRARY.items() if not within(module, DOOR)}
    assert {m: i for m, i in reaching.items() if i} == {}
    assert any(not within(i, *PUBLIC_FLOWER) for i in LIBRARY[f"{DOOR}.relay"] if within(i, "flwr"))  # the walk sees them


@pytest.mark.parametrize(("layer", "may_not_import"), [
    ("deca_flower.core", ("flwr", "flwr_datasets", "deca_flower.protocol", "deca_flower.flower", "deca_flower.config",
                          "apps", "tests")),
    ("deca_flower.protocol", ("deca_flower.flower", "apps", "tests")),
    ("deca_flower", ("apps", "tests", "bench")),
])
def test_layers_import_only_downwards(layer, may_not_import):
    wrong = {module: sorted(i for i in found if within(i, *may_not_import))
             for module, found in LIBRARY.items() if within(module, layer)}
    assert {m: i for m, i in wrong.items() if i} == {}


def test_only_the_flower_glue_and_the_entry_points_import_the_flower_glue():
    users = {module for module, found in LIBRARY.items() if any(within(i, "deca_flower.flower") for i in found)}
    assert all(within(module, "deca_flower.flower", "apps", "deca_flower.cli") for module in users), sorted(users)


def test_the_benchmarks_import_neither_tests_nor_apps():
    wrong = {p.name: sorted(i for i in imports_of(p) if within(i, "tests", "apps")) for p in sources("bench")}
    assert {name: i for name, i in wrong.items() if i} == {}


def test_no_import_cycles():
    graph = nx.DiGraph()
    for module, found in LIBRARY.items():
        for target in found:
            while target and target not in LIBRARY:  # `from package import name` names a module or an object
                target = target.rpartition(".")[0]
            if target and target != module and not within(module, target):  # a package's own __init__ is not a cycle
                graph.add_edge(module, target)
    assert list(nx.simple_cycles(graph)) == []


def test_the_server_app_process_holds_no_torch_or_transformers():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, apps.server_app; "
                               "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"
