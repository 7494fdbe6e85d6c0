"""The layers of docs/design.md as a contract: imports only point down, no cycles, no dodges.

Every .py file of the project is parsed (nothing is imported or run). A project import must
go to the importer's own layer or a lower one; the file-level import graph must be acyclic;
and no project module is imported inside a function (tests and benchmarks aside, which may
load what one test needs), except the optional Ray backend.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"utils": 0, "models": 1, "envs": 2, "data": 3, "agent": 4, "pool": 4}
SCRIPT_LAYER = 5  # scripts, bench/, reporting/, tests/: wiring only
SCRIPTS_IN_PACKAGES = {
    "data.generation_script"
}  # a stage command that lives in data/ (the users' design card)
LAZY_ALLOWED = {"pool.ray_backend"}  # imports Ray, an optional dependency
PACKAGES = set(LAYERS) | {"reporting"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    if module in SCRIPTS_IN_PACKAGES:
        return SCRIPT_LAYER
    return LAYERS.get(module.split(".")[0], SCRIPT_LAYER)


def project_files() -> list[Path]:
    skip = {".venv", ".git", "runs", "logs", "datasets", "pretrained"}
    return [p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts)]


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported project module, inside a function?) for every import statement of the file."""
    tree, found = ast.parse(path.read_text()), []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [child.module] + [f"{child.module}.{alias.name}" for alias in child.names]
            for name in names:
                if name.split(".")[0] in PACKAGES:
                    found.append((name, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def resolve(name: str, modules: set[str]) -> str | None:
    """The project module a dotted import name refers to (`agent.seeds.train_seeds` -> `agent.seeds`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def graph() -> dict[str, set[tuple[str, bool]]]:
    files = {module_name(p): p for p in project_files()}
    edges: dict[str, set[tuple[str, bool]]] = {m: set() for m in files}
    for module, path in files.items():
        for name, lazy in imports(path):
            target = resolve(name, set(files))
            if (
                target
                and target != module
                and not (module.startswith(target + ".") or target == module.split(".")[0])
            ):
                edges[module].add((target, lazy))
    return edges


def test_imports_only_point_down():
    upward = [
        f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
        for m, targets in graph().items()
        for t, _ in targets
        if layer(t) > layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_utils_imports_no_other_package():
    found = [
        f"{m} imports {t}"
        for m, targets in graph().items()
        if m.startswith("utils")
        for t, _ in targets
        if not t.startswith("utils")
    ]
    assert not found, "\n".join(found)


def test_no_project_import_inside_functions():
    lazy = [
        f"{m} imports {t} inside a function"
        for m, targets in graph().items()
        for t, inside in targets
        if inside and t not in LAZY_ALLOWED and not m.startswith(("tests.", "bench."))
    ]
    assert not lazy, "\n".join(lazy)


def test_no_import_cycles():
    edges = {m: {t for t, _ in targets} for m, targets in graph().items()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(module: str, stack: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target] if target in stack else [module, target]
            if state.get(target) is None and (cycle := visit(target, stack + [target])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module, [module])):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_the_project():
    """The graph is not empty: the scripts import the packages (a broken walk would pass everything)."""
    edges = graph()
    assert {"agent.search", "pool"} <= {t for t, _ in edges["traincontroller"]}
    assert layer("data.generation_script") == SCRIPT_LAYER and layer("envs.carracing") == 2
