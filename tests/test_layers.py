"""The import layering of docs/architecture.md, enforced: a module imports only its own part of the package or a
lower layer, never one beside it or above it.

Read statically with ``ast`` from the source, every import statement counts: module level, inside functions
(the lazy imports) and under ``TYPE_CHECKING``; nothing is imported to check it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pih2t_hub"

#: Part of the package (its first name under ``pih2t_hub``) -> layer. Parts of one layer do not import each other.
LAYERS = {
    "_atomic": 0, "_names": 0, "_progress": 0, "registry": 0, "schedules": 0,  # foundations: no project import
    "data": 1, "losses": 1, "models": 1, "_tuning_names": 1,  # what a method is built from; tuning names (light)
    "methods": 2, "evaluation": 2, "hub": 2, "_auto_register": 2,  # methods; reading and publishing models
    "training": 3,  # the engine: asks the methods, evaluates, exports
    "compare": 4,  # the fair comparison, on the engine
    "__init__": 5,  # the public facade (lazy): it may name anything, nothing imports it
}


#: Top-level modules that are one part with another: the comparison's light config and its command line.
PART_OF = {"compare_cli": "compare", "compare_config": "compare", "compare_workers": "compare"}


def _part(module: str) -> str:
    """``pih2t_hub.methods.base`` -> ``methods``; the package itself -> ``__init__``."""
    parts = module.split(".")
    part = parts[1] if len(parts) > 1 else "__init__"
    return PART_OF.get(part, part)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of a ``pih2t_hub`` module in the file, relative ones resolved; for
    ``from X import name`` the module is ``X.name`` (a submodule, or an attribute of X's own part)."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name == "pih2t_hub" or name.startswith("pih2t_hub.")]


def layering_violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _part(_module_name(path))
        if source not in LAYERS:
            problems.append(f"{path.relative_to(PACKAGE.parent)}: part {source!r} has no layer in LAYERS")
            continue
        for line, target in project_imports(path):
            part = _part(target)
            if part == source:
                continue
            if part not in LAYERS or LAYERS[part] >= LAYERS[source]:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({source}, layer {LAYERS[source]}) "
                                f"imports {target} ({part}, layer {LAYERS.get(part)})")
    return problems


def test_no_module_imports_beside_or_above_its_layer() -> None:
    assert layering_violations() == []


@pytest.mark.parametrize("code, bad", [
    ("from ..training.config import RunConfig", "methods/x.py"),  # a method reaching up into the engine
    ("from pih2t_hub.methods.decoupling import LWSHead", "hub/x.py"),  # publishing reaching into a method
    ("from ..compare import Bench", "training/x.py"),
    ("from .. import methods", "evaluation/x.py"),  # package-relative submodule import
    ("from ..models import create_model", "losses/x.py"),  # one layer, another part
])
def test_the_check_sees_upward_and_sideways_imports_even_inside_functions(tmp_path, monkeypatch, code, bad) -> None:
    """The walker itself: an offending import inside a function body, or under TYPE_CHECKING, is reported."""
    fake = tmp_path / "pih2t_hub"
    target = fake / bad
    target.parent.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (target.parent / "__init__.py").write_text("")
    target.write_text(f"from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    pass\n\ndef f():\n    {code}\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    found = layering_violations()
    assert len(found) == 1 and found[0].startswith(str(Path("pih2t_hub") / bad) + ":6"), found
