"""FlowGMM: a MAF flow with a fixed Gaussian mixture in latent space, and how DLSA trains it (METHODS.md §3.4-3.5).

The mixture has K components with identity covariance, uniform weights and means drawn once from N(0, σ² I)
(σ = 0.05); the means are a buffer, so only the flow learns. The density of a feature vector is

    log p(x | k) = -D/2 · log 2π - ½ ‖T(x) - μ_k‖² + log|det J_T(x)|          (B, K)
    log p(x)     = logsumexp_k log p(x | k) - log K                              (B,)

and a sample's cluster is ``argmax_k log p(x | k)`` (the nearest mean in latent space). DLSA trains the flow with
three terms on pairs (x⁺, x⁻) from two different classes: a tail-weighted likelihood, a "purity" term that pushes
the negative's component posterior away from the positive's, and a balance term (KL of the EMA'd mean posterior to
uniform) that keeps all clusters in use. After each epoch the model is scored by the number of pure, non-tiny
clusters and the best epoch is kept.

Deviation from the official code: the official code scores epochs on the (remaining) *training* samples; here the
caller passes the selection split, and :func:`fit_dlsa` passes a validation split when one is given (the issue asks
for validation-based selection). When selecting on a split of a different size, the cluster-size bounds may be
rescaled by the caller ([RECON], see ``DLSAConfig.scale_size_thresholds``).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .flow import MAF

__all__ = [
    "FlowGMM",
    "class_pair_weights",
    "ClassPairSampler",
    "likelihood_loss",
    "purity_loss",
    "BalanceLoss",
    "cluster_purity_score",
    "FlowTrainResult",
    "train_flowgmm",
]

logger = logging.getLogger(__name__)


class FlowGMM(nn.Module):
    """MAF flow plus K fixed isotropic Gaussian components with uniform weights."""

    def __init__(
        self,
        dim: int,
        num_clusters: int,
        *,
        n_blocks: int = 2,
        hidden_size: int | None = None,
        n_hidden: int = 1,
        batch_norm: bool = True,
        mean_std: float = 0.05,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
        if mean_std < 0:
            raise ValueError(f"mean_std must be >= 0, got {mean_std}")
        self.dim = dim
        self.num_clusters = num_clusters
        self.flow = MAF(dim, n_blocks, hidden_size, n_hidden, batch_norm, generator)
        means = torch.randn(num_clusters, dim, generator=generator) * mean_std
        self.register_buffer("means", means)

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x | k) for every component, shape (B, K)."""
        u, log_det = self.flow(x)
        # ‖u - μ‖² expanded so that no (B, K, D) tensor is built (K = 500, D = 2048 in the released configs).
        sq = (u * u).sum(1, keepdim=True) - 2.0 * u @ self.means.T + (self.means * self.means).sum(1)[None, :]
        sq = sq.clamp_min(0.0)
        return -0.5 * self.dim * math.log(2 * math.pi) - 0.5 * sq + log_det[:, None]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (component log-probs (B, K), log-likelihood log p(x) (B,))."""
        comp = self.component_log_prob(x)
        return comp, self.log_prob_from_components(comp)

    def log_prob_from_components(self, comp: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(comp, dim=1) - math.log(self.num_clusters)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)[1]

    def posterior(self, x: torch.Tensor) -> torch.Tensor:
        """q(k | x): softmax over components of log p(x | k) (uniform mixture weights cancel)."""
        return torch.softmax(self.component_log_prob(x), dim=1)

    @torch.no_grad()
    def score(self, x: torch.Tensor, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode log-likelihood (N,) and cluster (N,) in chunks; restores the previous train/eval mode."""
        was_training = self.training
        self.eval()
        llh, clusters = [], []
        for start in range(0, x.shape[0], batch_size):
            comp, lp = self(x[start : start + batch_size])
            llh.append(lp)
            clusters.append(comp.argmax(1))
        self.train(was_training)
        if not llh:
            return x.new_zeros(0), torch.zeros(0, dtype=torch.long, device=x.device)
        return torch.cat(llh), torch.cat(clusters)


def class_pair_weights(counts: torch.Tensor, q: float) -> torch.Tensor:
    """Tail weights w_c = (n_max / n_c)^q / Σ_c' (n_max / n_c')^q over the classes with n_c > 0 (0 elsewhere)."""
    counts = counts.double()
    present = counts > 0
    if not present.any():
        raise ValueError("class_pair_weights needs at least one non-empty class")
    raw = torch.zeros_like(counts)
    raw[present] = (counts.max() / counts[present]) ** q
    return raw / raw.sum()


