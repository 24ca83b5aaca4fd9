"""Long-tailed evaluation metrics: top-1, balanced, many / medium / few, per-class accuracy, ECE, confusion matrix.

Overall top-1 on a balanced test set hides what long-tailed methods change: accuracy on the rare classes. So the
numbers reported here are all built from *per-class* accuracy, and grouped by each class's *training* frequency
(:mod:`pih2t_hub.data.shots`).

Conventions (they matter for comparability, so they are fixed and documented here):

* ``per_class[c]`` is the recall of class ``c`` on the test set; it is ``NaN`` for a class with no test images
  (an accuracy of 0 would be a claim the data cannot support).
* ``balanced`` is the mean of ``per_class`` over the classes that *have* test images.
* ``many`` / ``medium`` / ``few`` are the mean per-class accuracy of the classes in that shot group that have
  test images (the DLSA / decoupling convention, which averages classes, not images). A group with no such class
  gives ``NaN``, not 0, so an empty group is never mistaken for a failing one.
* ``ece`` uses ``n_bins`` (15) equal-width confidence bins ``(k/n, (k+1)/n]`` (the first bin also holds 0):
  ``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|`` with the max-probability as confidence. It needs probabilities or
  logits; from hard predictions alone it is ``None``.

Inputs may be numpy arrays, torch tensors or sequences. All computation is numpy in float64.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np

from pih2t_hub.data.shots import SHOT_NAMES, shot_groups

__all__ = [
    "DEFAULT_ECE_BINS",
    "confusion_matrix",
    "expected_calibration_error",
    "longtail_metrics",
    "per_class_accuracy",
    "reliability_diagram_data",
    "to_numpy",
]

#: Number of equal-width confidence bins for ECE (the common choice in calibration papers).
DEFAULT_ECE_BINS = 15

OutputKind = Literal["auto", "preds", "logits", "probs"]


def to_numpy(x: Any, name: str = "input") -> np.ndarray:
    """Convert a torch tensor, numpy array or sequence to a numpy array (detached, on CPU).

    Done by duck typing so that this module does not need torch to be importable.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    try:
        return np.asarray(x)
    except Exception as err:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} must be array-like (numpy, torch or a sequence), got {type(x).__name__}") from err


def _as_labels(x: Any, name: str, num_classes: int | None = None) -> np.ndarray:
    """Validate an integer class-index vector (labels or predictions)."""
    arr = to_numpy(x, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise TypeError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if num_classes is not None and arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes}), got values in [{arr.min()}, {arr.max()}]"
        )
    return arr


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _looks_like_probs(x: np.ndarray) -> bool:
    return bool(np.all(x >= 0) and np.allclose(x.sum(axis=1), 1.0, atol=1e-4))


