"""Gradient-harmonised loss on frozen features: loss: intra/inter-category gradient harmonisation."""

from __future__ import annotations

from ._loss import LossMethod
from .base import register_method


@register_method("harmonized")
class Harmonized(LossMethod):
    paper = "Solving the Long-Tailed Problem via Intra- and Inter-Category Balance (reconstruction)"
    summary = "loss: intra/inter-category gradient harmonisation"
    loss = "harmonized"
