"""The layers of edgepack/ (README "Layers"): imports run downward only, with no cycles, and the
plug-ins (stages, exporters) never import each other. Every import counts, including those
inside functions: a function-local import must not hide a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from edgepack.compress import STAGE_MODULES
from edgepack.export import EXPORTER_MODULES

PACKAGE = Path(__file__).resolve().parent.parent / "edgepack"

# Longest prefix wins. A new module must be placed here (test_every_module_has_a_layer).
LAYERS = {
    "edgepack.errors": 0, "edgepack.parity": 0, "edgepack.measure": 0, "edgepack.costmodel": 0,
    "edgepack.modelstats": 0, "edgepack.provenance": 0,
    "edgepack.spec": 1, "edgepack.stage": 1, "edgepack.bundle": 1, "edgepack.package": 1, "edgepack.intake": 1,
    "edgepack.runtimes": 1, "edgepack.emulators": 1, "edgepack.export.base": 1, "edgepack.kitdocs": 1,
    "edgepack.cache": 1,
    "edgepack.quant": 2,
    "edgepack.compress": 3, "edgepack.export": 3,
    "edgepack.target": 4, "edgepack.profile_sections": 4,
    "edgepack.analysis": 5,
    "edgepack.steps": 6,
    "edgepack.pipeline": 7,
    "edgepack.cli": 8, "edgepack.commands": 8, "edgepack.terminal": 8, "edgepack.tables": 8, "edgepack.fuzz": 8,
    "edgepack.api": 8, "edgepack.fleet": 8, "edgepack": 8,
}
APART = "edgepack.device"  # the on-device kit: stdlib + numpy + a runtime, nothing of edgepack
MAX_LINES = 450
LONG_BY_DESIGN = {"edgepack.device.validate"}  # self-contained: it runs on a phone without edgepack


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def layer_of(module: str) -> int | None:
    best = None
    for prefix, layer in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return None if best is None else best[1]


def _resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """edgepack modules an import statement loads (a name imported from a package counts as its
    submodule when one exists, else as the package itself)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == "edgepack" or a.name.startswith("edgepack.")]
    if node.level:
        package = importer.split(".") if MODULES[importer].name == "__init__.py" else importer.split(".")[:-1]
        base = package[: len(package) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if not (source == "edgepack" or source.startswith("edgepack.")):
        return []
    found = []
    for alias in node.names:
        candidate = f"{source}.{alias.name}"
        found.append(candidate if candidate in MODULES else source)
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for node in ast.walk(tree):  # module level and inside functions alike
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(m for m in _resolve(name, node) if m != name)
        graph[name] = edges
    return graph


GRAPH = import_graph()


def test_every_module_has_a_layer():
    unplaced = [m for m in MODULES if not m.startswith(APART) and layer_of(m) is None]
    assert not unplaced, f"give these modules a layer in tests/test_layers.py and README's Layers: {unplaced}"


def test_imports_run_downward():
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m, targets in GRAPH.items() if not m.startswith(APART)
              for t in sorted(targets) if layer_of(t) is not None and layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    cycles = []
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target in GRAPH and state.get(target) is None:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if state.get(module) is None:
            visit(module)
    assert not cycles, "\n".join(cycles)


def test_stages_and_exporters_never_import_each_other():
    stages = {f"edgepack.compress.{m}" for m in STAGE_MODULES} | {"edgepack.compress.finetune"}
    exporters = {f"edgepack.export.{m}" for m in EXPORTER_MODULES}
    crossings = []
    for module, targets in GRAPH.items():
        for target in targets:
            if module.startswith("edgepack.compress.") and target.startswith("edgepack.export"):
                crossings.append(f"stage {module} imports {target}")
            if module.startswith("edgepack.export.") and target.startswith("edgepack.compress"):
                crossings.append(f"exporter {module} imports {target}")
            if module in exporters and target in exporters:
                crossings.append(f"exporter {module} imports exporter {target}")
    assert stages <= set(MODULES)
    assert not crossings, "\n".join(crossings)


def test_the_device_kit_imports_nothing_of_edgepack():
    leaks = [f"{m} imports {t}" for m, targets in GRAPH.items() if m.startswith(APART) for t in targets]
    assert not leaks, "\n".join(leaks)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in LONG_BY_DESIGN))
def test_modules_stay_small(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module}: {lines} lines; split it by job (README: Layers)"


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    """The resolver counts an import inside a function and resolves relative imports to modules."""
    source = "def f():\n    from ..quant.recipe import Recipe\n    from . import judge\n"
    tree = ast.parse(source)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.update(_resolve("edgepack.steps.speed", node))
    assert found == {"edgepack.quant.recipe", "edgepack.steps.judge"}
