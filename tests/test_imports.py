"""Imports point one way: no import cycles between protege's modules (counting imports inside
functions, which hide a cycle from Python but not from a reader) and no import from a lower layer
into a higher one. Static (ast), so it is fast and sees every import, taken or not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "protege"

# bottom to top; a module may import its own layer and the ones below. `protege` is the package
# root (__init__), `protege.fileio` the checkpoint/file reading every layer above may use.
LAYERS = [
    ["protege", "protege.errors", "protege.fileio"],
    ["protege.datasets"],
    ["protege.hardware"],  # robots (and their models: panda.py, aloha_model.py)
    ["protege.envs"],  # sim tasks, built on the robots
    ["protege.policies"],
    ["protege.runtime"],
    ["protege.evaluation"],
    ["protege.training"],
    ["protege.cli"],
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: the package modules it imports}, every import statement (top level or in a function)."""
    name = root.name
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                # `from pkg import sub` imports the submodule `pkg.sub` when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules and "." in t:  # `import a.b.c` where c is a name: a.b
                    t = t.rpartition(".")[0]
                if t in modules and (t == name or t.startswith(name + ".")) and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str, layers: list[list[str]]) -> int:
    """The layer whose entry is the longest prefix of `module`."""
    best, level = -1, -1
    for i, entries in enumerate(layers):
        for e in entries:
            if (module == e or module.startswith(e + ".")) and len(e) > best:
                best, level = len(e), i
    if level < 0:
        raise AssertionError(f"{module}: in no layer of LAYERS (tests/test_imports.py); add it")
    return level


def upward_imports(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, bs in graph.items() for b in bs if layer_of(a, layers) < layer_of(b, layers))


def test_no_import_cycles() -> None:
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and graph["protege.cli"], "the scan found too few modules/imports"
    assert cycles(graph) == []


def test_no_upward_imports() -> None:
    assert upward_imports(import_graph(PACKAGE), LAYERS) == []


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """The same checks on a small package with a cycle hidden in a function and a low module importing a high one."""
    pkg = tmp_path / "toy"
    (pkg / "low").mkdir(parents=True)
    (pkg / "high").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "high" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("def f():\n    from toy.high import b\n")
    (pkg / "high" / "b.py").write_text("from ..low import a\n")
    graph = import_graph(pkg)
    assert graph["toy.low.a"] == {"toy.high.b"} and graph["toy.high.b"] == {"toy.low.a"}
    assert cycles(graph) == [["toy.high.b", "toy.low.a"]]
    assert upward_imports(graph, [["toy", "toy.low"], ["toy.high"]]) == ["toy.low.a -> toy.high.b"]
    with pytest.raises(AssertionError, match="in no layer"):
        upward_imports(graph, [["toy.low"]])
