"""Classifier re-training (cRT, Kang et al., ICLR 2020): a freshly initialised head on class-balanced batches."""

from __future__ import annotations

import torch
from torch import nn

from .base import Method, Recipe, Stage2Context, register_method
from .decoupling import crt_reinit

CRT_RECIPE = Recipe(epochs=10, lr=0.2, batch_size=512, weight_decay=5e-4,
                    source="classifier-balancing official ImageNet-LT cRT config: 10 epochs, lr 0.2, batch 512, "
                           "weight decay 5e-4, cosine to 0 at the last epoch")


@register_method("crt")
class CRT(Method):
    paper = "Kang et al., Decoupling Representation and Classifier, ICLR 2020"
    summary = "head re-initialised and retrained with class-balanced sampling"
    recipe = CRT_RECIPE
    sampler = "balanced"

    def setup_head(self, head: nn.Module, ctx: Stage2Context) -> nn.Module:
        return crt_reinit(head, generator=torch.Generator().manual_seed(self.cfg.seed + 2))


@register_method("crt_progressive")
class CRTProgressive(CRT):
    paper = "Kang et al., ICLR 2020 (progressively-balanced sampling)"
    summary = "cRT with a sampler moving from instance-wise to class-balanced over the epochs"
    sampler = "progressive"
