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
from .heads import CosineHead, LinearHead, build_head
from .tuning import AdaptFormer, Prompts, build_tuning

_PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1, "box": 4, "hamming": 5}


class PIH2TPreTrainedModel(PreTrainedModel):
    """Shared weight handling, activation checkpointing and attention dispatch of the PI-H2T models."""

    config_class = PIH2TConfig
    base_model_prefix = "pih2t"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # Both backbone kinds checkpoint through transformers' GradientCheckpointingLayer (see backbones.py).
    supports_gradient_checkpointing = True
    # HF encoders dispatch on config._attn_implementation; timm attention already uses F.scaled_dot_product_attention.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["PIH2TModel"]

    def _init_weights(self, module: nn.Module) -> None:
        """What a meta-device build needs to be correct; HF encoders run their own ``_init_weights`` (transformers
        dispatches to every nested ``PreTrainedModel``).

        timm layers keep the initialisation timm gave them in their constructor (a normal build, then overwritten by
        a checkpoint), but their *buffers* are not in ``model.safetensors`` when non-persistent and carry garbage
        after ``to_empty``: batch-norm statistics are reset to a fresh layer's (mean 0, var 1, no batches seen).
        Our own heads re-run their initialisation.
        """
        if isinstance(module, nn.modules.batchnorm._NormBase):
            if module.track_running_stats:
                module.reset_running_stats()
        elif isinstance(module, LinearHead):
            module.reset_parameters()
        elif isinstance(module, CosineHead):
            nn.init.normal_(module.weight, std=0.01)  # as CosineHead.__init__
        elif isinstance(module, (AdaptFormer, Prompts)):
            module.reset_parameters()  # AdaptFormer starts at zero: the backbone unchanged
        elif isinstance(module, PIF):
            for layer in module.phi:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
            if module.mode == "residual":  # as PIF.__init__: a pretrained backbone starts unchanged
                nn.init.zeros_(module.phi[-1].weight)
                nn.init.zeros_(module.phi[-1].bias)

    @classmethod
    def get_init_context(cls, *args: Any, **kwargs: Any) -> list:
        # transformers builds models on the meta device and only restores *persistent* tensors from the checkpoint.
        # Arbitrary timm / HF backbones keep non-persistent buffers (position tables, masks) that we cannot
        # re-create through `_init_weights`, so build on the real device and let the checkpoint overwrite.
        contexts = super().get_init_context(*args, **kwargs)
        return [c for c in contexts if not (isinstance(c, torch.device) and c.type == "meta")]

    def _move_missing_keys_from_meta_to_device(self, missing_keys: Any, *args: Any, **kwargs: Any) -> None:
        """Keep the values our real-device build gave to tensors the checkpoint does not hold.

        transformers replaces every missing or size-mismatched tensor, and every non-persistent buffer, with
        uninitialised memory of the target device, then re-initialises only modules not yet flagged as initialised;
        ours were initialised (and flagged) during the real-device build, so a re-labelled head
        (``ignore_mismatched_sizes``) or a timm position table would keep garbage. Copy the built values back.
        """
        kept: dict[str, torch.Tensor] = {}
        for key in missing_keys:
            tensor = self.get_parameter_or_buffer(key)
            if not tensor.is_meta:
                kept[key] = tensor.detach().clone()
        for key, buffer in self.named_non_persistent_buffers():
            if not buffer.is_meta:
                kept[key] = buffer.detach().clone()
        super()._move_missing_keys_from_meta_to_device(missing_keys, *args, **kwargs)
        with torch.no_grad():
            for key, value in kept.items():
                self.get_parameter_or_buffer(key).copy_(value)

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
        self.tuning = build_tuning(self.backbone.model, config.tuning)  # AdaptFormer / VPT, hooked into the blocks
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
        if config.backbone_source == "hf":
            # one config object for the encoder and our sub-config, so attn_implementation / dtype set on either
            # reach both (transformers' composite-model contract)
            config.backbone_config = self.backbone.model.config
        elif not getattr(self.backbone, "checkpoint_stages", None):
            self.supports_gradient_checkpointing = False  # no timm stage to checkpoint: say so instead of no-op
        self.post_init()

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values must be a B×C×H×W tensor, got {shape}")
        if not pixel_values.is_floating_point():
            # uint8 image bytes would otherwise reach the first conv, whose "expected scalar type Byte but found
            # Float" reads as if the weights had the wrong dtype; fp16 / bf16 inputs pass
            raise TypeError(
                f"pixel_values must be a floating-point tensor, normalised as the image processor does "
                f"(model.get_image_processor()), got {str(pixel_values.dtype).removeprefix('torch.')}"
            )
        if pixel_values.shape[1] != self.backbone.in_chans:
            raise ValueError(
                f"backbone {self.config.backbone!r} expects images with {self.backbone.in_chans} channels, got "
                f"{pixel_values.shape[1]} (convert grayscale images to RGB)"
            )

        # eager calls only: under torch.compile / torch.export the value is unknown, and a branch on it breaks the
        # graph (export refuses it); a compiled or exported graph is the caller's to feed finite values
        if (pixel_values.device.type != "meta" and not torch.compiler.is_compiling()
                and not bool(torch.isfinite(pixel_values).all())):
            raise ValueError(
                "pixel_values contain NaN or infinite values (check the image decoding and normalisation); "
                "refusing to produce logits from them"
            )

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Un-pooled features after PIF: where H2T fuses on the faithful (online) path."""
        return self.features_and_states(pixel_values)[0]

    def features_and_states(
        self, pixel_values: torch.Tensor, output_hidden_states: bool | list[int] = False, output_attentions: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """Un-pooled features after PIF plus the backbone's hidden states and attentions (``None`` unless asked)."""
        self._check_pixels(pixel_values)
        features, hidden_states, attentions = self.backbone.forward_with_states(
            pixel_values, output_hidden_states=output_hidden_states, output_attentions=output_attentions
        )
        if self.pif is not None:
            features = self.pif(features, channel_dim=self.backbone.channel_dim(features))
        return features, hidden_states, attentions

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return self.backbone.pool(features)

    def channel_dim(self, features: torch.Tensor) -> int:
        return self.backbone.channel_dim(features)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | list[int] | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling | tuple:
        hidden, attn, return_dict = _output_flags(self.config, output_hidden_states, output_attentions, return_dict)
        features, hidden_states, attentions = self.features_and_states(pixel_values, hidden, attn)
        out = BaseModelOutputWithPooling(
            last_hidden_state=features, pooler_output=self.pool(features), hidden_states=hidden_states,
            attentions=attentions,
        )
        return out if return_dict else out.to_tuple()


