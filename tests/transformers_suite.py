"""Load transformers' own common model tests from the installed version's source distribution.

The PyPI sdist of transformers carries ``tests/test_modeling_common.py`` (``ModelTesterMixin``) and
``tests/test_configuration_common.py`` (``ConfigTester``) but not the sub-packages they import from
(``tests/exporters``, ``tests/generation``, ``tests/utils``). The sdist is fetched by ``.ci/run``
(``pip download --no-binary :all: --no-deps transformers==<installed>``) into a cache outside the repository;
nothing of it is copied into the project. This module extracts its ``tests/`` folder next to the archive and imports
the two files as a package whose missing imports are served by the small shims below.

Where the sdist is: ``$PIH2T_TRANSFORMERS_SDIST_DIR`` or ``~/.cache/pih2t_hub/transformers-sdist``.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tarfile
import tempfile
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
import transformers

PACKAGE = "_transformers_sdist_tests"
COMMON_FILES = ("test_modeling_common.py", "test_configuration_common.py")


def sdist_dir() -> Path:
    return Path(os.environ.get("PIH2T_TRANSFORMERS_SDIST_DIR", Path.home() / ".cache/pih2t_hub/transformers-sdist"))


def sdist_archive() -> Path:
    """Where the sdist of the *installed* transformers version must lie (the mixin must match the library)."""
    return sdist_dir() / f"transformers-{transformers.__version__}.tar.gz"


def _extract_tests(archive: Path) -> Path:
    """The sdist's top-level ``tests/*.py``, extracted once next to the archive (atomically: temp dir + rename)."""
    target = archive.parent / f"transformers-{transformers.__version__}-tests"
    if all((target / name).is_file() for name in (*COMMON_FILES, "__init__.py")):
        return target
    prefix = f"transformers-{transformers.__version__}/tests/"
    tmp = Path(tempfile.mkdtemp(dir=archive.parent, prefix=".extract-"))
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                rel = member.name[len(prefix):] if member.name.startswith(prefix) else ""
                if member.isfile() and rel.endswith(".py") and "/" not in rel:
                    with tar.extractfile(member) as src:
                        (tmp / rel).write_bytes(src.read())
        # The repository's tests/ is a package with an empty __init__.py, which the sdist leaves out;
        # test_configuration_common.py executes it (direct_transformers_import(Path(__file__).parent)).
        (tmp / "__init__.py").write_text("")
        missing = [name for name in COMMON_FILES if not (tmp / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{archive} has no tests/{missing[0]}")
        shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process extracted it meanwhile
            if not (target / COMMON_FILES[0]).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class _ExportTesterMixin:
    """Stands in for ``tests/exporters/test_export.ExportTesterMixin`` (not in the sdist): no torch.export tests."""


class _GenerationTesterMixin:
    """Stands in for ``tests/generation/test_utils.GenerationTesterMixin`` (not in the sdist).

    Only used by the mixin's ``issubclass`` check that generative models inherit it; PIH2T models cannot generate.
    """


# Stands in for ``tests/utils/test_configuration_utils.config_common_kwargs``: common config fields with
# non-default values, which ``ConfigTester.check_config_arguments_init`` expects a config to keep as given.
CONFIG_COMMON_KWARGS: dict[str, Any] = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["PIH2TForImageClassification"],
    "id2label": {0: "tail", 1: "head"},
    "label2id": {"tail": 0, "head": 1},
    "problem_type": "multi_label_classification",
}


def _register(name: str, **attrs: Any) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    if "." not in name[len(PACKAGE) + 1:]:
        module.__path__ = []  # a (shim) sub-package
    sys.modules[name] = module


def load_common() -> tuple[types.ModuleType, types.ModuleType]:
    """``(test_modeling_common, test_configuration_common)`` of the installed transformers' sdist.

    Raises ``FileNotFoundError`` with what to run when the sdist is not in the cache.
    """
    if f"{PACKAGE}.test_modeling_common" in sys.modules:
        return sys.modules[f"{PACKAGE}.test_modeling_common"], sys.modules[f"{PACKAGE}.test_configuration_common"]
    archive = sdist_archive()
    if not archive.is_file():
        raise FileNotFoundError(
            f"transformers {transformers.__version__} source distribution not found at {archive}; fetch it with "
            f"`pip download --no-binary :all: --no-deps transformers=={transformers.__version__} -d {archive.parent}`"
        )
    tests_dir = _extract_tests(archive)
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(tests_dir)]
    sys.modules[PACKAGE] = package
    _register(f"{PACKAGE}.exporters")
    _register(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=_ExportTesterMixin)
    _register(f"{PACKAGE}.generation")
    _register(f"{PACKAGE}.generation.test_utils", GenerationTesterMixin=_GenerationTesterMixin)
    _register(f"{PACKAGE}.utils")
    _register(f"{PACKAGE}.utils.test_configuration_utils", config_common_kwargs=CONFIG_COMMON_KWARGS)
    with warnings.catch_warnings():
        # transformers registers its own marks (flash_attn_test, torch_compile_test ...) in its conftest
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        return (
            importlib.import_module(f"{PACKAGE}.test_modeling_common"),
            importlib.import_module(f"{PACKAGE}.test_configuration_common"),
        )
