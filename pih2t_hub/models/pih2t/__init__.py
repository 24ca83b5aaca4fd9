"""The PI-H2T model family (transformers style; this folder travels with checkpoints as remote code)."""

from .configuration_pih2t import PIH2TConfig
from .modeling_pih2t import PIH2TForImageClassification, PIH2TModel, PIH2TPreTrainedModel

__all__ = ["PIH2TConfig", "PIH2TModel", "PIH2TForImageClassification", "PIH2TPreTrainedModel"]
