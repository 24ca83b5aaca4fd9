"""pih2t_hub: retrofit pretrained timm / Hugging Face image backbones for long-tailed recognition.

Importing the package registers the PI-H2T classes with transformers' Auto classes, so
``AutoModelForImageClassification.from_pretrained(<our checkpoint>)`` works without ``trust_remote_code``.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .models.factory import create_model
from .models.pih2t import PIH2TConfig, PIH2TForImageClassification, PIH2TModel, PIH2TPreTrainedModel
from .registry import BACKBONES, list_backbones, resolve_backbone

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    """Register with the Auto factories (for this process) and for ``auto_map`` (for saved checkpoints)."""
    try:
        AutoConfig.register(PIH2TConfig.model_type, PIH2TConfig)
    except ValueError:  # already registered (e.g. module re-imported)
        pass
    for auto_cls, model_cls in ((AutoModel, PIH2TModel), (AutoModelForImageClassification, PIH2TForImageClassification)):
        try:
            auto_cls.register(PIH2TConfig, model_cls)
        except ValueError:
            pass
    # save_pretrained then writes `auto_map` and copies models/pih2t/*.py next to the weights,
    # so `trust_remote_code=True` loads the checkpoint where pih2t_hub is not installed.
    PIH2TConfig.register_for_auto_class()
    PIH2TModel.register_for_auto_class("AutoModel")
    PIH2TForImageClassification.register_for_auto_class("AutoModelForImageClassification")


_register_auto_classes()

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
