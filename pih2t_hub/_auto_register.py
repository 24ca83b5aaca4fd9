"""``import pih2t_hub`` registers the PI-H2T classes with transformers' Auto classes, without importing torch itself.

The registration needs the model classes, i.e. torch and transformers' modeling code (seconds of imports), while
``import pih2t_hub`` must stay cheap so the command line can refuse a bad argument before any of that. So:

* if transformers' Auto classes are already imported, the classes are registered at once (the user is evidently
  about to call them: ``from transformers import AutoModelForImageClassification; import pih2t_hub``);
* otherwise a finder on ``sys.meta_path`` watches the transformers modules the registration depends on, and
  registers right after the last of them finishes importing, once an Auto class module is loaded
  (``import pih2t_hub; from transformers import AutoModelForImageClassification``).

Registering in the middle of a transformers import chain would import our modeling code from a partially
initialised transformers module (``transformers.modeling_layers`` imports the Auto classes before it defines
``GradientCheckpointingLayer``), so the registration waits until none of the watched modules is still executing.
Importing :mod:`pih2t_hub.models.pih2t` registers the classes too, which is how the training code gets them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Any, Sequence

__all__ = ["install"]

_MODELS = "pih2t_hub.models.pih2t"
#: Loaded means a user may call an Auto class (AutoConfig alone included).
_AUTO = ("transformers.models.auto.configuration_auto", "transformers.models.auto.modeling_auto")
#: What importing our model code imports from transformers: none may be mid-import when it runs.
_WATCHED = frozenset({"transformers", "transformers.configuration_utils", "transformers.modeling_utils",
                      "transformers.modeling_layers", "transformers.modeling_outputs", *_AUTO})
_lock = threading.RLock()


def _executing(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _register_if_ready(finished: str | None = None) -> None:
    """Import (and so register) the model classes when an Auto module is loaded and nothing they need is
    mid-import. ``finished``: the watched module whose body has just run (importlib still marks it executing)."""
    with _lock:
        if _MODELS in sys.modules:  # imported, or importing now: its own import registers the classes
            _uninstall()
            return
        if not any(name in sys.modules and (name == finished or not _executing(name)) for name in _AUTO):
            return
        if any(_executing(name) for name in _WATCHED if name != finished):
            return
        _uninstall()
    importlib.import_module(_MODELS)


class _Loader(importlib.abc.Loader):
    """The real loader, then :func:`_register_if_ready` once the module's body has run."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _register_if_ready(module.__name__)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the watched modules with the other finders and wraps their loader; finds nothing itself."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


_FINDER = _Finder()


def _uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Register now if transformers' Auto classes are loaded, else as soon as they are (see the module doc)."""
    with _lock:
        if _MODELS in sys.modules:
            return
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
    _register_if_ready()
