"""Seeded, stratified splits: a validation split carved from train, a balanced test split where none exists.

Model selection happens on the validation split (the official H2T and DLSA codes pick epochs on *test*; this
project does not), so every class with at least two training images keeps at least one for validation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np

logger = logging.getLogger(__name__)
#: skipped images named in the warning (all of them are in ``results.json["unreadable_images"]``)
WARN_FIRST = 5


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


@dataclass(frozen=True)
class SplitSpec:
    """The data fields of a run's config that decide its splits: enough to rebuild a run's test split from the
    ``run_config.yaml`` it recorded, without the training code."""

    dataset: str
    label_column: str | None
    image_column: str | None
    imbalance_ratio: float | None
    profile: str
    max_per_class: int | None
    test_per_class: int
    val_fraction: float
    seed: int
    skip_unreadable_images: bool = False

    @classmethod
    def from_record(cls, record: Mapping[str, Any], where: str = "the recorded config") -> "SplitSpec":
        """The spec from a recorded config mapping (other keys are ignored); a missing key is one clear error."""
        missing = [f.name for f in fields(cls) if f.name not in record and f.name != "skip_unreadable_images"]
        if missing:
            raise ValueError(f"{where} does not record {', '.join(missing)}: cannot rebuild the run's splits")
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})


def load_splits(cfg: Any) -> dict[str, Any]:
    """Train (long-tailed), validation (carved from it, stratified) and a balanced test split of ``cfg.dataset``.

    ``cfg`` is a :class:`~pih2t_hub.training.config.RunConfig` or a :class:`SplitSpec` (any object with their data
    fields). The test split
    is the dataset's own when it has one, else a balanced one held out *before* the training set is made
    long-tailed, so test images never appear in train or validation.
    """
    from .labels import encode_string_labels
    from .longtail import make_long_tailed, resolve_label_column
    from .sources import load_dataset_any

    train_pool = load_dataset_any(cfg.dataset, split="train")
    label_col = resolve_label_column(train_pool, cfg.label_column)
    train_pool = encode_string_labels(train_pool, label_col)  # string labels: ids from the train split's names
    # where each row came from, (dataset split, row in it): a skipped image is named by what the user can look up
    train_source = ("train", np.arange(len(train_pool)))
    try:
        test = load_dataset_any(cfg.dataset, split="test")
    except (ValueError, KeyError, FileNotFoundError):
        test = None  # no test split: hold out a balanced one before making the training set long-tailed
    if test is not None:
        test = encode_string_labels(test, label_col, names=train_pool.features[label_col].names)
        test_source = ("test", np.arange(len(test)))
    if test is None:
        labels = np.asarray(train_pool[label_col])
        rest, test_idx = balanced_holdout(labels, cfg.test_per_class, seed=cfg.seed)
        test = train_pool.select(test_idx)
        train_pool = train_pool.select(rest)
        test_source, train_source = ("train", test_idx), ("train", rest)
    if cfg.imbalance_ratio is None:
        # the train split is already long-tailed (ImageNet-LT, Places-LT, iNat-2018): use it whole
        lt_ds = _encode_labels(train_pool, label_col)
    else:
        lt = make_long_tailed(train_pool, cfg.imbalance_ratio, profile=cfg.profile, max_per_class=cfg.max_per_class,
                              label_column=cfg.label_column, seed=cfg.seed)
        lt_ds, label_col = lt.dataset, lt.label_column
        train_source = (train_source[0], train_source[1][lt.indices])
    lt_labels = np.asarray(lt_ds[label_col])
    num_classes = int(lt_labels.max()) + 1
    feature = lt_ds.features[label_col]
    num_classes = max(num_classes, getattr(feature, "num_classes", 0) or 0)
    skipped: dict[str, list[dict[str, Any]]] = {}
    if getattr(cfg, "skip_unreadable_images", False):  # decode every image once; counts below are of kept rows
        lt_ds, skipped["train"] = _skip_unreadable(lt_ds, cfg.image_column, "train", train_source)
        test, skipped["test"] = _skip_unreadable(test, cfg.image_column, "test", test_source)
        lt_labels = np.asarray(lt_ds[label_col])
    keep, val_idx = stratified_split(lt_labels, cfg.val_fraction, seed=cfg.seed)
    train, val = lt_ds.select(keep), lt_ds.select(val_idx)
    counts = np.bincount(lt_labels[keep], minlength=num_classes)
    names = getattr(train.features[label_col], "names", None) or [str(i) for i in range(num_classes)]
    return {"train": train, "val": val, "test": test, "label_column": label_col, "class_counts": counts,
            "id2label": dict(enumerate(names)), "num_classes": num_classes,
            "lt_counts": np.bincount(lt_labels, minlength=num_classes).tolist(),
            "skipped_images": {split: len(rows) for split, rows in skipped.items()},
            "unreadable_images": [entry for rows in skipped.values() for entry in rows]}


def _skip_unreadable(ds: Any, image_column: str | None, split: str,
                     source: tuple[str, np.ndarray]) -> tuple[Any, list[dict[str, Any]]]:
    """``ds`` without its undecodable images, and one record per skipped image: the run's split it was dropped
    from, the dataset split and row it was read from (``datasets.load_dataset(..., split=...)[row]``), its file
    (``None`` for embedded bytes) and the decoder's message. A warning names the first :data:`WARN_FIRST`."""
    from .transforms import _without_rows, find_unreadable

    found = find_unreadable(ds, image_column)
    dataset_split, rows = source
    records = [{"split": split, "dataset_split": dataset_split, "row": int(rows[b.row]), "path": b.path,
                "error": b.error} for b in found]
    if records:
        named = ", ".join(f"{r['dataset_split']}[{r['row']}]" + (f" {r['path']}" if r["path"] else "")
                          for r in records[:WARN_FIRST])
        more = f" and {len(records) - WARN_FIRST} more" if len(records) > WARN_FIRST else ""
        logger.warning("skipped %d unreadable image(s) of the %s split (all listed in results.json "
                       "'unreadable_images'): %s%s", len(records), split, named, more)
    return _without_rows(ds, [b.row for b in found]), records


def _encode_labels(ds: Any, column: str) -> Any:
    """String labels become a ``ClassLabel`` column (as ``make_long_tailed`` does)."""
    from datasets import ClassLabel

    return ds if isinstance(ds.features[column], ClassLabel) else ds.class_encode_column(column)


__all__ = ["stratified_split", "balanced_holdout", "load_splits", "SplitSpec"]
