"""Export a long-tailed classifier back to a *plain timm* checkpoint, in timm's own Hub layout.

Most long-tail methods only change the classifier: cRT / H2T / PI-H2T's H2TF retrain a linear head, post-hoc
logit adjustment adds a per-class offset to the logits, τ-norm rescales the weight rows and LWS the logits. All of
these are a linear head at inference, so a PIH2T model on a timm backbone is, once they are folded in, exactly
``timm.create_model(arch, num_classes=C)`` with other classifier weights. :func:`export_timm` writes that model
with timm's own :func:`timm.models.save_for_hf` (``config.json`` with ``architecture``, ``num_classes``,
``label_names``, ``pretrained_cfg``; ``model.safetensors``), so the folder loads

* with timm alone: ``timm.create_model("local-dir:<folder>", pretrained=True)`` (or ``hf-hub:<repo>`` once pushed);
* with transformers alone: ``AutoModelForImageClassification.from_pretrained(<folder>)`` builds a
  ``TimmWrapperForImageClassification`` and ``pipeline("image-classification", model=<folder>)`` works, with no
  ``pih2t_hub`` and no ``trust_remote_code``.

Folding is explicit: pass a model whose ``classifier`` is a ``nn.Linear`` (use :func:`fold_logit_adjustment`,
:func:`fold_tau_norm` or :func:`fold_lws` first). What is not a linear head at inference is refused with a
one-line :class:`TimmExportError`: Hugging Face backbones (not a timm model), cosine heads (``s·cos`` normalises the
features), PIF layers between backbone and head, any other head that is not a linear layer at inference (DLSA's
flow-based classifier, nearest class mean).
Before anything is written, the exported model's logits are checked against the PIH2T model's on a random batch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from pih2t_hub._atomic import publish_folder

__all__ = [
    "TIMM_REQUIRED_FILES",
    "TimmExportError",
    "build_timm_model",
    "check_timm_exportable",
    "export_timm",
    "fold_logit_adjustment",
    "fold_lws",
    "fold_tau_norm",
    "posthoc_offsets",
]

#: Files a timm-format repository must contain (the model card is added when it is pushed).
TIMM_REQUIRED_FILES = ("config.json", "model.safetensors")
#: Largest logit difference (relative to the logits' scale) accepted between the PIH2T model and its export.
EXPORT_ATOL = 1e-5


class TimmExportError(ValueError):
    """The model cannot be written as a plain timm checkpoint (its inference is not timm backbone + linear head)."""


# ------------------------------------------------------------------------------------------------ folding


def _linear(head: nn.Module, what: str) -> nn.Linear:
    if not isinstance(head, nn.Linear):
        raise TimmExportError(f"{what} needs an nn.Linear head, got {type(head).__name__}")
    return head


@torch.no_grad()
def _copy_linear(head: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(head.in_features, head.out_features, bias=bias is not None)
    out = out.to(device=head.weight.device, dtype=head.weight.dtype)
    out.weight.copy_(weight)
    if bias is not None:
        out.bias.copy_(bias)
    return out


def posthoc_offsets(class_counts: Sequence[int] | torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """The per-class logit offsets of post-hoc logit adjustment, ``-τ · log π_c`` (π: training class prior)."""
    from pih2t_hub.losses.logit_adjusted import log_prior

    tau = float(tau)
    if not tau >= 0.0:  # also rejects NaN
        raise ValueError(f"tau must be >= 0, got {tau}")
    return -tau * log_prior(class_counts)


@torch.no_grad()
def fold_logit_adjustment(head: nn.Module, offsets: Sequence[float] | torch.Tensor) -> nn.Linear:
    """A new linear head whose logits are ``head(x) + offsets`` (the offsets go into the bias).

    For post-hoc logit adjustment pass ``posthoc_offsets(class_counts, tau)``. A head without bias gets one.
    """
    head = _linear(head, "fold_logit_adjustment")
    off = torch.as_tensor(offsets, dtype=head.weight.dtype, device=head.weight.device).reshape(-1)
    if off.numel() != head.out_features:
        raise ValueError(f"{off.numel()} logit offsets for a head with {head.out_features} classes")
    if not bool(torch.isfinite(off).all()):
        raise ValueError("logit offsets contain NaN or inf")
    bias = head.bias if head.bias is not None else torch.zeros_like(off)
    return _copy_linear(head, head.weight, bias + off)


@torch.no_grad()
def fold_tau_norm(head: nn.Module, tau: float) -> nn.Linear:
    """A new linear head with τ-normalised weight rows ``w_c / ||w_c||^τ`` (bias unchanged, as at inference)."""
    from pih2t_hub.models.pih2t.heads import tau_normalize

    head = _linear(head, "fold_tau_norm")
    return _copy_linear(head, tau_normalize(head.weight, tau), head.bias)


def fold_lws(head: nn.Module) -> nn.Linear:
    """The plain linear head equivalent to a learnable-weight-scaling head (scales folded into weight and bias).

    A training-time head that is a linear layer at inference says so with ``to_linear()`` (LWS does); no method
    is imported here."""
    if not callable(getattr(head, "to_linear", None)):
        raise TimmExportError(f"fold_lws needs an LWSHead, got {type(head).__name__}")
    return head.to_linear()


# ------------------------------------------------------------------------------------------------ export


def check_timm_exportable(model: Any) -> None:
    """Raise :class:`TimmExportError` (one line, naming the reason) unless ``model`` is a timm backbone followed
    by a linear head, with nothing in between."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "backbone_source") or not hasattr(model, "classifier"):
        raise TimmExportError(f"timm export needs a PIH2TForImageClassification, got {type(model).__name__}")
    if config.backbone_source != "timm":
        raise TimmExportError(
            f"timm export needs a timm backbone; {config.backbone!r} is a {config.backbone_source!r} backbone "
            "(push it in the pih2t format instead)"
        )
    if getattr(config, "pif", False) or getattr(model.pih2t, "pif", None) is not None:
        raise TimmExportError("timm export refused: a PIF layer sits between backbone and head, plain timm has none")
    kind = (getattr(config, "tuning", None) or {}).get("kind")
    if getattr(model.pih2t, "tuning", None) is not None or kind in ("adaptformer", "vpt"):
        raise TimmExportError(f"timm export refused: {kind or 'tuning'} modules sit inside the backbone's blocks, "
                              "plain timm has none (merged lora and bitfit export)")
    head = model.classifier
    if type(head).__name__ == "CosineHead":
        raise TimmExportError("timm export refused: a cosine head (s·cos) normalises the features; timm's head is linear")
    if callable(getattr(head, "to_linear", None)):
        raise TimmExportError(f"timm export needs a plain linear head: fold the {type(head).__name__} first "
                              "(to_linear(), or fold_lws)")
    if not isinstance(head, nn.Linear):
        raise TimmExportError(f"timm export needs a linear head at inference, got {type(head).__name__}")


