"""Balanced softmax on frozen features: loss on logits + log n_c; raw logits at inference."""

from __future__ import annotations

from ._loss import LossMethod
from .base import register_method


@register_method("balanced_softmax")
class BalancedSoftmax(LossMethod):
    paper = "Ren et al., Balanced Meta-Softmax, NeurIPS 2020"
    summary = "loss on logits + log n_c; raw logits at inference"
    loss = "balanced_softmax"
