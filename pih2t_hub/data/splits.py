"""Seeded, stratified splits: a validation split carved from train, a balanced test split where none exists.

Model selection happens on the validation split (the official H2T and DLSA codes pick epochs on *test*; this
project does not), so every class with at least two training images keeps at least one for validation.
"""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into ``(keep, held_out)`` with ``round(fraction · n_c)`` held out per class.

    A class with ``n_c >= 2`` holds out at least one and keeps at least one; a singleton class is kept whole.
    Both index arrays are sorted. Identical on every machine for a given seed.
    """
    labels = np.asarray(labels)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must lie in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    if fraction > 0:
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            if len(rows) < 2:
                continue
            k = min(max(1, int(round(fraction * len(rows)))), len(rows) - 1)
            held.append(rng.choice(rows, size=k, replace=False))
    held_out = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(labels)), held_out)
    return keep, held_out


def balanced_holdout(labels: np.ndarray, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Hold out exactly ``per_class`` rows of every class (a balanced test set); returns ``(rest, test)``."""
    labels = np.asarray(labels)
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) <= per_class:
            raise ValueError(f"class {c} has {len(rows)} images; cannot hold out {per_class} for a balanced test set")
        test.append(rng.choice(rows, size=per_class, replace=False))
    test_idx = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(len(labels)), test_idx), test_idx


__all__ = ["stratified_split", "balanced_holdout"]
