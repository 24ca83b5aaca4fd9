"""PNG plots of long-tailed results: per-class accuracy against training frequency, and reliability diagrams.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas, never through ``pyplot``: no global
figure state, no GUI backend, safe in training workers and tests. Files are written to a temporary name in the
target folder and renamed (:func:`pih2t_hub._atomic.atomic_write`), so a reader (or a Hub upload) never sees a
half-written PNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pih2t_hub._atomic import atomic_write
from pih2t_hub.data.shots import SHOT_NAMES, shot_groups
from pih2t_hub.evaluation.metrics import reliability_diagram_data, to_numpy

__all__ = ["plot_accuracy_vs_frequency", "plot_reliability", "save_figure_atomic"]

_BAND_COLORS = {"many": "#4c72b0", "medium": "#55a868", "few": "#c44e52"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def save_figure_atomic(fig: Figure, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Render ``fig`` to PNG at ``path`` via a temporary file and :func:`os.replace`."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plots are written as PNG; path must end in .png, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attach an Agg canvas (no pyplot involved)
    return atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=dpi, bbox_inches="tight"))


def _band_edges(counts: np.ndarray, groups: np.ndarray, many_threshold: int, few_threshold: int,
                from_thresholds: bool) -> dict[str, tuple[float, float]]:
    """x-ranges (in training count) to shade for each shot group."""
    lo = max(float(counts.min()), 0.5) / 1.5
    hi = float(counts.max()) * 1.5
    if from_thresholds:
        spans = {
            "few": (lo, float(few_threshold)),
            "medium": (float(few_threshold), float(many_threshold) + 0.5),
            "many": (float(many_threshold) + 0.5, hi),
        }
        # Only groups that have classes, clipped to the plotted range.
        return {
            g: (max(a, lo), min(b, hi))
            for g, (a, b) in spans.items()
            if (groups == g).any() and min(b, hi) > max(a, lo)
        }
    # Rank-based groups (fixed ranges): split half-way (geometrically) between neighbouring groups.
    ranked: dict[str, tuple[float, float]] = {}
    present = [g for g in ("few", "medium", "many") if (groups == g).any()]
    for i, g in enumerate(present):
        c = np.maximum(counts[groups == g].astype(float), 1.0)
        left = lo if i == 0 else float(np.sqrt(c.min() * np.maximum(counts[groups == present[i - 1]], 1).max()))
        right = hi if i == len(present) - 1 else float(
            np.sqrt(c.max() * np.maximum(counts[groups == present[i + 1]], 1).min())
        )
        ranked[g] = (left, right)
    return ranked


def plot_accuracy_vs_frequency(
    per_class_acc: Mapping[str, Any],
    train_class_counts: Sequence[int] | Any,
    path: str | os.PathLike[str],
    *,
    many_threshold: int = 100,
    few_threshold: int = 20,
    groups: Sequence[str] | np.ndarray | None = None,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Scatter per-class accuracy against the class's training count (log x) for one or several methods.

    Shaded bands mark the many / medium / few groups, and a horizontal segment per method and band shows the
    group's mean per-class accuracy, so the tail gain of a method is visible at a glance. Classes whose accuracy
    is ``NaN`` (no test images) are not drawn. Classes with zero training images are drawn at x = 0.5.
    Methods are offset slightly along x so that their markers do not hide each other.

    Args:
        per_class_acc: ``{method name: per-class accuracy (C,)}`` in [0, 1]
            (e.g. ``longtail_metrics(...)["per_class"]``).
        train_class_counts: training images per class (C,).
        path: output ``.png``.
        many_threshold, few_threshold: thresholds for the bands; ignored when ``groups`` is given.
        groups: precomputed shot group per class (fixed-range protocol).

    Returns:
        The written path.
    """
    if not isinstance(per_class_acc, Mapping) or not per_class_acc:
        raise ValueError("per_class_acc must be a non-empty mapping {method name: per-class accuracy}")
    counts = _checked_counts(train_class_counts)
    accs = _checked_accuracies(per_class_acc, counts)
    from_thresholds = groups is None
    group_arr = (
        shot_groups(counts.astype(np.int64), many_threshold, few_threshold)
        if groups is None
        else np.asarray(groups, dtype=object)
    )
    if group_arr.shape != counts.shape:
        raise ValueError(f"groups must have one entry per class ({counts.size}), got shape {group_arr.shape}")

    x_counts = np.where(counts > 0, counts, 0.5)
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xscale("log")
    spans = _band_edges(counts, group_arr, many_threshold, few_threshold, from_thresholds)
    for g in SHOT_NAMES:
        if g in spans:
            n = int((group_arr == g).sum())
            ax.axvspan(*spans[g], color=_BAND_COLORS[g], alpha=0.10, lw=0, label=f"{g}-shot ({n} classes)")
    _draw_methods(ax, accs, x_counts, group_arr, spans)
    ax.set_xlim(max(float(x_counts.min()), 0.5) / 1.5, float(x_counts.max()) * 1.5)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel("per-class accuracy")
    ax.set_title(title or "Per-class accuracy vs. training frequency (dashed: group mean)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.8)
    return save_figure_atomic(fig, path, dpi=dpi)


def _checked_counts(train_class_counts: Sequence[int] | Any) -> np.ndarray:
    """The training counts as a float array, refused unless 1-D, non-empty and non-negative."""
    counts = to_numpy(train_class_counts, "train_class_counts").astype(float)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"train_class_counts must be a non-empty 1-D array, got shape {counts.shape}")
    if (counts < 0).any():
        raise ValueError("train_class_counts must be non-negative")
    return counts


