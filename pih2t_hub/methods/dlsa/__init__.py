"""DLSA (Xu, Li, Li, Lu, ECCV 2022): "Constructing Balance from Imbalance for Long-tailed Image Recognition".

A stage-2 method on frozen, cached features (METHODS.md §3): a flow-based Gaussian mixture (FlowGMM) repeatedly
splits off the best-clustered training samples, which a cluster-aided classifier handles; the rest goes to a regular
classifier. Typical use::

    from pih2t_hub.methods.dlsa import DLSAConfig, fit_dlsa

    model = fit_dlsa(train_x, train_y, val_x, val_y, DLSAConfig.from_preset("imagenet_lt_paco_r50_bsm"), seed=0)
    labels = model.predict(test_x)        # (N,)
    routes = model.routing(test_x)        # 0..L-1: CACls of that depth, L: RegCls
"""

from __future__ import annotations

from .flow import MADE, MAF, BatchNormFlow
from .flowgmm import FlowGMM, train_flowgmm
from .pipeline import (
    DLSAConfig,
    DLSAModel,
    DualHead,
    available_presets,
    cluster_prior,
    fit_dlsa,
    likelihood_threshold,
    split_by_likelihood,
)

__all__ = [
    "DLSAConfig",
    "DLSAModel",
    "fit_dlsa",
    "available_presets",
    "FlowGMM",
    "train_flowgmm",
    "MADE",
    "MAF",
    "BatchNormFlow",
    "DualHead",
    "likelihood_threshold",
    "split_by_likelihood",
    "cluster_prior",
]
