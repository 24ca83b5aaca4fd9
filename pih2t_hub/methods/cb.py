"""Class-balanced loss on frozen features: cross-entropy weighted by the inverse effective number (β = 0.9999)."""

from __future__ import annotations

from typing import Any

from ._loss import LossMethod
from .base import register_method


@register_method("cb")
class ClassBalanced(LossMethod):
    paper = "Cui et al., Class-Balanced Loss Based on Effective Number of Samples, CVPR 2019"
    summary = "cross-entropy weighted by the inverse effective number (β = 0.9999)"
    loss = "cb"
    loss_kwargs = {"beta": 0.9999}  # the loss's own default, written out: the published value of the searched β

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        beta = trial.suggest_categorical("beta", [0.9, 0.99, 0.999, 0.9999])
        return {**super().search_space(trial), "loss_kwargs": {"beta": beta}}
