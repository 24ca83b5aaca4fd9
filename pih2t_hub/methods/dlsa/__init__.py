"""DLSA (Xu, Li, Li, Lu, ECCV 2022): "Constructing Balance from Imbalance for Long-tailed Image Recognition".

A stage-2 method on frozen, cached features (docs/methods.md, DLSA): a flow-based Gaussian mixture (FlowGMM)
repeatedly splits off the best-clustered training samples, which a cluster-aided classifier handles; the rest goes
to a regular classifier. Typical use::

    from pih2t_hub.methods.dlsa import DLSAConfig, fit_dlsa, install_head

    model = fit_dlsa(train_x, train_y, val_x, val_y, DLSAConfig(num_clusters=50), seed=0)
    labels = model.predict(test_x)        # (N,)
    routes = model.routing(test_x)        # 0..L-1: CACls of that depth, L: RegCls
    install_head(classifier, model)       # a PIH2TForImageClassification now classifies with DLSA

The fitted model is a :class:`DLSAHead` (``pih2t_hub.models.pih2t.dlsa_head``), the module saved checkpoints carry.
"""

from __future__ import annotations

from ...models.pih2t.dlsa_head import MADE, MAF, BatchNormFlow, DLSAHead, DualHead, FlowGMM
from .flowgmm import FlowDiverged, FlowObjective, FlowSelection, train_flowgmm
from .pipeline import (
    DLSAConfig,
    DLSAModel,
    available_presets,
    cluster_prior,
    fit_dlsa,
    head_kwargs,
    install_head,
    likelihood_threshold,
    split_by_likelihood,
)

__all__ = [
    "DLSAConfig",
    "DLSAModel",
    "DLSAHead",
    "fit_dlsa",
    "install_head",
    "head_kwargs",
    "available_presets",
    "FlowGMM",
    "train_flowgmm",
    "FlowObjective",
    "FlowSelection",
    "FlowDiverged",
    "MADE",
    "MAF",
    "BatchNormFlow",
    "DualHead",
    "likelihood_threshold",
    "split_by_likelihood",
    "cluster_prior",
]
