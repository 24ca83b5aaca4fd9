"""Put a lightweight fine-tuning module into a PI-H2T model for training, and take it out for saving.

LoRA goes through Hugging Face ``peft`` (Linear and Conv2d layers of timm and transformers backbones) and is merged
into the weights when training ends, so the saved model needs neither ``peft`` nor this package. AdaptFormer and
VPT are the model's own modules (:mod:`pih2t_hub.models.pih2t.tuning`, saved with it). BitFit trains the biases and
norm parameters in place. :func:`adapt` freezes everything else; the head stays trainable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .pih2t.tuning import MODULE_KINDS, TUNING_KINDS, TuningModules, bitfit_parameters, lift_rank, vit_blocks


@dataclass
class Adapted:
    """A model under lightweight fine-tuning: its trainable backbone parameters and how to finish (merge LoRA)."""

    model: nn.Module
    spec: dict[str, Any]
    lora: Any = None  # peft's LoraModel wrapping the backbone, until merged
    trainable: list[nn.Parameter] = field(default_factory=list)

    def finish(self) -> nn.Module:
        """Merge LoRA into the weights (a no-op for the other kinds) and record the tuning in the config."""
        if self.lora is not None:
            backbone = self.model.get_backbone()
            backbone.model = self.lora.merge_and_unload()
            self.lora = None
            self.spec["merged"] = True
        self.model.config.tuning = dict(self.spec)
        return self.model


def default_targets(backbone_model: nn.Module) -> list[str]:
    """LoRA's layers when none are named: the attention input projections of a ViT (timm's fused ``qkv``, adapting
    q, k and v; HF's query and value projections, LIFT's choice), else every ungrouped convolution of a CNN
    (grouped and depthwise ones have a handful of weights each)."""
    names = [n for n, m in backbone_model.named_modules() if isinstance(m, nn.Linear)
             and n.rsplit(".", 1)[-1] in ("qkv", "query", "value", "q_proj", "v_proj")]
    if names and vit_blocks(backbone_model) is not None:
        return names
    names = [n for n, m in backbone_model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    if not names:
        raise ValueError(f"--peft lora: no attention projection and no convolution found in "
                         f"{type(backbone_model).__name__}; name the layers with --peft-targets")
    return names


def num_blocks(backbone_model: nn.Module) -> int:
    """L of LIFT's bottleneck rule: transformer blocks of a ViT, stages of a CNN (timm's ``feature_info``)."""
    blocks = vit_blocks(backbone_model)
    if blocks is not None:
        return len(blocks)
    return max(len(getattr(backbone_model, "feature_info", None) or []), 1)


def resolve_spec(model: nn.Module, kind: str, rank: int | None = None, alpha: float = 1.0,
                 targets: list[str] | None = None, prompts: int = 10) -> dict[str, Any]:
    """The tuning's kind and sizes for ``model`` (rank from LIFT's rule when ``None``), as recorded in the config."""
    if kind not in TUNING_KINDS:
        raise ValueError(f"unknown --peft kind {kind!r}; choose one of {', '.join(TUNING_KINDS)}")
    backbone_model = model.get_backbone().model
    spec: dict[str, Any] = {"kind": kind}
    if kind in ("lora", "adaptformer"):
        spec["rank"] = int(rank) if rank is not None else lift_rank(model.config.num_labels, num_blocks(backbone_model))
        if spec["rank"] < 1:
            raise ValueError(f"--peft-rank must be >= 1, got {spec['rank']}")
    if kind == "lora":
        spec["alpha"] = float(alpha)
        spec["targets"] = list(targets) if targets else default_targets(backbone_model)
    if kind == "vpt":
        spec["prompts"] = int(prompts)
    return spec


def adapt(model: nn.Module, spec: dict[str, Any]) -> Adapted:
    """Freeze ``model``'s backbone and add the trainable module of ``spec`` (see :func:`resolve_spec`)."""
    if getattr(model.config, "tuning", None):
        raise ValueError(f"the model was already adapted ({model.config.tuning.get('kind')}); lightweight "
                         "fine-tuning starts from a model without a tuning module")
    backbone = model.get_backbone()
    total = sum(p.numel() for p in backbone.parameters())
    model.requires_grad_(False)
    out = Adapted(model=model, spec=dict(spec))
    kind = spec["kind"]
    if kind == "lora":
        out.lora = _add_lora(backbone, spec)
        out.trainable = [p for p in backbone.parameters() if p.requires_grad]
    elif kind == "bitfit":
        out.trainable = [p for _, p in bitfit_parameters(backbone)]
    elif kind in MODULE_KINDS:
        model.config.tuning = None
        model.pih2t.tuning = TuningModules(backbone.model, spec).to(next(backbone.parameters()).device)
        out.trainable = list(model.pih2t.tuning.parameters())
    for p in [*out.trainable, *model.classifier.parameters()]:
        p.requires_grad_(True)
    count = sum(p.numel() for p in out.trainable)
    out.spec.update(trainable_params=int(count), backbone_params=int(total),
                    trainable_percent=round(100.0 * count / max(total, 1), 4),
                    head_params=int(sum(p.numel() for p in model.classifier.parameters())))
    return out


def _add_lora(backbone: nn.Module, spec: dict[str, Any]) -> Any:
    """LoRA layers injected into the backbone's model in place; peft marks only them trainable."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("--peft lora needs the 'peft' package (pip install peft)") from err
    config = LoraConfig(r=int(spec["rank"]), lora_alpha=float(spec["alpha"]), lora_dropout=0.0,
                        target_modules=list(spec["targets"]), bias="none")
    return LoraModel(backbone.model, config, "default")


__all__ = ["Adapted", "adapt", "default_targets", "num_blocks", "resolve_spec"]
