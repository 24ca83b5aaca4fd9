"""DLSA as a method plug-in: fitted on cached train features after stage 1, exported as one head module."""

from __future__ import annotations

import dataclasses

from torch import nn

from ..base import Method, Stage2Context, register_method
from .pipeline import DLSAConfig, fit_dlsa, remaining_sizes


def clusters_for(config: DLSAConfig, n: int) -> DLSAConfig:
    """The configuration with K lowered to what ``n`` training rows allow at every depth (each FlowGMM needs at least
    as many rows as components); unchanged where the data has enough. Small training sets, such as one fold's
    training part in a cross-validated comparison, would otherwise be refused for a K sized for larger data."""
    allowed = min(remaining_sizes(n, config.rho, config.max_depth)[:config.max_depth])
    return config if allowed >= config.num_clusters else dataclasses.replace(config, num_clusters=max(1, allowed))


@register_method("dlsa")
class DLSA(Method):
    paper = "Xu et al., Constructing Balance from Imbalance for Long-tailed Image Recognition, ECCV 2022"
    summary = ("flow-based likelihood filtering splits off well-clustered samples for cluster-aided classifiers; "
               "the rest go to a regular classifier (on cached features)")
    needs_features = True
    Params = DLSAConfig  # the DLSA pipeline's own configuration is the method's parameters
    card_fields = ("num_clusters", "max_depth", "rho", "flow_epochs", "flow_lr", "cls_epochs", "classifier_type")

    def finalize(self, trained: nn.Module, ctx: Stage2Context) -> nn.Module:
        (xtr, ytr), (xva, yva) = ctx.train_features, ctx.val_features
        config = clusters_for(self.params, int(xtr.shape[0]))
        bias = getattr(trained, "bias", None)
        fitted = fit_dlsa(xtr.float(), ytr, xva.float(), yva, config, seed=self.cfg.seed,
                          stage1_weight=trained.weight.detach(), stage1_bias=None if bias is None else bias.detach())
        # the configuration as fitted (K included), and the flow's lr, restarts and routes
        ctx.results["dlsa"] = {"config": config.to_dict(), "history": fitted.history,
                               "num_clusters_lowered": config.num_clusters != self.params.num_clusters}
        return fitted.to_head()

    def export(self, model: nn.Module, head: nn.Module, ctx: Stage2Context) -> nn.Module:
        model = super().export(model, head, ctx)
        model.config.head_type = "dlsa"
        model.config.head_config = head.head_config()
        return model
