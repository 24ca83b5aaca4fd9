"""Nearest class mean (Kang et al., ICLR 2020): no training; distance to class centroids of the train features."""

from __future__ import annotations

from torch import nn

from ..models.pih2t.heads import NCMHead
from .base import Method, Stage2Context, register_method


@register_method("ncm")
class NCM(Method):
    paper = "Kang et al., Decoupling Representation and Classifier, ICLR 2020"
    summary = ("no training: features centred by the train mean and L2-normalised, logits = minus the squared "
               "distance to each class centroid")
    needs_features = True

    def finalize(self, trained: nn.Module, ctx: Stage2Context) -> nn.Module:
        x, y = ctx.train_features
        return NCMHead.fit(x.float(), y, ctx.num_classes).to(x.device)

    def export(self, model: nn.Module, head: nn.Module, ctx: Stage2Context) -> nn.Module:
        model = super().export(model, head, ctx)
        model.config.head_type = "ncm"
        return model
