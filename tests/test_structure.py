"""The shape of the source, checked like any other regression: small modules and classes, no
import circle, no import against the layers, and no page or PMD geometry written down
outside kernel/geometry.py (arm64 kernels have 16 KiB and 64 KiB pages).

Read from the source with ast; nothing here imports hugepaged.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 300
# 2**9 PTEs, 2**9 - 1, and a 2 MiB PMD: x86's geometry; only kernel/geometry.py may say it.
GEOMETRY_LITERALS = {511, 512, 2 << 20}
GEOMETRY_HOME = "hugepaged.kernel.geometry"

# Layers, lowest first: a module may import its own layer and the ones below.
LAYERS = [
    ("foundation", ("hugepaged", "hugepaged.errors", "hugepaged.names", "hugepaged.paths",
                    "hugepaged.results", "hugepaged.options")),
    ("kernel", ("hugepaged.kernel",)),
    ("policy", ("hugepaged.policy", "hugepaged.tunables", "hugepaged.targets",
                "hugepaged.config", "hugepaged.preflight", "hugepaged.regex_bound")),
    ("scan", ("hugepaged.scan",)),
    ("collapse", ("hugepaged.collapse",)),
    ("daemon", ("hugepaged.daemon",)),
    ("faces", ("hugepaged.control", "hugepaged.cli", "hugepaged.metrics",
               "hugepaged.metrics_http", "hugepaged.report",
               "hugepaged.topview", "hugepaged.logs", "hugepaged.sdnotify",
               "hugepaged.__main__", "hugepaged.firstrun")),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "hugepaged").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = modules()


def layer(name: str) -> int:
    """The layer of a module: the longest prefix that names one."""
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{name}: in no layer of this test's table"
    return rank


def imports(name: str) -> set[str]:
    """Every hugepaged module `name` imports, at the top or inside a function (a lazy import
    is still a dependency)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module
                                                               else [])) if node.level \
                else node.module or ""
            targets = [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


GRAPH = {m: imports(m) for m in MODULES}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_and_class_sizes(name):
    text = MODULES[name].read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{name}: over {MAX_MODULE_LINES} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"{name}.{node.name}: {size} lines"


def _literal(node: ast.AST) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.LShift, ast.Mult, ast.Pow)):
        left, right = _literal(node.left), _literal(node.right)
        if left is not None and right is not None:
            return {ast.LShift: lambda a, b: a << b, ast.Mult: lambda a, b: a * b,
                    ast.Pow: lambda a, b: a ** b}[type(node.op)](left, right)
    return None


# Flag bits of the kernel's interfaces (KPF_KSM is bit 21, PF_KTHREAD 0x00200000): numbers
# that equal 2 MiB without being a size.
FLAG_NAMES = ("KPF_", "PF_", "PM_", "PAGE_IS_", "MADV_", "PR_", "PROC_", "CN_")


def _flags(tree: ast.AST) -> set[int]:
    """ids of the nodes inside an assignment to a flag constant."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and all(
                isinstance(t, ast.Name) and t.id.startswith(FLAG_NAMES) for t in node.targets):
            out.update(id(n) for n in ast.walk(node.value))
    return out


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m != GEOMETRY_HOME))
def test_no_geometry_written_down(name):
    """Numbers, not words: a docstring may say 2 MiB; code takes the running kernel's."""
    tree = ast.parse(MODULES[name].read_text())
    flags = _flags(tree)
    found = [(n.lineno, v) for n in ast.walk(tree) if id(n) not in flags
             and (v := _literal(n)) is not None and v in GEOMETRY_LITERALS]
    assert not found, f"{name}: geometry literal at line(s) {found} (kernel/geometry.py)"


def test_no_import_circle():
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
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

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_no_import_against_the_layers():
    wrong = [(m, d) for m, deps in GRAPH.items() for d in deps if layer(d) > layer(m)]
    assert not wrong, wrong


def test_the_kernel_layer_is_the_only_one_that_opens_proc_or_sys():
    """Paths under /proc or /sys are the kernel layer's (and it takes its roots as
    parameters); a string naming one elsewhere is a second way in."""
    found = []
    for name, path in MODULES.items():
        if name.startswith("hugepaged.kernel"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    node.value.startswith(("/proc/", "/sys/")) and "\n" not in node.value:
                found.append((name, node.lineno, node.value))
    assert not found, found


def test_the_benchmarks_import_the_kit_never_the_tests():
    """bench/ shares kit/ with the tests (issue 17.8): a benchmark that imported `tests`
    would run pytest's package and its conftest's fixtures to measure anything."""
    bench = Path(__file__).resolve().parent.parent / "bench"
    found = []
    for path in sorted(bench.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "tests"]
    assert found == []
