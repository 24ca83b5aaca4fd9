"""Softmax focal loss (Lin et al., ICCV 2017), multi-class form.

FL_i = -α_{y_i} · (1 - p_{i,y_i})^γ · log p_{i,y_i}. The factor (1 - p)^γ shrinks the loss of well-classified
examples so training concentrates on hard ones; γ = 0 recovers cross-entropy. In the long-tailed literature it
is the classic "hard example" baseline, and with class-balanced α it is the CB-Focal loss of Cui et al. 2019.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ._common import check_logits_labels, check_reduction, reduce_loss

__all__ = ["focal_loss", "FocalLoss"]


def focal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gamma: float = 2.0,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Functional softmax focal loss. ``weight`` is an optional per-class α of shape (C,).

    1 - p is computed as ``-expm1(log p)`` for accuracy when p is close to 1; for γ = 0 the modulating factor is
    skipped entirely so the result is exactly cross-entropy.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    log_p = F.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)
    per_sample = -log_p
    if gamma != 0:
        # the floor keeps the gradient of (1 - p)^γ finite for γ < 1 when p rounds to exactly 1
        one_minus_p = (-torch.expm1(log_p)).clamp(min=torch.finfo(log_p.dtype).tiny)
        per_sample = one_minus_p.pow(gamma) * per_sample
    sample_weight = None if weight is None else weight.to(per_sample)[labels]
    return reduce_loss(per_sample, sample_weight, check_reduction(reduction))


class FocalLoss(nn.Module):
    """Module form of :func:`focal_loss`.

    Args:
        gamma: focusing parameter (γ ≥ 0); 2 is the paper default.
        weight: optional per-class α (sequence or tensor of length C), kept in a buffer.
        reduction: ``"mean"`` (Σ α·FL / B, the usual focal convention), ``"weighted_mean"``, ``"sum"``, ``"none"``.
        check_inputs: validate logits/labels each call (shape, label range, NaN); costs one device sync.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        weight: Sequence[float] | torch.Tensor | None = None,
        reduction: str = "mean",
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.reduction = check_reduction(reduction)
        self.check_inputs = check_inputs
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=torch.float32)
            if weight.ndim != 1 or not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
                raise ValueError("weight must be a 1-D tensor of finite, non-negative per-class values")
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.check_inputs:
            check_logits_labels(logits, labels, None if self.weight is None else self.weight.numel())
        return focal_loss(logits, labels, self.gamma, self.weight, self.reduction)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, reduction={self.reduction!r}"
