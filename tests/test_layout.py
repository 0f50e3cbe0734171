"""The code's shape, kept: no import cycle among the launcher's modules (lazy imports inside functions count too),
no module past ~400 lines, no function of the training loop past ~80, and benches that import the library instead
of editing sys.path."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

LAUNCHER = REPO / "launcher"
MAX_MODULE_LINES = 420
MAX_LOOP_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The launcher modules `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("launcher"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
    return found & modules


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and modules importing themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_among_launcher_modules():
    files = {module_name(p): p for p in LAUNCHER.rglob("*.py")}
    graph = {name: imports_of(path, set(files)) - {name} for name, path in files.items()}
    # a package's __init__ importing its own submodule is not a cycle unless the submodule imports the package back
    assert cycles(graph) == []


def test_a_detected_cycle_is_reported():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_launcher_module_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in LAUNCHER.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_of_the_training_loop_is_over_80_lines():
    long = {}
    for path in [*(LAUNCHER / "training").glob("*.py"), LAUNCHER / "train.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LOOP_FUNCTION_LINES:
                    long[f"{path.name}:{node.name}"] = lines
    assert long == {}


def test_benches_import_the_library_without_editing_sys_path():
    edits = [str(p.relative_to(REPO)) for p in (REPO / "bench").glob("*.py")
             if "sys.path.insert" in p.read_text(encoding="utf-8") or "sys.path.append" in p.read_text()]
    assert edits == []
