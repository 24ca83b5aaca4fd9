"""How DLSA trains a FlowGMM (docs/methods.md, DLSA; the model itself is in ``models/pih2t/dlsa_head.py``).

DLSA trains the flow with three terms on pairs (x⁺, x⁻) from two different classes: a tail-weighted likelihood, a
"purity" term that pushes the negative's component posterior away from the positive's, and a balance term (KL of
the EMA'd mean posterior to uniform) that keeps all clusters in use. After each epoch the model is scored by the
number of pure, non-tiny clusters and the best epoch is kept.

Deviations from the official code: the official code scores epochs on the (remaining) *training* samples; here
the caller passes the selection split, and :func:`fit_dlsa` passes a validation split when one is given
(test-free model selection). When selecting on a split of a different size, the cluster-size bounds may be
rescaled by the caller ([RECON], see ``DLSAConfig.scale_size_thresholds``). Optional gradient-norm clipping and
restarts with a halved learning rate after a divergence are additions (the official code has neither), and so is
early stopping (``FlowObjective.patience``, :func:`should_stop`). Positives and negatives go through the flow as one
batch with per-half BatchNorm statistics (``joint_pairs``), which equals the official two passes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ...models.pih2t.dlsa_head import FlowGMM

__all__ = [
    "FlowGMM",
    "class_pair_weights",
    "ClassPairSampler",
    "likelihood_loss",
    "purity_loss",
    "BalanceLoss",
    "cluster_purity_score",
    "FlowTrainResult",
    "FlowObjective",
    "FlowSelection",
    "FlowDiverged",
    "should_stop",
    "train_flowgmm",
]

logger = logging.getLogger(__name__)


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
    lr: float | None = None  #: the learning rate of the attempt that finished
    restarts: list[dict[str, Any]] = field(default_factory=list)  #: diverged attempts: epoch, lr, reason


@dataclass
class FlowObjective:
    """The flow-training loss and optimiser settings (defaults: the released configs, see ``DLSAConfig``)."""

    epochs: int = 50
    batch_size: int = 1024
    lr: float = 0.2
    momentum: float = 0.0
    grad_clip: float | None = None  #: max global gradient norm; None = no clipping (official)
    weight_q: float = 2.0
    lambda_lh: float = 2.0
    lambda_bal: float = 1.0
    lambda_pur: float = 0.02
    posterior_momentum: float = 0.7
    purity_freeze: bool = True
    patience: int | None = None  #: stop after this many epochs without a new best (see :func:`should_stop`)
    joint_pairs: bool = True  #: positives and negatives through the flow as one batch (same numbers, faster)


@dataclass
class FlowSelection:
    """How the best flow epoch is chosen: pure, non-tiny clusters on ``x``/``y``, largest cluster bounded."""

    x: torch.Tensor
    y: torch.Tensor
    min_purity: float = 0.7
    min_cluster_size: float = 10
    max_cluster_size: float = 5000
    score_batch_size: int = 4096


class FlowDiverged(FloatingPointError):
    """The flow's loss, gradient or scores became non-finite (raised when no restart is left)."""

    def __init__(self, epoch: int, reason: str, hint: str = ""):
        super().__init__(f"FlowGMM {reason} at epoch {epoch}{hint}")
        self.epoch, self.reason = epoch, reason