def _resolve_outputs(
    outputs: Any, kind: OutputKind, probs: Any | None, num_classes: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Return ``(predictions, probabilities or None)`` from whatever the caller passed."""
    if kind not in ("auto", "preds", "logits", "probs"):
        raise ValueError(f"kind must be one of 'auto', 'preds', 'logits', 'probs', got {kind!r}")
    arr = to_numpy(outputs, "outputs")
    p: np.ndarray | None = None
    if arr.ndim == 1:
        if kind in ("logits", "probs"):
            raise ValueError(f"kind={kind!r} needs a 2-D (N, num_classes) array, got shape {arr.shape}")
        preds = _as_labels(arr, "predictions", num_classes)
    elif arr.ndim == 2:
        if kind == "preds":
            raise ValueError(f"kind='preds' needs a 1-D array of class indices, got shape {arr.shape}")
        if arr.shape[1] != num_classes:
            raise ValueError(f"outputs have {arr.shape[1]} columns but num_classes={num_classes}")
        arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError("outputs contain NaN or infinite values")
        if kind == "probs" or (kind == "auto" and _looks_like_probs(arr)):
            if not _looks_like_probs(arr):
                raise ValueError("kind='probs' but rows are not non-negative or do not sum to 1")
            p = arr
        else:
            p = _softmax(arr)
        preds = arr.argmax(axis=1).astype(np.int64)
    else:
        raise ValueError(f"outputs must be 1-D predictions or 2-D (N, num_classes) scores, got shape {arr.shape}")
    if probs is not None:
        p = to_numpy(probs, "probs").astype(np.float64)
        if p.shape != (preds.shape[0], num_classes):
            raise ValueError(f"probs must have shape ({preds.shape[0]}, {num_classes}), got {p.shape}")
        if not _looks_like_probs(p):
            raise ValueError("probs rows must be non-negative and sum to 1")
    return preds, p


def confusion_matrix(preds: Any, labels: Any, num_classes: int) -> np.ndarray:
    """``(num_classes, num_classes)`` int64 counts; row = true class, column = predicted class."""
    preds = _as_labels(preds, "predictions", num_classes)
    labels = _as_labels(labels, "labels", num_classes)
    if preds.shape != labels.shape:
        raise ValueError(f"predictions and labels differ in length: {preds.shape[0]} vs {labels.shape[0]}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def per_class_accuracy(preds: Any, labels: Any, num_classes: int) -> np.ndarray:
    """Recall of every class; ``NaN`` for classes with no test images."""
    cm = confusion_matrix(preds, labels, num_classes)
    support = cm.sum(axis=1)
    acc = np.full(num_classes, np.nan)
    has = support > 0
    acc[has] = np.diag(cm)[has] / support[has]
    return acc


def reliability_diagram_data(
    probs_or_confidence: Any,
    labels_or_correct: Any,
    n_bins: int = DEFAULT_ECE_BINS,
) -> dict[str, Any]:
    """Per-bin statistics for a reliability diagram, and the ECE they add up to.

    Args:
        probs_or_confidence: ``(N, C)`` probabilities (confidence = row max, prediction = argmax), or ``(N,)``
            confidences of already-made predictions.
        labels_or_correct: ``(N,)`` true labels when probabilities are given; ``(N,)`` booleans "prediction was
            right" when confidences are given.
        n_bins: number of equal-width bins on [0, 1].

    Returns:
        ``bin_edges`` (n_bins + 1), ``bin_confidence`` / ``bin_accuracy`` (mean per bin, ``NaN`` for empty bins),
        ``bin_count`` (int), ``ece`` (float).
    """
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    p = to_numpy(probs_or_confidence, "probs").astype(np.float64)
    if p.ndim == 2:
        labels = _as_labels(labels_or_correct, "labels", p.shape[1])
        if labels.shape[0] != p.shape[0]:
            raise ValueError(f"probs has {p.shape[0]} rows but labels has {labels.shape[0]} entries")
        conf = p.max(axis=1)
        correct = (p.argmax(axis=1) == labels).astype(np.float64)
    elif p.ndim == 1:
        conf = p
        correct = to_numpy(labels_or_correct, "correct").astype(np.float64)
        if correct.shape != conf.shape:
            raise ValueError(f"confidence and correct differ in shape: {conf.shape} vs {correct.shape}")
    else:
        raise ValueError(f"probs must be (N, C) or (N,), got shape {p.shape}")
    if conf.size == 0:
        raise ValueError("reliability data needs at least one sample")
    if not np.all(np.isfinite(conf)) or conf.min() < 0 or conf.max() > 1 + 1e-9:
        raise ValueError("confidences must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bins are (lo, hi]; ceil(c * n) - 1 finds them, and 0 is put into the first bin.
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_conf = np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan)
        bin_acc = np.where(count > 0, acc_sum / np.maximum(count, 1), np.nan)
    gaps = np.abs(acc_sum - conf_sum)  # = count * |acc - conf| per bin
    ece = float(gaps.sum() / conf.size)
    return {
        "bin_edges": edges,
        "bin_confidence": bin_conf,
        "bin_accuracy": bin_acc,
        "bin_count": count,
        "ece": ece,
    }


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = DEFAULT_ECE_BINS) -> float:
    """ECE with ``n_bins`` equal-width confidence bins (see :func:`reliability_diagram_data`)."""
    return reliability_diagram_data(probs, labels, n_bins)["ece"]


def _checked_counts(train_class_counts: Sequence[int] | Any, num_classes: int | None) -> tuple[np.ndarray, int]:
    """The training counts as a 1-D array and the number of classes (their length unless given; must agree)."""
    counts = to_numpy(train_class_counts, "train_class_counts")
    if counts.ndim != 1:
        raise ValueError(f"train_class_counts must be 1-D, got shape {counts.shape}")
    if num_classes is None:
        num_classes = int(counts.shape[0])
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if counts.shape[0] != num_classes:
        raise ValueError(f"train_class_counts has {counts.shape[0]} entries but num_classes={num_classes}")
    return counts, num_classes


def _class_groups(groups: Sequence[str] | np.ndarray | None, counts: np.ndarray, num_classes: int,
                  many_threshold: int, few_threshold: int) -> np.ndarray:
    """Shot group name per class: ``groups`` as given (checked), else from the training counts and thresholds."""
    if groups is None:
        return shot_groups(counts, many_threshold=many_threshold, few_threshold=few_threshold)
    group_arr = np.asarray(groups, dtype=object)
    if group_arr.shape != (num_classes,):
        raise ValueError(f"groups must have one entry per class ({num_classes}), got shape {group_arr.shape}")
    unknown = set(group_arr.tolist()) - set(SHOT_NAMES)
    if unknown:
        raise ValueError(f"groups may only contain {SHOT_NAMES}, got {sorted(map(str, unknown))}")
    return group_arr


def _group_means(
    per_class: np.ndarray, group_arr: np.ndarray, has: np.ndarray
) -> tuple[dict[str, float], dict[str, int]]:
    """Mean per-class accuracy of each shot group over its classes with test images (``NaN`` when there are none),
    and how many such classes each group has."""
    means: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for name in SHOT_NAMES:
        members = (group_arr == name) & has
        sizes[name] = int(members.sum())
        means[name] = float(per_class[members].mean()) if members.any() else float("nan")
    return means, sizes


def longtail_metrics(
    outputs: Any,
    labels: Any,
    train_class_counts: Sequence[int] | Any,
    num_classes: int | None = None,
    *,
    many_threshold: int = 100,
    few_threshold: int = 20,
    groups: Sequence[str] | np.ndarray | None = None,
    probs: Any | None = None,
    kind: OutputKind = "auto",
    n_bins: int = DEFAULT_ECE_BINS,
) -> dict[str, Any]:
    """All long-tailed metrics of one evaluation, as fractions in [0, 1].

    Args:
        outputs: ``(N,)`` predicted class indices, or ``(N, C)`` logits or probabilities.
        labels: ``(N,)`` true class indices.
        train_class_counts: training images per class (length ``num_classes``); defines the shot groups.
        num_classes: number of classes; defaults to ``len(train_class_counts)``.
        many_threshold, few_threshold: shot-group thresholds (many > many_threshold, few < few_threshold).
        groups: precomputed shot group per class (e.g. from :func:`pih2t_hub.data.shots.fixed_range_groups`);
            overrides the thresholds.
        probs: ``(N, C)`` probabilities for ECE when ``outputs`` are hard predictions (or to override the softmax
            of logits, e.g. after temperature scaling).
        kind: how to read a 2-D ``outputs``: ``"logits"`` (softmax is applied), ``"probs"``, or ``"auto"``
            (probabilities if every row is non-negative and sums to 1, else logits).
        n_bins: ECE bins.

    Returns:
        ``overall``, ``balanced``, ``many``, ``medium``, ``few`` (floats; a group is ``NaN`` when it has no class
        with test images), ``ece`` (float, or ``None`` without scores), ``per_class`` (``NaN`` where a class has
        no test images), ``test_class_counts``, ``groups`` (group name per class), ``group_sizes`` (classes per
        group that have test images), ``confusion_matrix``, ``num_samples``.
    """
    counts, num_classes = _checked_counts(train_class_counts, num_classes)
    labels = _as_labels(labels, "labels", num_classes)
    if labels.size == 0:
        raise ValueError("labels is empty: nothing to evaluate")
    preds, p = _resolve_outputs(outputs, kind, probs, num_classes)
    if preds.shape != labels.shape:
        raise ValueError(f"predictions and labels differ in length: {preds.shape[0]} vs {labels.shape[0]}")
    group_arr = _class_groups(groups, counts, num_classes, many_threshold, few_threshold)

    cm = confusion_matrix(preds, labels, num_classes)
    support = cm.sum(axis=1)
    per_class = np.full(num_classes, np.nan)
    has = support > 0
    per_class[has] = np.diag(cm)[has] / support[has]

    result: dict[str, Any] = {
        "overall": float(np.trace(cm) / labels.size),
        "balanced": float(per_class[has].mean()),
    }
    group_means, group_sizes = _group_means(per_class, group_arr, has)
    result.update(group_means)
    result["ece"] = (
        reliability_diagram_data(p, labels, n_bins)["ece"] if p is not None else None
    )
    result.update(
        per_class=per_class,
        test_class_counts=support,
        groups=group_arr,
        group_sizes=group_sizes,
        confusion_matrix=cm,
        num_samples=int(labels.size),
    )
    return result
