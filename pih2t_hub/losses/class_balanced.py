"""Class-balanced weights by the effective number of samples (Cui et al., CVPR 2019).

Cui et al. argue that extra samples of a class add diminishing information, so a class with n samples behaves
like E_n = (1 - β^n) / (1 - β) "effective" samples. Weighting each class by 1 / E_n, normalised so the weights
sum to the number of classes C, re-balances the loss without the extreme weights of plain inverse frequency
(β → 1 gives inverse frequency, β = 0 gives no re-weighting). The weights are combinable with softmax CE or the
focal loss (:class:`ClassBalancedLoss`), and are also the deferred weights of LDAM-DRW (Cao et al. 2019).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ._common import CountsLike, as_class_counts, check_logits_labels, check_reduction, reduce_loss
from .focal import focal_loss

__all__ = ["effective_number", "class_balanced_weights", "ClassBalancedLoss", "DeferredReweighting"]


def _check_beta(beta: float) -> float:
    if not 0.0 <= float(beta) < 1.0:
        raise ValueError(f"beta must lie in [0, 1), got {beta}")
    return float(beta)


def effective_number(class_counts: CountsLike, beta: float = 0.9999) -> torch.Tensor:
    """Effective number of samples per class, E_c = (1 - β^{n_c}) / (1 - β), as float64.

    Computed with ``expm1``/``log1p`` so that β close to 1 (0.9999 is the usual value) keeps full precision.
    """
    beta = _check_beta(beta)
    counts = as_class_counts(class_counts, loss_name="effective_number", allow_zero=True)
    if beta == 0.0:
        return (counts > 0).to(torch.float64)
    # 1 - β^n = -expm1(n · log β); 1 - β = -expm1(log β)
    log_beta = torch.log1p(torch.tensor(-(1.0 - beta), dtype=torch.float64))
    return torch.expm1(counts * log_beta) / torch.expm1(log_beta)


def class_balanced_weights(class_counts: CountsLike, beta: float = 0.9999) -> torch.Tensor:
    """Class weights w_c = (1 - β) / (1 - β^{n_c}), normalised so Σ_c w_c = C (float32 tensor of shape (C,)).

    Raises ``ValueError`` if any count is zero: a class without samples would get an infinite weight.
    """
    counts = as_class_counts(class_counts, loss_name="class_balanced_weights")
    inv = 1.0 / effective_number(counts, beta)
    return (inv * (counts.numel() / inv.sum())).to(torch.float32)


class DeferredReweighting(nn.Module):
    """Class-balanced weights that apply from epoch ``drw_epoch`` on (deferred re-weighting, Cao et al. 2019).

    One meaning for every loss that has them: ``drw_epoch`` is the first (0-based) epoch whose loss is weighted;
    ``0`` weights from the start, ``None`` never. The epoch lives in a buffer, so a resumed run restores the phase
    from the ``state_dict``; the training loop calls :meth:`set_epoch` at every epoch's start.
    """

    drw_epoch: int | None

    def _init_reweighting(self, counts: torch.Tensor, beta: float, drw_epoch: int | None) -> None:
        if drw_epoch is not None and drw_epoch < 0:
            raise ValueError(f"drw_epoch must be >= 0 or None, got {drw_epoch}")
        self.drw_epoch = None if drw_epoch is None else int(drw_epoch)
        self.register_buffer("class_weight", class_balanced_weights(counts, beta))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss the current (0-based) epoch; the weights apply once ``epoch >= drw_epoch``."""
        self.epoch.fill_(int(epoch))

    @property
    def weights_active(self) -> bool:
        """Whether the class-balanced weights are applied at the current epoch."""
        return self.drw_epoch is not None and int(self.epoch) >= self.drw_epoch


class ClassBalancedLoss(DeferredReweighting):
    """Softmax CE or focal loss with class-balanced weights (Cui et al. 2019), optionally deferred (DRW).

    Args:
        class_counts: training samples per class (required; all > 0).
        beta: effective-number hyper-parameter in [0, 1); 0.9999 is the paper's CIFAR-LT default.
        base: ``"ce"`` or ``"focal"``.
        gamma: focal exponent (only for ``base="focal"``).
        drw_epoch: the first epoch whose loss is weighted (:class:`DeferredReweighting`): 0 (default) from the
            start; N > 0 defers the weights (Cao et al. 2019, "CE-DRW"), unweighted before; ``None`` never.
        reduction: see :data:`pih2t_hub.losses._common.REDUCTIONS`. The default ``"mean"`` (Σ w·l / B) is the
            convention of Cui et al.; ``"weighted_mean"`` matches ``F.cross_entropy(weight=...)``.
        check_inputs: validate logits/labels each call (shape, label range, NaN); costs one device sync.
    """

    def __init__(
        self,
        class_counts: CountsLike | None = None,
        beta: float = 0.9999,
        base: str = "ce",
        gamma: float = 2.0,
        drw_epoch: int | None = 0,
        reduction: str = "mean",
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        counts = as_class_counts(class_counts, loss_name="cb")
        if base not in ("ce", "focal"):
            raise ValueError(f"base must be 'ce' or 'focal', got {base!r}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.beta = _check_beta(beta)
        self.base = base
        self.gamma = float(gamma)
        self.reduction = check_reduction(reduction)
        self.check_inputs = check_inputs
        self.num_classes = counts.numel()
        self._init_reweighting(counts, beta, drw_epoch)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.check_inputs:
            check_logits_labels(logits, labels, self.num_classes)
        logits = logits.float()
        if self.base == "focal":
            per_sample = focal_loss(logits, labels, self.gamma, reduction="none")
        else:
            per_sample = F.cross_entropy(logits, labels, reduction="none")
        weights = self.class_weight[labels] if self.weights_active else None
        return reduce_loss(per_sample, weights, self.reduction)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, beta={self.beta}, base={self.base!r}, drw_epoch={self.drw_epoch}"