def _timm_name(config: Any) -> str:
    """Architecture plus weight tag when the tag is a timm one, so ``pretrained_cfg`` names the source weights."""
    tag = config.backbone_tag
    if tag and not any(str(tag).startswith(p) for p in ("offline:", "hf-hub:", "hf_hub:", "local-dir:")):
        return f"{config.backbone}.{tag}"
    return str(config.backbone)


@torch.no_grad()
def build_timm_model(model: Any) -> nn.Module:
    """The plain ``timm`` model equal to ``model`` (backbone weights and buffers, the linear head as classifier)."""
    import timm

    check_timm_exportable(model)
    config = model.config
    kwargs = {k: v for k, v in dict(config.backbone_kwargs or {}).items() if k != "num_classes"}
    head: nn.Linear = model.classifier
    out = timm.create_model(_timm_name(config), pretrained=False, num_classes=head.out_features, **kwargs)
    source = model.get_backbone().model.state_dict()
    missing, unexpected = out.load_state_dict(source, strict=False)
    classifier = out.get_classifier()
    head_keys = {f"{name}.{p}" for name, mod in out.named_modules() if mod is classifier for p in ("weight", "bias")}
    if unexpected or not isinstance(classifier, nn.Linear) or set(missing) - head_keys:
        raise TimmExportError(
            f"timm export: {config.backbone!r} does not rebuild with a linear classifier "
            f"(missing {sorted(set(missing) - head_keys)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    classifier.weight.copy_(head.weight)
    if classifier.bias is not None:
        classifier.bias.copy_(head.bias if head.bias is not None else torch.zeros_like(classifier.bias))
    elif head.bias is not None:
        raise TimmExportError(f"timm export: {config.backbone!r}'s classifier has no bias but the head has one")
    return out.to(dtype=head.weight.dtype).eval()


@torch.no_grad()
def _check_same_logits(model: Any, exported: nn.Module, input_size: Sequence[int]) -> None:
    """Refuse an export whose logits differ from the PIH2T model's on a seeded random batch."""
    was_training = model.training
    model.eval()
    try:
        gen = torch.Generator().manual_seed(0)
        dtype = next(exported.parameters()).dtype
        x = torch.randn(2, *[int(s) for s in input_size], generator=gen).to(dtype)
        device = next(model.parameters()).device
        ours = model(pixel_values=x.to(device)).logits.float().cpu()
        theirs = exported(x).float()
    finally:
        model.train(was_training)
    err = float((ours - theirs).abs().max())
    if err > EXPORT_ATOL * max(1.0, float(ours.abs().max())):
        raise TimmExportError(f"timm export: the exported logits differ from the model's by {err:.3g}")


def _data_config(model: Any) -> dict[str, Any]:
    """The pre-processing the model was trained and evaluated with (timm ``pretrained_cfg`` keys)."""
    dc = dict(model.config.backbone_data_config or model.get_backbone().data_config)
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return {k: (tuple(dc[k]) if isinstance(dc[k], list) else dc[k]) for k in keys if dc.get(k) is not None}


def _tidy_config(path: Path, config: Any) -> None:
    """Two fixes to what ``save_for_hf`` writes, so both loaders accept it and it records what ran.

    * ``model_args.num_classes`` is dropped: transformers' ``TimmWrapper`` passes ``model_args`` to
      ``timm.create_model`` next to its own ``num_classes`` (a duplicate keyword); the top-level ``num_classes``,
      which timm and transformers both read, stays.
    * A randomly initialised backbone has no weight tag: the default tag timm fills in would claim weights that
      were never loaded.
    """
    import json

    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.get("model_args", {}).pop("num_classes", None)
    if not cfg.get("model_args"):
        cfg.pop("model_args", None)
    if not config.backbone_tag:
        cfg["pretrained_cfg"].pop("tag", None)
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def export_timm(
    model: Any,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    label_names: Sequence[str] | None = None,
) -> Path:
    """Write ``model`` (timm backbone + linear head) to ``out_dir`` as a plain timm checkpoint; return the folder.

    Args:
        model: a ``PIH2TForImageClassification`` whose ``classifier`` is an ``nn.Linear`` (fold logit adjustment /
            τ-norm / LWS first with :func:`fold_logit_adjustment` / :func:`fold_tau_norm` / :func:`fold_lws`).
        out_dir: the folder to create. It is assembled in a temporary sibling and renamed into place, so it is
            never seen half-written; an existing folder is refused unless ``overwrite``.
        label_names: class names in classifier order (default: ``model.config.id2label``).

    Raises:
        TimmExportError: the model is not timm backbone + linear head (one line saying why), or the rebuilt timm
            model's logits differ from ``model``'s (checked before anything is written).
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
    """
    from timm.models import save_for_hf

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    exported = build_timm_model(model)
    data_config = _data_config(model)
    _check_same_logits(model, exported, data_config.get("input_size", (3, 224, 224)))
    num_classes = model.classifier.out_features
    if label_names is None:
        id2label = model.config.id2label or {}
        label_names = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(num_classes)]
    if len(label_names) != num_classes:
        raise ValueError(f"{len(label_names)} label names for {num_classes} classes")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        save_for_hf(exported, str(staged), model_config={"label_names": [str(n) for n in label_names]},
                    safe_serialization=True, data_config=data_config)
        _tidy_config(staged / "config.json", model.config)
        return publish_folder(staged, out_dir, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
