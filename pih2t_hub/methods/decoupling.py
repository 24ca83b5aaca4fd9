"""Decoupling representation and classifier (Kang et al., ICLR 2020): cRT, τ-normalisation, LWS, NCM.

Kang et al. find that instance-balanced training learns good features and that long-tailed accuracy is mostly
lost in the classifier, whose weight norms grow with class frequency. Stage 2 therefore keeps the features and
only re-balances the classifier:

* **cRT** — re-initialise the linear head (:func:`crt_reinit`) and retrain it on frozen features with
  class-balanced sampling (the sampler lives in :mod:`pih2t_hub.data.samplers`).
* **τ-norm** — no training: divide each class weight vector by its norm to the power τ (:func:`tau_normalize`),
  τ chosen on a validation split (:func:`select_tau`), never on the test split.
* **LWS** — learn one scale per class on top of the frozen head (:class:`LWSHead`), with class-balanced sampling.
* **NCM** — nearest class mean on (L2-normalised) features (:class:`NCMClassifier`), no training at all.

All functions are pure (tensors in, tensors out) and use no global random state.
"""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..models.pih2t.heads import _check_finite, _check_tau, tau_normalize

__all__ = [
    "tau_normalize",
    "tau_norm_logits",
    "select_tau",
    "TauSelection",
    "LWSHead",
    "NCMClassifier",
    "crt_reinit",
]


