"""Evaluation of long-tailed classifiers: metrics grouped by training frequency, calibration, plots.

The ``evaluate`` metric module in ``longtail_metric/`` wraps :func:`longtail_metrics` for users of the
``evaluate`` library (``evaluate.load("<path to pih2t_hub/evaluation/longtail_metric>")``; see
:data:`LONGTAIL_METRIC_PATH`), which works offline.
"""

from __future__ import annotations

from pathlib import Path

from pih2t_hub.evaluation.metrics import (
    DEFAULT_ECE_BINS,
    confusion_matrix,
    expected_calibration_error,
    longtail_metrics,
    per_class_accuracy,
    reliability_diagram_data,
)

#: Folder of the offline ``evaluate`` metric module: ``evaluate.load(str(LONGTAIL_METRIC_PATH))``.
LONGTAIL_METRIC_PATH = Path(__file__).resolve().parent / "longtail_metric"

__all__ = [
    "DEFAULT_ECE_BINS",
    "LONGTAIL_METRIC_PATH",
    "confusion_matrix",
    "expected_calibration_error",
    "longtail_metrics",
    "per_class_accuracy",
    "plot_accuracy_vs_frequency",
    "plot_reliability",
    "reliability_diagram_data",
]


def __getattr__(name: str):
    # Plots import matplotlib; load them only when asked for so metrics stay light to import.
    if name in ("plot_accuracy_vs_frequency", "plot_reliability"):
        from pih2t_hub.evaluation import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
