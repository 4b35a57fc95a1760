"""Package layout rules: no import cycle between kvblend's packages; config and budget load without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import kvblend

ROOT = Path(kvblend.__file__).parent


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "kvblend" or len(parts) < 2:
        return None
    return parts[1]


def _import_graph() -> dict[str, set[str]]:
    """Edges between top-level parts of kvblend (subpackages and top modules), from every import statement."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts)
        src_pkg = _package_of(module if path.name != "__init__.py" else module.rsplit(".", 1)[0] + ".x")
        if src_pkg is None:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "kvblend"]
            for t in targets:
                dst = _package_of(t)
                if dst is not None and dst != src_pkg:
                    graph.setdefault(src_pkg, set()).add(dst)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if state.get(m) is None and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if state.get(n) is None and (c := visit(n)):
            return c
    return None


def test_package_import_graph_has_no_cycle():
    graph = _import_graph()
    assert graph, "no imports found: the scan is broken"
    assert "model" in graph and "fusion" in graph
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle between kvblend packages: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_runner_is_below_fusion_and_kvstore():
    graph = _import_graph()
    assert "fusion" not in graph.get("kvstore", set())
    assert "fusion" not in graph.get("model", set()) and "generation" not in graph.get("model", set())


def test_config_and_budget_import_without_torch():
    code = "import sys, kvblend.config, kvblend.budget, kvblend.vocab, kvblend.io; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
