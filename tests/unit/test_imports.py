"""The import graph of lab/ and conformance/ (read with ast: top-level, function-level and TYPE_CHECKING imports
all count): no cycle anywhere, render is a leaf below the phases, and the phase protocol imports no phase."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("lab", "conformance")


def project_modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import lab.render.kubeadm as x` -> the module itself
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path) per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return components


def closure(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in edges.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_walk_sees_the_known_edges():
    edges = graph()
    assert "lab.phase" in edges["lab.phases.tune"]
    assert "lab.phases.tune" in edges["lab.pipeline"]
    assert "lab.render.kubeadm" in edges["lab.render.cilium"]
    assert "lab.wait" in edges["conformance.kube"]


def test_no_import_cycle():
    cycles = find_cycles(graph())
    assert not cycles, "import cycles among the project's modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_render_is_a_leaf_below_the_phases():
    edges = graph()
    render = [m for m in edges if m == "lab.render" or m.startswith("lab.render.") or m == "lab.artifacts"]
    assert "lab.render.artifacts" in render
    bad = {m: sorted(d for d in closure(edges, m) if d.startswith("lab.phases") or d == "lab.pipeline")
           for m in render}
    assert not {m: d for m, d in bad.items() if d}, f"render reaches up into the phases: {bad}"


def test_the_phase_protocol_imports_no_phase():
    reached = closure(graph(), "lab.phase")
    assert not [m for m in reached if m.startswith("lab.phases") or m == "lab.pipeline"], sorted(reached)
