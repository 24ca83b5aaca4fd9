"""Intra/inter-category gradient-harmonised loss — a **[RECON]** reconstruction (docs/methods.md–4.4).

Paper: Zhang, Lin, Zhang, Xu, *Solving the Long-Tailed Problem via Intra- and Inter-Category Balance*, ICASSP 2022
(arXiv 2204.09234). No official code exists and only the abstract was read, so **everything here is a
reconstruction behind switches, not verified against the paper body**. Check it against the PDF before quoting
numbers as the paper's.

Idea: long-tailed re-weighting fixes the *sample-size* imbalance between classes but ignores the *difficulty*
imbalance inside a class (hard head examples). The loss therefore separates the two:

* **Intra-category balance** — GHM (Li et al., AAAI 2019) run *inside each class*. With g_i = 1 - p_{i,y_i} (the
  magnitude of ∂CE/∂z_y), class c's g values are histogrammed into M_c equal bins over [0, 1] (edges k/M_c, last
  edge nudged by 1e-6), with counts R_{c,j} smoothed by an EMA (momentum μ; μ = 0 uses the batch alone). Then
  β_i = n̂_c / (R_{c,bin(i)} · m_c), where n̂_c = Σ_j R_{c,j} and m_c is the number of bins of class c that are
  non-empty in the current batch. With μ = 0 this gives Σ_{i∈c} β_i = n_c: weight is moved towards rare
  difficulty levels within a class and class totals are unchanged. "Category-wise adaptive precision" is read as
  a per-class bin count M_c (``bins_rule``): tail classes, with few samples, get coarse histograms.
* **Inter-category balance** — a class weight w_c, ``inter`` =
  ``"b1"`` size-based, w_c ∝ n_c^{-κ} (or 1/effective number), normalised so Σ_c w_c n_c = N;
  ``"b2"`` GHM over classes: the EMA mean gradient norm ḡ_c of every class seen so far is histogrammed into
  ``inter_bins`` bins and w_c = C_seen / (R_{bin(ḡ_c)} · m_ne) (classes with a rare difficulty level, typically
  hard tail classes, are up-weighted: "taking each category as a unit");
  ``"none"`` w ≡ 1.
* **Loss**: L = Σ_i w_{y_i} β_i CE_i / Σ_i w_{y_i} β_i; the weights are constants (no gradient).

Limits that hold exactly (tested): M_c = 1 for all c ⇒ β ≡ 1 ⇒ plain class re-weighting (for any μ); a single
class ⇒ GHM-C (exactly for μ = 0; for μ > 0 the per-sample weights are GHM-C's up to one factor per batch, because
the loss is normalised by Σ w β instead of N); w ≡ 1 ⇒ per-class GHM.

Conventions inherited from the GHM-C reference code (so the one-class limit is exact): the EMA updates only the
bins that are non-empty in the current batch, starting from zero counts; m_c counts batch-non-empty bins.
Statistics are updated only in training mode (``loss.train()``), so evaluating the loss on a validation set
does not disturb them; all state lives in registered buffers and is saved in the ``state_dict``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ._common import CountsLike, as_class_counts, check_logits_labels
from .class_balanced import effective_number

__all__ = ["per_class_bins", "inter_class_weights_b1", "HarmonizedLoss", "BINS_RULES", "INTER_MODES"]

BINS_RULES = ("constant", "power", "log")
INTER_MODES = ("b1", "b2", "none")
_EDGE_NUDGE = 1e-6  # GHM-C puts the last edge at 1 + 1e-6 so that g = 1 falls in the last bin


def per_class_bins(
    class_counts: CountsLike | None,
    num_bins: int,
    rule: str = "constant",
    gamma: float = 0.5,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Per-class bin count M_c (long tensor of shape (C,)) [RECON: the paper's exact rule is unknown].

    * ``"constant"``: M_c = ``num_bins`` (needs only ``num_classes`` or counts);
    * ``"power"``: M_c = clip(round(M·(n_c/n_max)^γ), 1, M);
    * ``"log"``: M_c = clip(round(M·log(1+n_c)/log(1+n_max)), 1, M) (log1p so that n = 1 is defined).

    ``round`` rounds halves up.
    """
    if int(num_bins) != num_bins or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins}")
    if rule not in BINS_RULES:
        raise ValueError(f"bins_rule must be one of {BINS_RULES}, got {rule!r}")
    if rule == "constant":
        if class_counts is None and num_classes is None:
            raise ValueError("bins_per_class needs num_classes or class_counts")
        n = num_classes if class_counts is None else len(as_class_counts(class_counts, loss_name="harmonized", allow_zero=True))
        return torch.full((int(n),), int(num_bins), dtype=torch.long)
    counts = as_class_counts(class_counts, loss_name=f"harmonized (bins_rule={rule!r})")
    if rule == "power":
        if gamma < 0:
            raise ValueError(f"bins_gamma must be >= 0, got {gamma}")
        frac = (counts / counts.max()).pow(gamma)
    else:
        frac = torch.log1p(counts) / math.log1p(float(counts.max()))
    return torch.floor(num_bins * frac + 0.5).clamp(1, num_bins).to(torch.long)


