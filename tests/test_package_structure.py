"""Static (AST-only) checks of the package's structure: import placement, privacy, cycles, one training loop."""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from conftest import FAULT_SUITE

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).parents[1] / "internvit"
PYPROJECT = ROOT.parent / "pyproject.toml"
IMPORT_NAMES = {"pyyaml": "yaml", "pillow": "PIL"}  # distribution name -> import name, where they differ
LOOP_PACKAGES = ("classification", "segmentation")
CLIP_FUNCTIONS = {"clip_grad_norm_", "clip_grad_norm"}
TRY_NODES = (ast.Try, getattr(ast, "TryStar", ast.Try))  # `try/except*` exists from Python 3.11

Import = ast.Import | ast.ImportFrom
Graph = dict[str, dict[str, list[str]]]  # importer -> imported -> ["file:line", ...]


def module_files(root: Path) -> dict[str, Path]:
    """Map every dotted module name under `root` (a package directory) to its file."""
    return {module_name(root, path): path for path in sorted(root.rglob("*.py"))}


def module_name(root: Path, path: Path) -> str:
    """Dotted name of the module stored at `path`, e.g. internvit/engine/__init__.py -> internvit.engine."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def location(root: Path, path: Path, node: ast.AST) -> str:
    """`file:line` of a node, the file relative to the repository."""
    return f"{path.relative_to(root.parent).as_posix()}:{node.lineno}"


def parse(path: Path) -> ast.Module:
    """Parse one source file."""
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def required_imports(pyproject: Path) -> set[str]:
    """Import names of the required dependencies in `[project] dependencies`."""
    deps = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    names = {re.match(r"[A-Za-z0-9_.-]+", dep)[0].lower().replace("-", "_") for dep in deps}
    return {IMPORT_NAMES.get(name, name) for name in names}


def is_type_checking(test: ast.expr) -> bool:
    """Whether an `if` test is `TYPE_CHECKING` or `typing.TYPE_CHECKING`."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level_statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Top-level statements, descending into top-level `try:` and `if TYPE_CHECKING:` blocks."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, TRY_NODES):
            for block in (stmt.body, *(handler.body for handler in stmt.handlers), stmt.orelse, stmt.finalbody):
                yield from module_level_statements(block)
        elif isinstance(stmt, ast.If) and is_type_checking(stmt.test):
            yield from module_level_statements(stmt.body)


def module_level_imports(tree: ast.Module) -> list[Import]:
    """Import statements executed at module level."""
    return [stmt for stmt in module_level_statements(tree.body) if isinstance(stmt, Import)]


def sorted_nodes(nodes: Iterator[ast.AST]) -> list[ast.AST]:
    """Statement/expression nodes in source order (`ast.walk` is breadth-first)."""
    return sorted((node for node in nodes if hasattr(node, "lineno")), key=lambda n: (n.lineno, n.col_offset))


def nested_imports(tree: ast.Module) -> list[Import]:
    """Import statements anywhere below module level (functions, classes, other blocks), in source order."""
    top = {id(node) for node in module_level_imports(tree)}
    return [node for node in sorted_nodes(ast.walk(tree)) if isinstance(node, Import) and id(node) not in top]


def is_package(path: Path) -> bool:
    """Whether the file is a package's `__init__.py`."""
    return path.name == "__init__.py"


def resolve_from(importer: str, package: bool, node: ast.ImportFrom) -> str:
    """Absolute name of the module in `from X import ...`, resolving relative imports against `importer`."""
    if not node.level:
        return node.module or ""
    parts = importer.split(".") if package else importer.split(".")[:-1]
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def top_level_names(importer: str, package: bool, node: Import) -> set[str]:
    """First components of the modules an import statement imports from."""
    if isinstance(node, ast.Import):
        return {alias.name.split(".")[0] for alias in node.names}
    return {resolve_from(importer, package, node).split(".")[0]}


def is_private(name: str) -> bool:
    """A single-underscore name: `_x`, but not a dunder like `__version__`."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def inside(importer: str, package: str) -> bool:
    """Whether module `importer` is `package` itself or lies below it."""
    return importer == package or importer.startswith(package + ".")


def private_module_owner(module: str) -> str | None:
    """The package that owns the first private component of a dotted module path, if any."""
    parts = module.split(".")
    owner = next((i for i, part in enumerate(parts) if is_private(part)), None)
    return None if owner is None else ".".join(parts[:owner])


# modules that may be imported inside a function although their package is required, with the reason: a module of
# a required package that needs an optional one, or one too slow to import for every command that does not use it
LAZY_IMPORTS = {
    "torch.utils.tensorboard": "needs the optional tensorboard package",
    "matplotlib.figure": "half a second of start-up, needed only when a picture is drawn",
}


def imported_modules(importer: str, package: bool, node: Import) -> set[str]:
    """The full names of the modules an import statement imports (from)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    return {resolve_from(importer, package, node)}


def import_offenders(root: Path, required: set[str]) -> list[str]:
    """Imports below module level, unless every module they import is an optional third-party package."""
    not_optional = set(sys.stdlib_module_names) | {root.name} | required
    offenders = []
    for name, path in module_files(root).items():
        for node in nested_imports(parse(path)):
            if imported_modules(name, is_package(path), node) <= set(LAZY_IMPORTS):
                continue
            if top_level_names(name, is_package(path), node) & not_optional:
                offenders.append(f"{location(root, path, node)}: {ast.unparse(node)}")
    return offenders


