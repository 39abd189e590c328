"""The architecture's import rules, read from the source: the library never imports the CLI layer, and
recipes do not import each other (what they share lives in methods/recipes/shared.py and below)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted(p for top in ("kernels", "models", "methods", "bench") for p in (ROOT / top).rglob("*.py"))
RECIPE_MODULES = {"pretrain", "reflow", "progressive", "consistency", "rcm"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("path", [p for p in LIBRARY if "cli" not in p.parts], ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_never_imports_the_cli(path):
    assert not any(name.startswith("vdistill.methods.cli") for name in _imports(path))


@pytest.mark.parametrize("name", sorted(RECIPE_MODULES))
def test_recipes_do_not_import_each_other(name):
    others = {f"vdistill.methods.recipes.{m}" for m in RECIPE_MODULES - {name}}
    assert not (_imports(ROOT / "methods" / "recipes" / f"{name}.py") & others)


def test_the_checks_see_imports():
    """The parser finds the imports the rules are about (a rule over an empty set would pass vacuously)."""
    assert "vdistill.methods.recipes.rcm" in _imports(ROOT / "methods" / "recipes" / "registry.py")
    assert "vdistill.methods.cli.main" in _imports(ROOT / "methods" / "cli" / "__main__.py")
