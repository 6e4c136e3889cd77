"""The engine's import graph, read with `ast`: no cycles at import time, and kernels never import the model.

Module-level imports (including those under a top-level `if`/`try`, but not `if TYPE_CHECKING:`) make
the import-time graph; imports inside functions are deferred, but the engine has no cycle through them
either, and the kernels-never-import-the-model rule holds for them too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "engine"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements executed at import: the body, and the bodies of top-level if/try blocks."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If):
            if not _is_type_checking(node):
                out += _module_level(node.body) + _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _module_level(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                out += _module_level(handler.body)
        else:
            out.append(node)
    return out


def imported(module: str, nodes: list[ast.stmt] | list[ast.AST], is_package: bool) -> set[str]:
    """Absolute names of the modules `nodes` import (`from a import b` counts `a.b` when it is a module)."""
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def engine_graph(import_time_only: bool) -> dict[str, set[str]]:
    """engine module -> the engine modules it imports."""
    files = {module_name(path): path for path in ENGINE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        nodes: list[ast.stmt] | list[ast.AST] = (
            _module_level(tree.body) if import_time_only else list(ast.walk(tree))
        )
        graph[module] = {
            name for name in imported(module, nodes, path.name == "__init__.py") if name in files
        }
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_the_engines_imports() -> None:
    graph = engine_graph(import_time_only=True)
    assert "engine.attention.types" in graph["engine.kernels.paged_attention"]
    assert "engine.model.diffusion_gemma" in graph["engine.runner"]


def test_finder_reports_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_engine_has_no_import_cycle() -> None:
    """None at import time, and none even counting the deferred imports inside functions."""
    for import_time_only in (True, False):
        cycle = find_cycle(engine_graph(import_time_only))
        assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_kernels_never_import_the_model() -> None:
    graph = engine_graph(import_time_only=False)
    offenders = {
        module: sorted(name for name in names if name.startswith("engine.model"))
        for module, names in graph.items()
        if module.startswith("engine.kernels")
    }
    assert not any(offenders.values()), f"engine.kernels imports engine.model: {offenders}"