def imports_private(importer: str, package: bool, node: Import, modules: dict[str, Path]) -> bool:
    """Whether an import takes another module's private name, or a private module from outside its package."""
    root_name = importer.split(".")[0]
    if isinstance(node, ast.Import):
        paths = [alias.name for alias in node.names]
    else:
        source = resolve_from(importer, package, node)
        if source.split(".")[0] != root_name:
            return False
        private = [alias.name for alias in node.names if is_private(alias.name)]
        if source != importer and any(f"{source}.{name}" not in modules for name in private):
            return True
        paths = [source, *(f"{source}.{name}" for name in private)]
    owners = [private_module_owner(path) for path in paths if path.split(".")[0] == root_name]
    return any(owner is not None and not inside(importer, owner) for owner in owners)


def private_import_offenders(root: Path) -> list[str]:
    """Every import, at any level, of another module's private name or of a foreign private module."""
    modules = module_files(root)
    return [
        f"{location(root, path, node)}: {ast.unparse(node)}"
        for name, path in modules.items()
        for node in sorted_nodes(ast.walk(parse(path)))
        if isinstance(node, Import) and imports_private(name, is_package(path), node, modules)
    ]


def import_graph(root: Path) -> Graph:
    """Edges between the package's modules from their module-level imports."""
    modules = module_files(root)
    graph: Graph = {name: {} for name in modules}
    for name, path in modules.items():
        for node in module_level_imports(parse(path)):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                source = resolve_from(name, is_package(path), node)
                submodules = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in modules]
                from_self = source == name and len(submodules) == len(node.names)  # `from . import sub` in __init__
                targets = [*([] if from_self else [source]), *submodules]
            for target in targets:
                if target in modules:
                    graph[name].setdefault(target, []).append(location(root, path, node))
    return graph


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's strongly connected components, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def import_cycles(graph: Graph) -> list[str]:
    """Every cycle (component of more than one module, or a self-import) with the edges that close it."""
    cycles = []
    for component in strongly_connected(graph):
        if len(component) > 1 or component[0] in graph[component[0]]:
            edges = [
                f"    {where}: {src} -> {dst}"
                for src in component
                for dst, wheres in sorted(graph[src].items())
                if dst in component
                for where in wheres
            ]
            cycles.append("cycle: " + ", ".join(component) + "\n" + "\n".join(edges))
    return cycles


def attribute_chain(node: ast.expr) -> list[str]:
    """Names along an attribute/call/subscript chain, e.g. `self.scaler.scale(x)` -> [scale, scaler, self]."""
    names = []
    while isinstance(node, ast.Attribute | ast.Call | ast.Subscript | ast.Name):
        if isinstance(node, ast.Name):
            return [*names, node.id]
        if isinstance(node, ast.Attribute):
            names.append(node.attr)
        node = node.func if isinstance(node, ast.Call) else node.value
    return names


def training_step_calls(root: Path, path: Path) -> list[str]:
    """`.backward(...)`, optimizer/scaler `.step(...)` and `clip_grad_norm_(...)` calls in one module."""
    hits = []
    for node in sorted_nodes(ast.walk(parse(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        stepper = (
            name == "step"
            and isinstance(func, ast.Attribute)
            and any("optimizer" in n.lower() or "scaler" in n.lower() for n in attribute_chain(func.value))
        )
        if name in CLIP_FUNCTIONS or stepper or (name == "backward" and isinstance(func, ast.Attribute)):
            hits.append(f"{location(root, path, node)}: {ast.unparse(node)}")
    return hits


def backward_modules(root: Path) -> list[str]:
    """Modules directly in `root/engine` that call `.backward(...)`."""
    return [
        path.relative_to(root.parent).as_posix()
        for path in sorted((root / "engine").glob("*.py"))
        if any(
            isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "backward"
            for node in ast.walk(parse(path))
        )
    ]


def loop_offenders(root: Path) -> list[str]:
    """Training-step calls in the task packages, which should delegate to the engine's loop."""
    paths = [path for package in LOOP_PACKAGES for path in sorted((root / package).rglob("*.py"))]
    return [hit for path in paths for hit in training_step_calls(root, path)]


def test_every_import_is_at_module_top() -> None:
    """Imports sit at module level; only optional third-party packages may be imported inside functions/classes."""
    offenders = import_offenders(ROOT, required_imports(PYPROJECT))
    assert not offenders, "imports below module level (move them to the top):\n" + "\n".join(offenders)


def test_no_private_cross_module_imports() -> None:
    """No module imports another module's private names, nor a private module from outside its package."""
    offenders = private_import_offenders(ROOT)
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


def test_no_import_cycles() -> None:
    """The module-level import graph between the package's modules is acyclic."""
    cycles = import_cycles(import_graph(ROOT))
    assert not cycles, "module-level import cycles:\n" + "\n".join(cycles)


def test_one_training_step_loop() -> None:
    """Backward/optimizer-step/clipping live in exactly one engine module, not in the task packages."""
    offenders = loop_offenders(ROOT)
    assert not offenders, "training-step calls outside the engine (use the engine's loop):\n" + "\n".join(offenders)
    engine = backward_modules(ROOT)
    assert len(engine) == 1, f"expected exactly one engine module calling .backward(), found: {engine}"


def test_every_fault_suite_entry_names_tests() -> None:
    """Each (file, name prefix) of conftest.FAULT_SUITE matches a test function of that file: the list cannot rot."""
    tests = Path(__file__).resolve().parent
    for file, prefixes in FAULT_SUITE.items():
        names = [n.name for n in ast.walk(parse(tests / file)) if isinstance(n, ast.FunctionDef)]
        for prefix in prefixes:
            base = prefix.split("[")[0]  # a parametrised case: its function
            assert any(name.startswith(base) for name in names if name.startswith("test_")), (file, prefix)
