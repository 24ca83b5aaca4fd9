"""LDAM-DRW on frozen features: label-distribution-aware margins; class-balanced re-weighting deferred to 80 % of the epochs."""

from __future__ import annotations

from typing import Any

from ._loss import LossMethod
from .base import Recipe, register_method


@register_method("ldam_drw")
class LDAMDRW(LossMethod):
    paper = "Cao et al., LDAM-DRW, NeurIPS 2019"
    summary = "label-distribution-aware margins; class-balanced re-weighting deferred to 80 % of the epochs"
    loss = "ldam_drw"
    # Our heads emit logits directly (a linear head, or a cosine head that applies its own scale), so the margins
    # act on logits with s = 1 instead of the paper's s = 30 on a normalised head.
    loss_kwargs = {"s": 1.0, "max_m": 0.5}  # max_m: the paper's (and the loss's default) largest margin
    recipe = Recipe(epochs=200, lr=0.1, batch_size=128, weight_decay=2e-4, schedule="multistep", warmup=5,
                    milestones=(0.8, 0.9), gamma=0.01,
                    source="LDAM-DRW official CIFAR recipe: 200 epochs, lr 0.1 with 5 warm-up epochs, x0.01 at "
                           "epochs 160 and 180, batch 128, weight decay 2e-4, DRW from epoch 160")

    epoch_range = (20, 200, 20)  # around its 200-epoch recipe

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {**super().search_space(trial), "loss_kwargs": {"max_m": trial.suggest_float("max_m", 0.1, 1.0)}}
