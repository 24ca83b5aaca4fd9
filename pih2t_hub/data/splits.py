"""Seeded, stratified splits: a validation split carved from train, a balanced test split where none exists.

Model selection happens on the validation split (the official H2T and DLSA codes pick epochs on *test*; this
project does not), so every class with at least two training images keeps at least one for validation.
"""

from __future__ import annotations

from typing import Any

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


def load_splits(cfg: Any) -> dict[str, Any]:
    """Train (long-tailed), validation (carved from it, stratified) and a balanced test split of ``cfg.dataset``.

    ``cfg`` is a :class:`~pih2t_hub.training.config.RunConfig` (any object with its data fields). The test split
    is the dataset's own when it has one, else a balanced one held out *before* the training set is made
    long-tailed, so test images never appear in train or validation.
    """
    from .labels import encode_string_labels
    from .longtail import make_long_tailed, resolve_label_column
    from .sources import load_dataset_any

    train_pool = load_dataset_any(cfg.dataset, split="train")
    label_col = resolve_label_column(train_pool, cfg.label_column)
    train_pool = encode_string_labels(train_pool, label_col)  # string labels: ids from the train split's names
    try:
        test = load_dataset_any(cfg.dataset, split="test")
    except (ValueError, KeyError, FileNotFoundError):
        test = None  # no test split: hold out a balanced one before making the training set long-tailed
    if test is not None:
        test = encode_string_labels(test, label_col, names=train_pool.features[label_col].names)
    if test is None:
        labels = np.asarray(train_pool[label_col])
        rest, test_idx = balanced_holdout(labels, cfg.test_per_class, seed=cfg.seed)
        test = train_pool.select(test_idx)
        train_pool = train_pool.select(rest)
    if cfg.imbalance_ratio is None:
        # the train split is already long-tailed (ImageNet-LT, Places-LT, iNat-2018): use it whole
        lt_ds = _encode_labels(train_pool, label_col)
    else:
        lt = make_long_tailed(train_pool, cfg.imbalance_ratio, profile=cfg.profile, max_per_class=cfg.max_per_class,
                              label_column=cfg.label_column, seed=cfg.seed)
        lt_ds, label_col = lt.dataset, lt.label_column
    lt_labels = np.asarray(lt_ds[label_col])
    num_classes = int(lt_labels.max()) + 1
    feature = lt_ds.features[label_col]
    num_classes = max(num_classes, getattr(feature, "num_classes", 0) or 0)
    skipped: dict[str, list] = {}
    if getattr(cfg, "skip_unreadable_images", False):  # decode every image once; counts below are of kept rows
        from .transforms import drop_unreadable

        lt_ds, skipped["train"] = drop_unreadable(lt_ds, cfg.image_column)
        test, skipped["test"] = drop_unreadable(test, cfg.image_column)
        lt_labels = np.asarray(lt_ds[label_col])
    keep, val_idx = stratified_split(lt_labels, cfg.val_fraction, seed=cfg.seed)
    train, val = lt_ds.select(keep), lt_ds.select(val_idx)
    counts = np.bincount(lt_labels[keep], minlength=num_classes)
    names = getattr(train.features[label_col], "names", None) or [str(i) for i in range(num_classes)]
    return {"train": train, "val": val, "test": test, "label_column": label_col, "class_counts": counts,
            "id2label": dict(enumerate(names)), "num_classes": num_classes,
            "lt_counts": np.bincount(lt_labels, minlength=num_classes).tolist(),
            "skipped_images": {split: len(rows) for split, rows in skipped.items()}}


def _encode_labels(ds: Any, column: str) -> Any:
    """String labels become a ``ClassLabel`` column (as ``make_long_tailed`` does)."""
    from datasets import ClassLabel

    return ds if isinstance(ds.features[column], ClassLabel) else ds.class_encode_column(column)


__all__ = ["stratified_split", "balanced_holdout", "load_splits"]
