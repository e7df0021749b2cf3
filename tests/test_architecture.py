"""The package's structure, read from its source: imports point down the layers, one gateway each to rich and typer,
no torch in the configuration, no oversized module (docs/architecture.md explains the parts and the layers).

Every module under src/dinopre is parsed with `ast`, so lazy imports inside functions count as much as those at the
top; imports under `if TYPE_CHECKING:` do not, since they never run.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dinopre"
MAX_LINES = 450

# The layers, lowest first. A module may import modules of its own layer or of lower ones, never of a higher one.
LAYERS = {
    "base": 0,
    "config": 1,
    "model": 2,
    "data": 2,
    "files": 3,
    "train": 4,
    "viz": 5,
    "cli": 6,
    "progress": 6,
    "__init__": 6,
    "__main__": 6,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the package (a package is named by its __init__.py)."""
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    """The layer of a dinopre module: its subpackage's, or its own for a top-level module."""
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else LAYERS["__init__"]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """The modules a file imports when it runs, wherever the import statement stands."""

    def __init__(self) -> None:
        self.found: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:  # only the `else:` of `if TYPE_CHECKING:` runs
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        assert node.level == 0 and node.module, f"relative import of {node.module!r}: the test reads absolute ones"
        for alias in node.names:
            # `from dinopre.model import vit` imports the module dinopre.model.vit; `from dinopre.x import name`, x.
            submodule = f"{node.module}.{alias.name}"
            self.found.add(submodule if submodule in _modules() else node.module)


@cache
def _imports(module: str) -> frozenset[str]:
    visitor = _Imports()
    visitor.visit(ast.parse(_modules()[module].read_text(encoding="utf-8")))
    return frozenset(visitor.found)


def _importers_of(prefix: str) -> set[str]:
    """The dinopre modules that import `prefix` or one of its submodules."""
    return {module for module in _modules()
            if any(name == prefix or name.startswith(prefix + ".") for name in _imports(module))}


def test_every_module_has_a_layer() -> None:
    unplaced = [module for module in _modules() if "." in module and module.split(".")[1] not in LAYERS]
    assert not unplaced, f"give these a layer in LAYERS (and docs/architecture.md): {unplaced}"


def test_imports_point_down_the_layers() -> None:
    """No module imports a module of a higher layer. The package root `dinopre` itself is exempt as a target: Python
    runs it before any of its modules, so naming it (`from dinopre import __version__`) adds no dependency, and the
    next test keeps it free of imports."""
    upward = sorted(f"{module} (layer {_layer(module)}) -> {target} (layer {_layer(target)})"
                    for module in _modules() for target in _imports(module)
                    if target.startswith("dinopre.") and _layer(target) > _layer(module))
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_the_package_root_imports_no_module_of_its_own_when_imported() -> None:
    tree = ast.parse(_modules()["dinopre"].read_text(encoding="utf-8"))
    top_level = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    named = [alias.name for node in top_level for alias in node.names]
    named += [node.module for node in top_level if isinstance(node, ast.ImportFrom) and node.module]
    assert not [name for name in named if name.startswith("dinopre")], named


def test_only_progress_imports_rich() -> None:
    assert _importers_of("rich") <= {"dinopre.progress"}, sorted(_importers_of("rich") - {"dinopre.progress"})


def test_only_the_cli_imports_typer() -> None:
    outside = sorted(module for module in _importers_of("typer")
                     if module != "dinopre.cli" and not module.startswith("dinopre.cli."))
    assert not outside, outside


def test_the_configuration_imports_no_torch() -> None:
    """Settings are read, validated and shown by `dinopre --help` and shell completion, which must stay instant."""
    config = sorted(module for module in _importers_of("torch")
                    if module == "dinopre.config" or module.startswith("dinopre.config."))
    assert not config, config


def test_no_module_is_over_the_line_limit() -> None:
    sizes = {module: len(path.read_text(encoding="utf-8").splitlines()) for module, path in _modules().items()}
    over = sorted(f"{module}: {lines} lines" for module, lines in sizes.items() if lines > MAX_LINES)
    assert not over, f"modules over {MAX_LINES} lines:\n" + "\n".join(over)
