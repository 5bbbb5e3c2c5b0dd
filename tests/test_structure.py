"""The package's shape, as issue 21 set it: no module over 500 lines, no import cycle between modules (imports
inside functions counted), no function over 60 lines unless its docstring or a comment says why."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "frcnn_shard"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
LONG_REASON = "long because"  # a function over MAX_FUNCTION_LINES says why, in these words, in a comment or docstring


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a relative ``from`` import names."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its body (function bodies included).

    ``from .pkg import name`` counts as an import of ``pkg.name`` when that is a module, else of ``pkg``.
    TYPE_CHECKING-only imports are counted too: a cycle is a cycle for the reader.
    """
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        deps: set[str] = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, is_package, node)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:
                        deps.add(sub)
                    elif target in modules:
                        deps.add(target)
        graph[module] = deps - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, first == last), or None; a package's own __init__ importing its
    submodules, and a submodule importing a sibling through the package, are both edges like any other."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_is_over_500_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph(_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_over_60_lines_without_a_stated_reason():
    long = []
    for name, path in _modules().items():
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                body = ast.get_source_segment(source, node) or ""
                if n > MAX_FUNCTION_LINES and LONG_REASON not in body:
                    long.append(f"{name}.{node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines with no '{LONG_REASON} ...': {long}"


@pytest.mark.parametrize("graph,cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"a.x"}, "a.x": {"a"}}, ["a", "a.x", "a"]),
])
def test_the_cycle_finder_finds_cycles(graph, cycle):
    """The checker itself can fail: a three-module cycle and a package/child cycle are found, a chain is not."""
    assert find_cycle(graph) == cycle


def test_imports_inside_functions_count(tmp_path):
    """An import hidden in a function body is an edge (ray_engine and build imported each other that way)."""
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    modules = {"p": pkg / "__init__.py", "p.a": pkg / "a.py", "p.b": pkg / "b.py"}
    assert find_cycle(import_graph(modules)) == ["p.a", "p.b", "p.a"]


def test_every_exception_of_the_package_has_the_common_root():
    """A caller can catch everything frcnn-shard raises on purpose with one class (warnings aside)."""
    import importlib
    import inspect

    from frcnn_shard.errors import FrcnnShardError

    rootless = []
    for name in _modules():
        if name.endswith("ray_engine") or name == "frcnn_shard.build.ray_engine":
            continue  # imports ray only inside functions, but keep the sweep cheap and free of optional deps
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if (inspect.isclass(obj) and obj.__module__ == name and issubclass(obj, BaseException)
                    and not issubclass(obj, (Warning, KeyboardInterrupt)) and not issubclass(obj, FrcnnShardError)):
                rootless.append(f"{name}.{attr}")
    assert not rootless, f"exceptions without FrcnnShardError as a base: {rootless}"
