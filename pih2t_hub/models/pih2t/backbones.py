"""Backbone adapters: one interface over timm CNNs/ViTs and Hugging Face vision encoders.

Every adapter exposes

* ``forward_features(x)``: the un-pooled output of the last stage (CNN map ``B×C×H×W`` or tokens ``B×N×D``),
* ``pool(features)``: the pooled ``B×D`` vector a classifier sees,
* ``channel_dim(features)``: where the channels of un-pooled features are, so fusion and PIF know what to permute,
* ``num_features``, ``in_chans`` and ``data_config`` (the input pre-processing),
* ``forward_with_states(x, output_hidden_states, output_attentions)``: the features plus the backbone's per-stage
  hidden states (timm ``forward_intermediates``, HF ``output_hidden_states``) and attention maps (HF only).

Activation checkpointing goes through transformers' ``GradientCheckpointingLayer`` on both kinds, so
``model.gradient_checkpointing_enable()`` / ``Trainer(gradient_checkpointing=True)`` work with transformers'
checkpoint function and its options (``use_reentrant``, ``every_n_layers``): HF encoders' layers already are such
layers; for timm the stage modules timm itself reports in ``feature_info`` become ones (see `_checkpointable`).

Fusion can then act before pooling (the faithful H2T recipe) or after it (the cached-feature path).
Adapters are always built with random weights here: pretrained weights are loaded by ``pih2t_hub.create_model``
or come from a checkpoint's safetensors, so this file needs no network and no pih2t_hub install.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from .configuration_pih2t import PIH2TConfig

try:  # transformers >= 4.52
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover - older transformers: timm stages are not checkpointed
    GradientCheckpointingLayer = None

# ``output_hidden_states``: a flag, or (transformers >= 5) the indices of the states to keep (others are None)
HiddenFlag = bool | list[int]
States = tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]


class BackboneAdapter(nn.Module):
    """Common interface of the adapters (see module docstring)."""

    num_features: int
    in_chans: int

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def pool(self, features: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def channel_dim(self, features: torch.Tensor) -> int:
        """Channels are dim 1 of a ``B×C×H×W`` map and the last dim of tokens or pooled vectors."""
        return 1 if features.dim() == 4 else -1

    def forward_with_states(
        self, pixel_values: torch.Tensor, output_hidden_states: HiddenFlag = False, output_attentions: bool = False
    ) -> States:  # pragma: no cover - interface
        """``(features, hidden_states or None, attentions or None)``."""
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(pixel_values))

    @property
    def data_config(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError


class TimmBackbone(BackboneAdapter):
    """Any ``timm.create_model`` architecture with its classifier removed (``num_classes=0``).

    ``forward_features`` gives the final map (CNN) or the final normed tokens (ViT); ``pool`` is timm's own
    ``forward_head(pre_logits=True)`` so the pooled vector is exactly what the timm classifier would see.
    """

    def __init__(self, name: str, model_kwargs: dict[str, Any] | None = None, pretrained: bool = False) -> None:
        super().__init__()
        import timm

        kwargs = dict(model_kwargs or {})
        kwargs["num_classes"] = 0
        self.name = name
        try:
            self.model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ValueError(f"unknown timm backbone {name!r}") from err
            raise
        self.num_features = int(self.model.num_features)
        self.in_chans = int(self.model.pretrained_cfg.get("input_size", (3,))[0]) if self.model.pretrained_cfg else 3
        self.in_chans = int(kwargs.get("in_chans", self.in_chans))
        self._output_fmt = str(getattr(self.model, "output_fmt", "NCHW"))
        self.checkpoint_stages = _make_stages_checkpointable(self.model)

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(pixel_values)

    def forward_with_states(
        self, pixel_values: torch.Tensor, output_hidden_states: HiddenFlag = False, output_attentions: bool = False
    ) -> States:
        if output_attentions:
            raise ValueError(
                f"output_attentions: timm backbone {self.name!r} does not return attention maps (use an HF backbone)"
            )
        if not output_hidden_states:
            return self.forward_features(pixel_values), None, None
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(
                f"output_hidden_states: timm backbone {self.name!r} has no forward_intermediates, so it cannot return "
                "per-stage features"
            )
        # timm's own per-stage outputs; the final features are the same tensor forward_features gives
        features, intermediates = self.model.forward_intermediates(pixel_values)
        return features, _keep_indices(tuple(intermediates), output_hidden_states), None

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(features, pre_logits=True)

    def channel_dim(self, features: torch.Tensor) -> int:
        if features.dim() == 4 and self._output_fmt.upper() == "NHWC":
            return -1
        return super().channel_dim(features)

    @property
    def data_config(self) -> dict[str, Any]:
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=self.model)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


class HFBackbone(BackboneAdapter):
    """A ``transformers.AutoModel`` vision encoder (ViT, DeiT, DINOv2, ...).

    Un-pooled features are ``last_hidden_state`` (``B×N×D``), which these encoders return after their final layer
    norm. The pooled vector is the CLS token of it (or the mean of the other tokens): NOT ``pooler_output``, which
    for ViT adds a tanh-activated dense layer that was never trained for classification. ``"mean"`` pooling
    averages the patch tokens only (after CLS, distillation and register tokens).
    """

    def __init__(self, backbone_config: PretrainedConfig, pooling: str = "cls") -> None:
        super().__init__()
        from transformers import AutoModel

        if not isinstance(backbone_config, PretrainedConfig):
            raise TypeError(f"an HF backbone needs a PretrainedConfig, got {type(backbone_config).__name__}")
        self.model = _hf_model_without_pooler(AutoModel, backbone_config)
        if pooling not in ("cls", "mean"):
            raise ValueError(f"hf_pooling must be 'cls' or 'mean', got {pooling!r}")
        self.pooling = pooling
        config = self.model.config
        self.num_features = int(getattr(config, "hidden_size", 0) or getattr(config, "embed_dim", 0))
        if not self.num_features:
            raise ValueError(f"cannot tell the feature width of HF backbone type {config.model_type!r}")
        self.in_chans = int(getattr(config, "num_channels", 3))
        self._image_size = getattr(config, "image_size", 224)
        # tokens before the patch tokens: CLS, DeiT's distillation token, DINOv2's register tokens
        self.num_prefix_tokens = (
            1 + (config.model_type == "deit") + int(getattr(config, "num_register_tokens", 0) or 0)
        )

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.forward_with_states(pixel_values)[0]

    def forward_with_states(
        self, pixel_values: torch.Tensor, output_hidden_states: HiddenFlag = False, output_attentions: bool = False
    ) -> States:
        out = self.model(
            pixel_values=pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        hidden = out.last_hidden_state
        if hidden.dim() != 3:
            raise ValueError(
                f"HF backbone returned last_hidden_state of shape {tuple(hidden.shape)}; expected tokens B×N×D"
            )
        states = tuple(out.hidden_states) if output_hidden_states is not False and out.hidden_states else None
        attentions = tuple(out.attentions) if output_attentions else None
        return hidden, states, attentions

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 2:
            raise ValueError("features are already pooled")
        if self.pooling == "cls":
            return features[:, 0]
        return features[:, self.num_prefix_tokens:].mean(dim=1)

    @property
    def data_config(self) -> dict[str, Any]:
        size = self._image_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return {
            "input_size": [self.in_chans, int(h), int(w)],
            "interpolation": "bilinear",
            "mean": [0.5] * self.in_chans,
            "std": [0.5] * self.in_chans,
            "crop_pct": 1.0,
            "crop_mode": "center",
        }


def _keep_indices(states: tuple[torch.Tensor, ...], selection: HiddenFlag) -> tuple[torch.Tensor | None, ...]:
    """All states for ``True``; for a list of indices (negative ones count from the end) the others are ``None``."""
    if selection is True:
        return states
    keep = {int(i) % len(states) for i in selection}
    return tuple(s if i in keep else None for i, s in enumerate(states))


def _hf_model_without_pooler(auto_cls: Any, config: PretrainedConfig) -> nn.Module:
    """Build the encoder without its pooler when the architecture allows (the pooler is unused weight)."""
    try:
        return auto_cls.from_config(config, add_pooling_layer=False)
    except TypeError:
        return auto_cls.from_config(config)


_CHECKPOINTABLE: dict[type, type] = {}


def _checkpointable(module: nn.Module) -> None:
    """Make ``module`` a transformers ``GradientCheckpointingLayer`` in place, keeping its class, weights and names.

    The module's class is swapped for a subclass of (``GradientCheckpointingLayer``, its class): its forward is the
    same, and runs under transformers' checkpoint function only while checkpointing is enabled in training mode.
    Swapping the class instead of wrapping the module keeps every state-dict key, so checkpoints are unaffected.
    The subclass lives in this module's namespace so pickling finds it.
    """
    cls = type(module)
    if GradientCheckpointingLayer is None or isinstance(module, GradientCheckpointingLayer):
        return
    new_cls = _CHECKPOINTABLE.get(cls)
    if new_cls is None:
        name = f"Checkpointable{cls.__name__}"
        new_cls = type(name, (GradientCheckpointingLayer, cls), {"__module__": __name__, "__qualname__": name})
        _CHECKPOINTABLE[cls] = globals()[name] = new_cls
    module.__class__ = new_cls


def _make_stages_checkpointable(model: nn.Module) -> list[str]:
    """Checkpoint timm's stages: the modules its ``feature_info`` names (ResNet ``layerN``, ViT ``blocks.i``, ...).

    These run one after another on one tensor, which is what activation checkpointing needs; parameter-free ones
    (a stem activation) are left alone. timm's own ``set_grad_checkpointing`` would bypass transformers' checkpoint
    function (and its ``use_reentrant`` / ``every_n_layers`` options), so it is not used.
    """
    names = []
    modules = dict(model.named_modules())
    for info in getattr(model, "feature_info", None) or []:
        name = info.get("module") if isinstance(info, dict) else None
        module = modules.get(name) if name else None
        if module is not None and any(True for _ in module.parameters()):
            _checkpointable(module)
            names.append(name)
    return names


def build_backbone(config: PIH2TConfig) -> BackboneAdapter:
    """Adapter for ``config`` with random weights (weights are loaded afterwards)."""
    if config.backbone_source == "timm":
        return TimmBackbone(config.backbone, config.backbone_kwargs)
    if config.backbone_source == "hf":
        if config.backbone_config is None:
            raise ValueError("an HF backbone needs config.backbone_config (the encoder's config)")
        return HFBackbone(config.backbone_config, pooling=config.hf_pooling)
    raise ValueError(f"unknown backbone_source {config.backbone_source!r}")


__all__ = ["BackboneAdapter", "TimmBackbone", "HFBackbone", "build_backbone"]
