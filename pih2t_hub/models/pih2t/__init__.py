"""The PI-H2T model family (transformers style; this folder travels with checkpoints as remote code).

Importing it registers the classes with transformers' Auto classes (see :func:`register_auto_classes`).
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_pih2t import PIH2TConfig
from .modeling_pih2t import PIH2TForImageClassification, PIH2TModel, PIH2TPreTrainedModel

__all__ = ["PIH2TConfig", "PIH2TModel", "PIH2TForImageClassification", "PIH2TPreTrainedModel"]


def register_auto_classes() -> None:
    """Register with the Auto factories (for this process) and for ``auto_map`` (for saved checkpoints).

    ``AutoModelForImageClassification.from_pretrained(<our checkpoint>)`` then builds the classes here, without
    ``trust_remote_code``. Idempotent.
    """
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


register_auto_classes()
