"""Stratified K-fold assignment of pooled rows, for selecting a configuration by cross-validation.

One validation split of a long-tailed set holds one or two images of each tail class, so a score measured on it
ranks configurations by noise. Cross-validation lets every image validate exactly once per repeat.

How rows are dealt to folds (:func:`stratified_folds`): the rows of each class are shuffled with the repeat's
seed, the classes are laid end to end (in label order), and the whole sequence is dealt round-robin to the K folds.
So every class puts ``floor(n_c / K)`` or ``ceil(n_c / K)`` of its images in each fold's validation part, and the
folds' sizes differ by at most one. A class with fewer than K images (a few-shot tail) validates each of its images
in a different fold, continuing the deal where the previous class stopped; the other folds hold none of it in their
validation part, and the class then simply does not count in those folds' balanced accuracy (the mean recall over
the classes a validation part holds, :func:`pih2t_hub.evaluation.metrics.longtail_metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Fold", "stratified_folds", "cv_folds"]


@dataclass(frozen=True)
class Fold:
    """One (repeat, fold): the pooled rows it trains on and the rows it validates on (both sorted)."""

    repeat: int
    fold: int
    train: np.ndarray
    val: np.ndarray


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The fold (``0 .. k-1``) whose validation part holds each row: class-stratified round-robin (module doc)."""
    labels = np.asarray(labels)
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    if k > len(labels):
        raise ValueError(f"{k} folds need at least {k} rows, got {len(labels)}")
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
    fold = np.empty(len(labels), dtype=np.int64)
    fold[order] = np.arange(len(order)) % k
    return fold


def cv_folds(labels: np.ndarray, k: int, repeats: int, seed: int = 0) -> list[Fold]:
    """Every (repeat, fold) of ``repeats`` independent stratified K-fold deals; repeat ``r`` deals with seed
    ``seed + r``."""
    if repeats < 1:
        raise ValueError(f"cross-validation needs at least 1 repeat, got {repeats}")
    folds = []
    for r in range(repeats):
        assign = stratified_folds(labels, k, seed + r)
        for f in range(k):
            folds.append(Fold(r, f, np.flatnonzero(assign != f), np.flatnonzero(assign == f)))
    return folds
