"""No import cycle between the project's modules (every import in service/, bench/, loadtest/ and tests/)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "bench", "loadtest", "tests")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO_ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if parts[0] == "bench" and len(parts) == 2:
        return parts[1]  # bench scripts import each other by file name (sys.path holds bench/)
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (REPO_ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts]
    names = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        deps: set[str] = set()
        # Every import, lazy ones inside functions too: a cycle through a deferred import is still a cycle of design
        # (bench/compare.py and bench/gateway_bench.py had one).
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                base = name.split(".")[: -node.level] if path.name != "__init__.py" else name.split(".")
                if path.name == "__init__.py" and node.level > 1:
                    base = name.split(".")[: -(node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in names and t != name}
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = _graph()
    assert "compare" in graph and "gateway_bench" in graph and "service.gateway.dataplane" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
