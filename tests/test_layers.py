"""The package's import direction (docs/design.md, "Layers"): every module imports only from its own
layer or an earlier one, only ``engine/zero.py`` imports DeepSpeed, and module-scope imports have no
cycle. Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "s3delta_ds"

# data-flow order; a module may import from its own layer and the layers before it
LAYERS = [
    ("ground", {"errors", "util"}),
    ("config", {"config", "config_yaml"}),
    ("inputs", {"backbones", "data"}),
    ("deltas", {"deltas"}),
    ("method", {"method"}),
    ("engine", {"engine"}),
    ("structure", {"structure"}),
    ("run", {"run"}),
    ("recipes", {"recipes"}),
    ("artifacts", {"artifacts"}),
    ("entry", {"", "__main__", "api", "search", "retrain", "cli"}),
]
RANK = {top: i for i, (_, tops) in enumerate(LAYERS) for top in tops}

# function-local imports of a later layer: (importing module, imported module) -> why
ALLOWED_LAZY = {
    ("s3delta_ds.run.compat", "s3delta_ds.search"): "a compat cell runs whole searches in-process, like an API user",
    ("s3delta_ds.run.compat", "s3delta_ds.retrain"): "a compat cell runs whole retrains in-process, like an API user",
}

DEEPSPEED_ONLY_IN = "s3delta_ds.engine.zero"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = ["s3delta_ds", *path.relative_to(PKG).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    assert top in RANK, f"{module}: not in any layer of tests/test_layers.py (add its package to LAYERS)"
    return RANK[top]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path):
    """(imported module, lazy) for every import in ``module``: lazy when inside a function body.
    Imports under ``if TYPE_CHECKING:`` never run and are skipped."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST, lazy: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    yield from visit_one(sub, lazy)
                continue
            yield from visit_one(child, lazy)

    def visit_one(node: ast.AST, lazy: bool):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, lazy
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in MODULES else base), lazy
        else:
            inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            yield from visit(node, inner)

    yield from visit(ast.parse(path.read_text(), str(path)), False)


IMPORTS = {m: sorted(set(_imports(m, p))) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_imports_point_to_earlier_layers():
    used, bad = set(), []
    for module, imports in IMPORTS.items():
        for target, lazy in imports:
            if target.split(".")[0] != "s3delta_ds" or _layer(target) <= _layer(module):
                continue
            if lazy and (module, target) in ALLOWED_LAZY:
                used.add((module, target))
                continue
            how = "function-local" if lazy else "module-scope"
            bad.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]}), {how}")
    assert not bad, "imports against the layer order (docs/design.md, Layers):\n" + "\n".join(bad)
    assert used == set(ALLOWED_LAZY), f"stale exceptions in ALLOWED_LAZY: {set(ALLOWED_LAZY) - used}"


def test_only_engine_zero_imports_deepspeed():
    importers = {m for m, imports in IMPORTS.items() for t, _ in imports if t.split(".")[0] == "deepspeed"}
    assert importers == {DEEPSPEED_ONLY_IN}


def test_no_cycle_among_module_scope_imports():
    graph = {m: {t for t, lazy in imports if not lazy and t in MODULES and t != m} for m, imports in IMPORTS.items()}
    # Tarjan's strongly connected components
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    assert not cycles, f"module-scope import cycles: {cycles}"


def test_the_rules_see_lazy_and_module_scope_imports():
    # the checker itself: a function-local import is lazy, a module-scope one is not
    api = dict(IMPORTS["s3delta_ds.api"])
    assert api["s3delta_ds.structure"] is False
    assert api["s3delta_ds.run.checkpoint"] is True
    assert ("deepspeed", False) in IMPORTS[DEEPSPEED_ONLY_IN]


def test_structures_need_no_engine():
    # structures, presets, transfers and PaFi masks work where DeepSpeed's runtime does not
    for module, imports in IMPORTS.items():
        if module.startswith("s3delta_ds.structure"):
            assert not [t for t, _ in imports if t.startswith("s3delta_ds.engine")], module
