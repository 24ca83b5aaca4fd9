"""Classifier heads on pooled features: linear, cosine and DLSA's routed flows + classifiers.

Both act on ``(B, D)`` pooled vectors only, which is what lets stage 2 run on cached features: H2T's channel
replacement commutes with channel-wise pooling, so a head fed fused pooled vectors computes exactly what it would
on fused feature maps (METHODS.md §1.4).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .dlsa_head import DLSAHead


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

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(features, dim=-1), F.normalize(self.weight, dim=-1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}"


def build_head(
    head_type: str,
    in_features: int,
    num_classes: int,
    bias: bool = True,
    scale: float = 16.0,
    head_config: dict[str, Any] | None = None,
) -> nn.Module:
    """Head by name: ``"linear"``, ``"cosine"``, or ``"dlsa"`` (built from ``head_config``, its saved sizes)."""
    if head_type == "linear":
        return LinearHead(in_features, num_classes, bias=bias)
    if head_type == "cosine":
        return CosineHead(in_features, num_classes, scale=scale)
    if head_type == "dlsa":
        if not isinstance(head_config, dict) or "num_clusters" not in head_config:
            raise ValueError("head_type 'dlsa' needs head_config, the DLSA head's sizes (DLSAHead.head_config())")
        return DLSAHead(in_features, num_classes, **head_config)
    raise ValueError(f"unknown head type {head_type!r}; choose 'linear', 'cosine' or 'dlsa'")


__all__ = ["LinearHead", "CosineHead", "DLSAHead", "build_head"]
