"""DLSA's divide-and-conquer pipeline on cached features (docs/methods.md, DLSA).

At each depth d = 1..L a FlowGMM is trained on the still-remaining training features; the remaining samples with
the top ρ fraction of log-likelihood ("well clustered") are split off and classified by a cluster-aided classifier
(CACls) that also sees the class histogram of the sample's cluster; the rest go on to depth d+1, and after depth L
to a regular classifier (RegCls). At test time each sample follows the same route, with the train-derived
likelihood thresholds τ_d, and gets exactly one prediction.

Deviations from the official code (all switchable or documented):

* **Model selection on a validation split.** The official code picks the flow epoch by cluster purity on the
  remaining *training* samples and picks the CACls/RegCls epoch by accuracy on the routed *test* samples. Here the
  validation split (routed like the test set) is used for both when given (``select_flow_on="val"``); without a
  validation split the flow falls back to the training samples (official) and the classifiers keep their last
  epoch.
* **Cluster-size bounds rescaled** to the selection split's size when selecting on validation
  (``scale_size_thresholds``) [RECON]: the official bounds (> 10, < 5000) are absolute counts on ImageNet-scale
  training sets.
* **Flow early stopping** (``flow_patience``, default 10): the flow stops once that many epochs in a row have not
  beaten the best selected epoch (the official code trains every epoch; ``None`` does too). The other speed-ups
  (``flow_fast_path``: block-sparse masked products, one flow pass per pair batch) compute the same numbers up to
  float rounding.
* Classifier and flow parameters are initialised like ``torch.nn.Linear`` but from a local generator.
* Not implemented: the class-aware (CBS) sampler config, the ``ride`` classifier (unimplemented upstream too),
  loading pretrained flows.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...models.pih2t.dlsa_head import DLSAHead, DualHead, MaskedLinear
from .flowgmm import FlowObjective, FlowSelection, FlowTrainResult, train_flowgmm

__all__ = [
    "DLSAConfig",
    "DLSAModel",
    "DLSAHead",
    "DualHead",
    "fit_dlsa",
    "head_kwargs",
    "install_head",
    "likelihood_threshold",
    "split_by_likelihood",
    "cluster_prior",
    "remaining_sizes",
    "available_presets",
]

logger = logging.getLogger(__name__)

# The released flow optimiser: SGD at lr 0.2 without clipping. It diverges on some feature sets (e.g. 1,280-dim
# ReLU6 EfficientNet features with norm ~40), which is why DLSAConfig's own default is a smaller, clipped step;
# the presets keep the released values, with the halving restarts as the only safety net (each one logged). They
# also train every flow epoch, as released (no early stopping).
_OFFICIAL_FLOW = {"flow_lr": 0.2, "flow_grad_clip": None, "flow_patience": None}

_PRESETS: dict[str, dict[str, Any]] = {
    # the released configs (docs/methods.md, DLSA); the other defaults of DLSAConfig are ImgNet_CE_R50_bsm's
    "imagenet_lt_ce_r50_bsm": {},
    "imagenet_lt_cbs_r50_bsm": {},
    "imagenet_lt_paco_r50_bsm": {"max_depth": 3, "cacls_lr": 1e-4, "regcls_lr": 1e-4},
    "imagenet_lt_paco_r50_cos": {
        "classifier_type": "cosine", "cacls_loss": "ce", "regcls_loss": "ce", "cacls_lr": 1e-4, "regcls_lr": 1e-4,
    },
    "inat_paco_r50_bsm": {
        "max_depth": 3, "flow_epochs": 30, "lambda_lh": 1.0, "cacls_lr": 1e-4, "regcls_lr": 1e-4,
    },
    "places_ce_r152_bsm": {
        "flow_batch_size": 512, "flow_epochs": 60, "lambda_lh": 1.0, "lambda_bal": 2.0, "lambda_pur": 0.03,
    },
    "places_ce_r152_cos": {
        "flow_batch_size": 512, "flow_epochs": 60, "lambda_lh": 1.0, "lambda_bal": 2.0, "lambda_pur": 0.03,
        "classifier_type": "cosine", "cacls_loss": "ce", "regcls_loss": "ce",
    },
    "places_paco_r152_bsm": {
        "flow_batch_size": 512, "flow_epochs": 60, "lambda_lh": 1.0, "lambda_bal": 2.0, "lambda_pur": 0.03,
        "cacls_lr": 1e-4, "regcls_lr": 1e-4,
    },
}


@dataclass
class DLSAConfig:
    """All DLSA knobs; defaults are the released ``ImgNet_CE_R50_bsm`` config except the flow optimiser.

    Deviation: the flow learns with lr ``flow_lr`` = 0.02 and gradient-norm clipping at 5 (the released lr 0.2
    without clipping diverges within 3 epochs on this project's default features), and restarts with a halved lr,
    with a warning, if it still diverges. Use :meth:`from_preset` for the released configs (their flow optimiser
    included). Fields marked [RECON] or "deviation" are not in the official code.
    """

    # pipeline
    num_clusters: int = 500  #: K, components of every FlowGMM
    max_depth: int = 1  #: L, number of filtering depths (1 or 3 in the released configs)
    rho: float = 0.3  #: fraction of remaining training samples split off per depth (``llh_proportion``)
    num_classes: int | None = None  #: C; default: 1 + the largest label seen
    prior_source: str = "all"  #: cluster prior from "all" train samples (official) or the "remaining" ones
    # flow
    flow_blocks: int = 2
    flow_hidden_layers: int = 1
    flow_hidden_size: int | None = None  #: MADE width; None = feature dim D (official)
    flow_batch_norm: bool = True
    mean_std: float = 0.05  #: std of the fixed component means
    flow_epochs: int = 50
    flow_batch_size: int = 1024
    flow_lr: float = 0.02  #: deviation (released: 0.2), see the class docstring
    flow_grad_clip: float | None = 5.0  #: deviation: max gradient norm of a flow step (released: None, no clipping)
    flow_nan_restarts: int = 3  #: deviation: restarts with a halved flow lr after a divergence (then an error)
    flow_momentum: float = 0.0
    flow_patience: int | None = 10  #: deviation: stop the flow after this many epochs without a new best; None = all
    flow_fast_path: bool = True  #: block-sparse masked layers and one flow pass per pair batch (same numbers)
    weight_q: float = 2.0  #: exponent of the tail weights of the likelihood term
    lambda_lh: float = 2.0
    lambda_bal: float = 1.0
    lambda_pur: float = 0.02
    posterior_momentum: float = 0.7
    purity_freeze: bool = True  #: stop-gradient through the positive's posterior (``contrast_freeze``)
    # flow epoch selection
    select_flow_on: str = "val"  #: "val" (deviation, needs a validation split) or "train" (official)
    min_purity: float = 0.7
    min_cluster_size: float = 10
    max_cluster_size: float = 5000
    scale_size_thresholds: bool = True  #: [RECON] rescale the size bounds to the selection split's size
    # classifiers
    classifier_type: str = "linear"  #: "linear" or "cosine" (scale ``cosine_scale``, no bias)
    cosine_scale: float = 16.0
    cacls_inputs: str = "XZP"  #: "XZP": features + cluster prior (official); "XZ": no prior (ablation)
    cacls_loss: str = "bsm"  #: "bsm" (balanced softmax on the subset's counts) or "ce"
    cacls_lr: float = 1e-2
    regcls_loss: str = "bsm"
    regcls_lr: float = 1e-2
    regcls_counts: str = "full"  #: balanced-softmax counts of RegCls: "full" train set (official) or "subset"
    cls_epochs: int = 150
    cls_batch_size: int = 128
    cls_momentum: float = 0.0
    cls_weight_decay: float = 0.0  #: the official config key is never used, hence 0
    eval_every: int = 5  #: classifier validation period in epochs
    # misc
    score_batch_size: int = 4096  #: chunk size for eval-mode scoring
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.rho < 1.0:
            raise ValueError(f"rho must be in the open interval (0, 1), got {self.rho}")
        if self.max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {self.max_depth}")
        if self.num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {self.num_clusters}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        choices = {
            "prior_source": ("all", "remaining"),
            "select_flow_on": ("val", "train"),
            "classifier_type": ("linear", "cosine"),
            "cacls_inputs": ("XZP", "XZ"),
            "cacls_loss": ("bsm", "ce"),
            "regcls_loss": ("bsm", "ce"),
            "regcls_counts": ("full", "subset"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("flow_epochs", "cls_epochs", "eval_every", "cls_batch_size", "score_batch_size", "flow_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.flow_batch_size < 2:
            raise ValueError(f"flow_batch_size must be >= 2 (BatchNorm flow layers), got {self.flow_batch_size}")
        if self.flow_grad_clip is not None and not self.flow_grad_clip > 0:
            raise ValueError(f"flow_grad_clip must be > 0 or None, got {self.flow_grad_clip}")
        if self.flow_patience is not None and self.flow_patience < 1:
            raise ValueError(f"flow_patience must be >= 1 or None, got {self.flow_patience}")
        if self.flow_nan_restarts < 0:
            raise ValueError(f"flow_nan_restarts must be >= 0, got {self.flow_nan_restarts}")
        for name in ("flow_lr", "cacls_lr", "regcls_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("lambda_lh", "lambda_bal", "lambda_pur", "mean_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "DLSAConfig":
        """A released config by name (see :func:`available_presets`), with keyword overrides."""
        if name not in _PRESETS:
            raise ValueError(f"unknown DLSA preset {name!r}; available: {sorted(_PRESETS)}")
        return cls(**{**_OFFICIAL_FLOW, **_PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def available_presets() -> list[str]:
    return sorted(_PRESETS)


# ----------------------------------------------------------------------------------------------------------------
# filtering, prior, losses


def _threshold_index(n: int, rho: float) -> int:
    """Index of τ in the ascending sort of n log-likelihoods: ⌊n(1-ρ)⌋, clipped to n-1."""
    return min(int(math.floor(n * (1.0 - rho))), n - 1)


def remaining_sizes(n: int, rho: float, depth: int) -> list[int]:
    """Training samples the flow sees at depths 1..depth, then the RegCls set size (assuming no likelihood ties)."""
    sizes = [n]
    for _ in range(depth):
        sizes.append(_threshold_index(sizes[-1], rho) if sizes[-1] > 0 else 0)
    return sizes


def likelihood_threshold(llh: torch.Tensor, rho: float) -> torch.Tensor:
    """τ = ascending-sorted ``llh`` at index ⌊n(1-ρ)⌋: samples with llh >= τ are (about) the top ρ fraction."""
    if not 0.0 < rho < 1.0:
        raise ValueError(f"rho must be in the open interval (0, 1), got {rho}")
    if llh.ndim != 1 or llh.numel() == 0:
        raise ValueError(f"need a non-empty 1-D tensor of log-likelihoods, got shape {tuple(llh.shape)}")
    if not torch.isfinite(llh).all():
        raise FloatingPointError("non-finite log-likelihoods; the flow diverged (lower flow_lr?)")
    return torch.sort(llh).values[_threshold_index(llh.numel(), rho)]


def split_by_likelihood(
    llh: torch.Tensor, remaining: torch.Tensor, rho: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the ``remaining`` samples: return (mask of remaining samples with llh >= τ, τ).

    τ is computed on the remaining samples only .
    """
    if remaining.dtype != torch.bool or remaining.shape != llh.shape:
        raise ValueError("remaining must be a boolean mask with the shape of llh")
    tau = likelihood_threshold(llh[remaining], rho)
    return remaining & (llh >= tau), tau


def cluster_prior(clusters: torch.Tensor, labels: torch.Tensor, num_clusters: int, num_classes: int) -> torch.Tensor:
    """(K, C) class histogram per cluster, normalised by the cluster size; empty clusters get a zero row."""
    clusters, labels = clusters.long(), labels.long()
    table = torch.zeros(num_clusters, num_classes, dtype=torch.float64, device=labels.device)
    table.index_put_((clusters, labels), torch.ones(clusters.shape, dtype=torch.float64, device=labels.device), accumulate=True)
    return table / table.sum(1, keepdim=True).clamp_min(1.0)


def _balanced_softmax_ce(logits: torch.Tensor, target: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Balanced softmax (Ren et al. 2020) as DLSA uses it: CE(logits + log(n_c + 1e-6), y).

    Private on purpose: DLSA's official code adds 1e-6 to the counts (zero-count clusters), which the package-wide
    ``pih2t_hub.losses`` version refuses; the two differ only there.
    """
    return F.cross_entropy(logits + torch.log(counts.to(logits.dtype) + 1e-6)[None, :], target)


# ----------------------------------------------------------------------------------------------------------------
# classifiers


def _train_head(
    head: DualHead,
    x: torch.Tensor,
    z: torch.Tensor,
    y: torch.Tensor,
    counts: torch.Tensor | None,
    *,
    lr: float,
    config: DLSAConfig,
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    generator: torch.Generator,
) -> dict[str, Any]:
    """SGD with constant LR on shuffled batches; balanced softmax when ``counts`` is given, else plain CE.

    Every ``eval_every`` epochs the head is scored on ``val`` (the validation samples routed to it) and the best
    state is kept (deviation: the official code scores on the routed test samples). Without validation samples
    the last epoch is kept.
    """
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=config.cls_momentum, weight_decay=config.cls_weight_decay)
    use_val = val is not None and val[0].shape[0] > 0
    best_acc, best_epoch, best_state = -1.0, None, None
    n = x.shape[0]
    for epoch in range(1, config.cls_epochs + 1):
        head.train()
        order = torch.randperm(n, generator=generator).to(x.device)
        for start in range(0, n, config.cls_batch_size):
            idx = order[start : start + config.cls_batch_size]
            logits = head(x[idx], z[idx])
            loss = F.cross_entropy(logits, y[idx]) if counts is None else _balanced_softmax_ce(logits, y[idx], counts)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if use_val and epoch % config.eval_every == 0:
            head.eval()
            with torch.no_grad():
                acc = float((head(val[0], val[1]).argmax(1) == val[2]).double().mean())
            if acc > best_acc:
                best_acc, best_epoch, best_state = acc, epoch, copy.deepcopy(head.state_dict())
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    if best_state is None:
        return {"best_epoch": config.cls_epochs, "val_acc": None}
    return {"best_epoch": best_epoch, "val_acc": best_acc}


# ----------------------------------------------------------------------------------------------------------------
# model


def head_kwargs(config: DLSAConfig) -> dict[str, Any]:
    """The :class:`DLSAHead` architecture a config describes (plain values, the saved ``head_config``)."""
    return {
        "num_clusters": config.num_clusters, "max_depth": config.max_depth, "flow_blocks": config.flow_blocks,
        "flow_hidden_size": config.flow_hidden_size, "flow_hidden_layers": config.flow_hidden_layers,
        "flow_batch_norm": config.flow_batch_norm, "classifier_type": config.classifier_type,
        "cosine_scale": config.cosine_scale, "cacls_inputs": config.cacls_inputs, "mean_std": config.mean_std,
    }


class DLSAModel(DLSAHead):
    """A fitted DLSA pipeline: the :class:`DLSAHead` plus its fitting config and per-depth history.

    Build it with :func:`fit_dlsa`. Its parameters and buffers are exactly those of the head, so
    :meth:`to_head` (what goes into a saved model) computes the same logits and routes. ``history`` is not part of
    the state.
    """

    def __init__(self, dim: int, num_classes: int, config: DLSAConfig, generator: torch.Generator | None = None):
        super().__init__(dim, num_classes, **head_kwargs(config), generator=generator)
        self.config, self.dim = config, dim
        self.history: list[dict[str, Any]] = []

    def to_head(self) -> DLSAHead:
        """A plain :class:`DLSAHead` with this model's weights (same device and dtype), in eval mode."""
        ref = self.thresholds
        head = DLSAHead(self.in_features, self.num_classes, **self.head_config()).to(device=ref.device, dtype=ref.dtype)
        head.load_state_dict(self.state_dict())
        return head.eval()

    @torch.no_grad()
    def route_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Route every sample (0..L-1: CACls of that depth; L: RegCls) and return (routes (N,), logits (N, C)).

        Checks the input and works in chunks of ``config.score_batch_size`` (a sample's result does not depend on
        its chunk).
        """
        _check_features(x, "x", self.dim)
        x = x.to(device=self.thresholds.device, dtype=self.priors.dtype)
        self.eval()
        size = self.config.score_batch_size
        head_forward = super().route_and_logits
        if x.shape[0] <= size:
            return head_forward(x)
        parts = [head_forward(x[s : s + size]) for s in range(0, x.shape[0], size)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        return self.route_and_logits(x)[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.route_and_logits(x)[1]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(1)


def install_head(model: nn.Module, dlsa: DLSAModel) -> DLSAHead:
    """Make a fitted DLSA the classifier of a ``PIH2TForImageClassification`` (what a saved DLSA model holds).

    Sets ``model.classifier`` and ``config.head_type = "dlsa"`` / ``config.head_config``, so that
    ``save_pretrained`` writes the flows, thresholds, priors and both classifier kinds as safetensors and any
    loader (Auto classes, ``trust_remote_code``) rebuilds the same head.
    """
    cfg = model.config
    if cfg.num_features != dlsa.in_features or cfg.num_labels != dlsa.num_classes:
        raise ValueError(
            f"DLSA was fitted on {dlsa.in_features}-dim features and {dlsa.num_classes} classes, but the model has "
            f"{cfg.num_features}-dim features and {cfg.num_labels} labels"
        )
    device = next(model.parameters()).device
    head = dlsa.to_head().to(device)
    model.classifier = head
    cfg.head_type, cfg.head_config = "dlsa", head.head_config()
    return head

# ----------------------------------------------------------------------------------------------------------------
# fitting


def _check_features(x: torch.Tensor, name: str, dim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has feature dim {x.shape[1]}, but the model/training features have {dim}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def _check_labels(y: torch.Tensor, name: str, n: int) -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {y.dtype}")
    if n and int(y.min()) < 0:
        raise ValueError(f"{name} contains negative labels")


def _class_counts(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(y, minlength=num_classes).double()


_Split = tuple[torch.Tensor, torch.Tensor]  #: (features, labels)


def _check_fit_inputs(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor | None, val_y: torch.Tensor | None,
    config: DLSAConfig,
) -> int:
    """Validate the features, labels and sizes before any training; return the number of classes C."""
    _check_features(train_x, "train_x")
    _check_labels(train_y, "train_y", train_x.shape[0])
    n, dim = train_x.shape
    if (val_x is None) != (val_y is None):
        raise ValueError("give both val_x and val_y, or neither")
    if val_x is not None:
        _check_features(val_x, "val_x", dim)
        _check_labels(val_y, "val_y", val_x.shape[0])
    k, depth = config.num_clusters, config.max_depth
    if n < k:
        raise ValueError(f"DLSA needs at least as many training samples as clusters: got {n} samples, K={k}")
    sizes = remaining_sizes(n, config.rho, depth)
    for d in range(depth):
        if sizes[d] < k:
            raise ValueError(
                f"at depth {d + 1} only about {sizes[d]} training samples remain (N={n}, rho={config.rho}), fewer "
                f"than K={k} clusters; use fewer clusters, a smaller max_depth, or more data"
            )
    if sizes[depth] < 1:
        raise ValueError(f"no training samples would remain for the regular classifier (N={n}, rho={config.rho})")
    seen = int(train_y.max()) + 1
    if val_y is not None and val_y.numel():
        seen = max(seen, int(val_y.max()) + 1)
    num_classes = config.num_classes if config.num_classes is not None else seen
    if seen > num_classes:
        raise ValueError(f"labels go up to {seen - 1} but num_classes={num_classes}")
    if num_classes < 2:
        raise ValueError("DLSA needs at least 2 classes")
    return num_classes


def _flow_objective(config: DLSAConfig) -> FlowObjective:
    return FlowObjective(
        epochs=config.flow_epochs, batch_size=config.flow_batch_size, lr=config.flow_lr,
        momentum=config.flow_momentum, grad_clip=config.flow_grad_clip, weight_q=config.weight_q,
        lambda_lh=config.lambda_lh, lambda_bal=config.lambda_bal, lambda_pur=config.lambda_pur,
        posterior_momentum=config.posterior_momentum, purity_freeze=config.purity_freeze,
        patience=config.flow_patience, joint_pairs=config.flow_fast_path,
    )


def _flow_selection(
    config: DLSAConfig, d: int, x_d: torch.Tensor, y_d: torch.Tensor, val: _Split | None, remain_va: torch.Tensor,
) -> tuple[FlowSelection, str]:
    """Where depth ``d``'s flow epoch is selected: the remaining validation samples, or the training samples."""
    sel_x, sel_y, split, ratio = x_d, y_d, "train", 1.0
    if config.select_flow_on == "val":
        if val is not None and int(remain_va.sum()) > 0:
            sel_x, sel_y, split = val[0][remain_va], val[1][remain_va], "val"
            if config.scale_size_thresholds:
                ratio = sel_x.shape[0] / x_d.shape[0]
        elif val is not None:
            logger.warning("depth %d: no validation samples left to select the flow epoch on; using training samples",
                           d + 1)
        else:
            logger.info("depth %d: no validation split given; selecting the flow epoch on training samples", d + 1)
    selection = FlowSelection(
        sel_x, sel_y, min_purity=config.min_purity, min_cluster_size=config.min_cluster_size * ratio,
        max_cluster_size=config.max_cluster_size * ratio, score_batch_size=config.score_batch_size,
    )
    return selection, split


def _fit_depth(
    model: DLSAModel, d: int, train: _Split, val: _Split | None, remain_tr: torch.Tensor, remain_va: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit depth ``d``'s flow, threshold, prior and CACls; return the train / val masks it claims."""
    config, (train_x, train_y) = model.config, train
    k, num_classes = config.num_clusters, model.num_classes
    idx = remain_tr.nonzero().squeeze(1)
    if idx.numel() < k:
        raise ValueError(f"at depth {d + 1} only {idx.numel()} training samples remain, fewer than K={k}")
    flow = model.flows[d]
    x_d, y_d = train_x[idx], train_y[idx]
    selection, split = _flow_selection(config, d, x_d, y_d, val, remain_va)
    flow_result = train_flowgmm(flow, x_d, y_d, _flow_objective(config), selection,
                                nan_restarts=config.flow_nan_restarts, generator=generator)

    llh_tr, clus_tr = flow.score(train_x, config.score_batch_size)
    take_tr, tau = split_by_likelihood(llh_tr, remain_tr, config.rho)
    prior_mask = torch.ones_like(remain_tr) if config.prior_source == "all" else remain_tr
    model.thresholds[d] = tau
    model.priors[d] = cluster_prior(clus_tr[prior_mask], train_y[prior_mask], k, num_classes).to(model.priors.dtype)

    val_data, take_va = None, torch.zeros_like(remain_va)
    if val is not None:
        llh_va, clus_va = flow.score(val[0], config.score_batch_size)
        take_va = remain_va & (llh_va >= tau)
        xv = val[0][take_va]
        val_data = (xv, model.cacls_input(d, xv, clus_va[take_va]), val[1][take_va])

    x_h, y_h = train_x[take_tr], train_y[take_tr]
    counts_h = _class_counts(y_h, num_classes)
    cls_result = _train_head(
        model.cacls[d], x_h, model.cacls_input(d, x_h, clus_tr[take_tr]), y_h,
        counts_h if config.cacls_loss == "bsm" else None, lr=config.cacls_lr, config=config, val=val_data,
        generator=generator,
    )
    rest_y = train_y[remain_tr & ~take_tr]
    record = _depth_record(d, float(tau), idx.numel(), take_tr, take_va, counts_h, rest_y, num_classes, split,
                           flow_result, cls_result)
    model.history.append(record)
    logger.info(
        "depth %d: tau %.3f, %d of %d train samples to CACls; class counts filtered %s, passed on %s",
        d + 1, record["tau"], record["n_train_filtered"], record["n_train_remaining"],
        record["filtered_class_counts"], record["remaining_class_counts"],
    )
    return take_tr, take_va


def _depth_record(
    d: int, tau: float, n_remaining: int, take_tr: torch.Tensor, take_va: torch.Tensor, counts_h: torch.Tensor,
    rest_y: torch.Tensor, num_classes: int, split: str, flow: FlowTrainResult, cls_result: dict[str, Any],
) -> dict[str, Any]:
    """What one depth did, for logs and ``DLSAModel.history`` (the filtered vs passed-on class histograms)."""
    return {
        "depth": d + 1,
        "tau": tau,
        "n_train_remaining": int(n_remaining),
        "n_train_filtered": int(take_tr.sum()),
        "n_val_filtered": int(take_va.sum()),
        "filtered_class_counts": counts_h.long().tolist(),
        "remaining_class_counts": torch.bincount(rest_y, minlength=num_classes).tolist(),
        "flow_selection_split": split,
        "flow_best_epoch": flow.best_epoch,
        "flow_epochs_run": len(flow.epoch_scores),
        "flow_epoch_scores": flow.epoch_scores,
        "flow_epoch_max_cluster": flow.epoch_max_cluster,
        "flow_lr": flow.lr,
        "flow_restarts": flow.restarts,
        "cacls": cls_result,
    }


def fit_dlsa(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor | None = None,
    val_y: torch.Tensor | None = None,
    config: DLSAConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    stage1_weight: torch.Tensor | None = None,
    stage1_bias: torch.Tensor | None = None,
) -> DLSAModel:
    """Fit the whole DLSA pipeline on cached features and return a :class:`DLSAModel`.

    Args:
        train_x, train_y: training features (N, D) and integer labels (N,).
        val_x, val_y: a validation split, used for flow-epoch and classifier-epoch selection (see module doc).
            Optional; without it selection follows the official code for the flow and keeps the last classifier
            epoch.
        config: :class:`DLSAConfig` (default: the released ImageNet-LT CE config with a stable flow optimiser).
        generator / seed: all randomness (flow/classifier init, component means, pair sampling, shuffling) comes from
            ``generator``, or from a fresh generator seeded with ``seed`` (default ``config.seed``).
        stage1_weight, stage1_bias: optional stage-1 linear classifier (C, D), (C,) to initialise the x-term of
            every classifier (the PaCo configs do this).
    """
    config = DLSAConfig() if config is None else config
    num_classes = _check_fit_inputs(train_x, train_y, val_x, val_y, config)
    if generator is None:
        generator = torch.Generator().manual_seed(config.seed if seed is None else seed)
    (n, dim), device, dtype = train_x.shape, train_x.device, train_x.dtype
    train = (train_x, train_y.long().to(device))
    val = None if val_x is None else (val_x.to(device=device, dtype=dtype), val_y.long().to(device))
    model = DLSAModel(dim, num_classes, config, generator).to(device=device, dtype=dtype)
    for layer in model.modules():
        if isinstance(layer, MaskedLinear):
            layer.block_matmul = config.flow_fast_path
    if stage1_weight is not None:
        bias = None if stage1_bias is None else stage1_bias.to(device=device, dtype=dtype)
        for head in [*model.cacls, model.regcls]:
            head.load_stage1(stage1_weight.to(device=device, dtype=dtype), bias)

    remain_tr = torch.ones(n, dtype=torch.bool, device=device)
    remain_va = torch.ones(0 if val is None else val[0].shape[0], dtype=torch.bool, device=device)
    for d in range(config.max_depth):
        take_tr, take_va = _fit_depth(model, d, train, val, remain_tr, remain_va, generator)
        remain_tr &= ~take_tr
        remain_va &= ~take_va

    if not remain_tr.any():
        raise ValueError("no training samples remain for the regular classifier (likelihood ties?)")
    x_r, y_r = train[0][remain_tr], train[1][remain_tr]
    counts_r = _class_counts(train[1] if config.regcls_counts == "full" else y_r, num_classes)
    val_r = None if val is None else (val[0][remain_va], val[0][remain_va], val[1][remain_va])
    reg_result = _train_head(
        model.regcls, x_r, x_r, y_r, counts_r if config.regcls_loss == "bsm" else None, lr=config.regcls_lr,
        config=config, val=val_r, generator=generator,
    )
    model.history.append({"depth": "regular", "n_train": int(remain_tr.sum()), "n_val": int(remain_va.sum()),
                          "regcls": reg_result})
    return model.eval()
