"""Every function of the package stays short enough to read in one screen.

A function that grows past :data:`MAX_LINES` (counted from its ``def`` line to its last line, docstring included)
usually does several things at once; splitting it into named steps keeps the public functions readable top to
bottom.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

MAX_LINES = 80
PACKAGE = Path(__file__).resolve().parent.parent / "pih2t_hub"


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_LINES:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_the_package_has_modules_to_check() -> None:
    assert len(list(PACKAGE.rglob("*.py"))) > 10


def test_no_function_is_longer_than_the_limit() -> None:
    long = [entry for path in sorted(PACKAGE.rglob("*.py")) for entry in _long_functions(path)]
    if long:
        pytest.fail(f"{len(long)} function(s) longer than {MAX_LINES} lines:\n" + "\n".join(long))