class ClassPairSampler:
    """Draws (positive, negative) index pairs: classes uniformly, two different ones, then a uniform member of each.

    ``labels`` are the labels of the samples the flow trains on; only classes present there are drawn. Each pair
    carries the tail weight of its positive class (:func:`class_pair_weights`).
    """

    def __init__(self, labels: torch.Tensor, q: float = 2.0):
        labels = labels.detach().cpu().long()
        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        if classes.numel() < 2:
            raise ValueError(
                f"the positive/negative pair sampler needs at least 2 classes in the flow's training set, "
                f"got {classes.numel()}"
            )
        self.classes = classes
        order = torch.argsort(inverse, stable=True)
        self._members = order  # sample indices grouped by class
        self._offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        self._counts = counts
        self.weights = class_pair_weights(counts, q)  # per present class, in `classes` order

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return positive indices (n,), negative indices (n,), positive-class weights (n,)."""
        c = self.classes.numel()
        pos_c = torch.randint(c, (n,), generator=generator)
        # a uniform class different from pos_c: shift by 1..c-1
        neg_c = (pos_c + torch.randint(1, c, (n,), generator=generator)) % c
        pos = self._pick(pos_c, generator)
        neg = self._pick(neg_c, generator)
        return pos, neg, self.weights[pos_c]

    def _pick(self, cls: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        r = torch.rand(cls.shape, generator=generator, dtype=torch.float64)
        within = (r * self._counts[cls]).long().clamp_max(self._counts[cls] - 1)
        return self._members[self._offsets[cls] + within]


def likelihood_loss(log_px: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L_lh = -(1/B) Σ_i w_i log p(x⁺_i)."""
    return -(weights.to(log_px.dtype) * log_px).mean()


def purity_loss(comp_neg: torch.Tensor, comp_pos: torch.Tensor, freeze: bool = True) -> torch.Tensor:
    """L_pur = (1/B) Σ_i Σ_k q(k|x⁺_i) · log softmax_k log p(x⁻_i | k) (``soft_ce`` with no margin).

    Minimising it maximises the cross-entropy between the negative's and the positive's component posteriors, i.e.
    pushes samples of different classes into different clusters. ``freeze`` stops the gradient through the positive.
    """
    target = torch.softmax(comp_pos.detach() if freeze else comp_pos, dim=1)
    return (target * F.log_softmax(comp_neg, dim=1)).sum(1).mean()


class BalanceLoss:
    """L_bal = KL(π̂ ‖ Uniform(K)) with π̂ the bias-corrected EMA of the batch-mean posterior (momentum m).

    State across calls: the detached biased EMA and a step counter t (starting at 1), so that
    π̂_t = (m·sg(π̃_{t-1}) + (1-m)·π_t) / (1 - m^t) with π_t = mean_i q(·|x⁺_i) + 1e-7.
    """

    def __init__(self, num_clusters: int, momentum: float = 0.7):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"posterior momentum must be in [0, 1), got {momentum}")
        self.num_clusters = num_clusters
        self.momentum = momentum
        self.ema: torch.Tensor | float = 0.0
        self.step = 0

    def __call__(self, comp_pos: torch.Tensor) -> torch.Tensor:
        self.step += 1
        pi = torch.softmax(comp_pos, dim=1).mean(0) + 1e-7
        ema = self.momentum * self.ema + (1.0 - self.momentum) * pi
        self.ema = ema.detach()
        pi_hat = ema / (1.0 - self.momentum**self.step)
        return (pi_hat * pi_hat.log()).sum() + math.log(self.num_clusters)


def cluster_purity_score(
    clusters: torch.Tensor,
    labels: torch.Tensor,
    num_clusters: int,
    min_purity: float = 0.7,
    min_size: float = 10,
) -> tuple[int, int]:
    """(#clusters with purity > min_purity and size > min_size, size of the largest cluster).

    purity_k = (count of the majority class in cluster k) / size_k; empty clusters have purity 0.
    """
    clusters, labels = clusters.long().cpu(), labels.long().cpu()
    if clusters.numel() == 0:
        return 0, 0
    num_classes = int(labels.max()) + 1
    table = torch.zeros(num_clusters, num_classes, dtype=torch.long)
    table.index_put_((clusters, labels), torch.ones_like(clusters), accumulate=True)
    size = table.sum(1)
    purity = table.max(1).values.double() / size.clamp_min(1).double()
    good = (purity > min_purity) & (size > min_size)
    return int(good.sum()), int(size.max())


