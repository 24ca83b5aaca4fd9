"""Learnable weight scaling (LWS, Kang et al., ICLR 2020): the stage-1 head frozen, one scale per class learnt."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from .base import Method, Stage2Context, register_method
from .crt import CRT_RECIPE
from .decoupling import LWSHead


@register_method("lws")
class LWS(Method):
    paper = "Kang et al., Decoupling Representation and Classifier, ICLR 2020"
    summary = "head frozen; per-class logit scales learnt with class-balanced sampling, folded into the weights"
    recipe = replace(CRT_RECIPE, epochs=5, source="classifier-balancing official LWS config: cRT's optimiser "
                                                  "(lr 0.2, batch 512, cosine) for 5 epochs")
    sampler = "balanced"

    def setup_head(self, head: nn.Module, ctx: Stage2Context) -> nn.Module:
        return LWSHead(head)

    def finalize(self, trained: nn.Module, ctx: Stage2Context) -> nn.Module:
        return trained.to_linear()  # exactly the same logits, as a plain linear head in the saved model