def inter_class_weights_b1(
    class_counts: CountsLike,
    kappa: float = 1.0,
    weighting: str = "power",
    beta: float = 0.9999,
) -> torch.Tensor:
    """Size-based class weights (mode b1): w_c ∝ n_c^{-κ} (``"power"``) or 1/E_{n_c} (``"effective_number"``),
    normalised so that Σ_c w_c n_c = N (the re-weighted dataset keeps its total mass). Float32, shape (C,)."""
    counts = as_class_counts(class_counts, loss_name="harmonized (inter='b1')")
    if weighting == "power":
        if kappa < 0:
            raise ValueError(f"kappa must be >= 0, got {kappa}")
        raw = counts.pow(-float(kappa))
    elif weighting == "effective_number":
        raw = 1.0 / effective_number(counts, beta)
    else:
        raise ValueError(f"b1_weighting must be 'power' or 'effective_number', got {weighting!r}")
    return (raw * (counts.sum() / (raw * counts).sum())).to(torch.float32)


def _bin_index(g: torch.Tensor, num_bins: torch.Tensor, max_bins: int) -> torch.Tensor:
    """Bin of each g in [0, 1] for its own bin count: #{k ∈ 1..M-1 : g ≥ k/M} (edges k/M, last edge 1 + 1e-6)."""
    k = torch.arange(1, max(max_bins, 2), device=g.device)
    thresholds = k[None, :].to(g.dtype) / num_bins[:, None].to(g.dtype)
    return ((g[:, None] >= thresholds) & (k[None, :] < num_bins[:, None])).sum(1)


