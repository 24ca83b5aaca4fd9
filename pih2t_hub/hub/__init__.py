"""Sharing trained models: model cards rendered from the run config, a validated push to the Hub, and the export
to a plain timm checkpoint (loads with timm or transformers' TimmWrapper, without pih2t_hub)."""

from __future__ import annotations

from pih2t_hub.hub.model_card import HUB_FORMATS, REQUIRED_METRICS, check_results, render_model_card, write_model_card
from pih2t_hub.hub.push import REQUIRED_FILES, push_to_hub, stage_model_folder, validate_model_folder
from pih2t_hub.hub.timm_export import (
    TIMM_REQUIRED_FILES,
    TimmExportError,
    build_timm_model,
    check_timm_exportable,
    export_timm,
    fold_logit_adjustment,
    fold_lws,
    fold_tau_norm,
    posthoc_offsets,
)

__all__ = [
    "HUB_FORMATS",
    "REQUIRED_FILES",
    "REQUIRED_METRICS",
    "TIMM_REQUIRED_FILES",
    "TimmExportError",
    "build_timm_model",
    "check_results",
    "check_timm_exportable",
    "export_timm",
    "fold_logit_adjustment",
    "fold_lws",
    "fold_tau_norm",
    "posthoc_offsets",
    "push_to_hub",
    "render_model_card",
    "stage_model_folder",
    "validate_model_folder",
    "write_model_card",
]
