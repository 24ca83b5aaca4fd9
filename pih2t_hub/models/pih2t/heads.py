"""Classifier heads on pooled features: linear, cosine, nearest class mean and DLSA's routed flows + classifiers;
τ-normalised weights (τ-norm's head is a linear layer with them, so exporting needs them below the methods).

Both act on ``(B, D)`` pooled vectors only, which is what lets stage 2 run on cached features: H2T's channel
replacement commutes with channel-wise pooling, so a head fed fused pooled vectors computes exactly what it would
on fused feature maps (docs/methods.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .dlsa_head import DLSAHead


def _check_tau(tau: float) -> float:
    tau = float(tau)
    if not tau >= 0.0:  # also rejects NaN
        raise ValueError(f"tau must be >= 0, got {tau}")
    return tau


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contain NaN or inf")


def tau_normalize(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """τ-normalised classifier weights: row c becomes w_c / ||w_c||_2^τ (``weight`` has shape (C, D)).

    τ = 0 leaves the weights unchanged, τ = 1 gives unit-norm rows. A zero row stays zero.
    """
    tau = _check_tau(tau)
    if weight.ndim != 2:
        raise ValueError(f"weight must have shape (num_classes, dim), got {tuple(weight.shape)}")
    _check_finite("weight", weight)
    norms = weight.norm(dim=1, keepdim=True).clamp(min=torch.finfo(weight.dtype).tiny)
    return weight / norms.pow(tau)


class LinearHead(nn.Linear):
    """``logits = W f + b``: the official H2T classifier after global average pooling."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = True) -> None:
        super().__init__(in_features, num_classes, bias=bias)


class CosineHead(nn.Module):
    """``logits = s · cos(w_c, f)``: removes the norm bias head classes acquire in the classifier weights."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 16.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"cosine head scale must be positive, got {scale}")
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.weight, std=0.01)
        self.scale = float(scale)
        self.in_features = in_features
        self.out_features = num_classes

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Class vectors drawn afresh from N(0, 0.01²), as at construction (cRT re-initialises the head this way)."""
        self.weight.normal_(0.0, 0.01, generator=generator)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(features, dim=-1), F.normalize(self.weight, dim=-1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}"


class NCMHead(nn.Module):
    """Nearest class mean: ``logits_c = -‖x̂ - μ_c‖²`` with ``x̂ = normalize(x - m)``.

    ``m`` is the mean of the training features and ``μ_c`` the class centroids of the centred, L2-normalised
    training features (the official decoupling code's ``cl2n`` NCM). Centroids and centre are buffers, so the
    saved model carries them; minus the squared distance keeps the official argmax and gives softmax-ready logits.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(in_features))
        self.register_buffer("centroids", torch.zeros(num_classes, in_features))
        self.in_features, self.out_features = in_features, num_classes

    @classmethod
    @torch.no_grad()
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> "NCMHead":
        """Centre and centroids from training features; every class needs at least one sample."""
        labels = labels.long()
        counts = torch.bincount(labels, minlength=num_classes)
        if bool((counts == 0).any()):
            missing = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(f"NCM needs at least one training sample per class; classes {missing[:10]} have none")
        head = cls(features.shape[1], num_classes)
        head.center.copy_(features.mean(0))
        x = F.normalize(features - head.center, dim=1)
        sums = torch.zeros(num_classes, x.shape[1], dtype=x.dtype).index_add_(0, labels, x)
        head.centroids.copy_(sums / counts[:, None].to(x.dtype))
        return head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.normalize(features.float() - self.center, dim=-1)
        return -torch.cdist(x, self.centroids).pow(2)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def build_head(
    head_type: str,
    in_features: int,
    num_classes: int,
    bias: bool = True,
    scale: float = 16.0,
    head_config: dict[str, Any] | None = None,
) -> nn.Module:
    """Head by name: ``"linear"``, ``"cosine"``, ``"ncm"``, or ``"dlsa"`` (built from ``head_config``, its saved sizes)."""
    if head_type == "linear":
        return LinearHead(in_features, num_classes, bias=bias)
    if head_type == "cosine":
        return CosineHead(in_features, num_classes, scale=scale)
    if head_type == "ncm":
        return NCMHead(in_features, num_classes)
    if head_type == "dlsa":
        if not isinstance(head_config, dict) or "num_clusters" not in head_config:
            raise ValueError("head_type 'dlsa' needs head_config, the DLSA head's sizes (DLSAHead.head_config())")
        return DLSAHead(in_features, num_classes, **head_config)
    raise ValueError(f"unknown head type {head_type!r}; choose 'linear', 'cosine', 'ncm' or 'dlsa'")


__all__ = ["LinearHead", "CosineHead", "NCMHead", "DLSAHead", "build_head", "tau_normalize"]
