"""LDAM loss with deferred re-weighting (Cao et al., NeurIPS 2019).

Label-distribution-aware margin: a generalisation bound suggests class margins m_c ∝ n_c^{-1/4}, so rare classes
get larger margins. The margin is subtracted from the *true-class* logit only and the logits are multiplied by a
scale s before softmax CE:  LDAM_i = CE(s · (z_i - m_{y_i} e_{y_i}), y_i). The margins are rescaled so that the
largest (rarest class) equals ``max_m``.

**Cosine logits.** The original uses a normalised linear head (features and class weights L2-normalised), so
z ∈ [-1, 1] and s = 30 turns them into usable softmax logits; the margin 0.5 is then meaningful on the cosine
scale. With an ordinary (un-normalised) linear head, s = 30 blows the logits up; use a cosine head (or set
``s=1`` and pick ``max_m`` on the scale of your logits).

**DRW.** Deferred re-weighting trains unweighted for the first ``drw_epoch`` epochs (to learn features), then
switches on class-balanced weights by effective number (β = 0.9999; see :mod:`.class_balanced`). The official
recipe switches at epoch 160 of 200. The current epoch is kept in a buffer, so a resumed run is in the right phase.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ._common import CountsLike, as_class_counts, check_logits_labels, check_reduction, reduce_loss
from .class_balanced import DeferredReweighting

__all__ = ["ldam_margins", "LDAMLoss"]


def ldam_margins(class_counts: CountsLike, max_m: float = 0.5) -> torch.Tensor:
    """Per-class margins m_c = C / n_c^{1/4} with C chosen so that max_c m_c = ``max_m`` (float32, shape (C,))."""
    if not max_m > 0:
        raise ValueError(f"max_m must be > 0, got {max_m}")
    counts = as_class_counts(class_counts, loss_name="ldam")
    raw = counts.pow(-0.25)
    return (raw * (max_m / raw.max())).to(torch.float32)


class LDAMLoss(DeferredReweighting):
    """LDAM softmax CE, optionally with deferred re-weighting (``drw_epoch`` set → LDAM-DRW).

    Args:
        class_counts: training samples per class (required; all > 0).
        max_m: the largest margin (given to the rarest class); 0.5 in the paper.
        s: logit scale; 30 for cosine logits as in the paper.
        drw_epoch: the first epoch whose loss is class-balanced weighted (:class:`DeferredReweighting`); ``None``
            (default) never: plain LDAM.
        beta: effective-number β of the DRW weights (0.9999).
        reduction: ``"weighted_mean"`` (default; Σ w·l / Σ w, as ``F.cross_entropy(weight=...)`` in the official
            code), ``"mean"``, ``"sum"`` or ``"none"``.
        check_inputs: validate logits/labels each call (shape, label range, NaN); costs one device sync.
    """

    def __init__(
        self,
        class_counts: CountsLike | None = None,
        max_m: float = 0.5,
        s: float = 30.0,
        drw_epoch: int | None = None,
        beta: float = 0.9999,
        reduction: str = "weighted_mean",
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        counts = as_class_counts(class_counts, loss_name="ldam" if drw_epoch is None else "ldam_drw")
        if not s > 0:
            raise ValueError(f"s must be > 0, got {s}")
        self.max_m = float(max_m)
        self.s = float(s)
        self.beta = float(beta)
        self.reduction = check_reduction(reduction)
        self.check_inputs = check_inputs
        self.num_classes = counts.numel()
        self.register_buffer("margins", ldam_margins(counts, max_m))
        self._init_reweighting(counts, beta, drw_epoch)

    def margin_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """s · (z - m_y on the true class), the logits the CE is taken of (float32)."""
        logits = logits.float()
        shift = torch.zeros_like(logits).scatter_(1, labels[:, None], self.margins[labels][:, None])
        return self.s * (logits - shift)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.check_inputs:
            check_logits_labels(logits, labels, self.num_classes)
        per_sample = F.cross_entropy(self.margin_logits(logits, labels), labels, reduction="none")
        weights = self.class_weight[labels] if self.weights_active else None
        return reduce_loss(per_sample, weights, self.reduction)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, max_m={self.max_m}, s={self.s}, drw_epoch={self.drw_epoch}"