class PIH2TForImageClassification(PIH2TPreTrainedModel):
    """A long-tailed classifier: backbone (+PIF) → pooled features → linear or cosine head.

    ``forward(pixel_values, labels)`` returns an ``ImageClassifierOutput`` (with the ``loss`` of
    ``config.problem_type`` when labels are given, see `classification_loss`), so it works with ``Trainer`` and
    ``pipeline``. ``forward_head(pooled)`` classifies cached features.
    """

    def __init__(self, config: PIH2TConfig) -> None:
        super().__init__(config)
        self.pih2t = PIH2TModel(config)
        self.supports_gradient_checkpointing = self.pih2t.supports_gradient_checkpointing
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
        output_hidden_states: bool | list[int] | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> ImageClassifierOutput | tuple:
        hidden, attn, return_dict = _output_flags(self.config, output_hidden_states, output_attentions, return_dict)
        features, hidden_states, attentions = self.pih2t.features_and_states(pixel_values, hidden, attn)
        logits = self.classifier(self.pih2t.pool(features))
        loss = classification_loss(logits, labels, self.config) if labels is not None else None
        out = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions)
        return out if return_dict else out.to_tuple()


def _output_flags(
    config: PIH2TConfig,
    output_hidden_states: bool | list[int] | None,
    output_attentions: bool | None,
    return_dict: bool | None,
) -> tuple[bool | list[int], bool, bool]:
    """Call arguments, else the config's values, as every transformers model resolves them.

    ``output_hidden_states`` may also be a list of the indices to keep (transformers >= 5); an empty one is ``False``.
    """
    hidden = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
    return (
        list(hidden) if isinstance(hidden, (list, tuple)) and len(hidden) else bool(hidden),
        bool(output_attentions if output_attentions is not None else config.output_attentions),
        bool(return_dict if return_dict is not None else config.return_dict),
    )


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: PIH2TConfig) -> torch.Tensor:
    """The loss of transformers' image classifiers, chosen by ``config.problem_type``.

    Unset, it is inferred (and recorded on the config) from the labels as transformers does: one output is
    regression (MSE), integer labels are single-label classification (cross-entropy, ``-100`` ignored), float labels
    are multi-label classification (BCE with logits).
    """
    num_labels = config.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    labels = labels.to(logits.device)
    if config.problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        return F.mse_loss(logits, labels.to(logits.dtype))
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1).long(), ignore_index=-100)
    if config.problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    raise ValueError(f"unknown problem_type {config.problem_type!r}")


__all__ = ["PIH2TPreTrainedModel", "PIH2TModel", "PIH2TForImageClassification", "classification_loss"]
