"""Predictions and the results table: shared by the run, the comparison and ``recipes/evaluate.py``."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

SUMMARY_KEYS = ("overall", "balanced", "many", "medium", "few", "ece")


@torch.no_grad()
def predict_logits(accelerator: Any, fn: Callable[[Any], torch.Tensor], loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over a loader, gathered across processes without duplicates (``gather_for_metrics``)."""
    all_logits, all_labels = [], []
    for batch in loader:
        x, y = (batch["pixel_values"], batch["labels"]) if isinstance(batch, dict) else batch[:2]
        logits = fn(x)
        if accelerator is not None:
            logits, y = accelerator.gather_for_metrics((logits.float(), y))
        all_logits.append(logits.float().cpu())
        all_labels.append(torch.as_tensor(y).cpu())
    return torch.cat(all_logits).numpy(), torch.cat(all_labels).numpy()


def summarize(metrics: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of :func:`~pih2t_hub.evaluation.metrics.longtail_metrics` as plain floats."""
    return {k: float(metrics[k]) for k in SUMMARY_KEYS if k in metrics}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A plain-text results table (percentages)."""
    head = f"{'':<22}" + "".join(f"{k:>10}" for k in SUMMARY_KEYS)
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        cells = "".join(f"{100 * m[k]:>10.2f}" if k in m and not math.isnan(m[k]) else f"{'n/a':>10}"
                        for k in SUMMARY_KEYS)
        lines.append(f"{name:<22}{cells}")
    return "\n".join(lines)


__all__ = ["SUMMARY_KEYS", "predict_logits", "summarize", "format_table"]
