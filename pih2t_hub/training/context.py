"""What the stages of a run share: the accelerator, the resolved config, the method, the data and the model.

Stages are plain functions of a :class:`RunContext`; the context owns the small factories they all need (image and
feature loaders, the optimiser, evaluation of a head), so each stage reads as what it does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..data.row_batches import batch_fetching, collate_rows
from ..data.transforms import apply_transform
from ..evaluation.metrics import longtail_metrics
from ..methods import Method
from .config import RunConfig
from .loop import GeneratorState, LoopCallback
from .predict import predict_logits


@dataclass
class RunContext:
    accelerator: Any
    cfg: RunConfig
    method: Method
    data: dict[str, Any]
    model: nn.Module
    train_tf: Any
    eval_tf: Any
    data_config: dict[str, Any] = field(default_factory=dict)  # the input pre-processing the transforms use
    mixed_precision: str = "no"  # what the accelerator really computes in (resolved, not requested)
    callbacks: list[LoopCallback] = field(default_factory=list)
    features: dict[str, TensorDataset] = field(default_factory=dict)
    fusion_generator: torch.Generator = field(default_factory=torch.Generator)
    checkpoints: bool = True  # False: no checkpoints (short in-process trials of the comparison)
    progress: bool = True  # per-epoch progress bars

    def checkpoint_dir(self, stage: str) -> Path | None:
        return self.out / "checkpoints" / stage if self.checkpoints else None

    @property
    def counts(self) -> np.ndarray:
        """Training images per class (after the validation split was carved out)."""
        return self.data["class_counts"]

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def finetune(self) -> bool:
        """Whether stage 1 trains the backbone end to end in this run."""
        return self.cfg.stage1_mode == "finetune" and self.cfg.stage in ("1", "both")

    @property
    def peft(self) -> bool:
        """Whether stage 1 trains a lightweight module inside the frozen backbone in this run."""
        return self.cfg.stage1_mode == "peft" and self.cfg.stage in ("1", "both")

    @property
    def extra_state(self) -> dict[str, Any]:
        """Our own checkpointed state: the generator of fusion subsets and mixup draws."""
        return {"fusion_generator": GeneratorState(self.fusion_generator)}

    def images(self, split: str, train: bool) -> Any:
        return apply_transform(self.data[split], self.train_tf if train else self.eval_tf,
                               image_column=self.cfg.image_column, label_column=self.data["label_column"])

    def image_loader(self, split: str) -> DataLoader:
        return self.accelerator.prepare(DataLoader(self.images(split, False), batch_size=self.cfg.batch_size,
                                                   num_workers=self.cfg.num_workers))

    def feature_loader(self, split: str) -> DataLoader:
        return self.accelerator.prepare(DataLoader(batch_fetching(self.features[split]),
                                                   batch_size=max(self.cfg.batch_size, 256), collate_fn=collate_rows))

    def sgd(self, params: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in params if p.requires_grad], lr=lr, momentum=self.cfg.momentum,
                               weight_decay=weight_decay)

    def eval_head(self, head: nn.Module, split: str) -> dict[str, Any]:
        """Long-tail metrics of a head on a split's cached features."""
        head.eval()
        logits, y = predict_logits(self.accelerator, lambda x: head(x.float()), self.feature_loader(split))
        return longtail_metrics(logits, y, self.counts)

    def eval_model(self, split: str) -> dict[str, Any]:
        """Long-tail metrics of the whole model on a split's images (backbone forward)."""
        self.model.eval()
        logits, y = predict_logits(self.accelerator, lambda x: self.model(x).logits, self.image_loader(split))
        return longtail_metrics(logits, y, self.counts)


def loader_generator(seed: int) -> torch.Generator:
    """A training loader's own generator: creating its iterator then draws the worker base seed from it instead
    of the global torch RNG, so a resumed run (one extra iterator mid-epoch) keeps the global stream in step."""
    return torch.Generator().manual_seed(seed)


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's state (weights and buffers), so a fine-tuned or re-estimated backbone never reuses
    features cached from other weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


__all__ = ["RunContext", "loader_generator", "weights_fingerprint"]
