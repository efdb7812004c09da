"""The package's shape: imports point down its layers, never in a circle (lazy imports inside functions
included), and the experiment folder's names live in layout.py only."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "pneumo_ray"


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def project_imports(path: Path) -> set[str]:
    """The pneumo_ray modules ``path`` imports anywhere, at the top or inside a function. Imports under
    ``if TYPE_CHECKING:`` are left out: they only name types for readers and never run."""
    found: set[str] = set()
    pending = [ast.parse(path.read_text())]
    while pending:
        node = pending.pop()
        if _type_checking_only(node):
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pneumo_ray"):
            if node.module == "pneumo_ray":  # from pneumo_ray import config, storage
                found.update(f"pneumo_ray.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("pneumo_ray."))
        pending.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> dict[str, set[str]]:
    return {f"pneumo_ray.{p.stem}": project_imports(p) - {f"pneumo_ray.{p.stem}"}
            for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[module] = "done"
        return None

    for module in graph:
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package_not_even_through_lazy_imports():
    graph = import_graph()
    assert "pneumo_ray.sweep" in graph["pneumo_ray.cli"] and "pneumo_ray.train" in graph["pneumo_ray.trial"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_plain_loop_and_the_lower_floors_know_nothing_of_ray_or_the_floors_above():
    graph = import_graph()
    assert graph["pneumo_ray.layout"] == set() and graph["pneumo_ray.errors"] == set()
    assert not graph["pneumo_ray.train"] & {"pneumo_ray.trial", "pneumo_ray.sweep", "pneumo_ray.cluster",
                                             "pneumo_ray.leaderboard", "pneumo_ray.storage"}
    tree = ast.parse((PACKAGE / "train.py").read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {m for m in modules if m == "ray" or m.startswith("ray.")}, "train.py is the plain torch loop"


def test_modules_stay_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert max(sizes.values()) <= 350, {name: n for name, n in sizes.items() if n > 350}


def code_strings(tree: ast.AST) -> list[str]:
    """Every string literal in the code, docstrings left out (they may name files to explain them)."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_experiment_file_names_are_spelled_only_in_layout():
    names = ("pneumo_config.yaml", "optuna.db", "leaderboard.json", "leaderboard.md", "leaderboard.csv",
             "evaluation.json", "predictions.npz", "report.html", "train_state.pt", "model.pt", "meta.json",
             "train_runs", "DIVERGED", "experiment_state-", "searcher-state-", "result.json", "error.txt",
             "checkpoint_*")
    assert "leaderboard.json" in code_strings(ast.parse('"""leaderboard.md"""\nx = "leaderboard.json"'))
    for path in PACKAGE.glob("*.py"):
        if path.name == "layout.py":
            continue
        strings = code_strings(ast.parse(path.read_text()))
        spelled = sorted({name for name in names for text in strings if name in text})
        assert not spelled, f"{path.name} spells {spelled}; import the name from pneumo_ray.layout"
