"""Sharing trained models: model cards rendered from the run config, and a validated push to the Hub."""

from __future__ import annotations

from pih2t_hub.hub.model_card import REQUIRED_METRICS, check_results, render_model_card, write_model_card
from pih2t_hub.hub.push import REQUIRED_FILES, push_to_hub, stage_model_folder, validate_model_folder

__all__ = [
    "REQUIRED_FILES",
    "REQUIRED_METRICS",
    "check_results",
    "push_to_hub",
    "render_model_card",
    "stage_model_folder",
    "validate_model_folder",
    "write_model_card",
]
