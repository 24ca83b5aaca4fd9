"""PI-H2T models: transformers `PreTrainedModel`s around a timm or Hugging Face backbone.

``PIH2TPreTrainedModel`` → ``PIH2TModel`` (backbone + optional PIF; pooled features) →
``PIH2TForImageClassification`` (+ linear or cosine head; ``ImageClassifierOutput``).

This file and its siblings are copied next to every checkpoint (``register_for_auto_class``), so a checkpoint
loads with ``trust_remote_code=True`` on a machine without pih2t_hub. Keep imports relative.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

from .backbones import BackboneAdapter, build_backbone
from .configuration_pih2t import PIH2TConfig
from .fusion import PIF
from .heads import build_head

_PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1, "box": 4, "hamming": 5}


class PIH2TPreTrainedModel(PreTrainedModel):
    """Shared weight handling: backbones initialise themselves (timm / HF init), so nothing is re-initialised here."""

    config_class = PIH2TConfig
    base_model_prefix = "pih2t"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        # timm and HF encoders initialise in their constructors; our heads and PIF do too. Re-initialising here
        # would overwrite pretrained backbone weights loaded before post_init.
        return

    @classmethod
    def get_init_context(cls, *args: Any, **kwargs: Any) -> list:
        # transformers builds models on the meta device and only restores *persistent* tensors from the checkpoint.
        # Arbitrary timm / HF backbones keep non-persistent buffers (position tables, masks) that we cannot
        # re-create through `_init_weights`, so build on the real device and let the checkpoint overwrite.
        contexts = super().get_init_context(*args, **kwargs)
        return [c for c in contexts if not (isinstance(c, torch.device) and c.type == "meta")]

    def image_processor_dict(self) -> dict[str, Any]:
        """A transformers image-processor config reproducing the backbone's eval transform.

        timm's eval transform (resize the short side to ``size / crop_pct``, centre-crop ``size``) is exactly
        ``ConvNextImageProcessor``'s for sizes below 384; a crop_pct of 1 is a plain resize (``ViTImageProcessor``).
        """
        dc = self.config.backbone_data_config or self.get_backbone().data_config
        _, h, w = dc.get("input_size", [3, 224, 224])
        crop_pct = float(dc.get("crop_pct") or 1.0)
        common = {
            "do_resize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(dc.get("mean", [0.5, 0.5, 0.5])),
            "image_std": list(dc.get("std", [0.5, 0.5, 0.5])),
            "resample": _PIL_RESAMPLE.get(str(dc.get("interpolation", "bilinear")), 2),
        }
        if crop_pct < 1.0 and h == w and h < 384:
            return {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": int(h)},
                    "crop_pct": crop_pct, **common}
        return {"image_processor_type": "ViTImageProcessor", "size": {"height": int(h), "width": int(w)}, **common}

    def get_image_processor(self) -> Any:
        """The transformers image processor matching this model's input pre-processing."""
        from transformers import ConvNextImageProcessor, ViTImageProcessor

        cfg = dict(self.image_processor_dict())
        cls = ConvNextImageProcessor if cfg.pop("image_processor_type") == "ConvNextImageProcessor" else ViTImageProcessor
        return cls(**cfg)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.save_pretrained`` plus ``preprocessor_config.json`` so ``pipeline`` works on the folder."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            self.get_image_processor().save_pretrained(save_directory)
        return out

    def get_backbone(self) -> BackboneAdapter:
        return self.base_model.backbone


class PIH2TModel(PIH2TPreTrainedModel):
    """Backbone adapter plus PI-H2T's PIF layer (optional) on the un-pooled features.

    ``last_hidden_state`` holds the un-pooled features (``B×C×H×W`` for CNNs, ``B×N×D`` tokens for ViTs) after PIF;
    ``pooler_output`` the pooled ``B×D`` vector a head consumes.
    """

    def __init__(self, config: PIH2TConfig) -> None:
        super().__init__(config)
        self.backbone = build_backbone(config)
        self.pif = (
            PIF(config.pif_hidden, config.pif_activation, config.pif_mode, config.pif_statistic) if config.pif else None
        )
        if config.num_features is None:
            config.num_features = self.backbone.num_features
        elif config.num_features != self.backbone.num_features:
            raise ValueError(
                f"config.num_features={config.num_features} but backbone {config.backbone!r} gives "
                f"{self.backbone.num_features}"
            )
        self.post_init()

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values must be a B×C×H×W tensor, got {shape}")
        if pixel_values.shape[1] != self.backbone.in_chans:
            raise ValueError(
                f"backbone {self.config.backbone!r} expects images with {self.backbone.in_chans} channels, got "
                f"{pixel_values.shape[1]} (convert grayscale images to RGB)"
            )

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Un-pooled features after PIF: where H2T fuses on the faithful (online) path."""
        self._check_pixels(pixel_values)
        features = self.backbone.forward_features(pixel_values)
        if self.pif is not None:
            features = self.pif(features, channel_dim=self.backbone.channel_dim(features))
        return features

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return self.backbone.pool(features)

    def channel_dim(self, features: torch.Tensor) -> int:
        return self.backbone.channel_dim(features)

    def forward(
        self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs: Any
    ) -> BaseModelOutputWithPooling | tuple:
        features = self.forward_features(pixel_values)
        pooled = self.pool(features)
        if return_dict is False:
            return features, pooled
        return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=pooled)


class PIH2TForImageClassification(PIH2TPreTrainedModel):
    """A long-tailed classifier: backbone (+PIF) → pooled features → linear or cosine head.

    ``forward(pixel_values, labels)`` returns an ``ImageClassifierOutput`` (cross-entropy ``loss`` when labels are
    given), so it works with ``Trainer`` and ``pipeline``. ``forward_head(pooled)`` classifies cached features.
    """

    def __init__(self, config: PIH2TConfig) -> None:
        super().__init__(config)
        self.pih2t = PIH2TModel(config)
        self.classifier = build_head(
            config.head_type, config.num_features, config.num_labels, bias=config.head_bias, scale=config.cosine_scale,
            head_config=config.head_config,
        )
        self.post_init()

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits from pooled features; the entry point for the cached-feature path."""
        if pooled.dim() != 2 or pooled.shape[1] != self.config.num_features:
            raise ValueError(
                f"the head expects pooled features of shape (B, {self.config.num_features}), got {tuple(pooled.shape)}"
            )
        return self.classifier(pooled)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> ImageClassifierOutput | tuple:
        features = self.pih2t.forward_features(pixel_values)
        pooled = self.pih2t.pool(features)
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels.to(logits.device).long())
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return ImageClassifierOutput(loss=loss, logits=logits)


__all__ = ["PIH2TPreTrainedModel", "PIH2TModel", "PIH2TForImageClassification"]
