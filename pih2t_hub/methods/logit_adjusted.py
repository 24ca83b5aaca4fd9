"""Logit adjustment (Menon et al.): trained with the adjusted loss on frozen features, or post-hoc on the stage-1 head."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..losses import posthoc_logit_adjust
from ._loss import LossMethod
from .base import Method, Stage2Context, register_method


@register_method("logit_adjusted")
class LogitAdjusted(LossMethod):
    paper = "Menon et al., Long-tail learning via logit adjustment, ICLR 2021"
    summary = "loss on logits + τ·log prior (τ = 1); raw logits at inference"
    loss = "logit_adjusted"
    loss_kwargs = {"tau": 1.0}  # the loss's own default, written out: the published value of the searched τ

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {**super().search_space(trial), "loss_kwargs": {"tau": trial.suggest_float("tau", 0.5, 2.0)}}


@dataclass(frozen=True)
class PosthocParams:
    """``tau``: the scale of the log prior subtracted from the logits (1 in the paper), >= 0."""

    tau: float = 1.0

    def __post_init__(self) -> None:
        tau = self.tau
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau >= 0):
            raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
        object.__setattr__(self, "tau", float(tau))


@register_method("logit_adjusted_posthoc")
class PosthocLogitAdjusted(Method):
    paper = "Menon et al., Long-tail learning via logit adjustment, ICLR 2021 (post-hoc, the official default)"
    summary = "no training: τ·log prior subtracted from the stage-1 logits (τ = 1), folded into the head's bias"

    Params = PosthocParams

    def finalize(self, trained: nn.Module, ctx: Stage2Context) -> nn.Module:
        tau = self.params.tau
        if not isinstance(trained, nn.Linear):
            raise ValueError(f"post-hoc logit adjustment needs a linear head, got {type(trained).__name__}")
        head = copy.deepcopy(trained)
        offset = posthoc_logit_adjust(torch.zeros(1, ctx.num_classes), ctx.class_counts.tolist(), tau=tau)[0]
        with torch.no_grad():
            if head.bias is None:
                raise ValueError("post-hoc logit adjustment folds into the bias; the stage-1 head has none")
            head.bias.add_(offset.to(head.bias))
        ctx.results["posthoc_tau"] = tau
        return head

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {"method_kwargs": {"tau": trial.suggest_float("tau", 0.0, 2.0)}}
