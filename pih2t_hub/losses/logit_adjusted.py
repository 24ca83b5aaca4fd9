"""Logit adjustment (Menon et al., ICLR 2021) and balanced softmax (Ren et al., NeurIPS 2020).

Under label shift from a long-tailed train prior π to a uniform test prior, the Bayes-optimal balanced
classifier is argmax_c (log p(c|x) - log π_c). Two ways to get there:

* **loss-side** (:class:`LogitAdjustedLoss`): train with CE on z + τ·log π. The network's own logits z then
  learn the balanced scores; at test time z is used unchanged.
* **post-hoc** (:func:`posthoc_logit_adjust`): train with plain CE and subtract τ·log π at test time.

Balanced softmax (:class:`BalancedSoftmaxLoss`) trains CE on z + log n_c. Since log n_c = log π_c + log N and CE is
invariant to adding the same constant to every logit, it is exactly the logit-adjusted loss with τ = 1.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ._common import CountsLike, as_class_counts, check_logits_labels, check_reduction, reduce_loss

__all__ = ["log_prior", "posthoc_logit_adjust", "LogitAdjustedLoss", "BalancedSoftmaxLoss"]


def _check_tau(tau: float) -> float:
    tau = float(tau)
    if not tau >= 0.0:  # also rejects NaN
        raise ValueError(f"tau must be >= 0, got {tau}")
    return tau


def log_prior(class_counts: CountsLike) -> torch.Tensor:
    """log π_c = log(n_c / Σ n) as a float32 tensor of shape (C,). All counts must be > 0."""
    counts = as_class_counts(class_counts, loss_name="logit adjustment")
    return (counts.log() - counts.sum().log()).to(torch.float32)


def posthoc_logit_adjust(logits: torch.Tensor, class_counts: CountsLike, tau: float = 1.0) -> torch.Tensor:
    """Post-hoc logit adjustment: return ``logits - tau * log prior`` (same shape, float dtype of ``logits``).

    Raises ``ValueError`` for τ < 0, zero counts, a class-count/logit mismatch or NaN logits.
    """
    tau = _check_tau(tau)
    prior = log_prior(class_counts)
    if logits.ndim < 1 or logits.shape[-1] != prior.numel():
        raise ValueError(f"logits have {logits.shape[-1] if logits.ndim else 0} classes, class_counts {prior.numel()}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits contain NaN or inf")
    dtype = logits.dtype if logits.dtype.is_floating_point else torch.float32
    return logits.to(dtype) - tau * prior.to(device=logits.device, dtype=dtype)


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted softmax CE: CE(z + τ·log π, y) (Menon et al. 2021).

    Args:
        class_counts: training samples per class (required; all > 0).
        tau: adjustment strength τ ≥ 0 (1 is the paper's default and Fisher-consistent for the balanced error).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        check_inputs: validate logits/labels each call (shape, label range, NaN); costs one device sync.
    """

    def __init__(
        self,
        class_counts: CountsLike | None = None,
        tau: float = 1.0,
        reduction: str = "mean",
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        counts = as_class_counts(class_counts, loss_name=self._loss_name())
        self.tau = _check_tau(tau)
        self.reduction = check_reduction(reduction)
        self.check_inputs = check_inputs
        self.num_classes = counts.numel()
        self.register_buffer("log_prior", (counts.log() - counts.sum().log()).to(torch.float32))

    @classmethod
    def _loss_name(cls) -> str:
        return "logit_adjusted"

    def adjusted_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the CE is taken of: z + τ·log π (float32)."""
        return logits.float() + self.tau * self.log_prior

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.check_inputs:
            check_logits_labels(logits, labels, self.num_classes)
        per_sample = F.cross_entropy(self.adjusted_logits(logits), labels, reduction="none")
        return reduce_loss(per_sample, None, self.reduction)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, tau={self.tau}"


class BalancedSoftmaxLoss(LogitAdjustedLoss):
    """Balanced softmax CE: CE(z + log n_c, y) (Ren et al. 2020); equal to :class:`LogitAdjustedLoss` with τ = 1.

    Implemented with log π instead of log n_c: the two differ by the constant log N on every logit, which
    softmax ignores, and log π keeps the adjusted logits small for large datasets.
    """

    def __init__(self, class_counts: CountsLike | None = None, reduction: str = "mean", check_inputs: bool = True) -> None:
        super().__init__(class_counts, tau=1.0, reduction=reduction, check_inputs=check_inputs)

    @classmethod
    def _loss_name(cls) -> str:
        return "balanced_softmax"
