"""The package layers, checked from the imports themselves (``ast``, every import statement, top level or inside a
function): ``networks/`` and ``datamodules/`` import nothing from ``lightning_modules/``, ``callbacks/`` or
``experiments/``; ``callbacks/`` imports nothing from ``lightning_modules/`` or ``experiments/``;
``lightning_modules/`` imports nothing from ``experiments/``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "networks": {"lightning_modules", "callbacks", "experiments", "datamodules"},
    "datamodules": {"lightning_modules", "callbacks", "experiments"},
    "callbacks": {"lightning_modules", "experiments"},
    "lightning_modules": {"experiments"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every absolute import in a file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_from_a_higher_layer(layer):
    offending = [f"{path.relative_to(ROOT)}:{line} imports {package}"
                 for path in sorted((ROOT / layer).rglob("*.py"))
                 for package, line in sorted(imported_packages(path)) if package in FORBIDDEN[layer]]
    assert not offending, "\n".join(offending)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from lightning_modules.base import MedAttnModule\n")
    assert ("lightning_modules", 2) in imported_packages(source)