@dataclass
class FlowTrainResult:
    """What happened while training one FlowGMM (for logs and the model's history)."""

    best_epoch: int | None
    best_score: int
    epoch_scores: list[int] = field(default_factory=list)
    epoch_max_cluster: list[int] = field(default_factory=list)
    epoch_losses: list[dict[str, float]] = field(default_factory=list)


def train_flowgmm(
    model: FlowGMM,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    select_x: torch.Tensor,
    select_y: torch.Tensor,
    epochs: int = 50,
    batch_size: int = 1024,
    lr: float = 0.2,
    momentum: float = 0.0,
    weight_q: float = 2.0,
    lambda_lh: float = 2.0,
    lambda_bal: float = 1.0,
    lambda_pur: float = 0.02,
    posterior_momentum: float = 0.7,
    purity_freeze: bool = True,
    min_purity: float = 0.7,
    min_cluster_size: float = 10,
    max_cluster_size: float = 5000,
    score_batch_size: int = 4096,
    generator: torch.Generator | None = None,
) -> FlowTrainResult:
    """Train ``model`` in place on features ``x`` / labels ``y`` and reload the best epoch's weights.

    One epoch draws ``len(x)`` class pairs in batches of ``batch_size`` (two forward passes per step, so BN running
    statistics are updated by both), SGD with constant LR. After each epoch the model (eval mode) assigns
    ``select_x`` to clusters; the epoch with the strictly highest :func:`cluster_purity_score` among epochs whose
    largest cluster has fewer than ``max_cluster_size`` samples is kept. If none qualifies, the last weights stay
    and a warning is logged. A trailing batch of one pair is skipped (BN needs two samples; [RECON]: the official
    loader would produce NaN there).
    """
    if batch_size < 2:
        raise ValueError(f"flow batch size must be >= 2 (BatchNorm flow layers), got {batch_size}")
    if epochs < 1:
        raise ValueError(f"flow epochs must be >= 1, got {epochs}")
    sampler = ClassPairSampler(y, weight_q)
    balance = BalanceLoss(model.num_clusters, posterior_momentum)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    result = FlowTrainResult(best_epoch=None, best_score=-1)
    best_state = None
    n = x.shape[0]
    for epoch in range(1, epochs + 1):
        model.train()
        pos_all, neg_all, w_all = sampler.sample(n, generator)
        totals = {"likelihood": 0.0, "purity": 0.0, "balance": 0.0, "total": 0.0}
        steps = 0
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if stop - start < 2:
                continue
            pos = pos_all[start:stop].to(x.device)
            neg = neg_all[start:stop].to(x.device)
            w = w_all[start:stop].to(device=x.device, dtype=x.dtype)
            comp_pos, llh_pos = model(x[pos])
            loss_lh = likelihood_loss(llh_pos, w)
            loss = lambda_lh * loss_lh
            parts = {"likelihood": loss_lh}
            if lambda_pur > 0:
                comp_neg, _ = model(x[neg])
                parts["purity"] = purity_loss(comp_neg, comp_pos, purity_freeze)
                loss = loss + lambda_pur * parts["purity"]
            if lambda_bal > 0:
                parts["balance"] = balance(comp_pos)
                loss = loss + lambda_bal * parts["balance"]
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"FlowGMM loss became {loss.item()} at epoch {epoch}; lower the flow learning rate "
                    f"(features with a large scale may need one)"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            for key, value in parts.items():
                totals[key] += float(value.detach())
            totals["total"] += float(loss.detach())
        result.epoch_losses.append({k: v / max(steps, 1) for k, v in totals.items()})

        _, clusters = model.score(select_x, score_batch_size)
        score, largest = cluster_purity_score(clusters, select_y, model.num_clusters, min_purity, min_cluster_size)
        result.epoch_scores.append(score)
        result.epoch_max_cluster.append(largest)
        logger.info(
            "flow epoch %d: loss %.4f, pure clusters %d, largest cluster %d",
            epoch, result.epoch_losses[-1]["total"], score, largest,
        )
        if score > result.best_score and largest < max_cluster_size:
            result.best_score, result.best_epoch = score, epoch
            best_state = copy.deepcopy(model.state_dict())
    if best_state is None:
        logger.warning("no flow epoch had its largest cluster below %s samples; keeping the last epoch", max_cluster_size)
    else:
        model.load_state_dict(best_state)
    model.eval()
    return result