def tau_norm_logits(
    features: torch.Tensor, weight: torch.Tensor, tau: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits of a τ-normalised linear head: features @ tau_normalize(weight, τ).T (+ bias, left unscaled)."""
    return F.linear(features, tau_normalize(weight, tau), bias)


class TauSelection(NamedTuple):
    """Result of :func:`select_tau`: the chosen τ, its validation score, and (τ, score) for every candidate."""

    tau: float
    score: float
    scores: list[tuple[float, float]]


def _score(pred: torch.Tensor, labels: torch.Tensor, metric: str) -> float:
    correct = (pred == labels).to(torch.float64)
    if metric == "accuracy":
        return float(correct.mean())
    classes, inverse = torch.unique(labels, return_inverse=True)
    per_class_hits = torch.zeros(len(classes), dtype=torch.float64).index_add_(0, inverse, correct)
    per_class_n = torch.bincount(inverse, minlength=len(classes)).to(torch.float64)
    return float((per_class_hits / per_class_n).mean())


def select_tau(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    taus: Sequence[float] | np.ndarray = np.linspace(0.0, 2.0, 21),
    metric: str = "balanced_accuracy",
) -> TauSelection:
    """Choose τ for τ-normalisation by a score on a **validation** split (do not pass the test split).

    ``metric``: ``"balanced_accuracy"`` (mean per-class recall over the classes present in ``val_labels``; equal to
    accuracy on a balanced split) or ``"accuracy"``. Ties go to the smallest τ (the least change to the head).
    """
    if metric not in ("balanced_accuracy", "accuracy"):
        raise ValueError(f"metric must be 'balanced_accuracy' or 'accuracy', got {metric!r}")
    candidates = [float(t) for t in np.asarray(taus, dtype=np.float64).ravel()]
    if not candidates:
        raise ValueError("taus must not be empty")
    for t in candidates:
        _check_tau(t)
    if val_features.ndim != 2 or val_features.shape[1] != weight.shape[-1]:
        raise ValueError(f"val_features must have shape (N, {weight.shape[-1]}), got {tuple(val_features.shape)}")
    if val_labels.shape != (val_features.shape[0],) or val_labels.numel() == 0:
        raise ValueError("val_labels must be a non-empty 1-D tensor with one label per validation feature")
    _check_finite("val_features", val_features)
    scores: list[tuple[float, float]] = []
    with torch.no_grad():
        for t in candidates:
            pred = tau_norm_logits(val_features, weight, t, bias).argmax(dim=1)
            scores.append((t, _score(pred.cpu(), val_labels.cpu(), metric)))
    best_tau, best_score = scores[0]
    for t, s in scores[1:]:
        if s > best_score or (s == best_score and t < best_tau):
            best_tau, best_score = t, s
    return TauSelection(best_tau, best_score, scores)


class LWSHead(nn.Module):
    """Learnable weight scaling (LWS): logits_c = f_c · (w_c·x + b_c) with the wrapped head frozen.

    Only ``scales`` (one per class, initialised to 1) is trainable; the wrapped ``nn.Linear`` has
    ``requires_grad=False`` so passing ``LWSHead.parameters()`` to an optimiser trains the scales alone. The bias is
    scaled with the weight (the scale acts on the logit). :meth:`to_linear` folds the scales into a plain head.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LWSHead wraps an nn.Linear, got {type(linear).__name__}")
        self.linear = linear.requires_grad_(False)
        self.scales = nn.Parameter(torch.ones(linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype))

    def train(self, mode: bool = True) -> "LWSHead":
        """Also re-freezes the wrapped head, so a stray ``requires_grad_(True)`` elsewhere is undone on ``train()``."""
        super().train(mode)
        self.linear.requires_grad_(False)
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features) * self.scales

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new ``nn.Linear`` computing the same logits (W·diag(f), b·f), for export without this wrapper."""
        out = nn.Linear(self.linear.in_features, self.linear.out_features, bias=self.linear.bias is not None)
        out = out.to(device=self.linear.weight.device, dtype=self.linear.weight.dtype)
        out.weight.copy_(self.linear.weight * self.scales[:, None])
        if self.linear.bias is not None:
            out.bias.copy_(self.linear.bias * self.scales)
        return out


class NCMClassifier(nn.Module):
    """Nearest class mean classifier on frozen features.

    Args:
        num_classes: number of classes C.
        metric: ``"cosine"`` (logits = cosine similarity to the class means) or ``"euclidean"`` (logits = minus
            the Euclidean distance).
        normalize: L2-normalise features before averaging and at query time, and L2-normalise the means
            (Kang et al. compare against L2-normalised means).

    Call :meth:`fit` with training features and labels; the means are kept in the ``class_means`` buffer.
    """

    def __init__(self, num_classes: int, metric: str = "cosine", normalize: bool = True) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
        self.num_classes = int(num_classes)
        self.metric = metric
        self.normalize = normalize
        self.register_buffer("class_means", torch.empty(0))

    @property
    def is_fitted(self) -> bool:
        return self.class_means.numel() > 0

    @torch.no_grad()
    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> "NCMClassifier":
        """Compute the class means. Every class needs at least one sample (else ``ValueError``)."""
        if features.ndim != 2 or labels.shape != (features.shape[0],):
            raise ValueError("features must have shape (N, D) and labels shape (N,)")
        _check_finite("features", features)
        labels = labels.long()
        if labels.numel() == 0 or bool((labels < 0).any()) or bool((labels >= self.num_classes).any()):
            raise ValueError(f"labels must be non-empty and lie in [0, {self.num_classes - 1}]")
        feats = features.float()
        if self.normalize:
            feats = F.normalize(feats, dim=1)
        counts = torch.bincount(labels, minlength=self.num_classes)
        if bool((counts == 0).any()):
            missing = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(f"NCM needs at least one sample per class; classes {missing[:10]} have none")
        sums = torch.zeros(self.num_classes, feats.shape[1], device=feats.device).index_add_(0, labels, feats)
        means = sums / counts[:, None].to(feats.dtype)
        if self.normalize:
            means = F.normalize(means, dim=1)
        self.class_means = means
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N, C): cosine similarity or negative Euclidean distance to each class mean."""
        if not self.is_fitted:
            raise RuntimeError("NCMClassifier.fit must be called before forward")
        if features.ndim != 2 or features.shape[1] != self.class_means.shape[1]:
            raise ValueError(f"features must have shape (N, {self.class_means.shape[1]}), got {tuple(features.shape)}")
        _check_finite("features", features)
        feats = features.float()
        if self.normalize:
            feats = F.normalize(feats, dim=1)
        if self.metric == "cosine":
            return F.normalize(feats, dim=1) @ F.normalize(self.class_means, dim=1).T
        return -torch.cdist(feats, self.class_means)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Index of the nearest class mean."""
        return self.forward(features).argmax(dim=1)


@torch.no_grad()
def crt_reinit(head: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Re-initialise a linear head in place for classifier re-training (cRT) and make it trainable.

    For ``nn.Linear`` the weights and bias are drawn from U(-1/√fan_in, 1/√fan_in), the distribution of
    ``nn.Linear``'s own default initialisation, using ``generator`` so that runs are reproducible without touching
    global RNG state. Other modules must define ``reset_parameters()``; one that takes a ``generator`` (the cosine
    head) draws from it, otherwise passing one raises ``TypeError``. cRT pairs this with class-balanced sampling on frozen features.
    """
    if isinstance(head, nn.Linear):
        bound = 1.0 / math.sqrt(head.in_features) if head.in_features > 0 else 0.0
        head.weight.uniform_(-bound, bound, generator=generator)
        if head.bias is not None:
            head.bias.uniform_(-bound, bound, generator=generator)
    elif hasattr(head, "reset_parameters"):
        if "generator" in inspect.signature(head.reset_parameters).parameters:
            head.reset_parameters(generator=generator)
        elif generator is not None:
            raise TypeError(f"{type(head).__name__}.reset_parameters cannot use a generator; pass generator=None")
        else:
            head.reset_parameters()
    else:
        raise TypeError(f"crt_reinit needs an nn.Linear or a module with reset_parameters(), got {type(head).__name__}")
    head.requires_grad_(True)
    return head
