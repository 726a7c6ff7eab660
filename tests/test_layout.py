"""The package's layering contract, checked over the import graph of src/prunekit (docs/architecture.md).

1. Every prunekit module sits in one layer (`LAYERS`, lowest first) and imports only from its own layer or
   lower ones: the pipeline order graph -> structured/sparse/layers -> recover -> evaluate -> run is visible
   in what may import what.
2. No import cycles between modules (importing `a.b` runs `a/__init__`, so that counts as an edge too).
3. No imports inside functions, except of optional third-party packages (transformers, onnx, matplotlib, ...).
4. `import prunekit` loads neither transformers nor matplotlib nor onnx.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "prunekit"

# lowest first; a module may import modules of its own or a lower layer. Longest prefix wins.
LAYERS = [
    ["prunekit.version", "prunekit.errors"],
    ["prunekit.config", "prunekit.plan", "prunekit.batch", "prunekit.io.atomic", "prunekit.nn", "prunekit.data"],
    ["prunekit.api", "prunekit.objective", "prunekit.graph", "prunekit.graph.labels", "prunekit.graph.ops",
     "prunekit.graph.rules", "prunekit.graph.tracer", "prunekit.graph.groups"],
    ["prunekit.models", "prunekit.calibrate", "prunekit.measure"],
    ["prunekit.structured", "prunekit.sparse", "prunekit.layers"],
    ["prunekit.io"],
    ["prunekit.run.directory"],
    ["prunekit.recover", "prunekit.evaluate"],
    ["prunekit.report", "prunekit.export"],
    ["prunekit.run", "prunekit.run.recipe", "prunekit.run.export"],
    ["prunekit.zoo"],
    ["prunekit.cli", "prunekit"],
]


def layer_of(mod: str) -> int:
    best, layer = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), i
    assert layer is not None, f"{mod} is in no layer of tests/test_layout.py: add it"
    return layer


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """(imported prunekit module, line, inside a function?) for every import in the file."""
    mod = module_name(path)
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    func_lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func_lines.update(range(node.lineno, node.end_lineno + 1))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, node.lineno, node.lineno in func_lines, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, node.lineno in func_lines, []


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def edges():
    out = {m: set() for m in MODULES}
    for m, p in MODULES.items():
        for target, _, _, names in imports(p):
            if not target.startswith("prunekit"):
                continue
            for n in names:                      # `from prunekit.x import y` where y is a submodule
                if f"{target}.{n}" in MODULES:
                    out[m].add(f"{target}.{n}")
            parts = target.split(".")
            for i in range(1, len(parts) + 1):   # importing a.b.c runs a/__init__ and a/b/__init__ first
                pre = ".".join(parts[:i])
                if pre in MODULES and pre != "prunekit" and not m.startswith(pre + ".") and pre != m:
                    out[m].add(pre)
    return out


def test_every_import_respects_the_layers():
    bad = []
    for m, p in MODULES.items():
        for target, line, _, names in imports(p):
            if not target.startswith("prunekit.") or target == "prunekit.version":
                continue
            targets = [f"{target}.{n}" if f"{target}.{n}" in MODULES else target for n in names] or [target]
            for t in targets:
                if layer_of(t) > layer_of(m):
                    bad.append(f"{p.relative_to(SRC.parent)}:{line} imports {t} (layer {layer_of(t)} > {layer_of(m)})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = edges()
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def strong(v):                                      # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strong(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_prunekit_imports_inside_functions():
    bad = [f"{p.relative_to(SRC.parent)}:{line} imports {t} inside a function"
           for m, p in MODULES.items() for t, line, inside, _ in imports(p)
           if inside and (t.startswith("prunekit") or t.startswith("."))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("heavy", ["transformers", "matplotlib", "onnx"])
def test_import_prunekit_is_light(heavy):
    code = f"import sys, prunekit; print('{heavy}' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False", f"import prunekit imported {heavy}"