def _checked_accuracies(per_class_acc: Mapping[str, Any], counts: np.ndarray) -> dict[str, np.ndarray]:
    """``{method name: per-class accuracy}`` as float arrays, one entry per class, fractions in [0, 1] or NaN.

    Percentages are refused, not rescaled: the y axis and the dashed group means are fractions.
    """
    accs: dict[str, np.ndarray] = {}
    for name, acc in per_class_acc.items():
        a = to_numpy(acc, f"per_class_acc[{name!r}]").astype(float)
        if a.shape != counts.shape:
            raise ValueError(f"per_class_acc[{name!r}] has shape {a.shape}, expected {counts.shape}")
        finite = a[np.isfinite(a)]
        if finite.size and (finite.min() < 0 or finite.max() > 1):
            raise ValueError(f"per_class_acc[{name!r}] must be fractions in [0, 1] (NaN allowed)")
        accs[str(name)] = a
    return accs


def _draw_methods(ax: Any, accs: Mapping[str, np.ndarray], x_counts: np.ndarray, group_arr: np.ndarray,
                  spans: Mapping[str, tuple[float, float]]) -> None:
    """One scatter per method (classes without test images left out) and a dashed group-mean segment per band."""
    n_methods = len(accs)
    colors = [f"C{i}" for i in range(n_methods)]
    for i, (name, a) in enumerate(accs.items()):
        # Spread the methods by a few percent in x (log space) around the true count.
        offset = 1.0 + 0.06 * (i - (n_methods - 1) / 2)
        ok = np.isfinite(a)
        ax.scatter(x_counts[ok] * offset, a[ok], s=14, alpha=0.7, color=colors[i],
                   marker=_MARKERS[i % len(_MARKERS)], label=name, edgecolors="none")
        for g, (lo, hi) in spans.items():
            sel = ok & (group_arr == g)
            if sel.any():
                ax.hlines(float(a[sel].mean()), lo, hi, colors=colors[i], linestyles="--", lw=1.5)


def plot_reliability(
    probs_or_data: Any,
    labels: Any | None = None,
    path: str | os.PathLike[str] | None = None,
    *,
    n_bins: int = 15,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with the ECE in the title.

    Args:
        probs_or_data: ``(N, C)`` probabilities (then pass ``labels``), or the dict returned by
            :func:`pih2t_hub.evaluation.metrics.reliability_diagram_data`.
        labels: true labels when probabilities are given.
        path: output ``.png``.
    """
    if path is None:
        raise ValueError("path is required")
    if isinstance(probs_or_data, Mapping):
        data = probs_or_data
        missing = {"bin_edges", "bin_accuracy", "bin_confidence", "bin_count", "ece"} - set(data)
        if missing:
            raise ValueError(f"reliability data lacks keys {sorted(missing)}")
    else:
        if labels is None:
            raise ValueError("labels are required when probabilities are given")
        data = reliability_diagram_data(probs_or_data, labels, n_bins)
    edges = np.asarray(data["bin_edges"], dtype=float)
    acc = np.asarray(data["bin_accuracy"], dtype=float)
    conf = np.asarray(data["bin_confidence"], dtype=float)
    count = np.asarray(data["bin_count"])
    width = np.diff(edges)
    centers = edges[:-1] + width / 2
    ok = count > 0

    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="perfect calibration")
    ax.bar(centers[ok], acc[ok], width=width[ok], color="#4c72b0", edgecolor="black", lw=0.5, label="accuracy")
    gap_lo = np.minimum(acc[ok], conf[ok])
    ax.bar(centers[ok], np.abs(conf[ok] - acc[ok]), bottom=gap_lo, width=width[ok], color="#c44e52", alpha=0.35,
           edgecolor="#c44e52", lw=0.5, label="gap to confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title or f"Reliability diagram (ECE = {100 * float(data['ece']):.2f}%)")
    ax.legend(loc="upper left", fontsize=8)
    return save_figure_atomic(fig, path, dpi=dpi)
