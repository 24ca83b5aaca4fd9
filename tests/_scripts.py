"""Load a project script (``recipes/finetune.py``, ``benchmarks/render_results.py``, ...) as a module.

The scripts are meant to be run as files, not imported from a package; the tests call their ``main`` in-process
(fast, and a failure shows a traceback). Each call returns a fresh module, so one test file's patches never reach
another's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str | Path, name: str | None = None) -> ModuleType:
    """Execute the script at ``relative`` (to the repository root, or absolute) and return it as a module."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
