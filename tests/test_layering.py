"""The code layout's layers (README, "Layout of the code"): every import, module-level or inside a function, runs
down the layers, and no two project modules import each other (directly or round a longer cycle).

Data flows pretrain -> artifact -> engine -> record -> report; imports run toward the formats each stage reads
or writes, never back up:

    records    leaderboard/records.py, runs.py   the result record and run-folder format; imports no project code
    transfer   transfer/                         artifact, loading, datasets (real-layout loaders), minidata,
                                                 errors, engines; imports records only
    pretrain   pretrain/                         writes artifacts; imports transfer (not its engines) and records
    report     leaderboard/ (report, html, ...)  reads records; imports records only
    benchmarks benchmarks/                       specs, `bench` CLI, runner, sweep, datacheck, perf, parity: the top
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmarks", "leaderboard", "pretrain", "transfer")
ALLOWED = {  # layer -> the layers below it that it may import (besides itself)
    "records": set(),
    "transfer": {"records"},
    "pretrain": {"transfer", "records"},
    "report": {"records"},
    "benchmarks": {"transfer", "pretrain", "report", "records"},
}
ENGINES = {"transfer.linear", "transfer.detection", "transfer.detection_data", "transfer.detectron2_engine",
           "transfer.det_eval", "transfer.segmentation", "transfer.mmcv_compat"}


def layer(module: str) -> str:
    if module in ("leaderboard.records", "leaderboard.runs"):
        return "records"
    top = module.split(".")[0]
    return "report" if top == "leaderboard" else top


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(module: str, path: Path, modules: dict) -> set[tuple[str, int]]:
    """(imported project module, line) for every import statement anywhere in the file."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and name.split(".")[0] in PACKAGES and "." in name:
                found.add((name, node.lineno))
    return found


def import_graph() -> dict[str, set[tuple[str, int]]]:
    modules = project_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def upward_imports(graph) -> list[str]:
    bad = []
    for module, targets in graph.items():
        for target, line in sorted(targets):
            if layer(target) != layer(module) and layer(target) not in ALLOWED[layer(module)]:
                bad.append(f"{module}:{line} imports {target} ({layer(module)} -> {layer(target)})")
            elif layer(module) == "pretrain" and target in ENGINES:
                bad.append(f"{module}:{line} imports the engine {target} (pretraining writes artifacts only)")
    return bad


def cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    edges = {m: {t for t, _ in targets} for m, targets in graph.items()}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_import_runs_down_the_layers():
    bad = upward_imports(import_graph())
    assert not bad, "imports running back up the layers:\n" + "\n".join(bad)


def test_no_import_cycles_between_project_modules():
    found = cycles(import_graph())
    assert not found, "modules importing each other:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_local_and_package_imports(tmp_path):
    """The checker itself: function-local imports, `from pkg import module`, and a two-module cycle are caught."""
    modules = {"transfer.a": tmp_path / "a.py", "transfer.b": tmp_path / "b.py", "benchmarks.spec": None}
    (tmp_path / "a.py").write_text("def f():\n    from benchmarks import spec\n    from transfer import b\n")
    (tmp_path / "b.py").write_text("import transfer.a as a\n")
    graph = {m: imports_of(m, p, modules) for m, p in modules.items() if p}
    assert upward_imports(graph) == ["transfer.a:2 imports benchmarks.spec (transfer -> benchmarks)"]
    assert cycles(graph) == [["transfer.a", "transfer.b"]]
