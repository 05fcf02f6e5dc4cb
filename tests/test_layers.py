"""The import graph: entry points on the top floor, nothing importing them, no cycles, and
readers of runs (src.compare) free of TensorFlow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from src.paths import PROJECT_ROOT

ENTRY_POINTS = {"src.train", "src.sweep", "src.predict", "src.evaluate", "src.compare", "src.runs", "src.serve",
                "src.traffic", "src.retrain", "src.pipeline"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The project modules `path` imports (`from src import x` counts as `src.x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in ("src", "benchmarks", "tests")}


GRAPH = {module_name(path): imports_of(path)
         for folder in ("src", "benchmarks", "tests") for path in (PROJECT_ROOT / folder).rglob("*.py")}


@pytest.mark.parametrize("module", sorted(name for name in GRAPH if not name.startswith("tests")))
def test_nothing_in_the_product_imports_an_entry_point_tests_or_benchmarks(module):
    forbidden = {name for name in GRAPH[module] if name.startswith("tests")}
    if not module.startswith("benchmarks"):
        # A benchmark may time what a command does (benchmarks.gate runs src.retrain's round).
        forbidden |= {name for name in GRAPH[module] if name.startswith("benchmarks") or name in ENTRY_POINTS}
    assert not forbidden, f"{module} imports {sorted(forbidden)}"


def test_tests_do_not_import_benchmarks():
    assert not {module: names for module, names in GRAPH.items()
                if module.startswith("tests") and any(name.startswith("benchmarks") for name in names)}


def test_src_has_no_import_cycles():
    graph = {module: {name for name in names if name in GRAPH and name != module}
             for module, names in GRAPH.items() if module.startswith("src")}
    done, path = set(), []

    def visit(module):
        assert module not in path, " -> ".join([*path[path.index(module):], module])
        if module in done:
            return
        path.append(module)
        for name in graph[module]:
            # A package's own `__init__` importing its submodules is not a cycle through them.
            if not module.startswith(f"{name}.") and name in graph:
                visit(name)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_each_campaign_module_imports_only_those_before_it():
    """In the order src/campaigns/__init__.py lists them; `tuned` stands apart."""
    order = ["trials", "repair", "storage", "study", "selection", "summary", "worker"]
    for module in (name for name in GRAPH if name.startswith("src.campaigns.")):
        own = module.split(".")[2]
        before = set(order[:order.index(own)]) if own in order else set()
        imported = {name.split(".")[2] for name in GRAPH[module] if name.startswith("src.campaigns.")}
        assert imported <= before, f"{module} imports {sorted(imported - before)}"


@pytest.mark.parametrize("modules, unloaded", [
    ("src.compare, src.leaderboard", ["tensorflow"]),  # reading runs
    ("src.sweep", ["tensorflow"]),  # preparing or summarising a campaign
    ("src.config", ["tensorflow"]),  # checking a run's config, before anything heavy
    ("src.evaluation.estimators", ["tensorflow", "mlflow"]),  # an estimator is arithmetic
    ("src.serving.decision_log, src.retrain, src.traffic", ["tensorflow"]),  # checked and opened before TF loads
])
def test_light_modules_stay_light(modules, unloaded):
    probe = (f"import sys, matplotlib; matplotlib.use('svg'); import {modules}; "
             f"loaded = [name for name in {unloaded} if name in sys.modules]; assert not loaded, loaded; "
             "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()")
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
