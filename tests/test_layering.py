"""The packages form layers: no import cycle between them (a cycle means neither side can be
read, tested or changed alone), counted over every import, including those inside functions.
Imports under `if TYPE_CHECKING:` are annotations only and do not count. An import inside a
function is only for lazy loading (a heavy or optional dependency) and says why."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
from collections import defaultdict

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOP = ("megalm", "data_prep", "launcher")


def unit_of(module: str) -> str:
    """The layer a module belongs to: a top-level package, or a subpackage/module of megalm."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "megalm" and len(parts) > 1 else parts[0]


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def internal_imports(path: pathlib.Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import of megalm/data_prep/launcher in a file."""
    tree = ast.parse(path.read_text(), str(path))
    skip, out = _type_checking_nodes(tree), []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
        out += [(n, node.lineno) for n in names if n.split(".")[0] in TOP]
    return out


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_graph() -> dict[str, dict[str, list[str]]]:
    """unit -> {unit it imports: ["file:line", ...]}."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for top in TOP:
        for path in sorted((ROOT / top).rglob("*.py")):
            src = unit_of(module_name(path))
            for name, line in internal_imports(path):
                dst = unit_of(name)
                if dst != src:
                    graph[src][dst].append(f"{path.relative_to(ROOT)}:{line}")
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Strongly connected components with more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_packages():
    graph = unit_graph()
    problems = []
    for comp in cycles(graph):
        edges = [f"{a} -> {b} ({', '.join(graph[a][b][:2])})" for a in comp for b in comp if b in graph.get(a, {})]
        problems.append("cycle " + " / ".join(comp) + ": " + "; ".join(edges))
    assert not problems, "\n".join(problems)


def test_the_check_sees_a_cycle():
    graph = {"a": {"b": ["x:1"]}, "b": {"c": ["y:2"]}, "c": {"a": ["z:3"]}, "d": {"a": ["w:4"]}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert unit_of("megalm.train.loop") == "megalm.train" and unit_of("launcher.env") == "launcher"


def lazy_imports(path: pathlib.Path) -> list[tuple[int, str, bool]]:
    """(line, module, says why) for every import inside a function body. Consecutive import and
    comment lines form one block; the import says why when a comment sits anywhere in its block."""
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines), str(path))
    nodes = sorted({(n.lineno, n.end_lineno, n.module if isinstance(n, ast.ImportFrom) else n.names[0].name)
                    for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))})
    covered = {k for line, end, _ in nodes for k in range(line, end + 1)}

    def in_block(k: int) -> bool:
        return k in covered or (1 <= k <= len(lines) and lines[k - 1].strip().startswith("#"))

    out = []
    for line, end, name in nodes:
        first, last = line, end
        while in_block(first - 1):
            first -= 1
        while in_block(last + 1):
            last += 1
        out.append((line, str(name), any("#" in lines[k - 1] for k in range(first, last + 1))))
    return out


def test_imports_inside_functions_say_why():
    """An import inside a function is lazy loading of something heavy or optional, and says so;
    anything else belongs at the top of the module (where it shows the module's dependencies)."""
    silent = [f"{path.relative_to(ROOT)}:{line} {name}" for top in TOP for path in sorted((ROOT / top).rglob("*.py"))
              for line, name, why in lazy_imports(path) if not why]
    assert not silent, f"{len(silent)} imports inside functions without a reason: " + ", ".join(silent)


def test_the_check_sees_a_silent_import(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\n\n\ndef f():\n    import json\n\n    return json\n\n\n"
                   "def g():\n    # heavy: only g needs it\n    import csv\n    import gzip\n\n    return csv, gzip\n")
    assert lazy_imports(src) == [(5, "json", False), (12, "csv", True), (13, "gzip", True)]


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint(' '.join(sys.modules))"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return set(out.split())


def test_heavy_libraries_stay_out_of_what_does_not_need_them():
    """torch costs `megalm prep` 2 s and ~190 MB in every worker; DeepSpeed costs seconds and must
    not be imported before `megalm train` has chosen its accelerator (DS_ACCELERATOR)."""
    light = _loaded_after("import megalm.cli, data_prep.cli, data_prep.pipeline, launcher.env")
    assert "torch" not in light
    cfg = _loaded_after("from megalm.train.config import load_config\n"
                        "for t in ('lm', 'sft', 'diffusion'):\n"
                        "    load_config(None, [f'task={t}', 'data.paths=[d]', 'train.steps=1'])")
    assert "megalm.train.diffusion" in cfg and "deepspeed" not in cfg
