"""Sharing trained models: model cards rendered from the run config, a validated push to the Hub, and the export
to a plain timm checkpoint (loads with timm or transformers' TimmWrapper, without pih2t_hub)."""

from __future__ import annotations

from pih2t_hub.hub import timm_export
from pih2t_hub.hub.model_card import HUB_FORMATS, REQUIRED_METRICS, check_results, render_model_card, write_model_card
from pih2t_hub.hub.push import REQUIRED_FILES, push_to_hub, stage_model_folder, validate_model_folder
from pih2t_hub.hub.timm_export import *  # noqa: F401,F403 - the export API, named once in timm_export.__all__

__all__ = [
    "HUB_FORMATS",
    "REQUIRED_FILES",
    "REQUIRED_METRICS",
    "check_results",
    "push_to_hub",
    "render_model_card",
    "stage_model_folder",
    "validate_model_folder",
    "write_model_card",
]
__all__ += timm_export.__all__