class HarmonizedLoss(nn.Module):
    """Intra/inter-category gradient-harmonised CE [RECON]; see the module docstring for the formulas.

    Args:
        num_classes: number of classes; taken from ``class_counts`` when given.
        class_counts: training samples per class. Needed for ``bins_rule`` ``"power"``/``"log"`` and ``inter="b1"``.
        num_bins: M_max, the largest per-class bin count (GHM-C code default 10; the GHM paper used 30).
        bins_rule: ``"constant"``, ``"power"`` or ``"log"`` (see :func:`per_class_bins`).
        bins_gamma: exponent γ of the ``"power"`` rule.
        bins_per_class: explicit M_c per class; overrides ``bins_rule``.
        momentum: EMA momentum μ ∈ [0, 1) of the per-class histograms (GHM paper 0.75; 0 = per batch).
        inter: ``"b1"``, ``"b2"`` or ``"none"``.
        b1_weighting: ``"power"`` (w ∝ n^{-κ}) or ``"effective_number"`` (w ∝ 1/E_n with ``beta``).
        kappa: exponent κ of the b1 ``"power"`` weighting.
        beta: effective-number β of the b1 ``"effective_number"`` weighting.
        inter_bins: number of bins of the b2 class-level histogram (default ``num_bins``).
        inter_momentum: EMA momentum of ḡ_c for b2 (default ``momentum``); a class's first value is taken as is.
        start_epoch: epochs before this one use plain CE (statistics are still collected), in the spirit of DRW.
        check_inputs: validate logits/labels each call (shape, label range, NaN); costs one device sync.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        class_counts: CountsLike | None = None,
        *,
        num_bins: int = 10,
        bins_rule: str = "power",
        bins_gamma: float = 0.5,
        bins_per_class: Sequence[int] | torch.Tensor | None = None,
        momentum: float = 0.75,
        inter: str = "b2",
        b1_weighting: str = "power",
        kappa: float = 1.0,
        beta: float = 0.9999,
        inter_bins: int | None = None,
        inter_momentum: float | None = None,
        start_epoch: int = 0,
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        if inter not in INTER_MODES:
            raise ValueError(f"inter must be one of {INTER_MODES}, got {inter!r}")
        if class_counts is not None:
            counts = as_class_counts(class_counts, loss_name="harmonized", allow_zero=True)
            if num_classes is not None and num_classes != counts.numel():
                raise ValueError(f"num_classes={num_classes} but class_counts has {counts.numel()} entries")
            num_classes = counts.numel()
        needs_counts = (bins_per_class is None and bins_rule != "constant") or inter == "b1"
        if needs_counts and class_counts is None:
            raise ValueError(
                f"loss 'harmonized' with bins_rule={bins_rule!r}, inter={inter!r} needs class_counts (training samples "
                "per class); pass class_counts=..., or use bins_rule='constant' with inter='b2' or 'none'"
            )
        if num_classes is None or num_classes < 1:
            raise ValueError("loss 'harmonized' needs num_classes (or class_counts)")
        for name, mu in (("momentum", momentum), ("inter_momentum", inter_momentum)):
            if mu is not None and not 0.0 <= mu < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {mu}")
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")

        if bins_per_class is not None:
            m = torch.as_tensor(np.asarray(bins_per_class), dtype=torch.long)
            if m.shape != (num_classes,) or bool((m < 1).any()):
                raise ValueError(f"bins_per_class must hold {num_classes} integers >= 1")
        else:
            m = per_class_bins(class_counts, num_bins, bins_rule, bins_gamma, num_classes)
        self.num_classes = int(num_classes)
        self.max_bins = int(m.max())
        self.bins_rule = "explicit" if bins_per_class is not None else bins_rule
        self.momentum = float(momentum)
        self.inter = inter
        self.inter_bins = int(inter_bins if inter_bins is not None else num_bins)
        if self.inter_bins < 1:
            raise ValueError(f"inter_bins must be >= 1, got {inter_bins}")
        self.inter_momentum = float(momentum if inter_momentum is None else inter_momentum)
        self.start_epoch = int(start_epoch)
        self.check_inputs = check_inputs

        if inter == "b1":
            b1 = inter_class_weights_b1(class_counts, kappa, b1_weighting, beta)
        else:
            b1 = torch.ones(self.num_classes)
        self.register_buffer("bins_per_class", m)
        self.register_buffer("b1_weight", b1)
        self.register_buffer("bin_counts", torch.zeros(self.num_classes, self.max_bins))
        self.register_buffer("class_grad_mean", torch.zeros(self.num_classes))
        self.register_buffer("class_seen", torch.zeros(self.num_classes, dtype=torch.bool))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ state
    def set_epoch(self, epoch: int) -> None:
        """Tell the loss the current (0-based) epoch (only ``start_epoch`` depends on it)."""
        self.epoch.fill_(int(epoch))

    def reset_state(self) -> None:
        """Forget the EMA statistics (histograms and class-mean gradient norms)."""
        self.bin_counts.zero_()
        self.class_grad_mean.zero_()
        self.class_seen.zero_()

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def compute_weights(
        self, logits: torch.Tensor, labels: torch.Tensor, update: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (class weight w_{y_i}, intra weight β_i), each of shape (B,), for this batch.

        ``update`` (default: ``self.training``) stores the new EMA statistics; when False the batch is still
        folded into a temporary copy so that every sample has a non-empty bin.
        """
        update = self.training if update is None else update
        labels = labels.long()
        g = (1.0 - F.softmax(logits.detach().float(), dim=-1).gather(1, labels[:, None]).squeeze(1)).clamp(0.0, 1.0)
        num_bins = self.bins_per_class[labels]
        bins = _bin_index(g, num_bins, self.max_bins)

        # intra: per-class histograms of this batch, EMA over non-empty bins (GHM-C convention)
        flat = labels * self.max_bins + bins
        batch_hist = torch.bincount(flat, minlength=self.num_classes * self.max_bins)
        batch_hist = batch_hist.view(self.num_classes, self.max_bins).to(self.bin_counts.dtype)
        filled = batch_hist > 0
        if self.momentum > 0:
            hist = torch.where(filled, self.momentum * self.bin_counts + (1 - self.momentum) * batch_hist, self.bin_counts)
        else:
            hist = batch_hist
        n_hat = hist.sum(1)
        nonempty = filled.sum(1).clamp(min=1).to(hist.dtype)
        beta_intra = n_hat[labels] / (hist[labels, bins] * nonempty[labels])

        # inter
        grad_mean, seen = self.class_grad_mean, self.class_seen
        if self.inter == "b2":
            count = torch.bincount(labels, minlength=self.num_classes).to(g.dtype)
            present = count > 0
            batch_mean = torch.zeros(self.num_classes, device=g.device).index_add_(0, labels, g) / count.clamp(min=1)
            mu = self.inter_momentum
            grad_mean = torch.where(
                present & seen, mu * grad_mean + (1 - mu) * batch_mean, torch.where(present, batch_mean, grad_mean)
            )
            seen = seen | present
            class_w = self._ghm_class_weights(grad_mean, seen)
        elif self.inter == "b1":
            class_w = self.b1_weight
        else:
            class_w = torch.ones_like(self.b1_weight)

        if update:
            self.bin_counts.copy_(hist)
            self.class_grad_mean.copy_(grad_mean)
            self.class_seen.copy_(seen)
        return class_w[labels], beta_intra

    def _ghm_class_weights(self, grad_mean: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """b2: w_c = C_seen / (R_{bin(ḡ_c)} · m_ne) over the seen classes; unseen classes get 1."""
        n_bins = self.inter_bins
        bins = _bin_index(grad_mean, torch.full_like(grad_mean, n_bins, dtype=torch.long), n_bins)
        hist = torch.bincount(bins[seen], minlength=n_bins).to(grad_mean.dtype)
        n_seen = seen.sum().to(grad_mean.dtype)
        m_ne = (hist > 0).sum().clamp(min=1).to(grad_mean.dtype)
        w = n_seen / (hist[bins].clamp(min=1) * m_ne)
        return torch.where(seen, w, torch.ones_like(w))

    # ------------------------------------------------------------------ loss
    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.check_inputs:
            check_logits_labels(logits, labels, self.num_classes)
        if labels.numel() == 0:
            return logits.sum() * 0.0
        class_w, beta_intra = self.compute_weights(logits, labels)
        ce = F.cross_entropy(logits.float(), labels, reduction="none")
        if int(self.epoch) < self.start_epoch:
            return ce.mean()
        weights = class_w * beta_intra
        return (weights * ce).sum() / weights.sum()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, bins_rule={self.bins_rule!r}, max_bins={self.max_bins}, "
            f"momentum={self.momentum}, inter={self.inter!r}, start_epoch={self.start_epoch}"
        )