def _pair_loss(
    model: FlowGMM, x: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, w: torch.Tensor,
    balance: BalanceLoss, obj: FlowObjective,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """λ_lh·L_lh + λ_pur·L_pur + λ_bal·L_bal on one batch of (positive, negative) pairs."""
    joint = obj.lambda_pur > 0 and obj.joint_pairs
    if joint:  # one pass over [x⁺; x⁻]; BatchNorm normalises each half with its own statistics, as two passes would
        comp, llh = model(torch.cat([x[pos], x[neg]]), groups=2)
        b = pos.numel()
        comp_pos, llh_pos, comp_neg = comp[:b], llh[:b], comp[b:]
    else:
        comp_pos, llh_pos = model(x[pos])
    parts = {"likelihood": likelihood_loss(llh_pos, w)}
    loss = obj.lambda_lh * parts["likelihood"]
    if obj.lambda_pur > 0:
        if not joint:
            comp_neg, _ = model(x[neg])
        parts["purity"] = purity_loss(comp_neg, comp_pos, obj.purity_freeze)
        loss = loss + obj.lambda_pur * parts["purity"]
    if obj.lambda_bal > 0:
        parts["balance"] = balance(comp_pos)
        loss = loss + obj.lambda_bal * parts["balance"]
    return loss, parts


def _flow_epoch(
    model: FlowGMM, x: torch.Tensor, sampler: ClassPairSampler, balance: BalanceLoss,
    optimizer: torch.optim.Optimizer, obj: FlowObjective, epoch: int, generator: torch.Generator | None,
) -> dict[str, float]:
    """One epoch of ``len(x)`` class pairs; mean losses. Raises :class:`FlowDiverged` on a non-finite loss/gradient.

    A trailing batch of one pair is skipped (BN needs two samples; [RECON]: the official loader would produce NaN).
    """
    model.train()
    n = x.shape[0]
    pos_all, neg_all, w_all = sampler.sample(n, generator)
    totals = {"likelihood": 0.0, "purity": 0.0, "balance": 0.0, "total": 0.0}
    steps = 0
    for start in range(0, n, obj.batch_size):
        stop = min(start + obj.batch_size, n)
        if stop - start < 2:
            continue
        w = w_all[start:stop].to(device=x.device, dtype=x.dtype)
        loss, parts = _pair_loss(model, x, pos_all[start:stop].to(x.device), neg_all[start:stop].to(x.device), w,
                                 balance, obj)
        if not torch.isfinite(loss):
            raise FlowDiverged(epoch, f"loss became {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), obj.grad_clip or math.inf)
        if not torch.isfinite(norm):  # checked before the step, so the weights never take a non-finite update
            raise FlowDiverged(epoch, f"gradient norm became {norm.item()}")
        optimizer.step()
        steps += 1
        for key, value in parts.items():
            totals[key] += float(value.detach())
        totals["total"] += float(loss.detach())
    return {k: v / max(steps, 1) for k, v in totals.items()}


def should_stop(epoch: int, best_epoch: int | None, patience: int | None) -> bool:
    """Early stopping: true once ``patience`` epochs in a row have not improved on the best qualifying epoch.

    Counted from the best epoch so far (from the start while no epoch qualifies): with patience P the epoch
    scores e_1, e_2, ... stop training after epoch ``best + P``. ``None`` trains every epoch.
    """
    return patience is not None and epoch - (best_epoch or 0) >= patience


def _train_once(
    model: FlowGMM, x: torch.Tensor, y: torch.Tensor, obj: FlowObjective, sel: FlowSelection,
    generator: torch.Generator | None,
) -> FlowTrainResult:
    """One training attempt at ``obj.lr``; keeps (reloads) the best qualifying epoch."""
    sampler = ClassPairSampler(y, obj.weight_q)
    balance = BalanceLoss(model.num_clusters, obj.posterior_momentum)
    optimizer = torch.optim.SGD(model.parameters(), lr=obj.lr, momentum=obj.momentum)
    result = FlowTrainResult(best_epoch=None, best_score=-1, lr=obj.lr)
    best_state = None
    for epoch in range(1, obj.epochs + 1):
        result.epoch_losses.append(_flow_epoch(model, x, sampler, balance, optimizer, obj, epoch, generator))
        llh, clusters = model.score(sel.x, sel.score_batch_size)
        if not torch.isfinite(llh).all():
            raise FlowDiverged(epoch, "log-likelihood of the selection samples became non-finite")
        score, largest = cluster_purity_score(clusters, sel.y, model.num_clusters, sel.min_purity, sel.min_cluster_size)
        result.epoch_scores.append(score)
        result.epoch_max_cluster.append(largest)
        logger.info("flow epoch %d: loss %.4f, pure clusters %d, largest cluster %d",
                    epoch, result.epoch_losses[-1]["total"], score, largest)
        if score > result.best_score and largest < sel.max_cluster_size:
            result.best_score, result.best_epoch = score, epoch
            best_state = copy.deepcopy(model.state_dict())
        if should_stop(epoch, result.best_epoch, obj.patience) and epoch < obj.epochs:
            logger.info("flow: no better epoch for %d epochs; stopping after epoch %d of %d",
                        obj.patience, epoch, obj.epochs)
            break
    if best_state is None:
        logger.warning("no flow epoch had its largest cluster below %s samples; keeping the last epoch",
                       sel.max_cluster_size)
    else:
        model.load_state_dict(best_state)
    return result


def train_flowgmm(
    model: FlowGMM,
    x: torch.Tensor,
    y: torch.Tensor,
    objective: FlowObjective,
    selection: FlowSelection,
    *,
    nan_restarts: int = 0,
    generator: torch.Generator | None = None,
) -> FlowTrainResult:
    """Train ``model`` in place on features ``x`` / labels ``y`` and reload the best epoch's weights.

    One epoch draws ``len(x)`` class pairs in batches (two forward passes per step, so BN running statistics are
    updated by both), SGD with constant LR and optional gradient-norm clipping. After each epoch the model (eval
    mode) assigns ``selection.x`` to clusters; the epoch with the strictly highest :func:`cluster_purity_score`
    among epochs whose largest cluster has fewer than ``max_cluster_size`` samples is kept. If none qualifies, the
    last weights stay and a warning is logged.

    If the loss, the gradient or the scores become non-finite, training restarts from the initial weights with half
    the learning rate, with a warning, up to ``nan_restarts`` times (recorded in ``restarts``); after that
    :class:`FlowDiverged` is raised. Divergence is never silent: a NaN flow would route every sample the same way.
    """
    if objective.batch_size < 2:
        raise ValueError(f"flow batch size must be >= 2 (BatchNorm flow layers), got {objective.batch_size}")
    if objective.epochs < 1:
        raise ValueError(f"flow epochs must be >= 1, got {objective.epochs}")
    if objective.patience is not None and objective.patience < 1:
        raise ValueError(f"flow patience must be >= 1 or None, got {objective.patience}")
    if objective.grad_clip is not None and not objective.grad_clip > 0:
        raise ValueError(f"flow gradient clipping must be > 0 or None, got {objective.grad_clip}")
    initial = copy.deepcopy(model.state_dict())
    restarts: list[dict[str, Any]] = []
    while True:
        try:
            result = _train_once(model, x, y, objective, selection, generator)
            break
        except FlowDiverged as err:
            restarts.append({"epoch": err.epoch, "lr": objective.lr, "reason": err.reason})
            if len(restarts) > nan_restarts:
                hint = (f" (flow lr {objective.lr:g}, after {nan_restarts} restart(s) with a halved lr); lower "
                        f"flow_lr or set flow_grad_clip")
                raise FlowDiverged(err.epoch, err.reason, hint) from err
            logger.warning("%s at lr %g; restarting the flow from its initial weights with lr %g",
                           err, objective.lr, objective.lr / 2)
            model.load_state_dict(initial)
            objective = dataclasses.replace(objective, lr=objective.lr / 2)
    result.restarts = restarts
    model.eval()
    return result
