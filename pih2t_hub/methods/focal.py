"""Focal loss on frozen features: focal loss (γ = 2)."""

from __future__ import annotations

from typing import Any

from ._loss import LossMethod
from .base import register_method


@register_method("focal")
class Focal(LossMethod):
    paper = "Lin et al., Focal Loss, ICCV 2017"
    summary = "focal loss (γ = 2)"
    loss = "focal"
    loss_kwargs = {"gamma": 2.0}

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {**super().search_space(trial), "loss_kwargs": {"gamma": trial.suggest_float("gamma", 0.5, 3.0)}}
