"""The run configuration: one dataclass, loadable from YAML, overridable from the CLI, written beside outputs.

Config is data: the fully resolved ``RunConfig`` is saved as ``run_config.yaml`` next to the model, and the model
card is rendered from the same object.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class RunConfig:
    """Everything a run needs. Defaults are the offline demo: pretrained EfficientNet-Lite0 on MNIST-LT."""

    # data
    dataset: str = "mnist"
    label_column: str | None = None
    image_column: str | None = None
    imbalance_ratio: float | None = 50.0  # None: the train split is already long-tailed; keep it whole
    profile: str = "exp"
    max_per_class: int | None = 300
    test_per_class: int = 50  # balanced test set carved from train when the dataset has no test split
    val_fraction: float = 0.1
    image_size: int | None = 64
    # model
    backbone: str = "effnet_lite0"
    pretrained: bool = True
    head_type: str = "linear"
    # method
    method: str = "h2t"
    loss: str | None = None  # None: the method's own loss; a name combines a fusion method with it ("X + H2T")
    sampler: str | None = None  # None: the method's own stage-2 sampler
    fusion_ratio: float = 0.25
    h2tf_mode: str = "interpolate"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    method_kwargs: dict[str, Any] = field(default_factory=dict)  # method hyper-parameters (e.g. DLSA's, τ grid)
    # stages
    stage: str = "both"  # "1", "2" or "both"
    stage1_mode: str = "linear"  # "linear": head on cached features of the frozen backbone; "finetune": end to end
    stage2_mode: str = "cached"  # "cached" pooled features, or "online" (backbone forward every step)
    stage1_epochs: int = 10
    stage1_lr: float = 0.1
    mixup_alpha: float = 0.0
    shift_bn: bool = True
    batch_size: int = 128  # stage 1 and feature extraction
    weight_decay: float = 5e-4  # stage 1
    momentum: float = 0.9
    # stage 2: None takes the method's published recipe (pih2t_hub.methods); the resolved values are recorded
    stage2_epochs: int | None = None
    stage2_lr: float | None = None
    stage2_batch_size: int | None = None
    stage2_weight_decay: float | None = None
    grad_accum: int = 1
    mixed_precision: str = "no"
    feature_dtype: str = "float32"
    cache_dir: str | None = None  # feature cache; default <output_dir>/features. Share it across runs: the manifest
    # (backbone weights, transform, split, seed, imbalance) decides reuse, so a stale cache is never read
    init_from: str | None = None  # a saved model folder to start from (e.g. a stage-1 run, for --stage 2 alone)
    num_workers: int = 0
    report_to: str | None = None  # accelerate tracker ("tensorboard", "wandb", ...), installed separately
    # bookkeeping
    seed: int = 0
    output_dir: str = "outputs/demo"
    checkpoint_every: int = 0
    keep_last: int = 2
    resume: bool = False
    export: str = "pih2t"  # saved model format: "pih2t" (transformers, remote code) or "timm" (plain timm folder too)
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_format: str = "pih2t"  # what --push-to-hub uploads: "pih2t" or "timm"

    def validate(self) -> "RunConfig":
        if self.imbalance_ratio is not None and (not math.isfinite(self.imbalance_ratio) or self.imbalance_ratio < 1):
            raise ValueError(f"imbalance_ratio must be finite and >= 1, got {self.imbalance_ratio}")
        if self.stage not in ("1", "2", "both"):
            raise ValueError(f"stage must be '1', '2' or 'both', got {self.stage!r}")
        if self.stage1_mode not in ("linear", "finetune"):
            raise ValueError(f"stage1_mode must be 'linear' or 'finetune', got {self.stage1_mode!r}")
        if self.stage2_mode not in ("cached", "online"):
            raise ValueError(f"stage2_mode must be 'cached' or 'online', got {self.stage2_mode!r}")
        if not 0.0 <= self.fusion_ratio <= 1.0:
            raise ValueError(f"fusion_ratio must lie in [0, 1], got {self.fusion_ratio}")
        for name in ("stage1_epochs", "stage2_epochs", "batch_size", "stage2_batch_size", "grad_accum"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("stage1_lr", "stage2_lr", "weight_decay", "stage2_weight_decay", "momentum"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0 or (value == 0 and "lr" in name)):
                raise ValueError(f"{name} must be finite and {'> 0' if 'lr' in name else '>= 0'}, got {value}")
        if self.export not in ("pih2t", "timm"):
            raise ValueError(f"export must be 'pih2t' or 'timm', got {self.export!r}")
        if self.hub_format not in ("pih2t", "timm"):
            raise ValueError(f"hub_format must be 'pih2t' or 'timm', got {self.hub_format!r}")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push-to-hub needs --hub-model-id")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a recipe must be a YAML mapping")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)


__all__ = ["RunConfig"]
