"""pih2t_hub: retrofit pretrained timm / Hugging Face image backbones for long-tailed recognition.

Importing the package registers the PI-H2T classes with transformers' Auto classes, so
``AutoModelForImageClassification.from_pretrained(<our checkpoint>)`` works without ``trust_remote_code``.

The import itself is cheap: the public names below are loaded on first use (PEP 562), and the Auto registration
happens as soon as transformers' Auto classes are imported (:mod:`pih2t_hub._auto_register`). The command line
therefore checks its arguments, paths and the backbone's availability before torch, transformers' models, timm
or datasets are imported, and refuses a bad one in well under a second after Python starts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _auto_register

__version__ = "0.1.0"

__all__ = [
    "create_model",
    "PIH2TConfig",
    "PIH2TModel",
    "PIH2TForImageClassification",
    "PIH2TPreTrainedModel",
    "BACKBONES",
    "list_backbones",
    "resolve_backbone",
]

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    "create_model": ".models.factory",
    "PIH2TConfig": ".models.pih2t",
    "PIH2TModel": ".models.pih2t",
    "PIH2TForImageClassification": ".models.pih2t",
    "PIH2TPreTrainedModel": ".models.pih2t",
    "BACKBONES": ".registry",
    "list_backbones": ".registry",
    "resolve_backbone": ".registry",
}
#: subpackages and modules reachable as attributes (``pih2t_hub.data``), as after an eager import
_SUBMODULES = frozenset({"compare", "data", "evaluation", "hub", "losses", "methods", "models", "registry", "training"})

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs, which do not run __getattr__
    from .models.factory import create_model
    from .models.pih2t import PIH2TConfig, PIH2TForImageClassification, PIH2TModel, PIH2TPreTrainedModel
    from .registry import BACKBONES, list_backbones, resolve_backbone


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)


_auto_register.install()
